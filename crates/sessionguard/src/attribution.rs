//! Which test sent a request, decided when the report is written
//! (`integrations/PROTOCOL.md`, "What follows for the server"): the marks
//! of each process paired into test intervals, and a request received at
//! time `t` from process `P` attributed to the tests of `P` whose interval
//! holds `t` — through `P`'s parents when `P` itself sent no mark (a child
//! the test started), and, when the owner is unknown, to the tests open at
//! `t` in any process, labelled as a time-window guess.
//!
//! It is pure: marks, owners and times in, [`RequestAttribution`] out. It
//! does no I/O and never guesses silently: every answer says its
//! [`Basis`].

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::marks::{Event, Mark};
use crate::peer_process::Owner;

/// A test, as the runner names it: `(file, test)` identifies it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TestRef {
    pub file: String,
    pub test: String,
    /// The process that ran it.
    pub pid: u32,
    /// Its `begin` never got an `end` (the process died, marks were lost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub did_not_finish: bool,
}

/// How a request was tied to its tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Basis {
    /// The connection's owner sent marks: its tests open at that time.
    Process,
    /// The owner sent none, a parent of it did (a test's child process).
    ParentProcess,
    /// The owner is unknown or sent no marks, nor did its parents: the
    /// tests open at that time in any process. A guess.
    TimeWindowGuess,
    /// No marks were received at all.
    NoMarks,
}

/// The tests and process behind one request of a violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestAttribution {
    /// `pid 4242 (node .../processChild.js)` or `unknown: <reason>`.
    pub process: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub basis: Basis,
    /// Most recently begun first (for nested tests: the innermost).
    pub tests: Vec<TestRef>,
    /// No test of the process was open: the last one that ended before
    /// the request, if any ("sent after it ended").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<TestRef>,
}

impl RequestAttribution {
    /// The tests as one phrase, for the text report.
    pub fn tests_phrase(&self) -> String {
        let names: Vec<String> = self.tests.iter().map(test_label).collect();
        let mut phrase = if names.is_empty() {
            match (&self.after, self.basis) {
                (_, Basis::NoMarks) => "no test marks received".to_string(),
                (Some(after), _) => {
                    format!("outside any test (sent after {} ended)", test_label(after))
                }
                (None, _) => "outside any test".to_string(),
            }
        } else {
            names.join("; ")
        };
        match self.basis {
            Basis::ParentProcess => phrase.push_str(" (through a parent process)"),
            Basis::TimeWindowGuess if !self.tests.is_empty() => {
                phrase.push_str(" (time-window guess: the connection's process sent no marks)")
            }
            _ => {}
        }
        phrase
    }
}

/// `test/orders.test.js › orders create inserts one`; a name that already
/// holds its file (pytest's node ids, `tests/test_x.py::test_y`) alone.
pub(crate) fn test_label(test: &TestRef) -> String {
    let holds_file = test
        .test
        .strip_prefix(test.file.as_str())
        .is_some_and(|rest| rest.starts_with("::"));
    let mut label = if test.file.is_empty() || holds_file {
        test.test.clone()
    } else {
        format!("{} › {}", test.file, test.test)
    };
    if test.did_not_finish {
        label.push_str(" (did not finish)");
    }
    label
}

#[derive(Debug, Clone)]
struct Interval {
    begin: f64,
    /// `None`: never ended, open until the end of the run.
    end: Option<f64>,
    file: String,
    test: String,
}

/// The marks of a run, paired into intervals per process.
#[derive(Debug, Default)]
pub(crate) struct Intervals {
    by_pid: HashMap<u32, Vec<Interval>>,
    any: bool,
}

impl Intervals {
    /// Pairs marks per `(pid, file, test)` by time (a `begin` before an
    /// `end` of the same time): each `end` closes the earliest unmatched
    /// `begin` before it; an `end` with none is ignored.
    pub(crate) fn from_marks(marks: &[Mark]) -> Intervals {
        let mut groups: BTreeMap<(u32, &str, &str), Vec<&Mark>> = BTreeMap::new();
        for mark in marks {
            groups
                .entry((mark.pid, mark.file.as_str(), mark.test.as_str()))
                .or_default()
                .push(mark);
        }
        let mut by_pid: HashMap<u32, Vec<Interval>> = HashMap::new();
        for ((pid, file, test), mut group) in groups {
            group.sort_by(|a, b| {
                a.time
                    .total_cmp(&b.time)
                    .then((a.event == Event::End).cmp(&(b.event == Event::End)))
            });
            let mut open: std::collections::VecDeque<f64> = Default::default();
            let intervals = by_pid.entry(pid).or_default();
            for mark in group {
                match mark.event {
                    Event::Begin => open.push_back(mark.time),
                    Event::End => {
                        if let Some(begin) = open.pop_front() {
                            intervals.push(Interval {
                                begin,
                                end: Some(mark.time),
                                file: file.to_string(),
                                test: test.to_string(),
                            });
                        }
                    }
                }
            }
            intervals.extend(open.into_iter().map(|begin| Interval {
                begin,
                end: None,
                file: file.to_string(),
                test: test.to_string(),
            }));
        }
        Intervals {
            any: !marks.is_empty(),
            by_pid,
        }
    }

    /// The tests of the request received in `[lo, hi]` (Unix ms; a window
    /// when the time is known to the millisecond only) on a connection of
    /// `owner`.
    pub(crate) fn attribute(&self, owner: &Owner, lo: f64, hi: f64) -> RequestAttribution {
        let (process, pid) = match owner {
            Owner::Known(info) => (owner.describe(), Some(info.pid)),
            Owner::Unknown(_) => (owner.describe(), None),
        };
        let mut answer = RequestAttribution {
            process,
            pid,
            basis: Basis::NoMarks,
            tests: Vec::new(),
            after: None,
        };
        if !self.any {
            return answer;
        }
        let marked = match owner {
            Owner::Known(info) => std::iter::once(&info.pid)
                .chain(&info.parents)
                .enumerate()
                .find(|(_, pid)| self.by_pid.contains_key(pid))
                .map(|(depth, pid)| (depth, *pid)),
            Owner::Unknown(_) => None,
        };
        match marked {
            Some((depth, pid)) => {
                answer.basis = if depth == 0 {
                    Basis::Process
                } else {
                    Basis::ParentProcess
                };
                let intervals = &self.by_pid[&pid];
                answer.tests = open_tests(pid, intervals, lo, hi);
                if answer.tests.is_empty() {
                    answer.after = intervals
                        .iter()
                        .filter(|i| i.end.is_some_and(|end| end < lo))
                        .max_by(|a, b| a.end.unwrap_or(0.0).total_cmp(&b.end.unwrap_or(0.0)))
                        .map(|i| test_ref(pid, i));
                }
            }
            None => {
                answer.basis = Basis::TimeWindowGuess;
                let mut pids: Vec<&u32> = self.by_pid.keys().collect();
                pids.sort();
                let mut tests: Vec<(f64, TestRef)> = Vec::new();
                for pid in pids {
                    for interval in &self.by_pid[pid] {
                        if holds(interval, lo, hi) {
                            tests.push((interval.begin, test_ref(*pid, interval)));
                        }
                    }
                }
                answer.tests = latest_first(tests);
            }
        }
        answer
    }
}

fn holds(interval: &Interval, lo: f64, hi: f64) -> bool {
    interval.begin <= hi && interval.end.is_none_or(|end| end >= lo)
}

fn open_tests(pid: u32, intervals: &[Interval], lo: f64, hi: f64) -> Vec<TestRef> {
    latest_first(
        intervals
            .iter()
            .filter(|i| holds(i, lo, hi))
            .map(|i| (i.begin, test_ref(pid, i)))
            .collect(),
    )
}

fn latest_first(mut tests: Vec<(f64, TestRef)>) -> Vec<TestRef> {
    tests.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut out: Vec<TestRef> = Vec::new();
    for (_, test) in tests {
        // The same test run twice in the window (a retry) is named once.
        if !out.contains(&test) {
            out.push(test);
        }
    }
    out
}

fn test_ref(pid: u32, interval: &Interval) -> TestRef {
    TestRef {
        file: interval.file.clone(),
        test: interval.test.clone(),
        pid,
        did_not_finish: interval.end.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_process::ProcessInfo;

    fn mark(event: Event, pid: u32, file: &str, test: &str, time: f64) -> Mark {
        Mark {
            event,
            test: test.into(),
            file: file.into(),
            pid,
            time,
        }
    }

    fn run(pid: u32, file: &str, test: &str, begin: f64, end: f64) -> [Mark; 2] {
        [
            mark(Event::Begin, pid, file, test, begin),
            mark(Event::End, pid, file, test, end),
        ]
    }

    fn owner(pid: u32, parents: &[u32]) -> Owner {
        Owner::Known(ProcessInfo {
            pid,
            cmdline: format!("node worker-{pid}"),
            parents: parents.to_vec(),
        })
    }

    fn names(a: &RequestAttribution) -> Vec<&str> {
        a.tests.iter().map(|t| t.test.as_str()).collect()
    }

    /// Two workers running sequential tests at the same times.
    fn two_workers() -> Intervals {
        let mut marks = Vec::new();
        marks.extend(run(10, "a.test.js", "a one", 100.0, 200.0));
        marks.extend(run(10, "a.test.js", "a two", 200.0, 300.0));
        marks.extend(run(20, "b.test.js", "b one", 100.0, 250.0));
        // Arrival order means nothing.
        marks.reverse();
        Intervals::from_marks(&marks)
    }

    #[test]
    fn a_request_goes_to_the_test_its_process_ran_then() {
        let intervals = two_workers();
        let a = intervals.attribute(&owner(10, &[1000]), 150.0, 150.0);
        assert_eq!(a.basis, Basis::Process);
        assert_eq!(names(&a), ["a one"], "never b one, open in worker 20");
        assert_eq!(a.pid, Some(10));
        assert_eq!(a.process, "pid 10 (node worker-10)");
        let b = intervals.attribute(&owner(20, &[1000]), 260.0, 260.0);
        assert!(b.tests.is_empty());
        assert_eq!(b.after.as_ref().map(|t| t.test.as_str()), Some("b one"));
        assert_eq!(
            b.tests_phrase(),
            "outside any test (sent after b.test.js › b one ended)"
        );
        // Bounds included.
        let edge = intervals.attribute(&owner(10, &[]), 100.0, 100.0);
        assert_eq!(names(&edge), ["a one"]);
    }

    #[test]
    fn a_millisecond_window_takes_every_test_it_touches() {
        let intervals = two_workers();
        let a = intervals.attribute(&owner(10, &[]), 199.5, 200.5);
        assert_eq!(names(&a), ["a two", "a one"]);
        let a = intervals.attribute(&owner(10, &[]), 201.0, 202.0);
        assert_eq!(names(&a), ["a two"]);
    }

    #[test]
    fn overlapping_and_nested_tests_are_all_named_innermost_first() {
        let mut marks = Vec::new();
        marks.extend(run(7, "n.mjs", "orders", 10.0, 100.0));
        marks.extend(run(7, "n.mjs", "orders > inserts one", 20.0, 30.0));
        marks.extend(run(7, "n.mjs", "orders > inserts two", 25.0, 40.0));
        let intervals = Intervals::from_marks(&marks);
        let a = intervals.attribute(&owner(7, &[]), 27.0, 27.0);
        assert_eq!(
            names(&a),
            ["orders > inserts two", "orders > inserts one", "orders"]
        );
    }

    #[test]
    fn retries_pair_in_order_and_unfinished_tests_stay_open() {
        let marks = [
            mark(Event::End, 3, "f", "flaky", 5.0), // no begin before it: ignored
            mark(Event::Begin, 3, "f", "flaky", 10.0),
            mark(Event::End, 3, "f", "flaky", 20.0),
            mark(Event::Begin, 3, "f", "flaky", 30.0),
            mark(Event::End, 3, "f", "flaky", 40.0),
            mark(Event::Begin, 3, "f", "hangs", 50.0),
        ];
        let intervals = Intervals::from_marks(&marks);
        assert!(intervals
            .attribute(&owner(3, &[]), 25.0, 25.0)
            .tests
            .is_empty());
        assert_eq!(
            names(&intervals.attribute(&owner(3, &[]), 35.0, 35.0)),
            ["flaky"]
        );
        let late = intervals.attribute(&owner(3, &[]), 9_999.0, 9_999.0);
        assert_eq!(names(&late), ["hangs"]);
        assert!(late.tests[0].did_not_finish);
        assert_eq!(late.tests_phrase(), "f › hangs (did not finish)");
        // Same time: the begin comes first, so a zero-length test pairs.
        let zero = Intervals::from_marks(&[
            mark(Event::End, 4, "f", "z", 1.0),
            mark(Event::Begin, 4, "f", "z", 1.0),
        ]);
        assert_eq!(names(&zero.attribute(&owner(4, &[]), 1.0, 1.0)), ["z"]);
        assert!(!zero.attribute(&owner(4, &[]), 1.0, 1.0).tests[0].did_not_finish);
    }

    #[test]
    fn labels_name_the_file_once() {
        let test = |file: &str, name: &str| TestRef {
            file: file.into(),
            test: name.into(),
            pid: 1,
            did_not_finish: false,
        };
        assert_eq!(test_label(&test("a.test.js", "a one")), "a.test.js › a one");
        assert_eq!(
            test_label(&test("tests/test_a.py", "tests/test_a.py::test_one")),
            "tests/test_a.py::test_one"
        );
        assert_eq!(test_label(&test("", "one")), "one");
    }

    #[test]
    fn a_child_of_a_test_process_is_matched_through_its_parents() {
        let intervals = two_workers();
        // pid 99 (sent no marks) is a child of worker 20.
        let a = intervals.attribute(&owner(99, &[20, 1000]), 120.0, 120.0);
        assert_eq!(a.basis, Basis::ParentProcess);
        assert_eq!(names(&a), ["b one"]);
        assert_eq!(a.pid, Some(99));
        assert!(a.tests_phrase().ends_with("(through a parent process)"));
    }

    #[test]
    fn without_a_pid_match_it_is_a_labelled_guess() {
        let intervals = two_workers();
        let unknown = Owner::Unknown("connection from another host (10.0.0.5)".into());
        let a = intervals.attribute(&unknown, 150.0, 150.0);
        assert_eq!(a.basis, Basis::TimeWindowGuess);
        assert_eq!(names(&a), ["a one", "b one"]);
        assert_eq!(a.pid, None);
        assert_eq!(
            a.process,
            "unknown: connection from another host (10.0.0.5)"
        );
        assert!(a.tests_phrase().contains("time-window guess"));
        // A known process that sent no marks, nor did its parents: a guess too.
        let stranger = intervals.attribute(&owner(55, &[56]), 260.0, 260.0);
        assert_eq!(stranger.basis, Basis::TimeWindowGuess);
        assert_eq!(names(&stranger), ["a two"]);
    }

    #[test]
    fn no_marks_at_all_says_so() {
        let intervals = Intervals::from_marks(&[]);
        let a = intervals.attribute(&owner(10, &[]), 150.0, 150.0);
        assert_eq!(a.basis, Basis::NoMarks);
        assert!(a.tests.is_empty());
        assert_eq!(a.tests_phrase(), "no test marks received");
    }
}
