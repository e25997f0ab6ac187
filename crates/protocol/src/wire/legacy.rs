//! OP_QUERY and OP_REPLY, which drivers still use for the initial handshake
//! (legacy hello / isMaster) when no API version is declared.

use bson::RawDocument;
use bytes::Bytes;

use super::reader::{first_key, frame_bytes, len_i32, validate_documents, Documents, Reader};
use super::{OpCode, WireError};
use crate::bson_scan;

/// Legacy commands travel as queries on the pseudo-collection `<db>.$cmd`.
const COMMAND_COLLECTION_SUFFIX: &str = ".$cmd";

/// A borrowed view of an OP_QUERY body.
#[derive(Debug)]
pub struct OpQuery<'a> {
    pub flags: i32,
    pub full_collection_name: &'a str,
    pub number_to_skip: i32,
    pub number_to_return: i32,
    pub query: &'a RawDocument,
    pub return_fields_selector: Option<&'a RawDocument>,
}

impl<'a> OpQuery<'a> {
    pub fn parse(body: &'a [u8]) -> Result<OpQuery<'a>, WireError> {
        let mut reader = Reader::new(body);
        let flags = reader.i32("OP_QUERY flags")?;
        let full_collection_name = reader.cstr("OP_QUERY fullCollectionName")?;
        let number_to_skip = reader.i32("OP_QUERY numberToSkip")?;
        let number_to_return = reader.i32("OP_QUERY numberToReturn")?;
        let query = reader.document("OP_QUERY query")?;
        let return_fields_selector = if reader.is_empty() {
            None
        } else {
            Some(reader.document("OP_QUERY returnFieldsSelector")?)
        };
        if !reader.is_empty() {
            return Err(WireError::TrailingBytes(reader.remaining().len()));
        }
        Ok(OpQuery {
            flags,
            full_collection_name,
            number_to_skip,
            number_to_return,
            query,
            return_fields_selector,
        })
    }
    /// The database and command document when this is a command
    /// (`<db>.$cmd`). Drivers that attach a read preference wrap the command
    /// as `{$query: {<command>...}, $readPreference: ...}`, in either order,
    /// so a `$query` document is unwrapped wherever it sits. Every reader of
    /// a legacy command goes through here, so the name the proxy logs and
    /// the document the session engine reads cannot disagree.
    pub fn command(&self) -> Option<(&'a str, &'a RawDocument)> {
        let db = self.database()?;
        let wrapped = bson_scan::elements(self.query)
            .find(|element| element.key == b"$query")
            .and_then(|element| element.as_document());
        Some((db, wrapped.unwrap_or(self.query)))
    }

    /// The command name when this is a command: the first key of
    /// [`OpQuery::command`]'s document.
    pub fn command_name(&self) -> Option<&'a str> {
        first_key(self.command()?.1)
    }

    /// The database a command targets (the part of `<db>.$cmd` before the suffix).
    pub fn database(&self) -> Option<&'a str> {
        self.full_collection_name
            .strip_suffix(COMMAND_COLLECTION_SUFFIX)
    }
}

/// A borrowed view of an OP_REPLY body.
#[derive(Debug)]
pub struct OpReply<'a> {
    pub response_flags: i32,
    pub cursor_id: i64,
    pub starting_from: i32,
    pub number_returned: i32,
    /// The concatenated returned documents (validated framing).
    pub documents: &'a [u8],
}

impl<'a> OpReply<'a> {
    pub fn parse(body: &'a [u8]) -> Result<OpReply<'a>, WireError> {
        let mut reader = Reader::new(body);
        let response_flags = reader.i32("OP_REPLY responseFlags")?;
        let cursor_id = reader.i64("OP_REPLY cursorID")?;
        let starting_from = reader.i32("OP_REPLY startingFrom")?;
        let number_returned = reader.i32("OP_REPLY numberReturned")?;
        let documents = reader.remaining();
        validate_documents(documents, "OP_REPLY documents")?;
        Ok(OpReply {
            response_flags,
            cursor_id,
            starting_from,
            number_returned,
            documents,
        })
    }
    pub fn iter(&self) -> impl Iterator<Item = &'a RawDocument> + 'a {
        Documents::new(self.documents)
    }
    pub fn first(&self) -> Option<&'a RawDocument> {
        self.iter().next()
    }
}

/// Encodes a complete OP_QUERY frame (header included).
pub fn encode_query(
    request_id: i32,
    flags: i32,
    full_collection_name: &str,
    number_to_skip: i32,
    number_to_return: i32,
    query: &[u8],
) -> Bytes {
    let mut fixed = Vec::with_capacity(full_collection_name.len() + 13);
    fixed.extend_from_slice(&flags.to_le_bytes());
    fixed.extend_from_slice(full_collection_name.as_bytes());
    fixed.push(0);
    fixed.extend_from_slice(&number_to_skip.to_le_bytes());
    fixed.extend_from_slice(&number_to_return.to_le_bytes());
    Bytes::from(frame_bytes(request_id, 0, OpCode::Query, &[&fixed, query]))
}

/// Encodes a complete OP_REPLY frame (header included) with the given documents.
pub fn encode_reply(
    request_id: i32,
    response_to: i32,
    response_flags: i32,
    cursor_id: i64,
    documents: &[&[u8]],
) -> Bytes {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(documents.len() + 1);
    let mut fixed = [0u8; 20];
    fixed[..4].copy_from_slice(&response_flags.to_le_bytes());
    fixed[4..12].copy_from_slice(&cursor_id.to_le_bytes());
    // startingFrom stays 0: it is the cursor position, which replies built
    // here (handshakes, error replies) always start at.
    fixed[16..20].copy_from_slice(&len_i32(documents.len()).to_le_bytes());
    parts.push(&fixed);
    parts.extend_from_slice(documents);
    Bytes::from(frame_bytes(request_id, response_to, OpCode::Reply, &parts))
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;
    use crate::wire::fixtures::to_bytes;
    use crate::wire::{MsgHeader, HEADER_LEN};

    #[test]
    fn legacy_handshake_query_round_trips() {
        let query = to_bytes(&doc! {
            "$query": { "isMaster": 1, "helloOk": true, "client": { "driver": { "name": "nodejs" } } },
            "$readPreference": { "mode": "primaryPreferred" },
        });
        let frame = encode_query(42, 4, "admin.$cmd", 0, -1, &query);
        let header = MsgHeader::parse(&frame).unwrap();
        assert_eq!(header.op_code, OpCode::Query);
        assert_eq!((header.request_id, header.response_to), (42, 0));
        assert_eq!(usize::try_from(header.message_length).unwrap(), frame.len());
        let parsed = OpQuery::parse(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(parsed.flags, 4);
        assert_eq!(parsed.full_collection_name, "admin.$cmd");
        assert_eq!(parsed.number_to_skip, 0);
        assert_eq!(parsed.number_to_return, -1);
        assert_eq!(parsed.query.as_bytes(), &query[..]);
        assert!(parsed.return_fields_selector.is_none());
        assert_eq!(parsed.command_name(), Some("isMaster"));
        assert_eq!(parsed.database(), Some("admin"));
    }

    #[test]
    fn command_name_without_wrapper_and_for_plain_queries() {
        let frame = encode_query(1, 0, "test.$cmd", 0, -1, &to_bytes(&doc! { "hello": 1 }));
        assert_eq!(
            OpQuery::parse(&frame[HEADER_LEN..]).unwrap().command_name(),
            Some("hello")
        );
        let frame = encode_query(1, 0, "test.users", 0, 10, &to_bytes(&doc! { "name": "x" }));
        let parsed = OpQuery::parse(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(parsed.command_name(), None);
        assert_eq!(parsed.database(), None);
    }

    #[test]
    fn query_wrapper_is_unwrapped_in_either_position() {
        let query = to_bytes(&doc! {
            "$readPreference": { "mode": "secondaryPreferred" },
            "$query": { "isMaster": 1 },
        });
        let frame = encode_query(1, 0, "admin.$cmd", 0, -1, &query);
        let parsed = OpQuery::parse(&frame[HEADER_LEN..]).unwrap();
        let (db, command) = parsed.command().unwrap();
        assert_eq!(db, "admin");
        assert_eq!(command.as_bytes(), &to_bytes(&doc! { "isMaster": 1 })[..]);
        assert_eq!(parsed.command_name(), Some("isMaster"));
        // A `$query` that is not a document wraps nothing.
        let frame = encode_query(1, 0, "admin.$cmd", 0, -1, &to_bytes(&doc! { "$query": 1 }));
        let parsed = OpQuery::parse(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(parsed.command_name(), Some("$query"));
    }

    #[test]
    fn return_fields_selector_and_trailing_bytes() {
        let query = to_bytes(&doc! { "hello": 1 });
        let selector = to_bytes(&doc! { "ok": 1 });
        let frame = encode_query(1, 0, "admin.$cmd", 0, -1, &query);
        let mut body = frame[HEADER_LEN..].to_vec();
        body.extend_from_slice(&selector);
        let parsed = OpQuery::parse(&body).unwrap();
        assert_eq!(
            parsed.return_fields_selector.unwrap().as_bytes(),
            &selector[..]
        );
        body.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            OpQuery::parse(&body),
            Err(WireError::TrailingBytes(3))
        ));
    }

    #[test]
    fn every_truncated_query_is_an_error() {
        let frame = encode_query(1, 0, "admin.$cmd", 0, -1, &to_bytes(&doc! { "hello": 1 }));
        let body = &frame[HEADER_LEN..];
        for len in 0..body.len() {
            assert!(OpQuery::parse(&body[..len]).is_err(), "truncated to {len}");
        }
        let mut no_nul = 0i32.to_le_bytes().to_vec();
        no_nul.extend_from_slice(b"admin.$cmd");
        assert!(matches!(
            OpQuery::parse(&no_nul),
            Err(WireError::InvalidCString(_))
        ));
    }

    #[test]
    fn reply_round_trips_with_documents() {
        let first = to_bytes(&doc! { "ismaster": true, "maxWireVersion": 21, "ok": 1.0 });
        let second = to_bytes(&doc! { "n": 2 });
        let frame = encode_reply(7, 42, 8, 99, &[&first, &second]);
        let header = MsgHeader::parse(&frame).unwrap();
        assert_eq!(header.op_code, OpCode::Reply);
        assert_eq!((header.request_id, header.response_to), (7, 42));
        assert_eq!(usize::try_from(header.message_length).unwrap(), frame.len());
        let reply = OpReply::parse(&frame[HEADER_LEN..]).unwrap();
        assert_eq!(reply.response_flags, 8);
        assert_eq!(reply.cursor_id, 99);
        assert_eq!(reply.starting_from, 0);
        assert_eq!(reply.number_returned, 2);
        let docs: Vec<&[u8]> = reply.iter().map(|d| d.as_bytes()).collect();
        assert_eq!(docs, [&first[..], &second[..]]);
        assert!(reply.first().unwrap().get_bool("ismaster").unwrap());
    }

    #[test]
    fn reply_with_a_broken_document_is_rejected() {
        let doc = to_bytes(&doc! { "ok": 1.0 });
        let frame = encode_reply(1, 1, 0, 0, &[&doc]);
        let body = &frame[HEADER_LEN..];
        for len in 0..body.len() {
            if len == 20 {
                // Header fields alone are a valid reply with no documents.
                assert_eq!(OpReply::parse(&body[..len]).unwrap().iter().count(), 0);
                continue;
            }
            assert!(OpReply::parse(&body[..len]).is_err(), "truncated to {len}");
        }
        let mut bad = body.to_vec();
        let last = bad.len() - 1;
        bad[last] = 9;
        assert!(matches!(
            OpReply::parse(&bad),
            Err(WireError::InvalidBson(_))
        ));
    }
}
