//! The engine's unit tests, and the helpers other modules' tests drive the
//! engine with (`TestEngine` keeps the `PendingRequest`s as the proxy would).

use super::*;
use crate::config::Mode;
use bson::spec::BinarySubtype;
use bson::{rawdoc, Binary, RawDocumentBuf};
use sessionguard_protocol::wire::op_msg::encode;
use sessionguard_protocol::wire::{MsgFlags, OpMsg, HEADER_LEN};

use crate::outcome::{Refusal, SessionCommand};
use crate::state::{OwnerId, SessionKey};
use crate::violation::{Action, RuleId, Severity, SESSIONGUARD_VIOLATION_CODE};
use sessionguard_protocol::command::Lsid;
use sessionguard_protocol::wire::Message;

pub(crate) const PEER: &str = "10.1.1.1:50000";
const LISTENER: &str = "127.0.0.1:27018";

pub(crate) fn lsid(n: u8) -> RawDocumentBuf {
    rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![n; 16] } }
}

/// The engine as the tests drive it, with the caller's side of the seam:
/// the `PendingRequest`s it hands out are kept here, as the proxy keeps
/// them with its in-flight records, given back with their replies and,
/// at close, as what is still in flight. Its `request_at` / `reply_at` /
/// `close_at` shadow the engine's; everything else derefs to it.
pub(crate) struct TestEngine {
    engine: SessionEngine,
    /// (connection, request id, record), oldest first.
    in_flight: std::sync::Mutex<Vec<(u64, i32, PendingRequest)>>,
}

impl std::ops::Deref for TestEngine {
    type Target = SessionEngine;
    fn deref(&self) -> &SessionEngine {
        &self.engine
    }
}

impl TestEngine {
    fn table(&self) -> std::sync::MutexGuard<'_, Vec<(u64, i32, PendingRequest)>> {
        self.in_flight.lock().unwrap()
    }

    pub(crate) fn request_at(
        &self,
        conn: u64,
        request_id: i32,
        message: &Message<'_>,
        now: Millis,
    ) -> Decision {
        let (decision, pending) = self.engine.request_at(conn, request_id, message, now);
        if let Some(pending) = pending {
            assert_eq!(
                decision,
                Decision::Forward,
                "a rejected request has no record"
            );
            self.table().push((conn, request_id, pending));
        }
        decision
    }

    /// A reply to the latest request `to` of `conn` (as the proxy
    /// matches it); none is shown to the engine if nothing matches.
    pub(crate) fn reply_at(&self, conn: u64, to: i32, message: &Message<'_>, now: Millis) {
        let more_to_come = matches!(message, Message::Msg(m) if m.flags.more_to_come());
        let mut table = self.table();
        let Some(position) = table.iter().rposition(|(c, id, _)| (*c, *id) == (conn, to)) else {
            return;
        };
        self.engine
            .reply_at(conn, &mut table[position].2, message, now);
        if !more_to_come {
            table.remove(position);
        }
    }

    pub(crate) fn close_at(&self, conn: u64, cause: CloseCause, now: Millis) {
        let table = std::mem::take(&mut *self.table());
        let (left, kept): (Vec<_>, Vec<_>) = table.into_iter().partition(|(c, _, _)| *c == conn);
        *self.table() = kept;
        self.engine
            .close_at(conn, cause, left.into_iter().map(|(_, _, p)| p), now);
    }
}

pub(crate) fn engine_with(config: SessionConfig, rules: RulesConfig) -> TestEngine {
    TestEngine {
        engine: SessionEngine::new(&config, &rules),
        in_flight: std::sync::Mutex::new(Vec::new()),
    }
}

fn engine() -> TestEngine {
    engine_with(SessionConfig::default(), RulesConfig::default())
}

pub(crate) fn connect(engine: &TestEngine, conn: u64, peer: &str, app: &str) {
    // Refreshes may be planned on it (the tests hand the engine their
    // outcomes).
    engine.connect(conn, peer.parse().unwrap(), LISTENER.parse().unwrap(), true);
    let hello = rawdoc! {
        "hello": 1,
        "client": { "driver": { "name": "mongo-rust-driver", "version": "3.3.0" }, "application": { "name": app } },
        "$db": "admin",
    };
    assert_eq!(send(engine, conn, 1, &hello, 0, 0), Decision::Forward);
    reply(
        engine,
        conn,
        1,
        &rawdoc! { "isWritablePrimary": true, "logicalSessionTimeoutMinutes": 30, "ok": 1.0 },
        0,
    );
}

pub(crate) fn send(
    engine: &TestEngine,
    conn: u64,
    id: i32,
    doc: &RawDocumentBuf,
    flags: u32,
    now: Millis,
) -> Decision {
    let frame = encode(id, 0, MsgFlags(flags), doc.as_bytes());
    let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
    engine.request_at(conn, id, &Message::Msg(msg), now)
}

pub(crate) fn reply(engine: &TestEngine, conn: u64, to: i32, doc: &RawDocumentBuf, now: Millis) {
    let frame = encode(9000 + to, to, MsgFlags(0), doc.as_bytes());
    let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
    engine.reply_at(conn, to, &Message::Msg(msg), now);
}

/// Sends `doc` and answers it with `answer`, both at `at`.
pub(crate) fn exchange(
    engine: &TestEngine,
    conn: u64,
    id: i32,
    doc: &RawDocumentBuf,
    answer: &RawDocumentBuf,
    at: Millis,
) {
    send(engine, conn, id, doc, 0, at);
    reply(engine, conn, id, answer, at);
}

pub(crate) fn ok() -> RawDocumentBuf {
    rawdoc! { "ok": 1.0 }
}

pub(crate) fn rules_fired(engine: &SessionEngine) -> Vec<RuleId> {
    engine.violations().iter().map(|v| v.rule).collect()
}

pub(crate) fn insert(session: u8, txn: i64, value: i32) -> RawDocumentBuf {
    rawdoc! { "insert": "orders", "documents": [{ "v": value }], "lsid": lsid(session), "txnNumber": txn, "$db": "shop" }
}

pub(crate) fn find(session: u8) -> RawDocumentBuf {
    rawdoc! { "find": "orders", "filter": {}, "lsid": lsid(session), "$db": "shop" }
}

#[test]
fn sequential_pooled_sessions_across_connections_raise_nothing() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, "10.1.1.1:50001", "web");
    let mut txn = 0;
    for round in 0..20 {
        let conn = 1 + (round % 2);
        txn += 1;
        assert_eq!(
            send(
                &engine,
                conn,
                10 + round as i32,
                &insert(1, txn, round as i32),
                0,
                round
            ),
            Decision::Forward
        );
        reply(&engine, conn, 10 + round as i32, &ok(), round);
        send(&engine, conn, 100 + round as i32, &find(1), 0, round);
        reply(
            &engine,
            conn,
            100 + round as i32,
            &rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 },
            round,
        );
    }
    assert_eq!(rules_fired(&engine), vec![]);
    assert_eq!(engine.stats().requests_inspected, 20 * 2 + 2);
}

#[test]
fn overlapping_use_is_concurrent_use_with_both_requests_in_evidence() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, "10.1.1.1:50001", "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    send(&engine, 2, 20, &insert(3, 1, 1), 0, 150);
    let violations = engine.violations();
    assert_eq!(violations.len(), 1);
    let v = &violations[0];
    assert_eq!(v.rule, RuleId::ConcurrentUse);
    assert_eq!(v.severity, Severity::Error);
    assert!(!v.rejected);
    let current = v.current.as_ref().unwrap();
    let earlier = v.earlier.as_ref().unwrap();
    assert_eq!((current.connection_id, current.request_id), (2, 20));
    assert_eq!((earlier.connection_id, earlier.request_id), (1, 10));
    assert_eq!(current.command, "insert");
    assert_eq!(earlier.command, "find");
    assert_eq!(current.namespace, "shop.orders");
    assert_eq!(current.app_name.as_deref(), Some("web"));
    assert_eq!(current.driver.as_deref(), Some("mongo-rust-driver"));
    assert_eq!(current.peer.as_deref(), Some("10.1.1.1:50001"));
    assert_eq!(current.txn_number, Some(1));
    assert_eq!(v.lsid, "03030303-0303-0303-0303-030303030303");
    assert_eq!(
        engine.violation_counts()[RuleId::ConcurrentUse.index()].1,
        1
    );
}

#[test]
fn enforce_rejects_with_the_documented_error_and_does_not_record_the_request() {
    let config = SessionConfig {
        mode: Mode::Enforce,
        ..SessionConfig::default()
    };
    let engine = engine_with(config, RulesConfig::default());
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, "10.1.1.1:50001", "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    let Decision::Reject { reply: body } = send(&engine, 2, 20, &insert(3, 1, 1), 0, 150) else {
        panic!("expected a rejection");
    };
    let doc = bson::RawDocument::from_bytes(&body).unwrap();
    assert_eq!(doc.get_f64("ok").unwrap(), 0.0);
    assert_eq!(doc.get_i32("code").unwrap(), SESSIONGUARD_VIOLATION_CODE);
    assert_eq!(doc.get_str("codeName").unwrap(), "SessionGuardViolation");
    assert!(doc
        .get_str("errmsg")
        .unwrap()
        .starts_with("sessionguard: concurrent-use: "));
    assert!(doc.get("errorLabels").unwrap().is_none());
    assert!(engine.violations()[0].rejected);
    // The rejected insert never became part of the session: its txnNumber
    // is not "used", and the first request's reply leaves nothing in flight.
    reply(
        &engine,
        1,
        10,
        &rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 },
        200,
    );
    assert_eq!(
        send(&engine, 2, 21, &insert(3, 1, 1), 0, 250),
        Decision::Forward
    );
    // Warnings are logged, not rejected, in enforce mode.
    let w0 = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(4), "writeConcern": { "w": 0 }, "$db": "d" };
    assert_eq!(send(&engine, 1, 30, &w0, 0, 300), Decision::Forward);
    assert_eq!(
        engine.violations().last().unwrap().rule,
        RuleId::UnacknowledgedWithSession
    );
}

#[test]
fn reject_is_impossible_without_a_reply_so_more_to_come_is_forwarded() {
    let mut rules = RulesConfig::default();
    rules.rules.insert(
        "concurrent-use".into(),
        crate::config::RuleOverride {
            action: Some(Action::Reject),
            ..Default::default()
        },
    );
    let engine = engine_with(SessionConfig::default(), rules);
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    let insert = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(3), "$db": "d" };
    assert_eq!(
        send(&engine, 2, 20, &insert, MsgFlags::MORE_TO_COME, 110),
        Decision::Forward
    );
    let fired = engine.violations();
    assert!(fired
        .iter()
        .any(|v| v.rule == RuleId::ConcurrentUse && !v.rejected));
}

#[test]
fn node_client_close_with_end_sessions_unread_is_not_misuse() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 10, &insert(5, 1, 1), 0, 0);
    reply(&engine, 1, 10, &ok(), 1);
    let end = rawdoc! { "endSessions": [lsid(5), lsid(6)], "$db": "admin" };
    send(&engine, 1, 11, &end, 0, 2);
    let kill =
        rawdoc! { "killCursors": "orders", "cursors": [77_i64], "lsid": lsid(5), "$db": "shop" };
    send(&engine, 1, 12, &kill, 0, 2);
    engine.close_at(1, CloseCause::ClientClosed, 3);
    assert_eq!(rules_fired(&engine), vec![]);
}

#[test]
fn closing_with_a_write_in_flight_is_a_warning() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 10, &insert(5, 1, 1), 0, 0);
    engine.close_at(1, CloseCause::ClientClosed, 50);
    let fired = engine.violations();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].rule, RuleId::ClosedWithRequestsInFlight);
    assert_eq!(fired[0].severity, Severity::Warning);
    // The session has nothing in flight any more: the next use is clean.
    connect(&engine, 2, PEER, "web");
    send(&engine, 2, 1, &insert(5, 2, 2), 0, 60);
    assert_eq!(engine.violations().len(), 1);
}

#[test]
fn use_after_end_and_end_while_in_flight() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &insert(7, 1, 1), 0, 0);
    // Ended while the insert is still running.
    send(
        &engine,
        2,
        20,
        &rawdoc! { "endSessions": [lsid(7)], "$db": "admin" },
        0,
        5,
    );
    reply(&engine, 1, 10, &ok(), 6);
    reply(&engine, 2, 20, &ok(), 6);
    // Used again later.
    send(&engine, 1, 11, &find(7), 0, 1_000);
    assert_eq!(
        rules_fired(&engine),
        vec![RuleId::EndWhileInFlight, RuleId::UseAfterEnd]
    );
    // Observe mode: the server started a new session, later uses are fine.
    reply(
        &engine,
        1,
        11,
        &rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 },
        1_001,
    );
    send(&engine, 1, 12, &insert(7, 2, 2), 0, 1_002);
    assert_eq!(engine.violations().len(), 2);
}

#[test]
fn kill_sessions_and_kill_all_sessions_mark_sessions_killed() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 10, &insert(1, 1, 1), 0, 0);
    reply(&engine, 1, 10, &ok(), 0);
    send(&engine, 1, 11, &insert(2, 1, 1), 0, 0);
    reply(&engine, 1, 11, &ok(), 0);
    send(
        &engine,
        1,
        12,
        &rawdoc! { "killSessions": [lsid(1)], "$db": "admin" },
        0,
        1,
    );
    reply(&engine, 1, 12, &ok(), 1);
    send(&engine, 1, 13, &find(1), 0, 2);
    reply(&engine, 1, 13, &ok(), 2);
    send(
        &engine,
        1,
        14,
        &rawdoc! { "killAllSessions": [], "$db": "admin" },
        0,
        3,
    );
    reply(&engine, 1, 14, &ok(), 3);
    send(&engine, 1, 15, &find(2), 0, 4);
    let fired = engine.violations();
    assert_eq!(
        fired.iter().map(|v| v.rule).collect::<Vec<_>>(),
        vec![RuleId::UseAfterEnd, RuleId::UseAfterEnd]
    );
    assert!(fired[0].message.contains("killSessions"));
    assert!(fired[1].message.contains("killAllSessions"));
}

/// The first SCRAM step of user `alice`, as drivers send it.
fn sasl_start_as_alice() -> RawDocumentBuf {
    rawdoc! {
        "saslStart": 1, "mechanism": "SCRAM-SHA-256",
        "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"n,,n=alice,r=abc".to_vec() },
        "$db": "admin",
    }
}

#[test]
fn kill_all_sessions_by_user_kills_only_that_owners_sessions() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 2, &sasl_start_as_alice(), 0, 0);
    reply(
        &engine,
        1,
        2,
        &rawdoc! { "conversationId": 1, "done": true, "ok": 1.0 },
        0,
    );
    // An unauthenticated connection: same lsid, another server session.
    connect(&engine, 2, PEER, "web");
    for (conn, id) in [(1, 10), (2, 10)] {
        send(&engine, conn, id, &find(1), 0, 1);
        reply(&engine, conn, id, &ok(), 1);
    }
    let kill = |user: &str, id: i32, at: Millis| {
        send(
            &engine,
            2,
            id,
            &rawdoc! { "killAllSessions": [{ "user": user, "db": "admin" }], "$db": "admin" },
            0,
            at,
        );
        reply(&engine, 2, id, &ok(), at);
    };
    // A user the proxy never saw matches nothing.
    kill("mallory", 11, 2);
    send(&engine, 1, 12, &find(1), 0, 3);
    reply(&engine, 1, 12, &ok(), 3);
    assert_eq!(rules_fired(&engine), vec![]);
    kill("alice", 13, 4);
    send(&engine, 2, 14, &find(1), 0, 5);
    reply(&engine, 2, 14, &ok(), 5);
    assert_eq!(rules_fired(&engine), vec![]);
    send(&engine, 1, 15, &find(1), 0, 6);
    assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd]);
}

// ---- judged by outcome (issue 12) ----

fn enforcing() -> TestEngine {
    engine_with(
        SessionConfig {
            mode: Mode::Enforce,
            ..SessionConfig::default()
        },
        RulesConfig::default(),
    )
}

/// The refusals real servers answer kill commands with: Unauthorized
/// (a user without killAnySession), CommandNotFound, CommandNotSupported
/// (Microsoft DocumentDB and the servers built on it), AtlasError (Atlas
/// shared tiers).
fn refusals() -> Vec<RawDocumentBuf> {
    vec![
        rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized", "errmsg": "not authorized on admin to execute command" },
        rawdoc! { "ok": 0.0, "code": 59, "codeName": "CommandNotFound", "errmsg": "no such command" },
        rawdoc! { "ok": 0.0, "code": 115, "codeName": "CommandNotSupported", "errmsg": "Unknown request received: killSessions" },
        rawdoc! { "ok": 0.0, "code": 8000, "codeName": "AtlasError", "errmsg": "killAllSessions is not allowed in this atlas tier" },
    ]
}

fn kills() -> Vec<RawDocumentBuf> {
    vec![
        rawdoc! { "killSessions": [lsid(1)], "$db": "admin" },
        rawdoc! { "killAllSessions": [], "$db": "admin" },
        rawdoc! { "killAllSessionsByPattern": [{}], "$db": "admin" },
        rawdoc! { "killAllSessionsByPattern": [{ "lsid": lsid(1) }], "$db": "admin" },
    ]
}

#[test]
fn a_refused_kill_ends_nothing_and_enforce_lets_the_next_request_through() {
    for refusal in refusals() {
        for kill in kills() {
            let engine = enforcing();
            connect(&engine, 1, PEER, "web");
            exchange(&engine, 1, 10, &insert(1, 1, 1), &ok(), 0);
            exchange(&engine, 1, 11, &kill, &refusal, 2);
            let next = send(&engine, 1, 12, &find(1), 0, 4);
            assert_eq!(next, Decision::Forward, "{kill:?} refused with {refusal:?}");
            reply(&engine, 1, 12, &ok(), 5);
            assert_eq!(
                rules_fired(&engine),
                vec![],
                "{kill:?} refused with {refusal:?}"
            );
            assert_eq!(engine.stats().sessions_killed, 0);
        }
    }
}

#[test]
fn a_confirmed_kill_is_use_after_end_and_enforce_rejects_the_next_use() {
    for kill in kills() {
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        exchange(&engine, 1, 10, &insert(1, 1, 1), &ok(), 0);
        exchange(&engine, 1, 11, &kill, &ok(), 2);
        assert!(
            matches!(
                send(&engine, 1, 12, &find(1), 0, 4),
                Decision::Reject { .. }
            ),
            "{kill:?}"
        );
        assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd], "{kill:?}");
        assert!(engine.violations()[0].rejected);
    }
}

#[test]
fn a_session_is_not_ended_before_the_server_answers_end_sessions() {
    let engine = enforcing();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    exchange(&engine, 1, 10, &find(1), &ok(), 0);
    send(
        &engine,
        2,
        20,
        &rawdoc! { "endSessions": [lsid(1)], "$db": "admin" },
        0,
        2,
    );
    // Sent while endSessions is still on its way: not (yet) a use after end.
    assert_eq!(send(&engine, 1, 11, &find(1), 0, 3), Decision::Forward);
    reply(&engine, 1, 11, &ok(), 4);
    assert_eq!(rules_fired(&engine), vec![]);
    reply(&engine, 2, 20, &ok(), 5);
    assert!(matches!(
        send(&engine, 1, 12, &find(1), 0, 6),
        Decision::Reject { .. }
    ));
    assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd]);
}

#[test]
fn an_unanswered_end_sessions_is_an_unconfirmed_end_reported_as_a_warning_never_rejected() {
    // The Node.js driver's client.close(): endSessions fired, the socket
    // closed before the reply.
    let engine = enforcing();
    connect(&engine, 1, PEER, "web");
    exchange(&engine, 1, 10, &insert(1, 1, 1), &ok(), 0);
    send(
        &engine,
        1,
        11,
        &rawdoc! { "endSessions": [lsid(1)], "$db": "admin" },
        0,
        2,
    );
    engine.close_at(1, CloseCause::ClientClosed, 3);
    assert_eq!(rules_fired(&engine), vec![]);
    // A later invocation reuses the session id.
    connect(&engine, 2, PEER, "web");
    assert_eq!(send(&engine, 2, 20, &find(1), 0, 1_000), Decision::Forward);
    let fired = engine.violations();
    assert_eq!(rules_fired(&engine), vec![RuleId::UseAfterEnd]);
    assert_eq!(fired[0].severity, Severity::Warning);
    assert!(!fired[0].rejected);
    assert!(
        fired[0].message.contains("not confirmed"),
        "{}",
        fired[0].message
    );
}

#[test]
fn identical_concurrent_finds_both_answered_are_concurrent_use() {
    // A handler pool reading the same document with one shared session.
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    send(&engine, 2, 20, &find(3), 0, 101);
    let cursor = rawdoc! { "cursor": { "id": 0_i64, "firstBatch": [] }, "ok": 1.0 };
    reply(&engine, 2, 20, &cursor, 102);
    assert_eq!(
        rules_fired(&engine),
        vec![],
        "undecided until the first is answered"
    );
    reply(&engine, 1, 10, &cursor, 103);
    let fired = engine.violations();
    assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
    let current = fired[0].current.as_ref().unwrap();
    let earlier = fired[0].earlier.as_ref().unwrap();
    assert_eq!((current.connection_id, current.request_id), (2, 20));
    assert_eq!((earlier.connection_id, earlier.request_id), (1, 10));
    assert!(!fired[0].rejected);
}

#[test]
fn an_unanswered_identical_request_past_the_deadline_is_concurrent_use() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    exchange(&engine, 2, 20, &find(3), &ok(), 101);
    engine.sweep_at(5_000);
    assert_eq!(rules_fired(&engine), vec![]);
    // The first is still in flight on a connection that stayed open.
    engine.sweep_at(100 + 10_001);
    assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
    // Decided once: its reply later changes nothing.
    reply(&engine, 1, 10, &ok(), 20_000);
    assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
}

#[test]
fn retryable_write_retry_on_a_new_connection_raises_nothing() {
    for (cause, expected) in [
        (CloseCause::UpstreamClosed, vec![]),
        (CloseCause::UpstreamError, vec![]),
        // The client gave up on the first connection itself (a socket
        // timeout): the write it left behind is still its doing.
        (
            CloseCause::ClientClosed,
            vec![RuleId::ClosedWithRequestsInFlight],
        ),
    ] {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &insert(8, 4, 1), 0, 0);
        // The connection dies; the driver retries on another one before
        // the proxy has processed the close.
        connect(&engine, 2, PEER, "web");
        let mut retry = insert(8, 4, 1);
        retry.append(
            "$clusterTime",
            rawdoc! { "clusterTime": bson::Timestamp { time: 5, increment: 1 } },
        );
        exchange(&engine, 2, 20, &retry, &ok(), 30);
        assert_eq!(
            rules_fired(&engine),
            vec![],
            "undecided until the first's outcome"
        );
        engine.close_at(1, cause, 32);
        assert_eq!(rules_fired(&engine), expected, "{cause:?}");
        let stats = engine.stats();
        assert_eq!(stats.retries.get("insert"), 1, "{cause:?}");
        assert_eq!(stats.retry_verdicts_pending, 0);
        assert_eq!(stats.in_flight_abandoned[cause.index()], 1);
    }
}

#[test]
fn an_upstream_close_with_requests_in_flight_is_counted_never_reported() {
    for cause in CloseCause::ALL {
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &insert(5, 1, 1), 0, 0);
        send(&engine, 1, 11, &txn_insert(6, 1, true), 0, 0);
        engine.close_at(1, cause, 50);
        let fired = rules_fired(&engine);
        if cause.client_went_first() {
            assert_eq!(
                fired,
                vec![
                    RuleId::ClosedWithRequestsInFlight,
                    RuleId::ClosedWithRequestsInFlight
                ],
                "{cause:?}"
            );
            assert!(engine
                .violations()
                .iter()
                .all(|v| v.severity == Severity::Warning));
        } else {
            assert_eq!(fired, vec![], "{cause:?}");
        }
        let abandoned = engine.stats().in_flight_abandoned;
        assert_eq!(abandoned[cause.index()], 2, "{cause:?}");
        assert_eq!(abandoned.iter().sum::<u64>(), 2, "{cause:?}");
        // Released: the driver's retry on another connection is clean,
        // and counted as a retry.
        connect(&engine, 2, PEER, "web");
        assert_eq!(
            send(&engine, 2, 20, &insert(5, 1, 1), 0, 60),
            Decision::Forward
        );
        reply(&engine, 2, 20, &ok(), 61);
        assert_eq!(rules_fired(&engine).len(), fired.len(), "{cause:?}");
        assert_eq!(engine.stats().retries.get("insert"), 1, "{cause:?}");
    }
}

#[test]
fn a_request_after_a_cut_off_one_is_a_retry_only_if_it_is_the_same() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 10, &find(5), 0, 0);
    engine.close_at(1, CloseCause::UpstreamClosed, 1);
    connect(&engine, 2, PEER, "web");
    // Another command first: the cut-off one was not retried.
    exchange(&engine, 2, 20, &insert(5, 1, 1), &ok(), 2);
    exchange(&engine, 2, 21, &find(5), &ok(), 4);
    assert_eq!(engine.stats().retries.0.iter().sum::<u64>(), 0);
    // A read retried after its connection was cut.
    send(&engine, 2, 22, &find(5), 0, 6);
    engine.close_at(2, CloseCause::UpstreamError, 7);
    connect(&engine, 3, PEER, "web");
    exchange(&engine, 3, 30, &find(5), &ok(), 8);
    assert_eq!(engine.stats().retries.get("find"), 1);
    assert_eq!(rules_fired(&engine), vec![]);
}

#[test]
fn a_transaction_cut_by_the_upstream_between_statements_is_not_superseded_by_the_retry() {
    // A step-down (or a network cut) closes the idle connection that
    // carried a transaction's answered statements before the commit is
    // sent; the driver then fails the commit without sending it and the
    // application retries with the next txnNumber on the same session.
    for (cause, expected) in [
        (CloseCause::UpstreamClosed, vec![]),
        (CloseCause::UpstreamError, vec![]),
        (CloseCause::Drained, vec![]),
        // The client closing its own connection with a transaction left
        // open is its own doing: the next transaction supersedes it.
        (CloseCause::ClientClosed, vec![RuleId::TxnSuperseded]),
    ] {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        exchange(&engine, 1, 10, &txn_insert(4, 7, true), &ok(), 0);
        exchange(&engine, 1, 11, &txn_insert(4, 7, false), &ok(), 1);
        engine.close_at(1, cause, 2);
        connect(&engine, 2, PEER, "web");
        exchange(&engine, 2, 20, &txn_insert(4, 8, true), &ok(), 3);
        exchange(
            &engine,
            2,
            21,
            &txn_command("commitTransaction", 4, 8),
            &ok(),
            4,
        );
        assert_eq!(rules_fired(&engine), expected, "{cause:?}");
    }
}

#[test]
fn identical_requests_overlapping_a_failed_one_are_all_taken_for_its_retries() {
    let engine = engine();
    for conn in 1..=3 {
        connect(&engine, conn, PEER, "web");
    }
    send(&engine, 1, 10, &find(3), 0, 100);
    send(&engine, 2, 20, &find(3), 0, 101);
    send(&engine, 3, 30, &find(3), 0, 102);
    assert_eq!(engine.stats().retry_verdicts_pending, 2);
    engine.close_at(1, CloseCause::UpstreamClosed, 103);
    reply(&engine, 2, 20, &ok(), 104);
    reply(&engine, 3, 30, &ok(), 105);
    assert_eq!(rules_fired(&engine), vec![]);
    assert_eq!(engine.stats().retries.get("find"), 2);
    assert_eq!(engine.stats().retry_verdicts_pending, 0);
}

#[test]
fn enforce_never_rejects_an_identical_request_on_a_deferred_verdict() {
    let engine = enforcing();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    assert_eq!(send(&engine, 2, 20, &find(3), 0, 101), Decision::Forward);
    reply(&engine, 1, 10, &ok(), 102);
    reply(&engine, 2, 20, &ok(), 103);
    let fired = engine.violations();
    assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
    assert!(!fired[0].rejected);
    // A different command overlapping is judged at once, and rejected.
    send(&engine, 1, 11, &find(3), 0, 200);
    assert!(matches!(
        send(&engine, 2, 21, &insert(3, 1, 1), 0, 201),
        Decision::Reject { .. }
    ));
}

#[test]
fn pending_verdicts_are_bounded_and_the_overflow_stays_silent() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    let sessions = crate::outcome::MAX_PENDING_VERDICTS + 1;
    for n in 0..sessions {
        let id = i32::try_from(n).unwrap();
        let session = rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: [id.to_le_bytes(), [7; 4], [7; 4], [7; 4]].concat() } };
        let find = rawdoc! { "find": "orders", "filter": {}, "lsid": session, "$db": "shop" };
        send(&engine, 1, 1_000 + id, &find, 0, 100);
        send(&engine, 2, 1_000 + id, &find, 0, 101);
    }
    let stats = engine.stats();
    assert_eq!(
        stats.retry_verdicts_pending,
        crate::outcome::MAX_PENDING_VERDICTS
    );
    assert_eq!(stats.retry_verdicts_unjudged, 1);
    // Every first is answered: each judged verdict reports, the one left
    // unjudged does not.
    for n in 0..sessions {
        reply(&engine, 1, 1_000 + i32::try_from(n).unwrap(), &ok(), 102);
    }
    let counts = engine.violation_counts();
    assert_eq!(
        counts[RuleId::ConcurrentUse.index()].1,
        crate::outcome::MAX_PENDING_VERDICTS as u64
    );
    assert_eq!(engine.stats().retry_verdicts_pending, 0);
}

#[test]
fn refusals_are_counted_by_command_and_code_and_said_once_per_upstream() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    exchange(&engine, 1, 10, &find(1), &ok(), 0);
    let mut id = 10;
    for refusal in refusals() {
        for kill in kills() {
            id += 1;
            send(&engine, 1, id, &kill, 0, 1);
            reply(&engine, 1, id, &refusal, 1);
        }
    }
    let refused = engine.stats().commands_refused;
    let at = |command: SessionCommand, refusal: Refusal| refused[command.index()][refusal.index()];
    for refusal in [
        Refusal::Unauthorized,
        Refusal::CommandNotFound,
        Refusal::CommandNotSupported,
        Refusal::AtlasError,
    ] {
        assert_eq!(at(SessionCommand::KillSessions, refusal), 1, "{refusal:?}");
        assert_eq!(
            at(SessionCommand::KillAllSessions, refusal),
            1,
            "{refusal:?}"
        );
        assert_eq!(
            at(SessionCommand::KillAllSessionsByPattern, refusal),
            2,
            "{refusal:?}"
        );
    }
    assert_eq!(refused.iter().flatten().sum::<u64>(), 16);
    let upstream = engine.upstreams.iter().next().unwrap();
    assert!(
        !upstream.first_refusal(SessionCommand::KillSessions),
        "already said"
    );
    assert!(
        upstream.first_refusal(SessionCommand::EndSessions),
        "never refused"
    );
    assert!(!upstream.refresh_unsupported.load(Ordering::Relaxed));
}

#[test]
fn a_refused_refresh_or_kill_cursors_changes_nothing_and_115_stops_the_refresher() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 10, &find(1), 0, 0);
    let opened = rawdoc! { "cursor": { "id": 77_i64, "firstBatch": [] }, "ok": 1.0 };
    reply(&engine, 1, 10, &opened, 0);
    let kill =
        rawdoc! { "killCursors": "orders", "cursors": [77_i64], "lsid": lsid(1), "$db": "shop" };
    send(&engine, 1, 11, &kill, 0, 1);
    reply(
        &engine,
        1,
        11,
        &rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized" },
        1,
    );
    assert_eq!(
        engine.stats().ledger.cursors,
        1,
        "a refused kill leaves the cursor open"
    );
    assert_eq!(engine.stats().ledger.held, 1);
    let refresh = rawdoc! { "refreshSessions": [lsid(1)], "$db": "admin" };
    send(&engine, 1, 12, &refresh, 0, 20 * 60_000);
    reply(
        &engine,
        1,
        12,
        &rawdoc! { "ok": 0.0, "code": 115, "codeName": "CommandNotSupported" },
        20 * 60_000,
    );
    assert_eq!(
        engine.ledger.read(
            &SessionKey {
                lsid: Lsid([1; 16]),
                owner: OwnerId::UNKNOWN
            },
            |s| s.last_refreshed
        ),
        Some(0)
    );
    let upstream = engine.upstreams.iter().next().unwrap();
    assert!(upstream.refresh_unsupported.load(Ordering::Relaxed));
    drop(upstream);
    // Confirmed, both take hold.
    send(&engine, 1, 13, &kill, 0, 20 * 60_000 + 1);
    reply(&engine, 1, 13, &ok(), 20 * 60_000 + 2);
    assert_eq!(engine.stats().ledger.cursors, 0);
}

#[test]
fn a_commit_is_committed_only_when_acknowledged_without_a_write_concern_error() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    exchange(&engine, 1, 1, &txn_insert(4, 1, true), &ok(), 0);
    send(&engine, 1, 2, &txn_command("commitTransaction", 4, 1), 0, 2);
    let wce = rawdoc! { "ok": 1.0, "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "timed out" } };
    reply(&engine, 1, 2, &wce, 3);
    assert_eq!(txn_counts(&engine), (1, 0, 0, 0));
    // The driver retries the commit; acknowledged this time.
    exchange(
        &engine,
        1,
        3,
        &txn_command("commitTransaction", 4, 1),
        &ok(),
        4,
    );
    assert_eq!(txn_counts(&engine), (1, 1, 0, 0));
    assert_eq!(rules_fired(&engine), vec![]);
}

#[test]
fn end_while_in_flight_waits_for_the_end_to_be_confirmed_outside_enforce() {
    let refused = rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized" };
    for (answer, expected) in [
        (Some(ok()), Some(Severity::Error)),
        (Some(refused), None),
        (None, Some(Severity::Warning)),
    ] {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        send(&engine, 1, 10, &find(7), 0, 0);
        let end = rawdoc! { "killSessions": [lsid(7)], "$db": "admin" };
        assert_eq!(send(&engine, 2, 20, &end, 0, 5), Decision::Forward);
        assert_eq!(rules_fired(&engine), vec![], "not before the outcome");
        match &answer {
            Some(answer) => reply(&engine, 2, 20, answer, 6),
            None => engine.close_at(2, CloseCause::ClientClosed, 6),
        }
        let fired = engine.violations();
        assert_eq!(fired.first().map(|v| v.severity), expected, "{answer:?}");
        if let Some(v) = fired.first() {
            assert_eq!(v.rule, RuleId::EndWhileInFlight);
            assert_eq!(v.message.contains("not confirmed"), answer.is_none());
        }
    }
    // Enforce judges it on what it sees: the end never reaches the server.
    let engine = enforcing();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &find(7), 0, 0);
    let end = rawdoc! { "endSessions": [lsid(7)], "$db": "admin" };
    assert!(matches!(
        send(&engine, 2, 20, &end, 0, 5),
        Decision::Reject { .. }
    ));
    assert_eq!(rules_fired(&engine), vec![RuleId::EndWhileInFlight]);
    reply(&engine, 1, 10, &ok(), 6);
    assert_eq!(send(&engine, 1, 11, &find(7), 0, 7), Decision::Forward);
}

#[test]
fn a_store_destroy_takes_hold_only_when_the_delete_is_confirmed() {
    // express-session: one tab loads the session, another logs out
    // (delete by _id), the first saves it back (upsert).
    let get = rawdoc! { "find": "sessions", "filter": { "_id": "sid" }, "$db": "app" };
    let destroy = rawdoc! { "delete": "sessions", "deletes": [{ "q": { "_id": "sid" }, "limit": 1 }], "$db": "app" };
    let save = rawdoc! {
        "update": "sessions",
        "updates": [{ "q": { "_id": "sid" }, "u": { "$set": { "_id": "sid", "session": "{}", "expires": bson::DateTime::now() } }, "upsert": true }],
        "$db": "app",
    };
    let write_error = rawdoc! { "ok": 1.0, "n": 0, "writeErrors": [{ "index": 0, "code": 13, "errmsg": "not authorized" }] };
    let refused = rawdoc! { "ok": 0.0, "code": 13, "codeName": "Unauthorized" };
    for (answer, expected) in [
        (Some(ok()), Some((Severity::Error, true))),
        (Some(refused), None),
        (Some(write_error), None),
        (None, Some((Severity::Warning, false))),
    ] {
        let engine = enforcing();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        exchange(&engine, 1, 10, &get, &ok(), 0);
        send(&engine, 2, 20, &destroy, 0, 2);
        match &answer {
            Some(answer) => reply(&engine, 2, 20, answer, 3),
            None => engine.close_at(2, CloseCause::ClientClosed, 3),
        }
        let decision = send(&engine, 1, 11, &save, 0, 4);
        let fired = engine.violations();
        match expected {
            Some((severity, rejected)) => {
                assert_eq!(fired.len(), 1, "{answer:?}");
                assert_eq!(fired[0].rule, RuleId::StoreSessionResurrected);
                assert_eq!((fired[0].severity, fired[0].rejected), (severity, rejected));
                assert_eq!(matches!(decision, Decision::Reject { .. }), rejected);
            }
            None => {
                assert_eq!(rules_fired(&engine), vec![], "{answer:?}");
                assert_eq!(decision, Decision::Forward);
            }
        }
    }
}

#[test]
fn promise_all_on_one_session_is_txn_number_reuse() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &insert(9, 3, 1), 0, 0);
    send(&engine, 2, 20, &insert(9, 3, 2), 0, 1);
    let fired = rules_fired(&engine);
    assert!(fired.contains(&RuleId::TxnNumberReuse), "{fired:?}");
    assert!(fired.contains(&RuleId::ConcurrentUse), "{fired:?}");
}

fn txn_insert(session: u8, txn: i64, start: bool) -> RawDocumentBuf {
    let mut doc = insert(session, txn, 1);
    if start {
        doc.append("startTransaction", true);
    }
    doc.append("autocommit", false);
    doc
}

fn txn_command(name: &str, session: u8, txn: i64) -> RawDocumentBuf {
    let mut doc = RawDocumentBuf::new();
    doc.append(name, 1);
    doc.append("lsid", lsid(session));
    doc.append("txnNumber", txn);
    doc.append("autocommit", false);
    doc.append("$db", "admin");
    doc
}

#[test]
fn with_transaction_retry_loop_raises_nothing() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    let write_conflict = rawdoc! {
        "ok": 0.0, "code": 112, "codeName": "WriteConflict", "errmsg": "x",
        "errorLabels": ["TransientTransactionError"],
    };
    // Attempt 1: conflict, abort, retry with a new number.
    send(&engine, 1, 1, &txn_insert(4, 1, true), 0, 0);
    reply(&engine, 1, 1, &write_conflict, 1);
    send(&engine, 1, 2, &txn_command("abortTransaction", 4, 1), 0, 2);
    reply(
        &engine,
        1,
        2,
        &rawdoc! { "ok": 0.0, "code": 251, "codeName": "NoSuchTransaction" },
        3,
    );
    // Attempt 2: commit fails with an unknown result, is retried, succeeds.
    send(&engine, 1, 3, &txn_insert(4, 2, true), 0, 4);
    reply(&engine, 1, 3, &ok(), 5);
    send(&engine, 1, 4, &txn_command("commitTransaction", 4, 2), 0, 6);
    reply(
        &engine,
        1,
        4,
        &rawdoc! { "ok": 0.0, "code": 50, "errorLabels": ["UnknownTransactionCommitResult"] },
        7,
    );
    send(&engine, 1, 5, &txn_command("commitTransaction", 4, 2), 0, 8);
    reply(&engine, 1, 5, &ok(), 9);
    // And the app commits once more (drivers re-run commit when asked).
    send(
        &engine,
        1,
        6,
        &txn_command("commitTransaction", 4, 2),
        0,
        10,
    );
    reply(&engine, 1, 6, &ok(), 11);
    // Attempt where the commit itself says the transaction is gone: the
    // driver re-runs commit, then retries the transaction.
    send(&engine, 1, 7, &txn_insert(4, 3, true), 0, 12);
    reply(&engine, 1, 7, &ok(), 13);
    send(
        &engine,
        1,
        8,
        &txn_command("commitTransaction", 4, 3),
        0,
        14,
    );
    reply(
        &engine,
        1,
        8,
        &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
        15,
    );
    send(
        &engine,
        1,
        9,
        &txn_command("commitTransaction", 4, 3),
        0,
        16,
    );
    reply(
        &engine,
        1,
        9,
        &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
        17,
    );
    send(&engine, 1, 10, &txn_insert(4, 4, true), 0, 18);
    reply(&engine, 1, 10, &ok(), 19);
    send(
        &engine,
        1,
        11,
        &txn_command("commitTransaction", 4, 4),
        0,
        20,
    );
    reply(&engine, 1, 11, &ok(), 21);
    engine.sweep_at(10 * 60_000);
    assert_eq!(rules_fired(&engine), vec![]);
}

#[test]
fn transaction_misuse_is_reported() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    // Superseded: transaction 1 open, transaction 2 starts.
    send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
    reply(&engine, 1, 1, &ok(), 1);
    send(&engine, 1, 2, &txn_insert(2, 2, true), 0, 2);
    reply(&engine, 1, 2, &ok(), 3);
    // Regression: number 1 again.
    send(&engine, 1, 3, &txn_insert(2, 1, false), 0, 4);
    reply(&engine, 1, 3, &rawdoc! { "ok": 0.0, "code": 225 }, 5);
    // After abort: a statement fails with a transient error, the app
    // swallows it and keeps going.
    send(&engine, 1, 4, &txn_insert(2, 2, false), 0, 6);
    reply(
        &engine,
        1,
        4,
        &rawdoc! { "ok": 0.0, "code": 112, "errorLabels": ["TransientTransactionError"] },
        7,
    );
    send(&engine, 1, 5, &txn_insert(2, 2, false), 0, 8);
    reply(
        &engine,
        1,
        5,
        &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
        9,
    );
    send(
        &engine,
        1,
        6,
        &txn_command("commitTransaction", 2, 2),
        0,
        10,
    );
    assert_eq!(
        rules_fired(&engine),
        vec![
            RuleId::TxnSuperseded,
            RuleId::TxnRegression,
            RuleId::TxnAfterAbort,
            RuleId::TxnAfterAbort
        ]
    );
}

#[test]
fn a_swallowed_duplicate_key_is_proven_by_the_next_reply() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
    reply(&engine, 1, 1, &ok(), 1);
    send(&engine, 1, 2, &txn_insert(2, 1, false), 0, 2);
    reply(
        &engine,
        1,
        2,
        &rawdoc! { "ok": 1.0, "n": 0, "writeErrors": [{ "index": 0, "code": 11000, "errmsg": "dup" }] },
        3,
    );
    // Nothing yet: the reply did not say the transaction is gone.
    assert_eq!(rules_fired(&engine), vec![]);
    send(&engine, 1, 3, &txn_insert(2, 1, false), 0, 4);
    reply(
        &engine,
        1,
        3,
        &rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] },
        5,
    );
    assert_eq!(rules_fired(&engine), vec![RuleId::TxnAfterAbort]);
    // The driver's cleanup abort raises nothing more.
    send(&engine, 1, 4, &txn_command("abortTransaction", 2, 1), 0, 6);
    reply(&engine, 1, 4, &rawdoc! { "ok": 0.0, "code": 251 }, 7);
    assert_eq!(engine.violations().len(), 1);
}

#[test]
fn transactions_left_open_are_reported_once_by_the_sweep() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
    reply(&engine, 1, 1, &ok(), 1);
    engine.sweep_at(30_000);
    assert_eq!(rules_fired(&engine), vec![]);
    engine.sweep_at(61_000);
    engine.sweep_at(62_000);
    assert_eq!(rules_fired(&engine), vec![RuleId::TxnLeftOpen]);
}

/// (started, committed, aborted, left open)
fn txn_counts(engine: &SessionEngine) -> (u64, u64, u64, u64) {
    let stats = engine.stats();
    (
        stats.transactions_started,
        stats.transactions_committed,
        stats.transactions_aborted,
        stats.transactions_left_open,
    )
}

#[test]
fn each_transaction_is_counted_started_once_and_settled_once() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    let transient = rawdoc! {
        "ok": 0.0, "code": 112, "codeName": "WriteConflict", "errmsg": "x",
        "errorLabels": ["TransientTransactionError"],
    };
    let no_such = rawdoc! { "ok": 0.0, "code": 251, "errorLabels": ["TransientTransactionError"] };
    let mut id = 0;
    let mut exchange = |doc: &RawDocumentBuf, answer: &RawDocumentBuf| {
        id += 1;
        send(&engine, 1, id, doc, 0, u64::try_from(id).unwrap());
        reply(&engine, 1, id, answer, u64::try_from(id).unwrap());
    };
    // 1: the server aborts it (a statement's error); the driver's abort
    // afterwards is not a second outcome.
    exchange(&txn_insert(4, 1, true), &transient);
    exchange(&txn_command("abortTransaction", 4, 1), &no_such);
    // 2: two statements, a commit with an unknown result, its retry, and
    // the application committing once more: one commit.
    exchange(&txn_insert(4, 2, true), &ok());
    exchange(&txn_insert(4, 2, false), &ok());
    exchange(
        &txn_command("commitTransaction", 4, 2),
        &rawdoc! { "ok": 0.0, "code": 50, "errorLabels": ["UnknownTransactionCommitResult"] },
    );
    exchange(&txn_command("commitTransaction", 4, 2), &ok());
    exchange(&txn_command("commitTransaction", 4, 2), &ok());
    // A regressed number changes nothing.
    exchange(&txn_insert(4, 1, false), &no_such);
    // 3: the commit says the transaction is gone, twice.
    exchange(&txn_insert(4, 3, true), &ok());
    exchange(&txn_command("commitTransaction", 4, 3), &no_such);
    exchange(&txn_command("commitTransaction", 4, 3), &no_such);
    // 4: the client aborts, and retries the abort.
    exchange(&txn_insert(4, 4, true), &ok());
    exchange(&txn_command("abortTransaction", 4, 4), &ok());
    exchange(&txn_command("abortTransaction", 4, 4), &ok());
    assert_eq!(txn_counts(&engine), (4, 1, 3, 0));
    // 5 superseded by 6, 6 by a retryable write numbered 7, 8 ended by a
    // kill: the server aborts each.
    exchange(&txn_insert(4, 5, true), &ok());
    exchange(&txn_insert(4, 6, true), &ok());
    exchange(&insert(4, 7, 1), &ok());
    exchange(&txn_insert(4, 8, true), &ok());
    assert_eq!(txn_counts(&engine), (7, 1, 5, 0));
    exchange(
        &rawdoc! { "killSessions": [lsid(4)], "$db": "admin" },
        &ok(),
    );
    assert_eq!(txn_counts(&engine), (7, 1, 6, 0));
    // A transaction left open is counted once, and still settles later.
    exchange(&txn_insert(5, 1, true), &ok());
    engine.sweep_at(200_000);
    engine.sweep_at(300_000);
    assert_eq!(txn_counts(&engine), (8, 1, 6, 1));
    send(
        &engine,
        1,
        100,
        &txn_command("commitTransaction", 5, 1),
        0,
        300_001,
    );
    reply(&engine, 1, 100, &ok(), 300_002);
    assert_eq!(txn_counts(&engine), (8, 2, 6, 1));
}

#[test]
fn transactions_left_open_are_counted_with_the_rule_disabled() {
    let mut rules = RulesConfig::default();
    rules.rules.insert(
        "txn-left-open".into(),
        crate::config::RuleOverride {
            enabled: Some(false),
            ..Default::default()
        },
    );
    let engine = engine_with(SessionConfig::default(), rules);
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 1, &txn_insert(2, 1, true), 0, 0);
    reply(&engine, 1, 1, &ok(), 1);
    engine.sweep_at(61_000);
    engine.sweep_at(62_000);
    assert_eq!(rules_fired(&engine), vec![]);
    assert_eq!(txn_counts(&engine), (1, 0, 0, 1));
}

#[test]
fn a_session_starts_with_its_first_forwarded_request_not_a_rejected_one() {
    let config = SessionConfig {
        mode: Mode::Enforce,
        ..SessionConfig::default()
    };
    let engine = engine_with(config, RulesConfig::default());
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 10, &find(1), 0, 0);
    let opened =
        rawdoc! { "cursor": { "id": 77_i64, "ns": "shop.orders", "firstBatch": [] }, "ok": 1.0 };
    reply(&engine, 1, 10, &opened, 0);
    // getMore on session 1's cursor from sessions 2 and 3, never used
    // before: rejected, so the server never sees them.
    for (id, session) in [(11, 2), (12, 3)] {
        let get_more = rawdoc! { "getMore": 77_i64, "collection": "orders", "lsid": lsid(session), "$db": "shop" };
        assert!(matches!(
            send(&engine, 1, id, &get_more, 0, 1),
            Decision::Reject { .. }
        ));
    }
    assert_eq!(engine.stats().sessions_started, 1);
    send(&engine, 1, 13, &find(2), 0, 2);
    reply(&engine, 1, 13, &ok(), 2);
    assert_eq!(engine.stats().sessions_started, 2);
    // Only session 2 had started: ending both ends one.
    send(
        &engine,
        1,
        14,
        &rawdoc! { "endSessions": [lsid(2), lsid(3)], "$db": "admin" },
        0,
        3,
    );
    reply(&engine, 1, 14, &ok(), 3);
    let stats = engine.stats();
    assert_eq!((stats.sessions_ended, stats.ledger.tombstones), (1, 2));
}

#[test]
fn sessions_are_counted_started_ended_killed_expired_and_tombstoned() {
    const MINUTE: Millis = 60_000;
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    let sessions = |engine: &SessionEngine| {
        let stats = engine.stats();
        (
            stats.sessions_started,
            stats.sessions_ended,
            stats.sessions_killed,
            stats.sessions_expired,
            stats.ledger.tombstones,
        )
    };
    let mut id = 0;
    let mut exchange = |doc: &RawDocumentBuf, now: Millis| {
        id += 1;
        send(&engine, 1, id, doc, 0, now);
        reply(&engine, 1, id, &ok(), now);
    };
    exchange(&find(1), 0);
    exchange(&find(1), 1);
    exchange(&find(2), 1);
    assert_eq!(sessions(&engine), (2, 0, 0, 0, 0));
    // Ending an lsid never seen leaves a tombstone but ends no session;
    // ending one twice ends it once.
    exchange(
        &rawdoc! { "endSessions": [lsid(1), lsid(9)], "$db": "admin" },
        2,
    );
    exchange(&rawdoc! { "endSessions": [lsid(1)], "$db": "admin" }, 2);
    assert_eq!(sessions(&engine), (2, 1, 0, 0, 2));
    // Reuse after the end: the server starts a new session.
    exchange(&find(1), 3);
    assert_eq!(sessions(&engine), (3, 1, 0, 0, 1));
    exchange(&rawdoc! { "killSessions": [lsid(2)], "$db": "admin" }, 4);
    // Kills 1; 2 and 9 are already tombstones.
    exchange(&rawdoc! { "killAllSessions": [], "$db": "admin" }, 4);
    assert_eq!(sessions(&engine), (3, 1, 2, 0, 3));
    // Used again after idling past the server's timeout: expired, and a
    // new session on the server.
    exchange(&find(3), 5);
    exchange(&find(3), 5 + 31 * MINUTE);
    assert_eq!(sessions(&engine), (5, 1, 2, 1, 3));
    // Long after: the tombstones go, and so does session 3, which
    // expired on the server unused.
    engine.sweep_at(5 + 31 * MINUTE + 61 * MINUTE);
    assert_eq!(sessions(&engine), (5, 1, 2, 2, 0));
    assert_eq!(engine.stats().ledger.sessions, 0);
}

#[test]
fn cursors_follow_their_session() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 1, &find(1), 0, 0);
    reply(
        &engine,
        1,
        1,
        &rawdoc! { "cursor": { "id": 555_i64, "ns": "shop.orders", "firstBatch": [] }, "ok": 1.0 },
        1,
    );
    assert_eq!(engine.stats().ledger.held, 1);
    let get_more = |session: Option<u8>| {
        let mut doc = rawdoc! { "getMore": 555_i64, "collection": "orders" };
        if let Some(session) = session {
            doc.append("lsid", lsid(session));
        }
        doc.append("$db", "shop");
        doc
    };
    send(&engine, 1, 2, &get_more(Some(1)), 0, 2);
    reply(
        &engine,
        1,
        2,
        &rawdoc! { "cursor": { "id": 555_i64, "nextBatch": [] }, "ok": 1.0 },
        3,
    );
    assert_eq!(rules_fired(&engine), vec![]);
    send(&engine, 1, 3, &get_more(Some(2)), 0, 4);
    reply(&engine, 1, 3, &rawdoc! { "ok": 0.0, "code": 50738 }, 5);
    send(&engine, 1, 4, &get_more(None), 0, 6);
    reply(&engine, 1, 4, &rawdoc! { "ok": 0.0, "code": 50737 }, 7);
    assert_eq!(
        rules_fired(&engine),
        vec![RuleId::CursorSessionMismatch, RuleId::CursorSessionMismatch]
    );
    // Exhausted: forgotten, and the session is no longer held.
    send(&engine, 1, 5, &get_more(Some(1)), 0, 8);
    reply(
        &engine,
        1,
        5,
        &rawdoc! { "cursor": { "id": 0_i64, "nextBatch": [] }, "ok": 1.0 },
        9,
    );
    assert_eq!(engine.stats().ledger.cursors, 0);
    assert_eq!(engine.stats().ledger.held, 0);
}

#[test]
fn a_cursor_closed_while_its_get_more_waits_releases_the_session() {
    // A change stream (or tailable cursor) closed mid-await: the driver
    // kills the cursor from another connection and hands the session to
    // the next operation while the old getMore is still waiting.
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 1, &find(1), 0, 0);
    reply(
        &engine,
        1,
        1,
        &rawdoc! { "cursor": { "id": 900_i64, "firstBatch": [] }, "ok": 1.0 },
        1,
    );
    let get_more = rawdoc! { "getMore": 900_i64, "collection": "orders", "maxTimeMS": 1000, "lsid": lsid(1), "$db": "shop" };
    send(&engine, 1, 2, &get_more, 0, 2);
    let kill =
        rawdoc! { "killCursors": "orders", "cursors": [900_i64], "lsid": lsid(1), "$db": "shop" };
    send(&engine, 2, 3, &kill, 0, 3);
    reply(&engine, 2, 3, &ok(), 4);
    send(&engine, 2, 4, &insert(1, 1, 1), 0, 5);
    reply(&engine, 2, 4, &ok(), 6);
    engine.close_at(1, CloseCause::ClientClosed, 7);
    assert_eq!(rules_fired(&engine), vec![]);
    // Without the kill, the same overlap is concurrent use.
    send(&engine, 2, 5, &find(2), 0, 10);
    reply(
        &engine,
        2,
        5,
        &rawdoc! { "cursor": { "id": 901_i64, "firstBatch": [] }, "ok": 1.0 },
        11,
    );
    let get_more =
        rawdoc! { "getMore": 901_i64, "collection": "orders", "lsid": lsid(2), "$db": "shop" };
    send(&engine, 2, 6, &get_more, 0, 12);
    connect(&engine, 3, PEER, "web");
    send(&engine, 3, 7, &insert(2, 1, 1), 0, 13);
    assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
}

#[test]
fn idle_expiry_uses_the_learned_timeout_and_refreshes_reset_it() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    assert_eq!(engine.session_timeout(), Duration::from_secs(1800));
    send(&engine, 1, 1, &find(1), 0, 0);
    reply(&engine, 1, 1, &ok(), 0);
    send(&engine, 1, 2, &find(2), 0, 0);
    reply(&engine, 1, 2, &ok(), 0);
    // The client refreshes session 2 itself.
    send(
        &engine,
        1,
        3,
        &rawdoc! { "refreshSessions": [lsid(2)], "$db": "admin" },
        0,
        20 * 60_000,
    );
    reply(&engine, 1, 3, &ok(), 20 * 60_000);
    send(&engine, 1, 4, &find(1), 0, 31 * 60_000);
    reply(&engine, 1, 4, &ok(), 31 * 60_000);
    send(&engine, 1, 5, &find(2), 0, 31 * 60_000);
    assert_eq!(rules_fired(&engine), vec![RuleId::IdleExpiredReuse]);
    assert!(engine.violations()[0].lsid.starts_with("01010101"));
}

#[test]
fn cross_client_sharing_is_reported_once_per_pair() {
    let engine = engine();
    connect(&engine, 1, "10.0.0.1:4000", "web");
    connect(&engine, 2, "10.0.0.2:4000", "web");
    connect(&engine, 3, "10.0.0.1:4001", "web");
    for (conn, id, at) in [(1, 10, 0), (3, 11, 1), (2, 12, 2), (2, 13, 3)] {
        send(&engine, conn, id, &find(6), 0, at);
        reply(&engine, conn, id, &ok(), at);
    }
    assert_eq!(rules_fired(&engine), vec![RuleId::CrossClientSharing]);
    assert!(engine.violations()[0].message.contains("peer host"));
}

#[test]
fn scram_owner_separates_sessions_and_is_reported() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    send(&engine, 1, 2, &sasl_start_as_alice(), 0, 0);
    reply(
        &engine,
        1,
        2,
        &rawdoc! { "conversationId": 1, "done": false, "payload": Binary { subtype: BinarySubtype::Generic, bytes: vec![] }, "ok": 1.0 },
        0,
    );
    send(
        &engine,
        1,
        3,
        &rawdoc! { "saslContinue": 1, "conversationId": 1, "$db": "admin" },
        0,
        0,
    );
    reply(
        &engine,
        1,
        3,
        &rawdoc! { "conversationId": 1, "done": true, "ok": 1.0 },
        0,
    );
    // A second connection whose authentication fails stays unknown.
    connect(&engine, 2, PEER, "web");
    send(&engine, 2, 2, &sasl_start_as_alice(), 0, 0);
    reply(
        &engine,
        2,
        2,
        &rawdoc! { "ok": 0.0, "code": 18, "codeName": "AuthenticationFailed" },
        0,
    );
    // Same lsid under two owners: two server sessions, no overlap.
    send(&engine, 1, 10, &find(1), 0, 1);
    send(&engine, 2, 10, &find(1), 0, 1);
    assert_eq!(rules_fired(&engine), vec![]);
    assert_eq!(engine.stats().ledger.sessions, 2);
    send(&engine, 1, 11, &find(1), 0, 2);
    let fired = engine.violations();
    assert_eq!(fired[0].rule, RuleId::ConcurrentUse);
    assert_eq!(fired[0].owner.as_deref(), Some("alice@admin"));
    assert_eq!(
        fired[0].current.as_ref().unwrap().user.as_deref(),
        Some("alice@admin")
    );
}

#[test]
fn disabled_rules_stay_silent() {
    let mut rules = RulesConfig::default();
    rules.rules.insert(
        "concurrent-use".into(),
        crate::config::RuleOverride {
            enabled: Some(false),
            ..Default::default()
        },
    );
    let engine = engine_with(SessionConfig::default(), rules);
    connect(&engine, 1, PEER, "web");
    connect(&engine, 2, PEER, "web");
    send(&engine, 1, 10, &find(3), 0, 100);
    send(&engine, 2, 20, &find(3), 0, 150);
    assert_eq!(rules_fired(&engine), vec![]);
}

#[test]
fn the_violation_list_is_bounded() {
    let config = SessionConfig {
        max_violations: 3,
        ..SessionConfig::default()
    };
    let engine = engine_with(config, RulesConfig::default());
    connect(&engine, 1, PEER, "web");
    for i in 0..10 {
        let w0 = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(i), "writeConcern": { "w": 0 }, "$db": "d" };
        send(
            &engine,
            1,
            100 + i32::from(i),
            &w0,
            MsgFlags::MORE_TO_COME,
            0,
        );
    }
    let kept = engine.violations();
    assert_eq!(kept.len(), 3);
    assert_eq!(
        kept.iter().map(|v| v.id).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert_eq!(
        engine.violation_counts()[RuleId::UnacknowledgedWithSession.index()].1,
        10
    );
}

#[test]
fn the_ledger_stays_within_max_sessions() {
    let config = SessionConfig {
        max_sessions: 50,
        ..SessionConfig::default()
    };
    let engine = engine_with(config, RulesConfig::default());
    connect(&engine, 1, PEER, "web");
    for i in 0..200u8 {
        send(&engine, 1, i32::from(i) + 10, &find(i), 0, u64::from(i));
        reply(&engine, 1, i32::from(i) + 10, &ok(), u64::from(i));
    }
    let counts = engine.stats().ledger;
    assert!(counts.sessions <= 50, "{counts:?}");
    assert!(counts.evicted_idle >= 150, "{counts:?}");
    assert_eq!(rules_fired(&engine), vec![]);
}

/// The data path's `ConnHandle`s reach the state the ids reach: a
/// handshake sent through a handle names the client, a violation between
/// two handle-driven connections has both connections' operations and
/// peers in its timeline, a reply through a handle ends the wait the
/// refresher reads, and after `close` the connection has left the table.
#[test]
fn handles_reach_the_same_connection_state_as_ids() {
    let engine = engine();
    let listener = LISTENER.parse().unwrap();
    let message =
        |id: i32, to: i32, doc: &RawDocumentBuf| encode(id, to, MsgFlags(0), doc.as_bytes());
    let send_on = |handle: &ConnHandle, id: i32, doc: &RawDocumentBuf| {
        let frame = message(id, 0, doc);
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        engine.request_on(handle, id, &Message::Msg(msg))
    };
    let reply_on =
        |handle: &ConnHandle, pending: &mut PendingRequest, to: i32, doc: &RawDocumentBuf| {
            let frame = message(9000 + to, to, doc);
            let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
            engine.reply_on(handle, pending, &Message::Msg(msg));
        };
    let a = engine.connect(1, "10.0.0.1:5000".parse().unwrap(), listener, true);
    let b = engine.connect(2, "10.0.0.1:6000".parse().unwrap(), listener, true);
    assert_eq!((a.id(), b.id()), (1, 2));
    for handle in [&a, &b] {
        let hello = rawdoc! {
            "hello": 1,
            "client": { "driver": { "name": "nodejs", "version": "6.10.0" }, "application": { "name": "checkout" } },
            "$db": "admin",
        };
        let (_, pending) = send_on(handle, 1, &hello);
        let answer =
            rawdoc! { "isWritablePrimary": true, "logicalSessionTimeoutMinutes": 30, "ok": 1.0 };
        reply_on(
            handle,
            &mut pending.expect("a hello is followed"),
            1,
            &answer,
        );
    }

    let (_, first) = send_on(&a, 10, &insert(3, 1, 1));
    let mut first = first.expect("a session request is followed");
    let (decision, _second) = send_on(&b, 20, &find(3));
    assert_eq!(decision, Decision::Forward, "observe mode");
    assert_eq!(rules_fired(&engine), vec![RuleId::ConcurrentUse]);
    let finding = engine.findings()[0].clone();
    let current = finding.current.as_ref().unwrap();
    assert_eq!(current.app_name.as_deref(), Some("checkout"));
    let detail = engine.finding(finding.fingerprint).unwrap();
    let example = detail.examples.first.unwrap();
    let ops: Vec<_> = example
        .timeline
        .iter()
        .map(|op| (op.connection_id, op.request_id))
        .collect();
    assert_eq!(ops, vec![(1, 10), (2, 20)]);
    assert_eq!(
        example.violation.earlier.as_ref().unwrap().peer.as_deref(),
        Some("10.0.0.1:5000")
    );
    assert_eq!(
        example.violation.current.as_ref().unwrap().peer.as_deref(),
        Some("10.0.0.1:6000")
    );

    // The insert on `a` is still awaited until its reply comes through `a`.
    let quiet = |conn: u64| {
        engine
            .refresh_carriers()
            .iter()
            .find(|c| c.conn == conn)
            .map(|c| c.quiet)
    };
    assert_eq!(quiet(1), Some(false));
    reply_on(&a, &mut first, 10, &ok());
    assert_eq!(quiet(1), Some(true));

    engine.close(1, CloseCause::ClientClosed, Vec::new());
    assert_eq!(quiet(1), None, "closed: out of the table");
    assert_eq!(engine.stats().connections, 1);
}

#[test]
fn a_sessions_open_cursors_follow_its_cursors_even_when_another_session_drains_one() {
    let engine = engine();
    connect(&engine, 1, PEER, "web");
    let open_cursors = |session: u8| {
        let key = SessionKey {
            lsid: Lsid([session; 16]),
            owner: OwnerId::UNKNOWN,
        };
        engine.ledger.read(&key, |s| s.open_cursors)
    };
    let opened = |id: i64| rawdoc! { "cursor": { "id": id, "ns": "shop.orders", "firstBatch": [] }, "ok": 1.0 };
    let drained =
        rawdoc! { "cursor": { "id": 0_i64, "ns": "shop.orders", "nextBatch": [] }, "ok": 1.0 };
    let get_more = |id: i64, session: u8| {
        rawdoc! { "getMore": id, "collection": "orders", "lsid": lsid(session), "$db": "shop" }
    };
    send(&engine, 1, 10, &find(1), 0, 0);
    reply(&engine, 1, 10, &opened(77), 0);
    send(&engine, 1, 11, &find(1), 0, 1);
    reply(&engine, 1, 11, &opened(78), 1);
    assert_eq!(open_cursors(1), Some(2));
    // A getMore that leaves its cursor open changes nothing.
    send(&engine, 1, 12, &get_more(77, 1), 0, 2);
    reply(&engine, 1, 12, &opened(77), 2);
    assert_eq!(open_cursors(1), Some(2));
    send(&engine, 1, 13, &get_more(77, 1), 0, 3);
    reply(&engine, 1, 13, &drained, 3);
    assert_eq!(open_cursors(1), Some(1));
    // Session 2 drives session 1's other cursor to its end (a misuse,
    // reported): the count that drops is the owner's.
    send(&engine, 1, 14, &find(2), 0, 4);
    reply(&engine, 1, 14, &ok(), 4);
    send(&engine, 1, 15, &get_more(78, 2), 0, 5);
    reply(&engine, 1, 15, &drained, 5);
    assert_eq!((open_cursors(1), open_cursors(2)), (Some(0), Some(0)));
    assert_eq!(engine.stats().ledger.cursors, 0);
    assert!(rules_fired(&engine).contains(&RuleId::CursorSessionMismatch));
}
