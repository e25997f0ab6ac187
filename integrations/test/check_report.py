#!/usr/bin/env python3
"""Checks the reports of one `sessionguard exec` run of an end-to-end suite
(integrations/test.sh, the `e2e-*` cases), where exactly one test misused a
session: the JSON, JUnit and text reports must name exactly that test, from
the process that ran it, and no other test.

usage: check_report.py REPORT.json REPORT.xml OUTPUT.txt EXEC_STATUS FILE TEST
                       [--min-processes N]

FILE and TEST are the culprit as its runner names it (PROTOCOL.md#names).
OUTPUT.txt is what exec printed (its text summary goes to stderr).
Prints one line of detail; exits 1 on the first problem.
"""
import argparse
import json
import sys
import xml.etree.ElementTree as ET

EXIT_VIOLATIONS = 3


def fail(message):
    print(message)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("json_report")
    parser.add_argument("junit_report")
    parser.add_argument("output")
    parser.add_argument("status", type=int)
    parser.add_argument("file")
    parser.add_argument("test")
    parser.add_argument("--min-processes", type=int, default=1)
    args = parser.parse_args()
    culprit = (args.file, args.test)

    # The suite passed (the bug does not fail a test); the findings fail the run.
    if args.status != EXIT_VIOLATIONS:
        fail(f"sessionguard exec exited {args.status}, expected {EXIT_VIOLATIONS} (violations found, suite passed)")

    try:
        report = json.load(open(args.json_report))
    except (OSError, ValueError) as e:
        fail(f"no JSON report: {e}")
    marks = report.get("marks") or {}
    if marks.get("received", 0) == 0:
        fail(f"the report received no test marks: {marks}")
    if marks.get("processes", 0) < args.min_processes:
        fail(f"marks from {marks.get('processes')} processes, expected at least {args.min_processes}")
    findings = [f for f in report.get("findings", []) if f.get("rule")]
    if not findings:
        fail("no finding in the JSON report")
    if not any(f["rule"] == "concurrent-use" for f in findings):
        fail(f"no concurrent-use finding: {[f['rule'] for f in findings]}")
    pids = set()
    for finding in findings:
        tests = finding.get("tests", [])
        named = [(t["file"], t["test"]) for t in tests]
        if named != [culprit]:
            fail(f"JSON: finding {finding['rule']} names {named}, expected exactly {[culprit]}")
        for t in tests:
            if t["basis"] != "process":
                fail(f"JSON: {finding['rule']} attributed by {t['basis']}, expected by its process")
            pids.add(t["pid"])
        current = finding["first_example"]["attribution"]["current"]
        if current.get("pid") is None:
            fail(f"JSON: the offending request's process is unknown: {current['process']}")
    if len(pids) != 1:
        fail(f"JSON: the culprit ran in pids {sorted(pids)}, expected one")

    # JUnit: one case per offending test, classname = file, name = full name.
    try:
        root = ET.parse(args.junit_report).getroot()
    except (OSError, ET.ParseError) as e:
        fail(f"no JUnit report: {e}")
    cases = [c for c in root.iter("testcase") if not c.get("classname", "").startswith("sessionguard.")]
    named = [(c.get("classname"), c.get("name")) for c in cases]
    if named != [culprit]:
        fail(f"JUnit: test cases {named}, expected exactly {[culprit]}")
    failure = cases[0].find("failure")
    if failure is None or "concurrent-use" not in failure.get("message", ""):
        fail("JUnit: the culprit's case has no failure naming concurrent-use")

    # Text: every `test:` line names the culprit, with its process.
    text = open(args.output, encoding="utf-8", errors="replace").read()
    lines = [l.strip() for l in text.splitlines() if l.strip().startswith("test: ")]
    label = args.test if args.test.startswith(args.file + "::") else f"{args.file} › {args.test}"
    want = f"test: {label} — pid {pids.pop()} ("
    if not lines:
        fail("text: no `test:` line in the summary")
    for line in lines:
        if not line.startswith(want):
            fail(f"text: {line!r}, expected it to start with {want!r}")
    print(f"{len(findings)} findings, each naming only {label}; marks from {marks['processes']} processes")


if __name__ == "__main__":
    main()
