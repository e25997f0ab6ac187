//! The `sessionguard` command line: `proxy`, `exec` and `check-config` (the
//! demo, the emulator and the load generator are the dev tools' binary,
//! `sessionguard-dev`). It parses flags (many also
//! settable by a `SESSIONGUARD_*` environment variable; the README lists
//! which), resolves the configuration before anything is
//! bound (bad config: exit 64 naming the key), installs logging and signal
//! handling (SIGTERM drains, SIGINT exits, SIGHUP reloads the configuration
//! through `sessionguard::reload`), and hands over to the library. No proxy
//! logic lives here.
// The command line talks to its terminal (config errors, check-config).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use sessionguard::config::{Config, LogConfig, LogFormat, Overrides};

/// Exit code for a configuration error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a runtime failure (e.g. a port already in use).
const EXIT_FAILURE: u8 = 1;
/// Exit code after SIGINT, as shells report it (128 + 2).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "sessionguard",
    version,
    about = "A MongoDB wire-protocol proxy that enforces session hygiene"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in front of a MongoDB deployment.
    Proxy(ProxyArgs),
    /// Validate a configuration file: prints "ok: FILE" or the error (exit 64).
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// CI mode: run CMD against a private proxy, report session misuse, exit 3 on violations.
    Exec(sessionguard::exec::ExecArgs),
}

#[derive(Debug, clap::Args)]
struct ProxyArgs {
    /// TOML configuration file (see config/sessionguard.toml).
    #[arg(long, env = "SESSIONGUARD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to accept application connections on [default: 127.0.0.1:27018].
    #[arg(long, env = "SESSIONGUARD_LISTEN", value_name = "HOST:PORT")]
    listen: Option<String>,
    /// MongoDB connection string of the deployment [default: mongodb://127.0.0.1:27017].
    #[arg(long, env = "SESSIONGUARD_UPSTREAM", value_name = "URI")]
    upstream: Option<String>,
    /// Address of the admin HTTP server [default: 127.0.0.1:9216].
    #[arg(long, env = "SESSIONGUARD_ADMIN", value_name = "HOST:PORT")]
    admin: Option<String>,
    /// Log format [default: pretty].
    #[arg(long, env = "SESSIONGUARD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter: a level or tracing directives [default: info].
    #[arg(long, env = "SESSIONGUARD_LOG_LEVEL")]
    log_level: Option<String>,
    /// observe: report misuse; enforce: also reject requests that break an
    /// error-severity rule. Overrides [sessions] mode, also across reloads
    /// [default: the file's, else observe].
    #[arg(long, env = "SESSIONGUARD_MODE", value_enum)]
    mode: Option<sessionguard_engine::Mode>,
    /// Print the effective [proxy] and [log] settings and exit without binding anything.
    #[arg(long, env = "SESSIONGUARD_PRINT_CONFIG")]
    print_config: bool,
    /// Write the JSON run report (as `exec --report`) here at shutdown.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `exec` promises 64 for any usage error (clap's own code is 2).
        Err(e) if e.use_stderr() && std::env::args_os().nth(1).is_some_and(|a| a == "exec") => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Proxy(args) => run_proxy(args),
        Command::Exec(args) => sessionguard::exec::main(args),
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file).and_then(|config| check_tls_files(&config)) {
        Ok(()) => {
            println!("ok: {}", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// Certificates and keys named by the configuration are read and checked
/// here, so a bad file is a configuration error (exit 64) reported before any
/// port is bound, by `check-config` as well as by `proxy`.
fn check_tls_files(config: &Config) -> Result<(), sessionguard::config::ConfigError> {
    config.proxy.settings().map(|_| ())
}

/// The runtime every async subcommand runs on; when it cannot be built,
/// the reason is printed and the exit code to return is handed back.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        })
}

fn run_proxy(args: ProxyArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        upstream: args.upstream,
        admin: args.admin,
        log_format: args.log_format,
        log_level: args.log_level,
        mode: args.mode,
    };
    // Everything about the configuration is settled before any port is bound.
    let (config, text) = match Config::resolve_file(args.config.as_deref(), &overrides) {
        Ok(resolved) => resolved,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.print_config {
        print!("{}", render_effective(&config));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = check_tls_files(&config) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(path) = &args.report {
        if let Err(e) = sessionguard::report::check_output_path(path) {
            eprintln!("error: --report {}: {e}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    if let Err(e) = sessionguard::telemetry::init(&config.log) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let source = ConfigSource {
        path: args.config,
        overrides,
        text,
    };
    let code = runtime.block_on(serve_proxy(config, source, args.report));
    // Connections still winding down after a fast exit must not delay it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

fn render_effective(config: &Config) -> String {
    #[derive(serde::Serialize)]
    struct Effective<'a> {
        proxy: &'a sessionguard::config::ProxyConfig,
        log: &'a LogConfig,
    }
    toml::to_string(&Effective {
        proxy: &config.proxy,
        log: &config.log,
    })
    .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}

/// Where the running configuration came from, for reloads.
struct ConfigSource {
    path: Option<PathBuf>,
    overrides: Overrides,
    /// The file's text as read at start (its hash is exported).
    text: Option<String>,
}

async fn serve_proxy(config: Config, source: ConfigSource, report: Option<PathBuf>) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    let started = std::time::SystemTime::now();

    let (mut sigterm, mut sigint, mut sighup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(term), Ok(int), Ok(hup)) => (term, int, hup),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    // The session engine inspects every frame; its refresher/sweep task ends
    // when the engine is dropped.
    let engine = Arc::new(
        sessionguard_engine::SessionEngine::new(&config.sessions, &config.rules)
            .with_stores(&config.stores)
            .with_finding_interval(config.log.finding_interval),
    );
    let engine_inspector = Arc::new(sessionguard::EngineInspector::new(engine.clone()));
    let _refresher = sessionguard::spawn_refresher(&engine_inspector);
    // One registry for the data path and the engine (read at scrape time).
    let metrics = Arc::new(sessionguard::metrics::Metrics::new());
    let reloader = Arc::new(sessionguard::reload::Reloader::new(
        source.path,
        source.overrides,
        source.text.as_deref(),
        &config,
        engine.clone(),
    ));
    let admin_context = metrics
        .register_session_engine(engine.clone())
        .and_then(|()| reloader.register_metrics(&metrics))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            sessionguard::admin::AdminContext::for_proxy(
                &config.proxy,
                metrics.clone(),
                Some(engine.clone()),
            )
            .map(|context| context.with_reload(reloader.clone()))
            .map_err(|e| e.to_string())
        });
    let admin_context = match admin_context {
        Ok(context) => context,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the admin server");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let admin_shutdown = CancellationToken::new();
    let admin = match sessionguard::admin::serve_with(
        &config.proxy.admin,
        admin_context,
        admin_shutdown.clone(),
    )
    .await
    {
        Ok(admin) => admin,
        Err(e) => {
            tracing::error!(admin = %config.proxy.admin, error = %e, "cannot start the admin server");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    // `proxy.inspect = false`: a plain forwarder (the benchmark's baseline).
    // (Two calls: each inspector type gets its own monomorphised data path.)
    let proxy_started = if config.proxy.inspect {
        sessionguard::start_proxy(&config.proxy, engine_inspector, &metrics).await
    } else {
        tracing::warn!("proxy.inspect = false: frames are forwarded without session tracking");
        let noop = Arc::new(sessionguard_proxy::NoopInspector);
        sessionguard::start_proxy(&config.proxy, noop, &metrics).await
    };
    let proxy = match proxy_started {
        Ok(proxy) => proxy,
        Err(e) => {
            tracing::error!(listen = %config.proxy.listen, error = %e, "cannot start the proxy");
            admin_shutdown.cancel();
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    tracing::info!(listen = %proxy.local_addr(), admin = %admin.local_addr, "sessionguard ready");
    // SIGHUP reloads for as long as the process lives (during a drain too:
    // the handler stays installed, so a late SIGHUP never kills the process).
    tokio::spawn(async move {
        while sighup.recv().await.is_some() {
            // Logged and counted by the reloader, success or refusal.
            let _ = reloader.reload("SIGHUP");
        }
    });

    let code = tokio::select! {
        _ = sigterm.recv() => {
            tracing::info!("SIGTERM: draining");
            proxy.drain();
            ExitCode::SUCCESS
        }
        _ = sigint.recv() => {
            tracing::info!("SIGINT: exiting now");
            proxy.shutdown_now();
            ExitCode::from(EXIT_INTERRUPTED)
        }
    };
    // SIGINT during a drain cuts it short.
    let mut code = code;
    let drained = proxy.wait();
    tokio::pin!(drained);
    tokio::select! {
        _ = &mut drained => {}
        _ = sigint.recv() => {
            tracing::info!("SIGINT during drain: exiting now");
            code = ExitCode::from(EXIT_INTERRUPTED);
        }
    }
    // The last counts of every finding still summarised later.
    engine.flush_finding_summaries();
    if let Some(path) = &report {
        match sessionguard::report::write_proxy_report(path, started, &config, &engine) {
            Ok(()) => tracing::info!(report = %path.display(), "report written"),
            Err(e) => {
                tracing::error!(report = %path.display(), error = %e, "cannot write the report");
                code = ExitCode::from(EXIT_FAILURE);
            }
        }
    }
    // The admin server outlives the drain so /readyz answers 503 meanwhile.
    admin_shutdown.cancel();
    tracing::info!("sessionguard stopped");
    code
}
