//! `SessionEngine`: the synchronous heart of sessionguard. The connection
//! tasks call it for every request, reply, connect and close; it reads the
//! command views, keeps the per-connection facts (handshake identity,
//! authenticated owner, recent operations), drives the session
//! ledger, runs the enabled rules, decides whether a request is rejected
//! (enforce), and reports violations: per-rule counters for every one, and
//! through `findings` (grouped by bug) the log lines, the kept examples and
//! the bounded list of recent violations. Each connection keeps a small ring
//! of its recent session operations (`timeline`) for the examples.
//!
//! It judges by outcome (see `rules`' module doc): an effect — a session
//! ended or killed, a refresh, a cursor killed, a transaction committed —
//! takes hold when the server answers ok:1, not when the request passes; a
//! refused command changes nothing but a counter (and one log line per
//! upstream and command); an effect whose reply never comes is recorded as
//! unconfirmed. A closed connection is misuse only when the client closed
//! or reset its side first. Two identical requests on one session at once
//! are told apart by what happens to the first: a retry if its connection
//! fails without its reply, concurrent use if its reply is delivered.
//!
//! It keeps no table of the requests awaiting replies: `request` returns a
//! [`PendingRequest`] for each one it follows (its session, class, cursor,
//! and the effect a session command will have once confirmed), which the
//! caller — the proxy's per-connection in-flight table, through the
//! binary's inspector — owns and hands back with the reply (`reply`) or at
//! the close (`close`). What the session entries keep in flight
//! (`state::InFlightSet`) is per session, across connections, which that
//! table cannot answer: it is what `concurrent-use` reads.
//!
//! The `impl SessionEngine` is split by concern (see the crate's `# Layout`):
//! connection identity (`conns`), the request / reply / close pipeline
//! (`pipeline`), the violation log and evidence (`log`), counters and admin
//! views (`stats`), and the refresh planner's API (`refresh_api`); the data
//! they keep lives in leaf modules (`conn_state`, `pending`,
//! `violation_log`, `counters`) so no module depends on one that depends
//! on it.
//!
//! It never blocks and never awaits: every call takes a few map locks for a
//! few microseconds and returns. No lock is held across a call boundary and
//! no two session entries are locked at once. It never logs document
//! contents — command names, namespaces, ids and counts only.

mod conn_state;
mod conns;
mod counters;
mod log;
mod pending;
mod pipeline;
pub(crate) mod refresh_api;
mod stats;
#[cfg(test)]
pub(crate) mod tests;
mod violation_log;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sessionguard_protocol::CloseCause;
use sessionguard_protocol::COMMAND_LABELS;

use super::config::DEFAULT_FINDING_INTERVAL;
use super::config::{LiveRules, ResolvedRules, SessionConfig, DEFAULT_SERVER_SESSION_TIMEOUT};
use super::config::{RefreshPolicy, RulesConfig};
use super::findings::FindingTable;
use super::intern::{ClientIdentity, FastDashMap, Names, Tables, DEFAULT_INTERN_LIMIT};
use super::ledger::SessionLedger;
use super::outcome::{RefusalCounts, Verdicts};
use super::rules::RuleContext;
use super::state::{millis, ClientId, Millis, Sym};
use super::web_store::{StoreConfig, StoreTracker};

pub use conn_state::ConnHandle;
use conn_state::{ConnCell, UpstreamState};
pub use counters::{EngineStats, PerCommand};
use counters::{Lifecycle, StripedCounter};
pub use pending::PendingRequest;
use violation_log::ViolationLog;

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward,
    /// Answer with this reply body (a raw BSON document) instead of forwarding.
    Reject {
        reply: Vec<u8>,
    },
}

pub struct SessionEngine {
    /// As started: a reload changes only `rules` and `transaction_max_open`.
    config: SessionConfig,
    /// Mode and per-rule settings; a reload swaps them (`reconfigure`).
    rules: LiveRules,
    /// `sessions.transaction_max_open` in ms (a reload may change it).
    transaction_max_open: AtomicU64,
    ledger: SessionLedger,
    tables: Tables,
    conns: FastDashMap<u64, Arc<ConnCell>>,
    upstream_ids: FastDashMap<SocketAddr, u32>,
    next_upstream: AtomicU32,
    upstreams: FastDashMap<u32, UpstreamState>,
    /// logicalSessionTimeoutMinutes from hello replies, in ms (0: not seen).
    learned_timeout: AtomicU64,
    origin: Instant,
    origin_wall: SystemTime,
    violations: ViolationLog,
    last_purge: AtomicU64,
    requests_inspected: StripedCounter,
    requests_rejected: AtomicU64,
    refreshes_sent: AtomicU64,
    sessions_refreshed: AtomicU64,
    refresh_failures: AtomicU64,
    /// Web-session store documents (`[stores]`).
    stores: StoreTracker,
    lifecycle: Lifecycle,
    /// Concurrent-use verdicts waiting for the first request's outcome.
    verdicts: Verdicts,
    refusals: RefusalCounts,
    retries: [AtomicU64; COMMAND_LABELS.len()],
    in_flight_abandoned: [AtomicU64; CloseCause::COUNT],
}

impl std::fmt::Debug for SessionEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEngine")
            .field("sessions", &self.ledger.len())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Names for SessionEngine {
    fn symbol(&self, sym: Sym) -> Arc<str> {
        self.tables.symbols.resolve(sym.0)
    }
    fn identity(&self, id: ClientId) -> Option<Arc<ClientIdentity>> {
        self.tables.identities.get(id)
    }
}

impl SessionEngine {
    /// An engine with validated configuration (see `SessionConfig::validate`).
    pub fn new(config: &SessionConfig, rules: &RulesConfig) -> SessionEngine {
        SessionEngine {
            config: config.clone(),
            rules: LiveRules::new(ResolvedRules::resolve(config.mode, rules)),
            transaction_max_open: AtomicU64::new(millis(config.transaction_max_open)),
            ledger: SessionLedger::new(config.max_sessions),
            tables: Tables::new(DEFAULT_INTERN_LIMIT),
            conns: FastDashMap::default(),
            upstream_ids: FastDashMap::default(),
            next_upstream: AtomicU32::new(0),
            upstreams: FastDashMap::default(),
            learned_timeout: AtomicU64::new(0),
            origin: Instant::now(),
            origin_wall: SystemTime::now(),
            violations: ViolationLog {
                findings: Mutex::new(FindingTable::new(
                    config.max_findings,
                    millis(DEFAULT_FINDING_INTERVAL),
                    config.max_violations,
                )),
                next_id: AtomicU64::new(1),
                per_rule: Default::default(),
            },
            last_purge: AtomicU64::new(0),
            requests_inspected: StripedCounter::default(),
            requests_rejected: AtomicU64::new(0),
            refreshes_sent: AtomicU64::new(0),
            sessions_refreshed: AtomicU64::new(0),
            refresh_failures: AtomicU64::new(0),
            stores: StoreTracker::default(),
            lifecycle: Lifecycle::default(),
            verdicts: Verdicts::default(),
            refusals: RefusalCounts::default(),
            retries: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight_abandoned: Default::default(),
        }
    }

    /// The engine with web-session stores configured (`[stores]`, validated);
    /// without it the defaults apply.
    pub fn with_stores(mut self, stores: &StoreConfig) -> SessionEngine {
        self.stores = StoreTracker::new(stores);
        self
    }

    /// Summary lines about a finding at most this often (`log.finding_interval`;
    /// default `DEFAULT_FINDING_INTERVAL`, validated by the caller).
    pub fn with_finding_interval(self, interval: Duration) -> SessionEngine {
        self.set_finding_interval(interval);
        self
    }

    /// `with_finding_interval` on a running engine (a configuration reload):
    /// applies from each finding's next line on.
    pub fn set_finding_interval(&self, interval: Duration) {
        self.findings_table().set_interval(millis(interval));
    }

    /// The summary interval in force (`log.finding_interval`).
    pub fn finding_interval(&self) -> Duration {
        Duration::from_millis(self.findings_table().interval())
    }

    /// Milliseconds since the engine started (its clock for all state).
    pub fn now(&self) -> Millis {
        millis(self.origin.elapsed())
    }

    /// The engine time and a request's sequence number from one clock
    /// read. The sequence orders the timeline's operations sent in one
    /// millisecond: nanoseconds since the engine started (monotonic), so
    /// no write shared by every data thread (a counter was one contended
    /// cache line per request), increasing in the order one thread
    /// inspects requests; 0 and `u64::MAX` stay free for the timeline's
    /// own markers.
    pub(super) fn now_and_seq(&self) -> (Millis, u64) {
        let elapsed = self.origin.elapsed();
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX - 1);
        (millis(elapsed), nanos.clamp(1, u64::MAX - 1))
    }

    /// The server's session timeout: configured, else learned from hello,
    /// else the server default (30 minutes).
    pub fn session_timeout(&self) -> Duration {
        if let Some(timeout) = self.config.session_timeout {
            return timeout;
        }
        match self.learned_timeout.load(Ordering::Relaxed) {
            0 => DEFAULT_SERVER_SESSION_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }

    /// Idle time after which the refresher refreshes a held session.
    pub fn refresh_after(&self) -> Duration {
        self.config
            .refresh_after
            .unwrap_or_else(|| self.session_timeout() / 2)
    }

    pub fn refresh_policy(&self) -> RefreshPolicy {
        self.config.refresh
    }

    /// How often the refresher looks for sessions to refresh.
    pub fn refresh_interval(&self) -> Duration {
        self.config.refresh_interval
    }

    /// Puts the live part of a reloaded configuration in force: the mode,
    /// every `[rules.<id>]` setting and `sessions.transaction_max_open`.
    /// Requests already being judged finish under the settings they
    /// started with; the ledger, connections and counters are untouched.
    /// `sessions` and `rules` must be validated.
    pub fn reconfigure(&self, sessions: &SessionConfig, rules: &RulesConfig) {
        self.transaction_max_open
            .store(millis(sessions.transaction_max_open), Ordering::Relaxed);
        self.rules
            .store(ResolvedRules::resolve(sessions.mode, rules));
    }

    /// The mode and rule settings in force now.
    pub fn rules(&self) -> ResolvedRules {
        self.rules.load()
    }

    fn context(&self, now: Millis) -> RuleContext<'_> {
        RuleContext {
            now,
            session_timeout: millis(self.session_timeout()),
            transaction_max_open: self.transaction_max_open.load(Ordering::Relaxed),
            names: self,
        }
    }
}
