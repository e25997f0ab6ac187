//! Command errors shaped like the server's: `{ok: 0, errmsg, code, codeName}`
//! plus `errorLabels` where the server adds them. Codes and names follow the
//! server's src/mongo/base/error_codes.yml; codes that are bare assertions
//! there (`Location<code>`) are named that way, as the server does.
//!
//! The labels the server computes for every error (error_labels.cpp) are
//! computed here too, from the request alone: `TransientTransactionError`
//! inside a transaction, `RetryableWriteError` for a retryable write (or a
//! commit / abort) failing with a retryable code or write concern error.

use bson::{doc, Bson, Document};

pub(crate) const BAD_VALUE: i32 = 2;
pub(crate) const HOST_UNREACHABLE: i32 = 6;
pub(crate) const HOST_NOT_FOUND: i32 = 7;
pub(crate) const FAILED_TO_PARSE: i32 = 9;
pub(crate) const UNAUTHORIZED: i32 = 13;
pub(crate) const LOCK_TIMEOUT: i32 = 24;
pub(crate) const PROTOCOL_ERROR: i32 = 17;
pub(crate) const AUTHENTICATION_FAILED: i32 = 18;
pub(crate) const TYPE_MISMATCH: i32 = 14;
pub(crate) const ILLEGAL_OPERATION: i32 = 20;
pub(crate) const NAMESPACE_NOT_FOUND: i32 = 26;
pub(crate) const INDEX_NOT_FOUND: i32 = 27;
pub(crate) const CURSOR_NOT_FOUND: i32 = 43;
pub(crate) const MAX_TIME_MS_EXPIRED: i32 = 50;
pub(crate) const NAMESPACE_EXISTS: i32 = 48;
pub(crate) const COMMAND_NOT_FOUND: i32 = 59;
pub(crate) const IMMUTABLE_FIELD: i32 = 66;
pub(crate) const INVALID_OPTIONS: i32 = 72;
pub(crate) const INVALID_NAMESPACE: i32 = 73;
pub(crate) const NO_REPLICATION_ENABLED: i32 = 76;
pub(crate) const NETWORK_TIMEOUT: i32 = 89;
pub(crate) const SHUTDOWN_IN_PROGRESS: i32 = 91;
pub(crate) const WRITE_CONFLICT: i32 = 112;
pub(crate) const COMMAND_NOT_SUPPORTED: i32 = 115;
pub(crate) const CONFLICTING_OPERATION_IN_PROGRESS: i32 = 117;
pub(crate) const PRIMARY_STEPPED_DOWN: i32 = 189;
pub(crate) const INCOMPLETE_TRANSACTION_HISTORY: i32 = 217;
pub(crate) const TRANSACTION_TOO_OLD: i32 = 225;
pub(crate) const SNAPSHOT_TOO_OLD: i32 = 239;
pub(crate) const SNAPSHOT_UNAVAILABLE: i32 = 246;
pub(crate) const NO_SUCH_TRANSACTION: i32 = 251;
pub(crate) const TRANSACTION_COMMITTED: i32 = 256;
pub(crate) const EXCEEDED_TIME_LIMIT: i32 = 262;
pub(crate) const OPERATION_NOT_SUPPORTED_IN_TRANSACTION: i32 = 263;
pub(crate) const UNSUPPORTED_OP_QUERY_COMMAND: i32 = 352;
/// Atlas's own code for what its proxy refuses (shared tiers, bad auth).
pub(crate) const ATLAS_ERROR: i32 = 8000;
pub(crate) const SOCKET_EXCEPTION: i32 = 9001;
pub(crate) const NOT_WRITABLE_PRIMARY: i32 = 10107;
pub(crate) const DUPLICATE_KEY: i32 = 11000;
pub(crate) const INTERRUPTED_AT_SHUTDOWN: i32 = 11600;
pub(crate) const INTERRUPTED_DUE_TO_REPL_STATE_CHANGE: i32 = 11602;
pub(crate) const NOT_PRIMARY_NO_SECONDARY_OK: i32 = 13435;
pub(crate) const NOT_PRIMARY_OR_SECONDARY: i32 = 13436;
pub(crate) const MISSING_DB: i32 = 40571;
pub(crate) const GETMORE_NOT_IN_SESSION: i32 = 50736;
pub(crate) const GETMORE_WITHOUT_LSID: i32 = 50737;
pub(crate) const GETMORE_OTHER_SESSION: i32 = 50738;
pub(crate) const TXN_NUMBER_NOT_ALLOWED: i32 = 50768;
pub(crate) const TRANSIENT_TRANSACTION_ERROR: &str = "TransientTransactionError";
pub(crate) const RETRYABLE_WRITE_ERROR: &str = "RetryableWriteError";

/// The server's RetriableError category (error_codes.yml): what a driver
/// may retry, and what earns a retryable write the `RetryableWriteError` label.
pub(crate) fn is_retriable(code: i32) -> bool {
    matches!(
        code,
        HOST_UNREACHABLE
            | HOST_NOT_FOUND
            | NETWORK_TIMEOUT
            | SHUTDOWN_IN_PROGRESS
            | PRIMARY_STEPPED_DOWN
            | EXCEEDED_TIME_LIMIT
            | SOCKET_EXCEPTION
            | NOT_WRITABLE_PRIMARY
            | INTERRUPTED_AT_SHUTDOWN
            | INTERRUPTED_DUE_TO_REPL_STATE_CHANGE
            | NOT_PRIMARY_NO_SECONDARY_OK
            | NOT_PRIMARY_OR_SECONDARY
    )
}

/// The server's NotPrimaryError category: a replica-set member adds its
/// current `topologyVersion` to these error replies (SDAM uses it to tell a
/// stale error from a new one).
pub(crate) fn is_not_primary(code: i32) -> bool {
    matches!(
        code,
        NOT_WRITABLE_PRIMARY
            | NOT_PRIMARY_NO_SECONDARY_OK
            | NOT_PRIMARY_OR_SECONDARY
            | PRIMARY_STEPPED_DOWN
            | INTERRUPTED_DUE_TO_REPL_STATE_CHANGE
    )
}

/// What the server's label builder knows about a request.
#[derive(Debug, Clone, Copy)]
pub struct LabelContext<'a> {
    pub command: &'a str,
    pub has_txn_number: bool,
    /// `autocommit` present (it can only be false): a multi-document transaction.
    pub in_transaction: bool,
}

impl<'a> LabelContext<'a> {
    pub fn of(command: &'a str, body: &Document) -> LabelContext<'a> {
        LabelContext {
            command,
            has_txn_number: body.contains_key("txnNumber"),
            in_transaction: body.contains_key("autocommit"),
        }
    }

    fn commit_or_abort(&self) -> bool {
        matches!(self.command, "commitTransaction" | "abortTransaction")
    }
}

/// The labels a 7.0 server computes for a failed command (`code`) or a
/// write concern error (`wc_code`), as error_labels.cpp does: the two are
/// exclusive, TransientTransactionError first.
pub(crate) fn server_labels(
    ctx: LabelContext<'_>,
    code: Option<i32>,
    wc_code: Option<i32>,
) -> Vec<&'static str> {
    if !ctx.has_txn_number {
        return Vec::new();
    }
    if let Some(code) = code.filter(|_| ctx.in_transaction) {
        let transient = matches!(
            code,
            WRITE_CONFLICT | LOCK_TIMEOUT | SNAPSHOT_TOO_OLD | SNAPSHOT_UNAVAILABLE
        ) || if ctx.commit_or_abort() {
            code == NO_SUCH_TRANSACTION && wc_code.is_none()
        } else {
            is_retriable(code) || code == NO_SUCH_TRANSACTION
        };
        if transient {
            return vec![TRANSIENT_TRANSACTION_ERROR];
        }
    }
    let retryable_write = !ctx.in_transaction || ctx.commit_or_abort();
    if retryable_write && (code.is_some_and(is_retriable) || wc_code.is_some_and(is_retriable)) {
        return vec![RETRYABLE_WRITE_ERROR];
    }
    Vec::new()
}

/// The server's codeName for a code.
pub(crate) fn code_name(code: i32) -> String {
    let name = match code {
        BAD_VALUE => "BadValue",
        FAILED_TO_PARSE => "FailedToParse",
        HOST_UNREACHABLE => "HostUnreachable",
        HOST_NOT_FOUND => "HostNotFound",
        UNAUTHORIZED => "Unauthorized",
        LOCK_TIMEOUT => "LockTimeout",
        PROTOCOL_ERROR => "ProtocolError",
        AUTHENTICATION_FAILED => "AuthenticationFailed",
        TYPE_MISMATCH => "TypeMismatch",
        ILLEGAL_OPERATION => "IllegalOperation",
        NAMESPACE_NOT_FOUND => "NamespaceNotFound",
        INDEX_NOT_FOUND => "IndexNotFound",
        CURSOR_NOT_FOUND => "CursorNotFound",
        MAX_TIME_MS_EXPIRED => "MaxTimeMSExpired",
        NAMESPACE_EXISTS => "NamespaceExists",
        COMMAND_NOT_FOUND => "CommandNotFound",
        IMMUTABLE_FIELD => "ImmutableField",
        INVALID_OPTIONS => "InvalidOptions",
        INVALID_NAMESPACE => "InvalidNamespace",
        NO_REPLICATION_ENABLED => "NoReplicationEnabled",
        NETWORK_TIMEOUT => "NetworkTimeout",
        SHUTDOWN_IN_PROGRESS => "ShutdownInProgress",
        WRITE_CONFLICT => "WriteConflict",
        COMMAND_NOT_SUPPORTED => "CommandNotSupported",
        CONFLICTING_OPERATION_IN_PROGRESS => "ConflictingOperationInProgress",
        PRIMARY_STEPPED_DOWN => "PrimarySteppedDown",
        INCOMPLETE_TRANSACTION_HISTORY => "IncompleteTransactionHistory",
        TRANSACTION_TOO_OLD => "TransactionTooOld",
        SNAPSHOT_TOO_OLD => "SnapshotTooOld",
        SNAPSHOT_UNAVAILABLE => "SnapshotUnavailable",
        NO_SUCH_TRANSACTION => "NoSuchTransaction",
        TRANSACTION_COMMITTED => "TransactionCommitted",
        EXCEEDED_TIME_LIMIT => "ExceededTimeLimit",
        OPERATION_NOT_SUPPORTED_IN_TRANSACTION => "OperationNotSupportedInTransaction",
        UNSUPPORTED_OP_QUERY_COMMAND => "UnsupportedOpQueryCommand",
        ATLAS_ERROR => "AtlasError",
        SOCKET_EXCEPTION => "SocketException",
        NOT_WRITABLE_PRIMARY => "NotWritablePrimary",
        INTERRUPTED_AT_SHUTDOWN => "InterruptedAtShutdown",
        INTERRUPTED_DUE_TO_REPL_STATE_CHANGE => "InterruptedDueToReplStateChange",
        NOT_PRIMARY_OR_SECONDARY => "NotPrimaryOrSecondary",
        DUPLICATE_KEY => "DuplicateKey",
        NOT_PRIMARY_NO_SECONDARY_OK => "NotPrimaryNoSecondaryOk",
        other => return format!("Location{other}"),
    };
    name.to_string()
}

/// A failed command.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandError {
    pub code: i32,
    pub errmsg: String,
    pub labels: Vec<String>,
}

impl CommandError {
    pub fn new(code: i32, errmsg: impl Into<String>) -> CommandError {
        CommandError {
            code,
            errmsg: errmsg.into(),
            labels: Vec::new(),
        }
    }

    pub fn bad_value(errmsg: impl Into<String>) -> CommandError {
        CommandError::new(BAD_VALUE, errmsg)
    }

    pub fn with_label(mut self, label: &str) -> CommandError {
        if !self.labels.iter().any(|l| l == label) {
            self.labels.push(label.to_string());
        }
        self
    }

    /// Adds the labels the server computes for this error (see [`server_labels`]).
    pub fn with_server_labels(self, ctx: LabelContext<'_>) -> CommandError {
        let code = self.code;
        server_labels(ctx, Some(code), None)
            .into_iter()
            .fold(self, CommandError::with_label)
    }

    /// The reply document.
    pub fn to_document(&self) -> Document {
        let mut reply = doc! {
            "ok": 0.0,
            "errmsg": self.errmsg.clone(),
            "code": self.code,
            "codeName": code_name(self.code),
        };
        if !self.labels.is_empty() {
            let labels: Vec<Bson> = self.labels.iter().cloned().map(Bson::String).collect();
            reply.insert("errorLabels", labels);
        }
        reply
    }
}

pub(crate) type CommandResult = Result<Document, CommandError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(command: &'a str, body: &Document) -> LabelContext<'a> {
        LabelContext::of(command, body)
    }

    #[test]
    fn labels_follow_the_servers_label_builder() {
        let plain = doc! { "insert": "c" };
        let retryable = doc! { "insert": "c", "txnNumber": 1_i64 };
        let in_txn = doc! { "insert": "c", "txnNumber": 1_i64, "autocommit": false };
        let commit = doc! { "commitTransaction": 1, "txnNumber": 1_i64, "autocommit": false };
        let none: Vec<&str> = Vec::new();
        assert_eq!(
            server_labels(ctx("insert", &plain), Some(NOT_WRITABLE_PRIMARY), None),
            none
        );
        assert_eq!(
            server_labels(ctx("insert", &retryable), Some(NOT_WRITABLE_PRIMARY), None),
            vec![RETRYABLE_WRITE_ERROR]
        );
        assert_eq!(
            server_labels(ctx("insert", &retryable), Some(DUPLICATE_KEY), None),
            none
        );
        assert_eq!(
            server_labels(ctx("insert", &retryable), None, Some(SHUTDOWN_IN_PROGRESS)),
            vec![RETRYABLE_WRITE_ERROR]
        );
        assert_eq!(
            server_labels(ctx("insert", &in_txn), Some(NOT_WRITABLE_PRIMARY), None),
            vec![TRANSIENT_TRANSACTION_ERROR]
        );
        assert_eq!(
            server_labels(ctx("insert", &in_txn), Some(DUPLICATE_KEY), None),
            none
        );
        // commit: a retryable code is a retryable write error, not transient.
        assert_eq!(
            server_labels(
                ctx("commitTransaction", &commit),
                Some(NOT_WRITABLE_PRIMARY),
                None
            ),
            vec![RETRYABLE_WRITE_ERROR]
        );
        assert_eq!(
            server_labels(
                ctx("commitTransaction", &commit),
                Some(NO_SUCH_TRANSACTION),
                None
            ),
            vec![TRANSIENT_TRANSACTION_ERROR]
        );
        let labelled = CommandError::new(WRITE_CONFLICT, "x")
            .with_label(TRANSIENT_TRANSACTION_ERROR)
            .with_server_labels(ctx("insert", &in_txn));
        assert_eq!(labelled.labels, vec![TRANSIENT_TRANSACTION_ERROR]);
        assert_eq!(code_name(COMMAND_NOT_SUPPORTED), "CommandNotSupported");
        assert_eq!(code_name(ATLAS_ERROR), "AtlasError");
    }
}
