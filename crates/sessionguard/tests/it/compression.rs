//! Compression through the proxy: the official Rust driver negotiates
//! snappy, zlib or zstd (`compressors=` in the URI) with the emulator through
//! the proxy, runs CRUD, and commits a session misuse (a session used after
//! `killSessions`) that the session engine can only detect by reading the
//! commands inside OP_COMPRESSED. The emulator's recorded frames prove the
//! traffic really was compressed with the expected compressor.

use sessionguard_test_support as common;

use bson::{doc, Document};
use common::{session_lsid, short_of, Guarded};
use sessionguard_emulator::EmulatorConfig;
use sessionguard_engine::{RuleId, SessionConfig};

/// OP_COMPRESSED opcode and its compressorId offset (header 16 bytes,
/// originalOpcode 4, uncompressedSize 4).
const OP_COMPRESSED: i32 = 2012;
const COMPRESSOR_ID_OFFSET: usize = 24;

async fn run_with(compressor: &str, compressor_id: u8) {
    let g = Guarded::start(
        EmulatorConfig {
            record_frames: true,
            ..EmulatorConfig::default()
        },
        SessionConfig::default(),
    )
    .await;
    let client = g
        .stack
        .client_with(&format!(
            "&compressors={compressor}&appName=zip-{compressor}"
        ))
        .await;
    let items = client.database("app").collection::<Document>("items");

    items
        .insert_many((0..50).map(|i| doc! { "_id": i, "text": "x".repeat(200) }))
        .await
        .expect("insert");
    let updated = items
        .update_many(
            doc! { "_id": { "$lt": 10 } },
            doc! { "$set": { "small": true } },
        )
        .await
        .expect("update");
    assert_eq!(updated.modified_count, 10, "{compressor}");
    let count = items.count_documents(doc! { "small": true }).await.unwrap();
    assert_eq!(count, 10, "{compressor}");
    let deleted = items
        .delete_many(doc! { "_id": { "$gte": 40 } })
        .await
        .unwrap();
    assert_eq!(deleted.deleted_count, 10, "{compressor}");

    // The misuse: a session killed and then used again.
    let mut session = client.start_session().await.unwrap();
    items
        .find_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    let id = session_lsid(&session);
    client
        .database("admin")
        .run_command(doc! { "killSessions": [id.clone()] })
        .await
        .unwrap();
    let found = items
        .find_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();
    assert!(found.is_some());

    let violation = g.wait_for(RuleId::UseAfterEnd).await;
    assert_eq!(violation.lsid_short, short_of(&id), "{compressor}");
    let current = violation.current.as_ref().unwrap();
    assert_eq!(current.command, "find", "{compressor}");
    assert_eq!(
        current.app_name.as_deref(),
        Some(format!("zip-{compressor}").as_str())
    );

    // The commands really travelled compressed, with this compressor.
    let frames = g.stack.emulator.received_frames();
    let compressed: Vec<_> = frames
        .iter()
        .filter(|f| f.len() > COMPRESSOR_ID_OFFSET && f[12..16] == OP_COMPRESSED.to_le_bytes())
        .collect();
    assert!(
        compressed.len() >= 5,
        "{compressor}: only {} compressed frames of {}",
        compressed.len(),
        frames.len()
    );
    assert!(
        compressed
            .iter()
            .all(|f| f[COMPRESSOR_ID_OFFSET] == compressor_id),
        "{compressor}: another compressor was used"
    );

    drop(session);
    client.shutdown().await;
    assert_eq!(
        g.settle_closed().await,
        vec![RuleId::UseAfterEnd],
        "{compressor}"
    );
    g.stop().await;
}

#[tokio::test]
async fn snappy_commands_are_inspected_and_forwarded() {
    run_with("snappy", 1).await;
}

#[tokio::test]
async fn zlib_commands_are_inspected_and_forwarded() {
    run_with("zlib", 2).await;
}

#[tokio::test]
async fn zstd_commands_are_inspected_and_forwarded() {
    run_with("zstd", 3).await;
}
