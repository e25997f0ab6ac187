//! Session-lifecycle rules proven end to end: the proxy with a real
//! `SessionEngine` in front of the emulator, the official Rust driver
//! misbehaving the way applications do (or raw frames where the driver's API
//! makes the misuse impossible), and the violation read back from the engine
//! with its evidence.

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};
use common::{
    find_cmd, insert_cmd, lsid, session_lsid, short_of, slow_emulator, Guarded, RawClient,
};
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RuleId, SessionConfig, Severity};

#[tokio::test]
async fn concurrent_use_of_a_shared_global_session() {
    // The article's "shared global session": two requests handled at once,
    // both using the one session. Raw frames: the Rust driver's API
    // (`&mut ClientSession`) cannot share a session between tasks.
    let g = Guarded::start(
        slow_emulator(Duration::from_millis(300)),
        SessionConfig::default(),
    )
    .await;
    let shared = lsid(1);
    let mut first = RawClient::hello(g.proxy_addr(), "web").await;
    let mut second = RawClient::hello(g.proxy_addr(), "web").await;
    first
        .send(0, &find_cmd("app", "items", &shared, None))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    second
        .send(
            0,
            &insert_cmd("app", "items", vec![doc! { "x": 1 }], &shared, 1),
        )
        .await;
    assert_eq!(first.read_reply().await.get_f64("ok").unwrap(), 1.0);
    assert_eq!(second.read_reply().await.get_f64("ok").unwrap(), 1.0);

    let violation = g.wait_for(RuleId::ConcurrentUse).await;
    assert_eq!(violation.severity, Severity::Error);
    assert_eq!(violation.lsid_short, short_of(&shared));
    let current = violation.current.as_ref().unwrap();
    let earlier = violation.earlier.as_ref().unwrap();
    assert_eq!(current.command, "insert");
    assert_eq!(earlier.command, "find");
    assert_eq!(current.namespace, "app.items");
    assert_ne!(current.connection_id, earlier.connection_id);
    assert_eq!(current.app_name.as_deref(), Some("web"));
    assert_eq!(current.driver.as_deref(), Some("raw-test-client"));
    assert!(current.peer.as_deref().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(g.fired(), vec![RuleId::ConcurrentUse]);
    first.close().await;
    second.close().await;
    g.stop().await;
}

#[tokio::test]
async fn identical_finds_sharing_one_session_are_concurrent_use_not_retries() {
    // A handler pool reading the same document with one shared session:
    // byte-identical finds at once on three connections, every one answered.
    // Nothing failed, so nothing was a retry.
    let g = Guarded::start(
        slow_emulator(Duration::from_millis(300)),
        SessionConfig::default(),
    )
    .await;
    let shared = lsid(4);
    let mut handlers = Vec::new();
    for _ in 0..3 {
        handlers.push(RawClient::hello(g.proxy_addr(), "web").await);
    }
    for handler in &mut handlers {
        handler
            .send(0, &find_cmd("app", "items", &shared, None))
            .await;
    }
    for handler in &mut handlers {
        assert_eq!(handler.read_reply().await.get_f64("ok").unwrap(), 1.0);
    }

    let violation = g.wait_for(RuleId::ConcurrentUse).await;
    assert_eq!(violation.lsid_short, short_of(&shared));
    assert!(
        violation.message.contains("both were answered"),
        "{}",
        violation.message
    );
    let current = violation.current.as_ref().unwrap();
    let earlier = violation.earlier.as_ref().unwrap();
    assert_eq!(
        (current.command.as_str(), earlier.command.as_str()),
        ("find", "find")
    );
    assert_ne!(current.connection_id, earlier.connection_id);
    let engine = g.engine.clone();
    assert!(
        common::Stack::eventually(common::WAIT, || {
            engine.violation_counts()[RuleId::ConcurrentUse.index()].1 == 2
        })
        .await,
        "one report per overlapping find: {:?}",
        g.fired()
    );
    let stats = g.engine.stats();
    assert_eq!(stats.retries.get("find"), 0, "nothing was retried");
    assert_eq!(stats.retry_verdicts_pending, 0);
    for handler in handlers {
        handler.close().await;
    }
    g.stop().await;
}

#[tokio::test]
async fn use_after_kill_sessions_with_the_rust_driver() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let client = g.client("billing").await;
    let items = client.database("app").collection::<Document>("items");
    let mut session = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let id = session_lsid(&session);
    // Someone kills the session (an admin, a cleanup job) ...
    client
        .database("admin")
        .run_command(doc! { "killSessions": [id.clone()] })
        .await
        .unwrap();
    // ... and the application keeps using it: the server does not refuse.
    let found = items
        .find_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    assert!(found.is_some());

    let violation = g.wait_for(RuleId::UseAfterEnd).await;
    assert_eq!(violation.lsid_short, short_of(&id));
    assert!(
        violation.message.contains("killed by killSessions"),
        "{}",
        violation.message
    );
    assert_eq!(violation.current.as_ref().unwrap().command, "find");
    assert_eq!(
        violation.current.as_ref().unwrap().app_name.as_deref(),
        Some("billing")
    );
    assert_eq!(violation.earlier.as_ref().unwrap().command, "killSessions");
    assert_eq!(
        violation.current.as_ref().unwrap().driver.as_deref(),
        Some("mongo-rust-driver")
    );
    drop(session);
    client.shutdown().await;
    assert_eq!(g.settle_closed().await, vec![RuleId::UseAfterEnd]);
    g.stop().await;
}

#[tokio::test]
async fn use_after_end_sessions_from_a_later_invocation() {
    // A serverless handler keeps an lsid from an earlier invocation whose
    // client was closed (endSessions) and reuses it.
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let client = g.client("lambda").await;
    let items = client.database("app").collection::<Document>("items");
    let mut session = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let id = session_lsid(&session);
    drop(session);
    client.shutdown().await;
    assert!(
        g.stack.emulator.ended_session_count() >= 1,
        "the driver ended its pooled sessions at shutdown"
    );

    let mut later = RawClient::hello(g.proxy_addr(), "lambda").await;
    let reply = later.command(find_cmd("app", "items", &id, None)).await;
    assert_eq!(
        reply.get_f64("ok").unwrap(),
        1.0,
        "the server silently accepts the ended session"
    );
    let violation = g.wait_for(RuleId::UseAfterEnd).await;
    assert!(
        violation.message.contains("ended by endSessions"),
        "{}",
        violation.message
    );
    assert_eq!(violation.earlier.as_ref().unwrap().command, "endSessions");
    later.close().await;
    g.stop().await;
}

#[tokio::test]
async fn end_sessions_while_an_operation_is_in_flight() {
    let g = Guarded::start(
        common::emulator_with_latency(&[("find", Duration::from_millis(600))]),
        SessionConfig::default(),
    )
    .await;
    let client = g.client("web").await;
    let items = client.database("app").collection::<Document>("items");
    items.insert_one(doc! { "_id": 1 }).await.unwrap();
    let mut session = client.start_session().await.unwrap();
    let id = session_lsid(&session);
    let reader = {
        let items = items.clone();
        tokio::spawn(async move {
            let found = items.find_one(doc! {}).session(&mut session).await;
            (found, session)
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The article's "session closed before the operation completes".
    client
        .database("admin")
        .run_command(doc! { "endSessions": [id.clone()] })
        .await
        .unwrap();
    let (found, session) = reader.await.unwrap();
    found.unwrap();

    let violation = g.wait_for(RuleId::EndWhileInFlight).await;
    assert_eq!(violation.lsid_short, short_of(&id));
    assert_eq!(violation.current.as_ref().unwrap().command, "endSessions");
    assert_eq!(violation.earlier.as_ref().unwrap().command, "find");
    drop(session);
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test]
async fn connection_closed_with_a_write_in_flight() {
    // "client.close() before insertMany completes": the socket goes away
    // while the insert runs.
    let g = Guarded::start(
        common::emulator_with_latency(&[("insert", Duration::from_millis(400))]),
        SessionConfig::default(),
    )
    .await;
    let mut raw = RawClient::hello(g.proxy_addr(), "web").await;
    let session = lsid(9);
    raw.send(
        0,
        &insert_cmd(
            "app",
            "users",
            vec![doc! { "u": 1 }, doc! { "u": 2 }],
            &session,
            1,
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.close().await;

    let violation = g.wait_for(RuleId::ClosedWithRequestsInFlight).await;
    assert_eq!(violation.severity, Severity::Warning);
    assert_eq!(violation.earlier.as_ref().unwrap().command, "insert");
    assert_eq!(violation.lsid_short, short_of(&session));
    g.stop().await;
}

#[tokio::test]
async fn one_session_used_from_two_clients() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    let client = g.client("web").await;
    let items = client.database("app").collection::<Document>("items");
    let mut session = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let id = session_lsid(&session);
    // Another process (here a raw client with its own metadata) got the id,
    // e.g. through a cache, and uses it.
    let mut worker = RawClient::hello(g.proxy_addr(), "worker").await;
    let reply = worker.command(find_cmd("app", "items", &id, None)).await;
    assert_eq!(reply.get_f64("ok").unwrap(), 1.0);
    // The first client keeps using it too: reported once per pair.
    items.find_one(doc! {}).session(&mut session).await.unwrap();
    worker.command(find_cmd("app", "items", &id, None)).await;

    let violation = g.wait_for(RuleId::CrossClientSharing).await;
    assert_eq!(
        violation.current.as_ref().unwrap().app_name.as_deref(),
        Some("worker")
    );
    assert!(violation.message.contains("web"), "{}", violation.message);
    assert_eq!(g.violations_of(RuleId::CrossClientSharing).len(), 1);
    worker.close().await;
    drop(session);
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test]
async fn a_session_reused_after_the_server_expired_it() {
    let emulator = EmulatorConfig {
        session_timeout: Duration::from_millis(800),
        ..EmulatorConfig::default()
    };
    let sessions = SessionConfig {
        session_timeout: Some(Duration::from_millis(800)),
        refresh: sessionguard_engine::RefreshPolicy::Off,
        ..SessionConfig::default()
    };
    let g = Guarded::start(emulator, sessions).await;
    let client = g.client("web").await;
    let items = client.database("app").collection::<Document>("items");
    let mut session = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    assert_eq!(g.fired(), vec![]);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    items
        .insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();

    let violation = g.wait_for(RuleId::IdleExpiredReuse).await;
    assert_eq!(violation.severity, Severity::Warning);
    assert_eq!(violation.lsid_short, short_of(&session_lsid(&session)));
    assert_eq!(violation.current.as_ref().unwrap().command, "insert");
    // Once reported, the session continues as a new one: no repeat.
    items
        .insert_one(doc! { "_id": 3 })
        .session(&mut session)
        .await
        .unwrap();
    assert_eq!(g.violations_of(RuleId::IdleExpiredReuse).len(), 1);
    drop(session);
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test]
async fn unacknowledged_write_with_a_session() {
    let g = Guarded::start(EmulatorConfig::default(), SessionConfig::default()).await;
    // The Rust driver refuses unacknowledged writes outright, so a client
    // that sends one with a session is played with raw frames. First a
    // correct one: w:0 without an lsid raises nothing.
    let mut raw = RawClient::hello(g.proxy_addr(), "legacy-app").await;
    let mut plain = doc! { "insert": "items", "documents": [{ "_id": 1 }] };
    plain.insert("writeConcern", doc! { "w": 0 });
    plain.insert("$db", "app");
    raw.send(sessionguard_protocol::wire::MsgFlags::MORE_TO_COME, &plain)
        .await;
    raw.command(doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(g.settle().await, vec![]);

    // A client that does attach one (moreToCome: no reply comes back).
    let session = lsid(4);
    let mut insert =
        doc! { "insert": "items", "documents": [{ "_id": 2 }], "lsid": session.clone() };
    insert.insert("writeConcern", doc! { "w": 0 });
    insert.insert("$db", "app");
    raw.send(sessionguard_protocol::wire::MsgFlags::MORE_TO_COME, &insert)
        .await;
    let ping = raw.command(doc! { "ping": 1, "$db": "admin" }).await;
    assert_eq!(ping.get_f64("ok").unwrap(), 1.0);

    let violation = g.wait_for(RuleId::UnacknowledgedWithSession).await;
    assert_eq!(violation.lsid_short, short_of(&session));
    assert_eq!(g.fired(), vec![RuleId::UnacknowledgedWithSession]);
    raw.close().await;
    g.stop().await;
}
