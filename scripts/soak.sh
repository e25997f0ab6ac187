#!/usr/bin/env bash
# Soak test: a mixed workload through `sessionguard proxy` (in front of
# `sessionguard-dev emulator`) for SOAK_SECONDS, with three drivers in parallel
# lanes, each cycling through good and bad patterns:
#   node   — interop/node scenarios, each with mongodb 7 and with mongodb 6
#            (NAME@node7, NAME@node6): good-* and bad-global-session,
#            bad-global-session-txn, bad-swallowed-txn-error; and the Mongoose
#            transactions (mongoose-good-txn-sequential, mongoose-bad-txn-promise-all)
#   python — interop/python scenarios (PyMongo): py-clean-run, py-transaction,
#            py-explicit-sessions, the bad py-shared-session-threads, and the
#            asyncio ones (py-async-sessions, py-async-transaction, the bad
#            py-async-shared-session)
#   rust   — sessionguard-dev demo-app (the Rust driver): good and use-after-end
# Every run uses a database of its own (soak_<lane>_<scenario>_<n>, '-' and '@' as '_'), so each
# violation can be traced back to the run that caused it. The proxy's
# resident memory (VmRSS) is sampled every SOAK_SAMPLE_SECONDS.
#
# Checks (soak/check.py), exit 1 if any fails:
#   - every run did what it should (exit 0; interop scenarios print ok: true);
#   - every violation in /violations belongs to a bad run and is one of the
#     rules interop/expected.json (or, for the Rust lane, this script) lists
#     for it; every bad run produced each of its required rules; good runs
#     produced none; /violations holds as many as the metrics counted;
#   - no malformed frame or frame timeout was counted, the proxy never died;
#   - memory is stable: the median RSS of the last third of the run is not
#     more than SOAK_RSS_GROWTH_PCT (default 20) % and SOAK_RSS_GROWTH_KIB
#     (default 16384) above the median of the first third after warm-up.
# Figures go to $SOAK_LOG_DIR/summary.json and are printed.
#
# Environment:
#   SOAK_SECONDS          total duration (default 600)
#   SOAK_SAMPLE_SECONDS   RSS sampling interval (default 5)
#   SOAK_LATENCY          emulator reply latency (default 20ms, as interop/run.sh:
#                         concurrent requests then overlap on the wire)
#   SOAK_LOG_DIR          where logs and figures go (default: a new temp dir)
#   SESSIONGUARD_BIN      the proxy binary (default: cargo build --release)
#   SESSIONGUARD_DEV_BIN  the dev tools' binary: emulator, demo-app (default:
#                         sessionguard-dev next to SESSIONGUARD_BIN, built with it)
#   SOAK_PROFILE          release (default) or debug, when building
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${SOAK_SECONDS:-600}"
SAMPLE="${SOAK_SAMPLE_SECONDS:-5}"
LATENCY="${SOAK_LATENCY:-20ms}"
PROFILE="${SOAK_PROFILE:-release}"
LOG_DIR="${SOAK_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sessionguard-soak.XXXXXX")}"
mkdir -p "$LOG_DIR/runs"

say() { printf '%s\n' "$*"; }
die() { printf 'soak: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- build
cargo_flags=(--locked --quiet)
[[ "$PROFILE" == release ]] && cargo_flags+=(--release)
target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
if [[ -z "${SESSIONGUARD_BIN:-}" ]]; then
  say "== cargo build ($PROFILE): sessionguard, sessionguard-dev"
  (cd "$ROOT" && cargo build "${cargo_flags[@]}" -p sessionguard -p sessionguard-dev)
  BIN="$target_dir/$PROFILE/sessionguard"
else
  BIN="$SESSIONGUARD_BIN"
fi
DEV_BIN="${SESSIONGUARD_DEV_BIN:-$(dirname "$BIN")/sessionguard-dev}"
# The Rust driver lane is the dev tools' demo-app.
MISUSE="$DEV_BIN demo-app"
[[ -x "$BIN" ]] || die "missing $BIN"
[[ -x "$DEV_BIN" ]] || die "missing $DEV_BIN (cargo build -p sessionguard-dev)"

# The interop installs (npm ci, the PyMongo virtualenv) are run.sh's job; it
# compares the lock file and requirements.txt with what is installed and
# does nothing when they match.
say "== interop drivers (interop/run.sh installs what is missing)"
SESSIONGUARD_BIN="$BIN" SESSIONGUARD_DEV_BIN="$DEV_BIN" INTEROP_INSTALL_ONLY=1 INTEROP_LOG_DIR="$LOG_DIR/interop-install" \
  "$ROOT/interop/run.sh" >/dev/null
PYTHON="$ROOT/interop/python/.venv/bin/python"
PY_PATH_EXTRA=""
if [[ ! -x "$PYTHON" ]]; then
  PYTHON="$(command -v python3)"
  PY_PATH_EXTRA="$ROOT/interop/python/.venv/site"
fi

# ---------------------------------------------------------------- servers
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# log_field LOG MESSAGE FIELD PID: FIELD of the first JSON line with MESSAGE.
log_field() {
  local i value
  for i in $(seq 1 150); do
    value="$(python3 - "$1" "$2" "$3" <<'PY'
import json, sys
log, message, field = sys.argv[1:]
try:
    for line in open(log):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == message and field in entry:
            print(entry[field]); break
except FileNotFoundError:
    pass
PY
)"
    [[ -n "$value" ]] && { printf '%s\n' "$value"; return 0; }
    kill -0 "$4" 2>/dev/null || { cat "$1" >&2; die "process $4 exited before logging '$2'"; }
    sleep 0.1
  done
  die "timed out waiting for '$2' in $1"
}

"$DEV_BIN" emulator --listen 127.0.0.1:0 --latency "$LATENCY" --log-format json \
  >"$LOG_DIR/emulator.log" 2>&1 &
EMU_PID=$!
PIDS+=("$EMU_PID")
EMU_ADDR="$(log_field "$LOG_DIR/emulator.log" "emulator listening" addr "$EMU_PID")"

cat >"$LOG_DIR/sessionguard.toml" <<TOML
[proxy]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
upstream = "mongodb://$EMU_ADDR"

[log]
format = "json"
level = "info"

[sessions]
# Keep every violation of the run for the accounting below.
max_violations = 1000000
TOML
"$BIN" proxy --config "$LOG_DIR/sessionguard.toml" >"$LOG_DIR/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
PROXY_ADDR="$(log_field "$LOG_DIR/proxy.log" "proxy listening" listen "$PROXY_PID")"
ADMIN_ADDR="$(log_field "$LOG_DIR/proxy.log" "admin server listening" admin "$PROXY_PID")"
say "== emulator $EMU_ADDR (latency $LATENCY), proxy $PROXY_ADDR (pid $PROXY_PID), admin $ADMIN_ADDR"
say "== soaking for ${DURATION}s; logs in $LOG_DIR"

START=$(date +%s)
DEADLINE=$((START + DURATION))

# ---------------------------------------------------------------- sampling
(
  while (($(date +%s) < DEADLINE)) && kill -0 "$PROXY_PID" 2>/dev/null; do
    rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status" 2>/dev/null || true)"
    [[ -n "$rss" ]] && printf '%s %s\n' "$(($(date +%s) - START))" "$rss" >>"$LOG_DIR/rss.txt"
    sleep "$SAMPLE"
  done
) &
SAMPLER_PID=$!

# ---------------------------------------------------------------- lanes
# run_one LANE NAME N DIR COMMAND...: one scenario run, one line in runs/LANE.tsv:
# lane, scenario, database, exit status, summary ok (yes/no/-), seconds.
run_one() {
  local lane="$1" name="$2" n="$3" dir="$4"
  shift 4
  local db="soak_${lane}_${name//[-@]/_}_$n"
  local uri="mongodb://$PROXY_ADDR/$db?directConnection=true"
  local out="$LOG_DIR/runs/$lane.$name.$n.out" err="$LOG_DIR/runs/$lane.$name.$n.err"
  local status=0 began ok="-" node_driver=""
  # NAME@nodeN: the Node.js driver major, as interop/run.sh passes it.
  [[ "$name" == *@node* ]] && node_driver="${name##*@node}"
  began=$(date +%s)
  (cd "$dir" && MONGODB_URI="$uri" INTEROP_MODE=proxy INTEROP_NODE_DRIVER="$node_driver" PYTHONPATH="$PY_PATH_EXTRA" \
    timeout --kill-after=5 120 "$@" >"$out" 2>"$err") || status=$?
  if [[ "$lane" != rust ]]; then
    # The verdict interop/run.sh uses; its detail line goes with the run's
    # stderr, which is kept when the run failed.
    if python3 "$ROOT/interop/check.py" summary "$out" "$name" >>"$err" 2>&1; then
      ok=yes
    else
      ok=no
    fi
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$lane" "$name" "$db" "$status" "$ok" "$(($(date +%s) - began))" \
    >>"$LOG_DIR/runs/$lane.tsv"
  # Keep the logs of failed runs only.
  if [[ "$status" == 0 && "$ok" != no ]]; then rm -f "$out" "$err"; fi
}

lane() {
  local lane="$1" n=0 entry name dir
  shift
  local -a entries=("$@")
  while (($(date +%s) < DEADLINE)); do
    entry="${entries[$((n % ${#entries[@]}))]}"
    IFS='|' read -r name dir cmd <<<"$entry"
    # shellcheck disable=SC2086 # the command is words on purpose
    run_one "$lane" "$name" "$n" "$dir" ${cmd//PYTHON/$PYTHON}
    n=$((n + 1))
  done
}

NODE="$ROOT/interop/node"
PYDIR="$ROOT/interop/python"
NODE_ENTRIES=()
for major in 7 6; do
  NODE_ENTRIES+=(
    "good-persistent-client@node$major|$NODE|node scenarios/good-persistent-client.js"
    "bad-global-session@node$major|$NODE|node scenarios/bad-global-session.js"
    "good-awaited-session@node$major|$NODE|node scenarios/good-awaited-session.js"
    "bad-swallowed-txn-error@node$major|$NODE|node scenarios/bad-swallowed-txn-error.js"
    "good-per-operation-session@node$major|$NODE|node scenarios/good-per-operation-session.js"
    "bad-global-session-txn@node$major|$NODE|node scenarios/bad-global-session-txn.js"
    "good-with-transaction@node$major|$NODE|node scenarios/good-with-transaction.js"
  )
done
NODE_ENTRIES+=(
  "mongoose-good-txn-sequential@node7|$NODE|node scenarios/mongoose-transaction.js good-sequential"
  "mongoose-bad-txn-promise-all@node7|$NODE|node scenarios/mongoose-transaction.js bad-promise-all"
)
lane node "${NODE_ENTRIES[@]}" &
NODE_LANE=$!
lane python \
  "py-clean-run|$PYDIR|PYTHON scenarios/clean_run.py" \
  "py-transaction|$PYDIR|PYTHON scenarios/transaction.py" \
  "py-shared-session-threads|$PYDIR|PYTHON scenarios/shared_session_threads.py" \
  "py-explicit-sessions|$PYDIR|PYTHON scenarios/explicit_sessions.py" \
  "py-async-sessions|$PYDIR|PYTHON scenarios/async_sessions.py" \
  "py-async-shared-session|$PYDIR|PYTHON scenarios/async_shared_session.py" \
  "py-async-transaction|$PYDIR|PYTHON scenarios/async_transaction.py" &
PY_LANE=$!
lane rust \
  "rust-good|$ROOT|$MISUSE good" \
  "rust-good|$ROOT|$MISUSE good" \
  "rust-use-after-end|$ROOT|$MISUSE use-after-end" &
RUST_LANE=$!

wait "$NODE_LANE" "$PY_LANE" "$RUST_LANE"
wait "$SAMPLER_PID" 2>/dev/null || true
ELAPSED=$(($(date +%s) - START))

# ---------------------------------------------------------------- checks
kill -0 "$PROXY_PID" 2>/dev/null || die "the proxy died during the soak (see $LOG_DIR/proxy.log)"
fetch() {
  python3 -c 'import sys,urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"
}
fetch "http://$ADMIN_ADDR/violations" >"$LOG_DIR/violations.json"
fetch "http://$ADMIN_ADDR/metrics" >"$LOG_DIR/metrics.txt"
cat "$LOG_DIR"/runs/*.tsv >"$LOG_DIR/runs.tsv"

python3 "$ROOT/soak/check.py" \
  --runs "$LOG_DIR/runs.tsv" \
  --violations "$LOG_DIR/violations.json" \
  --metrics "$LOG_DIR/metrics.txt" \
  --rss "$LOG_DIR/rss.txt" \
  --expected "$ROOT/interop/expected.json" \
  --proxy-log "$LOG_DIR/proxy.log" \
  --elapsed "$ELAPSED" \
  --growth-pct "${SOAK_RSS_GROWTH_PCT:-20}" \
  --growth-kib "${SOAK_RSS_GROWTH_KIB:-16384}" \
  --summary "$LOG_DIR/summary.json"
