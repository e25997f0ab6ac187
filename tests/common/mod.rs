//! Shared scaffolding for integration tests: the emulator on an ephemeral
//! loopback port and the proxy in front of it, plus driver clients pointed at
//! either. Every test builds its own stack, so tests never share state.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mongodb::Client;
use sessionguard::config::ProxyConfig;
use sessionguard::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard::proxy::{Inspector, NoopInspector, Proxy, ProxyHandle};

pub struct Stack {
    pub emulator: EmulatorHandle,
    pub proxy: ProxyHandle,
}

impl Stack {
    /// Emulator with `emulator_config`, proxy with defaults and no inspector.
    pub async fn start(emulator_config: EmulatorConfig) -> Stack {
        Stack::start_with(emulator_config, Arc::new(NoopInspector)).await
    }

    pub async fn start_with(
        emulator_config: EmulatorConfig,
        inspector: Arc<dyn Inspector>,
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
        let proxy = Proxy::start(Arc::new(config), inspector)
            .await
            .expect("proxy starts");
        Stack { emulator, proxy }
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

    /// Polls `condition` until it holds or `timeout` passes.
    pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
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

    pub async fn stop(self) {
        self.proxy.shutdown_now();
        self.proxy.wait().await;
        self.emulator.shutdown().await;
    }
}
