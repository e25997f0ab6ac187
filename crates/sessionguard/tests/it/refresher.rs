//! The refresher end to end: with a short emulated session timeout, a cursor
//! the application holds idle past the timeout still works through the
//! proxy, because sessionguard refreshed its session (the emulator, which
//! expires idle sessions and their cursors like the server does, counts the
//! refreshes). Without the refresher the very same workload loses its cursor
//! (CursorNotFound).

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};
use common::{find_cmd, hold_a_cursor_idle, lsid, Guarded, RawClient, Stack, SERVER_TIMEOUT, WAIT};
use mongodb::error::ErrorKind;
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RefreshPolicy, RuleId, SessionConfig};

fn emulator() -> EmulatorConfig {
    EmulatorConfig {
        session_timeout: SERVER_TIMEOUT,
        ..EmulatorConfig::default()
    }
}

fn sessions(refresh: RefreshPolicy) -> SessionConfig {
    SessionConfig {
        refresh,
        // hello reports whole minutes; the emulated timeout is shorter.
        session_timeout: Some(SERVER_TIMEOUT),
        refresh_after: Some(Duration::from_millis(400)),
        refresh_interval: Duration::from_millis(150),
        ..SessionConfig::default()
    }
}

#[tokio::test]
async fn a_held_cursor_survives_an_idle_period_longer_than_the_session_timeout() {
    let g = Guarded::start_with(
        emulator(),
        sessions(RefreshPolicy::Held),
        Default::default(),
        true,
    )
    .await;
    let seen = hold_a_cursor_idle(g.client("reports").await, "rows")
        .await
        .expect("the cursor is still alive");
    assert_eq!(seen, 20);
    let refreshed = g.stack.emulator.refreshed_session_count();
    assert!(
        refreshed >= 2,
        "the emulator saw {refreshed} refreshed sessions"
    );
    let stats = g.engine.stats();
    assert!(stats.sessions_refreshed >= 2, "{stats:?}");
    assert_eq!(stats.refresh_failures, 0, "{stats:?}");
    // Nothing was misused: the refresher kept the session alive.
    assert_eq!(g.settle_closed().await, vec![]);
    g.stop().await;
}

#[tokio::test]
async fn without_the_refresher_the_same_cursor_is_lost() {
    let g = Guarded::start_with(
        emulator(),
        sessions(RefreshPolicy::Off),
        Default::default(),
        true,
    )
    .await;
    let error = hold_a_cursor_idle(g.client("reports").await, "rows")
        .await
        .expect_err("the server expired the session and its cursor");
    match error.kind.as_ref() {
        ErrorKind::Command(e) => assert_eq!(e.code, 43, "CursorNotFound expected, got {e:?}"),
        other => panic!("expected CursorNotFound, got {other:?}"),
    }
    assert_eq!(g.stack.emulator.refreshed_session_count(), 0);
    assert_eq!(g.engine.stats().refreshes_sent, 0);
    // sessionguard saw the expired session being used again.
    g.wait_for(RuleId::IdleExpiredReuse).await;
    g.stop().await;
}

#[tokio::test]
async fn ended_and_unheld_sessions_are_never_refreshed() {
    let g = Guarded::start_with(
        emulator(),
        sessions(RefreshPolicy::Held),
        Default::default(),
        true,
    )
    .await;
    let client = g.client("web").await;
    let rows = client.database("app").collection::<Document>("rows");
    // Plain operations on implicit sessions: nothing is held afterwards.
    rows.insert_many((0..10).map(|i| doc! { "_id": i }).collect::<Vec<_>>())
        .await
        .unwrap();
    rows.find_one(doc! {}).await.unwrap();

    // A session that was held (a cursor left open after its first batch)
    // and then ended by endSessions. Were the end ignored, the session would
    // stay held and be due for a refresh after `refresh_after` (400 ms).
    let mut raw = RawClient::hello(g.proxy_addr(), "ended").await;
    let ended = lsid(7);
    let reply = raw.command(find_cmd("app", "rows", &ended, Some(2))).await;
    let cursor_id = reply
        .get_document("cursor")
        .and_then(|cursor| cursor.get_i64("id"))
        .unwrap_or_else(|e| panic!("a cursor in {reply}: {e}"));
    assert_ne!(cursor_id, 0, "the cursor stays open after its first batch");
    let engine = g.engine.clone();
    assert!(
        Stack::eventually(WAIT, || engine.stats().ledger.held >= 1).await,
        "the session with an open cursor is held: {:?}",
        g.engine.stats()
    );
    let reply = raw
        .command(doc! { "endSessions": [ended.clone()], "$db": "admin" })
        .await;
    assert_eq!(reply.get_f64("ok").ok(), Some(1.0), "{reply}");
    assert!(
        Stack::eventually(WAIT, || {
            let stats = engine.stats();
            stats.sessions_ended >= 1 && stats.ledger.tombstones >= 1 && stats.ledger.held == 0
        })
        .await,
        "the engine saw the session end: {:?}",
        g.engine.stats()
    );

    // The raw connection stays open, so the refresher would have somewhere
    // to send a refresh for the ended session.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(g.stack.emulator.refreshed_session_count(), 0);
    assert_eq!(g.engine.stats().refreshes_sent, 0);
    assert_eq!(g.engine.stats().sessions_refreshed, 0);
    raw.close().await;
    client.shutdown().await;
    g.stop().await;
}
