//! Findings, not floods (issue 13): violations grouped by bug, logs that
//! scale with bugs rather than traffic, and a rare finding that a flood of
//! another cannot bury. The flood is real driver traffic through the proxy
//! (the official Rust driver, many tasks) in front of the emulator; the
//! findings are read back over the admin API, the counts from `/metrics`,
//! the log lines from the captured log.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bson::spec::BinarySubtype;
use bson::{doc, rawdoc, Binary, Document};
use common::{engine_reply as reply, engine_request as send, http_get, logs, Stack};
use serde_json::Value;
use sessionguard_emulator::{Emulator, EmulatorConfig};
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};
use sessionguard_protocol::wire::MsgFlags;

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn a_findings_log_lines_are_its_first_violation_then_one_summary_per_interval() {
    logs::install();
    let engine = SessionEngine::new(&SessionConfig::default(), &RulesConfig::default())
        .with_finding_interval(Duration::from_secs(10));
    engine.connect(
        1,
        "10.7.7.7:40000".parse().unwrap(),
        "127.0.0.1:27018".parse().unwrap(),
        false,
    );
    let hello = rawdoc! {
        "hello": 1,
        "client": { "driver": { "name": "mongo-rust-driver", "version": "3.3.0" }, "application": { "name": "log-policy-app" } },
        "$db": "admin",
    };
    send(&engine, 1, 1, &hello, 0, 0);
    reply(&engine, 1, 1, &rawdoc! { "ok": 1.0 }, 0);
    // Fire-and-forget writes under a session: unacknowledged-with-session,
    // once per request, on many sessions.
    let mut id = 10;
    let mut flood = |engine: &SessionEngine, at: u64| {
        id += 1;
        let lsid = rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![u8::try_from(id % 200).unwrap(); 16] } };
        let w0 = rawdoc! {
            "insert": "events", "documents": [{ "secret": "do-not-log-me" }], "lsid": lsid,
            "writeConcern": { "w": 0 }, "$db": "app",
        };
        send(engine, 1, id, &w0, MsgFlags::MORE_TO_COME, at);
    };
    for at in 0..1000 {
        flood(&engine, at);
    }
    let findings = engine.findings();
    assert_eq!(findings.len(), 1);
    let finding = findings[0].fingerprint.to_string();
    let lines = || logs::containing(&format!("finding={finding}"));
    let first = lines();
    assert_eq!(first.len(), 1, "one line for 1,000 violations: {first:#?}");
    assert!(
        first[0].contains("rule=\"unacknowledged-with-session\""),
        "{}",
        first[0]
    );
    assert!(first[0].contains("app=\"log-policy-app\""), "{}", first[0]);

    // The next violation after the interval: a summary of what came since.
    flood(&engine, 10_000);
    let lines_now = lines();
    assert_eq!(lines_now.len(), 2, "{lines_now:#?}");
    assert!(
        lines_now[1].contains("count=1000 total=1001"),
        "{}",
        lines_now[1]
    );
    assert!(
        lines_now[1].contains("1000 more violations of finding"),
        "{}",
        lines_now[1]
    );
    // Nothing new: the sweep owes nothing. A few more, then silence: the
    // sweep writes the last summary once the interval is over.
    engine.sweep_at(15_000);
    for at in 12_000..12_005 {
        flood(&engine, at);
    }
    engine.sweep_at(19_999);
    assert_eq!(lines().len(), 2);
    engine.sweep_at(20_000);
    engine.sweep_at(60_000);
    let all = lines();
    assert_eq!(all.len(), 3, "{all:#?}");
    assert!(all[2].contains("count=5 total=1006"), "{}", all[2]);
    // At shutdown, the violations in no line yet get theirs at once.
    flood(&engine, 21_000);
    flood(&engine, 21_001);
    engine.sweep_at(21_002);
    assert_eq!(lines().len(), 3);
    engine.flush_finding_summaries();
    engine.flush_finding_summaries();
    let all = lines();
    assert_eq!(all.len(), 4, "{all:#?}");
    assert!(all[3].contains("count=2 total=1008"), "{}", all[3]);
    // Every violation was counted, whatever was logged.
    assert_eq!(engine.stats().violations, 1008);
    assert_eq!(engine.findings()[0].count, 1008);
    assert!(logs::containing("do-not-log-me").is_empty());
}

/// The emulator, the proxy with a session engine (its metrics registered),
/// and the admin API.
struct Harness {
    stack: Stack,
    engine: Arc<SessionEngine>,
    admin: SocketAddr,
    admin_shutdown: tokio_util::sync::CancellationToken,
}

impl Harness {
    async fn start(emulator: EmulatorConfig) -> Harness {
        let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), emulator)
            .await
            .expect("emulator starts");
        // Room for 100 recent violations: the flood must not take the rare
        // one's place.
        let sessions = SessionConfig {
            max_violations: 100,
            ..SessionConfig::default()
        };
        let engine = Arc::new(SessionEngine::new(&sessions, &RulesConfig::default()));
        let proxy = common::guarded_proxy(emulator.addr(), engine.clone(), |_| {}).await;
        let (admin, admin_shutdown) =
            common::admin_for(&proxy, Some(engine.clone()), emulator.addr(), None).await;
        Harness {
            stack: Stack {
                emulator,
                proxy: proxy.handle,
                metrics: proxy.metrics,
            },
            engine,
            admin: admin.local_addr,
            admin_shutdown,
        }
    }

    async fn client(&self, app: &str) -> mongodb::Client {
        self.stack.client_with(&format!("&appName={app}")).await
    }

    async fn get_json(&self, path: &str) -> Value {
        let reply = http_get(self.admin, path, None).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", reply.body))
    }

    fn violations_metric(&self, rule: &str) -> f64 {
        let exposition = self.stack.metrics.render();
        common::metric(
            &exposition,
            &format!("sessionguard_violations_total{{action=\"log\",rule=\"{rule}\"}}"),
        )
        .unwrap_or(0.0)
    }

    async fn stop(self) {
        self.admin_shutdown.cancel();
        self.stack.stop().await;
    }
}

const TASKS: usize = 8;
const ROUNDS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_bug_is_one_finding_and_a_rare_bug_still_shows() {
    logs::install();
    // Only the rare bug's command is slow.
    let mut emulator = EmulatorConfig::default();
    emulator
        .command_latency
        .insert("aggregate".to_string(), Duration::from_millis(500));
    let h = Harness::start(emulator).await;

    // The flood: an application whose sessions are killed (an admin's
    // cleanup job, a shared session killed by one request) and which keeps
    // using them, from many tasks at once — thousands of use-after-end.
    let flood_client = h.client("flood-app").await;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let client = flood_client.clone();
            tokio::spawn(async move {
                let items = client.database("app").collection::<Document>("items");
                let admin = client.database("admin");
                let mut session = client.start_session().await?;
                items
                    .insert_one(doc! { "_id": format!("task-{task}") })
                    .session(&mut session)
                    .await?;
                for _ in 0..ROUNDS {
                    admin
                        .run_command(doc! { "killSessions": [session.id().clone()] })
                        .await?;
                    items.find_one(doc! {}).session(&mut session).await?;
                }
                mongodb::error::Result::Ok(())
            })
        })
        .collect();

    // The rare bug, during the flood: another application gives up on an
    // operation (a timeout) and the driver closes the connection with the
    // request still in flight.
    let engine = h.engine.clone();
    assert!(
        Stack::eventually(WAIT, || engine.stats().violations > 100).await,
        "the flood started"
    );
    let rare_client = h.client("rare-app").await;
    let orders = rare_client.database("app").collection::<Document>("orders");
    let mut session = rare_client.start_session().await.unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        orders.count_documents(doc! {}).session(&mut session),
    )
    .await;
    assert!(gave_up.is_err(), "the slow count timed out");
    let engine = h.engine.clone();
    assert!(
        Stack::eventually(WAIT, || engine.findings().iter().any(|f| f
            .current
            .is_none()
            && f.earlier
                .as_ref()
                .is_some_and(|e| e.app_name.as_deref() == Some("rare-app"))))
        .await,
        "the rare finding was raised: {:#?}",
        h.engine.findings()
    );

    for task in tasks {
        task.await.unwrap().expect("the flood's operations succeed");
    }
    let total = (TASKS * ROUNDS) as f64;
    assert!(
        Stack::eventually(WAIT, || h.violations_metric("use-after-end") == total).await,
        "the metric counts every violation: {}",
        h.violations_metric("use-after-end")
    );

    // /findings: one finding for the flood, with the same count.
    let findings = h.get_json("/findings").await;
    let findings = findings.as_array().unwrap();
    let floods: Vec<&Value> = findings
        .iter()
        .filter(|f| f["rule"] == "use-after-end")
        .collect();
    assert_eq!(floods.len(), 1, "{findings:#?}");
    let flood = floods[0];
    assert_eq!(flood["count"].as_f64(), Some(total));
    assert_eq!(flood["current"]["app_name"], "flood-app");
    assert_eq!(flood["current"]["command"], "find");
    assert_eq!(flood["current"]["namespace"], "app.items");
    assert_eq!(flood["earlier"]["command"], "killSessions");
    assert_eq!(flood["sessions"]["count"], TASKS);
    assert_eq!(flood["sessions"]["exact"], true);
    let flood_id = flood["fingerprint"].as_str().unwrap().to_string();
    assert_eq!(flood_id.len(), 12);

    // The rare one is there too.
    let rare = findings
        .iter()
        .find(|f| f["rule"] == "closed-with-requests-in-flight")
        .unwrap_or_else(|| panic!("{findings:#?}"));
    assert_eq!(rare["earlier"]["app_name"], "rare-app");
    assert_eq!(rare["earlier"]["command"], "aggregate");
    assert_eq!(rare["count"], 1);
    let rare_id = rare["fingerprint"].as_str().unwrap().to_string();

    // The log: a line or two for thousands of violations.
    let flood_lines = logs::containing(&format!("finding={flood_id}"));
    assert!(
        !flood_lines.is_empty() && flood_lines.len() <= 3,
        "{} lines for the flood: {flood_lines:#?}",
        flood_lines.len()
    );
    assert_eq!(logs::containing(&format!("finding={rare_id}")).len(), 1);

    // /violations: bounded, and the rare one's only example survived
    // thousands of newer violations.
    let violations = h.get_json("/violations").await;
    let violations = violations.as_array().unwrap();
    assert_eq!(violations.len(), 100);
    assert_eq!(
        violations
            .iter()
            .filter(|v| v["finding"] == rare_id.as_str())
            .count(),
        1,
        "{violations:#?}"
    );
    assert!(violations[1..]
        .iter()
        .all(|v| v["finding"] == flood_id.as_str()));

    // /findings/<id>: the examples, with the session's timeline ending at
    // the offending find, right after the kill it follows.
    let detail = h.get_json(&format!("/findings/{flood_id}")).await;
    assert_eq!(detail["count"].as_f64(), Some(total));
    for example in ["first", "latest"] {
        let example = &detail["examples"][example];
        assert_eq!(example["violation"]["finding"], flood_id.as_str());
        assert_eq!(example["violation"]["rule"], "use-after-end");
        let timeline = example["timeline"].as_array().unwrap();
        let roles: Vec<&str> = timeline
            .iter()
            .filter_map(|op| op["role"].as_str())
            .collect();
        assert_eq!(roles, vec!["earlier", "current"], "{timeline:#?}");
        let last = timeline.last().unwrap();
        assert_eq!(last["command"], "find");
        assert_eq!(
            last["request_id"],
            example["violation"]["evidence"]["current"]["request_id"]
        );
        assert_eq!(timeline[timeline.len() - 2]["command"], "killSessions");
    }
    let rare_detail = h.get_json(&format!("/findings/{rare_id}")).await;
    let timeline = rare_detail["examples"]["first"]["timeline"]
        .as_array()
        .unwrap();
    assert_eq!(timeline.last().unwrap()["command"], "aggregate");
    assert!(timeline.last().unwrap()["replied"].is_null());
    for missing in [
        "/findings/000000000000",
        "/findings/not-a-finding",
        "/findings/",
    ] {
        assert_eq!(
            http_get(h.admin, missing, None).await.status,
            404,
            "{missing}"
        );
    }

    drop(session);
    rare_client.shutdown().await;
    flood_client.shutdown().await;
    h.stop().await;
}
