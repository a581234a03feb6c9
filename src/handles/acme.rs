//! What the ACME feature (`crate::acme`) uses of the daemon beyond the handles the
//! other features share: who is connected and what they are called ([`Mesh`]), more
//! tree writes ([`TreeWriter`]) and the cluster-wide barrier ([`Barrier`]). Like the others,
//! each wraps the shared state privately; the state lock is taken only for short
//! reads of the engine and the peer table, never across I/O or an `await`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::watch;

use super::{Mesh, TreeWriter};
use crate::core::device::DeviceId;
use crate::core::paths::RelPath;
use crate::disk::tree::{self, Expect};
use crate::node::{PeerAck, Shared};

impl Mesh {
    /// Wakes when peers connect or leave and when acks arrive.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.0.progress.subscribe()
    }

    /// The configured peers with a live session now.
    pub fn connected(&self) -> Vec<DeviceId> {
        let st = self.0.lock();
        st.peers
            .iter()
            .filter(|(_, s)| s.session.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// The name of a configured peer, as the peer table has it.
    pub fn peer_name(&self, id: DeviceId) -> Option<String> {
        self.0.lock().peers.get(&id).map(|s| s.config.name.clone())
    }
}

impl TreeWriter {
    /// Atomically replaces `rel` with `data` (staged, fsynced, renamed).
    pub fn write(&self, rel: &RelPath, data: &[u8], mode: u32) -> anyhow::Result<Expect> {
        tree::write_file(self.root(), rel, data, mode)
    }

    /// Removes a file, link or empty directory if present.
    pub fn remove(&self, rel: &RelPath) -> Expect {
        tree::remove(self.root(), rel)
    }

    /// Removes a directory and everything below it, following no link.
    pub fn remove_all(&self, rel: &RelPath) -> anyhow::Result<()> {
        tree::remove_all(self.root(), rel)
    }

    /// Of `paths`, the one whose local version is the newest in the index (the
    /// highest sequence, an absent path counting as 0; the last of equals).
    pub fn newest<'a>(&self, paths: impl IntoIterator<Item = &'a RelPath>) -> Option<&'a RelPath> {
        let st = self.0.lock();
        paths
            .into_iter()
            .max_by_key(|p| st.engine.index().get(p).map_or(0, |e| e.sequence))
    }
}

/// [`TreeWriter::await_indexed`]: asks the scanner for these paths and waits until
/// the local index shows every one as expected (the watcher usually has it already).
/// Returns the highest local sequence among them, which is what peers must
/// acknowledge.
pub(super) async fn await_indexed(
    shared: &Shared,
    items: &[(RelPath, Expect)],
    timeout: Duration,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut changed = shared.changed.subscribe();
    let _ = shared
        .rescan
        .send(items.iter().map(|(p, _)| p.clone()).collect());
    loop {
        changed.borrow_and_update();
        let missing: Vec<&RelPath> = {
            let st = shared.lock();
            let index = st.engine.index();
            let missing: Vec<&RelPath> = items
                .iter()
                .filter(|(p, want)| !tree::index_shows(index, p, want))
                .map(|(p, _)| p)
                .collect();
            if missing.is_empty() {
                return Ok(items
                    .iter()
                    .filter_map(|(p, _)| index.get(p).map(|e| e.sequence))
                    .max()
                    .unwrap_or(0));
            }
            missing
        };
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            let missing: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
            bail!("the local index did not pick up {missing:?} within {timeout:?}");
        }
        // Woken by the scanner's commit; the short poll covers a commit that
        // happened before we subscribed.
        let _ = tokio::time::timeout(left.min(Duration::from_millis(20)), changed.changed()).await;
    }
}

/// The barrier the ACME client uses before telling the CA to validate: every live
/// node of the cluster has a path ([`crate::node::wait_peers_have`]).
#[derive(Clone)]
pub struct Barrier(Arc<Shared>);

impl Barrier {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Barrier(shared.clone())
    }

    /// Waits until every live node has the current local version of `path`, or
    /// `timeout`; how each node answered.
    pub async fn wait(&self, path: &RelPath, timeout: Duration) -> Vec<PeerAck> {
        crate::node::wait_peers_have(&self.0, path, timeout).await
    }

    /// A census (`status --cluster`): a barrier on this node's newest record that
    /// also asks every node whether it is in sync with its peers; `None` when there
    /// is nothing to ask about or too many barriers run.
    pub async fn census(
        &self,
        timeout: Duration,
    ) -> Option<(RelPath, crate::core::cluster::BarrierStatus)> {
        crate::node::census(&self.0, timeout).await
    }
}
