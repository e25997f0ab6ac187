//! The `sessionguard-dev` command line: the project's dev tools, kept out
//! of the shipped `sessionguard` binary (which links neither the emulator
//! nor the MongoDB driver). `demo` shows the product end to end,
//! `demo-app` is a tiny driver application for trying `sessionguard exec`,
//! `emulator` runs the MongoDB emulator, `bench-load` is the load generator
//! and memory probe behind bench/compare.sh. It parses flags and hands over
//! to the library; no demo or benchmark logic lives here.
// Dev tools talk to their terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use sessionguard::config::{parse_duration, LogConfig, LogFormat};
use sessionguard_emulator::{EmulatorConfig, Profile, Topology};

/// Exit code for a usage error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit code for a runtime failure.
const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "sessionguard-dev",
    version,
    about = "sessionguard's dev tools: the demo, a driver app for trying exec, the MongoDB emulator, the benchmark load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the built-in emulator and the proxy, run a correct workload and
    /// three session bugs through them, print what sessionguard found, exit.
    Demo {
        /// Keep the proxy and its admin API running after the demo, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// A tiny application for trying `exec`: connects to $MONGODB_URI with the
    /// official Rust driver and runs one pattern (good, use-after-end, abandon).
    DemoApp {
        /// good | use-after-end | abandon
        #[arg(default_value = "good")]
        pattern: String,
        /// Exit code to end with (imitates a failing test suite).
        #[arg(default_value_t = 0)]
        exit_code: u8,
    },
    /// Run the built-in MongoDB emulator (for manual testing and benchmarks).
    Emulator(EmulatorArgs),
    /// Benchmark load generator and memory probes (see docs/performance.md).
    BenchLoad(sessionguard_dev::bench::BenchArgs),
    /// A frame-aware io_uring relay with no inspection: bench/compare.sh's
    /// floor (see docs/performance.md).
    BenchRelay(sessionguard_dev::relay::RelayArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TopologyArg {
    Standalone,
    Replicaset,
    Mongos,
}

#[derive(Debug, clap::Args)]
struct EmulatorArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "SESSIONGUARD_EMULATOR_LISTEN",
        default_value = "127.0.0.1:27017"
    )]
    listen: SocketAddr,
    /// Deployment persona reported by hello.
    #[arg(
        long,
        env = "SESSIONGUARD_EMULATOR_TOPOLOGY",
        value_enum,
        default_value = "replicaset"
    )]
    topology: TopologyArg,
    /// Fixed delay added to replies (humantime: "0ms", "50ms", "1s").
    #[arg(long, env = "SESSIONGUARD_EMULATOR_LATENCY", default_value = "0ms", value_parser = parse_duration)]
    latency: Duration,
    /// Benchmark upstream: answer find/insert/getMore with canned replies,
    /// storing nothing.
    #[arg(long)]
    fast: bool,
    /// Which server to behave like: mongodb (MongoDB 7.0), documentdb
    /// (Microsoft DocumentDB / FerretDB 2 / Azure Cosmos DB vCore: a
    /// mongos-like hello, session-management commands refused with 115) or
    /// atlas-shared (Atlas M0/Flex: kill commands refused with AtlasError).
    #[arg(
        long,
        env = "SESSIONGUARD_EMULATOR_PROFILE",
        default_value = "mongodb",
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::PossibleValuesParser::new(Profile::NAMES),
            |name| name.parse::<Profile>().expect("a listed profile")
        )
    )]
    profile: Profile,
    /// Replica-set members to start over one data set (member 0 is primary;
    /// each listens on the next port, or on its own ephemeral port with port 0).
    #[arg(long, env = "SESSIONGUARD_EMULATOR_MEMBERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
    members: u16,
    /// Log format.
    #[arg(
        long,
        env = "SESSIONGUARD_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    log_format: LogFormat,
    /// Log filter.
    #[arg(long, env = "SESSIONGUARD_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Demo { keep_running } => run_demo(keep_running),
        Command::DemoApp { pattern, exit_code } => run_demo_app(&pattern, exit_code),
        Command::Emulator(args) => run_emulator(args),
        Command::BenchLoad(args) => sessionguard_dev::bench::main(args),
        Command::BenchRelay(args) => match sessionguard_dev::relay::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: bench-relay cannot start: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
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

fn run_demo_app(pattern: &str, exit_code: u8) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(sessionguard_dev::demo::run_app(pattern, exit_code)) {
        Ok(()) => ExitCode::from(exit_code),
        Err(e) => {
            eprintln!("demo-app: error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run_demo(keep_running: bool) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(sessionguard_dev::demo::run(keep_running)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run_emulator(args: EmulatorArgs) -> ExitCode {
    let log = LogConfig {
        format: args.log_format,
        level: args.log_level,
        ..LogConfig::default()
    };
    if let Err(e) = sessionguard::telemetry::init(&log) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let topology = match args.topology {
        TopologyArg::Standalone => Topology::Standalone,
        TopologyArg::Replicaset => Topology::ReplicaSetPrimary {
            set_name: "rs0".to_string(),
        },
        TopologyArg::Mongos => Topology::Mongos,
    };
    if args.members > 1 && !matches!(topology, Topology::ReplicaSetPrimary { .. }) {
        eprintln!("error: --members needs --topology replicaset");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = EmulatorConfig {
        topology,
        reply_latency: args.latency,
        fast: args.fast,
        profile: args.profile,
        ..EmulatorConfig::default()
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let members = usize::from(args.members);
    match runtime.block_on(sessionguard_emulator::run(args.listen, config, members)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("emulator failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
