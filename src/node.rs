//! The daemon's shared state (its wiring is in `daemon`). All mutable sync state sits in one `State`
//! (the sync [`Engine`] and the node's bookkeeping) behind a mutex held only for
//! pure-core calls; I/O happens outside it.

use crate::clock::now_ns;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Notify};

use crate::config::{peer::PeerConfig, Config};
use crate::core::cluster::BarrierStatus;
use crate::core::device::DeviceId;
use crate::core::engine::{Engine, EngineError};
use crate::core::paths::RelPath;
use crate::disk::apply::Tree;
use crate::disk::store::{Journal, Pending};
use crate::identity::Identity;

/// A live session with a peer.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    pub instance: u64,
    pub dialed_by_me: bool,
    pub conn: quinn::Connection,
}

/// A peer disconnected for sending too much refused input: no session
/// with it, in either direction, until `until`; each strike doubles the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalty {
    pub until: Instant,
    pub strikes: u32,
}

/// The first wait after a strike.
pub const PENALTY_BASE: Duration = Duration::from_secs(5);
/// The longest wait.
pub const PENALTY_MAX: Duration = Duration::from_secs(600);
/// A strike this long after the last wait ended starts again from [`PENALTY_BASE`].
pub const PENALTY_FORGET: Duration = Duration::from_secs(3600);

impl Penalty {
    /// The penalty after one more strike at `now`.
    pub fn strike(prev: Option<Penalty>, now: Instant) -> Penalty {
        let strikes = match prev {
            Some(p) if now < p.until + PENALTY_FORGET => p.strikes.saturating_add(1),
            _ => 1,
        };
        let wait = PENALTY_BASE
            .saturating_mul(1 << (strikes - 1).min(16))
            .min(PENALTY_MAX);
        Penalty {
            until: now + wait,
            strikes,
        }
    }

    /// How long until sessions are allowed again (zero: now).
    pub fn left(&self, now: Instant) -> Duration {
        self.until.saturating_duration_since(now)
    }
}

/// Per configured peer.
#[derive(Debug)]
pub struct PeerSlot {
    pub config: PeerConfig,
    pub session: Option<Session>,
    /// Woken when the session ends, so the dialler tries again.
    pub gone: Arc<Notify>,
    pub last_error: Option<String>,
    /// Unix seconds of the last ack from this peer, or of the last time it was seen
    /// fully in sync (`status`, metrics).
    pub last_sync: Option<i64>,
    /// Backing off from this peer after it was disconnected for misbehaving.
    pub penalty: Option<Penalty>,
}

/// Everything the pure core needs, under one lock.
pub struct State {
    /// Index, plan and per-peer send state: changed only through its methods.
    pub engine: Engine,
    /// Encodes index changes for the persister (no I/O under this lock).
    pub journal: Journal,
    pub peers: HashMap<DeviceId, PeerSlot>,
    pub errors: crate::telemetry::RecentErrors,
}

impl State {
    /// Records an error for `status` (and logs it).
    pub fn error(&mut self, msg: String) {
        tracing::warn!("{msg}");
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.errors.push(i64::try_from(t).unwrap_or(i64::MAX), msg);
    }

    /// An ack from `peer`: the engine checks and learns it, the slot remembers when.
    pub fn acked(&mut self, peer: DeviceId, sequence: u64) -> Result<(), EngineError> {
        self.engine.handle_ack(peer, sequence)?;
        if let Some(slot) = self.peers.get_mut(&peer) {
            slot.last_sync = Some(now_ns() / 1_000_000_000);
        }
        Ok(())
    }

    /// Hands the entries changed after `since` to the persister, which writes them
    /// outside this lock and then lets the peers' senders announce them.
    pub fn commit(&mut self, since: u64, shared: &Shared) {
        let index = self.engine.index();
        let seq = index.sequence();
        if seq == since {
            return;
        }
        if let Some(p) = self.journal.prepare(index.changed_since(since), index) {
            shared.persist(seq, p);
        }
    }
}

/// What the persister thread is told, in order.
pub enum PersistMsg {
    /// Write this; then our records up to the sequence may be announced.
    Write(u64, Pending),
    /// Finish what is queued and end.
    Stop,
}

/// Shared by every task of the daemon.
pub struct Shared {
    /// The config as last (re)loaded: read with [`Shared::config`]; SIGHUP sends the
    /// reloaded one, and `Settings::subscribe` wakes on it.
    pub config: watch::Sender<Arc<Config>>,
    pub identity: Arc<Identity>,
    pub tree: Tree,
    pub state: Mutex<State>,
    /// Latest local sequence: peer senders wake on it.
    pub changed: watch::Sender<u64>,
    /// Bumped when acks may have changed: peer senders wake on it.
    pub progress: watch::Sender<u64>,
    /// Wakes the puller.
    pub pull: Notify,
    /// Paths for the scanner (from the watcher, and from the puller's deferrals).
    pub rescan: mpsc::UnboundedSender<Vec<RelPath>>,
    pub started: Instant,
    pub instance: u64,
    pub(crate) session_ids: AtomicU64,
    /// Rescans run (for `status`: an idle node does none).
    pub scans: AtomicU64,
    /// Recent small contents, sent inline with their records.
    pub inline: Mutex<crate::core::inline::InlineCache>,
    /// Set once shutdown begins: no new batches start.
    pub stopping: watch::Sender<bool>,
    /// Hooks that failed to start, exited non-zero or timed out (metrics).
    pub hook_failures: AtomicU64,
    /// Certificate repairs: queue and recent results (`status`).
    pub repairs: crate::telemetry::Repairs,
    /// Serving probes: hook runs in, hook re-runs out, failure counters.
    pub probes: crate::telemetry::Probes,
    /// The persister's queue (see [`persister`]).
    pub(crate) persist: Mutex<std::sync::mpsc::Sender<PersistMsg>>,
    /// A copy of the `[tree] writers` policy for checking records' signatures
    /// before the state lock is taken; held only to look up a key.
    pub writers: Mutex<crate::core::authorship::Writers>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `[tree] writers` policy copy (see [`Shared::writers`]).
    pub fn writers(&self) -> MutexGuard<'_, crate::core::authorship::Writers> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues index bytes for the persister (in commit order: callers hold the
    /// state lock).
    pub fn persist(&self, seq: u64, p: Pending) {
        let tx = self.persist.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send(PersistMsg::Write(seq, p)).is_err() {
            tracing::error!("the index persister has stopped; index changes are not saved");
        }
    }

    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until every configured peer is connected and in sync and nothing is
    /// needed, or `grace` has passed; says whether the mesh formed. Decisions that
    /// read the peers' state from the tree (renewer choice, dhparam) wait for this.
    pub async fn wait_mesh_formed(&self, grace: Duration) -> bool {
        let start = Instant::now();
        let mut progress = self.progress.subscribe();
        while start.elapsed() < grace {
            {
                if self.lock().engine.mesh_formed() {
                    return true;
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), progress.changed()).await;
        }
        false
    }

    pub fn bump_progress(&self) {
        self.progress.send_modify(|v| *v += 1);
    }

    pub fn inline(&self) -> MutexGuard<'_, crate::core::inline::InlineCache> {
        self.inline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The config as last (re)loaded (a cheap clone of the shared copy).
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    pub fn me(&self) -> DeviceId {
        self.identity.id
    }
}

/// How one node answered a barrier.
#[derive(Debug, Clone)]
pub struct PeerAck {
    pub peer: DeviceId,
    pub name: String,
    /// How long until it had the path; `None` if it did not before the deadline
    /// (or, when not `live`, was not connected to anyone who could ask it).
    pub after: Option<Duration>,
    /// Connected to this node or to a node that answered: waited for.
    pub live: bool,
}

/// Waits until every live node of the cluster — direct peers and the nodes behind
/// them — has the current local version of `path` (applied it, or
/// something newer), or until `timeout`. The barrier the ACME client uses before
/// telling the CA to validate. Direct peers are judged by their acks (and by their
/// reports, when they relay barriers); nodes further away by the reports relayed
/// back. Nodes nobody is connected to are named in the result but not waited for
/// (the CA's validator cannot reach them through the mesh either).
pub async fn wait_peers_have(shared: &Shared, path: &RelPath, timeout: Duration) -> Vec<PeerAck> {
    let start = Instant::now();
    let mut progress = shared.progress.subscribe();
    let id: u64 = rand::random();
    let ttl_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let started =
        shared
            .lock()
            .engine
            .start_barrier(id, path, ttl_ms.saturating_add(1000), now_ns());
    if !started {
        tracing::warn!(path = %path, "cluster-wide barrier not started; waiting for direct peers only");
    }
    shared.bump_progress();
    let mut acks: HashMap<DeviceId, PeerAck> = HashMap::new();
    loop {
        progress.borrow_and_update();
        let done = {
            let st = shared.lock();
            let status = if started {
                st.engine.barrier_status(id)
            } else {
                None
            };
            let status = status.unwrap_or_else(|| st.engine.direct_barrier_status(path));
            for n in &status.nodes {
                let ack = acks.entry(n.device).or_insert_with(|| PeerAck {
                    peer: n.device,
                    name: n.name.clone(),
                    after: None,
                    live: n.live,
                });
                ack.live = n.live;
                if ack.after.is_none() && n.has {
                    ack.after = Some(start.elapsed());
                }
            }
            status.done
        };
        if done {
            break;
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero()
            || tokio::time::timeout(left, progress.changed())
                .await
                .is_err()
        {
            break;
        }
    }
    if started {
        shared.lock().engine.finish_barrier(id);
    }
    let mut out: Vec<PeerAck> = acks.into_values().collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A census of the cluster (`status --cluster`): asks every node, behind hubs too,
/// whether it is in sync with each of its peers, and waits until all live ones are
/// or until `timeout`. Returns the path it was run on (our newest record) and the
/// last status; `None` when our index is empty or too many barriers run.
pub async fn census(shared: &Shared, timeout: Duration) -> Option<(RelPath, BarrierStatus)> {
    let start = Instant::now();
    let mut progress = shared.progress.subscribe();
    let id: u64 = rand::random();
    let ttl_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let path = shared
        .lock()
        .engine
        .start_census(id, ttl_ms.saturating_add(1000), now_ns())?;
    shared.bump_progress();
    let status = loop {
        progress.borrow_and_update();
        let status = shared.lock().engine.barrier_status(id);
        let left = timeout.saturating_sub(start.elapsed());
        match status {
            Some(s) if !s.done && !left.is_zero() => {
                if tokio::time::timeout(left, progress.changed())
                    .await
                    .is_err()
                {
                    break shared.lock().engine.barrier_status(id);
                }
            }
            s => break s,
        }
    };
    shared.lock().engine.finish_barrier(id);
    Some((path, status?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_strike_doubles_the_backoff_up_to_the_maximum_and_is_forgotten_later() {
        let t0 = Instant::now();
        let mut p = None;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let next = Penalty::strike(p, t0);
            waits.push(next.left(t0).as_secs());
            p = Some(next);
        }
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]);
        let long_after = p.unwrap().until + PENALTY_FORGET + Duration::from_secs(1);
        let fresh = Penalty::strike(p, long_after);
        assert_eq!((fresh.strikes, fresh.left(long_after)), (1, PENALTY_BASE));
    }
}
