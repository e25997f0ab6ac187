//! A session's recent timeline, for evidence that explains itself: each
//! client connection keeps a small ring of its last operations that carried
//! an lsid or ended sessions (command, namespace, request id, txnNumber,
//! sent and replied times), and when a violation is raised the rings of the
//! connections involved (the offending request's and the earlier
//! request's) are merged, filtered by the session, ordered as the proxy
//! received them and cut at the offending request.
//!
//! Order: by time sent, and within one millisecond by the engine's request
//! sequence number (monotonic nanoseconds when the request was inspected),
//! so a fast client's kill-then-use in the same millisecond still reads in
//! order.
//!
//! Why per connection and not per session: a session entry is in the ledger
//! a million times over and must stay small (docs/performance.md), while
//! the engine already looks a connection up for every request and reply, so
//! writing one fixed-size entry there costs nothing measurable. The ring is
//! allocated on the connection's first session operation (monitoring
//! connections never pay for it).
//!
//! Pure data: no maps, no clock (times are passed in), no logging, never
//! document contents.

use serde::{Deserialize, Serialize};

use super::state::{Millis, RequestRef, SessionKey};

/// Operations each connection remembers.
pub(crate) const OPS_PER_CONNECTION: usize = 8;
/// Operations a violation's timeline shows at most.
pub(crate) const TIMELINE_LEN: usize = 8;

const NOT_REPLIED: Millis = Millis::MAX;

/// One operation as a connection remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Op {
    /// `None`: a command naming sessions without being in one (a
    /// killSessions or endSessions without an lsid of its own), kept to
    /// order and time it when it is a violation's earlier request.
    key: Option<SessionKey>,
    request: RequestRef,
    replied: Millis,
    seq: u64,
}

/// The last `OPS_PER_CONNECTION` session operations of one connection.
#[derive(Debug, Default)]
pub(crate) struct OpRing {
    /// Grows to `OPS_PER_CONNECTION` once, then entries are overwritten in
    /// place: no allocation after the first few requests.
    ops: Vec<Op>,
    next: usize,
}

/// Where an operation sits in its connection's ring (kept with the pending
/// request, so the reply can stamp its time without a search).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpSlot(u8);

impl OpRing {
    /// Remembers a request sent on session `key` (`None`: one that names
    /// sessions without being in one); `seq`: the engine's sequence number
    /// of the request.
    pub(crate) fn record(
        &mut self,
        key: Option<SessionKey>,
        request: RequestRef,
        seq: u64,
    ) -> OpSlot {
        let op = Op {
            key,
            request,
            replied: NOT_REPLIED,
            seq,
        };
        let slot = if self.ops.len() < OPS_PER_CONNECTION {
            if self.ops.capacity() == 0 {
                self.ops.reserve_exact(OPS_PER_CONNECTION);
            }
            self.ops.push(op);
            self.ops.len() - 1
        } else {
            let slot = self.next;
            self.ops[slot] = op;
            slot
        };
        self.next = (slot + 1) % OPS_PER_CONNECTION;
        // OPS_PER_CONNECTION fits in a u8.
        OpSlot(slot as u8)
    }

    /// The first reply to the request in `slot` arrived at `at` (ignored if
    /// the slot has since been reused by a later request).
    pub(crate) fn replied(&mut self, slot: OpSlot, request_id: i32, at: Millis) {
        if let Some(op) = self.ops.get_mut(usize::from(slot.0)) {
            if op.request.request_id == request_id && op.replied == NOT_REPLIED {
                op.replied = at;
            }
        }
    }

    /// Oldest first.
    fn in_order(&self) -> impl Iterator<Item = &Op> {
        let (newer, older) = self.ops.split_at(self.next.min(self.ops.len()));
        older.iter().chain(newer)
    }
}

/// Which request of the violation's evidence an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The request that broke the rule.
    Current,
    /// The earlier request it conflicts with.
    Earlier,
}

/// One operation of a timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimelineOp {
    pub request: RequestRef,
    /// When its first reply passed the proxy; `None`: no reply (yet), or
    /// none expected.
    pub replied: Option<Millis>,
    pub role: Option<Role>,
    /// The engine's sequence number: orders operations sent in one
    /// millisecond. `0` / `u64::MAX` for an evidence request no ring held
    /// (the earlier first, the offending last within its millisecond).
    pub seq: u64,
}

/// A violation's timeline: at most `TIMELINE_LEN` operations on its
/// session, oldest first. Fixed size, so keeping the latest example's
/// timeline for every violation of a flood allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeline {
    ops: [Option<TimelineOp>; TIMELINE_LEN],
    len: u8,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            ops: [None; TIMELINE_LEN],
            len: 0,
        }
    }
}

impl Timeline {
    pub(crate) fn ops(&self) -> impl Iterator<Item = &TimelineOp> {
        self.ops[..usize::from(self.len)].iter().flatten()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.len)
    }
}

/// Collects a violation's timeline from the rings of the connections
/// involved: `add` each ring, then `finish`.
#[derive(Debug)]
pub(crate) struct Gather {
    key: SessionKey,
    current: Option<RequestRef>,
    earlier: Option<RequestRef>,
    /// Two rings and the two evidence requests at most.
    found: [Option<TimelineOp>; 2 * OPS_PER_CONNECTION + 2],
    len: usize,
}

fn same(a: &RequestRef, b: &RequestRef) -> bool {
    a.conn == b.conn && a.request_id == b.request_id && a.at == b.at
}

impl Gather {
    pub(crate) fn new(
        key: SessionKey,
        current: Option<RequestRef>,
        earlier: Option<RequestRef>,
    ) -> Gather {
        Gather {
            key,
            current,
            earlier,
            found: [None; 2 * OPS_PER_CONNECTION + 2],
            len: 0,
        }
    }

    fn role(&self, request: &RequestRef) -> Option<Role> {
        if self.current.as_ref().is_some_and(|c| same(c, request)) {
            Some(Role::Current)
        } else if self.earlier.as_ref().is_some_and(|e| same(e, request)) {
            Some(Role::Earlier)
        } else {
            None
        }
    }

    fn push(&mut self, op: TimelineOp) {
        if let Some(slot) = self.found.get_mut(self.len) {
            *slot = Some(op);
            self.len += 1;
        }
    }

    /// The operations of one connection on the violation's session.
    /// The evidence requests are taken whatever session they ran in (a
    /// killSessions runs outside the session it kills).
    pub(crate) fn add(&mut self, ring: &OpRing) {
        for op in ring.in_order() {
            let role = self.role(&op.request);
            if op.key == Some(self.key) || role.is_some() {
                self.push(TimelineOp {
                    request: op.request,
                    replied: (op.replied != NOT_REPLIED).then_some(op.replied),
                    role,
                    seq: op.seq,
                });
            }
        }
    }

    /// Sorted by time sent, the evidence requests added if no ring had them
    /// (a rejected request, a ring that moved on), cut after the offending
    /// request, the last `TIMELINE_LEN` kept.
    pub(crate) fn finish(mut self) -> Timeline {
        for (request, role) in [(self.current, Role::Current), (self.earlier, Role::Earlier)] {
            let Some(request) = request else { continue };
            let present = self.found[..self.len]
                .iter()
                .flatten()
                .any(|op| same(&op.request, &request));
            if !present {
                self.push(TimelineOp {
                    request,
                    replied: None,
                    role: Some(role),
                    seq: match role {
                        Role::Earlier => 0,
                        Role::Current => u64::MAX,
                    },
                });
            }
        }
        let found = &mut self.found[..self.len];
        found.sort_by_key(|op| op.map_or((Millis::MAX, u64::MAX), |op| (op.request.at, op.seq)));
        let end = if self.current.is_some() {
            found
                .iter()
                .position(|op| op.is_some_and(|op| op.role == Some(Role::Current)))
                .map_or(found.len(), |at| at + 1)
        } else {
            found.len()
        };
        let start = end.saturating_sub(TIMELINE_LEN);
        let mut timeline = Timeline::default();
        for (slot, op) in timeline.ops.iter_mut().zip(&found[start..end]) {
            *slot = *op;
        }
        // At most TIMELINE_LEN (8).
        timeline.len = (end - start) as u8;
        timeline
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ClientId, OwnerId, Sym};
    use sessionguard_protocol::command::Lsid;

    fn key(n: u8) -> SessionKey {
        SessionKey {
            lsid: Lsid([n; 16]),
            owner: OwnerId::UNKNOWN,
        }
    }

    fn request(conn: u64, request_id: i32, at: Millis) -> RequestRef {
        RequestRef {
            conn,
            at,
            txn_number: None,
            request_id,
            client: ClientId::UNKNOWN,
            command: Sym(1),
            namespace: Sym(2),
        }
    }

    fn ids(timeline: &Timeline) -> Vec<(u64, i32, Option<Role>)> {
        timeline
            .ops()
            .map(|op| (op.request.conn, op.request.request_id, op.role))
            .collect()
    }

    #[test]
    fn the_ring_keeps_the_last_operations_and_stamps_replies_in_place() {
        let mut ring = OpRing::default();
        assert_eq!(ring.ops.capacity(), 0, "nothing allocated before use");
        let mut slots = Vec::new();
        for id in 0..(OPS_PER_CONNECTION as i32 + 3) {
            slots.push(ring.record(Some(key(1)), request(1, id, u64::try_from(id).unwrap()), 0));
        }
        assert_eq!(ring.ops.capacity(), OPS_PER_CONNECTION);
        // docs/performance.md: 704 bytes per connection carrying sessions.
        assert!(std::mem::size_of::<Op>() * OPS_PER_CONNECTION <= 704);
        let kept: Vec<i32> = ring.in_order().map(|op| op.request.request_id).collect();
        assert_eq!(kept, (3..OPS_PER_CONNECTION as i32 + 3).collect::<Vec<_>>());
        // The newest request's reply lands; a reply for an overwritten slot
        // does not touch the request that reused it.
        let last = *slots.last().unwrap();
        ring.replied(last, OPS_PER_CONNECTION as i32 + 2, 100);
        ring.replied(slots[0], 0, 100);
        let replied: Vec<Option<Millis>> = ring
            .in_order()
            .map(|op| (op.replied != NOT_REPLIED).then_some(op.replied))
            .collect();
        assert_eq!(replied.iter().flatten().count(), 1);
        assert_eq!(*replied.last().unwrap(), Some(100));
        // Only the first reply counts (exhaust streams answer many times).
        ring.replied(last, OPS_PER_CONNECTION as i32 + 2, 200);
        assert_eq!(ring.in_order().last().unwrap().replied, 100);
    }

    #[test]
    fn a_timeline_merges_both_connections_on_the_session_in_time_order_up_to_the_offending_request()
    {
        let mut one = OpRing::default();
        let mut two = OpRing::default();
        one.record(Some(key(1)), request(1, 10, 0), 0);
        one.record(Some(key(9)), request(1, 11, 1), 0); // another session
        let slot = one.record(Some(key(1)), request(1, 12, 5), 0);
        one.replied(slot, 12, 9);
        one.record(Some(key(1)), request(1, 13, 20), 0); // earlier (still in flight)
        two.record(Some(key(1)), request(2, 30, 3), 0);
        two.record(Some(key(1)), request(2, 31, 21), 0); // current
        two.record(Some(key(1)), request(2, 32, 22), 0); // after the violation
        let mut gather = Gather::new(key(1), Some(request(2, 31, 21)), Some(request(1, 13, 20)));
        gather.add(&one);
        gather.add(&two);
        let timeline = gather.finish();
        assert_eq!(
            ids(&timeline),
            vec![
                (1, 10, None),
                (2, 30, None),
                (1, 12, None),
                (1, 13, Some(Role::Earlier)),
                (2, 31, Some(Role::Current)),
            ]
        );
        let replied: Vec<Option<Millis>> = timeline.ops().map(|op| op.replied).collect();
        assert_eq!(replied, vec![None, None, Some(9), None, None]);
    }

    #[test]
    fn evidence_requests_no_ring_holds_are_added_and_the_length_is_bounded() {
        let mut ring = OpRing::default();
        for id in 0..OPS_PER_CONNECTION as i32 {
            ring.record(Some(key(1)), request(1, id, u64::try_from(id).unwrap()), 0);
        }
        // The offending request was rejected (never recorded); the earlier
        // one fell out of the ring long ago.
        let current = request(3, 99, 50);
        let earlier = request(4, 5, 0);
        let mut gather = Gather::new(key(1), Some(current), Some(earlier));
        gather.add(&ring);
        let timeline = gather.finish();
        assert_eq!(timeline.len(), TIMELINE_LEN);
        let ops = ids(&timeline);
        assert_eq!(ops.last(), Some(&(3, 99, Some(Role::Current))));
        // The oldest (the earlier request, at 0) is cut by the bound.
        assert!(!ops.contains(&(4, 5, Some(Role::Earlier))));
        assert_eq!(ops[0].1, 1);
    }

    #[test]
    fn operations_in_one_millisecond_keep_the_order_the_proxy_received_them() {
        // A fast client: use, kill (another connection, outside the
        // session), use again, all in one millisecond.
        let mut one = OpRing::default();
        let mut two = OpRing::default();
        one.record(Some(key(1)), request(1, 1, 7), 100);
        two.record(None, request(2, 9, 7), 101);
        let slot = one.record(Some(key(1)), request(1, 2, 7), 102);
        one.replied(slot, 2, 7);
        let mut gather = Gather::new(key(1), Some(request(1, 2, 7)), Some(request(2, 9, 7)));
        gather.add(&two);
        gather.add(&one);
        assert_eq!(
            ids(&gather.finish()),
            vec![
                (1, 1, None),
                (2, 9, Some(Role::Earlier)),
                (1, 2, Some(Role::Current))
            ]
        );
        // Known only from the evidence, the earlier request goes first in
        // its millisecond and the offending one last.
        let mut gather = Gather::new(key(1), Some(request(3, 5, 7)), Some(request(2, 9, 7)));
        gather.add(&one);
        assert_eq!(
            ids(&gather.finish()),
            vec![
                (2, 9, Some(Role::Earlier)),
                (1, 1, None),
                (1, 2, None),
                (3, 5, Some(Role::Current))
            ]
        );
    }

    #[test]
    fn without_a_current_request_the_timeline_runs_to_the_newest_operation() {
        // closed-with-requests-in-flight and txn-left-open name only the
        // earlier request.
        let mut ring = OpRing::default();
        ring.record(Some(key(1)), request(1, 1, 0), 0);
        ring.record(Some(key(1)), request(1, 2, 5), 0);
        let mut gather = Gather::new(key(1), None, Some(request(1, 1, 0)));
        gather.add(&ring);
        assert_eq!(
            ids(&gather.finish()),
            vec![(1, 1, Some(Role::Earlier)), (1, 2, None)]
        );
    }
}
