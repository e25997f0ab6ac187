//! Connection identity: what the engine knows about each client connection
//! (peer, upstream, handshake metadata, authenticated owner, its ring of
//! recent operations) and each upstream, from `connect` to `close`. It keeps
//! no requests: their records travel with the caller (`PendingRequest`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sessionguard_protocol::command::{auth_user, AuthUser, Handshake, ReplyView, RequestView};

use crate::intern::{normalize_ip, ClientIdentity};
use crate::state::{ClientId, CommandClass, OwnerId};
use crate::timeline::OpRing;

use super::conn_state::{lock, ConnCell, ConnHandle, ConnState, PendingAuth, UpstreamState};
use super::SessionEngine;

impl SessionEngine {
    pub(super) fn upstream_id(&self, local: SocketAddr) -> u32 {
        if let Some(id) = self.upstream_ids.get(&local) {
            return *id;
        }
        let id = *self
            .upstream_ids
            .entry(local)
            .or_insert_with(|| self.next_upstream.fetch_add(1, Ordering::Relaxed));
        self.upstreams
            .entry(id)
            .or_insert_with(|| UpstreamState::new(local));
        id
    }

    // ---- connections ----

    /// A client connected (`local`: the listener it reached). `can_inject`:
    /// the caller can send requests of the engine's own on this connection's
    /// upstream (the refresher's `refreshSessions`), so refreshes may be
    /// planned on it. The handle lets the data thread reach the
    /// connection's state without the table (`request_on`, `reply_on`).
    pub fn connect(
        &self,
        conn: u64,
        peer: SocketAddr,
        local: SocketAddr,
        can_inject: bool,
    ) -> ConnHandle {
        let upstream = self.upstream_id(local);
        let identity = ClientIdentity {
            peer: Some(normalize_ip(peer.ip())),
            ..ClientIdentity::default()
        };
        let client = self.tables.identities.intern(&identity);
        let cell = Arc::new(ConnCell::new(ConnState {
            peer,
            upstream,
            identity,
            client,
            owner: OwnerId::UNKNOWN,
            pending_auth: None,
            awaiting_replies: 0,
            ops: OpRing::default(),
            can_inject,
            refresh_in_progress: false,
            carried_sessions: false,
            txn_sessions: Vec::new(),
        }));
        self.conns.insert(conn, cell.clone());
        ConnHandle { id: conn, cell }
    }

    /// The handle of open connection `conn`, for callers that hold only
    /// its id (what `connect` returned, again).
    pub fn conn_handle(&self, conn: u64) -> Option<ConnHandle> {
        self.conn_cell(conn)
            .map(|cell| ConnHandle { id: conn, cell })
    }

    /// The state of open connection `conn` (for callers that hold ids).
    pub(super) fn conn_cell(&self, conn: u64) -> Option<Arc<ConnCell>> {
        self.conns.get(&conn).map(|cell| Arc::clone(&cell))
    }

    pub(super) fn pending_owner(&self, user: &AuthUser<'_>) -> Option<PendingAuth> {
        let name = user.user.as_deref()?;
        Some(PendingAuth {
            owner: self.tables.owner(name, user.db.unwrap_or("admin")),
            single_step: user.mechanism == sessionguard_protocol::command::AuthMechanism::X509,
        })
    }

    /// Handshake and authentication bookkeeping; returns the connection's
    /// (client identity, owner, upstream).
    pub(super) fn connection_facts(
        &self,
        cell: Option<&ConnCell>,
        view: &RequestView<'_>,
        class: CommandClass,
    ) -> (ClientId, OwnerId, u32) {
        let handshake = if class == CommandClass::Hello {
            Handshake::from_request(view)
        } else {
            None
        };
        let auth = if class == CommandClass::Auth {
            auth_user(view)
        } else {
            None
        };
        let Some(mut state) = cell.map(lock) else {
            return (ClientId::UNKNOWN, OwnerId::UNKNOWN, 0);
        };
        if let Some(handshake) = handshake {
            if handshake.driver_name.is_some() || handshake.app_name.is_some() {
                let arc = |value: Option<&str>| value.map(Arc::<str>::from);
                let updated = ClientIdentity {
                    metadata_seen: true,
                    driver_name: arc(handshake.driver_name),
                    driver_version: arc(handshake.driver_version),
                    app_name: arc(handshake.app_name),
                    ..state.identity.clone()
                };
                if updated != state.identity {
                    state.client = self.tables.identities.intern(&updated);
                    state.identity = updated;
                }
            }
            if let Some(user) = handshake
                .user
                .as_ref()
                .and_then(|user| self.pending_owner(user))
            {
                state.pending_auth = Some(user);
            }
        }
        if let Some(user) = auth.as_ref() {
            state.pending_auth = self.pending_owner(user);
        }
        (state.client, state.owner, state.upstream)
    }

    pub(super) fn confirm_owner(&self, state: &mut ConnState) {
        let Some(pending) = state.pending_auth.take() else {
            return;
        };
        state.owner = pending.owner;
        let user = self.tables.owner_name(pending.owner);
        if state.identity.user != user {
            let updated = ClientIdentity {
                user,
                ..state.identity.clone()
            };
            state.client = self.tables.identities.intern(&updated);
            state.identity = updated;
        }
    }

    pub(super) fn hello_reply(&self, state: &mut ConnState, reply: &ReplyView<'_>) {
        if let Some(minutes) = reply
            .integer("logicalSessionTimeoutMinutes")
            .filter(|m| *m > 0)
        {
            let ms = u64::try_from(minutes).unwrap_or(0).saturating_mul(60_000);
            // Drivers use the smallest timeout any server reports.
            let _ = self.learned_timeout.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |current| (current == 0 || ms < current).then_some(ms),
            );
        }
        if let Some(speculative) = reply.subdocument("speculativeAuthenticate") {
            let conversation_done = speculative
                .get("done")
                .ok()
                .flatten()
                .and_then(|v| v.as_bool());
            let in_conversation = speculative.get("conversationId").ok().flatten().is_some();
            // x.509 answers with {dbname, user}; SCRAM continues with saslContinue.
            if conversation_done == Some(true) || (!in_conversation && reply.ok) {
                self.confirm_owner(state);
            }
        }
    }
}
