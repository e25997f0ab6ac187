//! The state of one logical session as the proxy has seen it, and the
//! transitions requests and replies cause: requests in flight (by connection
//! id and request id), ended / killed (a tombstone), the highest txnNumber,
//! the open transaction (number, start, statements, whether the server
//! aborted it), the last retryable write's identity, open cursors, the client
//! identities that used it, refreshes, last use.
//!
//! The session's in-flight set is not a copy of the proxy's per-connection
//! in-flight table (which owns each request's record, the engine's
//! `PendingRequest`): it indexes the same requests by session, across every
//! connection, which is what `concurrent-use` asks ("is anything of this
//! session in flight anywhere?"), and it carries what only the session
//! knows of them (abandoned getMores, requests awaiting a retry verdict).
//!
//! Pure data and pure transitions: no maps, no clocks (times are passed in as
//! `Millis` since the engine's origin), no logging. Kept small on purpose —
//! ids instead of strings, rarely used parts boxed — because a busy proxy
//! tracks up to `max_sessions` of these.

use sessionguard_protocol::command::Lsid;

/// Milliseconds since the engine's clock origin.
pub type Millis = u64;

/// `duration` in the engine's unit, saturating (a configured duration past
/// `u64::MAX` milliseconds means "never").
pub(crate) fn millis(duration: std::time::Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The authenticated user (`user@db`) a session belongs to, interned.
/// `OwnerId::UNKNOWN` when the connection did not authenticate or used a
/// mechanism the proxy cannot read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct OwnerId(pub u32);

impl OwnerId {
    pub const UNKNOWN: OwnerId = OwnerId(0);
}

/// A client identity (peer address, driver, application, user), interned.
/// `ClientId::UNKNOWN` never compares as "different".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct ClientId(pub u32);

impl ClientId {
    pub(crate) const UNKNOWN: ClientId = ClientId(0);
}

/// An interned string (command name or namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Sym(pub u32);

/// Sessions are per user on the server: the same lsid under two users is two
/// sessions. So the ledger key is the lsid plus the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub lsid: Lsid,
    pub owner: OwnerId,
}

/// One request, by ids: enough to name it in evidence without keeping strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestRef {
    pub conn: u64,
    pub at: Millis,
    pub txn_number: Option<i64>,
    pub request_id: i32,
    pub client: ClientId,
    pub command: Sym,
    pub namespace: Sym,
}

/// What kind of command a request is, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CommandClass {
    Hello,
    /// saslStart / saslContinue / authenticate.
    Auth,
    EndSessions,
    KillSessions,
    KillAllSessions,
    RefreshSessions,
    Commit,
    Abort,
    GetMore,
    KillCursors,
    /// A command whose reply may open a cursor (find, aggregate, list*).
    CursorOpen,
    /// insert / update / delete / findAndModify / bulkWrite.
    Write,
    Other,
}

impl CommandClass {
    pub(crate) fn of(name: &str) -> CommandClass {
        match name {
            "hello" | "isMaster" | "ismaster" => CommandClass::Hello,
            "saslStart" | "saslContinue" | "authenticate" => CommandClass::Auth,
            "endSessions" => CommandClass::EndSessions,
            "killSessions" => CommandClass::KillSessions,
            "killAllSessions" | "killAllSessionsByPattern" => CommandClass::KillAllSessions,
            "refreshSessions" => CommandClass::RefreshSessions,
            "commitTransaction" => CommandClass::Commit,
            "abortTransaction" => CommandClass::Abort,
            "getMore" => CommandClass::GetMore,
            "killCursors" => CommandClass::KillCursors,
            "find" | "aggregate" | "listCollections" | "listIndexes" | "listSearchIndexes" => {
                CommandClass::CursorOpen
            }
            "insert" | "update" | "delete" | "findAndModify" | "findandmodify" | "bulkWrite" => {
                CommandClass::Write
            }
            _ => CommandClass::Other,
        }
    }

    /// Commands that only clean up after a session (or name sessions in a
    /// list rather than run in one): harmless after the session ended.
    pub(crate) fn is_session_cleanup(self) -> bool {
        matches!(
            self,
            CommandClass::KillCursors
                | CommandClass::Abort
                | CommandClass::EndSessions
                | CommandClass::KillSessions
                | CommandClass::KillAllSessions
                | CommandClass::RefreshSessions
        )
    }

    /// Session commands whose effect waits for the server's ok:1.
    pub(crate) fn waits_for_outcome(self) -> bool {
        matches!(
            self,
            CommandClass::EndSessions
                | CommandClass::KillSessions
                | CommandClass::KillAllSessions
                | CommandClass::RefreshSessions
                | CommandClass::KillCursors
        )
    }

    /// Commands drivers fire and forget while shutting down.
    pub(crate) fn is_fire_and_forget_at_close(self) -> bool {
        matches!(self, CommandClass::EndSessions | CommandClass::KillCursors)
    }
}

/// A request awaiting its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InFlight {
    pub request: RequestRef,
    /// `RequestView::statement_hash`: recognises a retry of the same command.
    pub statement: u64,
    pub class: CommandClass,
    /// A getMore whose cursor the client has since killed (a change stream
    /// or tailable cursor closed while its getMore waits): the client has
    /// let go of it, so it no longer counts as the session being in use.
    pub abandoned: bool,
    /// An identical request on another connection awaits the verdict on
    /// this one: a retry if this one's connection fails without its reply,
    /// concurrent use if its reply is delivered (see `rules::retry_suspect`).
    pub suspected: bool,
}

/// The requests in flight on a session. Almost always zero or one, so the
/// first lives inline and only overlaps (misuse) spill into a boxed vector
/// (one pointer, not a vector's three words, in every session).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct InFlightSet {
    first: Option<InFlight>,
    /// Never `Some` of an empty vector: an overlap that is over gives its
    /// memory back. Boxed on purpose: the extra allocation happens only on
    /// misuse, the saved 16 bytes are in every tracked session.
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<InFlight>>>,
}

impl InFlightSet {
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none()
    }
    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.as_ref().map_or(0, |more| more.len())
    }
    fn overlaps(&self) -> &[InFlight] {
        self.more.as_deref().map_or(&[], Vec::as_slice)
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = &InFlight> {
        self.first.iter().chain(self.overlaps())
    }
    /// Marks the session's in-flight getMores abandoned (their cursor was
    /// killed by the client).
    pub(crate) fn abandon_get_mores(&mut self) {
        let overlaps = self
            .more
            .as_deref_mut()
            .map_or(&mut [][..], Vec::as_mut_slice);
        for entry in self.first.iter_mut().chain(overlaps) {
            if entry.class == CommandClass::GetMore {
                entry.abandoned = true;
            }
        }
    }
    /// The in-flight request (conn, request id), if present.
    pub(crate) fn find(&self, conn: u64, request_id: i32) -> Option<&InFlight> {
        self.iter()
            .find(|entry| entry.request.conn == conn && entry.request.request_id == request_id)
    }
    fn find_mut(&mut self, conn: u64, request_id: i32) -> Option<&mut InFlight> {
        let overlaps = self
            .more
            .as_deref_mut()
            .map_or(&mut [][..], Vec::as_mut_slice);
        self.first
            .iter_mut()
            .chain(overlaps)
            .find(|entry| entry.request.conn == conn && entry.request.request_id == request_id)
    }
    /// Sets or clears the request's `suspected` flag; returns what it was.
    pub(crate) fn set_suspected(&mut self, conn: u64, request_id: i32, suspected: bool) -> bool {
        self.find_mut(conn, request_id)
            .is_some_and(|entry| std::mem::replace(&mut entry.suspected, suspected))
    }
    pub(crate) fn insert(&mut self, entry: InFlight) {
        if self.first.is_none() {
            self.first = Some(entry);
        } else {
            self.more.get_or_insert_with(Default::default).push(entry);
        }
    }
    /// Removes the request (conn, request id); returns it if it was there.
    pub(crate) fn remove(&mut self, conn: u64, request_id: i32) -> Option<InFlight> {
        let matches =
            |entry: &InFlight| entry.request.conn == conn && entry.request.request_id == request_id;
        let removed = if self.first.as_ref().is_some_and(matches) {
            let removed = self.first.take();
            self.first = self.more.as_mut().map(|more| more.remove(0));
            removed
        } else {
            let more = self.more.as_mut()?;
            let position = more.iter().position(matches)?;
            Some(more.remove(position))
        };
        if self.more.as_ref().is_some_and(|more| more.is_empty()) {
            // An overlap is over: give the memory back.
            self.more = None;
        }
        removed
    }
    /// Removes everything in flight on `conn` (the connection closed).
    #[cfg(test)]
    fn remove_connection(&mut self, conn: u64) {
        loop {
            let next = self
                .iter()
                .find(|entry| entry.request.conn == conn)
                .map(|entry| entry.request.request_id);
            let Some(request_id) = next else { break };
            self.remove(conn, request_id);
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// `endSessions`.
    Ended,
    /// `killSessions`.
    Killed,
    /// `killAllSessions` / `killAllSessionsByPattern`.
    KilledByPattern,
}

impl EndKind {
    pub fn verb(self) -> &'static str {
        match self {
            EndKind::Ended => "ended by endSessions",
            EndKind::Killed => "killed by killSessions",
            EndKind::KilledByPattern => "killed by killAllSessions",
        }
    }
}

/// The tombstone of an ended session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ended {
    pub kind: EndKind,
    pub by: RequestRef,
    /// The server answered the end ok:1. `false`: its reply never came
    /// (the client closed first, the connection failed) — the end most
    /// likely happened, but rules may report on it only as a warning that
    /// says so, and enforce mode never rejects on it.
    pub confirmed: bool,
}

/// Where a transaction stands, as far as the proxy can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnPhase {
    /// Started, every reply so far clean.
    Open,
    /// A statement failed in a way that usually aborts the transaction on
    /// the server, but the reply did not say so (no TransientTransactionError
    /// label, not NoSuchTransaction). Only a later NoSuchTransaction proves it.
    LikelyAborted,
    /// The server said the transaction is gone (TransientTransactionError or
    /// NoSuchTransaction). `by_commit`: the proof came from a commit's reply,
    /// after which the driver may legitimately re-run the commit.
    ServerAborted {
        by_commit: bool,
    },
    /// A statement's connection closed before its reply: the outcome is
    /// unknown and the driver will abort or retry the whole transaction.
    Uncertain,
    /// commitTransaction sent; retries of it are legitimate.
    Committing,
    Committed,
    /// abortTransaction sent by the client.
    Aborted,
}

impl TxnPhase {
    /// Open and healthy: a new transaction now would silently abort it.
    pub fn is_open(self) -> bool {
        matches!(self, TxnPhase::Open)
    }
    /// Still holding server resources (for refreshing and left-open checks).
    pub fn holds_session(self) -> bool {
        matches!(
            self,
            TxnPhase::Open | TxnPhase::LikelyAborted | TxnPhase::Uncertain | TxnPhase::Committing
        )
    }
}

/// The latest transaction on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Transaction {
    pub number: i64,
    pub started_at: Millis,
    /// The request that started it (or the first statement seen, if the
    /// proxy missed the start).
    pub started_by: RequestRef,
    pub start_seen: bool,
    pub statements: u32,
    pub phase: TxnPhase,
    /// The reply that showed the abort (for txn-after-abort's evidence).
    pub aborted_by: Option<RequestRef>,
    pub left_open_reported: bool,
    /// Its outcome (committed or aborted) has been counted: retried
    /// commits and the driver's abort after a server abort change the
    /// phase again, but a transaction has one outcome.
    pub outcome_counted: bool,
}

impl Transaction {
    /// Claims the transaction's one outcome: 1 the first time, then 0.
    fn settle(&mut self) -> u8 {
        u8::from(!std::mem::replace(&mut self.outcome_counted, true))
    }

    /// The transaction is being dropped from the session (a higher
    /// txnNumber, or the session ended): the server aborts whatever is still
    /// in progress: 1 if that is its outcome. A commit whose reply never
    /// came (`Committing`) may have committed, so it is not counted either way.
    fn settle_as_dropped(&mut self) -> u8 {
        if matches!(
            self.phase,
            TxnPhase::Open | TxnPhase::LikelyAborted | TxnPhase::Uncertain
        ) {
            self.settle()
        } else {
            0
        }
    }
}

/// How many transactions one transition started, committed and aborted, for
/// the engine's counters. A transaction counts as started once (at the first
/// request carrying its txnNumber) and then at most once as committed or
/// aborted, whatever the retries. One request can abort one transaction and
/// start the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TxnEvents {
    pub started: u8,
    pub committed: u8,
    pub aborted: u8,
}

/// Identity of the last retryable write (outside transactions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryableWrite {
    pub txn_number: i64,
    pub statement: u64,
    pub request: RequestRef,
}

/// Everything the proxy knows about one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionState {
    pub first_seen: Millis,
    /// Last request or reply for this session.
    pub last_used: Millis,
    /// Last successful `refreshSessions` naming it (by the client or by the
    /// refresher); 0 when never.
    pub last_refreshed: Millis,
    pub in_flight: InFlightSet,
    pub ended: Option<Box<Ended>>,
    pub highest_txn: Option<i64>,
    pub txn: Option<Box<Transaction>>,
    pub last_retryable: Option<Box<RetryableWrite>>,
    /// The first client identity that used it.
    pub first_client: ClientId,
    /// A second identity already reported by cross-client-sharing.
    pub shared_with: ClientId,
    pub last_conn: u64,
    pub upstream: u32,
    pub refreshes: u32,
    pub open_cursors: u16,
    /// A refresher `refreshSessions` naming it has not answered yet.
    pub refresh_pending: bool,
    /// A request under it was forwarded since it was created or restarted:
    /// the server knows it. An entry made for a rejected request, or the
    /// tombstone of an lsid ended before any use, has not started.
    pub started: bool,
    /// `retry_fingerprint` of the last request whose connection closed
    /// before its reply (0: none). The session's next request, if it is the
    /// same command again, is the driver's retry of it (counted, never
    /// judged by it). 32 bits: it fits the padding after the small fields,
    /// and a collision would only miscount one retry.
    pub cut_off: u32,
}

impl SessionState {
    pub(crate) fn new(now: Millis) -> SessionState {
        SessionState {
            first_seen: now,
            last_used: now,
            last_refreshed: 0,
            in_flight: InFlightSet::default(),
            ended: None,
            highest_txn: None,
            txn: None,
            last_retryable: None,
            first_client: ClientId::UNKNOWN,
            shared_with: ClientId::UNKNOWN,
            last_conn: 0,
            upstream: 0,
            refreshes: 0,
            open_cursors: 0,
            refresh_pending: false,
            started: false,
            cut_off: 0,
        }
    }

    /// When the server last heard of this session (use or refresh).
    pub(crate) fn last_activity(&self) -> Millis {
        self.last_used.max(self.last_refreshed)
    }

    /// The application still holds server resources under this session: an
    /// open (or possibly open) transaction, or an open cursor.
    pub(crate) fn is_held(&self) -> bool {
        self.ended.is_none()
            && (self.open_cursors > 0
                || self
                    .txn
                    .as_ref()
                    .is_some_and(|txn| txn.phase.holds_session()))
    }

    /// Nothing in flight and nothing held: safe to forget under pressure.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && !self.is_held()
    }

    /// The session was ended or killed and the tombstone is still kept.
    pub(crate) fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// The last retryable write, if it carried `number`. It never carries
    /// a number above `highest_txn`, so the common case (every write with a
    /// fresh number) is answered without reading the boxed record: at
    /// hundreds of connections that read is a cache miss per write.
    pub(crate) fn last_retryable_with(&self, number: i64) -> Option<&RetryableWrite> {
        if self.highest_txn.is_none_or(|highest| number > highest) {
            return None;
        }
        self.last_retryable
            .as_deref()
            .filter(|last| last.txn_number == number)
    }

    /// A cursor of this session was opened (+1) or closed (-1).
    pub(crate) fn cursors_changed(&mut self, change: i8) {
        self.open_cursors = self.open_cursors.saturating_add_signed(change.into());
    }

    /// The server would treat the next use as a brand-new session (after an
    /// end, a kill, or an expiry): forget everything tied to the old one.
    pub(crate) fn restart(&mut self, now: Millis) {
        let first_client = self.first_client;
        *self = SessionState::new(now);
        self.first_client = first_client;
    }

    /// The server has most likely expired this session: idle (nothing in
    /// flight, no use or refresh) for longer than its session timeout.
    pub(crate) fn expired_on_server(&self, now: Millis, session_timeout: Millis) -> bool {
        self.ended.is_none()
            && self.in_flight.is_empty()
            && now.saturating_sub(self.last_activity()) > session_timeout
    }

    /// Marks the session ended by `by` (`confirmed`: the server answered
    /// ok:1). The server aborts its transaction and kills its cursors;
    /// in-flight requests keep running until they answer. A confirmed end
    /// is never replaced by an unconfirmed one: it is the better evidence.
    pub(crate) fn end(&mut self, kind: EndKind, by: RequestRef, confirmed: bool) -> TxnEvents {
        let aborted = self
            .txn
            .as_deref_mut()
            .map_or(0, Transaction::settle_as_dropped);
        let keep = self
            .ended
            .as_deref()
            .is_some_and(|ended| ended.confirmed && !confirmed);
        if !keep {
            self.ended = Some(Box::new(Ended {
                kind,
                by,
                confirmed,
            }));
        }
        self.txn = None;
        self.open_cursors = 0;
        TxnEvents {
            aborted,
            ..TxnEvents::default()
        }
    }

    /// Records a request that is being forwarded.
    pub(crate) fn apply_request(&mut self, request: &RequestFacts, now: Millis) -> TxnEvents {
        self.started = true;
        self.last_used = now;
        self.last_conn = request.request.conn;
        self.upstream = request.upstream;
        if self.first_client == ClientId::UNKNOWN {
            self.first_client = request.request.client;
        }
        if request.expects_reply {
            self.in_flight.insert(InFlight {
                request: request.request,
                statement: request.statement,
                class: request.class,
                abandoned: false,
                suspected: false,
            });
        }
        let Some(number) = request.request.txn_number else {
            return TxnEvents::default();
        };
        let fresh = self.highest_txn.is_none_or(|highest| number > highest);
        if fresh {
            self.highest_txn = Some(number);
        }
        let mut events = TxnEvents::default();
        if request.in_transaction {
            events = self.apply_transaction_request(request, number, now);
        } else if request.retryable_write {
            if let Some(txn) = self.txn.as_deref_mut() {
                // A higher txnNumber on the session aborts the transaction
                // in progress, retryable write or not.
                if number > txn.number {
                    events.aborted = txn.settle_as_dropped();
                    self.txn = None;
                }
            }
            let write = RetryableWrite {
                txn_number: number,
                statement: request.statement,
                request: request.request,
            };
            match &mut self.last_retryable {
                // A number above all before it: stored without reading the
                // record it replaces (see `last_retryable_with`).
                Some(last) if fresh => **last = write,
                // The first write with this number defines it; later
                // different writes with the same number are the reuse.
                Some(last) if last.txn_number == number => {}
                Some(last) => **last = write,
                None => self.last_retryable = Some(Box::new(write)),
            }
        }
        events
    }

    fn apply_transaction_request(
        &mut self,
        request: &RequestFacts,
        number: i64,
        now: Millis,
    ) -> TxnEvents {
        let mut events = TxnEvents::default();
        let same = self.txn.as_ref().is_some_and(|txn| txn.number == number);
        if !same {
            if self.txn.as_ref().is_some_and(|txn| txn.number > number) {
                // A regression: the server refuses it if it arrives after
                // the higher number; either way nothing changes here.
                return events;
            }
            // A higher txnNumber aborts the transaction in progress.
            events.aborted = self
                .txn
                .as_deref_mut()
                .map_or(0, Transaction::settle_as_dropped);
            events.started = 1;
            let fresh = Transaction {
                number,
                started_at: now,
                started_by: request.request,
                start_seen: request.start_transaction,
                statements: 0,
                phase: TxnPhase::Open,
                aborted_by: None,
                left_open_reported: false,
                outcome_counted: false,
            };
            match &mut self.txn {
                Some(txn) => **txn = fresh,
                None => self.txn = Some(Box::new(fresh)),
            }
        }
        let Some(txn) = self.txn.as_deref_mut() else {
            return events;
        };
        match request.class {
            CommandClass::Commit => {
                if !matches!(
                    txn.phase,
                    TxnPhase::ServerAborted { .. } | TxnPhase::Aborted
                ) {
                    txn.phase = TxnPhase::Committing;
                }
            }
            CommandClass::Abort => {
                txn.phase = TxnPhase::Aborted;
                events.aborted += txn.settle();
            }
            _ => {
                txn.statements = txn.statements.saturating_add(1);
                if request.start_transaction && !txn.start_seen {
                    txn.start_seen = true;
                    txn.started_at = now;
                    txn.started_by = request.request;
                }
            }
        }
        events
    }

    /// Records the reply to `request` (which was in flight on this session).
    /// `final_reply` is false for an exhaust reply with more to come.
    pub(crate) fn apply_reply(
        &mut self,
        request: &InFlight,
        reply: &ReplyFacts,
        final_reply: bool,
        now: Millis,
    ) -> ReplyApplied {
        let mut applied = ReplyApplied::default();
        self.last_used = now;
        let (conn, request_id) = (request.request.conn, request.request.request_id);
        // Any reply delivered (the first of an exhaust stream too) decides
        // the verdict an identical request awaits.
        applied.suspected = if final_reply {
            self.in_flight
                .remove(conn, request_id)
                .is_some_and(|removed| removed.suspected)
        } else {
            self.in_flight.set_suspected(conn, request_id, false)
        };
        let Some(number) = request.request.txn_number else {
            return applied;
        };
        let Some(txn) = self.txn.as_deref_mut() else {
            return applied;
        };
        if txn.number != number || !reply.in_transaction {
            return applied;
        }
        let events = &mut applied.txn;
        match request.class {
            CommandClass::Abort => txn.phase = TxnPhase::Aborted,
            CommandClass::Commit => {
                // Committed only when acknowledged: ok:1 without a
                // writeConcernError. With one, the commit's durability is
                // unknown (drivers label it UnknownTransactionCommitResult
                // and retry it), like a commit whose reply never came.
                if reply.ok && !reply.write_concern_error {
                    txn.phase = TxnPhase::Committed;
                    events.committed = txn.settle();
                } else if reply.ok || reply.unknown_commit_result || reply.retryable {
                    txn.phase = TxnPhase::Committing;
                } else {
                    txn.phase = TxnPhase::ServerAborted { by_commit: true };
                    txn.aborted_by = Some(request.request);
                    events.aborted = txn.settle();
                }
            }
            _ => {
                if reply.clean_success || reply.overloaded {
                    return applied;
                }
                if reply.transient || reply.no_such_transaction {
                    txn.phase = TxnPhase::ServerAborted { by_commit: false };
                    txn.aborted_by = Some(request.request);
                    events.aborted = txn.settle();
                } else if matches!(txn.phase, TxnPhase::Open) {
                    txn.phase = TxnPhase::LikelyAborted;
                    txn.aborted_by = Some(request.request);
                }
            }
        }
        applied
    }

    /// The connection of an in-flight request closed before its reply.
    /// Returns whether an identical request awaited the verdict on it.
    pub(crate) fn connection_closed(&mut self, entry: &InFlight) -> bool {
        let suspected = self
            .in_flight
            .remove(entry.request.conn, entry.request.request_id)
            .is_some_and(|removed| removed.suspected);
        self.cut_off = retry_fingerprint(entry.statement, entry.request.txn_number);
        let Some(number) = entry.request.txn_number else {
            return suspected;
        };
        if self.txn.as_deref().is_some_and(|txn| txn.number == number) {
            self.transaction_cut();
        }
        suspected
    }

    /// A connection that carried statements of this session's transaction
    /// was cut by the upstream side: an open transaction's outcome is now
    /// unknown (the driver will abort or retry the whole transaction).
    pub(crate) fn transaction_cut(&mut self) {
        if let Some(txn) = self.txn.as_deref_mut() {
            if matches!(txn.phase, TxnPhase::Open | TxnPhase::LikelyAborted) {
                txn.phase = TxnPhase::Uncertain;
            }
        }
    }

    /// Whether `request` repeats the request last cut off by its
    /// connection closing (the driver retrying it); forgets the cut-off
    /// either way, since only the very next request can be its retry.
    pub(crate) fn take_cut_off(&mut self, request: &RequestFacts) -> bool {
        if self.cut_off == 0 {
            return false;
        }
        std::mem::take(&mut self.cut_off)
            == retry_fingerprint(request.statement, request.request.txn_number)
    }
}

/// The facts of one request the state machine and the rules need, already
/// extracted from the command view and resolved to ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestFacts {
    pub request: RequestRef,
    pub class: CommandClass,
    pub statement: u64,
    pub upstream: u32,
    /// `autocommit: false`.
    pub in_transaction: bool,
    pub start_transaction: bool,
    /// A txnNumber outside a transaction.
    pub retryable_write: bool,
    pub unacknowledged: bool,
    /// False for `moreToCome` requests (no reply will come).
    pub expects_reply: bool,
}

/// What recording a reply changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ReplyApplied {
    pub txn: TxnEvents,
    /// The answered request had an identical request on another connection
    /// awaiting the verdict on it (now: concurrent use).
    pub suspected: bool,
}

/// The identity `cut_off` keeps of a request: its statement hash (command,
/// namespace, statements) with its txnNumber folded in, never 0.
pub(crate) fn retry_fingerprint(statement: u64, txn_number: Option<i64>) -> u32 {
    // An odd multiplier keeps different numbers apart; `| 1` keeps 0 free
    // for "none" (costing one bit).
    let number = txn_number.map_or(0, |n| n as u64);
    let mixed = statement ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((mixed >> 32) as u32 ^ mixed as u32) | 1
}

/// The facts of one reply the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ReplyFacts {
    pub ok: bool,
    /// ok and no writeErrors.
    pub clean_success: bool,
    /// The request was a transaction statement (`autocommit: false`).
    pub in_transaction: bool,
    /// errorLabels has TransientTransactionError.
    pub transient: bool,
    /// code (or a writeErrors code) is NoSuchTransaction (251).
    pub no_such_transaction: bool,
    /// errorLabels has UnknownTransactionCommitResult.
    pub unknown_commit_result: bool,
    /// errorLabels has RetryableWriteError.
    pub retryable: bool,
    /// errorLabels has SystemOverloadedError / RetryableError: the server
    /// refused before running the command, and drivers retry it as is.
    pub overloaded: bool,
    /// The reply carries a writeConcernError.
    pub write_concern_error: bool,
}

/// What the admin API shows of one session, copied out of the ledger
/// (plain values, no strings), so no ledger lock is held while a listing
/// is sorted and rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSummary {
    pub first_seen: Millis,
    pub last_used: Millis,
    /// 0 when never refreshed.
    pub last_refreshed: Millis,
    /// How it ended, and when.
    pub ended: Option<(EndKind, Millis)>,
    pub highest_txn: Option<i64>,
    /// The current transaction: number, phase, statements, start.
    pub txn: Option<(i64, TxnPhase, u32, Millis)>,
    pub in_flight: usize,
    pub open_cursors: u16,
    pub refreshes: u32,
    /// The application holds it (an open transaction or cursor).
    pub held: bool,
}

impl SessionSummary {
    pub(crate) fn of(state: &SessionState) -> SessionSummary {
        SessionSummary {
            first_seen: state.first_seen,
            last_used: state.last_used,
            last_refreshed: state.last_refreshed,
            ended: state.ended.as_deref().map(|e| (e.kind, e.by.at)),
            highest_txn: state.highest_txn,
            txn: state
                .txn
                .as_deref()
                .map(|t| (t.number, t.phase, t.statements, t.started_at)),
            in_flight: state.in_flight.len(),
            open_cursors: state.open_cursors,
            refreshes: state.refreshes,
            held: state.is_held(),
        }
    }

    pub fn is_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// Not ended, with a transaction that holds the session.
    pub fn in_transaction(&self) -> bool {
        self.ended.is_none()
            && self
                .txn
                .is_some_and(|(_, phase, _, _)| phase.holds_session())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn request(conn: u64, request_id: i32, at: Millis, txn: Option<i64>) -> RequestRef {
        RequestRef {
            conn,
            at,
            txn_number: txn,
            request_id,
            client: ClientId(1),
            command: Sym(1),
            namespace: Sym(1),
        }
    }

    pub(crate) fn facts(request: RequestRef, class: CommandClass) -> RequestFacts {
        RequestFacts {
            request,
            class,
            statement: 1,
            upstream: 0,
            in_transaction: false,
            start_transaction: false,
            retryable_write: false,
            unacknowledged: false,
            expects_reply: true,
        }
    }

    #[test]
    fn session_state_stays_small() {
        // The target is at most 300 bytes per tracked session; the ledger
        // stores exactly this pair in a slab slot, plus ~5-12 bytes of index.
        let size = std::mem::size_of::<(SessionKey, SessionState)>();
        assert!(size <= 192, "SessionState + key is {size} bytes");
        // The rarely used overlap list is one pointer.
        assert_eq!(
            std::mem::size_of::<InFlightSet>(),
            std::mem::size_of::<Option<InFlight>>() + std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn in_flight_set_keeps_overlaps_and_removes_exactly() {
        let mut set = InFlightSet::default();
        let a = InFlight {
            request: request(1, 10, 0, None),
            statement: 1,
            class: CommandClass::Other,
            abandoned: false,
            suspected: false,
        };
        let b = InFlight {
            request: request(2, 10, 0, None),
            statement: 2,
            class: CommandClass::Other,
            abandoned: false,
            suspected: false,
        };
        let c = InFlight {
            request: request(2, 11, 0, None),
            statement: 3,
            class: CommandClass::Other,
            abandoned: false,
            suspected: false,
        };
        set.insert(a);
        set.insert(b);
        set.insert(c);
        assert_eq!(set.len(), 3);
        assert_eq!(set.find(2, 11), Some(&c));
        assert_eq!(set.remove(1, 10), Some(a));
        assert_eq!(set.remove(1, 10), None);
        assert_eq!(set.len(), 2);
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), vec![b, c]);
        set.remove_connection(2);
        assert!(set.is_empty());
        assert_eq!(set.more, None, "the overlap list was given back");
        // Removing from the overlaps, then the first, in either order.
        set.insert(a);
        set.insert(b);
        set.insert(c);
        assert_eq!(set.remove(2, 11), Some(c));
        assert_eq!(set.remove(9, 9), None);
        assert_eq!(set.remove(2, 10), Some(b));
        assert_eq!(set.more, None);
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), vec![a]);
        let get_more = InFlight {
            class: CommandClass::GetMore,
            ..b
        };
        set.insert(get_more);
        set.abandon_get_mores();
        assert!(set.find(2, 10).is_some_and(|entry| entry.abandoned));
        assert!(set.find(1, 10).is_some_and(|entry| !entry.abandoned));
        let b = *set.find(2, 10).unwrap();
        assert_eq!(set.remove(1, 10), Some(a));
        assert_eq!(set.len(), 1);
        assert_eq!(set.more, None);
        assert_eq!(set.remove(2, 10), Some(b));
        assert!(set.is_empty());
    }

    #[test]
    fn retryable_writes_track_highest_and_first_identity() {
        let mut state = SessionState::new(0);
        let mut write = facts(request(1, 1, 5, Some(3)), CommandClass::Write);
        write.retryable_write = true;
        write.statement = 77;
        state.apply_request(&write, 5);
        assert_eq!(state.highest_txn, Some(3));
        assert_eq!(state.last_retryable.as_ref().unwrap().statement, 77);
        // A different write with the same number does not replace the first.
        let mut other = write;
        other.statement = 88;
        other.request.request_id = 2;
        state.apply_request(&other, 6);
        assert_eq!(state.last_retryable.as_ref().unwrap().statement, 77);
        let mut next = write;
        next.request.txn_number = Some(4);
        next.statement = 99;
        state.apply_request(&next, 7);
        assert_eq!(state.highest_txn, Some(4));
        assert_eq!(state.last_retryable.as_ref().unwrap().statement, 99);
        assert_eq!(state.in_flight.len(), 3);
        // Looked up by number: only the current one, never a fresh one.
        assert_eq!(state.last_retryable_with(4).map(|w| w.statement), Some(99));
        assert!(state.last_retryable_with(3).is_none());
        assert!(state.last_retryable_with(5).is_none());
        // A lower number after a transaction raised the highest: the last
        // retryable write is still found by its own number.
        let mut txn = facts(request(1, 4, 8, Some(9)), CommandClass::Write);
        txn.in_transaction = true;
        txn.start_transaction = true;
        state.apply_request(&txn, 8);
        assert_eq!(state.highest_txn, Some(9));
        assert_eq!(state.last_retryable_with(4).map(|w| w.statement), Some(99));
    }

    #[test]
    fn transaction_lifecycle_commit() {
        let mut state = SessionState::new(0);
        let mut start = facts(request(1, 1, 0, Some(1)), CommandClass::Write);
        start.in_transaction = true;
        start.start_transaction = true;
        state.apply_request(&start, 0);
        assert!(state.is_held());
        let txn = state.txn.as_ref().unwrap();
        assert_eq!(
            (txn.number, txn.phase, txn.statements, txn.start_seen),
            (1, TxnPhase::Open, 1, true)
        );
        let entry = *state.in_flight.iter().next().unwrap();
        let clean = ReplyFacts {
            ok: true,
            clean_success: true,
            in_transaction: true,
            ..Default::default()
        };
        state.apply_reply(&entry, &clean, true, 1);
        assert!(state.in_flight.is_empty());
        let mut commit = facts(request(1, 2, 2, Some(1)), CommandClass::Commit);
        commit.in_transaction = true;
        state.apply_request(&commit, 2);
        assert_eq!(state.txn.as_ref().unwrap().phase, TxnPhase::Committing);
        let entry = *state.in_flight.iter().next().unwrap();
        state.apply_reply(&entry, &clean, true, 3);
        assert_eq!(state.txn.as_ref().unwrap().phase, TxnPhase::Committed);
        assert!(!state.is_held());
    }

    #[test]
    fn statement_errors_mark_the_transaction_aborted_with_the_right_certainty() {
        let mut start = facts(request(1, 1, 0, Some(1)), CommandClass::Write);
        start.in_transaction = true;
        start.start_transaction = true;
        let cases = [
            (
                ReplyFacts {
                    in_transaction: true,
                    transient: true,
                    ..Default::default()
                },
                TxnPhase::ServerAborted { by_commit: false },
            ),
            (
                ReplyFacts {
                    in_transaction: true,
                    no_such_transaction: true,
                    ..Default::default()
                },
                TxnPhase::ServerAborted { by_commit: false },
            ),
            (
                ReplyFacts {
                    in_transaction: true,
                    ok: true,
                    ..Default::default()
                },
                TxnPhase::LikelyAborted,
            ),
            (
                ReplyFacts {
                    in_transaction: true,
                    overloaded: true,
                    ..Default::default()
                },
                TxnPhase::Open,
            ),
        ];
        for (reply, expected) in cases {
            let mut state = SessionState::new(0);
            state.apply_request(&start, 0);
            let entry = *state.in_flight.iter().next().unwrap();
            state.apply_reply(&entry, &reply, true, 1);
            assert_eq!(state.txn.as_ref().unwrap().phase, expected, "{reply:?}");
        }
    }

    #[test]
    fn a_higher_retryable_write_ends_the_transaction_and_end_clears_everything() {
        let mut state = SessionState::new(0);
        let mut start = facts(request(1, 1, 0, Some(1)), CommandClass::Write);
        start.in_transaction = true;
        start.start_transaction = true;
        state.apply_request(&start, 0);
        let mut write = facts(request(1, 2, 1, Some(2)), CommandClass::Write);
        write.retryable_write = true;
        state.apply_request(&write, 1);
        assert!(state.txn.is_none());
        state.open_cursors = 2;
        assert!(state.is_held());
        state.end(EndKind::Ended, request(3, 9, 2, None), true);
        assert!(state.is_ended());
        assert!(!state.is_held());
        state.restart(3);
        assert!(!state.is_ended());
        assert_eq!(state.highest_txn, None);
        assert_eq!(state.first_client, ClientId(1));
    }

    #[test]
    fn closing_a_connection_mid_statement_makes_the_transaction_uncertain() {
        let mut state = SessionState::new(0);
        let mut start = facts(request(1, 1, 0, Some(1)), CommandClass::Write);
        start.in_transaction = true;
        start.start_transaction = true;
        state.apply_request(&start, 0);
        let entry = *state.in_flight.iter().next().unwrap();
        state.connection_closed(&entry);
        assert!(state.in_flight.is_empty());
        assert_eq!(state.txn.as_ref().unwrap().phase, TxnPhase::Uncertain);
    }
}
