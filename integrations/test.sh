#!/usr/bin/env bash
# Tests the test-runner integrations (integrations/PROTOCOL.md) end to end:
# each sample suite (several files, nested describe blocks or classes, hooks or
# fixtures, a concurrent case where the runner has one) runs under the REAL
# runner - Jest, Vitest, Mocha, `node --test`, pytest - serially and with
# parallel workers, against test/stub_server.py standing in for the marks
# endpoint of `sessionguard exec`; test/check.py then checks what the stub
# received against the suite's expected.json: exactly one begin and one end
# per test, with the expected name and file, from the pid that ran the test,
# whose times enclose the test body (its own clock, and the time the stub
# received its probe), no two sequential tests overlapping. The same against
# an endpoint that answers late, so marks are still queued when files and
# processes end: the flush at the end must deliver them. Then the same suites
# with the endpoint unset, refusing connections, not a URL, hanging and
# answering 500: every test still passes, tests go on while a mark hangs, and
# each process stops after its first failure.
# Then end to end (the `e2e-*` cases): small suites in node/e2e and python/e2e,
# several files and tests that use MongoDB with the real drivers (Node.js
# `mongodb`, PyMongo), one of which shares a session across concurrent
# operations, run by each real runner - serially and with parallel workers -
# under `sessionguard exec` against the emulator; test/check_report.py then
# checks that the JSON, JUnit and text reports name exactly that test, from
# the process that ran it, and no other.
# Ends with "N passed, N failed"; exits 1 on any failure.
#
# Installs what is missing, from the package registries only: `npm ci` in
# integrations/node, and a virtualenv in integrations/python/.venv with
# requirements.txt and the plugin itself (pip install, so its pytest11 entry
# point is what loads it).
#
# Environment:
#   INTEGRATIONS_ONLY     a grep -E pattern: run only the cases whose name matches
#   INTEGRATIONS_TIMEOUT  seconds per case, default 120
#   INTEGRATIONS_INSTALL_ONLY  1: install what is missing, then exit
#   SESSIONGUARD_BIN      the sessionguard binary for the e2e cases (default:
#                         `cargo build`, then the target dir's debug binary)
#   SESSIONGUARD_DEV_BIN  the dev tools' binary (the emulator; default:
#                         `sessionguard-dev` next to SESSIONGUARD_BIN)
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODE_DIR="$DIR/node"
PY_DIR="$DIR/python"
CASE_TIMEOUT="${INTEGRATIONS_TIMEOUT:-120}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sessionguard-integrations.XXXXXX")"

STUB_PID=""
EMULATOR_PID=""
failed=0
cleanup() {
  local pid
  for pid in "$STUB_PID" "$EMULATOR_PID"; do
    [[ -n "$pid" ]] || continue
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # Kept when a case failed: the FAIL lines point into it.
  [[ $failed -eq 0 ]] && rm -rf "$WORK"
  return 0
}
trap cleanup EXIT

say() { printf '%s\n' "$*"; }
die() { printf 'integrations: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- installs
command -v node >/dev/null || die "node is required"
command -v python3 >/dev/null || die "python3 is required"

lock_hash="$(sha256sum "$NODE_DIR/package-lock.json" | cut -d' ' -f1)"
if [[ "$(cat "$NODE_DIR/node_modules/.integrations-lock-hash" 2>/dev/null || true)" != "$lock_hash" ]]; then
  say "== npm ci (integrations/node)"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  printf '%s\n' "$lock_hash" >"$NODE_DIR/node_modules/.integrations-lock-hash"
fi

# The venv holds an installed copy of the plugin: reinstall when it changes.
py_hash="$(cat "$PY_DIR/requirements.txt" "$PY_DIR/pyproject.toml" "$PY_DIR/sessionguard_pytest.py" | sha256sum | cut -d' ' -f1)"
PYTHON="$PY_DIR/.venv/bin/python"
PY_SITE=""
if [[ "$(cat "$PY_DIR/.venv/.integrations-hash" 2>/dev/null || true)" != "$py_hash" ]]; then
  say "== pip install -r requirements.txt and the plugin (integrations/python/.venv)"
  rm -rf "$PY_DIR/.venv"
  # Built from a copy, so that no build/ or *.egg-info lands in the source tree.
  mkdir -p "$WORK/plugin"
  cp "$PY_DIR/pyproject.toml" "$PY_DIR/sessionguard_pytest.py" "$WORK/plugin/"
  pip_install() { "$@" --quiet --disable-pip-version-check; }
  if python3 -m venv "$PY_DIR/.venv" >/dev/null 2>&1; then
    pip_install "$PYTHON" -m pip install -r "$PY_DIR/requirements.txt"
    pip_install "$PYTHON" -m pip install --no-deps --no-build-isolation "$WORK/plugin"
  else
    # No venv module (Debian without python3-venv): a private --target dir.
    rm -rf "$PY_DIR/.venv"
    mkdir -p "$PY_DIR/.venv/site"
    pip_install python3 -m pip install --target "$PY_DIR/.venv/site" -r "$PY_DIR/requirements.txt"
    pip_install env PYTHONPATH="$PY_DIR/.venv/site" python3 -m pip install --target "$PY_DIR/.venv/site" \
      --no-deps --no-build-isolation "$WORK/plugin"
  fi
  printf '%s\n' "$py_hash" >"$PY_DIR/.venv/.integrations-hash"
fi
if [[ ! -x "$PYTHON" ]]; then
  PYTHON="$(command -v python3)"
  PY_SITE="$PY_DIR/.venv/site"
fi
if [[ "${INTEGRATIONS_INSTALL_ONLY:-}" == 1 ]]; then
  say "integrations: installs are up to date"
  exit 0
fi

# ---------------------------------------------------------------- binaries
# For the e2e cases: sessionguard (exec) and sessionguard-dev (the emulator).
REPO_ROOT="$(cd "$DIR/.." && pwd)"
# shellcheck source=scripts/binaries.sh
source "$REPO_ROOT/scripts/binaries.sh"

# ---------------------------------------------------------------- the stub
STUB_LOG="$WORK/marks.jsonl"
: >"$STUB_LOG"
python3 "$DIR/test/stub_server.py" --log "$STUB_LOG" --port-file "$WORK/port" &
STUB_PID=$!
for _ in $(seq 100); do
  [[ -s "$WORK/port" ]] && break
  kill -0 "$STUB_PID" 2>/dev/null || die "the stub marks server did not start"
  sleep 0.1
done
[[ -s "$WORK/port" ]] || die "the stub marks server wrote no port within 10 s"
STUB="http://127.0.0.1:$(cat "$WORK/port")"
# A port nothing listens on: bound, then released.
REFUSED="http://127.0.0.1:$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')/marks"

# ---------------------------------------------------------------- cases
passed=0
failures=()

# wait_for PID OUT: waits for PID with a deadline (polling it: `wait` has
# none), kills it past CASE_TIMEOUT (noted in OUT); returns its status.
wait_for() {
  local pid="$1" out="$2" waited=0
  while kill -0 "$pid" 2>/dev/null && [[ $waited -lt $((CASE_TIMEOUT * 10)) ]]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -- "$pid" 2>/dev/null || true
    say "    (timed out after ${CASE_TIMEOUT}s)" >>"$out"
  fi
  wait "$pid"
}

# Counts a case as passed or failed and says so; a failure shows the last
# `lines` lines of the case's output.
tally() { # name elapsed_ms verdict detail output_file lines
  local name=$1 elapsed=$2 verdict=$3 detail=$4 out=$5 lines=$6
  if [[ $verdict -eq 0 ]]; then
    passed=$((passed + 1))
    say "PASS $name (${elapsed} ms) $detail"
  else
    failed=$((failed + 1))
    failures+=("$name")
    say "FAIL $name (${elapsed} ms) $detail"
    say "    output ($out):"
    sed 's/^/    | /' "$out" | tail -n "$lines"
  fi
}

# run_case NAME ENDPOINT CWD EXPECTED CHECK_ARGS -- COMMAND...
# ENDPOINT: marks | drop | delay | unset | refused | invalid | slow | error. CHECK_ARGS: extra
# check.py flags; "RUNNER" in them stands for the runner's own pid.
run_case() {
  local name="$1" endpoint="$2" cwd="$3" expected="$4" check_args="$5"
  shift 6
  if [[ -n "${INTEGRATIONS_ONLY:-}" ]] && ! grep -qE "$INTEGRATIONS_ONLY" <<<"$name"; then
    return 0
  fi
  local url mode
  case "$endpoint" in
    marks) url="$STUB/marks" mode=marks ;;
    drop) url="$STUB/drop" mode=marks ;;
    delay) url="$STUB/delay" mode=marks ;;
    unset) url="" mode=none ;;
    refused) url="$REFUSED" mode=none ;;
    invalid) url="http://[::1/marks" mode=none ;;
    slow) url="$STUB/slow" mode=slow ;;
    error) url="$STUB/error" mode=error ;;
  esac
  : >"$STUB_LOG"
  local out="$WORK/$name.out" status=0 started runner elapsed
  started="$(date +%s%N)"
  (
    cd "$cwd"
    unset SESSIONGUARD_MARKS_URL
    [[ -n "$url" ]] && export SESSIONGUARD_MARKS_URL="$url"
    export MARKS_STUB_URL="$STUB" PYTHONPATH="$PY_SITE"
    exec "$@"
  ) >"$out" 2>&1 &
  runner=$!
  wait_for "$runner" "$out" || status=$?
  elapsed="$(( ($(date +%s%N) - started) / 1000000 ))"
  local verdict=0 detail check=()
  read -ra check <<<"${check_args//RUNNER/$runner}"
  detail="$(python3 "$DIR/test/check.py" "$STUB_LOG" "$expected" "$mode" "${check[@]}")" || verdict=$?
  if [[ $status -ne 0 ]]; then
    verdict=1
    detail="the suite failed (exit $status); $detail"
  fi
  tally "$name" "$elapsed" "$verdict" "$detail" "$out" 25
}

SAMPLE="$NODE_DIR/sample"
JEST=(node "$NODE_DIR/node_modules/jest/bin/jest.js" --config jest.config.cjs --ci)
VITEST=(node "$NODE_DIR/node_modules/vitest/vitest.mjs" run --maxWorkers=2 --minWorkers=1)
MOCHA=(node "$NODE_DIR/node_modules/mocha/bin/mocha.js" --require ../mocha.cjs 'mocha/*.spec.js')
NODE_TEST=(node --import ../node-test.mjs --test node-test/)
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider)

say "== Jest (setupFilesAfterEnv)"
# A fresh cache directory each time: with the timings of an earlier run Jest
# may decide to run a small suite in band despite --maxWorkers.
run_case jest-in-band marks "$SAMPLE" "$SAMPLE/jest/expected.json" "" -- "${JEST[@]}" --runInBand --cacheDirectory "$WORK/jest-cache-1"
run_case jest-workers marks "$SAMPLE" "$SAMPLE/jest/expected.json" "--min-pids 2 --runner-pid RUNNER" -- \
  "${JEST[@]}" --maxWorkers=2 --cacheDirectory "$WORK/jest-cache-2"
# A late endpoint: in band, each file's marks are flushed before the next one;
# with workers, before Jest ends them.
run_case jest-in-band-delay delay "$SAMPLE" "$SAMPLE/jest/expected.json" "" -- "${JEST[@]}" --runInBand --cacheDirectory "$WORK/jest-cache-4"
run_case jest-workers-delay delay "$SAMPLE" "$SAMPLE/jest/expected.json" "--min-pids 2 --runner-pid RUNNER" -- \
  "${JEST[@]}" --maxWorkers=2 --cacheDirectory "$WORK/jest-cache-5"
# --forceExit: Jest ends its processes as soon as the tests are done.
run_case jest-in-band-force-exit-delay delay "$SAMPLE" "$SAMPLE/jest/expected.json" "" -- \
  "${JEST[@]}" --runInBand --forceExit --cacheDirectory "$WORK/jest-cache-6"
run_case jest-workers-force-exit-delay delay "$SAMPLE" "$SAMPLE/jest/expected.json" "--min-pids 2 --runner-pid RUNNER" -- \
  "${JEST[@]}" --maxWorkers=2 --forceExit --cacheDirectory "$WORK/jest-cache-7"
# One process, three files: the first failure stops the marks of every file.
run_case jest-in-band-slow slow "$SAMPLE" "$SAMPLE/jest/expected.json" "" -- "${JEST[@]}" --runInBand --cacheDirectory "$WORK/jest-cache-3"
for endpoint in unset refused slow error; do
  run_case "jest-workers-$endpoint" "$endpoint" "$SAMPLE" "$SAMPLE/jest/expected.json" "" -- \
    "${JEST[@]}" --maxWorkers=2 --cacheDirectory "$WORK/jest-cache-$endpoint"
done

say "== Vitest (setupFiles; pool forks, its default)"
run_case vitest-forks marks "$SAMPLE" "$SAMPLE/vitest/expected.json" "--min-pids 2 --runner-pid RUNNER" -- "${VITEST[@]}"
run_case vitest-forks-delay delay "$SAMPLE" "$SAMPLE/vitest/expected.json" "--min-pids 2 --runner-pid RUNNER" -- "${VITEST[@]}"
for endpoint in unset refused slow error; do
  run_case "vitest-forks-$endpoint" "$endpoint" "$SAMPLE" "$SAMPLE/vitest/expected.json" "" -- "${VITEST[@]}"
done

say "== Mocha (root hooks plugin)"
run_case mocha-serial marks "$SAMPLE" "$SAMPLE/mocha/expected.json" "" -- "${MOCHA[@]}"
# A server closing kept-alive connections must not stop the marks.
run_case mocha-serial-drop drop "$SAMPLE" "$SAMPLE/mocha/expected.json" "" -- "${MOCHA[@]}"
run_case mocha-parallel marks "$SAMPLE" "$SAMPLE/mocha/expected.json" "--min-pids 2 --runner-pid RUNNER" -- "${MOCHA[@]}" --parallel --jobs 2
run_case mocha-serial-delay delay "$SAMPLE" "$SAMPLE/mocha/expected.json" "" -- "${MOCHA[@]}"
# --exit: Mocha ends the process as soon as the run is over.
run_case mocha-serial-exit-delay delay "$SAMPLE" "$SAMPLE/mocha/expected.json" "" -- "${MOCHA[@]}" --exit
run_case mocha-parallel-delay delay "$SAMPLE" "$SAMPLE/mocha/expected.json" "--min-pids 2 --runner-pid RUNNER" -- "${MOCHA[@]}" --parallel --jobs 2
for endpoint in unset refused invalid slow error; do
  run_case "mocha-parallel-$endpoint" "$endpoint" "$SAMPLE" "$SAMPLE/mocha/expected.json" "" -- "${MOCHA[@]}" --parallel --jobs 2
done

say "== node --test (--import; one process per file)"
run_case node-test marks "$SAMPLE" "$SAMPLE/node-test/expected.json" "--min-pids 3 --runner-pid RUNNER" -- "${NODE_TEST[@]}"
run_case node-test-node-options marks "$SAMPLE" "$SAMPLE/node-test/expected.json" "--min-pids 3 --runner-pid RUNNER" -- \
  env NODE_OPTIONS="--import $NODE_DIR/node-test.mjs" node --test node-test/
run_case node-test-delay delay "$SAMPLE" "$SAMPLE/node-test/expected.json" "--min-pids 3 --runner-pid RUNNER" -- "${NODE_TEST[@]}"
# --test-force-exit (Node 20.14+): each file's process exits once its tests are done.
run_case node-test-force-exit-delay delay "$SAMPLE" "$SAMPLE/node-test/expected.json" "--min-pids 3 --runner-pid RUNNER" -- \
  node --import ../node-test.mjs --test --test-force-exit node-test/
for endpoint in unset refused slow error; do
  run_case "node-test-$endpoint" "$endpoint" "$SAMPLE" "$SAMPLE/node-test/expected.json" "" -- "${NODE_TEST[@]}"
done

say "== pytest (pytest11 entry point, or -p sessionguard_pytest)"
run_case pytest-serial marks "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "" -- "${PYTEST[@]}"
run_case pytest-serial-drop drop "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "" -- "${PYTEST[@]}"
run_case pytest-xdist marks "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "--min-pids 2 --runner-pid RUNNER" -- \
  "${PYTEST[@]}" -n 2
run_case pytest-serial-delay delay "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "" -- "${PYTEST[@]}"
run_case pytest-xdist-delay delay "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "--min-pids 2 --runner-pid RUNNER" -- \
  "${PYTEST[@]}" -n 2
# -p with the plugin module on the path, entry points not loaded.
run_case pytest-xdist-p-flag marks "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "--min-pids 2 --runner-pid RUNNER" -- \
  env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONPATH="$PY_DIR${PY_SITE:+:$PY_SITE}" \
  "${PYTEST[@]}" -p xdist.plugin -p sessionguard_pytest -n 2
for endpoint in unset refused invalid slow error; do
  run_case "pytest-xdist-$endpoint" "$endpoint" "$PY_DIR/sample" "$PY_DIR/sample/tests/expected.json" "" -- \
    "${PYTEST[@]}" -n 2
done

# ---------------------------------------------------------------- end to end
# The emulator answers 20 ms late, as over a network: the operations the
# culprit runs at the same time are then surely in flight together.
EMULATOR=""
start_emulator() {
  "$DEV_BIN" emulator --listen 127.0.0.1:0 --latency 20ms --log-format json >"$WORK/emulator.log" 2>&1 &
  EMULATOR_PID=$!
  for _ in $(seq 100); do
    EMULATOR="$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("message") == "emulator listening" and "addr" in entry:
        print(entry["addr"]); break
' "$WORK/emulator.log" 2>/dev/null || true)"
    [[ -n "$EMULATOR" ]] && return 0
    kill -0 "$EMULATOR_PID" 2>/dev/null || break
    sleep 0.1
  done
  cat "$WORK/emulator.log" >&2
  die "the emulator did not start"
}

# run_e2e NAME CWD FILE TEST CHECK_ARGS -- COMMAND...: COMMAND under
# `sessionguard exec`; FILE and TEST name the one test that misuses a session.
run_e2e() {
  local name="e2e-$1" cwd="$2" file="$3" test="$4" check_args="$5"
  shift 6
  if [[ -n "${INTEGRATIONS_ONLY:-}" ]] && ! grep -qE "$INTEGRATIONS_ONLY" <<<"$name"; then
    return 0
  fi
  [[ -n "$EMULATOR" ]] || start_emulator
  local out="$WORK/$name.out" status=0 started runner elapsed
  started="$(date +%s%N)"
  (
    cd "$cwd"
    unset SESSIONGUARD_MARKS_URL
    export PYTHONPATH="$PY_SITE"
    exec "$BIN" exec --upstream "mongodb://$EMULATOR/" --report "$WORK/$name.json" --junit "$WORK/$name.xml" -- "$@"
  ) >"$out" 2>&1 &
  runner=$!
  wait_for "$runner" "$out" || status=$?
  elapsed="$(( ($(date +%s%N) - started) / 1000000 ))"
  local verdict=0 detail check=()
  read -ra check <<<"$check_args"
  detail="$(python3 "$DIR/test/check_report.py" "$WORK/$name.json" "$WORK/$name.xml" "$out" "$status" \
    "$file" "$test" "${check[@]}")" || verdict=$?
  tally "$name" "$elapsed" "$verdict" "$detail" "$out" 40
}

E2E="$NODE_DIR/e2e"
say "== end to end: a suite where one test shares a session, under sessionguard exec (real drivers, the emulator)"
run_e2e jest-in-band "$E2E" jest/checkout.test.js "checkout reserves stock concurrently" "" -- \
  "${JEST[@]}" --runInBand --cacheDirectory "$WORK/jest-cache-e2e-1"
run_e2e jest-workers "$E2E" jest/checkout.test.js "checkout reserves stock concurrently" "--min-processes 2" -- \
  "${JEST[@]}" --maxWorkers=2 --cacheDirectory "$WORK/jest-cache-e2e-2"
run_e2e pytest-serial "$PY_DIR/e2e" tests/test_checkout.py "tests/test_checkout.py::test_reserves_stock_concurrently" "" -- \
  "${PYTEST[@]}"
run_e2e pytest-xdist "$PY_DIR/e2e" tests/test_checkout.py "tests/test_checkout.py::test_reserves_stock_concurrently" "--min-processes 2" -- \
  "${PYTEST[@]}" -n 2
run_e2e vitest-forks "$E2E" vitest/checkout.test.mjs "checkout > reserves stock concurrently" "--min-processes 2" -- \
  "${VITEST[@]}"
run_e2e mocha-serial "$E2E" mocha/checkout.spec.js "checkout reserves stock concurrently" "" -- \
  "${MOCHA[@]}"
run_e2e mocha-parallel "$E2E" mocha/checkout.spec.js "checkout reserves stock concurrently" "--min-processes 2" -- \
  "${MOCHA[@]}" --parallel --jobs 2
run_e2e node-test "$E2E" node-test/checkout.test.mjs "checkout > reserves stock concurrently" "--min-processes 3" -- \
  "${NODE_TEST[@]}"

if [[ ${#failures[@]} -gt 0 ]]; then
  say "failed: ${failures[*]}"
fi
say "$passed passed, $failed failed"
[[ $((passed + failed)) -gt 0 ]] || die "no case ran"
[[ $failed -eq 0 ]]
