//! Command names as a closed set: the commands drivers and applications
//! send routinely, each with a fixed index, and everything else as `other`.
//! The data path labels its command counters and latency histograms with
//! them, the engine counts retries by them, and a request's name is kept as
//! a borrowed label instead of a `String` per request. It owns the list and
//! the folding of legacy spellings; it must not grow from what a client
//! sends (a metric label set is fixed when the process starts).

use std::borrow::Cow;

/// The `command` label values: the commands drivers and applications send
/// routinely. Anything else (including every misspelling a client could
/// invent) is counted as `other`, which is last.
pub const COMMAND_LABELS: [&str; 42] = [
    "find",
    "insert",
    "update",
    "delete",
    "getMore",
    "aggregate",
    "findAndModify",
    "count",
    "distinct",
    "killCursors",
    "bulkWrite",
    "hello",
    "isMaster",
    "ping",
    "buildInfo",
    "getParameter",
    "serverStatus",
    "saslStart",
    "saslContinue",
    "authenticate",
    "logout",
    "endSessions",
    "refreshSessions",
    "killSessions",
    "killAllSessions",
    "killAllSessionsByPattern",
    "startSession",
    "commitTransaction",
    "abortTransaction",
    "listCollections",
    "listIndexes",
    "listDatabases",
    "createIndexes",
    "dropIndexes",
    "create",
    "drop",
    "dropDatabase",
    "collMod",
    "renameCollection",
    "explain",
    "getLastError",
    "other",
];

/// The index of the `other` label.
pub const OTHER_COMMAND: usize = COMMAND_LABELS.len() - 1;

/// The index of `name` in [`COMMAND_LABELS`] (legacy lowercase spellings
/// fold into their camel-case names; unknown names are `other`).
pub fn command_index(name: &str) -> usize {
    let canonical = match name {
        "ismaster" => "isMaster",
        "buildinfo" => "buildInfo",
        other => other,
    };
    COMMAND_LABELS[..OTHER_COMMAND]
        .iter()
        .position(|known| *known == canonical)
        .unwrap_or(OTHER_COMMAND)
}

/// The name to keep for a command whose metric label index is `index`:
/// the label itself for the commands drivers send routinely (no String per
/// request on the hot path), a copy for anything else.
pub fn intern_command(name: &str, index: usize) -> Cow<'static, str> {
    match COMMAND_LABELS.get(index) {
        Some(label) if index != OTHER_COMMAND => Cow::Borrowed(label),
        _ => Cow::Owned(name.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names_fold_into_a_fixed_set() {
        assert_eq!(COMMAND_LABELS[command_index("find")], "find");
        assert_eq!(COMMAND_LABELS[command_index("ismaster")], "isMaster");
        assert_eq!(COMMAND_LABELS[command_index("buildinfo")], "buildInfo");
        assert_eq!(COMMAND_LABELS[command_index("myOwnCommand")], "other");
        assert_eq!(COMMAND_LABELS[command_index("")], "other");
        assert_eq!(COMMAND_LABELS[command_index("other")], "other");
    }

    #[test]
    fn known_commands_are_borrowed_unknown_owned() {
        let find = command_index("find");
        assert!(matches!(
            intern_command("find", find),
            Cow::Borrowed("find")
        ));
        assert!(
            matches!(intern_command("myCustomCommand", command_index("myCustomCommand")), Cow::Owned(ref s) if s == "myCustomCommand")
        );
    }
}
