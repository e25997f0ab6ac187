//! The integration tests of the dev tools (the demo, `bench-load`,
//! `bench-relay`, `exec` with `demo-app` as its child), built as one test
//! binary: each former `tests/<suite>.rs` is a module. Their shared scaffolding is the
//! `sessionguard-test-support` crate.

mod bench_load;
mod demo;
mod exec_cli;
mod relay;
