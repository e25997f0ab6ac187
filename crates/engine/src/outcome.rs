//! What the server did with a request, for everything that waits on it:
//! the session commands whose effect takes hold only when the server answers
//! ok:1 ([`SessionCommand`]), the ways servers refuse them ([`Refusal`]:
//! anything but ok:1), the effects held until the reply ([`Effect`]: theirs,
//! and the deletes of web-session store documents), and
//! the bounded list of concurrent-use verdicts deferred until the first of
//! two identical requests has an outcome ([`Verdicts`]).
//!
//! Pure bookkeeping: no session maps, no clock of its own (times are
//! arguments), no logging. The engine applies effects through the ledger
//! and reports what the verdicts decide. Nothing here holds document
//! contents: lsids, cursor ids, owners and request ids only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sessionguard_protocol::command::Lsid;

use super::state::{EndKind, Millis, OwnerId, RequestRef, SessionKey};
use super::violation::Violation;
use super::web_store::StoreOp;

/// How long the verdict on an identical request waits for the first
/// request's outcome. A driver retries only after it gave up on the first
/// connection, and the proxy sees that close within milliseconds; a first
/// request still unanswered on an open connection this long after is
/// therefore not being retried, and the overlap is concurrent use.
pub(crate) const RETRY_VERDICT_WINDOW: Millis = 10_000;

/// At most this many verdicts wait at once. Past it, a new identical
/// request is left unjudged (silent, counted): only a flood of identical
/// overlapping requests gets here, and the verdicts already waiting report
/// that pattern; silence is the side that cannot be a false alarm.
pub(crate) const MAX_PENDING_VERDICTS: usize = 1_024;

/// The session commands whose effect waits for the server's ok:1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionCommand {
    EndSessions,
    KillSessions,
    KillAllSessions,
    KillAllSessionsByPattern,
    RefreshSessions,
    KillCursors,
}

impl SessionCommand {
    pub const ALL: [SessionCommand; 6] = [
        SessionCommand::EndSessions,
        SessionCommand::KillSessions,
        SessionCommand::KillAllSessions,
        SessionCommand::KillAllSessionsByPattern,
        SessionCommand::RefreshSessions,
        SessionCommand::KillCursors,
    ];
    pub const COUNT: usize = SessionCommand::ALL.len();

    pub fn of(name: &str) -> Option<SessionCommand> {
        SessionCommand::ALL
            .into_iter()
            .find(|command| command.as_str() == name)
    }

    /// The command name (and metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            SessionCommand::EndSessions => "endSessions",
            SessionCommand::KillSessions => "killSessions",
            SessionCommand::KillAllSessions => "killAllSessions",
            SessionCommand::KillAllSessionsByPattern => "killAllSessionsByPattern",
            SessionCommand::RefreshSessions => "refreshSessions",
            SessionCommand::KillCursors => "killCursors",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// What a refusal of it leaves as it was (for the log line).
    pub fn refused_means(self) -> &'static str {
        match self {
            SessionCommand::EndSessions
            | SessionCommand::KillSessions
            | SessionCommand::KillAllSessions
            | SessionCommand::KillAllSessionsByPattern => {
                "the sessions it names are not ended, sessionguard keeps following them, and using them \
                 afterwards is not use-after-end"
            }
            SessionCommand::RefreshSessions => "the sessions it names keep their last refresh time",
            SessionCommand::KillCursors => "the cursors it names stay open as far as sessionguard can tell",
        }
    }
}

/// How a server refused a command: anything but ok:1, named by what the
/// refusals real servers send mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// 13: the connection's user lacks the privilege (killAnySession).
    Unauthorized,
    /// 59: the server does not know the command.
    CommandNotFound,
    /// 115: the server does not support it (Microsoft DocumentDB and the
    /// servers built on it: FerretDB 2, Azure Cosmos DB for MongoDB vCore).
    CommandNotSupported,
    /// `codeName: "AtlasError"` (code 8000): Atlas does not allow it on
    /// this tier (M0, Flex; killAllSessions on M10 too).
    AtlasError,
    /// Any other error reply.
    Other,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::Unauthorized,
        Refusal::CommandNotFound,
        Refusal::CommandNotSupported,
        Refusal::AtlasError,
        Refusal::Other,
    ];
    pub const COUNT: usize = Refusal::ALL.len();

    /// Reads an error reply's `code` / `codeName`.
    pub fn of(code: Option<i32>, code_name: Option<&str>) -> Refusal {
        match (code, code_name) {
            (_, Some("AtlasError")) | (Some(8000), _) => Refusal::AtlasError,
            (_, Some("Unauthorized")) | (Some(13), _) => Refusal::Unauthorized,
            (_, Some("CommandNotFound")) | (Some(59), _) => Refusal::CommandNotFound,
            (_, Some("CommandNotSupported")) | (Some(115), _) => Refusal::CommandNotSupported,
            _ => Refusal::Other,
        }
    }

    /// The `code_name` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "Unauthorized",
            Refusal::CommandNotFound => "CommandNotFound",
            Refusal::CommandNotSupported => "CommandNotSupported",
            Refusal::AtlasError => "AtlasError",
            Refusal::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The server cannot run it at all (for any user): retrying is futile.
    pub fn unsupported(self) -> bool {
        matches!(
            self,
            Refusal::CommandNotFound | Refusal::CommandNotSupported | Refusal::AtlasError
        )
    }

    /// What the refusal says about the server (for the log line).
    pub fn means(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "the connection's user is not allowed to run it",
            Refusal::CommandNotFound | Refusal::CommandNotSupported => {
                "this server does not support it (MongoDB-compatible servers refuse session commands)"
            }
            Refusal::AtlasError => "Atlas does not allow it on this cluster tier",
            Refusal::Other => "the server answered with an error",
        }
    }
}

/// Refused session commands, by command and refusal.
#[derive(Debug, Default)]
pub struct RefusalCounts([[AtomicU64; Refusal::COUNT]; SessionCommand::COUNT]);

impl RefusalCounts {
    pub fn count(&self, command: SessionCommand, refusal: Refusal) {
        self.0[command.index()][refusal.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> [[u64; Refusal::COUNT]; SessionCommand::COUNT] {
        self.0
            .each_ref()
            .map(|row| row.each_ref().map(|n| n.load(Ordering::Relaxed)))
    }
}

/// Which sessions one killAllSessions(ByPattern) pattern names, resolved
/// when the request passed (owners are interned by then).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillTarget {
    All,
    Lsid(Lsid),
    Owner(OwnerId),
    /// A user the proxy never saw, a uid hash, a role: matches nothing it tracks.
    Nothing,
}

impl KillTarget {
    pub(crate) fn matches(self, key: &SessionKey) -> bool {
        match self {
            KillTarget::All => true,
            KillTarget::Lsid(lsid) => key.lsid == lsid,
            KillTarget::Owner(owner) => key.owner == owner,
            KillTarget::Nothing => false,
        }
    }
}

/// What a session command will change once the server confirms it.
#[derive(Debug)]
pub(crate) enum EffectKind {
    /// endSessions / killSessions: these sessions of `owner` end.
    /// `in_flight`: end-while-in-flight violations judged when the request
    /// passed, reported when the end is confirmed.
    End {
        kind: EndKind,
        owner: OwnerId,
        sessions: Vec<Lsid>,
        in_flight: Vec<Violation>,
    },
    /// killAllSessions / killAllSessionsByPattern.
    KillAll { targets: Vec<KillTarget> },
    /// refreshSessions of `owner`'s sessions.
    Refresh { owner: OwnerId, sessions: Vec<Lsid> },
    /// killCursors on the connection's upstream.
    KillCursors { upstream: u32, cursors: Vec<i64> },
    /// Deletes of web-session store documents (`[stores]`).
    StoreDestroy { ops: Vec<StoreOp> },
}

/// A request's effect, held until its reply.
#[derive(Debug)]
pub(crate) struct Effect {
    /// The session command (refusals of it are counted and said); `None`
    /// for a store delete (its failure is the application's business).
    pub command: Option<SessionCommand>,
    pub by: RequestRef,
    pub kind: EffectKind,
}

/// What became of a held effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EffectOutcome {
    /// The server answered ok:1.
    Confirmed,
    /// Anything else.
    Refused { refusal: Refusal, code: Option<i32> },
    /// No reply will come: the request expected none (`moreToCome`), or
    /// its connection closed first.
    Unconfirmed,
}

/// A concurrent-use verdict waiting for the first request's outcome:
/// `second` repeated `first` exactly, on another connection, while `first`
/// was in flight on session `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingVerdict {
    pub key: SessionKey,
    pub first: RequestRef,
    pub second: RequestRef,
    pub deadline: Millis,
}

/// The deferred verdicts: bounded in number (`MAX_PENDING_VERDICTS`) and
/// time (`RETRY_VERDICT_WINDOW`). The lock is taken only when something
/// waits (the engine asks only for a request flagged `suspected`, and due
/// deadlines are one relaxed load away), and never with a session locked.
#[derive(Debug)]
pub(crate) struct Verdicts {
    pending: Mutex<Vec<PendingVerdict>>,
    /// The earliest deadline waiting, `u64::MAX` when none.
    next_deadline: AtomicU64,
    len: AtomicU64,
    /// Identical requests left unjudged because the bound was reached.
    unjudged: AtomicU64,
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts {
            pending: Mutex::new(Vec::new()),
            next_deadline: AtomicU64::new(u64::MAX),
            len: AtomicU64::new(0),
            unjudged: AtomicU64::new(0),
        }
    }
}

impl Verdicts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PendingVerdict>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a new verdict would be refused (checked before a request is
    /// flagged; `defer` checks again).
    pub(crate) fn is_full(&self) -> bool {
        self.len() >= MAX_PENDING_VERDICTS
    }

    /// Records a verdict to decide later; `false` (and counted as
    /// unjudged) at the bound.
    pub(crate) fn defer(&self, verdict: PendingVerdict) -> bool {
        let mut pending = self.lock();
        if pending.len() >= MAX_PENDING_VERDICTS {
            self.unjudged.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        pending.push(verdict);
        self.sync(&pending);
        true
    }

    /// Counts an identical request left unjudged at the bound.
    pub(crate) fn unjudged_one(&self) {
        self.unjudged.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the verdicts waiting on `first` of session `key`.
    pub(crate) fn take_waiting_on(
        &self,
        key: &SessionKey,
        first: &RequestRef,
    ) -> Vec<PendingVerdict> {
        self.take(|verdict| verdict.key == *key && verdict.first == *first)
    }

    /// Takes the verdicts whose window ended by `now`: one relaxed load
    /// when none did.
    pub(crate) fn take_due(&self, now: Millis) -> Vec<PendingVerdict> {
        if now < self.next_deadline.load(Ordering::Relaxed) {
            return Vec::new();
        }
        self.take(|verdict| verdict.deadline <= now)
    }

    fn take(&self, mut matches: impl FnMut(&PendingVerdict) -> bool) -> Vec<PendingVerdict> {
        let mut pending = self.lock();
        let mut taken = Vec::new();
        pending.retain(|verdict| {
            if matches(verdict) {
                taken.push(*verdict);
                false
            } else {
                true
            }
        });
        self.sync(&pending);
        taken
    }

    /// Keeps the lock-free summaries in step (under the lock).
    fn sync(&self, pending: &[PendingVerdict]) {
        let next = pending
            .iter()
            .map(|verdict| verdict.deadline)
            .min()
            .unwrap_or(u64::MAX);
        self.next_deadline.store(next, Ordering::Relaxed);
        self.len.store(pending.len() as u64, Ordering::Relaxed);
    }

    pub(crate) fn len(&self) -> usize {
        usize::try_from(self.len.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn unjudged(&self) -> u64 {
        self.unjudged.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::key;
    use crate::state::tests::request;

    fn verdict(n: u8, first: i32, deadline: Millis) -> PendingVerdict {
        PendingVerdict {
            key: key(n),
            first: request(1, first, 0, None),
            second: request(2, first + 100, 1, None),
            deadline,
        }
    }

    #[test]
    fn refusals_are_read_from_code_or_code_name() {
        assert_eq!(Refusal::of(Some(13), None), Refusal::Unauthorized);
        assert_eq!(
            Refusal::of(None, Some("Unauthorized")),
            Refusal::Unauthorized
        );
        assert_eq!(
            Refusal::of(Some(59), Some("CommandNotFound")),
            Refusal::CommandNotFound
        );
        assert_eq!(Refusal::of(Some(115), None), Refusal::CommandNotSupported);
        assert_eq!(
            Refusal::of(Some(8000), Some("AtlasError")),
            Refusal::AtlasError
        );
        assert_eq!(Refusal::of(None, Some("AtlasError")), Refusal::AtlasError);
        assert_eq!(
            Refusal::of(Some(10107), Some("NotWritablePrimary")),
            Refusal::Other
        );
        assert_eq!(Refusal::of(None, None), Refusal::Other);
        assert!(!Refusal::Unauthorized.unsupported());
        assert!(Refusal::AtlasError.unsupported());
        for (index, refusal) in Refusal::ALL.into_iter().enumerate() {
            assert_eq!(refusal.index(), index);
        }
        for (index, command) in SessionCommand::ALL.into_iter().enumerate() {
            assert_eq!(command.index(), index);
            assert_eq!(SessionCommand::of(command.as_str()), Some(command));
        }
        assert_eq!(SessionCommand::of("find"), None);
    }

    #[test]
    fn verdicts_are_taken_by_first_request_or_deadline() {
        let verdicts = Verdicts::default();
        assert!(verdicts.take_due(u64::MAX - 1).is_empty());
        assert!(verdicts.defer(verdict(1, 10, 500)));
        assert!(verdicts.defer(verdict(1, 10, 600)));
        assert!(verdicts.defer(verdict(2, 11, 300)));
        assert_eq!(verdicts.len(), 3);
        assert!(verdicts.take_due(299).is_empty());
        assert_eq!(verdicts.take_due(300), vec![verdict(2, 11, 300)]);
        let first = request(1, 10, 0, None);
        assert!(verdicts.take_waiting_on(&key(2), &first).is_empty());
        assert_eq!(verdicts.take_waiting_on(&key(1), &first).len(), 2);
        assert!(verdicts.is_empty());
        assert!(verdicts.take_due(u64::MAX - 1).is_empty());
    }

    #[test]
    fn verdicts_are_bounded_and_count_what_they_leave_unjudged() {
        let verdicts = Verdicts::default();
        for n in 0..MAX_PENDING_VERDICTS {
            assert!(verdicts.defer(verdict(1, i32::try_from(n).unwrap(), 10)));
        }
        assert!(verdicts.is_full());
        assert!(!verdicts.defer(verdict(1, -1, 10)));
        assert_eq!(verdicts.unjudged(), 1);
        assert_eq!(verdicts.take_due(10).len(), MAX_PENDING_VERDICTS);
        assert!(!verdicts.is_full());
    }
}
