//! What the fleet serves: the latest serving-probe results of this node
//! (set by the probes) and of every other node that reports, near or far.
//!
//! A node speaks only for itself: its report ([`SignedReport`]) is signed with its
//! node key over [`signed_message`] and relayed unchanged, so no node can report for
//! another, and a relay cannot alter what it forwards. Reports travel like the
//! census: hop by hop, each node forwarding a new generation once to its
//! connected peers not yet listed in the report's `asked` list (which it extends),
//! so a full mesh sends each report once per link and hubs carry reports between
//! regions. The viewer, not the reporter, decides whether a served leaf is current
//! (against its own tree).
//!
//! Reports that no longer describe the fleet are not counted: a node removed from
//! the peer list (on reload) has its report dropped and any relayed copy refused
//! until it is configured again; a report not refreshed within [`STALE_AFTER_MS`]
//! (each node sends a new generation every probe round) is shown as stale.
//!
//! Pure: no I/O, no clock, no crypto (the wire layer checks signatures before a
//! report gets here; time comes in as `now_ms`). The engine owns one [`ServedBoard`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::core::device::DeviceId;

/// Most records one node reports (one per frontend and certificate).
pub const MAX_SERVED_RECORDS: usize = 16_384;
/// Longest certificate, frontend or node name in a report, in bytes.
pub const MAX_SERVED_NAME: usize = 255;
/// Longest error in a record, in bytes (longer ones are cut by the sender).
pub const MAX_SERVED_ERROR: usize = 160;
/// Most other nodes whose reports a node keeps (new ones beyond are not taken).
pub const MAX_ORIGINS: usize = 4096;
/// Most bytes of other nodes' reports a node keeps (new ones beyond are not taken).
pub const MAX_STORED_BYTES: usize = 64 << 20;
/// Most device IDs a report lists as already sent it.
pub const MAX_ASKED: usize = 4096;
/// How often each node probes and reports at the least (`probe::PERIOD`, ±10 %).
pub const REPORT_PERIOD_MS: i64 = 300_000;
/// A report not refreshed for this long (3 probe periods, by this node's clock) is
/// stale: shown as such, never counted as serving an old certificate.
pub const STALE_AFTER_MS: i64 = 3 * REPORT_PERIOD_MS;

/// One probe result: what `frontend` presented for `cert`, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedRecord {
    pub cert: String,
    pub frontend: String,
    /// SHA-256 of the served leaf's DER; `None` when the handshake failed.
    pub leaf_sha256: Option<[u8; 32]>,
    /// The served leaf's notAfter (unix seconds).
    pub not_after_unix: Option<i64>,
    /// Why no leaf was read ("connection refused", …).
    pub error: Option<String>,
    /// When this was seen (unix seconds).
    pub seen_unix: i64,
    /// Since when this frontend has served this leaf (or failed this way).
    pub since_unix: i64,
    /// The same in unix milliseconds, for the rollout time (0: not known, e.g. a
    /// report from an older node).
    pub since_ms: i64,
}

impl ServedRecord {
    /// Whether `self` and `other` say the same thing (apart from when it was seen).
    pub fn same_outcome(&self, other: &ServedRecord) -> bool {
        self.leaf_sha256 == other.leaf_sha256 && self.error == other.error
    }

    /// Checks the bounds a received record must meet.
    pub fn check(&self) -> Result<(), String> {
        if self.cert.is_empty() || self.cert.len() > MAX_SERVED_NAME {
            return Err(format!("certificate name of {} bytes", self.cert.len()));
        }
        if self.frontend.is_empty() || self.frontend.len() > MAX_SERVED_NAME {
            return Err(format!("frontend name of {} bytes", self.frontend.len()));
        }
        if self
            .error
            .as_ref()
            .is_some_and(|e| e.len() > MAX_SERVED_ERROR)
        {
            return Err("error text too long".into());
        }
        if self.leaf_sha256.is_none() == self.error.is_none() {
            return Err("a record has either a leaf or an error".into());
        }
        Ok(())
    }
}

/// Checks a whole received list: bounds, and each (certificate, frontend) once.
pub fn check_records(records: &[ServedRecord]) -> Result<(), String> {
    if records.len() > MAX_SERVED_RECORDS {
        return Err(format!("{} served records", records.len()));
    }
    let mut keys = std::collections::HashSet::with_capacity(records.len());
    for r in records {
        r.check()?;
        if !keys.insert((r.cert.as_str(), r.frontend.as_str())) {
            return Err(format!("{}/{} reported twice", r.cert, r.frontend));
        }
    }
    Ok(())
}

/// Sorts this node's records, keeps each (certificate, frontend) once and cuts
/// errors and the count to the bounds receivers check.
pub fn normalize(mut records: Vec<ServedRecord>) -> Vec<ServedRecord> {
    records.sort_by(|a, b| (&a.cert, &a.frontend).cmp(&(&b.cert, &b.frontend)));
    records.dedup_by(|a, b| a.cert == b.cert && a.frontend == b.frontend);
    records.truncate(MAX_SERVED_RECORDS);
    for r in &mut records {
        if let Some(e) = &mut r.error {
            cut(e, MAX_SERVED_ERROR);
        }
    }
    records
}

/// A node's report as it signed it (the encoded list is kept as received, so relays
/// forward exactly the signed bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedReport {
    pub origin: DeviceId,
    /// The node's own name (shown for nodes this one does not list as peers).
    pub name: String,
    /// Grows with every report of the origin (older ones are dropped).
    pub generation: u64,
    /// The origin's node certificate (DER); its SHA-256 is `origin`.
    pub origin_cert: Arc<[u8]>,
    /// The records, encoded (protobuf `ServedList`).
    pub list: Arc<[u8]>,
    /// ECDSA P-256 by the origin's node key over [`signed_message`].
    pub signature: Arc<[u8]>,
    /// Nodes already sent this report (not signed: relays extend it).
    pub asked: Vec<DeviceId>,
}

impl SignedReport {
    fn bytes(&self) -> usize {
        self.list.len() + self.origin_cert.len() + self.signature.len() + self.name.len() + 64
    }
}

/// What the origin signs: a domain label, its device ID, the generation, its name
/// and the encoded list.
pub fn signed_message(origin: &DeviceId, generation: u64, name: &str, list: &[u8]) -> Vec<u8> {
    const LABEL: &[u8] = b"certmesh served report v1\0";
    let mut m = Vec::with_capacity(LABEL.len() + 32 + 8 + 2 + name.len() + list.len());
    m.extend_from_slice(LABEL);
    m.extend_from_slice(&origin.0);
    m.extend_from_slice(&generation.to_be_bytes());
    m.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    m.extend_from_slice(name.as_bytes());
    m.extend_from_slice(list);
    m
}

#[derive(Debug)]
struct Stored {
    report: SignedReport,
    records: Vec<ServedRecord>,
    /// When this node received the origin's latest generation (its own clock).
    received_ms: i64,
}

/// Another node's latest report, as `status` reads it.
#[derive(Debug, Clone, Copy)]
pub struct OtherReport<'a> {
    pub device: &'a DeviceId,
    /// The name the node signed.
    pub name: &'a str,
    pub records: &'a [ServedRecord],
    /// When this node received it (unix milliseconds, its own clock).
    pub received_ms: i64,
    /// Not refreshed within [`STALE_AFTER_MS`].
    pub stale: bool,
}

/// This node's results and the other nodes' latest.
#[derive(Debug)]
pub struct ServedBoard {
    /// This node (set with the roster).
    me: DeviceId,
    mine: Vec<ServedRecord>,
    mine_report: Option<SignedReport>,
    others: HashMap<DeviceId, Stored>,
    bytes: usize,
    /// Per peer: reports to send it (by origin), with the `asked` list to send.
    outbox: HashMap<DeviceId, BTreeMap<DeviceId, Vec<DeviceId>>>,
    /// The configured peers (the last roster).
    peers: BTreeSet<DeviceId>,
    /// Nodes removed from the peer list: their reports are refused until they are
    /// configured again (bounded by [`MAX_ORIGINS`]).
    departed: BTreeSet<DeviceId>,
}

impl Default for ServedBoard {
    fn default() -> Self {
        ServedBoard {
            me: DeviceId([0; 32]),
            mine: Vec::new(),
            mine_report: None,
            others: HashMap::new(),
            bytes: 0,
            outbox: HashMap::new(),
            peers: BTreeSet::new(),
            departed: BTreeSet::new(),
        }
    }
}

impl ServedBoard {
    pub fn set_me(&mut self, me: DeviceId) {
        self.me = me;
    }

    /// The configured peers (at start and on reload). A peer no longer listed has
    /// left the fleet: its report is dropped, and copies other nodes still relay
    /// are refused until it is listed again.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = DeviceId>) {
        let new: BTreeSet<DeviceId> = peers.into_iter().collect();
        let gone: Vec<DeviceId> = self.peers.difference(&new).copied().collect();
        for d in gone {
            if let Some(s) = self.others.remove(&d) {
                self.bytes -= s.report.bytes();
            }
            for out in self.outbox.values_mut() {
                out.remove(&d);
            }
            if self.departed.len() < MAX_ORIGINS {
                self.departed.insert(d);
            }
        }
        self.departed.retain(|d| !new.contains(d));
        self.peers = new;
    }

    /// This node's latest results (for its own `status`).
    pub fn set_mine(&mut self, records: Vec<ServedRecord>) {
        self.mine = records;
    }

    pub fn mine(&self) -> &[ServedRecord] {
        &self.mine
    }

    /// This node's signed report: sent to every peer in `connected` (which take
    /// reports), listing them all as asked, so they do not relay it to each other.
    pub fn publish_mine(&mut self, report: SignedReport, connected: &[DeviceId]) {
        let me = self.me;
        let asked = asked_list([me].iter().chain(connected));
        for p in connected {
            self.outbox.entry(*p).or_default().insert(me, asked.clone());
        }
        self.mine_report = Some(report);
    }

    /// A report `from` a peer, its signature already checked, received at
    /// `now_ms`: kept when it is the origin's newest (and within the budgets, and
    /// the origin has not left the fleet), then relayed to the peers in `connected`
    /// that it does not list as asked.
    pub fn handle_report(
        &mut self,
        from: DeviceId,
        report: SignedReport,
        records: Vec<ServedRecord>,
        connected: &[DeviceId],
        now_ms: i64,
    ) -> Result<(), String> {
        let me = self.me;
        check_records(&records)?;
        if report.asked.len() > MAX_ASKED {
            return Err(format!("{} asked", report.asked.len()));
        }
        if report.origin == me || self.departed.contains(&report.origin) {
            return Ok(());
        }
        let old = self.others.get(&report.origin);
        if old.is_some_and(|o| o.report.generation >= report.generation) {
            return Ok(());
        }
        let old_bytes = old.map_or(0, |o| o.report.bytes());
        let new_origin = old.is_none();
        if (new_origin && self.others.len() >= MAX_ORIGINS)
            || self.bytes - old_bytes + report.bytes() > MAX_STORED_BYTES
        {
            return Ok(());
        }
        let mut asked: BTreeSet<DeviceId> = report.asked.iter().copied().collect();
        asked.extend([from, report.origin, me]);
        let targets: Vec<DeviceId> = connected
            .iter()
            .filter(|p| !asked.contains(p))
            .copied()
            .collect();
        asked.extend(targets.iter().copied());
        let asked = asked_list(asked.iter());
        for t in targets {
            self.outbox
                .entry(t)
                .or_default()
                .insert(report.origin, asked.clone());
        }
        self.bytes = self.bytes - old_bytes + report.bytes();
        let origin = report.origin;
        self.others.insert(
            origin,
            Stored {
                report: SignedReport {
                    asked: Vec::new(),
                    ..report
                },
                records,
                received_ms: now_ms,
            },
        );
        Ok(())
    }

    /// `peer` connected and takes reports: it is sent every report kept.
    pub fn connected(&mut self, peer: DeviceId) {
        let me = self.me;
        let asked = vec![me, peer];
        let out = self.outbox.entry(peer).or_default();
        if self.mine_report.is_some() {
            out.insert(me, asked.clone());
        }
        for o in self.others.keys().filter(|o| **o != peer) {
            out.insert(*o, asked.clone());
        }
    }

    /// `peer`'s session ended: nothing more is queued for it.
    pub fn disconnected(&mut self, peer: &DeviceId) {
        self.outbox.remove(peer);
    }

    /// The reports to send `peer` now.
    pub fn take_outbox(&mut self, peer: &DeviceId) -> Vec<SignedReport> {
        let me = self.me;
        let Some(queued) = self.outbox.remove(peer) else {
            return Vec::new();
        };
        queued
            .into_iter()
            .filter_map(|(origin, asked)| {
                let r = if origin == me {
                    self.mine_report.as_ref()
                } else {
                    self.others.get(&origin).map(|s| &s.report)
                }?;
                Some(SignedReport { asked, ..r.clone() })
            })
            .collect()
    }

    /// Every other node's latest report, judged stale or not at `now_ms`.
    pub fn others(&self, now_ms: i64) -> impl Iterator<Item = OtherReport<'_>> {
        self.others.iter().map(move |(d, s)| OtherReport {
            device: d,
            name: s.report.name.as_str(),
            records: s.records.as_slice(),
            received_ms: s.received_ms,
            stale: now_ms.saturating_sub(s.received_ms) > STALE_AFTER_MS,
        })
    }
}

fn asked_list<'a>(ids: impl Iterator<Item = &'a DeviceId>) -> Vec<DeviceId> {
    let set: BTreeSet<DeviceId> = ids.copied().collect();
    set.into_iter().take(MAX_ASKED).collect()
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(cert: &str, sha: Option<u8>) -> ServedRecord {
        ServedRecord {
            cert: cert.into(),
            frontend: "nginx".into(),
            leaf_sha256: sha.map(|b| [b; 32]),
            not_after_unix: sha.map(|_| 1),
            error: sha.is_none().then(|| "connection refused".to_string()),
            seen_unix: 5,
            since_unix: 5,
            since_ms: 5000,
        }
    }

    fn report(origin: u8, generation: u64) -> SignedReport {
        SignedReport {
            origin: DeviceId([origin; 32]),
            name: format!("n{origin}"),
            generation,
            origin_cert: Arc::from(&b"cert"[..]),
            list: Arc::from(&b"list"[..]),
            signature: Arc::from(&b"sig"[..]),
            asked: Vec::new(),
        }
    }

    const ME: DeviceId = DeviceId([0; 32]);

    #[test]
    fn a_report_breaking_a_bound_is_refused() {
        let mut b = ServedBoard::default();
        let peer = DeviceId([7; 32]);
        let twice = vec![rec("a", Some(1)), rec("a", Some(2))];
        let e = b.handle_report(peer, report(7, 1), twice, &[], 0);
        assert!(e.unwrap_err().contains("twice"));
        let mut both = rec("a", Some(1));
        both.error = Some("x".into());
        assert!(b
            .handle_report(peer, report(7, 1), vec![both], &[], 0)
            .is_err());
        assert_eq!(b.others(0).count(), 0);
    }

    #[test]
    fn a_hub_relays_a_new_generation_once_to_peers_not_asked() {
        let mut hub = ServedBoard::default();
        hub.set_me(ME);
        let (edge1, edge2, other_hub) = (DeviceId([1; 32]), DeviceId([2; 32]), DeviceId([3; 32]));
        let connected = [edge1, edge2, other_hub];
        let mut r = report(1, 10);
        r.asked = vec![edge1, other_hub];
        hub.handle_report(edge1, r.clone(), vec![rec("a", Some(1))], &connected, 0)
            .unwrap();
        assert!(hub.take_outbox(&other_hub).is_empty(), "listed as asked");
        assert!(hub.take_outbox(&edge1).is_empty(), "the origin");
        let sent = hub.take_outbox(&edge2);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].asked.contains(&edge2) && sent[0].asked.contains(&ME));
        // The same generation again (from the other hub): not relayed again.
        hub.handle_report(other_hub, r, vec![rec("a", Some(1))], &connected, 0)
            .unwrap();
        assert!(hub.take_outbox(&edge2).is_empty());
        assert_eq!(
            hub.others(0).next().map(|o| (o.name, o.records.len())),
            Some(("n1", 1))
        );
    }

    #[test]
    fn an_older_generation_never_replaces_a_newer_one() {
        let mut b = ServedBoard::default();
        let peer = DeviceId([7; 32]);
        b.handle_report(peer, report(7, 2), vec![rec("a", Some(2))], &[], 0)
            .unwrap();
        b.handle_report(peer, report(7, 1), vec![rec("a", Some(1))], &[], 0)
            .unwrap();
        let o = b.others(0).next().unwrap();
        assert_eq!(o.records[0].leaf_sha256, Some([2; 32]));
    }

    #[test]
    fn the_signed_message_binds_origin_generation_name_and_list() {
        let m = |o: u8, g: u64, n: &str, l: &[u8]| signed_message(&DeviceId([o; 32]), g, n, l);
        let base = m(1, 1, "a", b"x");
        assert_ne!(base, m(2, 1, "a", b"x"));
        assert_ne!(base, m(1, 2, "a", b"x"));
        assert_ne!(base, m(1, 1, "b", b"x"));
        assert_ne!(base, m(1, 1, "a", b"y"));
        assert_ne!(m(1, 1, "ab", b"c"), m(1, 1, "a", b"bc"));
    }

    #[test]
    fn a_peer_removed_from_the_config_is_dropped_and_not_taken_again() {
        let mut b = ServedBoard::default();
        let (lb2, lb3) = (DeviceId([2; 32]), DeviceId([3; 32]));
        b.set_peers([lb2, lb3]);
        b.handle_report(lb3, report(3, 1), vec![rec("a", Some(1))], &[], 0)
            .unwrap();
        b.set_peers([lb2]);
        assert_eq!(b.others(0).count(), 0);
        // lb2 still lists lb3 and relays its next report: refused.
        b.handle_report(lb2, report(3, 2), vec![rec("a", Some(1))], &[], 0)
            .unwrap();
        assert_eq!(b.others(0).count(), 0);
        // Listed again: taken again.
        b.set_peers([lb2, lb3]);
        b.handle_report(lb3, report(3, 3), vec![rec("a", Some(1))], &[], 0)
            .unwrap();
        assert_eq!(b.others(0).count(), 1);
    }

    #[test]
    fn a_report_not_refreshed_for_three_periods_is_stale() {
        let mut b = ServedBoard::default();
        let peer = DeviceId([7; 32]);
        b.handle_report(peer, report(7, 1), vec![rec("a", Some(1))], &[], 1_000)
            .unwrap();
        let stale = |b: &ServedBoard, now| b.others(now).next().map(|o| o.stale);
        assert_eq!(stale(&b, 1_000 + STALE_AFTER_MS), Some(false));
        assert_eq!(stale(&b, 1_001 + STALE_AFTER_MS), Some(true));
        // A new generation refreshes it.
        b.handle_report(
            peer,
            report(7, 2),
            vec![rec("a", Some(1))],
            &[],
            2 * STALE_AFTER_MS,
        )
        .unwrap();
        assert_eq!(stale(&b, 2 * STALE_AFTER_MS + 1), Some(false));
    }
}
