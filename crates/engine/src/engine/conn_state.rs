//! What the engine knows about each client connection (`ConnState`: peer,
//! upstream, handshake identity, authenticated owner, recent operations)
//! and each upstream (`UpstreamState`): data only; `conns` keeps it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::intern::ClientIdentity;
use crate::outcome::SessionCommand;
use crate::state::{ClientId, OwnerId, SessionKey};
use crate::timeline::OpRing;

/// An authentication the connection started; the server's reply decides.
#[derive(Debug, Clone, Copy)]
pub(super) struct PendingAuth {
    pub(super) owner: OwnerId,
    /// x.509 `authenticate` completes in one step.
    pub(super) single_step: bool,
}

/// What the engine knows about one client connection.
#[derive(Debug)]
pub(super) struct ConnState {
    pub(super) peer: SocketAddr,
    pub(super) upstream: u32,
    pub(super) identity: ClientIdentity,
    pub(super) client: ClientId,
    pub(super) owner: OwnerId,
    pub(super) pending_auth: Option<PendingAuth>,
    /// How many `PendingRequest`s of this connection are out (handed to the
    /// caller, not yet finally answered): a count, not a copy of them —
    /// only the refresher's "quiet connection first" reads it.
    pub(super) awaiting_replies: u32,
    /// Recent session operations, for violations' timelines.
    pub(super) ops: OpRing,
    /// The proxy can send the engine's own requests (a refresh) on it.
    pub(super) can_inject: bool,
    /// A refresh injected on this connection has not answered yet.
    pub(super) refresh_in_progress: bool,
    /// The application sent session traffic on it (monitoring connections
    /// never do, and may not be authenticated: no refresh goes there).
    pub(super) carried_sessions: bool,
    /// Sessions whose transactions sent statements on this connection, most
    /// recent last, at most `TXN_SESSIONS_PER_CONN` (unallocated on
    /// connections that carry no transaction). When the upstream side cuts
    /// the connection, their open transactions' outcome becomes unknown.
    pub(super) txn_sessions: Vec<SessionKey>,
}

/// One connection's state, shared by the connection table (the refresher,
/// timelines of other connections' violations) and the data thread's
/// `ConnHandle`. Only the data thread locks it per request, so the lock is
/// uncontended. While it is held only leaf locks are taken (the intern
/// tables); never another connection's state or a shard of the table, so
/// no two connections' locks can wait on each other (`close` holds a state
/// already out of the table, which nobody else can reach).
pub(super) type ConnCell = Mutex<ConnState>;

/// Locks a connection's state. A panic while it was held (a bug, caught by
/// the proxy) leaves plain data behind: it is used as it is.
pub(super) fn lock(cell: &ConnCell) -> MutexGuard<'_, ConnState> {
    cell.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The data thread's handle on one connection's state in the engine, from
/// `SessionEngine::connect`: with it, a request and its reply reach the
/// state directly instead of looking it up in the connection table every
/// time (`request_on`, `reply_on`). Closing the connection is still
/// `close(id)`.
#[derive(Clone)]
pub struct ConnHandle {
    pub(super) id: u64,
    pub(super) cell: Arc<ConnCell>,
}

impl ConnHandle {
    /// The connection id given to `connect`.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle").field("id", &self.id).finish()
    }
}

/// How many transactional sessions a connection remembers for its close.
/// Drivers check a connection out per operation, so only sessions whose
/// transactions interleave on one connection count against it.
pub(super) const TXN_SESSIONS_PER_CONN: usize = 64;

impl ConnState {
    pub(super) fn is_quiet(&self) -> bool {
        self.awaiting_replies == 0
    }
}

/// Per-upstream facts (an upstream is the listener / member a client reached).
#[derive(Debug)]
pub(super) struct UpstreamState {
    /// The listener address the clients of this upstream reach.
    pub(super) listener: SocketAddr,
    /// refreshSessions is refused as unsupported here: the refresher stops.
    pub(super) refresh_unsupported: AtomicBool,
    /// One bit per `SessionCommand`: a refusal of it here was logged.
    pub(super) refusals_logged: AtomicU32,
}

impl UpstreamState {
    pub(super) fn new(listener: SocketAddr) -> UpstreamState {
        UpstreamState {
            listener,
            refresh_unsupported: AtomicBool::new(false),
            refusals_logged: AtomicU32::new(0),
        }
    }

    /// True the first time `command` is refused here (one log line per
    /// upstream and command; later ones are only counted).
    pub(super) fn first_refusal(&self, command: SessionCommand) -> bool {
        let bit = 1 << command.index();
        self.refusals_logged.fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}
