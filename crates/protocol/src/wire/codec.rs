//! Splits a byte stream into frames. Partial input is `Ok(None)`, never an
//! error; a length outside [16, max] is refused before anything is allocated.
//! The splitting is pure ([`FrameCodec::decode`] over a `BytesMut`); with the
//! `tokio-codec` feature the same codec is a tokio-util `Decoder` for the
//! crates that read frames off sockets (frames are forwarded as the bytes
//! received, so nothing encodes them).

use bytes::{Bytes, BytesMut};

use super::reader::frame_bytes;
use super::{MsgHeader, OpCode, WireError, HEADER_LEN};

/// The server's default maxMessageSizeBytes (48 MB, decimal as the server uses it).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 48_000_000;

/// One whole wire message: its parsed header and the exact bytes received
/// (header included), so it can be forwarded without re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: MsgHeader,
    pub bytes: Bytes,
}

/// One whole wire message borrowed from a buffer: what an inspecting proxy
/// looks at between reading a frame and forwarding it from the same buffer,
/// with no reference count and no allocation per frame. `Copy`, like the
/// slice it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub header: MsgHeader,
    pub bytes: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// The frame at the start of `bytes`, when they hold at least its
    /// header and its declared length (checked by `frame_len` beforehand);
    /// exactly that many bytes.
    pub fn first_of(bytes: &'a [u8]) -> Option<FrameRef<'a>> {
        let header = MsgHeader::parse(bytes)?;
        let len = usize::try_from(header.message_length).ok()?;
        Some(FrameRef {
            header,
            bytes: bytes.get(..len)?,
        })
    }
    /// Everything after the 16-byte header.
    pub fn body(&self) -> &'a [u8] {
        // Frames from the decoder always hold a full header; a hand-built one
        // might not, and that must not panic.
        self.bytes.get(HEADER_LEN..).unwrap_or(&[])
    }
    /// The 16 header bytes as received.
    pub fn header_bytes(&self) -> &'a [u8] {
        self.bytes.get(..HEADER_LEN).unwrap_or(self.bytes)
    }
}

impl<'a> From<&'a Frame> for FrameRef<'a> {
    fn from(frame: &'a Frame) -> FrameRef<'a> {
        frame.view()
    }
}

impl Frame {
    /// The borrowed view the parser and inspectors take.
    pub fn view(&self) -> FrameRef<'_> {
        FrameRef {
            header: self.header,
            bytes: &self.bytes,
        }
    }
    /// Everything after the 16-byte header.
    pub fn body(&self) -> &[u8] {
        self.view().body()
    }
    /// The 16 header bytes as received.
    pub fn header_bytes(&self) -> &[u8] {
        self.view().header_bytes()
    }
    /// Builds a frame from a header's fields and a body (length computed).
    pub fn build(request_id: i32, response_to: i32, op_code: OpCode, body: &[u8]) -> Frame {
        Frame::from_encoded(frame_bytes(request_id, response_to, op_code, &[body]))
    }

    /// Wraps bytes this module encoded itself (their header is known to be present).
    pub(crate) fn from_encoded(bytes: Vec<u8>) -> Frame {
        let bytes = Bytes::from(bytes);
        let header = MsgHeader::parse(&bytes).unwrap_or(MsgHeader {
            message_length: super::reader::len_i32(bytes.len()),
            request_id: 0,
            response_to: 0,
            op_code: OpCode::Unknown(0),
        });
        Frame { header, bytes }
    }
}

/// Decoder/encoder for whole frames.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_message_size: usize,
}

impl FrameCodec {
    pub fn new(max_message_size: usize) -> FrameCodec {
        FrameCodec { max_message_size }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_MESSAGE_SIZE)
    }
}

impl FrameCodec {
    /// Takes the next whole frame off the front of `src`: `Ok(None)` while
    /// it is incomplete (room for the rest is reserved once its length is
    /// known), an error as soon as a declared length is out of bounds.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        // The length is judged as soon as its 4 bytes are here, so a hostile
        // prefix is refused without waiting for (or buffering) anything more.
        let Some(frame_len) = frame_len(src, self.max_message_size)? else {
            return Ok(None);
        };
        if src.len() < frame_len {
            // Safe to reserve now: frame_len is within [16, max].
            src.reserve(frame_len - src.len());
            return Ok(None);
        }
        let bytes = src.split_to(frame_len).freeze();
        let header = MsgHeader::parse(&bytes).ok_or(WireError::Truncated("message header"))?;
        Ok(Some(Frame { header, bytes }))
    }
}

#[cfg(feature = "tokio-codec")]
impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        FrameCodec::decode(self, src)
    }
}

/// The length the frame at the front of `buf` declares, once its 4 length
/// bytes are there (`Ok(None)` before), refused when outside [16, max]:
/// what a reader that slices frames out of its own buffer checks first.
pub fn frame_len(buf: &[u8], max_message_size: usize) -> Result<Option<usize>, WireError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let mut length_bytes = [0u8; 4];
    length_bytes.copy_from_slice(prefix);
    checked_frame_len(i32::from_le_bytes(length_bytes), max_message_size).map(Some)
}

/// A declared message length as a usize, if it is within [16, max].
fn checked_frame_len(declared: i32, max_message_size: usize) -> Result<usize, WireError> {
    let len = usize::try_from(declared).map_err(|_| WireError::LengthTooSmall(declared))?;
    if len < HEADER_LEN {
        return Err(WireError::LengthTooSmall(declared));
    }
    if len > max_message_size {
        return Err(WireError::LengthTooLarge {
            len: i64::from(declared),
            max: max_message_size,
        });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::fixtures::sample_frames;

    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = codec.decode(buf).expect("valid frames decode") {
            frames.push(frame);
        }
        frames
    }

    fn assert_is(frame: &Frame, original: &[u8]) {
        assert_eq!(&frame.bytes[..], original);
        assert_eq!(frame.header, MsgHeader::parse(original).unwrap());
        assert_eq!(
            usize::try_from(frame.header.message_length).unwrap(),
            original.len()
        );
        assert_eq!(frame.header_bytes(), &original[..HEADER_LEN]);
        assert_eq!(frame.body(), &original[HEADER_LEN..]);
    }

    #[test]
    fn every_frame_split_at_every_byte_boundary_decodes_to_itself() {
        for original in sample_frames() {
            for split in 0..=original.len() {
                let mut codec = FrameCodec::default();
                let mut buf = BytesMut::new();
                buf.extend_from_slice(&original[..split]);
                let early = decode_all(&mut codec, &mut buf);
                buf.extend_from_slice(&original[split..]);
                let late = decode_all(&mut codec, &mut buf);
                let frames: Vec<Frame> = early.into_iter().chain(late).collect();
                assert_eq!(frames.len(), 1, "split at {split}");
                assert_is(&frames[0], &original);
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn byte_by_byte_input_yields_each_frame_exactly_once() {
        let originals = sample_frames();
        let stream: Vec<u8> = originals.concat();
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in &stream {
            buf.extend_from_slice(&[*byte]);
            frames.extend(decode_all(&mut codec, &mut buf));
        }
        assert_eq!(frames.len(), originals.len());
        for (frame, original) in frames.iter().zip(&originals) {
            assert_is(frame, original);
        }
    }

    #[test]
    fn concatenated_frames_split_at_every_boundary_decode_in_order() {
        let originals = sample_frames();
        let stream: Vec<u8> = originals.concat();
        for split in 0..=stream.len() {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::from(&stream[..split]);
            let mut frames = decode_all(&mut codec, &mut buf);
            buf.extend_from_slice(&stream[split..]);
            frames.extend(decode_all(&mut codec, &mut buf));
            assert_eq!(frames.len(), originals.len(), "split at {split}");
            for (frame, original) in frames.iter().zip(&originals) {
                assert_is(frame, original);
            }
        }
    }

    #[test]
    fn partial_frame_reserves_the_rest_once_the_length_is_known() {
        let original = &sample_frames()[0];
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&original[..4]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= original.len());
        assert_eq!(buf.len(), 4, "partial input is left in place");
    }

    fn decode_declared(length: i32, max: usize) -> (Result<Option<Frame>, WireError>, usize) {
        let mut codec = FrameCodec::new(max);
        let mut buf = BytesMut::with_capacity(16);
        buf.extend_from_slice(&length.to_le_bytes());
        let result = codec.decode(&mut buf);
        (result, buf.capacity())
    }

    #[test]
    fn negative_length_is_too_small() {
        let (result, _) = decode_declared(-1, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(
            matches!(result, Err(WireError::LengthTooSmall(-1))),
            "{result:?}"
        );
        let (result, _) = decode_declared(i32::MIN, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(
            matches!(result, Err(WireError::LengthTooSmall(i32::MIN))),
            "{result:?}"
        );
    }

    #[test]
    fn length_under_the_header_size_is_too_small() {
        for length in [0, 1, 15] {
            let (result, _) = decode_declared(length, DEFAULT_MAX_MESSAGE_SIZE);
            assert!(
                matches!(result, Err(WireError::LengthTooSmall(l)) if l == length),
                "{result:?}"
            );
        }
        // 16 is a legal (empty-body) frame, so it waits for more input instead.
        let (result, _) = decode_declared(16, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(matches!(result, Ok(None)), "{result:?}");
    }

    #[test]
    fn huge_length_is_refused_before_allocating() {
        let (result, capacity) = decode_declared(i32::MAX, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(
            matches!(result, Err(WireError::LengthTooLarge { len, max }) if len == i64::from(i32::MAX) && max == DEFAULT_MAX_MESSAGE_SIZE),
            "{result:?}"
        );
        assert!(capacity < 1024, "capacity grew to {capacity}");
        let (result, _) = decode_declared(1025, 1024);
        assert!(
            matches!(
                result,
                Err(WireError::LengthTooLarge {
                    len: 1025,
                    max: 1024
                })
            ),
            "{result:?}"
        );
        let (result, capacity) = decode_declared(1024, 1024);
        assert!(matches!(result, Ok(None)), "{result:?}");
        assert!(capacity >= 1024);
    }

    #[test]
    fn build_computes_the_header() {
        let frame = Frame::build(5, 4, OpCode::Msg, b"abc");
        assert_eq!(frame.header.message_length, 19);
        assert_eq!(frame.header.request_id, 5);
        assert_eq!(frame.header.response_to, 4);
        assert_eq!(frame.header.op_code, OpCode::Msg);
        assert_eq!(frame.body(), b"abc");
        assert_eq!(MsgHeader::parse(&frame.bytes), Some(frame.header));
    }

    #[test]
    fn hand_built_short_frame_does_not_panic() {
        let frame = Frame {
            header: MsgHeader::parse(&[0u8; 16]).unwrap(),
            bytes: Bytes::from_static(b"short"),
        };
        assert_eq!(frame.body(), b"");
        assert_eq!(frame.header_bytes(), b"short");
    }
}
