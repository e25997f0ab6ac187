//! sessionguard: a MongoDB wire-protocol proxy that enforces session hygiene.
//!
//! # Layout
//!
//! - [`proxy`]: the data path: listener, connection cap, drain, one upstream
//!   connection per client, frames forwarded unchanged, the `Inspector` seam.
//! - [`config`]: the TOML configuration, documented defaults, validation
//!   naming the key, CLI/env overrides.
//! - [`metrics`]: the Prometheus registry and the data path's pre-resolved
//!   metric handles; the session engine's counters are read at scrape time.
//! - [`admin`]: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`,
//!   `/sessions`, `/violations`, `/findings`, `POST /reload`).
//! - [`reload`]: live reload of the configuration file (SIGHUP,
//!   `POST /reload`): the mode and rules go live, the rest is named as
//!   needing a restart.
//! - [`telemetry`]: `tracing` subscriber setup (pretty or JSON logs).
//! - [`inspector`]: `EngineInspector`, the session engine behind the
//!   proxy's `Inspector` seam.
//! - [`refresher`]: the refresher's driver loop (timer, injection).
//! - [`report`]: the run summary (JSON, JUnit XML, text) and the exit-code
//!   policy of CI mode.
//! - [`exec`]: `sessionguard exec -- CMD`: a private proxy around one child
//!   process (CI mode).
//! - [`demo`]: `sessionguard demo` (a correct workload, then three session
//!   bugs, through the proxy: what sessionguard finds) and `demo-app`
//!   (trying `exec`).
//! - [`bench`]: `sessionguard bench-load`: the load generator and the memory
//!   measurements behind bench/compare.sh and docs/performance.md.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bench;
pub mod config;
pub mod demo;
pub mod exec;
pub mod inspector;
pub mod metrics;
pub mod refresher;
pub mod reload;
pub mod report;
pub mod start;
pub mod telemetry;
