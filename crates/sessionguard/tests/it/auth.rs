//! Authentication passes through the proxy untouched: the official Rust
//! driver authenticates with SCRAM-SHA-256 (speculatively in the handshake,
//! and with saslStart when the server does not take the speculative step)
//! against the emulator through the proxy; every byte the emulator received
//! is a byte the driver sent; the session engine records the user as the
//! owner of its sessions; and with two users each holding an idle cursor
//! past the emulated session timeout, the refresher's `refreshSessions`
//! travel as each session's owner, so both cursors survive (the emulator
//! keys sessions by lsid and user, as the server does: a refresh sent as
//! the wrong user refreshes nothing of the owner's, and the cursor dies).
//! Nothing secret reaches the log.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use bytes::Bytes;
use common::{hold_a_cursor_idle, Guarded, Relay, SERVER_TIMEOUT};
use mongodb::options::FindOptions;
use mongodb::Client;
use sessionguard::admin::{self, AdminContext};
use sessionguard::metrics::Metrics;
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RefreshPolicy, RulesConfig, SessionConfig, SessionEngine};
use tokio_util::sync::CancellationToken;

const ALICE: (&str, &str) = ("alice", "Wonder-Land-2024");
const BOB: (&str, &str) = ("bob", "Builder/Can-We-Fix-It");

fn users() -> Vec<(String, String)> {
    [ALICE, BOB]
        .iter()
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .collect()
}

fn percent(s: &str) -> String {
    s.replace('/', "%2F")
}

fn uri(addr: SocketAddr, (user, password): (&str, &str), extra: &str) -> String {
    format!(
        "mongodb://{user}:{}@{addr}/?directConnection=true{extra}",
        percent(password)
    )
}

/// A driver client authenticating as `user`, named after it.
async fn user_client(proxy: SocketAddr, user: (&str, &str)) -> Client {
    Client::with_uri_str(uri(proxy, user, &format!("&appName={}", user.0)))
        .await
        .unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The client nonces of every SCRAM client-first message sent.
fn client_nonces(frames: &[Vec<u8>]) -> Vec<String> {
    let mut nonces = Vec::new();
    for frame in frames {
        let marker = b",r=";
        let Some(start) = frame.windows(5).position(|w| w == b"n,,n=") else {
            continue;
        };
        let after = &frame[start..];
        let Some(r) = after.windows(3).position(|w| w == marker) else {
            continue;
        };
        let nonce: Vec<u8> = after[r + 3..]
            .iter()
            .take_while(|b| b.is_ascii_graphic() && **b != b',')
            .copied()
            .collect();
        nonces.push(String::from_utf8(nonce).unwrap());
    }
    nonces
}

/// The owners `/sessions` of the admin API reports.
async fn session_owners(engine: Arc<SessionEngine>) -> Vec<Option<String>> {
    let shutdown = CancellationToken::new();
    let context = AdminContext {
        metrics: Arc::new(Metrics::new()),
        engine: Some(engine),
        token: None,
        probe: None,
        reload: None,
    };
    let server = admin::serve_with("127.0.0.1:0", context, shutdown.clone())
        .await
        .unwrap();
    let reply = common::http_get(server.local_addr, "/sessions", None).await;
    shutdown.cancel();
    assert_eq!(reply.status, 200, "GET /sessions: {reply:?}");
    let listing: serde_json::Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("/sessions is JSON ({e}): {}", reply.body));
    listing["sessions"]
        .as_array()
        .unwrap_or_else(|| panic!("a sessions array in {listing}"))
        .iter()
        .map(|s| s["owner"].as_str().map(str::to_owned))
        .collect()
}

async fn authenticated_run(speculative: bool) {
    let logs = common::ThreadLogs::default();
    let _guard = logs.install_at(tracing::Level::TRACE);
    let emulator = EmulatorConfig {
        users: users(),
        speculative_auth: speculative,
        record_frames: true,
        ..EmulatorConfig::default()
    };
    let g = Guarded::start(emulator, SessionConfig::default()).await;
    let tap = Relay::tap(g.stack.proxy.local_addr()).await;

    // Wrong password: refused, as it would be directly.
    let wrong = Client::with_uri_str(uri(tap.addr, (ALICE.0, "not-the-password"), ""))
        .await
        .unwrap();
    let err = wrong
        .database("app")
        .collection::<Document>("people")
        .find_one(doc! {})
        .await
        .expect_err("wrong password");
    assert!(err.to_string().contains("Authentication failed"), "{err}");
    wrong.shutdown().await;

    let client = Client::with_uri_str(uri(tap.addr, ALICE, ""))
        .await
        .unwrap();
    let people = client.database("app").collection::<Document>("people");
    people
        .insert_one(doc! { "_id": 1, "name": "ada" })
        .await
        .expect("authenticated insert through the proxy");
    let found = people.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(found.get_str("name").unwrap(), "ada");

    let stack = &g.stack;
    let sasl_start = stack.emulator.command_count("saslStart");
    let sasl_continue = stack.emulator.command_count("saslContinue");
    assert!(
        sasl_continue >= 1,
        "no SCRAM conversation reached the emulator"
    );
    if speculative {
        // The first step rode in the handshake.
        assert_eq!(sasl_start, 0, "speculative authentication was not used");
    } else {
        assert!(sasl_start >= 1);
    }

    // The proxy altered nothing: every frame the emulator got was sent so
    // by the driver, and the auth frames are among them.
    let sent = tap.frames();
    let received: Vec<Bytes> = stack.emulator.received_frames();
    let auth_frames = received
        .iter()
        .filter(|f| {
            contains(f, b"saslContinue")
                || contains(f, b"saslStart")
                || contains(f, b"speculativeAuthenticate")
        })
        .count();
    assert!(auth_frames >= 2, "{auth_frames} auth frames");
    for frame in &received {
        assert!(
            sent.iter().any(|s| s.as_slice() == frame.as_ref()),
            "the emulator received a frame the driver did not send ({} bytes)",
            frame.len()
        );
    }

    // The ledger knows who owns the session.
    let owners = session_owners(g.engine.clone()).await;
    assert!(!owners.is_empty());
    assert!(
        owners.iter().all(|o| o.as_deref() == Some("alice@admin")),
        "{owners:?}"
    );

    client.shutdown().await;
    g.stop().await;

    // Nothing secret in the log: not the password, not a SCRAM payload.
    let text = logs.text();
    assert!(
        text.contains("saslContinue") || text.contains("authenticated"),
        "the run logged nothing useful"
    );
    for secret in [ALICE.1, "not-the-password", "c=biws", "n,,n=", ",p=", "v="] {
        assert!(!text.contains(secret), "`{secret}` appears in the log");
    }
    let nonces = client_nonces(&sent);
    assert!(!nonces.is_empty());
    for nonce in nonces {
        assert!(!text.contains(&nonce), "a SCRAM nonce appears in the log");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_driver_authenticates_speculatively_through_the_proxy_untouched() {
    authenticated_run(true).await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_driver_authenticates_with_sasl_start_through_the_proxy_untouched() {
    authenticated_run(false).await;
}

#[tokio::test(flavor = "current_thread")]
async fn unauthenticated_commands_are_refused_by_the_upstream_and_passed_back() {
    let g = Guarded::start(
        EmulatorConfig {
            users: users(),
            ..EmulatorConfig::default()
        },
        SessionConfig::default(),
    )
    .await;
    let client = g.stack.client_with("&serverSelectionTimeoutMS=2000").await;
    let err = client
        .database("app")
        .collection::<Document>("people")
        .find_one(doc! {})
        .await
        .expect_err("no credentials");
    match *err.kind {
        mongodb::error::ErrorKind::Command(ref e) => {
            assert_eq!(e.code, 13, "{e:?}");
            assert!(e.message.contains("requires authentication"), "{e:?}");
        }
        ref other => panic!("expected Unauthorized, got {other:?}"),
    }
    client.shutdown().await;
    g.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn refreshes_travel_as_each_owner_so_both_users_idle_cursors_survive() {
    let emulator = EmulatorConfig {
        users: users(),
        session_timeout: SERVER_TIMEOUT,
        ..EmulatorConfig::default()
    };
    let sessions = SessionConfig {
        refresh: RefreshPolicy::Held,
        session_timeout: Some(SERVER_TIMEOUT),
        refresh_after: Some(Duration::from_millis(400)),
        refresh_interval: Duration::from_millis(150),
        ..SessionConfig::default()
    };
    let g = Guarded::start_with(emulator, sessions, RulesConfig::default(), true).await;
    let proxy = g.stack.proxy.local_addr();
    let (alice, bob) = tokio::join!(
        hold_a_cursor_idle(user_client(proxy, ALICE).await, "rows_alice"),
        hold_a_cursor_idle(user_client(proxy, BOB).await, "rows_bob")
    );
    assert_eq!(alice.expect("alice's cursor survived"), 20);
    assert_eq!(bob.expect("bob's cursor survived"), 20);
    let refreshed = g.stack.emulator.refreshed_session_count();
    assert!(
        refreshed >= 4,
        "the emulator saw {refreshed} refreshed sessions"
    );
    let stats = g.engine.stats();
    assert_eq!(stats.refresh_failures, 0, "{stats:?}");
    g.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_refresh_sent_as_another_user_does_not_keep_the_owners_cursor_alive() {
    // The control for the test above: the emulator really keys sessions by
    // user. Alice's cursor is refreshed by bob (same lsid, wrong user) and dies.
    let emulator = EmulatorConfig {
        users: users(),
        session_timeout: SERVER_TIMEOUT,
        ..EmulatorConfig::default()
    };
    let g = Guarded::start(emulator, SessionConfig::default()).await;
    let proxy = g.stack.proxy.local_addr();
    let alice = Client::with_uri_str(uri(proxy, ALICE, "")).await.unwrap();
    let bob = Client::with_uri_str(uri(proxy, BOB, "")).await.unwrap();
    let rows = alice.database("app").collection::<Document>("rows");
    rows.insert_many((0..20).map(|i| doc! { "_id": i }).collect::<Vec<_>>())
        .await
        .unwrap();
    let mut session = alice.start_session().await.unwrap();
    let lsid = session.id().clone();
    let options = FindOptions::builder().batch_size(4).build();
    let mut cursor = rows
        .find(doc! {})
        .with_options(options)
        .session(&mut session)
        .await
        .unwrap();
    assert!(cursor.advance(&mut session).await.unwrap());
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        bob.database("admin")
            .run_command(doc! { "refreshSessions": [lsid.clone()] })
            .await
            .unwrap();
    }
    let mut err = None;
    for _ in 0..20 {
        match cursor.advance(&mut session).await {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("alice's session expired: bob's refreshes were not hers");
    match *err.kind {
        mongodb::error::ErrorKind::Command(ref e) => assert_eq!(e.code, 43, "{e:?}"),
        ref other => panic!("expected CursorNotFound, got {other:?}"),
    }
    drop(cursor);
    drop(session);
    alice.shutdown().await;
    bob.shutdown().await;
    g.stop().await;
}
