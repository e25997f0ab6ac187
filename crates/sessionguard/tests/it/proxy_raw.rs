//! The proxy driven by raw wire frames, with the emulator as the upstream:
//! exact bytes forwarded, correlation (moreToCome, exhaust streams),
//! malformed frames from either side, upstream unreachable, connection cap,
//! drain, rejection and injection through the `Inspector` seam; plus the
//! `sessionguard` binary's CLI contract (check-config, exit 64, env
//! precedence, signals). A hand-written upstream is used only where the
//! emulator cannot misbehave (a malformed upstream frame).

use sessionguard_test_support as common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, Document};
use bytes::Bytes;
use common::{decode_reply, ok, RawClient, Stack};
use sessionguard::config::ProxyConfig;
use sessionguard::metrics::Metrics;
use sessionguard::start_proxy;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_protocol::wire::{
    self, legacy, op_compressed, op_msg, Compressor, Frame, FrameRef, Message, MsgFlags, OpCode,
};
use sessionguard_proxy::{
    CloseCause, ConnContext, InFlightRequest, InjectError, Inspector, NoopInspector, ProxyHandle,
    ReplyVerdict, Verdict,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::WAIT;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn bson_bytes(doc: &Document) -> Vec<u8> {
    bson::to_vec(doc).unwrap()
}

async fn emulator(config: EmulatorConfig) -> EmulatorHandle {
    Emulator::start(loopback(), config)
        .await
        .expect("emulator starts")
}

fn recording() -> EmulatorConfig {
    EmulatorConfig {
        record_frames: true,
        ..EmulatorConfig::default()
    }
}

fn proxy_config(upstream: SocketAddr) -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        upstream: format!("mongodb://{upstream}"),
        admin: "127.0.0.1:0".to_string(),
        ..ProxyConfig::default()
    }
}

async fn proxy(config: ProxyConfig, inspector: Arc<impl Inspector>) -> ProxyHandle {
    start_proxy(&config, inspector, &Metrics::new())
        .await
        .expect("proxy starts")
}

/// An inspector that records what it is shown and can reject one command.
#[derive(Default)]
struct Recorder {
    reject: Option<&'static str>,
    /// A command whose inspection panics (an inspector bug, simulated).
    panic_on: Option<&'static str>,
    contexts: Mutex<Vec<ConnContext>>,
    requests: Mutex<Vec<(u64, Option<String>)>>,
    replies: Mutex<Vec<(i32, Option<InFlightRequest>)>>,
    closes: Mutex<Vec<(u64, CloseCause, Vec<InFlightRequest>)>>,
}

impl Inspector for Recorder {
    type Pending = ();
    /// The connection's id as the inspector saw it at connect: each call
    /// checks that the proxy hands back that connection's own state.
    type Conn = u64;

    fn on_connect(&self, conn: &ConnContext) -> u64 {
        self.contexts.lock().unwrap().push(conn.clone());
        conn.id
    }

    fn on_request(
        &self,
        conn: &ConnContext,
        state: &u64,
        _frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> Verdict {
        assert_eq!(*state, conn.id, "another connection's state");
        let name = match msg {
            Message::Msg(m) => m.command_name(),
            Message::Query(q) => q.command_name(),
            _ => None,
        };
        self.requests
            .lock()
            .unwrap()
            .push((conn.id, name.map(str::to_string)));
        if name.is_some() && name == self.panic_on {
            panic!("test inspector: a bug while inspecting {name:?}");
        }
        if name.is_some() && name == self.reject {
            let reply = doc! {
                "ok": 0.0,
                "errmsg": "sessionguard: test-rule: rejected by the test inspector",
                "code": 9999,
                "codeName": "SessionGuardViolation",
            };
            return Verdict::Reject {
                reply: bson_bytes(&reply),
            };
        }
        Verdict::Forward(())
    }

    fn on_reply(
        &self,
        conn: &ConnContext,
        state: &u64,
        request: Option<&mut InFlightRequest>,
        frame: FrameRef<'_>,
        _msg: &Message<'_>,
    ) -> ReplyVerdict {
        assert_eq!(*state, conn.id, "another connection's state");
        self.replies
            .lock()
            .unwrap()
            .push((frame.header.response_to, request.cloned()));
        ReplyVerdict::Forward
    }

    fn on_close(
        &self,
        conn: &ConnContext,
        state: &u64,
        cause: CloseCause,
        still_in_flight: Vec<InFlightRequest>,
    ) {
        assert_eq!(*state, conn.id, "another connection's state");
        self.closes
            .lock()
            .unwrap()
            .push((conn.id, cause, still_in_flight));
    }
}

// ---------------------------------------------------------------- forwarding

#[tokio::test]
async fn frames_reach_the_upstream_byte_for_byte() {
    let emu = emulator(recording()).await;
    let proxy = proxy(proxy_config(emu.addr()), Arc::new(NoopInspector)).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;
    let mut sent = Vec::new();

    // Legacy OP_QUERY handshake, answered with OP_REPLY.
    let hello = legacy::encode_query(
        1,
        0,
        "admin.$cmd",
        0,
        -1,
        &bson_bytes(&doc! { "isMaster": 1, "helloOk": true }),
    );
    client.send_bytes(&hello).await;
    sent.push(hello);
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.response_to, 1);
    assert!(ok(&reply.doc), "{:?}", reply.doc);

    // OP_MSG with a kind-1 document sequence.
    let docs = [
        bson_bytes(&doc! { "_id": 1, "x": "a" }),
        bson_bytes(&doc! { "_id": 2, "x": "b" }),
    ];
    let doc_refs: Vec<&[u8]> = docs.iter().map(Vec::as_slice).collect();
    let insert = op_msg::encode_with_sequences(
        2,
        0,
        MsgFlags(0),
        &bson_bytes(&doc! { "insert": "items", "$db": "raw" }),
        &[("documents", &doc_refs)],
    );
    client.send_bytes(&insert).await;
    sent.push(insert);
    let reply = client.recv().await.unwrap();
    assert_eq!(
        (reply.response_to, reply.doc.get_i32("n").ok()),
        (2, Some(2))
    );

    // OP_MSG with a CRC-32C checksum.
    let mut checked = op_msg::encode(
        3,
        0,
        MsgFlags(MsgFlags::CHECKSUM_PRESENT),
        &bson_bytes(&doc! { "ping": 1, "$db": "admin" }),
    )
    .to_vec();
    let length = i32::try_from(checked.len() + 4).unwrap();
    checked[..4].copy_from_slice(&length.to_le_bytes());
    let crc = crc32c::crc32c(&checked);
    checked.extend_from_slice(&crc.to_le_bytes());
    let checked = Bytes::from(checked);
    client.send_bytes(&checked).await;
    sent.push(checked);
    assert_eq!(client.recv().await.unwrap().response_to, 3);

    // OP_COMPRESSED (zlib) around an OP_MSG find.
    let find = op_msg::encode(
        4,
        0,
        MsgFlags(0),
        &bson_bytes(&doc! { "find": "items", "filter": {}, "$db": "raw" }),
    );
    let compressed = op_compressed::compress(4, 0, OpCode::Msg, Compressor::Zlib, &find[16..]);
    client.send_bytes(&compressed).await;
    sent.push(compressed);
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.response_to, 4);
    let batch = reply
        .doc
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap();
    assert_eq!(batch.len(), 2);

    // Two frames in one write: both forwarded, both answered in order.
    let (a, first) = client.encode(0, &doc! { "ping": 1, "$db": "admin" });
    let (b, second) = client.encode(0, &doc! { "count": "items", "$db": "raw" });
    let mut both = first.to_vec();
    both.extend_from_slice(&second);
    client.send_bytes(&both).await;
    sent.push(first);
    sent.push(second);
    assert_eq!(client.recv().await.unwrap().response_to, a);
    assert_eq!(client.recv().await.unwrap().response_to, b);

    assert_eq!(
        emu.received_frames(),
        sent,
        "the upstream received exactly the client's bytes"
    );
}

#[tokio::test]
async fn more_to_come_request_gets_no_reply_and_leaves_nothing_in_flight() {
    let emu = emulator(EmulatorConfig::default()).await;
    let recorder = Arc::new(Recorder::default());
    let proxy = proxy(proxy_config(emu.addr()), recorder.clone()).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;

    for i in 0..3 {
        client
            .send(
                MsgFlags::MORE_TO_COME,
                &doc! { "insert": "fire", "documents": [{ "_id": i }], "writeConcern": { "w": 0 }, "$db": "raw" },
            )
            .await;
    }
    // The next frame the client sees answers the ping, not the inserts.
    let ping = client
        .send(0, &doc! { "count": "fire", "$db": "raw" })
        .await;
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.response_to, ping);
    assert_eq!(
        reply.doc.get_i32("n").unwrap(),
        3,
        "the unacknowledged inserts reached the upstream"
    );
    client.expect_silence(Duration::from_millis(200)).await;

    drop(client);
    assert!(Stack::eventually(WAIT, || !recorder.closes.lock().unwrap().is_empty()).await);
    let closes = recorder.closes.lock().unwrap();
    assert_eq!(closes[0].1, CloseCause::ClientClosed);
    assert!(
        closes[0].2.is_empty(),
        "no request left in flight: {:?}",
        closes[0].2
    );
    // Every reply was matched to its request.
    let replies = recorder.replies.lock().unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(
        replies[0].1.as_ref().unwrap().command.as_deref(),
        Some("count")
    );
}

#[tokio::test]
async fn exhaust_hello_stream_forwards_every_reply() {
    let emu = emulator(EmulatorConfig::default()).await;
    let recorder = Arc::new(Recorder::default());
    let proxy = proxy(proxy_config(emu.addr()), recorder.clone()).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;

    let first = client.command(doc! { "hello": 1, "$db": "admin" }).await;
    let tv = first.get_document("topologyVersion").unwrap().clone();
    let request = client
        .send(
            MsgFlags::EXHAUST_ALLOWED,
            &doc! { "hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 100_i64, "$db": "admin" },
        )
        .await;
    let mut expected_response_to = request;
    for n in 1..=4u32 {
        let reply = client.recv().await.expect("a streamed reply");
        assert!(
            reply.flags.more_to_come(),
            "reply {n} keeps the stream open"
        );
        assert_eq!(reply.response_to, expected_response_to, "reply {n} chains");
        expected_response_to = reply.request_id;
    }
    // Every streamed reply was matched to the original request.
    let replies = recorder.replies.lock().unwrap().clone();
    let streamed: Vec<_> = replies.iter().skip(1).take(4).collect();
    for (n, (_, request_record)) in streamed.iter().enumerate() {
        let record = request_record.as_ref().expect("streamed reply matched");
        assert_eq!(record.request_id, request);
        assert!(record.exhaust_allowed && record.awaitable_hello);
        assert_eq!(record.streamed_replies, u32::try_from(n).unwrap() + 1);
    }
}

// ---------------------------------------------------------------- failures

/// Collects formatted log output of the current thread (the tests below run
/// on a current-thread runtime, so the proxy's tasks log here too).
/// The proxy's close line for the client at `peer`, once it is logged.
async fn close_line(logs: &common::ThreadLogs, peer: &str) -> String {
    let find = || {
        logs.proxy_lines()
            .into_iter()
            .find(|l| l.contains("connection closed") && l.contains(peer))
    };
    assert!(
        Stack::eventually(WAIT, || find().is_some()).await,
        "no close line for {peer}: {:#?}",
        logs.proxy_lines()
    );
    find().expect("seen above")
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_reset_is_logged_at_info_not_as_a_warning() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let emu = emulator(EmulatorConfig::default()).await;
    let proxy = proxy(proxy_config(emu.addr()), Arc::new(NoopInspector)).await;

    // Half a frame, then a reset (SO_LINGER 0 turns the close into a RST).
    let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let peer = stream.local_addr().unwrap().to_string();
    let mut stream = stream;
    stream.write_all(&[100, 0, 0, 0, 1, 0]).await.unwrap();
    // Deprecated because a lingering close blocks the thread; a zero
    // linger does not block, it resets.
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);

    let line = close_line(&logs, &peer).await;
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("the client reset the connection"), "{line}");
    assert!(line.contains("side=client"), "{line}");
    assert!(
        logs.proxy_warn_lines().is_empty(),
        "{:#?}",
        logs.proxy_warn_lines()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_close_line_counts_both_directions() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let emu = emulator(EmulatorConfig::default()).await;
    let proxy = proxy(proxy_config(emu.addr()), Arc::new(NoopInspector)).await;

    let mut client = RawClient::connect(proxy.local_addr()).await;
    let peer = client.local_addr().to_string();
    for _ in 0..3 {
        assert!(ok(&client
            .command(doc! { "ping": 1, "$db": "admin" })
            .await));
    }
    drop(client);

    // Whichever pump ends first, both counts are kept.
    let line = close_line(&logs, &peer).await;
    assert!(line.contains("requests=3"), "{line}");
    assert!(line.contains("replies=3"), "{line}");
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_client_frames_close_only_that_client_with_one_log_line() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let emu = emulator(EmulatorConfig::default()).await;
    let proxy = proxy(proxy_config(emu.addr()), Arc::new(NoopInspector)).await;

    let mut healthy = RawClient::connect(proxy.local_addr()).await;
    assert!(ok(&healthy
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));

    // A length below the 16-byte header: refused by the decoder.
    let mut short = RawClient::connect(proxy.local_addr()).await;
    let mut bogus = Vec::new();
    bogus.extend_from_slice(&5i32.to_le_bytes());
    bogus.extend_from_slice(&[0u8; 12]);
    short.send_bytes(&bogus).await;
    short.expect_closed(WAIT).await;

    // A whole frame whose OP_MSG section kind is unknown: refused by the parser.
    let mut bad_section = RawClient::connect(proxy.local_addr()).await;
    let (_, good) = bad_section.encode(0, &doc! { "ping": 1, "$db": "admin" });
    let mut broken = good.to_vec();
    broken[20] = 7; // the first section's kind byte
    bad_section.send_bytes(&broken).await;
    bad_section.expect_closed(WAIT).await;

    // The healthy client is unaffected, before and after.
    assert!(ok(&healthy
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    let n = healthy
        .command(doc! { "count": "none", "$db": "raw" })
        .await;
    assert!(ok(&n));

    assert!(Stack::eventually(WAIT, || logs.proxy_warn_lines().len() >= 2).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let warns = logs.proxy_warn_lines();
    assert_eq!(warns.len(), 2, "one line per bad client: {warns:#?}");
    let short_line = warns
        .iter()
        .find(|l| l.contains(&short.local_addr().to_string()))
        .expect("names the peer");
    assert!(
        short_line.contains("client sent a malformed frame"),
        "{short_line}"
    );
    assert!(
        short_line.contains("smaller than the 16-byte header"),
        "{short_line}"
    );
    assert!(short_line.contains("conn="), "{short_line}");
    assert!(short_line.contains("side=client"), "{short_line}");
    let section_line = warns
        .iter()
        .find(|l| l.contains(&bad_section.local_addr().to_string()))
        .expect("names the peer");
    assert!(
        section_line.contains("unknown section kind 7"),
        "{section_line}"
    );
}

#[tokio::test]
async fn oversized_and_stalled_frames_close_the_client() {
    let emu = emulator(EmulatorConfig::default()).await;
    let config = ProxyConfig {
        max_message_size: 1024,
        frame_read_timeout: Duration::from_millis(200),
        ..proxy_config(emu.addr())
    };
    let proxy = proxy(config, Arc::new(NoopInspector)).await;

    let mut big = RawClient::connect(proxy.local_addr()).await;
    let huge = "x".repeat(2000);
    big.send(
        0,
        &doc! { "insert": "c", "documents": [{ "s": huge }], "$db": "raw" },
    )
    .await;
    big.expect_closed(WAIT).await;

    // Half a header, then nothing: closed once the frame timeout passes.
    let mut stalled = RawClient::connect(proxy.local_addr()).await;
    stalled.send_bytes(&[64, 0, 0, 0, 1, 0]).await;
    let started = Instant::now();
    stalled.expect_closed(WAIT).await;
    assert!(started.elapsed() >= Duration::from_millis(150));

    // An idle connection (no partial frame) is not timed out.
    let mut idle = RawClient::connect(proxy.local_addr()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(ok(&idle.command(doc! { "ping": 1, "$db": "admin" }).await));
}

#[tokio::test(flavor = "current_thread")]
async fn malformed_upstream_frame_closes_that_pair_as_an_upstream_error() {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    // The emulator never sends garbage, so a hand-written upstream does.
    let fake = TcpListener::bind(loopback()).await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = fake.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                // A 16-byte OP_MSG with no flags and no sections.
                let mut garbage = Vec::new();
                for value in [16i32, 1, 1, 2013] {
                    garbage.extend_from_slice(&value.to_le_bytes());
                }
                let _ = socket.write_all(&garbage).await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let proxy = proxy(proxy_config(fake_addr), Arc::new(NoopInspector)).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;
    client.send(0, &doc! { "ping": 1, "$db": "admin" }).await;
    client.expect_closed(WAIT).await;

    assert!(Stack::eventually(WAIT, || !logs.proxy_warn_lines().is_empty()).await);
    let warns = logs.proxy_warn_lines();
    assert_eq!(warns.len(), 1, "{warns:#?}");
    assert!(
        warns[0].contains("upstream sent a malformed frame"),
        "{}",
        warns[0]
    );
    assert!(warns[0].contains("side=upstream"), "{}", warns[0]);
}

#[tokio::test]
async fn unreachable_upstream_answers_the_hello_with_the_reason_and_closes() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = free.local_addr().unwrap();
    drop(free);
    let proxy = proxy(proxy_config(dead), Arc::new(NoopInspector)).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;
    let id = client.send(0, &doc! { "hello": 1, "$db": "admin" }).await;
    let reply = client
        .recv()
        .await
        .expect("the hello is answered, not reset");
    assert_eq!(reply.response_to, id);
    assert_eq!(reply.doc.get_i32("code").ok(), Some(6), "{:?}", reply.doc);
    assert!(
        reply
            .doc
            .get_str("errmsg")
            .unwrap()
            .starts_with(&format!("sessionguard could not reach upstream {dead}")),
        "{:?}",
        reply.doc
    );
    client.expect_closed(WAIT).await;
    // The listener keeps serving (and failing) for the next client, even
    // one that never sends its handshake.
    let mut again = RawClient::connect(proxy.local_addr()).await;
    again.expect_closed(WAIT).await;
    assert!(Stack::eventually(WAIT, || proxy.active_connections() == 0).await);
}

// ---------------------------------------------------------------- lifecycle

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let emu = emulator(EmulatorConfig::default()).await;
    let config = ProxyConfig {
        max_connections: 2,
        ..proxy_config(emu.addr())
    };
    let proxy = proxy(config, Arc::new(NoopInspector)).await;
    let mut first = RawClient::connect(proxy.local_addr()).await;
    let mut second = RawClient::connect(proxy.local_addr()).await;
    assert!(ok(&first.command(doc! { "ping": 1, "$db": "admin" }).await));
    assert!(ok(&second
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    assert_eq!(proxy.active_connections(), 2);

    let mut third = RawClient::connect(proxy.local_addr()).await;
    third.expect_closed(WAIT).await;
    assert_eq!(proxy.rejected_connections(), 1);
    assert!(ok(&first.command(doc! { "ping": 1, "$db": "admin" }).await));

    drop(first);
    assert!(Stack::eventually(WAIT, || proxy.active_connections() == 1).await);
    let mut fourth = RawClient::connect(proxy.local_addr()).await;
    assert!(ok(&fourth
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    assert_eq!(proxy.accepted_connections(), 3);
}

#[tokio::test]
async fn drain_finishes_in_flight_work_then_closes() {
    let emu = emulator(EmulatorConfig {
        reply_latency: Duration::from_millis(700),
        ..EmulatorConfig::default()
    })
    .await;
    let proxy = proxy(proxy_config(emu.addr()), Arc::new(NoopInspector)).await;
    let addr = proxy.local_addr();

    let mut idle = RawClient::connect(addr).await;
    assert!(ok(&idle.command(doc! { "ping": 1, "$db": "admin" }).await));

    // A monitoring connection with a streaming hello outstanding.
    let mut monitor = RawClient::connect(addr).await;
    let tv = monitor.command(doc! { "hello": 1, "$db": "admin" }).await;
    let tv = tv.get_document("topologyVersion").unwrap().clone();
    monitor
        .send(
            MsgFlags::EXHAUST_ALLOWED,
            &doc! { "hello": 1, "topologyVersion": tv, "maxAwaitTimeMS": 10_000_i64, "$db": "admin" },
        )
        .await;

    let mut busy = RawClient::connect(addr).await;
    let find = busy
        .send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(150)).await;

    let drain_started = Instant::now();
    proxy.drain();
    idle.expect_closed(Duration::from_millis(500)).await;
    monitor.expect_closed(Duration::from_millis(500)).await;
    assert!(
        drain_started.elapsed() < Duration::from_millis(500),
        "idle connections close at once"
    );

    // The slow find still gets its whole reply, then the connection closes.
    let reply = busy.recv().await.expect("the in-flight request completes");
    assert_eq!(reply.response_to, find);
    assert!(ok(&reply.doc), "{:?}", reply.doc);
    busy.expect_closed(WAIT).await;

    tokio::time::timeout(WAIT, proxy.wait())
        .await
        .expect("drain completes well before the grace period");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn drain_grace_cuts_off_requests_that_take_too_long() {
    let emu = emulator(EmulatorConfig {
        reply_latency: Duration::from_secs(5),
        ..EmulatorConfig::default()
    })
    .await;
    let recorder = Arc::new(Recorder::default());
    let config = ProxyConfig {
        drain_grace: Duration::from_millis(300),
        ..proxy_config(emu.addr())
    };
    let proxy = proxy(config, recorder.clone()).await;
    let mut busy = RawClient::connect(proxy.local_addr()).await;
    busy.send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    proxy.drain();
    busy.expect_closed(Duration::from_secs(2)).await;
    tokio::time::timeout(Duration::from_secs(2), proxy.wait())
        .await
        .expect("wait returns after the grace");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the grace: {:?}",
        started.elapsed()
    );
    let closes = recorder.closes.lock().unwrap();
    assert_eq!(closes.len(), 1);
    // Cut off by the proxy at the end of the grace, not by the client.
    assert_eq!(closes[0].1, CloseCause::Shutdown);
    assert_eq!(closes[0].2.len(), 1, "the cut-off request is reported");
    assert_eq!(closes[0].2[0].command.as_deref(), Some("find"));
}

#[tokio::test]
async fn shutdown_now_closes_everything() {
    let emu = emulator(EmulatorConfig {
        reply_latency: Duration::from_secs(5),
        ..EmulatorConfig::default()
    })
    .await;
    let proxy = proxy(proxy_config(emu.addr()), Arc::new(NoopInspector)).await;
    let mut busy = RawClient::connect(proxy.local_addr()).await;
    busy.send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.shutdown_now();
    busy.expect_closed(Duration::from_secs(1)).await;
    tokio::time::timeout(Duration::from_secs(1), proxy.wait())
        .await
        .unwrap();
}

/// A client that stops reading must not hold up a shutdown: the reply
/// being written to it (more than both socket buffers hold) is abandoned.
#[tokio::test]
async fn shutdown_now_does_not_wait_for_a_client_that_stopped_reading() {
    // One reply of 32 MiB, larger than the kernel buffers between the
    // proxy and a client that never reads.
    let fake = TcpListener::bind(loopback()).await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = fake.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let Ok(n) = socket.read(&mut buf).await else {
                    return;
                };
                let request_id = i32::from_le_bytes(buf[4..8].try_into().unwrap());
                assert!(n >= 16);
                // BSON documents stop at 16 MiB: four of 8 MiB in a
                // document sequence.
                let pad = bson_bytes(&doc! {
                    "pad": bson::Binary {
                        subtype: bson::spec::BinarySubtype::Generic,
                        bytes: vec![7u8; 8 << 20],
                    },
                });
                let pads: Vec<&[u8]> = vec![&pad; 4];
                let reply = op_msg::encode_with_sequences(
                    1,
                    request_id,
                    MsgFlags::default(),
                    &bson_bytes(&doc! { "ok": 1.0 }),
                    &[("pads", &pads)],
                );
                let _ = socket.write_all(&reply).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    let recorder = Arc::new(Recorder::default());
    let proxy = proxy(proxy_config(fake_addr), recorder.clone()).await;
    let mut stalled = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let ping = op_msg::encode(
        5,
        0,
        MsgFlags::default(),
        &bson_bytes(&doc! { "ping": 1, "$db": "admin" }),
    );
    stalled.write_all(&ping).await.unwrap();
    // The whole reply was read and inspected: the proxy is now writing it
    // to a client that reads nothing.
    assert!(Stack::eventually(WAIT, || !recorder.replies.lock().unwrap().is_empty()).await);
    proxy.shutdown_now();
    tokio::time::timeout(WAIT, proxy.wait())
        .await
        .expect("every connection closed despite the stalled client");
    drop(stalled);
}

// ---------------------------------------------------------------- inspector seam

#[tokio::test]
async fn rejected_requests_are_answered_by_the_proxy_and_not_forwarded() {
    let emu = emulator(EmulatorConfig::default()).await;
    let recorder = Arc::new(Recorder {
        reject: Some("drop"),
        ..Recorder::default()
    });
    let proxy = proxy(proxy_config(emu.addr()), recorder.clone()).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;

    let request = client
        .send(0, &doc! { "drop": "precious", "$db": "raw" })
        .await;
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.response_to, request);
    assert_eq!(reply.doc.get_i32("code").unwrap(), 9999);
    assert_eq!(
        reply.doc.get_str("codeName").unwrap(),
        "SessionGuardViolation"
    );

    // A rejected moreToCome request gets no reply at all.
    client
        .send(
            MsgFlags::MORE_TO_COME,
            &doc! { "drop": "precious", "$db": "raw" },
        )
        .await;
    client.expect_silence(Duration::from_millis(200)).await;

    // Legacy OP_QUERY gets its rejection as an OP_REPLY.
    let query = legacy::encode_query(
        77,
        0,
        "raw.$cmd",
        0,
        -1,
        &bson_bytes(&doc! { "drop": "precious" }),
    );
    client.send_bytes(&query).await;
    let reply = client.recv().await.unwrap();
    assert_eq!(
        (reply.response_to, reply.doc.get_i32("code").unwrap()),
        (77, 9999)
    );

    assert!(ok(&client
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    assert_eq!(emu.command_count("drop"), 0, "never reached the upstream");
    assert_eq!(emu.command_count("ping"), 1);
}

/// A panic in inspection (a bug, never the client's fault) costs only the
/// connection being inspected: every other connection, on whichever data
/// thread the kernel gave it, goes on being served, the close is judged as
/// internal, new connections are served, and the proxy still drains.
#[tokio::test]
async fn a_panicking_inspector_closes_only_the_connection_it_was_inspecting() {
    let emu = emulator(EmulatorConfig::default()).await;
    let recorder = Arc::new(Recorder {
        panic_on: Some("explode"),
        ..Recorder::default()
    });
    let proxy = proxy(proxy_config(emu.addr()), recorder.clone()).await;
    let ping = || doc! { "ping": 1, "$db": "admin" };
    // Enough bystanders that some share the culprit's data thread.
    let mut bystanders = Vec::new();
    for _ in 0..8 {
        let mut client = RawClient::connect(proxy.local_addr()).await;
        assert!(ok(&client.command(ping()).await));
        bystanders.push(client);
    }

    let mut culprit = RawClient::connect(proxy.local_addr()).await;
    culprit.send(0, &doc! { "explode": 1, "$db": "raw" }).await;
    culprit.expect_closed(WAIT).await;
    let internal = || {
        recorder
            .closes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, cause, _)| *cause == CloseCause::Internal)
            .count()
    };
    assert!(common::eventually(WAIT, || internal() == 1).await);

    for client in &mut bystanders {
        assert!(ok(&client.command(ping()).await));
    }
    for _ in 0..4 {
        let mut fresh = RawClient::connect(proxy.local_addr()).await;
        assert!(ok(&fresh.command(ping()).await));
    }
    assert_eq!(internal(), 1, "only the culprit closed");
    proxy.drain();
    tokio::time::timeout(WAIT, proxy.wait())
        .await
        .expect("every data thread finished the drain");
}

#[tokio::test]
async fn injected_requests_get_their_reply_and_the_client_sees_nothing() {
    let emu = emulator(EmulatorConfig {
        record_frames: true,
        reply_latency: Duration::from_millis(400),
        ..EmulatorConfig::default()
    })
    .await;
    let recorder = Arc::new(Recorder::default());
    let proxy = proxy(proxy_config(emu.addr()), recorder.clone()).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;
    assert!(ok(&client
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    let injector = recorder.contexts.lock().unwrap()[0].injector.clone();

    // Idle connection: injected at once.
    let reply = injector
        .inject(bson_bytes(&doc! { "ping": 1, "$db": "admin" }))
        .await
        .expect("injected ping answered");
    let reply = decode_reply(&Frame {
        header: wire::MsgHeader::parse(&reply).unwrap(),
        bytes: reply,
    });
    assert!(
        reply.response_to < 0,
        "proxy ids are negative: {}",
        reply.response_to
    );
    assert!(ok(&reply.doc));
    client.expect_silence(Duration::from_millis(150)).await;

    // Busy connection: the injection waits for the slow find to finish.
    let find = client
        .send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let injected = tokio::spawn(injector.inject(bson_bytes(&doc! { "ping": 1, "$db": "admin" })));
    let reply = client.recv().await.unwrap();
    assert_eq!(reply.response_to, find);
    injected.await.unwrap().expect("second injection answered");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for the find: {:?}",
        started.elapsed()
    );

    // The client's own next request is answered normally, nothing extra.
    let ping = client.send(0, &doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(client.recv().await.unwrap().response_to, ping);
    client.expect_silence(Duration::from_millis(150)).await;

    // The upstream saw the injected requests with negative ids, the second
    // one after the find.
    let ids: Vec<i32> = emu
        .received_frames()
        .iter()
        .map(|f| i32::from_le_bytes(f[4..8].try_into().unwrap()))
        .collect();
    let negatives: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] < 0).collect();
    assert_eq!(negatives.len(), 2, "{ids:?}");
    let find_at = ids.iter().position(|&id| id == find).unwrap();
    assert!(negatives[1] > find_at, "{ids:?}");
    // The inspector never saw the injected replies.
    assert!(recorder
        .replies
        .lock()
        .unwrap()
        .iter()
        .all(|(to, _)| *to > 0));
}

#[tokio::test]
async fn injection_gives_up_when_the_connection_never_idles() {
    let emu = emulator(EmulatorConfig {
        record_frames: true,
        reply_latency: Duration::from_secs(2),
        ..EmulatorConfig::default()
    })
    .await;
    let recorder = Arc::new(Recorder::default());
    let config = ProxyConfig {
        inject_timeout: Duration::from_millis(200),
        ..proxy_config(emu.addr())
    };
    let proxy = proxy(config, recorder.clone()).await;
    let mut client = RawClient::connect(proxy.local_addr()).await;
    assert!(ok(&client
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    let injector = recorder.contexts.lock().unwrap()[0].injector.clone();

    client
        .send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = injector
        .inject(bson_bytes(&doc! { "ping": 1, "$db": "admin" }))
        .await
        .unwrap_err();
    assert_eq!(err, InjectError::Timeout(Duration::from_millis(200)));
    client.recv().await.expect("the find reply");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let negatives = emu
        .received_frames()
        .iter()
        .filter(|f| i32::from_le_bytes(f[4..8].try_into().unwrap()) < 0)
        .count();
    assert_eq!(negatives, 0, "a request given up is never sent");

    drop(client);
    assert!(Stack::eventually(WAIT, || proxy.active_connections() == 0).await);
    assert_eq!(
        injector
            .inject(bson_bytes(&doc! { "ping": 1, "$db": "admin" }))
            .await
            .unwrap_err(),
        InjectError::Closed
    );
}

// ---------------------------------------------------------------- the binary

fn example_config() -> String {
    format!(
        "{}/../../config/sessionguard.toml",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn check_config_accepts_the_example_file() {
    let output = common::sessionguard_command()
        .args(["check-config", &example_config()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("ok: ") && stdout.contains("sessionguard.toml"),
        "{stdout}"
    );
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[proxy]\nmax_connections = 0\n",
            "proxy.max_connections: must be at least 1",
        ),
        (
            "[proxy]\nlisten_addr = \"x\"\n",
            "proxy.listen_addr: unknown field `listen_addr`",
        ),
        (
            "[proxy]\nmax_message_size = 10\n",
            "proxy.max_message_size: must be at least 1024",
        ),
        (
            "[log]\nformat = \"yaml\"\n",
            "log.format: unknown variant `yaml`",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let output = common::sessionguard_command()
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{text}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
    let output = common::sessionguard_command()
        .args(["check-config", "/nonexistent/sessionguard.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
}

#[test]
fn proxy_with_bad_config_exits_64_before_binding() {
    // Hold the listen port: if the proxy tried to bind first it would fail
    // with a bind error instead of the config error.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!("[proxy]\nlisten = \"{listen}\"\nmax_connections = 0\n"),
    )
    .unwrap();
    let output = common::sessionguard_command()
        .arg("proxy")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("proxy.max_connections"));

    let output = common::sessionguard_command()
        .args(["proxy", "--upstream", "mongodb+srv://cluster0.example.net"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("proxy.upstream: mongodb+srv:// connection strings are not supported yet"));

    let output = common::sessionguard_command()
        .args(["proxy", "--log-level", "=["])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("log.level"));
}

#[test]
fn cli_beats_env_beats_file_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[proxy]\nlisten = \"127.0.0.1:1111\"\nadmin = \"127.0.0.1:2222\"\nupstream = \"mongodb://file-host:1\"\n",
    )
    .unwrap();
    let output = common::sessionguard_command()
        .args(["proxy", "--print-config", "--listen", "127.0.0.1:3333"])
        .arg("--config")
        .arg(&path)
        .env("SESSIONGUARD_LISTEN", "127.0.0.1:4444")
        .env("SESSIONGUARD_ADMIN", "127.0.0.1:5555")
        .env("SESSIONGUARD_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed: toml::Value = toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap();
    assert_eq!(
        printed["proxy"]["listen"].as_str(),
        Some("127.0.0.1:3333"),
        "CLI beats env"
    );
    assert_eq!(
        printed["proxy"]["admin"].as_str(),
        Some("127.0.0.1:5555"),
        "env beats file"
    );
    assert_eq!(
        printed["proxy"]["upstream"].as_str(),
        Some("mongodb://file-host:1"),
        "file beats default"
    );
    assert_eq!(
        printed["proxy"]["max_connections"].as_integer(),
        Some(10_000),
        "default"
    );
    assert_eq!(printed["proxy"]["drain_grace"].as_str(), Some("30s"));
    assert_eq!(printed["log"]["format"].as_str(), Some("json"));

    // The config file itself can come from the environment.
    let output = common::sessionguard_command()
        .args(["proxy", "--print-config"])
        .env("SESSIONGUARD_CONFIG", &path)
        .output()
        .unwrap();
    let printed: toml::Value = toml::from_str(&String::from_utf8_lossy(&output.stdout)).unwrap();
    assert_eq!(printed["proxy"]["listen"].as_str(), Some("127.0.0.1:1111"));
}

/// Runs `sessionguard proxy` in front of `upstream` with JSON logs and
/// returns the child plus the proxy and admin addresses from its ready line.
fn spawn_proxy(
    upstream: SocketAddr,
) -> (Child, SocketAddr, SocketAddr, std::thread::JoinHandle<()>) {
    let mut child = common::sessionguard_command()
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--upstream")
        .arg(format!("mongodb://{upstream}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + WAIT;
    let (listen, admin) = loop {
        assert!(Instant::now() < deadline, "no ready line");
        let line = lines
            .next()
            .expect("the proxy logs before exiting")
            .unwrap();
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "sessionguard ready" {
            let listen = event["listen"].as_str().unwrap().parse().unwrap();
            let admin = event["admin"].as_str().unwrap().parse().unwrap();
            break (listen, admin);
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.for_each(drop));
    (child, listen, admin, drain)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the proxy did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_healthz_forwards_and_drains_on_sigterm() {
    let emu = emulator(EmulatorConfig {
        reply_latency: Duration::from_millis(600),
        ..EmulatorConfig::default()
    })
    .await;
    let (mut child, listen, admin, _stderr) = spawn_proxy(emu.addr());

    let mut http = std::net::TcpStream::connect(admin).unwrap();
    http.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    http.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("ok\n"),
        "{response}"
    );

    let mut client = RawClient::connect(listen).await;
    assert!(ok(&client
        .command(doc! { "ping": 1, "$db": "admin" })
        .await));
    let find = client
        .send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&child, "TERM");
    let reply = client
        .recv()
        .await
        .expect("the in-flight find completes during the drain");
    assert_eq!(reply.response_to, find);
    client.expect_closed(WAIT).await;
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, WAIT))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exits_fast_on_sigint() {
    let emu = emulator(EmulatorConfig {
        reply_latency: Duration::from_secs(10),
        ..EmulatorConfig::default()
    })
    .await;
    let (mut child, listen, _admin, _stderr) = spawn_proxy(emu.addr());
    let mut client = RawClient::connect(listen).await;
    client
        .send(0, &doc! { "find": "c", "filter": {}, "$db": "raw" })
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    signal(&child, "INT");
    client.expect_closed(Duration::from_secs(3)).await;
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(3)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn pretty_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let mut child = common::sessionguard_command()
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first_line.contains("admin server listening"),
        "{first_line:?}"
    );
    assert!(
        !first_line.contains('\u{1b}'),
        "ANSI escape in a piped log line: {first_line:?}"
    );
}
