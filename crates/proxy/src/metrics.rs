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
//! label. The hot path indexes arrays: an atomic add, no lock, no
//! allocation, no string formatting.
//!
//! The per-frame series (frames, bytes, commands, round-trip latency) are
//! written by every data thread, one per core, for the same label values:
//! one shared atomic per series would be a cache line moving between cores
//! on every frame (a round trip's updates through prometheus' own types:
//! 45 ns on one thread, 470-510 ns per thread on two threads sharing them).
//! So they live in per-thread stripes ([`HotSeries`], 16 of ~7 KB each),
//! each on its own cache lines, summed by a collector when scraped (34-43
//! ns per round trip on one or two threads); the names, labels, help and
//! zero series are byte for byte those of the counters and histogram they
//! replaced.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
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

/// How many stripes the per-frame series spread over (data threads beyond
/// it share stripes, still counted exactly).
const STRIPES: usize = 16;

/// Hands each thread its stripe.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

const OPCODES: usize = OPCODE_LABELS.len();
const COMMANDS: usize = COMMAND_LABELS.len();
/// One count per bucket bound, plus one for durations above the last.
const LATENCY_SLOTS: usize = LATENCY_BUCKETS.len() + 1;

/// One thread's share of the per-frame series, cache-line aligned so two
/// stripes never share a line.
#[repr(align(128))]
struct Stripe {
    frames: [[AtomicU64; OPCODES]; 2],
    bytes: [[AtomicU64; OPCODES]; 2],
    commands: [AtomicU64; COMMANDS],
    /// Per command, per bucket (not cumulative: summed and accumulated when
    /// scraped).
    latency: [[AtomicU64; LATENCY_SLOTS]; COMMANDS],
    latency_nanos: [AtomicU64; COMMANDS],
}

impl Default for Stripe {
    fn default() -> Stripe {
        Stripe {
            frames: Default::default(),
            bytes: Default::default(),
            commands: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| Default::default()),
            latency_nanos: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The per-frame series, striped per thread (see the module doc).
struct HotSeries {
    stripes: Box<[Stripe]>,
}

impl fmt::Debug for HotSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotSeries")
            .field("stripes", &self.stripes.len())
            .finish_non_exhaustive()
    }
}

impl HotSeries {
    fn new() -> HotSeries {
        HotSeries {
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
        }
    }

    #[inline]
    fn mine(&self) -> &Stripe {
        &self.stripes[STRIPE.with(|stripe| *stripe)]
    }

    fn sum(&self, read: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| read(stripe).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

const FRAMES_NAME: &str = "sessionguard_frames_total";
const FRAMES_HELP: &str = "Wire-protocol frames read, by direction and header opcode.";
const BYTES_NAME: &str = "sessionguard_bytes_total";
const BYTES_HELP: &str =
    "Bytes of wire-protocol frames read (headers included), by direction and header opcode.";
const COMMANDS_NAME: &str = "sessionguard_commands_total";
const COMMANDS_HELP: &str =
    "Client commands, by command name (a fixed set; anything else is `other`).";
const LATENCY_NAME: &str = "sessionguard_command_duration_seconds";
const LATENCY_HELP: &str = "Time from a client request to the first upstream reply, by command \
     (awaitable and streaming hello excluded: they wait on purpose).";

/// Exposes [`HotSeries`] as the counter and histogram families it stands
/// for, every label combination included (zeros too).
struct HotSeriesCollector {
    series: Arc<HotSeries>,
    descs: Vec<Desc>,
}

impl HotSeriesCollector {
    fn new(series: Arc<HotSeries>) -> prometheus::Result<HotSeriesCollector> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_string(),
                help.to_string(),
                labels.iter().map(|l| l.to_string()).collect(),
                HashMap::new(),
            )
        };
        Ok(HotSeriesCollector {
            series,
            descs: vec![
                desc(FRAMES_NAME, FRAMES_HELP, &["direction", "opcode"])?,
                desc(BYTES_NAME, BYTES_HELP, &["direction", "opcode"])?,
                desc(COMMANDS_NAME, COMMANDS_HELP, &["command"])?,
                desc(LATENCY_NAME, LATENCY_HELP, &["command"])?,
            ],
        })
    }
}

fn label_pairs(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name(name.to_string());
            pair.set_value(value.to_string());
            pair
        })
        .collect()
}

fn counter_metric(labels: &[(&str, &str)], value: u64) -> proto::Metric {
    let mut counter = proto::Counter::default();
    counter.set_value(value as f64);
    let mut metric = proto::Metric::default();
    metric.set_label(label_pairs(labels));
    metric.set_counter(counter);
    metric
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<proto::Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

impl Collector for HotSeriesCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let hot = &self.series;
        let directions = [Direction::ClientToUpstream, Direction::UpstreamToClient];
        let per_opcode = |read: fn(&Stripe, usize, usize) -> &AtomicU64| {
            let mut metrics = Vec::with_capacity(2 * OPCODES);
            for direction in directions {
                for (o, opcode) in OPCODE_LABELS.iter().enumerate() {
                    let d = direction as usize;
                    let value = hot.sum(|stripe| read(stripe, d, o));
                    let labels = [("direction", direction.as_str()), ("opcode", *opcode)];
                    metrics.push(counter_metric(&labels, value));
                }
            }
            metrics
        };
        let frames = per_opcode(|stripe, d, o| &stripe.frames[d][o]);
        let bytes = per_opcode(|stripe, d, o| &stripe.bytes[d][o]);
        let commands = COMMAND_LABELS
            .iter()
            .enumerate()
            .map(|(c, command)| {
                counter_metric(&[("command", command)], hot.sum(|s| &s.commands[c]))
            })
            .collect();
        let latency = COMMAND_LABELS
            .iter()
            .enumerate()
            .map(|(c, command)| {
                let mut cumulative = 0u64;
                let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
                for (b, bound) in LATENCY_BUCKETS.iter().enumerate() {
                    cumulative += hot.sum(|s| &s.latency[c][b]);
                    let mut bucket = proto::Bucket::default();
                    bucket.set_cumulative_count(cumulative);
                    bucket.set_upper_bound(*bound);
                    buckets.push(bucket);
                }
                let count = cumulative + hot.sum(|s| &s.latency[c][LATENCY_BUCKETS.len()]);
                let mut histogram = proto::Histogram::default();
                histogram.set_sample_count(count);
                histogram.set_sample_sum(hot.sum(|s| &s.latency_nanos[c]) as f64 / 1e9);
                histogram.set_bucket(buckets);
                let mut metric = proto::Metric::default();
                metric.set_label(label_pairs(&[("command", command)]));
                metric.set_histogram(histogram);
                metric
            })
            .collect();
        vec![
            family(FRAMES_NAME, FRAMES_HELP, MetricType::COUNTER, frames),
            family(BYTES_NAME, BYTES_HELP, MetricType::COUNTER, bytes),
            family(COMMANDS_NAME, COMMANDS_HELP, MetricType::COUNTER, commands),
            family(LATENCY_NAME, LATENCY_HELP, MetricType::HISTOGRAM, latency),
        ]
    }
}

/// Handles the data path updates. Every field is resolved at construction.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    connections_active: IntGauge,
    connections_accepted: IntCounter,
    connections_rejected: IntCounter,
    /// Frames, bytes, commands and round-trip latency, striped per thread.
    hot: Arc<HotSeries>,
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
        let stripe = self.hot.mine();
        stripe.frames[d][o].fetch_add(1, Ordering::Relaxed);
        stripe.bytes[d][o].fetch_add(u64::try_from(len).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// A client sent the command whose [`command_index`] is `index` (found
    /// once per request by the caller, which also needs it for the latency).
    #[inline]
    pub(crate) fn command(&self, index: usize) {
        self.hot.mine().commands[index.min(OTHER_COMMAND)].fetch_add(1, Ordering::Relaxed);
    }

    /// The first reply to the command with [`command_index`] `index` arrived
    /// `elapsed` after the request.
    #[inline]
    pub(crate) fn round_trip(&self, index: usize, elapsed: Duration) {
        let command = index.min(OTHER_COMMAND);
        let seconds = elapsed.as_secs_f64();
        // A bucket counts durations up to and including its bound.
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let stripe = self.hot.mine();
        stripe.latency[command][slot].fetch_add(1, Ordering::Relaxed);
        stripe.latency_nanos[command].fetch_add(nanos, Ordering::Relaxed);
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

    let hot = Arc::new(HotSeries::new());
    registry.register(Box::new(HotSeriesCollector::new(Arc::clone(&hot))?))?;

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
        hot,
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
    fn data_threads_count_in_their_own_stripes_and_the_scrape_adds_them_up() {
        let registry = Registry::new();
        let proxy = &ProxyMetrics::register(&registry).unwrap();
        let find = command_index("find");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        proxy.frame(Direction::ClientToUpstream, OpCode::Msg, 10);
                        proxy.command(find);
                        proxy.round_trip(find, Duration::from_micros(300));
                    }
                });
            }
        });
        // Four threads, four stripes: no line written by two of them.
        let written = proxy
            .hot
            .stripes
            .iter()
            .filter(|stripe| stripe.commands[find].load(Ordering::Relaxed) > 0)
            .count();
        assert_eq!(written, 4, "each thread wrote a stripe of its own");
        let text = render(&registry);
        let v = |series: &str| value_of(&text, series).unwrap_or(-1.0);
        assert_eq!(
            v("sessionguard_frames_total{direction=\"client_to_upstream\",opcode=\"msg\"}"),
            4000.0
        );
        assert_eq!(
            v("sessionguard_bytes_total{direction=\"client_to_upstream\",opcode=\"msg\"}"),
            40000.0
        );
        assert_eq!(v("sessionguard_commands_total{command=\"find\"}"), 4000.0);
        assert_eq!(
            v("sessionguard_command_duration_seconds_count{command=\"find\"}"),
            4000.0
        );
        assert_eq!(
            v("sessionguard_command_duration_seconds_bucket{command=\"find\",le=\"0.00025\"}"),
            0.0
        );
        assert_eq!(
            v("sessionguard_command_duration_seconds_bucket{command=\"find\",le=\"0.0005\"}"),
            4000.0
        );
        assert_eq!(
            v("sessionguard_command_duration_seconds_bucket{command=\"find\",le=\"+Inf\"}"),
            4000.0
        );
        let sum = v("sessionguard_command_duration_seconds_sum{command=\"find\"}");
        assert!(
            (sum - 1.2).abs() < 1e-9,
            "4,000 x 300 µs = 1.2 s, got {sum}"
        );
    }

    #[test]
    fn the_striped_series_keep_their_types_and_help() {
        let registry = Registry::new();
        ProxyMetrics::register(&registry).unwrap();
        let text = render(&registry);
        for line in [
            "# TYPE sessionguard_frames_total counter",
            "# TYPE sessionguard_bytes_total counter",
            "# TYPE sessionguard_commands_total counter",
            "# TYPE sessionguard_command_duration_seconds histogram",
            "# HELP sessionguard_commands_total Client commands, by command name (a fixed set; anything else is `other`).",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}`");
        }
        // Every label combination is there before any traffic.
        let frames = text
            .lines()
            .filter(|l| l.starts_with("sessionguard_frames_total{"))
            .count();
        assert_eq!(frames, 2 * OPCODE_LABELS.len());
        let buckets = text
            .lines()
            .filter(|l| {
                l.starts_with("sessionguard_command_duration_seconds_bucket{command=\"find\"")
            })
            .count();
        assert_eq!(buckets, LATENCY_BUCKETS.len() + 1, "every bound and +Inf");
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
