//! The state one emulated deployment shares across its listeners: the data
//! lock (`Inner`: data, sessions, cursors), the cluster clock, the
//! replica-set topology and its change signal, the "a transaction ended"
//! signal blocked writers wait on, and the counters tests read. Locks are
//! std mutexes held only for synchronous work, never across `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Document};
use bytes::Bytes;
use tokio::sync::watch;

use super::clock::ClusterClock;
use super::sessions::Inner;
use super::{EmulatorConfig, Topology};

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (the emulator never panics while holding one, but must not cascade).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
}

/// Shared state of one emulated deployment.
pub struct EmulatorState {
    pub(crate) config: EmulatorConfig,
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
    pub fn new(config: EmulatorConfig) -> Arc<EmulatorState> {
        let (topology_changed, _) = watch::channel(0);
        let (transaction_ended, _) = watch::channel(0);
        let clock = Arc::new(ClusterClock::default());
        let state = Arc::new(EmulatorState {
            config,
            inner: Mutex::new(Inner::with_clock(clock.clone())),
            clock,
            transaction_ended,
            topology: Mutex::new(TopologyState {
                process_id: ObjectId::new(),
                counter: 0,
                primary_member: Some(0),
                term: 1,
                members: Vec::new(),
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
        if self.config.topology == Topology::Standalone {
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
        let mut topology = lock(&self.topology);
        topology.members.push(host);
        topology.members.len() - 1
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
