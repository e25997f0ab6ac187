//! Admin security and secrecy, with the real `sessionguard` binary where it
//! matters: the admin server binds loopback unless told otherwise; with a
//! token, `/sessions` and `/violations` (and `/readyz`) need it and nothing
//! else gets in; and an authenticated run (SCRAM users on the emulator, the
//! Rust driver writing a distinctive marker into documents, filters, an
//! error message, a violation and a malformed frame) leaves no password,
//! token, SCRAM payload or document content in the binary's logs (at
//! `trace`), its JSON report or any admin API answer.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bson::{doc, Document};
use mongodb::options::FindOptions;
use mongodb::Client;
use sessionguard::config::{Config, ProxyConfig, DEFAULT_ADMIN};
use sessionguard_emulator::{Emulator, EmulatorConfig};
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};
use tokio::io::AsyncWriteExt;

use common::http_get;

const WAIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "adm1n-T0ken-d0-not-le4k-4242";
const USER: &str = "appuser";
const PASSWORD: &str = "Pa55word-never-logged-7731";
const UPSTREAM_PASSWORD: &str = "Upstream-cred-never-logged-9182";
/// Put into document values, field names, filters and an error message.
const MARKER: &str = "ZQX-confidential-marker-5530";

#[test]
fn admin_binds_loopback_by_default() {
    let default: SocketAddr = DEFAULT_ADMIN.parse().expect("a socket address");
    assert!(default.ip().is_loopback(), "{DEFAULT_ADMIN}");
    let admin: SocketAddr = ProxyConfig::default().admin.parse().unwrap();
    assert!(admin.ip().is_loopback());
    // An empty configuration file keeps it.
    let empty = Config::parse("").unwrap();
    let admin: SocketAddr = empty.proxy.admin.parse().unwrap();
    assert!(admin.ip().is_loopback());
    // The documented example file does not widen it either.
    let example =
        Config::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/sessionguard.toml"))
            .expect("the example config parses");
    let admin: SocketAddr = example.proxy.admin.parse().unwrap();
    assert!(admin.ip().is_loopback(), "{}", example.proxy.admin);
    // What the binary would bind with no flag, no env, no file.
    let printed = common::sessionguard_command()
        .args(["proxy", "--print-config"])
        .output()
        .expect("the binary runs");
    assert!(printed.status.success());
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(
        text.lines()
            .any(|l| l.trim() == "admin = \"127.0.0.1:9216\""),
        "{text}"
    );
}

/// Starts the proxy with its admin API on `admin` and returns its log up to
/// the "admin server listening" line (the warning, if any, comes right after
/// it, so the next line is included).
fn admin_start_log(admin: &str, token: Option<&str>) -> String {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut command = common::sessionguard_command();
    command
        .args(["proxy", "--listen", "127.0.0.1:0", "--admin", admin])
        .args(["--upstream", "mongodb://127.0.0.1:9"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    // The token has no flag: it only comes from the configuration file.
    let config = tempfile::NamedTempFile::new().expect("a temporary file");
    if let Some(token) = token {
        std::fs::write(
            config.path(),
            format!("[proxy]\nadmin_token = \"{token}\"\n"),
        )
        .expect("the config is written");
        command.arg("--config").arg(config.path());
    }
    let mut child = command.spawn().expect("the binary runs");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let mut listening = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        // After the listening line, a short wait for the warning that follows it.
        let wait = if listening {
            left.min(Duration::from_millis(500))
        } else {
            left
        };
        let Ok(line) = lines_rx.recv_timeout(wait) else {
            break;
        };
        log.push_str(&line);
        log.push('\n');
        listening |= line.contains("admin server listening");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening, "the admin server never started:\n{log}");
    log
}

#[test]
fn an_admin_api_beyond_loopback_without_a_token_is_warned_about() {
    let open = admin_start_log("0.0.0.0:0", None);
    assert!(
        open.contains("without proxy.admin_token"),
        "no warning for an open admin API:\n{open}"
    );
    let guarded = admin_start_log("0.0.0.0:0", Some("a-long-enough-admin-token-123"));
    assert!(!guarded.contains("without proxy.admin_token"), "{guarded}");
    let local = admin_start_log("127.0.0.1:0", None);
    assert!(!local.contains("without proxy.admin_token"), "{local}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_guards_sessions_violations_and_readyz_and_nothing_else_gets_in() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .unwrap();
    let engine = std::sync::Arc::new(SessionEngine::new(
        &SessionConfig::default(),
        &RulesConfig::default(),
    ));
    let proxy = common::guarded_proxy(emulator.addr(), engine.clone(), |_| {}).await;
    let (admin, admin_stop) =
        common::admin_for(&proxy, Some(engine), emulator.addr(), Some(TOKEN)).await;
    let addr = admin.local_addr;
    assert!(addr.ip().is_loopback());

    let client = Client::with_uri_str(format!(
        "mongodb://{}/?directConnection=true",
        proxy.local_addr()
    ))
    .await
    .unwrap();
    client
        .database("app")
        .collection::<Document>("c")
        .insert_one(doc! { "x": 1 })
        .await
        .unwrap();

    let same_length_wrong: String = TOKEN.chars().rev().collect::<String>();
    assert_eq!(same_length_wrong.len(), TOKEN.len());
    let prefix = &TOKEN[..TOKEN.len() - 1];
    let longer = format!("{TOKEN}x");
    for path in [
        "/sessions",
        "/violations",
        "/readyz",
        "/sessions?state=active",
    ] {
        for (what, token) in [
            ("no token", None),
            (
                "a wrong token of the same length",
                Some(same_length_wrong.as_str()),
            ),
            ("a prefix of the token", Some(prefix)),
            ("the token plus a byte", Some(longer.as_str())),
            ("an empty token", Some("")),
        ] {
            let reply = http_get(addr, path, token).await;
            assert_eq!(reply.status, 401, "{path} with {what}: {}", reply.body);
            assert!(
                !reply.body.contains('{') && !reply.body.contains("lsid"),
                "{path} with {what} leaked a body: {}",
                reply.body
            );
        }
        // The token in the query string or under another scheme is not a token.
        let query = http_get(addr, &format!("{path}?token={TOKEN}"), None).await;
        assert_eq!(
            query.status, 401,
            "{path} with the token as a query parameter"
        );
        let basic = raw_get(addr, path, &format!("Authorization: Basic {TOKEN}")).await;
        assert!(
            basic.starts_with("HTTP/1.1 401"),
            "{path} with Basic: {basic}"
        );
        // The right token, with the scheme in any case, gets in.
        assert_eq!(
            http_get(addr, path, Some(TOKEN)).await.status,
            200,
            "{path}"
        );
        let lower = raw_get(addr, path, &format!("Authorization: bearer {TOKEN}")).await;
        assert!(lower.starts_with("HTTP/1.1 200"), "{path}: {lower}");
    }
    // Liveness and metrics stay open (scrapers and probes carry no token),
    // and neither shows the token.
    for path in ["/healthz", "/metrics"] {
        let reply = http_get(addr, path, None).await;
        assert_eq!(reply.status, 200, "{path}");
        assert!(!reply.body.contains(TOKEN), "{path} shows the token");
    }

    client.shutdown().await;
    proxy.shutdown_now();
    proxy.wait().await;
    admin_stop.cancel();
    emulator.shutdown().await;
}

/// A GET with one extra raw header line; returns the whole response.
async fn raw_get(addr: SocketAddr, path: &str, header: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{header}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut raw))
        .await
        .expect("admin answers")
        .unwrap();
    raw
}

// ------------------------------------------------------------ the binary

/// Every text form a byte string could take in a log line.
fn forms(secret: &[u8]) -> Vec<String> {
    use base64::Engine;
    let mut out = vec![
        base64::engine::general_purpose::STANDARD.encode(secret),
        secret.iter().map(|b| format!("{b:02x}")).collect(),
    ];
    if let Ok(text) = std::str::from_utf8(secret) {
        out.push(text.to_string());
    }
    out.retain(|form| form.len() >= 12);
    out
}

/// The SCRAM payloads (`payload` binaries of saslStart / saslContinue and
/// of hello's speculativeAuthenticate) among frames a server received.
fn scram_payloads(frames: &[bytes::Bytes]) -> Vec<Vec<u8>> {
    use sessionguard_protocol::wire::{self, Frame, FrameCodec, Message};
    let mut payloads = Vec::new();
    let mut collect = |document: &Document| {
        if let Ok(payload) = document.get_binary_generic("payload") {
            payloads.push(payload.clone());
        }
    };
    for bytes in frames {
        let mut buffer = bytes::BytesMut::from(&bytes[..]);
        let Ok(Some(frame)) = FrameCodec::default().decode(&mut buffer) else {
            continue;
        };
        let frame: Frame = frame;
        let Ok(opened) = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE) else {
            continue;
        };
        let body = match opened.parse(&frame) {
            Ok(Message::Msg(m)) => Document::try_from(m.body).ok(),
            Ok(Message::Query(q)) => Document::try_from(q.query).ok(),
            _ => None,
        };
        let Some(body) = body else { continue };
        collect(&body);
        if let Ok(speculative) = body.get_document("speculativeAuthenticate") {
            collect(speculative);
        }
    }
    payloads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_run_leaves_no_secret_or_content_in_logs_report_or_admin_api() {
    let emulator = Emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            users: vec![(USER.to_string(), PASSWORD.to_string())],
            record_frames: true,
            ..EmulatorConfig::default()
        },
    )
    .await
    .unwrap();
    let mut proxy = common::ProxyProcess::start(
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             upstream = \"mongodb://svc:{UPSTREAM_PASSWORD}@{}/?authSource=admin\"\n\
             admin_token = \"{TOKEN}\"\n\
             [log]\nformat = \"json\"\nlevel = \"trace\"\n",
            emulator.addr()
        ),
        &["--report", "{dir}/report.json"],
    );
    let report = proxy.dir.path().join("report.json");
    let (listen, admin) = (proxy.listen, proxy.admin);
    assert!(admin.ip().is_loopback());

    // A wrong password first: refused upstream, passed back.
    let wrong = Client::with_uri_str(format!(
        "mongodb://{USER}:wrong-{PASSWORD}@{listen}/?directConnection=true&serverSelectionTimeoutMS=3000"
    ))
    .await
    .unwrap();
    wrong
        .database("app")
        .collection::<Document>("c")
        .insert_one(doc! { "x": 1 })
        .await
        .expect_err("a wrong password is refused");
    wrong.shutdown().await;

    let client = Client::with_uri_str(format!(
        "mongodb://{USER}:{PASSWORD}@{listen}/?directConnection=true&appName=secure-app"
    ))
    .await
    .unwrap();
    let items = client.database("app").collection::<Document>("items");
    let field = format!("f_{MARKER}");
    let docs: Vec<Document> = (0..20)
        .map(|i| doc! { "_id": i, "note": MARKER, &field: i, "nested": { "deep": MARKER } })
        .collect();
    items.insert_many(docs).await.unwrap();
    let options = FindOptions::builder().batch_size(3).build();
    let mut cursor = items
        .find(doc! { "note": MARKER })
        .with_options(options)
        .await
        .unwrap();
    let mut read = 0;
    while cursor.advance().await.unwrap() {
        read += 1;
    }
    assert_eq!(read, 20);
    items
        .update_many(
            doc! { "note": MARKER },
            doc! { "$set": { "again": MARKER } },
        )
        .await
        .unwrap();
    // An error reply that quotes the document (E11000 ... dup key).
    let dup_id = format!("{MARKER}-dup");
    items.insert_one(doc! { "_id": &dup_id }).await.unwrap();
    items
        .insert_one(doc! { "_id": &dup_id })
        .await
        .expect_err("duplicate key");
    // A transaction.
    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    items
        .insert_one(doc! { "_id": "in-txn", "note": MARKER })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();
    // A violation, with evidence: a killed session used again.
    let mut killed = client.start_session().await.unwrap();
    items
        .find_one(doc! { "note": MARKER })
        .session(&mut killed)
        .await
        .unwrap();
    client
        .database("admin")
        .run_command(doc! { "killSessions": [killed.id().clone()] })
        .await
        .unwrap();
    items
        .find_one(doc! { "note": MARKER })
        .session(&mut killed)
        .await
        .unwrap();
    // A malformed frame that carries the marker (the body's BSON is cut).
    let mut bad = tokio::net::TcpStream::connect(listen).await.unwrap();
    let mut body = bson::to_vec(&doc! { "insert": "items", "note": MARKER, "$db": "app" }).unwrap();
    body.pop();
    let mut frame = Vec::new();
    let length = i32::try_from(16 + 5 + body.len()).unwrap();
    for value in [length, 1, 0, 2013] {
        frame.extend_from_slice(&value.to_le_bytes());
    }
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.push(0);
    frame.extend_from_slice(&body);
    bad.write_all(&frame).await.unwrap();
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut bad, &mut sink)).await;

    // The admin API, as an operator would read it.
    let mut admin_text = String::new();
    for path in [
        "/violations",
        "/sessions",
        "/sessions?state=ended",
        "/metrics",
        "/readyz",
        "/healthz",
    ] {
        let reply = http_get(admin, path, Some(TOKEN)).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        admin_text.push_str(&reply.body);
    }
    assert!(
        admin_text.contains("use-after-end") && admin_text.contains("app.items"),
        "the admin API shows the violation and its namespace"
    );

    drop(cursor);
    drop(session);
    drop(killed);
    client.shutdown().await;
    proxy.terminate();

    let logs = proxy.log_text();
    let report_text = std::fs::read_to_string(&report).expect("the report was written");
    // The run really was logged and reported (so the checks below mean something).
    assert!(logs.lines().count() > 20, "{logs}");
    for expected in ["\"user\":\"appuser@admin\"", "use-after-end", "malformed"] {
        assert!(
            logs.contains(expected),
            "the log never mentions {expected}:\n{logs}"
        );
    }
    assert!(report_text.contains("use-after-end"), "{report_text}");

    let mut secrets: Vec<(String, String)> = vec![
        ("the document marker".into(), MARKER.into()),
        ("the password".into(), PASSWORD.into()),
        ("the upstream password".into(), UPSTREAM_PASSWORD.into()),
        ("the admin token".into(), TOKEN.into()),
    ];
    for form in forms(MARKER.as_bytes()) {
        secrets.push(("the marker, encoded".into(), form));
    }
    let payloads = scram_payloads(&emulator.received_frames());
    assert!(
        payloads.len() >= 2,
        "the emulator saw no SCRAM conversation ({} payloads)",
        payloads.len()
    );
    for payload in &payloads {
        for form in forms(payload) {
            secrets.push(("a SCRAM payload".into(), form));
        }
    }
    for (what, secret) in &secrets {
        for (place, text) in [
            ("the log", &logs),
            ("the JSON report", &report_text),
            ("the admin API", &admin_text),
        ] {
            if *what == "the admin token" && place == "the admin API" {
                continue; // the operator sent it; it is the one place it may be
            }
            assert!(
                !text.contains(secret.as_str()),
                "{what} (`{secret}`) appears in {place}"
            );
        }
    }
    emulator.shutdown().await;
}
