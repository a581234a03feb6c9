//! Narrow handles onto the daemon's shared state (issue #12): a feature takes the
//! handles it uses, not the whole [`Shared`], so what it can see and change is plain
//! from its signature, and the state behind a handle can change without touching the
//! feature. The daemon's wiring makes them (`daemon.rs`); the handles hold the state
//! privately.
//!
//! - [`Changes`]: committed tree changes (wait for the next, list what changed).
//! - [`Settings`]: the config as last (re)loaded.
//! - [`Reports`]: errors and failures for `status` and `/metrics`.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::index::Kind;
use crate::node::Shared;

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

    /// What `f` reads from the current config; `None` if a panic poisoned it.
    pub fn read<T>(&self, f: impl FnOnce(&Config) -> T) -> Option<T> {
        self.0.config.lock().ok().map(|c| f(&c))
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
        self.0.lock().error(msg);
    }
}
