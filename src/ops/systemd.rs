//! The service manager's side of the daemon (`sd_notify(3)` through the `sd-notify`
//! crate): `READY=1` once the QUIC endpoint, the index and the control socket are up,
//! a one-line `STATUS=` whenever it changes, `RELOADING=1` … `READY=1` around a
//! SIGHUP re-read, `STOPPING=1` on shutdown, and `WATCHDOG=1` from a task on the
//! daemon's runtime at half of `WATCHDOG_USEC`.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every function
//! here is a no-op and no task is spawned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::handles::Observer;
use crate::ops::observe::StatusSource;
use crate::ops::status::Status;

/// How long the status line waits after a change before it is recomputed, so a burst
/// of acks (a bulk sync) costs one `status` computation, not thousands.
const STATUS_SETTLE: Duration = Duration::from_secs(1);

/// The status line is recomputed at least this often even when no peer or index
/// change woke it (the next renewal moves with the ACME driver's own plans).
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// Whether a service manager listens (`NOTIFY_SOCKET` set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Sends `states`; a failure is a warning the first time only (the watchdog would
/// repeat it every few seconds once the manager is gone).
fn send(states: &[NotifyState]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = sd_notify::notify(states) {
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(error = %e, "sd_notify to $NOTIFY_SOCKET failed");
        } else {
            tracing::warn!(error = %e, "sd_notify to $NOTIFY_SOCKET failed (further failures are logged at debug level)");
        }
    }
}

/// The daemon is up (endpoint bound, index loaded, control socket listening): tells
/// systemd, then keeps the status line and the watchdog going.
pub fn ready(source: &StatusSource) -> Vec<tokio::task::JoinHandle<()>> {
    if !enabled() {
        return Vec::new();
    }
    let line = summary(&source.status());
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    let mut tasks = vec![tokio::spawn(status_updates(source.clone(), line))];
    if let Some(timeout) = sd_notify::watchdog_enabled() {
        tasks.push(tokio::spawn(watchdog(
            source.observer().clone(),
            timeout / 2,
        )));
    }
    tasks
}

/// A SIGHUP re-read starts (`Type=notify-reload` wants `MONOTONIC_USEC` with it).
pub fn reloading() {
    if !enabled() {
        return;
    }
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The SIGHUP re-read is done (applied or refused: either way the daemon runs on).
pub fn reloaded(source: &StatusSource) {
    if !enabled() {
        return;
    }
    let line = summary(&source.status());
    send(&[NotifyState::Ready, NotifyState::Status(&line)]);
}

/// Shutdown has begun.
pub fn stopping() {
    if enabled() {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// `STATUS=` whenever the summary changes: woken by index changes and acks (peers
/// connecting and syncing), at most once per `STATUS_SETTLE`.
async fn status_updates(source: StatusSource, mut last: String) {
    let (mut changed, mut progress) = source.observer().subscribe();
    loop {
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            r = progress.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(STATUS_REFRESH) => {}
        }
        tokio::time::sleep(STATUS_SETTLE).await;
        changed.borrow_and_update();
        progress.borrow_and_update();
        let line = summary(&source.status());
        if line != last {
            send(&[NotifyState::Status(&line)]);
            last = line;
        }
    }
}

/// `WATCHDOG=1` every `every` from a task on the daemon's runtime, after taking the
/// state lock: a hung runtime or a deadlocked state stops the pings, and systemd
/// restarts the service after `WatchdogSec=`.
async fn watchdog(observer: Observer, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        observer.probe();
        send(&[NotifyState::Watchdog]);
    }
}

/// The one-line summary: `peers 2/3 connected, 2 in sync; 0 items out of sync; next
/// renewal www at 2027-01-01T00:00:00Z`.
pub fn summary(s: &Status) -> String {
    let connected = s.peers.iter().filter(|p| p.connected).count();
    let in_sync = s.peers.iter().filter(|p| p.in_sync).count();
    let next = s
        .certificates
        .iter()
        .filter_map(|c| c.next_renewal.as_ref().map(|at| (at, &c.name)))
        .min();
    let renewal = match next {
        Some((at, name)) => format!("next renewal {name} at {at}"),
        None if s.certificates.is_empty() => "no certificates".to_string(),
        None => "no renewal scheduled here".to_string(),
    };
    format!(
        "peers {connected}/{} connected, {in_sync} in sync; {} items out of sync; {renewal}",
        s.peers.len(),
        s.tree.out_of_sync
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(json: serde_json::Value) -> Status {
        serde_json::from_value(json).expect("a valid status")
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "node": {"name": "lb0", "id": "X", "listen": "127.0.0.1:1", "uptime_s": 1},
            "tree": {"path": "/t", "files": 3, "out_of_sync": 2, "sequence": 9},
            "peers": [], "certificates": [], "errors": []
        })
    }

    fn peer(connected: bool, in_sync: bool) -> serde_json::Value {
        serde_json::json!({"name": "p", "id": "Y", "address": "127.0.0.1:2",
            "connected": connected, "in_sync": in_sync, "rtt_ms": null, "acked": 0,
            "pending_from": 0, "last_error": null})
    }

    fn cert(name: &str, next: Option<&str>) -> serde_json::Value {
        serde_json::json!({"name": name, "domains": [], "not_after": null,
            "not_after_unix": null, "days_left": null, "version": null, "serial": null,
            "renewer": null, "lease": null, "next_renewal": next, "state": "idle",
            "last_attempt": null, "last_error": null, "failures": 0,
            "waiting_for": null, "last_took_ms": null})
    }

    #[test]
    fn summary_counts_peers_and_out_of_sync_items() {
        let mut s = base();
        s["peers"] = serde_json::json!([peer(true, true), peer(true, false), peer(false, false)]);
        assert_eq!(
            summary(&status(s)),
            "peers 2/3 connected, 1 in sync; 2 items out of sync; no certificates"
        );
    }

    #[test]
    fn summary_names_the_earliest_renewal() {
        let mut s = base();
        s["certificates"] = serde_json::json!([
            cert("b", Some("2027-02-01T00:00:00Z")),
            cert("a", None),
            cert("c", Some("2027-01-01T00:00:00Z")),
        ]);
        assert!(summary(&status(s)).ends_with("next renewal c at 2027-01-01T00:00:00Z"));
        let mut s = base();
        s["certificates"] = serde_json::json!([cert("a", None)]);
        assert!(summary(&status(s)).ends_with("no renewal scheduled here"));
    }
}
