#!/usr/bin/env bash
# Runs the interop suites: the official Node.js driver (every Node scenario
# once with mongodb 6 and once with mongodb 7, plus an Express app with
# express-session + connect-mongo, and Mongoose transactions) and PyMongo
# (threads and its asyncio API), each
# scenario (a) straight against `sessionguard emulator`, (b) through
# `sessionguard proxy` in front of it and (c) under `sessionguard exec` (CI
# mode: a private proxy per scenario, its JSON and JUnit reports checked
# against expected.json by check.py). A scenario passes when it exits 0 and
# its last stdout line is its JSON summary with "ok": true, and in exec mode
# when the report holds exactly the expected rules and exec's exit code
# matches them (see interop/README.md). Ends with "N passed, N failed"
# (scenarios waiting for a rule that does not exist yet are listed as
# PENDING on the line before); exits 1 on any failure.
#
# Installs what is missing, from the package registries only: `npm ci` in
# interop/node, and a virtualenv with requirements.txt in interop/python/.venv
# (falls back to `pip install --target` when the venv module is unavailable).
#
# Environment:
#   SESSIONGUARD_BIN   binary to use (default: `cargo build`, then the target dir's debug binary)
#   INTEROP_MODES      "direct proxy exec" (default) or any of them, in any order
#   INTEROP_ONLY       a grep -E pattern: run only the scenarios whose name matches
#                      (Node scenarios are named NAME@node6 / NAME@node7)
#   INTEROP_NODE_DRIVERS  the Node.js driver majors every `@NODE` scenario runs
#                      with, default "6 7" (see node/lib/driver.js)
#   INTEROP_INSTALL_ONLY  1: install what is missing (npm ci, the virtualenv), then exit
#   INTEROP_LATENCY    emulator reply latency, default 20ms: concurrent requests
#                      then really overlap on the wire, as over a network
#   INTEROP_TIMEOUT    seconds per scenario, default 120
#   INTEROP_LOG_DIR    where logs go (default: a fresh temporary directory)
set -euo pipefail

INTEROP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$INTEROP_DIR/.." && pwd)"
NODE_DIR="$INTEROP_DIR/node"
PY_DIR="$INTEROP_DIR/python"
MODES="${INTEROP_MODES:-direct proxy exec}"
NODE_DRIVERS="${INTEROP_NODE_DRIVERS:-6 7}"
LATENCY="${INTEROP_LATENCY:-20ms}"
SCENARIO_TIMEOUT="${INTEROP_TIMEOUT:-120}"
LOG_DIR="${INTEROP_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sessionguard-interop.XXXXXX")}"
mkdir -p "$LOG_DIR"
for mode in $MODES; do
  case "$mode" in
    direct | proxy | exec) ;;
    *) printf 'interop: unknown mode %s in INTEROP_MODES (direct, proxy or exec)\n' "$mode" >&2; exit 1 ;;
  esac
done
for major in $NODE_DRIVERS; do
  case "$major" in
    6 | 7) ;;
    *) printf 'interop: unknown Node.js driver major %s in INTEROP_NODE_DRIVERS (6 or 7)\n' "$major" >&2; exit 1 ;;
  esac
done

say() { printf '%s\n' "$*"; }
die() { printf 'interop: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- binaries
if [[ -n "${SESSIONGUARD_BIN:-}" ]]; then
  BIN="$SESSIONGUARD_BIN"
else
  say "== building sessionguard"
  (cd "$REPO_ROOT" && cargo build --locked --quiet --bin sessionguard)
  target_dir="$(cd "$REPO_ROOT" && cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  BIN="$target_dir/debug/sessionguard"
fi
[[ -x "$BIN" ]] || die "no sessionguard binary at $BIN"
# The suites pass every setting as a flag; a SESSIONGUARD_* variable left in
# the caller's environment (a config file, --fail-on, an emulator topology)
# would change what the scenarios and the exec reports are checked against.
while read -r var; do
  unset "$var"
done < <(compgen -e | grep '^SESSIONGUARD_' || true)

# ---------------------------------------------------------------- installs
# 20.19: what mongodb 7 and Mongoose 9 declare in their engines field.
command -v node >/dev/null || die "node is required (Node.js 20.19 or newer)"
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' ||
  die "Node.js 20.19 or newer is required (found $(node --version))"
command -v python3 >/dev/null || die "python3 is required"

lock_hash="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ "$(cat "$NODE_DIR/node_modules/.interop-lock-hash" 2>/dev/null || true)" != "$lock_hash" ]]; then
  say "== npm ci (interop/node)"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  printf '%s\n' "$lock_hash" >"$NODE_DIR/node_modules/.interop-lock-hash"
fi

req_hash="$(sha256sum "$PY_DIR/requirements.txt" | cut -d' ' -f1)"
PYTHON="$PY_DIR/.venv/bin/python"
PY_PATH_EXTRA=""
if [[ "$(cat "$PY_DIR/.venv/.interop-req-hash" 2>/dev/null || true)" != "$req_hash" ]]; then
  say "== pip install -r requirements.txt (interop/python/.venv)"
  rm -rf "$PY_DIR/.venv"
  if python3 -m venv "$PY_DIR/.venv" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -r "$PY_DIR/requirements.txt"
  else
    # No venv module (Debian without python3-venv): a private --target dir.
    rm -rf "$PY_DIR/.venv"
    mkdir -p "$PY_DIR/.venv/site"
    python3 -m pip install --quiet --disable-pip-version-check --target "$PY_DIR/.venv/site" \
      -r "$PY_DIR/requirements.txt"
  fi
  printf '%s\n' "$req_hash" >"$PY_DIR/.venv/.interop-req-hash"
fi
if [[ ! -x "$PYTHON" ]]; then
  PYTHON="$(command -v python3)"
  PY_PATH_EXTRA="$PY_DIR/.venv/site"
fi
if [[ "${INTEROP_INSTALL_ONLY:-}" == 1 ]]; then
  say "interop: installs are up to date"
  exit 0
fi

# ---------------------------------------------------------------- servers
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

# wait_for_field LOG MESSAGE FIELD: the FIELD of the first JSON log line whose
# message is MESSAGE (the binaries bind port 0 and log the address they got).
wait_for_field() {
  local log="$1" message="$2" field="$3" pid="$4" i value
  for i in $(seq 1 100); do
    value="$(python3 - "$log" "$message" "$field" <<'EOF'
import json, sys
log, message, field = sys.argv[1:]
try:
    for line in open(log):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == message and field in entry:
            print(entry[field])
            break
except FileNotFoundError:
    pass
EOF
)"
    if [[ -n "$value" ]]; then
      printf '%s\n' "$value"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "process $pid exited before logging '$message'"; }
    sleep 0.1
  done
  cat "$log" >&2
  die "timed out waiting for '$message' in $log"
}

"$BIN" emulator --listen 127.0.0.1:0 --latency "$LATENCY" --log-format json \
  >"$LOG_DIR/emulator.log" 2>&1 &
EMU_PID=$!
PIDS+=("$EMU_PID")
EMU_ADDR="$(wait_for_field "$LOG_DIR/emulator.log" "emulator listening" addr "$EMU_PID")"

SERVER_LOGS=(emulator)
PROXY_ADDR=""
if [[ " $MODES " == *" proxy "* ]]; then
  "$BIN" proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --upstream "mongodb://$EMU_ADDR" \
    --log-format json >"$LOG_DIR/proxy.log" 2>&1 &
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  PROXY_ADDR="$(wait_for_field "$LOG_DIR/proxy.log" "proxy listening" listen "$PROXY_PID")"
  SERVER_LOGS+=(proxy)
fi
say "== emulator $EMU_ADDR (latency $LATENCY)${PROXY_ADDR:+, proxy $PROXY_ADDR}; logs in $LOG_DIR"

# ---------------------------------------------------------------- scenarios
# name|directory|command...   (name = the "scenario" field the program prints)
# A name ending in @NODE runs once per major of INTEROP_NODE_DRIVERS, as
# NAME@node6 and NAME@node7; a name ending in @nodeN runs with that major
# only (Mongoose 9 brings mongodb 7). The runner passes the major in
# INTEROP_NODE_DRIVER, and node/lib/harness.js names the scenario after it.
SCENARIO_TABLE=(
  "bad-connect-close-race@NODE|node|node scenarios/bad-connect-close-race.js"
  "bad-endsession-not-awaited@NODE|node|node scenarios/bad-endsession-not-awaited.js"
  "bad-global-session@NODE|node|node scenarios/bad-global-session.js"
  "bad-global-session-txn@NODE|node|node scenarios/bad-global-session-txn.js"
  "bad-swallowed-txn-error@NODE|node|node scenarios/bad-swallowed-txn-error.js"
  "good-persistent-client@NODE|node|node scenarios/good-persistent-client.js"
  "good-awaited-session@NODE|node|node scenarios/good-awaited-session.js"
  "good-per-operation-session@NODE|node|node scenarios/good-per-operation-session.js"
  "good-with-transaction@NODE|node|node scenarios/good-with-transaction.js"
  "mongoose-bad-txn-promise-all@node7|node|node scenarios/mongoose-transaction.js bad-promise-all"
  "mongoose-good-txn-sequential@node7|node|node scenarios/mongoose-transaction.js good-sequential"
  "express-session-flow@NODE|node|node scenarios/express-session-flow.js"
  "express-resurrection-bad@NODE|node|node scenarios/express-resurrection.js bad"
  "express-resurrection-fixed-recheck@NODE|node|node scenarios/express-resurrection.js fixed-recheck"
  "express-resurrection-fixed-touch-only@NODE|node|node scenarios/express-resurrection.js fixed-touch-only"
  "py-explicit-sessions|python|PYTHON scenarios/explicit_sessions.py"
  "py-transaction|python|PYTHON scenarios/transaction.py"
  "py-shared-session-threads|python|PYTHON scenarios/shared_session_threads.py"
  "py-clean-run|python|PYTHON scenarios/clean_run.py"
  "py-async-shared-session|python|PYTHON scenarios/async_shared_session.py"
  "py-async-sessions|python|PYTHON scenarios/async_sessions.py"
  "py-async-transaction|python|PYTHON scenarios/async_transaction.py"
  "node-protocol-probe@NODE|node|node scenarios/node-protocol-probe.js"
  "py-protocol-probe|python|PYTHON scenarios/protocol_probe.py"
)
SCENARIOS=()
for entry in "${SCENARIO_TABLE[@]}"; do
  name="${entry%%|*}"
  if [[ "$name" == *@NODE ]]; then
    for major in $NODE_DRIVERS; do
      SCENARIOS+=("${name%@NODE}@node$major|${entry#*|}")
    done
  elif [[ "$name" != *@node* || " $NODE_DRIVERS " == *" ${name##*@node} "* ]]; then
    SCENARIOS+=("$entry")
  fi
done

# A pattern matching no scenario (a typo, an invalid regex) would otherwise
# run nothing and report "0 passed, 0 failed" as success.
if [[ -n "${INTEROP_ONLY:-}" ]]; then
  matched=0
  for entry in "${SCENARIOS[@]}"; do
    if grep -Eq -- "$INTEROP_ONLY" <<<"${entry%%|*}" 2>/dev/null; then
      matched=$((matched + 1))
    fi
  done
  [[ $matched -gt 0 ]] || die "INTEROP_ONLY='$INTEROP_ONLY' matches no scenario (or is not a valid grep -E pattern)"
fi

# scenario_uri TARGET DB: the connection string a scenario gets (exec gets
# it as --upstream and hands its child the same one with its own address).
# Every mode talks to one member today: directConnection, because a
# replica-set-aware driver would otherwise discover the emulator's own
# address from hello and bypass the proxy. A replica-set mode (several
# members, the proxy's per-member listeners) would pass a host list and
# replicaSet=rs0 here instead; nothing else in the loop depends on it.
scenario_uri() {
  printf 'mongodb://%s/%s?directConnection=true' "$1" "$2"
}

CHECK="$INTEROP_DIR/check.py"
EXPECTED="$INTEROP_DIR/expected.json"

passed=0
failed=0
failures=()
pending=()
for mode in $MODES; do
  case "$mode" in
    direct) target="$EMU_ADDR"; say "== direct (emulator $target)" ;;
    proxy) target="$PROXY_ADDR"; say "== proxy ($target)" ;;
    exec) target="$EMU_ADDR"; say "== exec (sessionguard exec per scenario, upstream $target; reports checked against expected.json)" ;;
  esac
  for entry in "${SCENARIOS[@]}"; do
    IFS='|' read -r name dir command <<<"$entry"
    if [[ -n "${INTEROP_ONLY:-}" ]] && ! grep -Eq -- "$INTEROP_ONLY" <<<"$name"; then
      continue
    fi
    command="${command/PYTHON/$PYTHON}"
    # The driver major of a NAME@nodeN scenario (empty for Python).
    node_driver=""
    [[ "$name" == *@node* ]] && node_driver="${name##*@node}"
    # '@' has no place in a database name or a URI path.
    db="interop_${mode}_${name//[-@]/_}"
    uri="$(scenario_uri "$target" "$db")"
    out="$LOG_DIR/$mode.$name.stdout"
    err="$LOG_DIR/$mode.$name.stderr"
    status=0
    if [[ "$mode" == exec ]]; then
      # exec hands the child this URI with its own address instead of the
      # emulator's (database and options kept, directConnection=true added).
      report="$LOG_DIR/exec.$name.report.json"
      junit="$LOG_DIR/exec.$name.junit.xml"
      rm -f "$report" "$junit"
      (cd "$INTEROP_DIR/$dir" && INTEROP_MODE="$mode" INTEROP_NODE_DRIVER="$node_driver" PYTHONPATH="$PY_PATH_EXTRA" \
        timeout --kill-after=5 "$SCENARIO_TIMEOUT" "$BIN" exec --upstream "$uri" --log-format json \
        --report "$report" --junit "$junit" -- $command >"$out" 2>"$err") || status=$?
      verdict=0
      detail="$(python3 "$CHECK" exec "$EXPECTED" "$name" "$status" "$out" "$report" "$junit")" || verdict=$?
    else
      (cd "$INTEROP_DIR/$dir" && MONGODB_URI="$uri" INTEROP_MODE="$mode" INTEROP_NODE_DRIVER="$node_driver" \
        PYTHONPATH="$PY_PATH_EXTRA" timeout --kill-after=5 "$SCENARIO_TIMEOUT" $command >"$out" 2>"$err") || status=$?
      verdict=0
      detail="$(python3 "$CHECK" summary "$out" "$name")" || verdict=$?
      [[ $status -eq 0 ]] || verdict=1
      detail="exit=$status $detail"
    fi
    [[ $status -eq 124 || $status -eq 137 ]] && detail="timed out after ${SCENARIO_TIMEOUT}s; $detail"
    case "$verdict" in
      0)
        passed=$((passed + 1))
        say "PASS $mode/$name $detail"
        ;;
      2)
        # Waits for a rule that does not exist yet: neither passed nor failed.
        pending+=("$mode/$name")
        say "PENDING $mode/$name $detail"
        ;;
      *)
        failed=$((failed + 1))
        failures+=("$mode/$name")
        say "FAIL $mode/$name $detail"
        say "    stderr ($err):"
        sed 's/^/    | /' "$err" | tail -n 15
        ;;
    esac
  done
done

# Anything the servers themselves complained about (malformed frames, ...).
for log in "${SERVER_LOGS[@]}"; do
  warnings="$(grep -c '"level":"\(WARN\|ERROR\)"' "$LOG_DIR/$log.log" || true)"
  if [[ "$warnings" != "0" ]]; then
    say "note: $log logged $warnings warning/error lines (see $LOG_DIR/$log.log):"
    # grep -m, not head: under pipefail an early-closing reader would fail the run (SIGPIPE).
    grep -m 5 '"level":"\(WARN\|ERROR\)"' "$LOG_DIR/$log.log" | sed 's/^/    | /' || true
  fi
done

if [[ ${#pending[@]} -gt 0 ]]; then
  say "pending (not counted as passed or failed): ${pending[*]} — see the PENDING lines above"
fi
if [[ $failed -gt 0 ]]; then
  say "failed: ${failures[*]}"
fi
say "$passed passed, $failed failed"
[[ $((passed + failed + ${#pending[@]})) -gt 0 ]] || die "no scenario ran"
[[ $failed -eq 0 ]]
