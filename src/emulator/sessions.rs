//! Logical sessions, their transactions and retryable-write history, and
//! cursors, following the server's rules (transaction_participant.cpp):
//! one active txnNumber per session; a higher one starts a new retryable
//! write or transaction (aborting an open one); a lower one is
//! TransactionTooOld; a transaction is continued only at the active number
//! while it is in progress. Ended, killed or expired sessions are forgotten
//! entirely (their cursors killed, an open transaction rolled back), so a
//! later command with the same lsid starts a fresh session, as the server
//! does. Pure state: no I/O, no clocks other than the `now` passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bson::{spec::BinarySubtype, Bson, Document};

use super::errors::{
    CommandError, CONFLICTING_OPERATION_IN_PROGRESS, INCOMPLETE_TRANSACTION_HISTORY,
    INVALID_OPTIONS, NO_SUCH_TRANSACTION, TRANSACTION_COMMITTED, TRANSACTION_TOO_OLD,
    TRANSIENT_TRANSACTION_ERROR,
};
use super::store::{Store, Undo};

/// SHA-256 of the empty user name, which the server shows as the lsid's
/// `uid` when no one is authenticated.
const ANONYMOUS_UID: &str = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

/// A session's identity: `lsid.id`, plus the owning user once
/// authentication exists (always `None` today; the server keys sessions by
/// both, so two users' sessions with the same id are different sessions).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub id: Vec<u8>,
    pub owner: Option<String>,
}

impl SessionKey {
    /// Reads `{id: UUID}` from an lsid document.
    pub fn from_lsid(lsid: &Document) -> Option<SessionKey> {
        match lsid.get("id") {
            Some(Bson::Binary(bin))
                if bin.subtype == BinarySubtype::Uuid || bin.subtype == BinarySubtype::UuidOld =>
            {
                Some(SessionKey {
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
    pub fn owned_by(mut self, user: Option<&str>) -> SessionKey {
        self.owner = user.map(str::to_owned);
        self
    }

    /// The server's rendering of an lsid in error messages.
    pub fn display(&self) -> String {
        format!("{} - {} -  - ", self.uuid_string(), ANONYMOUS_UID)
    }

    /// A short prefix for logs.
    pub fn short(&self) -> String {
        self.uuid_string().chars().take(8).collect()
    }
}

/// What a retried statement answers instead of executing again.
#[derive(Debug, Clone, PartialEq)]
pub enum StmtOutcome {
    Write {
        n: i64,
        n_modified: i64,
        upserted: Option<Bson>,
    },
    Reply(Document),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    InProgress,
    Committed,
    Aborted,
}

#[derive(Debug)]
pub enum TxnMode {
    /// No txnNumber used yet.
    None,
    /// Retryable writes at the active txnNumber: statements already executed.
    Retryable { executed: HashMap<i32, StmtOutcome> },
    /// A multi-document transaction at the active txnNumber.
    Transaction { state: TxnState, undo: Vec<Undo> },
}

#[derive(Debug)]
pub struct Session {
    pub last_use: Instant,
    pub active_txn_number: Option<i64>,
    pub mode: TxnMode,
}

impl Session {
    fn new(now: Instant) -> Session {
        Session {
            last_use: now,
            active_txn_number: None,
            mode: TxnMode::None,
        }
    }
}

#[derive(Debug)]
pub struct Cursor {
    pub ns: String,
    pub remaining: VecDeque<Document>,
    pub session: Option<SessionKey>,
    pub last_use: Instant,
}

/// How a command runs with respect to transactions.
#[derive(Debug, Clone, PartialEq)]
pub enum TxnContext {
    None,
    Retryable { key: SessionKey, txn_number: i64 },
    Transaction { key: SessionKey, txn_number: i64 },
}

/// Everything behind the emulator's one data lock.
#[derive(Debug, Default)]
pub struct Inner {
    pub store: Store,
    pub sessions: HashMap<SessionKey, Session>,
    pub cursors: HashMap<i64, Cursor>,
}

impl Inner {
    /// Marks a session used now, first expiring it if it sat idle too long.
    pub fn touch(&mut self, key: &SessionKey, now: Instant, timeout: Duration) {
        let expired = self
            .sessions
            .get(key)
            .is_some_and(|s| now.saturating_duration_since(s.last_use) > timeout);
        if expired {
            tracing::debug!(lsid = %key.short(), "session expired (idle past the session timeout)");
            self.end_session(key);
        }
        self.sessions
            .entry(key.clone())
            .or_insert_with(|| Session::new(now))
            .last_use = now;
    }

    /// refreshSessions: keeps a session alive (creating it if unknown, as
    /// the server's session cache does).
    pub fn refresh(&mut self, key: &SessionKey, now: Instant, timeout: Duration) {
        self.touch(key, now, timeout);
    }

    /// Ends a session: kills its cursors, rolls back an open transaction,
    /// forgets it. Returns whether it existed.
    pub fn end_session(&mut self, key: &SessionKey) -> bool {
        self.cursors.retain(|_, c| c.session.as_ref() != Some(key));
        match self.sessions.remove(key) {
            Some(session) => {
                if let TxnMode::Transaction {
                    state: TxnState::InProgress,
                    undo,
                } = session.mode
                {
                    self.store.rollback(undo);
                }
                true
            }
            None => false,
        }
    }

    pub fn all_session_keys(&self) -> Vec<SessionKey> {
        self.sessions.keys().cloned().collect()
    }

    /// Expires idle sessions and idle session-less cursors.
    pub fn reap(&mut self, now: Instant, session_timeout: Duration, cursor_timeout: Duration) {
        let expired: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_use) > session_timeout)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            tracing::debug!(lsid = %key.short(), "session expired (idle past the session timeout)");
            self.end_session(&key);
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
    pub fn begin_or_continue(
        &mut self,
        key: &SessionKey,
        txn_number: i64,
        autocommit: Option<bool>,
        start_transaction: bool,
        command: &str,
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
        let Some(session) = self.sessions.get_mut(key) else {
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
                Self::abort_open(&mut self.store, session);
                session.active_txn_number = Some(txn_number);
                session.mode = TxnMode::Retryable {
                    executed: HashMap::new(),
                };
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
            Self::abort_open(&mut self.store, session);
            session.active_txn_number = Some(txn_number);
            session.mode = TxnMode::Transaction {
                state: TxnState::InProgress,
                undo: Vec::new(),
            };
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

    fn abort_open(store: &mut Store, session: &mut Session) {
        if let TxnMode::Transaction { state, undo } = &mut session.mode {
            if *state == TxnState::InProgress {
                store.rollback(std::mem::take(undo));
                *state = TxnState::Aborted;
            }
        }
    }

    /// Commits the transaction the context names (already validated).
    pub fn commit(&mut self, ctx: &TxnContext) {
        if let TxnContext::Transaction { key, .. } = ctx {
            if let Some(Session {
                mode: TxnMode::Transaction { state, undo },
                ..
            }) = self.sessions.get_mut(key)
            {
                undo.clear();
                *state = TxnState::Committed;
            }
        }
    }

    /// Aborts (rolls back) the transaction the context names, if in progress.
    pub fn abort(&mut self, ctx: &TxnContext) {
        if let TxnContext::Transaction { key, .. } = ctx {
            if let Some(session) = self.sessions.get_mut(key) {
                Self::abort_open(&mut self.store, session);
            }
        }
    }

    /// The state of the transaction a context names.
    pub fn txn_state(&self, ctx: &TxnContext) -> Option<TxnState> {
        let TxnContext::Transaction { key, .. } = ctx else {
            return None;
        };
        match &self.sessions.get(key)?.mode {
            TxnMode::Transaction { state, .. } => Some(*state),
            _ => None,
        }
    }

    /// Splits the lock's contents for a write: the store, and the undo log
    /// to record into when the write is part of a transaction.
    pub fn store_and_undo(&mut self, ctx: &TxnContext) -> (&mut Store, Option<&mut Vec<Undo>>) {
        let undo = match ctx {
            TxnContext::Transaction { key, .. } => match self.sessions.get_mut(key) {
                Some(Session {
                    mode: TxnMode::Transaction { undo, .. },
                    ..
                }) => Some(undo),
                _ => None,
            },
            _ => None,
        };
        (&mut self.store, undo)
    }

    /// For a retryable write: the recorded outcome of a statement already executed.
    pub fn recorded(&self, ctx: &TxnContext, stmt_id: i32) -> Option<StmtOutcome> {
        let TxnContext::Retryable { key, .. } = ctx else {
            return None;
        };
        match &self.sessions.get(key)?.mode {
            TxnMode::Retryable { executed } => executed.get(&stmt_id).cloned(),
            _ => None,
        }
    }

    pub fn record(&mut self, ctx: &TxnContext, stmt_id: i32, outcome: StmtOutcome) {
        let TxnContext::Retryable { key, .. } = ctx else {
            return;
        };
        if let Some(Session {
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

    fn key() -> SessionKey {
        SessionKey {
            id: vec![7; 16],
            owner: None,
        }
    }

    #[test]
    fn transaction_number_rules_follow_the_server() {
        let mut inner = Inner::default();
        let k = key();
        let now = Instant::now();
        inner.touch(&k, now, Duration::from_secs(60));
        let ctx = inner
            .begin_or_continue(&k, 5, Some(false), true, "insert")
            .unwrap();
        assert!(matches!(ctx, TxnContext::Transaction { txn_number: 5, .. }));
        let too_old = inner
            .begin_or_continue(&k, 4, Some(false), true, "insert")
            .unwrap_err();
        assert_eq!(too_old.code, TRANSACTION_TOO_OLD);
        let wrong = inner
            .begin_or_continue(&k, 6, Some(false), false, "find")
            .unwrap_err();
        assert_eq!(wrong.code, NO_SUCH_TRANSACTION);
        assert_eq!(wrong.labels, vec![TRANSIENT_TRANSACTION_ERROR]);
        assert!(wrong.errmsg.contains("The active transaction number is 5"));
        inner.commit(&ctx);
        inner
            .begin_or_continue(&k, 5, Some(false), false, "commitTransaction")
            .unwrap();
        let err = inner
            .begin_or_continue(&k, 5, Some(false), false, "abortTransaction")
            .unwrap_err();
        assert_eq!(err.code, TRANSACTION_COMMITTED);
        let ctx = inner
            .begin_or_continue(&k, 6, Some(false), true, "insert")
            .unwrap();
        inner.abort(&ctx);
        let err = inner
            .begin_or_continue(&k, 6, Some(false), false, "commitTransaction")
            .unwrap_err();
        assert_eq!(err.code, NO_SUCH_TRANSACTION);
    }

    #[test]
    fn ending_a_session_rolls_back_and_kills_cursors() {
        let mut inner = Inner::default();
        let k = key();
        let now = Instant::now();
        inner.touch(&k, now, Duration::from_secs(60));
        let ctx = inner
            .begin_or_continue(&k, 1, Some(false), true, "insert")
            .unwrap();
        let (store, undo) = inner.store_and_undo(&ctx);
        store.insert("d", "c", doc! { "_id": 1 }, undo).unwrap();
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
    }
}
