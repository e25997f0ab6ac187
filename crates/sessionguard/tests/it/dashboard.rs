//! dashboards/sessionguard.json must stay importable and in step with the
//! metrics: every metric name its queries (and variables) use must be one
//! the proxy's registry exports, read from the registry itself — the data
//! path's families and the session engine's collector — not from a list.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use prometheus::proto::MetricType;
use serde_json::Value;
use sessionguard::metrics::Metrics;
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};

fn dashboard() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../dashboards/sessionguard.json"
    );
    let text = std::fs::read_to_string(path).expect("the dashboard file exists");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// Every series name a scrape can contain (histograms expand into
/// `_bucket`, `_sum` and `_count`).
fn exported_names() -> HashSet<String> {
    let metrics = Metrics::new();
    let sessions = SessionConfig::default();
    let rules = RulesConfig::default();
    let engine = Arc::new(SessionEngine::new(&sessions, &rules));
    metrics.register_session_engine(engine).unwrap();
    let mut names = HashSet::new();
    for family in metrics.gather() {
        let name = family.name().to_string();
        if family.get_field_type() == MetricType::HISTOGRAM {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

/// Every `sessionguard_*` identifier in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("sessionguard_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Panels, including those nested in collapsed rows.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("a panels array") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

#[test]
fn every_queried_metric_is_exported() {
    let dashboard = dashboard();
    let exported = exported_names();
    let mut queried = BTreeSet::new();
    let mut expressions = 0;
    for panel in all_panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {:?} has a target without expr", panel["title"]));
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "panel {:?} queries no sessionguard metric: {expr}",
                panel["title"]
            );
            queried.extend(names);
            expressions += 1;
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        queried.extend(metric_names(query));
    }
    assert!(expressions >= 10, "only {expressions} queries");
    let unknown: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the proxy does not export: {unknown:?}"
    );
}

#[test]
fn it_is_importable_with_a_prometheus_datasource_input() {
    let dashboard = dashboard();
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    let input = inputs
        .iter()
        .find(|i| i["name"] == "DS_PROMETHEUS")
        .expect("a DS_PROMETHEUS input");
    assert_eq!(input["type"], "datasource");
    assert_eq!(input["pluginId"], "prometheus");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    // An exported dashboard carries no instance-specific id.
    assert!(dashboard["id"].is_null());

    let mut ids = HashSet::new();
    for panel in all_panels(&dashboard) {
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].as_u64().is_some(), "gridPos.{key}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {:?} must use the input datasource",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty(),
            "panel {:?} has no query",
            panel["title"]
        );
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}");
        }
    }
}

#[test]
fn it_covers_traffic_latency_sessions_transactions_refreshes_and_violations() {
    let dashboard = dashboard();
    let exprs: Vec<String> = all_panels(&dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    let uses = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    assert!(uses("sessionguard_commands_total"), "traffic");
    assert!(uses("sessionguard_bytes_total"), "traffic");
    assert!(
        exprs.iter().any(|e| e.contains("histogram_quantile(")
            && e.contains("sessionguard_command_duration_seconds_bucket")
            && e.contains("le")),
        "latency quantiles"
    );
    assert!(uses("sessionguard_sessions_tracked"), "sessions");
    assert!(
        uses("sessionguard_sessions_started_total"),
        "sessions started"
    );
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("sessionguard_sessions_ended_total") && e.contains("by (how)")),
        "sessions ended by how"
    );
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("sessionguard_transactions_total") && e.contains("by (outcome)")),
        "transactions by outcome"
    );
    assert!(
        uses("sessionguard_transactions_left_open_total"),
        "transactions left open"
    );
    assert!(uses("sessionguard_refreshes_sent_total"), "refreshes");
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("sessionguard_violations_total") && e.contains("by (rule)")),
        "violations by rule"
    );
    let titles: Vec<&str> = all_panels(&dashboard)
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for row in [
        "Traffic",
        "Latency",
        "Sessions",
        "Transactions",
        "Refreshes",
        "Violations",
    ] {
        assert!(titles.contains(&row), "no `{row}` row: {titles:?}");
    }
}

#[test]
fn the_name_scanner_finds_every_metric_in_an_expression() {
    assert_eq!(
        metric_names(
            "sum(rate(sessionguard_a_total{x=\"y\"}[5m])) / sessionguard_b_count + other_metric"
        ),
        vec!["sessionguard_a_total", "sessionguard_b_count"]
    );
    assert!(metric_names("up").is_empty());
}
