//! sessionguard: a MongoDB wire-protocol proxy that enforces session hygiene.
//!
//! # Layout
//!
//! - [`wire`]: bytes <-> frames (header, codec, OP_MSG, OP_COMPRESSED, legacy
//!   OP_QUERY/OP_REPLY). Pure: no I/O, no session logic.
//! - [`emulator`]: a small in-memory MongoDB-compatible server used by
//!   `demo`, the tests and the benchmarks.
#![forbid(unsafe_code)]

pub mod demo;
pub mod emulator;
pub mod session;
pub mod wire;
