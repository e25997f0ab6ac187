//! `sessionguard-dev demo`: starts the emulator, the proxy in front of
//! it with the session engine and the admin API, runs a short correct
//! workload with the official Rust driver through the proxy (nothing to
//! report), then three bugs of the reference articles (a "global" session
//! shared by concurrent requests, a session used after it was ended, a
//! client closed with an insert in flight) and prints each finding with what
//! happened, what the rule means, the evidence with the session's timeline
//! and the fix, then the admin URLs worth opening. It needs no MongoDB
//! anywhere, binds only ephemeral loopback ports and prints no document
//! contents. It owns nothing the proxy, the engine or the emulator do not
//! already provide: it is a consumer of their public APIs, exactly as an
//! application (and an operator) would be. `demo-app` is the same bugs as a
//! separate program, for trying `exec`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use futures_util::StreamExt;
use mongodb::options::FindOptions;
use mongodb::{Client, Database};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use sessionguard::admin::{self, AdminContext, AdminServer};
use sessionguard::config::ProxyConfig;
use sessionguard::metrics::Metrics;
use sessionguard::report::ReportedFinding;
use sessionguard::start_proxy;
use sessionguard::EngineInspector;
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};
use sessionguard_protocol::wire::{self, op_msg, FrameCodec, Message, MsgFlags};
use sessionguard_proxy::ProxyHandle;

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// How long the bugs' slow operations take at the emulator: long enough
/// that the next request surely overlaps them, short enough for a demo.
const SLOW: Duration = Duration::from_secs(1);
/// How long the demo waits for what it expects to see (a fail point
/// reached, the findings raised): never reached on a working machine.
const DEADLINE: Duration = Duration::from_secs(10);
/// Prose is wrapped to this width (evidence lines are not: they are
/// copied, grepped and compared).
const WIDTH: usize = 92;

/// The emulator, the proxy in front of it with the session engine, and the
/// admin API, all on ephemeral loopback ports.
pub struct DemoStack {
    pub emulator: EmulatorHandle,
    pub proxy: ProxyHandle,
    pub engine: Arc<SessionEngine>,
    pub admin: AdminServer,
    admin_shutdown: CancellationToken,
}

impl DemoStack {
    /// Starts the emulator (a replica-set primary, so transactions work),
    /// the proxy pointed at it with a session engine of default settings,
    /// and the admin API over both.
    pub async fn start() -> Result<DemoStack, DemoError> {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let emulator = Emulator::start(loopback, EmulatorConfig::default()).await?;
        let config = ProxyConfig {
            listen: "127.0.0.1:0".to_string(),
            upstream: format!("mongodb://{}", emulator.addr()),
            ..ProxyConfig::default()
        };
        let engine = Arc::new(SessionEngine::new(
            &SessionConfig::default(),
            &RulesConfig::default(),
        ));
        let metrics = Arc::new(Metrics::new());
        metrics.register_session_engine(engine.clone())?;
        let proxy = start_proxy(
            &config,
            Arc::new(EngineInspector::new(engine.clone())),
            &metrics,
        )
        .await?;
        let admin_shutdown = CancellationToken::new();
        let context = AdminContext {
            metrics,
            engine: Some(engine.clone()),
            token: None,
            probe: None,
            reload: None,
        };
        let admin = admin::serve_with("127.0.0.1:0", context, admin_shutdown.clone()).await?;
        Ok(DemoStack {
            emulator,
            proxy,
            engine,
            admin,
            admin_shutdown,
        })
    }

    /// The connection string an application would use to reach the proxy.
    pub fn client_uri(&self) -> String {
        self.uri_for("sessionguard-demo")
    }

    /// The same for an application named `app` (its handshake's appName).
    pub fn uri_for(&self, app: &str) -> String {
        format!(
            "mongodb://{}/?directConnection=true&appName={app}",
            self.proxy.local_addr()
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin.local_addr)
    }

    /// Waits until every client connection is closed and judged.
    async fn settle(&self) {
        let _ = tokio::time::timeout(DEADLINE, self.proxy.no_connections()).await;
    }

    /// Makes `command` from application `app` take [`SLOW`] at the emulator
    /// (the `failCommand` fail point with `blockConnection`).
    fn slow_down(&self, command: &str, app: &str) -> Result<(), DemoError> {
        let millis = i64::try_from(SLOW.as_millis()).unwrap_or(i64::MAX);
        self.fail_point(doc! {
            "configureFailPoint": "failCommand",
            "mode": "alwaysOn",
            "data": {
                "failCommands": [command],
                "appName": app,
                "blockConnection": true,
                "blockTimeMS": millis,
            },
        })
    }

    fn fail_point(&self, command: Document) -> Result<(), DemoError> {
        let reply = self.emulator.configure_fail_point(&command);
        match reply.get("ok") {
            Some(Bson::Double(ok)) if *ok == 1.0 => Ok(()),
            _ => Err(format!("the emulator refused the fail point: {reply}").into()),
        }
    }

    fn back_to_speed(&self) -> Result<(), DemoError> {
        self.fail_point(doc! { "configureFailPoint": "failCommand", "mode": "off" })
    }

    /// Waits until a slowed-down command has reached the emulator (and so
    /// passed the proxy) since `entered` was read.
    async fn slow_command_arrived(&self, entered: u64) -> Result<(), DemoError> {
        if eventually(|| self.emulator.fail_point_entered() > entered).await {
            Ok(())
        } else {
            Err("the slow command never reached the emulator".into())
        }
    }

    /// Stops the admin API, the proxy and the emulator.
    pub async fn stop(self) {
        self.admin_shutdown.cancel();
        self.proxy.shutdown_now();
        self.proxy.wait().await;
        self.emulator.shutdown().await;
    }
}

/// Polls `condition` until it holds or [`DEADLINE`] passes.
async fn eventually(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Runs the demo. With `keep_running`, the stack keeps serving the admin
/// API (and the proxy) until Ctrl-C; otherwise it stops and returns.
pub async fn run(keep_running: bool) -> Result<(), DemoError> {
    let started = Instant::now();
    let stack = DemoStack::start().await?;
    println!("sessionguard demo");
    println!("  emulator (upstream) : {}", stack.emulator.addr());
    println!("  proxy               : {}", stack.proxy.local_addr());
    println!("  admin API           : {}", stack.admin_url());
    println!("  connection string   : {}", stack.client_uri());

    heading("1. A correct application: the official Rust driver through the proxy");
    let client = Client::with_uri_str(stack.client_uri()).await?;
    run_workload(&client).await?;
    client.shutdown().await;
    stack.settle().await;
    let requests = stack.engine.stats().requests_inspected;
    let found = stack.engine.findings().len();
    if found == 0 {
        println!(
            "  => {requests} requests through sessionguard, no session misuse: nothing to report."
        );
    } else {
        println!("  => {requests} requests through sessionguard, {found} finding(s) (unexpected: see below).");
    }

    heading("2. Three bugs from the reference articles, through the same proxy");
    shared_global_session(&stack).await?;
    session_used_after_end(&stack).await?;
    client_closed_with_insert_in_flight(&stack).await?;
    stack.settle().await;
    // The last close is judged as the proxy sees it; the findings are
    // there by now, the wait only covers a slow machine.
    eventually(|| stack.engine.findings().len() >= found + 3).await;

    let mut findings: Vec<ReportedFinding> = stack
        .engine
        .findings()
        .iter()
        .filter_map(|f| stack.engine.finding(f.fingerprint))
        .map(|detail| ReportedFinding::from(&detail))
        .collect();
    findings.sort_by(|a, b| a.finding.first_seen.cmp(&b.finding.first_seen));
    let violations: u64 = findings.iter().map(|f| f.finding.count).sum();
    heading(&format!(
        "3. What sessionguard found: {} finding{} ({violations} violations)",
        findings.len(),
        if findings.len() == 1 { "" } else { "s" }
    ));
    for (index, finding) in findings.iter().enumerate() {
        print_finding(index + 1, findings.len(), finding);
    }

    heading("4. The admin API: worth opening on a running proxy");
    let url = stack.admin_url();
    let first = findings
        .first()
        .map_or("<id>".to_string(), |f| f.finding.fingerprint.to_string());
    for (path, what) in [
        (
            "/findings".to_string(),
            "every finding, the most recently seen first",
        ),
        (
            format!("/findings/{first}"),
            "one finding with its first and latest examples and their timelines",
        ),
        (
            "/violations".to_string(),
            "the recent violations, a few of every finding kept",
        ),
        (
            "/metrics".to_string(),
            "Prometheus: sessionguard_violations_total{rule=...} counts every violation",
        ),
    ] {
        println!("  {url}{path:<22}  {what}");
    }
    println!();
    if keep_running {
        // The handler is installed before the line that invites Ctrl-C is
        // printed: `ctrl_c()` would install it only when first polled, and
        // a Ctrl-C in between would kill the process instead of stopping it.
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        println!(
            "The proxy and the admin API keep running (connect with {}); Ctrl-C stops them.",
            stack.client_uri()
        );
        interrupt.recv().await;
    } else {
        println!(
            "These stop with the demo (done in {} ms); `sessionguard-dev demo --keep-running` keeps them up until Ctrl-C.",
            started.elapsed().as_millis()
        );
    }
    stack.stop().await;
    Ok(())
}

/// The scripted workload: CRUD, a cursor read over several getMores, and one
/// committed and one aborted transaction on an explicit session.
pub async fn run_workload(client: &Client) -> Result<(), DemoError> {
    let orders = client.database("demo").collection::<Document>("orders");

    let docs: Vec<Document> = (0..25)
        .map(|i| doc! { "_id": i, "item": format!("item-{i}"), "qty": i % 7 })
        .collect();
    let inserted = orders.insert_many(docs).await?;
    step(
        "insert_many",
        format!("{} documents", inserted.inserted_ids.len()),
    );

    let options = FindOptions::builder().batch_size(5).build();
    let mut cursor = orders
        .find(doc! { "qty": { "$gte": 3 } })
        .with_options(options)
        .await?;
    let mut read = 0;
    while cursor.advance().await? {
        read += 1;
    }
    step(
        "find (batchSize 5)",
        format!("{read} documents over several getMores"),
    );

    let updated = orders
        .update_many(doc! { "qty": 0 }, doc! { "$set": { "status": "empty" } })
        .await?;
    step(
        "update_many",
        format!("{} modified", updated.modified_count),
    );

    let deleted = orders.delete_one(doc! { "_id": 24 }).await?;
    step("delete_one", format!("{} deleted", deleted.deleted_count));

    let mut session = client.start_session().await?;
    session.start_transaction().await?;
    orders
        .insert_one(doc! { "_id": 100, "item": "committed" })
        .session(&mut session)
        .await?;
    session.commit_transaction().await?;
    step("transaction", "committed one insert".to_string());

    session.start_transaction().await?;
    orders
        .insert_one(doc! { "_id": 101, "item": "aborted" })
        .session(&mut session)
        .await?;
    session.abort_transaction().await?;
    drop(session);
    let after_abort = orders.count_documents(doc! { "_id": 101 }).await?;
    step(
        "transaction",
        format!("aborted one insert ({after_abort} documents with its _id remain)"),
    );

    let total = orders.count_documents(doc! {}).await?;
    step(
        "count_documents",
        format!("{total} documents in demo.orders"),
    );
    Ok(())
}

fn step(what: &str, outcome: String) {
    println!("  ok  {what:<20} {outcome}");
}

fn heading(text: &str) {
    println!();
    println!("{text}");
}

/// What a bug's application does, in a few indented lines.
fn describe(title: &str, lines: &[&str]) {
    println!("  {title}");
    for line in lines {
        println!("     {line}");
    }
}

/// The article's "BAD: Shared global session": request handlers on four
/// connections all use one session; a find is still running when three
/// inserts arrive on it. Sent as raw OP_MSG frames because the Rust
/// driver's API (`&mut ClientSession`) makes this bug impossible to write;
/// on the wire it is what the Node.js and Python drivers send.
async fn shared_global_session(stack: &DemoStack) -> Result<(), DemoError> {
    describe(
        "a) a \"global\" session shared by concurrent requests",
        &[
            "let globalSession = client.startSession();   // one session for every request handler",
            "4 handlers on 4 connections: a find (slow), and while it runs, 3 inserts, all on it",
            "(raw OP_MSG frames: the Rust driver's `&mut ClientSession` cannot be shared)",
        ],
    );
    let app = "shop-api";
    let global = doc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: rand::random::<[u8; 16]>().to_vec() } };
    let mut handlers = Vec::new();
    for _ in 0..4 {
        handlers.push(RawConnection::connect(stack.proxy.local_addr(), app).await?);
    }
    stack.slow_down("find", app)?;
    let entered = stack.emulator.fail_point_entered();
    let (finder, inserters) = handlers.split_first_mut().ok_or("no handler")?;
    finder
        .send(&doc! { "find": "orders", "filter": {}, "lsid": global.clone(), "$db": "demo" })
        .await?;
    stack.slow_command_arrived(entered).await?;
    for (n, inserter) in (1..).zip(inserters.iter_mut()) {
        inserter
            .send(&doc! {
                "insert": "orders",
                "documents": [{ "_id": 1000 + n, "item": format!("order-{n}") }],
                "lsid": global.clone(),
                "$db": "demo",
            })
            .await?;
        inserter.ok_reply().await?;
    }
    finder.ok_reply().await?;
    stack.back_to_speed()?;
    for handler in handlers {
        handler.close().await;
    }
    println!("     => every request succeeded: neither the driver nor the server objects");
    Ok(())
}

/// A handler keeps a session whose end was already sent (a closed
/// client's pooled session, a serverless invocation's leftover) and writes
/// with it: with the official Rust driver.
async fn session_used_after_end(stack: &DemoStack) -> Result<(), DemoError> {
    describe(
        "b) a session used after it was ended",
        &[
            "a handler keeps its session after endSessions ended it, and inserts with it again",
            "(the official Rust driver)",
        ],
    );
    let client = Client::with_uri_str(stack.uri_for("checkout-lambda")).await?;
    use_after_end(&client.database("demo")).await?;
    client.shutdown().await;
    println!(
        "     => the insert succeeded: the server silently started a new session under that id"
    );
    Ok(())
}

/// The article's "BAD: Per-request connection": the client is closed while
/// its insertMany is still running: with the official Rust driver.
async fn client_closed_with_insert_in_flight(stack: &DemoStack) -> Result<(), DemoError> {
    describe(
        "c) a client closed with an insert in flight",
        &[
            "insertMany(docs) not awaited (slow), then client.close()",
            "(the official Rust driver: the insert is dropped, its connection closed)",
        ],
    );
    let app = "import-job";
    let client = Client::with_uri_str(stack.uri_for(app)).await?;
    let imports = client.database("demo").collection::<Document>("imports");
    stack.slow_down("insert", app)?;
    let entered = stack.emulator.fail_point_entered();
    let docs: Vec<Document> = (0..10).map(|i| doc! { "_id": i, "row": i }).collect();
    let insert = tokio::spawn(async move { imports.insert_many(docs).await.map(|_| ()) });
    stack.slow_command_arrived(entered).await?;
    // What closing a client does to an operation still running: it is
    // abandoned and its connection closed under it.
    let violations = stack.engine.stats().violations;
    insert.abort();
    let _ = insert.await;
    // The driver closes the abandoned connection at once. Shutting the
    // client down before the proxy has judged that close would race its
    // endSessions against the close: on a busy machine the end could
    // arrive first and be a second, accidental finding.
    if !eventually(|| stack.engine.stats().violations > violations).await {
        return Err("the proxy never saw the abandoned insert's connection close".into());
    }
    client.shutdown().immediate(true).await;
    stack.back_to_speed()?;
    println!("     => the application never learns whether the insert happened");
    Ok(())
}

/// One finding, for a terminal: the bug, what happened, what the rule
/// means, the evidence with the session's timeline, and the fix.
fn print_finding(index: usize, of: usize, finding: &ReportedFinding) {
    let f = &finding.finding;
    let rule = f.rule.map_or("overflow", |rule| rule.as_str());
    let severity = f.severity.map_or("", |s| s.as_str());
    let title = format!(
        "── finding {index} of {of}: {rule} ({severity}) · {} ",
        f.fingerprint
    );
    let fill = WIDTH.saturating_sub(title.chars().count());
    println!();
    println!("{title}{}", "─".repeat(fill));
    println!("  {}", finding.title());
    println!("  {}", finding.tally());
    let mut evidence = finding.evidence_lines().into_iter();
    if let Some(message) = evidence.next() {
        paragraph("what happened", &message);
    }
    if let Some(rule) = f.rule {
        paragraph("what the rule means", rule.explain());
    }
    println!("  evidence");
    for line in evidence {
        println!("    {line}");
    }
    let timeline = finding.timeline_lines();
    if !timeline.is_empty() {
        println!("    timeline of the session up to the violation:");
        for line in timeline {
            println!("      {line}");
        }
    }
    if let Some(rule) = f.rule {
        paragraph("fix", rule.fix());
    }
}

/// A label, then `text` wrapped to [`WIDTH`] under it.
fn paragraph(label: &str, text: &str) {
    println!("  {label}");
    for line in wrap(text, WIDTH - 4) {
        println!("    {line}");
    }
}

/// Splits `text` into lines of at most `width` characters at spaces (a
/// longer word stays whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// A client connection speaking raw OP_MSG, for the bug the Rust driver's
/// API cannot express. It greets like a driver (`hello` with client
/// metadata: driver `sessionguard-demo`, the given application name).
struct RawConnection {
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
    next_request_id: i32,
}

impl RawConnection {
    async fn connect(addr: SocketAddr, app: &str) -> Result<RawConnection, DemoError> {
        let (read, writer) = TcpStream::connect(addr).await?.into_split();
        let mut connection = RawConnection {
            reader: FramedRead::new(read, FrameCodec::default()),
            writer,
            next_request_id: 1,
        };
        connection
            .send(&doc! {
                "hello": 1,
                "client": {
                    "driver": { "name": "sessionguard-demo", "version": env!("CARGO_PKG_VERSION") },
                    "application": { "name": app },
                    "os": { "type": std::env::consts::OS },
                },
                "$db": "admin",
            })
            .await?;
        connection.ok_reply().await?;
        Ok(connection)
    }

    async fn send(&mut self, body: &Document) -> Result<(), DemoError> {
        let frame = op_msg::encode(self.next_request_id, 0, MsgFlags(0), &bson::to_vec(body)?);
        self.next_request_id += 1;
        self.writer.write_all(&frame).await?;
        Ok(())
    }

    /// Reads the next reply and checks it says `ok: 1`.
    async fn ok_reply(&mut self) -> Result<(), DemoError> {
        let frame = self
            .reader
            .next()
            .await
            .ok_or("the proxy closed the connection")??;
        let opened = wire::open(&frame, wire::DEFAULT_MAX_MESSAGE_SIZE)?;
        let Message::Msg(msg) = opened.parse(&frame)? else {
            return Err("the reply is not OP_MSG".into());
        };
        match msg.body.get("ok")? {
            Some(
                bson::RawBsonRef::Double(1.0)
                | bson::RawBsonRef::Int32(1)
                | bson::RawBsonRef::Int64(1),
            ) => Ok(()),
            _ => Err(format!("request refused: {:?}", msg.body.get_str("errmsg").ok()).into()),
        }
    }

    async fn close(mut self) {
        let _ = self.writer.shutdown().await;
    }
}

/// Ends a session with `endSessions` and keeps using it: an insert into
/// `orders` with the session, the end, then another insert with it.
async fn use_after_end(db: &Database) -> Result<(), DemoError> {
    let client = db.client();
    let orders = db.collection::<Document>("orders");
    let mut session = client.start_session().await?;
    orders
        .insert_one(doc! { "item": "book" })
        .session(&mut session)
        .await?;
    let lsid = session.id().clone();
    db.run_command(doc! { "endSessions": [lsid] }).await?;
    // The server accepts this as a brand-new session: nothing but
    // sessionguard notices.
    orders
        .insert_one(doc! { "item": "ghost" })
        .session(&mut session)
        .await?;
    Ok(())
}

/// `sessionguard-dev demo-app PATTERN [EXIT_CODE]`: a tiny application for trying
/// `sessionguard exec` (and the child process of its tests). It connects to
/// `MONGODB_URI` with the official Rust driver and runs one pattern:
/// - `good`: an explicit session for an insert and a find, then a committed
///   transaction; nothing to report;
/// - `use-after-end`: ends a session with `endSessions` and keeps using it
///   (a serverless handler reusing a closed client's session);
/// - `abandon`: exits with `exit_code` 500 ms after sending an insert (a
///   process that quits without awaiting its work). It abandons the insert
///   only when replies take longer than that, e.g. `sessionguard-dev emulator
///   --latency 1s`; against a fast server the insert has already completed.
///
/// It writes to the URI's database (default `test`) and prints the database
/// name, never a document.
pub async fn run_app(pattern: &str, exit_code: u8) -> Result<(), DemoError> {
    let uri = std::env::var("MONGODB_URI").map_err(|_| "MONGODB_URI is not set")?;
    let client = Client::with_uri_str(&uri).await?;
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("test"));
    println!("demo-app: pattern {pattern} on database {}", db.name());
    let orders = db.collection::<Document>("orders");

    match pattern {
        "good" => {
            let mut session = client.start_session().await?;
            orders
                .insert_one(doc! { "item": "book" })
                .session(&mut session)
                .await?;
            let mut cursor = orders.find(doc! {}).session(&mut session).await?;
            while cursor.advance(&mut session).await? {}
            drop(cursor);
            session.start_transaction().await?;
            orders
                .insert_one(doc! { "item": "pen" })
                .session(&mut session)
                .await?;
            session.commit_transaction().await?;
        }
        "use-after-end" => use_after_end(&db).await?,
        "abandon" => {
            // Opens a pooled connection so the insert below is sent at once.
            db.run_command(doc! { "ping": 1 }).await?;
            let pending = orders.clone();
            tokio::spawn(async move {
                let _ = pending.insert_one(doc! { "item": "never-awaited" }).await;
            });
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            // Exit without waiting: the insert's connection closes mid-request.
            std::process::exit(i32::from(exit_code));
        }
        other => return Err(format!("unknown pattern `{other}`").into()),
    }
    client.shutdown().await;
    Ok(())
}
