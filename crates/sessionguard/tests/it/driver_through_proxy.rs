//! The official Rust driver runs ordinary workloads through the proxy in front
//! of the emulator: everything must behave exactly as it would directly.

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};
use common::Stack;
use mongodb::options::FindOptions;
use sessionguard_emulator::EmulatorConfig;

#[tokio::test]
async fn crud_round_trips_through_the_proxy() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let people = client.database("app").collection::<Document>("people");

    people
        .insert_many(vec![
            doc! { "_id": 1, "name": "ada", "age": 36 },
            doc! { "_id": 2, "name": "alan", "age": 41 },
            doc! { "_id": 3, "name": "grace", "age": 85 },
        ])
        .await
        .unwrap();
    let found = people
        .find_one(doc! { "name": "alan" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.get_i32("age").unwrap(), 41);

    let updated = people
        .update_one(doc! { "_id": 3 }, doc! { "$inc": { "age": 1 } })
        .await
        .unwrap();
    assert_eq!(updated.modified_count, 1);
    let grace = people.find_one(doc! { "_id": 3 }).await.unwrap().unwrap();
    assert_eq!(grace.get_i32("age").unwrap(), 86);

    let deleted = people
        .delete_one(doc! { "age": { "$lt": 40 } })
        .await
        .unwrap();
    assert_eq!(deleted.deleted_count, 1);
    assert_eq!(people.count_documents(doc! {}).await.unwrap(), 2);

    // The emulator saw the commands, so they really crossed the proxy.
    assert!(stack.emulator.command_count("insert") >= 1);
    assert!(stack.emulator.command_count("update") >= 1);
    assert!(stack.emulator.command_count("delete") >= 1);
    client.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_cursor_needing_several_get_mores_reads_every_document() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let items = client.database("app").collection::<Document>("items");
    let docs: Vec<Document> = (0..50).map(|i| doc! { "_id": i, "n": i }).collect();
    items.insert_many(docs).await.unwrap();

    let options = FindOptions::builder()
        .batch_size(7)
        .sort(doc! { "_id": 1 })
        .build();
    let mut cursor = items.find(doc! {}).with_options(options).await.unwrap();
    let mut seen = Vec::new();
    while cursor.advance().await.unwrap() {
        seen.push(
            cursor
                .deserialize_current()
                .unwrap()
                .get_i32("_id")
                .unwrap(),
        );
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    // The driver's shutdown waits for every live cursor to be dropped.
    drop(cursor);
    // 50 documents in batches of 7: one find and seven getMores.
    assert_eq!(stack.emulator.command_count("getMore"), 7);
    client.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn explicit_session_and_transactions_commit_and_abort() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let accounts = client.database("bank").collection::<Document>("accounts");
    accounts
        .insert_many(vec![
            doc! { "_id": "a", "balance": 100 },
            doc! { "_id": "b", "balance": 0 },
        ])
        .await
        .unwrap();

    let mut session = client.start_session().await.unwrap();
    // Plain operations on an explicit session.
    let a = accounts
        .find_one(doc! { "_id": "a" })
        .session(&mut session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.get_i32("balance").unwrap(), 100);

    // A committed transfer is visible afterwards.
    session.start_transaction().await.unwrap();
    accounts
        .update_one(doc! { "_id": "a" }, doc! { "$inc": { "balance": -30 } })
        .session(&mut session)
        .await
        .unwrap();
    accounts
        .update_one(doc! { "_id": "b" }, doc! { "$inc": { "balance": 30 } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();

    // An aborted transfer leaves no trace.
    session.start_transaction().await.unwrap();
    accounts
        .update_one(doc! { "_id": "a" }, doc! { "$inc": { "balance": -1000 } })
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    drop(session);

    let a = accounts
        .find_one(doc! { "_id": "a" })
        .await
        .unwrap()
        .unwrap();
    let b = accounts
        .find_one(doc! { "_id": "b" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.get_i32("balance").unwrap(), 70);
    assert_eq!(b.get_i32("balance").unwrap(), 30);
    assert_eq!(stack.emulator.command_count("commitTransaction"), 1);
    assert_eq!(stack.emulator.command_count("abortTransaction"), 1);
    client.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn client_shutdown_ends_sessions_through_the_proxy() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let coll = client.database("app").collection::<Document>("things");
    // Concurrent operations make the driver pool several implicit sessions.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let coll = coll.clone();
        tasks.push(tokio::spawn(async move {
            coll.insert_one(doc! { "_id": i }).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(stack.emulator.ended_session_count(), 0);
    client.shutdown().await;
    let ended = Stack::eventually(Duration::from_secs(5), || {
        stack.emulator.ended_session_count() > 0
    })
    .await;
    assert!(
        ended,
        "endSessions from client.shutdown() must reach the emulator"
    );
    assert!(stack.emulator.command_count("endSessions") >= 1);
    stack.stop().await;
}
