//! Logical session ids as a test writes them: `{id: UUID}` documents made
//! from one byte, and the forms sessionguard shows them in (the short form
//! of its logs, the UUID string of the admin API).

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document, RawDocumentBuf};

/// An lsid document `{id: UUID(n...)}`: 16 bytes of `n` with the version 4
/// and variant 1 bits a driver's random UUID carries.
pub fn lsid(n: u8) -> Document {
    let mut bytes = [n; 16];
    bytes[6] = 0x40 | (n & 0x0F);
    bytes[8] = 0x80 | (n & 0x3F);
    doc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: bytes.to_vec() } }
}

/// `lsid(n)` as a raw document (for the engine-alone tests).
pub fn lsid_raw(n: u8) -> RawDocumentBuf {
    RawDocumentBuf::from_document(&lsid(n)).expect("an lsid encodes")
}

/// The lsid document of a driver session (`ClientSession::id()`).
pub fn session_lsid(session: &mongodb::ClientSession) -> Document {
    session.id().clone()
}

fn id_bytes(lsid: &Document) -> &[u8] {
    match lsid.get("id") {
        Some(Bson::Binary(binary)) => &binary.bytes,
        other => panic!("lsid without a binary id: {other:?}"),
    }
}

/// The short form sessionguard logs for an lsid document.
pub fn short_of(lsid: &Document) -> String {
    id_bytes(lsid)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An lsid document's UUID in the 8-4-4-4-12 form the admin API uses.
pub fn lsid_string(lsid: &Document) -> String {
    let hex: String = id_bytes(lsid).iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}
