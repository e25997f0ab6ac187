//! OP_MSG: flag bits, the kind-0 body section, kind-1 document sequences and
//! the optional CRC-32C checksum.

use bson::RawDocument;
use bytes::Bytes;

use super::reader::{first_key, frame_bytes, len_i32, validate_documents, Documents, Reader};
use super::{OpCode, WireError};

/// Required flag bits (0-15) that this parser understands.
const KNOWN_REQUIRED_FLAGS: u32 = MsgFlags::CHECKSUM_PRESENT | MsgFlags::MORE_TO_COME;
const REQUIRED_FLAGS_MASK: u32 = 0xFFFF;
const CHECKSUM_LEN: usize = 4;
const SECTION_BODY: u8 = 0;
const SECTION_SEQUENCE: u8 = 1;

/// OP_MSG flag bits. Bits 0-15 are "required": a parser must reject unknown
/// ones; bits 16-31 are optional and ignored when unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsgFlags(pub u32);

impl MsgFlags {
    pub const CHECKSUM_PRESENT: u32 = 1 << 0;
    pub const MORE_TO_COME: u32 = 1 << 1;
    pub const EXHAUST_ALLOWED: u32 = 1 << 16;

    pub fn checksum_present(self) -> bool {
        self.0 & Self::CHECKSUM_PRESENT != 0
    }
    pub fn more_to_come(self) -> bool {
        self.0 & Self::MORE_TO_COME != 0
    }
    pub fn exhaust_allowed(self) -> bool {
        self.0 & Self::EXHAUST_ALLOWED != 0
    }
}

/// A kind-1 section: an identifier (e.g. "documents") and its BSON documents.
#[derive(Debug, Clone, Copy)]
pub struct DocumentSequence<'a> {
    pub identifier: &'a str,
    /// The concatenated documents (already validated as a sequence of
    /// well-framed BSON documents by `OpMsg::parse`).
    pub documents: &'a [u8],
}

impl<'a> DocumentSequence<'a> {
    pub fn iter(&self) -> impl Iterator<Item = &'a RawDocument> + 'a {
        Documents::new(self.documents)
    }
    pub fn len(&self) -> usize {
        self.iter().count()
    }
    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }
}

/// A borrowed view of an OP_MSG body.
#[derive(Debug)]
pub struct OpMsg<'a> {
    pub flags: MsgFlags,
    pub body: &'a RawDocument,
    pub sequences: Vec<DocumentSequence<'a>>,
    pub checksum: Option<u32>,
}

impl<'a> OpMsg<'a> {
    /// Parses the bytes after the header. When `checksumPresent` is set the
    /// CRC-32C over `header_bytes` + `body` (minus the trailing 4 checksum
    /// bytes) is verified.
    pub fn parse(header_bytes: &[u8], body: &'a [u8]) -> Result<OpMsg<'a>, WireError> {
        let mut reader = Reader::new(body);
        let flags = MsgFlags(reader.u32("OP_MSG flag bits")?);
        let unknown_required = flags.0 & REQUIRED_FLAGS_MASK & !KNOWN_REQUIRED_FLAGS;
        if unknown_required != 0 {
            return Err(WireError::UnknownRequiredFlags(unknown_required));
        }

        let (sections, checksum) = if flags.checksum_present() {
            let covered_len = body
                .len()
                .checked_sub(CHECKSUM_LEN)
                .filter(|&len| len >= 4)
                .ok_or(WireError::Truncated("OP_MSG checksum"))?;
            let (covered, stored) = body.split_at(covered_len);
            let mut stored_bytes = [0u8; CHECKSUM_LEN];
            stored_bytes.copy_from_slice(stored);
            let expected = u32::from_le_bytes(stored_bytes);
            let computed = crc32c::crc32c_append(crc32c::crc32c(header_bytes), covered);
            if computed != expected {
                return Err(WireError::ChecksumMismatch { expected, computed });
            }
            (&covered[4..], Some(expected))
        } else {
            (reader.remaining(), None)
        };

        let mut reader = Reader::new(sections);
        let mut body_doc = None;
        let mut sequences = Vec::new();
        while !reader.is_empty() {
            match reader.u8("OP_MSG section kind")? {
                SECTION_BODY => {
                    let doc = reader.document("OP_MSG body section")?;
                    if body_doc.replace(doc).is_some() {
                        return Err(WireError::DuplicateBodySection);
                    }
                }
                SECTION_SEQUENCE => sequences.push(parse_sequence(&mut reader)?),
                other => return Err(WireError::UnknownSectionKind(other)),
            }
        }
        let body = body_doc.ok_or(WireError::MissingBodySection)?;
        Ok(OpMsg {
            flags,
            body,
            sequences,
            checksum,
        })
    }

    /// The command name: the first key of the body document.
    pub fn command_name(&self) -> Option<&'a str> {
        first_key(self.body)
    }

    /// The document sequence with this identifier (e.g. "documents"), if any.
    pub fn sequence(&self, identifier: &str) -> Option<&DocumentSequence<'a>> {
        self.sequences.iter().find(|s| s.identifier == identifier)
    }
}

/// Encodes a complete OP_MSG frame (header included) with one kind-0 section
/// holding `body` (raw BSON bytes) and no checksum.
pub fn encode(request_id: i32, response_to: i32, flags: MsgFlags, body: &[u8]) -> Bytes {
    encode_with_sequences(request_id, response_to, flags, body, &[])
}

/// Like `encode`, plus kind-1 sections `(identifier, documents)`.
pub fn encode_with_sequences(
    request_id: i32,
    response_to: i32,
    flags: MsgFlags,
    body: &[u8],
    sequences: &[(&str, &[&[u8]])],
) -> Bytes {
    let mut payload = Vec::with_capacity(5 + body.len());
    payload.extend_from_slice(&flags.0.to_le_bytes());
    payload.push(SECTION_BODY);
    payload.extend_from_slice(body);
    for (identifier, documents) in sequences {
        let docs_len: usize = documents.iter().map(|d| d.len()).sum();
        // The size counts itself, the identifier and its NUL, and the documents.
        let size = 4usize
            .saturating_add(identifier.len() + 1)
            .saturating_add(docs_len);
        payload.push(SECTION_SEQUENCE);
        payload.extend_from_slice(&len_i32(size).to_le_bytes());
        payload.extend_from_slice(identifier.as_bytes());
        payload.push(0);
        for doc in *documents {
            payload.extend_from_slice(doc);
        }
    }
    Bytes::from(frame_bytes(
        request_id,
        response_to,
        OpCode::Msg,
        &[&payload],
    ))
}

/// Reads a kind-1 section after its kind byte: the declared size must hold the
/// size field and identifier, fit in what is left, and be filled exactly by
/// well-framed documents.
fn parse_sequence<'a>(reader: &mut Reader<'a>) -> Result<DocumentSequence<'a>, WireError> {
    let declared = reader.i32("OP_MSG document sequence size")?;
    // Smallest legal sequence: the 4-byte size and an empty identifier's NUL.
    let size = usize::try_from(declared)
        .ok()
        .filter(|&size| size >= 5)
        .ok_or(WireError::InvalidSequenceSize(declared))?;
    let contents = reader.take(size - 4, "OP_MSG document sequence")?;
    let mut inner = Reader::new(contents);
    let identifier = inner.cstr("OP_MSG document sequence identifier")?;
    let documents = inner.remaining();
    validate_documents(documents, "OP_MSG document sequence")?;
    Ok(DocumentSequence {
        identifier,
        documents,
    })
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;
    use crate::wire::fixtures::{
        insert_body, insert_documents, insert_msg, to_bytes, with_checksum,
    };
    use crate::wire::HEADER_LEN;

    fn parse_frame(frame: &[u8]) -> Result<OpMsg<'_>, WireError> {
        OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..])
    }

    /// flagBits, then raw section bytes, as an OP_MSG body.
    fn body_of(flags: u32, sections: &[&[u8]]) -> Vec<u8> {
        let mut body = flags.to_le_bytes().to_vec();
        for section in sections {
            body.extend_from_slice(section);
        }
        body
    }

    fn kind0(document: &[u8]) -> Vec<u8> {
        let mut section = vec![0u8];
        section.extend_from_slice(document);
        section
    }

    fn kind1(declared_size: i32, identifier: &str, documents: &[&[u8]]) -> Vec<u8> {
        let mut section = vec![1u8];
        section.extend_from_slice(&declared_size.to_le_bytes());
        section.extend_from_slice(identifier.as_bytes());
        section.push(0);
        for document in documents {
            section.extend_from_slice(document);
        }
        section
    }

    fn ping() -> Vec<u8> {
        to_bytes(&doc! { "ping": 1, "$db": "admin" })
    }

    #[test]
    fn driver_insert_round_trips_with_zero_copy_sequence() {
        let frame = insert_msg(3);
        let msg = parse_frame(&frame).unwrap();
        assert_eq!(msg.command_name(), Some("insert"));
        assert_eq!(msg.flags, MsgFlags(0));
        assert_eq!(msg.checksum, None);
        assert_eq!(msg.body.as_bytes(), &insert_body()[..]);
        assert_eq!(msg.body.get_str("$db").unwrap(), "test");
        assert_eq!(msg.body.get_i64("txnNumber").unwrap(), 1);
        assert!(msg
            .body
            .get_document("lsid")
            .unwrap()
            .get_binary("id")
            .is_ok());
        assert_eq!(msg.sequences.len(), 1);
        let sequence = msg.sequence("documents").unwrap();
        assert_eq!(sequence.len(), 2);
        assert!(!sequence.is_empty());
        let expected = insert_documents();
        let frame_range = frame.as_ptr_range();
        for (doc, want) in sequence.iter().zip(&expected) {
            assert_eq!(doc.as_bytes(), &want[..]);
            assert!(
                frame_range.contains(&doc.as_bytes().as_ptr()),
                "document was copied"
            );
        }
    }

    #[test]
    fn several_sequences_and_an_empty_one_are_kept_in_order() {
        let a = to_bytes(&doc! { "q": {}, "u": { "$set": { "x": 1 } } });
        let frame = encode_with_sequences(
            1,
            0,
            MsgFlags(MsgFlags::EXHAUST_ALLOWED),
            &to_bytes(&doc! { "update": "c", "$db": "test" }),
            &[("updates", &[&a, &a]), ("empty", &[])],
        );
        let msg = parse_frame(&frame).unwrap();
        assert!(msg.flags.exhaust_allowed());
        assert_eq!(msg.command_name(), Some("update"));
        let identifiers: Vec<&str> = msg.sequences.iter().map(|s| s.identifier).collect();
        assert_eq!(identifiers, ["updates", "empty"]);
        assert_eq!(msg.sequences[0].len(), 2);
        assert!(msg.sequences[1].is_empty());
        assert_eq!(msg.sequences[1].iter().count(), 0);
    }

    #[test]
    fn checksum_is_verified_when_present() {
        let frame = with_checksum(&insert_msg(4));
        let msg = parse_frame(&frame).unwrap();
        assert!(msg.flags.checksum_present());
        let stored = u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap());
        assert_eq!(msg.checksum, Some(stored));
        assert_eq!(msg.command_name(), Some("insert"));
        assert_eq!(msg.sequences[0].len(), 2);

        // One flipped bit anywhere (header, sections or the checksum itself) is caught.
        for position in [0, 5, HEADER_LEN + 6, frame.len() - 10, frame.len() - 1] {
            let mut bad = frame.clone();
            bad[position] ^= 0x10;
            let result = parse_frame(&bad);
            assert!(
                matches!(result, Err(WireError::ChecksumMismatch { .. })),
                "pos {position}: {result:?}"
            );
        }
    }

    #[test]
    fn checksum_flag_without_room_for_a_checksum_is_truncated() {
        let body = body_of(MsgFlags::CHECKSUM_PRESENT, &[&[0, 0]]);
        let result = OpMsg::parse(&[0u8; 16], &body);
        assert!(matches!(result, Err(WireError::Truncated(_))), "{result:?}");
    }

    #[test]
    fn unknown_required_flag_bits_are_rejected_and_optional_ones_ignored() {
        for bit in 2..16 {
            let body = body_of(1 << bit, &[&kind0(&ping())]);
            let result = OpMsg::parse(&[0u8; 16], &body);
            assert!(
                matches!(result, Err(WireError::UnknownRequiredFlags(bits)) if bits == 1 << bit),
                "bit {bit}: {result:?}"
            );
        }
        let body = body_of(
            MsgFlags::MORE_TO_COME | 1 << 17 | 1 << 31,
            &[&kind0(&ping())],
        );
        let msg = OpMsg::parse(&[0u8; 16], &body).unwrap();
        assert!(msg.flags.more_to_come());
        assert_eq!(msg.command_name(), Some("ping"));
    }

    #[test]
    fn body_section_is_required_exactly_once() {
        let doc = ping();
        let missing = body_of(0, &[&kind1(5 + 4, "docs", &[])]);
        assert!(matches!(
            OpMsg::parse(&[0; 16], &missing),
            Err(WireError::MissingBodySection)
        ));
        let nothing = body_of(0, &[]);
        assert!(matches!(
            OpMsg::parse(&[0; 16], &nothing),
            Err(WireError::MissingBodySection)
        ));
        let twice = body_of(0, &[&kind0(&doc), &kind0(&doc)]);
        assert!(matches!(
            OpMsg::parse(&[0; 16], &twice),
            Err(WireError::DuplicateBodySection)
        ));
        // The body may come after sequences.
        let after = body_of(0, &[&kind1(9, "docs", &[]), &kind0(&doc)]);
        assert_eq!(
            OpMsg::parse(&[0; 16], &after).unwrap().command_name(),
            Some("ping")
        );
    }

    #[test]
    fn unknown_section_kind_is_rejected() {
        let body = body_of(0, &[&kind0(&ping()), &[2, 0, 0, 0, 0]]);
        assert!(matches!(
            OpMsg::parse(&[0; 16], &body),
            Err(WireError::UnknownSectionKind(2))
        ));
    }

    #[test]
    fn lying_sequence_sizes_are_rejected() {
        let doc = ping();
        let honest = i32::try_from(4 + 5 + doc.len()).unwrap();
        let good = body_of(0, &[&kind0(&doc), &kind1(honest, "docs", &[&doc])]);
        assert_eq!(OpMsg::parse(&[0; 16], &good).unwrap().sequences[0].len(), 1);

        // Larger than what is left in the message.
        let larger = body_of(0, &[&kind0(&doc), &kind1(honest + 1, "docs", &[&doc])]);
        let result = OpMsg::parse(&[0; 16], &larger);
        assert!(matches!(result, Err(WireError::Truncated(_))), "{result:?}");
        // Smaller: the last document no longer fits inside the section.
        let smaller = body_of(0, &[&kind0(&doc), &kind1(honest - 1, "docs", &[&doc])]);
        let result = OpMsg::parse(&[0; 16], &smaller);
        assert!(matches!(result, Err(WireError::Truncated(_))), "{result:?}");
        // Too small to hold its own size field, negative, and huge.
        for declared in [0, 4, -1, i32::MIN] {
            let body = body_of(0, &[&kind0(&doc), &kind1(declared, "docs", &[&doc])]);
            let result = OpMsg::parse(&[0; 16], &body);
            assert!(
                matches!(result, Err(WireError::InvalidSequenceSize(d)) if d == declared),
                "{declared}: {result:?}"
            );
        }
        let body = body_of(0, &[&kind0(&doc), &kind1(i32::MAX, "docs", &[&doc])]);
        assert!(matches!(
            OpMsg::parse(&[0; 16], &body),
            Err(WireError::Truncated(_))
        ));
        // An identifier with no NUL inside the declared size.
        let mut no_nul = body_of(0, &[&kind0(&doc)]);
        no_nul.extend_from_slice(&[1, 8, 0, 0, 0, b'd', b'o', b'c', b's']);
        let result = OpMsg::parse(&[0; 16], &no_nul);
        assert!(
            matches!(result, Err(WireError::InvalidCString(_))),
            "{result:?}"
        );
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error() {
        let frame = insert_msg(1);
        // Cutting exactly after the body section leaves a valid message
        // without the document sequence; every other cut must fail.
        let body_section_end = HEADER_LEN + 4 + 1 + insert_body().len();
        for len in HEADER_LEN..frame.len() {
            let result = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..len]);
            if len == body_section_end {
                assert!(result.unwrap().sequences.is_empty());
            } else {
                assert!(result.is_err(), "truncated to {len} parsed");
            }
        }
        let frame = with_checksum(&insert_msg(1));
        for len in HEADER_LEN..frame.len() {
            assert!(OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..len]).is_err());
        }
    }

    #[test]
    fn badly_framed_documents_are_invalid_bson() {
        let mut no_terminator = ping();
        let last = no_terminator.len() - 1;
        no_terminator[last] = 1;
        let body = body_of(0, &[&kind0(&no_terminator)]);
        let result = OpMsg::parse(&[0; 16], &body);
        assert!(
            matches!(result, Err(WireError::InvalidBson(_))),
            "{result:?}"
        );

        for declared in [-5i32, 0, 4] {
            let mut doc = ping();
            doc[..4].copy_from_slice(&declared.to_le_bytes());
            let body = body_of(0, &[&kind0(&doc)]);
            let result = OpMsg::parse(&[0; 16], &body);
            assert!(
                matches!(result, Err(WireError::InvalidBson(_))),
                "{declared}: {result:?}"
            );
        }

        let doc = ping();
        let body = body_of(
            0,
            &[&kind0(&doc), &kind1(9 + 5, "docs", &[&[5, 0, 0, 0, 7]])],
        );
        let result = OpMsg::parse(&[0; 16], &body);
        assert!(
            matches!(result, Err(WireError::InvalidBson(_))),
            "{result:?}"
        );
    }

    #[test]
    fn command_name_of_an_empty_body_is_none() {
        let body = body_of(0, &[&kind0(&[5, 0, 0, 0, 0])]);
        assert_eq!(OpMsg::parse(&[0; 16], &body).unwrap().command_name(), None);
    }
}
