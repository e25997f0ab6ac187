//! `sessionguard demo`: starts the built-in emulator, the proxy in front of
//! it, and runs a short scripted workload with the official Rust driver
//! through the proxy, printing each step. It needs no MongoDB anywhere and
//! binds only ephemeral loopback ports. It owns nothing the proxy or the
//! emulator do not already provide: it is a consumer of their public APIs,
//! exactly as an application would be.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bson::{doc, Document};
use mongodb::options::FindOptions;
use mongodb::Client;

use crate::config::ProxyConfig;
use crate::emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use crate::proxy::{NoopInspector, Proxy, ProxyHandle};

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// The emulator and the proxy in front of it, both on ephemeral loopback ports.
pub struct DemoStack {
    pub emulator: EmulatorHandle,
    pub proxy: ProxyHandle,
}

impl DemoStack {
    /// Starts the emulator (a replica-set primary, so transactions work) and
    /// the proxy pointed at it.
    pub async fn start() -> Result<DemoStack, DemoError> {
        let loopback: SocketAddr = "127.0.0.1:0".parse()?;
        let emulator = Emulator::start(loopback, EmulatorConfig::default()).await?;
        let config = ProxyConfig {
            listen: "127.0.0.1:0".to_string(),
            upstream: format!("mongodb://{}", emulator.addr()),
            ..ProxyConfig::default()
        };
        let proxy = Proxy::start(Arc::new(config), Arc::new(NoopInspector)).await?;
        Ok(DemoStack { emulator, proxy })
    }

    /// The connection string an application would use to reach the proxy.
    pub fn client_uri(&self) -> String {
        format!(
            "mongodb://{}/?directConnection=true&appName=sessionguard-demo",
            self.proxy.local_addr()
        )
    }
}

/// Runs the demo to completion.
pub async fn run() -> Result<(), DemoError> {
    let stack = DemoStack::start().await?;
    println!("sessionguard demo");
    println!("  emulator (upstream) : {}", stack.emulator.addr());
    println!("  proxy               : {}", stack.proxy.local_addr());
    println!("  connection string   : {}", stack.client_uri());
    println!();

    let started = Instant::now();
    let client = Client::with_uri_str(stack.client_uri()).await?;
    run_workload(&client).await?;
    client.shutdown().await;

    println!();
    println!(
        "done in {} ms: every command above travelled through the proxy; the emulator saw {} endSessions at client shutdown.",
        started.elapsed().as_millis(),
        stack.emulator.command_count("endSessions")
    );
    stack.proxy.drain();
    stack.proxy.wait().await;
    stack.emulator.shutdown().await;
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

/// `sessionguard demo-app PATTERN [EXIT_CODE]`: a tiny application for trying
/// `sessionguard exec` (and the child process of its tests). It connects to
/// `MONGODB_URI` with the official Rust driver and runs one pattern:
/// - `good`: an explicit session for an insert and a find, then a committed
///   transaction; nothing to report;
/// - `use-after-end`: ends a session with `endSessions` and keeps using it
///   (a serverless handler reusing a closed client's session);
/// - `abandon`: exits with `exit_code` 500 ms after sending an insert (a
///   process that quits without awaiting its work). It abandons the insert
///   only when replies take longer than that, e.g. `sessionguard emulator
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
        "use-after-end" => {
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
        }
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
