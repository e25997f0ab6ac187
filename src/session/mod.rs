//! Session hygiene: the ledger of every logical session, the rules, the
//! violations they raise and the refresher. (Filled in by the session engine.)

pub mod config;
