//! [`PendingRequest`]: the engine's record of one forwarded request that
//! awaits its reply, owned by the caller (the proxy's in-flight table)
//! between `request` and `reply` / `close`. Data only; `pipeline` fills
//! and reads it.

use crate::outcome::Effect;
use crate::state::{InFlight, SessionKey};
use crate::timeline::OpSlot;

/// What the engine needs, at its reply or at its connection's close, about
/// one forwarded request: returned by `request` and owned by the caller
/// (the proxy keeps it in its per-connection in-flight table, beside its own
/// record) until the final reply (`reply`) or the close (`close`). The
/// engine keeps no per-connection table of pending requests: the caller's
/// is the only one. Only requests the engine follows get one (session
/// requests, session commands, store deletes, handshakes and auth); a
/// request that expects no reply never does.
#[derive(Debug)]
pub struct PendingRequest {
    pub(super) key: Option<SessionKey>,
    pub(super) entry: InFlight,
    pub(super) in_transaction: bool,
    /// getMore's cursor (to forget it when the reply says exhausted).
    pub(super) cursor: Option<i64>,
    /// Its entry in the connection's operation ring (session requests).
    pub(super) op: Option<OpSlot>,
    /// A session command's (or store delete's) effect, held until the
    /// server answers: settled by the final reply, or as unconfirmed at
    /// close. Boxed: rare, and it would double every pending record.
    pub(super) effect: Option<Box<Effect>>,
}

#[cfg(test)]
mod tests {
    /// It sits inline in every entry of the proxy's in-flight table (and
    /// moves with it): growing it costs every forwarded request, so a
    /// bigger field is boxed, like the rare held effect.
    #[test]
    fn a_pending_record_stays_small() {
        assert!(std::mem::size_of::<Option<super::PendingRequest>>() <= 128);
    }
}
