//! Deadlines: how long a test waits for an observable condition before it
//! fails, and the polling loop that waits. Nothing here sleeps for a fixed
//! time to "let things settle".

use std::time::Duration;

/// How long a test waits for something that should happen at once (a
/// reply, a violation, a log line, a close): generous, so a loaded machine
/// does not fail a test, and only ever spent when the test fails anyway.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `condition` every 20 ms until it holds (true) or `timeout` passes
/// (false).
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
