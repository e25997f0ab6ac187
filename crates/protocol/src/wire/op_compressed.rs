//! OP_COMPRESSED: unwrapping (for inspection) and wrapping (for the emulator
//! and tests) with noop, snappy, zlib and zstd.

use std::io::{Read, Write};

use bytes::Bytes;

use super::reader::{frame_bytes, len_i32, Reader};
use super::{OpCode, WireError, HEADER_LEN};

/// zlib level used when wrapping (the drivers' default, -1, means 6).
const ZLIB_LEVEL: u32 = 6;
/// zstd level used when wrapping (0 selects the library default).
const ZSTD_LEVEL: i32 = 0;
/// zstd refuses windows below 2^10 anyway; this keeps our cap meaningful for tiny limits.
const ZSTD_MIN_WINDOW_LOG: u32 = 10;
/// The largest window log zstd accepts on 64-bit targets.
const ZSTD_MAX_WINDOW_LOG: u32 = 31;

/// Compressor ids as assigned by the compression specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compressor {
    Noop,
    Snappy,
    Zlib,
    Zstd,
}

impl Compressor {
    pub fn id(self) -> u8 {
        match self {
            Compressor::Noop => 0,
            Compressor::Snappy => 1,
            Compressor::Zlib => 2,
            Compressor::Zstd => 3,
        }
    }
    pub fn from_id(id: u8) -> Result<Compressor, WireError> {
        match id {
            0 => Ok(Compressor::Noop),
            1 => Ok(Compressor::Snappy),
            2 => Ok(Compressor::Zlib),
            3 => Ok(Compressor::Zstd),
            other => Err(WireError::UnknownCompressor(other)),
        }
    }
    /// The name used in hello's `compression` list ("snappy", "zlib", "zstd", "noop").
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Noop => "noop",
            Compressor::Snappy => "snappy",
            Compressor::Zlib => "zlib",
            Compressor::Zstd => "zstd",
        }
    }
    pub fn from_name(name: &str) -> Option<Compressor> {
        [
            Compressor::Noop,
            Compressor::Snappy,
            Compressor::Zlib,
            Compressor::Zstd,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }
}

/// Decompresses the body of an OP_COMPRESSED frame (bytes after the header).
/// Returns the original opcode and the original message body. The declared
/// uncompressed size is checked against `max_message_size` before any buffer
/// is allocated, and decompression never produces more than that.
pub fn decompress(
    body: &[u8],
    max_message_size: usize,
) -> Result<(OpCode, Compressor, Vec<u8>), WireError> {
    let mut reader = Reader::new(body);
    let original = OpCode::from_i32(reader.i32("OP_COMPRESSED original opcode")?);
    let declared = reader.i32("OP_COMPRESSED uncompressed size")?;
    let compressor = Compressor::from_id(reader.u8("OP_COMPRESSED compressor id")?)?;
    let compressed = reader.remaining();

    // The inner message gets its own 16-byte header back, so its body may
    // use at most max - 16 bytes.
    let limit = max_message_size.saturating_sub(HEADER_LEN);
    let expected = usize::try_from(declared)
        .ok()
        .filter(|&size| size <= limit)
        .ok_or(WireError::UncompressedSizeOutOfRange {
            declared: i64::from(declared),
            limit,
        })?;

    let out = match compressor {
        Compressor::Noop => {
            if compressed.len() > expected {
                return Err(WireError::UncompressedSizeExceeded {
                    declared: i64::from(declared),
                });
            }
            compressed.to_vec()
        }
        Compressor::Snappy => {
            // The snappy block header states its output length: check it
            // before allocating, so a lying header costs nothing.
            let produced = snap::raw::decompress_len(compressed)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            if produced > expected {
                return Err(WireError::UncompressedSizeExceeded {
                    declared: i64::from(declared),
                });
            }
            let mut out = vec![0u8; produced];
            let written = snap::raw::Decoder::new()
                .decompress(compressed, &mut out)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            out.truncate(written);
            out
        }
        Compressor::Zlib => read_bounded(
            flate2::read::ZlibDecoder::new(compressed),
            expected,
            declared,
        )?,
        Compressor::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            // Without this a tiny frame could declare a window (and make the
            // decoder allocate) far beyond the message size limit.
            decoder
                .window_log_max(zstd_window_log_cap(max_message_size))
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            read_bounded(decoder, expected, declared)?
        }
    };
    if out.len() != expected {
        return Err(WireError::UncompressedSizeMismatch {
            declared: i64::from(declared),
            actual: out.len(),
        });
    }
    Ok((original, compressor, out))
}

/// Reads at most `expected + 1` bytes: one past the declared size is enough
/// to know the declaration was wrong, and never more is buffered.
fn read_bounded(decoder: impl Read, expected: usize, declared: i32) -> Result<Vec<u8>, WireError> {
    let cap = u64::try_from(expected)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut out = Vec::with_capacity(expected.saturating_add(1));
    decoder
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| WireError::Decompress(e.to_string()))?;
    if out.len() > expected {
        return Err(WireError::UncompressedSizeExceeded {
            declared: i64::from(declared),
        });
    }
    Ok(out)
}

/// The smallest power-of-two window that can cover a whole message of the
/// maximum size (compressors size the window to the input), within zstd's range.
fn zstd_window_log_cap(max_message_size: usize) -> u32 {
    let bits = max_message_size
        .max(1)
        .checked_next_power_of_two()
        .map_or(usize::BITS, usize::trailing_zeros);
    bits.clamp(ZSTD_MIN_WINDOW_LOG, ZSTD_MAX_WINDOW_LOG)
}

/// Wraps a message (its opcode and the body after its header) into a complete
/// OP_COMPRESSED frame, header included.
pub fn compress(
    request_id: i32,
    response_to: i32,
    original: OpCode,
    compressor: Compressor,
    body: &[u8],
) -> Bytes {
    // Compressing into memory cannot fail short of an input over 4 GiB; if it
    // ever does, the message goes out wrapped by noop, which is still valid.
    let (compressor, compressed) = match compress_payload(compressor, body) {
        Some(compressed) => (compressor, compressed),
        None => (Compressor::Noop, body.to_vec()),
    };
    let mut prefix = [0u8; 9];
    prefix[..4].copy_from_slice(&original.as_i32().to_le_bytes());
    prefix[4..8].copy_from_slice(&len_i32(body.len()).to_le_bytes());
    prefix[8] = compressor.id();
    Bytes::from(frame_bytes(
        request_id,
        response_to,
        OpCode::Compressed,
        &[&prefix, &compressed],
    ))
}

fn compress_payload(compressor: Compressor, body: &[u8]) -> Option<Vec<u8>> {
    match compressor {
        Compressor::Noop => Some(body.to_vec()),
        Compressor::Snappy => snap::raw::Encoder::new().compress_vec(body).ok(),
        Compressor::Zlib => {
            let mut encoder =
                flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(ZLIB_LEVEL));
            encoder.write_all(body).ok()?;
            encoder.finish().ok()
        }
        Compressor::Zstd => zstd::bulk::compress(body, ZSTD_LEVEL).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::fixtures::insert_msg;
    use crate::wire::{MsgHeader, DEFAULT_MAX_MESSAGE_SIZE};

    const ALL: [Compressor; 4] = [
        Compressor::Noop,
        Compressor::Snappy,
        Compressor::Zlib,
        Compressor::Zstd,
    ];

    /// An OP_COMPRESSED body from its parts, for crafting bad ones.
    fn compressed_body(original: i32, declared: i32, id: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = original.to_le_bytes().to_vec();
        body.extend_from_slice(&declared.to_le_bytes());
        body.push(id);
        body.extend_from_slice(payload);
        body
    }

    fn raw_payload(compressor: Compressor, data: &[u8]) -> Vec<u8> {
        compress_payload(compressor, data).unwrap()
    }

    #[test]
    fn every_compressor_round_trips() {
        let inner = insert_msg(0);
        let body = &inner[HEADER_LEN..];
        for compressor in ALL {
            let frame = compress(31, 30, OpCode::Msg, compressor, body);
            let header = MsgHeader::parse(&frame).unwrap();
            assert_eq!(header.op_code, OpCode::Compressed);
            assert_eq!(usize::try_from(header.message_length).unwrap(), frame.len());
            assert_eq!((header.request_id, header.response_to), (31, 30));
            assert_eq!(frame[HEADER_LEN + 8], compressor.id());
            let (original, used, out) =
                decompress(&frame[HEADER_LEN..], DEFAULT_MAX_MESSAGE_SIZE).unwrap();
            assert_eq!(original, OpCode::Msg);
            assert_eq!(used, compressor);
            assert_eq!(out, body, "{compressor:?}");
        }
    }

    #[test]
    fn compressors_really_compress_repetitive_input() {
        let data = vec![b'x'; 100_000];
        for compressor in [Compressor::Snappy, Compressor::Zlib, Compressor::Zstd] {
            let frame = compress(1, 0, OpCode::Query, compressor, &data);
            assert!(
                frame.len() < data.len() / 10,
                "{compressor:?}: {}",
                frame.len()
            );
            let (_, _, out) = decompress(&frame[HEADER_LEN..], DEFAULT_MAX_MESSAGE_SIZE).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn names_and_ids_round_trip() {
        for compressor in ALL {
            assert_eq!(Compressor::from_name(compressor.name()), Some(compressor));
            assert_eq!(Compressor::from_id(compressor.id()).unwrap(), compressor);
        }
        assert_eq!(Compressor::from_name("snappy"), Some(Compressor::Snappy));
        assert_eq!(Compressor::from_name("lz4"), None);
        assert_eq!(Compressor::Zstd.id(), 3);
    }

    #[test]
    fn unknown_compressor_is_rejected() {
        let body = compressed_body(2013, 5, 9, b"hello");
        let result = decompress(&body, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(
            matches!(result, Err(WireError::UnknownCompressor(9))),
            "{result:?}"
        );
    }

    #[test]
    fn short_wrapper_is_truncated() {
        let body = compressed_body(2013, 5, 0, b"");
        for len in 0..9 {
            let result = decompress(&body[..len], DEFAULT_MAX_MESSAGE_SIZE);
            assert!(
                matches!(result, Err(WireError::Truncated(_))),
                "{len}: {result:?}"
            );
        }
    }

    #[test]
    fn declared_size_outside_the_limit_is_refused_before_decompressing() {
        for compressor in ALL {
            let payload = raw_payload(compressor, b"hello");
            for declared in [-1, i32::MIN, i32::MAX, 1024 - 15] {
                let body = compressed_body(2013, declared, compressor.id(), &payload);
                let result = decompress(&body, 1024);
                assert!(
                    matches!(result, Err(WireError::UncompressedSizeOutOfRange { declared: d, limit: 1008 }) if d == i64::from(declared)),
                    "{compressor:?} {declared}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn declared_size_different_from_the_real_one_is_a_mismatch() {
        for compressor in ALL {
            let payload = raw_payload(compressor, b"hello world");
            let body = compressed_body(2013, 20, compressor.id(), &payload);
            let result = decompress(&body, DEFAULT_MAX_MESSAGE_SIZE);
            assert!(
                matches!(
                    result,
                    Err(WireError::UncompressedSizeMismatch {
                        declared: 20,
                        actual: 11
                    })
                ),
                "{compressor:?}: {result:?}"
            );
            let body = compressed_body(2013, 5, compressor.id(), &payload);
            let result = decompress(&body, DEFAULT_MAX_MESSAGE_SIZE);
            assert!(
                matches!(
                    result,
                    Err(WireError::UncompressedSizeExceeded { declared: 5 })
                ),
                "{compressor:?}: {result:?}"
            );
        }
    }

    #[test]
    fn decompression_bomb_stops_at_the_declared_size() {
        // 32 MiB of zeros shrink to at most 1.5 MiB (snappy; zlib and zstd
        // far smaller); the limit is 4 MiB.
        let bomb = vec![0u8; 32 << 20];
        let max = 4 << 20;
        for compressor in [Compressor::Snappy, Compressor::Zlib, Compressor::Zstd] {
            let payload = raw_payload(compressor, &bomb);
            assert!(
                payload.len() < max,
                "{compressor:?} bomb is {} bytes",
                payload.len()
            );
            for declared in [100, i32::try_from(max - HEADER_LEN).unwrap()] {
                let body = compressed_body(2013, declared, compressor.id(), &payload);
                let result = decompress(&body, max);
                assert!(
                    matches!(result, Err(WireError::UncompressedSizeExceeded { declared: d }) if d == i64::from(declared)),
                    "{compressor:?} {declared}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn snappy_header_lying_about_a_huge_size_allocates_nothing() {
        // A snappy block starts with its uncompressed length as a varint:
        // here 2^31 - 1 followed by garbage.
        let payload = [0xff, 0xff, 0xff, 0xff, 0x07, 0x00];
        let body = compressed_body(2013, 100, Compressor::Snappy.id(), &payload);
        let result = decompress(&body, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(
            matches!(
                result,
                Err(WireError::UncompressedSizeExceeded { declared: 100 })
            ),
            "{result:?}"
        );
    }

    #[test]
    fn corrupt_payloads_are_decompress_errors() {
        for compressor in [Compressor::Snappy, Compressor::Zlib, Compressor::Zstd] {
            let body = compressed_body(2013, 10, compressor.id(), b"\x0a\xffnot compressed at all");
            let result = decompress(&body, DEFAULT_MAX_MESSAGE_SIZE);
            assert!(
                matches!(result, Err(WireError::Decompress(_))),
                "{compressor:?}: {result:?}"
            );
        }
    }

    #[test]
    fn zstd_window_cap_covers_the_limit() {
        assert_eq!(zstd_window_log_cap(DEFAULT_MAX_MESSAGE_SIZE), 26);
        assert_eq!(zstd_window_log_cap(0), ZSTD_MIN_WINDOW_LOG);
        assert_eq!(zstd_window_log_cap(usize::MAX), ZSTD_MAX_WINDOW_LOG);
    }
}
