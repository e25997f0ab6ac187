//! Web-session stores: HTTP sessions kept as MongoDB documents (express-session
//! with connect-mongo and its kin). This module owns the `[stores]` table,
//! recognises store collections (configured names, plus auto-detection of the
//! common document shape), reduces each store command to the operations it
//! performs on one store document (read, destroy, upsert, update, touch,
//! insert), keeps a small bounded record per store document id, and finds
//! what `store-session-resurrected` (in `rules`, as every rule) reports: an
//! upsert that brings back a document destroyed after the writer had read it
//! (a logout undone by a request that loaded the session before the logout
//! and saved it afterwards).
//!
//! A destroy takes hold when the server confirms the delete (judged by
//! outcome, like the session engine's effects): `apply` hands the destroys
//! back and the engine settles them with the reply — applied on a clean
//! ok:1, dropped on anything else, applied as *unconfirmed* when the reply
//! never comes (a resurrection of it is then reported at most as a warning).
//!
//! It is pure bookkeeping: the engine hands it request views and request
//! references, and the rule turns its findings into violations. It never logs, and it
//! never keeps a session's contents or even its id: a store document is known
//! by a keyed 64-bit hash of its namespace and `_id` (a session id is a bearer
//! credential), shown in evidence only as that hash.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use bson::raw::{RawBsonRef, RawDocument};
use foldhash::fast::RandomState;
use serde::{Deserialize, Serialize};

use super::state::{millis, ClientId, Millis, RequestRef};
use sessionguard_protocol::command::RequestView;

/// The collections treated as stores when `[stores]` says nothing.
pub(crate) const DEFAULT_STORE_COLLECTIONS: &[&str] = &["sessions"];
/// How long a request may hold a session it loaded: a read, the destroy and
/// the resurrecting upsert must all fall within it.
pub(crate) const DEFAULT_RESURRECTION_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Most store documents followed at once (least recently active go first).
pub(crate) const DEFAULT_MAX_STORE_DOCUMENTS: usize = 100_000;
/// The metrics label of every auto-detected store.
pub(crate) const AUTO_STORE_LABEL: &str = "auto";
/// Auto-detection learns at most this many namespaces (a client cannot grow
/// the set without bound by writing session-shaped documents everywhere).
const MAX_AUTO_NAMESPACES: usize = 64;
/// Distinct clients whose last read of one document is remembered.
const READERS_PER_DOCUMENT: usize = 4;
/// `$set` fields of a touch: the expiry, and connect-mongo's `touchAfter` stamp.
const TOUCH_FIELDS: &[&str] = &["expires", "lastModified"];

/// `[stores]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Store collections: `db.collection`, or a bare collection name that
    /// matches it in every database.
    pub collections: Vec<String>,
    /// Also treat a collection as a store once an upsert or insert writes the
    /// common shape there: a string `_id`, an `expires` date and a `session`
    /// field.
    pub auto_detect: bool,
    #[serde(with = "humantime_serde")]
    pub resurrection_window: Duration,
    pub max_documents: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            collections: DEFAULT_STORE_COLLECTIONS
                .iter()
                .map(|c| c.to_string())
                .collect(),
            auto_detect: true,
            resurrection_window: DEFAULT_RESURRECTION_WINDOW,
            max_documents: DEFAULT_MAX_STORE_DOCUMENTS,
        }
    }
}

impl StoreConfig {
    /// Checks values; the error names the key (`stores.<key>`).
    pub fn validate(&self) -> Result<(), String> {
        for (index, entry) in self.collections.iter().enumerate() {
            let bad = entry.is_empty()
                || entry.starts_with('.')
                || entry.ends_with('.')
                || entry.contains('$')
                || entry.contains('\0');
            if bad {
                return Err(format!(
                    "stores.collections: {entry:?} is not a collection name (use \"collection\" or \"db.collection\")"
                ));
            }
            if entry == AUTO_STORE_LABEL {
                return Err(format!(
                    "stores.collections: {entry:?} is the metrics label of auto-detected stores; write it as \"<db>.{entry}\""
                ));
            }
            if self.collections[..index].contains(entry) {
                return Err(format!("stores.collections: {entry:?} is listed twice"));
            }
        }
        if self.collections.len() >= usize::from(u16::MAX) {
            return Err("stores.collections: too many entries".into());
        }
        if self.resurrection_window.is_zero() {
            return Err("stores.resurrection_window: must be greater than 0".into());
        }
        if self.max_documents == 0 {
            return Err("stores.max_documents: must be at least 1".into());
        }
        Ok(())
    }
}

/// Which store a namespace belongs to: an index into the configured entries,
/// or the one auto-detected store after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct StoreIndex(u16);

/// One store document, by a keyed hash of its namespace and `_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DocKey(u64);

impl DocKey {
    /// The form shown in evidence (random per process, not reversible).
    pub(crate) fn fingerprint(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// What a statement does to one store document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOpKind {
    /// find / findOne by `_id`, or the document findAndModify returns.
    Read,
    /// delete by `_id`, findOneAndDelete (findAndModify `remove: true`).
    Destroy,
    /// update / replace / findAndModify by `_id` with `upsert: true`.
    Upsert,
    /// update / replace by `_id` without upsert (other than a touch).
    Update,
    /// An update by `_id` without upsert that only `$set`s the expiry.
    Touch,
    /// insert of a document with an `_id`.
    Insert,
}

impl StoreOpKind {
    /// A write that (re)creates the document when it is missing.
    fn creates(self) -> bool {
        matches!(self, StoreOpKind::Upsert | StoreOpKind::Insert)
    }
}

/// One operation on one store document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreOp {
    pub store: StoreIndex,
    pub document: DocKey,
    pub kind: StoreOpKind,
}

/// A resurrection: the writer read the document, someone destroyed it, the
/// writer's upsert brings it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resurrection {
    pub store: StoreIndex,
    pub document: DocKey,
    pub read: RequestRef,
    pub destroy: RequestRef,
    pub write: RequestRef,
    /// The destroy's reply never came: it most likely, not certainly, happened.
    pub unconfirmed: bool,
}

/// Per-store counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Upserts and inserts of a document nobody had read within the window
    /// (new sessions), or that was destroyed and is written by a client that
    /// had not read it.
    pub created: u64,
    /// Deletes by `_id` (logouts, kills, regenerates).
    pub destroyed: u64,
    pub touched: u64,
    /// Destroyed documents brought back by a client that read them before
    /// the destroy (counted whether or not the rule is enabled; a write that
    /// enforce rejected brought nothing back and is counted only as a
    /// violation).
    pub resurrected: u64,
}

/// What the tracker holds, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Every store label (configured entries, then `auto`) with its counts.
    pub stores: Vec<(String, StoreCounts)>,
    pub documents: usize,
    pub evicted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    created: AtomicU64,
    destroyed: AtomicU64,
    touched: AtomicU64,
    resurrected: AtomicU64,
}

/// A configured entry, split once.
#[derive(Debug)]
struct Configured {
    db: Option<String>,
    collection: String,
}

/// What is remembered about one store document.
#[derive(Debug, Clone, Default)]
struct DocRecord {
    /// The last read per client (most recent first), since the last destroy.
    readers: [Option<RequestRef>; READERS_PER_DOCUMENT],
    destroyed: Option<Destroyed>,
    last_written: Option<RequestRef>,
    touched: Option<RequestRef>,
    last_activity: Millis,
    /// Position in the activity queue (stale queue entries are skipped).
    seq: u64,
}

#[derive(Debug, Clone)]
struct Destroyed {
    by: RequestRef,
    /// The server answered the delete ok:1 (else its reply never came).
    confirmed: bool,
    /// The readers as they stood when the document was destroyed: the copies
    /// that may still be saved back.
    readers_before: [Option<RequestRef>; READERS_PER_DOCUMENT],
}

fn remember(readers: &mut [Option<RequestRef>; READERS_PER_DOCUMENT], read: RequestRef) {
    let same = readers
        .iter()
        .position(|r| r.is_some_and(|r| r.client == read.client))
        .unwrap_or(READERS_PER_DOCUMENT - 1);
    readers[..=same].rotate_right(1);
    readers[0] = Some(read);
}

#[derive(Debug, Default)]
struct Documents {
    // Keys are already seeded hashes: foldhash, like the engine's other maps.
    records: HashMap<DocKey, DocRecord, RandomState>,
    /// (document, seq) in order of activity, oldest first.
    activity: VecDeque<(DocKey, u64)>,
    next_seq: u64,
}

/// The store side of the engine: recognition, records, the rule.
#[derive(Debug)]
pub(crate) struct StoreTracker {
    config: StoreConfig,
    configured: Vec<Configured>,
    labels: Vec<String>,
    counters: Vec<Counters>,
    learned: RwLock<Vec<(String, String)>>,
    any_learned: AtomicBool,
    hasher: RandomState,
    documents: Mutex<Documents>,
    evicted: AtomicU64,
    window: Millis,
}

impl Default for StoreTracker {
    fn default() -> Self {
        StoreTracker::new(&StoreConfig::default())
    }
}

impl StoreTracker {
    /// A tracker for a validated configuration.
    pub(crate) fn new(config: &StoreConfig) -> StoreTracker {
        let configured: Vec<Configured> = config
            .collections
            .iter()
            .map(|entry| match entry.split_once('.') {
                Some((db, collection)) => Configured {
                    db: Some(db.to_string()),
                    collection: collection.to_string(),
                },
                None => Configured {
                    db: None,
                    collection: entry.clone(),
                },
            })
            .collect();
        let mut labels = config.collections.clone();
        labels.push(AUTO_STORE_LABEL.to_string());
        StoreTracker {
            config: config.clone(),
            configured,
            counters: labels.iter().map(|_| Counters::default()).collect(),
            labels,
            learned: RwLock::new(Vec::new()),
            any_learned: AtomicBool::new(false),
            hasher: RandomState::default(),
            documents: Mutex::new(Documents::default()),
            evicted: AtomicU64::new(0),
            window: millis(config.resurrection_window),
        }
    }

    /// The label of a store (configured entry, or `auto`).
    pub(crate) fn label(&self, store: StoreIndex) -> &str {
        self.labels
            .get(usize::from(store.0))
            .map_or(AUTO_STORE_LABEL, String::as_str)
    }

    /// Every label, in metrics order.
    #[cfg(test)]
    pub(crate) fn labels(&self) -> &[String] {
        &self.labels
    }

    fn auto_index(&self) -> StoreIndex {
        // validate() bounds the entries below u16::MAX.
        StoreIndex(u16::try_from(self.configured.len()).unwrap_or(u16::MAX))
    }

    /// The store `db.collection` belongs to, if any.
    pub(crate) fn store_of(&self, db: &str, collection: &str) -> Option<StoreIndex> {
        let configured = self
            .configured
            .iter()
            .position(|c| c.collection == collection && c.db.as_deref().is_none_or(|d| d == db));
        if let Some(index) = configured {
            return u16::try_from(index).ok().map(StoreIndex);
        }
        if self.any_learned.load(Ordering::Relaxed) {
            let learned = self.learned.read().unwrap_or_else(|p| p.into_inner());
            if learned.iter().any(|(d, c)| d == db && c == collection) {
                return Some(self.auto_index());
            }
        }
        None
    }

    fn learn(&self, db: &str, collection: &str) -> Option<StoreIndex> {
        let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
        if !learned.iter().any(|(d, c)| d == db && c == collection) {
            if learned.len() >= MAX_AUTO_NAMESPACES {
                return None;
            }
            learned.push((db.to_string(), collection.to_string()));
            self.any_learned.store(true, Ordering::Relaxed);
        }
        Some(self.auto_index())
    }

    fn key(&self, db: &str, collection: &str, id: RawBsonRef<'_>) -> Option<DocKey> {
        let mut hasher = self.hasher.build_hasher();
        db.hash(&mut hasher);
        collection.hash(&mut hasher);
        hash_id(id, &mut hasher)?;
        Some(DocKey(hasher.finish()))
    }

    /// The store operations of a request (empty for everything else, without
    /// allocating).
    pub(crate) fn classify(&self, view: &RequestView<'_>) -> Vec<StoreOp> {
        let (Some(db), Some(collection)) = (view.db, view.collection()) else {
            return Vec::new();
        };
        let name = view.name;
        if !matches!(
            name,
            "find" | "update" | "delete" | "insert" | "findAndModify" | "findandmodify"
        ) {
            return Vec::new();
        }
        let mut store = self.store_of(db, collection);
        if store.is_none() && self.config.auto_detect && looks_like_store_write(view) {
            store = self.learn(db, collection);
        }
        let Some(store) = store else {
            return Vec::new();
        };
        let mut ops = Vec::new();
        let mut push = |id: Option<RawBsonRef<'_>>, kind: StoreOpKind| {
            if let Some(document) = id.and_then(|id| self.key(db, collection, id)) {
                ops.push(StoreOp {
                    store,
                    document,
                    kind,
                });
            }
        };
        let body = view.body();
        match name {
            "find" => push(
                subdocument(body, "filter").and_then(id_equality),
                StoreOpKind::Read,
            ),
            "delete" => {
                for statement in view.statements("deletes") {
                    push(
                        subdocument(statement, "q").and_then(id_equality),
                        StoreOpKind::Destroy,
                    );
                }
            }
            "update" => {
                for statement in view.statements("updates") {
                    let id = subdocument(statement, "q").and_then(id_equality);
                    push(id, update_kind(statement, "u"));
                }
            }
            "insert" => {
                for document in view.statements("documents") {
                    push(document.get("_id").ok().flatten(), StoreOpKind::Insert);
                }
            }
            _ => {
                // findAndModify: an atomic read-modify-write; the caller holds
                // the returned document afterwards, as after a read.
                let id = subdocument(body, "query").and_then(id_equality);
                if truthy(body, "remove") {
                    push(id, StoreOpKind::Destroy);
                } else {
                    push(id, update_kind(body, "update"));
                    push(id, StoreOpKind::Read);
                }
            }
        }
        ops
    }

    /// The resurrection `ops` would commit, if any (read-only: the engine
    /// decides whether the request is forwarded before anything changes).
    pub(crate) fn check(&self, ops: &[StoreOp], request: &RequestRef) -> Option<Resurrection> {
        let documents = self.documents.lock().unwrap_or_else(|p| p.into_inner());
        ops.iter().find_map(|op| {
            let record = documents.records.get(&op.document)?;
            self.resurrection(op, record, request)
        })
    }

    fn resurrection(
        &self,
        op: &StoreOp,
        record: &DocRecord,
        write: &RequestRef,
    ) -> Option<Resurrection> {
        if !op.kind.creates() {
            return None;
        }
        let destroyed = record.destroyed.as_ref()?;
        let read = destroyed.readers_before.iter().flatten().find(|read| {
            (read.client == write.client && write.client != ClientId::UNKNOWN
                || read.conn == write.conn)
                && read.at <= destroyed.by.at
                && write.at.saturating_sub(read.at) <= self.window
        })?;
        Some(Resurrection {
            store: op.store,
            document: op.document,
            read: *read,
            destroy: destroyed.by,
            write: *write,
            unconfirmed: !destroyed.confirmed,
        })
    }

    /// Records what a forwarded request did, except its destroys, which
    /// take hold only when the server confirms them: they are handed back
    /// (empty, unallocated, for every other request) for `settle_destroys`.
    #[must_use = "destroys take hold only when settled"]
    pub(crate) fn apply(&self, ops: &[StoreOp], request: &RequestRef) -> Vec<StoreOp> {
        if ops.is_empty() {
            return Vec::new();
        }
        let now = request.at;
        let mut held = Vec::new();
        let mut documents = self.documents.lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut documents, now);
        for op in ops {
            let counters = &self.counters[usize::from(op.store.0).min(self.counters.len() - 1)];
            let exists = documents.records.contains_key(&op.document);
            match op.kind {
                StoreOpKind::Destroy => {
                    held.push(*op);
                    continue;
                }
                StoreOpKind::Touch => {
                    counters.touched.fetch_add(1, Ordering::Relaxed);
                    if let Some(record) = documents.records.get_mut(&op.document) {
                        record.touched = Some(*request);
                    }
                }
                StoreOpKind::Update => {
                    if let Some(record) = documents.records.get_mut(&op.document) {
                        record.last_written = Some(*request);
                    }
                }
                StoreOpKind::Read => {
                    let record = self.entry(&mut documents, op.document, exists);
                    remember(&mut record.readers, *request);
                }
                StoreOpKind::Upsert | StoreOpKind::Insert => {
                    let resurrected = documents
                        .records
                        .get(&op.document)
                        .and_then(|record| self.resurrection(op, record, request));
                    let record = self.entry(&mut documents, op.document, exists);
                    let fresh = record.readers.iter().all(Option::is_none);
                    if resurrected.is_some() {
                        counters.resurrected.fetch_add(1, Ordering::Relaxed);
                    } else if fresh || record.destroyed.is_some() {
                        counters.created.fetch_add(1, Ordering::Relaxed);
                    }
                    // The document exists again: the copies read before the
                    // destroy are now copies of a live document.
                    if let Some(destroyed) = record.destroyed.take() {
                        for read in destroyed.readers_before.into_iter().flatten().rev() {
                            remember(&mut record.readers, read);
                        }
                    }
                    record.last_written = Some(*request);
                }
            }
            self.touch_activity(&mut documents, op.document, now);
        }
        held
    }

    /// Records the destroys `apply` handed back, once they happened:
    /// `confirmed` when the server answered ok:1, not when its reply never
    /// came (they most likely happened). Refused destroys are never settled.
    pub(crate) fn settle_destroys(
        &self,
        ops: &[StoreOp],
        by: &RequestRef,
        confirmed: bool,
        now: Millis,
    ) {
        let mut documents = self.documents.lock().unwrap_or_else(|p| p.into_inner());
        for op in ops {
            let counters = &self.counters[usize::from(op.store.0).min(self.counters.len() - 1)];
            counters.destroyed.fetch_add(1, Ordering::Relaxed);
            // Without a record nobody read it within the window: no copy
            // can be saved back.
            if let Some(record) = documents.records.get_mut(&op.document) {
                record.destroyed = Some(Destroyed {
                    by: *by,
                    confirmed,
                    readers_before: std::mem::take(&mut record.readers),
                });
            }
            self.touch_activity(&mut documents, op.document, now);
        }
    }

    /// The record of `document`, created (evicting the least recently active
    /// one at the bound) when missing.
    fn entry<'d>(
        &self,
        documents: &'d mut Documents,
        document: DocKey,
        exists: bool,
    ) -> &'d mut DocRecord {
        if !exists && documents.records.len() >= self.config.max_documents {
            while let Some((key, seq)) = documents.activity.pop_front() {
                if documents.records.get(&key).is_some_and(|r| r.seq == seq) {
                    documents.records.remove(&key);
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        documents.records.entry(document).or_default()
    }

    fn touch_activity(&self, documents: &mut Documents, document: DocKey, now: Millis) {
        documents.next_seq += 1;
        let seq = documents.next_seq;
        if let Some(record) = documents.records.get_mut(&document) {
            record.seq = seq;
            record.last_activity = now;
            documents.activity.push_back((document, seq));
        }
        // Repeated activity on the same documents leaves stale entries behind;
        // rebuild the queue before it outgrows the records.
        if documents.activity.len() > 2 * documents.records.len() + 64 {
            let mut live: Vec<(u64, DocKey)> = documents
                .records
                .iter()
                .map(|(key, record)| (record.seq, *key))
                .collect();
            live.sort_unstable_by_key(|(seq, _)| *seq);
            documents.activity = live.into_iter().map(|(seq, key)| (key, seq)).collect();
        }
    }

    /// Drops records idle longer than the window: a read that old cannot be
    /// part of a resurrection any more.
    fn expire(&self, documents: &mut Documents, now: Millis) {
        while let Some(&(key, seq)) = documents.activity.front() {
            match documents.records.get(&key) {
                Some(record) if record.seq == seq => {
                    if now.saturating_sub(record.last_activity) <= self.window {
                        break;
                    }
                    documents.records.remove(&key);
                }
                _ => {}
            }
            documents.activity.pop_front();
        }
    }

    /// Counters and sizes, for metrics.
    pub(crate) fn stats(&self) -> StoreStats {
        let documents = self
            .documents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .records
            .len();
        StoreStats {
            stores: self
                .labels
                .iter()
                .zip(&self.counters)
                .map(|(label, c)| {
                    (
                        label.clone(),
                        StoreCounts {
                            created: c.created.load(Ordering::Relaxed),
                            destroyed: c.destroyed.load(Ordering::Relaxed),
                            touched: c.touched.load(Ordering::Relaxed),
                            resurrected: c.resurrected.load(Ordering::Relaxed),
                        },
                    )
                })
                .collect(),
            documents,
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }

    /// What is remembered about a document (tests).
    #[cfg(test)]
    fn record(&self, document: DocKey) -> Option<DocRecord> {
        self.documents
            .lock()
            .unwrap()
            .records
            .get(&document)
            .cloned()
    }
}

fn subdocument<'a>(doc: &'a RawDocument, key: &str) -> Option<&'a RawDocument> {
    doc.get(key)
        .ok()
        .flatten()
        .and_then(RawBsonRef::as_document)
}

fn truthy(doc: &RawDocument, key: &str) -> bool {
    match doc.get(key).ok().flatten() {
        Some(RawBsonRef::Boolean(b)) => b,
        Some(value) => sessionguard_protocol::command::as_integer(value).is_some_and(|n| n != 0),
        None => false,
    }
}

/// The `_id` a filter selects by equality: `{_id: X}`, `{_id: {$eq: X}}`, at
/// the top level or inside `$and` (connect-mongo's get adds an `$or` on
/// `expires` next to `_id`). Operator documents other than `$eq` (`$in`,
/// `$gt`, ...) select by something else and yield nothing.
fn id_equality(filter: &RawDocument) -> Option<RawBsonRef<'_>> {
    for element in filter.iter_elements() {
        let Ok(element) = element else { return None };
        match element.key() {
            "_id" => {
                let value = element.value().ok()?;
                let RawBsonRef::Document(doc) = value else {
                    return Some(value);
                };
                let first = doc.iter_elements().next();
                let Some(Ok(first)) = first else {
                    return Some(value);
                };
                if !first.key().starts_with('$') {
                    return Some(value);
                }
                return (first.key() == "$eq" && doc.iter_elements().count() == 1)
                    .then(|| first.value().ok())
                    .flatten();
            }
            "$and" => {
                let array = element.value().ok()?.as_array()?;
                let found = array
                    .into_iter()
                    .filter_map(|v| v.ok().and_then(RawBsonRef::as_document))
                    .find_map(id_equality);
                if found.is_some() {
                    return found;
                }
            }
            _ => {}
        }
    }
    None
}

/// Hashes an `_id` value so that values the server considers equal hash the
/// same for the types ids use (numbers compare across int32 / int64).
fn hash_id(id: RawBsonRef<'_>, hasher: &mut impl Hasher) -> Option<()> {
    match id {
        RawBsonRef::String(s) => {
            hasher.write_u8(2);
            hasher.write(s.as_bytes());
        }
        RawBsonRef::ObjectId(oid) => {
            hasher.write_u8(7);
            hasher.write(&oid.bytes());
        }
        RawBsonRef::Int32(n) => {
            hasher.write_u8(18);
            hasher.write_i64(i64::from(n));
        }
        RawBsonRef::Int64(n) => {
            hasher.write_u8(18);
            hasher.write_i64(n);
        }
        RawBsonRef::Binary(binary) => {
            hasher.write_u8(5);
            hasher.write_u8(u8::from(binary.subtype));
            hasher.write(binary.bytes);
        }
        RawBsonRef::Document(doc) => {
            hasher.write_u8(3);
            hasher.write(doc.as_bytes());
        }
        _ => return None,
    }
    Some(())
}

/// What an update statement (`{q, u, upsert}`) or findAndModify (`update`,
/// `upsert`) does to the document it selects.
fn update_kind(statement: &RawDocument, update_key: &str) -> StoreOpKind {
    if truthy(statement, "upsert") {
        return StoreOpKind::Upsert;
    }
    let touch = subdocument(statement, update_key).is_some_and(|update| {
        let mut keys = update.iter_elements();
        let only_set =
            matches!(keys.next(), Some(Ok(e)) if e.key() == "$set") && keys.next().is_none();
        only_set
            && subdocument(update, "$set").is_some_and(|set| {
                let mut has_expiry = false;
                let all_touch = set.iter_elements().all(|e| {
                    e.is_ok_and(|e| {
                        has_expiry |= e.key() == "expires";
                        TOUCH_FIELDS.contains(&e.key())
                    })
                });
                all_touch && has_expiry
            })
    });
    if touch {
        StoreOpKind::Touch
    } else {
        StoreOpKind::Update
    }
}

/// The common store document: a string `_id`, an `expires` date, a `session`
/// field.
fn session_shaped(doc: &RawDocument, id: Option<RawBsonRef<'_>>) -> bool {
    let id = id.or_else(|| doc.get("_id").ok().flatten());
    matches!(id, Some(RawBsonRef::String(_)))
        && matches!(
            doc.get("expires").ok().flatten(),
            Some(RawBsonRef::DateTime(_))
        )
        && doc.get("session").ok().flatten().is_some()
}

/// An upsert (replacement or `$set`) or insert writing the common shape.
fn looks_like_store_write(view: &RequestView<'_>) -> bool {
    match view.name {
        "update" => view.statements("updates").any(|statement| {
            if !truthy(statement, "upsert") {
                return false;
            }
            let id = subdocument(statement, "q").and_then(id_equality);
            let Some(update) = subdocument(statement, "u") else {
                return false;
            };
            let written = subdocument(update, "$set").unwrap_or(update);
            session_shaped(written, id)
        }),
        "insert" => view
            .statements("documents")
            .any(|document| session_shaped(document, None)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Sym;
    use bson::{rawdoc, DateTime, RawDocumentBuf};
    use sessionguard_protocol::wire::op_msg::encode;
    use sessionguard_protocol::wire::{Message, MsgFlags, OpMsg, HEADER_LEN};

    const APP: ClientId = ClientId(1);
    const ADMIN: ClientId = ClientId(2);
    const OTHER_APP: ClientId = ClientId(3);

    fn request(conn: u64, client: ClientId, at: Millis) -> RequestRef {
        RequestRef {
            conn,
            at,
            txn_number: None,
            request_id: i32::try_from(at).unwrap_or(0),
            client,
            command: Sym(0),
            namespace: Sym(0),
        }
    }

    fn ops(tracker: &StoreTracker, doc: &RawDocumentBuf) -> Vec<StoreOp> {
        let frame = encode(1, 0, MsgFlags(0), doc.as_bytes());
        let msg = OpMsg::parse(&frame[..HEADER_LEN], &frame[HEADER_LEN..]).unwrap();
        let message = Message::Msg(msg);
        let view = RequestView::from_message(&message).unwrap();
        tracker.classify(&view)
    }

    /// Runs a command through the tracker as the engine does; returns the
    /// resurrection it raised.
    fn run(
        tracker: &StoreTracker,
        doc: &RawDocumentBuf,
        request: RequestRef,
    ) -> Option<Resurrection> {
        let ops = ops(tracker, doc);
        let found = tracker.check(&ops, &request);
        let destroys = tracker.apply(&ops, &request);
        // Answered ok:1.
        tracker.settle_destroys(&destroys, &request, true, request.at);
        found
    }

    // connect-mongo 5's shapes (MongoStore.js get / set / touch / destroy).
    fn get(sid: &str) -> RawDocumentBuf {
        rawdoc! {
            "find": "sessions",
            "filter": { "_id": sid, "$or": [ { "expires": { "$exists": false } }, { "expires": { "$gt": DateTime::now() } } ] },
            "limit": 1, "singleBatch": true, "batchSize": 1, "$db": "app",
        }
    }
    fn set(sid: &str) -> RawDocumentBuf {
        rawdoc! {
            "update": "sessions",
            "updates": [ { "q": { "_id": sid }, "u": { "$set": { "_id": sid, "session": "{\"cookie\":{}}", "expires": DateTime::now() } }, "upsert": true } ],
            "ordered": true, "$db": "app",
        }
    }
    fn touch(sid: &str) -> RawDocumentBuf {
        rawdoc! {
            "update": "sessions",
            "updates": [ { "q": { "_id": sid }, "u": { "$set": { "expires": DateTime::now() } } } ],
            "ordered": true, "$db": "app",
        }
    }
    fn destroy(sid: &str) -> RawDocumentBuf {
        rawdoc! { "delete": "sessions", "deletes": [ { "q": { "_id": sid }, "limit": 1 } ], "ordered": true, "$db": "app" }
    }

    fn counts(tracker: &StoreTracker, label: &str) -> StoreCounts {
        tracker
            .stats()
            .stores
            .into_iter()
            .find(|(l, _)| l == label)
            .unwrap()
            .1
    }

    #[test]
    fn connect_mongo_shapes_are_recognised() {
        let tracker = StoreTracker::default();
        let kinds = |doc: &RawDocumentBuf| -> Vec<StoreOpKind> {
            ops(&tracker, doc).iter().map(|op| op.kind).collect()
        };
        assert_eq!(kinds(&get("a")), [StoreOpKind::Read]);
        assert_eq!(kinds(&set("a")), [StoreOpKind::Upsert]);
        assert_eq!(kinds(&touch("a")), [StoreOpKind::Touch]);
        assert_eq!(kinds(&destroy("a")), [StoreOpKind::Destroy]);
        // All four address the same document; another id is another one.
        let docs: Vec<DocKey> = [get("a"), set("a"), touch("a"), destroy("a")]
            .iter()
            .map(|d| ops(&tracker, d)[0].document)
            .collect();
        assert!(docs.iter().all(|d| *d == docs[0]));
        assert_ne!(ops(&tracker, &get("b"))[0].document, docs[0]);
        // The same id in another database is another document.
        let other_db = rawdoc! { "find": "sessions", "filter": { "_id": "a" }, "$db": "other" };
        assert_ne!(ops(&tracker, &other_db)[0].document, docs[0]);
    }

    #[test]
    fn other_shapes_by_id_and_what_is_not_a_store_operation() {
        let tracker = StoreTracker::new(&StoreConfig {
            collections: vec!["app.sessions".into(), "web_sessions".into()],
            auto_detect: false,
            ..StoreConfig::default()
        });
        let kinds = |doc: RawDocumentBuf| -> Vec<(u16, StoreOpKind)> {
            ops(&tracker, &doc)
                .iter()
                .map(|op| (op.store.0, op.kind))
                .collect()
        };
        use StoreOpKind::*;
        assert_eq!(
            kinds(
                rawdoc! { "find": "sessions", "filter": { "$and": [ { "_id": { "$eq": "x" } }, { "expires": { "$gt": 1 } } ] }, "$db": "app" }
            ),
            [(0, Read)]
        );
        assert_eq!(
            kinds(
                rawdoc! { "findAndModify": "web_sessions", "query": { "_id": "x" }, "remove": true, "$db": "any" }
            ),
            [(1, Destroy)]
        );
        assert_eq!(
            kinds(
                rawdoc! { "findAndModify": "web_sessions", "query": { "_id": "x" }, "update": { "session": "s" }, "upsert": true, "$db": "any" }
            ),
            [(1, Upsert), (1, Read)]
        );
        assert_eq!(
            kinds(
                rawdoc! { "update": "sessions", "updates": [ { "q": { "_id": "x" }, "u": { "_id": "x", "session": "s" } }, { "q": { "_id": "y" }, "u": { "$set": { "expires": 1, "lastModified": 2 } } } ], "$db": "app" }
            ),
            [(0, Update), (0, Touch)]
        );
        assert_eq!(
            kinds(
                rawdoc! { "insert": "sessions", "documents": [ { "_id": "x" }, { "no_id": 1 } ], "$db": "app" }
            ),
            [(0, Insert)]
        );
        // Not by _id equality, not a store, not a store command.
        assert!(kinds(
            rawdoc! { "find": "sessions", "filter": { "_id": { "$in": ["x"] } }, "$db": "app" }
        )
        .is_empty());
        assert!(
            kinds(rawdoc! { "find": "sessions", "filter": { "user": "x" }, "$db": "app" })
                .is_empty()
        );
        assert!(
            kinds(rawdoc! { "find": "sessions", "filter": { "_id": "x" }, "$db": "other" })
                .is_empty()
        );
        assert!(
            kinds(rawdoc! { "find": "orders", "filter": { "_id": "x" }, "$db": "app" }).is_empty()
        );
        assert!(
            kinds(rawdoc! { "aggregate": "sessions", "pipeline": [], "$db": "app" }).is_empty()
        );
        // auto_detect off: the shape alone does not make a store.
        assert!(kinds(set_in("carts")).is_empty());
    }

    fn set_in(collection: &str) -> RawDocumentBuf {
        rawdoc! {
            "update": collection,
            "updates": [ { "q": { "_id": "z" }, "u": { "$set": { "_id": "z", "session": "{}", "expires": DateTime::now() } }, "upsert": true } ],
            "$db": "shop",
        }
    }

    #[test]
    fn auto_detection_learns_the_common_shape_under_the_auto_label() {
        let tracker = StoreTracker::default();
        let read = rawdoc! { "find": "web_sess", "filter": { "_id": "z" }, "$db": "shop" };
        assert!(
            ops(&tracker, &read).is_empty(),
            "unknown until a store write is seen"
        );
        // Not the shape: a numeric _id, no expires date.
        let not_shaped = rawdoc! {
            "update": "web_sess",
            "updates": [ { "q": { "_id": 1 }, "u": { "$set": { "session": "{}", "expires": 5 } }, "upsert": true } ],
            "$db": "shop",
        };
        assert!(ops(&tracker, &not_shaped).is_empty());
        let learned = ops(&tracker, &set_in("web_sess"));
        assert_eq!(learned.len(), 1);
        assert_eq!(tracker.label(learned[0].store), AUTO_STORE_LABEL);
        assert_eq!(ops(&tracker, &read).len(), 1);
        let insert = rawdoc! { "insert": "carts", "documents": [ { "_id": "q", "expires": DateTime::now(), "session": {} } ], "$db": "shop" };
        assert_eq!(ops(&tracker, &insert).len(), 1);
        assert_eq!(tracker.labels(), ["sessions", "auto"]);
    }

    #[test]
    fn read_destroy_upsert_by_the_reader_is_a_resurrection_with_three_operations() {
        let tracker = StoreTracker::default();
        assert_eq!(run(&tracker, &set("s1"), request(1, APP, 0)), None);
        let read = request(1, APP, 1_000);
        assert_eq!(run(&tracker, &get("s1"), read), None);
        let destroy_req = request(9, ADMIN, 1_200);
        assert_eq!(run(&tracker, &destroy("s1"), destroy_req), None);
        // The slow request saves on another pooled connection of the same client.
        let write = request(2, APP, 1_500);
        let found = run(&tracker, &set("s1"), write).expect("resurrection");
        assert_eq!(found.read, read);
        assert_eq!(found.destroy, destroy_req);
        assert_eq!(found.write, write);
        assert_eq!(tracker.label(found.store), "sessions");
        let c = counts(&tracker, "sessions");
        assert_eq!((c.created, c.destroyed, c.resurrected), (1, 1, 1));
        // Reported once: the document is alive again.
        assert_eq!(run(&tracker, &set("s1"), request(2, APP, 1_600)), None);
        assert_eq!(counts(&tracker, "sessions").resurrected, 1);
    }

    #[test]
    fn the_logouts_own_read_counts_and_a_read_after_the_destroy_does_not_clear_it() {
        // express-session: the slow request and the logout are the same app
        // (one client); the logout reads then destroys. Another request with
        // the old cookie reads nothing afterwards. The slow save still
        // resurrects.
        let tracker = StoreTracker::default();
        run(&tracker, &set("s"), request(1, APP, 0));
        run(&tracker, &get("s"), request(1, APP, 100));
        run(&tracker, &get("s"), request(2, APP, 200));
        run(&tracker, &destroy("s"), request(2, APP, 210));
        run(&tracker, &get("s"), request(3, APP, 300));
        let found = run(&tracker, &set("s"), request(1, APP, 500)).expect("resurrection");
        assert_eq!(
            found.read.at, 200,
            "the client's last read before the destroy"
        );
        assert_eq!(found.destroy.at, 210);
    }

    #[test]
    fn no_false_positives() {
        let tracker = StoreTracker::default();
        // A fresh session, then normal use: reads, touches, saves.
        assert_eq!(run(&tracker, &set("fresh"), request(1, APP, 0)), None);
        for at in [10, 20, 30] {
            assert_eq!(run(&tracker, &get("fresh"), request(1, APP, at)), None);
            assert_eq!(
                run(&tracker, &touch("fresh"), request(2, APP, at + 1)),
                None
            );
            assert_eq!(run(&tracker, &set("fresh"), request(2, APP, at + 2)), None);
        }
        // Regenerate / login after logout: the old id is destroyed, a new id
        // is saved.
        run(&tracker, &get("fresh"), request(1, APP, 40));
        run(&tracker, &destroy("fresh"), request(1, APP, 41));
        assert_eq!(run(&tracker, &set("new-id"), request(1, APP, 42)), None);
        // A destroyed session read again: nothing there, nothing saved under
        // it; a touch of it (connect-mongo's failed touch) is no upsert.
        assert_eq!(run(&tracker, &get("fresh"), request(2, APP, 50)), None);
        assert_eq!(run(&tracker, &touch("fresh"), request(1, APP, 60)), None);
        // Another client that never read it may write the id (not a stale copy).
        assert_eq!(
            run(&tracker, &set("fresh"), request(7, OTHER_APP, 70)),
            None
        );
        // A destroy of an id nobody read (regenerate of an unsaved session).
        assert_eq!(
            run(&tracker, &destroy("never-saved"), request(1, APP, 80)),
            None
        );
        assert_eq!(
            run(&tracker, &set("never-saved"), request(1, APP, 81)),
            None
        );
        let c = counts(&tracker, "sessions");
        assert_eq!(c.resurrected, 0);
        assert_eq!(c.touched, 4);
        assert_eq!(c.destroyed, 2);
        // fresh, new-id, fresh again (by a non-reader), never-saved.
        assert_eq!(c.created, 4);
    }

    #[test]
    fn the_window_bounds_the_read_to_write_span() {
        let tracker = StoreTracker::new(&StoreConfig {
            resurrection_window: Duration::from_secs(60),
            ..StoreConfig::default()
        });
        run(&tracker, &get("s"), request(1, APP, 0));
        run(&tracker, &destroy("s"), request(2, ADMIN, 30_000));
        assert_eq!(run(&tracker, &set("s"), request(1, APP, 60_001)), None);
        run(&tracker, &get("t"), request(1, APP, 100_000));
        run(&tracker, &destroy("t"), request(2, ADMIN, 130_000));
        assert!(run(&tracker, &set("t"), request(1, APP, 160_000)).is_some());
    }

    #[test]
    fn check_changes_nothing_so_a_rejected_write_leaves_the_document_destroyed() {
        let tracker = StoreTracker::default();
        run(&tracker, &get("s"), request(1, APP, 0));
        run(&tracker, &destroy("s"), request(2, ADMIN, 10));
        let write_ops = ops(&tracker, &set("s"));
        // Enforce: checked, rejected, never applied; a retry is caught again.
        assert!(tracker.check(&write_ops, &request(1, APP, 20)).is_some());
        assert!(tracker.check(&write_ops, &request(1, APP, 30)).is_some());
        let record = tracker.record(write_ops[0].document).unwrap();
        assert!(record.destroyed.is_some());
        assert_eq!(counts(&tracker, "sessions").resurrected, 0);
    }

    #[test]
    fn records_are_bounded_and_expire_after_the_window() {
        let tracker = StoreTracker::new(&StoreConfig {
            max_documents: 3,
            resurrection_window: Duration::from_secs(1),
            ..StoreConfig::default()
        });
        for (n, sid) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            run(&tracker, &get(sid), request(1, APP, n as u64));
        }
        let stats = tracker.stats();
        assert_eq!(stats.documents, 3);
        assert_eq!(stats.evicted, 2);
        // The least recently active went first: "a" and "b".
        assert!(tracker
            .record(ops(&tracker, &get("a"))[0].document)
            .is_none());
        assert!(tracker
            .record(ops(&tracker, &get("e"))[0].document)
            .is_some());
        // Repeated activity on one document does not grow the queue forever.
        for at in 10..10_000 {
            run(&tracker, &get("e"), request(1, APP, at / 100));
        }
        assert!(tracker.documents.lock().unwrap().activity.len() <= 2 * 3 + 64 + 1);
        // Idle past the window: dropped (not counted as evicted).
        run(&tracker, &get("z"), request(1, APP, 5_000));
        let stats = tracker.stats();
        assert_eq!(stats.documents, 1);
        assert_eq!(stats.evicted, 2);
    }

    #[test]
    fn config_defaults_parse_and_validation() {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            stores: StoreConfig,
        }
        let file: File = toml::from_str("").unwrap();
        assert_eq!(file.stores, StoreConfig::default());
        assert_eq!(file.stores.collections, ["sessions"]);
        assert!(file.stores.validate().is_ok());
        let file: File = toml::from_str(
            "[stores]\ncollections = [\"app.sessions\", \"web\"]\nauto_detect = false\nresurrection_window = \"90s\"\nmax_documents = 10\n",
        )
        .unwrap();
        assert_eq!(file.stores.resurrection_window, Duration::from_secs(90));
        assert!(!file.stores.auto_detect);
        assert!(toml::from_str::<File>("[stores]\ncolections = []\n").is_err());
        let invalid = |f: fn(&mut StoreConfig)| {
            let mut config = StoreConfig::default();
            f(&mut config);
            config.validate().unwrap_err()
        };
        assert!(invalid(|c| c.collections = vec!["app.".into()]).starts_with("stores.collections:"));
        assert!(invalid(|c| c.collections = vec!["auto".into()]).starts_with("stores.collections:"));
        assert!(invalid(|c| c.collections = vec!["a".into(), "a".into()]).contains("twice"));
        assert!(invalid(|c| c.resurrection_window = Duration::ZERO)
            .starts_with("stores.resurrection_window:"));
        assert!(invalid(|c| c.max_documents = 0).starts_with("stores.max_documents:"));
    }
}
