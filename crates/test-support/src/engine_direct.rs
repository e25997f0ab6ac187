//! The engine alone, time driven by the test: requests and replies handed
//! to a `SessionEngine` as parsed OP_MSG frames, no sockets.

/// An engine's records of one in-flight request: (engine, connection,
/// request id, record).
type InFlightEntry = (usize, u64, i32, sessionguard_engine::PendingRequest);

thread_local! {
    /// The engine's records of the requests `engine_request` sent that await
    /// their replies, oldest first: the engine keeps none itself (the
    /// proxy's in-flight table does), so the test keeps them in its place.
    static ENGINE_IN_FLIGHT: std::cell::RefCell<Vec<InFlightEntry>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn engine_key(engine: &sessionguard_engine::SessionEngine) -> usize {
    std::ptr::from_ref(engine) as usize
}

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
    let (decision, pending) = as_op_msg(id, 0, flags, doc, |msg| {
        engine.request_at(conn, id, msg, now)
    });
    if let Some(pending) = pending {
        let key = engine_key(engine);
        ENGINE_IN_FLIGHT.with_borrow_mut(|table| table.push((key, conn, id, pending)));
    }
    decision
}

/// Hands `doc` to `engine` as the reply to request `to` on `conn` at `now`.
pub fn engine_reply(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    to: i32,
    doc: &bson::RawDocumentBuf,
    now: u64,
) {
    let key = engine_key(engine);
    // Matched as the proxy matches it: the latest request with that id.
    let Some(mut pending) = ENGINE_IN_FLIGHT.with_borrow_mut(|table| {
        let position = table
            .iter()
            .rposition(|(k, c, id, _)| (*k, *c, *id) == (key, conn, to))?;
        Some(table.remove(position).3)
    }) else {
        return;
    };
    as_op_msg(1000 + to, to, 0, doc, |msg| {
        engine.reply_at(conn, &mut pending, msg, now)
    });
}

/// Closes connection `conn` of `engine` at `now`, handing back what is
/// still in flight on it (as the proxy does).
pub fn engine_close(
    engine: &sessionguard_engine::SessionEngine,
    conn: u64,
    cause: sessionguard_protocol::CloseCause,
    now: u64,
) {
    let key = engine_key(engine);
    let left: Vec<_> = ENGINE_IN_FLIGHT.with_borrow_mut(|table| {
        let (left, kept) = std::mem::take(table)
            .into_iter()
            .partition(|(k, c, _, _)| (*k, *c) == (key, conn));
        *table = kept;
        left
    });
    engine.close_at(conn, cause, left.into_iter().map(|(_, _, _, p)| p), now);
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
