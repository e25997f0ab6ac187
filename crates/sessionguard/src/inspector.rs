//! The session engine as the proxy's `Inspector`: the adapter between the
//! data path's callbacks and the engine's synchronous API (the engine knows
//! nothing of the proxy, the proxy nothing of sessions). It adds no policy
//! of its own and must stay non-blocking (the callbacks run on connection
//! tasks). The engine's record of each forwarded request
//! (`PendingRequest`) is the inspector's `Pending`: the proxy's
//! per-connection in-flight table owns it, hands it back with the reply and
//! at close, and neither this adapter nor the engine keeps a second table.
//! It also keeps each open connection's `Injector`, by connection id, for
//! the refresher's driver loop (`crate::refresher`): the engine plans
//! refreshes by connection id and never holds a socket-side handle.
//! In `exec` mode ([`EngineInspector::with_attribution`]) it also stamps
//! each request's receive time and hands each new connection's owner
//! lookup to the blocking pool, for the report to name the process and the
//! test behind a finding; neither ever waits on the data path.

use std::sync::Arc;

use dashmap::DashMap;

use crate::peer_process::{Owner, ProcessTable};
use crate::request_times::RequestTimes;
use sessionguard_engine::{ConnHandle, Decision, PendingRequest, SessionEngine};
use sessionguard_protocol::wire::{FrameRef, Message};
use sessionguard_protocol::CloseCause;
use sessionguard_proxy::{
    ConnContext, InFlightRequest, Injector, Inspector, ReplyVerdict, Verdict,
};

/// `SessionEngine` behind the proxy's `Inspector` seam.
#[derive(Debug)]
pub struct EngineInspector {
    engine: Arc<SessionEngine>,
    /// Open connections' injectors: inserted at connect, removed at close.
    injectors: DashMap<u64, Injector>,
    /// `exec` mode: who opened each connection, when each request came.
    attribution: Option<Attribution>,
    /// Where owner lookups run: the runtime `with_attribution` was called
    /// on, not the connection's thread's (a data path may run its
    /// connections on threads that have no tokio runtime).
    lookups: Option<tokio::runtime::Handle>,
}

/// What `exec` records for attributing findings to processes and tests.
#[derive(Debug, Clone, Default)]
pub(crate) struct Attribution {
    pub processes: Arc<ProcessTable>,
    pub times: Arc<RequestTimes>,
}

impl EngineInspector {
    pub fn new(engine: Arc<SessionEngine>) -> EngineInspector {
        EngineInspector {
            engine,
            injectors: DashMap::new(),
            attribution: None,
            lookups: None,
        }
    }

    /// Also records connection owners and request receive times in
    /// `attribution` (`exec` mode). Owner lookups run on the blocking pool
    /// of the tokio runtime this is called on, if any.
    pub(crate) fn with_attribution(mut self, attribution: Attribution) -> EngineInspector {
        self.attribution = Some(attribution);
        self.lookups = tokio::runtime::Handle::try_current().ok();
        self
    }

    /// The engine this inspector feeds.
    pub fn engine(&self) -> &Arc<SessionEngine> {
        &self.engine
    }

    /// The injector of open connection `conn`.
    pub(crate) fn injector(&self, conn: u64) -> Option<Injector> {
        self.injectors.get(&conn).map(|injector| injector.clone())
    }
}

impl Inspector for EngineInspector {
    /// `None` for requests the engine does not follow (no session, no
    /// effect): they cost the table nothing more than the proxy's record.
    type Pending = Option<PendingRequest>;
    /// The engine's state of the connection, reached without its table.
    type Conn = ConnHandle;

    fn on_connect(&self, conn: &ConnContext) -> ConnHandle {
        self.injectors.insert(conn.id, conn.injector.clone());
        let handle = self.engine.connect(conn.id, conn.peer, conn.local, true);
        if let Some(attribution) = &self.attribution {
            // At once, while the client is surely still connected; on the
            // blocking pool, since it reads every process's descriptors.
            let table = attribution.processes.clone();
            let (id, peer, local) = (conn.id, conn.peer, conn.local);
            match &self.lookups {
                Some(runtime) => {
                    let guard = table.start_lookup();
                    runtime.spawn_blocking(move || {
                        table.look_up(id, peer, local);
                        drop(guard);
                    });
                }
                None => table.insert(id, Owner::Unknown("no runtime to look it up".into())),
            }
        }
        handle
    }

    fn on_request(
        &self,
        conn: &ConnContext,
        handle: &ConnHandle,
        frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> Verdict<Self::Pending> {
        if let Some(attribution) = &self.attribution {
            attribution.times.stamp(conn.id, frame.header.request_id);
        }
        match self.engine.request_on(handle, frame.header.request_id, msg) {
            (Decision::Forward, pending) => Verdict::Forward(pending),
            (Decision::Reject { reply }, _) => Verdict::Reject { reply },
        }
    }

    fn on_reply(
        &self,
        _conn: &ConnContext,
        handle: &ConnHandle,
        request: Option<&mut InFlightRequest<Self::Pending>>,
        _frame: FrameRef<'_>,
        msg: &Message<'_>,
    ) -> ReplyVerdict {
        // A reply that matches no request the engine follows tells it
        // nothing (exhaust replies chain responseTo to the previous reply;
        // the proxy's table knows which request they answer).
        if let Some(pending) = request.and_then(|r| r.pending.as_mut()) {
            self.engine.reply_on(handle, pending, msg);
        }
        ReplyVerdict::Forward
    }

    fn on_close(
        &self,
        conn: &ConnContext,
        _handle: &ConnHandle,
        cause: CloseCause,
        still_in_flight: Vec<InFlightRequest<Self::Pending>>,
    ) {
        self.engine.close(
            conn.id,
            cause,
            still_in_flight.into_iter().filter_map(|r| r.pending),
        );
        self.injectors.remove(&conn.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::spec::BinarySubtype;
    use bson::{rawdoc, Binary, RawDocumentBuf};
    use sessionguard_engine::{RuleId, RulesConfig, SessionConfig};
    use sessionguard_protocol::wire::{self, op_msg, Frame, MsgFlags, MsgHeader};
    use std::time::Instant;

    fn frame(request_id: i32, response_to: i32, doc: &RawDocumentBuf) -> Frame {
        let bytes = op_msg::encode(request_id, response_to, MsgFlags::default(), doc.as_bytes());
        Frame {
            header: MsgHeader::parse(&bytes).unwrap(),
            bytes,
        }
    }

    fn insert(session: u8, collection: &str) -> RawDocumentBuf {
        let lsid =
            rawdoc! { "id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![session; 16] } };
        rawdoc! { "insert": collection, "documents": [{ "v": 1 }], "lsid": lsid, "$db": "shop" }
    }

    /// The proxy's table keeps one request per request id: when a client
    /// reuses an id still in flight, the reply goes to the later request and
    /// the earlier one is what the proxy still holds at close. The engine
    /// must judge what the proxy hands back, not a list of its own that
    /// matched the reply to the other request.
    #[test]
    fn close_judges_the_requests_the_proxy_still_holds() {
        let engine = Arc::new(SessionEngine::new(
            &SessionConfig::default(),
            &RulesConfig::default(),
        ));
        let inspector = EngineInspector::new(engine.clone());
        let ctx = ConnContext::detached(
            1,
            "10.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:27017".parse().unwrap(),
        );
        let handle = inspector.on_connect(&ctx);
        let mut sent = Vec::new();
        for (session, collection) in [(1, "first"), (2, "second")] {
            let request = frame(5, 0, &insert(session, collection));
            let opened = wire::open(&request, usize::MAX).unwrap();
            let msg = opened.parse(&request).unwrap();
            let Verdict::Forward(pending) =
                inspector.on_request(&ctx, &handle, request.view(), &msg)
            else {
                panic!("rejected");
            };
            sent.push(InFlightRequest {
                request_id: 5,
                command: Some("insert".into()),
                command_metric: 0,
                started: Instant::now(),
                exhaust_allowed: false,
                awaitable_hello: false,
                streamed_replies: 0,
                pending,
            });
        }
        let (first, mut second) = (sent.remove(0), sent.remove(0));

        let reply = frame(100, 5, &rawdoc! { "n": 1, "ok": 1.0 });
        let opened = wire::open(&reply, usize::MAX).unwrap();
        let msg = opened.parse(&reply).unwrap();
        inspector.on_reply(&ctx, &handle, Some(&mut second), reply.view(), &msg);
        inspector.on_close(&ctx, &handle, CloseCause::ClientClosed, vec![first]);

        let fired = engine.violations();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].rule, RuleId::ClosedWithRequestsInFlight);
        let evidence = fired[0].current.as_ref().or(fired[0].earlier.as_ref());
        assert_eq!(
            evidence.map(|e| e.namespace.as_str()),
            Some("shop.first"),
            "{:?}",
            fired[0]
        );
    }
}
