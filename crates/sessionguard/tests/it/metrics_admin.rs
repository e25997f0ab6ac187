//! The metrics and the admin API with real parts: the emulator upstream, the
//! proxy with the session engine as its inspector, the official Rust driver
//! running a workload (and one deliberate misuse), and the admin server
//! scraped over HTTP. The exposition must pass `promtool check metrics`
//! (Debian package `prometheus`, binary `/usr/bin/promtool`; override the
//! path with `PROMTOOL`); without promtool the test fails.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use common::{http_get, HttpReply, Stack};
use mongodb::options::FindOptions;
use mongodb::Client;
use serde_json::Value;
use sessionguard::admin::{self, AdminContext, AdminServer};
use sessionguard::config::ProxyConfig;
use sessionguard::metrics::Metrics;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_engine::{RuleId, RulesConfig, SessionConfig, SessionEngine};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789abcdef";
use common::{lsid_string, WAIT};

struct Harness {
    emulator: Option<EmulatorHandle>,
    engine: Arc<SessionEngine>,
    proxy: common::GuardedProxy,
    admin: AdminServer,
    admin_shutdown: CancellationToken,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(SessionConfig::default()).await
    }

    async fn start_with(sessions: SessionConfig) -> Harness {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let emulator = Emulator::start(loopback, EmulatorConfig::default())
            .await
            .expect("emulator starts");
        // guarded_proxy resolves the rules for the default mode.
        assert_eq!(sessions.mode, SessionConfig::default().mode);
        let engine = Arc::new(SessionEngine::new(&sessions, &RulesConfig::default()));
        let proxy = common::guarded_proxy(emulator.addr(), engine.clone(), |_| {}).await;
        let (admin, admin_shutdown) =
            common::admin_for(&proxy, Some(engine.clone()), emulator.addr(), Some(TOKEN)).await;
        Harness {
            emulator: Some(emulator),
            engine,
            proxy,
            admin,
            admin_shutdown,
        }
    }

    async fn client(&self, app: &str) -> Client {
        Client::with_uri_str(format!(
            "mongodb://{}/?directConnection=true&appName={app}",
            self.proxy.local_addr()
        ))
        .await
        .expect("client options parse")
    }

    async fn get(&self, path: &str, token: Option<&str>) -> HttpReply {
        http_get(self.admin.local_addr, path, token).await
    }

    async fn get_json(&self, path: &str) -> Value {
        let reply = self.get(path, Some(TOKEN)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert_eq!(
            reply.headers.get("content-type").map(String::as_str),
            Some("application/json"),
            "{path}"
        );
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{path}: {e}: {}", reply.body))
    }

    async fn stop(mut self) {
        self.proxy.shutdown_now();
        self.proxy.wait().await;
        self.admin_shutdown.cancel();
        let _ = self.admin.task.await;
        if let Some(emulator) = self.emulator.take() {
            emulator.shutdown().await;
        }
    }
}

/// The value of one series in a text exposition (`name{labels}` exactly as
/// the encoder writes it, labels sorted by name); missing fails the test.
fn sample(exposition: &str, series: &str) -> f64 {
    common::metric(exposition, series)
        .unwrap_or_else(|| panic!("series `{series}` missing from the exposition"))
}

fn promtool() -> String {
    let path = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string());
    let found = Command::new(&path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        let context = if std::env::var_os("CI").is_some() {
            "CI is set, so this is a failure"
        } else {
            "install it to run this test"
        };
        panic!(
            "\n\n*** promtool not found ({path}); {context}: `apt-get install -y prometheus` \
             (Debian package `prometheus` provides /usr/bin/promtool), or set PROMTOOL ***\n"
        );
    }
    path
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), exposition.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && report.trim().is_empty(),
        "promtool check metrics complained:\n{report}"
    );
}

#[tokio::test]
async fn a_driver_workload_shows_up_in_metrics_sessions_and_violations() {
    let h = Harness::start().await;
    let client = h.client("shop").await;
    let items = client.database("app").collection::<Document>("items");

    // Ordinary traffic: writes, a cursor that needs getMores, an update.
    let docs: Vec<Document> = (0..30).map(|i| doc! { "_id": i, "n": i }).collect();
    items.insert_many(docs).await.unwrap();
    let options = FindOptions::builder().batch_size(7).build();
    let mut cursor = items.find(doc! {}).with_options(options).await.unwrap();
    let mut read = 0;
    while cursor.advance().await.unwrap() {
        read += 1;
    }
    assert_eq!(read, 30);
    items
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "n": 100 } })
        .await
        .unwrap();

    // A transaction, observed in /sessions while it is open, then committed.
    let mut txn_session = client.start_session().await.unwrap();
    txn_session.start_transaction().await.unwrap();
    items
        .insert_one(doc! { "_id": 1000 })
        .session(&mut txn_session)
        .await
        .unwrap();
    let txn_lsid = lsid_string(txn_session.id());
    let open = h.get_json("/sessions?state=in_transaction").await;
    let listed: Vec<&Value> = open["sessions"].as_array().unwrap().iter().collect();
    assert!(
        listed.iter().any(|s| s["lsid"] == txn_lsid.as_str()
            && s["in_transaction"] == true
            && s["transaction"]["phase"] == "open"),
        "{open}"
    );
    txn_session.commit_transaction().await.unwrap();

    // A session ended explicitly and never used again: a tombstone.
    let ended_session = client.start_session().await.unwrap();
    let ended_lsid = lsid_string(ended_session.id());
    client
        .database("admin")
        .run_command(doc! { "endSessions": [ended_session.id().clone()] })
        .await
        .unwrap();

    // The misuse: a session killed by someone else and then used again.
    let mut killed = client.start_session().await.unwrap();
    items
        .find_one(doc! { "_id": 2 })
        .session(&mut killed)
        .await
        .unwrap();
    client
        .database("admin")
        .run_command(doc! { "killSessions": [killed.id().clone()] })
        .await
        .unwrap();
    items
        .find_one(doc! { "_id": 3 })
        .session(&mut killed)
        .await
        .unwrap();
    let killed_lsid = lsid_string(killed.id());
    let engine = h.engine.clone();
    assert!(
        Stack::eventually(WAIT, || engine
            .violations()
            .iter()
            .any(|v| v.rule == RuleId::UseAfterEnd))
        .await,
        "use-after-end never fired"
    );

    // /metrics needs no token and is the text format.
    let scraped = h.get("/metrics", None).await;
    assert_eq!(scraped.status, 200);
    assert!(
        scraped.headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{:?}",
        scraped.headers
    );
    let text = scraped.body;
    let value = |series: &str| sample(&text, series);
    assert!(value("sessionguard_commands_total{command=\"insert\"}") >= 2.0);
    assert!(value("sessionguard_commands_total{command=\"find\"}") >= 3.0);
    assert!(value("sessionguard_commands_total{command=\"getMore\"}") >= 4.0);
    assert!(value("sessionguard_commands_total{command=\"update\"}") >= 1.0);
    assert!(value("sessionguard_commands_total{command=\"commitTransaction\"}") >= 1.0);
    assert_eq!(
        value("sessionguard_commands_total{command=\"killSessions\"}"),
        1.0
    );
    assert!(
        value("sessionguard_bytes_total{direction=\"client_to_upstream\",opcode=\"msg\"}") > 1000.0
    );
    assert!(
        value("sessionguard_bytes_total{direction=\"upstream_to_client\",opcode=\"msg\"}") > 1000.0
    );
    assert!(
        value("sessionguard_frames_total{direction=\"upstream_to_client\",opcode=\"msg\"}") >= 10.0
    );
    assert!(value("sessionguard_command_duration_seconds_count{command=\"insert\"}") >= 2.0);
    assert!(
        value("sessionguard_command_duration_seconds_bucket{command=\"find\",le=\"+Inf\"}") >= 3.0
    );
    assert!(value("sessionguard_connections_accepted_total") >= 1.0);
    assert!(value("sessionguard_connections_active") >= 1.0);
    assert_eq!(value("sessionguard_connections_rejected_total"), 0.0);
    assert_eq!(value("sessionguard_upstream_up"), 1.0);
    assert_eq!(
        value("sessionguard_violations_total{action=\"log\",rule=\"use-after-end\"}"),
        1.0
    );
    assert_eq!(
        value("sessionguard_violations_total{action=\"log\",rule=\"concurrent-use\"}"),
        0.0
    );
    assert!(value("sessionguard_sessions_tracked") >= 3.0);
    assert!(value("sessionguard_requests_inspected_total") >= 10.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        // Never an lsid (or anything else a client chose) in a label.
        assert!(!line.contains(&killed_lsid), "{line}");
        assert!(!line.contains("app.items"), "{line}");
    }
    promtool_check(&text);

    // /violations: oldest first, with rule, severity, action, lsid, at, evidence.
    let violations = h.get_json("/violations").await;
    let list = violations.as_array().expect("a JSON array");
    let ids: Vec<u64> = list.iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
    let use_after_end = list
        .iter()
        .find(|v| v["rule"] == "use-after-end")
        .unwrap_or_else(|| panic!("{violations}"));
    assert_eq!(use_after_end["severity"], "error");
    assert_eq!(use_after_end["action"], "log");
    assert_eq!(use_after_end["lsid"], killed_lsid.as_str());
    assert!(use_after_end["at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(use_after_end["evidence"]["current"]["command"], "find");
    assert_eq!(
        use_after_end["evidence"]["current"]["namespace"],
        "app.items"
    );
    assert_eq!(use_after_end["evidence"]["current"]["app_name"], "shop");
    assert_eq!(
        use_after_end["evidence"]["earlier"]["command"],
        "killSessions"
    );

    // /sessions: every tracked session, and each filter keeps only its kind.
    let all = h.get_json("/sessions").await;
    assert_eq!(
        all["total"].as_u64().unwrap(),
        all["sessions"].as_array().unwrap().len() as u64
    );
    assert!(all["total"].as_u64().unwrap() >= 3, "{all}");
    let ended = h.get_json("/sessions?state=ended").await;
    let ended_list = ended["sessions"].as_array().unwrap();
    assert!(
        ended_list
            .iter()
            .any(|s| s["lsid"] == ended_lsid.as_str() && s["state"] == "ended"),
        "{ended}"
    );
    assert!(ended_list.iter().all(|s| s["state"] != "active"), "{ended}");
    let active = h.get_json("/sessions?state=active").await;
    let active_list = active["sessions"].as_array().unwrap();
    assert!(
        active_list.iter().all(|s| s["state"] == "active"),
        "{active}"
    );
    // The killed session was used again: the server took it as a new one.
    assert!(
        active_list
            .iter()
            .any(|s| s["lsid"] == killed_lsid.as_str()),
        "{active}"
    );
    assert!(
        !active_list.iter().any(|s| s["lsid"] == ended_lsid.as_str()),
        "{active}"
    );
    let limited = h.get_json("/sessions?limit=1").await;
    assert_eq!(limited["returned"], 1, "{limited}");
    assert_eq!(
        h.get("/sessions?state=bogus", Some(TOKEN)).await.status,
        400
    );
    assert_eq!(h.get("/sessions?limit=0", Some(TOKEN)).await.status, 400);

    // The token: required, rejected when wrong, accepted when right.
    for path in ["/violations", "/sessions", "/readyz"] {
        let missing = h.get(path, None).await;
        assert_eq!(missing.status, 401, "{path} without a token");
        assert!(missing.headers["www-authenticate"].starts_with("Bearer"));
        let wrong = h.get(path, Some("test-token-0123456789abcdeX")).await;
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
        assert_eq!(h.get(path, Some(TOKEN)).await.status, 200, "{path}");
    }
    assert_eq!(h.get("/healthz", None).await.status, 200);

    // Client::shutdown waits for every session and cursor to be dropped.
    drop(cursor);
    drop(ended_session);
    drop(killed);
    drop(txn_session);
    client.shutdown().await;
    h.stop().await;
}

/// The session and transaction lifecycle series, in a fixed order.
const LIFECYCLE: [&str; 10] = [
    "sessionguard_sessions_started_total",
    "sessionguard_sessions_ended_total{how=\"ended\"}",
    "sessionguard_sessions_ended_total{how=\"killed\"}",
    "sessionguard_sessions_ended_total{how=\"expired\"}",
    "sessionguard_sessions_tombstoned",
    "sessionguard_transactions_total{outcome=\"started\"}",
    "sessionguard_transactions_total{outcome=\"committed\"}",
    "sessionguard_transactions_total{outcome=\"aborted\"}",
    "sessionguard_transactions_left_open_total",
    "sessionguard_commands_total{command=\"commitTransaction\"}",
];

impl Harness {
    /// The LIFECYCLE series as scraped from /metrics.
    async fn lifecycle(&self) -> [f64; LIFECYCLE.len()] {
        let text = self.get("/metrics", None).await.body;
        LIFECYCLE.map(|series| sample(&text, series))
    }
}

#[tokio::test]
async fn session_and_transaction_counters_move_by_exactly_what_a_driver_did() {
    // Short enough for the test to leave a transaction open past it.
    let sessions = SessionConfig {
        transaction_max_open: Duration::from_millis(300),
        ..SessionConfig::default()
    };
    let h = Harness::start_with(sessions).await;
    // Every operation runs on an explicit session, so the driver's implicit
    // session pool cannot add sessions the test does not know about.
    let client = h.client("lifecycle").await;
    let items = client.database("app").collection::<Document>("items");
    assert_eq!(h.lifecycle().await, [0.0; LIFECYCLE.len()]);

    // Session A: a committed transaction, its commit run twice (the driver
    // re-sends commitTransaction when asked to commit again): one commit.
    let mut a = client.start_session().await.unwrap();
    a.start_transaction().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut a)
        .await
        .unwrap();
    a.commit_transaction().await.unwrap();
    a.commit_transaction().await.unwrap();
    assert_eq!(
        h.lifecycle().await,
        [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 2.0]
    );

    // An aborted transaction on A.
    a.start_transaction().await.unwrap();
    items
        .insert_one(doc! { "_id": 2 })
        .session(&mut a)
        .await
        .unwrap();
    a.abort_transaction().await.unwrap();
    assert_eq!(
        h.lifecycle().await,
        [1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0, 1.0, 0.0, 2.0]
    );

    // A transaction left open past transaction_max_open, noticed by the
    // sweep (once, however often it runs), then aborted.
    a.start_transaction().await.unwrap();
    items
        .insert_one(doc! { "_id": 3 })
        .session(&mut a)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.engine.sweep();
    h.engine.sweep();
    assert_eq!(
        h.lifecycle().await,
        [1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0, 2.0]
    );
    a.abort_transaction().await.unwrap();

    // Session B, used once, then killed (killSessions sent on session A).
    let mut b = client.start_session().await.unwrap();
    items
        .find_one(doc! { "_id": 1 })
        .session(&mut b)
        .await
        .unwrap();
    client
        .database("admin")
        .run_command(doc! { "killSessions": [b.id().clone()] })
        .session(&mut a)
        .await
        .unwrap();
    assert_eq!(
        h.lifecycle().await,
        [2.0, 0.0, 1.0, 0.0, 1.0, 3.0, 1.0, 2.0, 1.0, 2.0]
    );

    // Shutdown ends the pooled sessions, A and B, in one endSessions: A
    // ends; B was already killed, so it is not ended twice.
    drop(a);
    drop(b);
    client.shutdown().await;
    assert_eq!(
        h.lifecycle().await,
        [2.0, 1.0, 1.0, 0.0, 2.0, 3.0, 1.0, 2.0, 1.0, 2.0]
    );
    // The left-open transaction is the only misuse in this workload.
    let fired: Vec<RuleId> = h.engine.violations().iter().map(|v| v.rule).collect();
    assert_eq!(fired, vec![RuleId::TxnLeftOpen]);
    promtool_check(&h.get("/metrics", None).await.body);
    h.stop().await;
}

#[tokio::test]
async fn readyz_is_503_while_draining() {
    let h = Harness::start().await;
    let ready = h.get("/readyz", Some(TOKEN)).await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    // A client keeps a connection (and the drain) open.
    let client = h.client("drain").await;
    client
        .database("app")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap();

    h.proxy.drain();
    let draining = h.get("/readyz", Some(TOKEN)).await;
    assert_eq!(draining.status, 503, "{}", draining.body);
    let body: Value = serde_json::from_str(&draining.body).unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["draining"], true);
    assert_eq!(body["upstream_reachable"], true);
    let metrics = h.get("/metrics", None).await.body;
    assert_eq!(sample(&metrics, "sessionguard_draining"), 1.0);
    // Liveness is unaffected.
    assert_eq!(h.get("/healthz", None).await.status, 200);
    client.shutdown().await;
    h.stop().await;
}

#[tokio::test]
async fn readyz_is_503_while_the_upstream_is_unreachable() {
    let mut h = Harness::start().await;
    let addr = h.admin.local_addr;
    let ready = h.get("/readyz", Some(TOKEN)).await;
    assert_eq!(ready.status, 200, "{}", ready.body);

    h.emulator.take().unwrap().shutdown().await;
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut flipped = false;
    while tokio::time::Instant::now() < deadline {
        let reply = http_get(addr, "/readyz", Some(TOKEN)).await;
        if reply.status == 503 {
            flipped = true;
            last = reply.body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(flipped, "/readyz never became 503: {last}");
    let body: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(body["upstream_reachable"], false);
    assert_eq!(body["draining"], false);
    let metrics = h.get("/metrics", None).await.body;
    assert_eq!(sample(&metrics, "sessionguard_upstream_up"), 0.0);

    // A client that connects now cannot reach the upstream: counted by reason.
    let mut raw = tokio::net::TcpStream::connect(h.proxy.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, raw.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    let metrics = h.get("/metrics", None).await.body;
    assert_eq!(
        sample(
            &metrics,
            "sessionguard_upstream_connect_errors_total{reason=\"refused\"}"
        ),
        1.0
    );
    h.stop().await;
}

/// With replica-set members mapped, every member is probed and the proxy
/// stays ready while any member is reachable: one member down (listed
/// first here, where a single-target probe would look) must not take the
/// proxy out of service, nor may a client's failed dial of that member.
#[tokio::test]
async fn one_replica_set_member_down_keeps_readyz_ready_and_all_down_does_not() {
    let live = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .expect("emulator starts");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap(); // closed when the listener drops: connecting is refused
    let member = |upstream: SocketAddr| sessionguard::config::MemberConfig {
        upstream: upstream.to_string(),
        listen: "127.0.0.1:0".to_string(),
        advertise: None,
    };
    let config = ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        upstream: format!("mongodb://{dead},{}/?replicaSet=rs0", live.addr()),
        members: vec![member(dead), member(live.addr())],
        upstream_probe_interval: Duration::from_millis(100),
        ..ProxyConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    let proxy = sessionguard::start_proxy(
        &config,
        Arc::new(sessionguard_proxy::NoopInspector),
        &metrics,
    )
    .await
    .expect("proxy starts");
    let context = AdminContext::for_proxy(&config, metrics, None).expect("admin context");
    assert_eq!(context.probe.as_ref().map(|p| p.targets.len()), Some(2));
    let shutdown = CancellationToken::new();
    let admin = admin::serve_with("127.0.0.1:0", context, shutdown.clone())
        .await
        .expect("admin starts");

    // Several probe rounds, and a client dialing the dead member's listener.
    let dead_listener = proxy
        .listeners()
        .iter()
        .find(|l| l.upstream.port == dead.port())
        .expect("a listener for the dead member")
        .local_addr;
    let mut client = tokio::net::TcpStream::connect(dead_listener).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(WAIT, client.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    for _ in 0..5 {
        let reply = http_get(admin.local_addr, "/readyz", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The last member goes too: now the proxy cannot serve.
    live.shutdown().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = http_get(admin.local_addr, "/readyz", None).await;
    while last.status != 503 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = http_get(admin.local_addr, "/readyz", None).await;
    }
    assert_eq!(last.status, 503, "{}", last.body);
    shutdown.cancel();
    proxy.shutdown_now();
}
