//! Fast mode (`EmulatorConfig::fast`): canned answers to `find`, `insert`
//! and `getMore` that store nothing and read no data set, so that a load
//! benchmark measures the path in front of the emulator rather than the
//! emulator itself. Every other command (hello, endSessions, ...) still goes
//! through the normal dispatch. The replies have the server's shapes:
//! `find` opens a cursor with a fresh id (two small documents in the first
//! batch), `getMore` returns two more and closes it (id 0), `insert` counts
//! the documents it was sent. Compressed requests are not fast-pathed.
//! It must stay tiny: fidelity lives in `commands.rs`, not here.

use std::sync::atomic::{AtomicI64, Ordering};

use bson::{rawdoc, RawArrayBuf, RawDocument, RawDocumentBuf};
use bytes::Bytes;

use sessionguard_protocol::wire::{op_msg, MsgFlags, OpMsg};

/// Cursor ids handed out by fast `find`s: unique across the process, so a
/// proxy in front that follows cursors never sees two sessions share one.
static NEXT_CURSOR_ID: AtomicI64 = AtomicI64::new(1);

/// The encoded reply frame for a fast-path command, `None` for a command
/// fast mode does not answer (or a request with `moreToCome`, which gets
/// no reply: the caller's normal path handles both).
pub(super) fn answer(
    request_id: i32,
    reply_id: impl FnOnce() -> i32,
    msg: &OpMsg<'_>,
) -> Option<Bytes> {
    if msg.flags.more_to_come() {
        return None;
    }
    let name = msg.command_name()?;
    let reply = match name {
        "find" => find(msg.body),
        "getMore" => get_more(msg.body),
        "insert" => insert(msg),
        _ => return None,
    }?;
    Some(op_msg::encode(
        reply_id(),
        request_id,
        MsgFlags(0),
        reply.as_bytes(),
    ))
}

fn namespace(body: &RawDocument, collection_key: &str) -> Option<String> {
    let db = body.get_str("$db").ok()?;
    let collection = body.get_str(collection_key).ok()?;
    Some(format!("{db}.{collection}"))
}

fn batch(first_id: i32) -> RawArrayBuf {
    let mut docs = RawArrayBuf::new();
    for id in first_id..first_id + 2 {
        docs.push(rawdoc! { "_id": id, "status": "active", "n": 1_i64 });
    }
    docs
}

fn find(body: &RawDocument) -> Option<RawDocumentBuf> {
    let ns = namespace(body, "find")?;
    let id = NEXT_CURSOR_ID.fetch_add(1, Ordering::Relaxed);
    Some(rawdoc! {
        "cursor": { "firstBatch": batch(1), "id": id, "ns": ns },
        "ok": 1.0,
    })
}

fn get_more(body: &RawDocument) -> Option<RawDocumentBuf> {
    body.get_i64("getMore").ok()?;
    let ns = namespace(body, "collection")?;
    Some(rawdoc! {
        "cursor": { "nextBatch": batch(3), "id": 0_i64, "ns": ns },
        "ok": 1.0,
    })
}

fn insert(msg: &OpMsg<'_>) -> Option<RawDocumentBuf> {
    let in_body = msg
        .body
        .get_array("documents")
        .ok()
        .map(|docs| docs.into_iter().count());
    let n = in_body.or_else(|| msg.sequence("documents").map(|s| s.len()))?;
    Some(rawdoc! { "n": i32::try_from(n).unwrap_or(i32::MAX), "ok": 1.0 })
}
