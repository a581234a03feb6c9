//! What this node needs from whom: the peers' announced records, the resulting set of
//! needed records (with the conflict rule applied), and the acknowledgements. Pure:
//! the peer tasks feed it records, the puller reads `needs()`.

use std::collections::{BTreeMap, HashMap};

use crate::identity::DeviceId;
use crate::index::{FileRecord, Index};
use crate::paths::RelPath;
use crate::version::Relation;

/// One record to bring in. `target.version` is the version to store once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub target: FileRecord,
    /// The local content loses a conflict and must be kept as a conflict copy.
    pub conflict: bool,
}

#[derive(Debug, Default)]
struct PeerView {
    records: HashMap<RelPath, (FileRecord, u64)>,
    received_upto: u64,
    acked: u64,
}

/// Peers' views and the needs derived from them.
#[derive(Debug, Default)]
pub struct Plan {
    peers: HashMap<DeviceId, PeerView>,
    needs: BTreeMap<RelPath, Need>,
}

impl Plan {
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
        let paths: Vec<RelPath> = records.iter().map(|(r, _)| r.path.clone()).collect();
        for (r, seq) in records {
            view.received_upto = view.received_upto.max(seq);
            view.records.insert(r.path.clone(), (r, seq));
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
        self.peers.get(peer)?.records.get(p).map(|(r, _)| r)
    }

    /// Re-derives the need for one path after its local record or a peer's changed.
    pub fn evaluate(&mut self, p: &RelPath, index: &Index) {
        let local = index.get(p).map(|e| &e.record);
        // Contenders: peers' records the local one has not seen…
        let seen = self
            .peers
            .values()
            .filter_map(|v| v.records.get(p).map(|(r, _)| r))
            .filter(|r| !local.is_some_and(|l| l.version.covers(&r.version)));
        let mut contenders: Vec<&FileRecord> = Vec::new();
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
        match need {
            Some(n) => {
                self.needs.insert(p.clone(), n);
            }
            None => {
                self.needs.remove(p);
            }
        }
    }

    pub fn needs(&self) -> impl Iterator<Item = &Need> {
        self.needs.values()
    }

    /// Needed paths at or below `dir`.
    pub fn needs_within<'a>(&'a self, dir: &'a RelPath) -> impl Iterator<Item = &'a RelPath> + 'a {
        self.needs
            .range(dir.clone()..)
            .map(|(p, _)| p)
            .take_while(move |p| p.as_str().starts_with(dir.as_str()))
            .filter(move |p| p.is_within(dir))
    }

    pub fn need(&self, p: &RelPath) -> Option<&Need> {
        self.needs.get(p)
    }

    pub fn needs_len(&self) -> usize {
        self.needs.len()
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
        let pending = self
            .needs
            .keys()
            .filter_map(|p| {
                let (r, seq) = view.records.get(p)?;
                let covered = index
                    .get(p)
                    .is_some_and(|e| e.record.version.covers(&r.version));
                (!covered).then_some(*seq)
            })
            .min();
        match pending {
            Some(s) => view.received_upto.min(s.saturating_sub(1)),
            None => view.received_upto,
        }
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
