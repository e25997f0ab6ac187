//! The data path's Prometheus metrics: typed, pre-resolved handles
//! ([`ProxyMetrics`]) for connections, frames, bytes, commands, round-trip
//! latency, upstream dials, malformed and stalled frames, readiness. It
//! owns these metric names, help texts and label sets, and registers them
//! in a registry it is given; it must not own the registry (the binary's,
//! shared with the session engine's collector) nor policy or session state.
//!
//! Cardinality is fixed when the handles are built: every label value of
//! every series is known up front (directions, opcodes, a closed list of
//! command names with everything else as `other`, fixed reasons), so a
//! scrape always shows every series (zeros included) and nothing a client
//! sends can create a series. Never an lsid, namespace, peer or user as a
//! label. The hot path indexes arrays of counter handles: an atomic add, no
//! lock, no allocation, no string formatting.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use sessionguard_protocol::wire::OpCode;
use sessionguard_protocol::{COMMAND_LABELS, OTHER_COMMAND};

/// Which way a frame travelled through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    ClientToUpstream = 0,
    UpstreamToClient = 1,
}

impl Direction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToUpstream => "client_to_upstream",
            Direction::UpstreamToClient => "upstream_to_client",
        }
    }
}

/// The `opcode` label values (`OpCode::name`), in index order.
const OPCODE_LABELS: [&str; 10] = [
    "reply",
    "update",
    "insert",
    "query",
    "get_more",
    "delete",
    "kill_cursors",
    "compressed",
    "msg",
    "unknown",
];

fn opcode_index(op: OpCode) -> usize {
    match op {
        OpCode::Reply => 0,
        OpCode::Update => 1,
        OpCode::Insert => 2,
        OpCode::Query => 3,
        OpCode::GetMore => 4,
        OpCode::Delete => 5,
        OpCode::KillCursors => 6,
        OpCode::Compressed => 7,
        OpCode::Msg => 8,
        OpCode::Unknown(_) => 9,
    }
}

/// Round-trip latency buckets, in seconds: 100µs to 10s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why dialing the upstream failed (`reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectFailure {
    Timeout = 0,
    Refused = 1,
    Other = 2,
    /// The host name did not resolve.
    Dns = 3,
    /// The TLS handshake failed or did not finish in time.
    Tls = 4,
}

const CONNECT_FAILURE_LABELS: [&str; 5] = ["timeout", "refused", "other", "dns", "tls"];

/// Which side sent a malformed frame (`side` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameSide {
    Client = 0,
    Upstream = 1,
}

const FRAME_SIDE_LABELS: [&str; 2] = ["client", "upstream"];

/// Handles the data path updates. Every field is resolved at construction.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    connections_active: IntGauge,
    connections_accepted: IntCounter,
    connections_rejected: IntCounter,
    frames: [[IntCounter; OPCODE_LABELS.len()]; 2],
    bytes: [[IntCounter; OPCODE_LABELS.len()]; 2],
    commands: [IntCounter; COMMAND_LABELS.len()],
    latency: [Histogram; COMMAND_LABELS.len()],
    connect_errors: [IntCounter; CONNECT_FAILURE_LABELS.len()],
    malformed: [IntCounter; FRAME_SIDE_LABELS.len()],
    frame_timeouts: [IntCounter; FRAME_SIDE_LABELS.len()],
    upstream_up: IntGauge,
    /// The last dial's outcome per upstream (one per listener: several in
    /// replica-set member mode). `upstream_up` is 1 while any is reachable:
    /// one member down must not take the whole proxy out of service. Locked
    /// once per connection open and per probe, never per frame.
    reachability: Arc<std::sync::Mutex<Vec<(String, bool)>>>,
    draining: IntGauge,
}

impl ProxyMetrics {
    /// A client connection was accepted (under the cap).
    pub(crate) fn connection_opened(&self) {
        self.connections_accepted.inc();
        self.connections_active.inc();
    }

    /// An accepted client connection ended.
    pub(crate) fn connection_closed(&self) {
        self.connections_active.dec();
    }

    /// A connection was closed at accept because the cap was reached.
    pub(crate) fn connection_rejected(&self) {
        self.connections_rejected.inc();
    }

    /// A frame of `len` bytes was read from one side.
    #[inline]
    pub(crate) fn frame(&self, direction: Direction, op: OpCode, len: usize) {
        let (d, o) = (direction as usize, opcode_index(op));
        self.frames[d][o].inc();
        self.bytes[d][o].inc_by(u64::try_from(len).unwrap_or(u64::MAX));
    }

    /// A client sent the command whose [`command_index`] is `index` (found
    /// once per request by the caller, which also needs it for the latency).
    #[inline]
    pub(crate) fn command(&self, index: usize) {
        self.commands[index.min(OTHER_COMMAND)].inc();
    }

    /// The first reply to the command with [`command_index`] `index` arrived
    /// `elapsed` after the request.
    #[inline]
    pub(crate) fn round_trip(&self, index: usize, elapsed: Duration) {
        self.latency[index.min(OTHER_COMMAND)].observe(elapsed.as_secs_f64());
    }

    /// Dialing the upstream for a client failed. `unreachable`: the
    /// upstream that could not be reached, when the failure says so (a
    /// refused or timed-out connect, not a TLS handshake the probe's plain
    /// TCP connect would contradict at its next round).
    pub(crate) fn connect_failed(
        &self,
        failure: ConnectFailure,
        unreachable: Option<&dyn fmt::Display>,
    ) {
        self.connect_errors[failure as usize].inc();
        if let Some(upstream) = unreachable {
            self.set_reachable(upstream, false);
        }
    }

    /// `upstream` accepted a connection (a client's, or the readiness
    /// probe's). True when that changed what was known of it.
    pub fn upstream_reached(&self, upstream: &dyn fmt::Display) -> bool {
        self.set_reachable(upstream, true)
    }

    /// `upstream` refused or timed out a readiness probe. True when that
    /// changed what was known of it.
    pub fn upstream_unreachable(&self, upstream: &dyn fmt::Display) -> bool {
        self.set_reachable(upstream, false)
    }

    /// Registers the upstreams the listeners dial, as reachable until a
    /// dial says otherwise: one member failing before any other was dialed
    /// must not make the whole proxy unready.
    pub fn register_upstreams<'a>(
        &self,
        upstreams: impl IntoIterator<Item = &'a dyn fmt::Display>,
    ) {
        let mut known = self.reachability();
        for upstream in upstreams {
            let name = upstream.to_string();
            if !known.iter().any(|(known_name, _)| *known_name == name) {
                known.push((name, true));
            }
        }
    }

    fn reachability(&self) -> std::sync::MutexGuard<'_, Vec<(String, bool)>> {
        self.reachability
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the outcome of a dial; true when it changed what was known.
    fn set_reachable(&self, upstream: &dyn fmt::Display, reachable: bool) -> bool {
        let name = upstream.to_string();
        let mut known = self.reachability();
        let changed = match known.iter_mut().find(|(known_name, _)| *known_name == name) {
            Some((_, state)) => std::mem::replace(state, reachable) != reachable,
            None => {
                known.push((name, reachable));
                !reachable
            }
        };
        let any_up = known.iter().any(|(_, state)| *state);
        self.upstream_up.set(i64::from(any_up));
        changed
    }

    /// A connection was closed because one side sent a malformed frame.
    pub(crate) fn malformed_frame(&self, side: FrameSide) {
        self.malformed[side as usize].inc();
    }

    /// A connection was closed because a frame started but did not finish
    /// within `frame_read_timeout` (a stalled or slowloris peer).
    pub(crate) fn frame_timed_out(&self, side: FrameSide) {
        self.frame_timeouts[side as usize].inc();
    }

    /// The proxy started draining (or shutting down): not ready any more.
    pub(crate) fn set_draining(&self) {
        self.draining.set(1);
    }

    /// Whether a drain or shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.get() != 0
    }

    /// Whether the last dial of at least one upstream (client connection or
    /// probe) succeeded. True until the first dial says otherwise.
    pub fn upstream_is_up(&self) -> bool {
        self.upstream_up.get() != 0
    }
}

impl ProxyMetrics {
    /// Registers every data-path series in `registry` (each at zero) and
    /// resolves the handles the data path updates.
    pub fn register(registry: &Registry) -> prometheus::Result<ProxyMetrics> {
        register(registry)
    }
}

fn register(registry: &Registry) -> prometheus::Result<ProxyMetrics> {
    fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        let gauge = IntGauge::new(name, help)?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    }
    fn counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        let counter = IntCounter::new(name, help)?;
        registry.register(Box::new(counter.clone()))?;
        Ok(counter)
    }
    fn counter_vec(
        registry: &Registry,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
        registry.register(Box::new(vec.clone()))?;
        Ok(vec)
    }
    fn resolve<const N: usize>(
        vec: &IntCounterVec,
        prefix: &[&str],
        values: [&str; N],
    ) -> prometheus::Result<[IntCounter; N]> {
        let mut handles = Vec::with_capacity(N);
        for value in values {
            let mut labels = prefix.to_vec();
            labels.push(value);
            handles.push(vec.get_metric_with_label_values(&labels)?);
        }
        Ok(handles.try_into().expect("N handles"))
    }

    let frames_vec = counter_vec(
        registry,
        "sessionguard_frames_total",
        "Wire-protocol frames read, by direction and header opcode.",
        &["direction", "opcode"],
    )?;
    let bytes_vec = counter_vec(
        registry,
        "sessionguard_bytes_total",
        "Bytes of wire-protocol frames read (headers included), by direction and header opcode.",
        &["direction", "opcode"],
    )?;
    let per_direction = |vec: &IntCounterVec| -> prometheus::Result<_> {
        Ok([
            resolve(vec, &[Direction::ClientToUpstream.as_str()], OPCODE_LABELS)?,
            resolve(vec, &[Direction::UpstreamToClient.as_str()], OPCODE_LABELS)?,
        ])
    };
    let frames = per_direction(&frames_vec)?;
    let bytes = per_direction(&bytes_vec)?;

    let commands_vec = counter_vec(
        registry,
        "sessionguard_commands_total",
        "Client commands, by command name (a fixed set; anything else is `other`).",
        &["command"],
    )?;
    let commands = resolve(&commands_vec, &[], COMMAND_LABELS)?;

    let latency_vec = HistogramVec::new(
        HistogramOpts::new(
            "sessionguard_command_duration_seconds",
            "Time from a client request to the first upstream reply, by command \
             (awaitable and streaming hello excluded: they wait on purpose).",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["command"],
    )?;
    registry.register(Box::new(latency_vec.clone()))?;
    let mut latency = Vec::with_capacity(COMMAND_LABELS.len());
    for command in COMMAND_LABELS {
        latency.push(latency_vec.get_metric_with_label_values(&[command])?);
    }
    let latency: [Histogram; COMMAND_LABELS.len()] =
        latency.try_into().expect("one histogram per command");

    let connect_vec = counter_vec(
        registry,
        "sessionguard_upstream_connect_errors_total",
        "Failed dials of the upstream for a client connection, by reason.",
        &["reason"],
    )?;
    let connect_errors = resolve(&connect_vec, &[], CONNECT_FAILURE_LABELS)?;
    let malformed_vec = counter_vec(
        registry,
        "sessionguard_malformed_frames_total",
        "Connections closed because a frame was malformed, by the side that sent it.",
        &["side"],
    )?;
    let malformed = resolve(&malformed_vec, &[], FRAME_SIDE_LABELS)?;
    let frame_timeouts_vec = counter_vec(
        registry,
        "sessionguard_frame_timeouts_total",
        "Connections closed because a frame began but was not complete within \
         frame_read_timeout, by the side that stalled.",
        &["side"],
    )?;
    let frame_timeouts = resolve(&frame_timeouts_vec, &[], FRAME_SIDE_LABELS)?;

    let upstream_up = gauge(
        registry,
        "sessionguard_upstream_up",
        "1 if the last dial of the upstream (a client's or the readiness probe's) succeeded, else 0; \
         with several upstreams (replica-set members), 1 while any of them is reachable.",
    )?;
    upstream_up.set(1);

    Ok(ProxyMetrics {
        connections_active: gauge(
            registry,
            "sessionguard_connections_active",
            "Client connections open now.",
        )?,
        connections_accepted: counter(
            registry,
            "sessionguard_connections_accepted_total",
            "Client connections accepted (not counting those over the cap).",
        )?,
        connections_rejected: counter(
            registry,
            "sessionguard_connections_rejected_total",
            "Client connections closed at accept because max_connections was reached.",
        )?,
        frames,
        bytes,
        commands,
        latency,
        connect_errors,
        malformed,
        frame_timeouts,
        upstream_up,
        reachability: Arc::default(),
        draining: gauge(
            registry,
            "sessionguard_draining",
            "1 once the proxy is draining or shutting down, else 0.",
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};
    use sessionguard_protocol::command_index;

    fn render(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_series_exists_before_any_traffic() {
        let registry = Registry::new();
        ProxyMetrics::register(&registry).unwrap();
        let text = render(&registry);
        assert_eq!(
            value_of(
                &text,
                "sessionguard_frames_total{direction=\"upstream_to_client\",opcode=\"msg\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value_of(&text, "sessionguard_commands_total{command=\"other\"}"),
            Some(0.0)
        );
        assert_eq!(value_of(&text, "sessionguard_upstream_up"), Some(1.0));
        assert_eq!(value_of(&text, "sessionguard_draining"), Some(0.0));
    }

    #[test]
    fn upstream_is_up_while_any_upstream_answered_its_last_dial() {
        let registry = Registry::new();
        let proxy = &ProxyMetrics::register(&registry).unwrap();
        assert!(proxy.upstream_is_up(), "up until a dial says otherwise");
        proxy.register_upstreams([&"a:27017" as &dyn fmt::Display, &"b:27017"]);
        assert!(
            !proxy.upstream_reached(&"a:27017"),
            "registered as reachable"
        );
        proxy.connect_failed(ConnectFailure::Refused, Some(&"b:27017"));
        assert!(proxy.upstream_is_up(), "a is still reachable");
        assert!(proxy.upstream_unreachable(&"a:27017"), "a change");
        assert!(!proxy.upstream_unreachable(&"a:27017"), "no change");
        assert!(!proxy.upstream_is_up(), "neither is");
        proxy.upstream_reached(&"b:27017");
        assert!(proxy.upstream_is_up());
        assert_eq!(
            value_of(&render(&registry), "sessionguard_upstream_up"),
            Some(1.0)
        );
    }

    #[test]
    fn hot_path_handles_update_the_right_series() {
        let registry = Registry::new();
        let proxy = &ProxyMetrics::register(&registry).unwrap();
        proxy.connection_opened();
        proxy.connection_opened();
        proxy.connection_closed();
        proxy.connection_rejected();
        proxy.frame(Direction::ClientToUpstream, OpCode::Msg, 100);
        proxy.frame(Direction::ClientToUpstream, OpCode::Msg, 50);
        proxy.frame(Direction::UpstreamToClient, OpCode::Unknown(77), 20);
        proxy.command(command_index("insert"));
        proxy.command(command_index("someCustomThing"));
        proxy.round_trip(command_index("insert"), Duration::from_millis(3));
        proxy.connect_failed(ConnectFailure::Refused, Some(&"db:27017"));
        proxy.malformed_frame(FrameSide::Upstream);
        proxy.set_draining();
        let text = render(&registry);
        let v = |series: &str| value_of(&text, series).unwrap_or(-1.0);
        assert_eq!(v("sessionguard_connections_active"), 1.0);
        assert_eq!(v("sessionguard_connections_accepted_total"), 2.0);
        assert_eq!(v("sessionguard_connections_rejected_total"), 1.0);
        assert_eq!(
            v("sessionguard_bytes_total{direction=\"client_to_upstream\",opcode=\"msg\"}"),
            150.0
        );
        assert_eq!(
            v("sessionguard_frames_total{direction=\"client_to_upstream\",opcode=\"msg\"}"),
            2.0
        );
        assert_eq!(
            v("sessionguard_frames_total{direction=\"upstream_to_client\",opcode=\"unknown\"}"),
            1.0
        );
        assert_eq!(v("sessionguard_commands_total{command=\"insert\"}"), 1.0);
        assert_eq!(v("sessionguard_commands_total{command=\"other\"}"), 1.0);
        assert_eq!(
            v("sessionguard_command_duration_seconds_bucket{command=\"insert\",le=\"0.005\"}"),
            1.0
        );
        assert_eq!(
            v("sessionguard_command_duration_seconds_bucket{command=\"insert\",le=\"0.0025\"}"),
            0.0
        );
        assert_eq!(
            v("sessionguard_upstream_connect_errors_total{reason=\"refused\"}"),
            1.0
        );
        assert_eq!(v("sessionguard_upstream_up"), 0.0);
        assert_eq!(
            v("sessionguard_malformed_frames_total{side=\"upstream\"}"),
            1.0
        );
        assert_eq!(v("sessionguard_draining"), 1.0);
        assert!(proxy.is_draining());
    }
}
