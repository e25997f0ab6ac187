//! Replica-set topology through the proxy: rewriting the member addresses in
//! every hello / isMaster / legacy OP_QUERY isMaster reply (`hosts`,
//! `passives`, `arbiters`, `primary`, `me`) to the proxy's advertised
//! addresses, so that drivers discover the proxy's member listeners instead
//! of the members themselves. Streamed (exhaust) replies are rewritten one
//! by one; each rewritten reply keeps its requestID, responseTo, opcode and
//! flags (minus the OP_MSG checksum, which would no longer match) and is
//! re-wrapped with the same compressor when it arrived compressed.
//!
//! It owns the member map and the `TopologyInspector` decorator that applies
//! it around the session engine's inspector. It must not touch any other
//! reply, must not change any other field, and logs addresses only (never
//! other document contents). An address the map does not know is logged
//! once, loudly, and left as it is; so is a replica-set hello seen while no
//! map is configured (those drivers will bypass the proxy).
//!
//! Why a decorator and not the connection's reply path: the `Inspector` seam
//! already hands over the parsed reply with its request record (which knows
//! it was a hello, also for every streamed reply) and already lets the reply
//! bytes be replaced, so the rewrite needs no change to the data path; the
//! session engine, which it wraps, keeps seeing the reply exactly as the
//! member sent it; and the rewrite stays a pure function that is tested
//! without sockets.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bson::{RawArrayBuf, RawBsonRef, RawDocument, RawDocumentBuf};
use bytes::Bytes;
use tracing::{error, warn};

use super::inspect::{CloseCause, ConnContext, InFlightRequest, Inspector, ReplyVerdict, Verdict};
use super::upstream::{HostPort, DEFAULT_MONGODB_PORT};
use sessionguard_protocol::wire::{
    self, op_compressed, Compressor, Frame, FrameRef, Message, MsgFlags, OpCode, HEADER_LEN,
};

/// Hello fields that hold lists of member addresses.
const LIST_FIELDS: [&str; 3] = ["hosts", "passives", "arbiters"];
/// Hello fields that hold one member address.
const SINGLE_FIELDS: [&str; 2] = ["primary", "me"];
/// OP_MSG flag bit 0: a CRC-32C follows the sections.
/// How many distinct unknown addresses are remembered (each is logged once);
/// beyond this they are still left alone, just no longer logged.
const MAX_REMEMBERED_UNKNOWN: usize = 1024;

/// Member address (as the replica set names it) -> advertised proxy address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MemberMap {
    by_member: HashMap<String, String>,
}

impl MemberMap {
    /// Builds the map from `(member, advertised)` pairs.
    pub(crate) fn new(pairs: impl IntoIterator<Item = (HostPort, String)>) -> MemberMap {
        MemberMap {
            by_member: pairs
                .into_iter()
                .map(|(member, advertised)| (normalize(&member.to_string()), advertised))
                .collect(),
        }
    }

    /// No mapping: single-upstream mode.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_member.is_empty()
    }

    /// The advertised address for a member address from a hello reply.
    /// Host names compare case-insensitively and a missing port means
    /// 27017, as drivers compare them (server discovery spec).
    pub(crate) fn advertised(&self, member: &str) -> Option<&str> {
        self.by_member.get(&normalize(member)).map(String::as_str)
    }
}

/// `Host:Port` in the form hello replies are compared in: lower case, with
/// the default port made explicit.
fn normalize(address: &str) -> String {
    let lower = address.trim().to_ascii_lowercase();
    let has_port = match lower.rfind(']') {
        Some(close) => lower[close..].contains(':'),
        None => lower.contains(':'),
    };
    if has_port {
        lower
    } else {
        format!("{lower}:{DEFAULT_MONGODB_PORT}")
    }
}

/// What rewriting one hello document found.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct HelloRewrite {
    /// The new document, when at least one address changed.
    pub document: Option<RawDocumentBuf>,
    /// Member addresses the map does not know (left as they were).
    pub unknown: Vec<String>,
    /// The reply came from a replica-set member (`setName` or `hosts`).
    pub replica_set: bool,
}

/// Rewrites the address fields of one hello reply document. Every other
/// field is copied as it is, in its original order. Pure.
pub(crate) fn rewrite_hello_document(
    document: &RawDocument,
    map: &MemberMap,
) -> Result<HelloRewrite, bson::raw::Error> {
    let mut out = RawDocumentBuf::new();
    let mut result = HelloRewrite::default();
    let mut changed = false;
    let mut translate = |address: &str, unknown: &mut Vec<String>| -> Option<String> {
        match map.advertised(address) {
            Some(advertised) if advertised != address => {
                changed = true;
                Some(advertised.to_string())
            }
            Some(_) => None,
            None => {
                if !unknown.iter().any(|seen| seen == address) {
                    unknown.push(address.to_string());
                }
                None
            }
        }
    };
    for element in document {
        let (key, value) = element?;
        if key == "setName" || key == "hosts" {
            result.replica_set = true;
        }
        match value {
            RawBsonRef::Array(list) if LIST_FIELDS.contains(&key) => {
                let mut new_list = RawArrayBuf::new();
                for item in list {
                    match item? {
                        RawBsonRef::String(address) => {
                            match translate(address, &mut result.unknown) {
                                Some(advertised) => new_list.push(advertised),
                                None => new_list.push(address),
                            }
                        }
                        other => new_list.push(other.to_raw_bson()),
                    }
                }
                out.append(key, new_list);
            }
            RawBsonRef::String(address) if SINGLE_FIELDS.contains(&key) => {
                match translate(address, &mut result.unknown) {
                    Some(advertised) => out.append(key, advertised),
                    None => out.append_ref(key, value),
                }
            }
            other => out.append_ref(key, other),
        }
    }
    if changed {
        result.document = Some(out);
    }
    Ok(result)
}

/// Whether a hello reply (OP_MSG body or OP_REPLY's first document) comes
/// from a replica-set member: it names `setName` or `hosts`.
fn is_replica_set_hello(msg: &Message<'_>) -> bool {
    let document = match msg {
        Message::Msg(m) => m.body,
        Message::Reply(r) => match r.first() {
            Some(first) => first,
            None => return false,
        },
        Message::Query(_) | Message::Other(_) => return false,
    };
    sessionguard_protocol::bson_scan::elements(document)
        .any(|e| e.key == b"setName" || e.key == b"hosts")
}

/// What rewriting one reply frame found.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ReplyRewrite {
    /// The complete replacement frame, when an address changed.
    pub frame: Option<Bytes>,
    pub unknown: Vec<String>,
    pub replica_set: bool,
}

/// Rewrites a hello reply frame: an OP_MSG (the body section), or a legacy
/// OP_REPLY (its first document), either possibly inside OP_COMPRESSED
/// (`msg` is the opened view of `frame`). The new frame keeps the
/// requestID, responseTo, opcode, OP_REPLY responseFlags / cursorID /
/// startingFrom and OP_MSG flags (so `moreToCome` streams go on), except
/// `checksumPresent`: the checksum is dropped rather than recomputed
/// (it is optional, and drivers do not send or require it). A reply that
/// arrived compressed is compressed again with the same compressor, which
/// the driver negotiated and therefore accepts. Pure.
pub(crate) fn rewrite_hello_reply(
    frame: FrameRef<'_>,
    msg: &Message<'_>,
    map: &MemberMap,
) -> Result<ReplyRewrite, bson::raw::Error> {
    let compressor = compressor_of(frame);
    let (found, body) = match msg {
        Message::Msg(m) => {
            let found = rewrite_hello_document(m.body, map)?;
            let body = found.document.as_ref().map(|document| {
                let flags = MsgFlags(m.flags.0 & !MsgFlags::CHECKSUM_PRESENT);
                let sequences: Vec<(&str, Vec<&[u8]>)> = m
                    .sequences
                    .iter()
                    .map(|s| (s.identifier, s.iter().map(|d| d.as_bytes()).collect()))
                    .collect();
                let sequences: Vec<(&str, &[&[u8]])> = sequences
                    .iter()
                    .map(|(identifier, documents)| (*identifier, documents.as_slice()))
                    .collect();
                let encoded = wire::op_msg::encode_with_sequences(
                    frame.header.request_id,
                    frame.header.response_to,
                    flags,
                    document.as_bytes(),
                    &sequences,
                );
                (OpCode::Msg, encoded)
            });
            (found, body)
        }
        Message::Reply(r) => {
            let Some(first) = r.first() else {
                return Ok(ReplyRewrite::default());
            };
            let found = rewrite_hello_document(first, map)?;
            let body = found.document.as_ref().map(|document| {
                let rest = &r.documents[first.as_bytes().len()..];
                let mut body = Vec::with_capacity(20 + document.as_bytes().len() + rest.len());
                body.extend_from_slice(&r.response_flags.to_le_bytes());
                body.extend_from_slice(&r.cursor_id.to_le_bytes());
                body.extend_from_slice(&r.starting_from.to_le_bytes());
                body.extend_from_slice(&r.number_returned.to_le_bytes());
                body.extend_from_slice(document.as_bytes());
                body.extend_from_slice(rest);
                let built = Frame::build(
                    frame.header.request_id,
                    frame.header.response_to,
                    OpCode::Reply,
                    &body,
                );
                (OpCode::Reply, built.bytes)
            });
            (found, body)
        }
        Message::Query(_) | Message::Other(_) => return Ok(ReplyRewrite::default()),
    };
    let frame_bytes = body.map(|(op_code, uncompressed)| match compressor {
        Some(compressor) => op_compressed::compress(
            frame.header.request_id,
            frame.header.response_to,
            op_code,
            compressor,
            &uncompressed[HEADER_LEN..],
        ),
        None => uncompressed,
    });
    Ok(ReplyRewrite {
        frame: frame_bytes,
        unknown: found.unknown,
        replica_set: found.replica_set,
    })
}

/// The compressor of an OP_COMPRESSED frame (its id is byte 8 of the body).
fn compressor_of(frame: FrameRef<'_>) -> Option<Compressor> {
    if frame.header.op_code != OpCode::Compressed {
        return None;
    }
    frame
        .body()
        .get(8)
        .and_then(|id| Compressor::from_id(*id).ok())
}

/// Whether a reply is a hello reply: the answer to a hello request (every
/// reply of a streamed hello carries that request's record), or, for a
/// reply no request claims, a body shaped like one.
fn is_hello_reply<P>(request: Option<&InFlightRequest<P>>, msg: &Message<'_>) -> bool {
    match request {
        Some(request) => request
            .command
            .as_deref()
            .is_some_and(sessionguard_protocol::command::is_hello),
        None => {
            let body = match msg {
                Message::Msg(m) => Some(m.body),
                Message::Reply(r) => r.first(),
                _ => None,
            };
            body.is_some_and(|b| {
                matches!(b.get("isWritablePrimary"), Ok(Some(_)))
                    || matches!(b.get("ismaster"), Ok(Some(_)))
            })
        }
    }
}

/// Applies the member map to hello replies around another inspector (the
/// session engine), and says once when drivers are about to bypass the proxy.
pub(crate) struct TopologyInspector<I> {
    inner: Arc<I>,
    map: MemberMap,
    warned_unknown: Mutex<HashSet<String>>,
    warned_bypass: AtomicBool,
}

impl<I: Inspector> TopologyInspector<I> {
    pub(crate) fn new(inner: Arc<I>, map: MemberMap) -> TopologyInspector<I> {
        TopologyInspector {
            inner,
            map,
            warned_unknown: Mutex::new(HashSet::new()),
            warned_bypass: AtomicBool::new(false),
        }
    }

    /// True the first time `address` is reported (it is logged then).
    fn first_report_of_unknown(&self, address: &str) -> bool {
        let mut seen = self
            .warned_unknown
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if seen.contains(address) || seen.len() >= MAX_REMEMBERED_UNKNOWN {
            return false;
        }
        seen.insert(address.to_string())
    }

    /// Warns, once, that a replica-set hello came back without a map.
    fn warn_bypass(&self, conn: &ConnContext) {
        if self.warned_bypass.swap(true, Ordering::Relaxed) {
            return;
        }
        // Only a warning: clients with directConnection=true (what the
        // README tells applications to use) are not affected.
        warn!(
            listen = %conn.local,
            "the upstream is a replica-set member, and no member mapping is configured \
             ([[members]] or proxy.member_base_port): drivers that connect without \
             directConnection=true will discover the members from hello and connect to \
             them directly, bypassing sessionguard"
        );
    }

    fn rewrite(&self, conn: &ConnContext, frame: FrameRef<'_>, msg: &Message<'_>) -> ReplyVerdict {
        // Single-upstream mode has nothing to map: it only looks for a
        // replica-set hello (to warn once about drivers bypassing the
        // proxy), without rebuilding the reply.
        if self.map.is_empty() {
            if !self.warned_bypass.load(Ordering::Relaxed) && is_replica_set_hello(msg) {
                self.warn_bypass(conn);
            }
            return ReplyVerdict::Forward;
        }
        let found = match rewrite_hello_reply(frame, msg, &self.map) {
            Ok(found) => found,
            Err(e) => {
                // The frame parsed, so this is a malformed BSON element
                // inside the reply; the driver will judge it, as it would
                // without the proxy.
                warn!(conn = conn.id, error = %e, "hello reply could not be rewritten; forwarded as received");
                return ReplyVerdict::Forward;
            }
        };
        for address in &found.unknown {
            if self.first_report_of_unknown(address) {
                error!(
                    member = %address,
                    listen = %conn.local,
                    "hello names a replica-set member that the member mapping does not know; \
                     it is left as is, so drivers will connect to it directly, bypassing \
                     sessionguard: add it to [[members]]"
                );
            }
        }
        match found.frame {
            Some(bytes) => ReplyVerdict::Replace(bytes),
            None => ReplyVerdict::Forward,
        }
    }
}

impl<I: Inspector> Inspector for TopologyInspector<I> {
    type Pending = I::Pending;
    type Conn = I::Conn;

    fn on_connect(&self, conn: &ConnContext) -> I::Conn {
        self.inner.on_connect(conn)
    }

    fn on_request(
        &self,
        conn: &ConnContext,
        state: &I::Conn,
        frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> Verdict<I::Pending> {
        self.inner.on_request(conn, state, frame, msg)
    }

    fn on_reply(
        &self,
        conn: &ConnContext,
        state: &I::Conn,
        mut request: Option<&mut InFlightRequest<I::Pending>>,
        frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> ReplyVerdict {
        // The wrapped inspector sees the reply as the member sent it.
        let verdict = self
            .inner
            .on_reply(conn, state, request.as_deref_mut(), frame, msg);
        if !is_hello_reply(request.as_deref(), msg) {
            return verdict;
        }
        match verdict {
            ReplyVerdict::Forward => self.rewrite(conn, frame, msg),
            // No inspector replaces hello replies; a replacement would be
            // the inner inspector's own answer, passed on as it is.
            replaced @ ReplyVerdict::Replace(_) => replaced,
        }
    }

    fn on_close(
        &self,
        conn: &ConnContext,
        state: &I::Conn,
        cause: CloseCause,
        still_in_flight: Vec<InFlightRequest<I::Pending>>,
    ) {
        self.inner.on_close(conn, state, cause, still_in_flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Document};
    use std::borrow::Cow;
    use std::time::Instant;

    /// A frame view of complete frame bytes (header included).
    fn reopen(bytes: Bytes) -> Option<Frame> {
        let header = wire::MsgHeader::parse(&bytes)?;
        Some(Frame { header, bytes })
    }

    fn host(s: &str) -> HostPort {
        let (h, p) = s.rsplit_once(':').unwrap();
        HostPort {
            host: h.to_string(),
            port: p.parse().unwrap(),
        }
    }

    fn map() -> MemberMap {
        MemberMap::new([
            (host("a.internal:27017"), "proxy:27018".to_string()),
            (host("b.internal:27017"), "proxy:27019".to_string()),
            (host("c.internal:27017"), "proxy:27020".to_string()),
            (host("arb.internal:27017"), "proxy:27021".to_string()),
        ])
    }

    fn raw(d: &Document) -> RawDocumentBuf {
        RawDocumentBuf::from_document(d).unwrap()
    }

    fn hello() -> Document {
        doc! {
            "topologyVersion": { "processId": bson::oid::ObjectId::new(), "counter": 3_i64 },
            "hosts": ["a.internal:27017", "b.internal:27017"],
            "passives": ["c.internal:27017"],
            "arbiters": ["arb.internal:27017"],
            "setName": "rs0",
            "isWritablePrimary": false,
            "secondary": true,
            "primary": "a.internal:27017",
            "me": "b.internal:27017",
            "maxWireVersion": 21,
            "ok": 1.0,
        }
    }

    fn expected_hello(original: &Document) -> Document {
        let mut expected = original.clone();
        expected.insert("hosts", vec!["proxy:27018", "proxy:27019"]);
        expected.insert("passives", vec!["proxy:27020"]);
        expected.insert("arbiters", vec!["proxy:27021"]);
        expected.insert("primary", "proxy:27018");
        expected.insert("me", "proxy:27019");
        expected
    }

    fn hello_request(streamed: u32) -> InFlightRequest {
        InFlightRequest {
            request_id: 7,
            command: Some(Cow::Borrowed("hello")),
            command_metric: sessionguard_protocol::command_index("hello"),
            started: Instant::now(),
            exhaust_allowed: true,
            awaitable_hello: true,
            streamed_replies: streamed,
            pending: (),
        }
    }

    fn reparse(bytes: &Bytes) -> (Frame, Document) {
        let frame = reopen(bytes.clone()).unwrap();
        let opened = wire::open(&frame, usize::MAX).unwrap();
        let document = match opened.parse(&frame).unwrap() {
            Message::Msg(m) => Document::try_from(m.body).unwrap(),
            Message::Reply(r) => Document::try_from(r.first().unwrap()).unwrap(),
            other => panic!("unexpected {other:?}"),
        };
        (frame, document)
    }

    #[test]
    fn every_address_field_is_rewritten_and_nothing_else() {
        let original = hello();
        let found = rewrite_hello_document(&raw(&original), &map()).unwrap();
        assert!(found.unknown.is_empty());
        assert!(found.replica_set);
        let rewritten = found.document.unwrap().to_document().unwrap();
        assert_eq!(rewritten, expected_hello(&original));
        // Field order is kept (drivers don't care, but it keeps diffs honest).
        let keys: Vec<_> = rewritten.keys().collect();
        let original_keys: Vec<_> = original.keys().collect();
        assert_eq!(keys, original_keys);
    }

    #[test]
    fn host_names_compare_case_insensitively_and_default_port() {
        let map = MemberMap::new([(host("a.internal:27017"), "proxy:1".to_string())]);
        assert_eq!(map.advertised("A.Internal:27017"), Some("proxy:1"));
        assert_eq!(map.advertised("a.internal"), Some("proxy:1"));
        assert_eq!(map.advertised("a.internal:27018"), None);
        let v6 = MemberMap::new([(
            HostPort {
                host: "::1".into(),
                port: 27017,
            },
            "proxy:2".to_string(),
        )]);
        assert_eq!(v6.advertised("[::1]:27017"), Some("proxy:2"));
        assert_eq!(v6.advertised("[::1]"), Some("proxy:2"));
    }

    #[test]
    fn unknown_members_are_reported_and_left_alone() {
        let mut original = hello();
        original.insert("hosts", vec!["a.internal:27017", "stranger:27017"]);
        original.insert("primary", "stranger:27017");
        let found = rewrite_hello_document(&raw(&original), &map()).unwrap();
        assert_eq!(found.unknown, vec!["stranger:27017".to_string()]);
        let rewritten = found.document.unwrap().to_document().unwrap();
        assert_eq!(
            rewritten.get_array("hosts").unwrap(),
            &vec![bson::Bson::from("proxy:27018"), "stranger:27017".into()]
        );
        assert_eq!(rewritten.get_str("primary").unwrap(), "stranger:27017");
    }

    #[test]
    fn standalone_and_mongos_hellos_are_untouched() {
        for original in [
            doc! { "isWritablePrimary": true, "maxWireVersion": 21, "ok": 1.0 },
            doc! { "ismaster": true, "msg": "isdbgrid", "ok": 1.0 },
        ] {
            let found = rewrite_hello_document(&raw(&original), &map()).unwrap();
            assert_eq!(found, HelloRewrite::default());
        }
    }

    #[test]
    fn op_msg_reply_keeps_ids_and_more_to_come_and_drops_checksum() {
        let original = hello();
        let body = raw(&original);
        // moreToCome (bit 1) as in a streamed reply, plus a checksum flag.
        let flags = MsgFlags(MsgFlags::MORE_TO_COME | MsgFlags::CHECKSUM_PRESENT);
        let mut bytes = wire::op_msg::encode(41, 40, flags, body.as_bytes()).to_vec();
        let len = i32::try_from(bytes.len() + 4).unwrap();
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let frame = reopen(Bytes::from(bytes)).unwrap();
        let opened = wire::open(&frame, usize::MAX).unwrap();
        let msg = opened.parse(&frame).unwrap();

        let out = rewrite_hello_reply(frame.view(), &msg, &map()).unwrap();
        let (new_frame, document) = reparse(out.frame.as_ref().unwrap());
        assert_eq!(new_frame.header.request_id, 41);
        assert_eq!(new_frame.header.response_to, 40);
        assert_eq!(new_frame.header.op_code, OpCode::Msg);
        let new_opened = wire::open(&new_frame, usize::MAX).unwrap();
        let Message::Msg(m) = new_opened.parse(&new_frame).unwrap() else {
            panic!("not an OP_MSG");
        };
        assert!(m.flags.more_to_come(), "exhaust stream goes on");
        assert!(!m.flags.checksum_present());
        assert_eq!(document, expected_hello(&original));
    }

    #[test]
    fn legacy_op_reply_keeps_its_fixed_fields() {
        let original = hello();
        let body = raw(&original);
        let bytes = wire::legacy::encode_reply(9, 3, 8, 0, &[body.as_bytes()]);
        let frame = reopen(bytes).unwrap();
        let opened = wire::open(&frame, usize::MAX).unwrap();
        let msg = opened.parse(&frame).unwrap();
        let out = rewrite_hello_reply(frame.view(), &msg, &map()).unwrap();
        let new_bytes = out.frame.unwrap();
        let (new_frame, document) = reparse(&new_bytes);
        assert_eq!(new_frame.header.request_id, 9);
        assert_eq!(new_frame.header.response_to, 3);
        assert_eq!(new_frame.header.op_code, OpCode::Reply);
        assert_eq!(
            usize::try_from(new_frame.header.message_length).unwrap(),
            new_bytes.len()
        );
        let new_opened = wire::open(&new_frame, usize::MAX).unwrap();
        let Message::Reply(r) = new_opened.parse(&new_frame).unwrap() else {
            panic!("not an OP_REPLY");
        };
        assert_eq!(r.response_flags, 8, "AwaitCapable kept");
        assert_eq!(r.number_returned, 1);
        assert_eq!(document, expected_hello(&original));
    }

    #[test]
    fn compressed_reply_is_recompressed_with_the_same_compressor() {
        let original = hello();
        let plain = wire::op_msg::encode(5, 4, MsgFlags::default(), raw(&original).as_bytes());
        for compressor in [Compressor::Snappy, Compressor::Zlib, Compressor::Zstd] {
            let bytes =
                op_compressed::compress(5, 4, OpCode::Msg, compressor, &plain[HEADER_LEN..]);
            let frame = reopen(bytes).unwrap();
            let opened = wire::open(&frame, usize::MAX).unwrap();
            let msg = opened.parse(&frame).unwrap();
            let out = rewrite_hello_reply(frame.view(), &msg, &map()).unwrap();
            let (new_frame, document) = reparse(out.frame.as_ref().unwrap());
            assert_eq!(new_frame.header.op_code, OpCode::Compressed);
            assert_eq!(compressor_of(new_frame.view()), Some(compressor));
            assert_eq!(
                (new_frame.header.request_id, new_frame.header.response_to),
                (5, 4)
            );
            assert_eq!(document, expected_hello(&original));
        }
    }

    #[test]
    fn identity_mapping_forwards_the_original_bytes() {
        let map = MemberMap::new([(host("a.internal:27017"), "a.internal:27017".to_string())]);
        let original =
            doc! { "hosts": ["a.internal:27017"], "me": "a.internal:27017", "setName": "rs0" };
        let found = rewrite_hello_document(&raw(&original), &map).unwrap();
        assert!(found.document.is_none());
        assert!(found.unknown.is_empty());
    }

    /// Records the replies the wrapped inspector saw.
    #[derive(Default)]
    struct Seen(Mutex<Vec<Document>>);

    impl Inspector for Seen {
        type Pending = ();
        type Conn = ();

        fn on_connect(&self, _: &ConnContext) {}

        fn on_request(&self, _: &ConnContext, _: &(), _: FrameRef<'_>, _: &Message<'_>) -> Verdict {
            Verdict::Forward(())
        }

        fn on_reply(
            &self,
            _conn: &ConnContext,
            _state: &(),
            _request: Option<&mut InFlightRequest>,
            _frame: FrameRef<'_>,
            msg: &Message<'_>,
        ) -> ReplyVerdict {
            if let Message::Msg(m) = msg {
                self.0
                    .lock()
                    .unwrap()
                    .push(Document::try_from(m.body).unwrap());
            }
            ReplyVerdict::Forward
        }
    }

    fn ctx() -> ConnContext {
        let addr = "127.0.0.1:1".parse().unwrap();
        ConnContext::detached(1, addr, addr)
    }

    fn msg_frame(document: &Document, flags: MsgFlags) -> Frame {
        reopen(wire::op_msg::encode(11, 7, flags, raw(document).as_bytes())).unwrap()
    }

    #[test]
    fn decorator_rewrites_every_streamed_hello_and_inner_sees_the_original() {
        let seen = Arc::new(Seen::default());
        let inspector = TopologyInspector::new(seen.clone(), map());
        let original = hello();
        for streamed in 0..3 {
            let frame = msg_frame(&original, MsgFlags(MsgFlags::MORE_TO_COME));
            let opened = wire::open(&frame, usize::MAX).unwrap();
            let msg = opened.parse(&frame).unwrap();
            let verdict = inspector.on_reply(
                &ctx(),
                &(),
                Some(&mut hello_request(streamed)),
                frame.view(),
                &msg,
            );
            let ReplyVerdict::Replace(bytes) = verdict else {
                panic!("streamed reply {streamed} not rewritten");
            };
            assert_eq!(reparse(&bytes).1, expected_hello(&original));
        }
        assert_eq!(seen.0.lock().unwrap().len(), 3);
        assert!(seen.0.lock().unwrap().iter().all(|d| d == &original));
    }

    #[test]
    fn decorator_leaves_other_replies_alone() {
        let inspector = TopologyInspector::new(Arc::new(Seen::default()), map());
        // A find reply that happens to contain a "hosts" field is data.
        let reply = doc! { "cursor": { "id": 0_i64, "ns": "a.b", "firstBatch": [] }, "hosts": ["a.internal:27017"], "ok": 1.0 };
        let frame = msg_frame(&reply, MsgFlags::default());
        let opened = wire::open(&frame, usize::MAX).unwrap();
        let msg = opened.parse(&frame).unwrap();
        let mut find = hello_request(0);
        find.command = Some(Cow::Borrowed("find"));
        assert_eq!(
            inspector.on_reply(&ctx(), &(), Some(&mut find), frame.view(), &msg),
            ReplyVerdict::Forward
        );
        // An unmatched reply is rewritten only when it is shaped like a hello.
        assert_eq!(
            inspector.on_reply(&ctx(), &(), None, frame.view(), &msg),
            ReplyVerdict::Forward
        );
        let hello_frame = msg_frame(&hello(), MsgFlags::default());
        let opened = wire::open(&hello_frame, usize::MAX).unwrap();
        let msg = opened.parse(&hello_frame).unwrap();
        assert!(matches!(
            inspector.on_reply(&ctx(), &(), None, hello_frame.view(), &msg),
            ReplyVerdict::Replace(_)
        ));
    }

    #[test]
    fn unknown_member_and_bypass_are_reported_once() {
        let inspector = TopologyInspector::new(Arc::new(Seen::default()), map());
        assert!(inspector.first_report_of_unknown("x:1"));
        assert!(!inspector.first_report_of_unknown("x:1"));
        assert!(inspector.first_report_of_unknown("y:1"));

        let single = TopologyInspector::new(Arc::new(Seen::default()), MemberMap::default());
        let frame = msg_frame(&hello(), MsgFlags::default());
        let opened = wire::open(&frame, usize::MAX).unwrap();
        let msg = opened.parse(&frame).unwrap();
        // Without a map the reply is forwarded unchanged, and the bypass
        // warning is spent on the first one.
        assert_eq!(
            single.on_reply(&ctx(), &(), Some(&mut hello_request(0)), frame.view(), &msg),
            ReplyVerdict::Forward
        );
        assert!(single.warned_bypass.load(Ordering::Relaxed));
    }
}
