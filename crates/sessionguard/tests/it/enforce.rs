//! Enforce mode end to end: a request that breaks an error-severity rule is
//! not forwarded, and the Rust driver surfaces sessionguard's error to the
//! caller unchanged — not retried, not taken for a topology change. And what
//! enforce mode must never reject: sessions a server refused to kill
//! (MongoDB-compatible servers, Atlas shared tiers, users without the
//! privilege) are as alive as before, in both modes.

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};
use common::{emulator_with_latency, find_cmd, lsid, session_lsid, Guarded, RawClient};
use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR};
use sessionguard_emulator::{EmulatorConfig, Profile, UserRole};
use sessionguard_engine::{
    Mode, RuleId, SessionConfig, SESSIONGUARD_VIOLATION_CODE, SESSIONGUARD_VIOLATION_CODE_NAME,
};

fn enforce() -> SessionConfig {
    SessionConfig {
        mode: Mode::Enforce,
        ..SessionConfig::default()
    }
}

fn command_error(error: &mongodb::error::Error) -> (i32, String, String) {
    match error.kind.as_ref() {
        ErrorKind::Command(e) => (e.code, e.code_name.clone(), e.message.clone()),
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_rust_driver_surfaces_a_rejection_without_retrying() {
    let g = Guarded::start(EmulatorConfig::default(), enforce()).await;
    let client = g.client("web").await;
    let items = client.database("app").collection::<Document>("items");
    let mut session = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let id = session_lsid(&session);
    client
        .database("admin")
        .run_command(doc! { "killSessions": [id] })
        .await
        .unwrap();
    let finds_before = g.stack.emulator.command_count("find");
    let inserts_before = g.stack.emulator.command_count("insert");

    // A read with the killed session: rejected, surfaced, not retried.
    let error = items
        .find_one(doc! {})
        .session(&mut session)
        .await
        .unwrap_err();
    let (code, code_name, message) = command_error(&error);
    assert_eq!(code, SESSIONGUARD_VIOLATION_CODE);
    assert_eq!(code_name, SESSIONGUARD_VIOLATION_CODE_NAME);
    assert!(
        message.starts_with("sessionguard: use-after-end: "),
        "{message}"
    );
    assert_eq!(
        g.stack.emulator.command_count("find"),
        finds_before,
        "never forwarded, never retried"
    );

    // A retryable write with it: rejected, no retry label, not retried.
    let error = items
        .insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap_err();
    assert_eq!(command_error(&error).0, SESSIONGUARD_VIOLATION_CODE);
    assert!(!error.contains_label(RETRYABLE_WRITE_ERROR));
    assert!(!error.contains_label(TRANSIENT_TRANSACTION_ERROR));
    assert_eq!(g.stack.emulator.command_count("insert"), inserts_before);
    assert_eq!(items.count_documents(doc! {}).await.unwrap(), 1);

    // The client itself is healthy: the rejection was not taken for a
    // not-primary / recovering state that would clear its pool.
    let mut fresh = client.start_session().await.unwrap();
    items
        .insert_one(doc! { "_id": 3 })
        .session(&mut fresh)
        .await
        .unwrap();
    let records = g.violations_of(RuleId::UseAfterEnd);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|v| v.rejected));
    drop(session);
    drop(fresh);
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test]
async fn ending_a_session_in_use_is_refused() {
    let g = Guarded::start(
        emulator_with_latency(&[("find", Duration::from_millis(500))]),
        enforce(),
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
    let error = client
        .database("admin")
        .run_command(doc! { "endSessions": [id] })
        .await
        .unwrap_err();
    assert_eq!(command_error(&error).0, SESSIONGUARD_VIOLATION_CODE);
    let (found, session) = reader.await.unwrap();
    assert!(
        found.unwrap().is_some(),
        "the operation in flight was untouched"
    );
    assert_eq!(
        g.stack.emulator.ended_session_count(),
        0,
        "the endSessions never reached the server"
    );
    drop(session);
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test]
async fn warnings_and_disabled_rules_never_reject() {
    let mut rules = sessionguard_engine::RulesConfig::default();
    rules.rules.insert(
        "concurrent-use".into(),
        sessionguard_engine::RuleOverride {
            action: Some(sessionguard_engine::Action::Log),
            ..Default::default()
        },
    );
    let g = Guarded::start_with(
        common::slow_emulator(Duration::from_millis(200)),
        enforce(),
        rules,
        false,
    )
    .await;
    let shared = lsid(7);
    let mut a = RawClient::hello(g.proxy_addr(), "web").await;
    let mut b = RawClient::hello(g.proxy_addr(), "web").await;
    a.send(0, &find_cmd("app", "items", &shared, None)).await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    // A different read (an identical one is judged later, once the first
    // is answered, and is never rejected: it could have been a retry).
    b.send(0, &find_cmd("app", "items", &shared, Some(5))).await;
    assert_eq!(a.read_reply().await.get_f64("ok").unwrap(), 1.0);
    assert_eq!(
        b.read_reply().await.get_f64("ok").unwrap(),
        1.0,
        "logged, not rejected"
    );
    let violation = g.wait_for(RuleId::ConcurrentUse).await;
    assert!(!violation.rejected);
    a.close().await;
    b.close().await;
    g.stop().await;
}

const EVERY_KILL: [&str; 3] = [
    "killSessions",
    "killAllSessions",
    "killAllSessionsByPattern",
];

/// A server that refuses kill commands, and the kills it refuses.
struct Refusing {
    name: &'static str,
    emulator: EmulatorConfig,
    /// `user:password@` for the connection string, when it authenticates.
    credentials: &'static str,
    kills: &'static [&'static str],
    code: i32,
    code_name: &'static str,
}

fn refusing_servers() -> Vec<Refusing> {
    vec![
        Refusing {
            name: "documentdb",
            emulator: EmulatorConfig {
                profile: Profile::DocumentDb,
                ..EmulatorConfig::default()
            },
            credentials: "",
            kills: &EVERY_KILL,
            code: 115,
            code_name: "CommandNotSupported",
        },
        Refusing {
            name: "atlas-shared",
            emulator: EmulatorConfig {
                profile: Profile::AtlasShared,
                ..EmulatorConfig::default()
            },
            credentials: "",
            kills: &EVERY_KILL,
            code: 8000,
            code_name: "AtlasError",
        },
        Refusing {
            // A user without killAnySession (readWriteAnyDatabase).
            name: "unprivileged user",
            emulator: EmulatorConfig {
                users: vec![("app".to_string(), "app-Secret-1".to_string())],
                user_roles: [("app".to_string(), UserRole::ReadWriteAnyDatabase)].into(),
                ..EmulatorConfig::default()
            },
            credentials: "app:app-Secret-1@",
            kills: &["killAllSessions", "killAllSessionsByPattern"],
            code: 13,
            code_name: "Unauthorized",
        },
    ]
}

/// The kill command `name` naming `lsid` (or every session).
fn kill_command(name: &str, lsid: &Document) -> Document {
    match name {
        "killSessions" => doc! { "killSessions": [lsid.clone()] },
        "killAllSessions" => doc! { "killAllSessions": [] },
        _ => doc! { "killAllSessionsByPattern": [{ "lsid": lsid.clone() }] },
    }
}

async fn refused_kills_change_nothing(mode: Mode) {
    for server in refusing_servers() {
        let logs = common::ThreadLogs::default();
        let _guard = logs.install_at(tracing::Level::WARN);
        let sessions = SessionConfig {
            mode,
            ..SessionConfig::default()
        };
        let g = Guarded::start(server.emulator, sessions).await;
        let client = mongodb::Client::with_uri_str(format!(
            "mongodb://{}{}/?directConnection=true&appName=refused",
            server.credentials,
            g.proxy_addr()
        ))
        .await
        .unwrap();
        let items = client.database("app").collection::<Document>("items");
        // Pooled implicit sessions and an explicit one, both in use.
        items.insert_one(doc! { "_id": 0 }).await.unwrap();
        let mut session = client.start_session().await.unwrap();
        items
            .insert_one(doc! { "_id": 1 })
            .session(&mut session)
            .await
            .unwrap();
        let id = session_lsid(&session);

        // Every kill is refused, and the driver says so...
        for kill in server.kills {
            let error = client
                .database("admin")
                .run_command(kill_command(kill, &id))
                .await
                .unwrap_err();
            let (code, code_name, _) = command_error(&error);
            assert_eq!(
                (code, code_name.as_str()),
                (server.code, server.code_name),
                "{} {kill}",
                server.name
            );
        }
        // ...and the sessions are as alive as before: every later request is
        // forwarded and answered, in both modes.
        for n in 2..5 {
            items
                .insert_one(doc! { "_id": n })
                .session(&mut session)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", server.name));
            items
                .insert_one(doc! { "_id": n * 10 })
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", server.name));
        }
        assert!(items
            .find_one(doc! { "_id": 1 })
            .session(&mut session)
            .await
            .unwrap()
            .is_some());
        assert_eq!(g.fired(), vec![], "{}", server.name);
        let stats = g.engine.stats();
        assert_eq!(stats.requests_rejected, 0, "{}", server.name);
        assert_eq!(stats.sessions_killed, 0, "{}", server.name);
        let refused: u64 = stats.commands_refused.iter().flatten().sum();
        assert_eq!(refused, server.kills.len() as u64, "{}", server.name);
        // Said once per command.
        let said = logs
            .text()
            .lines()
            .filter(|line| line.contains(" WARN ") && line.contains("the upstream refused kill"))
            .count();
        assert_eq!(
            said,
            server.kills.len(),
            "{}:\n{}",
            server.name,
            logs.text()
        );
        drop(session);
        client.shutdown().await;
        g.stop().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn refused_kills_change_nothing_when_observing() {
    refused_kills_change_nothing(Mode::Observe).await;
}

#[tokio::test(flavor = "current_thread")]
async fn refused_kills_change_nothing_and_enforce_lets_everything_through() {
    refused_kills_change_nothing(Mode::Enforce).await;
}
