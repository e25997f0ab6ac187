//! Writes the checked-in seed corpora (`corpus/<target>/seed-*`): real
//! driver-shaped messages for every target, plus hostile ones (decompression
//! bombs, lying lengths, bad checksums). Run from `fuzz/`:
//! `cargo run --example seed_corpus`. Deterministic, so re-running it changes
//! nothing unless the seeds below change.

use std::io::Write;
use std::path::Path;

use bson::{doc, spec::BinarySubtype, Binary, Document};
use sessionguard_protocol::wire::{legacy, op_compressed, op_msg, Compressor, MsgFlags, OpCode};

fn bson(doc: &Document) -> Vec<u8> {
    bson::to_vec(doc).expect("encodable")
}

fn lsid(byte: u8) -> Document {
    doc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![byte; 16] } }
}

/// Command documents drivers send, with the fields the engine reads.
fn commands() -> Vec<Document> {
    vec![
        doc! { "ping": 1, "$db": "admin" },
        doc! { "hello": 1, "helloOk": true, "client": { "application": { "name": "app" },
        "driver": { "name": "nodejs", "version": "6.22" } },
        "saslSupportedMechs": "admin.alice", "$db": "admin" },
        doc! { "insert": "items", "ordered": true, "lsid": lsid(1), "txnNumber": 3_i64,
        "$db": "shop" },
        doc! { "find": "items", "filter": { "a": 1 }, "batchSize": 2, "lsid": lsid(1),
        "txnNumber": 4_i64, "startTransaction": true, "autocommit": false, "$db": "shop" },
        doc! { "getMore": 1234567_i64, "collection": "items", "lsid": lsid(2), "$db": "shop" },
        doc! { "killCursors": "items", "cursors": [1234567_i64, 7_i64], "lsid": lsid(2),
        "$db": "shop" },
        doc! { "commitTransaction": 1, "lsid": lsid(1), "txnNumber": 4_i64,
        "autocommit": false, "$db": "admin" },
        doc! { "endSessions": [lsid(1), lsid(2)], "$db": "admin" },
        doc! { "killAllSessionsByPattern": [{ "lsid": lsid(3) }, { "users": [{ "user": "u",
        "db": "admin" }] }], "$db": "admin" },
        doc! { "update": "items", "updates": [{ "q": {}, "u": { "$set": { "a": 2 } } }],
        "writeConcern": { "w": 0 }, "lsid": lsid(4), "txnNumber": 1_i64, "$db": "shop" },
        doc! { "saslStart": 1, "mechanism": "SCRAM-SHA-256",
        "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"n,,n=alice,r=abc".to_vec() },
        "$db": "admin" },
    ]
}

fn replies() -> Vec<Document> {
    vec![
        doc! { "ok": 1.0, "cursor": { "id": 99_i64, "ns": "shop.items", "firstBatch": [] } },
        doc! { "ok": 0.0, "code": 251, "codeName": "NoSuchTransaction",
        "errorLabels": ["TransientTransactionError"] },
        doc! { "ok": 1.0, "n": 1, "writeErrors": [{ "index": 0, "code": 11000 }],
        "writeConcernError": { "code": 64 } },
    ]
}

fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (n, command) in commands().iter().enumerate() {
        let id = i32::try_from(n).unwrap() + 1;
        out.push(op_msg::encode(id, 0, MsgFlags::default(), &bson(command)).to_vec());
    }
    let docs = [bson(&doc! { "_id": 1 }), bson(&doc! { "_id": 2 })];
    let refs: Vec<&[u8]> = docs.iter().map(Vec::as_slice).collect();
    out.push(
        op_msg::encode_with_sequences(
            40,
            0,
            MsgFlags(MsgFlags::MORE_TO_COME),
            &bson(&doc! { "insert": "items", "$db": "shop", "lsid": lsid(5) }),
            &[("documents", &refs)],
        )
        .to_vec(),
    );
    // checksumPresent with a correct CRC-32C.
    let mut checked = op_msg::encode(
        41,
        0,
        MsgFlags(MsgFlags::CHECKSUM_PRESENT),
        &bson(&commands()[0]),
    )
    .to_vec();
    let length = i32::try_from(checked.len() + 4).unwrap();
    checked[..4].copy_from_slice(&length.to_le_bytes());
    let crc = crc32c(&checked);
    checked.extend_from_slice(&crc.to_le_bytes());
    out.push(checked);
    out.push(
        legacy::encode_query(42, 0, "admin.$cmd", 0, -1, &bson(&doc! { "isMaster": 1 })).to_vec(),
    );
    out.push(legacy::encode_reply(43, 42, 8, 0, &[&bson(&replies()[0])]).to_vec());
    let body = bson(&commands()[2]);
    let mut msg_body = 0u32.to_le_bytes().to_vec();
    msg_body.push(0);
    msg_body.extend_from_slice(&body);
    for compressor in [
        Compressor::Noop,
        Compressor::Snappy,
        Compressor::Zlib,
        Compressor::Zstd,
    ] {
        out.push(op_compressed::compress(44, 0, OpCode::Msg, compressor, &msg_body).to_vec());
    }
    out
}

/// CRC-32C (Castagnoli), bitwise: seeds only, speed does not matter.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn compressed_body(declared: i32, id: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = 2013i32.to_le_bytes().to_vec();
    out.extend_from_slice(&declared.to_le_bytes());
    out.push(id);
    out.extend_from_slice(payload);
    out
}

/// OP_COMPRESSED bodies that expand far past what they declare or past the
/// limit: the fuzzer mutates these into ever new bombs.
fn bombs() -> Vec<Vec<u8>> {
    let zeros = vec![0u8; 4 << 20];
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    zlib.write_all(&zeros).unwrap();
    let zlib = zlib.finish().unwrap();
    let zstd = zstd::bulk::compress(&zeros, 19).unwrap();
    let snappy = snap::raw::Encoder::new()
        .compress_vec(&zeros[..1 << 16])
        .unwrap();
    vec![
        compressed_body(1000, 2, &zlib),
        compressed_body((1 << 20) - 16, 2, &zlib),
        compressed_body(1000, 3, &zstd),
        compressed_body(i32::MAX, 3, &zstd),
        compressed_body(100, 1, &snappy),
        compressed_body(-1, 0, b"noop"),
    ]
}

fn write(target: &str, seeds: &[Vec<u8>]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (n, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{n:03}")), seed).unwrap();
    }
    println!("{target}: {} seeds", seeds.len());
}

fn main() {
    let frames = frames();
    // decode_frames: a chunk-size byte, then one frame or two back to back.
    let mut streams: Vec<Vec<u8>> = frames
        .iter()
        .enumerate()
        .map(|(n, f)| [&[u8::try_from(n % 64).unwrap()][..], f].concat())
        .collect();
    streams.push([&[7u8][..], &frames[0], &frames[2]].concat());
    write("decode_frames", &streams);

    let msgs: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| f.get(12..16) == Some(&2013i32.to_le_bytes()[..]))
        .cloned()
        .collect();
    write("op_msg_sections", &msgs);

    let mut compressed: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| f.get(12..16) == Some(&2012i32.to_le_bytes()[..]))
        .map(|f| f[16..].to_vec())
        .collect();
    compressed.extend(bombs());
    write("op_compressed", &compressed);

    let mut views: Vec<Vec<u8>> = Vec::new();
    for command in commands() {
        views.push([&[1u8][..], &bson(&command)].concat());
    }
    for reply in replies() {
        views.push([&[3u8][..], &bson(&reply)].concat());
    }
    for frame in &frames {
        let mode = if frame.get(12..16) == Some(&2004i32.to_le_bytes()[..]) {
            2u8
        } else {
            0
        };
        views.push([&[mode][..], &frame[16..]].concat());
    }
    write("command_view", &views);
}
