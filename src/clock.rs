//! Wall-clock readings, in the units the index and the tree use. Kept apart so the
//! pure and the disk layers can read the time without importing the daemon.

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the epoch (0 if the clock is before it).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    now_ns() / 1_000_000_000
}

/// The clock as version counters use it: µs since the epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
