//! The 16-byte standard message header and the opcode enumeration.

/// Size of the standard message header in bytes.
pub const HEADER_LEN: usize = 16;

/// An opcode. Unknown values are carried (`Unknown`), never rejected here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Reply,
    Update,
    Insert,
    Query,
    GetMore,
    Delete,
    KillCursors,
    Compressed,
    Msg,
    Unknown(i32),
}

impl OpCode {
    pub fn from_i32(value: i32) -> OpCode {
        match value {
            1 => OpCode::Reply,
            2001 => OpCode::Update,
            2002 => OpCode::Insert,
            2004 => OpCode::Query,
            2005 => OpCode::GetMore,
            2006 => OpCode::Delete,
            2007 => OpCode::KillCursors,
            2012 => OpCode::Compressed,
            2013 => OpCode::Msg,
            other => OpCode::Unknown(other),
        }
    }
    pub fn as_i32(self) -> i32 {
        match self {
            OpCode::Reply => 1,
            OpCode::Update => 2001,
            OpCode::Insert => 2002,
            OpCode::Query => 2004,
            OpCode::GetMore => 2005,
            OpCode::Delete => 2006,
            OpCode::KillCursors => 2007,
            OpCode::Compressed => 2012,
            OpCode::Msg => 2013,
            OpCode::Unknown(value) => value,
        }
    }
    /// A short lowercase name for logs and metric labels (fixed set; all
    /// unknown codes map to "unknown").
    pub fn name(self) -> &'static str {
        match self {
            OpCode::Reply => "reply",
            OpCode::Update => "update",
            OpCode::Insert => "insert",
            OpCode::Query => "query",
            OpCode::GetMore => "get_more",
            OpCode::Delete => "delete",
            OpCode::KillCursors => "kill_cursors",
            OpCode::Compressed => "compressed",
            OpCode::Msg => "msg",
            OpCode::Unknown(_) => "unknown",
        }
    }
}

/// The standard message header (all fields little-endian i32 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHeader {
    pub message_length: i32,
    pub request_id: i32,
    pub response_to: i32,
    pub op_code: OpCode,
}

impl MsgHeader {
    /// Reads a header from the first 16 bytes; `None` if fewer are given.
    /// Does not validate `message_length` (the codec does).
    pub fn parse(bytes: &[u8]) -> Option<MsgHeader> {
        let field = |index: usize| -> Option<i32> {
            let start = index * 4;
            let raw: [u8; 4] = bytes.get(start..start + 4)?.try_into().ok()?;
            Some(i32::from_le_bytes(raw))
        };
        Some(MsgHeader {
            message_length: field(0)?,
            request_id: field(1)?,
            response_to: field(2)?,
            op_code: OpCode::from_i32(field(3)?),
        })
    }
    /// The 16 wire bytes of this header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let fields = [
            self.message_length,
            self.request_id,
            self.response_to,
            self.op_code.as_i32(),
        ];
        for (chunk, value) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip_including_unknown() {
        for value in [
            1,
            2001,
            2002,
            2004,
            2005,
            2006,
            2007,
            2012,
            2013,
            0,
            -1,
            2003,
            i32::MAX,
        ] {
            assert_eq!(OpCode::from_i32(value).as_i32(), value);
        }
        assert_eq!(OpCode::from_i32(2013), OpCode::Msg);
        assert_eq!(OpCode::from_i32(2003), OpCode::Unknown(2003));
        assert_eq!(OpCode::Unknown(7).name(), "unknown");
        assert_eq!(OpCode::Msg.name(), "msg");
    }

    #[test]
    fn header_round_trips_little_endian() {
        let header = MsgHeader {
            message_length: 0x0102_0304,
            request_id: -5,
            response_to: 77,
            op_code: OpCode::Query,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[..4], &[4, 3, 2, 1]);
        assert_eq!(&bytes[12..], &2004i32.to_le_bytes());
        assert_eq!(MsgHeader::parse(&bytes), Some(header));
        assert_eq!(MsgHeader::parse(&bytes[..15]), None);
    }
}
