//! Shared scaffolding for integration tests: the emulator on an ephemeral
//! loopback port and the proxy in front of it, plus driver clients pointed at
//! either. Every test builds its own stack, so tests never share state.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use sessionguard::config::ProxyConfig;
use sessionguard::metrics::Metrics;
use sessionguard::start_proxy;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_proxy::{Inspector, NoopInspector, ProxyHandle};

pub(crate) struct Stack {
    pub emulator: EmulatorHandle,
    pub proxy: ProxyHandle,
    /// The registry the proxy records into.
    pub metrics: Arc<Metrics>,
}

impl Stack {
    /// Emulator with `emulator_config`, proxy with defaults and no inspector.
    pub(crate) async fn start(emulator_config: EmulatorConfig) -> Stack {
        Stack::start_with(emulator_config, Arc::new(NoopInspector)).await
    }

    pub(crate) async fn start_with(
        emulator_config: EmulatorConfig,
        inspector: Arc<impl Inspector>,
    ) -> Stack {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let emulator = Emulator::start(loopback, emulator_config)
            .await
            .expect("emulator starts");
        let config = ProxyConfig {
            listen: "127.0.0.1:0".to_string(),
            upstream: format!("mongodb://{}", emulator.addr()),
            ..ProxyConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let proxy = start_proxy(&config, inspector, &metrics)
            .await
            .expect("proxy starts");
        Stack {
            emulator,
            proxy,
            metrics,
        }
    }

    /// A connection string through the proxy (`extra` is appended to the options).
    pub(crate) fn proxy_uri(&self, extra: &str) -> String {
        format!(
            "mongodb://{}/?directConnection=true{extra}",
            self.proxy.local_addr()
        )
    }

    /// A Rust driver client that reaches the emulator through the proxy.
    pub(crate) async fn client(&self) -> Client {
        self.client_with("").await
    }

    pub(crate) async fn client_with(&self, extra: &str) -> Client {
        Client::with_uri_str(self.proxy_uri(extra))
            .await
            .expect("client options parse")
    }

    /// Polls `condition` until it holds or `timeout` passes.
    pub(crate) async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn stop(self) {
        self.proxy.shutdown_now();
        self.proxy.wait().await;
        self.emulator.shutdown().await;
    }
}

// ------------------------------------------------------------ reliability
// Shared by the reliability suites (hostile clients, upstream faults,
// bounded memory, admin security).

/// A running proxy and the registry it records into (the session engine's
/// collector included). Derefs to the proxy's handle.
pub(super) struct GuardedProxy {
    pub handle: ProxyHandle,
    pub metrics: Arc<Metrics>,
}

impl GuardedProxy {
    /// The registry (`metrics().render()` is what `/metrics` serves).
    pub(super) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(super) async fn wait(self) {
        self.handle.wait().await;
    }
}

impl std::ops::Deref for GuardedProxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

/// A proxy in front of a running emulator, with the session engine as its
/// inspector and `tweak` applied to the test defaults (loopback, port 0).
pub(super) async fn guarded_proxy(
    upstream: SocketAddr,
    engine: Arc<sessionguard_engine::SessionEngine>,
    tweak: impl FnOnce(&mut ProxyConfig),
) -> GuardedProxy {
    let mut config = ProxyConfig {
        listen: "127.0.0.1:0".to_string(),
        upstream: format!("mongodb://{upstream}"),
        admin: "127.0.0.1:0".to_string(),
        ..ProxyConfig::default()
    };
    tweak(&mut config);
    let metrics = Arc::new(Metrics::new());
    metrics
        .register_session_engine(engine.clone())
        .expect("engine collector registers");
    let inspector = Arc::new(sessionguard::EngineInspector::new(engine));
    let handle = start_proxy(&config, inspector, &metrics)
        .await
        .expect("proxy starts");
    GuardedProxy { handle, metrics }
}

thread_local! {
    /// The engine's records of the requests `engine_request` sent that await
    /// their replies, by (engine, connection, request id), oldest first: the
    /// engine keeps none itself (the proxy's in-flight table does), so the
    /// test keeps them in its place.
    static ENGINE_IN_FLIGHT: std::cell::RefCell<Vec<(usize, u64, i32, sessionguard_engine::PendingRequest)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn engine_key(engine: &sessionguard_engine::SessionEngine) -> usize {
    std::ptr::from_ref(engine) as usize
}

/// Hands `doc` to `engine` as an OP_MSG request (request id `id`, `flags`)
/// on connection `conn` at engine time `now`: the engine alone, time driven
/// by the test.
pub(super) fn engine_request(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    id: i32,
    doc: &bson::RawDocumentBuf,
    flags: u32,
    now: u64,
) -> sessionguard_engine::Decision {
    let (decision, pending) = as_op_msg(id, 0, flags, doc, |msg| {
        engine.request_at(conn, id, msg, now)
    });
    if let Some(pending) = pending {
        let key = engine_key(engine);
        ENGINE_IN_FLIGHT.with_borrow_mut(|table| table.push((key, conn, id, pending)));
    }
    decision
}

/// Hands `doc` to `engine` as the reply to request `to` on `conn` at `now`.
pub(super) fn engine_reply(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    to: i32,
    doc: &bson::RawDocumentBuf,
    now: u64,
) {
    let key = engine_key(engine);
    // Matched as the proxy matches it: the latest request with that id.
    let Some(mut pending) = ENGINE_IN_FLIGHT.with_borrow_mut(|table| {
        let position = table
            .iter()
            .rposition(|(k, c, id, _)| (*k, *c, *id) == (key, conn, to))?;
        Some(table.remove(position).3)
    }) else {
        return;
    };
    as_op_msg(1000 + to, to, 0, doc, |msg| {
        engine.reply_at(conn, &mut pending, msg, now)
    });
}

/// Closes connection `conn` of `engine` at `now`, handing back what is
/// still in flight on it (as the proxy does).
pub(super) fn engine_close(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    cause: sessionguard_protocol::CloseCause,
    now: u64,
) {
    let key = engine_key(engine);
    let left: Vec<_> = ENGINE_IN_FLIGHT.with_borrow_mut(|table| {
        let (left, kept) = std::mem::take(table)
            .into_iter()
            .partition(|(k, c, _, _)| (*k, *c) == (key, conn));
        *table = kept;
        left
    });
    engine.close_at(conn, cause, left.into_iter().map(|(_, _, _, p)| p), now);
}

/// `doc` as a parsed OP_MSG frame.
fn as_op_msg<R>(
    id: i32,
    response_to: i32,
    flags: u32,
    doc: &bson::RawDocumentBuf,
    then: impl FnOnce(&sessionguard_protocol::wire::Message<'_>) -> R,
) -> R {
    use sessionguard_protocol::wire::{op_msg, Message, MsgFlags, OpMsg, HEADER_LEN};
    let frame = op_msg::encode(id, response_to, MsgFlags(flags), doc.as_bytes());
    let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
    then(&Message::Msg(msg))
}

/// The value of one series in a Prometheus text exposition (`name{labels}`
/// exactly as the encoder writes it); `None` when absent.
pub(super) fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

/// Every log line of this test process, captured by a global `tracing`
/// subscriber (installed once, DEBUG and up). Tests running in parallel
/// share it, so each one picks its lines by something only it has (a peer
/// address, a marker).
pub(crate) mod logs {
    use std::sync::OnceLock;

    use super::ThreadLogs as Sink;

    static SINK: OnceLock<Sink> = OnceLock::new();

    /// Installs the capture at DEBUG (idempotent).
    pub(crate) fn install() {
        install_at(tracing::Level::DEBUG);
    }

    /// Installs the capture at `level` (the first call in a test binary
    /// decides; later calls change nothing).
    pub(crate) fn install_at(level: tracing::Level) {
        SINK.get_or_init(|| {
            let sink = Sink::default();
            tracing::subscriber::set_global_default(sink.subscriber(level))
                .expect("no other global subscriber in this test binary");
            sink
        });
    }

    /// Every captured line so far.
    pub(crate) fn lines() -> Vec<String> {
        let Some(sink) = SINK.get() else {
            return Vec::new();
        };
        sink.text().lines().map(str::to_string).collect()
    }

    /// Captured lines containing `needle`.
    pub(crate) fn containing(needle: &str) -> Vec<String> {
        lines().into_iter().filter(|l| l.contains(needle)).collect()
    }

    /// How many lines have been captured so far (see `containing_since`).
    pub(crate) fn mark() -> usize {
        lines().len()
    }

    /// Lines captured after `mark` containing `needle` (a peer address
    /// can recur in older lines once the kernel reuses its port).
    pub(crate) fn containing_since(mark: usize, needle: &str) -> Vec<String> {
        lines()
            .into_iter()
            .skip(mark)
            .filter(|l| l.contains(needle))
            .collect()
    }
}

/// A well-behaved Rust driver workload (insert, find by _id, update,
/// count) looping on `workers` tasks until stopped; every error is kept.
pub(super) struct Workload {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

/// What a workload did.
#[derive(Debug)]
pub(super) struct WorkloadResult {
    pub operations: u64,
    pub errors: Vec<String>,
}

impl Workload {
    pub(super) fn start(client: &Client, database: &str, workers: usize) -> Workload {
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = (0..workers)
            .map(|worker| {
                let items = client
                    .database(database)
                    .collection::<bson::Document>("items");
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut operations = 0u64;
                    let mut errors = Vec::new();
                    let mut n = 0i64;
                    while !stop.is_cancelled() {
                        let id = format!("w{worker}-{n}");
                        n += 1;
                        let result: Result<(), String> = async {
                            let failed = |op: &str| {
                                let op = op.to_string();
                                move |e: mongodb::error::Error| format!("{op}: {e}")
                            };
                            items
                                .insert_one(bson::doc! { "_id": &id, "n": n })
                                .await
                                .map_err(failed("insert"))?;
                            let found = items
                                .find_one(bson::doc! { "_id": &id })
                                .await
                                .map_err(failed("find"))?;
                            if found.is_none() {
                                return Err(format!("{id} not found after its insert"));
                            }
                            items
                                .update_one(
                                    bson::doc! { "_id": &id },
                                    bson::doc! { "$inc": { "n": 1 } },
                                )
                                .await
                                .map_err(failed("update"))?;
                            items
                                .count_documents(bson::doc! { "_id": &id })
                                .await
                                .map(|_| ())
                                .map_err(failed("count"))
                        }
                        .await;
                        match result {
                            Ok(()) => operations += 4,
                            Err(e) => errors.push(e),
                        }
                    }
                    (operations, errors)
                })
            })
            .collect();
        Workload { stop, tasks }
    }

    pub(super) async fn stop(self) -> WorkloadResult {
        self.stop.cancel();
        let mut result = WorkloadResult {
            operations: 0,
            errors: Vec::new(),
        };
        for task in self.tasks {
            let (operations, errors) = task.await.expect("workload task");
            result.operations += operations;
            result.errors.extend(errors);
        }
        result
    }
}

/// One admin HTTP response.
#[derive(Debug)]
pub(crate) struct HttpReply {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// A plain HTTP/1.1 GET (an admin API needs no client crate).
pub(crate) async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpReply {
    http_request(addr, "GET", path, token).await
}

/// A plain HTTP/1.1 request without a body (`POST /reload`, or a method a
/// route refuses).
pub(super) async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> HttpReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin accepts");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let length = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}{length}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .expect("admin answers in time")
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Serves the admin API for `proxy` (its metrics), probing `upstream`
/// every 100 ms so `/readyz` follows the upstream quickly.
pub(super) async fn admin_for(
    proxy: &GuardedProxy,
    engine: Option<Arc<sessionguard_engine::SessionEngine>>,
    upstream: SocketAddr,
    token: Option<&str>,
) -> (
    sessionguard::admin::AdminServer,
    tokio_util::sync::CancellationToken,
) {
    let context = sessionguard::admin::AdminContext {
        metrics: proxy.metrics().clone(),
        engine,
        token: token.map(sessionguard::config::AdminToken::new),
        probe: Some(sessionguard::admin::UpstreamProbe {
            targets: vec![sessionguard_proxy::HostPort {
                host: upstream.ip().to_string(),
                port: upstream.port(),
            }],
            interval: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
        }),
        reload: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let admin = sessionguard::admin::serve_with("127.0.0.1:0", context, shutdown.clone())
        .await
        .expect("admin starts");
    (admin, shutdown)
}

/// The built `sessionguard` binary, with nothing inherited from the test
/// runner's environment that would configure it: no `SESSIONGUARD_*`
/// variables (every setting has one), no `RUST_LOG` (tests read its logs),
/// no `MONGODB_URI` (what `exec` hands its child, and what `demo-app` reads).
/// A test sets what it needs on the returned command. For tokio, use
/// `tokio::process::Command::from(sessionguard_command())`.
pub(super) fn sessionguard_command() -> std::process::Command {
    clean_command(&sessionguard_bin())
}

/// `sessionguard_command` for the dev tools' binary (`sessionguard-dev`:
/// `demo`, `demo-app`, `emulator`, `bench-load`).
pub(super) fn dev_command() -> std::process::Command {
    clean_command(&dev_bin())
}

fn clean_command(program: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|key| key.starts_with("SESSIONGUARD_"))
        {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG").env_remove("MONGODB_URI");
    command
}

/// The shipped `sessionguard` binary: cargo's own path when the tests are
/// this package's, else the workspace's (built first: see `workspace_bin`).
pub(super) fn sessionguard_bin() -> std::path::PathBuf {
    match option_env!("CARGO_BIN_EXE_sessionguard") {
        Some(path) => path.into(),
        None => workspace_bin("sessionguard", "sessionguard"),
    }
}

/// The dev tools' `sessionguard-dev` binary (as `sessionguard_bin`).
pub(super) fn dev_bin() -> std::path::PathBuf {
    match option_env!("CARGO_BIN_EXE_sessionguard-dev") {
        Some(path) => path.into(),
        None => workspace_bin("sessionguard-dev", "sessionguard-dev"),
    }
}

/// Binary `bin` of workspace package `package`, for the profile and target
/// directory of the test running. Cargo hands a test the paths of its own
/// package's binaries only, so another package's is built here, once per
/// test process: a no-op when `cargo nextest run --workspace` (or a
/// `cargo build` of it) already did, and it keeps a stale one from being
/// used when only this package's tests were built.
fn workspace_bin(package: &str, bin: &str) -> std::path::PathBuf {
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    // <target>/<profile>/deps/<test binary>
    let test = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("tests run from <target>/<profile>/deps");
    let path = profile_dir.join(bin);
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == bin) {
        let target_dir = profile_dir.parent().expect("a target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("no profile directory in {}", test.display()),
        };
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--manifest-path", manifest])
            .args(["--package", package, "--bin", bin, "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build of {bin} failed");
        built.push(bin.to_string());
    }
    path
}

/// The `sessionguard proxy` binary as a child process, configured by a TOML
/// text, logging JSON to a file (the tests read bound addresses from it).
pub(super) struct ProxyProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl ProxyProcess {
    /// Starts `sessionguard proxy --config <config_toml> [extra args]` with no
    /// `SESSIONGUARD_*` variables inherited; waits until it listens. `{dir}`
    /// in an extra argument is the process's temporary directory.
    pub(super) fn start(config_toml: &str, extra_args: &[&str]) -> ProxyProcess {
        ProxyProcess::start_with_env(config_toml, extra_args, &[])
    }

    /// `start` with these `SESSIONGUARD_*` (or other) variables set.
    pub(super) fn start_with_env(
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("sessionguard.toml");
        std::fs::write(&config, config_toml).expect("config written");
        let log = dir.path().join("proxy.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = sessionguard_command()
            .args(["proxy", "--config"])
            .arg(&config)
            .args(
                extra_args
                    .iter()
                    .map(|arg| arg.replace("{dir}", &dir.path().to_string_lossy())),
            )
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::from(
                log_file.try_clone().expect("log file"),
            ))
            .stderr(std::process::Stdio::from(log_file))
            .spawn()
            .expect("the sessionguard binary starts");
        let mut process = ProxyProcess {
            child,
            log,
            dir,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
        };
        process.listen = process
            .wait_for_field("proxy listening", "listen")
            .parse()
            .expect("a listen address");
        process.admin = process
            .wait_for_field("admin server listening", "admin")
            .parse()
            .expect("an admin address");
        process
    }

    /// The log so far.
    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `field` of the first JSON log line whose message is `message`.
    pub(super) fn wait_for_field(&mut self, message: &str, field: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            let text = self.log_text();
            for line in text.lines() {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if entry["message"] == message {
                    if let Some(value) = entry[field].as_str() {
                        return value.to_string();
                    }
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the proxy exited ({status}) before logging `{message}`:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no `{message}` log line within 15s");
    }

    /// Resident memory of the process in KiB (`VmRSS` in /proc/PID/status).
    pub(super) fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status is readable");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }

    /// SIGTERM, then waits (up to 15 s) for a clean exit.
    pub(super) fn terminate(&mut self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap())
            .expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("signal sent");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "the proxy exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the proxy did not exit within 15s of SIGTERM");
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Log output of the current thread, for tests on a current-thread runtime
/// (the proxy's, engine's and emulator's tasks then log on the test's
/// thread). Unlike `logs`, which installs one global subscriber per test
/// binary, each test gets its own capture at its own level.
#[derive(Clone, Default)]
pub(crate) struct ThreadLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for ThreadLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ThreadLogs {
    /// Captures this thread's events at `level` and above until the guard drops.
    pub(crate) fn install_at(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(self.subscriber(level))
    }

    /// A plain-text subscriber writing here, at `level` and above.
    pub(crate) fn subscriber(
        &self,
        level: tracing::Level,
    ) -> impl tracing::Subscriber + Send + Sync {
        let capture = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || capture.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish()
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// The proxy's lines (the emulator may log on the same thread).
    pub(crate) fn proxy_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("sessionguard_proxy"))
            .map(str::to_string)
            .collect()
    }

    /// The proxy's WARN lines.
    pub(crate) fn proxy_warn_lines(&self) -> Vec<String> {
        self.proxy_lines()
            .into_iter()
            .filter(|l| l.contains(" WARN "))
            .collect()
    }
}

// ------------------------------------------------------------ handshakes

/// What a fresh plain connection got for its first frame: the reply (if
/// any) and whether the peer then closed the connection.
#[derive(Debug)]
pub(super) struct HandshakeOutcome {
    /// The opcode of the reply (OP_MSG for a hello, OP_REPLY for a legacy
    /// OP_QUERY isMaster), its `responseTo` and its body.
    pub reply: Option<(sessionguard_protocol::wire::OpCode, i32, bson::Document)>,
    pub closed: bool,
}

/// Connects to `addr` and sends one handshake as a driver's first frame: a
/// `hello` as OP_MSG, or (`legacy`) an `isMaster` as OP_QUERY on
/// `admin.$cmd`, request id 7. Reads one reply, then waits (bounded) for
/// the peer to close.
pub(super) async fn handshake_once(addr: SocketAddr, legacy: bool) -> HandshakeOutcome {
    use futures_util::StreamExt;
    use sessionguard_protocol::wire::{self, legacy as wire_legacy, op_msg, Message, MsgFlags};
    use tokio::io::AsyncWriteExt;

    const WAIT: Duration = Duration::from_secs(10);
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let frame = if legacy {
        let query = bson::to_vec(&bson::doc! { "isMaster": 1, "helloOk": true }).unwrap();
        wire_legacy::encode_query(7, 0, "admin.$cmd", 0, -1, &query)
    } else {
        let body = bson::to_vec(&bson::doc! { "hello": 1, "$db": "admin" }).unwrap();
        op_msg::encode(7, 0, MsgFlags(0), &body)
    };
    stream.write_all(&frame).await.expect("write the handshake");
    let mut reader = tokio_util::codec::FramedRead::new(stream, wire::FrameCodec::default());
    let reply = match tokio::time::timeout(WAIT, reader.next()).await {
        Err(_) => panic!("neither a reply nor a close within {WAIT:?}"),
        Ok(None) | Ok(Some(Err(_))) => {
            return HandshakeOutcome {
                reply: None,
                closed: true,
            }
        }
        Ok(Some(Ok(frame))) => {
            let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
            let body = match opened.parse(&frame).unwrap() {
                Message::Msg(msg) => bson::Document::try_from(msg.body).unwrap(),
                Message::Reply(reply) => {
                    bson::Document::try_from(reply.first().expect("a document")).unwrap()
                }
                other => panic!("unexpected reply {other:?}"),
            };
            (frame.header.op_code, frame.header.response_to, body)
        }
    };
    let closed = matches!(
        tokio::time::timeout(WAIT, reader.next()).await,
        Ok(None) | Ok(Some(Err(_)))
    );
    HandshakeOutcome {
        reply: Some(reply),
        closed,
    }
}
