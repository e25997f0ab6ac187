#!/usr/bin/env python3
"""Verdicts for interop/run.sh (standard library only, any Python 3.8+).

  check.py summary STDOUT NAME
      The scenario's own verdict: the last non-empty line of STDOUT is NAME's
      JSON summary with "ok": true. Prints one detail line.
      Exit 0 when ok, 1 otherwise.

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
  - the JUnit file parses, has a test case for every rule named in `rules`
    and `also` (ids that exist), and its failures are exactly the rules
    reported with severity "error".
The entry is EXPECTED.json[NAME] when there is one, else the entry of the
name without its driver suffix (`bad-global-session` for
`bad-global-session@node7`): the Node scenarios run under several driver
majors, and an entry for one of them says where that driver differs.
`pending` lists rules that do not exist yet: [{"rule": ID, "issue": N}].
While such a rule is neither reported nor a JUnit test case, and every other
check holds, the verdict is PENDING (not PASS, not FAIL). Once sessionguard
knows the rule (it appears in the report or as a JUnit test case), the
verdict is FAIL until the rule is moved from `pending` to `rules`.
"""
import json
import sys
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
    rules = list(entry.get("rules", []))
    also = list(entry.get("also", []))
    pending = []
    for item in entry.get("pending", []):
        if not isinstance(item, dict) or "rule" not in item or "issue" not in item:
            raise SystemExit(f"check.py: {name}: pending entries are {{\"rule\": ID, \"issue\": N}}, got {item!r}")
        pending.append((item["rule"], item["issue"]))
    unknown_keys = set(entry) - {"rules", "also", "pending", "//"}
    if unknown_keys:
        raise SystemExit(f"check.py: {name}: unknown keys {sorted(unknown_keys)} in {expected_path}")
    return rules, also, pending


def read_junit(path):
    """{rule id: "failure" | "skipped" | "passed"} or an error string."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        return "no JUnit file written"
    except ET.ParseError as e:
        return f"JUnit file does not parse: {e}"
    cases = {}
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            cases[case.get("name")] = "failure"
        elif case.find("skipped") is not None:
            cases[case.get("name")] = "skipped"
        else:
            cases[case.get("name")] = "passed"
    if not cases:
        return "JUnit file has no test case"
    return cases


def first_evidence(violation):
    evidence = violation.get("evidence") or {}
    lsid = str(violation.get("lsid") or "?")[:8]
    return f"[{violation.get('severity')}] lsid {lsid}: {clip(evidence.get('message', '(no message)'))}"


def cmd_exec(expected_path, name, exit_code, stdout_path, report_path, junit_path):
    rules, also, pending = load_expectation(expected_path, name)
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
        print(f"exit={exit_code} {summary_detail}")
        for problem in problems:
            print("    - " + problem)
        return FAIL

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

    seen = {}  # rule -> (count, first violation)
    for v in violations:
        rule = v.get("rule")
        count, first = seen.get(rule, (0, v))
        seen[rule] = (count + 1, first)
    if counts.get("by_rule") is not None and counts["by_rule"] != {r: c for r, (c, _) in seen.items()}:
        problems.append(f"counts.by_rule {counts['by_rule']} disagrees with the violations list")

    reported = ", ".join(f"{rule}x{count}" for rule, (count, _) in sorted(seen.items())) or "nothing"
    detail = f"exit={exit_code} reported: {reported}; {summary_detail}"

    for rule in rules:
        if rule not in seen:
            problems.append(f"missing rule {rule}: expected, not reported (reported: {reported})")
    allowed = set(rules) | set(also)
    pending_rules = {rule for rule, _ in pending}
    for rule, (count, first) in sorted(seen.items()):
        if rule not in allowed and rule not in pending_rules:
            problems.append(f"unexpected rule {rule} x{count}, first: {first_evidence(first)}")

    failing = sorted({v.get("rule") for v in violations if v.get("severity") in FAILING_SEVERITIES})
    want_exit = 3 if failing else 0
    if exit_code != want_exit:
        why = f"error-severity rules reported: {', '.join(failing)}" if failing else "no error-severity violation"
        problems.append(f"exit code {exit_code}, expected {want_exit} ({why})")
    if bool(report.get("failed")) != bool(failing):
        problems.append(f"report says failed={report.get('failed')}, but error-severity rules reported: {failing or 'none'}")

    junit = read_junit(junit_path)
    if isinstance(junit, str):
        problems.append(junit)
        junit = {}
    else:
        for rule in sorted(allowed):
            if rule not in junit:
                problems.append(f"expected.json names {rule}, which is not a rule sessionguard knows (no JUnit test case)")
        junit_failures = sorted(r for r, state in junit.items() if state == "failure")
        if junit_failures != failing:
            problems.append(f"JUnit failures {junit_failures} != error-severity rules reported {failing}")

    still_pending = []
    for rule, issue in pending:
        if rule in seen or rule in junit:
            problems.append(
                f"{rule} (pending on issue {issue}) is now a rule sessionguard knows"
                f"{' and reported' if rule in seen else ''}: move it from pending to rules in expected.json"
            )
        else:
            still_pending.append((rule, issue))

    print(detail)
    for problem in problems:
        print("    - " + problem)
    if problems:
        return FAIL
    if still_pending:
        for rule, issue in still_pending:
            print(f"    - PENDING issue {issue}: {rule} is expected but does not exist yet")
        return PENDING
    return PASS


def main(argv):
    if len(argv) == 3 and argv[0] == "summary":
        return cmd_summary(*argv[1:])
    if len(argv) == 7 and argv[0] == "exec":
        return cmd_exec(*argv[1:])
    sys.stderr.write(__doc__)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
