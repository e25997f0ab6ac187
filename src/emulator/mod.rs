//! A small in-memory MongoDB-compatible server: the upstream for
//! `sessionguard demo`, the integration tests and the benchmarks.
//!
//! It owns a data set (databases, collections, documents, index specs),
//! logical sessions (keyed by `lsid.id`), their transactions and retryable-write
//! history, cursors, and a replica-set/standalone/mongos persona for the
//! handshake, including the streaming (exhaust) hello protocol. It speaks the
//! wire protocol through [`crate::wire`] only; it must not reach into the proxy
//! or the session engine, and it never logs document contents (command names,
//! namespaces, ids and counts only).
//!
//! Faithfulness: replies follow a MongoDB 7.0 server for the commands the
//! official drivers send (see `commands.rs` for the list). Replica-set and
//! mongos replies carry `$clusterTime` / `operationTime` from a cluster
//! clock that writes advance; a transaction's writes lock their documents
//! (WriteConflict for a second transaction, a wait for a plain write, see
//! `sessions.rs`); exhaust getMores are streamed. Known simplifications,
//! chosen on purpose:
//! - Transactions write straight into the shared data set; the documents
//!   they lock keep their committed version, which every other reader sees
//!   (read committed). A transaction itself reads the latest committed data
//!   plus its own writes, not a point-in-time snapshot, and snapshot reads
//!   (`atClusterTime`) return current data.
//! - Cursors hold a snapshot of their remaining result set taken when they
//!   were opened.
//! - Only the `_id` index is enforced (unique); other index specs are stored
//!   and listed, not used.
//! - Latency (`reply_latency`) is applied after a command executed and before
//!   its reply is written, on that connection only, with no lock held. It does
//!   not apply to `hello` / `isMaster` / `ping` / `buildInfo` / `endSessions`
//!   (so the driver's monitoring and shutdown stay fast) unless
//!   `command_latency` names them explicitly.
//!
//! Shared state ([`EmulatorState`]) is separate from the listeners, so several
//! listeners (replica-set members) can serve one data set: see
//! [`Emulator::start_member`].

mod auth;
mod clock;
mod commands;
mod errors;
mod fast;
mod hello;
mod query;
mod server;
mod sessions;
mod state;
mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use state::EmulatorState;

/// Which kind of deployment the emulator presents itself as in `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// A standalone mongod: no transactions, no txnNumber at all.
    Standalone,
    /// The primary of a replica set named `set_name`.
    ReplicaSetPrimary { set_name: String },
    /// A mongos router (`msg: "isdbgrid"`).
    Mongos,
}

/// Emulator options. Every duration is a plain `Duration`; the CLI layer
/// converts humantime strings.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Deployment persona. Default: replica-set primary of "rs0".
    pub topology: Topology,
    /// Fixed delay before every reply except hello/isMaster/ismaster/ping/
    /// buildInfo/endSessions. Default 0.
    pub reply_latency: Duration,
    /// Per-command delay (by command name as sent, e.g. "find"); overrides
    /// `reply_latency`, and applies even to the exempt commands above.
    pub command_latency: HashMap<String, Duration>,
    /// Sessions idle longer than this expire: their cursors die and an open
    /// transaction aborts. Default 30 min.
    pub session_timeout: Duration,
    /// Reported in hello. Default 30.
    pub logical_session_timeout_minutes: i32,
    /// Idle timeout for cursors opened without a session. Default 10 min.
    pub cursor_timeout: Duration,
    /// Keep the exact bytes of every received frame (see
    /// [`EmulatorHandle::received_frames`]).
    pub record_frames: bool,
    /// Largest accepted frame, reported in hello as maxMessageSizeBytes.
    pub max_message_size: usize,
    /// Serve TLS with this configuration instead of plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// SCRAM-SHA-256 users `(name, password)` in the `admin` database. When
    /// non-empty, connections must authenticate before running commands
    /// other than the handshake ones, and sessions belong to their user.
    pub users: Vec<(String, String)>,
    /// Answer `speculativeAuthenticate` in hello (default true, as a 4.4+
    /// server does); false makes drivers authenticate with saslStart.
    pub speculative_auth: bool,
    /// Transactions open longer than this are aborted
    /// (transactionLifetimeLimitSeconds). Default 60 s, the server's.
    pub transaction_lifetime_limit: Duration,
    /// Benchmark upstream: answer `find` / `insert` / `getMore` with canned
    /// replies, storing nothing (see `fast.rs`). Default false.
    pub fast: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            topology: Topology::ReplicaSetPrimary {
                set_name: "rs0".to_string(),
            },
            reply_latency: Duration::ZERO,
            command_latency: HashMap::new(),
            session_timeout: Duration::from_secs(30 * 60),
            logical_session_timeout_minutes: 30,
            cursor_timeout: Duration::from_secs(10 * 60),
            record_frames: false,
            max_message_size: crate::wire::DEFAULT_MAX_MESSAGE_SIZE,
            tls: None,
            users: Vec::new(),
            speculative_auth: true,
            transaction_lifetime_limit: Duration::from_secs(60),
            fast: false,
        }
    }
}

/// Entry point for starting emulator listeners.
pub struct Emulator;

impl Emulator {
    /// Binds `listen`, creates a fresh data set and serves it until the
    /// handle is shut down.
    pub async fn start(
        listen: SocketAddr,
        config: EmulatorConfig,
    ) -> std::io::Result<EmulatorHandle> {
        let state = EmulatorState::new(config);
        Emulator::start_member(listen, state).await
    }

    /// Binds another listener over an existing data set (a replica-set
    /// member). The first listener started over a state is the primary.
    pub async fn start_member(
        listen: SocketAddr,
        state: Arc<EmulatorState>,
    ) -> std::io::Result<EmulatorHandle> {
        server::start_listener(listen, state).await
    }
}

pub use server::EmulatorHandle;

/// Runs one emulator listener until ctrl-c (for a CLI subcommand).
pub async fn run(listen: SocketAddr, config: EmulatorConfig) -> std::io::Result<()> {
    let handle = Emulator::start(listen, config).await?;
    tracing::info!(addr = %handle.addr(), "emulator listening");
    tokio::signal::ctrl_c().await?;
    tracing::info!("emulator stopping");
    handle.shutdown().await;
    Ok(())
}
