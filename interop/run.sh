#!/usr/bin/env bash
# Runs the interop suites: the official Node.js driver (every Node scenario
# once with mongodb 6 and once with mongodb 7, plus an Express app with
# express-session + connect-mongo, and Mongoose transactions) and PyMongo
# (threads and its asyncio API), each scenario against the deployment it
# names (see "Deployments" below: one emulator, a three-member replica set
# for failovers, or an emulator that refuses session kills) (a) straight
# against `sessionguard-dev emulator`, (b) through a shared `sessionguard proxy`
# in front of it, (c) through a shared proxy in enforce mode (refusing
# deployments) and (d) under `sessionguard exec` (CI mode: a private proxy per
# scenario, its JSON and JUnit reports checked against expected.json by
# check.py). A scenario passes when it exits 0 and its last stdout line is its
# JSON summary with "ok": true; in exec mode, and through the shared proxies
# of the replica set and the refusing deployments (read from their admin API
# after each scenario), when the violations are exactly the expected rules
# (see interop/README.md). Ends with "N passed, N failed" (scenarios waiting
# on a change not made yet are listed as PENDING on the line before); exits 1
# on any failure.
#
# Installs what is missing, from the package registries only: `npm ci` in
# interop/node, and a virtualenv with requirements.txt in interop/python/.venv
# (falls back to `pip install --target` when the venv module is unavailable).
#
# Environment:
#   SESSIONGUARD_BIN   the proxy binary to use (default: `cargo build`, then the
#                      target dir's debug binary)
#   SESSIONGUARD_DEV_BIN  the dev tools' binary (the emulator) to use (default:
#                      `sessionguard-dev` next to SESSIONGUARD_BIN, built with it)
#   INTEROP_MODES      "direct proxy enforce exec" (default) or any of them, in
#                      any order; each deployment runs the modes it supports
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
MODES="${INTEROP_MODES:-direct proxy enforce exec}"
NODE_DRIVERS="${INTEROP_NODE_DRIVERS:-6 7}"
LATENCY="${INTEROP_LATENCY:-20ms}"
SCENARIO_TIMEOUT="${INTEROP_TIMEOUT:-120}"
LOG_DIR="${INTEROP_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sessionguard-interop.XXXXXX")}"
mkdir -p "$LOG_DIR"
for mode in $MODES; do
  case "$mode" in
    direct | proxy | enforce | exec) ;;
    *) printf 'interop: unknown mode %s in INTEROP_MODES (direct, proxy, enforce or exec)\n' "$mode" >&2; exit 1 ;;
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
# The proxy (sessionguard) and the dev tools (sessionguard-dev: the emulator).
# shellcheck source=scripts/binaries.sh
source "$REPO_ROOT/scripts/binaries.sh"

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

# ---------------------------------------------------------------- scenarios
# name|deployment|directory|command...   (name = the "scenario" field the
# program prints; deployment: see "Deployments" below)
# A name ending in @NODE runs once per major of INTEROP_NODE_DRIVERS, as
# NAME@node6 and NAME@node7; a name ending in @nodeN runs with that major
# only (Mongoose 9 brings mongodb 7). The runner passes the major in
# INTEROP_NODE_DRIVER, and node/lib/harness.js names the scenario after it.
SCENARIO_TABLE=(
  "bad-connect-close-race@NODE|single|node|node scenarios/bad-connect-close-race.js"
  "bad-endsession-not-awaited@NODE|single|node|node scenarios/bad-endsession-not-awaited.js"
  "bad-global-session@NODE|single|node|node scenarios/bad-global-session.js"
  "bad-global-session-txn@NODE|single|node|node scenarios/bad-global-session-txn.js"
  "bad-swallowed-txn-error@NODE|single|node|node scenarios/bad-swallowed-txn-error.js"
  "good-persistent-client@NODE|single|node|node scenarios/good-persistent-client.js"
  "good-awaited-session@NODE|single|node|node scenarios/good-awaited-session.js"
  "good-per-operation-session@NODE|single|node|node scenarios/good-per-operation-session.js"
  "good-with-transaction@NODE|single|node|node scenarios/good-with-transaction.js"
  "mongoose-bad-txn-promise-all@node7|single|node|node scenarios/mongoose-transaction.js bad-promise-all"
  "mongoose-good-txn-sequential@node7|single|node|node scenarios/mongoose-transaction.js good-sequential"
  "express-session-flow@NODE|single|node|node scenarios/express-session-flow.js"
  "express-resurrection-bad@NODE|single|node|node scenarios/express-resurrection.js bad"
  "express-resurrection-fixed-recheck@NODE|single|node|node scenarios/express-resurrection.js fixed-recheck"
  "express-resurrection-fixed-touch-only@NODE|single|node|node scenarios/express-resurrection.js fixed-touch-only"
  "py-explicit-sessions|single|python|PYTHON scenarios/explicit_sessions.py"
  "py-transaction|single|python|PYTHON scenarios/transaction.py"
  "py-shared-session-threads|single|python|PYTHON scenarios/shared_session_threads.py"
  "py-clean-run|single|python|PYTHON scenarios/clean_run.py"
  "py-async-shared-session|single|python|PYTHON scenarios/async_shared_session.py"
  "py-async-sessions|single|python|PYTHON scenarios/async_sessions.py"
  "py-async-transaction|single|python|PYTHON scenarios/async_transaction.py"
  "node-protocol-probe@NODE|single|node|node scenarios/node-protocol-probe.js"
  "py-protocol-probe|single|python|PYTHON scenarios/protocol_probe.py"
  # Failover (issue 12): the replica set, directly and through the proxy's
  # per-member listeners; the faults are injected by the scenario itself.
  "failover-retryable-writes@NODE|replset|node|node scenarios/failover-retryable-writes.js"
  "failover-with-transaction@NODE|replset|node|node scenarios/failover-with-transaction.js"
  "failover-cursor-cut@NODE|replset|node|node scenarios/failover-cursor-cut.js"
  "failover-reply-lost@NODE|replset|node|node scenarios/failover-reply-lost.js"
  "py-failover-retryable-writes|replset|python|PYTHON scenarios/failover_retryable_writes.py"
  "py-failover-with-transaction|replset|python|PYTHON scenarios/failover_with_transaction.py"
  "py-failover-cursor-cut|replset|python|PYTHON scenarios/failover_cursor_cut.py"
  "py-failover-reply-lost|replset|python|PYTHON scenarios/failover_reply_lost.py"
  # Servers that refuse session kills (issue 12).
  "refused-kill-all-sessions-documentdb@NODE|documentdb|node|node scenarios/refused-kill-all-sessions.js documentdb"
  "refused-kill-all-sessions-atlas-shared@NODE|atlas-shared|node|node scenarios/refused-kill-all-sessions.js atlas-shared"
  "py-refused-kill-all-sessions-documentdb|documentdb|python|PYTHON scenarios/refused_kill_all_sessions.py documentdb"
  "py-refused-kill-all-sessions-atlas-shared|atlas-shared|python|PYTHON scenarios/refused_kill_all_sessions.py atlas-shared"
)

# Deployments: what a scenario runs against, and in which modes.
#   single        one emulator (a one-member replica set): direct, proxy, exec
#   replset       `emulator --members 3`, and a proxy with one listener per
#                 member (replicaSet=rs0, no directConnection): direct, proxy.
#                 Not exec: exec fronts the first host of its upstream with
#                 directConnection=true, so after a step-down the application
#                 would be left on a secondary. Through the proxy, the
#                 violations are read from its admin API after each scenario.
#   documentdb    `emulator --profile documentdb` (refuses session kills with
#                 115), atlas-shared: `--profile atlas-shared` (AtlasError):
#                 direct, proxy and enforce (shared proxies in observe and in
#                 enforce mode, checked through their admin API), exec.
deployment_modes() {
  case "$1" in
    single) printf 'direct proxy exec' ;;
    replset) printf 'direct proxy' ;;
    documentdb | atlas-shared) printf 'direct proxy enforce exec' ;;
    *) die "unknown deployment $1" ;;
  esac
}

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

selected() { [[ -z "${INTEROP_ONLY:-}" ]] || grep -Eq -- "$INTEROP_ONLY" <<<"$1"; }
runs_in() { [[ " $(deployment_modes "$1") " == *" $2 "* ]]; }

# Which (deployment, mode) pairs this run needs: only those servers start.
declare -A NEEDED=()
for entry in "${SCENARIOS[@]}"; do
  IFS='|' read -r name deployment _ <<<"$entry"
  selected "$name" || continue
  for mode in $MODES; do
    if runs_in "$deployment" "$mode"; then
      NEEDED["$deployment"]=1
      NEEDED["$deployment/$mode"]=1
    fi
  done
done

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

# wait_for_field LOG MESSAGE FIELD PID [COUNT]: the FIELD of the first COUNT
# (default 1) JSON log lines whose message is MESSAGE, one per line (the
# binaries bind port 0 and log the address they got; a replica set logs one
# line per member).
wait_for_field() {
  local log="$1" message="$2" field="$3" pid="$4" count="${5:-1}" i value
  for i in $(seq 1 100); do
    value="$(python3 - "$log" "$message" "$field" "$count" <<'PYEOF'
import json, sys
log, message, field, count = sys.argv[1:]
found = []
try:
    for line in open(log):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == message and field in entry:
            found.append(str(entry[field]))
except FileNotFoundError:
    pass
if len(found) >= int(count):
    print("\n".join(found[: int(count)]))
PYEOF
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

# Per deployment: the hosts each mode connects to (comma-separated), and the
# admin address of the shared proxies whose violations are checked.
declare -A HOSTS=() ADMIN=()
SERVER_LOGS=()

# start_emulator DEPLOYMENT LOG ARGS...: sets HOSTS[DEPLOYMENT/direct].
start_emulator() {
  local deployment="$1" log="$2" members=1 pid
  shift 2
  [[ " $* " == *" --members 3 "* ]] && members=3
  "$DEV_BIN" emulator --listen 127.0.0.1:0 --latency "$LATENCY" --log-format json "$@" \
    >"$LOG_DIR/$log.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  SERVER_LOGS+=("$log")
  HOSTS["$deployment/direct"]="$(wait_for_field "$LOG_DIR/$log.log" "emulator listening" addr "$pid" "$members" | paste -sd, -)"
}

# start_proxy DEPLOYMENT MODE LOG CONFIG: a proxy in front of the
# deployment's emulator; sets HOSTS[DEPLOYMENT/MODE] and ADMIN[...].
start_proxy() {
  local deployment="$1" mode="$2" log="$3" config="$4" members pid
  members="$(tr ',' '\n' <<<"${HOSTS[$deployment/direct]}" | wc -l)"
  "$BIN" proxy --config "$config" --log-format json >"$LOG_DIR/$log.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  SERVER_LOGS+=("$log")
  if [[ $members -gt 1 ]]; then
    HOSTS["$deployment/$mode"]="$(wait_for_field "$LOG_DIR/$log.log" "proxy listening for a replica-set member" listen "$pid" "$members" | paste -sd, -)"
  else
    HOSTS["$deployment/$mode"]="$(wait_for_field "$LOG_DIR/$log.log" "proxy listening" listen "$pid")"
  fi
  ADMIN["$deployment/$mode"]="$(wait_for_field "$LOG_DIR/$log.log" "admin server listening" admin "$pid")"
}

# proxy_config DEPLOYMENT SESSIONS_MODE: a config file for a proxy in front
# of the deployment: every member mapped to its own listener (replica set),
# ephemeral ports everywhere, the [sessions] mode given.
proxy_config() {
  local deployment="$1" sessions_mode="$2" file="$LOG_DIR/proxy-$1-$2.toml" host hosts
  hosts="${HOSTS[$deployment/direct]}"
  {
    printf '[proxy]\nlisten = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\n'
    if [[ "$hosts" == *,* ]]; then
      printf 'upstream = "mongodb://%s/?replicaSet=rs0"\n' "$hosts"
    else
      printf 'upstream = "mongodb://%s"\n' "$hosts"
    fi
    printf '\n[sessions]\nmode = "%s"\n' "$sessions_mode"
    if [[ "$hosts" == *,* ]]; then
      for host in ${hosts//,/ }; do
        printf '\n[[members]]\nupstream = "%s"\nlisten = "127.0.0.1:0"\n' "$host"
      done
    fi
  } >"$file"
  printf '%s\n' "$file"
}

started=()
if [[ -n "${NEEDED[single]:-}" ]]; then
  start_emulator single emulator
  started+=("emulator ${HOSTS[single/direct]}")
  if [[ -n "${NEEDED[single/proxy]:-}" ]]; then
    start_proxy single proxy proxy "$(proxy_config single observe)"
    started+=("proxy ${HOSTS[single/proxy]}")
  fi
  # exec dials the emulator itself.
  HOSTS[single/exec]="${HOSTS[single/direct]}"
fi
if [[ -n "${NEEDED[replset]:-}" ]]; then
  start_emulator replset emulator-replset --members 3
  started+=("replica set ${HOSTS[replset/direct]}")
  if [[ -n "${NEEDED[replset/proxy]:-}" ]]; then
    start_proxy replset proxy proxy-replset "$(proxy_config replset observe)"
    started+=("its proxy ${HOSTS[replset/proxy]} (admin ${ADMIN[replset/proxy]})")
  fi
fi
for deployment in documentdb atlas-shared; do
  [[ -n "${NEEDED[$deployment]:-}" ]] || continue
  start_emulator "$deployment" "emulator-$deployment" --profile "$deployment"
  started+=("$deployment ${HOSTS[$deployment/direct]}")
  HOSTS["$deployment/exec"]="${HOSTS[$deployment/direct]}"
  if [[ -n "${NEEDED[$deployment/proxy]:-}" ]]; then
    start_proxy "$deployment" proxy "proxy-$deployment" "$(proxy_config "$deployment" observe)"
    started+=("its proxy ${HOSTS[$deployment/proxy]}")
  fi
  if [[ -n "${NEEDED[$deployment/enforce]:-}" ]]; then
    start_proxy "$deployment" enforce "enforce-$deployment" "$(proxy_config "$deployment" enforce)"
    started+=("its enforcing proxy ${HOSTS[$deployment/enforce]}")
  fi
done
say "== latency $LATENCY; $(IFS=';'; printf '%s' "${started[*]}" | sed 's/;/; /g'); logs in $LOG_DIR"

# scenario_uri DEPLOYMENT HOSTS DB: the connection string a scenario gets
# (exec gets it as --upstream and hands its child the same one with its own
# address). One host: directConnection, because a replica-set-aware driver
# would otherwise discover the emulator's own address from hello and bypass
# the proxy. The replica set: its members (or the proxy's member listeners,
# which hello then names) and replicaSet=rs0, as an application is given.
scenario_uri() {
  if [[ "$1" == replset ]]; then
    printf 'mongodb://%s/%s?replicaSet=rs0' "$2" "$3"
  else
    printf 'mongodb://%s/%s?directConnection=true' "$2" "$3"
  fi
}

CHECK="$INTEROP_DIR/check.py"
EXPECTED="$INTEROP_DIR/expected.json"

passed=0
failed=0
failures=()
pending=()
for mode in $MODES; do
  case "$mode" in
    direct) say "== direct (each deployment's emulator)" ;;
    proxy) say "== proxy (a shared sessionguard proxy per deployment, observe mode)" ;;
    enforce) say "== enforce (a shared sessionguard proxy in enforce mode, refusing deployments)" ;;
    exec) say "== exec (sessionguard exec per scenario; reports checked against expected.json)" ;;
  esac
  declare -A skipped=()
  for entry in "${SCENARIOS[@]}"; do
    IFS='|' read -r name deployment dir command <<<"$entry"
    selected "$name" || continue
    if ! runs_in "$deployment" "$mode"; then
      skipped["$deployment"]=$((${skipped[$deployment]:-0} + 1))
      continue
    fi
    command="${command/PYTHON/$PYTHON}"
    # The driver major of a NAME@nodeN scenario (empty for Python).
    node_driver=""
    [[ "$name" == *@node* ]] && node_driver="${name##*@node}"
    # '@' has no place in a database name or a URI path.
    db="interop_${mode}_${name//[-@]/_}"
    uri="$(scenario_uri "$deployment" "${HOSTS[$deployment/$mode]}" "$db")"
    out="$LOG_DIR/$mode.$name.stdout"
    err="$LOG_DIR/$mode.$name.stderr"
    admin="${ADMIN[$deployment/$mode]:-}"
    # The single deployment's shared proxy is checked by the scenario's own
    # summary only (exec checks its reports); the others' shared proxies by
    # their admin API too.
    [[ "$deployment" == single ]] && admin=""
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
      snapshots=()
      if [[ -n "$admin" ]]; then
        snapshots=("$LOG_DIR/$mode.$name.before" "$LOG_DIR/$mode.$name.after")
        python3 "$CHECK" snapshot "$admin" "${snapshots[0]}" >/dev/null
      fi
      (cd "$INTEROP_DIR/$dir" && MONGODB_URI="$uri" INTEROP_MODE="$mode" INTEROP_NODE_DRIVER="$node_driver" \
        PYTHONPATH="$PY_PATH_EXTRA" timeout --kill-after=5 "$SCENARIO_TIMEOUT" $command >"$out" 2>"$err") || status=$?
      [[ -n "$admin" ]] && python3 "$CHECK" snapshot "$admin" "${snapshots[1]}" >/dev/null
      verdict=0
      detail="$(python3 "$CHECK" run "$mode" "$EXPECTED" "$name" "$status" "$out" "${snapshots[@]}")" || verdict=$?
    fi
    [[ $status -eq 124 || $status -eq 137 ]] && detail="timed out after ${SCENARIO_TIMEOUT}s; $detail"
    case "$verdict" in
      0)
        passed=$((passed + 1))
        say "PASS $mode/$name $detail"
        ;;
      2)
        # Waits for a change not made yet: neither passed nor failed.
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
  for deployment in "${!skipped[@]}"; do
    say "note: ${skipped[$deployment]} selected $deployment scenario(s) do not run in $mode mode (see Deployments in run.sh)"
  done
  unset skipped
done

# Anything the servers themselves complained about (malformed frames, ...);
# violations are logged too, at WARN or ERROR, and are checked per scenario.
for log in "${SERVER_LOGS[@]}"; do
  complaints="$(grep '"level":"\(WARN\|ERROR\)"' "$LOG_DIR/$log.log" | grep -v '"target":"sessionguard::violation"' || true)"
  if [[ -n "$complaints" ]]; then
    say "note: $log logged $(wc -l <<<"$complaints") warning/error lines besides violations (see $LOG_DIR/$log.log):"
    # sed -n, not head: under pipefail an early-closing reader would fail the run (SIGPIPE).
    sed -n '1,5s/^/    | /p' <<<"$complaints"
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
