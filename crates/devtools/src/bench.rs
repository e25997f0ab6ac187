//! `sessionguard-dev bench-load`: the measuring stick for the data path. It owns
//! three modes and nothing else:
//!
//! - load (default): a closed-loop generator speaking raw OP_MSG over N
//!   connections. Each connection greets with `hello` as a driver does, then
//!   repeats `find` (small first batch, opens a cursor) -> `getMore` on that
//!   cursor -> `insert` of one 1 KiB document as a retryable write, rotating
//!   over its own few lsids like a driver's implicit sessions (with
//!   `--shared-session`, all connections share the same few: the misuse
//!   flood). One line of
//!   `key=value` results: ops/s and p50/p99/p999 round-trip latency. The op
//!   mix assumes `sessionguard-dev emulator --fast` upstream (every `find`
//!   returns a cursor to `getMore`); against a storing server the filter
//!   matches none of the inserted documents, so no cursor is opened and the
//!   mix is find -> insert.
//!   Inserted `_id`s are distinct across connections and runs (see
//!   `insert_id_base`), so a storing server answers no duplicate key error.
//! - `--idle-connections N --pid PID`: opens N connections that stay idle and
//!   reports the resident memory they cost process PID (the proxy).
//! - `--sessions N`: builds a session engine in this process, feeds it N
//!   requests and replies on N distinct lsids, and reports the resident
//!   memory per tracked session.
//!
//! It talks to any MongoDB-compatible endpoint (direct, HAProxy, sessionguard)
//! and must not depend on the proxy's internals; it never prints document
//! contents. RSS comes from `/proc/<pid>/status` (Linux).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bson::spec::BinarySubtype;
use bson::{rawdoc, Binary, RawBsonRef, RawDocument, RawDocumentBuf};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use sessionguard::config::parse_duration;
use sessionguard_protocol::wire::{self, op_msg, Frame, FrameCodec, Message, MsgFlags};

/// Sessions each load connection rotates over (a driver's pool of implicit
/// sessions on a connection that runs one operation at a time).
const LSIDS_PER_CONNECTION: usize = 4;
/// Size of each inserted document, BSON bytes.
const INSERT_DOC_BYTES: usize = 1024;
/// Idle mode: connections opened (and kept) before the baseline RSS reading,
/// so allocator arenas and runtime workers are already warm.
const IDLE_WARMUP_CONNECTIONS: usize = 100;
/// Idle mode: connections being set up at once.
const IDLE_DIAL_CONCURRENCY: usize = 200;
const DB: &str = "bench";
const COLLECTION: &str = "bench";

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The endpoint to load: the emulator, HAProxy or sessionguard (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:27018")]
    pub target: SocketAddr,
    /// Load mode: concurrent connections, each running one request at a time.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Load mode: measured time (humantime), after the warm-up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Load mode: time run but not measured, first.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Load mode: every connection uses the same few lsids (a "global"
    /// session shared by concurrent requests), so with two or more
    /// connections nearly every request breaks a rule (concurrent-use,
    /// txn-number-reuse, txn-regression): the findings flood that
    /// bench/compare.sh measures beside the clean run.
    #[arg(long)]
    pub shared_session: bool,
    /// Memory mode: open this many idle connections and report the RSS of
    /// `--pid` per connection.
    #[arg(long, value_name = "N")]
    pub idle_connections: Option<usize>,
    /// Idle mode: the process whose resident memory is read (the proxy).
    #[arg(long, requires = "idle_connections")]
    pub pid: Option<u32>,
    /// Memory mode: track this many sessions in an in-process session engine
    /// and report resident bytes per session.
    #[arg(long, value_name = "N", conflicts_with = "idle_connections")]
    pub sessions: Option<usize>,
}

/// Runs the selected mode; prints one result line. Exit 1 when the
/// measurement could not be made (no connection, no completed operation).
pub fn main(args: BenchArgs) -> ExitCode {
    // One thread: the generator is meant to be pinned to one core
    // (`taskset`), away from the proxy and the upstream.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if let Some(sessions) = args.sessions {
        ledger_memory(sessions).map(|r| r.to_string())
    } else if let Some(count) = args.idle_connections {
        runtime
            .block_on(idle_memory(args.target, count, args.pid))
            .map(|r| r.to_string())
    } else {
        runtime
            .block_on(run_load(&LoadPlan::from(&args)))
            .map(|r| r.to_string())
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-load: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- load ----

/// What a load run does.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub target: SocketAddr,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// All connections share one set of lsids (see `BenchArgs::shared_session`).
    pub shared_session: bool,
}

impl From<&BenchArgs> for LoadPlan {
    fn from(args: &BenchArgs) -> Self {
        LoadPlan {
            target: args.target,
            connections: args.connections,
            warmup: args.warmup,
            duration: args.duration,
            shared_session: args.shared_session,
        }
    }
}

/// Results of a load run. Latencies are round trips (request written ->
/// reply read) of the operations started during the measured window.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub connections: usize,
    pub seconds: f64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// This process's own CPU time per measured operation, in µs (`None`
    /// without /proc). On a machine where the load generator shares a core
    /// with the middle, what the middle makes the generator pay is part of
    /// its cost: bench/compare.sh prints it beside the middle's.
    pub load_cpu_us_per_op: Option<f64>,
    /// How often this process went to sleep per measured operation (its
    /// threads' voluntary context switches; `None` without /proc): how
    /// finely it and a middle on the same core take turns. At 256
    /// connections, about one sleep per three operations through HAProxy
    /// and one per 150 through an io_uring middle that submits once per
    /// loop turn (docs/performance.md, ninth pass).
    pub load_sleeps_per_op: Option<f64>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mode=load target={} connections={} seconds={:.2} ops={} errors={} ops_per_sec={:.0} \
             p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} load_cpu_us_per_op={} \
             load_sleeps_per_op={}",
            self.target,
            self.connections,
            self.seconds,
            self.ops,
            self.errors,
            self.ops_per_sec,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.load_cpu_us_per_op
                .map_or_else(|| "-".to_string(), |us| format!("{us:.2}")),
            self.load_sleeps_per_op
                .map_or_else(|| "-".to_string(), |n| format!("{n:.3}"))
        )
    }
}

/// Bits of an inserted `_id` counting one connection's inserts; above them
/// the connection index, above that the run id.
const INSERT_COUNTER_BITS: u32 = 28;
/// Bits of an inserted `_id` naming the connection (1,048,576 connections).
const INSERT_CONNECTION_BITS: u32 = 20;
/// Bits of an inserted `_id` naming the run; with the two above, 63 bits:
/// the `_id` stays a positive i64.
const INSERT_RUN_BITS: u32 = 63 - INSERT_COUNTER_BITS - INSERT_CONNECTION_BITS;

/// A value telling this run from earlier ones against the same collection
/// (time and process id mixed; one chance in 32,768 of meeting a given
/// earlier run).
fn run_id() -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mixed = nanos ^ (nanos >> 17) ^ (nanos >> 34) ^ u128::from(std::process::id());
    (mixed & ((1 << INSERT_RUN_BITS) - 1)) as i64
}

/// The first `_id` connection `index` inserts (the next ones count up from
/// it): against a storing server, two connections or two runs inserting the
/// same `_id` would get duplicate key errors that the load counts as
/// successful round trips.
fn insert_id_base(run_id: i64, index: usize) -> i64 {
    let connection = (index as i64) & ((1 << INSERT_CONNECTION_BITS) - 1);
    (run_id << (INSERT_COUNTER_BITS + INSERT_CONNECTION_BITS)) | (connection << INSERT_COUNTER_BITS)
}

/// Runs the closed loop on the current runtime.
pub async fn run_load(plan: &LoadPlan) -> Result<LoadReport, String> {
    if plan.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    let payload = insert_payload();
    let shared = plan.shared_session.then(random_lsids);
    let mut clients = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let lsids = shared.clone().unwrap_or_else(random_lsids);
        let client = Client::connect(plan.target, lsids)
            .await
            .map_err(|e| format!("connection {index} to {}: {e}", plan.target))?;
        clients.push(client);
    }
    let started = Instant::now();
    let measure_from = started + plan.warmup;
    let stop_at = measure_from + plan.duration;
    let run_id = run_id();
    // The generator's own CPU and sleeps from the end of the warm-up on.
    let at_measure = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        (own_cpu(), own_sleeps())
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (index, client) in clients.into_iter().enumerate() {
        let payload = payload.clone();
        let id_base = insert_id_base(run_id, index);
        tasks.spawn(client.run(payload, id_base, measure_from, stop_at));
    }
    let mut latencies: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(|e| format!("a load connection panicked: {e}"))?;
        errors += outcome.errors;
        latencies.extend_from_slice(&outcome.latencies_ns);
        if let Some(e) = outcome.failure {
            return Err(format!("a load connection failed: {e}"));
        }
    }
    let seconds = plan.duration.as_secs_f64();
    if latencies.is_empty() {
        return Err(format!(
            "no operation completed against {} in {seconds:.1}s",
            plan.target
        ));
    }
    let (cpu_from, sleeps_from) = at_measure.await.unwrap_or((None, None));
    let cpu_used = match (cpu_from, own_cpu()) {
        (Some(from), Some(to)) => Some(to.saturating_sub(from)),
        _ => None,
    };
    let sleeps = match (sleeps_from, own_sleeps()) {
        (Some(from), Some(to)) => Some(to.saturating_sub(from)),
        _ => None,
    };
    latencies.sort_unstable();
    let ops = latencies.len() as u64;
    Ok(LoadReport {
        target: plan.target,
        connections: plan.connections,
        seconds,
        ops,
        errors,
        ops_per_sec: ops as f64 / seconds,
        p50_us: percentile_us(&latencies, 0.50),
        p99_us: percentile_us(&latencies, 0.99),
        p999_us: percentile_us(&latencies, 0.999),
        max_us: percentile_us(&latencies, 1.0),
        load_cpu_us_per_op: cpu_used.map(|cpu| cpu.as_secs_f64() * 1e6 / ops as f64),
        load_sleeps_per_op: sleeps.map(|n| n as f64 / ops as f64),
    })
}

/// CPU time used so far by this process's threads (the scheduler's run
/// time per thread, in ns, from /proc), or `None` without /proc. A thread
/// that exits between two readings takes its time with it: the generator
/// runs on one thread, so its readings only grow.
fn own_cpu() -> Option<Duration> {
    let total_ns = sum_over_threads("schedstat", |stat| {
        stat.split_whitespace().next()?.parse().ok()
    })?;
    Some(Duration::from_nanos(total_ns))
}

/// Voluntary context switches of this process's threads so far (each time
/// one went to sleep for want of work), or `None` without /proc. As with
/// `own_cpu`, a thread that exits takes its count with it.
fn own_sleeps() -> Option<u64> {
    sum_over_threads("status", |status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum over this process's threads of a number read from each one's
/// `/proc/self/task/<tid>/<file>` (a thread gone meanwhile is skipped);
/// `None` without /proc or when a file does not hold the number.
fn sum_over_threads(file: &str, number: impl Fn(&str) -> Option<u64>) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join(file)) else {
            continue;
        };
        total += number(&text)?;
    }
    Some(total)
}

/// Nearest-rank percentile of sorted nanosecond samples, in microseconds.
fn percentile_us(sorted_ns: &[u32], quantile: f64) -> f64 {
    let rank = (quantile * sorted_ns.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_ns.len()) - 1;
    f64::from(sorted_ns[index]) / 1000.0
}

/// A connection's lsids: random UUIDs, as a driver's implicit sessions.
fn random_lsids() -> Vec<RawDocumentBuf> {
    (0..LSIDS_PER_CONNECTION)
        .map(|_| {
            let id = Binary {
                subtype: BinarySubtype::Uuid,
                bytes: rand::random::<[u8; 16]>().to_vec(),
            };
            rawdoc! { "id": id }
        })
        .collect()
}

/// One 1 KiB document's worth of filler (the `_id` varies per insert).
fn insert_payload() -> String {
    let overhead = rawdoc! { "_id": 0_i64, "payload": "" }.as_bytes().len();
    "x".repeat(INSERT_DOC_BYTES - overhead)
}

struct Outcome {
    latencies_ns: Vec<u32>,
    errors: u64,
    failure: Option<String>,
}

/// One load connection: its socket, its lsids and their txnNumbers.
struct Client {
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
    lsids: Vec<RawDocumentBuf>,
    txn_numbers: Vec<i64>,
    next_request_id: i32,
}

impl Client {
    async fn connect(target: SocketAddr, lsids: Vec<RawDocumentBuf>) -> std::io::Result<Client> {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let mut client = Client {
            reader: FramedRead::new(read, FrameCodec::default()),
            writer,
            lsids,
            txn_numbers: vec![0; LSIDS_PER_CONNECTION],
            next_request_id: 1,
        };
        let hello = rawdoc! {
            "hello": 1_i32,
            "client": {
                "driver": { "name": "sessionguard-bench", "version": env!("CARGO_PKG_VERSION") },
                "os": { "type": std::env::consts::OS },
                "application": { "name": "bench-load" },
            },
            "$db": "admin",
        };
        let reply = client.round_trip(hello.as_bytes(), None).await?;
        if !reply_ok(&reply) {
            return Err(std::io::Error::other("hello was refused"));
        }
        Ok(client)
    }

    /// Sends one request (optionally with a `documents` sequence) and reads
    /// its reply.
    async fn round_trip(
        &mut self,
        body: &[u8],
        documents: Option<&[u8]>,
    ) -> std::io::Result<Frame> {
        let request_id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        let frame: Bytes = match documents {
            None => op_msg::encode(request_id, 0, MsgFlags(0), body),
            Some(doc) => op_msg::encode_with_sequences(
                request_id,
                0,
                MsgFlags(0),
                body,
                &[("documents", &[doc])],
            ),
        };
        self.writer.write_all(&frame).await?;
        match self.reader.next().await {
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the endpoint closed the connection",
            )),
            Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Some(Ok(reply)) if reply.header.response_to != request_id => {
                Err(std::io::Error::other(format!(
                    "reply to request {} while {request_id} was awaited",
                    reply.header.response_to
                )))
            }
            Some(Ok(reply)) => Ok(reply),
        }
    }

    async fn run(
        mut self,
        payload: String,
        id_base: i64,
        measure_from: Instant,
        stop_at: Instant,
    ) -> Outcome {
        let mut outcome = Outcome {
            latencies_ns: Vec::new(),
            errors: 0,
            failure: None,
        };
        let mut inserted = 0_i64;
        let mut session = 0usize;
        loop {
            let lsid = self.lsids[session].clone();
            // find -> getMore -> insert, all on one lsid, then the next lsid.
            let find = rawdoc! {
                "find": COLLECTION,
                "filter": { "status": "active" },
                "batchSize": 2_i32,
                "lsid": lsid.clone(),
                "$db": DB,
            };
            let cursor = match self.timed(&find, None, measure_from, &mut outcome).await {
                Some(reply) => reply_cursor_id(&reply),
                None => None,
            };
            if let Some(cursor) = cursor.filter(|&id| id != 0) {
                let get_more = rawdoc! {
                    "getMore": cursor,
                    "collection": COLLECTION,
                    "batchSize": 2_i32,
                    "lsid": lsid.clone(),
                    "$db": DB,
                };
                self.timed(&get_more, None, measure_from, &mut outcome)
                    .await;
            }
            self.txn_numbers[session] += 1;
            // Wraps inside the counter bits rather than into the next
            // connection's ids (2^28 inserts: hours at any rate seen).
            inserted = (inserted + 1) & ((1 << INSERT_COUNTER_BITS) - 1);
            let insert = rawdoc! {
                "insert": COLLECTION,
                "ordered": true,
                "lsid": lsid,
                "txnNumber": self.txn_numbers[session],
                "$db": DB,
            };
            let doc = rawdoc! { "_id": id_base | inserted, "payload": payload.as_str() };
            self.timed(&insert, Some(doc.as_bytes()), measure_from, &mut outcome)
                .await;
            session = (session + 1) % self.lsids.len();
            if outcome.failure.is_some() || Instant::now() >= stop_at {
                return outcome;
            }
        }
    }

    /// One measured round trip; `None` when it failed (counted, or fatal).
    async fn timed(
        &mut self,
        body: &RawDocumentBuf,
        documents: Option<&[u8]>,
        measure_from: Instant,
        outcome: &mut Outcome,
    ) -> Option<Frame> {
        if outcome.failure.is_some() {
            return None;
        }
        let started = Instant::now();
        match self.round_trip(body.as_bytes(), documents).await {
            Ok(reply) => {
                if started >= measure_from {
                    let nanos = started.elapsed().as_nanos();
                    outcome
                        .latencies_ns
                        .push(u32::try_from(nanos).unwrap_or(u32::MAX));
                }
                if reply_ok(&reply) {
                    Some(reply)
                } else {
                    outcome.errors += 1;
                    None
                }
            }
            Err(e) => {
                outcome.failure = Some(e.to_string());
                None
            }
        }
    }
}

/// Runs `f` on the body document of an OP_MSG reply.
fn with_reply_body<T>(reply: &Frame, f: impl FnOnce(&RawDocument) -> Option<T>) -> Option<T> {
    let opened = wire::open(reply, wire::DEFAULT_MAX_MESSAGE_SIZE).ok()?;
    match opened.parse(reply).ok()? {
        Message::Msg(msg) => f(msg.body),
        _ => None,
    }
}

fn reply_ok(reply: &Frame) -> bool {
    with_reply_body(reply, |body| match body.get("ok").ok()?? {
        RawBsonRef::Double(v) => Some(v == 1.0),
        RawBsonRef::Int32(v) => Some(v == 1),
        RawBsonRef::Int64(v) => Some(v == 1),
        _ => Some(false),
    })
    .unwrap_or(false)
}

fn reply_cursor_id(reply: &Frame) -> Option<i64> {
    with_reply_body(reply, |body| {
        body.get_document("cursor").ok()?.get_i64("id").ok()
    })
}

// ---------------------------------------------------------- idle memory ----

/// Results of the idle-connections mode.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleReport {
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub bytes_per_connection: f64,
    /// Connections that failed the final ping.
    pub errors: usize,
}

impl std::fmt::Display for IdleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mode=idle connections={} rss_before_kib={} rss_after_kib={} bytes_per_connection={:.0} errors={}",
            self.connections,
            self.rss_before_kib,
            self.rss_after_kib,
            self.bytes_per_connection,
            self.errors
        )
    }
}

async fn open_many(target: SocketAddr, count: usize) -> Result<Vec<Client>, String> {
    let mut clients = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0usize;
    while clients.len() < count {
        while started < count && pending.len() < IDLE_DIAL_CONCURRENCY {
            pending.spawn(Client::connect(target, random_lsids()));
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(client))) => clients.push(client),
            Some(Ok(Err(e))) => {
                return Err(format!(
                    "connection {} of {count} to {target}: {e}",
                    clients.len() + 1
                ))
            }
            Some(Err(e)) => return Err(format!("a dial task panicked: {e}")),
            None => break,
        }
    }
    Ok(clients)
}

/// Opens `count` connections (each greets with hello, then idles) and
/// reports how much resident memory they cost process `pid`.
pub async fn idle_memory(
    target: SocketAddr,
    count: usize,
    pid: Option<u32>,
) -> Result<IdleReport, String> {
    let mut warm = open_many(target, IDLE_WARMUP_CONNECTIONS).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid).map_err(|e| format!("reading RSS: {e}"))?;
    let mut idle = open_many(target, count).await?;
    // Let the far side finish setting up (upstream dials, first reads).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid).map_err(|e| format!("reading RSS: {e}"))?;
    // Every connection must still work: one ping each.
    let mut errors = 0usize;
    for client in idle.iter_mut().chain(warm.iter_mut()) {
        let ping = rawdoc! { "ping": 1_i32, "$db": "admin" };
        match client.round_trip(ping.as_bytes(), None).await {
            Ok(reply) if reply_ok(&reply) => {}
            _ => errors += 1,
        }
    }
    Ok(IdleReport {
        connections: count,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_connection: (after.saturating_sub(before) * 1024) as f64 / count.max(1) as f64,
        errors,
    })
}

/// VmRSS of `pid` (or of this process), KiB.
pub(crate) fn rss_kib(pid: Option<u32>) -> std::io::Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path)?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no VmRSS line"))
}

// -------------------------------------------------------- ledger memory ----

/// Results of the sessions mode.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LedgerReport {
    pub sessions: usize,
    pub tracked: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub bytes_per_session: f64,
    /// Bytes one session's slot in the ledger takes (key + state), before
    /// the index's few bytes per session.
    pub entry_bytes: usize,
    pub ns_per_request: f64,
}

impl std::fmt::Display for LedgerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mode=sessions sessions={} tracked={} rss_before_kib={} rss_after_kib={} bytes_per_session={:.0} entry_bytes={} ns_per_request={:.0}",
            self.sessions,
            self.tracked,
            self.rss_before_kib,
            self.rss_after_kib,
            self.bytes_per_session,
            self.entry_bytes,
            self.ns_per_request
        )
    }
}

/// Tracks `count` sessions in a fresh engine (one `find` request and its
/// reply per lsid, from one connection) and measures this process's RSS.
pub(crate) fn ledger_memory(count: usize) -> Result<LedgerReport, String> {
    use sessionguard_engine::SessionEngine;
    use sessionguard_engine::{RulesConfig, SessionConfig};

    let config = SessionConfig {
        max_sessions: count.max(1),
        ..SessionConfig::default()
    };
    let engine = SessionEngine::new(&config, &RulesConfig::default());
    let peer: SocketAddr = ([10, 0, 0, 1], 50000).into();
    let local: SocketAddr = ([127, 0, 0, 1], 27018).into();
    // Through the connection's handle, as the proxy's data path does.
    let conn = engine.connect(1, peer, local, false);
    let reply_frame = op_msg::encode(1, 1, MsgFlags(0), rawdoc! { "ok": 1.0 }.as_bytes());
    let before = rss_kib(None).map_err(|e| format!("reading RSS: {e}"))?;
    let started = Instant::now();
    for index in 0..count {
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&(index as u64).to_le_bytes());
        uuid[8..].copy_from_slice(&0x5e55_1046_u64.to_le_bytes());
        let body = rawdoc! {
            "find": COLLECTION,
            "filter": {},
            "lsid": { "id": Binary { subtype: BinarySubtype::Uuid, bytes: uuid.to_vec() } },
            "$db": DB,
        };
        let request_id = i32::try_from(index % (i32::MAX as usize)).unwrap_or(1);
        let frame = op_msg::encode(request_id, 0, MsgFlags(0), body.as_bytes());
        let request = parse_frame(&frame)?;
        let (_, pending) = engine.request_on(&conn, request_id, &Message::Msg(request));
        let reply = parse_frame(&reply_frame)?;
        if let Some(mut pending) = pending {
            engine.reply_on(&conn, &mut pending, &Message::Msg(reply));
        }
    }
    let elapsed = started.elapsed();
    let after = rss_kib(None).map_err(|e| format!("reading RSS: {e}"))?;
    let tracked = engine.stats().ledger.sessions;
    Ok(LedgerReport {
        sessions: count,
        tracked,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_session: (after.saturating_sub(before) * 1024) as f64 / count.max(1) as f64,
        entry_bytes: sessionguard_engine::SESSION_SLOT_BYTES,
        ns_per_request: elapsed.as_nanos() as f64 / count.max(1) as f64,
    })
}

fn parse_frame(frame: &[u8]) -> Result<wire::OpMsg<'_>, String> {
    let header = frame.get(..wire::HEADER_LEN).ok_or("short frame")?;
    let body = frame.get(wire::HEADER_LEN..).ok_or("short frame")?;
    wire::OpMsg::parse(header, body).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<u32> = (1..=1000).map(|us| us * 1000).collect();
        assert_eq!(percentile_us(&samples, 0.50), 500.0);
        assert_eq!(percentile_us(&samples, 0.99), 990.0);
        assert_eq!(percentile_us(&samples, 0.999), 999.0);
        assert_eq!(percentile_us(&samples, 1.0), 1000.0);
        assert_eq!(percentile_us(&[7000], 0.999), 7.0);
    }

    #[test]
    fn inserted_documents_are_one_kib() {
        let doc = rawdoc! { "_id": 123_456_i64, "payload": insert_payload() };
        assert_eq!(doc.as_bytes().len(), INSERT_DOC_BYTES);
    }

    #[test]
    fn insert_ids_of_connections_and_runs_do_not_meet() {
        let run = run_id();
        assert!((0..1 << INSERT_RUN_BITS).contains(&run));
        let last_count = (1_i64 << INSERT_COUNTER_BITS) - 1;
        let first = insert_id_base(run, 0);
        let second = insert_id_base(run, 1);
        assert!(first | last_count < second, "{first} {second}");
        let other_run = insert_id_base((run + 1) % (1 << INSERT_RUN_BITS), 0);
        assert_ne!(first, other_run);
        let highest = insert_id_base(
            (1 << INSERT_RUN_BITS) - 1,
            (1 << INSERT_CONNECTION_BITS) - 1,
        );
        assert!(highest | last_count > 0, "the _id stays a positive i64");
    }

    #[test]
    fn ledger_mode_tracks_every_session() {
        let report = ledger_memory(2_000).unwrap();
        assert_eq!(report.tracked, 2_000, "{report}");
        assert!(report
            .to_string()
            .starts_with("mode=sessions sessions=2000 tracked=2000"));
    }
}
