//! The local index: one `FileRecord` per path as this node has it applied, a local
//! sequence number per change (what peers are sent as increments), and the local stat
//! cache that lets a rescan skip hashing unchanged files. Pure: no I/O.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use crate::core::device::ShortId;
use crate::core::paths::RelPath;
use crate::core::record::{Authorship, ContentHash, FileRecord, Kind};

/// The version counter floor for a change made at `now_ns`: microseconds.
fn clock(now_ns: i64) -> u64 {
    (now_ns.max(0) / 1000) as u64
}

/// Most records the index adopts from peers: beyond it, paths this node does not
/// have are not taken in (see `Plan::evaluate`; tombstones of such paths only up
/// to half of it); local files are always recorded.
/// With tombstone collection this bounds what peers can make the index hold across
/// any number of reconnects: 200 000 records, each at most ~33 KiB on disk and
/// typically ~0.5 KiB in memory (a certificate tree has a few thousand).
pub const MAX_INDEX_RECORDS: usize = 200_000;

/// Most estimated bytes ([`FileRecord::heap_cost`]) the index may hold before new
/// paths from peers are no longer taken in: 256 MiB, so the record cap above is not
/// a loophole for records at every wire limit (~29 KiB each).
pub const MAX_INDEX_BYTES: usize = 256 << 20;

/// How long a tombstone is kept at least (from when this node learned of the
/// deletion, [`Entry::learned_ns`], on its own clock) before it may be collected, and
/// only once every configured peer has acknowledged it; the default of
/// `[tree] tombstone_retention`. It is also the replay horizon: with `[tree]
/// writers`, a live record signed longer ago than this is refused for a path the
/// receiver does not hold (`core::authorship::Refusal::Stale`), so a relay cannot
/// bring back a deleted file once its tombstone is gone.
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the local filesystem showed at the last scan or apply: when a new stat
/// equals this, the file is unchanged and is not hashed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocalStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub ino: u64,
    pub ctime_ns: i64,
}

/// A path as seen on disk by the scanner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub hash: ContentHash,
    pub target: String,
    pub stat: LocalStat,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// Shared: a peer's announced record equal to this one is the same allocation in
    /// its view ([`crate::core::plan`]), so each peer does not cost a copy of the index.
    pub record: Arc<FileRecord>,
    pub sequence: u64,
    pub stat: Option<LocalStat>,
    /// This node's clock (ns since the epoch) when it first took this version in (a
    /// local change: when scanned). Tombstones are collected by it, never by the
    /// author-set `mtime_ns`.
    pub learned_ns: i64,
}

/// The content bytes a record holds in the tree (0 for a deletion, link or directory).
pub fn held_bytes(r: &FileRecord) -> u64 {
    if r.deleted || r.kind != Kind::File {
        0
    } else {
        r.size
    }
}

/// The local index.
#[derive(Debug)]
pub struct Index {
    me: ShortId,
    /// Sorted, so a directory's paths are one range ([`Index::paths_within`]).
    /// Boxed: B-tree nodes filled in path order are about half full, so an entry
    /// (72 bytes; its record is shared, [`Entry::record`]) in the node itself cost
    /// ~10 MB more at 90,000 entries than a pointer to it (issue 29).
    entries: BTreeMap<RelPath, Box<Entry>>,
    by_sequence: BTreeMap<u64, RelPath>,
    sequence: u64,
    /// Sum of `heap_cost` over the records.
    bytes: usize,
    /// Live (not deleted) records.
    live: usize,
    /// Sum of `size` over the live file records: the content held in the tree.
    content_bytes: u64,
}

impl Index {
    pub fn new(me: ShortId) -> Self {
        Index {
            me,
            entries: BTreeMap::new(),
            by_sequence: BTreeMap::new(),
            sequence: 0,
            bytes: 0,
            live: 0,
            content_bytes: 0,
        }
    }

    pub fn me(&self) -> ShortId {
        self.me
    }

    /// The highest local sequence number handed out.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn get(&self, p: &RelPath) -> Option<&Entry> {
        self.entries.get(p).map(|e| &**e)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Estimated heap bytes of the records (see [`FileRecord::heap_cost`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `entry`, keeping `by_sequence` and `bytes` in step.
    fn insert(&mut self, entry: Entry) {
        if let Some(old) = self.entries.remove(&entry.record.path) {
            self.forget(&old);
        }
        self.bytes += entry.record.heap_cost();
        if !entry.record.deleted {
            self.live += 1;
            self.content_bytes += held_bytes(&entry.record);
        }
        self.by_sequence
            .insert(entry.sequence, entry.record.path.clone());
        self.entries
            .insert(entry.record.path.clone(), Box::new(entry));
    }

    fn forget(&mut self, old: &Entry) {
        self.bytes = self.bytes.saturating_sub(old.record.heap_cost());
        if !old.record.deleted {
            self.live = self.live.saturating_sub(1);
            self.content_bytes = self.content_bytes.saturating_sub(held_bytes(&old.record));
        }
        if self.by_sequence.get(&old.sequence) == Some(&old.record.path) {
            self.by_sequence.remove(&old.sequence);
        }
    }

    /// Live (not deleted) records.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// Bytes of file content the live records hold (`[tree] max_size`).
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().map(|e| &**e)
    }

    /// The record changed last (`None`: the index is empty).
    pub fn newest(&self) -> Option<&Entry> {
        self.by_sequence.values().rev().find_map(|p| self.get(p))
    }

    /// Records changed after `sequence`, in sequence order.
    pub fn changed_since(&self, sequence: u64) -> impl Iterator<Item = &Entry> {
        self.by_sequence
            .range((Bound::Excluded(sequence), Bound::Unbounded))
            .filter_map(|(_, p)| self.get(p))
    }

    /// Paths at or below `dir` (for a directory that vanished or was moved away).
    /// One range of the sorted paths: O(log n + found), not a pass over the index
    /// (issue 29: each rescanned path and each changed link asked this).
    pub fn paths_within(&self, dir: &RelPath) -> Vec<RelPath> {
        dir.within_map(&self.entries)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// True when `stat` matches what we last saw, so hashing can be skipped.
    pub fn unchanged(&self, p: &RelPath, stat: &LocalStat) -> bool {
        self.entries
            .get(p)
            .is_some_and(|e| !e.record.deleted && e.stat.as_ref() == Some(stat))
    }

    /// Stores `record` (from a peer or a local change) under a fresh sequence number,
    /// learned at `now_ns`. The time of a version already held is kept. A deletion of
    /// a path not held (recorded only to pass it on, or taken back from a peer right
    /// after this node collected it) counts as learned when its author made it, at
    /// most now: otherwise two nodes that collect at different times would hand the
    /// tombstone back and forth, each time for a full retention.
    pub fn put(&mut self, record: FileRecord, stat: Option<LocalStat>, now_ns: i64) -> u64 {
        self.put_shared(Arc::new(record), stat, now_ns)
    }

    /// [`Index::put`] of a record that may already be held elsewhere (a peer's view).
    pub fn put_shared(
        &mut self,
        record: Arc<FileRecord>,
        stat: Option<LocalStat>,
        now_ns: i64,
    ) -> u64 {
        self.sequence += 1;
        let seq = self.sequence;
        let learned_ns = match self.entries.get(&record.path) {
            Some(e) if e.record.version == record.version => e.learned_ns,
            None if record.deleted => crate::core::authorship::vouched_ns(&record)
                .unwrap_or(record.mtime_ns)
                .min(now_ns),
            _ => now_ns,
        };
        self.insert(Entry {
            record,
            sequence: seq,
            stat,
            learned_ns,
        });
        seq
    }

    /// Replaces the authorship of the record at `p` (a newer attestation of the same
    /// version) under a fresh sequence number, so peers are sent it; the learned time
    /// and the stat stay. Returns the sequence, `None` if `p` is not held.
    pub fn reattest(&mut self, p: &RelPath, auth: crate::core::record::Authorship) -> Option<u64> {
        let mut e = self.entries.remove(p)?;
        self.forget(&e);
        self.sequence += 1;
        e.sequence = self.sequence;
        Arc::make_mut(&mut e.record).auth = Some(auth);
        self.insert(*e);
        Some(self.sequence)
    }

    /// Restores an entry as persisted (no new sequence number).
    pub fn restore(&mut self, entry: Entry) {
        self.sequence = self.sequence.max(entry.sequence);
        self.insert(entry);
    }

    /// Collects tombstones that every configured peer has acknowledged (`acked_by_all`
    /// is the lowest sequence of ours any of them acknowledged) and that this node
    /// learned of longer than `retention` ([`TOMBSTONE_RETENTION`] by default) before
    /// `now_ns`, on its own clock. The newest record is never collected, so the
    /// sequence survives a restart (it is restored from the records). Returns the
    /// collected paths.
    pub fn collect_tombstones(
        &mut self,
        now_ns: i64,
        acked_by_all: u64,
        retention: Duration,
    ) -> Vec<RelPath> {
        let retention = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = now_ns.saturating_sub(retention);
        let newest = self.sequence;
        let gone: Vec<RelPath> = self
            .entries
            .values()
            .filter(|e| {
                e.record.deleted
                    && e.sequence <= acked_by_all
                    && e.sequence < newest
                    && e.learned_ns < cutoff
            })
            .map(|e| e.record.path.clone())
            .collect();
        for p in &gone {
            if let Some(e) = self.entries.remove(p) {
                self.forget(&e);
            }
        }
        gone
    }

    /// Attaches the author's signature to the record at `p` (same sequence: the
    /// signature is made right after the change is recorded, before it is sent).
    pub fn set_auth(&mut self, p: &RelPath, auth: Authorship) {
        if let Some(mut e) = self.entries.remove(p) {
            self.forget(&e);
            Arc::make_mut(&mut e.record).auth = Some(auth);
            self.insert(*e);
        }
    }

    /// Updates only the stat cache (after an apply or a content-neutral touch).
    pub fn set_stat(&mut self, p: &RelPath, stat: Option<LocalStat>) {
        if let Some(e) = self.entries.get_mut(p) {
            e.stat = stat;
        }
    }

    /// Folds one scan observation in. Returns the new record when it is a change
    /// (our counter bumped), `None` when nothing replicable changed.
    pub fn observe(
        &mut self,
        p: &RelPath,
        seen: Option<Observed>,
        now_ns: i64,
    ) -> Option<FileRecord> {
        let prev = self.entries.get(p);
        match (prev, seen) {
            (None, None) => None,
            (Some(e), None) if e.record.deleted => None,
            (Some(e), None) => {
                let mut r = FileRecord::clone(&e.record);
                if let Err(e) = r.version.bump_at(self.me, clock(now_ns)) {
                    tracing::error!(path = %p, error = %e, "deletion not recorded");
                    return None;
                }
                r.deleted = true;
                r.size = 0;
                r.hash = ContentHash::default();
                r.target.clear();
                r.mtime_ns = now_ns.max(e.record.mtime_ns);
                r.modified_by = self.me;
                r.auth = None;
                self.put(r.clone(), None, now_ns);
                Some(r)
            }
            (prev, Some(o)) => {
                if let Some(e) = prev.filter(|e| !e.record.deleted) {
                    let applied_mode = e.stat.map_or(e.record.mode, |s| s.mode);
                    let same = e.record.kind == o.kind
                        && e.record.hash == o.hash
                        && e.record.target == o.target
                        && applied_mode == o.mode;
                    if same {
                        self.set_stat(p, Some(o.stat));
                        return None;
                    }
                }
                let mut version = prev.map(|e| e.record.version.clone()).unwrap_or_default();
                if let Err(e) = version.bump_at(self.me, clock(now_ns)) {
                    tracing::error!(path = %p, error = %e, "change not recorded");
                    return None;
                }
                let r = FileRecord {
                    path: p.clone(),
                    kind: o.kind,
                    size: o.size,
                    mode: o.mode,
                    mtime_ns: o.mtime_ns,
                    hash: o.hash,
                    target: o.target,
                    version,
                    deleted: false,
                    modified_by: self.me,
                    auth: None,
                };
                self.put(r.clone(), Some(o.stat), now_ns);
                Some(r)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn file(path: &str, content: u8, mtime: i64) -> Observed {
        Observed {
            kind: Kind::File,
            size: 1,
            mode: 0o644,
            mtime_ns: mtime,
            hash: ContentHash([content; 32]),
            target: String::new(),
            stat: LocalStat {
                size: 1,
                mtime_ns: mtime,
                mode: 0o644,
                ino: path.len() as u64,
                ctime_ns: mtime,
            },
        }
    }

    #[test]
    fn observe_bumps_only_on_change() {
        let me = ShortId(7);
        let mut ix = Index::new(me);
        let p = RelPath::parse("a").unwrap();
        let r1 = ix.observe(&p, Some(file("a", 1, 10)), 10).unwrap();
        assert_eq!(r1.version.counter(me), 1);
        // Same content, new mtime: no new version.
        assert!(ix.observe(&p, Some(file("a", 1, 20)), 20).is_none());
        let r2 = ix.observe(&p, Some(file("a", 2, 30)), 30).unwrap();
        assert_eq!(r2.version.counter(me), 2);
        // Counters follow the clock (µs) when it is ahead.
        let del = ix.observe(&p, None, 40_000).unwrap();
        assert!(del.deleted && del.version.counter(me) == 40);
        assert!(ix.observe(&p, None, 50).is_none());
        assert_eq!(ix.sequence(), 3);
        let seqs: Vec<u64> = ix.changed_since(0).map(|e| e.sequence).collect();
        assert_eq!(seqs, vec![3]);
    }

    #[test]
    fn chmod_is_a_change() {
        let mut ix = Index::new(ShortId(1));
        let p = RelPath::parse("k.pem").unwrap();
        ix.observe(&p, Some(file("k.pem", 1, 10)), 10);
        let mut o = file("k.pem", 1, 10);
        o.mode = 0o600;
        o.stat.mode = 0o600;
        let r = ix.observe(&p, Some(o), 11).unwrap();
        assert_eq!(r.mode, 0o600);
    }

    #[test]
    fn tombstones_are_collected_once_acked_by_all_and_retained() {
        let mut ix = Index::new(ShortId(1));
        let day = 24 * 3600 * 1_000_000_000i64;
        let t0 = 100 * day;
        for name in ["a", "b", "c"] {
            let p = RelPath::parse(name).unwrap();
            ix.observe(&p, Some(file(name, 1, t0)), t0);
            ix.observe(&p, None, t0); // tombstones at sequences 2, 4, 6
        }
        ix.observe(
            &RelPath::parse("live").unwrap(),
            Some(file("live", 1, t0)),
            t0,
        ); // 7
        let tombstones = |ix: &Index| ix.entries().filter(|e| e.record.deleted).count();
        // Acked by every peer, but not yet retained long enough.
        assert!(ix
            .collect_tombstones(t0 + 6 * day, 7, TOMBSTONE_RETENTION)
            .is_empty());
        // Retained long enough, but one peer has only acked up to 3.
        let gone = ix.collect_tombstones(t0 + 8 * day, 3, TOMBSTONE_RETENTION);
        assert_eq!(gone, vec![RelPath::parse("a").unwrap()]);
        assert_eq!(tombstones(&ix), 2);
        // Everyone acked everything: all go; the live file stays, the sequence too.
        assert_eq!(
            ix.collect_tombstones(t0 + 8 * day, 7, TOMBSTONE_RETENTION)
                .len(),
            2
        );
        assert_eq!((ix.len(), tombstones(&ix), ix.sequence()), (1, 0, 7));
        let live = ix.entries().next().unwrap().record.heap_cost();
        assert_eq!(ix.bytes(), live);
        assert_eq!(ix.live_count(), 1);
        assert_eq!(ix.content_bytes(), ix.entries().next().unwrap().record.size);
        assert_eq!(ix.changed_since(0).count(), 1);
    }

    #[test]
    fn tombstones_are_collected_by_when_this_node_learned_them_not_by_their_mtime() {
        let day = 24 * 3600 * 1_000_000_000i64;
        let t0 = 100 * day;
        let mut ix = Index::new(ShortId(1));
        let p = RelPath::parse("a").unwrap();
        // A peer's deletion whose author-set mtime is ancient, learned at t0.
        let mut gone = ix.observe(&p, Some(file("a", 1, 1)), 1).unwrap();
        gone.version.bump_at(ShortId(2), 5).unwrap();
        (gone.deleted, gone.mtime_ns, gone.modified_by) = (true, 1, ShortId(2));
        ix.put(gone.clone(), None, t0);
        assert_eq!(ix.get(&p).unwrap().learned_ns, t0);
        // The same version again (a renewed signature, a restore) keeps its time.
        ix.put(gone, None, t0 + 6 * day);
        assert_eq!(ix.get(&p).unwrap().learned_ns, t0);
        ix.observe(&RelPath::parse("b").unwrap(), Some(file("b", 1, t0)), t0);
        assert!(ix
            .collect_tombstones(t0 + 6 * day, 9, TOMBSTONE_RETENTION)
            .is_empty());
        let gone = ix.collect_tombstones(t0 + 8 * day, 9, TOMBSTONE_RETENTION);
        assert_eq!(gone, vec![p]);
    }

    #[test]
    fn a_deletion_of_a_path_not_held_counts_from_when_it_was_made() {
        let day = 24 * 3600 * 1_000_000_000i64;
        let mut ix = Index::new(ShortId(1));
        let p = RelPath::parse("a").unwrap();
        let mut gone = Index::new(ShortId(2))
            .observe(&p, Some(file("a", 1, 1)), day)
            .unwrap();
        (gone.deleted, gone.mtime_ns) = (true, 2 * day);
        ix.put(gone.clone(), None, 9 * day);
        assert_eq!(ix.get(&p).unwrap().learned_ns, 2 * day);
        // Never later than now (an author clock ahead).
        let mut ix = Index::new(ShortId(1));
        gone.mtime_ns = 20 * day;
        ix.put(gone, None, 9 * day);
        assert_eq!(ix.get(&p).unwrap().learned_ns, 9 * day);
    }

    #[test]
    fn the_newest_record_is_never_collected() {
        let mut ix = Index::new(ShortId(1));
        let p = RelPath::parse("a").unwrap();
        ix.observe(&p, Some(file("a", 1, 1)), 1);
        ix.observe(&p, None, 1);
        assert!(ix
            .collect_tombstones(i64::MAX, u64::MAX, TOMBSTONE_RETENTION)
            .is_empty());
    }

    #[test]
    fn changed_since_the_maximum_is_empty() {
        let mut ix = Index::new(ShortId(1));
        ix.observe(&RelPath::parse("a").unwrap(), Some(file("a", 1, 1)), 1);
        assert_eq!(ix.changed_since(u64::MAX).count(), 0);
    }
}
