//! sessionguard-dev: the project's dev tools, as a library behind the
//! `sessionguard-dev` binary and its tests.
//!
//! It owns the demo (the emulator and the proxy in one process, a correct
//! workload and three session bugs through them, what sessionguard found),
//! the small driver application `demo-app` for trying `sessionguard exec`,
//! and the load generator, memory probes and reference relay behind
//! bench/compare.sh. It builds on the whole workspace and the official
//! MongoDB driver; nothing in the shipped binary may depend on it.
//!
//! # Layout
//!
//! - [`demo`]: `sessionguard-dev demo` and `demo-app`.
//! - [`bench`](mod@bench): `sessionguard-dev bench-load`: the load generator and the
//!   memory measurements behind bench/compare.sh and docs/performance.md.
//! - [`relay`]: `sessionguard-dev bench-relay`: a frame-aware relay with no
//!   inspection, the floor bench/compare.sh measures sessionguard against.
#![forbid(unsafe_code)]
// Dev tools: the demo and the load generator print to their terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod bench;
pub mod demo;
pub mod relay;
