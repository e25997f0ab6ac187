//! The emulator's options: which deployment it presents itself as
//! ([`Topology`]) and everything else a test or the CLI can set
//! ([`EmulatorConfig`]), with their defaults. Plain data: it starts
//! nothing and checks nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::profile::{Profile, UserRole};

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
    /// Which server to behave like (see [`Profile`]). Default: MongoDB 7.0.
    /// `documentdb` makes the persona a mongos whatever `topology` says.
    pub profile: Profile,
    /// Roles of users in `users`, by name; a user not listed is `root`.
    pub user_roles: HashMap<String, UserRole>,
    /// `replSetStepDown` closes every client connection of the member that
    /// steps down (default true: what a 4.0 server did, and what clients of
    /// any version see when a primary fails over by crashing or being cut
    /// off). False: connections stay open, as a 4.2+ server keeps them.
    pub close_connections_on_step_down: bool,
    /// How long a replica set stays without a primary after a step-down
    /// before the next member is elected. Default 0: at once.
    pub election_delay: Duration,
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
            max_message_size: sessionguard_protocol::wire::DEFAULT_MAX_MESSAGE_SIZE,
            tls: None,
            users: Vec::new(),
            speculative_auth: true,
            transaction_lifetime_limit: Duration::from_secs(60),
            fast: false,
            profile: Profile::MongoDb,
            user_roles: HashMap::new(),
            close_connections_on_step_down: true,
            election_delay: Duration::ZERO,
        }
    }
}
