//! A raw wire-protocol client, for what a driver would never send (misuse
//! its API makes impossible, hostile or legacy frames), the first frame of a
//! fresh connection, and the command documents the rule tests send. It
//! speaks OP_MSG and reads OP_MSG or OP_REPLY; it must not hide a reply or
//! a close from the test (each is returned, or the call panics at `WAIT`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bson::{doc, Document};
use bytes::Bytes;
use futures_util::StreamExt;
use sessionguard_protocol::wire::{self, op_msg, Frame, FrameCodec, Message, MsgFlags, OpCode};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

use crate::wait::WAIT;

/// One reply frame, decoded.
#[derive(Debug)]
pub struct RawReply {
    pub request_id: i32,
    pub response_to: i32,
    /// OP_MSG flags (none for an OP_REPLY).
    pub flags: MsgFlags,
    pub op_code: OpCode,
    /// The body (OP_MSG) or first document (OP_REPLY).
    pub doc: Document,
}

/// A reply frame as a `RawReply`; panics on anything but OP_MSG / OP_REPLY.
pub fn decode_reply(frame: &Frame) -> RawReply {
    let opened = wire::open(frame, wire::DEFAULT_MAX_MESSAGE_SIZE).expect("open");
    let message = opened.parse(frame).expect("parse");
    let (flags, doc) = match message {
        Message::Msg(m) => (m.flags, Document::try_from(m.body).unwrap()),
        Message::Reply(r) => (
            MsgFlags(0),
            Document::try_from(r.first().expect("a document")).unwrap(),
        ),
        other => panic!("unexpected reply {other:?}"),
    };
    RawReply {
        request_id: frame.header.request_id,
        response_to: frame.header.response_to,
        flags,
        op_code: frame.header.op_code,
        doc,
    }
}

/// A bare client connection speaking OP_MSG. Request ids count from 1.
pub struct RawClient {
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
    local: SocketAddr,
    next_id: i32,
}

impl RawClient {
    /// Connects without a handshake.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let local = stream.local_addr().unwrap();
        let (read, writer) = stream.into_split();
        RawClient {
            reader: FramedRead::new(read, FrameCodec::default()),
            writer,
            local,
            next_id: 0,
        }
    }

    /// Connects and sends the handshake metadata a driver would (`hello`
    /// with a driver and an application name), checking it succeeded.
    pub async fn hello(addr: SocketAddr, app: &str) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        let hello = doc! {
            "hello": 1,
            "client": {
                "driver": { "name": "raw-test-client", "version": "1.0" },
                "application": { "name": app },
                "os": { "type": "linux" },
            },
            "$db": "admin",
        };
        let reply = client.command(hello).await;
        assert_eq!(reply.get_f64("ok").ok(), Some(1.0), "{reply}");
        client
    }

    /// This side's address (what the proxy logs as the peer).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The next request id and `body` as an OP_MSG frame, not sent.
    pub fn encode(&mut self, flags: u32, body: &Document) -> (i32, Bytes) {
        self.next_id += 1;
        let bytes = op_msg::encode(
            self.next_id,
            0,
            MsgFlags(flags),
            &bson::to_vec(body).unwrap(),
        );
        (self.next_id, bytes)
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// Sends `body` as an OP_MSG with `flags`; returns its request id.
    pub async fn send(&mut self, flags: u32, body: &Document) -> i32 {
        let (id, bytes) = self.encode(flags, body);
        self.send_bytes(&bytes).await;
        id
    }

    /// The next frame within `wait`; `None` on a close or at the deadline.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<RawReply> {
        let frame = tokio::time::timeout(wait, self.reader.next())
            .await
            .ok()??
            .ok()?;
        Some(decode_reply(&frame))
    }

    /// The next frame; `None` when the peer closed the connection. Panics
    /// when neither comes within `WAIT`.
    pub async fn recv(&mut self) -> Option<RawReply> {
        let frame = tokio::time::timeout(WAIT, self.reader.next())
            .await
            .expect("a frame or a close within the timeout")?
            .ok()?;
        Some(decode_reply(&frame))
    }

    /// The next frame, which must come.
    pub async fn reply(&mut self) -> RawReply {
        self.recv().await.expect("a reply")
    }

    /// The next reply's document.
    pub async fn read_reply(&mut self) -> Document {
        self.reply().await.doc
    }

    /// Sends `body` and returns the reply to it.
    pub async fn command(&mut self, body: Document) -> Document {
        let id = self.send(0, &body).await;
        let reply = self.reply().await;
        assert_eq!(reply.response_to, id, "the reply answers the request");
        reply.doc
    }

    /// Asserts the connection gets closed (EOF or reset) within `within`.
    pub async fn expect_closed(&mut self, within: Duration) {
        let started = Instant::now();
        match tokio::time::timeout(within, self.reader.next()).await {
            Err(_) => panic!("connection still open after {within:?}"),
            Ok(None) | Ok(Some(Err(_))) => {}
            Ok(Some(Ok(frame))) => panic!(
                "expected a close after {:?}, got a frame {:?}",
                started.elapsed(),
                frame.header
            ),
        }
    }

    /// Whether the peer closes this connection (without sending anything)
    /// within `wait`; panics on a frame.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        match tokio::time::timeout(wait, self.reader.next()).await {
            Ok(None) | Ok(Some(Err(_))) => true,
            Ok(Some(Ok(frame))) => panic!("expected a close, got a frame {:?}", frame.header),
            Err(_) => false,
        }
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(next) = tokio::time::timeout(quiet, self.reader.next()).await {
            panic!("expected silence, got {next:?}");
        }
    }

    /// Closes the write side (the peer reads EOF) and drops the connection.
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
    }
}

/// Whether a reply document says `ok: 1`.
pub fn ok(doc: &Document) -> bool {
    matches!(doc.get("ok"), Some(bson::Bson::Double(v)) if *v == 1.0)
        || matches!(doc.get("ok"), Some(bson::Bson::Int32(1)))
}

/// `{find: coll, filter: {}, lsid, $db}` with an optional batch size.
pub fn find_cmd(db: &str, coll: &str, lsid: &Document, batch_size: Option<i32>) -> Document {
    let mut cmd = doc! { "find": coll, "filter": {}, "lsid": lsid.clone() };
    if let Some(size) = batch_size {
        cmd.insert("batchSize", size);
    }
    cmd.insert("$db", db);
    cmd
}

/// A retryable insert: `{insert, documents, lsid, txnNumber, $db}`.
pub fn insert_cmd(
    db: &str,
    coll: &str,
    docs: Vec<Document>,
    lsid: &Document,
    txn_number: i64,
) -> Document {
    doc! { "insert": coll, "documents": docs, "lsid": lsid.clone(), "txnNumber": txn_number, "$db": db }
}

/// The same inside a transaction.
pub fn txn_insert_cmd(
    db: &str,
    coll: &str,
    docs: Vec<Document>,
    lsid: &Document,
    txn: i64,
    start: bool,
) -> Document {
    let mut cmd =
        doc! { "insert": coll, "documents": docs, "lsid": lsid.clone(), "txnNumber": txn };
    if start {
        cmd.insert("startTransaction", true);
    }
    cmd.insert("autocommit", false);
    cmd.insert("$db", db);
    cmd
}

pub fn txn_end_cmd(name: &str, lsid: &Document, txn: i64) -> Document {
    let mut cmd = Document::new();
    cmd.insert(name, 1);
    cmd.insert("lsid", lsid.clone());
    cmd.insert("txnNumber", txn);
    cmd.insert("autocommit", false);
    cmd.insert("$db", "admin");
    cmd
}

// ------------------------------------------------------------ handshakes

/// What a fresh plain connection got for its first frame: the reply (if
/// any) and whether the peer then closed the connection.
#[derive(Debug)]
pub struct HandshakeOutcome {
    /// The opcode of the reply (OP_MSG for a hello, OP_REPLY for a legacy
    /// OP_QUERY isMaster), its `responseTo` and its body.
    pub reply: Option<(OpCode, i32, Document)>,
    pub closed: bool,
}

/// Connects to `addr` and sends one handshake as a driver's first frame: a
/// `hello` as OP_MSG, or (`legacy`) an `isMaster` as OP_QUERY on
/// `admin.$cmd`, request id 7. Reads one reply, then waits (bounded) for
/// the peer to close.
pub async fn handshake_once(addr: SocketAddr, legacy: bool) -> HandshakeOutcome {
    use sessionguard_protocol::wire::legacy as wire_legacy;

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let frame = if legacy {
        let query = bson::to_vec(&bson::doc! { "isMaster": 1, "helloOk": true }).unwrap();
        wire_legacy::encode_query(7, 0, "admin.$cmd", 0, -1, &query)
    } else {
        let body = bson::to_vec(&bson::doc! { "hello": 1, "$db": "admin" }).unwrap();
        op_msg::encode(7, 0, MsgFlags(0), &body)
    };
    stream.write_all(&frame).await.expect("write the handshake");
    let mut reader = tokio_util::codec::FramedRead::new(stream, wire::FrameCodec::default());
    let reply = match tokio::time::timeout(WAIT, reader.next()).await {
        Err(_) => panic!("neither a reply nor a close within {WAIT:?}"),
        Ok(None) | Ok(Some(Err(_))) => {
            return HandshakeOutcome {
                reply: None,
                closed: true,
            }
        }
        Ok(Some(Ok(frame))) => {
            let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
            let body = match opened.parse(&frame).unwrap() {
                Message::Msg(msg) => bson::Document::try_from(msg.body).unwrap(),
                Message::Reply(reply) => {
                    bson::Document::try_from(reply.first().expect("a document")).unwrap()
                }
                other => panic!("unexpected reply {other:?}"),
            };
            (frame.header.op_code, frame.header.response_to, body)
        }
    };
    let closed = matches!(
        tokio::time::timeout(WAIT, reader.next()).await,
        Ok(None) | Ok(Some(Err(_)))
    );
    HandshakeOutcome {
        reply: Some(reply),
        closed,
    }
}
