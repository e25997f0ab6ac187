//! Log capture: every line of the test process through one global
//! `tracing` subscriber (`logs`), or one thread's lines (`ThreadLogs`).
//! It captures; it must not filter out what a test asserts is absent.

use std::sync::Arc;

/// Every log line of this test process, captured by a global `tracing`
/// subscriber (installed once, DEBUG and up). Tests running in parallel
/// share it, so each one picks its lines by something only it has (a peer
/// address, a marker).
pub mod logs {
    use std::sync::OnceLock;

    use tracing_subscriber::filter::{EnvFilter, LevelFilter};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{fmt, reload, Layer, Registry};

    use super::ThreadLogs as Sink;

    /// The capture and the handle that raises its level.
    static SINK: OnceLock<(Sink, reload::Handle<LevelFilter, Registry>)> = OnceLock::new();

    /// Installs the capture at DEBUG (idempotent).
    pub fn install() {
        install_at(tracing::Level::DEBUG);
    }

    /// Installs the capture at `level`, or lowers an installed capture's
    /// threshold to `level`: the suites share one test process under
    /// `cargo test`, and one asking for WARN (to go faster) must not take
    /// another's DEBUG lines away. It never raises the threshold.
    pub fn install_at(level: tracing::Level) {
        let wanted = LevelFilter::from_level(level);
        let (_, handle) = SINK.get_or_init(|| {
            let sink = Sink::default();
            let (filter, handle) = reload::Layer::new(wanted);
            let writer = sink.clone();
            // RUST_LOG (e.g. sessionguard=debug) also shows the lines on the
            // test's output: a process has one global subscriber, so this
            // is the only place a suite can ask for that.
            let echo = std::env::var_os("RUST_LOG").map(|_| {
                fmt::layer()
                    .with_test_writer()
                    .with_filter(EnvFilter::from_default_env())
            });
            let subscriber = Registry::default()
                .with(filter)
                .with(
                    fmt::layer()
                        .with_writer(move || writer.clone())
                        .with_ansi(false),
                )
                .with(echo);
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            (sink, handle)
        });
        handle
            .modify(|current| *current = (*current).max(wanted))
            .expect("the capture is installed");
    }

    /// Every captured line so far.
    pub fn lines() -> Vec<String> {
        let Some((sink, _)) = SINK.get() else {
            return Vec::new();
        };
        sink.text().lines().map(str::to_string).collect()
    }

    /// Captured lines containing `needle`.
    pub fn containing(needle: &str) -> Vec<String> {
        lines().into_iter().filter(|l| l.contains(needle)).collect()
    }

    /// How many lines have been captured so far (see `containing_since`).
    pub fn mark() -> usize {
        lines().len()
    }

    /// Lines captured after `mark` containing `needle` (a peer address
    /// can recur in older lines once the kernel reuses its port).
    pub fn containing_since(mark: usize, needle: &str) -> Vec<String> {
        lines()
            .into_iter()
            .skip(mark)
            .filter(|l| l.contains(needle))
            .collect()
    }
}

/// Log output of the current thread, for tests on a current-thread runtime
/// (the proxy's, engine's and emulator's tasks then log on the test's
/// thread). Unlike `logs`, which installs one global subscriber per test
/// binary, each test gets its own capture at its own level.
#[derive(Clone, Default)]
pub struct ThreadLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for ThreadLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ThreadLogs {
    /// Captures this thread's events at `level` and above until the guard drops.
    pub fn install_at(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(self.subscriber(level))
    }

    /// A plain-text subscriber writing here, at `level` and above.
    pub fn subscriber(&self, level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        let capture = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || capture.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// The proxy's lines (the emulator may log on the same thread).
    pub fn proxy_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("sessionguard_proxy"))
            .map(str::to_string)
            .collect()
    }

    /// The proxy's WARN lines.
    pub fn proxy_warn_lines(&self) -> Vec<String> {
        self.proxy_lines()
            .into_iter()
            .filter(|l| l.contains(" WARN "))
            .collect()
    }
}
