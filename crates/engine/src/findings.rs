//! Findings: violations grouped by bug. Every violation belongs to one
//! finding, keyed by a fingerprint that is the same for every request of the
//! same bug — rule, severity, action, and the command, namespace,
//! application name and driver of the offending request and of the earlier
//! request it conflicts with — and never depends on lsids, connection or
//! request ids, ports or times. A finding keeps its count, first and last
//! seen, its first example with full evidence (resolved once, when it is
//! also logged in full) and its latest example (kept compact, resolved when
//! read), and the distinct sessions and connections involved (exact up to
//! `DISTINCT_CAP`, then "at least").
//!
//! It keeps the recent violations `/violations` lists, fairly: at most
//! `sessions.max_violations` in all, and each finding's `RECENT_PER_FINDING`
//! newest are kept whatever comes after, so a flood of one finding gives up
//! its own older violations and never evicts another finding's only one.
//!
//! It also decides what is logged: a finding's first violation in full, then
//! at most one summary line per `log.finding_interval` with the count since
//! the previous line (on its next violation after the interval, or by the
//! engine's periodic sweep, so a flood that stops still gets its last line).
//! At most `sessions.max_findings` findings exist; violations of any newer
//! fingerprint are counted under one overflow finding.
//!
//! The fingerprint's public id is the first 12 hex digits of the SHA-256 of
//! a canonical text (see [`canonical_text`]): the same bug gets the same id
//! in every process and every version that keeps the text.
//!
//! Pure: no tokio, no clock (times are passed in), no logging, no locks
//! (the engine holds this table under one mutex, as it held the violation
//! list before). Never document contents.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::finding_id::FindingId;
use super::intern::Names;
use super::state::{ClientId, Millis, SessionKey, Sym};
use super::timeline::{Role, Timeline};
use super::violation::{Action, RuleId, Severity, Violation, ViolationRecord};

/// Violations of each finding kept whatever other findings do (its newest).
pub(crate) const RECENT_PER_FINDING: usize = 5;
/// Distinct sessions / connections counted exactly per finding; past it a
/// finding says "at least".
pub(crate) const DISTINCT_CAP: usize = 100;
/// Id keys remembered per finding slot before the cache is cleared (a fleet
/// of application hosts gives one finding several id keys).
const CACHE_PER_FINDING: usize = 16;
/// The version line of the canonical text.
const CANONICAL_VERSION: &str = "sessionguard finding v1";

impl FindingId {
    /// The id of the finding these fields describe.
    pub fn of(fields: &FindingFields) -> FindingId {
        FindingId::of_text(&canonical_text(fields))
    }

    /// The overflow finding's id (violations past `sessions.max_findings`).
    pub fn overflow() -> FindingId {
        FindingId::of_text(&format!("{CANONICAL_VERSION}\noverflow\n"))
    }
}

/// One request of a fingerprint: what the application ran, where, from which
/// application and driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingSide {
    pub command: String,
    /// `db.collection`.
    pub namespace: String,
    pub app_name: Option<String>,
    /// The driver's name (not its version: an upgrade does not make a bug new).
    pub driver: Option<String>,
}

/// What a fingerprint is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingFields {
    pub rule: RuleId,
    pub severity: Severity,
    pub action: Action,
    /// The request that broke the rule (absent for time-driven rules).
    pub current: Option<FindingSide>,
    /// The earlier request it conflicts with, where the rule has one.
    pub earlier: Option<FindingSide>,
}

/// The text a finding id hashes: one `key=value` line each, `\n`-terminated,
/// in this order; the lines of an absent request are left out, an absent
/// application or driver name is empty:
///
/// ```text
/// sessionguard finding v1
/// rule=concurrent-use
/// severity=error
/// action=log
/// command=insert
/// namespace=app.items
/// app=web
/// driver=mongo-rust-driver
/// earlier.command=find
/// earlier.namespace=app.items
/// earlier.app=web
/// earlier.driver=mongo-rust-driver
/// ```
///
/// so `printf 'sessionguard finding v1\nrule=...\n' | sha256sum | cut -c1-12`
/// gives the id. The overflow finding's text is
/// `sessionguard finding v1\noverflow\n`.
pub(crate) fn canonical_text(fields: &FindingFields) -> String {
    let mut text = format!(
        "{CANONICAL_VERSION}\nrule={}\nseverity={}\naction={}\n",
        fields.rule,
        fields.severity,
        fields.action.as_str()
    );
    for (prefix, side) in [("", &fields.current), ("earlier.", &fields.earlier)] {
        if let Some(side) = side {
            text.push_str(&format!(
                "{prefix}command={}\n{prefix}namespace={}\n{prefix}app={}\n{prefix}driver={}\n",
                side.command,
                side.namespace,
                side.app_name.as_deref().unwrap_or(""),
                side.driver.as_deref().unwrap_or(""),
            ));
        }
    }
    text
}

/// The fingerprint by interned ids: cheap to build and hash for every
/// violation. Several id keys can name one finding (the same application
/// from several hosts), so it only caches the way to the finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct IdKey {
    rule: RuleId,
    severity: Severity,
    action: Action,
    current: Option<IdSide>,
    earlier: Option<IdSide>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IdSide {
    command: Sym,
    namespace: Sym,
    client: ClientId,
}

impl IdKey {
    pub(crate) fn of(violation: &Violation, severity: Severity, action: Action) -> IdKey {
        let side = |request: &super::state::RequestRef| IdSide {
            command: request.command,
            namespace: request.namespace,
            client: request.client,
        };
        IdKey {
            rule: violation.rule,
            severity,
            action,
            current: violation.current.as_ref().map(side),
            earlier: violation.earlier.as_ref().map(side),
        }
    }

    /// The names behind the ids.
    pub(crate) fn fields(&self, names: &dyn Names) -> FindingFields {
        let side = |side: &IdSide| {
            let identity = names.identity(side.client);
            let text = |value: Option<&Arc<str>>| value.map(|v| v.to_string());
            FindingSide {
                command: names.symbol(side.command).to_string(),
                namespace: names.symbol(side.namespace).to_string(),
                app_name: text(identity.as_ref().and_then(|i| i.app_name.as_ref())),
                driver: text(identity.as_ref().and_then(|i| i.driver_name.as_ref())),
            }
        };
        FindingFields {
            rule: self.rule,
            severity: self.severity,
            action: self.action,
            current: self.current.as_ref().map(side),
            earlier: self.earlier.as_ref().map(side),
        }
    }
}

/// A violation kept compact (ids, not names) until someone reads it.
#[derive(Debug, Clone)]
pub(crate) struct Kept {
    pub(crate) id: u64,
    pub(crate) violation: Violation,
    pub(crate) severity: Severity,
    pub(crate) action: Action,
    pub(crate) rejected: bool,
    /// The peers of the current and earlier requests' connections (and of
    /// a web-session store violation's read) when it was raised: a
    /// connection may be gone when the violation is read.
    pub(crate) peers: [Option<SocketAddr>; 3],
}

/// How many distinct sessions or connections a finding involved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistinctCount {
    pub count: u64,
    /// `false`: at least `count` (counting stopped at `DISTINCT_CAP`).
    pub exact: bool,
}

/// A bounded set of small hashes: exact up to `DISTINCT_CAP`.
#[derive(Debug, Default)]
struct Distinct {
    seen: Vec<u64>,
    saturated: bool,
}

impl Distinct {
    fn add(&mut self, value: u64) {
        if self.saturated || self.seen.contains(&value) {
            return;
        }
        if self.seen.len() + 1 >= DISTINCT_CAP {
            // The cap-th distinct value: from here on "at least DISTINCT_CAP".
            self.saturated = true;
            self.seen = Vec::new();
        } else {
            self.seen.push(value);
        }
    }

    fn count(&self) -> DistinctCount {
        if self.saturated {
            DistinctCount {
                count: DISTINCT_CAP as u64,
                exact: false,
            }
        } else {
            DistinctCount {
                count: self.seen.len() as u64,
                exact: true,
            }
        }
    }
}

fn session_hash(key: &SessionKey) -> u64 {
    let bytes = key.lsid.0;
    let (low, high) = bytes.split_at(8);
    let low = u64::from_le_bytes(low.try_into().unwrap_or_default());
    let high = u64::from_le_bytes(high.try_into().unwrap_or_default());
    low ^ high.rotate_left(29) ^ (u64::from(key.owner.0) << 1)
}

struct Finding {
    id: FindingId,
    /// `None`: the overflow finding.
    fields: Option<Arc<FindingFields>>,
    count: u64,
    first_seen: Millis,
    last_seen: Millis,
    sessions: Distinct,
    connections: Distinct,
    first: Option<(Arc<ViolationRecord>, Timeline)>,
    /// Its `RECENT_PER_FINDING` newest violations, the newest last (the
    /// latest example).
    recent: VecDeque<Kept>,
    latest_timeline: Timeline,
    /// `count` when the last line about it was logged, and when.
    logged_count: u64,
    logged_at: Millis,
}

impl Finding {
    fn new(id: FindingId, fields: Option<Arc<FindingFields>>) -> Finding {
        Finding {
            id,
            fields,
            count: 0,
            first_seen: 0,
            last_seen: 0,
            sessions: Distinct::default(),
            connections: Distinct::default(),
            first: None,
            recent: VecDeque::with_capacity(RECENT_PER_FINDING),
            latest_timeline: Timeline::default(),
            logged_count: 0,
            logged_at: 0,
        }
    }

    fn summary_due(&mut self, now: Millis, interval: Millis) -> Option<Summary> {
        if self.count <= self.logged_count || now.saturating_sub(self.logged_at) < interval {
            return None;
        }
        let since = self.count - self.logged_count;
        self.logged_count = self.count;
        self.logged_at = now;
        Some(Summary {
            finding: self.id,
            fields: self.fields.clone(),
            since,
            total: self.count,
        })
    }

    fn data(&self) -> FindingData {
        FindingData {
            id: self.id,
            fields: self.fields.clone(),
            count: self.count,
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            sessions: self.sessions.count(),
            connections: self.connections.count(),
        }
    }
}

/// A summary line is due for a finding.
#[derive(Debug, Clone)]
pub(crate) struct Summary {
    pub(crate) finding: FindingId,
    pub(crate) fields: Option<Arc<FindingFields>>,
    /// Violations since the previous line about it.
    pub(crate) since: u64,
    pub(crate) total: u64,
}

/// What to log for the violation just recorded.
#[derive(Debug)]
pub(crate) enum LogNow {
    Nothing,
    /// The finding's first violation: log it in full.
    Full(Arc<ViolationRecord>),
    /// The first violation past `max_findings`: say so, once.
    OverflowStarted {
        finding: FindingId,
        max_findings: usize,
    },
    Summary(Summary),
}

/// A finding's figures, copied out of the table (names still shared).
#[derive(Debug, Clone)]
pub(crate) struct FindingData {
    pub(crate) id: FindingId,
    pub(crate) fields: Option<Arc<FindingFields>>,
    pub(crate) count: u64,
    pub(crate) first_seen: Millis,
    pub(crate) last_seen: Millis,
    pub(crate) sessions: DistinctCount,
    pub(crate) connections: DistinctCount,
}

/// One finding with its examples, copied out of the table.
#[derive(Debug, Clone)]
pub(crate) struct FindingCopy {
    pub(crate) data: FindingData,
    pub(crate) first: Option<(Arc<ViolationRecord>, Timeline)>,
    pub(crate) latest: Option<(Kept, Timeline)>,
}

/// Every finding, bounded. The engine keeps it under one mutex.
pub(crate) struct FindingTable {
    max_findings: usize,
    interval: Millis,
    /// How many violations are kept in all (`sessions.max_violations`),
    /// unless the findings' own newest alone are more.
    max_kept: usize,
    findings: Vec<Finding>,
    /// Violations no longer among their finding's newest, oldest first,
    /// with their finding's slot: the first to go when room runs out.
    older: VecDeque<(u32, Kept)>,
    /// Violations in the findings' `recent`, all together.
    in_recent: usize,
    by_id: HashMap<FindingId, u32>,
    cache: HashMap<IdKey, u32, foldhash::fast::RandomState>,
    overflow: Option<u32>,
}

impl fmt::Debug for FindingTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FindingTable")
            .field("findings", &self.findings.len())
            .field("max_findings", &self.max_findings)
            .finish_non_exhaustive()
    }
}

impl FindingTable {
    /// At most `max_findings` findings (plus the overflow finding); summary
    /// lines at most every `interval` per finding; `max_kept` violations
    /// kept for `recent` (see the module doc).
    pub(crate) fn new(max_findings: usize, interval: Millis, max_kept: usize) -> FindingTable {
        FindingTable {
            max_findings,
            interval,
            max_kept,
            findings: Vec::new(),
            older: VecDeque::new(),
            in_recent: 0,
            by_id: HashMap::new(),
            cache: HashMap::default(),
            overflow: None,
        }
    }

    pub(crate) fn set_interval(&mut self, interval: Millis) {
        self.interval = interval;
    }

    pub(crate) fn interval(&self) -> Millis {
        self.interval
    }

    fn cache_limit(&self) -> usize {
        self.max_findings
            .saturating_add(1)
            .saturating_mul(CACHE_PER_FINDING)
            .max(1024)
    }

    /// The slot of the finding `key` belongs to, creating it (or the
    /// overflow finding) when new. Names are resolved only on a cache miss.
    fn slot(&mut self, key: &IdKey, names: &dyn Names) -> u32 {
        if let Some(slot) = self.cache.get(key) {
            return *slot;
        }
        let fields = key.fields(names);
        let id = FindingId::of(&fields);
        let slot = match self.by_id.get(&id) {
            Some(slot) => *slot,
            None if self.by_id.len() < self.max_findings => {
                let slot = self.push(Finding::new(id, Some(Arc::new(fields))));
                self.by_id.insert(id, slot);
                slot
            }
            None => match self.overflow {
                Some(slot) => slot,
                None => {
                    let slot = self.push(Finding::new(FindingId::overflow(), None));
                    self.overflow = Some(slot);
                    slot
                }
            },
        };
        if self.cache.len() >= self.cache_limit() {
            // A cache, not state: rebuilt from the next violations.
            self.cache.clear();
        }
        self.cache.insert(*key, slot);
        slot
    }

    fn push(&mut self, finding: Finding) -> u32 {
        self.findings.push(finding);
        // At most max_findings + 1 entries, and max_findings is a usize
        // from the configuration: saturate rather than wrap.
        u32::try_from(self.findings.len() - 1).unwrap_or(u32::MAX)
    }

    /// Counts a violation under its finding and says what to log. `resolve`
    /// turns the finding's first violation into its full record (called at
    /// most once per finding).
    pub(crate) fn record(
        &mut self,
        key: &IdKey,
        kept: Kept,
        timeline: Timeline,
        now: Millis,
        names: &dyn Names,
        resolve: impl FnOnce(&Kept, FindingId) -> ViolationRecord,
    ) -> (FindingId, LogNow) {
        let slot = self.slot(key, names);
        let overflow = self.overflow == Some(slot);
        let interval = self.interval;
        let Some(finding) = self.findings.get_mut(slot as usize) else {
            return (FindingId::default(), LogNow::Nothing);
        };
        let first = finding.count == 0;
        finding.count += 1;
        // Threads may file violations a millisecond out of order.
        finding.last_seen = finding.last_seen.max(now);
        let violation = &kept.violation;
        finding.sessions.add(session_hash(&violation.key));
        for request in [&violation.current, &violation.earlier]
            .into_iter()
            .flatten()
        {
            finding.connections.add(request.conn);
        }
        let mut log = LogNow::Nothing;
        if first {
            finding.first_seen = now;
            finding.logged_count = 1;
            finding.logged_at = now;
            let record = Arc::new(resolve(&kept, finding.id));
            finding.first = Some((record.clone(), timeline));
            log = if overflow {
                LogNow::OverflowStarted {
                    finding: finding.id,
                    max_findings: self.max_findings,
                }
            } else {
                LogNow::Full(record)
            };
        } else if let Some(summary) = finding.summary_due(now, interval) {
            log = LogNow::Summary(summary);
        }
        finding.recent.push_back(kept);
        finding.latest_timeline = timeline;
        let id = finding.id;
        if finding.recent.len() > RECENT_PER_FINDING {
            if let Some(oldest) = finding.recent.pop_front() {
                self.older.push_back((slot, oldest));
            }
        } else {
            self.in_recent += 1;
        }
        while self.in_recent + self.older.len() > self.max_kept && self.older.pop_front().is_some()
        {
        }
        (id, log)
    }

    /// How many violations are kept.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.in_recent + self.older.len()
    }

    /// Summary lines due at `now` (violations since the last line, and the
    /// interval passed): what a flood that stopped still owes the log.
    pub(crate) fn due_summaries(&mut self, now: Millis) -> Vec<Summary> {
        let interval = self.interval;
        self.findings
            .iter_mut()
            .filter_map(|finding| finding.summary_due(now, interval))
            .collect()
    }

    /// A summary for every finding with violations not yet in a line,
    /// interval or not (at shutdown, so the log's counts add up).
    pub(crate) fn unlogged_summaries(&mut self, now: Millis) -> Vec<Summary> {
        self.findings
            .iter_mut()
            .filter_map(|finding| finding.summary_due(now, 0))
            .collect()
    }

    /// Every finding, the most recently seen first.
    pub(crate) fn list(&self) -> Vec<FindingData> {
        let mut all: Vec<FindingData> = self.findings.iter().map(Finding::data).collect();
        all.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(b.count.cmp(&a.count)));
        all
    }

    /// One finding with its examples.
    pub(crate) fn get(&self, id: FindingId) -> Option<FindingCopy> {
        let finding = self.findings.iter().find(|finding| finding.id == id)?;
        Some(FindingCopy {
            data: finding.data(),
            first: finding.first.clone(),
            latest: finding
                .recent
                .back()
                .map(|kept| (kept.clone(), finding.latest_timeline)),
        })
    }

    /// At most `max_kept` kept violations, oldest first, chosen fairly: every
    /// finding's newest first, then every finding's second newest, and so
    /// on up to its `RECENT_PER_FINDING` newest, then the older ones, newer
    /// before older within a round. So a flood of one finding never pushes
    /// out the only example of another.
    pub(crate) fn recent(&self) -> Vec<(FindingId, Kept)> {
        let limit = self.max_kept;
        let older = self.older.iter().filter_map(|(slot, kept)| {
            let finding = self.findings.get(*slot as usize)?;
            Some((RECENT_PER_FINDING, kept.id, finding.id, kept))
        });
        let mut ranked: Vec<(usize, u64, FindingId, &Kept)> = self
            .findings
            .iter()
            .flat_map(|finding| {
                finding
                    .recent
                    .iter()
                    .rev()
                    .enumerate()
                    .map(move |(rank, kept)| (rank, kept.id, finding.id, kept))
            })
            .chain(older)
            .collect();
        ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        ranked.truncate(limit);
        ranked.sort_by_key(|(_, id, _, _)| *id);
        ranked
            .into_iter()
            .map(|(_, _, finding, kept)| (finding, kept.clone()))
            .collect()
    }
}

// ---- the public, serializable view (engine API, admin API, reports) ----

/// A finding as `GET /findings` lists it and `SessionEngine::findings`
/// returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingSnapshot {
    /// The stable id (`FindingId`): 12 hex digits.
    pub fingerprint: FindingId,
    /// The overflow finding: violations of fingerprints first seen after
    /// `sessions.max_findings` findings existed. It has no rule or requests.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub overflow: bool,
    pub rule: Option<RuleId>,
    pub severity: Option<Severity>,
    pub action: Option<Action>,
    /// The offending request's command, namespace, application and driver.
    pub current: Option<FindingSide>,
    /// The earlier request's, where the rule has one.
    pub earlier: Option<FindingSide>,
    /// Violations since start (every one, whatever was logged or kept).
    pub count: u64,
    /// RFC 3339 UTC.
    pub first_seen: String,
    pub last_seen: String,
    pub sessions: DistinctCount,
    pub connections: DistinctCount,
}

/// One operation of an example's timeline (also read back from a JSON
/// report, hence `Deserialize`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub connection_id: u64,
    pub request_id: i32,
    pub command: String,
    pub namespace: String,
    pub txn_number: Option<i64>,
    /// RFC 3339 UTC: when the request passed the proxy.
    pub sent: String,
    /// When its first reply passed the proxy; `null`: none (yet), or none
    /// expected (a rejected or unacknowledged request).
    pub replied: Option<String>,
    /// `current` (the offending request) or `earlier`; absent for the
    /// other operations on the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// A violation of a finding with its session's recent timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Example {
    /// In the shape of a `/violations` entry.
    #[serde(serialize_with = "as_violation_json")]
    pub violation: ViolationRecord,
    /// The last operations on the session (at most 8, from the connections
    /// of both requests), oldest first, up to and including the offending
    /// request.
    pub timeline: Vec<TimelineEntry>,
}

fn as_violation_json<S: serde::Serializer>(
    record: &ViolationRecord,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    record.json().serialize(serializer)
}

/// A finding's first and latest examples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Examples {
    pub first: Option<Example>,
    pub latest: Option<Example>,
}

/// One finding with its examples: `GET /findings/<id>`,
/// `SessionEngine::finding`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FindingDetail {
    #[serde(flatten)]
    pub finding: FindingSnapshot,
    pub examples: Examples,
}

impl FindingData {
    pub(crate) fn snapshot(&self, wall: &dyn Fn(Millis) -> String) -> FindingSnapshot {
        let fields = self.fields.as_deref();
        FindingSnapshot {
            fingerprint: self.id,
            overflow: fields.is_none(),
            rule: fields.map(|f| f.rule),
            severity: fields.map(|f| f.severity),
            action: fields.map(|f| f.action),
            current: fields.and_then(|f| f.current.clone()),
            earlier: fields.and_then(|f| f.earlier.clone()),
            count: self.count,
            first_seen: wall(self.first_seen),
            last_seen: wall(self.last_seen),
            sessions: self.sessions,
            connections: self.connections,
        }
    }
}

/// A timeline with names and wall-clock times.
pub(crate) fn timeline_entries(
    timeline: &Timeline,
    names: &dyn Names,
    wall: &dyn Fn(Millis) -> String,
) -> Vec<TimelineEntry> {
    timeline
        .ops()
        .map(|op| TimelineEntry {
            connection_id: op.request.conn,
            request_id: op.request.request_id,
            command: names.symbol(op.request.command).to_string(),
            namespace: names.symbol(op.request.namespace).to_string(),
            txn_number: op.request.txn_number,
            sent: wall(op.request.at),
            replied: op.replied.map(wall),
            role: op.role,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intern::ClientIdentity;
    use crate::state::{OwnerId, RequestRef};
    use crate::violation::Says;
    use sessionguard_protocol::command::Lsid;

    /// Symbols 1.. are "find", "insert", "app.items", "app.orders";
    /// clients 1.. are ("web", rust), ("web", rust) from another host,
    /// ("billing", rust).
    struct TestNames;

    impl Names for TestNames {
        fn symbol(&self, sym: Sym) -> Arc<str> {
            Arc::from(match sym.0 {
                1 => "find",
                2 => "insert",
                3 => "app.items",
                4 => "app.orders",
                _ => "?",
            })
        }
        fn identity(&self, id: ClientId) -> Option<Arc<ClientIdentity>> {
            let (app, peer) = match id.0 {
                1 => ("web", [10, 0, 0, 1]),
                2 => ("web", [10, 0, 0, 2]),
                3 => ("billing", [10, 0, 0, 1]),
                _ => return None,
            };
            Some(Arc::new(ClientIdentity {
                peer: Some(peer.into()),
                metadata_seen: true,
                driver_name: Some(Arc::from("mongo-rust-driver")),
                driver_version: Some(Arc::from("3.3.0")),
                app_name: Some(Arc::from(app)),
                user: None,
            }))
        }
    }

    fn request(
        conn: u64,
        request_id: i32,
        command: u32,
        namespace: u32,
        client: u32,
    ) -> RequestRef {
        RequestRef {
            conn,
            at: 0,
            txn_number: None,
            request_id,
            client: ClientId(client),
            command: Sym(command),
            namespace: Sym(namespace),
        }
    }

    fn violation(lsid: u8, current: RequestRef, earlier: RequestRef) -> Violation {
        let key = SessionKey {
            lsid: Lsid([lsid; 16]),
            owner: OwnerId::UNKNOWN,
        };
        Violation::new(RuleId::ConcurrentUse, key, 0, Says::ConcurrentUse)
            .current(current)
            .earlier(earlier)
    }

    fn id_of(violation: &Violation) -> FindingId {
        let key = IdKey::of(violation, Severity::Error, Action::Log);
        FindingId::of(&key.fields(&TestNames))
    }

    fn kept(id: u64, violation: Violation) -> Kept {
        Kept {
            id,
            violation,
            severity: Severity::Error,
            action: Action::Log,
            rejected: false,
            peers: [None; 3],
        }
    }

    fn record_stub(kept: &Kept, finding: FindingId) -> ViolationRecord {
        ViolationRecord {
            id: kept.id,
            finding,
            rule: kept.violation.rule,
            severity: kept.severity,
            action: kept.action,
            rejected: kept.rejected,
            unconfirmed: kept.violation.unconfirmed,
            lsid: kept.violation.key.lsid.to_string(),
            lsid_short: kept.violation.key.lsid.short().to_string(),
            owner: None,
            at: String::new(),
            message: String::new(),
            current: None,
            earlier: None,
            store: None,
        }
    }

    fn record(table: &mut FindingTable, id: u64, violation: Violation, now: Millis) -> LogNow {
        let key = IdKey::of(&violation, Severity::Error, Action::Log);
        table
            .record(
                &key,
                kept(id, violation),
                Timeline::default(),
                now,
                &TestNames,
                record_stub,
            )
            .1
    }

    #[test]
    fn the_fingerprint_ignores_sessions_connections_request_ids_and_hosts() {
        let a = violation(1, request(1, 10, 2, 3, 1), request(2, 20, 1, 3, 1));
        // Another session, other connections and request ids, the same
        // application from another host.
        let b = violation(7, request(9, 99, 2, 3, 2), request(8, 5, 1, 3, 2));
        assert_eq!(id_of(&a), id_of(&b));
        // Another namespace, another application, another earlier command:
        // other bugs.
        let namespace = violation(1, request(1, 10, 2, 4, 1), request(2, 20, 1, 3, 1));
        let app = violation(1, request(1, 10, 2, 3, 3), request(2, 20, 1, 3, 1));
        let earlier = violation(1, request(1, 10, 2, 3, 1), request(2, 20, 2, 3, 1));
        let ids = [id_of(&a), id_of(&namespace), id_of(&app), id_of(&earlier)];
        for (i, x) in ids.iter().enumerate() {
            for y in &ids[i + 1..] {
                assert_ne!(x, y);
            }
        }
        // Severity and action are part of it too.
        let warning = IdKey::of(&a, Severity::Warning, Action::Log).fields(&TestNames);
        let reject = IdKey::of(&a, Severity::Error, Action::Reject).fields(&TestNames);
        assert_ne!(FindingId::of(&warning), id_of(&a));
        assert_ne!(FindingId::of(&reject), id_of(&a));
    }

    #[test]
    fn the_id_is_the_documented_hash_of_the_canonical_text() {
        let a = violation(1, request(1, 10, 2, 3, 1), request(2, 20, 1, 3, 1));
        let fields = IdKey::of(&a, Severity::Error, Action::Log).fields(&TestNames);
        let text = canonical_text(&fields);
        assert_eq!(
            text,
            "sessionguard finding v1\nrule=concurrent-use\nseverity=error\naction=log\n\
             command=insert\nnamespace=app.items\napp=web\ndriver=mongo-rust-driver\n\
             earlier.command=find\nearlier.namespace=app.items\nearlier.app=web\nearlier.driver=mongo-rust-driver\n"
        );
        // Fixed across processes and versions: `printf '<text>' | sha256sum | cut -c1-12`.
        assert_eq!(FindingId::of(&fields).to_string(), "e8d9d0d1e9db");
        assert_eq!(FindingId::overflow().to_string(), "a553466710fa");
        let id = FindingId::of(&fields);
        assert_eq!(id.to_string().parse::<FindingId>(), Ok(id));
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
        for bad in [
            "",
            "e8d9d0d1e9d",
            "e8d9d0d1e9dbb",
            "g8d9d0d1e9db",
            "+8d9d0d1e9db",
        ] {
            assert!(bad.parse::<FindingId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_finding_counts_every_violation_and_the_distinct_sessions_and_connections() {
        let mut table = FindingTable::new(10, 60_000, 10_000);
        for i in 0..250u64 {
            let lsid = u8::try_from(i % 3).unwrap();
            let v = violation(lsid, request(i, 1, 2, 3, 1), request(1000, 1, 1, 3, 1));
            record(&mut table, i + 1, v, i);
        }
        let all = table.list();
        assert_eq!(all.len(), 1);
        let finding = &all[0];
        assert_eq!(finding.count, 250);
        assert_eq!((finding.first_seen, finding.last_seen), (0, 249));
        assert_eq!(
            finding.sessions,
            DistinctCount {
                count: 3,
                exact: true
            }
        );
        assert_eq!(
            finding.connections,
            DistinctCount {
                count: DISTINCT_CAP as u64,
                exact: false
            }
        );
        let copy = table.get(finding.id).unwrap();
        assert_eq!(copy.first.unwrap().0.id, 1);
        assert_eq!(copy.latest.unwrap().0.id, 250);
    }

    #[test]
    fn the_first_violation_is_logged_in_full_then_one_summary_per_interval() {
        let mut table = FindingTable::new(10, 60_000, 10_000);
        let v = || violation(1, request(1, 1, 2, 3, 1), request(2, 1, 1, 3, 1));
        assert!(matches!(record(&mut table, 1, v(), 0), LogNow::Full(_)));
        for at in 1..1000 {
            assert!(matches!(record(&mut table, 2, v(), at), LogNow::Nothing));
        }
        // 1,000 violations in the first second: one line. The next violation
        // after the interval says how many came since.
        let LogNow::Summary(summary) = record(&mut table, 3, v(), 60_000) else {
            panic!("a summary is due");
        };
        assert_eq!((summary.since, summary.total), (1000, 1001));
        assert!(matches!(
            record(&mut table, 4, v(), 60_001),
            LogNow::Nothing
        ));
        // The flood stops: the sweep owes one last line, then nothing.
        assert!(table.due_summaries(100_000).is_empty(), "interval not over");
        let due = table.due_summaries(120_000);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].since, due[0].total), (1, 1002));
        assert!(table.due_summaries(500_000).is_empty());
        // At shutdown, what is unlogged is logged whatever the interval.
        assert!(matches!(
            record(&mut table, 5, v(), 130_000),
            LogNow::Nothing
        ));
        assert!(table.due_summaries(130_001).is_empty());
        let flushed = table.unlogged_summaries(130_001);
        assert_eq!(flushed.len(), 1);
        assert_eq!((flushed[0].since, flushed[0].total), (1, 1003));
        assert!(table.unlogged_summaries(130_002).is_empty());
    }

    #[test]
    fn past_max_findings_new_fingerprints_share_one_overflow_finding_announced_once() {
        let mut table = FindingTable::new(2, 60_000, 10_000);
        // Four bugs: (insert|find) x (items|orders).
        let bug = |command: u32, namespace: u32| {
            violation(
                1,
                request(1, 1, command, namespace, 1),
                request(2, 1, 1, 3, 1),
            )
        };
        assert!(matches!(
            record(&mut table, 1, bug(2, 3), 0),
            LogNow::Full(_)
        ));
        assert!(matches!(
            record(&mut table, 2, bug(2, 4), 1),
            LogNow::Full(_)
        ));
        let LogNow::OverflowStarted {
            finding,
            max_findings,
        } = record(&mut table, 3, bug(1, 3), 2)
        else {
            panic!("the overflow is announced");
        };
        assert_eq!((finding, max_findings), (FindingId::overflow(), 2));
        assert!(matches!(
            record(&mut table, 4, bug(1, 4), 3),
            LogNow::Nothing
        ));
        assert!(matches!(
            record(&mut table, 5, bug(1, 3), 4),
            LogNow::Nothing
        ));
        // Known findings still count as themselves.
        assert!(matches!(
            record(&mut table, 6, bug(2, 3), 5),
            LogNow::Nothing
        ));
        let all = table.list();
        assert_eq!(all.len(), 3);
        let overflow = all.iter().find(|f| f.fields.is_none()).unwrap();
        assert_eq!((overflow.id, overflow.count), (FindingId::overflow(), 3));
        assert_eq!(all.iter().map(|f| f.count).sum::<u64>(), 6);
        let snapshot = overflow.snapshot(&|at| at.to_string());
        assert!(snapshot.overflow && snapshot.rule.is_none());
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(json["overflow"], true);
    }

    #[test]
    fn the_kept_violations_are_all_kept_within_the_bound() {
        let mut table = FindingTable::new(10, 60_000, 10_000);
        let flood = || violation(1, request(1, 1, 2, 3, 1), request(2, 1, 1, 3, 1));
        for id in 1..=1000 {
            record(&mut table, id, flood(), id);
        }
        let ids: Vec<u64> = table.recent().iter().map(|(_, k)| k.id).collect();
        assert_eq!(ids, (1..=1000).collect::<Vec<_>>());
    }

    #[test]
    fn the_kept_violations_are_fair_to_rare_findings() {
        let flood = || violation(1, request(1, 1, 2, 3, 1), request(2, 1, 1, 3, 1));
        let rare = || violation(5, request(3, 1, 2, 4, 3), request(4, 1, 1, 4, 3));
        // The rare finding's one violation, then a flood of another.
        let run = |room: usize| {
            let mut table = FindingTable::new(10, 60_000, room);
            record(&mut table, 1, flood(), 0);
            record(&mut table, 2, rare(), 1);
            for id in 3..=1000 {
                record(&mut table, id, flood(), id);
            }
            let ids: Vec<u64> = table.recent().iter().map(|(_, k)| k.id).collect();
            (table, ids)
        };
        // Room for 10: the flood's older violations give way first.
        let (table, ids) = run(10);
        assert_eq!(table.kept(), 10, "memory stays within the bound");
        assert_eq!(ids, vec![2, 992, 993, 994, 995, 996, 997, 998, 999, 1000]);
        // Less room than the findings' newest: the newest of every finding
        // first, then the second newest of each, ...
        assert_eq!(run(3).1, vec![2, 999, 1000]);
        assert_eq!(run(1).1, vec![1000]);
        // No room at all: nothing listed, and the latest example stays.
        let (table, ids) = run(0);
        assert!(ids.is_empty());
        let flood_id = table.list()[0].id;
        assert_eq!(table.get(flood_id).unwrap().latest.unwrap().0.id, 1000);
    }
}

/// The findings as the engine files them: real requests through
/// `SessionEngine`, time driven explicitly.
#[cfg(test)]
mod engine_tests {
    use bson::rawdoc;

    use super::*;
    use crate::config::SessionConfig;
    use crate::engine::tests::{
        connect, engine_with, find, insert, lsid, ok, reply, send, TestEngine, PEER,
    };
    use crate::timeline::TIMELINE_LEN;
    use crate::RulesConfig;
    use sessionguard_protocol::command::Lsid;
    use sessionguard_protocol::wire::MsgFlags;

    fn engine() -> TestEngine {
        engine_with(SessionConfig::default(), RulesConfig::default())
    }

    /// Session `n`'s request overlaps `insert` on connection `a` with
    /// `find` on connection `b`: concurrent use.
    fn overlap(engine: &TestEngine, n: u8, a: u64, b: u64, at: Millis) {
        let id = i32::from(n) * 100;
        send(engine, a, id, &insert(n, 1, 1), 0, at);
        send(engine, b, id + 1, &find(n), 0, at + 1);
        reply(engine, a, id, &ok(), at + 2);
        reply(engine, b, id + 1, &ok(), at + 3);
    }

    #[test]
    fn the_same_bug_on_other_sessions_and_connections_is_one_finding() {
        let engine = engine();
        for (conn, port) in [(1, 50000), (2, 50001), (3, 50002), (4, 50003)] {
            connect(&engine, conn, &format!("10.1.1.1:{port}"), "web");
        }
        // The same application on another host.
        connect(&engine, 5, "10.9.9.9:40000", "web");
        connect(&engine, 7, "10.9.9.9:40001", "web");
        connect(&engine, 6, "10.1.1.1:50009", "billing");
        overlap(&engine, 1, 1, 2, 0);
        overlap(&engine, 2, 3, 4, 10);
        overlap(&engine, 3, 5, 7, 20);
        let all = engine.findings();
        assert_eq!(all.len(), 1, "{all:#?}");
        let web = &all[0];
        assert_eq!(web.count, 3);
        assert_eq!(
            web.sessions,
            DistinctCount {
                count: 3,
                exact: true
            }
        );
        assert_eq!(
            web.connections,
            DistinctCount {
                count: 6,
                exact: true
            }
        );
        assert_eq!(web.rule, Some(RuleId::ConcurrentUse));
        let current = web.current.as_ref().unwrap();
        assert_eq!(
            (current.command.as_str(), current.namespace.as_str()),
            ("find", "shop.orders")
        );
        assert_eq!(current.app_name.as_deref(), Some("web"));
        assert_eq!(current.driver.as_deref(), Some("mongo-rust-driver"));
        assert_eq!(web.earlier.as_ref().unwrap().command, "insert");
        // Another application: another finding, and every violation names
        // its finding.
        overlap(&engine, 4, 6, 6, 30);
        let all = engine.findings();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].current.as_ref().unwrap().app_name.as_deref(),
            Some("billing")
        );
        assert_ne!(all[0].fingerprint, all[1].fingerprint);
        let kept = engine.violations();
        assert_eq!(
            kept.iter().map(|v| v.finding).collect::<Vec<_>>(),
            vec![
                web.fingerprint,
                web.fingerprint,
                web.fingerprint,
                all[0].fingerprint
            ]
        );
        assert!(engine.finding(web.fingerprint).is_some());
        assert!(engine.finding(FindingId::overflow()).is_none());
    }

    #[test]
    fn an_example_carries_the_sessions_timeline_from_both_connections() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        // Earlier traffic on the session, and on another session between.
        send(&engine, 1, 10, &find(3), 0, 100);
        reply(&engine, 1, 10, &ok(), 120);
        send(&engine, 2, 11, &find(8), 0, 125);
        send(&engine, 1, 12, &insert(3, 7, 1), 0, 130);
        // The offending find overlaps the insert.
        send(&engine, 2, 20, &find(3), 0, 150);
        reply(&engine, 1, 12, &ok(), 160);
        let finding = engine.findings()[0].fingerprint;
        let detail = engine.finding(finding).unwrap();
        let first = detail.examples.first.as_ref().unwrap();
        assert_eq!(first.violation.finding, finding);
        let ops: Vec<_> = first
            .timeline
            .iter()
            .map(|op| {
                (
                    op.connection_id,
                    op.request_id,
                    op.command.as_str(),
                    op.txn_number,
                    op.replied.is_some(),
                    op.role,
                )
            })
            .collect();
        assert_eq!(
            ops,
            vec![
                (1, 10, "find", None, true, None),
                (1, 12, "insert", Some(7), false, Some(Role::Earlier)),
                (2, 20, "find", None, false, Some(Role::Current)),
            ]
        );
        assert!(first
            .timeline
            .iter()
            .all(|op| op.namespace == "shop.orders"));
        // The sent times are the requests' own, in order.
        let sent: Vec<&str> = first.timeline.iter().map(|op| op.sent.as_str()).collect();
        assert!(sent.windows(2).all(|w| w[0] < w[1]), "{sent:?}");
        assert_eq!(
            first.timeline[2].sent,
            first.violation.current.as_ref().unwrap().at
        );
        // The latest example is the same violation (only one so far), its
        // evidence resolved when read.
        let latest = detail.examples.latest.as_ref().unwrap();
        assert_eq!(latest.violation, first.violation);
        // Serialized as the admin API serves it.
        let json = serde_json::to_value(&detail).unwrap();
        assert_eq!(json["fingerprint"], finding.to_string());
        assert_eq!(
            json["examples"]["first"]["violation"]["finding"],
            finding.to_string()
        );
        assert_eq!(
            json["examples"]["first"]["violation"]["evidence"]["current"]["request_id"],
            20
        );
        assert_eq!(json["examples"]["first"]["timeline"][2]["role"], "current");
        assert!(json["examples"]["first"]["timeline"][0]
            .get("role")
            .is_none());
    }

    #[test]
    fn a_timeline_within_one_millisecond_reads_in_the_order_requests_arrived() {
        // Engine time stands still: only the request sequence orders them.
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        send(&engine, 2, 9, &find(3), 0, 100);
        reply(&engine, 2, 9, &ok(), 100);
        send(&engine, 1, 10, &find(3), 0, 100);
        reply(&engine, 1, 10, &ok(), 100);
        send(&engine, 2, 11, &find(3), 0, 100);
        reply(&engine, 2, 11, &ok(), 100);
        send(&engine, 1, 12, &insert(3, 7, 1), 0, 100);
        send(&engine, 2, 20, &find(3), 0, 100);
        let finding = engine.findings()[0].fingerprint;
        let detail = engine.finding(finding).unwrap();
        let first = detail.examples.first.as_ref().unwrap();
        let ops: Vec<_> = first
            .timeline
            .iter()
            .map(|op| (op.connection_id, op.request_id))
            .collect();
        assert_eq!(ops, vec![(2, 9), (1, 10), (2, 11), (1, 12), (2, 20)]);
    }

    #[test]
    fn a_closed_connections_ring_still_explains_its_violation() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        send(&engine, 1, 10, &find(5), 0, 0);
        reply(&engine, 1, 10, &ok(), 1);
        send(&engine, 1, 11, &insert(5, 1, 1), 0, 2);
        engine.close_at(1, sessionguard_protocol::CloseCause::ClientClosed, 50);
        let finding = engine.findings()[0].clone();
        assert_eq!(finding.rule, Some(RuleId::ClosedWithRequestsInFlight));
        let detail = engine.finding(finding.fingerprint).unwrap();
        let first = detail.examples.first.unwrap();
        let ops: Vec<_> = first
            .timeline
            .iter()
            .map(|op| (op.request_id, op.role))
            .collect();
        assert_eq!(ops, vec![(10, None), (11, Some(Role::Earlier))]);
        // The peer (with its port) was captured before the connection went.
        assert_eq!(
            first.violation.earlier.as_ref().unwrap().peer.as_deref(),
            Some(PEER)
        );
    }

    #[test]
    fn timelines_are_bounded_and_never_hold_other_sessions() {
        let engine = engine();
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        for i in 0..20u8 {
            let at = u64::from(i) * 10;
            let id = 10 + i32::from(i);
            send(&engine, 1, id, &find(if i % 2 == 0 { 1 } else { 2 }), 0, at);
            reply(&engine, 1, id, &ok(), at + 1);
        }
        send(&engine, 1, 100, &insert(1, 1, 1), 0, 500);
        send(&engine, 2, 101, &find(1), 0, 501);
        let id = engine.findings()[0].fingerprint;
        let timeline = engine.finding(id).unwrap().examples.first.unwrap().timeline;
        assert!(timeline.len() <= TIMELINE_LEN);
        assert_eq!(timeline.last().unwrap().request_id, 101);
        // Session 1's finds were the even ones (ids 10, 12, ...).
        assert!(timeline
            .iter()
            .all(|op| op.request_id >= 100 || op.request_id % 2 == 0));
        let kept = engine.violations();
        assert_eq!(kept[0].lsid, Lsid([1; 16]).to_string());
    }

    #[test]
    fn a_flood_of_one_finding_does_not_evict_the_only_example_of_another() {
        let config = SessionConfig {
            max_violations: 4,
            ..SessionConfig::default()
        };
        let engine = engine_with(config, RulesConfig::default());
        connect(&engine, 1, PEER, "web");
        connect(&engine, 2, "10.1.1.1:50001", "web");
        // The rare one first: a concurrent use.
        send(&engine, 1, 5, &insert(9, 1, 1), 0, 0);
        send(&engine, 2, 6, &find(9), 0, 1);
        // Then a flood of unacknowledged writes with sessions.
        for i in 0..500i32 {
            let w0 = rawdoc! { "insert": "c", "documents": [{}], "lsid": lsid(1), "writeConcern": { "w": 0 }, "$db": "d" };
            send(
                &engine,
                1,
                100 + i,
                &w0,
                MsgFlags::MORE_TO_COME,
                10 + u64::try_from(i).unwrap(),
            );
        }
        let kept = engine.violations();
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[0].rule, RuleId::ConcurrentUse);
        assert!(kept[1..]
            .iter()
            .all(|v| v.rule == RuleId::UnacknowledgedWithSession));
        // The newest of the flood, oldest first.
        assert_eq!(kept[3].id, 501);
        assert!(kept.windows(2).all(|w| w[0].id < w[1].id));
        let counts: Vec<u64> = engine.findings().iter().map(|f| f.count).collect();
        assert_eq!(counts, vec![500, 1]);
        assert_eq!(engine.stats().violations, 501);
    }

    #[test]
    fn max_findings_bounds_the_findings_and_the_rest_overflow() {
        let config = SessionConfig {
            max_findings: 2,
            ..SessionConfig::default()
        };
        let engine = engine_with(config, RulesConfig::default());
        connect(&engine, 1, PEER, "web");
        for (i, collection) in ["a", "b", "c", "d", "a"].iter().enumerate() {
            let w0 = rawdoc! { "insert": *collection, "documents": [{}], "lsid": lsid(1), "writeConcern": { "w": 0 }, "$db": "d" };
            let id = 10 + i32::try_from(i).unwrap();
            send(
                &engine,
                1,
                id,
                &w0,
                MsgFlags::MORE_TO_COME,
                u64::try_from(i).unwrap(),
            );
        }
        let all = engine.findings();
        assert_eq!(all.len(), 3);
        let overflow: Vec<_> = all.iter().filter(|f| f.overflow).collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!(
            (overflow[0].fingerprint, overflow[0].count),
            (FindingId::overflow(), 2)
        );
        assert_eq!(all.iter().map(|f| f.count).sum::<u64>(), 5);
        let detail = engine.finding(FindingId::overflow()).unwrap();
        assert!(detail.examples.first.is_some() && detail.examples.latest.is_some());
    }
}
