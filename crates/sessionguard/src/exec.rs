//! CI mode, `sessionguard exec [OPTIONS] -- CMD ARGS...`: runs one program
//! (typically a test suite) with its MongoDB connection string pointed at a
//! private proxy on an ephemeral loopback port, then reports the session
//! misuse seen while it ran and turns it into an exit code.
//!
//! It owns the child process (spawn, signal forwarding, exit status), the
//! rewriting of the upstream connection string into one that reaches the
//! proxy, and the order of a run: configuration checked before anything
//! starts (exit 64), proxy and session engine started, child run to the
//! end, in-flight traffic drained, summary printed, reports written. It does
//! not inspect traffic itself (the session engine does) nor decide pass or
//! fail (the report's policy does), and it never prints the connection
//! string it hands to the child (it may hold credentials).
//!
//! It also runs the marks endpoint (`crate::marks`, URL in
//! `SESSIONGUARD_MARKS_URL` for the child) and records who opened each
//! connection and when each request came (`EngineInspector::with_attribution`),
//! so the report can name the test and process behind each finding; the
//! attribution itself is done at report time, once the child is gone and
//! every mark is in (`crate::attribution`).
// `exec` is a command-line mode: its errors and summary go to the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::attribution::Intervals;
use crate::config::{Config, LogFormat, Overrides, ProxyConfig};
use crate::inspector::{Attribution, EngineInspector};
use crate::marks::{MarksServer, MARKS_ENV_VAR};
use crate::metrics::Metrics;
use crate::refresher::spawn_refresher;
use crate::report::{self, AttributionInput, ChildOutcome, FailOn, MarksSummary, Report, RunInfo};
use crate::start::start_proxy;
use sessionguard_engine::ResolvedRules;
use sessionguard_engine::SessionEngine;
use sessionguard_proxy::ConnectionString;

/// Environment variable set for the child when no `--env-var` is given.
pub(crate) const DEFAULT_ENV_VAR: &str = "MONGODB_URI";
/// Exec logs only warnings by default: the child's own output matters more.
pub(crate) const DEFAULT_EXEC_LOG_LEVEL: &str = "warn";
/// Once the child has exited, how long the proxy may take to see its
/// connections close, and then how long connections still open (something
/// the child left running) may take to finish their replies before they are
/// closed (the latter capped by `proxy.drain_grace`).
pub(crate) const SETTLE_GRACE: Duration = Duration::from_secs(2);

/// Usage error or bad configuration (sysexits EX_USAGE).
pub(crate) const EXIT_USAGE: u8 = 64;
/// The proxy could not start, or a report could not be written.
pub const EXIT_FAILURE: u8 = 1;
/// The command exists but cannot be executed (as shells report it).
pub(crate) const EXIT_NOT_EXECUTABLE: u8 = 126;
/// The command cannot be found or started (as shells report it).
pub(crate) const EXIT_NOT_FOUND: u8 = 127;

/// Flags of `sessionguard exec`.
// The field docs are the flags' help text: `[sessions]` there names a TOML
// table, not an item to link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// TOML configuration file ([sessions], [rules], [proxy] limits); its
    /// listen address, TLS and member mapping are ignored: exec always uses
    /// 127.0.0.1 on a free port.
    #[arg(long, env = "SESSIONGUARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// MongoDB connection string of the deployment the command should reach
    /// [default: mongodb://127.0.0.1:27017].
    #[arg(long, env = "SESSIONGUARD_UPSTREAM", value_name = "URI")]
    pub upstream: Option<String>,
    /// Environment variable to set to the proxied connection string
    /// (repeatable) [default: MONGODB_URI].
    #[arg(long = "env-var", value_name = "NAME")]
    pub env_vars: Vec<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// Write a JUnit XML report here (one test case per test that caused a
    /// finding, one per finding, one per rule that found nothing).
    #[arg(long, value_name = "FILE.xml")]
    pub junit: Option<PathBuf>,
    /// Lowest violation severity that fails the run (exit 3).
    #[arg(
        long,
        value_enum,
        env = "SESSIONGUARD_FAIL_ON",
        default_value = "error"
    )]
    pub fail_on: FailOn,
    /// Log format [default: pretty].
    #[arg(long, env = "SESSIONGUARD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter: a level or tracing directives [default: warn].
    #[arg(long, env = "SESSIONGUARD_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// observe: report misuse; enforce: also answer requests that break an
    /// error-severity rule with an error, so the suite fails where the
    /// misuse is. Overrides [sessions] mode [default: the file's, else observe].
    #[arg(long, env = "SESSIONGUARD_MODE", value_enum)]
    pub mode: Option<sessionguard_engine::Mode>,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Everything checked before any side effect.
#[derive(Debug)]
struct Plan {
    config: Config,
    proxy_uri: ProxyUri,
    env_vars: Vec<String>,
    report: Option<PathBuf>,
    junit: Option<PathBuf>,
    fail_on: FailOn,
    command: Vec<OsString>,
}

/// Runs `sessionguard exec`; returns the process exit code.
pub fn main(args: ExecArgs) -> ExitCode {
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("sessionguard exec: error: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = crate::telemetry::init(&plan.config.log) {
        eprintln!("sessionguard exec: error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sessionguard exec: error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let code = runtime.block_on(run(plan));
    // Connections still winding down must not delay the exit.
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::from(code)
}

fn plan(args: ExecArgs) -> Result<Plan, String> {
    let overrides = Overrides {
        // The proxy is private to the child: loopback, a free port.
        listen: Some("127.0.0.1:0".to_string()),
        upstream: args.upstream,
        admin: None,
        log_format: args.log_format,
        log_level: Some(
            args.log_level
                .unwrap_or_else(|| DEFAULT_EXEC_LOG_LEVEL.to_string()),
        ),
        mode: args.mode,
    };
    let mut config =
        Config::resolve(args.config.as_deref(), &overrides).map_err(|e| e.to_string())?;
    config.proxy.drain_grace = config.proxy.drain_grace.min(SETTLE_GRACE);
    // The child reaches the proxy on loopback in plain TCP through the one
    // listener above; a shared config file's `[proxy.tls]` and member
    // mapping (`[[members]]`, `member_base_port`, `advertise_host`) are for
    // the long-running proxy and would otherwise bind its (possibly public)
    // ports. The child connects directly, so it needs no member mapping.
    config.proxy.tls = None;
    config.proxy.members.clear();
    config.proxy.member_base_port = None;
    config.proxy.advertise_host = None;
    let proxy_uri = ProxyUri::from_upstream(&config.proxy.upstream)
        .map_err(|e| format!("proxy.upstream: {e}"))?;

    let env_vars = if args.env_vars.is_empty() {
        vec![DEFAULT_ENV_VAR.to_string()]
    } else {
        args.env_vars
    };
    for name in &env_vars {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(format!(
                "--env-var `{name}`: not a valid environment variable name"
            ));
        }
    }
    for (flag, path) in [("--report", &args.report), ("--junit", &args.junit)] {
        if let Some(path) = path {
            report::check_output_path(path)
                .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
        }
    }
    if args
        .command
        .first()
        .is_none_or(|program| program.is_empty())
    {
        return Err("no command given after `--`".to_string());
    }
    Ok(Plan {
        config,
        proxy_uri,
        env_vars,
        report: args.report,
        junit: args.junit,
        fail_on: args.fail_on,
        command: args.command,
    })
}

async fn run(plan: Plan) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};

    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("sessionguard exec: error: cannot install signal handlers: {e}");
            return EXIT_FAILURE;
        }
    };

    let started = SystemTime::now();
    let rules = ResolvedRules::resolve(plan.config.sessions.mode, &plan.config.rules);
    let engine = Arc::new(
        SessionEngine::new(&plan.config.sessions, &plan.config.rules)
            .with_stores(&plan.config.stores)
            .with_finding_interval(plan.config.log.finding_interval),
    );
    let attribution = Attribution::default();
    let inspector =
        Arc::new(EngineInspector::new(engine.clone()).with_attribution(attribution.clone()));
    let marks = match MarksServer::start().await {
        Ok(marks) => marks,
        Err(e) => {
            eprintln!("sessionguard exec: error: cannot start the marks endpoint: {e}");
            return EXIT_FAILURE;
        }
    };
    let refresher = spawn_refresher(&inspector);
    let proxy_config = ProxyConfig {
        clients_connect_directly: true,
        ..plan.config.proxy.clone()
    };
    // Nothing reads the metrics of a private proxy.
    let proxy = match start_proxy(&proxy_config, inspector, &Metrics::new()).await {
        Ok(proxy) => proxy,
        Err(e) => {
            eprintln!("sessionguard exec: error: cannot start the proxy: {e}");
            refresher.abort();
            marks.stop().await;
            return EXIT_FAILURE;
        }
    };
    let uri = plan.proxy_uri.with_address(&proxy.local_addr().to_string());
    tracing::info!(
        listen = %proxy.local_addr(),
        upstream = %plan.proxy_uri.upstream_hosts,
        env = ?plan.env_vars,
        "sessionguard exec: proxy ready, starting the command"
    );

    let program = plan.command[0].clone();
    let mut command = tokio::process::Command::new(&program);
    command.args(&plan.command[1..]);
    for name in &plan.env_vars {
        command.env(name, &uri);
    }
    command.env(MARKS_ENV_VAR, marks.url());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "sessionguard exec: cannot run `{}`: {e}",
                program.to_string_lossy()
            );
            proxy.shutdown_now();
            proxy.wait().await;
            refresher.abort();
            marks.stop().await;
            return if e.kind() == std::io::ErrorKind::PermissionDenied {
                EXIT_NOT_EXECUTABLE
            } else {
                EXIT_NOT_FOUND
            };
        }
    };

    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = sigterm.recv() => forward_signal(child.id(), rustix::process::Signal::TERM),
            _ = sigint.recv() => forward_signal(child.id(), rustix::process::Signal::INT),
        }
    };
    let child_code = match status {
        Ok(status) => shell_exit_code(status),
        Err(e) => {
            eprintln!("sessionguard exec: error: cannot wait for the command: {e}");
            i32::from(EXIT_FAILURE)
        }
    };

    // The child is gone, so the kernel has closed its sockets: let the
    // proxy see those closes before draining. A drain stops reading
    // clients, so a close it overtook would be judged a drain and a
    // request the child abandoned would go unreported. A connection still
    // open after SETTLE_GRACE belongs to something the child left running.
    let _ = tokio::time::timeout(SETTLE_GRACE, proxy.no_connections()).await;
    proxy.drain();
    let grace = plan.config.proxy.drain_grace + Duration::from_secs(1);
    if tokio::time::timeout(grace, proxy.wait()).await.is_err() {
        tracing::warn!("connections still open after the drain grace; reporting anyway");
    }
    refresher.abort();
    engine.sweep();
    engine.flush_finding_summaries();

    // Every client awaited its last 204 before its process ended, so every
    // mark is in; owner lookups still running finish within their /proc scan.
    let store = marks.store.clone();
    marks.stop().await;
    if tokio::time::timeout(SETTLE_GRACE, attribution.processes.lookups_done())
        .await
        .is_err()
    {
        tracing::warn!("process lookups still running; their connections are reported as unknown");
    }
    let mut report = Report::from_engine(
        RunInfo {
            started,
            finished: SystemTime::now(),
            upstream: plan.proxy_uri.upstream_hosts.clone(),
            child: Some(ChildOutcome {
                program: program.to_string_lossy().into_owned(),
                exit_code: child_code,
            }),
            fail_on: plan.fail_on,
        },
        &engine,
        &rules,
    );
    let received = store.snapshot();
    let intervals = Intervals::from_marks(&received);
    report.attribute(AttributionInput {
        intervals: &intervals,
        owners: &attribution.processes.snapshot(),
        times: &attribution.times,
        marks: MarksSummary::of(&received, store.dropped(), store.rejected()),
    });
    eprint!("{}", report.to_text(&rules));

    let mut write_failed = false;
    if let Some(path) = &plan.report {
        if let Err(e) = report.write_json(path) {
            eprintln!(
                "sessionguard exec: error: cannot write the report {}: {e}",
                path.display()
            );
            write_failed = true;
        }
    }
    if let Some(path) = &plan.junit {
        if let Err(e) = report.write_junit(path, &rules) {
            eprintln!(
                "sessionguard exec: error: cannot write the JUnit report {}: {e}",
                path.display()
            );
            write_failed = true;
        }
    }
    match report::exit_code(Some(child_code), &report) {
        // A missing report must not pass silently.
        0 if write_failed => EXIT_FAILURE,
        code => code,
    }
}

fn forward_signal(pid: Option<u32>, signal: rustix::process::Signal) {
    let Some(pid) = pid
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return; // Already reaped: nothing to forward to.
    };
    if let Err(e) = rustix::process::kill_process(pid, signal) {
        tracing::warn!(error = %e, "cannot forward the signal to the command");
    }
}

/// The code a shell would report: the exit code, or 128 + the signal number.
fn shell_exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(i32::from(EXIT_FAILURE))
}

/// The upstream connection string taken apart so the proxy's address can
/// replace its host list while everything else is kept as written.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ProxyUri {
    /// `user:pass@` exactly as written (percent-encoding kept), or empty.
    userinfo: String,
    /// `/db` as written, or empty.
    path: String,
    /// `key=value` pairs as written, without the ones that cannot apply to
    /// a single proxy endpoint.
    options: Vec<String>,
    /// Whether the upstream asked for load-balanced mode, which excludes
    /// `directConnection`.
    load_balanced: bool,
    /// The upstream's host list, for reports and logs (no credentials).
    pub upstream_hosts: String,
}

impl std::fmt::Debug for ProxyUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyUri")
            .field(
                "userinfo",
                &(!self.userinfo.is_empty()).then_some("<redacted>"),
            )
            .field("path", &self.path)
            .field("options", &self.options)
            .field("upstream_hosts", &self.upstream_hosts)
            .finish()
    }
}

/// Options dropped from the child's connection string: the proxy is one
/// endpoint, so a replica-set name would make the driver wait for members
/// it will never see, and `directConnection` is set by us.
const DROPPED_OPTIONS: &[&str] = &["replicaSet", "directConnection"];
/// Option prefixes dropped too: TLS to the upstream is the proxy's leg
/// (it reads them from `--upstream`); the child reaches the proxy over
/// plain TCP on loopback.
const DROPPED_PREFIXES: &[&str] = &["tls", "ssl"];

fn dropped_option(key: &str) -> bool {
    DROPPED_OPTIONS
        .iter()
        .any(|dropped| dropped.eq_ignore_ascii_case(key))
        || DROPPED_PREFIXES.iter().any(|prefix| {
            key.get(..prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
        })
}

impl ProxyUri {
    /// Splits `upstream` (already validated by the configuration).
    pub(crate) fn from_upstream(upstream: &str) -> Result<ProxyUri, String> {
        let parsed = ConnectionString::parse(upstream)?;
        let scheme = "mongodb://";
        let rest = upstream
            .get(scheme.len()..)
            .filter(|_| upstream[..scheme.len()].eq_ignore_ascii_case(scheme))
            .ok_or("must start with mongodb://")?;
        // Same boundaries as the parser: the authority ends at the first '/'
        // or, without a path, at '?'; user info ends at its last '@'.
        let authority_end = rest
            .find('/')
            .or_else(|| rest.find('?'))
            .unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let userinfo = authority
            .rfind('@')
            .map(|at| authority[..=at].to_string())
            .unwrap_or_default();
        let (path, query) = match tail.find('?') {
            Some(q) => (&tail[..q], &tail[q + 1..]),
            None => (tail, ""),
        };
        let options = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
                !dropped_option(key)
            })
            .map(str::to_string)
            .collect();
        let load_balanced = parsed
            .option("loadBalanced")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let upstream_hosts = report::upstream_hosts(upstream);
        Ok(ProxyUri {
            userinfo,
            path: path.to_string(),
            options,
            load_balanced,
            upstream_hosts,
        })
    }

    /// The connection string for the child: same credentials, database and
    /// options, the proxy as the only host, `directConnection=true`.
    pub(crate) fn with_address(&self, address: &str) -> String {
        let mut options = self.options.clone();
        if !self.load_balanced {
            options.push("directConnection=true".to_string());
        }
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        let mut uri = format!("mongodb://{}{address}{path}", self.userinfo);
        if !options.is_empty() {
            uri.push('?');
            uri.push_str(&options.join("&"));
        }
        uri
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn rewrite(upstream: &str) -> String {
        ProxyUri::from_upstream(upstream)
            .unwrap()
            .with_address("127.0.0.1:40000")
    }

    #[test]
    fn keeps_credentials_database_and_options() {
        assert_eq!(
            rewrite("mongodb://app:p%40ss%2Fw@db1:27017,db2:27018/shop?replicaSet=rs0&authSource=admin&appName=ci&w=majority"),
            "mongodb://app:p%40ss%2Fw@127.0.0.1:40000/shop?authSource=admin&appName=ci&w=majority&directConnection=true"
        );
    }

    #[test]
    fn minimal_strings_gain_a_path_and_direct_connection() {
        assert_eq!(
            rewrite("mongodb://localhost"),
            "mongodb://127.0.0.1:40000/?directConnection=true"
        );
        assert_eq!(
            rewrite("mongodb://localhost/?directConnection=false&REPLICASET=x"),
            "mongodb://127.0.0.1:40000/?directConnection=true"
        );
        assert_eq!(
            rewrite("MONGODB://h:1?retryWrites=false"),
            "mongodb://127.0.0.1:40000/?retryWrites=false&directConnection=true"
        );
        assert_eq!(
            rewrite("mongodb://[::1]:27017/db"),
            "mongodb://127.0.0.1:40000/db?directConnection=true"
        );
    }

    #[test]
    fn upstream_tls_options_stay_with_the_proxy() {
        assert_eq!(
            rewrite(
                "mongodb://h/db?tls=true&tlsCAFile=%2Fca.pem&SSL=true&appName=x&tlsInsecure=false"
            ),
            "mongodb://127.0.0.1:40000/db?appName=x&directConnection=true"
        );
    }

    #[test]
    fn load_balanced_strings_do_not_get_direct_connection() {
        assert_eq!(
            rewrite("mongodb://lb:27017/?loadBalanced=true"),
            "mongodb://127.0.0.1:40000/?loadBalanced=true"
        );
    }

    #[test]
    fn hosts_for_reports_carry_no_credentials() {
        let uri = ProxyUri::from_upstream("mongodb://u:secret@db1,db2:27018/x").unwrap();
        assert_eq!(uri.upstream_hosts, "db1:27017,db2:27018");
        assert!(!format!("{uri:?}").contains("secret"));
    }

    #[test]
    fn bad_upstreams_are_refused() {
        assert!(ProxyUri::from_upstream("mongodb+srv://c.example.net").is_err());
        assert!(ProxyUri::from_upstream("http://x").is_err());
        assert!(ProxyUri::from_upstream("mongodb://").is_err());
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        exec: ExecArgs,
    }

    fn plan_of(args: &[&str]) -> Result<Plan, String> {
        let cli = Cli::try_parse_from(std::iter::once("exec").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        plan(cli.exec)
    }

    #[test]
    fn plan_checks_flags_before_anything_starts() {
        let plan = plan_of(&["--upstream", "mongodb://h/db", "--", "true"]).unwrap();
        assert_eq!(plan.env_vars, [DEFAULT_ENV_VAR]);
        assert_eq!(plan.config.proxy.listen, "127.0.0.1:0");
        assert!(plan.config.proxy.drain_grace <= SETTLE_GRACE);
        assert_eq!(plan.fail_on, FailOn::Error);

        let plan = plan_of(&[
            "--env-var",
            "A",
            "--env-var",
            "B",
            "--fail-on",
            "never",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(plan.env_vars, ["A", "B"]);
        assert_eq!(plan.fail_on, FailOn::Never);

        let err = plan_of(&["--env-var", "A=B", "--", "true"]).unwrap_err();
        assert!(err.contains("--env-var `A=B`"), "{err}");
        let err = plan_of(&["--upstream", "mongodb+srv://x", "--", "true"]).unwrap_err();
        assert!(err.contains("proxy.upstream"), "{err}");
        let err = plan_of(&["--report", "/nonexistent-dir/r.json", "--", "true"]).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        assert!(plan_of(&["--fail-on", "sometimes", "--", "true"]).is_err());
        assert!(plan_of(&["--"]).is_err());
        assert!(plan_of(&[]).is_err());
    }
}
