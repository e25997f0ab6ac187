//! What a broken rule looks like: the stable rule ids (they appear in
//! metrics, logs, reports and config), severities and actions, the compact
//! `Violation` a rule function returns, and the self-contained
//! `ViolationRecord` it becomes once the engine has resolved ids into names
//! (for the log line, the bounded in-memory list and the admin API).
//!
//! It must never carry document contents: command names, namespaces, ids,
//! counts, peers, driver/application names and user names only.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::finding_id::FindingId;
use super::state::{ClientId, Millis, RequestRef, SessionKey};

/// The code of every reply sessionguard writes when it rejects a request.
///
/// Chosen far above every code the server assigns (named error codes stay
/// below 1,000; assertion location codes are below 20,000,000) and absent
/// from every list drivers act on: the retryable-writes and retryable-reads
/// lists, the SDAM "not writable primary" / "node is recovering" / shutdown
/// lists, the transactions spec's UnknownTransactionCommitResult codes and
/// the change-stream resumable codes. Together with the absence of any
/// `errorLabels`, a driver surfaces it to the application unchanged.
pub const SESSIONGUARD_VIOLATION_CODE: i32 = 741_100_001;

/// The `codeName` of a rejected request's reply.
pub const SESSIONGUARD_VIOLATION_CODE_NAME: &str = "SessionGuardViolation";

/// The rules, in the order of DESIGN.md's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleId {
    #[serde(rename = "concurrent-use")]
    ConcurrentUse,
    #[serde(rename = "use-after-end")]
    UseAfterEnd,
    #[serde(rename = "end-while-in-flight")]
    EndWhileInFlight,
    #[serde(rename = "closed-with-requests-in-flight")]
    ClosedWithRequestsInFlight,
    #[serde(rename = "txn-regression")]
    TxnRegression,
    #[serde(rename = "txn-number-reuse")]
    TxnNumberReuse,
    #[serde(rename = "txn-superseded")]
    TxnSuperseded,
    #[serde(rename = "txn-after-abort")]
    TxnAfterAbort,
    #[serde(rename = "txn-left-open")]
    TxnLeftOpen,
    #[serde(rename = "cursor-session-mismatch")]
    CursorSessionMismatch,
    #[serde(rename = "unacknowledged-with-session")]
    UnacknowledgedWithSession,
    #[serde(rename = "idle-expired-reuse")]
    IdleExpiredReuse,
    #[serde(rename = "cross-client-sharing")]
    CrossClientSharing,
    #[serde(rename = "store-session-resurrected")]
    StoreSessionResurrected,
}

impl RuleId {
    pub const ALL: [RuleId; 14] = [
        RuleId::ConcurrentUse,
        RuleId::UseAfterEnd,
        RuleId::EndWhileInFlight,
        RuleId::ClosedWithRequestsInFlight,
        RuleId::TxnRegression,
        RuleId::TxnNumberReuse,
        RuleId::TxnSuperseded,
        RuleId::TxnAfterAbort,
        RuleId::TxnLeftOpen,
        RuleId::CursorSessionMismatch,
        RuleId::UnacknowledgedWithSession,
        RuleId::IdleExpiredReuse,
        RuleId::CrossClientSharing,
        RuleId::StoreSessionResurrected,
    ];
    pub const COUNT: usize = RuleId::ALL.len();

    /// The stable id.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleId::ConcurrentUse => "concurrent-use",
            RuleId::UseAfterEnd => "use-after-end",
            RuleId::EndWhileInFlight => "end-while-in-flight",
            RuleId::ClosedWithRequestsInFlight => "closed-with-requests-in-flight",
            RuleId::TxnRegression => "txn-regression",
            RuleId::TxnNumberReuse => "txn-number-reuse",
            RuleId::TxnSuperseded => "txn-superseded",
            RuleId::TxnAfterAbort => "txn-after-abort",
            RuleId::TxnLeftOpen => "txn-left-open",
            RuleId::CursorSessionMismatch => "cursor-session-mismatch",
            RuleId::UnacknowledgedWithSession => "unacknowledged-with-session",
            RuleId::IdleExpiredReuse => "idle-expired-reuse",
            RuleId::CrossClientSharing => "cross-client-sharing",
            RuleId::StoreSessionResurrected => "store-session-resurrected",
        }
    }

    /// Position in `ALL` (for per-rule counters and settings arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The severity from DESIGN.md's table.
    pub fn default_severity(self) -> Severity {
        match self {
            RuleId::ClosedWithRequestsInFlight
            | RuleId::TxnLeftOpen
            | RuleId::UnacknowledgedWithSession
            | RuleId::IdleExpiredReuse => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// What a violation of the rule means and why it matters, in a few
    /// sentences: README's **Means:** paragraph of the rule, word for word
    /// (a test keeps them equal), so `demo` and the reports say what the
    /// README says.
    pub fn explain(self) -> &'static str {
        match self {
            RuleId::ConcurrentUse => {
                "a request carries an lsid that already has a request in flight, on any \
             connection. A session is a sequence of operations; the server does not serialise \
             two of them for you, and a transaction or retryable write on a session used \
             twice at once can be corrupted or lost."
            }
            RuleId::UseAfterEnd => {
                "a request carries an lsid that was ended by `endSessions` or killed by \
             `killSessions` / `killAllSessions` / `killAllSessionsByPattern`. The server does \
             not refuse it: it silently starts a new session under the same id, so the \
             application's transaction, retry and cursor guarantees no longer hold."
            }
            RuleId::EndWhileInFlight => {
                "`endSessions` or `killSessions` names an lsid that has a request in flight (on \
             another connection, when the end was sent), and the server confirmed the end. \
             The session was ended before the work using it finished."
            }
            RuleId::ClosedWithRequestsInFlight => {
                "a client closed (or reset) its connection while a request carrying a session \
             awaited its reply. The operation may keep running on the server while the \
             application believes it failed, and its session may be reused meanwhile."
            }
            RuleId::TxnRegression => {
                "a request carries a txnNumber lower than the highest already seen on its \
             session. The server refuses it (TransactionTooOld, 225) if it arrives after the \
             higher number; requests sent on different connections can reach the server in \
             either order, so it may instead run first and then be overtaken."
            }
            RuleId::TxnNumberReuse => {
                "a retryable write (a txnNumber outside any transaction) reuses an lsid + \
             txnNumber already used by a *different* write (different command, namespace or \
             statements). The server takes it for a retry of the earlier write and skips it: \
             the write is lost without an error."
            }
            RuleId::TxnSuperseded => {
                "a new transaction (or a retryable write — any higher txnNumber) starts on a \
             session whose previous transaction is still open without commit or abort. The \
             server silently aborts the open transaction; its writes are lost."
            }
            RuleId::TxnAfterAbort => {
                "statements or `commitTransaction` continue a transaction after the server \
             aborted it — its reply said TransientTransactionError or NoSuchTransaction. \
             Nothing in that transaction can succeed any more."
            }
            RuleId::TxnLeftOpen => {
                "a transaction has stayed open longer than `sessions.transaction_max_open` (60 s \
             by default, the server's `transactionLifetimeLimitSeconds`) with no commit or \
             abort. The server aborts it past its lifetime limit, losing its writes, and it \
             holds locks until then. Reported once per transaction."
            }
            RuleId::CursorSessionMismatch => {
                "a `getMore` (or `killCursors`) for a cursor under an lsid other than the one \
             that opened it, or a `getMore` without a session for a cursor opened under one. \
             The server refuses it, or the cursor's session is being shared."
            }
            RuleId::UnacknowledgedWithSession => {
                "a write with an unacknowledged write concern (`w: 0`) carries an lsid. Nobody \
             waits for it to finish, so the session can be reused while it still runs. \
             Drivers must not send an lsid with `w: 0`."
            }
            RuleId::IdleExpiredReuse => {
                "a session was used after being idle longer than the server's session timeout \
             (`logicalSessionTimeoutMinutes`, 30 by default, or `sessions.session_timeout`), \
             with no refresh in between. The server has expired it: its transaction and \
             cursors are gone and it continues as a new session. Reported once per idle \
             period."
            }
            RuleId::CrossClientSharing => {
                "one lsid used from two different client identities — a different peer host, \
             driver name or version, application name, or user. A session id must stay inside \
             the client that created it. Reported once per pair of identities. Only what both \
             sides show is compared; all loopback addresses count as one host."
            }
            RuleId::StoreSessionResurrected => {
                "an upsert (or insert) brought back a store document that had been destroyed \
             (deleted by `_id`) after the writing client had read it: a session loaded before \
             a logout was saved after it."
            }
        }
    }

    /// How to fix it: README's **Fix:** paragraph of the rule, word for word
    /// (a test keeps them equal).
    pub fn fix(self) -> &'static str {
        match self {
            RuleId::ConcurrentUse => {
                "give every unit of concurrent work its own session (`client.startSession()` per \
             request / task, ended in a `finally`), or let the driver use implicit sessions; \
             inside one session, `await` each operation before starting the next."
            }
            RuleId::UseAfterEnd => {
                "create the session where it is used and end it after the last operation that \
             uses it; never keep a session across client lifetimes or invocations; after a \
             kill, start a new session."
            }
            RuleId::EndWhileInFlight => {
                "`await` every operation before ending the session (`try { await op } finally { \
             await session.endSession() }`), and close the client only after all work has \
             completed."
            }
            RuleId::ClosedWithRequestsInFlight => {
                "await all work before closing the client; use `maxTimeMS` / operation timeouts \
             so the server stops slow operations instead of relying on the socket being cut."
            }
            RuleId::TxnRegression => {
                "never share a session between clients; let the driver number transactions."
            }
            RuleId::TxnNumberReuse => {
                "do not run writes concurrently on one session; await them one after another, or \
             give each its own session (or no explicit session at all)."
            }
            RuleId::TxnSuperseded => {
                "wrap transactions in the driver's `withTransaction` helper, or always end them \
             with `commitTransaction` / `abortTransaction` in a `finally`."
            }
            RuleId::TxnAfterAbort => {
                "let errors inside the transaction propagate so `withTransaction` can abort and \
             retry the whole transaction; if you catch, abort and restart it."
            }
            RuleId::TxnLeftOpen => {
                "keep transactions short and always end them (`withTransaction`, or commit/abort \
             in `finally`); do slow work before starting the transaction."
            }
            RuleId::CursorSessionMismatch => {
                "iterate a cursor with the session that opened it, and keep both in the same unit \
             of work."
            }
            RuleId::UnacknowledgedWithSession => {
                "use an acknowledged write concern with sessions, or send `w: 0` writes without a \
             session."
            }
            RuleId::IdleExpiredReuse => {
                "start a session for each unit of work instead of keeping one; read cursors \
             promptly, or let sessionguard's refresher keep held sessions alive \
             (`sessions.refresh = \"held\"`)."
            }
            RuleId::CrossClientSharing => {
                "never pass session ids between processes; each process starts its own sessions."
            }
            RuleId::StoreSessionResurrected => {
                "re-check the session after slow work before modifying it, save only modified \
             sessions (`resave: false`), and give a session a new id at login and destroy it \
             at logout; the patterns:"
            }
        }
    }
}

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RuleId {
    type Err = ();
    fn from_str(s: &str) -> Result<RuleId, ()> {
        RuleId::ALL
            .into_iter()
            .find(|rule| rule.as_str() == s)
            .ok_or(())
    }
}

/// How bad a violation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What sessionguard does about a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Report it; the request is forwarded.
    Log,
    /// Report it and answer the request with an error instead of forwarding
    /// it (only possible for a request that expects a reply).
    Reject,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Reject => "reject",
        }
    }
}

/// The store part of a violation's evidence (ids only, resolved later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoreFinding {
    /// The store's label (configured name, or `auto`).
    pub store: String,
    /// The document's fingerprint.
    pub document: String,
    pub read: RequestRef,
    pub destroy: RequestRef,
}

/// What a violation says, kept as data: the values its words quote beyond
/// the violation's own fields (session, time, the requests of its
/// evidence). `rules::wording` words it — with the time spans, names and
/// identities resolved then — only when a violation is logged, listed or
/// answers a rejected request, so a flood of one finding is counted
/// without formatting a message per violation. Copy, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Says {
    ConcurrentUse,
    /// Decided late (`current` repeated `earlier` exactly): both were
    /// answered (`None`), or the first was still unanswered this long after.
    ConcurrentUseConfirmed {
        unanswered_after: Option<Millis>,
    },
    UseAfterEnd {
        /// How the session ended ("ended by endSessions", ...).
        ended: &'static str,
    },
    EndWhileInFlight {
        verb: &'static str,
    },
    ClosedWithRequestsInFlight,
    TxnRegression {
        highest: i64,
    },
    TxnNumberReuse,
    TxnSuperseded {
        new_transaction: bool,
        open: i64,
        started_at: Millis,
        statements: u32,
    },
    TxnAfterAbort,
    TxnAfterAbortOnReply,
    TxnLeftOpen {
        number: i64,
        started_at: Millis,
        statements: u32,
        limit: Millis,
    },
    CursorSessionMismatch {
        cursor_id: i64,
        /// The session that opened the cursor.
        owner: SessionKey,
        /// The getMore carried no session at all.
        without_session: bool,
    },
    UnacknowledgedWithSession,
    IdleExpiredReuse {
        idle: Millis,
        timeout: Millis,
    },
    CrossClientSharing {
        first: ClientId,
        /// What differs between the two identities ("peer host", ...).
        field: &'static str,
    },
    /// Everything it quotes is in the violation's `store` and evidence.
    StoreSessionResurrected,
}

/// What a rule function returns: compact (ids, not names), cheap to build.
/// The engine stamps severity and action from the configuration and
/// resolves it into a [`ViolationRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    pub rule: RuleId,
    pub key: SessionKey,
    pub at: Millis,
    /// What happened, as data: put into words (`rules::wording`) only when
    /// the violation is logged, listed or answers a rejected request.
    pub says: Says,
    /// The request that broke the rule (absent for time-driven rules).
    pub current: Option<RequestRef>,
    /// The earlier request it conflicts with, when there is one.
    pub earlier: Option<RequestRef>,
    /// Web-session store rules: the store, the document's fingerprint and
    /// the read and destroy around the write in `current`.
    pub store: Option<Box<StoreFinding>>,
    /// It rests on an effect the server never confirmed (an endSessions
    /// whose reply never came): reported at most as a warning, never
    /// rejected, whatever the rule's configuration says.
    pub unconfirmed: bool,
}

impl Violation {
    pub(crate) fn new(rule: RuleId, key: SessionKey, at: Millis, says: Says) -> Violation {
        Violation {
            rule,
            key,
            at,
            says,
            current: None,
            earlier: None,
            store: None,
            unconfirmed: false,
        }
    }
    pub(crate) fn current(mut self, request: RequestRef) -> Violation {
        self.current = Some(request);
        self
    }
    /// The earlier request of the evidence; takes an `Option` too, for
    /// rules whose earlier request may be unknown.
    pub(crate) fn earlier(mut self, request: impl Into<Option<RequestRef>>) -> Violation {
        self.earlier = request.into();
        self
    }
    /// Marks it as resting on an unconfirmed effect (see `unconfirmed`).
    pub(crate) fn unconfirmed(mut self, unconfirmed: bool) -> Violation {
        self.unconfirmed = unconfirmed;
        self
    }
    /// The severity it is reported with: the rule's, at most a warning
    /// when it rests on an unconfirmed effect.
    pub(crate) fn severity(&self, configured: Severity) -> Severity {
        if self.unconfirmed {
            configured.min(Severity::Warning)
        } else {
            configured
        }
    }
    /// Whether it rejects its request under `action` (never when it rests
    /// on an unconfirmed effect).
    pub(crate) fn rejects(&self, action: Action) -> bool {
        action == Action::Reject && !self.unconfirmed
    }
}

/// One request of a violation's evidence, with every id resolved to names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestEvidence {
    pub connection_id: u64,
    pub request_id: i32,
    pub peer: Option<String>,
    pub app_name: Option<String>,
    pub driver: Option<String>,
    pub driver_version: Option<String>,
    pub user: Option<String>,
    pub command: String,
    pub namespace: String,
    pub txn_number: Option<i64>,
    /// RFC 3339 UTC time the request (or event) was seen.
    pub at: String,
}

/// A violation as logged, listed and served by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ViolationRecord {
    /// Increasing per process.
    pub id: u64,
    /// The finding it belongs to (see `findings`).
    pub finding: FindingId,
    pub rule: RuleId,
    pub severity: Severity,
    pub action: Action,
    /// Whether the request was actually rejected (a `reject` action on a
    /// request that expects no reply cannot be answered, so it is forwarded).
    pub rejected: bool,
    /// It rests on an effect the server never confirmed (an endSessions
    /// whose reply never came): `severity` is at most a warning and the
    /// request was not rejected.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    /// The full lsid (UUID form) and the short form used in log lines.
    pub lsid: String,
    pub lsid_short: String,
    /// The session's owner (`user@db`), when the proxy saw the authentication.
    pub owner: Option<String>,
    pub at: String,
    pub message: String,
    pub current: Option<RequestEvidence>,
    pub earlier: Option<RequestEvidence>,
    /// `store-session-resurrected`: the three operations on the store document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreEvidence>,
}

/// The store operations behind a `store-session-resurrected` violation: who
/// read the document, who destroyed it, who wrote it back. Never the
/// document's id or contents: the fingerprint is a per-process keyed hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreEvidence {
    /// The store's label: the `[stores] collections` entry, or `auto`.
    pub store: String,
    pub document: String,
    pub read: RequestEvidence,
    pub destroy: RequestEvidence,
    pub write: RequestEvidence,
}

/// A violation as the admin API serves it (`/violations`, and the examples
/// of `/findings/<id>`): the record with its requests under `evidence`.
#[derive(Debug, Clone, Serialize)]
pub struct ViolationJson<'a> {
    pub id: u64,
    pub finding: FindingId,
    pub rule: &'static str,
    pub severity: &'static str,
    pub action: &'static str,
    pub rejected: bool,
    /// Rests on an effect the server never confirmed (see `ViolationRecord`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unconfirmed: bool,
    pub lsid: &'a str,
    pub lsid_short: &'a str,
    pub owner: Option<&'a str>,
    pub at: &'a str,
    pub message: &'a str,
    pub evidence: EvidenceJson<'a>,
}

/// The requests of a [`ViolationJson`].
#[derive(Debug, Clone, Serialize)]
pub struct EvidenceJson<'a> {
    pub current: Option<&'a RequestEvidence>,
    pub earlier: Option<&'a RequestEvidence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<&'a StoreEvidence>,
}

impl ViolationRecord {
    /// Its admin API shape.
    pub fn json(&self) -> ViolationJson<'_> {
        ViolationJson {
            id: self.id,
            finding: self.finding,
            rule: self.rule.as_str(),
            severity: self.severity.as_str(),
            action: self.action.as_str(),
            rejected: self.rejected,
            unconfirmed: self.unconfirmed,
            lsid: &self.lsid,
            lsid_short: &self.lsid_short,
            owner: self.owner.as_deref(),
            at: &self.at,
            message: &self.message,
            evidence: EvidenceJson {
                current: self.current.as_ref(),
                earlier: self.earlier.as_ref(),
                store: self.store.as_ref(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_round_trip_and_are_unique() {
        for (index, rule) in RuleId::ALL.into_iter().enumerate() {
            assert_eq!(rule.index(), index);
            assert_eq!(rule.as_str().parse::<RuleId>(), Ok(rule));
            let json = serde_json::to_string(&rule).unwrap();
            assert_eq!(json, format!("\"{}\"", rule.as_str()));
        }
        assert!("no-such-rule".parse::<RuleId>().is_err());
    }

    #[test]
    fn default_severities_follow_the_design_table() {
        let warnings: Vec<_> = RuleId::ALL
            .into_iter()
            .filter(|rule| rule.default_severity() == Severity::Warning)
            .map(RuleId::as_str)
            .collect();
        assert_eq!(
            warnings,
            [
                "closed-with-requests-in-flight",
                "txn-left-open",
                "unacknowledged-with-session",
                "idle-expired-reuse"
            ]
        );
    }

    /// The paragraph of README's `### <rule>` section that starts with
    /// `**<label>:** `, its lines joined.
    fn readme_paragraph(readme: &str, rule: RuleId, label: &str) -> Option<String> {
        let heading = format!("\n### {rule}\n");
        let start = readme.find(&heading)? + heading.len();
        let section = &readme[start..];
        let section = &section[..section.find("\n### ").unwrap_or(section.len())];
        let marker = format!("**{label}:** ");
        let text = &section[section.find(&marker)? + marker.len()..];
        let text = &text[..text.find("\n\n").unwrap_or(text.len())];
        Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    #[test]
    fn explanations_and_fixes_are_the_readmes() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        for rule in RuleId::ALL {
            assert_eq!(
                readme_paragraph(readme, rule, "Means").as_deref(),
                Some(rule.explain()),
                "README's **Means:** of {rule} and RuleId::explain differ"
            );
            assert_eq!(
                readme_paragraph(readme, rule, "Fix").as_deref(),
                Some(rule.fix()),
                "README's **Fix:** of {rule} and RuleId::fix differ"
            );
        }
    }

    #[test]
    fn the_violation_code_is_on_no_driver_list() {
        // Retryable writes / reads, SDAM not-primary / recovering / shutdown,
        // UnknownTransactionCommitResult and change-stream resumable codes,
        // as listed by the specifications and the Rust, Node.js and Python
        // drivers.
        const DRIVER_CODES: &[i32] = &[
            6, 7, 43, 50, 63, 64, 89, 91, 133, 134, 150, 189, 234, 251, 262, 9001, 10058, 10107,
            11600, 11602, 13388, 13435, 13436, 20, 26, 112, 225, 244, 391,
        ];
        assert!(!DRIVER_CODES.contains(&SESSIONGUARD_VIOLATION_CODE));
        const { assert!(SESSIONGUARD_VIOLATION_CODE > 20_000_000) };
    }
}
