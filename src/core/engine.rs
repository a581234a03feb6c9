//! The sans-I/O sync engine: the local [`Index`], the peers' views and needs
//! ([`Plan`]) and, per connected peer, what has been sent to it (records and acks).
//! Every change to the index or the plan goes through an `Engine` method, which
//! re-derives the needs it affects, so no caller can forget `Plan::evaluate`.
//!
//! It takes plain inputs (local observations, applied records, a peer's index and
//! acks, connect/disconnect, `now`) and returns plain outputs ([`Transmit`]s, events).
//! The daemon's async tasks (`peer`, `pull`, `watch`, `node`) and the simulator
//! (`sim`) drive this same code. No tokio, no `std::fs`, no quinn here.

use std::collections::HashMap;

use crate::identity::DeviceId;
use crate::index::{FileRecord, Index, LocalStat, Observed};
use crate::paths::RelPath;
use crate::plan::{OverBudget, Plan, PlanEvent};

/// Largest content sent inline with its record.
pub const MAX_INLINE: usize = 16 << 10;

/// Most records one peer may announce (bounds memory against an index flood: about
/// 0.7 KiB each, so ~70 MiB; a certificate tree has a few thousand). Bytes are
/// bounded too: `plan::MAX_PEER_BYTES`.
pub const MAX_PEER_RECORDS: usize = 100_000;

/// A peer broke a rule of the sync protocol; the session with it should end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The peer announced more records than [`MAX_PEER_RECORDS`].
    #[error("more than {MAX_PEER_RECORDS} records")]
    TooManyRecords,
    /// The peer's announced records would exceed its byte budget.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// The peer acknowledged a sequence we never handed out.
    #[error("acknowledges sequence {acked}, ours is only {ours}")]
    AckBeyond { acked: u64, ours: u64 },
}

impl EngineError {
    /// The kind of message that broke the rule (`"index"` or `"ack"`).
    pub fn what(&self) -> &'static str {
        match self {
            EngineError::TooManyRecords | EngineError::OverBudget(_) => "index",
            EngineError::AckBeyond { .. } => "ack",
        }
    }
}

/// Identifies one session's send state: a sender whose session was replaced or
/// ended gets nothing more from [`Engine::poll_transmit`] and should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendToken(u64);

/// One of our records to announce to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub record: FileRecord,
    /// Our sequence number for it.
    pub sequence: u64,
    /// The peer announced exactly this (live) content: no need to send it inline.
    pub peer_has_content: bool,
    /// Send the content with the record if the sender has it at hand: a small file
    /// the peer does not have, in an increment (the full index goes without).
    pub send_inline: bool,
}

/// Index records to send: the full index once per session, then increments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSend {
    /// True for the full index that opens a session.
    pub full: bool,
    /// Every record changed since the last send, in sequence order.
    pub records: Vec<Outgoing>,
    /// Our sequence these records bring the peer up to.
    pub upto: u64,
}

/// What to send to one peer now: index records first, then the ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub index: Option<IndexSend>,
    /// The peer's sequence we acknowledge, when it changed since the last one sent.
    pub ack: Option<u64>,
}

/// What a sender has sent in one session (what `send_loop` used to keep).
#[derive(Debug)]
struct SendState {
    token: SendToken,
    /// Our sequence sent up to; `None` until the full index went out.
    sent: Option<u64>,
    /// The last ack sent.
    acked: u64,
}

/// The index, the plan and the per-peer send state, changed only together.
#[derive(Debug)]
pub struct Engine {
    index: Index,
    plan: Plan,
    sends: HashMap<DeviceId, SendState>,
    next_token: u64,
    /// Our sequence known to be on disk, when tracked: records beyond it are not
    /// announced yet (after a crash their sequence numbers would be handed out
    /// again). `None`: everything counts as durable.
    durable: Option<u64>,
    /// Test fault: acks one sequence further than `Plan::ack_for` allows, so a test
    /// can prove the simulator runs this code.
    #[cfg(test)]
    pub(crate) break_acks: bool,
}

impl Engine {
    /// An engine over a loaded index that fetches no file larger than
    /// `max_file_size` bytes.
    pub fn new(index: Index, max_file_size: u64) -> Self {
        Engine {
            index,
            plan: Plan::new(max_file_size),
            sends: HashMap::new(),
            next_token: 0,
            durable: None,
            #[cfg(test)]
            break_acks: false,
        }
    }

    /// From now on, announce only what [`Engine::persisted`] reported on disk (the
    /// index as loaded is).
    pub fn track_durability(&mut self) {
        self.durable = Some(self.index.sequence());
    }

    /// Our records up to `sequence` are on disk: they may be announced.
    pub fn persisted(&mut self, sequence: u64) {
        if let Some(d) = &mut self.durable {
            *d = (*d).max(sequence.min(self.index.sequence()));
        }
    }

    /// Gives the index back (a restart keeps it and loses everything else).
    pub fn into_index(self) -> Index {
        self.index
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Our short device id, as the index stamps versions with it.
    pub fn me(&self) -> crate::identity::ShortId {
        self.index.me()
    }

    /// A session with `peer` starts: a fresh view of it, and a send state that
    /// begins with our full index. Replaces any previous session's send state.
    pub fn connected(&mut self, peer: DeviceId) -> SendToken {
        self.plan.connected(peer, &self.index);
        self.next_token += 1;
        let token = SendToken(self.next_token);
        let state = SendState {
            token,
            sent: None,
            acked: 0,
        };
        self.sends.insert(peer, state);
        token
    }

    /// The session with `peer` ended: its view and send state are dropped.
    pub fn disconnected(&mut self, peer: DeviceId) {
        self.sends.remove(&peer);
        self.plan.disconnected(peer, &self.index);
    }

    /// True while `token` is the current session's send state for `peer`.
    pub fn is_current(&self, peer: &DeviceId, token: SendToken) -> bool {
        self.sends.get(peer).is_some_and(|s| s.token == token)
    }

    /// Records announced by `peer` (each with its sequence), up to `last_sequence`:
    /// refused beyond [`MAX_PEER_RECORDS`] or the peer's byte budget, otherwise
    /// taken into its view and the needs re-derived.
    pub fn handle_index(
        &mut self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
        last_sequence: u64,
    ) -> Result<(), EngineError> {
        if self.plan.peer_record_count(&peer) + records.len() > MAX_PEER_RECORDS {
            return Err(EngineError::TooManyRecords);
        }
        self.plan.admit(&peer, &records)?;
        self.plan.receive(peer, records, last_sequence, &self.index);
        Ok(())
    }

    /// `peer` acknowledged our records up to `sequence`; refused beyond our sequence.
    pub fn handle_ack(&mut self, peer: DeviceId, sequence: u64) -> Result<(), EngineError> {
        let ours = self.index.sequence();
        if sequence > ours {
            return Err(EngineError::AckBeyond {
                acked: sequence,
                ours,
            });
        }
        self.plan.acked(peer, sequence);
        Ok(())
    }

    /// What to send to `peer` in the session of `token` now, if anything, and
    /// counts it as sent. Every change goes to every peer, even the one it came
    /// from: the peer's view of us must stay exact for the conflict rule.
    pub fn poll_transmit(&mut self, peer: DeviceId, token: SendToken) -> Option<Transmit> {
        let send = self.sends.get_mut(&peer).filter(|s| s.token == token)?;
        let upto = self
            .durable
            .map_or(self.index.sequence(), |d| d.min(self.index.sequence()));
        let index = match send.sent {
            None => Some(IndexSend {
                full: true,
                records: changes(&self.index, &self.plan, &peer, 0, upto, true),
                upto,
            }),
            Some(sent) if upto > sent => Some(IndexSend {
                full: false,
                records: changes(&self.index, &self.plan, &peer, sent, upto, false),
                upto,
            }),
            Some(_) => None,
        };
        if index.is_some() {
            send.sent = Some(upto);
        }
        let ack = self.plan.ack_for(&peer, &self.index);
        #[cfg(test)]
        let ack = ack + u64::from(self.break_acks);
        let ack = (ack != send.acked).then_some(ack);
        if let Some(a) = ack {
            send.acked = a;
        }
        (index.is_some() || ack.is_some()).then_some(Transmit { index, ack })
    }

    /// The scanner saw `seen` at `p` (`None`: nothing there) at `now_ns`: a local
    /// change gets a new version and sequence. Returns the new record, if any.
    pub fn observe(
        &mut self,
        p: &RelPath,
        seen: Option<Observed>,
        now_ns: i64,
    ) -> Option<FileRecord> {
        let changed = self.index.observe(p, seen, now_ns)?;
        self.plan.evaluate(p, &self.index);
        Some(changed)
    }

    /// A needed record was written to the tree (`stat`: what is on disk now, `None`
    /// for a deletion): it becomes the local record. Returns its sequence.
    pub fn applied(&mut self, record: FileRecord, stat: Option<LocalStat>) -> u64 {
        let p = record.path.clone();
        let seq = self.index.put(record, stat);
        self.plan.evaluate(&p, &self.index);
        seq
    }

    /// Drops tombstones older than `index::TOMBSTONE_RETENTION` at `now_ns` that
    /// every peer acknowledged (`acked_by_all`). Needs are not re-derived: every peer
    /// has seen the deletion, so none can still announce what it replaced.
    pub fn collect_tombstones(&mut self, now_ns: i64, acked_by_all: u64) -> Vec<RelPath> {
        self.index.collect_tombstones(now_ns, acked_by_all)
    }

    /// What the plan decided since the last call that should be logged once.
    pub fn take_events(&mut self) -> Vec<PlanEvent> {
        self.plan.take_events()
    }
}

/// Our records changed after `since` up to `upto`, each marked with whether `peer`
/// has its content and whether it should go inline.
fn changes(
    index: &Index,
    plan: &Plan,
    peer: &DeviceId,
    since: u64,
    upto: u64,
    full: bool,
) -> Vec<Outgoing> {
    index
        .changed_since(since)
        .filter(|e| e.sequence <= upto)
        .map(|e| {
            let r = &e.record;
            let peer_has_content = plan
                .peer_record(peer, &r.path)
                .is_some_and(|p| !p.deleted && p.hash == r.hash);
            let send_inline = !full
                && !peer_has_content
                && !r.deleted
                && r.kind == crate::index::Kind::File
                && r.size as usize <= MAX_INLINE;
            Outgoing {
                record: r.clone(),
                sequence: e.sequence,
                peer_has_content,
                send_inline,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ShortId;

    fn peer() -> DeviceId {
        DeviceId([9; 32])
    }

    fn engine_with(paths: &[&str]) -> Engine {
        let mut e = Engine::new(Index::new(ShortId(100)), u64::MAX);
        for (i, p) in paths.iter().enumerate() {
            let p = RelPath::parse(p).unwrap();
            let seen = crate::index::tests::file(p.as_str(), i as u8, 1);
            e.observe(&p, Some(seen), 1);
        }
        e
    }

    #[test]
    fn a_session_gets_the_full_index_then_only_increments() {
        let mut e = engine_with(&["a", "b"]);
        let token = e.connected(peer());
        let t = e.poll_transmit(peer(), token).unwrap();
        let ix = t.index.unwrap();
        assert!(ix.full);
        assert_eq!((ix.records.len(), ix.upto, t.ack), (2, 2, None));
        assert_eq!(e.poll_transmit(peer(), token), None);
        let c = RelPath::parse("c").unwrap();
        e.observe(&c, Some(crate::index::tests::file("c", 7, 2)), 2);
        let ix = e.poll_transmit(peer(), token).unwrap().index.unwrap();
        assert!(!ix.full);
        assert_eq!((ix.records.len(), ix.upto), (1, 3));
    }

    #[test]
    fn a_replaced_session_gets_nothing_more() {
        let mut e = engine_with(&["a"]);
        let old = e.connected(peer());
        let new = e.connected(peer());
        assert!(!e.is_current(&peer(), old));
        assert_eq!(e.poll_transmit(peer(), old), None);
        assert!(e.poll_transmit(peer(), new).is_some());
        e.disconnected(peer());
        assert!(!e.is_current(&peer(), new));
    }

    #[test]
    fn acks_are_sent_when_they_change() {
        let mut e = engine_with(&[]);
        let token = e.connected(peer());
        e.poll_transmit(peer(), token);
        let p = RelPath::parse("x").unwrap();
        let seen = crate::index::tests::file("x", 3, 1);
        let record = e.observe(&p, Some(seen), 1).unwrap();
        // The peer announces our own record back: nothing needed, acked at once.
        e.handle_index(peer(), vec![(record, 4)], 4).unwrap();
        let t = e.poll_transmit(peer(), token).unwrap();
        assert_eq!(t.ack, Some(4));
        assert_eq!(e.poll_transmit(peer(), token), None);
    }

    #[test]
    fn only_what_is_on_disk_is_announced() {
        let mut e = engine_with(&["a"]);
        e.track_durability();
        let token = e.connected(peer());
        assert_eq!(
            e.poll_transmit(peer(), token).unwrap().index.unwrap().upto,
            1
        );
        for (i, p) in ["b", "c"].iter().enumerate() {
            let p = RelPath::parse(p).unwrap();
            e.observe(
                &p,
                Some(crate::index::tests::file(p.as_str(), 5 + i as u8, 2)),
                2,
            );
        }
        assert_eq!(
            e.poll_transmit(peer(), token),
            None,
            "b and c are not on disk yet"
        );
        e.persisted(2);
        let ix = e.poll_transmit(peer(), token).unwrap().index.unwrap();
        assert_eq!((ix.upto, ix.records.len()), (2, 1));
        assert_eq!(ix.records[0].record.path.as_str(), "b");
        e.persisted(u64::MAX); // never beyond what exists
        let ix = e.poll_transmit(peer(), token).unwrap().index.unwrap();
        assert_eq!((ix.upto, ix.records.len()), (3, 1));
    }

    #[test]
    fn an_ack_beyond_our_sequence_is_refused() {
        let mut e = engine_with(&["a"]);
        e.connected(peer());
        assert!(e.handle_ack(peer(), 1).is_ok());
        assert_eq!(e.plan().peer_acked(&peer()), 1);
        let err = e.handle_ack(peer(), u64::MAX).unwrap_err();
        assert_eq!(err.what(), "ack");
        assert!(err.to_string().contains("ours is only 1"), "{err}");
    }
}
