//! `cursor-session-mismatch` end to end: a cursor opened under one session
//! and continued under another (raw frames: the Rust driver binds a cursor
//! to its session and cannot do this), and the driver's own cursors, which
//! always continue on their session, raising nothing.

use sessionguard_test_support as common;

use bson::{doc, Document};
use common::{find_cmd, lsid, short_of, Guarded, RawClient};
use futures_util::TryStreamExt;
use mongodb::options::FindOptions;
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RuleId, SessionConfig};

fn get_more(cursor_id: i64, session: Option<&Document>) -> Document {
    let mut cmd = doc! { "getMore": cursor_id, "collection": "events", "batchSize": 1 };
    if let Some(session) = session {
        cmd.insert("lsid", session.clone());
    }
    cmd.insert("$db", "app");
    cmd
}

#[tokio::test]
async fn get_more_under_another_session() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let mut raw = RawClient::hello(g.proxy_addr(), "web").await;
    let owner = lsid(1);
    let intruder = lsid(2);
    for i in 0..5 {
        raw.command(doc! { "insert": "events", "documents": [{ "_id": i }], "$db": "app" })
            .await;
    }
    let opened = raw
        .command(find_cmd("app", "events", &owner, Some(1)))
        .await;
    let cursor_id = opened
        .get_document("cursor")
        .unwrap()
        .get_i64("id")
        .unwrap();
    assert_ne!(cursor_id, 0);
    // The cursor's own session: fine.
    let ok = raw.command(get_more(cursor_id, Some(&owner))).await;
    assert_eq!(ok.get_f64("ok").unwrap(), 1.0);
    assert_eq!(g.settle().await, vec![]);

    // Another session, then none at all.
    raw.command(get_more(cursor_id, Some(&intruder))).await;
    let violation = g.wait_for(RuleId::CursorSessionMismatch).await;
    assert_eq!(violation.lsid_short, short_of(&intruder));
    assert!(
        violation.message.contains(&short_of(&owner)),
        "{}",
        violation.message
    );
    assert_eq!(violation.earlier.as_ref().unwrap().command, "find");
    assert_eq!(violation.current.as_ref().unwrap().command, "getMore");
    raw.command(get_more(cursor_id, None)).await;
    let engine = g.engine.clone();
    assert!(common::Stack::eventually(common::WAIT, || engine.violations().len() == 2).await);

    // killCursors without a session is what cursor reapers do: fine.
    raw.command(doc! { "killCursors": "events", "cursors": [cursor_id], "$db": "app" })
        .await;
    assert_eq!(g.settle().await.len(), 2);
    raw.close().await;
    g.stop().await;
}

#[tokio::test]
async fn driver_cursors_on_explicit_and_implicit_sessions_raise_nothing() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let client = g.client("web").await;
    let events = client.database("app").collection::<Document>("events");
    events
        .insert_many((0..40).map(|i| doc! { "_id": i }).collect::<Vec<_>>())
        .await
        .unwrap();
    let options = FindOptions::builder().batch_size(3).build();
    // Implicit session.
    let all: Vec<Document> = events
        .find(doc! {})
        .with_options(options.clone())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 40);
    // Explicit session.
    let mut session = client.start_session().await.unwrap();
    let mut cursor = events
        .find(doc! {})
        .with_options(options.clone())
        .session(&mut session)
        .await
        .unwrap();
    let mut n = 0;
    while let Some(doc) = cursor.next(&mut session).await {
        doc.unwrap();
        n += 1;
    }
    assert_eq!(n, 40);
    // A cursor dropped early: the driver kills it (killCursors).
    {
        let mut partial = events.find(doc! {}).with_options(options).await.unwrap();
        partial.try_next().await.unwrap();
    }
    drop(cursor);
    drop(session);
    client.shutdown().await;
    assert!(g.stack.emulator.command_count("getMore") >= 26);
    assert_eq!(g.settle_closed().await, vec![]);
    g.stop().await;
}
