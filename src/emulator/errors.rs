//! Command errors shaped like the server's: `{ok: 0, errmsg, code, codeName}`
//! plus `errorLabels` where the server adds them. Codes and names follow the
//! server's src/mongo/base/error_codes.yml; codes that are bare assertions
//! there ("Location<code>") are named that way, as the server does.

use bson::{doc, Bson, Document};

pub const BAD_VALUE: i32 = 2;
pub const FAILED_TO_PARSE: i32 = 9;
pub const UNAUTHORIZED: i32 = 13;
pub const PROTOCOL_ERROR: i32 = 17;
pub const AUTHENTICATION_FAILED: i32 = 18;
pub const TYPE_MISMATCH: i32 = 14;
pub const ILLEGAL_OPERATION: i32 = 20;
pub const NAMESPACE_NOT_FOUND: i32 = 26;
pub const INDEX_NOT_FOUND: i32 = 27;
pub const CURSOR_NOT_FOUND: i32 = 43;
pub const MAX_TIME_MS_EXPIRED: i32 = 50;
pub const NAMESPACE_EXISTS: i32 = 48;
pub const COMMAND_NOT_FOUND: i32 = 59;
pub const IMMUTABLE_FIELD: i32 = 66;
pub const INVALID_OPTIONS: i32 = 72;
pub const INVALID_NAMESPACE: i32 = 73;
pub const WRITE_CONFLICT: i32 = 112;
pub const CONFLICTING_OPERATION_IN_PROGRESS: i32 = 117;
pub const INCOMPLETE_TRANSACTION_HISTORY: i32 = 217;
pub const TRANSACTION_TOO_OLD: i32 = 225;
pub const NO_SUCH_TRANSACTION: i32 = 251;
pub const TRANSACTION_COMMITTED: i32 = 256;
pub const OPERATION_NOT_SUPPORTED_IN_TRANSACTION: i32 = 263;
pub const UNSUPPORTED_OP_QUERY_COMMAND: i32 = 352;
pub const NOT_WRITABLE_PRIMARY: i32 = 10107;
pub const DUPLICATE_KEY: i32 = 11000;
pub const NOT_PRIMARY_NO_SECONDARY_OK: i32 = 13435;
pub const MISSING_DB: i32 = 40571;
pub const GETMORE_NOT_IN_SESSION: i32 = 50736;
pub const GETMORE_WITHOUT_LSID: i32 = 50737;
pub const GETMORE_OTHER_SESSION: i32 = 50738;
pub const TXN_NUMBER_NOT_ALLOWED: i32 = 50768;
pub const TRANSIENT_TRANSACTION_ERROR: &str = "TransientTransactionError";

/// The server's codeName for a code.
pub fn code_name(code: i32) -> String {
    let name = match code {
        BAD_VALUE => "BadValue",
        FAILED_TO_PARSE => "FailedToParse",
        UNAUTHORIZED => "Unauthorized",
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
        WRITE_CONFLICT => "WriteConflict",
        CONFLICTING_OPERATION_IN_PROGRESS => "ConflictingOperationInProgress",
        INCOMPLETE_TRANSACTION_HISTORY => "IncompleteTransactionHistory",
        TRANSACTION_TOO_OLD => "TransactionTooOld",
        NO_SUCH_TRANSACTION => "NoSuchTransaction",
        TRANSACTION_COMMITTED => "TransactionCommitted",
        OPERATION_NOT_SUPPORTED_IN_TRANSACTION => "OperationNotSupportedInTransaction",
        UNSUPPORTED_OP_QUERY_COMMAND => "UnsupportedOpQueryCommand",
        NOT_WRITABLE_PRIMARY => "NotWritablePrimary",
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
    pub labels: Vec<&'static str>,
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

    pub fn with_label(mut self, label: &'static str) -> CommandError {
        if !self.labels.contains(&label) {
            self.labels.push(label);
        }
        self
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
            let labels: Vec<Bson> = self
                .labels
                .iter()
                .map(|l| Bson::String((*l).to_string()))
                .collect();
            reply.insert("errorLabels", labels);
        }
        reply
    }
}

pub type CommandResult = Result<Document, CommandError>;
