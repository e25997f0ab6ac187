#!/usr/bin/env bash
# Measures what the integrations cost per test (not part of test.sh: it times
# things, and times are reported, never asserted). Two measurements, both
# against test/stub_server.py (a threaded Python http.server standing in for
# the marks endpoint of `sessionguard exec`):
# 1. the client alone, in Node (marks.cjs) and Python (the pytest plugin),
#    BENCH_PAIRS tests: what the two mark() calls of a test cost (all a test
#    waits for: they only queue), and the CPU time the test process spends
#    in all, sending the marks in the background included;
# 2. each runner on one file of BENCH_TESTS empty tests, BENCH_RUNS times
#    each way, alternating: without any hook ("bare"), with the same hooks
#    doing nothing ("hooks": what the runner itself charges for a hook), and
#    with the marks on. Per test, the median wall and CPU time between the
#    first and the last test of a run; and the median whole-run wall time
#    (start-up and the final flush included, so its noise is tens of ms).
#    On a machine shared with other work, per-test differences under about
#    20 us are noise.
# Installs through test.sh (INTEGRATIONS_INSTALL_ONLY=1).
#
# Environment: BENCH_TESTS (default 1000), BENCH_RUNS (default 7), BENCH_PAIRS (default 5000)
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODE_DIR="$DIR/node"
PY_DIR="$DIR/python"
TESTS="${BENCH_TESTS:-1000}"
RUNS="${BENCH_RUNS:-7}"
PAIRS="${BENCH_PAIRS:-5000}"

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

echo "== the client alone, $PAIRS tests (one begin + one end each)"
# A test here yields to the event loop twice (as a test doing I/O does), so
# the sender runs in between, as it would in a real suite.
# shellcheck disable=SC2016 # JavaScript, not shell
SESSIONGUARD_MARKS_URL="$URL" node -e '
  const marks = require(process.argv[1]);
  const n = Number(process.argv[2]);
  const tick = () => new Promise((resolve) => setImmediate(resolve));
  const cpu = () => { const u = process.cpuUsage(); return u.user + u.system; };
  (async () => {
    for (let i = 0; i < 50; i++) marks.mark("begin", "warm-up", "bench");
    await marks.flush();
    const start = process.hrtime.bigint();
    for (let i = 0; i < n; i++) {
      marks.mark("begin", `test ${i}`, "bench.test.js");
      marks.mark("end", `test ${i}`, "bench.test.js");
    }
    const calls = Number(process.hrtime.bigint() - start) / 1000 / n;
    await marks.flush();
    const run = async (withMarks) => {
      const start = cpu();
      for (let i = 0; i < n; i++) {
        if (withMarks) marks.mark("begin", `test ${i}`, "bench.test.js");
        await tick();
        if (withMarks) marks.mark("end", `test ${i}`, "bench.test.js");
        await tick();
      }
      if (withMarks) await marks.flush();
      return (cpu() - start) / n;
    };
    const without = [], withMarks = [];
    for (let r = 0; r < 5; r++) {
      without.push(await run(false));
      withMarks.push(await run(true));
    }
    const median = (a) => a.sort((x, y) => x - y)[2];
    console.log(`node (marks.cjs):   mark() x2 ${calls.toFixed(1)} us;  CPU per test ${median(without).toFixed(1)} -> ` +
      `${median(withMarks).toFixed(1)} us (${(median(withMarks) - median(without)).toFixed(1)} us: marks, sending, flush; median of 5)`);
  })();
' "$NODE_DIR/marks.cjs" "$PAIRS"
SESSIONGUARD_MARKS_URL="$URL" PYTHONPATH="$PY_DIR" "$PYTHON" -c '
import os, sys, time, types
import sessionguard_pytest as plugin
marks = plugin._Marks(os.environ["SESSIONGUARD_MARKS_URL"])
n = int(sys.argv[1])
items = [types.SimpleNamespace(nodeid=f"bench.py::test_{i}", path="bench.py") for i in range(n)]
for _ in range(50):
    marks.mark("begin", items[0])
marks.flush(10)
start = time.perf_counter()
for item in items:
    marks.mark("begin", item)
    marks.mark("end", item)
calls = time.perf_counter() - start
marks.flush(30)
# CPU of the whole process (both threads) while tests that sleep 50 us run.
def run(marks):
    start = time.process_time()
    for item in items:
        if marks:
            marks.mark("begin", item)
        time.sleep(50e-6)
        if marks:
            marks.mark("end", item)
    if marks:
        marks.flush(30)
    return (time.process_time() - start) / n * 1e6
without, with_ = [], []
for _ in range(5):
    without.append(run(None))
    with_.append(run(marks))
a, b = sorted(without)[2], sorted(with_)[2]
print(f"python (pytest plugin): mark() x2 {calls / n * 1e6:.1f} us;  CPU per test {a:.1f} -> {b:.1f} us ({b - a:.1f} us: marks, sending, flush; median of 5)")
' "$PAIRS"

echo "== each runner, $TESTS empty tests in one file, $RUNS runs each way; medians per test: bare -> hooks doing nothing -> marks"
# Inside each run, the first test reads the clocks and the last one writes the
# wall and CPU time per test in between to BENCH_OUT: that leaves out process
# start-up and the final flush (once per file), which only the whole-run wall
# time, the last column, includes. The CPU time is the test process's (all its
# threads: the Python sender's too), not the stub's.
mkdir -p "$NODE_BENCH" "$PY_BENCH"
# shellcheck disable=SC2016 # JavaScript, not shell
node -e '
  const [n, dir, integrations] = [Number(process.argv[1]), process.argv[2], process.argv[3]];
  const first = "globalThis.__sgBench = [performance.now(), process.cpuUsage()];";
  const last = `const [w, c] = globalThis.__sgBench; const u = process.cpuUsage(c);
    fs.appendFileSync(process.env.BENCH_OUT, \`\${((performance.now() - w) * 1000) / ${n - 1}} \${(u.user + u.system) / ${n - 1}}\\n\`);`;
  const body = (kw) =>
    Array.from({ length: n }, (_, i) => `${kw}("t${i}", () => { ${i === 0 ? first : i === n - 1 ? last : ""} });`).join("\n") + "\n";
  const cjs = `const fs = require("node:fs");\nconst { performance } = require("node:perf_hooks");\n`;
  const esm = `import fs from "node:fs";\nimport { performance } from "node:perf_hooks";\n`;
  const write = (name, text) => require("node:fs").writeFileSync(require("node:path").join(dir, name), text);
  write("jest.test.js", cjs + body("test"));
  write("vitest.test.mjs", `${esm}import { test } from "vitest";\n${body("test")}`);
  write("mocha.spec.js", cjs + body("it"));
  write("node.test.mjs", `${esm}import { test } from "node:test";\n${body("test")}`);
  // The same hooks as each integration, doing nothing.
  write("jest-hooks.cjs", `const h = globalThis[Symbol.for("EVENT_HANDLERS")];
h.push((event) => { if (event.name === "test_started") {} else if (event.name === "test_done") {} });
afterAll(() => {});\n`);
  write("vitest-hooks.mjs", `import { afterAll, afterEach, beforeEach } from "vitest";
beforeEach(() => {}); afterEach(() => {}); afterAll(() => {});\n`);
  write("mocha-hooks.cjs", "exports.mochaHooks = { beforeEach() {}, afterEach() {}, afterAll() {} };\n");
  write("node-test-hooks.mjs", `if (process.env.NODE_TEST_CONTEXT) {
  const { after, afterEach, beforeEach } = await import("node:test");
  beforeEach(() => {}); afterEach(() => {}); after(() => {});
}\n`);
  for (const [name, setup] of [["bare", null], ["hooks", `${dir}/jest-hooks.cjs`], ["marks", `${integrations}/jest.cjs`]])
    write(`jest.${name}.cjs`, `module.exports = { testMatch: ["**/jest.test.js"], transform: {}, setupFilesAfterEnv: [${setup ? JSON.stringify(setup) : ""}] };\n`);
  for (const [name, setup] of [["bare", null], ["hooks", `${dir}/vitest-hooks.mjs`], ["marks", `${integrations}/vitest.mjs`]])
    write(`vitest.${name}.mjs`, `export default { test: { include: ["vitest.test.mjs"], setupFiles: [${setup ? JSON.stringify(setup) : ""}] } };\n`);
' "$TESTS" "$NODE_BENCH" "$NODE_DIR"
python3 -c '
import sys
n, path = int(sys.argv[1]), sys.argv[2]
first = "global _bench; _bench = (time.perf_counter(), time.process_time())"
last = (
    "w, c = _bench; open(os.environ[\"BENCH_OUT\"], \"a\").write("
    f"f\"{{(time.perf_counter() - w) * 1e6 / {n - 1}}} {{(time.process_time() - c) * 1e6 / {n - 1}}}\\n\")"
)
line = lambda i: first if i == 0 else last if i == n - 1 else "pass"
tests = [f"def test_{i}():\n    {line(i)}\n\n" for i in range(n)]
open(path, "w").write("import os\nimport time\n\n" + "".join(tests))
' "$TESTS" "$PY_BENCH/test_bench.py"
cat >"$PY_BENCH/bench_hooks.py" <<'PY'
# The plugin's hooks, doing nothing.
import pytest


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    yield


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    pass
PY
touch "$PY_BENCH/pytest.ini"

# run_once OUT CMD...: one run (the suite must pass); appends "WALL_US CPU_US
# RUN_MS" (per test inside the run, and the whole run) to OUT.
run_once() {
  local out="$1" start
  shift
  : >"$WORK/stamp"
  start="$(date +%s%N)"
  BENCH_OUT="$WORK/stamp" "$@" >"$WORK/out" 2>&1 || { echo "bench: failed: $*" >&2; tail -n 20 "$WORK/out" >&2; exit 1; }
  echo "$(tail -n 1 "$WORK/stamp") $((($(date +%s%N) - start) / 1000000))" >>"$out"
}

# bench NAME CWD: runs the commands in the arrays bare, hooks and marks
# (marks with SESSIONGUARD_MARKS_URL set, the others without).
bench() {
  local name="$1" cwd="$2" i
  : >"$WORK/bare"
  : >"$WORK/hooks"
  : >"$WORK/marks"
  for ((i = 0; i < RUNS; i++)); do
    (cd "$cwd" && unset SESSIONGUARD_MARKS_URL && run_once "$WORK/bare" "${bare[@]}")
    (cd "$cwd" && unset SESSIONGUARD_MARKS_URL && run_once "$WORK/hooks" "${hooks[@]}")
    (cd "$cwd" && export SESSIONGUARD_MARKS_URL="$URL" && run_once "$WORK/marks" "${marks[@]}")
  done
  python3 - "$name" "$WORK/bare" "$WORK/hooks" "$WORK/marks" <<'PY'
import statistics, sys
name = sys.argv[1]
bare, hooks, marks = ([list(map(float, l.split())) for l in open(p)] for p in sys.argv[2:])
m = lambda rows, i: statistics.median(r[i] for r in rows)
col = lambda i, unit: f"{m(bare, i):6.1f} -> {m(hooks, i):6.1f} -> {m(marks, i):6.1f} {unit} (marks: {m(marks, i) - m(hooks, i):+6.1f})"
print(f"{name:<10} wall {col(0, 'us')};  CPU {col(1, 'us')};  whole run {m(bare, 2):5.0f} -> {m(hooks, 2):5.0f} -> {m(marks, 2):5.0f} ms")
PY
}

JEST=(node "$NODE_DIR/node_modules/jest/bin/jest.js" --ci --runInBand --cache=false --config)
bare=("${JEST[@]}" jest.bare.cjs) hooks=("${JEST[@]}" jest.hooks.cjs) marks=("${JEST[@]}" jest.marks.cjs)
bench jest "$NODE_BENCH"
VITEST=(node "$NODE_DIR/node_modules/vitest/vitest.mjs" run --config)
bare=("${VITEST[@]}" vitest.bare.mjs) hooks=("${VITEST[@]}" vitest.hooks.mjs) marks=("${VITEST[@]}" vitest.marks.mjs)
bench vitest "$NODE_BENCH"
MOCHA=(node "$NODE_DIR/node_modules/mocha/bin/mocha.js" mocha.spec.js)
bare=("${MOCHA[@]}") hooks=("${MOCHA[@]}" --require ./mocha-hooks.cjs) marks=("${MOCHA[@]}" --require "$NODE_DIR/mocha.cjs")
bench mocha "$NODE_BENCH"
bare=(node --test node.test.mjs) hooks=(node --import ./node-test-hooks.mjs --test node.test.mjs)
marks=(node --import "$NODE_DIR/node-test.mjs" --test node.test.mjs)
bench node-test "$NODE_BENCH"
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider test_bench.py)
bare=("${PYTEST[@]}") hooks=(env PYTHONPATH=. "${PYTEST[@]}" -p bench_hooks) marks=("${PYTEST[@]}")
bench pytest "$PY_BENCH"
