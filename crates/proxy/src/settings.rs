//! What [`Proxy::start`](crate::Proxy::start) needs: the listen address,
//! the upstream, the member listeners of replica-set mode, TLS on both sides
//! (certificates already loaded), limits and timeouts. The binary builds it
//! from its configuration file, validated there (errors name the file's
//! keys); this module only holds the values and plans the listeners. It
//! must not read files or parse the configuration file.

use std::time::Duration;

use crate::driver::IoMode;
use crate::tls::{ListenTls, UpstreamTls};
use crate::upstream::{ConnectionString, HostPort};

/// The data path's settings, validated.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Where clients connect (single-upstream mode: the one listener).
    pub listen: String,
    /// The deployment (its first host is dialed in single-upstream mode).
    pub upstream: ConnectionString,
    /// Replica-set mode: one listener per member; empty otherwise.
    pub members: Vec<ListenerPlan>,
    pub upstream_tls: Option<UpstreamTls>,
    pub listen_tls: Option<ListenTls>,
    pub max_connections: usize,
    pub max_message_size: usize,
    pub connect_timeout: Duration,
    pub drain_grace: Duration,
    pub frame_read_timeout: Duration,
    pub inject_timeout: Duration,
    /// Every client connects to the listeners directly (`exec`): without a
    /// member map there is nothing to rewrite or warn about in hello.
    pub clients_connect_directly: bool,
    /// The data path's I/O driver (`proxy.io`; `SESSIONGUARD_IO` wins).
    pub io: IoMode,
}

/// One listener: the upstream it dials, the address it binds, and (replica-set
/// mode) the address hello replies name instead of the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerPlan {
    /// The upstream this listener dials (and whose address hello replies carry).
    pub upstream: HostPort,
    /// What the listener binds.
    pub listen: String,
    /// What drivers are told in replica-set mode; `None` = the bound listen
    /// address.
    pub advertise: Option<String>,
}

/// What each listener dials, binds and advertises: one listener on `listen`
/// for the first upstream host, or `members` when members are mapped. The
/// readiness probe dials the same upstreams.
pub fn listener_plan(
    listen: &str,
    upstream: &ConnectionString,
    members: Vec<ListenerPlan>,
) -> Vec<ListenerPlan> {
    if members.is_empty() {
        return vec![ListenerPlan {
            upstream: upstream.primary_target().clone(),
            listen: listen.to_string(),
            advertise: None,
        }];
    }
    members
}
