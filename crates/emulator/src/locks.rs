//! The one way the emulator takes its std mutexes: recovering the data if
//! a panicking thread poisoned the lock. Locks are held only for
//! synchronous work, never across `.await`; nothing else lives here, so
//! every module can use it without depending on another.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (the emulator never panics while holding one, but must not cascade).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
