//! The accept loop: assigns connection ids, enforces the connection cap (a
//! connection over the cap is closed at once, counted and logged), backs off
//! when accept fails for lack of resources (EMFILE and friends), and runs
//! the drain: stop accepting, let connections finish, close the rest after
//! the grace period. With `[proxy.tls]` each connection's TLS handshake runs
//! in that connection's task (a slow handshake never stalls accepting), under
//! `handshake_timeout`; a failed handshake closes that connection with a log
//! line naming the peer and rustls' reason. It does not look at frames;
//! connections do.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::{Accepted, ConnSettings, Lifecycle, ServeConnection};
use super::tls::{ClientStream, ListenTls};
use crate::metrics::ProxyMetrics;

/// First and longest pause after a resource-exhaustion accept error.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Over-cap rejections are summarised at most this often, so a connection
/// flood cannot flood the log too.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Counters the listener keeps for its handle (`ProxyHandle`); metrics keep
/// their own.
#[derive(Debug, Default)]
pub(crate) struct ListenerStats {
    pub accepted: AtomicU64,
    pub rejected_over_cap: AtomicU64,
}

/// Everything the accept loop needs.
pub(crate) struct AcceptLoop {
    pub listener: TcpListener,
    pub local: SocketAddr,
    pub settings: Arc<ConnSettings>,
    /// The inspector, as the server of its connections.
    pub inspector: Arc<dyn ServeConnection>,
    pub max_connections: usize,
    pub drain_grace: Duration,
    pub drain: CancellationToken,
    pub kill: CancellationToken,
    pub active: Arc<watch::Sender<usize>>,
    pub stats: Arc<ListenerStats>,
    pub next_id: Arc<AtomicU64>,
    pub metrics: ProxyMetrics,
    /// Serve TLS to clients (`[proxy.tls]`).
    pub tls: Option<ListenTls>,
}

/// Decrements the active-connection count (and gauge) when a connection
/// task ends, however it ends.
struct ActiveGuard(Arc<watch::Sender<usize>>, ProxyMetrics);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.1.connection_closed();
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl AcceptLoop {
    pub(crate) async fn run(self) {
        let cap = Arc::new(Semaphore::new(self.max_connections));
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut rejected_since_log = 0u64;
        let mut last_reject_log: Option<Instant> = None;

        loop {
            let accepted = tokio::select! {
                _ = self.drain.cancelled() => break,
                _ = self.kill.cancelled() => break,
                accepted = self.listener.accept() => accepted,
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
                    warn!(listen = %self.local, error = %e, backoff = ?backoff,
                        "accept failed; pausing before accepting again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.drain.cancelled() => break,
                        _ = self.kill.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };

            let Ok(permit) = cap.clone().try_acquire_owned() else {
                drop(stream);
                self.stats.rejected_over_cap.fetch_add(1, Ordering::Relaxed);
                self.metrics.connection_rejected();
                rejected_since_log += 1;
                if last_reject_log.is_none_or(|at| at.elapsed() >= REJECT_LOG_INTERVAL) {
                    warn!(listen = %self.local, %peer, max_connections = self.max_connections,
                        rejected = rejected_since_log,
                        "connection cap reached; closed new connection(s)");
                    rejected_since_log = 0;
                    last_reject_log = Some(Instant::now());
                }
                continue;
            };

            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            self.active.send_modify(|n| *n += 1);
            self.metrics.connection_opened();
            let guard = ActiveGuard(self.active.clone(), self.metrics.clone());
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let settings = self.settings.clone();
            let inspector = self.inspector.clone();
            let lifecycle = Lifecycle {
                drain: self.drain.clone(),
                kill: self.kill.clone(),
            };
            let local = self.local;
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _guard = guard;
                let client = match tls {
                    None => ClientStream::Plain(stream),
                    Some(tls) => match accept_tls(&tls, stream, &lifecycle.kill).await {
                        Ok(Some(client)) => client,
                        Ok(None) => return,
                        Err(reason) => {
                            warn!(conn = id, %peer, side = "client",
                                    "connection closed: {reason}");
                            return;
                        }
                    },
                };
                let accepted = Accepted {
                    id,
                    client,
                    peer,
                    local,
                };
                inspector
                    .serve_connection(accepted, settings, lifecycle)
                    .await;
            });
        }
        // Stop accepting now: new clients get "connection refused" at once
        // instead of waiting in the backlog.
        drop(self.listener);

        let mut active = self.active.subscribe();
        if !self.kill.is_cancelled() {
            let open = *active.borrow();
            info!(listen = %self.local, open_connections = open, grace = ?self.drain_grace,
                "draining: no longer accepting; waiting for in-flight requests");
            let all_closed = active.wait_for(|n| *n == 0);
            tokio::select! {
                _ = all_closed => {}
                _ = tokio::time::sleep(self.drain_grace) => {
                    let left = *self.active.borrow();
                    warn!(listen = %self.local, open_connections = left,
                        "drain grace period over; closing the remaining connections");
                    self.kill.cancel();
                }
                _ = self.kill.cancelled() => {}
            }
        }
        // Connections exit promptly once killed; wait so that `wait()`
        // returning means every connection is gone.
        let _ = active.wait_for(|n| *n == 0).await;
        info!(listen = %self.local, "listener stopped");
    }
}

/// Runs the server side of the TLS handshake. `Ok(None)`: the proxy is
/// shutting down. `Err`: why the client was refused (bad certificate, no
/// certificate when one is required, not TLS at all, too slow).
async fn accept_tls(
    tls: &ListenTls,
    stream: tokio::net::TcpStream,
    kill: &CancellationToken,
) -> Result<Option<ClientStream>, String> {
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream));
    tokio::select! {
        _ = kill.cancelled() => Ok(None),
        done = handshake => match done {
            Err(_) => Err(format!(
                "client TLS handshake not completed within {:?}",
                tls.handshake_timeout
            )),
            Ok(Err(e)) => Err(format!("client TLS handshake failed: {e}")),
            Ok(Ok(stream)) => Ok(Some(ClientStream::Tls(Box::new(stream)))),
        },
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
