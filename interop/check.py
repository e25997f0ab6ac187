#!/usr/bin/env python3
"""Verdicts for interop/run.sh (standard library only, any Python 3.8+).

  check.py summary STDOUT NAME
      The scenario's own verdict: the last non-empty line of STDOUT is NAME's
      JSON summary with "ok": true. Prints one detail line.
      Exit 0 when ok, 1 otherwise.

  check.py run MODE EXPECTED.json NAME EXIT_CODE STDOUT [BEFORE AFTER]
      A scenario run directly or through a shared proxy (MODE: direct,
      proxy, enforce): its exit code and summary as above, and, with the
      proxy's admin snapshots BEFORE and AFTER (see `snapshot`), the
      violations it raised meanwhile against EXPECTED.json's `rules` and
      `also` (exactly as for exec), the `metrics` the entry asks for, and in
      enforce mode no rejected request for a good scenario. Exit 0 PASS,
      1 FAIL, 2 PENDING.

  check.py snapshot ADMIN_ADDR PREFIX
      Waits (at most 15 s) until the proxy whose admin server is ADMIN_ADDR
      has no client connection open (the scenario's last close has been
      judged), then writes PREFIX.metrics (GET /metrics),
      PREFIX.violations.json (GET /violations) and PREFIX.settled ("1", or
      "0 N" with N connections still open).

  check.py exec EXPECTED.json NAME EXIT_CODE STDOUT REPORT.json JUNIT.xml
      A scenario run under `sessionguard exec` (default --fail-on error):
      its summary (as above) and the proxy's reports against EXPECTED.json.
      Exit 0 PASS, 1 FAIL, 2 PENDING (see below). Prints a detail line, then
      one indented line per problem.

What `exec` checks, for the scenario's entry {rules, also, pending} in
EXPECTED.json:
  - the scenario's summary says ok, and the command's own exit code in the
    report is 0 (the pattern ran as intended, behind the proxy);
  - the report is the one of this run: the child is recorded, fail_on is
    "error", and requests went through the proxy (requests_inspected > 0);
  - every rule in `rules` was reported at least once;
  - no rule outside `rules` + `also` was reported (the first violation of
    each unexpected rule is printed with its evidence);
  - the exit code: 3 when a violation of severity "error" was reported (the
    default --fail-on), otherwise 0 — so a bad scenario whose expected rules
    are all warnings exits 0; the report's `failed` flag must agree;
  - the report's findings account for the violations: each violation names
    a finding of the report, and each rule's findings add up to its count;
  - the JUnit file parses and follows the report: one `sessionguard.findings`
    case per finding (named `RULE: ... [FINGERPRINT]`), failing exactly
    when the finding's severity is "error"; one `sessionguard.rules` case
    (named by the rule id) per rule that found nothing; every rule named in
    `rules` and `also` has a case (ids that exist), and the rules with a
    failing case are exactly the rules reported with severity "error".
The entry is EXPECTED.json[NAME] when there is one, else the entry of the
name without its driver suffix (`bad-global-session` for
`bad-global-session@node7`): the Node scenarios run under several driver
majors, and an entry for one of them says where that driver differs.
`pending` lists what waits on an open issue:
  - {"rule": ID, "issue": N}: a rule that does not exist yet. While it is
    neither reported nor a JUnit test case, and every other check holds, the
    verdict is PENDING (not PASS, not FAIL). Once sessionguard knows the rule
    (it appears in the report or as a JUnit test case), the verdict is FAIL
    until the rule is moved from `pending` to `rules`.
  - {"false_positive": ID, "issue": N}: a known false positive of rule ID on
    this correct scenario, which the issue is to remove. When it is reported
    and every other check holds, the verdict is PENDING and its first
    violation is printed; when it is not reported (it may depend on timing),
    the run passes. Remove the entry when the issue is fixed.

`metrics` (checked only with admin snapshots, in run's proxy and enforce
modes) lists counters the run must have moved:
  {"name": FAMILY, "labels": {LABEL: VALUE}, "min": N}: the sum of FAMILY's
  series carrying those labels rose by at least N between the snapshots (a
  family the proxy does not export fails the check; "min": 0 only shows the
  change in the detail line).
"""
import json
import re
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET

PASS, FAIL, PENDING = 0, 1, 2
# The default `sessionguard exec --fail-on`: these severities fail the run.
FAILING_SEVERITIES = {"error"}


def clip(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_summary(path, name):
    """(ok, detail, summary-or-None)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return False, "no stdout captured", None
    if not lines:
        return False, "no JSON summary on stdout", None
    try:
        summary = json.loads(lines[-1])
    except ValueError:
        return False, "last stdout line is not JSON: " + clip(lines[-1], 120), None
    if not isinstance(summary, dict):
        return False, "last stdout line is not a JSON object", None
    if summary.get("scenario") != name:
        return False, f"summary names scenario {summary.get('scenario')!r}, expected {name!r}", summary
    errors = ",".join(
        (e.get("codeName") or e.get("name", "?")) if isinstance(e, dict) else "?"
        for e in summary.get("errors", [])
    )
    observed = clip(json.dumps(summary.get("observed", {}), separators=(",", ":")))
    detail = f"errors=[{errors}] observed={observed}"
    if summary.get("ok") is not True:
        return False, "summary says ok=false; " + detail, summary
    return True, detail, summary


def cmd_summary(path, name):
    ok, detail, _ = read_summary(path, name)
    print(detail)
    return PASS if ok else FAIL


def expectation_key(expected, name):
    """The EXPECTED.json key for scenario NAME, or None: NAME itself (a
    driver-specific entry, e.g. "bad-global-session-txn@node7"), else the
    name before its "@driver" suffix (one entry for every driver major)."""
    for key in (name, name.split("@", 1)[0]):
        if isinstance(expected.get(key), dict):
            return key
    return None


def load_expectation(expected_path, name):
    with open(expected_path, encoding="utf-8") as f:
        expected = json.load(f)
    key = expectation_key(expected, name)
    if key is None:
        raise SystemExit(f"check.py: {expected_path} has no entry for scenario {name!r}")
    entry = expected[key]
    return parse_entry(name, entry, expected_path)


class Expectation:
    """One scenario's entry of EXPECTED.json."""

    def __init__(self, rules, also, pending, false_positives, metrics):
        self.rules = rules
        self.also = also
        self.pending = pending  # [(rule, issue)]
        self.false_positives = false_positives  # {rule: issue}
        self.metrics = metrics  # [{"name", "labels", "min"}]


def parse_entry(name, entry, expected_path):
    rules = list(entry.get("rules", []))
    also = list(entry.get("also", []))
    pending, false_positives = [], {}
    for item in entry.get("pending", []):
        if isinstance(item, dict) and "issue" in item and "rule" in item:
            pending.append((item["rule"], item["issue"]))
        elif isinstance(item, dict) and "issue" in item and "false_positive" in item:
            false_positives[item["false_positive"]] = item["issue"]
        else:
            raise SystemExit(
                f"check.py: {name}: pending entries are {{\"rule\": ID, \"issue\": N}} or "
                f"{{\"false_positive\": ID, \"issue\": N}}, got {item!r}"
            )
    metrics = []
    for item in entry.get("metrics", []):
        if not (
            isinstance(item, dict)
            and set(item) <= {"name", "labels", "min", "//"}
            and isinstance(item.get("name"), str)
            and isinstance(item.get("min"), int)
            and isinstance(item.get("labels", {}), dict)
        ):
            raise SystemExit(f"check.py: {name}: metrics entries are {{\"name\", \"labels\", \"min\"}}, got {item!r}")
        metrics.append(item)
    unknown_keys = set(entry) - {"rules", "also", "pending", "metrics", "//"}
    if unknown_keys:
        raise SystemExit(f"check.py: {name}: unknown keys {sorted(unknown_keys)} in {expected_path}")
    return Expectation(rules, also, pending, false_positives, metrics)


# JUnit classnames (crates/sessionguard/src/report.rs): a case per finding, a case per rule that found nothing.
JUNIT_FINDINGS = "sessionguard.findings"
JUNIT_RULES = "sessionguard.rules"
FINDING_CASE = re.compile(r"^(?P<rule>[a-z][a-z-]*)(?:: .*)? \[(?P<finding>[0-9a-f]{12})\]$")


def read_junit(path):
    """[{"classname", "name", "state", "rule", "finding"}] or an error string.
    state: "failure" | "skipped" | "passed"; rule: the rule id the case is
    about (None when its name does not say); finding: the fingerprint of a
    finding's case, else None."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        return "no JUnit file written"
    except ET.ParseError as e:
        return f"JUnit file does not parse: {e}"
    cases = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            state = "failure"
        elif case.find("skipped") is not None:
            state = "skipped"
        else:
            state = "passed"
        classname, name = case.get("classname"), case.get("name") or ""
        rule, finding = None, None
        if classname == JUNIT_FINDINGS:
            match = FINDING_CASE.match(name)
            if match:
                rule, finding = match.group("rule"), match.group("finding")
        elif classname == JUNIT_RULES:
            rule = name
        cases.append({"classname": classname, "name": name, "state": state, "rule": rule, "finding": finding})
    if not cases:
        return "JUnit file has no test case"
    return cases


def junit_problems(cases, report, failing):
    """The JUnit cases against the JSON report; returns (problems, rules with a case)."""
    problems = []
    findings = {f.get("fingerprint"): f for f in report.get("findings") or [] if not f.get("overflow")}
    finding_cases = {}
    for case in cases:
        if case["rule"] is None:
            problems.append(f"JUnit case {case['classname']} / {case['name']!r} names no rule")
        if case["finding"] is not None:
            finding_cases[case["finding"]] = case
    for fingerprint, finding in sorted(findings.items()):
        case = finding_cases.get(fingerprint)
        if case is None:
            problems.append(f"finding {fingerprint} ({finding.get('rule')}) has no JUnit case")
            continue
        if case["rule"] != finding.get("rule"):
            problems.append(f"JUnit case {case['name']!r} names rule {case['rule']}, the finding is {finding.get('rule')}")
        want = "failure" if finding.get("severity") in FAILING_SEVERITIES else "passed"
        if case["state"] != want:
            problems.append(f"JUnit case {case['name']!r} is {case['state']}, its finding's severity {finding.get('severity')!r} wants {want}")
    for fingerprint in sorted(set(finding_cases) - set(findings)):
        problems.append(f"JUnit case {finding_cases[fingerprint]['name']!r} is for no finding of the report")
    found = {f.get("rule") for f in findings.values()}
    for case in cases:
        if case["classname"] == JUNIT_RULES and case["rule"] in found and case["state"] == "passed":
            problems.append(f"rule {case['rule']} has findings but also a passing rule case")
    failures = sorted({c["rule"] for c in cases if c["state"] == "failure"})
    if failures != failing:
        problems.append(f"JUnit failures {failures} != error-severity rules reported {failing}")
    return problems, {c["rule"] for c in cases if c["rule"]}


def finding_problems(report, violations):
    """The JSON report's findings against its violations and counts."""
    problems = []
    findings = report.get("findings")
    if not isinstance(findings, list):
        return ["the JSON report has no findings array"]
    known = {f.get("fingerprint") for f in findings}
    for v in violations:
        if v.get("finding") not in known:
            problems.append(f"violation {v.get('id')} ({v.get('rule')}) names finding {v.get('finding')!r}, not in the report")
            break
    if not any(f.get("overflow") for f in findings):
        per_rule = {}
        for f in findings:
            per_rule[f.get("rule")] = per_rule.get(f.get("rule"), 0) + f.get("count", 0)
        by_rule = (report.get("counts") or {}).get("by_rule") or {}
        if per_rule != by_rule:
            problems.append(f"findings count {per_rule} per rule, counts.by_rule says {by_rule}")
    for f in findings:
        if not f.get("overflow") and not (f.get("first_example") or {}).get("evidence"):
            problems.append(f"finding {f.get('fingerprint')} ({f.get('rule')}) has no first example")
    return problems


def first_evidence(violation):
    evidence = violation.get("evidence") or {}
    lsid = str(violation.get("lsid") or "?")[:8]
    # The exec report keeps the message in the evidence, the admin API beside it.
    message = evidence.get("message") or violation.get("message") or "(no message)"
    return f"[{violation.get('severity')}] lsid {lsid}: {clip(message)}"


def cmd_exec(expected_path, name, exit_code, stdout_path, report_path, junit_path):
    expectation = load_expectation(expected_path, name)
    rules, also, pending = expectation.rules, expectation.also, expectation.pending
    exit_code = int(exit_code)
    problems = []

    summary_ok, summary_detail, _ = read_summary(stdout_path, name)
    if not summary_ok:
        problems.append("scenario: " + summary_detail)

    try:
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        report = None
        problems.append(f"no JSON report written (sessionguard exec exited {exit_code})")
    except ValueError as e:
        report = None
        problems.append(f"JSON report does not parse: {e}")

    if report is None:
        return verdict(f"exit={exit_code} {summary_detail}", problems, [])

    violations = report.get("violations") or []
    counts = report.get("counts") or {}
    child_code = (report.get("command") or {}).get("exit_code")
    if report.get("command") is None:
        problems.append("report has no command: not an exec report")
    elif child_code != 0:
        problems.append(f"the scenario itself exited {child_code} under exec")
    if report.get("fail_on") != "error":
        problems.append(f"report says fail_on={report.get('fail_on')!r}, the runner uses the default 'error'")
    if not counts.get("requests_inspected"):
        problems.append("no request went through the proxy (requests_inspected = 0)")
    if report.get("violations_omitted"):
        problems.append(f"{report['violations_omitted']} violations omitted from the report: cannot check them all")

    seen = tally(violations)
    if counts.get("by_rule") is not None and counts["by_rule"] != {r: c for r, (c, _) in seen.items()}:
        problems.append(f"counts.by_rule {counts['by_rule']} disagrees with the violations list")

    reported = describe_reported(seen)
    detail = f"exit={exit_code} reported: {reported}; {summary_detail}"
    problems += rule_problems(expectation, seen, reported)
    allowed = set(rules) | set(also) | set(expectation.false_positives)

    failing = sorted({v.get("rule") for v in violations if v.get("severity") in FAILING_SEVERITIES})
    want_exit = 3 if failing else 0
    if exit_code != want_exit:
        why = f"error-severity rules reported: {', '.join(failing)}" if failing else "no error-severity violation"
        problems.append(f"exit code {exit_code}, expected {want_exit} ({why})")
    if bool(report.get("failed")) != bool(failing):
        problems.append(f"report says failed={report.get('failed')}, but error-severity rules reported: {failing or 'none'}")

    problems += finding_problems(report, violations)
    cases = read_junit(junit_path)
    junit = set()
    if isinstance(cases, str):
        problems.append(cases)
    else:
        junit_issues, junit = junit_problems(cases, report, failing)
        problems += junit_issues
        for rule in sorted(allowed):
            if rule not in junit:
                problems.append(f"expected.json names {rule}, which is not a rule sessionguard knows (no JUnit test case)")

    still_pending = []
    for rule, issue in pending:
        if rule in seen or rule in junit:
            problems.append(
                f"{rule} (pending on issue {issue}) is now a rule sessionguard knows"
                f"{' and reported' if rule in seen else ''}: move it from pending to rules in expected.json"
            )
        else:
            still_pending.append((rule, issue))

    notes = [f"PENDING issue {issue}: {rule} is expected but does not exist yet" for rule, issue in still_pending]
    notes += false_positive_notes(expectation, seen)
    return verdict(detail, problems, notes)


def tally(violations):
    """{rule: (count, first violation)}"""
    seen = {}
    for v in violations:
        rule = v.get("rule")
        count, first = seen.get(rule, (0, v))
        seen[rule] = (count + 1, first)
    return seen


def describe_reported(seen):
    return ", ".join(f"{rule}x{count}" for rule, (count, _) in sorted(seen.items())) or "nothing"


def rule_problems(expectation, seen, reported):
    """Missing and unexpected rules."""
    problems = []
    for rule in expectation.rules:
        if rule not in seen:
            problems.append(f"missing rule {rule}: expected, not reported (reported: {reported})")
    allowed = set(expectation.rules) | set(expectation.also) | set(expectation.false_positives)
    pending_rules = {rule for rule, _ in expectation.pending}
    for rule, (count, first) in sorted(seen.items()):
        if rule not in allowed and rule not in pending_rules:
            problems.append(f"unexpected rule {rule} x{count}, first: {first_evidence(first)}")
    return problems


def false_positive_notes(expectation, seen):
    """The known false positives (see `pending`) this run reported."""
    notes = []
    for rule, issue in sorted(expectation.false_positives.items()):
        if rule in seen and rule not in expectation.rules and rule not in expectation.also:
            count, first = seen[rule]
            notes.append(f"PENDING issue {issue}: known false positive {rule} x{count}, first: {first_evidence(first)}")
    return notes


def verdict(detail, problems, notes):
    """Prints the detail line and the problems; PASS, FAIL or PENDING
    (`notes`: what `pending` entries explain)."""
    print(detail)
    for problem in problems:
        print("    - " + problem)
    if problems:
        return FAIL
    if notes:
        for note in notes:
            print("    - " + note)
        return PENDING
    return PASS


# ------------------------------------------------------------- the proxy's admin API


def http_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode("utf-8")


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text -> ({family names}, [(name, {labels}, value)])."""
    families, samples = set(), []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        families.add(name)
        samples.append((name, dict(LABEL.findall(labels or "")), number))
    return families, samples


def metric_sum(samples, name, labels):
    return sum(v for n, l, v in samples if n == name and all(l.get(k) == str(want) for k, want in labels.items()))


def cmd_snapshot(admin, prefix, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        metrics = http_get(f"http://{admin}/metrics")
        _, samples = parse_metrics(metrics)
        open_connections = metric_sum(samples, "sessionguard_connections_active", {})
        if open_connections == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    violations = http_get(f"http://{admin}/violations")
    with open(prefix + ".metrics", "w", encoding="utf-8") as f:
        f.write(metrics)
    with open(prefix + ".violations.json", "w", encoding="utf-8") as f:
        f.write(violations)
    with open(prefix + ".settled", "w", encoding="utf-8") as f:
        f.write("1\n" if open_connections == 0 else f"0 {int(open_connections)}\n")
    return PASS


def read_snapshot(prefix):
    with open(prefix + ".metrics", encoding="utf-8") as f:
        metrics = parse_metrics(f.read())
    with open(prefix + ".violations.json", encoding="utf-8") as f:
        violations = json.load(f)
    with open(prefix + ".settled", encoding="utf-8") as f:
        settled = f.read().split()
    return metrics, violations, settled


def short_metric(name, labels):
    base = name[len("sessionguard_"):] if name.startswith("sessionguard_") else name
    base = base[: -len("_total")] if base.endswith("_total") else base
    return base + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")


def cmd_run(mode, expected_path, name, exit_code, stdout_path, before=None, after=None):
    exit_code = int(exit_code)
    summary_ok, summary_detail, _ = read_summary(stdout_path, name)
    problems = []
    if exit_code != 0:
        problems.append(f"the scenario exited {exit_code}")
    if not summary_ok:
        problems.append("scenario: " + summary_detail)
    if before is None:
        return verdict(f"exit={exit_code} {summary_detail}", problems, [])
    expectation = load_expectation(expected_path, name)

    (_, samples_before), violations_before, _ = read_snapshot(before)
    (families, samples_after), violations_after, settled = read_snapshot(after)
    if settled[0] != "1":
        problems.append(f"the proxy still had {settled[1]} client connection(s) open 15 s after the scenario ended")
    known = {v.get("id") for v in violations_before}
    # The engine keeps the last `max_violations`: new ones have ids above the old ones.
    last = max((v.get("id", 0) for v in violations_before), default=0)
    violations = [v for v in violations_after if v.get("id") not in known and v.get("id", 0) > last]
    seen = tally(violations)
    reported = describe_reported(seen)
    problems += rule_problems(expectation, seen, reported)

    notes = []
    for rule, issue in expectation.pending:
        if rule in seen:
            problems.append(f"{rule} (pending on issue {issue}) is now reported: move it from pending to rules in expected.json")
        else:
            notes.append(f"PENDING issue {issue}: {rule} is expected but does not exist yet")
    notes += false_positive_notes(expectation, seen)
    moved = []
    for item in expectation.metrics:
        labels = item.get("labels", {})
        label = short_metric(item["name"], labels)
        if item["name"] not in families:
            problems.append(f"the proxy does not export {item['name']}")
            continue
        delta = metric_sum(samples_after, item["name"], labels) - metric_sum(samples_before, item["name"], labels)
        moved.append(f"{label}+{delta:g}")
        if delta < item["min"]:
            problems.append(f"metric {label} rose by {delta:g}, expected at least {item['min']}")
    if mode == "enforce" and not expectation.rules:
        rejected = metric_sum(samples_after, "sessionguard_requests_rejected_total", {}) - metric_sum(
            samples_before, "sessionguard_requests_rejected_total", {}
        )
        if rejected:
            problems.append(f"enforce mode rejected {rejected:g} request(s) of a correct application")
    metrics_detail = f" metrics: {' '.join(moved)};" if moved else ""
    detail = f"exit={exit_code} reported: {reported};{metrics_detail} {summary_detail}"
    return verdict(detail, problems, notes)


def main(argv):
    if len(argv) == 3 and argv[0] == "summary":
        return cmd_summary(*argv[1:])
    if len(argv) in (6, 8) and argv[0] == "run":
        return cmd_run(*argv[1:])
    if len(argv) == 3 and argv[0] == "snapshot":
        return cmd_snapshot(*argv[1:])
    if len(argv) == 7 and argv[0] == "exec":
        return cmd_exec(*argv[1:])
    sys.stderr.write(__doc__)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
