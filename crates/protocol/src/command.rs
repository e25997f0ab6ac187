//! Zero-copy views of the commands and replies sessionguard inspects: what a
//! request is (name, `$db`, namespace, `lsid`, `txnNumber`, transaction
//! flags, write concern, cursor ids, the session lists of `endSessions` /
//! `refreshSessions` / `killSessions`, the patterns of `killAllSessions*`), a
//! 64-bit identity of its statements (so a byte-for-byte retry is recognised
//! and a different write is not), what a reply says (ok, code, labels, cursor
//! id), and the handshake facts of a connection (driver, application, user).
//!
//! Everything here borrows from the frame's bytes (`bson::RawDocument`); a
//! view never copies a document and never allocates per frame except where a
//! value must be decoded (an escaped SCRAM user name). It owns no state and
//! makes no policy decisions: the session engine does. It must never log or
//! expose document contents beyond command names, namespaces, ids and counts;
//! authentication payloads are read only to extract the user name.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};

use bson::raw::{RawArray, RawBsonRef, RawDocument};

use crate::bson_scan;
use crate::wire::{DocumentSequence, Message, MsgFlags, OpQuery};

/// Whether `key` is one of the fields drivers attach to every command, or
/// change between a first attempt and its retry (cluster time gossip, CSOT's
/// remaining `maxTimeMS`, commit's `w: majority` upgrade). They are not part
/// of what a statement *is*, so the statement identity leaves them out.
///
/// One `match` on the key bytes rather than a scan of a list: the hash asks
/// this of every top-level key of every session request.
fn is_envelope(key: &[u8]) -> bool {
    matches!(
        key,
        b"$db"
            | b"lsid"
            | b"txnNumber"
            | b"$clusterTime"
            | b"maxTimeMS"
            | b"$readPreference"
            | b"readConcern"
            | b"writeConcern"
            | b"autocommit"
            | b"startTransaction"
            | b"recoveryToken"
            | b"apiVersion"
            | b"apiStrict"
            | b"apiDeprecationErrors"
            | b"$audit"
            | b"$client"
            | b"$configServerState"
    )
}

/// A logical session id: the 16 bytes of `lsid.id` (a UUID, binary subtype 4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lsid(pub [u8; 16]);

impl Lsid {
    /// Reads `{id: <16-byte binary>, ...}`. Other fields (`uid` in
    /// `killSessions` lists) are ignored; anything else is `None`.
    pub fn from_document(doc: &RawDocument) -> Option<Lsid> {
        let (_subtype, bytes) = bson_scan::elements(doc)
            .find(|element| element.key == b"id")?
            .as_binary()?;
        Some(Lsid(bytes.try_into().ok()?))
    }

    /// The short form for log lines: the first 8 hex digits of the UUID.
    pub fn short(&self) -> ShortLsid {
        ShortLsid(*self)
    }
}

impl fmt::Display for Lsid {
    /// The full UUID, 8-4-4-4-12.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, byte) in self.0.iter().enumerate() {
            if matches!(index, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Lsid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lsid({self})")
    }
}

/// `Display`s the first 8 hex digits of an lsid.
#[derive(Clone, Copy)]
pub struct ShortLsid(Lsid);

impl fmt::Display for ShortLsid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 .0[..4] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// A zero-copy view of one client command (OP_MSG, or an OP_QUERY on
/// `<db>.$cmd`, with a `$query` wrapper unwrapped).
#[derive(Debug, Clone)]
pub struct RequestView<'a> {
    body: &'a RawDocument,
    sequences: &'a [DocumentSequence<'a>],
    /// The command name (the first key of the command document).
    pub name: &'a str,
    /// `$db` (OP_MSG) or the database of `<db>.$cmd` (OP_QUERY).
    pub db: Option<&'a str>,
    /// The first element: the command name and its value (the collection
    /// of CRUD commands, getMore's cursor id, the list of the session
    /// commands), kept so no reader has to walk the body again for it.
    first: bson_scan::Element<'a>,
    /// `collection` (getMore names its collection there).
    collection_field: Option<&'a str>,
    pub lsid: Option<Lsid>,
    /// An `lsid` field was present but was not `{id: <16-byte binary>}`.
    pub lsid_malformed: bool,
    pub txn_number: Option<i64>,
    pub start_transaction: bool,
    pub autocommit: Option<bool>,
    /// `writeConcern: {w: 0}` (and not `j: true`), or `moreToCome` set.
    pub unacknowledged: bool,
    /// OP_MSG `moreToCome`: the client expects no reply.
    pub more_to_come: bool,
}

impl<'a> RequestView<'a> {
    /// A view of a request message; `None` when the message is not a command
    /// (a legacy CRUD opcode, an OP_QUERY on a collection, a reply, an
    /// unknown opcode, or a body without keys).
    pub fn from_message(message: &'a Message<'a>) -> Option<RequestView<'a>> {
        match message {
            Message::Msg(msg) => Self::from_parts(msg.body, &msg.sequences, msg.flags, None),
            Message::Query(query) => Self::from_query(query),
            Message::Reply(_) | Message::Other(_) => None,
        }
    }

    /// A view of an OP_QUERY command (`<db>.$cmd`), unwrapping `$query`
    /// exactly as [`OpQuery::command_name`] does (the proxy's label).
    pub fn from_query(query: &'a OpQuery<'a>) -> Option<RequestView<'a>> {
        let (db, command) = query.command()?;
        Self::from_parts(command, &[], MsgFlags::default(), Some(db))
    }

    fn from_parts(
        body: &'a RawDocument,
        sequences: &'a [DocumentSequence<'a>],
        flags: MsgFlags,
        legacy_db: Option<&'a str>,
    ) -> Option<RequestView<'a>> {
        // One pass over the top-level keys; values are decoded only for the
        // keys that matter, and keys are compared as bytes.
        let mut elements = bson_scan::elements(body);
        let first = elements.next()?;
        let name = first.key_str().filter(|name| !name.is_empty())?;
        let mut view = RequestView {
            body,
            sequences,
            name,
            db: legacy_db,
            first,
            collection_field: None,
            lsid: None,
            lsid_malformed: false,
            txn_number: None,
            start_transaction: false,
            autocommit: None,
            unacknowledged: flags.more_to_come(),
            more_to_come: flags.more_to_come(),
        };
        for element in elements {
            match element.key {
                // OP_QUERY's database comes from the namespace; it wins.
                b"$db" if view.db.is_none() => view.db = element.as_str(),
                b"lsid" => match element.as_document().and_then(Lsid::from_document) {
                    Some(lsid) => view.lsid = Some(lsid),
                    None => view.lsid_malformed = true,
                },
                b"txnNumber" => view.txn_number = element.as_integer(),
                b"startTransaction" => view.start_transaction = element.as_bool() == Some(true),
                b"autocommit" => view.autocommit = element.as_bool(),
                b"collection" => view.collection_field = element.as_str(),
                b"writeConcern" if element.as_document().is_some_and(is_unacknowledged) => {
                    view.unacknowledged = true
                }
                _ => {}
            }
        }
        Some(view)
    }

    /// The command document (for callers that need a field not exposed here).
    pub fn body(&self) -> &'a RawDocument {
        self.body
    }

    /// The collection the command addresses: the first value for CRUD
    /// commands, `collection` for getMore. `None` for database / admin
    /// commands whose first value is not a string.
    pub fn collection(&self) -> Option<&'a str> {
        if self.name == "getMore" {
            return self.collection_field;
        }
        self.first.as_str()
    }

    /// `db.collection`, or just `db`, as parts (not joined: no allocation).
    pub fn namespace(&self) -> Namespace<'a> {
        Namespace {
            db: self.db.unwrap_or(""),
            collection: self.collection(),
        }
    }

    /// Whether this is part of a multi-statement transaction
    /// (`autocommit: false`, which drivers send on every statement of one).
    pub fn in_transaction(&self) -> bool {
        self.autocommit == Some(false)
    }

    /// A retryable write outside any transaction: a `txnNumber` without
    /// `autocommit: false`.
    pub fn is_retryable_write(&self) -> bool {
        self.txn_number.is_some() && !self.in_transaction()
    }

    /// getMore's cursor id.
    pub fn get_more_cursor_id(&self) -> Option<i64> {
        if self.name != "getMore" {
            return None;
        }
        self.first.as_integer()
    }

    /// killCursors' cursor ids (empty for other commands).
    pub fn killed_cursor_ids(&self) -> impl Iterator<Item = i64> + 'a {
        let array = if self.name == "killCursors" {
            bson_scan::elements(self.body)
                .find(|element| element.key == b"cursors")
                .and_then(|element| element.as_array())
        } else {
            None
        };
        array
            .into_iter()
            .flatten()
            .filter_map(|element| element.as_integer())
    }

    /// The lsids named by `endSessions`, `refreshSessions` or `killSessions`
    /// (the command's own array; empty for other commands). Malformed entries
    /// are skipped.
    pub fn session_list(&self) -> impl Iterator<Item = Lsid> + 'a {
        let array = match self.name {
            "endSessions" | "refreshSessions" | "killSessions" => self.first.as_array(),
            _ => None,
        };
        array
            .into_iter()
            .flatten()
            .filter_map(|element| element.as_document().and_then(Lsid::from_document))
    }

    /// The patterns of `killAllSessions` / `killAllSessionsByPattern`. An
    /// empty array means "every session" and yields one `KillPattern::All`.
    pub fn kill_patterns(&self) -> Vec<KillPattern<'a>> {
        let by_pattern = match self.name {
            "killAllSessions" => false,
            "killAllSessionsByPattern" => true,
            _ => return Vec::new(),
        };
        let Some(mut array) = self.first.as_array() else {
            return vec![KillPattern::Unmatchable];
        };
        let mut patterns = Vec::new();
        for element in array.by_ref() {
            let Some(doc) = element.as_document() else {
                patterns.push(KillPattern::Unmatchable);
                continue;
            };
            if by_pattern {
                kill_by_pattern(doc, &mut patterns);
            } else {
                patterns.push(user_pattern(doc));
            }
        }
        if array.malformed() {
            // An entry that cannot be measured must not leave the list
            // empty, which would read as "every session".
            patterns.push(KillPattern::Unmatchable);
        }
        if patterns.is_empty() {
            patterns.push(KillPattern::All);
        }
        patterns
    }

    /// A 64-bit identity of what this command *does*: its name and every
    /// top-level field except the envelope (`lsid`, `txnNumber`,
    /// `$clusterTime`, `maxTimeMS`, write/read concern...), plus its document
    /// sequences. A retry of the same statements hashes the same; a
    /// different write (other documents, filter, update or namespace) does
    /// not. Deterministic within a process; never persisted.
    pub fn statement_hash(&self) -> u64 {
        // foldhash with a fixed seed: the same input hashes the same for the
        // life of the process, two different writes colliding is not a
        // practical concern, and it is several times faster than SipHash on
        // the bulk bytes (every session request is hashed, inserts whole).
        let mut hasher = std::hash::BuildHasher::build_hasher(
            &foldhash::fast::FixedState::with_seed(0x5e55_1046),
        );
        self.name.hash(&mut hasher);
        let mut elements = bson_scan::elements(self.body);
        for element in elements.by_ref() {
            if is_envelope(element.key) {
                continue;
            }
            // The element as sent (type byte, key, value): equal bytes are
            // the same statement, and the type byte keeps `1` and `1.0`
            // apart.
            hasher.write(element.raw);
        }
        if elements.malformed() {
            // The framing was validated by the codec; a value that cannot
            // be measured still has to count, so mark the spot.
            0xFFu8.hash(&mut hasher);
        }
        for sequence in self.sequences {
            sequence.identifier.hash(&mut hasher);
            hasher.write(sequence.documents);
        }
        hasher.finish()
    }

    /// The statement documents of a write or its argument list — `documents`
    /// of insert, `updates` of update, `deletes` of delete — whether the
    /// driver sent them as an OP_MSG kind-1 document sequence named `field`
    /// or as an array in the command body. Entries that are not documents
    /// are skipped.
    pub fn statements(&self, field: &str) -> impl Iterator<Item = &'a RawDocument> + 'a {
        let sequence = self
            .sequences
            .iter()
            .find(|sequence| sequence.identifier == field)
            .map(DocumentSequence::iter);
        let array = if sequence.is_none() {
            self.body
                .get(field)
                .ok()
                .flatten()
                .and_then(RawBsonRef::as_array)
        } else {
            None
        };
        let from_array = array
            .into_iter()
            .flat_map(|array| array.into_iter())
            .filter_map(|value| value.ok().and_then(RawBsonRef::as_document));
        sequence.into_iter().flatten().chain(from_array)
    }
}

/// `db` and optional collection of a request, kept apart to avoid joining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace<'a> {
    pub db: &'a str,
    pub collection: Option<&'a str>,
}

impl fmt::Display for Namespace<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.collection {
            Some(collection) => write!(f, "{}.{}", self.db, collection),
            None => f.write_str(self.db),
        }
    }
}

/// One pattern of `killAllSessions` / `killAllSessionsByPattern`, reduced to
/// what sessionguard can match against what it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillPattern<'a> {
    /// Every session (`{}` or an empty array).
    All,
    /// One session.
    Lsid(Lsid),
    /// Every session owned by `user@db`.
    User { user: &'a str, db: &'a str },
    /// A pattern sessionguard cannot evaluate (`uid` hashes, roles, malformed).
    Unmatchable,
}

fn user_pattern(doc: &RawDocument) -> KillPattern<'_> {
    let user = doc.get("user").ok().flatten().and_then(RawBsonRef::as_str);
    let db = doc.get("db").ok().flatten().and_then(RawBsonRef::as_str);
    match (user, db) {
        (Some(user), Some(db)) => KillPattern::User { user, db },
        _ => KillPattern::Unmatchable,
    }
}

fn kill_by_pattern<'a>(doc: &'a RawDocument, out: &mut Vec<KillPattern<'a>>) {
    if doc.is_empty() {
        out.push(KillPattern::All);
        return;
    }
    if let Some(lsid_doc) = doc
        .get("lsid")
        .ok()
        .flatten()
        .and_then(RawBsonRef::as_document)
    {
        out.push(Lsid::from_document(lsid_doc).map_or(KillPattern::Unmatchable, KillPattern::Lsid));
        return;
    }
    if let Some(users) = doc
        .get("users")
        .ok()
        .flatten()
        .and_then(RawBsonRef::as_array)
    {
        for user in users {
            match user.ok().and_then(RawBsonRef::as_document) {
                Some(user_doc) => out.push(user_pattern(user_doc)),
                None => out.push(KillPattern::Unmatchable),
            }
        }
        return;
    }
    out.push(KillPattern::Unmatchable);
}

/// A zero-copy view of a server reply (OP_MSG body, or OP_REPLY's first
/// document).
#[derive(Debug, Clone)]
pub struct ReplyView<'a> {
    doc: &'a RawDocument,
    pub ok: bool,
    pub code: Option<i32>,
    pub code_name: Option<&'a str>,
    labels: Option<&'a RawArray>,
    write_errors: Option<&'a RawArray>,
    /// `cursor.id` for find / aggregate / getMore / list* replies.
    pub cursor_id: Option<i64>,
    /// `writeConcernError.code` when present.
    pub write_concern_error_code: Option<i32>,
    /// OP_MSG `moreToCome` on the reply: more replies follow (exhaust).
    pub more_to_come: bool,
}

impl<'a> ReplyView<'a> {
    pub fn from_message(message: &'a Message<'a>) -> Option<ReplyView<'a>> {
        match message {
            Message::Msg(msg) => Some(Self::from_document(msg.body, msg.flags.more_to_come())),
            Message::Reply(reply) => reply.first().map(|doc| Self::from_document(doc, false)),
            Message::Query(_) | Message::Other(_) => None,
        }
    }

    pub fn from_document(doc: &'a RawDocument, more_to_come: bool) -> ReplyView<'a> {
        let mut view = ReplyView {
            doc,
            ok: false,
            code: None,
            code_name: None,
            labels: None,
            write_errors: None,
            cursor_id: None,
            write_concern_error_code: None,
            more_to_come,
        };
        for element in bson_scan::elements(doc) {
            match element.key {
                // Servers send ok as a double; some compatible servers as int or bool.
                b"ok" => view.ok = element.is_truthy(),
                b"code" => {
                    view.code = element
                        .as_integer()
                        .and_then(|code| i32::try_from(code).ok())
                }
                b"codeName" => view.code_name = element.as_str(),
                // Arrays only come with errors: decoded through the bson
                // crate, which has the array type.
                b"errorLabels" => view.labels = array_field(doc, "errorLabels"),
                b"writeErrors" => view.write_errors = array_field(doc, "writeErrors"),
                b"cursor" => {
                    view.cursor_id = element.as_document().and_then(|c| integer_field(c, b"id"))
                }
                b"writeConcernError" => {
                    view.write_concern_error_code = element
                        .as_document()
                        .and_then(|wce| integer_field(wce, b"code"))
                        .and_then(|code| i32::try_from(code).ok())
                }
                _ => {}
            }
        }
        view
    }

    /// The reply document (for callers that need a field not exposed here).
    pub fn document(&self) -> &'a RawDocument {
        self.doc
    }

    /// Whether `errorLabels` contains `label`.
    pub fn has_label(&self, label: &str) -> bool {
        self.error_labels().any(|l| l == label)
    }

    pub fn error_labels(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.labels
            .into_iter()
            .flat_map(|array| array.into_iter())
            .filter_map(|value| value.ok().and_then(RawBsonRef::as_str))
    }

    /// The codes of `writeErrors[]`.
    pub fn write_error_codes(&self) -> impl Iterator<Item = i32> + 'a {
        self.write_errors
            .into_iter()
            .flat_map(|array| array.into_iter())
            .filter_map(|value| {
                value
                    .ok()
                    .and_then(RawBsonRef::as_document)
                    .and_then(|doc| doc.get("code").ok().flatten())
                    .and_then(as_integer)
                    .and_then(|code| i32::try_from(code).ok())
            })
    }

    /// `ok: 1` without `writeErrors`: the command did everything it was asked.
    pub fn is_clean_success(&self) -> bool {
        self.ok && self.write_errors.is_none_or(|errors| errors.is_empty())
    }

    /// An integer field of the reply document (e.g. hello's
    /// `logicalSessionTimeoutMinutes`).
    pub fn integer(&self, key: &str) -> Option<i64> {
        self.doc.get(key).ok().flatten().and_then(as_integer)
    }

    /// A boolean field (e.g. the SASL `done`).
    pub fn boolean(&self, key: &str) -> Option<bool> {
        self.doc
            .get(key)
            .ok()
            .flatten()
            .and_then(RawBsonRef::as_bool)
    }

    /// A sub-document field (e.g. hello's `speculativeAuthenticate`).
    pub fn subdocument(&self, key: &str) -> Option<&'a RawDocument> {
        self.doc
            .get(key)
            .ok()
            .flatten()
            .and_then(RawBsonRef::as_document)
    }
}

/// What a handshake (`hello` / `isMaster` with `client` metadata) says about
/// the application on the other end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Handshake<'a> {
    pub driver_name: Option<&'a str>,
    pub driver_version: Option<&'a str>,
    pub app_name: Option<&'a str>,
    /// The user of a `speculativeAuthenticate` in the same hello, when visible.
    pub user: Option<AuthUser<'a>>,
}

impl<'a> Handshake<'a> {
    /// The handshake facts of a hello / isMaster request; `None` for other
    /// commands and for hellos without `client` metadata (monitoring
    /// hellos after the first).
    pub fn from_request(view: &RequestView<'a>) -> Option<Handshake<'a>> {
        if !is_hello(view.name) {
            return None;
        }
        let client = view
            .body
            .get("client")
            .ok()
            .flatten()
            .and_then(RawBsonRef::as_document);
        let speculative = view
            .body
            .get("speculativeAuthenticate")
            .ok()
            .flatten()
            .and_then(RawBsonRef::as_document);
        if client.is_none() && speculative.is_none() {
            return None;
        }
        let driver = client
            .and_then(|c| c.get("driver").ok().flatten())
            .and_then(RawBsonRef::as_document);
        let application = client
            .and_then(|c| c.get("application").ok().flatten())
            .and_then(RawBsonRef::as_document);
        let field = |doc: Option<&'a RawDocument>, key: &str| {
            doc.and_then(|d| d.get(key).ok().flatten())
                .and_then(RawBsonRef::as_str)
        };
        Some(Handshake {
            driver_name: field(driver, "name"),
            driver_version: field(driver, "version"),
            app_name: field(application, "name"),
            user: speculative.and_then(|doc| {
                auth_user_of(
                    doc,
                    doc.get("db").ok().flatten().and_then(RawBsonRef::as_str),
                )
            }),
        })
    }
}

/// An authentication mechanism sessionguard can read a user name from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    Scram,
    X509,
    Plain,
}

/// The user a connection is authenticating as (not yet confirmed: the
/// server's reply decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser<'a> {
    pub mechanism: AuthMechanism,
    /// The user name; `None` for x.509 without an explicit `user` (the
    /// server takes it from the certificate, which the proxy cannot see).
    pub user: Option<Cow<'a, str>>,
    /// The authentication database (`$external` for x.509 and PLAIN/LDAP).
    pub db: Option<&'a str>,
}

/// The user named by `saslStart` / `authenticate` (the first step of a
/// conversation). Only the user is extracted; the payload is never kept.
pub fn auth_user<'a>(view: &RequestView<'a>) -> Option<AuthUser<'a>> {
    match view.name {
        "saslStart" | "authenticate" => auth_user_of(view.body, view.db),
        _ => None,
    }
}

fn auth_user_of<'a>(doc: &'a RawDocument, db: Option<&'a str>) -> Option<AuthUser<'a>> {
    let mechanism = doc
        .get("mechanism")
        .ok()
        .flatten()
        .and_then(RawBsonRef::as_str)?;
    match mechanism {
        "SCRAM-SHA-1" | "SCRAM-SHA-256" => {
            let payload = payload_bytes(doc)?;
            Some(AuthUser {
                mechanism: AuthMechanism::Scram,
                user: Some(scram_user(payload)?),
                db,
            })
        }
        "MONGODB-X509" => Some(AuthUser {
            mechanism: AuthMechanism::X509,
            user: doc
                .get("user")
                .ok()
                .flatten()
                .and_then(RawBsonRef::as_str)
                .map(Cow::Borrowed),
            db: db.or(Some("$external")),
        }),
        "PLAIN" => {
            let payload = payload_bytes(doc)?;
            Some(AuthUser {
                mechanism: AuthMechanism::Plain,
                user: Some(plain_user(payload)?),
                db: db.or(Some("$external")),
            })
        }
        _ => None,
    }
}

fn payload_bytes(doc: &RawDocument) -> Option<&[u8]> {
    match doc.get("payload").ok().flatten()? {
        RawBsonRef::Binary(binary) => Some(binary.bytes),
        RawBsonRef::String(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// The `n=` attribute of a SCRAM client-first message (RFC 5802):
/// `gs2-header ,n=<saslname>,r=<nonce>...`, with `=2C` / `=3D` unescaped.
fn scram_user(payload: &[u8]) -> Option<Cow<'_, str>> {
    let text = std::str::from_utf8(payload).ok()?;
    // The gs2 header is "n,," / "y,," / "p=<cb>,," optionally with "a=<authzid>"
    // between the commas: skip up to and including the second comma.
    let mut commas = text.match_indices(',');
    commas.next()?;
    let (second, _) = commas.next()?;
    let bare = &text[second + 1..];
    let name = bare.strip_prefix("n=")?;
    let name = name.split(',').next()?;
    if name.is_empty() {
        return None;
    }
    unescape_saslname(name)
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`; any other `=` makes
/// the name invalid (`None`). Borrowed when nothing is escaped.
pub fn unescape_saslname(name: &str) -> Option<Cow<'_, str>> {
    if !name.contains('=') {
        return Some(Cow::Borrowed(name));
    }
    let mut decoded = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(pos) = rest.find('=') {
        decoded.push_str(&rest[..pos]);
        let escape = rest.get(pos..pos + 3)?;
        match escape {
            "=2C" => decoded.push(','),
            "=3D" => decoded.push('='),
            _ => return None,
        }
        rest = &rest[pos + 3..];
    }
    decoded.push_str(rest);
    Some(Cow::Owned(decoded))
}

/// The authcid of a PLAIN message `[authzid] NUL authcid NUL passwd`; the
/// password is never looked at beyond finding where the name ends.
fn plain_user(payload: &[u8]) -> Option<Cow<'_, str>> {
    let mut parts = payload.splitn(3, |&b| b == 0);
    let _authzid = parts.next()?;
    let authcid = parts.next()?;
    parts.next()?;
    let name = std::str::from_utf8(authcid).ok()?;
    (!name.is_empty()).then_some(Cow::Borrowed(name))
}

/// hello / legacy hello, in any spelling drivers use.
pub fn is_hello(name: &str) -> bool {
    matches!(name, "hello" | "isMaster" | "ismaster")
}

/// A BSON integer of any width (and integral doubles, which some tools send).
pub fn as_integer(value: RawBsonRef<'_>) -> Option<i64> {
    match value {
        RawBsonRef::Int32(v) => Some(i64::from(v)),
        RawBsonRef::Int64(v) => Some(v),
        RawBsonRef::Double(v) if v.fract() == 0.0 && v.is_finite() && v.abs() < 9.0e15 => {
            Some(v as i64)
        }
        _ => None,
    }
}

/// `{w: 0}` without `j: true` (the write concern spec treats `w:0, j:true`
/// as acknowledged).
fn is_unacknowledged(write_concern: &RawDocument) -> bool {
    // One walk; the first `w` / `j` counts, as a keyed lookup would find it.
    let (mut w, mut j) = (None, None);
    for element in bson_scan::elements(write_concern) {
        match element.key {
            b"w" if w.is_none() => w = Some(element),
            b"j" if j.is_none() => j = Some(element),
            _ => {}
        }
    }
    let w_is_zero = w.is_some_and(|w| w.as_integer() == Some(0));
    let journaled = j.is_some_and(|j| j.as_bool() == Some(true));
    w_is_zero && !journaled
}

fn array_field<'a>(doc: &'a RawDocument, key: &str) -> Option<&'a RawArray> {
    doc.get(key).ok().flatten().and_then(RawBsonRef::as_array)
}

fn integer_field(doc: &RawDocument, key: &[u8]) -> Option<i64> {
    bson_scan::elements(doc)
        .find(|element| element.key == key)?
        .as_integer()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::op_msg::{encode, encode_with_sequences};
    use crate::wire::{OpMsg, HEADER_LEN};
    use bson::spec::BinarySubtype;
    use bson::{rawdoc, Binary, RawDocumentBuf};

    const UUID_A: [u8; 16] = [
        0xAB, 0xCD, 0xEF, 0x01, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
    ];

    fn lsid_doc(bytes: [u8; 16]) -> RawDocumentBuf {
        rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: bytes.to_vec() } }
    }

    /// Encodes `body` as an OP_MSG frame and hands its parsed view to `check`.
    fn with_msg(body: &RawDocumentBuf, flags: u32, check: impl FnOnce(&Message<'_>)) {
        let frame = encode(7, 0, MsgFlags(flags), body.as_bytes());
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).expect("valid OP_MSG");
        check(&Message::Msg(msg));
    }

    fn with_request(body: &RawDocumentBuf, check: impl FnOnce(&RequestView<'_>)) {
        with_msg(body, 0, |message| {
            check(&RequestView::from_message(message).expect("a command"))
        });
    }

    #[test]
    fn reads_session_and_transaction_fields() {
        let body = rawdoc! {
            "insert": "orders",
            "ordered": true,
            "lsid": lsid_doc(UUID_A),
            "txnNumber": 42_i64,
            "startTransaction": true,
            "autocommit": false,
            "$db": "shop",
        };
        with_request(&body, |view| {
            assert_eq!(view.name, "insert");
            assert_eq!(view.db, Some("shop"));
            assert_eq!(view.collection(), Some("orders"));
            assert_eq!(view.namespace().to_string(), "shop.orders");
            assert_eq!(view.lsid, Some(Lsid(UUID_A)));
            assert!(!view.lsid_malformed);
            assert_eq!(view.txn_number, Some(42));
            assert!(view.start_transaction);
            assert_eq!(view.autocommit, Some(false));
            assert!(view.in_transaction());
            assert!(!view.is_retryable_write());
            assert!(!view.unacknowledged);
            assert!(!view.more_to_come);
        });
    }

    #[test]
    fn plain_retryable_write_and_reads() {
        let body = rawdoc! { "update": "c", "updates": [], "lsid": lsid_doc(UUID_A), "txnNumber": 3_i64, "$db": "d" };
        with_request(&body, |view| {
            assert!(view.is_retryable_write());
            assert!(!view.in_transaction());
        });
        let find = rawdoc! { "find": "c", "filter": {}, "lsid": lsid_doc(UUID_A), "$db": "d" };
        with_request(&find, |view| {
            assert!(!view.is_retryable_write());
            assert_eq!(view.txn_number, None);
            assert_eq!(view.autocommit, None);
        });
    }

    #[test]
    fn malformed_lsid_is_flagged_not_guessed() {
        let body = rawdoc! { "find": "c", "lsid": { "id": "not-a-uuid" }, "$db": "d" };
        with_request(&body, |view| {
            assert_eq!(view.lsid, None);
            assert!(view.lsid_malformed);
        });
        let short = rawdoc! { "find": "c", "lsid": { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![1, 2, 3] } }, "$db": "d" };
        with_request(&short, |view| assert!(view.lsid_malformed));
    }

    #[test]
    fn write_concern_w0_and_more_to_come_are_unacknowledged() {
        for w in [
            bson::Bson::Int32(0),
            bson::Bson::Int64(0),
            bson::Bson::Double(0.0),
        ] {
            let mut body = rawdoc! { "insert": "c", "$db": "d" };
            let mut wc = RawDocumentBuf::new();
            wc.append("w", bson::RawBson::try_from(w).unwrap());
            body.append("writeConcern", wc);
            with_request(&body, |view| assert!(view.unacknowledged));
        }
        let journaled =
            rawdoc! { "insert": "c", "writeConcern": { "w": 0, "j": true }, "$db": "d" };
        with_request(&journaled, |view| assert!(!view.unacknowledged));
        let majority = rawdoc! { "insert": "c", "writeConcern": { "w": "majority" }, "$db": "d" };
        with_request(&majority, |view| assert!(!view.unacknowledged));
        let plain = rawdoc! { "insert": "c", "$db": "d" };
        with_msg(&plain, MsgFlags::MORE_TO_COME, |message| {
            let view = RequestView::from_message(message).unwrap();
            assert!(view.more_to_come);
            assert!(view.unacknowledged);
        });
    }

    #[test]
    fn cursor_ids_of_get_more_and_kill_cursors() {
        let get_more =
            rawdoc! { "getMore": 99_i64, "collection": "events", "batchSize": 10, "$db": "app" };
        with_request(&get_more, |view| {
            assert_eq!(view.get_more_cursor_id(), Some(99));
            assert_eq!(view.collection(), Some("events"));
            assert_eq!(view.namespace().to_string(), "app.events");
            assert_eq!(view.killed_cursor_ids().count(), 0);
        });
        let kill = rawdoc! { "killCursors": "events", "cursors": [5_i64, 6_i64], "$db": "app" };
        with_request(&kill, |view| {
            assert_eq!(view.killed_cursor_ids().collect::<Vec<_>>(), vec![5, 6]);
            assert_eq!(view.get_more_cursor_id(), None);
            assert_eq!(view.collection(), Some("events"));
        });
    }

    #[test]
    fn session_lists_of_session_commands() {
        let other = [9u8; 16];
        for name in ["endSessions", "refreshSessions", "killSessions"] {
            let mut body = RawDocumentBuf::new();
            let mut list = bson::RawArrayBuf::new();
            list.push(lsid_doc(UUID_A));
            list.push(lsid_doc(other));
            list.push(rawdoc! { "id": "junk" });
            body.append(name, list);
            body.append("$db", "admin");
            with_request(&body, |view| {
                assert_eq!(
                    view.session_list().collect::<Vec<_>>(),
                    vec![Lsid(UUID_A), Lsid(other)],
                    "{name}"
                );
            });
        }
        let find = rawdoc! { "find": "c", "$db": "d" };
        with_request(&find, |view| assert_eq!(view.session_list().count(), 0));
    }

    #[test]
    fn kill_all_patterns() {
        let all = rawdoc! { "killAllSessions": [], "$db": "admin" };
        with_request(&all, |view| {
            assert_eq!(view.kill_patterns(), vec![KillPattern::All])
        });
        let users =
            rawdoc! { "killAllSessions": [{ "user": "app", "db": "admin" }], "$db": "admin" };
        with_request(&users, |view| {
            assert_eq!(
                view.kill_patterns(),
                vec![KillPattern::User {
                    user: "app",
                    db: "admin"
                }]
            )
        });
        let by_pattern = rawdoc! {
            "killAllSessionsByPattern": [
                { "lsid": lsid_doc(UUID_A) },
                { "users": [{ "user": "u", "db": "d" }] },
                { "uid": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 32] } },
                {},
            ],
            "$db": "admin",
        };
        with_request(&by_pattern, |view| {
            assert_eq!(
                view.kill_patterns(),
                vec![
                    KillPattern::Lsid(Lsid(UUID_A)),
                    KillPattern::User { user: "u", db: "d" },
                    KillPattern::Unmatchable,
                    KillPattern::All,
                ]
            )
        });
        // An entry that cannot even be measured is not "every session".
        let mut broken = rawdoc! { "killAllSessions": [1_i32], "$db": "admin" }
            .as_bytes()
            .to_vec();
        // length, 0x04, "killAllSessions\0", the array's length: its first type byte.
        let entry_type = 4 + 1 + "killAllSessions".len() + 1 + 4;
        assert_eq!(broken[entry_type], bson_scan::kind::INT32);
        broken[entry_type] = 0x42;
        let broken = RawDocumentBuf::from_bytes(broken).unwrap();
        with_request(&broken, |view| {
            assert_eq!(view.kill_patterns(), vec![KillPattern::Unmatchable])
        });
        let empty = rawdoc! { "killAllSessionsByPattern": [], "$db": "admin" };
        with_request(&empty, |view| {
            assert_eq!(view.kill_patterns(), vec![KillPattern::All])
        });
    }

    fn hash_of(body: &RawDocumentBuf) -> u64 {
        let mut out = 0;
        with_request(body, |view| out = view.statement_hash());
        out
    }

    #[test]
    fn statement_hash_ignores_the_envelope_of_a_retry() {
        let first = rawdoc! {
            "insert": "c", "ordered": true, "documents": [{ "_id": 1, "x": "a" }],
            "lsid": lsid_doc(UUID_A), "txnNumber": 7_i64, "$db": "d",
            "$clusterTime": { "clusterTime": bson::Timestamp { time: 1, increment: 1 } },
            "maxTimeMS": 900,
        };
        let retry = rawdoc! {
            "insert": "c", "ordered": true, "documents": [{ "_id": 1, "x": "a" }],
            "lsid": lsid_doc(UUID_A), "txnNumber": 7_i64, "$db": "d",
            "$clusterTime": { "clusterTime": bson::Timestamp { time: 2, increment: 5 } },
            "maxTimeMS": 350,
        };
        assert_eq!(hash_of(&first), hash_of(&retry));
    }

    #[test]
    fn statement_hash_skips_every_envelope_field_and_nothing_else() {
        let base = rawdoc! { "insert": "c", "documents": [{ "_id": 1 }] };
        for key in [
            "$db",
            "lsid",
            "txnNumber",
            "$clusterTime",
            "maxTimeMS",
            "$readPreference",
            "readConcern",
            "writeConcern",
            "autocommit",
            "startTransaction",
            "recoveryToken",
            "apiVersion",
            "apiStrict",
            "apiDeprecationErrors",
            "$audit",
            "$client",
            "$configServerState",
        ] {
            let mut with = base.clone();
            with.append(key, "x");
            assert_eq!(hash_of(&with), hash_of(&base), "{key}");
        }
        for key in [
            "ordered",
            "bypassDocumentValidation",
            "comment",
            "let",
            "db",
        ] {
            let mut with = base.clone();
            with.append(key, "x");
            assert_ne!(hash_of(&with), hash_of(&base), "{key}");
        }
    }

    #[test]
    fn statement_hash_tells_different_writes_apart() {
        let base = rawdoc! { "insert": "c", "documents": [{ "_id": 1 }], "$db": "d" };
        let other_doc = rawdoc! { "insert": "c", "documents": [{ "_id": 2 }], "$db": "d" };
        let other_coll = rawdoc! { "insert": "c2", "documents": [{ "_id": 1 }], "$db": "d" };
        let int_vs_long = rawdoc! { "insert": "c", "documents": [{ "_id": 1_i64 }], "$db": "d" };
        let update = rawdoc! { "update": "c", "updates": [{ "q": { "_id": 1 }, "u": { "$set": { "a": 1 } } }], "$db": "d" };
        let update2 = rawdoc! { "update": "c", "updates": [{ "q": { "_id": 1 }, "u": { "$set": { "a": 2 } } }], "$db": "d" };
        let hashes = [
            &base,
            &other_doc,
            &other_coll,
            &int_vs_long,
            &update,
            &update2,
        ]
        .map(hash_of);
        for i in 0..hashes.len() {
            for j in i + 1..hashes.len() {
                assert_ne!(hashes[i], hashes[j], "statements {i} and {j} must differ");
            }
        }
    }

    #[test]
    fn statement_hash_covers_document_sequences() {
        let body = rawdoc! { "insert": "c", "$db": "d" };
        let doc1 = rawdoc! { "_id": 1 };
        let doc2 = rawdoc! { "_id": 2 };
        let hash_with = |doc: &RawDocumentBuf| {
            let frame = encode_with_sequences(
                1,
                0,
                MsgFlags(0),
                body.as_bytes(),
                &[("documents", &[doc.as_bytes()])],
            );
            let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
            let message = Message::Msg(msg);
            RequestView::from_message(&message)
                .unwrap()
                .statement_hash()
        };
        assert_eq!(hash_with(&doc1), hash_with(&doc1));
        assert_ne!(hash_with(&doc1), hash_with(&doc2));
    }

    #[test]
    fn statements_come_from_a_document_sequence_or_the_body_array() {
        let ids = |view: &RequestView<'_>, field: &str| -> Vec<i32> {
            view.statements(field)
                .map(|doc| doc.get_i32("_id").unwrap())
                .collect()
        };
        let in_body =
            rawdoc! { "insert": "c", "documents": [{ "_id": 1 }, 7, { "_id": 2 }], "$db": "d" };
        with_request(&in_body, |view| {
            assert_eq!(ids(view, "documents"), [1, 2]);
            assert!(ids(view, "updates").is_empty());
        });
        let body = rawdoc! { "insert": "c", "$db": "d" };
        let (doc1, doc2) = (rawdoc! { "_id": 3 }, rawdoc! { "_id": 4 });
        let frame = encode_with_sequences(
            1,
            0,
            MsgFlags(0),
            body.as_bytes(),
            &[("documents", &[doc1.as_bytes(), doc2.as_bytes()])],
        );
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        let message = Message::Msg(msg);
        let view = RequestView::from_message(&message).unwrap();
        assert_eq!(ids(&view, "documents"), [3, 4]);
        assert!(ids(&view, "deletes").is_empty());
    }

    #[test]
    fn legacy_op_query_command_with_query_wrapper() {
        let inner = rawdoc! { "isMaster": 1, "client": { "driver": { "name": "legacy", "version": "1.0" } } };
        let wrapped =
            rawdoc! { "$query": inner.clone(), "$readPreference": { "mode": "primaryPreferred" } };
        for doc in [&inner, &wrapped] {
            let query = OpQuery {
                flags: 0,
                full_collection_name: "admin.$cmd",
                number_to_skip: 0,
                number_to_return: -1,
                query: doc,
                return_fields_selector: None,
            };
            let view = RequestView::from_query(&query).expect("a command");
            assert_eq!(view.name, "isMaster");
            assert_eq!(view.db, Some("admin"));
            let handshake = Handshake::from_request(&view).expect("handshake");
            assert_eq!(handshake.driver_name, Some("legacy"));
        }
        let not_command = OpQuery {
            flags: 0,
            full_collection_name: "app.users",
            number_to_skip: 0,
            number_to_return: 0,
            query: &inner,
            return_fields_selector: None,
        };
        assert!(RequestView::from_query(&not_command).is_none());
    }

    #[test]
    fn legacy_query_wrapper_after_read_preference_names_the_command() {
        // Drivers may put `$readPreference` first; the engine must see the
        // command the proxy labels, not `$readPreference`.
        let doc = rawdoc! {
            "$readPreference": { "mode": "secondaryPreferred" },
            "$query": { "isMaster": 1, "client": { "driver": { "name": "legacy", "version": "1.0" } } },
        };
        let query = OpQuery {
            flags: 0,
            full_collection_name: "admin.$cmd",
            number_to_skip: 0,
            number_to_return: -1,
            query: &doc,
            return_fields_selector: None,
        };
        let view = RequestView::from_query(&query).expect("a command");
        assert_eq!(view.name, "isMaster");
        assert_eq!(query.command_name(), Some(view.name));
        assert_eq!(view.db, Some("admin"));
        let handshake = Handshake::from_request(&view).expect("handshake");
        assert_eq!(handshake.driver_name, Some("legacy"));
    }

    #[test]
    fn handshake_metadata_and_speculative_scram_user() {
        let body = rawdoc! {
            "hello": 1,
            "client": {
                "driver": { "name": "mongo-rust-driver", "version": "3.3.0" },
                "application": { "name": "billing" },
                "os": { "type": "linux" },
            },
            "speculativeAuthenticate": {
                "saslStart": 1, "mechanism": "SCRAM-SHA-256",
                "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"n,,n=alice,r=abcdef".to_vec() },
                "db": "admin",
            },
            "$db": "admin",
        };
        with_request(&body, |view| {
            let handshake = Handshake::from_request(view).expect("handshake");
            assert_eq!(handshake.driver_name, Some("mongo-rust-driver"));
            assert_eq!(handshake.driver_version, Some("3.3.0"));
            assert_eq!(handshake.app_name, Some("billing"));
            let user = handshake.user.expect("user");
            assert_eq!(user.mechanism, AuthMechanism::Scram);
            assert_eq!(user.user.as_deref(), Some("alice"));
            assert_eq!(user.db, Some("admin"));
        });
        let monitoring = rawdoc! { "hello": 1, "topologyVersion": { "counter": 1_i64 }, "maxAwaitTimeMS": 10000, "$db": "admin" };
        with_request(&monitoring, |view| {
            assert!(Handshake::from_request(view).is_none())
        });
        let find = rawdoc! { "find": "c", "client": {}, "$db": "d" };
        with_request(&find, |view| {
            assert!(Handshake::from_request(view).is_none())
        });
    }

    #[test]
    fn sasl_start_users_are_unescaped_and_payload_never_kept() {
        let cases: [(&[u8], Option<&str>); 6] = [
            (b"n,,n=bob,r=nonce", Some("bob")),
            (b"n,a=admin,n=ad=2Cmin=3Dx,r=nonce", Some("ad,min=x")),
            (b"y,,n=carol,r=n", Some("carol")),
            (b"n,,n=,r=nonce", None),
            (b"n,,n=bad=2Xescape,r=nonce", None),
            (b"garbage", None),
        ];
        for (payload, expected) in cases {
            let body = rawdoc! {
                "saslStart": 1, "mechanism": "SCRAM-SHA-1",
                "payload": Binary { subtype: BinarySubtype::Generic, bytes: payload.to_vec() },
                "autoAuthorize": 1, "$db": "app",
            };
            with_request(&body, |view| {
                let user = auth_user(view);
                assert_eq!(
                    user.as_ref().and_then(|u| u.user.as_deref()),
                    expected,
                    "{:?}",
                    String::from_utf8_lossy(payload)
                );
                if let Some(user) = user {
                    assert_eq!(user.db, Some("app"));
                }
            });
        }
    }

    #[test]
    fn x509_and_plain_users() {
        let x509 = rawdoc! { "authenticate": 1, "mechanism": "MONGODB-X509", "user": "CN=client,O=acme", "$db": "$external" };
        with_request(&x509, |view| {
            let user = auth_user(view).unwrap();
            assert_eq!(user.mechanism, AuthMechanism::X509);
            assert_eq!(user.user.as_deref(), Some("CN=client,O=acme"));
            assert_eq!(user.db, Some("$external"));
        });
        let x509_implicit =
            rawdoc! { "authenticate": 1, "mechanism": "MONGODB-X509", "$db": "$external" };
        with_request(&x509_implicit, |view| {
            assert_eq!(auth_user(view).unwrap().user, None)
        });
        let plain = rawdoc! {
            "saslStart": 1, "mechanism": "PLAIN",
            "payload": Binary { subtype: BinarySubtype::Generic, bytes: b"\0ldapuser\0secret".to_vec() },
            "$db": "$external",
        };
        with_request(&plain, |view| {
            assert_eq!(auth_user(view).unwrap().user.as_deref(), Some("ldapuser"))
        });
        let kerberos = rawdoc! { "saslStart": 1, "mechanism": "GSSAPI", "payload": Binary { subtype: BinarySubtype::Generic, bytes: vec![1] }, "$db": "$external" };
        with_request(&kerberos, |view| assert_eq!(auth_user(view), None));
    }

    #[test]
    fn reply_view_reads_ok_code_labels_cursor_and_write_errors() {
        let error = rawdoc! {
            "ok": 0.0, "errmsg": "x", "code": 251, "codeName": "NoSuchTransaction",
            "errorLabels": ["TransientTransactionError"],
        };
        with_msg(&error, 0, |message| {
            let reply = ReplyView::from_message(message).unwrap();
            assert!(!reply.ok);
            assert_eq!(reply.code, Some(251));
            assert_eq!(reply.code_name, Some("NoSuchTransaction"));
            assert!(reply.has_label("TransientTransactionError"));
            assert!(!reply.has_label("RetryableWriteError"));
            assert!(!reply.is_clean_success());
        });
        let cursor =
            rawdoc! { "cursor": { "firstBatch": [], "id": 12345_i64, "ns": "d.c" }, "ok": 1.0 };
        with_msg(&cursor, 0, |message| {
            let reply = ReplyView::from_message(message).unwrap();
            assert!(reply.ok);
            assert_eq!(reply.cursor_id, Some(12345));
            assert!(reply.is_clean_success());
        });
        let write_errors = rawdoc! {
            "n": 0, "writeErrors": [{ "index": 0, "code": 11000, "errmsg": "dup" }],
            "writeConcernError": { "code": 64, "errmsg": "wc" }, "ok": 1,
        };
        with_msg(&write_errors, MsgFlags::MORE_TO_COME, |message| {
            let reply = ReplyView::from_message(message).unwrap();
            assert!(reply.ok);
            assert!(reply.more_to_come);
            assert!(!reply.is_clean_success());
            assert_eq!(reply.write_error_codes().collect::<Vec<_>>(), vec![11000]);
            assert_eq!(reply.write_concern_error_code, Some(64));
        });
        let hello =
            rawdoc! { "isWritablePrimary": true, "logicalSessionTimeoutMinutes": 30, "ok": true };
        with_msg(&hello, 0, |message| {
            let reply = ReplyView::from_message(message).unwrap();
            assert!(reply.ok);
            assert_eq!(reply.integer("logicalSessionTimeoutMinutes"), Some(30));
        });
    }

    #[test]
    fn lsid_renders_full_and_short() {
        let lsid = Lsid(UUID_A);
        assert_eq!(lsid.to_string(), "abcdef01-0203-0405-0607-08090a0b0c0d");
        assert_eq!(lsid.short().to_string(), "abcdef01");
    }
}
