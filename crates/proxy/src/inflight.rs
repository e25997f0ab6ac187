//! The per-connection map of requests awaiting replies, keyed by the
//! `responseTo` the next reply will carry. It is shared by the connection's
//! two pumps behind a `std::sync::Mutex` and is never held across `.await`,
//! so it is plain synchronous code with no I/O. It also hands out the
//! proxy's own (negative) request ids, which cannot collide with drivers'
//! ids (drivers count up from small positive numbers).

use std::collections::HashMap;

use bytes::Bytes;
use foldhash::fast::RandomState;
use tokio::sync::oneshot;

use super::inspect::{InFlightRequest, InjectError};

type InjectReply = oneshot::Sender<Result<Bytes, InjectError>>;

#[derive(Debug)]
enum Waiter {
    Client,
    /// The proxy's own request: its reply goes to this sender, never to the client.
    Injected(Option<InjectReply>),
}

#[derive(Debug)]
struct Entry {
    request: InFlightRequest,
    waiter: Waiter,
}

/// Who a reply belongs to.
#[derive(Debug)]
pub(crate) enum ReplyOwner {
    /// A client request; forward the reply.
    Client(InFlightRequest),
    /// An injected request; hand the reply to the sender (if still waiting).
    Injected(Option<InjectReply>),
    /// No request is waiting for this responseTo; forward anyway.
    Unmatched,
}

#[derive(Debug)]
pub(crate) struct InFlight {
    /// foldhash, seeded per map: one insert and one remove per request,
    /// where SipHash's cost showed in the profile; the random seed keeps a
    /// client from choosing request ids that collide.
    entries: HashMap<i32, Entry, RandomState>,
    next_proxy_id: i32,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            entries: HashMap::default(),
            next_proxy_id: -1,
        }
    }
}

impl InFlight {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a client request that expects a reply. A request id that is
    /// already waiting is replaced (a misbehaving client); the old record is
    /// returned so the caller can log it.
    pub(crate) fn insert_client(&mut self, request: InFlightRequest) -> Option<InFlightRequest> {
        self.entries
            .insert(
                request.request_id,
                Entry {
                    request,
                    waiter: Waiter::Client,
                },
            )
            .map(|old| old.request)
    }

    /// Records an injected request.
    pub(crate) fn insert_injected(&mut self, request: InFlightRequest, reply: InjectReply) {
        self.entries.insert(
            request.request_id,
            Entry {
                request,
                waiter: Waiter::Injected(Some(reply)),
            },
        );
    }

    /// A fresh negative id that no waiting entry uses.
    pub(crate) fn next_proxy_id(&mut self) -> i32 {
        loop {
            let id = self.next_proxy_id;
            self.next_proxy_id = if id == i32::MIN { -1 } else { id - 1 };
            if !self.entries.contains_key(&id) {
                return id;
            }
        }
    }

    /// Matches an upstream reply. With `more_to_come` the request stays in
    /// flight, re-keyed under the reply's own requestID, because the next
    /// reply of an exhaust stream answers to that (OP_MSG spec); the caller
    /// gets a copy. Without it the request completes and is handed over.
    pub(crate) fn on_reply(
        &mut self,
        response_to: i32,
        reply_request_id: i32,
        more_to_come: bool,
    ) -> ReplyOwner {
        let Some(mut entry) = self.entries.remove(&response_to) else {
            return ReplyOwner::Unmatched;
        };
        if more_to_come {
            entry.request.streamed_replies = entry.request.streamed_replies.saturating_add(1);
            let owner = match &mut entry.waiter {
                Waiter::Client => ReplyOwner::Client(entry.request.clone()),
                // An injected request never sets exhaustAllowed, so a
                // streamed reply is unexpected; deliver the first one.
                Waiter::Injected(reply) => ReplyOwner::Injected(reply.take()),
            };
            self.entries.insert(reply_request_id, entry);
            owner
        } else {
            match entry.waiter {
                Waiter::Client => ReplyOwner::Client(entry.request),
                Waiter::Injected(reply) => ReplyOwner::Injected(reply),
            }
        }
    }

    /// Nothing at all in flight: the upstream is free for an injected request.
    pub(crate) fn idle_for_inject(&self) -> bool {
        self.entries.is_empty()
    }

    /// Nothing but monitoring (awaitable / streaming hello) in flight: a
    /// draining connection may close now without cutting off real work.
    pub(crate) fn idle_for_drain(&self) -> bool {
        self.entries.values().all(|e| e.request.awaitable_hello)
    }

    /// Removes and returns the client requests still waiting (at close).
    /// Injected waiters are dropped, which fails them with `Closed`.
    pub(crate) fn take_client_requests(&mut self) -> Vec<InFlightRequest> {
        let mut out: Vec<InFlightRequest> = self
            .entries
            .drain()
            .filter(|(_, e)| matches!(e.waiter, Waiter::Client))
            .map(|(_, e)| e.request)
            .collect();
        out.sort_by_key(|r| r.started);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn request(id: i32, command: &'static str) -> InFlightRequest {
        InFlightRequest {
            request_id: id,
            command: Some(command.into()),
            command_metric: sessionguard_protocol::command_index(command),
            started: Instant::now(),
            exhaust_allowed: false,
            awaitable_hello: false,
            streamed_replies: 0,
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

        // reply 100 answers request 3 and promises more.
        let ReplyOwner::Client(r) = map.on_reply(3, 100, true) else {
            panic!()
        };
        assert_eq!((r.request_id, r.streamed_replies), (3, 1));
        assert_eq!(map.len(), 1);
        // The old key is gone; a reply to it is now unmatched.
        assert!(matches!(map.on_reply(3, 999, true), ReplyOwner::Unmatched));
        // reply 101 answers reply 100.
        let ReplyOwner::Client(r) = map.on_reply(100, 101, true) else {
            panic!()
        };
        assert_eq!(r.streamed_replies, 2);
        // the final reply (no moreToCome) completes it.
        let ReplyOwner::Client(r) = map.on_reply(101, 102, false) else {
            panic!()
        };
        assert_eq!((r.request_id, r.streamed_replies), (3, 2));
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
    fn proxy_ids_are_negative_unique_and_wrap() {
        let mut map = InFlight::default();
        let (tx, _rx) = oneshot::channel();
        let a = map.next_proxy_id();
        map.insert_injected(request(a, "ping"), tx);
        let b = map.next_proxy_id();
        assert!(a < 0 && b < 0 && a != b);

        map.next_proxy_id = i32::MIN;
        assert_eq!(map.next_proxy_id(), i32::MIN);
        // Wraps to -1, which is taken by the injected request: skipped.
        assert_eq!(a, -1);
        assert_eq!(map.next_proxy_id(), -2);
    }

    #[tokio::test]
    async fn injected_reply_goes_to_its_sender_and_close_fails_the_rest() {
        let mut map = InFlight::default();
        let (tx, rx) = oneshot::channel();
        let id = map.next_proxy_id();
        map.insert_injected(request(id, "ping"), tx);
        match map.on_reply(id, 5, false) {
            ReplyOwner::Injected(Some(sender)) => {
                sender.send(Ok(Bytes::from_static(b"r"))).unwrap()
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rx.await.unwrap().unwrap(), Bytes::from_static(b"r"));

        let (tx, rx) = oneshot::channel();
        let id = map.next_proxy_id();
        map.insert_injected(request(id, "ping"), tx);
        map.insert_client(request(9, "insert"));
        let left = map.take_client_requests();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].request_id, 9);
        assert!(rx.await.is_err(), "dropped waiter reports closed");
        assert!(map.is_empty());
    }
}
