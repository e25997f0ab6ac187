//! Command execution: one function per command, run under the data lock
//! with no I/O. The handshake (hello) is answered by the connection layer;
//! everything else arrives here as a [`Request`] and leaves as a reply
//! document (`ok: 1` or a server-shaped error).
//!
//! Supported: ping, buildInfo, getParameter, endSessions, refreshSessions,
//! killSessions, killAllSessions, killAllSessionsByPattern, insert, find,
//! getMore, killCursors, update, findAndModify, delete, count, distinct,
//! aggregate ($match $sort $skip $limit $project $count $group), createIndexes,
//! listIndexes, dropIndexes, listCollections, listDatabases, create, drop,
//! dropDatabase, commitTransaction, abortTransaction, configureFailPoint
//! (`faults.rs`), replSetStepDown (`deployment.rs`).
//!
//! Before anything else, the profile and the user's privileges may refuse a
//! command (`profile.rs`): a refused command touches no session, cursor or
//! document. Error replies carry the labels the server computes
//! (`errors::server_labels`) and, for not-primary errors of a replica-set
//! member, its current `topologyVersion`.
//!
//! Read concern: `afterClusterTime` / `atClusterTime` are checked against
//! the cluster time (a later one than the server has seen is InvalidOptions,
//! as on the server); a client's gossiped `$clusterTime` moves the clock
//! forward first. Snapshot reads outside a transaction report
//! `atClusterTime` on their first batch (distinct: at the top level). The
//! data is not versioned: a snapshot read returns the current committed
//! data, not the data as of `atClusterTime` (a documented simplification).
//!
//! A write outside any transaction that reaches a document locked by an open
//! transaction stops before that statement and reports [`Outcome::Blocked`];
//! the connection waits for the transaction to end and calls [`execute`]
//! again with the same [`Resume`], which continues at that statement.

use std::collections::VecDeque;
use std::time::Instant;

use bson::{doc, oid::ObjectId, Bson, Document, Timestamp};

use super::clock::packed;
use super::dataset::doc_id;
use super::deployment::EmulatorState;
use super::emulator_config::Topology;
use super::errors::{self, CommandError, CommandResult, LabelContext};
use super::faults::{AfterExecution, InjectedError};
use super::locks::lock;
use super::query::{self, as_f64, as_i64};
use super::server_sessions::{
    Cursor, Inner, ServerSessionKey, StmtOutcome, TxnContext, TxnState, WriteRefused,
};

/// Default number of documents in a first batch (the server's).
const DEFAULT_FIRST_BATCH: usize = 101;
/// A batch stops growing past this many bytes (the server's 16 MiB).
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Commands a retryable write may carry `txnNumber` on.
const RETRYABLE_WRITE_COMMANDS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
];

/// Commands allowed inside a multi-document transaction.
const TRANSACTION_COMMANDS: &[&str] = &[
    "find",
    "getMore",
    "killCursors",
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "aggregate",
    "distinct",
    "commitTransaction",
    "abortTransaction",
    "create",
    "createIndexes",
];

/// A command as received: its name, database, body and kind-1 sequences.
#[derive(Debug)]
pub(crate) struct Request {
    pub name: String,
    pub db: String,
    pub body: Document,
    pub sequences: Vec<(String, Vec<Document>)>,
    /// The connection's authenticated user (sessions belong to it).
    pub user: Option<String>,
}

impl Request {
    /// The session an lsid document names, for this request's user.
    fn session_key(&self, lsid: &Document) -> Option<ServerSessionKey> {
        ServerSessionKey::from_lsid(lsid).map(|key| key.owned_by(self.user.as_deref()))
    }

    /// Documents given either as a kind-1 sequence or as an array in the body.
    fn documents(&self, field: &str) -> Result<Vec<Document>, CommandError> {
        if let Some((_, docs)) = self.sequences.iter().find(|(id, _)| id == field) {
            return Ok(docs.clone());
        }
        match self.body.get(field) {
            Some(Bson::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Bson::Document(d) => Ok(d.clone()),
                    _ => Err(CommandError::new(
                        errors::TYPE_MISMATCH,
                        format!(
                            "BSON field '{}.{field}' is the wrong type, expected object",
                            self.name
                        ),
                    )),
                })
                .collect(),
            None => Err(CommandError::new(
                errors::FAILED_TO_PARSE,
                format!(
                    "BSON field '{}.{field}' is missing but a required field",
                    self.name
                ),
            )),
            Some(_) => Err(CommandError::new(
                errors::TYPE_MISMATCH,
                format!(
                    "BSON field '{}.{field}' is the wrong type, expected array",
                    self.name
                ),
            )),
        }
    }

    fn collection(&self) -> Result<String, CommandError> {
        match self.body.iter().next() {
            Some((_, Bson::String(name))) if !name.is_empty() => Ok(name.clone()),
            _ => Err(CommandError::new(
                errors::INVALID_NAMESPACE,
                format!("Invalid namespace specified '{}.'", self.db),
            )),
        }
    }

    fn ns(&self, coll: &str) -> String {
        format!("{}.{coll}", self.db)
    }

    fn doc_field(&self, field: &str) -> Result<Document, CommandError> {
        match self.body.get(field) {
            None | Some(Bson::Null) => Ok(Document::new()),
            Some(Bson::Document(d)) => Ok(d.clone()),
            Some(_) => Err(CommandError::new(
                errors::TYPE_MISMATCH,
                format!(
                    "BSON field '{}.{field}' is the wrong type, expected object",
                    self.name
                ),
            )),
        }
    }
}

fn truthy(value: Option<&Bson>) -> bool {
    match value {
        Some(Bson::Boolean(b)) => *b,
        Some(other) => as_i64(Some(other)).is_some_and(|n| n != 0),
        None => false,
    }
}

/// Non-negative count from the wire (batchSize, limit, skip), checked.
fn as_count(value: Option<&Bson>, field: &str) -> Result<Option<usize>, CommandError> {
    match as_i64(value) {
        None => Ok(None),
        Some(n) => usize::try_from(n)
            .map(Some)
            .map_err(|_| CommandError::bad_value(format!("{field} must be a non-negative number"))),
    }
}

/// Internal code (never sent): a write outside a transaction must wait for
/// a transaction's document lock.
const BLOCKED_BY_TRANSACTION: i32 = -1;

/// Where a multi-statement write stopped when it had to wait, and what it
/// had done so far: [`execute`] continues from here.
#[derive(Debug, Default)]
pub(crate) struct Resume {
    next_statement: usize,
    n: i64,
    n_modified: i64,
    upserted: Vec<Document>,
    write_errors: Vec<Document>,
}

/// What [`execute`] produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    Reply(Document),
    /// A write outside any transaction reached a document an open
    /// transaction has locked: call again (same `Resume`) once a
    /// transaction has ended.
    Blocked,
}

/// A command's `readConcern`, as far as the emulator acts on it.
struct ReadConcern {
    /// Set for a snapshot read outside a transaction: reported on its first batch.
    at_cluster_time: Option<Timestamp>,
}

/// One command's execution context.
struct Exec<'a> {
    state: &'a EmulatorState,
    inner: &'a mut Inner,
    lsid: Option<ServerSessionKey>,
    txn: TxnContext,
    writable: bool,
    read_concern: ReadConcern,
    resume: &'a mut Resume,
}

/// Executes one (non-hello) command.
pub(crate) fn execute(
    state: &EmulatorState,
    member: usize,
    req: &Request,
    resume: &mut Resume,
) -> Outcome {
    let now = Instant::now();
    let config = state.config();
    if let Some(refused) = super::profile::refusal(
        config.profile,
        &config.user_roles,
        &req.name,
        &req.db,
        &req.body,
        req.user.as_deref(),
    ) {
        tracing::debug!(command = %req.name, code = refused.code, profile = %config.profile, "command refused; nothing changed");
        return Outcome::Reply(error_reply(state, &req.name, &req.body, refused));
    }
    if req.name == "replSetStepDown" && config.topology != Topology::Mongos {
        // Outside the data lock: stepping down takes it to abort transactions.
        return Outcome::Reply(
            repl_set_step_down(state, member, req)
                .unwrap_or_else(|e| error_reply(state, &req.name, &req.body, e)),
        );
    }
    let topology = state.topology();
    let is_replica_set = matches!(config.topology, Topology::ReplicaSetPrimary { .. });
    let writable = !is_replica_set || topology.primary_member == Some(member);
    let lsid = req
        .body
        .get_document("lsid")
        .ok()
        .and_then(|lsid| req.session_key(lsid));
    let txn_number = as_i64(req.body.get("txnNumber"));
    let autocommit = req.body.get_bool("autocommit").ok();
    let start_transaction = truthy(req.body.get("startTransaction"));
    if config.topology != Topology::Standalone {
        gossip_in(state, &req.body);
    }

    let mut inner = lock(&state.inner);
    let endings_before = inner.txn_endings;
    if let Some(key) = &lsid {
        inner.touch(key, now, config.session_timeout);
    }
    let prepared = transaction_context(
        &mut inner,
        config,
        req,
        lsid.as_ref(),
        txn_number,
        autocommit,
        start_transaction,
        now,
    )
    .and_then(|txn| {
        let read_concern = read_concern(state, req, &txn, start_transaction)?;
        Ok((txn, read_concern))
    });
    let outcome = match prepared {
        Err(e) => Outcome::Reply(error_reply(state, &req.name, &req.body, e)),
        Ok((txn, read_concern)) => {
            let mut exec = Exec {
                state,
                inner: &mut inner,
                lsid,
                txn,
                writable,
                read_concern,
                resume,
            };
            match run(&mut exec, req) {
                Ok(reply) => Outcome::Reply(reply),
                Err(err) if err.code == BLOCKED_BY_TRANSACTION => Outcome::Blocked,
                Err(err) => {
                    // The server aborts a transaction when any of its commands fails.
                    if exec.inner.txn_state(&exec.txn) == Some(TxnState::InProgress) {
                        exec.inner.abort(&exec.txn);
                    }
                    Outcome::Reply(error_reply(state, &req.name, &req.body, err))
                }
            }
        }
    };
    let ended = inner.txn_endings != endings_before;
    std::mem::drop(inner);
    if ended {
        state.notify_transaction_ended();
    }
    outcome
}

/// An error reply as the server shapes it: the labels it computes from the
/// request, and a replica-set member's `topologyVersion` on not-primary errors.
fn error_reply(state: &EmulatorState, name: &str, body: &Document, err: CommandError) -> Document {
    let code = err.code;
    let mut reply = err
        .with_server_labels(LabelContext::of(name, body))
        .to_document();
    add_topology_version(state, code, &mut reply);
    reply
}

fn add_topology_version(state: &EmulatorState, code: i32, reply: &mut Document) {
    let is_replica_set = matches!(state.config().topology, Topology::ReplicaSetPrimary { .. });
    if is_replica_set && errors::is_not_primary(code) {
        let topology = state.topology();
        reply.insert(
            "topologyVersion",
            doc! { "processId": topology.process_id, "counter": topology.counter },
        );
    }
}

/// The reply to a command a fail point failed before it ran: the server's
/// labels unless the fail point gave its own, the `topologyVersion` of a
/// not-primary error; and, as any error in a transaction does, the
/// transaction the command belonged to is aborted.
pub(crate) fn injected_error(
    state: &EmulatorState,
    name: &str,
    body: &Document,
    user: Option<&str>,
    injected: &InjectedError,
) -> Document {
    let mut err = CommandError::new(injected.code, super::faults::FAIL_COMMAND_ERRMSG);
    let mut reply = match &injected.labels {
        Some(labels) => {
            err.labels.clone_from(labels);
            err.to_document()
        }
        None => {
            err = err.with_server_labels(LabelContext::of(name, body));
            err.to_document()
        }
    };
    add_topology_version(state, injected.code, &mut reply);
    let in_transaction = body.contains_key("autocommit");
    let key = body
        .get_document("lsid")
        .ok()
        .and_then(ServerSessionKey::from_lsid)
        .map(|key| key.owned_by(user));
    if let (true, Some(key), Some(txn_number)) =
        (in_transaction, key, as_i64(body.get("txnNumber")))
    {
        let ended = {
            let mut inner = lock(&state.inner);
            let before = inner.txn_endings;
            inner.abort_if_in_progress(&key, txn_number);
            inner.txn_endings != before
        };
        if ended {
            state.notify_transaction_ended();
        }
    }
    reply
}

/// Applies a fail point's `writeConcernError` (and its `errorLabels`) to
/// the reply of a command that ran.
pub(crate) fn after_execution(
    name: &str,
    body: &Document,
    after: &AfterExecution,
    reply: &mut Document,
) {
    let Some(wce) = &after.write_concern_error else {
        return;
    };
    reply.insert("writeConcernError", wce.clone());
    let labels: Vec<String> = match &after.error_labels {
        Some(labels) => labels.clone(),
        None => {
            let code = (reply.get_f64("ok") != Ok(1.0))
                .then(|| reply.get_i32("code").ok())
                .flatten();
            let wc_code = wce.get_i32("code").ok();
            let mut labels: Vec<String> = reply
                .get_array("errorLabels")
                .map(|a| {
                    a.iter()
                        .filter_map(Bson::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            for label in errors::server_labels(LabelContext::of(name, body), code, wc_code) {
                if !labels.iter().any(|l| l == label) {
                    labels.push(label.to_string());
                }
            }
            labels
        }
    };
    reply.remove("errorLabels");
    if !labels.is_empty() {
        // errorLabels go before ok, where the server puts them.
        let ok = reply.remove("ok");
        reply.insert(
            "errorLabels",
            labels.into_iter().map(Bson::String).collect::<Vec<_>>(),
        );
        if let Some(ok) = ok {
            reply.insert("ok", ok);
        }
    }
}

/// A client's `$clusterTime` moves the clock forward (no keys: not verified).
fn gossip_in(state: &EmulatorState, body: &Document) {
    if let Ok(Bson::Timestamp(ts)) = body
        .get_document("$clusterTime")
        .map(|c| c.get("clusterTime").cloned().unwrap_or(Bson::Null))
    {
        state.clock().advance_to(ts);
    }
}

fn read_concern(
    state: &EmulatorState,
    req: &Request,
    txn: &TxnContext,
    start_transaction: bool,
) -> Result<ReadConcern, CommandError> {
    let none = ReadConcern {
        at_cluster_time: None,
    };
    let rc = match req.body.get("readConcern") {
        None => return Ok(none),
        Some(Bson::Document(rc)) => rc,
        Some(_) => {
            return Err(CommandError::new(
                errors::TYPE_MISMATCH,
                "BSON field 'readConcern' is the wrong type, expected object",
            ))
        }
    };
    if matches!(txn, TxnContext::Transaction { .. }) && !start_transaction {
        return Err(CommandError::new(
            errors::INVALID_OPTIONS,
            "Only the first command in a transaction may specify a readConcern",
        ));
    }
    let level = rc.get_str("level").unwrap_or("local");
    let time = |field: &str| match rc.get(field) {
        None => Ok(None),
        Some(Bson::Timestamp(ts)) => Ok(Some(*ts)),
        Some(_) => Err(CommandError::new(
            errors::TYPE_MISMATCH,
            format!(
                "BSON field 'readConcern.{field}' is the wrong type, expected type 'timestamp'"
            ),
        )),
    };
    let after = time("afterClusterTime")?;
    let at = time("atClusterTime")?;
    if after.is_some() && at.is_some() {
        return Err(CommandError::new(
            errors::INVALID_OPTIONS,
            "Can not specify both afterClusterTime and atClusterTime",
        ));
    }
    if at.is_some() && level != "snapshot" {
        return Err(CommandError::new(
            errors::INVALID_OPTIONS,
            "atClusterTime is only valid for readConcern level snapshot",
        ));
    }
    if let Some((name, ts)) = after
        .map(|t| ("afterClusterTime", t))
        .or(at.map(|t| ("atClusterTime", t)))
    {
        if state.config().topology == Topology::Standalone {
            return Err(CommandError::new(
                errors::ILLEGAL_OPERATION,
                format!("Cannot specify {name} readConcern without replication enabled"),
            ));
        }
        let current = state.clock().current();
        if packed(ts) > packed(current) {
            return Err(CommandError::new(
                errors::INVALID_OPTIONS,
                format!(
                    "readConcern {name} value must not be greater than the current clusterTime. Requested clusterTime: {}; current clusterTime: {}",
                    show_ts(ts),
                    show_ts(current)
                ),
            ));
        }
    }
    let snapshot = level == "snapshot" && !matches!(txn, TxnContext::Transaction { .. });
    Ok(ReadConcern {
        at_cluster_time: if snapshot {
            Some(at.unwrap_or_else(|| state.clock().current()))
        } else {
            None
        },
    })
}

fn show_ts(ts: Timestamp) -> String {
    format!("Timestamp({}, {})", ts.time, ts.increment)
}

#[allow(clippy::too_many_arguments)]
fn transaction_context(
    inner: &mut Inner,
    config: &super::emulator_config::EmulatorConfig,
    req: &Request,
    lsid: Option<&ServerSessionKey>,
    txn_number: Option<i64>,
    autocommit: Option<bool>,
    start_transaction: bool,
    now: Instant,
) -> Result<TxnContext, CommandError> {
    let Some(txn_number) = txn_number else {
        if autocommit.is_some() || start_transaction {
            return Err(CommandError::new(
                errors::INVALID_OPTIONS,
                "'autocommit' and 'startTransaction' require a txnNumber",
            ));
        }
        return Ok(TxnContext::None);
    };
    if config.topology == Topology::Standalone {
        return Err(CommandError::new(
            errors::ILLEGAL_OPERATION,
            "Transaction numbers are only allowed on a replica set member or mongos",
        ));
    }
    let Some(key) = lsid else {
        return Err(CommandError::new(
            errors::INVALID_OPTIONS,
            "Transaction number requires a session ID to also be specified",
        ));
    };
    let name = req.name.as_str();
    if autocommit.is_none() && !RETRYABLE_WRITE_COMMANDS.contains(&name) {
        return Err(CommandError::new(
            errors::TXN_NUMBER_NOT_ALLOWED,
            format!("txnNumber may only be provided for multi-document transactions and retryable write commands. autocommit:false was not provided, and {name} is not a retryable write command."),
        ));
    }
    if autocommit.is_some() && !TRANSACTION_COMMANDS.contains(&name) {
        return Err(CommandError::new(
            errors::OPERATION_NOT_SUPPORTED_IN_TRANSACTION,
            format!("Cannot run '{name}' in a multi-document transaction."),
        ));
    }
    inner.begin_or_continue(key, txn_number, autocommit, start_transaction, name, now)
}

fn run(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    match req.name.as_str() {
        "ping" => Ok(doc! { "ok": 1.0 }),
        "buildInfo" | "buildinfo" => Ok(build_info()),
        "getParameter" => get_parameter(ex, req),
        "endSessions" => end_sessions(ex, req, true),
        "killSessions" => end_sessions(ex, req, false),
        "refreshSessions" => refresh_sessions(ex, req),
        "killAllSessions" => kill_all_sessions(ex, req),
        "killAllSessionsByPattern" => kill_all_sessions_by_pattern(ex, req),
        "insert" => insert(ex, req),
        "update" => update(ex, req),
        "delete" => delete(ex, req),
        "findAndModify" | "findandmodify" => find_and_modify(ex, req),
        "find" => find(ex, req),
        "getMore" => get_more(ex, req),
        "killCursors" => kill_cursors(ex, req),
        "count" => count(ex, req),
        "distinct" => distinct(ex, req),
        "aggregate" => aggregate(ex, req),
        "createIndexes" => create_indexes(ex, req),
        "listIndexes" => list_indexes(ex, req),
        "dropIndexes" | "deleteIndexes" => drop_indexes(ex, req),
        "listCollections" => list_collections(ex, req),
        "listDatabases" => list_databases(ex, req),
        "create" => create(ex, req),
        "drop" => drop(ex, req),
        "dropDatabase" => drop_database(ex, req),
        "commitTransaction" => commit_transaction(ex, req),
        "abortTransaction" => abort_transaction(ex, req),
        "configureFailPoint" => ex.state.fail_points.configure(&req.db, &req.body),
        other => Err(CommandError::new(
            errors::COMMAND_NOT_FOUND,
            format!("no such command: '{other}'"),
        )),
    }
}

/// `replSetStepDown: <secs>` with `secondaryCatchUpPeriodSecs` and `force`
/// (admin only, as on the server).
fn repl_set_step_down(state: &EmulatorState, member: usize, req: &Request) -> CommandResult {
    if req.db != "admin" {
        return Err(CommandError::new(
            errors::UNAUTHORIZED,
            "replSetStepDown may only be run against the admin database.",
        ));
    }
    let secs = req.body.get("replSetStepDown").and_then(as_f64);
    let catch_up = match req.body.get("secondaryCatchUpPeriodSecs") {
        None => None,
        value => Some(as_i64(value).ok_or_else(|| {
            CommandError::new(
                errors::TYPE_MISMATCH,
                "secondaryCatchUpPeriodSecs must be a number",
            )
        })?),
    };
    state.step_down(member, secs, catch_up, truthy(req.body.get("force")))?;
    Ok(doc! { "ok": 1.0 })
}

fn build_info() -> Document {
    doc! {
        "version": "7.0.0",
        "gitVersion": "0000000000000000000000000000000000000000",
        "versionArray": [7, 0, 0, 0],
        "bits": 64,
        "debug": false,
        "maxBsonObjectSize": super::hello::MAX_BSON_OBJECT_SIZE,
        "storageEngines": ["wiredTiger"],
        "javascriptEngine": "mozjs",
        "sysInfo": "deprecated",
        "modules": [],
        "openssl": { "running": "disabled", "compiled": "disabled" },
        "ok": 1.0,
    }
}

fn get_parameter(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let config = ex.state.config();
    let known = doc! {
        "featureCompatibilityVersion": { "version": "7.0" },
        "logicalSessionTimeoutMinutes": config.logical_session_timeout_minutes,
        // Whole seconds, as the server's parameter is (a shorter test limit rounds up).
        "transactionLifetimeLimitSeconds": i64::try_from(config.transaction_lifetime_limit.as_millis().div_ceil(1000)).unwrap_or(i64::MAX),
        "maxBSONDepth": 200,
        "authenticationMechanisms": ["SCRAM-SHA-1", "SCRAM-SHA-256"],
    };
    let all = matches!(req.body.get("getParameter"), Some(Bson::String(s)) if s == "*");
    let mut reply = Document::new();
    for (name, value) in &known {
        if all || req.body.contains_key(name) {
            reply.insert(name.clone(), value.clone());
        }
    }
    if reply.is_empty() {
        return Err(CommandError::new(
            errors::INVALID_OPTIONS,
            "no option found to get",
        ));
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

fn lsid_list(req: &Request) -> Result<Vec<ServerSessionKey>, CommandError> {
    let Some(Bson::Array(items)) = req.body.get(&req.name) else {
        return Err(CommandError::new(
            errors::TYPE_MISMATCH,
            format!(
                "BSON field '{}' is the wrong type, expected array",
                req.name
            ),
        ));
    };
    Ok(items
        .iter()
        .filter_map(|item| match item {
            Bson::Document(d) => req.session_key(d),
            _ => None,
        })
        .collect())
}

fn end_sessions(ex: &mut Exec<'_>, req: &Request, count_as_ended: bool) -> CommandResult {
    let mut keys = lsid_list(req)?;
    let everything_of_mine = !count_as_ended
        && matches!(req.body.get(&req.name), Some(Bson::Array(items)) if items.is_empty());
    if everything_of_mine {
        // killSessions: [] kills all the caller's sessions (all sessions
        // without authentication).
        keys = ex
            .inner
            .all_session_keys()
            .into_iter()
            .filter(|k| k.owner == req.user)
            .collect();
    }
    for key in &keys {
        ex.inner.end_session(key);
    }
    if count_as_ended {
        ex.state.add_ended_sessions(keys.len() as u64);
    }
    tracing::debug!(command = %req.name, sessions = keys.len(), "sessions ended");
    Ok(doc! { "ok": 1.0 })
}

fn refresh_sessions(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let keys = lsid_list(req)?;
    let now = Instant::now();
    for key in &keys {
        ex.inner.touch(key, now, ex.state.config().session_timeout);
    }
    ex.state.add_refreshed_sessions(keys.len() as u64);
    Ok(doc! { "ok": 1.0 })
}

/// Ends every live session whose owner `keep` selects.
fn end_sessions_where(ex: &mut Exec<'_>, keep: impl Fn(&ServerSessionKey) -> bool) -> usize {
    let keys: Vec<ServerSessionKey> = ex
        .inner
        .all_session_keys()
        .into_iter()
        .filter(|k| keep(k))
        .collect();
    for key in &keys {
        ex.inner.end_session(key);
    }
    keys.len()
}

fn end_all_sessions(ex: &mut Exec<'_>) {
    end_sessions_where(ex, |_| true);
}

/// `killAllSessions: []` kills everyone's sessions; `[{user, db}, ...]`
/// kills the sessions of those users (all users live in `admin`).
fn kill_all_sessions(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let Some(Bson::Array(users)) = req.body.get(&req.name) else {
        return Err(CommandError::new(
            errors::TYPE_MISMATCH,
            "killAllSessions needs an array",
        ));
    };
    let mut named = Vec::new();
    for user in users {
        let Bson::Document(user) = user else {
            return Err(CommandError::new(
                errors::TYPE_MISMATCH,
                "killAllSessions needs an array of {user, db} documents",
            ));
        };
        if let (Ok(name), Ok(super::auth::AUTH_DB)) = (user.get_str("user"), user.get_str("db")) {
            named.push(name.to_string());
        }
    }
    let killed = if users.is_empty() {
        end_sessions_where(ex, |_| true)
    } else {
        end_sessions_where(ex, |k| k.owner.as_ref().is_some_and(|o| named.contains(o)))
    };
    tracing::debug!(command = %req.name, sessions = killed, "sessions killed");
    Ok(doc! { "ok": 1.0 })
}

fn kill_all_sessions_by_pattern(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let Some(Bson::Array(patterns)) = req.body.get(&req.name) else {
        return Err(CommandError::new(
            errors::TYPE_MISMATCH,
            "killAllSessionsByPattern needs an array",
        ));
    };
    let mut specific = Vec::new();
    let mut everything = patterns.is_empty();
    for pattern in patterns {
        match pattern {
            Bson::Document(p) => {
                match p
                    .get_document("lsid")
                    .ok()
                    .and_then(|lsid| req.session_key(lsid))
                {
                    Some(key) => specific.push(key),
                    None => everything = true,
                }
            }
            _ => {
                return Err(CommandError::new(
                    errors::TYPE_MISMATCH,
                    "patterns must be documents",
                ))
            }
        }
    }
    if everything {
        end_all_sessions(ex);
    } else {
        for key in &specific {
            ex.inner.end_session(key);
        }
    }
    Ok(doc! { "ok": 1.0 })
}

fn require_writable(ex: &Exec<'_>) -> Result<(), CommandError> {
    if ex.writable {
        Ok(())
    } else {
        Err(CommandError::new(
            errors::NOT_WRITABLE_PRIMARY,
            "not primary",
        ))
    }
}

fn in_transaction(ex: &Exec<'_>) -> bool {
    matches!(ex.txn, TxnContext::Transaction { .. })
}

fn stmt_ids(req: &Request, n: usize) -> Vec<i32> {
    if let Ok(ids) = req.body.get_array("stmtIds") {
        let ids: Vec<i32> = ids
            .iter()
            .filter_map(|b| as_i64(Some(b)))
            .filter_map(|v| i32::try_from(v).ok())
            .collect();
        if ids.len() == n {
            return ids;
        }
    }
    let base = as_i64(req.body.get("stmtId"))
        .and_then(|v| i32::try_from(v).ok())
        .unwrap_or(0);
    (0..n)
        .map(|i| base.saturating_add(i32::try_from(i).unwrap_or(i32::MAX)))
        .collect()
}

fn with_id_first(doc: Document) -> Document {
    if doc.contains_key("_id") {
        return doc;
    }
    let mut with_id = doc! { "_id": ObjectId::new() };
    with_id.extend(doc);
    with_id
}

fn duplicate_key_message(ns: &str, id: &Bson) -> String {
    format!("E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}")
}

fn write_error(index: usize, err: &CommandError) -> Document {
    doc! { "index": index as i64, "code": err.code, "errmsg": err.errmsg.clone() }
}

fn duplicate_key_error(ns: &str, id: &Bson) -> CommandError {
    CommandError::new(errors::DUPLICATE_KEY, duplicate_key_message(ns, id))
}

fn write_conflict() -> CommandError {
    CommandError::new(
        errors::WRITE_CONFLICT,
        "Caused by :: Write conflict during plan execution and yielding is disabled. :: Please retry your operation or multi-document transaction.",
    )
    .with_label(errors::TRANSIENT_TRANSACTION_ERROR)
}

fn blocked() -> CommandError {
    CommandError::new(
        BLOCKED_BY_TRANSACTION,
        "waiting for a transaction's document lock",
    )
}

/// A refused write as the command's error (`id` names the document).
fn refused(why: WriteRefused, ns: &str, id: &Bson) -> CommandError {
    match why {
        WriteRefused::Duplicate => duplicate_key_error(ns, id),
        WriteRefused::Conflict => write_conflict(),
        WriteRefused::Blocked => blocked(),
    }
}

/// Whether `ex` may write every one of `docs` now (checked before a
/// statement writes anything, so a blocked statement can run again whole).
fn check_all(
    ex: &Exec<'_>,
    db: &str,
    coll: &str,
    docs: &[(u64, Document)],
) -> Result<(), CommandError> {
    for (_, doc) in docs {
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        ex.inner
            .check_write(&ex.txn, db, coll, &doc_id(&id))
            .map_err(|why| refused(why, &format!("{db}.{coll}"), &id))?;
    }
    Ok(())
}

fn insert(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let ns = req.ns(&coll);
    let docs = req.documents("documents")?;
    let ordered = req.body.get_bool("ordered").unwrap_or(true);
    let ids = stmt_ids(req, docs.len());
    let mut n: i64 = ex.resume.n;
    let mut write_errors = std::mem::take(&mut ex.resume.write_errors);
    let mut retried = 0usize;
    let first = ex.resume.next_statement;
    for (index, doc) in docs.into_iter().enumerate().skip(first) {
        let stmt = ids[index];
        if ex.inner.recorded(&ex.txn, stmt).is_some() {
            // A retry of a statement already executed: not executed again.
            n += 1;
            retried += 1;
            continue;
        }
        let doc = with_id_first(doc);
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        match ex.inner.insert_doc(&ex.txn, &req.db, &coll, doc) {
            Ok(_) => {
                n += 1;
                ex.inner.record(
                    &ex.txn,
                    stmt,
                    StmtOutcome::Write {
                        n: 1,
                        n_modified: 0,
                        upserted: None,
                    },
                );
            }
            Err(WriteRefused::Blocked) => {
                *ex.resume = Resume {
                    next_statement: index,
                    n,
                    write_errors,
                    ..Resume::default()
                };
                return Err(blocked());
            }
            Err(why) => {
                let err = refused(why, &ns, &id);
                if in_transaction(ex) {
                    return Err(err);
                }
                let mut we = write_error(index, &err);
                we.insert("keyPattern", doc! { "_id": 1 });
                we.insert("keyValue", doc! { "_id": id });
                write_errors.push(we);
                if ordered {
                    break;
                }
            }
        }
    }
    if retried > 0 {
        tracing::debug!(ns = %ns, statements = retried, "retryable write: statements already executed, not executed again");
    }
    let mut reply = doc! { "n": n as i32 };
    if !write_errors.is_empty() {
        reply.insert("writeErrors", write_errors);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

/// Positions of the documents matching `filter`, in natural order.
fn matching(
    ex: &Exec<'_>,
    db: &str,
    coll: &str,
    filter: &Document,
) -> Result<Vec<(u64, Document)>, CommandError> {
    let mut out = Vec::new();
    if ex.inner.has_foreign_locks(db, coll, &ex.txn) {
        for (seq, doc) in ex.inner.visible(db, coll, &ex.txn) {
            if query::matches(&doc, filter)? {
                out.push((seq, doc));
            }
        }
    } else if let Some(c) = ex.inner.store.collection(db, coll) {
        for (seq, doc) in c.iter() {
            if query::matches(doc, filter)? {
                out.push((seq, doc.clone()));
            }
        }
    }
    Ok(out)
}

struct UpdateOutcome {
    n: i64,
    n_modified: i64,
    upserted: Option<Bson>,
    old: Option<Document>,
    new: Option<Document>,
}

/// One update statement (shared by update and findAndModify).
fn update_one_statement(
    ex: &mut Exec<'_>,
    (db, coll): (&str, &str),
    filter: &Document,
    update: &Bson,
    multi: bool,
    upsert: bool,
    sort: Option<&Document>,
) -> Result<UpdateOutcome, CommandError> {
    let Bson::Document(update) = update else {
        return Err(CommandError::bad_value(
            "pipeline-style updates are not supported by the sessionguard emulator",
        ));
    };
    if multi && !query::is_operator_update(update) {
        return Err(CommandError::new(
            errors::FAILED_TO_PARSE,
            "multi update is not supported for replacement-style update",
        ));
    }
    let mut targets = matching(ex, db, coll, filter)?;
    if let Some(sort) = sort {
        let mut docs: Vec<Document> = targets.iter().map(|(_, d)| d.clone()).collect();
        let seqs: Vec<(u64, Document)> = targets.clone();
        query::sort_documents(&mut docs, sort);
        targets = docs
            .into_iter()
            .filter_map(|d| seqs.iter().find(|(_, o)| *o == d).map(|(s, _)| (*s, d)))
            .collect();
    }
    if !multi {
        targets.truncate(1);
    }
    check_all(ex, db, coll, &targets)?;
    let mut outcome = UpdateOutcome {
        n: 0,
        n_modified: 0,
        upserted: None,
        old: None,
        new: None,
    };
    for (seq, old) in targets {
        let mut new = old.clone();
        query::apply_update(&mut new, update, false)?;
        outcome.n += 1;
        if !query::documents_equal(&old, &new) {
            outcome.n_modified += 1;
            let id = new.get("_id").cloned().unwrap_or(Bson::Null);
            ex.inner
                .replace_doc(&ex.txn, db, coll, seq, new.clone())
                .map_err(|why| refused(why, &format!("{db}.{coll}"), &id))?;
        }
        outcome.old = Some(old);
        outcome.new = Some(new);
    }
    if outcome.n == 0 && upsert {
        let mut doc = if query::is_operator_update(update) {
            query::upsert_seed(filter)
        } else {
            let mut seed = Document::new();
            if let Some(id) = filter
                .get("_id")
                .filter(|v| !matches!(v, Bson::Document(_)))
            {
                seed.insert("_id", id.clone());
            }
            seed
        };
        query::apply_update(&mut doc, update, true)?;
        let doc = with_id_first(doc);
        let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
        ex.inner
            .insert_doc(&ex.txn, db, coll, doc.clone())
            .map_err(|why| refused(why, &format!("{db}.{coll}"), &id))?;
        outcome.upserted = Some(id);
        outcome.new = Some(doc);
    }
    Ok(outcome)
}

fn update(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let statements = req.documents("updates")?;
    let ordered = req.body.get_bool("ordered").unwrap_or(true);
    let ids = stmt_ids(req, statements.len());
    let (mut n, mut n_modified) = (ex.resume.n, ex.resume.n_modified);
    let mut upserted = std::mem::take(&mut ex.resume.upserted);
    let mut write_errors = std::mem::take(&mut ex.resume.write_errors);
    let first = ex.resume.next_statement;
    for (index, statement) in statements.iter().enumerate().skip(first) {
        let stmt = ids[index];
        if let Some(StmtOutcome::Write {
            n: rn,
            n_modified: rm,
            upserted: ru,
        }) = ex.inner.recorded(&ex.txn, stmt)
        {
            n += rn;
            n_modified += rm;
            if let Some(id) = ru {
                upserted.push(doc! { "index": index as i32, "_id": id });
            }
            continue;
        }
        let filter = match statement.get("q") {
            Some(Bson::Document(q)) => q.clone(),
            _ => Document::new(),
        };
        let Some(u) = statement.get("u") else {
            let err = CommandError::new(
                errors::FAILED_TO_PARSE,
                "BSON field 'update.updates.u' is missing but a required field",
            );
            return Err(err);
        };
        let result = update_one_statement(
            ex,
            (&req.db, &coll),
            &filter,
            u,
            truthy(statement.get("multi")),
            truthy(statement.get("upsert")),
            None,
        );
        match result {
            Ok(o) => {
                n += o.n + i64::from(o.upserted.is_some());
                n_modified += o.n_modified;
                if let Some(id) = &o.upserted {
                    upserted.push(doc! { "index": index as i32, "_id": id.clone() });
                }
                ex.inner.record(
                    &ex.txn,
                    stmt,
                    StmtOutcome::Write {
                        n: o.n + i64::from(o.upserted.is_some()),
                        n_modified: o.n_modified,
                        upserted: o.upserted,
                    },
                );
            }
            Err(err) if err.code == BLOCKED_BY_TRANSACTION => {
                *ex.resume = Resume {
                    next_statement: index,
                    n,
                    n_modified,
                    upserted,
                    write_errors,
                };
                return Err(err);
            }
            Err(err) => {
                if in_transaction(ex) {
                    return Err(err);
                }
                write_errors.push(write_error(index, &err));
                if ordered {
                    break;
                }
            }
        }
    }
    let mut reply = doc! { "n": n as i32, "nModified": n_modified as i32 };
    if !upserted.is_empty() {
        reply.insert("upserted", upserted);
    }
    if !write_errors.is_empty() {
        reply.insert("writeErrors", write_errors);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

fn delete(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let statements = req.documents("deletes")?;
    let ids = stmt_ids(req, statements.len());
    let mut n = ex.resume.n;
    let first = ex.resume.next_statement;
    for (index, statement) in statements.iter().enumerate().skip(first) {
        let stmt = ids[index];
        if let Some(StmtOutcome::Write { n: rn, .. }) = ex.inner.recorded(&ex.txn, stmt) {
            n += rn;
            continue;
        }
        let filter = match statement.get("q") {
            Some(Bson::Document(q)) => q.clone(),
            _ => Document::new(),
        };
        let limit = as_i64(statement.get("limit")).unwrap_or(0);
        let mut targets = matching(ex, &req.db, &coll, &filter)?;
        if limit == 1 {
            targets.truncate(1);
        }
        if let Err(err) = check_all(ex, &req.db, &coll, &targets) {
            if err.code == BLOCKED_BY_TRANSACTION {
                *ex.resume = Resume {
                    next_statement: index,
                    n,
                    ..Resume::default()
                };
            }
            return Err(err);
        }
        let mut deleted = 0i64;
        for (seq, doc) in targets {
            let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
            if ex
                .inner
                .delete_doc(&ex.txn, &req.db, &coll, seq)
                .map_err(|why| refused(why, &req.ns(&coll), &id))?
                .is_some()
            {
                deleted += 1;
            }
        }
        n += deleted;
        ex.inner.record(
            &ex.txn,
            stmt,
            StmtOutcome::Write {
                n: deleted,
                n_modified: 0,
                upserted: None,
            },
        );
    }
    Ok(doc! { "n": n as i32, "ok": 1.0 })
}

fn find_and_modify(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let stmt = stmt_ids(req, 1)[0];
    if let Some(StmtOutcome::Reply(reply)) = ex.inner.recorded(&ex.txn, stmt) {
        return Ok(reply);
    }
    let filter = req.doc_field("query")?;
    let sort = req.doc_field("sort")?;
    let fields = req.doc_field("fields")?;
    let return_new = truthy(req.body.get("new"));
    let remove = truthy(req.body.get("remove"));
    let upsert = truthy(req.body.get("upsert"));
    let shape = |d: Option<Document>| {
        d.map(|d| Bson::Document(query::project(&d, &fields)))
            .unwrap_or(Bson::Null)
    };
    let reply = if remove {
        if req.body.contains_key("update") {
            return Err(CommandError::new(
                errors::FAILED_TO_PARSE,
                "Cannot specify both an update and remove=true",
            ));
        }
        let mut targets: Vec<Document> = matching(ex, &req.db, &coll, &filter)?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        query::sort_documents(&mut targets, &sort);
        let victim = targets.into_iter().next();
        if let Some(doc) = &victim {
            let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
            ex.inner
                .check_write(&ex.txn, &req.db, &coll, &doc_id(&id))
                .map_err(|why| refused(why, &req.ns(&coll), &id))?;
            let seq = ex
                .inner
                .store
                .collection(&req.db, &coll)
                .and_then(|c| c.seq_of_id(&id));
            if let Some(seq) = seq {
                ex.inner
                    .delete_doc(&ex.txn, &req.db, &coll, seq)
                    .map_err(|why| refused(why, &req.ns(&coll), &id))?;
            }
        }
        doc! {
            "lastErrorObject": { "n": i32::from(victim.is_some()) },
            "value": shape(victim),
            "ok": 1.0,
        }
    } else {
        let Some(update) = req.body.get("update") else {
            return Err(CommandError::new(
                errors::FAILED_TO_PARSE,
                "Either an update or remove=true must be specified",
            ));
        };
        let o = update_one_statement(
            ex,
            (&req.db, &coll),
            &filter,
            update,
            false,
            upsert,
            Some(&sort),
        )?;
        let mut last = doc! {
            "n": i32::from(o.n > 0 || o.upserted.is_some()),
            "updatedExisting": o.n > 0,
        };
        if let Some(id) = &o.upserted {
            last.insert("upserted", id.clone());
        }
        let value = if return_new { o.new } else { o.old };
        doc! { "lastErrorObject": last, "value": shape(value), "ok": 1.0 }
    };
    ex.inner
        .record(&ex.txn, stmt, StmtOutcome::Reply(reply.clone()));
    Ok(reply)
}

/// Takes up to `limit` documents (and at most 16 MiB, but at least one).
fn take_batch(remaining: &mut VecDeque<Document>, limit: Option<usize>) -> Vec<Bson> {
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    while let Some(next) = remaining.front() {
        if limit.is_some_and(|l| batch.len() >= l) {
            break;
        }
        let size = bson::to_vec(next).map(|v| v.len()).unwrap_or(0);
        if !batch.is_empty() && bytes.saturating_add(size) > MAX_BATCH_BYTES {
            break;
        }
        bytes = bytes.saturating_add(size);
        if let Some(doc) = remaining.pop_front() {
            batch.push(Bson::Document(doc));
        }
    }
    batch
}

fn new_cursor_id(inner: &Inner) -> i64 {
    loop {
        let id = rand::random::<i64>() & i64::MAX;
        if id != 0 && !inner.cursors.contains_key(&id) {
            return id;
        }
    }
}

/// A cursor reply over `docs`; registers a cursor if documents remain.
fn cursor_reply(
    ex: &mut Exec<'_>,
    ns: String,
    docs: Vec<Document>,
    batch_size: Option<usize>,
    single_batch: bool,
) -> Document {
    let mut remaining: VecDeque<Document> = docs.into();
    let first_limit = batch_size.unwrap_or(DEFAULT_FIRST_BATCH);
    let first_batch = take_batch(&mut remaining, Some(first_limit));
    let keep_open = !single_batch && (!remaining.is_empty() || first_limit == 0);
    let id = if keep_open {
        let id = new_cursor_id(ex.inner);
        ex.inner.cursors.insert(
            id,
            Cursor {
                ns: ns.clone(),
                remaining,
                session: ex.lsid.clone(),
                last_use: Instant::now(),
            },
        );
        id
    } else {
        0
    };
    let mut cursor = doc! { "firstBatch": first_batch, "id": id, "ns": ns };
    if let Some(at) = ex.read_concern.at_cluster_time {
        cursor.insert("atClusterTime", at);
    }
    doc! { "cursor": cursor, "ok": 1.0 }
}

fn find(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let coll = req.collection()?;
    let filter = req.doc_field("filter")?;
    let sort = req.doc_field("sort")?;
    let projection = req.doc_field("projection")?;
    let skip = as_count(req.body.get("skip"), "skip")?.unwrap_or(0);
    let raw_limit = as_i64(req.body.get("limit")).unwrap_or(0);
    let single_batch = truthy(req.body.get("singleBatch")) || raw_limit < 0;
    let limit = usize::try_from(raw_limit.unsigned_abs()).unwrap_or(usize::MAX);
    let batch_size = as_count(req.body.get("batchSize"), "batchSize")?;
    let mut docs: Vec<Document> = matching(ex, &req.db, &coll, &filter)?
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    query::sort_documents(&mut docs, &sort);
    let mut docs: Vec<Document> = docs.into_iter().skip(skip).collect();
    if limit > 0 {
        // Truncating here closes the cursor once the limit is reached.
        docs.truncate(limit);
    }
    let docs = docs
        .iter()
        .map(|d| query::project(d, &projection))
        .collect();
    Ok(cursor_reply(
        ex,
        req.ns(&coll),
        docs,
        batch_size,
        single_batch,
    ))
}

fn get_more(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let id = match req.body.get("getMore") {
        Some(Bson::Int64(id)) => *id,
        _ => {
            return Err(CommandError::new(
                errors::TYPE_MISMATCH,
                "BSON field 'getMore.getMore' is the wrong type, expected type 'long'",
            ))
        }
    };
    if !matches!(req.body.get("collection"), Some(Bson::String(_))) {
        return Err(CommandError::new(
            40414,
            "BSON field 'getMore.collection' is missing but a required field",
        ));
    }
    let batch_size = as_count(req.body.get("batchSize"), "batchSize")?.filter(|b| *b > 0);
    let lsid = ex.lsid.clone();
    let Some(cursor) = ex.inner.cursors.get_mut(&id) else {
        return Err(CommandError::new(
            errors::CURSOR_NOT_FOUND,
            format!("cursor id {id} not found"),
        ));
    };
    match (&lsid, &cursor.session) {
        (Some(mine), None) => {
            return Err(CommandError::new(
                errors::GETMORE_NOT_IN_SESSION,
                format!("Cannot run getMore on cursor {id}, which was not created in a session, in session {}", mine.display()),
            ))
        }
        (None, Some(owner)) => {
            return Err(CommandError::new(
                errors::GETMORE_WITHOUT_LSID,
                format!("Cannot run getMore on cursor {id}, which was created in session {}, without an lsid", owner.display()),
            ))
        }
        (Some(mine), Some(owner)) if mine != owner => {
            return Err(CommandError::new(
                errors::GETMORE_OTHER_SESSION,
                format!(
                    "Cannot run getMore on cursor {id}, which was created in session {}, in session {}",
                    owner.display(),
                    mine.display()
                ),
            ))
        }
        _ => {}
    }
    cursor.last_use = Instant::now();
    let batch = take_batch(&mut cursor.remaining, batch_size);
    let ns = cursor.ns.clone();
    let exhausted = cursor.remaining.is_empty();
    if exhausted {
        ex.inner.cursors.remove(&id);
    }
    Ok(doc! {
        "cursor": { "nextBatch": batch, "id": if exhausted { 0 } else { id }, "ns": ns },
        "ok": 1.0,
    })
}

/// killCursors checks neither the cursor's session nor its user (the server
/// checks only the authenticated user; skipping that too is a simplification).
fn kill_cursors(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let Ok(ids) = req.body.get_array("cursors") else {
        return Err(CommandError::new(
            errors::FAILED_TO_PARSE,
            "BSON field 'killCursors.cursors' is missing but a required field",
        ));
    };
    let (mut killed, mut not_found) = (Vec::new(), Vec::new());
    for id in ids {
        let Some(id) = as_i64(Some(id)) else {
            continue;
        };
        if ex.inner.cursors.remove(&id).is_some() {
            killed.push(Bson::Int64(id));
        } else {
            not_found.push(Bson::Int64(id));
        }
    }
    Ok(doc! {
        "cursorsKilled": killed,
        "cursorsNotFound": not_found,
        "cursorsAlive": [],
        "cursorsUnknown": [],
        "ok": 1.0,
    })
}

fn count(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let coll = req.collection()?;
    let filter = req.doc_field("query")?;
    let skip = as_count(req.body.get("skip"), "skip")?.unwrap_or(0);
    let limit = as_i64(req.body.get("limit"))
        .map(|l| usize::try_from(l.unsigned_abs()).unwrap_or(usize::MAX));
    let mut n = matching(ex, &req.db, &coll, &filter)?
        .len()
        .saturating_sub(skip);
    if let Some(limit) = limit.filter(|l| *l > 0) {
        n = n.min(limit);
    }
    Ok(doc! { "n": i32::try_from(n).unwrap_or(i32::MAX), "ok": 1.0 })
}

fn distinct(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let coll = req.collection()?;
    let Ok(key) = req.body.get_str("key") else {
        return Err(CommandError::new(
            errors::FAILED_TO_PARSE,
            "BSON field 'distinct.key' is missing but a required field",
        ));
    };
    let filter = req.doc_field("query")?;
    let mut values: Vec<Bson> = Vec::new();
    for (_, doc) in matching(ex, &req.db, &coll, &filter)? {
        let found = match query::get_path(&doc, key) {
            Some(Bson::Array(items)) => items.clone(),
            Some(v) => vec![v.clone()],
            None => Vec::new(),
        };
        for v in found {
            if !values.iter().any(|e| query::values_equal(e, &v)) {
                values.push(v);
            }
        }
    }
    values.sort_by(query::compare);
    let mut reply = doc! { "values": values };
    if let Some(at) = ex.read_concern.at_cluster_time {
        reply.insert("atClusterTime", at);
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

fn aggregate(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let Some(Bson::String(coll)) = req.body.get("aggregate") else {
        return Err(CommandError::new(
            errors::INVALID_NAMESPACE,
            "the sessionguard emulator supports only collection aggregations",
        ));
    };
    let coll = coll.clone();
    let Ok(pipeline) = req.body.get_array("pipeline") else {
        return Err(CommandError::new(
            errors::FAILED_TO_PARSE,
            "BSON field 'aggregate.pipeline' is missing but a required field",
        ));
    };
    let Ok(cursor_opts) = req.body.get_document("cursor") else {
        return Err(CommandError::new(
            errors::FAILED_TO_PARSE,
            "The 'cursor' option is required, except for aggregate with the explain argument",
        ));
    };
    let batch_size = as_count(cursor_opts.get("batchSize"), "batchSize")?;
    let mut docs: Vec<Document> = ex
        .inner
        .visible(&req.db, &coll, &ex.txn)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    for stage in pipeline {
        let Bson::Document(stage) = stage else {
            return Err(CommandError::new(
                errors::TYPE_MISMATCH,
                "Each element of the 'pipeline' array must be an object",
            ));
        };
        let Some((name, spec)) = stage.iter().next() else {
            return Err(CommandError::bad_value(
                "A pipeline stage specification object must contain exactly one field.",
            ));
        };
        docs = apply_stage(docs, name, spec)?;
    }
    Ok(cursor_reply(ex, req.ns(&coll), docs, batch_size, false))
}

fn apply_stage(
    docs: Vec<Document>,
    name: &str,
    spec: &Bson,
) -> Result<Vec<Document>, CommandError> {
    let spec_doc = || match spec {
        Bson::Document(d) => Ok(d),
        _ => Err(CommandError::bad_value(format!(
            "the {name} stage specification must be an object"
        ))),
    };
    let spec_count = || {
        as_i64(Some(spec))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| CommandError::bad_value(format!("invalid argument to {name} stage")))
    };
    Ok(match name {
        "$match" => {
            let filter = spec_doc()?;
            let mut out = Vec::new();
            for d in docs {
                if query::matches(&d, filter)? {
                    out.push(d);
                }
            }
            out
        }
        "$sort" => {
            let mut docs = docs;
            query::sort_documents(&mut docs, spec_doc()?);
            docs
        }
        "$skip" => docs.into_iter().skip(spec_count()?).collect(),
        "$limit" => docs.into_iter().take(spec_count()?).collect(),
        "$project" => {
            let projection = spec_doc()?;
            docs.iter().map(|d| query::project(d, projection)).collect()
        }
        "$count" => {
            let Bson::String(field) = spec else {
                return Err(CommandError::bad_value(
                    "the count field must be a non-empty string",
                ));
            };
            if docs.is_empty() {
                Vec::new()
            } else {
                vec![doc! { field.clone(): i32::try_from(docs.len()).unwrap_or(i32::MAX) }]
            }
        }
        "$group" => group(docs, spec_doc()?)?,
        other => {
            return Err(CommandError::new(
                40324,
                format!("Unrecognized pipeline stage name: '{other}'"),
            ))
        }
    })
}

/// Evaluates a group key or accumulator argument: "$field" or a constant.
fn eval(doc: &Document, expr: &Bson) -> Bson {
    match expr {
        Bson::String(s) if s.starts_with('$') => {
            query::get_path(doc, &s[1..]).cloned().unwrap_or(Bson::Null)
        }
        other => other.clone(),
    }
}

fn add(a: &Bson, b: &Bson) -> Bson {
    match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => x
            .checked_add(*y)
            .map(Bson::Int32)
            .unwrap_or(Bson::Int64(i64::from(*x) + i64::from(*y))),
        (Bson::Int64(x), Bson::Int32(y)) => Bson::Int64(x.saturating_add(i64::from(*y))),
        (Bson::Int32(x), Bson::Int64(y)) => Bson::Int64(i64::from(*x).saturating_add(*y)),
        (Bson::Int64(x), Bson::Int64(y)) => Bson::Int64(x.saturating_add(*y)),
        (x, y) => match (as_f64(x), as_f64(y)) {
            (Some(x), Some(y)) => Bson::Double(x + y),
            (Some(_), None) => a.clone(),
            (None, Some(_)) => b.clone(),
            _ => Bson::Int32(0),
        },
    }
}

/// `$group` with a constant or field `_id` and `$sum $min $max $first $last $push $avg`.
fn group(docs: Vec<Document>, spec: &Document) -> Result<Vec<Document>, CommandError> {
    let Some(id_expr) = spec.get("_id") else {
        return Err(CommandError::new(
            15955,
            "a group specification must include an _id",
        ));
    };
    let mut groups: Vec<(Bson, Vec<Document>)> = Vec::new();
    for d in docs {
        let key = eval(&d, id_expr);
        match groups
            .iter_mut()
            .find(|(k, _)| query::values_equal(k, &key))
        {
            Some((_, members)) => members.push(d),
            None => groups.push((key, vec![d])),
        }
    }
    let mut out = Vec::new();
    for (key, members) in groups {
        let mut row = doc! { "_id": key };
        for (field, acc) in spec.iter().filter(|(k, _)| k.as_str() != "_id") {
            let Bson::Document(acc) = acc else {
                return Err(CommandError::new(
                    40234,
                    format!("The field '{field}' must be an accumulator object"),
                ));
            };
            let Some((op, arg)) = acc.iter().next() else {
                return Err(CommandError::new(
                    40234,
                    format!("The field '{field}' must be an accumulator object"),
                ));
            };
            let values: Vec<Bson> = members.iter().map(|m| eval(m, arg)).collect();
            let value = match op.as_str() {
                "$sum" => values.iter().fold(Bson::Int32(0), |acc, v| add(&acc, v)),
                "$avg" => {
                    let nums: Vec<f64> = values.iter().filter_map(as_f64).collect();
                    if nums.is_empty() {
                        Bson::Null
                    } else {
                        Bson::Double(nums.iter().sum::<f64>() / nums.len() as f64)
                    }
                }
                "$min" => values
                    .iter()
                    .filter(|v| !matches!(v, Bson::Null))
                    .min_by(|a, b| query::compare(a, b))
                    .cloned()
                    .unwrap_or(Bson::Null),
                "$max" => values
                    .iter()
                    .filter(|v| !matches!(v, Bson::Null))
                    .max_by(|a, b| query::compare(a, b))
                    .cloned()
                    .unwrap_or(Bson::Null),
                "$first" => values.first().cloned().unwrap_or(Bson::Null),
                "$last" => values.last().cloned().unwrap_or(Bson::Null),
                "$push" => Bson::Array(values),
                other => {
                    return Err(CommandError::new(
                        15952,
                        format!("unknown group operator '{other}'"),
                    ))
                }
            };
            row.insert(field.clone(), value);
        }
        out.push(row);
    }
    Ok(out)
}

fn id_index() -> Document {
    doc! { "v": 2, "key": { "_id": 1 }, "name": "_id_" }
}

fn create_indexes(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let specs = req.documents("indexes")?;
    let created = ex.inner.store.ensure_collection(&req.db, &coll);
    let Some(c) = ex.inner.store.collection_mut(&req.db, &coll) else {
        return Err(CommandError::new(
            errors::NAMESPACE_NOT_FOUND,
            "collection vanished",
        ));
    };
    let before = c.indexes.len() + 1;
    for spec in specs {
        let (Ok(_key), Ok(name)) = (spec.get_document("key"), spec.get_str("name")) else {
            return Err(CommandError::new(
                errors::FAILED_TO_PARSE,
                "index specification must have 'key' and 'name'",
            ));
        };
        if name == "_id_" || c.indexes.iter().any(|i| i.get_str("name") == Ok(name)) {
            continue;
        }
        let mut stored = doc! { "v": 2 };
        stored.extend(spec.clone());
        c.indexes.push(stored);
    }
    let after = c.indexes.len() + 1;
    let mut reply = doc! {
        "numIndexesBefore": before as i32,
        "numIndexesAfter": after as i32,
        "createdCollectionAutomatically": created,
    };
    if before == after {
        reply.insert("note", "all indexes already exist");
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

fn list_indexes(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let coll = req.collection()?;
    let ns = req.ns(&coll);
    let Some(c) = ex.inner.store.collection(&req.db, &coll) else {
        return Err(CommandError::new(
            errors::NAMESPACE_NOT_FOUND,
            format!("ns does not exist: {ns}"),
        ));
    };
    let mut docs = vec![id_index()];
    docs.extend(c.indexes.iter().cloned());
    let batch_size = req
        .body
        .get_document("cursor")
        .ok()
        .and_then(|c| as_i64(c.get("batchSize")))
        .and_then(|b| usize::try_from(b).ok());
    Ok(cursor_reply(ex, ns, docs, batch_size, false))
}

fn drop_indexes(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let ns = req.ns(&coll);
    let Some(c) = ex.inner.store.collection_mut(&req.db, &coll) else {
        return Err(CommandError::new(
            errors::NAMESPACE_NOT_FOUND,
            format!("ns not found {ns}"),
        ));
    };
    let was = c.indexes.len() + 1;
    match req.body.get("index") {
        Some(Bson::String(s)) if s == "*" => c.indexes.clear(),
        Some(Bson::String(s)) if s == "_id_" => {
            return Err(CommandError::new(
                errors::INVALID_OPTIONS,
                "cannot drop _id index",
            ));
        }
        Some(Bson::String(name)) => {
            let Some(pos) = c
                .indexes
                .iter()
                .position(|i| i.get_str("name") == Ok(name.as_str()))
            else {
                return Err(CommandError::new(
                    errors::INDEX_NOT_FOUND,
                    format!("index not found with name [{name}]"),
                ));
            };
            c.indexes.remove(pos);
        }
        Some(Bson::Array(names)) => {
            for name in names.iter().filter_map(Bson::as_str) {
                let Some(pos) = c.indexes.iter().position(|i| i.get_str("name") == Ok(name)) else {
                    return Err(CommandError::new(
                        errors::INDEX_NOT_FOUND,
                        format!("index not found with name [{name}]"),
                    ));
                };
                c.indexes.remove(pos);
            }
        }
        Some(Bson::Document(key)) => {
            let Some(pos) = c.indexes.iter().position(|i| {
                i.get_document("key")
                    .is_ok_and(|k| query::documents_equal(k, key))
            }) else {
                return Err(CommandError::new(
                    errors::INDEX_NOT_FOUND,
                    format!("can't find index with key: {key}"),
                ));
            };
            c.indexes.remove(pos);
        }
        _ => {
            return Err(CommandError::new(
                errors::FAILED_TO_PARSE,
                "BSON field 'dropIndexes.index' is missing but a required field",
            ));
        }
    }
    Ok(doc! { "nIndexesWas": was as i32, "ok": 1.0 })
}

fn list_collections(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let filter = req.doc_field("filter")?;
    let name_only = truthy(req.body.get("nameOnly"));
    let mut docs = Vec::new();
    for name in ex.inner.store.collection_names(&req.db) {
        let entry = if name_only {
            doc! { "name": name, "type": "collection" }
        } else {
            doc! {
                "name": name,
                "type": "collection",
                "options": {},
                "info": { "readOnly": false },
                "idIndex": id_index(),
            }
        };
        if query::matches(&entry, &filter)? {
            docs.push(entry);
        }
    }
    let batch_size = req
        .body
        .get_document("cursor")
        .ok()
        .and_then(|c| as_i64(c.get("batchSize")))
        .and_then(|b| usize::try_from(b).ok());
    Ok(cursor_reply(
        ex,
        format!("{}.$cmd.listCollections", req.db),
        docs,
        batch_size,
        false,
    ))
}

fn list_databases(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    let name_only = truthy(req.body.get("nameOnly"));
    let filter = req.doc_field("filter")?;
    let mut databases = Vec::new();
    let mut total: i64 = 0;
    for name in ex.inner.store.database_names() {
        let size = i64::try_from(ex.inner.store.database_doc_count(&name))
            .unwrap_or(i64::MAX)
            .saturating_mul(4096)
            .max(4096);
        let entry = if name_only {
            doc! { "name": name }
        } else {
            doc! { "name": name, "sizeOnDisk": size, "empty": false }
        };
        if query::matches(&entry, &filter)? {
            total = total.saturating_add(size);
            databases.push(entry);
        }
    }
    let mut reply = doc! { "databases": databases };
    if !name_only {
        reply.insert("totalSize", total);
        reply.insert("totalSizeMb", total / (1024 * 1024));
    }
    reply.insert("ok", 1.0);
    Ok(reply)
}

fn create(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    if !ex.inner.store.ensure_collection(&req.db, &coll) {
        return Err(CommandError::new(
            errors::NAMESPACE_EXISTS,
            format!("Collection {} already exists.", req.ns(&coll)),
        ));
    }
    Ok(doc! { "ok": 1.0 })
}

fn drop(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    let coll = req.collection()?;
    let ns = req.ns(&coll);
    // As of 7.0 dropping a missing collection succeeds.
    match ex.inner.store.drop_collection(&req.db, &coll) {
        Some(dropped) => {
            ex.inner.cursors.retain(|_, c| c.ns != ns);
            Ok(doc! { "nIndexesWas": (dropped.indexes.len() + 1) as i32, "ns": ns, "ok": 1.0 })
        }
        None => Ok(doc! { "ok": 1.0 }),
    }
}

fn drop_database(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    require_writable(ex)?;
    ex.inner.store.drop_database(&req.db);
    let prefix = format!("{}.", req.db);
    ex.inner.cursors.retain(|_, c| !c.ns.starts_with(&prefix));
    Ok(doc! { "ok": 1.0 })
}

fn transaction_admin_checks(ex: &Exec<'_>, req: &Request) -> Result<(), CommandError> {
    if req.db != "admin" {
        return Err(CommandError::new(
            errors::UNAUTHORIZED,
            format!("{} may only be run against the admin database.", req.name),
        ));
    }
    if !in_transaction(ex) {
        return Err(CommandError::new(
            errors::INVALID_OPTIONS,
            format!("{} must be run within a transaction", req.name),
        ));
    }
    Ok(())
}

fn commit_transaction(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    transaction_admin_checks(ex, req)?;
    ex.inner.commit(&ex.txn);
    Ok(doc! { "ok": 1.0 })
}

fn abort_transaction(ex: &mut Exec<'_>, req: &Request) -> CommandResult {
    transaction_admin_checks(ex, req)?;
    ex.inner.abort(&ex.txn);
    Ok(doc! { "ok": 1.0 })
}
