//! The ACME handle: what the driver knows per certificate (shown in `status`) and
//! the command channel `issue` / `renew` go through. Plain data and channels: it
//! imports nothing of the daemon, so the shared state can hold it without the ACME
//! code and the daemon importing each other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::schedule::LeaseClock;

/// What the driver is doing about one certificate (`status` shows it lowercase).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcmeState {
    /// Nothing to do now (or not the renewer).
    #[default]
    Idle,
    /// An order is running.
    Ordering,
    /// Due, but another node holds the lease or the mesh is not ready.
    Waiting,
    /// The last order failed; the next attempt waits (`retry_at`).
    Backoff,
}

impl AcmeState {
    pub fn as_str(self) -> &'static str {
        match self {
            AcmeState::Idle => "idle",
            AcmeState::Ordering => "ordering",
            AcmeState::Waiting => "waiting",
            AcmeState::Backoff => "backoff",
        }
    }
}

/// What the driver knows about one certificate (shown in `status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Runtime {
    pub state: AcmeState,
    pub last_attempt: Option<i64>,
    pub last_success: Option<i64>,
    pub last_error: Option<String>,
    pub failures: u32,
    /// No automatic attempt before this (backoff).
    pub retry_at: Option<i64>,
    /// When the next automatic order is planned.
    pub next_renewal: Option<i64>,
    /// Why this node is not ordering although the certificate is due.
    pub waiting_for: Option<String>,
    pub last_took_ms: Option<u64>,
    /// ARI window from the CA, if it offers ARI.
    pub ari_start: Option<i64>,
    pub ari_end: Option<i64>,
    /// dns-01: while waiting for propagation, what each authoritative nameserver serves.
    pub dns_propagation: Option<Vec<NsProgress>>,
    #[serde(skip)]
    pub(super) jitter: f64,
    #[serde(skip)]
    pub(super) ari_serial: String,
    #[serde(skip)]
    pub(super) ari_next_query: i64,
    /// Serial of the certificate live when the last order failed: when another node
    /// publishes a new one, that failure no longer stands.
    #[serde(skip)]
    pub(super) failed_serial: Option<String>,
}

/// One authoritative nameserver during a dns-01 propagation check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsProgress {
    /// `host (address)`.
    pub nameserver: String,
    /// Serves every challenge record of the order.
    pub has_record: bool,
    /// Why it could not be asked (unreachable, error code).
    pub error: Option<String>,
}

pub(super) enum Command {
    Issue {
        name: String,
        reply: oneshot::Sender<Result<IssueReply, String>>,
    },
    Renew {
        force: bool,
        dry_run: bool,
        reply: oneshot::Sender<Result<RenewReport, String>>,
    },
}

/// `certmesh issue NAME`'s answer (`--json` prints it as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueReply {
    pub name: String,
    /// The directory URL of the CA that issued it.
    #[serde(default)]
    pub ca: String,
    /// The published version (`archive/<name>/<version>/`).
    pub version: u32,
    /// `notAfter` of the new certificate (RFC 3339).
    pub not_after: String,
    pub took_ms: u64,
}

/// `certmesh renew`'s answer: one result per configured certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewReport {
    pub dry_run: bool,
    /// How many orders failed.
    pub failed: u32,
    pub results: Vec<RenewResult>,
}

/// One certificate in a [`RenewReport`]. Absent fields do not apply: `would_order`
/// only in a dry run; `ordered` only for a due certificate; `version`, `not_after`
/// and `took_ms` only when it was ordered; `waiting_for` when another node or lease
/// decides; `error` when the order failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResult {
    pub name: String,
    pub due: bool,
    pub next_renewal: String,
    pub renewer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub would_order: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

const STOPPED: &str = "the ACME task has stopped";

/// The handle the control socket talks to.
pub struct Acme {
    pub(super) runtime: Mutex<BTreeMap<String, Runtime>>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    /// Orders that failed since start (metrics).
    pub(super) failures: std::sync::atomic::AtomicU64,
    /// When each lease content was first seen (a lease holds at most `lease` from then).
    pub(super) leases: Mutex<LeaseClock>,
    /// The order queue under the budget, as of the driver's last look.
    pub(super) queue: Mutex<QueueStatus>,
}

/// The renewer's order queue (`status` `acme_queue`): what is due but waits for the
/// budget (`[acme] max_orders_per_hour`) or a CA's pause.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Due certificates not yet ordered.
    pub queued: usize,
    /// The first few, in the order they will be ordered: renewals first.
    pub next: Vec<QueuedOrder>,
    /// Orders the budget allows now, of `max_per_hour`.
    pub budget_left: u32,
    pub max_per_hour: u32,
    /// Seconds until the queue is empty at this budget (ignoring pauses).
    pub eta_s: Option<i64>,
    /// Until when (unix seconds) the first CA is paused after a `rateLimited`
    /// answer, fleet-wide.
    pub paused_until: Option<i64>,
}

/// One queued order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedOrder {
    pub name: String,
    pub kind: super::budget::Kind,
}

impl Acme {
    pub(super) fn rt(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Runtime>> {
        self.runtime.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The order queue as of the driver's last look.
    pub fn queue(&self) -> QueueStatus {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn runtime(&self, name: &str) -> Option<Runtime> {
        self.rt().get(name).cloned()
    }

    /// Orders that failed since the daemon started.
    pub fn failures_total(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn update(&self, name: &str, f: impl FnOnce(&mut Runtime)) {
        let mut rt = self.rt();
        let r = rt.entry(name.to_string()).or_insert_with(|| Runtime {
            state: AcmeState::Idle,
            jitter: rand::random::<f64>(),
            ..Default::default()
        });
        f(r);
    }

    /// A `rollout = "verify"` took back the version this node just published (issue
    /// 26 item 6): the certificate counts as failed, like an order, with the same
    /// backoff. `live_serial`: the serial live again (while it stays live, the failure
    /// stands; a newer version from another node clears it).
    pub fn rollout_failed(&self, name: &str, why: String, live_serial: Option<String>) {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.update(name, |r| {
            r.failures += 1;
            let wait = super::schedule::backoff(r.failures, rand::random(), None);
            let now = crate::clock::unix_now();
            r.state = AcmeState::Backoff;
            r.retry_at = Some(now.saturating_add(super::schedule::secs(wait)));
            r.next_renewal = r.retry_at;
            r.last_attempt = Some(now);
            r.last_error = Some(why);
            r.failed_serial = live_serial;
        });
    }

    /// `certmesh issue NAME`: order now (unless another node holds the lease).
    pub async fn issue(&self, name: String) -> Result<IssueReply, String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Issue { name, reply })
            .map_err(|_| STOPPED.to_string())?;
        rx.await.map_err(|_| STOPPED.to_string())?
    }

    /// `certmesh renew [--force] [--dry-run]`.
    pub async fn renew(&self, force: bool, dry_run: bool) -> Result<RenewReport, String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Renew {
                force,
                dry_run,
                reply,
            })
            .map_err(|_| STOPPED.to_string())?;
        rx.await.map_err(|_| STOPPED.to_string())?
    }
}

/// Where the driver's handle is kept once it runs: made by the daemon before the
/// features start, set by the driver, read by `status`, `issue`, `renew` and the
/// probes' rollback. Empty where `[acme]` is not running.
#[derive(Clone, Default)]
pub struct AcmeSlot(Arc<OnceLock<Arc<Acme>>>);

impl AcmeSlot {
    /// Keeps the driver's handle; `false` if one is kept already.
    pub fn set(&self, acme: Arc<Acme>) -> bool {
        self.0.set(acme).is_ok()
    }

    /// The driver's handle, `None` where `[acme]` is not running.
    pub fn get(&self) -> Option<&Arc<Acme>> {
        self.0.get()
    }
}
