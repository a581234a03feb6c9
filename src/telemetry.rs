//! What the daemon reports about itself, typed: recent errors (`status` ERRORS, and
//! `--json` `errors[].at_unix` / `errors[].message`, a bounded ring) and the repair
//! queue with its recent results, the process-wide event counters behind `/metrics`,
//! and the serving probes' shared side ([`Probes`]). It imports nothing but `core`, so
//! every layer can record into it and `ops` reads it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::core::paths::RelPath;

/// How many recent errors are kept (and shown by `status --json`).
pub const RECENT_ERRORS: usize = 20;

/// One error the daemon reported, with when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    /// When it happened (Unix seconds).
    pub at_unix: i64,
    /// What happened, one message as logged.
    pub message: String,
    /// A condition that still holds when `status` answered (a peer not connected,
    /// a certificate failing, a damaged bundle), rather than a past event.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ongoing: bool,
}

/// The last [`RECENT_ERRORS`] errors, oldest first.
#[derive(Debug, Clone, Default)]
pub struct RecentErrors(VecDeque<RecentError>);

impl RecentErrors {
    /// Records `message` as happened at `at_unix`, dropping the oldest when full.
    pub fn push(&mut self, at_unix: i64, message: String) {
        if self.0.len() == RECENT_ERRORS {
            self.0.pop_front();
        }
        self.0.push_back(RecentError {
            at_unix,
            message,
            ongoing: false,
        });
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &RecentError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_paths_queue_only_the_repaired_certificates_they_touch() {
        let r = Repairs::default();
        let paths: Vec<crate::core::paths::RelPath> = [
            "live/www/cert.pem",
            "archive/www/3/cert.pem",
            "archive/api/1/privkey.pem",
            "live/other/cert.pem",
            "certs/www.pem",
            "live",
        ]
        .iter()
        .map(|p| crate::core::paths::RelPath::parse(p).unwrap())
        .collect();
        let asked = std::cell::RefCell::new(Vec::new());
        r.touched(
            |n| {
                asked.borrow_mut().push(n.to_string());
                n != "other"
            },
            &paths,
        );
        let pending: Vec<String> = r.lock_pending().iter().cloned().collect();
        assert_eq!(pending, ["api", "www"]);
        assert_eq!(
            asked.into_inner(),
            ["api", "other", "www"],
            "one look per name"
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_in_order() {
        let mut r = RecentErrors::default();
        for i in 0..(RECENT_ERRORS as i64 + 5) {
            r.push(i, format!("e{i}"));
        }
        assert_eq!(r.len(), RECENT_ERRORS);
        let first = r.iter().next().unwrap();
        assert_eq!((first.at_unix, first.message.as_str()), (5, "e5"));
        let json = serde_json::to_string(first).unwrap();
        assert_eq!(json, r#"{"at_unix":5,"message":"e5"}"#);
    }
}

/// Repairs shown in `status`.
const RECENT_REPAIRS: usize = 20;

/// One repair, as `status` shows it (stable JSON keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairStatus {
    pub certificate: String,
    /// RFC 3339.
    pub at: String,
    pub at_unix: i64,
    /// The node whose change broke the certificate (peer name, or short ID).
    pub caused_by: String,
    /// The `archive/<name>/<n>` version put back.
    pub from_version: u32,
    /// What was wrong.
    pub reason: String,
}

/// The repair queue and its recent results (a handle in `Shared`).
#[derive(Default)]
pub struct Repairs {
    pub(crate) wake: Notify,
    pending: Mutex<BTreeSet<String>>,
    recent: Mutex<VecDeque<RepairStatus>>,
}

impl Repairs {
    /// The puller applied these paths from peers: queue the certificates they touch
    /// that `repaired` names. Costs O(paths), plus one `repaired` call per name a
    /// path touches: no list of every certificate per applied batch (issue 29).
    pub fn touched<'a>(
        &self,
        repaired: impl Fn(&str) -> bool,
        paths: impl IntoIterator<Item = &'a RelPath>,
    ) {
        let mut names = BTreeSet::new();
        for p in paths {
            let mut parts = p.as_str().splitn(3, '/');
            if let (Some("live" | "archive"), Some(n)) = (parts.next(), parts.next()) {
                names.insert(n);
            }
        }
        let hit: BTreeSet<String> = names
            .into_iter()
            .filter(|n| repaired(n))
            .map(str::to_string)
            .collect();
        if !hit.is_empty() {
            self.lock_pending().extend(hit);
            self.wake.notify_one();
        }
    }

    /// Recent repairs, oldest first.
    pub fn recent(&self) -> Vec<RepairStatus> {
        self.recent
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn lock_pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, r: RepairStatus) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_REPAIRS {
            recent.pop_front();
        }
        recent.push_back(r);
    }
}

// ---------------------------------------------------------------------------------------
// Event counters (`/metrics`): recorded by the features, read by the metrics endpoint.

/// What the event counters count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// An ACME order finished (issued or failed); label `cert`.
    Order,
    /// An ACME order failed; label `cert`.
    OrderFailure,
    /// A peer's change written to the tree.
    Applied,
    /// A peer's change that could not be written (I/O error, refused).
    ApplyFailure,
    /// A local version lost a conflict and was kept under `.certmesh/conflicts/`.
    Conflict,
    /// UDP bytes of ended sessions; label `peer`.
    BytesReceived,
    BytesSent,
    /// A hook ran (succeeded or failed); label `hook`.
    HookRun,
}

/// Event counters since start, by event and label value (`""`: no label).
#[derive(Debug, Clone, Default)]
pub struct Events(BTreeMap<(Event, String), u64>);

impl Events {
    pub fn get(&self, e: Event, label: &str) -> u64 {
        self.0.get(&(e, label.to_string())).copied().unwrap_or(0)
    }

    pub fn add(&mut self, e: Event, label: &str, n: u64) {
        let v = self.0.entry((e, label.to_string())).or_default();
        *v = v.saturating_add(n);
    }

    /// Label values and counts of `e`, sorted.
    pub fn of(&self, e: Event) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .iter()
            .filter(move |((k, _), _)| *k == e)
            .map(|((_, l), v)| (l.as_str(), *v))
    }
}

/// Process-wide, as the `process_*` metrics are: one daemon per process. Lock rule:
/// held only to add or copy, never across I/O; taken after the state lock when both
/// are held.
static EVENTS: Mutex<Events> = Mutex::new(Events(BTreeMap::new()));

fn bump(e: Event, label: &str, n: u64) {
    EVENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .add(e, label, n);
}

/// A copy of the event counters.
pub fn events() -> Events {
    EVENTS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// An ACME order for `cert` finished, issued (`ok`) or failed.
pub fn order_finished(cert: &str, ok: bool) {
    bump(Event::Order, cert, 1);
    if !ok {
        bump(Event::OrderFailure, cert, 1);
    }
}

/// A hook (its label: the command's path or the HAProxy socket) ran, succeeded or not
/// (failures are `certmesh_hook_failures_total`).
pub fn hook_ran(hook: &str) {
    bump(Event::HookRun, hook, 1);
}

/// A batch of peers' changes was applied with these outcomes (deferred ones are
/// retried later and counted then).
pub fn applied(ok: usize, failed: usize) {
    bump(Event::Applied, "", ok as u64);
    bump(Event::ApplyFailure, "", failed as u64);
}

/// `n` conflicts' local losers were kept under `.certmesh/conflicts/`.
pub fn conflict_kept(n: usize) {
    bump(Event::Conflict, "", n as u64);
}

/// Sessions with `peer` ended having moved these UDP bytes.
pub fn sessions_ended(peer: &str, received: u64, sent: u64) {
    bump(Event::BytesReceived, peer, received);
    bump(Event::BytesSent, peer, sent);
}

/// A registered session with `peer` ended or was replaced: its traffic moves from
/// the live figures to the totals. Called with the state lock held.
pub fn session_ended(peer: &str, conn: &quinn::Connection) {
    let stats = conn.stats();
    crate::telemetry::sessions_ended(peer, stats.udp_rx.bytes, stats.udp_tx.bytes);
}

// ---------------------------------------------------------------------------------------
// The serving probes' shared side: hook runs in, hook re-runs out, failure counters.

/// A hook run the hook runner reports for the certificates it concerned.
#[derive(Debug, Clone)]
pub struct HookRan {
    pub certs: Vec<String>,
    /// Every matching hook exited 0.
    pub ok: bool,
    /// The failing hooks' output (empty when `ok`).
    pub output: String,
    /// It was a re-run this module asked for.
    pub rerun: bool,
}

/// What the serving probes (`crate::probe`) share with the hook runner, `status` and
/// `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    pub(crate) hook_runs: Mutex<Vec<HookRan>>,
    pub(crate) wake: Notify,
    pub(crate) reruns: Mutex<BTreeSet<String>>,
    pub(crate) rerun_wake: Notify,
    /// Failed handshakes per frontend, since start.
    pub(crate) failures: Mutex<BTreeMap<String, u64>>,
    /// Last hook output per certificate (what a repair shows when it gives up).
    pub(crate) hook_output: Mutex<HashMap<String, String>>,
    /// Rollout times: each certificate's last, and the histogram.
    pub(crate) times: Mutex<crate::core::rollout_time::RolloutTimes>,
}

/// The probes' shared side (a cheap clone).
#[derive(Debug, Clone, Default)]
pub struct Probes(pub(crate) Arc<Inner>);

impl Probes {
    /// The hook runner ran the hooks of some certificates.
    pub fn hook_ran(&self, ev: HookRan) {
        if ev.certs.is_empty() {
            return;
        }
        lock(&self.0.hook_runs).push(ev);
        self.0.wake.notify_one();
    }

    /// Waits until a hook re-run is asked for; returns the certificates.
    pub async fn rerun_requested(&self) -> Vec<String> {
        loop {
            let notified = self.0.rerun_wake.notified();
            let taken = std::mem::take(&mut *lock(&self.0.reruns));
            if !taken.is_empty() {
                return taken.into_iter().collect();
            }
            notified.await;
        }
    }

    /// Failed handshakes per frontend since start.
    pub fn failures(&self) -> BTreeMap<String, u64> {
        lock(&self.0.failures).clone()
    }

    /// Rollout times: `f` reads or updates them.
    pub fn rollout_times<T>(
        &self,
        f: impl FnOnce(&mut crate::core::rollout_time::RolloutTimes) -> T,
    ) -> T {
        f(&mut lock(&self.0.times))
    }

    pub(crate) fn ask_rerun(&self, cert: String) {
        lock(&self.0.reruns).insert(cert);
        self.0.rerun_wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
