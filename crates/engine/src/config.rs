//! Configuration of the session engine: the `[sessions]` table (mode,
//! refresher, ledger bounds, time limits) and the `[rules.<rule-id>]` tables
//! (enabled, severity, action), their documented defaults, validation whose
//! errors name the key, their resolution into the per-rule settings the
//! engine uses, and `LiveRules`, the holder a reload swaps those settings in
//! (whole, consistently, with no lock and no shared write on the request path).
//! The binary's configuration file embeds these types; nothing here does I/O.

use std::collections::BTreeMap;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::violation::{Action, RuleId, Severity};

/// How long ended / killed sessions are remembered, to catch their reuse.
pub(crate) const DEFAULT_ENDED_RETENTION: Duration = Duration::from_secs(30 * 60);
/// Most sessions tracked at once; beyond it the oldest idle / ended go first.
pub(crate) const DEFAULT_MAX_SESSIONS: usize = 1_000_000;
/// The server's default transactionLifetimeLimitSeconds.
pub(crate) const DEFAULT_TRANSACTION_MAX_OPEN: Duration = Duration::from_secs(60);
/// How often the refresher looks for held sessions to refresh.
pub(crate) const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Held sessions not used by the application for longer than this are left
/// to expire (a cursor nobody reads any more is a leak, not a hold).
pub(crate) const DEFAULT_REFRESH_MAX_AGE: Duration = Duration::from_secs(60 * 60);
/// Violations kept in memory for the admin API.
pub(crate) const DEFAULT_MAX_VIOLATIONS: usize = 10_000;
/// Findings (violations grouped by bug) tracked at once; violations of newer
/// bugs are counted under one overflow finding.
pub(crate) const DEFAULT_MAX_FINDINGS: usize = 1_000;
/// The largest `max_findings` accepted.
pub(crate) const MAX_MAX_FINDINGS: usize = 100_000;
/// How often a finding's violations after its first are summarised in the
/// log (`log.finding_interval`).
pub const DEFAULT_FINDING_INTERVAL: Duration = Duration::from_secs(60);
/// The server's default logicalSessionTimeoutMinutes, used until a hello
/// reply says otherwise.
pub(crate) const DEFAULT_SERVER_SESSION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// `observe` reports; `enforce` also rejects requests that break an
/// error-severity rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Report misuse, reject only what a rule's own `action` says.
    #[default]
    Observe,
    /// Also reject requests that break an error-severity rule.
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Observe => "observe",
            Mode::Enforce => "enforce",
        }
    }
}

/// Which sessions the refresher keeps alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshPolicy {
    /// Sessions the application holds: an open transaction or cursor.
    #[default]
    Held,
    /// Every session not ended.
    All,
    /// Never refresh.
    Off,
}

/// `[sessions]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub mode: Mode,
    pub refresh: RefreshPolicy,
    /// Refresh held sessions idle longer than this. Default: half the
    /// server's session timeout.
    #[serde(with = "humantime_serde")]
    pub refresh_after: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_max_age: Duration,
    /// Overrides the server's session timeout learned from hello's
    /// `logicalSessionTimeoutMinutes`.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub ended_retention: Duration,
    pub max_sessions: usize,
    #[serde(with = "humantime_serde")]
    pub transaction_max_open: Duration,
    pub max_violations: usize,
    pub max_findings: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            mode: Mode::Observe,
            refresh: RefreshPolicy::Held,
            refresh_after: None,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            refresh_max_age: DEFAULT_REFRESH_MAX_AGE,
            session_timeout: None,
            ended_retention: DEFAULT_ENDED_RETENTION,
            max_sessions: DEFAULT_MAX_SESSIONS,
            transaction_max_open: DEFAULT_TRANSACTION_MAX_OPEN,
            max_violations: DEFAULT_MAX_VIOLATIONS,
            max_findings: DEFAULT_MAX_FINDINGS,
        }
    }
}

impl SessionConfig {
    /// Checks values; the error names the key (`sessions.<key>`) and the problem.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("sessions.refresh_interval", Some(self.refresh_interval)),
            ("sessions.refresh_max_age", Some(self.refresh_max_age)),
            ("sessions.refresh_after", self.refresh_after),
            ("sessions.session_timeout", self.session_timeout),
            ("sessions.ended_retention", Some(self.ended_retention)),
            (
                "sessions.transaction_max_open",
                Some(self.transaction_max_open),
            ),
        ];
        for (key, value) in positive {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(format!("{key}: must be greater than 0"));
            }
        }
        if self.max_sessions == 0 {
            return Err("sessions.max_sessions: must be at least 1".into());
        }
        if self.max_findings == 0 {
            return Err("sessions.max_findings: must be at least 1".into());
        }
        if self.max_findings > MAX_MAX_FINDINGS {
            return Err(format!(
                "sessions.max_findings: must be at most {MAX_MAX_FINDINGS} (each finding keeps its examples \
                 in memory)"
            ));
        }
        if let (Some(after), Some(timeout)) = (self.refresh_after, self.session_timeout) {
            if after >= timeout {
                return Err(format!(
                    "sessions.refresh_after: {} is not shorter than sessions.session_timeout ({}); sessions would \
                     expire before they are refreshed",
                    humantime::format_duration(after),
                    humantime::format_duration(timeout)
                ));
            }
        }
        Ok(())
    }
}

/// `[rules.<rule-id>]`: overrides for one rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleOverride {
    pub enabled: Option<bool>,
    pub severity: Option<Severity>,
    pub action: Option<Action>,
}

/// `[rules]` table: one `[rules.<rule-id>]` sub-table per rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct RulesConfig {
    pub rules: BTreeMap<String, RuleOverride>,
}

impl RulesConfig {
    /// Checks rule ids and values; the error names the key (`rules.<id>.<key>`).
    pub fn validate(&self) -> Result<(), String> {
        for id in self.rules.keys() {
            if id.parse::<RuleId>().is_err() {
                let known: Vec<&str> = RuleId::ALL.iter().map(|rule| rule.as_str()).collect();
                return Err(format!(
                    "rules.{id}: unknown rule; known rules: {}",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    pub fn get(&self, rule: RuleId) -> Option<&RuleOverride> {
        self.rules.get(rule.as_str())
    }
}

/// One rule's effective settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSettings {
    pub enabled: bool,
    pub severity: Severity,
    pub action: Action,
}

impl RuleSettings {
    /// One byte: bit 0 enabled, bits 1-2 severity, bit 3 action.
    fn pack(self) -> u8 {
        let severity = match self.severity {
            Severity::Info => 0,
            Severity::Warning => 1,
            Severity::Error => 2,
        };
        let action = match self.action {
            Action::Log => 0,
            Action::Reject => 1,
        };
        u8::from(self.enabled) | severity << 1 | action << 3
    }

    fn unpack(byte: u8) -> RuleSettings {
        RuleSettings {
            enabled: byte & 1 != 0,
            severity: match (byte >> 1) & 3 {
                0 => Severity::Info,
                1 => Severity::Warning,
                _ => Severity::Error,
            },
            action: if byte & 8 != 0 {
                Action::Reject
            } else {
                Action::Log
            },
        }
    }
}

/// Every rule's effective settings: defaults, then `[rules.<id>]`, then the
/// mode (`enforce` turns `reject` on for error-severity rules whose action
/// was not set explicitly). A byte per rule and `Copy`, so the engine takes
/// its own copy per request out of `LiveRules`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRules {
    mode: Mode,
    /// `RuleSettings::pack` of each rule, by `RuleId::index`.
    packed: [u8; RuleId::COUNT],
}

impl std::fmt::Debug for ResolvedRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedRules")
            .field("mode", &self.mode)
            .field(
                "rules",
                &RuleId::ALL.map(|rule| (rule.as_str(), self.get(rule))),
            )
            .finish()
    }
}

impl ResolvedRules {
    pub fn resolve(mode: Mode, rules: &RulesConfig) -> ResolvedRules {
        let packed = RuleId::ALL.map(|rule| {
            let overrides = rules.get(rule).cloned().unwrap_or_default();
            let severity = overrides.severity.unwrap_or(rule.default_severity());
            let action = overrides.action.unwrap_or(match (mode, severity) {
                (Mode::Enforce, Severity::Error) => Action::Reject,
                _ => Action::Log,
            });
            RuleSettings {
                enabled: overrides.enabled.unwrap_or(true),
                severity,
                action,
            }
            .pack()
        });
        ResolvedRules { mode, packed }
    }

    /// The mode these settings were resolved under.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn get(&self, rule: RuleId) -> RuleSettings {
        RuleSettings::unpack(self.packed[rule.index()])
    }

    pub fn enabled(&self, rule: RuleId) -> bool {
        self.packed[rule.index()] & 1 != 0
    }

    /// What differs in `new`, one `key: old -> new` per effective setting
    /// (`sessions.mode`, `rules.<id>.enabled|severity|action`), in rule
    /// order. A mode change lists the actions it turned on or off too: the
    /// operator sees what will actually be rejected.
    pub fn changes(&self, new: &ResolvedRules) -> Vec<String> {
        let mut changes = Vec::new();
        if self.mode != new.mode {
            changes.push(format!(
                "sessions.mode: {} -> {}",
                self.mode.as_str(),
                new.mode.as_str()
            ));
        }
        for rule in RuleId::ALL {
            let (old, new) = (self.get(rule), new.get(rule));
            if old.enabled != new.enabled {
                changes.push(format!(
                    "rules.{rule}.enabled: {} -> {}",
                    old.enabled, new.enabled
                ));
            }
            if old.severity != new.severity {
                changes.push(format!(
                    "rules.{rule}.severity: {} -> {}",
                    old.severity.as_str(),
                    new.severity.as_str()
                ));
            }
            if old.action != new.action {
                changes.push(format!(
                    "rules.{rule}.action: {} -> {}",
                    old.action.as_str(),
                    new.action.as_str()
                ));
            }
        }
        changes
    }
}

/// `ResolvedRules` as 64-bit words: the mode in byte 0, then one byte per rule.
const LIVE_WORDS: usize = (RuleId::COUNT + 1).div_ceil(8);

/// The rule settings in force, replaced whole by a reload.
///
/// A sequence lock over a few atomic words: a reader copies the words and
/// keeps the copy only if no store ran meanwhile (the sequence number was
/// even and unchanged), so each request is judged by one consistent set of
/// settings even while a reload swaps them. Reading writes nothing shared
/// and takes no lock (a few plain loads on x86, about as cheap as reading a
/// field; an `Arc` behind `arc-swap` measured ~20 ns per load, several
/// percent of a round trip); a reload (rare, a few stores) never waits for
/// requests.
pub(crate) struct LiveRules {
    /// Even: stable. Odd: a store is in progress.
    seq: AtomicU64,
    words: [AtomicU64; LIVE_WORDS],
    /// Serialises stores (readers never take it).
    writer: Mutex<()>,
}

impl LiveRules {
    pub(crate) fn new(rules: ResolvedRules) -> LiveRules {
        let words = LiveRules::to_words(&rules);
        LiveRules {
            seq: AtomicU64::new(0),
            words: std::array::from_fn(|i| AtomicU64::new(words[i])),
            writer: Mutex::new(()),
        }
    }

    /// A consistent copy, for the duration of one request (or reply, close,
    /// sweep).
    pub(crate) fn load(&self) -> ResolvedRules {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let words: [u64; LIVE_WORDS] =
                    std::array::from_fn(|i| self.words[i].load(Ordering::Relaxed));
                // Orders the word loads before the re-check: a word written
                // by a store that began after `before` makes the check fail.
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return LiveRules::from_words(words);
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Puts `rules` in force for every later `load`.
    pub(crate) fn store(&self, rules: ResolvedRules) {
        let _writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let words = LiveRules::to_words(&rules);
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Relaxed);
        // Readers that see any word below also see the odd number.
        fence(Ordering::Release);
        for (atomic, word) in self.words.iter().zip(words) {
            atomic.store(word, Ordering::Relaxed);
        }
        self.seq.store(seq + 2, Ordering::Release);
    }

    /// One rule's settings, for code that reads a single one.
    pub(crate) fn get(&self, rule: RuleId) -> RuleSettings {
        self.load().get(rule)
    }

    /// Whether `rule` is enabled, for code that reads a single setting.
    pub(crate) fn enabled(&self, rule: RuleId) -> bool {
        self.load().enabled(rule)
    }

    fn to_words(rules: &ResolvedRules) -> [u64; LIVE_WORDS] {
        let mut bytes = [0_u8; LIVE_WORDS * 8];
        bytes[0] = match rules.mode {
            Mode::Observe => 0,
            Mode::Enforce => 1,
        };
        bytes[1..=RuleId::COUNT].copy_from_slice(&rules.packed);
        std::array::from_fn(|i| {
            u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        })
    }

    fn from_words(words: [u64; LIVE_WORDS]) -> ResolvedRules {
        let mut bytes = [0_u8; LIVE_WORDS * 8];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        ResolvedRules {
            mode: if bytes[0] == 1 {
                Mode::Enforce
            } else {
                Mode::Observe
            },
            packed: bytes[1..=RuleId::COUNT]
                .try_into()
                .expect("one byte per rule"),
        }
    }
}

impl std::fmt::Debug for LiveRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.load().fmt(f)
    }
}

impl Default for ResolvedRules {
    fn default() -> Self {
        ResolvedRules::resolve(Mode::Observe, &RulesConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        #[serde(default)]
        sessions: SessionConfig,
        #[serde(default)]
        rules: RulesConfig,
    }

    fn parse(text: &str) -> Result<File, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_documented_values() {
        let file = parse("").unwrap();
        assert_eq!(file.sessions, SessionConfig::default());
        assert_eq!(file.sessions.ended_retention, Duration::from_secs(1800));
        assert_eq!(file.sessions.max_sessions, 1_000_000);
        assert_eq!(file.sessions.max_findings, 1_000);
        assert_eq!(file.sessions.transaction_max_open, Duration::from_secs(60));
        assert_eq!(file.sessions.mode, Mode::Observe);
        assert_eq!(file.sessions.refresh, RefreshPolicy::Held);
        assert!(file.sessions.validate().is_ok());
        assert!(file.rules.validate().is_ok());
    }

    #[test]
    fn parses_every_key() {
        let file = parse(
            r#"
            [sessions]
            mode = "enforce"
            refresh = "all"
            refresh_after = "10m"
            refresh_interval = "30s"
            refresh_max_age = "2h"
            session_timeout = "20m"
            ended_retention = "1h"
            max_sessions = 5000
            transaction_max_open = "2m"
            max_violations = 50
            max_findings = 20

            [rules.txn-left-open]
            enabled = false

            [rules.concurrent-use]
            severity = "warning"
            action = "reject"
            "#,
        )
        .unwrap();
        let s = &file.sessions;
        assert_eq!(s.mode, Mode::Enforce);
        assert_eq!(s.refresh, RefreshPolicy::All);
        assert_eq!(s.refresh_after, Some(Duration::from_secs(600)));
        assert_eq!(s.refresh_interval, Duration::from_secs(30));
        assert_eq!(s.refresh_max_age, Duration::from_secs(7200));
        assert_eq!(s.session_timeout, Some(Duration::from_secs(1200)));
        assert_eq!(s.ended_retention, Duration::from_secs(3600));
        assert_eq!(s.max_sessions, 5000);
        assert_eq!(s.transaction_max_open, Duration::from_secs(120));
        assert_eq!(s.max_violations, 50);
        assert_eq!(s.max_findings, 20);
        assert!(s.validate().is_ok());
        assert!(file.rules.validate().is_ok());
        let resolved = ResolvedRules::resolve(s.mode, &file.rules);
        assert!(!resolved.enabled(RuleId::TxnLeftOpen));
        assert_eq!(
            resolved.get(RuleId::ConcurrentUse),
            RuleSettings {
                enabled: true,
                severity: Severity::Warning,
                action: Action::Reject
            }
        );
        // Enforce: error rules reject, warnings log.
        assert_eq!(resolved.get(RuleId::UseAfterEnd).action, Action::Reject);
        assert_eq!(resolved.get(RuleId::IdleExpiredReuse).action, Action::Log);
    }

    #[test]
    fn observe_logs_everything_unless_a_rule_says_reject() {
        let rules = parse("[rules.use-after-end]\naction = \"reject\"\n[rules.txn-regression]\nseverity = \"info\"\n")
            .unwrap()
            .rules;
        let resolved = ResolvedRules::resolve(Mode::Observe, &rules);
        assert_eq!(resolved.get(RuleId::UseAfterEnd).action, Action::Reject);
        assert_eq!(resolved.get(RuleId::ConcurrentUse).action, Action::Log);
        assert_eq!(resolved.get(RuleId::TxnRegression).severity, Severity::Info);
        let enforce = ResolvedRules::resolve(Mode::Enforce, &rules);
        // Demoted below error: enforce does not turn reject on for it.
        assert_eq!(enforce.get(RuleId::TxnRegression).action, Action::Log);
        let explicit_log = parse("[rules.concurrent-use]\naction = \"log\"\n")
            .unwrap()
            .rules;
        assert_eq!(
            ResolvedRules::resolve(Mode::Enforce, &explicit_log)
                .get(RuleId::ConcurrentUse)
                .action,
            Action::Log
        );
    }

    #[test]
    fn settings_pack_into_a_byte_and_back() {
        for enabled in [false, true] {
            for severity in [Severity::Info, Severity::Warning, Severity::Error] {
                for action in [Action::Log, Action::Reject] {
                    let settings = RuleSettings {
                        enabled,
                        severity,
                        action,
                    };
                    assert_eq!(RuleSettings::unpack(settings.pack()), settings);
                }
            }
        }
    }

    #[test]
    fn live_rules_hand_out_what_was_stored_last() {
        let observe = ResolvedRules::default();
        let rules = parse(
            "[rules.txn-left-open]\nenabled = false\n[rules.concurrent-use]\nseverity = \"info\"\n",
        )
        .unwrap()
        .rules;
        let enforce = ResolvedRules::resolve(Mode::Enforce, &rules);
        let live = LiveRules::new(observe);
        assert_eq!(live.load(), observe);
        live.store(enforce);
        assert_eq!(live.load(), enforce);
        assert_eq!(live.load().mode(), Mode::Enforce);
        assert!(!live.enabled(RuleId::TxnLeftOpen));
        assert_eq!(live.get(RuleId::UseAfterEnd).action, Action::Reject);
        assert_eq!(live.get(RuleId::ConcurrentUse).severity, Severity::Info);
        assert_eq!(
            observe.changes(&enforce)[..2],
            [
                "sessions.mode: observe -> enforce",
                "rules.concurrent-use.severity: error -> info"
            ]
        );
    }

    #[test]
    fn a_reader_never_sees_half_of_a_store() {
        // Two settings that differ in every rule and the mode; a torn read
        // would mix them.
        let every_rule = |enabled, severity, action| RulesConfig {
            rules: RuleId::ALL
                .iter()
                .map(|rule| {
                    let set = RuleOverride {
                        enabled: Some(enabled),
                        severity: Some(severity),
                        action: Some(action),
                    };
                    (rule.as_str().to_string(), set)
                })
                .collect(),
        };
        let a = ResolvedRules::resolve(
            Mode::Observe,
            &every_rule(false, Severity::Info, Action::Log),
        );
        let b = ResolvedRules::resolve(
            Mode::Enforce,
            &every_rule(true, Severity::Error, Action::Reject),
        );
        let live = LiveRules::new(a);
        let stores = 20_000;
        std::thread::scope(|scope| {
            let live = &live;
            let reader = scope.spawn(move || {
                for _ in 0..200_000 {
                    let got = live.load();
                    assert!(got == a || got == b, "a torn read: {got:?}");
                }
            });
            for i in 0..stores {
                live.store(if i % 2 == 0 { b } else { a });
            }
            reader.join().unwrap();
        });
        assert_eq!(live.load(), a, "the last store wins");
    }

    #[test]
    fn unknown_rule_ids_and_keys_are_errors_naming_the_key() {
        let rules = parse("[rules.concurent-use]\nenabled = false\n")
            .unwrap()
            .rules;
        let err = rules.validate().unwrap_err();
        assert!(
            err.starts_with("rules.concurent-use: unknown rule"),
            "{err}"
        );
        assert!(err.contains("concurrent-use"));
        let err = parse("[rules.concurrent-use]\nenable = false\n").unwrap_err();
        assert!(err.contains("enable"), "{err}");
        let err = parse("[rules.concurrent-use]\naction = \"block\"\n").unwrap_err();
        assert!(err.contains("block"), "{err}");
        let err = parse("[sessions]\nrefresh_evry = \"1s\"\n").unwrap_err();
        assert!(err.contains("refresh_evry"), "{err}");
        let err = parse("[sessions]\nmode = \"strict\"\n").unwrap_err();
        assert!(err.contains("strict"), "{err}");
        let err = parse("[sessions]\nended_retention = \"soon\"\n").unwrap_err();
        assert!(
            err.contains("ended_retention") || err.contains("soon"),
            "{err}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let zero = |f: fn(&mut SessionConfig)| {
            let mut config = SessionConfig::default();
            f(&mut config);
            config.validate().unwrap_err()
        };
        assert_eq!(
            zero(|c| c.max_sessions = 0),
            "sessions.max_sessions: must be at least 1"
        );
        assert_eq!(
            zero(|c| c.max_findings = 0),
            "sessions.max_findings: must be at least 1"
        );
        assert!(zero(|c| c.max_findings = 100_001)
            .starts_with("sessions.max_findings: must be at most"));
        assert!(
            zero(|c| c.refresh_interval = Duration::ZERO).starts_with("sessions.refresh_interval:")
        );
        assert!(
            zero(|c| c.ended_retention = Duration::ZERO).starts_with("sessions.ended_retention:")
        );
        assert!(zero(|c| c.transaction_max_open = Duration::ZERO)
            .starts_with("sessions.transaction_max_open:"));
        assert!(
            zero(|c| c.refresh_after = Some(Duration::ZERO)).starts_with("sessions.refresh_after:")
        );
        assert!(zero(|c| {
            c.refresh_after = Some(Duration::from_secs(60));
            c.session_timeout = Some(Duration::from_secs(30));
        })
        .starts_with("sessions.refresh_after:"));
    }
}
