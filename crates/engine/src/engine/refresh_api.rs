//! The small API the refresh planner (`crate::refresh`) talks to the engine
//! through: the refresh settings, the ledger (through its own API), which
//! connections can carry a refresh, marking one busy with a refresh and
//! free again, and counting outcomes. The planner never touches the
//! engine's fields. (The engine does not know the planner: the dependency
//! points one way, `refresh` -> `engine`.)

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::conn_state::{lock, ConnCell};
use super::SessionEngine;
use crate::config::RefreshPolicy;
use crate::ledger::SessionLedger;
use crate::state::OwnerId;

/// A connection that can carry a refresh now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefreshCarrier {
    pub conn: u64,
    pub owner: OwnerId,
    pub upstream: u32,
    /// Nothing the engine follows awaits a reply on it.
    pub quiet: bool,
}

/// What one finished refresh adds to the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefreshCount {
    /// This many sessions refreshed.
    Refreshed(u64),
    Failed,
}

impl SessionEngine {
    /// `sessions.refresh_max_age`.
    pub(crate) fn refresh_max_age(&self) -> Duration {
        self.config.refresh_max_age
    }

    /// The session ledger, for the planner to read and mark sessions.
    pub(crate) fn ledger(&self) -> &SessionLedger {
        &self.ledger
    }

    /// Whether `upstream` refused refreshSessions as unsupported.
    pub(crate) fn refresh_unsupported(&self, upstream: u32) -> bool {
        self.upstreams
            .get(&upstream)
            .is_some_and(|u| u.refresh_unsupported.load(Ordering::Relaxed))
    }

    /// Connections that can carry a refresh now: injectable, carrying the
    /// application's session traffic, no refresh of theirs in progress.
    pub(crate) fn refresh_carriers(&self) -> Vec<RefreshCarrier> {
        let cells: Vec<(u64, Arc<ConnCell>)> = self
            .conns
            .iter()
            .map(|entry| (*entry.key(), Arc::clone(entry.value())))
            .collect();
        // Each connection locked on its own, with no table lock held.
        cells
            .into_iter()
            .filter_map(|(conn, cell)| {
                let c = lock(&cell);
                (c.can_inject && c.carried_sessions && !c.refresh_in_progress).then(|| {
                    RefreshCarrier {
                        conn,
                        owner: c.owner,
                        upstream: c.upstream,
                        quiet: c.is_quiet(),
                    }
                })
            })
            .collect()
    }

    /// Marks `conn` busy with a refresh; its upstream, or `None` if it has
    /// closed since.
    pub(crate) fn start_refresh_on(&self, conn: u64) -> Option<u32> {
        let cell = self.conn_cell(conn)?;
        let mut state = lock(&cell);
        state.refresh_in_progress = true;
        Some(state.upstream)
    }

    /// `conn`'s refresh is over (answered or not).
    pub(crate) fn end_refresh_on(&self, conn: u64) {
        if let Some(cell) = self.conn_cell(conn) {
            lock(&cell).refresh_in_progress = false;
        }
    }

    /// Counts one finished refresh.
    pub(crate) fn count_refresh(&self, count: RefreshCount) {
        self.refreshes_sent.fetch_add(1, Ordering::Relaxed);
        match count {
            RefreshCount::Refreshed(sessions) => {
                self.sessions_refreshed
                    .fetch_add(sessions, Ordering::Relaxed);
            }
            RefreshCount::Failed => {
                self.refresh_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The refresh policy in force (`sessions.refresh`).
    pub(crate) fn refresh_settings(&self) -> (RefreshPolicy, Duration) {
        (self.config.refresh, self.refresh_after())
    }
}
