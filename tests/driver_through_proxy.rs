//! The official Rust driver runs ordinary workloads through the proxy in front
//! of the emulator: everything must behave exactly as it would directly.

mod common;

use std::time::Duration;

use bson::{doc, Document};
use common::Stack;
use mongodb::options::FindOptions;
use sessionguard_emulator::EmulatorConfig;

#[tokio::test]
async fn crud_round_trips_through_the_proxy() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let people = client.database("app").collection::<Document>("people");

    people
        .insert_many(vec![
            doc! { "_id": 1, "name": "ada", "age": 36 },
            doc! { "_id": 2, "name": "alan", "age": 41 },
            doc! { "_id": 3, "name": "grace", "age": 85 },
        ])
        .await
        .unwrap();
    let found = people
        .find_one(doc! { "name": "alan" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.get_i32("age").unwrap(), 41);

    let updated = people
        .update_one(doc! { "_id": 3 }, doc! { "$inc": { "age": 1 } })
        .await
        .unwrap();
    assert_eq!(updated.modified_count, 1);
    let grace = people.find_one(doc! { "_id": 3 }).await.unwrap().unwrap();
    assert_eq!(grace.get_i32("age").unwrap(), 86);

    let deleted = people
        .delete_one(doc! { "age": { "$lt": 40 } })
        .await
        .unwrap();
    assert_eq!(deleted.deleted_count, 1);
    assert_eq!(people.count_documents(doc! {}).await.unwrap(), 2);

    // The emulator saw the commands, so they really crossed the proxy.
    assert!(stack.emulator.command_count("insert") >= 1);
    assert!(stack.emulator.command_count("update") >= 1);
    assert!(stack.emulator.command_count("delete") >= 1);
    client.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn a_cursor_needing_several_get_mores_reads_every_document() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let items = client.database("app").collection::<Document>("items");
    let docs: Vec<Document> = (0..50).map(|i| doc! { "_id": i, "n": i }).collect();
    items.insert_many(docs).await.unwrap();

    let options = FindOptions::builder()
        .batch_size(7)
        .sort(doc! { "_id": 1 })
        .build();
    let mut cursor = items.find(doc! {}).with_options(options).await.unwrap();
    let mut seen = Vec::new();
    while cursor.advance().await.unwrap() {
        seen.push(
            cursor
                .deserialize_current()
                .unwrap()
                .get_i32("_id")
                .unwrap(),
        );
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>());
    // The driver's shutdown waits for every live cursor to be dropped.
    drop(cursor);
    // 50 documents in batches of 7: one find and seven getMores.
    assert_eq!(stack.emulator.command_count("getMore"), 7);
    client.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn explicit_session_and_transactions_commit_and_abort() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let accounts = client.database("bank").collection::<Document>("accounts");
    accounts
        .insert_many(vec![
            doc! { "_id": "a", "balance": 100 },
            doc! { "_id": "b", "balance": 0 },
        ])
        .await
        .unwrap();

    let mut session = client.start_session().await.unwrap();
    // Plain operations on an explicit session.
    let a = accounts
        .find_one(doc! { "_id": "a" })
        .session(&mut session)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.get_i32("balance").unwrap(), 100);

    // A committed transfer is visible afterwards.
    session.start_transaction().await.unwrap();
    accounts
        .update_one(doc! { "_id": "a" }, doc! { "$inc": { "balance": -30 } })
        .session(&mut session)
        .await
        .unwrap();
    accounts
        .update_one(doc! { "_id": "b" }, doc! { "$inc": { "balance": 30 } })
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();

    // An aborted transfer leaves no trace.
    session.start_transaction().await.unwrap();
    accounts
        .update_one(doc! { "_id": "a" }, doc! { "$inc": { "balance": -1000 } })
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    drop(session);

    let a = accounts
        .find_one(doc! { "_id": "a" })
        .await
        .unwrap()
        .unwrap();
    let b = accounts
        .find_one(doc! { "_id": "b" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.get_i32("balance").unwrap(), 70);
    assert_eq!(b.get_i32("balance").unwrap(), 30);
    assert_eq!(stack.emulator.command_count("commitTransaction"), 1);
    assert_eq!(stack.emulator.command_count("abortTransaction"), 1);
    client.shutdown().await;
    stack.stop().await;
}

#[tokio::test]
async fn client_shutdown_ends_sessions_through_the_proxy() {
    let stack = Stack::start(EmulatorConfig::default()).await;
    let client = stack.client().await;
    let coll = client.database("app").collection::<Document>("things");
    // Concurrent operations make the driver pool several implicit sessions.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let coll = coll.clone();
        tasks.push(tokio::spawn(async move {
            coll.insert_one(doc! { "_id": i }).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(stack.emulator.ended_session_count(), 0);
    client.shutdown().await;
    let ended = Stack::eventually(Duration::from_secs(5), || {
        stack.emulator.ended_session_count() > 0
    })
    .await;
    assert!(
        ended,
        "endSessions from client.shutdown() must reach the emulator"
    );
    assert!(stack.emulator.command_count("endSessions") >= 1);
    stack.stop().await;
}

#[tokio::test]
async fn the_demo_workload_runs_through_the_proxy() {
    let stack = sessionguard::demo::DemoStack::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(stack.client_uri())
        .await
        .unwrap();
    sessionguard::demo::run_workload(&client).await.unwrap();
    let orders = client.database("demo").collection::<Document>("orders");
    // 25 inserted, one deleted, one committed in a transaction, one aborted.
    assert_eq!(orders.count_documents(doc! {}).await.unwrap(), 25);
    client.shutdown().await;
    assert!(
        stack.engine.findings().is_empty(),
        "a correct workload: {:?}",
        stack.engine.findings()
    );
    stack.stop().await;
}

/// `text` with every run of whitespace made one space (the demo wraps prose).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The demo's output with what differs between runs taken out: whitespace
/// (wrapping and column widths follow the numbers), every number, and ids
/// (hex with digits: lsids, fingerprints); `#ms` and `#s` are one unit.
fn demo_shape(text: &str) -> String {
    let text = one_line(text);
    let mut shape = String::new();
    let mut token = String::new();
    let flush = |token: &mut String, shape: &mut String| {
        let hex_id = token.chars().any(|c| c.is_ascii_digit())
            && token
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
        if hex_id {
            shape.push('#');
        } else {
            let mut digits = false;
            for c in token.chars() {
                if c.is_ascii_digit() {
                    if !digits {
                        shape.push('#');
                    }
                    digits = true;
                } else {
                    shape.push(c);
                    digits = false;
                }
            }
        }
        token.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            token.push(c);
        } else {
            flush(&mut token, &mut shape);
            shape.push(c);
        }
    }
    flush(&mut token, &mut shape);
    shape.replace("#ms", "#s")
}

/// README's copy of the demo's output (the block after its marker).
fn readme_demo_output() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let marker = readme
        .find("<!-- The output of `sessionguard demo`")
        .expect("README marks the demo's output");
    let block = &readme[marker..];
    let start = block.find("```text\n").expect("a text block") + "```text\n".len();
    let end = start + block[start..].find("\n```").expect("the block ends");
    block[start..end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_clean_then_shows_three_findings_and_exits_0() {
    use sessionguard_engine::RuleId;

    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::from(common::sessionguard_command())
            .arg("demo")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo finishes in time")
    .expect("the binary runs");
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The correct workload: every step ran, and nothing was reported.
    let clean = &out[out.find("\n1. ").expect("part 1")..out.find("\n2. ").expect("part 2")];
    assert_eq!(clean.matches("\n  ok  ").count(), 7, "{clean}");
    assert!(
        clean.contains("no session misuse: nothing to report"),
        "{clean}"
    );

    // The three bugs, each one finding with its explanation, evidence
    // (requests and the session's timeline) and fix.
    assert!(
        out.contains("\n3. What sessionguard found: 3 findings ("),
        "{out}"
    );
    let found = &out[out.find("\n3. ").unwrap()..out.find("\n4. ").expect("part 4")];
    let blocks: Vec<&str> = found.split("── finding ").skip(1).collect();
    assert_eq!(blocks.len(), 3, "{found}");
    for (block, (rule, title)) in blocks.iter().zip([
        (
            RuleId::ConcurrentUse,
            "concurrent-use: insert on demo.orders, earlier find (app shop-api, sessionguard-demo)",
        ),
        (
            RuleId::UseAfterEnd,
            "use-after-end: insert on demo.orders, earlier endSessions on demo (app checkout-lambda, mongo-rust-driver)",
        ),
        (
            RuleId::ClosedWithRequestsInFlight,
            "closed-with-requests-in-flight: insert on demo.imports (app import-job, mongo-rust-driver)",
        ),
    ]) {
        assert!(block.contains(&format!("\n  {title}\n")), "{block}");
        let text = one_line(block);
        for part in [
            "what happened",
            "evidence",
            "timeline of the session up to the violation:",
            "<- earlier request",
        ] {
            assert!(text.contains(part), "{part:?} missing: {block}");
        }
        assert!(text.contains(rule.explain()), "{block}");
        assert!(text.contains(&format!("fix {}", rule.fix())), "{block}");
    }
    // The shared session: three inserts while one find ran, one finding.
    assert!(
        blocks[0].contains("3 violations · 1 session · 4 connections · error"),
        "{}",
        blocks[0]
    );
    assert!(blocks[0].contains("<- offending request"), "{}", blocks[0]);

    // The admin URLs, the first finding's among them.
    let fingerprint = blocks[0]
        .split(" · ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the finding's id in its heading");
    assert_eq!(fingerprint.len(), 12, "{}", blocks[0]);
    for path in [
        "/findings ".to_string(),
        format!("/findings/{fingerprint} "),
        "/violations ".to_string(),
        "/metrics ".to_string(),
    ] {
        assert!(out.contains(&path), "{path} missing: {out}");
    }
    // Never document contents.
    for value in ["order-1", "ghost", "book", "item-3"] {
        assert!(!out.contains(value), "{value} printed: {out}");
    }

    // README shows what it prints (but for ports, ids, times and counts).
    let (readme, printed) = (demo_shape(&readme_demo_output()), demo_shape(&out));
    let same = readme
        .chars()
        .zip(printed.chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        readme == printed,
        "README's demo output differs from this run's from:\nREADME: {}\nrun:    {}\n\n{out}",
        readme.chars().skip(same).take(160).collect::<String>(),
        printed.chars().skip(same).take(160).collect::<String>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_keeps_its_admin_api_up_with_keep_running() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut child = tokio::process::Command::from(common::sessionguard_command())
        .args(["demo", "--keep-running"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut admin = None;
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.trim().strip_prefix("admin API           : http://") {
                admin = Some(url.parse::<std::net::SocketAddr>().unwrap());
            }
            if line.contains("Ctrl-C stops them") {
                return;
            }
        }
        panic!("the demo ended without keeping running");
    })
    .await;
    assert!(waited.is_ok(), "the demo never said it keeps running");
    let admin = admin.expect("the admin address is printed");

    let reply = common::http_get(admin, "/findings", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let findings: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    let mut rules: Vec<&str> = findings
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    rules.sort_unstable();
    assert_eq!(
        rules,
        [
            "closed-with-requests-in-flight",
            "concurrent-use",
            "use-after-end"
        ]
    );

    // Ctrl-C stops it, with success.
    let pid = rustix::process::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo stops after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
