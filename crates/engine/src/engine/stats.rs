//! The engine's counters (`EngineStats`, read at scrape time by the
//! binary's collector) and the admin API's views of sessions and stores.
//! It only reads: every counter is bumped where its event happens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::state::{OwnerId, SessionKey, SessionSummary};
use crate::web_store::StoreStats;

use super::counters::{EngineStats, PerCommand};
use super::SessionEngine;

impl SessionEngine {
    /// A summary of every tracked session that `keep` accepts (ended
    /// sessions kept as tombstones included), in no particular order.
    pub fn session_summaries(
        &self,
        mut keep: impl FnMut(&SessionSummary) -> bool,
    ) -> Vec<(SessionKey, SessionSummary)> {
        self.ledger
            .all_keys()
            .into_iter()
            .filter_map(|key| {
                self.ledger
                    .read(&key, |state| {
                        let summary = SessionSummary::of(state);
                        keep(&summary).then_some(summary)
                    })
                    .flatten()
                    .map(|summary| (key, summary))
            })
            .collect()
    }

    /// The user `owner` stands for (`user@db`), if known.
    pub fn owner_name(&self, owner: OwnerId) -> Option<Arc<str>> {
        self.tables.owner_name(owner)
    }

    /// Web-session store counters, by store label (for metrics).
    pub fn store_stats(&self) -> StoreStats {
        self.stores.stats()
    }

    pub fn stats(&self) -> EngineStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let lifecycle = &self.lifecycle;
        let ledger = self.ledger.counts();
        EngineStats {
            ledger,
            connections: self.conns.len(),
            requests_inspected: self.requests_inspected.sum(),
            requests_rejected: self.requests_rejected.load(Ordering::Relaxed),
            refreshes_sent: self.refreshes_sent.load(Ordering::Relaxed),
            sessions_refreshed: self.sessions_refreshed.load(Ordering::Relaxed),
            refresh_failures: self.refresh_failures.load(Ordering::Relaxed),
            violations: self
                .violations
                .per_rule
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum(),
            sessions_started: load(&lifecycle.sessions_started),
            sessions_ended: load(&lifecycle.sessions_ended),
            sessions_killed: load(&lifecycle.sessions_killed),
            sessions_expired: load(&lifecycle.sessions_expired)
                .saturating_add(ledger.purged_expired),
            transactions_started: load(&lifecycle.transactions_started),
            transactions_committed: load(&lifecycle.transactions_committed),
            transactions_aborted: load(&lifecycle.transactions_aborted),
            transactions_left_open: load(&lifecycle.transactions_left_open),
            in_flight_abandoned: self.in_flight_abandoned.each_ref().map(load),
            retries: PerCommand(self.retries.each_ref().map(load)),
            commands_refused: self.refusals.snapshot(),
            retry_verdicts_pending: self.verdicts.len(),
            retry_verdicts_unjudged: self.verdicts.unjudged(),
        }
    }
}
