//! One client connection and its upstream connection, on the data thread
//! that accepted it: the client's TLS handshake, the upstream dial (or the
//! error reply that answers a client whose upstream cannot be reached),
//! then two same-thread tasks sharing one `Pair`: `requests` is the only
//! reader of the client and the only writer to the upstream, `replies` the
//! only reader of the upstream and the only writer to the client, so a
//! write blocked in one direction never stops the other. Each reads into
//! its own reusable buffer, shows every complete frame to the inspector
//! where it was read (a borrowed `FrameRef`: no copy, no reference count),
//! and writes the batch with one write from that same buffer.
//! Request/reply correlation, rejection replies, injected requests, drain
//! and the close log line live here too. Frames are
//! forwarded as the exact bytes received. The shared state is borrowed
//! only inside synchronous passes, never across `.await`. Document
//! contents are never logged.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::FutureExt;
use monoio::buf::{IoBuf, SliceMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable};
use monoio::net::TcpStream;
use tracing::{debug, error, info, warn};

use super::ctl::{poke, register, ConnSignal, SIG_DRAIN, SIG_INJECT, SIG_KILL};
use super::inflight::{InFlight, ReplyOwner};
use super::inspect::{
    CloseCause, ConnContext, InFlightRequest, InjectError, Injector, Inspector, ReplyVerdict,
    Verdict as RequestVerdict,
};
use super::tls::{self, ClientStream, ListenTls, Transport, UpstreamTls};
use super::unreachable;
use super::upstream::{DialError, HostPort, Resolve};
use crate::metrics::{Direction, FrameSide, ProxyMetrics};
use sessionguard_protocol::wire::{self, FrameRef, Message, MsgFlags, WireError};
use sessionguard_protocol::{command_index, intern_command, OTHER_COMMAND};

/// Which side of a connection pair failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
    Internal,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection pair was closed on an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("{side} sent a malformed frame: {source}")]
    Malformed {
        side: Side,
        #[source]
        source: WireError,
    },
    #[error("{side} stopped mid-frame: no complete frame within {timeout:?}")]
    FrameTimeout { side: Side, timeout: Duration },
    #[error("{side} i/o error while {action}: {source}")]
    Io {
        side: Side,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("upstream unreachable: {0}")]
    Connect(#[from] DialError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ConnError {
    pub(crate) fn side(&self) -> Side {
        match self {
            ConnError::Malformed { side, .. }
            | ConnError::FrameTimeout { side, .. }
            | ConnError::Io { side, .. } => *side,
            ConnError::Connect(_) => Side::Upstream,
            ConnError::Internal(_) => Side::Internal,
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
enum Outcome {
    ClientClosed,
    UpstreamClosed,
    Drained,
    Killed,
    Failed(ConnError),
}

/// Settings every connection of a listener shares.
#[derive(Debug)]
pub(crate) struct ConnSettings {
    pub upstream: HostPort,
    /// TLS to the upstream, when its connection string asks for it.
    pub upstream_tls: Option<UpstreamTls>,
    pub max_message_size: usize,
    pub connect_timeout: Duration,
    pub frame_read_timeout: Duration,
    pub inject_timeout: Duration,
    pub metrics: ProxyMetrics,
}

/// A freshly accepted client connection, registered on its data thread.
pub(crate) struct Accepted {
    pub id: u64,
    pub client: TcpStream,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Raised by the thread's control task: drain, kill, injection, wake.
    pub signal: Rc<ConnSignal>,
    /// Where the connection's injector sends (this thread's inbox, slot).
    pub injector: Injector,
    /// Name resolution off this thread, waking this connection.
    pub resolver: Box<dyn Resolve>,
}

/// Serves connections for one inspector type, behind a trait object so the
/// accept loop has no type parameter (the replica-set decorator wraps the
/// inspector or not, decided at start). `serve` is monomorphised per
/// inspector, so the per-frame path calls the inspector statically and
/// keeps its `Pending` records inline; the one box is per connection. The
/// future is the data thread's own (not `Send`).
pub(crate) trait ServeConnection: Send + Sync + 'static {
    fn serve_connection(
        self: Arc<Self>,
        accepted: Accepted,
        settings: Arc<ConnSettings>,
        tls: Option<ListenTls>,
    ) -> Pin<Box<dyn Future<Output = ()>>>;
}

impl<I: Inspector> ServeConnection for I {
    fn serve_connection(
        self: Arc<Self>,
        accepted: Accepted,
        settings: Arc<ConnSettings>,
        tls: Option<ListenTls>,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(serve(accepted, settings, self, tls))
    }
}

/// Runs `future` unless the connection is killed first (`None`).
async fn unless_killed<F: Future>(signal: &ConnSignal, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(out) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        match signal.poll_raised(SIG_KILL, cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Serves one accepted client connection to completion.
pub(crate) async fn serve<I: Inspector>(
    accepted: Accepted,
    settings: Arc<ConnSettings>,
    inspector: Arc<I>,
    tls: Option<ListenTls>,
) {
    let Accepted {
        id,
        client,
        peer,
        local,
        signal,
        injector,
        resolver,
    } = accepted;
    let opened_at = Instant::now();
    let _ = client.set_nodelay(true);
    debug!(conn = id, %peer, "connection opened");

    // The client's TLS handshake runs in this connection's task (a slow
    // handshake never stalls accepting), bounded by `handshake_timeout`.
    let client: ClientStream = match &tls {
        None => Transport::Plain(client),
        Some(tls) => {
            // Boxed, like the other one-off steps below: inline, the
            // handshake and its timer (1.6 KiB, aligned to 128) sized every
            // connection's task, TLS or not, for its whole life.
            let handshake = monoio::time::timeout(tls.handshake_timeout, tls.accept(client));
            match unless_killed(&signal, Box::pin(handshake)).await {
                None => return,
                Some(Err(_)) => {
                    warn!(conn = id, %peer, side = "client",
                        "connection closed: client TLS handshake not completed within {:?}",
                        tls.handshake_timeout);
                    return;
                }
                Some(Ok(Err(e))) => {
                    warn!(conn = id, %peer, side = "client",
                        "connection closed: client TLS handshake failed: {e}");
                    return;
                }
                Some(Ok(Ok(stream))) => Transport::Tls(Box::new(stream)),
            }
        }
    };

    let dialing = tls::connect(
        &settings.upstream,
        settings.connect_timeout,
        settings.upstream_tls.as_ref(),
        resolver.as_ref(),
    );
    let Some(dialed) = unless_killed(&signal, Box::pin(dialing)).await else {
        return;
    };
    let upstream = match dialed {
        Ok(stream) => {
            settings.metrics.upstream_reached(&settings.upstream);
            stream
        }
        Err(e) => {
            // A failed TLS handshake reached the upstream: the readiness
            // probe (a plain TCP connect) would undo the mark each round.
            let unreachable = !e.reached_the_upstream();
            settings.metrics.connect_failed(
                unreachable::failure_reason(&e),
                unreachable.then_some(&settings.upstream as &dyn std::fmt::Display),
            );
            // Answer the driver's handshake with the cause rather than a
            // bare reset, so the application's error says why.
            let errmsg = unreachable::explain(&e, settings.upstream_tls.as_ref());
            let wait = settings.connect_timeout.min(settings.frame_read_timeout);
            let max = settings.max_message_size;
            let answered = match client {
                Transport::Plain(mut c) => {
                    let answer = unreachable::answer_first_frame(&mut c, &errmsg, max, wait);
                    unless_killed(&signal, Box::pin(answer)).await
                }
                Transport::Tls(mut c) => {
                    let answer = unreachable::answer_first_frame(c.as_mut(), &errmsg, max, wait);
                    unless_killed(&signal, Box::pin(answer)).await
                }
            };
            let answered = answered.map_or("shutdown", |a| a.as_str());
            let e = ConnError::from(e);
            warn!(conn = id, %peer, side = %e.side(), error = %e, answered, "connection closed: {e}");
            return;
        }
    };

    let ctx = ConnContext {
        id,
        peer,
        local,
        injector,
    };
    let Ok(state) = catch_unwind(AssertUnwindSafe(|| inspector.on_connect(&ctx))) else {
        error!(conn = id, %peer, "the inspector panicked on connect (a bug); closing this connection");
        return;
    };
    let pair = Rc::new(Pair {
        ctx,
        state,
        inspector,
        settings: settings.clone(),
        signal,
        table: RefCell::new(InFlight::default()),
        to_client: RefCell::new(Vec::new()),
        draining: Cell::new(false),
        closed: Cell::new(false),
        outcome: RefCell::new(None),
        in_flight_at_close: Cell::new(0),
        client_writing: Cell::new(false),
        requests: Cell::new(0),
        replies: Cell::new(0),
        wake_requests: Cell::new(None),
        wake_replies: Cell::new(None),
        wake_owner: Cell::new(None),
    });
    // Boxed: rustc lays the four arms out side by side in this future; the
    // box keeps only the relay that runs resident.
    match (client, upstream) {
        (Transport::Plain(c), Transport::Plain(u)) => Box::pin(relay(c, u, pair.clone())).await,
        (Transport::Tls(c), Transport::Plain(u)) => Box::pin(relay(*c, u, pair.clone())).await,
        (Transport::Plain(c), Transport::Tls(u)) => Box::pin(relay(c, *u, pair.clone())).await,
        (Transport::Tls(c), Transport::Tls(u)) => Box::pin(relay(*c, *u, pair.clone())).await,
    }
    let outcome = pair
        .outcome
        .borrow_mut()
        .take()
        .unwrap_or(Outcome::Failed(ConnError::Internal(
            "relay ended without a cause",
        )));
    let in_flight = pair.in_flight_at_close.get();
    let (requests, replies) = (pair.requests.get(), pair.replies.get());

    let lifetime = opened_at.elapsed();
    let frame_side = |side: &Side| match side {
        Side::Client => FrameSide::Client,
        Side::Upstream | Side::Internal => FrameSide::Upstream,
    };
    match &outcome {
        Outcome::Failed(ConnError::Malformed { side, .. }) => {
            settings.metrics.malformed_frame(frame_side(side))
        }
        Outcome::Failed(ConnError::FrameTimeout { side, .. }) => {
            settings.metrics.frame_timed_out(frame_side(side))
        }
        _ => {}
    }
    // Every close line carries `reason` (the close cause the inspector was
    // given): requests cut by anything but the client are counted by it
    // (sessionguard_in_flight_abandoned_total) and never reported as misuse.
    let reason = outcome.cause().as_str();
    match outcome {
        // A client that resets its connection (killed, crashed, or a
        // driver closing a socket it gave up on) is its own business and
        // common in production: not a warning. Upstream resets, malformed
        // frames and stalls still warn.
        Outcome::Failed(ConnError::Io {
            side: Side::Client,
            action,
            source,
        }) if is_peer_gone(&source) => info!(
            conn = id, %peer, side = %Side::Client, reason, in_flight, lifetime = ?lifetime,
            "connection closed: the client reset the connection while {action}"
        ),
        Outcome::Failed(e @ ConnError::Internal(_)) => error!(
            conn = id, %peer, side = %e.side(), reason, in_flight, lifetime = ?lifetime,
            "connection closed: {e}"
        ),
        Outcome::Failed(e) => warn!(
            conn = id, %peer, side = %e.side(), reason, in_flight, lifetime = ?lifetime,
            "connection closed: {e}"
        ),
        Outcome::UpstreamClosed if in_flight > 0 => warn!(
            conn = id, %peer, side = "upstream", reason, in_flight, lifetime = ?lifetime,
            "connection closed: upstream closed the connection with requests in flight"
        ),
        _ => debug!(
            conn = id, %peer, in_flight, lifetime = ?lifetime,
            requests,
            replies,
            reason, "connection closed"
        ),
    }
}

/// The peer closed abruptly (a TCP reset, or writing after its close).
fn is_peer_gone(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

impl Outcome {
    /// Who closed first, and how: what the inspector is told and the close
    /// line's `reason`.
    fn cause(&self) -> CloseCause {
        match self {
            Outcome::ClientClosed => CloseCause::ClientClosed,
            Outcome::UpstreamClosed => CloseCause::UpstreamClosed,
            Outcome::Drained => CloseCause::Drained,
            Outcome::Killed => CloseCause::Shutdown,
            Outcome::Failed(error) => match error {
                ConnError::Io {
                    side: Side::Client, ..
                } => CloseCause::ClientReset,
                ConnError::Io { .. } | ConnError::Connect(_) => CloseCause::UpstreamError,
                ConnError::Malformed {
                    side: Side::Client, ..
                } => CloseCause::ClientMalformed,
                ConnError::Malformed { .. } => CloseCause::UpstreamMalformed,
                ConnError::FrameTimeout {
                    side: Side::Client, ..
                } => CloseCause::ClientFrameTimeout,
                ConnError::FrameTimeout { .. } => CloseCause::UpstreamFrameTimeout,
                ConnError::Internal(_) => CloseCause::Internal,
            },
        }
    }
}

/// What the request pump does with one client frame.
enum RequestAction<P> {
    /// Forward it; the record (with the inspector's) when a reply is due.
    Forward(Option<InFlightRequest<P>>),
    /// Answer it with this body, if it expects a reply; OP_QUERY expects an
    /// OP_REPLY, not an OP_MSG (`legacy`).
    Reject {
        reply: Vec<u8>,
        expects_reply: bool,
        legacy: bool,
    },
}

/// What both tasks of a connection share (one `Rc`, on one thread): the
/// in-flight table and the proxy's own replies in `RefCell`s borrowed only
/// inside synchronous passes, everything else in `Cell`s. No mutex, no
/// atomics, no cross-thread wake.
struct Pair<I: Inspector> {
    ctx: ConnContext,
    /// The inspector's own state of this connection (`Inspector::Conn`).
    state: I::Conn,
    inspector: Arc<I>,
    settings: Arc<ConnSettings>,
    signal: Rc<ConnSignal>,
    table: RefCell<InFlight<I::Pending>>,
    /// Replies the proxy makes itself (rejections), waiting for the client
    /// writer (the replies task).
    to_client: RefCell<Vec<u8>>,
    draining: Cell<bool>,
    closed: Cell<bool>,
    outcome: RefCell<Option<Outcome>>,
    in_flight_at_close: Cell<usize>,
    /// The replies task is writing to the client: a drain must not cut it.
    client_writing: Cell<bool>,
    /// Frames read per direction, for the close line.
    requests: Cell<u64>,
    replies: Cell<u64>,
    /// Local wake-ups: the requests task (an injection may be due), the
    /// replies task (a rejection reply is queued), the owner (closed).
    wake_requests: Cell<Option<Waker>>,
    wake_replies: Cell<Option<Waker>>,
    wake_owner: Cell<Option<Waker>>,
}

impl<I: Inspector> Pair<I> {
    /// Ends the connection once, whoever sees the end first: the inspector
    /// is told while both sockets are still open (the tasks hold them), so
    /// what it releases is released before the client can see the close
    /// and retry on another connection; then every task is woken to return
    /// (dropping a pending read cancels it).
    fn finish(&self, outcome: Outcome) {
        if self.closed.replace(true) {
            return;
        }
        let still_in_flight = self.table.borrow_mut().take_client_requests();
        self.in_flight_at_close.set(still_in_flight.len());
        let judged = catch_unwind(AssertUnwindSafe(|| {
            self.inspector
                .on_close(&self.ctx, &self.state, outcome.cause(), still_in_flight)
        }));
        if judged.is_err() {
            error!(
                conn = self.ctx.id,
                "the inspector panicked while judging the close (a bug); the connection closes anyway"
            );
        }
        self.signal.fail_injections(InjectError::Closed);
        *self.outcome.borrow_mut() = Some(outcome);
        poke(&self.wake_requests);
        poke(&self.wake_replies);
        poke(&self.wake_owner);
    }

    fn idle_for_drain(&self) -> bool {
        !self.client_writing.get() && self.table.borrow().idle_for_drain()
    }

    /// An injection can be written now: nothing in flight, not draining.
    fn injection_due(&self) -> bool {
        !self.draining.get()
            && !self.signal.injections.borrow().is_empty()
            && self.table.borrow().idle_for_inject()
    }

    /// Pops the oldest live injection (the refresher may have given up on
    /// some), records it as in flight, and returns the frame to write.
    fn take_injection(&self) -> Option<Bytes> {
        let request = loop {
            let request = self.signal.injections.borrow_mut().pop_front()?;
            if !request.reply.is_closed() {
                break request;
            }
        };
        let mut table = self.table.borrow_mut();
        let id = table.next_proxy_id();
        table.insert_injected(id, request.reply);
        Some(wire::op_msg::encode(
            id,
            0,
            MsgFlags::default(),
            &request.body,
        ))
    }
}

/// Relays until either side closes, a drain finishes, or a kill: spawns the
/// two direction tasks on this thread and watches the connection's signal.
async fn relay<I, C, U>(client: C, upstream: U, pair: Rc<Pair<I>>)
where
    I: Inspector,
    C: AsyncReadRent + AsyncWriteRent + Split + 'static,
    U: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let requests = monoio::spawn(requests(client_read, upstream_write, pair.clone()));
    let replies = monoio::spawn(replies(upstream_read, client_write, pair.clone()));
    // The owner wakes only for the signal or the end: no per-frame cost.
    poll_fn(|cx| {
        if pair.closed.get() {
            return Poll::Ready(());
        }
        register(&pair.wake_owner, cx.waker());
        pair.signal.register(cx);
        let flags = pair.signal.take();
        if flags & SIG_KILL != 0 {
            pair.finish(Outcome::Killed);
            return Poll::Ready(());
        }
        if flags & SIG_DRAIN != 0 && !pair.draining.replace(true) {
            pair.signal.fail_injections(InjectError::Draining);
            if pair.idle_for_drain() {
                pair.finish(Outcome::Drained);
                return Poll::Ready(());
            }
        }
        if flags & SIG_INJECT != 0 {
            if pair.draining.get() {
                pair.signal.fail_injections(InjectError::Draining);
            } else {
                poke(&pair.wake_requests);
            }
        }
        Poll::Pending
    })
    .await;
    // Both tasks return once woken after `finish`; their halves (and so
    // the sockets) are dropped with them.
    let _ = (requests.await, replies.await);
}

/// Read buffer size per direction when a connection starts. Small, so an
/// idle connection's two buffers share a page: drivers send one request
/// at a time per connection and most commands and replies fit; a buffer
/// grows to a larger frame's declared length when one arrives, and doubles
/// (up to `BUF_BURST`) after a read that filled it.
const BUF_SIZE: usize = 2 * 1024;
/// How far a buffer grows for bursts of frames that are each small.
const BUF_BURST: usize = 16 * 1024;
/// A buffer grown past this for a big frame is replaced once empty.
const BUF_KEEP: usize = 64 * 1024;

/// Makes room for the next read. Written frames are drained from the
/// front, so reads always land at the buffer's start and only a partial
/// frame is ever moved: at hundreds of connections the few KiB each buffer
/// touches stay in the core's cache, where reads that walked through the
/// whole buffer did not.
fn ready_for_read(buf: &mut Vec<u8>) {
    if buf.is_empty() && buf.capacity() > BUF_KEEP {
        *buf = Vec::with_capacity(BUF_SIZE);
    }
    // Room for a partial frame's declared length (already checked against
    // the maximum by the pass that found it partial).
    if let Ok(Some(n)) = wire::frame_len(buf, usize::MAX) {
        if n > buf.capacity() {
            buf.reserve_exact(n - buf.len());
        }
    }
    // Never a read into no room: it would come back as 0 bytes, an EOF.
    if buf.len() == buf.capacity() {
        buf.reserve(BUF_SIZE);
    }
}

async fn read_into<R: AsyncReadRent>(
    mut half: R,
    mut buf: Vec<u8>,
) -> (R, Vec<u8>, io::Result<usize>) {
    ready_for_read(&mut buf);
    // Into the spare capacity: a monoio read of a whole buffer writes from
    // its start.
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = half.read(SliceMut::new(buf, len, cap)).await;
    let mut buf = slice.into_inner();
    if let Ok(read) = res {
        grow_after_read(&mut buf, cap - len, read);
    }
    (half, buf, res)
}

/// A read that filled all the room it had suggests more is waiting (a
/// burst of frames, or a reply bigger than the buffer): double the buffer,
/// up to `BUF_BURST`, so the rest takes fewer reads.
fn grow_after_read(buf: &mut Vec<u8>, room: usize, read: usize) {
    let cap = buf.capacity();
    if read == room && cap < BUF_BURST {
        let target = (2 * cap).min(BUF_BURST);
        buf.reserve_exact(target.saturating_sub(buf.len()));
    }
}

async fn write_from<W: AsyncWriteRent>(mut half: W, bytes: Bytes) -> (W, io::Result<usize>) {
    let (res, _) = half.write_all(bytes).await;
    (half, res)
}

/// An empty out-of-line slot for the future type `f` returns (which cannot
/// be named).
fn idle_slot<A, B, F: Future>(_f: impl Fn(A, B) -> F) -> Option<Pin<Box<F>>> {
    None
}

/// Polls a future kept out of line, emptying the slot once it is done.
fn poll_slot<F: Future>(slot: &mut Option<Pin<Box<F>>>, cx: &mut Context<'_>) -> Poll<F::Output> {
    let Some(future) = slot.as_mut() else {
        return Poll::Pending;
    };
    let out = std::task::ready!(future.as_mut().poll(cx));
    *slot = None;
    Poll::Ready(out)
}

/// How many bytes at the front of `buf` are complete frames (the batch),
/// checking each declared length before waiting for its bytes. A length
/// out of bounds ends the batch and comes back as the error to close with
/// once the frames before it are dealt with (they were sent first).
fn complete_frames(buf: &[u8], max: usize, side: Side) -> (usize, Option<ConnError>) {
    let mut at = 0;
    loop {
        match wire::frame_len(&buf[at..], max) {
            Err(source) => return (at, Some(ConnError::Malformed { side, source })),
            Ok(Some(n)) if at + n <= buf.len() => at += n,
            Ok(_) => return (at, None),
        }
    }
}

/// Each frame of a batch, borrowed where it was read: the inspector looks
/// at it in place, with no reference count and no allocation.
fn frames(batch: &[u8]) -> impl Iterator<Item = FrameRef<'_>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let frame = FrameRef::first_of(batch.get(at..)?)?;
        at += frame.bytes.len();
        Some(frame)
    })
}

/// What a pass leaves to write: the front of the read buffer untouched
/// (the common case), or, when a frame was cut or replaced, the bytes
/// rebuilt (rare) in place of the `consumed` bytes read.
enum Output {
    Nothing,
    Batch(usize),
    Rebuilt { bytes: Vec<u8>, consumed: usize },
}

impl Output {
    /// The read bytes this output stands for.
    fn consumed(&self) -> usize {
        match self {
            Output::Nothing => 0,
            Output::Batch(n) => *n,
            Output::Rebuilt { consumed, .. } => *consumed,
        }
    }
}

/// Writes a pass's output, then drops the frames it stands for from the
/// read buffer. The batch is written from the read buffer itself (moved
/// into the write and handed back): no copy, no reference count.
async fn write_output<W: AsyncWriteRent>(
    mut half: W,
    mut buf: Vec<u8>,
    output: Output,
) -> (W, Vec<u8>, io::Result<usize>) {
    let consumed = output.consumed();
    let res = match output {
        Output::Nothing => Ok(0),
        Output::Batch(n) => {
            let (res, slice) = half.write_all(buf.slice(..n)).await;
            buf = slice.into_inner();
            res
        }
        Output::Rebuilt { bytes, .. } if bytes.is_empty() => Ok(0),
        Output::Rebuilt { bytes, .. } => half.write_all(bytes).await.0,
    };
    buf.drain(..consumed);
    (half, buf, res)
}

/// Runs a write unless the connection is finished first (`None`): a peer
/// that stops reading must not hold a kill, a drain's grace or the other
/// direction's close. Dropping the write cancels it (monoio's
/// `async-cancel`) and drops the socket half it owns.
///
/// The write is pinned by the caller: an async fn's future argument is kept
/// twice in its state (the argument and the pinned local), which made every
/// connection task hundreds of bytes larger and copied the write's state
/// on each call.
async fn unless_closed<I: Inspector, F: Future>(
    pair: &Pair<I>,
    wake: &Cell<Option<Waker>>,
    mut write: Pin<&mut F>,
) -> Option<F::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(out) = write.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if pair.closed.get() {
            return Poll::Ready(None);
        }
        register(wake, cx.waker());
        Poll::Pending
    })
    .await
}

/// How a read ends the connection, if it does: the peer closed (0 bytes)
/// or failed.
fn read_end(res: io::Result<usize>, side: Side) -> Option<Outcome> {
    match res {
        Ok(0) => Some(match side {
            Side::Client => Outcome::ClientClosed,
            Side::Upstream | Side::Internal => Outcome::UpstreamClosed,
        }),
        Ok(_) => None,
        Err(source) => Some(io_failed(side, "reading", source)),
    }
}

fn io_failed(side: Side, action: &'static str, source: io::Error) -> Outcome {
    Outcome::Failed(ConnError::Io {
        side,
        action,
        source,
    })
}

/// The frame-read timer of one direction: armed while a partial frame is
/// buffered, re-armed when a frame completed (each frame gets the full
/// timeout), disarmed otherwise — most frames arrive whole in one read.
///
/// Kept out of line, allocated only while armed: monoio's timer entry is
/// 512 bytes aligned to 128, and inline it made each connection task's state
/// machine 2.7 KiB, spreading the few fields a poll reads over more cache
/// lines (and more memory per idle connection).
#[derive(Default)]
struct FrameTimer(Option<Pin<Box<monoio::time::Sleep>>>);

impl FrameTimer {
    fn arm(&mut self, partial: bool, progressed: bool, timeout: Duration) {
        match (&mut self.0, partial) {
            (None, true) => self.0 = Some(Box::pin(monoio::time::sleep(timeout))),
            (Some(sleep), true) if progressed => {
                sleep.as_mut().reset(monoio::time::Instant::now() + timeout);
            }
            (Some(_), false) => self.0 = None,
            _ => {}
        }
    }

    /// True once the armed timeout has passed (never while disarmed).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        poll_slot(&mut self.0, cx).is_ready()
    }
}

/// Client -> upstream: the only reader of the client and the only writer
/// to the upstream (forwarded requests and injected ones).
async fn requests<I, R, W>(client: R, upstream: W, pair: Rc<Pair<I>>)
where
    I: Inspector,
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let timeout = pair.settings.frame_read_timeout;
    let mut upstream = Some(upstream);
    let mut read = pin!(read_into(client, Vec::with_capacity(BUF_SIZE)).fuse());
    let mut injecting = idle_slot(write_from::<W>);
    let mut timer = FrameTimer::default();
    loop {
        enum Ev<A, B> {
            Read(A),
            Injected(B),
            Timeout,
            InjectionDue,
        }
        let ev = poll_fn(|cx| {
            if pair.closed.get() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(v) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(Ev::Read(v)));
            }
            if let Poll::Ready(v) = poll_slot(&mut injecting, cx) {
                return Poll::Ready(Some(Ev::Injected(v)));
            }
            if timer.expired(cx) {
                return Poll::Ready(Some(Ev::Timeout));
            }
            if upstream.is_some() && pair.injection_due() {
                return Poll::Ready(Some(Ev::InjectionDue));
            }
            register(&pair.wake_requests, cx.waker());
            Poll::Pending
        })
        .await;
        let Some(ev) = ev else { return };
        let upstream_error = |source| io_failed(Side::Upstream, "writing", source);
        match ev {
            Ev::Timeout => {
                return pair.finish(Outcome::Failed(ConnError::FrameTimeout {
                    side: Side::Client,
                    timeout,
                }))
            }
            Ev::InjectionDue => {
                if let (Some(frame), Some(w)) = (pair.take_injection(), upstream.take()) {
                    injecting = Some(Box::pin(write_from(w, frame)));
                }
            }
            Ev::Injected((half, res)) => {
                if let Err(e) = res {
                    return pair.finish(upstream_error(e));
                }
                upstream = Some(half);
            }
            Ev::Read((half, mut buf, res)) => {
                if let Some(end) = read_end(res, Side::Client) {
                    return pair.finish(end);
                }
                if pair.draining.get() {
                    // Not forwarded (as before v2, where it stayed unread):
                    // the connection closes once idle. Parks, holding the
                    // half, until the pair is finished.
                    let _keep = (half, buf);
                    poll_fn(|cx| {
                        if pair.closed.get() {
                            return Poll::Ready(());
                        }
                        register(&pair.wake_requests, cx.waker());
                        Poll::Pending
                    })
                    .await;
                    return;
                }
                let (output, refused) = match contained(|| request_pass(&pair, &buf)) {
                    Ok(passed) => passed,
                    Err(e) => return pair.finish(Outcome::Failed(e)),
                };
                if !pair.to_client.borrow().is_empty() {
                    poke(&pair.wake_replies);
                }
                let progressed = !matches!(output, Output::Nothing);
                let partial = buf.len() > output.consumed();
                timer.arm(partial, progressed, timeout);
                if progressed {
                    // An injection being written finishes first (one writer).
                    let w = match upstream.take() {
                        Some(w) => w,
                        None => {
                            let Some((w, res)) = unless_closed(
                                &pair,
                                &pair.wake_requests,
                                pin!(poll_fn(|cx| poll_slot(&mut injecting, cx))),
                            )
                            .await
                            else {
                                return;
                            };
                            if let Err(e) = res {
                                return pair.finish(upstream_error(e));
                            }
                            w
                        }
                    };
                    let write = pin!(write_output(w, buf, output));
                    let Some((w, written, res)) =
                        unless_closed(&pair, &pair.wake_requests, write).await
                    else {
                        return;
                    };
                    if let Err(e) = res {
                        return pair.finish(upstream_error(e));
                    }
                    upstream = Some(w);
                    buf = written;
                }
                if let Some(e) = refused {
                    return pair.finish(Outcome::Failed(e));
                }
                read.set(read_into(half, buf).fuse());
            }
        }
    }
}

/// Upstream -> client: the only reader of the upstream and the only writer
/// to the client (forwarded replies and the proxy's own).
async fn replies<I, R, W>(upstream: R, client: W, pair: Rc<Pair<I>>)
where
    I: Inspector,
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let timeout = pair.settings.frame_read_timeout;
    let mut client = Some(client);
    let mut read = pin!(read_into(upstream, Vec::with_capacity(BUF_SIZE)).fuse());
    let mut timer = FrameTimer::default();
    let client_error = |source| io_failed(Side::Client, "writing", source);
    loop {
        enum Ev<A> {
            Read(A),
            Local,
            Timeout,
        }
        let ev = poll_fn(|cx| {
            if pair.closed.get() {
                return Poll::Ready(None);
            }
            if let Poll::Ready(v) = read.as_mut().poll(cx) {
                return Poll::Ready(Some(Ev::Read(v)));
            }
            if timer.expired(cx) {
                return Poll::Ready(Some(Ev::Timeout));
            }
            if !pair.to_client.borrow().is_empty() {
                return Poll::Ready(Some(Ev::Local));
            }
            register(&pair.wake_replies, cx.waker());
            Poll::Pending
        })
        .await;
        let Some(ev) = ev else { return };
        let Some(w) = client.take() else { return };
        match ev {
            Ev::Timeout => {
                return pair.finish(Outcome::Failed(ConnError::FrameTimeout {
                    side: Side::Upstream,
                    timeout,
                }))
            }
            Ev::Local => {
                let local = std::mem::take(&mut *pair.to_client.borrow_mut());
                pair.client_writing.set(true);
                let write = pin!(write_from(w, Bytes::from(local)));
                let Some((w, res)) = unless_closed(&pair, &pair.wake_replies, write).await else {
                    return;
                };
                pair.client_writing.set(false);
                if let Err(e) = res {
                    return pair.finish(client_error(e));
                }
                client = Some(w);
                if pair.draining.get() && pair.idle_for_drain() {
                    return pair.finish(Outcome::Drained);
                }
            }
            Ev::Read((half, mut buf, res)) => {
                if let Some(end) = read_end(res, Side::Upstream) {
                    return pair.finish(end);
                }
                let (output, refused) = match contained(|| reply_pass(&pair, &buf)) {
                    Ok(passed) => passed,
                    Err(e) => return pair.finish(Outcome::Failed(e)),
                };
                let progressed = !matches!(output, Output::Nothing);
                let partial = buf.len() > output.consumed();
                timer.arm(partial, progressed, timeout);
                let w = if progressed {
                    pair.client_writing.set(true);
                    let write = pin!(write_output(w, buf, output));
                    let Some((w, written, res)) =
                        unless_closed(&pair, &pair.wake_replies, write).await
                    else {
                        return;
                    };
                    pair.client_writing.set(false);
                    if let Err(e) = res {
                        return pair.finish(client_error(e));
                    }
                    buf = written;
                    w
                } else {
                    w
                };
                client = Some(w);
                if let Some(e) = refused {
                    return pair.finish(Outcome::Failed(e));
                }
                read.set(read_into(half, buf).fuse());
                // Only after the reply reached the client: a draining
                // connection closes now, and must not cut it off.
                if pair.draining.get() && pair.idle_for_drain() {
                    return pair.finish(Outcome::Drained);
                }
                if pair.injection_due() {
                    poke(&pair.wake_requests);
                }
            }
        }
    }
}

/// Runs an inspection pass with a panic in it (a bug in an inspector, never
/// the input's fault) turned into this connection's close with an internal
/// error: the panic unwinds out of the pass only, so the other connections
/// on the data thread go on being served. Free when nothing panics.
fn contained<T>(pass: impl FnOnce() -> Result<T, ConnError>) -> Result<T, ConnError> {
    catch_unwind(AssertUnwindSafe(pass)).unwrap_or(Err(ConnError::Internal(
        "a panic while inspecting a frame (a bug in sessionguard: please report it)",
    )))
}

/// One pass over the client's complete frames: count, inspect, record the
/// requests that expect a reply (before they are forwarded, so a reply can
/// never arrive before its request is known), queue rejection replies.
fn request_pass<I: Inspector>(
    pair: &Pair<I>,
    buf: &[u8],
) -> Result<(Output, Option<ConnError>), ConnError> {
    let settings = &pair.settings;
    let (end, refused) = complete_frames(buf, settings.max_message_size, Side::Client);
    if end == 0 {
        return Ok((Output::Nothing, refused));
    }
    let batch = &buf[..end];
    let mut rebuilt: Option<Vec<u8>> = None;
    let mut kept = 0;
    let mut count = 0;
    for frame in frames(batch) {
        count += 1;
        settings.metrics.frame(
            Direction::ClientToUpstream,
            frame.header.op_code,
            frame.bytes.len(),
        );
        match inspect_request(pair, frame)? {
            RequestAction::Forward(record) => {
                if let Some(record) = record {
                    if let Some(request_id) = pair.table.borrow_mut().insert_client(record) {
                        debug!(
                            conn = pair.ctx.id,
                            request_id, "client reused a request id that was still in flight"
                        );
                    }
                }
                match &mut rebuilt {
                    Some(out) => out.extend_from_slice(frame.bytes),
                    None => kept += frame.bytes.len(),
                }
            }
            RequestAction::Reject {
                reply,
                expects_reply,
                legacy,
            } => {
                rebuilt.get_or_insert_with(|| batch[..kept].to_vec());
                // A moreToCome request expects no reply, so it gets none.
                if !expects_reply {
                    continue;
                }
                let reply_id = pair.table.borrow_mut().next_proxy_id();
                let request_id = frame.header.request_id;
                let bytes = if legacy {
                    wire::legacy::encode_reply(reply_id, request_id, 0, 0, &[&reply])
                } else {
                    wire::op_msg::encode(reply_id, request_id, MsgFlags::default(), &reply)
                };
                pair.to_client.borrow_mut().extend_from_slice(&bytes);
            }
        }
    }
    pair.requests.set(pair.requests.get() + count);
    let output = match rebuilt {
        None => Output::Batch(end),
        Some(bytes) => Output::Rebuilt {
            bytes,
            consumed: end,
        },
    };
    Ok((output, refused))
}

fn inspect_request<I: Inspector>(
    pair: &Pair<I>,
    frame: FrameRef<'_>,
) -> Result<RequestAction<I::Pending>, ConnError> {
    let malformed = |source| ConnError::Malformed {
        side: Side::Client,
        source,
    };
    let settings = &pair.settings;
    let opened = wire::open(frame, settings.max_message_size).map_err(malformed)?;
    let msg = opened.parse(frame).map_err(malformed)?;

    let (command, expects_reply, exhaust_allowed, awaitable_hello) = match &msg {
        Message::Msg(m) => {
            let name = m.command_name();
            let awaitable = name.is_some_and(sessionguard_protocol::command::is_hello)
                && (m.flags.exhaust_allowed()
                    || m.body.get("maxAwaitTimeMS").ok().flatten().is_some());
            (
                name,
                !m.flags.more_to_come(),
                m.flags.exhaust_allowed(),
                awaitable,
            )
        }
        Message::Query(q) => (q.command_name(), true, false, false),
        // Clients do not send replies; unknown opcodes are carried
        // through without expecting anything back.
        Message::Reply(_) | Message::Other(_) => (None, false, false, false),
    };
    let command_metric = command.map_or(OTHER_COMMAND, command_index);
    if command.is_some() {
        settings.metrics.command(command_metric);
    }
    // Before the inspector runs: its time is part of the round trip.
    let started = Instant::now();
    let verdict = pair
        .inspector
        .on_request(&pair.ctx, &pair.state, frame, &msg);
    Ok(match verdict {
        RequestVerdict::Forward(pending) => {
            RequestAction::Forward(expects_reply.then(|| InFlightRequest {
                request_id: frame.header.request_id,
                command: command.map(|name| intern_command(name, command_metric)),
                command_metric,
                started,
                exhaust_allowed,
                awaitable_hello,
                streamed_replies: 0,
                pending,
            }))
        }
        RequestVerdict::Reject { reply } => RequestAction::Reject {
            reply,
            expects_reply,
            legacy: matches!(msg, Message::Query(_)),
        },
    })
}

/// Records the latency of a request's first reply. Awaitable hellos wait
/// for a topology change on purpose, so they would only blur the
/// histogram; later replies of an exhaust stream are not round trips.
fn observe_round_trip<P>(
    settings: &ConnSettings,
    request: &InFlightRequest<P>,
    more_to_come: bool,
) {
    let first_reply = request.streamed_replies <= u32::from(more_to_come);
    if request.awaitable_hello || !first_reply {
        return;
    }
    if request.command.is_some() {
        settings
            .metrics
            .round_trip(request.command_metric, request.started.elapsed());
    }
}

/// One pass over the upstream's complete frames: match each to its
/// request, hand injected replies to their waiters (cut out), ask the
/// inspector (which may replace a reply: hello rewriting).
fn reply_pass<I: Inspector>(
    pair: &Pair<I>,
    buf: &[u8],
) -> Result<(Output, Option<ConnError>), ConnError> {
    let settings = &pair.settings;
    let (end, refused) = complete_frames(buf, settings.max_message_size, Side::Upstream);
    if end == 0 {
        return Ok((Output::Nothing, refused));
    }
    let batch = &buf[..end];
    let malformed = |source| ConnError::Malformed {
        side: Side::Upstream,
        source,
    };
    let mut rebuilt: Option<Vec<u8>> = None;
    let mut kept = 0;
    let mut count = 0;
    for frame in frames(batch) {
        count += 1;
        settings.metrics.frame(
            Direction::UpstreamToClient,
            frame.header.op_code,
            frame.bytes.len(),
        );
        let opened = wire::open(frame, settings.max_message_size).map_err(malformed)?;
        let msg = opened.parse(frame).map_err(malformed)?;
        let more_to_come = matches!(&msg, Message::Msg(m) if m.flags.more_to_come());
        let mut table = pair.table.borrow_mut();
        let owner = table.on_reply(
            frame.header.response_to,
            frame.header.request_id,
            more_to_come,
        );
        let verdict = match owner {
            ReplyOwner::Injected(waiter) => {
                drop(table);
                if let Some(waiter) = waiter {
                    // A copy, so the read buffer is not held by the waiter.
                    let _ = waiter.send(Ok(Bytes::copy_from_slice(frame.bytes)));
                }
                rebuilt.get_or_insert_with(|| batch[..kept].to_vec());
                continue;
            }
            ReplyOwner::Client(mut request) => {
                // Complete: the record is ours now, and dropped after this.
                drop(table);
                observe_round_trip(settings, &request, more_to_come);
                pair.inspector
                    .on_reply(&pair.ctx, &pair.state, Some(&mut request), frame, &msg)
            }
            ReplyOwner::Streaming(key) => {
                // The stream continues: the record stays in the table and
                // the inspector updates it there (exhaust streams only).
                let request = table.client_mut(key);
                if let Some(request) = &request {
                    observe_round_trip(settings, request, more_to_come);
                }
                pair.inspector
                    .on_reply(&pair.ctx, &pair.state, request, frame, &msg)
            }
            ReplyOwner::Unmatched => {
                drop(table);
                debug!(
                    conn = pair.ctx.id,
                    response_to = frame.header.response_to,
                    op = frame.header.op_code.name(),
                    "reply matches no request in flight; forwarding it anyway"
                );
                pair.inspector
                    .on_reply(&pair.ctx, &pair.state, None, frame, &msg)
            }
        };
        match verdict {
            ReplyVerdict::Forward => match &mut rebuilt {
                Some(out) => out.extend_from_slice(frame.bytes),
                None => kept += frame.bytes.len(),
            },
            ReplyVerdict::Replace(bytes) => {
                rebuilt
                    .get_or_insert_with(|| batch[..kept].to_vec())
                    .extend_from_slice(&bytes);
            }
        }
    }
    pair.replies.set(pair.replies.get() + count);
    let output = match rebuilt {
        None => Output::Batch(end),
        Some(bytes) => Output::Rebuilt {
            bytes,
            consumed: end,
        },
    };
    Ok((output, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `len` bytes: its length prefix, the rest zeros (only the
    /// length matters to the framing).
    fn frame_of(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        bytes[..4].copy_from_slice(&i32::try_from(len).unwrap().to_le_bytes());
        bytes
    }

    /// Reads must land at the buffer's front once a batch is written:
    /// walking through the whole buffer instead touched 16 KiB per
    /// direction per connection, which at 256 connections no longer fits
    /// in the core's cache.
    #[test]
    fn a_written_batch_gives_its_room_back_so_the_next_read_lands_at_the_front() {
        let mut buf = Vec::with_capacity(BUF_SIZE);
        ready_for_read(&mut buf);
        let front = buf.as_ptr();
        for _ in 0..3 {
            buf.extend_from_slice(&frame_of(1000));
            let (end, refused) = complete_frames(&buf, 1 << 20, Side::Client);
            assert!(refused.is_none());
            assert_eq!(end, 1000);
            // What `write_output` does once the batch is written.
            buf.drain(..end);
            ready_for_read(&mut buf);
            assert_eq!(buf.as_ptr(), front, "the next read reuses the front");
            assert!(buf.capacity() >= BUF_SIZE);
        }
    }

    /// Frames are borrowed from the buffer they were read into, one by one.
    #[test]
    fn frames_are_slices_of_the_read_buffer() {
        let mut bytes = frame_of(100);
        bytes.extend_from_slice(&frame_of(40));
        bytes.extend_from_slice(&frame_of(300)[..50]);
        let (end, refused) = complete_frames(&bytes, 1 << 20, Side::Upstream);
        assert_eq!((end, refused.is_none()), (140, true));
        let seen: Vec<(usize, usize)> = frames(&bytes[..end])
            .map(|f| {
                (
                    f.bytes.as_ptr() as usize - bytes.as_ptr() as usize,
                    f.bytes.len(),
                )
            })
            .collect();
        assert_eq!(seen, vec![(0, 100), (100, 40)]);
    }

    /// After the batch is written, the partial frame behind it moves to
    /// the front, whole, with room reserved for its declared length.
    #[test]
    fn a_partial_tail_is_kept_whole_with_room_for_its_length() {
        let mut buf = Vec::with_capacity(BUF_SIZE);
        let mut bytes = frame_of(100);
        let big = frame_of(3 * BUF_SIZE);
        bytes.extend_from_slice(&big[..50]);
        buf.extend_from_slice(&bytes);
        let (end, _) = complete_frames(&buf, 1 << 20, Side::Client);
        assert_eq!(end, 100);
        buf.drain(..end);
        ready_for_read(&mut buf);
        assert_eq!(&buf[..], &bytes[100..]);
        assert!(buf.capacity() >= 3 * BUF_SIZE);
    }

    /// Bursts grow the buffer (to fewer reads), single small frames do not
    /// (an idle connection stays small).
    #[test]
    fn a_read_that_fills_the_buffer_doubles_it_up_to_the_burst_size() {
        let mut buf = Vec::with_capacity(BUF_SIZE);
        buf.extend_from_slice(&[0; 100]);
        grow_after_read(&mut buf, BUF_SIZE, 100);
        assert_eq!(buf.capacity(), BUF_SIZE, "a short read leaves it");
        let mut sizes = Vec::new();
        for _ in 0..6 {
            // A read that filled the room it had.
            let room = buf.capacity() - buf.len();
            buf.resize(buf.capacity(), 0);
            grow_after_read(&mut buf, room, room);
            sizes.push(buf.capacity());
        }
        assert_eq!(sizes[0], 2 * BUF_SIZE);
        assert_eq!(*sizes.last().unwrap(), BUF_BURST);
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]));
    }

    /// A length out of bounds ends the batch after the frames before it.
    #[test]
    fn a_refused_length_comes_back_after_the_good_frames() {
        let mut bytes = frame_of(100);
        bytes.extend_from_slice(&frame_of(2000)[..16]);
        let (end, refused) = complete_frames(&bytes, 1000, Side::Client);
        assert_eq!(end, 100);
        assert!(matches!(
            refused,
            Some(ConnError::Malformed {
                side: Side::Client,
                ..
            })
        ));
    }

    /// The frame timer, now out of line: armed by a partial frame, left
    /// alone while the same frame stays partial, pushed back (each frame
    /// gets the full timeout) when a frame completed and the next is
    /// partial, dropped once nothing is partial, and expired only once armed.
    #[test]
    fn the_frame_timer_follows_the_partial_frame() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a runtime with a timer");
        rt.block_on(async {
            let timeout = Duration::from_secs(30);
            let deadline = |timer: &FrameTimer| timer.0.as_ref().map(|sleep| sleep.deadline());
            fn expired(timer: &mut FrameTimer) -> impl Future<Output = bool> + '_ {
                poll_fn(move |cx| Poll::Ready(timer.expired(cx)))
            }
            let mut timer = FrameTimer::default();

            timer.arm(false, true, timeout);
            assert_eq!(deadline(&timer), None, "nothing partial: not armed");
            assert!(!expired(&mut timer).await, "a disarmed timer never expires");

            timer.arm(true, false, timeout);
            let first = deadline(&timer).expect("a partial frame arms it");
            monoio::time::sleep(Duration::from_millis(5)).await;
            timer.arm(true, false, timeout);
            assert_eq!(
                deadline(&timer),
                Some(first),
                "the same frame keeps its deadline"
            );
            timer.arm(true, true, timeout);
            let second = deadline(&timer).expect("still armed");
            assert!(
                second > first,
                "the next partial frame gets the full timeout"
            );
            assert!(!expired(&mut timer).await);

            timer.arm(false, true, timeout);
            assert_eq!(deadline(&timer), None, "nothing partial any more: dropped");

            timer.arm(true, false, Duration::from_millis(1));
            monoio::time::sleep(Duration::from_millis(20)).await;
            assert!(expired(&mut timer).await, "armed and past its deadline");
            assert_eq!(deadline(&timer), None, "an expired timer is spent");
        });
    }

    /// The size of the future `f` returns, without making one.
    fn future_size<A, B, C, D, F>(_f: impl Fn(A, B, C, D) -> F) -> (usize, usize) {
        (std::mem::size_of::<F>(), std::mem::align_of::<F>())
    }

    fn task_size<A, B, C, F>(_f: impl Fn(A, B, C) -> F) -> (usize, usize) {
        (std::mem::size_of::<F>(), std::mem::align_of::<F>())
    }

    /// Every connection holds three task futures for its whole life, so
    /// what they keep inline is memory per idle connection and cache lines
    /// per poll. Timers (512 bytes, aligned to 128), the TLS handshake and
    /// the injection write belong out of line; this fails when one moves
    /// back in (they were 2,816 / 2,688 / 2,176 bytes, aligned to 128).
    #[test]
    fn connection_tasks_keep_rare_state_out_of_line() {
        use monoio::io::{OwnedReadHalf, OwnedWriteHalf};
        type Read = OwnedReadHalf<TcpStream>;
        type Write = OwnedWriteHalf<TcpStream>;
        let requests = task_size(requests::<crate::NoopInspector, Read, Write>);
        let replies = task_size(replies::<crate::NoopInspector, Read, Write>);
        let serve = future_size(serve::<crate::NoopInspector>);
        for (name, (size, align)) in [
            ("requests", requests),
            ("replies", replies),
            ("serve", serve),
        ] {
            assert!(size <= 1280, "{name}: {size} bytes");
            assert!(align <= 16, "{name}: aligned to {align}");
        }
    }
}
