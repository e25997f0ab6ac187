//! The refresher: keeps sessions the application still holds (an open
//! transaction or cursor; every live session with `refresh = "all"`) from
//! expiring on the server while they sit idle.
//!
//! Every `refresh_interval` it picks held sessions idle longer than
//! `refresh_after` (default: half the server's session timeout) and younger
//! than `refresh_max_age` since the application last used them, and sends
//! one `refreshSessions` per connection, on a connection authenticated as
//! the sessions' owner (the server only refreshes the sender's own
//! sessions), through that connection's `Injector` — which waits for a
//! moment with nothing in flight, uses a request id the client cannot
//! collide with, and consumes the reply. Ended sessions are never refreshed.
//! An upstream answering CommandNotSupported / CommandNotFound (e.g.
//! DocumentDB-based servers) is left alone from then on, said once.
//!
//! The same loop runs the engine's time-driven sweep (transactions left
//! open, purging). It holds only a `Weak` reference, so it ends with the
//! engine; no lock is held across an await.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bson::{RawArrayBuf, RawDocumentBuf};
use bytes::Bytes;

use crate::command::ReplyView;
use crate::proxy::inspect::{InjectError, Injector};
use crate::wire;

use super::config::RefreshPolicy;
use super::engine::SessionEngine;
use super::state::{Millis, OwnerId, SessionKey};

/// Drivers end sessions in batches of this size; refreshes follow suit.
const MAX_SESSIONS_PER_REFRESH: usize = 10_000;
/// The sweep (transactions left open) runs at least this often.
const SWEEP_TICK: Duration = Duration::from_secs(1);
const COMMAND_NOT_FOUND: i32 = 59;
const COMMAND_NOT_SUPPORTED: i32 = 115;

/// One `refreshSessions` to inject on one connection.
#[derive(Debug)]
pub struct RefreshBatch {
    pub conn: u64,
    pub upstream: u32,
    pub injector: Injector,
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
    /// batch; marks them pending so the next round does not pick them again.
    pub fn plan_refresh(&self, now: Millis) -> Vec<RefreshBatch> {
        let policy = self.config.refresh;
        if policy == RefreshPolicy::Off {
            return Vec::new();
        }
        let refresh_after = millis(self.refresh_after());
        let max_age = millis(self.config.refresh_max_age);
        let keys = match policy {
            RefreshPolicy::Held => self.ledger.held_keys(),
            RefreshPolicy::All => self.ledger.all_keys(),
            RefreshPolicy::Off => Vec::new(),
        };
        // Which sessions are due, and where they were last used.
        let mut due: Vec<(SessionKey, u64, u32)> = Vec::new();
        for key in keys {
            let pick = self.ledger.read(&key, |state| {
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
                if !self.refresh_unsupported(upstream) {
                    due.push((key, last_conn, upstream));
                }
            }
        }
        if due.is_empty() {
            return Vec::new();
        }
        // Connections that can carry a refresh, per (owner, upstream).
        let mut candidates: HashMap<(OwnerId, u32), Vec<(u64, bool)>> = HashMap::new();
        for conn in self.conns.iter() {
            if conn.injector.is_some() && !conn.refresh_in_progress {
                candidates
                    .entry((conn.owner, conn.upstream))
                    .or_default()
                    .push((*conn.key(), conn.is_quiet()));
            }
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
            let Some(mut state) = self.conns.get_mut(&conn) else {
                continue;
            };
            let Some(injector) = state.injector.clone() else {
                continue;
            };
            state.refresh_in_progress = true;
            let upstream = state.upstream;
            drop(state);
            for key in &keys {
                self.ledger
                    .with_existing(key, |session| session.refresh_pending = true);
            }
            plans.push(RefreshBatch {
                conn,
                upstream,
                injector,
                keys,
            });
        }
        plans
    }

    fn refresh_unsupported(&self, upstream: u32) -> bool {
        self.upstreams
            .get(&upstream)
            .is_some_and(|u| u.refresh_unsupported.load(Ordering::Relaxed))
    }

    /// Records the outcome of an injected refresh.
    pub fn finish_refresh(
        &self,
        batch: &RefreshBatch,
        result: Result<Bytes, InjectError>,
        now: Millis,
    ) {
        if let Some(mut conn) = self.conns.get_mut(&batch.conn) {
            conn.refresh_in_progress = false;
        }
        let outcome = match &result {
            Ok(frame) => reply_outcome(frame),
            Err(error) => RefreshOutcome::Failed(error.to_string()),
        };
        self.refreshes_sent.fetch_add(1, Ordering::Relaxed);
        let refreshed = outcome == RefreshOutcome::Refreshed;
        for key in &batch.keys {
            self.ledger.with_existing(key, |session| {
                session.refresh_pending = false;
                if refreshed && !session.is_ended() {
                    session.last_refreshed = now;
                    session.refreshes = session.refreshes.saturating_add(1);
                }
            });
        }
        match outcome {
            RefreshOutcome::Refreshed => {
                self.sessions_refreshed
                    .fetch_add(batch.keys.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    conn = batch.conn,
                    sessions = batch.keys.len(),
                    first_lsid = %batch.keys.first().map(|k| k.lsid.short().to_string()).unwrap_or_default(),
                    "refreshed held sessions"
                );
            }
            RefreshOutcome::Unsupported(code) => {
                self.refresh_failures.fetch_add(1, Ordering::Relaxed);
                let newly = self
                    .upstreams
                    .get(&batch.upstream)
                    .is_some_and(|u| !u.refresh_unsupported.swap(true, Ordering::Relaxed));
                if newly {
                    tracing::warn!(
                        conn = batch.conn,
                        upstream = batch.upstream,
                        code,
                        "the upstream does not support refreshSessions; sessionguard stops refreshing sessions on it \
                         (held sessions there can expire while idle)"
                    );
                }
            }
            RefreshOutcome::Failed(reason) => {
                self.refresh_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(conn = batch.conn, sessions = batch.keys.len(), %reason, "refreshSessions failed");
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RefreshOutcome {
    Refreshed,
    Unsupported(i32),
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
    match reply.code {
        Some(code @ (COMMAND_NOT_SUPPORTED | COMMAND_NOT_FOUND)) => {
            RefreshOutcome::Unsupported(code)
        }
        code => RefreshOutcome::Failed(format!(
            "error {} ({})",
            code.map_or_else(|| "?".to_string(), |c| c.to_string()),
            reply.code_name.unwrap_or("no codeName")
        )),
    }
}

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Runs the refresher and the sweep until the engine is dropped.
pub fn spawn_refresher(engine: &Arc<SessionEngine>) -> tokio::task::JoinHandle<()> {
    let weak: Weak<SessionEngine> = Arc::downgrade(engine);
    let interval = engine.config.refresh_interval;
    let tick = interval.min(SWEEP_TICK);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh: Option<tokio::time::Instant> = None;
        loop {
            ticker.tick().await;
            let Some(engine) = weak.upgrade() else { return };
            engine.sweep();
            let due = last_refresh.is_none_or(|at| at.elapsed() >= interval);
            if !due {
                continue;
            }
            last_refresh = Some(tokio::time::Instant::now());
            for batch in engine.plan_refresh(engine.now()) {
                let weak = Arc::downgrade(&engine);
                tokio::spawn(async move {
                    let result = batch.injector.inject(batch.body()).await;
                    if let Some(engine) = weak.upgrade() {
                        engine.finish_refresh(&batch, result, engine.now());
                    }
                });
            }
        }
    })
}
