//! Operating without restarts, through the real `sessionguard` binary:
//! `--mode` and `SESSIONGUARD_MODE` (for `proxy`; `exec`'s is in the dev
//! tools' exec_cli tests, its child being their binary), and the live
//! reload of `[sessions] mode` and `[rules.*]` on SIGHUP and on
//! `POST /reload`. A reload takes effect on the next request of a driver
//! connection that stayed open, keeps the ledger (a session ended before the
//! reload is still known as ended after it), refuses a bad file naming the
//! key (the old configuration stays in force), and names the settings that
//! changed but need a restart. Every wait is on something the process shows
//! (a log line, an admin answer), never a bare sleep.

use sessionguard_test_support as common;

use std::net::SocketAddr;
use std::time::Duration;

use bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::{Client, ClientSession};
use sessionguard_emulator::{Emulator, EmulatorConfig, EmulatorHandle};
use sessionguard_engine::SESSIONGUARD_VIOLATION_CODE;

use common::{http_get, http_request, metric, ProxyProcess};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "reload-T0ken-0123456789";

async fn emulator() -> EmulatorHandle {
    Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default())
        .await
        .expect("emulator starts")
}

/// A configuration file: loopback ports, JSON logs, `proxy_keys` under
/// `[proxy]`, then `tables`.
fn config(upstream: SocketAddr, proxy_keys: &str, tables: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         upstream = \"mongodb://{upstream}\"\n{proxy_keys}\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n\n{tables}\n"
    )
}

fn rewrite_config(proxy: &ProxyProcess, text: &str) {
    std::fs::write(proxy.dir.path().join("sessionguard.toml"), text).expect("config rewritten");
}

fn sighup(proxy: &ProxyProcess) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(proxy.child.id()).unwrap())
        .expect("a child pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP sent");
}

/// Every JSON log line whose message is `message`, in order.
fn log_lines(proxy: &ProxyProcess, message: &str) -> Vec<serde_json::Value> {
    proxy
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["message"] == message)
        .collect()
}

/// Waits until the log holds `count` lines with `message`; returns the last.
async fn wait_for_line(proxy: &mut ProxyProcess, message: &str, count: usize) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let lines = log_lines(proxy, message);
        if lines.len() >= count {
            return lines[count - 1].clone();
        }
        if let Ok(Some(status)) = proxy.child.try_wait() {
            panic!(
                "the proxy exited ({status}) before logging `{message}`:\n{}",
                proxy.log_text()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {count} `{message}` log lines within {WAIT:?}:\n{}",
            proxy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One pooled connection: every command of the test travels on the same
/// client connection, which stays open across reloads.
async fn client(proxy: &ProxyProcess) -> Client {
    Client::with_uri_str(format!(
        "mongodb://{}/?directConnection=true&maxPoolSize=1&appName=reload-test",
        proxy.listen
    ))
    .await
    .expect("client options parse")
}

async fn start_used_session(client: &Client) -> ClientSession {
    let mut session = client.start_session().await.unwrap();
    client
        .database("shop")
        .collection::<Document>("orders")
        .insert_one(doc! { "item": "book" })
        .session(&mut session)
        .await
        .expect("a clean insert");
    session
}

/// `endSessions` for `session`, sent as the application's own command.
async fn end(client: &Client, session: &ClientSession) {
    client
        .database("shop")
        .run_command(doc! { "endSessions": [session.id().clone()] })
        .await
        .expect("endSessions");
}

/// A read with `session` (after `end`: use-after-end).
async fn read(client: &Client, session: &mut ClientSession) -> mongodb::error::Result<()> {
    client
        .database("shop")
        .collection::<Document>("orders")
        .find_one(doc! {})
        .session(session)
        .await
        .map(|_| ())
}

async fn use_after_end(client: &Client, session: &mut ClientSession) -> mongodb::error::Result<()> {
    end(client, session).await;
    read(client, session).await
}

fn assert_rejected(result: mongodb::error::Result<()>) {
    let error = result.expect_err("the misuse is rejected");
    match error.kind.as_ref() {
        ErrorKind::Command(e) => {
            assert_eq!(e.code, SESSIONGUARD_VIOLATION_CODE, "{e:?}");
            assert!(e.message.contains("use-after-end"), "{e:?}");
        }
        other => panic!("expected sessionguard's command error, got {other:?}"),
    }
}

/// `/violations` (with the token when given).
async fn violations(proxy: &ProxyProcess, token: Option<&str>) -> Vec<serde_json::Value> {
    let reply = http_get(proxy.admin, "/violations", token).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str::<Vec<serde_json::Value>>(&reply.body).expect("a JSON array")
}

async fn metrics(proxy: &ProxyProcess) -> String {
    let reply = http_get(proxy.admin, "/metrics", None).await;
    assert_eq!(reply.status, 200);
    reply.body
}

/// Ends the client, then the proxy (SIGTERM: it must exit cleanly).
async fn stop(session: ClientSession, client: Client, mut proxy: ProxyProcess) {
    drop(session);
    client.shutdown().await;
    proxy.terminate();
}

fn text_list(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("an array: {value}"))
        .iter()
        .map(|v| v.as_str().expect("strings").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_turns_a_rule_to_reject_for_the_next_request_on_an_open_connection() {
    let emulator = emulator().await;
    let observe = config(
        emulator.addr(),
        "",
        "[rules.use-after-end]\naction = \"log\"\n",
    );
    let mut proxy = ProxyProcess::start(&observe, &[]);
    let client = client(&proxy).await;
    let mut session = start_used_session(&client).await;
    use_after_end(&client, &mut session)
        .await
        .expect("action = log: the misuse is only logged");

    // Ended before the reload, used after it: the ledger must still know.
    end(&client, &session).await;
    rewrite_config(
        &proxy,
        &observe.replace("action = \"log\"", "action = \"reject\""),
    );
    sighup(&proxy);
    let reloaded = wait_for_line(&mut proxy, "configuration reloaded", 1).await;
    let changes = reloaded["changes"].as_str().unwrap_or_default();
    assert!(
        changes.contains("rules.use-after-end.action: log -> reject"),
        "{reloaded}"
    );
    assert_rejected(read(&client, &mut session).await);

    let found = violations(&proxy, None).await;
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[0]["rejected"], false);
    assert_eq!(found[1]["rejected"], true);
    assert_eq!(found[1]["action"], "reject");
    let connection = |v: &serde_json::Value| v["evidence"]["current"]["connection_id"].clone();
    assert_eq!(
        connection(&found[0]),
        connection(&found[1]),
        "the same client connection, open across the reload"
    );
    let exposition = metrics(&proxy).await;
    assert_eq!(
        metric(
            &exposition,
            "sessionguard_config_reloads_total{result=\"success\"}"
        ),
        Some(1.0),
        "{exposition}"
    );
    assert_eq!(
        metric(&exposition, "sessionguard_config_last_reload_successful"),
        Some(1.0)
    );
    assert!(
        metric(&exposition, "sessionguard_config_hash").is_some_and(|hash| hash > 0.0),
        "{exposition}"
    );

    stop(session, client, proxy).await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_with_the_token_switches_the_mode() {
    let emulator = emulator().await;
    let token_key = format!("admin_token = \"{TOKEN}\"");
    let observe = config(emulator.addr(), &token_key, "");
    let mut proxy = ProxyProcess::start(&observe, &[]);
    let client = client(&proxy).await;
    let mut session = start_used_session(&client).await;
    use_after_end(&client, &mut session)
        .await
        .expect("observe: the misuse is only logged");

    // The token applies as for every protected route; only POST reloads.
    let anonymous = http_request(proxy.admin, "POST", "/reload", None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    let get = http_request(proxy.admin, "GET", "/reload", Some(TOKEN)).await;
    assert_eq!(get.status, 405, "{}", get.body);
    assert_eq!(get.headers.get("allow").map(String::as_str), Some("POST"));
    let post_metrics = http_request(proxy.admin, "POST", "/metrics", None).await;
    assert_eq!(post_metrics.status, 405);
    assert_eq!(
        post_metrics.headers.get("allow").map(String::as_str),
        Some("GET")
    );
    assert!(
        log_lines(&proxy, "configuration reloaded").is_empty(),
        "refused requests reload nothing"
    );

    rewrite_config(
        &proxy,
        &config(
            emulator.addr(),
            &token_key,
            "[sessions]\nmode = \"enforce\"\n",
        ),
    );
    let reply = http_request(proxy.admin, "POST", "/reload", Some(TOKEN)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    let changes = text_list(&body["changes"]);
    assert!(
        changes
            .iter()
            .any(|c| c == "sessions.mode: observe -> enforce"),
        "{body}"
    );
    assert_eq!(text_list(&body["needs_restart"]), Vec::<String>::new());
    wait_for_line(&mut proxy, "configuration reloaded", 1).await;

    assert_rejected(use_after_end(&client, &mut session).await);
    let found = violations(&proxy, Some(TOKEN)).await;
    assert_eq!(found.len(), 2, "{found:#?}");
    assert_eq!(found[1]["rejected"], true);

    stop(session, client, proxy).await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_refused_naming_the_key_and_the_old_rules_stay() {
    let emulator = emulator().await;
    let token_key = format!("admin_token = \"{TOKEN}\"");
    let good = config(
        emulator.addr(),
        &token_key,
        "[rules.use-after-end]\naction = \"log\"\n",
    );
    let mut proxy = ProxyProcess::start(&good, &[]);
    let client = client(&proxy).await;
    let mut session = start_used_session(&client).await;

    // A bad value, by SIGHUP: refused, the log names the key.
    rewrite_config(&proxy, &good.replace("\"log\"", "\"block\""));
    sighup(&proxy);
    let refused = wait_for_line(&mut proxy, "configuration reload refused", 1).await;
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(error.contains("rules.use-after-end.action:"), "{refused}");
    assert!(error.contains("block"), "{refused}");

    // A bad key, by POST: 400 with the same message as the log.
    rewrite_config(
        &proxy,
        &good.replace("action = \"log\"", "actoin = \"reject\""),
    );
    let reply = http_request(proxy.admin, "POST", "/reload", Some(TOKEN)).await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(
        reply.body.contains("rules.use-after-end.actoin:"),
        "{}",
        reply.body
    );
    let refused = wait_for_line(&mut proxy, "configuration reload refused", 2).await;
    assert_eq!(
        refused["error"].as_str().map(str::trim),
        Some(reply.body.trim()),
        "the answer and the log say the same"
    );

    // The old configuration is still in force: the misuse is only logged.
    use_after_end(&client, &mut session)
        .await
        .expect("still action = log");
    let found = violations(&proxy, Some(TOKEN)).await;
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["rejected"], false);
    let exposition = metrics(&proxy).await;
    assert_eq!(
        metric(
            &exposition,
            "sessionguard_config_reloads_total{result=\"failure\"}"
        ),
        Some(2.0),
        "{exposition}"
    );
    assert_eq!(
        metric(&exposition, "sessionguard_config_last_reload_successful"),
        Some(0.0)
    );
    assert!(log_lines(&proxy, "configuration reloaded").is_empty());

    stop(session, client, proxy).await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_need_a_restart_are_named_and_the_live_part_applies() {
    let emulator = emulator().await;
    let before = config(emulator.addr(), "max_connections = 100", "");
    let mut proxy = ProxyProcess::start(&before, &[]);
    let client = client(&proxy).await;
    let mut session = start_used_session(&client).await;

    rewrite_config(
        &proxy,
        &config(
            emulator.addr(),
            "max_connections = 5\ndrain_grace = \"5s\"",
            "[sessions]\nmax_sessions = 500\n[rules.use-after-end]\naction = \"reject\"\n",
        ),
    );
    let reply = http_request(proxy.admin, "POST", "/reload", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(
        text_list(&body["needs_restart"]),
        [
            "proxy.drain_grace",
            "proxy.max_connections",
            "sessions.max_sessions"
        ],
        "{body}"
    );
    assert!(
        text_list(&body["changes"])
            .iter()
            .any(|c| c == "rules.use-after-end.action: log -> reject"),
        "{body}"
    );
    let logged = wait_for_line(&mut proxy, "configuration reloaded", 1).await;
    assert_eq!(logged["level"], "WARN", "{logged}");
    assert_eq!(
        logged["needs_restart"],
        "proxy.drain_grace, proxy.max_connections, sessions.max_sessions"
    );
    assert_rejected(use_after_end(&client, &mut session).await);

    stop(session, client, proxy).await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_flag_and_environment_override_the_file_and_survive_a_reload() {
    let emulator = emulator().await;
    let file = config(emulator.addr(), "", "[sessions]\nmode = \"observe\"\n");
    /// Flags, environment, and whether the misuse is rejected.
    struct Case {
        args: &'static [&'static str],
        env: &'static [(&'static str, &'static str)],
        rejects: bool,
    }
    let cases = [
        Case {
            args: &["--mode", "enforce"],
            env: &[],
            rejects: true,
        },
        Case {
            args: &[],
            env: &[("SESSIONGUARD_MODE", "enforce")],
            rejects: true,
        },
        // The flag wins over the environment.
        Case {
            args: &["--mode", "observe"],
            env: &[("SESSIONGUARD_MODE", "enforce")],
            rejects: false,
        },
    ];
    for Case { args, env, rejects } in cases {
        let mut proxy = ProxyProcess::start_with_env(&file, args, env);
        let client = client(&proxy).await;
        let mut session = start_used_session(&client).await;
        let outcome = use_after_end(&client, &mut session).await;
        if rejects {
            assert_rejected(outcome);
        } else {
            outcome.expect("observe");
        }
        // A reload re-reads the file but keeps the flag's / variable's mode.
        let reply = http_request(proxy.admin, "POST", "/reload", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        wait_for_line(&mut proxy, "configuration reloaded", 1).await;
        let outcome = use_after_end(&client, &mut session).await;
        if rejects {
            assert_rejected(outcome);
        } else {
            outcome.expect("observe");
        }
        stop(session, client, proxy).await;
    }
    emulator.shutdown().await;
}
