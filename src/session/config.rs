//! Configuration of the session engine: `[sessions]` and `[rules.<id>]`.
//! (Stub: the session engine fills this in; `config.rs` embeds these types.)

use serde::Deserialize;

/// `[sessions]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {}

impl SessionConfig {
    /// Checks values; the error names the key (`sessions.<key>`) and the problem.
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// `[rules]` table: one `[rules.<rule-id>]` sub-table per rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {}

impl RulesConfig {
    /// Checks rule ids and values; the error names the key (`rules.<id>.<key>`).
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}
