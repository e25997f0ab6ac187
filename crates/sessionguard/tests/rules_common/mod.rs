//! Scaffolding for the session-engine integration tests: the emulator, the
//! proxy in front of it with a real `SessionEngine` as its inspector (and,
//! when asked, the refresher), the official Rust driver pointed at the
//! proxy, and a small raw-frame client for the misuses the driver's API makes
//! impossible (it hands out `&mut ClientSession`, so it cannot share one).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use mongodb::options::FindOptions;
use mongodb::Client;
use sessionguard::spawn_refresher;
use sessionguard::EngineInspector;
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RuleId, RulesConfig, SessionConfig, SessionEngine, ViolationRecord};
use sessionguard_protocol::wire::{self, op_msg, Frame, Message, MsgFlags, MsgHeader, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

#[path = "../common/mod.rs"]
mod common;
pub(crate) use common::Stack;
// Re-exported for the test binaries that use them; the others do not.
#[allow(unused_imports)]
pub(crate) use common::{http_get, logs, ThreadLogs};

pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// An emulated server session timeout short enough for a test to sit idle
/// past it (`EmulatorConfig::session_timeout`, and `SessionConfig`'s
/// override, since hello reports whole minutes).
pub(crate) const SERVER_TIMEOUT: Duration = Duration::from_millis(1_500);
/// How long `hold_a_cursor_idle` pauses: over twice `SERVER_TIMEOUT`.
pub(crate) const IDLE: Duration = Duration::from_millis(3_500);

/// Inserts 20 rows into `collection` of database `app`, opens a cursor in
/// batches of 4, reads the first batch, sits idle for `IDLE` (a slow
/// consumer, a user reading a page), then reads the rest; returns how many
/// rows it saw, and shuts `client` down either way.
pub(crate) async fn hold_a_cursor_idle(
    client: Client,
    collection: &str,
) -> mongodb::error::Result<usize> {
    let rows = client.database("app").collection::<Document>(collection);
    let result = async {
        rows.insert_many((0..20).map(|i| doc! { "_id": i }).collect::<Vec<_>>())
            .await?;
        let options = FindOptions::builder()
            .batch_size(4)
            .sort(doc! { "_id": 1 })
            .build();
        let mut cursor = rows.find(doc! {}).with_options(options).await?;
        let mut seen = 0;
        for _ in 0..4 {
            assert!(cursor.advance().await?);
            seen += 1;
        }
        tokio::time::sleep(IDLE).await;
        while cursor.advance().await? {
            seen += 1;
        }
        Ok(seen)
    }
    .await;
    client.shutdown().await;
    result
}

/// The emulator, the proxy with a session engine, and (optionally) the refresher.
pub(crate) struct Guarded {
    pub stack: Stack,
    pub engine: Arc<SessionEngine>,
    refresher: Option<JoinHandle<()>>,
}

impl Guarded {
    pub(crate) async fn start(emulator: EmulatorConfig, sessions: SessionConfig) -> Guarded {
        Guarded::start_with(emulator, sessions, RulesConfig::default(), false).await
    }

    pub(crate) async fn start_with(
        emulator: EmulatorConfig,
        sessions: SessionConfig,
        rules: RulesConfig,
        refresher: bool,
    ) -> Guarded {
        sessions.validate().expect("valid [sessions]");
        rules.validate().expect("valid [rules]");
        let engine = Arc::new(SessionEngine::new(&sessions, &rules));
        let inspector = Arc::new(EngineInspector::new(engine.clone()));
        let stack = Stack::start_with(emulator, inspector.clone()).await;
        let refresher = refresher.then(|| spawn_refresher(&inspector));
        Guarded {
            stack,
            engine,
            refresher,
        }
    }

    /// A driver client through the proxy, with an application name.
    pub(crate) async fn client(&self, app: &str) -> Client {
        self.stack.client_with(&format!("&appName={app}")).await
    }

    pub(crate) fn proxy_addr(&self) -> SocketAddr {
        self.stack.proxy.local_addr()
    }

    pub(crate) fn fired(&self) -> Vec<RuleId> {
        self.engine.violations().iter().map(|v| v.rule).collect()
    }

    pub(crate) fn violations_of(&self, rule: RuleId) -> Vec<Arc<ViolationRecord>> {
        self.engine
            .violations()
            .into_iter()
            .filter(|v| v.rule == rule)
            .collect()
    }

    /// Waits until `rule` has fired (violations may be raised by a reply or a
    /// close that the proxy processes just after the client saw its result).
    pub(crate) async fn wait_for(&self, rule: RuleId) -> Arc<ViolationRecord> {
        let engine = self.engine.clone();
        let fired =
            Stack::eventually(WAIT, || engine.violations().iter().any(|v| v.rule == rule)).await;
        assert!(fired, "{rule} never fired; fired: {:?}", self.fired());
        self.violations_of(rule).remove(0)
    }

    /// Waits until the engine has inspected every request the proxy read
    /// (and at least one), then returns what fired. For a test whose
    /// connections are still open: each reply its clients got was inspected
    /// before it was forwarded.
    pub(crate) async fn settle(&self) -> Vec<RuleId> {
        self.stack.engine_caught_up(&self.engine, false, WAIT).await;
        self.fired()
    }

    /// `settle` once every client connection has closed and the engine has
    /// judged each close (after `Client::shutdown` or closing raw clients).
    pub(crate) async fn settle_closed(&self) -> Vec<RuleId> {
        self.stack.engine_caught_up(&self.engine, true, WAIT).await;
        self.fired()
    }

    pub(crate) async fn stop(self) {
        if let Some(task) = self.refresher {
            task.abort();
        }
        self.stack.stop().await;
    }
}

/// An lsid document `{id: UUID(n...)}`.
pub(crate) fn lsid(n: u8) -> Document {
    let mut bytes = [n; 16];
    // Version 4, variant 1, like a driver would generate.
    bytes[6] = 0x40 | (n & 0x0F);
    bytes[8] = 0x80 | (n & 0x3F);
    doc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: bytes.to_vec() } }
}

/// The lsid document of a driver session (`ClientSession::id()`).
pub(crate) fn session_lsid(session: &mongodb::ClientSession) -> Document {
    session.id().clone()
}

/// The short form sessionguard logs for an lsid document.
pub(crate) fn short_of(lsid: &Document) -> String {
    match lsid.get("id") {
        Some(Bson::Binary(binary)) => binary.bytes[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        _ => panic!("lsid without a binary id"),
    }
}

/// A hand-driven client connection speaking OP_MSG, for misuse the driver
/// cannot express. It sends the same handshake metadata a driver would.
pub(crate) struct RawClient {
    stream: TcpStream,
    next_id: i32,
}

impl RawClient {
    pub(crate) async fn connect(addr: SocketAddr, app: &str) -> RawClient {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let mut client = RawClient { stream, next_id: 1 };
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

    /// Sends a command; returns its request id.
    pub(crate) async fn send(&mut self, body: Document) -> i32 {
        self.send_with_flags(body, 0).await
    }

    pub(crate) async fn send_with_flags(&mut self, body: Document, flags: u32) -> i32 {
        let id = self.next_id;
        self.next_id += 1;
        let frame = op_msg::encode(id, 0, MsgFlags(flags), &bson::to_vec(&body).unwrap());
        self.stream.write_all(&frame).await.expect("write a frame");
        id
    }

    /// Reads one reply and returns its body document.
    pub(crate) async fn read_reply(&mut self) -> Document {
        let mut header = [0u8; HEADER_LEN];
        tokio::time::timeout(WAIT, self.stream.read_exact(&mut header))
            .await
            .expect("a reply in time")
            .expect("read a reply header");
        let parsed = MsgHeader::parse(&header).unwrap();
        let len = usize::try_from(parsed.message_length).unwrap();
        let mut bytes = header.to_vec();
        bytes.resize(len, 0);
        self.stream
            .read_exact(&mut bytes[HEADER_LEN..])
            .await
            .expect("read a reply body");
        let frame = Frame {
            header: parsed,
            bytes: bytes.into(),
        };
        let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE).unwrap();
        match opened.parse(&frame).unwrap() {
            Message::Msg(msg) => Document::try_from(msg.body).unwrap(),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    pub(crate) async fn command(&mut self, body: Document) -> Document {
        self.send(body).await;
        self.read_reply().await
    }

    pub(crate) async fn close(self) {
        let mut stream = self.stream;
        let _ = stream.shutdown().await;
    }
}

/// `{find: coll, filter: {}, lsid, $db}` with an optional batch size.
pub(crate) fn find_cmd(db: &str, coll: &str, lsid: &Document, batch_size: Option<i32>) -> Document {
    let mut cmd = doc! { "find": coll, "filter": {}, "lsid": lsid.clone() };
    if let Some(size) = batch_size {
        cmd.insert("batchSize", size);
    }
    cmd.insert("$db", db);
    cmd
}

/// A retryable insert: `{insert, documents, lsid, txnNumber, $db}`.
pub(crate) fn insert_cmd(
    db: &str,
    coll: &str,
    docs: Vec<Document>,
    lsid: &Document,
    txn_number: i64,
) -> Document {
    doc! { "insert": coll, "documents": docs, "lsid": lsid.clone(), "txnNumber": txn_number, "$db": db }
}

/// The same inside a transaction.
pub(crate) fn txn_insert_cmd(
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

pub(crate) fn txn_end_cmd(name: &str, lsid: &Document, txn: i64) -> Document {
    let mut cmd = Document::new();
    cmd.insert(name, 1);
    cmd.insert("lsid", lsid.clone());
    cmd.insert("txnNumber", txn);
    cmd.insert("autocommit", false);
    cmd.insert("$db", "admin");
    cmd
}

/// Emulator config with every reply delayed, so overlaps are certain.
pub(crate) fn slow_emulator(latency: Duration) -> EmulatorConfig {
    EmulatorConfig {
        reply_latency: latency,
        ..EmulatorConfig::default()
    }
}

/// Emulator config with only the named commands delayed.
pub(crate) fn emulator_with_latency(commands: &[(&str, Duration)]) -> EmulatorConfig {
    EmulatorConfig {
        command_latency: commands
            .iter()
            .map(|(name, d)| (name.to_string(), *d))
            .collect(),
        ..EmulatorConfig::default()
    }
}
