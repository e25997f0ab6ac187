//! Upstream faults with real parts: the proxy (session engine inspecting)
//! in front of the emulator, sometimes through a small TCP relay that can
//! reset every connection on demand. The upstream is down at start, killed
//! mid-request, restarted over the same data set, stalling, and resetting
//! connections. The proxy must never crash, close the affected clients
//! promptly (so drivers retry), recover when the upstream returns, and say
//! so on `/readyz`; a retryable-write workload of the Rust driver must
//! complete across restarts with every write stored exactly once. A client
//! whose upstream cannot be dialed gets its handshake answered with an error
//! naming the upstream, the cause and the fix (OP_MSG and legacy OP_QUERY),
//! so the driver's error says why.

use sessionguard_test_support as common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::Client;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle, EmulatorState};
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};
use sessionguard_proxy::{CloseCause, ProxyHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::http_get;

use common::{Relay, WAIT};
/// How soon a client must be closed once its upstream is gone.
const PROMPTLY: Duration = Duration::from_secs(2);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap()
}

fn engine() -> Arc<SessionEngine> {
    Arc::new(SessionEngine::new(
        &SessionConfig::default(),
        &RulesConfig::default(),
    ))
}

/// An emulator listener that can be killed and started again on the same
/// port over the same data set (sessions, retryable-write history, documents).
struct Upstream {
    addr: SocketAddr,
    state: Arc<EmulatorState>,
    handle: Option<EmulatorHandle>,
}

impl Upstream {
    async fn start(config: EmulatorConfig) -> Upstream {
        let handle = Emulator::start(loopback(), config)
            .await
            .expect("emulator starts");
        Upstream {
            addr: handle.addr(),
            state: handle.state(),
            handle: Some(handle),
        }
    }

    /// Closes the listener and every connection it has (a crash, as the
    /// proxy sees it: sockets closed mid-request).
    async fn kill(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().await;
        }
    }

    /// Listens again on the same address over the same data set.
    async fn restart(&mut self) {
        assert!(self.handle.is_none(), "kill it first");
        let deadline = Instant::now() + WAIT;
        let handle = loop {
            match Emulator::start_member(self.addr, self.state.clone()).await {
                Ok(handle) => break handle,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        // A restarted listener registers as another member of the state;
        // it is the one serving now, so it is the primary.
        handle.set_primary(true);
        self.handle = Some(handle);
    }
}

async fn driver(proxy: &ProxyHandle, extra: &str) -> Client {
    Client::with_uri_str(format!(
        "mongodb://{}/?directConnection=true{extra}",
        proxy.local_addr()
    ))
    .await
    .expect("client options parse")
}

/// Connects a raw client, sends `body` as an OP_MSG, and returns the stream.
async fn raw_request(proxy: SocketAddr, body: &Document) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let frame = sessionguard_protocol::wire::op_msg::encode(
        1,
        0,
        Default::default(),
        &bson::to_vec(body).unwrap(),
    );
    stream.write_all(&frame).await.expect("write");
    stream
}

/// Reads until the proxy closes the connection; `Err` with what arrived instead.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => Err(format!("still open after {within:?}")),
        Ok(Ok(0)) | Ok(Err(_)) => Ok(started.elapsed()),
        Ok(Ok(n)) => Err(format!("got {n} bytes instead of a close")),
    }
}

/// A handshake on a fresh connection is answered with the documented error
/// reply in the handshake's own opcode (OP_MSG, or OP_REPLY for a legacy
/// OP_QUERY), naming `upstream` and the refused connection, and the
/// connection is then closed.
async fn assert_refused_with_explanation(proxy: SocketAddr, upstream: SocketAddr, legacy: bool) {
    let outcome = common::handshake_once(proxy, legacy).await;
    let (op, response_to, reply) = outcome
        .reply
        .unwrap_or_else(|| panic!("legacy={legacy}: a bare close, not an explanation"));
    let expected_op = if legacy {
        sessionguard_protocol::wire::OpCode::Reply
    } else {
        sessionguard_protocol::wire::OpCode::Msg
    };
    assert_eq!((op, response_to), (expected_op, 7), "{reply}");
    assert_eq!(reply.get_f64("ok").ok(), Some(0.0), "{reply}");
    assert_eq!(reply.get_i32("code").ok(), Some(6), "{reply}");
    assert_eq!(reply.get_str("codeName").ok(), Some("HostUnreachable"));
    let labels: Vec<&str> = reply
        .get_array("errorLabels")
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert_eq!(labels, ["RetryableWriteError"], "{reply}");
    let errmsg = reply.get_str("errmsg").unwrap();
    assert!(
        errmsg.starts_with(&format!(
            "sessionguard could not reach upstream {upstream}: connection refused"
        )) && errmsg.contains("Fix:"),
        "{errmsg}"
    );
    assert!(outcome.closed, "closed after the reply");
}

/// Polls `/readyz` until it answers `status`.
async fn readyz_becomes(admin: SocketAddr, status: u16) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if http_get(admin, "/readyz", None).await.status == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_at_start_closes_clients_then_recovers() {
    let dead = free_port();
    let proxy = common::guarded_proxy(dead, engine(), |_| {}).await;
    let (admin, admin_stop) = common::admin_for(&proxy, None, dead, None).await;

    // Nobody listens upstream: the client's hello is answered with the
    // reason, then the connection is closed, not left hanging.
    assert_refused_with_explanation(proxy.local_addr(), dead, false).await;
    assert!(
        readyz_becomes(admin.local_addr, 503).await,
        "/readyz stays 200"
    );
    let body: serde_json::Value =
        serde_json::from_str(&http_get(admin.local_addr, "/readyz", None).await.body).unwrap();
    assert_eq!(body["upstream_reachable"], false, "{body}");
    let metrics = proxy.metrics().render();
    assert!(
        common::metric(
            &metrics,
            "sessionguard_upstream_connect_errors_total{reason=\"refused\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        common::metric(&metrics, "sessionguard_upstream_up"),
        Some(0.0)
    );

    // A driver started now waits in server selection instead of failing...
    let client = driver(&proxy, "&serverSelectionTimeoutMS=15000").await;
    let items = client.database("faults").collection::<Document>("items");
    let pending = tokio::spawn({
        let items = items.clone();
        async move { items.insert_one(doc! { "_id": "first" }).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "the insert cannot have succeeded yet"
    );

    // ...and the upstream comes up on that address: everything recovers.
    let upstream = Emulator::start(dead, EmulatorConfig::default())
        .await
        .expect("the emulator takes the address");
    pending
        .await
        .unwrap()
        .expect("the insert succeeds once the upstream is up");
    assert!(
        readyz_becomes(admin.local_addr, 200).await,
        "/readyz stays 503"
    );
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 1);
    assert_eq!(
        common::metric(&proxy.metrics().render(), "sessionguard_upstream_up"),
        Some(1.0)
    );

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    admin_stop.cancel();
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_explained_in_the_drivers_error_and_others_are_served() {
    let dead = free_port();
    let proxy = common::guarded_proxy(dead, engine(), |_| {}).await;
    // A client that connected but says nothing: its wait for a first frame
    // must not hold anyone else up.
    let silent = TcpStream::connect(proxy.local_addr()).await.unwrap();

    let client = driver(&proxy, "&serverSelectionTimeoutMS=1500").await;
    let err = client
        .database("faults")
        .collection::<Document>("items")
        .insert_one(doc! { "_id": 1 })
        .await
        .expect_err("nothing listens upstream")
        .to_string();
    assert!(
        err.contains(&format!(
            "sessionguard could not reach upstream {dead}: connection refused"
        )),
        "the driver's error must say why: {err}"
    );
    assert!(
        err.contains("is mongod running"),
        "and what to check: {err}"
    );
    // Legacy drivers and tools handshake with OP_QUERY isMaster.
    assert_refused_with_explanation(proxy.local_addr(), dead, true).await;
    assert_refused_with_explanation(proxy.local_addr(), dead, false).await;
    assert!(
        common::metric(
            &proxy.metrics().render(),
            "sessionguard_upstream_connect_errors_total{reason=\"refused\"}"
        )
        .unwrap()
            >= 3.0
    );

    // The upstream comes up: the same proxy serves a new client normally.
    let upstream = Emulator::start(dead, EmulatorConfig::default())
        .await
        .expect("the emulator takes the address");
    let fresh = driver(&proxy, "&serverSelectionTimeoutMS=10000").await;
    fresh
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .expect("ping once the upstream is up");
    drop(silent);
    client.shutdown().await;
    fresh.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_request_closes_the_client_and_restart_recovers() {
    let mut upstream = Upstream::start(EmulatorConfig {
        command_latency: HashMap::from([("find".to_string(), Duration::from_secs(5))]),
        ..EmulatorConfig::default()
    })
    .await;
    let proxy = common::guarded_proxy(upstream.addr, engine(), |_| {}).await;
    let (admin, admin_stop) = common::admin_for(&proxy, None, upstream.addr, None).await;
    assert!(readyz_becomes(admin.local_addr, 200).await);

    // A find that the upstream holds for 5 s; the upstream dies meanwhile.
    let mut raw = raw_request(
        proxy.local_addr(),
        &doc! { "find": "items", "filter": {}, "$db": "faults" },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    upstream.kill().await;
    let took = closed_within(&mut raw, WAIT).await.expect("closed");
    assert!(
        killed_at.elapsed() < PROMPTLY,
        "the client was closed {took:?} after the kill; it must not wait for the reply"
    );
    assert!(readyz_becomes(admin.local_addr, 503).await);

    // While the upstream is down, every new client is told why and closed.
    for legacy in [false, true, false] {
        assert_refused_with_explanation(proxy.local_addr(), upstream.addr, legacy).await;
    }

    // Back on the same address over the same data: the proxy just works.
    upstream.restart().await;
    assert!(readyz_becomes(admin.local_addr, 200).await);
    let client = driver(&proxy, "").await;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .expect("ping after the restart");
    assert!(proxy.active_connections() > 0);

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    admin_stop.cancel();
    upstream.kill().await;
}

/// Inserts `total` documents with unique _ids on `workers` tasks, each
/// insert awaited before the next; returns the ids that failed with the
/// error. The driver retries a retryable write once; an application would
/// retry what is still failing, and so does this one, with the same _id,
/// until `deadline` (a duplicate would then show up as a duplicate key
/// error or as an extra document).
async fn insert_all(
    client: &Client,
    workers: usize,
    total: usize,
    deadline: Duration,
) -> (Vec<String>, u64) {
    let items = client.database("faults").collection::<Document>("writes");
    let app_retries = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let items = items.clone();
            let app_retries = app_retries.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut failures = Vec::new();
                for n in (worker..total).step_by(workers) {
                    let id = format!("doc-{n:05}");
                    loop {
                        match items.insert_one(doc! { "_id": &id, "n": n as i64 }).await {
                            Ok(_) => break,
                            Err(e) if started.elapsed() < deadline && is_transient(&e) => {
                                app_retries.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => {
                                failures.push(format!("{id}: {e}"));
                                break;
                            }
                        }
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    (failures, app_retries.load(Ordering::Relaxed))
}

/// An error that says "the server was not reachable", never "the write was
/// refused" (a duplicate key would be a duplicated write).
fn is_transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    matches!(
        *e.kind,
        ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::ServerSelection { .. }
    ) || e.contains_label("RetryableWriteError")
}

async fn assert_each_write_stored_once(client: &Client, total: usize) {
    let items = client.database("faults").collection::<Document>("writes");
    assert_eq!(
        items.count_documents(doc! {}).await.unwrap(),
        total as u64,
        "no write lost, none duplicated"
    );
    let mut cursor = items.find(doc! {}).await.unwrap();
    let mut seen = HashSet::new();
    while cursor.advance().await.unwrap() {
        let doc = cursor.deserialize_current().unwrap();
        let id = doc.get_str("_id").unwrap().to_string();
        assert!(seen.insert(id.clone()), "{id} stored twice");
    }
    let expected: HashSet<String> = (0..total).map(|n| format!("doc-{n:05}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_writes_complete_across_upstream_restarts_exactly_once() {
    const TOTAL: usize = 600;
    // Latency after execution and before the reply: a kill then loses the
    // reply of a write the upstream already applied, which is exactly the
    // case retryable writes exist for.
    let mut upstream = Upstream::start(EmulatorConfig {
        reply_latency: Duration::from_millis(5),
        ..EmulatorConfig::default()
    })
    .await;
    let proxy = common::guarded_proxy(upstream.addr, engine(), |_| {}).await;
    let (admin, admin_stop) = common::admin_for(&proxy, None, upstream.addr, None).await;
    let client = driver(&proxy, "&retryWrites=true&serverSelectionTimeoutMS=20000").await;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap();

    let writer = {
        let client = client.clone();
        tokio::spawn(async move { insert_all(&client, 4, TOTAL, Duration::from_secs(40)).await })
    };
    let state = upstream.state.clone();
    let writes = || state.command_count("insert");
    let mut restarts = 0;
    for at in [100u64, 250, 400] {
        while writes() < at && !writer.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        upstream.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        upstream.restart().await;
        restarts += 1;
    }
    let (failures, app_retries) = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the workload finishes")
        .unwrap();
    assert!(failures.is_empty(), "writes failed: {failures:#?}");
    assert_eq!(restarts, 3);
    // The driver retried: the upstream saw more inserts than documents.
    let inserts_seen = writes();
    assert!(
        inserts_seen > TOTAL as u64,
        "no insert was ever retried ({inserts_seen} inserts for {TOTAL} documents): the kills \
         missed the workload"
    );
    assert_each_write_stored_once(&client, TOTAL).await;
    assert!(readyz_becomes(admin.local_addr, 200).await);
    eprintln!(
        "{TOTAL} writes across {restarts} upstream restarts: {inserts_seen} inserts reached the \
         upstream, {app_retries} application-level retries"
    );

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    admin_stop.cancel();
    upstream.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_upstream_request_times_out_on_the_client_and_others_proceed() {
    let upstream = Upstream::start(EmulatorConfig {
        command_latency: HashMap::from([("distinct".to_string(), Duration::from_secs(60))]),
        ..EmulatorConfig::default()
    })
    .await;
    let proxy = common::guarded_proxy(upstream.addr, engine(), |_| {}).await;
    let (admin, admin_stop) = common::admin_for(&proxy, None, upstream.addr, None).await;
    let client = driver(&proxy, "&appName=stall").await;
    let items = client.database("faults").collection::<Document>("items");
    items.insert_one(doc! { "_id": 1, "k": "a" }).await.unwrap();
    let workload = common::Workload::start(&client, "faults-others", 2);

    // The application's own timeout fires; the driver drops that connection.
    let started = Instant::now();
    let stalled =
        tokio::time::timeout(Duration::from_millis(700), items.distinct("k", doc! {})).await;
    assert!(
        stalled.is_err(),
        "the stalled distinct returned: {stalled:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // A raw client stalled the same way gives up and hangs up: the proxy
    // releases its pair at once. (A proxy of its own, so that the driver's
    // pool coming and going cannot blur the connection count.)
    let lone = common::guarded_proxy(upstream.addr, engine(), |_| {}).await;
    let mut raw = raw_request(
        lone.local_addr(),
        &doc! { "distinct": "items", "key": "k", "$db": "faults" },
    )
    .await;
    assert!(common::Stack::eventually(WAIT, || lone.active_connections() == 1).await);
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), raw.read(&mut buf))
            .await
            .is_err(),
        "no reply while the upstream stalls"
    );
    drop(raw);
    assert!(
        common::Stack::eventually(WAIT, || lone.active_connections() == 0).await,
        "the proxy kept the pair of a client that hung up"
    );
    lone.shutdown_now();
    lone.wait().await;

    // Everyone else carried on the whole time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let result = workload.stop().await;
    assert!(result.errors.is_empty(), "{:?}", result.errors);
    assert!(result.operations >= 20, "{result:?}");
    assert_eq!(
        http_get(admin.local_addr, "/readyz", None).await.status,
        200
    );
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 1);

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    admin_stop.cancel();
    drop(upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_close_the_affected_clients_and_drivers_carry_on() {
    common::logs::install_at(tracing::Level::WARN);
    let upstream = Upstream::start(EmulatorConfig {
        command_latency: HashMap::from([("distinct".to_string(), Duration::from_secs(5))]),
        ..EmulatorConfig::default()
    })
    .await;
    let relay = Relay::start(upstream.addr).await;
    let proxy = common::guarded_proxy(relay.addr, engine(), |_| {}).await;
    let (admin, admin_stop) = common::admin_for(&proxy, None, relay.addr, None).await;

    // A request in flight when its upstream connection is reset.
    let mark = common::logs::mark();
    let mut raw = raw_request(
        proxy.local_addr(),
        &doc! { "distinct": "items", "key": "k", "$db": "faults" },
    )
    .await;
    let raw_peer = raw.local_addr().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reset_at = Instant::now();
    relay.reset_all();
    closed_within(&mut raw, WAIT).await.expect("closed");
    assert!(
        reset_at.elapsed() < PROMPTLY,
        "closed {:?} after the reset",
        reset_at.elapsed()
    );
    let needle = format!("peer={raw_peer}");
    assert!(
        common::Stack::eventually(WAIT, || common::logs::containing_since(mark, &needle)
            .iter()
            .any(|l| l.contains("connection closed")
                && l.contains("side=upstream")
                // The close cause the session engine was given, on the line.
                && (l.contains("upstream_error") || l.contains("upstream_closed"))))
        .await,
        "no close line naming the upstream (and the reason) for {raw_peer}"
    );

    // A retryable workload while every upstream connection is reset
    // again and again: the driver retries on fresh connections.
    let client = driver(&proxy, "&retryWrites=true&retryReads=true").await;
    let workload = common::Workload::start(&client, "faults-reset", 2);
    // One reset a second: the driver retries an operation once, so two
    // resets inside one operation and its retry would fail it by design.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        relay.reset_all();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = workload.stop().await;
    assert!(
        result.errors.is_empty(),
        "retryable operations failed across resets: {:?}",
        result.errors
    );
    assert!(result.operations >= 20, "{result:?}");
    assert!(
        relay.carried() > 2,
        "the relay carried the proxy's connections"
    );
    assert_eq!(
        http_get(admin.local_addr, "/readyz", None).await.status,
        200
    );
    assert_eq!(
        common::metric(
            &proxy.metrics().render(),
            "sessionguard_malformed_frames_total{side=\"upstream\"}"
        ),
        Some(0.0)
    );

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    admin_stop.cancel();
    drop(upstream);
}

/// Polls `condition` until it holds (or `WAIT` passes).
async fn eventually(condition: impl FnMut() -> bool) -> bool {
    common::Stack::eventually(WAIT, condition).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cut_with_session_requests_in_flight_is_no_misuse_and_the_retry_is_counted() {
    // The network drops the proxy's upstream connections while the Rust
    // driver's read and retryable write on an explicit session are in
    // flight. The driver retries both on new connections (same lsid, same
    // txnNumber for the write), as its specifications say: the application
    // is correct, so nothing may be reported — only counted.
    let upstream = Upstream::start(EmulatorConfig {
        command_latency: HashMap::from([
            ("find".to_string(), Duration::from_millis(800)),
            ("update".to_string(), Duration::from_millis(800)),
        ]),
        ..EmulatorConfig::default()
    })
    .await;
    let relay = Relay::start(upstream.addr).await;
    let engine = engine();
    let proxy = common::guarded_proxy(relay.addr, engine.clone(), |_| {}).await;
    let client = driver(&proxy, "&retryReads=true&retryWrites=true&appName=cut").await;
    let items = client.database("faults").collection::<Document>("cut");
    items.insert_one(doc! { "_id": 1, "n": 0 }).await.unwrap();

    let work = {
        let items = items.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let mut read_session = client.start_session().await?;
            let mut write_session = client.start_session().await?;
            let read = items.find_one(doc! { "_id": 1 }).session(&mut read_session);
            let write = items
                .update_one(doc! { "_id": 1 }, doc! { "$inc": { "n": 1 } })
                .session(&mut write_session);
            let (found, updated) = tokio::join!(read, write);
            mongodb::error::Result::Ok((found?, updated?))
        })
    };
    let state = upstream.state.clone();
    assert!(
        eventually(|| state.command_count("find") >= 1 && state.command_count("update") >= 1).await,
        "the read and the write reached the upstream"
    );
    relay.reset_all();
    let (found, updated) = tokio::time::timeout(WAIT, work)
        .await
        .expect("the driver's retries complete")
        .unwrap()
        .expect("the retried operations succeed");
    assert!(found.is_some());
    assert_eq!(updated.matched_count, 1);
    assert!(
        state.command_count("find") >= 2 && state.command_count("update") >= 2,
        "both were retried: {} finds, {} updates",
        state.command_count("find"),
        state.command_count("update")
    );
    let doc = items.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(
        doc.get_i32("n").unwrap(),
        1,
        "the write applied exactly once"
    );

    // Counted by why the connections closed, and as retries; never misuse.
    let cut = || {
        let abandoned = engine.stats().in_flight_abandoned;
        [CloseCause::UpstreamClosed, CloseCause::UpstreamError]
            .iter()
            .map(|cause| abandoned[cause.index()])
            .sum::<u64>()
    };
    assert!(eventually(|| cut() >= 2).await, "{:?}", engine.stats());
    let stats = engine.stats();
    let client_side: u64 = CloseCause::ALL
        .iter()
        .filter(|cause| cause.client_went_first())
        .map(|cause| stats.in_flight_abandoned[cause.index()])
        .sum();
    assert_eq!(client_side, 0, "{stats:?}");
    assert_eq!(
        engine
            .violations()
            .iter()
            .map(|v| v.rule)
            .collect::<Vec<_>>(),
        vec![],
        "an upstream cut is not client misuse"
    );
    let metrics = proxy.metrics().render();
    let retries = |command: &str| {
        common::metric(
            &metrics,
            &format!("sessionguard_retries_total{{command=\"{command}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(retries("find") >= 1.0, "{metrics}");
    assert!(retries("update") >= 1.0, "{metrics}");
    let abandoned = |reason: &str| {
        common::metric(
            &metrics,
            &format!("sessionguard_in_flight_abandoned_total{{reason=\"{reason}\"}}"),
        )
        .unwrap()
    };
    assert!(abandoned("upstream_error") + abandoned("upstream_closed") >= 2.0);
    assert_eq!(abandoned("client_closed") + abandoned("client_reset"), 0.0);

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    drop(upstream);
}
