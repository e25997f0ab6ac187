//! A tiny application for trying `sessionguard exec` (and the child process
//! of its integration tests): it connects with the official Rust driver to
//! the connection string in `MONGODB_URI` and runs one pattern, good or bad.
//!
//! ```text
//! sessionguard exec --upstream mongodb://127.0.0.1:27017/shop -- \
//!     cargo run --example misuse -- use-after-end
//! ```
//!
//! Patterns:
//! - `good`: an explicit session for an insert and a find, then a
//!   transaction committed; nothing to report.
//! - `use-after-end`: ends a session with `endSessions` and keeps using it
//!   (what a serverless handler reusing a closed client's session does).
//! - `abandon`: exits while an insert is still waiting for its reply (a
//!   process that quits without awaiting its work).
//!
//! An optional second argument is the exit code to end with, so a failing
//! test suite can be imitated. It writes to the URI's database (default
//! `test`) and prints the database name; never any document.

use std::time::Duration;

use mongodb::bson::doc;
use mongodb::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pattern = args.next().unwrap_or_else(|| "good".to_string());
    let exit_code: i32 = match args.next() {
        Some(code) => code.parse()?,
        None => 0,
    };
    let uri = std::env::var("MONGODB_URI").map_err(|_| "MONGODB_URI is not set")?;
    let client = Client::with_uri_str(&uri).await?;
    let db = client
        .default_database()
        .unwrap_or_else(|| client.database("test"));
    println!("misuse: pattern {pattern} on database {}", db.name());
    let orders = db.collection::<mongodb::bson::Document>("orders");

    match pattern.as_str() {
        "good" => {
            let mut session = client.start_session().await?;
            orders
                .insert_one(doc! { "item": "book" })
                .session(&mut session)
                .await?;
            let mut cursor = orders.find(doc! {}).session(&mut session).await?;
            while cursor.advance(&mut session).await? {}
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
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Exit without waiting: the insert's connection closes mid-request.
            std::process::exit(exit_code);
        }
        other => return Err(format!("unknown pattern `{other}`").into()),
    }
    client.shutdown().await;
    std::process::exit(exit_code);
}
