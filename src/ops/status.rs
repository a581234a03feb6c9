//! What `certmesh status` shows: the typed answer (`status --json`, the keys are
//! stable; [`crate::ops::render`] makes the tables for people). Built from the node's state by
//! [`crate::handles::Observer::status`]; sent over the control socket
//! ([`crate::ops::control`]); read by `/metrics` and the systemd status line.

use serde::{Deserialize, Serialize};

use crate::telemetry::RecentError;

/// `certmesh status --json`: the keys are stable.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: NodeStatus,
    pub tree: TreeStatus,
    pub peers: Vec<PeerStatus>,
    pub certificates: Vec<CertStatus>,
    pub errors: Vec<RecentError>,
    /// Failure counters since start (also exported as metrics).
    #[serde(default)]
    pub counters: Counters,
    /// Certificates this node put back after a peer's change broke them, oldest
    /// first: `repairs[].certificate`, `.at`, `.caused_by`, `.from_version`.
    #[serde(default)]
    pub repairs: Vec<crate::telemetry::RepairStatus>,
    /// The whole cluster's sync, behind hubs too (only with `status --cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::ops::census::ClusterSync>,
    /// ACME nodes: the orders waiting for `[acme] max_orders_per_hour` or a CA's
    /// pause, the budget left and when the queue will be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme_queue: Option<crate::acme::handle::QueueStatus>,
    /// Past [`SUMMARY_ABOVE`] certificates, when the client asked for a summary
    /// (text `status`): the certificates summed up here, and `certificates` empty, so
    /// 10,000 of them are not sent to be counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_summary: Option<CertSummary>,
}

/// Above this many certificates, text `status` shows a screenful instead of a
/// table: counts by state, the soonest expiries, those with errors and the order
/// queue; `--all` shows the full table, `--cert NAME` one certificate.
pub const SUMMARY_ABOVE: usize = 20;
/// How many of the soonest expiries the summary lists.
pub const SOONEST_SHOWN: usize = 5;
/// How many certificates with errors the summary lists.
pub const FAILING_SHOWN: usize = 10;

/// Many certificates summed up ([`Status::cert_summary`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertSummary {
    pub total: usize,
    /// Of `total`, those from `certs/` entries in the tree (the rest from the config).
    pub from_tree: usize,
    /// With a served leaf, without one, with a damaged bundle, with a warning.
    pub live: usize,
    pub missing: usize,
    pub damaged: usize,
    pub unscheduled: usize,
    /// ACME state → how many ("no acme here" where this node runs no ACME).
    pub by_state: std::collections::BTreeMap<String, usize>,
    /// The [`SOONEST_SHOWN`] soonest to expire (missing ones first).
    pub soonest: Vec<CertStatus>,
    /// The first [`FAILING_SHOWN`] with an error, of `failing_total`.
    pub failing: Vec<CertStatus>,
    pub failing_total: usize,
}

impl CertSummary {
    pub fn of(certs: &[CertStatus]) -> CertSummary {
        let count = |f: fn(&CertStatus) -> bool| certs.iter().filter(|c| f(c)).count();
        let mut by_state = std::collections::BTreeMap::new();
        for c in certs {
            let s = c.state.map_or("no acme here", |s| s.as_str());
            *by_state.entry(s.to_string()).or_default() += 1;
        }
        let mut soonest: Vec<&CertStatus> = certs.iter().collect();
        soonest.sort_by_key(|c| (c.not_after_unix.unwrap_or(i64::MIN), c.name.as_str()));
        let failing: Vec<&CertStatus> = certs.iter().filter(|c| c.has_error()).collect();
        CertSummary {
            total: certs.len(),
            from_tree: count(|c| c.source == crate::config::certificate::CertSource::Tree),
            live: count(|c| c.not_after_unix.is_some()),
            missing: count(|c| c.not_after_unix.is_none()),
            damaged: count(|c| c.bundle_error.is_some()),
            unscheduled: count(|c| c.warning.is_some()),
            by_state,
            soonest: soonest.into_iter().take(SOONEST_SHOWN).cloned().collect(),
            failing_total: failing.len(),
            failing: failing.into_iter().take(FAILING_SHOWN).cloned().collect(),
        }
    }
}

impl Status {
    /// Past [`SUMMARY_ABOVE`] certificates, keeps them summed up in `cert_summary`
    /// instead of listed (what text `status` asks the daemon for).
    pub fn summarise(&mut self) {
        if self.certificates.len() > SUMMARY_ABOVE {
            self.cert_summary = Some(CertSummary::of(&self.certificates));
            self.certificates = Vec::new();
        }
    }
}

impl CertStatus {
    /// Its last order failed, its bundle is damaged, or it has a warning.
    pub fn has_error(&self) -> bool {
        self.last_error.is_some() || self.bundle_error.is_some() || self.warning.is_some()
    }
}

/// Monotonic counters since the daemon started.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Hooks that failed to start, exited non-zero or timed out.
    pub hook_failures: u64,
    /// ACME orders that failed (0 on nodes without `[acme]`).
    pub acme_failures: u64,
    /// Failed serving probes per frontend.
    #[serde(default)]
    pub probe_failures: std::collections::BTreeMap<String, u64>,
    /// Rollout times of the versions this node published.
    #[serde(default)]
    pub rollout_seconds: crate::core::rollout_time::Histogram,
}

/// One configured certificate as this node sees it: what is live in the tree, and
/// (on ACME nodes) the driver's plans.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertStatus {
    pub name: String,
    pub domains: Vec<String>,
    /// RFC 3339; `None` while no certificate is live.
    pub not_after: Option<String>,
    pub not_after_unix: Option<i64>,
    pub days_left: Option<f64>,
    /// The `archive/<name>/<n>` that `live/<name>` points at.
    pub version: Option<u32>,
    pub serial: Option<String>,
    /// Directory URL of the CA that issued the live certificate (from
    /// `.certmesh/acme/issued/<name>`); `None` if unknown (no certificate, or one
    /// issued or imported without a record).
    #[serde(default)]
    pub ca: Option<String>,
    /// Node name of the renewer as this node sees it.
    pub renewer: Option<String>,
    /// Node holding a fresh renewal lease (an order in progress).
    pub lease: Option<String>,
    /// RFC 3339 of the next automatic order (ACME nodes).
    pub next_renewal: Option<String>,
    #[serde(default)]
    pub next_renewal_unix: Option<i64>,
    /// idle | ordering | waiting | backoff (ACME nodes); `-` elsewhere.
    /// What the ACME driver is doing; `None` (`-`) where `[acme]` is not configured.
    pub state: Option<crate::acme::handle::AcmeState>,
    pub last_attempt: Option<String>,
    #[serde(default)]
    pub last_attempt_unix: Option<i64>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub waiting_for: Option<String>,
    pub last_took_ms: Option<u64>,
    /// "http-01", "dns-01" or "dns-01+http-01" (wildcards by dns-01, the rest http-01).
    #[serde(default)]
    pub challenge: String,
    /// dns-01, while an order waits for propagation: each authoritative nameserver
    /// and whether it serves the records yet.
    #[serde(default)]
    pub dns_propagation: Option<Vec<crate::acme::handle::NsProgress>>,
    /// What is wrong with `live/<name>` when the bundle is damaged (a file that is not
    /// the served leaf, a key that does not match, a broken chain), with the node
    /// that last wrote it; `None` when the bundle is good or absent.
    #[serde(default)]
    pub bundle_error: Option<String>,
    /// Seconds until the served leaf expires, less the time retries still need
    /// (max(1 day, a tenth of the lifetime)): page when this nears 0.
    #[serde(default)]
    pub runway_s: Option<i64>,
    /// Set when the certificate is inside its renewal window and no order is
    /// scheduled (no ACME node to renew it, or this renewer has none planned).
    #[serde(default)]
    pub warning: Option<String>,
    /// What each node's frontends serve, one entry per node and frontend.
    #[serde(default)]
    pub served: Vec<ServedStatus>,
    /// The last finished rollout: milliseconds from the publish of
    /// `last_rollout_version` (the `live/<name>` flip, publisher's clock) until the
    /// last node's frontends served it (`last_rollout_node`, its own clock).
    #[serde(default)]
    pub last_rollout_ms: Option<u64>,
    #[serde(default)]
    pub last_rollout_version: Option<u32>,
    #[serde(default)]
    pub last_rollout_node: Option<String>,
    /// Where it is declared: `"config"` (a `[[certificate]]` block) or `"tree"`
    /// (`certmesh cert add`, `.certmesh/certificates/<name>.toml`).
    #[serde(default)]
    pub source: crate::config::certificate::CertSource,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: String,
    pub listen: String,
    pub uptime_s: u64,
    /// The daemon's clock (unix seconds) when it answered: ages are relative to it.
    #[serde(default)]
    pub now_unix: i64,
    /// "writer" or "reader" (`[tree] writers`).
    #[serde(default)]
    pub role: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TreeStatus {
    pub path: String,
    pub files: usize,
    pub out_of_sync: usize,
    pub sequence: u64,
    /// Rescans run since start (watcher-driven and periodic): stays put when idle.
    #[serde(default)]
    pub scans: u64,
    /// Peers' files larger than `[tree] max_file_size`: not fetched (at most
    /// `TOO_LARGE_SHOWN` listed; `too_large_count` counts them all).
    #[serde(default)]
    pub too_large: Vec<TooLargeFile>,
    #[serde(default)]
    pub too_large_count: usize,
    /// Peers' paths not fetched because of a tree budget (`[tree] max_size`,
    /// `max_files`, `min_disk_free`) or a peer's view cap (at most `REFUSED_SHOWN`
    /// listed; `refused_count` counts those remembered, `refused_total` all since
    /// start).
    #[serde(default)]
    pub refused: Vec<RefusedPath>,
    #[serde(default)]
    pub refused_count: usize,
    #[serde(default)]
    pub refused_total: u64,
    /// Times a peer's new path was not taken in because the index was full
    /// (`index::MAX_INDEX_RECORDS`), since start.
    #[serde(default)]
    pub not_adopted: u64,
    /// A reader's local changes, not sent ("this node is not a writer") and put
    /// back: the latest paths, newest last, and how many since start.
    #[serde(default)]
    pub not_sent: Vec<String>,
    #[serde(default)]
    pub not_sent_count: u64,
}

/// Records of one peer not taken in because of their authorship.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RefusedStatus {
    /// Since start.
    pub count: u64,
    pub last_path: Option<String>,
    /// Device ID the last refused record claimed as its author.
    pub last_author: Option<String>,
    pub last_reason: Option<String>,
}

/// How many paths refused by a budget `status` lists.
pub const REFUSED_SHOWN: usize = 100;

/// A peer's path not fetched because of a budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefusedPath {
    pub path: String,
    /// `max_size`, `max_files`, `min_disk_free` (the `[tree]` key), `peer_view`
    /// (the peer's view holds its cap of records or bytes) or `index_full` (the index
    /// and the needs hold theirs: decided again when there is room).
    pub reason: String,
    /// The peer that sent it (its name, or its device ID).
    pub peer: Option<String>,
    pub size: u64,
}

/// How many files too large `status` lists.
pub const TOO_LARGE_SHOWN: usize = 100;

/// A peer's file not fetched because of its size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TooLargeFile {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub id: String,
    pub address: String,
    pub connected: bool,
    pub in_sync: bool,
    pub rtt_ms: Option<f64>,
    /// Our records this peer has acknowledged (its view of our sequence).
    pub acked: u64,
    /// Records we still need that only this peer has announced.
    pub pending_from: usize,
    pub last_error: Option<String>,
    /// Items between us and this peer: our records it has not acknowledged (as of
    /// its last ack, also while disconnected) plus `pending_from`.
    #[serde(default)]
    pub out_of_sync: usize,
    /// Unix seconds of the last successful sync: the last ack from this peer, or the
    /// last time it was seen fully in sync. `None`: never since start.
    #[serde(default)]
    pub last_sync_unix: Option<i64>,
    /// The same as RFC 3339.
    #[serde(default)]
    pub last_sync: Option<String>,
    /// Records this peer sent that were refused for their authorship.
    #[serde(default)]
    pub refused: RefusedStatus,
    /// New paths this peer sent while its view held its cap (200,000 records or
    /// 256 MiB): refused, the session kept.
    #[serde(default)]
    pub over_cap: OverCapStatus,
}

/// A peer's new paths refused because its view was full, since start.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct OverCapStatus {
    pub count: u64,
    pub last_path: Option<String>,
}

/// One node's frontend, for one certificate (`certificates[].served[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedStatus {
    /// The node's name, as in the peer lists.
    pub node: String,
    pub frontend: String,
    /// The served leaf is the leaf of `live/<name>/fullchain.pem` on the node
    /// answering `status`.
    pub current: bool,
    /// The `archive/<name>/<n>` whose leaf is served, when still kept.
    pub version: Option<u32>,
    /// Hex SHA-256 of the served leaf's DER.
    pub leaf_sha256: Option<String>,
    pub not_after_unix: Option<i64>,
    /// Why the handshake failed.
    pub error: Option<String>,
    pub seen_unix: i64,
    /// Since when this leaf (or this failure) has been seen.
    pub since_unix: i64,
    /// The same in unix milliseconds (0: not reported).
    #[serde(default)]
    pub since_ms: i64,
    /// The node's report was not refreshed lately: not counted either way.
    #[serde(default)]
    pub stale: bool,
}
