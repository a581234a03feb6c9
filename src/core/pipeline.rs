//! The puller's decisions, without I/O: which needs to take (and from which peers),
//! when ready work is applied and in what units, how a symlink waits for its target's
//! content, and when a failed item is retried. The daemon's `pull` task does the
//! fetching (QUIC) and applying (disk) it is told to; the simulator drives the same
//! code with instant fetches and an in-memory tree.
//!
//! Small changes have their own lane ([`is_small`]: anything under `.certmesh/`,
//! `acme/` or `live/`, any file under 64 KiB, links, directories, deletions): they are
//! taken even when the bulk's fetch queue is full, fetched first on slots of their
//! own, and applied in a unit of their own at once, never behind a bulk transfer.
//!
//! Paths taken here are marked in the engine's set of paths being applied
//! ([`Engine::applying`]), which the scanner also asks: a path in flight is rescanned
//! only after its apply, so our own writes are never announced as local changes.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::device::DeviceId;
use crate::core::engine::Engine;
use crate::core::fair::Fair;
use crate::core::index::LocalStat;
use crate::core::paths::RelPath;
use crate::core::plan::{Need, Plan};
use crate::core::record::{ContentHash, FileRecord, Kind};

/// How often retries of paths no longer needed are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// A file smaller than this is a small change (see [`is_small`]).
pub const SMALL_FILE: u64 = 64 << 10;
/// Fetches of small changes that may run beyond `parallel_fetches`.
const SMALL_LANE_FETCHES: usize = 8;
/// Small changes that may be in flight beyond `in_flight`.
const SMALL_LANE_IN_FLIGHT: usize = 1024;
/// Urgent paths (`.certmesh/`, `acme/`, `live/`) that may be in flight beyond that.
const URGENT_IN_FLIGHT: usize = 256;

/// The lanes of ready work, in the order their units go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lane {
    Bulk,
    Small,
    Urgent,
}

/// Whether a record is a small change, which never waits behind a bulk transfer: the
/// cluster's own state (`.certmesh/`), ACME challenges (`acme/`), the live links
/// (`live/`), any file under [`SMALL_FILE`], and what carries no content (links,
/// directories, deletions).
pub fn is_small(r: &FileRecord) -> bool {
    r.kind != Kind::File || r.deleted || is_small_file(&r.path, r.size)
}

/// Whether a file of `size` bytes at `p` is a small change (see [`is_small`]).
pub fn is_small_file(p: &RelPath, size: u64) -> bool {
    size < SMALL_FILE || is_urgent(p)
}

/// Whether a path is the cluster's own state, an ACME challenge or a live link: first
/// in the small lane too (ahead of a burst of other small files).
fn is_urgent(p: &RelPath) -> bool {
    URGENT_DIRS.iter().any(|d| {
        p.as_str()
            .strip_prefix(d)
            .is_some_and(|r| r.starts_with('/'))
    })
}

/// Links the urgent lane looks at per refill (with what their targets need).
const LINKS_PER_REFILL: usize = 256;

/// The directories of urgent paths.
const URGENT_DIRS: [&str; 3] = [".certmesh", "acme", "live"];

/// What happened to one item of an applied unit.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; the stat of what is on disk now (`None` for a deletion).
    Applied(Option<LocalStat>),
    /// Not applied now, try again later (local change pending, link target missing,
    /// directory not empty).
    Deferred(String),
    /// An I/O error (disk full, permissions): reported, old content intact.
    Failed(String),
}

/// The pipeline's sizes and delays.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most records in flight (queued, fetching, ready or being applied).
    pub in_flight: usize,
    /// Most records applied as one unit.
    pub batch_items: usize,
    /// While fetches still run, ready work is applied once there is this much of it
    /// (items or bytes), or once the oldest has waited `apply_delay`: fewer, larger
    /// units (one syncfs each) during a bulk transfer; a lone change goes at once.
    pub apply_items: usize,
    pub apply_bytes: u64,
    pub apply_delay: Duration,
    /// Concurrent fetches.
    pub parallel_fetches: usize,
    /// Most fetches queued or running whose first source is one peer: a peer that
    /// announces more than it serves (a flood of unfetchable records) cannot take
    /// every slot and starve the needs other peers can serve.
    pub per_peer_fetches: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        in_flight: 8192,
        batch_items: 4096,
        apply_items: 1024,
        apply_bytes: 64 << 20,
        apply_delay: Duration::from_millis(200),
        parallel_fetches: 32,
        per_peer_fetches: 256,
    };
}

/// One need on its way: fetched (unless its content is here or came inline), then
/// applied as part of a unit.
#[derive(Debug)]
pub struct Work {
    pub need: Need,
    /// What the scanner last saw at the path: the apply refuses to overwrite a
    /// local change made since.
    pub expect: Option<LocalStat>,
    /// The author of the live local record the need replaces (for the kept version).
    pub replaces_author: Option<crate::core::device::ShortId>,
    /// Connected peers to fetch from, in order; empty when no fetch is needed.
    pub sources: Vec<DeviceId>,
    /// The content, when it came inline with the record.
    pub inline: Option<Arc<Vec<u8>>>,
    /// Fetched content waiting in staging.
    pub staged: Option<PathBuf>,
}

impl Work {
    pub fn path(&self) -> &RelPath {
        &self.need.target.path
    }

    /// A symlink to a directory whose content may still have to arrive.
    fn link_target(&self) -> Option<RelPath> {
        link_target(&self.need.target)
    }
}

/// Where a symlink record points, when it is a live link (the directory it names may
/// still need content).
fn link_target(r: &FileRecord) -> Option<RelPath> {
    if r.kind != Kind::Symlink || r.deleted {
        return None;
    }
    r.path.resolve_symlink_target(&r.target).ok()
}

/// Whether something `target` still needs is not in flight: a link to it taken now
/// could not go in a unit, only be released again (see [`Pipeline::poll_apply`]).
fn target_waits(plan: &Plan, target: &RelPath, in_flight: &HashSet<RelPath>) -> bool {
    plan.needs_within(target).any(|p| !in_flight.contains(p))
}

/// What recording an applied unit did, for the caller to report.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Paths now as their need asked.
    pub applied: Vec<RelPath>,
    /// Deferred paths: look at them again (a local change may be why).
    pub rescan: Vec<RelPath>,
    /// Paths that failed, with why.
    pub failed: Vec<(RelPath, String)>,
}

/// Most paths backing off after a failed fetch (pending retries). Peers' needs are
/// bounded by their view caps already; this bounds the retry table on its own, so a
/// peer that announces paths it never serves cannot grow it past a few MiB.
pub const MAX_RETRIES: usize = 1 << 16;

/// The puller's state between events.
#[derive(Debug)]
pub struct Pipeline {
    limits: Limits,
    /// Per path: not before, and how many failures in a row (backoff 0.5 s … 32 s).
    retry: HashMap<RelPath, (Instant, u32)>,
    /// Needs no source delivered, by when they are tried again: then they count
    /// against the tree budgets again ([`Plan::reclaim`]) before they are taken.
    undelivered: BTreeSet<(Instant, RelPath)>,
    /// Fetches waiting for a slot, taking turns by first source ([`Fair`]).
    queued: Fair<Option<DeviceId>, Work>,
    /// The small lane's fetches, started before `queued`'s on slots of their own.
    small_queued: Fair<Option<DeviceId>, Work>,
    fetching: usize,
    /// Of `fetching`, the small lane's.
    small_fetching: usize,
    /// Queued or running fetches per first source.
    /// Keyed by lane too (true: the small lane), so a peer's bulk at its cap never
    /// holds up the same peer's small changes.
    per_peer: HashMap<(DeviceId, bool), usize>,
    /// Urgent work at the front (units are taken from there).
    ready: VecDeque<Work>,
    ready_bytes: u64,
    ready_since: Option<Instant>,
    /// A unit is being applied.
    applying: bool,
    /// Its paths (given back by [`Pipeline::apply_lost`] if the apply dies).
    unit: Vec<RelPath>,
    /// The needs may have changed: take again.
    dirty: bool,
    /// The same, for the small lane (taken even while the bulk's queue is full).
    small_dirty: bool,
    /// The small changes ready could not go in a unit of their own (links waiting
    /// for their targets): not tried again until more is ready or a unit applied.
    small_stalled: bool,
    /// Where the urgent lane's look at links stopped in each of [`URGENT_DIRS`]
    /// ([`LINKS_PER_REFILL`]); the next refill resumes after it.
    link_cursor: [Option<RelPath>; URGENT_DIRS.len()],
    /// When `refill` last took: retries due by then were considered, so only later
    /// ones need a timer.
    last_refill: Option<Instant>,
    /// When retries of paths no longer needed were last dropped.
    last_prune: Option<Instant>,
    /// Test fault: a failed fetch stays in flight, so a test can prove the
    /// simulator runs this code.
    #[cfg(test)]
    pub(crate) break_failures: bool,
}

impl Pipeline {
    pub fn new(limits: Limits) -> Self {
        Pipeline {
            limits,
            retry: HashMap::new(),
            undelivered: BTreeSet::new(),
            queued: Fair::default(),
            small_queued: Fair::default(),
            fetching: 0,
            small_fetching: 0,
            per_peer: HashMap::new(),
            ready: VecDeque::new(),
            ready_bytes: 0,
            ready_since: None,
            applying: false,
            unit: Vec::new(),
            dirty: true,
            small_dirty: true,
            small_stalled: false,
            link_cursor: Default::default(),
            last_refill: None,
            last_prune: None,
            #[cfg(test)]
            break_failures: false,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The needs or the connected peers changed (or a timer fired): take again.
    pub fn wake(&mut self) {
        self.dirty = true;
        self.small_dirty = true;
    }

    /// Nothing queued, fetching, ready or being applied.
    pub fn is_idle(&self) -> bool {
        self.queued.is_empty()
            && self.small_queued.is_empty()
            && self.fetching == 0
            && self.ready.is_empty()
            && !self.applying
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.small_queued.len() + self.fetching + self.ready.len()
    }

    /// Takes needs that are not in flight, not waiting for a retry, and fetchable
    /// from a `connected` peer (or needing no fetch: a deletion, a link, content we
    /// have, or content `inline` has), marking them in `in_flight`. Does nothing
    /// unless woken since the last take and there is room. Urgent paths are looked up
    /// first (cheaply: the needs are sorted by path) and taken whatever the queues
    /// hold; other small changes while the small lane's queue runs short, even when
    /// the bulk's is full.
    pub fn refill(
        &mut self,
        engine: &mut Engine,
        inline: impl Fn(&ContentHash) -> Option<Arc<Vec<u8>>>,
        connected: impl Fn(&DeviceId) -> bool,
        now: Instant,
    ) {
        // Undelivered needs due again hold their room under the budgets again.
        while let Some((t, _)) = self.undelivered.first() {
            if *t > now {
                break;
            }
            if let Some((_, p)) = self.undelivered.pop_first() {
                engine.reclaim(&p);
            }
        }
        // Room in flight: the bulk's, then the small lane's extra, then a last reserve
        // for urgent paths (not taken by a burst of other small files).
        let free = |extra: usize| (self.limits.in_flight + extra).saturating_sub(self.in_flight());
        let (room, small_room) = (free(0), free(SMALL_LANE_IN_FLIGHT));
        let urgent_room = free(SMALL_LANE_IN_FLIGHT + URGENT_IN_FLIGHT);
        // A scan of every need (a peer at its fetch cap has its needs skipped, not
        // ended on) runs only while a lane's queue runs short, as fetches drain it.
        let parallel = self.limits.parallel_fetches;
        let bulk = self.dirty && self.queued.len() + self.small_queued.len() < parallel && room > 0;
        let small = self.small_dirty && self.small_queued.len() < parallel && small_room > 0;
        let urgent = self.small_dirty && urgent_room > 0;
        if !bulk && !small && !urgent {
            return;
        }
        self.small_dirty = false;
        if bulk {
            self.dirty = false;
            self.last_refill = Some(now);
        }
        let (plan, index, in_flight) = engine.pipeline_parts();
        // A path no longer needed (a newer record arrived, or ours won) keeps no
        // retry. At most once a second: under a flood of unfetchable needs there are
        // thousands of retries and a refill after every failed fetch.
        if self.last_prune.is_none_or(|t| now >= t + PRUNE_EVERY) {
            self.last_prune = Some(now);
            self.retry.retain(|p, _| plan.need(p).is_some());
        }
        let mut taken = 0;
        let take = |this: &mut Self, need: &Need, in_flight: &mut HashSet<RelPath>| {
            usize::from(this.take(need, plan, index, in_flight, &inline, &connected, now))
        };
        if urgent {
            // Links looked at go up to a budget per refill, resuming where the last
            // stopped: a join of 3,000 certificates refilled after each small unit,
            // each time looking at every `live/` link's target (issue 29).
            for (d, dir) in URGENT_DIRS.iter().enumerate() {
                let dir = RelPath::parse(dir).expect("a valid path");
                let cursor = self.link_cursor[d].take();
                let mut links = 0;
                for (path, need) in plan.needs_within_from(&dir, cursor.as_ref()) {
                    if taken >= urgent_room {
                        break;
                    }
                    if in_flight.contains(path) {
                        continue;
                    }
                    // A link brings what its target still needs into this lane, so
                    // a `live/` flip and its archive version arrive together.
                    if let Some(t) = link_target(&need.target) {
                        if links == LINKS_PER_REFILL {
                            self.link_cursor[d] = Some(path.clone());
                            break;
                        }
                        links += 1;
                        let missing: Vec<&Need> = plan
                            .needs_within(&t)
                            .filter(|p| !in_flight.contains(*p))
                            .filter_map(|p| plan.need(p))
                            .collect();
                        for m in missing {
                            if taken >= urgent_room {
                                break;
                            }
                            taken += take(self, m, in_flight);
                        }
                    }
                    taken += take(self, need, in_flight);
                }
            }
        }
        if !bulk && !small {
            return;
        }
        for need in plan.needs() {
            let lane_has_room = match (bulk && taken < room, small && taken < small_room) {
                (true, _) => true,
                (false, false) => break,
                (false, true) => is_small(&need.target),
            };
            if lane_has_room {
                taken += take(self, need, in_flight);
            }
        }
    }

    /// Takes one need unless it is in flight, waiting for a retry, or has no
    /// connected source with room in its lane; true if taken.
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        need: &Need,
        plan: &Plan,
        index: &crate::core::index::Index,
        in_flight: &mut HashSet<RelPath>,
        inline: &impl Fn(&ContentHash) -> Option<Arc<Vec<u8>>>,
        connected: &impl Fn(&DeviceId) -> bool,
        now: Instant,
    ) -> bool {
        let p = &need.target.path;
        if in_flight.contains(p) || self.retry.get(p).is_some_and(|(t, _)| *t > now) {
            return false;
        }
        // A link waits untaken until everything its target needs is in flight (issue 29: taken
        // early, 10,000 joining `live/` links were taken and released again and again).
        if link_target(&need.target).is_some_and(|t| target_waits(plan, &t, in_flight)) {
            return false;
        }
        let local = index.get(p);
        // What the disk must still hold for the write to go ahead: the local
        // record's stat (a reader's file on a path the writers deleted, too).
        let expect = local
            .filter(|e| !e.record.deleted || plan.is_reverting(p))
            .and_then(|e| e.stat);
        let have_content = local.is_some_and(|e| {
            !e.record.deleted && e.record.kind == Kind::File && e.record.hash == need.target.hash
        }) && !plan.reverting_content(p);
        let wants_content = need.target.kind == Kind::File && !need.target.deleted && !have_content;
        let inline = wants_content.then(|| inline(&need.target.hash)).flatten();
        let mut sources = Vec::new();
        if wants_content && inline.is_none() {
            // Every connected peer at its cap in this lane: no source could take it,
            // and finding its sources costs a lookup per peer (issue 29: a join's
            // refills spent a fifth of their time so).
            let (cap, lane) = (self.limits.per_peer_fetches, is_small(&need.target));
            let room = |id: &DeviceId| self.per_peer.get(&(*id, lane)).copied().unwrap_or(0) < cap;
            if !plan.peer_ids().any(|id| connected(id) && room(id)) {
                return false;
            }
            sources = plan
                .sources(need)
                .into_iter()
                .filter(|id| connected(id))
                .collect();
            if sources.is_empty() {
                return false; // no connected peer has it; woken again when one connects
            }
            // Prefer a source with room in this lane; none: it waits (not taken).
            let (cap, lane) = (self.limits.per_peer_fetches, is_small(&need.target));
            let count = |id: &DeviceId| self.per_peer.get(&(*id, lane)).copied();
            match sources.iter().position(|id| count(id).unwrap_or(0) < cap) {
                Some(0) => {}
                Some(i) => sources.swap(0, i),
                None => return false,
            }
            *self.per_peer.entry((sources[0], lane)).or_default() += 1;
        }
        in_flight.insert(p.clone());
        let replaces_author = local
            .filter(|e| !e.record.deleted)
            .map(|e| e.record.modified_by);
        let w = Work {
            need: need.clone(),
            expect,
            replaces_author,
            sources,
            inline,
            staged: None,
        };
        let first = w.sources.first().copied();
        if w.sources.is_empty() {
            self.push_ready(w, now);
        } else if is_urgent(w.path()) {
            self.small_queued.push_front(first, w);
        } else if is_small(&w.need.target) {
            self.small_queued.push_back(first, w);
        } else {
            self.queued.push_back(first, w);
        }
        true
    }

    fn push_ready(&mut self, w: Work, now: Instant) {
        self.ready_bytes += w.need.target.size;
        self.ready_since.get_or_insert(now);
        self.small_stalled &= !is_small(&w.need.target);
        // Units are taken from the front: the urgent ones go in the next.
        match is_urgent(w.path()) {
            true => self.ready.push_front(w),
            false => self.ready.push_back(w),
        }
    }

    /// The next work to fetch: a small change first, while fewer than
    /// `parallel_fetches` plus the small lane's own slots run in all; else a bulk one
    /// while fewer than `parallel_fetches` of the bulk's run (and the same total).
    pub fn next_fetch(&mut self) -> Option<Work> {
        let slots = self.limits.parallel_fetches;
        if self.fetching >= slots + SMALL_LANE_FETCHES {
            return None;
        }
        if let Some(w) = self.small_queued.pop_front() {
            self.fetching += 1;
            self.small_fetching += 1;
            return Some(w);
        }
        if self.fetching - self.small_fetching >= slots {
            return None;
        }
        let w = self.queued.pop_front()?;
        self.fetching += 1;
        Some(w)
    }

    /// A fetch ended (either way): its slot is free.
    fn fetch_ended(&mut self, w: &Work) {
        self.fetching = self.fetching.saturating_sub(1);
        if is_small(&w.need.target) {
            self.small_fetching = self.small_fetching.saturating_sub(1);
        }
        self.release_source(w);
    }

    /// A fetch finished: its content waits in `staged`.
    pub fn fetched(&mut self, mut w: Work, staged: PathBuf, now: Instant) {
        self.fetch_ended(&w);
        w.staged = Some(staged);
        self.push_ready(w, now);
    }

    /// A fetch failed (every source tried): retried later. `undelivered`: the sources
    /// did not deliver (not a local failure to write), so until it is retried the
    /// need holds no room under the tree budgets ([`Plan::undelivered`]).
    pub fn fetch_failed(&mut self, w: Work, engine: &mut Engine, now: Instant, undelivered: bool) {
        self.fetch_ended(&w);
        self.later(w.path(), now);
        if undelivered {
            engine.undelivered(w.path());
            let due = self.retry.get(w.path()).map_or(now, |(t, _)| *t);
            self.undelivered.insert((due, w.path().clone()));
        }
        let (_, _, in_flight) = engine.pipeline_parts();
        #[cfg(test)]
        if self.break_failures {
            return;
        }
        in_flight.remove(w.path());
        self.dirty = true;
    }

    /// The next unit to apply, if one should go now: when nothing is being applied
    /// and either nothing else is coming, or enough is ready, or the oldest ready
    /// work waited `apply_delay` — or, at once, a unit of the small changes ready
    /// (the bulk's ready work keeps waiting for its own turn). A symlink goes only with the last of what its
    /// target still needs: it keeps waiting while that is in flight, and is released
    /// (taken again later) when some of it is not in flight at all.
    pub fn poll_apply(&mut self, engine: &mut Engine, now: Instant) -> Option<Vec<Work>> {
        let (plan, _, in_flight) = engine.pipeline_parts();
        let l = &self.limits;
        let due = self.ready_since.is_some_and(|t| t + l.apply_delay <= now);
        let bulk_go =
            (self.fetching == 0 && self.queued.is_empty() && self.small_queued.is_empty())
                || self.ready.len() >= l.apply_items
                || self.ready_bytes >= l.apply_bytes
                || due;
        // Which unit goes: urgent paths alone and at once; else the bulk's when due
        // (everything ready, from the front); else the small changes alone, at once.
        let lane = |w: &Work| match (is_urgent(w.path()), is_small(&w.need.target)) {
            (true, _) => Lane::Urgent,
            (false, true) => Lane::Small,
            (false, false) => Lane::Bulk,
        };
        let top = match self.small_stalled {
            true => None,
            false => self.ready.iter().map(lane).max(),
        };
        let pick = match top {
            Some(Lane::Urgent) => Some(Lane::Urgent),
            _ if bulk_go => Some(Lane::Bulk),
            Some(Lane::Small) => Some(Lane::Small),
            _ => None,
        };
        let pick = pick.filter(|_| !self.applying && !self.ready.is_empty())?;
        let all = pick == Lane::Bulk;
        let waiting_since = self.ready_since;
        let mut batch: Vec<Work> = if all {
            // Small changes ready go in this unit, whatever its size cap leaves out.
            self.ready
                .make_contiguous()
                .sort_by_cached_key(|w| std::cmp::Reverse(lane(w)));
            let n = self.ready.len().min(l.batch_items);
            self.ready.drain(..n).collect()
        } else {
            // With a link of this lane goes what of its target is ready (a `live/`
            // flip and its archive version apply as one unit).
            // A set, looked up by each path's ancestors: with 10,000 `live/` links
            // ready in a join, a scan of the targets per ready path was O(ready ×
            // links) string compares per unit (issue 29).
            let targets: HashSet<RelPath> = self
                .ready
                .iter()
                .filter(|w| lane(w) >= pick)
                .filter_map(Work::link_target)
                .collect();
            let goes = |w: &Work| lane(w) >= pick || within_any(w.path(), &targets);
            let (first, rest): (VecDeque<Work>, VecDeque<Work>) =
                std::mem::take(&mut self.ready).into_iter().partition(goes);
            let mut first = Vec::from(first);
            self.ready = rest;
            if first.len() > l.batch_items {
                self.ready.extend(first.drain(l.batch_items..));
            }
            first
        };
        let in_batch: HashSet<RelPath> = batch.iter().map(|w| w.path().clone()).collect();
        let mut keep = Vec::new();
        let mut released = false;
        let mut i = 0;
        while i < batch.len() {
            let Some(target) = batch[i].link_target() else {
                i += 1;
                continue;
            };
            let mut missing = plan
                .needs_within(&target)
                .filter(|p| !in_batch.contains(*p));
            let mut any_missing = false;
            let all_in_flight = missing.all(|p| {
                any_missing = true;
                in_flight.contains(p)
            });
            if !any_missing {
                i += 1;
            } else if all_in_flight {
                keep.push(batch.swap_remove(i));
            } else {
                let w = batch.swap_remove(i);
                in_flight.remove(w.path());
                released = true;
            }
        }
        self.ready.extend(keep);
        self.ready_bytes = self.ready.iter().map(|w| w.need.target.size).sum();
        // What stays (links waiting for their targets) waits for the next round; the
        // bulk's ready work left by a small unit keeps its place in time.
        self.ready_since = match (self.ready.is_empty(), all) {
            (true, _) => None,
            (false, true) => Some(now),
            (false, false) => waiting_since.or(Some(now)),
        };
        self.dirty = true;
        // Released links are taken again by the small lane; a stalled small unit
        // (links still waiting) costs no scan.
        self.small_dirty |= released || !batch.is_empty();
        if batch.is_empty() {
            self.small_stalled = !all;
            return None;
        }
        self.applying = true;
        self.unit = batch.iter().map(|w| w.path().clone()).collect();
        Some(batch)
    }

    /// A unit was applied (`results`: each work with its outcome): applied records
    /// become local ones in `engine`; deferred and failed ones are retried later;
    /// when anything was applied, waiting retries go at once (a link's target may be
    /// there now). `now_ns` is the wall clock the index records as learned.
    pub fn applied(
        &mut self,
        results: Vec<(Work, Outcome)>,
        engine: &mut Engine,
        now: Instant,
        now_ns: i64,
    ) -> Recorded {
        self.applying = false;
        self.unit.clear();
        self.dirty = true;
        self.small_dirty = true;
        self.small_stalled = false;
        let mut out = Recorded::default();
        for (w, outcome) in results {
            let p = w.need.target.path.clone();
            engine.pipeline_parts().2.remove(&p);
            match outcome {
                Outcome::Applied(stat) => {
                    self.retry.remove(&p);
                    engine.applied(w.need.target, stat, now_ns);
                    out.applied.push(p);
                }
                Outcome::Deferred(_) => {
                    self.later(&p, now);
                    out.rescan.push(p);
                }
                Outcome::Failed(why) => {
                    self.later(&p, now);
                    out.failed.push((p, why));
                }
            }
        }
        if !out.applied.is_empty() {
            for (t, _) in self.retry.values_mut() {
                *t = (*t).min(now);
            }
        }
        out
    }

    /// The apply task died without outcomes: its paths are no longer in flight and
    /// are taken again after the retry delay.
    pub fn apply_lost(&mut self, engine: &mut Engine, now: Instant) {
        self.applying = false;
        self.dirty = true;
        self.small_dirty = true;
        let (_, _, in_flight) = engine.pipeline_parts();
        for p in std::mem::take(&mut self.unit) {
            in_flight.remove(&p);
            self.later(&p, now);
        }
    }

    /// When a timer should wake the pipeline: the next retry not yet due at the last
    /// take, or when ready work waiting for more has waited long enough. (A retry
    /// already due was considered then; waking for it again would spin.)
    pub fn next_wake(&self) -> Option<Instant> {
        let due = self
            .ready_since
            .filter(|_| !self.applying)
            .map(|t| t + self.limits.apply_delay);
        let retry = self
            .retry
            .values()
            .map(|(t, _)| *t)
            .filter(|t| self.last_refill.is_none_or(|r| *t > r))
            .min();
        due.into_iter().chain(retry).min()
    }

    /// Ends the pipeline: everything queued or ready is dropped (its staged files
    /// are returned for removal).
    pub fn drain_staged(&mut self) -> Vec<PathBuf> {
        self.queued.clear();
        self.small_queued.clear();
        self.per_peer.clear();
        self.ready.drain(..).filter_map(|w| w.staged).collect()
    }

    fn release_source(&mut self, w: &Work) {
        if let Some(first) = w.sources.first() {
            let key = (*first, is_small(&w.need.target));
            if let Some(n) = self.per_peer.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_peer.remove(&key);
                }
            }
        }
    }

    /// Backs `p` off after a failure. At [`MAX_RETRIES`] paths backing off, paths no
    /// longer needed are dropped first; if it is still full, `p` is not remembered
    /// (it is taken again at a later refill, which failed fetches pace).
    fn later(&mut self, p: &RelPath, now: Instant) {
        if self.retry.len() >= MAX_RETRIES && !self.retry.contains_key(p) {
            self.retry.retain(|_, (t, _)| *t > now);
            if self.retry.len() >= MAX_RETRIES {
                return;
            }
        }
        let e = self.retry.entry(p.clone()).or_insert((now, 0));
        e.1 = (e.1 + 1).min(7);
        e.0 = now + Duration::from_millis(250 << e.1);
    }
}

/// Whether `p` is one of `dirs` or lies below one (each of its ancestors looked up).
fn within_any(p: &RelPath, dirs: &HashSet<RelPath>) -> bool {
    let s = p.as_str();
    !dirs.is_empty()
        && (dirs.contains(s) || s.match_indices('/').any(|(i, _)| dirs.contains(&s[..i])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::device::ShortId;
    use crate::core::index::Index;
    use crate::core::record::FileRecord;

    #[test]
    fn within_any_finds_a_path_itself_and_below_but_not_a_sibling_with_the_same_prefix() {
        let dirs: HashSet<RelPath> = ["archive/www/2", "x"]
            .iter()
            .map(|p| RelPath::parse(p).unwrap())
            .collect();
        let within = |p: &str| within_any(&RelPath::parse(p).unwrap(), &dirs);
        assert!(within("archive/www/2") && within("archive/www/2/cert.pem") && within("x/y/z"));
        assert!(!within("archive/www/20/cert.pem") && !within("archive/www") && !within("xy"));
        assert!(!within_any(&RelPath::parse("x").unwrap(), &HashSet::new()));
    }

    #[test]
    fn pending_retries_are_capped_under_a_flood_of_failures() {
        let mut p = Pipeline::new(limits());
        let now = Instant::now();
        for i in 0..MAX_RETRIES + 5_000 {
            p.later(&RelPath::parse(&format!("f/{i}")).unwrap(), now);
        }
        assert_eq!(p.retry.len(), MAX_RETRIES);
        // Once the backoffs are due, room is made for new failures.
        let later = now + Duration::from_secs(60);
        p.later(&RelPath::parse("g").unwrap(), later);
        assert_eq!(p.retry.len(), 1);
    }

    fn peer() -> DeviceId {
        DeviceId([9; 32])
    }

    /// An engine with a connected peer that announced `files` (new to us).
    /// An engine needing `files` and a pipeline that has taken them in, at `t0`.
    fn refilled(files: &[(&str, u8)]) -> (Engine, Pipeline, Instant) {
        let mut e = engine_needing(files);
        let (mut p, t0) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |_| true, t0);
        (e, p, t0)
    }

    /// As [`engine_needing_sized`], every file of the bulk's size.
    fn engine_needing(files: &[(&str, u8)]) -> Engine {
        let sized: Vec<(&str, u8, u64)> = files.iter().map(|(p, b)| (*p, *b, SMALL_FILE)).collect();
        engine_needing_sized(&sized)
    }

    /// An engine with a connected peer that announced `files` (path, content byte,
    /// size), new to us.
    fn engine_needing_sized(files: &[(&str, u8, u64)]) -> Engine {
        let mut e = Engine::new(Index::new(ShortId(1)), u64::MAX);
        announce(&mut e, peer(), ShortId(2), files);
        e
    }

    /// `from` (short ID `short`) connects and announces `files` (path, content byte,
    /// size), new to us.
    fn announce(e: &mut Engine, from: DeviceId, short: ShortId, files: &[(&str, u8, u64)]) {
        e.connected(from);
        let mut them = Index::new(short);
        let records: Vec<(FileRecord, u64)> = files
            .iter()
            .map(|(p, b, size)| {
                let p = RelPath::parse(p).unwrap();
                let mut obs = crate::core::index::tests::file(p.as_str(), *b, 1);
                (obs.size, obs.stat.size) = (*size, *size);
                let r = them.observe(&p, Some(obs), 1).unwrap();
                let seq = them.sequence();
                (r, seq)
            })
            .collect();
        let last = them.sequence();
        e.handle_index(from, records, last).unwrap();
    }

    /// `from` announces `files` (path, content byte; bulk-sized) and, if `link`, then
    /// the link `live/x -> ../archive/x/1`.
    fn announce_with_link(
        e: &mut Engine,
        from: DeviceId,
        short: ShortId,
        files: &[&str],
        link: bool,
    ) {
        e.connected(from);
        let mut them = Index::new(short);
        let mut records = Vec::new();
        for (i, p) in files.iter().enumerate() {
            let p = RelPath::parse(p).unwrap();
            let mut obs = crate::core::index::tests::file(p.as_str(), i as u8 + 1, 1);
            (obs.size, obs.stat.size) = (SMALL_FILE, SMALL_FILE);
            records.push((them.observe(&p, Some(obs), 1).unwrap(), them.sequence()));
        }
        if link {
            let p = RelPath::parse("live/x").unwrap();
            let mut obs = crate::core::index::tests::file(p.as_str(), 0, 1);
            (obs.kind, obs.target) = (Kind::Symlink, "../archive/x/1".into());
            records.push((them.observe(&p, Some(obs), 1).unwrap(), them.sequence()));
        }
        let last = them.sequence();
        e.handle_index(from, records, last).unwrap();
    }

    #[test]
    fn a_live_link_brings_its_archive_version_into_its_unit() {
        let mut e = Engine::new(Index::new(ShortId(1)), u64::MAX);
        let version = ["archive/x/1/cert.pem", "archive/x/1/key.pem"];
        announce_with_link(&mut e, peer(), ShortId(2), &version, true);
        let limits = Limits {
            batch_items: 8,
            ..limits()
        };
        let (mut p, t0) = (Pipeline::new(limits), Instant::now());
        // The urgent lane takes the link with what its target needs, not the link alone.
        p.refill(&mut e, |_| None, |_| true, t0);
        assert_eq!(e.applying().len(), 3);
        while let Some(w) = p.next_fetch() {
            let staged = format!("staged-{}", w.path()).into();
            p.fetched(w, staged, t0);
        }
        let mut unit: Vec<String> = p
            .poll_apply(&mut e, t0)
            .unwrap()
            .iter()
            .map(|w| w.path().to_string())
            .collect();
        unit.sort();
        assert_eq!(
            unit,
            ["archive/x/1/cert.pem", "archive/x/1/key.pem", "live/x"],
            "{:?}",
            e.applying()
        );
    }

    #[test]
    fn a_link_whose_target_cannot_be_fetched_yet_is_not_taken() {
        // The version's file comes only from a peer that is not connected.
        let mut e = Engine::new(Index::new(ShortId(1)), u64::MAX);
        announce_with_link(&mut e, peer(), ShortId(2), &["archive/x/1/cert.pem"], false);
        let other = DeviceId([7; 32]);
        announce_with_link(&mut e, other, ShortId(3), &[], true);
        let (mut p, t0) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |id| *id == other, t0);
        // Taken, it could only be released again by every unit (issue 29).
        assert!(e.applying().is_empty(), "{:?}", e.applying());
        assert!(p.poll_apply(&mut e, t0).is_none());
        // Once the file's source is there, both go.
        p.wake();
        p.refill(&mut e, |_| None, |_| true, t0);
        assert_eq!(e.applying().len(), 2);
    }

    #[test]
    fn a_peers_backlog_does_not_hold_up_another_peers_small_change() {
        let flood: Vec<String> = (0..100).map(|i| format!("flood/{i:03}")).collect();
        let files: Vec<(&str, u8, u64)> = flood.iter().map(|p| (p.as_str(), 1, 1)).collect();
        let mut e = Engine::new(Index::new(ShortId(1)), u64::MAX);
        announce(&mut e, peer(), ShortId(2), &files);
        let healthy = DeviceId([7; 32]);
        announce(&mut e, healthy, ShortId(3), &[("healthy/x", 2, 1)]);
        let (mut p, now) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        // The flooder's fetches never end (it does not answer); the healthy peer's
        // change still gets the second slot, not the 101st.
        let first: Vec<DeviceId> = (0..2)
            .filter_map(|_| p.next_fetch())
            .map(|w| w.sources[0])
            .collect();
        assert_eq!(first, [peer(), healthy]);
    }

    fn limits() -> Limits {
        Limits {
            parallel_fetches: 2,
            batch_items: 2,
            ..Limits::DEFAULT
        }
    }

    #[test]
    fn needs_are_fetched_then_applied_in_units() {
        let mut e = engine_needing(&[("a", 1), ("b", 2), ("c", 3)]);
        let (mut p, now) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        assert_eq!(e.applying().len(), 3);
        let a = p.next_fetch().unwrap();
        let b = p.next_fetch().unwrap();
        assert!(p.next_fetch().is_none(), "at most two fetches at once");
        assert_eq!(a.sources, vec![peer()]);
        p.fetched(a, "staged-a".into(), now);
        // b still fetching, c queued, one ready, not due: nothing applied yet.
        assert!(p.poll_apply(&mut e, now).is_none());
        let c = p.next_fetch().unwrap();
        p.fetched(b, "staged-b".into(), now);
        p.fetched(c, "staged-c".into(), now);
        // Nothing else is coming: a unit goes, at most two items.
        let unit = p.poll_apply(&mut e, now).unwrap();
        assert_eq!(unit.len(), 2);
        assert!(p.poll_apply(&mut e, now).is_none(), "one unit at a time");
        let results = unit
            .into_iter()
            .map(|w| (w, Outcome::Applied(None)))
            .collect();
        let rec = p.applied(results, &mut e, now, 1);
        assert_eq!(rec.applied.len(), 2);
        assert_eq!(e.applying().len(), 1);
        assert_eq!(p.poll_apply(&mut e, now).unwrap().len(), 1);
    }

    #[test]
    fn a_lost_apply_gives_its_paths_back_to_be_taken_again() {
        let (mut e, mut p, t0) = refilled(&[("a", 1)]);
        let a = p.next_fetch().unwrap();
        p.fetched(a, "staged-a".into(), t0);
        assert_eq!(p.poll_apply(&mut e, t0).unwrap().len(), 1);
        // The apply task died (a panic): nothing recorded.
        p.apply_lost(&mut e, t0);
        assert!(e.applying().is_empty(), "the path stayed taken for good");
        let later = t0 + Duration::from_secs(1);
        p.wake();
        p.refill(&mut e, |_| None, |_| true, later);
        assert_eq!(
            p.next_fetch().map(|w| w.path().to_string()),
            Some("a".into())
        );
    }

    #[test]
    fn ready_work_waits_for_more_only_until_the_delay() {
        let (mut e, mut p, t0) = refilled(&[("a", 1), ("b", 2), ("c", 3)]);
        let a = p.next_fetch().unwrap();
        p.fetched(a, "staged-a".into(), t0);
        assert!(p.poll_apply(&mut e, t0).is_none());
        let due = p.next_wake().unwrap();
        assert_eq!(due, t0 + Limits::DEFAULT.apply_delay);
        assert_eq!(p.poll_apply(&mut e, due).unwrap().len(), 1);
    }

    #[test]
    fn a_failed_fetch_backs_off_and_is_retaken_after() {
        let (mut e, mut p, t0) = refilled(&[("a", 1)]);
        let a = p.next_fetch().unwrap();
        p.fetch_failed(a, &mut e, t0, true);
        assert!(e.applying().is_empty());
        p.refill(&mut e, |_| None, |_| true, t0);
        assert!(p.next_fetch().is_none(), "not before its retry time");
        let at = p.next_wake().unwrap();
        assert_eq!(at, t0 + Duration::from_millis(500));
        p.wake();
        p.refill(&mut e, |_| None, |_| true, at);
        assert!(p.next_fetch().is_some());
    }

    #[test]
    fn an_undelivered_need_holds_its_budget_room_again_once_retried() {
        let (mut e, mut p, t0) = refilled(&[("a", 1)]);
        let a = RelPath::parse("a").unwrap();
        let w = p.next_fetch().unwrap();
        p.fetch_failed(w, &mut e, t0, false);
        assert!(
            !e.plan().is_undelivered(&a),
            "a local failure holds its room"
        );
        let at = p.next_wake().unwrap();
        p.wake();
        p.refill(&mut e, |_| None, |_| true, at);
        let w = p.next_fetch().unwrap();
        p.fetch_failed(w, &mut e, at, true);
        assert!(e.plan().is_undelivered(&a) && e.plan().need(&a).is_some());
        let again = p.next_wake().unwrap();
        p.refill(&mut e, |_| None, |_| true, again);
        assert!(!e.plan().is_undelivered(&a), "counted again when retried");
        assert!(p.next_fetch().is_some());
    }

    #[test]
    fn a_peer_at_its_fetch_cap_does_not_starve_the_others() {
        let mut e = engine_needing(&[("a", 1), ("b", 2), ("c", 3)]);
        // "z" is announced by a second peer only.
        let other = DeviceId([7; 32]);
        e.connected(other);
        let mut them = Index::new(ShortId(3));
        let z = RelPath::parse("z").unwrap();
        let mut obs = crate::core::index::tests::file("z", 9, 1);
        (obs.size, obs.stat.size) = (SMALL_FILE, SMALL_FILE); // a bulk file too
        let r = them.observe(&z, Some(obs), 1).unwrap();
        e.handle_index(other, vec![(r, 1)], 1).unwrap();
        let tight = Limits {
            per_peer_fetches: 1,
            ..limits()
        };
        let (mut p, now) = (Pipeline::new(tight), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        let first = p.next_fetch().unwrap();
        let second = p.next_fetch().unwrap();
        assert_eq!(first.sources, vec![peer()]);
        assert_eq!(
            second.path().as_str(),
            "z",
            "the other peer's need is not starved"
        );
        assert!(p.next_fetch().is_none());
        // The first peer's slot frees: its next need goes.
        p.fetch_failed(first, &mut e, now, true);
        p.wake();
        p.refill(&mut e, |_| None, |_| true, now);
        assert!(p.next_fetch().is_some());
    }

    #[test]
    fn a_due_or_stale_retry_does_not_keep_waking() {
        let (mut e, mut p, t0) = refilled(&[("a", 1)]);
        let a = p.next_fetch().unwrap();
        p.fetch_failed(a, &mut e, t0, true);
        let at = p.next_wake().unwrap();
        // Retaken at its time and fetching again: no timer for it meanwhile.
        p.wake();
        p.refill(&mut e, |_| None, |_| true, at);
        let a = p.next_fetch().unwrap();
        assert_eq!(p.next_wake(), None);
        // Fetched and applied: the need and its retry are gone.
        p.fetched(a, "staged-a".into(), at);
        let unit = p.poll_apply(&mut e, at).unwrap();
        let done = unit
            .into_iter()
            .map(|w| (w, Outcome::Applied(None)))
            .collect();
        let rec = p.applied(done, &mut e, at, 1);
        assert_eq!(rec.applied.len(), 1);
        p.refill(&mut e, |_| None, |_| true, at);
        assert_eq!(p.next_wake(), None);
        assert!(p.is_idle());
    }

    #[test]
    fn no_connected_source_no_work_and_inline_content_needs_no_fetch() {
        let mut e = engine_needing(&[("a", 1), ("b", 2)]);
        let (mut p, now) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |_| false, now);
        assert!(e.applying().is_empty() && p.is_idle());
        let b_hash = e
            .plan()
            .needs()
            .find(|n| n.target.path.as_str() == "b")
            .unwrap()
            .target
            .hash;
        p.wake();
        p.refill(
            &mut e,
            |h| (*h == b_hash).then(|| Arc::new(b"b".to_vec())),
            |_| false,
            now,
        );
        assert!(p.next_fetch().is_none());
        let unit = p.poll_apply(&mut e, now).unwrap();
        assert_eq!(unit.len(), 1);
        assert!(unit[0].inline.is_some());
    }

    #[test]
    fn what_is_a_small_change() {
        let rec = |p: &str, size: u64| {
            let mut obs = crate::core::index::tests::file(p, 1, 1);
            obs.size = size;
            let mut i = Index::new(ShortId(1));
            i.observe(&RelPath::parse(p).unwrap(), Some(obs), 1)
                .unwrap()
        };
        assert!(is_small(&rec("certs/a.pem", SMALL_FILE - 1)));
        assert!(!is_small(&rec("certs/a.pem", SMALL_FILE)));
        for urgent in [
            "live/www/x",
            "acme/.well-known/acme-challenge/t",
            ".certmesh/acme/a",
        ] {
            assert!(is_small(&rec(urgent, 1 << 30)), "{urgent}");
        }
        assert!(!is_small(&rec("archive/livex", 1 << 30)));
    }

    #[test]
    fn a_small_change_is_taken_when_the_bulk_has_no_room_and_fetched_first() {
        let mut e = engine_needing_sized(&[
            ("a", 1, 1 << 20),
            ("b", 2, 1 << 20),
            ("c", 3, 1 << 20),
            ("z", 4, 100),
        ]);
        let tight = Limits {
            in_flight: 2,
            parallel_fetches: 1,
            ..Limits::DEFAULT
        };
        let (mut p, now) = (Pipeline::new(tight), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        let taken: HashSet<String> = e.applying().iter().map(|p| p.to_string()).collect();
        assert_eq!(taken, ["a", "b", "z"].map(String::from).into());
        let order: Vec<String> = std::iter::from_fn(|| p.next_fetch())
            .map(|w| w.path().to_string())
            .collect();
        assert_eq!(order, ["z", "a"], "the small one first, then one bulk slot");
    }

    #[test]
    fn a_ready_small_change_is_applied_at_once_in_its_own_unit() {
        let mut e = engine_needing_sized(&[("a", 1, 1 << 20), ("b", 2, 1 << 20), ("z", 4, 100)]);
        let (mut p, now) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        let z = p.next_fetch().unwrap();
        let a = p.next_fetch().unwrap();
        let _b = p.next_fetch().unwrap(); // still fetching
        p.fetched(a, "staged-a".into(), now);
        p.fetched(z, "staged-z".into(), now);
        let unit = p
            .poll_apply(&mut e, now)
            .expect("the small change goes at once");
        let paths: Vec<String> = unit.iter().map(|w| w.path().to_string()).collect();
        assert_eq!(paths, ["z"], "the bulk's ready work waits for its own turn");
        // The bulk's ready work kept its place in time: due after the delay from then.
        assert_eq!(p.next_wake(), None, "nothing due while the unit is applied");
        let results = unit
            .into_iter()
            .map(|w| (w, Outcome::Applied(None)))
            .collect();
        p.applied(results, &mut e, now, 1);
        assert_eq!(p.next_wake(), Some(now + Limits::DEFAULT.apply_delay));
    }

    #[test]
    fn a_peer_at_its_bulk_cap_still_serves_its_small_changes() {
        let mut e = engine_needing_sized(&[("a", 1, 1 << 20), ("b", 2, 1 << 20), ("z", 4, 100)]);
        let tight = Limits {
            per_peer_fetches: 1,
            ..limits()
        };
        let (mut p, now) = (Pipeline::new(tight), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        let taken: HashSet<String> = e.applying().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            taken,
            ["a", "z"].map(String::from).into(),
            "b waits for a's slot"
        );
    }

    #[test]
    fn a_ready_live_flip_goes_at_once_with_its_archive_files() {
        let mut e = engine_needing_sized(&[
            ("archive/www/2/cert.pem", 1, 1 << 20),
            ("bulk/a", 2, 1 << 20),
            ("bulk/b", 3, 1 << 20),
        ]);
        let (mut p, now) = (Pipeline::new(limits()), Instant::now());
        p.refill(&mut e, |_| None, |_| true, now);
        let fetching: Vec<Work> = std::iter::from_fn(|| p.next_fetch()).collect();
        let mut link = fetching[0].need.clone();
        let t = Arc::make_mut(&mut link.target);
        (t.path, t.kind) = (RelPath::parse("live/www").unwrap(), Kind::Symlink);
        t.target = "../archive/www/2".into();
        for w in fetching {
            if w.path().as_str() != "bulk/b" {
                p.fetched(w, "staged".into(), now);
            }
        }
        e.pipeline_parts().2.insert(link.target.path.clone());
        p.push_ready(
            Work {
                need: link,
                expect: None,
                replaces_author: None,
                sources: Vec::new(),
                inline: None,
                staged: None,
            },
            now,
        );
        let unit = p.poll_apply(&mut e, now).expect("the flip goes at once");
        let mut paths: Vec<String> = unit.iter().map(|w| w.path().to_string()).collect();
        paths.sort();
        assert_eq!(paths, ["archive/www/2/cert.pem", "live/www"]);
    }
}
