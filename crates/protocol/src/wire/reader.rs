//! A bounds-checked little-endian cursor over a borrowed body, and BSON
//! document framing. Every read names what it was reading so a failure can
//! say where the message went wrong; nothing here ever indexes past the end.

use bson::RawDocument;

use super::WireError;

/// The smallest possible BSON document: a 4-byte length and the trailing 0.
pub(crate) const MIN_DOCUMENT_LEN: usize = 5;

/// Reads fields in order from a borrowed slice.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.rest
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub(crate) fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < len {
            return Err(WireError::Truncated(what));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, WireError> {
        self.array(what).map(i32::from_le_bytes)
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, WireError> {
        self.array(what).map(i64::from_le_bytes)
    }

    /// A NUL-terminated UTF-8 string (the NUL is consumed, not returned).
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a str, WireError> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::InvalidCString(what))?;
        let text =
            std::str::from_utf8(&self.rest[..nul]).map_err(|_| WireError::InvalidCString(what))?;
        self.rest = &self.rest[nul + 1..];
        Ok(text)
    }

    /// One BSON document whose framing (length prefix within bounds, at least
    /// 5 bytes, trailing 0) has been checked.
    pub(crate) fn document(&mut self, what: &'static str) -> Result<&'a RawDocument, WireError> {
        let (doc, rest) = split_document(self.rest, what)?;
        self.rest = rest;
        Ok(doc)
    }
}

/// Splits the first BSON document off `bytes`. A prefix that promises more
/// bytes than there are is `Truncated`; a prefix that cannot be a document
/// (negative, under 5) or a missing trailing 0 is `InvalidBson`.
pub(crate) fn split_document<'a>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<(&'a RawDocument, &'a [u8]), WireError> {
    let prefix: [u8; 4] = bytes
        .get(..4)
        .and_then(|p| p.try_into().ok())
        .ok_or(WireError::Truncated(what))?;
    let declared = i32::from_le_bytes(prefix);
    let len = usize::try_from(declared).map_err(|_| WireError::InvalidBson(what))?;
    if len < MIN_DOCUMENT_LEN {
        return Err(WireError::InvalidBson(what));
    }
    if bytes.len() < len {
        return Err(WireError::Truncated(what));
    }
    let (doc_bytes, rest) = bytes.split_at(len);
    let doc = RawDocument::from_bytes(doc_bytes).map_err(|_| WireError::InvalidBson(what))?;
    Ok((doc, rest))
}

/// Checks that `bytes` is exactly a run of zero or more well-framed documents.
pub(crate) fn validate_documents(bytes: &[u8], what: &'static str) -> Result<(), WireError> {
    let mut rest = bytes;
    while !rest.is_empty() {
        rest = split_document(rest, what)?.1;
    }
    Ok(())
}

/// Zero-copy iterator over concatenated BSON documents. It stops at the end
/// or at the first badly framed document (the parsers validate the framing
/// beforehand, so for parsed messages that never cuts a run short).
#[derive(Debug, Clone)]
pub struct Documents<'a> {
    rest: &'a [u8],
}

impl<'a> Documents<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Documents<'a> {
        Documents { rest: bytes }
    }
}

impl<'a> Iterator for Documents<'a> {
    type Item = &'a RawDocument;

    fn next(&mut self) -> Option<&'a RawDocument> {
        match split_document(self.rest, "document") {
            Ok((doc, rest)) => {
                self.rest = rest;
                Some(doc)
            }
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

/// The first key of a document, if it has one and it is readable. Measured
/// by `bson_scan` rather than the bson crate's iterator, which validates and
/// builds error context for an element only its key is wanted from.
pub(crate) fn first_key(doc: &RawDocument) -> Option<&str> {
    crate::bson_scan::elements(doc).next()?.key_str()
}

/// Appends a header and body parts as one frame. The length saturates at
/// `i32::MAX` rather than wrapping: a body that large is refused by every
/// decoder anyway, and encoders must not panic.
pub(crate) fn frame_bytes(
    request_id: i32,
    response_to: i32,
    op_code: super::OpCode,
    parts: &[&[u8]],
) -> Vec<u8> {
    let body_len: usize = parts.iter().map(|p| p.len()).sum();
    let total = body_len.saturating_add(super::HEADER_LEN);
    let header = super::MsgHeader {
        message_length: i32::try_from(total).unwrap_or(i32::MAX),
        request_id,
        response_to,
        op_code,
    };
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header.to_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// The size prefix of a length-prefixed structure, saturating like `frame_bytes`.
pub(crate) fn len_i32(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}
