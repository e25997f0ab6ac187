//! sessionguard-emulator: a small in-memory MongoDB-compatible server, the
//! upstream for `sessionguard-dev demo`, the integration tests and the
//! benchmarks. Dev tooling: the shipped proxy binary does not link it.
//!
//! It owns a data set (databases, collections, documents, index specs),
//! the server's side of logical sessions (keyed by `lsid.id` and owner),
//! their transactions and retryable-write history, cursors, and a
//! replica-set/standalone/mongos persona for the handshake, including the
//! streaming (exhaust) hello protocol. It speaks the wire protocol through
//! `sessionguard-protocol` only (frames, and the two command facts a server
//! needs: what a hello is, a SCRAM user name); it must not depend on the
//! proxy or the session engine, and it never logs document contents
//! (command names, namespaces, ids and counts only).
//!
//! Faithfulness: replies follow a MongoDB 7.0 server for the commands the
//! official drivers send (see `commands.rs` for the list). Replica-set and
//! mongos replies carry `$clusterTime` / `operationTime` from a cluster
//! clock that writes advance; a transaction's writes lock their documents
//! (WriteConflict for a second transaction, a wait for a plain write, see
//! `server_sessions.rs`); exhaust getMores are streamed. Known simplifications,
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
//! [`Emulator::start_member`] and [`Emulator::start_replica_set`].
//!
//! Faults, for testing what clients and the proxy do when things go wrong:
//! - `configureFailPoint` with `failCommand`, as the drivers' spec tests use
//!   it (`closeConnection`, `errorCode`, `errorLabels`, `blockConnection` /
//!   `blockTimeMS`, `appName`, `writeConcernError`, modes `alwaysOn`, `off`,
//!   `{times}`, `{skip}`), plus the emulator-only
//!   `closeConnectionAfterExecution`: see `faults.rs`;
//! - `replSetStepDown` on a replica-set member (the primary steps down, its
//!   connections close, another member is elected and says so in hello):
//!   see `deployment.rs`;
//! - compatibility [`Profile`]s (`documentdb`, `atlas-shared`) and users
//!   without the `killAnySession` privilege ([`UserRole`]), whose refusals
//!   change nothing: see `profile.rs`.
//!
//! # Layout
//!
//! - `server`: listeners and connections, frames in and out, the handshake,
//!   latency, exhaust streams.
//! - `commands`: one function per command, run under the data lock.
//! - `server_sessions`: the server's logical sessions (`ServerSessionKey`,
//!   `ServerSession`), transactions, retryable-write history, cursors,
//!   per-document write locks.
//! - `dataset`: databases, collections, documents and the `_id` index.
//! - `deployment`: [`EmulatorState`], what one deployment's members share
//!   (data lock, topology, step-down and elections, fail points).
//! - `query`: filters, sort, projection, update operators.
//! - `emulator_config`: [`EmulatorConfig`] and the [`Topology`] personas.
//! - `hello`: the handshake reply of each persona.
//! - `auth`: SCRAM-SHA-256, server side.
//! - `clock`: the cluster time.
//! - `locks`: the one way the emulator takes its std mutexes.
//! - `errors`: command errors shaped like the server's.
//! - `faults`: the `failCommand` fail point.
//! - `profile`: compatibility profiles and user privileges.
//! - `fast`: canned replies for load benchmarks.
#![forbid(unsafe_code)]

mod auth;
mod clock;
mod commands;
mod dataset;
mod deployment;
mod emulator_config;
mod errors;
mod fast;
mod faults;
mod hello;
mod locks;
mod profile;
mod query;
mod server;
mod server_sessions;

use std::net::SocketAddr;
use std::sync::Arc;

pub use deployment::EmulatorState;
pub use emulator_config::{EmulatorConfig, Topology};
pub use profile::{Profile, UserRole};
pub use server::EmulatorHandle;

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

    /// Starts `members` listeners over one fresh data set (member 0, on
    /// `listen`, is the primary). With port 0 each member gets its own
    /// ephemeral port; otherwise member `i` listens on the port plus `i`.
    pub async fn start_replica_set(
        listen: SocketAddr,
        members: usize,
        config: EmulatorConfig,
    ) -> std::io::Result<Vec<EmulatorHandle>> {
        let first = Emulator::start(listen, config).await?;
        let state = first.state();
        let mut handles = vec![first];
        for i in 1..members {
            let mut addr = listen;
            if addr.port() != 0 {
                let port = u16::try_from(usize::from(listen.port()) + i).map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "member ports run past 65535",
                    )
                })?;
                addr.set_port(port);
            }
            handles.push(Emulator::start_member(addr, state.clone()).await?);
        }
        Ok(handles)
    }
}

/// Runs `members` emulator listeners over one data set until ctrl-c (for
/// the CLI subcommand). Each logs `emulator listening` with its address and
/// member index.
pub async fn run(
    listen: SocketAddr,
    config: EmulatorConfig,
    members: usize,
) -> std::io::Result<()> {
    let profile = config.profile;
    let handles = Emulator::start_replica_set(listen, members.max(1), config).await?;
    for (member, handle) in handles.iter().enumerate() {
        tracing::info!(addr = %handle.addr(), member, %profile, "emulator listening");
    }
    tokio::signal::ctrl_c().await?;
    tracing::info!("emulator stopping");
    for handle in handles {
        handle.shutdown().await;
    }
    Ok(())
}
