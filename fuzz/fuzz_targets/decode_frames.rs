//! cargo-fuzz target: see `sessionguard_fuzz::decode_frames` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sessionguard_fuzz::decode_frames(data));
