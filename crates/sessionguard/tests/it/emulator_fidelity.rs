//! The emulator's fidelity to the server where the interop suites found gaps
//! (interop/README.md, G1-G4): cluster time and causal consistency, snapshot
//! reads, write conflicts between transactions and waiting plain writes,
//! streamed exhaust getMores, the transaction lifetime limit, txnNumber
//! history after endSessions, and how a peer reset is logged. The official
//! Rust driver shows what it can (it must gossip `$clusterTime`, send
//! `afterClusterTime` / `atClusterTime`, and converge under `with_transaction`
//! retries, with the session engine raising nothing); raw frames show the rest.

use sessionguard_test_support as common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, spec::BinarySubtype, Binary, Bson, Document, Timestamp};
use bytes::BytesMut;
use futures_util::{FutureExt, TryStreamExt};
use mongodb::error::Error as DriverError;
use mongodb::options::{FindOptions, SessionOptions};
use mongodb::Client;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle, Topology};
use sessionguard_engine::SessionConfig;
use sessionguard_protocol::wire::{self, FrameCodec, Message, MsgFlags};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::{lsid, RawClient, WAIT};

async fn start(config: EmulatorConfig) -> EmulatorHandle {
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("emulator starts")
}

fn recording() -> EmulatorConfig {
    EmulatorConfig {
        record_frames: true,
        ..EmulatorConfig::default()
    }
}

async fn direct_client(handle: &EmulatorHandle) -> Client {
    Client::with_uri_str(format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=5000",
        handle.addr()
    ))
    .await
    .expect("client")
}

fn packed(ts: Timestamp) -> u64 {
    (u64::from(ts.time) << 32) | u64::from(ts.increment)
}

fn operation_time(reply: &Document) -> Timestamp {
    reply
        .get_timestamp("operationTime")
        .unwrap_or_else(|_| panic!("operationTime in {reply:?}"))
}

fn code_of(reply: &Document) -> i32 {
    assert_eq!(
        reply.get_f64("ok").ok(),
        Some(0.0),
        "error reply: {reply:?}"
    );
    reply.get_i32("code").unwrap()
}

fn first_batch(reply: &Document) -> Vec<Document> {
    reply
        .get_document("cursor")
        .unwrap_or_else(|_| panic!("cursor in {reply:?}"))
        .get_array("firstBatch")
        .unwrap()
        .iter()
        .map(|b| b.as_document().unwrap().clone())
        .collect()
}

/// The command documents of every recorded OP_MSG (decompressed).
fn commands_received(handle: &EmulatorHandle) -> Vec<Document> {
    handle
        .received_frames()
        .iter()
        .filter_map(|bytes| {
            let frame = FrameCodec::default()
                .decode(&mut BytesMut::from(&bytes[..]))
                .expect("recorded frame decodes")?;
            let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).ok()?;
            match opened.parse(&frame).ok()? {
                Message::Msg(m) => Document::try_from(m.body).ok(),
                _ => None,
            }
        })
        .collect()
}

// ------------------------------------------------------------------ G1

#[tokio::test]
async fn replica_set_and_mongos_replies_carry_cluster_time_standalone_does_not() {
    for (topology, stamped) in [
        (
            Topology::ReplicaSetPrimary {
                set_name: "rs0".into(),
            },
            true,
        ),
        (Topology::Mongos, true),
        (Topology::Standalone, false),
    ] {
        let emu = start(EmulatorConfig {
            topology: topology.clone(),
            ..EmulatorConfig::default()
        })
        .await;
        let mut raw = RawClient::connect(emu.addr()).await;
        let replies = [
            raw.command(doc! { "hello": 1, "$db": "admin" }).await,
            raw.command(doc! { "ping": 1, "$db": "admin" }).await,
            raw.command(doc! { "insert": "c", "documents": [{ "_id": 1 }], "$db": "app" })
                .await,
            raw.command(doc! { "find": "c", "$db": "app" }).await,
            raw.command(doc! { "noSuchCommand": 1, "$db": "app" }).await,
        ];
        for reply in &replies {
            if !stamped {
                assert!(
                    reply.get("$clusterTime").is_none() && reply.get("operationTime").is_none(),
                    "{topology:?} must not stamp: {reply:?}"
                );
                continue;
            }
            let cluster = reply
                .get_document("$clusterTime")
                .unwrap_or_else(|_| panic!("{topology:?}: $clusterTime in {reply:?}"));
            let time = cluster.get_timestamp("clusterTime").unwrap();
            let signature = cluster.get_document("signature").unwrap();
            assert_eq!(
                signature.get("hash"),
                Some(&Bson::Binary(Binary {
                    subtype: BinarySubtype::Generic,
                    bytes: vec![0; 20]
                }))
            );
            assert_eq!(signature.get("keyId"), Some(&Bson::Int64(0)));
            assert!(packed(operation_time(reply)) <= packed(time));
        }
        emu.shutdown().await;
    }
}

#[tokio::test]
async fn writes_advance_the_cluster_time_and_gossip_moves_it_forward() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let before = operation_time(&raw.command(doc! { "ping": 1, "$db": "admin" }).await);
    let read = operation_time(&raw.command(doc! { "find": "c", "$db": "app" }).await);
    assert_eq!(read, before, "reads do not advance the clock");
    let first = operation_time(
        &raw.command(doc! { "insert": "c", "documents": [{ "_id": 1 }], "$db": "app" })
            .await,
    );
    let second = operation_time(
        &raw.command(doc! { "update": "c", "updates": [{ "q": { "_id": 1 }, "u": { "$set": { "v": 1 } } }], "$db": "app" })
            .await,
    );
    assert!(packed(before) < packed(first) && packed(first) < packed(second));
    // A client gossiping a later $clusterTime moves the clock there.
    let ahead = Timestamp {
        time: second.time + 1000,
        increment: 3,
    };
    let gossip = doc! { "clusterTime": ahead, "signature": { "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] }, "keyId": 0_i64 } };
    raw.command(doc! { "ping": 1, "$clusterTime": gossip.clone(), "$db": "admin" })
        .await;
    let now = raw.command(doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(operation_time(&now), ahead);
    // The hello's lastWrite follows the same clock.
    let hello = raw.command(doc! { "hello": 1, "$db": "admin" }).await;
    let last_write = hello.get_document("lastWrite").unwrap();
    assert_eq!(
        last_write
            .get_document("opTime")
            .unwrap()
            .get_timestamp("ts")
            .unwrap(),
        ahead
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn read_concern_cluster_times_are_checked_and_snapshot_reads_report_theirs() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let now = operation_time(
        &raw.command(doc! { "insert": "c", "documents": [{ "_id": 1, "k": "a" }, { "_id": 2, "k": "b" }], "$db": "app" })
            .await,
    );
    let later = Timestamp {
        time: now.time + 60,
        increment: 1,
    };
    // afterClusterTime up to now is fine; later than the server has seen is InvalidOptions.
    let ok = raw
        .command(doc! { "find": "c", "readConcern": { "afterClusterTime": now }, "$db": "app" })
        .await;
    assert_eq!(first_batch(&ok).len(), 2);
    let future = raw
        .command(doc! { "find": "c", "readConcern": { "level": "majority", "afterClusterTime": later }, "$db": "app" })
        .await;
    assert_eq!(code_of(&future), 72);
    assert!(future
        .get_str("errmsg")
        .unwrap()
        .contains("must not be greater than the current clusterTime"));
    // ... unless the same request gossips that time first.
    let gossiped = raw
        .command(doc! { "find": "c", "readConcern": { "afterClusterTime": later },
            "$clusterTime": { "clusterTime": later, "signature": { "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 20] }, "keyId": 0_i64 } },
            "$db": "app" })
        .await;
    assert_eq!(gossiped.get_f64("ok").unwrap(), 1.0, "{gossiped:?}");
    // atClusterTime is for snapshot reads only; both times at once is refused.
    let wrong_level = raw
        .command(doc! { "find": "c", "readConcern": { "level": "majority", "atClusterTime": now }, "$db": "app" })
        .await;
    assert_eq!(code_of(&wrong_level), 72);
    let both = raw
        .command(doc! { "find": "c", "readConcern": { "level": "snapshot", "atClusterTime": now, "afterClusterTime": now }, "$db": "app" })
        .await;
    assert_eq!(code_of(&both), 72);
    // A snapshot read reports its time on the first batch, not on getMore;
    // distinct reports it at the top level.
    let snap = raw
        .command(doc! { "find": "c", "batchSize": 1, "readConcern": { "level": "snapshot" }, "lsid": lsid(1), "$db": "app" })
        .await;
    let cursor = snap.get_document("cursor").unwrap();
    let at = cursor.get_timestamp("atClusterTime").unwrap();
    assert_eq!(at, later);
    let more = raw
        .command(doc! { "getMore": cursor.get_i64("id").unwrap(), "collection": "c", "lsid": lsid(1), "$db": "app" })
        .await;
    assert!(more
        .get_document("cursor")
        .unwrap()
        .get("atClusterTime")
        .is_none());
    let pinned = raw
        .command(doc! { "find": "c", "readConcern": { "level": "snapshot", "atClusterTime": now }, "$db": "app" })
        .await;
    assert_eq!(
        pinned
            .get_document("cursor")
            .unwrap()
            .get_timestamp("atClusterTime")
            .unwrap(),
        now
    );
    let distinct = raw
        .command(doc! { "distinct": "c", "key": "k", "readConcern": { "level": "snapshot" }, "$db": "app" })
        .await;
    assert_eq!(distinct.get_timestamp("atClusterTime").unwrap(), later);
    // Plain reads carry no atClusterTime.
    let plain = raw.command(doc! { "find": "c", "$db": "app" }).await;
    assert!(plain
        .get_document("cursor")
        .unwrap()
        .get("atClusterTime")
        .is_none());
    // Only a transaction's first statement may carry a readConcern.
    raw.command(doc! { "insert": "c", "documents": [{ "_id": 3 }], "lsid": lsid(2), "txnNumber": 1_i64,
        "startTransaction": true, "autocommit": false, "readConcern": { "level": "snapshot" }, "$db": "app" })
        .await;
    let second = raw
        .command(
            doc! { "find": "c", "lsid": lsid(2), "txnNumber": 1_i64, "autocommit": false,
            "readConcern": { "level": "snapshot" }, "$db": "app" },
        )
        .await;
    assert_eq!(code_of(&second), 72);
    emu.shutdown().await;

    // A standalone has no cluster time to wait for.
    let standalone = start(EmulatorConfig {
        topology: Topology::Standalone,
        ..EmulatorConfig::default()
    })
    .await;
    let mut raw = RawClient::connect(standalone.addr()).await;
    let refused = raw
        .command(doc! { "find": "c", "readConcern": { "afterClusterTime": now }, "$db": "app" })
        .await;
    assert_eq!(code_of(&refused), 20);
    standalone.shutdown().await;
}

#[tokio::test]
async fn a_causally_consistent_session_reads_after_its_own_write() {
    let emu = start(recording()).await;
    let client = direct_client(&emu).await;
    let items = client.database("cc").collection::<Document>("items");
    let mut session = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let write_time = session
        .operation_time()
        .expect("the session saw operationTime");
    let found = items
        .find_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    assert!(found.is_some());
    let commands = commands_received(&emu);
    let find = commands
        .iter()
        .find(|c| c.contains_key("find"))
        .expect("the find reached the emulator");
    assert_eq!(
        find.get_document("readConcern")
            .unwrap()
            .get_timestamp("afterClusterTime")
            .unwrap(),
        write_time,
        "the find waits for the session's own write: {find:?}"
    );
    // Once a reply carried $clusterTime, the driver gossips it back.
    assert!(
        find.get_document("$clusterTime")
            .is_ok_and(|c| c.get_timestamp("clusterTime").is_ok()),
        "the driver gossips $clusterTime: {find:?}"
    );
    // Shutdown waits for every session handle to be dropped.
    drop(session);
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_session_reads_every_time_at_its_first_cluster_time() {
    let emu = start(recording()).await;
    let client = direct_client(&emu).await;
    let items = client.database("snap").collection::<Document>("items");
    items
        .insert_many((0..5).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let mut session = client
        .start_session()
        .with_options(SessionOptions::builder().snapshot(true).build())
        .await
        .unwrap();
    for _ in 0..2 {
        let docs: Vec<Document> = items
            .find(doc! {})
            .session(&mut session)
            .await
            .unwrap()
            .stream(&mut session)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(docs.len(), 5);
    }
    let finds: Vec<Document> = commands_received(&emu)
        .into_iter()
        .filter(|c| c.contains_key("find"))
        .collect();
    assert_eq!(finds.len(), 2);
    let level = |c: &Document| {
        c.get_document("readConcern")
            .unwrap()
            .get_str("level")
            .unwrap()
            .to_string()
    };
    assert_eq!(level(&finds[0]), "snapshot");
    assert!(finds[0]
        .get_document("readConcern")
        .unwrap()
        .get("atClusterTime")
        .is_none());
    assert_eq!(level(&finds[1]), "snapshot");
    let at = finds[1]
        .get_document("readConcern")
        .unwrap()
        .get_timestamp("atClusterTime")
        .expect("the second read is pinned to the first one's atClusterTime");
    assert!(packed(at) <= packed(emu.state().cluster_time()));
    drop(session);
    client.shutdown().await;
    emu.shutdown().await;
}

// ------------------------------------------------------------------ G2

fn txn_update(session: u8, txn: i64, start: bool, id: i32, inc: i32) -> Document {
    let mut d = doc! { "update": "acct", "updates": [{ "q": { "_id": id }, "u": { "$inc": { "v": inc } } }],
    "lsid": lsid(session), "txnNumber": txn, "autocommit": false, "$db": "app" };
    if start {
        d.insert("startTransaction", true);
    }
    d
}

fn end_txn(command: &str, session: u8, txn: i64) -> Document {
    doc! { command: 1, "lsid": lsid(session), "txnNumber": txn, "autocommit": false, "$db": "admin" }
}

async fn value_of(raw: &mut RawClient, id: i32) -> i32 {
    let reply = raw
        .command(doc! { "find": "acct", "filter": { "_id": id }, "$db": "app" })
        .await;
    first_batch(&reply)[0].get_i32("v").unwrap()
}

#[tokio::test]
async fn the_second_transaction_writing_a_document_gets_a_write_conflict() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.command(doc! { "insert": "acct", "documents": [{ "_id": 1, "v": 100 }, { "_id": 2, "v": 200 }], "$db": "app" })
        .await;
    let a = raw.command(txn_update(1, 1, true, 1, -1)).await;
    assert_eq!(a.get_i32("nModified").unwrap(), 1);
    // Others read the committed version while A is open; A reads its own write.
    assert_eq!(value_of(&mut raw, 1).await, 100);
    let own = raw
        .command(doc! { "find": "acct", "filter": { "_id": 1 }, "lsid": lsid(1), "txnNumber": 1_i64, "autocommit": false, "$db": "app" })
        .await;
    assert_eq!(first_batch(&own)[0].get_i32("v").unwrap(), 99);
    // B writes the same document: WriteConflict, transient, and B is aborted.
    let conflict = raw.command(txn_update(2, 1, true, 1, -1)).await;
    assert_eq!(code_of(&conflict), 112);
    assert_eq!(conflict.get_str("codeName").unwrap(), "WriteConflict");
    assert_eq!(
        conflict.get_array("errorLabels").unwrap(),
        &vec![Bson::String("TransientTransactionError".into())]
    );
    assert_eq!(
        code_of(&raw.command(end_txn("commitTransaction", 2, 1)).await),
        251
    );
    // B retries with the next txnNumber on the other document and commits;
    // A aborts: B's committed write stays, A's is undone.
    let retry = raw.command(txn_update(2, 2, true, 2, 5)).await;
    assert_eq!(retry.get_i32("nModified").unwrap(), 1);
    assert_eq!(
        raw.command(end_txn("commitTransaction", 2, 2))
            .await
            .get_f64("ok")
            .unwrap(),
        1.0
    );
    assert_eq!(
        raw.command(end_txn("abortTransaction", 1, 1))
            .await
            .get_f64("ok")
            .unwrap(),
        1.0
    );
    assert_eq!(value_of(&mut raw, 1).await, 100);
    assert_eq!(value_of(&mut raw, 2).await, 205);
    // A write committed after a transaction's snapshot conflicts with it too.
    raw.command(txn_update(3, 1, true, 2, 1)).await; // locks 2: snapshot taken
    raw.command(end_txn("abortTransaction", 3, 1)).await;
    raw.command(doc! { "find": "acct", "lsid": lsid(4), "txnNumber": 1_i64, "startTransaction": true, "autocommit": false, "$db": "app" })
        .await;
    raw.command(doc! { "update": "acct", "updates": [{ "q": { "_id": 1 }, "u": { "$set": { "v": 7 } } }], "$db": "app" })
        .await;
    let stale = raw.command(txn_update(4, 1, false, 1, 1)).await;
    assert_eq!(code_of(&stale), 112);
    assert_eq!(emu.state().open_transaction_count(), 0);
    emu.shutdown().await;
}

#[tokio::test]
async fn a_plain_write_waits_for_the_transaction_holding_its_document() {
    let emu = start(EmulatorConfig::default()).await;
    let mut owner = RawClient::connect(emu.addr()).await;
    let mut writer = RawClient::connect(emu.addr()).await;
    owner
        .command(doc! { "insert": "acct", "documents": [{ "_id": 1, "v": 10 }, { "_id": 2, "v": 0 }], "$db": "app" })
        .await;
    owner.command(txn_update(1, 1, true, 1, 5)).await;
    // A multi-statement plain write: the first statement (another document)
    // runs at once, the second waits for the lock.
    let id = writer
        .send(
            0,
            &doc! { "update": "acct", "updates": [
                { "q": { "_id": 2 }, "u": { "$inc": { "v": 1 } } },
                { "q": { "_id": 1 }, "u": { "$inc": { "v": 100 } } },
            ], "$db": "app" },
        )
        .await;
    assert!(
        writer
            .recv_within(Duration::from_millis(300))
            .await
            .is_none(),
        "the plain write must wait while the transaction holds the document"
    );
    assert_eq!(value_of(&mut owner, 2).await, 1, "statement 0 already ran");
    let started = Instant::now();
    owner.command(end_txn("commitTransaction", 1, 1)).await;
    let reply = writer.reply().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woken by the commit"
    );
    assert_eq!(reply.response_to, id);
    assert_eq!(
        (
            reply.doc.get_i32("n").unwrap(),
            reply.doc.get_i32("nModified").unwrap()
        ),
        (2, 2)
    );
    assert_eq!(value_of(&mut owner, 1).await, 115);
    assert_eq!(value_of(&mut owner, 2).await, 1, "statement 0 ran once");
    // With maxTimeMS the wait ends in MaxTimeMSExpired.
    owner.command(txn_update(1, 2, true, 1, 1)).await;
    let expired = writer
        .command(doc! { "delete": "acct", "deletes": [{ "q": { "_id": 1 }, "limit": 1 }], "maxTimeMS": 200, "$db": "app" })
        .await;
    assert_eq!(code_of(&expired), 50);
    owner.command(end_txn("abortTransaction", 1, 2)).await;
    assert_eq!(value_of(&mut owner, 1).await, 115);
    emu.shutdown().await;
}

/// The interop probe's scenario with the Rust driver, through the proxy
/// with the session engine: concurrent `with_transaction`s decrement one
/// counter (conflicting, retrying), one aborts on an application error.
/// The total is exact, and the engine sees nothing wrong.
#[tokio::test]
async fn with_transaction_retries_converge_and_raise_no_violation() {
    const TASKS: i32 = 6;
    let g = common::Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let client = g.client("fidelity").await;
    let counters = client.database("bank").collection::<Document>("counters");
    counters
        .insert_one(doc! { "_id": "c", "count": 100 })
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for task in 0..=TASKS {
        let client = client.clone();
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            let mut session = client.start_session().await.unwrap();
            session
                .start_transaction()
                .and_run(counters, |session, counters| {
                    async move {
                        counters
                            .update_one(doc! { "_id": "c" }, doc! { "$inc": { "count": -1 } })
                            .session(&mut *session)
                            .await?;
                        // Hold the lock a while so the transactions overlap.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        if task == TASKS {
                            return Err(DriverError::custom("application gives up"));
                        }
                        Ok(())
                    }
                    .boxed()
                })
                .await
        }));
    }
    let mut gave_up = 0;
    for task in tasks {
        if task.await.unwrap().is_err() {
            gave_up += 1;
        }
    }
    assert_eq!(gave_up, 1, "only the application error fails");
    let counter = counters
        .find_one(doc! { "_id": "c" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counter.get_i32("count").unwrap(), 100 - TASKS);
    assert!(
        g.stack.emulator.command_count("update") > (TASKS + 1) as u64,
        "conflicts made the driver retry ({} updates)",
        g.stack.emulator.command_count("update")
    );
    client.shutdown().await;
    let fired = g.settle_closed().await;
    assert!(
        fired.is_empty(),
        "no violation for correct retries: {fired:?}"
    );
    g.stop().await;
}

// ------------------------------------------------------------------ G3

#[tokio::test]
async fn an_exhaust_get_more_streams_the_rest_of_the_cursor() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.command(doc! { "insert": "e", "documents": (0..12).map(|i| doc! { "_id": i }).collect::<Vec<_>>(), "$db": "app" })
        .await;
    let opened = raw
        .command(doc! { "find": "e", "batchSize": 3, "$db": "app" })
        .await;
    let cursor_id = opened
        .get_document("cursor")
        .unwrap()
        .get_i64("id")
        .unwrap();
    let request = raw
        .send(
            MsgFlags::EXHAUST_ALLOWED,
            &doc! { "getMore": cursor_id, "collection": "e", "batchSize": 3, "$db": "app" },
        )
        .await;
    let mut seen = 3;
    let mut answering = request;
    let mut replies = 0;
    loop {
        let reply = raw.reply().await;
        replies += 1;
        assert_eq!(
            reply.response_to, answering,
            "each reply answers the previous one"
        );
        let cursor = reply.doc.get_document("cursor").unwrap();
        seen += cursor.get_array("nextBatch").unwrap().len();
        assert!(reply.doc.get_document("$clusterTime").is_ok());
        let open = cursor.get_i64("id").unwrap() != 0;
        assert_eq!(
            reply.flags.more_to_come(),
            open,
            "moreToCome on all but the last"
        );
        if !open {
            break;
        }
        answering = reply.request_id;
    }
    assert_eq!((seen, replies), (12, 3));
    assert_eq!(
        emu.command_count("getMore"),
        1,
        "one request, three replies"
    );
    // The connection is usable afterwards.
    let ping = raw.command(doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(ping.get_f64("ok").unwrap(), 1.0);
    // Without exhaustAllowed a getMore gets one reply.
    let again = raw
        .command(doc! { "find": "e", "batchSize": 3, "$db": "app" })
        .await;
    let id = again.get_document("cursor").unwrap().get_i64("id").unwrap();
    let one = raw
        .send(
            0,
            &doc! { "getMore": id, "collection": "e", "batchSize": 3, "$db": "app" },
        )
        .await;
    let reply = raw.reply().await;
    assert_eq!(reply.response_to, one);
    assert!(!reply.flags.more_to_come());
    assert!(raw.recv_within(Duration::from_millis(200)).await.is_none());
    emu.shutdown().await;
}

// ------------------------------------------------------------------ lifetime and history

#[tokio::test]
async fn transactions_past_the_lifetime_limit_are_aborted() {
    let emu = start(EmulatorConfig {
        transaction_lifetime_limit: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let parameter = raw
        .command(doc! { "getParameter": 1, "transactionLifetimeLimitSeconds": 1, "$db": "admin" })
        .await;
    assert_eq!(
        parameter
            .get_i64("transactionLifetimeLimitSeconds")
            .unwrap(),
        1
    );
    raw.command(
        doc! { "insert": "t", "documents": [{ "_id": 1 }], "lsid": lsid(9), "txnNumber": 1_i64,
        "startTransaction": true, "autocommit": false, "$db": "app" },
    )
    .await;
    assert_eq!(emu.state().open_transaction_count(), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(emu.state().open_transaction_count(), 0);
    let commit = raw.command(end_txn("commitTransaction", 9, 1)).await;
    assert_eq!(code_of(&commit), 251);
    let found = raw.command(doc! { "find": "t", "$db": "app" }).await;
    assert!(first_batch(&found).is_empty(), "its insert was rolled back");
    emu.shutdown().await;

    let default = EmulatorConfig::default();
    assert_eq!(default.transaction_lifetime_limit, Duration::from_secs(60));
}

#[tokio::test]
async fn ended_and_killed_sessions_keep_their_txn_number_history() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let insert = |id: i32, txn: i64| {
        doc! { "insert": "h", "documents": [{ "_id": id }], "lsid": lsid(5), "txnNumber": txn, "$db": "app" }
    };
    assert_eq!(raw.command(insert(1, 5)).await.get_i32("n").unwrap(), 1);
    for end in ["endSessions", "killSessions"] {
        raw.command(doc! { end: [lsid(5)], "$db": "admin" }).await;
        // The lsid is usable again, but its history is the server's record:
        // a lower number is too old, and a retry is still recognised.
        assert_eq!(code_of(&raw.command(insert(2, 3)).await), 225);
        let retry = raw.command(insert(1, 5)).await;
        assert_eq!(retry.get_i32("n").unwrap(), 1);
        assert!(retry.get("writeErrors").is_none(), "{retry:?}");
    }
    assert_eq!(raw.command(insert(3, 6)).await.get_i32("n").unwrap(), 1);
    emu.shutdown().await;
}

// ------------------------------------------------------------------ G4

#[tokio::test]
async fn a_peer_reset_is_logged_at_debug_and_a_malformed_frame_warns() {
    common::logs::install();
    let emu = start(EmulatorConfig::default()).await;
    // Half a frame, then a reset (linger 0).
    let reset = TcpStream::connect(emu.addr()).await.unwrap();
    let reset_peer = reset.local_addr().unwrap();
    let mut reset = reset;
    reset.write_all(&[100, 0, 0, 0, 1, 0]).await.unwrap();
    // SO_LINGER 0 turns the close into a reset; with a zero linger the
    // close does not block, which is what the deprecation warns about.
    #[allow(deprecated)]
    reset.set_linger(Some(Duration::ZERO)).unwrap();
    drop(reset);
    // A frame whose length is smaller than its header.
    let mut bad = TcpStream::connect(emu.addr()).await.unwrap();
    let bad_peer = bad.local_addr().unwrap();
    bad.write_all(&[4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xdd, 7, 0, 0])
        .await
        .unwrap();
    let lines_of = |peer: std::net::SocketAddr| common::logs::containing(&format!("peer={peer}"));
    let seen = common::Stack::eventually(WAIT, || {
        lines_of(reset_peer)
            .iter()
            .any(|l| l.contains("emulator connection closed"))
            && lines_of(bad_peer)
                .iter()
                .any(|l| l.contains("malformed frame"))
    })
    .await;
    assert!(seen, "both connections were closed and logged");
    let reset_lines = lines_of(reset_peer);
    assert!(
        reset_lines
            .iter()
            .all(|l| !l.contains("WARN") && !l.contains("malformed")),
        "a reset is not a malformed frame: {reset_lines:?}"
    );
    assert!(reset_lines
        .iter()
        .any(|l| l.contains("DEBUG") && l.contains("peer closed the connection")));
    let bad_lines = lines_of(bad_peer);
    assert!(
        bad_lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("malformed frame")),
        "{bad_lines:?}"
    );
    drop(bad);
    emu.shutdown().await;
}

/// The find/getMore path keeps working with FindOptions (batch sizes) and
/// the stamps do not disturb the driver's cursor handling.
#[tokio::test]
async fn driver_cursors_still_work_with_stamped_replies() {
    let emu = start(EmulatorConfig::default()).await;
    let client = direct_client(&emu).await;
    let items = client.database("cur").collection::<Document>("items");
    items
        .insert_many((0..20).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let docs: Vec<Document> = items
        .find(doc! {})
        .with_options(FindOptions::builder().batch_size(6).build())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(docs.len(), 20);
    client.shutdown().await;
    emu.shutdown().await;
}

// ------------------------------------------------------------ fail points
// `configureFailPoint` / `failCommand` as the drivers' spec tests use it,
// driven by the Rust driver where a user would meet the fault and by raw
// frames where the exact reply matters.

/// The server error code carried by a driver error.
fn driver_code(err: &DriverError) -> Option<i32> {
    use mongodb::error::{ErrorKind, WriteFailure};
    match err.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(e)) => Some(e.code),
        _ => None,
    }
}

fn fail_point(mode: Bson, data: Document) -> Document {
    doc! { "configureFailPoint": "failCommand", "mode": mode, "data": data, "$db": "admin" }
}

fn times(n: i32) -> Bson {
    Bson::Document(doc! { "times": n })
}

fn labels_of(reply: &Document) -> Vec<String> {
    reply
        .get_array("errorLabels")
        .map(|a| {
            a.iter()
                .filter_map(Bson::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn fail_command_error_code_answers_before_the_command_runs() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let armed = raw
        .command(fail_point(
            times(1),
            doc! { "failCommands": ["insert"], "errorCode": 91 },
        ))
        .await;
    assert_eq!(armed.get_i64("count").unwrap(), 0);
    let retryable_insert = |id: i32, txn: i64| {
        doc! { "insert": "f", "documents": [ { "_id": id } ], "lsid": lsid(1),
        "txnNumber": txn, "$db": "app" }
    };
    let failed = raw.command(retryable_insert(1, 1)).await;
    assert_eq!(code_of(&failed), 91);
    assert_eq!(failed.get_str("codeName").unwrap(), "ShutdownInProgress");
    assert_eq!(
        failed.get_str("errmsg").unwrap(),
        "Failing command via 'failCommand' failpoint"
    );
    assert_eq!(labels_of(&failed), vec!["RetryableWriteError"]);
    let none = raw
        .command(doc! { "find": "f", "filter": {}, "$db": "app" })
        .await;
    assert!(
        first_batch(&none).is_empty(),
        "the failed insert did not run"
    );
    // {times: 1} is spent: the same write now runs.
    assert_eq!(
        raw.command(retryable_insert(1, 1))
            .await
            .get_i32("n")
            .unwrap(),
        1
    );

    // Labels given replace the computed ones, even by none; a not-primary
    // code carries the member's topologyVersion; an error inside a
    // transaction aborts it, as any error there does.
    raw.command(fail_point(
        Bson::String("alwaysOn".into()),
        doc! { "failCommands": ["insert"], "errorCode": 10107, "errorLabels": [] },
    ))
    .await;
    let unlabelled = raw.command(retryable_insert(2, 2)).await;
    assert_eq!(code_of(&unlabelled), 10107);
    assert!(labels_of(&unlabelled).is_empty(), "{unlabelled:?}");
    assert!(unlabelled.get_document("topologyVersion").is_ok());
    raw.command(fail_point(
        Bson::String("alwaysOn".into()),
        doc! { "failCommands": ["update"], "errorCode": 10107 },
    ))
    .await;
    let started = raw.command(txn_update(2, 1, true, 1, 1)).await;
    assert_eq!(code_of(&started), 10107);
    assert_eq!(labels_of(&started), vec!["TransientTransactionError"]);
    raw.command(fail_point(Bson::String("off".into()), doc! {}))
        .await;
    let txn = raw
        .command(
            doc! { "insert": "f", "documents": [ { "_id": 3 } ], "lsid": lsid(3),
            "txnNumber": 1_i64, "startTransaction": true, "autocommit": false, "$db": "app" },
        )
        .await;
    assert_eq!(txn.get_i32("n").unwrap(), 1);
    raw.command(fail_point(
        times(1),
        doc! { "failCommands": ["insert"], "errorCode": 2 },
    ))
    .await;
    let second = raw
        .command(
            doc! { "insert": "f", "documents": [ { "_id": 4 } ], "lsid": lsid(3),
            "txnNumber": 1_i64, "autocommit": false, "$db": "app" },
        )
        .await;
    assert_eq!(code_of(&second), 2);
    let commit = raw.command(end_txn("commitTransaction", 3, 1)).await;
    assert_eq!(
        code_of(&commit),
        251,
        "the transaction was aborted: {commit:?}"
    );
    let ids: Vec<Document> = first_batch(
        &raw.command(doc! { "find": "f", "filter": {}, "$db": "app" })
            .await,
    );
    assert_eq!(ids, vec![doc! { "_id": 1 }]);
    let off = raw
        .command(fail_point(Bson::String("off".into()), doc! {}))
        .await;
    assert_eq!(off.get_i64("count").unwrap(), 4);
    emu.shutdown().await;
}

#[tokio::test]
async fn times_and_skip_count_only_the_commands_they_match() {
    let emu = start(EmulatorConfig::default()).await;
    let client = direct_client(&emu).await;
    let admin = client.database("admin");
    let items = client.database("fp").collection::<Document>("items");
    items.insert_one(doc! { "_id": 1 }).await.unwrap();
    admin
        .run_command(fail_point(
            Bson::Document(doc! { "skip": 2 }),
            doc! { "failCommands": ["distinct"], "errorCode": 2 },
        ))
        .await
        .unwrap();
    // Other commands do not count towards the skip.
    for _ in 0..3 {
        items.find_one(doc! {}).await.unwrap();
    }
    for _ in 0..2 {
        items.distinct("_id", doc! {}).await.unwrap();
    }
    for _ in 0..2 {
        let err = items.distinct("_id", doc! {}).await.unwrap_err();
        assert_eq!(driver_code(&err), Some(2), "{err}");
    }
    admin
        .run_command(fail_point(
            times(2),
            doc! { "failCommands": ["find"], "errorCode": 2 },
        ))
        .await
        .unwrap();
    for _ in 0..2 {
        let err = items.find_one(doc! {}).await.unwrap_err();
        assert_eq!(driver_code(&err), Some(2), "{err}");
    }
    assert_eq!(
        items.find_one(doc! {}).await.unwrap(),
        Some(doc! { "_id": 1 })
    );
    assert_eq!(emu.fail_point_entered(), 4);
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn close_connection_closes_without_a_reply_and_the_driver_retries() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.command(fail_point(
        times(1),
        doc! { "failCommands": ["insert"], "closeConnection": true },
    ))
    .await;
    raw.send(
        0,
        &doc! { "insert": "c", "documents": [ { "_id": 1 } ], "$db": "app" },
    )
    .await;
    assert!(raw.closed_within(WAIT).await, "closed without a reply");
    let mut other = RawClient::connect(emu.addr()).await;
    assert!(
        first_batch(&other.command(doc! { "find": "c", "$db": "app" }).await).is_empty(),
        "the command did not run"
    );

    // A retryable read meets the same fault and retries on a new connection.
    let client = direct_client(&emu).await;
    let items = client.database("app").collection::<Document>("c");
    items.insert_one(doc! { "_id": 7 }).await.unwrap();
    client
        .database("admin")
        .run_command(fail_point(
            times(1),
            doc! { "failCommands": ["find"], "closeConnection": true },
        ))
        .await
        .unwrap();
    let found = items.find_one(doc! { "_id": 7 }).await.unwrap();
    assert_eq!(found, Some(doc! { "_id": 7 }));
    assert_eq!(emu.fail_point_entered(), 2);
    assert!(
        emu.command_count("find") >= 3,
        "the driver retried the find"
    );
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn block_connection_holds_only_that_connection_then_answers() {
    let emu = start(EmulatorConfig::default()).await;
    let mut blocked = RawClient::connect(emu.addr()).await;
    let mut bystander = RawClient::connect(emu.addr()).await;
    blocked
        .command(fail_point(
            times(1),
            doc! { "failCommands": ["insert"], "blockConnection": true, "blockTimeMS": 400,
            "errorCode": 50 },
        ))
        .await;
    let started = Instant::now();
    let id = blocked
        .send(
            0,
            &doc! { "insert": "b", "documents": [ { "_id": 1 } ], "$db": "app" },
        )
        .await;
    // The wait holds no lock: another connection is answered meanwhile.
    let pong = bystander.command(doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(pong.get_f64("ok").unwrap(), 1.0);
    let reply = blocked.reply().await;
    assert_eq!(reply.response_to, id);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(code_of(&reply.doc), 50, "the error follows the wait");
    // Block alone: the command then runs normally.
    blocked
        .command(fail_point(
            times(1),
            doc! { "failCommands": ["insert"], "blockConnection": true, "blockTimeMS": 50 },
        ))
        .await;
    let ran = blocked
        .command(doc! { "insert": "b", "documents": [ { "_id": 2 } ], "$db": "app" })
        .await;
    assert_eq!(ran.get_i32("n").unwrap(), 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn app_name_limits_the_fail_point_to_that_applications_connections() {
    let emu = start(EmulatorConfig::default()).await;
    let client_named = |app: &str| {
        Client::with_uri_str(format!(
            "mongodb://{}/?directConnection=true&appName={app}&retryReads=false",
            emu.addr()
        ))
    };
    let victim = client_named("victim").await.unwrap();
    let bystander = client_named("bystander").await.unwrap();
    victim
        .database("admin")
        .run_command(fail_point(
            Bson::String("alwaysOn".into()),
            doc! { "failCommands": ["find"], "errorCode": 11600, "appName": "victim" },
        ))
        .await
        .unwrap();
    let err = victim
        .database("app")
        .collection::<Document>("a")
        .find_one(doc! {})
        .await
        .unwrap_err();
    assert_eq!(driver_code(&err), Some(11600), "{err}");
    bystander
        .database("app")
        .collection::<Document>("a")
        .find_one(doc! {})
        .await
        .unwrap();
    // hello is failed too when named (the handshake's own appName counts).
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.command(fail_point(
        Bson::String("alwaysOn".into()),
        doc! { "failCommands": ["hello"], "errorCode": 2, "appName": "probe" },
    ))
    .await;
    let refused = raw
        .command(
            doc! { "hello": 1, "client": { "application": { "name": "probe" } }, "$db": "admin" },
        )
        .await;
    assert_eq!(code_of(&refused), 2);
    let mut plain = RawClient::connect(emu.addr()).await;
    let hello = plain.command(doc! { "hello": 1, "$db": "admin" }).await;
    assert!(hello.get_bool("isWritablePrimary").unwrap());
    raw.command(fail_point(Bson::String("off".into()), doc! {}))
        .await;
    victim.shutdown().await;
    bystander.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_write_concern_error_comes_after_the_write_applied_and_the_retry_is_deduplicated() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let wce = doc! { "code": 91, "codeName": "ShutdownInProgress", "errmsg": "Replication is being shut down" };
    raw.command(fail_point(
        times(1),
        doc! { "failCommands": ["insert"], "writeConcernError": wce.clone() },
    ))
    .await;
    let applied = raw
        .command(doc! { "insert": "w", "documents": [ { "_id": 1 } ], "$db": "app" })
        .await;
    assert_eq!(applied.get_f64("ok").unwrap(), 1.0);
    assert_eq!(applied.get_i32("n").unwrap(), 1);
    assert_eq!(applied.get_document("writeConcernError").unwrap(), &wce);
    assert!(labels_of(&applied).is_empty(), "not a retryable write");
    raw.command(fail_point(
        times(1),
        doc! { "failCommands": ["insert"], "writeConcernError": wce.clone() },
    ))
    .await;
    let retryable = raw
        .command(
            doc! { "insert": "w", "documents": [ { "_id": 2 } ], "lsid": lsid(1),
            "txnNumber": 1_i64, "$db": "app" },
        )
        .await;
    assert_eq!(retryable.get_i32("n").unwrap(), 1);
    assert_eq!(labels_of(&retryable), vec!["RetryableWriteError"]);
    let retried = raw
        .command(
            doc! { "insert": "w", "documents": [ { "_id": 2 } ], "lsid": lsid(1),
            "txnNumber": 1_i64, "$db": "app" },
        )
        .await;
    assert_eq!(
        retried.get_i32("n").unwrap(),
        1,
        "the retry answers from history"
    );
    assert!(
        retried.get("writeErrors").is_none(),
        "no duplicate key: not run again"
    );

    // The driver retries a retryable write on RetryableWriteError; the
    // retry is answered from the session's history, not applied again.
    // (A write concern timeout labelled by the fail point, as the
    // retryable-writes spec tests do: a shutdown code would also make the
    // driver wait for its monitor to see the server again.)
    let client = direct_client(&emu).await;
    let items = client.database("app").collection::<Document>("w");
    client
        .database("admin")
        .run_command(fail_point(
            times(1),
            doc! { "failCommands": ["update"],
            "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed",
                "errmsg": "waiting for replication timed out", "errInfo": { "wtimeout": true } },
            "errorLabels": ["RetryableWriteError"] },
        ))
        .await
        .unwrap();
    let updates_before = emu.command_count("update");
    let updated = items
        .update_one(doc! { "_id": 1 }, doc! { "$inc": { "n": 1 } })
        .await
        .unwrap();
    assert_eq!(updated.modified_count, 1);
    assert_eq!(
        emu.command_count("update") - updates_before,
        2,
        "retried once"
    );
    let doc = items.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(doc.get_i32("n").unwrap(), 1, "applied exactly once");
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 2);
    client.shutdown().await;
    emu.shutdown().await;
}

/// The emulator-only `closeConnectionAfterExecution`: the write applies,
/// the reply is lost, the driver retries on a new connection with the same
/// lsid / txnNumber / stmtId, and the retry returns the first outcome
/// without applying the write again.
#[tokio::test]
async fn a_reply_lost_after_execution_is_retried_and_applied_once() {
    let emu = start(EmulatorConfig::default()).await;
    let client = direct_client(&emu).await;
    let admin = client.database("admin");
    let items = client.database("app").collection::<Document>("lost");
    items
        .insert_one(doc! { "_id": "counter", "n": 0 })
        .await
        .unwrap();
    for command in ["insert", "update", "findAndModify", "delete"] {
        admin
            .run_command(fail_point(
                times(1),
                doc! { "failCommands": [command], "closeConnectionAfterExecution": true },
            ))
            .await
            .unwrap();
        let before = emu.command_count(command);
        match command {
            "insert" => {
                items.insert_one(doc! { "_id": "new" }).await.unwrap();
            }
            "update" => {
                let r = items
                    .update_one(doc! { "_id": "counter" }, doc! { "$inc": { "n": 1 } })
                    .await
                    .unwrap();
                assert_eq!(r.modified_count, 1);
            }
            "findAndModify" => {
                let old = items
                    .find_one_and_update(doc! { "_id": "counter" }, doc! { "$inc": { "n": 10 } })
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(old.get_i32("n").unwrap(), 1, "the first outcome, replayed");
            }
            _ => {
                let r = items.delete_one(doc! { "_id": "new" }).await.unwrap();
                assert_eq!(r.deleted_count, 1, "the first outcome, replayed");
            }
        }
        assert_eq!(
            emu.command_count(command) - before,
            2,
            "{command} was retried"
        );
    }
    let counter = items
        .find_one(doc! { "_id": "counter" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counter.get_i32("n").unwrap(), 11, "each write applied once");
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 1);

    // A commit whose reply is lost: the driver retries commitTransaction,
    // and the transaction is committed once.
    admin
        .run_command(fail_point(
            times(1),
            doc! { "failCommands": ["commitTransaction"], "closeConnectionAfterExecution": true },
        ))
        .await
        .unwrap();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    items
        .update_one(doc! { "_id": "counter" }, doc! { "$inc": { "n": 100 } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    assert_eq!(emu.command_count("commitTransaction"), 2);
    let counter = items
        .find_one(doc! { "_id": "counter" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(counter.get_i32("n").unwrap(), 111);
    drop(session);
    client.shutdown().await;
    emu.shutdown().await;
}

// ------------------------------------------------------------- step-down

#[allow(non_snake_case)]
fn STEP_DOWN(secs: i32) -> Document {
    doc! { "replSetStepDown": secs, "secondaryCatchUpPeriodSecs": 0, "$db": "admin" }
}

fn replica_set_uri(seed: &EmulatorHandle) -> String {
    format!(
        "mongodb://{}/?replicaSet=rs0&serverSelectionTimeoutMS=10000",
        seed.addr()
    )
}

async fn hello_of(member: &EmulatorHandle) -> Document {
    RawClient::connect(member.addr())
        .await
        .command(doc! { "hello": 1, "$db": "admin" })
        .await
}

#[tokio::test]
async fn step_down_elects_the_next_member_and_the_driver_follows() {
    let members =
        Emulator::start_replica_set("127.0.0.1:0".parse().unwrap(), 3, EmulatorConfig::default())
            .await
            .unwrap();
    let client = Client::with_uri_str(replica_set_uri(&members[0]))
        .await
        .unwrap();
    let items = client.database("app").collection::<Document>("sd");
    // A steady stream of retryable writes across the step-down.
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (items, written, stop) = (items.clone(), written.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                items.insert_one(doc! { "_id": i }).await?;
                written.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, DriverError>(i)
        })
    };
    let counter_before = hello_of(&members[1])
        .await
        .get_document("topologyVersion")
        .unwrap()
        .get_i64("counter")
        .unwrap();
    let mut on_old_primary = RawClient::connect(members[0].addr()).await;
    let mut on_member_1 = RawClient::connect(members[1].addr()).await;
    let mut stepper = RawClient::connect(members[0].addr()).await;
    assert!(common::Stack::eventually(WAIT, || written.load(Ordering::Relaxed) >= 20).await);
    let stepped = stepper.command(STEP_DOWN(60)).await;
    assert_eq!(stepped.get_f64("ok").unwrap(), 1.0, "{stepped:?}");
    assert!(
        stepper.closed_within(WAIT).await,
        "its own connection closes after the reply"
    );
    assert!(
        on_old_primary.closed_within(WAIT).await,
        "the old primary closes its connections"
    );
    assert!(members[1].is_primary() && !members[0].is_primary());
    let pong = on_member_1
        .command(doc! { "ping": 1, "$db": "admin" })
        .await;
    assert_eq!(
        pong.get_f64("ok").unwrap(),
        1.0,
        "other members keep theirs"
    );
    for member in &members {
        let hello = hello_of(member).await;
        assert_eq!(
            hello.get_str("primary").unwrap(),
            members[1].addr().to_string()
        );
        assert_eq!(
            hello.get_bool("isWritablePrimary").unwrap(),
            member.member() == 1
        );
        assert!(
            hello
                .get_document("topologyVersion")
                .unwrap()
                .get_i64("counter")
                .unwrap()
                > counter_before
        );
    }
    // Stepped down, member 0 is not primary and not electable for 60 s.
    let again = RawClient::connect(members[0].addr())
        .await
        .command(STEP_DOWN(60))
        .await;
    assert_eq!(code_of(&again), 10107);
    assert_eq!(
        again.get_str("errmsg").unwrap(),
        "not primary so can't step down"
    );

    // The writes go on, on the new primary.
    let after = written.load(Ordering::Relaxed);
    assert!(
        common::Stack::eventually(WAIT, || written.load(Ordering::Relaxed) >= after + 50).await
    );
    stop.store(true, Ordering::Relaxed);
    let total = writer
        .await
        .unwrap()
        .expect("every write succeeded across the step-down");
    assert_eq!(
        items.count_documents(doc! {}).await.unwrap(),
        total as u64,
        "none lost or doubled"
    );
    client.shutdown().await;
    for member in members {
        member.shutdown().await;
    }
}

/// With reply latency (as the interop suites run the emulator), the step-down
/// answers its own caller before it closes that connection: the disconnect it
/// signals cuts the other connections' waits, not its own reply.
#[tokio::test]
async fn with_reply_latency_the_step_down_still_answers_before_closing() {
    let config = EmulatorConfig {
        reply_latency: Duration::from_millis(20),
        ..EmulatorConfig::default()
    };
    let members = Emulator::start_replica_set("127.0.0.1:0".parse().unwrap(), 3, config)
        .await
        .unwrap();
    let mut stepper = RawClient::connect(members[0].addr()).await;
    let id = stepper.send(0, &STEP_DOWN(1)).await;
    let reply = stepper.recv_within(WAIT).await;
    let reply = reply.expect("the step-down's reply, not a closed connection");
    assert_eq!(reply.response_to, id);
    assert_eq!(reply.doc.get_f64("ok").unwrap(), 1.0, "{:?}", reply.doc);
    assert!(
        stepper.closed_within(WAIT).await,
        "then its own connection closes"
    );
    assert!(members[1].is_primary() && !members[0].is_primary());
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test]
async fn writes_on_a_secondary_and_bad_step_downs_are_refused_like_the_server() {
    let members =
        Emulator::start_replica_set("127.0.0.1:0".parse().unwrap(), 2, EmulatorConfig::default())
            .await
            .unwrap();
    let mut secondary = RawClient::connect(members[1].addr()).await;
    let refused = secondary
        .command(
            doc! { "insert": "s", "documents": [ { "_id": 1 } ], "lsid": lsid(1),
            "txnNumber": 1_i64, "$db": "app" },
        )
        .await;
    assert_eq!(code_of(&refused), 10107);
    assert_eq!(refused.get_str("codeName").unwrap(), "NotWritablePrimary");
    assert_eq!(labels_of(&refused), vec!["RetryableWriteError"]);
    assert!(refused.get_document("topologyVersion").is_ok());
    let not_primary = secondary.command(STEP_DOWN(60)).await;
    assert_eq!(code_of(&not_primary), 10107);
    // An unacknowledged write to a secondary makes it hang up.
    secondary
        .send(
            MsgFlags::MORE_TO_COME,
            &doc! { "insert": "s", "documents": [ { "_id": 2 } ], "writeConcern": { "w": 0 }, "$db": "app" },
        )
        .await;
    assert!(secondary.closed_within(WAIT).await);

    let mut primary = RawClient::connect(members[0].addr()).await;
    let short = primary
        .command(doc! { "replSetStepDown": 5, "$db": "admin" })
        .await;
    assert_eq!(
        code_of(&short),
        2,
        "5 s is shorter than the 10 s catch-up: {short:?}"
    );
    let elsewhere = primary
        .command(doc! { "replSetStepDown": 60, "$db": "app" })
        .await;
    assert_eq!(code_of(&elsewhere), 13);
    assert!(members[0].is_primary(), "nothing changed");
    primary.command(STEP_DOWN(60)).await;
    assert!(members[1].is_primary());
    // Member 0 is in its step-down period: nobody is electable, so without
    // force the new primary cannot step down.
    let alone = RawClient::connect(members[1].addr())
        .await
        .command(STEP_DOWN(60))
        .await;
    assert_eq!(code_of(&alone), 262, "{alone:?}");
    assert!(members[1].is_primary());
    for member in members {
        member.shutdown().await;
    }
}

#[tokio::test]
async fn a_forced_step_down_of_a_lone_primary_is_reelected_after_its_period() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let stepped = raw
        .command(doc! { "replSetStepDown": 2, "force": true, "$db": "admin" })
        .await;
    assert_eq!(stepped.get_f64("ok").unwrap(), 1.0);
    let hello = hello_of(&emu).await;
    assert!(!hello.get_bool("isWritablePrimary").unwrap());
    assert!(hello.get_str("primary").is_err(), "no primary meanwhile");
    let back = common::Stack::eventually(WAIT, || emu.is_primary()).await;
    assert!(back, "re-elected once its period ended");
    emu.shutdown().await;
}

#[tokio::test]
async fn step_down_aborts_transactions_and_may_keep_connections_and_delay_the_election() {
    let config = EmulatorConfig {
        close_connections_on_step_down: false,
        election_delay: Duration::from_secs(2),
        ..EmulatorConfig::default()
    };
    let members = Emulator::start_replica_set("127.0.0.1:0".parse().unwrap(), 2, config)
        .await
        .unwrap();
    let mut old = RawClient::connect(members[0].addr()).await;
    let started = old.command(txn_update(1, 1, true, 1, 1)).await;
    assert_eq!(started.get_f64("ok").unwrap(), 1.0);
    old.command(STEP_DOWN(60)).await;
    let hello = old.command(doc! { "hello": 1, "$db": "admin" }).await;
    assert!(
        hello.get_bool("secondary").unwrap(),
        "the connection stays open"
    );
    assert!(
        hello.get_str("primary").is_err(),
        "no primary during the election delay"
    );
    assert!(common::Stack::eventually(WAIT, || members[1].is_primary()).await);
    let mut new = RawClient::connect(members[1].addr()).await;
    let commit = new.command(end_txn("commitTransaction", 1, 1)).await;
    assert_eq!(
        code_of(&commit),
        251,
        "the step-down aborted it: {commit:?}"
    );
    assert_eq!(labels_of(&commit), vec!["TransientTransactionError"]);
    for member in members {
        member.shutdown().await;
    }
}
