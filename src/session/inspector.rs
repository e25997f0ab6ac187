//! `SessionEngine` as the proxy's `Inspector`: the adapter between the data
//! path's callbacks and the engine's synchronous API. It adds no policy of
//! its own and must stay non-blocking (the callbacks run on connection tasks).

use crate::proxy::inspect::{
    CloseCause, ConnContext, InFlightRequest, Inspector, ReplyVerdict, Verdict,
};
use sessionguard_protocol::wire::{Frame, Message};

use super::engine::{Decision, SessionEngine};

impl Inspector for SessionEngine {
    fn on_connect(&self, conn: &ConnContext) {
        self.connect(conn.id, conn.peer, conn.local, Some(conn.injector.clone()));
    }

    fn on_request(&self, conn: &ConnContext, frame: &Frame, msg: &Message<'_>) -> Verdict {
        match self.request(conn.id, frame.header.request_id, msg) {
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
        self.reply(conn.id, request_id, msg);
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
        self.close(conn.id, cause);
    }
}
