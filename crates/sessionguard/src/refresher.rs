//! The refresher's driver loop: keeps sessions the application still holds
//! from expiring on the server while they sit idle, and runs the engine's
//! time-driven sweep (transactions left open, purging).
//!
//! The engine decides (`SessionEngine::plan_refresh`: which sessions, on
//! which connection, the `refreshSessions` bytes); this loop owns the timer
//! and the sending: each batch goes through its connection's `Injector`
//! (kept by [`EngineInspector`]), which waits for a moment with nothing in
//! flight, uses a request id the client cannot collide with, and consumes
//! the reply; the outcome goes back to `SessionEngine::finish_refresh`. It
//! holds only a `Weak` reference, so it ends with the inspector (and so
//! with the proxy that holds it); no lock is held across an await.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::inspector::EngineInspector;

/// The sweep (transactions left open) runs at least this often.
const SWEEP_TICK: Duration = Duration::from_secs(1);

/// Runs the refresher and the sweep until `inspector` is dropped.
pub fn spawn_refresher(inspector: &Arc<EngineInspector>) -> tokio::task::JoinHandle<()> {
    let weak: Weak<EngineInspector> = Arc::downgrade(inspector);
    let interval = inspector.engine().refresh_interval();
    let tick = interval.min(SWEEP_TICK);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh: Option<tokio::time::Instant> = None;
        loop {
            ticker.tick().await;
            let Some(inspector) = weak.upgrade() else {
                return;
            };
            let engine = inspector.engine();
            engine.sweep();
            let due = last_refresh.is_none_or(|at| at.elapsed() >= interval);
            if !due {
                continue;
            }
            last_refresh = Some(tokio::time::Instant::now());
            for batch in engine.plan_refresh(engine.now()) {
                let injector = inspector.injector(batch.conn);
                let engine = Arc::downgrade(engine);
                tokio::spawn(async move {
                    // A connection that closed since the plan: the same
                    // outcome as an injection its close cut short.
                    let result = match injector {
                        Some(injector) => injector.inject(batch.body()).await,
                        None => Err(sessionguard_proxy::InjectError::Closed),
                    };
                    if let Some(engine) = engine.upgrade() {
                        let result = result.map_err(|error| error.to_string());
                        engine.finish_refresh(&batch, result, engine.now());
                    }
                });
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessionguard_engine::{RulesConfig, SessionConfig, SessionEngine};

    #[tokio::test]
    async fn the_task_stops_with_the_inspector() {
        let engine = Arc::new(SessionEngine::new(
            &SessionConfig::default(),
            &RulesConfig::default(),
        ));
        let inspector = Arc::new(EngineInspector::new(engine));
        let task = spawn_refresher(&inspector);
        drop(inspector);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the refresher ends")
            .unwrap();
    }
}
