//! Session hygiene: the ledger of every logical session the proxy sees, the
//! rules that detect misuse, the violations they raise (and, in enforce
//! mode, the rejections), and the refresher that keeps held sessions alive.
//!
//! - [`config`]: `[sessions]` and `[rules.<id>]`, defaults, validation.
//! - [`state`]: one session's state machine (pure data and transitions).
//! - [`rules`]: one pure function per rule.
//! - [`violation`]: rule ids, severities, actions, violation records, the
//!   enforce error code.
//! - [`ledger`]: the bounded, shared map of sessions, cursors and held sessions.
//! - [`slab_map`]: the sharded map under the ledger (entries in fixed slab
//!   chunks, a small index), so a session costs its slot at every size.
//! - [`intern`]: small ids for names and client identities.
//! - [`store`]: web-session stores (`[stores]`): store documents by `_id`
//!   and `store-session-resurrected`.
//! - [`outcome`]: what waits on the server's reply: session commands and
//!   their refusals, effects held until ok:1, deferred concurrent-use verdicts.
//! - [`findings`]: violations grouped by bug (a stable fingerprint), the log
//!   policy (first in full, then periodic summaries), the kept examples.
//! - [`timeline`]: each connection's recent session operations, merged into
//!   a violation's timeline.
//! - [`engine`]: `SessionEngine`, the synchronous API the connection tasks call.
//! - [`inspector`]: `SessionEngine` as the proxy's `Inspector`.
//! - [`refresher`]: the background task that refreshes held sessions and
//!   runs the time-driven checks.
//!
//! Nothing here does network I/O except through the proxy's `Injector`, and
//! nothing here logs document contents.

pub mod config;
pub mod engine;
pub mod findings;
pub mod inspector;
pub mod intern;
pub mod ledger;
pub mod outcome;
pub mod refresher;
pub mod rules;
pub mod slab_map;
pub mod state;
pub mod store;
pub mod timeline;
pub mod violation;

pub use config::{Mode, RefreshPolicy, RulesConfig, SessionConfig};
pub use engine::{Decision, EngineStats, SessionEngine};
pub use findings::{
    DistinctCount, Example, Examples, FindingDetail, FindingId, FindingSide, FindingSnapshot,
    TimelineEntry,
};
pub use refresher::spawn_refresher;
pub use store::StoreConfig;
pub use violation::{
    Action, RuleId, Severity, StoreEvidence, ViolationRecord, SESSIONGUARD_VIOLATION_CODE,
    SESSIONGUARD_VIOLATION_CODE_NAME,
};
