//! The emulator driven directly (no proxy) by the official Rust driver and by
//! raw wire frames, to prove it behaves like the server for everything the
//! proxy's tests rely on: handshake and streaming hello, CRUD, cursors,
//! sessions and their expiry, transactions, retryable-write deduplication.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use futures_util::StreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::event::sdam::SdamEvent;
use mongodb::event::EventHandler;
use mongodb::options::{ClientOptions, ReturnDocument};
use mongodb::{Client, IndexModel, ServerType};
use sessionguard_emulator::{
    Emulator, EmulatorConfig, EmulatorHandle, Profile, Topology, UserRole,
};
use sessionguard_protocol::wire::{self, legacy, MsgFlags, OpCode};

use sessionguard_test_support::{lsid, RawClient, WAIT};

async fn start(config: EmulatorConfig) -> EmulatorHandle {
    // RUST_LOG=sessionguard=debug shows the emulator's command log.
    sessionguard_test_support::logs::install();
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("emulator starts")
}

async fn direct_client(handle: &EmulatorHandle) -> Client {
    Client::with_uri_str(format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=5000",
        handle.addr()
    ))
    .await
    .expect("client")
}

async fn replica_set_client(handle: &EmulatorHandle) -> Client {
    Client::with_uri_str(format!(
        "mongodb://{}/?replicaSet=rs0&serverSelectionTimeoutMS=5000",
        handle.addr()
    ))
    .await
    .expect("client")
}

/// The server error code carried by a driver error, however it is wrapped.
fn error_code(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        ErrorKind::Command(e) => Some(e.code),
        ErrorKind::Write(WriteFailure::WriteError(e)) => Some(e.code),
        ErrorKind::InsertMany(e) => e.write_errors.as_ref()?.first().map(|w| w.code),
        _ => None,
    }
}

fn code_of(reply: &Document) -> i32 {
    assert_eq!(
        reply.get_f64("ok").ok(),
        Some(0.0),
        "expected an error reply, got {reply:?}"
    );
    reply.get_i32("code").unwrap()
}

#[tokio::test]
async fn crud_through_the_driver() {
    let emu = start(EmulatorConfig::default()).await;
    let client = direct_client(&emu).await;
    let coll = client.database("app").collection::<Document>("items");

    coll.insert_one(
        doc! { "_id": 1, "name": "a", "qty": 5, "tags": ["x"], "dim": { "w": 1, "h": 2 } },
    )
    .await
    .unwrap();
    coll.insert_many(vec![
        doc! { "_id": 2, "name": "b", "qty": 10 },
        doc! { "_id": 3, "name": "c", "qty": 15 },
        doc! { "name": "d", "qty": 20 },
    ])
    .await
    .unwrap();
    let dup = coll.insert_one(doc! { "_id": 1 }).await.unwrap_err();
    assert_eq!(error_code(&dup), Some(11000));

    let found = coll.find_one(doc! { "_id": 2 }).await.unwrap().unwrap();
    assert_eq!(found.get_str("name").unwrap(), "b");
    let nested = coll
        .find_one(doc! { "dim": { "w": 1, "h": 2 } })
        .await
        .unwrap();
    assert_eq!(nested.unwrap().get_i32("_id").unwrap(), 1);
    let mut names = Vec::new();
    let mut cursor = coll
        .find(doc! { "qty": { "$gte": 10, "$lt": 20 }, "name": { "$in": ["b", "c", "z"] } })
        .sort(doc! { "qty": -1 })
        .projection(doc! { "name": 1, "_id": 0 })
        .await
        .unwrap();
    while cursor.advance().await.unwrap() {
        let d = cursor.deserialize_current().unwrap();
        assert!(!d.contains_key("_id") && !d.contains_key("qty"));
        names.push(d.get_str("name").unwrap().to_string());
    }
    assert_eq!(names, vec!["c", "b"]);
    let or_count = coll
        .count_documents(
            doc! { "$or": [ { "qty": 5 }, { "name": "d" } ], "missing": { "$exists": false } },
        )
        .await
        .unwrap();
    assert_eq!(or_count, 2);
    let skip_limit = coll
        .find(doc! {})
        .sort(doc! { "qty": 1 })
        .skip(1)
        .limit(2)
        .await
        .unwrap();
    let qtys: Vec<i32> = skip_limit
        .map(|d| d.unwrap().get_i32("qty").unwrap())
        .collect()
        .await;
    assert_eq!(qtys, vec![10, 15]);

    let updated = coll
        .update_one(
            doc! { "_id": 2 },
            doc! { "$set": { "qty": 11 }, "$inc": { "n": 1 } },
        )
        .await
        .unwrap();
    assert_eq!((updated.matched_count, updated.modified_count), (1, 1));
    let many = coll
        .update_many(
            doc! { "qty": { "$gt": 10 } },
            doc! { "$unset": { "name": "" } },
        )
        .await
        .unwrap();
    assert_eq!(many.matched_count, 3);
    let upsert = coll
        .update_one(doc! { "_id": 9 }, doc! { "$set": { "qty": 1 } })
        .upsert(true)
        .await
        .unwrap();
    assert_eq!(upsert.upserted_id, Some(Bson::Int32(9)));
    coll.replace_one(doc! { "_id": 3 }, doc! { "name": "replaced" })
        .await
        .unwrap();
    assert_eq!(
        coll.find_one(doc! { "_id": 3 }).await.unwrap().unwrap(),
        doc! { "_id": 3, "name": "replaced" }
    );

    let after = coll
        .find_one_and_update(doc! { "_id": 1 }, doc! { "$inc": { "qty": 1 } })
        .return_document(ReturnDocument::After)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.get_i32("qty").unwrap(), 6);
    let removed = coll
        .find_one_and_delete(doc! { "_id": 9 })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed.get_i32("qty").unwrap(), 1);

    assert_eq!(
        coll.delete_one(doc! { "_id": 1 })
            .await
            .unwrap()
            .deleted_count,
        1
    );
    assert_eq!(coll.estimated_document_count().await.unwrap(), 3);
    let agg: Vec<Document> = coll
        .aggregate(vec![
            doc! { "$match": { "_id": { "$in": [2, 3] } } },
            doc! { "$count": "n" },
        ])
        .await
        .unwrap()
        .map(|d| d.unwrap())
        .collect()
        .await;
    assert_eq!(agg, vec![doc! { "n": 2 }]);

    coll.create_index(IndexModel::builder().keys(doc! { "qty": 1 }).build())
        .await
        .unwrap();
    let mut indexes = coll.list_index_names().await.unwrap();
    indexes.sort();
    assert_eq!(indexes, vec!["_id_", "qty_1"]);
    coll.drop_index("qty_1").await.unwrap();
    assert_eq!(coll.list_index_names().await.unwrap(), vec!["_id_"]);
    assert!(client
        .database("app")
        .list_collection_names()
        .await
        .unwrap()
        .contains(&"items".to_string()));
    assert!(client
        .list_database_names()
        .await
        .unwrap()
        .contains(&"app".to_string()));
    assert_eq!(coll.delete_many(doc! {}).await.unwrap().deleted_count, 3);
    coll.drop().await.unwrap();
    assert!(!client
        .database("app")
        .list_collection_names()
        .await
        .unwrap()
        .contains(&"items".to_string()));

    let unknown = client
        .database("app")
        .run_command(doc! { "frobnicate": 1 })
        .await
        .unwrap_err();
    assert_eq!(error_code(&unknown), Some(59));
    // Client::shutdown waits for every cursor and session to be dropped.
    drop(cursor);
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn cursor_needs_several_get_mores() {
    let emu = start(EmulatorConfig::default()).await;
    let client = direct_client(&emu).await;
    let coll = client.database("app").collection::<Document>("ten");
    coll.insert_many((0..10).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let before = emu.command_count("getMore");
    let ids: Vec<i32> = coll
        .find(doc! {})
        .batch_size(2)
        .await
        .unwrap()
        .map(|d| d.unwrap().get_i32("_id").unwrap())
        .collect()
        .await;
    assert_eq!(ids, (0..10).collect::<Vec<_>>());
    assert_eq!(
        emu.command_count("getMore") - before,
        4,
        "10 docs in batches of 2: firstBatch + 4 getMores"
    );
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn explicit_session_and_shutdown_ends_sessions() {
    let emu = start(EmulatorConfig::default()).await;
    let client = direct_client(&emu).await;
    let coll = client.database("app").collection::<Document>("s");
    let mut session = client.start_session().await.unwrap();
    coll.insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let mut cursor = coll.find(doc! {}).session(&mut session).await.unwrap();
    let first = cursor.next(&mut session).await.unwrap().unwrap();
    assert_eq!(first, doc! { "_id": 1 });
    drop(cursor);
    drop(session);
    assert_eq!(emu.ended_session_count(), 0);
    client.shutdown().await;
    assert!(
        emu.ended_session_count() > 0,
        "client shutdown sends endSessions"
    );
    assert!(emu.command_count("endSessions") >= 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn transactions_commit_and_abort_over_replica_set_discovery() {
    let emu = start(EmulatorConfig::default()).await;
    let client = replica_set_client(&emu).await;
    let coll = client.database("bank").collection::<Document>("accounts");
    coll.insert_one(doc! { "_id": "seed" }).await.unwrap();

    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": "committed" })
        .session(&mut session)
        .await
        .unwrap();
    coll.update_one(doc! { "_id": "seed" }, doc! { "$set": { "touched": true } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();

    session.start_transaction().await.unwrap();
    coll.insert_one(doc! { "_id": "aborted" })
        .session(&mut session)
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": "committed" })
        .session(&mut session)
        .await
        .unwrap();
    coll.update_one(
        doc! { "_id": "seed" },
        doc! { "$set": { "touched": false } },
    )
    .session(&mut session)
    .await
    .unwrap();
    session.abort_transaction().await.unwrap();

    let ids: Vec<String> = coll
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .map(|d| d.unwrap().get_str("_id").unwrap().to_string())
        .collect()
        .await;
    assert_eq!(
        ids,
        vec!["committed", "seed"],
        "committed write visible, aborted ones undone"
    );
    let seed = coll
        .find_one(doc! { "_id": "seed" })
        .await
        .unwrap()
        .unwrap();
    assert!(seed.get_bool("touched").unwrap());
    assert_eq!(emu.command_count("commitTransaction"), 1);
    assert_eq!(emu.command_count("abortTransaction"), 1);
    drop(session);
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn transaction_number_rules_with_crafted_txn_numbers() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let l = lsid(1);
    let start = |n: i64| {
        doc! { "insert": "t", "documents": [ { "_id": n } ], "lsid": lsid(1), "txnNumber": n,
        "startTransaction": true, "autocommit": false, "$db": "app" }
    };
    let ok = raw.command(start(5)).await;
    assert_eq!(ok.get_i32("n").unwrap(), 1);
    // Lower number: TransactionTooOld.
    let too_old = raw.command(start(4)).await;
    assert_eq!(code_of(&too_old), 225);
    assert_eq!(too_old.get_str("codeName").unwrap(), "TransactionTooOld");
    // Continuing a number that is not the in-progress one: NoSuchTransaction, transient.
    let wrong = raw
        .command(doc! { "find": "t", "lsid": l.clone(), "txnNumber": 6_i64, "autocommit": false, "$db": "app" })
        .await;
    assert_eq!(code_of(&wrong), 251);
    assert!(wrong
        .get_str("errmsg")
        .unwrap()
        .contains("The active transaction number is 5"));
    assert_eq!(
        wrong.get_array("errorLabels").unwrap(),
        &vec![Bson::String("TransientTransactionError".into())]
    );
    // Commit, and a retried commit, both succeed; abort after commit fails.
    let commit = doc! { "commitTransaction": 1, "lsid": l.clone(), "txnNumber": 5_i64, "autocommit": false, "$db": "admin" };
    assert_eq!(
        raw.command(commit.clone()).await.get_f64("ok").unwrap(),
        1.0
    );
    assert_eq!(raw.command(commit).await.get_f64("ok").unwrap(), 1.0);
    let abort = raw
        .command(doc! { "abortTransaction": 1, "lsid": l.clone(), "txnNumber": 5_i64, "autocommit": false, "$db": "admin" })
        .await;
    assert_eq!(code_of(&abort), 256);
    // A higher startTransaction supersedes; its abort undoes its write; commit after abort fails.
    raw.command(start(7)).await;
    let abort7 = doc! { "abortTransaction": 1, "lsid": l.clone(), "txnNumber": 7_i64, "autocommit": false, "$db": "admin" };
    assert_eq!(
        raw.command(abort7.clone()).await.get_f64("ok").unwrap(),
        1.0
    );
    assert_eq!(code_of(&raw.command(abort7).await), 251);
    let commit7 = raw
        .command(doc! { "commitTransaction": 1, "lsid": l.clone(), "txnNumber": 7_i64, "autocommit": false, "$db": "admin" })
        .await;
    assert_eq!(code_of(&commit7), 251);
    let docs = raw.command(doc! { "find": "t", "$db": "app" }).await;
    let batch = docs
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap();
    assert_eq!(batch, &vec![Bson::Document(doc! { "_id": 5_i64 })]);
    // A retryable write with a lower number is TransactionTooOld too.
    let rw = raw
        .command(doc! { "insert": "t", "documents": [ { "_id": 1 } ], "lsid": l.clone(), "txnNumber": 2_i64, "$db": "app" })
        .await;
    assert_eq!(code_of(&rw), 225);
    emu.shutdown().await;
}

#[tokio::test]
async fn standalone_rejects_txn_numbers() {
    let emu = start(EmulatorConfig {
        topology: Topology::Standalone,
        ..EmulatorConfig::default()
    })
    .await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let hello = raw.command(doc! { "hello": 1, "$db": "admin" }).await;
    assert!(hello.get("setName").is_none());
    assert!(hello.get_bool("isWritablePrimary").unwrap());
    let reply = raw
        .command(doc! { "insert": "t", "documents": [ {} ], "lsid": lsid(2), "txnNumber": 1_i64, "$db": "app" })
        .await;
    assert_eq!(code_of(&reply), 20);
    assert_eq!(
        reply.get_str("errmsg").unwrap(),
        "Transaction numbers are only allowed on a replica set member or mongos"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn retryable_write_with_reused_txn_number_is_silently_skipped() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let insert = |id: i32, txn: i64| {
        doc! { "insert": "lost", "documents": [ { "_id": id } ], "lsid": lsid(3), "txnNumber": txn, "$db": "app" }
    };
    let first = raw.command(insert(1, 1)).await;
    assert_eq!(
        (first.get_i32("n").unwrap(), first.get_f64("ok").unwrap()),
        (1, 1.0)
    );
    // A different write with the same lsid + txnNumber: reported as success, not executed.
    let second = raw.command(insert(2, 1)).await;
    assert_eq!(
        (second.get_i32("n").unwrap(), second.get_f64("ok").unwrap()),
        (1, 1.0)
    );
    // A genuine retry of the first is also answered without a duplicate-key error.
    let retry = raw.command(insert(1, 1)).await;
    assert_eq!(retry.get_i32("n").unwrap(), 1);
    assert!(retry.get("writeErrors").is_none());
    // The next txnNumber executes again.
    raw.command(insert(3, 2)).await;
    let found = raw
        .command(doc! { "find": "lost", "sort": { "_id": 1 }, "$db": "app" })
        .await;
    let batch = found
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap();
    assert_eq!(
        batch,
        &vec![
            Bson::Document(doc! { "_id": 1 }),
            Bson::Document(doc! { "_id": 3 })
        ],
        "the second write (_id 2) was lost, as on a real server"
    );
    // Same rule for updates: the recorded outcome is replayed.
    let update = |v: i32| {
        doc! { "update": "lost", "updates": [ { "q": { "_id": 1 }, "u": { "$inc": { "v": v } } } ],
        "lsid": lsid(3), "txnNumber": 4_i64, "$db": "app" }
    };
    assert_eq!(
        raw.command(update(1)).await.get_i32("nModified").unwrap(),
        1
    );
    assert_eq!(
        raw.command(update(100)).await.get_i32("nModified").unwrap(),
        1
    );
    let doc1 = raw
        .command(doc! { "find": "lost", "filter": { "_id": 1 }, "$db": "app" })
        .await;
    let v = doc1
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()[0]
        .as_document()
        .unwrap()
        .get_i32("v")
        .unwrap();
    assert_eq!(v, 1);
    emu.shutdown().await;
}

#[tokio::test]
async fn cursors_belong_to_their_session() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.command(doc! { "insert": "c", "documents": (0..6).map(|i| doc! { "_id": i }).collect::<Vec<_>>(), "$db": "app" })
        .await;
    let opened = raw
        .command(doc! { "find": "c", "batchSize": 2, "lsid": lsid(4), "$db": "app" })
        .await;
    let id = opened
        .get_document("cursor")
        .unwrap()
        .get_i64("id")
        .unwrap();
    assert_ne!(id, 0);
    let get_more = |lsid_doc: Option<Document>| {
        let mut d = doc! { "getMore": id, "collection": "c", "batchSize": 2, "$db": "app" };
        if let Some(l) = lsid_doc {
            d.insert("lsid", l);
        }
        d
    };
    let other = raw.command(get_more(Some(lsid(5)))).await;
    assert_eq!(code_of(&other), 50738);
    assert!(other.get_str("errmsg").unwrap().starts_with(&format!(
        "Cannot run getMore on cursor {id}, which was created in session"
    )));
    assert_eq!(code_of(&raw.command(get_more(None)).await), 50737);
    let good = raw.command(get_more(Some(lsid(4)))).await;
    assert_eq!(
        good.get_document("cursor")
            .unwrap()
            .get_array("nextBatch")
            .unwrap()
            .len(),
        2
    );
    let killed = raw
        .command(doc! { "killCursors": "c", "cursors": [id], "$db": "app" })
        .await;
    assert_eq!(
        killed.get_array("cursorsKilled").unwrap(),
        &vec![Bson::Int64(id)]
    );
    assert_eq!(code_of(&raw.command(get_more(Some(lsid(4)))).await), 43);

    // A session-less cursor refuses a getMore that carries an lsid.
    let plain = raw
        .command(doc! { "find": "c", "batchSize": 1, "$db": "app" })
        .await;
    let plain_id = plain.get_document("cursor").unwrap().get_i64("id").unwrap();
    let with_lsid = raw
        .command(doc! { "getMore": plain_id, "collection": "c", "lsid": lsid(4), "$db": "app" })
        .await;
    assert_eq!(code_of(&with_lsid), 50736);
    // endSessions kills the session's cursors.
    let again = raw
        .command(doc! { "find": "c", "batchSize": 1, "lsid": lsid(4), "$db": "app" })
        .await;
    let again_id = again.get_document("cursor").unwrap().get_i64("id").unwrap();
    raw.command(doc! { "endSessions": [lsid(4)], "$db": "admin" })
        .await;
    assert_eq!(emu.ended_session_count(), 1);
    let gone = raw
        .command(doc! { "getMore": again_id, "collection": "c", "lsid": lsid(4), "$db": "app" })
        .await;
    assert_eq!(code_of(&gone), 43);
    emu.shutdown().await;
}

#[tokio::test]
async fn idle_session_expiry_kills_its_cursor() {
    let emu = start(EmulatorConfig {
        session_timeout: Duration::from_millis(300),
        ..EmulatorConfig::default()
    })
    .await;
    let client = direct_client(&emu).await;
    let coll = client.database("app").collection::<Document>("exp");
    coll.insert_many((0..10).map(|i| doc! { "_id": i }))
        .await
        .unwrap();

    // Control: a cursor driven without pauses works to the end.
    let mut session = client.start_session().await.unwrap();
    let mut cursor = coll
        .find(doc! {})
        .batch_size(2)
        .session(&mut session)
        .await
        .unwrap();
    let mut n = 0;
    while let Some(d) = cursor.next(&mut session).await {
        d.unwrap();
        n += 1;
    }
    assert_eq!(n, 10);
    drop(cursor);

    let mut idle = client.start_session().await.unwrap();
    let mut cursor = coll
        .find(doc! {})
        .batch_size(2)
        .session(&mut idle)
        .await
        .unwrap();
    cursor.next(&mut idle).await.unwrap().unwrap();
    cursor.next(&mut idle).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let err = cursor.next(&mut idle).await.unwrap().unwrap_err();
    assert_eq!(
        error_code(&err),
        Some(43),
        "the expired session's cursor is gone: {err}"
    );
    drop(cursor);

    // refreshSessions keeps a session (and its cursor) alive past the timeout.
    let mut raw = RawClient::connect(emu.addr()).await;
    let opened = raw
        .command(doc! { "find": "exp", "batchSize": 2, "lsid": lsid(6), "$db": "app" })
        .await;
    let id = opened
        .get_document("cursor")
        .unwrap()
        .get_i64("id")
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        raw.command(doc! { "refreshSessions": [lsid(6)], "$db": "admin" })
            .await;
    }
    let more = raw
        .command(doc! { "getMore": id, "collection": "exp", "lsid": lsid(6), "$db": "app" })
        .await;
    assert_eq!(
        more.get_f64("ok").unwrap(),
        1.0,
        "refreshed session kept its cursor: {more:?}"
    );
    assert_eq!(emu.refreshed_session_count(), 6);
    drop((session, idle));
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn streaming_hello_keeps_the_driver_monitor_happy() {
    let emu = start(EmulatorConfig::default()).await;
    let events: Arc<Mutex<Vec<SdamEvent>>> = Arc::default();
    let sink = events.clone();
    let mut options = ClientOptions::parse(format!(
        "mongodb://{}/?replicaSet=rs0&heartbeatFrequencyMS=500&serverSelectionTimeoutMS=3000",
        emu.addr()
    ))
    .await
    .unwrap();
    options.sdam_event_handler = Some(EventHandler::callback(move |e| {
        sink.lock().unwrap().push(e)
    }));
    let client = Client::with_options(options).unwrap();
    let db = client.database("admin");
    db.run_command(doc! { "ping": 1 }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1700)).await;
    db.run_command(doc! { "ping": 1 }).await.unwrap();
    let (awaited, failed) = {
        let events = events.lock().unwrap();
        let awaited = events
            .iter()
            .filter(|e| matches!(e, SdamEvent::ServerHeartbeatSucceeded(h) if h.awaited))
            .count();
        let failed = events
            .iter()
            .filter(|e| matches!(e, SdamEvent::ServerHeartbeatFailed(_)))
            .count();
        (awaited, failed)
    };
    assert!(awaited >= 2, "streamed heartbeats arrived ({awaited})");
    assert_eq!(failed, 0);

    // A primary change is streamed to the monitor: writes stop, then resume.
    let became = |events: &Arc<Mutex<Vec<SdamEvent>>>, wanted: ServerType| {
        events.lock().unwrap().iter().any(|e| {
            matches!(e, SdamEvent::ServerDescriptionChanged(c) if c.new_description.server_type() == wanted)
        })
    };
    let switched = Instant::now();
    emu.set_primary(false);
    while !became(&events, ServerType::RsSecondary) {
        assert!(
            switched.elapsed() < WAIT,
            "the monitor never saw the step-down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let coll = client.database("app").collection::<Document>("p");
    let started = Instant::now();
    let no_primary = coll.insert_one(doc! {}).await.unwrap_err();
    assert!(
        matches!(*no_primary.kind, ErrorKind::ServerSelection { .. }),
        "{no_primary}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    emu.set_primary(true);
    tokio::time::timeout(WAIT, coll.insert_one(doc! {}))
        .await
        .unwrap()
        .unwrap();
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn exhaust_hello_stream_over_raw_frames() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let first = raw
        .command(doc! { "hello": 1, "helloOk": true, "$db": "admin" })
        .await;
    assert!(first.get_bool("isWritablePrimary").unwrap());
    assert_eq!(first.get_str("setName").unwrap(), "rs0");
    assert_eq!(first.get_i32("maxWireVersion").unwrap(), 21);
    assert_eq!(first.get_i32("logicalSessionTimeoutMinutes").unwrap(), 30);
    assert_eq!(
        first.get_array("hosts").unwrap(),
        &vec![Bson::String(emu.addr().to_string())]
    );
    let tv = first.get_document("topologyVersion").unwrap().clone();

    // Non-exhaust awaitable hello with a current version waits maxAwaitTimeMS.
    let started = Instant::now();
    raw.command(doc! { "hello": 1, "topologyVersion": tv.clone(), "maxAwaitTimeMS": 300_i64, "$db": "admin" }).await;
    assert!(started.elapsed() >= Duration::from_millis(280));
    // A stale version is answered at once.
    let stale = doc! { "processId": tv.get_object_id("processId").unwrap(), "counter": -1_i64 };
    let started = Instant::now();
    raw.command(
        doc! { "hello": 1, "topologyVersion": stale, "maxAwaitTimeMS": 5000_i64, "$db": "admin" },
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(1000));

    // Exhaust: replies keep coming, chained, each with moreToCome.
    let request_id = raw
        .send(
            MsgFlags::EXHAUST_ALLOWED,
            &doc! { "hello": 1, "topologyVersion": tv.clone(), "maxAwaitTimeMS": 150_i64, "$db": "admin" },
        )
        .await;
    let mut expected_response_to = request_id;
    for _ in 0..3 {
        let reply = raw.recv().await.unwrap();
        assert!(reply.flags.more_to_come());
        assert_eq!(reply.response_to, expected_response_to);
        expected_response_to = reply.request_id;
    }
    // A topology change is pushed without waiting for maxAwaitTimeMS... use a long wait to prove it.
    drop(raw);
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.send(
        MsgFlags::EXHAUST_ALLOWED,
        &doc! { "hello": 1, "topologyVersion": tv.clone(), "maxAwaitTimeMS": 10_000_i64, "$db": "admin" },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    emu.set_primary(false);
    let changed = raw.recv().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!changed.doc.get_bool("isWritablePrimary").unwrap());
    assert!(changed.doc.get_bool("secondary").unwrap());
    assert_eq!(
        changed
            .doc
            .get_document("topologyVersion")
            .unwrap()
            .get_i64("counter")
            .unwrap(),
        tv.get_i64("counter").unwrap() + 1
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn legacy_op_query_handshake_and_pipelining() {
    let emu = start(EmulatorConfig {
        record_frames: true,
        ..EmulatorConfig::default()
    })
    .await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let mut query = Vec::new();
    doc! { "isMaster": 1, "helloOk": true, "compression": ["zstd", "snappy"] }
        .to_writer(&mut query)
        .unwrap();
    let bytes = legacy::encode_query(7, 0, "admin.$cmd", 0, -1, &query);
    raw.send_bytes(&bytes).await;
    let reply = raw.recv().await.unwrap();
    assert_eq!(reply.op_code, OpCode::Reply);
    assert_eq!(reply.response_to, 7);
    assert!(reply.doc.get_bool("ismaster").unwrap());
    assert!(reply.doc.get_bool("helloOk").unwrap());
    assert_eq!(
        reply.doc.get_array("compression").unwrap(),
        &vec![Bson::String("zstd".into())]
    );

    // Three pipelined requests in one write: a w:0 insert (moreToCome, no reply) then two finds.
    let (_, a) = raw.encode(
        MsgFlags::MORE_TO_COME,
        &doc! { "insert": "pipe", "documents": [ { "_id": 1 } ], "writeConcern": { "w": 0 }, "$db": "app" },
    );
    let (id_b, b) = raw.encode(0, &doc! { "find": "pipe", "$db": "app" });
    let (id_c, c) = raw.encode(0, &doc! { "count": "pipe", "$db": "app" });
    let mut all = a.to_vec();
    all.extend_from_slice(&b);
    all.extend_from_slice(&c);
    raw.send_bytes(&all).await;
    let rb = raw.recv().await.unwrap();
    assert_eq!(rb.response_to, id_b);
    assert_eq!(
        rb.doc
            .get_document("cursor")
            .unwrap()
            .get_array("firstBatch")
            .unwrap()
            .len(),
        1
    );
    let rc = raw.recv().await.unwrap();
    assert_eq!(rc.response_to, id_c);
    assert_eq!(rc.doc.get_i32("n").unwrap(), 1);
    let recorded = emu.received_frames();
    assert_eq!(recorded.len(), 4);
    assert_eq!(&recorded[0][..], &bytes[..]);
    assert_eq!(&recorded[1][..], &a[..]);
    emu.shutdown().await;
}

#[tokio::test]
async fn malformed_frame_closes_only_that_connection() {
    let emu = start(EmulatorConfig::default()).await;
    let mut bad = RawClient::connect(emu.addr()).await;
    let mut good = RawClient::connect(emu.addr()).await;
    // Length 5 is below the 16-byte header.
    bad.send_bytes(&[5, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        .await;
    assert!(bad.recv().await.is_none(), "the bad connection is closed");
    let pong = good.command(doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(pong.get_f64("ok").unwrap(), 1.0);
    assert_eq!(emu.peers().len(), 2);
    emu.shutdown().await;
}

#[tokio::test]
async fn compressed_traffic_with_the_driver() {
    let emu = start(EmulatorConfig {
        record_frames: true,
        ..EmulatorConfig::default()
    })
    .await;
    for compressor in ["zstd", "snappy", "zlib"] {
        let client = Client::with_uri_str(format!(
            "mongodb://{}/?directConnection=true&compressors={compressor}",
            emu.addr()
        ))
        .await
        .unwrap();
        let coll = client.database("app").collection::<Document>(compressor);
        coll.insert_one(doc! { "_id": 1, "pad": "x".repeat(1000) })
            .await
            .unwrap();
        assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 1);
        client.shutdown().await;
    }
    let compressed = emu
        .received_frames()
        .iter()
        .filter(|f| f.len() >= 16 && i32::from_le_bytes([f[12], f[13], f[14], f[15]]) == 2012)
        .count();
    assert!(
        compressed >= 3,
        "the driver sent OP_COMPRESSED requests ({compressed})"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn reply_latency_delays_commands_but_not_the_handshake() {
    let emu = start(EmulatorConfig {
        reply_latency: Duration::from_millis(50),
        command_latency: [("find".to_string(), Duration::from_millis(300))]
            .into_iter()
            .collect(),
        ..EmulatorConfig::default()
    })
    .await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let started = Instant::now();
    raw.command(doc! { "hello": 1, "$db": "admin" }).await;
    assert!(started.elapsed() < Duration::from_millis(40));
    let started = Instant::now();
    raw.command(doc! { "count": "x", "$db": "app" }).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    let started = Instant::now();
    raw.command(doc! { "find": "x", "$db": "app" }).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    emu.shutdown().await;
}

#[tokio::test]
async fn three_members_share_one_data_set_and_fail_over() {
    let first = start(EmulatorConfig::default()).await;
    let loopback = "127.0.0.1:0".parse().unwrap();
    let second = Emulator::start_member(loopback, first.state())
        .await
        .unwrap();
    let third = Emulator::start_member(loopback, first.state())
        .await
        .unwrap();
    let client = replica_set_client(&first).await;
    let coll = client.database("app").collection::<Document>("rs");
    coll.insert_one(doc! { "_id": 1 }).await.unwrap();

    let mut raw = RawClient::connect(third.addr()).await;
    let hello = raw.command(doc! { "hello": 1, "$db": "admin" }).await;
    assert_eq!(hello.get_array("hosts").unwrap().len(), 3);
    assert!(!hello.get_bool("isWritablePrimary").unwrap());
    assert_eq!(hello.get_str("primary").unwrap(), first.addr().to_string());
    assert_eq!(hello.get_str("me").unwrap(), third.addr().to_string());

    third.set_primary(true);
    let moved = Instant::now();
    loop {
        let status = raw.command(doc! { "hello": 1, "$db": "admin" }).await;
        if status.get_bool("isWritablePrimary").unwrap() {
            break;
        }
        assert!(moved.elapsed() < WAIT);
    }
    tokio::time::timeout(WAIT, coll.insert_one(doc! { "_id": 2 }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        coll.count_documents(doc! {}).await.unwrap(),
        2,
        "one data set behind every member"
    );
    let old_primary = RawClient::connect(first.addr())
        .await
        .command(doc! { "hello": 1, "$db": "admin" })
        .await;
    assert!(old_primary.get_bool("secondary").unwrap());
    client.shutdown().await;
    for member in [first, second, third] {
        member.shutdown().await;
    }
}

#[tokio::test]
async fn exhaust_get_more_over_zlib_streams_compressed_replies() {
    let emu = start(EmulatorConfig::default()).await;
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.command(doc! { "insert": "z", "documents": (0..9).map(|i| doc! { "_id": i }).collect::<Vec<_>>(), "$db": "app" })
        .await;
    let opened = raw
        .command(doc! { "find": "z", "batchSize": 2, "$db": "app" })
        .await;
    let cursor = opened
        .get_document("cursor")
        .unwrap()
        .get_i64("id")
        .unwrap();
    // The getMore goes out zlib-compressed with exhaustAllowed.
    let (id, plain) = raw.encode(
        MsgFlags::EXHAUST_ALLOWED,
        &doc! { "getMore": cursor, "collection": "z", "batchSize": 2, "$db": "app" },
    );
    let compressed = wire::op_compressed::compress(
        id,
        0,
        OpCode::Msg,
        wire::Compressor::Zlib,
        &plain[wire::HEADER_LEN..],
    );
    raw.send_bytes(&compressed).await;
    let (mut answering, mut seen, mut replies) = (id, 2, 0);
    loop {
        let reply = raw.recv().await.expect("a streamed reply");
        replies += 1;
        assert_eq!(
            reply.op_code,
            OpCode::Compressed,
            "compressed like the request"
        );
        assert_eq!(reply.response_to, answering);
        let batch = reply.doc.get_document("cursor").unwrap();
        seen += batch.get_array("nextBatch").unwrap().len();
        let open = batch.get_i64("id").unwrap() != 0;
        assert_eq!(reply.flags.more_to_come(), open);
        if !open {
            break;
        }
        answering = reply.request_id;
    }
    assert_eq!((seen, replies), (9, 4));
    emu.shutdown().await;
}

// ------------------------------------------------------------- profiles
// Servers that refuse the session-management commands, and a user without
// the killAnySession privilege: each refusal is answered as that server
// answers it, and changes nothing (the session's cursor still getMores).

/// Ten documents, a cursor over them in an explicit session, first batch
/// (two) read.
async fn session_cursor(
    client: &Client,
    coll: &str,
) -> (mongodb::ClientSession, mongodb::SessionCursor<Document>) {
    let items = client.database("app").collection::<Document>(coll);
    items
        .insert_many((0..10).map(|i| doc! { "_id": i }))
        .await
        .unwrap();
    let mut session = client.start_session().await.unwrap();
    let mut cursor = items
        .find(doc! {})
        .batch_size(2)
        .session(&mut session)
        .await
        .unwrap();
    for _ in 0..2 {
        cursor.next(&mut session).await.unwrap().unwrap();
    }
    (session, cursor)
}

/// Reads two more documents: at least one getMore under the session.
async fn still_usable(
    session: &mut mongodb::ClientSession,
    cursor: &mut mongodb::SessionCursor<Document>,
) {
    for _ in 0..2 {
        let next = cursor
            .next(session)
            .await
            .expect("a document")
            .expect("getMore works");
        assert!(next.contains_key("_id"));
    }
}

fn kill_commands(lsid: &Document) -> [Document; 3] {
    [
        doc! { "killSessions": [lsid.clone()] },
        doc! { "killAllSessions": [] },
        doc! { "killAllSessionsByPattern": [] },
    ]
}

#[tokio::test]
async fn documentdb_profile_answers_and_refuses_like_documentdb() {
    let emu = start(EmulatorConfig {
        profile: Profile::DocumentDb,
        ..EmulatorConfig::default()
    })
    .await;
    let mut raw = RawClient::connect(emu.addr()).await;
    let hello = raw.command(doc! { "hello": 1, "$db": "admin" }).await;
    assert_eq!(hello.get_str("msg").unwrap(), "isdbgrid");
    assert_eq!(hello.get_i32("maxWireVersion").unwrap(), 21);
    assert_eq!(hello.get_i32("logicalSessionTimeoutMinutes").unwrap(), 30);
    assert_eq!(hello.get_i32("maxWriteBatchSize").unwrap(), 25_000);
    assert_eq!(hello.get_document("internal").unwrap(), &doc! {});
    for absent in [
        "setName",
        "hosts",
        "topologyVersion",
        "$clusterTime",
        "operationTime",
    ] {
        assert!(!hello.contains_key(absent), "{absent} in {hello:?}");
    }
    for command in [
        "refreshSessions",
        "killSessions",
        "killAllSessions",
        "killAllSessionsByPattern",
        "startSession",
    ] {
        let reply = raw
            .command(doc! { command: [lsid(1)], "$db": "admin" })
            .await;
        let keys: Vec<&str> = reply.keys().map(String::as_str).collect();
        assert_eq!(keys, ["ok", "errmsg", "code", "codeName"], "{reply:?}");
        assert_eq!(code_of(&reply), 115);
        assert_eq!(reply.get_str("codeName").unwrap(), "CommandNotSupported");
        assert_eq!(
            reply.get_str("errmsg").unwrap(),
            format!("Unknown request received: {command}")
        );
    }
    let ended = raw
        .command(doc! { "endSessions": [lsid(1)], "$db": "admin" })
        .await;
    assert_eq!(ended, doc! { "ok": 1.0 });

    // Through the driver (a mongos-like deployment): sessions, cursors and
    // transactions work, and refused kills change nothing.
    let client = Client::with_uri_str(format!("mongodb://{}/", emu.addr()))
        .await
        .unwrap();
    let (mut session, mut cursor) = session_cursor(&client, "ddb").await;
    let admin = client.database("admin");
    for kill in kill_commands(session.id()) {
        let err = admin.run_command(kill).await.unwrap_err();
        assert_eq!(error_code(&err), Some(115), "{err}");
    }
    still_usable(&mut session, &mut cursor).await;
    let items = client.database("app").collection::<Document>("ddb");
    let mut txn = client.start_session().await.unwrap();
    txn.start_transaction().await.unwrap();
    items
        .insert_one(doc! { "_id": "in-txn" })
        .session(&mut txn)
        .await
        .unwrap();
    txn.commit_transaction().await.unwrap();
    assert!(items
        .find_one(doc! { "_id": "in-txn" })
        .await
        .unwrap()
        .is_some());
    assert_eq!(emu.ended_session_count(), 1, "only the raw endSessions");
    drop((cursor, session, txn));
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn atlas_shared_profile_refuses_kills_with_atlas_error() {
    let emu = start(EmulatorConfig {
        profile: Profile::AtlasShared,
        ..EmulatorConfig::default()
    })
    .await;
    let client = direct_client(&emu).await;
    let (mut session, mut cursor) = session_cursor(&client, "atlas").await;
    let mut raw = RawClient::connect(emu.addr()).await;
    for mut kill in kill_commands(session.id()) {
        let name = kill.keys().next().unwrap().clone();
        kill.insert("$db", "admin");
        let reply = raw.command(kill).await;
        assert_eq!(code_of(&reply), 8000);
        assert_eq!(reply.get_str("codeName").unwrap(), "AtlasError");
        assert_eq!(
            reply.get_str("errmsg").unwrap(),
            format!("command {name} is not allowed in this Atlas tier")
        );
    }
    still_usable(&mut session, &mut cursor).await;
    // refreshSessions and endSessions work there.
    let refreshed = client
        .database("admin")
        .run_command(doc! { "refreshSessions": [session.id().clone()] })
        .await
        .unwrap();
    assert_eq!(refreshed.get_f64("ok").unwrap(), 1.0);
    still_usable(&mut session, &mut cursor).await;
    drop((cursor, session));
    client.shutdown().await;
    emu.shutdown().await;
}

#[tokio::test]
async fn a_user_without_kill_any_session_is_refused_but_kills_its_own_sessions() {
    let emu = start(EmulatorConfig {
        users: vec![
            ("app".to_string(), "app-pw".to_string()),
            ("ops".to_string(), "ops-pw".to_string()),
        ],
        user_roles: [("app".to_string(), UserRole::ReadWriteAnyDatabase)].into(),
        ..EmulatorConfig::default()
    })
    .await;
    let as_user = |user: &str, password: &str| {
        Client::with_uri_str(format!(
            "mongodb://{user}:{password}@{}/?directConnection=true",
            emu.addr()
        ))
    };
    let app = as_user("app", "app-pw").await.unwrap();
    let (mut session, mut cursor) = session_cursor(&app, "priv").await;
    let admin = app.database("admin");
    for refused in [
        doc! { "killAllSessions": [] },
        doc! { "killAllSessionsByPattern": [] },
        doc! { "killAllSessions": [ { "user": "app", "db": "admin" } ] },
        doc! { "replSetStepDown": 60 },
    ] {
        let err = admin.run_command(refused.clone()).await.unwrap_err();
        assert_eq!(error_code(&err), Some(13), "{refused}: {err}");
        let ErrorKind::Command(e) = err.kind.as_ref() else {
            panic!("{err}")
        };
        assert!(
            e.message
                .starts_with("not authorized on admin to execute command {"),
            "{}",
            e.message
        );
    }
    still_usable(&mut session, &mut cursor).await;
    // killSessions needs no privilege: it kills the caller's own session.
    admin
        .run_command(doc! { "killSessions": [session.id().clone()] })
        .await
        .unwrap();
    let gone = cursor.next(&mut session).await.unwrap().unwrap_err();
    assert_eq!(error_code(&gone), Some(43), "{gone}");

    // A root user may kill everyone's sessions.
    let (mut session2, mut cursor2) = session_cursor(&app, "priv2").await;
    let ops = as_user("ops", "ops-pw").await.unwrap();
    ops.database("admin")
        .run_command(doc! { "killAllSessions": [] })
        .await
        .unwrap();
    let killed = cursor2.next(&mut session2).await.unwrap().unwrap_err();
    assert_eq!(error_code(&killed), Some(43), "{killed}");
    drop((cursor, session, cursor2, session2));
    app.shutdown().await;
    ops.shutdown().await;
    emu.shutdown().await;
}

/// `failCommand` fails the handshake too, over legacy OP_QUERY as over
/// OP_MSG, for the application it names; the driver gets past a failed
/// handshake as it would with a server.
#[tokio::test]
async fn a_fail_point_fails_the_handshake_over_op_query_too() {
    let emu = start(EmulatorConfig::default()).await;
    let mut admin = RawClient::connect(emu.addr()).await;
    let configure = |mode: Bson, data: Document| {
        doc! { "configureFailPoint": "failCommand", "mode": mode, "data": data, "$db": "admin" }
    };
    admin
        .command(configure(
            Bson::Document(doc! { "times": 1 }),
            doc! { "failCommands": ["isMaster"], "errorCode": 2, "appName": "legacy" },
        ))
        .await;
    let legacy_hello = |id: i32| {
        let mut query = Vec::new();
        doc! { "isMaster": 1, "client": { "application": { "name": "legacy" } } }
            .to_writer(&mut query)
            .unwrap();
        legacy::encode_query(id, 0, "admin.$cmd", 0, -1, &query)
    };
    let mut raw = RawClient::connect(emu.addr()).await;
    raw.send_bytes(&legacy_hello(1)).await;
    let failed = raw.recv().await.unwrap();
    assert_eq!(failed.op_code, OpCode::Reply);
    assert_eq!(code_of(&failed.doc), 2);
    raw.send_bytes(&legacy_hello(2)).await;
    let ok = raw.recv().await.unwrap();
    assert!(ok.doc.get_bool("ismaster").unwrap(), "{:?}", ok.doc);

    admin
        .command(configure(
            Bson::Document(doc! { "times": 1 }),
            doc! { "failCommands": ["isMaster"], "closeConnection": true,
            "blockConnection": true, "blockTimeMS": 10 },
        ))
        .await;
    let mut closed = RawClient::connect(emu.addr()).await;
    closed.send_bytes(&legacy_hello(3)).await;
    assert!(closed.recv().await.is_none(), "closed without a reply");

    admin
        .command(configure(
            Bson::Document(doc! { "times": 1 }),
            doc! { "failCommands": ["hello", "isMaster"], "closeConnection": true, "appName": "shy" },
        ))
        .await;
    let client = Client::with_uri_str(format!(
        "mongodb://{}/?directConnection=true&appName=shy&serverSelectionTimeoutMS=10000",
        emu.addr()
    ))
    .await
    .unwrap();
    client
        .database("app")
        .collection::<Document>("h")
        .find_one(doc! {})
        .await
        .unwrap();
    assert_eq!(
        emu.fail_point_entered(),
        3,
        "the driver's handshake met the fault"
    );
    client.shutdown().await;
    emu.shutdown().await;
}
