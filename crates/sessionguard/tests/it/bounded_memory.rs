//! Bounded memory under an lsid spray: the `sessionguard` binary (its own
//! process, so its resident memory can be read from /proc) with
//! `sessions.max_sessions = 10000`, in front of the emulator, while raw
//! clients send 200,000 requests each carrying a fresh random lsid. The
//! ledger must never track more than `max_sessions`, every session pushed
//! out must be counted as an eviction, and the process's resident memory
//! must stop growing once the ledger is full.
//!
//! Why the memory bound is what it is: measured on a debug build, the
//! process idles at ~12 MiB and sits at ~16.5 MiB with a full ledger,
//! i.e. about 0.5 KiB per tracked session all costs included. Once the
//! ledger is full (after the first 20,000 lsids) the next 180,000 may only
//! replace entries; an unbounded ledger would need ~85 MiB more for them.
//! The test allows 24 MiB of growth over that stretch (allocator slack,
//! connection buffers, the bounded violation list and intern tables; ~4 MiB
//! was measured) — well under what the unbounded case would take — and
//! prints the samples.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bson::{doc, spec::BinarySubtype, Binary};
use futures_util::StreamExt;
use rand::RngCore;
use sessionguard_emulator::{Emulator, EmulatorConfig};
use sessionguard_protocol::wire::{op_msg, FrameCodec, MsgFlags};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

const MAX_SESSIONS: u64 = 10_000;
const TOTAL_LSIDS: u64 = 200_000;
const CONNECTIONS: u64 = 4;
/// Requests written before their replies are read (pipelined).
const BATCH: u64 = 500;
/// Allowed RSS growth between "ledger full" and "all lsids sent".
const GROWTH_BOUND_KIB: u64 = 24 * 1024;

/// Sends `count` finds, each under a fresh random lsid, on one connection,
/// and reads every reply.
async fn spray(proxy: SocketAddr, count: u64) {
    let stream = TcpStream::connect(proxy).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut replies = FramedRead::new(read, FrameCodec::default());
    let mut request_id = 0i32;
    let mut sent = 0;
    while sent < count {
        let batch = BATCH.min(count - sent);
        let mut bytes = Vec::with_capacity(usize::try_from(batch).unwrap() * 160);
        for _ in 0..batch {
            let mut id = [0u8; 16];
            rand::rng().fill_bytes(&mut id);
            request_id += 1;
            let body = doc! {
                "find": "spray",
                "filter": {},
                "limit": 1,
                "singleBatch": true,
                "lsid": { "id": Binary { subtype: BinarySubtype::Uuid, bytes: id.to_vec() } },
                "$db": "memory",
            };
            bytes.extend_from_slice(&op_msg::encode(
                request_id,
                0,
                MsgFlags::default(),
                &bson::to_vec(&body).unwrap(),
            ));
        }
        write.write_all(&bytes).await.expect("write a batch");
        for _ in 0..batch {
            let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
                .await
                .expect("a reply in time")
                .expect("the proxy keeps the connection open")
                .expect("a well-formed reply");
            assert!(reply.header.response_to > 0);
        }
        sent += batch;
    }
}

/// Sprays `count` lsids over `CONNECTIONS` connections at once.
async fn spray_all(proxy: SocketAddr, count: u64) {
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| tokio::spawn(spray(proxy, count / CONNECTIONS)))
        .collect();
    for task in tasks {
        task.await.expect("spray task");
    }
}

async fn scrape(admin: SocketAddr) -> String {
    let reply = common::http_get(admin, "/metrics", None).await;
    assert_eq!(reply.status, 200);
    reply.body
}

fn value(text: &str, series: &str) -> f64 {
    common::metric(text, series).unwrap_or_else(|| panic!("{series} missing"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lsid_spray_cannot_grow_the_ledger_or_memory_past_max_sessions() {
    let emulator = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .expect("emulator starts");
    let mut proxy = common::ProxyProcess::start(
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             upstream = \"mongodb://{}\"\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n\
             [sessions]\nmax_sessions = {MAX_SESSIONS}\n",
            emulator.addr()
        ),
        &[],
    );
    let started = Instant::now();
    let idle_rss = proxy.rss_kib();

    // Fill the ledger twice over: from here on it is full.
    let warmup = 2 * MAX_SESSIONS;
    spray_all(proxy.listen, warmup).await;
    let text = scrape(proxy.admin).await;
    let full_tracked = value(&text, "sessionguard_sessions_tracked");
    assert!(
        full_tracked <= MAX_SESSIONS as f64 && full_tracked >= MAX_SESSIONS as f64 * 0.9,
        "after {warmup} lsids the ledger tracks {full_tracked}"
    );
    let full_rss = proxy.rss_kib();

    // The rest of the spray, sampling as it goes.
    let mut samples = vec![(warmup, full_rss, full_tracked)];
    let mut sent = warmup;
    while sent < TOTAL_LSIDS {
        let step = 45_000.min(TOTAL_LSIDS - sent);
        spray_all(proxy.listen, step).await;
        sent += step;
        let text = scrape(proxy.admin).await;
        let tracked = value(&text, "sessionguard_sessions_tracked");
        assert!(
            tracked <= MAX_SESSIONS as f64,
            "after {sent} lsids the ledger tracks {tracked} > max_sessions"
        );
        samples.push((sent, proxy.rss_kib(), tracked));
    }

    let text = scrape(proxy.admin).await;
    let inspected = value(&text, "sessionguard_requests_inspected_total");
    assert!(
        inspected >= TOTAL_LSIDS as f64,
        "the engine inspected {inspected} requests"
    );
    let evicted = value(
        &text,
        "sessionguard_sessions_evicted_total{reason=\"ended\"}",
    ) + value(
        &text,
        "sessionguard_sessions_evicted_total{reason=\"idle\"}",
    ) + value(
        &text,
        "sessionguard_sessions_evicted_total{reason=\"busy\"}",
    );
    let tracked = value(&text, "sessionguard_sessions_tracked");
    let purged = value(&text, "sessionguard_sessions_purged_total");
    // Every lsid is tracked, evicted or purged: nothing silently dropped.
    assert_eq!(
        tracked + evicted + purged,
        TOTAL_LSIDS as f64,
        "tracked {tracked} + evicted {evicted} + purged {purged}"
    );
    assert!(evicted >= (TOTAL_LSIDS - MAX_SESSIONS) as f64);
    assert_eq!(
        value(
            &text,
            "sessionguard_sessions_evicted_total{reason=\"busy\"}"
        ),
        0.0,
        "sessions with nothing in flight go first"
    );

    let final_rss = proxy.rss_kib();
    let peak_rss = samples.iter().map(|s| s.1).max().unwrap().max(final_rss);
    let report: Vec<String> = samples
        .iter()
        .map(|(lsids, rss, tracked)| format!("{lsids} lsids: {rss} KiB, {tracked} tracked"))
        .collect();
    eprintln!(
        "lsid spray: idle {idle_rss} KiB, ledger full {full_rss} KiB, final {final_rss} KiB, \
         peak {peak_rss} KiB, {evicted} evicted, {:?}\n  {}",
        started.elapsed(),
        report.join("\n  ")
    );
    assert!(
        peak_rss.saturating_sub(full_rss) <= GROWTH_BOUND_KIB,
        "resident memory grew by {} KiB after the ledger was full (bound {GROWTH_BOUND_KIB} KiB):\n  {}",
        peak_rss.saturating_sub(full_rss),
        report.join("\n  ")
    );

    proxy.terminate();
    emulator.shutdown().await;
}
