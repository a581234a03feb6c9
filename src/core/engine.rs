//! The sans-I/O sync engine: the local [`Index`], the peers' views and needs
//! ([`Plan`]) and, per connected peer, what has been sent to it (records and acks).
//! Every change to the index or the plan goes through an `Engine` method, which
//! re-derives the needs it affects, so no caller can forget `Plan::evaluate`.
//!
//! It takes plain inputs (local observations, applied records, a peer's index and
//! acks, connect/disconnect, `now`) and returns plain outputs ([`Transmit`]s, events).
//! The daemon's async tasks (`peer`, `pull`, `watch`, `node`) and the simulator
//! (`sim`) drive this same code. No tokio, no `std::fs`, no quinn here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::core::authorship::{self, Refusal, Writers};
use crate::core::cluster::{
    self, BarrierStatus, Cluster, ClusterMsg, Confirm, Member, NodeStatus, Report,
};
use crate::core::device::{DeviceId, NodeSigner};
use crate::core::index::{Index, LocalStat, Observed, TOMBSTONE_RETENTION};
use crate::core::paths::RelPath;
use crate::core::plan::{DiskSpace, Plan, PlanEvent, TreeBudget};
use crate::core::record::FileRecord;
use crate::core::served::{ServedBoard, ServedRecord, SignedReport};

/// Largest content sent inline with its record.
pub const MAX_INLINE: usize = 16 << 10;

/// Most records one peer's view holds (`plan::MAX_PEER_RECORDS`, the index's own
/// cap): past it, its new paths are refused and the session stays up.
pub const MAX_PEER_RECORDS: usize = crate::core::plan::MAX_PEER_RECORDS;

/// A peer broke a rule of the sync protocol; the session with it should end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The peer acknowledged a sequence we never handed out.
    #[error("acknowledges sequence {acked}, ours is only {ours}")]
    AckBeyond { acked: u64, ours: u64 },
    /// The peer's serving-probe report broke a bound.
    #[error("served report: {0}")]
    Served(String),
    /// The peer sent more records with forged authorship (or unsigned barrier
    /// reports) in a minute than [`MAX_REFUSED_PER_MINUTE`] (refusals
    /// have consequences).
    #[error(
        "too many refused records: {count} with forged authorship within a minute \
         (at most {limit})"
    )]
    RefusingTooMuch { count: u64, limit: u64 },
}

impl EngineError {
    /// The kind of message that broke the rule (`"ack"`; a cap on what a peer
    /// announces is never one: its new paths are refused, the session goes on).
    pub fn what(&self) -> &'static str {
        match self {
            EngineError::RefusingTooMuch { .. } => "index",
            EngineError::AckBeyond { .. } => "ack",
            EngineError::Served(_) => "served",
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
    pub record: Arc<FileRecord>,
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
    /// Cluster-wide barrier requests and reports, after the ack.
    pub cluster: Vec<ClusterMsg>,
    /// Serving-probe reports: this node's newest and those it relays
    /// (only to peers that take them).
    pub served: Vec<SignedReport>,
}

/// What a sender has sent in one session.
#[derive(Debug)]
struct SendState {
    token: SendToken,
    /// Our sequence sent up to; `None` until the full index went out.
    sent: Option<u64>,
    /// The last ack sent.
    acked: u64,
    /// The peer takes serving-probe reports (said in its hello).
    takes_served: bool,
}

/// Records of one peer refused for their authorship, since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    pub count: u64,
    pub last_path: Option<RelPath>,
    /// The author the last refused record claimed (`None`: it claimed none).
    pub last_author: Option<DeviceId>,
    pub last_reason: Option<String>,
    /// Start of the current one-minute window (refusals have consequences).
    pub window_start_ns: i64,
    /// Records refused in the current window.
    pub in_window: u64,
}

/// New paths of one peer refused because its view held its cap, since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverCap {
    pub count: u64,
    pub last_path: Option<RelPath>,
}
/// Most peers whose refused records are tallied. Only configured peers hold
/// sessions, so this is a bound, not a limit a fleet meets; beyond it the tally with
/// the fewest refusals is forgotten.
pub const MAX_REFUSED_PEERS: usize = 1024;
/// Records one peer may send within [`REFUSAL_WINDOW_NS`] that are refused as
/// forged ([`Refusal::is_forged`]: each cost a signature check) or barrier reports
/// not signed by their node; one more ends its session
/// ([`EngineError::RefusingTooMuch`]). An honest peer sends none (a relay forwards
/// records and reports unchanged); records refused only because their author is
/// not in this node's `writers` do not count (a config mismatch explains them).
pub const MAX_REFUSED_PER_MINUTE: u64 = 1000;
/// The window [`MAX_REFUSED_PER_MINUTE`] counts in.
pub const REFUSAL_WINDOW_NS: i64 = 60_000_000_000;

/// The verdict on each record's authorship, made before the state lock is taken
/// (`None`: not made; the engine checks under the lock).
pub type Verdicts = Vec<Option<Result<(), Refusal>>>;

/// Most paths [`NotSent::recent`] remembers.
pub const NOT_SENT_RECENT: usize = 16;

/// Local changes of a node that is not a writer: not sent, put back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotSent {
    /// Local changes seen since start.
    pub count: u64,
    /// The latest paths, newest last, each once.
    pub recent: VecDeque<RelPath>,
}

/// Signing what this node authors and checking what peers send.
#[derive(Debug, Default)]
struct Authority {
    signer: Option<Arc<NodeSigner>>,
    writers: Writers,
    /// This node may change the tree (it is in `writers`, or there is no list).
    writer: bool,
    refused: HashMap<DeviceId, Refused>,
    /// New paths of each peer refused because its view was full.
    over_cap: HashMap<DeviceId, OverCap>,
    not_sent: NotSent,
    /// One copy of each author's certificate, shared by its records (at most
    /// [`MAX_SHARED_CERTS`] authors; beyond, records keep their own copy).
    certs: HashMap<DeviceId, Arc<[u8]>>,
}

/// Most authors whose certificate copies are shared (a fleet has a few writers).
const MAX_SHARED_CERTS: usize = 1024;

impl Authority {
    /// The tally of `peer`, made room for within [`MAX_REFUSED_PEERS`].
    fn tally(&mut self, peer: DeviceId) -> &mut Refused {
        if self.refused.len() >= MAX_REFUSED_PEERS && !self.refused.contains_key(&peer) {
            if let Some(least) = self
                .refused
                .iter()
                .min_by_key(|(_, r)| r.count)
                .map(|(d, _)| *d)
            {
                self.refused.remove(&least);
            }
        }
        self.refused.entry(peer).or_default()
    }

    /// Makes `r` share the copies of its author's (and attester's) certificate
    /// already held, if equal.
    fn share_cert(&mut self, r: &mut FileRecord) {
        let Some(a) = r.auth.as_mut() else {
            return;
        };
        self.share(a.author, &mut a.cert);
        if let Some(b) = a.attestation.as_mut().and_then(|t| t.by.as_mut()) {
            self.share(b.id, &mut b.cert);
        }
    }

    fn share(&mut self, id: DeviceId, cert: &mut Arc<[u8]>) {
        match self.certs.get(&id) {
            Some(c) if c == cert => *cert = c.clone(),
            Some(_) => {}
            None if self.certs.len() < MAX_SHARED_CERTS && DeviceId::of_cert(cert) == id => {
                self.certs.insert(id, cert.clone());
            }
            None => {}
        }
    }
}

/// What a new roster changed ([`Engine::set_roster`]), each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosterChange {
    pub added: Vec<DeviceId>,
    pub removed: Vec<DeviceId>,
}

/// The index, the plan and the per-peer send state, changed only together.
#[derive(Debug)]
pub struct Engine {
    index: Index,
    plan: Plan,
    sends: HashMap<DeviceId, SendState>,
    next_token: u64,
    authority: Authority,
    /// Our sequence known to be on disk, when tracked: records beyond it are not
    /// announced yet (after a crash their sequence numbers would be handed out
    /// again). `None`: everything counts as durable.
    durable: Option<u64>,
    /// Cluster-wide barriers: relayed requests, reports, the barriers we run.
    cluster: Cluster,
    /// The highest sequence of ours each configured peer acknowledged, kept across
    /// its sessions (the plan's view of a peer goes when it disconnects): the one
    /// ack store, read by tombstone collection and `status`.
    acked: HashMap<DeviceId, u64>,
    /// What this node's and its peers' frontends serve.
    served: ServedBoard,
    /// Paths the puller has taken (fetching or applying them): the scanner must not
    /// read them mid-apply, and their needs are not taken twice.
    applying: HashSet<RelPath>,
    /// Paths the scanner skipped while they were being applied: looked at again once
    /// the apply is recorded.
    rescan_after_apply: Vec<RelPath>,
    /// `[tree] tombstone_retention`: how long a learned deletion is kept, and the
    /// replay horizon for records of paths not held (issue 25 item 9).
    retention: Duration,
    /// Test fault: acks one sequence further than `Plan::ack_for` allows, so a test
    /// can prove the simulator runs this code.
    #[cfg(test)]
    pub(crate) break_acks: bool,
    /// Test fault: collects tombstones once the connected peers acked them,
    /// forgetting those away, so a test can prove the simulator runs this rule.
    #[cfg(test)]
    pub(crate) break_tombstone_gate: bool,
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
            authority: Authority {
                writer: true,
                ..Authority::default()
            },
            durable: None,
            cluster: Cluster::default(),
            acked: HashMap::new(),
            served: ServedBoard::default(),
            applying: HashSet::new(),
            rescan_after_apply: Vec::new(),
            retention: TOMBSTONE_RETENTION,
            #[cfg(test)]
            break_acks: false,
            #[cfg(test)]
            break_tombstone_gate: false,
        }
    }

    /// Keeps learned deletions for `retention` (`[tree] tombstone_retention`), which
    /// is also the replay horizon.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Applies the tree budgets (`[tree] max_size`, `max_files`, `min_disk_free`).
    pub fn with_budget(mut self, budget: TreeBudget) -> Self {
        self.plan.set_budget(budget);
        self
    }

    /// The tree's filesystem was measured: `min_disk_free` is checked against it,
    /// and paths a budget refused are decided again when there is room. Returns
    /// whether something is needed now that was not.
    pub fn handle_disk_space(&mut self, disk: DiskSpace) -> bool {
        self.plan.set_disk_space(disk);
        self.plan.recheck_budgets(&self.index)
    }

    /// No source delivered the content of the need at `p` ([`Plan::undelivered`]).
    pub fn undelivered(&mut self, p: &RelPath) {
        self.plan.undelivered(p);
    }

    /// The undelivered need at `p` is tried again ([`Plan::reclaim`]).
    pub fn reclaim(&mut self, p: &RelPath) {
        self.plan.reclaim(p, &self.index);
    }

    /// Paths the puller has taken and not yet recorded.
    pub fn applying(&self) -> &HashSet<RelPath> {
        &self.applying
    }

    /// The plan and the index to decide from, and the set of taken paths to mark:
    /// the pipeline's view ([`crate::core::pipeline::Pipeline`]).
    pub fn pipeline_parts(&mut self) -> (&Plan, &Index, &mut HashSet<RelPath>) {
        (&self.plan, &self.index, &mut self.applying)
    }

    /// Whether `path` is being applied; if so, the scanner's look at it waits until
    /// the apply is recorded ([`Engine::take_rescans_after_apply`]).
    pub fn defer_if_applying(&mut self, path: &RelPath) -> bool {
        if self.applying.contains(path) {
            self.rescan_after_apply.push(path.clone());
            return true;
        }
        false
    }

    /// The paths the scanner deferred while they were being applied.
    pub fn take_rescans_after_apply(&mut self) -> Vec<RelPath> {
        std::mem::take(&mut self.rescan_after_apply)
    }

    /// Whether anything under `dir` is being applied.
    pub fn applying_within(&self, dir: &RelPath) -> bool {
        self.applying.iter().any(|p| p.is_within(dir))
    }

    /// Signs what this node authors with `signer` and takes in only records
    /// `writers` allows. Records of ours loaded unsigned (written before this
    /// version) are signed now (at `now_ns`), so they pass other nodes' checks.
    pub fn with_authorship(
        mut self,
        signer: Option<Arc<NodeSigner>>,
        writers: Writers,
        now_ns: i64,
    ) -> Self {
        let writer = signer
            .as_ref()
            .map_or(!writers.is_restricted(), |s| writers.allows(&s.id()));
        if let Some(s) = &signer {
            let unsigned: Vec<FileRecord> = self
                .index
                .entries()
                .filter(|e| e.record.modified_by == s.id().short())
                .filter(|e| e.record.auth.as_ref().is_none_or(|a| a.author != s.id()))
                .map(|e| FileRecord::clone(&e.record))
                .collect();
            for mut r in unsigned {
                if authorship::sign(&mut r, s, now_ns) {
                    if let Some(a) = r.auth {
                        self.index.set_auth(&r.path, a);
                    }
                }
            }
        }
        if let Some(s) = &signer {
            self.cluster.set_signer(s.clone());
        }
        self.authority = Authority {
            signer,
            writers,
            writer,
            ..Authority::default()
        };
        self
    }

    /// True when this node may change the tree (`[tree] writers` lists it or is
    /// absent). A reader's local changes are not sent and are put back.
    pub fn is_writer(&self) -> bool {
        self.authority.writer
    }

    /// True when `[tree] writers` is configured.
    pub fn writers_restricted(&self) -> bool {
        self.authority.writers.is_restricted()
    }

    /// Records refused per peer for their authorship.
    pub fn refused(&self) -> &HashMap<DeviceId, Refused> {
        &self.authority.refused
    }

    /// Per peer, new paths refused because its view held its cap, since start.
    pub fn over_cap(&self) -> &HashMap<DeviceId, OverCap> {
        &self.authority.over_cap
    }

    /// A reader's local changes that were not sent.
    pub fn not_sent(&self) -> &NotSent {
        &self.authority.not_sent
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
    pub fn me(&self) -> crate::core::device::ShortId {
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
            takes_served: false,
        };
        self.sends.insert(peer, state);
        self.cluster.set_relaying(peer, false);
        self.refresh_cluster();
        token
    }

    /// The session with `peer` ended: its view and send state are dropped.
    /// Returns whether a path refused for lack of room is needed now (the peer's
    /// needs, e.g. a flood of paths it never served, are gone with it).
    pub fn disconnected(&mut self, peer: DeviceId) -> bool {
        self.sends.remove(&peer);
        self.served.disconnected(&peer);
        self.plan.disconnected(peer, &self.index);
        self.cluster.disconnected(&peer);
        self.refresh_cluster();
        self.plan.recheck_budgets(&self.index)
    }

    /// True while `token` is the current session's send state for `peer`.
    pub fn is_current(&self, peer: &DeviceId, token: SendToken) -> bool {
        self.sends.get(peer).is_some_and(|s| s.token == token)
    }

    /// Records announced by `peer` (each with its sequence), up to `last_sequence`:
    /// taken into its view and the needs re-derived. New paths past the view's cap
    /// ([`MAX_PEER_RECORDS`], `plan::MAX_PEER_BYTES`) are refused, counted for the
    /// peer and named, and acknowledged as refused: a cap never ends the session.
    pub fn handle_index(
        &mut self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
        last_sequence: u64,
    ) -> Result<(), EngineError> {
        self.handle_index_checked(peer, records, Vec::new(), last_sequence, None)
    }

    /// Which of `records` the authorship check must look at (none without
    /// `writers`; a record identical to ours needs none). The caller verifies those
    /// outside the state lock ([`Writers::key_for`], [`authorship::verify`]) and
    /// gives the verdicts to [`Engine::handle_index_checked`].
    pub fn unchecked(&self, records: &[(FileRecord, u64)]) -> Vec<bool> {
        let restricted = self.authority.writers.is_restricted();
        records
            .iter()
            .map(|(r, _)| restricted && self.index.get(&r.path).is_none_or(|e| *e.record != *r))
            .collect()
    }

    /// As [`Engine::handle_index`], with `verdicts` made outside the lock (one per
    /// record, or fewer: the rest are checked here). With `now_ns`, a peer that
    /// sends more than [`MAX_REFUSED_PER_MINUTE`] refused records in a minute is
    /// refused ([`EngineError::RefusingTooMuch`]), its records not taken in.
    pub fn handle_index_checked(
        &mut self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
        verdicts: Verdicts,
        last_sequence: u64,
        now_ns: Option<i64>,
    ) -> Result<(), EngineError> {
        // Authorship first (its verdicts follow the records' order), then the cap:
        // forged records never take room in the peer's view.
        let (records, refused) = self.authorized(peer, records, verdicts, now_ns);
        if let Some(now) = now_ns {
            self.count_refusals(peer, refused, now)?;
        }
        self.take_renewals(&records);
        let (mut records, over) = self.plan.admit(peer, records);
        if let Some(last) = over.last() {
            let stats = self.authority.over_cap.entry(peer).or_default();
            stats.count += over.len() as u64;
            stats.last_path = Some(last.path.clone());
        }
        for (r, _) in &mut records {
            self.authority.share_cert(r);
        }
        self.plan.receive(peer, records, last_sequence, &self.index);
        Ok(())
    }

    /// The records whose author may write and signed them (all of them without
    /// `writers`). A record identical to our own needs no check (it was checked or
    /// made here). The others are refused: counted for `peer`, reported once per
    /// batch, left out of its view (so never needed) and acknowledged as refused.
    /// Also returns how many were refused as forged ([`Refusal::is_forged`]).
    /// With `now_ns`, a live record for a path not held whose author vouched for it
    /// longer than the retention ago is refused as a possible replay
    /// ([`Refusal::Stale`]; not counted as forged).
    fn authorized(
        &mut self,
        peer: DeviceId,
        records: Vec<(FileRecord, u64)>,
        verdicts: Verdicts,
        now_ns: Option<i64>,
    ) -> (Vec<(FileRecord, u64)>, u64) {
        if !self.authority.writers.is_restricted() {
            return (records, 0);
        }
        let mut first: Option<(RelPath, Option<DeviceId>, String)> = None;
        let mut refused = 0;
        let mut forged = 0;
        let mut out = Vec::with_capacity(records.len());
        let mut verdicts = verdicts.into_iter();
        for (r, seq) in records {
            let made = verdicts.next().flatten();
            let same_as_ours = self.index.get(&r.path).is_some_and(|e| *e.record == r);
            let verdict = if same_as_ours {
                Ok(())
            } else if let Some(v) = made {
                v
            } else {
                self.authority.writers.check(&r)
            };
            let verdict = verdict.and_then(|()| match now_ns {
                Some(now) if self.index.get(&r.path).is_none() => {
                    let horizon = i64::try_from(self.retention.as_nanos()).unwrap_or(i64::MAX);
                    authorship::stale(&r, now, horizon).map_or(Ok(()), Err)
                }
                _ => Ok(()),
            });
            match verdict {
                Ok(()) => out.push((r, seq)),
                Err(why) => {
                    let author = r.auth.as_ref().map(|a| a.author);
                    let stats = self.authority.tally(peer);
                    stats.count += 1;
                    stats.last_path = Some(r.path.clone());
                    stats.last_author = author;
                    stats.last_reason = Some(why.to_string());
                    refused += 1;
                    forged += u64::from(why.is_forged());
                    first.get_or_insert((r.path, author, why.to_string()));
                }
            }
        }
        if let Some((path, author, why)) = first {
            self.plan.report(PlanEvent::NotAuthorized {
                path,
                author,
                why,
                count: refused,
            });
        }
        (out, forged)
    }

    /// Takes in renewed attestations of records this node holds (same version, same
    /// fields, attested later; checked by [`Engine::authorized`]): the authorship is
    /// replaced under a new sequence, so it is passed on, with no fetch, no apply and
    /// no hook. Only with `writers`, where attestations are checked.
    fn take_renewals(&mut self, records: &[(FileRecord, u64)]) {
        if !self.authority.writers.is_restricted() {
            return;
        }
        for (r, _) in records {
            let renews = self
                .index
                .get(&r.path)
                .is_some_and(|e| authorship::renews(&e.record, r));
            if let (true, Some(a)) = (renews, &r.auth) {
                self.index.reattest(&r.path, a.clone());
            }
        }
    }

    /// Renews the attestation of up to `limit` live records: our own (authored and
    /// signed here) attested longer than half the retention before `now_ns`, or
    /// never; and those of other writers attested longer than 3/4 of it (their author
    /// silent for a quarter of the retention: gone, or away), in our name. Each gets a
    /// new sequence and reaches every peer as a metadata refresh (version and author
    /// unchanged). Only with `writers` (only then are attestations checked), and only
    /// on a writer. Returns how many.
    pub fn reattest_due(&mut self, now_ns: i64, limit: usize) -> usize {
        let Some(s) = self.authority.signer.clone() else {
            return 0;
        };
        if !self.authority.writers.is_restricted() || !self.authority.writer {
            return 0;
        }
        let half = i64::try_from(self.retention.as_nanos() / 2).unwrap_or(i64::MAX);
        let three_quarters = i64::try_from(self.retention.as_nanos() / 4 * 3).unwrap_or(i64::MAX);
        let me = s.id();
        let writers = &self.authority.writers;
        let due: Vec<FileRecord> = self
            .index
            .entries()
            .filter(|e| !e.record.deleted)
            .filter(|e| {
                let Some(a) = e.record.auth.as_ref() else {
                    return false;
                };
                let vouched = authorship::vouched_ns(&e.record).unwrap_or(i64::MIN);
                if a.author == me {
                    vouched < now_ns.saturating_sub(half) || a.attestation.is_none()
                } else {
                    writers.allows(&a.author) && vouched < now_ns.saturating_sub(three_quarters)
                }
            })
            .take(limit)
            .map(|e| FileRecord::clone(&e.record))
            .collect();
        let mut n = 0;
        for mut r in due {
            if authorship::reattest(&mut r, &s, now_ns) {
                if let Some(a) = r.auth {
                    self.index.reattest(&r.path, a);
                    n += 1;
                }
            }
        }
        n
    }

    /// Counts `refused` records of `peer` in its one-minute window; an error once
    /// they pass [`MAX_REFUSED_PER_MINUTE`].
    fn count_refusals(
        &mut self,
        peer: DeviceId,
        refused: u64,
        now: i64,
    ) -> Result<(), EngineError> {
        if refused == 0 {
            return Ok(());
        }
        let t = self.authority.tally(peer);
        if now.saturating_sub(t.window_start_ns) >= REFUSAL_WINDOW_NS || t.in_window == 0 {
            t.window_start_ns = now;
            t.in_window = 0;
        }
        t.in_window += refused;
        if t.in_window > MAX_REFUSED_PER_MINUTE {
            let count = t.in_window;
            t.in_window = 0;
            return Err(EngineError::RefusingTooMuch {
                count,
                limit: MAX_REFUSED_PER_MINUTE,
            });
        }
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
        if let Some(a) = self.acked.get_mut(&peer) {
            *a = (*a).max(sequence);
        }
        self.refresh_cluster();
        Ok(())
    }

    /// The highest sequence of ours `peer` acknowledged in any session since this
    /// node started (0 for a peer not configured, or that never acked).
    pub fn peer_acked(&self, peer: &DeviceId) -> u64 {
        self.acked.get(peer).copied().unwrap_or(0)
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
        let cluster = self.cluster.take_outbox(&peer);
        let served = if send.takes_served {
            self.served.take_outbox(&peer)
        } else {
            Vec::new()
        };
        (index.is_some() || ack.is_some() || !cluster.is_empty() || !served.is_empty()).then_some(
            Transmit {
                index,
                ack,
                cluster,
                served,
            },
        )
    }

    /// The scanner saw `seen` at `p` (`None`: nothing there) at `now_ns`: a local
    /// change gets a new version and sequence. Returns the new record, if any.
    pub fn observe(
        &mut self,
        p: &RelPath,
        seen: Option<Observed>,
        now_ns: i64,
    ) -> Option<FileRecord> {
        if !self.authority.writer {
            self.diverged(p, seen);
            return None;
        }
        let mut changed = self.index.observe(p, seen, now_ns)?;
        if let Some(s) = &self.authority.signer {
            if authorship::sign(&mut changed, s, now_ns) {
                if let Some(a) = &changed.auth {
                    self.index.set_auth(p, a.clone());
                }
            } else {
                tracing::error!(path = %p, "could not sign a local change (no randomness?)");
            }
        }
        self.plan.evaluate(p, &self.index);
        self.refresh_cluster();
        Some(changed)
    }

    /// A reader saw `seen` at `p`: the index keeps the writers' version (nothing is
    /// sent) and, when the disk differs from it, the plan puts it back (the puller
    /// keeps the local copy under `.certmesh/kept/`, as for any replaced file). That
    /// holds for a path the writers deleted too (the reader's file is removed again).
    /// A path the writers never made, or whose deletion was forgotten, is left as it
    /// is, not sent: there is no writers' version to put back.
    fn diverged(&mut self, p: &RelPath, seen: Option<Observed>) {
        let Some(e) = self.index.get(p) else {
            if seen.is_some() {
                self.note_not_sent(p);
            }
            return;
        };
        let r = &e.record;
        let reverting = self.plan.is_reverting(p);
        let same = match (&seen, r.deleted) {
            (None, true) => true,
            (Some(o), false) => {
                !reverting
                    && o.kind == r.kind
                    && o.hash == r.hash
                    && o.target == r.target
                    && o.mode == e.stat.map_or(r.mode, |s| s.mode)
            }
            _ => false,
        };
        if same {
            if let Some(o) = seen {
                self.index.set_stat(p, Some(o.stat));
            }
            return;
        }
        let deleted = r.deleted;
        let content = seen
            .as_ref()
            .is_none_or(|o| o.kind != r.kind || o.hash != r.hash || o.target != r.target);
        self.note_not_sent(p);
        if deleted && seen.is_none() {
            return;
        }
        self.index.set_stat(p, seen.map(|o| o.stat));
        self.plan.revert(p.clone(), content);
        self.plan.evaluate(p, &self.index);
    }

    fn note_not_sent(&mut self, p: &RelPath) {
        let ns = &mut self.authority.not_sent;
        ns.count += 1;
        ns.recent.retain(|q| q != p);
        ns.recent.push_back(p.clone());
        if ns.recent.len() > NOT_SENT_RECENT {
            ns.recent.pop_front();
        }
    }

    /// True while the plan puts back a reader's local change at `p` whose content
    /// differs from the record: its content must be fetched, not reused.
    pub fn reverting_content(&self, p: &RelPath) -> bool {
        self.plan.reverting_content(p)
    }

    /// A needed record was written to the tree at `now_ns` (`stat`: what is on disk
    /// now, `None` for a deletion): it becomes the local record, learned now. Returns
    /// its sequence.
    pub fn applied(
        &mut self,
        record: impl Into<Arc<FileRecord>>,
        stat: Option<LocalStat>,
        now_ns: i64,
    ) -> u64 {
        let record = record.into();
        let p = record.path.clone();
        self.plan.reverted(&p);
        let seq = self.index.put_shared(record, stat, now_ns);
        self.plan.evaluate(&p, &self.index);
        self.refresh_cluster();
        seq
    }

    /// Every configured peer is connected and in sync, and nothing is needed: the
    /// mesh has formed (decisions that read the peers' state from the tree, such as
    /// who renews, wait for it).
    pub fn mesh_formed(&self) -> bool {
        self.plan.needs_len() == 0
            && self.cluster.roster().iter().all(|m| {
                self.plan.is_connected(&m.device) && self.plan.in_sync(&m.device, &self.index)
            })
    }

    /// The barrier over the configured peers connected now, judged by their acks in
    /// this session: what a barrier falls back to when a cluster-wide one cannot
    /// start (too many running). Peers not connected are not waited for.
    pub fn direct_barrier_status(&self, path: &RelPath) -> BarrierStatus {
        let seq = self.index.get(path).map_or(0, |e| e.sequence);
        let nodes: Vec<NodeStatus> = self
            .cluster
            .roster()
            .iter()
            .filter(|m| self.plan.is_connected(&m.device))
            .map(|m| NodeStatus {
                device: m.device,
                name: m.name.clone(),
                has: self.plan.peer_acked(&m.device) >= seq,
                live: true,
                in_sync: self.plan.in_sync(&m.device, &self.index),
            })
            .collect();
        let done = nodes.iter().all(|n| n.has);
        BarrierStatus { nodes, done }
    }

    /// Drops tombstones learned longer than the retention before `now_ns` that
    /// every configured peer, connected or not, acknowledged. Needs are not
    /// re-derived: every peer has seen the deletion, so none can still announce what
    /// it replaced.
    pub fn collect_tombstones(&mut self, now_ns: i64) -> Vec<RelPath> {
        let counted = |_peer: &DeviceId| {
            #[cfg(test)]
            if self.break_tombstone_gate {
                return self.plan.is_connected(_peer);
            }
            true
        };
        let acked_by_all = self
            .acked
            .iter()
            .filter(|(peer, _)| counted(peer))
            .map(|(_, a)| *a)
            .min()
            .unwrap_or(u64::MAX);
        let gone = self
            .index
            .collect_tombstones(now_ns, acked_by_all, self.retention);
        for p in &gone {
            self.plan.repend(p, &self.index);
        }
        gone
    }

    /// The retention of learned deletions and replay horizon.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// This node's device ID, name and configured peers (at start and on reload):
    /// returns which peers the new roster adds and removes. A removed peer is
    /// disconnected here (the caller closes its session) and no longer holds
    /// tombstones back; acks of peers still configured are kept, and a new peer
    /// holds tombstones until it acknowledges them.
    pub fn set_roster(&mut self, me: DeviceId, name: String, roster: Vec<Member>) -> RosterChange {
        let before: HashSet<DeviceId> = self.cluster.roster().iter().map(|m| m.device).collect();
        let after: HashSet<DeviceId> = roster.iter().map(|m| m.device).collect();
        let mut change = RosterChange {
            added: after.difference(&before).copied().collect(),
            removed: before.difference(&after).copied().collect(),
        };
        change.added.sort();
        change.removed.sort();
        for id in &change.removed {
            if self.plan.is_connected(id) {
                self.disconnected(*id);
            }
        }
        let acked: HashMap<DeviceId, u64> = roster
            .iter()
            .map(|m| (m.device, self.peer_acked(&m.device)))
            .collect();
        self.acked = acked;
        self.served.set_me(me);
        self.served.set_peers(roster.iter().map(|m| m.device));
        self.cluster.set_roster(me, name, roster);
        change
    }

    /// `peer` takes serving-probe reports: it is sent ours.
    pub fn peer_takes_served(&mut self, peer: DeviceId) {
        if let Some(s) = self.sends.get_mut(&peer) {
            s.takes_served = true;
            self.served.connected(peer);
        }
    }

    /// Connected peers that take serving-probe reports.
    fn served_peers(&self) -> Vec<DeviceId> {
        self.sends
            .iter()
            .filter(|(_, s)| s.takes_served)
            .map(|(d, _)| *d)
            .collect()
    }

    /// This node's latest serving-probe results, and its signed report of them
    /// (sent to every peer that takes reports).
    pub fn set_served(&mut self, records: Vec<ServedRecord>, report: Option<SignedReport>) {
        self.served.set_mine(records);
        if let Some(r) = report {
            let peers = self.served_peers();
            self.served.publish_mine(r, &peers);
        }
    }

    /// A serving-probe report from `peer` (its origin's signature already
    /// checked), received at `now_ms` (unix milliseconds): kept if newest, relayed
    /// on to the peers not yet asked.
    pub fn handle_served(
        &mut self,
        peer: DeviceId,
        report: SignedReport,
        records: Vec<ServedRecord>,
        now_ms: i64,
    ) -> Result<(), EngineError> {
        if !self.sends.contains_key(&peer) {
            return Ok(());
        }
        let peers = self.served_peers();
        self.served
            .handle_report(peer, report, records, &peers, now_ms)
            .map_err(EngineError::Served)
    }

    /// What this node's and its peers' frontends serve.
    pub fn served(&self) -> &ServedBoard {
        &self.served
    }

    /// `peer`'s current session relays barriers (its hello said so).
    pub fn peer_relays(&mut self, peer: DeviceId) {
        if self.sends.contains_key(&peer) {
            self.cluster.set_relaying(peer, true);
            self.refresh_cluster();
        }
    }

    /// Starts cluster-wide barrier `id` on our current version of `path`: every
    /// node of the cluster, not only direct peers, is asked whether it has it.
    /// False when we have no record of `path` or the barrier cannot start.
    pub fn start_barrier(&mut self, id: u64, path: &RelPath, ttl_ms: u64, now_ns: i64) -> bool {
        let Some(version) = self.index.get(path).map(|e| e.record.version.clone()) else {
            return false;
        };
        let sends = &self.sends;
        let connected = |d: &DeviceId| sends.contains_key(d);
        let v = cluster::View {
            index: &self.index,
            plan: &self.plan,
            connected: &connected,
        };
        self.cluster
            .start(&v, id, path.clone(), version, ttl_ms, now_ns)
    }

    /// Starts census `id` (`status --cluster`): a barrier on our newest record that
    /// also asks every node whether it is in sync with each of its peers. Returns
    /// that record's path; `None` when our index is empty or the barrier cannot
    /// start.
    pub fn start_census(&mut self, id: u64, ttl_ms: u64, now_ns: i64) -> Option<RelPath> {
        let newest = self.index.newest()?;
        let ask = cluster::Ask {
            id,
            path: newest.record.path.clone(),
            version: newest.record.version.clone(),
            ttl_ms,
            sync: true,
        };
        let path = ask.path.clone();
        let sends = &self.sends;
        let connected = |d: &DeviceId| sends.contains_key(d);
        let v = cluster::View {
            index: &self.index,
            plan: &self.plan,
            connected: &connected,
        };
        self.cluster.start_with(&v, ask, now_ns).then_some(path)
    }

    /// Where barrier `id` stands (`None`: not running here).
    pub fn barrier_status(&self, id: u64) -> Option<BarrierStatus> {
        let sends = &self.sends;
        let connected = |d: &DeviceId| sends.contains_key(d);
        let v = cluster::View {
            index: &self.index,
            plan: &self.plan,
            connected: &connected,
        };
        self.cluster.status(&v, id)
    }

    /// Ends barrier `id`.
    pub fn finish_barrier(&mut self, id: u64) {
        self.cluster.finish(id);
    }

    /// A barrier request from `peer`: relayed and answered (see [`cluster`]).
    pub fn handle_confirm(&mut self, peer: DeviceId, req: Confirm, now_ns: i64) {
        let verified = cluster::verify_confirm(&req);
        let _ = self.handle_confirm_checked(peer, req, verified, now_ns);
    }

    /// As [`Engine::handle_confirm`], `verified` by the caller
    /// ([`cluster::verify_confirm`]). A request relayed for an origin that did not
    /// sign it is dropped and counts as a refused record of `peer`.
    pub fn handle_confirm_checked(
        &mut self,
        peer: DeviceId,
        req: Confirm,
        verified: bool,
        now_ns: i64,
    ) -> Result<(), EngineError> {
        let sends = &self.sends;
        let connected = |d: &DeviceId| sends.contains_key(d);
        let v = cluster::View {
            index: &self.index,
            plan: &self.plan,
            connected: &connected,
        };
        if self.cluster.handle_confirm(&v, peer, req, verified, now_ns) {
            return Ok(());
        }
        let t = self.authority.tally(peer);
        t.count += 1;
        t.last_reason = Some("a barrier request not signed by its origin".into());
        self.count_refusals(peer, 1, now_ns)
    }

    /// A barrier report from `peer`: merged, or passed on toward its origin, if
    /// signed by the node it is about (checked here; see
    /// [`Engine::handle_report_checked`] to check outside the lock).
    pub fn handle_report(&mut self, peer: DeviceId, report: Report) {
        let verified = cluster::verify_report(&report);
        self.cluster.handle_report(peer, report, verified);
    }

    /// As [`Engine::handle_report`], `verified` by the caller
    /// ([`cluster::verify_report`]). A report not signed by its node is dropped and
    /// counts as a refused record of `peer` ([`MAX_REFUSED_PER_MINUTE`]).
    pub fn handle_report_checked(
        &mut self,
        peer: DeviceId,
        report: Report,
        verified: bool,
        now_ns: i64,
    ) -> Result<(), EngineError> {
        if self.cluster.handle_report(peer, report, verified) {
            return Ok(());
        }
        let t = self.authority.tally(peer);
        t.count += 1;
        t.last_reason = Some("a barrier report not signed by the node it is about".into());
        self.count_refusals(peer, 1, now_ns)
    }

    /// Reports what changed to the origins of the barriers we relay.
    fn refresh_cluster(&mut self) {
        let sends = &self.sends;
        let connected = |d: &DeviceId| sends.contains_key(d);
        let v = cluster::View {
            index: &self.index,
            plan: &self.plan,
            connected: &connected,
        };
        self.cluster.refresh(&v);
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
                && r.kind == crate::core::record::Kind::File
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
    use crate::core::device::ShortId;

    fn peer() -> DeviceId {
        DeviceId([9; 32])
    }

    /// A roster of `(device, name)`.
    fn members(m: &[(DeviceId, &str)]) -> Vec<Member> {
        m.iter()
            .map(|(device, name)| Member {
                device: *device,
                name: (*name).into(),
            })
            .collect()
    }

    fn engine_with(paths: &[&str]) -> Engine {
        let mut e = Engine::new(Index::new(ShortId(100)), u64::MAX);
        for (i, p) in paths.iter().enumerate() {
            let p = RelPath::parse(p).unwrap();
            let seen = crate::core::index::tests::file(p.as_str(), i as u8, 1);
            e.observe(&p, Some(seen), 1);
        }
        e
    }

    /// A peer's record for `n/<i>` written by device `by`.
    fn announced(i: usize, by: u64) -> (FileRecord, u64) {
        let r = FileRecord {
            path: RelPath::parse(&format!("n/{i}")).unwrap(),
            kind: crate::core::record::Kind::File,
            size: 1,
            mode: 0o644,
            mtime_ns: 1,
            hash: crate::core::record::ContentHash([1; 32]),
            target: String::new(),
            version: crate::core::version::VersionVector::from_pairs(vec![(ShortId(by), 1)]),
            deleted: false,
            modified_by: ShortId(by),
            auth: None,
        };
        (r, i as u64 + 1)
    }

    #[test]
    fn peers_announcing_what_this_node_holds_or_needs_share_one_copy_of_each_record() {
        let (b, c) = (DeviceId([7; 32]), DeviceId([8; 32]));
        let mut e = engine_with(&["held.pem"]);
        e.connected(b);
        e.connected(c);
        // A peer in sync announces our own record back: its view holds ours.
        let held = FileRecord::clone(
            &e.index()
                .get(&RelPath::parse("held.pem").unwrap())
                .unwrap()
                .record,
        );
        e.handle_index(b, vec![(held.clone(), 1)], 1).unwrap();
        let ours = &*e.index().get(&held.path).unwrap().record;
        assert!(std::ptr::eq(
            e.plan().peer_record(&b, &held.path).unwrap(),
            ours
        ));
        // Two peers announce the same new record: one copy, in both views and the
        // need; once applied, the index holds that copy too.
        let (new, _) = announced(1, 7);
        e.handle_index(b, vec![(new.clone(), 2)], 2).unwrap();
        e.handle_index(c, vec![(new.clone(), 1)], 1).unwrap();
        let need = e.plan().need(&new.path).unwrap().target.clone();
        let in_b = e.plan().peer_record(&b, &new.path).unwrap();
        let in_c = e.plan().peer_record(&c, &new.path).unwrap();
        assert!(std::ptr::eq(in_b, &*need) && std::ptr::eq(in_c, &*need));
        e.applied(need.clone(), None, 1);
        assert!(std::ptr::eq(
            &*e.index().get(&new.path).unwrap().record,
            &*need
        ));
        // A different record from a peer is its own copy, and changes nothing held.
        let (mut other, _) = announced(1, 7);
        other.size = 2;
        e.handle_index(c, vec![(other.clone(), 2)], 2).unwrap();
        assert_eq!(e.plan().peer_record(&c, &new.path), Some(&other));
        assert_eq!(*e.index().get(&new.path).unwrap().record, new);
    }

    /// Sends `n` records in frames of 2,000 (the wire's limit), as a session does.
    fn announce(e: &mut Engine, from: DeviceId, range: std::ops::Range<usize>, by: u64) {
        let ids: Vec<usize> = range.collect();
        for chunk in ids.chunks(2_000) {
            let frame: Vec<_> = chunk.iter().map(|i| announced(*i, by)).collect();
            let last = frame.last().map_or(0, |(_, s)| *s);
            e.handle_index(from, frame, last)
                .expect("a cap is never a reason to drop the session");
        }
    }

    #[test]
    fn caps_refuse_new_paths_and_never_end_a_session_at_real_scale() {
        let mut e = engine_with(&[]);
        let honest = DeviceId([7; 32]);
        // An honest tree of 150,000 paths, sent again in full after a reconnect.
        for _ in 0..2 {
            e.connected(honest);
            announce(&mut e, honest, 0..150_000, 7);
        }
        assert_eq!(e.plan().peer_record_count(&honest), 150_000);
        assert!(e.over_cap().get(&honest).is_none());
        // A bad peer's 250,000 paths: its view fills to the cap, the rest is
        // refused and named, the session goes on.
        e.connected(peer());
        announce(&mut e, peer(), 150_000..400_000, 9);
        assert_eq!(e.plan().peer_record_count(&peer()), MAX_PEER_RECORDS);
        let refused = &e.over_cap()[&peer()];
        assert_eq!(refused.count, 400_000 - 150_000 - MAX_PEER_RECORDS as u64);
        assert_eq!(refused.last_path.as_ref().unwrap().as_str(), "n/399999");
        assert!(e.refused().is_empty(), "counted as refused for authorship");
        // Past the view cap, and past `max_files` for what fits in the view: all
        // counted, the first `MAX_REFUSALS` listed in `status`.
        assert!(e.plan().refused_total() >= 250_000 - MAX_PEER_RECORDS as u64);
        assert_eq!(e.plan().refused_len(), crate::core::plan::MAX_REFUSALS);
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
        e.observe(&c, Some(crate::core::index::tests::file("c", 7, 2)), 2);
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
        let seen = crate::core::index::tests::file("x", 3, 1);
        let record = e.observe(&p, Some(seen), 1).unwrap();
        // The peer announces our own record back: nothing needed, acked at once.
        e.handle_index(peer(), vec![(record, 4)], 4).unwrap();
        let t = e.poll_transmit(peer(), token).unwrap();
        assert_eq!(t.ack, Some(4));
        assert_eq!(e.poll_transmit(peer(), token), None);
    }

    fn signed_by(
        s: &crate::core::device::NodeSigner,
        path: &str,
        content: u8,
        counter: u64,
    ) -> FileRecord {
        let mut ix = Index::new(s.id().short());
        let p = RelPath::parse(path).unwrap();
        let seen = crate::core::index::tests::file(path, content, 1);
        let mut r = ix.observe(&p, Some(seen), counter as i64 * 1000).unwrap();
        assert!(authorship::sign(&mut r, s, 1));
        r
    }

    #[test]
    fn records_not_signed_by_a_writer_are_refused_counted_and_acked() {
        let writer = authorship::tests::signer();
        let relay = authorship::tests::signer();
        let mut e = Engine::new(Index::new(ShortId(100)), u64::MAX).with_authorship(
            None,
            Writers::only([writer.id()]),
            1,
        );
        let token = e.connected(peer());
        let honest = signed_by(&writer, "a", 1, 1);
        let mut forged = signed_by(&writer, "b", 2, 1);
        forged.hash = crate::core::record::ContentHash([9; 32]);
        let own = signed_by(&relay, "c", 3, 1);
        e.handle_index(peer(), vec![(honest, 1), (forged, 2), (own, 3)], 3)
            .unwrap();
        let needed: Vec<&str> = e.plan().needs().map(|n| n.target.path.as_str()).collect();
        assert_eq!(needed, vec!["a"]);
        let refused = &e.refused()[&peer()];
        assert_eq!(refused.count, 2);
        assert_eq!(refused.last_path.as_ref().unwrap().as_str(), "c");
        assert_eq!(refused.last_author, Some(relay.id()));
        assert!(matches!(
            &e.take_events()[..],
            [PlanEvent::NotAuthorized { count: 2, .. }]
        ));
        // Refused records do not hold the ack back: once the honest one is applied,
        // everything is acknowledged.
        e.poll_transmit(peer(), token);
        let need = e.plan().needs().next().unwrap().target.clone();
        e.applied(need, None, 1);
        let t = e.poll_transmit(peer(), token).unwrap();
        assert_eq!(t.ack, Some(3));
    }

    #[test]
    fn a_peer_refused_too_often_in_a_minute_is_refused_itself() {
        let writer = authorship::tests::signer();
        let mut e = Engine::new(Index::new(ShortId(100)), u64::MAX).with_authorship(
            None,
            Writers::only([writer.id()]),
            1,
        );
        e.connected(peer());
        // Records in the writer's name, altered after signing (a junk signature).
        let batch = |n: u64, from: u64| -> Vec<(FileRecord, u64)> {
            (from..from + n)
                .map(|i| {
                    let mut r = signed_by(&writer, &format!("f{i}"), 1, 1);
                    r.size += 1;
                    (r, i + 1)
                })
                .collect()
        };
        let minute = REFUSAL_WINDOW_NS;
        let ok = |e: &mut Engine, b, now| e.handle_index_checked(peer(), b, vec![], 1, Some(now));
        // An author outside `writers` (a config mismatch explains it) never ends
        // the session, however many…
        let outsider = authorship::tests::signer();
        let theirs: Vec<(FileRecord, u64)> = (0..3000)
            .map(|i| (signed_by(&outsider, &format!("o{i}"), 1, 1), i + 1))
            .collect();
        ok(&mut e, theirs, 0).unwrap();
        // …forged ones do: 1,000 in one minute are tolerated (counted, logged)…
        ok(&mut e, batch(600, 0), 1).unwrap();
        ok(&mut e, batch(400, 600), minute / 2).unwrap();
        // …a new minute starts afresh…
        ok(&mut e, batch(900, 1000), minute + 2).unwrap();
        // …and the 1,001st in one minute ends the session, whatever the verdicts'
        // origin (made outside the lock here).
        let b = batch(101, 2000);
        let verdicts = b.iter().map(|_| Some(Err(Refusal::BadSignature))).collect();
        let err = e
            .handle_index_checked(peer(), b, verdicts, 1, Some(minute + 3))
            .unwrap_err();
        assert!(matches!(
            err,
            EngineError::RefusingTooMuch {
                count: 1001,
                limit: MAX_REFUSED_PER_MINUTE
            }
        ));
    }

    #[test]
    fn refused_tallies_are_capped_whatever_the_peers() {
        let mut e = Engine::new(Index::new(ShortId(100)), u64::MAX).with_authorship(
            None,
            Writers::only([DeviceId([1; 32])]),
            1,
        );
        let unsigned = crate::core::index::tests::file("a", 1, 1);
        let p = RelPath::parse("a").unwrap();
        let r = Index::new(ShortId(7))
            .observe(&p, Some(unsigned), 1)
            .unwrap();
        for i in 0..MAX_REFUSED_PEERS as u32 + 500 {
            let mut d = [0; 32];
            d[..4].copy_from_slice(&i.to_le_bytes());
            e.connected(DeviceId(d));
            e.handle_index(DeviceId(d), vec![(r.clone(), 1)], 1)
                .unwrap();
        }
        assert_eq!(e.refused().len(), MAX_REFUSED_PEERS);
    }

    #[test]
    fn a_readers_local_change_is_not_recorded_and_is_put_back() {
        let me = authorship::tests::signer();
        let writer = authorship::tests::signer();
        let signer = Arc::new(me);
        let mut e = Engine::new(Index::new(signer.id().short()), u64::MAX).with_authorship(
            Some(signer.clone()),
            Writers::only([writer.id()]),
            1,
        );
        assert!(!e.is_writer());
        e.connected(peer());
        let r = signed_by(&writer, "live/cert.pem", 1, 1);
        e.handle_index(peer(), vec![(r.clone(), 1)], 1).unwrap();
        let need = e.plan().need(&r.path).unwrap().target.clone();
        e.applied(
            need,
            Some(crate::core::index::tests::file("x", 1, 1).stat),
            1,
        );
        let seq = e.index().sequence();
        // The reader edits the file: nothing recorded, nothing to send…
        let edited = crate::core::index::tests::file("live/cert.pem", 7, 5);
        assert_eq!(e.observe(&r.path, Some(edited), 5), None);
        assert_eq!(e.index().sequence(), seq);
        assert_eq!(e.not_sent().count, 1);
        // …and the writers' version is needed again, content fetched anew.
        assert_eq!(*e.plan().need(&r.path).unwrap().target, r);
        assert!(e.reverting_content(&r.path));
        e.applied(
            r.clone(),
            Some(crate::core::index::tests::file("x", 1, 9).stat),
            1,
        );
        assert!(e.plan().need(&r.path).is_none() && !e.reverting_content(&r.path));
        // A chmod is put back too (same content: no fetch).
        let mut chmod = crate::core::index::tests::file("live/cert.pem", 1, 9);
        (chmod.mode, chmod.stat.mode) = (0o600, 0o600);
        assert_eq!(e.observe(&r.path, Some(chmod), 10), None);
        assert!(e.plan().need(&r.path).is_some() && !e.reverting_content(&r.path));
    }

    #[test]
    fn a_file_a_reader_makes_again_after_the_writers_deleted_it_goes_again() {
        let me = authorship::tests::signer();
        let writer = authorship::tests::signer();
        let signer = Arc::new(me);
        let mut e = Engine::new(Index::new(signer.id().short()), u64::MAX).with_authorship(
            Some(signer.clone()),
            Writers::only([writer.id()]),
            1,
        );
        e.connected(peer());
        // The writer made live/old.pem and deleted it: its tombstone reaches us.
        let mut ix = Index::new(writer.id().short());
        let p = RelPath::parse("live/old.pem").unwrap();
        ix.observe(
            &p,
            Some(crate::core::index::tests::file("live/old.pem", 1, 1)),
            1000,
        );
        let mut gone = ix.observe(&p, None, 2000).unwrap();
        assert!(gone.deleted && authorship::sign(&mut gone, &writer, 1));
        e.handle_index(peer(), vec![(gone.clone(), 1)], 1).unwrap();
        let need = e.plan().need(&gone.path).unwrap().target.clone();
        e.applied(need, None, 1);
        assert!(e.plan().need(&gone.path).is_none());
        // The reader makes the file again: not recorded, and the deletion is needed.
        let back = crate::core::index::tests::file("live/old.pem", 3, 5);
        assert_eq!(e.observe(&gone.path, Some(back), 5), None);
        assert_eq!(e.not_sent().count, 1);
        assert_eq!(*e.plan().need(&gone.path).unwrap().target, gone);
        e.applied(gone.clone(), None, 1);
        assert!(e.plan().need(&gone.path).is_none());
        // Seen gone afterwards: nothing more to do.
        assert_eq!(e.observe(&gone.path, None, 6), None);
        assert!(e.plan().need(&gone.path).is_none());
    }

    const DAY: i64 = 24 * 3600 * 1_000_000_000;

    /// A reader's engine with `writer` in `writers`, a retention of 7 days.
    fn reader_of(writer: &crate::core::device::NodeSigner) -> Engine {
        let mut e = Engine::new(Index::new(ShortId(100)), u64::MAX).with_authorship(
            None,
            Writers::only([writer.id()]),
            1,
        );
        e.connected(peer());
        e
    }

    /// `writer`'s record of `path`, changed and attested at `at`.
    fn attested(
        w: &crate::core::device::NodeSigner,
        path: &str,
        content: u8,
        at: i64,
    ) -> FileRecord {
        let mut r = signed_by(w, path, content, (at / 1000) as u64);
        assert!(authorship::reattest(&mut r, w, at));
        r
    }

    #[test]
    fn a_record_attested_beyond_the_horizon_is_refused_for_a_path_not_held() {
        let w = authorship::tests::signer();
        let mut e = reader_of(&w);
        let old = attested(&w, "live/gone.pem", 1, 10 * DAY);
        e.handle_index_checked(peer(), vec![(old.clone(), 1)], vec![], 1, Some(18 * DAY))
            .unwrap();
        assert!(e.plan().need(&old.path).is_none());
        let refused = &e.refused()[&peer()];
        assert!(refused
            .last_reason
            .as_ref()
            .unwrap()
            .contains("replay horizon"));
        assert_eq!(refused.in_window, 0, "not counted as forged");
        // Its attestation stripped (as a node of the older version relays it): dated
        // by its author's signed counter, refused all the same.
        let mut stripped = old.clone();
        stripped.auth.as_mut().unwrap().attestation = None;
        e.handle_index_checked(peer(), vec![(stripped, 1)], vec![], 1, Some(18 * DAY))
            .unwrap();
        assert_eq!(e.refused()[&peer()].count, 2);
        assert!(e.plan().need(&old.path).is_none());
        // Within the horizon it is taken.
        e.handle_index_checked(peer(), vec![(old.clone(), 2)], vec![], 2, Some(16 * DAY))
            .unwrap();
        assert!(e.plan().need(&old.path).is_some());
    }

    #[test]
    fn a_stale_record_is_taken_for_a_path_held() {
        let w = authorship::tests::signer();
        let mut e = reader_of(&w);
        let first = attested(&w, "live/a.pem", 1, 9 * DAY);
        e.applied(first.clone(), None, 9 * DAY);
        let mut newer = first.clone();
        newer.version.bump_at(w.id().short(), 0).unwrap();
        newer.hash = crate::core::record::ContentHash([2; 32]);
        assert!(authorship::sign(&mut newer, &w, 10 * DAY));
        e.handle_index_checked(peer(), vec![(newer.clone(), 1)], vec![], 1, Some(18 * DAY))
            .unwrap();
        assert_eq!(*e.plan().need(&newer.path).unwrap().target, newer);
    }

    #[test]
    fn an_old_file_reattested_reaches_a_new_node_and_renews_a_held_one() {
        let w = authorship::tests::signer();
        // Written a year ago, attested again yesterday.
        let year_old = attested(&w, "dhparam.pem", 1, DAY);
        let mut renewed = year_old.clone();
        assert!(authorship::reattest(&mut renewed, &w, 365 * DAY));
        let mut fresh = reader_of(&w);
        fresh
            .handle_index_checked(
                peer(),
                vec![(renewed.clone(), 1)],
                vec![],
                1,
                Some(366 * DAY),
            )
            .unwrap();
        assert!(fresh.plan().need(&renewed.path).is_some());
        // A node that holds it takes the renewal as metadata: a new sequence, the
        // same learned time, nothing to fetch.
        let mut held = reader_of(&w);
        held.applied(year_old.clone(), None, 2 * DAY);
        let seq = held.index().sequence();
        held.handle_index_checked(
            peer(),
            vec![(renewed.clone(), 1)],
            vec![],
            1,
            Some(366 * DAY),
        )
        .unwrap();
        let e = held.index().get(&renewed.path).unwrap();
        assert_eq!(
            (&*e.record, e.sequence, e.learned_ns),
            (&renewed, seq + 1, 2 * DAY)
        );
        assert!(held.plan().need(&renewed.path).is_none());
        // The older attestation again changes nothing.
        held.handle_index_checked(peer(), vec![(year_old, 2)], vec![], 2, Some(366 * DAY))
            .unwrap();
        assert_eq!(held.index().sequence(), seq + 1);
    }

    #[test]
    fn a_writer_renews_its_live_records_at_half_the_retention() {
        let me = authorship::tests::signer();
        let me = Arc::new(me);
        let mut e = Engine::new(Index::new(me.id().short()), u64::MAX).with_authorship(
            Some(me.clone()),
            Writers::only([me.id()]),
            1,
        );
        let p = RelPath::parse("a").unwrap();
        e.observe(&p, Some(crate::core::index::tests::file("a", 1, 1)), DAY);
        let q = RelPath::parse("b").unwrap();
        e.observe(&q, Some(crate::core::index::tests::file("b", 1, 1)), DAY);
        e.observe(&q, None, DAY);
        assert_eq!(e.reattest_due(4 * DAY, 100), 0);
        assert_eq!(
            e.reattest_due(5 * DAY, 100),
            1,
            "the live one, not the tombstone"
        );
        let r = &e.index().get(&p).unwrap().record;
        assert_eq!(authorship::vouched_ns(r), Some(5 * DAY));
        assert_eq!(Writers::only([me.id()]).check(r), Ok(()));
        assert_eq!(e.reattest_due(5 * DAY, 100), 0);
    }

    /// A writer's engine (`me`) with `others` in `writers` too, a retention of 7 days.
    fn writer_among(me: &Arc<crate::core::device::NodeSigner>, others: &[DeviceId]) -> Engine {
        let mut ids = others.to_vec();
        ids.push(me.id());
        let mut e = Engine::new(Index::new(me.id().short()), u64::MAX).with_authorship(
            Some(me.clone()),
            Writers::only(ids),
            1,
        );
        e.connected(peer());
        e
    }

    #[test]
    fn a_writer_attests_a_silent_writers_records_at_three_quarters_of_the_retention() {
        let me = authorship::tests::signer();
        let me = Arc::new(me);
        let gone = authorship::tests::signer();
        let outsider = authorship::tests::signer();
        let mut e = writer_among(&me, &[gone.id()]);
        let theirs = attested(&gone, "dhparam.pem", 1, DAY);
        e.applied(theirs.clone(), None, DAY);
        // Not a writer here: its record is left to age.
        e.applied(attested(&outsider, "other.pem", 1, DAY), None, DAY);
        // 5 days old: under 3/4 of 7 days (the author would renew at 3.5).
        assert_eq!(e.reattest_due(6 * DAY, 100), 0);
        assert_eq!(e.reattest_due(7 * DAY, 100), 1);
        let kept = &e.index().get(&theirs.path).unwrap().record;
        assert_eq!(authorship::vouched_ns(kept), Some(7 * DAY));
        let by = kept.auth.as_ref().unwrap().attestation.as_ref().unwrap();
        assert_eq!(by.by.as_ref().map(|b| b.id), Some(me.id()));
        assert_eq!(
            (&kept.version, kept.modified_by),
            (&theirs.version, theirs.modified_by)
        );
        assert!(e.plan().need(&theirs.path).is_none(), "nothing to fetch");
        assert_eq!(Writers::only([me.id(), gone.id()]).check(kept), Ok(()));
        // Once per sweep: renewed now, not again until 3/4 of the retention later.
        assert_eq!(e.reattest_due(7 * DAY, 100), 0);
    }

    #[test]
    fn a_reader_cannot_keep_a_stale_record_alive_by_attesting_it() {
        let w = authorship::tests::signer();
        let reader = authorship::tests::signer();
        let mut e = reader_of(&w);
        // The last record of a file deleted long ago, attested yesterday by a reader.
        let mut old = attested(&w, "live/gone.pem", 1, DAY);
        assert!(authorship::reattest(&mut old, &reader, 17 * DAY));
        e.handle_index_checked(peer(), vec![(old.clone(), 1)], vec![], 1, Some(18 * DAY))
            .unwrap();
        assert!(e.plan().need(&old.path).is_none());
        let refused = &e.refused()[&peer()];
        assert!(refused
            .last_reason
            .as_ref()
            .unwrap()
            .contains("not a writer"));
        assert_eq!(refused.in_window, 0, "not counted as forged");
        // Nor renew a record held: its attestation stays the writer's.
        let held = attested(&w, "live/a.pem", 1, 10 * DAY);
        e.applied(held.clone(), None, 10 * DAY);
        let mut renewed = held.clone();
        assert!(authorship::reattest(&mut renewed, &reader, 17 * DAY));
        e.handle_index_checked(peer(), vec![(renewed, 2)], vec![], 2, Some(18 * DAY))
            .unwrap();
        assert_eq!(*e.index().get(&held.path).unwrap().record, held);
    }

    #[test]
    fn a_reader_attests_nothing() {
        let w = authorship::tests::signer();
        let me = authorship::tests::signer();
        let mut e = Engine::new(Index::new(me.id().short()), u64::MAX).with_authorship(
            Some(Arc::new(me)),
            Writers::only([w.id()]),
            1,
        );
        e.applied(attested(&w, "a.pem", 1, DAY), None, DAY);
        assert_eq!(e.reattest_due(30 * DAY, 100), 0);
    }

    #[test]
    fn a_writer_signs_its_changes() {
        let me = authorship::tests::signer();
        let me = Arc::new(me);
        let mut e = Engine::new(Index::new(me.id().short()), u64::MAX).with_authorship(
            Some(me.clone()),
            Writers::only([me.id()]),
            1,
        );
        let p = RelPath::parse("a").unwrap();
        let r = e
            .observe(&p, Some(crate::core::index::tests::file("a", 1, 1)), 1)
            .unwrap();
        let mut check = Writers::only([me.id()]);
        assert_eq!(check.check(&r), Ok(()));
        assert_eq!(*e.index().get(&p).unwrap().record, r);
        let gone = e.observe(&p, None, 2).unwrap();
        assert_eq!(check.check(&gone), Ok(()));
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
                Some(crate::core::index::tests::file(p.as_str(), 5 + i as u8, 2)),
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
    fn a_tombstone_goes_only_once_every_configured_peer_acked_it_in_any_session() {
        let mut e = engine_with(&["a", "b"]);
        let other = DeviceId([8; 32]);
        e.set_roster(
            DeviceId([1; 32]),
            "me".into(),
            members(&[(peer(), "p"), (other, "o")]),
        );
        let (a, b) = (RelPath::parse("a").unwrap(), RelPath::parse("b").unwrap());
        e.observe(&a, None, 1);
        e.observe(&b, Some(crate::core::index::tests::file("b", 7, 1)), 1);
        let top = e.index().sequence();
        let later = i64::MAX / 2;
        // The peer acks everything, then goes away; the other never connected.
        e.connected(peer());
        e.handle_ack(peer(), top).unwrap();
        e.disconnected(peer());
        assert_eq!(e.peer_acked(&peer()), top, "kept across the session");
        assert!(
            e.collect_tombstones(later).is_empty(),
            "the other has not acked"
        );
        // The other acks: the peer's ack from its earlier session still counts.
        e.connected(other);
        e.handle_ack(other, top).unwrap();
        assert_eq!(e.collect_tombstones(later), vec![a.clone()]);
        // A reload keeps what the remaining peers acked; a new peer holds the next.
        e.observe(&b, None, 2);
        e.observe(&a, Some(crate::core::index::tests::file("a", 9, 1)), 2);
        let newer = members(&[(peer(), "p"), (DeviceId([7; 32]), "new")]);
        e.set_roster(DeviceId([1; 32]), "me".into(), newer);
        e.connected(peer());
        e.handle_ack(peer(), e.index().sequence()).unwrap();
        assert!(
            e.collect_tombstones(later).is_empty(),
            "the new peer has not acked"
        );
        e.set_roster(DeviceId([1; 32]), "me".into(), members(&[(peer(), "p")]));
        assert_eq!(e.collect_tombstones(later), vec![b]);
    }

    #[test]
    fn a_new_roster_says_what_it_added_and_removed_and_disconnects_the_removed() {
        let mut e = engine_with(&["a"]);
        let (gone, new) = (DeviceId([8; 32]), DeviceId([7; 32]));
        let me = DeviceId([1; 32]);
        let first = e.set_roster(me, "me".into(), members(&[(peer(), "p"), (gone, "g")]));
        assert_eq!(first.added, [gone, peer()]);
        e.connected(gone);
        let change = e.set_roster(me, "me".into(), members(&[(peer(), "p"), (new, "n")]));
        assert_eq!(
            change,
            RosterChange {
                added: vec![new],
                removed: vec![gone],
            }
        );
        assert!(
            !e.plan().is_connected(&gone),
            "a removed peer is disconnected"
        );
        assert_eq!(
            e.set_roster(me, "me".into(), members(&[(peer(), "p"), (new, "n")])),
            RosterChange::default()
        );
    }

    #[test]
    fn the_direct_barrier_waits_for_the_connected_peers_acks_only() {
        let mut e = engine_with(&["a"]);
        let (away, other) = (DeviceId([8; 32]), DeviceId([7; 32]));
        let roster = members(&[(peer(), "p"), (away, "away"), (other, "o")]);
        e.set_roster(DeviceId([1; 32]), "me".into(), roster);
        let a = RelPath::parse("a").unwrap();
        e.connected(peer());
        e.connected(other);
        e.handle_ack(peer(), 1).unwrap();
        let s = e.direct_barrier_status(&a);
        let names: Vec<(&str, bool)> = s.nodes.iter().map(|n| (n.name.as_str(), n.has)).collect();
        assert_eq!(names, [("p", true), ("o", false)]);
        assert!(!s.done);
        e.handle_ack(other, 1).unwrap();
        assert!(
            e.direct_barrier_status(&a).done,
            "the peer away is not waited for"
        );
        // An ack from an earlier session does not count: the peer may have lost it.
        e.disconnected(other);
        e.connected(other);
        assert!(!e.direct_barrier_status(&a).done);
    }

    #[test]
    fn the_mesh_has_formed_when_every_configured_peer_is_connected_and_in_sync() {
        let mut e = engine_with(&["a"]);
        let away = DeviceId([8; 32]);
        let roster = members(&[(peer(), "p"), (away, "away")]);
        e.set_roster(DeviceId([1; 32]), "me".into(), roster);
        e.connected(peer());
        assert!(!e.mesh_formed(), "nothing acked yet");
        e.handle_ack(peer(), 1).unwrap();
        assert!(!e.mesh_formed(), "a configured peer is away");
        e.connected(away);
        e.handle_ack(away, 1).unwrap();
        assert!(e.mesh_formed());
        e.disconnected(peer());
        assert!(!e.mesh_formed());
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
