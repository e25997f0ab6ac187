//! The one error type of the wire codec. Messages name the structure that was
//! wrong and the numbers involved, never document contents, so they can go
//! straight into a log line.

use thiserror::Error;

/// Why a frame could not be decoded. Every variant names the problem in words
/// a log reader can act on; none carries document contents.
#[derive(Debug, Error)]
pub enum WireError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("message length {0} is smaller than the 16-byte header")]
    LengthTooSmall(i32),
    #[error("message length {len} exceeds the maximum message size {max}")]
    LengthTooLarge { len: i64, max: usize },
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("invalid BSON in {0}")]
    InvalidBson(&'static str),
    #[error("invalid C string in {0}")]
    InvalidCString(&'static str),
    #[error("OP_MSG has unknown required flag bits {0:#x}")]
    UnknownRequiredFlags(u32),
    #[error("OP_MSG checksum mismatch (expected {expected:#010x}, computed {computed:#010x})")]
    ChecksumMismatch { expected: u32, computed: u32 },
    #[error("OP_MSG has no body (kind 0) section")]
    MissingBodySection,
    #[error("OP_MSG has more than one body (kind 0) section")]
    DuplicateBodySection,
    #[error("OP_MSG document sequence declares size {0}, too small for its own size field and identifier")]
    InvalidSequenceSize(i32),
    #[error("OP_MSG has unknown section kind {0}")]
    UnknownSectionKind(u8),
    #[error("OP_COMPRESSED uses unknown compressor id {0}")]
    UnknownCompressor(u8),
    #[error("OP_COMPRESSED declares uncompressed size {declared} but {actual} bytes decompressed")]
    UncompressedSizeMismatch { declared: i64, actual: usize },
    /// Checked before anything is allocated: a negative size, or one larger
    /// than the maximum message size minus the 16-byte header.
    #[error("OP_COMPRESSED declares uncompressed size {declared}, outside 0..={limit}")]
    UncompressedSizeOutOfRange { declared: i64, limit: usize },
    /// Decompression stops one byte past the declared size, so a payload that
    /// expands further (a decompression bomb) never costs more than that.
    #[error("OP_COMPRESSED payload decompresses to more than its declared size {declared}")]
    UncompressedSizeExceeded { declared: i64 },
    #[error("OP_COMPRESSED payload could not be decompressed: {0}")]
    Decompress(String),
    #[error("{0} bytes left over after the message")]
    TrailingBytes(usize),
}
