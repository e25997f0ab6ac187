//! Smoke test of the benchmark harness (about a second): `bench-load`'s load
//! mode through the proxy with the session engine in front of the fast
//! emulator reports sane numbers, and its workload is a clean session
//! pattern (the engine raises nothing); the idle-connections probe keeps
//! every connection usable. The real measurements are bench/compare.sh.

use sessionguard_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use common::Stack;
use sessionguard::EngineInspector;
use sessionguard_dev::bench::{idle_memory, run_load, LoadPlan, LoadReport};
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};

/// The fast emulator behind the proxy, with the session engine inspecting.
async fn stack() -> (Stack, Arc<SessionEngine>) {
    let engine = Arc::new(SessionEngine::new(
        &SessionConfig::default(),
        &RulesConfig::default(),
    ));
    let emulator = EmulatorConfig {
        fast: true,
        ..EmulatorConfig::default()
    };
    (
        Stack::start_with(emulator, Arc::new(EngineInspector::new(engine.clone()))).await,
        engine,
    )
}

/// A second of load over 4 connections through `target`: no errors, and
/// enough operations to mean something.
pub(crate) async fn short_clean_load(target: std::net::SocketAddr) -> LoadReport {
    let report = run_load(&LoadPlan {
        target,
        connections: 4,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(800),
        shared_session: false,
    })
    .await
    .expect("load runs");
    assert_eq!(report.errors, 0, "{report}");
    assert!(report.ops >= 100, "too few operations: {report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_through_the_proxy_reports_sane_numbers_and_raises_nothing() {
    let (stack, engine) = stack().await;
    let report = short_clean_load(stack.proxy.local_addr()).await;
    assert!(report.ops_per_sec > 0.0, "{report}");
    assert!(
        0.0 < report.p50_us && report.p50_us <= report.p99_us && report.p99_us <= report.p999_us,
        "{report}"
    );
    assert!(report.p999_us <= report.max_us, "{report}");
    // This process's CPU from /proc (the proxy and the emulator run in it
    // too here, so only its presence and sign are checked).
    let cpu = report
        .load_cpu_us_per_op
        .expect("/proc/self/task/*/schedstat");
    assert!(cpu > 0.0, "{report}");
    assert!(
        report.to_string().contains("load_cpu_us_per_op="),
        "{report}"
    );
    // Its sleeps, from /proc too: a closed loop through a proxy and an
    // emulator in this very process waits for replies, so it sleeps.
    let sleeps = report.load_sleeps_per_op.expect("/proc/self/task/*/status");
    assert!(sleeps > 0.0, "{report}");
    assert!(
        report
            .to_string()
            .contains(&format!("load_sleeps_per_op={sleeps:.3}")),
        "{report}"
    );
    // Every operation went through the engine (plus the hellos and warm-up).
    let stats = engine.stats();
    assert!(
        stats.requests_inspected >= report.ops,
        "{} inspected < {} ops",
        stats.requests_inspected,
        report.ops
    );
    // Four lsids per connection, like a driver's implicit sessions.
    assert_eq!(stats.ledger.sessions, 16, "{stats:?}");
    // find -> getMore on its own cursor -> retryable insert with a fresh
    // txnNumber: nothing a rule may object to.
    assert_eq!(stats.violations, 0, "{:?}", engine.violations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_session_floods_one_bug_through_the_engine() {
    let (stack, engine) = stack().await;
    let report = run_load(&LoadPlan {
        target: stack.proxy.local_addr(),
        connections: 4,
        warmup: Duration::from_millis(200),
        duration: Duration::from_millis(800),
        shared_session: true,
    })
    .await
    .expect("load runs");
    assert_eq!(report.errors, 0, "{report}");
    let stats = engine.stats();
    // Every connection used the same four lsids.
    assert_eq!(stats.ledger.sessions, 4, "{stats:?}");
    // Four connections in a closed loop on those sessions: overlapping
    // requests are the rule, so the violations run into the hundreds and
    // fold into a handful of findings.
    assert!(
        stats.violations * 4 >= report.ops,
        "{} violations for {} ops",
        stats.violations,
        report.ops
    );
    let findings = engine.findings();
    assert!(
        findings
            .iter()
            .any(|f| f.rule == Some(sessionguard_engine::RuleId::ConcurrentUse)),
        "{findings:?}"
    );
    assert!(findings.len() <= 16, "{findings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_probe_keeps_every_connection_usable() {
    let (stack, _engine) = stack().await;
    let report = idle_memory(stack.proxy.local_addr(), 50, Some(std::process::id()))
        .await
        .expect("idle probe runs");
    assert_eq!(report.connections, 50);
    assert_eq!(report.errors, 0, "{report}");
    assert!(report.rss_after_kib > 0, "{report}");
    // The warm-up connections plus the measured ones all reached the proxy.
    assert_eq!(stack.proxy.accepted_connections(), 150, "{report}");
}
