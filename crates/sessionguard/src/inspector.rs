//! The session engine as the proxy's `Inspector`: the adapter between the
//! data path's callbacks and the engine's synchronous API (the engine knows
//! nothing of the proxy, the proxy nothing of sessions). It adds no policy
//! of its own and must stay non-blocking (the callbacks run on connection
//! tasks). It also keeps each open connection's `Injector`, by connection
//! id, for the refresher's driver loop (`crate::refresher`): the engine
//! plans refreshes by connection id and never holds a socket-side handle.
//! In `exec` mode ([`EngineInspector::with_attribution`]) it also stamps
//! each request's receive time and hands each new connection's owner
//! lookup to the blocking pool, for the report to name the process and the
//! test behind a finding; neither ever waits on the data path.

use std::sync::Arc;

use dashmap::DashMap;

use crate::peer_process::{Owner, ProcessTable};
use crate::request_times::RequestTimes;
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
    /// `exec` mode: who opened each connection, when each request came.
    attribution: Option<Attribution>,
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
        }
    }

    /// Also records connection owners and request receive times in
    /// `attribution` (`exec` mode).
    pub(crate) fn with_attribution(mut self, attribution: Attribution) -> EngineInspector {
        self.attribution = Some(attribution);
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
    fn on_connect(&self, conn: &ConnContext) {
        self.injectors.insert(conn.id, conn.injector.clone());
        self.engine.connect(conn.id, conn.peer, conn.local, true);
        if let Some(attribution) = &self.attribution {
            // At once, while the client is surely still connected; on the
            // blocking pool, since it reads every process's descriptors.
            let table = attribution.processes.clone();
            let (id, peer, local) = (conn.id, conn.peer, conn.local);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let guard = table.start_lookup();
                    runtime.spawn_blocking(move || {
                        table.look_up(id, peer, local);
                        drop(guard);
                    });
                }
                Err(_) => table.insert(id, Owner::Unknown("no runtime to look it up".into())),
            }
        }
    }

    fn on_request(&self, conn: &ConnContext, frame: &Frame, msg: &Message<'_>) -> Verdict {
        if let Some(attribution) = &self.attribution {
            attribution.times.stamp(conn.id, frame.header.request_id);
        }
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
