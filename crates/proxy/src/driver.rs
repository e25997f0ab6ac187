//! The data path's I/O driver, chosen ONCE at start for every data thread
//! and logged with the reason: io_uring (monoio's `IoUringDriver`, ring
//! built with `IORING_SETUP_COOP_TASKRUN`) where the kernel and the sandbox
//! allow it, else epoll (monoio's legacy driver). `proxy.io` (or the
//! `SESSIONGUARD_IO` environment variable, which wins) asks for `auto`,
//! `io_uring` (start fails with the reason when it is unavailable, rather
//! than silently degrading) or `epoll`. It owns the probe and the runtime
//! builder; it knows nothing about connections.
//!
//! The probe is a real `io_uring_setup(2)` through the `io-uring` crate's
//! safe builder, so its error carries the errno a seccomp profile (Docker's
//! default), `kernel.io_uring_disabled` or a sandbox (gVisor) gives, then
//! monoio's opcode probe for kernels that lack an operation it needs.

use std::fmt;
use std::io;
use std::str::FromStr;

use monoio::time::TimeDriver;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use serde::{Deserialize, Serialize};

/// Environment override of `proxy.io` (tests, containers).
pub const IO_ENV: &str = "SESSIONGUARD_IO";

/// What the configuration asks for (`proxy.io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// io_uring when available, else epoll.
    #[default]
    Auto,
    /// io_uring or refuse to start.
    #[serde(rename = "io_uring")]
    IoUring,
    /// epoll, even where io_uring works.
    Epoll,
}

impl FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<IoMode, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "io_uring" => Ok(IoMode::IoUring),
            "epoll" => Ok(IoMode::Epoll),
            other => Err(format!(
                "`{other}` is not an I/O driver: use auto, io_uring or epoll"
            )),
        }
    }
}

/// The driver the data threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn as_str(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision and why, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverChoice {
    pub driver: Driver,
    /// e.g. "auto: io_uring available" or "auto: io_uring_setup failed: ...".
    pub reason: String,
}

/// Why io_uring cannot be used here, or `None` when it can.
pub fn io_uring_unavailable() -> Option<String> {
    if let Err(e) = io_uring::IoUring::new(2) {
        let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| format!(", kernel.io_uring_disabled={}", s.trim()))
            .unwrap_or_default();
        return Some(format!(
            "io_uring_setup failed: {e}{sysctl} (seccomp profile, sysctl or sandbox)"
        ));
    }
    if !monoio::utils::detect_uring() {
        return Some("the kernel's io_uring lacks an operation the runtime needs".into());
    }
    None
}

/// Decides the driver once for the process: `SESSIONGUARD_IO` overrides
/// `configured`. `io_uring` asked for and unavailable is an error. Public
/// with `build_runtime` for the benchmark's reference relay
/// (`sessionguard-dev bench-relay`), which must run on what the data
/// threads run on.
pub fn choose_driver(configured: IoMode) -> io::Result<DriverChoice> {
    let env = std::env::var(IO_ENV).ok();
    let (mode, source) = match env.as_deref().map(IoMode::from_str) {
        Some(Ok(mode)) => (mode, IO_ENV),
        Some(Err(e)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{IO_ENV}: {e}"),
            ))
        }
        None => (configured, "proxy.io"),
    };
    choose_for(mode, source, io_uring_unavailable)
}

fn choose_for(
    mode: IoMode,
    source: &str,
    unavailable: impl FnOnce() -> Option<String>,
) -> io::Result<DriverChoice> {
    let choice = |driver, reason: String| Ok(DriverChoice { driver, reason });
    match mode {
        IoMode::Epoll => choice(Driver::Epoll, format!("{source} = epoll")),
        IoMode::IoUring => match unavailable() {
            None => choice(Driver::IoUring, format!("{source} = io_uring")),
            Some(why) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{source} = io_uring, but {why}"),
            )),
        },
        IoMode::Auto => match unavailable() {
            None => choice(
                Driver::IoUring,
                format!("{source} = auto: io_uring available"),
            ),
            Some(why) => choice(Driver::Epoll, format!("{source} = auto: {why}")),
        },
    }
}

/// One data thread's runtime: whichever driver was chosen, one type.
pub type Runtime = monoio::FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// Submission queue size: completions are reaped every loop turn, so this
/// bounds a turn's batch, not the number of connections.
const RING_ENTRIES: u32 = 1024;

/// Builds a data thread's runtime for `driver`.
///
/// COOP_TASKRUN: completions run when the thread next enters the kernel
/// instead of interrupting it; without it the relay cost 1.4-1.65x
/// HAProxy's CPU per operation (the interrupting task_work contended with
/// the loopback softirq for the socket lock). Kernels before 5.19 refuse
/// the flag, not io_uring: retried without it.
pub fn build_runtime(driver: Driver) -> io::Result<Runtime> {
    Ok(match driver {
        Driver::IoUring => {
            let mut flags = io_uring::IoUring::builder();
            flags.setup_coop_taskrun();
            match RuntimeBuilder::<IoUringDriver>::new()
                .uring_builder(flags)
                .with_entries(RING_ENTRIES)
                .enable_timer()
                .build()
            {
                Ok(rt) => rt.into(),
                Err(_) => RuntimeBuilder::<IoUringDriver>::new()
                    .with_entries(RING_ENTRIES)
                    .enable_timer()
                    .build()?
                    .into(),
            }
        }
        Driver::Epoll => RuntimeBuilder::<LegacyDriver>::new()
            .with_entries(RING_ENTRIES)
            .enable_timer()
            .build()?
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_names_are_refused_with_the_choices() {
        assert_eq!("auto".parse(), Ok(IoMode::Auto));
        assert_eq!("io_uring".parse(), Ok(IoMode::IoUring));
        assert_eq!("epoll".parse(), Ok(IoMode::Epoll));
        let err = "uring".parse::<IoMode>().unwrap_err();
        assert!(err.contains("auto, io_uring or epoll"), "{err}");
    }

    #[test]
    fn auto_falls_back_to_epoll_with_the_reason_and_forced_io_uring_fails() {
        let blocked = || Some("io_uring_setup failed: Operation not permitted".to_string());
        let auto = choose_for(IoMode::Auto, "proxy.io", blocked).unwrap();
        assert_eq!(auto.driver, Driver::Epoll);
        assert!(auto.reason.contains("Operation not permitted"), "{auto:?}");
        let forced = choose_for(IoMode::IoUring, "proxy.io", blocked).unwrap_err();
        assert!(forced.to_string().contains("Operation not permitted"));
        let epoll = choose_for(IoMode::Epoll, "SESSIONGUARD_IO", || unreachable!()).unwrap();
        assert_eq!(epoll.driver, Driver::Epoll);
        assert_eq!(epoll.reason, "SESSIONGUARD_IO = epoll");
    }

    /// This machine (and CI's) runs a kernel with io_uring: `auto` must
    /// pick it, and both drivers must build a runtime that runs a task.
    #[test]
    fn auto_picks_io_uring_here_and_both_drivers_run() {
        assert_eq!(io_uring_unavailable(), None);
        let auto = choose_for(IoMode::Auto, "proxy.io", io_uring_unavailable).unwrap();
        assert_eq!(auto.driver, Driver::IoUring);
        assert_eq!(auto.reason, "proxy.io = auto: io_uring available");
        for driver in [Driver::IoUring, Driver::Epoll] {
            let mut rt = build_runtime(driver).unwrap();
            assert_eq!(rt.block_on(async { 1 + 1 }), 2);
        }
    }
}
