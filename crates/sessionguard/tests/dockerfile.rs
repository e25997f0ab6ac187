//! The Dockerfile, checked by reading it (no Docker engine runs here): its
//! `cargo build` is the release build the README and CI use (same profile,
//! `--locked`, this package and nothing else, no extra features), the build
//! stage copies
//! everything that build needs and every copied path exists, and the runtime
//! stage is wired consistently: the binary it copies is the one the build
//! produced, it runs as a non-root user, it exposes the ports its environment
//! makes the proxy and admin API listen on, its HEALTHCHECK asks the admin
//! API's `/healthz`, its environment variables are ones sessionguard reads,
//! and the config file it starts with is the one it copied.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The repository (the workspace root).
fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// This package's directory, relative to the repository.
const PACKAGE_DIR: &str = "crates/sessionguard";

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One Dockerfile instruction: keyword (upper case) and its arguments, with
/// continuation lines joined and comments dropped.
#[derive(Debug, Clone)]
struct Instruction {
    keyword: String,
    args: String,
}

fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
        current.clear();
    }
    out
}

/// Instructions split into stages (each starting at a FROM).
fn stages(all: &[Instruction]) -> Vec<Vec<Instruction>> {
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for instruction in all {
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(instruction.clone());
        }
    }
    stages
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// `["a", "b"]` (exec form) or `a b` (shell form).
fn exec_form(args: &str) -> Vec<String> {
    let args = args.trim();
    if args.starts_with('[') {
        let list: Vec<String> = serde_json::from_str(args).expect("valid exec-form JSON");
        list
    } else {
        words(args)
    }
}

/// The shipped package's name (its binary has the same name).
fn package_name() -> String {
    let manifest: toml::Value =
        toml::from_str(&read(&format!("{PACKAGE_DIR}/Cargo.toml"))).unwrap();
    manifest["package"]["name"].as_str().unwrap().to_string()
}

/// The flags of the one `cargo build` the build stage runs.
fn cargo_build_flags(build: &[Instruction]) -> Vec<String> {
    let runs: Vec<&Instruction> = build
        .iter()
        .filter(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .collect();
    assert_eq!(
        runs.len(),
        1,
        "expected exactly one `cargo build`: {runs:?}"
    );
    let command = runs[0]
        .args
        .split("&&")
        .find(|c| c.contains("cargo build"))
        .unwrap();
    let tokens = words(command);
    let at = tokens.iter().position(|t| t == "build").unwrap();
    tokens[at + 1..].to_vec()
}

#[test]
fn the_build_is_the_release_build_the_readme_and_ci_use() {
    let all = instructions(&read("Dockerfile"));
    let stages = stages(&all);
    assert!(stages.len() >= 2, "multi-stage build expected");
    let flags = cargo_build_flags(&stages[0]);

    // The README's release build: its flags must all be in the image build.
    let readme = read("README.md");
    let readme_release: Vec<String> = readme
        .lines()
        .find(|l| l.trim_start().starts_with("cargo build") && l.contains("--release"))
        .map(|l| {
            words(l)
                .into_iter()
                .skip(2)
                .take_while(|w| w != "--" && !w.starts_with('#'))
                .collect()
        })
        .expect("README shows a release build");
    for flag in &readme_release {
        assert!(
            flags.contains(flag),
            "README uses {flag}; Dockerfile: {flags:?}"
        );
    }
    // CI builds with the lock file exactly as committed.
    let ci = read("scripts/test.sh");
    assert!(ci.contains("--locked"));
    assert!(flags.contains(&"--locked".to_string()), "{flags:?}");

    // The package is the shipped one, and nothing else changes what is
    // compiled (features, profiles, targets) compared with CI.
    let package = package_name();
    let at = flags
        .iter()
        .position(|f| f == "-p" || f == "--package")
        .expect("-p names the package");
    assert_eq!(flags.get(at + 1), Some(&package));
    assert!(root().join(PACKAGE_DIR).join("src/main.rs").exists());
    let allowed: BTreeSet<&str> = ["--release", "--locked", "-p", "--package", package.as_str()]
        .into_iter()
        .collect();
    for flag in &flags {
        assert!(
            allowed.contains(flag.as_str()),
            "`{flag}` makes the image differ from the tested build"
        );
    }
}

/// `COPY [--chown=..] SRC... DEST` sources (not `--from` copies).
fn copy_sources(stage: &[Instruction]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for instruction in stage.iter().filter(|i| i.keyword == "COPY") {
        let parts = words(&instruction.args);
        if parts.iter().any(|p| p.starts_with("--from")) {
            continue;
        }
        let parts: Vec<String> = parts.into_iter().filter(|p| !p.starts_with("--")).collect();
        let (dest, sources) = parts.split_last().expect("COPY has a destination");
        for source in sources {
            out.push((source.clone(), dest.clone()));
        }
    }
    out
}

/// Files the compiler reads outside `src/` (include_str!/include_bytes!
/// outside test modules), relative to the repository root.
fn compile_time_inputs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            compile_time_inputs(&path, out);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = match text.find("#[cfg(test)]") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for (at, _) in code.match_indices(macro_name) {
                let rest = &code[at + macro_name.len()..];
                let relative = &rest[..rest.find('"').unwrap()];
                let file = path.parent().unwrap().join(relative);
                out.push(file.strip_prefix(root()).unwrap_or(&file).to_path_buf());
            }
        }
    }
}

#[test]
fn every_copied_path_exists_and_the_build_has_what_it_needs() {
    let all = instructions(&read("Dockerfile"));
    let stages = stages(&all);
    for stage in &stages {
        for (source, _) in copy_sources(stage) {
            assert!(
                root().join(&source).exists(),
                "Dockerfile copies `{source}`, which is not in the repository"
            );
        }
    }

    // Everything `cargo build` reads is copied into the build stage before it.
    let build = &stages[0];
    let build_at = build
        .iter()
        .position(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .unwrap();
    let copied: Vec<String> = copy_sources(&build[..build_at])
        .into_iter()
        .map(|(source, _)| source.trim_end_matches('/').to_string())
        .collect();
    // Cargo reads every workspace member's manifest (and the targets they
    // declare), whichever package it builds.
    let mut needed: Vec<PathBuf> = vec!["Cargo.toml".into(), "Cargo.lock".into()];
    if root().join(".cargo").exists() {
        needed.push(".cargo".into());
    }
    let workspace: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let members = workspace["workspace"]["members"].as_array().unwrap();
    for member in members.iter().map(|m| m.as_str().unwrap()) {
        needed.push(format!("{member}/Cargo.toml").into());
        for optional in ["src", "build.rs", "benches"] {
            if root().join(member).join(optional).exists() {
                needed.push(format!("{member}/{optional}").into());
            }
        }
        compile_time_inputs(&root().join(member).join("src"), &mut needed);
    }
    for need in needed {
        let need = need.to_string_lossy().to_string();
        assert!(
            copied
                .iter()
                .any(|c| need == *c || need.starts_with(&format!("{c}/"))),
            "the build needs `{need}` but the build stage copies only {copied:?}"
        );
    }
}

fn env_of(stage: &[Instruction]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for instruction in stage.iter().filter(|i| i.keyword == "ENV") {
        for pair in words(&instruction.args) {
            if let Some((key, value)) = pair.split_once('=') {
                out.push((key.to_string(), value.trim_matches('"').to_string()));
            }
        }
    }
    out
}

fn port_of(addr: &str) -> String {
    addr.rsplit_once(':').unwrap().1.to_string()
}

#[test]
fn the_runtime_stage_is_non_root_exposes_its_ports_and_checks_healthz() {
    let all = instructions(&read("Dockerfile"));
    let stages = stages(&all);
    let build = &stages[0];
    let runtime = stages.last().unwrap();

    // The binary copied is the one built.
    let stage_name = words(&build[0].args)
        .into_iter()
        .skip_while(|w| !w.eq_ignore_ascii_case("as"))
        .nth(1)
        .expect("the build stage is named");
    let workdir = build
        .iter()
        .rev()
        .find(|i| i.keyword == "WORKDIR")
        .map(|i| i.args.clone())
        .expect("WORKDIR in the build stage");
    let bin = package_name();
    let built = format!("{}/target/release/{bin}", workdir.trim_end_matches('/'));
    let copy = runtime
        .iter()
        .find(|i| i.keyword == "COPY" && i.args.contains(&format!("--from={stage_name}")))
        .expect("the runtime copies from the build stage");
    let parts = words(&copy.args);
    assert_eq!(parts[1], built, "{copy:?}");
    let installed = parts[2].clone();

    // Non-root.
    let user = runtime
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("USER in the runtime stage");
    assert!(
        user.args != "root" && user.args != "0" && !user.args.starts_with("0:"),
        "runs as root"
    );

    // Environment variables are real, and the ports they set are exposed.
    let main = read(&format!("{PACKAGE_DIR}/src/main.rs"));
    let env = env_of(runtime);
    for (key, _) in &env {
        if key.starts_with("SESSIONGUARD_") {
            assert!(
                main.contains(&format!("env = \"{key}\"")),
                "{key} is not read by sessionguard"
            );
        }
    }
    let exposed: BTreeSet<String> = runtime
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| words(&i.args))
        .map(|p| p.trim_end_matches("/tcp").to_string())
        .collect();
    let listen = env
        .iter()
        .find(|(k, _)| k == "SESSIONGUARD_LISTEN")
        .map(|(_, v)| v.clone())
        .expect("the proxy listens on all interfaces in a container");
    let admin = env
        .iter()
        .find(|(k, _)| k == "SESSIONGUARD_ADMIN")
        .map(|(_, v)| v.clone())
        .expect("the admin API listens on all interfaces in a container");
    assert!(listen.starts_with("0.0.0.0:") && admin.starts_with("0.0.0.0:"));
    assert!(exposed.contains(&port_of(&listen)), "{exposed:?}");
    assert!(exposed.contains(&port_of(&admin)), "{exposed:?}");

    // The health check asks the admin API's /healthz.
    let health = runtime
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    assert!(
        health
            .args
            .contains(&format!(":{}/healthz", port_of(&admin))),
        "{health:?}"
    );
    assert!(read(&format!("{PACKAGE_DIR}/src/admin.rs")).contains("\"/healthz\""));
    // curl must be installed for it.
    assert!(runtime
        .iter()
        .any(|i| i.keyword == "RUN" && i.args.contains("curl")));

    // It starts the installed binary with the config file it copied.
    let entrypoint = runtime
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .map(|i| exec_form(&i.args))
        .expect("ENTRYPOINT");
    assert_eq!(entrypoint, vec![installed]);
    let cmd = runtime
        .iter()
        .find(|i| i.keyword == "CMD")
        .map(|i| exec_form(&i.args))
        .expect("CMD");
    assert_eq!(cmd.first().map(String::as_str), Some("proxy"));
    let config_at = cmd.iter().position(|a| a == "--config").expect("--config");
    let config_path = &cmd[config_at + 1];
    let copied_config = copy_sources(runtime)
        .into_iter()
        .find(|(source, _)| source == "config/sessionguard.toml")
        .expect("the example config is copied");
    assert_eq!(&copied_config.1, config_path);
}

#[test]
fn the_parser_reads_continuations_and_exec_forms() {
    let parsed =
        instructions("# comment\nFROM a AS b\nRUN one \\\n  && two\nCMD [\"x\", \"--y\"]\n");
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[1].keyword, "RUN");
    assert!(parsed[1].args.contains("one") && parsed[1].args.contains("&& two"));
    assert_eq!(exec_form(&parsed[2].args), vec!["x", "--y"]);
}
