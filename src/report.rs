//! The run summary a CI job reads: what the session engine saw between the
//! start and the end of a run (`sessionguard exec`, or `sessionguard proxy
//! --report` at shutdown), rendered as JSON (a stable, versioned schema), as
//! JUnit XML (one test case per rule) and as a short human summary, plus
//! the exit-code policy that turns it into a pass or a fail.
//!
//! It only reads what the engine already recorded (rule ids, severities,
//! actions, lsids, times and request evidence: command names, namespaces,
//! ids, peers, driver and application names); it must never carry document
//! contents or credentials, and it does no I/O beyond writing a report file
//! it was asked to write.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::proxy::upstream::ConnectionString;
use crate::session::config::ResolvedRules;
use crate::session::violation::RequestEvidence;
use crate::session::{RuleId, SessionEngine, Severity, StoreEvidence, ViolationRecord};

/// The JSON schema version; bumped only when a field changes meaning or
/// disappears (adding fields keeps it).
pub const REPORT_VERSION: u32 = 1;

/// Exit code when the child succeeded but violations reached `--fail-on`.
pub const EXIT_VIOLATIONS: u8 = 3;

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
pub struct ChildOutcome {
    /// The program only: its arguments may hold secrets.
    pub program: String,
    /// Its exit code; 128 + N when signal N ended it (as shells report it).
    pub exit_code: i32,
}

/// Facts about the run that the engine does not know.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub started: SystemTime,
    pub finished: SystemTime,
    /// The upstream's host list (never the credentials).
    pub upstream: String,
    pub child: Option<ChildOutcome>,
    pub fail_on: FailOn,
}

/// The report, as serialized to JSON (field order is the schema's order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
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
    /// Oldest first; at most the engine's `max_violations` most recent.
    pub violations: Vec<ReportedViolation>,
    /// Violations counted but no longer held in memory (over `max_violations`).
    pub violations_omitted: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests the engine inspected: 0 means the application never used the proxy.
    pub requests_inspected: u64,
    pub total: u64,
    /// `error`, `warning`, `info` (always present, possibly 0).
    pub by_severity: BTreeMap<String, u64>,
    /// Only rules that fired, by rule id.
    pub by_rule: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedViolation {
    pub id: u64,
    pub rule: RuleId,
    pub severity: Severity,
    pub action: String,
    /// Whether the request was answered with an error instead of forwarded.
    pub rejected: bool,
    pub lsid: String,
    pub owner: Option<String>,
    pub at: String,
    pub evidence: Evidence,
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
        }
    }
}

/// One rule's line in the summary and JUnit.
struct RuleLine<'a> {
    rule: RuleId,
    severity: Severity,
    enabled: bool,
    count: u64,
    first: Option<&'a ReportedViolation>,
}

impl Report {
    /// Everything the engine recorded, as of now.
    pub fn from_engine(info: RunInfo, engine: &SessionEngine, rules: &ResolvedRules) -> Report {
        Report::new(
            info,
            rules,
            &engine.violations(),
            &engine.violation_counts(),
            engine.stats().requests_inspected,
        )
    }

    /// `violations` are the records still held; `counts` every violation
    /// since start per rule (it may exceed what is held).
    pub fn new(
        info: RunInfo,
        rules: &ResolvedRules,
        violations: &[Arc<ViolationRecord>],
        counts: &[(RuleId, u64)],
        requests_inspected: u64,
    ) -> Report {
        let mut by_severity: BTreeMap<String, u64> = [Severity::Error, Severity::Warning]
            .into_iter()
            .chain([Severity::Info])
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        let mut by_rule = BTreeMap::new();
        let mut total = 0u64;
        let mut failed = false;
        for &(rule, count) in counts.iter().filter(|(_, count)| *count > 0) {
            let severity = rules.get(rule).severity;
            *by_severity
                .entry(severity.as_str().to_string())
                .or_default() += count;
            by_rule.insert(rule.as_str().to_string(), count);
            total += count;
            failed |= info.fail_on.fails(severity);
        }
        let violations: Vec<ReportedViolation> = violations
            .iter()
            .map(|v| ReportedViolation::from(v.as_ref()))
            .collect();
        // A record whose severity differs from the configured one (it cannot
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
            violations_omitted: total.saturating_sub(held),
            violations,
        }
    }

    /// Pretty-printed JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the report: {e}\"}}"));
        text.push('\n');
        text
    }

    fn rule_lines(&self, rules: &ResolvedRules) -> Vec<RuleLine<'_>> {
        RuleId::ALL
            .into_iter()
            .map(|rule| {
                let settings = rules.get(rule);
                RuleLine {
                    rule,
                    severity: settings.severity,
                    enabled: settings.enabled,
                    count: self.counts.by_rule.get(rule.as_str()).copied().unwrap_or(0),
                    first: self.violations.iter().find(|v| v.rule == rule),
                }
            })
            .collect()
    }

    /// JUnit XML: one `<testcase>` per rule id; a rule that fired at or above
    /// `fail_on` is a `<failure>` carrying its first evidence, one that fired
    /// below it passes with the count in `<system-out>`, a disabled rule is
    /// `<skipped>`.
    pub fn to_junit(&self, rules: &ResolvedRules) -> String {
        let lines = self.rule_lines(rules);
        let failures = lines
            .iter()
            .filter(|l| l.count > 0 && self.fail_on.fails(l.severity))
            .count();
        let skipped = lines.iter().filter(|l| !l.enabled).count();
        let seconds = duration_seconds(&self.started_at, &self.finished_at);
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            xml,
            "<testsuites name=\"sessionguard\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{seconds:.3}\">",
            lines.len()
        );
        let _ = writeln!(
            xml,
            "  <testsuite name=\"sessionguard.session-hygiene\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{seconds:.3}\" timestamp=\"{}\">",
            lines.len(),
            xml_escape(&self.started_at)
        );
        for line in &lines {
            let _ = write!(
                xml,
                "    <testcase classname=\"sessionguard.rules\" name=\"{}\" time=\"0\"",
                line.rule
            );
            if !line.enabled {
                xml.push_str(">\n      <skipped message=\"rule disabled in the configuration\"/>\n    </testcase>\n");
                continue;
            }
            if line.count == 0 {
                xml.push_str("/>\n");
                continue;
            }
            xml.push_str(">\n");
            let summary = format!(
                "{} violation{} of {} (severity {})",
                line.count,
                if line.count == 1 { "" } else { "s" },
                line.rule,
                line.severity
            );
            let detail = line
                .first
                .map(|v| {
                    format!(
                        "first: {}\nlsid: {}\nat: {}",
                        evidence_line(v),
                        v.lsid,
                        v.at
                    )
                })
                .unwrap_or_else(|| "no evidence held (over max_violations)".to_string());
            if self.fail_on.fails(line.severity) {
                let _ = writeln!(
                    xml,
                    "      <failure message=\"{}\" type=\"{}\">{}</failure>",
                    xml_escape(&summary),
                    line.severity,
                    xml_escape(&detail)
                );
            } else {
                let _ = writeln!(
                    xml,
                    "      <system-out>{}\n{}</system-out>",
                    xml_escape(&summary),
                    xml_escape(&detail)
                );
            }
            xml.push_str("    </testcase>\n");
        }
        xml.push_str("  </testsuite>\n</testsuites>\n");
        xml
    }

    /// A few lines for a terminal or a CI log: each rule that fired, its
    /// count and its first evidence, and the verdict.
    pub fn to_text(&self, rules: &ResolvedRules) -> String {
        let mut text = String::new();
        let verdict = if self.failed {
            format!("FAIL (--fail-on {})", self.fail_on.as_str())
        } else {
            format!("pass (--fail-on {})", self.fail_on.as_str())
        };
        if self.counts.total == 0 {
            let _ = writeln!(
                text,
                "sessionguard: no session misuse seen in {} request{}: {verdict}",
                self.counts.requests_inspected,
                if self.counts.requests_inspected == 1 {
                    ""
                } else {
                    "s"
                },
            );
        } else {
            let fired = self.counts.by_rule.len();
            let _ = writeln!(
                text,
                "sessionguard: {} violation{} of {fired} rule{} ({} error, {} warning) in {} requests: {verdict}",
                self.counts.total,
                if self.counts.total == 1 { "" } else { "s" },
                if fired == 1 { "" } else { "s" },
                self.counts.by_severity.get("error").copied().unwrap_or(0),
                self.counts.by_severity.get("warning").copied().unwrap_or(0),
                self.counts.requests_inspected,
            );
            for line in self.rule_lines(rules).iter().filter(|l| l.count > 0) {
                let _ = writeln!(
                    text,
                    "  {:<31} {:<8} {:>5}  {}",
                    line.rule.as_str(),
                    line.severity.as_str(),
                    line.count,
                    line.first
                        .map(evidence_line)
                        .unwrap_or_else(|| "(evidence no longer held)".to_string())
                );
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
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_json())
    }

    /// Writes the JUnit XML report to `path` (created or replaced).
    pub fn write_junit(&self, path: &Path, rules: &ResolvedRules) -> std::io::Result<()> {
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
pub fn upstream_hosts(uri: &str) -> String {
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
pub fn exit_code(child_exit: Option<i32>, report: &Report) -> u8 {
    match child_exit {
        Some(code) if code != 0 => u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
        _ if report.failed => EXIT_VIOLATIONS,
        _ => 0,
    }
}

/// One line of evidence: the message, then the request(s) by names and ids.
fn evidence_line(v: &ReportedViolation) -> String {
    let mut line = v.evidence.message.clone();
    if let Some(current) = &v.evidence.current {
        let _ = write!(line, " [{}]", request_line(current));
    }
    if let Some(earlier) = &v.evidence.earlier {
        let _ = write!(line, " [earlier: {}]", request_line(earlier));
    }
    line
}

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
pub fn xml_escape(text: &str) -> String {
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
    use crate::session::config::{Mode, RuleOverride, RulesConfig};
    use crate::session::Action;

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
            finding: Default::default(),
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

    fn sample(fail_on: FailOn) -> Report {
        let violations = vec![
            record(1, RuleId::UseAfterEnd, "session used after endSessions"),
            record(2, RuleId::UseAfterEnd, "again"),
            record(3, RuleId::TxnLeftOpen, "open for 61s"),
        ];
        Report::new(
            info(fail_on),
            &ResolvedRules::default(),
            &violations,
            &counts(&[(RuleId::UseAfterEnd, 2), (RuleId::TxnLeftOpen, 1)]),
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
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn junit_fails_only_rules_at_or_above_the_threshold() {
        let xml = sample(FailOn::Error).to_junit(&ResolvedRules::default());
        assert_eq!(xml.matches("<testcase ").count(), RuleId::COUNT);
        assert_eq!(xml.matches("<failure ").count(), 1);
        assert!(xml.contains("failures=\"1\""));
        let failing = xml.split("name=\"use-after-end\"").nth(1).unwrap();
        let failing = &failing[..failing.find("</testcase>").unwrap()];
        assert!(failing.contains("<failure message=\"2 violations of use-after-end"));
        assert!(failing.contains("session used after endSessions"));
        // The application name carries every character XML needs escaped.
        assert!(
            failing.contains("ci &lt;&amp;&gt; \\&quot;app\\&quot;"),
            "{failing}"
        );
        let warning = xml.split("name=\"txn-left-open\"").nth(1).unwrap();
        let warning = &warning[..warning.find("</testcase>").unwrap()];
        assert!(warning.contains("<system-out>1 violation of txn-left-open"));

        let xml = sample(FailOn::Warning).to_junit(&ResolvedRules::default());
        assert_eq!(xml.matches("<failure ").count(), 2);
        let xml = sample(FailOn::Never).to_junit(&ResolvedRules::default());
        assert_eq!(xml.matches("<failure ").count(), 0);
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
    fn text_lists_each_rule_with_count_and_first_evidence() {
        let text = sample(FailOn::Error).to_text(&ResolvedRules::default());
        assert!(
            text.starts_with(
                "sessionguard: 3 violations of 2 rules (2 error, 1 warning) in 40 requests: FAIL"
            ),
            "{text}"
        );
        let line = text.lines().find(|l| l.contains("use-after-end")).unwrap();
        assert!(line.contains("error") && line.contains(" 2 "), "{line}");
        assert!(
            line.contains("session used after endSessions [insert shop.orders conn 3 request 12"),
            "{line}"
        );
        assert!(!line.contains("again"), "only the first evidence: {line}");

        let empty = Report::new(
            info(FailOn::Error),
            &ResolvedRules::default(),
            &[],
            &counts(&[]),
            0,
        );
        let text = empty.to_text(&ResolvedRules::default());
        assert!(
            text.contains("no session misuse seen in 0 requests: pass"),
            "{text}"
        );
        assert!(text.contains("no request went through the proxy"), "{text}");
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
            10,
        );
        assert_eq!(report.violations_omitted, 4);
        assert!(report.failed);
    }
}
