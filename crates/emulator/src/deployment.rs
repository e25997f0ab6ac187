//! The state one emulated deployment shares across its listeners: the data
//! lock (`Inner`: data, sessions, cursors), the cluster clock, the
//! replica-set topology and its change signal, the fail points, the
//! per-member "close every connection" signal, the "a transaction ended"
//! signal blocked writers wait on, and the counters tests read. Locks are
//! std mutexes held only for synchronous work, never across `.await`.
//!
//! Step-down and elections (`replSetStepDown`, see [`EmulatorState::step_down`]):
//! the primary becomes a secondary, ineligible for the step-down period; its
//! transactions in progress are aborted (the server aborts unprepared
//! transactions when it steps down); with
//! `EmulatorConfig::close_connections_on_step_down` (the default) every
//! client connection of that member is closed once the command's reply is
//! written. After `EmulatorConfig::election_delay` (default: at once, in
//! the same topology change) the next eligible member in start order becomes
//! primary, with a new term; with none eligible (a one-member set stepped
//! down with `force`), the first member whose period ends is elected then.
//! Every change bumps `topologyVersion.counter` and wakes awaiting hellos on
//! every member.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Document};
use bytes::Bytes;
use tokio::sync::watch;

use super::clock::ClusterClock;
use super::emulator_config::{EmulatorConfig, Topology};
use super::errors::{
    CommandError, BAD_VALUE, EXCEEDED_TIME_LIMIT, NOT_WRITABLE_PRIMARY, NO_REPLICATION_ENABLED,
};
use super::faults::FailPoints;
use super::locks::lock;
use super::profile::Profile;
use super::server_sessions::Inner;

/// Replica-set view: who is primary, and the topologyVersion.
#[derive(Debug, Clone)]
pub(crate) struct TopologyState {
    pub process_id: ObjectId,
    pub counter: i64,
    /// Index into `members` of the primary, if any.
    pub primary_member: Option<usize>,
    /// Election term: bumped on every new primary (electionId and opTime.t).
    pub term: i64,
    /// Advertised "host:port" of each listener, in start order.
    pub members: Vec<String>,
    /// Per member: stepped down, and not electable before this instant.
    pub ineligible_until: Vec<Option<Instant>>,
}

/// Shared state of one emulated deployment.
pub struct EmulatorState {
    /// This state itself, for the election timers it spawns.
    me: Weak<EmulatorState>,
    pub(crate) config: EmulatorConfig,
    pub(crate) fail_points: FailPoints,
    /// Per member: bumped to close every client connection of that member.
    disconnects: Mutex<Vec<watch::Sender<u64>>>,
    pub(crate) inner: Mutex<Inner>,
    clock: Arc<ClusterClock>,
    transaction_ended: watch::Sender<u64>,
    topology: Mutex<TopologyState>,
    topology_changed: watch::Sender<i64>,
    command_counts: Mutex<HashMap<String, u64>>,
    ended_sessions: AtomicU64,
    refreshed_sessions: AtomicU64,
    frames: Mutex<Vec<Bytes>>,
    peers: Mutex<Vec<SocketAddr>>,
    next_request_id: AtomicI32,
    next_connection_id: AtomicI32,
}

impl EmulatorState {
    /// A fresh deployment. Starts the idle-session reaper when called inside
    /// a tokio runtime (expiry is also checked lazily on every use).
    /// The profile decides the persona where it has one: `documentdb` is a
    /// mongos-like server whatever `topology` says.
    pub fn new(mut config: EmulatorConfig) -> Arc<EmulatorState> {
        if config.profile == Profile::DocumentDb {
            config.topology = Topology::Mongos;
        }
        let (topology_changed, _) = watch::channel(0);
        let (transaction_ended, _) = watch::channel(0);
        let clock = Arc::new(ClusterClock::default());
        let state = Arc::new_cyclic(|me| EmulatorState {
            me: me.clone(),
            config,
            fail_points: FailPoints::default(),
            disconnects: Mutex::new(Vec::new()),
            inner: Mutex::new(Inner::with_clock(clock.clone())),
            clock,
            transaction_ended,
            topology: Mutex::new(TopologyState {
                process_id: ObjectId::new(),
                counter: 0,
                primary_member: Some(0),
                term: 1,
                members: Vec::new(),
                ineligible_until: Vec::new(),
            }),
            topology_changed,
            command_counts: Mutex::new(HashMap::new()),
            ended_sessions: AtomicU64::new(0),
            refreshed_sessions: AtomicU64::new(0),
            frames: Mutex::new(Vec::new()),
            peers: Mutex::new(Vec::new()),
            next_request_id: AtomicI32::new(1),
            next_connection_id: AtomicI32::new(1),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reaper(Arc::downgrade(&state)));
        }
        state
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.config
    }

    pub(crate) fn clock(&self) -> &ClusterClock {
        &self.clock
    }

    /// The cluster time now (what replies report as `operationTime`).
    pub fn cluster_time(&self) -> bson::Timestamp {
        self.clock.current()
    }

    /// Adds `$clusterTime` and `operationTime` to a reply, as every
    /// replica-set member and mongos does (never a standalone). No signing
    /// keys exist, so the signature is the all-zero one a server without
    /// keys sends.
    pub(crate) fn stamp(&self, reply: &mut Document) {
        // DocumentDB sends no cluster time (its captured replies have none).
        if self.config.topology == Topology::Standalone
            || self.config.profile == Profile::DocumentDb
        {
            return;
        }
        let now = self.clock.current();
        reply.insert(
            "$clusterTime",
            doc! {
                "clusterTime": now,
                "signature": {
                    "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] },
                    "keyId": 0_i64,
                },
            },
        );
        reply.insert("operationTime", now);
    }

    /// Wakes writers waiting for a transaction's document locks.
    pub(crate) fn notify_transaction_ended(&self) {
        self.transaction_ended
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Subscribe before trying a write, so an ending that happens between
    /// the try and the wait is not missed.
    pub(crate) fn subscribe_transaction_ended(&self) -> watch::Receiver<u64> {
        self.transaction_ended.subscribe()
    }

    /// Number of transactions in progress.
    pub fn open_transaction_count(&self) -> usize {
        lock(&self.inner).open_transactions()
    }
    pub(crate) fn next_request_id(&self) -> i32 {
        // Wraps at i32::MAX back to 1: request ids only need to be unique among recent messages.
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        if id <= 0 {
            self.next_request_id.store(2, Ordering::Relaxed);
            return 1;
        }
        id
    }

    pub(crate) fn next_connection_id(&self) -> i32 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register_member(&self, host: String) -> usize {
        lock(&self.disconnects).push(watch::channel(0).0);
        let mut topology = lock(&self.topology);
        topology.members.push(host);
        topology.ineligible_until.push(None);
        topology.members.len() - 1
    }

    /// Changes when every client connection of `member` must close.
    pub(crate) fn subscribe_disconnect(&self, member: usize) -> watch::Receiver<u64> {
        match lock(&self.disconnects).get(member) {
            Some(sender) => sender.subscribe(),
            None => watch::channel(0).1,
        }
    }

    /// Closes every client connection of `member` (each after the reply it
    /// is writing, if any).
    pub fn disconnect_member(&self, member: usize) {
        if let Some(sender) = lock(&self.disconnects).get(member) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
        tracing::info!(
            member,
            "emulator closes every client connection of a member"
        );
    }

    /// The member that is primary now, if any.
    pub fn primary_member(&self) -> Option<usize> {
        lock(&self.topology).primary_member
    }

    /// `replSetStepDown` on `member`: see the module documentation. `secs`
    /// is the command's field as given (0 or not a number means 60, as on
    /// the server); `catch_up` is `secondaryCatchUpPeriodSecs`.
    pub fn step_down(
        &self,
        member: usize,
        secs: Option<f64>,
        catch_up: Option<i64>,
        force: bool,
    ) -> Result<(), CommandError> {
        if !matches!(self.config.topology, Topology::ReplicaSetPrimary { .. }) {
            return Err(CommandError::new(
                NO_REPLICATION_ENABLED,
                "not running with --replSet",
            ));
        }
        let secs = match secs {
            None => 60.0,
            Some(s) if s < 0.0 => {
                return Err(CommandError::new(
                    BAD_VALUE,
                    "stepdown period must be a positive integer",
                ))
            }
            Some(0.0) => 60.0,
            Some(s) => s.trunc(),
        };
        let catch_up = match catch_up {
            None if force => 0,
            None => 10,
            Some(c) if c < 0 => {
                return Err(CommandError::new(
                    BAD_VALUE,
                    "secondaryCatchUpPeriodSecs period must be a positive or absent",
                ))
            }
            Some(c) => c,
        };
        if secs < catch_up as f64 {
            return Err(CommandError::new(
                BAD_VALUE,
                "stepdown period must be longer than secondaryCatchUpPeriodSecs",
            ));
        }
        let period = Duration::from_secs_f64(secs);
        let now = Instant::now();
        let elected_now = {
            let mut topology = lock(&self.topology);
            if topology.primary_member != Some(member) {
                return Err(CommandError::new(
                    NOT_WRITABLE_PRIMARY,
                    "not primary so can't step down",
                ));
            }
            let electable = next_electable(&topology, member, now).filter(|m| *m != member);
            if electable.is_none() && !force {
                // Every member shares one data set, so any other member is
                // caught up; the server would first wait the catch-up period.
                return Err(CommandError::new(
                    EXCEEDED_TIME_LIMIT,
                    format!("No electable secondaries caught up as of {}. Please use the replSetStepDown command with the argument {{force: true}} to force node to step down.", bson::DateTime::now().try_to_rfc3339_string().unwrap_or_default()),
                ));
            }
            if let Some(slot) = topology.ineligible_until.get_mut(member) {
                *slot = Some(now + period);
            }
            topology.primary_member = None;
            let at_once = self.config.election_delay.is_zero();
            let elected = electable.filter(|_| at_once);
            if let Some(next) = elected {
                topology.primary_member = Some(next);
                topology.term += 1;
            }
            topology.counter += 1;
            self.topology_changed.send_replace(topology.counter);
            elected
        };
        tracing::info!(member, period_secs = secs, force, elected = ?elected_now, "emulator primary stepped down");
        let aborted = lock(&self.inner).abort_all_in_progress();
        if aborted > 0 {
            tracing::info!(
                transactions = aborted,
                "step-down aborted the transactions in progress"
            );
            self.notify_transaction_ended();
        }
        if elected_now.is_none() {
            self.schedule_election(self.config.election_delay, member);
        }
        if self.config.close_connections_on_step_down {
            self.disconnect_member(member);
        }
        Ok(())
    }

    /// Elects a primary after `delay` (when none is elected by then), or
    /// later, when a stepped-down member's period ends, if no member is
    /// electable at that time.
    fn schedule_election(&self, delay: Duration, after: usize) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.me.clone();
        runtime.spawn(async move {
            let mut wait = delay;
            loop {
                tokio::time::sleep(wait).await;
                let Some(state) = me.upgrade() else {
                    return;
                };
                match state.elect(after) {
                    Ok(()) => return,
                    Err(next_try) => wait = next_try,
                }
            }
        });
    }

    /// Elects the next electable member if there is no primary. `Err`:
    /// nobody is electable yet; try again after that long.
    fn elect(&self, after: usize) -> Result<(), Duration> {
        let now = Instant::now();
        let counter = {
            let mut topology = lock(&self.topology);
            if topology.primary_member.is_some() {
                return Ok(());
            }
            let Some(next) = next_electable(&topology, after, now) else {
                let soonest = topology
                    .ineligible_until
                    .iter()
                    .flatten()
                    .min()
                    .map_or(Duration::from_millis(100), |until| {
                        until.saturating_duration_since(now)
                    });
                return Err(soonest.max(Duration::from_millis(1)));
            };
            topology.primary_member = Some(next);
            topology.term += 1;
            topology.counter += 1;
            topology.counter
        };
        tracing::info!(counter, "emulator elected a new primary");
        self.topology_changed.send_replace(counter);
        Ok(())
    }

    pub(crate) fn topology(&self) -> TopologyState {
        lock(&self.topology).clone()
    }

    pub(crate) fn subscribe_topology(&self) -> watch::Receiver<i64> {
        self.topology_changed.subscribe()
    }

    /// Makes `member` primary (or no member primary), bumping the
    /// topologyVersion and waking streaming hellos.
    pub fn set_primary(&self, member: usize, is_primary: bool) {
        let counter = {
            let mut topology = lock(&self.topology);
            let new_primary = if is_primary {
                Some(member)
            } else if topology.primary_member == Some(member) {
                None
            } else {
                topology.primary_member
            };
            if new_primary != topology.primary_member && new_primary.is_some() {
                topology.term += 1;
            }
            topology.primary_member = new_primary;
            topology.counter += 1;
            topology.counter
        };
        tracing::info!(member, is_primary, counter, "emulator topology changed");
        self.topology_changed.send_replace(counter);
    }

    pub(crate) fn count_command(&self, name: &str) {
        *lock(&self.command_counts)
            .entry(name.to_string())
            .or_insert(0) += 1;
    }

    pub fn command_count(&self, name: &str) -> u64 {
        lock(&self.command_counts).get(name).copied().unwrap_or(0)
    }

    pub(crate) fn add_ended_sessions(&self, n: u64) {
        self.ended_sessions.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_refreshed_sessions(&self, n: u64) {
        self.refreshed_sessions.fetch_add(n, Ordering::Relaxed);
    }

    pub fn ended_session_count(&self) -> u64 {
        self.ended_sessions.load(Ordering::Relaxed)
    }

    pub fn refreshed_session_count(&self) -> u64 {
        self.refreshed_sessions.load(Ordering::Relaxed)
    }

    pub(crate) fn record_frame(&self, bytes: &Bytes) {
        if self.config.record_frames {
            lock(&self.frames).push(bytes.clone());
        }
    }

    pub fn received_frames(&self) -> Vec<Bytes> {
        lock(&self.frames).clone()
    }

    pub(crate) fn add_peer(&self, peer: SocketAddr) {
        lock(&self.peers).push(peer);
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }

    pub(crate) fn reap_now(&self) {
        let now = Instant::now();
        let ended = {
            let mut inner = lock(&self.inner);
            let before = inner.txn_endings;
            inner.reap(
                now,
                self.config.session_timeout,
                self.config.cursor_timeout,
                self.config.transaction_lifetime_limit,
            );
            inner.txn_endings != before
        };
        if ended {
            self.notify_transaction_ended();
        }
    }
}

/// The first member after `after` (in start order, wrapping round to
/// `after` itself last) that is not in a step-down period.
fn next_electable(topology: &TopologyState, after: usize, now: Instant) -> Option<usize> {
    let n = topology.members.len();
    (1..=n).map(|i| (after + i) % n).find(|m| {
        topology
            .ineligible_until
            .get(*m)
            .copied()
            .flatten()
            .is_none_or(|until| until <= now)
    })
}

/// Periodically expires idle sessions and cursors until the state is dropped.
async fn reaper(state: Weak<EmulatorState>) {
    let period = match state.upgrade() {
        Some(s) => (s
            .config
            .session_timeout
            .min(s.config.cursor_timeout)
            .min(s.config.transaction_lifetime_limit)
            / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1)),
        None => return,
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        state.reap_now();
    }
}
