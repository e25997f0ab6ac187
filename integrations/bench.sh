#!/usr/bin/env bash
# Measures what the integrations cost per test (not part of test.sh: it times
# things, and times are reported, never asserted). Two measurements, both
# against test/stub_server.py (a threaded Python http.server: the marks
# endpoint of `sessionguard exec` answers faster, so these are upper bounds):
# 1. the client alone: one `begin` + `end` pair, sent the way a test sends it
#    (awaited, kept-alive connection), averaged over BENCH_PAIRS pairs, in Node
#    (marks.cjs) and Python (the pytest plugin);
# 2. each runner on one file of BENCH_TESTS empty tests, BENCH_RUNS times
#    without and with SESSIONGUARD_MARKS_URL (alternating), compared by the
#    median wall time; whole-run noise (process start-up) is tens of ms, so
#    read this as "within noise" unless the difference is clearly larger.
# Installs through test.sh (INTEGRATIONS_INSTALL_ONLY=1).
#
# Environment: BENCH_TESTS (default 200), BENCH_RUNS (default 5), BENCH_PAIRS (default 2000)
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODE_DIR="$DIR/node"
PY_DIR="$DIR/python"
TESTS="${BENCH_TESTS:-200}"
RUNS="${BENCH_RUNS:-5}"
PAIRS="${BENCH_PAIRS:-2000}"

INTEGRATIONS_INSTALL_ONLY=1 bash "$DIR/test.sh" >/dev/null
PYTHON="$PY_DIR/.venv/bin/python"
[[ -x "$PYTHON" ]] || { echo "bench: needs the virtualenv test.sh makes" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sessionguard-bench.XXXXXX")"
# The generated suites live beside the runners' node_modules (Vitest must
# resolve `vitest` from the test file), in a folder removed at exit.
NODE_BENCH="$NODE_DIR/.bench"
PY_BENCH="$PY_DIR/.bench"
STUB_PID=""
cleanup() {
  if [[ -n "$STUB_PID" ]]; then
    kill "$STUB_PID" 2>/dev/null || true
    wait "$STUB_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK" "$NODE_BENCH" "$PY_BENCH"
  return 0
}
trap cleanup EXIT

python3 "$DIR/test/stub_server.py" --log "$WORK/marks.jsonl" --port-file "$WORK/port" &
STUB_PID=$!
for _ in $(seq 100); do [[ -s "$WORK/port" ]] && break; sleep 0.1; done
URL="http://127.0.0.1:$(cat "$WORK/port")/marks"

echo "== the client alone: one begin+end pair, awaited, $PAIRS pairs"
# shellcheck disable=SC2016 # JavaScript, not shell
SESSIONGUARD_MARKS_URL="$URL" node -e '
  const marks = require(process.argv[1]);
  (async () => {
    const n = Number(process.argv[2]);
    for (let i = 0; i < 50; i++) await marks.post("begin", "warm-up", "bench");
    const start = process.hrtime.bigint();
    for (let i = 0; i < n; i++) {
      await marks.post("begin", `test ${i}`, "bench.test.js");
      await marks.post("end", `test ${i}`, "bench.test.js");
    }
    const us = Number(process.hrtime.bigint() - start) / 1000 / n;
    console.log(`node (marks.cjs): ${us.toFixed(0)} us per test`);
  })();
' "$NODE_DIR/marks.cjs" "$PAIRS"
SESSIONGUARD_MARKS_URL="$URL" PYTHONPATH="$PY_DIR" "$PYTHON" -c '
import os, sys, time, types
import sessionguard_pytest as plugin
marks = plugin._Marks(os.environ["SESSIONGUARD_MARKS_URL"])
n = int(sys.argv[1])
item = types.SimpleNamespace(nodeid="bench.py::warm_up", path="bench.py")
for _ in range(50):
    marks._post("begin", item)
start = time.perf_counter()
for i in range(n):
    item = types.SimpleNamespace(nodeid=f"bench.py::test_{i}", path="bench.py")
    marks._post("begin", item)
    marks._post("end", item)
print(f"python (sessionguard_pytest): {(time.perf_counter() - start) / n * 1e6:.0f} us per test")
' "$PAIRS"

echo "== each runner, $TESTS empty tests in one file, median of $RUNS runs without and with marks"
mkdir -p "$NODE_BENCH" "$PY_BENCH"
# shellcheck disable=SC2016 # JavaScript, not shell
node -e '
  const [n, dir, integrations] = [Number(process.argv[1]), process.argv[2], process.argv[3]];
  const body = (kw) => Array.from({ length: n }, (_, i) => `${kw}("t${i}", () => {});`).join("\n") + "\n";
  const write = (name, text) => require("node:fs").writeFileSync(require("node:path").join(dir, name), text);
  write("jest.test.js", body("test"));
  write("vitest.test.mjs", `import { test } from "vitest";\n${body("test")}`);
  write("mocha.spec.js", body("it"));
  write("node.test.mjs", `import { test } from "node:test";\n${body("test")}`);
  write("jest.config.cjs", `module.exports = { testMatch: ["**/jest.test.js"], transform: {}, setupFilesAfterEnv: ["${integrations}/jest.cjs"] };\n`);
  write("vitest.config.mjs", `export default { test: { include: ["vitest.test.mjs"], setupFiles: ["${integrations}/vitest.mjs"] } };\n`);
' "$TESTS" "$NODE_BENCH" "$NODE_DIR"
python3 -c '
import sys
n, path = int(sys.argv[1]), sys.argv[2]
open(path, "w").write("".join(f"def test_{i}():\n    pass\n\n" for i in range(n)))
' "$TESTS" "$PY_BENCH/test_bench.py"
touch "$PY_BENCH/pytest.ini"

# time_ms CMD...: wall time of one run, in ms (the suite must pass).
time_ms() {
  local start
  start="$(date +%s%N)"
  "$@" >"$WORK/out" 2>&1 || { echo "bench: failed: $*" >&2; tail -n 20 "$WORK/out" >&2; exit 1; }
  echo $((($(date +%s%N) - start) / 1000000))
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

bench() {
  local name="$1" cwd="$2"
  shift 2
  local without=() with=() i
  for ((i = 0; i < RUNS; i++)); do
    without+=("$(cd "$cwd" && unset SESSIONGUARD_MARKS_URL && time_ms "$@")")
    with+=("$(cd "$cwd" && export SESSIONGUARD_MARKS_URL="$URL" && time_ms "$@")")
  done
  local a b
  a="$(printf '%s\n' "${without[@]}" | median)"
  b="$(printf '%s\n' "${with[@]}" | median)"
  awk -v name="$name" -v a="$a" -v b="$b" -v n="$TESTS" -v wo="${without[*]}" -v wi="${with[*]}" 'BEGIN {
    printf "%-10s without %5d ms, with %5d ms: %+.2f ms per test   (runs without: %s; with: %s)\n", name, a, b, (b - a) / n, wo, wi }'
}

bench jest "$NODE_BENCH" node "$NODE_DIR/node_modules/jest/bin/jest.js" --config jest.config.cjs --ci --runInBand --cache=false
bench vitest "$NODE_BENCH" node "$NODE_DIR/node_modules/vitest/vitest.mjs" run --config vitest.config.mjs
bench mocha "$NODE_BENCH" node "$NODE_DIR/node_modules/mocha/bin/mocha.js" --require "$NODE_DIR/mocha.cjs" mocha.spec.js
bench node-test "$NODE_BENCH" node --import "$NODE_DIR/node-test.mjs" --test node.test.mjs
bench pytest "$PY_BENCH" "$PYTHON" -m pytest -q -p no:cacheprovider test_bench.py
