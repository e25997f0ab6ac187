//! The stacks a test runs against: the emulator on an ephemeral loopback
//! port with the proxy in front of it (`Stack`), the same with a real
//! `SessionEngine` as the proxy's inspector and, when asked, the refresher
//! (`Guarded`), and a proxy with the engine in front of an upstream the
//! test runs itself (`guarded_proxy`: a relay, a restartable emulator).
//! Every test builds its own, so tests never share state; it must not hide
//! a timing guess: what a test waits for is an observable condition.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use sessionguard::config::ProxyConfig;
use sessionguard::metrics::Metrics;
use sessionguard::{spawn_refresher, start_proxy, EngineInspector};
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_engine::{
    RuleId, RulesConfig, SessionConfig, SessionEngine, StoreCounts, StoreStats, ViolationRecord,
};
use sessionguard_proxy::{Inspector, NoopInspector, ProxyHandle};
use tokio::task::JoinHandle;

use crate::exposition::metric;
use crate::wait::{eventually, WAIT};

pub struct Stack {
    pub emulator: EmulatorHandle,
    pub proxy: ProxyHandle,
    /// The registry the proxy records into.
    pub metrics: Arc<Metrics>,
}

impl Stack {
    /// Emulator with `emulator_config`, proxy with defaults and no inspector.
    pub async fn start(emulator_config: EmulatorConfig) -> Stack {
        Stack::start_with(emulator_config, Arc::new(NoopInspector)).await
    }

    pub async fn start_with(
        emulator_config: EmulatorConfig,
        inspector: Arc<impl Inspector>,
    ) -> Stack {
        Stack::start_tweaked(emulator_config, inspector, Arc::new(Metrics::new()), |_| {}).await
    }

    /// `start_with`, recording into `metrics`, with `tweak` applied to the
    /// proxy's test defaults (loopback, port 0).
    pub async fn start_tweaked(
        emulator_config: EmulatorConfig,
        inspector: Arc<impl Inspector>,
        metrics: Arc<Metrics>,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Stack {
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let emulator = Emulator::start(loopback, emulator_config)
            .await
            .expect("emulator starts");
        let mut config = ProxyConfig {
            listen: "127.0.0.1:0".to_string(),
            upstream: format!("mongodb://{}", emulator.addr()),
            ..ProxyConfig::default()
        };
        tweak(&mut config);
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
    pub fn proxy_uri(&self, extra: &str) -> String {
        format!(
            "mongodb://{}/?directConnection=true{extra}",
            self.proxy.local_addr()
        )
    }

    /// A Rust driver client that reaches the emulator through the proxy.
    pub async fn client(&self) -> Client {
        self.client_with("").await
    }

    pub async fn client_with(&self, extra: &str) -> Client {
        Client::with_uri_str(self.proxy_uri(extra))
            .await
            .expect("client options parse")
    }

    /// Polls `condition` until it holds or `timeout` passes (`eventually`).
    pub async fn eventually(timeout: Duration, condition: impl FnMut() -> bool) -> bool {
        eventually(timeout, condition).await
    }

    /// The value of one series of this proxy's `/metrics` (`name{labels}`
    /// exactly as the encoder writes it); panics when it is absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics.render(), series)
            .unwrap_or_else(|| panic!("{series} missing from the exposition"))
    }

    /// Requests the proxy has read from its clients (every opcode), from
    /// its own `sessionguard_frames_total`: counted before the inspector is
    /// asked, so it is what the engine must have inspected.
    pub fn requests_read(&self) -> u64 {
        let prefix = "sessionguard_frames_total{direction=\"client_to_upstream\",";
        self.metrics
            .render()
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum()
    }

    /// Waits (up to `timeout`) until `engine` has caught up with the traffic
    /// the proxy carried, so that "nothing fired" means the engine looked:
    /// it inspected at least one request and every request the proxy read
    /// from a client; with `all_closed`, every client connection has also
    /// closed and its close was judged (the proxy counts a connection open
    /// until the inspector has seen its close, and every reply read on it
    /// was inspected before that). Panics, saying what was missing, at the
    /// deadline: a stack whose traffic never reached the engine cannot pass.
    pub async fn engine_caught_up(
        &self,
        engine: &sessionguard_engine::SessionEngine,
        all_closed: bool,
        timeout: Duration,
    ) {
        let caught_up = || {
            let inspected = engine.stats().requests_inspected;
            let closed = !all_closed
                || (self.proxy.active_connections() == 0 && engine.stats().connections == 0);
            inspected > 0 && inspected >= self.requests_read() && closed
        };
        if !eventually(timeout, caught_up).await {
            panic!(
                "the engine did not catch up with the traffic within {timeout:?}: \
                 it inspected {} of the {} requests the proxy read; \
                 open connections: proxy {}, engine {} (all closed expected: {all_closed})",
                engine.stats().requests_inspected,
                self.requests_read(),
                self.proxy.active_connections(),
                engine.stats().connections,
            );
        }
    }

    pub async fn stop(self) {
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
pub struct GuardedProxy {
    pub handle: ProxyHandle,
    pub metrics: Arc<Metrics>,
}

impl GuardedProxy {
    /// The registry (`metrics().render()` is what `/metrics` serves).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub async fn wait(self) {
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
pub async fn guarded_proxy(
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

/// The emulator, the proxy with a real session engine as its inspector (its
/// collector registered in the stack's metrics), and (optionally) the
/// refresher.
pub struct Guarded {
    pub stack: Stack,
    pub engine: Arc<SessionEngine>,
    refresher: Option<JoinHandle<()>>,
}

impl Guarded {
    pub async fn start(emulator: EmulatorConfig, sessions: SessionConfig) -> Guarded {
        Guarded::start_with(emulator, sessions, RulesConfig::default(), false).await
    }

    pub async fn start_with(
        emulator: EmulatorConfig,
        sessions: SessionConfig,
        rules: RulesConfig,
        refresher: bool,
    ) -> Guarded {
        sessions.validate().expect("valid [sessions]");
        rules.validate().expect("valid [rules]");
        let engine = SessionEngine::new(&sessions, &rules);
        Guarded::with_engine(emulator, engine, refresher, |_| {}).await
    }

    /// A stack around an engine the test built (stores, a finding
    /// interval), with `tweak` applied to the proxy's test defaults.
    pub async fn with_engine(
        emulator: EmulatorConfig,
        engine: SessionEngine,
        refresher: bool,
        tweak: impl FnOnce(&mut ProxyConfig),
    ) -> Guarded {
        let engine = Arc::new(engine);
        let metrics = Arc::new(Metrics::new());
        metrics
            .register_session_engine(engine.clone())
            .expect("engine collector registers");
        let inspector = Arc::new(EngineInspector::new(engine.clone()));
        let stack = Stack::start_tweaked(emulator, inspector.clone(), metrics, tweak).await;
        let refresher = refresher.then(|| spawn_refresher(&inspector));
        Guarded {
            stack,
            engine,
            refresher,
        }
    }

    /// A driver client through the proxy, with an application name.
    pub async fn client(&self, app: &str) -> Client {
        self.stack.client_with(&format!("&appName={app}")).await
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.stack.proxy.local_addr()
    }

    pub fn fired(&self) -> Vec<RuleId> {
        self.engine.violations().iter().map(|v| v.rule).collect()
    }

    pub fn violations_of(&self, rule: RuleId) -> Vec<Arc<ViolationRecord>> {
        self.engine
            .violations()
            .into_iter()
            .filter(|v| v.rule == rule)
            .collect()
    }

    /// The counts of the web-session store labelled `label`.
    pub fn store(&self, label: &str) -> StoreCounts {
        let StoreStats { stores, .. } = self.engine.store_stats();
        stores
            .into_iter()
            .find(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("no store {label}"))
            .1
    }

    /// Waits until `rule` has fired (violations may be raised by a reply or a
    /// close that the proxy processes just after the client saw its result).
    pub async fn wait_for(&self, rule: RuleId) -> Arc<ViolationRecord> {
        let engine = self.engine.clone();
        let fired = eventually(WAIT, || engine.violations().iter().any(|v| v.rule == rule)).await;
        assert!(fired, "{rule} never fired; fired: {:?}", self.fired());
        self.violations_of(rule).remove(0)
    }

    /// Waits until the engine has inspected every request the proxy read
    /// (and at least one), then returns what fired. For a test whose
    /// connections are still open: each reply its clients got was inspected
    /// before it was forwarded.
    pub async fn settle(&self) -> Vec<RuleId> {
        self.stack.engine_caught_up(&self.engine, false, WAIT).await;
        self.fired()
    }

    /// `settle` once every client connection has closed and the engine has
    /// judged each close (after `Client::shutdown` or closing raw clients).
    pub async fn settle_closed(&self) -> Vec<RuleId> {
        self.stack.engine_caught_up(&self.engine, true, WAIT).await;
        self.fired()
    }

    pub async fn stop(self) {
        if let Some(task) = self.refresher {
            task.abort();
        }
        self.stack.stop().await;
    }
}
