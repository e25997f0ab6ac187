//! Live reload of the configuration file, on `SIGHUP` and `POST /reload`.
//!
//! A reload re-reads the file `sessionguard proxy` started with, applies the
//! same CLI / environment overrides again (so `--mode` and
//! `SESSIONGUARD_MODE` keep winning over the file), and validates the whole
//! file exactly as at start. A file that does not read, parse or validate is
//! refused whole: the configuration in force stays, the log and the HTTP
//! answer carry the same message naming the key and the problem. A valid
//! file puts its live part in force in the session engine for every request
//! judged from then on — `sessions.mode`, `sessions.transaction_max_open`
//! and every `[rules.<id>]` — and `log.finding_interval` for the next
//! summary line, without touching connections or the ledger.
//! Every other setting that differs (listeners, upstream, TLS, limits,
//! timeouts, the admin address and token, the other `[sessions]` keys,
//! `[stores]`, the rest of `[log]`) is named as needing a restart and keeps its running
//! value; the live part still applies (a rule change should not wait for a
//! restart because the same file also changed a port).
//!
//! It owns the reload counters for `/metrics` and logs one line per attempt.
//! It must not bind, dial or touch connections, and it never logs the admin
//! token (the configuration renders it redacted).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts};
use serde::Serialize;

use crate::config::{Config, ConfigError, Overrides};
use crate::metrics::Metrics;
use sessionguard_engine::SessionEngine;

/// The keys a reload puts in force (`rules` stands for every `[rules.<id>]`
/// key). Everything else needs a restart.
pub(crate) const LIVE_KEYS: [&str; 4] = [
    "sessions.mode",
    "sessions.transaction_max_open",
    "rules",
    "log.finding_interval",
];

/// What a successful reload did (also the body of `POST /reload`'s 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reloaded {
    /// The file that was read.
    pub config: String,
    /// The first 12 hex digits of the file's SHA-256 (`sha256sum FILE`).
    pub config_sha256: String,
    /// `key: old -> new` for each live setting now in force.
    pub changes: Vec<String>,
    /// Keys whose new value differs from the running one but cannot change
    /// without a restart; they keep their running value, sorted.
    pub needs_restart: Vec<String>,
}

/// Reloads the configuration of one running proxy.
pub struct Reloader {
    path: Option<PathBuf>,
    overrides: Overrides,
    engine: Arc<SessionEngine>,
    /// The configuration in force: restart-only settings as started, live
    /// ones as last applied. Locked for a whole reload, so two reloads
    /// (SIGHUP and POST at once) run one after the other; never held
    /// across an `.await` (a reload does none).
    running: Mutex<Config>,
    metrics: ReloadMetrics,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Reload counters, exported through the proxy's registry.
#[derive(Clone)]
struct ReloadMetrics {
    reloads: IntCounterVec,
    last_successful: IntGauge,
    last_success_time: Gauge,
    hash: Gauge,
}

impl ReloadMetrics {
    fn new() -> prometheus::Result<ReloadMetrics> {
        let reloads = IntCounterVec::new(
            Opts::new(
                "sessionguard_config_reloads_total",
                "Configuration reloads (SIGHUP, POST /reload) by result: success (the live part is in force) \
                 or failure (the file was refused; the running configuration stays).",
            ),
            &["result"],
        )?;
        // Both series from the start, so a failure is a change, not a new series.
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        Ok(ReloadMetrics {
            reloads,
            last_successful: IntGauge::new(
                "sessionguard_config_last_reload_successful",
                "1 if the last configuration load (start or reload) succeeded, 0 if it was refused.",
            )?,
            last_success_time: Gauge::new(
                "sessionguard_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful configuration load (start or reload).",
            )?,
            hash: Gauge::new(
                "sessionguard_config_hash",
                "The configuration file in force: its SHA-256's first 48 bits as a number (the first 12 hex \
                 digits of sha256sum); 0 without a file. Equal across instances that loaded the same file.",
            )?,
        })
    }

    fn loaded(&self, sha: Option<&Sha>) {
        self.last_successful.set(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_success_time.set(now);
        self.hash.set(sha.map_or(0.0, |sha| sha.number));
    }
}

/// A file's fingerprint: 12 hex digits and the same 48 bits as a number
/// (exact in a Prometheus float).
#[derive(Debug, Clone, PartialEq)]
struct Sha {
    hex: String,
    number: f64,
}

impl Sha {
    fn of(text: &str) -> Sha {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let head = &digest.as_ref()[..6];
        let hex = head.iter().map(|b| format!("{b:02x}")).collect();
        let number = head.iter().fold(0_u64, |n, b| n << 8 | u64::from(*b));
        Sha {
            hex,
            // < 2^48: no rounding.
            number: number as f64,
        }
    }
}

impl Reloader {
    /// A reloader for a proxy started from `config`, read from `path` (the
    /// file's `text` as read then) with `overrides` on top.
    pub fn new(
        path: Option<PathBuf>,
        overrides: Overrides,
        text: Option<&str>,
        config: &Config,
        engine: Arc<SessionEngine>,
    ) -> Reloader {
        let metrics = ReloadMetrics::new().expect("reload metric definitions are consistent");
        metrics.loaded(text.map(Sha::of).as_ref());
        Reloader {
            path,
            overrides,
            engine,
            running: Mutex::new(config.clone()),
            metrics,
        }
    }

    /// Adds the reload counters to the proxy's registry.
    pub fn register_metrics(&self, metrics: &Metrics) -> prometheus::Result<()> {
        let m = &self.metrics;
        metrics.register(Box::new(m.reloads.clone()))?;
        metrics.register(Box::new(m.last_successful.clone()))?;
        metrics.register(Box::new(m.last_success_time.clone()))?;
        metrics.register(Box::new(m.hash.clone()))
    }

    /// Re-reads the file and puts its live part in force; `trigger` says
    /// what asked (`SIGHUP`, `POST /reload`) in the log line. Logs and
    /// counts the outcome either way. The error names the file, the key and
    /// the problem.
    pub fn reload(&self, trigger: &str) -> Result<Reloaded, ConfigError> {
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match self.apply(&mut running) {
            Ok(reloaded) => {
                self.metrics.reloads.with_label_values(&["success"]).inc();
                let changes = if reloaded.changes.is_empty() {
                    "none".to_string()
                } else {
                    reloaded.changes.join("; ")
                };
                if reloaded.needs_restart.is_empty() {
                    tracing::info!(
                        trigger,
                        config = %reloaded.config,
                        config_sha256 = %reloaded.config_sha256,
                        changes = %changes,
                        "configuration reloaded"
                    );
                } else {
                    tracing::warn!(
                        trigger,
                        config = %reloaded.config,
                        config_sha256 = %reloaded.config_sha256,
                        changes = %changes,
                        needs_restart = %reloaded.needs_restart.join(", "),
                        "configuration reloaded"
                    );
                }
                Ok(reloaded)
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                self.metrics.last_successful.set(0);
                tracing::error!(
                    trigger,
                    key = e.key.as_deref(),
                    error = %e,
                    "configuration reload refused"
                );
                Err(e)
            }
        }
    }

    fn apply(&self, running: &mut Config) -> Result<Reloaded, ConfigError> {
        let Some(path) = &self.path else {
            return Err(ConfigError {
                source: None,
                key: None,
                problem: "no configuration file to reload: sessionguard proxy was started without \
                          --config (or SESSIONGUARD_CONFIG)"
                    .to_string(),
            });
        };
        let (new, text) = Config::resolve_file(Some(path), &self.overrides)?;
        let sha = Sha::of(text.as_deref().unwrap_or_default());
        let needs_restart = needs_restart(running, &new);

        let mut changes =
            self.engine
                .rules()
                .changes(&sessionguard_engine::ResolvedRules::resolve(
                    new.sessions.mode,
                    &new.rules,
                ));
        if running.sessions.transaction_max_open != new.sessions.transaction_max_open {
            changes.push(format!(
                "sessions.transaction_max_open: {} -> {}",
                humantime::format_duration(running.sessions.transaction_max_open),
                humantime::format_duration(new.sessions.transaction_max_open)
            ));
        }
        if running.log.finding_interval != new.log.finding_interval {
            changes.push(format!(
                "log.finding_interval: {} -> {}",
                humantime::format_duration(running.log.finding_interval),
                humantime::format_duration(new.log.finding_interval)
            ));
        }
        self.engine.reconfigure(&new.sessions, &new.rules);
        self.engine.set_finding_interval(new.log.finding_interval);
        running.log.finding_interval = new.log.finding_interval;
        running.sessions.mode = new.sessions.mode;
        running.sessions.transaction_max_open = new.sessions.transaction_max_open;
        running.rules = new.rules;
        self.metrics.loaded(Some(&sha));
        Ok(Reloaded {
            config: path.display().to_string(),
            config_sha256: sha.hex,
            changes,
            needs_restart,
        })
    }
}

/// The dotted keys outside `LIVE_KEYS` whose value differs, sorted. The
/// whole configuration is compared, so a table added later is covered
/// (as needing a restart) without being listed here.
fn needs_restart(running: &Config, new: &Config) -> Vec<String> {
    let restart_only = |config: &Config| {
        let mut value = json(config);
        for key in LIVE_KEYS {
            let mut path: Vec<&str> = key.split('.').collect();
            let last = path.pop().unwrap_or(key);
            let table = path
                .iter()
                .try_fold(&mut value, |value, name| value.get_mut(*name));
            if let Some(serde_json::Value::Object(table)) = table {
                table.remove(last);
            }
        }
        value
    };
    let mut keys = Vec::new();
    diff("", &restart_only(running), &restart_only(new), &mut keys);
    // The token renders redacted, so compare it itself.
    if running.proxy.admin_token != new.proxy.admin_token {
        keys.push("proxy.admin_token".to_string());
    }
    keys.sort();
    keys.dedup();
    keys
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// Pushes `prefix.key` for every leaf (or array) that differs.
fn diff(prefix: &str, old: &serde_json::Value, new: &serde_json::Value, keys: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                let missing = Value::Null;
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                diff(
                    &key,
                    old.get(name).unwrap_or(&missing),
                    new.get(name).unwrap_or(&missing),
                    keys,
                );
            }
        }
        (old, new) if old != new => keys.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        let config = Config::parse(text).unwrap();
        config.validate().unwrap();
        config
    }

    fn engine(config: &Config) -> Arc<SessionEngine> {
        Arc::new(SessionEngine::new(&config.sessions, &config.rules))
    }

    fn reloader(text: &str, overrides: Overrides) -> (tempfile::TempDir, PathBuf, Reloader) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessionguard.toml");
        std::fs::write(&path, text).unwrap();
        let (config, read) = Config::resolve_file(Some(&path), &overrides).unwrap();
        let reloader = Reloader::new(
            Some(path.clone()),
            overrides,
            read.as_deref(),
            &config,
            engine(&config),
        );
        (dir, path, reloader)
    }

    #[test]
    fn restart_keys_are_named_and_live_keys_are_not() {
        let running =
            parse("[proxy]\nlisten = \"127.0.0.1:1\"\n[rules.use-after-end]\naction = \"log\"\n");
        let new = parse(
            "[proxy]\nlisten = \"127.0.0.1:2\"\nadmin_token = \"0123456789abcdef0\"\n\
             [proxy.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             [log]\nlevel = \"debug\"\n\
             [sessions]\nmode = \"enforce\"\ntransaction_max_open = \"2m\"\nmax_sessions = 7\n\
             [stores]\ncollections = [\"web\"]\n\
             [rules.use-after-end]\naction = \"reject\"\n",
        );
        assert_eq!(
            needs_restart(&running, &new),
            [
                "log.level",
                "proxy.admin_token",
                "proxy.listen",
                "proxy.tls",
                "sessions.max_sessions",
                "stores.collections",
            ]
        );
        assert!(needs_restart(&running, &running).is_empty());
        // A rotated token renders the same; it is still named.
        let a = parse("[proxy]\nadmin_token = \"0123456789abcdef0\"\n");
        let b = parse("[proxy]\nadmin_token = \"0123456789abcdef1\"\n");
        assert_eq!(needs_restart(&a, &b), ["proxy.admin_token"]);
    }

    #[test]
    fn a_reload_puts_the_live_part_in_force_and_says_what_changed() {
        let (_dir, path, reloader) = reloader(
            "[rules.concurrent-use]\naction = \"log\"\n",
            Overrides::default(),
        );
        let engine = reloader.engine.clone();
        std::fs::write(
            &path,
            "[proxy]\nmax_connections = 3\n[log]\nfinding_interval = \"10s\"\n\
             [sessions]\ntransaction_max_open = \"2m\"\n\
             [rules.concurrent-use]\naction = \"reject\"\n[rules.txn-left-open]\nenabled = false\n",
        )
        .unwrap();
        let reloaded = reloader.reload("test").unwrap();
        assert_eq!(
            reloaded.changes,
            [
                "rules.concurrent-use.action: log -> reject",
                "rules.txn-left-open.enabled: true -> false",
                "sessions.transaction_max_open: 1m -> 2m",
                "log.finding_interval: 1m -> 10s",
            ]
        );
        assert_eq!(
            engine.finding_interval(),
            std::time::Duration::from_secs(10)
        );
        assert_eq!(reloaded.needs_restart, ["proxy.max_connections"]);
        assert_eq!(reloaded.config_sha256.len(), 12);
        let rules = engine.rules();
        assert_eq!(
            rules.get(sessionguard_engine::RuleId::ConcurrentUse).action,
            sessionguard_engine::Action::Reject
        );
        assert!(!rules.enabled(sessionguard_engine::RuleId::TxnLeftOpen));
        // Reloading the same file again changes nothing, and the restart
        // key is still named: it still differs from what runs.
        let again = reloader.reload("test").unwrap();
        assert!(again.changes.is_empty(), "{again:?}");
        assert_eq!(again.needs_restart, ["proxy.max_connections"]);
        assert_eq!(again.config_sha256, reloaded.config_sha256);
    }

    #[test]
    fn a_bad_file_is_refused_whole_and_the_running_rules_stay() {
        let (_dir, path, reloader) = reloader(
            "[rules.use-after-end]\naction = \"log\"\n",
            Overrides::default(),
        );
        let before = reloader.engine.rules();
        for (text, key) in [
            (
                "[rules.use-after-end]\naction = \"block\"\n",
                "rules.use-after-end.action",
            ),
            (
                "[rules.use-after-end]\nactoin = \"reject\"\n",
                "rules.use-after-end.actoin",
            ),
            (
                "[rules.use-after-nd]\naction = \"reject\"\n",
                "rules.use-after-nd",
            ),
            // Valid rules, invalid elsewhere: refused whole.
            (
                "[proxy]\nmax_connections = 0\n[rules.use-after-end]\naction = \"reject\"\n",
                "proxy.max_connections",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = reloader.reload("test").unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{err}");
            assert!(err.to_string().contains(&format!("{key}: ")), "{err}");
            assert!(err.to_string().contains("sessionguard.toml"), "{err}");
            assert_eq!(reloader.engine.rules(), before, "{text}");
        }
        std::fs::remove_file(&path).unwrap();
        let err = reloader.reload("test").unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");
        let failures = reloader
            .metrics
            .reloads
            .with_label_values(&["failure"])
            .get();
        assert_eq!(failures, 5);
        assert_eq!(reloader.metrics.last_successful.get(), 0);
    }

    #[test]
    fn overrides_still_win_on_reload() {
        let overrides = Overrides {
            mode: Some(sessionguard_engine::Mode::Enforce),
            ..Overrides::default()
        };
        let (_dir, path, reloader) = reloader("[sessions]\nmode = \"observe\"\n", overrides);
        assert_eq!(
            reloader.engine.rules().mode(),
            sessionguard_engine::Mode::Enforce
        );
        std::fs::write(
            &path,
            "[sessions]\nmode = \"observe\"\nmax_violations = 5\n",
        )
        .unwrap();
        let reloaded = reloader.reload("test").unwrap();
        assert!(reloaded.changes.is_empty(), "{reloaded:?}");
        assert_eq!(
            reloader.engine.rules().mode(),
            sessionguard_engine::Mode::Enforce
        );
        assert_eq!(reloaded.needs_restart, ["sessions.max_violations"]);
    }

    #[test]
    fn without_a_file_there_is_nothing_to_reload() {
        let config = Config::default();
        let reloader = Reloader::new(None, Overrides::default(), None, &config, engine(&config));
        let err = reloader.reload("test").unwrap_err();
        assert!(err.to_string().contains("without --config"), "{err}");
    }

    #[test]
    fn the_hash_is_the_head_of_sha256() {
        // sha256("") = e3b0c44298fc1c14...
        let sha = Sha::of("");
        assert_eq!(sha.hex, "e3b0c44298fc");
        assert_eq!(sha.number, 0xe3b0c44298fc_u64 as f64);
    }
}
