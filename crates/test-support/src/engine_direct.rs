//! The engine alone, time driven by the test: requests and replies handed
//! to a `SessionEngine` as parsed OP_MSG frames, no sockets.

/// Hands `doc` to `engine` as an OP_MSG request (request id `id`, `flags`)
/// on connection `conn` at engine time `now`: the engine alone, time driven
/// by the test.
pub fn engine_request(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    id: i32,
    doc: &bson::RawDocumentBuf,
    flags: u32,
    now: u64,
) -> sessionguard_engine::Decision {
    as_op_msg(id, 0, flags, doc, |msg| {
        engine.request_at(conn, id, msg, now)
    })
}

/// Hands `doc` to `engine` as the reply to request `to` on `conn` at `now`.
pub fn engine_reply(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    to: i32,
    doc: &bson::RawDocumentBuf,
    now: u64,
) {
    as_op_msg(1000 + to, to, 0, doc, |msg| {
        engine.reply_at(conn, to, msg, now)
    });
}

/// `doc` as a parsed OP_MSG frame.
fn as_op_msg<R>(
    id: i32,
    response_to: i32,
    flags: u32,
    doc: &bson::RawDocumentBuf,
    then: impl FnOnce(&sessionguard_protocol::wire::Message<'_>) -> R,
) -> R {
    use sessionguard_protocol::wire::{op_msg, Message, MsgFlags, OpMsg, HEADER_LEN};
    let frame = op_msg::encode(id, response_to, MsgFlags(flags), doc.as_bytes());
    let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
    then(&Message::Msg(msg))
}
