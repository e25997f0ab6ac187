//! The session engine as the proxy's `Inspector`: the adapter between the
//! data path's callbacks and the engine's synchronous API (the engine knows
//! nothing of the proxy, the proxy nothing of sessions). It adds no policy
//! of its own and must stay non-blocking (the callbacks run on connection
//! tasks). It also keeps each open connection's `Injector`, by connection
//! id, for the refresher's driver loop (`crate::refresher`): the engine
//! plans refreshes by connection id and never holds a socket-side handle.

use std::sync::Arc;

use dashmap::DashMap;
use sessionguard_engine::{Decision, SessionEngine};
use sessionguard_protocol::wire::{Frame, Message};
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
}

impl EngineInspector {
    pub fn new(engine: Arc<SessionEngine>) -> EngineInspector {
        EngineInspector {
            engine,
            injectors: DashMap::new(),
        }
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
    fn on_connect(&self, conn: &ConnContext) {
        self.injectors.insert(conn.id, conn.injector.clone());
        self.engine.connect(conn.id, conn.peer, conn.local, true);
    }

    fn on_request(&self, conn: &ConnContext, frame: &Frame, msg: &Message<'_>) -> Verdict {
        match self.engine.request(conn.id, frame.header.request_id, msg) {
            Decision::Forward => Verdict::Forward,
            Decision::Reject { reply } => Verdict::Reject { reply },
        }
    }

    fn on_reply(
        &self,
        conn: &ConnContext,
        request: Option<&InFlightRequest>,
        frame: &Frame,
        msg: &Message<'_>,
    ) -> ReplyVerdict {
        // Exhaust replies chain responseTo to the previous reply; the proxy
        // knows which request they answer.
        let request_id = request.map_or(frame.header.response_to, |r| r.request_id);
        self.engine.reply(conn.id, request_id, msg);
        ReplyVerdict::Forward
    }

    fn on_close(
        &self,
        conn: &ConnContext,
        cause: CloseCause,
        _still_in_flight: &[InFlightRequest],
    ) {
        // The engine keeps its own list of what was in flight (with the
        // sessions and effects the proxy's records do not carry).
        self.engine.close(conn.id, cause);
        self.injectors.remove(&conn.id);
    }
}
