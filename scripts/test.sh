#!/usr/bin/env bash
# Runs every test suite sessionguard has. This is the test command named in
# README.md, and the one .ci/run calls. It assumes the toolchains are present
# (Rust; later Node.js and Python for the interop suites) and installs nothing
# system-wide itself: .ci/run does that on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

echo "== cargo test (unit, integration, property tests)"
cargo test --all-targets --locked
