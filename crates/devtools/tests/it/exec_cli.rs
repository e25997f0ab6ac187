//! CI mode end to end: the built `sessionguard` binary runs `exec` (and
//! `proxy --report`) in front of the emulator started here, with real child
//! processes: `sessionguard-dev demo-app` (the official Rust driver reading
//! `MONGODB_URI`) for traffic, `sh` for exit codes and the environment.
//! They live with the dev tools because the child is the dev tools' binary.
//! Each test checks the exit code, the JSON report, the JUnit report and
//! the summary the binary prints.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_engine::{RuleId, SESSIONGUARD_VIOLATION_CODE};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(60);

async fn emulator(config: EmulatorConfig) -> EmulatorHandle {
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Emulator::start(loopback, config)
        .await
        .expect("emulator starts")
}

/// The binary with nothing inherited from the environment running the tests
/// (see `common::sessionguard_command`), killed if a test drops it.
fn sessionguard() -> Command {
    let mut command = Command::from(common::sessionguard_command());
    command.kill_on_drop(true);
    command
}

/// The child program: `sessionguard-dev demo-app PATTERN [EXIT_CODE]`, a
/// real application on the official Rust driver.
fn misuse_app() -> [String; 2] {
    [
        common::dev_bin().display().to_string(),
        "demo-app".to_string(),
    ]
}

async fn run(command: &mut Command) -> Output {
    tokio::time::timeout(WAIT, command.stdin(Stdio::null()).output())
        .await
        .expect("the command finishes in time")
        .expect("the binary runs")
}

/// `sessionguard exec --upstream <emulator>/<db> <flags> -- <child...>`.
async fn exec(upstream: &str, flags: &[&str], child: &[&str]) -> Output {
    run(sessionguard()
        .arg("exec")
        .arg("--upstream")
        .arg(upstream)
        .args(flags)
        .arg("--")
        .args(child))
    .await
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("report {} not written: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is not JSON: {e}\n{text}"))
}

fn rules_in(report: &serde_json::Value) -> Vec<String> {
    report["violations"]
        .as_array()
        .expect("violations is an array")
        .iter()
        .map(|v| v["rule"].as_str().unwrap().to_string())
        .collect()
}

struct Reports {
    _dir: tempfile::TempDir,
    json: PathBuf,
    junit: PathBuf,
}

impl Reports {
    fn new() -> Reports {
        let dir = tempfile::tempdir().unwrap();
        Reports {
            json: dir.path().join("report.json"),
            junit: dir.path().join("junit.xml"),
            _dir: dir,
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--report".into(),
            self.json.display().to_string(),
            "--junit".into(),
            self.junit.display().to_string(),
        ]
    }
}

async fn exec_misuse(
    emulator: &EmulatorHandle,
    reports: &Reports,
    extra: &[&str],
    pattern: &[&str],
) -> Output {
    let upstream = format!("mongodb://{}/shop?appName=exec-test", emulator.addr());
    let mut flags = reports.flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let app = misuse_app();
    let child: Vec<&str> = app
        .iter()
        .map(String::as_str)
        .chain(pattern.iter().copied())
        .collect();
    exec(&upstream, &flags, &child).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_child_exits_0_with_an_empty_report() {
    let emu = emulator(EmulatorConfig::default()).await;
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &[], &["good"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // The driver connected to the database named in the upstream URI.
    assert!(
        stdout(&output).contains("pattern good on database shop"),
        "{}",
        stdout(&output)
    );

    let report = read_json(&reports.json);
    assert_eq!(report["version"], 1);
    assert_eq!(
        report["violations"].as_array().unwrap().len(),
        0,
        "{report:#}"
    );
    assert_eq!(report["counts"]["total"], 0);
    assert_eq!(report["failed"], false);
    assert_eq!(report["command"]["exit_code"], 0);
    assert_eq!(report["upstream"], emu.addr().to_string());
    assert!(
        report["counts"]["requests_inspected"].as_u64().unwrap() >= 4,
        "the traffic went through the proxy: {report:#}"
    );
    assert_eq!(report["findings"], serde_json::json!([]), "{report:#}");
    let junit = std::fs::read_to_string(&reports.junit).unwrap();
    // Every rule found nothing: one passing case each.
    assert!(junit.contains("name=\"use-after-end\""), "{junit}");
    assert_eq!(junit.matches("<testcase ").count(), 14, "{junit}");
    assert!(!junit.contains("<failure"), "{junit}");
    assert!(
        stderr(&output).contains("sessionguard: no session misuse seen"),
        "{}",
        stderr(&output)
    );
    // The upstream is a replica-set primary, but exec hands the child
    // directConnection=true: no driver can bypass the proxy, so no warning.
    assert!(
        !stderr(&output).contains("bypassing sessionguard"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misusing_child_fails_with_3_and_the_rule_in_every_report() {
    let emu = emulator(EmulatorConfig::default()).await;
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &[], &["use-after-end"]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{err}");

    let report = read_json(&reports.json);
    assert_eq!(rules_in(&report), ["use-after-end"], "{report:#}");
    assert_eq!(report["failed"], true);
    assert_eq!(report["counts"]["by_rule"]["use-after-end"], 1);
    assert_eq!(report["counts"]["by_severity"]["error"], 1);
    let violation = &report["violations"][0];
    assert_eq!(violation["severity"], "error");
    assert_eq!(violation["action"], "log");
    assert!(
        violation["lsid"].as_str().unwrap().len() >= 32,
        "{violation:#}"
    );
    let current = &violation["evidence"]["current"];
    assert_eq!(current["command"], "insert", "{violation:#}");
    assert_eq!(current["namespace"], "shop.orders", "{violation:#}");
    assert_eq!(current["app_name"], "exec-test", "{violation:#}");
    // Never document contents: the inserted value appears nowhere.
    assert!(!std::fs::read_to_string(&reports.json)
        .unwrap()
        .contains("ghost"));

    // One finding: the bug, its count and its first example with the
    // session's timeline (the insert, then the endSessions, then the reuse).
    let findings = report["findings"].as_array().expect("a findings array");
    assert_eq!(findings.len(), 1, "{report:#}");
    let finding = &findings[0];
    assert_eq!(finding["rule"], "use-after-end");
    assert_eq!(finding["severity"], "error");
    assert_eq!(finding["count"], 1);
    assert_eq!(finding["current"]["command"], "insert");
    assert_eq!(finding["earlier"]["command"], "endSessions");
    let fingerprint = finding["fingerprint"].as_str().unwrap();
    assert_eq!(violation["finding"], fingerprint, "{report:#}");
    let example = &finding["first_example"];
    assert_eq!(example["id"], violation["id"], "{finding:#}");
    assert_eq!(example["evidence"]["current"]["command"], "insert");
    let timeline: Vec<(&str, &str)> = example["timeline"]
        .as_array()
        .expect("a timeline")
        .iter()
        .map(|op| {
            (
                op["command"].as_str().unwrap(),
                op["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        timeline,
        [
            ("insert", ""),
            ("endSessions", "earlier"),
            ("insert", "current")
        ],
        "{finding:#}"
    );

    // JUnit: one failing case for the finding, named so a CI page reads
    // it; the rules that found nothing pass, one case each.
    let junit = std::fs::read_to_string(&reports.junit).unwrap();
    let name = format!(
        "use-after-end: insert on shop.orders, earlier endSessions on shop (app exec-test, mongo-rust-driver) [{fingerprint}]"
    );
    let case = junit
        .split(&format!(
            "<testcase classname=\"sessionguard.findings\" name=\"{name}\""
        ))
        .nth(1)
        .unwrap_or_else(|| panic!("a test case for the finding: {junit}"));
    let case = &case[..case
        .find("</testcase>")
        .expect("the case has a failure body")];
    assert!(
        case.contains("<failure message=\"1 violation of use-after-end (severity error)\""),
        "{case}"
    );
    assert!(case.contains("insert shop.orders conn"), "{case}");
    assert!(case.contains("endSessions"), "{case}");
    assert!(case.contains(RuleId::UseAfterEnd.fix()), "{case}");
    assert_eq!(junit.matches("<failure").count(), 1, "{junit}");
    assert!(!junit.contains("name=\"use-after-end\""), "{junit}");
    assert!(junit.contains("name=\"concurrent-use\""), "{junit}");
    assert_eq!(junit.matches("<testcase ").count(), 14, "{junit}");

    // The summary lists the finding: its count, the example's message, its
    // requests, the timeline and the fix.
    assert!(
        err.contains("sessionguard: 1 violation in 1 finding of 1 rule (1 error, 0 warning)"),
        "{err}"
    );
    let block = &err[err
        .find("\n[1]\n")
        .unwrap_or_else(|| panic!("no finding in the summary: {err}"))..];
    // Its title is the JUnit case's name without the fingerprint.
    let title = name.strip_suffix(&format!(" [{fingerprint}]")).unwrap();
    assert!(block.contains(&format!("\n  {title}\n")), "{block}");
    assert!(block.contains(&format!("finding {fingerprint}")), "{block}");
    assert!(
        block.contains("after it was ended by endSessions"),
        "{block}"
    );
    assert!(block.contains("insert shop.orders conn"), "{block}");
    assert!(block.contains("timeline of session"), "{block}");
    assert!(block.contains(RuleId::UseAfterEnd.fix()), "{block}");
    assert!(err.contains("FAIL (--fail-on error)"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_on_never_reports_but_passes() {
    let emu = emulator(EmulatorConfig::default()).await;
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &["--fail-on", "never"], &["use-after-end"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report = read_json(&reports.json);
    assert_eq!(rules_in(&report), ["use-after-end"]);
    assert_eq!(report["failed"], false);
    assert_eq!(report["fail_on"], "never");
    let junit = std::fs::read_to_string(&reports.junit).unwrap();
    assert!(!junit.contains("<failure"), "{junit}");
    assert!(
        junit.contains("<system-out>1 violation of use-after-end"),
        "{junit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_fail_only_with_fail_on_warning() {
    // Inserts take long enough that the child exits while one is in flight.
    let slow_inserts = || EmulatorConfig {
        command_latency: [("insert".to_string(), Duration::from_secs(3))].into(),
        ..EmulatorConfig::default()
    };
    let emu = emulator(slow_inserts()).await;
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &[], &["abandon"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report = read_json(&reports.json);
    assert_eq!(
        rules_in(&report),
        ["closed-with-requests-in-flight"],
        "{report:#}"
    );
    assert_eq!(report["counts"]["by_severity"]["warning"], 1);

    let emu = emulator(slow_inserts()).await;
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &["--fail-on", "warning"], &["abandon"]).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let junit = std::fs::read_to_string(&reports.junit).unwrap();
    assert!(
        junit.contains(
            "<failure message=\"1 violation of closed-with-requests-in-flight (severity warning)\""
        ),
        "{junit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_childs_failure_code_wins() {
    let emu = emulator(EmulatorConfig::default()).await;
    let upstream = format!("mongodb://{}", emu.addr());
    let output = exec(&upstream, &[], &["sh", "-c", "exit 7"]).await;
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));

    // Even over violations that would otherwise exit 3.
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &[], &["use-after-end", "7"]).await;
    assert_eq!(output.status.code(), Some(7), "{}", stderr(&output));
    let report = read_json(&reports.json);
    assert_eq!(report["command"]["exit_code"], 7);
    assert_eq!(report["failed"], true);

    // A child killed by a signal reads as a shell reports it (128 + 9).
    let output = exec(&upstream, &[], &["sh", "-c", "kill -9 $$"]).await;
    assert_eq!(output.status.code(), Some(137), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_string_keeps_database_credentials_and_options() {
    let emu = emulator(EmulatorConfig::default()).await;
    let upstream = format!(
        "mongodb://app:s%40cret@{}/shop?replicaSet=rs0&appName=ci&retryWrites=false",
        emu.addr()
    );
    let output = exec(
        &upstream,
        &[],
        &["sh", "-c", "printf '%s' \"$MONGODB_URI\""],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let uri = stdout(&output);
    let rest = uri
        .strip_prefix("mongodb://app:s%40cret@127.0.0.1:")
        .unwrap_or_else(|| panic!("{uri}"));
    let (port, tail) = rest.split_once('/').unwrap();
    let port: u16 = port.parse().unwrap();
    assert_ne!(port, emu.addr().port(), "the child must reach the proxy");
    assert_eq!(
        tail,
        "shop?appName=ci&retryWrites=false&directConnection=true"
    );
    // The password is never printed by sessionguard itself.
    assert!(!stderr(&output).contains("s%40cret"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_env_vars_replace_the_default() {
    let emu = emulator(EmulatorConfig::default()).await;
    let upstream = format!("mongodb://{}/db1", emu.addr());
    let script = "printf '%s|%s|%s' \"${MONGODB_URI-unset}\" \"$DB_URL\" \"$OTHER_URL\"";
    let output = exec(
        &upstream,
        &["--env-var", "DB_URL", "--env-var", "OTHER_URL"],
        &["sh", "-c", script],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    let parts: Vec<&str> = printed.split('|').collect();
    assert_eq!(parts[0], "unset", "{printed}");
    assert!(parts[1].starts_with("mongodb://127.0.0.1:"), "{printed}");
    assert!(
        parts[1].ends_with("/db1?directConnection=true"),
        "{printed}"
    );
    assert_eq!(parts[1], parts[2]);

    let output = exec(
        &upstream,
        &[],
        &["sh", "-c", "printf '%s' \"$MONGODB_URI\""],
    )
    .await;
    assert!(
        stdout(&output).starts_with("mongodb://127.0.0.1:"),
        "{output:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_exits_127() {
    let emu = emulator(EmulatorConfig::default()).await;
    let upstream = format!("mongodb://{}", emu.addr());
    let reports = Reports::new();
    let flags = reports.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let output = exec(&upstream, &flags, &["/nonexistent/run-tests", "--all"]).await;
    assert_eq!(output.status.code(), Some(127), "{output:?}");
    let err = stderr(&output);
    assert!(
        err.contains("cannot run `/nonexistent/run-tests`") && err.contains("No such file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_config_exit_64_before_the_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "[sessions]\nmode = \"sometimes\"\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--fail-on".into(), "sometimes".into()], "--fail-on"),
        (vec!["--no-such-flag".into()], "--no-such-flag"),
        (
            vec![
                "--upstream".into(),
                "mongodb+srv://cluster.example.net".into(),
            ],
            "proxy.upstream",
        ),
        (vec!["--env-var".into(), "A=B".into()], "--env-var"),
        (
            vec!["--report".into(), "/nonexistent-dir/r.json".into()],
            "does not exist",
        ),
        (
            vec!["--config".into(), bad_config.display().to_string()],
            "sessions.mode",
        ),
    ];
    for (flags, expected) in cases {
        let output = run(sessionguard()
            .arg("exec")
            .args(&flags)
            .args(["--", "sh", "-c", &touch]))
        .await;
        assert_eq!(output.status.code(), Some(64), "{flags:?}: {output:?}");
        assert!(
            stderr(&output).contains(expected),
            "{flags:?}: {}",
            stderr(&output)
        );
        assert!(!marker.exists(), "{flags:?}: the command ran");
    }
    // No command at all.
    let output = run(sessionguard().args(["exec", "--"])).await;
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let output = run(sessionguard().arg("exec")).await;
    assert_eq!(output.status.code(), Some(64), "{output:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_configs_member_mapping_is_not_bound() {
    let emu = emulator(EmulatorConfig::default()).await;
    // The port the long-running proxy's `[[members]]` entry names, held
    // here: were exec to bind the mapping, its start would fail on it.
    let member_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let member_listen = member_port.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shared.toml");
    std::fs::write(
        &config,
        format!(
            "[[members]]\nupstream = \"{}\"\nlisten = \"{member_listen}\"\n",
            emu.addr()
        ),
    )
    .unwrap();
    let reports = Reports::new();
    let config_flag = config.display().to_string();
    let output = exec_misuse(&emu, &reports, &["--config", &config_flag], &["good"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("pattern good on database shop"),
        "{}",
        stdout(&output)
    );
    let report = read_json(&reports.json);
    assert!(
        report["counts"]["requests_inspected"].as_u64().unwrap() >= 4,
        "the traffic went through exec's private proxy: {report:#}"
    );

    // The child is handed exec's own loopback listener, not the member's.
    let upstream = format!("mongodb://{}/shop", emu.addr());
    let output = exec(
        &upstream,
        &["--config", &config_flag],
        &["sh", "-c", "printf '%s' \"$MONGODB_URI\""],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let uri = stdout(&output);
    let port: u16 = uri
        .strip_prefix("mongodb://127.0.0.1:")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(port, _)| port.parse().ok())
        .unwrap_or_else(|| panic!("{uri}"));
    assert_ne!(port, member_listen.port(), "{uri}");
    assert_ne!(port, emu.addr().port(), "{uri}");
    drop(member_port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_forwarded_to_the_child() {
    let emu = emulator(EmulatorConfig::default()).await;
    let upstream = format!("mongodb://{}", emu.addr());
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    // The child says when it is ready, then exits 42 on SIGTERM.
    let script = "trap 'exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = sessionguard()
        .args(["exec", "--upstream", &upstream, "--report"])
        .arg(&report)
        .args(["--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));
    signal(child.id().unwrap(), "TERM").await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(42));
    assert_eq!(read_json(&report)["command"]["exit_code"], 42);
}

async fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_report_is_written_at_sigterm() {
    let emu = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("proxy-report.json");
    let mut proxy = sessionguard()
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--upstream")
        .arg(format!("mongodb://{}", emu.addr()))
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(proxy.stderr.take().unwrap()).lines();
    let listen = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == "sessionguard ready" {
                return event["listen"].as_str().unwrap().to_string();
            }
        }
        panic!("the proxy exited before it was ready");
    })
    .await
    .expect("a ready line");
    // Keep reading so the proxy never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let app = misuse_app();
    let output = run(Command::new(&app[0])
        .args([app[1].as_str(), "use-after-end"])
        .env(
            "MONGODB_URI",
            format!("mongodb://{listen}/shop?directConnection=true"),
        ))
    .await;
    assert!(output.status.success(), "{output:?}");
    assert!(!report.exists(), "written only at shutdown");

    signal(proxy.id().unwrap(), "TERM").await;
    let status = tokio::time::timeout(WAIT, proxy.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = drain.await;
    let json = read_json(&report);
    assert_eq!(rules_in(&json), ["use-after-end"], "{json:#}");
    assert!(json["command"].is_null(), "{json:#}");
    assert_eq!(json["upstream"], emu.addr().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_reads_sessionguard_mode() {
    let emulator = emulator(EmulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut command = tokio::process::Command::from(common::sessionguard_command());
    command
        .kill_on_drop(true)
        .env("SESSIONGUARD_MODE", "enforce")
        .arg("exec")
        .arg("--upstream")
        .arg(format!("mongodb://{}/shop", emulator.addr()))
        .arg("--report")
        .arg(&report)
        .arg("--")
        .arg(common::dev_bin())
        .arg("demo-app")
        .arg("use-after-end")
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("exec finishes in time")
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The child fails on the rejection: exec passes its exit code on.
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&SESSIONGUARD_VIOLATION_CODE.to_string()),
        "the child saw the rejection: {stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report written"))
            .expect("JSON");
    let violations = report["violations"].as_array().expect("violations");
    assert_eq!(violations.len(), 1, "{report:#}");
    assert_eq!(violations[0]["rule"], "use-after-end");
    assert_eq!(violations[0]["rejected"], true, "{report:#}");
    emulator.shutdown().await;
}

/// A shell command that posts one mark to `SESSIONGUARD_MARKS_URL` with the
/// shell's pid (python3's parent) and prints the status, as a runner
/// integration would (integrations/PROTOCOL.md).
fn post_mark(event: &str, test: &str) -> String {
    format!(
        "python3 -c 'import json, os, time, urllib.request as u; \
         body = json.dumps({{\"event\": \"{event}\", \"test\": \"{test}\", \"file\": \"test/orders.test.js\", \
         \"pid\": os.getppid(), \"time\": time.time_ns() / 1e6}}).encode(); \
         print(u.urlopen(u.Request(os.environ[\"SESSIONGUARD_MARKS_URL\"], data=body, method=\"POST\")).status)'"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_name_the_test_and_a_test_child_is_matched_through_its_parent() {
    // Replies 200 ms late: the application then keeps its connection for
    // a second or so, as a test process keeps its pool, not a few
    // milliseconds (its owner is looked up while the connection is open,
    // on a machine the parallel tests load).
    let emu = emulator(EmulatorConfig {
        reply_latency: Duration::from_millis(200),
        ..EmulatorConfig::default()
    })
    .await;
    let reports = Reports::new();
    let upstream = format!("mongodb://{}/shop?appName=exec-test", emu.addr());
    let app = misuse_app().join(" ");
    // The shell is the "test process": it marks the test and starts the
    // application, a child that sends no marks of its own. A test that ran
    // before it in the same process must not be blamed.
    let script = [
        post_mark("begin", "orders warms up"),
        post_mark("end", "orders warms up"),
        post_mark("begin", "orders reuses an ended session"),
        format!("{app} use-after-end"),
        post_mark("end", "orders reuses an ended session"),
    ]
    .join(" && ");
    let mut flags = reports.flags();
    flags.extend(["--env-var".to_string(), "MONGODB_URI".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let output = exec(&upstream, &flags, &["sh", "-c", &script]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{err}");
    assert_eq!(stdout(&output).matches("204").count(), 4, "{err}");

    let report = read_json(&reports.json);
    assert_eq!(report["marks"]["received"], 4, "{report:#}");
    assert_eq!(report["marks"]["processes"], 1, "{report:#}");
    let finding = &report["findings"][0];
    assert_eq!(finding["rule"], "use-after-end", "{report:#}");
    let tests = finding["tests"].as_array().expect("the finding's tests");
    assert_eq!(tests.len(), 1, "{finding:#}");
    assert_eq!(tests[0]["test"], "orders reuses an ended session");
    assert_eq!(tests[0]["file"], "test/orders.test.js");
    assert_eq!(tests[0]["basis"], "parent-process", "{finding:#}");
    let current = &finding["first_example"]["attribution"]["current"];
    // The connection's owner is the application, not the shell that marked.
    assert_ne!(current["pid"], tests[0]["pid"], "{current:#}");
    assert!(
        current["process"]
            .as_str()
            .is_some_and(|p| p.contains("demo-app")),
        "{current:#}"
    );
    assert!(
        err.contains("test: test/orders.test.js › orders reuses an ended session — pid "),
        "{err}"
    );
    assert!(err.contains("— through a parent process"), "{err}");
    assert!(!err.contains("orders warms up"), "{err}");
    let junit = std::fs::read_to_string(&reports.junit).unwrap();
    assert!(
        junit.contains(
            "<testcase classname=\"test/orders.test.js\" name=\"orders reuses an ended session\" time=\"0\">\n      <failure message=\"use-after-end: insert on shop.orders"
        ),
        "{junit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_marks_the_report_says_how_to_add_them() {
    let emu = emulator(EmulatorConfig::default()).await;
    let reports = Reports::new();
    let output = exec_misuse(&emu, &reports, &[], &["use-after-end"]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{err}");
    assert!(
        err.contains("sessionguard: no test marks received: to name the test behind each finding"),
        "{err}"
    );
    // Where it came from is still said: the connection's owner from /proc
    // (or why it is unknown: this application closes within milliseconds).
    assert!(
        err.contains("test: none, no test marks received — "),
        "{err}"
    );
    let report = read_json(&reports.json);
    assert_eq!(report["marks"]["received"], 0, "{report:#}");
    assert!(report["findings"][0].get("tests").is_none(), "{report:#}");
}
