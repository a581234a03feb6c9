//! The sync handle: what a peer session needs of the node, and nothing else. The
//! engine and the peer slots stay behind the state lock, which no caller holds: each
//! method is one short critical section of pure-core calls, followed by the wake-ups
//! the other tasks rely on (the puller for new needs, the senders for progress).

use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use crate::core::authorship;
use crate::core::cluster::{Confirm, Report};
use crate::core::device::DeviceId;
use crate::core::engine::{EngineError, SendToken, Transmit, Verdicts};
use crate::core::index::{LocalStat, Observed};
use crate::core::inline::InlineCache;
use crate::core::paths::RelPath;
use crate::core::pipeline::{Outcome, Pipeline, Work};
use crate::core::plan::PlanEvent;
use crate::core::record::{ContentHash, FileRecord, Kind};
use crate::disk::apply::Tree;
use crate::node::{Penalty, Session, Shared, State};

/// Close code for a duplicate (or replaced) session.
pub const CLOSE_DUPLICATE: u32 = 1;
/// Close code for a peer that sent too many refused records, and for its
/// sessions while this node backs off from it.
pub const CLOSE_REFUSING: u32 = 4;

/// The session's send state was replaced or ended: its sender stops.
#[derive(Debug)]
pub struct SessionOver;

/// A peer session's view of the node.
#[derive(Clone)]
pub struct SyncHandle(Arc<Shared>);

impl SyncHandle {
    pub fn new(shared: &Arc<Shared>) -> Self {
        SyncHandle(shared.clone())
    }

    /// This node's device ID.
    pub fn me(&self) -> DeviceId {
        self.0.me()
    }

    /// This process's random instance number (a restarted peer has a new one).
    pub fn instance(&self) -> u64 {
        self.0.instance
    }

    /// This node's configured name.
    pub fn name(&self) -> String {
        self.0.config().name.clone()
    }

    /// A number for a new session, unique in this process.
    pub fn next_session_id(&self) -> u64 {
        self.0.next_session_id()
    }

    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.0.tree.root
    }

    /// Wake-ups: the local sequence (commits) and progress (acks, connections).
    pub fn subscribe(&self) -> (watch::Receiver<u64>, watch::Receiver<u64>) {
        (self.0.changed.subscribe(), self.0.progress.subscribe())
    }

    /// Something went wrong with a peer: shown in `status` and logged.
    pub fn error(&self, msg: String) {
        self.0.lock().error(msg);
    }

    /// Recent small contents (sent inline with their records).
    pub fn inline(&self) -> MutexGuard<'_, InlineCache> {
        self.0.inline()
    }

    /// Registers a session, resolving duplicates the same way on both sides: a
    /// restarted peer (new instance) replaces the old session; between two live
    /// sessions of the same instance, the one dialled by the lower device ID stays.
    /// Returns the new session's send token, `None` when it is refused.
    pub fn start_session(
        &self,
        peer: DeviceId,
        session: &Session,
        relays_confirm: bool,
        takes_served: bool,
    ) -> Option<SendToken> {
        let me = self.me();
        let token = {
            let mut st = self.0.lock();
            let State { peers, engine, .. } = &mut *st;
            let slot = peers.get_mut(&peer)?;
            if slot
                .penalty
                .is_some_and(|p| !p.left(Instant::now()).is_zero())
            {
                session.conn.close(
                    CLOSE_REFUSING.into(),
                    b"backing off: too many refused records",
                );
                return None;
            }
            if let Some(existing) = &slot.session {
                let facts = |s: &Session| crate::core::session::SessionFacts {
                    instance: s.instance,
                    dialed_by_me: s.dialed_by_me,
                    alive: s.conn.close_reason().is_none(),
                };
                if !crate::core::session::replaces(me, peer, facts(existing), facts(session)) {
                    return None;
                }
                existing.conn.close(CLOSE_DUPLICATE.into(), b"replaced");
                crate::telemetry::session_ended(&slot.config.name, &existing.conn);
            }
            slot.session = Some(session.clone());
            slot.last_error = None;
            let token = engine.connected(peer);
            if relays_confirm {
                engine.peer_relays(peer);
            }
            if takes_served {
                engine.peer_takes_served(peer);
            }
            token
        };
        Some(token)
    }

    /// The session ended: its peer is disconnected unless a newer session replaced it.
    pub fn end_session(&self, peer: DeviceId, session_id: u64) {
        let mut needed = false;
        {
            let mut st = self.0.lock();
            let State { peers, engine, .. } = &mut *st;
            if let Some(slot) = peers.get_mut(&peer) {
                if slot.session.as_ref().is_some_and(|s| s.id == session_id) {
                    if let Some(s) = slot.session.take() {
                        crate::telemetry::session_ended(&slot.config.name, &s.conn);
                    }
                    needed = engine.disconnected(peer);
                    slot.gone.notify_waiters();
                }
            }
        }
        if needed {
            self.0.pull.notify_one();
        }
        self.0.bump_progress();
    }

    /// What to send this peer now (`Ok(None)`: nothing yet).
    pub fn poll_transmit(
        &self,
        peer: DeviceId,
        token: SendToken,
    ) -> Result<Option<Transmit>, SessionOver> {
        let mut st = self.0.lock();
        if !st.engine.is_current(&peer, token) {
            return Err(SessionOver);
        }
        Ok(st.engine.poll_transmit(peer, token))
    }

    /// Records from the peer's index (inline content already in the cache): the
    /// engine checks and learns them; the puller is woken for what is now needed.
    ///
    /// Signatures are verified before the state lock is taken, so a
    /// peer's junk stalls no other task: a short lock to learn which records differ
    /// from ours, the arithmetic with no lock, then the verdicts go in. A peer past
    /// [`crate::core::engine::MAX_REFUSED_PER_MINUTE`] is disconnected and backed
    /// off from ([`Penalty`]).
    pub fn index_received(
        &self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
        last_sequence: u64,
    ) -> Result<(), EngineError> {
        // Measured outside the lock, per frame: `[tree] min_disk_free` is checked
        // against the latest figure; signatures are verified outside it too.
        let disk = crate::disk::safe_fs::disk_space(&self.0.tree.root);
        let unchecked = self.0.lock().engine.unchecked(&records);
        let verdicts = self.verify(&records, &unchecked);
        tracing::trace!(target: crate::clock::STAGE, stage = "verified", t_us = crate::clock::mono_us());
        {
            let mut st = self.0.lock();
            if let Ok(d) = disk {
                st.engine.handle_disk_space(d);
            }
            let now = crate::clock::now_ns();
            let since = st.engine.index().sequence();
            let r =
                st.engine
                    .handle_index_checked(peer, records, verdicts, last_sequence, Some(now));
            // Renewed attestations taken in (issue 25 item 9) are persisted, then sent.
            st.commit(since, &self.0);
            report_plan_events(&mut st, peer);
            if let Err(e @ EngineError::RefusingTooMuch { .. }) = &r {
                penalize(&mut st, peer, e);
            }
            r?;
        }
        tracing::trace!(target: crate::clock::STAGE, stage = "planned", t_us = crate::clock::mono_us());
        self.0.pull.notify_one();
        self.0.bump_progress();
        Ok(())
    }

    /// Measures the tree's filesystem for `[tree] min_disk_free` (also called every
    /// few seconds, so refused paths are fetched once space returns).
    pub fn disk_measured(&self) {
        let Ok(d) = crate::disk::safe_fs::disk_space(&self.0.tree.root) else {
            return;
        };
        if self.0.lock().engine.handle_disk_space(d) {
            self.0.pull.notify_one();
            self.0.bump_progress();
        }
    }

    /// The verdict on each record marked in `unchecked`, with no state lock held
    /// (the policy copy's lock is held only to look keys up).
    fn verify(&self, records: &[(FileRecord, u64)], unchecked: &[bool]) -> Verdicts {
        if !unchecked.contains(&true) {
            return Vec::new();
        }
        let keys: Vec<_> = {
            let mut w = self.0.writers();
            records
                .iter()
                .zip(unchecked)
                .map(|((r, _), u)| u.then(|| w.key_for(r)))
                .collect()
        };
        keys.into_iter()
            .zip(records)
            .map(|(k, (r, _))| {
                k.map(|k| match k? {
                    Some(key) => authorship::verify(&key, r),
                    None => Ok(()),
                })
            })
            .collect()
    }

    /// An ack from the peer.
    pub fn ack_received(&self, peer: DeviceId, sequence: u64) -> Result<(), EngineError> {
        self.0.lock().acked(peer, sequence)?;
        self.0.bump_progress();
        Ok(())
    }

    /// A barrier request relayed by the peer.
    ///
    /// Its origin's signature is checked before the state lock is taken (issue
    /// 25); refused ones count toward the peer's refusals.
    pub fn confirm_received(&self, peer: DeviceId, c: Confirm) -> Result<(), EngineError> {
        let verified = crate::core::cluster::verify_confirm(&c);
        {
            let mut st = self.0.lock();
            let now = crate::clock::now_ns();
            let res = st.engine.handle_confirm_checked(peer, c, verified, now);
            if let Err(e @ EngineError::RefusingTooMuch { .. }) = &res {
                penalize(&mut st, peer, e);
            }
            res?;
        }
        self.0.bump_progress();
        Ok(())
    }

    /// A serving-probe report relayed by the peer, its origin's
    /// signature already checked; the senders are woken for what is relayed on.
    pub fn served_received(
        &self,
        peer: DeviceId,
        report: crate::core::served::SignedReport,
        records: Vec<crate::core::served::ServedRecord>,
    ) -> Result<(), EngineError> {
        let now_ms = crate::clock::now_ns() / 1_000_000;
        self.0
            .lock()
            .engine
            .handle_served(peer, report, records, now_ms)?;
        self.0.bump_progress();
        Ok(())
    }

    /// A barrier report from the peer, its signature checked before the state lock
    /// is taken. Refused ones count toward the peer's refusals.
    pub fn report_received(&self, peer: DeviceId, r: Report) -> Result<(), EngineError> {
        let verified = crate::core::cluster::verify_report(&r);
        {
            let mut st = self.0.lock();
            let now = crate::clock::now_ns();
            let res = st.engine.handle_report_checked(peer, r, verified, now);
            if let Err(e @ EngineError::RefusingTooMuch { .. }) = &res {
                penalize(&mut st, peer, e);
            }
            res?;
        }
        self.0.bump_progress();
        Ok(())
    }

    /// The size of `path` if this node has exactly that content indexed as a live
    /// file (what a content request may be served).
    pub fn servable(&self, path: &RelPath, hash: &[u8]) -> Option<u64> {
        let st = self.0.lock();
        st.engine
            .index()
            .get(path)
            .filter(|e| {
                !e.record.deleted
                    && e.record.kind == Kind::File
                    && e.record.hash.0.as_slice() == hash
            })
            .map(|e| e.record.size)
    }

    /// Remembers small content that came inline with a record.
    pub fn remember_inline(&self, hash: ContentHash, data: Vec<u8>) {
        self.0.inline().insert(hash, Arc::new(data));
    }
}

/// What the puller should start now: fetches (each with the connections of its
/// sources) and, when `may_apply`, a unit of ready work to apply.
pub struct PullTurn {
    pub fetches: Vec<(Work, Vec<(DeviceId, quinn::Connection)>)>,
    pub apply: Option<Vec<Work>>,
}

/// The puller's view of the node: the engine's needs in, applied outcomes out.
impl SyncHandle {
    /// Turns `true` once shutdown begins.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.0.stopping.subscribe()
    }

    /// Resolves when someone asks the puller to look again (new needs, a deferral).
    pub async fn pull_requested(&self) {
        self.0.pull.notified().await
    }

    /// The tree the puller applies into.
    pub fn tree(&self) -> &Tree {
        &self.0.tree
    }

    /// A fresh staging file name under `.certmesh/tmp/`.
    pub fn staging_path(&self) -> PathBuf {
        self.0.tree.staging_path()
    }

    /// Refills the pipeline from the engine's needs (inline content from the cache,
    /// sources among the connected peers) and takes what to start.
    pub fn pull_turn(&self, pipe: &mut Pipeline, may_apply: bool, now: Instant) -> PullTurn {
        let mut guard = self.0.lock();
        let inline = self.0.inline(); // lock order: state, then inline cache
        let State { engine, peers, .. } = &mut *guard;
        let connected = |id: &DeviceId| peers.get(id).is_some_and(|p| p.session.is_some());
        pipe.refill(engine, |h| inline.get(h), connected, now);
        let mut fetches = Vec::new();
        while let Some(w) = pipe.next_fetch() {
            let conns = w
                .sources
                .iter()
                .filter_map(|id| Some((*id, peers.get(id)?.session.as_ref()?.conn.clone())))
                .collect();
            fetches.push((w, conns));
        }
        let apply = may_apply.then(|| pipe.poll_apply(engine, now)).flatten();
        PullTurn { fetches, apply }
    }

    /// A fetch failed from every source; `local` is an error to show the operator
    /// (writing here failed), otherwise the sources did not deliver.
    pub fn fetch_failed(&self, pipe: &mut Pipeline, w: Work, local: Option<String>) {
        let mut st = self.0.lock();
        let undelivered = local.is_none();
        if let Some(e) = local {
            st.error(e);
        }
        pipe.fetch_failed(w, &mut st.engine, Instant::now(), undelivered);
    }

    /// The apply task died without outcomes: its paths are taken again later.
    pub fn apply_lost(&self, pipe: &mut Pipeline) {
        pipe.apply_lost(&mut self.0.lock().engine, Instant::now());
    }

    /// Records an applied unit in the index, tells the peers (after the persister),
    /// asks the scanner for deferred paths and the repairer for touched certificates.
    pub fn record_applied(&self, pipe: &mut Pipeline, done: Vec<(Work, Outcome)>) {
        tracing::trace!(n = done.len(), "applied to disk");
        let (rescan, touched, writer) = {
            let mut st = self.0.lock();
            let since = st.engine.index().sequence();
            let rec = pipe.applied(done, &mut st.engine, Instant::now(), crate::clock::now_ns());
            for p in &rec.applied {
                tracing::debug!(path = %p, "applied");
            }
            for p in &rec.rescan {
                tracing::debug!(path = %p, "deferred");
            }
            for (p, why) in rec.failed {
                st.error(format!("applying {p}: {why}"));
            }
            let mut rescan = rec.rescan;
            rescan.append(&mut st.engine.take_rescans_after_apply());
            st.commit(since, &self.0);
            tracing::trace!(target: crate::clock::STAGE, stage = "recorded", t_us = crate::clock::mono_us());
            (rescan, rec.applied, st.engine.is_writer())
        };
        if !rescan.is_empty() {
            let _ = self.0.rescan.send(rescan);
        }
        let config = self.0.config();
        let repaired = |n: &str| writer && config.certificates.iter().any(|c| c.name == n);
        self.0.repairs.touched(repaired, &touched);
        self.0.bump_progress();
    }
}

/// The scanner's view of the node: what the index holds, and observations in.
impl SyncHandle {
    /// Counts one rescan (`status`: an idle node does none).
    pub fn count_scan(&self) {
        self.0
            .scans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every path in the index (deleted ones too).
    pub fn indexed_paths(&self) -> Vec<RelPath> {
        let st = self.0.lock();
        st.engine
            .index()
            .entries()
            .map(|e| e.record.path.clone())
            .collect()
    }

    /// The indexed paths under `dir`.
    pub fn indexed_within(&self, dir: &RelPath) -> Vec<RelPath> {
        self.0.lock().engine.index().paths_within(dir)
    }

    /// Whether the puller is writing `path` now; if so, the scanner looks again once
    /// the apply is done.
    pub fn defer_if_applying(&self, path: &RelPath) -> bool {
        self.0.lock().engine.defer_if_applying(path)
    }

    /// Whether a file's stat matches what the index holds (no need to hash it).
    pub fn unchanged(&self, path: &RelPath, stat: &LocalStat) -> bool {
        self.0.lock().engine.index().unchanged(path, stat)
    }

    /// A path the scanner will not sync (`why`). Returns whether to treat it as
    /// removed: only when the index holds a live version of it, which peers must
    /// then see deleted; a path never synced is only warned about.
    pub fn not_synced(&self, path: &RelPath, why: &str) -> bool {
        let mut st = self.0.lock();
        if st.engine.index().get(path).is_none_or(|e| e.record.deleted) {
            // Also on full rescans (start, then hourly): a link made in the tree
            // that breaks the link rules must be seen by the operator.
            tracing::warn!(path = %path, %why, "not synced");
            return false;
        }
        st.error(format!("{path}: {why}; treating as removed"));
        true
    }

    /// Asks the scanner to look at these paths again shortly.
    pub fn rescan_later(&self, paths: Vec<RelPath>) {
        let _ = self.0.rescan.send(paths);
    }

    /// Gives the scanner's observations (`None`: gone) to the engine under one lock,
    /// commits, and wakes the puller and the peer senders.
    pub fn observed(&self, observed: Vec<(RelPath, Option<Observed>)>, errors: Vec<String>) {
        let (changed, put_back) = {
            let mut st = self.0.lock();
            for e in errors {
                st.error(format!("scan: {e}"));
            }
            tracing::trace!(target: crate::clock::STAGE, stage = "locked", t_us = crate::clock::mono_us());
            let since = st.engine.index().sequence();
            let not_sent = st.engine.not_sent().count;
            let now = crate::clock::now_ns();
            let mut changed = 0;
            for (p, obs) in observed {
                if st.engine.defer_if_applying(&p) {
                    continue;
                }
                if let Some(r) = st.engine.observe(&p, obs, now) {
                    tracing::trace!(target: crate::clock::STAGE, stage = "signed", path = %p, t_us = crate::clock::mono_us());
                    tracing::debug!(path = %p, deleted = r.deleted, "local change");
                    changed += 1;
                }
            }
            if changed > 0 {
                tracing::info!(changed, "local changes");
            }
            // A reader's local changes are not sent but put back by the puller.
            let put_back = st.engine.not_sent().count != not_sent;
            if put_back {
                tracing::info!(
                    "local changes not sent: this node is not a writer; putting the writers' version back"
                );
            }
            st.commit(since, &self.0);
            tracing::trace!(target: crate::clock::STAGE, stage = "committed", t_us = crate::clock::mono_us());
            (changed, put_back)
        };
        if put_back || changed > 0 {
            self.0.pull.notify_one();
        }
        if changed > 0 {
            self.0.bump_progress();
        }
    }
}

/// Ends `peer`'s session for `why` and backs off from it (each strike doubles the
/// wait): named in the log, in `status` errors and in the peer's `last_error`.
fn penalize(st: &mut State, peer: DeviceId, why: &EngineError) {
    let now = Instant::now();
    let Some(slot) = st.peers.get_mut(&peer) else {
        return;
    };
    let p = Penalty::strike(slot.penalty, now);
    slot.penalty = Some(p);
    let msg = format!(
        "{why}; disconnected, no session for {} s (strike {})",
        p.left(now).as_secs(),
        p.strikes
    );
    slot.last_error = Some(msg.clone());
    if let Some(s) = &slot.session {
        s.conn
            .close(CLOSE_REFUSING.into(), b"too many refused records");
    }
    let name = slot.config.name.clone();
    st.error(format!("peer {name} ({peer}): {msg}"));
}

/// Logs what the plan decided about a peer's records: each file too large once per
/// content, a full index once.
fn report_plan_events(st: &mut State, peer: DeviceId) {
    for e in st.engine.take_events() {
        match e {
            PlanEvent::TooLarge { path, size, max } => tracing::warn!(
                peer = %peer, path = %path, size, max_file_size = max,
                "file larger than max_file_size: not fetched (acknowledged as refused)"
            ),
            PlanEvent::NotAuthorized {
                path,
                author,
                why,
                count,
            } => {
                let author = author.map_or_else(|| "nobody".to_string(), |a| a.to_string());
                st.error(format!(
                    "peer {} sent {count} record(s) not taken in for their authorship \
                     (first: {path}, claiming {author}: {why})",
                    st.peers.get(&peer).map_or_else(
                        || peer.to_string(),
                        |s| format!("{} ({peer})", s.config.name)
                    )
                ));
            }
            PlanEvent::OverBudget {
                path,
                refusal,
                total,
            } => {
                let from = refusal.peer.unwrap_or(peer);
                tracing::warn!(
                    peer = %from, path = %path, size = refusal.size,
                    budget = refusal.reason.key(), refused_since_start = total,
                    "over a tree budget: not fetched (acknowledged as refused)"
                );
            }
            PlanEvent::IndexFull { path } => st.error(format!(
                "the index holds {} records: new paths from peers are not taken in \
                 (first: {path} from {peer})",
                crate::core::index::MAX_INDEX_RECORDS
            )),
        }
    }
}
