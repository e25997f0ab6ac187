//! `sessionguard demo`: the emulator, the proxy in front of it, and a short
//! scripted workload run by the official Rust driver through the proxy.
//! (Stub: filled in once the proxy and the emulator exist.)

/// Runs the demo to completion.
pub async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("demo not implemented yet".into())
}
