//! `store-session-resurrected` end to end: the official Rust driver plays an
//! express-session + connect-mongo app (the same commands connect-mongo 5
//! sends: `find` by `_id` with its `$or` on `expires`, `updateOne` with
//! `$set` and `upsert: true`, the touch `updateOne` of `expires`, `deleteOne`
//! by `_id`) through the proxy against the emulator, one step at a time:
//! the request that loaded a session saves it back after another connection
//! destroyed it. Observe reports the three operations; the fixed patterns
//! report nothing; enforce rejects the write and the document stays deleted.

use sessionguard_test_support as common;

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, DateTime, Document};
use common::Guarded;
use mongodb::error::ErrorKind;
use mongodb::{Client, Collection};
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{
    Mode, RuleId, RulesConfig, SessionConfig, SessionEngine, StoreConfig, ViolationRecord,
    SESSIONGUARD_VIOLATION_CODE,
};

/// Stands for what a session holds; must never appear in evidence.
const SECRET_MARKER: &str = "user-alice-cart-7c1d";

/// The emulator and the proxy with an engine following `stores` in `mode`.
async fn guarded(mode: Mode, stores: StoreConfig) -> Guarded {
    let sessions = SessionConfig {
        mode,
        ..SessionConfig::default()
    };
    stores.validate().expect("valid [stores]");
    let engine = SessionEngine::new(&sessions, &RulesConfig::default()).with_stores(&stores);
    Guarded::with_engine(EmulatorConfig::default(), engine, false, |_| {}).await
}

fn resurrections(g: &Guarded) -> Vec<Arc<ViolationRecord>> {
    g.violations_of(RuleId::StoreSessionResurrected)
}

/// The session store of one application, speaking connect-mongo 5.
struct Store {
    sessions: Collection<Document>,
}

impl Store {
    fn of(client: &Client, db: &str, collection: &str) -> Store {
        Store {
            sessions: client.database(db).collection(collection),
        }
    }

    /// `MongoStore#get`.
    async fn get(&self, sid: &str) -> Option<Document> {
        let now = DateTime::now();
        self.sessions
            .find_one(doc! {
                "_id": sid,
                "$or": [ { "expires": { "$exists": false } }, { "expires": { "$gt": now } } ],
            })
            .await
            .unwrap()
    }

    /// `MongoStore#set`: `updateOne({_id}, {$set: s}, {upsert: true})`.
    async fn set(&self, sid: &str, data: &str) -> mongodb::error::Result<()> {
        let expires = DateTime::from_millis(DateTime::now().timestamp_millis() + 86_400_000);
        self.sessions
            .update_one(
                doc! { "_id": sid },
                doc! { "$set": { "_id": sid, "session": format!("{{\"cookie\":{{}},\"data\":\"{data}\"}}"), "expires": expires } },
            )
            .upsert(true)
            .await
            .map(|_| ())
    }

    /// `MongoStore#touch`: `updateOne({_id}, {$set: {expires}})`; whether it
    /// found the session.
    async fn touch(&self, sid: &str) -> bool {
        let expires = DateTime::from_millis(DateTime::now().timestamp_millis() + 86_400_000);
        self.sessions
            .update_one(doc! { "_id": sid }, doc! { "$set": { "expires": expires } })
            .await
            .unwrap()
            .matched_count
            == 1
    }

    /// `MongoStore#destroy`.
    async fn destroy(&self, sid: &str) {
        self.sessions.delete_one(doc! { "_id": sid }).await.unwrap();
    }

    async fn exists(&self, sid: &str) -> bool {
        self.sessions
            .count_documents(doc! { "_id": sid })
            .await
            .unwrap()
            == 1
    }
}

#[tokio::test]
async fn a_save_after_another_connection_destroyed_the_session_is_reported_with_three_operations() {
    let g = guarded(Mode::Observe, StoreConfig::default()).await;
    let web = g.client("web").await;
    let admin = g.client("admin-tool").await;
    let app = Store::of(&web, "shop", "sessions");
    let kill = Store::of(&admin, "shop", "sessions");

    app.set("sid-race", SECRET_MARKER).await.unwrap(); // login
    assert!(app.get("sid-race").await.is_some()); // the slow request loads it
    kill.destroy("sid-race").await; // logout / admin kill, another connection
    assert!(!app.exists("sid-race").await);
    app.set("sid-race", SECRET_MARKER).await.unwrap(); // the slow request saves

    let fired = g.settle().await;
    assert_eq!(fired, [RuleId::StoreSessionResurrected], "{fired:?}");
    assert!(app.exists("sid-race").await, "observe forwards: it is back");
    let record = &resurrections(&g)[0];
    assert!(!record.rejected);
    let store = record.store.as_ref().expect("store evidence");
    assert_eq!(store.store, "sessions");
    assert_eq!(store.document.len(), 16, "a fingerprint, not the id");
    let (read, destroy, write) = (&store.read, &store.destroy, &store.write);
    assert_eq!(
        (
            read.command.as_str(),
            destroy.command.as_str(),
            write.command.as_str()
        ),
        ("find", "delete", "update")
    );
    for op in [read, destroy, write] {
        assert_eq!(op.namespace, "shop.sessions");
    }
    assert_eq!(read.app_name.as_deref(), Some("web"));
    assert_eq!(write.app_name.as_deref(), Some("web"));
    assert_eq!(destroy.app_name.as_deref(), Some("admin-tool"));
    assert_ne!(destroy.connection_id, read.connection_id);
    assert_ne!(destroy.connection_id, write.connection_id);
    assert!(read.at <= destroy.at && destroy.at <= write.at);
    // The generic evidence slots: the write broke the rule, the destroy is
    // what it conflicts with.
    assert_eq!(record.current.as_ref(), Some(write));
    assert_eq!(record.earlier.as_ref(), Some(destroy));
    // Never the session's id or contents.
    let json = serde_json::to_string(&**record).unwrap();
    assert!(
        !json.contains("sid-race") && !json.contains(SECRET_MARKER),
        "{json}"
    );
    assert!(json.contains("\"store\""), "{json}");

    let counts = g.store("sessions");
    assert_eq!(
        (
            counts.created,
            counts.destroyed,
            counts.resurrected,
            counts.touched
        ),
        (1, 1, 1, 0)
    );
    // Alive again: saving it from here on is ordinary.
    app.set("sid-race", SECRET_MARKER).await.unwrap();
    assert_eq!(g.settle().await.len(), 1);
    web.shutdown().await;
    admin.shutdown().await;
    g.stack.stop().await;
}

#[tokio::test]
async fn the_fixed_patterns_and_ordinary_session_life_report_nothing() {
    let g = guarded(Mode::Observe, StoreConfig::default()).await;
    let web = g.client("web").await;
    let admin = g.client("admin-tool").await;
    let app = Store::of(&web, "shop", "sessions");
    let kill = Store::of(&admin, "shop", "sessions");

    // A fresh session, used: loaded, touched, saved.
    app.set("sid-a", "v1").await.unwrap();
    for _ in 0..3 {
        assert!(app.get("sid-a").await.is_some());
        assert!(app.touch("sid-a").await);
        app.set("sid-a", "v2").await.unwrap();
    }
    // Regenerate at login: the old id destroyed, a new id saved.
    assert!(app.get("sid-a").await.is_some());
    app.destroy("sid-a").await;
    app.set("sid-b", "v1").await.unwrap();

    // Fix 1, re-check after the slow work: loaded, destroyed elsewhere,
    // re-read (gone), not saved.
    assert!(app.get("sid-b").await.is_some());
    kill.destroy("sid-b").await;
    assert!(app.get("sid-b").await.is_none());
    // Fix 2, touch only (resave: false): the touch finds nothing, creates nothing.
    app.set("sid-c", "v1").await.unwrap();
    assert!(app.get("sid-c").await.is_some());
    kill.destroy("sid-c").await;
    assert!(!app.touch("sid-c").await);
    assert!(!app.exists("sid-c").await);
    // Login after logout: a new id.
    app.set("sid-d", "v1").await.unwrap();
    // A destroyed session read again by the old cookie: nothing there, a new
    // session is made under a new id.
    assert!(app.get("sid-a").await.is_none());
    app.set("sid-e", "v1").await.unwrap();
    // Not a store (not configured, not session-shaped): the same race on
    // another collection is none of this rule's business.
    let carts: Collection<Document> = web.database("shop").collection("carts");
    let add_item = || {
        carts
            .update_one(doc! { "_id": "cart-1" }, doc! { "$inc": { "items": 1 } })
            .upsert(true)
    };
    add_item().await.unwrap();
    assert!(carts
        .find_one(doc! { "_id": "cart-1" })
        .await
        .unwrap()
        .is_some());
    Store::of(&admin, "shop", "carts").destroy("cart-1").await;
    add_item().await.unwrap();

    assert_eq!(g.settle().await, [], "{:?}", g.engine.violations());
    let counts = g.store("sessions");
    assert_eq!(counts.resurrected, 0);
    assert_eq!(counts.destroyed, 3);
    assert_eq!(counts.touched, 4);
    // sid-a, sid-b, sid-c, sid-d, sid-e.
    assert_eq!(counts.created, 5);
    web.shutdown().await;
    admin.shutdown().await;
    g.stack.stop().await;
}

#[tokio::test]
async fn enforce_rejects_the_resurrecting_write_and_the_session_stays_deleted() {
    let g = guarded(Mode::Enforce, StoreConfig::default()).await;
    let web = g.client("web").await;
    let admin = g.client("admin-tool").await;
    let app = Store::of(&web, "shop", "sessions");
    app.set("sid-x", "v1").await.unwrap();
    assert!(app.get("sid-x").await.is_some());
    Store::of(&admin, "shop", "sessions").destroy("sid-x").await;
    let updates_before = g.stack.emulator.command_count("update");

    let error = app.set("sid-x", "v2").await.unwrap_err();
    match error.kind.as_ref() {
        ErrorKind::Command(e) => {
            assert_eq!(e.code, SESSIONGUARD_VIOLATION_CODE);
            assert!(
                e.message
                    .starts_with("sessionguard: store-session-resurrected: "),
                "{}",
                e.message
            );
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    assert_eq!(
        g.stack.emulator.command_count("update"),
        updates_before,
        "never forwarded"
    );
    assert!(!app.exists("sid-x").await, "the logout stuck");
    // Retried: rejected again (nothing was recorded as written).
    assert!(app.set("sid-x", "v2").await.is_err());
    assert!(!app.exists("sid-x").await);
    let records = resurrections(&g);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.rejected));
    // Nothing was brought back: the store metric counts forwarded
    // resurrections; the rejected attempts are the rule's violations.
    assert_eq!(g.store("sessions").resurrected, 0);
    // A new session (a new login) goes through.
    app.set("sid-y", "v1").await.unwrap();
    assert!(app.exists("sid-y").await);
    assert_eq!(resurrections(&g).len(), 2);
    web.shutdown().await;
    admin.shutdown().await;
    g.stack.stop().await;
}

#[tokio::test]
async fn configured_and_auto_detected_stores_are_followed_under_their_labels() {
    let stores = StoreConfig {
        collections: vec!["accounts.web_sessions".into()],
        ..StoreConfig::default()
    };
    let g = guarded(Mode::Observe, stores).await;
    let web = g.client("web").await;
    let admin = g.client("admin-tool").await;
    // Configured with its database: only there.
    for (db, collection) in [("accounts", "web_sessions"), ("blog", "sess")] {
        let app = Store::of(&web, db, collection);
        app.set("sid", "v").await.unwrap(); // blog.sess: learned from the shape
        assert!(app.get("sid").await.is_some());
        Store::of(&admin, db, collection).destroy("sid").await;
        app.set("sid", "v").await.unwrap();
    }
    // The default "sessions" is not configured any more.
    let other = Store::of(&web, "accounts", "sessions");
    other
        .sessions
        .insert_one(doc! { "_id": "sid" })
        .await
        .unwrap();
    assert!(other.get("sid").await.is_some());
    Store::of(&admin, "accounts", "sessions")
        .destroy("sid")
        .await;
    other
        .sessions
        .update_one(doc! { "_id": "sid" }, doc! { "$set": { "n": 1 } })
        .upsert(true)
        .await
        .unwrap();

    let _ = g.settle().await;
    let labels: Vec<String> = resurrections(&g)
        .iter()
        .map(|r| r.store.as_ref().unwrap().store.clone())
        .collect();
    assert_eq!(labels, ["accounts.web_sessions", "auto"]);
    assert_eq!(g.store("accounts.web_sessions").resurrected, 1);
    assert_eq!(g.store("auto").resurrected, 1);
    web.shutdown().await;
    admin.shutdown().await;
    g.stack.stop().await;
}

#[test]
fn the_stores_table_parses_and_validates_in_the_config_file() {
    use sessionguard::config::Config;
    let config = Config::parse(
        "[stores]\ncollections = [\"app.sessions\", \"sessions\"]\nauto_detect = false\nresurrection_window = \"2m\"\nmax_documents = 5000\n",
    )
    .unwrap();
    config.validate().unwrap();
    assert_eq!(config.stores.collections, ["app.sessions", "sessions"]);
    assert_eq!(config.stores.resurrection_window, Duration::from_secs(120));
    let defaults = Config::parse("").unwrap();
    assert_eq!(defaults.stores, StoreConfig::default());
    let err = Config::parse("[stores]\nresurrection_window = \"0s\"\n")
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(err.key.as_deref(), Some("stores.resurrection_window"));
    assert!(Config::parse("[stores]\ncollection = [\"x\"]\n").is_err());
    assert!(
        Config::parse("[rules.store-session-resurrected]\naction = \"reject\"\n")
            .unwrap()
            .validate()
            .is_ok()
    );
}
