//! Narrow handles onto the daemon's shared state: a feature takes the
//! handles it uses, not the whole [`Shared`], so what it can see and change is plain
//! from its signature, and the state behind a handle can change without touching the
//! feature. The daemon's wiring makes them (`daemon.rs`); the handles hold the state
//! privately.
//!
//! - [`Changes`]: committed tree changes (wait for the next, list what changed).
//! - [`Settings`]: the config as last (re)loaded.
//! - [`Reports`]: errors and failures for `status` and `/metrics`.
//! - [`Mesh`]: whether the peers are connected and in sync, who this node is, and
//!   whether shutdown has begun.
//! - [`TreeWriter`]: writes into the tree the way a person would (staged, fsynced,
//!   renamed) and waits until the index holds the change.
//! - [`SyncHandle`] (`sync.rs`): what a peer session needs — sessions, what to send,
//!   what arrived — with the engine behind the state lock no caller holds.
//! - [`Observer`]: what `status` shows, when it may have changed, and a liveness
//!   probe (the systemd status line and watchdog).

pub mod acme;
pub mod served;
pub mod sync;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::core::device::{DeviceId, ShortId};
use crate::core::paths::RelPath;
use crate::core::record::Kind;
use crate::disk::tree::{self, Expect, Staged};
use crate::node::Shared;
use crate::telemetry::Repairs;

/// Committed changes of the tree.
#[derive(Clone)]
pub struct Changes(Arc<Shared>);

impl Changes {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Changes(shared.clone())
    }

    /// Wakes on every commit; the value is the latest local sequence.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.changed.subscribe()
    }

    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.0.tree.root
    }

    /// The paths changed after sequence `since`, for matching: each path itself and,
    /// for a symlink (`live/<name>`), the files it now exposes
    /// (`live/<name>/fullchain.pem`, ...). Sorted, each once.
    pub fn touched_since(&self, since: u64) -> Vec<String> {
        let st = self.0.lock();
        let index = st.engine.index();
        let mut out = BTreeSet::new();
        for e in index.changed_since(since) {
            let p = e.record.path.as_str().to_string();
            if e.record.kind == Kind::Symlink && !e.record.deleted {
                if let Ok(target) = e.record.path.resolve_symlink_target(&e.record.target) {
                    for inner in index.paths_within(&target) {
                        if let Some(rest) = inner.as_str().strip_prefix(target.as_str()) {
                            out.insert(format!("{p}{rest}"));
                        }
                    }
                }
            }
            out.insert(p);
        }
        out.into_iter().collect()
    }
}

/// The config as last (re)loaded (SIGHUP replaces it).
#[derive(Clone)]
pub struct Settings(Arc<Shared>);

impl Settings {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Settings(shared.clone())
    }

    /// What `f` reads from the current config (always `Some`; the `Option` is kept
    /// for callers written when a poisoned lock could make it `None`).
    pub fn read<T>(&self, f: impl FnOnce(&Config) -> T) -> Option<T> {
        Some(f(&self.0.config()))
    }

    /// The config now, and a receiver that wakes when SIGHUP replaces it or the
    /// set of certificates changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.0.config.subscribe()
    }

    /// Makes `tree` (the tree's valid `.certmesh/certificates/` entries) part of the
    /// effective certificates, after the config's own blocks, which win on a name
    /// both declare. Says whether the set changed (subscribers wake then).
    pub fn set_tree_certificates(
        &self,
        tree: Vec<crate::config::certificate::CertificateConfig>,
    ) -> bool {
        self.0.config.send_if_modified(|c| {
            let new = crate::config::tree_certs::effective(&c.configured_certificates(), tree);
            if new == c.certificates {
                return false;
            }
            Arc::make_mut(c).certificates = new;
            true
        })
    }
}

/// Where features report what went wrong.
#[derive(Clone)]
pub struct Reports(Arc<Shared>);

impl Reports {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Reports(shared.clone())
    }

    /// A hook failed or timed out: counted (`certmesh_hook_failures_total`) and
    /// shown in `status`.
    pub fn hook_failed(&self, msg: String) {
        self.0.hook_failures.fetch_add(1, Ordering::Relaxed);
        self.error(msg);
    }

    /// Something failed: shown in `status` (the last few, with their time).
    pub fn error(&self, msg: String) {
        self.0.lock().error(msg);
    }

    /// Certificate repairs: the queue and the recent results.
    pub fn repairs(&self) -> &Repairs {
        &self.0.repairs
    }
}

/// The mesh as this node sees it.
#[derive(Clone)]
pub struct Mesh(Arc<Shared>);

impl Mesh {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Mesh(shared.clone())
    }

    /// Waits until every configured peer is connected and in sync and nothing is
    /// needed, or `grace`; says whether that happened.
    pub async fn wait_formed(&self, grace: Duration) -> bool {
        self.0.wait_mesh_formed(grace).await
    }

    /// Turns `true` once shutdown begins.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.0.stopping.subscribe()
    }

    /// This node's device ID.
    pub fn me(&self) -> DeviceId {
        self.0.me()
    }

    /// Whether this node may change the tree (readers may not).
    pub fn is_writer(&self) -> bool {
        self.0.lock().engine.is_writer()
    }

    /// Nothing under `dir` is still needed from a peer or being applied.
    pub fn settled_within(&self, dir: &RelPath) -> bool {
        let st = self.0.lock();
        st.engine.plan().needs_within(dir).next().is_none() && !st.engine.applying_within(dir)
    }

    /// The node that last changed `path`, as the index records it.
    pub fn modified_by(&self, path: &RelPath) -> Option<ShortId> {
        let st = self.0.lock();
        st.engine.index().get(path).map(|e| e.record.modified_by)
    }

    /// The certificates whose `live/<name>` or `archive/<name>/…` changed after the
    /// local sequence `since` (from here or a peer), and the sequence now: what the
    /// renewal scheduler looks at again. O(changes), not O(tree).
    pub fn certificates_changed_since(&self, since: u64) -> (BTreeSet<String>, u64) {
        let st = self.0.lock();
        let index = st.engine.index();
        let names = index
            .changed_since(since)
            .filter_map(|e| {
                let p = e.record.path.as_str();
                let rest = p.strip_prefix("live/").or(p.strip_prefix("archive/"))?;
                Some(rest.split('/').next()?.to_string())
            })
            .collect();
        (names, index.sequence())
    }
}

/// Writes into the tree and waits until the local index holds the change (see
/// [`crate::disk::tree`] for how: staged under `.certmesh/tmp/`, fsynced, renamed,
/// no link followed).
#[derive(Clone)]
pub struct TreeWriter(Arc<Shared>);

impl TreeWriter {
    pub fn new(shared: &Arc<Shared>) -> Self {
        TreeWriter(shared.clone())
    }

    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.0.tree.root
    }

    /// Writes `data` to a fresh file under `.certmesh/tmp/` (fsynced, `mode`).
    pub fn stage(&self, rel: &RelPath, data: &[u8], mode: u32) -> anyhow::Result<Staged> {
        tree::stage(self.root(), rel, data, mode)
    }

    /// Renames a staged file into place.
    pub fn place(&self, staged: Staged) -> anyhow::Result<Expect> {
        tree::place(self.root(), staged)
    }

    /// Points the link `rel` at `target` (replacing it atomically).
    pub fn symlink(&self, rel: &RelPath, target: &str) -> anyhow::Result<Expect> {
        tree::symlink(self.root(), rel, target)
    }

    /// Waits until the index shows every item as expected; the highest sequence.
    pub async fn await_indexed(
        &self,
        items: &[(RelPath, Expect)],
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        acme::await_indexed(&self.0, items, timeout).await
    }
}

/// What `status` shows (built in [`crate::ops::observe`], which reads the state
/// through it), and when it may have changed.
#[derive(Clone)]
pub struct Observer(pub(crate) Arc<Shared>);

impl Observer {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Observer(shared.clone())
    }

    /// Wake-ups: the local sequence (commits) and progress (acks, connections).
    pub fn subscribe(&self) -> (watch::Receiver<u64>, watch::Receiver<u64>) {
        (self.0.changed.subscribe(), self.0.progress.subscribe())
    }

    /// Whether the index holds `path` (live or deleted).
    pub fn indexed(&self, path: &RelPath) -> bool {
        self.0.lock().engine.index().get(path).is_some()
    }

    /// Takes and drops the state lock: returns only if the state is not deadlocked.
    pub fn probe(&self) {
        drop(self.0.lock());
    }

    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.0.tree.root
    }

    /// Per configured peer: its name, and the traffic of its live session (bytes
    /// received, sent), if any. `f` runs under the state lock, as sessions end under
    /// it too, so a session moving from live to ended is counted exactly once.
    pub fn with_peer_sessions<T>(&self, f: impl FnOnce(&[(&str, Option<(u64, u64)>)]) -> T) -> T {
        let st = self.0.lock();
        let peers: Vec<(&str, Option<(u64, u64)>)> = st
            .peers
            .values()
            .map(|slot| {
                let live = slot.session.as_ref().map(|s| {
                    let stats = s.conn.stats();
                    (stats.udp_rx.bytes, stats.udp_tx.bytes)
                });
                (slot.config.name.as_str(), live)
            })
            .collect();
        f(&peers)
    }
}

/// The certificates this node repairs (the repair task's first pass): the configured
/// ones, none on a reader (its repair would be put back).
pub fn repaired(is_writer: bool, config: &crate::config::Config) -> Vec<String> {
    if !is_writer {
        return Vec::new();
    }
    config.certificates.iter().map(|c| c.name.clone()).collect()
}
