//! The in-memory data set: databases -> collections -> documents (kept in
//! insertion order) with a unique `_id` index, stored index specs, and the
//! undo log that lets a transaction's writes be rolled back. No sessions,
//! no wire protocol here.

use std::collections::{BTreeMap, HashMap};

use bson::{doc, Bson, Document};

/// The `_id` value in a hashable form (its BSON encoding). Numerically equal
/// ids of different types (1 vs 1.0) are distinct here: a documented
/// simplification.
pub type IdKey = Vec<u8>;

pub fn id_key(id: &Bson) -> IdKey {
    let mut bytes = Vec::new();
    // Serialising a one-field document cannot fail for any Bson value.
    let _ = doc! { "": id.clone() }.to_writer(&mut bytes);
    bytes
}

/// Position of a document in its collection (insertion order, never reused).
pub type Seq = u64;

#[derive(Debug, Default)]
pub struct Collection {
    docs: BTreeMap<Seq, Document>,
    by_id: HashMap<IdKey, Seq>,
    next_seq: Seq,
    /// Index specs other than `_id_`, as given to createIndexes (plus `v`).
    pub indexes: Vec<Document>,
}

impl Collection {
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Seq, &Document)> {
        self.docs.iter().map(|(s, d)| (*s, d))
    }

    pub fn seq_of_id(&self, id: &Bson) -> Option<Seq> {
        self.by_id.get(&id_key(id)).copied()
    }

    fn put(&mut self, seq: Seq, doc: Document) {
        if let Some(id) = doc.get("_id") {
            self.by_id.insert(id_key(id), seq);
        }
        self.docs.insert(seq, doc);
    }

    fn take(&mut self, seq: Seq) -> Option<Document> {
        let doc = self.docs.remove(&seq)?;
        if let Some(id) = doc.get("_id") {
            self.by_id.remove(&id_key(id));
        }
        Some(doc)
    }
}

/// One write, recorded so an aborted transaction can be undone (newest first).
#[derive(Debug, Clone)]
pub enum Undo {
    Inserted {
        db: String,
        coll: String,
        seq: Seq,
    },
    Replaced {
        db: String,
        coll: String,
        seq: Seq,
        old: Document,
    },
    Deleted {
        db: String,
        coll: String,
        seq: Seq,
        old: Document,
    },
}

/// Why an insert was refused.
#[derive(Debug)]
pub struct DuplicateId;

#[derive(Debug, Default)]
pub struct Store {
    dbs: BTreeMap<String, BTreeMap<String, Collection>>,
}

impl Store {
    pub fn collection(&self, db: &str, coll: &str) -> Option<&Collection> {
        self.dbs.get(db)?.get(coll)
    }

    /// Creates the collection if needed; returns whether it was created.
    pub fn ensure_collection(&mut self, db: &str, coll: &str) -> bool {
        let colls = self.dbs.entry(db.to_string()).or_default();
        if colls.contains_key(coll) {
            return false;
        }
        colls.insert(coll.to_string(), Collection::default());
        true
    }

    pub fn collection_mut(&mut self, db: &str, coll: &str) -> Option<&mut Collection> {
        self.dbs.get_mut(db)?.get_mut(coll)
    }

    pub fn collection_names(&self, db: &str) -> Vec<String> {
        self.dbs
            .get(db)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn database_names(&self) -> Vec<String> {
        self.dbs.keys().cloned().collect()
    }

    pub fn database_doc_count(&self, db: &str) -> usize {
        self.dbs
            .get(db)
            .map(|c| c.values().map(Collection::len).sum())
            .unwrap_or(0)
    }

    pub fn drop_collection(&mut self, db: &str, coll: &str) -> Option<Collection> {
        let colls = self.dbs.get_mut(db)?;
        let dropped = colls.remove(coll);
        if colls.is_empty() {
            self.dbs.remove(db);
        }
        dropped
    }

    pub fn drop_database(&mut self, db: &str) -> bool {
        self.dbs.remove(db).is_some()
    }

    /// Documents of a collection in insertion order (empty if it does not exist).
    pub fn scan(&self, db: &str, coll: &str) -> Vec<(Seq, Document)> {
        self.collection(db, coll)
            .map(|c| c.iter().map(|(s, d)| (s, d.clone())).collect())
            .unwrap_or_default()
    }

    /// Inserts `doc` (which must carry `_id`), recording undo if asked.
    pub fn insert(
        &mut self,
        db: &str,
        coll: &str,
        doc: Document,
        undo: Option<&mut Vec<Undo>>,
    ) -> Result<Seq, DuplicateId> {
        self.ensure_collection(db, coll);
        let Some(c) = self.collection_mut(db, coll) else {
            return Err(DuplicateId);
        };
        if let Some(id) = doc.get("_id") {
            if c.by_id.contains_key(&id_key(id)) {
                return Err(DuplicateId);
            }
        }
        let seq = c.next_seq;
        c.next_seq += 1;
        c.put(seq, doc);
        if let Some(undo) = undo {
            undo.push(Undo::Inserted {
                db: db.to_string(),
                coll: coll.to_string(),
                seq,
            });
        }
        Ok(seq)
    }

    /// Replaces the document at `seq` (same `_id`), recording undo if asked.
    pub fn replace(
        &mut self,
        db: &str,
        coll: &str,
        seq: Seq,
        doc: Document,
        undo: Option<&mut Vec<Undo>>,
    ) {
        let Some(c) = self.collection_mut(db, coll) else {
            return;
        };
        let Some(old) = c.take(seq) else {
            return;
        };
        c.put(seq, doc);
        if let Some(undo) = undo {
            undo.push(Undo::Replaced {
                db: db.to_string(),
                coll: coll.to_string(),
                seq,
                old,
            });
        }
    }

    pub fn delete(
        &mut self,
        db: &str,
        coll: &str,
        seq: Seq,
        undo: Option<&mut Vec<Undo>>,
    ) -> Option<Document> {
        let old = self.collection_mut(db, coll)?.take(seq)?;
        if let Some(undo) = undo {
            undo.push(Undo::Deleted {
                db: db.to_string(),
                coll: coll.to_string(),
                seq,
                old: old.clone(),
            });
        }
        Some(old)
    }

    /// Rolls back a transaction's writes, newest first. A collection dropped
    /// meanwhile is recreated for restored documents.
    pub fn rollback(&mut self, undo: Vec<Undo>) {
        for entry in undo.into_iter().rev() {
            match entry {
                Undo::Inserted { db, coll, seq } => {
                    if let Some(c) = self.collection_mut(&db, &coll) {
                        c.take(seq);
                    }
                }
                Undo::Replaced { db, coll, seq, old } | Undo::Deleted { db, coll, seq, old } => {
                    self.ensure_collection(&db, &coll);
                    if let Some(c) = self.collection_mut(&db, &coll) {
                        c.take(seq);
                        c.put(seq, old);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_restores_every_kind_of_write() {
        let mut store = Store::default();
        store
            .insert("d", "c", doc! { "_id": 1, "v": 1 }, None)
            .unwrap();
        store
            .insert("d", "c", doc! { "_id": 2, "v": 2 }, None)
            .unwrap();
        let mut undo = Vec::new();
        store
            .insert("d", "c", doc! { "_id": 3 }, Some(&mut undo))
            .unwrap();
        store.replace("d", "c", 0, doc! { "_id": 1, "v": 10 }, Some(&mut undo));
        store.delete("d", "c", 1, Some(&mut undo));
        assert!(store.insert("d", "c", doc! { "_id": 3 }, None).is_err());
        store.rollback(undo);
        let docs: Vec<Document> = store.scan("d", "c").into_iter().map(|(_, d)| d).collect();
        assert_eq!(
            docs,
            vec![doc! { "_id": 1, "v": 1 }, doc! { "_id": 2, "v": 2 }]
        );
    }
}
