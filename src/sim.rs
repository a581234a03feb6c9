//! Deterministic multi-peer harness for the sync [`Engine`], modelled on quinn-proto's
//! `tests/util.rs` `Pair`: N in-memory nodes, a simulated nanosecond clock, and a
//! message queue between linked nodes with latency and loss driven by a seeded RNG.
//! No I/O, no tokio: a node's tree is a map path → file.
//!
//! Each node runs the production engine, the code the daemon runs: `connected` /
//! `disconnected` on link changes, `poll_transmit` for what to send (full index,
//! increments, acks), `handle_index` / `handle_ack` for what arrives (a refusal ends
//! the connection and fails [`Sim::check_converged`]), `observe` for local edits and
//! `applied` for what the puller wrote. The puller is the production
//! [`Pipeline`] too (what to take, from which peers, units, retries with backoff), and
//! small content travels inline with increments into the production `InlineCache`.
//! Only the I/O shells are simulated here: a fetch reads the source's map at once, an
//! apply writes this node's map and keeps conflict losers.
//! The real transport is reliable and ordered, so "loss" is a connection drop
//! (in-flight messages vanish) and a reconnect later, which triggers a fresh full
//! index exchange.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::core::cluster::{ClusterMsg, Member};
use crate::core::device::DeviceId;
use crate::core::engine::{Engine, SendToken, Transmit};
use crate::core::index::{Index, LocalStat, Observed};
use crate::core::inline::InlineCache;
use crate::core::paths::RelPath;
use crate::core::pipeline::{Limits, Outcome, Pipeline, Work};
use crate::core::plan::DEFAULT_MAX_FILE_SIZE;
use crate::core::record::{ContentHash, FileRecord, Kind};

const MS: i64 = 1_000_000;

/// One file of a node's in-memory tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFile {
    pub content: Vec<u8>,
    pub mode: u32,
    pub kind: Kind,
    pub mtime_ns: i64,
}

impl SimFile {
    fn file(content: Vec<u8>, mode: u32, mtime_ns: i64) -> Self {
        let kind = Kind::File;
        SimFile {
            content,
            mode,
            kind,
            mtime_ns,
        }
    }

    fn stat(&self) -> LocalStat {
        let (size, mtime_ns, mode) = (self.content.len() as u64, self.mtime_ns, self.mode);
        let ctime_ns = mtime_ns;
        LocalStat {
            size,
            mtime_ns,
            mode,
            ino: 0,
            ctime_ns,
        }
    }
}

fn hash(content: &[u8]) -> ContentHash {
    ContentHash(*blake3::hash(content).as_bytes())
}

pub struct Node {
    pub id: DeviceId,
    pub engine: Engine,
    pub files: BTreeMap<RelPath, SimFile>,
    /// Losing local contents kept by conflicts (`.certmesh/conflicts/` in the daemon).
    pub conflicts: Vec<(RelPath, SimFile)>,
    /// Clock skew added to the mtimes of local edits.
    pub skew: i64,
    up: bool,
    /// Per connected peer: the engine's send token for the session.
    sessions: BTreeMap<usize, SendToken>,
    pipe: Pipeline,
    /// Fetched content waiting to be applied, by staging name.
    staging: BTreeMap<PathBuf, Vec<u8>>,
    staged: u64,
    inline: InlineCache,
}

impl Node {
    fn new(id: DeviceId, engine: Engine, limits: Limits) -> Self {
        Node {
            id,
            engine,
            files: BTreeMap::new(),
            conflicts: Vec::new(),
            skew: 0,
            up: true,
            sessions: BTreeMap::new(),
            pipe: Pipeline::new(limits),
            staging: BTreeMap::new(),
            staged: 0,
            inline: InlineCache::default(),
        }
    }
}

/// A record, its sequence, and its content when sent inline.
type WireRecord = (FileRecord, u64, Option<Arc<Vec<u8>>>);

#[derive(Debug)]
enum Msg {
    /// Records with their sequences, each with its content when sent inline; and
    /// the sequence they bring the receiver up to.
    Index(Vec<WireRecord>, u64),
    Ack(u64),
    /// A cluster-wide barrier request or report.
    Cluster(ClusterMsg),
}

#[derive(Debug, Default)]
struct Link {
    wanted: bool,
    up: bool,
    /// Bumped on every connect and disconnect: stale in-flight messages are dropped.
    epoch: u64,
    reconnect_at: Option<i64>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub delivered: u64,
    pub drops: u64,
    pub applied: u64,
    pub fetched: u64,
    /// Applied from content that came inline with its record.
    pub inline: u64,
    /// Fetches no source could serve (its content changed meanwhile).
    pub fetch_failed: u64,
}

/// A message an engine refused: `(to, from, error)`.
pub type Refusal = (usize, usize, String);

pub struct Sim {
    pub nodes: Vec<Node>,
    pub now: i64,
    /// Per-message latency, uniform in `latency.0..=latency.1` ns.
    pub latency: (i64, i64),
    /// Probability that delivering a message instead drops its connection.
    pub loss: f64,
    pub stats: Stats,
    /// Messages an engine refused (the daemon would log them and disconnect).
    pub refused: Vec<Refusal>,
    rng: StdRng,
    links: BTreeMap<(usize, usize), Link>,
    /// `(arrival, order) → (from, to, link epoch, message)`.
    queue: BTreeMap<(i64, u64), (usize, usize, u64, Msg)>,
    order: u64,
    /// Last arrival time per direction, so each connection stays ordered.
    last_arrival: BTreeMap<(usize, usize), i64>,
    /// `now` 0 as an `Instant`, for the pipeline's timers.
    epoch: Instant,
    /// Per-link latency overriding `latency` (a WAN between regions).
    link_latency: BTreeMap<(usize, usize), (i64, i64)>,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    pub fn new(n: usize, seed: u64) -> Self {
        Sim::with_limits(n, seed, Limits::DEFAULT)
    }

    /// As [`Sim::new`], the pullers running with `limits` (small ones exercise
    /// batching, parallel-fetch caps and held-back work).
    pub fn with_limits(n: usize, seed: u64, limits: Limits) -> Self {
        let node = |i: usize| {
            let id = DeviceId(*blake3::hash(format!("sim-node-{i}").as_bytes()).as_bytes());
            let engine = Engine::new(Index::new(id.short()), DEFAULT_MAX_FILE_SIZE);
            Node::new(id, engine, limits)
        };
        Sim {
            nodes: (0..n).map(node).collect(),
            now: 1_000 * MS,
            latency: (MS, 5 * MS),
            loss: 0.0,
            stats: Stats::default(),
            refused: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            links: BTreeMap::new(),
            queue: BTreeMap::new(),
            order: 0,
            last_arrival: BTreeMap::new(),
            epoch: Instant::now(),
            link_latency: BTreeMap::new(),
        }
    }

    fn instant(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.now.max(0) as u64)
    }

    pub fn mesh(n: usize, seed: u64) -> Self {
        let mut sim = Sim::new(n, seed);
        (0..n).for_each(|a| (a + 1..n).for_each(|b| sim.link(a, b)));
        sim
    }

    pub fn chain(n: usize, seed: u64) -> Self {
        let mut sim = Sim::new(n, seed);
        (1..n).for_each(|a| sim.link(a - 1, a));
        sim
    }

    /// Declares a link (or heals it) and connects it.
    pub fn link(&mut self, a: usize, b: usize) {
        let new = !self.links.contains_key(&key(a, b));
        self.links.entry(key(a, b)).or_default().wanted = true;
        if new {
            self.set_roster(a);
            self.set_roster(b);
        }
        self.connect(key(a, b));
    }

    /// As [`Sim::link`], messages on it taking `latency` (ns, uniform) instead.
    pub fn link_with_latency(&mut self, a: usize, b: usize, latency: (i64, i64)) {
        self.link_latency.insert(key(a, b), latency);
        self.link(a, b);
    }

    /// Node `i`'s configured peers, as the daemon gives them to the engine: every
    /// node it has a declared link with.
    fn set_roster(&mut self, i: usize) {
        let roster = self
            .links
            .keys()
            .filter_map(|&(a, b)| match (a == i, b == i) {
                (true, _) => Some(b),
                (_, true) => Some(a),
                _ => None,
            })
            .map(|j| Member {
                device: self.nodes[j].id,
                name: format!("n{j}"),
            })
            .collect();
        let id = self.nodes[i].id;
        self.nodes[i].engine.set_roster(id, format!("n{i}"), roster);
    }

    /// Regions of `hubs` hubs and `edges` edges each: hubs peered with every hub,
    /// each edge with the hubs of its region (the shape `gen-peers.sh --hubs` makes).
    /// Links within a region take `local` ns, links between regions `wan` ns. Node
    /// numbers: region by region, hubs first.
    pub fn hubs(
        regions: usize,
        hubs: usize,
        edges: usize,
        local: (i64, i64),
        wan: (i64, i64),
        seed: u64,
    ) -> Self {
        let per = hubs + edges;
        let mut sim = Sim::new(regions * per, seed);
        let all_hubs: Vec<usize> = (0..regions)
            .flat_map(|r| (0..hubs).map(move |h| r * per + h))
            .collect();
        for (i, &a) in all_hubs.iter().enumerate() {
            for &b in &all_hubs[i + 1..] {
                let lat = if a / per == b / per { local } else { wan };
                sim.link_with_latency(a, b, lat);
            }
        }
        for r in 0..regions {
            for e in 0..edges {
                for h in 0..hubs {
                    sim.link_with_latency(r * per + hubs + e, r * per + h, local);
                }
            }
        }
        sim
    }

    /// Cuts a link until `link` heals it.
    pub fn partition(&mut self, a: usize, b: usize) {
        if let Some(l) = self.links.get_mut(&key(a, b)) {
            (l.wanted, l.reconnect_at) = (false, None);
        }
        self.disconnect(key(a, b));
    }

    /// Heals every link and restarts every crashed node.
    pub fn heal_all(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].up {
                self.restart(i);
            }
        }
        for (a, b) in self.link_keys() {
            self.link(a, b);
        }
    }

    pub fn link_keys(&self) -> Vec<(usize, usize)> {
        self.links.keys().copied().collect()
    }

    /// The node stops: its connections drop, its in-memory peer state is lost.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].up = false;
        for k in self
            .link_keys()
            .into_iter()
            .filter(|k| k.0 == i || k.1 == i)
        {
            self.disconnect(k);
        }
    }

    /// The node comes back with its index (and files) intact and a fresh engine
    /// around it (no peer views, no send state).
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let blank = Engine::new(Index::new(node.id.short()), DEFAULT_MAX_FILE_SIZE);
        let index = std::mem::replace(&mut node.engine, blank).into_index();
        let fresh = Node::new(
            node.id,
            Engine::new(index, DEFAULT_MAX_FILE_SIZE),
            node.pipe.limits(),
        );
        node.engine = fresh.engine;
        node.pipe = fresh.pipe;
        node.staging = fresh.staging;
        node.inline = fresh.inline;
        node.up = true;
        node.sessions.clear();
        self.set_roster(i);
        for k in self
            .link_keys()
            .into_iter()
            .filter(|k| k.0 == i || k.1 == i)
        {
            self.connect(k);
        }
    }

    fn connect(&mut self, (a, b): (usize, usize)) {
        let l = self.links.get_mut(&(a, b)).expect("declared link");
        l.reconnect_at = None;
        if l.up || !l.wanted || !self.nodes[a].up || !self.nodes[b].up {
            return;
        }
        (l.up, l.epoch) = (true, l.epoch + 1);
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.nodes[y].id;
            let node = &mut self.nodes[x];
            let token = node.engine.connected(peer);
            node.engine.peer_relays(peer);
            node.sessions.insert(y, token);
            node.pipe.wake();
            // The full index leaves at once, as `send_loop` sends it on connect.
            let transmit = node.engine.poll_transmit(peer, token);
            self.transmit(x, y, transmit);
        }
    }

    fn disconnect(&mut self, (a, b): (usize, usize)) {
        let Some(l) = self.links.get_mut(&(a, b)).filter(|l| l.up) else {
            return;
        };
        (l.up, l.epoch) = (false, l.epoch + 1);
        for (x, y) in [(a, b), (b, a)] {
            let peer = self.nodes[y].id;
            let node = &mut self.nodes[x];
            node.sessions.remove(&y);
            node.engine.disconnected(peer);
        }
    }

    /// Queues what an engine decided to send, as `send_loop` writes it: index
    /// records first, then the ack.
    fn transmit(&mut self, from: usize, to: usize, t: Option<Transmit>) {
        let Some(t) = t else { return };
        if let Some(ix) = t.index {
            // The daemon sends what its inline cache holds; here, the sender's file.
            let files = &self.nodes[from].files;
            let records = ix.records.into_iter().map(|o| {
                let data = o
                    .send_inline
                    .then(|| files.get(&o.record.path))
                    .flatten()
                    .filter(|f| hash(&f.content) == o.record.hash)
                    .map(|f| Arc::new(f.content.clone()));
                (FileRecord::clone(&o.record), o.sequence, data)
            });
            self.send(from, to, Msg::Index(records.collect(), ix.upto));
        }
        if let Some(ack) = t.ack {
            self.send(from, to, Msg::Ack(ack));
        }
        for m in t.cluster {
            self.send(from, to, Msg::Cluster(m));
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let epoch = self.links[&key(from, to)].epoch;
        let (lo, hi) = self
            .link_latency
            .get(&key(from, to))
            .copied()
            .unwrap_or(self.latency);
        let delay = self.rng.random_range(lo..=hi);
        let last = self.last_arrival.entry((from, to)).or_default();
        *last = (self.now + delay).max(*last);
        self.order += 1;
        self.queue
            .insert((*last, self.order), (from, to, epoch, msg));
    }

    fn deliver(&mut self, (from, to, epoch, msg): (usize, usize, u64, Msg)) {
        let k = key(from, to);
        if !self.links[&k].up || self.links[&k].epoch != epoch {
            return;
        }
        if self.loss > 0.0 && self.rng.random::<f64>() < self.loss {
            self.stats.drops += 1;
            self.disconnect(k);
            let delay = self.rng.random_range(self.latency.0..=self.latency.1);
            self.links.get_mut(&k).expect("link").reconnect_at = Some(self.now + delay);
            return;
        }
        self.stats.delivered += 1;
        let peer = self.nodes[from].id;
        let node = &mut self.nodes[to];
        let handled = match msg {
            // As `recv_loop`: inline content is checked, then cached for the puller.
            Msg::Index(records, last) => records
                .iter()
                .filter_map(|(r, _, d)| Some((r, d.as_ref()?)))
                .try_for_each(|(r, d)| {
                    crate::net::wire::check_inline(r, d).map_err(|e| e.to_string())?;
                    node.inline.insert(r.hash, d.clone());
                    Ok(())
                })
                .and_then(|()| {
                    let records = records.into_iter().map(|(r, s, _)| (r, s)).collect();
                    node.engine
                        .handle_index(peer, records, last)
                        .map_err(|e| e.to_string())
                }),
            Msg::Ack(seq) => node.engine.handle_ack(peer, seq).map_err(|e| e.to_string()),
            Msg::Cluster(ClusterMsg::Confirm(c)) => {
                node.engine.handle_confirm(peer, c, self.now);
                Ok(())
            }
            Msg::Cluster(ClusterMsg::Report(r)) => {
                node.engine.handle_report(peer, r);
                Ok(())
            }
        };
        // Like `recv_loop`: a refused message ends the connection (logged there).
        // As the daemon: what arrives wakes the puller (`shared.pull`).
        self.nodes[to].pipe.wake();
        if let Err(e) = handled {
            self.refused.push((to, from, e));
            self.disconnect(k);
        }
    }

    /// One step: every live node's puller then senders run at the current time, then
    /// the clock jumps to the next event and everything due is delivered. False once
    /// nothing is in flight and no node had anything to do.
    pub fn step(&mut self) -> bool {
        let mut busy = false;
        for i in 0..self.nodes.len() {
            busy |= self.nodes[i].up && self.pull(i);
        }
        let ids: Vec<DeviceId> = self.nodes.iter().map(|n| n.id).collect();
        for i in 0..self.nodes.len() {
            busy |= self.flush(i, &ids);
        }
        let next_msg = self.queue.keys().next().map(|k| k.0);
        let next_re = self.links.values().filter_map(|l| l.reconnect_at).min();
        let next_wake = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .filter_map(|n| n.pipe.next_wake())
            .map(|t| self.now + t.saturating_duration_since(self.instant()).as_nanos() as i64)
            .min();
        let Some(t) = next_msg.into_iter().chain(next_re).chain(next_wake).min() else {
            return busy;
        };
        self.now = self.now.max(t);
        let now = self.instant();
        for n in self.nodes.iter_mut().filter(|n| n.up) {
            if n.pipe.next_wake().is_some_and(|t| t <= now) {
                n.pipe.wake();
            }
        }
        for (k, l) in self
            .links
            .iter()
            .map(|(k, l)| (*k, l.reconnect_at))
            .collect::<Vec<_>>()
        {
            if l.is_some_and(|r| r <= self.now) {
                self.connect(k);
            }
        }
        while let Some(e) = self.queue.first_entry().filter(|e| e.key().0 <= self.now) {
            let f = e.remove();
            self.deliver(f);
        }
        true
    }

    /// Steps until quiet; returns the steps used.
    pub fn run_until_quiet(&mut self, max_steps: usize) -> Result<usize, String> {
        (0..max_steps)
            .find(|_| !self.step())
            .ok_or_else(|| format!("not quiet after {max_steps} steps"))
    }

    /// Sends what the engine has for every connected peer (`send_loop`); `ids`: every
    /// node's device ID, by number.
    fn flush(&mut self, i: usize, ids: &[DeviceId]) -> bool {
        let node = &mut self.nodes[i];
        let out: Vec<(usize, Transmit)> = node
            .sessions
            .iter()
            .filter_map(|(&j, &token)| Some((j, node.engine.poll_transmit(ids[j], token)?)))
            .collect();
        let busy = !out.is_empty();
        out.into_iter()
            .for_each(|(j, t)| self.transmit(i, j, Some(t)));
        busy
    }

    /// Content for `w` from the first of its sources that is still linked and really
    /// has it (as `fetch_work` tries each source in turn).
    fn fetch(&self, i: usize, w: &Work) -> Option<Vec<u8>> {
        let t = &w.need.target;
        w.sources.iter().find_map(|d| {
            let j = self.nodes.iter().position(|n| n.id == *d)?;
            let linked = self.nodes[i].sessions.contains_key(&j) && self.nodes[j].up;
            let f = self.nodes[j].files.get(&t.path).filter(|_| linked)?;
            let ok = f.kind == Kind::File
                && f.content.len() as u64 == t.size
                && hash(&f.content) == t.hash;
            ok.then(|| f.content.clone())
        })
    }

    /// The puller (`pull::run`): the pipeline takes needs, fetches run (instantly
    /// here), a ready unit is applied. True if anything was done.
    fn pull(&mut self, i: usize) -> bool {
        let now = self.instant();
        let connected: Vec<DeviceId> = self.nodes[i]
            .sessions
            .keys()
            .filter(|&&j| self.nodes[j].up)
            .map(|&j| self.nodes[j].id)
            .collect();
        {
            let Node {
                engine,
                pipe,
                inline,
                ..
            } = &mut self.nodes[i];
            pipe.refill(engine, |h| inline.get(h), |id| connected.contains(id), now);
        }
        let mut busy = false;
        while let Some(w) = self.nodes[i].pipe.next_fetch() {
            busy = true;
            let content = self.fetch(i, &w);
            let node = &mut self.nodes[i];
            match content {
                Some(c) => {
                    self.stats.fetched += 1;
                    node.staged += 1;
                    let name = PathBuf::from(format!("staged-{}", node.staged));
                    node.staging.insert(name.clone(), c);
                    node.pipe.fetched(w, name, now);
                }
                None => {
                    self.stats.fetch_failed += 1;
                    node.pipe.fetch_failed(w, &mut node.engine, now, true)
                }
            }
        }
        let node = &mut self.nodes[i];
        let Some(unit) = node.pipe.poll_apply(&mut node.engine, now) else {
            return busy;
        };
        let results: Vec<(Work, Outcome)> = unit
            .into_iter()
            .map(|w| {
                let o = self.apply(i, &w);
                (w, o)
            })
            .collect();
        let node = &mut self.nodes[i];
        node.pipe.applied(results, &mut node.engine, now, self.now);
        true
    }

    /// `Tree::apply` for one item: staged, inline or local content, or a deletion.
    fn apply(&mut self, i: usize, w: &Work) -> Outcome {
        let node = &mut self.nodes[i];
        let t = &w.need.target;
        assert_eq!(t.kind, Kind::File, "the sim only makes files");
        let p = t.path.clone();
        let content = if t.deleted {
            None
        } else if let Some(s) = &w.staged {
            match node.staging.remove(s) {
                Some(c) => Some(c),
                None => return Outcome::Failed(format!("{p}: staged content missing")),
            }
        } else if let Some(d) = &w.inline {
            self.stats.inline += 1;
            Some(d.as_ref().clone())
        } else {
            match node.files.get(&p).filter(|f| hash(&f.content) == t.hash) {
                Some(f) => Some(f.content.clone()),
                None => return Outcome::Deferred(format!("{p}: content not here")),
            }
        };
        self.stats.applied += 1;
        if w.need.conflict {
            if let Some(old) = node.files.get(&p) {
                node.conflicts.push((p.clone(), old.clone()));
            }
        }
        let stat = match content {
            None => node.files.remove(&p).and(None),
            Some(content) => {
                let f = SimFile::file(content, t.mode, t.mtime_ns);
                let stat = f.stat();
                node.files.insert(p.clone(), f);
                Some(stat)
            }
        };
        Outcome::Applied(stat)
    }

    /// What the scanner would see at `p` on node `i`.
    fn observed(node: &Node, p: &RelPath) -> Option<Observed> {
        let f = node.files.get(p)?;
        Some(Observed {
            kind: f.kind,
            size: f.content.len() as u64,
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            hash: hash(&f.content),
            target: String::new(),
            stat: f.stat(),
        })
    }

    /// A local write (`None`: delete) then the watcher's rescan of that path.
    pub fn edit(&mut self, i: usize, path: &str, file: Option<(&[u8], u32, i64)>) {
        let p = RelPath::parse(path).expect("valid path");
        let now = self.now;
        let node = &mut self.nodes[i];
        assert!(node.up, "node {i} is down");
        match file {
            Some((c, mode, mtime)) => node
                .files
                .insert(p.clone(), SimFile::file(c.into(), mode, mtime)),
            None => node.files.remove(&p),
        };
        let seen = Self::observed(node, &p);
        node.engine.observe(&p, seen, now + node.skew);
        node.pipe.wake();
    }

    /// A local write now (node clock), mode 0644.
    pub fn write(&mut self, i: usize, path: &str, content: &[u8]) {
        let mtime = self.now + self.nodes[i].skew;
        self.edit(i, path, Some((content, 0o644, mtime)));
    }

    pub fn delete(&mut self, i: usize, path: &str) {
        self.edit(i, path, None);
    }

    /// Rescans every file of a node; returns how many were taken for local changes
    /// (0 when applied writes are not echoed back).
    pub fn rescan(&mut self, i: usize) -> usize {
        let now = self.now;
        let node = &mut self.nodes[i];
        let paths: Vec<RelPath> = node.files.keys().cloned().collect();
        paths
            .iter()
            .filter(|p| {
                let seen = Self::observed(node, p);
                node.engine.observe(p, seen, now).is_some()
            })
            .count()
    }

    pub fn content(&self, i: usize, path: &str) -> Option<&[u8]> {
        let p = RelPath::parse(path).expect("valid path");
        self.nodes[i].files.get(&p).map(|f| f.content.as_slice())
    }

    /// Every live node has the same files (content, mode, kind: a content-neutral
    /// touch changes only the mtime) and the same index records, no needs, and every
    /// connected pair is in sync.
    pub fn check_converged(&self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up)
            .collect();
        let view = |i: usize| {
            let n = &self.nodes[i];
            let files = n
                .files
                .iter()
                .map(|(p, f)| (p, (&f.content, f.mode, f.kind)));
            let index = n
                .engine
                .index()
                .entries()
                .map(|e| (&e.record.path, &e.record));
            (
                files.collect::<BTreeMap<_, _>>(),
                index.collect::<BTreeMap<_, _>>(),
            )
        };
        if let Some((to, from, e)) = self.refused.first() {
            return Err(format!("node {to} refused a message from node {from}: {e}"));
        }
        let first = *live.first().ok_or("no live node")?;
        let v0 = view(first);
        for &i in &live {
            let (n, v) = (&self.nodes[i], view(i));
            if v != v0 {
                return Err(format!("node {first}: {v0:?}\nnode {i}: {v:?}"));
            }
            if let Some(need) = n.engine.plan().needs().next() {
                return Err(format!("node {i} still needs {need:?}"));
            }
            for e in n.engine.index().entries().filter(|e| !e.record.deleted) {
                if n.files
                    .get(&e.record.path)
                    .is_none_or(|f| hash(&f.content) != e.record.hash)
                {
                    return Err(format!("node {i}: file {} != index", e.record.path));
                }
            }
        }
        for (&(a, b), l) in self.links.iter().filter(|(_, l)| l.up) {
            for (x, y) in [(a, b), (b, a)] {
                let n = &self.nodes[x];
                if !n.engine.plan().in_sync(&self.nodes[y].id, n.engine.index()) {
                    return Err(format!("node {x} not in sync with node {y} ({l:?})"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::RngExt;

    const QUIET: usize = 100_000;

    fn quiet_and_converged(sim: &mut Sim) {
        sim.run_until_quiet(QUIET).unwrap();
        sim.check_converged().unwrap();
    }

    /// `[tree] writers` in the simulator: nodes with real keys, `writers` = node 0 only, in
    /// a chain 0 – 1 – 2. The relay's own edit is put back and never reaches node 2;
    /// the writer's changes reach it through the relay, signatures intact.
    #[test]
    fn only_writers_change_the_tree_also_through_a_relay() {
        use crate::core::authorship::{tests::signer, Writers};
        let signers: Vec<_> = (0..3).map(|_| Arc::new(signer())).collect();
        let writer = signers[0].id();
        let path = "live/www/cert.pem";
        for seed in 0..20 {
            let mut sim = Sim::new(3, seed);
            for (node, s) in sim.nodes.iter_mut().zip(&signers) {
                node.id = s.id();
                node.engine = Engine::new(Index::new(s.id().short()), DEFAULT_MAX_FILE_SIZE)
                    .with_authorship(Some(s.clone()), Writers::only([writer]), 1);
            }
            sim.link(0, 1);
            sim.link(1, 2);
            sim.write(0, path, b"v1");
            quiet_and_converged(&mut sim);
            sim.write(1, path, b"the relay's own");
            sim.delete(1, "never/there");
            quiet_and_converged(&mut sim);
            assert_eq!(sim.content(1, path), Some(&b"v1"[..]), "seed {seed}");
            assert_eq!(sim.nodes[1].engine.not_sent().count, 1);
            sim.write(0, path, b"v2");
            quiet_and_converged(&mut sim);
            assert_eq!(sim.content(2, path), Some(&b"v2"[..]), "seed {seed}");
            for n in &sim.nodes {
                assert!(n.engine.refused().is_empty(), "seed {seed}");
            }
        }
    }

    #[test]
    fn change_reaches_full_mesh() {
        for seed in 0..50 {
            let mut sim = Sim::mesh(3, seed);
            sim.write(1, "live/www/fullchain.pem", b"chain v1");
            sim.write(1, "live/www/privkey.pem", b"key v1");
            quiet_and_converged(&mut sim); // includes in_sync for every linked pair
            for i in 0..3 {
                assert_eq!(
                    sim.content(i, "live/www/fullchain.pem"),
                    Some(&b"chain v1"[..])
                );
                assert!(sim.nodes[i].conflicts.is_empty());
            }
            sim.delete(0, "live/www/privkey.pem");
            quiet_and_converged(&mut sim);
            assert!((0..3).all(|i| sim.content(i, "live/www/privkey.pem").is_none()));
        }
    }

    #[test]
    fn chain_is_transitive() {
        for seed in 0..50 {
            let mut sim = Sim::chain(3, seed);
            sim.write(0, "a/cert.pem", b"from a");
            quiet_and_converged(&mut sim);
            assert_eq!(sim.content(2, "a/cert.pem"), Some(&b"from a"[..]));
            sim.write(2, "a/cert.pem", b"from c");
            quiet_and_converged(&mut sim);
            assert_eq!(sim.content(0, "a/cert.pem"), Some(&b"from c"[..]));
            // Each hop got it from its neighbour, inline with the increment (small).
            assert_eq!((sim.stats.fetched, sim.stats.inline), (0, 4));
        }
    }

    /// A (node 0) and B (node 1) edit `cert.pem` (`None` = delete) while A is cut off
    /// from B and C, then A's links heal in `heal` order. Checks the conflict rule and
    /// that only losing content a node had is kept there; returns the winner.
    fn two_writers(seed: u64, a: Option<i64>, b: Option<i64>, heal: &[usize]) -> (Sim, usize) {
        let mut sim = Sim::mesh(3, seed);
        sim.edit(0, "cert.pem", Some((b"base", 0o644, 10)));
        sim.run_until_quiet(QUIET).unwrap();
        sim.partition(0, 1);
        sim.partition(0, 2);
        for (i, mtime) in [(0, a), (1, b)] {
            let content = format!("from {i}");
            sim.edit(i, "cert.pem", mtime.map(|m| (content.as_bytes(), 0o600, m)));
        }
        sim.run_until_quiet(QUIET).unwrap();
        let before: Vec<_> = (0..3)
            .map(|i| sim.content(i, "cert.pem").map(<[u8]>::to_vec))
            .collect();
        let p = RelPath::parse("cert.pem").unwrap();
        let rule = |i: usize| {
            let r = &sim.nodes[i].engine.index().get(&p).unwrap().record;
            (r.mtime_ns, r.modified_by)
        };
        let (winner, loser) = if rule(0) > rule(1) { (0, 1) } else { (1, 0) };
        for &i in heal {
            sim.link(0, i);
            quiet_and_converged(&mut sim);
        }
        let last = sim.content(2, "cert.pem").map(<[u8]>::to_vec);
        assert_eq!(last, before[winner], "seed {seed}");
        for (i, had) in before.iter().enumerate() {
            let kept: Vec<_> = sim.nodes[i]
                .conflicts
                .iter()
                .map(|c| Some(&c.1.content))
                .collect();
            assert!(
                kept.is_empty() || (kept == [had.as_ref()] && *had != last),
                "seed {seed}"
            );
        }
        let lost = before[loser].as_ref().filter(|_| before[loser] != last);
        let kept = |n: &Node| n.conflicts.iter().any(|c| Some(&c.1.content) == lost);
        assert!(
            lost.is_none() || sim.nodes.iter().any(kept),
            "seed {seed}: loser kept nowhere"
        );
        (sim, winner)
    }

    fn conflicts(sim: &Sim, i: usize) -> Vec<&[u8]> {
        sim.nodes[i]
            .conflicts
            .iter()
            .map(|(_, f)| f.content.as_slice())
            .collect()
    }

    #[test]
    fn conflict_rule_later_mtime_then_higher_device() {
        let ids = Sim::new(2, 0)
            .nodes
            .iter()
            .map(|n| n.id.short())
            .collect::<Vec<_>>();
        let higher = usize::from(ids[1] > ids[0]);
        // (A's mtime, B's mtime, winner); `None` is a delete, at the clock (> 1000 ms).
        let cases = [(Some(100), Some(200), 1), (Some(300), Some(200), 0)];
        let cases = cases.into_iter().chain([(Some(100), Some(100), higher)]);
        let cases = cases.chain([(None, Some(100), 0), (None, Some(5_000), 1)]);
        for seed in 0..50 {
            for (a, b, expected) in cases.clone() {
                let heal: &[usize] = if seed % 2 == 0 { &[1, 2] } else { &[2, 1] };
                let (sim, winner) = two_writers(seed, a.map(|m| m * MS), b.map(|m| m * MS), heal);
                assert_eq!(winner, expected, "seed {seed}: {a:?} vs {b:?}");
                match (a, b) {
                    // Only A ever had A's losing content: A keeps it.
                    (Some(100), Some(200)) => assert_eq!(conflicts(&sim, 0), [b"from 0"]),
                    // A deleted and lost: nothing to keep anywhere.
                    (None, Some(5_000)) => {
                        assert!(sim.nodes.iter().all(|n| n.conflicts.is_empty()))
                    }
                    _ => {}
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn two_writers_converge(seed in any::<u64>(), a in prop::option::of(0i64..3),
                                b in prop::option::of(0i64..3), c_first: bool) {
            // Deletes take the clock (≥ 1000 ms) as mtime; edits at 999..1001 ms.
            let heal: &[usize] = if c_first { &[2, 1] } else { &[1, 2] };
            two_writers(seed, a.map(|m| (999 + m) * MS), b.map(|m| (999 + m) * MS), heal);
        }
    }

    /// B's edit loses to A's; C had B's content and resolves first (A–C heals before
    /// A–B). C only relayed B's edit, so it keeps no copy; B, the author, does.
    #[test]
    fn author_keeps_losing_content() {
        let (sim, winner) = two_writers(1, Some(300 * MS), Some(200 * MS), &[2, 1]);
        assert_eq!(winner, 0);
        assert!(conflicts(&sim, 2).is_empty());
        assert_eq!(conflicts(&sim, 1), vec![&b"from 1"[..]]);
    }

    /// A deletes (T, mtime t0); B concurrently writes L1 (t0 - 20 ms); C applies T,
    /// then writes L with an older mtime (t0 - 10 ms: clock skew) and hands L to E.
    /// B merges T with L1 (T wins). D merges L1 with L from E (L wins): version
    /// T∪L1∪L, content L. C merges L with B's T∪L1: T wins by mtime although L
    /// descends from T: version T∪L1∪L, no file. `Equal` on both sides, forever.
    #[test]
    fn successor_with_older_mtime_converges() {
        let mut sim = Sim::mesh(5, 1);
        sim.edit(0, "f", Some((b"base", 0o644, 10)));
        quiet_and_converged(&mut sim);
        sim.link_keys()
            .into_iter()
            .for_each(|(a, b)| sim.partition(a, b));
        let t0 = sim.now;
        sim.delete(0, "f");
        sim.edit(1, "f", Some((b"L1", 0o644, t0 - 20 * MS)));
        for (a, b, keep) in [(1, 3, false), (0, 2, false), (2, 4, false), (0, 1, true)] {
            if (a, b) == (2, 4) {
                sim.edit(2, "f", Some((b"L", 0o644, t0 - 10 * MS)));
            }
            sim.link(a, b);
            sim.run_until_quiet(QUIET).unwrap();
            if !keep {
                sim.partition(a, b);
            }
        }
        for (a, b) in [(3, 4), (1, 2)] {
            sim.link(a, b);
            sim.run_until_quiet(QUIET).unwrap();
        }
        sim.heal_all();
        quiet_and_converged(&mut sim);
    }

    /// A writes `k` (R1: mode 0644, mtime 20) and chmods it to 0600 (R2: same mtime,
    /// as chmod keeps it) while C has a concurrent older edit. C meets R1 via B and
    /// merges {A:1,C:1} with R1's data; then A (R2) and C (merged R1) meet: the conflict
    /// rule ties (mode is not in its key), each side takes the other's record, and both
    /// end at version {A:2,C:1}: A with mode 0644, C with 0600. Expected: 0600.
    #[test]
    fn chmod_after_write_converges() {
        let mut sim = Sim::mesh(3, 1);
        sim.link_keys()
            .into_iter()
            .for_each(|(a, b)| sim.partition(a, b));
        sim.edit(2, "k", Some((b"x", 0o644, 10)));
        sim.edit(0, "k", Some((b"key", 0o644, 20)));
        for (a, b, keep) in [(0, 1, false), (1, 2, true), (0, 2, true)] {
            if (a, b) == (1, 2) {
                sim.edit(0, "k", Some((b"key", 0o600, 20)));
            }
            sim.link(a, b);
            sim.run_until_quiet(QUIET).unwrap();
            if !keep {
                sim.partition(a, b);
            }
        }
        let mode = |i: usize| sim.nodes[i].files[&RelPath::parse("k").unwrap()].mode;
        assert_eq!((mode(0), mode(2)), (0o600, 0o600));
    }

    const PATHS: [&str; 5] = ["a", "b", "live/x/cert.pem", "live/x/privkey.pem", "d/e"];

    /// Random edits, deletes, partitions, heals and crashes on a random topology with
    /// random latency and 10% loss; then everything heals and must converge.
    fn random_workload(seed: u64, max_skew_ms: i64) -> Result<Stats, String> {
        random_workload_with(seed, max_skew_ms, Limits::DEFAULT)
    }

    fn random_workload_with(seed: u64, max_skew_ms: i64, limits: Limits) -> Result<Stats, String> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
        let n = rng.random_range(2..=5);
        let mut sim = Sim::with_limits(n, seed, limits);
        match rng.random_range(0..3) {
            0 => (0..n).for_each(|a| (a + 1..n).for_each(|b| sim.link(a, b))),
            1 => (1..n).for_each(|i| sim.link(i - 1, i)),
            _ => (1..n).for_each(|i| sim.link(0, i)),
        }
        let max = rng.random_range(0..20);
        sim.latency = (rng.random_range(0..=max) * MS, max * MS);
        sim.loss = 0.1;
        for node in &mut sim.nodes {
            node.skew = rng.random_range(-max_skew_ms..=max_skew_ms) * MS;
        }
        let links = sim.link_keys();
        for _ in 0..rng.random_range(10..80) {
            let i = rng.random_range(0..n);
            let path = PATHS[rng.random_range(0..PATHS.len())];
            let (a, b) = links[rng.random_range(0..links.len())];
            sim.now += 1_000; // edits take time: with no skew, mtimes never repeat
            match rng.random_range(0..100) {
                _ if !sim.nodes[i].up => sim.restart(i),
                0..50 => {
                    let len = rng.random_range(0..4);
                    let content: Vec<u8> = (0..len).map(|_| rng.random_range(b'0'..b'3')).collect();
                    let mode = [0o644, 0o600][rng.random_range(0..2)];
                    let mtime = sim.now + sim.nodes[i].skew;
                    sim.edit(i, path, Some((&content, mode, mtime)));
                }
                50..65 => sim.delete(i, path),
                65..75 => sim.partition(a, b),
                75..85 => sim.link(a, b),
                85..90 => sim.crash(i),
                _ => sim.now += rng.random_range(0..10) * MS,
            }
            for _ in 0..rng.random_range(0..6) {
                sim.step();
            }
        }
        sim.loss = 0.0;
        sim.heal_all();
        sim.run_until_quiet(QUIET)?;
        sim.check_converged()?;
        match (0..n).find(|&i| sim.rescan(i) != 0) {
            Some(i) => Err(format!("node {i}: applied writes seen as local changes")),
            None => Ok(sim.stats),
        }
    }

    #[test]
    fn random_workloads_converge() {
        let mut total = Stats::default();
        for seed in 0..300 {
            let s = random_workload(seed, 0).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            total.drops += s.drops;
            total.applied += s.applied;
        }
        assert!(
            total.drops > 100 && total.applied > 1000,
            "knobs unused: {total:?}"
        );
    }

    /// As above with ±3 ms of clock skew between nodes (3000 seeds; more with
    /// `CERTMESH_SIM_SEEDS`). This found the merge and stale-view bugs fixed in plan.rs.
    #[test]
    fn random_workloads_with_clock_skew_converge() {
        let seeds = std::env::var("CERTMESH_SIM_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        for seed in 0..seeds {
            random_workload(seed, 3).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }

    /// The puller at its tightest (one fetch, one item per unit, two in flight):
    /// units, held-back work and retries still converge.
    #[test]
    fn random_workloads_with_a_tight_pipeline_converge() {
        let tight = Limits {
            in_flight: 2,
            batch_items: 1,
            apply_items: 1,
            apply_bytes: 1,
            apply_delay: Duration::from_millis(50),
            parallel_fetches: 1,
            per_peer_fetches: 1,
        };
        for seed in 0..300 {
            random_workload_with(seed, 3, tight).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }

    /// Content above the inline limit is fetched from a source, not sent inline.
    #[test]
    fn large_content_is_fetched_small_content_goes_inline() {
        let mut sim = Sim::mesh(2, 1);
        let big = vec![b'x'; crate::core::engine::MAX_INLINE + 1];
        sim.write(0, "dhparam.pem", &big);
        sim.write(0, "live/www/cert.pem", b"small");
        quiet_and_converged(&mut sim);
        assert_eq!(sim.content(1, "dhparam.pem"), Some(&big[..]));
        assert_eq!((sim.stats.fetched, sim.stats.inline), (1, 1));
    }

    #[test]
    fn restart_with_index_intact_converges() {
        for seed in 0..50 {
            let mut sim = Sim::mesh(3, seed);
            sim.write(0, "x", b"1");
            sim.write(1, "y", b"1");
            quiet_and_converged(&mut sim);
            // B crashes mid-stream: its new edit may not have left yet.
            sim.write(1, "y", b"2");
            sim.write(0, "x", b"2");
            sim.step();
            sim.crash(1);
            sim.write(0, "z", b"while B was down");
            sim.delete(2, "x");
            sim.run_until_quiet(QUIET).unwrap();
            sim.restart(1);
            quiet_and_converged(&mut sim);
            assert_eq!(sim.content(1, "z"), Some(&b"while B was down"[..]));
            assert_eq!(sim.content(2, "y"), Some(&b"2"[..]));
            assert!(sim.content(1, "x").is_none());
            assert_eq!(sim.rescan(1), 0);
        }
    }

    /// The sim runs the production engine: break one of its rules (acks one sequence
    /// too far) and a seeded run no longer converges.
    #[test]
    fn a_broken_engine_rule_fails_the_sim() {
        let mut sim = Sim::mesh(3, 7);
        sim.write(0, "live/www/fullchain.pem", b"chain v1");
        quiet_and_converged(&mut sim);
        sim.nodes
            .iter_mut()
            .for_each(|n| n.engine.break_acks = true);
        sim.write(1, "live/www/fullchain.pem", b"chain v2");
        sim.run_until_quiet(QUIET).unwrap();
        let err = sim.check_converged().unwrap_err();
        assert!(
            err.contains("invalid") || err.contains("acknowledges"),
            "{err}"
        );
        eprintln!("broken acks: {err}");
    }

    /// Tombstones in the simulator: node 1 is away while node 0 deletes the file
    /// node 1 wrote, and node 0 collects the tombstone as soon as the core allows
    /// (retention zero). When node 1 comes back with the old file, the deletion still
    /// wins. Break the rule that every configured peer, connected or not, must have
    /// acknowledged a tombstone and the deleted file comes back.
    fn a_deletion_survives_tombstone_collection(broken: bool) -> Result<(), String> {
        let mut sim = Sim::new(2, 11);
        for n in &mut sim.nodes {
            let e = std::mem::replace(
                &mut n.engine,
                Engine::new(Index::new(n.id.short()), DEFAULT_MAX_FILE_SIZE),
            );
            n.engine =
                Engine::new(e.into_index(), DEFAULT_MAX_FILE_SIZE).with_retention(Duration::ZERO);
            n.engine.break_tombstone_gate = broken;
        }
        sim.link(0, 1);
        sim.write(1, "live/old/cert.pem", b"old");
        sim.run_until_quiet(QUIET)?;
        sim.check_converged()?;
        sim.partition(0, 1);
        sim.delete(0, "live/old/cert.pem");
        sim.write(0, "live/new/cert.pem", b"new");
        sim.now += MS;
        let collected = sim.nodes[0].engine.collect_tombstones(sim.now).len();
        sim.heal_all();
        sim.run_until_quiet(QUIET)?;
        sim.check_converged()?;
        match (0..2).find(|&i| sim.content(i, "live/old/cert.pem").is_some()) {
            Some(i) => Err(format!(
                "node {i}: the deleted file came back ({collected} tombstones collected)"
            )),
            None => Ok(()),
        }
    }

    #[test]
    fn a_tombstone_is_kept_until_a_peer_that_was_away_has_it() {
        a_deletion_survives_tombstone_collection(false).unwrap();
        let err = match a_deletion_survives_tombstone_collection(true) {
            Ok(()) => panic!("broken rule passed"),
            Err(e) => e,
        };
        assert!(err.contains("came back"), "{err}");
        eprintln!("broken tombstone gate: {err}");
    }

    /// The sim runs the production pipeline: a fetch fails because the source's
    /// content changed meanwhile; break the rule that a failed fetch leaves the
    /// flight (and is retried) and the newer content never arrives.
    #[test]
    fn a_broken_pipeline_rule_fails_the_sim() {
        let run = |broken: bool| {
            let mut sim = Sim::mesh(2, 3);
            sim.nodes[1].pipe.break_failures = broken;
            let big = |c: u8| vec![c; crate::core::engine::MAX_INLINE + 1];
            sim.write(0, "dhparam.pem", &big(b'1'));
            while sim.nodes[1].engine.plan().needs_len() == 0 {
                assert!(sim.step(), "the record never arrived");
            }
            // Node 1 needs v1; node 0 has moved on before node 1 fetches.
            sim.write(0, "dhparam.pem", &big(b'2'));
            sim.run_until_quiet(QUIET).unwrap();
            assert_eq!(sim.stats.fetch_failed, 1);
            sim.check_converged()
                .map(|()| sim.content(1, "dhparam.pem") == Some(&big(b'2')[..]))
        };
        assert_eq!(run(false), Ok(true));
        let err = run(true).expect_err("a failed fetch that never leaves the flight");
        // The divergence: node 1 never got the file.
        assert!(
            err.contains("node 1: ({}, {})"),
            "{}",
            &err[..err.len().min(300)]
        );
    }

    #[test]
    fn same_seed_same_run() {
        let run = |seed| {
            let mut sim = Sim::mesh(4, seed);
            sim.loss = 0.1;
            for k in 0..20u8 {
                sim.write(usize::from(k % 4), PATHS[usize::from(k) % 5], &[k]);
                sim.step();
            }
            sim.loss = 0.0;
            let steps = sim.run_until_quiet(QUIET).unwrap();
            (steps, sim.now, sim.stats.delivered, sim.stats.drops)
        };
        assert_eq!(run(7), run(7));
    }

    /// 4 regions × (2 hubs + `edges` edges), 1–5 ms within a region, 20–150 ms
    /// between regions.
    fn wan_hubs(edges: usize, seed: u64) -> Sim {
        Sim::hubs(4, 2, edges, (MS, 5 * MS), (20 * MS, 150 * MS), seed)
    }

    /// A barrier started on an edge is done only once every node — edges
    /// of other regions three hops away included — has the token, and then it is.
    #[test]
    fn a_barrier_in_a_hub_topology_waits_for_every_edge() {
        let mut sim = wan_hubs(6, 11);
        quiet_and_converged(&mut sim);
        let origin = 2; // region 0, first edge
        sim.write(origin, "acme/token", b"key-authorization");
        let p = RelPath::parse("acme/token").unwrap();
        let now = sim.now;
        assert!(sim.nodes[origin].engine.start_barrier(1, &p, 60_000, now));
        let mut done_at = None;
        for _ in 0..QUIET {
            let status = sim.nodes[origin].engine.barrier_status(1).unwrap();
            let everywhere = (0..sim.nodes.len())
                .all(|i| sim.content(i, "acme/token") == Some(&b"key-authorization"[..]));
            assert!(!status.done || everywhere, "done before every node had it");
            if status.done {
                assert_eq!(status.nodes.len(), sim.nodes.len() - 1, "{status:?}");
                assert!(status.nodes.iter().all(|n| n.live && n.has));
                done_at = Some(sim.now);
                break;
            }
            if !sim.step() {
                break;
            }
        }
        let done_at = done_at.expect("the barrier never completed");
        // Token out, three hops to a far edge and reports back: several WAN trips.
        assert!(done_at - now < 2_000 * MS, "{} ms", (done_at - now) / MS);
        sim.nodes[origin].engine.finish_barrier(1);
        quiet_and_converged(&mut sim);
    }

    /// 1,000 simulated nodes (4 regions × (2 hubs + 248 edges)),
    /// WAN latencies between regions; prints propagation of a small file from an
    /// edge to every node and the barrier's time, in simulated time. Run with
    /// `cargo test --release --lib sim::tests::hubs_1000 -- --ignored --nocapture`
    /// (about 50 s of wall time here; `SIM_HUBS_EDGES=48 SIM_HUBS_ROUNDS=3` for a
    /// 200-node run in a second). Figures: BENCHMARKS.md, "Hub topologies".
    #[test]
    #[ignore = "a measurement: prints figures"]
    fn hubs_1000_nodes_wan_propagation() {
        let started = std::time::Instant::now();
        // SIM_HUBS_EDGES: edges per region (248: 1,000 nodes).
        let edges = std::env::var("SIM_HUBS_EDGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(248);
        let mut sim = wan_hubs(edges, 5);
        sim.run_until_quiet(10 * QUIET).unwrap();
        let formed = started.elapsed();
        let n = sim.nodes.len();
        let mut all = Vec::new();
        let mut barriers = Vec::new();
        let rounds: u8 = std::env::var("SIM_HUBS_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        for round in 0..rounds {
            let origin = 2 + usize::from(round) * 7;
            let path = format!("acme/t{round}");
            let body = vec![round; 100];
            sim.write(origin, &path, &body);
            let t0 = sim.now;
            let p = RelPath::parse(&path).unwrap();
            assert!(sim.nodes[origin]
                .engine
                .start_barrier(u64::from(round) + 1, &p, 60_000, t0));
            let mut arrived: Vec<Option<i64>> = vec![None; n];
            arrived[origin] = Some(t0);
            let mut barrier = None;
            while arrived.iter().any(Option::is_none) || barrier.is_none() {
                for (i, a) in arrived.iter_mut().enumerate() {
                    if a.is_none() && sim.content(i, &path) == Some(&body[..]) {
                        *a = Some(sim.now);
                    }
                }
                let st = sim.nodes[origin]
                    .engine
                    .barrier_status(u64::from(round) + 1);
                if barrier.is_none() && st.is_some_and(|s| s.done) {
                    barrier = Some(sim.now - t0);
                }
                assert!(sim.step(), "stalled");
            }
            sim.nodes[origin]
                .engine
                .finish_barrier(u64::from(round) + 1);
            sim.run_until_quiet(10 * QUIET).unwrap();
            all.extend(
                arrived
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != origin)
                    .map(|(_, a)| a.unwrap_or(t0) - t0),
            );
            barriers.extend(barrier);
        }
        all.sort_unstable();
        let pct = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1e6;
        let b_ms: Vec<f64> = barriers.iter().map(|b| *b as f64 / 1e6).collect();
        eprintln!(
            "sim hubs {n} nodes (4 regions x (2 hubs + {edges} edges), 20-150 ms WAN): \
             small file to every node p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
             barrier (from an edge) {:?} ms; wall: formed {:.1} s, total {:.1} s",
            pct(0.5),
            pct(0.99),
            pct(1.0),
            b_ms,
            formed.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        assert!(pct(0.99) < 1_000.0);
    }

    /// Per-peer caps are the index's own, so an honest tree of 150,000
    /// paths syncs among three nodes, and after a node restarts every full index
    /// sent again fits: no session is refused (a refusal fails `check_converged`).
    #[test]
    fn an_honest_tree_of_150_000_paths_syncs_and_survives_a_restart() {
        let mut sim = Sim::mesh(3, 25);
        for i in 0..150_000 {
            sim.write(0, &format!("t/{}/{i}.pem", i % 300), b"x");
        }
        quiet_and_converged(&mut sim);
        assert_eq!(sim.nodes[2].engine.index().live_count(), 150_000);
        sim.crash(1);
        sim.restart(1);
        quiet_and_converged(&mut sim);
    }
}
