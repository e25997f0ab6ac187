//! The query language subset: filter matching, sort, projection and update
//! operators over `bson::Document`s. Pure functions; no storage, no sessions.
//!
//! Supported filters: equality (including whole-document and array-element
//! equality), `$eq $ne $in $nin $gt $gte $lt $lte $exists`, and `$and $or $nor`.
//! Field paths may be dotted ("a.b"). Comparisons follow the server's type
//! brackets: `$gt` and friends only match values of the same bracket, numbers
//! compare across int32/int64/double.

use std::cmp::Ordering;

use bson::{Bson, Document};

use super::errors::{CommandError, IMMUTABLE_FIELD};

/// The server's canonical type order (BSON comparison order).
fn type_rank(value: &Bson) -> u8 {
    match value {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) => 4,
        Bson::Array(_) => 5,
        Bson::Binary(_) => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Timestamp(_) => 10,
        Bson::RegularExpression(_) => 11,
        Bson::DbPointer(_) => 12,
        Bson::JavaScriptCode(_) => 13,
        Bson::JavaScriptCodeWithScope(_) => 14,
        Bson::MaxKey => 15,
    }
}

/// A BSON number as f64, for comparisons and arithmetic across number types.
pub(super) fn as_f64(value: &Bson) -> Option<f64> {
    match value {
        Bson::Int32(v) => Some(f64::from(*v)),
        // Precision loss above 2^53 is acceptable for an emulator.
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

/// A BSON number as i64, for integral command arguments (limit, batchSize,
/// txnNumber, maxTimeMS...), which shells may send as doubles (truncated).
pub(super) fn as_i64(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// Total order over BSON values as the server sorts them.
pub(crate) fn compare(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => x.cmp(y),
        (Bson::Int64(x), Bson::Int64(y)) => x.cmp(y),
        (Bson::Int32(x), Bson::Int64(y)) => i64::from(*x).cmp(y),
        (Bson::Int64(x), Bson::Int32(y)) => x.cmp(&i64::from(*y)),
        _ if ra == 2 => match (as_f64(a), as_f64(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            _ => Ordering::Equal,
        },
        (Bson::String(x), Bson::String(y)) => x.cmp(y),
        (Bson::Document(x), Bson::Document(y)) => compare_documents(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            for (ex, ey) in x.iter().zip(y.iter()) {
                let ord = compare(ex, ey);
                if ord != Ordering::Equal {
                    return ord;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then(u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then(x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            (x.time, x.increment).cmp(&(y.time, y.increment))
        }
        _ => Ordering::Equal,
    }
}

fn compare_documents(x: &Document, y: &Document) -> Ordering {
    for ((kx, vx), (ky, vy)) in x.iter().zip(y.iter()) {
        let ord = compare(vx, vy).then_with(|| kx.cmp(ky));
        if ord != Ordering::Equal {
            return ord;
        }
    }
    x.len().cmp(&y.len())
}

/// Server equality: numeric across types, documents field-order sensitive.
pub(crate) fn values_equal(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::Document(x), Bson::Document(y)) => documents_equal(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(vx, vy)| values_equal(vx, vy))
        }
        _ => type_rank(a) == type_rank(b) && compare(a, b) == Ordering::Equal && same_leaf(a, b),
    }
}

/// `values_equal` for two documents: same keys in the same order, equal values.
pub(crate) fn documents_equal(a: &Document, b: &Document) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b.iter())
            .all(|((ka, va), (kb, vb))| ka == kb && values_equal(va, vb))
}

/// Guards `compare`'s catch-all `Equal` for types it does not order.
fn same_leaf(a: &Bson, b: &Bson) -> bool {
    match (a, b) {
        (Bson::RegularExpression(_), _)
        | (Bson::JavaScriptCode(_), _)
        | (Bson::JavaScriptCodeWithScope(_), _)
        | (Bson::DbPointer(_), _)
        | (Bson::Decimal128(_), _) => a == b,
        _ => true,
    }
}

/// Looks up a dotted path. Arrays are not traversed except by numeric index.
pub(crate) fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut current = doc.get(first)?;
    for part in parts {
        current = match current {
            Bson::Document(d) => d.get(part)?,
            Bson::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Does `doc` match `filter`?
pub(crate) fn matches(doc: &Document, filter: &Document) -> Result<bool, CommandError> {
    for (key, condition) in filter {
        let ok = match key.as_str() {
            "$and" => {
                let mut all = true;
                for sub in sub_filters(key, condition)? {
                    if !matches(doc, sub)? {
                        all = false;
                        break;
                    }
                }
                all
            }
            "$or" => {
                let mut any = false;
                for sub in sub_filters(key, condition)? {
                    if matches(doc, sub)? {
                        any = true;
                        break;
                    }
                }
                any
            }
            "$nor" => {
                let mut none = true;
                for sub in sub_filters(key, condition)? {
                    if matches(doc, sub)? {
                        none = false;
                        break;
                    }
                }
                none
            }
            "$comment" => true,
            other if other.starts_with('$') => {
                return Err(CommandError::bad_value(format!(
                    "unknown top level operator: {other}"
                )));
            }
            path => field_matches(get_path(doc, path), condition)?,
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn sub_filters<'a>(op: &str, condition: &'a Bson) -> Result<Vec<&'a Document>, CommandError> {
    let Bson::Array(items) = condition else {
        return Err(CommandError::bad_value(format!("{op} must be an array")));
    };
    if items.is_empty() {
        return Err(CommandError::bad_value(
            "$and/$or/$nor must be a nonempty array".to_string(),
        ));
    }
    items
        .iter()
        .map(|item| match item {
            Bson::Document(d) => Ok(d),
            _ => Err(CommandError::bad_value(format!(
                "{op} argument's entries must be objects"
            ))),
        })
        .collect()
}

fn is_operator_document(condition: &Bson) -> Option<&Document> {
    match condition {
        Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => Some(d),
        _ => None,
    }
}

fn field_matches(value: Option<&Bson>, condition: &Bson) -> Result<bool, CommandError> {
    let Some(operators) = is_operator_document(condition) else {
        return Ok(equals_with_arrays(value, condition));
    };
    for (op, operand) in operators {
        let ok = match op.as_str() {
            "$eq" => equals_with_arrays(value, operand),
            "$ne" => !equals_with_arrays(value, operand),
            "$in" => in_list(value, operand, "$in")?,
            "$nin" => !in_list(value, operand, "$nin")?,
            "$gt" => compares(value, operand, |o| o == Ordering::Greater),
            "$gte" => compares(value, operand, |o| o != Ordering::Less),
            "$lt" => compares(value, operand, |o| o == Ordering::Less),
            "$lte" => compares(value, operand, |o| o != Ordering::Greater),
            "$exists" => {
                let wanted = match operand {
                    Bson::Boolean(b) => *b,
                    other => as_f64(other).is_some_and(|n| n != 0.0),
                };
                value.is_some() == wanted
            }
            "$not" => match operand {
                Bson::Document(inner) => !field_matches(value, &Bson::Document(inner.clone()))?,
                _ => return Err(CommandError::bad_value("$not needs a document")),
            },
            other => {
                return Err(CommandError::bad_value(format!(
                    "unknown operator: {other}"
                )))
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Equality as a query sees it: null matches missing, and an array field
/// matches when the whole array or any element equals the operand.
fn equals_with_arrays(value: Option<&Bson>, operand: &Bson) -> bool {
    match value {
        None => matches!(operand, Bson::Null),
        Some(v) => {
            if values_equal(v, operand) {
                return true;
            }
            if let Bson::Array(items) = v {
                return items.iter().any(|item| values_equal(item, operand));
            }
            false
        }
    }
}

fn in_list(value: Option<&Bson>, operand: &Bson, op: &str) -> Result<bool, CommandError> {
    let Bson::Array(candidates) = operand else {
        return Err(CommandError::bad_value(format!("{op} needs an array")));
    };
    Ok(candidates.iter().any(|c| equals_with_arrays(value, c)))
}

fn compares(value: Option<&Bson>, operand: &Bson, accept: impl Fn(Ordering) -> bool) -> bool {
    let check = |v: &Bson| type_rank(v) == type_rank(operand) && accept(compare(v, operand));
    match value {
        None => false,
        Some(Bson::Array(items)) if !matches!(operand, Bson::Array(_)) => items.iter().any(check),
        Some(v) => check(v),
    }
}

/// Sorts documents by a sort specification ({field: 1 | -1, ...}); stable.
pub(crate) fn sort_documents(docs: &mut [Document], spec: &Document) {
    let keys: Vec<(String, bool)> = spec
        .iter()
        .map(|(k, v)| (k.clone(), as_f64(v).unwrap_or(1.0) >= 0.0))
        .collect();
    docs.sort_by(|a, b| {
        for (key, ascending) in &keys {
            let va = get_path(a, key).unwrap_or(&Bson::Null);
            let vb = get_path(b, key).unwrap_or(&Bson::Null);
            let ord = compare(va, vb);
            if ord != Ordering::Equal {
                return if *ascending { ord } else { ord.reverse() };
            }
        }
        Ordering::Equal
    });
}

/// Applies a projection of top-level fields (inclusion or exclusion; `_id`
/// included unless excluded).
pub(crate) fn project(doc: &Document, projection: &Document) -> Document {
    if projection.is_empty() {
        return doc.clone();
    }
    let truthy = |v: &Bson| match v {
        Bson::Boolean(b) => *b,
        other => as_f64(other).is_none_or(|n| n != 0.0),
    };
    let inclusion = projection.iter().any(|(k, v)| k != "_id" && truthy(v));
    if inclusion {
        let keep_id = projection.get("_id").is_none_or(truthy);
        doc.iter()
            .filter(|(k, _)| {
                if k.as_str() == "_id" {
                    keep_id
                } else {
                    projection.get(k.as_str()).is_some_and(truthy)
                }
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    } else {
        doc.iter()
            .filter(|(k, _)| projection.get(k.as_str()).is_none_or(truthy))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Is this an update with operators (`$set`, ...) rather than a replacement?
pub(crate) fn is_operator_update(update: &Document) -> bool {
    update.keys().next().is_some_and(|k| k.starts_with('$'))
}

/// Applies an update (operators or replacement) to `doc` in place.
/// `inserting` enables `$setOnInsert`.
pub(crate) fn apply_update(
    doc: &mut Document,
    update: &Document,
    inserting: bool,
) -> Result<(), CommandError> {
    if !is_operator_update(update) {
        if let Some(k) = update.keys().find(|k| k.starts_with('$')) {
            return Err(CommandError::bad_value(format!(
                "unknown modifier in replacement: {k}"
            )));
        }
        let id = doc.get("_id").cloned();
        if let (Some(old), Some(new)) = (&id, update.get("_id")) {
            if !values_equal(old, new) {
                return Err(CommandError::new(
                    IMMUTABLE_FIELD,
                    "After applying the update, the (immutable) field '_id' was found to have been altered",
                ));
            }
        }
        let mut replaced = Document::new();
        if let Some(id) = id {
            replaced.insert("_id", id);
        }
        for (k, v) in update {
            if k != "_id" {
                replaced.insert(k.clone(), v.clone());
            }
        }
        *doc = replaced;
        return Ok(());
    }
    for (op, fields) in update {
        let Bson::Document(fields) = fields else {
            return Err(CommandError::new(
                super::errors::FAILED_TO_PARSE,
                format!(
                    "Modifiers operate on fields but we found type {:?} instead",
                    fields.element_type()
                ),
            ));
        };
        for (path, operand) in fields {
            if path == "_id"
                && op != "$setOnInsert"
                && !(op == "$set" && doc.get("_id").is_some_and(|v| values_equal(v, operand)))
            {
                return Err(CommandError::new(
                    IMMUTABLE_FIELD,
                    "Performing an update on the path '_id' would modify the immutable field '_id'",
                ));
            }
            match op.as_str() {
                "$set" => set_path(doc, path, operand.clone())?,
                "$setOnInsert" => {
                    if inserting {
                        set_path(doc, path, operand.clone())?;
                    }
                }
                "$unset" => unset_path(doc, path),
                "$inc" => {
                    let current = get_path(doc, path).cloned();
                    let sum = add_numbers(current.as_ref(), operand, path)?;
                    set_path(doc, path, sum)?;
                }
                "$push" => {
                    let mut items = match get_path(doc, path) {
                        None => Vec::new(),
                        Some(Bson::Array(items)) => items.clone(),
                        Some(_) => {
                            return Err(CommandError::bad_value(format!(
                                "The field '{path}' must be an array"
                            )))
                        }
                    };
                    items.push(operand.clone());
                    set_path(doc, path, Bson::Array(items))?;
                }
                other => {
                    return Err(CommandError::new(
                        super::errors::FAILED_TO_PARSE,
                        format!("Unknown modifier: {other}. Expected a valid update modifier or pipeline-style update specified as an array"),
                    ))
                }
            }
        }
    }
    Ok(())
}

fn add_numbers(current: Option<&Bson>, operand: &Bson, path: &str) -> Result<Bson, CommandError> {
    let non_numeric = || {
        CommandError::new(
            super::errors::TYPE_MISMATCH,
            format!("Cannot apply $inc to a value of non-numeric type. {{_id: ...}} has the field '{path}' of non-numeric type"),
        )
    };
    if as_f64(operand).is_none() {
        return Err(CommandError::new(
            super::errors::TYPE_MISMATCH,
            "Cannot increment with non-numeric argument",
        ));
    }
    let current = current.cloned().unwrap_or(Bson::Int32(0));
    Ok(match (&current, operand) {
        (Bson::Int32(a), Bson::Int32(b)) => a
            .checked_add(*b)
            .map(Bson::Int32)
            .unwrap_or(Bson::Int64(i64::from(*a) + i64::from(*b))),
        (Bson::Int32(a), Bson::Int64(b)) => Bson::Int64(i64::from(*a).saturating_add(*b)),
        (Bson::Int64(a), Bson::Int32(b)) => Bson::Int64(a.saturating_add(i64::from(*b))),
        (Bson::Int64(a), Bson::Int64(b)) => Bson::Int64(a.saturating_add(*b)),
        _ => match (as_f64(&current), as_f64(operand)) {
            (Some(a), Some(b)) => Bson::Double(a + b),
            _ => return Err(non_numeric()),
        },
    })
}

fn set_path(doc: &mut Document, path: &str, value: Bson) -> Result<(), CommandError> {
    match path.split_once('.') {
        None => {
            doc.insert(path.to_string(), value);
            Ok(())
        }
        Some((head, rest)) => {
            if !doc.contains_key(head) {
                doc.insert(head.to_string(), Document::new());
            }
            match doc.get_mut(head) {
                Some(Bson::Document(inner)) => set_path(inner, rest, value),
                _ => Err(CommandError::new(
                    28,
                    format!("Cannot create field '{rest}' in element {{{head}: ...}}"),
                )),
            }
        }
    }
}

fn unset_path(doc: &mut Document, path: &str) {
    match path.split_once('.') {
        None => {
            doc.remove(path);
        }
        Some((head, rest)) => {
            if let Some(Bson::Document(inner)) = doc.get_mut(head) {
                unset_path(inner, rest);
            }
        }
    }
}

/// The document an upsert starts from: the filter's equality conditions
/// on plain fields (and `$eq`), before the update is applied.
pub(crate) fn upsert_seed(filter: &Document) -> Document {
    let mut seed = Document::new();
    for (key, condition) in filter {
        if key.starts_with('$') {
            if key == "$and" {
                if let Bson::Array(items) = condition {
                    for item in items {
                        if let Bson::Document(sub) = item {
                            for (k, v) in upsert_seed(sub) {
                                seed.insert(k, v);
                            }
                        }
                    }
                }
            }
            continue;
        }
        match is_operator_document(condition) {
            None => {
                let _ = set_path(&mut seed, key, condition.clone());
            }
            Some(ops) => {
                if let Some(v) = ops.get("$eq") {
                    let _ = set_path(&mut seed, key, v.clone());
                }
            }
        }
    }
    seed
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn filters_cover_the_documented_operators() {
        let d = doc! { "_id": 1, "a": 5, "b": "x", "n": { "k": 1, "j": 2 }, "arr": [1, 2, 3] };
        let yes = [
            doc! { "a": 5 },
            doc! { "a": 5.0 },
            doc! { "a": { "$gt": 4, "$lte": 5 } },
            doc! { "a": { "$in": [1, 5] } },
            doc! { "a": { "$ne": 6 } },
            doc! { "missing": { "$exists": false } },
            doc! { "missing": null },
            doc! { "n": { "k": 1, "j": 2 } },
            doc! { "n.k": 1 },
            doc! { "arr": 2 },
            doc! { "$or": [ { "a": 1 }, { "b": "x" } ] },
            doc! { "$and": [ { "a": 5 }, { "b": "x" } ] },
        ];
        for f in yes {
            assert!(matches(&d, &f).unwrap(), "{f:?} should match");
        }
        let no = [
            doc! { "a": 6 },
            doc! { "a": { "$gt": "a" } },
            doc! { "n": { "j": 2, "k": 1 } },
            doc! { "a": { "$exists": false } },
            doc! { "$or": [ { "a": 1 }, { "b": "y" } ] },
            doc! { "a": { "$lt": 5 } },
        ];
        for f in no {
            assert!(!matches(&d, &f).unwrap(), "{f:?} should not match");
        }
        assert!(matches(&d, &doc! { "a": { "$foo": 1 } }).is_err());
    }

    #[test]
    fn updates_apply_operators_and_replacements() {
        let mut d = doc! { "_id": 1, "a": 1, "b": 2 };
        apply_update(
            &mut d,
            &doc! { "$set": { "c": 3 }, "$unset": { "b": "" }, "$inc": { "a": 2 } },
            false,
        )
        .unwrap();
        assert_eq!(d, doc! { "_id": 1, "a": 3, "c": 3 });
        apply_update(&mut d, &doc! { "z": 1 }, false).unwrap();
        assert_eq!(d, doc! { "_id": 1, "z": 1 });
        assert!(apply_update(&mut d, &doc! { "$set": { "_id": 2 } }, false).is_err());
    }

    #[test]
    fn projection_and_sort() {
        let d = doc! { "_id": 1, "a": 1, "b": 2 };
        assert_eq!(project(&d, &doc! { "a": 1 }), doc! { "_id": 1, "a": 1 });
        assert_eq!(project(&d, &doc! { "a": 1, "_id": 0 }), doc! { "a": 1 });
        assert_eq!(project(&d, &doc! { "a": 0 }), doc! { "_id": 1, "b": 2 });
        let mut docs = vec![doc! { "x": 2 }, doc! { "x": 1 }, doc! {}, doc! { "x": 3 }];
        sort_documents(&mut docs, &doc! { "x": -1 });
        assert_eq!(docs[0], doc! { "x": 3 });
        assert_eq!(docs[3], doc! {});
    }
}
