//! The dev tools' demo (`sessionguard-dev demo`): its workload runs
//! through the proxy without a finding, and the binary shows a correct
//! workload, then three session bugs and what sessionguard found, exactly as
//! README's copy of its output says.

use sessionguard_test_support as common;

use std::time::Duration;

use bson::{doc, Document};

#[tokio::test]
async fn the_demo_workload_runs_through_the_proxy() {
    let stack = sessionguard_dev::demo::DemoStack::start().await.unwrap();
    let client = mongodb::Client::with_uri_str(stack.client_uri())
        .await
        .unwrap();
    sessionguard_dev::demo::run_workload(&client).await.unwrap();
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
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let marker = readme
        .find("<!-- The output of `sessionguard-dev demo`")
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
        tokio::process::Command::from(common::dev_command())
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

    let mut child = tokio::process::Command::from(common::dev_command())
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
