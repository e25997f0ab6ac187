//! The engine's violation log: per-rule counters and the findings table
//! (`ViolationLog`), and the two log lines a violation can become (one in
//! full, or a finding's periodic summary). Never document contents.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use crate::findings::{FindingTable, Summary};
use crate::violation::{RuleId, Severity, ViolationRecord};

/// Violations: every one counted per rule, grouped into findings (which
/// keep the examples and the recent violations `violations()` lists).
#[derive(Debug)]
pub(super) struct ViolationLog {
    pub(super) findings: Mutex<FindingTable>,
    pub(super) next_id: AtomicU64,
    pub(super) per_rule: [AtomicU64; RuleId::COUNT],
}

/// The structured event of a finding's first violation: its finding, rule,
/// severity, short lsid, both requests' ids, peers, apps, drivers, users,
/// commands, namespaces, txnNumbers and times. No document contents.
pub(super) fn log_violation(record: &ViolationRecord) {
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
pub(super) fn log_summary(summary: &Summary) {
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
