//! When each client request was received, to the microsecond, on the wall
//! clock the test runners stamp their marks with (`exec` mode only): the
//! engine keeps its own times in whole milliseconds since it started, too
//! coarse to tell apart two tests of one process that follow each other
//! within a millisecond. Stamped in `EngineInspector::on_request` (one
//! clock read and one append under a per-connection shard lock); read when
//! the report is written, by connection and request id.
//!
//! Bounded: past [`MAX_REQUESTS`] nothing more is kept, and the report
//! falls back to the engine's millisecond times (a window, not a point).
//! It keeps ids and times only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

/// Requests whose receive time is kept at most (16 bytes each).
pub(crate) const MAX_REQUESTS: usize = 2_000_000;

/// Connection id -> (request id, receive time in Unix microseconds), in
/// arrival order.
#[derive(Debug, Default)]
pub(crate) struct RequestTimes {
    by_conn: DashMap<u64, Vec<(i32, u64)>>,
    kept: AtomicUsize,
}

impl RequestTimes {
    /// Notes that request `request_id` of connection `conn` arrived now.
    pub(crate) fn stamp(&self, conn: u64, request_id: i32) {
        self.stamp_at(conn, request_id, SystemTime::now());
    }

    pub(crate) fn stamp_at(&self, conn: u64, request_id: i32, at: SystemTime) {
        if self.kept.fetch_add(1, Ordering::Relaxed) >= MAX_REQUESTS {
            self.kept.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let micros = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.by_conn
            .entry(conn)
            .or_default()
            .push((request_id, micros));
    }

    /// When request `request_id` of connection `conn` arrived, in Unix
    /// milliseconds; the latest one when a driver reused the id.
    pub(crate) fn received(&self, conn: u64, request_id: i32) -> Option<f64> {
        let requests = self.by_conn.get(&conn)?;
        requests
            .iter()
            .rev()
            .find(|(id, _)| *id == request_id)
            .map(|(_, micros)| *micros as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_microseconds_by_connection_and_request() {
        let times = RequestTimes::default();
        let at = UNIX_EPOCH + Duration::from_micros(1_767_225_600_123_457);
        times.stamp_at(1, 7, at);
        times.stamp_at(2, 7, at + Duration::from_micros(500));
        assert_eq!(times.received(1, 7), Some(1_767_225_600_123.457));
        assert_eq!(times.received(2, 7), Some(1_767_225_600_123.957));
        assert_eq!(times.received(1, 8), None);
        assert_eq!(times.received(3, 7), None);
    }
}
