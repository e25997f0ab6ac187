//! The built binaries as child processes: `sessionguard` and
//! `sessionguard-dev` with a clean environment, and `sessionguard proxy`
//! configured by a TOML text with its JSON log in a temporary directory.

use std::net::SocketAddr;
use std::time::Duration;

/// The built `sessionguard` binary, with nothing inherited from the test
/// runner's environment that would configure it: no `SESSIONGUARD_*`
/// variables (every setting has one), no `RUST_LOG` (tests read its logs),
/// no `MONGODB_URI` (what `exec` hands its child, and what `demo-app` reads).
/// A test sets what it needs on the returned command. For tokio, use
/// `tokio::process::Command::from(sessionguard_command())`.
pub fn sessionguard_command() -> std::process::Command {
    clean_command(&sessionguard_bin())
}

/// `sessionguard_command` for the dev tools' binary (`sessionguard-dev`:
/// `demo`, `demo-app`, `emulator`, `bench-load`).
pub fn dev_command() -> std::process::Command {
    clean_command(&dev_bin())
}

fn clean_command(program: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|key| key.starts_with("SESSIONGUARD_"))
        {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG").env_remove("MONGODB_URI");
    command
}

/// The shipped `sessionguard` binary: the path the test runner hands the
/// package's own tests (nextest's `NEXTEST_BIN_EXE_*`, cargo's
/// `CARGO_BIN_EXE_*` where it sets it at run time), else the workspace's
/// (built first: see `workspace_bin`).
pub fn sessionguard_bin() -> std::path::PathBuf {
    runner_bin("sessionguard").unwrap_or_else(|| workspace_bin("sessionguard", "sessionguard"))
}

/// The dev tools' `sessionguard-dev` binary (as `sessionguard_bin`).
pub fn dev_bin() -> std::path::PathBuf {
    runner_bin("sessionguard-dev")
        .unwrap_or_else(|| workspace_bin("sessionguard-dev", "sessionguard-dev"))
}

/// The path of binary `bin` the test runner set for this package's tests.
fn runner_bin(bin: &str) -> Option<std::path::PathBuf> {
    ["NEXTEST_BIN_EXE_", "CARGO_BIN_EXE_"]
        .iter()
        .find_map(|prefix| std::env::var_os(format!("{prefix}{bin}")))
        .map(Into::into)
        .filter(|path: &std::path::PathBuf| path.exists())
}

/// Binary `bin` of workspace package `package`, for the profile and target
/// directory of the test running. Cargo hands a test the paths of its own
/// package's binaries only, so another package's is built here, once per
/// test process, as the same build scripts/test.sh runs first (so
/// there it is a no-op). A workspace build does not make it one: cargo
/// unifies features over the packages it builds, so `-p <package>` alone
/// has its own dependency builds. It also keeps a stale binary from being
/// used when only this package's tests were built.
fn workspace_bin(package: &str, bin: &str) -> std::path::PathBuf {
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    // <target>/<profile>/deps/<test binary>
    let test = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("tests run from <target>/<profile>/deps");
    let path = profile_dir.join(bin);
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == bin) {
        let target_dir = profile_dir.parent().expect("a target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("no profile directory in {}", test.display()),
        };
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--manifest-path", manifest])
            .args(["--package", package, "--bin", bin, "--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build of {bin} failed");
        built.push(bin.to_string());
    }
    path
}

/// The `sessionguard proxy` binary as a child process, configured by a TOML
/// text, logging JSON to a file (the tests read bound addresses from it).
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl ProxyProcess {
    /// Starts `sessionguard proxy --config <config_toml> [extra args]` with no
    /// `SESSIONGUARD_*` variables inherited; waits until it listens. `{dir}`
    /// in an extra argument is the process's temporary directory.
    pub fn start(config_toml: &str, extra_args: &[&str]) -> ProxyProcess {
        ProxyProcess::start_with_env(config_toml, extra_args, &[])
    }

    /// `start` with these `SESSIONGUARD_*` (or other) variables set.
    pub fn start_with_env(
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = dir.path().join("sessionguard.toml");
        std::fs::write(&config, config_toml).expect("config written");
        let log = dir.path().join("proxy.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = sessionguard_command()
            .args(["proxy", "--config"])
            .arg(&config)
            .args(
                extra_args
                    .iter()
                    .map(|arg| arg.replace("{dir}", &dir.path().to_string_lossy())),
            )
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::from(
                log_file.try_clone().expect("log file"),
            ))
            .stderr(std::process::Stdio::from(log_file))
            .spawn()
            .expect("the sessionguard binary starts");
        let mut process = ProxyProcess {
            child,
            log,
            dir,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
        };
        process.listen = process
            .wait_for_field("proxy listening", "listen")
            .parse()
            .expect("a listen address");
        process.admin = process
            .wait_for_field("admin server listening", "admin")
            .parse()
            .expect("an admin address");
        process
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `field` of the first JSON log line whose message is `message`.
    pub fn wait_for_field(&mut self, message: &str, field: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            let text = self.log_text();
            for line in text.lines() {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if entry["message"] == message {
                    if let Some(value) = entry[field].as_str() {
                        return value.to_string();
                    }
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the proxy exited ({status}) before logging `{message}`:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no `{message}` log line within 15s");
    }

    /// Resident memory of the process in KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status is readable");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }

    /// SIGTERM, then waits (up to 15 s) for a clean exit.
    pub fn terminate(&mut self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap())
            .expect("a child pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("signal sent");
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "the proxy exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("the proxy did not exit within 15s of SIGTERM");
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
