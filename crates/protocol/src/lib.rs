//! sessionguard-protocol: the MongoDB wire protocol as sessionguard reads it.
//!
//! It owns bytes <-> frames (the header, OP_MSG, OP_COMPRESSED, the legacy
//! OP_QUERY / OP_REPLY handshake), a bounds-checked walk over BSON
//! documents, zero-copy views of the commands, replies and handshakes the
//! proxy inspects, the closed set of command names metrics are labelled
//! with, and the causes a connection can end with. Everything here is pure:
//! no tokio, no sockets, no clocks, no session logic, no logging. Every
//! other crate of the workspace builds on it; it depends on none of them.
//!
//! # Layout
//!
//! - [`wire`]: bytes <-> frames (header, codec, OP_MSG, OP_COMPRESSED,
//!   legacy OP_QUERY / OP_REPLY). With the `tokio-codec` feature,
//!   [`wire::FrameCodec`] is also a tokio-util `Decoder`.
//! - [`bson_scan`]: a bounds-checked walk over a document's top-level
//!   elements for the hot path (type, key, value bytes; nothing decoded).
//! - [`command`]: zero-copy views of requests, replies and handshakes (lsid,
//!   txnNumber, cursor ids, session lists, statement identity, user).
//! - `command_names`: [`COMMAND_LABELS`], [`command_index`],
//!   [`intern_command`]: command names as a fixed label set.
//! - `close`: [`CloseCause`], why a client connection ended.
#![forbid(unsafe_code)]

pub mod bson_scan;
mod close;
pub mod command;
mod command_names;
pub mod wire;

pub use close::CloseCause;
pub use command_names::{command_index, intern_command, COMMAND_LABELS, OTHER_COMMAND};
