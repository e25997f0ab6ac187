//! The seam between the data path and policy: the `Inspector` trait that the
//! session engine implements, the per-connection context it is handed, and
//! the `Injector` through which it may send its own requests (the
//! refresher's `refreshSessions`) on a client's upstream connection.
//! Inspector callbacks are synchronous and run on the connection's task:
//! they must be quick, must not block, and must never log document contents.
//! Nothing here does I/O itself; the connection task performs what the
//! verdicts ask for.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{COMMAND_LABELS, OTHER_COMMAND};
use crate::wire::{Frame, Message};

/// Policy hooks called by every proxied connection. All methods have
/// no-op defaults, so an implementation overrides only what it needs.
pub trait Inspector: Send + Sync + 'static {
    /// A client connected and its upstream connection is established.
    fn on_connect(&self, conn: &ConnContext) {
        let _ = conn;
    }

    /// Called for each client request before it is forwarded. `Reject` =>
    /// not forwarded; `reply` (a full OP_MSG body document, raw BSON bytes)
    /// is sent to the client as a reply with responseTo = the request id
    /// (unless the request had `moreToCome`, which expects no reply).
    fn on_request(&self, conn: &ConnContext, frame: &Frame, msg: &Message<'_>) -> Verdict {
        let _ = (conn, frame, msg);
        Verdict::Forward
    }

    /// Called for each upstream reply, with the matched request's record
    /// when known; may replace the reply bytes (seam for hello rewriting in
    /// replica-set mode). Replies to injected requests are not shown here.
    fn on_reply(
        &self,
        conn: &ConnContext,
        request: Option<&InFlightRequest>,
        frame: &Frame,
        msg: &Message<'_>,
    ) -> ReplyVerdict {
        let _ = (conn, request, frame, msg);
        ReplyVerdict::Forward
    }

    /// The connection is closing because of `cause`; `still_in_flight` are
    /// the client requests that never got their (final) reply. Called
    /// before the client's socket is closed, so whatever the inspector
    /// releases here is released before the client can notice the close
    /// and retry elsewhere.
    fn on_close(&self, conn: &ConnContext, cause: CloseCause, still_in_flight: &[InFlightRequest]) {
        let _ = (conn, cause, still_in_flight);
    }
}

/// Why a connection pair closed: which side went first, and how. Only
/// `ClientClosed` and `ClientReset` are the client's doing; every other
/// cause (the upstream, the network, a malformed or stalled frame the proxy
/// gave up on, a drain, a shutdown) is not something the application did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCause {
    /// The client closed its side (end of stream).
    ClientClosed,
    /// The client's side failed: a reset, or writing to a client that left.
    ClientReset,
    /// The client sent a frame the proxy could not read; the proxy closed.
    ClientMalformed,
    /// The client stopped mid-frame; the proxy closed.
    ClientFrameTimeout,
    /// The upstream closed its side.
    UpstreamClosed,
    /// The upstream connection failed (reset, i/o error).
    UpstreamError,
    /// The upstream sent a frame the proxy could not read; the proxy closed.
    UpstreamMalformed,
    /// The upstream stopped mid-frame; the proxy closed.
    UpstreamFrameTimeout,
    /// The proxy is draining and the connection had finished its work.
    Drained,
    /// The proxy shut down with the connection open.
    Shutdown,
    /// A proxy-internal failure.
    Internal,
}

impl CloseCause {
    pub const ALL: [CloseCause; 11] = [
        CloseCause::ClientClosed,
        CloseCause::ClientReset,
        CloseCause::ClientMalformed,
        CloseCause::ClientFrameTimeout,
        CloseCause::UpstreamClosed,
        CloseCause::UpstreamError,
        CloseCause::UpstreamMalformed,
        CloseCause::UpstreamFrameTimeout,
        CloseCause::Drained,
        CloseCause::Shutdown,
        CloseCause::Internal,
    ];
    pub const COUNT: usize = CloseCause::ALL.len();

    /// The `reason` label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::ClientClosed => "client_closed",
            CloseCause::ClientReset => "client_reset",
            CloseCause::ClientMalformed => "client_malformed_frame",
            CloseCause::ClientFrameTimeout => "client_frame_timeout",
            CloseCause::UpstreamClosed => "upstream_closed",
            CloseCause::UpstreamError => "upstream_error",
            CloseCause::UpstreamMalformed => "upstream_malformed_frame",
            CloseCause::UpstreamFrameTimeout => "upstream_frame_timeout",
            CloseCause::Drained => "drained",
            CloseCause::Shutdown => "shutdown",
            CloseCause::Internal => "internal",
        }
    }

    /// Position in `ALL` (for per-cause counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The client closed or reset its side before anything else happened:
    /// the only causes that can be client misuse.
    pub fn client_went_first(self) -> bool {
        matches!(self, CloseCause::ClientClosed | CloseCause::ClientReset)
    }
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inspector that lets everything through (plain proxy, tests, benchmarks).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopInspector;

impl Inspector for NoopInspector {}

/// What to do with a client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Do not forward; answer the client with this OP_MSG body document.
    Reject {
        reply: Vec<u8>,
    },
}

/// What to do with an upstream reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyVerdict {
    Forward,
    /// Send these bytes (a complete frame, header included) instead.
    Replace(Bytes),
}

/// A client request that awaits its reply (or, for exhaust streams, its
/// final reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightRequest {
    /// The client's requestID (for injected requests: the proxy's negative id).
    pub request_id: i32,
    /// The command name, when the request is a command.
    pub command: Option<Cow<'static, str>>,
    /// `command`'s index in `metrics::COMMAND_LABELS`, found once per
    /// request for both the command counter and the latency histogram.
    pub command_metric: usize,
    pub started: Instant,
    /// The request set `exhaustAllowed`: the reply may be a stream.
    pub exhaust_allowed: bool,
    /// A hello / isMaster that may legitimately wait for a topology change
    /// (streaming or awaitable): such a request is monitoring, not work, so
    /// it does not hold up a drain.
    pub awaitable_hello: bool,
    /// Replies received so far with `moreToCome` set.
    pub streamed_replies: u32,
}

/// What a connection's inspector callbacks know about it.
#[derive(Debug, Clone)]
pub struct ConnContext {
    /// Unique per process, increasing.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener address the client connected to.
    pub local: SocketAddr,
    /// Sends the proxy's own requests on this connection's upstream.
    pub injector: Injector,
}

impl ConnContext {
    /// A context whose injector is not connected to anything (every
    /// injection fails with `InjectError::Closed`): for unit tests of
    /// inspectors.
    pub fn detached(id: u64, peer: SocketAddr, local: SocketAddr) -> ConnContext {
        ConnContext {
            id,
            peer,
            local,
            injector: Injector::detached(),
        }
    }
}

/// Why an injected request produced no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the connection is closed")]
    Closed,
    #[error("the connection is draining")]
    Draining,
    #[error("too many injected requests are already queued on this connection")]
    QueueFull,
    #[error(
        "no reply within {0:?} (the connection never became idle, or the upstream did not answer)"
    )]
    Timeout(Duration),
}

/// A queued injection, owned by the connection until it is sent.
#[derive(Debug)]
pub(crate) struct InjectRequest {
    pub body: Vec<u8>,
    pub reply: oneshot::Sender<Result<Bytes, InjectError>>,
    /// After this instant the request is dropped unsent.
    pub deadline: tokio::time::Instant,
}

/// How many injections may wait per connection; the refresher sends at most
/// one per connection at a time, so a full queue means something is stuck.
pub(crate) const INJECT_QUEUE: usize = 16;

/// Handle to send requests on a connection's upstream (cheap to clone).
#[derive(Clone)]
pub struct Injector {
    tx: Option<mpsc::Sender<InjectRequest>>,
    timeout: Duration,
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injector")
            .field("connected", &self.tx.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Injector {
    pub(crate) fn new(tx: mpsc::Sender<InjectRequest>, timeout: Duration) -> Injector {
        Injector {
            tx: Some(tx),
            timeout,
        }
    }

    /// An injector that is connected to nothing.
    pub fn detached() -> Injector {
        Injector {
            tx: None,
            timeout: Duration::ZERO,
        }
    }

    /// Sends `body` (a complete OP_MSG body document, raw BSON, including
    /// `$db`) as an OP_MSG request with a proxy-owned negative request id,
    /// at a moment when the connection has nothing in flight, and resolves
    /// to the reply frame (never forwarded to the client). Gives up after the
    /// configured `inject_timeout`.
    pub fn inject(
        &self,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Bytes, InjectError>> + Send + 'static {
        let tx = self.tx.clone();
        let timeout = self.timeout;
        async move {
            let tx = tx.ok_or(InjectError::Closed)?;
            let (reply_tx, reply_rx) = oneshot::channel();
            let request = InjectRequest {
                body,
                reply: reply_tx,
                deadline: tokio::time::Instant::now() + timeout,
            };
            tx.try_send(request).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => InjectError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => InjectError::Closed,
            })?;
            match tokio::time::timeout(timeout, reply_rx).await {
                Err(_) => Err(InjectError::Timeout(timeout)),
                Ok(Err(_)) => Err(InjectError::Closed),
                Ok(Ok(result)) => result,
            }
        }
    }
}

/// The name to keep for a command whose metric label index is `index`:
/// the label itself for the commands drivers send routinely (no String per
/// request on the hot path), a copy for anything else.
pub(crate) fn intern_command(name: &str, index: usize) -> Cow<'static, str> {
    match COMMAND_LABELS.get(index) {
        Some(label) if index != OTHER_COMMAND => Cow::Borrowed(label),
        _ => Cow::Owned(name.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::command_index;

    #[test]
    fn known_commands_are_borrowed_unknown_owned() {
        let find = command_index("find");
        assert!(matches!(
            intern_command("find", find),
            Cow::Borrowed("find")
        ));
        assert!(
            matches!(intern_command("myCustomCommand", command_index("myCustomCommand")), Cow::Owned(ref s) if s == "myCustomCommand")
        );
    }

    #[test]
    fn close_causes_are_indexed_in_order_and_only_the_client_goes_first() {
        for (index, cause) in CloseCause::ALL.into_iter().enumerate() {
            assert_eq!(cause.index(), index);
        }
        let first: Vec<_> = CloseCause::ALL
            .into_iter()
            .filter(|cause| cause.client_went_first())
            .collect();
        assert_eq!(first, [CloseCause::ClientClosed, CloseCause::ClientReset]);
    }

    #[tokio::test]
    async fn detached_injector_fails_closed() {
        let err = Injector::detached().inject(vec![]).await.unwrap_err();
        assert_eq!(err, InjectError::Closed);
    }

    #[tokio::test]
    async fn injector_reports_full_queue_and_closed_receiver() {
        let (tx, rx) = mpsc::channel(1);
        let injector = Injector::new(tx, Duration::from_millis(50));
        // First fills the queue and then times out waiting for a reply.
        let first = injector.inject(vec![1]);
        let second = injector.inject(vec![2]);
        let first = tokio::spawn(first);
        tokio::task::yield_now().await;
        let mut rx = rx;
        // Make sure the first request is in the queue before the second.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(second.await.unwrap_err(), InjectError::QueueFull);
        assert_eq!(
            first.await.unwrap().unwrap_err(),
            InjectError::Timeout(Duration::from_millis(50))
        );
        let queued = rx.recv().await.unwrap();
        assert_eq!(queued.body, vec![1]);
        drop(rx);
        assert_eq!(
            injector.inject(vec![3]).await.unwrap_err(),
            InjectError::Closed
        );
    }
}
