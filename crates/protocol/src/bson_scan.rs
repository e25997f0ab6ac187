//! A minimal walk over a BSON document's top-level elements for the hot
//! path: each element's type byte, key bytes and value bytes, found with
//! bounds-checked length arithmetic and nothing decoded or validated until a
//! caller asks for one value. The `bson` crate's iterator validates the
//! UTF-8 of every key and builds error context per element; reading a
//! command's ten keys to find the three that matter spent most of the
//! engine's per-request time there.
//!
//! It must not allocate, and must never read past the document: a
//! malformed element ends the walk (`Elements::malformed` says so) instead
//! of guessing. It is not a BSON validator: values it is not asked about are
//! only measured, never checked.

use bson::RawDocument;

/// BSON element types this module tells apart (the BSON spec's numbers).
pub(crate) mod kind {
    pub(crate) const DOUBLE: u8 = 0x01;
    pub(crate) const STRING: u8 = 0x02;
    pub(crate) const DOCUMENT: u8 = 0x03;
    pub(crate) const ARRAY: u8 = 0x04;
    pub(crate) const BINARY: u8 = 0x05;
    pub(crate) const BOOLEAN: u8 = 0x08;
    pub(crate) const INT32: u8 = 0x10;
    pub(crate) const INT64: u8 = 0x12;
}

/// One top-level element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Element<'a> {
    pub kind: u8,
    pub key: &'a [u8],
    pub value: &'a [u8],
    /// Type byte, key, its terminator and the value: the element as sent.
    pub raw: &'a [u8],
}

impl<'a> Element<'a> {
    /// The key as text, when it is valid UTF-8.
    pub fn key_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.key).ok()
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&'a str> {
        if self.kind != kind::STRING {
            return None;
        }
        // int32 length (including the terminator), bytes, 0x00.
        let text = self.value.get(4..)?.strip_suffix(&[0])?;
        std::str::from_utf8(text).ok()
    }

    /// An embedded document value.
    pub fn as_document(&self) -> Option<&'a RawDocument> {
        if self.kind != kind::DOCUMENT {
            return None;
        }
        RawDocument::from_bytes(self.value).ok()
    }

    /// An array value's elements. An array is a document whose keys are
    /// "0", "1", ...; the keys are not checked, only walked past.
    pub fn as_array(&self) -> Option<Elements<'a>> {
        (self.kind == kind::ARRAY).then(|| elements_of(self.value))
    }

    pub fn as_bool(&self) -> Option<bool> {
        match (self.kind, self.value) {
            (kind::BOOLEAN, [byte]) => Some(*byte != 0),
            _ => None,
        }
    }

    /// An integer of any width, and integral doubles (which some tools
    /// send), exactly as `command::as_integer` reads a decoded value.
    pub fn as_integer(&self) -> Option<i64> {
        match self.kind {
            kind::INT32 => Some(i64::from(i32::from_le_bytes(self.value.try_into().ok()?))),
            kind::INT64 => Some(i64::from_le_bytes(self.value.try_into().ok()?)),
            kind::DOUBLE => {
                let v = f64::from_le_bytes(self.value.try_into().ok()?);
                (v.fract() == 0.0 && v.is_finite() && v.abs() < 9.0e15).then_some(v as i64)
            }
            _ => None,
        }
    }

    /// Numbers other than zero, and `true` (how servers spell `ok`).
    pub fn is_truthy(&self) -> bool {
        match self.kind {
            kind::DOUBLE => self
                .value
                .try_into()
                .is_ok_and(|bytes| f64::from_le_bytes(bytes) != 0.0),
            kind::INT32 | kind::INT64 | kind::BOOLEAN => self.value.iter().any(|&b| b != 0),
            _ => false,
        }
    }

    /// A binary value's subtype and bytes.
    pub fn as_binary(&self) -> Option<(u8, &'a [u8])> {
        if self.kind != kind::BINARY {
            return None;
        }
        let (&subtype, bytes) = self.value.get(4..)?.split_first()?;
        Some((subtype, bytes))
    }
}

/// The top-level elements of a document, in order.
#[derive(Debug, Clone)]
pub struct Elements<'a> {
    rest: &'a [u8],
    malformed: bool,
}

/// Walks `doc`'s top-level elements.
pub fn elements(doc: &RawDocument) -> Elements<'_> {
    elements_of(doc.as_bytes())
}

/// Walks the top-level elements of raw document bytes (length prefix
/// included). Bytes that are not a document (a declared length that does
/// not fit, no terminating 0x00 there) yield nothing and are `malformed`.
pub(crate) fn elements_of(bytes: &[u8]) -> Elements<'_> {
    // The declared length bounds the walk and its last byte must be the
    // terminator; the elements lie strictly between the two.
    let declared = bytes
        .get(..4)
        .and_then(|prefix| prefix.try_into().ok())
        .map(i32::from_le_bytes)
        .and_then(|length| usize::try_from(length).ok());
    match declared {
        Some(length) if length >= 5 && bytes.get(length - 1) == Some(&0) => Elements {
            rest: &bytes[4..length - 1],
            malformed: false,
        },
        _ => Elements {
            rest: &[],
            malformed: true,
        },
    }
}

impl Elements<'_> {
    /// The walk stopped at an element it could not measure.
    pub fn malformed(&self) -> bool {
        self.malformed
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Element<'a>;

    fn next(&mut self) -> Option<Element<'a>> {
        let rest = self.rest;
        let (&element_kind, after_kind) = rest.split_first()?;
        if element_kind == 0 {
            // A terminator before the declared end: the bytes after it are
            // unaccounted for, so the walk did not see the whole document.
            self.rest = &[];
            self.malformed = true;
            return None;
        }
        let parsed = (|| {
            let key_len = after_kind.iter().position(|&b| b == 0)?;
            let key = &after_kind[..key_len];
            let value_at = key_len.checked_add(1)?;
            let value_start = after_kind.get(value_at..)?;
            let value_len = value_len(element_kind, value_start)?;
            let value = value_start.get(..value_len)?;
            let raw_len = 1usize.checked_add(value_at)?.checked_add(value_len)?;
            Some((key, value, raw_len))
        })();
        match parsed {
            Some((key, value, raw_len)) => {
                let (raw, remaining) = rest.split_at(raw_len);
                self.rest = remaining;
                Some(Element {
                    kind: element_kind,
                    key,
                    value,
                    raw,
                })
            }
            None => {
                self.rest = &[];
                self.malformed = true;
                None
            }
        }
    }
}

/// The length of a value of `element_kind` starting at `value`, if it fits.
fn value_len(element_kind: u8, value: &[u8]) -> Option<usize> {
    let length_at = |at: usize| -> Option<usize> {
        let bytes = value.get(at..at.checked_add(4)?)?;
        usize::try_from(i32::from_le_bytes(bytes.try_into().ok()?)).ok()
    };
    let cstring_end = |from: usize| -> Option<usize> {
        Some(from + value.get(from..)?.iter().position(|&b| b == 0)? + 1)
    };
    let len = match element_kind {
        // double, datetime, timestamp, int64
        0x01 | 0x09 | 0x11 | 0x12 => 8,
        // string, JavaScript code, symbol: int32 length (terminator
        // included, so at least 1) then the bytes.
        0x02 | 0x0D | 0x0E => {
            let text = length_at(0)?;
            if text == 0 {
                return None;
            }
            4usize.checked_add(text)?
        }
        // document, array, code with scope: the int32 counts itself.
        0x03 | 0x04 | 0x0F => {
            let total = length_at(0)?;
            if total < 5 {
                return None;
            }
            total
        }
        // binary: int32 length, subtype, bytes.
        0x05 => 5usize.checked_add(length_at(0)?)?,
        // undefined, null, min key, max key
        0x06 | 0x0A | 0xFF | 0x7F => 0,
        0x07 => 12,
        0x08 => 1,
        // regex: pattern and options, both C strings.
        0x0B => cstring_end(cstring_end(0)?)?,
        // DBPointer: string then a 12-byte ObjectId.
        0x0C => 4usize.checked_add(length_at(0)?)?.checked_add(12)?,
        0x10 => 4,
        0x13 => 16,
        _ => return None,
    };
    (len <= value.len()).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::spec::BinarySubtype;
    use bson::{rawdoc, Binary, RawBsonRef, RawDocumentBuf, Regex, Timestamp};
    use proptest::prelude::*;

    fn every_type() -> RawDocumentBuf {
        rawdoc! {
            "double": 1.5,
            "string": "héllo",
            "document": { "a": 1_i32 },
            "array": [1_i32, "two"],
            "binary": Binary { subtype: BinarySubtype::Uuid, bytes: vec![7; 16] },
            "objectId": bson::oid::ObjectId::from_bytes([3; 12]),
            "bool": true,
            "datetime": bson::DateTime::from_millis(12),
            "null": bson::RawBson::Null,
            "regex": Regex { pattern: "^a".into(), options: "i".into() },
            "int32": -7_i32,
            "timestamp": Timestamp { time: 1, increment: 2 },
            "int64": 1_i64 << 40,
            "decimal": bson::Decimal128::from_bytes([9; 16]),
            "min": bson::RawBson::MinKey,
            "max": bson::RawBson::MaxKey,
        }
    }

    #[test]
    fn walks_every_type_like_the_bson_crate() {
        let doc = every_type();
        let ours: Vec<Element<'_>> = elements(&doc).collect();
        let theirs: Vec<_> = doc.iter_elements().map(Result::unwrap).collect();
        assert_eq!(ours.len(), theirs.len());
        for (mine, reference) in ours.iter().zip(&theirs) {
            assert_eq!(mine.key_str(), Some(reference.key()));
            assert_eq!(
                mine.kind,
                reference.element_type() as u8,
                "{}",
                reference.key()
            );
        }
        // The raw slices tile the document between its length and terminator.
        let total: usize = ours.iter().map(|e| e.raw.len()).sum();
        assert_eq!(total, doc.as_bytes().len() - 5);
        assert!(!elements(&doc).malformed());
    }

    #[test]
    fn values_read_like_the_bson_crate() {
        let doc = every_type();
        let find = |key: &str| elements(&doc).find(|e| e.key == key.as_bytes()).unwrap();
        assert_eq!(find("string").as_str(), Some("héllo"));
        assert_eq!(find("int32").as_integer(), Some(-7));
        assert_eq!(find("int64").as_integer(), Some(1 << 40));
        assert_eq!(find("double").as_integer(), None);
        assert_eq!(find("bool").as_bool(), Some(true));
        assert!(find("bool").is_truthy() && find("double").is_truthy());
        assert!(!find("string").is_truthy());
        assert_eq!(find("binary").as_binary(), Some((4, &[7u8; 16][..])));
        let inner = find("document").as_document().unwrap();
        assert_eq!(inner.get("a").unwrap(), Some(RawBsonRef::Int32(1)));
        assert_eq!(find("string").as_document(), None);
        let array: Vec<_> = find("array").as_array().unwrap().collect();
        assert_eq!(array.len(), 2);
        assert_eq!((array[0].key, array[0].as_integer()), (&b"0"[..], Some(1)));
        assert_eq!((array[1].key, array[1].as_str()), (&b"1"[..], Some("two")));
        assert!(find("document").as_array().is_none());
        assert_eq!(find("int32").as_str(), None);
    }

    #[test]
    fn integral_doubles_are_integers_and_zero_is_falsy() {
        let doc = rawdoc! { "a": 3.0, "b": 0.0, "c": 0_i32, "d": false, "e": 1e300 };
        let all: Vec<_> = elements(&doc).collect();
        assert_eq!(all[0].as_integer(), Some(3));
        assert!(!all[1].is_truthy() && !all[2].is_truthy() && !all[3].is_truthy());
        assert_eq!(all[4].as_integer(), None);
    }

    #[test]
    fn truncated_or_lying_documents_end_the_walk() {
        let doc = rawdoc! { "a": 1_i32, "b": "text" };
        let bytes = doc.as_bytes();
        // A declared length past the bytes: nothing, malformed.
        let mut long = bytes.to_vec();
        long[0] = long[0].wrapping_add(10);
        let walk = elements_of(&long);
        assert!(walk.malformed());
        assert_eq!(walk.count(), 0);
        // A string length reaching past the document: the walk stops there.
        let mut lying = bytes.to_vec();
        let at = lying.len() - 1 - 5 - 4; // the int32 before "text\0"
        lying[at..at + 4].copy_from_slice(&1000_i32.to_le_bytes());
        let mut walk = elements_of(&lying);
        assert_eq!(walk.next().map(|e| e.key), Some(&b"a"[..]));
        assert_eq!(walk.next(), None);
        assert!(walk.malformed());
        // A terminator where the second element's type byte should be:
        // the walk ends there, but bytes remain, so it is malformed.
        let mut early = bytes.to_vec();
        early[4 + 1 + 2 + 4] = 0; // length, "a" element (type, "a\0", int32)
        let mut walk = elements_of(&early);
        assert_eq!(walk.next().map(|e| e.key), Some(&b"a"[..]));
        assert_eq!(walk.next(), None);
        assert!(walk.malformed());
        // No terminator at the declared end.
        let mut unterminated = bytes.to_vec();
        let last = unterminated.len() - 1;
        unterminated[last] = 1;
        let walk = elements_of(&unterminated);
        assert!(walk.malformed());
        assert_eq!(walk.count(), 0);
        // A complete walk is not malformed, even when asked again.
        let mut walk = elements_of(bytes);
        assert_eq!(walk.by_ref().count(), 2);
        assert_eq!(walk.next(), None);
        assert!(!walk.malformed());
        // An unknown type byte.
        let mut unknown = bytes.to_vec();
        unknown[4] = 0x42;
        let mut walk = elements_of(&unknown);
        assert_eq!(walk.next(), None);
        assert!(walk.malformed());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_stay_inside(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut walk = elements_of(&bytes);
            let mut seen = 0usize;
            for element in walk.by_ref() {
                seen += element.raw.len();
                let _ = (element.as_str(), element.as_integer(), element.as_document(), element.as_binary(), element.is_truthy());
            }
            prop_assert!(seen <= bytes.len());
        }

        #[test]
        fn agrees_with_the_bson_crate_on_valid_documents(values in proptest::collection::vec((any::<i64>(), "[a-z]{0,8}", any::<bool>()), 0..12)) {
            let mut doc = RawDocumentBuf::new();
            for (index, (number, text, flag)) in values.iter().enumerate() {
                doc.append(format!("n{index}"), *number);
                doc.append(format!("s{index}"), text.as_str());
                doc.append(format!("b{index}"), *flag);
            }
            let ours: Vec<_> = elements(&doc).map(|e| (e.key_str().unwrap().to_owned(), e.as_integer(), e.as_str().map(str::to_owned), e.as_bool())).collect();
            let theirs: Vec<_> = doc.iter_elements().map(Result::unwrap).map(|e| {
                let value = e.value().unwrap();
                (e.key().to_owned(), crate::command::as_integer(value), value.as_str().map(str::to_owned), value.as_bool())
            }).collect();
            prop_assert_eq!(ours, theirs);
        }
    }
}
