//! The `failCommand` fail point, the fault vocabulary of the drivers' own
//! spec tests (unified test format, transactions, retryable writes, SDAM):
//! `configureFailPoint` parses and stores it, and every command asks
//! [`FailPoints::activate`] whether it fires. It owns the fail point's
//! configuration and its counting; the connection layer (`server.rs`)
//! carries out what a [`Fault`] says (wait, close, answer an error, decorate
//! or drop the reply). No I/O, no lock held beyond one activation.
//!
//! As on the server (commands.cpp, service_entry_point_common.cpp):
//! - only commands named in `data.failCommands` are failed (`hello`,
//!   `configureFailPoint` and the authentication commands included, when
//!   named); `appName` restricts it to connections whose handshake gave that
//!   application name;
//! - `blockConnection` waits `blockTimeMS` first, then `closeConnection`
//!   closes the connection without a reply, else `errorCode` answers
//!   `{ok: 0, code, codeName, errmsg: "Failing command via 'failCommand'
//!   failpoint", errorLabels}`, all before the command runs;
//!   `writeConcernError` lets the command run and adds the document to its
//!   reply (only for commands that take a write concern);
//! - `errorLabels`, when given, replace the labels the server would compute
//!   (an empty array means none);
//! - `mode`: `"alwaysOn"`, `"off"`, `{times: n}` (fires n times, then off),
//!   `{skip: n}` (lets n matching commands through, then always fires); only
//!   commands the fail point matches count;
//! - `configureFailPoint` runs on `admin` only and answers
//!   `{count: <times the fail point fired before>, ok: 1}`.
//!
//! Not consulted by `EmulatorConfig::fast`'s canned answers (benchmarks).
//!
//! Differences, on purpose:
//! - one fail point per emulated deployment, shared by every member and
//!   connection (a real deployment has one per `mongod` process);
//! - one activation per command: a fail point with both `errorCode` and
//!   `writeConcernError` fires once (the error wins);
//! - an extension no server has, for the fault networks cause and servers
//!   cannot inject: `closeConnectionAfterExecution: true` runs the command
//!   (the write applied, its retryable-write history recorded) and then
//!   closes the connection without a reply — the "write applied, reply lost"
//!   case behind every retryable-write retry.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bson::{doc, Bson, Document};

use super::errors::{CommandError, BAD_VALUE, FAILED_TO_PARSE, TYPE_MISMATCH, UNAUTHORIZED};
use super::locks::lock;
use super::query::as_i64;

/// The only fail point the emulator knows.
pub(crate) const FAIL_COMMAND: &str = "failCommand";
/// The message of every error `failCommand` injects (the server's).
pub(crate) const FAIL_COMMAND_ERRMSG: &str = "Failing command via 'failCommand' failpoint";

/// Commands that take a write concern (so `writeConcernError` applies).
const WRITE_CONCERN_COMMANDS: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "commitTransaction",
    "abortTransaction",
    "create",
    "drop",
    "dropDatabase",
    "createIndexes",
    "dropIndexes",
    "deleteIndexes",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    AlwaysOn,
    Times(u64),
    Skip(u64),
}

/// `failCommand`'s `data`.
#[derive(Debug, Clone, Default, PartialEq)]
struct FailData {
    commands: Vec<String>,
    app_name: Option<String>,
    block: Option<Duration>,
    close_connection: bool,
    close_after_execution: bool,
    error_code: Option<i32>,
    error_labels: Option<Vec<String>>,
    write_concern_error: Option<Document>,
}

#[derive(Debug)]
struct Active {
    mode: Mode,
    data: FailData,
}

/// What the fail point does to one command.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Fault {
    /// Wait this long before anything else (`blockConnection`).
    pub block: Option<Duration>,
    /// Close the connection without running the command or replying.
    pub close: bool,
    /// Answer this error without running the command.
    pub error: Option<InjectedError>,
    /// Run the command, then decorate or drop its reply.
    pub after: AfterExecution,
}

/// An `errorCode` the fail point answers with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InjectedError {
    pub code: i32,
    /// `errorLabels` as configured (replacing the computed ones), if given.
    pub labels: Option<Vec<String>>,
}

/// What happens to a command's reply once it has run.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct AfterExecution {
    /// Added to the reply as `writeConcernError`.
    pub write_concern_error: Option<Document>,
    /// Replace the reply's computed `errorLabels` (empty: none).
    pub error_labels: Option<Vec<String>>,
    /// Close the connection instead of sending the reply
    /// (`closeConnectionAfterExecution`, emulator-only).
    pub close: bool,
}

impl AfterExecution {
    pub(crate) fn is_noop(&self) -> bool {
        *self == AfterExecution::default()
    }
}

/// The deployment's fail points.
#[derive(Debug, Default)]
pub(crate) struct FailPoints {
    /// Whether a fail point may be on: commands skip the lock while it is
    /// not (the common case, and the only one a benchmark sees).
    armed: AtomicBool,
    active: Mutex<Option<Active>>,
    entered: AtomicU64,
}

impl FailPoints {
    /// Runs `configureFailPoint`.
    pub(crate) fn configure(&self, db: &str, body: &Document) -> Result<Document, CommandError> {
        if db != "admin" {
            return Err(CommandError::new(
                UNAUTHORIZED,
                "configureFailPoint may only be run against the admin database.",
            ));
        }
        let name = match body.get("configureFailPoint") {
            Some(Bson::String(name)) => name.as_str(),
            _ => {
                return Err(CommandError::new(
                    TYPE_MISMATCH,
                    "configureFailPoint must be a string naming the fail point",
                ))
            }
        };
        if name != FAIL_COMMAND {
            return Err(CommandError::bad_value(format!(
                "Cannot find failpoint: {name} (the sessionguard emulator has only {FAIL_COMMAND})"
            )));
        }
        let mode = parse_mode(body.get("mode"))?;
        let data = match body.get("data") {
            None => FailData::default(),
            Some(Bson::Document(data)) => parse_data(data)?,
            Some(_) => {
                return Err(CommandError::new(
                    TYPE_MISMATCH,
                    "the 'data' option must be an object",
                ))
            }
        };
        let count = self.entered.load(Ordering::Relaxed);
        tracing::info!(fail_point = name, mode = ?mode, commands = ?data.commands, "emulator fail point configured");
        let mut active = lock(&self.active);
        *active = mode.map(|mode| Active { mode, data });
        self.armed.store(active.is_some(), Ordering::Release);
        Ok(doc! { "count": i64::try_from(count).unwrap_or(i64::MAX), "ok": 1.0 })
    }

    /// Times the fail point has fired so far.
    pub(crate) fn entered(&self) -> u64 {
        self.entered.load(Ordering::Relaxed)
    }

    /// Whether the fail point fires for `command` on a connection whose
    /// handshake named `app_name`; counts it down when it does.
    pub(crate) fn activate(&self, command: &str, app_name: Option<&str>) -> Option<Fault> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut guard = lock(&self.active);
        let active = guard.as_mut()?;
        let data = &active.data;
        if !data.commands.iter().any(|c| c == command) {
            return None;
        }
        if data
            .app_name
            .as_deref()
            .is_some_and(|want| Some(want) != app_name)
        {
            return None;
        }
        let fault = fault_for(data, command)?;
        match &mut active.mode {
            Mode::AlwaysOn => {}
            Mode::Skip(n) if *n > 0 => {
                *n -= 1;
                return None;
            }
            Mode::Skip(_) => {}
            Mode::Times(n) => {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    *guard = None;
                    self.armed.store(false, Ordering::Release);
                }
            }
        }
        self.entered.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(command, "emulator fail point fired");
        Some(fault)
    }
}

/// The fault `data` makes of `command`; `None` when it has nothing to do
/// to it (the server's predicate needs an action the command can take).
fn fault_for(data: &FailData, command: &str) -> Option<Fault> {
    let error = data.error_code.map(|code| InjectedError {
        code,
        labels: data.error_labels.clone(),
    });
    let write_concern_error = data
        .write_concern_error
        .clone()
        .filter(|_| WRITE_CONCERN_COMMANDS.contains(&command));
    let fault = Fault {
        block: data.block,
        close: data.close_connection,
        after: AfterExecution {
            error_labels: write_concern_error.as_ref().and(data.error_labels.clone()),
            write_concern_error,
            close: data.close_after_execution,
        },
        error,
    };
    let does_something =
        fault.block.is_some() || fault.close || fault.error.is_some() || !fault.after.is_noop();
    does_something.then_some(fault)
}

/// `mode`: `None` is "off".
fn parse_mode(mode: Option<&Bson>) -> Result<Option<Mode>, CommandError> {
    let count = |value: Option<&Bson>, field: &str| {
        as_i64(value)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                CommandError::bad_value(format!("mode.{field} must be a non-negative number"))
            })
    };
    match mode {
        Some(Bson::String(s)) if s == "alwaysOn" => Ok(Some(Mode::AlwaysOn)),
        Some(Bson::String(s)) if s == "off" => Ok(None),
        Some(Bson::Document(d)) if d.contains_key("times") => {
            let n = count(d.get("times"), "times")?;
            Ok((n > 0).then_some(Mode::Times(n)))
        }
        Some(Bson::Document(d)) if d.contains_key("skip") => {
            Ok(Some(Mode::Skip(count(d.get("skip"), "skip")?)))
        }
        None => Err(CommandError::new(
            FAILED_TO_PARSE,
            "Missing required field 'mode'",
        )),
        Some(other) => Err(CommandError::new(
            BAD_VALUE,
            format!("unsupported fail point mode {other} (the sessionguard emulator knows \"alwaysOn\", \"off\", {{times: n}}, {{skip: n}})"),
        )),
    }
}

fn parse_data(data: &Document) -> Result<FailData, CommandError> {
    let strings = |field: &str| -> Result<Option<Vec<String>>, CommandError> {
        match data.get(field) {
            None => Ok(None),
            Some(Bson::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Bson::String(s) => Ok(s.clone()),
                    _ => Err(CommandError::new(
                        TYPE_MISMATCH,
                        format!("data.{field} must be an array of strings"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(CommandError::new(
                TYPE_MISMATCH,
                format!("data.{field} must be an array of strings"),
            )),
        }
    };
    let flag = |field: &str| match data.get(field) {
        None => Ok(false),
        Some(Bson::Boolean(b)) => Ok(*b),
        Some(_) => Err(CommandError::new(
            TYPE_MISMATCH,
            format!("data.{field} must be a boolean"),
        )),
    };
    let error_code = match data.get("errorCode") {
        None => None,
        value => Some(
            as_i64(value)
                .and_then(|c| i32::try_from(c).ok())
                .ok_or_else(|| {
                    CommandError::new(TYPE_MISMATCH, "data.errorCode must be an integer")
                })?,
        ),
    };
    let block = if flag("blockConnection")? {
        let ms = as_i64(data.get("blockTimeMS"))
            .and_then(|ms| u64::try_from(ms).ok())
            .ok_or_else(|| {
                CommandError::bad_value(
                    "data.blockTimeMS must be a non-negative number when blockConnection is true",
                )
            })?;
        Some(Duration::from_millis(ms))
    } else {
        None
    };
    let app_name = match data.get("appName") {
        None => None,
        Some(Bson::String(name)) => Some(name.clone()),
        Some(_) => {
            return Err(CommandError::new(
                TYPE_MISMATCH,
                "data.appName must be a string",
            ))
        }
    };
    let write_concern_error = match data.get("writeConcernError") {
        None => None,
        Some(Bson::Document(wce)) => Some(wce.clone()),
        Some(_) => {
            return Err(CommandError::new(
                TYPE_MISMATCH,
                "data.writeConcernError must be an object",
            ))
        }
    };
    Ok(FailData {
        commands: strings("failCommands")?.unwrap_or_default(),
        app_name,
        block,
        close_connection: flag("closeConnection")?,
        close_after_execution: flag("closeConnectionAfterExecution")?,
        error_code,
        error_labels: strings("errorLabels")?,
        write_concern_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configure(points: &FailPoints, mode: Bson, data: Document) -> Document {
        points
            .configure(
                "admin",
                &doc! { "configureFailPoint": FAIL_COMMAND, "mode": mode, "data": data },
            )
            .unwrap()
    }

    #[test]
    fn times_counts_down_only_on_matching_commands_then_turns_off() {
        let points = FailPoints::default();
        configure(
            &points,
            Bson::Document(doc! { "times": 2 }),
            doc! { "failCommands": ["insert"], "errorCode": 91 },
        );
        assert_eq!(points.activate("find", None), None);
        assert_eq!(
            points.activate("insert", None).unwrap().error.unwrap().code,
            91
        );
        assert!(points.activate("insert", None).is_some());
        assert_eq!(points.activate("insert", None), None);
        let reply = configure(&points, Bson::String("off".into()), doc! {});
        assert_eq!(reply.get_i64("count").unwrap(), 2);
    }

    #[test]
    fn skip_lets_the_first_ones_through_and_app_name_filters() {
        let points = FailPoints::default();
        configure(
            &points,
            Bson::Document(doc! { "skip": 1 }),
            doc! { "failCommands": ["find"], "closeConnection": true, "appName": "app" },
        );
        assert_eq!(points.activate("find", Some("other")), None);
        assert_eq!(points.activate("find", None), None);
        assert_eq!(points.activate("find", Some("app")), None, "skipped");
        assert!(points.activate("find", Some("app")).unwrap().close);
        assert!(points.activate("find", Some("app")).unwrap().close);
    }

    #[test]
    fn write_concern_errors_only_touch_commands_that_take_one() {
        let points = FailPoints::default();
        configure(
            &points,
            Bson::String("alwaysOn".into()),
            doc! {
                "failCommands": ["insert", "find"],
                "writeConcernError": { "code": 91, "errmsg": "Replication is being shut down" },
                "errorLabels": [],
            },
        );
        assert_eq!(points.activate("find", None), None);
        let after = points.activate("insert", None).unwrap().after;
        assert_eq!(after.error_labels, Some(Vec::new()));
        assert_eq!(
            after.write_concern_error.unwrap().get_i32("code").unwrap(),
            91
        );
        assert_eq!(points.entered(), 1);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let points = FailPoints::default();
        let refused = |db: &str, body: Document| points.configure(db, &body).unwrap_err().code;
        assert_eq!(
            refused(
                "app",
                doc! { "configureFailPoint": FAIL_COMMAND, "mode": "off" }
            ),
            UNAUTHORIZED
        );
        assert_eq!(
            refused(
                "admin",
                doc! { "configureFailPoint": "other", "mode": "off" }
            ),
            BAD_VALUE
        );
        assert_eq!(
            refused(
                "admin",
                doc! { "configureFailPoint": FAIL_COMMAND, "mode": { "activationProbability": 0.5 } }
            ),
            BAD_VALUE
        );
        assert_eq!(
            refused(
                "admin",
                doc! { "configureFailPoint": FAIL_COMMAND, "mode": "alwaysOn",
                "data": { "blockConnection": true } }
            ),
            BAD_VALUE
        );
    }
}
