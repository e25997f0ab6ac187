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
//! It never blocks and never awaits: every call takes a few map locks for a
//! few microseconds and returns. No lock is held across a call boundary and
//! no two session entries are locked at once. It never logs document
//! contents — command names, namespaces, ids and counts only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sessionguard_protocol::command::{
    auth_user, AuthUser, Handshake, KillPattern, Lsid, ReplyView, RequestView,
};
use sessionguard_protocol::wire::Message;
use sessionguard_protocol::CloseCause;
use sessionguard_protocol::{command_index, COMMAND_LABELS};

use super::config::DEFAULT_FINDING_INTERVAL;
use super::config::{LiveRules, ResolvedRules, SessionConfig, DEFAULT_SERVER_SESSION_TIMEOUT};
use super::config::{RefreshPolicy, RulesConfig};
use super::finding_id::FindingId;
use super::findings::{
    self, Examples, FindingDetail, FindingSnapshot, FindingTable, IdKey, Kept, LogNow, Summary,
};
use super::intern::{
    normalize_ip, ClientIdentity, FastDashMap, Names, Tables, DEFAULT_INTERN_LIMIT,
};
use super::ledger::{CursorEntry, CursorKey, LedgerCounts, SessionLedger};
use super::outcome::{
    Effect, EffectKind, EffectOutcome, KillTarget, PendingVerdict, Refusal, RefusalCounts,
    SessionCommand, Verdicts, RETRY_VERDICT_WINDOW,
};
use super::rules::{self, CursorEvent, EndEvent, Overlap, RequestEvent, RuleContext};
use super::state::{
    millis, ClientId, CommandClass, EndKind, InFlight, Millis, OwnerId, ReplyFacts, RequestFacts,
    RequestRef, SessionKey, SessionSummary, Sym, TxnEvents,
};
use super::timeline::{Gather, OpRing, OpSlot, Timeline};
use super::violation::{
    Action, RequestEvidence, RuleId, Severity, StoreEvidence, Violation, ViolationRecord,
    SESSIONGUARD_VIOLATION_CODE, SESSIONGUARD_VIOLATION_CODE_NAME,
};
use super::web_store::{StoreConfig, StoreStats, StoreTracker};

/// Server error codes the engine reads replies for.
const NO_SUCH_TRANSACTION: i32 = 251;
const CURSOR_NOT_FOUND: i32 = 43;

/// How often tombstones and long-expired sessions are purged.
const PURGE_EVERY: Millis = 60_000;

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Forward,
    /// Answer with this reply body (a raw BSON document) instead of forwarding.
    Reject {
        reply: Vec<u8>,
    },
}

/// Engine-wide counters (for metrics and the admin API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub ledger: LedgerCounts,
    pub connections: usize,
    pub requests_inspected: u64,
    pub requests_rejected: u64,
    pub refreshes_sent: u64,
    pub sessions_refreshed: u64,
    pub refresh_failures: u64,
    pub violations: u64,
    /// Sessions the proxy saw start: the first forwarded request under an
    /// lsid it does not track (new, or forgotten after eviction), or a reuse
    /// after the session ended or expired (the server starts a new one).
    pub sessions_started: u64,
    /// Live sessions ended by `endSessions`.
    pub sessions_ended: u64,
    /// Live sessions killed by `killSessions` / `killAllSessions` /
    /// `killAllSessionsByPattern`.
    pub sessions_killed: u64,
    /// Sessions the server expired (idle past its timeout): seen when one
    /// is used again, or when the ledger purges it unused.
    pub sessions_expired: u64,
    pub transactions_started: u64,
    pub transactions_committed: u64,
    /// By the client's abortTransaction, or by the server: an error reply
    /// saying so, a higher txnNumber, the session ending.
    pub transactions_aborted: u64,
    /// Transactions still open past `transaction_max_open` (counted once,
    /// whether or not the txn-left-open rule is enabled).
    pub transactions_left_open: u64,
    /// Session requests still awaiting their reply when their connection
    /// closed, by close cause (`CloseCause::index`). Only the client's own
    /// closes can be closed-with-requests-in-flight; the rest are only this.
    pub in_flight_abandoned: [u64; CloseCause::COUNT],
    /// Driver retries recognised, by command (`metrics::COMMAND_LABELS`).
    pub retries: PerCommand,
    /// Session commands the upstream refused: `[SessionCommand::index][Refusal::index]`.
    pub commands_refused: [[u64; Refusal::COUNT]; SessionCommand::COUNT],
    /// Concurrent-use verdicts waiting for the first request's outcome.
    pub retry_verdicts_pending: usize,
    /// Identical requests left unjudged because too many verdicts waited.
    pub retry_verdicts_unjudged: u64,
}

/// A count per command label (`metrics::COMMAND_LABELS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerCommand(pub [u64; COMMAND_LABELS.len()]);

impl Default for PerCommand {
    fn default() -> Self {
        PerCommand([0; COMMAND_LABELS.len()])
    }
}

impl PerCommand {
    /// The count for a command name.
    pub fn get(&self, command: &str) -> u64 {
        self.0[command_index(command)]
    }
}

/// Session and transaction lifecycle counters, bumped where the state
/// machine records each transition.
#[derive(Debug, Default)]
struct Lifecycle {
    sessions_started: AtomicU64,
    sessions_ended: AtomicU64,
    sessions_killed: AtomicU64,
    sessions_expired: AtomicU64,
    transactions_started: AtomicU64,
    transactions_committed: AtomicU64,
    transactions_aborted: AtomicU64,
    transactions_left_open: AtomicU64,
}

impl Lifecycle {
    fn transactions(&self, events: TxnEvents) {
        for (counter, n) in [
            (&self.transactions_started, events.started),
            (&self.transactions_committed, events.committed),
            (&self.transactions_aborted, events.aborted),
        ] {
            if n > 0 {
                counter.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }

    fn ended(&self, kind: EndKind, events: TxnEvents) {
        let counter = match kind {
            EndKind::Ended => &self.sessions_ended,
            EndKind::Killed | EndKind::KilledByPattern => &self.sessions_killed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.transactions(events);
    }
}

/// What the engine needs, at its reply or at its connection's close, about
/// one forwarded request: returned by `request` and owned by the caller
/// (the proxy keeps it in its per-connection in-flight table, beside its own
/// record) until the final reply (`reply`) or the close (`close`). The
/// engine keeps no per-connection table of pending requests: the caller's
/// is the only one. Only requests the engine follows get one (session
/// requests, session commands, store deletes, handshakes and auth); a
/// request that expects no reply never does.
#[derive(Debug)]
pub struct PendingRequest {
    key: Option<SessionKey>,
    entry: InFlight,
    in_transaction: bool,
    /// getMore's cursor (to forget it when the reply says exhausted).
    cursor: Option<i64>,
    /// Its entry in the connection's operation ring (session requests).
    op: Option<OpSlot>,
    /// A session command's (or store delete's) effect, held until the
    /// server answers: settled by the final reply, or as unconfirmed at
    /// close. Boxed: rare, and it would double every pending record.
    effect: Option<Box<Effect>>,
}

impl PendingRequest {
    /// The client's request id.
    pub fn request_id(&self) -> i32 {
        self.entry.request.request_id
    }
}

/// An authentication the connection started; the server's reply decides.
#[derive(Debug, Clone, Copy)]
struct PendingAuth {
    owner: OwnerId,
    /// x.509 `authenticate` completes in one step.
    single_step: bool,
}

/// What the engine knows about one client connection.
#[derive(Debug)]
pub(crate) struct ConnState {
    pub(crate) peer: SocketAddr,
    pub(crate) upstream: u32,
    identity: ClientIdentity,
    pub(crate) client: ClientId,
    pub(crate) owner: OwnerId,
    pending_auth: Option<PendingAuth>,
    /// How many `PendingRequest`s of this connection are out (handed to the
    /// caller, not yet finally answered): a count, not a copy of them —
    /// only the refresher's "quiet connection first" reads it.
    awaiting_replies: u32,
    /// Recent session operations, for violations' timelines.
    ops: OpRing,
    /// The proxy can send the engine's own requests (a refresh) on it.
    pub(crate) can_inject: bool,
    /// A refresh injected on this connection has not answered yet.
    pub(crate) refresh_in_progress: bool,
    /// The application sent session traffic on it (monitoring connections
    /// never do, and may not be authenticated: no refresh goes there).
    pub(crate) carried_sessions: bool,
    /// Sessions whose transactions sent statements on this connection, most
    /// recent last, at most `TXN_SESSIONS_PER_CONN` (unallocated on
    /// connections that carry no transaction). When the upstream side cuts
    /// the connection, their open transactions' outcome becomes unknown.
    txn_sessions: Vec<SessionKey>,
}

/// How many transactional sessions a connection remembers for its close.
/// Drivers check a connection out per operation, so only sessions whose
/// transactions interleave on one connection count against it.
const TXN_SESSIONS_PER_CONN: usize = 64;

impl ConnState {
    pub(crate) fn is_quiet(&self) -> bool {
        self.awaiting_replies == 0
    }
}

/// Per-upstream facts (an upstream is the listener / member a client reached).
#[derive(Debug)]
pub(crate) struct UpstreamState {
    /// The listener address the clients of this upstream reach.
    listener: SocketAddr,
    /// refreshSessions is refused as unsupported here: the refresher stops.
    pub(crate) refresh_unsupported: AtomicBool,
    /// One bit per `SessionCommand`: a refusal of it here was logged.
    refusals_logged: AtomicU32,
}

impl UpstreamState {
    fn new(listener: SocketAddr) -> UpstreamState {
        UpstreamState {
            listener,
            refresh_unsupported: AtomicBool::new(false),
            refusals_logged: AtomicU32::new(0),
        }
    }

    /// True the first time `command` is refused here (one log line per
    /// upstream and command; later ones are only counted).
    fn first_refusal(&self, command: SessionCommand) -> bool {
        let bit = 1 << command.index();
        self.refusals_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

/// Violations: every one counted per rule, grouped into findings (which
/// keep the examples and the recent violations `violations()` lists).
#[derive(Debug)]
struct ViolationLog {
    findings: Mutex<FindingTable>,
    next_id: AtomicU64,
    per_rule: [AtomicU64; RuleId::COUNT],
}

pub struct SessionEngine {
    /// As started: a reload changes only `rules` and `transaction_max_open`.
    pub(crate) config: SessionConfig,
    /// Mode and per-rule settings; a reload swaps them (`reconfigure`).
    rules: LiveRules,
    /// `sessions.transaction_max_open` in ms (a reload may change it).
    transaction_max_open: AtomicU64,
    pub(crate) ledger: SessionLedger,
    pub(crate) tables: Tables,
    pub(crate) conns: FastDashMap<u64, ConnState>,
    upstream_ids: FastDashMap<SocketAddr, u32>,
    next_upstream: AtomicU32,
    pub(crate) upstreams: FastDashMap<u32, UpstreamState>,
    /// logicalSessionTimeoutMinutes from hello replies, in ms (0: not seen).
    learned_timeout: AtomicU64,
    origin: Instant,
    origin_wall: SystemTime,
    violations: ViolationLog,
    last_purge: AtomicU64,
    requests_inspected: AtomicU64,
    requests_rejected: AtomicU64,
    pub(crate) refreshes_sent: AtomicU64,
    pub(crate) sessions_refreshed: AtomicU64,
    pub(crate) refresh_failures: AtomicU64,
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

/// Everything a request carries that the engine acts on after the rules ran.
struct Inspected<'a> {
    view: RequestView<'a>,
    facts: RequestFacts,
    key: Option<SessionKey>,
    owner: OwnerId,
    /// The arrays a request names, parsed once: both the rules and the
    /// effects walk them. Empty (no allocation) for every other command.
    targets: Targets,
    /// The engine's sequence number of the request (orders timelines).
    seq: u64,
}

/// The cursors and sessions a getMore, killCursors or session command names.
#[derive(Default)]
struct Targets {
    get_more_cursor: Option<i64>,
    killed_cursors: Vec<i64>,
    /// endSessions / killSessions / refreshSessions.
    sessions: Vec<Lsid>,
}

impl Targets {
    fn of(view: &RequestView<'_>, class: CommandClass) -> Targets {
        match class {
            CommandClass::GetMore => Targets {
                get_more_cursor: view.get_more_cursor_id(),
                ..Targets::default()
            },
            CommandClass::KillCursors => Targets {
                killed_cursors: view.killed_cursor_ids().collect(),
                ..Targets::default()
            },
            CommandClass::EndSessions
            | CommandClass::KillSessions
            | CommandClass::RefreshSessions => Targets {
                sessions: view.session_list().collect(),
                ..Targets::default()
            },
            _ => Targets::default(),
        }
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
            requests_inspected: AtomicU64::new(0),
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

    fn upstream_id(&self, local: SocketAddr) -> u32 {
        if let Some(id) = self.upstream_ids.get(&local) {
            return *id;
        }
        let id = *self
            .upstream_ids
            .entry(local)
            .or_insert_with(|| self.next_upstream.fetch_add(1, Ordering::Relaxed));
        self.upstreams
            .entry(id)
            .or_insert_with(|| UpstreamState::new(local));
        id
    }

    // ---- connections ----

    /// A client connected (`local`: the listener it reached). `can_inject`:
    /// the caller can send requests of the engine's own on this connection's
    /// upstream (the refresher's `refreshSessions`), so refreshes may be
    /// planned on it.
    pub fn connect(&self, conn: u64, peer: SocketAddr, local: SocketAddr, can_inject: bool) {
        let upstream = self.upstream_id(local);
        let identity = ClientIdentity {
            peer: Some(normalize_ip(peer.ip())),
            ..ClientIdentity::default()
        };
        let client = self.tables.identities.intern(&identity);
        self.conns.insert(
            conn,
            ConnState {
                peer,
                upstream,
                identity,
                client,
                owner: OwnerId::UNKNOWN,
                pending_auth: None,
                awaiting_replies: 0,
                ops: OpRing::default(),
                can_inject,
                refresh_in_progress: false,
                carried_sessions: false,
                txn_sessions: Vec::new(),
            },
        );
    }

    fn pending_owner(&self, user: &AuthUser<'_>) -> Option<PendingAuth> {
        let name = user.user.as_deref()?;
        Some(PendingAuth {
            owner: self.tables.owner(name, user.db.unwrap_or("admin")),
            single_step: user.mechanism == sessionguard_protocol::command::AuthMechanism::X509,
        })
    }

    /// Handshake and authentication bookkeeping; returns the connection's
    /// (client identity, owner, upstream).
    fn connection_facts(
        &self,
        conn: u64,
        view: &RequestView<'_>,
        class: CommandClass,
    ) -> (ClientId, OwnerId, u32) {
        let handshake = if class == CommandClass::Hello {
            Handshake::from_request(view)
        } else {
            None
        };
        let auth = if class == CommandClass::Auth {
            auth_user(view)
        } else {
            None
        };
        let Some(mut state) = self.conns.get_mut(&conn) else {
            return (ClientId::UNKNOWN, OwnerId::UNKNOWN, 0);
        };
        if let Some(handshake) = handshake {
            if handshake.driver_name.is_some() || handshake.app_name.is_some() {
                let arc = |value: Option<&str>| value.map(Arc::<str>::from);
                let updated = ClientIdentity {
                    metadata_seen: true,
                    driver_name: arc(handshake.driver_name),
                    driver_version: arc(handshake.driver_version),
                    app_name: arc(handshake.app_name),
                    ..state.identity.clone()
                };
                if updated != state.identity {
                    state.client = self.tables.identities.intern(&updated);
                    state.identity = updated;
                }
            }
            if let Some(user) = handshake
                .user
                .as_ref()
                .and_then(|user| self.pending_owner(user))
            {
                state.pending_auth = Some(user);
            }
        }
        if let Some(user) = auth.as_ref() {
            state.pending_auth = self.pending_owner(user);
        }
        (state.client, state.owner, state.upstream)
    }

    fn confirm_owner(&self, state: &mut ConnState) {
        let Some(pending) = state.pending_auth.take() else {
            return;
        };
        state.owner = pending.owner;
        let user = self.tables.owner_name(pending.owner);
        if state.identity.user != user {
            let updated = ClientIdentity {
                user,
                ..state.identity.clone()
            };
            state.client = self.tables.identities.intern(&updated);
            state.identity = updated;
        }
    }

    // ---- requests ----

    /// Inspects a client request before it is forwarded. A forwarded
    /// request the engine follows comes with its `PendingRequest`, which
    /// the caller keeps until the request's final reply (`reply`) or its
    /// connection's close (`close`); a rejected one never has one.
    pub fn request(
        &self,
        conn: u64,
        request_id: i32,
        message: &Message<'_>,
    ) -> (Decision, Option<PendingRequest>) {
        self.request_at(conn, request_id, message, self.now())
    }

    /// `request` at a given engine time (tests drive time explicitly).
    pub fn request_at(
        &self,
        conn: u64,
        request_id: i32,
        message: &Message<'_>,
        now: Millis,
    ) -> (Decision, Option<PendingRequest>) {
        let Some(view) = RequestView::from_message(message) else {
            return (Decision::Forward, None);
        };
        // The count doubles as the request's sequence number (timelines).
        let seq = self.requests_inspected.fetch_add(1, Ordering::Relaxed);
        self.decide_due_verdicts(now);
        let inspected = self.inspect(conn, request_id, view, now, seq);
        let ctx = self.context(now);
        let can_reply = inspected.facts.expects_reply;
        // One snapshot per request: a reload mid-request cannot mix settings.
        let rules = self.rules.load();
        let mut found: Vec<Violation> = Vec::new();

        // Read-only checks first: nothing changes until the verdict is known.
        let enabled = |rule| rules.enabled(rule);
        if let Some(event) = &self.cursor_event(&inspected) {
            rules::on_cursor(enabled, event, &ctx, &mut found);
        }
        let end_kind = match inspected.facts.class {
            CommandClass::EndSessions => Some(EndKind::Ended),
            CommandClass::KillSessions => Some(EndKind::Killed),
            _ => None,
        };
        // end-while-in-flight is judged now, on what the proxy sees (requests
        // really in flight on the sessions named). In enforce mode it rejects
        // the end before it can end a session in use; otherwise it is
        // reported when the server confirms the end (never if it refuses;
        // as an unconfirmed warning if the reply never comes).
        let mut ended_in_flight: Vec<Violation> = Vec::new();
        if let Some(kind) = end_kind {
            if rules::any_on(enabled, |hook| matches!(hook, rules::Hook::End(_))) {
                for &lsid in &inspected.targets.sessions {
                    let event = EndEvent {
                        key: SessionKey {
                            lsid,
                            owner: inspected.owner,
                        },
                        kind,
                        request: inspected.facts.request,
                    };
                    self.ledger.read(&event.key, |state| {
                        rules::on_end(enabled, &event, state, &ctx, &mut ended_in_flight)
                    });
                }
            }
            if can_reply {
                // Those whose action rejects are judged with the request.
                let (now, held) = ended_in_flight
                    .into_iter()
                    .partition(|v| rules.get(v.rule).action == Action::Reject);
                found.extend::<Vec<Violation>>(now);
                ended_in_flight = held;
            }
        }

        // Web-session stores: a resurrecting write is judged before anything
        // changes, like every rule (enforce rejects it).
        let store_ops = self.stores.classify(&inspected.view);
        if !store_ops.is_empty()
            && rules::any_on(enabled, |hook| matches!(hook, rules::Hook::StoreWrite(_)))
        {
            if let Some(resurrection) = self.stores.check(&store_ops, &inspected.facts.request) {
                let key = inspected.key.unwrap_or(SessionKey {
                    lsid: Default::default(),
                    owner: inspected.owner,
                });
                let label = self.stores.label(resurrection.store);
                rules::on_store_write(enabled, &resurrection, key, label, &ctx, &mut found);
            }
        }

        let mut rejected = false;
        let mut suspect: Option<InFlight> = None;
        let mut retried = false;
        if let Some(key) = inspected.key {
            let event = RequestEvent {
                key,
                facts: inspected.facts,
            };
            rejected = self.ledger.with_session(key, now, |state| {
                rules::on_request(enabled, &event, state, &ctx, &mut found);
                let reject = can_reply && found.iter().any(|v| rejects(&rules, v));
                if !reject {
                    suspect = self.retry_suspect(&event, state, &found);
                    retried = self.record_request(state, &event, &found, suspect.is_some(), &ctx);
                }
                reject
            });
        } else if can_reply {
            rejected = found.iter().any(|v| rejects(&rules, v));
        }

        let mut pending = None;
        if !rejected {
            let destroys = self.stores.apply(&store_ops, &inspected.facts.request);
            if let (Some(key), Some(first)) = (inspected.key, suspect) {
                self.defer_verdict(key, first.request, inspected.facts.request, now);
            }
            if retried {
                self.count_retry(inspected.view.name);
            }
            pending =
                self.apply_request_effects(&inspected, end_kind, ended_in_flight, destroys, now);
        }

        let reply = if rejected {
            self.requests_rejected.fetch_add(1, Ordering::Relaxed);
            let first = found
                .iter()
                .filter(|v| rejects(&rules, v))
                .max_by_key(|v| rules.get(v.rule).severity);
            first.map(|v| self.reject_reply(v))
        } else {
            None
        };
        for violation in found {
            let rejects = rejects(&rules, &violation);
            self.emit(violation, rejected && rejects);
        }
        match reply {
            Some(reply) => (Decision::Reject { reply }, None),
            None => (Decision::Forward, pending),
        }
    }

    /// Records a forwarded session request in its session and counts the
    /// session lifecycle. Returns whether the request is a driver's retry
    /// (of a request cut off by its connection closing, or a retryable
    /// write resent with the same txnNumber and statements, which the
    /// server deduplicates); a `suspect` is counted by its verdict instead.
    fn record_request(
        &self,
        state: &mut super::state::SessionState,
        event: &RequestEvent,
        found: &[Violation],
        suspect: bool,
        ctx: &RuleContext<'_>,
    ) -> bool {
        let now = ctx.now;
        let cleanup = event.facts.class.is_session_cleanup();
        let restarted = state.is_ended() && !cleanup;
        if restarted {
            // The server treats the id as a brand-new session
            // (whether or not use-after-end is enabled).
            state.restart(now);
        }
        let expired =
            state.started && !cleanup && state.expired_on_server(now, ctx.session_timeout);
        if expired {
            self.lifecycle
                .sessions_expired
                .fetch_add(1, Ordering::Relaxed);
        }
        // A cleanup command on a tombstone does not revive it.
        if (!state.started && !state.is_ended()) || expired {
            self.lifecycle
                .sessions_started
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(shared) = found.iter().find(|v| v.rule == RuleId::CrossClientSharing) {
            state.shared_with = shared.current.map_or(ClientId::UNKNOWN, |r| r.client);
        }
        let facts = &event.facts;
        let cut_off = state.take_cut_off(facts);
        let resent = facts.retryable_write
            && state.last_retryable.as_deref().is_some_and(|last| {
                Some(last.txn_number) == facts.request.txn_number
                    && last.statement == facts.statement
            });
        let events = state.apply_request(facts, now);
        self.lifecycle.transactions(events);
        !suspect && (cut_off || resent)
    }

    /// When `event` repeats exactly a request in flight on another
    /// connection (and nothing else there is reported), flags that request
    /// `suspected` and returns it: the verdict waits for its outcome.
    fn retry_suspect(
        &self,
        event: &RequestEvent,
        state: &mut super::state::SessionState,
        found: &[Violation],
    ) -> Option<InFlight> {
        if state.in_flight.is_empty()
            || !self.rules.enabled(RuleId::ConcurrentUse)
            || found.iter().any(|v| v.rule == RuleId::ConcurrentUse)
        {
            return None;
        }
        let first = rules::retry_suspect(event, state)?;
        if self.verdicts.is_full() {
            // Left unjudged (silent): see `MAX_PENDING_VERDICTS`.
            self.verdicts.unjudged_one();
            return None;
        }
        state
            .in_flight
            .set_suspected(first.request.conn, first.request.request_id, true);
        Some(first)
    }

    fn defer_verdict(&self, key: SessionKey, first: RequestRef, second: RequestRef, now: Millis) {
        self.verdicts.defer(PendingVerdict {
            key,
            first,
            second,
            deadline: now.saturating_add(RETRY_VERDICT_WINDOW),
        });
    }

    /// Decides the verdicts waiting on `first` (session `key`): its reply
    /// was delivered (`answered`), or its connection closed without it.
    fn decide_verdicts(&self, key: &SessionKey, first: &RequestRef, answered: bool, now: Millis) {
        let waiting = self.verdicts.take_waiting_on(key, first);
        for verdict in waiting {
            if answered {
                // Both were answered: nothing failed, nothing was retried.
                self.verdict(&verdict, Overlap::Answered, now);
            } else {
                // The first never answered: the second was its retry. Every
                // identical request that overlapped it is taken for one — a
                // false negative in a rare corner, never a false alarm.
                self.count_retry(&self.tables.symbols.resolve(verdict.second.command.0));
            }
        }
    }

    /// Decides the verdicts whose window ended: the first request is still
    /// unanswered on a connection that stayed open, so the second was not a
    /// retry (see `RETRY_VERDICT_WINDOW`). One relaxed load when none is due.
    fn decide_due_verdicts(&self, now: Millis) {
        let due = self.verdicts.take_due(now);
        if due.is_empty() {
            return;
        }
        for verdict in due {
            self.verdict(&verdict, Overlap::StillInFlight(RETRY_VERDICT_WINDOW), now);
        }
    }

    /// Reports a deferred verdict that was not a retry.
    fn verdict(&self, verdict: &PendingVerdict, overlap: Overlap, now: Millis) {
        let ctx = self.context(now);
        let mut found = Vec::new();
        rules::on_verdict(
            &verdict.key,
            &verdict.first,
            &verdict.second,
            overlap,
            &ctx,
            &mut found,
        );
        for violation in found {
            self.emit(violation, false);
        }
    }

    fn count_retry(&self, command: &str) {
        self.retries[command_index(command)].fetch_add(1, Ordering::Relaxed);
    }

    fn inspect<'a>(
        &self,
        conn: u64,
        request_id: i32,
        view: RequestView<'a>,
        now: Millis,
        seq: u64,
    ) -> Inspected<'a> {
        let class = CommandClass::of(view.name);
        let (client, owner, upstream) = self.connection_facts(conn, &view, class);
        let namespace = view.namespace();
        let request = RequestRef {
            conn,
            at: now,
            txn_number: view.txn_number,
            request_id,
            client,
            command: self.tables.symbol(view.name),
            namespace: self.tables.namespace(namespace.db, namespace.collection),
        };
        let key = view.lsid.map(|lsid| SessionKey { lsid, owner });
        let facts = RequestFacts {
            request,
            class,
            // Only session requests need an identity (retries, reuse).
            statement: if key.is_some() {
                view.statement_hash()
            } else {
                0
            },
            upstream,
            in_transaction: view.in_transaction(),
            start_transaction: view.start_transaction,
            retryable_write: view.is_retryable_write(),
            unacknowledged: view.unacknowledged,
            expects_reply: !view.more_to_come,
        };
        Inspected {
            targets: Targets::of(&view, class),
            view,
            facts,
            key,
            owner,
            seq,
        }
    }

    /// The cursor a getMore / killCursors addresses, when the proxy saw it
    /// opened (for killCursors: the first one opened under another session).
    fn cursor_event(&self, inspected: &Inspected<'_>) -> Option<CursorEvent> {
        let upstream = inspected.facts.upstream;
        let make = |cursor_id: i64, entry: CursorEntry| CursorEvent {
            cursor_id,
            key: inspected.key,
            facts: inspected.facts,
            owner: entry.owner,
            opened_by: entry.opened_by,
        };
        match inspected.facts.class {
            CommandClass::GetMore => {
                let id = inspected.targets.get_more_cursor?;
                let entry = self.ledger.cursor(&CursorKey { upstream, id })?;
                Some(make(id, entry))
            }
            CommandClass::KillCursors => inspected.targets.killed_cursors.iter().find_map(|&id| {
                let entry = self.ledger.cursor(&CursorKey { upstream, id })?;
                (Some(entry.owner) != inspected.key).then(|| make(id, entry))
            }),
            _ => None,
        }
    }

    /// State changes of a forwarded request outside its own session entry.
    /// A session command's effect is held until its reply (`settle_effect`);
    /// what the client itself let go of (a getMore whose cursor it kills)
    /// changes now. Returns what the reply (or the close) will need, when
    /// the engine follows the request and a reply is due.
    fn apply_request_effects(
        &self,
        inspected: &Inspected<'_>,
        end_kind: Option<EndKind>,
        ended_in_flight: Vec<Violation>,
        destroys: Vec<super::web_store::StoreOp>,
        now: Millis,
    ) -> Option<PendingRequest> {
        let facts = &inspected.facts;
        if facts.class == CommandClass::KillCursors {
            // A getMore still waiting on a cursor the client kills (a change
            // stream or tailable cursor closed mid-await) no longer holds its
            // session: the driver may hand the session on right away, without
            // waiting for the kill's reply. The client's letting go is the
            // fact here; it can only silence concurrent-use, never raise it.
            let mut owners: Vec<SessionKey> = inspected.key.into_iter().collect();
            for &id in &inspected.targets.killed_cursors {
                let key = CursorKey {
                    upstream: facts.upstream,
                    id,
                };
                if let Some(entry) = self.ledger.cursor(&key) {
                    if !owners.contains(&entry.owner) {
                        owners.push(entry.owner);
                    }
                }
            }
            for owner in owners {
                self.ledger
                    .with_existing(&owner, |state| state.in_flight.abandon_get_mores());
            }
        }
        let effect = if destroys.is_empty() {
            self.held_effect(inspected, end_kind, ended_in_flight)
        } else {
            Some(Effect {
                command: None,
                by: facts.request,
                kind: EffectKind::StoreDestroy { ops: destroys },
            })
        };
        let tracked = inspected.key.is_some()
            || effect.is_some()
            || matches!(facts.class, CommandClass::Hello | CommandClass::Auth);
        // Forwarded session requests go to the connection's ring (for
        // timelines), and so do commands that end sessions from outside
        // them (the earlier request of use-after-end).
        let in_ring = inspected.key.is_some()
            || end_kind.is_some()
            || facts.class == CommandClass::KillAllSessions;
        if !(tracked && facts.expects_reply) {
            if in_ring {
                if let Some(mut conn) = self.conns.get_mut(&facts.request.conn) {
                    conn.ops.record(inspected.key, facts.request, inspected.seq);
                }
            }
            if let Some(effect) = effect {
                // moreToCome: no reply will ever say.
                self.settle_effect(effect, EffectOutcome::Unconfirmed, facts.upstream, now);
            }
            return None;
        }
        let mut conn = self.conns.get_mut(&facts.request.conn)?;
        let op = in_ring.then(|| conn.ops.record(inspected.key, facts.request, inspected.seq));
        let pending = PendingRequest {
            key: inspected.key,
            entry: InFlight {
                request: facts.request,
                statement: facts.statement,
                class: facts.class,
                abandoned: false,
                suspected: false,
            },
            in_transaction: facts.in_transaction,
            cursor: inspected.targets.get_more_cursor,
            op,
            effect: effect.map(Box::new),
        };
        conn.awaiting_replies = conn.awaiting_replies.saturating_add(1);
        conn.carried_sessions |= inspected.key.is_some();
        if let Some(key) = inspected.key.filter(|_| facts.in_transaction) {
            if conn.txn_sessions.last() != Some(&key) {
                conn.txn_sessions.retain(|known| *known != key);
                if conn.txn_sessions.len() == TXN_SESSIONS_PER_CONN {
                    conn.txn_sessions.remove(0);
                }
                conn.txn_sessions.push(key);
            }
        }
        Some(pending)
    }

    /// The effect a session command will have once the server confirms it.
    fn held_effect(
        &self,
        inspected: &Inspected<'_>,
        end_kind: Option<EndKind>,
        ended_in_flight: Vec<Violation>,
    ) -> Option<Effect> {
        let facts = &inspected.facts;
        if !facts.class.waits_for_outcome() {
            return None;
        }
        let command = Some(SessionCommand::of(inspected.view.name)?);
        let sessions = || inspected.targets.sessions.clone();
        let kind = match (facts.class, end_kind) {
            (_, Some(kind)) => EffectKind::End {
                kind,
                owner: inspected.owner,
                sessions: sessions(),
                in_flight: ended_in_flight,
            },
            (CommandClass::KillAllSessions, _) => EffectKind::KillAll {
                targets: self.kill_targets(inspected),
            },
            (CommandClass::RefreshSessions, _) => EffectKind::Refresh {
                owner: inspected.owner,
                sessions: sessions(),
            },
            (CommandClass::KillCursors, _) => EffectKind::KillCursors {
                upstream: facts.upstream,
                cursors: inspected.targets.killed_cursors.clone(),
            },
            _ => return None,
        };
        Some(Effect {
            command,
            by: facts.request,
            kind,
        })
    }

    /// killAllSessions(ByPattern)'s patterns, resolved against the owners
    /// the proxy knows now.
    fn kill_targets(&self, inspected: &Inspected<'_>) -> Vec<KillTarget> {
        let patterns = inspected.view.kill_patterns();
        if patterns.contains(&KillPattern::Unmatchable) {
            tracing::debug!(
                conn = inspected.facts.request.conn,
                command = inspected.view.name,
                "a kill pattern names sessions by uid or role, which sessionguard cannot match; those sessions are not marked killed"
            );
        }
        patterns
            .iter()
            .map(|pattern| match pattern {
                KillPattern::All => KillTarget::All,
                KillPattern::Lsid(lsid) => KillTarget::Lsid(*lsid),
                KillPattern::User { user, db } => self
                    .tables
                    .known_owner(user, db)
                    .map_or(KillTarget::Nothing, KillTarget::Owner),
                KillPattern::Unmatchable => KillTarget::Nothing,
            })
            .collect()
    }

    /// Applies or drops a held effect once its outcome is known. Confirmed:
    /// it takes hold. Refused: nothing changes but a counter and, the first
    /// time per upstream and command, a log line. Unconfirmed (no reply
    /// will come): ends are recorded as unconfirmed — rules report on them
    /// at most as warnings and never reject — and the effects that can only
    /// silence rules (a refresh, a killed cursor) are taken as done, since
    /// assuming otherwise could only raise an alarm on a guess.
    fn settle_effect(&self, effect: Effect, outcome: EffectOutcome, upstream: u32, now: Millis) {
        let confirmed = match outcome {
            EffectOutcome::Confirmed => true,
            EffectOutcome::Unconfirmed => false,
            EffectOutcome::Refused { refusal, code } => {
                if let Some(command) = effect.command {
                    self.refused(upstream, effect.by.conn, command, refusal, code);
                }
                return;
            }
        };
        match effect.kind {
            EffectKind::End {
                kind,
                owner,
                sessions,
                in_flight,
            } => {
                for lsid in sessions {
                    let key = SessionKey { lsid, owner };
                    if let Some(events) = self.ledger.end(key, kind, effect.by, confirmed, now) {
                        self.lifecycle.ended(kind, events);
                    }
                }
                for violation in in_flight {
                    let violation = if confirmed {
                        violation
                    } else {
                        let mut violation = violation.unconfirmed(true);
                        violation.message.push_str(rules::UNCONFIRMED_END);
                        violation
                    };
                    self.emit(violation, false);
                }
            }
            EffectKind::KillAll { targets } => {
                if targets.iter().all(|target| *target == KillTarget::Nothing) {
                    return;
                }
                let kind = EndKind::KilledByPattern;
                for key in self.ledger.all_keys() {
                    if targets.iter().any(|target| target.matches(&key)) {
                        if let Some(events) = self.ledger.end(key, kind, effect.by, confirmed, now)
                        {
                            self.lifecycle.ended(kind, events);
                        }
                    }
                }
            }
            EffectKind::Refresh { owner, sessions } => {
                for lsid in sessions {
                    self.ledger
                        .with_existing(&SessionKey { lsid, owner }, |state| {
                            if !state.is_ended() {
                                state.last_refreshed = now;
                            }
                        });
                }
            }
            EffectKind::KillCursors { upstream, cursors } => {
                for id in cursors {
                    self.ledger.remove_cursor(&CursorKey { upstream, id });
                }
            }
            EffectKind::StoreDestroy { ops } => {
                self.stores
                    .settle_destroys(&ops, &effect.by, confirmed, now);
            }
        }
    }

    /// A session command the upstream refused: counted, and said once per
    /// upstream and command (the refresher's refusals come here too).
    pub(crate) fn refused(
        &self,
        upstream: u32,
        conn: u64,
        command: SessionCommand,
        refusal: Refusal,
        code: Option<i32>,
    ) {
        self.refusals.count(command, refusal);
        let Some(state) = self.upstreams.get(&upstream) else {
            return;
        };
        let stops_refreshing = command == SessionCommand::RefreshSessions && refusal.unsupported();
        if stops_refreshing {
            state.refresh_unsupported.store(true, Ordering::Relaxed);
        }
        if !state.first_refusal(command) {
            return;
        }
        let listener = state.listener;
        drop(state);
        let then = if stops_refreshing {
            "; sessionguard stops refreshing sessions on this upstream (held sessions there can expire while idle)"
        } else {
            ""
        };
        tracing::warn!(
            conn,
            listener = %listener,
            command = command.as_str(),
            code,
            code_name = refusal.as_str(),
            "the upstream refused {command} ({code_name}): {means}; nothing changes — {effect}{then}. Later \
             refusals of {command} on this upstream are only counted (sessionguard_session_commands_refused_total)",
            code_name = refusal.as_str(),
            command = command.as_str(),
            means = refusal.means(),
            effect = command.refused_means(),
        );
    }

    fn reject_reply(&self, violation: &Violation) -> Vec<u8> {
        let errmsg = format!("sessionguard: {}: {}", violation.rule, violation.message);
        let doc = bson::rawdoc! {
            "ok": 0.0,
            "errmsg": errmsg,
            "code": SESSIONGUARD_VIOLATION_CODE,
            "codeName": SESSIONGUARD_VIOLATION_CODE_NAME,
        };
        doc.into_bytes()
    }

    // ---- replies ----

    /// Inspects a reply to the request `pending` stands for (its record,
    /// from `request`) before it is forwarded. After a final reply (no
    /// `moreToCome`) the caller drops `pending`; after a streamed one it
    /// keeps it for the next. Replies that match no request are not
    /// shown to the engine.
    pub fn reply(&self, conn: u64, pending: &mut PendingRequest, message: &Message<'_>) {
        self.reply_at(conn, pending, message, self.now())
    }

    pub fn reply_at(
        &self,
        conn: u64,
        pending: &mut PendingRequest,
        message: &Message<'_>,
        now: Millis,
    ) {
        let Some(reply) = ReplyView::from_message(message) else {
            return;
        };
        self.decide_due_verdicts(now);
        let final_reply = !reply.more_to_come;
        let response_to = pending.entry.request.request_id;
        // One connection lookup per reply: the upstream its cursors live on
        // and the handshake / auth outcome come from (or go to) one entry.
        let upstream = {
            let Some(mut state) = self.conns.get_mut(&conn) else {
                return;
            };
            if final_reply {
                state.awaiting_replies = state.awaiting_replies.saturating_sub(1);
            }
            if let Some(op) = pending.op {
                state.ops.replied(op, response_to, now);
            }
            match pending.entry.class {
                CommandClass::Hello => self.hello_reply(&mut state, &reply),
                CommandClass::Auth => {
                    let done = reply.boolean("done") == Some(true);
                    let single_step = state.pending_auth.is_some_and(|p| p.single_step);
                    if !reply.ok {
                        state.pending_auth = None;
                    } else if done || single_step {
                        self.confirm_owner(&mut state);
                    }
                }
                _ => {}
            }
            state.upstream
        };
        // Only session commands and store deletes hold an effect.
        let effect = if final_reply {
            pending.effect.take()
        } else {
            None
        };
        if let Some(effect) = effect {
            let effect = *effect;
            // A delete with writeErrors deleted nothing it was refused.
            let done = match effect.kind {
                EffectKind::StoreDestroy { .. } => reply.is_clean_success(),
                _ => reply.ok,
            };
            let outcome = if done {
                EffectOutcome::Confirmed
            } else {
                EffectOutcome::Refused {
                    refusal: Refusal::of(reply.code, reply.code_name),
                    code: reply.code,
                }
            };
            self.settle_effect(effect, outcome, upstream, now);
        }
        let Some(key) = pending.key else { return };
        let facts = reply_facts(&reply, pending.in_transaction);
        let ctx = self.context(now);
        let mut found = Vec::new();
        let mut suspected = false;
        let enabled = |rule| self.rules.enabled(rule);
        self.ledger.with_existing(&key, |state| {
            rules::on_reply(
                enabled,
                &key,
                &pending.entry,
                &facts,
                state,
                &ctx,
                &mut found,
            );
            let applied = state.apply_reply(&pending.entry, &facts, final_reply, now);
            self.lifecycle.transactions(applied.txn);
            suspected = applied.suspected;
        });
        if suspected {
            self.decide_verdicts(&key, &pending.entry.request, true, now);
        }
        self.cursor_reply(&key, pending, upstream, &reply);
        for violation in found {
            self.emit(violation, false);
        }
    }

    fn hello_reply(&self, state: &mut ConnState, reply: &ReplyView<'_>) {
        if let Some(minutes) = reply
            .integer("logicalSessionTimeoutMinutes")
            .filter(|m| *m > 0)
        {
            let ms = u64::try_from(minutes).unwrap_or(0).saturating_mul(60_000);
            // Drivers use the smallest timeout any server reports.
            let _ = self.learned_timeout.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |current| (current == 0 || ms < current).then_some(ms),
            );
        }
        if let Some(speculative) = reply.subdocument("speculativeAuthenticate") {
            let conversation_done = speculative
                .get("done")
                .ok()
                .flatten()
                .and_then(|v| v.as_bool());
            let in_conversation = speculative.get("conversationId").ok().flatten().is_some();
            // x.509 answers with {dbname, user}; SCRAM continues with saslContinue.
            if conversation_done == Some(true) || (!in_conversation && reply.ok) {
                self.confirm_owner(state);
            }
        }
    }

    fn cursor_reply(
        &self,
        key: &SessionKey,
        pending: &PendingRequest,
        upstream: u32,
        reply: &ReplyView<'_>,
    ) {
        match pending.entry.class {
            CommandClass::GetMore => {
                let Some(id) = pending.cursor else { return };
                let exhausted = reply.cursor_id == Some(0)
                    || (!reply.ok && reply.code == Some(CURSOR_NOT_FOUND));
                if exhausted {
                    self.ledger.remove_cursor(&CursorKey { upstream, id });
                }
            }
            CommandClass::KillCursors => {}
            _ => {
                if let Some(id) = reply.cursor_id.filter(|id| *id != 0) {
                    self.ledger.register_cursor(
                        CursorKey { upstream, id },
                        CursorEntry {
                            owner: *key,
                            opened_by: pending.entry.request,
                        },
                    );
                }
            }
        }
    }

    // ---- close ----

    /// The client connection closed, because of `cause`, with
    /// `still_in_flight` never (finally) answered: the records `request`
    /// handed out for them, oldest first.
    pub fn close(
        &self,
        conn: u64,
        cause: CloseCause,
        still_in_flight: impl IntoIterator<Item = PendingRequest>,
    ) {
        self.close_at(conn, cause, still_in_flight, self.now())
    }

    /// `close` at a given engine time. Every request still in flight on the
    /// connection is released (so the driver's retry elsewhere finds the
    /// session free) and counted by `cause`; closed-with-requests-in-flight
    /// judges them only when the client closed or reset its side first.
    /// Verdicts waiting on them are decided: retries. Held effects are
    /// settled as unconfirmed.
    pub fn close_at(
        &self,
        conn: u64,
        cause: CloseCause,
        still_in_flight: impl IntoIterator<Item = PendingRequest>,
        now: Millis,
    ) {
        let Some((_, state)) = self.conns.remove(&conn) else {
            return;
        };
        let ctx = self.context(now);
        // Only a close the client made is judged (see `rules::Hook::Close`).
        let judge = cause.client_went_first();
        let enabled = |rule| self.rules.enabled(rule);
        // Settled after every request is released, as unconfirmed.
        let mut effects: Vec<Effect> = Vec::new();
        for mut pending in still_in_flight {
            if let Some(effect) = pending.effect.take() {
                effects.push(*effect);
            }
            let Some(key) = pending.key else { continue };
            self.in_flight_abandoned[cause.index()].fetch_add(1, Ordering::Relaxed);
            let mut found = Vec::new();
            let mut suspected = false;
            self.ledger.with_existing(&key, |session| {
                // The session's copy knows whether the client abandoned it.
                let entry = session
                    .in_flight
                    .find(pending.entry.request.conn, pending.entry.request.request_id)
                    .copied()
                    .unwrap_or(pending.entry);
                if judge {
                    rules::on_close(enabled, &key, &entry, now, &ctx, &mut found);
                }
                suspected = session.connection_closed(&entry);
            });
            if suspected {
                self.decide_verdicts(&key, &pending.entry.request, false, now);
            }
            for violation in found {
                // The connection has left the map: its ring comes along.
                self.emit_from(violation, false, Some((conn, &state)));
            }
        }
        if !cause.client_went_first() {
            // A failover, a network cut or the proxy itself ended the
            // connection: the server may have aborted the transactions it
            // carried (a step-down does), and the driver, its pool cleared,
            // fails their commit without sending it and retries with the
            // next txnNumber. Their outcome is unknown, so that retry must
            // not read as superseding an open transaction.
            for key in &state.txn_sessions {
                self.ledger
                    .with_existing(key, |session| session.transaction_cut());
            }
        }
        for effect in effects {
            self.settle_effect(effect, EffectOutcome::Unconfirmed, state.upstream, now);
        }
    }

    // ---- time-driven ----

    /// Time-driven checks (transactions left open) and, at most once a
    /// minute, purging of old tombstones and long-expired sessions.
    pub fn sweep(&self) {
        self.sweep_at(self.now())
    }

    pub fn sweep_at(&self, now: Millis) {
        self.decide_due_verdicts(now);
        // A flood that stopped still gets its last summary line.
        let due = self.findings_table().due_summaries(now);
        for summary in &due {
            log_summary(summary);
        }
        let ctx = self.context(now);
        // Sweep rules run even when disabled: their findings are metrics.
        for key in self.ledger.held_keys() {
            let found = self.ledger.with_existing(&key, |state| {
                let mut found = Vec::new();
                rules::on_sweep(&key, state, &ctx, &mut found);
                if found.iter().any(|v| v.rule == RuleId::TxnLeftOpen) {
                    // Reported once per transaction.
                    if let Some(txn) = state.txn.as_deref_mut() {
                        txn.left_open_reported = true;
                    }
                }
                found
            });
            for violation in found.into_iter().flatten() {
                if violation.rule == RuleId::TxnLeftOpen {
                    self.lifecycle
                        .transactions_left_open
                        .fetch_add(1, Ordering::Relaxed);
                }
                if self.rules.enabled(violation.rule) {
                    self.emit(violation, false);
                }
            }
        }
        let last = self.last_purge.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PURGE_EVERY
            && self
                .last_purge
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let purged = self.ledger.purge(
                now,
                millis(self.config.ended_retention),
                millis(self.session_timeout()),
            );
            if purged > 0 {
                tracing::debug!(
                    purged,
                    "purged old session tombstones and long-expired sessions"
                );
            }
        }
    }

    // ---- violations ----

    fn findings_table(&self) -> std::sync::MutexGuard<'_, FindingTable> {
        self.violations
            .findings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, violation: Violation, rejected: bool) {
        self.emit_from(violation, rejected, None);
    }

    /// Counts a violation, files it under its finding and logs what the
    /// finding's log policy says. `closing`: a connection already removed
    /// from the map (its ring and peer are still wanted). The cost per
    /// violation of a known finding stays small: no names are resolved and
    /// nothing is formatted unless a line is logged.
    fn emit_from(&self, violation: Violation, rejected: bool, closing: Option<(u64, &ConnState)>) {
        let settings = self.rules.get(violation.rule);
        self.violations.per_rule[violation.rule.index()].fetch_add(1, Ordering::Relaxed);
        // At most a warning when it rests on an effect the server never
        // confirmed: that is part of what the finding is.
        let severity = violation.severity(settings.severity);
        let key = IdKey::of(&violation, severity, settings.action);
        let (timeline, mut peers) = self.timeline(&violation, closing);
        if let Some(store) = &violation.store {
            // store-session-resurrected: the read may be on a third connection.
            peers[2] = match closing {
                Some((id, state)) if id == store.read.conn => Some(state.peer),
                _ => self.conns.get(&store.read.conn).map(|state| state.peer),
            };
        }
        let now = violation.at;
        let kept = Kept {
            id: self.violations.next_id.fetch_add(1, Ordering::Relaxed),
            violation,
            severity,
            action: settings.action,
            rejected,
            peers,
        };
        let (_, log) =
            self.findings_table()
                .record(&key, kept, timeline, now, self, |kept, finding| {
                    self.resolve(kept, finding)
                });
        match log {
            LogNow::Nothing => {}
            LogNow::Full(record) => log_violation(&record),
            LogNow::Summary(summary) => log_summary(&summary),
            LogNow::OverflowStarted {
                finding,
                max_findings,
            } => tracing::warn!(
                target: "sessionguard::violation",
                finding = %finding,
                max_findings,
                "sessions.max_findings ({max_findings}) findings exist: violations of any new finding are counted \
                 under the overflow finding {finding} from now on, and not logged one by one (said once; see \
                 /findings/{finding})"
            ),
        }
    }

    /// The violation's session timeline from the rings of the connections
    /// of both requests, and those connections' peers (the third: see `Kept`).
    fn timeline(
        &self,
        violation: &Violation,
        closing: Option<(u64, &ConnState)>,
    ) -> (Timeline, [Option<SocketAddr>; 3]) {
        let mut gather = Gather::new(violation.key, violation.current, violation.earlier);
        let mut peers = [None; 3];
        let conns = [violation.current, violation.earlier].map(|r| r.map(|r| r.conn));
        for (index, conn) in conns.iter().enumerate() {
            let Some(conn) = *conn else { continue };
            if index == 1 && conns[0] == Some(conn) {
                peers[1] = peers[0];
                continue;
            }
            if let Some((_, state)) = closing.filter(|(id, _)| *id == conn) {
                gather.add(&state.ops);
                peers[index] = Some(state.peer);
            } else if let Some(state) = self.conns.get(&conn) {
                gather.add(&state.ops);
                peers[index] = Some(state.peer);
            }
        }
        (gather.finish(), peers)
    }

    fn wall(&self, at: Millis) -> String {
        let time = self.origin_wall + Duration::from_millis(at);
        humantime::format_rfc3339_millis(time).to_string()
    }

    /// `peer`: the connection's address when the violation was raised.
    fn evidence(&self, request: &RequestRef, peer: Option<SocketAddr>) -> RequestEvidence {
        let identity = self.tables.identities.get(request.client);
        let peer = peer.map(|p| p.to_string()).or_else(|| {
            identity
                .as_ref()
                .and_then(|i| i.peer)
                .map(|ip| ip.to_string())
        });
        RequestEvidence {
            connection_id: request.conn,
            request_id: request.request_id,
            peer,
            app_name: identity
                .as_ref()
                .and_then(|i| i.app_name.as_deref().map(str::to_owned)),
            driver: identity
                .as_ref()
                .and_then(|i| i.driver_name.as_deref().map(str::to_owned)),
            driver_version: identity
                .as_ref()
                .and_then(|i| i.driver_version.as_deref().map(str::to_owned)),
            user: identity
                .as_ref()
                .and_then(|i| i.user.as_deref().map(str::to_owned)),
            command: self.tables.symbols.resolve(request.command.0).to_string(),
            namespace: self.tables.symbols.resolve(request.namespace.0).to_string(),
            txn_number: request.txn_number,
            at: self.wall(request.at),
        }
    }

    /// A kept violation with every id resolved to names.
    fn resolve(&self, kept: &Kept, finding: FindingId) -> ViolationRecord {
        let violation = &kept.violation;
        let [current_peer, earlier_peer, read_peer] = kept.peers;
        ViolationRecord {
            id: kept.id,
            finding,
            rule: violation.rule,
            severity: kept.severity,
            action: kept.action,
            rejected: kept.rejected,
            unconfirmed: violation.unconfirmed,
            lsid: violation.key.lsid.to_string(),
            lsid_short: violation.key.lsid.short().to_string(),
            owner: self
                .tables
                .owner_name(violation.key.owner)
                .map(|o| o.to_string()),
            at: self.wall(violation.at),
            message: violation.message.clone(),
            current: violation
                .current
                .as_ref()
                .map(|r| self.evidence(r, current_peer)),
            earlier: violation
                .earlier
                .as_ref()
                .map(|r| self.evidence(r, earlier_peer)),
            // The write is `current`, the destroy `earlier`.
            store: violation.store.as_ref().and_then(|store| {
                Some(StoreEvidence {
                    store: store.store.clone(),
                    document: store.document.clone(),
                    read: self.evidence(&store.read, read_peer),
                    destroy: self.evidence(&store.destroy, earlier_peer),
                    write: self.evidence(violation.current.as_ref()?, current_peer),
                })
            }),
        }
    }

    /// Logs a summary line for every finding whose latest violations are
    /// in no line yet, whatever `log.finding_interval` says: call it at
    /// shutdown, so the log accounts for every violation.
    pub fn flush_finding_summaries(&self) {
        let unlogged = self.findings_table().unlogged_summaries(self.now());
        for summary in &unlogged {
            log_summary(summary);
        }
    }

    /// Recent violations, oldest first: at most `sessions.max_violations`,
    /// and fair — each finding's `RECENT_PER_FINDING` newest are kept
    /// whatever other findings do, and when there is not room for all, the
    /// newest of every finding comes first, then the second newest of each,
    /// and so on — so a flood of one bug never hides another.
    pub fn violations(&self) -> Vec<Arc<ViolationRecord>> {
        // Copied out under the lock, resolved after it.
        let kept = self.findings_table().recent();
        kept.iter()
            .map(|(finding, kept)| Arc::new(self.resolve(kept, *finding)))
            .collect()
    }

    /// Every finding, the most recently seen first.
    pub fn findings(&self) -> Vec<FindingSnapshot> {
        let all = self.findings_table().list();
        all.iter()
            .map(|data| data.snapshot(&|at| self.wall(at)))
            .collect()
    }

    /// One finding with its first and latest examples (each with its
    /// session's timeline); `None` for an unknown id.
    pub fn finding(&self, id: FindingId) -> Option<FindingDetail> {
        let copy = self.findings_table().get(id)?;
        let wall = |at| self.wall(at);
        let example = |record: ViolationRecord, timeline: &Timeline| findings::Example {
            violation: record,
            timeline: findings::timeline_entries(timeline, self, &wall),
        };
        Some(FindingDetail {
            finding: copy.data.snapshot(&wall),
            examples: Examples {
                first: copy
                    .first
                    .as_ref()
                    .map(|(record, timeline)| example(ViolationRecord::clone(record), timeline)),
                latest: copy
                    .latest
                    .as_ref()
                    .map(|(kept, timeline)| example(self.resolve(kept, copy.data.id), timeline)),
            },
        })
    }

    /// How many times each rule fired since start.
    pub fn violation_counts(&self) -> Vec<(RuleId, u64)> {
        RuleId::ALL
            .into_iter()
            .map(|rule| {
                (
                    rule,
                    self.violations.per_rule[rule.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// A summary of every tracked session that `keep` accepts (ended
    /// sessions kept as tombstones included), in no particular order.
    pub fn session_summaries(
        &self,
        mut keep: impl FnMut(&SessionSummary) -> bool,
    ) -> Vec<(SessionKey, SessionSummary)> {
        self.ledger
            .all_keys()
            .into_iter()
            .filter_map(|key| {
                self.ledger
                    .read(&key, |state| {
                        let summary = SessionSummary::of(state);
                        keep(&summary).then_some(summary)
                    })
                    .flatten()
                    .map(|summary| (key, summary))
            })
            .collect()
    }

    /// The user `owner` stands for (`user@db`), if known.
    pub fn owner_name(&self, owner: OwnerId) -> Option<Arc<str>> {
        self.tables.owner_name(owner)
    }

    /// Web-session store counters, by store label (for metrics).
    pub fn store_stats(&self) -> StoreStats {
        self.stores.stats()
    }

    pub fn stats(&self) -> EngineStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let lifecycle = &self.lifecycle;
        let ledger = self.ledger.counts();
        EngineStats {
            ledger,
            connections: self.conns.len(),
            requests_inspected: self.requests_inspected.load(Ordering::Relaxed),
            requests_rejected: self.requests_rejected.load(Ordering::Relaxed),
            refreshes_sent: self.refreshes_sent.load(Ordering::Relaxed),
            sessions_refreshed: self.sessions_refreshed.load(Ordering::Relaxed),
            refresh_failures: self.refresh_failures.load(Ordering::Relaxed),
            violations: self
                .violations
                .per_rule
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum(),
            sessions_started: load(&lifecycle.sessions_started),
            sessions_ended: load(&lifecycle.sessions_ended),
            sessions_killed: load(&lifecycle.sessions_killed),
            sessions_expired: load(&lifecycle.sessions_expired)
                .saturating_add(ledger.purged_expired),
            transactions_started: load(&lifecycle.transactions_started),
            transactions_committed: load(&lifecycle.transactions_committed),
            transactions_aborted: load(&lifecycle.transactions_aborted),
            transactions_left_open: load(&lifecycle.transactions_left_open),
            in_flight_abandoned: self.in_flight_abandoned.each_ref().map(load),
            retries: PerCommand(self.retries.each_ref().map(load)),
            commands_refused: self.refusals.snapshot(),
            retry_verdicts_pending: self.verdicts.len(),
            retry_verdicts_unjudged: self.verdicts.unjudged(),
        }
    }
}

/// Whether `violation` rejects its request under `rules`: its rule's action
/// is reject and it does not rest on an unconfirmed effect.
fn rejects(rules: &ResolvedRules, violation: &Violation) -> bool {
    violation.rejects(rules.get(violation.rule).action)
}

fn reply_facts(reply: &ReplyView<'_>, in_transaction: bool) -> ReplyFacts {
    let no_such_transaction = reply.code == Some(NO_SUCH_TRANSACTION)
        || reply
            .write_error_codes()
            .any(|code| code == NO_SUCH_TRANSACTION);
    ReplyFacts {
        ok: reply.ok,
        clean_success: reply.is_clean_success(),
        in_transaction,
        transient: reply.has_label("TransientTransactionError"),
        no_such_transaction,
        unknown_commit_result: reply.has_label("UnknownTransactionCommitResult"),
        retryable: reply.has_label("RetryableWriteError"),
        overloaded: reply.has_label("SystemOverloadedError") || reply.has_label("RetryableError"),
        write_concern_error: reply.write_concern_error_code.is_some(),
    }
}

/// The structured event of a finding's first violation: its finding, rule,
/// severity, short lsid, both requests' ids, peers, apps, drivers, users,
/// commands, namespaces, txnNumbers and times. No document contents.
fn log_violation(record: &ViolationRecord) {
    let current = record.current.as_ref();
    let earlier = record.earlier.as_ref();
    macro_rules! event {
        ($level:ident) => {
            tracing::$level!(
                target: "sessionguard::violation",
                finding = %record.finding,
                violation_id = record.id,
                rule = record.rule.as_str(),
                severity = record.severity.as_str(),
                action = record.action.as_str(),
                rejected = record.rejected,
                lsid = %record.lsid_short,
                owner = record.owner.as_deref(),
                conn = current.map(|r| r.connection_id),
                request_id = current.map(|r| r.request_id),
                peer = current.and_then(|r| r.peer.as_deref()),
                app = current.and_then(|r| r.app_name.as_deref()),
                driver = current.and_then(|r| r.driver.as_deref()),
                user = current.and_then(|r| r.user.as_deref()),
                command = current.map(|r| r.command.as_str()),
                ns = current.map(|r| r.namespace.as_str()),
                txn_number = current.and_then(|r| r.txn_number),
                at = current.map(|r| r.at.as_str()),
                other_conn = earlier.map(|r| r.connection_id),
                other_request_id = earlier.map(|r| r.request_id),
                other_peer = earlier.and_then(|r| r.peer.as_deref()),
                other_app = earlier.and_then(|r| r.app_name.as_deref()),
                other_driver = earlier.and_then(|r| r.driver.as_deref()),
                other_user = earlier.and_then(|r| r.user.as_deref()),
                other_command = earlier.map(|r| r.command.as_str()),
                other_ns = earlier.map(|r| r.namespace.as_str()),
                other_txn_number = earlier.and_then(|r| r.txn_number),
                other_at = earlier.map(|r| r.at.as_str()),
                "{}: {}",
                record.rule,
                record.message
            )
        };
    }
    match record.severity {
        Severity::Error => event!(error),
        Severity::Warning => event!(warn),
        Severity::Info => event!(info),
    }
}

/// The periodic line about a finding after its first violation: how many
/// violations since the previous line and in all (its fields name the bug;
/// the examples are at `/findings/<id>`).
fn log_summary(summary: &Summary) {
    let fields = summary.fields.as_deref();
    let current = fields.and_then(|f| f.current.as_ref());
    let earlier = fields.and_then(|f| f.earlier.as_ref());
    let rule = fields.map_or("overflow", |f| f.rule.as_str());
    macro_rules! event {
        ($level:ident) => {
            tracing::$level!(
                target: "sessionguard::violation",
                finding = %summary.finding,
                rule,
                severity = fields.map(|f| f.severity.as_str()),
                action = fields.map(|f| f.action.as_str()),
                count = summary.since,
                total = summary.total,
                app = current.and_then(|r| r.app_name.as_deref()),
                driver = current.and_then(|r| r.driver.as_deref()),
                command = current.map(|r| r.command.as_str()),
                ns = current.map(|r| r.namespace.as_str()),
                other_app = earlier.and_then(|r| r.app_name.as_deref()),
                other_driver = earlier.and_then(|r| r.driver.as_deref()),
                other_command = earlier.map(|r| r.command.as_str()),
                other_ns = earlier.map(|r| r.namespace.as_str()),
                "{rule}: {} more violations of finding {} since its last log line ({} in all)",
                summary.since,
                summary.finding,
                summary.total,
            )
        };
    }
    match fields.map_or(Severity::Warning, |f| f.severity) {
        Severity::Error => event!(error),
        Severity::Warning => event!(warn),
        Severity::Info => event!(info),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Mode;
    use bson::spec::BinarySubtype;
    use bson::{rawdoc, Binary, RawDocumentBuf};
    use sessionguard_protocol::wire::op_msg::encode;
    use sessionguard_protocol::wire::{MsgFlags, OpMsg, HEADER_LEN};

    use crate::outcome::{Refusal, SessionCommand};
    use sessionguard_protocol::command::Lsid;

    pub(crate) const PEER: &str = "10.1.1.1:50000";
    const LISTENER: &str = "127.0.0.1:27018";

    pub(crate) fn lsid(n: u8) -> RawDocumentBuf {
        rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![n; 16] } }
    }

    /// The engine as the tests drive it, with the caller's side of the seam:
    /// the `PendingRequest`s it hands out are kept here, as the proxy keeps
    /// them with its in-flight records, given back with their replies and,
    /// at close, as what is still in flight. Its `request_at` / `reply_at` /
    /// `close_at` shadow the engine's; everything else derefs to it.
    pub(crate) struct TestEngine {
        engine: SessionEngine,
        /// (connection, request id, record), oldest first.
        in_flight: std::sync::Mutex<Vec<(u64, i32, PendingRequest)>>,
    }

    impl std::ops::Deref for TestEngine {
        type Target = SessionEngine;
        fn deref(&self) -> &SessionEngine {
            &self.engine
        }
    }

    impl TestEngine {
        fn table(&self) -> std::sync::MutexGuard<'_, Vec<(u64, i32, PendingRequest)>> {
            self.in_flight.lock().unwrap()
        }

        pub(crate) fn request_at(
            &self,
            conn: u64,
            request_id: i32,
            message: &Message<'_>,
            now: Millis,
        ) -> Decision {
            let (decision, pending) = self.engine.request_at(conn, request_id, message, now);
            if let Some(pending) = pending {
                assert_eq!(
                    decision,
                    Decision::Forward,
                    "a rejected request has no record"
                );
                self.table().push((conn, request_id, pending));
            }
            decision
        }

        /// A reply to the latest request `to` of `conn` (as the proxy
        /// matches it); none is shown to the engine if nothing matches.
        pub(crate) fn reply_at(&self, conn: u64, to: i32, message: &Message<'_>, now: Millis) {
            let more_to_come = matches!(message, Message::Msg(m) if m.flags.more_to_come());
            let mut table = self.table();
            let Some(position) = table.iter().rposition(|(c, id, _)| (*c, *id) == (conn, to))
            else {
                return;
            };
            self.engine
                .reply_at(conn, &mut table[position].2, message, now);
            if !more_to_come {
                table.remove(position);
            }
        }

        pub(crate) fn close_at(&self, conn: u64, cause: CloseCause, now: Millis) {
            let table = std::mem::take(&mut *self.table());
            let (left, kept): (Vec<_>, Vec<_>) =
                table.into_iter().partition(|(c, _, _)| *c == conn);
            *self.table() = kept;
            self.engine
                .close_at(conn, cause, left.into_iter().map(|(_, _, p)| p), now);
        }
    }

    pub(crate) fn engine_with(config: SessionConfig, rules: RulesConfig) -> TestEngine {
        TestEngine {
            engine: SessionEngine::new(&config, &rules),
            in_flight: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn engine() -> TestEngine {
        engine_with(SessionConfig::default(), RulesConfig::default())
    }

    pub(crate) fn connect(engine: &TestEngine, conn: u64, peer: &str, app: &str) {
        // Refreshes may be planned on it (the tests hand the engine their
        // outcomes).
        engine.connect(conn, peer.parse().unwrap(), LISTENER.parse().unwrap(), true);
        let hello = rawdoc! {
            "hello": 1,
            "client": { "driver": { "name": "mongo-rust-driver", "version": "3.3.0" }, "application": { "name": app } },
            "$db": "admin",
        };
        assert_eq!(send(engine, conn, 1, &hello, 0, 0), Decision::Forward);
        reply(
            engine,
            conn,
            1,
            &rawdoc! { "isWritablePrimary": true, "logicalSessionTimeoutMinutes": 30, "ok": 1.0 },
            0,
        );
    }

    pub(crate) fn send(
        engine: &TestEngine,
        conn: u64,
        id: i32,
        doc: &RawDocumentBuf,
        flags: u32,
        now: Millis,
    ) -> Decision {
        let frame = encode(id, 0, MsgFlags(flags), doc.as_bytes());
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        engine.request_at(conn, id, &Message::Msg(msg), now)
    }

    pub(crate) fn reply(
        engine: &TestEngine,
        conn: u64,
        to: i32,
        doc: &RawDocumentBuf,
        now: Millis,
    ) {
        let frame = encode(9000 + to, to, MsgFlags(0), doc.as_bytes());
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        engine.reply_at(conn, to, &Message::Msg(msg), now);
    }

    /// Sends `doc` and answers it with `answer`, both at `at`.
    pub(crate) fn exchange(
        engine: &TestEngine,
        conn: u64,
        id: i32,
        doc: &RawDocumentBuf,
        answer: &RawDocumentBuf,
        at: Millis,
    ) {
        send(engine, conn, id, doc, 0, at);
        reply(engine, conn, id, answer, at);
    }

    pub(crate) fn ok() -> RawDocumentBuf {
        rawdoc! { "ok": 1.0 }
    }

    pub(crate) fn rules_fired(engine: &SessionEngine) -> Vec<RuleId> {
        engine.violations().iter().map(|v| v.rule).collect()
    }

    pub(crate) fn insert(session: u8, txn: i64, value: i32) -> RawDocumentBuf {
        rawdoc! { "insert": "orders", "documents": [{ "v": value }], "lsid": lsid(session), "txnNumber": txn, "$db": "shop" }
    }

    pub(crate) fn find(session: u8) -> RawDocumentBuf {
        rawdoc! { "find": "orders", "filter": {}, "lsid": lsid(session), "$db": "shop" }
    }

    #[test]
    fn sequential_pooled_sessions_across_connections_raise_nothing() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        let mut txn = 0;
        for round in 0..20 {
            let conn = 1 + (round % 2);
            txn += 1;
            assert_eq!(
                send(
                    &engine,
                    conn,
                    10 + round as i32,
                    &insert(1, txn, round as i32),
                    0,
                    round
                ),
                Decision::Forward
            );
            reply(&engine, conn, 10 + round as i32, &ok(), round);
            send(&engine, conn, 100 + round as i32, &find(1), 0, round);
            reply(
                &engine,
                conn,
                100 + round as i32,
                &rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 },
                round,
            );
        }
        assert_eq!(rules_fired(&engine), vec![]);
        assert_eq!(engine.stats().requests_inspected, 20 * 2 + 2);
    }

    #[test]
    fn overlapping_use_is_concurrent_use_with_both_requests_in_evidence() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        send(&engine, 2, 20, &insert(3, 1, 1), 0, 150);
        let violations = engine.violations();
        assert_eq!(violations.len(), 1);
        let v = &violations[0];
        assert_eq!(v.rule, RuleId::ConcurrentUse);
        assert_eq!(v.severity, Severity::Error);
        assert!(!v.rejected);
        let current = v.current.as_ref().unwrap();
        let earlier = v.earlier.as_ref().unwrap();
        assert_eq!((current.connection_id, current.request_id), (2, 20));
        assert_eq!((earlier.connection_id, earlier.request_id), (1, 10));
        assert_eq!(current.command, "insert");
        assert_eq!(earlier.command, "find");
        assert_eq!(current.namespace, "shop.orders");
        assert_eq!(current.app_name.as_deref(), Some("web"));
        assert_eq!(current.driver.as_deref(), Some("mongo-rust-driver"));
        assert_eq!(current.peer.as_deref(), Some("10.1.1.1:50001"));
        assert_eq!(current.txn_number, Some(1));
        assert_eq!(v.lsid, "03030303-0303-0303-0303-030303030303");
        assert_eq!(
            engine.violation_counts()[RuleId::ConcurrentUse.index()].1,
            1
        );
    }

    #[test]
    fn enforce_rejects_with_the_documented_error_and_does_not_record_the_request() {
        let config = SessionConfig {
            mode: Mode::Enforce,
            ..SessionConfig::default()
        };
        let engine = engine_with(config, RulesConfig::default());
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        let Decision::Reject { reply: body } = send(&engine, 2, 20, &insert(3, 1, 1), 0, 150)
        else {
            panic!("expected a rejection");
        };
        let doc = bson::RawDocument::from_bytes(&body).unwrap();
        assert_eq!(doc.get_f64("ok").unwrap(), 0.0);
        assert_eq!(doc.get_i32("code").unwrap(), SESSIONGUARD_VIOLATION_CODE);
        assert_eq!(doc.get_str("codeName").unwrap(), "SessionGuardViolation");
        assert!(doc
            .get_str("errmsg")
            .unwrap()
            .starts_with("sessionguard: concurrent-use: "));
        assert!(doc.get("errorLabels").unwrap().is_none());
        assert!(engine.violations()[0].rejected);
        // The rejected insert never became part of the session: its txnNumber
        // is not "used", and the first request's reply leaves nothing in flight.
        reply(
            &engine,
            1,
            10,
            &rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 },
            200,
        );
        assert_eq!(
            send(&engine, 2, 21, &insert(3, 1, 1), 0, 250),
            Decision::Forward
        );
        // Warnings are logged, not rejected, in enforce mode.
        let w0 = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(4), "writeConcern": { "w": 0 }, "$db": "d" };
        assert_eq!(send(&engine, 1, 30, &w0, 0, 300), Decision::Forward);
        assert_eq!(
            engine.violations().last().unwrap().rule,
            RuleId::UnacknowledgedWithSession
        );
    }

    #[test]
    fn reject_is_impossible_without_a_reply_so_more_to_come_is_forwarded() {
        let mut rules = RulesConfig::default();
        rules.rules.insert(
            "concurrent-use".into(),
            crate::config::RuleOverride {
                action: Some(Action::Reject),
                ..Default::default()
            },
        );
        let engine = engine_with(SessionConfig::default(), rules);
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        let insert = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(3), "$db": "d" };
        assert_eq!(
            send(&engine, 2, 20, &insert, MsgFlags::MORE_TO_COME, 110),
            Decision::Forward
        );
        let fired = engine.violations();
        assert!(fired
            .iter()
            .any(|v| v.rule == RuleId::ConcurrentUse && !v.rejected));
    }

    #[test]
    fn node_client_close_with_end_sessions_unread_is_not_misuse() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &insert(5, 1, 1), 0, 0);
        reply(&engine, 1, 10, &ok(), 1);
        let end = rawdoc! { "endSessions": [lsid(5), lsid(6)], "$db": "admin" };
        send(&engine, 1, 11, &end, 0, 2);
        let kill = rawdoc! { "killCursors": "orders", "cursors": [77_i64], "lsid": lsid(5), "$db": "shop" };
        send(&engine, 1, 12, &kill, 0, 2);
        engine.close_at(1, CloseCause::ClientClosed, 3);
        assert_eq!(rules_fired(&engine), vec![]);
    }

    #[test]
    fn closing_with_a_write_in_flight_is_a_warning() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &insert(5, 1, 1), 0, 0);
        engine.close_at(1, CloseCause::ClientClosed, 50);
        let fired = engine.violations();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rule, RuleId::ClosedWithRequestsInFlight);
        assert_eq!(fired[0].severity, Severity::Warning);
        // The session has nothing in flight any more: the next use is clean.
        connect(&engine, 2, PEER, "web");
        send(&engine, 2, 1, &insert(5, 2, 2), 0, 60);
        assert_eq!(engine.violations().len(), 1);
    }

    #[test]
    fn use_after_end_and_end_while_in_flight() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &insert(7, 1, 1), 0, 0);
        // Ended while the insert is still running.
        send(
            &engine,
            2,
            20,
            &rawdoc! { "endSessions": [lsid(7)], "$db": "admin" },
            0,
            5,
        );
        reply(&engine, 1, 10, &ok(), 6);
        reply(&engine, 2, 20, &ok(), 6);
        // Used again later.
        send(&engine, 1, 11, &find(7), 0, 1_000);
        assert_eq!(
            rules_fired(&engine),
            vec![RuleId::EndWhileInFlight, RuleId::UseAfterEnd]
        );
        // Observe mode: the server started a new session, later uses are fine.
        reply(
            &engine,
            1,
            11,
            &rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 },
            1_001,
        );
        send(&engine, 1, 12, &insert(7, 2, 2), 0, 1_002);
        assert_eq!(engine.violations().len(), 2);
    }

    #[test]
    fn kill_sessions_and_kill_all_sessions_mark_sessions_killed() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &insert(1, 1, 1), 0, 0);
        reply(&engine, 1, 10, &ok(), 0);
        send(&engine, 1, 11, &insert(2, 1, 1), 0, 0);
        reply(&engine, 1, 11, &ok(), 0);
        send(
            &engine,
            1,
            12,
            &rawdoc! { "killSessions": [lsid(1)], "$db": "admin" },
            0,
            1,
        );
        reply(&engine, 1, 12, &ok(), 1);
        send(&engine, 1, 13, &find(1), 0, 2);
        reply(&engine, 1, 13, &ok(), 2);
        send(
            &engine,
            1,
            14,
            &rawdoc! { "killAllSessions": [], "$db": "admin" },
            0,
            3,
        );
        reply(&engine, 1, 14, &ok(), 3);
        send(&engine, 1, 15, &find(2), 0, 4);
        let fired = engine.violations();
        assert_eq!(
            fired.iter().map(|v| v.rule).collect::<Vec<_>>(),
            vec![RuleId::UseAfterEnd, RuleId::UseAfterEnd]
        );
        assert!(fired[0].message.contains("killSessions"));
        assert!(fired[1].message.contains("killAllSessions"));
    }

    /// The first SCRAM step of user `alice`, as drivers send it.
    fn sasl_start_as_alice() -> RawDocumentBuf {
        rawdoc! {
            "saslStart": 1, "mechanism": "SCRAM-SHA-256",
            "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"n,,n=alice,r=abc".to_vec() },
            "$db": "admin",
        }
    }

    #[test]
    fn kill_all_sessions_by_user_kills_only_that_owners_sessions() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 2, &sasl_start_as_alice(), 0, 0);
        reply(
            &engine,
            1,
            2,
            &rawdoc! { "conversationId": 1, "done": true, "ok": 1.0 },
            0,
        );
        // An unauthenticated connection: same lsid, another server session.
        connect(&engine, 2, PEER, "web");
        for (conn, id) in [(1, 10), (2, 10)] {
            send(&engine, conn, id, &find(1), 0, 1);
            reply(&engine, conn, id, &ok(), 1);
        }
        let kill = |user: &str, id: i32, at: Millis| {
            send(
                &engine,
                2,
                id,
                &rawdoc! { "killAllSessions": [{ "user": user, "db": "admin" }], "$db": "admin" },
                0,
                at,
            );
            reply(&engine, 2, id, &ok(), at);
        };
        // A user the proxy never saw matches nothing.
        kill("mallory", 11, 2);
        send(&engine, 1, 12, &find(1), 0, 3);
        reply(&engine, 1, 12, &ok(), 3);
        assert_eq!(rules_fired(&engine), vec![]);
        kill("alice", 13, 4);
        send(&engine, 2, 14, &find(1), 0, 5);
        reply(&engine, 2, 14, &ok(), 5);
        assert_eq!(rules_fired(&engine), vec![]);
        send(&engine, 1, 15, &find(1), 0, 6);
        assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd]);
    }

    // ---- judged by outcome (issue 12) ----

    fn enforcing() -> TestEngine {
        engine_with(
            SessionConfig {
                mode: Mode::Enforce,
                ..SessionConfig::default()
            },
            RulesConfig::default(),
        )
    }

    /// The refusals real servers answer kill commands with: Unauthorized
    /// (a user without killAnySession), CommandNotFound, CommandNotSupported
    /// (Microsoft DocumentDB and the servers built on it), AtlasError (Atlas
    /// shared tiers).
    fn refusals() -> Vec<RawDocumentBuf> {
        vec![
            rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized", "errmsg": "not authorized on admin to execute command" },
            rawdoc! { "ok": 0.0, "code": 59, "codeName": "CommandNotFound", "errmsg": "no such command" },
            rawdoc! { "ok": 0.0, "code": 115, "codeName": "CommandNotSupported", "errmsg": "Unknown request received: killSessions" },
            rawdoc! { "ok": 0.0, "code": 8000, "codeName": "AtlasError", "errmsg": "killAllSessions is not allowed in this atlas tier" },
        ]
    }

    fn kills() -> Vec<RawDocumentBuf> {
        vec![
            rawdoc! { "killSessions": [lsid(1)], "$db": "admin" },
            rawdoc! { "killAllSessions": [], "$db": "admin" },
            rawdoc! { "killAllSessionsByPattern": [{}], "$db": "admin" },
            rawdoc! { "killAllSessionsByPattern": [{ "lsid": lsid(1) }], "$db": "admin" },
        ]
    }

    #[test]
    fn a_refused_kill_ends_nothing_and_enforce_lets_the_next_request_through() {
        for refusal in refusals() {
            for kill in kills() {
                let engine = enforcing();
                connect(&engine, 1, PEER, "web");
                exchange(&engine, 1, 10, &insert(1, 1, 1), &ok(), 0);
                exchange(&engine, 1, 11, &kill, &refusal, 2);
                let next = send(&engine, 1, 12, &find(1), 0, 4);
                assert_eq!(next, Decision::Forward, "{kill:?} refused with {refusal:?}");
                reply(&engine, 1, 12, &ok(), 5);
                assert_eq!(
                    rules_fired(&engine),
                    vec![],
                    "{kill:?} refused with {refusal:?}"
                );
                assert_eq!(engine.stats().sessions_killed, 0);
            }
        }
    }

    #[test]
    fn a_confirmed_kill_is_use_after_end_and_enforce_rejects_the_next_use() {
        for kill in kills() {
            let engine = enforcing();
            connect(&engine, 1, PEER, "web");
            exchange(&engine, 1, 10, &insert(1, 1, 1), &ok(), 0);
            exchange(&engine, 1, 11, &kill, &ok(), 2);
            assert!(
                matches!(
                    send(&engine, 1, 12, &find(1), 0, 4),
                    Decision::Reject { .. }
                ),
                "{kill:?}"
            );
            assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd], "{kill:?}");
            assert!(engine.violations()[0].rejected);
        }
    }

    #[test]
    fn a_session_is_not_ended_before_the_server_answers_end_sessions() {
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        exchange(&engine, 1, 10, &find(1), &ok(), 0);
        send(
            &engine,
            2,
            20,
            &rawdoc! { "endSessions": [lsid(1)], "$db": "admin" },
            0,
            2,
        );
        // Sent while endSessions is still on its way: not (yet) a use after end.
        assert_eq!(send(&engine, 1, 11, &find(1), 0, 3), Decision::Forward);
        reply(&engine, 1, 11, &ok(), 4);
        assert_eq!(rules_fired(&engine), vec![]);
        reply(&engine, 2, 20, &ok(), 5);
        assert!(matches!(
            send(&engine, 1, 12, &find(1), 0, 6),
            Decision::Reject { .. }
        ));
        assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd]);
    }

    #[test]
    fn an_unanswered_end_sessions_is_an_unconfirmed_end_reported_as_a_warning_never_rejected() {
        // The Node.js driver's client.close(): endSessions fired, the socket
        // closed before the reply.
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        exchange(&engine, 1, 10, &insert(1, 1, 1), &ok(), 0);
        send(
            &engine,
            1,
            11,
            &rawdoc! { "endSessions": [lsid(1)], "$db": "admin" },
            0,
            2,
        );
        engine.close_at(1, CloseCause::ClientClosed, 3);
        assert_eq!(rules_fired(&engine), vec![]);
        // A later invocation reuses the session id.
        connect(&engine, 2, PEER, "web");
        assert_eq!(send(&engine, 2, 20, &find(1), 0, 1_000), Decision::Forward);
        let fired = engine.violations();
        assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd]);
        assert_eq!(fired[0].severity, Severity::Warning);
        assert!(!fired[0].rejected);
        assert!(
            fired[0].message.contains("not confirmed"),
            "{}",
            fired[0].message
        );
    }

    #[test]
    fn identical_concurrent_finds_both_answered_are_concurrent_use() {
        // A handler pool reading the same document with one shared session.
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        send(&engine, 2, 20, &find(3), 0, 101);
        let cursor = rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 };
        reply(&engine, 2, 20, &cursor, 102);
        assert_eq!(
            rules_fired(&engine),
            vec![],
            "undecided until the first is answered"
        );
        reply(&engine, 1, 10, &cursor, 103);
        let fired = engine.violations();
        assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
        let current = fired[0].current.as_ref().unwrap();
        let earlier = fired[0].earlier.as_ref().unwrap();
        assert_eq!((current.connection_id, current.request_id), (2, 20));
        assert_eq!((earlier.connection_id, earlier.request_id), (1, 10));
        assert!(!fired[0].rejected);
    }

    #[test]
    fn an_unanswered_identical_request_past_the_deadline_is_concurrent_use() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        exchange(&engine, 2, 20, &find(3), &ok(), 101);
        engine.sweep_at(5_000);
        assert_eq!(rules_fired(&engine), vec![]);
        // The first is still in flight on a connection that stayed open.
        engine.sweep_at(100 + 10_001);
        assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
        // Decided once: its reply later changes nothing.
        reply(&engine, 1, 10, &ok(), 20_000);
        assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
    }

    #[test]
    fn retryable_write_retry_on_a_new_connection_raises_nothing() {
        for (cause, expected) in [
            (CloseCause::UpstreamClosed, vec![]),
            (CloseCause::UpstreamError, vec![]),
            // The client gave up on the first connection itself (a socket
            // timeout): the write it left behind is still its doing.
            (
                CloseCause::ClientClosed,
                vec![RuleId::ClosedWithRequestsInFlight],
            ),
        ] {
            let engine = engine();
            connect(&engine, 1, PEER, "web");
            send(&engine, 1, 10, &insert(8, 4, 1), 0, 0);
            // The connection dies; the driver retries on another one before
            // the proxy has processed the close.
            connect(&engine, 2, PEER, "web");
            let mut retry = insert(8, 4, 1);
            retry.append(
                "$clusterTime",
                rawdoc! { "clusterTime": bson::Timestamp { time: 5, increment: 1 } },
            );
            exchange(&engine, 2, 20, &retry, &ok(), 30);
            assert_eq!(
                rules_fired(&engine),
                vec![],
                "undecided until the first's outcome"
            );
            engine.close_at(1, cause, 32);
            assert_eq!(rules_fired(&engine), expected, "{cause:?}");
            let stats = engine.stats();
            assert_eq!(stats.retries.get("insert"), 1, "{cause:?}");
            assert_eq!(stats.retry_verdicts_pending, 0);
            assert_eq!(stats.in_flight_abandoned[cause.index()], 1);
        }
    }

    #[test]
    fn an_upstream_close_with_requests_in_flight_is_counted_never_reported() {
        for cause in CloseCause::ALL {
            let engine = enforcing();
            connect(&engine, 1, PEER, "web");
            send(&engine, 1, 10, &insert(5, 1, 1), 0, 0);
            send(&engine, 1, 11, &txn_insert(6, 1, true), 0, 0);
            engine.close_at(1, cause, 50);
            let fired = rules_fired(&engine);
            if cause.client_went_first() {
                assert_eq!(
                    fired,
                    vec![
                        RuleId::ClosedWithRequestsInFlight,
                        RuleId::ClosedWithRequestsInFlight
                    ],
                    "{cause:?}"
                );
                assert!(engine
                    .violations()
                    .iter()
                    .all(|v| v.severity == Severity::Warning));
            } else {
                assert_eq!(fired, vec![], "{cause:?}");
            }
            let abandoned = engine.stats().in_flight_abandoned;
            assert_eq!(abandoned[cause.index()], 2, "{cause:?}");
            assert_eq!(abandoned.iter().sum::<u64>(), 2, "{cause:?}");
            // Released: the driver's retry on another connection is clean,
            // and counted as a retry.
            connect(&engine, 2, PEER, "web");
            assert_eq!(
                send(&engine, 2, 20, &insert(5, 1, 1), 0, 60),
                Decision::Forward
            );
            reply(&engine, 2, 20, &ok(), 61);
            assert_eq!(rules_fired(&engine).len(), fired.len(), "{cause:?}");
            assert_eq!(engine.stats().retries.get("insert"), 1, "{cause:?}");
        }
    }

    #[test]
    fn a_request_after_a_cut_off_one_is_a_retry_only_if_it_is_the_same() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &find(5), 0, 0);
        engine.close_at(1, CloseCause::UpstreamClosed, 1);
        connect(&engine, 2, PEER, "web");
        // Another command first: the cut-off one was not retried.
        exchange(&engine, 2, 20, &insert(5, 1, 1), &ok(), 2);
        exchange(&engine, 2, 21, &find(5), &ok(), 4);
        assert_eq!(engine.stats().retries.0.iter().sum::<u64>(), 0);
        // A read retried after its connection was cut.
        send(&engine, 2, 22, &find(5), 0, 6);
        engine.close_at(2, CloseCause::UpstreamError, 7);
        connect(&engine, 3, PEER, "web");
        exchange(&engine, 3, 30, &find(5), &ok(), 8);
        assert_eq!(engine.stats().retries.get("find"), 1);
        assert_eq!(rules_fired(&engine), vec![]);
    }

    #[test]
    fn a_transaction_cut_by_the_upstream_between_statements_is_not_superseded_by_the_retry() {
        // A step-down (or a network cut) closes the idle connection that
        // carried a transaction's answered statements before the commit is
        // sent; the driver then fails the commit without sending it and the
        // application retries with the next txnNumber on the same session.
        for (cause, expected) in [
            (CloseCause::UpstreamClosed, vec![]),
            (CloseCause::UpstreamError, vec![]),
            (CloseCause::Drained, vec![]),
            // The client closing its own connection with a transaction left
            // open is its own doing: the next transaction supersedes it.
            (CloseCause::ClientClosed, vec![RuleId::TxnSuperseded]),
        ] {
            let engine = engine();
            connect(&engine, 1, PEER, "web");
            exchange(&engine, 1, 10, &txn_insert(4, 7, true), &ok(), 0);
            exchange(&engine, 1, 11, &txn_insert(4, 7, false), &ok(), 1);
            engine.close_at(1, cause, 2);
            connect(&engine, 2, PEER, "web");
            exchange(&engine, 2, 20, &txn_insert(4, 8, true), &ok(), 3);
            exchange(
                &engine,
                2,
                21,
                &txn_command("commitTransaction", 4, 8),
                &ok(),
                4,
            );
            assert_eq!(rules_fired(&engine), expected, "{cause:?}");
        }
    }

    #[test]
    fn identical_requests_overlapping_a_failed_one_are_all_taken_for_its_retries() {
        let engine = engine();
        for conn in 1..=3 {
            connect(&engine, conn, PEER, "web");
        }
        send(&engine, 1, 10, &find(3), 0, 100);
        send(&engine, 2, 20, &find(3), 0, 101);
        send(&engine, 3, 30, &find(3), 0, 102);
        assert_eq!(engine.stats().retry_verdicts_pending, 2);
        engine.close_at(1, CloseCause::UpstreamClosed, 103);
        reply(&engine, 2, 20, &ok(), 104);
        reply(&engine, 3, 30, &ok(), 105);
        assert_eq!(rules_fired(&engine), vec![]);
        assert_eq!(engine.stats().retries.get("find"), 2);
        assert_eq!(engine.stats().retry_verdicts_pending, 0);
    }

    #[test]
    fn enforce_never_rejects_an_identical_request_on_a_deferred_verdict() {
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        assert_eq!(send(&engine, 2, 20, &find(3), 0, 101), Decision::Forward);
        reply(&engine, 1, 10, &ok(), 102);
        reply(&engine, 2, 20, &ok(), 103);
        let fired = engine.violations();
        assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
        assert!(!fired[0].rejected);
        // A different command overlapping is judged at once, and rejected.
        send(&engine, 1, 11, &find(3), 0, 200);
        assert!(matches!(
            send(&engine, 2, 21, &insert(3, 1, 1), 0, 201),
            Decision::Reject { .. }
        ));
    }

    #[test]
    fn pending_verdicts_are_bounded_and_the_overflow_stays_silent() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        let sessions = crate::outcome::MAX_PENDING_VERDICTS + 1;
        for n in 0..sessions {
            let id = i32::try_from(n).unwrap();
            let session = rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: [id.to_le_bytes(), [7; 4], [7; 4], [7; 4]].concat() } };
            let find = rawdoc! { "find": "orders", "filter": {}, "lsid": session, "$db": "shop" };
            send(&engine, 1, 1_000 + id, &find, 0, 100);
            send(&engine, 2, 1_000 + id, &find, 0, 101);
        }
        let stats = engine.stats();
        assert_eq!(
            stats.retry_verdicts_pending,
            crate::outcome::MAX_PENDING_VERDICTS
        );
        assert_eq!(stats.retry_verdicts_unjudged, 1);
        // Every first is answered: each judged verdict reports, the one left
        // unjudged does not.
        for n in 0..sessions {
            reply(&engine, 1, 1_000 + i32::try_from(n).unwrap(), &ok(), 102);
        }
        let counts = engine.violation_counts();
        assert_eq!(
            counts[RuleId::ConcurrentUse.index()].1,
            crate::outcome::MAX_PENDING_VERDICTS as u64
        );
        assert_eq!(engine.stats().retry_verdicts_pending, 0);
    }

    #[test]
    fn refusals_are_counted_by_command_and_code_and_said_once_per_upstream() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        exchange(&engine, 1, 10, &find(1), &ok(), 0);
        let mut id = 10;
        for refusal in refusals() {
            for kill in kills() {
                id += 1;
                send(&engine, 1, id, &kill, 0, 1);
                reply(&engine, 1, id, &refusal, 1);
            }
        }
        let refused = engine.stats().commands_refused;
        let at =
            |command: SessionCommand, refusal: Refusal| refused[command.index()][refusal.index()];
        for refusal in [
            Refusal::Unauthorized,
            Refusal::CommandNotFound,
            Refusal::CommandNotSupported,
            Refusal::AtlasError,
        ] {
            assert_eq!(at(SessionCommand::KillSessions, refusal), 1, "{refusal:?}");
            assert_eq!(
                at(SessionCommand::KillAllSessions, refusal),
                1,
                "{refusal:?}"
            );
            assert_eq!(
                at(SessionCommand::KillAllSessionsByPattern, refusal),
                2,
                "{refusal:?}"
            );
        }
        assert_eq!(refused.iter().flatten().sum::<u64>(), 16);
        let upstream = engine.upstreams.iter().next().unwrap();
        assert!(
            !upstream.first_refusal(SessionCommand::KillSessions),
            "already said"
        );
        assert!(
            upstream.first_refusal(SessionCommand::EndSessions),
            "never refused"
        );
        assert!(!upstream.refresh_unsupported.load(Ordering::Relaxed));
    }

    #[test]
    fn a_refused_refresh_or_kill_cursors_changes_nothing_and_115_stops_the_refresher() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &find(1), 0, 0);
        let opened = rawdoc! { "cursor": { "id": 77_i64, "firstBatch": [] }, "ok": 1.0 };
        reply(&engine, 1, 10, &opened, 0);
        let kill = rawdoc! { "killCursors": "orders", "cursors": [77_i64], "lsid": lsid(1), "$db": "shop" };
        send(&engine, 1, 11, &kill, 0, 1);
        reply(
            &engine,
            1,
            11,
            &rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized" },
            1,
        );
        assert_eq!(
            engine.stats().ledger.cursors,
            1,
            "a refused kill leaves the cursor open"
        );
        assert_eq!(engine.stats().ledger.held, 1);
        let refresh = rawdoc! { "refreshSessions": [lsid(1)], "$db": "admin" };
        send(&engine, 1, 12, &refresh, 0, 20 * 60_000);
        reply(
            &engine,
            1,
            12,
            &rawdoc! { "ok": 0.0, "code": 115, "codeName": "CommandNotSupported" },
            20 * 60_000,
        );
        assert_eq!(
            engine.ledger.read(
                &SessionKey {
                    lsid: Lsid([1; 16]),
                    owner: OwnerId::UNKNOWN
                },
                |s| s.last_refreshed
            ),
            Some(0)
        );
        let upstream = engine.upstreams.iter().next().unwrap();
        assert!(upstream.refresh_unsupported.load(Ordering::Relaxed));
        drop(upstream);
        // Confirmed, both take hold.
        send(&engine, 1, 13, &kill, 0, 20 * 60_000 + 1);
        reply(&engine, 1, 13, &ok(), 20 * 60_000 + 2);
        assert_eq!(engine.stats().ledger.cursors, 0);
    }

    #[test]
    fn a_commit_is_committed_only_when_acknowledged_without_a_write_concern_error() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        exchange(&engine, 1, 1, &txn_insert(4, 1, true), &ok(), 0);
        send(&engine, 1, 2, &txn_command("commitTransaction", 4, 1), 0, 2);
        let wce = rawdoc! { "ok": 1.0, "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "timed out" } };
        reply(&engine, 1, 2, &wce, 3);
        assert_eq!(txn_counts(&engine), (1, 0, 0, 0));
        // The driver retries the commit; acknowledged this time.
        exchange(
            &engine,
            1,
            3,
            &txn_command("commitTransaction", 4, 1),
            &ok(),
            4,
        );
        assert_eq!(txn_counts(&engine), (1, 1, 0, 0));
        assert_eq!(rules_fired(&engine), vec![]);
    }

    #[test]
    fn end_while_in_flight_waits_for_the_end_to_be_confirmed_outside_enforce() {
        let refused = rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized" };
        for (answer, expected) in [
            (Some(ok()), Some(Severity::Error)),
            (Some(refused), None),
            (None, Some(Severity::Warning)),
        ] {
            let engine = engine();
            connect(&engine, 1, PEER, "web");
            connect(&engine, 2, PEER, "web");
            send(&engine, 1, 10, &find(7), 0, 0);
            let end = rawdoc! { "killSessions": [lsid(7)], "$db": "admin" };
            assert_eq!(send(&engine, 2, 20, &end, 0, 5), Decision::Forward);
            assert_eq!(rules_fired(&engine), vec![], "not before the outcome");
            match &answer {
                Some(answer) => reply(&engine, 2, 20, answer, 6),
                None => engine.close_at(2, CloseCause::ClientClosed, 6),
            }
            let fired = engine.violations();
            assert_eq!(fired.first().map(|v| v.severity), expected, "{answer:?}");
            if let Some(v) = fired.first() {
                assert_eq!(v.rule, RuleId::EndWhileInFlight);
                assert_eq!(v.message.contains("not confirmed"), answer.is_none());
            }
        }
        // Enforce judges it on what it sees: the end never reaches the server.
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(7), 0, 0);
        let end = rawdoc! { "endSessions": [lsid(7)], "$db": "admin" };
        assert!(matches!(
            send(&engine, 2, 20, &end, 0, 5),
            Decision::Reject { .. }
        ));
        assert_eq!(rules_fired(&engine), vec![RuleId::EndWhileInFlight]);
        reply(&engine, 1, 10, &ok(), 6);
        assert_eq!(send(&engine, 1, 11, &find(7), 0, 7), Decision::Forward);
    }

    #[test]
    fn a_store_destroy_takes_hold_only_when_the_delete_is_confirmed() {
        // express-session: one tab loads the session, another logs out
        // (delete by _id), the first saves it back (upsert).
        let get = rawdoc! { "find": "sessions", "filter": { "_id": "sid" }, "$db": "app" };
        let destroy = rawdoc! { "delete": "sessions", "deletes": [{ "q": { "_id": "sid" }, "limit": 1 }], "$db": "app" };
        let save = rawdoc! {
            "update": "sessions",
            "updates": [{ "q": { "_id": "sid" }, "u": { "$set": { "_id": "sid", "session": "{}", "expires": bson::DateTime::now() } }, "upsert": true }],
            "$db": "app",
        };
        let write_error = rawdoc! { "ok": 1.0, "n": 0, "writeErrors": [{ "index": 0, "code": 13, "errmsg": "not authorized" }] };
        let refused = rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized" };
        for (answer, expected) in [
            (Some(ok()), Some((Severity::Error, true))),
            (Some(refused), None),
            (Some(write_error), None),
            (None, Some((Severity::Warning, false))),
        ] {
            let engine = enforcing();
            connect(&engine, 1, PEER, "web");
            connect(&engine, 2, PEER, "web");
            exchange(&engine, 1, 10, &get, &ok(), 0);
            send(&engine, 2, 20, &destroy, 0, 2);
            match &answer {
                Some(answer) => reply(&engine, 2, 20, answer, 3),
                None => engine.close_at(2, CloseCause::ClientClosed, 3),
            }
            let decision = send(&engine, 1, 11, &save, 0, 4);
            let fired = engine.violations();
            match expected {
                Some((severity, rejected)) => {
                    assert_eq!(fired.len(), 1, "{answer:?}");
                    assert_eq!(fired[0].rule, RuleId::StoreSessionResurrected);
                    assert_eq!((fired[0].severity, fired[0].rejected), (severity, rejected));
                    assert_eq!(matches!(decision, Decision::Reject { .. }), rejected);
                }
                None => {
                    assert_eq!(rules_fired(&engine), vec![], "{answer:?}");
                    assert_eq!(decision, Decision::Forward);
                }
            }
        }
    }

    #[test]
    fn promise_all_on_one_session_is_txn_number_reuse() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &insert(9, 3, 1), 0, 0);
        send(&engine, 2, 20, &insert(9, 3, 2), 0, 1);
        let fired = rules_fired(&engine);
        assert!(fired.contains(&RuleId::TxnNumberReuse), "{fired:?}");
        assert!(fired.contains(&RuleId::ConcurrentUse), "{fired:?}");
    }

    fn txn_insert(session: u8, txn: i64, start: bool) -> RawDocumentBuf {
        let mut doc = insert(session, txn, 1);
        if start {
            doc.append("startTransaction", true);
        }
        doc.append("autocommit", false);
        doc
    }

    fn txn_command(name: &str, session: u8, txn: i64) -> RawDocumentBuf {
        let mut doc = RawDocumentBuf::new();
        doc.append(name, 1);
        doc.append("lsid", lsid(session));
        doc.append("txnNumber", txn);
        doc.append("autocommit", false);
        doc.append("$db", "admin");
        doc
    }

    #[test]
    fn with_transaction_retry_loop_raises_nothing() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        let write_conflict = rawdoc! {
            "ok": 0.0, "code": 112, "codeName": "WriteConflict", "errmsg": "x",
            "errorLabels": ["TransientTransactionError"],
        };
        // Attempt 1: conflict, abort, retry with a new number.
        send(&engine, 1, 1, &txn_insert(4, 1, true), 0, 0);
        reply(&engine, 1, 1, &write_conflict, 1);
        send(&engine, 1, 2, &txn_command("abortTransaction", 4, 1), 0, 2);
        reply(
            &engine,
            1,
            2,
            &rawdoc! { "ok": 0.0, "code": 251, "codeName": "NoSuchTransaction" },
            3,
        );
        // Attempt 2: commit fails with an unknown result, is retried, succeeds.
        send(&engine, 1, 3, &txn_insert(4, 2, true), 0, 4);
        reply(&engine, 1, 3, &ok(), 5);
        send(&engine, 1, 4, &txn_command("commitTransaction", 4, 2), 0, 6);
        reply(
            &engine,
            1,
            4,
            &rawdoc! { "ok": 0.0, "code": 50, "errorLabels": ["UnknownTransactionCommitResult"] },
            7,
        );
        send(&engine, 1, 5, &txn_command("commitTransaction", 4, 2), 0, 8);
        reply(&engine, 1, 5, &ok(), 9);
        // And the app commits once more (drivers re-run commit when asked).
        send(
            &engine,
            1,
            6,
            &txn_command("commitTransaction", 4, 2),
            0,
            10,
        );
        reply(&engine, 1, 6, &ok(), 11);
        // Attempt where the commit itself says the transaction is gone: the
        // driver re-runs commit, then retries the transaction.
        send(&engine, 1, 7, &txn_insert(4, 3, true), 0, 12);
        reply(&engine, 1, 7, &ok(), 13);
        send(
            &engine,
            1,
            8,
            &txn_command("commitTransaction", 4, 3),
            0,
            14,
        );
        reply(
            &engine,
            1,
            8,
            &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
            15,
        );
        send(
            &engine,
            1,
            9,
            &txn_command("commitTransaction", 4, 3),
            0,
            16,
        );
        reply(
            &engine,
            1,
            9,
            &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
            17,
        );
        send(&engine, 1, 10, &txn_insert(4, 4, true), 0, 18);
        reply(&engine, 1, 10, &ok(), 19);
        send(
            &engine,
            1,
            11,
            &txn_command("commitTransaction", 4, 4),
            0,
            20,
        );
        reply(&engine, 1, 11, &ok(), 21);
        engine.sweep_at(10 * 60_000);
        assert_eq!(rules_fired(&engine), vec![]);
    }

    #[test]
    fn transaction_misuse_is_reported() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        // Superseded: transaction 1 open, transaction 2 starts.
        send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
        reply(&engine, 1, 1, &ok(), 1);
        send(&engine, 1, 2, &txn_insert(2, 2, true), 0, 2);
        reply(&engine, 1, 2, &ok(), 3);
        // Regression: number 1 again.
        send(&engine, 1, 3, &txn_insert(2, 1, false), 0, 4);
        reply(&engine, 1, 3, &rawdoc! { "ok": 0.0, "code": 225 }, 5);
        // After abort: a statement fails with a transient error, the app
        // swallows it and keeps going.
        send(&engine, 1, 4, &txn_insert(2, 2, false), 0, 6);
        reply(
            &engine,
            1,
            4,
            &rawdoc! { "ok": 0.0, "code": 112, "errorLabels": ["TransientTransactionError"] },
            7,
        );
        send(&engine, 1, 5, &txn_insert(2, 2, false), 0, 8);
        reply(
            &engine,
            1,
            5,
            &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
            9,
        );
        send(
            &engine,
            1,
            6,
            &txn_command("commitTransaction", 2, 2),
            0,
            10,
        );
        assert_eq!(
            rules_fired(&engine),
            vec![
                RuleId::TxnSuperseded,
                RuleId::TxnRegression,
                RuleId::TxnAfterAbort,
                RuleId::TxnAfterAbort
            ]
        );
    }

    #[test]
    fn a_swallowed_duplicate_key_is_proven_by_the_next_reply() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
        reply(&engine, 1, 1, &ok(), 1);
        send(&engine, 1, 2, &txn_insert(2, 1, false), 0, 2);
        reply(
            &engine,
            1,
            2,
            &rawdoc! { "ok": 1.0, "n": 0, "writeErrors": [{ "index": 0, "code": 11000, "errmsg": "dup" }] },
            3,
        );
        // Nothing yet: the reply did not say the transaction is gone.
        assert_eq!(rules_fired(&engine), vec![]);
        send(&engine, 1, 3, &txn_insert(2, 1, false), 0, 4);
        reply(
            &engine,
            1,
            3,
            &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
            5,
        );
        assert_eq!(rules_fired(&engine), vec![RuleId::TxnAfterAbort]);
        // The driver's cleanup abort raises nothing more.
        send(&engine, 1, 4, &txn_command("abortTransaction", 2, 1), 0, 6);
        reply(&engine, 1, 4, &rawdoc! { "ok": 0.0, "code": 251 }, 7);
        assert_eq!(engine.violations().len(), 1);
    }

    #[test]
    fn transactions_left_open_are_reported_once_by_the_sweep() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
        reply(&engine, 1, 1, &ok(), 1);
        engine.sweep_at(30_000);
        assert_eq!(rules_fired(&engine), vec![]);
        engine.sweep_at(61_000);
        engine.sweep_at(62_000);
        assert_eq!(rules_fired(&engine), vec![RuleId::TxnLeftOpen]);
    }

    /// (started, committed, aborted, left open)
    fn txn_counts(engine: &SessionEngine) -> (u64, u64, u64, u64) {
        let stats = engine.stats();
        (
            stats.transactions_started,
            stats.transactions_committed,
            stats.transactions_aborted,
            stats.transactions_left_open,
        )
    }

    #[test]
    fn each_transaction_is_counted_started_once_and_settled_once() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        let transient = rawdoc! {
            "ok": 0.0, "code": 112, "codeName": "WriteConflict", "errmsg": "x",
            "errorLabels": ["TransientTransactionError"],
        };
        let no_such =
            rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] };
        let mut id = 0;
        let mut exchange = |doc: &RawDocumentBuf, answer: &RawDocumentBuf| {
            id += 1;
            send(&engine, 1, id, doc, 0, u64::try_from(id).unwrap());
            reply(&engine, 1, id, answer, u64::try_from(id).unwrap());
        };
        // 1: the server aborts it (a statement's error); the driver's abort
        // afterwards is not a second outcome.
        exchange(&txn_insert(4, 1, true), &transient);
        exchange(&txn_command("abortTransaction", 4, 1), &no_such);
        // 2: two statements, a commit with an unknown result, its retry, and
        // the application committing once more: one commit.
        exchange(&txn_insert(4, 2, true), &ok());
        exchange(&txn_insert(4, 2, false), &ok());
        exchange(
            &txn_command("commitTransaction", 4, 2),
            &rawdoc! { "ok": 0.0, "code": 50, "errorLabels": ["UnknownTransactionCommitResult"] },
        );
        exchange(&txn_command("commitTransaction", 4, 2), &ok());
        exchange(&txn_command("commitTransaction", 4, 2), &ok());
        // A regressed number changes nothing.
        exchange(&txn_insert(4, 1, false), &no_such);
        // 3: the commit says the transaction is gone, twice.
        exchange(&txn_insert(4, 3, true), &ok());
        exchange(&txn_command("commitTransaction", 4, 3), &no_such);
        exchange(&txn_command("commitTransaction", 4, 3), &no_such);
        // 4: the client aborts, and retries the abort.
        exchange(&txn_insert(4, 4, true), &ok());
        exchange(&txn_command("abortTransaction", 4, 4), &ok());
        exchange(&txn_command("abortTransaction", 4, 4), &ok());
        assert_eq!(txn_counts(&engine), (4, 1, 3, 0));
        // 5 superseded by 6, 6 by a retryable write numbered 7, 8 ended by a
        // kill: the server aborts each.
        exchange(&txn_insert(4, 5, true), &ok());
        exchange(&txn_insert(4, 6, true), &ok());
        exchange(&insert(4, 7, 1), &ok());
        exchange(&txn_insert(4, 8, true), &ok());
        assert_eq!(txn_counts(&engine), (7, 1, 5, 0));
        exchange(
            &rawdoc! { "killSessions": [lsid(4)], "$db": "admin" },
            &ok(),
        );
        assert_eq!(txn_counts(&engine), (7, 1, 6, 0));
        // A transaction left open is counted once, and still settles later.
        exchange(&txn_insert(5, 1, true), &ok());
        engine.sweep_at(200_000);
        engine.sweep_at(300_000);
        assert_eq!(txn_counts(&engine), (8, 1, 6, 1));
        send(
            &engine,
            1,
            100,
            &txn_command("commitTransaction", 5, 1),
            0,
            300_001,
        );
        reply(&engine, 1, 100, &ok(), 300_002);
        assert_eq!(txn_counts(&engine), (8, 2, 6, 1));
    }

    #[test]
    fn transactions_left_open_are_counted_with_the_rule_disabled() {
        let mut rules = RulesConfig::default();
        rules.rules.insert(
            "txn-left-open".into(),
            crate::config::RuleOverride {
                enabled: Some(false),
                ..Default::default()
            },
        );
        let engine = engine_with(SessionConfig::default(), rules);
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
        reply(&engine, 1, 1, &ok(), 1);
        engine.sweep_at(61_000);
        engine.sweep_at(62_000);
        assert_eq!(rules_fired(&engine), vec![]);
        assert_eq!(txn_counts(&engine), (1, 0, 0, 1));
    }

    #[test]
    fn a_session_starts_with_its_first_forwarded_request_not_a_rejected_one() {
        let config = SessionConfig {
            mode: Mode::Enforce,
            ..SessionConfig::default()
        };
        let engine = engine_with(config, RulesConfig::default());
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &find(1), 0, 0);
        let opened = rawdoc! { "cursor": { "id": 77_i64, "ns": "shop.orders", "firstBatch": [] }, "ok": 1.0 };
        reply(&engine, 1, 10, &opened, 0);
        // getMore on session 1's cursor from sessions 2 and 3, never used
        // before: rejected, so the server never sees them.
        for (id, session) in [(11, 2), (12, 3)] {
            let get_more = rawdoc! { "getMore": 77_i64, "collection": "orders", "lsid": lsid(session), "$db": "shop" };
            assert!(matches!(
                send(&engine, 1, id, &get_more, 0, 1),
                Decision::Reject { .. }
            ));
        }
        assert_eq!(engine.stats().sessions_started, 1);
        send(&engine, 1, 13, &find(2), 0, 2);
        reply(&engine, 1, 13, &ok(), 2);
        assert_eq!(engine.stats().sessions_started, 2);
        // Only session 2 had started: ending both ends one.
        send(
            &engine,
            1,
            14,
            &rawdoc! { "endSessions": [lsid(2), lsid(3)], "$db": "admin" },
            0,
            3,
        );
        reply(&engine, 1, 14, &ok(), 3);
        let stats = engine.stats();
        assert_eq!((stats.sessions_ended, stats.ledger.tombstones), (1, 2));
    }

    #[test]
    fn sessions_are_counted_started_ended_killed_expired_and_tombstoned() {
        const MINUTE: Millis = 60_000;
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        let sessions = |engine: &SessionEngine| {
            let stats = engine.stats();
            (
                stats.sessions_started,
                stats.sessions_ended,
                stats.sessions_killed,
                stats.sessions_expired,
                stats.ledger.tombstones,
            )
        };
        let mut id = 0;
        let mut exchange = |doc: &RawDocumentBuf, now: Millis| {
            id += 1;
            send(&engine, 1, id, doc, 0, now);
            reply(&engine, 1, id, &ok(), now);
        };
        exchange(&find(1), 0);
        exchange(&find(1), 1);
        exchange(&find(2), 1);
        assert_eq!(sessions(&engine), (2, 0, 0, 0, 0));
        // Ending an lsid never seen leaves a tombstone but ends no session;
        // ending one twice ends it once.
        exchange(
            &rawdoc! { "endSessions": [lsid(1), lsid(9)], "$db": "admin" },
            2,
        );
        exchange(&rawdoc! { "endSessions": [lsid(1)], "$db": "admin" }, 2);
        assert_eq!(sessions(&engine), (2, 1, 0, 0, 2));
        // Reuse after the end: the server starts a new session.
        exchange(&find(1), 3);
        assert_eq!(sessions(&engine), (3, 1, 0, 0, 1));
        exchange(&rawdoc! { "killSessions": [lsid(2)], "$db": "admin" }, 4);
        // Kills 1; 2 and 9 are already tombstones.
        exchange(&rawdoc! { "killAllSessions": [], "$db": "admin" }, 4);
        assert_eq!(sessions(&engine), (3, 1, 2, 0, 3));
        // Used again after idling past the server's timeout: expired, and a
        // new session on the server.
        exchange(&find(3), 5);
        exchange(&find(3), 5 + 31 * MINUTE);
        assert_eq!(sessions(&engine), (5, 1, 2, 1, 3));
        // Long after: the tombstones go, and so does session 3, which
        // expired on the server unused.
        engine.sweep_at(5 + 31 * MINUTE + 61 * MINUTE);
        assert_eq!(sessions(&engine), (5, 1, 2, 2, 0));
        assert_eq!(engine.stats().ledger.sessions, 0);
    }

    #[test]
    fn cursors_follow_their_session() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 1, &find(1), 0, 0);
        reply(
            &engine,
            1,
            1,
            &rawdoc! { "cursor": { "id": 555_i64, "ns": "shop.orders", "firstBatch": [] }, "ok": 1.0 },
            1,
        );
        assert_eq!(engine.stats().ledger.held, 1);
        let get_more = |session: Option<u8>| {
            let mut doc = rawdoc! { "getMore": 555_i64, "collection": "orders" };
            if let Some(session) = session {
                doc.append("lsid", lsid(session));
            }
            doc.append("$db", "shop");
            doc
        };
        send(&engine, 1, 2, &get_more(Some(1)), 0, 2);
        reply(
            &engine,
            1,
            2,
            &rawdoc! { "cursor": { "id": 555_i64, "nextBatch": [] }, "ok": 1.0 },
            3,
        );
        assert_eq!(rules_fired(&engine), vec![]);
        send(&engine, 1, 3, &get_more(Some(2)), 0, 4);
        reply(&engine, 1, 3, &rawdoc! { "ok": 0.0, "code": 50738 }, 5);
        send(&engine, 1, 4, &get_more(None), 0, 6);
        reply(&engine, 1, 4, &rawdoc! { "ok": 0.0, "code": 50737 }, 7);
        assert_eq!(
            rules_fired(&engine),
            vec![RuleId::CursorSessionMismatch, RuleId::CursorSessionMismatch]
        );
        // Exhausted: forgotten, and the session is no longer held.
        send(&engine, 1, 5, &get_more(Some(1)), 0, 8);
        reply(
            &engine,
            1,
            5,
            &rawdoc! { "cursor": { "id": 0_i64, "nextBatch": [] }, "ok": 1.0 },
            9,
        );
        assert_eq!(engine.stats().ledger.cursors, 0);
        assert_eq!(engine.stats().ledger.held, 0);
    }

    #[test]
    fn a_cursor_closed_while_its_get_more_waits_releases_the_session() {
        // A change stream (or tailable cursor) closed mid-await: the driver
        // kills the cursor from another connection and hands the session to
        // the next operation while the old getMore is still waiting.
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 1, &find(1), 0, 0);
        reply(
            &engine,
            1,
            1,
            &rawdoc! { "cursor": { "id": 900_i64, "firstBatch": [] }, "ok": 1.0 },
            1,
        );
        let get_more = rawdoc! { "getMore": 900_i64, "collection": "orders", "maxTimeMS": 1000, "lsid": lsid(1), "$db": "shop" };
        send(&engine, 1, 2, &get_more, 0, 2);
        let kill = rawdoc! { "killCursors": "orders", "cursors": [900_i64], "lsid": lsid(1), "$db": "shop" };
        send(&engine, 2, 3, &kill, 0, 3);
        reply(&engine, 2, 3, &ok(), 4);
        send(&engine, 2, 4, &insert(1, 1, 1), 0, 5);
        reply(&engine, 2, 4, &ok(), 6);
        engine.close_at(1, CloseCause::ClientClosed, 7);
        assert_eq!(rules_fired(&engine), vec![]);
        // Without the kill, the same overlap is concurrent use.
        send(&engine, 2, 5, &find(2), 0, 10);
        reply(
            &engine,
            2,
            5,
            &rawdoc! { "cursor": { "id": 901_i64, "firstBatch": [] }, "ok": 1.0 },
            11,
        );
        let get_more =
            rawdoc! { "getMore": 901_i64, "collection": "orders", "lsid": lsid(2), "$db": "shop" };
        send(&engine, 2, 6, &get_more, 0, 12);
        connect(&engine, 3, PEER, "web");
        send(&engine, 3, 7, &insert(2, 1, 1), 0, 13);
        assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
    }

    #[test]
    fn idle_expiry_uses_the_learned_timeout_and_refreshes_reset_it() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        assert_eq!(engine.session_timeout(), Duration::from_secs(1800));
        send(&engine, 1, 1, &find(1), 0, 0);
        reply(&engine, 1, 1, &ok(), 0);
        send(&engine, 1, 2, &find(2), 0, 0);
        reply(&engine, 1, 2, &ok(), 0);
        // The client refreshes session 2 itself.
        send(
            &engine,
            1,
            3,
            &rawdoc! { "refreshSessions": [lsid(2)], "$db": "admin" },
            0,
            20 * 60_000,
        );
        reply(&engine, 1, 3, &ok(), 20 * 60_000);
        send(&engine, 1, 4, &find(1), 0, 31 * 60_000);
        reply(&engine, 1, 4, &ok(), 31 * 60_000);
        send(&engine, 1, 5, &find(2), 0, 31 * 60_000);
        assert_eq!(rules_fired(&engine), vec![RuleId::IdleExpiredReuse]);
        assert!(engine.violations()[0].lsid.starts_with("01010101"));
    }

    #[test]
    fn cross_client_sharing_is_reported_once_per_pair() {
        let engine = engine();
        connect(&engine, 1, "10.0.0.1:4000", "web");
        connect(&engine, 2, "10.0.0.2:4000", "web");
        connect(&engine, 3, "10.0.0.1:4001", "web");
        for (conn, id, at) in [(1, 10, 0), (3, 11, 1), (2, 12, 2), (2, 13, 3)] {
            send(&engine, conn, id, &find(6), 0, at);
            reply(&engine, conn, id, &ok(), at);
        }
        assert_eq!(rules_fired(&engine), vec![RuleId::CrossClientSharing]);
        assert!(engine.violations()[0].message.contains("peer host"));
    }

    #[test]
    fn scram_owner_separates_sessions_and_is_reported() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 2, &sasl_start_as_alice(), 0, 0);
        reply(
            &engine,
            1,
            2,
            &rawdoc! { "conversationId": 1, "done": false, "payload": Binary { subtype: BinarySubtype::Generic, bytes: vec![] }, "ok": 1.0 },
            0,
        );
        send(
            &engine,
            1,
            3,
            &rawdoc! { "saslContinue": 1, "conversationId": 1, "$db": "admin" },
            0,
            0,
        );
        reply(
            &engine,
            1,
            3,
            &rawdoc! { "conversationId": 1, "done": true, "ok": 1.0 },
            0,
        );
        // A second connection whose authentication fails stays unknown.
        connect(&engine, 2, PEER, "web");
        send(&engine, 2, 2, &sasl_start_as_alice(), 0, 0);
        reply(
            &engine,
            2,
            2,
            &rawdoc! { "ok": 0.0, "code": 18, "codeName": "AuthenticationFailed" },
            0,
        );
        // Same lsid under two owners: two server sessions, no overlap.
        send(&engine, 1, 10, &find(1), 0, 1);
        send(&engine, 2, 10, &find(1), 0, 1);
        assert_eq!(rules_fired(&engine), vec![]);
        assert_eq!(engine.stats().ledger.sessions, 2);
        send(&engine, 1, 11, &find(1), 0, 2);
        let fired = engine.violations();
        assert_eq!(fired[0].rule, RuleId::ConcurrentUse);
        assert_eq!(fired[0].owner.as_deref(), Some("alice@admin"));
        assert_eq!(
            fired[0].current.as_ref().unwrap().user.as_deref(),
            Some("alice@admin")
        );
    }

    #[test]
    fn disabled_rules_stay_silent() {
        let mut rules = RulesConfig::default();
        rules.rules.insert(
            "concurrent-use".into(),
            crate::config::RuleOverride {
                enabled: Some(false),
                ..Default::default()
            },
        );
        let engine = engine_with(SessionConfig::default(), rules);
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(3), 0, 100);
        send(&engine, 2, 20, &find(3), 0, 150);
        assert_eq!(rules_fired(&engine), vec![]);
    }

    #[test]
    fn the_violation_list_is_bounded() {
        let config = SessionConfig {
            max_violations: 3,
            ..SessionConfig::default()
        };
        let engine = engine_with(config, RulesConfig::default());
        connect(&engine, 1, PEER, "web");
        for i in 0..10 {
            let w0 = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(i), "writeConcern": { "w": 0 }, "$db": "d" };
            send(
                &engine,
                1,
                100 + i32::from(i),
                &w0,
                MsgFlags::MORE_TO_COME,
                0,
            );
        }
        let kept = engine.violations();
        assert_eq!(kept.len(), 3);
        assert_eq!(
            kept.iter().map(|v| v.id).collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        assert_eq!(
            engine.violation_counts()[RuleId::UnacknowledgedWithSession.index()].1,
            10
        );
    }

    #[test]
    fn the_ledger_stays_within_max_sessions() {
        let config = SessionConfig {
            max_sessions: 50,
            ..SessionConfig::default()
        };
        let engine = engine_with(config, RulesConfig::default());
        connect(&engine, 1, PEER, "web");
        for i in 0..200u8 {
            send(&engine, 1, i32::from(i) + 10, &find(i), 0, u64::from(i));
            reply(&engine, 1, i32::from(i) + 10, &ok(), u64::from(i));
        }
        let counts = engine.stats().ledger;
        assert!(counts.sessions <= 50, "{counts:?}");
        assert!(counts.evicted_idle >= 150, "{counts:?}");
        assert_eq!(rules_fired(&engine), vec![]);
    }
}
