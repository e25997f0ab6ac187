//! The process's Prometheus metrics: one [`Metrics`] owning the
//! `prometheus::Registry` the admin API's `/metrics` renders, with the data
//! path's handles (`sessionguard_proxy::ProxyMetrics`, registered in it) and
//! a scrape-time collector for the session engine's counters. It owns the
//! session metrics' names, help texts and label sets; it must not own
//! policy, sockets or session state.
//!
//! Cardinality is fixed: every label value of every series is known up
//! front (rule ids, close causes, a closed list of command names, fixed
//! reasons, the configured stores), so a scrape always shows every series
//! (zeros included) and nothing a client sends can create a series. Never
//! an lsid, namespace, peer or user as a label.
//!
//! The session engine has no metrics dependency: `SessionCollector` reads
//! `SessionEngine::stats()` and `violation_counts()` when Prometheus scrapes.

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use sessionguard_engine::ResolvedRules;
use sessionguard_engine::{Refusal, SessionCommand};
use sessionguard_engine::{RuleId, SessionEngine};
use sessionguard_protocol::CloseCause;
use sessionguard_protocol::COMMAND_LABELS;
use sessionguard_proxy::ProxyMetrics;

/// Media type of the text exposition format served at `/metrics`.
pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The process's metrics: one registry, the data path's handles, and (once
/// registered) the session engine's collector.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    proxy: ProxyMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Builds the registry with every data-path series at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        // Names and label sets are constants, so registration can fail only
        // through a bug in this function (a duplicate name).
        let proxy = ProxyMetrics::register(&registry).expect("metric definitions are consistent");
        Metrics { registry, proxy }
    }

    /// The data path's handles.
    pub fn proxy(&self) -> &ProxyMetrics {
        &self.proxy
    }

    /// Adds the session engine's counters (read at scrape time). Each
    /// rule's `action` label is the action in force at the scrape (a reload
    /// may have changed it).
    pub fn register_session_engine(&self, engine: Arc<SessionEngine>) -> prometheus::Result<()> {
        self.registry
            .register(Box::new(SessionCollector::new(engine)))
    }

    /// Adds a collector owned elsewhere (e.g. `crate::reload`'s counters).
    pub fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Every metric family, sorted by name.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(64 * 1024);
        // Encoding into a Vec fails only on names the registry already
        // validated; an empty body would be the visible symptom.
        if let Err(e) = TextEncoder::new().encode(&self.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Reads the session engine's counters at scrape time.
pub(crate) struct SessionCollector {
    engine: Arc<SessionEngine>,
    descs: Vec<Desc>,
}

impl std::fmt::Debug for SessionCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCollector").finish_non_exhaustive()
    }
}

/// What one scrape reads from the engine.
#[derive(Debug, Default)]
struct EngineSnapshot {
    stats: sessionguard_engine::EngineStats,
    violations: Vec<(RuleId, u64)>,
    /// Every store label (fixed by `[stores]`) with its counters.
    stores: sessionguard_engine::StoreStats,
}

impl SessionCollector {
    pub(crate) fn new(engine: Arc<SessionEngine>) -> SessionCollector {
        let template = EngineSnapshot {
            stores: engine.store_stats(),
            ..EngineSnapshot::default()
        };
        let template = session_families(&template, &engine.rules())
            .expect("session metric definitions are consistent");
        let descs = template
            .iter()
            .flat_map(|c| c.desc().into_iter().cloned())
            .collect();
        SessionCollector { engine, descs }
    }
}

impl Collector for SessionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = EngineSnapshot {
            stats: self.engine.stats(),
            violations: self.engine.violation_counts(),
            stores: self.engine.store_stats(),
        };
        match session_families(&snapshot, &self.engine.rules()) {
            Ok(collectors) => collectors.iter().flat_map(|c| c.collect()).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the session metrics");
                Vec::new()
            }
        }
    }
}

/// The session-side families for one snapshot. Fresh metric objects per
/// scrape: counters cannot be set, and sharing them between concurrent
/// scrapes would race; a few dozen small allocations per scrape is nothing.
fn session_families(
    snapshot: &EngineSnapshot,
    rules: &ResolvedRules,
) -> prometheus::Result<Vec<Box<dyn Collector>>> {
    let stats = &snapshot.stats;
    let ledger = &stats.ledger;
    let mut out: Vec<Box<dyn Collector>> = Vec::new();
    let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);

    let mut gauge = |name: &str, help: &str, value: i64| -> prometheus::Result<()> {
        let gauge = IntGauge::new(name, help)?;
        gauge.set(value);
        out.push(Box::new(gauge));
        Ok(())
    };
    gauge(
        "sessionguard_sessions_tracked",
        "Logical sessions in the ledger now (including ended sessions kept as tombstones).",
        as_i64(ledger.sessions),
    )?;
    gauge(
        "sessionguard_sessions_held",
        "Sessions the application holds now (an open transaction or an open cursor).",
        as_i64(ledger.held),
    )?;
    gauge(
        "sessionguard_cursors_open",
        "Cursors opened under a session that the proxy still follows.",
        as_i64(ledger.cursors),
    )?;
    gauge(
        "sessionguard_sessions_tombstoned",
        "Ended or killed sessions kept in the ledger now (tombstones, so a reuse is caught; \
         part of sessionguard_sessions_tracked).",
        as_i64(ledger.tombstones),
    )?;

    let mut counter = |name: &str, help: &str, value: u64| -> prometheus::Result<()> {
        let counter = IntCounter::new(name, help)?;
        counter.inc_by(value);
        out.push(Box::new(counter));
        Ok(())
    };
    counter(
        "sessionguard_sessions_purged_total",
        "Tombstones past ended_retention and sessions long expired on the server, dropped from the ledger.",
        ledger.purged,
    )?;
    counter(
        "sessionguard_requests_inspected_total",
        "Client requests the session engine inspected.",
        stats.requests_inspected,
    )?;
    counter(
        "sessionguard_requests_rejected_total",
        "Client requests answered with an error instead of being forwarded (enforce).",
        stats.requests_rejected,
    )?;
    counter(
        "sessionguard_refreshes_sent_total",
        "refreshSessions commands the refresher injected.",
        stats.refreshes_sent,
    )?;
    counter(
        "sessionguard_sessions_refreshed_total",
        "Sessions named by a successful injected refreshSessions.",
        stats.sessions_refreshed,
    )?;
    counter(
        "sessionguard_refreshes_failed_total",
        "Injected refreshSessions that failed (error reply, timeout, closed connection).",
        stats.refresh_failures,
    )?;
    counter(
        "sessionguard_sessions_started_total",
        "Sessions seen starting: the first forwarded request under an lsid the ledger does not \
         track, or a reuse after the session ended or expired (the server starts a new one).",
        stats.sessions_started,
    )?;
    counter(
        "sessionguard_transactions_left_open_total",
        "Transactions still open (no commit or abort) past sessions.transaction_max_open, counted \
         once each whether or not the txn-left-open rule is enabled.",
        stats.transactions_left_open,
    )?;

    let ended = IntCounterVec::new(
        Opts::new(
            "sessionguard_sessions_ended_total",
            "Live sessions that ended, by how: ended (endSessions), killed (killSessions, \
             killAllSessions, killAllSessionsByPattern), expired (idle past the server's session \
             timeout: seen when reused, or when the ledger purges it unused).",
        ),
        &["how"],
    )?;
    for (how, count) in [
        ("ended", stats.sessions_ended),
        ("killed", stats.sessions_killed),
        ("expired", stats.sessions_expired),
    ] {
        ended.with_label_values(&[how]).inc_by(count);
    }
    out.push(Box::new(ended));

    let transactions = IntCounterVec::new(
        Opts::new(
            "sessionguard_transactions_total",
            "Transactions by outcome: started (first request with its txnNumber), committed, aborted \
             (by abortTransaction, or by the server: an error reply saying so, a higher txnNumber, \
             the session ending). Each transaction is counted once per outcome, retries included.",
        ),
        &["outcome"],
    )?;
    for (outcome, count) in [
        ("started", stats.transactions_started),
        ("committed", stats.transactions_committed),
        ("aborted", stats.transactions_aborted),
    ] {
        transactions.with_label_values(&[outcome]).inc_by(count);
    }
    out.push(Box::new(transactions));

    let abandoned = IntCounterVec::new(
        Opts::new(
            "sessionguard_in_flight_abandoned_total",
            "Session requests still awaiting their reply when their connection closed, by why it closed: \
             client_closed and client_reset are the client's doing (closed-with-requests-in-flight judges those); \
             every other reason (upstream_closed, upstream_error, malformed or stalled frames, drained, shutdown) \
             is not client misuse and is only counted here.",
        ),
        &["reason"],
    )?;
    for cause in CloseCause::ALL {
        abandoned
            .with_label_values(&[cause.as_str()])
            .inc_by(stats.in_flight_abandoned[cause.index()]);
    }
    out.push(Box::new(abandoned));

    let refused = IntCounterVec::new(
        Opts::new(
            "sessionguard_session_commands_refused_total",
            "Session commands the upstream answered with anything but ok:1 (endSessions, killSessions, \
             killAllSessions, killAllSessionsByPattern, refreshSessions — the application's and the refresher's — \
             and killCursors), by command and refusal (Unauthorized, CommandNotFound, CommandNotSupported, \
             AtlasError, other). A refused command changes nothing sessionguard tracks.",
        ),
        &["command", "code_name"],
    )?;
    for command in SessionCommand::ALL {
        for refusal in Refusal::ALL {
            refused
                .with_label_values(&[command.as_str(), refusal.as_str()])
                .inc_by(stats.commands_refused[command.index()][refusal.index()]);
        }
    }
    out.push(Box::new(refused));

    let retries = IntCounterVec::new(
        Opts::new(
            "sessionguard_retries_total",
            "Driver retries recognised, by command (the retryable reads and writes always have a series, \
             other commands from their first retry): a request repeating one whose connection closed before \
             its reply, a retryable write resent with the same lsid, txnNumber and statements, or an identical \
             request that overlapped one whose connection then failed.",
        ),
        &["command"],
    )?;
    // The commands drivers retry (retryable-reads and retryable-writes
    // specs) always have a series, so a dashboard or alert on them has a
    // zero to start from; any other command appears with its first retry.
    const RETRYABLE: [&str; 11] = [
        "find",
        "insert",
        "update",
        "delete",
        "aggregate",
        "findAndModify",
        "count",
        "distinct",
        "bulkWrite",
        "commitTransaction",
        "abortTransaction",
    ];
    for (label, count) in COMMAND_LABELS.iter().zip(stats.retries.0) {
        if count > 0 || RETRYABLE.contains(label) {
            retries.with_label_values(&[label]).inc_by(count);
        }
    }
    out.push(Box::new(retries));

    let pending = IntGauge::new(
        "sessionguard_retry_verdicts_pending",
        "Identical requests on one session waiting for the first one's outcome (retry if its connection \
         fails without its reply, concurrent use if its reply is delivered).",
    )?;
    pending.set(as_i64(stats.retry_verdicts_pending));
    out.push(Box::new(pending));
    let unjudged = IntCounter::new(
        "sessionguard_retry_verdicts_unjudged_total",
        "Identical overlapping requests left unjudged (silent) because too many verdicts were waiting.",
    )?;
    unjudged.inc_by(stats.retry_verdicts_unjudged);
    out.push(Box::new(unjudged));

    let evicted = IntCounterVec::new(
        Opts::new(
            "sessionguard_sessions_evicted_total",
            "Sessions dropped because the ledger reached max_sessions, by what they were.",
        ),
        &["reason"],
    )?;
    evicted
        .with_label_values(&["ended"])
        .inc_by(ledger.evicted_ended);
    evicted
        .with_label_values(&["idle"])
        .inc_by(ledger.evicted_idle);
    evicted
        .with_label_values(&["busy"])
        .inc_by(ledger.evicted_busy);
    out.push(Box::new(evicted));

    let violations = IntCounterVec::new(
        Opts::new(
            "sessionguard_violations_total",
            "Session-hygiene violations, by rule id and the rule's configured action.",
        ),
        &["rule", "action"],
    )?;
    for rule in RuleId::ALL {
        let count = snapshot
            .violations
            .iter()
            .find(|(r, _)| *r == rule)
            .map_or(0, |(_, n)| *n);
        violations
            .with_label_values(&[rule.as_str(), rules.get(rule).action.as_str()])
            .inc_by(count);
    }
    out.push(Box::new(violations));

    let rules_enabled = IntGaugeVec::new(
        Opts::new(
            "sessionguard_rules_enabled",
            "1 for each rule that is enabled.",
        ),
        &["rule"],
    )?;
    for rule in RuleId::ALL {
        rules_enabled
            .with_label_values(&[rule.as_str()])
            .set(i64::from(rules.enabled(rule)));
    }
    out.push(Box::new(rules_enabled));

    let store_sessions = IntCounterVec::new(
        Opts::new(
            "sessionguard_store_sessions_total",
            "Web-session store documents ([stores]) by store and event: created (a new id saved), destroyed \
             (deleted by _id), touched (expiry-only update), resurrected (saved back after a destroy by a \
             client that read it before).",
        ),
        &["store", "event"],
    )?;
    for (store, counts) in &snapshot.stores.stores {
        for (event, value) in [
            ("created", counts.created),
            ("destroyed", counts.destroyed),
            ("touched", counts.touched),
            ("resurrected", counts.resurrected),
        ] {
            store_sessions
                .with_label_values(&[store.as_str(), event])
                .inc_by(value);
        }
    }
    out.push(Box::new(store_sessions));
    let store_documents = IntGauge::new(
        "sessionguard_store_documents_tracked",
        "Web-session store documents followed now (active within stores.resurrection_window).",
    )?;
    store_documents.set(as_i64(snapshot.stores.documents));
    out.push(Box::new(store_documents));
    let store_evicted = IntCounter::new(
        "sessionguard_store_documents_evicted_total",
        "Store document records dropped because stores.max_documents was reached.",
    )?;
    store_evicted.inc_by(snapshot.stores.evicted);
    out.push(Box::new(store_evicted));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessionguard_engine::{RulesConfig, SessionConfig};

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn session_collector_reports_every_rule_with_its_action() {
        let metrics = Metrics::new();
        let sessions = SessionConfig::default();
        let rules = RulesConfig::default();
        let engine = Arc::new(SessionEngine::new(&sessions, &rules));
        metrics.register_session_engine(engine.clone()).unwrap();
        let text = metrics.render();
        for rule in RuleId::ALL {
            let series = format!("sessionguard_violations_total{{action=\"log\",rule=\"{rule}\"}}");
            assert_eq!(value_of(&text, &series), Some(0.0), "{series}\n{text}");
        }
        // A reload's settings show at the next scrape.
        let enforce = SessionConfig {
            mode: sessionguard_engine::Mode::Enforce,
            ..SessionConfig::default()
        };
        engine.reconfigure(&enforce, &rules);
        let reloaded = metrics.render();
        assert_eq!(
            value_of(
                &reloaded,
                "sessionguard_violations_total{action=\"reject\",rule=\"use-after-end\"}"
            ),
            Some(0.0),
            "{reloaded}"
        );
        engine.reconfigure(&sessions, &rules);
        assert_eq!(value_of(&text, "sessionguard_sessions_tracked"), Some(0.0));
        for series in [
            "sessionguard_sessions_started_total",
            "sessionguard_sessions_tombstoned",
            "sessionguard_sessions_ended_total{how=\"ended\"}",
            "sessionguard_sessions_ended_total{how=\"killed\"}",
            "sessionguard_sessions_ended_total{how=\"expired\"}",
            "sessionguard_transactions_total{outcome=\"started\"}",
            "sessionguard_transactions_total{outcome=\"committed\"}",
            "sessionguard_transactions_total{outcome=\"aborted\"}",
            "sessionguard_transactions_left_open_total",
            "sessionguard_in_flight_abandoned_total{reason=\"client_closed\"}",
            "sessionguard_in_flight_abandoned_total{reason=\"upstream_closed\"}",
            "sessionguard_session_commands_refused_total{code_name=\"AtlasError\",command=\"killAllSessions\"}",
            "sessionguard_session_commands_refused_total{code_name=\"other\",command=\"refreshSessions\"}",
            "sessionguard_retry_verdicts_pending",
            "sessionguard_retry_verdicts_unjudged_total",
        ] {
            assert_eq!(value_of(&text, series), Some(0.0), "{series}");
        }
        assert_eq!(
            value_of(&text, "sessionguard_retries_total{command=\"insert\"}"),
            Some(0.0),
            "the retryable commands start at zero"
        );
        assert!(
            !text.contains("sessionguard_retries_total{command=\"ping\"}"),
            "other commands appear with their first retry"
        );
        assert_eq!(
            value_of(
                &text,
                "sessionguard_sessions_evicted_total{reason=\"idle\"}"
            ),
            Some(0.0)
        );
        // Registering a second engine would duplicate every name.
        let other = Arc::new(SessionEngine::new(&sessions, &rules));
        assert!(metrics.register_session_engine(other).is_err());
    }

    #[test]
    fn store_series_exist_for_every_configured_store_and_auto_and_count_events() {
        use sessionguard_protocol::wire::op_msg::encode;
        use sessionguard_protocol::wire::{Message, MsgFlags, OpMsg, HEADER_LEN};
        let metrics = Metrics::new();
        let sessions = SessionConfig::default();
        let rules = RulesConfig::default();
        let stores = sessionguard_engine::StoreConfig {
            collections: vec!["app.sessions".into(), "web_sessions".into()],
            ..Default::default()
        };
        let engine = Arc::new(SessionEngine::new(&sessions, &rules).with_stores(&stores));
        metrics.register_session_engine(engine.clone()).unwrap();
        let text = metrics.render();
        for store in ["app.sessions", "web_sessions", "auto"] {
            for event in ["created", "destroyed", "touched", "resurrected"] {
                let series = format!(
                    "sessionguard_store_sessions_total{{event=\"{event}\",store=\"{store}\"}}"
                );
                assert_eq!(value_of(&text, &series), Some(0.0), "{series}\n{text}");
            }
        }
        engine.connect(
            1,
            "10.0.0.1:4000".parse().unwrap(),
            "127.0.0.1:27018".parse().unwrap(),
            false,
        );
        let delete = bson::rawdoc! {
            "delete": "web_sessions", "deletes": [{ "q": { "_id": "s" }, "limit": 1 }], "$db": "x",
        };
        let frame = encode(5, 0, MsgFlags(0), delete.as_bytes());
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        let (_, pending) = engine.request(1, 5, &Message::Msg(msg));
        let mut pending = pending.expect("the engine follows a store delete");
        // A destroy counts once the server confirms the delete.
        let answer = bson::rawdoc! { "n": 1, "ok": 1.0 };
        let frame = encode(6, 5, MsgFlags(0), answer.as_bytes());
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        engine.reply(1, &mut pending, &Message::Msg(msg));
        let text = metrics.render();
        assert_eq!(
            value_of(
                &text,
                "sessionguard_store_sessions_total{event=\"destroyed\",store=\"web_sessions\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value_of(&text, "sessionguard_store_documents_tracked"),
            Some(0.0)
        );
        assert_eq!(
            value_of(&text, "sessionguard_store_documents_evicted_total"),
            Some(0.0)
        );
    }
}
