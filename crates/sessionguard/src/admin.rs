//! The admin HTTP server (hyper 1, HTTP/1.1; `GET`, and `POST` for
//! `/reload` only). It owns the routes below, their JSON shapes, the
//! bearer-token check and the upstream readiness probe; it reads the metrics
//! registry and the session engine but changes neither (`POST /reload`
//! hands over to `crate::reload`), and it never serves document contents
//! (ids, names and counts only). Handlers are synchronous: no lock is held
//! across `.await`.
//!
//! Routes:
//! - `GET /healthz` -> `200 ok`: the process is up and serving. Never needs
//!   the token.
//! - `GET /readyz` -> `200` when the proxy should get traffic, `503` while it
//!   drains (or shuts down) or while the upstream is unreachable. Body:
//!   `{"ready":bool,"draining":bool,"upstream_reachable":bool}`. An upstream
//!   counts as reachable when the most recent dial of it succeeded: every
//!   client connection's dial and a TCP-connect probe every
//!   `proxy.upstream_probe_interval` (connect, then close at once; no bytes
//!   sent) update it. With replica-set members mapped (one listener per
//!   member), every member is probed and the proxy is reachable while any
//!   member is: one member down must not take the proxy out of service
//!   (`sessionguard_upstream_up`).
//! - `GET /metrics` -> Prometheus text exposition (see `crate::metrics`).
//!   Never needs the token.
//! - `GET /sessions[?state=active|ended|in_transaction|held][&limit=N]` ->
//!   `{"total":N,"returned":M,"sessions":[...]}`: tracked sessions, most
//!   recently used first, at most `limit` (default 1000, at most 100000).
//!   `active`: not ended; `ended`: ended or killed (a tombstone);
//!   `in_transaction`: a transaction that still holds the session;
//!   `held`: an open transaction or an open cursor.
//! - `GET /violations` -> JSON array, oldest first: at most
//!   `sessions.max_violations`, chosen fairly (each finding's 5 newest stay
//!   whatever other findings do; see `SessionEngine::violations`), each
//!   with `id`, `finding`, `rule`, `severity`, `action`, `rejected`, `lsid`,
//!   `owner`, `at`, `message` and `evidence` (`current` / `earlier` request:
//!   connection, request id, peer, app, driver, user, command, namespace,
//!   txnNumber, time).
//! - `GET /findings` -> JSON array of findings (violations grouped by bug),
//!   the most recently seen first: `fingerprint` (12 hex digits, stable),
//!   `rule`, `severity`, `action`, `current` / `earlier` (command,
//!   namespace, app, driver), `count`, `first_seen`, `last_seen`,
//!   `sessions` / `connections` (`count`, `exact`), `overflow` on the
//!   overflow finding.
//! - `GET /findings/<fingerprint>` -> one finding with `examples.first` and
//!   `examples.latest` (a `/violations` entry and its session's `timeline`);
//!   `404` for an unknown or malformed fingerprint.
//! - `POST /reload` -> re-reads the configuration file (as `SIGHUP` does,
//!   see `crate::reload`): `200` with
//!   `{"config","config_sha256","changes":[..],"needs_restart":[..]}`, or
//!   `400` with the refusal (file, key, problem; the old configuration
//!   stays), or `503` where nothing can be reloaded (no reloader).
//! - anything else -> `404`; another method on a known path -> `405` with
//!   `Allow` (`POST` for `/reload`, `GET` for the rest: a state change never
//!   rides on a `GET` that a prefetcher or crawler might send).
//!
//! With `proxy.admin_token` set, every route but `/healthz` and `/metrics`
//! (so `/reload` too) needs `Authorization: Bearer <token>` (compared in
//! constant time):
//! `401` without it or with a wrong one. Bound beyond loopback without a
//! token, the server says so in a warning at start.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{AdminToken, ProxyConfig};
use crate::metrics::{Metrics, TEXT_CONTENT_TYPE};
use crate::reload::Reloader;
use sessionguard_engine::{EndKind, Millis, SessionKey, SessionSummary, TxnPhase};
use sessionguard_engine::{SessionEngine, ViolationRecord};
use sessionguard_proxy::HostPort;

/// `/sessions` returns at most this many sessions unless `limit` says fewer.
pub(crate) const DEFAULT_SESSIONS_LIMIT: usize = 1000;
/// The largest `limit` `/sessions` accepts.
pub(crate) const MAX_SESSIONS_LIMIT: usize = 100_000;

/// Dials the upstreams now and then so `/readyz` notices an outage even
/// when no client connects.
#[derive(Debug, Clone)]
pub struct UpstreamProbe {
    /// Every upstream a listener dials: the first host of the connection
    /// string, or each mapped replica-set member.
    pub targets: Vec<HostPort>,
    pub interval: Duration,
    pub timeout: Duration,
}

/// What the admin routes read.
#[derive(Debug, Clone)]
pub struct AdminContext {
    pub metrics: Arc<Metrics>,
    /// `None`: `/sessions`, `/violations` and `/findings` answer 503.
    pub engine: Option<Arc<SessionEngine>>,
    pub token: Option<AdminToken>,
    pub probe: Option<UpstreamProbe>,
    /// `None`: `POST /reload` answers 503.
    pub reload: Option<Arc<Reloader>>,
}

impl AdminContext {
    /// The context for a proxy configured by `config` (token, probe target,
    /// probe interval and timeout from `[proxy]`).
    pub fn for_proxy(
        config: &ProxyConfig,
        metrics: Arc<Metrics>,
        engine: Option<Arc<SessionEngine>>,
    ) -> Result<AdminContext, crate::config::ConfigError> {
        let targets = config
            .listener_plan()?
            .into_iter()
            .map(|listener| listener.upstream)
            .collect();
        Ok(AdminContext {
            metrics,
            engine,
            token: config.admin_token.clone(),
            probe: Some(UpstreamProbe {
                targets,
                interval: config.upstream_probe_interval,
                timeout: config.connect_timeout,
            }),
            reload: None,
        })
    }

    /// The context with `POST /reload` served by `reloader`.
    pub fn with_reload(mut self, reloader: Arc<Reloader>) -> AdminContext {
        self.reload = Some(reloader);
        self
    }
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    pub local_addr: SocketAddr,
    pub task: JoinHandle<()>,
}

/// Binds `addr` and serves the admin routes (and runs the upstream probe)
/// until `shutdown` is cancelled.
pub async fn serve_with(
    addr: &str,
    context: AdminContext,
    shutdown: CancellationToken,
) -> io::Result<AdminServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    info!(admin = %local_addr, token = context.token.is_some(), "admin server listening");
    if context.token.is_none() && !local_addr.ip().is_loopback() {
        warn!(
            admin = %local_addr,
            "the admin API listens beyond loopback without proxy.admin_token: /sessions, \
             /violations and /findings (session ids, peers, users, command names) are open to \
             anyone who can reach it; set proxy.admin_token or bind it to 127.0.0.1"
        );
    }
    if let Some(probe) = context.probe.clone() {
        tokio::spawn(run_probe(probe, context.metrics.clone(), shutdown.clone()));
    }
    let context = Arc::new(context);
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        // Resource exhaustion: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let shutdown = shutdown.clone();
            let context = context.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = route(&context, &request);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            debug!(%peer, error = %e, "admin connection error");
                        }
                    }
                    _ = shutdown.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            });
        }
    });
    Ok(AdminServer { local_addr, task })
}

async fn run_probe(probe: UpstreamProbe, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        // Every member at once, each result recorded as it comes: a dead
        // member's connect timeout must not delay noticing the others.
        let mut dials: FuturesUnordered<_> = probe
            .targets
            .iter()
            .map(|target| async move {
                (
                    target,
                    sessionguard_proxy::dial(target, probe.timeout).await,
                )
            })
            .collect();
        loop {
            let dialed = tokio::select! {
                _ = shutdown.cancelled() => return,
                dialed = dials.next() => dialed,
            };
            let Some((target, result)) = dialed else {
                break;
            };
            // Transitions are logged from the state /readyz serves, which
            // client dials update too.
            match result {
                Ok(stream) => {
                    drop(stream);
                    if metrics.proxy().upstream_reached(target) {
                        info!(upstream = %target, "upstream reachable again");
                    }
                }
                Err(e) => {
                    if metrics.proxy().upstream_unreachable(target) {
                        let ready = metrics.proxy().upstream_is_up();
                        warn!(
                            upstream = %target, error = %e, readyz = if ready { 200 } else { 503 },
                            "upstream unreachable"
                        );
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(probe.interval) => {}
        }
    }
}

type HttpResponse = Response<Full<Bytes>>;

fn route(context: &AdminContext, request: &Request<Incoming>) -> HttpResponse {
    let path = request.uri().path();
    let finding = path.strip_prefix("/findings/");
    let known = finding.is_some()
        || matches!(
            path,
            "/healthz"
                | "/readyz"
                | "/metrics"
                | "/sessions"
                | "/violations"
                | "/findings"
                | "/reload"
        );
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    // The one route that changes state takes POST; the rest are reads.
    let (allowed, refusal, allow) = if path == "/reload" {
        (Method::POST, "only POST is supported\n", "POST")
    } else {
        (Method::GET, "only GET is supported\n", "GET")
    };
    if request.method() != allowed {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, refusal);
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
        return response;
    }
    let open = matches!(path, "/healthz" | "/metrics");
    if !open {
        if let Some(token) = &context.token {
            if let Some(response) = authorize(token, request) {
                return response;
            }
        }
    }
    let query = request.uri().query().unwrap_or("");
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readyz(&context.metrics),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(context.metrics.render())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_CONTENT_TYPE));
            response
        }
        "/sessions" => match &context.engine {
            Some(engine) => sessions(engine, query),
            None => no_engine(),
        },
        "/violations" => match &context.engine {
            Some(engine) => violations(engine),
            None => no_engine(),
        },
        "/findings" => match &context.engine {
            Some(engine) => json(StatusCode::OK, &engine.findings()),
            None => no_engine(),
        },
        "/reload" => match &context.reload {
            Some(reloader) => match reloader.reload("POST /reload") {
                Ok(reloaded) => json(StatusCode::OK, &reloaded),
                Err(e) => bad_request(e.to_string()),
            },
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "configuration reload is not available in this process\n",
            ),
        },
        _ => match (finding, &context.engine) {
            (Some(_), None) => no_engine(),
            (Some(id), Some(engine)) => match id.parse().ok().and_then(|id| engine.finding(id)) {
                Some(detail) => json(StatusCode::OK, &detail),
                None => text(StatusCode::NOT_FOUND, "no such finding\n"),
            },
            (None, _) => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// `None` when the request carries the token, else the 401 to send.
fn authorize(token: &AdminToken, request: &Request<Incoming>) -> Option<HttpResponse> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, credentials) = value.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| credentials.trim())
        });
    let challenge = match presented {
        None => "Bearer realm=\"sessionguard\"",
        Some(presented) if constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) => {
            return None;
        }
        Some(_) => "Bearer realm=\"sessionguard\", error=\"invalid_token\"",
    };
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "a valid bearer token is required\n",
    );
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    Some(response)
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for index in 0..a.len().max(b.len()) {
        let x = a.get(index).copied().unwrap_or(0);
        let y = b.get(index).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

fn readyz(metrics: &Metrics) -> HttpResponse {
    #[derive(Serialize)]
    struct Readiness {
        ready: bool,
        draining: bool,
        upstream_reachable: bool,
    }
    let draining = metrics.proxy().is_draining();
    let upstream_reachable = metrics.proxy().upstream_is_up();
    let ready = !draining && upstream_reachable;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &Readiness {
            ready,
            draining,
            upstream_reachable,
        },
    )
}

fn no_engine() -> HttpResponse {
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the session engine is not running in this process\n",
    )
}

/// The `state` filter of `/sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StateFilter {
    All,
    Active,
    Ended,
    InTransaction,
    Held,
}

impl StateFilter {
    fn parse(value: &str) -> Option<StateFilter> {
        Some(match value {
            "active" => StateFilter::Active,
            "ended" => StateFilter::Ended,
            "in_transaction" => StateFilter::InTransaction,
            "held" => StateFilter::Held,
            _ => return None,
        })
    }

    fn matches(self, session: &SessionSummary) -> bool {
        match self {
            StateFilter::All => true,
            StateFilter::Active => !session.is_ended(),
            StateFilter::Ended => session.is_ended(),
            StateFilter::InTransaction => session.in_transaction(),
            StateFilter::Held => session.held,
        }
    }
}

fn bad_request(message: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(message + "\n")));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn sessions(engine: &SessionEngine, query: &str) -> HttpResponse {
    let mut filter = StateFilter::All;
    let mut limit = DEFAULT_SESSIONS_LIMIT;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "state" => match StateFilter::parse(value) {
                Some(parsed) => filter = parsed,
                None => {
                    return bad_request(format!(
                        "state: `{value}` is not one of active, ended, in_transaction, held"
                    ))
                }
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_SESSIONS_LIMIT).contains(&n) => limit = n,
                _ => {
                    return bad_request(format!(
                        "limit: `{value}` is not a number between 1 and {MAX_SESSIONS_LIMIT}"
                    ))
                }
            },
            other => {
                return bad_request(format!(
                    "unknown parameter `{other}` (expected state, limit)"
                ))
            }
        }
    }

    // Summaries are copied out of the ledger (no strings yet), so no shard
    // lock is held while sorting and rendering.
    let mut matched = engine.session_summaries(|session| filter.matches(session));
    let total = matched.len();
    matched.sort_by_key(|(_, session)| std::cmp::Reverse(session.last_used));
    matched.truncate(limit);

    let clock = Clock::of(engine);
    let sessions: Vec<SessionJson> = matched
        .iter()
        .map(|(key, session)| render(key, session, engine, &clock))
        .collect();
    #[derive(Serialize)]
    struct Listing {
        total: usize,
        returned: usize,
        sessions: Vec<SessionJson>,
    }
    json(
        StatusCode::OK,
        &Listing {
            total,
            returned: sessions.len(),
            sessions,
        },
    )
}

/// Converts the engine's clock (ms since its start) to wall-clock times.
struct Clock {
    wall_now: SystemTime,
    engine_now: Millis,
}

impl Clock {
    fn of(engine: &SessionEngine) -> Clock {
        Clock {
            wall_now: SystemTime::now(),
            engine_now: engine.now(),
        }
    }

    fn rfc3339(&self, at: Millis) -> String {
        let ago = Duration::from_millis(self.engine_now.saturating_sub(at));
        let wall = self.wall_now.checked_sub(ago).unwrap_or(self.wall_now);
        humantime::format_rfc3339_millis(wall).to_string()
    }
}

/// One session as `/sessions` shows it.
fn render(
    key: &SessionKey,
    session: &SessionSummary,
    engine: &SessionEngine,
    clock: &Clock,
) -> SessionJson {
    let state = match session.ended {
        None => "active",
        Some((EndKind::Ended, _)) => "ended",
        Some((EndKind::Killed | EndKind::KilledByPattern, _)) => "killed",
    };
    SessionJson {
        lsid: key.lsid.to_string(),
        lsid_short: key.lsid.short().to_string(),
        owner: engine.owner_name(key.owner).map(|owner| owner.to_string()),
        state,
        held: session.held,
        in_transaction: session.in_transaction(),
        in_flight: session.in_flight,
        open_cursors: session.open_cursors,
        highest_txn_number: session.highest_txn,
        transaction: session
            .txn
            .map(|(number, phase, statements, started_at)| TransactionJson {
                txn_number: number,
                phase: phase_name(phase),
                statements,
                started_at: clock.rfc3339(started_at),
            }),
        first_seen: clock.rfc3339(session.first_seen),
        last_used: clock.rfc3339(session.last_used),
        last_refreshed: (session.last_refreshed > 0).then(|| clock.rfc3339(session.last_refreshed)),
        refreshes: session.refreshes,
        ended_at: session.ended.map(|(_, at)| clock.rfc3339(at)),
    }
}

fn phase_name(phase: TxnPhase) -> &'static str {
    match phase {
        TxnPhase::Open => "open",
        TxnPhase::LikelyAborted => "likely_aborted",
        TxnPhase::ServerAborted { .. } => "server_aborted",
        TxnPhase::Uncertain => "uncertain",
        TxnPhase::Committing => "committing",
        TxnPhase::Committed => "committed",
        TxnPhase::Aborted => "aborted",
    }
}

#[derive(Debug, Serialize)]
struct TransactionJson {
    txn_number: i64,
    phase: &'static str,
    statements: u32,
    started_at: String,
}

#[derive(Debug, Serialize)]
struct SessionJson {
    lsid: String,
    lsid_short: String,
    owner: Option<String>,
    /// `active`, `ended` or `killed`.
    state: &'static str,
    held: bool,
    in_transaction: bool,
    in_flight: usize,
    open_cursors: u16,
    highest_txn_number: Option<i64>,
    transaction: Option<TransactionJson>,
    first_seen: String,
    last_used: String,
    last_refreshed: Option<String>,
    refreshes: u32,
    ended_at: Option<String>,
}

fn violations(engine: &SessionEngine) -> HttpResponse {
    let records: Vec<Arc<ViolationRecord>> = engine.violations();
    let body: Vec<_> = records.iter().map(|record| record.json()).collect();
    json(StatusCode::OK, &body)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => {
            warn!(error = %e, "cannot encode an admin response");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the response\n",
            )
        }
    }
}

/// A plain-text response (the admin API's and the marks endpoint's).
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> HttpResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    fn context(token: Option<&str>) -> AdminContext {
        AdminContext {
            metrics: Arc::new(Metrics::new()),
            engine: None,
            token: token.map(AdminToken::new),
            probe: None,
            reload: None,
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[tokio::test]
    async fn healthz_is_ok_and_unknown_paths_and_methods_are_refused() {
        let shutdown = CancellationToken::new();
        let server = serve_with("127.0.0.1:0", context(None), shutdown.clone())
            .await
            .unwrap();
        let ok = get(server.local_addr, "/healthz", None).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.ends_with("ok\n"), "{ok}");
        let missing = get(server.local_addr, "/nope", None).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        for path in ["/violations", "/findings", "/findings/0ddf2e84286a"] {
            let no_engine = get(server.local_addr, path, None).await;
            assert!(no_engine.starts_with("HTTP/1.1 503"), "{path}: {no_engine}");
        }
        let nested = get(server.local_addr, "/findingsx", None).await;
        assert!(nested.starts_with("HTTP/1.1 404"), "{nested}");

        let mut stream = tokio::net::TcpStream::connect(server.local_addr)
            .await
            .unwrap();
        stream
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut post = String::new();
        stream.read_to_string(&mut post).await.unwrap();
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.to_ascii_lowercase().contains("allow: get"), "{post}");
        shutdown.cancel();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn token_guards_all_but_healthz_and_metrics() {
        let shutdown = CancellationToken::new();
        let token = "0123456789abcdef-token";
        let server = serve_with("127.0.0.1:0", context(Some(token)), shutdown.clone())
            .await
            .unwrap();
        let addr = server.local_addr;
        assert!(get(addr, "/healthz", None)
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics", None)
            .await
            .starts_with("HTTP/1.1 200"));
        let missing = get(addr, "/readyz", None).await;
        assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
        for path in ["/findings", "/findings/0ddf2e84286a"] {
            let missing = get(addr, path, None).await;
            assert!(missing.starts_with("HTTP/1.1 401"), "{path}: {missing}");
        }
        let wrong = get(addr, "/readyz", Some("Bearer 0123456789abcdef-tokeX")).await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        assert!(wrong.contains("invalid_token"), "{wrong}");
        let basic = get(addr, "/readyz", Some(&format!("Basic {token}"))).await;
        assert!(basic.starts_with("HTTP/1.1 401"), "{basic}");
        let right = get(addr, "/readyz", Some(&format!("bearer {token}"))).await;
        assert!(right.starts_with("HTTP/1.1 200"), "{right}");
        shutdown.cancel();
        server.task.await.unwrap();
    }
}
