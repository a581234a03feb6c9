//! Cluster ACME (DESIGN §5): any ACME-enabled node can order into the shared tree.
//!
//! - [`schedule`]: pure — when a certificate is due, backoff, renewer choice, leases.
//! - [`budget`]: pure — orders per hour, the queue (renewals first), CA pauses.
//! - [`advert`]: pure — whether an ACME advert counts (its own node wrote it, lately).
//! - [`account`]: the account shared in `.certmesh/acme/account.json`.
//! - [`client`]: the HTTPS client for the CA (roots, timeouts, size caps,
//!   `Retry-After`).
//! - [`ca`]: the CA list of `acme.directory` (fallback CAs): each CA's account file,
//!   when an order moves to the next CA, which CA issued each live certificate.
//! - [`order`]: one order — challenges through the tree, the ack barrier, finalize.
//! - [`bundle`]: keys, CSRs, PEM, the versioned publish and `live/<name>` flip.
//! - [`served`]: the leaf `live/<name>/fullchain.pem` serves and whether the bundle
//!   around it is good (what status, metrics, the schedule and repair trust).
//! - [`rolled_back`]: the leaves a `rollout = "verify"` took back (repair skips them).
//! - [`http`]: the optional built-in http-01 responder (`[http] listen`).
//! - [`dns`]: dns-01 records (RFC 2136 + TSIG, or exec), the propagation check;
//!   `dns01`: their place in an order and the sweep of records a crash left.
//! - `driver`: the task that orders whatever is missing or due when this node is
//!   the renewer, and serves `issue` / `renew`.
//!
//! - [`handle`]: the handle the control socket talks to (plain data and channels; it
//!   imports nothing of the daemon, so the shared state can hold it).
//!
//! This file: [`AcmeHandles`] (what ACME uses of the daemon: the daemon's wiring builds
//! them), starting it all, and what both the driver and `status` need (renewer,
//! leases, node names).

pub mod account;
pub mod advert;
pub mod agenda;
pub mod budget;
pub mod bundle;
pub mod ca;
pub mod client;
pub mod dns;
mod dns01;
mod driver;
pub mod handle;
pub mod http;
pub mod order;
pub mod rolled_back;
pub mod schedule;
pub mod served;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::acme::handle::AcmeSlot;
use crate::config::{acme::AcmeConfig, certificate::CertificateConfig};
use crate::core::device::DeviceId;
use crate::disk::tree;
use crate::handles::acme::Barrier;
use crate::handles::{Mesh, Reports, Settings, TreeWriter};
use handle::Command;
use schedule::{LeaseClock, RenewalLease, Validity};

/// Each ACME-enabled node announces itself with a file here named by its device ID.
pub const NODES_DIR: &str = ".certmesh/acme/nodes";
/// Renewal leases, one file per certificate name.
pub const LEASES_DIR: &str = ".certmesh/leases";

pub fn unix_now() -> i64 {
    crate::clock::unix_now()
}

/// The ACME feature's handles (the daemon starts the driver with them; `status`
/// reads the renewer, leases and node names through them).
pub fn acme_handles(shared: &Arc<crate::node::Shared>, slot: AcmeSlot) -> AcmeHandles {
    use crate::handles::acme::Barrier;
    use crate::handles::{Mesh, Reports, Settings, TreeWriter};
    AcmeHandles {
        settings: Settings::new(shared),
        mesh: Mesh::new(shared),
        writer: TreeWriter::new(shared),
        reports: Reports::new(shared),
        barrier: Barrier::new(shared),
        slot,
    }
}

/// What the ACME code uses of the daemon, each a narrow handle (`crate::handles`).
#[derive(Clone)]
pub struct AcmeHandles {
    /// `[acme]`, the certificates, this node's name and its configured peers.
    pub settings: Settings,
    /// Who this node is, who is connected and what they are called, and when that
    /// changes; whether the mesh has formed.
    pub mesh: Mesh,
    /// Writes into the tree (tokens, leases, accounts, bundles) and waits for the
    /// index to hold them; the tree's root for reads.
    pub writer: TreeWriter,
    /// Failures, shown in `status`.
    pub reports: Reports,
    /// Every live node has a challenge before the CA is told to validate it.
    pub barrier: Barrier,
    /// The driver's handle (its state per certificate, the lease clock).
    pub slot: AcmeSlot,
}

/// Starts the ACME driver if `[acme]` is configured, and the http-01 responder on
/// `http` (the `[http] listen` socket, taken before anything else at start). Call
/// once, after the control socket is up.
pub fn start(
    h: &AcmeHandles,
    http: Option<std::net::TcpListener>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let acme = h.settings.read(|c| c.acme.is_some()).unwrap_or(false);
    let mut tasks = Vec::new();
    if let Some(listener) = http {
        tasks.push(http::start(h.writer.root().to_path_buf(), listener)?);
    }
    if !acme {
        // A node without `[acme]` never speaks as one: an advert under its own ID
        // (left from when it had `[acme]`, or written by hand) is removed now and
        // whenever it comes back. A reader cannot change the tree (and its advert,
        // written by someone else, never counts).
        if h.mesh.is_writer() {
            tasks.push(tokio::spawn(withdraw(h.clone())));
        }
        return Ok(tasks);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Arc::new(handle::Acme {
        runtime: Mutex::new(BTreeMap::new()),
        commands: tx,
        failures: Default::default(),
        leases: Mutex::new(LeaseClock::default()),
        queue: Mutex::new(Default::default()),
    });
    if !h.slot.set(handle.clone()) {
        anyhow::bail!("the ACME task was started twice");
    }
    // Before any peer connects: peers then learn of us with our first index.
    advertise(h);
    tasks.push(tokio::spawn(driver::run(h.clone(), handle, rx)));
    Ok(tasks)
}

/// Device IDs with a file under [`NODES_DIR`] (whether their advert counts is
/// [`advert_counts`]'s question).
fn advertised(root: &Path) -> Vec<DeviceId> {
    std::fs::read_dir(root.join(NODES_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `id`'s advert counts ([`advert::check`]): the index names `id` as its last
/// writer and it is fresh. A refused advert is logged once per content and reason.
fn advert_counts(h: &AcmeHandles, id: DeviceId) -> bool {
    let rel = format!("{NODES_DIR}/{id}");
    let Ok(p) = tree::rel(&rel) else {
        return false;
    };
    let Some(bytes) = tree::read(h.writer.root(), &rel) else {
        return false;
    };
    let author = h.mesh.modified_by(&p);
    let Err(why) = advert::check(id, author, &bytes, unix_now()) else {
        return true;
    };
    // Once per content and reason: a record that arrives after the file turns "no
    // record" into the real reason, which is worth its own line.
    let mut hasher = blake3::Hasher::new();
    hasher.update(&bytes).update(why.to_string().as_bytes());
    let content = *hasher.finalize().as_bytes();
    let first = h.slot.get().is_none_or(|a| {
        a.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_report(&rel, content)
    });
    if first {
        tracing::warn!(path = %rel, "ignoring the ACME advert: {why}");
    }
    false
}

/// The renewer as this node sees it: the lowest device ID among this node (if
/// `[acme]` is on) and the connected peers whose advert counts. `None` if there is
/// none; a node without `[acme]` never names itself.
pub fn renewer(h: &AcmeHandles) -> Option<DeviceId> {
    let me = h.mesh.me();
    let enabled = h.settings.read(|c| c.acme.is_some()).unwrap_or(false);
    let live = h.mesh.connected();
    let connected: Vec<DeviceId> = advertised(h.writer.root())
        .into_iter()
        .filter(|id| *id != me && live.contains(id))
        .filter(|id| advert_counts(h, *id))
        .collect();
    if enabled {
        Some(schedule::renewer(me, &connected))
    } else {
        connected.into_iter().min()
    }
}

/// A device's node name (this node or a configured peer).
pub fn node_name(h: &AcmeHandles, id: DeviceId) -> String {
    if id == h.mesh.me() {
        return this_node(&h.settings);
    }
    h.mesh.peer_name(id).unwrap_or_else(|| id.to_string())
}

/// The configured peers without a live session now, by name.
pub(crate) fn not_connected(h: &AcmeHandles) -> Vec<String> {
    let connected = h.mesh.connected();
    h.settings
        .read(|c| {
            c.peers
                .iter()
                .filter(|p| !connected.contains(&p.id))
                .map(|p| p.name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// This node's name (`name` in the config).
fn this_node(settings: &Settings) -> String {
    settings.read(|c| c.name.clone()).unwrap_or_default()
}

/// A monotonic clock for [`LeaseClock`] (origin: first use in this process).
fn mono_now() -> std::time::Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

/// The lease on `name` as this node honours it, `None` if there is none. The file is
/// untrusted (any peer can write it): it must parse ([`RenewalLease::parse`]) and name
/// this node or a configured peer as holder, else it is ignored (logged once per
/// content); its `expires` is lowered to at most `[acme] lease` after this node first
/// saw that content.
pub fn read_lease(h: &AcmeHandles, name: &str) -> Option<RenewalLease> {
    let bytes = tree::read(h.writer.root(), &format!("{LEASES_DIR}/{name}"))?;
    let content = *blake3::hash(&bytes).as_bytes();
    let (known, max) = h.settings.read(|c| {
        let known: Vec<DeviceId> = c.peers.iter().map(|p| p.id).collect();
        let max = c
            .acme
            .as_ref()
            .map_or(std::time::Duration::from_secs(120), |a| a.lease);
        (known, max)
    })?;
    let clock = h.slot.get().map(|a| &a.leases);
    let report = |why: String| match clock {
        Some(c) => {
            if c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .first_report(name, content)
            {
                tracing::warn!(cert = %name, "ignoring the renewal lease in {LEASES_DIR}/{name}: {why}");
            }
        }
        // No ACME task here (only `status` reads leases): nothing to act on.
        None => tracing::debug!(cert = %name, "ignoring the renewal lease: {why}"),
    };
    let lease = match RenewalLease::parse_from(&bytes, h.mesh.me(), &known) {
        Ok(l) => l,
        Err(e) => {
            report(e.to_string());
            return None;
        }
    };
    let now = unix_now();
    Some(match clock {
        Some(c) => c.lock().unwrap_or_else(|p| p.into_inner()).honour(
            name,
            content,
            lease,
            now,
            mono_now(),
            max,
        ),
        // No ACME task (status on a node without `[acme]`): at most `lease` from now.
        None => RenewalLease {
            expires: lease.expires.min(now.saturating_add(schedule::secs(max))),
            ..lease
        },
    })
}

/// Writes (or refreshes) this node's advert when [`advert::needs_refresh`] says so.
pub(crate) fn advertise(h: &AcmeHandles) {
    let me = h.mesh.me();
    let name = this_node(&h.settings);
    let rel = format!("{NODES_DIR}/{me}");
    let p = match tree::rel(&rel) {
        Ok(p) => p,
        Err(e) => {
            return h
                .reports
                .error(format!("acme: announcing this node: {e:#}"))
        }
    };
    let now = unix_now();
    let bytes = tree::read(h.writer.root(), &rel);
    let current = bytes.as_deref().map(|b| (b, h.mesh.modified_by(&p)));
    if !advert::needs_refresh(me, &name, current, now) {
        return;
    }
    let a = advert::Advert {
        node: name,
        refreshed: now,
    };
    if let Err(e) = h.writer.write(&p, &a.to_json(), 0o644) {
        h.reports
            .error(format!("acme: announcing this node: {e:#}"));
    }
}

/// On a node without `[acme]`: removes the advert under its own ID at start and
/// each time it comes back (checked when the mesh makes progress, which every
/// local change does once a peer acknowledges it).
async fn withdraw(h: AcmeHandles) {
    let rel = format!("{NODES_DIR}/{}", h.mesh.me());
    let Ok(p) = tree::rel(&rel) else {
        return;
    };
    let mut progress = h.mesh.progress();
    let mut stopping = h.mesh.stopping();
    loop {
        if tree::read(h.writer.root(), &rel).is_some() {
            h.writer.remove(&p);
            tracing::warn!(
                path = %rel,
                "removed this node's ACME advert: it has no [acme], so it never renews"
            );
        }
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { return },
            _ = stopping.changed() => return,
        }
    }
}

/// Certificates in the current config, with the ACME settings.
/// This node's `[acme]`, without the certificates ([`snapshot`] copies all of them:
/// at 10,000 certificates that copy, made several times an order, was a third of
/// the renewer's CPU).
pub(crate) fn acme_config(settings: &Settings) -> Option<AcmeConfig> {
    settings.read(|c| c.acme.clone()).flatten()
}

pub(crate) fn snapshot(settings: &Settings) -> Option<(AcmeConfig, Vec<CertificateConfig>)> {
    settings
        .read(|c| Some((c.acme.clone()?, c.certificates.clone())))
        .flatten()
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// What is wrong with the bundle `live/<name>` serves ([`served::check_live`]), with
/// the node that last wrote the file at fault; `None` when it is good or absent
/// (an absent certificate is ordered, not repaired).
pub fn bundle_error(h: &AcmeHandles, name: &str, domains: &[String]) -> Option<String> {
    let root = h.writer.root();
    std::fs::symlink_metadata(root.join("live").join(name)).ok()?;
    let why = served::check_live(root, name, domains).err()?;
    Some(with_author(h, name, why))
}

/// `why` (a [`served::check_live`] error) with the node that last wrote the file it
/// names, when the index knows.
pub fn with_author(h: &AcmeHandles, name: &str, why: String) -> String {
    let root = h.writer.root();
    let file = why
        .strip_prefix(&format!("live/{name}/"))
        .and_then(|r| r.split([':', ' ']).next())
        .unwrap_or_default();
    let author = bundle::live_version(root, name)
        .and_then(|v| {
            crate::core::paths::RelPath::parse(&format!("archive/{name}/{v}/{file}")).ok()
        })
        .and_then(|p| h.mesh.modified_by(&p))
        .map(|id| {
            if h.mesh.me().short() == id {
                return this_node(&h.settings);
            }
            h.settings
                .read(|c| {
                    c.peers
                        .iter()
                        .find(|p| p.id.short() == id)
                        .map(|p| p.name.clone())
                })
                .flatten()
                .unwrap_or_else(|| format!("{:016x}", id.0))
        });
    match author {
        Some(a) => format!("{why} (last written by {a})"),
        None => why,
    }
}

/// The validity of the certificate `live/<name>/fullchain.pem` serves.
pub fn live_validity(root: &Path, name: &str) -> Option<(Validity, Vec<String>, String)> {
    served::served_leaf(root, name).map(|l| (l.validity, l.domains, l.serial))
}
