//! The seam between the data path and policy: the `Inspector` trait that the
//! session engine implements, the per-connection context it is handed, and
//! the `Injector` through which it may send its own requests (the
//! refresher's `refreshSessions`) on a client's upstream connection.
//! Inspector callbacks are synchronous and run on the connection's data
//! thread (one inspector is shared by every data thread, hence `Send +
//! Sync`): they must be quick, must not block, and must never log document
//! contents.
//! Nothing here does I/O itself; the connection task performs what the
//! verdicts ask for.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use std::sync::Arc;

use tokio::sync::oneshot;

pub use crate::ctl::InjectError;
use crate::ctl::{Ctl, Inbox, InjectRequest};

use sessionguard_protocol::wire::{FrameRef, Message};
pub use sessionguard_protocol::CloseCause;

/// Policy hooks called by every proxied connection. `on_reply` and
/// `on_close` have no-op defaults.
///
/// One owner of in-flight state per connection: what an inspector needs to
/// remember about a forwarded request until its reply (`Pending`) is
/// returned by `on_request` and kept by the connection, next to the proxy's
/// own record of the request, in the connection's in-flight table. It comes
/// back with every reply to that request (`on_reply`) and, if the reply
/// never came, in `on_close`'s `still_in_flight`. An inspector therefore
/// keeps no per-connection table of requests of its own.
pub trait Inspector: Send + Sync + 'static {
    /// What the inspector keeps about one forwarded request until its final
    /// reply; `()` for an inspector that needs nothing. Stored inline in the
    /// connection's in-flight table (no allocation of its own), so keep it
    /// small. Dropped without a callback when the request expects no reply
    /// (`moreToCome`) or is rejected.
    type Pending: Send + 'static;

    /// What the inspector keeps about one connection, from `on_connect` to
    /// `on_close`; `()` for an inspector that needs nothing. The connection
    /// holds it and hands it to every call, so per-connection policy state
    /// is reached without a lookup in a table shared by every connection.
    type Conn: 'static;

    /// A client connected and its upstream connection is established.
    fn on_connect(&self, conn: &ConnContext) -> Self::Conn;

    /// Called for each client request before it is forwarded. `Reject` =>
    /// not forwarded; `reply` (a full OP_MSG body document, raw BSON bytes)
    /// is sent to the client as a reply with responseTo = the request id
    /// (unless the request had `moreToCome`, which expects no reply).
    /// `Forward` carries the inspector's record of the request, kept with
    /// the proxy's while the request is in flight.
    fn on_request(
        &self,
        conn: &ConnContext,
        state: &Self::Conn,
        frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> Verdict<Self::Pending>;

    /// Called for each upstream reply, with the matched request (and the
    /// inspector's record of it) when known; may replace the reply bytes
    /// (seam for hello rewriting in replica-set mode). After a reply
    /// without `moreToCome` the request is complete and the proxy drops its
    /// record when this returns; after one with `moreToCome` (an exhaust
    /// stream) it stays in flight. Replies to injected requests are not
    /// shown here. For a streamed reply the record is borrowed from the
    /// connection's in-flight table: it must not block.
    fn on_reply(
        &self,
        conn: &ConnContext,
        state: &Self::Conn,
        request: Option<&mut InFlightRequest<Self::Pending>>,
        frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> ReplyVerdict {
        let _ = (conn, state, request, frame, msg);
        ReplyVerdict::Forward
    }

    /// The connection is closing because of `cause`; `still_in_flight` are
    /// the client requests that never got their (final) reply, oldest
    /// first, each with the inspector's record. Called before the client's
    /// socket is closed, so whatever the inspector releases here is
    /// released before the client can notice the close and retry elsewhere.
    fn on_close(
        &self,
        conn: &ConnContext,
        state: &Self::Conn,
        cause: CloseCause,
        still_in_flight: Vec<InFlightRequest<Self::Pending>>,
    ) {
        let _ = (conn, state, cause, still_in_flight);
    }
}

/// An inspector that lets everything through (plain proxy, tests, benchmarks).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopInspector;

impl Inspector for NoopInspector {
    type Pending = ();
    type Conn = ();

    fn on_connect(&self, _: &ConnContext) {}

    fn on_request(&self, _: &ConnContext, _: &(), _: FrameRef<'_>, _: &Message<'_>) -> Verdict {
        Verdict::Forward(())
    }
}

/// What to do with a client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<P = ()> {
    /// Forward it; `P` is the inspector's record of it while it is in flight.
    Forward(P),
    /// Do not forward; answer the client with this OP_MSG body document.
    Reject { reply: Vec<u8> },
}

/// What to do with an upstream reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyVerdict {
    Forward,
    /// Send these bytes (a complete frame, header included) instead.
    Replace(Bytes),
}

/// A client request that awaits its reply (or, for exhaust streams, its
/// final reply), with the inspector's record of it (`pending`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightRequest<P = ()> {
    /// The client's requestID.
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
    /// The inspector's record (`Inspector::Pending`), returned by
    /// `on_request`; owned here and nowhere else.
    pub pending: P,
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

/// Handle to send requests on a connection's upstream (cheap to clone,
/// `Send`): the connection's data thread's inbox and its registry slot.
#[derive(Clone)]
pub struct Injector {
    target: Option<(Arc<Inbox>, usize, u64)>,
    timeout: Duration,
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injector")
            .field("connected", &self.target.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Injector {
    pub(crate) fn new(
        inbox: Arc<Inbox>,
        slot: usize,
        generation: u64,
        timeout: Duration,
    ) -> Injector {
        Injector {
            target: Some((inbox, slot, generation)),
            timeout,
        }
    }

    /// An injector that is connected to nothing.
    pub fn detached() -> Injector {
        Injector {
            target: None,
            timeout: Duration::ZERO,
        }
    }

    /// Sends `body` (a complete OP_MSG body document, raw BSON, including
    /// `$db`) as an OP_MSG request with a proxy-owned negative request id,
    /// at a moment when the connection has nothing in flight, and resolves
    /// to the reply frame (never forwarded to the client). Gives up after the
    /// configured `inject_timeout`. Awaitable on any executor (the
    /// refresher runs on tokio; the connection on its data thread).
    pub fn inject(
        &self,
        body: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Bytes, InjectError>> + Send + 'static {
        let target = self.target.clone();
        let timeout = self.timeout;
        async move {
            let (inbox, slot, generation) = target.ok_or(InjectError::Closed)?;
            let (reply_tx, reply_rx) = oneshot::channel();
            inbox.send(Ctl::Inject {
                slot,
                generation,
                request: InjectRequest {
                    body,
                    reply: reply_tx,
                },
            });
            match tokio::time::timeout(timeout, reply_rx).await {
                Err(_) => Err(InjectError::Timeout(timeout)),
                Ok(Err(_)) => Err(InjectError::Closed),
                Ok(Ok(result)) => result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn detached_injector_fails_closed() {
        let err = Injector::detached().inject(vec![]).await.unwrap_err();
        assert_eq!(err, InjectError::Closed);
    }

    #[tokio::test]
    async fn an_unanswered_injection_times_out_and_reaches_the_inbox() {
        let (inbox, _bell) = Inbox::new().unwrap();
        let injector = Injector::new(inbox.clone(), 3, 7, Duration::from_millis(20));
        assert_eq!(
            injector.inject(vec![1]).await.unwrap_err(),
            InjectError::Timeout(Duration::from_millis(20))
        );
        let queued = inbox.take();
        assert!(matches!(
            queued.as_slice(),
            [Ctl::Inject { slot: 3, generation: 7, request }] if request.body == vec![1]
        ));
    }
}
