//! sessionguard: a MongoDB wire-protocol proxy that enforces session
//! hygiene. This crate is the shipped product around the layers below it:
//! the configuration file, the command line (`src/main.rs`), the admin API,
//! live reload, CI mode (`exec`) and its reports, logging, the metrics
//! registry, and the glue that puts the session engine
//! (`sessionguard-engine`) behind the data path's `Inspector` seam
//! (`sessionguard-proxy`) and drives its refresher. It must not link the
//! emulator or the MongoDB driver (dev tooling and tests only), and it holds
//! no wire-protocol parsing, session rules or socket handling of its own:
//! those live in the crates it builds on.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, documented defaults, validation
//!   naming the key, CLI/env overrides, and the proxy's settings from it.
//! - `start`: [`start_proxy`], the data path as `[proxy]` configures it.
//! - `inspector`: [`EngineInspector`], the session engine behind the
//!   proxy's `Inspector` seam.
//! - `refresher`: [`spawn_refresher`], the refresher's driver loop (timer,
//!   injection).
//! - [`metrics`]: the Prometheus registry (the data path's handles are
//!   registered in it) and the session engine's scrape-time collector.
//! - [`admin`]: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`,
//!   `/sessions`, `/violations`, `/findings`, `POST /reload`).
//! - [`reload`]: live reload of the configuration file (SIGHUP,
//!   `POST /reload`): the mode and rules go live, the rest is named as
//!   needing a restart.
//! - [`telemetry`]: `tracing` subscriber setup (pretty or JSON logs).
//! - [`report`]: the run summary (JSON, JUnit XML, text) and the exit-code
//!   policy of CI mode.
//! - [`exec`]: `sessionguard exec -- CMD`: a private proxy around one child
//!   process (CI mode).
//! - `marks`: the marks endpoint of `exec` (`SESSIONGUARD_MARKS_URL`): test
//!   runners post when each test began and ended (`integrations/PROTOCOL.md`).
//! - `peer_process`: which local process opened a client connection
//!   (Linux `/proc`), looked up off the data path.
//! - `request_times`: each request's receive time to the microsecond (`exec`).
//! - `attribution`: pairs marks into test intervals and names the tests
//!   and process behind a request, at report time.
#![forbid(unsafe_code)]

pub mod admin;
mod attribution;
pub mod config;
pub mod exec;
mod inspector;
mod marks;
pub mod metrics;
mod peer_process;
mod refresher;
pub mod reload;
pub mod report;
mod request_times;
mod start;
pub mod telemetry;

pub use inspector::EngineInspector;
pub use refresher::spawn_refresher;
pub use start::start_proxy;
