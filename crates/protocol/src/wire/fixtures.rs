//! Messages shaped like the ones real drivers send, shared by the wire tests.

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Document};

use super::op_msg::{self, MsgFlags};
use super::{legacy, op_compressed, Compressor, OpCode};

pub(crate) fn to_bytes(document: &Document) -> Vec<u8> {
    bson::to_vec(document).expect("test document serializes")
}

/// The lsid a driver attaches: `{id: UUID}` (binary subtype 4).
pub(crate) fn lsid() -> Document {
    doc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: (1u8..=16).collect() } }
}

/// The body of a retryable insert as the Rust and Node drivers send it; the
/// documents travel in a separate kind-1 "documents" section.
pub(crate) fn insert_body() -> Vec<u8> {
    to_bytes(&doc! {
        "insert": "c",
        "ordered": true,
        "$db": "test",
        "lsid": lsid(),
        "txnNumber": 1i64,
        "$clusterTime": { "clusterTime": bson::Timestamp { time: 1, increment: 1 } },
    })
}

pub(crate) fn insert_documents() -> Vec<Vec<u8>> {
    vec![
        to_bytes(&doc! { "_id": 1, "name": "a" }),
        to_bytes(&doc! { "_id": 2, "name": "bb", "nested": { "x": [1, 2, 3] } }),
    ]
}

pub(crate) fn insert_msg(request_id: i32) -> Vec<u8> {
    let documents = insert_documents();
    let refs: Vec<&[u8]> = documents.iter().map(Vec::as_slice).collect();
    op_msg::encode_with_sequences(
        request_id,
        0,
        MsgFlags::default(),
        &insert_body(),
        &[("documents", &refs)],
    )
    .to_vec()
}

/// Appends a CRC-32C (computed over everything so far) to an encoded OP_MSG
/// frame and sets checksumPresent, fixing up the header length.
pub(crate) fn with_checksum(frame: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let flags = u32::from_le_bytes(out[16..20].try_into().unwrap()) | MsgFlags::CHECKSUM_PRESENT;
    out[16..20].copy_from_slice(&flags.to_le_bytes());
    let len = i32::try_from(out.len() + 4).unwrap();
    out[..4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// One frame of every kind the codec understands, plus an opcode it does not.
pub(crate) fn sample_frames() -> Vec<Vec<u8>> {
    let mut frames = vec![
        insert_msg(7),
        with_checksum(&insert_msg(8)),
        op_msg::encode(
            9,
            7,
            MsgFlags(MsgFlags::MORE_TO_COME),
            &to_bytes(&doc! { "ok": 1.0 }),
        )
        .to_vec(),
        legacy::encode_query(
            10,
            0,
            "admin.$cmd",
            0,
            -1,
            &to_bytes(&doc! { "isMaster": 1, "helloOk": true }),
        )
        .to_vec(),
        legacy::encode_reply(
            11,
            10,
            8,
            0,
            &[&to_bytes(&doc! { "ismaster": true, "ok": 1.0 })],
        )
        .to_vec(),
        super::Frame::build(12, 0, OpCode::Unknown(4242), b"opaque")
            .bytes
            .to_vec(),
    ];
    let body = insert_msg(0)[16..].to_vec();
    for (offset, compressor) in [
        Compressor::Noop,
        Compressor::Snappy,
        Compressor::Zlib,
        Compressor::Zstd,
    ]
    .into_iter()
    .enumerate()
    {
        let request_id = 20 + i32::try_from(offset).unwrap();
        frames
            .push(op_compressed::compress(request_id, 0, OpCode::Msg, compressor, &body).to_vec());
    }
    frames
}
