//! Good patterns raise nothing. A realistic workload runs through the proxy
//! with every rule enabled: many concurrent tasks, each with its own
//! implicit or explicit session, awaited operations, transactions through
//! the driver's `with_transaction` helper (including one that aborts on a
//! non-transient error), cursors read to the end or dropped early, retryable
//! writes, two applications side by side, and client shutdown after all
//! work. Zero violations is the only acceptable result: a false positive is
//! the worst bug sessionguard can have.

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};
use common::{lsid, Guarded, RawClient};
use futures_util::{FutureExt, TryStreamExt};
use mongodb::options::{FindOptions, ReturnDocument};
use mongodb::{Client, Collection};
use sessionguard_engine::SessionConfig;

const TASKS: i32 = 12;
const ROUNDS: i32 = 6;

async fn implicit_session_work(items: Collection<Document>, task: i32) {
    for round in 0..ROUNDS {
        let id = task * 1_000 + round;
        items
            .insert_one(doc! { "_id": id, "task": task, "n": round })
            .await
            .unwrap();
        items
            .update_one(doc! { "_id": id }, doc! { "$inc": { "n": 1 } })
            .await
            .unwrap();
        let updated = items
            .find_one_and_update(doc! { "_id": id }, doc! { "$set": { "seen": true } })
            .return_document(ReturnDocument::After)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.get_i32("n").unwrap(), round + 1);
        let options = FindOptions::builder().batch_size(2).build();
        let mine: Vec<Document> = items
            .find(doc! { "task": task })
            .with_options(options)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(mine.len() as i32, round + 1);
        assert_eq!(
            items.count_documents(doc! { "task": task }).await.unwrap() as i32,
            round + 1
        );
    }
    // A bulk insert and a cursor dropped before the end (the driver kills it).
    let bulk: Vec<Document> = (0..25)
        .map(|i| doc! { "_id": task * 1_000 + 500 + i, "task": task, "bulk": true })
        .collect();
    items.insert_many(bulk).await.unwrap();
    let options = FindOptions::builder().batch_size(3).build();
    let mut partial = items
        .find(doc! { "bulk": true, "task": task })
        .with_options(options)
        .await
        .unwrap();
    partial.try_next().await.unwrap().unwrap();
    drop(partial);
    items
        .delete_one(doc! { "_id": task * 1_000 })
        .await
        .unwrap();
}

async fn explicit_session_work(client: Client, accounts: Collection<Document>, task: i32) {
    let mut session = client.start_session().await.unwrap();
    let account = format!("acct-{task}");
    accounts
        .insert_one(doc! { "_id": &account, "balance": 0 })
        .session(&mut session)
        .await
        .unwrap();
    for _ in 0..ROUNDS {
        // with_transaction: the helper starts, runs, commits (and would retry
        // on TransientTransactionError).
        session
            .start_transaction()
            .and_run(account.clone(), |session, account| {
                let accounts = accounts.clone();
                async move {
                    accounts
                        .update_one(
                            doc! { "_id": account.as_str() },
                            doc! { "$inc": { "balance": 10 } },
                        )
                        .session(&mut *session)
                        .await?;
                    accounts
                        .find_one(doc! { "_id": account.as_str() })
                        .session(&mut *session)
                        .await?;
                    Ok(())
                }
                .boxed()
            })
            .await
            .unwrap();
    }
    // A transaction whose callback fails with a non-transient error: the
    // helper aborts it (after the server already did) and reports the error.
    let duplicate = session
        .start_transaction()
        .and_run(account.clone(), |session, account| {
            let accounts = accounts.clone();
            async move {
                accounts
                    .insert_one(doc! { "_id": account.as_str() })
                    .session(&mut *session)
                    .await?;
                Ok(())
            }
            .boxed()
        })
        .await;
    assert!(duplicate.is_err());
    // A manual transaction, committed, and one explicitly aborted.
    session.start_transaction().await.unwrap();
    accounts
        .update_one(doc! { "_id": &account }, doc! { "$inc": { "balance": 1 } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    session.start_transaction().await.unwrap();
    accounts
        .update_one(
            doc! { "_id": &account },
            doc! { "$inc": { "balance": 1000 } },
        )
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    // A cursor on the explicit session, read to the end.
    let options = FindOptions::builder().batch_size(1).build();
    let mut cursor = accounts
        .find(doc! {})
        .with_options(options)
        .session(&mut session)
        .await
        .unwrap();
    while let Some(doc) = cursor.next(&mut session).await {
        doc.unwrap();
    }
    drop(cursor);
    let mine = accounts
        .find_one(doc! { "_id": &account })
        .session(&mut session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mine.get_i32("balance").unwrap(), 10 * ROUNDS + 1);
}

#[tokio::test]
async fn a_realistic_workload_raises_zero_violations() {
    // A little latency so the tasks' operations really overlap.
    let g = Guarded::start_with(
        common::slow_emulator(Duration::from_millis(2)),
        SessionConfig::default(),
        Default::default(),
        true,
    )
    .await;
    let web = g.client("web").await;
    let worker = g.client("worker").await;
    let items = web.database("app").collection::<Document>("items");
    let accounts = worker.database("bank").collection::<Document>("accounts");

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        tasks.push(tokio::spawn(implicit_session_work(items.clone(), task)));
        tasks.push(tokio::spawn(explicit_session_work(
            worker.clone(),
            accounts.clone(),
            task,
        )));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // The Node.js driver's client.close(): endSessions is sent and the
    // socket closed without reading the reply.
    let mut closing = RawClient::hello(g.proxy_addr(), "node-app").await;
    closing
        .command(doc! { "find": "items", "filter": {}, "lsid": lsid(42), "$db": "app" })
        .await;
    closing
        .send(0, &doc! { "endSessions": [lsid(42)], "$db": "admin" })
        .await;
    closing.close().await;

    // Shutdown after all work.
    web.shutdown().await;
    worker.shutdown().await;
    let stats = g.engine.stats();
    assert!(stats.requests_inspected > 500, "{stats:?}");
    assert!(stats.ledger.sessions >= 2, "{stats:?}");
    let fired = g.settle_closed().await;
    assert!(
        fired.is_empty(),
        "false positives: {:#?}",
        g.engine
            .violations()
            .iter()
            .map(|v| (v.rule, v.message.clone()))
            .collect::<Vec<_>>()
    );
    g.stop().await;
}

#[tokio::test]
async fn pooled_implicit_sessions_reused_sequentially_raise_nothing() {
    // A small pool forces every operation to reuse the same few sessions
    // and connections, one operation after another.
    let g = Guarded::start(
        common::slow_emulator(Duration::from_millis(1)),
        SessionConfig::default(),
    )
    .await;
    let client = g.stack.client_with("&maxPoolSize=2&appName=pool").await;
    let items = client.database("app").collection::<Document>("items");
    let mut tasks = Vec::new();
    for task in 0..8 {
        let items = items.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                items.insert_one(doc! { "t": task, "i": i }).await.unwrap();
                items
                    .find_one(doc! { "t": task, "i": i })
                    .await
                    .unwrap()
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 120);
    client.shutdown().await;
    assert!(
        g.engine.stats().ledger.sessions <= 8,
        "{:?}",
        g.engine.stats()
    );
    // The engine really saw the workload (8 x 15 inserts and finds, the
    // count) under the pooled sessions, so "nothing fired" means something.
    let stats = g.engine.stats();
    assert!(stats.requests_inspected >= 241, "{stats:?}");
    assert!(stats.ledger.sessions >= 1, "{stats:?}");
    assert!(stats.sessions_started >= 1, "{stats:?}");
    assert_eq!(g.settle_closed().await, vec![]);
    g.stop().await;
}

#[tokio::test]
async fn with_transaction_retrying_real_write_conflicts_raises_nothing() {
    // Concurrent transactions on one document: the emulator answers the
    // loser with WriteConflict + TransientTransactionError, the driver's
    // with_transaction aborts and retries with a new txnNumber. Correct
    // behaviour from end to end, so nothing may be reported.
    let g = Guarded::start(
        common::slow_emulator(Duration::from_millis(15)),
        SessionConfig::default(),
    )
    .await;
    let client = g.client("counter").await;
    let counters = client.database("app").collection::<Document>("counters");
    counters
        .insert_one(doc! { "_id": "hits", "n": 0 })
        .await
        .unwrap();
    const WORKERS: i32 = 4;
    const INCREMENTS: i32 = 3;
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let client = client.clone();
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            let mut session = client.start_session().await.unwrap();
            for _ in 0..INCREMENTS {
                session
                    .start_transaction()
                    .and_run(counters.clone(), |session, counters| {
                        async move {
                            counters
                                .update_one(doc! { "_id": "hits" }, doc! { "$inc": { "n": 1 } })
                                .session(&mut *session)
                                .await?;
                            Ok(())
                        }
                        .boxed()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let hits = counters
        .find_one(doc! { "_id": "hits" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hits.get_i32("n").unwrap(), WORKERS * INCREMENTS);
    assert!(
        g.stack.emulator.command_count("abortTransaction") >= 1,
        "the workload never hit a write conflict, so the retry path was not exercised"
    );
    client.shutdown().await;
    // The engine followed the transactions it must stay silent about: every
    // commit (at least one per increment) and the aborted attempts.
    let stats = g.engine.stats();
    let increments = u64::try_from(WORKERS * INCREMENTS).unwrap();
    assert!(stats.requests_inspected >= 2 * increments, "{stats:?}");
    assert!(stats.ledger.sessions >= 1, "{stats:?}");
    assert!(stats.transactions_started > increments, "{stats:?}");
    assert!(stats.transactions_committed >= increments, "{stats:?}");
    assert!(stats.transactions_aborted >= 1, "{stats:?}");
    let fired = g.settle_closed().await;
    assert!(
        fired.is_empty(),
        "false positives: {:#?}",
        g.engine
            .violations()
            .iter()
            .map(|v| (v.rule, v.message.clone()))
            .collect::<Vec<_>>()
    );
    g.stop().await;
}
