//! One client connection and its upstream connection: the two pumps
//! (client -> upstream and upstream -> client), request/reply correlation,
//! the inspector calls, rejected-request replies, injected requests, drain
//! and the close log line. Frames are forwarded as the exact bytes received.
//! The pumps run concurrently, each owning one reader and one writer, so a
//! write blocked in one direction never stops the other. The shared
//! in-flight map is locked only for short synchronous sections, never
//! across `.await`. Document contents are never logged.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Sleep;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::inflight::{InFlight, ReplyOwner};
use super::inspect::{
    CloseCause, ConnContext, InFlightRequest, InjectError, InjectRequest, Injector, Inspector,
    ReplyVerdict, Verdict as RequestVerdict, INJECT_QUEUE,
};
use super::tls::{self, ClientStream, UpstreamTls};
use super::unreachable;
use super::upstream::{DialError, HostPort};
use crate::metrics::{Direction, FrameSide, ProxyMetrics};
use sessionguard_protocol::wire::{self, Frame, FrameCodec, Message, MsgFlags, WireError};
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

/// State both pumps touch.
struct Shared<P> {
    in_flight: Mutex<InFlight<P>>,
    /// Signalled when the in-flight map may have become idle (for pending
    /// injections and for drain).
    became_idle: Notify,
    /// Frames each pump read, for the close line. Shared rather than
    /// returned: when one pump ends, the other is dropped mid-loop and its
    /// count would be lost.
    requests: AtomicU64,
    replies: AtomicU64,
}

impl<P> Shared<P> {
    fn lock(&self) -> MutexGuard<'_, InFlight<P>> {
        // A panic while holding this lock would be a bug in synchronous map
        // code; the map is still structurally sound, so keep going.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A freshly accepted client connection.
pub(crate) struct Accepted {
    pub id: u64,
    pub client: ClientStream,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// The listener's lifecycle signals: `drain` asks connections to finish
/// their in-flight work and close; `kill` closes them now.
#[derive(Clone)]
pub(crate) struct Lifecycle {
    pub drain: CancellationToken,
    pub kill: CancellationToken,
}

/// Serves connections for one inspector type, behind a trait object so the
/// accept loop has no type parameter (the replica-set decorator wraps the
/// inspector or not, decided at start). `serve` is monomorphised per
/// inspector, so the per-frame path calls the inspector statically and
/// keeps its `Pending` records inline; the one box is per connection.
pub(crate) trait ServeConnection: Send + Sync + 'static {
    fn serve_connection(
        self: Arc<Self>,
        accepted: Accepted,
        settings: Arc<ConnSettings>,
        lifecycle: Lifecycle,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

impl<I: Inspector> ServeConnection for I {
    fn serve_connection(
        self: Arc<Self>,
        accepted: Accepted,
        settings: Arc<ConnSettings>,
        lifecycle: Lifecycle,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(serve(accepted, settings, self, lifecycle))
    }
}

/// Serves one accepted client connection to completion.
pub(crate) async fn serve<I: Inspector>(
    accepted: Accepted,
    settings: Arc<ConnSettings>,
    inspector: Arc<I>,
    lifecycle: Lifecycle,
) {
    let Accepted {
        id,
        client,
        peer,
        local,
    } = accepted;
    let Lifecycle { drain, kill } = lifecycle;
    let opened_at = Instant::now();
    let _ = client.set_nodelay(true);
    debug!(conn = id, %peer, "connection opened");

    let dialed = tokio::select! {
        dialed = tls::connect(&settings.upstream, settings.connect_timeout, settings.upstream_tls.as_ref()) => dialed,
        _ = kill.cancelled() => return,
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
            let mut client = client;
            let answered = tokio::select! {
                answered = unreachable::answer_first_frame(
                    &mut client,
                    &errmsg,
                    settings.max_message_size,
                    settings.connect_timeout.min(settings.frame_read_timeout),
                ) => answered.as_str(),
                _ = kill.cancelled() => "shutdown",
            };
            let e = ConnError::from(e);
            warn!(conn = id, %peer, side = %e.side(), error = %e, answered, "connection closed: {e}");
            return;
        }
    };

    let (inject_tx, inject_rx) = mpsc::channel(INJECT_QUEUE);
    let ctx = ConnContext {
        id,
        peer,
        local,
        injector: Injector::new(inject_tx, settings.inject_timeout),
    };
    inspector.on_connect(&ctx);

    let shared = Shared {
        in_flight: Mutex::new(InFlight::default()),
        became_idle: Notify::new(),
        requests: AtomicU64::new(0),
        replies: AtomicU64::new(0),
    };
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let (local_tx, local_rx) = mpsc::channel::<Bytes>(4);

    let pumps = Pumps {
        ctx: &ctx,
        shared: &shared,
        inspector: inspector.as_ref(),
        settings: &settings,
        drain: &drain,
    };
    let (outcome, in_flight) = {
        let requests = pumps.client_to_upstream(
            FramedRead::new(client_read, FrameCodec::new(settings.max_message_size)),
            upstream_write,
            local_tx,
            inject_rx,
        );
        let replies = pumps.upstream_to_client(
            FramedRead::new(upstream_read, FrameCodec::new(settings.max_message_size)),
            client_write,
            local_rx,
        );
        tokio::pin!(requests, replies);
        let mut killed = polled_when_woken(kill.cancelled());
        let outcome = tokio::select! {
            biased;
            _ = killed.next() => Outcome::Killed,
            outcome = &mut requests => outcome,
            outcome = &mut replies => outcome,
        };
        // Told while both sockets are still open (they close when the pumps
        // are dropped at the end of this block): what the inspector
        // releases is released before the client can see the close and
        // retry on another connection.
        let still_in_flight = shared.lock().take_client_requests();
        let in_flight = still_in_flight.len();
        inspector.on_close(&ctx, outcome.cause(), still_in_flight);
        (outcome, in_flight)
    };

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
            requests = shared.requests.load(Ordering::Relaxed),
            replies = shared.replies.load(Ordering::Relaxed),
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

struct Pumps<'a, I: Inspector> {
    ctx: &'a ConnContext,
    shared: &'a Shared<I::Pending>,
    inspector: &'a I,
    settings: &'a ConnSettings,
    drain: &'a CancellationToken,
}

impl<I: Inspector> Pumps<'_, I> {
    /// Client -> upstream: reads requests, records those that expect a
    /// reply, asks the inspector, forwards (or answers a rejection), and
    /// sends queued injections when the connection is idle.
    async fn client_to_upstream<R, W>(
        &self,
        mut reader: FramedRead<R, FrameCodec>,
        mut upstream: W,
        local_tx: mpsc::Sender<Bytes>,
        mut inject_rx: mpsc::Receiver<InjectRequest>,
    ) -> Outcome
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut pending: VecDeque<InjectRequest> = VecDeque::new();
        // Created once: a fresh cancellation future per frame would register
        // and unregister a waiter on the token every time.
        let mut drain_started = polled_when_woken(self.drain.cancelled());
        // Set when `drain_started` fires (its first poll sees a drain that
        // began before this connection). Not `drain.is_cancelled()` per
        // frame: that locks the token, which every connection shares.
        let mut draining = false;
        loop {
            expire(&mut pending, self.settings.inject_timeout);
            if draining {
                for request in pending.drain(..) {
                    let _ = request.reply.send(Err(InjectError::Draining));
                }
                while let Ok(request) = inject_rx.try_recv() {
                    let _ = request.reply.send(Err(InjectError::Draining));
                }
                if self.shared.lock().idle_for_drain() {
                    return Outcome::Drained;
                }
            } else if let Some(frame) = self.take_injection(&mut pending) {
                if let Err(source) = upstream.write_all(&frame).await {
                    return Outcome::Failed(ConnError::Io {
                        side: Side::Upstream,
                        action: "writing",
                        source,
                    });
                }
                continue;
            }
            let next_deadline = pending.iter().map(|p| p.deadline).min();
            // Idleness only matters to a queued injection or a drain; the
            // reply pump signals it after every reply, and waking for that
            // on the hot path would cost a second pass per request.
            let awaiting_idle = draining || !pending.is_empty();

            let frame = tokio::select! {
                biased;
                _ = drain_started.next(), if !draining => {
                    draining = true;
                    continue;
                }
                _ = self.shared.became_idle.notified(), if awaiting_idle => continue,
                injected = inject_rx.recv(), if !draining => {
                    if let Some(request) = injected {
                        pending.push_back(request);
                    }
                    continue;
                }
                _ = sleep_until_opt(next_deadline), if next_deadline.is_some() => continue,
                frame = next_frame(&mut reader, self.settings.frame_read_timeout, Side::Client), if !draining => frame,
            };
            let frame = match frame {
                None => return Outcome::ClientClosed,
                Some(Err(e)) => return Outcome::Failed(e),
                Some(Ok(frame)) => frame,
            };
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            self.settings.metrics.frame(
                Direction::ClientToUpstream,
                frame.header.op_code,
                frame.bytes.len(),
            );

            let action = match self.inspect_request(&frame) {
                Ok(action) => action,
                Err(e) => return Outcome::Failed(e),
            };
            match action {
                RequestAction::Forward(record) => {
                    if let Some(record) = record {
                        // Recorded before forwarding so the reply can never
                        // arrive before its request is known.
                        if let Some(request_id) = self.shared.lock().insert_client(record) {
                            debug!(
                                conn = self.ctx.id,
                                request_id, "client reused a request id that was still in flight"
                            );
                        }
                    }
                    if let Err(source) = upstream.write_all(&frame.bytes).await {
                        return Outcome::Failed(ConnError::Io {
                            side: Side::Upstream,
                            action: "writing",
                            source,
                        });
                    }
                }
                RequestAction::Reject {
                    reply,
                    expects_reply,
                    legacy,
                } => {
                    // A moreToCome request expects no reply, so it gets none.
                    if !expects_reply {
                        continue;
                    }
                    let reply_id = self.shared.lock().next_proxy_id();
                    let request_id = frame.header.request_id;
                    let bytes = if legacy {
                        wire::legacy::encode_reply(reply_id, request_id, 0, 0, &[&reply])
                    } else {
                        wire::op_msg::encode(reply_id, request_id, MsgFlags::default(), &reply)
                    };
                    if local_tx.send(bytes).await.is_err() {
                        return Outcome::Failed(ConnError::Internal("reply pump stopped"));
                    }
                }
            }
        }
    }

    /// Pops the oldest pending injection if the connection is idle, records
    /// it as in flight and returns the frame to write.
    fn take_injection(&self, pending: &mut VecDeque<InjectRequest>) -> Option<Bytes> {
        if pending.is_empty() {
            return None;
        }
        let mut map = self.shared.lock();
        if !map.idle_for_inject() {
            return None;
        }
        let request = pending.pop_front()?;
        let id = map.next_proxy_id();
        map.insert_injected(id, request.reply);
        drop(map);
        Some(wire::op_msg::encode(
            id,
            0,
            MsgFlags::default(),
            &request.body,
        ))
    }

    fn inspect_request(&self, frame: &Frame) -> Result<RequestAction<I::Pending>, ConnError> {
        let malformed = |source| ConnError::Malformed {
            side: Side::Client,
            source,
        };
        let opened = wire::open(frame, self.settings.max_message_size).map_err(malformed)?;
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
            self.settings.metrics.command(command_metric);
        }
        // Before the inspector runs: its time is part of the round trip.
        let started = Instant::now();
        Ok(match self.inspector.on_request(self.ctx, frame, &msg) {
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

    /// Upstream -> client: reads replies, matches them to requests, hands
    /// injected replies to their waiters, asks the inspector, forwards.
    async fn upstream_to_client<R, W>(
        &self,
        mut reader: FramedRead<R, FrameCodec>,
        mut client: W,
        mut local_rx: mpsc::Receiver<Bytes>,
    ) -> Outcome
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let client_write_error = |source| ConnError::Io {
            side: Side::Client,
            action: "writing",
            source,
        };
        loop {
            let frame = tokio::select! {
                biased;
                local = local_rx.recv() => {
                    if let Some(bytes) = local {
                        if let Err(e) = client.write_all(&bytes).await {
                            return Outcome::Failed(client_write_error(e));
                        }
                    }
                    continue;
                }
                frame = next_frame(&mut reader, self.settings.frame_read_timeout, Side::Upstream) => frame,
            };
            let frame = match frame {
                None => return Outcome::UpstreamClosed,
                Some(Err(e)) => return Outcome::Failed(e),
                Some(Ok(frame)) => frame,
            };
            self.shared.replies.fetch_add(1, Ordering::Relaxed);
            self.settings.metrics.frame(
                Direction::UpstreamToClient,
                frame.header.op_code,
                frame.bytes.len(),
            );

            let (to_client, became_idle) = match self.inspect_reply(&frame) {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(e),
            };
            if let Some(bytes) = to_client {
                if let Err(e) = client.write_all(&bytes).await {
                    return Outcome::Failed(client_write_error(e));
                }
            }
            // Only after the reply reached the client: a draining
            // connection closes when woken, and must not cut it off.
            if became_idle {
                self.shared.became_idle.notify_one();
            }
        }
    }

    /// Records the latency of a request's first reply. Awaitable hellos wait
    /// for a topology change on purpose, so they would only blur the
    /// histogram; later replies of an exhaust stream are not round trips.
    fn observe_round_trip(&self, request: &InFlightRequest<I::Pending>, more_to_come: bool) {
        let first_reply = request.streamed_replies <= u32::from(more_to_come);
        if request.awaitable_hello || !first_reply {
            return;
        }
        if request.command.is_some() {
            self.settings
                .metrics
                .round_trip(request.command_metric, request.started.elapsed());
        }
    }

    /// Returns the bytes to send to the client (None for injected replies)
    /// and whether the in-flight map may now be idle.
    fn inspect_reply(&self, frame: &Frame) -> Result<(Option<Bytes>, bool), ConnError> {
        let malformed = |source| ConnError::Malformed {
            side: Side::Upstream,
            source,
        };
        let opened = wire::open(frame, self.settings.max_message_size).map_err(malformed)?;
        let msg = opened.parse(frame).map_err(malformed)?;
        let more_to_come = matches!(&msg, Message::Msg(m) if m.flags.more_to_come());

        let mut map = self.shared.lock();
        let owner = map.on_reply(
            frame.header.response_to,
            frame.header.request_id,
            more_to_come,
        );
        let became_idle = map.idle_for_inject() || map.idle_for_drain();
        let verdict = match owner {
            ReplyOwner::Injected(waiter) => {
                drop(map);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(frame.bytes.clone()));
                }
                return Ok((None, became_idle));
            }
            ReplyOwner::Client(mut request) => {
                // Complete: the record is ours now, and dropped after this.
                drop(map);
                self.observe_round_trip(&request, more_to_come);
                self.inspector
                    .on_reply(self.ctx, Some(&mut request), frame, &msg)
            }
            ReplyOwner::Streaming(key) => {
                // The stream continues: the record stays in the table, so
                // the inspector updates it there, under the lock (a
                // synchronous call; the other pump only ever waits for
                // short sections). Exhaust streams only.
                let request = map.client_mut(key);
                if let Some(request) = &request {
                    self.observe_round_trip(request, more_to_come);
                }
                self.inspector.on_reply(self.ctx, request, frame, &msg)
            }
            ReplyOwner::Unmatched => {
                drop(map);
                debug!(
                    conn = self.ctx.id,
                    response_to = frame.header.response_to,
                    op = frame.header.op_code.name(),
                    "reply matches no request in flight; forwarding it anyway"
                );
                self.inspector.on_reply(self.ctx, None, frame, &msg)
            }
        };
        let bytes = match verdict {
            ReplyVerdict::Forward => frame.bytes.clone(),
            ReplyVerdict::Replace(bytes) => bytes,
        };
        Ok((Some(bytes), became_idle))
    }
}

/// Reads the next frame. An idle connection waits forever; once part of a
/// frame has arrived, the rest must come within `frame_timeout`. Cancel-safe
/// (the partial frame stays in the reader's buffer).
///
/// The timer is armed only while a partial frame is buffered: most frames
/// arrive whole in one read, and registering and cancelling a timer around
/// every read would cost two timer-wheel operations per frame.
async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut FramedRead<R, FrameCodec>,
    frame_timeout: Duration,
    side: Side,
) -> Option<Result<Frame, ConnError>> {
    let mut partial_deadline: Option<Pin<Box<Sleep>>> = None;
    let next = poll_fn(|cx| {
        if let Poll::Ready(item) = reader.poll_next_unpin(cx) {
            return Poll::Ready(item.map(|result| result.map_err(|e| read_error(side, e))));
        }
        if reader.read_buffer().is_empty() {
            partial_deadline = None;
            return Poll::Pending;
        }
        let deadline =
            partial_deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(frame_timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(ConnError::FrameTimeout {
                side,
                timeout: frame_timeout,
            }))),
            Poll::Pending => Poll::Pending,
        }
    });
    next.await
}

fn read_error(side: Side, error: WireError) -> ConnError {
    match error {
        WireError::Io(source) => ConnError::Io {
            side,
            action: "reading",
            source,
        },
        source => ConnError::Malformed { side, source },
    }
}

/// Wraps a rarely-ready future (shutdown, drain) so the task polls it only
/// after its own waker fired. Every wake-up of a connection task polls
/// every branch of its `select!`, and polling a cancellation future takes
/// the token's locks each time: once per frame, for a signal that comes
/// once per process.
fn polled_when_woken<F: Future>(future: F) -> FuturesUnordered<F> {
    std::iter::once(future).collect()
}

/// Fails queued injections whose deadline passed.
fn expire(pending: &mut VecDeque<InjectRequest>, timeout: Duration) {
    if pending.is_empty() {
        return;
    }
    let now = tokio::time::Instant::now();
    let mut index = 0;
    while index < pending.len() {
        if pending[index].deadline > now {
            index += 1;
            continue;
        }
        if let Some(request) = pending.remove(index) {
            // The waiter may already have given up on its own timer; the
            // send then fails, which is fine.
            let _ = request.reply.send(Err(InjectError::Timeout(timeout)));
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
