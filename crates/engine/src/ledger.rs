//! The session ledger: every session the proxy follows (a [`SlabMap`] keyed
//! by lsid + owner, so a session costs its slot plus a few bytes of index),
//! the cursors opened under sessions, and the small set of sessions the
//! application currently holds (open transaction or cursor), which the
//! refresher and the transaction-age sweep walk instead of the whole ledger.
//!
//! Bounded: at `max_sessions` the oldest ended sessions go first, then the
//! oldest idle ones, and only then (never in practice) busy ones — every
//! eviction counted. Ended sessions stay as tombstones for `ended_retention`
//! so their reuse is caught; sessions long expired on the server are purged.
//!
//! Lock discipline (map shards are locks): a closure given a session never
//! touches another session, and the only nesting allowed is a session's
//! shard lock briefly touching the held set, which changes only under the
//! session's lock (when its held-ness changes or it is removed), so the set
//! stays exactly the held sessions without being checked on every call.
//! Nothing here is async.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::intern::FastDashMap;
use super::slab_map::{SlabMap, Slot};
use super::state::{EndKind, Millis, RequestRef, SessionKey, SessionState, TxnEvents};

/// A cursor as the server names it: cursor ids are per server, so the
/// listener (member) the client reached is part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CursorKey {
    pub upstream: u32,
    pub id: i64,
}

/// Who opened a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CursorEntry {
    pub owner: SessionKey,
    pub opened_by: RequestRef,
}

/// The ledger's gauges (what it holds now: sessions, held sessions, cursors,
/// tombstones) and counters (what it let go of: evictions, purges), for
/// metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerCounts {
    pub sessions: usize,
    pub held: usize,
    pub cursors: usize,
    pub evicted_ended: u64,
    pub evicted_idle: u64,
    pub evicted_busy: u64,
    pub purged: u64,
    /// Ended or killed sessions kept now (a subset of `sessions`).
    pub tombstones: usize,
    /// Of `purged`: live sessions dropped because the server expired them
    /// (idle past its timeout) — each an expiry nobody saw otherwise.
    pub purged_expired: u64,
}

/// Eviction preference: lower goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum EvictionClass {
    Ended = 0,
    Idle = 1,
    Busy = 2,
}

impl EvictionClass {
    fn of(state: &SessionState) -> EvictionClass {
        if state.is_ended() {
            EvictionClass::Ended
        } else if state.is_idle() {
            EvictionClass::Idle
        } else {
            EvictionClass::Busy
        }
    }
}

/// Bytes one tracked session occupies in the ledger's slab (key + state),
/// before the index's few bytes.
pub const SESSION_SLOT_BYTES: usize = std::mem::size_of::<Slot<SessionKey, SessionState>>();

#[derive(Debug)]
pub(crate) struct SessionLedger {
    sessions: SlabMap<SessionKey, SessionState>,
    // lsids are client-chosen: a per-process random seed.
    cursors: FastDashMap<CursorKey, CursorEntry>,
    held: FastDashMap<SessionKey, ()>,
    max_sessions: usize,
    evicted: [AtomicU64; 3],
    purged: AtomicU64,
    /// Kept in step by every path that changes or removes an entry, so a
    /// scrape never walks the map.
    tombstones: AtomicU64,
    purged_expired: AtomicU64,
}

impl SessionLedger {
    pub(crate) fn new(max_sessions: usize) -> SessionLedger {
        SessionLedger {
            sessions: SlabMap::new(),
            cursors: FastDashMap::default(),
            held: FastDashMap::default(),
            max_sessions: max_sessions.max(1),
            evicted: Default::default(),
            purged: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
            purged_expired: AtomicU64::new(0),
        }
    }

    /// Crate-internal (engine diagnostics and tests), so no `is_empty` twin.
    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    #[cfg(test)]
    fn contains(&self, key: &SessionKey) -> bool {
        self.sessions.contains_key(key)
    }

    /// Runs `f` on the session, creating it (evicting first if the ledger is
    /// full) when it is not tracked yet. One map lookup unless the ledger is
    /// full.
    pub(crate) fn with_session<R>(
        &self,
        key: SessionKey,
        now: Millis,
        f: impl FnOnce(&mut SessionState) -> R,
    ) -> R {
        let mut update = |state: &mut SessionState| self.update(&key, state, f);
        if self.sessions.len() >= self.max_sessions {
            match self.sessions.try_with_mut(&key, update) {
                Ok(result) => return result,
                Err(unused) => update = unused,
            }
            self.evict();
        }
        self.sessions
            .with_or_insert(key, || SessionState::new(now), update)
    }

    /// Runs `f` on the session if it is tracked.
    pub(crate) fn with_existing<R>(
        &self,
        key: &SessionKey,
        f: impl FnOnce(&mut SessionState) -> R,
    ) -> Option<R> {
        self.sessions
            .with_mut(key, |state| self.update(key, state, f))
    }

    /// Reads the session if it is tracked.
    pub(crate) fn read<R>(
        &self,
        key: &SessionKey,
        f: impl FnOnce(&SessionState) -> R,
    ) -> Option<R> {
        self.sessions.with(key, f)
    }

    /// Runs `f` under the session's lock and keeps the held set and the
    /// tombstone count in step with what it changed.
    fn update<R>(
        &self,
        key: &SessionKey,
        state: &mut SessionState,
        f: impl FnOnce(&mut SessionState) -> R,
    ) -> R {
        let was_ended = state.is_ended();
        let was_held = state.is_held();
        let result = f(state);
        match (was_held, state.is_held()) {
            (false, true) => {
                self.held.insert(*key, ());
            }
            (true, false) => {
                self.held.remove(key);
            }
            _ => {}
        }
        self.sync_tombstones(was_ended, state);
        result
    }

    fn sync_tombstones(&self, was_ended: bool, state: &SessionState) {
        match (was_ended, state.is_ended()) {
            (false, true) => {
                self.tombstones.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => self.tombstone_gone(),
            _ => {}
        }
    }

    fn tombstone_gone(&self) {
        // Every decrement follows its increment under the entry's lock; the
        // saturation only guards the gauge against a future bug.
        let _ = self
            .tombstones
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The sessions currently held (copied out, so callers can visit each
    /// without holding a shard lock).
    pub(crate) fn held_keys(&self) -> Vec<SessionKey> {
        self.held.iter().map(|entry| *entry.key()).collect()
    }

    /// Every tracked session key (for `refresh = "all"` and killAllSessions).
    pub(crate) fn all_keys(&self) -> Vec<SessionKey> {
        self.sessions.keys()
    }

    // ---- cursors ----

    /// Records a cursor opened under `owner`; true if it was new. (The
    /// engine inserts and counts apart: `insert_cursor`.)
    #[cfg(test)]
    pub(crate) fn register_cursor(&self, key: CursorKey, entry: CursorEntry) -> bool {
        let new = self.insert_cursor(key, entry);
        if new {
            self.with_existing(&entry.owner, |state| state.cursors_changed(1));
        }
        new
    }

    /// `register_cursor` without the owner's count: true if it was new,
    /// and then the caller counts it (`SessionState::cursors_changed`) in
    /// a lookup of the owner it makes anyway.
    pub(crate) fn insert_cursor(&self, key: CursorKey, entry: CursorEntry) -> bool {
        self.cursors.insert(key, entry).is_none()
    }

    /// `remove_cursor` without the owner's count, which the caller then
    /// takes off (`SessionState::cursors_changed`).
    pub(crate) fn take_cursor(&self, key: &CursorKey) -> Option<CursorEntry> {
        self.cursors.remove(key).map(|(_, entry)| entry)
    }

    pub(crate) fn cursor(&self, key: &CursorKey) -> Option<CursorEntry> {
        self.cursors.get(key).map(|entry| *entry.value())
    }

    /// Forgets a cursor (exhausted, killed, not found).
    pub(crate) fn remove_cursor(&self, key: &CursorKey) -> Option<CursorEntry> {
        let entry = self.take_cursor(key)?;
        self.with_existing(&entry.owner, |state| state.cursors_changed(-1));
        Some(entry)
    }

    /// Forgets every cursor of a session (it ended; the server killed them).
    fn remove_cursors_of(&self, owner: &SessionKey) {
        self.cursors.retain(|_, entry| entry.owner != *owner);
    }

    // ---- ending ----

    /// Marks a session ended (creating a tombstone if it was never seen);
    /// `confirmed`: the server answered the end ok:1 (see `Ended`).
    /// `Some` (with what the end did to its transaction) when this ended a
    /// live session; `None` when the lsid was unknown, never started or
    /// already ended.
    pub(crate) fn end(
        &self,
        key: SessionKey,
        kind: EndKind,
        by: RequestRef,
        confirmed: bool,
        now: Millis,
    ) -> Option<TxnEvents> {
        let (had_cursors, ended_live) = self.with_session(key, now, |state| {
            let live = state.started && !state.is_ended();
            let had = state.open_cursors > 0;
            let events = state.end(kind, by, confirmed);
            (had, live.then_some(events))
        });
        if had_cursors {
            self.remove_cursors_of(&key);
        }
        ended_live
    }

    // ---- bounds ----

    /// Frees about 1% of the capacity, oldest ended first, then oldest idle,
    /// then (only if everything is busy) oldest busy.
    fn evict(&self) {
        // Plus any overshoot: threads evicting at once can pick the same
        // victim and each still insert, and that must not accumulate.
        let batch = (self.max_sessions / 100).clamp(1, 10_000)
            + self.sessions.len().saturating_sub(self.max_sessions);
        // A max-heap of the `batch` best candidates: its top is the worst kept.
        let mut heap: BinaryHeap<(EvictionClass, Millis, SessionKey)> =
            BinaryHeap::with_capacity(batch + 1);
        self.sessions.for_each(|key, state| {
            let candidate = (EvictionClass::of(state), state.last_activity(), *key);
            if heap.len() < batch {
                heap.push(candidate);
            } else if heap.peek().is_some_and(|worst| candidate < *worst) {
                heap.pop();
                heap.push(candidate);
            }
        });
        for (chosen_as, _, key) in heap {
            // Chosen from a walk without the lock: a session that has since
            // become busier (reused, a request now in flight) stays.
            let removed = self.sessions.remove_if(&key, |key, state| {
                let class = EvictionClass::of(state);
                if class > chosen_as {
                    return false;
                }
                self.evicted[class as usize].fetch_add(1, Ordering::Relaxed);
                self.forget_under_lock(key, state);
                true
            });
            if let Some((key, state)) = removed {
                if state.open_cursors > 0 {
                    self.remove_cursors_of(&key);
                }
            }
        }
    }

    /// What goes with a session leaving the ledger, done under its lock so
    /// a session re-created under the same key right after cannot be
    /// confused with it.
    fn forget_under_lock(&self, key: &SessionKey, state: &SessionState) {
        if state.is_held() {
            self.held.remove(key);
        }
        if state.is_ended() {
            self.tombstone_gone();
        }
    }

    /// Drops tombstones older than `ended_retention`, and sessions the
    /// server expired (idle past `session_timeout`) more than
    /// `ended_retention` ago. Returns how many went.
    pub(crate) fn purge(
        &self,
        now: Millis,
        ended_retention: Millis,
        session_timeout: Millis,
    ) -> usize {
        let mut removed: Vec<(SessionKey, bool)> = Vec::new();
        self.sessions.retain(|key, state| {
            let keep = match state.ended.as_deref() {
                Some(ended) => now.saturating_sub(ended.by.at) <= ended_retention,
                None => {
                    !state.in_flight.is_empty()
                        || now.saturating_sub(state.last_activity())
                            <= session_timeout.saturating_add(ended_retention)
                }
            };
            if !keep {
                removed.push((*key, state.open_cursors > 0));
                if !state.is_ended() && state.started {
                    self.purged_expired.fetch_add(1, Ordering::Relaxed);
                }
                self.forget_under_lock(key, state);
            }
            keep
        });
        for (key, had_cursors) in &removed {
            if *had_cursors {
                self.remove_cursors_of(key);
            }
        }
        self.purged
            .fetch_add(removed.len() as u64, Ordering::Relaxed);
        removed.len()
    }

    pub(crate) fn counts(&self) -> LedgerCounts {
        LedgerCounts {
            sessions: self.sessions.len(),
            held: self.held.len(),
            cursors: self.cursors.len(),
            evicted_ended: self.evicted[EvictionClass::Ended as usize].load(Ordering::Relaxed),
            evicted_idle: self.evicted[EvictionClass::Idle as usize].load(Ordering::Relaxed),
            evicted_busy: self.evicted[EvictionClass::Busy as usize].load(Ordering::Relaxed),
            purged: self.purged.load(Ordering::Relaxed),
            tombstones: usize::try_from(self.tombstones.load(Ordering::Relaxed))
                .unwrap_or(usize::MAX),
            purged_expired: self.purged_expired.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::tests::{facts, request};
    use crate::state::{CommandClass, OwnerId};
    use sessionguard_protocol::command::Lsid;

    /// Session `n` of the unknown owner.
    pub(crate) fn key(n: u8) -> SessionKey {
        SessionKey {
            lsid: Lsid([n; 16]),
            owner: OwnerId(0),
        }
    }

    #[test]
    fn sessions_are_created_once_and_updated_in_place() {
        let ledger = SessionLedger::new(10);
        ledger.with_session(key(1), 5, |state| state.refreshes = 3);
        assert_eq!(ledger.len(), 1);
        assert_eq!(
            ledger.read(&key(1), |state| (state.first_seen, state.refreshes)),
            Some((5, 3))
        );
        ledger.with_session(key(1), 9, |state| state.refreshes += 1);
        assert_eq!(
            ledger.read(&key(1), |state| (state.first_seen, state.refreshes)),
            Some((5, 4))
        );
        assert_eq!(ledger.with_existing(&key(2), |_| ()), None);
    }

    #[test]
    fn eviction_prefers_ended_then_oldest_idle_and_counts() {
        let ledger = SessionLedger::new(3);
        ledger.with_session(key(1), 10, |_| ());
        ledger.with_session(key(2), 1, |_| ());
        ledger.end(key(3), EndKind::Ended, request(1, 1, 20, None), true, 20);
        // Full: the ended one goes first even though it is the newest.
        ledger.with_session(key(4), 30, |_| ());
        assert!(!ledger.contains(&key(3)));
        assert_eq!(ledger.counts().evicted_ended, 1);
        // Next: the oldest idle (key 2, last used at 1).
        ledger.with_session(key(5), 40, |_| ());
        assert!(!ledger.contains(&key(2)));
        assert!(ledger.contains(&key(1)));
        assert_eq!(ledger.counts().evicted_idle, 1);
        assert_eq!(ledger.len(), 3);
    }

    #[test]
    fn busy_sessions_are_evicted_last() {
        let ledger = SessionLedger::new(2);
        ledger.with_session(key(1), 1, |state| {
            state.apply_request(&facts(request(1, 1, 1, None), CommandClass::Write), 1)
        });
        ledger.with_session(key(2), 5, |_| ());
        ledger.with_session(key(3), 6, |_| ());
        assert!(
            ledger.contains(&key(1)),
            "the session with a request in flight stays"
        );
        assert!(!ledger.contains(&key(2)));
    }

    #[test]
    fn held_set_follows_cursors_and_transactions() {
        let ledger = SessionLedger::new(10);
        ledger.with_session(key(1), 0, |_| ());
        assert!(ledger.held_keys().is_empty());
        let cursor = CursorKey {
            upstream: 0,
            id: 99,
        };
        assert!(ledger.register_cursor(
            cursor,
            CursorEntry {
                owner: key(1),
                opened_by: request(1, 1, 0, None)
            }
        ));
        assert!(!ledger.register_cursor(
            cursor,
            CursorEntry {
                owner: key(1),
                opened_by: request(1, 1, 0, None)
            }
        ));
        assert_eq!(ledger.read(&key(1), |s| s.open_cursors), Some(1));
        assert_eq!(ledger.held_keys(), vec![key(1)]);
        assert_eq!(ledger.cursor(&cursor).unwrap().owner, key(1));
        assert!(ledger.remove_cursor(&cursor).is_some());
        assert_eq!(ledger.read(&key(1), |s| s.open_cursors), Some(0));
        assert!(ledger.held_keys().is_empty());
    }

    #[test]
    fn ending_kills_the_sessions_cursors() {
        let ledger = SessionLedger::new(10);
        ledger.with_session(key(1), 0, |_| ());
        for id in [1, 2] {
            ledger.register_cursor(
                CursorKey { upstream: 0, id },
                CursorEntry {
                    owner: key(1),
                    opened_by: request(1, 1, 0, None),
                },
            );
        }
        ledger.register_cursor(
            CursorKey { upstream: 0, id: 3 },
            CursorEntry {
                owner: key(2),
                opened_by: request(1, 1, 0, None),
            },
        );
        ledger.end(key(1), EndKind::Ended, request(2, 2, 5, None), true, 5);
        assert_eq!(ledger.counts().cursors, 1);
        assert!(ledger.held_keys().is_empty());
        assert!(ledger.read(&key(1), |s| s.is_ended()).unwrap());
        // Ending a session never seen leaves a tombstone.
        ledger.end(key(7), EndKind::Killed, request(2, 3, 5, None), true, 5);
        assert!(ledger.read(&key(7), |s| s.is_ended()).unwrap());
    }

    #[test]
    fn purge_drops_old_tombstones_and_long_expired_sessions_only() {
        let ledger = SessionLedger::new(10);
        ledger.end(key(1), EndKind::Ended, request(1, 1, 0, None), true, 0);
        ledger.end(key(2), EndKind::Ended, request(1, 1, 900, None), true, 900);
        // Used once (a forwarded request), long ago.
        ledger.with_session(key(3), 0, |state| state.started = true);
        ledger.with_session(key(4), 0, |state| {
            state.apply_request(&facts(request(1, 1, 0, None), CommandClass::Write), 0)
        });
        ledger.with_session(key(5), 500, |_| ());
        // retention 1000, timeout 100: at 1200 key1's tombstone (age 1200) and
        // key3 (idle 1200 > 1100) go; key4 has a request in flight.
        assert_eq!(ledger.purge(1200, 1000, 100), 2);
        assert!(!ledger.contains(&key(1)));
        assert!(ledger.contains(&key(2)));
        assert!(!ledger.contains(&key(3)));
        assert!(ledger.contains(&key(4)));
        assert!(ledger.contains(&key(5)));
        assert_eq!(ledger.counts().purged, 2);
        assert_eq!(ledger.counts().purged_expired, 1);
    }

    #[test]
    fn a_slot_is_the_entry_itself() {
        // The slab's `Option` costs nothing (the state has a niche), so
        // `SESSION_SLOT_BYTES` is the key and the state and no more.
        assert_eq!(
            SESSION_SLOT_BYTES,
            std::mem::size_of::<(SessionKey, SessionState)>()
        );
    }

    #[test]
    fn a_full_ledger_updates_known_sessions_without_evicting() {
        let ledger = SessionLedger::new(2);
        ledger.with_session(key(1), 1, |_| ());
        ledger.with_session(key(2), 2, |_| ());
        for now in 3..10 {
            ledger.with_session(key(1), now, |state| state.refreshes += 1);
            ledger.with_session(key(2), now, |state| state.refreshes += 1);
        }
        let counts = ledger.counts();
        assert_eq!(
            (counts.sessions, counts.evicted_idle, counts.evicted_ended),
            (2, 0, 0)
        );
        assert_eq!(ledger.read(&key(1), |state| state.refreshes), Some(7));
        // A new one still makes room.
        ledger.with_session(key(3), 10, |_| ());
        assert_eq!(ledger.len(), 2);
        assert_eq!(ledger.counts().evicted_idle, 1);
    }

    #[test]
    fn held_sessions_leave_the_held_set_when_evicted_or_purged() {
        let cursor_of = |owner| CursorEntry {
            owner,
            opened_by: request(1, 1, 0, None),
        };
        // Everything busy or held: the oldest held one is evicted.
        let ledger = SessionLedger::new(2);
        ledger.with_session(key(1), 0, |_| ());
        ledger.register_cursor(CursorKey { upstream: 0, id: 1 }, cursor_of(key(1)));
        ledger.with_session(key(2), 5, |_| ());
        ledger.register_cursor(CursorKey { upstream: 0, id: 2 }, cursor_of(key(2)));
        let mut held = ledger.held_keys();
        held.sort_by_key(|key| key.lsid.0);
        assert_eq!(held, vec![key(1), key(2)]);
        ledger.with_session(key(3), 6, |_| ());
        assert!(!ledger.contains(&key(1)));
        assert_eq!(ledger.held_keys(), vec![key(2)]);
        assert_eq!(
            ledger.counts().cursors,
            1,
            "the evicted session's cursor went"
        );
        assert_eq!(ledger.counts().evicted_busy, 1);
        // Re-created under the same key: a new, unheld session.
        ledger.with_session(key(1), 7, |_| ());
        assert_eq!(ledger.read(&key(1), |state| state.open_cursors), Some(0));
        assert_eq!(ledger.held_keys(), vec![key(2)]);
        // A held session the server expired long ago is purged with its
        // cursor and leaves the held set.
        ledger.with_session(key(2), 7, |state| state.started = true);
        assert_eq!(ledger.purge(10_000, 100, 100), 2);
        assert!(ledger.held_keys().is_empty());
        assert_eq!(ledger.counts().cursors, 0);
        assert_eq!(ledger.counts().held, 0);
    }

    #[test]
    fn concurrent_use_keeps_the_held_set_and_tombstone_count_exact() {
        use std::sync::atomic::AtomicU64;
        use std::sync::Arc;

        // Fewer slots than keys, so eviction runs alongside everything else.
        let ledger = Arc::new(SessionLedger::new(16));
        let clock = Arc::new(AtomicU64::new(1));
        let workers: Vec<_> = (0..4u64)
            .map(|worker| {
                let ledger = Arc::clone(&ledger);
                let clock = Arc::clone(&clock);
                std::thread::spawn(move || {
                    let mut rng = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(worker + 1);
                    for _ in 0..20_000 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let now = clock.fetch_add(1, Ordering::Relaxed);
                        let n = (rng >> 8) as u8 % 24;
                        let cursor = CursorKey {
                            upstream: 0,
                            id: i64::from(n) * 4 + (rng >> 16) as i64 % 4,
                        };
                        match rng % 7 {
                            0 | 1 => ledger.with_session(key(n), now, |s| s.started = true),
                            2 => {
                                ledger.register_cursor(
                                    cursor,
                                    CursorEntry {
                                        owner: key(n),
                                        opened_by: request(worker, 1, now, None),
                                    },
                                );
                            }
                            3 => {
                                ledger.remove_cursor(&cursor);
                            }
                            4 => {
                                ledger.end(
                                    key(n),
                                    EndKind::Ended,
                                    request(worker, 2, now, None),
                                    true,
                                    now,
                                );
                            }
                            5 => ledger.with_session(key(n), now, |s| {
                                if s.is_ended() {
                                    s.restart(now);
                                }
                            }),
                            _ => {
                                if rng % 64 == 6 {
                                    ledger.purge(now, 200, 100);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker");
        }
        let mut held = ledger.held_keys();
        held.sort_by_key(|key| key.lsid.0);
        let mut expected_held = Vec::new();
        let mut ended = 0;
        for key in ledger.all_keys() {
            let (is_held, is_ended) = ledger
                .read(&key, |state| (state.is_held(), state.is_ended()))
                .expect("tracked");
            if is_held {
                expected_held.push(key);
            }
            ended += usize::from(is_ended);
        }
        expected_held.sort_by_key(|key| key.lsid.0);
        assert_eq!(held, expected_held);
        assert_eq!(ledger.counts().tombstones, ended);
        assert!(ledger.len() <= 16 + 4, "{} sessions", ledger.len());
    }

    #[test]
    fn tombstones_are_counted_through_end_reuse_eviction_and_purge() {
        let ledger = SessionLedger::new(3);
        let by = |at| request(1, 1, at, None);
        // An entry that never carried a request (its first one was
        // rejected) has not started: ending it ends nothing.
        let unstarted = SessionLedger::new(3);
        unstarted.with_session(key(5), 0, |_| ());
        assert_eq!(unstarted.end(key(5), EndKind::Ended, by(0), true, 0), None);
        assert_eq!(unstarted.counts().tombstones, 1);
        // `started`: a request under it was forwarded (and answered).
        ledger.with_session(key(1), 0, |state| state.started = true);
        // A live session ended: reported, once.
        assert_eq!(
            ledger.end(key(1), EndKind::Ended, by(1), true, 1),
            Some(TxnEvents::default())
        );
        assert_eq!(ledger.end(key(1), EndKind::Killed, by(2), true, 2), None);
        // An lsid never seen: a tombstone, but no session ended.
        assert_eq!(ledger.end(key(2), EndKind::Killed, by(3), true, 3), None);
        assert_eq!(ledger.counts().tombstones, 2);
        // Reuse restarts the session: no longer a tombstone.
        ledger.with_session(key(1), 4, |state| {
            state.restart(4);
            state.started = true;
        });
        assert_eq!(ledger.counts().tombstones, 1);
        // Eviction takes the remaining tombstone first.
        ledger.with_session(key(3), 5, |state| state.started = true);
        ledger.with_session(key(4), 6, |state| state.started = true);
        assert!(!ledger.contains(&key(2)));
        assert_eq!(ledger.counts().tombstones, 0);
        ledger.end(key(4), EndKind::Ended, by(7), true, 7);
        assert_eq!(ledger.counts().tombstones, 1);
        assert_eq!(ledger.purge(10_000, 100, 100), 3);
        assert_eq!(ledger.counts().tombstones, 0);
        assert_eq!(ledger.counts().purged_expired, 2);
    }
}
