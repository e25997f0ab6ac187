//! Control of the data threads without per-frame cost. Each data thread has
//! one `Inbox` (a mutex-guarded queue plus a "doorbell": a socketpair whose
//! read end is an ordinary pending read on that thread's ring or epoll) and
//! one control task sleeping on the doorbell. Other threads (the handle,
//! the refresher, a name resolution) push `Ctl` messages and ring; the
//! control task routes them to connections through the thread's `Registry`
//! of `ConnSignal`s: plain `Cell`s, no atomics. So a connection that is
//! never drained nor injected pays nothing per frame, and no data-thread
//! task is ever woken from another thread (monoio's `sync` feature, which
//! taxes every park, stays off). Waking *tokio* tasks from a data thread
//! (oneshot replies, `watch` of open connections) is fine: `tokio::sync`
//! is executor-agnostic. Nothing here looks at frames.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

/// Why an injected request produced no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the connection is closed")]
    Closed,
    #[error("the connection is draining")]
    Draining,
    #[error("too many injected requests are already queued on this connection")]
    QueueFull,
    #[error(
        "no reply within {0:?} (the connection never became idle, or the upstream did not answer)"
    )]
    Timeout(Duration),
}

/// A queued injection, owned by the connection until it is sent.
#[derive(Debug)]
pub(crate) struct InjectRequest {
    pub body: Vec<u8>,
    /// A waiter that gave up (its timeout) is skipped: `is_closed`.
    pub reply: oneshot::Sender<Result<Bytes, InjectError>>,
}

/// How many injections may wait per connection; the refresher sends at most
/// one per connection at a time, so a full queue means something is stuck.
pub(crate) const INJECT_QUEUE: usize = 16;

/// A message to one data thread.
pub(crate) enum Ctl {
    /// Stop accepting; close each connection once idle; kill the rest
    /// after the grace period.
    Drain,
    /// Stop accepting and close every connection now.
    Kill,
    /// Send `request` on connection (`slot`, `generation`) when idle.
    Inject {
        slot: usize,
        generation: u64,
        request: InjectRequest,
    },
    /// Wake connection (`slot`, `generation`): something it waits for
    /// off-thread (a name resolution) is done.
    Wake { slot: usize, generation: u64 },
}

/// One data thread's mailbox.
pub(crate) struct Inbox {
    queue: Mutex<Vec<Ctl>>,
    bell: StdUnixStream,
    rung: AtomicBool,
}

impl Inbox {
    /// The inbox and the doorbell's read end (for the data thread).
    pub(crate) fn new() -> std::io::Result<(Arc<Inbox>, StdUnixStream)> {
        let (tx, rx) = StdUnixStream::pair()?;
        tx.set_nonblocking(true)?;
        rx.set_nonblocking(true)?;
        Ok((
            Arc::new(Inbox {
                queue: Mutex::new(Vec::new()),
                bell: tx,
                rung: AtomicBool::new(false),
            }),
            rx,
        ))
    }

    pub(crate) fn send(&self, ctl: Ctl) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ctl);
        // One byte per batch: the receiver clears `rung` before taking the
        // queue, so a message pushed after the take rings again. A full
        // socket buffer (never, at one byte per batch) still has its bytes
        // unread: the control task wakes anyway.
        if !self.rung.swap(true, Ordering::AcqRel) {
            let _ = (&self.bell).write(&[1]);
        }
    }

    /// Called by the control task after its doorbell read completed.
    pub(crate) fn take(&self) -> Vec<Ctl> {
        self.rung.store(false, Ordering::Release);
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub(crate) const SIG_DRAIN: u8 = 1;
pub(crate) const SIG_KILL: u8 = 2;
pub(crate) const SIG_INJECT: u8 = 4;
pub(crate) const SIG_WAKE: u8 = 8;

/// A connection's (or accept loop's) local signal, raised by the thread's
/// control task. DRAIN and KILL stay raised; INJECT and WAKE are taken.
#[derive(Default)]
pub(crate) struct ConnSignal {
    flags: Cell<u8>,
    waker: Cell<Option<Waker>>,
    pub(crate) injections: RefCell<VecDeque<InjectRequest>>,
}

impl ConnSignal {
    pub(crate) fn raise(&self, flag: u8) {
        self.flags.set(self.flags.get() | flag);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    pub(crate) fn is_raised(&self, flag: u8) -> bool {
        self.flags.get() & flag != 0
    }

    /// Clears and returns the edge flags (INJECT, WAKE) raised since the
    /// last call, with the sticky ones (DRAIN, KILL) as they stand.
    pub(crate) fn take(&self) -> u8 {
        let flags = self.flags.get();
        self.flags.set(flags & (SIG_DRAIN | SIG_KILL));
        flags
    }

    pub(crate) fn register(&self, cx: &Context<'_>) {
        register(&self.waker, cx.waker());
    }

    /// Ready once `flag` is raised.
    pub(crate) fn poll_raised(&self, flag: u8, cx: &Context<'_>) -> Poll<()> {
        if self.is_raised(flag) {
            return Poll::Ready(());
        }
        self.register(cx);
        Poll::Pending
    }

    /// Queues an injection for the connection's requests task.
    pub(crate) fn queue_injection(&self, request: InjectRequest) {
        let mut queue = self.injections.borrow_mut();
        queue.retain(|r| !r.reply.is_closed());
        if self.is_raised(SIG_DRAIN | SIG_KILL) {
            let _ = request.reply.send(Err(InjectError::Draining));
        } else if queue.len() >= INJECT_QUEUE {
            let _ = request.reply.send(Err(InjectError::QueueFull));
        } else {
            queue.push_back(request);
            drop(queue);
            self.raise(SIG_INJECT);
        }
    }

    /// Fails every queued injection with `error`.
    pub(crate) fn fail_injections(&self, error: InjectError) {
        for request in self.injections.borrow_mut().drain(..) {
            let _ = request.reply.send(Err(error.clone()));
        }
    }
}

/// Stores `waker` in `cell` unless the one there already wakes the same task.
pub(crate) fn register(cell: &Cell<Option<Waker>>, waker: &Waker) {
    match cell.take() {
        Some(old) if old.will_wake(waker) => cell.set(Some(old)),
        _ => cell.set(Some(waker.clone())),
    }
}

/// Wakes the task stored in `cell`, if any.
pub(crate) fn poke(cell: &Cell<Option<Waker>>) {
    if let Some(w) = cell.take() {
        w.wake();
    }
}

type Slot = Option<(u64, Rc<ConnSignal>)>;

/// A data thread's live connections: slot + generation, so a stale
/// injector cannot reach a later connection in the same slot.
#[derive(Default)]
pub(crate) struct Registry {
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    generation: Cell<u64>,
    live: Cell<usize>,
    /// Woken when `live` drops to zero (thread exit after a drain).
    empty_waker: Cell<Option<Waker>>,
}

impl Registry {
    pub(crate) fn insert(&self) -> (usize, u64, Rc<ConnSignal>) {
        let signal = Rc::new(ConnSignal::default());
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(slot) => slot,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        };
        slots[slot] = Some((generation, signal.clone()));
        self.live.set(self.live.get() + 1);
        (slot, generation, signal)
    }

    pub(crate) fn remove(&self, slot: usize) {
        self.slots.borrow_mut()[slot] = None;
        self.free.borrow_mut().push(slot);
        self.live.set(self.live.get() - 1);
        if self.live.get() == 0 {
            poke(&self.empty_waker);
        }
    }

    pub(crate) fn get(&self, slot: usize, generation: u64) -> Option<Rc<ConnSignal>> {
        match self.slots.borrow().get(slot) {
            Some(Some((g, s))) if *g == generation => Some(s.clone()),
            _ => None,
        }
    }

    pub(crate) fn raise_all(&self, flag: u8) {
        // Collected first: raising wakes tasks but never runs one; still,
        // no borrow is held while wakers run.
        let all: Vec<Rc<ConnSignal>> = self
            .slots
            .borrow()
            .iter()
            .flatten()
            .map(|(_, s)| s.clone())
            .collect();
        for s in all {
            s.raise(flag);
        }
    }

    pub(crate) fn live(&self) -> usize {
        self.live.get()
    }

    pub(crate) async fn wait_empty(&self) {
        std::future::poll_fn(|cx| {
            if self.live.get() == 0 {
                return Poll::Ready(());
            }
            register(&self.empty_waker, cx.waker());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn request() -> (
        InjectRequest,
        oneshot::Receiver<Result<bytes::Bytes, InjectError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let request = InjectRequest {
            body: vec![1],
            reply,
        };
        (request, rx)
    }

    #[test]
    fn a_stale_slot_reaches_no_later_connection() {
        let registry = Registry::default();
        let (slot, generation, _) = registry.insert();
        assert!(registry.get(slot, generation).is_some());
        registry.remove(slot);
        let (reused, later, _) = registry.insert();
        assert_eq!(reused, slot, "the slot is reused");
        assert!(registry.get(slot, generation).is_none());
        assert!(registry.get(slot, later).is_some());
        assert_eq!(registry.live(), 1);
    }

    #[test]
    fn injections_queue_up_to_the_limit_and_not_while_draining() {
        let signal = ConnSignal::default();
        let mut waiting = Vec::new();
        for _ in 0..INJECT_QUEUE {
            let (r, rx) = request();
            signal.queue_injection(r);
            waiting.push(rx);
        }
        assert_ne!(signal.take() & SIG_INJECT, 0);
        let (r, mut rx) = request();
        signal.queue_injection(r);
        assert_eq!(rx.try_recv().unwrap(), Err(InjectError::QueueFull));
        // A waiter that gave up frees its place.
        drop(waiting.pop());
        let (r, mut rx) = request();
        signal.queue_injection(r);
        assert!(rx.try_recv().is_err(), "queued, not answered");

        signal.raise(SIG_DRAIN);
        let (r, mut rx) = request();
        signal.queue_injection(r);
        assert_eq!(rx.try_recv().unwrap(), Err(InjectError::Draining));
        signal.fail_injections(InjectError::Closed);
        assert_eq!(waiting[0].try_recv().unwrap(), Err(InjectError::Closed));
        assert_eq!(signal.take() & SIG_DRAIN, SIG_DRAIN, "drain stays raised");
    }

    #[test]
    fn the_doorbell_rings_once_per_batch() {
        use std::io::Read;
        let (inbox, mut bell) = Inbox::new().unwrap();
        inbox.send(Ctl::Kill);
        inbox.send(Ctl::Drain);
        let mut bytes = [0u8; 8];
        assert_eq!(bell.read(&mut bytes).unwrap(), 1);
        assert_eq!(inbox.take().len(), 2);
        inbox.send(Ctl::Kill);
        assert_eq!(
            bell.read(&mut bytes).unwrap(),
            1,
            "rings again after a take"
        );
    }
}
