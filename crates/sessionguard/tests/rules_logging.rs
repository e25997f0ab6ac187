//! The violation log line: one structured event per violation with the
//! evidence of both requests, and never any document contents or
//! authentication payloads. Its own test binary with a single test, because
//! `tracing`'s per-callsite interest cache is process-global: a scoped
//! subscriber in a multi-threaded test run can miss events.

use sessionguard_test_support as common;

use bson::spec::BinarySubtype;
use bson::{rawdoc, Binary, RawDocumentBuf};
use common::engine_reply as reply;
use common::lsid_raw as lsid;
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};
use sessionguard_proxy::CloseCause;

fn send(engine: &SessionEngine, conn: u64, id: i32, doc: &RawDocumentBuf, now: u64) {
    common::engine_request(engine, conn, id, doc, 0, now);
}

fn connect_and_authenticate(engine: &SessionEngine, conn: u64) {
    engine.connect(
        conn,
        "10.1.1.1:50000".parse().unwrap(),
        "127.0.0.1:27018".parse().unwrap(),
        false,
    );
    let hello = rawdoc! {
        "hello": 1,
        "client": { "driver": { "name": "mongo-rust-driver", "version": "3.3.0" }, "application": { "name": "web" } },
        "$db": "admin",
    };
    send(engine, conn, 1, &hello, 0);
    reply(
        engine,
        conn,
        1,
        &rawdoc! { "isWritablePrimary": true, "ok": 1.0 },
        0,
    );
    let sasl = rawdoc! {
        "saslStart": 1, "mechanism": "SCRAM-SHA-256",
        "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"n,,n=alice,r=NONCE-SECRET-123".to_vec() },
        "$db": "admin",
    };
    send(engine, conn, 2, &sasl, 0);
    reply(
        engine,
        conn,
        2,
        &rawdoc! { "done": true, "conversationId": 1, "ok": 1.0 },
        0,
    );
}

#[test]
fn violation_log_lines_carry_evidence_but_never_document_contents() {
    // Global, not per thread: see the module comment.
    let log = common::ThreadLogs::default();
    tracing::subscriber::set_global_default(log.subscriber(tracing::Level::TRACE))
        .expect("the only subscriber in this test binary");

    let engine = SessionEngine::new(&SessionConfig::default(), &RulesConfig::default());
    connect_and_authenticate(&engine, 1);
    connect_and_authenticate(&engine, 2);
    let secret = rawdoc! {
        "insert": "users", "documents": [{ "password": "hunter2-do-not-log" }],
        "lsid": lsid(5), "txnNumber": 1_i64, "$db": "app",
    };
    send(&engine, 1, 10, &secret, 1);
    send(
        &engine,
        2,
        11,
        &rawdoc! { "find": "orders", "filter": { "card": "4111-SECRET" }, "lsid": lsid(5), "$db": "shop" },
        2,
    );
    common::engine_close(&engine, 1, CloseCause::ClientClosed, 3);
    assert_eq!(engine.violations().len(), 2);

    let text = log.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sessionguard::violation"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let concurrent = lines[0];
    assert!(concurrent.contains("ERROR"), "{concurrent}");
    assert!(
        concurrent.contains("rule=\"concurrent-use\""),
        "{concurrent}"
    );
    assert!(concurrent.contains("lsid=05050505"), "{concurrent}");
    assert!(concurrent.contains("owner=\"alice@admin\""), "{concurrent}");
    assert!(concurrent.contains("conn=2 request_id=11"), "{concurrent}");
    assert!(
        concurrent.contains("peer=\"10.1.1.1:50000\""),
        "{concurrent}"
    );
    assert!(concurrent.contains("app=\"web\""), "{concurrent}");
    assert!(
        concurrent.contains("driver=\"mongo-rust-driver\""),
        "{concurrent}"
    );
    assert!(
        concurrent.contains("command=\"find\" ns=\"shop.orders\""),
        "{concurrent}"
    );
    assert!(
        concurrent.contains("other_conn=1 other_request_id=10"),
        "{concurrent}"
    );
    assert!(
        concurrent.contains("other_command=\"insert\" other_ns=\"app.users\" other_txn_number=1"),
        "{concurrent}"
    );
    let closed = lines[1];
    assert!(closed.contains("WARN"), "{closed}");
    assert!(
        closed.contains("rule=\"closed-with-requests-in-flight\""),
        "{closed}"
    );
    assert!(
        !closed.contains(" app="),
        "absent evidence is omitted: {closed}"
    );
    for secret in ["hunter2", "NONCE-SECRET", "4111"] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into the log: {text}"
        );
    }
}
