//! What the refresher decides: which sessions the application still holds
//! (an open transaction or cursor; every live session with `refresh =
//! "all"`) are about to expire on the server while they sit idle, on which
//! connection each `refreshSessions` goes, its bytes, and what its reply
//! means. The sending (a timer, the connection's injector) is the binary's
//! driver loop: this module does no I/O and keeps no clock of its own.
//!
//! It talks to the engine only through the engine's refresh API
//! (`engine::refresh_api`: settings, the ledger, carrier connections, marks
//! and counters); it writes none of the engine's fields.
//!
//! A round ([`SessionEngine::plan_refresh`]) picks held sessions idle longer
//! than `refresh_after` (default: half the server's session timeout) and
//! younger than `refresh_max_age` since the application last used them, and
//! plans one `refreshSessions` per connection, on a connection authenticated
//! as the sessions' owner (the server only refreshes the sender's own
//! sessions) that can carry injected requests (`connect`'s `can_inject`).
//! The driver sends each batch's [`RefreshBatch::body`] at a moment with
//! nothing in flight and hands the reply (or why there was none) to
//! [`SessionEngine::finish_refresh`]. Ended sessions are never refreshed.
//! An upstream answering CommandNotSupported / CommandNotFound / AtlasError
//! (e.g. DocumentDB-based servers) is left alone from then on; every
//! refusal goes through the engine's one refusal path (`refused`: counted,
//! said once per upstream and command), like the application's own.

use std::collections::HashMap;

use bson::{RawArrayBuf, RawDocumentBuf};
use bytes::Bytes;

use sessionguard_protocol::command::ReplyView;
use sessionguard_protocol::wire;

use super::config::RefreshPolicy;
use super::engine::refresh_api::RefreshCount;
use super::engine::SessionEngine;
use super::outcome::{Refusal, SessionCommand};
use super::state::{millis, Millis, OwnerId, SessionKey};

/// Drivers end sessions in batches of this size; refreshes follow suit.
const MAX_SESSIONS_PER_REFRESH: usize = 10_000;

/// One `refreshSessions` to inject on one connection.
#[derive(Debug)]
pub struct RefreshBatch {
    /// The connection to send it on (the id `connect` was given).
    pub conn: u64,
    upstream: u32,
    /// The sessions it refreshes.
    pub keys: Vec<SessionKey>,
}

impl RefreshBatch {
    /// `{refreshSessions: [{id: UUID}, ...], $db: "admin"}`.
    pub fn body(&self) -> Vec<u8> {
        let mut list = RawArrayBuf::new();
        for key in &self.keys {
            let mut id = RawDocumentBuf::new();
            id.append(
                "id",
                bson::RawBson::Binary(bson::Binary {
                    subtype: bson::spec::BinarySubtype::Uuid,
                    bytes: key.lsid.0.to_vec(),
                }),
            );
            list.push(id);
        }
        let mut body = RawDocumentBuf::new();
        body.append("refreshSessions", list);
        body.append("$db", "admin");
        body.into_bytes()
    }
}

impl SessionEngine {
    /// Chooses the sessions to refresh now and the connection for each
    /// batch; marks them pending so the next round does not pick them
    /// again.
    pub fn plan_refresh(&self, now: Millis) -> Vec<RefreshBatch> {
        plan(self, now)
    }

    /// Records the outcome of an injected refresh: the reply frame, or why
    /// none came (the connection closed, the injection timed out...).
    pub fn finish_refresh(&self, batch: &RefreshBatch, result: Result<Bytes, String>, now: Millis) {
        finish(self, batch, result, now)
    }
}

/// `plan_refresh`, through the engine's refresh API only.
fn plan(engine: &SessionEngine, now: Millis) -> Vec<RefreshBatch> {
    let (policy, refresh_after) = engine.refresh_settings();
    if policy == RefreshPolicy::Off {
        return Vec::new();
    }
    let refresh_after = millis(refresh_after);
    let max_age = millis(engine.refresh_max_age());
    let ledger = engine.ledger();
    let keys = match policy {
        RefreshPolicy::Held => ledger.held_keys(),
        RefreshPolicy::All => ledger.all_keys(),
        RefreshPolicy::Off => Vec::new(),
    };
    // Which sessions are due, and where they were last used.
    let mut due: Vec<(SessionKey, u64, u32)> = Vec::new();
    for key in keys {
        let pick = ledger.read(&key, |state| {
            let idle = now.saturating_sub(state.last_activity());
            let unused = now.saturating_sub(state.last_used);
            let wanted = match policy {
                RefreshPolicy::Held => state.is_held(),
                _ => true,
            };
            (wanted
                && !state.is_ended()
                && !state.refresh_pending
                && state.in_flight.is_empty()
                && idle >= refresh_after
                && unused <= max_age)
                .then_some((state.last_conn, state.upstream))
        });
        if let Some(Some((last_conn, upstream))) = pick {
            if !engine.refresh_unsupported(upstream) {
                due.push((key, last_conn, upstream));
            }
        }
    }
    if due.is_empty() {
        return Vec::new();
    }
    // Connections that can carry a refresh, per (owner, upstream).
    let mut candidates: HashMap<(OwnerId, u32), Vec<(u64, bool)>> = HashMap::new();
    for carrier in engine.refresh_carriers() {
        candidates
            .entry((carrier.owner, carrier.upstream))
            .or_default()
            .push((carrier.conn, carrier.quiet));
    }
    for list in candidates.values_mut() {
        // Quiet connections first; the injector waits for quiet anyway.
        list.sort_by_key(|(id, quiet)| (!quiet, *id));
    }
    let mut batches: HashMap<u64, Vec<SessionKey>> = HashMap::new();
    for (key, last_conn, upstream) in due {
        let Some(list) = candidates.get(&(key.owner, upstream)) else {
            continue;
        };
        let conn = list
            .iter()
            .find(|(id, quiet)| *id == last_conn && *quiet)
            .or_else(|| list.first())
            .map(|(id, _)| *id);
        if let Some(conn) = conn {
            let batch = batches.entry(conn).or_default();
            if batch.len() < MAX_SESSIONS_PER_REFRESH {
                batch.push(key);
            }
        }
    }
    let mut plans = Vec::with_capacity(batches.len());
    for (conn, keys) in batches {
        let Some(upstream) = engine.start_refresh_on(conn) else {
            continue;
        };
        for key in &keys {
            ledger.with_existing(key, |session| session.refresh_pending = true);
        }
        plans.push(RefreshBatch {
            conn,
            upstream,
            keys,
        });
    }
    plans
}

/// `finish_refresh`, through the engine's refresh API only.
fn finish(
    engine: &SessionEngine,
    batch: &RefreshBatch,
    result: Result<Bytes, String>,
    now: Millis,
) {
    engine.end_refresh_on(batch.conn);
    let outcome = match &result {
        Ok(frame) => reply_outcome(frame),
        Err(error) => RefreshOutcome::Failed(error.clone()),
    };
    let refreshed = outcome == RefreshOutcome::Refreshed;
    for key in &batch.keys {
        engine.ledger().with_existing(key, |session| {
            session.refresh_pending = false;
            if refreshed && !session.is_ended() {
                session.last_refreshed = now;
                session.refreshes = session.refreshes.saturating_add(1);
            }
        });
    }
    match outcome {
        RefreshOutcome::Refreshed => {
            engine.count_refresh(RefreshCount::Refreshed(batch.keys.len() as u64));
            tracing::info!(
                conn = batch.conn,
                sessions = batch.keys.len(),
                first_lsid = %batch.keys.first().map(|k| k.lsid.short().to_string()).unwrap_or_default(),
                "refreshed held sessions"
            );
        }
        RefreshOutcome::Refused { refusal, code } => {
            engine.count_refresh(RefreshCount::Failed);
            engine.refused(
                batch.upstream,
                batch.conn,
                SessionCommand::RefreshSessions,
                refusal,
                code,
            );
        }
        RefreshOutcome::Failed(reason) => {
            engine.count_refresh(RefreshCount::Failed);
            tracing::warn!(conn = batch.conn, sessions = batch.keys.len(), %reason, "refreshSessions failed");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RefreshOutcome {
    Refreshed,
    /// An error reply.
    Refused {
        refusal: Refusal,
        code: Option<i32>,
    },
    /// No reply, or one that cannot be read.
    Failed(String),
}

fn reply_outcome(bytes: &Bytes) -> RefreshOutcome {
    let Some(header) = wire::MsgHeader::parse(bytes) else {
        return RefreshOutcome::Failed("reply shorter than a header".into());
    };
    let frame = wire::Frame {
        header,
        bytes: bytes.clone(),
    };
    // The reply may come compressed if the connection negotiated it.
    let opened = match wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE) {
        Ok(opened) => opened,
        Err(error) => return RefreshOutcome::Failed(format!("unreadable reply: {error}")),
    };
    let message = match opened.parse(&frame) {
        Ok(message) => message,
        Err(error) => return RefreshOutcome::Failed(format!("unreadable reply: {error}")),
    };
    let Some(reply) = ReplyView::from_message(&message) else {
        return RefreshOutcome::Failed("reply without a document".into());
    };
    if reply.ok {
        return RefreshOutcome::Refreshed;
    }
    RefreshOutcome::Refused {
        refusal: Refusal::of(reply.code, reply.code_name),
        code: reply.code,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{RulesConfig, SessionConfig};
    use crate::engine::tests::{
        connect, engine_with, find, lsid, ok, reply, send, TestEngine, PEER,
    };
    use bson::rawdoc;
    use sessionguard_protocol::wire::op_msg::encode;
    use sessionguard_protocol::wire::MsgFlags;

    const SECOND: Millis = 1_000;

    fn engine(policy: RefreshPolicy) -> TestEngine {
        let config = SessionConfig {
            refresh: policy,
            session_timeout: Some(Duration::from_secs(10)),
            refresh_after: Some(Duration::from_secs(4)),
            ..SessionConfig::default()
        };
        engine_with(config, RulesConfig::default())
    }

    /// Opens a cursor under session `n` on connection `conn` at time 0.
    fn hold_cursor(engine: &TestEngine, conn: u64, n: u8, request_id: i32) {
        send(engine, conn, request_id, &find(n), 0, 0);
        let cursor_id = 1_000 + i64::from(n);
        reply(
            engine,
            conn,
            request_id,
            &rawdoc! { "cursor": { "id": cursor_id, "firstBatch": [] }, "ok": 1.0 },
            0,
        );
    }

    fn reply_frame(doc: bson::RawDocumentBuf) -> Bytes {
        encode(-5, -1, MsgFlags(0), doc.as_bytes())
    }

    #[test]
    fn held_idle_sessions_are_planned_on_their_own_connection() {
        let engine = engine(RefreshPolicy::Held);
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, PEER, "web");
        hold_cursor(&engine, 2, 7, 10);
        // A plain session on connection 1: not held.
        send(&engine, 1, 11, &find(8), 0, 0);
        reply(&engine, 1, 11, &ok(), 0);
        assert!(
            engine.plan_refresh(3 * SECOND).is_empty(),
            "not idle long enough yet"
        );
        let plans = engine.plan_refresh(5 * SECOND);
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].conn, 2);
        assert_eq!(plans[0].keys.len(), 1);
        assert_eq!(plans[0].keys[0].lsid.0, [7; 16]);
        // Pending: not planned twice.
        assert!(engine.plan_refresh(6 * SECOND).is_empty());
        let body = bson::RawDocument::from_bytes(&plans[0].body())
            .unwrap()
            .to_owned();
        assert_eq!(
            body.get_array("refreshSessions")
                .unwrap()
                .into_iter()
                .count(),
            1
        );
        assert_eq!(body.get_str("$db").unwrap(), "admin");
        assert!(
            body.get("lsid").unwrap().is_none(),
            "the refresh itself carries no session"
        );

        engine.finish_refresh(
            &plans[0],
            Ok(reply_frame(rawdoc! { "ok": 1.0 })),
            6 * SECOND,
        );
        assert_eq!(engine.stats().sessions_refreshed, 1);
        // Refreshed at 6 s: due again only after 10 s.
        assert!(engine.plan_refresh(9 * SECOND).is_empty());
        assert_eq!(engine.plan_refresh(11 * SECOND).len(), 1);
    }

    #[test]
    fn ended_sessions_and_policy_off_are_never_refreshed() {
        let engine = engine(RefreshPolicy::Held);
        connect(&engine, 1, PEER, "web");
        hold_cursor(&engine, 1, 3, 10);
        send(
            &engine,
            1,
            11,
            &rawdoc! { "endSessions": [lsid(3)], "$db": "admin" },
            0,
            1,
        );
        reply(&engine, 1, 11, &ok(), 1);
        assert!(engine.plan_refresh(60 * SECOND).is_empty());

        let off = self::engine(RefreshPolicy::Off);
        connect(&off, 1, PEER, "web");
        hold_cursor(&off, 1, 3, 10);
        assert!(off.plan_refresh(60 * SECOND).is_empty());
    }

    #[test]
    fn refresh_all_includes_unheld_sessions_but_not_past_max_age() {
        let engine = engine(RefreshPolicy::All);
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &find(4), 0, 0);
        reply(&engine, 1, 10, &ok(), 0);
        assert_eq!(engine.plan_refresh(5 * SECOND).len(), 1);
        let late = self::engine(RefreshPolicy::All);
        connect(&late, 1, PEER, "web");
        send(&late, 1, 10, &find(4), 0, 0);
        reply(&late, 1, 10, &ok(), 0);
        assert!(
            late.plan_refresh(2 * 60 * 60 * SECOND).is_empty(),
            "unused for longer than refresh_max_age"
        );
    }

    #[test]
    fn monitoring_only_connections_never_carry_refreshes() {
        let engine = engine(RefreshPolicy::Held);
        connect(&engine, 1, PEER, "web");
        hold_cursor(&engine, 1, 5, 10);
        // The connection that carried the session goes away; only a
        // connection without session traffic (a monitor) is left.
        engine.close_at(1, sessionguard_protocol::CloseCause::ClientClosed, 1);
        connect(&engine, 2, PEER, "web");
        assert!(engine.plan_refresh(60 * SECOND).is_empty());
    }

    #[test]
    fn command_not_supported_stops_refreshing_on_that_upstream() {
        let engine = engine(RefreshPolicy::Held);
        connect(&engine, 1, PEER, "web");
        hold_cursor(&engine, 1, 6, 10);
        let plans = engine.plan_refresh(5 * SECOND);
        assert_eq!(plans.len(), 1);
        let unsupported =
            rawdoc! { "ok": 0.0, "code": 115, "codeName": "CommandNotSupported", "errmsg": "no" };
        engine.finish_refresh(&plans[0], Ok(reply_frame(unsupported)), 5 * SECOND);
        assert_eq!(engine.stats().refresh_failures, 1);
        assert!(engine.plan_refresh(60 * SECOND).is_empty());
    }

    #[test]
    fn failed_injections_are_counted_and_retried_later() {
        let engine = engine(RefreshPolicy::Held);
        connect(&engine, 1, PEER, "web");
        hold_cursor(&engine, 1, 6, 10);
        let plans = engine.plan_refresh(5 * SECOND);
        engine.finish_refresh(
            &plans[0],
            Err("the connection is closed".to_string()),
            5 * SECOND,
        );
        assert_eq!(engine.stats().refresh_failures, 1);
        assert_eq!(engine.stats().sessions_refreshed, 0);
        assert_eq!(
            engine.plan_refresh(6 * SECOND).len(),
            1,
            "still due: the refresh did not happen"
        );
    }
}
