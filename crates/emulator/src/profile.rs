//! Compatibility profiles and user privileges: which commands a server
//! refuses before it runs them, and how. It owns the refusal decision only;
//! a refused command reaches no session, cursor or document (the caller
//! checks here before it touches anything), so it changes nothing.
//!
//! Profiles (see [`Profile`]):
//! - `mongodb` (default): a MongoDB 7.0 server; nothing refused.
//! - `documentdb`: Microsoft DocumentDB (the engine behind FerretDB 2 and
//!   Azure Cosmos DB for MongoDB vCore), as its replies were captured
//!   (`/work/shared/server-replies/documentdb.json` in the project's shared
//!   data): a mongos-like hello (`msg: "isdbgrid"`, no `setName`, no
//!   `topologyVersion`, no `$clusterTime`), and `refreshSessions`,
//!   `killSessions`, `killAllSessions`, `killAllSessionsByPattern` and
//!   `startSession` answered CommandNotSupported (115) with
//!   `errmsg: "Unknown request received: <name>"`; `endSessions`, sessions
//!   and transactions work.
//! - `atlas-shared`: MongoDB Atlas free and shared tiers (M0, Flex), which
//!   document `killSessions`, `killAllSessions` and `killAllSessionsByPattern`
//!   as unsupported. Their proxy refuses with `code: 8000`,
//!   `codeName: "AtlasError"`; the message follows the shape Atlas documents
//!   for its tier limits ("command `<name>` is not allowed in this Atlas
//!   tier"). Everything else behaves like `mongodb` (a replica set).
//!
//! Privileges: a user in `EmulatorConfig::users` is `root` unless
//! `EmulatorConfig::user_roles` gives it [`UserRole::ReadWriteAnyDatabase`],
//! which (as on the server) lacks the `killAnySession` and
//! `replSetStateChange` actions: `killAllSessions` and
//! `killAllSessionsByPattern` (checked by the server before it runs them, even
//! for the user's own sessions — SERVER-54216) and `replSetStepDown` are
//! refused with Unauthorized (13), `"not authorized on <db> to execute command
//! <command>"`. `killSessions` needs no privilege: it only ever kills the
//! caller's own sessions (the server keys sessions by lsid and user).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use bson::Document;

use super::errors::{CommandError, ATLAS_ERROR, COMMAND_NOT_SUPPORTED, UNAUTHORIZED};

/// Which server the emulator behaves like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// MongoDB 7.0 (the default).
    #[default]
    MongoDb,
    /// Microsoft DocumentDB (FerretDB 2, Azure Cosmos DB for MongoDB vCore):
    /// presents itself as a mongos; refuses the session-management commands
    /// with CommandNotSupported (115).
    DocumentDb,
    /// MongoDB Atlas free and shared tiers (M0, Flex): refuses the kill
    /// commands with AtlasError (8000).
    AtlasShared,
}

impl Profile {
    pub const NAMES: [&'static str; 3] = ["mongodb", "documentdb", "atlas-shared"];

    pub fn name(self) -> &'static str {
        match self {
            Profile::MongoDb => "mongodb",
            Profile::DocumentDb => "documentdb",
            Profile::AtlasShared => "atlas-shared",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Profile, String> {
        match s {
            "mongodb" => Ok(Profile::MongoDb),
            "documentdb" => Ok(Profile::DocumentDb),
            "atlas-shared" => Ok(Profile::AtlasShared),
            other => Err(format!(
                "unknown emulator profile '{other}' (expected one of: {})",
                Profile::NAMES.join(", ")
            )),
        }
    }
}

/// The built-in role a user has, as far as the emulator checks privileges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserRole {
    /// `root`: every privilege (every user not listed in `user_roles`).
    #[default]
    Root,
    /// `readWriteAnyDatabase`: data commands and its own sessions; no
    /// `killAnySession`, no `replSetStateChange`.
    ReadWriteAnyDatabase,
}

/// What DocumentDB answers 115 to (the replies captured from a real one).
const DOCUMENTDB_UNSUPPORTED: &[&str] = &[
    "refreshSessions",
    "killSessions",
    "killAllSessions",
    "killAllSessionsByPattern",
    "startSession",
];

/// What Atlas's free and shared tiers refuse, among the commands the
/// emulator runs.
const ATLAS_SHARED_UNSUPPORTED: &[&str] = &[
    "killSessions",
    "killAllSessions",
    "killAllSessionsByPattern",
];

/// Commands that need a privilege `readWriteAnyDatabase` lacks.
const NEEDS_CLUSTER_PRIVILEGE: &[&str] = &[
    "killAllSessions",
    "killAllSessionsByPattern",
    "replSetStepDown",
];

/// The error a server of `profile` answers instead of running `command` for
/// `user` (whose role `user_roles` gives), if it refuses it.
pub(crate) fn refusal(
    profile: Profile,
    user_roles: &HashMap<String, UserRole>,
    command: &str,
    db: &str,
    body: &Document,
    user: Option<&str>,
) -> Option<CommandError> {
    match profile {
        Profile::DocumentDb if DOCUMENTDB_UNSUPPORTED.contains(&command) => {
            return Some(CommandError::new(
                COMMAND_NOT_SUPPORTED,
                format!("Unknown request received: {command}"),
            ));
        }
        Profile::AtlasShared if ATLAS_SHARED_UNSUPPORTED.contains(&command) => {
            return Some(CommandError::new(
                ATLAS_ERROR,
                format!("command {command} is not allowed in this Atlas tier"),
            ));
        }
        _ => {}
    }
    let role = user
        .and_then(|u| user_roles.get(u))
        .copied()
        .unwrap_or_default();
    if role == UserRole::ReadWriteAnyDatabase && NEEDS_CLUSTER_PRIVILEGE.contains(&command) {
        return Some(CommandError::new(
            UNAUTHORIZED,
            format!("not authorized on {db} to execute command {body}"),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator_config::EmulatorConfig;
    use bson::doc;

    #[test]
    fn profiles_parse_and_print_their_names() {
        for name in Profile::NAMES {
            assert_eq!(name.parse::<Profile>().unwrap().to_string(), name);
        }
        assert!("atlas"
            .parse::<Profile>()
            .unwrap_err()
            .contains("atlas-shared"));
    }

    #[test]
    fn each_profile_refuses_what_its_server_does() {
        let body = doc! { "killAllSessions": [], "$db": "admin" };
        let refused = |profile| {
            let config = EmulatorConfig {
                profile,
                ..EmulatorConfig::default()
            };
            refusal(
                config.profile,
                &config.user_roles,
                "killAllSessions",
                "admin",
                &body,
                None,
            )
        };
        assert_eq!(refused(Profile::MongoDb), None);
        let documentdb = refused(Profile::DocumentDb).unwrap();
        assert_eq!(
            (documentdb.code, documentdb.errmsg.as_str()),
            (115, "Unknown request received: killAllSessions")
        );
        assert_eq!(refused(Profile::AtlasShared).unwrap().code, 8000);
    }

    #[test]
    fn a_read_write_user_may_not_kill_all_sessions_but_root_may() {
        let config = EmulatorConfig {
            users: vec![("app".into(), "pw".into()), ("admin".into(), "pw".into())],
            user_roles: [("app".to_string(), UserRole::ReadWriteAnyDatabase)].into(),
            ..EmulatorConfig::default()
        };
        let body = doc! { "killAllSessions": [], "$db": "admin" };
        let err = refusal(
            config.profile,
            &config.user_roles,
            "killAllSessions",
            "admin",
            &body,
            Some("app"),
        )
        .unwrap();
        assert_eq!(err.code, UNAUTHORIZED);
        assert!(err
            .errmsg
            .starts_with("not authorized on admin to execute command { \"killAllSessions\""));
        assert_eq!(
            refusal(
                config.profile,
                &config.user_roles,
                "killAllSessions",
                "admin",
                &body,
                Some("admin")
            ),
            None
        );
        let own = doc! { "killSessions": [], "$db": "admin" };
        assert_eq!(
            refusal(
                config.profile,
                &config.user_roles,
                "killSessions",
                "admin",
                &own,
                Some("app")
            ),
            None
        );
    }
}
