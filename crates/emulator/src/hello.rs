//! The handshake reply (`hello` / `isMaster` / `ismaster`) for each
//! persona, shaped like a MongoDB 7.0 server's (or, with the `documentdb`
//! profile, like the captured DocumentDB one), and the helpers for the
//! streaming (awaitable) hello protocol: reading the client's
//! topologyVersion / maxAwaitTimeMS and deciding whether to answer at once.

use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};

use super::deployment::{EmulatorState, TopologyState};
use super::emulator_config::Topology;
use super::profile::Profile;
use super::query::as_i64;
use sessionguard_protocol::wire::Compressor;

pub(crate) const MAX_BSON_OBJECT_SIZE: i32 = 16 * 1024 * 1024;
pub(crate) const MAX_WRITE_BATCH_SIZE: i32 = 100_000;
pub(crate) const MAX_WIRE_VERSION: i32 = 21;
/// DocumentDB's maxWriteBatchSize (its captured hello).
const DOCUMENTDB_MAX_WRITE_BATCH_SIZE: i32 = 25_000;

/// What one connection knows about itself when answering hello.
pub(crate) struct HelloContext<'a> {
    pub state: &'a EmulatorState,
    pub member: usize,
    pub connection_id: i32,
}

/// The client's awaitable-hello parameters, when both are present.
pub(crate) struct AwaitParams {
    pub process_id: ObjectId,
    pub counter: i64,
    pub max_await: Duration,
}

pub(crate) fn await_params(request: &Document) -> Option<AwaitParams> {
    let tv = request.get_document("topologyVersion").ok()?;
    let process_id = tv.get_object_id("processId").ok()?;
    let counter = match tv.get("counter")? {
        Bson::Int64(c) => *c,
        Bson::Int32(c) => i64::from(*c),
        _ => return None,
    };
    let max_await_ms = as_i64(request.get("maxAwaitTimeMS"))?;
    Some(AwaitParams {
        process_id,
        counter,
        max_await: Duration::from_millis(u64::try_from(max_await_ms).unwrap_or(0)),
    })
}

/// Is the client's topologyVersion current (so the server should wait)?
pub(crate) fn is_current(params: &AwaitParams, topology: &TopologyState) -> bool {
    params.process_id == topology.process_id && params.counter >= topology.counter
}

/// Picks the compressor to use with a client: the first in its list we support.
pub(crate) fn negotiate_compression(request: &Document) -> Option<Compressor> {
    let names = request.get_array("compression").ok()?;
    names.iter().filter_map(Bson::as_str).find_map(|name| {
        Compressor::from_name(name)
            .filter(|c| matches!(c, Compressor::Snappy | Compressor::Zlib | Compressor::Zstd))
    })
}

fn election_id(term: i64) -> ObjectId {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&[0x7f, 0xff, 0xff, 0xff]);
    bytes[4..].copy_from_slice(&term.to_be_bytes());
    ObjectId::from_bytes(bytes)
}

/// Builds the hello reply. `command_name` decides between `isWritablePrimary`
/// (hello) and `ismaster` (legacy) as the server does.
pub(crate) fn hello_reply(
    ctx: &HelloContext<'_>,
    command_name: &str,
    request: &Document,
    compression: Option<Compressor>,
) -> Document {
    let config = ctx.state.config();
    let legacy = command_name != "hello";
    let writable_field = if legacy {
        "ismaster"
    } else {
        "isWritablePrimary"
    };
    if config.profile == Profile::DocumentDb {
        return documentdb_hello(ctx, writable_field, request);
    }
    let topology = ctx.state.topology();
    let mut reply = Document::new();
    if request.get_bool("helloOk").unwrap_or(false) {
        reply.insert("helloOk", true);
    }
    reply.insert(
        "topologyVersion",
        doc! { "processId": topology.process_id, "counter": topology.counter },
    );
    match &config.topology {
        Topology::Standalone => {
            reply.insert(writable_field, true);
        }
        Topology::Mongos => {
            reply.insert(writable_field, true);
            reply.insert("msg", "isdbgrid");
        }
        Topology::ReplicaSetPrimary { set_name } => {
            let is_primary = topology.primary_member == Some(ctx.member);
            let hosts: Vec<Bson> = topology
                .members
                .iter()
                .map(|h| Bson::String(h.clone()))
                .collect();
            let me = topology
                .members
                .get(ctx.member)
                .cloned()
                .unwrap_or_default();
            reply.insert("hosts", hosts);
            reply.insert("setName", set_name.clone());
            reply.insert("setVersion", 1);
            reply.insert(writable_field, is_primary);
            reply.insert("secondary", !is_primary);
            if let Some(primary) = topology
                .primary_member
                .and_then(|p| topology.members.get(p))
            {
                reply.insert("primary", primary.clone());
            }
            reply.insert("me", me);
            if is_primary {
                reply.insert("electionId", election_id(topology.term));
            }
            let now = DateTime::now();
            let op_time = doc! { "ts": ctx.state.cluster_time(), "t": topology.term };
            reply.insert(
                "lastWrite",
                doc! {
                    "opTime": op_time.clone(),
                    "lastWriteDate": now,
                    "majorityOpTime": op_time,
                    "majorityWriteDate": now,
                },
            );
        }
    }
    insert_limits(&mut reply, config, MAX_WRITE_BATCH_SIZE);
    reply.insert("connectionId", ctx.connection_id);
    reply.insert("minWireVersion", 0);
    reply.insert("maxWireVersion", MAX_WIRE_VERSION);
    reply.insert("readOnly", false);
    if let Some(c) = compression {
        reply.insert("compression", vec![Bson::String(c.name().to_string())]);
    }
    reply.insert("ok", 1.0);
    reply
}

/// The size limits, clock and session timeout every hello reports.
fn insert_limits(
    reply: &mut Document,
    config: &super::emulator_config::EmulatorConfig,
    max_write_batch: i32,
) {
    reply.insert("maxBsonObjectSize", MAX_BSON_OBJECT_SIZE);
    reply.insert(
        "maxMessageSizeBytes",
        i32::try_from(config.max_message_size).unwrap_or(i32::MAX),
    );
    reply.insert("maxWriteBatchSize", max_write_batch);
    reply.insert("localTime", DateTime::now());
    reply.insert(
        "logicalSessionTimeoutMinutes",
        config.logical_session_timeout_minutes,
    );
}

/// DocumentDB's hello, field for field as a real one answered (a mongos-like
/// reply without `topologyVersion`, so drivers do not stream hellos, and
/// without compression).
fn documentdb_hello(ctx: &HelloContext<'_>, writable_field: &str, request: &Document) -> Document {
    let config = ctx.state.config();
    let mut reply = Document::new();
    if request.get_bool("helloOk").unwrap_or(false) {
        reply.insert("helloOk", true);
    }
    reply.insert(writable_field, true);
    reply.insert("msg", "isdbgrid");
    insert_limits(&mut reply, config, DOCUMENTDB_MAX_WRITE_BATCH_SIZE);
    reply.insert("minWireVersion", 0);
    reply.insert("maxWireVersion", MAX_WIRE_VERSION);
    reply.insert("readOnly", false);
    reply.insert("connectionId", ctx.connection_id);
    reply.insert("internal", Document::new());
    reply.insert("ok", 1.0);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EmulatorConfig;

    fn reported_max_message_size(config: EmulatorConfig) -> Option<i32> {
        let state = EmulatorState::new(config);
        let ctx = HelloContext {
            state: &state,
            member: 0,
            connection_id: 1,
        };
        hello_reply(&ctx, "hello", &Document::new(), None)
            .get_i32("maxMessageSizeBytes")
            .ok()
    }

    #[test]
    fn hello_reports_the_configured_message_size_bound() {
        assert_eq!(
            reported_max_message_size(EmulatorConfig::default()),
            Some(48_000_000)
        );
        let small = EmulatorConfig {
            max_message_size: 1_000_000,
            ..EmulatorConfig::default()
        };
        assert_eq!(reported_max_message_size(small), Some(1_000_000));
        let huge = EmulatorConfig {
            max_message_size: usize::MAX,
            ..EmulatorConfig::default()
        };
        assert_eq!(reported_max_message_size(huge), Some(i32::MAX));
    }
}
