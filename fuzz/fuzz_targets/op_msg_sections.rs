//! cargo-fuzz target: see `sessionguard_fuzz::op_msg_sections` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sessionguard_fuzz::op_msg_sections(data));
