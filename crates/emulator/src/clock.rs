//! The deployment's cluster time: a `Timestamp(seconds, increment)` that
//! only moves forward. Writes tick it (each committed write gets a later
//! time than every earlier one, like an oplog entry's optime), clients'
//! gossiped `$clusterTime` may move it forward, and every replica-set or
//! mongos reply reports it as `operationTime` and `$clusterTime` (causal
//! consistency spec, "Server Command Responses"). Lock-free, so stamping a
//! reply never takes the data lock. It must not decide anything else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bson::Timestamp;

/// Orders timestamps the way the server does: seconds, then increment.
pub(crate) fn packed(ts: Timestamp) -> u64 {
    (u64::from(ts.time) << 32) | u64::from(ts.increment)
}

pub(crate) fn unpacked(value: u64) -> Timestamp {
    Timestamp {
        time: u32::try_from(value >> 32).unwrap_or(u32::MAX),
        increment: u32::try_from(value & u64::from(u32::MAX)).unwrap_or(u32::MAX),
    }
}

fn wall_seconds() -> u32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[derive(Debug)]
pub(crate) struct ClusterClock {
    now: AtomicU64,
}

impl Default for ClusterClock {
    fn default() -> Self {
        ClusterClock {
            now: AtomicU64::new(packed(Timestamp {
                time: wall_seconds(),
                increment: 1,
            })),
        }
    }
}

impl ClusterClock {
    pub(crate) fn current(&self) -> Timestamp {
        unpacked(self.now.load(Ordering::SeqCst))
    }

    /// The time of a new write: later than anything handed out before; the
    /// seconds follow the wall clock when it is ahead.
    pub(crate) fn tick(&self) -> Timestamp {
        let wall = wall_seconds();
        let next = |current: u64| {
            let ts = unpacked(current);
            let next = if wall > ts.time {
                Timestamp {
                    time: wall,
                    increment: 1,
                }
            } else if ts.increment == u32::MAX {
                Timestamp {
                    time: ts.time.saturating_add(1),
                    increment: 1,
                }
            } else {
                Timestamp {
                    time: ts.time,
                    increment: ts.increment + 1,
                }
            };
            Some(packed(next))
        };
        let previous = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, next)
            .unwrap_or_else(|current| current);
        next(previous).map(unpacked).unwrap_or(Timestamp {
            time: wall,
            increment: 1,
        })
    }

    /// Moves the clock forward to `ts` (gossip, a no-op write); never back.
    pub(crate) fn advance_to(&self, ts: Timestamp) {
        self.now.fetch_max(packed(ts), Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_and_gossip_never_moves_back() {
        let clock = ClusterClock::default();
        let a = clock.tick();
        let b = clock.tick();
        assert!(packed(b) > packed(a));
        assert_eq!(clock.current(), b);
        clock.advance_to(Timestamp {
            time: 1,
            increment: 1,
        });
        assert_eq!(clock.current(), b);
        let ahead = Timestamp {
            time: b.time + 100,
            increment: 7,
        };
        clock.advance_to(ahead);
        assert_eq!(clock.current(), ahead);
        assert_eq!(
            clock.tick(),
            Timestamp {
                time: ahead.time,
                increment: 8
            }
        );
    }
}
