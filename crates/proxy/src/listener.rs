//! The data threads: one monoio runtime per core (driver chosen once by
//! `driver`), shared-nothing. Each thread has its own `SO_REUSEPORT`
//! listener per listen address (the kernel spreads connections), its own
//! registry of connections and its control task (see `ctl`). Here: binding,
//! the accept loop (connection ids, the process-wide connection cap — a
//! connection over the cap is closed at once, counted and logged —,
//! back-off when accept fails for lack of resources), the drain (stop
//! accepting, let connections finish, kill the rest after the grace
//! period), and name resolution off the data thread. It does not look at
//! frames; connections do.

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use monoio::io::AsyncReadRent;
use monoio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::connection::{Accepted, ConnSettings, ServeConnection};
use super::ctl::{Ctl, Inbox, Registry, SIG_DRAIN, SIG_KILL, SIG_WAKE};
use super::driver::{build_runtime, Driver};
use super::inspect::{InjectError, Injector};
use super::tls::ListenTls;
use super::upstream::{HostPort, Resolve};
use crate::metrics::ProxyMetrics;

/// First and longest pause after a resource-exhaustion accept error.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Over-cap rejections are summarised at most this often (per thread), so
/// a connection flood cannot flood the log too.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Each listening socket's backlog.
const BACKLOG: i32 = 1024;

/// Counters the listener keeps for its handle (`ProxyHandle`); metrics keep
/// their own.
#[derive(Debug, Default)]
pub(crate) struct ListenerStats {
    pub accepted: AtomicU64,
    pub rejected_over_cap: AtomicU64,
}

/// What every data thread shares (touched once per connection, never per
/// frame).
pub(crate) struct Shared {
    /// The inspector, as the server of its connections.
    pub inspector: Arc<dyn ServeConnection>,
    pub max_connections: usize,
    pub drain_grace: Duration,
    /// Open client connections: the cap, `active_connections` and
    /// `no_connections` (a `watch`: awaitable from tokio).
    pub active: Arc<watch::Sender<usize>>,
    pub stats: Arc<ListenerStats>,
    pub next_id: AtomicU64,
    pub metrics: ProxyMetrics,
}

/// One listen address, bound once per data thread.
pub(crate) struct BoundListener {
    pub local: SocketAddr,
    pub settings: Arc<ConnSettings>,
    pub tls: Option<ListenTls>,
    /// One socket per data thread (the first is the one bound at start).
    pub sockets: Vec<std::net::TcpListener>,
}

/// Binds `addr` for a data thread: `SO_REUSEPORT`, so every thread has its
/// own accept queue on the same port, and non-blocking for the runtime.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds `listen` (host:port; each resolved address in turn, as
/// `TcpListener::bind` does) once, then `threads - 1` more sockets on the
/// port actually bound (port 0 in tests).
pub(crate) fn bind_all(listen: &str, threads: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut last_error = None;
    let addresses = std::net::ToSocketAddrs::to_socket_addrs(listen)?;
    for address in addresses {
        match bind(address) {
            Ok(first) => {
                let local = first.local_addr()?;
                let mut sockets = vec![first];
                for _ in 1..threads {
                    sockets.push(bind(local)?);
                }
                return Ok(sockets);
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{listen}` resolves to no address"),
        )
    }))
}

/// Counts a data thread out of `running` when it ends, whether it returns
/// or panics, and after its runtime is dropped: so `ProxyHandle::wait`
/// joins threads that have already finished, and a thread that died does
/// not leave `wait` (and a draining process) waiting forever.
struct CountedOut {
    running: Arc<watch::Sender<usize>>,
    index: usize,
}

impl Drop for CountedOut {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!(
                thread = self.index,
                "a data thread stopped on a panic (a bug): its connections are closed, \
                 the other threads go on"
            );
        }
        self.running.send_modify(|n| *n -= 1);
    }
}

/// The running data threads.
pub(crate) struct DataThreads {
    pub inboxes: Vec<Arc<Inbox>>,
    pub threads: Vec<JoinHandle<()>>,
    /// Threads still running; 0 once every connection is closed after a
    /// drain or kill.
    pub running: watch::Receiver<usize>,
}

/// Starts one data thread per socket of each listener (every listener has
/// the same number), each with the runtime for `driver`; returns once
/// every runtime is built.
pub(crate) fn start(
    driver: Driver,
    listeners: Vec<BoundListener>,
    shared: Arc<Shared>,
) -> io::Result<DataThreads> {
    let threads = listeners.first().map_or(0, |l| l.sockets.len());
    let mut per_thread: Vec<Vec<ThreadListener>> = (0..threads).map(|_| Vec::new()).collect();
    for listener in listeners {
        for (index, socket) in listener.sockets.into_iter().enumerate() {
            per_thread[index].push(ThreadListener {
                socket,
                local: listener.local,
                settings: listener.settings.clone(),
                tls: listener.tls.clone(),
            });
        }
    }
    let (running_tx, running) = watch::channel(threads);
    let running_tx = Arc::new(running_tx);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let mut inboxes = Vec::with_capacity(threads);
    let mut handles = Vec::with_capacity(threads);
    // The data threads log where the starting thread does (the global
    // subscriber in the binary; a test's own capture in tests).
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    for (index, listeners) in per_thread.into_iter().enumerate() {
        let (inbox, bell) = Inbox::new()?;
        inboxes.push(inbox.clone());
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let running_tx = running_tx.clone();
        let dispatch = dispatch.clone();
        let handle = std::thread::Builder::new()
            .name(format!("sg-data-{index}"))
            .spawn(move || {
                let _logs = tracing::dispatcher::set_default(&dispatch);
                // Declared first, dropped last: after the runtime is gone.
                let _counted = CountedOut {
                    running: running_tx,
                    index,
                };
                let mut runtime = match build_runtime(driver) {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                runtime.block_on(thread_main(listeners, bell, inbox, shared));
            })?;
        handles.push(handle);
    }
    for _ in 0..threads {
        let built = ready_rx
            .recv()
            .map_err(|_| io::Error::other("a data thread died while starting"))?;
        if let Err(e) = built {
            for inbox in &inboxes {
                inbox.send(Ctl::Kill);
            }
            return Err(io::Error::new(
                e.kind(),
                format!("cannot build the {driver} runtime: {e}"),
            ));
        }
    }
    Ok(DataThreads {
        inboxes,
        threads: handles,
        running,
    })
}

/// One listener as one data thread serves it.
struct ThreadListener {
    socket: std::net::TcpListener,
    local: SocketAddr,
    settings: Arc<ConnSettings>,
    tls: Option<ListenTls>,
}

/// One data thread's own state (never leaves the thread).
struct ThreadState {
    registry: Registry,
    /// Raised (DRAIN or KILL) when the thread stops accepting: the
    /// thread's main future waits on `stop`, each accept loop on its own
    /// (a signal holds one waker).
    stop: Rc<super::ctl::ConnSignal>,
    accept_stops: std::cell::RefCell<Vec<Rc<super::ctl::ConnSignal>>>,
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
    rejected_since_log: Cell<u64>,
    last_reject_log: Cell<Option<Instant>>,
}

impl ThreadState {
    fn stop_accepting(&self, flag: u8) {
        self.stop.raise(flag);
        for stop in self.accept_stops.borrow().iter() {
            stop.raise(flag);
        }
    }
}

async fn thread_main(
    listeners: Vec<ThreadListener>,
    bell: StdUnixStream,
    inbox: Arc<Inbox>,
    shared: Arc<Shared>,
) {
    let th = Rc::new(ThreadState {
        registry: Registry::default(),
        stop: Rc::new(super::ctl::ConnSignal::default()),
        accept_stops: std::cell::RefCell::new(Vec::new()),
        inbox,
        shared,
        rejected_since_log: Cell::new(0),
        last_reject_log: Cell::new(None),
    });
    match monoio::net::UnixStream::from_std(bell) {
        Ok(bell) => {
            monoio::spawn(control_task(th.clone(), bell));
        }
        Err(e) => {
            warn!(error = %e, "data thread cannot watch its control socket; stopping it");
            return;
        }
    }
    for listener in listeners {
        let stop = Rc::new(super::ctl::ConnSignal::default());
        th.accept_stops.borrow_mut().push(stop.clone());
        monoio::spawn(accept_loop(listener, stop, th.clone()));
    }
    // Until a drain or kill...
    poll_fn(|cx| th.stop.poll_raised(SIG_DRAIN | SIG_KILL, cx)).await;
    // ...and every connection of this thread closed.
    th.registry.wait_empty().await;
}

async fn control_task(th: Rc<ThreadState>, mut bell: monoio::net::UnixStream) {
    let mut buf = Vec::with_capacity(64);
    loop {
        let (res, back) = bell.read(buf).await;
        buf = back;
        buf.clear();
        if matches!(res, Ok(0) | Err(_)) {
            return;
        }
        for ctl in th.inbox.take() {
            match ctl {
                Ctl::Drain => {
                    if !th.stop.is_raised(SIG_DRAIN | SIG_KILL) {
                        th.stop_accepting(SIG_DRAIN);
                        let grace = th.shared.drain_grace;
                        let t = th.clone();
                        monoio::spawn(async move {
                            monoio::time::sleep(grace).await;
                            if t.registry.live() > 0 {
                                warn!(
                                    open_connections = t.registry.live(),
                                    "drain grace period over; closing the remaining connections"
                                );
                                t.registry.raise_all(SIG_KILL);
                            }
                        });
                    }
                    th.registry.raise_all(SIG_DRAIN);
                }
                Ctl::Kill => {
                    th.stop_accepting(SIG_KILL);
                    th.registry.raise_all(SIG_KILL);
                }
                Ctl::Inject {
                    slot,
                    generation,
                    request,
                } => match th.registry.get(slot, generation) {
                    Some(signal) => signal.queue_injection(request),
                    None => {
                        let _ = request.reply.send(Err(InjectError::Closed));
                    }
                },
                Ctl::Wake { slot, generation } => {
                    if let Some(signal) = th.registry.get(slot, generation) {
                        signal.raise(SIG_WAKE);
                    }
                }
            }
        }
    }
}

/// Releases the cap slot and the registry slot however a connection ends.
struct ConnGuard {
    th: Rc<ThreadState>,
    slot: usize,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.th.registry.remove(self.slot);
        self.th.shared.metrics.connection_closed();
        self.th
            .shared
            .active
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn accept_loop(
    listener: ThreadListener,
    stop: Rc<super::ctl::ConnSignal>,
    th: Rc<ThreadState>,
) {
    let ThreadListener {
        socket,
        local,
        settings,
        tls,
    } = listener;
    // A second descriptor of the same socket, to stop it listening when the
    // thread stops accepting: dropping the io_uring accept only queues its
    // cancellation, and until the kernel has processed it the pending
    // accept keeps the socket open and listening — a client could still
    // connect after `wait()` returned. `shutdown` on a listening socket
    // stops it at once and fails the pending accept.
    let control = socket.try_clone().ok();
    let listener = match TcpListener::from_std(socket) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(listen = %local, error = %e, "data thread cannot watch its listener");
            return;
        }
    };
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // A pending accept is dropped (cancelled) when the thread stops;
        // the listener is closed with this loop, so new clients are
        // refused at once instead of waiting in the backlog.
        let accepted = {
            let mut accept = pin!(listener.accept());
            poll_fn(|cx| {
                if stop.poll_raised(SIG_DRAIN | SIG_KILL, cx).is_ready() {
                    return Poll::Ready(None);
                }
                accept.as_mut().poll(cx).map(Some)
            })
            .await
        };
        let Some(accepted) = accepted else {
            if let Some(control) = &control {
                let _ = socket2::SockRef::from(control).shutdown(std::net::Shutdown::Both);
            }
            break;
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = ACCEPT_BACKOFF_MIN;
                pair
            }
            Err(e) if is_per_connection_error(&e) => {
                debug!(error = %e, "accept failed for one connection");
                continue;
            }
            Err(e) => {
                warn!(listen = %local, error = %e, backoff = ?backoff,
                    "accept failed; pausing before accepting again");
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let shared = &th.shared;
        let max = shared.max_connections;
        let admitted = shared.active.send_if_modified(|open| {
            if *open >= max {
                return false;
            }
            *open += 1;
            true
        });
        if !admitted {
            // Counted before the close: whoever sees the connection closed
            // (a client, a test) must find it counted.
            shared
                .stats
                .rejected_over_cap
                .fetch_add(1, Ordering::Relaxed);
            shared.metrics.connection_rejected();
            drop(stream);
            th.rejected_since_log.set(th.rejected_since_log.get() + 1);
            if th
                .last_reject_log
                .get()
                .is_none_or(|at| at.elapsed() >= REJECT_LOG_INTERVAL)
            {
                warn!(listen = %local, %peer, max_connections = max,
                    rejected = th.rejected_since_log.get(),
                    "connection cap reached; closed new connection(s)");
                th.rejected_since_log.set(0);
                th.last_reject_log.set(Some(Instant::now()));
            }
            continue;
        }
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        shared.metrics.connection_opened();
        // Registered before the task first runs: a drain that comes now
        // reaches it.
        let (slot, generation, signal) = th.registry.insert();
        let guard = ConnGuard {
            th: th.clone(),
            slot,
        };
        let accepted = Accepted {
            id: shared.next_id.fetch_add(1, Ordering::Relaxed),
            client: stream,
            peer,
            local,
            injector: Injector::new(th.inbox.clone(), slot, generation, settings.inject_timeout),
            resolver: Box::new(OffThreadResolver {
                inbox: th.inbox.clone(),
                slot,
                generation,
                signal: signal.clone(),
            }),
            signal,
        };
        let serve =
            shared
                .inspector
                .clone()
                .serve_connection(accepted, settings.clone(), tls.clone());
        monoio::spawn(async move {
            let _guard = guard;
            serve.await;
        });
    }
}

/// Resolves a host name on a short-lived thread (the data thread must
/// never block on DNS) and wakes the connection through its inbox. Once
/// per connection to a named upstream; IP literals never get here.
struct OffThreadResolver {
    inbox: Arc<Inbox>,
    slot: usize,
    generation: u64,
    signal: Rc<super::ctl::ConnSignal>,
}

type Resolved = Arc<Mutex<Option<io::Result<Vec<SocketAddr>>>>>;

impl Resolve for OffThreadResolver {
    fn resolve<'a>(
        &'a self,
        target: &'a HostPort,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Vec<SocketAddr>>> + 'a>>
    {
        let answer: Resolved = Arc::default();
        let (host, port) = (target.host.clone(), target.port);
        let (inbox, slot, generation) = (self.inbox.clone(), self.slot, self.generation);
        let sent = answer.clone();
        let spawned = std::thread::Builder::new()
            .name("sg-resolve".into())
            .spawn(move || {
                let found = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
                    .map(|addresses| addresses.collect());
                *sent.lock().unwrap_or_else(|p| p.into_inner()) = Some(found);
                inbox.send(Ctl::Wake { slot, generation });
            });
        Box::pin(async move {
            spawned?;
            poll_fn(|cx| {
                self.signal.register(cx);
                match answer.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(found) => Poll::Ready(found),
                    None => Poll::Pending,
                }
            })
            .await
        })
    }
}

/// Accept errors that concern only the connection being accepted (the peer
/// gave up), as opposed to the process running out of resources.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_binds_the_port_the_first_got() {
        let sockets = bind_all("127.0.0.1:0", 3).unwrap();
        let ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|p| *p == ports[0] && *p != 0), "{ports:?}");
    }

    #[test]
    fn a_taken_port_fails_the_bind() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        assert!(bind_all(&addr, 2).is_err());
    }
}
