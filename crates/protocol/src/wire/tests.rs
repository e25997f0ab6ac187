//! Tests across the whole codec: frames decoded from a stream, opened and
//! parsed as the proxy does it, and property tests that hostile bytes never
//! panic anything and never produce a frame over the limit.

use std::borrow::Cow;

use bytes::BytesMut;
use proptest::prelude::*;

use super::fixtures::{insert_body, insert_documents, insert_msg, sample_frames, with_checksum};
use super::*;

fn decode_one(bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    frame
}

#[test]
fn uncompressed_frames_open_without_copying() {
    let frame = decode_one(&insert_msg(5));
    let opened = open(&frame, DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    assert_eq!(opened.op_code, OpCode::Msg);
    assert_eq!(opened.compressor, None);
    assert!(matches!(opened.body, Cow::Borrowed(_)));
    assert_eq!(opened.body.as_ptr(), frame.body().as_ptr());
    assert_eq!(opened.header(&frame.header), frame.header);
}

#[test]
fn every_sample_opens_and_parses_to_the_expected_message() {
    let mut seen_compressors = Vec::new();
    for bytes in sample_frames() {
        let frame = decode_one(&bytes);
        let opened = open(&frame, DEFAULT_MAX_MESSAGE_SIZE).unwrap();
        seen_compressors.extend(opened.compressor);
        let message = opened.parse(&frame).unwrap();
        match (opened.op_code, message) {
            (OpCode::Msg, Message::Msg(msg)) => {
                let name = msg.command_name().unwrap();
                assert!(name == "insert" || name == "ok", "{name}");
                if name == "insert" {
                    assert_eq!(msg.body.as_bytes(), &insert_body()[..]);
                    let docs: Vec<&[u8]> = msg.sequences[0].iter().map(|d| d.as_bytes()).collect();
                    let expected = insert_documents();
                    assert_eq!(docs, expected.iter().map(Vec::as_slice).collect::<Vec<_>>());
                }
            }
            (OpCode::Query, Message::Query(query)) => {
                assert_eq!(query.command_name(), Some("isMaster"))
            }
            (OpCode::Reply, Message::Reply(reply)) => assert_eq!(reply.number_returned, 1),
            (OpCode::Unknown(4242), Message::Other(OpCode::Unknown(4242))) => {}
            (op_code, message) => panic!("{op_code:?} parsed as {message:?}"),
        }
    }
    assert_eq!(
        seen_compressors,
        [
            Compressor::Noop,
            Compressor::Snappy,
            Compressor::Zlib,
            Compressor::Zstd
        ]
    );
}

#[test]
fn other_opcodes_are_carried_not_parsed() {
    for op_code in [
        OpCode::Insert,
        OpCode::GetMore,
        OpCode::KillCursors,
        OpCode::Unknown(-3),
    ] {
        assert!(matches!(parse(op_code, &[0; 16], b"\xff"), Ok(Message::Other(o)) if o == op_code));
    }
}

#[test]
fn compressed_message_with_checksum_is_verified_against_the_reconstructed_header() {
    // Request 77's OP_MSG with a checksum computed as if sent uncompressed.
    let plain = with_checksum(&insert_msg(77));
    let wrapped =
        op_compressed::compress(77, 0, OpCode::Msg, Compressor::Zlib, &plain[HEADER_LEN..]);
    let frame = decode_one(&wrapped);
    let opened = open(&frame, DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    assert_eq!(opened.header(&frame.header).to_bytes(), plain[..HEADER_LEN]);
    let Message::Msg(msg) = opened.parse(&frame).unwrap() else {
        panic!("not an OP_MSG");
    };
    assert!(msg.checksum.is_some());
    assert_eq!(msg.command_name(), Some("insert"));

    // Same payload under another requestID: the checksum no longer matches.
    let moved = op_compressed::compress(78, 0, OpCode::Msg, Compressor::Zlib, &plain[HEADER_LEN..]);
    let frame = decode_one(&moved);
    let opened = open(&frame, DEFAULT_MAX_MESSAGE_SIZE).unwrap();
    assert!(matches!(
        opened.parse(&frame),
        Err(WireError::ChecksumMismatch { .. })
    ));
}

#[test]
fn open_applies_the_size_limit_to_the_decompressed_message() {
    let wrapped = op_compressed::compress(
        1,
        0,
        OpCode::Msg,
        Compressor::Snappy,
        &insert_msg(1)[HEADER_LEN..],
    );
    let frame = decode_one(&wrapped);
    // Big enough for the compressed frame, too small for what it expands to.
    let max = frame.bytes.len();
    let result = open(&frame, max);
    assert!(
        matches!(result, Err(WireError::UncompressedSizeOutOfRange { .. })),
        "{result:?}"
    );
}

/// Feeds `stream` to a decoder in the given chunk sizes and runs every frame
/// through open and parse, touching every view the proxy would.
fn exercise(stream: &[u8], chunks: &[usize], max: usize) {
    let mut codec = FrameCodec::new(max);
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut chunk_sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let take = chunk_sizes
            .next()
            .unwrap_or(rest.len())
            .clamp(1, rest.len());
        buf.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.bytes.len() <= max && frame.bytes.len() >= HEADER_LEN);
                    assert_eq!(
                        usize::try_from(frame.header.message_length).ok(),
                        Some(frame.bytes.len())
                    );
                    inspect(&frame, max);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn inspect(frame: &Frame, max: usize) {
    let Ok(opened) = open(frame, max) else {
        return;
    };
    assert!(opened.body.len() + HEADER_LEN <= max.max(frame.bytes.len()));
    match opened.parse(frame) {
        Ok(Message::Msg(msg)) => {
            let _ = msg.command_name();
            for sequence in &msg.sequences {
                for doc in sequence.iter() {
                    let _ = doc.iter().count();
                }
            }
        }
        Ok(Message::Query(query)) => {
            let _ = query.command_name();
        }
        Ok(Message::Reply(reply)) => {
            let _ = reply.iter().map(|d| d.iter().count()).sum::<usize>();
        }
        Ok(Message::Other(_)) | Err(_) => {}
    }
}

/// A stream that starts like a real frame, so mutations reach deep parsing.
fn mutated_samples() -> impl Strategy<Value = Vec<u8>> {
    let samples = sample_frames();
    (
        0..samples.len(),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
    )
        .prop_map(move |(index, edits)| {
            let mut bytes = samples[index].clone();
            for (position, value) in edits {
                // Keep the length prefix intact most of the time so the
                // frame still decodes and the body parsers see the damage.
                let position = position % bytes.len();
                if position >= 4 {
                    bytes[position] = value;
                }
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_or_exceed_the_limit(
        stream in proptest::collection::vec(any::<u8>(), 0..2048),
        chunks in proptest::collection::vec(1usize..64, 1..8),
        max in 16usize..4096,
    ) {
        exercise(&stream, &chunks, max);
    }

    #[test]
    fn plausible_headers_with_arbitrary_bodies_never_panic(
        op_code in prop_oneof![Just(1i32), Just(2004), Just(2012), Just(2013), any::<i32>()],
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let frame = Frame::build(1, 2, OpCode::from_i32(op_code), &body);
        inspect(&frame, DEFAULT_MAX_MESSAGE_SIZE);
        let _ = parse(OpCode::from_i32(op_code), frame.header_bytes(), &body);
        let _ = op_compressed::decompress(&body, 1024);
    }

    #[test]
    fn mutated_real_frames_never_panic(bytes in mutated_samples(), chunks in proptest::collection::vec(1usize..32, 1..4)) {
        exercise(&bytes, &chunks, DEFAULT_MAX_MESSAGE_SIZE);
    }
}
