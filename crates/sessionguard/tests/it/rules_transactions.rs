//! Transaction and txnNumber rules proven end to end through the proxy in
//! front of the emulator (which follows the server's txnNumber rules and
//! deduplicates retryable writes by lsid + txnNumber + stmtId): the Rust
//! driver where it can misbehave, raw frames where its API forbids the
//! misuse (it numbers transactions itself and owns the session mutably).

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};
use common::{
    emulator_with_latency, insert_cmd, lsid, session_lsid, short_of, txn_end_cmd, txn_insert_cmd,
    Guarded, RawClient,
};
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RuleId, SessionConfig, Severity};

#[tokio::test]
async fn promise_all_on_one_session_loses_a_write() {
    // Node.js driver v6, `Promise.all([insertOne(a, {session}), insertOne(b,
    // {session})])`: two different writes with one lsid and one txnNumber.
    let g = Guarded::start(
        emulator_with_latency(&[("insert", Duration::from_millis(200))]),
        SessionConfig::default(),
    )
    .await;
    let session = lsid(2);
    let mut a = RawClient::hello(g.proxy_addr(), "web").await;
    let mut b = RawClient::hello(g.proxy_addr(), "web").await;
    a.send(
        0,
        &insert_cmd("shop", "orders", vec![doc! { "_id": "a" }], &session, 1),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    b.send(
        0,
        &insert_cmd("shop", "orders", vec![doc! { "_id": "b" }], &session, 1),
    )
    .await;
    let reply_a = a.read_reply().await;
    let reply_b = b.read_reply().await;
    // Both "succeed" ...
    assert_eq!(reply_a.get_i32("n").unwrap(), 1);
    assert_eq!(reply_b.get_i32("n").unwrap(), 1);
    // ... but the server took the second for a retry: one document is missing.
    let count = a.command(doc! { "count": "orders", "$db": "shop" }).await;
    assert_eq!(
        count.get_i32("n").unwrap(),
        1,
        "the emulator skipped the second write"
    );

    let violation = g.wait_for(RuleId::TxnNumberReuse).await;
    assert_eq!(violation.severity, Severity::Error);
    assert_eq!(violation.current.as_ref().unwrap().txn_number, Some(1));
    assert_eq!(violation.earlier.as_ref().unwrap().txn_number, Some(1));
    assert!(violation.message.contains("lost"), "{}", violation.message);
    assert!(g.fired().contains(&RuleId::ConcurrentUse));
    a.close().await;
    b.close().await;
    g.stop().await;
}

#[tokio::test]
async fn a_genuine_retry_with_the_same_txn_number_is_not_reuse() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let session = lsid(3);
    let insert = insert_cmd(
        "shop",
        "orders",
        vec![doc! { "_id": 1, "item": "pen" }],
        &session,
        7,
    );
    let mut first = RawClient::hello(g.proxy_addr(), "web").await;
    assert_eq!(first.command(insert.clone()).await.get_i32("n").unwrap(), 1);
    first.close().await;
    // Retried on a new connection (the driver never saw the reply), with a
    // newer $clusterTime as drivers must gossip.
    let mut retry = insert.clone();
    retry.insert(
        "$clusterTime",
        doc! { "clusterTime": bson::Timestamp { time: 99, increment: 1 } },
    );
    let mut second = RawClient::hello(g.proxy_addr(), "web").await;
    assert_eq!(second.command(retry).await.get_i32("n").unwrap(), 1);
    let count = second
        .command(doc! { "count": "orders", "$db": "shop" })
        .await;
    assert_eq!(count.get_i32("n").unwrap(), 1);
    assert_eq!(g.settle().await, vec![]);
    second.close().await;
    g.stop().await;
}

#[tokio::test]
async fn txn_number_going_backwards() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let session = lsid(5);
    let mut raw = RawClient::hello(g.proxy_addr(), "web").await;
    raw.command(insert_cmd(
        "shop",
        "orders",
        vec![doc! { "_id": 1 }],
        &session,
        5,
    ))
    .await;
    let reply = raw
        .command(insert_cmd(
            "shop",
            "orders",
            vec![doc! { "_id": 2 }],
            &session,
            4,
        ))
        .await;
    assert_eq!(
        reply.get_f64("ok").unwrap(),
        0.0,
        "the server refuses an older txnNumber: {reply}"
    );

    let violation = g.wait_for(RuleId::TxnRegression).await;
    assert_eq!(violation.current.as_ref().unwrap().txn_number, Some(4));
    assert_eq!(violation.earlier.as_ref().unwrap().txn_number, Some(5));
    assert_eq!(g.fired(), vec![RuleId::TxnRegression]);
    raw.close().await;
    g.stop().await;
}

#[tokio::test]
async fn a_new_transaction_silently_aborts_the_open_one() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let session = lsid(6);
    let mut raw = RawClient::hello(g.proxy_addr(), "web").await;
    let first = raw
        .command(txn_insert_cmd(
            "bank",
            "ledger",
            vec![doc! { "_id": "t1" }],
            &session,
            1,
            true,
        ))
        .await;
    assert_eq!(first.get_f64("ok").unwrap(), 1.0);
    // A forgotten code path: no commit, and the session starts over.
    let second = raw
        .command(txn_insert_cmd(
            "bank",
            "ledger",
            vec![doc! { "_id": "t2" }],
            &session,
            2,
            true,
        ))
        .await;
    assert_eq!(second.get_f64("ok").unwrap(), 1.0);
    let commit = raw
        .command(txn_end_cmd("commitTransaction", &session, 2))
        .await;
    assert_eq!(commit.get_f64("ok").unwrap(), 1.0);
    let mut count = doc! { "count": "ledger" };
    count.insert("$db", "bank");
    assert_eq!(
        raw.command(count).await.get_i32("n").unwrap(),
        1,
        "transaction 1's write was lost"
    );

    let violation = g.wait_for(RuleId::TxnSuperseded).await;
    assert_eq!(violation.current.as_ref().unwrap().txn_number, Some(2));
    assert_eq!(violation.earlier.as_ref().unwrap().txn_number, Some(1));
    assert_eq!(g.fired(), vec![RuleId::TxnSuperseded]);
    raw.close().await;
    g.stop().await;
}

#[tokio::test]
async fn a_swallowed_error_inside_a_transaction_with_the_rust_driver() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let client = g.client("web").await;
    let orders = client.database("shop").collection::<Document>("orders");
    orders.insert_one(doc! { "_id": 1 }).await.unwrap();
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    orders
        .insert_one(doc! { "_id": 10 })
        .session(&mut session)
        .await
        .unwrap();
    // A duplicate key aborts the transaction on the server; the application
    // catches the error and carries on as if the transaction were alive.
    let duplicate = orders
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await;
    assert!(duplicate.is_err());
    let next = orders
        .insert_one(doc! { "_id": 11 })
        .session(&mut session)
        .await;
    assert!(next.is_err(), "the server no longer has the transaction");
    let violation = g.wait_for(RuleId::TxnAfterAbort).await;
    assert_eq!(violation.current.as_ref().unwrap().command, "insert");
    assert_eq!(violation.lsid_short, short_of(&session_lsid(&session)));
    // Continuing once more is caught before it is forwarded.
    let again = orders
        .insert_one(doc! { "_id": 12 })
        .session(&mut session)
        .await;
    assert!(again.is_err());
    let fired = g.engine.violations();
    assert_eq!(
        fired
            .iter()
            .filter(|v| v.rule == RuleId::TxnAfterAbort)
            .count(),
        2
    );
    // Aborting is the correct cleanup: nothing more.
    let _ = session.abort_transaction().await;
    drop(session);
    client.shutdown().await;
    assert_eq!(
        g.settle_closed().await,
        vec![RuleId::TxnAfterAbort, RuleId::TxnAfterAbort]
    );
    g.stop().await;
}

#[tokio::test]
async fn a_transaction_left_open_with_the_rust_driver() {
    let sessions = SessionConfig {
        transaction_max_open: Duration::from_millis(700),
        ..SessionConfig::default()
    };
    let g = Guarded::start_with(
        EmulatorConfig::default(),
        sessions,
        Default::default(),
        true,
    )
    .await;
    let client = g.client("web").await;
    let orders = client.database("shop").collection::<Document>("orders");
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    orders
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    // The handler returns without committing and the session sits there.
    let violation = g.wait_for(RuleId::TxnLeftOpen).await;
    assert_eq!(violation.severity, Severity::Warning);
    assert_eq!(violation.lsid_short, short_of(&session_lsid(&session)));
    assert_eq!(violation.earlier.as_ref().unwrap().command, "insert");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        g.violations_of(RuleId::TxnLeftOpen).len(),
        1,
        "reported once"
    );
    session.commit_transaction().await.unwrap();
    drop(session);
    client.shutdown().await;
    g.stop().await;
}
