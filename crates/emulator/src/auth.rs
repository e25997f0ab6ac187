//! SCRAM-SHA-256 on the server side (RFC 5802 / RFC 7677, as MongoDB runs it:
//! `saslStart` / `saslContinue` with `conversationId`, the
//! `skipEmptyExchange` option, `speculativeAuthenticate` in hello and
//! `saslSupportedMechs`), for the users in `EmulatorConfig::users` (all in
//! the `admin` database). It owns one connection's authentication state and
//! the rule that, once users are configured, only the handshake and
//! authentication commands run before a connection has authenticated
//! (Unauthorized, code 13, otherwise). It never logs passwords, nonces,
//! proofs or payloads: user names and outcomes only.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;

use super::errors::{CommandError, AUTHENTICATION_FAILED, BAD_VALUE, PROTOCOL_ERROR, UNAUTHORIZED};

/// The mechanism implemented here.
pub(crate) const MECHANISM: &str = "SCRAM-SHA-256";
/// The only database users live in.
pub(crate) const AUTH_DB: &str = "admin";
/// RFC 7677's minimum, and what a MongoDB server uses by default.
const ITERATIONS: u32 = 15_000;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const CONVERSATION_ID: i32 = 1;

/// Commands a connection may run before it authenticates.
const OPEN_COMMANDS: &[&str] = &[
    "hello",
    "isMaster",
    "ismaster",
    "ping",
    "buildInfo",
    "buildinfo",
    "saslStart",
    "saslContinue",
    "endSessions",
    "logout",
];

/// Where a SCRAM conversation stands.
enum Stage {
    /// server-first sent; waiting for client-final with the proof.
    AwaitingProof {
        client_first_bare: String,
        server_first: String,
        combined_nonce: String,
        gs2_header: String,
        salted_password: [u8; 32],
    },
    /// Proof accepted and server signature sent; waiting for the client's
    /// empty last step (only without `skipEmptyExchange`).
    AwaitingEmptyStep,
}

struct Conversation {
    user: String,
    /// saslStart's `options.skipEmptyExchange`: finish with the server
    /// signature instead of waiting for an empty last client step.
    skip_empty_exchange: bool,
    stage: Stage,
}

/// One connection's authentication state.
#[derive(Default)]
pub(crate) struct ConnAuth {
    user: Option<String>,
    conversation: Option<Conversation>,
}

impl ConnAuth {
    /// The authenticated user, if any.
    pub(crate) fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether `name` is refused because this connection has not
    /// authenticated (the authentication commands themselves never are).
    pub(crate) fn refuses(&self, users: &[(String, String)], name: &str) -> bool {
        !users.is_empty()
            && self.user.is_none()
            && !OPEN_COMMANDS.contains(&name)
            && !matches!(name, "saslStart" | "saslContinue" | "logout")
    }

    /// Handles the authentication commands and refuses everything else on an
    /// unauthenticated connection when users exist. `None`: run the command.
    pub(crate) fn intercept(
        &mut self,
        users: &[(String, String)],
        name: &str,
        db: &str,
        body: &Document,
    ) -> Option<Document> {
        match name {
            "saslStart" => Some(reply_or_error(self.sasl_start(users, db, body))),
            "saslContinue" => Some(reply_or_error(self.sasl_continue(body))),
            "logout" => {
                self.user = None;
                self.conversation = None;
                Some(doc! { "ok": 1.0 })
            }
            _ if !self.refuses(users, name) => None,
            _ => Some(
                CommandError::new(
                    UNAUTHORIZED,
                    format!("command {name} requires authentication"),
                )
                .to_document(),
            ),
        }
    }

    /// The hello reply's `speculativeAuthenticate`, for a hello that asks
    /// (errors are not reported in hello: the driver then authenticates the
    /// ordinary way, as with a real server).
    pub(crate) fn speculative(
        &mut self,
        users: &[(String, String)],
        hello: &Document,
    ) -> Option<Document> {
        let request = hello.get_document("speculativeAuthenticate").ok()?;
        if users.is_empty() {
            return None;
        }
        let db = request.get_str("db").unwrap_or(AUTH_DB);
        match self.sasl_start(users, db, request) {
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::debug!(code = e.code, "speculative authentication not accepted");
                None
            }
        }
    }

    fn sasl_start(
        &mut self,
        users: &[(String, String)],
        db: &str,
        body: &Document,
    ) -> Result<Document, CommandError> {
        self.conversation = None;
        let mechanism = body.get_str("mechanism").unwrap_or_default();
        if mechanism != MECHANISM {
            return Err(CommandError::new(
                BAD_VALUE,
                format!("Received authentication for mechanism {mechanism} which is not enabled"),
            ));
        }
        let payload = payload_of(body)?;
        let client_first = std::str::from_utf8(payload).map_err(|_| protocol("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2(client_first)?;
        let user = unescape_name(attribute(bare, 'n').ok_or_else(|| protocol("no user name"))?)?;
        let client_nonce = attribute(bare, 'r').ok_or_else(|| protocol("no client nonce"))?;
        let password = (db == AUTH_DB)
            .then(|| users.iter().find(|(name, _)| *name == user))
            .flatten()
            .map(|(_, password)| password);
        let Some(password) = password else {
            tracing::debug!(user = %user, db, "authentication failed: unknown user");
            return Err(auth_failed());
        };
        let prepared = stringprep::saslprep(password).map_err(|_| auth_failed())?;
        let salt: [u8; SALT_LEN] = rand::random();
        let mut salted_password = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(ITERATIONS).expect("non-zero"),
            &salt,
            prepared.as_bytes(),
            &mut salted_password,
        );
        let server_nonce: [u8; NONCE_LEN] = rand::random();
        let combined_nonce = format!("{client_nonce}{}", BASE64.encode(server_nonce));
        let server_first = format!(
            "r={combined_nonce},s={},i={ITERATIONS}",
            BASE64.encode(salt)
        );
        let reply = doc! {
            "conversationId": CONVERSATION_ID,
            "done": false,
            "payload": binary(server_first.as_bytes()),
            "ok": 1.0,
        };
        let skip_empty_exchange = body
            .get_document("options")
            .ok()
            .and_then(|o| o.get_bool("skipEmptyExchange").ok())
            .unwrap_or(false);
        self.conversation = Some(Conversation {
            user,
            skip_empty_exchange,
            stage: Stage::AwaitingProof {
                client_first_bare: bare.to_string(),
                server_first,
                combined_nonce,
                gs2_header: gs2_header.to_string(),
                salted_password,
            },
        });
        Ok(reply)
    }

    fn sasl_continue(&mut self, body: &Document) -> Result<Document, CommandError> {
        let Some(conversation) = self.conversation.take() else {
            return Err(CommandError::new(
                PROTOCOL_ERROR,
                "No SASL session state found",
            ));
        };
        if body.get_i32("conversationId").ok() != Some(CONVERSATION_ID) {
            return Err(protocol("unknown conversationId"));
        }
        let payload = payload_of(body)?;
        match conversation.stage {
            Stage::AwaitingEmptyStep => {
                self.user = Some(conversation.user);
                Ok(doc! {
                    "conversationId": CONVERSATION_ID,
                    "done": true,
                    "payload": binary(b""),
                    "ok": 1.0,
                })
            }
            Stage::AwaitingProof {
                client_first_bare,
                server_first,
                combined_nonce,
                gs2_header,
                salted_password,
            } => {
                let client_final =
                    std::str::from_utf8(payload).map_err(|_| protocol("not UTF-8"))?;
                let (without_proof, proof) = client_final
                    .rsplit_once(",p=")
                    .ok_or_else(|| protocol("no proof"))?;
                let channel_binding = attribute(without_proof, 'c').unwrap_or_default();
                if BASE64.decode(channel_binding).ok().as_deref() != Some(gs2_header.as_bytes()) {
                    return Err(protocol("channel binding does not match"));
                }
                if attribute(without_proof, 'r') != Some(combined_nonce.as_str()) {
                    return Err(protocol("nonce does not match"));
                }
                let proof = BASE64
                    .decode(proof)
                    .map_err(|_| protocol("proof is not base64"))?;
                let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
                let salted = hmac::Key::new(hmac::HMAC_SHA256, &salted_password);
                let client_key = hmac::sign(&salted, b"Client Key");
                let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
                let client_signature = hmac::sign(
                    &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
                    auth_message.as_bytes(),
                );
                // Recover ClientKey from the proof and check it hashes to StoredKey.
                let recovered: Vec<u8> = proof
                    .iter()
                    .zip(client_signature.as_ref())
                    .map(|(p, s)| p ^ s)
                    .collect();
                let valid = proof.len() == client_signature.as_ref().len()
                    && equal_in_constant_time(
                        digest::digest(&digest::SHA256, &recovered).as_ref(),
                        stored_key.as_ref(),
                    );
                if !valid {
                    tracing::debug!(user = %conversation.user, "authentication failed: wrong proof");
                    return Err(auth_failed());
                }
                let server_key = hmac::sign(&salted, b"Server Key");
                let server_signature = hmac::sign(
                    &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
                    auth_message.as_bytes(),
                );
                let server_final = format!("v={}", BASE64.encode(server_signature.as_ref()));
                let skip_empty = conversation.skip_empty_exchange;
                tracing::debug!(user = %conversation.user, "authenticated");
                if skip_empty {
                    self.user = Some(conversation.user);
                } else {
                    self.conversation = Some(Conversation {
                        user: conversation.user,
                        skip_empty_exchange: false,
                        stage: Stage::AwaitingEmptyStep,
                    });
                }
                Ok(doc! {
                    "conversationId": CONVERSATION_ID,
                    "done": skip_empty,
                    "payload": binary(server_final.as_bytes()),
                    "ok": 1.0,
                })
            }
        }
    }
}

/// hello's answer to `saslSupportedMechs: "db.user"`.
pub(crate) fn supported_mechs(users: &[(String, String)], hello: &Document) -> Option<Bson> {
    let asked = hello.get_str("saslSupportedMechs").ok()?;
    let (db, user) = asked.split_once('.')?;
    let known = db == AUTH_DB && users.iter().any(|(name, _)| name == user);
    Some(Bson::Array(if known {
        vec![Bson::String(MECHANISM.to_string())]
    } else {
        Vec::new()
    }))
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reply_or_error(result: Result<Document, CommandError>) -> Document {
    result.unwrap_or_else(|e| e.to_document())
}

fn auth_failed() -> CommandError {
    CommandError::new(AUTHENTICATION_FAILED, "Authentication failed.")
}

fn protocol(reason: &str) -> CommandError {
    CommandError::new(BAD_VALUE, format!("Invalid SCRAM message: {reason}"))
}

fn binary(bytes: &[u8]) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    }
}

fn payload_of(body: &Document) -> Result<&[u8], CommandError> {
    match body.get("payload") {
        Some(Bson::Binary(bin)) => Ok(&bin.bytes),
        _ => Err(protocol("payload must be BinData")),
    }
}

/// Splits `gs2-header` (`n,,` / `y,,` / with `a=authzid`) from the bare
/// client-first message.
fn split_gs2(client_first: &str) -> Result<(&str, &str), CommandError> {
    let first = client_first
        .find(',')
        .ok_or_else(|| protocol("no GS2 header"))?;
    let second = client_first[first + 1..]
        .find(',')
        .map(|i| first + 1 + i)
        .ok_or_else(|| protocol("no GS2 header"))?;
    match &client_first[..first] {
        "n" | "y" => Ok(client_first.split_at(second + 1)),
        _ => Err(protocol("channel binding is not supported")),
    }
}

/// The value of `key=` among comma-separated SCRAM attributes.
fn attribute(message: &str, key: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(key) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// RFC 5802 saslname: `=2C` is `,` and `=3D` is `=`.
fn unescape_name(name: &str) -> Result<String, CommandError> {
    sessionguard_protocol::command::unescape_saslname(name)
        .map(std::borrow::Cow::into_owned)
        .ok_or_else(|| protocol("bad escape in user name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Vec<(String, String)> {
        vec![("alice".to_string(), "wonder land".to_string())]
    }

    /// A client side of SCRAM-SHA-256, written from the RFC, to drive the
    /// server side without a driver.
    fn client_proof(
        password: &str,
        client_first_bare: &str,
        server_first: &str,
        without_proof: &str,
    ) -> (String, Vec<u8>) {
        let salt = BASE64
            .decode(attribute(server_first, 's').unwrap())
            .unwrap();
        let iterations: u32 = attribute(server_first, 'i').unwrap().parse().unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(iterations).unwrap(),
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac::sign(&key, b"Server Key");
        let server_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message.as_bytes(),
        );
        (BASE64.encode(proof), server_signature.as_ref().to_vec())
    }

    fn run(password: &str, skip_empty: bool) -> (ConnAuth, Result<Document, CommandError>) {
        let mut auth = ConnAuth::default();
        let bare = "n=alice,r=clientnonce";
        let start = doc! {
            "saslStart": 1, "mechanism": MECHANISM,
            "payload": binary(format!("n,,{bare}").as_bytes()),
            "options": { "skipEmptyExchange": skip_empty },
        };
        let first = auth.sasl_start(&users(), "admin", &start).unwrap();
        let server_first = match first.get("payload") {
            Some(Bson::Binary(b)) => String::from_utf8(b.bytes.clone()).unwrap(),
            _ => panic!(),
        };
        let nonce = attribute(&server_first, 'r').unwrap();
        assert!(nonce.starts_with("clientnonce") && nonce.len() > "clientnonce".len());
        let without_proof = format!("c=biws,r={nonce}");
        let (proof, expected_v) = client_proof(password, bare, &server_first, &without_proof);
        let cont = doc! {
            "saslContinue": 1, "conversationId": 1,
            "payload": binary(format!("{without_proof},p={proof}").as_bytes()),
        };
        let result = auth.sasl_continue(&cont);
        if let Ok(reply) = &result {
            let Some(Bson::Binary(v)) = reply.get("payload") else {
                panic!()
            };
            let v = String::from_utf8(v.bytes.clone()).unwrap();
            assert_eq!(v, format!("v={}", BASE64.encode(expected_v)));
        }
        (auth, result)
    }

    #[test]
    fn right_password_authenticates_and_proves_the_server() {
        let (auth, result) = run("wonder land", true);
        assert!(result.unwrap().get_bool("done").unwrap());
        assert_eq!(auth.user(), Some("alice"));
    }

    #[test]
    fn without_skip_empty_exchange_one_more_step_completes() {
        let (mut auth, result) = run("wonder land", false);
        assert!(!result.unwrap().get_bool("done").unwrap());
        assert_eq!(auth.user(), None);
        let last = doc! { "saslContinue": 1, "conversationId": 1, "payload": binary(b"") };
        let reply = auth.sasl_continue(&last).unwrap();
        assert!(reply.get_bool("done").unwrap());
        assert_eq!(auth.user(), Some("alice"));
    }

    #[test]
    fn wrong_password_fails_with_code_18() {
        let (auth, result) = run("wrong", true);
        assert_eq!(result.unwrap_err().code, AUTHENTICATION_FAILED);
        assert_eq!(auth.user(), None);
    }

    #[test]
    fn unauthenticated_commands_are_refused_but_handshake_runs() {
        let mut auth = ConnAuth::default();
        let refused = auth.intercept(&users(), "find", "app", &doc! {}).unwrap();
        assert_eq!(refused.get_i32("code").unwrap(), UNAUTHORIZED);
        assert_eq!(
            refused.get_str("errmsg").unwrap(),
            "command find requires authentication"
        );
        assert!(auth
            .intercept(&users(), "ping", "admin", &doc! {})
            .is_none());
        assert!(auth.intercept(&[], "find", "app", &doc! {}).is_none());
    }

    #[test]
    fn unknown_user_and_names_are_handled() {
        let mut auth = ConnAuth::default();
        let start = doc! { "mechanism": MECHANISM, "payload": binary(b"n,,n=bob,r=x") };
        assert_eq!(
            auth.sasl_start(&users(), "admin", &start).unwrap_err().code,
            AUTHENTICATION_FAILED
        );
        assert_eq!(unescape_name("a=2Cb=3Dc").unwrap(), "a,b=c");
        assert!(unescape_name("a=zz").is_err());
        let mechs = supported_mechs(&users(), &doc! { "saslSupportedMechs": "admin.alice" });
        assert_eq!(
            mechs,
            Some(Bson::Array(vec![Bson::String(MECHANISM.into())]))
        );
    }
}
