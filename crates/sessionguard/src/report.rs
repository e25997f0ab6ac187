//! The run summary a CI job reads: what the session engine saw between the
//! start and the end of a run (`sessionguard exec`, or `sessionguard proxy
//! --report` at shutdown), grouped by finding (one per bug), rendered as
//! JSON (a stable, versioned schema), as JUnit XML (one test case per
//! finding, one per rule that found nothing) and as a human summary (each
//! finding with its count and one example: message, requests, the session's
//! timeline, the fix), plus the exit-code policy that turns it into a pass
//! or a fail. The text of one finding ([`ReportedFinding::title`],
//! [`ReportedFinding::evidence_lines`], [`ReportedFinding::timeline_lines`])
//! is shared with `demo`.
//!
//! In `exec`, `Report::attribute` adds who caused each finding: the process
//! and the tests open in it when the offending request came
//! (`crate::attribution`); the text names them per finding, the JSON per
//! finding and per example, and JUnit gets one case per offending test
//! (classname = its file) before the per-finding and per-rule cases. JUnit
//! is built as a list of cases (`Report::junit_cases`) before it is
//! rendered.
//!
//! It only reads what the engine already recorded (rule ids, severities,
//! actions, lsids, times and request evidence: command names, namespaces,
//! ids, peers, driver and application names) and, in `exec`, test names,
//! files, pids and shortened command lines; it must never carry document
//! contents or credentials, and it does no I/O beyond writing a report file
//! it was asked to write.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::attribution::{test_label, Basis, Intervals, RequestAttribution, TestRef};
use crate::config::Config;
use crate::peer_process::Owner;
use crate::request_times::RequestTimes;
use sessionguard_engine::RequestEvidence;
use sessionguard_engine::ResolvedRules;
use sessionguard_engine::Role;
use sessionguard_engine::{
    FindingDetail, FindingId, FindingSide, FindingSnapshot, RuleId, SessionEngine, Severity,
    StoreEvidence, TimelineEntry, ViolationRecord,
};
use sessionguard_proxy::ConnectionString;

/// The JSON schema version; bumped only when a field changes meaning or
/// disappears (adding fields keeps it).
pub(crate) const REPORT_VERSION: u32 = 1;

/// Exit code when the child succeeded but violations reached `--fail-on`.
pub(crate) const EXIT_VIOLATIONS: u8 = 3;

/// The lowest severity that fails the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailOn {
    /// Error-severity violations fail the run.
    #[default]
    Error,
    /// Warning- and error-severity violations fail the run.
    Warning,
    /// Violations are reported, never fail the run.
    Never,
}

impl FailOn {
    /// Whether a violation of `severity` fails the run.
    pub fn fails(self, severity: Severity) -> bool {
        match self {
            FailOn::Error => severity >= Severity::Error,
            FailOn::Warning => severity >= Severity::Warning,
            FailOn::Never => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailOn::Error => "error",
            FailOn::Warning => "warning",
            FailOn::Never => "never",
        }
    }
}

/// How the child of `sessionguard exec` ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChildOutcome {
    /// The program only: its arguments may hold secrets.
    pub program: String,
    /// Its exit code; 128 + N when signal N ended it (as shells report it).
    pub exit_code: i32,
}

/// Facts about the run that the engine does not know.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo {
    pub started: SystemTime,
    pub finished: SystemTime,
    /// The upstream's host list (never the credentials).
    pub upstream: String,
    pub child: Option<ChildOutcome>,
    pub fail_on: FailOn,
}

/// The report, as serialized to JSON (field order is the schema's order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Report {
    pub version: u32,
    pub generator: String,
    pub started_at: String,
    pub finished_at: String,
    pub upstream: String,
    pub command: Option<ChildOutcome>,
    pub fail_on: FailOn,
    /// Whether violations at or above `fail_on` were seen.
    pub failed: bool,
    pub counts: Counts,
    /// Violations grouped by bug: failing severities first, then by first
    /// seen. The overflow finding (past `sessions.max_findings`) has no
    /// rule and no example.
    #[serde(default)]
    pub findings: Vec<ReportedFinding>,
    /// Oldest first; at most the engine's `max_violations` most recent.
    pub violations: Vec<ReportedViolation>,
    /// Violations counted but no longer held in memory (over `max_violations`).
    pub violations_omitted: u64,
    /// `exec`: the test marks received (absent outside `exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marks: Option<MarksSummary>,
}

/// What the marks endpoint received during the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarksSummary {
    pub received: u64,
    /// Distinct `(pid, file, test)`.
    pub tests: u64,
    pub processes: u64,
    /// Refused because the store was full.
    pub dropped: u64,
    /// Requests answered with an error (bad marks, wrong path, ...).
    pub rejected_requests: u64,
}

impl MarksSummary {
    pub(crate) fn of(
        marks: &[crate::marks::Mark],
        dropped: u64,
        rejected_requests: u64,
    ) -> MarksSummary {
        let tests: std::collections::HashSet<(u32, &str, &str)> = marks
            .iter()
            .map(|m| (m.pid, m.file.as_str(), m.test.as_str()))
            .collect();
        let processes: std::collections::HashSet<u32> = marks.iter().map(|m| m.pid).collect();
        MarksSummary {
            received: marks.len() as u64,
            tests: tests.len() as u64,
            processes: processes.len() as u64,
            dropped,
            rejected_requests,
        }
    }

    /// `test marks: 24 tests from 2 processes`, or what is missing.
    fn line(&self) -> String {
        let mut line = if self.received == 0 {
            "no test marks received: to name the test behind each finding, add the one line \
             for your test runner (integrations/README.md)"
                .to_string()
        } else {
            format!(
                "test marks: {} test{} from {} process{}",
                self.tests,
                plural(self.tests),
                self.processes,
                if self.processes == 1 { "" } else { "es" }
            )
        };
        if self.dropped > 0 {
            let _ = write!(line, "; {} marks dropped (store full)", self.dropped);
        }
        if self.rejected_requests > 0 {
            let _ = write!(
                line,
                "; {} requests to the marks endpoint refused",
                self.rejected_requests
            );
        }
        line
    }
}

/// Who sent the requests of a violation: process and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationAttribution {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<RequestAttribution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earlier: Option<RequestAttribution>,
}

impl ViolationAttribution {
    /// The tests that caused it: those of the offending request's process;
    /// and those of the earlier request's when it came from another
    /// process (or when there is no offending request: a close, a timeout).
    fn culprits(&self) -> Vec<(&TestRef, &RequestAttribution)> {
        let mut sides = Vec::new();
        if let Some(current) = &self.current {
            sides.push(current);
        }
        if let Some(earlier) = &self.earlier {
            let other_process = self
                .current
                .as_ref()
                .is_none_or(|current| current.pid.is_none() || current.pid != earlier.pid);
            if other_process {
                sides.push(earlier);
            }
        }
        sides
            .into_iter()
            .flat_map(|side| side.tests.iter().map(move |test| (test, side)))
            .collect()
    }
}

/// A test behind a finding, and how it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingTest {
    #[serde(flatten)]
    pub test: TestRef,
    pub basis: Basis,
    /// The process that sent the request (`pid N (cmdline)` or `unknown: why`).
    pub process: String,
}

/// What `exec` recorded to attribute findings (see `crate::attribution`).
pub(crate) struct AttributionInput<'a> {
    pub intervals: &'a Intervals,
    pub owners: &'a HashMap<u64, Owner>,
    pub times: &'a RequestTimes,
    pub marks: MarksSummary,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counts {
    /// Requests the engine inspected: 0 means the application never used the proxy.
    pub requests_inspected: u64,
    pub total: u64,
    /// `error`, `warning`, `info` (always present, possibly 0).
    pub by_severity: BTreeMap<String, u64>,
    /// Only rules that fired, by rule id.
    pub by_rule: BTreeMap<String, u64>,
}

/// One finding: the `/findings` fields and its first example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedFinding {
    #[serde(flatten)]
    pub finding: FindingSnapshot,
    /// Its first violation, with the session's timeline up to it; `null`
    /// for the overflow finding.
    pub first_example: Option<ReportedExample>,
    /// `exec` with test marks: the tests that caused it, over its first
    /// example and every violation of it still held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<FindingTest>,
}

/// A violation of a finding and the last operations on its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedExample {
    #[serde(flatten)]
    pub violation: ReportedViolation,
    /// Oldest first, up to and including the offending request (see
    /// `GET /findings/<id>`).
    pub timeline: Vec<TimelineEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedViolation {
    pub id: u64,
    /// The finding it belongs to (`findings[].fingerprint`).
    #[serde(default)]
    pub finding: FindingId,
    pub rule: RuleId,
    pub severity: Severity,
    pub action: String,
    /// Whether the request was answered with an error instead of forwarded.
    pub rejected: bool,
    pub lsid: String,
    pub owner: Option<String>,
    pub at: String,
    pub evidence: Evidence,
    /// `exec`: the process and the tests behind its requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<ViolationAttribution>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub message: String,
    /// The request that broke the rule (absent for time-driven rules).
    pub current: Option<RequestSeen>,
    /// The earlier request it conflicts with.
    pub earlier: Option<RequestSeen>,
    /// `store-session-resurrected`: the read, destroy and write of the store
    /// document (by fingerprint, never its id or contents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreEvidence>,
}

/// One request, by ids and names only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSeen {
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
    pub at: String,
}

impl From<&RequestEvidence> for RequestSeen {
    fn from(e: &RequestEvidence) -> RequestSeen {
        RequestSeen {
            connection_id: e.connection_id,
            request_id: e.request_id,
            peer: e.peer.clone(),
            app_name: e.app_name.clone(),
            driver: e.driver.clone(),
            driver_version: e.driver_version.clone(),
            user: e.user.clone(),
            command: e.command.clone(),
            namespace: e.namespace.clone(),
            txn_number: e.txn_number,
            at: e.at.clone(),
        }
    }
}

impl From<&ViolationRecord> for ReportedViolation {
    fn from(v: &ViolationRecord) -> ReportedViolation {
        ReportedViolation {
            id: v.id,
            finding: v.finding,
            rule: v.rule,
            severity: v.severity,
            action: v.action.as_str().to_string(),
            rejected: v.rejected,
            lsid: v.lsid.clone(),
            owner: v.owner.clone(),
            at: v.at.clone(),
            evidence: Evidence {
                message: v.message.clone(),
                current: v.current.as_ref().map(RequestSeen::from),
                earlier: v.earlier.as_ref().map(RequestSeen::from),
                store: v.store.clone(),
            },
            attribution: None,
        }
    }
}

impl From<&FindingDetail> for ReportedFinding {
    fn from(detail: &FindingDetail) -> ReportedFinding {
        ReportedFinding {
            finding: detail.finding.clone(),
            first_example: detail
                .examples
                .first
                .as_ref()
                .map(|example| ReportedExample {
                    violation: ReportedViolation::from(&example.violation),
                    timeline: example.timeline.clone(),
                }),
            tests: Vec::new(),
        }
    }
}

impl ReportedFinding {
    /// Whether it fails a run at `fail_on`, by the severity its violations
    /// were reported with. Never the overflow finding: the configured
    /// severity of the rules it hides decides (see `Report::new`).
    pub fn fails(&self, fail_on: FailOn) -> bool {
        self.finding.severity.is_some_and(|s| fail_on.fails(s))
    }

    /// The bug in one line, the same in every run: the rule, the offending
    /// request's command and namespace, the earlier request's command (and
    /// namespace, when another), and the client's application and driver —
    /// `concurrent-use: insert on shop.orders, earlier find (app web,
    /// nodejs)`; for a rule without an offending request, the earlier
    /// one's — `closed-with-requests-in-flight: insert on shop.orders (...)`.
    pub fn title(&self) -> String {
        let f = &self.finding;
        let Some(rule) = f.rule else {
            return "overflow: violations of findings past sessions.max_findings".to_string();
        };
        let mut title = rule.as_str().to_string();
        if let Some(current) = &f.current {
            let _ = write!(title, ": {} on {}", current.command, current.namespace);
        }
        match (&f.current, &f.earlier) {
            (Some(current), Some(earlier)) => {
                let _ = write!(title, ", earlier {}", earlier.command);
                if current.namespace != earlier.namespace {
                    let _ = write!(title, " on {}", earlier.namespace);
                }
            }
            // Rules without an offending request (a close, a timeout) name
            // the request they are about: the one in flight, the one that
            // started the transaction.
            (None, Some(earlier)) => {
                let _ = write!(title, ": {} on {}", earlier.command, earlier.namespace);
            }
            _ => {}
        }
        let client = |side: &FindingSide| {
            let mut parts = Vec::new();
            if let Some(app) = &side.app_name {
                parts.push(format!("app {app}"));
            }
            if let Some(driver) = &side.driver {
                parts.push(driver.clone());
            }
            parts.join(", ")
        };
        let current = f.current.as_ref().map(client).unwrap_or_default();
        let earlier = f.earlier.as_ref().map(client).unwrap_or_default();
        let clients = match (current.is_empty(), earlier.is_empty()) {
            (false, false) if current != earlier => format!("{current}; earlier {earlier}"),
            (false, _) => current,
            (true, _) => earlier,
        };
        if !clients.is_empty() {
            let _ = write!(title, " ({clients})");
        }
        title
    }

    /// `3 violations · 1 session · 4 connections · error`.
    pub fn tally(&self) -> String {
        let f = &self.finding;
        let distinct = |what: &str, n: &sessionguard_engine::DistinctCount| {
            format!(
                "{}{} {what}{}",
                if n.exact { "" } else { "at least " },
                n.count,
                plural(n.count)
            )
        };
        let mut tally = format!(
            "{} violation{} · {} · {}",
            f.count,
            plural(f.count),
            distinct("session", &f.sessions),
            distinct("connection", &f.connections)
        );
        if let Some(severity) = f.severity {
            let _ = write!(tally, " · {severity}");
        }
        tally
    }

    /// The first example's message, then its requests (`request: ...`,
    /// `earlier: ...`, and a web-session store's read, destroy and write).
    pub fn evidence_lines(&self) -> Vec<String> {
        let Some(example) = &self.first_example else {
            return vec![
                "no example kept: violations of findings past sessions.max_findings are only counted"
                    .to_string(),
            ];
        };
        let evidence = &example.violation.evidence;
        let attribution = example.violation.attribution.as_ref();
        let process = |side: Option<&RequestAttribution>| {
            side.map(|a| format!(" · {}", a.process))
                .unwrap_or_default()
        };
        let mut lines = vec![evidence.message.clone()];
        if let Some(current) = &evidence.current {
            lines.push(format!(
                "request: {}{}",
                request_line(current),
                process(attribution.and_then(|a| a.current.as_ref()))
            ));
        }
        if let Some(earlier) = &evidence.earlier {
            lines.push(format!(
                "earlier: {}{}",
                request_line(earlier),
                process(attribution.and_then(|a| a.earlier.as_ref()))
            ));
        }
        if let Some(store) = &evidence.store {
            for (what, request) in [
                ("read", &store.read),
                ("destroy", &store.destroy),
                ("write", &store.write),
            ] {
                let request = RequestSeen::from(request);
                lines.push(format!("store {what}: {}", request_line(&request)));
            }
        }
        lines
    }

    /// The first example's session timeline as aligned lines, times from
    /// its first operation: `+12ms  conn 4  request 7  find  shop.orders
    /// in flight  <- earlier request`. Empty when there is none.
    pub fn timeline_lines(&self) -> Vec<String> {
        let Some(example) = &self.first_example else {
            return Vec::new();
        };
        let timeline = &example.timeline;
        let Some(base) = timeline
            .first()
            .and_then(|op| humantime::parse_rfc3339(&op.sent).ok())
        else {
            return Vec::new();
        };
        let since = |at: &str| {
            humantime::parse_rfc3339(at)
                .ok()
                .and_then(|at| at.duration_since(base).ok())
                .map_or(0, |d| d.as_millis())
        };
        let rows: Vec<[String; 6]> = timeline
            .iter()
            .map(|op| {
                let sent = since(&op.sent);
                [
                    format!("+{sent}ms"),
                    format!("conn {}", op.connection_id),
                    format!("request {}", op.request_id),
                    op.command.clone(),
                    op.txn_number.map_or(op.namespace.clone(), |n| {
                        format!("{} txnNumber {n}", op.namespace)
                    }),
                    op.replied.as_deref().map_or("in flight".to_string(), |at| {
                        format!("answered in {}ms", since(at).saturating_sub(sent))
                    }),
                ]
            })
            .collect();
        let mut widths = [0usize; 6];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        rows.iter()
            .zip(timeline)
            .map(|(row, op)| {
                let mut line = format!("{:>w$}", row[0], w = widths[0]);
                for (cell, width) in row[1..].iter().zip(&widths[1..]) {
                    let _ = write!(line, "  {cell:<width$}");
                }
                match op.role {
                    Some(Role::Current) => line.push_str("  <- offending request"),
                    Some(Role::Earlier) => line.push_str("  <- earlier request"),
                    None => {}
                }
                line.trim_end().to_string()
            })
            .collect()
    }

    /// `exec` with attribution: one `test: <file> › <name> (pid N ...)`
    /// line per test that caused it, or, when none did, where its first
    /// example came from. Empty without attribution.
    pub fn test_lines(&self) -> Vec<String> {
        if !self.tests.is_empty() {
            return self
                .tests
                .iter()
                .map(|t| {
                    let how = match t.basis {
                        Basis::TimeWindowGuess => {
                            " — a time-window guess: the connection's process sent no marks"
                        }
                        Basis::ParentProcess => " — through a parent process",
                        Basis::Process | Basis::NoMarks => "",
                    };
                    format!("test: {} — {}{how}", test_label(&t.test), t.process)
                })
                .collect();
        }
        let side = self
            .first_example
            .as_ref()
            .and_then(|e| e.violation.attribution.as_ref())
            .and_then(|a| a.current.as_ref().or(a.earlier.as_ref()));
        match side {
            Some(side) => vec![format!(
                "test: none, {} — {}",
                side.tests_phrase(),
                side.process
            )],
            None => Vec::new(),
        }
    }

    /// The whole finding for a CI log: title, tally, evidence, timeline and
    /// the fix, one item per line, indented by `indent`.
    pub fn text(&self, indent: &str) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "{indent}{}", self.title());
        let _ = writeln!(
            text,
            "{indent}{} · finding {}",
            self.tally(),
            self.finding.fingerprint
        );
        for line in self.test_lines() {
            let _ = writeln!(text, "{indent}{line}");
        }
        for line in self.evidence_lines() {
            let _ = writeln!(text, "{indent}{line}");
        }
        let timeline = self.timeline_lines();
        if let Some(example) = &self.first_example {
            if !timeline.is_empty() {
                let _ = writeln!(
                    text,
                    "{indent}timeline of session {} up to the violation:",
                    short_lsid(&example.violation.lsid)
                );
                for line in timeline {
                    let _ = writeln!(text, "{indent}  {line}");
                }
            }
        }
        if let Some(rule) = self.finding.rule {
            let _ = writeln!(text, "{indent}fix: {}", rule.fix());
        }
        text
    }
}

/// One JUnit test case, before it is rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JunitCase {
    pub classname: String,
    pub name: String,
    pub outcome: CaseOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CaseOutcome {
    /// Nothing seen.
    Passed,
    /// Seen, below `fail_on`: passes, with what was seen in `<system-out>`.
    PassedWithOutput {
        summary: String,
        detail: String,
    },
    /// At or above `fail_on`.
    Failed {
        summary: String,
        severity: Severity,
        detail: String,
    },
    Skipped(&'static str),
}

/// The `classname` of the cases of findings.
pub(crate) const JUNIT_FINDINGS: &str = "sessionguard.findings";
/// The `classname` of a test's case when its runner gave no file.
pub(crate) const JUNIT_TESTS: &str = "sessionguard.tests";
/// The `classname` of the cases of rules that found nothing (or whose
/// violations all went to the overflow finding).
pub(crate) const JUNIT_RULES: &str = "sessionguard.rules";

impl Report {
    /// Everything the engine recorded, as of now.
    pub(crate) fn from_engine(
        info: RunInfo,
        engine: &SessionEngine,
        rules: &ResolvedRules,
    ) -> Report {
        // Findings before counts: a violation is counted before it is filed
        // under its finding, so the counts then cover every finding.
        let findings: Vec<FindingDetail> = engine
            .findings()
            .iter()
            .filter_map(|finding| engine.finding(finding.fingerprint))
            .collect();
        Report::new(
            info,
            rules,
            &engine.violations(),
            &engine.violation_counts(),
            &findings,
            engine.stats().requests_inspected,
        )
    }

    /// `violations` are the records still held; `counts` every violation
    /// since start per rule (it may exceed what is held); `findings` every
    /// finding with its first example.
    ///
    /// A finding counts with the severity its violations were reported
    /// with (an unconfirmed end makes an error rule's violation a warning);
    /// violations no finding holds (those of the overflow finding) with
    /// their rule's configured severity.
    pub(crate) fn new(
        info: RunInfo,
        rules: &ResolvedRules,
        violations: &[Arc<ViolationRecord>],
        counts: &[(RuleId, u64)],
        findings: &[FindingDetail],
        requests_inspected: u64,
    ) -> Report {
        let mut by_severity: BTreeMap<String, u64> = [Severity::Error, Severity::Warning]
            .into_iter()
            .chain([Severity::Info])
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        let mut findings: Vec<ReportedFinding> =
            findings.iter().map(ReportedFinding::from).collect();
        findings.sort_by(|a, b| {
            b.fails(info.fail_on)
                .cmp(&a.fails(info.fail_on))
                .then(b.finding.severity.cmp(&a.finding.severity))
                .then(a.finding.first_seen.cmp(&b.finding.first_seen))
                .then(a.finding.fingerprint.cmp(&b.finding.fingerprint))
        });
        let mut failed = false;
        let mut in_findings: BTreeMap<RuleId, u64> = BTreeMap::new();
        for finding in &findings {
            let (Some(rule), Some(severity)) = (finding.finding.rule, finding.finding.severity)
            else {
                continue;
            };
            *in_findings.entry(rule).or_default() += finding.finding.count;
            *by_severity
                .entry(severity.as_str().to_string())
                .or_default() += finding.finding.count;
            failed |= finding.fails(info.fail_on);
        }
        let mut by_rule = BTreeMap::new();
        let mut total = 0u64;
        for &(rule, count) in counts.iter().filter(|(_, count)| *count > 0) {
            by_rule.insert(rule.as_str().to_string(), count);
            total += count;
            let unfiled = count.saturating_sub(in_findings.get(&rule).copied().unwrap_or(0));
            if unfiled > 0 {
                let severity = rules.get(rule).severity;
                *by_severity
                    .entry(severity.as_str().to_string())
                    .or_default() += unfiled;
                failed |= info.fail_on.fails(severity);
            }
        }
        let violations: Vec<ReportedViolation> = violations
            .iter()
            .map(|v| ReportedViolation::from(v.as_ref()))
            .collect();
        // A record whose severity is above its finding's (it cannot be
        // today) must still be able to fail the run.
        failed |= violations.iter().any(|v| info.fail_on.fails(v.severity));
        let held = u64::try_from(violations.len()).unwrap_or(u64::MAX);
        Report {
            version: REPORT_VERSION,
            generator: format!("sessionguard {}", env!("CARGO_PKG_VERSION")),
            started_at: rfc3339(info.started),
            finished_at: rfc3339(info.finished),
            upstream: info.upstream,
            command: info.child,
            fail_on: info.fail_on,
            failed,
            counts: Counts {
                requests_inspected,
                total,
                by_severity,
                by_rule,
            },
            findings,
            violations_omitted: total.saturating_sub(held),
            violations,
            marks: None,
        }
    }

    /// Attributes every violation held and every finding's first example
    /// to the processes and tests that sent its requests, at the time the
    /// proxy received them (to the microsecond when `times` has it, else
    /// the engine's millisecond, a 2 ms window since the engine's clock
    /// starts mid-millisecond).
    pub(crate) fn attribute(&mut self, input: AttributionInput<'_>) {
        let attribute_request = |request: &RequestSeen| {
            let owner = input
                .owners
                .get(&request.connection_id)
                .cloned()
                .unwrap_or_else(|| {
                    Owner::Unknown("the connection's owner was not looked up".into())
                });
            let (lo, hi) = match input
                .times
                .received(request.connection_id, request.request_id)
            {
                Some(at) => (at, at),
                None => match humantime::parse_rfc3339(&request.at)
                    .ok()
                    .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                {
                    Some(at) => {
                        let ms = at.as_secs_f64() * 1000.0;
                        (ms, ms + 2.0)
                    }
                    None => (f64::MIN, f64::MAX),
                },
            };
            input.intervals.attribute(&owner, lo, hi)
        };
        let attribute = |violation: &mut ReportedViolation| {
            violation.attribution = Some(ViolationAttribution {
                current: violation.evidence.current.as_ref().map(attribute_request),
                earlier: violation.evidence.earlier.as_ref().map(attribute_request),
            });
        };
        self.violations.iter_mut().for_each(attribute);
        for finding in &mut self.findings {
            if let Some(example) = &mut finding.first_example {
                attribute(&mut example.violation);
            }
        }
        let violations = &self.violations;
        for finding in &mut self.findings {
            let mut tests: Vec<FindingTest> = Vec::new();
            let held = violations
                .iter()
                .filter(|v| v.finding == finding.finding.fingerprint);
            for violation in finding
                .first_example
                .as_ref()
                .map(|e| &e.violation)
                .into_iter()
                .chain(held)
            {
                let Some(attribution) = &violation.attribution else {
                    continue;
                };
                for (test, side) in attribution.culprits() {
                    if !tests
                        .iter()
                        .any(|t| t.test.file == test.file && t.test.test == test.test)
                    {
                        tests.push(FindingTest {
                            test: test.clone(),
                            basis: side.basis,
                            process: side.process.clone(),
                        });
                    }
                }
            }
            finding.tests = tests;
        }
        self.marks = Some(input.marks);
    }

    /// Pretty-printed JSON with a trailing newline.
    pub(crate) fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the report: {e}\"}}"));
        text.push('\n');
        text
    }

    /// Violations of `rule` that no finding holds (counted under the
    /// overflow finding).
    fn unfiled(&self, rule: RuleId) -> u64 {
        let count = self.counts.by_rule.get(rule.as_str()).copied().unwrap_or(0);
        let filed: u64 = self
            .findings
            .iter()
            .filter(|f| f.finding.rule == Some(rule))
            .map(|f| f.finding.count)
            .sum();
        count.saturating_sub(filed)
    }

    /// The JUnit test cases, rule by rule in the rules' order: one per
    /// finding of the rule (`sessionguard.findings`, named by
    /// [`ReportedFinding::title`] and its fingerprint; a `<failure>` at or
    /// above `fail_on`, else passing with the finding in `<system-out>`);
    /// one passing case named by the rule id (`sessionguard.rules`) when the
    /// rule found nothing, `<skipped>` when it is disabled; and a case by
    /// the rule id for violations only the overflow finding holds.
    pub(crate) fn junit_cases(&self, rules: &ResolvedRules) -> Vec<JunitCase> {
        let mut cases = self.junit_test_cases();
        for rule in RuleId::ALL {
            let settings = rules.get(rule);
            let rule_case = |outcome| JunitCase {
                classname: JUNIT_RULES.to_string(),
                name: rule.as_str().to_string(),
                outcome,
            };
            if !settings.enabled {
                cases.push(rule_case(CaseOutcome::Skipped(
                    "rule disabled in the configuration",
                )));
            }
            let mut found = false;
            for finding in self
                .findings
                .iter()
                .filter(|f| f.finding.rule == Some(rule))
            {
                found = true;
                let count = finding.finding.count;
                let summary = violations_of(count, rule, finding.finding.severity);
                let detail = finding.text("");
                let outcome = match finding.finding.severity {
                    Some(severity) if finding.fails(self.fail_on) => CaseOutcome::Failed {
                        summary,
                        severity,
                        detail,
                    },
                    _ => CaseOutcome::PassedWithOutput { summary, detail },
                };
                cases.push(JunitCase {
                    classname: JUNIT_FINDINGS.to_string(),
                    name: format!("{} [{}]", finding.title(), finding.finding.fingerprint),
                    outcome,
                });
            }
            let unfiled = self.unfiled(rule);
            if unfiled > 0 {
                let summary = violations_of(unfiled, rule, Some(settings.severity));
                let detail = "counted under the overflow finding (past sessions.max_findings): no example kept".to_string();
                cases.push(rule_case(if self.fail_on.fails(settings.severity) {
                    CaseOutcome::Failed {
                        summary,
                        severity: settings.severity,
                        detail,
                    }
                } else {
                    CaseOutcome::PassedWithOutput { summary, detail }
                }));
            } else if !found && settings.enabled {
                cases.push(rule_case(CaseOutcome::Passed));
            }
        }
        cases
    }

    /// One case per test that caused a finding (`exec` with marks), first
    /// in the report: classname = the test's file, name = its full name,
    /// so a CI system shows the culprit by name. A `<failure>` when one of
    /// its findings fails the run (message: the findings' titles; body:
    /// each finding with its example), else passing with them in
    /// `<system-out>`.
    fn junit_test_cases(&self) -> Vec<JunitCase> {
        let mut by_test: Vec<(&TestRef, Vec<(&ReportedFinding, &FindingTest)>)> = Vec::new();
        for finding in &self.findings {
            for culprit in &finding.tests {
                let key = &culprit.test;
                match by_test
                    .iter_mut()
                    .find(|(t, _)| t.file == key.file && t.test == key.test)
                {
                    Some((_, findings)) => findings.push((finding, culprit)),
                    None => by_test.push((key, vec![(finding, culprit)])),
                }
            }
        }
        by_test
            .into_iter()
            .map(|(test, findings)| {
                let guess = findings
                    .iter()
                    .all(|(_, c)| c.basis == Basis::TimeWindowGuess);
                let mut summary = findings
                    .iter()
                    .map(|(f, _)| f.title())
                    .collect::<Vec<_>>()
                    .join("; ");
                if guess {
                    summary = format!("time-window guess: {summary}");
                }
                let mut detail = String::new();
                for (finding, _) in &findings {
                    detail.push_str(&finding.text(""));
                    detail.push('\n');
                }
                let failing = findings
                    .iter()
                    .filter(|(f, _)| f.fails(self.fail_on))
                    .filter_map(|(f, _)| f.finding.severity)
                    .max();
                JunitCase {
                    classname: if test.file.is_empty() {
                        JUNIT_TESTS.to_string()
                    } else {
                        test.file.clone()
                    },
                    name: test.test.clone(),
                    outcome: match failing {
                        Some(severity) => CaseOutcome::Failed {
                            summary,
                            severity,
                            detail,
                        },
                        None => CaseOutcome::PassedWithOutput { summary, detail },
                    },
                }
            })
            .collect()
    }

    /// JUnit XML of [`Report::junit_cases`], in one test suite.
    pub(crate) fn to_junit(&self, rules: &ResolvedRules) -> String {
        let cases = self.junit_cases(rules);
        let failures = cases
            .iter()
            .filter(|c| matches!(c.outcome, CaseOutcome::Failed { .. }))
            .count();
        let skipped = cases
            .iter()
            .filter(|c| matches!(c.outcome, CaseOutcome::Skipped(_)))
            .count();
        let seconds = duration_seconds(&self.started_at, &self.finished_at);
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            xml,
            "<testsuites name=\"sessionguard\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{seconds:.3}\">",
            cases.len()
        );
        let _ = writeln!(
            xml,
            "  <testsuite name=\"sessionguard.session-hygiene\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{seconds:.3}\" timestamp=\"{}\">",
            cases.len(),
            xml_escape(&self.started_at)
        );
        for case in &cases {
            let _ = write!(
                xml,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"0\"",
                xml_escape(&case.classname),
                xml_escape(&case.name)
            );
            match &case.outcome {
                CaseOutcome::Passed => xml.push_str("/>\n"),
                CaseOutcome::Skipped(why) => {
                    let _ = writeln!(
                        xml,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                        xml_escape(why)
                    );
                }
                CaseOutcome::Failed {
                    summary,
                    severity,
                    detail,
                } => {
                    let _ = writeln!(
                        xml,
                        ">\n      <failure message=\"{}\" type=\"{severity}\">{}</failure>\n    </testcase>",
                        xml_escape(summary),
                        xml_escape(detail.trim_end())
                    );
                }
                CaseOutcome::PassedWithOutput { summary, detail } => {
                    let _ = writeln!(
                        xml,
                        ">\n      <system-out>{}\n{}</system-out>\n    </testcase>",
                        xml_escape(summary),
                        xml_escape(detail.trim_end())
                    );
                }
            }
        }
        xml.push_str("  </testsuite>\n</testsuites>\n");
        xml
    }

    /// For a terminal or a CI log: the verdict, then each finding with its
    /// count, its first example (message, requests, the session's
    /// timeline) and the fix.
    pub(crate) fn to_text(&self, _rules: &ResolvedRules) -> String {
        let mut text = String::new();
        let verdict = if self.failed {
            format!("FAIL (--fail-on {})", self.fail_on.as_str())
        } else {
            format!("pass (--fail-on {})", self.fail_on.as_str())
        };
        let requests = self.counts.requests_inspected;
        if self.counts.total == 0 {
            let _ = writeln!(
                text,
                "sessionguard: no session misuse seen in {requests} request{}: {verdict}",
                plural(requests),
            );
        } else {
            let fired = self.counts.by_rule.len() as u64;
            let findings = self.findings.len() as u64;
            let _ = writeln!(
                text,
                "sessionguard: {} violation{} in {findings} finding{} of {fired} rule{} ({} error, {} warning) in {requests} request{}: {verdict}",
                self.counts.total,
                plural(self.counts.total),
                plural(findings),
                plural(fired),
                self.counts.by_severity.get("error").copied().unwrap_or(0),
                self.counts.by_severity.get("warning").copied().unwrap_or(0),
                plural(requests),
            );
            if let Some(marks) = &self.marks {
                let _ = writeln!(text, "sessionguard: {}", marks.line());
            }
            for (index, finding) in self.findings.iter().enumerate() {
                let _ = writeln!(text, "\n[{}]", index + 1);
                text.push_str(&finding.text("  "));
            }
        }
        if self.counts.requests_inspected == 0 {
            text.push_str(
                "sessionguard: note: no request went through the proxy; does the program read the connection string from the environment variable?\n",
            );
        }
        text
    }

    /// Writes the JSON report to `path` (created or replaced).
    pub(crate) fn write_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_json())
    }

    /// Writes the JUnit XML report to `path` (created or replaced).
    pub(crate) fn write_junit(&self, path: &Path, rules: &ResolvedRules) -> std::io::Result<()> {
        std::fs::write(path, self.to_junit(rules))
    }
}
/// Writes the JSON report of a `sessionguard proxy` run, at shutdown: no
/// child, the default threshold.
pub fn write_proxy_report(
    path: &Path,
    started: SystemTime,
    config: &Config,
    engine: &SessionEngine,
) -> std::io::Result<()> {
    // The settings in force at shutdown: a reload may have changed them.
    let rules = engine.rules();
    let info = RunInfo {
        started,
        finished: SystemTime::now(),
        upstream: upstream_hosts(&config.proxy.upstream),
        child: None,
        fail_on: FailOn::default(),
    };
    Report::from_engine(info, engine, &rules).write_json(path)
}

/// The host list of a connection string, for reports: never its
/// credentials or options.
pub(crate) fn upstream_hosts(uri: &str) -> String {
    match ConnectionString::parse(uri) {
        Ok(parsed) => parsed
            .hosts
            .iter()
            .map(|host| host.to_string())
            .collect::<Vec<_>>()
            .join(","),
        Err(_) => "(invalid connection string)".to_string(),
    }
}

/// Checks before a run that a report can be written at `path` (its
/// directory exists, it is not a directory): finding out at the end would
/// waste the whole run.
pub fn check_output_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("empty path".to_string());
    }
    if path.is_dir() {
        return Err("is a directory".to_string());
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(format!("directory {} does not exist", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The exit-code policy: a failing child's own code wins (the test suite's
/// verdict comes first), else [`EXIT_VIOLATIONS`] when violations reached
/// `fail_on`, else 0. Codes outside 1..=255 are clamped to 1 so a failure
/// never reads as success.
pub(crate) fn exit_code(child_exit: Option<i32>, report: &Report) -> u8 {
    match child_exit {
        Some(code) if code != 0 => u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
        _ if report.failed => EXIT_VIOLATIONS,
        _ => 0,
    }
}

/// `3 violations of concurrent-use (severity error)`.
fn violations_of(count: u64, rule: RuleId, severity: Option<Severity>) -> String {
    let mut text = format!("{count} violation{} of {rule}", plural(count));
    if let Some(severity) = severity {
        let _ = write!(text, " (severity {severity})");
    }
    text
}

fn plural(count: u64) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// The short form of an lsid, as log lines show it.
fn short_lsid(lsid: &str) -> &str {
    lsid.get(..8).unwrap_or(lsid)
}

/// One request by names and ids: `insert shop.orders conn 3 request 12
/// txnNumber 4 app "web" driver nodejs 6.9.0 from 127.0.0.1:5000`.
fn request_line(r: &RequestSeen) -> String {
    let mut line = format!(
        "{} {} conn {} request {}",
        r.command, r.namespace, r.connection_id, r.request_id
    );
    if let Some(txn) = r.txn_number {
        let _ = write!(line, " txnNumber {txn}");
    }
    if let Some(app) = &r.app_name {
        let _ = write!(line, " app {app:?}");
    }
    if let Some(driver) = &r.driver {
        let _ = write!(line, " driver {driver}");
        if let Some(version) = &r.driver_version {
            let _ = write!(line, " {version}");
        }
    }
    if let Some(peer) = &r.peer {
        let _ = write!(line, " from {peer}");
    }
    line
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

fn duration_seconds(started: &str, finished: &str) -> f64 {
    match (
        humantime::parse_rfc3339(started),
        humantime::parse_rfc3339(finished),
    ) {
        (Ok(start), Ok(end)) => end
            .duration_since(start)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Escapes text for XML content and attributes, and drops characters XML
/// 1.0 cannot carry at all (control characters other than tab/newline/CR).
pub(crate) fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use sessionguard_engine::{Action, DistinctCount, Example, Examples};
    use sessionguard_engine::{Mode, RuleOverride, RulesConfig};

    fn evidence(command: &str) -> RequestEvidence {
        RequestEvidence {
            connection_id: 3,
            request_id: 12,
            peer: Some("127.0.0.1:5000".into()),
            app_name: Some("ci <&> \"app\"".into()),
            driver: Some("nodejs".into()),
            driver_version: Some("6.9.0".into()),
            user: None,
            command: command.into(),
            namespace: "shop.orders".into(),
            txn_number: Some(4),
            at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    fn record(id: u64, rule: RuleId, message: &str) -> Arc<ViolationRecord> {
        Arc::new(ViolationRecord {
            id,
            finding: FindingId::of_text(rule.as_str()),
            rule,
            severity: rule.default_severity(),
            action: Action::Log,
            rejected: false,
            unconfirmed: false,
            lsid: "6c1f1d9e-0000-4000-8000-000000000001".into(),
            lsid_short: "6c1f1d9e".into(),
            owner: None,
            at: "2026-01-01T00:00:01.000Z".into(),
            message: message.into(),
            current: Some(evidence("insert")),
            earlier: Some(evidence("endSessions")),
            store: None,
        })
    }

    fn info(fail_on: FailOn) -> RunInfo {
        let started = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        RunInfo {
            started,
            finished: started + Duration::from_millis(2500),
            upstream: "db:27017".into(),
            child: Some(ChildOutcome {
                program: "npm".into(),
                exit_code: 0,
            }),
            fail_on,
        }
    }

    fn counts(pairs: &[(RuleId, u64)]) -> Vec<(RuleId, u64)> {
        RuleId::ALL
            .into_iter()
            .map(|rule| {
                (
                    rule,
                    pairs.iter().find(|(r, _)| *r == rule).map_or(0, |p| p.1),
                )
            })
            .collect()
    }

    fn side(command: &str, namespace: &str) -> FindingSide {
        FindingSide {
            command: command.into(),
            namespace: namespace.into(),
            app_name: Some("ci <&> \"app\"".into()),
            driver: Some("nodejs".into()),
        }
    }

    fn op(request_id: i32, command: &str, sent_ms: u64, replied_ms: Option<u64>) -> TimelineEntry {
        let at = |ms: u64| format!("2026-01-01T00:00:00.{ms:03}Z");
        TimelineEntry {
            connection_id: 3,
            request_id,
            command: command.into(),
            namespace: "shop.orders".into(),
            txn_number: None,
            sent: at(sent_ms),
            replied: replied_ms.map(at),
            role: None,
        }
    }

    /// The finding of `example` (its fingerprint, rule and severity), seen
    /// `count` times, first at `first_seen`.
    fn finding(
        example: &ViolationRecord,
        count: u64,
        first_seen: &str,
        timeline: Vec<TimelineEntry>,
    ) -> FindingDetail {
        let one = DistinctCount {
            count: 1,
            exact: true,
        };
        FindingDetail {
            finding: FindingSnapshot {
                fingerprint: example.finding,
                overflow: false,
                rule: Some(example.rule),
                severity: Some(example.severity),
                action: Some(example.action),
                current: example
                    .current
                    .as_ref()
                    .map(|r| side(&r.command, &r.namespace)),
                earlier: example
                    .earlier
                    .as_ref()
                    .map(|r| side(&r.command, &r.namespace)),
                count,
                first_seen: first_seen.into(),
                last_seen: first_seen.into(),
                sessions: one,
                connections: one,
            },
            examples: Examples {
                first: Some(Example {
                    violation: example.clone(),
                    timeline,
                }),
                latest: None,
            },
        }
    }

    /// A use-after-end (error) seen twice and a txn-left-open (warning)
    /// seen once, each its own finding.
    fn sample(fail_on: FailOn) -> Report {
        let violations = vec![
            record(1, RuleId::UseAfterEnd, "session used after endSessions"),
            record(2, RuleId::UseAfterEnd, "again"),
            record(3, RuleId::TxnLeftOpen, "open for 61s"),
        ];
        let mut timeline = vec![
            op(10, "insert", 0, Some(2)),
            op(11, "endSessions", 5, Some(6)),
            op(12, "insert", 900, None),
        ];
        timeline[1].role = Some(Role::Earlier);
        timeline[2].role = Some(Role::Current);
        timeline[2].txn_number = Some(4);
        let findings = [
            finding(&violations[2], 1, "2026-01-01T00:00:00.500Z", Vec::new()),
            finding(&violations[0], 2, "2026-01-01T00:00:01.000Z", timeline),
        ];
        Report::new(
            info(fail_on),
            &ResolvedRules::default(),
            &violations,
            &counts(&[(RuleId::UseAfterEnd, 2), (RuleId::TxnLeftOpen, 1)]),
            &findings,
            40,
        )
    }

    #[test]
    fn fail_on_thresholds() {
        assert!(FailOn::Error.fails(Severity::Error));
        assert!(!FailOn::Error.fails(Severity::Warning));
        assert!(FailOn::Warning.fails(Severity::Warning));
        assert!(FailOn::Warning.fails(Severity::Error));
        assert!(!FailOn::Warning.fails(Severity::Info));
        assert!(!FailOn::Never.fails(Severity::Error));
    }

    #[test]
    fn counts_by_rule_and_severity() {
        let report = sample(FailOn::Error);
        assert_eq!(report.counts.total, 3);
        assert_eq!(report.counts.by_severity["error"], 2);
        assert_eq!(report.counts.by_severity["warning"], 1);
        assert_eq!(report.counts.by_severity["info"], 0);
        assert_eq!(report.counts.by_rule.len(), 2);
        assert_eq!(report.counts.by_rule["use-after-end"], 2);
        assert!(report.failed);
        assert_eq!(report.violations_omitted, 0);
        // The failing finding first, although the warning was seen earlier.
        let rules: Vec<_> = report.findings.iter().map(|f| f.finding.rule).collect();
        assert_eq!(
            rules,
            [Some(RuleId::UseAfterEnd), Some(RuleId::TxnLeftOpen)]
        );
        let report = sample(FailOn::Warning);
        let rules: Vec<_> = report.findings.iter().map(|f| f.finding.rule).collect();
        assert_eq!(
            rules,
            [Some(RuleId::UseAfterEnd), Some(RuleId::TxnLeftOpen)],
            "both fail: errors first"
        );
        assert_eq!(report.started_at, "2027-01-15T08:00:00.000Z");
        assert_eq!(report.finished_at, "2027-01-15T08:00:02.500Z");
    }

    #[test]
    fn json_round_trips_with_the_documented_fields() {
        let report = sample(FailOn::Warning);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["fail_on"], "warning");
        assert_eq!(json["failed"], true);
        assert_eq!(json["command"]["program"], "npm");
        let first = &json["violations"][0];
        for key in ["rule", "severity", "action", "lsid", "at", "evidence"] {
            assert!(!first[key].is_null(), "{key} missing: {first}");
        }
        assert_eq!(first["rule"], "use-after-end");
        assert_eq!(first["evidence"]["current"]["command"], "insert");
        assert_eq!(first["evidence"]["earlier"]["command"], "endSessions");
        assert_eq!(
            first["finding"],
            FindingId::of_text("use-after-end").to_string()
        );

        let finding = &json["findings"][0];
        for key in [
            "fingerprint",
            "rule",
            "severity",
            "action",
            "current",
            "earlier",
            "count",
            "first_seen",
            "last_seen",
            "sessions",
            "connections",
            "first_example",
        ] {
            assert!(!finding[key].is_null(), "{key} missing: {finding:#}");
        }
        assert_eq!(finding["rule"], "use-after-end");
        assert_eq!(finding["count"], 2);
        assert_eq!(finding["current"]["command"], "insert");
        let example = &finding["first_example"];
        assert_eq!(example["id"], 1);
        assert_eq!(
            example["evidence"]["message"],
            "session used after endSessions"
        );
        assert_eq!(example["timeline"][1]["command"], "endSessions");
        assert_eq!(example["timeline"][1]["role"], "earlier");
        assert!(example["timeline"][0].get("role").is_none());
        assert!(json["findings"][1]["first_example"]["timeline"]
            .as_array()
            .unwrap()
            .is_empty());
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn junit_has_a_case_per_finding_and_per_rule_that_found_nothing() {
        let report = sample(FailOn::Error);
        let cases = report.junit_cases(&ResolvedRules::default());
        assert_eq!(cases.len(), RuleId::COUNT, "two findings, 12 quiet rules");
        let findings: Vec<_> = cases
            .iter()
            .filter(|c| c.classname == JUNIT_FINDINGS)
            .collect();
        assert_eq!(findings.len(), 2);
        let use_after_end = FindingId::of_text("use-after-end");
        assert_eq!(
            findings[0].name,
            format!(
                "use-after-end: insert on shop.orders, earlier endSessions (app ci <&> \"app\", nodejs) [{use_after_end}]"
            )
        );
        let quiet: Vec<_> = cases
            .iter()
            .filter(|c| c.classname == JUNIT_RULES)
            .map(|c| (c.name.as_str(), &c.outcome))
            .collect();
        assert_eq!(quiet.len(), 12);
        assert!(quiet.iter().all(|(_, o)| **o == CaseOutcome::Passed));
        assert!(!quiet.iter().any(|(name, _)| *name == "use-after-end"));

        let xml = report.to_junit(&ResolvedRules::default());
        assert_eq!(xml.matches("<testcase ").count(), RuleId::COUNT);
        assert_eq!(xml.matches("<failure ").count(), 1);
        assert!(xml.contains("failures=\"1\""));
        // The name carries every character XML needs escaped.
        let failing = xml
            .split(&format!(
                "name=\"use-after-end: insert on shop.orders, earlier endSessions (app ci &lt;&amp;&gt; &quot;app&quot;, nodejs) [{use_after_end}]\""
            ))
            .nth(1)
            .unwrap_or_else(|| panic!("{xml}"));
        let failing = &failing[..failing.find("</testcase>").unwrap()];
        assert!(
            failing.contains(
                "<failure message=\"2 violations of use-after-end (severity error)\" type=\"error\">"
            ),
            "{failing}"
        );
        // The first example: message, requests, timeline, fix.
        assert!(
            failing.contains("session used after endSessions"),
            "{failing}"
        );
        assert!(
            failing.contains("request: insert shop.orders conn 3 request 12"),
            "{failing}"
        );
        assert!(failing.contains("earlier: endSessions"), "{failing}");
        assert!(failing.contains("+900ms"), "{failing}");
        assert!(failing.contains("&lt;- offending request"), "{failing}");
        assert!(failing.contains(RuleId::UseAfterEnd.fix()), "{failing}");
        assert!(!failing.contains("again"), "one example: {failing}");
        let warning = xml.split("name=\"txn-left-open: ").nth(1).unwrap();
        let warning = &warning[..warning.find("</testcase>").unwrap()];
        assert!(
            warning.contains("<system-out>1 violation of txn-left-open (severity warning)"),
            "{warning}"
        );

        let xml = sample(FailOn::Warning).to_junit(&ResolvedRules::default());
        assert_eq!(xml.matches("<failure ").count(), 2);
        let xml = sample(FailOn::Never).to_junit(&ResolvedRules::default());
        assert_eq!(xml.matches("<failure ").count(), 0);
    }

    #[test]
    fn a_finding_fails_by_the_severity_it_was_reported_with() {
        // An error rule's violation resting on an unconfirmed end is a
        // warning: it does not fail `--fail-on error`.
        let mut record = ViolationRecord::clone(&record(1, RuleId::UseAfterEnd, "unconfirmed"));
        record.severity = Severity::Warning;
        record.unconfirmed = true;
        record.finding = FindingId::of_text("unconfirmed");
        let violations = [Arc::new(record)];
        let findings = [finding(
            &violations[0],
            1,
            "2026-01-01T00:00:01.000Z",
            Vec::new(),
        )];
        let counts = counts(&[(RuleId::UseAfterEnd, 1)]);
        let rules = ResolvedRules::default();
        let report = Report::new(
            info(FailOn::Error),
            &rules,
            &violations,
            &counts,
            &findings,
            5,
        );
        assert!(!report.failed);
        assert_eq!(report.counts.by_severity["warning"], 1);
        assert_eq!(report.counts.by_severity["error"], 0);
        assert_eq!(report.to_junit(&rules).matches("<failure ").count(), 0);
        let report = Report::new(
            info(FailOn::Warning),
            &rules,
            &violations,
            &counts,
            &findings,
            5,
        );
        assert!(report.failed);
        assert_eq!(report.to_junit(&rules).matches("<failure ").count(), 1);
    }

    #[test]
    fn violations_only_the_overflow_finding_holds_still_fail_by_rule() {
        // concurrent-use fired 5 times: 2 in its finding, 3 past
        // max_findings (the overflow finding, which has no rule).
        let violations = [record(1, RuleId::ConcurrentUse, "two at once")];
        let overflow = FindingDetail {
            finding: FindingSnapshot {
                fingerprint: FindingId::overflow(),
                overflow: true,
                rule: None,
                severity: None,
                action: None,
                current: None,
                earlier: None,
                ..finding(&violations[0], 3, "2026-01-01T00:00:02.000Z", Vec::new()).finding
            },
            examples: Examples {
                first: None,
                latest: None,
            },
        };
        let findings = [
            finding(&violations[0], 2, "2026-01-01T00:00:01.000Z", Vec::new()),
            overflow,
        ];
        let rules = ResolvedRules::default();
        let report = Report::new(
            info(FailOn::Error),
            &rules,
            &violations,
            &counts(&[(RuleId::ConcurrentUse, 5)]),
            &findings,
            10,
        );
        assert!(report.failed);
        assert_eq!(report.counts.by_severity["error"], 5);
        let cases = report.junit_cases(&rules);
        let of_rule: Vec<_> = cases
            .iter()
            .filter(|c| c.name.starts_with("concurrent-use"))
            .collect();
        assert_eq!(of_rule.len(), 2, "{of_rule:?}");
        assert_eq!(of_rule[0].classname, JUNIT_FINDINGS);
        assert_eq!(of_rule[1].classname, JUNIT_RULES);
        assert!(matches!(
            &of_rule[1].outcome,
            CaseOutcome::Failed { summary, .. } if summary == "3 violations of concurrent-use (severity error)"
        ));
        let text = report.to_text(&rules);
        assert!(
            text.contains("overflow: violations of findings past sessions.max_findings"),
            "{text}"
        );
        assert!(text.contains("no example kept"), "{text}");
    }

    #[test]
    fn junit_marks_disabled_rules_skipped() {
        let mut config = RulesConfig::default();
        config.rules.insert(
            "idle-expired-reuse".into(),
            RuleOverride {
                enabled: Some(false),
                ..RuleOverride::default()
            },
        );
        let rules = ResolvedRules::resolve(Mode::Observe, &config);
        let xml = sample(FailOn::Error).to_junit(&rules);
        assert_eq!(xml.matches("<skipped ").count(), 1);
        assert!(xml.contains("skipped=\"1\""));
    }

    #[test]
    fn junit_is_well_formed() {
        // A minimal well-formedness check: every element opened is closed in
        // order, and no raw `&` or `<` sits inside text or attributes.
        let xml = sample(FailOn::Warning).to_junit(&ResolvedRules::default());
        let body = xml.split_once("?>").unwrap().1;
        let mut stack: Vec<String> = Vec::new();
        let mut rest = body;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            assert!(!text.contains('>'), "stray '>' in {text:?}");
            for (i, _) in text.match_indices('&') {
                let entity = &text[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                        .iter()
                        .any(|e| entity.starts_with(e)),
                    "raw & in {text:?}"
                );
            }
            let close = open + rest[open..].find('>').unwrap();
            let tag = &rest[open + 1..close];
            assert!(!tag.contains('<'), "'<' inside a tag: {tag}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name));
            } else if !tag.ends_with('/') {
                stack.push(tag.split_whitespace().next().unwrap().to_string());
            }
            rest = &rest[close + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
    }

    #[test]
    fn text_lists_each_finding_with_count_example_timeline_and_fix() {
        let text = sample(FailOn::Error).to_text(&ResolvedRules::default());
        assert!(
            text.starts_with(
                "sessionguard: 3 violations in 2 findings of 2 rules (2 error, 1 warning) in 40 requests: FAIL"
            ),
            "{text}"
        );
        let first = &text[text.find("[1]").unwrap()..text.find("[2]").unwrap()];
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(
            lines[1],
            "  use-after-end: insert on shop.orders, earlier endSessions (app ci <&> \"app\", nodejs)"
        );
        assert_eq!(
            lines[2],
            format!(
                "  2 violations · 1 session · 1 connection · error · finding {}",
                FindingId::of_text("use-after-end")
            )
        );
        assert_eq!(lines[3], "  session used after endSessions");
        assert!(
            lines[4].starts_with("  request: insert shop.orders conn 3 request 12 txnNumber 4"),
            "{first}"
        );
        assert!(lines[5].starts_with("  earlier: endSessions"), "{first}");
        assert_eq!(
            lines[6],
            "  timeline of session 6c1f1d9e up to the violation:"
        );
        assert_eq!(
            &lines[7..10],
            [
                "      +0ms  conn 3  request 10  insert       shop.orders              answered in 2ms",
                "      +5ms  conn 3  request 11  endSessions  shop.orders              answered in 1ms  <- earlier request",
                "    +900ms  conn 3  request 12  insert       shop.orders txnNumber 4  in flight        <- offending request",
            ]
        );
        assert_eq!(lines[10], format!("  fix: {}", RuleId::UseAfterEnd.fix()));
        assert!(!text.contains("again"), "only the first example: {text}");
        let second = &text[text.find("[2]").unwrap()..];
        assert!(second.contains("txn-left-open"), "{second}");
        assert!(!second.contains("timeline"), "none kept: {second}");

        let empty = Report::new(
            info(FailOn::Error),
            &ResolvedRules::default(),
            &[],
            &counts(&[]),
            &[],
            0,
        );
        let text = empty.to_text(&ResolvedRules::default());
        assert!(
            text.contains("no session misuse seen in 0 requests: pass"),
            "{text}"
        );
        assert!(text.contains("no request went through the proxy"), "{text}");
    }

    /// 2026-01-01T00:00:00.000Z, when `sample`'s requests were seen.
    const SAMPLE_AT: f64 = 1_767_225_600_000.0;

    fn attributed(owners: &[(u64, Owner)]) -> Report {
        use crate::marks::{Event, Mark};
        let mark = |event, pid, file: &str, test: &str, offset: f64| Mark {
            event,
            test: test.into(),
            file: file.into(),
            pid,
            time: SAMPLE_AT + offset,
        };
        let marks = [
            mark(
                Event::Begin,
                4242,
                "test/orders.test.js",
                "orders inserts one",
                -10.0,
            ),
            mark(
                Event::End,
                4242,
                "test/orders.test.js",
                "orders inserts one",
                0.6,
            ),
            mark(
                Event::Begin,
                4242,
                "test/orders.test.js",
                "orders inserts two",
                0.7,
            ),
            mark(
                Event::End,
                4242,
                "test/orders.test.js",
                "orders inserts two",
                30.0,
            ),
            // Another worker, at the same time.
            mark(
                Event::Begin,
                5000,
                "test/users.test.js",
                "users logs in",
                -5.0,
            ),
            mark(Event::End, 5000, "test/users.test.js", "users logs in", 5.0),
        ];
        let intervals = Intervals::from_marks(&marks);
        let times = RequestTimes::default();
        // Received half a millisecond in: the engine's millisecond alone
        // could not tell "inserts one" from "inserts two".
        times.stamp_at(
            3,
            12,
            std::time::UNIX_EPOCH + Duration::from_micros(1_767_225_600_000_500),
        );
        let mut report = sample(FailOn::Error);
        report.attribute(AttributionInput {
            intervals: &intervals,
            owners: &owners.iter().cloned().collect(),
            times: &times,
            marks: MarksSummary::of(&marks, 0, 0),
        });
        report
    }

    fn jest_worker() -> Owner {
        Owner::Known(crate::peer_process::ProcessInfo {
            pid: 4242,
            cmdline: "node .../jest-worker/build/processChild.js".into(),
            parents: vec![4200],
        })
    }

    #[test]
    fn findings_name_the_test_and_process_that_caused_them() {
        let report = attributed(&[(3, jest_worker())]);
        let rules = ResolvedRules::default();
        let text = report.to_text(&rules);
        assert!(
            text.contains("sessionguard: test marks: 3 tests from 2 processes\n"),
            "{text}"
        );
        assert!(
            text.contains("\n  test: test/orders.test.js › orders inserts one — pid 4242 (node .../jest-worker/build/processChild.js)\n"),
            "{text}"
        );
        assert!(
            text.contains("request: insert shop.orders conn 3 request 12 txnNumber 4 app \"ci <&> \\\"app\\\"\" driver nodejs 6.9.0 from 127.0.0.1:5000 · pid 4242 (node"),
            "{text}"
        );
        assert!(!text.contains("users logs in"), "another worker: {text}");
        assert!(!text.contains("inserts two"), "the next test: {text}");

        let cases = report.junit_cases(&rules);
        let tests: Vec<_> = cases
            .iter()
            .filter(|c| c.classname.starts_with("test/"))
            .collect();
        assert_eq!(tests.len(), 1, "{tests:?}");
        assert_eq!(tests[0].classname, "test/orders.test.js");
        assert_eq!(tests[0].name, "orders inserts one");
        let CaseOutcome::Failed {
            summary, detail, ..
        } = &tests[0].outcome
        else {
            panic!("{:?}", tests[0].outcome)
        };
        assert!(
            summary.starts_with("use-after-end: insert on shop.orders"),
            "{summary}"
        );
        assert!(
            summary.contains("; txn-left-open"),
            "both its findings: {summary}"
        );
        assert!(
            detail.contains("session used after endSessions"),
            "{detail}"
        );
        assert!(detail.contains("timeline of session"), "{detail}");
        // The per-rule cases as before, after the tests'.
        assert_eq!(cases.len(), RuleId::COUNT + 1);
        assert_eq!(
            cases
                .iter()
                .filter(|c| c.classname == JUNIT_FINDINGS)
                .count(),
            2
        );
        let xml = report.to_junit(&rules);
        assert!(
            xml.contains("<testcase classname=\"test/orders.test.js\" name=\"orders inserts one\" time=\"0\">\n      <failure message=\"use-after-end: insert on shop.orders"),
            "{xml}"
        );
        assert_eq!(
            xml.matches("<failure ").count(),
            2,
            "the test and the finding"
        );

        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let finding = &json["findings"][0];
        assert_eq!(finding["tests"][0]["test"], "orders inserts one");
        assert_eq!(finding["tests"][0]["file"], "test/orders.test.js");
        assert_eq!(finding["tests"][0]["pid"], 4242);
        assert_eq!(finding["tests"][0]["basis"], "process");
        assert_eq!(finding["tests"].as_array().unwrap().len(), 1);
        let current = &finding["first_example"]["attribution"]["current"];
        assert_eq!(current["pid"], 4242);
        assert_eq!(current["tests"][0]["test"], "orders inserts one");
        assert_eq!(
            json["violations"][0]["attribution"]["current"]["basis"],
            "process"
        );
        assert_eq!(json["marks"]["received"], 6);
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn an_unknown_owner_gives_a_labelled_time_window_guess() {
        let report = attributed(&[(
            3,
            Owner::Unknown("connection from another host (10.0.0.5)".into()),
        )]);
        let rules = ResolvedRules::default();
        let text = report.to_text(&rules);
        assert!(
            text.contains("test: test/orders.test.js › orders inserts one — unknown: connection from another host (10.0.0.5) — a time-window guess"),
            "{text}"
        );
        assert!(
            text.contains("test: test/users.test.js › users logs in"),
            "{text}"
        );
        let cases = report.junit_cases(&rules);
        let guessed: Vec<_> = cases
            .iter()
            .filter(|c| c.classname.starts_with("test/"))
            .collect();
        assert_eq!(guessed.len(), 2);
        assert!(guessed.iter().all(|c| matches!(
            &c.outcome,
            CaseOutcome::Failed { summary, .. } if summary.starts_with("time-window guess: ")
        )));
    }

    #[test]
    fn without_marks_the_report_says_how_to_get_them() {
        let mut report = attributed(&[(3, jest_worker())]);
        let intervals = Intervals::from_marks(&[]);
        report.attribute(AttributionInput {
            intervals: &intervals,
            owners: &[(3, jest_worker())].into_iter().collect(),
            times: &RequestTimes::default(),
            marks: MarksSummary::of(&[], 0, 0),
        });
        let text = report.to_text(&ResolvedRules::default());
        assert!(
            text.contains("test: none, no test marks received — pid 4242"),
            "{text}"
        );
        assert!(
            text.contains("no test marks received: to name the test"),
            "{text}"
        );
        assert!(report
            .junit_cases(&ResolvedRules::default())
            .iter()
            .all(|c| !c.classname.starts_with("test/")));
    }

    #[test]
    fn exit_code_policy() {
        let failing = sample(FailOn::Error);
        let passing = sample(FailOn::Never);
        assert_eq!(exit_code(Some(7), &failing), 7);
        assert_eq!(exit_code(Some(7), &passing), 7);
        assert_eq!(exit_code(Some(0), &failing), EXIT_VIOLATIONS);
        assert_eq!(exit_code(Some(0), &passing), 0);
        assert_eq!(exit_code(None, &failing), EXIT_VIOLATIONS);
        // Out-of-range codes still fail.
        assert_eq!(exit_code(Some(256), &passing), 1);
        assert_eq!(exit_code(Some(-1), &passing), 1);
    }

    #[test]
    fn upstream_hosts_never_show_credentials() {
        assert_eq!(
            upstream_hosts("mongodb://u:secret@a,b:27018/db?replicaSet=x"),
            "a:27017,b:27018"
        );
        assert_eq!(upstream_hosts("nope"), "(invalid connection string)");
    }

    #[test]
    fn output_paths_are_checked_up_front() {
        assert!(check_output_path(Path::new("report.json")).is_ok());
        assert!(check_output_path(Path::new("/tmp")).is_err());
        assert!(check_output_path(Path::new("/nonexistent-dir/r.json"))
            .unwrap_err()
            .contains("does not exist"));
    }

    #[test]
    fn omitted_violations_are_counted() {
        let report = Report::new(
            info(FailOn::Error),
            &ResolvedRules::default(),
            &[record(9, RuleId::ConcurrentUse, "two at once")],
            &counts(&[(RuleId::ConcurrentUse, 5)]),
            &[],
            10,
        );
        assert_eq!(report.violations_omitted, 4);
        assert!(report.failed);
    }
}
