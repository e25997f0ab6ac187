//! A finding's public id: the value the engine's violation records carry
//! and the admin API, the logs and the reports show — 48 bits of the
//! SHA-256 of a canonical text, shown as 12 hex digits, parsed back,
//! serialized as text. Which text describes a finding is the findings
//! module's business (`FindingId::of`, `overflow`). It depends on nothing
//! else in the engine, so violations can name their finding without
//! depending on the findings table.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A finding's public id: 12 lowercase hex digits (48 bits), the first 12
/// of the SHA-256 of its canonical text (`findings::canonical_text`).
/// Stable across processes and versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FindingId(u64);

impl FindingId {
    /// The id of a canonical text.
    pub fn of_text(text: &str) -> FindingId {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut bytes = [0u8; 8];
        bytes[2..].copy_from_slice(&digest.as_ref()[..6]);
        FindingId(u64::from_be_bytes(bytes))
    }
}

impl fmt::Display for FindingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012x}", self.0)
    }
}

impl FromStr for FindingId {
    type Err = ();
    /// Exactly 12 hex digits.
    fn from_str(s: &str) -> Result<FindingId, ()> {
        if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        u64::from_str_radix(s, 16).map(FindingId).map_err(|_| ())
    }
}

impl Serialize for FindingId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FindingId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<FindingId, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|()| serde::de::Error::custom("a finding id is 12 hex digits"))
    }
}
