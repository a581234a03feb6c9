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

/// The tracing target of the stage trace (issue 28): one TRACE event per step of a
/// change's way from the inotify event to the peer's rename and ack, each with
/// `stage` and `t_us` ([`mono_us`]). Off unless `RUST_LOG` names this target
/// (`RUST_LOG=warn,certmesh::stage=trace`); then `compare -- --only stages` reads them.
/// When off, an event costs one cached interest check: its fields are not evaluated.
pub const STAGE: &str = "certmesh::stage";

/// Microseconds on `CLOCK_MONOTONIC`: one clock for every process of the host, so the
/// stage trace of a sender and of its peers (and the benchmark's own reading) line up.
pub fn mono_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0) / 1_000
}
