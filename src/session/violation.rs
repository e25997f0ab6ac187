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

use super::findings::FindingId;
use super::state::{Millis, RequestRef, SessionKey};
use super::store::StoreFinding;

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

/// What a rule function returns: compact (ids, not names), cheap to build.
/// The engine stamps severity and action from the configuration and
/// resolves it into a [`ViolationRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: RuleId,
    pub key: SessionKey,
    pub at: Millis,
    /// What happened and why it is a problem, in words (no document contents).
    pub message: String,
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
    pub fn new(rule: RuleId, key: SessionKey, at: Millis, message: String) -> Violation {
        Violation {
            rule,
            key,
            at,
            message,
            current: None,
            earlier: None,
            store: None,
            unconfirmed: false,
        }
    }
    pub fn current(mut self, request: RequestRef) -> Violation {
        self.current = Some(request);
        self
    }
    /// The earlier request of the evidence; takes an `Option` too, for
    /// rules whose earlier request may be unknown.
    pub fn earlier(mut self, request: impl Into<Option<RequestRef>>) -> Violation {
        self.earlier = request.into();
        self
    }
    /// Marks it as resting on an unconfirmed effect (see `unconfirmed`).
    pub fn unconfirmed(mut self, unconfirmed: bool) -> Violation {
        self.unconfirmed = unconfirmed;
        self
    }
    /// The severity it is reported with: the rule's, at most a warning
    /// when it rests on an unconfirmed effect.
    pub fn severity(&self, configured: Severity) -> Severity {
        if self.unconfirmed {
            configured.min(Severity::Warning)
        } else {
            configured
        }
    }
    /// Whether it rejects its request under `action` (never when it rests
    /// on an unconfirmed effect).
    pub fn rejects(&self, action: Action) -> bool {
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
