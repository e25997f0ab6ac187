//! sessionguard's configuration: the TOML file (`[proxy]`, `[log]`,
//! `[sessions]`, `[rules]`), its documented defaults, validation whose every
//! error names the offending key, and the overlay of CLI flags / environment
//! variables on top of the file (precedence: CLI > env > file > defaults;
//! clap already merges CLI and env into one `Overrides`). It must not bind
//! ports, open files other than the config file, or start anything: a bad
//! config is reported before any side effect.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use sessionguard_engine::{Mode, RulesConfig, SessionConfig};
use sessionguard_proxy::{ConnectionString, IoMode};
use sessionguard_proxy::{ListenTls, UpstreamTls};
use sessionguard_proxy::{ListenTlsError, ListenerPlan, ProxySettings};

/// `[proxy.tls]` (defined by the proxy, which reads its files).
pub use sessionguard_proxy::{ListenTlsConfig, DEFAULT_TLS_HANDSHAKE_TIMEOUT};

/// Address the proxy accepts application connections on.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:27018";
/// The deployment the proxy forwards to.
pub(crate) const DEFAULT_UPSTREAM: &str = "mongodb://127.0.0.1:27017";
/// Address of the admin HTTP server (`/healthz`, `/readyz`, `/metrics`,
/// `/sessions`, `/violations`, `/findings`).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9216";
/// How often `/readyz` dials the upstream to see whether it is reachable.
pub(crate) const DEFAULT_UPSTREAM_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest accepted `admin_token`: a guessable token protects nothing.
pub(crate) const MIN_ADMIN_TOKEN_LEN: usize = 16;
/// Maximum concurrent client connections; more are closed on accept.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Largest frame accepted in either direction (the server's maxMessageSizeBytes).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = sessionguard_protocol::wire::DEFAULT_MAX_MESSAGE_SIZE;
/// Smallest allowed `max_message_size`: below this even a handshake fails.
pub(crate) const MIN_MAX_MESSAGE_SIZE: usize = 1024;
/// How long dialing the upstream may take before the client is closed.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a drain (SIGTERM) waits for in-flight requests before closing.
pub(crate) const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// How long a frame may take to arrive once its first byte has arrived.
pub(crate) const DEFAULT_FRAME_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an injected request (e.g. refreshSessions) may wait for a quiet
/// moment on its connection plus its reply.
pub(crate) const DEFAULT_INJECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default log verbosity (a `tracing` filter directive).
pub(crate) const DEFAULT_LOG_LEVEL: &str = "info";

/// The whole configuration file. (`Serialize` renders it for comparisons,
/// e.g. what a reload would change; the admin token renders redacted.)
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub sessions: SessionConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    /// `[stores]`: web-session store collections (`store-session-resurrected`).
    #[serde(default)]
    pub stores: sessionguard_engine::StoreConfig,
    /// `[[members]]`: the replica-set member mapping as written in the file;
    /// `Config::parse` moves it into `proxy.members`, which is what the proxy
    /// reads (so `[[proxy.members]]` works as well).
    #[serde(default)]
    pub members: Vec<MemberConfig>,
}

/// `[proxy]`: listening, upstream, limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// `HOST:PORT` the proxy listens on.
    pub listen: String,
    /// MongoDB connection string of the deployment; its first host is dialed.
    pub upstream: String,
    /// `HOST:PORT` of the admin HTTP server.
    pub admin: String,
    pub max_connections: usize,
    pub max_message_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub frame_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub inject_timeout: Duration,
    /// The data path's I/O driver: `auto` (io_uring, else epoll), `io_uring`
    /// or `epoll`; `SESSIONGUARD_IO` overrides it.
    pub io: IoMode,
    /// Bearer token required by the admin routes other than `/healthz` and
    /// `/metrics`; `None` leaves them open (the admin address is loopback
    /// by default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<AdminToken>,
    #[serde(with = "humantime_serde")]
    pub upstream_probe_interval: Duration,
    /// Show every frame to the session engine (the default). `false` makes
    /// `sessionguard proxy` a plain forwarder (no ledger, no rules, no
    /// refreshes): the baseline of the performance benchmark.
    pub inspect: bool,
    /// `[proxy.tls]`: serve TLS to applications. Absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenTlsConfig>,
    /// Replica-set mode: one listener per member (see `MemberConfig`).
    /// Empty (the default): one listener on `listen`, dialing the first host
    /// of `upstream`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberConfig>,
    /// Replica-set mode without `[[members]]`: the hosts of `upstream`, in
    /// order, get listeners on consecutive ports from this one (host from
    /// `listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_base_port: Option<u16>,
    /// With `member_base_port`: the host drivers are told to dial (hello
    /// `hosts` / `me` / `primary`); defaults to the host of `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_host: Option<String>,
    /// Set by `exec`, never by a config file: every client is handed a
    /// connection string with `directConnection=true`, so a replica-set
    /// `hello` without a member mapping is expected and no driver will
    /// bypass the proxy — the bypass warning would be a false alarm.
    #[serde(skip)]
    pub clients_connect_directly: bool,
}

/// One replica-set member behind its own proxy listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's `HOST:PORT` exactly as the replica set names it in
    /// `hello` (`rs.conf()` host names); this listener dials it.
    pub upstream: String,
    /// `HOST:PORT` this member's listener binds.
    pub listen: String,
    /// `HOST:PORT` drivers are told instead of `upstream`; defaults to
    /// `listen` (with the bound port when `listen` uses port 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
}

/// A secret that never reaches logs or rendered configuration: `Debug` and
/// `Serialize` print `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> AdminToken {
        AdminToken(token.into())
    }

    /// The token itself, for comparing with a request's credentials only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for AdminToken {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: DEFAULT_LISTEN.to_string(),
            upstream: DEFAULT_UPSTREAM.to_string(),
            admin: DEFAULT_ADMIN.to_string(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            drain_grace: DEFAULT_DRAIN_GRACE,
            frame_read_timeout: DEFAULT_FRAME_READ_TIMEOUT,
            inject_timeout: DEFAULT_INJECT_TIMEOUT,
            io: IoMode::Auto,
            admin_token: None,
            upstream_probe_interval: DEFAULT_UPSTREAM_PROBE_INTERVAL,
            inspect: true,
            clients_connect_directly: false,
            tls: None,
            members: Vec::new(),
            member_base_port: None,
            advertise_host: None,
        }
    }
}

impl ProxyConfig {
    /// Checks every value; the error names the key (`proxy.<key>: ...`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_host_port("proxy.listen", &self.listen)?;
        validate_host_port("proxy.admin", &self.admin)?;
        let upstream = self.upstream_connection_string()?;
        sessionguard_proxy::TlsOptions::parse(&upstream)
            .map_err(|e| ConfigError::key("proxy.upstream", e))?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if self.max_connections == 0 {
            return Err(ConfigError::key(
                "proxy.max_connections",
                "must be at least 1",
            ));
        }
        if self.max_message_size < MIN_MAX_MESSAGE_SIZE {
            return Err(ConfigError::key(
                "proxy.max_message_size",
                format!("must be at least {MIN_MAX_MESSAGE_SIZE} bytes"),
            ));
        }
        if i32::try_from(self.max_message_size).is_err() {
            return Err(ConfigError::key(
                "proxy.max_message_size",
                format!("must be at most {} bytes (wire lengths are i32)", i32::MAX),
            ));
        }
        for (key, value) in [
            ("proxy.connect_timeout", self.connect_timeout),
            ("proxy.frame_read_timeout", self.frame_read_timeout),
            ("proxy.inject_timeout", self.inject_timeout),
            (
                "proxy.upstream_probe_interval",
                self.upstream_probe_interval,
            ),
        ] {
            if value.is_zero() {
                return Err(ConfigError::key(key, "must be greater than 0"));
            }
        }
        if let Some(token) = &self.admin_token {
            let token = token.expose();
            if token.chars().count() < MIN_ADMIN_TOKEN_LEN {
                return Err(ConfigError::key(
                    "proxy.admin_token",
                    format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters"),
                ));
            }
            // It travels in an HTTP header: visible ASCII only.
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::key(
                    "proxy.admin_token",
                    "must be visible ASCII characters without spaces",
                ));
            }
        }
        self.member_plan()?;
        Ok(())
    }

    /// The member listeners to start: empty in single-upstream mode. Every
    /// error names its key (`members[1].advertise: ...`).
    pub fn member_plan(&self) -> Result<Vec<ListenerPlan>, ConfigError> {
        if let Some(host) = &self.advertise_host {
            if self.member_base_port.is_none() {
                return Err(ConfigError::key(
                    "proxy.advertise_host",
                    "is only used with proxy.member_base_port (give [[members]] an `advertise` instead)",
                ));
            }
            validate_host_port("proxy.advertise_host", &format!("{host}:1"))?;
            if is_wildcard_host(host) {
                return Err(ConfigError::key(
                    "proxy.advertise_host",
                    format!("`{host}` is a wildcard address; drivers cannot dial it"),
                ));
            }
        }
        let plan = match self.member_base_port {
            Some(_) if !self.members.is_empty() => {
                return Err(ConfigError::key(
                    "proxy.member_base_port",
                    "cannot be combined with [[members]]; use one or the other",
                ))
            }
            Some(base) => self.base_port_plan(base)?,
            None => self
                .members
                .iter()
                .enumerate()
                .map(|(index, member)| member.plan(index))
                .collect::<Result<Vec<_>, _>>()?,
        };
        for (index, member) in plan.iter().enumerate() {
            let key = |field: &str| member_key(self, index, field);
            for earlier in &plan[..index] {
                if earlier.upstream == member.upstream {
                    return Err(ConfigError::key(
                        key("upstream"),
                        format!("`{}` is mapped twice", member.upstream),
                    ));
                }
                if earlier.listen == member.listen && !member.listen.ends_with(":0") {
                    return Err(ConfigError::key(
                        key("listen"),
                        format!("`{}` is used by two members", member.listen),
                    ));
                }
                if earlier.advertise.is_some() && earlier.advertise == member.advertise {
                    return Err(ConfigError::key(
                        key("advertise"),
                        "two members advertise the same address; drivers could not tell them apart",
                    ));
                }
            }
        }
        Ok(plan)
    }

    fn base_port_plan(&self, base: u16) -> Result<Vec<ListenerPlan>, ConfigError> {
        let upstream = self.upstream_connection_string()?;
        let key = "proxy.member_base_port";
        if base == 0 {
            return Err(ConfigError::key(key, "must be between 1 and 65535"));
        }
        let last = usize::from(base) + upstream.hosts.len() - 1;
        if last > usize::from(u16::MAX) {
            return Err(ConfigError::key(
                key,
                format!(
                    "{base} + {} upstream hosts runs past port 65535",
                    upstream.hosts.len()
                ),
            ));
        }
        let (listen_host, _) = self
            .listen
            .rsplit_once(':')
            .ok_or_else(|| ConfigError::key("proxy.listen", "is not HOST:PORT"))?;
        if self.advertise_host.is_none() && is_wildcard_host(listen_host) {
            return Err(ConfigError::key(
                "proxy.advertise_host",
                format!(
                    "required with proxy.member_base_port when proxy.listen binds the wildcard `{listen_host}`: \
                     drivers must be told an address they can dial"
                ),
            ));
        }
        let advertise_host = self.advertise_host.as_deref().unwrap_or(listen_host);
        Ok(upstream
            .hosts
            .iter()
            .zip(base..)
            .map(|(host, port)| ListenerPlan {
                upstream: host.clone(),
                listen: format!("{listen_host}:{port}"),
                advertise: Some(format!("{advertise_host}:{port}")),
            })
            .collect())
    }
}

impl MemberConfig {
    fn plan(&self, index: usize) -> Result<ListenerPlan, ConfigError> {
        let key = |field: &str| format!("members[{index}].{field}");
        validate_host_port(&key("upstream"), &self.upstream)?;
        let upstream = ConnectionString::parse(&format!("mongodb://{}", self.upstream))
            .map_err(|e| ConfigError::key(key("upstream"), e))?
            .hosts
            .remove(0);
        validate_host_port(&key("listen"), &self.listen)?;
        match &self.advertise {
            Some(advertise) => {
                validate_host_port(&key("advertise"), advertise)?;
                let (host, port) = advertise.rsplit_once(':').unwrap_or((advertise, ""));
                if port == "0" {
                    return Err(ConfigError::key(
                        key("advertise"),
                        "port 0 cannot be dialed; give the real port",
                    ));
                }
                if is_wildcard_host(host) {
                    return Err(ConfigError::key(
                        key("advertise"),
                        format!("`{host}` is a wildcard address; drivers cannot dial it"),
                    ));
                }
            }
            None => {
                let (host, _) = self.listen.rsplit_once(':').unwrap_or((&self.listen, ""));
                if is_wildcard_host(host) {
                    return Err(ConfigError::key(
                        key("advertise"),
                        format!(
                            "required when listen binds the wildcard `{host}`: drivers must be \
                             told an address they can dial (e.g. proxy-host:27018)"
                        ),
                    ));
                }
            }
        }
        Ok(ListenerPlan {
            upstream,
            listen: self.listen.clone(),
            advertise: self.advertise.clone(),
        })
    }
}

/// The key an error about member `index` names: the `[[members]]` entry,
/// or `proxy.member_base_port` for generated members.
fn member_key(config: &ProxyConfig, index: usize, field: &str) -> String {
    if config.member_base_port.is_some() {
        "proxy.member_base_port".to_string()
    } else {
        format!("members[{index}].{field}")
    }
}

/// `0.0.0.0`, `::` and `[::]` bind every interface but name none.
fn is_wildcard_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
}

impl ProxyConfig {
    /// The parsed `upstream` connection string.
    pub fn upstream_connection_string(&self) -> Result<ConnectionString, ConfigError> {
        ConnectionString::parse(&self.upstream).map_err(|e| ConfigError::key("proxy.upstream", e))
    }

    /// What each listener dials, binds and advertises (the readiness probe
    /// dials the same upstreams).
    pub fn listener_plan(&self) -> Result<Vec<ListenerPlan>, ConfigError> {
        Ok(sessionguard_proxy::listener_plan(
            &self.listen,
            &self.upstream_connection_string()?,
            self.member_plan()?,
        ))
    }

    /// The data path's settings: validated, with the TLS files read (a bad
    /// one is a configuration error naming its key, reported before any port
    /// is bound).
    pub fn settings(&self) -> Result<ProxySettings, ConfigError> {
        self.validate()?;
        let upstream = self.upstream_connection_string()?;
        let upstream_tls = UpstreamTls::from_connection_string(&upstream)
            .map_err(|e| ConfigError::key("proxy.upstream", e))?;
        let listen_tls = self.tls.as_ref().map(ListenTls::load).transpose()?;
        Ok(ProxySettings {
            listen: self.listen.clone(),
            members: self.member_plan()?,
            upstream,
            upstream_tls,
            listen_tls,
            max_connections: self.max_connections,
            max_message_size: self.max_message_size,
            connect_timeout: self.connect_timeout,
            drain_grace: self.drain_grace,
            frame_read_timeout: self.frame_read_timeout,
            inject_timeout: self.inject_timeout,
            clients_connect_directly: self.clients_connect_directly,
            io: self.io,
        })
    }
}

/// `[log]`: output format, verbosity, and how often a finding's repeated
/// violations are summarised.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or directives (`sessionguard=debug,info`).
    pub level: String,
    /// A finding's first violation is logged in full; later ones in at most
    /// one summary line per this interval (count since the last line, total).
    #[serde(with = "humantime_serde")]
    pub finding_interval: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: DEFAULT_LOG_LEVEL.to_string(),
            finding_interval: sessionguard_engine::DEFAULT_FINDING_INTERVAL,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.finding_interval.is_zero() {
            return Err(ConfigError::key(
                "log.finding_interval",
                "must be greater than 0",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map(|_| ())
            .map_err(|e| {
                ConfigError::key("log.level", format!("invalid filter `{}`: {e}", self.level))
            })
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Values from CLI flags or `SESSIONGUARD_*` environment variables; `None`
/// leaves the file's (or default) value in place.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    /// `--mode` / `SESSIONGUARD_MODE`: replaces `sessions.mode`, also on
    /// every reload (the flag pins the mode; the file's is ignored).
    pub mode: Option<Mode>,
}

/// A humantime duration given on the command line ("500ms", "5s"), as the
/// config file's durations are written; the error quotes the value.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("`{value}`: {e}"))
}

impl Overrides {
    /// Whether this override replaces the value of dotted `key`.
    pub fn sets(&self, key: &str) -> bool {
        match key {
            "proxy.listen" => self.listen.is_some(),
            "proxy.upstream" => self.upstream.is_some(),
            "proxy.admin" => self.admin.is_some(),
            "log.format" => self.log_format.is_some(),
            "log.level" => self.log_level.is_some(),
            "sessions.mode" => self.mode.is_some(),
            _ => false,
        }
    }
}

/// A configuration problem. `key` is the dotted key (`proxy.max_connections`)
/// when known; `source` is the file when the problem came from one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: Option<String>,
    pub key: Option<String>,
    pub problem: String,
}

impl ConfigError {
    pub fn key(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            source: None,
            key: Some(key.into()),
            problem: problem.into(),
        }
    }

    fn in_file(mut self, path: &Path) -> ConfigError {
        self.source = Some(path.display().to_string());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(source) = &self.source {
            write!(f, "{source}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.problem)
    }
}

impl std::error::Error for ConfigError {}

impl From<ListenTlsError> for ConfigError {
    fn from(e: ListenTlsError) -> ConfigError {
        ConfigError::key(e.key, e.problem)
    }
}

impl Config {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Config::resolve(Some(path.as_ref()), &Overrides::default())
    }

    /// Parses TOML text (no validation beyond types and unknown keys).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config = toml::from_str::<Config>(text).map_err(|e| toml_error(text, &e))?;
        if !config.members.is_empty() {
            if !config.proxy.members.is_empty() {
                return Err(ConfigError::key(
                    "members",
                    "given both as [[members]] and [[proxy.members]]; use one",
                ));
            }
            config.proxy.members = std::mem::take(&mut config.members);
        }
        Ok(config)
    }

    /// Checks every table; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy.validate()?;
        self.log.validate()?;
        self.sessions.validate().map_err(split_key_message)?;
        self.rules.validate().map_err(split_key_message)?;
        self.stores.validate().map_err(split_key_message)?;
        Ok(())
    }

    /// Loads `path` (or starts from defaults), applies `overrides`, validates.
    pub fn resolve(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::resolve_file(path, overrides).map(|(config, _)| config)
    }

    /// `resolve`, also handing back the file's text as it was read (a
    /// reload fingerprints exactly what it applied).
    pub fn resolve_file(
        path: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<(Config, Option<String>), ConfigError> {
        let mut text = None;
        let mut config = match path {
            Some(path) => {
                let read = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError {
                        source: None,
                        key: None,
                        problem: format!("cannot read config file: {e}"),
                    }
                    .in_file(path)
                })?;
                let parsed = Config::parse(&read).map_err(|e| e.in_file(path))?;
                text = Some(read);
                parsed
            }
            None => Config::default(),
        };
        config.apply(overrides);
        config.validate().map_err(|e| match path {
            // Blame the file only for values the file actually set.
            Some(path) if !e.key.as_deref().is_some_and(|k| overrides.sets(k)) => e.in_file(path),
            _ => e,
        })?;
        Ok((config, text))
    }

    /// Puts every `Some` override over the current value.
    pub fn apply(&mut self, overrides: &Overrides) {
        if let Some(listen) = &overrides.listen {
            self.proxy.listen = listen.clone();
        }
        if let Some(upstream) = &overrides.upstream {
            self.proxy.upstream = upstream.clone();
        }
        if let Some(admin) = &overrides.admin {
            self.proxy.admin = admin.clone();
        }
        if let Some(format) = overrides.log_format {
            self.log.format = format;
        }
        if let Some(level) = &overrides.log_level {
            self.log.level = level.clone();
        }
        if let Some(mode) = overrides.mode {
            self.sessions.mode = mode;
        }
    }
}

/// The session engine reports `"key: problem"`; keep the key separate when
/// it is there so messages read the same as ours.
fn split_key_message(message: String) -> ConfigError {
    match message.split_once(": ") {
        Some((key, problem)) if !key.contains(' ') && !key.is_empty() => {
            ConfigError::key(key, problem)
        }
        _ => ConfigError {
            source: None,
            key: None,
            problem: message,
        },
    }
}

fn validate_host_port(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(ConfigError::key(
            key,
            format!("`{value}` is not HOST:PORT (e.g. 127.0.0.1:27018)"),
        ));
    };
    if host.is_empty() || host.contains(':') || host.contains('[') {
        return Err(ConfigError::key(
            key,
            format!("`{value}` is not HOST:PORT (IPv6 addresses go in brackets: [::1]:27018)"),
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(ConfigError::key(
            key,
            format!("`{value}`: port `{port}` is not a number between 0 and 65535"),
        ));
    }
    Ok(())
}

/// Turns a TOML error into "table.key: problem". toml reports a byte span;
/// the key is recovered from the line it points at and the table header
/// above it, because serde's messages alone ("invalid type: ...") do not say
/// which key was wrong.
fn toml_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let problem = err.message().trim().to_string();
    let Some(span) = err.span() else {
        return ConfigError {
            source: None,
            key: None,
            problem,
        };
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[line_start..line_end].trim();
    let line_no = text[..line_start].matches('\n').count() + 1;

    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|header| {
            header
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string()
        });

    let key = if line.starts_with('[') {
        // The error is about the table itself (e.g. an unknown table).
        Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        )
    } else {
        line.split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_string())
            .filter(|k| !k.is_empty())
            .map(|k| match &table {
                Some(t) => format!("{t}.{k}"),
                None => k,
            })
    };
    ConfigError {
        source: None,
        key,
        problem: format!("{problem} (line {line_no})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../config/sessionguard.toml");

    fn parse_err(text: &str) -> ConfigError {
        match Config::parse(text) {
            Err(e) => e,
            Ok(c) => c.validate().expect_err(text),
        }
    }

    #[test]
    fn defaults_are_the_documented_constants_and_valid() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.proxy, ProxyConfig::default());
        assert_eq!(config.proxy.listen, "127.0.0.1:27018");
        assert_eq!(config.proxy.upstream, "mongodb://127.0.0.1:27017");
        assert_eq!(config.proxy.admin, "127.0.0.1:9216");
        assert_eq!(config.proxy.max_connections, 10_000);
        assert_eq!(config.proxy.max_message_size, 48_000_000);
        assert_eq!(config.proxy.connect_timeout, Duration::from_secs(5));
        assert_eq!(config.proxy.drain_grace, Duration::from_secs(30));
        assert_eq!(config.proxy.frame_read_timeout, Duration::from_secs(60));
        assert_eq!(config.log.format, LogFormat::Pretty);
        config.validate().unwrap();
    }

    #[test]
    fn admin_token_never_shows_in_debug_or_rendered_config() {
        let config = Config::parse("[proxy]\nadmin_token = \"s3cret-s3cret-s3cret\"\n").unwrap();
        config.validate().unwrap();
        let token = config.proxy.admin_token.as_ref().unwrap();
        assert_eq!(token.expose(), "s3cret-s3cret-s3cret");
        assert!(!format!("{config:?}").contains("s3cret"));
        let rendered = toml::to_string(&config.proxy).unwrap();
        assert!(!rendered.contains("s3cret"), "{rendered}");
        assert!(
            rendered.contains("admin_token = \"<redacted>\""),
            "{rendered}"
        );
    }

    #[test]
    fn example_file_parses_validates_and_matches_defaults() {
        let config = Config::parse(EXAMPLE).unwrap();
        config.validate().unwrap();
        // Every key in the example is commented out: it documents defaults.
        assert_eq!(config.proxy, ProxyConfig::default());
        assert_eq!(config.log, LogConfig::default());
    }

    #[test]
    fn example_file_documents_every_proxy_and_log_key() {
        let proxy = toml::to_string(&ProxyConfig::default()).unwrap();
        let log = toml::to_string(&LogConfig::default()).unwrap();
        for line in proxy.lines().chain(log.lines()) {
            let key = line.split('=').next().unwrap().trim();
            let documented = EXAMPLE.lines().any(|l| {
                l.trim_start_matches('#')
                    .trim_start()
                    .starts_with(&format!("{key} ="))
            });
            assert!(
                documented,
                "config/sessionguard.toml does not document `{key}`"
            );
        }
    }

    #[test]
    fn example_values_uncommented_equal_defaults() {
        // Uncomment the `key = value` lines of [proxy] and [log]: the
        // documented values must be the real defaults.
        let mut uncommented = String::new();
        let mut table = String::new();
        for line in EXAMPLE.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('[') {
                table = trimmed.to_string();
                uncommented.push_str(trimmed);
                uncommented.push('\n');
            } else if (table == "[proxy]" || table == "[log]") && trimmed.starts_with("# ") {
                let body = &trimmed[2..];
                if let Some((k, _)) = body.split_once(" = ") {
                    if !k.contains(' ') {
                        uncommented.push_str(body);
                        uncommented.push('\n');
                    }
                }
            }
        }
        let config = Config::parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(config.proxy, ProxyConfig::default(), "{uncommented}");
        assert_eq!(config.log, LogConfig::default());
    }

    #[test]
    fn the_io_driver_is_a_word_and_a_wrong_one_names_the_choices() {
        let config = Config::parse("[proxy]\nio = \"epoll\"\n").unwrap();
        assert_eq!(config.proxy.io, IoMode::Epoll);
        let config = Config::parse("[proxy]\nio = \"io_uring\"\n").unwrap();
        assert_eq!(config.proxy.io, IoMode::IoUring);
        let err = Config::parse("[proxy]\nio = \"uring\"\n").unwrap_err();
        assert!(err.to_string().contains("io_uring"), "{err}");
    }

    #[test]
    fn durations_are_humantime() {
        let config = Config::parse(
            "[proxy]\nconnect_timeout = \"250ms\"\ndrain_grace = \"2m\"\nframe_read_timeout = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(config.proxy.connect_timeout, Duration::from_millis(250));
        assert_eq!(config.proxy.drain_grace, Duration::from_secs(120));
        assert_eq!(config.proxy.frame_read_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn every_validation_error_names_its_key() {
        let cases = [
            (
                "[proxy]\nmax_connections = 0",
                "proxy.max_connections: must be at least 1",
            ),
            (
                "[proxy]\nmax_message_size = 1023",
                "proxy.max_message_size: must be at least 1024",
            ),
            (
                "[proxy]\nmax_message_size = 3000000000",
                "proxy.max_message_size: must be at most",
            ),
            (
                "[proxy]\nconnect_timeout = \"0s\"",
                "proxy.connect_timeout: must be greater than 0",
            ),
            (
                "[proxy]\nframe_read_timeout = \"0s\"",
                "proxy.frame_read_timeout: must be greater",
            ),
            (
                "[proxy]\ninject_timeout = \"0s\"",
                "proxy.inject_timeout: must be greater",
            ),
            (
                "[proxy]\nlisten = \"nonsense\"",
                "proxy.listen: `nonsense` is not HOST:PORT",
            ),
            (
                "[proxy]\nlisten = \"h:99999\"",
                "proxy.listen: `h:99999`: port",
            ),
            ("[proxy]\nadmin = \"::1:80\"", "proxy.admin:"),
            (
                "[proxy]\nadmin_token = \"short\"",
                "proxy.admin_token: must be at least 16",
            ),
            (
                "[proxy]\nadmin_token = \"has a space in the token\"",
                "proxy.admin_token: must be visible ASCII",
            ),
            (
                "[proxy]\nupstream_probe_interval = \"0s\"",
                "proxy.upstream_probe_interval: must be greater",
            ),
            (
                "[proxy]\nupstream = \"mongodb+srv://x\"",
                "proxy.upstream: mongodb+srv:// connection strings are not supported yet",
            ),
            (
                "[proxy]\nupstream = \"127.0.0.1:27017\"",
                "proxy.upstream: must start with mongodb://",
            ),
            (
                "[proxy]\nupstream = \"mongodb://h/?tlsCAFile=ca.pem\"",
                "proxy.upstream: TLS options are set but TLS is not enabled",
            ),
            (
                "[proxy.tls]\ncert_file = \"c.pem\"",
                "proxy.tls: missing field `key_file`",
            ),
            (
                "[proxy.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nrequire_client_cert = true",
                "proxy.tls.require_client_cert: needs proxy.tls.client_ca_file",
            ),
            (
                "[proxy.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nhandshake_timeout = \"0s\"",
                "proxy.tls.handshake_timeout: must be greater than 0",
            ),
            ("[log]\nlevel = \"=[\"", "log.level: invalid filter"),
            (
                "[log]\nfinding_interval = \"0s\"",
                "log.finding_interval: must be greater than 0",
            ),
            // Parse-time errors: unknown keys and wrong types name the key too.
            (
                "[proxy]\nmax_conections = 5",
                "proxy.max_conections: unknown field `max_conections`",
            ),
            (
                "[proxy]\nmax_connections = \"many\"",
                "proxy.max_connections: invalid type",
            ),
            ("[proxy]\ndrain_grace = \"soon\"", "proxy.drain_grace:"),
            (
                "[log]\nformat = \"xml\"",
                "log.format: unknown variant `xml`",
            ),
            ("[nonsense]\nx = 1", "nonsense: unknown field `nonsense`"),
        ];
        for (text, expected) in cases {
            let err = parse_err(text).to_string();
            assert!(
                err.starts_with(expected),
                "for {text:?}\n got: {err}\nwant: {expected}"
            );
        }
    }

    #[test]
    fn overrides_win_over_file_and_file_over_defaults() {
        let mut config =
            Config::parse("[proxy]\nlisten = \"127.0.0.1:1111\"\nadmin = \"127.0.0.1:2222\"\n[log]\nlevel = \"debug\"\n")
                .unwrap();
        config.apply(&Overrides {
            listen: Some("127.0.0.1:3333".into()),
            upstream: None,
            admin: None,
            log_format: Some(LogFormat::Json),
            log_level: None,
            mode: Some(Mode::Enforce),
        });
        assert_eq!(config.proxy.listen, "127.0.0.1:3333", "override beats file");
        assert_eq!(config.proxy.admin, "127.0.0.1:2222", "file beats default");
        assert_eq!(
            config.proxy.upstream, DEFAULT_UPSTREAM,
            "default when neither"
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.sessions.mode, Mode::Enforce);
        let mut config = Config::parse("[sessions]\nmode = \"enforce\"\n").unwrap();
        config.apply(&Overrides {
            mode: Some(Mode::Observe),
            ..Overrides::default()
        });
        assert_eq!(
            config.sessions.mode,
            Mode::Observe,
            "the override beats the file"
        );
    }

    #[test]
    fn resolve_validates_overrides_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[proxy]\nmax_connections = 0\n").unwrap();
        let err = Config::resolve(Some(&path), &Overrides::default()).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("proxy.max_connections"));
        assert!(err.to_string().contains("bad.toml"), "{err}");

        std::fs::write(&path, "[proxy]\nmax_connections = 5\n").unwrap();
        let err = Config::resolve(
            Some(&path),
            &Overrides {
                upstream: Some("mongodb://[::1".into()),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        // ...and a bad override is not blamed on the file.
        assert_eq!(err.key.as_deref(), Some("proxy.upstream"));
        assert!(!err.to_string().contains("bad.toml"), "{err}");

        let missing = dir.path().join("missing.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");
    }

    #[test]
    fn session_engine_errors_keep_their_key() {
        let err = split_key_message("sessions.max_sessions: must be at least 1".into());
        assert_eq!(err.key.as_deref(), Some("sessions.max_sessions"));
        assert_eq!(err.to_string(), "sessions.max_sessions: must be at least 1");
        let err = split_key_message("something odd happened".into());
        assert_eq!(err.to_string(), "something odd happened");
    }

    // replset tests begin
    #[test]
    fn members_table_maps_each_member_to_a_listener() {
        let config = Config::parse(
            "[proxy]\nupstream = \"mongodb://a:27017,b:27017/?replicaSet=rs0\"\n\
             [[members]]\nupstream = \"a:27017\"\nlisten = \"0.0.0.0:27018\"\nadvertise = \"proxy-host:27018\"\n\
             [[members]]\nupstream = \"b:27017\"\nlisten = \"127.0.0.1:27019\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        let plan = config.proxy.member_plan().unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].upstream.to_string(), "a:27017");
        assert_eq!(plan[0].listen, "0.0.0.0:27018");
        assert_eq!(plan[0].advertise.as_deref(), Some("proxy-host:27018"));
        assert_eq!(plan[1].advertise, None, "defaults to listen");
        // The effective config renders as [[proxy.members]], which parses back.
        let rendered = toml::to_string(&config.proxy).unwrap();
        let back: ProxyConfig = toml::from_str(&rendered).unwrap();
        assert_eq!(back, config.proxy);
    }

    #[test]
    fn member_base_port_assigns_consecutive_ports_in_host_order() {
        let config = Config::parse(
            "[proxy]\nlisten = \"10.0.0.5:27018\"\nmember_base_port = 28000\n\
             upstream = \"mongodb://c:1,a:2,b:3/?replicaSet=rs0\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        let plan = config.proxy.member_plan().unwrap();
        let got: Vec<_> = plan
            .iter()
            .map(|m| {
                (
                    m.upstream.to_string(),
                    m.listen.as_str(),
                    m.advertise.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("c:1".to_string(), "10.0.0.5:28000", Some("10.0.0.5:28000")),
                ("a:2".to_string(), "10.0.0.5:28001", Some("10.0.0.5:28001")),
                ("b:3".to_string(), "10.0.0.5:28002", Some("10.0.0.5:28002")),
            ]
        );
        let wildcard = Config::parse(
            "[proxy]\nlisten = \"0.0.0.0:27018\"\nmember_base_port = 28000\n\
             advertise_host = \"proxy.example\"\nupstream = \"mongodb://a,b\"\n",
        )
        .unwrap();
        let plan = wildcard.proxy.member_plan().unwrap();
        assert_eq!(plan[1].listen, "0.0.0.0:28001");
        assert_eq!(plan[1].advertise.as_deref(), Some("proxy.example:28001"));
    }

    #[test]
    fn member_errors_name_their_key() {
        let member = |body: &str| format!("[[members]]\nupstream = \"a:27017\"\n{body}");
        let cases = [
            (member("listen = \"nonsense\"\n"), "members[0].listen: `nonsense` is not HOST:PORT"),
            (member("listen = \"0.0.0.0:27018\"\n"), "members[0].advertise: required when listen binds the wildcard"),
            (member("listen = \"127.0.0.1:27018\"\nadvertise = \"h:0\"\n"), "members[0].advertise: port 0"),
            (member("listen = \"127.0.0.1:27018\"\nadvertise = \"0.0.0.0:1\"\n"), "members[0].advertise: `0.0.0.0` is a wildcard"),
            ("[[members]]\nupstream = \"a\"\nlisten = \"127.0.0.1:1\"\n".to_string(), "members[0].upstream: `a` is not HOST:PORT"),
            (format!("{}{}", member("listen = \"127.0.0.1:1\"\n"), member("listen = \"127.0.0.1:2\"\n")), "members[1].upstream: `a:27017` is mapped twice"),
            (
                "[[members]]\nupstream = \"a:1\"\nlisten = \"127.0.0.1:5\"\n[[members]]\nupstream = \"b:1\"\nlisten = \"127.0.0.1:5\"\n".to_string(),
                "members[1].listen: `127.0.0.1:5` is used by two members",
            ),
            (member("lisen = \"x:1\"\n"), "members.lisen: unknown field"),
            (
                format!("[proxy]\nmember_base_port = 28000\n{}", member("listen = \"127.0.0.1:1\"\n")),
                "proxy.member_base_port: cannot be combined with [[members]]",
            ),
            ("[proxy]\nmember_base_port = 0\n".to_string(), "proxy.member_base_port: must be between 1"),
            (
                "[proxy]\nmember_base_port = 65535\nupstream = \"mongodb://a,b\"\n".to_string(),
                "proxy.member_base_port: 65535 + 2 upstream hosts runs past port 65535",
            ),
            (
                "[proxy]\nmember_base_port = 28000\nlisten = \"0.0.0.0:1\"\n".to_string(),
                "proxy.advertise_host: required with proxy.member_base_port",
            ),
            ("[proxy]\nadvertise_host = \"h\"\n".to_string(), "proxy.advertise_host: is only used with"),
            (
                "[proxy]\n[[proxy.members]]\nupstream = \"a:1\"\nlisten = \"127.0.0.1:1\"\n[[members]]\nupstream = \"b:1\"\nlisten = \"127.0.0.1:2\"\n".to_string(),
                "members: given both as [[members]] and [[proxy.members]]",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_err(&text).to_string();
            assert!(
                err.starts_with(expected),
                "for {text:?}\n got: {err}\nwant: {expected}"
            );
        }
    }
    // replset tests end
}
