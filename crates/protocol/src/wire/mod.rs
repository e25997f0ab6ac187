//! Bytes <-> frames, and nothing else: the MongoDB wire protocol's framing
//! (`MsgHeader`), OP_MSG, OP_COMPRESSED, and the legacy OP_QUERY / OP_REPLY
//! handshake messages. Every function here is pure: no I/O, no clocks, no
//! session logic. Parsing is zero-copy over the received bytes (except
//! decompression, which must materialise the payload), and every length read
//! from the wire goes through checked i32 -> usize math before it is used.

mod codec;
mod header;
pub mod legacy;
pub mod op_compressed;
pub mod op_msg;

mod error;
mod reader;

use std::borrow::Cow;

pub use codec::{frame_len, Frame, FrameCodec, FrameRef, DEFAULT_MAX_MESSAGE_SIZE};
pub use error::WireError;
pub use header::{MsgHeader, OpCode, HEADER_LEN};
pub use legacy::{OpQuery, OpReply};
pub use op_compressed::Compressor;
pub use op_msg::{DocumentSequence, MsgFlags, OpMsg};
pub use reader::Documents;

/// A parsed, borrowed view of one frame's payload.
#[derive(Debug)]
pub enum Message<'a> {
    Msg(OpMsg<'a>),
    Query(OpQuery<'a>),
    Reply(OpReply<'a>),
    /// An opcode sessionguard does not inspect (carried through untouched).
    Other(OpCode),
}

/// The payload of a frame with any OP_COMPRESSED wrapper removed.
#[derive(Debug)]
pub struct Opened<'a> {
    /// The opcode of the message inside (the frame's own opcode when not compressed).
    pub op_code: OpCode,
    /// Which compressor wrapped it, if any.
    pub compressor: Option<Compressor>,
    /// The message body (everything after the 16-byte header), borrowed from
    /// the frame when uncompressed, owned when it had to be decompressed.
    pub body: Cow<'a, [u8]>,
}

/// Removes an OP_COMPRESSED wrapper if there is one. `max_message_size` bounds
/// the decompressed size (checked before allocating).
pub fn open<'a>(
    frame: impl Into<FrameRef<'a>>,
    max_message_size: usize,
) -> Result<Opened<'a>, WireError> {
    let frame = frame.into();
    if frame.header.op_code != OpCode::Compressed {
        return Ok(Opened {
            op_code: frame.header.op_code,
            compressor: None,
            body: Cow::Borrowed(frame.body()),
        });
    }
    let (op_code, compressor, body) = op_compressed::decompress(frame.body(), max_message_size)?;
    Ok(Opened {
        op_code,
        compressor: Some(compressor),
        body: Cow::Owned(body),
    })
}

impl Opened<'_> {
    /// The header this message has (or would have had, had it not been
    /// compressed): the outer frame's requestID and responseTo, the original
    /// opcode, and a length of 16 + the opened body. For an uncompressed frame
    /// that is exactly the received header. For a decompressed one it is the
    /// only header that can make sense of a checksum, which therefore covers
    /// the message as it was before compression (drivers do not send checksums
    /// with compression, so this choice is not exercised by real traffic).
    pub fn header(&self, outer: &MsgHeader) -> MsgHeader {
        MsgHeader {
            message_length: reader::len_i32(self.body.len().saturating_add(HEADER_LEN)),
            request_id: outer.request_id,
            response_to: outer.response_to,
            op_code: self.op_code,
        }
    }

    /// Parses the opened body: `parse` with the right header bytes (the
    /// frame's own, or the reconstructed header for a decompressed message).
    pub fn parse<'b, 'f>(
        &'b self,
        frame: impl Into<FrameRef<'f>>,
    ) -> Result<Message<'b>, WireError> {
        let frame = frame.into();
        if self.compressor.is_some() {
            let header = self.header(&frame.header).to_bytes();
            parse(self.op_code, &header, &self.body)
        } else {
            parse(self.op_code, frame.header_bytes(), &self.body)
        }
    }
}

/// Parses an opened body into a borrowed view. For OP_MSG with
/// `checksumPresent`, `header_bytes` (the 16 header bytes as they appeared on
/// the wire, or as reconstructed for a decompressed message) are needed to
/// verify the CRC-32C.
pub fn parse<'a>(
    op_code: OpCode,
    header_bytes: &[u8],
    body: &'a [u8],
) -> Result<Message<'a>, WireError> {
    match op_code {
        OpCode::Msg => OpMsg::parse(header_bytes, body).map(Message::Msg),
        OpCode::Query => OpQuery::parse(body).map(Message::Query),
        OpCode::Reply => OpReply::parse(body).map(Message::Reply),
        other => Ok(Message::Other(other)),
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
