//! Emulator settings and driver scenarios several suites share: a slow
//! upstream, a short server session timeout, a cursor held idle past it.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::options::FindOptions;
use mongodb::Client;
use sessionguard_emulator::EmulatorConfig;

/// An emulated server session timeout short enough for a test to sit idle
/// past it (`EmulatorConfig::session_timeout`, and `SessionConfig`'s
/// override, since hello reports whole minutes).
pub const SERVER_TIMEOUT: Duration = Duration::from_millis(1_500);
/// How long `hold_a_cursor_idle` pauses: over twice `SERVER_TIMEOUT`.
pub const IDLE: Duration = Duration::from_millis(3_500);

/// Inserts 20 rows into `collection` of database `app`, opens a cursor in
/// batches of 4, reads the first batch, sits idle for `IDLE` (a slow
/// consumer, a user reading a page), then reads the rest; returns how many
/// rows it saw, and shuts `client` down either way.
pub async fn hold_a_cursor_idle(client: Client, collection: &str) -> mongodb::error::Result<usize> {
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

/// Emulator config with every reply delayed, so overlaps are certain.
pub fn slow_emulator(latency: Duration) -> EmulatorConfig {
    EmulatorConfig {
        reply_latency: latency,
        ..EmulatorConfig::default()
    }
}

/// Emulator config with only the named commands delayed.
pub fn emulator_with_latency(commands: &[(&str, Duration)]) -> EmulatorConfig {
    EmulatorConfig {
        command_latency: commands
            .iter()
            .map(|(name, d)| (name.to_string(), *d))
            .collect(),
        ..EmulatorConfig::default()
    }
}
