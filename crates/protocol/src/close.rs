//! Why a client connection ended: the one vocabulary the data path (which
//! sees the close) and the session engine (which judges what was left in
//! flight) share. Pure data: it must not carry sockets, errors or policy
//! beyond which side went first.

use std::fmt;

/// Why a connection pair closed: which side went first, and how. Only
/// `ClientClosed` and `ClientReset` are the client's doing; every other
/// cause (the upstream, the network, a malformed or stalled frame the proxy
/// gave up on, a drain, a shutdown) is not something the application did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCause {
    /// The client closed its side (end of stream).
    ClientClosed,
    /// The client's side failed: a reset, or writing to a client that left.
    ClientReset,
    /// The client sent a frame the proxy could not read; the proxy closed.
    ClientMalformed,
    /// The client stopped mid-frame; the proxy closed.
    ClientFrameTimeout,
    /// The upstream closed its side.
    UpstreamClosed,
    /// The upstream connection failed (reset, i/o error).
    UpstreamError,
    /// The upstream sent a frame the proxy could not read; the proxy closed.
    UpstreamMalformed,
    /// The upstream stopped mid-frame; the proxy closed.
    UpstreamFrameTimeout,
    /// The proxy is draining and the connection had finished its work.
    Drained,
    /// The proxy shut down with the connection open.
    Shutdown,
    /// A proxy-internal failure.
    Internal,
}

impl CloseCause {
    pub const ALL: [CloseCause; 11] = [
        CloseCause::ClientClosed,
        CloseCause::ClientReset,
        CloseCause::ClientMalformed,
        CloseCause::ClientFrameTimeout,
        CloseCause::UpstreamClosed,
        CloseCause::UpstreamError,
        CloseCause::UpstreamMalformed,
        CloseCause::UpstreamFrameTimeout,
        CloseCause::Drained,
        CloseCause::Shutdown,
        CloseCause::Internal,
    ];
    pub const COUNT: usize = CloseCause::ALL.len();

    /// The `reason` label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::ClientClosed => "client_closed",
            CloseCause::ClientReset => "client_reset",
            CloseCause::ClientMalformed => "client_malformed_frame",
            CloseCause::ClientFrameTimeout => "client_frame_timeout",
            CloseCause::UpstreamClosed => "upstream_closed",
            CloseCause::UpstreamError => "upstream_error",
            CloseCause::UpstreamMalformed => "upstream_malformed_frame",
            CloseCause::UpstreamFrameTimeout => "upstream_frame_timeout",
            CloseCause::Drained => "drained",
            CloseCause::Shutdown => "shutdown",
            CloseCause::Internal => "internal",
        }
    }

    /// Position in `ALL` (for per-cause counters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The client closed or reset its side before anything else happened:
    /// the only causes that can be client misuse.
    pub fn client_went_first(self) -> bool {
        matches!(self, CloseCause::ClientClosed | CloseCause::ClientReset)
    }
}

impl fmt::Display for CloseCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_causes_are_indexed_in_order_and_only_the_client_goes_first() {
        for (index, cause) in CloseCause::ALL.into_iter().enumerate() {
            assert_eq!(cause.index(), index);
        }
        let first: Vec<_> = CloseCause::ALL
            .into_iter()
            .filter(|cause| cause.client_went_first())
            .collect();
        assert_eq!(first, [CloseCause::ClientClosed, CloseCause::ClientReset]);
    }
}
