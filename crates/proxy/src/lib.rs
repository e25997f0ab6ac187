//! sessionguard-proxy: the data path.
//!
//! It accepts client connections, dials one upstream connection per client,
//! and forwards every frame unchanged in both directions while showing each
//! one (parsed, zero-copy) to an [`Inspector`]. It owns sockets, TLS,
//! correlation of requests and replies, lifecycle (connection cap, drain,
//! shutdown), replica-set hello rewriting, the data path's metrics, and the
//! seams for policy ([`Inspector`]) and injected requests ([`Injector`]).
//! It holds no session logic and must not depend on the session engine
//! (policy stays behind the `Inspector` trait: the binary adapts the engine
//! to it), nor on the binary's configuration file: [`Proxy::start`] takes
//! [`ProxySettings`], already validated. It never logs document contents.
//!
//! # Layout
//!
//! - `inspect`: the `Inspector` trait, verdicts, `ConnContext`, `Injector`.
//! - `driver`: the I/O driver (io_uring or epoll), chosen once at start
//!   and logged with the reason (`proxy.io`, `SESSIONGUARD_IO`); each data
//!   thread's runtime.
//! - `listener`: the data threads (one monoio runtime per core, an
//!   `SO_REUSEPORT` socket per listen address each), accept loop,
//!   connection cap, accept back-off, drain, off-thread name resolution.
//! - `ctl`: how the tokio control plane reaches a data thread without any
//!   per-frame cost: per-thread inbox + doorbell, the registry of
//!   connections and their signals (drain, kill, injection).
//! - `connection`: one client connection: TLS accept, upstream dial, then
//!   two same-thread tasks (one per direction) sharing the in-flight table
//!   without a lock; reusable buffers, frames inspected in place, one
//!   write per batch. Generic over the inspector (static calls, its
//!   records inline).
//! - `inflight`: the per-connection map of requests awaiting replies, the
//!   only owner of in-flight state: each entry carries the inspector's
//!   record of the request (`Inspector::Pending`) too. The first entry is
//!   inline (drivers send one request at a time); a map holds the rest.
//! - `upstream`: connection-string parsing and dialing (TCP; tokio for the
//!   readiness probe, monoio on the data threads).
//! - `topology`: replica-set mode's hello rewriting (member -> proxy
//!   addresses), applied around the caller's inspector.
//! - `tls`: rustls on both sides (listener certificate, upstream options;
//!   monoio-rustls streams, on either driver), and `connect`: dial, then
//!   the upstream handshake when one is asked for.
//! - `anchor_leaf`: the upstream verifier accepting a self-signed CA
//!   certificate given as `tlsCAFile`, as OpenSSL-based drivers do.
//! - `unreachable`: the error reply that answers a client's handshake when
//!   its upstream cannot be dialed (cause and fix in `errmsg`).
//! - `metrics`: [`ProxyMetrics`], the pre-resolved handles the connection
//!   and listener update from any data thread (atomic adds, no allocation
//!   per frame; the per-frame series in per-thread stripes a collector sums
//!   at scrape time).
//! - `settings`: [`ProxySettings`], what [`Proxy::start`] needs.
#![forbid(unsafe_code)]

mod anchor_leaf;
mod connection;
mod ctl;
mod driver;
mod inflight;
mod inspect;
mod listener;
mod metrics;
mod settings;
mod tls;
mod topology;
mod unreachable;
mod upstream;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::sync::atomic::AtomicBool;

use tokio::sync::watch;
use tracing::info;

pub use inspect::{
    CloseCause, ConnContext, InFlightRequest, InjectError, Injector, Inspector, NoopInspector,
    ReplyVerdict, Verdict,
};

pub use metrics::ProxyMetrics;
pub use settings::{listener_plan, ListenerPlan, ProxySettings};
pub use tls::{
    ListenTls, ListenTlsConfig, ListenTlsError, TlsOptions, UpstreamTls,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT,
};
pub use upstream::{dial, ConnectionString, DialError, HostPort};

pub use driver::{
    build_runtime, choose_driver, io_uring_unavailable, Driver, DriverChoice, IoMode, Runtime,
    IO_ENV,
};

use connection::{ConnSettings, ServeConnection};
use listener::{BoundListener, ListenerStats, Shared};
use topology::TopologyInspector;

/// Entry point of the data path.
pub struct Proxy;

impl Proxy {
    /// Binds `settings.listen` (or, in replica-set mode, one listener per
    /// member, each dialing its member; all share `inspector`) and starts
    /// accepting, recording into `metrics`. Returns once every listener is
    /// bound (so `local_addr` / `listeners` are known, e.g. for port 0).
    pub async fn start<I: Inspector>(
        settings: ProxySettings,
        inspector: Arc<I>,
        metrics: ProxyMetrics,
    ) -> io::Result<ProxyHandle> {
        let ProxySettings {
            listen,
            upstream,
            members,
            upstream_tls,
            listen_tls,
            max_connections,
            max_message_size,
            connect_timeout,
            drain_grace,
            frame_read_timeout,
            inject_timeout,
            clients_connect_directly,
            io,
        } = settings;
        // Once, for every data thread, with the reason.
        let choice = driver::choose_driver(io)?;
        info!(driver = %choice.driver, reason = %choice.reason, "data path I/O driver");
        tls::log_settings(upstream_tls.as_ref(), listen_tls.as_ref());
        let member_mode = !members.is_empty();
        if !member_mode && upstream.hosts.len() > 1 {
            info!(
                upstream = %upstream.primary_target(),
                hosts = upstream.hosts.len(),
                "the upstream lists several hosts; without a member mapping ([[members]] or \
                 proxy.member_base_port) only the first is dialed"
            );
        }
        let targets = listener_plan(&listen, &upstream, members);
        metrics.register_upstreams(
            targets
                .iter()
                .map(|target| &target.upstream as &dyn std::fmt::Display),
        );
        // One data thread per core this process may run on (honours
        // taskset / cgroup CPU limits).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Every listener is bound (on every thread's socket) before any
        // accepts, so a taken port fails the start as a whole.
        let mut bound = Vec::with_capacity(targets.len());
        for ListenerPlan {
            upstream: member,
            listen,
            advertise,
        } in targets
        {
            let sockets = listener::bind_all(&listen, threads)?;
            let local = sockets[0].local_addr()?;
            // Port 0 (tests) is advertised as the port actually bound.
            let advertised = member_mode.then(|| {
                advertise.unwrap_or_else(|| {
                    if listen.ends_with(":0") {
                        local.to_string()
                    } else {
                        listen.clone()
                    }
                })
            });
            bound.push((
                sockets,
                ListenerInfo {
                    upstream: member,
                    local_addr: local,
                    advertised,
                },
            ));
        }
        let map = topology::MemberMap::new(bound.iter().filter_map(|(_, info)| {
            let advertised = info.advertised.clone()?;
            Some((info.upstream.clone(), advertised))
        }));
        // Without a map the decorator only warns about drivers bypassing the
        // proxy, which cannot happen when every client connects directly.
        let inspector: Arc<dyn ServeConnection> = if map.is_empty() && clients_connect_directly {
            inspector
        } else {
            Arc::new(TopologyInspector::new(inspector, map))
        };

        let active = Arc::new(watch::Sender::new(0usize));
        let stats = Arc::new(ListenerStats::default());
        let mut listeners = Vec::with_capacity(bound.len());
        let mut to_serve = Vec::with_capacity(bound.len());
        for (sockets, info) in bound {
            match &info.advertised {
                Some(advertised) => info!(listen = %info.local_addr, upstream = %info.upstream,
                    %advertised, "proxy listening for a replica-set member"),
                None => {
                    info!(listen = %info.local_addr, upstream = %info.upstream, "proxy listening")
                }
            }
            let settings = Arc::new(ConnSettings {
                upstream: info.upstream.clone(),
                upstream_tls: upstream_tls.clone(),
                max_message_size,
                connect_timeout,
                frame_read_timeout,
                inject_timeout,
                metrics: metrics.clone(),
            });
            to_serve.push(BoundListener {
                local: info.local_addr,
                settings,
                tls: listen_tls.clone(),
                sockets,
            });
            listeners.push(info);
        }
        let shared = Arc::new(Shared {
            inspector,
            max_connections,
            drain_grace,
            active: active.clone(),
            stats: stats.clone(),
            next_id: AtomicU64::new(1),
            metrics: metrics.clone(),
        });
        let data = listener::start(choice.driver, to_serve, shared)?;
        let local = listeners[0].local_addr;
        Ok(ProxyHandle {
            local_addr: local,
            listeners,
            driver: choice,
            inboxes: data.inboxes,
            threads: data.threads,
            running: data.running,
            draining: AtomicBool::new(false),
            drain_grace,
            active,
            stats,
            metrics,
        })
    }
}

/// One bound listener and the upstream it dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerInfo {
    pub upstream: upstream::HostPort,
    pub local_addr: SocketAddr,
    /// The address hello replies name instead of `upstream` (replica-set
    /// mode only).
    pub advertised: Option<String>,
}

/// Controls a running proxy: its data threads. Dropping it without `wait`
/// closes every connection and joins the threads (a failing test leaks
/// none).
pub struct ProxyHandle {
    local_addr: SocketAddr,
    listeners: Vec<ListenerInfo>,
    driver: DriverChoice,
    inboxes: Vec<Arc<ctl::Inbox>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    running: watch::Receiver<usize>,
    draining: AtomicBool,
    drain_grace: std::time::Duration,
    active: Arc<watch::Sender<usize>>,
    stats: Arc<ListenerStats>,
    metrics: ProxyMetrics,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("local_addr", &self.local_addr)
            .field("driver", &self.driver)
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// The bound listen address (the first member's in replica-set mode).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every listener: one in single-upstream mode, one per member otherwise.
    pub fn listeners(&self) -> &[ListenerInfo] {
        &self.listeners
    }

    /// The I/O driver the data threads run, and why it was chosen.
    pub fn driver(&self) -> &DriverChoice {
        &self.driver
    }

    /// Stops accepting; each connection closes as soon as it has nothing in
    /// flight (a monitoring hello stream counts as nothing); whatever is
    /// left is closed after `drain_grace`.
    pub fn drain(&self) {
        self.metrics.set_draining();
        if !self.draining.swap(true, Ordering::AcqRel) {
            info!(open_connections = self.active_connections(), grace = ?self.drain_grace,
                "draining: no longer accepting; waiting for in-flight requests");
        }
        for inbox in &self.inboxes {
            inbox.send(ctl::Ctl::Drain);
        }
    }

    /// Closes the listeners and every connection now.
    pub fn shutdown_now(&self) {
        self.metrics.set_draining();
        self.draining.store(true, Ordering::Release);
        for inbox in &self.inboxes {
            inbox.send(ctl::Ctl::Kill);
        }
    }

    /// Whether `drain` or `shutdown_now` was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves when the listeners have stopped and every connection is
    /// closed (after `drain` or `shutdown_now`).
    pub async fn wait(mut self) {
        let _ = self.running.wait_for(|n| *n == 0).await;
        // Every thread has counted itself out after dropping its runtime:
        // these joins only collect threads that are exiting, they do not
        // block the caller's runtime on a connection's close.
        self.join_threads();
        info!("listener stopped");
    }

    fn join_threads(&mut self) {
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// Client connections currently open.
    pub fn active_connections(&self) -> usize {
        *self.active.borrow()
    }

    /// Resolves once no client connection is open (at once when none is),
    /// every close having been judged by the inspector first.
    pub async fn no_connections(&self) {
        let mut active = self.active.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = active.wait_for(|open| *open == 0).await;
    }

    /// Connections accepted since start (not counting those over the cap).
    pub fn accepted_connections(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because the cap was reached.
    pub fn rejected_connections(&self) -> u64 {
        self.stats.rejected_over_cap.load(Ordering::Relaxed)
    }
}

impl Drop for ProxyHandle {
    /// Kills and joins: the data threads close their connections without
    /// waiting for peers, so this takes milliseconds.
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown_now();
            self.join_threads();
        }
    }
}
