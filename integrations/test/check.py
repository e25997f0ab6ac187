"""Checks what the stub marks server (stub_server.py) received while a sample
suite ran under a real runner, against the suite's expected.json.

    check.py LOG EXPECTED MODE [--min-pids N] [--runner-pid PID]

Marks may arrive late, batched and in any order (PROTOCOL.md): this checks them
by their times, as the proxy will, never by their arrival. Each sample test
probes the stub from its body (and some from their own hooks): the probe
carries its pid and the time on the test's clock, and the stub adds the time
it received it, as the proxy stamps a test's MongoDB request.

MODE:
  marks    every expected test has exactly one `begin` and one `end`, with the
           expected name and file, both from the pid its body probed from;
           begin.time <= the body's own time <= the probe's receive time <=
           end.time; the probes of its hooks fall inside it too; attributing
           each probe by time (the tests open in its pid when the stub
           received it) gives its own test, plus only the tests expected.json
           says run with it (concurrent groups, which must really overlap, and
           nested pairs); no other mark; no two other tests of one pid overlap
  none     no request reached the marks endpoint (URL unset, or refused)
  slow     each process that ran tests sent exactly one request to the endpoint
           that never answers, then nothing (so it waited for it once, at
           most for the flush's bound; that no test waits on a mark is a
           matter of time, which bench.sh shows and no check here asserts)
  error    each process sent exactly one request to the endpoint that answers
           500, then nothing
In every mode each expected test ran once (its probe is in the log).
--min-pids N:     the marks came from at least N processes (parallel runners)
--runner-pid PID: no mark carries the pid of the runner's own main process

Prints one line of counts and sample names; exits 1 with the reasons on failure.
"""

import argparse
import json
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def overlap(a, b):
    """Whether two [begin, end] intervals share more than an instant."""
    return max(a[0]["time"], b[0]["time"]) < min(a[1]["time"], b[1]["time"])


def check(entries, expected, mode, min_pids=None, runner_pid=None):
    errors = []
    tests = expected["tests"]
    by_token = {t["token"]: t for t in tests}
    probes = [e for e in entries if e["kind"] == "probe"]
    test_probes = {}
    for p in probes:
        if not p["token"].startswith("hook:"):
            test_probes.setdefault(p["token"], []).append(p)
    for token in by_token:
        if len(test_probes.get(token, [])) != 1:
            errors.append(f"test {token!r} probed {len(test_probes.get(token, []))} times, expected once")
    for token in test_probes:
        if token not in by_token:
            errors.append(f"unexpected probe {token!r}")
    hook_probes = [p for p in probes if p["token"].startswith("hook:")]
    if len(hook_probes) != expected.get("hook_probes", 0):
        errors.append(f"{len(hook_probes)} hook probes, expected {expected.get('hook_probes', 0)}")
    for e in entries:
        if e["kind"] == "invalid":
            errors.append(f"invalid mark ({e['reason']}) at seq {e['seq']}")

    marks = [e for e in entries if e["kind"] == "mark"]
    probe_pids = {p["pid"] for p in probes}
    if mode in ("none", "slow", "error"):
        if marks:
            errors.append(f"{len(marks)} marks reached /marks, expected none")
        if mode in ("slow", "error"):
            # One connection per process, one request at a time: the first
            # one fails, and after that the process sends nothing.
            hits = [e for e in entries if e["kind"] == mode]
            per_pid = {}
            for e in hits:
                per_pid[e["pid"]] = per_pid.get(e["pid"], 0) + 1
            for pid in sorted(set(per_pid) | probe_pids, key=str):
                if pid not in probe_pids:
                    errors.append(f"/{mode} got a request from pid {pid}, which ran no test")
                elif per_pid.get(pid, 0) != 1:
                    errors.append(f"pid {pid} sent {per_pid.get(pid, 0)} requests to /{mode}, expected exactly 1")
            summary = f"{len(hits)} request(s) reached /{mode} from {len(probe_pids)} test process(es), then none"
        else:
            summary = "no mark sent"
        return errors, f"{len(test_probes)} tests ran; {summary}"

    # mode == "marks"
    key = lambda m: (m["test"], m["file"])
    expected_keys = {(t["test"], t["file"]): t for t in tests}
    found = {}
    for m in marks:
        if key(m) not in expected_keys:
            errors.append(f"unexpected mark {m['event']} {m['test']!r} in {m['file']!r}")
            continue
        found.setdefault(key(m), {}).setdefault(m["event"], []).append(m)
    span = {}  # token -> (begin, end)
    for k, t in expected_keys.items():
        got = found.get(k, {})
        begins, ends = got.get("begin", []), got.get("end", [])
        if len(begins) != 1 or len(ends) != 1:
            errors.append(f"{t['test']!r}: {len(begins)} begin and {len(ends)} end, expected one each")
            continue
        begin, end = begins[0], ends[0]
        if begin["pid"] != end["pid"]:
            errors.append(f"{t['test']!r}: begin from pid {begin['pid']}, end from pid {end['pid']}")
            continue
        span[t["token"]] = (begin, end)
        for p in test_probes.get(t["token"], [])[:1]:
            if p["pid"] != begin["pid"]:
                errors.append(f"{t['test']!r}: marked with pid {begin['pid']}, its body ran in pid {p['pid']}")
            times = [begin["time"], p["time"], p["received"], end["time"]]
            if times != sorted(times):
                errors.append(
                    f"{t['test']!r}: not begin.time <= body time <= probe received <= end.time ({', '.join(f'{x:.3f}' for x in times)})"
                )

    # Attribution by time, as the proxy does it: the tests whose interval in
    # the probe's pid holds the time the probe was received.
    names = {t["token"]: t["test"] for t in tests}
    tokens_by_name = {}
    for t in tests:
        tokens_by_name.setdefault(t["test"], []).append(t["token"])
    allowed = set()
    for group in expected.get("concurrent", []):
        allowed |= {frozenset((a, b)) for a in group for b in group if a != b}
    for parent, child in expected.get("nested", []):
        allowed.add(frozenset((parent, child)))

    def attributed(p):
        return {
            token
            for token, (b, e) in span.items()
            if b["pid"] == p["pid"] and b["time"] <= p["received"] <= e["time"]
        }

    for p in probes:
        if p["token"].startswith("hook:"):
            owners = tokens_by_name.get(p["token"][len("hook:") :], [])
            if len(owners) != 1:
                errors.append(f"hook probe {p['token']!r}: no single test of that name")
                continue
            owner = owners[0]
        else:
            owner = p["token"]
        if owner not in span:
            continue  # reported above
        got = attributed(p)
        if owner not in got:
            errors.append(f"probe {p['token']!r} falls outside its test's marks (attributed to {sorted(names[t] for t in got)})")
        for other in got - {owner}:
            if frozenset((owner, other)) not in allowed:
                errors.append(f"probe {p['token']!r} is attributed to {names[other]!r} too")

    # Overlaps within one process: only the expected ones, and those real.
    for group in expected.get("concurrent", []):
        members = [span[t] for t in group if t in span]
        if len(members) == len(group):
            if len({b["pid"] for b, _ in members}) != 1:
                errors.append(f"concurrent group {group}: marks from different pids")
            if max(b["time"] for b, _ in members) >= min(e["time"] for _, e in members):
                errors.append(f"concurrent group {group}: never all open at once")
    for parent, child in expected.get("nested", []):
        if parent in span and child in span:
            (pb, pe), (cb, ce) = span[parent], span[child]
            if not pb["time"] <= cb["time"] <= ce["time"] <= pe["time"]:
                errors.append(f"{names[child]!r} not inside {names[parent]!r}")
    tokens = sorted(span)
    for i, a in enumerate(tokens):
        for b in tokens[i + 1 :]:
            if span[a][0]["pid"] == span[b][0]["pid"] and frozenset((a, b)) not in allowed and overlap(span[a], span[b]):
                errors.append(f"pid {span[a][0]['pid']}: {names[a]!r} and {names[b]!r} overlap")

    pids = sorted({m["pid"] for m in marks})
    if min_pids and len(pids) < min_pids:
        errors.append(f"marks came from {len(pids)} process(es), expected at least {min_pids}")
    if runner_pid and runner_pid in pids:
        errors.append(f"a mark carries the runner's own pid {runner_pid}")
    requests = {m["request"]: m["batch"] for m in marks}
    conns = len({(m["pid"], m["conn"]) for m in marks})
    # Marks that arrived after a mark of the same pid with a later time.
    late, latest = 0, {}
    for m in marks:
        if m["time"] < latest.get(m["pid"], 0):
            late += 1
        latest[m["pid"]] = max(latest.get(m["pid"], 0), m["time"])
    sample = ", ".join(f"{m['test']!r} in {m['file']}" for m in [m for m in marks if m["event"] == "begin"][:2])
    summary = (
        f"{len(marks)} marks for {len(tests)} tests from {len(pids)} process(es) in {len(requests)} request(s) "
        f"(up to {max(requests.values(), default=0)} a request; {late} out of order) "
        f"over {conns} connection(s); e.g. {sample}"
    )
    return errors, summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("expected")
    parser.add_argument("mode", choices=["marks", "none", "slow", "error"])
    parser.add_argument("--min-pids", type=int)
    parser.add_argument("--runner-pid", type=int)
    args = parser.parse_args()
    with open(args.expected, encoding="utf-8") as f:
        expected = json.load(f)
    errors, summary = check(load(args.log), expected, args.mode, args.min_pids, args.runner_pid)
    print(summary)
    for e in errors:
        print(f"  - {e}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
