//! The violation log and its evidence: every violation is counted per rule,
//! filed under its finding with the session's timeline and the peers of the
//! connections involved, and logged as the finding's log policy says. It
//! resolves ids into names only for what is logged or shown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::finding_id::FindingId;
use crate::findings::{
    self, Examples, FindingDetail, FindingSnapshot, FindingTable, IdKey, Kept, LogNow,
};
use crate::rules;
use crate::state::{Millis, RequestRef};
use crate::timeline::{Gather, Timeline};
use crate::violation::{RequestEvidence, RuleId, StoreEvidence, Violation, ViolationRecord};

use super::conn_state::{lock, ConnState};
use super::violation_log::{log_summary, log_violation};
use super::SessionEngine;

impl SessionEngine {
    // ---- violations ----

    pub(super) fn findings_table(&self) -> std::sync::MutexGuard<'_, FindingTable> {
        self.violations
            .findings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn emit(&self, violation: Violation, rejected: bool) {
        self.emit_from(violation, rejected, None);
    }

    /// Counts a violation, files it under its finding and logs what the
    /// finding's log policy says. `closing`: a connection already removed
    /// from the map (its ring and peer are still wanted). The cost per
    /// violation of a known finding stays small: no names are resolved and
    /// nothing is formatted unless a line is logged.
    pub(super) fn emit_from(
        &self,
        violation: Violation,
        rejected: bool,
        closing: Option<(u64, &ConnState)>,
    ) {
        let settings = self.rules.get(violation.rule);
        self.violations.per_rule[violation.rule.index()].fetch_add(1, Ordering::Relaxed);
        // At most a warning when it rests on an effect the server never
        // confirmed: that is part of what the finding is.
        let severity = violation.severity(settings.severity);
        let key = IdKey::of(&violation, severity, settings.action);
        let (timeline, mut peers) = self.timeline(&violation, closing);
        if let Some(store) = &violation.store {
            // store-session-resurrected: the read may be on a third connection.
            peers[2] = match closing {
                Some((id, state)) if id == store.read.conn => Some(state.peer),
                _ => self.conn_cell(store.read.conn).map(|cell| lock(&cell).peer),
            };
        }
        let now = violation.at;
        let kept = Kept {
            id: self.violations.next_id.fetch_add(1, Ordering::Relaxed),
            violation,
            severity,
            action: settings.action,
            rejected,
            peers,
        };
        let (_, log) =
            self.findings_table()
                .record(&key, kept, timeline, now, self, |kept, finding| {
                    self.resolve(kept, finding)
                });
        match log {
            LogNow::Nothing => {}
            LogNow::Full(record) => log_violation(&record),
            LogNow::Summary(summary) => log_summary(&summary),
            LogNow::OverflowStarted {
                finding,
                max_findings,
            } => tracing::warn!(
                target: "sessionguard::violation",
                finding = %finding,
                max_findings,
                "sessions.max_findings ({max_findings}) findings exist: violations of any new finding are counted \
                 under the overflow finding {finding} from now on, and not logged one by one (said once; see \
                 /findings/{finding})"
            ),
        }
    }

    /// The violation's session timeline from the rings of the connections
    /// of both requests, and those connections' peers (the third: see `Kept`).
    pub(super) fn timeline(
        &self,
        violation: &Violation,
        closing: Option<(u64, &ConnState)>,
    ) -> (Timeline, [Option<SocketAddr>; 3]) {
        let mut gather = Gather::new(violation.key, violation.current, violation.earlier);
        let mut peers = [None; 3];
        let conns = [violation.current, violation.earlier].map(|r| r.map(|r| r.conn));
        for (index, conn) in conns.iter().enumerate() {
            let Some(conn) = *conn else { continue };
            if index == 1 && conns[0] == Some(conn) {
                peers[1] = peers[0];
                continue;
            }
            if let Some((_, state)) = closing.filter(|(id, _)| *id == conn) {
                gather.add(&state.ops);
                peers[index] = Some(state.peer);
            } else if let Some(cell) = self.conn_cell(conn) {
                // Never the caller's own connection while it holds it: the
                // engine emits only after letting go of its connection.
                let state = lock(&cell);
                gather.add(&state.ops);
                peers[index] = Some(state.peer);
            }
        }
        (gather.finish(), peers)
    }

    pub(super) fn wall(&self, at: Millis) -> String {
        let time = self.origin_wall + Duration::from_millis(at);
        humantime::format_rfc3339_millis(time).to_string()
    }

    /// `peer`: the connection's address when the violation was raised.
    pub(super) fn evidence(
        &self,
        request: &RequestRef,
        peer: Option<SocketAddr>,
    ) -> RequestEvidence {
        let identity = self.tables.identities.get(request.client);
        let peer = peer.map(|p| p.to_string()).or_else(|| {
            identity
                .as_ref()
                .and_then(|i| i.peer)
                .map(|ip| ip.to_string())
        });
        RequestEvidence {
            connection_id: request.conn,
            request_id: request.request_id,
            peer,
            app_name: identity
                .as_ref()
                .and_then(|i| i.app_name.as_deref().map(str::to_owned)),
            driver: identity
                .as_ref()
                .and_then(|i| i.driver_name.as_deref().map(str::to_owned)),
            driver_version: identity
                .as_ref()
                .and_then(|i| i.driver_version.as_deref().map(str::to_owned)),
            user: identity
                .as_ref()
                .and_then(|i| i.user.as_deref().map(str::to_owned)),
            command: self.tables.symbols.resolve(request.command.0).to_string(),
            namespace: self.tables.symbols.resolve(request.namespace.0).to_string(),
            txn_number: request.txn_number,
            at: self.wall(request.at),
        }
    }

    /// A kept violation with every id resolved to names.
    pub(super) fn resolve(&self, kept: &Kept, finding: FindingId) -> ViolationRecord {
        let violation = &kept.violation;
        let [current_peer, earlier_peer, read_peer] = kept.peers;
        ViolationRecord {
            id: kept.id,
            finding,
            rule: violation.rule,
            severity: kept.severity,
            action: kept.action,
            rejected: kept.rejected,
            unconfirmed: violation.unconfirmed,
            lsid: violation.key.lsid.to_string(),
            lsid_short: violation.key.lsid.short().to_string(),
            owner: self
                .tables
                .owner_name(violation.key.owner)
                .map(|o| o.to_string()),
            at: self.wall(violation.at),
            message: rules::wording(violation, self),
            current: violation
                .current
                .as_ref()
                .map(|r| self.evidence(r, current_peer)),
            earlier: violation
                .earlier
                .as_ref()
                .map(|r| self.evidence(r, earlier_peer)),
            // The write is `current`, the destroy `earlier`.
            store: violation.store.as_ref().and_then(|store| {
                Some(StoreEvidence {
                    store: store.store.clone(),
                    document: store.document.clone(),
                    read: self.evidence(&store.read, read_peer),
                    destroy: self.evidence(&store.destroy, earlier_peer),
                    write: self.evidence(violation.current.as_ref()?, current_peer),
                })
            }),
        }
    }

    /// Logs a summary line for every finding whose latest violations are
    /// in no line yet, whatever `log.finding_interval` says: call it at
    /// shutdown, so the log accounts for every violation.
    pub fn flush_finding_summaries(&self) {
        let unlogged = self.findings_table().unlogged_summaries(self.now());
        for summary in &unlogged {
            log_summary(summary);
        }
    }

    /// Recent violations, oldest first: at most `sessions.max_violations`,
    /// and fair — each finding's `RECENT_PER_FINDING` newest are kept
    /// whatever other findings do, and when there is not room for all, the
    /// newest of every finding comes first, then the second newest of each,
    /// and so on — so a flood of one bug never hides another.
    pub fn violations(&self) -> Vec<Arc<ViolationRecord>> {
        // Copied out under the lock, resolved after it.
        let kept = self.findings_table().recent();
        kept.iter()
            .map(|(finding, kept)| Arc::new(self.resolve(kept, *finding)))
            .collect()
    }

    /// Every finding, the most recently seen first.
    pub fn findings(&self) -> Vec<FindingSnapshot> {
        let all = self.findings_table().list();
        all.iter()
            .map(|data| data.snapshot(&|at| self.wall(at)))
            .collect()
    }

    /// One finding with its first and latest examples (each with its
    /// session's timeline); `None` for an unknown id.
    pub fn finding(&self, id: FindingId) -> Option<FindingDetail> {
        let copy = self.findings_table().get(id)?;
        let wall = |at| self.wall(at);
        let example = |record: ViolationRecord, timeline: &Timeline| findings::Example {
            violation: record,
            timeline: findings::timeline_entries(timeline, self, &wall),
        };
        Some(FindingDetail {
            finding: copy.data.snapshot(&wall),
            examples: Examples {
                first: copy
                    .first
                    .as_ref()
                    .map(|(record, timeline)| example(ViolationRecord::clone(record), timeline)),
                latest: copy
                    .latest
                    .as_ref()
                    .map(|(kept, timeline)| example(self.resolve(kept, copy.data.id), timeline)),
            },
        })
    }

    /// How many times each rule fired since start.
    pub fn violation_counts(&self) -> Vec<(RuleId, u64)> {
        RuleId::ALL
            .into_iter()
            .map(|rule| {
                (
                    rule,
                    self.violations.per_rule[rule.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}
