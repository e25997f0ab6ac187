//! Logical sessions, their transactions and retryable-write history,
//! cursors, and the per-document write locks of open transactions,
//! following the server's rules (transaction_participant.cpp):
//! one active txnNumber per session; a higher one starts a new retryable
//! write or transaction (aborting an open one); a lower one is
//! TransactionTooOld; a transaction is continued only at the active number
//! while it is in progress.
//!
//! Ending or killing a session kills its cursors and aborts its open
//! transaction, but keeps its txnNumber history: the server keeps the
//! session's `config.transactions` record until the session has expired and
//! the reaper removes it (TransactionRecordMinimumLifetimeMinutes), so a
//! lower txnNumber after `endSessions` is still TransactionTooOld and a
//! retried write is still deduplicated. Expired sessions are forgotten.
//!
//! Writes: a transaction's first write to a document locks it (keyed by
//! namespace and `_id`) and keeps its committed pre-image; another
//! transaction writing it gets WriteConflict (first writer wins), as does a
//! transaction writing a document committed by someone else after its
//! snapshot; a write outside any transaction is told to wait until the lock
//! is released (the server retries such write conflicts internally, so the
//! write blocks until the transaction commits or aborts). Readers other than
//! the owner see the pre-image (read committed). Abort puts back exactly the
//! pre-images of the documents the transaction locked, nothing else.
//!
//! Pure state: no I/O, no clocks other than the `now` passed in and the
//! cluster clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{spec::BinarySubtype, Bson, Document};

use super::clock::{packed, ClusterClock};
use super::dataset::{doc_id, DataSet, DocId, DuplicateId, Seq};
use super::errors::{
    CommandError, CONFLICTING_OPERATION_IN_PROGRESS, INCOMPLETE_TRANSACTION_HISTORY,
    INVALID_OPTIONS, NO_SUCH_TRANSACTION, TRANSACTION_COMMITTED, TRANSACTION_TOO_OLD,
    TRANSIENT_TRANSACTION_ERROR,
};

/// SHA-256 of the empty user name, which the server shows as the lsid's
/// `uid` when no one is authenticated.
const ANONYMOUS_UID: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

/// A session's identity: `lsid.id` plus the owning user (the connection's
/// authenticated user, `None` without authentication). The server keys
/// sessions by both, so two users' sessions with the same id are different
/// sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ServerSessionKey {
    pub id: Vec<u8>,
    pub owner: Option<String>,
}

impl ServerSessionKey {
    /// Reads `{id: UUID}` from an lsid document.
    pub(crate) fn from_lsid(lsid: &Document) -> Option<ServerSessionKey> {
        match lsid.get("id") {
            Some(Bson::Binary(bin))
                if bin.subtype == BinarySubtype::Uuid || bin.subtype == BinarySubtype::UuidOld =>
            {
                Some(ServerSessionKey {
                    id: bin.bytes.clone(),
                    owner: None,
                })
            }
            _ => None,
        }
    }

    fn uuid_string(&self) -> String {
        let hex: String = self.id.iter().map(|b| format!("{b:02x}")).collect();
        if hex.len() == 32 {
            format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            )
        } else {
            hex
        }
    }

    /// The same lsid as a session of `user` (the server keys sessions by
    /// lsid and user: one user cannot touch another's sessions).
    pub(crate) fn owned_by(mut self, user: Option<&str>) -> ServerSessionKey {
        self.owner = user.map(str::to_owned);
        self
    }

    /// The server's rendering of an lsid in error messages.
    pub(crate) fn display(&self) -> String {
        format!("{} - {} -  - ", self.uuid_string(), ANONYMOUS_UID)
    }

    /// A short prefix for logs.
    pub(crate) fn short(&self) -> String {
        self.uuid_string().chars().take(8).collect()
    }
}

/// What a retried statement answers instead of executing again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StmtOutcome {
    Write {
        n: i64,
        n_modified: i64,
        upserted: Option<Bson>,
    },
    Reply(Document),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnState {
    InProgress,
    Committed,
    Aborted,
}

/// A document a transaction wrote: collection and `_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DocRef {
    pub db: String,
    pub coll: String,
    pub id: DocId,
}

#[derive(Debug)]
pub(crate) enum TxnMode {
    /// No txnNumber used yet.
    None,
    /// Retryable writes at the active txnNumber: statements already executed.
    Retryable { executed: HashMap<i32, StmtOutcome> },
    /// A multi-document transaction at the active txnNumber.
    Transaction {
        state: TxnState,
        /// Documents locked by this transaction (each once).
        written: Vec<DocRef>,
        /// Cluster time when it started: later committed writes conflict.
        snapshot: u64,
        started: Instant,
    },
}

#[derive(Debug)]
pub(crate) struct ServerSession {
    pub last_use: Instant,
    pub active_txn_number: Option<i64>,
    pub mode: TxnMode,
    /// Ended or killed: kept only for its txnNumber history.
    pub ended: bool,
}

impl ServerSession {
    fn new(now: Instant) -> ServerSession {
        ServerSession {
            last_use: now,
            active_txn_number: None,
            mode: TxnMode::None,
            ended: false,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Cursor {
    pub ns: String,
    pub remaining: VecDeque<Document>,
    pub session: Option<ServerSessionKey>,
    pub last_use: Instant,
}

/// How a command runs with respect to transactions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TxnContext {
    None,
    Retryable {
        key: ServerSessionKey,
        txn_number: i64,
    },
    Transaction {
        key: ServerSessionKey,
        txn_number: i64,
    },
}

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteRefused {
    /// Another document already has this `_id`.
    Duplicate,
    /// A transaction's write hit another transaction's lock, or a write
    /// committed after its snapshot: WriteConflict.
    Conflict,
    /// A write outside any transaction hit a transaction's lock: it must
    /// wait until that transaction ends, then run again.
    Blocked,
}

/// A document locked by an open transaction, and its committed version.
#[derive(Debug)]
struct DocLock {
    owner: ServerSessionKey,
    txn_number: i64,
    /// `None`: the transaction inserted it (nothing committed to restore).
    before: Option<(Seq, Document)>,
}

type CollKey = (String, String);

/// Everything behind the emulator's one data lock.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub store: DataSet,
    pub sessions: HashMap<ServerSessionKey, ServerSession>,
    pub cursors: HashMap<i64, Cursor>,
    pub clock: Arc<ClusterClock>,
    locks: HashMap<CollKey, HashMap<DocId, DocLock>>,
    /// Commit times of documents written while some transaction was open
    /// (only those can be newer than an open transaction's snapshot).
    last_write: HashMap<CollKey, HashMap<DocId, u64>>,
    in_progress: usize,
    /// Bumped whenever a transaction ends (its locks released), so blocked
    /// writers know when to try again.
    pub txn_endings: u64,
}

fn coll_key(db: &str, coll: &str) -> CollKey {
    (db.to_string(), coll.to_string())
}

fn owner_of(ctx: &TxnContext) -> Option<(&ServerSessionKey, i64)> {
    match ctx {
        TxnContext::Transaction { key, txn_number } => Some((key, *txn_number)),
        _ => None,
    }
}

impl Inner {
    /// A fresh state reporting times from `clock`.
    pub(crate) fn with_clock(clock: Arc<ClusterClock>) -> Inner {
        Inner {
            clock,
            ..Inner::default()
        }
    }

    /// Marks a session used now, first expiring it if it sat idle too long.
    /// Creates an unknown one, as the server's session cache does (which is
    /// all refreshSessions needs).
    pub(crate) fn touch(&mut self, key: &ServerSessionKey, now: Instant, timeout: Duration) {
        let expired = self
            .sessions
            .get(key)
            .is_some_and(|s| now.saturating_duration_since(s.last_use) > timeout);
        if expired {
            tracing::debug!(lsid = %key.short(), "session expired (idle past the session timeout)");
            self.forget_session(key);
        }
        let session = self
            .sessions
            .entry(key.clone())
            .or_insert_with(|| ServerSession::new(now));
        session.last_use = now;
        session.ended = false;
    }

    /// Ends (or kills) a session: kills its cursors, aborts an open
    /// transaction; keeps its txnNumber history, if it has one, until it
    /// expires. Returns whether it was live.
    pub(crate) fn end_session(&mut self, key: &ServerSessionKey) -> bool {
        self.cursors.retain(|_, c| c.session.as_ref() != Some(key));
        self.abort_in_progress(key);
        let Some(session) = self.sessions.get_mut(key) else {
            return false;
        };
        let was_live = !session.ended;
        if session.active_txn_number.is_some() {
            session.ended = true;
        } else {
            self.sessions.remove(key);
        }
        was_live
    }

    /// Forgets a session entirely (expiry).
    fn forget_session(&mut self, key: &ServerSessionKey) {
        self.end_session(key);
        self.sessions.remove(key);
    }

    /// Sessions not ended.
    #[cfg(test)]
    pub(crate) fn live_session_count(&self) -> usize {
        self.sessions.values().filter(|s| !s.ended).count()
    }

    pub(crate) fn all_session_keys(&self) -> Vec<ServerSessionKey> {
        self.sessions
            .iter()
            .filter(|(_, s)| !s.ended)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Expires idle sessions and idle session-less cursors, and aborts
    /// transactions open longer than `txn_lifetime`
    /// (transactionLifetimeLimitSeconds).
    pub(crate) fn reap(
        &mut self,
        now: Instant,
        session_timeout: Duration,
        cursor_timeout: Duration,
        txn_lifetime: Duration,
    ) {
        let expired: Vec<ServerSessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_use) > session_timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            tracing::debug!(lsid = %key.short(), "session expired (idle past the session timeout)");
            self.forget_session(&key);
        }
        if self.in_progress > 0 {
            let too_old: Vec<ServerSessionKey> = self
                .sessions
                .iter()
                .filter(|(_, s)| match &s.mode {
                    TxnMode::Transaction {
                        state: TxnState::InProgress,
                        started,
                        ..
                    } => now.saturating_duration_since(*started) > txn_lifetime,
                    _ => false,
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in too_old {
                tracing::info!(lsid = %key.short(), "transaction aborted: open longer than the transaction lifetime limit");
                self.abort_in_progress(&key);
            }
        }
        self.cursors.retain(|id, c| {
            let keep =
                c.session.is_some() || now.saturating_duration_since(c.last_use) <= cursor_timeout;
            if !keep {
                tracing::debug!(cursor_id = id, "cursor timed out");
            }
            keep
        });
    }

    /// The server's beginOrContinue for a command carrying `txnNumber`.
    pub(crate) fn begin_or_continue(
        &mut self,
        key: &ServerSessionKey,
        txn_number: i64,
        autocommit: Option<bool>,
        start_transaction: bool,
        command: &str,
        now: Instant,
    ) -> Result<TxnContext, CommandError> {
        if autocommit == Some(true) {
            return Err(CommandError::new(
                INVALID_OPTIONS,
                "Specifying autocommit=true is not allowed.",
            ));
        }
        if start_transaction && autocommit.is_none() {
            return Err(CommandError::new(
                INVALID_OPTIONS,
                "Specifying startTransaction=true without autocommit=false is not allowed.",
            ));
        }
        let display = key.display();
        let Some(session) = self.sessions.get(key) else {
            return Err(CommandError::new(NO_SUCH_TRANSACTION, "session not found"));
        };
        let active = session.active_txn_number;
        if let Some(active) = active.filter(|a| txn_number < *a) {
            let current = if matches!(session.mode, TxnMode::Transaction { .. }) {
                "transaction"
            } else {
                "retryable write"
            };
            let msg = if autocommit.is_none() {
                format!(
                    "Retryable write with txnNumber {txn_number} is prohibited on session {display} because a newer {current} with txnNumber {active} has already started on this session."
                )
            } else {
                format!(
                    "Cannot start transaction with {{ txnNumber: {txn_number}, txnRetryCounter: 0 }} on session {display} because a newer {current} with txnNumberAndRetryCounter {{ txnNumber: {active}, txnRetryCounter: 0 }} has already started on this session."
                )
            };
            return Err(CommandError::new(TRANSACTION_TOO_OLD, msg));
        }
        let is_newer = active.is_none_or(|a| txn_number > a);

        if autocommit.is_none() {
            // A retryable write.
            if is_newer {
                self.abort_in_progress(key);
                if let Some(session) = self.sessions.get_mut(key) {
                    session.active_txn_number = Some(txn_number);
                    session.mode = TxnMode::Retryable {
                        executed: HashMap::new(),
                    };
                }
            } else if !matches!(session.mode, TxnMode::Retryable { .. }) {
                return Err(CommandError::new(
                    INCOMPLETE_TRANSACTION_HISTORY,
                    "Cannot retry a retryable write that has been converted into a transaction",
                ));
            }
            return Ok(TxnContext::Retryable {
                key: key.clone(),
                txn_number,
            });
        }

        if start_transaction {
            if !is_newer {
                return Err(CommandError::new(
                    CONFLICTING_OPERATION_IN_PROGRESS,
                    "Only servers in a sharded cluster can start a new transaction at the active transaction number",
                ));
            }
            self.abort_in_progress(key);
            let snapshot = packed(self.clock.current());
            if let Some(session) = self.sessions.get_mut(key) {
                session.active_txn_number = Some(txn_number);
                session.mode = TxnMode::Transaction {
                    state: TxnState::InProgress,
                    written: Vec::new(),
                    snapshot,
                    started: now,
                };
                self.in_progress += 1;
            }
            return Ok(TxnContext::Transaction {
                key: key.clone(),
                txn_number,
            });
        }

        // Continuing a transaction.
        let no_such = || {
            CommandError::new(
                NO_SUCH_TRANSACTION,
                format!(
                    "Given transaction number {txn_number} does not match any in-progress transactions. The active transaction number is {}",
                    active.unwrap_or(-1)
                ),
            )
            .with_label(TRANSIENT_TRANSACTION_ERROR)
        };
        if is_newer {
            return Err(no_such());
        }
        let TxnMode::Transaction { state, .. } = &session.mode else {
            return Err(no_such());
        };
        match (*state, command) {
            (TxnState::InProgress, _) => {}
            (TxnState::Committed, "commitTransaction") => {}
            (TxnState::Committed, _) => {
                return Err(CommandError::new(
                    TRANSACTION_COMMITTED,
                    format!("Transaction with {{ txnNumber: {txn_number} }} has been committed."),
                ))
            }
            (TxnState::Aborted, _) => {
                return Err(CommandError::new(
                    NO_SUCH_TRANSACTION,
                    format!("Transaction with {{ txnNumber: {txn_number}, txnRetryCounter: 0 }} has been aborted."),
                )
                .with_label(TRANSIENT_TRANSACTION_ERROR))
            }
        }
        Ok(TxnContext::Transaction {
            key: key.clone(),
            txn_number,
        })
    }

    /// Ends the session's in-progress transaction, if any, committing or
    /// rolling back its writes and releasing its locks.
    fn finish(&mut self, key: &ServerSessionKey, commit: bool) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let TxnMode::Transaction { state, written, .. } = &mut session.mode else {
            return;
        };
        if *state != TxnState::InProgress {
            return;
        }
        *state = if commit {
            TxnState::Committed
        } else {
            TxnState::Aborted
        };
        let written = std::mem::take(written);
        self.in_progress = self.in_progress.saturating_sub(1);
        self.txn_endings = self.txn_endings.wrapping_add(1);
        let commit_time = (commit && !written.is_empty()).then(|| packed(self.clock.tick()));
        for doc in written {
            let coll = coll_key(&doc.db, &doc.coll);
            let lock = self
                .locks
                .get_mut(&coll)
                .and_then(|locks| locks.remove(&doc.id));
            if self.locks.get(&coll).is_some_and(HashMap::is_empty) {
                self.locks.remove(&coll);
            }
            match commit_time {
                Some(time) => {
                    if self.in_progress > 0 {
                        self.last_write
                            .entry(coll)
                            .or_default()
                            .insert(doc.id, time);
                    }
                }
                None => {
                    // Undo exactly this document: nobody else could write it
                    // while it was locked.
                    self.store.remove_id(&doc.db, &doc.coll, &doc.id);
                    if let Some((seq, before)) = lock.and_then(|l| l.before) {
                        self.store.restore(&doc.db, &doc.coll, seq, before);
                    }
                }
            }
        }
        if self.in_progress == 0 {
            self.last_write.clear();
        }
    }

    fn abort_in_progress(&mut self, key: &ServerSessionKey) {
        self.finish(key, false);
    }

    /// Aborts every transaction in progress (a primary stepping down aborts
    /// its unprepared transactions). Returns how many it aborted.
    pub(crate) fn abort_all_in_progress(&mut self) -> usize {
        let open: Vec<ServerSessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s.mode,
                    TxnMode::Transaction {
                        state: TxnState::InProgress,
                        ..
                    }
                )
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &open {
            self.finish(key, false);
        }
        open.len()
    }

    /// Aborts the transaction `txn_number` of `key` if it is in progress
    /// (any error in a transaction aborts it on the server).
    pub(crate) fn abort_if_in_progress(&mut self, key: &ServerSessionKey, txn_number: i64) {
        let active = self
            .sessions
            .get(key)
            .is_some_and(|s| s.active_txn_number == Some(txn_number));
        if active {
            self.finish(key, false);
        }
    }

    /// Commits the transaction the context names (already validated).
    pub(crate) fn commit(&mut self, ctx: &TxnContext) {
        if let TxnContext::Transaction { key, .. } = ctx {
            self.finish(key, true);
        }
    }

    /// Aborts (rolls back) the transaction the context names, if in progress.
    pub(crate) fn abort(&mut self, ctx: &TxnContext) {
        if let TxnContext::Transaction { key, .. } = ctx {
            self.finish(key, false);
        }
    }

    /// The state of the transaction a context names.
    pub(crate) fn txn_state(&self, ctx: &TxnContext) -> Option<TxnState> {
        let TxnContext::Transaction { key, .. } = ctx else {
            return None;
        };
        match &self.sessions.get(key)?.mode {
            TxnMode::Transaction { state, .. } => Some(*state),
            _ => None,
        }
    }

    /// Number of transactions in progress (for tests and logs).
    pub(crate) fn open_transactions(&self) -> usize {
        self.in_progress
    }

    /// Whether `ctx` may write the document `id` of `db.coll` now.
    pub(crate) fn check_write(
        &self,
        ctx: &TxnContext,
        db: &str,
        coll: &str,
        id: &DocId,
    ) -> Result<(), WriteRefused> {
        let owner = owner_of(ctx);
        let coll_key = coll_key(db, coll);
        if let Some(lock) = self.locks.get(&coll_key).and_then(|l| l.get(id)) {
            let mine = owner.is_some_and(|(k, n)| *k == lock.owner && n == lock.txn_number);
            if !mine {
                return Err(if owner.is_some() {
                    WriteRefused::Conflict
                } else {
                    WriteRefused::Blocked
                });
            }
            return Ok(());
        }
        if let Some((key, _)) = owner {
            let snapshot = match self.sessions.get(key).map(|s| &s.mode) {
                Some(TxnMode::Transaction { snapshot, .. }) => *snapshot,
                _ => u64::MAX,
            };
            let committed_later = self
                .last_write
                .get(&coll_key)
                .and_then(|w| w.get(id))
                .is_some_and(|time| *time > snapshot);
            if committed_later {
                return Err(WriteRefused::Conflict);
            }
        }
        Ok(())
    }

    /// Bookkeeping after a write: a transaction locks the document (keeping
    /// its committed version the first time); any other write is committed
    /// at once and gets its own cluster time.
    fn after_write(
        &mut self,
        ctx: &TxnContext,
        db: &str,
        coll: &str,
        id: DocId,
        before: Option<(Seq, Document)>,
    ) {
        match owner_of(ctx) {
            Some((key, txn_number)) => {
                let locks = self.locks.entry(coll_key(db, coll)).or_default();
                if locks.contains_key(&id) {
                    return;
                }
                locks.insert(
                    id.clone(),
                    DocLock {
                        owner: key.clone(),
                        txn_number,
                        before,
                    },
                );
                if let Some(ServerSession {
                    mode: TxnMode::Transaction { written, .. },
                    ..
                }) = self.sessions.get_mut(key)
                {
                    written.push(DocRef {
                        db: db.to_string(),
                        coll: coll.to_string(),
                        id,
                    });
                }
            }
            None => {
                let time = packed(self.clock.tick());
                if self.in_progress > 0 {
                    self.last_write
                        .entry(coll_key(db, coll))
                        .or_default()
                        .insert(id, time);
                }
            }
        }
    }

    /// Inserts `doc` (which carries `_id`) as `ctx`.
    pub(crate) fn insert_doc(
        &mut self,
        ctx: &TxnContext,
        db: &str,
        coll: &str,
        doc: Document,
    ) -> Result<Seq, WriteRefused> {
        let id = doc_id(doc.get("_id").unwrap_or(&Bson::Null));
        self.check_write(ctx, db, coll, &id)?;
        let seq = self
            .store
            .insert(db, coll, doc)
            .map_err(|DuplicateId| WriteRefused::Duplicate)?;
        self.after_write(ctx, db, coll, id, None);
        Ok(seq)
    }

    /// Replaces the document at `seq` (same `_id`) as `ctx`.
    pub(crate) fn replace_doc(
        &mut self,
        ctx: &TxnContext,
        db: &str,
        coll: &str,
        seq: Seq,
        doc: Document,
    ) -> Result<(), WriteRefused> {
        let id = doc_id(doc.get("_id").unwrap_or(&Bson::Null));
        self.check_write(ctx, db, coll, &id)?;
        if let Some(old) = self.store.replace(db, coll, seq, doc) {
            self.after_write(ctx, db, coll, id, Some((seq, old)));
        }
        Ok(())
    }

    /// Deletes the document at `seq` as `ctx`.
    pub(crate) fn delete_doc(
        &mut self,
        ctx: &TxnContext,
        db: &str,
        coll: &str,
        seq: Seq,
    ) -> Result<Option<Document>, WriteRefused> {
        let Some(current) = self.store.get(db, coll, seq) else {
            return Ok(None);
        };
        let id = doc_id(current.get("_id").unwrap_or(&Bson::Null));
        self.check_write(ctx, db, coll, &id)?;
        let old = self.store.delete(db, coll, seq);
        if let Some(old) = &old {
            self.after_write(ctx, db, coll, id, Some((seq, old.clone())));
        }
        Ok(old)
    }

    /// Whether some transaction other than `reader` holds locks in `db.coll`
    /// (then reads must go through [`Inner::visible`]).
    pub(crate) fn has_foreign_locks(&self, db: &str, coll: &str, reader: &TxnContext) -> bool {
        let owner = owner_of(reader);
        self.locks.get(&coll_key(db, coll)).is_some_and(|locks| {
            locks
                .values()
                .any(|l| owner.is_none_or(|(k, n)| *k != l.owner || n != l.txn_number))
        })
    }

    /// The documents of `db.coll` as `reader` sees them, in natural order:
    /// its own uncommitted writes, and everyone else's committed versions.
    pub(crate) fn visible(
        &self,
        db: &str,
        coll: &str,
        reader: &TxnContext,
    ) -> Vec<(Seq, Document)> {
        if !self.has_foreign_locks(db, coll, reader) {
            return self.store.scan(db, coll);
        }
        let owner = owner_of(reader);
        let empty = HashMap::new();
        let locks = self.locks.get(&coll_key(db, coll)).unwrap_or(&empty);
        let foreign = |id: &DocId| {
            locks
                .get(id)
                .is_some_and(|l| owner.is_none_or(|(k, n)| *k != l.owner || n != l.txn_number))
        };
        let mut docs: Vec<(Seq, Document)> = self
            .store
            .scan(db, coll)
            .into_iter()
            .filter(|(_, d)| !foreign(&doc_id(d.get("_id").unwrap_or(&Bson::Null))))
            .collect();
        for (id, lock) in locks {
            if foreign(id) {
                if let Some((seq, before)) = &lock.before {
                    docs.push((*seq, before.clone()));
                }
            }
        }
        docs.sort_by_key(|(seq, _)| *seq);
        docs
    }

    /// For a retryable write: the recorded outcome of a statement already executed.
    pub(crate) fn recorded(&self, ctx: &TxnContext, stmt_id: i32) -> Option<StmtOutcome> {
        let TxnContext::Retryable { key, .. } = ctx else {
            return None;
        };
        match &self.sessions.get(key)?.mode {
            TxnMode::Retryable { executed } => executed.get(&stmt_id).cloned(),
            _ => None,
        }
    }

    pub(crate) fn record(&mut self, ctx: &TxnContext, stmt_id: i32, outcome: StmtOutcome) {
        let TxnContext::Retryable { key, .. } = ctx else {
            return;
        };
        if let Some(ServerSession {
            mode: TxnMode::Retryable { executed },
            ..
        }) = self.sessions.get_mut(key)
        {
            executed.insert(stmt_id, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn key() -> ServerSessionKey {
        ServerSessionKey {
            id: vec![7; 16],
            owner: None,
        }
    }

    fn other_key() -> ServerSessionKey {
        ServerSessionKey {
            id: vec![8; 16],
            owner: None,
        }
    }

    fn begin(inner: &mut Inner, k: &ServerSessionKey, n: i64) -> TxnContext {
        inner.touch(k, Instant::now(), Duration::from_secs(60));
        inner
            .begin_or_continue(k, n, Some(false), true, "update", Instant::now())
            .unwrap()
    }

    #[test]
    fn transaction_number_rules_follow_the_server() {
        let mut inner = Inner::default();
        let k = key();
        let now = Instant::now();
        inner.touch(&k, now, Duration::from_secs(60));
        let ctx = inner
            .begin_or_continue(&k, 5, Some(false), true, "insert", now)
            .unwrap();
        assert!(matches!(ctx, TxnContext::Transaction { txn_number: 5, .. }));
        let too_old = inner
            .begin_or_continue(&k, 4, Some(false), true, "insert", now)
            .unwrap_err();
        assert_eq!(too_old.code, TRANSACTION_TOO_OLD);
        let wrong = inner
            .begin_or_continue(&k, 6, Some(false), false, "find", now)
            .unwrap_err();
        assert_eq!(wrong.code, NO_SUCH_TRANSACTION);
        assert_eq!(wrong.labels, vec![TRANSIENT_TRANSACTION_ERROR]);
        assert!(wrong.errmsg.contains("The active transaction number is 5"));
        inner.commit(&ctx);
        inner
            .begin_or_continue(&k, 5, Some(false), false, "commitTransaction", now)
            .unwrap();
        let err = inner
            .begin_or_continue(&k, 5, Some(false), false, "abortTransaction", now)
            .unwrap_err();
        assert_eq!(err.code, TRANSACTION_COMMITTED);
        let ctx = inner
            .begin_or_continue(&k, 6, Some(false), true, "insert", now)
            .unwrap();
        inner.abort(&ctx);
        let err = inner
            .begin_or_continue(&k, 6, Some(false), false, "commitTransaction", now)
            .unwrap_err();
        assert_eq!(err.code, NO_SUCH_TRANSACTION);
        assert_eq!(inner.open_transactions(), 0);
    }

    #[test]
    fn ending_a_session_rolls_back_kills_cursors_and_keeps_txn_history() {
        let mut inner = Inner::default();
        let k = key();
        let now = Instant::now();
        let ctx = begin(&mut inner, &k, 3);
        inner.insert_doc(&ctx, "d", "c", doc! { "_id": 1 }).unwrap();
        inner.cursors.insert(
            9,
            Cursor {
                ns: "d.c".into(),
                remaining: VecDeque::new(),
                session: Some(k.clone()),
                last_use: now,
            },
        );
        assert!(inner.end_session(&k));
        assert!(inner.cursors.is_empty());
        assert!(inner.store.scan("d", "c").is_empty());
        assert_eq!(inner.live_session_count(), 0);
        // The same lsid again: a live session, but the history stays.
        inner.touch(&k, now, Duration::from_secs(60));
        let err = inner
            .begin_or_continue(&k, 2, None, false, "insert", now)
            .unwrap_err();
        assert_eq!(err.code, TRANSACTION_TOO_OLD);
        // Expiry forgets it.
        inner.reap(
            now + Duration::from_secs(120),
            Duration::from_secs(60),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        inner.touch(&k, now + Duration::from_secs(121), Duration::from_secs(60));
        inner
            .begin_or_continue(&k, 2, None, false, "insert", now)
            .unwrap();
    }

    #[test]
    fn first_writer_wins_and_abort_restores_only_its_own_documents() {
        let mut inner = Inner::default();
        inner
            .insert_doc(&TxnContext::None, "d", "c", doc! { "_id": 1, "v": 10 })
            .unwrap();
        inner
            .insert_doc(&TxnContext::None, "d", "c", doc! { "_id": 2, "v": 20 })
            .unwrap();
        let (a, b) = (key(), other_key());
        let ta = begin(&mut inner, &a, 1);
        let tb = begin(&mut inner, &b, 1);
        inner
            .replace_doc(&ta, "d", "c", 0, doc! { "_id": 1, "v": 9 })
            .unwrap();
        assert_eq!(
            inner.replace_doc(&tb, "d", "c", 0, doc! { "_id": 1, "v": 8 }),
            Err(WriteRefused::Conflict)
        );
        assert_eq!(
            inner.replace_doc(&TxnContext::None, "d", "c", 0, doc! { "_id": 1, "v": 7 }),
            Err(WriteRefused::Blocked)
        );
        // Others read the committed version; the owner its own write.
        let seen = |inner: &Inner, ctx: &TxnContext| -> Vec<Document> {
            inner
                .visible("d", "c", ctx)
                .into_iter()
                .map(|(_, d)| d)
                .collect()
        };
        assert_eq!(
            seen(&inner, &TxnContext::None)[0],
            doc! { "_id": 1, "v": 10 }
        );
        assert_eq!(seen(&inner, &ta)[0], doc! { "_id": 1, "v": 9 });
        // B writes the other document and commits; A aborts: B's write stays.
        inner
            .replace_doc(&tb, "d", "c", 1, doc! { "_id": 2, "v": 21 })
            .unwrap();
        inner.commit(&tb);
        inner.abort(&ta);
        assert_eq!(
            seen(&inner, &TxnContext::None),
            vec![doc! { "_id": 1, "v": 10 }, doc! { "_id": 2, "v": 21 }]
        );
        assert_eq!(inner.txn_endings, 2);
    }

    #[test]
    fn a_write_committed_after_the_snapshot_conflicts() {
        let mut inner = Inner::default();
        inner
            .insert_doc(&TxnContext::None, "d", "c", doc! { "_id": 1 })
            .unwrap();
        let ta = begin(&mut inner, &key(), 1);
        inner
            .replace_doc(&TxnContext::None, "d", "c", 0, doc! { "_id": 1, "v": 1 })
            .unwrap();
        assert_eq!(
            inner.replace_doc(&ta, "d", "c", 0, doc! { "_id": 1, "v": 2 }),
            Err(WriteRefused::Conflict)
        );
        // An insert then delete inside a transaction undoes cleanly.
        inner.abort(&ta);
        let tb = begin(&mut inner, &other_key(), 1);
        let seq = inner.insert_doc(&tb, "d", "c", doc! { "_id": 5 }).unwrap();
        inner.delete_doc(&tb, "d", "c", seq).unwrap();
        inner.delete_doc(&tb, "d", "c", 0).unwrap();
        inner.abort(&tb);
        let docs: Vec<Document> = inner
            .store
            .scan("d", "c")
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        assert_eq!(docs, vec![doc! { "_id": 1, "v": 1 }]);
    }

    #[test]
    fn transactions_past_their_lifetime_are_aborted() {
        let mut inner = Inner::default();
        let k = key();
        let ctx = begin(&mut inner, &k, 1);
        inner.insert_doc(&ctx, "d", "c", doc! { "_id": 1 }).unwrap();
        let later = Instant::now() + Duration::from_secs(2);
        inner.reap(
            later,
            Duration::from_secs(600),
            Duration::from_secs(600),
            Duration::from_secs(1),
        );
        assert_eq!(inner.txn_state(&ctx), Some(TxnState::Aborted));
        assert!(inner.store.scan("d", "c").is_empty());
        let err = inner
            .begin_or_continue(&k, 1, Some(false), false, "insert", later)
            .unwrap_err();
        assert_eq!(err.code, NO_SUCH_TRANSACTION);
    }
}
