//! Per-frame cost of the data path's CPU work, without sockets: frame
//! decoding (`FrameCodec`), opening and parsing (`wire::open` / `parse`),
//! and the session engine's inspection with its ledger update, for a small
//! command and for a 1 MiB insert. Target: <= 1 us per small frame
//! (docs/performance.md). `flood` runs the same small find when every one
//! of them is a violation of one finding (concurrent use of a shared
//! session), logged to a JSON sink as in production, next to the clean
//! round trip: the cost a misbehaving application adds per operation.
//! `data_threads` runs the small round trip on one and on two threads at
//! once (own connection and session each): what the engine's shared state
//! costs when data threads on other cores write it too.
//! Run with `cargo bench --bench inspect`.

use std::hint::black_box;
use std::net::SocketAddr;

use bson::spec::BinarySubtype;
use bson::{rawdoc, Binary, RawDocumentBuf};
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use sessionguard_engine::{ConnHandle, RulesConfig, SessionConfig, SessionEngine};
use sessionguard_protocol::wire::{self, op_msg, Frame, FrameCodec, Message, MsgFlags};

fn lsid(n: u8) -> RawDocumentBuf {
    let mut bytes = [0x5e_u8; 16];
    bytes[0] = n;
    rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: bytes.to_vec() } }
}

fn find_frame(request_id: i32) -> Bytes {
    find_frame_on(request_id, 1)
}

fn find_frame_on(request_id: i32, session: u8) -> Bytes {
    let body = rawdoc! {
        "find": "orders",
        "filter": { "status": "active" },
        "batchSize": 2_i32,
        "lsid": lsid(session),
        "$db": "shop",
    };
    op_msg::encode(request_id, 0, MsgFlags(0), body.as_bytes())
}

fn find_reply(response_to: i32) -> Bytes {
    let body = rawdoc! {
        "cursor": {
            "firstBatch": [ { "_id": 1_i32, "status": "active" }, { "_id": 2_i32, "status": "active" } ],
            "id": 0_i64,
            "ns": "shop.orders",
        },
        "ok": 1.0,
    };
    op_msg::encode(1, response_to, MsgFlags(0), body.as_bytes())
}

fn insert_1mib_frame(request_id: i32, txn_number: i64) -> Bytes {
    let body = rawdoc! {
        "insert": "blobs",
        "ordered": true,
        "lsid": lsid(2),
        "txnNumber": txn_number,
        "$db": "shop",
    };
    let doc = rawdoc! { "_id": 1_i64, "payload": "x".repeat(1024 * 1024) };
    op_msg::encode_with_sequences(
        request_id,
        0,
        MsgFlags(0),
        body.as_bytes(),
        &[("documents", &[doc.as_bytes()])],
    )
}

fn insert_reply(response_to: i32) -> Bytes {
    op_msg::encode(
        1,
        response_to,
        MsgFlags(0),
        rawdoc! { "n": 1_i32, "ok": 1.0 }.as_bytes(),
    )
}

/// What the connection task does with one received chunk: split a frame
/// off the buffer, open it and parse its sections.
fn decode(codec: &mut FrameCodec, buffer: &mut BytesMut, bytes: &[u8]) -> Frame {
    buffer.extend_from_slice(bytes);
    codec
        .decode(buffer)
        .expect("valid frame")
        .expect("a whole frame")
}

/// Decode + inspect + ledger update for one request and its reply.
/// Connection 1's handle (every engine here has it).
fn first_conn(engine: &SessionEngine) -> ConnHandle {
    engine.conn_handle(1).expect("connection 1 is connected")
}

/// As the data path does it: with the connection's handle, not its id.
fn round_trip_on(
    engine: &SessionEngine,
    conn: &ConnHandle,
    codec: &mut FrameCodec,
    buffer: &mut BytesMut,
    request: &[u8],
    reply: &[u8],
) {
    let frame = decode(codec, buffer, request);
    let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    let msg = opened.parse(&frame).unwrap();
    // The proxy keeps the engine's record with its own until the reply.
    let (decision, pending) = engine.request_on(conn, frame.header.request_id, &msg);
    black_box(decision);

    let frame = decode(codec, buffer, reply);
    let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    let msg = opened.parse(&frame).unwrap();
    if let Some(mut pending) = pending {
        engine.reply_on(conn, &mut pending, &msg);
    }
}

fn engine() -> SessionEngine {
    let engine = SessionEngine::new(&SessionConfig::default(), &RulesConfig::default());
    let peer: SocketAddr = ([10, 0, 0, 1], 50000).into();
    let local: SocketAddr = ([127, 0, 0, 1], 27018).into();
    engine.connect(1, peer, local, false);
    engine
}

fn small(c: &mut Criterion) {
    let mut group = c.benchmark_group("small_find");
    group.throughput(Throughput::Elements(1));
    let request = find_frame(7);
    let reply = find_reply(7);
    let mut codec = FrameCodec::default();
    let mut buffer = BytesMut::with_capacity(64 * 1024);

    group.bench_function("decode_parse_request", |b| {
        b.iter(|| {
            let frame = decode(&mut codec, &mut buffer, &request);
            let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
            let parsed = opened.parse(&frame).unwrap();
            black_box(matches!(parsed, Message::Msg(_)));
        })
    });

    let engine = engine();
    group.bench_function("request_and_reply_inspected", |b| {
        let conn = first_conn(&engine);
        b.iter(|| round_trip_on(&engine, &conn, &mut codec, &mut buffer, &request, &reply))
    });
    // The violation counter proves the loop exercised a clean pattern.
    assert_eq!(engine.stats().violations, 0);
    group.finish();
}

fn large(c: &mut Criterion) {
    let mut group = c.benchmark_group("insert_1mib");
    let reply = insert_reply(9);
    let mut codec = FrameCodec::default();
    let mut buffer = BytesMut::with_capacity(2 * 1024 * 1024);
    let engine = engine();
    // Retryable writes: every insert carries the next txnNumber, as a driver
    // sends them, written into the prepared frame in place.
    let mut template = insert_1mib_frame(9, 1).to_vec();
    let marker = b"txnNumber\0";
    let txn_at = template
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("txnNumber in the frame")
        + marker.len();
    group.throughput(Throughput::Bytes(template.len() as u64));
    let mut txn_number = 1i64;
    let conn = first_conn(&engine);
    group.bench_function("request_and_reply_inspected", |b| {
        b.iter(|| {
            txn_number += 1;
            template[txn_at..txn_at + 8].copy_from_slice(&txn_number.to_le_bytes());
            round_trip_on(&engine, &conn, &mut codec, &mut buffer, &template, &reply);
        })
    });
    assert_eq!(engine.stats().violations, 0);
    group.finish();
}

fn flood(c: &mut Criterion) {
    // As in production: a JSON subscriber at INFO (writing nowhere), so
    // whatever the engine logs is formatted.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::sink)
            .finish(),
    );
    let mut group = c.benchmark_group("flood");
    group.throughput(Throughput::Elements(1));
    let mut codec = FrameCodec::default();
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let request = find_frame(7);
    let reply = find_reply(7);

    let clean = engine();
    group.bench_function("clean_find", |b| {
        let conn = first_conn(&clean);
        b.iter(|| round_trip_on(&clean, &conn, &mut codec, &mut buffer, &request, &reply))
    });
    assert_eq!(clean.stats().violations, 0);

    // The shared session has an insert in flight on another connection
    // that never answers: every find on it is concurrent use.
    let violating = engine();
    violating.connect(
        2,
        ([10, 0, 0, 1], 50001).into(),
        ([127, 0, 0, 1], 27018).into(),
        false,
    );
    let blocker = rawdoc! {
        "insert": "orders", "lsid": lsid(1), "txnNumber": 1_i64, "$db": "shop",
    };
    let blocker = op_msg::encode(1, 0, MsgFlags(0), blocker.as_bytes());
    let frame = decode(&mut codec, &mut buffer, &blocker);
    let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    let msg = opened.parse(&frame).unwrap();
    // Kept in flight (never answered) for the whole benchmark.
    let _blocker = violating.request(2, 1, &msg);
    // The pattern violates (checked before measuring: `--list` runs no
    // iteration).
    round_trip_on(
        &violating,
        &first_conn(&violating),
        &mut codec,
        &mut buffer,
        &request,
        &reply,
    );
    assert_eq!(violating.stats().violations, 1);
    group.bench_function("every_find_violates", |b| {
        let conn = first_conn(&violating);
        b.iter(|| round_trip_on(&violating, &conn, &mut codec, &mut buffer, &request, &reply))
    });
    // One finding counts them all.
    let findings = violating.findings();
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].count, violating.stats().violations);
    group.finish();
}

/// The small find's round trip on one data thread and on two at once, each
/// thread with its own connection and session, as the proxy's data threads
/// run them. What the two threads share is the engine's own state (its
/// tables, counters and shard locks): the time per round trip on two
/// threads over one shows what those shared writes cost when another core
/// writes the same cache lines. Wall time per round trip and thread.
fn data_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_threads");
    group.throughput(Throughput::Elements(1));
    // (threads, one engine per thread): the last is the control, two
    // threads sharing nothing, so what the machine itself does to two busy
    // cores is not counted against the engine. Meaningful with 2+ cores
    // (on one, the threads take turns).
    for (threads, own_engines) in [(1usize, false), (2, false), (2, true)] {
        let engines: Vec<SessionEngine> = if own_engines {
            (0..threads).map(|_| engine()).collect()
        } else {
            vec![engine()]
        };
        if !own_engines {
            for conn in 2..=threads as u64 {
                engines[0].connect(
                    conn,
                    ([10, 0, 0, conn as u8], 50000).into(),
                    ([127, 0, 0, 1], 27018).into(),
                    false,
                );
            }
        }
        let name = if own_engines {
            format!("{threads}_threads_sharing_nothing")
        } else {
            format!("{threads}_threads")
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for conn in 1..=threads as u64 {
                        // Own engines: each thread is connection 1 of its own.
                        let (engine, conn) = if own_engines {
                            (&engines[conn as usize - 1], 1)
                        } else {
                            (&engines[0], conn)
                        };
                        scope.spawn(move || {
                            let handle = engine.conn_handle(conn).expect("connected");
                            let request = find_frame_on(7, conn as u8);
                            let reply = find_reply(7);
                            let mut codec = FrameCodec::default();
                            let mut buffer = BytesMut::with_capacity(64 * 1024);
                            for _ in 0..iters {
                                round_trip_on(
                                    engine,
                                    &handle,
                                    &mut codec,
                                    &mut buffer,
                                    &request,
                                    &reply,
                                );
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
        for engine in &engines {
            assert_eq!(engine.stats().violations, 0);
        }
    }
    group.finish();
}

criterion_group!(benches, small, large, flood, data_threads);
criterion_main!(benches);
