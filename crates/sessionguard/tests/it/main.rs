//! The integration tests of the shipped binary and its library, built as
//! one test binary (one link instead of one per suite): each former
//! `tests/<suite>.rs` is a module, so a test's name keeps its suite
//! (`proxy_raw::...`). Their shared scaffolding is the
//! `sessionguard-test-support` crate. `rules_logging` stays a binary of its
//! own: it installs a process-wide TRACE subscriber (see its module doc).

mod admin_security;
mod auth;
mod bounded_memory;
mod compression;
mod dashboard;
mod dockerfile;
mod driver_through_proxy;
mod emulator_direct;
mod emulator_fidelity;
mod enforce;
mod findings;
mod good_patterns;
mod hostile_clients;
mod io_driver;
mod metrics_admin;
mod proxy_raw;
mod refresher;
mod reload_mode;
mod replica_set;
mod rules_cursors;
mod rules_sessions;
mod rules_transactions;
mod store_sessions;
mod tls;
mod upstream_faults;
