//! The session hygiene rules, one plain function each:
//! `(event, &state, &context) -> Option<Violation>`, what was found kept as
//! data ([`Says`]) and put into words by [`wording`] only when a violation
//! is logged, listed or answers a rejected request. They read; they never
//! change state, touch a map, log or look at a clock (the time is in the
//! context). Every rule is listed once in [`REGISTRY`] with the hooks it
//! runs on ([`Hook`]: request, end, cursor, reply, close, sweep, store
//! write, deferred verdict); the engine runs the registry at each point of
//! its pipeline (the `on_*` runners below) for the rules enabled, and
//! applies the state transition afterwards. No rule is called by hand
//! anywhere else.
//!
//! Every rule is written to stay silent on what drivers legitimately do:
//! retryable writes resent with the same txnNumber and statements, commit and
//! abort retried with the same number, abortTransaction after the server
//! aborted the transaction, getMore on the cursor's own session, endSessions /
//! killCursors fired and forgotten at client close, `with_transaction` retry
//! loops, and pooled implicit sessions reused one operation after another.
//! A false positive is the worst bug this tool can have.
//!
//! # Judged by outcome
//!
//! Rules judge what the server did, not what a request asked for. The
//! engine applies an effect (a session ended or killed, a refresh, a cursor
//! killed, a transaction committed) only when the server's reply says ok:1;
//! a refused command changes nothing. When the reply never comes (the
//! client closed first, the connection failed), the effect is *unconfirmed*:
//! a rule that rests on it reports at most a warning saying so
//! ([`Violation::unconfirmed`]) and enforce mode never rejects on it. Rules
//! that rest only on what the proxy saw (a request really in flight, a
//! txnNumber really sent) are judged at request time and may reject.
//!
//! Every "this looks like a retry" exemption was checked against that
//! principle; the ones kept rest on protocol facts, not resemblance:
//!
//! - concurrent-use: the same command again on another connection while the
//!   first is in flight ([`retry_suspect`]) is *not* excused by looking
//!   like a retry. Its verdict is deferred: a retry if the first request's
//!   connection then closes without delivering its reply, concurrent use if
//!   the reply is delivered ([`concurrent_use_confirmed`]), or if the first
//!   is still unanswered on its open connection when the verdict's window
//!   ends (a driver retries only after it gave up on the first connection,
//!   which the proxy sees within milliseconds).
//! - txn-number-reuse: the same statements under the same lsid and
//!   txnNumber are deduplicated by the server itself (retryable-writes
//!   spec): nothing can be lost, which is all the rule is about. Whether
//!   the two overlapped is concurrent-use's (deferred) business.
//! - txn-superseded: the same txnNumber again (a first statement resent) is
//!   the same transaction by definition, not a new one.
//! - txn-after-abort: re-running commitTransaction after a commit's own
//!   reply said the transaction was aborted is allowed by the transactions
//!   spec (commit may be called again); the reply is the outcome it rests on.
//! - closed-with-requests-in-flight: endSessions and killCursors are fired
//!   and forgotten at close by specification (drivers ignore their errors
//!   and do not wait); and only a close the client made counts at all.

use std::time::Duration;

use super::intern::Names;
use super::state::{
    ClientId, CommandClass, EndKind, InFlight, Millis, ReplyFacts, RequestFacts, RequestRef,
    SessionKey, SessionState, TxnPhase,
};
use super::violation::{RuleId, Says, StoreFinding, Violation};
use super::web_store::Resurrection;

/// A point of the engine's pipeline where rules run, with the function the
/// rule runs there. What each one sees, and when:
#[derive(Clone, Copy)]
pub(crate) enum Hook {
    /// A request carrying an lsid, with its session as it is before the
    /// request changes anything (the verdict may reject it).
    Request(fn(&RequestEvent, &SessionState, &RuleContext<'_>) -> Option<Violation>),
    /// endSessions / killSessions naming a session, at request time: a
    /// `Reject` action rejects the end; otherwise the finding waits for the
    /// server to confirm the end.
    End(fn(&EndEvent, &SessionState, &RuleContext<'_>) -> Option<Violation>),
    /// getMore / killCursors on a cursor the proxy saw opened, at request time.
    Cursor(fn(&CursorEvent, &RuleContext<'_>) -> Option<Violation>),
    /// The reply to a session request, with the session as it is before the
    /// reply is applied.
    Reply(
        fn(
            &SessionKey,
            &InFlight,
            &ReplyFacts,
            &SessionState,
            &RuleContext<'_>,
        ) -> Option<Violation>,
    ),
    /// A session request still in flight when the client closed (or reset)
    /// its connection, at the close time given.
    Close(fn(&SessionKey, &InFlight, Millis, &RuleContext<'_>) -> Option<Violation>),
    /// The periodic sweep, for each session the ledger holds. Evaluated
    /// even when the rule is disabled: its finding is also a metric (the
    /// engine counts it, and reports it only when enabled).
    Sweep(fn(&SessionKey, &SessionState, &RuleContext<'_>) -> Option<Violation>),
    /// A web-session store write that would bring back a destroyed
    /// document (`web_store` finds it), with the writer's session (all-zero
    /// lsid when it carried none) and the store's label.
    StoreWrite(fn(&Resurrection, SessionKey, &str, &RuleContext<'_>) -> Option<Violation>),
    /// A deferred verdict on two identical requests of one session
    /// (`retry_suspect`) that turned out not to be a retry. Decided even if
    /// a reload disabled the rule since it was deferred.
    Verdict(fn(&SessionKey, &RequestRef, &RequestRef, Overlap, &RuleContext<'_>) -> Violation),
}

/// A rule and the hooks it runs on.
pub(crate) struct Rule {
    pub id: RuleId,
    pub hooks: &'static [Hook],
}

/// Every rule, once. Rules run in this order at a hook (it decides the
/// order of the findings of one request, and which error a rejection
/// quotes when two rules with the same severity reject it).
pub(crate) const REGISTRY: [Rule; RuleId::COUNT] = [
    Rule {
        id: RuleId::UseAfterEnd,
        hooks: &[Hook::Request(use_after_end)],
    },
    Rule {
        id: RuleId::ConcurrentUse,
        hooks: &[
            Hook::Request(concurrent_use),
            Hook::Verdict(concurrent_use_confirmed),
        ],
    },
    Rule {
        id: RuleId::CrossClientSharing,
        hooks: &[Hook::Request(cross_client_sharing)],
    },
    Rule {
        id: RuleId::TxnRegression,
        hooks: &[Hook::Request(txn_regression)],
    },
    Rule {
        id: RuleId::TxnNumberReuse,
        hooks: &[Hook::Request(txn_number_reuse)],
    },
    Rule {
        id: RuleId::TxnSuperseded,
        hooks: &[Hook::Request(txn_superseded)],
    },
    Rule {
        id: RuleId::TxnAfterAbort,
        hooks: &[
            Hook::Request(txn_after_abort),
            Hook::Reply(txn_after_abort_on_reply),
        ],
    },
    Rule {
        id: RuleId::UnacknowledgedWithSession,
        hooks: &[Hook::Request(unacknowledged_with_session)],
    },
    Rule {
        id: RuleId::IdleExpiredReuse,
        hooks: &[Hook::Request(idle_expired_reuse)],
    },
    Rule {
        id: RuleId::EndWhileInFlight,
        hooks: &[Hook::End(end_while_in_flight)],
    },
    Rule {
        id: RuleId::ClosedWithRequestsInFlight,
        hooks: &[Hook::Close(closed_with_requests_in_flight)],
    },
    Rule {
        id: RuleId::TxnLeftOpen,
        hooks: &[Hook::Sweep(txn_left_open)],
    },
    Rule {
        id: RuleId::CursorSessionMismatch,
        hooks: &[Hook::Cursor(cursor_session_mismatch)],
    },
    Rule {
        id: RuleId::StoreSessionResurrected,
        hooks: &[Hook::StoreWrite(store_session_resurrected)],
    },
];

/// The hooks of the rules `enabled` says are on, in registry order.
fn hooks(enabled: impl Fn(RuleId) -> bool) -> impl Iterator<Item = (RuleId, &'static Hook)> {
    REGISTRY
        .iter()
        .filter(move |rule| enabled(rule.id))
        .flat_map(|rule| rule.hooks.iter().map(move |hook| (rule.id, hook)))
}

/// Whether any enabled rule runs on the hook `is` matches (to skip the
/// work of building that hook's event).
pub(crate) fn any_on(enabled: impl Fn(RuleId) -> bool, is: impl Fn(&Hook) -> bool) -> bool {
    hooks(enabled).any(|(_, hook)| is(hook))
}

/// Runs the enabled request rules.
pub(crate) fn on_request(
    enabled: impl Fn(RuleId) -> bool,
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(enabled) {
        if let Hook::Request(check) = hook {
            // Not `extend`: moving each (almost always empty) Option
            // through an iterator copied the whole Violation per rule.
            if let Some(violation) = check(ev, state, ctx) {
                found.push(violation);
            }
        }
    }
}

/// Runs the enabled end rules.
pub(crate) fn on_end(
    enabled: impl Fn(RuleId) -> bool,
    ev: &EndEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(enabled) {
        if let Hook::End(check) = hook {
            found.extend(check(ev, state, ctx));
        }
    }
}

/// Runs the enabled cursor rules.
pub(crate) fn on_cursor(
    enabled: impl Fn(RuleId) -> bool,
    ev: &CursorEvent,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(enabled) {
        if let Hook::Cursor(check) = hook {
            found.extend(check(ev, ctx));
        }
    }
}

/// Runs the enabled reply rules.
pub(crate) fn on_reply(
    enabled: impl Fn(RuleId) -> bool,
    key: &SessionKey,
    entry: &InFlight,
    reply: &ReplyFacts,
    state: &SessionState,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(enabled) {
        if let Hook::Reply(check) = hook {
            found.extend(check(key, entry, reply, state, ctx));
        }
    }
}

/// Runs the enabled close rules on one request left in flight.
pub(crate) fn on_close(
    enabled: impl Fn(RuleId) -> bool,
    key: &SessionKey,
    entry: &InFlight,
    closed_at: Millis,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(enabled) {
        if let Hook::Close(check) = hook {
            found.extend(check(key, entry, closed_at, ctx));
        }
    }
}

/// Runs every sweep rule, enabled or not (see `Hook::Sweep`).
pub(crate) fn on_sweep(
    key: &SessionKey,
    state: &SessionState,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(|_| true) {
        if let Hook::Sweep(check) = hook {
            found.extend(check(key, state, ctx));
        }
    }
}

/// Runs the enabled store-write rules on a resurrection.
pub(crate) fn on_store_write(
    enabled: impl Fn(RuleId) -> bool,
    resurrection: &Resurrection,
    key: SessionKey,
    label: &str,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(enabled) {
        if let Hook::StoreWrite(check) = hook {
            found.extend(check(resurrection, key, label, ctx));
        }
    }
}

/// Decides a deferred verdict (every verdict rule, see `Hook::Verdict`).
pub(crate) fn on_verdict(
    key: &SessionKey,
    first: &RequestRef,
    second: &RequestRef,
    overlap: Overlap,
    ctx: &RuleContext<'_>,
    found: &mut Vec<Violation>,
) {
    for (_, hook) in hooks(|_| true) {
        if let Hook::Verdict(decide) = hook {
            found.push(decide(key, first, second, overlap, ctx));
        }
    }
}

/// What the rules need besides the event and the session.
pub(crate) struct RuleContext<'a> {
    pub now: Millis,
    /// The server's session timeout (configured, or learned from hello).
    pub session_timeout: Millis,
    pub transaction_max_open: Millis,
    pub names: &'a dyn Names,
}

/// A request that carries an lsid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestEvent {
    pub key: SessionKey,
    pub facts: RequestFacts,
}

/// A getMore / killCursors on a cursor the proxy saw being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CursorEvent {
    pub cursor_id: i64,
    /// The request's session, if it carried one.
    pub key: Option<SessionKey>,
    pub facts: RequestFacts,
    /// The session that opened the cursor, and the request that did.
    pub owner: SessionKey,
    pub opened_by: RequestRef,
}

/// `endSessions` / `killSessions` naming a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndEvent {
    pub key: SessionKey,
    pub kind: EndKind,
    pub request: RequestRef,
}

fn duration(ms: Millis) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(ms))
}

fn short(key: &SessionKey) -> String {
    key.lsid.short().to_string()
}

/// `concurrent-use`: a request on a session that already has one in flight.
pub(crate) fn concurrent_use(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    // A cursor reaper's killCursors may overlap the session's next
    // operation; it touches nothing but the cursor.
    if ev.facts.class == CommandClass::KillCursors {
        return None;
    }
    let current = &ev.facts;
    // The same command in flight elsewhere is not judged here: its verdict
    // waits for the outcome (`retry_suspect`).
    let other = state
        .in_flight
        .iter()
        .find(|other| still_using(other) && !same_command_elsewhere(current, other))?;
    Some(
        Violation::new(RuleId::ConcurrentUse, ev.key, ctx.now, Says::ConcurrentUse)
            .current(current.request)
            .earlier(other.request),
    )
}

/// An in-flight request that still means the session is busy: not a
/// killCursors (cursor reapers overlap freely) and not a getMore whose
/// cursor the client already killed.
fn still_using(entry: &InFlight) -> bool {
    entry.class != CommandClass::KillCursors && !entry.abandoned
}

/// The same command again on another connection: same name, txnNumber and
/// statement identity (command, namespace, statements; the envelope, write
/// concern included, is not part of it — and commit / abort carry nothing
/// but envelope, so for them the number is enough). A driver's retry on a
/// new connection looks exactly like this, and so do identical operations
/// sharing one session at once: only the outcome tells them apart.
fn same_command_elsewhere(current: &RequestFacts, other: &InFlight) -> bool {
    other.request.conn != current.request.conn
        && other.request.command == current.request.command
        && other.request.txn_number == current.request.txn_number
        && (other.statement == current.statement
            || matches!(current.class, CommandClass::Commit | CommandClass::Abort))
}

/// The request in flight on another connection that `ev` repeats exactly
/// (see `same_command_elsewhere`), when nothing else is in flight on the
/// session that `concurrent_use` would report first. Neither reported nor
/// excused: the engine defers the verdict until the first request's
/// outcome is known (retry if its connection fails without its reply,
/// concurrent use if its reply is delivered), bounded in time and number.
pub(crate) fn retry_suspect(ev: &RequestEvent, state: &SessionState) -> Option<InFlight> {
    if ev.facts.class == CommandClass::KillCursors {
        return None;
    }
    state
        .in_flight
        .iter()
        .find(|other| still_using(other) && same_command_elsewhere(&ev.facts, other))
        .copied()
}

/// How a deferred concurrent-use verdict was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overlap {
    /// The first request's reply was delivered: both were answered.
    Answered,
    /// The first request was still unanswered, on a connection that stayed
    /// open, when the verdict's window (this long) ended.
    StillInFlight(Millis),
}

/// `concurrent-use`, decided late: `second` repeated `first` exactly on
/// another connection while `first` was in flight, and `first`'s connection
/// did not fail — so it was not a retry.
pub(crate) fn concurrent_use_confirmed(
    key: &SessionKey,
    first: &RequestRef,
    second: &RequestRef,
    overlap: Overlap,
    ctx: &RuleContext<'_>,
) -> Violation {
    let unanswered_after = match overlap {
        Overlap::Answered => None,
        Overlap::StillInFlight(window) => Some(window),
    };
    Violation::new(
        RuleId::ConcurrentUse,
        *key,
        ctx.now,
        Says::ConcurrentUseConfirmed { unanswered_after },
    )
    .current(*second)
    .earlier(*first)
}

/// `use-after-end`: a request on a session ended by endSessions or killed.
pub(crate) fn use_after_end(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    let ended = state.ended.as_deref()?;
    // Cleanup of what the session left behind is harmless: the server has
    // already killed the cursor / aborted the transaction.
    if ev.facts.class.is_session_cleanup() {
        return None;
    }
    let says = Says::UseAfterEnd {
        ended: ended.kind.verb(),
    };
    Some(
        Violation::new(RuleId::UseAfterEnd, ev.key, ctx.now, says)
            .current(ev.facts.request)
            .earlier(ended.by)
            .unconfirmed(!ended.confirmed),
    )
}

/// Appended to a violation that rests on an end whose reply never came.
const UNCONFIRMED_END: &str = " (the end is not confirmed: its reply never came — the client closed the \
     connection first, or the connection failed — so the server most likely, not certainly, ended the session; \
     reported as a warning and never rejected)";

/// `end-while-in-flight`: endSessions / killSessions names a session that
/// has a request in flight.
pub(crate) fn end_while_in_flight(
    ev: &EndEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    let other = state
        .in_flight
        .iter()
        .find(|other| still_using(other) && other.request.conn != ev.request.conn)?;
    let verb = match ev.kind {
        EndKind::Ended => "endSessions",
        EndKind::Killed | EndKind::KilledByPattern => "killSessions",
    };
    Some(
        Violation::new(
            RuleId::EndWhileInFlight,
            ev.key,
            ctx.now,
            Says::EndWhileInFlight { verb },
        )
        .current(ev.request)
        .earlier(other.request),
    )
}

/// `closed-with-requests-in-flight`: a client connection closed while a
/// session's request on it awaited its reply. The engine asks only when the
/// client closed or reset its side first: an upstream close, a network
/// failure, a frame the proxy gave up on, a drain or a shutdown is not the
/// application's doing (those are counted by close cause, never reported).
pub(crate) fn closed_with_requests_in_flight(
    key: &SessionKey,
    entry: &InFlight,
    closed_at: Millis,
    _ctx: &RuleContext<'_>,
) -> Option<Violation> {
    if entry.class.is_fire_and_forget_at_close() || entry.abandoned {
        return None;
    }
    Some(
        Violation::new(
            RuleId::ClosedWithRequestsInFlight,
            *key,
            closed_at,
            Says::ClosedWithRequestsInFlight,
        )
        .earlier(entry.request),
    )
}

/// `txn-regression`: a txnNumber lower than the highest seen on the session.
pub(crate) fn txn_regression(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    let number = ev.facts.request.txn_number?;
    let highest = state.highest_txn?;
    if number >= highest {
        return None;
    }
    let earlier = state
        .txn
        .as_deref()
        .filter(|txn| txn.number == highest)
        .map(|txn| txn.started_by)
        .or_else(|| {
            state
                .last_retryable
                .as_deref()
                .filter(|w| w.txn_number == highest)
                .map(|w| w.request)
        });
    let violation = Violation::new(
        RuleId::TxnRegression,
        ev.key,
        ctx.now,
        Says::TxnRegression { highest },
    )
    .current(ev.facts.request)
    .earlier(earlier);
    Some(violation)
}

/// `txn-number-reuse`: a retryable write reusing the lsid + txnNumber of a
/// *different* write, which the server will skip as a "retry".
pub(crate) fn txn_number_reuse(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    if !ev.facts.retryable_write {
        return None;
    }
    let number = ev.facts.request.txn_number?;
    let last = state.last_retryable_with(number)?;
    // The statement identity covers the command name, namespace and
    // statements: equal means a genuine retry.
    if last.statement == ev.facts.statement {
        return None;
    }
    Some(
        Violation::new(
            RuleId::TxnNumberReuse,
            ev.key,
            ctx.now,
            Says::TxnNumberReuse,
        )
        .current(ev.facts.request)
        .earlier(last.request),
    )
}

/// `txn-superseded`: a new transaction (or any higher txnNumber) on a
/// session whose transaction is still open.
pub(crate) fn txn_superseded(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    if !(ev.facts.start_transaction || ev.facts.retryable_write) {
        return None;
    }
    let number = ev.facts.request.txn_number?;
    let txn = state.txn.as_deref()?;
    if number <= txn.number || !txn.phase.is_open() {
        return None;
    }
    // Past the lifetime limit the server has aborted it on its own;
    // txn-left-open reports that case.
    if ctx.now.saturating_sub(txn.started_at) > ctx.transaction_max_open {
        return None;
    }
    let says = Says::TxnSuperseded {
        new_transaction: ev.facts.start_transaction,
        open: txn.number,
        started_at: txn.started_at,
        statements: txn.statements,
    };
    Some(
        Violation::new(RuleId::TxnSuperseded, ev.key, ctx.now, says)
            .current(ev.facts.request)
            .earlier(txn.started_by),
    )
}

/// `txn-after-abort`: statements or commit continuing a transaction the
/// server said it aborted (TransientTransactionError / NoSuchTransaction).
pub(crate) fn txn_after_abort(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    if !ev.facts.in_transaction {
        return None;
    }
    let number = ev.facts.request.txn_number?;
    let txn = state.txn.as_deref()?;
    if txn.number != number {
        return None;
    }
    let TxnPhase::ServerAborted { by_commit } = txn.phase else {
        return None;
    };
    // abortTransaction is the driver's correct cleanup; re-running a commit
    // whose reply said "aborted" is what the spec tells drivers to do.
    if ev.facts.class == CommandClass::Abort
        || (ev.facts.class == CommandClass::Commit && by_commit)
    {
        return None;
    }
    let violation = Violation::new(RuleId::TxnAfterAbort, ev.key, ctx.now, Says::TxnAfterAbort)
        .current(ev.facts.request)
        .earlier(txn.aborted_by);
    Some(violation)
}

/// `txn-after-abort`, proven late: after a statement error that did not say
/// whether the transaction survived, the next statement's reply is
/// NoSuchTransaction. Called with the state *before* the reply is applied.
pub(crate) fn txn_after_abort_on_reply(
    key: &SessionKey,
    entry: &InFlight,
    reply: &ReplyFacts,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    if !reply.in_transaction || !reply.no_such_transaction || entry.class == CommandClass::Abort {
        return None;
    }
    let number = entry.request.txn_number?;
    let txn = state.txn.as_deref()?;
    if txn.number != number || txn.phase != TxnPhase::LikelyAborted {
        return None;
    }
    let aborted_by = txn.aborted_by?;
    if aborted_by == entry.request {
        return None;
    }
    Some(
        Violation::new(
            RuleId::TxnAfterAbort,
            *key,
            ctx.now,
            Says::TxnAfterAbortOnReply,
        )
        .current(entry.request)
        .earlier(aborted_by),
    )
}

/// `txn-left-open`: a transaction open longer than `transaction_max_open`.
pub(crate) fn txn_left_open(
    key: &SessionKey,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    let txn = state.txn.as_deref()?;
    if txn.phase != TxnPhase::Open || txn.left_open_reported || state.ended.is_some() {
        return None;
    }
    let age = ctx.now.saturating_sub(txn.started_at);
    if age <= ctx.transaction_max_open {
        return None;
    }
    let says = Says::TxnLeftOpen {
        number: txn.number,
        started_at: txn.started_at,
        statements: txn.statements,
        limit: ctx.transaction_max_open,
    };
    Some(Violation::new(RuleId::TxnLeftOpen, *key, ctx.now, says).earlier(txn.started_by))
}

/// `cursor-session-mismatch`: getMore / killCursors for a cursor under a
/// session other than the one that opened it.
pub(crate) fn cursor_session_mismatch(
    ev: &CursorEvent,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    match ev.key {
        Some(key) if key == ev.owner => return None,
        Some(_) => {}
        // Drivers may omit the lsid on killCursors (the spec allows it for
        // cursor reapers); getMore must carry it.
        None if ev.facts.class == CommandClass::KillCursors => return None,
        None => {}
    }
    let says = Says::CursorSessionMismatch {
        cursor_id: ev.cursor_id,
        owner: ev.owner,
        without_session: ev.key.is_none(),
    };
    Some(
        Violation::new(
            RuleId::CursorSessionMismatch,
            ev.key.unwrap_or(ev.owner),
            ctx.now,
            says,
        )
        .current(ev.facts.request)
        .earlier(ev.opened_by),
    )
}

/// `unacknowledged-with-session`: a w:0 write carrying an lsid.
pub(crate) fn unacknowledged_with_session(
    ev: &RequestEvent,
    _state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    if !ev.facts.unacknowledged {
        return None;
    }
    Some(
        Violation::new(
            RuleId::UnacknowledgedWithSession,
            ev.key,
            ctx.now,
            Says::UnacknowledgedWithSession,
        )
        .current(ev.facts.request),
    )
}

/// `idle-expired-reuse`: a session used after being idle longer than the
/// server's session timeout, with no refresh in between.
pub(crate) fn idle_expired_reuse(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    // The same judgement (and the same exempt commands) as the
    // `sessions_expired` counter in the engine, so the rule and the counter agree.
    if ev.facts.class.is_session_cleanup() || !state.expired_on_server(ctx.now, ctx.session_timeout)
    {
        return None;
    }
    let idle = ctx.now.saturating_sub(state.last_activity());
    let says = Says::IdleExpiredReuse {
        idle,
        timeout: ctx.session_timeout,
    };
    Some(Violation::new(RuleId::IdleExpiredReuse, ev.key, ctx.now, says).current(ev.facts.request))
}

/// `cross-client-sharing`: one session used by two different client
/// identities (peer host, driver/application metadata, user).
pub(crate) fn cross_client_sharing(
    ev: &RequestEvent,
    state: &SessionState,
    ctx: &RuleContext<'_>,
) -> Option<Violation> {
    let current = ev.facts.request.client;
    let first = state.first_client;
    if current == ClientId::UNKNOWN
        || first == ClientId::UNKNOWN
        || current == first
        || current == state.shared_with
    {
        return None;
    }
    let first_identity = ctx.names.identity(first)?;
    let current_identity = ctx.names.identity(current)?;
    let field = first_identity.differs_from(&current_identity)?;
    Some(
        Violation::new(
            RuleId::CrossClientSharing,
            ev.key,
            ctx.now,
            Says::CrossClientSharing { first, field },
        )
        .current(ev.facts.request),
    )
}

/// `store-session-resurrected`: a web-session store write brings back a
/// document destroyed after the writer read it (`web_store` finds the
/// three operations; this says what they mean).
pub(crate) fn store_session_resurrected(
    found: &Resurrection,
    key: SessionKey,
    label: &str,
    _ctx: &RuleContext<'_>,
) -> Option<Violation> {
    let mut violation = Violation::new(
        RuleId::StoreSessionResurrected,
        key,
        found.write.at,
        Says::StoreSessionResurrected,
    )
    .current(found.write)
    .earlier(found.destroy)
    .unconfirmed(found.unconfirmed);
    violation.store = Some(Box::new(StoreFinding {
        store: label.to_string(),
        document: found.document.fingerprint(),
        read: found.read,
        destroy: found.destroy,
    }));
    Some(violation)
}

/// A violation in words: what happened and why it is a problem (no
/// document contents). Called only when a violation is logged, listed or
/// answers a rejected request — never per counted violation — with the
/// names resolved then (`names`).
pub(crate) fn wording(v: &Violation, names: &dyn Names) -> String {
    let session = short(&v.key);
    let command = |request: Option<&RequestRef>| {
        request.map_or_else(|| "?".into(), |r| names.symbol(r.command))
    };
    let namespace = |request: Option<&RequestRef>| {
        request.map_or_else(|| "?".into(), |r| names.symbol(r.namespace))
    };
    let current = v.current.as_ref();
    let earlier = v.earlier.as_ref();
    let (earlier_conn, earlier_request, earlier_at) =
        earlier.map_or((0, 0, v.at), |r| (r.conn, r.request_id, r.at));
    let txn_number = current.and_then(|r| r.txn_number).unwrap_or_default();
    let mut text = match v.says {
        Says::ConcurrentUse => format!(
            "{} on session {session} was sent while {} (connection {earlier_conn}, request {earlier_request}, sent \
             {} earlier) was still in flight on the same session; a session may be used by one operation at a time \
             — the server runs them interleaved and a transaction or retryable write on it can be corrupted or lost",
            command(current),
            command(earlier),
            duration(v.at.saturating_sub(earlier_at)),
        ),
        Says::ConcurrentUseConfirmed { unanswered_after } => {
            let outcome = match unanswered_after {
                None => "both were answered".to_string(),
                Some(window) => format!(
                    "the first was still unanswered on its open connection {} later",
                    duration(window)
                ),
            };
            let command = command(current);
            let (second_conn, second_at) = current.map_or((0, v.at), |r| (r.conn, r.at));
            format!(
                "{command} on session {session} was sent on connection {second_conn} while the same {command} \
                 (connection {earlier_conn}, request {earlier_request}, sent {} earlier) was still in flight on the \
                 same session, and {outcome} — not a driver retry; a session may be used by one operation at a time \
                 — the server runs them interleaved and a transaction or retryable write on it can be corrupted or \
                 lost",
                duration(second_at.saturating_sub(earlier_at)),
            )
        }
        Says::UseAfterEnd { ended } => format!(
            "{} used session {session} after it was {ended} (connection {earlier_conn}, request {earlier_request}, {} \
             earlier); the server does not refuse this — it silently starts a new session under the same id, so the \
             application's transaction, retry and cursor guarantees no longer hold",
            command(current),
            duration(v.at.saturating_sub(earlier_at)),
        ),
        Says::EndWhileInFlight { verb } => format!(
            "{verb} named session {session} while {} (connection {earlier_conn}, request {earlier_request}) was still \
             in flight on it; the session was ended before the work using it finished (a client closed or a session \
             ended without awaiting its operations)",
            command(earlier),
        ),
        Says::ClosedWithRequestsInFlight => format!(
            "connection {earlier_conn} closed while {} on session {session} (request {earlier_request}, sent {} \
             earlier) was awaiting its reply; the operation may still run on the server while the application \
             believes it failed or moves on (a client closed before its work was awaited, or a timeout)",
            command(earlier),
            duration(v.at.saturating_sub(earlier_at)),
        ),
        Says::TxnRegression { highest } => format!(
            "{} on session {session} carries txnNumber {txn_number}, lower than {highest} already used on it; the \
             server will refuse it (TransactionTooOld) if it arrives after {highest} — requests on different \
             connections can reach the server in either order — two holders of the session are numbering \
             independently",
            command(current),
        ),
        Says::TxnNumberReuse => format!(
            "{} on {} reuses session {session} with txnNumber {txn_number}, already used by a different write ({} on \
             {}, connection {earlier_conn}, request {earlier_request}); the server takes it for a retry of that \
             write and skips it — this write is lost without an error (several writes awaited together on one \
             session, e.g. Promise.all)",
            command(current),
            namespace(current),
            command(earlier),
            namespace(earlier),
        ),
        Says::TxnSuperseded {
            new_transaction,
            open,
            started_at,
            statements,
        } => format!(
            "{} with txnNumber {txn_number} on session {session} while transaction {open} (started {} earlier, \
             {statements} statement(s)) is still open without commit or abort; the server silently aborts \
             transaction {open} and its writes are lost",
            if new_transaction {
                "a new transaction"
            } else {
                "a retryable write"
            },
            duration(v.at.saturating_sub(started_at)),
        ),
        Says::TxnAfterAbort => format!(
            "{} continues transaction {txn_number} on session {session} after the server aborted it (an earlier \
             reply was TransientTransactionError / NoSuchTransaction); the error was swallowed instead of retrying \
             the whole transaction, and this statement cannot succeed",
            command(current),
        ),
        Says::TxnAfterAbortOnReply => format!(
            "{} continued transaction {txn_number} on session {session} after {} (request {earlier_request}) failed \
             inside it; the failure had aborted the transaction on the server, which now answers \
             NoSuchTransaction — the error was swallowed instead of aborting and retrying the transaction",
            command(current),
            command(earlier),
        ),
        Says::TxnLeftOpen {
            number,
            started_at,
            statements,
            limit,
        } => format!(
            "transaction {number} on session {session} has been open for {} ({statements} statement(s)) without \
             commitTransaction or abortTransaction (limit {}); the server aborts transactions past \
             transactionLifetimeLimitSeconds and its writes will be lost — a code path forgot to commit or abort",
            duration(v.at.saturating_sub(started_at)),
            duration(limit),
        ),
        Says::CursorSessionMismatch {
            cursor_id,
            owner,
            without_session: false,
        } => format!(
            "{} for cursor {cursor_id} under session {session} but the cursor was opened under session {} \
             (connection {earlier_conn}, request {earlier_request}); getMore must use the cursor's own session — the \
             server refuses it, or the cursor's session is being shared",
            command(current),
            short(&owner),
        ),
        Says::CursorSessionMismatch {
            cursor_id,
            owner,
            without_session: true,
        } => format!(
            "{} for cursor {cursor_id} without a session, but the cursor was opened under session {} (connection \
             {earlier_conn}, request {earlier_request}); getMore must use the cursor's own session",
            command(current),
            short(&owner),
        ),
        Says::UnacknowledgedWithSession => format!(
            "{} with an unacknowledged write concern (w:0) carries session {session}; nobody waits for it to \
             finish, so the session can be reused while it still runs — drivers must not send an lsid with w:0",
            command(current),
        ),
        Says::IdleExpiredReuse { idle, timeout } => format!(
            "{} used session {session} after it was idle for {} with no refresh, longer than the server's session \
             timeout ({}); the server has expired it — its transaction and cursors are gone and it continues as a \
             new session",
            command(current),
            duration(idle),
            duration(timeout),
        ),
        Says::CrossClientSharing { first, field } => {
            let describe = |id: ClientId| {
                names
                    .identity(id)
                    .map_or_else(|| "an unknown client".to_string(), |i| i.describe())
            };
            format!(
                "{} on session {session} comes from {} but the session was first used by {} (different {field}); a \
                 session id must stay inside the client that created it — sharing it across processes or clients \
                 breaks its ordering and transaction guarantees",
                command(current),
                describe(current.map_or(ClientId::UNKNOWN, |r| r.client)),
                describe(first),
            )
        }
        Says::StoreSessionResurrected => {
            let (label, document, read) = v
                .store
                .as_deref()
                .map_or(("?", "?", None), |s| (&*s.store, &*s.document, Some(s.read)));
            let (read_conn, read_at) = read.map_or((0, earlier_at), |r| (r.conn, r.at));
            format!(
                "{} on {} (store \"{label}\") brings back store document {document} that {} on connection \
                 {earlier_conn} destroyed {} ago; this client last read it on connection {read_conn} {} before the \
                 destroy, so one of its requests is saving a copy loaded before the destroy (a logout or kill that \
                 does not stick)",
                command(current),
                namespace(current),
                command(earlier),
                duration(v.at.saturating_sub(earlier_at)),
                duration(earlier_at.saturating_sub(read_at)),
            )
        }
    };
    if v.unconfirmed {
        match v.says {
            Says::UseAfterEnd { .. } | Says::EndWhileInFlight { .. } => {
                text.push_str(UNCONFIRMED_END)
            }
            Says::StoreSessionResurrected => text.push_str(
                " (the destroy is not confirmed: its reply never came, so the server most likely, not certainly, \
                 deleted the document; reported as a warning and never rejected)",
            ),
            _ => {}
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_registry_lists_every_rule_once_with_a_hook() {
        for rule in RuleId::ALL {
            let entries: Vec<&Rule> = REGISTRY.iter().filter(|r| r.id == rule).collect();
            assert_eq!(entries.len(), 1, "{rule} is in the registry once");
            assert!(!entries[0].hooks.is_empty(), "{rule} runs somewhere");
        }
    }

    #[test]
    fn any_on_sees_only_the_enabled_rules() {
        let request = |hook: &Hook| matches!(hook, Hook::Request(_));
        assert!(any_on(|rule| rule == RuleId::UseAfterEnd, request));
        assert!(!any_on(|rule| rule == RuleId::TxnLeftOpen, request));
        assert!(!any_on(|_| false, |_| true));
    }
    use crate::intern::{normalize_ip, ClientIdentity};
    use crate::state::tests::{facts, request};
    use crate::state::{OwnerId, RetryableWrite, Sym, Transaction};
    use sessionguard_protocol::command::Lsid;

    struct TestNames {
        identities: Vec<Arc<ClientIdentity>>,
    }

    impl Names for TestNames {
        fn symbol(&self, sym: Sym) -> Arc<str> {
            Arc::from(format!("cmd{}", sym.0))
        }
        fn identity(&self, id: ClientId) -> Option<Arc<ClientIdentity>> {
            self.identities
                .get(usize::try_from(id.0).ok()?.checked_sub(1)?)
                .cloned()
        }
    }

    fn names() -> TestNames {
        let host = |ip: &str, app: &str| {
            Arc::new(ClientIdentity {
                peer: Some(normalize_ip(ip.parse().unwrap())),
                metadata_seen: true,
                driver_name: Some(Arc::from("mongo-rust-driver")),
                driver_version: Some(Arc::from("3.3.0")),
                app_name: Some(Arc::from(app)),
                user: None,
            })
        };
        TestNames {
            identities: vec![
                host("10.0.0.1", "web"),
                host("10.0.0.2", "web"),
                host("127.0.0.1", "web"),
                host("::1", "web"),
            ],
        }
    }

    const KEY: SessionKey = SessionKey {
        lsid: Lsid([7; 16]),
        owner: OwnerId(0),
    };
    const MINUTE: Millis = 60_000;

    fn ctx(names: &TestNames, now: Millis) -> RuleContext<'_> {
        RuleContext {
            now,
            session_timeout: 30 * MINUTE,
            transaction_max_open: MINUTE,
            names,
        }
    }

    fn event(facts: RequestFacts) -> RequestEvent {
        RequestEvent { key: KEY, facts }
    }

    fn retryable(conn: u64, id: i32, at: Millis, txn: i64, statement: u64) -> RequestFacts {
        let mut f = facts(request(conn, id, at, Some(txn)), CommandClass::Write);
        f.retryable_write = true;
        f.statement = statement;
        f
    }

    fn txn_statement(
        conn: u64,
        id: i32,
        at: Millis,
        txn: i64,
        class: CommandClass,
        start: bool,
    ) -> RequestFacts {
        let mut f = facts(request(conn, id, at, Some(txn)), class);
        f.in_transaction = true;
        f.start_transaction = start;
        f
    }

    // ---- concurrent-use ----

    #[test]
    fn concurrent_use_fires_on_overlap_from_another_connection() {
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(&facts(request(1, 10, 0, None), CommandClass::CursorOpen), 0);
        let mut second = facts(request(2, 20, 5, None), CommandClass::Write);
        second.statement = 2;
        let violation = concurrent_use(&event(second), &state, &ctx(&names, 5)).expect("overlap");
        assert_eq!(violation.rule, RuleId::ConcurrentUse);
        assert_eq!(violation.earlier.unwrap().conn, 1);
        assert_eq!(violation.current.unwrap().conn, 2);
    }

    #[test]
    fn concurrent_use_silent_for_sequential_use_and_pool_reuse() {
        let names = names();
        let mut state = SessionState::new(0);
        let first = facts(request(1, 10, 0, None), CommandClass::CursorOpen);
        state.apply_request(&first, 0);
        let entry = *state.in_flight.iter().next().unwrap();
        state.apply_reply(
            &entry,
            &ReplyFacts {
                ok: true,
                clean_success: true,
                ..Default::default()
            },
            true,
            1,
        );
        // The pool hands the session to another task, on another connection.
        let next = retryable(2, 5, 2, 1, 9);
        assert_eq!(concurrent_use(&event(next), &state, &ctx(&names, 2)), None);
    }

    #[test]
    fn the_same_command_on_another_connection_is_a_suspect_not_judged_at_once() {
        let names = names();
        let mut state = SessionState::new(0);
        let write = retryable(1, 10, 0, 4, 42);
        state.apply_request(&write, 0);
        let again = retryable(2, 11, 100, 4, 42);
        assert_eq!(
            concurrent_use(&event(again), &state, &ctx(&names, 100)),
            None
        );
        let suspect = retry_suspect(&event(again), &state).expect("awaits the verdict");
        assert_eq!(suspect.request, write.request);
        // On the same connection it is plain concurrent use.
        let pipelined = retryable(1, 11, 100, 4, 42);
        assert!(concurrent_use(&event(pipelined), &state, &ctx(&names, 100)).is_some());
        assert_eq!(retry_suspect(&event(pipelined), &state), None);
        // Commit again on a new connection: the number is its identity.
        let mut state = SessionState::new(0);
        let mut commit = txn_statement(1, 10, 0, 3, CommandClass::Commit, false);
        commit.statement = 1;
        state.apply_request(&commit, 0);
        let mut again = txn_statement(2, 11, 10, 3, CommandClass::Commit, false);
        again.statement = 2;
        assert_eq!(
            concurrent_use(&event(again), &state, &ctx(&names, 10)),
            None
        );
        assert!(retry_suspect(&event(again), &state).is_some());
        // Anything else in flight is reported at once, as before.
        state.apply_request(&facts(request(3, 12, 11, None), CommandClass::Write), 11);
        let other = facts(request(4, 13, 12, None), CommandClass::CursorOpen);
        assert!(concurrent_use(&event(other), &state, &ctx(&names, 12)).is_some());
    }

    #[test]
    fn a_confirmed_overlap_names_both_requests_and_how_it_was_decided() {
        let names = names();
        let first = request(1, 10, 0, None);
        let second = request(2, 20, 5, None);
        let answered =
            concurrent_use_confirmed(&KEY, &first, &second, Overlap::Answered, &ctx(&names, 9));
        assert_eq!(answered.rule, RuleId::ConcurrentUse);
        assert_eq!(
            (answered.current, answered.earlier),
            (Some(second), Some(first))
        );
        assert!(
            wording(&answered, &names).contains("both were answered"),
            "{}",
            wording(&answered, &names)
        );
        let late = concurrent_use_confirmed(
            &KEY,
            &first,
            &second,
            Overlap::StillInFlight(10_000),
            &ctx(&names, 9),
        );
        assert!(
            wording(&late, &names).contains("unanswered on its open connection 10s later"),
            "{}",
            wording(&late, &names)
        );
    }

    #[test]
    fn use_after_an_unconfirmed_end_is_marked_unconfirmed() {
        let names = names();
        let mut state = SessionState::new(0);
        state.end(EndKind::Ended, request(9, 1, 10, None), false);
        let find = facts(request(1, 2, 20, None), CommandClass::CursorOpen);
        let violation = use_after_end(&event(find), &state, &ctx(&names, 20)).expect("reported");
        assert!(violation.unconfirmed);
        assert!(
            wording(&violation, &names).contains("not confirmed"),
            "{}",
            wording(&violation, &names)
        );
        // A later confirmed end replaces it; an unconfirmed one never
        // replaces a confirmed one.
        state.end(EndKind::Killed, request(9, 2, 11, None), true);
        state.end(EndKind::Ended, request(9, 3, 12, None), false);
        let violation = use_after_end(&event(find), &state, &ctx(&names, 20)).expect("reported");
        assert!(!violation.unconfirmed);
        assert_eq!(violation.earlier.unwrap().request_id, 2);
    }

    #[test]
    fn concurrent_use_silent_for_kill_cursors_either_way() {
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(
            &facts(request(1, 10, 0, None), CommandClass::KillCursors),
            0,
        );
        let next = facts(request(2, 5, 1, None), CommandClass::CursorOpen);
        assert_eq!(concurrent_use(&event(next), &state, &ctx(&names, 1)), None);
        let mut state = SessionState::new(0);
        state.apply_request(&facts(request(1, 10, 0, None), CommandClass::CursorOpen), 0);
        let kill = facts(request(2, 5, 1, None), CommandClass::KillCursors);
        assert_eq!(concurrent_use(&event(kill), &state, &ctx(&names, 1)), None);
    }

    #[test]
    fn concurrent_use_fires_for_same_txn_number_different_write() {
        // Promise.all on one session: the writes share lsid + txnNumber.
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(&retryable(1, 10, 0, 4, 1), 0);
        let other = retryable(2, 11, 1, 4, 2);
        assert!(concurrent_use(&event(other), &state, &ctx(&names, 1)).is_some());
    }

    // ---- use-after-end ----

    #[test]
    fn use_after_end_fires_after_end_sessions() {
        let names = names();
        let mut state = SessionState::new(0);
        state.end(EndKind::Ended, request(9, 1, 10, None), true);
        let find = facts(request(1, 2, 20, None), CommandClass::CursorOpen);
        let violation = use_after_end(&event(find), &state, &ctx(&names, 20)).expect("reuse");
        assert_eq!(violation.earlier.unwrap().conn, 9);
        assert!(wording(&violation, &names).contains("ended by endSessions"));
        state.end(EndKind::Killed, request(9, 1, 10, None), true);
        let killed = use_after_end(&event(find), &state, &ctx(&names, 20)).unwrap();
        assert!(wording(&killed, &names).contains("killSessions"));
    }

    #[test]
    fn use_after_end_silent_for_cleanup_and_live_sessions() {
        let names = names();
        let mut state = SessionState::new(0);
        let find = facts(request(1, 2, 20, None), CommandClass::CursorOpen);
        assert_eq!(use_after_end(&event(find), &state, &ctx(&names, 20)), None);
        state.end(EndKind::Ended, request(9, 1, 10, None), true);
        for class in [
            CommandClass::KillCursors,
            CommandClass::Abort,
            CommandClass::EndSessions,
        ] {
            let cleanup = facts(request(1, 2, 20, None), class);
            assert_eq!(
                use_after_end(&event(cleanup), &state, &ctx(&names, 20)),
                None,
                "{class:?}"
            );
        }
    }

    // ---- end-while-in-flight ----

    #[test]
    fn end_while_in_flight_fires_and_ignores_kill_cursors() {
        let names = names();
        let mut state = SessionState::new(0);
        let end = EndEvent {
            key: KEY,
            kind: EndKind::Ended,
            request: request(2, 7, 5, None),
        };
        assert_eq!(end_while_in_flight(&end, &state, &ctx(&names, 5)), None);
        state.apply_request(&facts(request(1, 3, 0, None), CommandClass::KillCursors), 0);
        assert_eq!(end_while_in_flight(&end, &state, &ctx(&names, 5)), None);
        state.apply_request(&facts(request(3, 3, 1, None), CommandClass::Write), 1);
        let violation = end_while_in_flight(&end, &state, &ctx(&names, 5)).expect("in flight");
        assert_eq!(violation.earlier.unwrap().conn, 3);
    }

    // ---- closed-with-requests-in-flight ----

    #[test]
    fn closed_with_requests_in_flight_ignores_fire_and_forget() {
        let names = names();
        let end = InFlight {
            request: request(1, 1, 0, None),
            statement: 0,
            class: CommandClass::EndSessions,
            abandoned: false,
            suspected: false,
        };
        let kill = InFlight {
            request: request(1, 2, 0, None),
            statement: 0,
            class: CommandClass::KillCursors,
            abandoned: false,
            suspected: false,
        };
        let insert = InFlight {
            request: request(1, 3, 0, None),
            statement: 0,
            class: CommandClass::Write,
            abandoned: false,
            suspected: false,
        };
        assert_eq!(
            closed_with_requests_in_flight(&KEY, &end, 5, &ctx(&names, 5)),
            None
        );
        assert_eq!(
            closed_with_requests_in_flight(&KEY, &kill, 5, &ctx(&names, 5)),
            None
        );
        let violation = closed_with_requests_in_flight(&KEY, &insert, 5, &ctx(&names, 5))
            .expect("insert in flight");
        assert_eq!(violation.rule, RuleId::ClosedWithRequestsInFlight);
    }

    // ---- txn-regression ----

    #[test]
    fn txn_regression_fires_below_highest_only() {
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(&retryable(1, 1, 0, 5, 1), 0);
        assert_eq!(
            txn_regression(&event(retryable(1, 2, 1, 5, 1)), &state, &ctx(&names, 1)),
            None
        );
        assert_eq!(
            txn_regression(&event(retryable(1, 2, 1, 6, 1)), &state, &ctx(&names, 1)),
            None
        );
        let violation = txn_regression(&event(retryable(2, 3, 1, 4, 2)), &state, &ctx(&names, 1))
            .expect("regression");
        assert_eq!(violation.earlier.unwrap().request_id, 1);
        // Over two connections the lower number may reach the server first:
        // the refusal is conditional on the order.
        assert!(
            wording(&violation, &names)
                .contains("will refuse it (TransactionTooOld) if it arrives after 5"),
            "{}",
            wording(&violation, &names)
        );
        let no_txn = facts(request(1, 4, 1, None), CommandClass::CursorOpen);
        assert_eq!(
            txn_regression(&event(no_txn), &state, &ctx(&names, 1)),
            None
        );
    }

    // ---- txn-number-reuse ----

    #[test]
    fn txn_number_reuse_fires_for_a_different_write_with_the_same_number() {
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(&retryable(1, 1, 0, 5, 100), 0);
        let violation =
            txn_number_reuse(&event(retryable(1, 2, 1, 5, 200)), &state, &ctx(&names, 1))
                .expect("reuse");
        assert!(wording(&violation, &names).contains("lost"));
        assert_eq!(violation.earlier.unwrap().request_id, 1);
    }

    #[test]
    fn txn_number_reuse_silent_for_a_byte_for_byte_retry_and_new_numbers() {
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(&retryable(1, 1, 0, 5, 100), 0);
        assert_eq!(
            txn_number_reuse(&event(retryable(2, 9, 1, 5, 100)), &state, &ctx(&names, 1)),
            None
        );
        assert_eq!(
            txn_number_reuse(&event(retryable(2, 9, 1, 6, 300)), &state, &ctx(&names, 1)),
            None
        );
        // Transaction statements share one number by design.
        let stmt = txn_statement(1, 3, 1, 5, CommandClass::Write, false);
        assert_eq!(
            txn_number_reuse(&event(stmt), &state, &ctx(&names, 1)),
            None
        );
        let empty = SessionState::new(0);
        assert_eq!(
            txn_number_reuse(&event(retryable(2, 9, 1, 5, 1)), &empty, &ctx(&names, 1)),
            None
        );
    }

    // ---- txn-superseded ----

    fn open_transaction(number: i64, started_at: Millis) -> SessionState {
        let mut state = SessionState::new(0);
        state.apply_request(
            &txn_statement(1, 1, started_at, number, CommandClass::Write, true),
            started_at,
        );
        let entry = *state.in_flight.iter().next().unwrap();
        state.apply_reply(
            &entry,
            &ReplyFacts {
                ok: true,
                clean_success: true,
                in_transaction: true,
                ..Default::default()
            },
            true,
            started_at,
        );
        state
    }

    #[test]
    fn txn_superseded_fires_for_a_new_transaction_over_an_open_one() {
        let names = names();
        let state = open_transaction(3, 0);
        let start = txn_statement(1, 2, 10, 4, CommandClass::Write, true);
        let violation =
            txn_superseded(&event(start), &state, &ctx(&names, 10)).expect("superseded");
        assert_eq!(violation.earlier.unwrap().request_id, 1);
        let write = retryable(1, 2, 10, 4, 5);
        assert!(txn_superseded(&event(write), &state, &ctx(&names, 10)).is_some());
    }

    #[test]
    fn txn_superseded_silent_after_commit_abort_server_abort_and_for_first_statement_retry() {
        let names = names();
        let next = txn_statement(1, 9, 10, 4, CommandClass::Write, true);
        // Committed.
        let mut state = open_transaction(3, 0);
        state.txn.as_mut().unwrap().phase = TxnPhase::Committed;
        assert_eq!(txn_superseded(&event(next), &state, &ctx(&names, 10)), None);
        // with_transaction: TransientTransactionError, abort, new number.
        let mut state = open_transaction(3, 0);
        state.apply_request(&txn_statement(1, 2, 1, 3, CommandClass::Write, false), 1);
        let entry = *state.in_flight.iter().next().unwrap();
        state.apply_reply(
            &entry,
            &ReplyFacts {
                in_transaction: true,
                transient: true,
                ..Default::default()
            },
            true,
            2,
        );
        assert_eq!(txn_superseded(&event(next), &state, &ctx(&names, 10)), None);
        state.apply_request(&txn_statement(1, 3, 3, 3, CommandClass::Abort, false), 3);
        assert_eq!(txn_superseded(&event(next), &state, &ctx(&names, 10)), None);
        // A likely-aborted transaction (DuplicateKey) is not "open" either.
        let mut state = open_transaction(3, 0);
        state.txn.as_mut().unwrap().phase = TxnPhase::LikelyAborted;
        assert_eq!(txn_superseded(&event(next), &state, &ctx(&names, 10)), None);
        // Same number again (first statement retried after an overload error).
        let state = open_transaction(3, 0);
        let again = txn_statement(1, 9, 10, 3, CommandClass::Write, true);
        assert_eq!(
            txn_superseded(&event(again), &state, &ctx(&names, 10)),
            None
        );
        // Older than the lifetime limit: the server already aborted it.
        let state = open_transaction(3, 0);
        assert_eq!(
            txn_superseded(&event(next), &state, &ctx(&names, 2 * MINUTE)),
            None
        );
    }

    // ---- txn-after-abort ----

    fn server_aborted(by_commit: bool) -> SessionState {
        let mut state = open_transaction(3, 0);
        let txn = state.txn.as_mut().unwrap();
        txn.phase = TxnPhase::ServerAborted { by_commit };
        txn.aborted_by = Some(request(1, 5, 1, Some(3)));
        state
    }

    #[test]
    fn txn_after_abort_fires_for_statements_and_commit_after_a_statement_abort() {
        let names = names();
        let state = server_aborted(false);
        let insert = txn_statement(1, 6, 2, 3, CommandClass::Write, false);
        let violation =
            txn_after_abort(&event(insert), &state, &ctx(&names, 2)).expect("continued");
        assert_eq!(violation.earlier.unwrap().request_id, 5);
        let commit = txn_statement(1, 7, 2, 3, CommandClass::Commit, false);
        assert!(txn_after_abort(&event(commit), &state, &ctx(&names, 2)).is_some());
    }

    #[test]
    fn txn_after_abort_silent_for_abort_cleanup_commit_retry_and_new_transactions() {
        let names = names();
        let state = server_aborted(false);
        let abort = txn_statement(1, 6, 2, 3, CommandClass::Abort, false);
        assert_eq!(
            txn_after_abort(&event(abort), &state, &ctx(&names, 2)),
            None
        );
        let next = txn_statement(1, 6, 2, 4, CommandClass::Write, true);
        assert_eq!(txn_after_abort(&event(next), &state, &ctx(&names, 2)), None);
        let state = server_aborted(true);
        let commit = txn_statement(1, 7, 2, 3, CommandClass::Commit, false);
        assert_eq!(
            txn_after_abort(&event(commit), &state, &ctx(&names, 2)),
            None
        );
        let open = open_transaction(3, 0);
        let insert = txn_statement(1, 6, 2, 3, CommandClass::Write, false);
        assert_eq!(
            txn_after_abort(&event(insert), &open, &ctx(&names, 2)),
            None
        );
    }

    #[test]
    fn txn_after_abort_on_reply_needs_an_earlier_failure_and_no_such_transaction() {
        let names = names();
        let mut state = open_transaction(3, 0);
        let failing = InFlight {
            request: request(1, 5, 1, Some(3)),
            statement: 0,
            class: CommandClass::Write,
            abandoned: false,
            suspected: false,
        };
        state.txn.as_mut().unwrap().phase = TxnPhase::LikelyAborted;
        state.txn.as_mut().unwrap().aborted_by = Some(failing.request);
        let next = InFlight {
            request: request(1, 6, 2, Some(3)),
            statement: 0,
            class: CommandClass::Write,
            abandoned: false,
            suspected: false,
        };
        let nst = ReplyFacts {
            in_transaction: true,
            no_such_transaction: true,
            transient: true,
            ..Default::default()
        };
        let violation =
            txn_after_abort_on_reply(&KEY, &next, &nst, &state, &ctx(&names, 3)).expect("proven");
        assert_eq!(violation.earlier.unwrap().request_id, 5);
        let abort = InFlight {
            class: CommandClass::Abort,
            ..next
        };
        assert_eq!(
            txn_after_abort_on_reply(&KEY, &abort, &nst, &state, &ctx(&names, 3)),
            None
        );
        let other_error = ReplyFacts {
            in_transaction: true,
            ..Default::default()
        };
        assert_eq!(
            txn_after_abort_on_reply(&KEY, &next, &other_error, &state, &ctx(&names, 3)),
            None
        );
        let open = open_transaction(3, 0);
        assert_eq!(
            txn_after_abort_on_reply(&KEY, &next, &nst, &open, &ctx(&names, 3)),
            None
        );
    }

    // ---- txn-left-open ----

    #[test]
    fn txn_left_open_fires_once_past_the_limit() {
        let names = names();
        let mut state = open_transaction(3, 0);
        assert_eq!(txn_left_open(&KEY, &state, &ctx(&names, MINUTE)), None);
        let violation = txn_left_open(&KEY, &state, &ctx(&names, MINUTE + 1)).expect("left open");
        assert_eq!(violation.rule, RuleId::TxnLeftOpen);
        state.txn.as_mut().unwrap().left_open_reported = true;
        assert_eq!(txn_left_open(&KEY, &state, &ctx(&names, 2 * MINUTE)), None);
        let mut committed = open_transaction(3, 0);
        committed.txn.as_mut().unwrap().phase = TxnPhase::Committed;
        assert_eq!(
            txn_left_open(&KEY, &committed, &ctx(&names, 2 * MINUTE)),
            None
        );
    }

    // ---- cursor-session-mismatch ----

    #[test]
    fn cursor_session_mismatch_cases() {
        let names = names();
        let other = SessionKey {
            lsid: Lsid([8; 16]),
            owner: OwnerId(0),
        };
        let cursor = |key: Option<SessionKey>, class| CursorEvent {
            cursor_id: 77,
            key,
            facts: facts(request(2, 3, 5, None), class),
            owner: KEY,
            opened_by: request(1, 1, 0, None),
        };
        assert_eq!(
            cursor_session_mismatch(&cursor(Some(KEY), CommandClass::GetMore), &ctx(&names, 5)),
            None
        );
        let violation =
            cursor_session_mismatch(&cursor(Some(other), CommandClass::GetMore), &ctx(&names, 5))
                .unwrap();
        assert_eq!(violation.key, other);
        assert!(cursor_session_mismatch(
            &cursor(Some(other), CommandClass::KillCursors),
            &ctx(&names, 5)
        )
        .is_some());
        assert!(
            cursor_session_mismatch(&cursor(None, CommandClass::GetMore), &ctx(&names, 5))
                .is_some()
        );
        assert_eq!(
            cursor_session_mismatch(&cursor(None, CommandClass::KillCursors), &ctx(&names, 5)),
            None
        );
    }

    // ---- unacknowledged-with-session ----

    #[test]
    fn unacknowledged_with_session_fires_only_for_w0() {
        let names = names();
        let state = SessionState::new(0);
        let mut write = facts(request(1, 1, 0, None), CommandClass::Write);
        assert_eq!(
            unacknowledged_with_session(&event(write), &state, &ctx(&names, 0)),
            None
        );
        write.unacknowledged = true;
        assert!(unacknowledged_with_session(&event(write), &state, &ctx(&names, 0)).is_some());
    }

    // ---- idle-expired-reuse ----

    #[test]
    fn idle_expired_reuse_fires_past_the_timeout_without_refresh() {
        let names = names();
        let mut state = SessionState::new(0);
        let find = facts(request(1, 2, 31 * MINUTE, None), CommandClass::CursorOpen);
        assert!(idle_expired_reuse(&event(find), &state, &ctx(&names, 31 * MINUTE)).is_some());
        assert_eq!(
            idle_expired_reuse(&event(find), &state, &ctx(&names, 29 * MINUTE)),
            None
        );
        state.last_refreshed = 10 * MINUTE;
        assert_eq!(
            idle_expired_reuse(&event(find), &state, &ctx(&names, 31 * MINUTE)),
            None
        );
    }

    #[test]
    fn idle_expired_reuse_silent_while_a_long_operation_runs() {
        let names = names();
        let mut state = SessionState::new(0);
        state.apply_request(&facts(request(1, 1, 0, None), CommandClass::CursorOpen), 0);
        let other = facts(request(2, 2, 40 * MINUTE, None), CommandClass::CursorOpen);
        assert_eq!(
            idle_expired_reuse(&event(other), &state, &ctx(&names, 40 * MINUTE)),
            None
        );
    }

    // ---- cross-client-sharing ----

    fn from_client(client: u32) -> RequestFacts {
        let mut f = facts(request(1, 1, 0, None), CommandClass::CursorOpen);
        f.request.client = ClientId(client);
        f
    }

    #[test]
    fn cross_client_sharing_fires_for_another_host() {
        let names = names();
        let mut state = SessionState::new(0);
        state.first_client = ClientId(1);
        let violation =
            cross_client_sharing(&event(from_client(2)), &state, &ctx(&names, 0)).expect("shared");
        assert!(wording(&violation, &names).contains("peer host"));
        state.shared_with = ClientId(2);
        assert_eq!(
            cross_client_sharing(&event(from_client(2)), &state, &ctx(&names, 0)),
            None
        );
    }

    #[test]
    fn cross_client_sharing_silent_for_same_client_and_loopback_aliases() {
        let names = names();
        let mut state = SessionState::new(0);
        state.first_client = ClientId(1);
        assert_eq!(
            cross_client_sharing(&event(from_client(1)), &state, &ctx(&names, 0)),
            None
        );
        assert_eq!(
            cross_client_sharing(&event(from_client(0)), &state, &ctx(&names, 0)),
            None
        );
        state.first_client = ClientId(3);
        assert_eq!(
            cross_client_sharing(&event(from_client(4)), &state, &ctx(&names, 0)),
            None
        );
        state.first_client = ClientId::UNKNOWN;
        assert_eq!(
            cross_client_sharing(&event(from_client(2)), &state, &ctx(&names, 0)),
            None
        );
    }

    #[test]
    fn retryable_write_identity_helper_is_consistent() {
        // Guard against the state machine and the rule disagreeing on what
        // "the first write with this number" is.
        let mut state = SessionState::new(0);
        state.apply_request(&retryable(1, 1, 0, 5, 100), 0);
        assert_eq!(
            state.last_retryable.as_deref().copied(),
            Some(RetryableWrite {
                txn_number: 5,
                statement: 100,
                request: request(1, 1, 0, Some(5))
            })
        );
        let _unused: Option<Transaction> = None;
    }
}
