//! The cluster-wide barrier: which nodes, near or far, have a path at a
//! version. Acks only tell a node about its direct peers; behind a hub, an edge two
//! hops away is invisible to them. So the asking node (the *origin*) floods a
//! [`Confirm`] request hop by hop; every node relays each request once (by id) to
//! its connected peers not yet asked, remembers which peer it came from, and answers
//! with [`Report`]s sent back along that route: whether it has the path, and what it
//! knows of its configured peers (connected or not, and — for peers too old to
//! report for themselves — whether they acknowledged it). The origin's [`Census`]
//! merges the reports into the set of nodes known to exist and which of them are
//! live, and says when every live node has the path.
//!
//! Pure: no I/O, no clock (time comes in as `now_ns`). The engine owns one
//! [`Cluster`] and hands it the index, the plan and who is connected.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::core::device::{self, DeviceId, NodeSigner};
use crate::core::index::Index;
use crate::core::paths::RelPath;
use crate::core::plan::Plan;
use crate::core::version::VersionVector;

/// Most hops a request is relayed (a hub topology needs 3–4).
pub const MAX_HOPS: u32 = 16;
/// Most device IDs a request lists as already asked (1,024, about 35 KB;
/// a bigger cluster is asked again by the relays that reach it).
pub const MAX_ASKED: usize = 1024;
/// Most bytes one encoded request takes (a full `asked` list fits).
pub const MAX_CONFIRM_BYTES: usize = 40 << 10;
/// Most peers one report lists.
pub const MAX_REPORT_PEERS: usize = 4096;
/// Longest node name in a report, in bytes.
pub const MAX_NAME: usize = 255;
/// Longest time a relay keeps a route back (a request may ask for less).
pub const MAX_TTL_MS: u64 = 600_000;
/// Most requests a node relays at once (older routes are dropped first).
pub const MAX_RELAYS: usize = 256;
/// Most barriers a node runs at once as origin.
pub const MAX_BARRIERS: usize = 16;
/// Most nodes one census tracks (a bigger cluster is not waited for beyond it).
pub const MAX_CENSUS_NODES: usize = 16_384;
/// Most reporter entries (who said it is connected to, or in sync with, whom) one
/// census keeps across all its nodes. Without it, forged reports could grow a
/// barrier to [`MAX_CENSUS_NODES`] × [`MAX_CENSUS_NODES`] entries; a real cluster
/// has a few links per node (a 248-node hub topology has about 500).
pub const MAX_CENSUS_LINKS: usize = 65_536;
/// Most messages queued for one peer (a slow peer makes a barrier time out, not
/// memory grow).
pub const MAX_OUTBOX: usize = 4096;
/// Most bytes (about their encoded size) queued for one peer: a peer that stops
/// reading while reports of 4,096 neighbours are routed to it holds 4 MiB, not
/// gigabytes.
pub const MAX_OUTBOX_BYTES: usize = 4 << 20;
/// Most requests relayed at once on behalf of one peer for one origin (a further id
/// replaces the oldest of them): one hostile peer cannot take the whole relay table,
/// nor the share of the origins its relay forwards for.
pub const MAX_RELAYS_PER_PEER: usize = 16;
/// Bytes of its own requests (it is their origin) accepted from one peer in a
/// burst; then [`CONFIRM_RATE`] bytes a second. Each request costs a flood through
/// the cluster, so a peer sending them at line rate is slowed to this pace (the rest
/// are dropped: their origins time out). Counted in bytes, each request
/// at least [`CONFIRM_MIN_COST`].
pub const CONFIRM_BURST: u64 = 64 << 10;
/// Bytes a second a peer's own-request budget refills.
pub const CONFIRM_RATE: u64 = 16 << 10;
/// The least a request costs of a budget, however small.
pub const CONFIRM_MIN_COST: u64 = 4096;
/// Requests a peer relays for others have their own budget, this many times its own:
/// a flood one peer sends is relayed within its own budget, so it can never use up
/// its relay's budget on the next hop and hold up other origins' barriers there.
pub const RELAYED_SHARE: u64 = 4;
/// How long a relay remembers a request's `(origin, id)` however short its TTL, so
/// that it is relayed at most once (a TTL of 0 does not make it circulate again).
pub const SEEN_FOR_NS: i64 = 60_000_000_000;
/// Least time between two repeats of a request that a relay takes as re-asks (one
/// request makes at most one frame per link, and a repeated one one more per this).
pub const REASK_EVERY_NS: i64 = 1_000_000_000;
/// Most `(origin, id)` pairs remembered; when full, new requests are dropped until
/// the oldest expire (the budgets bound how fast it fills).
pub const MAX_SEEN: usize = 16_384;

/// "Tell `origin` which nodes have `path` at `version` or newer."
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    pub id: u64,
    pub origin: DeviceId,
    pub path: RelPath,
    pub version: VersionVector,
    /// How many more times it may be relayed.
    pub hops: u32,
    /// How long relays keep the route back.
    pub ttl_ms: u64,
    /// Nodes already sent this request (not sent it again).
    pub asked: Vec<DeviceId>,
    /// Also report, per peer, whether it is in sync (`status --cluster`).
    pub sync: bool,
    /// The origin's signature and certificate; `None` when made by a
    /// node without a signing key (tests) or received without them.
    pub seal: Option<Seal>,
}

/// What a node knows of one of its configured peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    pub device: DeviceId,
    pub name: String,
    pub connected: bool,
    /// It acknowledged the path (only said of peers that do not relay).
    pub has: bool,
    /// It relays barriers: it reports for itself.
    pub relays: bool,
    /// Connected, and nothing pending either way with it (said only when the
    /// request asks, [`Confirm::sync`]).
    pub in_sync: bool,
}

/// One node's answer, relayed unchanged to the origin. The first report of a node
/// lists all its configured peers; later ones what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub id: u64,
    pub node: DeviceId,
    pub name: String,
    pub has: bool,
    pub peers: Vec<Neighbor>,
    /// The reporting node's signature and certificate; `None` when made
    /// by a node without a signing key (tests) or received without them.
    pub seal: Option<Seal>,
}

/// A node's signature over what it reports about itself and its peers, with its
/// node certificate (whose SHA-256 is the node's device ID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub signature: Vec<u8>,
    pub cert: Arc<[u8]>,
}

/// The bytes a node signs for `r`: a domain tag, then every field, length-prefixed
/// where variable, big-endian.
pub fn report_message(r: &Report) -> Vec<u8> {
    let mut m = Vec::with_capacity(96 + r.peers.len() * 48);
    m.extend_from_slice(b"certmesh report v1\0");
    m.extend_from_slice(&r.id.to_be_bytes());
    m.extend_from_slice(&r.node.0);
    m.extend_from_slice(&(r.name.len() as u64).to_be_bytes());
    m.extend_from_slice(r.name.as_bytes());
    m.push(u8::from(r.has));
    m.extend_from_slice(&(r.peers.len() as u64).to_be_bytes());
    for n in &r.peers {
        m.extend_from_slice(&n.device.0);
        m.extend_from_slice(&(n.name.len() as u64).to_be_bytes());
        m.extend_from_slice(n.name.as_bytes());
        let flags = [n.connected, n.has, n.relays, n.in_sync]
            .iter()
            .enumerate()
            .fold(0u8, |f, (i, b)| f | (u8::from(*b) << i));
        m.push(flags);
    }
    m
}

/// Seals `r` as its node (`r.node` must be the signer's device ID).
pub fn seal(r: &mut Report, signer: &NodeSigner) -> bool {
    if r.node != signer.id() {
        return false;
    }
    let Some(signature) = signer.sign(&report_message(r)) else {
        return false;
    };
    r.seal = Some(Seal {
        signature,
        cert: signer.cert().clone(),
    });
    true
}

/// The bytes an origin signs for `c`: what relays never change.
pub fn confirm_message(c: &Confirm) -> Vec<u8> {
    let mut m = Vec::with_capacity(96 + c.path.as_str().len());
    m.extend_from_slice(b"certmesh confirm v1\0");
    m.extend_from_slice(&c.id.to_be_bytes());
    m.extend_from_slice(&c.origin.0);
    m.extend_from_slice(&(c.path.as_str().len() as u64).to_be_bytes());
    m.extend_from_slice(c.path.as_str().as_bytes());
    let pairs = c.version.pairs();
    m.extend_from_slice(&(pairs.len() as u64).to_be_bytes());
    for (d, v) in pairs {
        m.extend_from_slice(&d.0.to_be_bytes());
        m.extend_from_slice(&v.to_be_bytes());
    }
    m.extend_from_slice(&c.ttl_ms.to_be_bytes());
    m.push(u8::from(c.sync));
    m
}

/// Seals `c` as its origin (`c.origin` must be the signer's device ID).
pub fn seal_confirm(c: &mut Confirm, signer: &NodeSigner) -> bool {
    if c.origin != signer.id() {
        return false;
    }
    let Some(signature) = signer.sign(&confirm_message(c)) else {
        return false;
    };
    c.seal = Some(Seal {
        signature,
        cert: signer.cert().clone(),
    });
    true
}

/// Whether `c` was signed by its origin (pure arithmetic, run with no lock held).
pub fn verify_confirm(c: &Confirm) -> bool {
    verify_seal(c.seal.as_ref(), &c.origin, &confirm_message(c))
}

fn verify_seal(seal: Option<&Seal>, who: &DeviceId, msg: &[u8]) -> bool {
    let Some(s) = seal else {
        return false;
    };
    if DeviceId::of_cert(&s.cert) != *who {
        return false;
    }
    device::cert_public_key(&s.cert).is_ok_and(|key| device::verify_p256(&key, msg, &s.signature))
}

/// Whether `r` was signed by the node it is about: its certificate is
/// that node's (SHA-256 equals `r.node`) and the signature covers exactly `r`. Pure
/// arithmetic, no state: callers run it with no lock held.
pub fn verify_report(r: &Report) -> bool {
    verify_seal(r.seal.as_ref(), &r.node, &report_message(r))
}

/// What a barrier asks (see [`Cluster::start_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub id: u64,
    pub path: RelPath,
    pub version: VersionVector,
    /// How long relays keep the route back.
    pub ttl_ms: u64,
    /// Also ask every node whether it is in sync with each of its peers.
    pub sync: bool,
}

/// A barrier message for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterMsg {
    Confirm(Confirm),
    Report(Report),
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub device: DeviceId,
    pub name: String,
}

/// Where one node stands in a barrier, as the origin knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub device: DeviceId,
    pub name: String,
    /// It has the path at the version (or newer).
    pub has: bool,
    /// Connected to the origin or to a node that reported: waited for.
    pub live: bool,
    /// Every node that reported being connected to it (the origin included) is in
    /// sync with it. Only known in a barrier that asked ([`Confirm::sync`]).
    pub in_sync: bool,
}

/// A barrier's state: every node known, and whether every live one has the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierStatus {
    pub nodes: Vec<NodeStatus>,
    /// Every live node has the path, and every live node that relays has reported
    /// (so its peers are known too).
    pub done: bool,
}

/// A request relayed through this node.
#[derive(Debug)]
struct Relay {
    from: DeviceId,
    /// The request as relayed (peers that connect later are sent it too).
    req: Confirm,
    /// Who has been sent it (by anyone, as far as this node knows).
    asked: HashSet<DeviceId>,
    /// Who this node sent it to (asked again when the route back is re-asked).
    sent: HashSet<DeviceId>,
    /// No hops left: not relayed to anyone, late-comers included.
    last_hop: bool,
    path: RelPath,
    version: VersionVector,
    expires_ns: i64,
    /// What this node last reported (`None`: nothing yet).
    last: Option<(bool, HashMap<DeviceId, Neighbor>)>,
    /// When it was taken in (the oldest goes first when the table is full).
    born_ns: i64,
    /// The route back reconnected since: a repeat of the request from it is taken
    /// as a re-ask (sent again to who was asked, reported again in full).
    /// Otherwise at most one repeat per [`REASK_EVERY_NS`] is (a relay behind a
    /// reconnected one is re-asked that way); the rest cost nothing.
    rewind: bool,
    /// When a repeat was last taken as a re-ask.
    reasked_ns: Option<i64>,
}

/// What the origin learnt of one node.
#[derive(Debug, Default)]
struct Seen {
    name: String,
    has: bool,
    reported: bool,
    relays: bool,
    /// Reporter → whether it is connected to this node.
    connected_to: HashMap<DeviceId, bool>,
    /// Reporter → whether it is in sync with this node.
    in_sync_with: HashMap<DeviceId, bool>,
    /// Reporters that said this node acknowledged the path (said of peers that do
    /// not relay: a node that relays counts only by its own signed report).
    claimed_by: HashSet<DeviceId>,
}

/// One barrier this node runs as origin.
#[derive(Debug)]
pub struct Census {
    req: Confirm,
    /// Peers sent the request: each must report (so its own peers are known).
    asked: HashSet<DeviceId>,
    path: RelPath,
    version: VersionVector,
    nodes: HashMap<DeviceId, Seen>,
    /// Entries in every node's `connected_to` (bounded by [`MAX_CENSUS_LINKS`]).
    links: usize,
}

/// Barrier state of one node: its identity and configured peers, the requests it
/// relays, the barriers it runs, and what to send to each peer.
#[derive(Debug, Default)]
pub struct Cluster {
    me: Option<DeviceId>,
    name: String,
    roster: Vec<Member>,
    relaying: HashSet<DeviceId>,
    relays: HashMap<u64, Relay>,
    barriers: HashMap<u64, Census>,
    outbox: HashMap<DeviceId, Outbox>,
    /// Bytes of requests each peer may still send, its own (`true`) and relayed
    /// ones (see [`CONFIRM_BURST`], [`RELAYED_SHARE`]).
    budgets: HashMap<(DeviceId, bool), Budget>,
    /// `(origin, id)` of requests taken in, and until when they are remembered.
    seen: HashMap<(DeviceId, u64), i64>,
    /// Signs this node's reports; with it, only reports signed by the
    /// node they are about are counted or relayed.
    signer: Option<Arc<NodeSigner>>,
    now_ns: i64,
}

/// Messages queued for one peer and about how many bytes they take.
#[derive(Debug, Default)]
struct Outbox {
    msgs: Vec<ClusterMsg>,
    bytes: usize,
}

/// A token bucket of bytes: requests one peer may still send.
#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: u64,
    /// When the bucket was last refilled.
    at_ns: i64,
    /// Its size and refill per second ([`CONFIRM_BURST`], [`CONFIRM_RATE`], times
    /// [`RELAYED_SHARE`] for relayed requests).
    burst: u64,
    rate: u64,
}

impl Budget {
    fn new(own: bool, now_ns: i64) -> Budget {
        let k = if own { 1 } else { RELAYED_SHARE };
        Budget {
            tokens: CONFIRM_BURST * k,
            at_ns: now_ns,
            burst: CONFIRM_BURST * k,
            rate: CONFIRM_RATE * k,
        }
    }

    /// Takes `cost` bytes at `now_ns` after refilling; false (nothing taken) when
    /// there are not that many.
    fn take(&mut self, cost: u64, now_ns: i64) -> bool {
        let ns = u64::try_from(now_ns.saturating_sub(self.at_ns)).unwrap_or(0);
        let add = u64::try_from(u128::from(ns) * u128::from(self.rate) / 1_000_000_000)
            .unwrap_or(u64::MAX);
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.burst);
            self.at_ns = now_ns;
        }
        if self.tokens < cost {
            return false;
        }
        self.tokens -= cost;
        true
    }
}

/// About the encoded size of a request.
fn confirm_size(c: &Confirm) -> usize {
    64 + c.path.as_str().len()
        + 24 * c.version.pairs().len()
        + 34 * c.asked.len()
        + c.seal
            .as_ref()
            .map_or(0, |s| s.signature.len() + s.cert.len())
}

/// About the encoded size of a message, for [`MAX_OUTBOX_BYTES`].
fn approx_size(m: &ClusterMsg) -> usize {
    match m {
        ClusterMsg::Confirm(c) => confirm_size(c),
        ClusterMsg::Report(r) => {
            64 + r.name.len()
                + r.seal
                    .as_ref()
                    .map_or(0, |s| s.signature.len() + s.cert.len())
                + r.peers.iter().map(|n| 44 + n.name.len()).sum::<usize>()
        }
    }
}

/// What the cluster reads of the rest of the engine.
pub struct View<'a> {
    pub index: &'a Index,
    pub plan: &'a Plan,
    pub connected: &'a dyn Fn(&DeviceId) -> bool,
}

impl View<'_> {
    /// This node has `path` at `version` or newer.
    fn has(&self, path: &RelPath, version: &VersionVector) -> bool {
        self.index
            .get(path)
            .is_some_and(|e| e.record.version.covers(version))
    }

    /// Nothing pending either way with `peer`.
    fn in_sync(&self, peer: &DeviceId) -> bool {
        self.plan.in_sync(peer, self.index)
    }

    /// `peer` acknowledged our record of `path`, which covers `version`.
    fn acked(&self, peer: &DeviceId, path: &RelPath, version: &VersionVector) -> bool {
        self.index.get(path).is_some_and(|e| {
            e.record.version.covers(version) && self.plan.peer_acked(peer) >= e.sequence
        })
    }
}

impl Cluster {
    /// This node's identity and configured peers (at start and on reload).
    pub fn set_roster(&mut self, me: DeviceId, name: String, roster: Vec<Member>) {
        self.me = Some(me);
        self.name = name;
        self.budgets
            .retain(|(d, _), _| roster.iter().any(|m| m.device == *d));
        self.roster = roster;
    }

    /// Signs this node's reports from now on, and counts or relays only signed
    /// ones.
    pub fn set_signer(&mut self, signer: Arc<NodeSigner>) {
        self.signer = Some(signer);
    }

    /// Whether `peer`'s current session relays barriers (from its hello).
    pub fn set_relaying(&mut self, peer: DeviceId, relays: bool) {
        if relays {
            self.relaying.insert(peer);
        } else {
            self.relaying.remove(&peer);
        }
    }

    /// The session with `peer` ended: nothing more is queued for it, and what was
    /// queued or in flight may be lost. So the requests this node runs or relays are
    /// sent to it again when it is back, and the reports for the routes through it
    /// are sent again in full.
    pub fn disconnected(&mut self, peer: &DeviceId) {
        self.outbox.remove(peer);
        self.relaying.remove(peer);
        for c in self.barriers.values_mut() {
            c.asked.remove(peer);
        }
        for r in self.relays.values_mut() {
            if r.sent.remove(peer) && !r.last_hop {
                r.asked.remove(peer);
            }
            if r.from == *peer {
                r.last = None;
                r.rewind = true;
            }
        }
    }

    /// Messages for `peer`, oldest first. Nothing for a session that does not relay
    /// barriers (a node downgraded while they were queued would refuse the frames
    /// and reconnect, over and over): what was queued is dropped.
    pub fn take_outbox(&mut self, peer: &DeviceId) -> Vec<ClusterMsg> {
        let q = self.outbox.remove(peer).unwrap_or_default().msgs;
        if self.relaying.contains(peer) {
            q
        } else {
            Vec::new()
        }
    }

    /// Queues `msg` for `peer`, unless its queue is full (by count or bytes): then
    /// it is dropped, and the barrier it belongs to waits for that node until its
    /// timeout.
    fn send(&mut self, peer: DeviceId, msg: ClusterMsg) {
        let size = approx_size(&msg);
        let q = self.outbox.entry(peer).or_default();
        if q.msgs.len() < MAX_OUTBOX && q.bytes + size <= MAX_OUTBOX_BYTES {
            q.bytes += size;
            q.msgs.push(msg);
        }
    }

    /// `from` may send `req` now: its bytes (at least [`CONFIRM_MIN_COST`]) are
    /// taken from the budget of its own requests or of those it relays.
    fn within_budget(&mut self, from: DeviceId, req: &Confirm, now_ns: i64) -> bool {
        let own = req.origin == from;
        let cost = confirm_size(req) as u64;
        self.budgets
            .entry((from, own))
            .or_insert_with(|| Budget::new(own, now_ns))
            .take(cost.max(CONFIRM_MIN_COST), now_ns)
    }

    /// Remembers `(origin, id)` for at least [`SEEN_FOR_NS`]; false when it was
    /// already, or when [`MAX_SEEN`] are remembered.
    fn first_sight(&mut self, req: &Confirm, now_ns: i64) -> bool {
        let key = (req.origin, req.id);
        if self.seen.get(&key).is_some_and(|t| *t > now_ns) {
            return false;
        }
        if self.seen.len() >= MAX_SEEN {
            self.seen.retain(|_, t| *t > now_ns);
            if self.seen.len() >= MAX_SEEN {
                return false;
            }
        }
        let ttl_ns = i64::try_from(req.ttl_ms.min(MAX_TTL_MS) * 1_000_000).unwrap_or(i64::MAX);
        let until = now_ns.saturating_add(ttl_ns.max(SEEN_FOR_NS));
        self.seen.insert(key, until);
        true
    }

    /// The configured peers (names as the config gives them).
    pub fn roster(&self) -> &[Member] {
        &self.roster
    }

    /// Connected peers that relay, and are not in `skip`.
    fn targets(&self, v: &View, skip: &HashSet<DeviceId>) -> Vec<DeviceId> {
        let mut t: Vec<DeviceId> = self
            .roster
            .iter()
            .map(|m| m.device)
            .filter(|d| self.relaying.contains(d) && (v.connected)(d) && !skip.contains(d))
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// Starts a barrier as origin: asks every connected peer that relays. Peers that
    /// do not relay are judged by their acks. Refused (false) when `id` is in use, too
    /// many barriers run, or this node has no identity yet.
    pub fn start(
        &mut self,
        v: &View,
        id: u64,
        path: RelPath,
        version: VersionVector,
        ttl_ms: u64,
        now_ns: i64,
    ) -> bool {
        let ask = Ask {
            id,
            path,
            version,
            ttl_ms,
            sync: false,
        };
        self.start_with(v, ask, now_ns)
    }

    /// As [`Cluster::start`], with every choice of the request in `ask`.
    pub fn start_with(&mut self, v: &View, ask: Ask, now_ns: i64) -> bool {
        let Ask {
            id,
            path,
            version,
            ttl_ms,
            sync,
        } = ask;
        self.now_ns = now_ns;
        let Some(me) = self.me else {
            return false;
        };
        if self.barriers.len() >= MAX_BARRIERS || self.barriers.contains_key(&id) {
            return false;
        }
        let targets = self.targets(v, &HashSet::new());
        let req = Confirm {
            id,
            origin: me,
            path: path.clone(),
            version: version.clone(),
            hops: MAX_HOPS,
            ttl_ms: ttl_ms.min(MAX_TTL_MS),
            asked: targets.iter().copied().take(MAX_ASKED).collect(),
            sync,
            seal: None,
        };
        let mut req = req;
        if let Some(s) = &self.signer {
            seal_confirm(&mut req, s);
        }
        for t in &targets {
            self.send(*t, ClusterMsg::Confirm(req.clone()));
        }
        self.barriers.insert(
            id,
            Census {
                req,
                asked: targets.into_iter().collect(),
                path,
                version,
                nodes: HashMap::new(),
                links: 0,
            },
        );
        true
    }

    /// Ends a barrier this node runs (reports for it are dropped from now on).
    pub fn finish(&mut self, id: u64) {
        self.barriers.remove(&id);
    }

    /// A request from `from`: relayed once per id to the connected peers that relay
    /// and were not asked yet, and answered with this node's report. A repeat from
    /// the node it first came from (the route back) means that node reconnected and
    /// may have lost what was on the way: this node reports again in full and asks
    /// again the nodes it asked, so the reports behind it come again too.
    ///
    /// `verified` says whether [`verify_confirm`] held (the caller runs it outside
    /// any lock). With a signer set, a request relayed for another origin counts
    /// only if its origin signed it (a peer's own request is authenticated by its
    /// connection); otherwise it is dropped and false returned, so the caller can
    /// count the refusal.
    ///
    /// Each request costs `from` one token of its budget ([`CONFIRM_BURST`]), and
    /// at most [`MAX_RELAYS_PER_PEER`] routes back to one peer for one origin are
    /// kept: beyond, a new request replaces the oldest of them.
    pub fn handle_confirm(
        &mut self,
        v: &View,
        from: DeviceId,
        req: Confirm,
        verified: bool,
        now_ns: i64,
    ) -> bool {
        self.now_ns = now_ns;
        if self.signer.is_some() && req.origin != from && !verified {
            return false;
        }
        // A peer's own request without its signature (a node that does not sign)
        // is answered, not relayed: the next hop could not check it.
        let forward = self.signer.is_none() || verified;
        self.relay(v, from, req, forward, now_ns);
        true
    }

    /// [`Cluster::handle_confirm`] once the request is authenticated; relayed
    /// further only when `forward`.
    fn relay(&mut self, v: &View, from: DeviceId, req: Confirm, forward: bool, now_ns: i64) {
        if !self.within_budget(from, &req, now_ns) {
            return;
        }
        if self
            .relays
            .get(&req.id)
            .is_some_and(|r| r.expires_ns <= now_ns)
        {
            self.relays.remove(&req.id);
        }
        if let Some(r) = self.relays.get_mut(&req.id) {
            let reask = r.rewind || r.reasked_ns.is_none_or(|t| now_ns - t >= REASK_EVERY_NS);
            if r.from == from && reask {
                r.rewind = false;
                r.reasked_ns = Some(now_ns);
                r.last = None;
                let again: Vec<DeviceId> = r.sent.iter().copied().collect();
                let fwd = r.req.clone();
                for t in again {
                    self.send(t, ClusterMsg::Confirm(fwd.clone()));
                }
                self.refresh(v);
            }
            return;
        }
        if Some(req.origin) == self.me || self.barriers.contains_key(&req.id) {
            return;
        }
        if !self.first_sight(&req, now_ns) {
            return;
        }
        self.relays.retain(|_, r| r.expires_ns > now_ns);
        let mine = |r: &Relay| r.from == from && r.req.origin == req.origin;
        if self.relays.values().filter(|r| mine(r)).count() >= MAX_RELAYS_PER_PEER {
            // Its oldest route goes: an origin runs its barriers one after another,
            // so that one is almost surely finished (its route lives on until its
            // TTL). Dropping the new request instead stalled a renewer ordering
            // three certificates a second for a full barrier timeout after every
            // 16th order. A flood only replaces the flooder's own routes.
            if let Some(oldest) = self
                .relays
                .iter()
                .filter(|(_, r)| mine(r))
                .min_by_key(|(_, r)| r.born_ns)
                .map(|(id, _)| *id)
            {
                self.relays.remove(&oldest);
            }
        }
        if self.relays.len() >= MAX_RELAYS {
            // The oldest taken in goes (not the soonest to expire: a flood with the
            // longest TTL would push out every real barrier's short route).
            if let Some(oldest) = self
                .relays
                .iter()
                .min_by_key(|(_, r)| r.born_ns)
                .map(|(id, _)| *id)
            {
                self.relays.remove(&oldest);
            }
        }
        let ttl_ns = i64::try_from(req.ttl_ms.min(MAX_TTL_MS) * 1_000_000).unwrap_or(i64::MAX);
        let mut skip: HashSet<DeviceId> = req.asked.iter().copied().collect();
        skip.insert(from);
        skip.insert(req.origin);
        let last_hop = req.hops == 0 || !forward;
        let targets = if last_hop {
            Vec::new()
        } else {
            self.targets(v, &skip)
        };
        let mut asked = req.asked.clone();
        for t in &targets {
            if asked.len() < MAX_ASKED {
                asked.push(*t);
            }
        }
        let fwd = Confirm {
            hops: req.hops.saturating_sub(1),
            asked,
            ..req.clone()
        };
        for t in &targets {
            self.send(*t, ClusterMsg::Confirm(fwd.clone()));
        }
        let sent: HashSet<DeviceId> = targets.iter().copied().collect();
        skip.extend(targets);
        if last_hop {
            // Not relayed any further, to late-comers either.
            skip.extend(self.roster.iter().map(|m| m.device));
        }
        self.relays.insert(
            req.id,
            Relay {
                from,
                req: fwd,
                asked: skip,
                sent,
                last_hop,
                path: req.path,
                version: req.version,
                expires_ns: now_ns.saturating_add(ttl_ns),
                last: None,
                born_ns: now_ns,
                rewind: false,
                reasked_ns: None,
            },
        );
        self.refresh(v);
    }

    /// A report from `from`: merged when this node is its origin, otherwise passed
    /// on toward the origin (dropped when the route is unknown or expired).
    /// `verified` says whether [`verify_report`] held (the caller runs it outside
    /// any lock); with a signer set, an unverified report is neither counted nor
    /// relayed (a report about node X counts only if X signed it), and
    /// false is returned so the caller can count the refusal.
    pub fn handle_report(&mut self, from: DeviceId, report: Report, verified: bool) -> bool {
        let _ = from;
        if self.signer.is_some() && !verified {
            return false;
        }
        if Some(report.node) == self.me {
            return true;
        }
        if let Some(c) = self.barriers.get_mut(&report.id) {
            c.merge(report);
            return true;
        }
        let now = self.now_ns;
        let Some(to) = self
            .relays
            .get(&report.id)
            .filter(|r| r.expires_ns > now)
            .map(|r| r.from)
        else {
            return true;
        };
        self.send(to, ClusterMsg::Report(report));
        true
    }

    /// Re-evaluates every live relay and reports what changed (after an apply, an
    /// ack, a connect or a disconnect). Nothing to do without relays.
    pub fn refresh(&mut self, v: &View) {
        if self.relays.is_empty() {
            if !self.barriers.is_empty() {
                self.ask_late_comers(v, self.now_ns);
            }
            return;
        }
        let Some(me) = self.me else {
            return;
        };
        let now = self.now_ns;
        let mut out = Vec::new();
        self.ask_late_comers(v, now);
        for (id, r) in self.relays.iter_mut().filter(|(_, r)| r.expires_ns > now) {
            let has = v.has(&r.path, &r.version);
            let peers: HashMap<DeviceId, Neighbor> = self
                .roster
                .iter()
                .take(MAX_REPORT_PEERS)
                .map(|m| {
                    let connected = (v.connected)(&m.device);
                    let relays = connected && self.relaying.contains(&m.device);
                    let n = Neighbor {
                        device: m.device,
                        name: m.name.clone(),
                        connected,
                        has: connected && !relays && v.acked(&m.device, &r.path, &r.version),
                        relays,
                        in_sync: r.req.sync && connected && v.in_sync(&m.device),
                    };
                    (m.device, n)
                })
                .collect();
            let (changed, delta) = match &r.last {
                None => (true, peers.values().cloned().collect::<Vec<_>>()),
                Some((last_has, last)) => {
                    let delta: Vec<Neighbor> = peers
                        .values()
                        .filter(|n| last.get(&n.device) != Some(*n))
                        .cloned()
                        .collect();
                    (*last_has != has || !delta.is_empty(), delta)
                }
            };
            if changed {
                let mut delta = delta;
                delta.sort_by_key(|a| a.device);
                out.push((
                    r.from,
                    Report {
                        id: *id,
                        node: me,
                        name: self.name.clone(),
                        has,
                        peers: delta,
                        seal: None,
                    },
                ));
                r.last = Some((has, peers));
            }
        }
        if let Some(signer) = &self.signer {
            for (_, report) in &mut out {
                seal(report, signer);
            }
        }
        for (to, report) in out {
            self.send(to, ClusterMsg::Report(report));
        }
    }

    /// Sends the requests this node runs or relays to peers that connected since
    /// (or reconnected: a node relays each id once, so a repeat costs nothing).
    fn ask_late_comers(&mut self, v: &View, now: i64) {
        let live = self.targets(v, &HashSet::new());
        let mut out = Vec::new();
        for c in self.barriers.values_mut() {
            for t in &live {
                if c.asked.insert(*t) {
                    out.push((*t, c.req.clone()));
                }
            }
        }
        for r in self.relays.values_mut().filter(|r| r.expires_ns > now) {
            for t in &live {
                if r.asked.insert(*t) {
                    r.sent.insert(*t);
                    out.push((*t, r.req.clone()));
                }
            }
        }
        for (t, req) in out {
            self.send(t, ClusterMsg::Confirm(req));
        }
    }

    /// Where barrier `id` stands: the origin's own peers (judged by their sessions
    /// and acks) merged with every report received.
    pub fn status(&self, v: &View, id: u64) -> Option<BarrierStatus> {
        let c = self.barriers.get(&id)?;
        let me = self.me?;
        // With signed reports, one reporter's word is not enough: it could name any
        // node as a peer that does not relay and has the path. Two must say so (an
        // edge is peered with two hubs); a node with one route waits for its own
        // acks or `barrier_timeout`.
        let claims = if self.signer.is_some() { 2 } else { 1 };
        let mut nodes: HashMap<DeviceId, NodeStatus> = HashMap::new();
        let mut waiting = false;
        let sync = c.req.sync;
        for m in &self.roster {
            let connected = (v.connected)(&m.device);
            let relays = connected && self.relaying.contains(&m.device);
            let seen = c.nodes.get(&m.device);
            let has = seen.is_some_and(|s| s.has || (s.claimed(claims) && !relays))
                || (connected && v.acked(&m.device, &c.path, &c.version));
            let reported = seen.is_some_and(|s| s.reported);
            let asked = c.asked.contains(&m.device);
            let in_sync =
                sync && connected && v.in_sync(&m.device) && seen.is_none_or(Seen::links_in_sync);
            waiting |= connected && (!has || (relays && asked && !reported));
            waiting |= sync && connected && !in_sync;
            nodes.insert(
                m.device,
                NodeStatus {
                    device: m.device,
                    name: m.name.clone(),
                    has,
                    live: connected,
                    in_sync,
                },
            );
        }
        for (d, s) in &c.nodes {
            if *d == me || nodes.contains_key(d) {
                continue;
            }
            let live = s.reported || s.connected_to.values().any(|c| *c);
            let in_sync = sync && live && s.links_in_sync();
            let has = s.has || (s.claimed(claims) && !s.relays);
            waiting |= live && (!has || (s.relays && !s.reported));
            waiting |= sync && live && !in_sync;
            nodes.insert(
                *d,
                NodeStatus {
                    device: *d,
                    name: s.name.clone(),
                    has,
                    live,
                    in_sync,
                },
            );
        }
        let mut nodes: Vec<NodeStatus> = nodes.into_values().collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.device.cmp(&b.device)));
        Some(BarrierStatus {
            nodes,
            done: !waiting,
        })
    }
}

impl Seen {
    /// Whether the word of `claims` reporters that this node, which does not relay
    /// (an older node: it cannot report itself), acknowledged the path is heard.
    fn claimed(&self, claims: usize) -> bool {
        self.claimed_by.len() >= claims
    }

    /// Every reporter connected to this node said it is in sync with it.
    fn links_in_sync(&self) -> bool {
        self.connected_to
            .iter()
            .filter(|(_, c)| **c)
            .all(|(r, _)| self.in_sync_with.get(r) == Some(&true))
    }
}

impl Census {
    /// Takes in one node's report: it is live and says whether it has the path;
    /// its peers are known to exist, connected to it or not, and which of them
    /// acknowledged the path (see [`Seen::claimed`]).
    fn merge(&mut self, r: Report) {
        let room = |nodes: &HashMap<DeviceId, Seen>, d: &DeviceId| {
            nodes.contains_key(d) || nodes.len() < MAX_CENSUS_NODES
        };
        if !room(&self.nodes, &r.node) {
            return;
        }
        let s = self.nodes.entry(r.node).or_default();
        s.name = r.name;
        s.has |= r.has;
        s.reported = true;
        s.relays = true;
        for n in r.peers {
            if !room(&self.nodes, &n.device) {
                continue;
            }
            let p = self.nodes.entry(n.device).or_default();
            if p.name.is_empty() {
                p.name = n.name;
            }
            if !p.connected_to.contains_key(&r.node) {
                if self.links >= MAX_CENSUS_LINKS {
                    continue;
                }
                self.links += 1;
            }
            if n.has {
                p.claimed_by.insert(r.node);
            }
            p.relays |= n.relays;
            p.connected_to.insert(r.node, n.connected);
            p.in_sync_with.insert(r.node, n.in_sync);
        }
    }
}

/// What `certmesh check` can say about the peer graph from one node's config: a
/// node with no peer is cut off from the cluster; a node with one is cut off when
/// that peer fails (a hub topology peers each edge with two hubs).
pub fn peer_warnings(peers: usize) -> Vec<String> {
    match peers {
        0 => vec![
            "no [[peer]]: this node is not connected to any other node (the peer graph is \
             not connected)"
                .into(),
        ],
        1 => vec![
            "one [[peer]] only: if it fails, this node is cut off from the cluster (peer \
             each edge node with two hubs; docs/large-fleets.md)"
                .into(),
        ],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::device::ShortId;

    fn dev(n: u8) -> DeviceId {
        DeviceId([n; 32])
    }

    fn member(n: u8) -> Member {
        Member {
            device: dev(n),
            name: format!("n{n}"),
        }
    }

    /// A node `n` with `path` at version {n: 1} when `has`.
    struct Node {
        cluster: Cluster,
        index: Index,
        plan: Plan,
        connected: HashSet<DeviceId>,
    }

    impl Node {
        fn new(n: u8, peers: &[u8]) -> Node {
            let mut cluster = Cluster::default();
            let roster = peers.iter().map(|p| member(*p)).collect();
            cluster.set_roster(dev(n), format!("n{n}"), roster);
            let mut connected = HashSet::new();
            for p in peers {
                cluster.set_relaying(dev(*p), true);
                connected.insert(dev(*p));
            }
            Node {
                cluster,
                index: Index::new(ShortId(u64::from(n))),
                plan: Plan::new(u64::MAX),
                connected,
            }
        }

        fn with_view<R>(&mut self, f: impl FnOnce(&mut Cluster, &View) -> R) -> R {
            let connected = self.connected.clone();
            let is = move |d: &DeviceId| connected.contains(d);
            let v = View {
                index: &self.index,
                plan: &self.plan,
                connected: &is,
            };
            f(&mut self.cluster, &v)
        }

        fn apply(&mut self, r: &crate::core::record::FileRecord) {
            self.index.put(r.clone(), None, 0);
            self.with_view(|c, v| c.refresh(v));
        }
    }

    fn token() -> crate::core::record::FileRecord {
        let mut ix = Index::new(ShortId(1));
        let p = RelPath::parse("acme/tok").unwrap();
        ix.observe(
            &p,
            Some(crate::core::index::tests::file("acme/tok", 1, 1)),
            1,
        )
        .unwrap()
    }

    /// Delivers every queued message between `nodes` (indexed by device byte - 1)
    /// until none is left.
    fn deliver(nodes: &mut [Node]) {
        deliver_at(nodes, 0);
    }

    /// [`deliver`] at `now` (ns).
    fn deliver_at(nodes: &mut [Node], now: i64) {
        loop {
            let mut moved = false;
            for i in 0..nodes.len() {
                let from = dev(i as u8 + 1);
                for j in 0..nodes.len() {
                    let to = dev(j as u8 + 1);
                    for m in nodes[i].cluster.take_outbox(&to) {
                        moved = true;
                        match m {
                            ClusterMsg::Confirm(c) => {
                                nodes[j]
                                    .with_view(|cl, v| cl.handle_confirm(v, from, c, true, now));
                            }
                            ClusterMsg::Report(r) => {
                                nodes[j].cluster.handle_report(from, r, true);
                            }
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// 1 — 2 — 3 (1 and 3 not peered).
    fn chain() -> Vec<Node> {
        vec![
            Node::new(1, &[2]),
            Node::new(2, &[1, 3]),
            Node::new(3, &[2]),
        ]
    }

    fn start(nodes: &mut [Node], r: &crate::core::record::FileRecord) {
        nodes[0].index.put(r.clone(), None, 0);
        let (p, v) = (r.path.clone(), r.version.clone());
        assert!(nodes[0].with_view(|c, view| c.start(view, 7, p, v, 10_000, 0)));
    }

    fn status(n: &mut Node) -> BarrierStatus {
        n.with_view(|c, v| c.status(v, 7)).unwrap()
    }

    #[test]
    fn the_origin_waits_for_a_node_two_hops_away() {
        let mut nodes = chain();
        let r = token();
        start(&mut nodes, &r);
        nodes[1].apply(&r);
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(!s.done, "{s:?}");
        let n3 = s.nodes.iter().find(|n| n.device == dev(3)).unwrap();
        assert!(n3.live && !n3.has);
        nodes[2].apply(&r);
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(s.done, "{s:?}");
        assert!(s.nodes.iter().all(|n| n.has && n.live));
        assert_eq!(s.nodes.len(), 2);
    }

    #[test]
    fn a_node_its_hub_is_not_connected_to_is_named_but_not_waited_for() {
        let mut nodes = chain();
        nodes[1].connected.remove(&dev(3));
        let r = token();
        start(&mut nodes, &r);
        nodes[1].apply(&r);
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(s.done, "{s:?}");
        let n3 = s.nodes.iter().find(|n| n.device == dev(3)).unwrap();
        assert_eq!((n3.name.as_str(), n3.live, n3.has), ("n3", false, false));
    }

    #[test]
    fn a_relay_that_has_not_reported_is_waited_for_even_after_acking() {
        let mut nodes = chain();
        let r = token();
        start(&mut nodes, &r);
        // Node 2 acked (judged by acks) but its report has not arrived: node 3 is
        // still unknown, so the barrier is not done.
        let n = &mut nodes[0];
        n.plan.connected(dev(2), &n.index);
        nodes[0].plan.acked(dev(2), 1);
        assert!(!status(&mut nodes[0]).done);
    }

    #[test]
    fn an_origin_running_more_barriers_than_a_relay_keeps_routes_for_is_answered_every_time() {
        // A renewer ordering three certificates a second: each barrier done at once,
        // while the relay's routes live on for their TTL. The relay keeps the newest.
        let mut nodes = vec![Node::new(1, &[2]), Node::new(2, &[1])];
        let r = token();
        nodes[0].index.put(r.clone(), None, 0);
        nodes[1].apply(&r);
        for (i, id) in (100..100 + 3 * MAX_RELAYS_PER_PEER as u64).enumerate() {
            let now = i as i64 * 350_000_000;
            let (p, v) = (r.path.clone(), r.version.clone());
            assert!(nodes[0].with_view(|c, view| c.start(view, id, p, v, 10_000, now)));
            deliver_at(&mut nodes, now);
            let s = nodes[0].with_view(|c, v| c.status(v, id)).unwrap();
            assert!(s.done, "barrier {id}: {s:?}");
            nodes[0].cluster.finish(id);
        }
        let routes = nodes[1].cluster.relays.len();
        assert_eq!(routes, MAX_RELAYS_PER_PEER, "routes kept");
    }

    #[test]
    fn a_mesh_relays_each_request_once_and_a_full_mesh_not_at_all() {
        // Full mesh of 4: the origin asks all; nobody relays further.
        let mut nodes: Vec<Node> = (1..=4u8)
            .map(|n| Node::new(n, &(1..=4u8).filter(|p| *p != n).collect::<Vec<_>>()))
            .collect();
        let r = token();
        start(&mut nodes, &r);
        for n in &mut nodes[1..] {
            n.apply(&r);
        }
        let mut confirms = 0;
        for n in &nodes[1..] {
            confirms += n
                .cluster
                .outbox
                .values()
                .flat_map(|q| &q.msgs)
                .filter(|m| matches!(m, ClusterMsg::Confirm(_)))
                .count();
        }
        deliver(&mut nodes);
        assert_eq!(confirms, 0);
        assert!(status(&mut nodes[0]).done);
    }

    #[test]
    fn a_node_that_connects_during_a_barrier_is_asked_too() {
        let mut nodes = chain();
        nodes[1].connected.remove(&dev(3));
        let r = token();
        start(&mut nodes, &r);
        nodes[1].apply(&r);
        deliver(&mut nodes);
        // The edge connects to the hub: the hub reports it live and relays the request.
        nodes[1].connected.insert(dev(3));
        nodes[1].with_view(|c, v| c.refresh(v));
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        let n3 = s.nodes.iter().find(|n| n.device == dev(3)).unwrap();
        assert!(n3.live && !n3.has && !s.done, "{s:?}");
        nodes[2].apply(&r);
        deliver(&mut nodes);
        assert!(status(&mut nodes[0]).done);
    }

    #[test]
    fn a_ring_does_not_loop_and_every_node_is_counted() {
        // 1-2-3-4-5-6-1.
        let ring = |n: u8| {
            let prev = if n == 1 { 6 } else { n - 1 };
            let next = if n == 6 { 1 } else { n + 1 };
            Node::new(n, &[prev, next])
        };
        let mut nodes: Vec<Node> = (1..=6).map(ring).collect();
        let r = token();
        start(&mut nodes, &r);
        for n in &mut nodes[1..] {
            n.apply(&r);
        }
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(s.done, "{s:?}");
        assert_eq!(s.nodes.len(), 5);
        assert!(s.nodes.iter().all(|n| n.has));
    }

    #[test]
    fn reports_for_unknown_requests_are_dropped_and_hops_are_bounded() {
        let mut n = Node::new(2, &[1, 3]);
        n.cluster.handle_report(
            dev(3),
            Report {
                id: 99,
                node: dev(3),
                name: "n3".into(),
                has: true,
                peers: vec![],
                seal: None,
            },
            true,
        );
        assert!(n.cluster.outbox.is_empty());
        let r = token();
        let req = Confirm {
            id: 5,
            origin: dev(1),
            path: r.path.clone(),
            version: r.version.clone(),
            hops: 0,
            ttl_ms: 1000,
            asked: vec![],
            sync: false,
            seal: None,
        };
        n.with_view(|c, v| c.handle_confirm(v, dev(1), req.clone(), true, 0));
        // Answered, not relayed (no hops left)…
        assert!(!n.cluster.outbox.contains_key(&dev(3)));
        assert_eq!(n.cluster.take_outbox(&dev(1)).len(), 1);
        // …and a second copy of the same request is ignored.
        n.with_view(|c, v| c.handle_confirm(v, dev(3), req, true, 0));
        assert!(n.cluster.outbox.is_empty());
    }

    /// Cuts the link between nodes `a` and `b` (device bytes): what was queued on it
    /// is lost, and each side's session ends as the engine reports it.
    fn cut(nodes: &mut [Node], a: u8, b: u8) {
        for (x, y) in [(a, b), (b, a)] {
            let n = &mut nodes[usize::from(x) - 1];
            n.cluster.take_outbox(&dev(y));
            n.connected.remove(&dev(y));
            n.cluster.disconnected(&dev(y));
            n.with_view(|c, v| c.refresh(v));
        }
        // Whatever was queued for the dead session is lost with it.
        for (x, y) in [(a, b), (b, a)] {
            nodes[usize::from(x) - 1].cluster.take_outbox(&dev(y));
        }
    }

    /// Connects `a` and `b` again (both relay).
    fn heal(nodes: &mut [Node], a: u8, b: u8) {
        for (x, y) in [(a, b), (b, a)] {
            let n = &mut nodes[usize::from(x) - 1];
            n.connected.insert(dev(y));
            n.cluster.set_relaying(dev(y), true);
            n.with_view(|c, v| c.refresh(v));
        }
    }

    #[test]
    fn reports_relayed_and_lost_near_the_origin_come_again_from_behind_the_relay() {
        // 1 — 2 — 3: node 3's report reaches node 2, whose link to the origin drops
        // with it on the way. Node 2 reconnects: the origin asks it again, node 2 asks
        // node 3 again, and node 3's answer comes through.
        let mut nodes = chain();
        let r = token();
        start(&mut nodes, &r);
        nodes[1].apply(&r);
        deliver(&mut nodes);
        nodes[2].apply(&r);
        // Node 3's report travels to node 2 and is relayed…
        for m in nodes[2].cluster.take_outbox(&dev(2)) {
            if let ClusterMsg::Report(rep) = m {
                nodes[1].cluster.handle_report(dev(3), rep, true);
            }
        }
        // …and lost with the 1–2 connection.
        cut(&mut nodes, 1, 2);
        deliver(&mut nodes);
        assert!(!status(&mut nodes[0]).done);
        heal(&mut nodes, 1, 2);
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(s.done, "{s:?}");
        assert_eq!(s.nodes.len(), 2);
        assert!(s.nodes.iter().all(|n| n.has && n.live));
    }

    #[test]
    fn a_peer_back_without_relaying_is_sent_no_barrier_frames() {
        // Node 2 relays for node 1; the link drops while node 2's report waits, and
        // node 1 comes back as an older version that does not relay.
        let mut nodes = chain();
        let r = token();
        start(&mut nodes, &r);
        deliver(&mut nodes);
        nodes[1].connected.remove(&dev(1));
        nodes[1].cluster.disconnected(&dev(1));
        nodes[1].apply(&r);
        nodes[1].connected.insert(dev(1));
        nodes[1].with_view(|c, v| c.refresh(v));
        assert!(nodes[1].cluster.take_outbox(&dev(1)).is_empty());
        assert!(nodes[1].cluster.outbox.is_empty(), "dropped, not kept");
    }

    #[test]
    fn a_repeat_from_another_peer_is_ignored() {
        let mut n = Node::new(2, &[1, 3]);
        let r = token();
        let req = Confirm {
            id: 5,
            origin: dev(9),
            path: r.path.clone(),
            version: r.version.clone(),
            hops: 4,
            ttl_ms: 1000,
            asked: vec![dev(1), dev(2)],
            sync: false,
            seal: None,
        };
        n.with_view(|c, v| c.handle_confirm(v, dev(1), req.clone(), true, 0));
        assert_eq!(n.cluster.take_outbox(&dev(3)).len(), 1, "relayed to 3");
        assert_eq!(n.cluster.take_outbox(&dev(1)).len(), 1, "reported to 1");
        n.with_view(|c, v| c.handle_confirm(v, dev(3), req, true, 0));
        assert!(n.cluster.outbox.is_empty());
    }

    #[test]
    fn a_census_names_a_node_two_hops_away_that_is_behind() {
        // 1 — 2 — 3, every node has the token, but node 3 has not acknowledged
        // node 2's records: node 1's own peer (2) is in sync, the cluster is not.
        let mut nodes = chain();
        for (i, peers) in [(0, vec![2u8]), (1, vec![1, 3]), (2, vec![2])] {
            let n: &mut Node = &mut nodes[i];
            for p in peers {
                n.plan.connected(dev(p), &n.index);
            }
        }
        let r = token();
        nodes[0].index.put(r.clone(), None, 0);
        let ask = Ask {
            id: 7,
            path: r.path.clone(),
            version: r.version.clone(),
            ttl_ms: 10_000,
            sync: true,
        };
        assert!(nodes[0].with_view(|c, v| c.start_with(v, ask, 0)));
        nodes[1].apply(&r);
        nodes[2].apply(&r);
        let ack = |n: &mut Node, peer: u8| {
            let seq = n.index.sequence();
            n.plan.acked(dev(peer), seq);
            n.with_view(|c, v| c.refresh(v));
        };
        ack(&mut nodes[0], 2);
        ack(&mut nodes[1], 1);
        ack(&mut nodes[2], 2);
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(!s.done, "{s:?}");
        let by = |s: &BarrierStatus, d: u8| s.nodes.iter().find(|n| n.device == dev(d)).cloned();
        assert!(by(&s, 2).is_some_and(|n| n.in_sync && n.has), "{s:?}");
        assert!(
            by(&s, 3).is_some_and(|n| !n.in_sync && n.has && n.live),
            "{s:?}"
        );
        ack(&mut nodes[1], 3);
        deliver(&mut nodes);
        let s = status(&mut nodes[0]);
        assert!(s.done && s.nodes.iter().all(|n| n.in_sync), "{s:?}");
    }

    /// A device ID from a number (more than the 255 `dev` makes).
    fn many(i: u32) -> DeviceId {
        let mut d = [0xee; 32];
        d[..4].copy_from_slice(&i.to_le_bytes());
        DeviceId(d)
    }

    #[test]
    fn forged_reports_keep_a_census_within_its_caps() {
        let mut n = Node::new(1, &[2]);
        let r = token();
        n.index.put(r.clone(), None, 0);
        let (p, v) = (r.path.clone(), r.version.clone());
        assert!(n.with_view(|c, view| c.start(view, 7, p, v, 10_000, 0)));
        let census = n.cluster.barriers.get_mut(&7).unwrap();
        // 4,096 reporters, each naming the same 4,096 peers: 16 M links unbounded.
        let peers: Vec<Neighbor> = (0..MAX_REPORT_PEERS as u32)
            .map(|i| Neighbor {
                device: many(1 << 20 | i),
                name: String::new(),
                connected: true,
                has: false,
                relays: true,
                in_sync: false,
            })
            .collect();
        for i in 0..64u32 {
            census.merge(Report {
                id: 7,
                node: many(i),
                name: "x".into(),
                has: true,
                peers: peers.clone(),
                seal: None,
            });
        }
        let links: usize = census.nodes.values().map(|s| s.connected_to.len()).sum();
        let synced: usize = census.nodes.values().map(|s| s.in_sync_with.len()).sum();
        assert!(links <= MAX_CENSUS_LINKS && synced <= MAX_CENSUS_LINKS);
        assert_eq!(links, MAX_CENSUS_LINKS, "filled to the cap");
        assert!(census.nodes.len() <= MAX_CENSUS_NODES);
    }

    #[test]
    fn a_report_about_a_node_counts_only_if_that_node_signed_it() {
        use crate::core::authorship::tests::signer;
        let o = signer();
        let o = Arc::new(o);
        let e = signer();
        let x = signer();
        // The origin peers with `e` (a relay, hostile) only; `x` is behind it.
        let mut cl = Cluster::default();
        let m = |s: &NodeSigner, n: &str| Member {
            device: s.id(),
            name: n.into(),
        };
        cl.set_roster(o.id(), "o".into(), vec![m(&e, "e")]);
        cl.set_signer(o.clone());
        cl.set_relaying(e.id(), true);
        let mut n = Node::new(1, &[]);
        n.cluster = cl;
        n.connected.insert(e.id());
        let r = token();
        n.index.put(r.clone(), None, 0);
        let (p, v) = (r.path.clone(), r.version.clone());
        assert!(n.with_view(|c, view| c.start(view, 7, p, v, 10_000, 0)));
        let report = |node: DeviceId, name: &str, peers: Vec<Neighbor>| Report {
            id: 7,
            node,
            name: name.into(),
            has: true,
            peers,
            seal: None,
        };
        let x_live = Neighbor {
            device: x.id(),
            name: "x".into(),
            connected: true,
            has: true,
            relays: true,
            in_sync: false,
        };
        let give = |n: &mut Node, r: Report| {
            let ok = verify_report(&r);
            n.cluster.handle_report(e.id(), r, ok)
        };
        // `e`'s own signed report says x has it and does not relay (so could not
        // report itself), before anything else is heard of x: that claim does not
        // count either, or the barrier completes on e's word alone.
        let claim = Neighbor {
            relays: false,
            ..x_live.clone()
        };
        let mut own = report(e.id(), "e", vec![claim]);
        assert!(seal(&mut own, &e));
        assert!(give(&mut n, own));
        let st = status(&mut n);
        let sx = st.nodes.iter().find(|s| s.device == x.id()).unwrap();
        assert!(!st.done && sx.live && !sx.has, "{st:?}");
        // `e` reports for itself (signed): `x` is live behind it and relays.
        let mut own = report(e.id(), "e", vec![x_live]);
        assert!(seal(&mut own, &e));
        assert!(give(&mut n, own));
        // Forged reports "x has it": unsigned, signed by `e`, or x's seal on
        // another report: none counts.
        assert!(!give(&mut n, report(x.id(), "x", vec![])));
        let mut by_e = report(x.id(), "x", vec![]);
        let mut e_own = report(e.id(), "e", vec![]);
        assert!(seal(&mut e_own, &e));
        by_e.seal = e_own.seal;
        assert!(!give(&mut n, by_e));
        let mut genuine = report(x.id(), "x", vec![]);
        genuine.has = false;
        assert!(seal(&mut genuine, &x));
        let mut altered = genuine.clone();
        altered.has = true;
        assert!(!give(&mut n, altered));
        let st = status(&mut n);
        let sx = st.nodes.iter().find(|s| s.device == x.id()).unwrap();
        assert!(!st.done && sx.live && !sx.has, "{st:?}");
        // x's own signed report, relayed by `e`, counts.
        let mut real = report(x.id(), "x", vec![]);
        assert!(seal(&mut real, &x));
        assert!(give(&mut n, real));
        assert!(status(&mut n).done);
    }

    #[test]
    fn with_signed_reports_an_older_node_counts_on_the_word_of_two_reporters() {
        use crate::core::authorship::tests::signer;
        let o = signer();
        let h1 = signer();
        let h2 = signer();
        let x = DeviceId([42; 32]);
        // The origin peers with two hubs; `x`, an older node, sits behind both.
        let mut cl = Cluster::default();
        let m = |s: &NodeSigner, n: &str| Member {
            device: s.id(),
            name: n.into(),
        };
        cl.set_roster(o.id(), "o".into(), vec![m(&h1, "h1"), m(&h2, "h2")]);
        cl.set_signer(Arc::new(o));
        let mut n = Node::new(1, &[]);
        n.cluster = cl;
        for h in [&h1, &h2] {
            n.cluster.set_relaying(h.id(), true);
            n.connected.insert(h.id());
        }
        let r = token();
        n.index.put(r.clone(), None, 0);
        let (p, v) = (r.path.clone(), r.version.clone());
        assert!(n.with_view(|c, view| c.start(view, 7, p, v, 10_000, 0)));
        let claim = Neighbor {
            device: x,
            name: "x".into(),
            connected: true,
            has: true,
            relays: false,
            in_sync: false,
        };
        let mut heard = Vec::new();
        for (hub, name) in [(&h1, "h1"), (&h2, "h2")] {
            let mut own = Report {
                id: 7,
                node: hub.id(),
                name: name.into(),
                has: true,
                peers: vec![claim.clone()],
                seal: None,
            };
            assert!(seal(&mut own, hub));
            let ok = verify_report(&own);
            assert!(n.cluster.handle_report(hub.id(), own, ok));
            let st = status(&mut n);
            let sx = st.nodes.iter().find(|s| s.device == x).unwrap();
            heard.push((st.done, sx.has));
        }
        assert_eq!(
            heard,
            [(false, false), (true, true)],
            "one hub's word, then two"
        );
    }

    #[test]
    fn a_request_is_relayed_only_if_its_origin_signed_it() {
        use crate::core::authorship::tests::signer;
        let me = signer();
        let o = signer();
        // This node (with a signing key) peers with 1 and 3; `o` is behind 1.
        let mut n = Node::new(2, &[1, 3]);
        n.cluster.set_signer(Arc::new(me));
        let r = token();
        let req = |id: u64, origin: DeviceId| Confirm {
            id,
            origin,
            path: r.path.clone(),
            version: r.version.clone(),
            hops: 4,
            ttl_ms: 1000,
            asked: vec![],
            sync: false,
            seal: None,
        };
        let mut give = |c: Confirm| {
            let ok = verify_confirm(&c);
            let taken = n.with_view(|cl, v| cl.handle_confirm(v, dev(1), c, ok, 0));
            (taken, n.cluster.take_outbox(&dev(3)).len())
        };
        // Claiming `o` as origin without its signature: refused, not relayed.
        assert_eq!(give(req(1, o.id())), (false, 0));
        let mut altered = req(2, o.id());
        assert!(seal_confirm(&mut altered, &o));
        altered.ttl_ms = MAX_TTL_MS;
        assert_eq!(give(altered), (false, 0));
        // Signed by `o`: relayed (hops and asked may change on the way).
        let mut signed = req(3, o.id());
        assert!(seal_confirm(&mut signed, &o));
        signed.hops = 2;
        assert_eq!(give(signed), (true, 1));
        // A peer's own request unsigned (an older node): answered, not relayed.
        assert_eq!(give(req(4, dev(1))), (true, 0));
        assert!(!n.cluster.take_outbox(&dev(1)).is_empty(), "answered");
    }

    #[test]
    fn a_request_is_relayed_once_per_link_and_remembered_past_a_ttl_of_zero() {
        let mut n = Node::new(2, &[1, 3]);
        let r = token();
        let req = Confirm {
            id: 5,
            origin: dev(9),
            path: r.path.clone(),
            version: r.version.clone(),
            hops: 4,
            ttl_ms: 0,
            asked: vec![dev(1)],
            sync: false,
            seal: None,
        };
        n.with_view(|c, v| c.handle_confirm(v, dev(1), req.clone(), true, 0));
        assert_eq!(n.cluster.take_outbox(&dev(3)).len(), 1, "relayed to 3");
        // The same request again from its route back (no reconnect in between),
        // and again after its TTL of 0 ran out, from anyone: nothing more.
        for (from, t) in [
            (1, 0),
            (1, 1_000_000),
            (3, 2_000_000_000),
            (1, 59_000_000_000),
        ] {
            n.with_view(|c, v| c.handle_confirm(v, dev(from), req.clone(), true, t));
            assert!(n.cluster.take_outbox(&dev(3)).is_empty(), "at {t} ns");
        }
        // A minute later it may be a new barrier of the same origin and id.
        n.with_view(|c, v| c.handle_confirm(v, dev(1), req.clone(), true, 61_000_000_000));
        assert_eq!(n.cluster.take_outbox(&dev(3)).len(), 1);
        // With a TTL, repeats from the route back re-ask at most once a second.
        let req = Confirm {
            id: 6,
            ttl_ms: 10_000,
            ..req
        };
        let mut frames = 0;
        for ms in 0..3_000 {
            let t = 100_000_000_000 + ms * 1_000_000;
            n.with_view(|c, v| c.handle_confirm(v, dev(1), req.clone(), true, t));
            frames += n.cluster.take_outbox(&dev(3)).len();
        }
        assert!(
            frames <= 4,
            "{frames} frames for one request repeated 3,000 times"
        );
    }

    #[test]
    fn remembered_requests_are_capped() {
        let mut n = Node::new(2, &[1, 3]);
        let r = token();
        for i in 0..MAX_SEEN as u32 + 5_000 {
            let req = Confirm {
                id: u64::from(i),
                origin: many(i),
                path: r.path.clone(),
                version: r.version.clone(),
                hops: 0,
                ttl_ms: 0,
                asked: vec![],
                sync: false,
                seal: None,
            };
            n.cluster.first_sight(&req, 0);
        }
        assert_eq!(n.cluster.seen.len(), MAX_SEEN);
        // Once they expire, room is made again.
        let late = Confirm {
            id: 1 << 40,
            origin: dev(9),
            path: r.path.clone(),
            version: r.version.clone(),
            hops: 0,
            ttl_ms: 0,
            asked: vec![],
            sync: false,
            seal: None,
        };
        assert!(n.cluster.first_sight(&late, SEEN_FOR_NS + 1));
        assert_eq!(n.cluster.seen.len(), 1);
    }

    #[test]
    fn a_peer_that_does_not_relay_is_reported_by_its_acks() {
        let mut nodes = chain();
        // Node 3 runs an old version: node 2 answers for it from its acks.
        nodes[1].cluster.set_relaying(dev(3), false);
        let r = token();
        start(&mut nodes, &r);
        nodes[1].apply(&r);
        deliver(&mut nodes);
        assert!(!status(&mut nodes[0]).done);
        let seq = nodes[1].index.get(&r.path).unwrap().sequence;
        let n = &mut nodes[1];
        n.plan.connected(dev(3), &n.index);
        nodes[1].plan.acked(dev(3), seq);
        nodes[1].with_view(|c, v| c.refresh(v));
        deliver(&mut nodes);
        assert!(status(&mut nodes[0]).done);
    }
}
