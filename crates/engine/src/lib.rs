//! sessionguard-engine: session hygiene, judged from the traffic alone.
//!
//! It owns the ledger of every MongoDB logical session the proxy sees, the
//! rules that detect misuse, the violations they raise (and, in enforce
//! mode, the rejections), findings (violations grouped by bug), the
//! web-session stores it follows (`[stores]`), and what the refresher
//! decides. It is handed parsed messages (`sessionguard-protocol` views)
//! and the time; it must not do I/O: no tokio, no sockets, no clock of its
//! own beyond `now()` (every `*_at` entry point takes the time, so a test
//! replays any sequence deterministically), and it must never log document
//! contents. It knows nothing of the proxy: the binary adapts it to the
//! proxy's `Inspector` seam and drives the refresher.
//!
//! "Session" here always means a MongoDB logical session (`lsid`); the HTTP
//! sessions applications keep in MongoDB are "web-session stores"
//! (`web_store`).
//!
//! # Layout
//!
//! - `config`: `[sessions]` and `[rules.<id>]`, defaults, validation.
//! - `state`: one session's state machine (pure data and transitions).
//! - `rules`: one pure function per rule, and the registry of the hooks
//!   each runs on (the engine runs the registry, never a rule by name).
//! - `violation`: rule ids, severities, actions, violation records, the
//!   enforce error code.
//! - `ledger`: the bounded, shared map of sessions, cursors and held sessions.
//! - `slab_map`: the sharded map under the ledger (entries in fixed slab
//!   chunks, a small index), so a session costs its slot at every size.
//! - `intern`: small ids for names and client identities (each thread
//!   remembers the ids it looked up), and `Names`, which turns them back
//!   into names.
//! - `web_store`: web-session stores (`[stores]`): store documents by
//!   `_id`, and the resurrections `store-session-resurrected` reports.
//! - `outcome`: what waits on the server's reply: session commands and
//!   their refusals, effects (held until ok:1 in the request's
//!   `PendingRequest`, which the caller keeps), deferred concurrent-use
//!   verdicts.
//! - `finding_id`: [`FindingId`], a finding's public id (the value only).
//! - `findings`: violations grouped by bug (a stable fingerprint), the log
//!   policy (first in full, then periodic summaries), the kept examples.
//! - `timeline`: each connection's recent session operations, merged into
//!   a violation's timeline.
//! - `engine`: [`SessionEngine`], the synchronous API the connection tasks
//!   call (through the binary's `Inspector` adapter), split by concern:
//!   - `engine/mod.rs`: the struct, construction, configuration, reload.
//!   - `conns` (data in `conn_state`): connection identity — handshake
//!     metadata, authenticated owner, upstreams. Each connection's state
//!     has its own lock; the data path holds it as a [`ConnHandle`]
//!     (`request_on`, `reply_on`), the table keeps it for everyone else.
//!   - `pipeline`: the request / reply / close pipeline and the sweep;
//!     `pending`: [`PendingRequest`], its record of a request awaiting its
//!     reply, which the caller (the proxy's in-flight table) owns.
//!   - `log` (data in `violation_log`): the violation log, findings,
//!     evidence and the log lines.
//!   - `stats` (data in `counters`): [`EngineStats`] and the admin views.
//!   - `refresh_api`: the small API the refresh planner uses.
//! - `refresh`: which held sessions to refresh, on which connection, the
//!   `refreshSessions` bytes and what the reply means (the sending is the
//!   binary's), through `engine::refresh_api` only.
#![forbid(unsafe_code)]

mod config;
mod engine;
mod finding_id;
mod findings;
mod intern;
mod ledger;
mod outcome;
mod refresh;
mod rules;
mod slab_map;
mod state;
mod timeline;
mod violation;
mod web_store;

pub use config::{
    Mode, RefreshPolicy, ResolvedRules, RuleOverride, RuleSettings, RulesConfig, SessionConfig,
    DEFAULT_FINDING_INTERVAL,
};
pub use engine::{ConnHandle, Decision, EngineStats, PendingRequest, PerCommand, SessionEngine};
pub use finding_id::FindingId;
pub use findings::{
    DistinctCount, Example, Examples, FindingDetail, FindingSide, FindingSnapshot, TimelineEntry,
};
pub use ledger::{LedgerCounts, SESSION_SLOT_BYTES};
pub use outcome::{Refusal, RefusalCounts, SessionCommand};
pub use refresh::RefreshBatch;
pub use state::{EndKind, Millis, OwnerId, SessionKey, SessionSummary, TxnPhase};
pub use timeline::Role;
pub use violation::{
    Action, RequestEvidence, RuleId, Severity, StoreEvidence, ViolationRecord,
    SESSIONGUARD_VIOLATION_CODE, SESSIONGUARD_VIOLATION_CODE_NAME,
};
pub use web_store::{StoreConfig, StoreCounts, StoreStats};
