//! What this node needs from whom: the peers' announced records, the resulting set of
//! needed records (with the conflict rule applied), and the acknowledgements. Pure:
//! changed only through [`crate::core::engine::Engine`], which re-evaluates after
//! every index change; the puller reads `needs()`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::core::device::DeviceId;
use crate::core::index::{held_bytes, Index, MAX_INDEX_BYTES, MAX_INDEX_RECORDS};
use crate::core::paths::RelPath;
use crate::core::record::{ContentHash, FileRecord, Kind};
use crate::core::version::Relation;

/// `[tree] max_file_size` when not configured.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 64 << 20;

/// `[tree] min_disk_free`: the free space a fetch must leave on the tree's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    /// Hundredths of a percent of the filesystem's size (500 = 5 %).
    Basis(u32),
    Bytes(u64),
}

impl MinFree {
    /// The bytes to leave free on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Basis(b) => (total as u128 * b as u128 / 10_000) as u64,
            MinFree::Bytes(n) => n,
        }
    }
}

impl std::fmt::Display for MinFree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MinFree::Basis(b) => write!(f, "{}.{:02}%", b / 100, b % 100),
            MinFree::Bytes(n) => write!(f, "{n} bytes"),
        }
    }
}

/// The tree budgets: past any of them, peers' new paths (and growth of
/// held files) are not fetched. Nothing already held is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeBudget {
    /// `[tree] max_size`: bytes of file content this node holds in the tree.
    pub max_size: u64,
    /// `[tree] max_files`: live paths (files, directories, links) in the tree.
    pub max_files: usize,
    /// `[tree] min_disk_free`.
    pub min_disk_free: MinFree,
}

impl Default for TreeBudget {
    fn default() -> Self {
        TreeBudget {
            max_size: 256 << 20,
            max_files: 200_000,
            min_disk_free: MinFree::Basis(500),
        }
    }
}

/// The tree's filesystem, as last measured by the shell (`statvfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes available to this process.
    pub free: u64,
    /// Size of the filesystem.
    pub total: u64,
}

/// Which budget refused a peer's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetKind {
    MaxSize,
    MaxFiles,
    MinDiskFree,
    /// The peer's view holds `MAX_PEER_RECORDS` or `MAX_PEER_BYTES`.
    PeerView,
    /// The index and the needs hold `MAX_INDEX_RECORDS` or `MAX_INDEX_BYTES`: a new
    /// path waits for room (a flooding peer's needs go when it does).
    IndexFull,
}

impl BudgetKind {
    /// The config key (or cap) named in status and logs.
    pub fn key(self) -> &'static str {
        match self {
            BudgetKind::MaxSize => "max_size",
            BudgetKind::MaxFiles => "max_files",
            BudgetKind::MinDiskFree => "min_disk_free",
            BudgetKind::PeerView => "peer_view",
            BudgetKind::IndexFull => "index_full",
        }
    }

    /// A cap a peer reaches by announcing paths, not a budget of this node's tree.
    fn is_flood(self) -> bool {
        matches!(self, BudgetKind::PeerView | BudgetKind::IndexFull)
    }
}

/// A peer's path not fetched because of a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: BudgetKind,
    /// The peer that announced it.
    pub peer: Option<DeviceId>,
    pub size: u64,
}

/// Most refused paths remembered for `status` (more are only counted).
pub const MAX_REFUSALS: usize = 10_000;
/// Most of [`MAX_REFUSALS`] one peer's paths refused for a full view or a full index
/// may take, so one peer's flood (its needs filling the index) leaves room in the list
/// for the other peers' `index_full` refusals, which are decided again once there is
/// room.
pub const MAX_REFUSALS_PER_PEER: usize = MAX_REFUSALS / 4;
/// Growth of free disk after which refused paths are decided again.
pub const RECHECK_FREE: u64 = 1 << 20;
/// Most bytes (estimated by [`record_cost`]) the records one peer announced may hold
/// in its view: the same as the index may hold ([`MAX_INDEX_BYTES`]), so an honest
/// peer's full index always fits (below it, every full index sent after a
/// reconnect overflowed and every session dropped). Past it, the peer's new paths are
/// refused and named, and the session stays up. The view is dropped on disconnect;
/// what a peer can make this node keep across reconnects is bounded by
/// `MAX_INDEX_RECORDS` and tombstone collection (`Index::collect_tombstones`).
pub const MAX_PEER_BYTES: usize = MAX_INDEX_BYTES;
/// Most records one peer's view holds: the same as the index ([`MAX_INDEX_RECORDS`]),
/// for the same reason as [`MAX_PEER_BYTES`].
pub const MAX_PEER_RECORDS: usize = MAX_INDEX_RECORDS;
/// Estimated heap bytes a record announced by a peer holds in its view.
pub fn record_cost(r: &FileRecord) -> usize {
    r.heap_cost()
}

/// Something the plan decided that the node should log once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanEvent {
    /// A peer's file is larger than `max_file_size`: not fetched (and acknowledged as
    /// refused, so the peer is not held up).
    TooLarge { path: RelPath, size: u64, max: u64 },
    /// The index holds `MAX_INDEX_RECORDS`: a peer's new path was not taken in.
    IndexFull { path: RelPath },
    /// A peer's path not fetched because of a tree budget or the peer's view cap
    /// (reported for the first few, then at each power of two of `total`).
    OverBudget {
        path: RelPath,
        refusal: Refusal,
        /// Paths refused by a budget since start.
        total: u64,
    },
    /// Records of a peer refused for their authorship: `count` in one
    /// batch, the first of them at `path`, claiming `author`.
    NotAuthorized {
        path: RelPath,
        author: Option<DeviceId>,
        why: String,
        count: u64,
    },
}

/// One record to bring in. `target.version` is the version to store once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The view's record itself (shared), which the index then holds once applied.
    pub target: Arc<FileRecord>,
    /// The local content loses a conflict and must be kept as a conflict copy.
    pub conflict: bool,
}

impl Need {
    /// A live path this node does not hold yet (`[tree] max_files`).
    fn new_path(&self, local: Option<&FileRecord>) -> bool {
        !self.target.deleted && local.is_none_or(|l| l.deleted)
    }
}

#[derive(Debug, Default)]
struct PeerView {
    /// Shared with the index (or a need) when equal to its record: a peer in sync
    /// costs a map slot per path, not a copy of every record (issue 29: at 10,000
    /// certificates each peer's view was a second index).
    records: HashMap<RelPath, (Arc<FileRecord>, u64)>,
    /// Sum of `record_cost` over `records`.
    bytes: usize,
    received_upto: u64,
    acked: u64,
    /// The sequences of this peer's records still pending here: needed, and not
    /// covered by the local record. The first one bounds what we acknowledge
    /// ([`Plan::ack_for`]); kept as the needs change, so acknowledging costs
    /// O(1), not a scan of every need (200,000 under a flood, once per send).
    pending: BTreeSet<u64>,
}

/// `r` as one allocation shared with an equal record this node already holds: its
/// own (a peer in sync announces what we have) or a need's (several peers announce
/// the same new record before it is applied).
fn shared_copy(r: FileRecord, index: &Index, needs: &BTreeMap<RelPath, Need>) -> Arc<FileRecord> {
    if let Some(e) = index.get(&r.path).filter(|e| *e.record == r) {
        return e.record.clone();
    }
    if let Some(n) = needs.get(&r.path).filter(|n| *n.target == r) {
        return n.target.clone();
    }
    Arc::new(r)
}

/// Peers' views and the needs derived from them.
#[derive(Debug)]
pub struct Plan {
    peers: HashMap<DeviceId, PeerView>,
    needs: BTreeMap<RelPath, Need>,
    /// Sum of `heap_cost` over the needs' targets.
    needs_bytes: usize,
    max_file_size: u64,
    budget: TreeBudget,
    /// The tree's filesystem, as last measured (`None`: not yet; not checked).
    disk: Option<DiskSpace>,
    /// Needs that add a live path ([`Need::new_path`]), and the content bytes all
    /// needs fetch: what is coming on top of the index, for the budgets.
    needs_new_paths: HashSet<RelPath>,
    needs_fetch_bytes: u64,
    /// Needs whose sources all failed to deliver the content ([`Plan::undelivered`]):
    /// still needed (and so not acknowledged), but holding no room under the tree
    /// budgets until they are tried again ([`Plan::reclaim`]). A peer that announces
    /// paths it never serves cannot fill `max_files` against the other peers' files.
    undelivered: HashSet<RelPath>,
    /// Peers' paths not fetched because of a budget (at most [`MAX_REFUSALS`]).
    refused: BTreeMap<RelPath, Refusal>,
    refused_total: u64,
    /// Of `refused`, those refused for a full peer view (at most half the list, so
    /// the budget refusals, which are decided again, always find room in it).
    view_refusals: usize,
    /// Of `refused`, how many full-view and full-index refusals each peer's paths
    /// take ([`MAX_REFUSALS_PER_PEER`]).
    listed_by: HashMap<Option<DeviceId>, usize>,
    /// Free disk, live paths and content bytes (each with what the needs add) when
    /// budget refusals were last decided again ([`Plan::recheck_budgets`]).
    /// And the records the index and the needs hold (`IndexFull`).
    rechecked: (u64, usize, u64, usize),
    max_index_records: usize,
    max_index_bytes: usize,
    /// Peers' files larger than `max_file_size`, not fetched: path → (hash, size).
    too_large: BTreeMap<RelPath, (ContentHash, u64)>,
    /// `(path, hash)` already reported, so each is logged once (cleared when large).
    reported: HashSet<(RelPath, ContentHash)>,
    /// New paths not taken in because the index is full, since start.
    not_adopted: u64,
    events: Vec<PlanEvent>,
    /// A reader's local changes being put back: path → whether the content differs
    /// (then it must be fetched again, not reused).
    reverts: HashMap<RelPath, bool>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan::new(DEFAULT_MAX_FILE_SIZE)
    }
}

impl Plan {
    /// A plan that fetches no file larger than `max_file_size` bytes.
    pub fn new(max_file_size: u64) -> Self {
        Plan {
            peers: HashMap::new(),
            needs: BTreeMap::new(),
            needs_bytes: 0,
            max_file_size,
            budget: TreeBudget::default(),
            disk: None,
            needs_new_paths: HashSet::new(),
            needs_fetch_bytes: 0,
            undelivered: HashSet::new(),
            refused: BTreeMap::new(),
            refused_total: 0,
            view_refusals: 0,
            listed_by: HashMap::new(),
            rechecked: (0, 0, 0, 0),
            max_index_records: MAX_INDEX_RECORDS,
            max_index_bytes: MAX_INDEX_BYTES,
            too_large: BTreeMap::new(),
            reported: HashSet::new(),
            not_adopted: 0,
            events: Vec::new(),
            reverts: HashMap::new(),
        }
    }

    /// Applies the tree budgets to peers' paths evaluated from now on.
    pub fn set_budget(&mut self, budget: TreeBudget) {
        self.budget = budget;
    }

    /// The tree's filesystem was measured (`[tree] min_disk_free`).
    pub fn set_disk_space(&mut self, disk: DiskSpace) {
        self.disk = Some(disk);
    }

    /// Decides again the paths a tree budget refused, once there is room again:
    /// free disk grew by [`RECHECK_FREE`], or the tree with what its needs add shrank,
    /// since the last time (a peer that announced 200,000 paths went away: its needs,
    /// never fetched, no longer count against `max_files`).
    /// Returns whether any of them is needed now.
    pub fn recheck_budgets(&mut self, index: &Index) -> bool {
        let now = (
            self.disk.map_or(0, |d| d.free),
            index.live_count() + self.needs_new_paths.len(),
            index.content_bytes() + self.needs_fetch_bytes,
            index.len() + self.needs.len(),
        );
        let (free, live, bytes, records) = self.rechecked;
        let room = now.0 >= free.saturating_add(RECHECK_FREE)
            || now.1 < live
            || now.2 < bytes
            || now.3 < records;
        if !room {
            self.mark_tight(index);
            return false;
        }
        self.rechecked = now;
        // Taking turns by the peer that announced them, the peer with the fewest
        // refusals first: the room that opened up goes to every peer's paths, not
        // first to one peer's thousands of refusals.
        let mut by_peer: BTreeMap<Option<DeviceId>, Vec<RelPath>> = BTreeMap::new();
        for (p, r) in &self.refused {
            if r.reason != BudgetKind::PeerView {
                by_peer.entry(r.peer).or_default().push(p.clone());
            }
        }
        let mut turns: Vec<Vec<RelPath>> = by_peer.into_values().collect();
        turns.sort_by_key(Vec::len);
        let mut turns: Vec<std::vec::IntoIter<RelPath>> =
            turns.into_iter().map(Vec::into_iter).collect();
        let mut paths = Vec::new();
        while !turns.is_empty() {
            turns.retain_mut(|t| t.next().map(|p| paths.push(p)).is_some());
        }
        let before = self.needs.len();
        for p in &paths {
            self.evaluate(p, index);
        }
        self.needs.len() > before
    }

    /// Keeps the tightest mark of room (least free disk, most live paths and bytes
    /// with what the needs add), so the next growth of room is measured from it.
    fn mark_tight(&mut self, index: &Index) {
        let (free, live, bytes, records) = self.rechecked;
        self.rechecked = (
            free.min(self.disk.map_or(0, |d| d.free)),
            live.max(index.live_count() + self.needs_new_paths.len()),
            bytes.max(index.content_bytes() + self.needs_fetch_bytes),
            records.max(index.len() + self.needs.len()),
        );
    }

    /// Peers' paths not fetched because of a budget (at most [`MAX_REFUSALS`]).
    pub fn refused(&self) -> impl Iterator<Item = (&RelPath, &Refusal)> {
        self.refused.iter()
    }

    pub fn refused_len(&self) -> usize {
        self.refused.len()
    }

    /// Paths refused by a budget since start (also those no longer listed).
    pub fn refused_total(&self) -> u64 {
        self.refused_total
    }

    /// Records an event for the node to log.
    pub fn report(&mut self, e: PlanEvent) {
        self.events.push(e);
    }

    /// A reader changed `p` locally: put the local record back (`content`: the
    /// content on disk differs from the record's). Re-evaluate `p` after this.
    pub fn revert(&mut self, p: RelPath, content: bool) {
        let c = self.reverts.entry(p).or_insert(false);
        *c |= content;
    }

    /// The record at `p` was applied: nothing left to put back.
    pub fn reverted(&mut self, p: &RelPath) {
        self.reverts.remove(p);
    }

    pub fn is_reverting(&self, p: &RelPath) -> bool {
        self.reverts.contains_key(p)
    }

    /// True while a revert at `p` must fetch the content (it differs on disk).
    pub fn reverting_content(&self, p: &RelPath) -> bool {
        self.reverts.get(p).copied().unwrap_or(false)
    }

    /// Splits `records` into those the peer's view has room for and those it has
    /// not: a path already in the view always fits (it replaces), a new one only
    /// while the view holds fewer than [`MAX_PEER_RECORDS`] records and
    /// [`MAX_PEER_BYTES`]. The refused ones are listed ([`Plan::refused`]) and never
    /// needed, so they are acknowledged as refused; the session goes on.
    pub fn admit(
        &mut self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
    ) -> (Vec<(FileRecord, u64)>, Vec<FileRecord>) {
        let Some(view) = self.peers.get(&peer) else {
            return (records, Vec::new());
        };
        let (mut count, mut bytes) = (view.records.len(), view.bytes);
        let mut added: HashSet<RelPath> = HashSet::new();
        let mut refused = Vec::new();
        let mut ok = Vec::with_capacity(records.len());
        for (r, seq) in records {
            let cost = record_cost(&r);
            match view.records.get(&r.path) {
                Some((old, _)) => bytes = (bytes + cost).saturating_sub(record_cost(old)),
                None if added.contains(&r.path) => bytes += cost,
                None if count < MAX_PEER_RECORDS && bytes + cost <= MAX_PEER_BYTES => {
                    count += 1;
                    bytes += cost;
                    added.insert(r.path.clone());
                }
                None => {
                    refused.push(r);
                    continue;
                }
            }
            ok.push((r, seq));
        }
        for r in &refused {
            let refusal = Refusal {
                reason: BudgetKind::PeerView,
                peer: Some(peer),
                size: r.size,
            };
            self.refuse(&r.path, refusal);
        }
        (ok, refused)
    }

    /// Lists `p` as refused by a budget and reports it (the first few, then at each
    /// power of two).
    fn refuse(&mut self, p: &RelPath, refusal: Refusal) {
        if !self.list_refusal(p, &refusal) {
            return;
        }
        self.refused_total += 1;
        let total = self.refused_total;
        if total <= 16 || total.is_power_of_two() {
            self.events.push(PlanEvent::OverBudget {
                path: p.clone(),
                refusal,
                total,
            });
        }
    }

    /// Lists `p` as refused (when there is room in the list); says whether that is
    /// new (a path not listed, or listed for another reason).
    fn list_refusal(&mut self, p: &RelPath, refusal: &Refusal) -> bool {
        let is_view = refusal.reason == BudgetKind::PeerView;
        let new = match self.refused.get_mut(p) {
            Some(r) => {
                let was_view = r.reason == BudgetKind::PeerView;
                let new = r.reason != refusal.reason;
                let was = std::mem::replace(r, refusal.clone());
                self.view_refusals = (self.view_refusals + usize::from(is_view))
                    .saturating_sub(usize::from(was_view));
                self.unlist(&was);
                self.list(refusal);
                new
            }
            None => {
                // A budget refusal must be listed to be decided again when there is
                // room; a flood of full-view refusals takes at most half the list,
                // and one peer's refusals a quarter.
                let by = self.listed_by.get(&refusal.peer).copied().unwrap_or(0);
                let room = self.refused.len() < MAX_REFUSALS
                    && (!is_view || self.view_refusals < MAX_REFUSALS / 2)
                    && (!refusal.reason.is_flood() || by < MAX_REFUSALS_PER_PEER);
                if room {
                    self.refused.insert(p.clone(), refusal.clone());
                    self.view_refusals += usize::from(is_view);
                    self.list(refusal);
                }
                true
            }
        };
        new
    }

    /// Counts a refusal that joined the list against its peer (full view or index).
    fn list(&mut self, r: &Refusal) {
        if r.reason.is_flood() {
            *self.listed_by.entry(r.peer).or_default() += 1;
        }
    }

    /// A refusal left the list.
    fn unlist(&mut self, r: &Refusal) {
        if !r.reason.is_flood() {
            return;
        }
        if let Some(n) = self.listed_by.get_mut(&r.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.listed_by.remove(&r.peer);
            }
        }
    }

    /// The lowest peer whose view holds `t`'s version of its path.
    fn announcer(&self, t: &FileRecord) -> Option<DeviceId> {
        self.peers
            .iter()
            .filter(|(_, v)| {
                v.records
                    .get(&t.path)
                    .is_some_and(|(r, _)| r.version == t.version)
            })
            .map(|(d, _)| *d)
            .min()
    }

    /// Estimated bytes the records `peer` announced hold.
    pub fn peer_bytes(&self, peer: &DeviceId) -> usize {
        self.peers.get(peer).map_or(0, |v| v.bytes)
    }

    /// What happened since the last call that the node should log.
    pub fn take_events(&mut self) -> Vec<PlanEvent> {
        std::mem::take(&mut self.events)
    }

    /// Peers' files not fetched because they are larger than `max_file_size`.
    pub fn too_large(&self) -> impl Iterator<Item = (&RelPath, u64)> {
        self.too_large.iter().map(|(p, (_, size))| (p, *size))
    }

    pub fn too_large_len(&self) -> usize {
        self.too_large.len()
    }

    /// How many times a peer's new path was not taken in because the index was full.
    pub fn not_adopted(&self) -> u64 {
        self.not_adopted
    }

    /// A peer (re)connected: it will send its full index again.
    pub fn connected(&mut self, peer: DeviceId, index: &Index) {
        self.disconnected(peer, index);
        self.peers.insert(peer, PeerView::default());
    }

    /// A peer went away: forget its view, its records can no longer be fetched.
    pub fn disconnected(&mut self, peer: DeviceId, index: &Index) {
        if let Some(view) = self.peers.remove(&peer) {
            for p in view.records.keys() {
                self.evaluate(p, index);
            }
        }
    }

    pub fn is_connected(&self, peer: &DeviceId) -> bool {
        self.peers.contains_key(peer)
    }

    /// Records announced by `peer`, each with the peer's sequence number.
    pub fn receive(
        &mut self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
        last_sequence: u64,
        index: &Index,
    ) {
        let Some(view) = self.peers.get_mut(&peer) else {
            return;
        };
        view.received_upto = view.received_upto.max(last_sequence);
        // A record our own covers is no contender (see `evaluate`): when the peer's
        // new record and the one it replaces both are, the need for that path cannot
        // change and is not re-derived. This is what a hub hears back from each of
        // its peers after every change it relays; re-deriving it anyway costs
        // O(peers) per record and peer, O(peers²) per change.
        let covered = |r: &FileRecord| {
            index
                .get(&r.path)
                .is_some_and(|l| l.record.version.covers(&r.version))
        };
        let mut paths: Vec<RelPath> = Vec::with_capacity(records.len());
        for (r, seq) in records {
            view.received_upto = view.received_upto.max(seq);
            view.bytes += record_cost(&r);
            let path = r.path.clone();
            let new_covered = covered(&r);
            let r = shared_copy(r, index, &self.needs);
            let old = view.records.insert(path.clone(), (r, seq));
            if let Some((old, old_seq)) = &old {
                view.bytes = view.bytes.saturating_sub(record_cost(old));
                // Pending again below (`evaluate`) if the new record is.
                view.pending.remove(old_seq);
            }
            if !new_covered || old.is_some_and(|(o, _)| !covered(&o)) {
                paths.push(path);
            }
        }
        for p in &paths {
            self.evaluate(p, index);
        }
    }

    /// The peer acknowledged our records up to `sequence`.
    pub fn acked(&mut self, peer: DeviceId, sequence: u64) {
        if let Some(v) = self.peers.get_mut(&peer) {
            v.acked = v.acked.max(sequence);
        }
    }

    /// What `peer` last acknowledged of ours.
    pub fn peer_acked(&self, peer: &DeviceId) -> u64 {
        self.peers.get(peer).map_or(0, |v| v.acked)
    }

    /// How many records a peer has announced.
    pub fn peer_record_count(&self, peer: &DeviceId) -> usize {
        self.peers.get(peer).map_or(0, |v| v.records.len())
    }

    /// The peer's announced record for a path.
    pub fn peer_record(&self, peer: &DeviceId, p: &RelPath) -> Option<&FileRecord> {
        self.peers.get(peer)?.records.get(p).map(|(r, _)| &**r)
    }

    /// Re-derives the need for one path after its local record or a peer's changed.
    pub fn evaluate(&mut self, p: &RelPath, index: &Index) {
        let local = index.get(p).map(|e| &*e.record);
        // A peer-view refusal stays (the record is not in any view to re-derive);
        // a budget refusal is decided again below.
        if self
            .refused
            .get(p)
            .is_some_and(|r| r.reason != BudgetKind::PeerView)
        {
            if let Some(r) = self.refused.remove(p) {
                self.unlist(&r);
            }
        }
        // Contenders: peers' records the local one has not seen…
        let seen = self
            .peers
            .values()
            .filter_map(|v| v.records.get(p).map(|(r, _)| r))
            .filter(|r| !local.is_some_and(|l| l.version.covers(&r.version)));
        let mut contenders: Vec<&Arc<FileRecord>> = Vec::new();
        for r in seen {
            if !contenders.iter().any(|c| c.version == r.version) {
                contenders.push(r);
            }
        }
        // …minus those another contender has seen: history, not a rival.
        let all = contenders.clone();
        contenders.retain(|c| {
            !all.iter()
                .any(|d| d.version.compare(&c.version) == Relation::Newer)
        });
        // The local record competes unless a contender has seen it.
        let local_competes = local.filter(|l| {
            !contenders
                .iter()
                .any(|c| c.version.compare(&l.version) == Relation::Newer)
        });
        let winner = contenders
            .iter()
            .copied()
            .reduce(|a, b| if b.wins_over(a) { b } else { a });
        let need = match (winner, local_competes) {
            (None, _) => None,
            (Some(w), Some(l)) if l.wins_over(w) => None,
            // Concurrent and the remote record wins: adopt it as it is (no merged
            // version, so the author of the losing edit still sees the conflict and
            // keeps its copy). Only the author keeps a copy.
            (Some(w), Some(l)) => Some(Need {
                conflict: !l.deleted && !l.same_content(w) && l.modified_by == index.me(),
                target: w.clone(),
            }),
            // Newer than ours, or a path we never had (tombstones are recorded too,
            // so they propagate).
            (Some(w), None) => Some(Need {
                target: w.clone(),
                conflict: false,
            }),
        };
        // A reader's local change: the local record (the writers' version) goes back.
        let need = need.or_else(|| {
            let l = index.get(p).filter(|_| self.reverts.contains_key(p))?;
            Some(Need {
                target: l.record.clone(),
                conflict: false,
            })
        });
        let need = need.filter(|n| {
            self.fetchable(n)
                && self.within_budget(n, local, index)
                && self.adoptable(n, local, index)
        });
        if let Some(old) = self.needs.remove(p) {
            self.needs_bytes = self.needs_bytes.saturating_sub(old.target.heap_cost());
            if !self.undelivered.remove(p) {
                self.needs_fetch_bytes = self
                    .needs_fetch_bytes
                    .saturating_sub(held_bytes(&old.target));
            }
            self.needs_new_paths.remove(p);
        }
        if let Some(n) = need {
            self.needs_bytes += n.target.heap_cost();
            self.needs_fetch_bytes += held_bytes(&n.target);
            if n.new_path(local) {
                self.needs_new_paths.insert(p.clone());
            }
            self.needs.insert(p.clone(), n);
        }
        self.repend(p, index);
    }

    /// Whether each peer's record at `p` is pending here (see `PeerView::pending`),
    /// after the need at `p`, a peer's record or the local record changed.
    pub fn repend(&mut self, p: &RelPath, index: &Index) {
        let needed = self.needs.contains_key(p);
        let local = index.get(p).map(|e| &e.record.version);
        for view in self.peers.values_mut() {
            let Some((r, seq)) = view.records.get(p) else {
                continue;
            };
            if needed && !local.is_some_and(|l| l.covers(&r.version)) {
                view.pending.insert(*seq);
            } else {
                view.pending.remove(seq);
            }
        }
    }

    /// False for a peer's path past a tree budget: a new live path when
    /// the tree holds `max_files`; content that grows what this node holds past
    /// `max_size`; any content to fetch that would leave less than `min_disk_free`.
    /// What is already needed and what comes on top (needs not yet applied) counts,
    /// minus this path's own earlier need. Deletions always pass; nothing held is
    /// removed. Refused paths are listed with the peer that announced them.
    fn within_budget(&mut self, n: &Need, local: Option<&FileRecord>, index: &Index) -> bool {
        let t = &n.target;
        let p = &t.path;
        if t.deleted {
            return true;
        }
        let (old_new, old_fetch) = match self.needs.get(p) {
            Some(_) if self.undelivered.contains(p) => (false, 0),
            Some(o) => (self.needs_new_paths.contains(p), held_bytes(&o.target)),
            None => (false, 0),
        };
        let held = local.map_or(0, held_bytes);
        let fetch = held_bytes(t);
        let pending = self.needs_fetch_bytes.saturating_sub(old_fetch);
        let b = self.budget;
        let reason = if n.new_path(local)
            && index.live_count() + self.needs_new_paths.len() - usize::from(old_new) >= b.max_files
        {
            Some(BudgetKind::MaxFiles)
        } else if fetch > held && index.content_bytes() + pending + (fetch - held) > b.max_size {
            Some(BudgetKind::MaxSize)
        } else if self.disk.is_some_and(|d| {
            fetch > 0
                && local.is_none_or(|l| l.deleted || l.hash != t.hash)
                && d.free.saturating_sub(pending + fetch) < b.min_disk_free.bytes(d.total)
        }) {
            Some(BudgetKind::MinDiskFree)
        } else {
            None
        };
        let Some(reason) = reason else {
            return true;
        };
        // Room shows against the budget as it was when this path was refused.
        self.mark_tight(index);
        let refusal = Refusal {
            reason,
            peer: self.announcer(t),
            size: t.size,
        };
        self.refuse(p, refusal);
        false
    }

    /// False for a live file larger than `max_file_size`: remembered for `status`,
    /// reported once per (path, content), never fetched. Not being a need, it does
    /// not hold back the acks to the peer (it is acknowledged as refused).
    fn fetchable(&mut self, n: &Need) -> bool {
        let t = &n.target;
        if t.deleted || t.kind != Kind::File || t.size <= self.max_file_size {
            self.too_large.remove(&t.path);
            return true;
        }
        self.too_large.insert(t.path.clone(), (t.hash, t.size));
        if self.reported.len() >= 10_000 {
            self.reported.clear();
        }
        if self.reported.insert((t.path.clone(), t.hash)) {
            self.events.push(PlanEvent::TooLarge {
                path: t.path.clone(),
                size: t.size,
                max: self.max_file_size,
            });
        }
        false
    }

    /// False for a path this node does not have while the index and the needs fill
    /// `MAX_INDEX_RECORDS` or `MAX_INDEX_BYTES`: a peer cannot grow the index without
    /// bound by announcing new paths on every connection. A tombstone for a path
    /// never had gets only half of that room, so tombstones a peer never
    /// acknowledges (and which are therefore never collected) cannot crowd out new
    /// files such as a renewed certificate.
    fn adoptable(&mut self, n: &Need, local: Option<&FileRecord>, index: &Index) -> bool {
        let p = &n.target.path;
        let share = if n.target.deleted { 2 } else { 1 };
        if local.is_some()
            || self.needs.contains_key(p)
            || ((index.len() + self.needs.len()) * share < self.max_index_records
                && (index.bytes() + self.needs_bytes + n.target.heap_cost()) * share
                    <= self.max_index_bytes)
        {
            return true;
        }
        if self.not_adopted == 0 {
            self.events.push(PlanEvent::IndexFull { path: p.clone() });
        }
        // Listed, so it is decided again once there is room (a flooding peer's needs
        // go when it does): otherwise an honest peer's new file, announced while the
        // index was full, would never be fetched in this session (issue 29).
        self.mark_tight(index);
        let refusal = Refusal {
            reason: BudgetKind::IndexFull,
            peer: self.announcer(&n.target),
            size: n.target.size,
        };
        self.list_refusal(p, &refusal);
        self.not_adopted += 1;
        false
    }

    /// Every source of the need at `p` failed to deliver its content: it stays
    /// needed (retried, not acknowledged) but stops counting against the tree
    /// budgets, so a peer's paths it announces and never serves do not refuse other
    /// peers' files. The room it held shows at the next [`Plan::recheck_budgets`].
    pub fn undelivered(&mut self, p: &RelPath) {
        let Some(n) = self.needs.get(p) else {
            return;
        };
        if self.undelivered.insert(p.clone()) {
            self.needs_fetch_bytes = self.needs_fetch_bytes.saturating_sub(held_bytes(&n.target));
            self.needs_new_paths.remove(p);
        }
    }

    pub fn is_undelivered(&self, p: &RelPath) -> bool {
        self.undelivered.contains(p)
    }

    /// An undelivered need is about to be tried again: it counts against the budgets
    /// again, and is decided again (refused if the room it held was taken meanwhile).
    pub fn reclaim(&mut self, p: &RelPath, index: &Index) {
        if !self.undelivered.remove(p) {
            return;
        }
        let Some(n) = self.needs.get(p) else {
            return;
        };
        self.needs_fetch_bytes += held_bytes(&n.target);
        if n.new_path(index.get(p).map(|e| &*e.record)) {
            self.needs_new_paths.insert(p.clone());
        }
        self.evaluate(p, index);
    }

    /// Test check: the kept budget counts equal a scan of the needs.
    #[cfg(test)]
    pub(crate) fn check_budget_counts(&self, index: &Index) {
        let counted = || {
            self.needs
                .iter()
                .filter(|(p, _)| !self.undelivered.contains(*p))
        };
        let new_paths: HashSet<&RelPath> = counted()
            .filter(|(p, n)| n.new_path(index.get(p).map(|e| &*e.record)))
            .map(|(p, _)| p)
            .collect();
        let bytes: u64 = counted().map(|(_, n)| held_bytes(&n.target)).sum();
        assert_eq!(new_paths, self.needs_new_paths.iter().collect());
        assert_eq!(bytes, self.needs_fetch_bytes);
    }

    pub fn needs(&self) -> impl Iterator<Item = &Need> {
        self.needs.values()
    }

    /// Needed paths at or below `dir`.
    pub fn needs_within<'a>(&'a self, dir: &'a RelPath) -> impl Iterator<Item = &'a RelPath> + 'a {
        dir.within_map(&self.needs).map(|(p, _)| p)
    }

    /// [`Plan::needs_within`] from just after `after` on, then from the start up to
    /// `after` (a scan that resumes where the last one stopped).
    pub fn needs_within_from<'a>(
        &'a self,
        dir: &'a RelPath,
        after: Option<&'a RelPath>,
    ) -> Box<dyn Iterator<Item = (&'a RelPath, &'a Need)> + 'a> {
        match after {
            Some(a) if a.is_within(dir) => Box::new(
                dir.within_map_after(&self.needs, a).chain(
                    dir.within_map(&self.needs)
                        .take_while(move |(p, _)| *p <= a),
                ),
            ),
            _ => Box::new(dir.within_map(&self.needs)),
        }
    }

    pub fn need(&self, p: &RelPath) -> Option<&Need> {
        self.needs.get(p)
    }

    pub fn needs_len(&self) -> usize {
        self.needs.len()
    }

    /// The peers whose records are kept (connected or not).
    pub fn peer_ids(&self) -> impl Iterator<Item = &DeviceId> {
        self.peers.keys()
    }

    /// Connected peers that announced exactly this content for the path.
    pub fn sources(&self, need: &Need) -> Vec<DeviceId> {
        let mut out: Vec<DeviceId> = self
            .peers
            .iter()
            .filter(|(_, v)| {
                v.records
                    .get(&need.target.path)
                    .is_some_and(|(r, _)| !r.deleted && r.hash == need.target.hash)
            })
            .map(|(d, _)| *d)
            .collect();
        out.sort();
        out
    }

    /// What we can acknowledge to `peer`: every record of theirs up to this sequence
    /// is applied here, or superseded by something we have.
    pub fn ack_for(&self, peer: &DeviceId, index: &Index) -> u64 {
        let Some(view) = self.peers.get(peer) else {
            return 0;
        };
        #[cfg(test)]
        assert_eq!(
            view.pending.first().copied(),
            self.pending_by_scan(view, index),
            "the kept pending set matches a scan of the needs"
        );
        #[cfg(not(test))]
        let _ = index;
        match view.pending.first().copied() {
            Some(s) => view.received_upto.min(s.saturating_sub(1)),
            None => view.received_upto,
        }
    }

    /// The first pending sequence as a scan of every need finds it (what
    /// `PeerView::pending` keeps), to check it in tests.
    #[cfg(test)]
    fn pending_by_scan(&self, view: &PeerView, index: &Index) -> Option<u64> {
        self.needs
            .keys()
            .filter_map(|p| {
                let (r, seq) = view.records.get(p)?;
                let covered = index
                    .get(p)
                    .is_some_and(|e| e.record.version.covers(&r.version));
                (!covered).then_some(*seq)
            })
            .min()
    }

    /// Nothing pending either way with this peer.
    pub fn in_sync(&self, peer: &DeviceId, index: &Index) -> bool {
        let Some(view) = self.peers.get(peer) else {
            return false;
        };
        view.acked >= index.sequence() && self.ack_for(peer, index) >= view.received_upto
    }

    /// Needed paths whose only newer record comes from this peer.
    pub fn pending_from(&self, peer: &DeviceId, index: &Index) -> usize {
        let Some(view) = self.peers.get(peer) else {
            return 0;
        };
        self.needs
            .keys()
            .filter(|p| {
                view.records.get(*p).is_some_and(|(r, _)| {
                    !index
                        .get(p)
                        .is_some_and(|e| e.record.version.covers(&r.version))
                })
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::device::ShortId;
    use crate::core::paths::MAX_PATH;
    use crate::core::record::ContentHash;
    use crate::core::version::VersionVector;

    fn record(path: &str, size: u64, counters: u64) -> FileRecord {
        FileRecord {
            path: RelPath::parse(path).unwrap(),
            kind: Kind::File,
            size,
            mode: 0o644,
            mtime_ns: 1,
            hash: ContentHash([size as u8; 32]),
            target: String::new(),
            version: VersionVector::from_pairs((1..=counters).map(|d| (ShortId(d), 1)).collect()),
            deleted: false,
            modified_by: ShortId(1),
            auth: None,
        }
    }

    fn connected(plan: &mut Plan, index: &Index) -> DeviceId {
        let peer = DeviceId([9; 32]);
        plan.connected(peer, index);
        peer
    }

    #[test]
    fn a_contender_replaced_by_a_record_we_cover_is_no_longer_needed() {
        // Records our own covers are not re-evaluated, unless the one they replace
        // was a contender: a peer going back to what we have drops the need.
        let mut index = Index::new(ShortId(1));
        index.put(record("a", 1, 1), None, 0);
        let mut plan = Plan::default();
        let peer = connected(&mut plan, &index);
        plan.receive(peer, vec![(record("a", 2, 2), 1)], 1, &index);
        assert_eq!(plan.needs_len(), 1);
        plan.receive(peer, vec![(record("a", 1, 1), 2)], 2, &index);
        assert_eq!(plan.needs_len(), 0);
        // A covered record with no contender before it changes nothing.
        plan.receive(peer, vec![(record("a", 1, 1), 3)], 3, &index);
        assert_eq!(plan.needs_len(), 0);
    }

    #[test]
    fn a_peer_view_is_bounded_in_bytes_and_refuses_new_paths_past_it() {
        let index = Index::new(ShortId(100));
        let mut plan = Plan::default();
        let peer = connected(&mut plan, &index);
        // Records at the wire's limits: a 4 KiB path and 1024 version entries.
        let big = |i: usize| {
            let name = format!("{i:05}{}", "x".repeat(200));
            let path = vec![name; MAX_PATH / 206].join("/");
            (record(&path, 1, 1024), i as u64 + 1)
        };
        let cost = record_cost(&big(0).0);
        assert!(cost > 20 << 10, "{cost}");
        let fit = MAX_PEER_BYTES / cost;
        let (ok, over) = plan.admit(peer, (0..fit).map(big).collect());
        assert!(over.is_empty());
        plan.receive(peer, ok, fit as u64, &index);
        assert!(plan.peer_bytes(&peer) <= MAX_PEER_BYTES);
        // The same records again replace, they do not add up…
        let (ok, over) = plan.admit(peer, (0..fit).map(big).collect());
        assert_eq!((ok.len(), over.len()), (fit, 0));
        // …a new one is refused and named, with the peer.
        let (ok, over) = plan.admit(peer, vec![big(fit)]);
        assert_eq!((ok.len(), over.len()), (0, 1));
        let (p, r) = plan.refused().next().unwrap();
        assert_eq!(
            (p, r.reason, r.peer),
            (&big(fit).0.path, BudgetKind::PeerView, Some(peer))
        );
        // A reconnect starts a new view.
        plan.connected(peer, &index);
        assert_eq!(plan.peer_bytes(&peer), 0);
        assert_eq!(plan.admit(peer, vec![big(fit)]).1.len(), 0);
    }

    /// A plan with `budget`, an index holding `held` (path, size) files, a peer.
    fn budgeted(budget: TreeBudget, held: &[(&str, u64)]) -> (Plan, Index, DeviceId) {
        let mut index = Index::new(ShortId(1));
        for (p, size) in held {
            index.put(record(p, *size, 1), None, 0);
        }
        let mut plan = Plan::default();
        plan.set_budget(budget);
        let peer = connected(&mut plan, &index);
        (plan, index, peer)
    }

    /// The peer's new record for `path`: newer than anything held.
    fn newer(path: &str, size: u64) -> FileRecord {
        let mut r = record(path, size, 2);
        r.version = VersionVector::from_pairs(vec![(ShortId(1), 1), (ShortId(2), 5)]);
        r
    }

    fn refused_for(plan: &Plan, path: &str) -> Option<BudgetKind> {
        plan.refused()
            .find(|(p, _)| p.as_str() == path)
            .map(|(_, r)| r.reason)
    }

    #[test]
    fn max_files_refuses_new_paths_and_keeps_updates_and_deletions() {
        let budget = TreeBudget {
            max_files: 2,
            ..TreeBudget::default()
        };
        let (mut plan, index, peer) = budgeted(budget, &[("a", 1)]);
        let mut gone = newer("a", 1);
        gone.deleted = true;
        let batch = vec![(newer("b", 1), 1), (newer("c", 1), 2), (gone, 3)];
        plan.receive(peer, batch, 3, &index);
        let needed: Vec<&str> = plan.needs().map(|n| n.target.path.as_str()).collect();
        assert_eq!(
            needed,
            ["a", "b"],
            "one new path fits, the deletion always does"
        );
        assert_eq!(refused_for(&plan, "c"), Some(BudgetKind::MaxFiles));
        assert_eq!(plan.refused().next().unwrap().1.peer, Some(peer));
        assert!(matches!(
            &plan.take_events()[..],
            [PlanEvent::OverBudget { total: 1, .. }]
        ));
    }

    #[test]
    fn max_size_refuses_content_that_grows_the_tree_past_it() {
        let budget = TreeBudget {
            max_size: 100,
            ..TreeBudget::default()
        };
        let (mut plan, index, peer) = budgeted(budget, &[("held", 60)]);
        let batch = vec![
            (newer("new", 30), 1),
            (newer("more", 20), 2),
            (newer("held", 50), 3),
        ];
        plan.receive(peer, batch, 3, &index);
        assert!(plan.need(&RelPath::parse("new").unwrap()).is_some());
        assert_eq!(refused_for(&plan, "more"), Some(BudgetKind::MaxSize));
        // Shrinking a held file is always fetched.
        assert!(plan.need(&RelPath::parse("held").unwrap()).is_some());
    }

    #[test]
    fn min_disk_free_refuses_a_fetch_that_would_leave_less() {
        let budget = TreeBudget {
            min_disk_free: MinFree::Basis(1000), // 10 % of 1000 bytes
            ..TreeBudget::default()
        };
        let (mut plan, index, peer) = budgeted(budget, &[]);
        plan.set_disk_space(DiskSpace {
            free: 300,
            total: 1000,
        });
        plan.receive(
            peer,
            vec![(newer("a", 150), 1), (newer("b", 100), 2)],
            2,
            &index,
        );
        assert!(plan.need(&RelPath::parse("a").unwrap()).is_some());
        assert_eq!(refused_for(&plan, "b"), Some(BudgetKind::MinDiskFree));
        assert_eq!(MinFree::Basis(500).bytes(2000), 100);
        // Space returns: the refused path is decided again and needed.
        plan.set_disk_space(DiskSpace {
            free: 300 + RECHECK_FREE,
            total: 1000 + RECHECK_FREE,
        });
        assert!(plan.recheck_budgets(&index));
        assert!(plan.need(&RelPath::parse("b").unwrap()).is_some());
        assert_eq!(plan.refused_len(), 0);
    }

    #[test]
    fn a_peers_unfetched_needs_stop_counting_against_max_files_once_it_is_gone() {
        let budget = TreeBudget {
            max_files: 3,
            ..TreeBudget::default()
        };
        let (mut plan, index, flooder) = budgeted(budget, &[]);
        let flood: Vec<_> = (0..3)
            .map(|i| (newer(&format!("f/{i}"), 1), i + 1))
            .collect();
        plan.receive(flooder, flood, 3, &index);
        // A healthy peer's new file: refused while the flooder's needs fill the budget…
        let healthy = DeviceId([8; 32]);
        plan.connected(healthy, &index);
        plan.receive(healthy, vec![(newer("healthy/a", 1), 1)], 1, &index);
        assert_eq!(refused_for(&plan, "healthy/a"), Some(BudgetKind::MaxFiles));
        assert!(!plan.recheck_budgets(&index), "no room yet");
        // …and fetched once the flooder is gone, its needs with it.
        plan.disconnected(flooder, &index);
        assert!(plan.recheck_budgets(&index));
        assert!(plan.need(&RelPath::parse("healthy/a").unwrap()).is_some());
    }

    #[test]
    fn needs_no_source_delivers_hold_no_room_under_max_files_until_tried_again() {
        let budget = TreeBudget {
            max_files: 3,
            ..TreeBudget::default()
        };
        let (mut plan, index, flooder) = budgeted(budget, &[]);
        let flood: Vec<_> = (0..6)
            .map(|i| (newer(&format!("f/{i}"), 1), i + 1))
            .collect();
        plan.receive(flooder, flood, 6, &index);
        // (A healthy peer that sorts after the flooder.)
        let healthy = DeviceId([10; 32]);
        plan.connected(healthy, &index);
        plan.receive(healthy, vec![(newer("healthy/a", 1), 1)], 1, &index);
        assert_eq!(refused_for(&plan, "healthy/a"), Some(BudgetKind::MaxFiles));
        // The flooder serves none of its paths: while connected, they stop counting,
        // and the room goes to the peer with fewer refusals first.
        let f0 = RelPath::parse("f/0").unwrap();
        plan.undelivered(&f0);
        plan.undelivered(&f0); // twice: counted off once
        assert!(plan.recheck_budgets(&index));
        assert!(plan.need(&RelPath::parse("healthy/a").unwrap()).is_some());
        for i in 1..3 {
            plan.undelivered(&RelPath::parse(&format!("f/{i}")).unwrap());
        }
        plan.recheck_budgets(&index);
        assert!(plan.need(&RelPath::parse("healthy/a").unwrap()).is_some());
        // Still needed (not acknowledged past), and decided again when retried: the
        // room the healthy file took is not there for all of them any more.
        assert!(plan.need(&f0).is_some() && plan.is_undelivered(&f0));
        assert_eq!(plan.ack_for(&flooder, &index), 0);
        plan.check_budget_counts(&index);
        for i in 0..6 {
            plan.reclaim(&RelPath::parse(&format!("f/{i}")).unwrap(), &index);
        }
        let needed = (0..6)
            .filter(|i| {
                let p = RelPath::parse(&format!("f/{i}")).unwrap();
                plan.need(&p).is_some() && !plan.is_undelivered(&p)
            })
            .count();
        assert_eq!(
            needed, 2,
            "max_files holds with the reclaimed needs counted again"
        );
        plan.check_budget_counts(&index);
    }

    #[test]
    fn full_view_refusals_leave_room_in_the_list_for_budget_refusals() {
        let budget = TreeBudget {
            max_files: 1,
            ..TreeBudget::default()
        };
        let (mut plan, index, peer) = budgeted(budget, &[("held", 1)]);
        let view = Refusal {
            reason: BudgetKind::PeerView,
            peer: Some(peer),
            size: 1,
        };
        for i in 0..MAX_REFUSALS {
            plan.refuse(&RelPath::parse(&format!("v/{i}")).unwrap(), view.clone());
        }
        assert_eq!(
            plan.refused_len(),
            MAX_REFUSALS_PER_PEER.min(MAX_REFUSALS / 2)
        );
        plan.receive(peer, vec![(newer("b", 1), 1)], 1, &index);
        assert_eq!(refused_for(&plan, "b"), Some(BudgetKind::MaxFiles));
    }

    #[test]
    fn one_peers_flood_of_index_full_refusals_leaves_room_in_the_list_for_another_peers() {
        let mut plan = Plan::default();
        let (flooder, honest) = (DeviceId([9; 32]), DeviceId([3; 32]));
        let full = |peer| Refusal {
            reason: BudgetKind::IndexFull,
            peer: Some(peer),
            size: 1,
        };
        for i in 0..MAX_REFUSALS {
            plan.list_refusal(&RelPath::parse(&format!("f/{i}")).unwrap(), &full(flooder));
        }
        assert_eq!(plan.refused_len(), MAX_REFUSALS_PER_PEER);
        let healthy = RelPath::parse("healthy").unwrap();
        plan.list_refusal(&healthy, &full(honest));
        assert_eq!(
            plan.refused()
                .find(|(p, _)| **p == healthy)
                .map(|(_, r)| r.peer),
            Some(Some(honest))
        );
        // Budget refusals are this node's own limits: not capped per peer.
        let budget = Refusal {
            reason: BudgetKind::MaxFiles,
            ..full(flooder)
        };
        plan.list_refusal(&RelPath::parse("b").unwrap(), &budget);
        assert_eq!(plan.refused_len(), MAX_REFUSALS_PER_PEER + 2);
    }

    #[test]
    fn too_large_files_are_not_needed_and_do_not_hold_back_acks() {
        let index = Index::new(ShortId(100));
        let mut plan = Plan::new(1 << 20);
        let peer = connected(&mut plan, &index);
        let records = vec![(record("big", 2 << 20, 1), 1), (record("small", 10, 1), 2)];
        plan.receive(peer, records.clone(), 2, &index);
        let needed: Vec<&str> = plan.needs().map(|n| n.target.path.as_str()).collect();
        assert_eq!(needed, vec!["small"]);
        assert_eq!(plan.too_large().collect::<Vec<_>>().len(), 1);
        let events = plan.take_events();
        assert!(matches!(&events[..], [PlanEvent::TooLarge { size, .. }] if *size == 2 << 20));
        // Announced again: not reported again.
        plan.receive(peer, records, 2, &index);
        assert!(plan.take_events().is_empty());
        // Only "small" is pending: the ack stops before it (sequence 2), past "big".
        assert_eq!(plan.ack_for(&peer, &index), 1);
    }

    #[test]
    fn new_paths_are_not_adopted_beyond_the_index_bound() {
        let mut index = Index::new(ShortId(100));
        let mut plan = Plan {
            max_index_records: 3,
            ..Plan::default()
        };
        let mine = RelPath::parse("mine").unwrap();
        index.observe(
            &mine,
            Some(crate::core::index::tests::file("mine", 1, 1)),
            1,
        );
        let peer = connected(&mut plan, &index);
        let records: Vec<_> = (0..5)
            .map(|i| (record(&format!("p{i}"), 1, 1), i + 1))
            .collect();
        plan.receive(peer, records, 5, &index);
        assert_eq!(plan.needs_len(), 2);
        assert_eq!(plan.not_adopted(), 3);
        assert!(matches!(
            &plan.take_events()[..],
            [PlanEvent::IndexFull { .. }]
        ));
        // A newer version of a path we have is still taken.
        let mut r = record("mine", 1, 1);
        r.version = VersionVector::from_pairs(vec![(ShortId(1), 5), (ShortId(100), 9)]);
        plan.receive(peer, vec![(r, 6)], 6, &index);
        assert!(plan.need(&mine).is_some());
    }

    #[test]
    fn a_new_path_refused_while_a_flood_filled_the_index_is_taken_once_the_flooder_goes() {
        let index = Index::new(ShortId(100));
        let mut plan = Plan {
            max_index_records: 3,
            ..Plan::default()
        };
        let flooder = connected(&mut plan, &index);
        let honest = DeviceId([3; 32]);
        plan.connected(honest, &index);
        let flood: Vec<_> = (0..3)
            .map(|i| (record(&format!("flood{i}"), 1, 1), i + 1))
            .collect();
        plan.receive(flooder, flood, 3, &index);
        let file = record("healthy", 1, 1);
        plan.receive(honest, vec![(file.clone(), 1)], 1, &index);
        assert!(plan.need(&file.path).is_none());
        let listed: Vec<_> = plan
            .refused()
            .map(|(p, r)| (p.clone(), r.reason, r.peer))
            .collect();
        assert_eq!(
            listed,
            [(file.path.clone(), BudgetKind::IndexFull, Some(honest))]
        );
        assert!(!plan.recheck_budgets(&index), "no room yet");
        plan.disconnected(flooder, &index);
        assert!(plan.recheck_budgets(&index));
        assert!(plan.need(&file.path).is_some());
        assert_eq!(plan.refused_len(), 0);
    }

    #[test]
    fn new_paths_are_not_adopted_beyond_the_index_byte_bound() {
        let index = Index::new(ShortId(100));
        let cost = record("p0", 1, 1).heap_cost();
        let mut plan = Plan {
            max_index_bytes: 2 * cost,
            ..Plan::default()
        };
        let peer = connected(&mut plan, &index);
        let records: Vec<_> = (0..4)
            .map(|i| (record(&format!("p{i}"), 1, 1), i + 1))
            .collect();
        plan.receive(peer, records, 4, &index);
        assert_eq!((plan.needs_len(), plan.not_adopted()), (2, 2));
        assert_eq!(plan.needs_bytes, 2 * cost);
        // The peer goes away: its needs go, and so does their weight.
        plan.disconnected(peer, &index);
        assert_eq!((plan.needs_len(), plan.needs_bytes), (0, 0));
    }

    #[test]
    fn tombstones_of_unknown_paths_get_half_the_room() {
        let index = Index::new(ShortId(100));
        let mut plan = Plan {
            max_index_records: 4,
            ..Plan::default()
        };
        let peer = connected(&mut plan, &index);
        let tombstone = |i: u64| {
            let mut r = record(&format!("t{i}"), 0, 1);
            (r.deleted, r.hash) = (true, ContentHash::default());
            (r, i + 1)
        };
        plan.receive(peer, (0..4).map(tombstone).collect(), 4, &index);
        assert_eq!(plan.needs_len(), 2);
        let files: Vec<_> = (4..8)
            .map(|i| (record(&format!("f{i}"), 1, 1), i + 1))
            .collect();
        plan.receive(peer, files, 8, &index);
        assert_eq!(plan.needs_len(), 4);
    }
}
