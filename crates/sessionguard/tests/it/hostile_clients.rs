//! Hostile clients against the real proxy (session engine inspecting, the
//! emulator upstream): lying, negative, huge and short length fields,
//! truncated and duplicate sections, unknown section kinds and flag bits,
//! invalid BSON, a bad CRC, a decompression bomb, frames that stop mid-way
//! (slowloris) and 10,000 connections opened and dropped. Each hostile
//! connection must be closed with a log line naming its peer and reason and
//! be counted (`sessionguard_malformed_frames_total` or
//! `sessionguard_frame_timeouts_total`), while a well-behaved Rust driver
//! workload through the same proxy, running the whole time, sees no error.

use sessionguard_test_support as common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{logs, metric, Guarded, Workload};

use common::WAIT;
const OP_MSG: i32 = 2013;
const OP_COMPRESSED: i32 = 2012;
const FRAME_READ_TIMEOUT: Duration = Duration::from_millis(400);

/// The tests of this file run one at a time: the connection churn reuses
/// thousands of ports and logs a line for each reset, which must not be
/// mistaken for another test's close line (lines are matched by peer).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The emulator and the proxy with the session engine, its frame read
/// timeout short enough for slowloris cases to close quickly.
async fn start() -> Guarded {
    // WARN is what the close lines of hostile clients are logged at;
    // formatting every DEBUG line of 10,000 connections would only
    // slow the test down.
    logs::install_at(tracing::Level::WARN);
    let engine = SessionEngine::new(&SessionConfig::default(), &RulesConfig::default());
    Guarded::with_engine(EmulatorConfig::default(), engine, false, |c| {
        c.frame_read_timeout = FRAME_READ_TIMEOUT;
    })
    .await
}

// ------------------------------------------------------------ frame builders

fn header(length: i32, op_code: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    for value in [length, 7, 0, op_code] {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

/// A frame whose length field is right for `body`.
fn frame(op_code: i32, body: &[u8]) -> Vec<u8> {
    let length = i32::try_from(16 + body.len()).unwrap();
    let mut out = header(length, op_code);
    out.extend_from_slice(body);
    out
}

fn ping() -> Vec<u8> {
    bson::to_vec(&doc! { "ping": 1, "$db": "admin" }).unwrap()
}

fn body_section(document: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    out.extend_from_slice(document);
    out
}

fn sequence_section(declared_size: i32, identifier: &str, documents: &[u8]) -> Vec<u8> {
    let mut out = vec![1u8];
    out.extend_from_slice(&declared_size.to_le_bytes());
    out.extend_from_slice(identifier.as_bytes());
    out.push(0);
    out.extend_from_slice(documents);
    out
}

fn op_msg(flags: u32, sections: &[Vec<u8>]) -> Vec<u8> {
    let mut body = flags.to_le_bytes().to_vec();
    for section in sections {
        body.extend_from_slice(section);
    }
    frame(OP_MSG, &body)
}

fn op_compressed(declared: i32, compressor_id: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = OP_MSG.to_le_bytes().to_vec();
    body.extend_from_slice(&declared.to_le_bytes());
    body.push(compressor_id);
    body.extend_from_slice(payload);
    frame(OP_COMPRESSED, &body)
}

/// 16 MiB of zeros, zlib-compressed to a few KiB.
fn zlib_bomb() -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..16 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.finish().unwrap()
}

/// What the proxy must do with one hostile frame.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Part of the close log line.
    reason: &'static str,
}

fn malformed_cases() -> Vec<Case> {
    let good = op_msg(0, &[body_section(&ping())]);
    let mut invalid_bson = ping();
    *invalid_bson.last_mut().unwrap() = 1; // a document must end with 0
    let mut bad_crc = op_msg(1, &[body_section(&ping()), vec![0, 0, 0, 0]]);
    let crc_at = bad_crc.len() - 4;
    bad_crc[crc_at..].copy_from_slice(&0xdead_beef_u32.to_le_bytes());
    let one_doc = bson::to_vec(&doc! { "_id": 1 }).unwrap();
    let mut body_cut_short = good.clone();
    // The header claims 8 bytes of body document: the body section is cut.
    body_cut_short[..4].copy_from_slice(&(16i32 + 4 + 1 + 3).to_le_bytes());
    vec![
        Case {
            name: "negative length",
            bytes: header(-1, OP_MSG),
            reason: "message length -1 is smaller than the 16-byte header",
        },
        Case {
            name: "huge length",
            bytes: header(i32::MAX, OP_MSG),
            reason: "exceeds the maximum message size",
        },
        Case {
            name: "short length",
            bytes: header(12, OP_MSG),
            reason: "message length 12 is smaller than the 16-byte header",
        },
        Case {
            name: "length shorter than the body",
            bytes: body_cut_short,
            reason: "truncated OP_MSG body section",
        },
        Case {
            name: "truncated document sequence",
            bytes: op_msg(
                0,
                &[
                    body_section(&ping()),
                    sequence_section(4096, "documents", &one_doc),
                ],
            ),
            reason: "truncated OP_MSG document sequence",
        },
        Case {
            name: "sequence size too small",
            bytes: op_msg(0, &[body_section(&ping()), sequence_section(2, "", &[])]),
            reason: "declares size 2",
        },
        Case {
            name: "duplicate kind-0 sections",
            bytes: op_msg(0, &[body_section(&ping()), body_section(&ping())]),
            reason: "more than one body (kind 0) section",
        },
        Case {
            name: "no kind-0 section",
            bytes: op_msg(
                0,
                &[sequence_section(
                    i32::try_from(4 + 10 + one_doc.len()).unwrap(),
                    "documents",
                    &one_doc,
                )],
            ),
            reason: "has no body (kind 0) section",
        },
        Case {
            name: "unknown section kind",
            bytes: op_msg(0, &[body_section(&ping()), vec![7, 1, 2, 3]]),
            reason: "unknown section kind 7",
        },
        Case {
            name: "invalid BSON",
            bytes: op_msg(0, &[body_section(&invalid_bson)]),
            reason: "invalid BSON in OP_MSG body section",
        },
        Case {
            name: "unknown required flag bit",
            bytes: op_msg(1 << 4, &[body_section(&ping())]),
            reason: "unknown required flag bits 0x10",
        },
        Case {
            name: "bad CRC",
            bytes: bad_crc,
            reason: "checksum mismatch (expected 0xdeadbeef",
        },
        Case {
            name: "zlib decompression bomb",
            bytes: op_compressed(1000, 2, &zlib_bomb()),
            reason: "decompresses to more than its declared size 1000",
        },
        Case {
            name: "compressed size beyond the limit",
            bytes: op_compressed(i32::MAX, 2, &[0x78, 0x9c]),
            reason: "declares uncompressed size 2147483647, outside",
        },
        Case {
            name: "unknown compressor",
            bytes: op_compressed(5, 9, &[1, 2, 3, 4, 5]),
            reason: "unknown compressor id 9",
        },
    ]
}

/// Connects, sends `bytes`, and expects the proxy to close the connection
/// within `within`. Returns the client's address (what the log names).
async fn send_and_expect_close(
    proxy: SocketAddr,
    bytes: &[u8],
    within: Duration,
) -> (SocketAddr, usize) {
    let mark = logs::mark();
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let local = stream.local_addr().unwrap();
    stream.write_all(bytes).await.expect("write");
    expect_closed(&mut stream, within).await;
    (local, mark)
}

/// Reads until EOF or a reset; a frame (or silence) is a failure.
async fn expect_closed(stream: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Err(_) => panic!("connection still open after {within:?}"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("expected a close, got {n} bytes of reply"),
    }
}

/// The proxy's close line for the connection from `peer`, once it is logged.
async fn close_line((peer, mark): (SocketAddr, usize)) -> String {
    let needle = format!("peer={peer}");
    let mut found = Vec::new();
    let appeared = common::Stack::eventually(WAIT, || {
        found = logs::containing_since(mark, &needle)
            .into_iter()
            .filter(|l| l.contains("connection closed") && l.contains("sessionguard_proxy"))
            .collect();
        !found.is_empty()
    })
    .await;
    assert!(appeared, "no close log line for {peer}");
    assert_eq!(found.len(), 1, "one close line per connection: {found:#?}");
    found.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_client_with_a_reason_and_a_count() {
    let _serial = SERIAL.lock().await;
    let g = start().await;
    let client = g.client("wellbehaved").await;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .expect("the well-behaved client reaches the emulator");
    let workload = Workload::start(&client, "hostile", 3);

    let cases = malformed_cases();
    for (n, case) in cases.iter().enumerate() {
        let before = g
            .stack
            .metric("sessionguard_malformed_frames_total{side=\"client\"}");
        let started = Instant::now();
        let peer = send_and_expect_close(g.stack.proxy.local_addr(), &case.bytes, WAIT).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{}: closed only after {:?}",
            case.name,
            started.elapsed()
        );
        let line = close_line(peer).await;
        assert!(line.contains(" WARN "), "{}: {line}", case.name);
        assert!(
            line.contains("client sent a malformed frame") && line.contains(case.reason),
            "{}: expected `{}` in {line}",
            case.name,
            case.reason
        );
        assert!(line.contains("side=client"), "{}: {line}", case.name);
        let counted = common::Stack::eventually(WAIT, || {
            g.stack
                .metric("sessionguard_malformed_frames_total{side=\"client\"}")
                == before + 1.0
        })
        .await;
        assert!(
            counted,
            "{}: not counted exactly once (case {n})",
            case.name
        );
    }

    // Frames that start and never finish: closed by frame_read_timeout.
    let good = op_msg(0, &[body_section(&ping())]);
    let mut longer = good.clone();
    // The length promises 100 bytes more than will ever come.
    longer[..4].copy_from_slice(&(i32::try_from(good.len()).unwrap() + 100).to_le_bytes());
    let stalls: [(&str, Vec<u8>); 3] = [
        ("length longer than the body", longer),
        ("half a header", good[..6].to_vec()),
        ("all but the last byte", good[..good.len() - 1].to_vec()),
    ];
    for (name, bytes) in &stalls {
        let before = g
            .stack
            .metric("sessionguard_frame_timeouts_total{side=\"client\"}");
        let started = Instant::now();
        let peer = send_and_expect_close(g.stack.proxy.local_addr(), bytes, WAIT).await;
        let took = started.elapsed();
        assert!(
            took >= FRAME_READ_TIMEOUT / 2 && took < FRAME_READ_TIMEOUT * 5,
            "{name}: closed after {took:?}"
        );
        let line = close_line(peer).await;
        assert!(line.contains("client stopped mid-frame"), "{name}: {line}");
        let counted = common::Stack::eventually(WAIT, || {
            g.stack
                .metric("sessionguard_frame_timeouts_total{side=\"client\"}")
                == before + 1.0
        })
        .await;
        assert!(counted, "{name}: not counted exactly once");
    }

    // Slowloris: a valid frame one byte at a time, slower than the timeout
    // allows for the whole frame.
    let mark = logs::mark();
    let mut slow = TcpStream::connect(g.stack.proxy.local_addr())
        .await
        .unwrap();
    let slow_peer = (slow.local_addr().unwrap(), mark);
    let started = Instant::now();
    let mut cut_off = false;
    for byte in &good {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > WAIT {
            break;
        }
    }
    if !cut_off {
        expect_closed(&mut slow, WAIT).await;
    }
    assert!(
        started.elapsed() < FRAME_READ_TIMEOUT * 5,
        "slowloris held its connection for {:?}",
        started.elapsed()
    );
    let line = close_line(slow_peer).await;
    assert!(line.contains("client stopped mid-frame"), "{line}");

    let result = workload.stop().await;
    assert!(
        result.errors.is_empty(),
        "the well-behaved workload saw errors: {:?}",
        result.errors
    );
    assert!(result.operations >= 40, "{result:?}");
    assert_eq!(
        g.stack
            .metric("sessionguard_malformed_frames_total{side=\"client\"}"),
        cases.len() as f64
    );
    assert_eq!(
        g.stack
            .metric("sessionguard_malformed_frames_total{side=\"upstream\"}"),
        0.0
    );
    assert_eq!(
        g.stack
            .metric("sessionguard_frame_timeouts_total{side=\"client\"}"),
        (stalls.len() + 1) as f64
    );
    assert!(
        g.engine.violations().is_empty(),
        "hostile frames must not look like session misuse: {:?}",
        g.engine.violations()
    );
    // The workload's writes all landed.
    let stored = client
        .database("hostile")
        .collection::<Document>("items")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored * 4, result.operations, "one insert per 4 operations");
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_opened_and_dropped() {
    const CONNECTIONS: usize = 10_000;
    const AT_ONCE: usize = 200;
    let _serial = SERIAL.lock().await;
    let g = start().await;
    let client = g.client("wellbehaved").await;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .unwrap();
    let baseline = g.stack.proxy.accepted_connections();
    let workload = Workload::start(&client, "churn", 2);

    let started = Instant::now();
    let addr = g.stack.proxy.local_addr();
    let mut done = 0usize;
    while done < CONNECTIONS {
        let batch: Vec<_> = (done..(done + AT_ONCE).min(CONNECTIONS))
            .map(|n| {
                tokio::spawn(async move {
                    let stream = TcpStream::connect(addr).await?;
                    // Half close politely, half reset (linger 0): both are
                    // what load balancers' probes and port scanners do.
                    if n % 2 == 1 {
                        stream.set_zero_linger()?;
                    }
                    drop(stream);
                    std::io::Result::Ok(())
                })
            })
            .collect();
        for task in batch {
            task.await.unwrap().expect("connect to the proxy");
        }
        done = (done + AT_ONCE).min(CONNECTIONS);
    }
    let opened_in = started.elapsed();
    // A connection reset while still in the listen backlog may never be
    // handed to accept() (or comes back as ECONNABORTED, skipped): a few of
    // the reset half can be missing, none of the polite half.
    let expected = CONNECTIONS as u64 * 99 / 100;
    assert!(
        common::Stack::eventually(Duration::from_secs(30), || {
            g.stack.proxy.accepted_connections() - baseline >= expected
        })
        .await,
        "accepted {} of {CONNECTIONS}",
        g.stack.proxy.accepted_connections() - baseline
    );
    // Every dropped connection is gone again; only the driver's pool remains.
    let driver_connections = 8;
    assert!(
        common::Stack::eventually(Duration::from_secs(60), || {
            g.stack.proxy.active_connections() <= driver_connections
        })
        .await,
        "{} connections still open",
        g.stack.proxy.active_connections()
    );
    let result = workload.stop().await;
    assert!(
        result.errors.is_empty(),
        "the well-behaved workload saw errors: {:?}",
        result.errors
    );
    assert!(result.operations > 0);
    let text = g.stack.metrics.render();
    assert!(
        metric(&text, "sessionguard_connections_accepted_total").unwrap()
            >= (baseline + expected) as f64
    );
    assert_eq!(
        metric(
            &text,
            "sessionguard_malformed_frames_total{side=\"client\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "sessionguard_connections_rejected_total"),
        Some(0.0)
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "10,000 connections took {:?} (opened in {opened_in:?})",
        started.elapsed()
    );
    eprintln!(
        "10,000 connections opened and dropped in {opened_in:?}; {} workload operations meanwhile",
        result.operations
    );
    client.shutdown().await;
    g.stop().await;
}
