#!/usr/bin/env python3
"""Checks a soak run (scripts/soak.sh) and writes its figures.

Inputs: the runs table (lane, scenario, database, exit status, summary ok,
seconds), the proxy's /violations JSON and /metrics text, the RSS samples
("elapsed_seconds rss_kib" lines), interop/expected.json, the proxy log.

Every violation is attributed to the run whose database appears in its
evidence (current or earlier request namespace). Exit 1 when any check
fails; the reasons are printed, and summary.json holds the figures.
"""
import argparse
import collections
import json
import re
import statistics
import sys

# The Rust lane's patterns (sessionguard-dev demo-app), in expected.json's shape.
RUST_EXPECTED = {
    "rust-good": {"rules": [], "also": []},
    "rust-use-after-end": {"rules": ["use-after-end"], "also": []},
}


def metric(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
    return total


def main():
    parser = argparse.ArgumentParser()
    for flag in ("runs", "violations", "metrics", "rss", "expected", "proxy-log", "summary"):
        parser.add_argument("--" + flag, required=True)
    parser.add_argument("--elapsed", type=int, required=True)
    parser.add_argument("--growth-pct", type=float, required=True)
    parser.add_argument("--growth-kib", type=float, required=True)
    args = parser.parse_args()

    problems = []
    expected = json.load(open(args.expected))
    expected.update(RUST_EXPECTED)

    # ---- runs
    runs = {}
    per_scenario = collections.Counter()
    failed_runs = []
    for line in open(args.runs):
        lane, scenario, db, status, ok, seconds = line.rstrip("\n").split("\t")
        runs[db] = {"lane": lane, "scenario": scenario, "status": int(status), "ok": ok}
        per_scenario[scenario] += 1
        if int(status) != 0 or ok == "no":
            failed_runs.append(f"{db} (exit {status}, ok {ok})")
    if not runs:
        problems.append("no scenario ran")
    if failed_runs:
        problems.append(f"{len(failed_runs)} run(s) failed: {failed_runs[:10]}")

    # ---- violations
    violations = json.load(open(args.violations))
    by_rule = collections.Counter(v["rule"] for v in violations)
    found = collections.defaultdict(collections.Counter)
    unattributed = []
    for v in violations:
        evidence = v.get("evidence") or {}
        dbs = set()
        for side in ("current", "earlier"):
            ns = (evidence.get(side) or {}).get("namespace") or ""
            db = ns.split(".", 1)[0]
            if db in runs:
                dbs.add(db)
        if len(dbs) != 1:
            unattributed.append((v["rule"], sorted(dbs), evidence.get("current", {}).get("namespace")))
            continue
        found[dbs.pop()][v["rule"]] += 1
    if unattributed:
        problems.append(f"{len(unattributed)} violation(s) not attributable to one run: {unattributed[:5]}")

    missing, unexpected = [], []
    for db, run in runs.items():
        # As interop/check.py: the scenario's own entry, else the one of its
        # name without the driver suffix ("bad-global-session@node7").
        spec = expected.get(run["scenario"]) or expected.get(run["scenario"].split("@", 1)[0])
        if spec is None:
            problems.append(f"no expectation for scenario {run['scenario']}")
            continue
        allowed = set(spec["rules"]) | set(spec.get("also", []))
        got = found.get(db, collections.Counter())
        for rule in spec["rules"]:
            if got[rule] == 0:
                missing.append(f"{db}: {rule}")
        for rule in got:
            if rule not in allowed:
                unexpected.append(f"{db}: {rule} x{got[rule]}")
    if missing:
        problems.append(f"{len(missing)} bad run(s) without their violation: {missing[:10]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected violation(s): {unexpected[:10]}")

    # ---- metrics
    metrics = open(args.metrics).read()
    counted = metric_sum(metrics, "sessionguard_violations_total")
    if counted != len(violations):
        problems.append(f"/violations holds {len(violations)} but the metrics counted {counted:.0f}")
    malformed = metric_sum(metrics, "sessionguard_malformed_frames_total")
    timeouts = metric_sum(metrics, "sessionguard_frame_timeouts_total")
    if malformed or timeouts:
        problems.append(f"malformed frames {malformed:.0f}, frame timeouts {timeouts:.0f}")
    log = open(args.proxy_log).read().splitlines()
    levels = collections.Counter()
    for line in log:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("WARN", "ERROR") and entry.get("target") != "sessionguard::violation":
            levels[entry.get("message", "")[:80]] += 1

    # ---- memory
    samples = []
    for line in open(args.rss):
        parts = line.split()
        if len(parts) == 2:
            samples.append((int(parts[0]), int(parts[1])))
    rss = {}
    if len(samples) >= 6:
        # Warm-up: the first fifth of the run (pools, caches, the ledger filling).
        steady = [s for s in samples if s[0] >= args.elapsed / 5] or samples
        third = max(1, len(steady) // 3)
        early = statistics.median(r for _, r in steady[:third])
        late = statistics.median(r for _, r in steady[-third:])
        xs = [t for t, _ in steady]
        ys = [r for _, r in steady]
        mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
        var = sum((x - mean_x) ** 2 for x in xs) or 1
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var
        growth = late - early
        rss = {
            "first_kib": samples[0][1],
            "max_kib": max(r for _, r in samples),
            "last_kib": samples[-1][1],
            "steady_early_median_kib": early,
            "steady_late_median_kib": late,
            "growth_kib": growth,
            "slope_kib_per_min": round(slope * 60, 1),
            "samples": len(samples),
        }
        if growth > args.growth_kib and growth > early * args.growth_pct / 100:
            problems.append(
                f"memory grew {growth:.0f} KiB ({100 * growth / early:.1f}%) from the early to the "
                f"late part of the run (limits {args.growth_kib:.0f} KiB and {args.growth_pct}%)"
            )
    else:
        problems.append(f"only {len(samples)} RSS samples")

    summary = {
        "elapsed_seconds": args.elapsed,
        "runs": len(runs),
        "runs_by_scenario": dict(sorted(per_scenario.items())),
        "failed_runs": failed_runs,
        "violations": len(violations),
        "violations_by_rule": dict(sorted(by_rule.items())),
        "bad_runs_missing_a_violation": missing,
        "unexpected_violations": unexpected,
        "unattributed_violations": len(unattributed),
        "commands": metric_sum(metrics, "sessionguard_commands_total"),
        "connections_accepted": metric(metrics, "sessionguard_connections_accepted_total"),
        "sessions_tracked_at_end": metric(metrics, "sessionguard_sessions_tracked"),
        "malformed_frames": malformed,
        "frame_timeouts": timeouts,
        "proxy_warnings_other_than_violations": dict(levels.most_common(10)),
        "rss": rss,
        "problems": problems,
    }
    with open(args.summary, "w") as out:
        json.dump(summary, out, indent=2)
    print(json.dumps(summary, indent=2))
    if problems:
        print("soak: FAILED", file=sys.stderr)
        for problem in problems:
            print("  - " + problem, file=sys.stderr)
        return 1
    print("soak: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
