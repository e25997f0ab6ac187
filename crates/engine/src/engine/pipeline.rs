//! The request / reply / close pipeline: a request is inspected, the rules
//! registered on its hooks run, the verdict is taken, and what waits on the
//! server's answer (the session's in-flight entry, a held effect, a deferred
//! verdict) is recorded in the `PendingRequest` the caller keeps; the reply
//! settles it, the close settles what never got one. The sweep is here too.

use std::sync::atomic::Ordering;

use sessionguard_protocol::command::{KillPattern, Lsid, ReplyView, RequestView};
use sessionguard_protocol::command_index;
use sessionguard_protocol::wire::Message;
use sessionguard_protocol::CloseCause;

use crate::config::ResolvedRules;
use crate::ledger::{CursorEntry, CursorKey};
use crate::outcome::{
    Effect, EffectKind, EffectOutcome, KillTarget, PendingVerdict, Refusal, SessionCommand,
    RETRY_VERDICT_WINDOW,
};
use crate::rules::{self, CursorEvent, EndEvent, Overlap, RequestEvent, RuleContext};
use crate::state::{
    millis, ClientId, CommandClass, EndKind, InFlight, Millis, OwnerId, ReplyFacts, RequestFacts,
    RequestRef, SessionKey,
};
use crate::violation::{
    Action, RuleId, Violation, SESSIONGUARD_VIOLATION_CODE, SESSIONGUARD_VIOLATION_CODE_NAME,
};

use super::conn_state::{lock, ConnCell, ConnHandle, TXN_SESSIONS_PER_CONN};
use super::pending::PendingRequest;
use super::violation_log::log_summary;
use super::{Decision, SessionEngine};

/// Server error codes the engine reads replies for.
const NO_SUCH_TRANSACTION: i32 = 251;
const CURSOR_NOT_FOUND: i32 = 43;

/// How often tombstones and long-expired sessions are purged.
const PURGE_EVERY: Millis = 60_000;

/// Everything a request carries that the engine acts on after the rules ran.
pub(super) struct Inspected<'a> {
    pub(super) view: RequestView<'a>,
    pub(super) facts: RequestFacts,
    pub(super) key: Option<SessionKey>,
    pub(super) owner: OwnerId,
    /// The arrays a request names, parsed once: both the rules and the
    /// effects walk them. Empty (no allocation) for every other command.
    pub(super) targets: Targets,
    /// The engine's sequence number of the request (orders timelines).
    pub(super) seq: u64,
}

/// The cursors and sessions a getMore, killCursors or session command names.
#[derive(Default)]
pub(super) struct Targets {
    pub(super) get_more_cursor: Option<i64>,
    pub(super) killed_cursors: Vec<i64>,
    /// endSessions / killSessions / refreshSessions.
    pub(super) sessions: Vec<Lsid>,
}

impl Targets {
    pub(super) fn of(view: &RequestView<'_>, class: CommandClass) -> Targets {
        match class {
            CommandClass::GetMore => Targets {
                get_more_cursor: view.get_more_cursor_id(),
                ..Targets::default()
            },
            CommandClass::KillCursors => Targets {
                killed_cursors: view.killed_cursor_ids().collect(),
                ..Targets::default()
            },
            CommandClass::EndSessions
            | CommandClass::KillSessions
            | CommandClass::RefreshSessions => Targets {
                sessions: view.session_list().collect(),
                ..Targets::default()
            },
            _ => Targets::default(),
        }
    }
}

impl SessionEngine {
    // ---- requests ----

    /// Inspects a client request before it is forwarded. A forwarded
    /// request the engine follows comes with its `PendingRequest`, which
    /// the caller keeps until the request's final reply (`reply`) or its
    /// connection's close (`close`); a rejected one never has one.
    /// `conn` is looked up in the connection table; the data path holds
    /// a `ConnHandle` and calls `request_on` instead.
    pub fn request(
        &self,
        conn: u64,
        request_id: i32,
        message: &Message<'_>,
    ) -> (Decision, Option<PendingRequest>) {
        // One clock read gives both the engine time and the sequence.
        let (now, seq) = self.now_and_seq();
        let cell = self.conn_cell(conn);
        self.request_timed(conn, cell.as_deref(), request_id, message, now, seq)
    }

    /// `request` on the connection `conn` stands for (from `connect`).
    pub fn request_on(
        &self,
        conn: &ConnHandle,
        request_id: i32,
        message: &Message<'_>,
    ) -> (Decision, Option<PendingRequest>) {
        let (now, seq) = self.now_and_seq();
        self.request_timed(conn.id, Some(&conn.cell), request_id, message, now, seq)
    }

    /// `request` at a given engine time (tests drive time explicitly).
    pub fn request_at(
        &self,
        conn: u64,
        request_id: i32,
        message: &Message<'_>,
        now: Millis,
    ) -> (Decision, Option<PendingRequest>) {
        let (_, seq) = self.now_and_seq();
        let cell = self.conn_cell(conn);
        self.request_timed(conn, cell.as_deref(), request_id, message, now, seq)
    }

    /// `cell`: the connection's state (`None`: a connection the engine was
    /// not told of, whose requests it judges without an identity).
    fn request_timed(
        &self,
        conn: u64,
        cell: Option<&ConnCell>,
        request_id: i32,
        message: &Message<'_>,
        now: Millis,
        seq: u64,
    ) -> (Decision, Option<PendingRequest>) {
        let Some(view) = RequestView::from_message(message) else {
            return (Decision::Forward, None);
        };
        self.requests_inspected.add(1);
        self.decide_due_verdicts(now);
        let inspected = self.inspect(conn, cell, request_id, view, now, seq);
        let ctx = self.context(now);
        let can_reply = inspected.facts.expects_reply;
        // One snapshot per request: a reload mid-request cannot mix settings.
        let rules = self.rules.load();
        let mut found: Vec<Violation> = Vec::new();

        // Read-only checks first: nothing changes until the verdict is known.
        let enabled = |rule| rules.enabled(rule);
        if let Some(event) = &self.cursor_event(&inspected) {
            rules::on_cursor(enabled, event, &ctx, &mut found);
        }
        let end_kind = match inspected.facts.class {
            CommandClass::EndSessions => Some(EndKind::Ended),
            CommandClass::KillSessions => Some(EndKind::Killed),
            _ => None,
        };
        // end-while-in-flight is judged now, on what the proxy sees (requests
        // really in flight on the sessions named). In enforce mode it rejects
        // the end before it can end a session in use; otherwise it is
        // reported when the server confirms the end (never if it refuses;
        // as an unconfirmed warning if the reply never comes).
        let mut ended_in_flight: Vec<Violation> = Vec::new();
        if let Some(kind) = end_kind {
            if rules::any_on(enabled, |hook| matches!(hook, rules::Hook::End(_))) {
                for &lsid in &inspected.targets.sessions {
                    let event = EndEvent {
                        key: SessionKey {
                            lsid,
                            owner: inspected.owner,
                        },
                        kind,
                        request: inspected.facts.request,
                    };
                    self.ledger.read(&event.key, |state| {
                        rules::on_end(enabled, &event, state, &ctx, &mut ended_in_flight)
                    });
                }
            }
            if can_reply {
                // Those whose action rejects are judged with the request.
                let (now, held) = ended_in_flight
                    .into_iter()
                    .partition(|v| rules.get(v.rule).action == Action::Reject);
                found.extend::<Vec<Violation>>(now);
                ended_in_flight = held;
            }
        }

        // Web-session stores: a resurrecting write is judged before anything
        // changes, like every rule (enforce rejects it).
        let store_ops = self.stores.classify(&inspected.view);
        if !store_ops.is_empty()
            && rules::any_on(enabled, |hook| matches!(hook, rules::Hook::StoreWrite(_)))
        {
            if let Some(resurrection) = self.stores.check(&store_ops, &inspected.facts.request) {
                let key = inspected.key.unwrap_or(SessionKey {
                    lsid: Default::default(),
                    owner: inspected.owner,
                });
                let label = self.stores.label(resurrection.store);
                rules::on_store_write(enabled, &resurrection, key, label, &ctx, &mut found);
            }
        }

        let mut rejected = false;
        let mut suspect: Option<InFlight> = None;
        let mut retried = false;
        if let Some(key) = inspected.key {
            let event = RequestEvent {
                key,
                facts: inspected.facts,
            };
            rejected = self.ledger.with_session(key, now, |state| {
                rules::on_request(enabled, &event, state, &ctx, &mut found);
                let reject = can_reply && found.iter().any(|v| rejects(&rules, v));
                if !reject {
                    suspect = self.retry_suspect(&event, state, &found);
                    retried = self.record_request(state, &event, &found, suspect.is_some(), &ctx);
                }
                reject
            });
        } else if can_reply {
            rejected = found.iter().any(|v| rejects(&rules, v));
        }

        let mut pending = None;
        if !rejected {
            let destroys = self.stores.apply(&store_ops, &inspected.facts.request);
            if let (Some(key), Some(first)) = (inspected.key, suspect) {
                self.defer_verdict(key, first.request, inspected.facts.request, now);
            }
            if retried {
                self.count_retry(inspected.view.name);
            }
            pending = self.apply_request_effects(
                &inspected,
                cell,
                end_kind,
                ended_in_flight,
                destroys,
                now,
            );
        }

        let reply = if rejected {
            self.requests_rejected.fetch_add(1, Ordering::Relaxed);
            let first = found
                .iter()
                .filter(|v| rejects(&rules, v))
                .max_by_key(|v| rules.get(v.rule).severity);
            first.map(|v| self.reject_reply(v))
        } else {
            None
        };
        for violation in found {
            let rejects = rejects(&rules, &violation);
            self.emit(violation, rejected && rejects);
        }
        match reply {
            Some(reply) => (Decision::Reject { reply }, None),
            None => (Decision::Forward, pending),
        }
    }

    /// Records a forwarded session request in its session and counts the
    /// session lifecycle. Returns whether the request is a driver's retry
    /// (of a request cut off by its connection closing, or a retryable
    /// write resent with the same txnNumber and statements, which the
    /// server deduplicates); a `suspect` is counted by its verdict instead.
    pub(super) fn record_request(
        &self,
        state: &mut crate::state::SessionState,
        event: &RequestEvent,
        found: &[Violation],
        suspect: bool,
        ctx: &RuleContext<'_>,
    ) -> bool {
        let now = ctx.now;
        let cleanup = event.facts.class.is_session_cleanup();
        let restarted = state.is_ended() && !cleanup;
        if restarted {
            // The server treats the id as a brand-new session
            // (whether or not use-after-end is enabled).
            state.restart(now);
        }
        let expired =
            state.started && !cleanup && state.expired_on_server(now, ctx.session_timeout);
        if expired {
            self.lifecycle
                .sessions_expired
                .fetch_add(1, Ordering::Relaxed);
        }
        // A cleanup command on a tombstone does not revive it.
        if (!state.started && !state.is_ended()) || expired {
            self.lifecycle
                .sessions_started
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(shared) = found.iter().find(|v| v.rule == RuleId::CrossClientSharing) {
            state.shared_with = shared.current.map_or(ClientId::UNKNOWN, |r| r.client);
        }
        let facts = &event.facts;
        let cut_off = state.take_cut_off(facts);
        let resent = facts.retryable_write
            && facts.request.txn_number.is_some_and(|number| {
                state
                    .last_retryable_with(number)
                    .is_some_and(|last| last.statement == facts.statement)
            });
        let events = state.apply_request(facts, now);
        self.lifecycle.transactions(events);
        !suspect && (cut_off || resent)
    }

    /// When `event` repeats exactly a request in flight on another
    /// connection (and nothing else there is reported), flags that request
    /// `suspected` and returns it: the verdict waits for its outcome.
    pub(super) fn retry_suspect(
        &self,
        event: &RequestEvent,
        state: &mut crate::state::SessionState,
        found: &[Violation],
    ) -> Option<InFlight> {
        if state.in_flight.is_empty()
            || !self.rules.enabled(RuleId::ConcurrentUse)
            || found.iter().any(|v| v.rule == RuleId::ConcurrentUse)
        {
            return None;
        }
        let first = rules::retry_suspect(event, state)?;
        if self.verdicts.is_full() {
            // Left unjudged (silent): see `MAX_PENDING_VERDICTS`.
            self.verdicts.unjudged_one();
            return None;
        }
        state
            .in_flight
            .set_suspected(first.request.conn, first.request.request_id, true);
        Some(first)
    }

    pub(super) fn defer_verdict(
        &self,
        key: SessionKey,
        first: RequestRef,
        second: RequestRef,
        now: Millis,
    ) {
        self.verdicts.defer(PendingVerdict {
            key,
            first,
            second,
            deadline: now.saturating_add(RETRY_VERDICT_WINDOW),
        });
    }

    /// Decides the verdicts waiting on `first` (session `key`): its reply
    /// was delivered (`answered`), or its connection closed without it.
    pub(super) fn decide_verdicts(
        &self,
        key: &SessionKey,
        first: &RequestRef,
        answered: bool,
        now: Millis,
    ) {
        let waiting = self.verdicts.take_waiting_on(key, first);
        for verdict in waiting {
            if answered {
                // Both were answered: nothing failed, nothing was retried.
                self.verdict(&verdict, Overlap::Answered, now);
            } else {
                // The first never answered: the second was its retry. Every
                // identical request that overlapped it is taken for one — a
                // false negative in a rare corner, never a false alarm.
                self.count_retry(&self.tables.symbols.resolve(verdict.second.command.0));
            }
        }
    }

    /// Decides the verdicts whose window ended: the first request is still
    /// unanswered on a connection that stayed open, so the second was not a
    /// retry (see `RETRY_VERDICT_WINDOW`). One relaxed load when none is due.
    pub(super) fn decide_due_verdicts(&self, now: Millis) {
        let due = self.verdicts.take_due(now);
        if due.is_empty() {
            return;
        }
        for verdict in due {
            self.verdict(&verdict, Overlap::StillInFlight(RETRY_VERDICT_WINDOW), now);
        }
    }

    /// Reports a deferred verdict that was not a retry.
    pub(super) fn verdict(&self, verdict: &PendingVerdict, overlap: Overlap, now: Millis) {
        let ctx = self.context(now);
        let mut found = Vec::new();
        rules::on_verdict(
            &verdict.key,
            &verdict.first,
            &verdict.second,
            overlap,
            &ctx,
            &mut found,
        );
        for violation in found {
            self.emit(violation, false);
        }
    }

    pub(super) fn count_retry(&self, command: &str) {
        self.retries[command_index(command)].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn inspect<'a>(
        &self,
        conn: u64,
        cell: Option<&ConnCell>,
        request_id: i32,
        view: RequestView<'a>,
        now: Millis,
        seq: u64,
    ) -> Inspected<'a> {
        let class = CommandClass::of(view.name);
        let (client, owner, upstream) = self.connection_facts(cell, &view, class);
        let namespace = view.namespace();
        let request = RequestRef {
            conn,
            at: now,
            txn_number: view.txn_number,
            request_id,
            client,
            command: self.tables.symbol(view.name),
            namespace: self.tables.namespace(namespace.db, namespace.collection),
        };
        let key = view.lsid.map(|lsid| SessionKey { lsid, owner });
        let facts = RequestFacts {
            request,
            class,
            // Only session requests need an identity (retries, reuse).
            statement: if key.is_some() {
                view.statement_hash()
            } else {
                0
            },
            upstream,
            in_transaction: view.in_transaction(),
            start_transaction: view.start_transaction,
            retryable_write: view.is_retryable_write(),
            unacknowledged: view.unacknowledged,
            expects_reply: !view.more_to_come,
        };
        Inspected {
            targets: Targets::of(&view, class),
            view,
            facts,
            key,
            owner,
            seq,
        }
    }

    /// The cursor a getMore / killCursors addresses, when the proxy saw it
    /// opened (for killCursors: the first one opened under another session).
    pub(super) fn cursor_event(&self, inspected: &Inspected<'_>) -> Option<CursorEvent> {
        let upstream = inspected.facts.upstream;
        let make = |cursor_id: i64, entry: CursorEntry| CursorEvent {
            cursor_id,
            key: inspected.key,
            facts: inspected.facts,
            owner: entry.owner,
            opened_by: entry.opened_by,
        };
        match inspected.facts.class {
            CommandClass::GetMore => {
                let id = inspected.targets.get_more_cursor?;
                let entry = self.ledger.cursor(&CursorKey { upstream, id })?;
                Some(make(id, entry))
            }
            CommandClass::KillCursors => inspected.targets.killed_cursors.iter().find_map(|&id| {
                let entry = self.ledger.cursor(&CursorKey { upstream, id })?;
                (Some(entry.owner) != inspected.key).then(|| make(id, entry))
            }),
            _ => None,
        }
    }

    /// State changes of a forwarded request outside its own session entry.
    /// A session command's effect is held until its reply (`settle_effect`);
    /// what the client itself let go of (a getMore whose cursor it kills)
    /// changes now. Returns what the reply (or the close) will need, when
    /// the engine follows the request and a reply is due.
    pub(super) fn apply_request_effects(
        &self,
        inspected: &Inspected<'_>,
        cell: Option<&ConnCell>,
        end_kind: Option<EndKind>,
        ended_in_flight: Vec<Violation>,
        destroys: Vec<crate::web_store::StoreOp>,
        now: Millis,
    ) -> Option<PendingRequest> {
        let facts = &inspected.facts;
        if facts.class == CommandClass::KillCursors {
            // A getMore still waiting on a cursor the client kills (a change
            // stream or tailable cursor closed mid-await) no longer holds its
            // session: the driver may hand the session on right away, without
            // waiting for the kill's reply. The client's letting go is the
            // fact here; it can only silence concurrent-use, never raise it.
            let mut owners: Vec<SessionKey> = inspected.key.into_iter().collect();
            for &id in &inspected.targets.killed_cursors {
                let key = CursorKey {
                    upstream: facts.upstream,
                    id,
                };
                if let Some(entry) = self.ledger.cursor(&key) {
                    if !owners.contains(&entry.owner) {
                        owners.push(entry.owner);
                    }
                }
            }
            for owner in owners {
                self.ledger
                    .with_existing(&owner, |state| state.in_flight.abandon_get_mores());
            }
        }
        let effect = if destroys.is_empty() {
            self.held_effect(inspected, end_kind, ended_in_flight)
        } else {
            Some(Effect {
                command: None,
                by: facts.request,
                kind: EffectKind::StoreDestroy { ops: destroys },
            })
        };
        let tracked = inspected.key.is_some()
            || effect.is_some()
            || matches!(facts.class, CommandClass::Hello | CommandClass::Auth);
        // Forwarded session requests go to the connection's ring (for
        // timelines), and so do commands that end sessions from outside
        // them (the earlier request of use-after-end).
        let in_ring = inspected.key.is_some()
            || end_kind.is_some()
            || facts.class == CommandClass::KillAllSessions;
        if !(tracked && facts.expects_reply) {
            if in_ring {
                if let Some(mut conn) = cell.map(lock) {
                    conn.ops.record(inspected.key, facts.request, inspected.seq);
                }
            }
            if let Some(effect) = effect {
                // moreToCome: no reply will ever say.
                self.settle_effect(effect, EffectOutcome::Unconfirmed, facts.upstream, now);
            }
            return None;
        }
        let mut conn = cell.map(lock)?;
        let op = in_ring.then(|| conn.ops.record(inspected.key, facts.request, inspected.seq));
        let pending = PendingRequest {
            key: inspected.key,
            entry: InFlight {
                request: facts.request,
                statement: facts.statement,
                class: facts.class,
                abandoned: false,
                suspected: false,
            },
            in_transaction: facts.in_transaction,
            cursor: inspected.targets.get_more_cursor,
            op,
            effect: effect.map(Box::new),
        };
        conn.awaiting_replies = conn.awaiting_replies.saturating_add(1);
        conn.carried_sessions |= inspected.key.is_some();
        if let Some(key) = inspected.key.filter(|_| facts.in_transaction) {
            if conn.txn_sessions.last() != Some(&key) {
                conn.txn_sessions.retain(|known| *known != key);
                if conn.txn_sessions.len() == TXN_SESSIONS_PER_CONN {
                    conn.txn_sessions.remove(0);
                }
                conn.txn_sessions.push(key);
            }
        }
        Some(pending)
    }

    /// The effect a session command will have once the server confirms it.
    pub(super) fn held_effect(
        &self,
        inspected: &Inspected<'_>,
        end_kind: Option<EndKind>,
        ended_in_flight: Vec<Violation>,
    ) -> Option<Effect> {
        let facts = &inspected.facts;
        if !facts.class.waits_for_outcome() {
            return None;
        }
        let command = Some(SessionCommand::of(inspected.view.name)?);
        let sessions = || inspected.targets.sessions.clone();
        let kind = match (facts.class, end_kind) {
            (_, Some(kind)) => EffectKind::End {
                kind,
                owner: inspected.owner,
                sessions: sessions(),
                in_flight: ended_in_flight,
            },
            (CommandClass::KillAllSessions, _) => EffectKind::KillAll {
                targets: self.kill_targets(inspected),
            },
            (CommandClass::RefreshSessions, _) => EffectKind::Refresh {
                owner: inspected.owner,
                sessions: sessions(),
            },
            (CommandClass::KillCursors, _) => EffectKind::KillCursors {
                upstream: facts.upstream,
                cursors: inspected.targets.killed_cursors.clone(),
            },
            _ => return None,
        };
        Some(Effect {
            command,
            by: facts.request,
            kind,
        })
    }

    /// killAllSessions(ByPattern)'s patterns, resolved against the owners
    /// the proxy knows now.
    pub(super) fn kill_targets(&self, inspected: &Inspected<'_>) -> Vec<KillTarget> {
        let patterns = inspected.view.kill_patterns();
        if patterns.contains(&KillPattern::Unmatchable) {
            tracing::debug!(
                conn = inspected.facts.request.conn,
                command = inspected.view.name,
                "a kill pattern names sessions by uid or role, which sessionguard cannot match; those sessions are not marked killed"
            );
        }
        patterns
            .iter()
            .map(|pattern| match pattern {
                KillPattern::All => KillTarget::All,
                KillPattern::Lsid(lsid) => KillTarget::Lsid(*lsid),
                KillPattern::User { user, db } => self
                    .tables
                    .known_owner(user, db)
                    .map_or(KillTarget::Nothing, KillTarget::Owner),
                KillPattern::Unmatchable => KillTarget::Nothing,
            })
            .collect()
    }

    /// Applies or drops a held effect once its outcome is known. Confirmed:
    /// it takes hold. Refused: nothing changes but a counter and, the first
    /// time per upstream and command, a log line. Unconfirmed (no reply
    /// will come): ends are recorded as unconfirmed — rules report on them
    /// at most as warnings and never reject — and the effects that can only
    /// silence rules (a refresh, a killed cursor) are taken as done, since
    /// assuming otherwise could only raise an alarm on a guess.
    pub(super) fn settle_effect(
        &self,
        effect: Effect,
        outcome: EffectOutcome,
        upstream: u32,
        now: Millis,
    ) {
        let confirmed = match outcome {
            EffectOutcome::Confirmed => true,
            EffectOutcome::Unconfirmed => false,
            EffectOutcome::Refused { refusal, code } => {
                if let Some(command) = effect.command {
                    self.refused(upstream, effect.by.conn, command, refusal, code);
                }
                return;
            }
        };
        match effect.kind {
            EffectKind::End {
                kind,
                owner,
                sessions,
                in_flight,
            } => {
                for lsid in sessions {
                    let key = SessionKey { lsid, owner };
                    if let Some(events) = self.ledger.end(key, kind, effect.by, confirmed, now) {
                        self.lifecycle.ended(kind, events);
                    }
                }
                for violation in in_flight {
                    // Unconfirmed, its words say so (`rules::wording`).
                    self.emit(violation.unconfirmed(!confirmed), false);
                }
            }
            EffectKind::KillAll { targets } => {
                if targets.iter().all(|target| *target == KillTarget::Nothing) {
                    return;
                }
                let kind = EndKind::KilledByPattern;
                for key in self.ledger.all_keys() {
                    if targets.iter().any(|target| target.matches(&key)) {
                        if let Some(events) = self.ledger.end(key, kind, effect.by, confirmed, now)
                        {
                            self.lifecycle.ended(kind, events);
                        }
                    }
                }
            }
            EffectKind::Refresh { owner, sessions } => {
                for lsid in sessions {
                    self.ledger
                        .with_existing(&SessionKey { lsid, owner }, |state| {
                            if !state.is_ended() {
                                state.last_refreshed = now;
                            }
                        });
                }
            }
            EffectKind::KillCursors { upstream, cursors } => {
                for id in cursors {
                    self.ledger.remove_cursor(&CursorKey { upstream, id });
                }
            }
            EffectKind::StoreDestroy { ops } => {
                self.stores
                    .settle_destroys(&ops, &effect.by, confirmed, now);
            }
        }
    }

    /// A session command the upstream refused: counted, and said once per
    /// upstream and command (the refresher's refusals come here too).
    pub(crate) fn refused(
        &self,
        upstream: u32,
        conn: u64,
        command: SessionCommand,
        refusal: Refusal,
        code: Option<i32>,
    ) {
        self.refusals.count(command, refusal);
        let Some(state) = self.upstreams.get(&upstream) else {
            return;
        };
        let stops_refreshing = command == SessionCommand::RefreshSessions && refusal.unsupported();
        if stops_refreshing {
            state.refresh_unsupported.store(true, Ordering::Relaxed);
        }
        if !state.first_refusal(command) {
            return;
        }
        let listener = state.listener;
        drop(state);
        let then = if stops_refreshing {
            "; sessionguard stops refreshing sessions on this upstream (held sessions there can expire while idle)"
        } else {
            ""
        };
        tracing::warn!(
            conn,
            listener = %listener,
            command = command.as_str(),
            code,
            code_name = refusal.as_str(),
            "the upstream refused {command} ({code_name}): {means}; nothing changes — {effect}{then}. Later \
             refusals of {command} on this upstream are only counted (sessionguard_session_commands_refused_total)",
            code_name = refusal.as_str(),
            command = command.as_str(),
            means = refusal.means(),
            effect = command.refused_means(),
        );
    }

    pub(super) fn reject_reply(&self, violation: &Violation) -> Vec<u8> {
        // The one place a message is worded at request time: a rejection.
        let message = rules::wording(violation, self);
        let errmsg = format!("sessionguard: {}: {message}", violation.rule);
        let doc = bson::rawdoc! {
            "ok": 0.0,
            "errmsg": errmsg,
            "code": SESSIONGUARD_VIOLATION_CODE,
            "codeName": SESSIONGUARD_VIOLATION_CODE_NAME,
        };
        doc.into_bytes()
    }

    // ---- replies ----

    /// Inspects a reply to the request `pending` stands for (its record,
    /// from `request`) before it is forwarded. After a final reply (no
    /// `moreToCome`) the caller drops `pending`; after a streamed one it
    /// keeps it for the next. Replies that match no request are not
    /// shown to the engine.
    /// `conn` is looked up in the connection table; the data path holds
    /// a `ConnHandle` and calls `reply_on` instead.
    pub fn reply(&self, conn: u64, pending: &mut PendingRequest, message: &Message<'_>) {
        self.reply_at(conn, pending, message, self.now())
    }

    /// `reply` on the connection `conn` stands for (from `connect`).
    pub fn reply_on(&self, conn: &ConnHandle, pending: &mut PendingRequest, message: &Message<'_>) {
        self.reply_timed(Some(&conn.cell), pending, message, self.now())
    }

    pub fn reply_at(
        &self,
        conn: u64,
        pending: &mut PendingRequest,
        message: &Message<'_>,
        now: Millis,
    ) {
        let cell = self.conn_cell(conn);
        self.reply_timed(cell.as_deref(), pending, message, now)
    }

    fn reply_timed(
        &self,
        cell: Option<&ConnCell>,
        pending: &mut PendingRequest,
        message: &Message<'_>,
        now: Millis,
    ) {
        let Some(reply) = ReplyView::from_message(message) else {
            return;
        };
        self.decide_due_verdicts(now);
        let final_reply = !reply.more_to_come;
        let response_to = pending.entry.request.request_id;
        // One lock of the connection per reply: the upstream its cursors
        // live on and the handshake / auth outcome come from (or go to) it.
        let upstream = {
            let Some(mut state) = cell.map(lock) else {
                return;
            };
            if final_reply {
                state.awaiting_replies = state.awaiting_replies.saturating_sub(1);
            }
            if let Some(op) = pending.op {
                state.ops.replied(op, response_to, now);
            }
            match pending.entry.class {
                CommandClass::Hello => self.hello_reply(&mut state, &reply),
                CommandClass::Auth => {
                    let done = reply.boolean("done") == Some(true);
                    let single_step = state.pending_auth.is_some_and(|p| p.single_step);
                    if !reply.ok {
                        state.pending_auth = None;
                    } else if done || single_step {
                        self.confirm_owner(&mut state);
                    }
                }
                _ => {}
            }
            state.upstream
        };
        // Only session commands and store deletes hold an effect.
        let effect = if final_reply {
            pending.effect.take()
        } else {
            None
        };
        if let Some(effect) = effect {
            let effect = *effect;
            // A delete with writeErrors deleted nothing it was refused.
            let done = match effect.kind {
                EffectKind::StoreDestroy { .. } => reply.is_clean_success(),
                _ => reply.ok,
            };
            let outcome = if done {
                EffectOutcome::Confirmed
            } else {
                EffectOutcome::Refused {
                    refusal: Refusal::of(reply.code, reply.code_name),
                    code: reply.code,
                }
            };
            self.settle_effect(effect, outcome, upstream, now);
        }
        let Some(key) = pending.key else { return };
        let facts = reply_facts(&reply, pending.in_transaction);
        let ctx = self.context(now);
        let mut found = Vec::new();
        let mut suspected = false;
        let enabled = |rule| self.rules.enabled(rule);
        // The cursor map first: a cursor of this session is counted in the
        // one lookup of the session below (no rule reads the count).
        let cursor = self.cursor_reply(&key, pending, upstream, &reply);
        let (own_cursor, other_cursor) = match cursor {
            Some((owner, change)) if owner == key => (Some(change), None),
            other => (None, other),
        };
        self.ledger.with_existing(&key, |state| {
            rules::on_reply(
                enabled,
                &key,
                &pending.entry,
                &facts,
                state,
                &ctx,
                &mut found,
            );
            let applied = state.apply_reply(&pending.entry, &facts, final_reply, now);
            self.lifecycle.transactions(applied.txn);
            suspected = applied.suspected;
            if let Some(change) = own_cursor {
                state.cursors_changed(change);
            }
        });
        if let Some((owner, change)) = other_cursor {
            // getMore drove another session's cursor.
            self.ledger
                .with_existing(&owner, |state| state.cursors_changed(change));
        }
        if suspected {
            self.decide_verdicts(&key, &pending.entry.request, true, now);
        }
        for violation in found {
            self.emit(violation, false);
        }
    }

    /// The reply's effect on the cursor map: a cursor opened or exhausted.
    /// Returns whose open-cursor count changes and by how much, for the
    /// caller to apply in its lookup of that session.
    pub(super) fn cursor_reply(
        &self,
        key: &SessionKey,
        pending: &PendingRequest,
        upstream: u32,
        reply: &ReplyView<'_>,
    ) -> Option<(SessionKey, i8)> {
        match pending.entry.class {
            CommandClass::GetMore => {
                let id = pending.cursor?;
                let exhausted = reply.cursor_id == Some(0)
                    || (!reply.ok && reply.code == Some(CURSOR_NOT_FOUND));
                if !exhausted {
                    return None;
                }
                let entry = self.ledger.take_cursor(&CursorKey { upstream, id })?;
                Some((entry.owner, -1))
            }
            CommandClass::KillCursors => None,
            _ => {
                let id = reply.cursor_id.filter(|id| *id != 0)?;
                let entry = CursorEntry {
                    owner: *key,
                    opened_by: pending.entry.request,
                };
                self.ledger
                    .insert_cursor(CursorKey { upstream, id }, entry)
                    .then_some((*key, 1))
            }
        }
    }

    // ---- close ----

    /// The client connection closed, because of `cause`, with
    /// `still_in_flight` never (finally) answered: the records `request`
    /// handed out for them, oldest first.
    pub fn close(
        &self,
        conn: u64,
        cause: CloseCause,
        still_in_flight: impl IntoIterator<Item = PendingRequest>,
    ) {
        self.close_at(conn, cause, still_in_flight, self.now())
    }

    /// `close` at a given engine time. Every request still in flight on the
    /// connection is released (so the driver's retry elsewhere finds the
    /// session free) and counted by `cause`; closed-with-requests-in-flight
    /// judges them only when the client closed or reset its side first.
    /// Verdicts waiting on them are decided: retries. Held effects are
    /// settled as unconfirmed.
    pub fn close_at(
        &self,
        conn: u64,
        cause: CloseCause,
        still_in_flight: impl IntoIterator<Item = PendingRequest>,
        now: Millis,
    ) {
        let Some((_, cell)) = self.conns.remove(&conn) else {
            return;
        };
        // Out of the table, nobody else reaches it; the data thread's handle
        // is dropped after this returns.
        let state = lock(&cell);
        let ctx = self.context(now);
        // Only a close the client made is judged (see `rules::Hook::Close`).
        let judge = cause.client_went_first();
        let enabled = |rule| self.rules.enabled(rule);
        // Settled after every request is released, as unconfirmed.
        let mut effects: Vec<Effect> = Vec::new();
        for mut pending in still_in_flight {
            if let Some(effect) = pending.effect.take() {
                effects.push(*effect);
            }
            let Some(key) = pending.key else { continue };
            self.in_flight_abandoned[cause.index()].fetch_add(1, Ordering::Relaxed);
            let mut found = Vec::new();
            let mut suspected = false;
            self.ledger.with_existing(&key, |session| {
                // The session's copy knows whether the client abandoned it.
                let entry = session
                    .in_flight
                    .find(pending.entry.request.conn, pending.entry.request.request_id)
                    .copied()
                    .unwrap_or(pending.entry);
                if judge {
                    rules::on_close(enabled, &key, &entry, now, &ctx, &mut found);
                }
                suspected = session.connection_closed(&entry);
            });
            if suspected {
                self.decide_verdicts(&key, &pending.entry.request, false, now);
            }
            for violation in found {
                // The connection has left the map: its ring comes along.
                self.emit_from(violation, false, Some((conn, &state)));
            }
        }
        if !cause.client_went_first() {
            // A failover, a network cut or the proxy itself ended the
            // connection: the server may have aborted the transactions it
            // carried (a step-down does), and the driver, its pool cleared,
            // fails their commit without sending it and retries with the
            // next txnNumber. Their outcome is unknown, so that retry must
            // not read as superseding an open transaction.
            for key in &state.txn_sessions {
                self.ledger
                    .with_existing(key, |session| session.transaction_cut());
            }
        }
        for effect in effects {
            self.settle_effect(effect, EffectOutcome::Unconfirmed, state.upstream, now);
        }
    }

    // ---- time-driven ----

    /// Time-driven checks (transactions left open) and, at most once a
    /// minute, purging of old tombstones and long-expired sessions.
    pub fn sweep(&self) {
        self.sweep_at(self.now())
    }

    pub fn sweep_at(&self, now: Millis) {
        self.decide_due_verdicts(now);
        // A flood that stopped still gets its last summary line.
        let due = self.findings_table().due_summaries(now);
        for summary in &due {
            log_summary(summary);
        }
        let ctx = self.context(now);
        // Sweep rules run even when disabled: their findings are metrics.
        for key in self.ledger.held_keys() {
            let found = self.ledger.with_existing(&key, |state| {
                let mut found = Vec::new();
                rules::on_sweep(&key, state, &ctx, &mut found);
                if found.iter().any(|v| v.rule == RuleId::TxnLeftOpen) {
                    // Reported once per transaction.
                    if let Some(txn) = state.txn.as_deref_mut() {
                        txn.left_open_reported = true;
                    }
                }
                found
            });
            for violation in found.into_iter().flatten() {
                if violation.rule == RuleId::TxnLeftOpen {
                    self.lifecycle
                        .transactions_left_open
                        .fetch_add(1, Ordering::Relaxed);
                }
                if self.rules.enabled(violation.rule) {
                    self.emit(violation, false);
                }
            }
        }
        let last = self.last_purge.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PURGE_EVERY
            && self
                .last_purge
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let purged = self.ledger.purge(
                now,
                millis(self.config.ended_retention),
                millis(self.session_timeout()),
            );
            if purged > 0 {
                tracing::debug!(
                    purged,
                    "purged old session tombstones and long-expired sessions"
                );
            }
        }
    }
}

/// Whether `violation` rejects its request under `rules`: its rule's action
/// is reject and it does not rest on an unconfirmed effect.
pub(super) fn rejects(rules: &ResolvedRules, violation: &Violation) -> bool {
    violation.rejects(rules.get(violation.rule).action)
}

pub(super) fn reply_facts(reply: &ReplyView<'_>, in_transaction: bool) -> ReplyFacts {
    let no_such_transaction = reply.code == Some(NO_SUCH_TRANSACTION)
        || reply
            .write_error_codes()
            .any(|code| code == NO_SUCH_TRANSACTION);
    ReplyFacts {
        ok: reply.ok,
        clean_success: reply.is_clean_success(),
        in_transaction,
        transient: reply.has_label("TransientTransactionError"),
        no_such_transaction,
        unknown_commit_result: reply.has_label("UnknownTransactionCommitResult"),
        retryable: reply.has_label("RetryableWriteError"),
        overloaded: reply.has_label("SystemOverloadedError") || reply.has_label("RetryableError"),
        write_concern_error: reply.write_concern_error_code.is_some(),
    }
}
