//! Logging setup: one global `tracing` subscriber writing to stderr, either
//! human-readable (`pretty`) or one JSON object per line (`json`), filtered
//! by a `tracing` directive string. It owns nothing else; what gets logged
//! is decided at the call sites (which never log document contents).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Fails if the level is not a valid filter
/// or a subscriber is already installed.
pub fn init(log: &LogConfig) -> Result<(), String> {
    let filter = EnvFilter::try_new(&log.level)
        .map_err(|e| format!("log.level: invalid filter `{}`: {e}", log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match log.format {
        // Colour codes only help a person at a terminal; in a CI log or a
        // file they are noise that breaks grep.
        LogFormat::Pretty => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))
}
