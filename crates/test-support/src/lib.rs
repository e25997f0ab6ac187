//! sessionguard-test-support: the scaffolding every integration suite of the
//! workspace shares, one copy each: the stacks (`Stack`: emulator + proxy;
//! `Guarded`: the same with a real session engine; `guarded_proxy` in front
//! of an upstream the test runs), a raw wire client (`RawClient`), lsids,
//! deadlines and waits on observable conditions, a TCP relay, log capture,
//! the admin API over plain HTTP, and the built binaries as child processes.
//!
//! A dev-dependency only: nothing here is linked into the shipped binary.
//! It must not hold a test's logic (what is asserted), nor wait by sleeping
//! for a fixed time: every wait polls an observable condition up to a
//! deadline (`wait`).
//!
//! # Layout
//!
//! - `stack`: `Stack`, `Guarded`, `GuardedProxy` / `guarded_proxy`, and the
//!   wait for the engine to have inspected the traffic (`settle`).
//! - `raw`: `RawClient`, `handshake_once`, the rule tests' command documents.
//! - `lsid`: lsid documents and the forms sessionguard shows them in.
//! - `wait`: `WAIT` and `eventually`.
//! - `relay`: `Relay` (reset-capable, or a tap that keeps what clients sent).
//! - `capture`: log capture, process-wide (`logs`) or per thread (`ThreadLogs`).
//! - `http`: the admin API (`http_get`, `admin_for`).
//! - `exposition`: one series of a Prometheus exposition (`metric`).
//! - `process`: the `sessionguard` / `sessionguard-dev` binaries and
//!   `ProxyProcess`.
//! - `engine_direct`: requests and replies handed to an engine alone.
//! - `workload`: a well-behaved driver workload running alongside a test.
//! - `scenarios`: shared emulator settings and driver scenarios.
#![forbid(unsafe_code)]

pub mod capture;
pub mod engine_direct;
pub mod exposition;
pub mod http;
pub mod lsid;
pub mod process;
pub mod raw;
pub mod relay;
pub mod scenarios;
pub mod stack;
pub mod wait;
pub mod workload;

pub use capture::{logs, ThreadLogs};
pub use engine_direct::{engine_close, engine_reply, engine_request};
pub use exposition::metric;
pub use http::{admin_for, http_get, http_request, HttpReply};
pub use lsid::{lsid, lsid_raw, lsid_string, session_lsid, short_of};
pub use process::{dev_bin, dev_command, sessionguard_bin, sessionguard_command, ProxyProcess};
pub use raw::{
    decode_reply, find_cmd, handshake_once, insert_cmd, ok, txn_end_cmd, txn_insert_cmd,
    HandshakeOutcome, RawClient, RawReply,
};
pub use relay::Relay;
pub use scenarios::{
    emulator_with_latency, hold_a_cursor_idle, slow_emulator, IDLE, SERVER_TIMEOUT,
};
pub use stack::{guarded_proxy, Guarded, GuardedProxy, Stack};
pub use wait::{eventually, WAIT};
pub use workload::{Workload, WorkloadResult};
