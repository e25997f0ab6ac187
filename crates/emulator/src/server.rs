//! Listeners and connections: accepts clients, splits their byte streams into
//! frames with [`sessionguard_protocol::wire`], answers each request in order (handshake
//! here, everything else via `commands`), applies the configured latency
//! without holding any lock, and runs the streaming (exhaust) hello protocol.
//! With `EmulatorConfig::tls` each connection's TLS handshake runs in its own
//! task; with `users`, each connection carries its SCRAM state (`auth`).
//! Every reply of a replica-set member or mongos is stamped with
//! `$clusterTime` / `operationTime` here. A write blocked by a transaction's
//! document lock waits here (no lock held) until a transaction ends or its
//! `maxTimeMS` runs out; a getMore with `exhaustAllowed` is streamed here.
//! A malformed frame closes that one connection with a WARN line; a peer
//! that resets or closes mid-frame is ordinary and logged at debug.
//!
//! Faults are carried out here: a `failCommand` fail point (`faults.rs`) is
//! asked before each OP_MSG command (after the authentication check, hello
//! and the SASL commands included) and may make the connection wait, close
//! without a reply, answer an error, decorate the reply or close instead of
//! sending it (the command having run). A member's "disconnect" signal
//! (`replSetStepDown`) closes every connection of that member, each after
//! the reply it is writing; a wait (latency, blocked write, awaitable hello,
//! fail point block) ends at once, except the step-down's own reply, which
//! is sent after its latency before its connection closes. An
//! unacknowledged (`moreToCome`) write refused as not primary closes its
//! connection, as a 4.2+ server does so the client notices. Legacy OP_QUERY hellos (the handshake most drivers
//! open with) are failed like OP_MSG ones.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::Document;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::codec::FramedRead;

use super::auth::{self, ConnAuth};
use super::commands::{self, Outcome, Request, Resume};
use super::deployment::EmulatorState;
use super::errors::{self, CommandError};
use super::faults::{AfterExecution, Fault};
use super::hello::{self, AwaitParams, HelloContext};
use super::query::as_i64;
use sessionguard_protocol::command::is_hello;
use sessionguard_protocol::wire::{
    self, op_msg, Compressor, Frame, FrameCodec, Message, MsgFlags, OpCode, WireError,
};

/// Commands whose replies are never compressed (OP_COMPRESSED spec).
const NEVER_COMPRESSED: &[&str] = &[
    "hello",
    "isMaster",
    "ismaster",
    "saslStart",
    "saslContinue",
    "getnonce",
    "authenticate",
    "createUser",
    "updateUser",
    "copydbSaslStart",
    "copydbgetnonce",
    "copydb",
];

/// Commands exempt from `reply_latency` (monitoring and shutdown stay fast).
const LATENCY_EXEMPT: &[&str] = &[
    "hello",
    "isMaster",
    "ismaster",
    "ping",
    "buildInfo",
    "buildinfo",
    "endSessions",
];

/// OP_REPLY responseFlags bit the server sets on handshake replies.
const AWAIT_CAPABLE: i32 = 8;

/// A running emulator listener.
pub struct EmulatorHandle {
    addr: SocketAddr,
    member: usize,
    state: Arc<EmulatorState>,
    shutdown_tx: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl EmulatorHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The shared state (to start more members over the same data set).
    pub fn state(&self) -> Arc<EmulatorState> {
        self.state.clone()
    }
    /// Exact bytes of every received frame (requires `record_frames`).
    pub fn received_frames(&self) -> Vec<Bytes> {
        self.state.received_frames()
    }
    /// Every client address that connected (to any member of the state).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.state.peers()
    }
    /// Commands received by name (as sent: "isMaster" and "hello" differ).
    pub fn command_count(&self, name: &str) -> u64 {
        self.state.command_count(name)
    }
    /// lsids named by endSessions so far.
    pub fn ended_session_count(&self) -> u64 {
        self.state.ended_session_count()
    }
    /// lsids named by refreshSessions so far.
    pub fn refreshed_session_count(&self) -> u64 {
        self.state.refreshed_session_count()
    }
    /// Makes this member primary (or not): bumps topologyVersion.counter and
    /// wakes streaming hellos.
    pub fn set_primary(&self, is_primary: bool) {
        self.state.set_primary(self.member, is_primary);
    }
    /// This listener's index among the members of its state (start order).
    pub fn member(&self) -> usize {
        self.member
    }
    /// Whether this member is the primary now.
    pub fn is_primary(&self) -> bool {
        self.state.primary_member() == Some(self.member)
    }
    /// Closes every client connection of this member (each after the reply
    /// it is writing), as a failing-over primary or a network cut would.
    pub fn close_connections(&self) {
        self.state.disconnect_member(self.member);
    }
    /// Runs `configureFailPoint` (the same command a client would send to
    /// `admin`); returns its reply or error document.
    pub fn configure_fail_point(&self, command: &Document) -> Document {
        self.state
            .fail_points
            .configure("admin", command)
            .unwrap_or_else(|e| e.to_document())
    }
    /// How many commands a fail point has failed so far.
    pub fn fail_point_entered(&self) -> u64 {
        self.state.fail_points.entered()
    }
    /// Stops accepting and closes every connection of this listener.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

pub(crate) async fn start_listener(
    listen: SocketAddr,
    state: Arc<EmulatorState>,
) -> std::io::Result<EmulatorHandle> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    // A wildcard bind is advertised on loopback so clients can dial it back.
    let advertised = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
    } else {
        addr
    };
    let member = state.register_member(advertised.to_string());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, state.clone(), member, shutdown_rx));
    tracing::debug!(%addr, member, "emulator listener started");
    Ok(EmulatorHandle {
        addr,
        member,
        state,
        shutdown_tx,
        task: Some(task),
    })
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<EmulatorState>,
    member: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    state.add_peer(peer);
                    let _ = stream.set_nodelay(true);
                    match state.config().tls.clone() {
                        None => {
                            connections.spawn(serve_connection(stream, peer, state.clone(), member, shutdown.clone()));
                        }
                        Some(tls) => {
                            let state = state.clone();
                            let shutdown = shutdown.clone();
                            connections.spawn(async move {
                                match tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                                    Ok(stream) => serve_connection(stream, peer, state, member, shutdown).await,
                                    Err(e) => tracing::debug!(%peer, error = %e, "emulator TLS handshake failed"),
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "emulator accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// Per-connection facts.
struct Connection {
    state: Arc<EmulatorState>,
    member: usize,
    connection_id: i32,
    peer: SocketAddr,
    compression: Option<Compressor>,
    auth: ConnAuth,
    /// `client.application.name` of the handshake (fail points filter on it).
    app_name: Option<String>,
    /// The reply being sent answers this connection's own `replSetStepDown`:
    /// the disconnect that step-down signalled closes this connection after
    /// the reply, not during its latency wait.
    answers_step_down: bool,
}

/// When a connection must stop: the listener shuts down, or its member
/// closes every connection (a step-down).
struct Stop {
    shutdown: watch::Receiver<bool>,
    disconnect: watch::Receiver<u64>,
}

impl Stop {
    /// Resolves when the connection must close.
    async fn stopped(&mut self) {
        tokio::select! {
            _ = self.shutdown.changed() => {}
            _ = self.disconnect.changed() => {}
        }
    }

    /// Whether it must close now (checked before reading another request,
    /// so a step-down's own connection closes right after its reply).
    fn is_stopped(&self) -> bool {
        *self.shutdown.borrow() || self.disconnect.has_changed().unwrap_or(true)
    }

    /// Sleeps `delay`; false if the connection must close meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        if delay.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.stopped() => false,
        }
    }

    /// Sleeps `delay` before a step-down's own reply: only a shutdown cuts
    /// it (the member's disconnect is this very command's doing; the loop
    /// closes the connection once the reply is written).
    async fn pause_before_step_down_reply(&mut self, delay: Duration) -> bool {
        if delay.is_zero() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.shutdown.changed() => false,
        }
    }
}

/// What to do after handling one request.
enum Action {
    Reply {
        bytes: Bytes,
        delay: Duration,
    },
    NoReply,
    AwaitHello(AwaitingHello),
    Blocked(BlockedWrite),
    Exhaust(ExhaustGetMore),
    /// A fail point's `blockConnection`: wait, then answer the request.
    Pause {
        wait: Duration,
        request: Box<Deferred>,
        fault: Fault,
    },
    /// Close the connection without a reply.
    Close,
}

/// How a reply to one request is framed.
#[derive(Clone)]
struct ReplyTo {
    request_id: i32,
    name: String,
    compressor: Option<Compressor>,
    /// The request had `moreToCome`: it gets no reply.
    silent: bool,
    /// What a fail point does once the command has run.
    after: AfterExecution,
}

/// A request whose answer waits for a fail point's block.
enum Deferred {
    Msg(MsgRequest),
    Query(QueryHello),
}

impl Deferred {
    fn name(&self) -> &str {
        match self {
            Deferred::Msg(m) => &m.name,
            Deferred::Query(q) => &q.name,
        }
    }
}

/// A legacy OP_QUERY hello (the handshake most drivers open with).
struct QueryHello {
    request_id: i32,
    name: String,
    body: Document,
}

/// One OP_MSG request, parsed.
struct MsgRequest {
    name: String,
    /// `Err`: the request had no `$db`.
    db: Option<String>,
    body: Document,
    sequences: Vec<(String, Vec<Document>)>,
    reply_to: ReplyTo,
    exhaust_allowed: bool,
}

/// A write outside any transaction waiting for a transaction's document
/// lock (the server retries such write conflicts until the lock is gone).
struct BlockedWrite {
    request: Request,
    resume: Resume,
    transaction_ended: watch::Receiver<u64>,
    deadline: Option<Instant>,
    reply_to: ReplyTo,
}

/// A getMore with `exhaustAllowed` whose first reply (with `moreToCome`)
/// is ready: the rest of the cursor follows without further requests.
struct ExhaustGetMore {
    request: Request,
    first: Bytes,
    first_id: i32,
    reply_to: ReplyTo,
    delay: Duration,
}

/// How often a blocked write looks again even without a signal.
const BLOCKED_RECHECK: Duration = Duration::from_millis(100);

struct AwaitingHello {
    request_id: i32,
    command_name: String,
    body: Document,
    params: AwaitParams,
    exhaust: bool,
}

enum StreamEnd {
    Done,
    Closed,
    Interrupted(Frame),
}

/// How a blocked write ended.
enum BlockedEnd {
    /// The connection must close (shutdown, step-down, or a fail point's
    /// `closeConnectionAfterExecution`).
    Close,
    /// The request had `moreToCome`.
    Silent,
    Reply(Bytes, Duration),
}

/// Smallest wait between two streamed hello replies, so a client asking for
/// maxAwaitTimeMS 0 with exhaustAllowed is not flooded.
const MIN_STREAM_INTERVAL: Duration = Duration::from_millis(10);

/// Serves one client over any byte stream (plain TCP or TLS) until it
/// closes, sends a malformed frame, the listener stops or its member closes
/// every connection.
pub(crate) async fn serve_connection<S>(
    stream: S,
    peer: SocketAddr,
    state: Arc<EmulatorState>,
    member: usize,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let connection_id = state.next_connection_id();
    let max = state.config().max_message_size;
    let (read, mut write) = tokio::io::split(stream);
    let mut frames = FramedRead::new(read, FrameCodec::new(max));
    let mut stop = Stop {
        shutdown,
        disconnect: state.subscribe_disconnect(member),
    };
    let mut conn = Connection {
        state,
        member,
        connection_id,
        peer,
        compression: None,
        auth: ConnAuth::default(),
        app_name: None,
        answers_step_down: false,
    };
    tracing::debug!(%peer, connection_id, "emulator connection opened");
    let mut pending: Option<Frame> = None;
    'connection: loop {
        if stop.is_stopped() {
            break;
        }
        let frame = match pending.take() {
            Some(frame) => frame,
            None => tokio::select! {
                biased;
                _ = stop.stopped() => break,
                next = frames.next() => match next {
                    None => break,
                    Some(Ok(frame)) => {
                        conn.state.record_frame(&frame.bytes);
                        frame
                    }
                    Some(Err(e)) => {
                        log_read_error(peer, connection_id, &e);
                        break;
                    }
                },
            },
        };
        let mut action = handle_frame(&mut conn, &frame);
        loop {
            match action {
                Err(reason) => {
                    tracing::warn!(%peer, connection_id, %reason, "malformed request; closing emulator connection");
                    break 'connection;
                }
                Ok(Action::Pause {
                    wait,
                    request,
                    fault,
                }) => {
                    tracing::debug!(%peer, connection_id, command = %request.name(), wait_ms = wait.as_millis() as u64, "fail point blocks the connection");
                    if !stop.pause(wait).await {
                        break 'connection;
                    }
                    action = match *request {
                        Deferred::Msg(request) => answer_msg(&mut conn, request, fault),
                        Deferred::Query(hello) => answer_query_hello(&mut conn, hello, fault),
                    };
                    continue;
                }
                Ok(Action::Close) => {
                    tracing::debug!(%peer, connection_id, "emulator closes the connection without a reply");
                    break 'connection;
                }
                Ok(Action::NoReply) => {}
                Ok(Action::Reply { bytes, delay }) => {
                    let waited = if std::mem::take(&mut conn.answers_step_down) {
                        stop.pause_before_step_down_reply(delay).await
                    } else {
                        stop.pause(delay).await
                    };
                    if !waited || write.write_all(&bytes).await.is_err() {
                        break 'connection;
                    }
                }
                Ok(Action::AwaitHello(awaiting)) => {
                    match stream_hello(&conn, &mut frames, &mut write, awaiting, &mut stop).await {
                        StreamEnd::Done => {}
                        StreamEnd::Closed => break 'connection,
                        StreamEnd::Interrupted(frame) => pending = Some(frame),
                    }
                }
                Ok(Action::Blocked(blocked)) => {
                    match finish_blocked(&conn, blocked, &mut stop).await {
                        BlockedEnd::Close => break 'connection,
                        BlockedEnd::Silent => {}
                        BlockedEnd::Reply(bytes, delay) => {
                            if !stop.pause(delay).await || write.write_all(&bytes).await.is_err() {
                                break 'connection;
                            }
                        }
                    }
                }
                Ok(Action::Exhaust(exhaust)) => {
                    if stream_get_more(&conn, &mut write, exhaust, &mut stop)
                        .await
                        .is_err()
                    {
                        break 'connection;
                    }
                }
            }
            break;
        }
    }
    tracing::debug!(%peer, connection_id, "emulator connection closed");
}

/// A peer resetting or closing its socket (even mid-frame) is ordinary:
/// drivers destroy sockets on close. Only a frame that is really malformed
/// earns a warning.
fn log_read_error(peer: SocketAddr, connection_id: i32, error: &WireError) {
    use std::io::ErrorKind;
    match error {
        WireError::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
                    | ErrorKind::NotConnected
            ) =>
        {
            tracing::debug!(%peer, connection_id, error = %error, "peer closed the connection; closing emulator connection");
        }
        _ => {
            tracing::warn!(%peer, connection_id, error = %error, "malformed frame; closing emulator connection");
        }
    }
}

/// Waits until the blocked write can run (a transaction ended) and runs it.
async fn finish_blocked(
    conn: &Connection,
    mut blocked: BlockedWrite,
    stop: &mut Stop,
) -> BlockedEnd {
    tracing::debug!(peer = %conn.peer, connection_id = conn.connection_id, command = %blocked.reply_to.name, "write waits for a transaction's document lock");
    let mut reply = loop {
        let wait = match blocked.deadline {
            Some(deadline) => {
                BLOCKED_RECHECK.min(deadline.saturating_duration_since(Instant::now()))
            }
            None => BLOCKED_RECHECK,
        };
        tokio::select! {
            _ = blocked.transaction_ended.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.stopped() => return BlockedEnd::Close,
        }
        match commands::execute(
            &conn.state,
            conn.member,
            &blocked.request,
            &mut blocked.resume,
        ) {
            Outcome::Reply(reply) => break reply,
            Outcome::Blocked => {
                if blocked.deadline.is_some_and(|d| Instant::now() >= d) {
                    break CommandError::new(
                        errors::MAX_TIME_MS_EXPIRED,
                        "operation exceeded time limit",
                    )
                    .to_document();
                }
            }
        }
    };
    let to = &blocked.reply_to;
    commands::after_execution(&to.name, &blocked.request.body, &to.after, &mut reply);
    if to.after.close {
        return BlockedEnd::Close;
    }
    if to.silent {
        return BlockedEnd::Silent;
    }
    conn.state.stamp(&mut reply);
    let reply_id = conn.state.next_request_id();
    match encode_reply(reply_id, to, MsgFlags(0), &reply) {
        Some(bytes) => BlockedEnd::Reply(bytes, latency(conn, &to.name)),
        None => BlockedEnd::Close,
    }
}

/// Sends the first exhaust reply, then every further batch of the cursor
/// unasked, each with `moreToCome` but the last, each answering the
/// previous reply (OP_MSG spec, exhaustAllowed). `Err`: the client is gone.
async fn stream_get_more<W: AsyncWrite + Unpin>(
    conn: &Connection,
    write: &mut W,
    exhaust: ExhaustGetMore,
    stop: &mut Stop,
) -> Result<(), ()> {
    let ExhaustGetMore {
        request,
        first,
        first_id,
        reply_to,
        delay,
    } = exhaust;
    if !stop.pause(delay).await {
        return Err(());
    }
    write.write_all(&first).await.map_err(|_| ())?;
    let mut previous = first_id;
    loop {
        if stop.is_stopped() {
            return Err(());
        }
        let mut reply =
            match commands::execute(&conn.state, conn.member, &request, &mut Resume::default()) {
                Outcome::Reply(reply) => reply,
                Outcome::Blocked => {
                    CommandError::new(errors::COMMAND_NOT_FOUND, "getMore cannot block")
                        .to_document()
                }
            };
        let more = cursor_continues(&reply);
        conn.state.stamp(&mut reply);
        let reply_id = conn.state.next_request_id();
        let flags = MsgFlags(if more { MsgFlags::MORE_TO_COME } else { 0 });
        let to = ReplyTo {
            request_id: previous,
            ..reply_to.clone()
        };
        let bytes = encode_reply(reply_id, &to, flags, &reply).ok_or(())?;
        if !stop.pause(delay).await {
            return Err(());
        }
        write.write_all(&bytes).await.map_err(|_| ())?;
        if !more {
            return Ok(());
        }
        previous = reply_id;
    }
}

/// An ok cursor reply whose cursor is still open.
fn cursor_continues(reply: &Document) -> bool {
    reply.get_f64("ok") == Ok(1.0)
        && reply
            .get_document("cursor")
            .is_ok_and(|c| c.get_i64("id").is_ok_and(|id| id != 0))
}

/// Encodes an OP_MSG reply, compressed like the request unless the
/// command's replies are never compressed.
fn encode_reply(reply_id: i32, to: &ReplyTo, flags: MsgFlags, reply: &Document) -> Option<Bytes> {
    let encoded = encode_msg(reply_id, to.request_id, flags, reply)?;
    Some(match to.compressor {
        Some(compressor) if !NEVER_COMPRESSED.contains(&to.name.as_str()) => {
            wire::op_compressed::compress(
                reply_id,
                to.request_id,
                OpCode::Msg,
                compressor,
                encoded.get(wire::HEADER_LEN..).unwrap_or_default(),
            )
        }
        _ => encoded,
    })
}

/// Answers awaitable hellos: waits while the client's topologyVersion is
/// current (up to maxAwaitTimeMS or a topology change), then replies; with
/// exhaustAllowed keeps replying (moreToCome set, each reply's responseTo
/// the previous reply's requestID) until the client goes away.
async fn stream_hello<S: AsyncRead + AsyncWrite>(
    conn: &Connection,
    frames: &mut FramedRead<ReadHalf<S>, FrameCodec>,
    write: &mut WriteHalf<S>,
    awaiting: AwaitingHello,
    stop: &mut Stop,
) -> StreamEnd {
    let AwaitingHello {
        request_id,
        command_name,
        body,
        mut params,
        exhaust,
    } = awaiting;
    let mut response_to = request_id;
    loop {
        let mut changed = conn.state.subscribe_topology();
        let wait = if exhaust {
            params.max_await.max(MIN_STREAM_INTERVAL)
        } else {
            params.max_await
        };
        if hello::is_current(&params, &conn.state.topology()) {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changed.changed() => {}
                next = frames.next() => return match next {
                    Some(Ok(frame)) => {
                        conn.state.record_frame(&frame.bytes);
                        StreamEnd::Interrupted(frame)
                    }
                    None => StreamEnd::Closed,
                    Some(Err(e)) => {
                        log_read_error(conn.peer, conn.connection_id, &e);
                        StreamEnd::Closed
                    }
                },
                _ = stop.stopped() => return StreamEnd::Closed,
            }
        }
        let ctx = HelloContext {
            state: &conn.state,
            member: conn.member,
            connection_id: conn.connection_id,
        };
        let mut reply = hello::hello_reply(&ctx, &command_name, &body, None);
        conn.state.stamp(&mut reply);
        if let Some(sent) = hello::await_params(&with_await(&reply, params.max_await)) {
            params = sent;
        }
        let reply_id = conn.state.next_request_id();
        let flags = if exhaust {
            MsgFlags(MsgFlags::MORE_TO_COME)
        } else {
            MsgFlags(0)
        };
        let Some(bytes) = encode_msg(reply_id, response_to, flags, &reply) else {
            return StreamEnd::Closed;
        };
        if write.write_all(&bytes).await.is_err() {
            return StreamEnd::Closed;
        }
        if !exhaust {
            return StreamEnd::Done;
        }
        response_to = reply_id;
    }
}

/// The reply's topologyVersion in the shape `await_params` reads.
fn with_await(reply: &Document, max_await: Duration) -> Document {
    let mut probe = Document::new();
    if let Ok(tv) = reply.get_document("topologyVersion") {
        probe.insert("topologyVersion", tv.clone());
    }
    probe.insert(
        "maxAwaitTimeMS",
        i64::try_from(max_await.as_millis()).unwrap_or(i64::MAX),
    );
    probe
}

fn to_bytes(doc: &Document) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    doc.to_writer(&mut bytes).ok()?;
    Some(bytes)
}

fn encode_msg(
    request_id: i32,
    response_to: i32,
    flags: MsgFlags,
    reply: &Document,
) -> Option<Bytes> {
    Some(op_msg::encode(
        request_id,
        response_to,
        flags,
        &to_bytes(reply)?,
    ))
}

/// This connection's hello reply, with its authentication fields.
fn hello_for(conn: &mut Connection, name: &str, body: &Document) -> Document {
    let ctx = HelloContext {
        state: &conn.state,
        member: conn.member,
        connection_id: conn.connection_id,
    };
    let mut reply = hello::hello_reply(&ctx, name, body, conn.compression);
    add_auth_to_hello(conn, body, &mut reply);
    reply
}

/// hello's authentication fields: `saslSupportedMechs` and the first SCRAM
/// step of `speculativeAuthenticate`, when the client asked for them.
fn add_auth_to_hello(conn: &mut Connection, request: &Document, reply: &mut Document) {
    let state = conn.state.clone();
    let users = &state.config().users;
    if let Some(mechs) = auth::supported_mechs(users, request) {
        reply.insert("saslSupportedMechs", mechs);
    }
    if !state.config().speculative_auth {
        return;
    }
    if let Some(first_step) = conn.auth.speculative(users, request) {
        reply.insert("speculativeAuthenticate", first_step);
    }
}

/// A command's `maxTimeMS`, when positive.
fn max_time(body: &Document) -> Option<Duration> {
    let ms = as_i64(body.get("maxTimeMS"))?;
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

fn latency(conn: &Connection, name: &str) -> Duration {
    let config = conn.state.config();
    match config.command_latency.get(name) {
        Some(d) => *d,
        None if LATENCY_EXEMPT.contains(&name) => Duration::ZERO,
        None => config.reply_latency,
    }
}

/// Keeps the handshake's `client.application.name` (the first hello has it).
fn remember_app_name(conn: &mut Connection, body: &Document) {
    if conn.app_name.is_some() {
        return;
    }
    if let Ok(name) = body
        .get_document("client")
        .and_then(|c| c.get_document("application"))
        .and_then(|a| a.get_str("name"))
    {
        conn.app_name = Some(name.to_string());
    }
}

/// Answers one parsed OP_MSG request, carrying out what the fail point
/// says (`fault`, its wait already done).
fn answer_msg(conn: &mut Connection, request: MsgRequest, fault: Fault) -> Result<Action, String> {
    let MsgRequest {
        name,
        db,
        body,
        sequences,
        mut reply_to,
        exhaust_allowed,
    } = request;
    if fault.close {
        return Ok(Action::Close);
    }
    reply_to.after = fault.after;
    let mut reply = match (db, fault.error) {
        (None, _) => {
            CommandError::new(errors::MISSING_DB, "OP_MSG requests require a $db argument")
                .to_document()
        }
        (Some(_), Some(injected)) => {
            commands::injected_error(&conn.state, &name, &body, conn.auth.user(), &injected)
        }
        (Some(db), None) => {
            tracing::debug!(peer = %conn.peer, connection_id = conn.connection_id, command = %name, db, "emulator command");
            if is_hello(&name) {
                if body.contains_key("compression") {
                    conn.compression = hello::negotiate_compression(&body);
                }
                if let Some(params) = hello::await_params(&body) {
                    if !reply_to.silent {
                        return Ok(Action::AwaitHello(AwaitingHello {
                            request_id: reply_to.request_id,
                            command_name: name,
                            body,
                            params,
                            exhaust: exhaust_allowed,
                        }));
                    }
                }
                hello_for(conn, &name, &body)
            } else {
                let users = &conn.state.config().users;
                match conn.auth.intercept(users, &name, &db, &body) {
                    Some(reply) => reply,
                    None => {
                        let request = Request {
                            name: name.clone(),
                            db,
                            body,
                            sequences,
                            user: conn.auth.user().map(str::to_owned),
                        };
                        // Subscribed before trying (whatever the command: a
                        // watch subscribe is cheap), so a transaction ending
                        // right after the try still wakes a blocked write.
                        let transaction_ended = conn.state.subscribe_transaction_ended();
                        let mut resume = Resume::default();
                        match commands::execute(&conn.state, conn.member, &request, &mut resume) {
                            Outcome::Reply(mut reply) => {
                                commands::after_execution(
                                    &name,
                                    &request.body,
                                    &reply_to.after,
                                    &mut reply,
                                );
                                if reply_to.after.close {
                                    return Ok(Action::Close);
                                }
                                let exhaust = name == "getMore"
                                    && exhaust_allowed
                                    && !reply_to.silent
                                    && cursor_continues(&reply);
                                if exhaust {
                                    conn.state.stamp(&mut reply);
                                    let first_id = conn.state.next_request_id();
                                    let first = encode_reply(
                                        first_id,
                                        &reply_to,
                                        MsgFlags(MsgFlags::MORE_TO_COME),
                                        &reply,
                                    )
                                    .ok_or_else(|| "reply could not be encoded".to_string())?;
                                    return Ok(Action::Exhaust(ExhaustGetMore {
                                        request,
                                        first,
                                        first_id,
                                        delay: latency(conn, &name),
                                        reply_to,
                                    }));
                                }
                                if reply_to.silent && refused_as_not_primary(&reply) {
                                    // An unacknowledged write to a secondary:
                                    // the server hangs up so the client notices.
                                    tracing::debug!(peer = %conn.peer, connection_id = conn.connection_id, command = %name, "unacknowledged write refused as not primary; closing the connection");
                                    return Ok(Action::Close);
                                }
                                conn.answers_step_down = name == "replSetStepDown"
                                    && !reply_to.silent
                                    && reply.get_f64("ok") == Ok(1.0);
                                reply
                            }
                            Outcome::Blocked => {
                                let deadline = max_time(&request.body).map(|d| Instant::now() + d);
                                return Ok(Action::Blocked(BlockedWrite {
                                    request,
                                    resume,
                                    transaction_ended,
                                    deadline,
                                    reply_to,
                                }));
                            }
                        }
                    }
                }
            }
        }
    };
    if reply_to.silent {
        return Ok(Action::NoReply);
    }
    conn.state.stamp(&mut reply);
    let reply_id = conn.state.next_request_id();
    let bytes = encode_reply(reply_id, &reply_to, MsgFlags(0), &reply)
        .ok_or_else(|| "reply could not be encoded".to_string())?;
    Ok(Action::Reply {
        bytes,
        delay: latency(conn, &name),
    })
}

/// Answers a legacy OP_QUERY hello, carrying out what the fail point says.
fn answer_query_hello(
    conn: &mut Connection,
    hello: QueryHello,
    fault: Fault,
) -> Result<Action, String> {
    let QueryHello {
        request_id,
        name,
        body,
    } = hello;
    if fault.close {
        return Ok(Action::Close);
    }
    let reply = match fault.error {
        Some(injected) => {
            commands::injected_error(&conn.state, &name, &body, conn.auth.user(), &injected)
        }
        None => {
            if body.contains_key("compression") {
                conn.compression = hello::negotiate_compression(&body);
            }
            hello_for(conn, &name, &body)
        }
    };
    legacy_reply(conn, request_id, &name, reply)
}

/// An OP_REPLY answering `request_id`.
fn legacy_reply(
    conn: &Connection,
    request_id: i32,
    name: &str,
    mut reply: Document,
) -> Result<Action, String> {
    conn.state.stamp(&mut reply);
    let reply_bytes = to_bytes(&reply).ok_or_else(|| "reply could not be encoded".to_string())?;
    let reply_id = conn.state.next_request_id();
    let bytes = wire::legacy::encode_reply(reply_id, request_id, AWAIT_CAPABLE, 0, &[&reply_bytes]);
    Ok(Action::Reply {
        bytes,
        delay: latency(conn, name),
    })
}

fn refused_as_not_primary(reply: &Document) -> bool {
    reply.get_f64("ok") != Ok(1.0) && reply.get_i32("code") == Ok(errors::NOT_WRITABLE_PRIMARY)
}

/// Parses and answers one frame. `Err` means the connection must close.
fn handle_frame(conn: &mut Connection, frame: &Frame) -> Result<Action, String> {
    let max = conn.state.config().max_message_size;
    let opened = wire::open(frame, max).map_err(|e| e.to_string())?;
    let message = opened.parse(frame).map_err(|e| e.to_string())?;
    if let (true, None, Message::Msg(msg)) = (conn.state.config().fast, opened.compressor, &message)
    {
        let state = &conn.state;
        if let Some(bytes) =
            super::fast::answer(frame.header.request_id, || state.next_request_id(), msg)
        {
            return Ok(Action::Reply {
                bytes,
                delay: Duration::ZERO,
            });
        }
    }
    match message {
        Message::Msg(msg) => {
            let body =
                Document::try_from(msg.body).map_err(|e| format!("invalid OP_MSG body: {e}"))?;
            let mut sequences = Vec::with_capacity(msg.sequences.len());
            for sequence in &msg.sequences {
                let docs = sequence
                    .iter()
                    .map(Document::try_from)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        format!(
                            "invalid document in sequence '{}': {e}",
                            sequence.identifier
                        )
                    })?;
                sequences.push((sequence.identifier.to_string(), docs));
            }
            let name = body.keys().next().cloned().unwrap_or_default();
            conn.state.count_command(&name);
            let db = body.get_str("$db").ok().map(str::to_owned);
            let hello = is_hello(&name);
            if hello {
                remember_app_name(conn, &body);
            }
            let request = MsgRequest {
                reply_to: ReplyTo {
                    request_id: frame.header.request_id,
                    name: name.clone(),
                    compressor: opened.compressor,
                    silent: msg.flags.more_to_come(),
                    after: AfterExecution::default(),
                },
                name,
                db,
                body,
                sequences,
                exhaust_allowed: msg.flags.exhaust_allowed(),
            };
            // The fail point is consulted after the authentication check
            // (as on the server), for hello and the SASL commands too.
            let users = &conn.state.config().users;
            let fault = match &request.db {
                Some(_) if hello || !conn.auth.refuses(users, &request.name) => conn
                    .state
                    .fail_points
                    .activate(&request.name, conn.app_name.as_deref())
                    .unwrap_or_default(),
                _ => Fault::default(),
            };
            if let Some(wait) = fault.block {
                return Ok(Action::Pause {
                    wait,
                    request: Box::new(Deferred::Msg(request)),
                    fault: Fault {
                        block: None,
                        ..fault
                    },
                });
            }
            answer_msg(conn, request, fault)
        }
        Message::Query(query) => {
            let name = query.command_name().unwrap_or_default().to_string();
            conn.state.count_command(&name);
            let raw = Document::try_from(query.query)
                .map_err(|e| format!("invalid OP_QUERY document: {e}"))?;
            let body = match raw.get_document("$query") {
                Ok(inner) => inner.clone(),
                Err(_) => raw,
            };
            let request_id = frame.header.request_id;
            if !(query.full_collection_name.ends_with(".$cmd") && is_hello(&name)) {
                let reply = CommandError::new(
                    errors::UNSUPPORTED_OP_QUERY_COMMAND,
                    format!("Unsupported OP_QUERY command: {name}. The client driver may require an upgrade. For more details see https://dochub.mongodb.org/core/legacy-opcode-removal"),
                )
                .to_document();
                return legacy_reply(conn, request_id, &name, reply);
            }
            remember_app_name(conn, &body);
            let fault = conn
                .state
                .fail_points
                .activate(&name, conn.app_name.as_deref())
                .unwrap_or_default();
            let hello = QueryHello {
                request_id,
                name,
                body,
            };
            match fault.block {
                Some(wait) => Ok(Action::Pause {
                    wait,
                    request: Box::new(Deferred::Query(hello)),
                    fault: Fault {
                        block: None,
                        ..fault
                    },
                }),
                None => answer_query_hello(conn, hello, fault),
            }
        }
        Message::Reply(_) => Err("a client sent OP_REPLY".to_string()),
        Message::Other(op) => Err(format!("unsupported opcode {}", op.name())),
    }
}
