//! The in-memory data set: databases -> collections -> documents (kept in
//! insertion order) with a unique `_id` index and stored index specs, plus
//! the primitives a transaction's per-document undo needs (take a document by
//! `_id`, put one back at its old position). No sessions, no locks, no wire
//! protocol here: who may write what is decided in `server_sessions.rs`.

use std::collections::{BTreeMap, HashMap};

use bson::{doc, Bson, Document};

/// The `_id` value in a hashable form (its BSON encoding). Numerically equal
/// ids of different types (1 vs 1.0) are distinct here: a documented
/// simplification.
pub(crate) type DocId = Vec<u8>;

pub(crate) fn doc_id(id: &Bson) -> DocId {
    let mut bytes = Vec::new();
    // Serialising a one-field document cannot fail for any Bson value.
    let _ = doc! { "": id.clone() }.to_writer(&mut bytes);
    bytes
}

/// Position of a document in its collection (insertion order, never reused).
pub(crate) type Seq = u64;

#[derive(Debug, Default)]
pub(crate) struct Collection {
    docs: BTreeMap<Seq, Document>,
    by_id: HashMap<DocId, Seq>,
    next_seq: Seq,
    /// Index specs other than `_id_`, as given to createIndexes (plus `v`).
    pub indexes: Vec<Document>,
}

impl Collection {
    pub(crate) fn len(&self) -> usize {
        self.docs.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Seq, &Document)> {
        self.docs.iter().map(|(s, d)| (*s, d))
    }

    pub(crate) fn seq_of_id(&self, id: &Bson) -> Option<Seq> {
        self.by_id.get(&doc_id(id)).copied()
    }

    fn put(&mut self, seq: Seq, doc: Document) {
        if let Some(id) = doc.get("_id") {
            self.by_id.insert(doc_id(id), seq);
        }
        self.docs.insert(seq, doc);
    }

    fn take(&mut self, seq: Seq) -> Option<Document> {
        let doc = self.docs.remove(&seq)?;
        if let Some(id) = doc.get("_id") {
            self.by_id.remove(&doc_id(id));
        }
        Some(doc)
    }
}

/// Why an insert was refused.
#[derive(Debug)]
pub(crate) struct DuplicateId;

#[derive(Debug, Default)]
pub(crate) struct DataSet {
    dbs: BTreeMap<String, BTreeMap<String, Collection>>,
}

impl DataSet {
    pub(crate) fn collection(&self, db: &str, coll: &str) -> Option<&Collection> {
        self.dbs.get(db)?.get(coll)
    }

    /// Creates the collection if needed; returns whether it was created.
    pub(crate) fn ensure_collection(&mut self, db: &str, coll: &str) -> bool {
        let colls = self.dbs.entry(db.to_string()).or_default();
        if colls.contains_key(coll) {
            return false;
        }
        colls.insert(coll.to_string(), Collection::default());
        true
    }

    pub(crate) fn collection_mut(&mut self, db: &str, coll: &str) -> Option<&mut Collection> {
        self.dbs.get_mut(db)?.get_mut(coll)
    }

    /// The collection, created first if it does not exist.
    fn collection_or_create(&mut self, db: &str, coll: &str) -> &mut Collection {
        self.dbs
            .entry(db.to_string())
            .or_default()
            .entry(coll.to_string())
            .or_default()
    }

    pub(crate) fn collection_names(&self, db: &str) -> Vec<String> {
        self.dbs
            .get(db)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn database_names(&self) -> Vec<String> {
        self.dbs.keys().cloned().collect()
    }

    pub(crate) fn database_doc_count(&self, db: &str) -> usize {
        self.dbs
            .get(db)
            .map(|c| c.values().map(Collection::len).sum())
            .unwrap_or(0)
    }

    pub(crate) fn drop_collection(&mut self, db: &str, coll: &str) -> Option<Collection> {
        let colls = self.dbs.get_mut(db)?;
        let dropped = colls.remove(coll);
        if colls.is_empty() {
            self.dbs.remove(db);
        }
        dropped
    }

    pub(crate) fn drop_database(&mut self, db: &str) -> bool {
        self.dbs.remove(db).is_some()
    }

    /// Documents of a collection in insertion order (empty if it does not exist).
    pub(crate) fn scan(&self, db: &str, coll: &str) -> Vec<(Seq, Document)> {
        self.collection(db, coll)
            .map(|c| c.iter().map(|(s, d)| (s, d.clone())).collect())
            .unwrap_or_default()
    }

    /// Inserts `doc` (which must carry `_id`).
    pub(crate) fn insert(
        &mut self,
        db: &str,
        coll: &str,
        doc: Document,
    ) -> Result<Seq, DuplicateId> {
        let c = self.collection_or_create(db, coll);
        if let Some(id) = doc.get("_id") {
            if c.by_id.contains_key(&doc_id(id)) {
                return Err(DuplicateId);
            }
        }
        let seq = c.next_seq;
        c.next_seq += 1;
        c.put(seq, doc);
        Ok(seq)
    }

    /// Replaces the document at `seq` (same `_id`); returns the old one.
    pub(crate) fn replace(
        &mut self,
        db: &str,
        coll: &str,
        seq: Seq,
        doc: Document,
    ) -> Option<Document> {
        let c = self.collection_mut(db, coll)?;
        let old = c.take(seq)?;
        c.put(seq, doc);
        Some(old)
    }

    pub(crate) fn delete(&mut self, db: &str, coll: &str, seq: Seq) -> Option<Document> {
        self.collection_mut(db, coll)?.take(seq)
    }

    /// The document at `seq`, if any.
    pub(crate) fn get(&self, db: &str, coll: &str, seq: Seq) -> Option<&Document> {
        self.collection(db, coll)?.docs.get(&seq)
    }

    /// Removes whatever document currently has this `_id`.
    pub(crate) fn remove_id(
        &mut self,
        db: &str,
        coll: &str,
        id: &DocId,
    ) -> Option<(Seq, Document)> {
        let c = self.collection_mut(db, coll)?;
        let seq = c.by_id.get(id).copied()?;
        c.take(seq).map(|doc| (seq, doc))
    }

    /// Puts a document back at its old position (undo of a transaction's
    /// write). A collection dropped meanwhile is recreated.
    pub(crate) fn restore(&mut self, db: &str, coll: &str, seq: Seq, doc: Document) {
        let c = self.collection_or_create(db, coll);
        c.take(seq);
        c.put(seq, doc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_and_restore_keep_positions() {
        let mut store = DataSet::default();
        store.insert("d", "c", doc! { "_id": 1, "v": 1 }).unwrap();
        store.insert("d", "c", doc! { "_id": 2, "v": 2 }).unwrap();
        let old = store.replace("d", "c", 0, doc! { "_id": 1, "v": 10 });
        assert_eq!(old, Some(doc! { "_id": 1, "v": 1 }));
        assert!(store.insert("d", "c", doc! { "_id": 2 }).is_err());
        let (seq, removed) = store.remove_id("d", "c", &doc_id(&Bson::Int32(1))).unwrap();
        assert_eq!((seq, removed), (0, doc! { "_id": 1, "v": 10 }));
        store.restore("d", "c", 0, doc! { "_id": 1, "v": 1 });
        let docs: Vec<Document> = store.scan("d", "c").into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            docs,
            vec![doc! { "_id": 1, "v": 1 }, doc! { "_id": 2, "v": 2 }]
        );
        assert_eq!(store.get("d", "c", 1), Some(&doc! { "_id": 2, "v": 2 }));
    }
}
