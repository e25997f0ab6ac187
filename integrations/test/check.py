"""Checks what the stub marks server (stub_server.py) received while a sample
suite ran under a real runner, against the suite's expected.json.

    check.py LOG EXPECTED MODE [--min-pids N] [--runner-pid PID]

MODE:
  marks    every expected test has exactly one `begin` and one `end`, with the
           expected name and file, both from the pid its body reported (its
           probe), the `begin` logged before the body's probe and the `end`
           after it; its hooks' probes also see it open; no other mark; in one
           process two tests are open at once only where expected.json says
           (concurrent groups, which must really overlap, and nested pairs)
  none     no request reached the marks endpoint (URL unset, or refused)
  slow     each process stopped after its first request to the slow endpoint
           (tests open at once may have sent theirs together)
  error    the same with the endpoint that answers 500
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
        for p in probes:
            if p["open"]:
                errors.append(f"probe {p['token']!r} saw open tests {p['open']}")
        if mode in ("slow", "error"):
            # Tests open at once in one process may all be waiting on their
            # first mark when it fails; after that the process sends nothing.
            in_flight = max([len(g) for g in expected.get("concurrent", [])] + [1])
            hits = [e for e in entries if e["kind"] == mode]
            per_pid = {}
            for e in hits:
                per_pid[e["pid"]] = per_pid.get(e["pid"], 0) + 1
            for pid, n in sorted(per_pid.items(), key=lambda kv: str(kv[0])):
                if pid not in probe_pids:
                    errors.append(f"/{mode} got a request from pid {pid}, which ran no test")
                if n > in_flight:
                    errors.append(f"pid {pid} sent {n} requests to /{mode}, more than {in_flight} (its first failure should stop it)")
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
    span = {}
    for k, t in expected_keys.items():
        got = found.get(k, {})
        begins, ends = got.get("begin", []), got.get("end", [])
        if len(begins) != 1 or len(ends) != 1:
            errors.append(f"{t['test']!r}: {len(begins)} begin and {len(ends)} end, expected one each")
            continue
        begin, end = begins[0], ends[0]
        span[t["token"]] = (begin, end)
        if begin["pid"] != end["pid"]:
            errors.append(f"{t['test']!r}: begin from pid {begin['pid']}, end from pid {end['pid']}")
        for p in test_probes.get(t["token"], [])[:1]:
            if p["pid"] != begin["pid"]:
                errors.append(f"{t['test']!r}: marked with pid {begin['pid']}, its body ran in pid {p['pid']}")
            if not begin["seq"] < p["seq"] < end["seq"]:
                errors.append(f"{t['test']!r}: begin/probe/end out of order ({begin['seq']}, {p['seq']}, {end['seq']})")
            if t["test"] not in p["open"]:
                errors.append(f"{t['test']!r}: not open when its body ran (open: {p['open']})")
    for p in hook_probes:
        if p["token"][len("hook:"):] not in p["open"]:
            errors.append(f"hook of {p['token'][5:]!r}: its test was not open (open: {p['open']})")

    # Overlaps within one process: only the expected ones.
    names = {t["token"]: t["test"] for t in tests}
    allowed = set()
    for group in expected.get("concurrent", []):
        allowed |= {frozenset((names[a], names[b])) for a in group for b in group if a != b}
        members = [span[t] for t in group if t in span]
        if len(members) == len(group):
            if len({b["pid"] for b, _ in members}) != 1:
                errors.append(f"concurrent group {group}: marks from different pids")
            if max(b["seq"] for b, _ in members) > min(e["seq"] for _, e in members):
                errors.append(f"concurrent group {group}: never all open at once")
    for parent, child in expected.get("nested", []):
        allowed.add(frozenset((names[parent], names[child])))
        if parent in span and child in span:
            (pb, pe), (cb, ce) = span[parent], span[child]
            if not pb["seq"] < cb["seq"] < ce["seq"] < pe["seq"]:
                errors.append(f"{names[child]!r} not inside {names[parent]!r}")
    open_in = {}
    for m in marks:
        now = open_in.setdefault(m["pid"], [])
        if m["event"] == "begin":
            for other in now:
                if frozenset((m["test"], other)) not in allowed:
                    errors.append(f"pid {m['pid']}: {m['test']!r} began while {other!r} was open")
            now.append(m["test"])
        elif m["test"] in now:
            now.remove(m["test"])

    pids = sorted({m["pid"] for m in marks})
    if min_pids and len(pids) < min_pids:
        errors.append(f"marks came from {len(pids)} process(es), expected at least {min_pids}")
    if runner_pid and runner_pid in pids:
        errors.append(f"a mark carries the runner's own pid {runner_pid}")
    conns = len({(m["pid"], m["conn"]) for m in marks})
    sample = ", ".join(f"{m['test']!r} in {m['file']}" for m in [m for m in marks if m["event"] == "begin"][:2])
    summary = (
        f"{len(marks)} marks for {len(tests)} tests from {len(pids)} process(es) "
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
