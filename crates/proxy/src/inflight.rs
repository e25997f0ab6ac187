//! The per-connection map of requests awaiting replies, keyed by the
//! `responseTo` the next reply will carry. It is the only owner of the
//! connection's in-flight state: each client request's entry holds the
//! inspector's record of it too (`InFlightRequest::pending`), handed back
//! with the reply or at close, so no layer keeps a second table. It is
//! shared by the connection's two same-thread tasks in a `RefCell`,
//! borrowed only inside synchronous passes (never across `.await`), so it
//! is plain synchronous code with no I/O.
//! It also hands out the proxy's own (negative) request ids, which cannot
//! collide with drivers' ids (drivers count up from small positive numbers).
//!
//! Drivers send one request per connection at a time, so the first entry
//! lives inline (`first`) and the hash map holds only the rest: with many
//! connections, a connection's map went cold between a request and its
//! reply, and its control bytes and bucket were cache misses of their own
//! on both (docs/performance.md, "fourth pass").

use std::collections::HashMap;

use bytes::Bytes;
use foldhash::fast::RandomState;
use tokio::sync::oneshot;

use super::inspect::{InFlightRequest, InjectError};

type InjectReply = oneshot::Sender<Result<Bytes, InjectError>>;

#[derive(Debug)]
enum Entry<P> {
    Client(InFlightRequest<P>),
    /// The proxy's own request: its reply goes to this sender, never to the
    /// client (taken by the first reply).
    Injected(Option<InjectReply>),
}

/// Who a reply belongs to.
#[derive(Debug)]
pub(crate) enum ReplyOwner<P> {
    /// A client request, now complete (no `moreToCome`); forward the reply.
    Client(InFlightRequest<P>),
    /// A client request whose stream continues: it stays in flight under
    /// this key (`client_mut` reaches it); forward the reply.
    Streaming(i32),
    /// An injected request; hand the reply to the sender (if still waiting).
    Injected(Option<InjectReply>),
    /// No request is waiting for this responseTo; forward anyway.
    Unmatched,
}

#[derive(Debug)]
pub(crate) struct InFlight<P> {
    /// The entry a connection usually has, next to the rest of this table.
    /// Keys are unique across `first` and `rest`.
    first: Option<(i32, Entry<P>)>,
    /// Entries while `first` is taken (pipelining clients, exhaust streams
    /// with an injection, reused ids). foldhash, seeded per map: the random
    /// seed keeps a client from choosing request ids that collide.
    rest: HashMap<i32, Entry<P>, RandomState>,
    /// Client requests displaced by a later request reusing their id (a
    /// misbehaving client): no reply can be matched to them any more, but
    /// they are still in flight for the inspector, which gets them at close.
    displaced: Vec<InFlightRequest<P>>,
    next_proxy_id: i32,
}

impl<P> Default for InFlight<P> {
    fn default() -> Self {
        InFlight {
            first: None,
            rest: HashMap::default(),
            displaced: Vec::new(),
            next_proxy_id: -1,
        }
    }
}

impl<P> InFlight<P> {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// Stores `entry` under `id`, returning the entry it replaces.
    fn put(&mut self, id: i32, entry: Entry<P>) -> Option<Entry<P>> {
        match &mut self.first {
            Some((key, old)) if *key == id => Some(std::mem::replace(old, entry)),
            Some(_) => self.rest.insert(id, entry),
            None if self.rest.is_empty() => {
                self.first = Some((id, entry));
                None
            }
            None => {
                let old = self.rest.remove(&id);
                self.first = Some((id, entry));
                old
            }
        }
    }

    fn take(&mut self, id: i32) -> Option<Entry<P>> {
        if matches!(&self.first, Some((key, _)) if *key == id) {
            return self.first.take().map(|(_, entry)| entry);
        }
        // The usual case (one request at a time): no hashing of the id.
        if self.rest.is_empty() {
            return None;
        }
        self.rest.remove(&id)
    }

    fn get_mut(&mut self, id: i32) -> Option<&mut Entry<P>> {
        match &mut self.first {
            Some((key, entry)) if *key == id => Some(entry),
            _ => self.rest.get_mut(&id),
        }
    }

    fn contains(&self, id: i32) -> bool {
        matches!(&self.first, Some((key, _)) if *key == id) || self.rest.contains_key(&id)
    }

    fn entries(&self) -> impl Iterator<Item = &Entry<P>> {
        self.first
            .iter()
            .map(|(_, entry)| entry)
            .chain(self.rest.values())
    }

    /// Records a client request that expects a reply. A request id that is
    /// already waiting is displaced (a misbehaving client): its id is
    /// returned so the caller can log it, and its record is kept for close.
    pub(crate) fn insert_client(&mut self, request: InFlightRequest<P>) -> Option<i32> {
        let id = request.request_id;
        match self.put(id, Entry::Client(request))? {
            Entry::Client(old) => {
                self.displaced.push(old);
                Some(id)
            }
            // Dropping the waiter fails the injection with `Closed`.
            Entry::Injected(_) => Some(id),
        }
    }

    /// Records an injected request under `id` (from `next_proxy_id`).
    pub(crate) fn insert_injected(&mut self, id: i32, reply: InjectReply) {
        self.put(id, Entry::Injected(Some(reply)));
    }

    /// A fresh negative id that no waiting entry uses.
    pub(crate) fn next_proxy_id(&mut self) -> i32 {
        loop {
            let id = self.next_proxy_id;
            self.next_proxy_id = if id == i32::MIN { -1 } else { id - 1 };
            if !self.contains(id) {
                return id;
            }
        }
    }

    /// Matches an upstream reply. With `more_to_come` the request stays in
    /// flight, re-keyed under the reply's own requestID, because the next
    /// reply of an exhaust stream answers to that (OP_MSG spec). Without it
    /// the request completes and is handed over.
    pub(crate) fn on_reply(
        &mut self,
        response_to: i32,
        reply_request_id: i32,
        more_to_come: bool,
    ) -> ReplyOwner<P> {
        let Some(entry) = self.take(response_to) else {
            return self.displaced_reply(response_to, more_to_come);
        };
        match (entry, more_to_come) {
            (Entry::Client(request), false) => ReplyOwner::Client(request),
            (Entry::Client(mut request), true) => {
                request.streamed_replies = request.streamed_replies.saturating_add(1);
                self.put(reply_request_id, Entry::Client(request));
                ReplyOwner::Streaming(reply_request_id)
            }
            (Entry::Injected(reply), false) => ReplyOwner::Injected(reply),
            // An injected request never sets exhaustAllowed, so a streamed
            // reply is unexpected; deliver the first one.
            (Entry::Injected(mut reply), true) => {
                let owner = ReplyOwner::Injected(reply.take());
                self.put(reply_request_id, Entry::Injected(reply));
                owner
            }
        }
    }

    /// A final reply to an id whose request was displaced: the later
    /// request took the first reply, so this one is the displaced one's
    /// (oldest first), which completes it.
    fn displaced_reply(&mut self, response_to: i32, more_to_come: bool) -> ReplyOwner<P> {
        if more_to_come || self.displaced.is_empty() {
            return ReplyOwner::Unmatched;
        }
        match self
            .displaced
            .iter()
            .position(|r| r.request_id == response_to)
        {
            Some(position) => ReplyOwner::Client(self.displaced.remove(position)),
            None => ReplyOwner::Unmatched,
        }
    }

    /// The client request in flight under `key` (a stream's current key).
    pub(crate) fn client_mut(&mut self, key: i32) -> Option<&mut InFlightRequest<P>> {
        match self.get_mut(key)? {
            Entry::Client(request) => Some(request),
            Entry::Injected(_) => None,
        }
    }

    /// Nothing at all in flight: the upstream is free for an injected request.
    pub(crate) fn idle_for_inject(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    /// Nothing but monitoring (awaitable / streaming hello) in flight: a
    /// draining connection may close now without cutting off real work.
    pub(crate) fn idle_for_drain(&self) -> bool {
        self.entries().all(|e| match e {
            Entry::Client(request) => request.awaitable_hello,
            Entry::Injected(_) => false,
        })
    }

    /// Removes and returns the client requests still waiting (at close),
    /// oldest first. Injected waiters are dropped, which fails them with
    /// `Closed`.
    pub(crate) fn take_client_requests(&mut self) -> Vec<InFlightRequest<P>> {
        let mut out = std::mem::take(&mut self.displaced);
        let first = self.first.take().map(|(_, entry)| entry);
        out.extend(
            first
                .into_iter()
                .chain(self.rest.drain().map(|(_, e)| e))
                .filter_map(|e| match e {
                    Entry::Client(request) => Some(request),
                    Entry::Injected(_) => None,
                }),
        );
        out.sort_by_key(|r| r.started);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn request(id: i32, command: &'static str) -> InFlightRequest<u32> {
        InFlightRequest {
            request_id: id,
            command: Some(command.into()),
            command_metric: sessionguard_protocol::command_index(command),
            started: Instant::now(),
            exhaust_allowed: false,
            awaitable_hello: false,
            streamed_replies: 0,
            pending: 0,
        }
    }

    #[test]
    fn reply_completes_matching_request() {
        let mut map = InFlight::default();
        map.insert_client(request(7, "find"));
        assert!(!map.idle_for_inject());
        match map.on_reply(7, 1000, false) {
            ReplyOwner::Client(r) => assert_eq!(r.request_id, 7),
            other => panic!("{other:?}"),
        }
        assert!(map.is_empty());
        assert!(matches!(
            map.on_reply(7, 1001, false),
            ReplyOwner::Unmatched
        ));
    }

    #[test]
    fn exhaust_stream_is_rekeyed_by_each_reply_until_the_last() {
        let mut map = InFlight::default();
        let mut hello = request(3, "hello");
        hello.exhaust_allowed = true;
        hello.awaitable_hello = true;
        map.insert_client(hello);

        // reply 100 answers request 3 and promises more; the inspector's
        // record is updated in place and stays with the request.
        let ReplyOwner::Streaming(key) = map.on_reply(3, 100, true) else {
            panic!()
        };
        let r = map.client_mut(key).unwrap();
        assert_eq!((r.request_id, r.streamed_replies), (3, 1));
        r.pending += 1;
        assert_eq!(map.len(), 1);
        // The old key is gone; a reply to it is now unmatched.
        assert!(matches!(map.on_reply(3, 999, true), ReplyOwner::Unmatched));
        // reply 101 answers reply 100.
        let ReplyOwner::Streaming(key) = map.on_reply(100, 101, true) else {
            panic!()
        };
        assert_eq!(map.client_mut(key).unwrap().streamed_replies, 2);
        // the final reply (no moreToCome) completes it.
        let ReplyOwner::Client(r) = map.on_reply(101, 102, false) else {
            panic!()
        };
        assert_eq!((r.request_id, r.streamed_replies, r.pending), (3, 2, 1));
        assert!(map.is_empty());
    }

    #[test]
    fn monitoring_hello_does_not_hold_a_drain_but_work_does() {
        let mut map = InFlight::default();
        assert!(map.idle_for_drain());
        let mut hello = request(1, "hello");
        hello.awaitable_hello = true;
        map.insert_client(hello);
        assert!(map.idle_for_drain());
        assert!(!map.idle_for_inject());
        map.insert_client(request(2, "find"));
        assert!(!map.idle_for_drain());
    }

    #[test]
    fn a_reused_id_is_answered_latest_first_then_the_displaced_one() {
        let mut map = InFlight::default();
        let mut first = request(5, "find");
        first.pending = 1;
        let mut second = request(5, "insert");
        second.pending = 2;
        map.insert_client(first);
        map.insert_client(second);
        let ReplyOwner::Client(r) = map.on_reply(5, 100, false) else {
            panic!()
        };
        assert_eq!(r.pending, 2);
        let ReplyOwner::Client(r) = map.on_reply(5, 101, false) else {
            panic!()
        };
        assert_eq!(r.pending, 1);
        assert!(matches!(map.on_reply(5, 102, false), ReplyOwner::Unmatched));
        assert!(map.take_client_requests().is_empty());
    }

    #[test]
    fn a_displaced_request_is_still_handed_back_at_close() {
        let mut map = InFlight::default();
        let mut first = request(5, "find");
        first.pending = 1;
        let mut second = request(5, "insert");
        second.pending = 2;
        assert_eq!(map.insert_client(first), None);
        assert_eq!(map.insert_client(second), Some(5));
        let left = map.take_client_requests();
        let pendings: Vec<u32> = left.iter().map(|r| r.pending).collect();
        assert_eq!(pendings, vec![1, 2], "oldest first");
    }

    #[test]
    fn proxy_ids_are_negative_unique_and_wrap() {
        let mut map = InFlight::<()>::default();
        let (tx, _rx) = oneshot::channel();
        let a = map.next_proxy_id();
        map.insert_injected(a, tx);
        let b = map.next_proxy_id();
        assert!(a < 0 && b < 0 && a != b);

        map.next_proxy_id = i32::MIN;
        assert_eq!(map.next_proxy_id(), i32::MIN);
        // Wraps to -1, which is taken by the injected request: skipped.
        assert_eq!(a, -1);
        assert_eq!(map.next_proxy_id(), -2);
    }

    /// The inline first entry and the map behave as one map: the same
    /// operations on this table and on a plain `HashMap` model (several
    /// requests in flight, reused ids, exhaust re-keying, injections) give
    /// the same owners, and close hands back the same requests.
    #[test]
    fn the_inline_entry_and_the_map_act_as_one_table() {
        let mut table = InFlight::<u32>::default();
        let mut model: HashMap<i32, Option<u32>> = HashMap::new(); // None: injected
        let mut model_displaced: Vec<u32> = Vec::new();
        let mut waiters = Vec::new();
        let mut seed: u64 = 0x5eed;
        let mut next = |bound: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % bound
        };
        for step in 0..20_000u32 {
            let id = next(6) as i32 + 1;
            match next(5) {
                0 | 1 => {
                    let mut r = request(id, "find");
                    r.pending = step;
                    let displaced = table.insert_client(r);
                    match model.insert(id, Some(step)) {
                        Some(Some(old)) => {
                            model_displaced.push(old);
                            assert_eq!(displaced, Some(id));
                        }
                        Some(None) => assert_eq!(displaced, Some(id)),
                        None => assert_eq!(displaced, None),
                    }
                }
                2 => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(rx);
                    let proxy_id = table.next_proxy_id();
                    assert!(!model.contains_key(&proxy_id));
                    table.insert_injected(proxy_id, tx);
                    model.insert(proxy_id, None);
                }
                choice => {
                    // Replies to a waiting id (client or injected) or to one
                    // nothing waits for; streamed replies re-key.
                    let keys: Vec<i32> = model.keys().copied().collect();
                    let response_to = if keys.is_empty() || next(4) == 0 {
                        id + 100
                    } else {
                        keys[next(keys.len() as u64) as usize]
                    };
                    let more = choice == 4 && next(2) == 0;
                    let new_key = 1000 + step as i32;
                    let owner = table.on_reply(response_to, new_key, more);
                    match (model.remove(&response_to), owner) {
                        (Some(Some(p)), ReplyOwner::Client(r)) if !more => assert_eq!(r.pending, p),
                        (Some(Some(p)), ReplyOwner::Streaming(key)) if more => {
                            assert_eq!(key, new_key);
                            assert_eq!(table.client_mut(key).unwrap().pending, p);
                            model.insert(new_key, Some(p));
                        }
                        (Some(None), ReplyOwner::Injected(_)) => {
                            if more {
                                model.insert(new_key, None);
                            }
                        }
                        (None, ReplyOwner::Unmatched) => {}
                        (None, ReplyOwner::Client(r)) if !more => {
                            let at = model_displaced.iter().position(|p| *p == r.pending);
                            model_displaced.remove(at.expect("a displaced request"));
                        }
                        (expected, got) => panic!("step {step}: model {expected:?}, table {got:?}"),
                    }
                }
            }
            assert_eq!(table.len(), model.len(), "step {step}");
            assert_eq!(table.idle_for_inject(), model.is_empty());
        }
        let mut left: Vec<u32> = table
            .take_client_requests()
            .iter()
            .map(|r| r.pending)
            .collect();
        let mut expected: Vec<u32> = model
            .values()
            .flatten()
            .copied()
            .chain(model_displaced)
            .collect();
        left.sort_unstable();
        expected.sort_unstable();
        assert_eq!(left, expected);
        assert!(table.is_empty());
    }

    #[tokio::test]
    async fn injected_reply_goes_to_its_sender_and_close_fails_the_rest() {
        let mut map = InFlight::default();
        let (tx, rx) = oneshot::channel();
        let id = map.next_proxy_id();
        map.insert_injected(id, tx);
        assert!(!map.idle_for_drain(), "an injection is work");
        match map.on_reply(id, 5, false) {
            ReplyOwner::Injected(Some(sender)) => {
                sender.send(Ok(Bytes::from_static(b"r"))).unwrap()
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.await.unwrap().unwrap(), Bytes::from_static(b"r"));

        let (tx, rx) = oneshot::channel();
        let id = map.next_proxy_id();
        map.insert_injected(id, tx);
        map.insert_client(request(9, "insert"));
        let left = map.take_client_requests();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].request_id, 9);
        assert!(rx.await.is_err(), "dropped waiter reports closed");
        assert!(map.is_empty());
    }
}
