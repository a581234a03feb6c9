//! What the fleet serves (issue 26): the latest serving-probe results of this node
//! (set by the probes) and of each peer (as the peer sent them over its own
//! authenticated session). A node speaks only for itself: a peer's records are
//! filed under the device ID of the connection they came on, never under a name
//! the message claims, so no peer can report for another. The viewer, not the
//! reporter, decides whether a served leaf is current (against its own tree).
//!
//! Pure: no I/O, no clock. The engine owns one [`ServedBoard`]; a new generation of
//! this node's records is sent once to every connected peer that takes them.

use std::collections::HashMap;

use crate::identity::DeviceId;

/// Most records one node reports (one per frontend and certificate).
pub const MAX_SERVED_RECORDS: usize = 16_384;
/// Longest certificate or frontend name in a record, in bytes.
pub const MAX_SERVED_NAME: usize = 255;
/// Longest error in a record, in bytes (longer ones are cut by the sender).
pub const MAX_SERVED_ERROR: usize = 160;

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
}

impl ServedRecord {
    /// Whether `self` and `other` say the same thing (apart from when it was seen).
    pub fn same_outcome(&self, other: &ServedRecord) -> bool {
        self.leaf_sha256 == other.leaf_sha256 && self.error == other.error
    }

    /// Checks the bounds a peer's record must meet.
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

/// This node's results and the peers' latest.
#[derive(Debug, Default)]
pub struct ServedBoard {
    mine: Vec<ServedRecord>,
    /// Bumped when `mine` changes: peers sent an older one get the new one.
    generation: u64,
    peers: HashMap<DeviceId, Vec<ServedRecord>>,
}

impl ServedBoard {
    /// This node's latest results (sorted, at most [`MAX_SERVED_RECORDS`]).
    pub fn set_mine(&mut self, mut records: Vec<ServedRecord>) {
        records.sort_by(|a, b| (&a.cert, &a.frontend).cmp(&(&b.cert, &b.frontend)));
        records.dedup_by(|a, b| a.cert == b.cert && a.frontend == b.frontend);
        records.truncate(MAX_SERVED_RECORDS);
        for r in &mut records {
            if let Some(e) = &mut r.error {
                cut(e, MAX_SERVED_ERROR);
            }
        }
        if records != self.mine {
            self.mine = records;
            self.generation += 1;
        }
    }

    pub fn mine(&self) -> &[ServedRecord] {
        &self.mine
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `peer`'s whole latest report (it replaces the previous one): refused if it
    /// breaks a bound, or names a (certificate, frontend) twice.
    pub fn handle_peer(
        &mut self,
        peer: DeviceId,
        records: Vec<ServedRecord>,
    ) -> Result<(), String> {
        if records.len() > MAX_SERVED_RECORDS {
            return Err(format!("{} served records", records.len()));
        }
        let mut keys = std::collections::HashSet::with_capacity(records.len());
        for r in &records {
            r.check()?;
            if !keys.insert((r.cert.as_str(), r.frontend.as_str())) {
                return Err(format!("{}/{} reported twice", r.cert, r.frontend));
            }
        }
        self.peers.insert(peer, records);
        Ok(())
    }

    /// Each peer's latest report (kept after it disconnects, with its `seen_unix`).
    pub fn peers(&self) -> impl Iterator<Item = (&DeviceId, &[ServedRecord])> {
        self.peers.iter().map(|(d, r)| (d, r.as_slice()))
    }
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
        }
    }

    #[test]
    fn a_new_generation_only_when_the_results_change() {
        let mut b = ServedBoard::default();
        b.set_mine(vec![rec("b", Some(1)), rec("a", None)]);
        assert_eq!(b.generation(), 1);
        assert_eq!(b.mine()[0].cert, "a");
        b.set_mine(vec![rec("a", None), rec("b", Some(1))]);
        assert_eq!(b.generation(), 1);
        b.set_mine(vec![rec("a", None), rec("b", Some(2))]);
        assert_eq!(b.generation(), 2);
    }

    #[test]
    fn a_peer_report_breaking_a_bound_is_refused() {
        let mut b = ServedBoard::default();
        let peer = DeviceId([7; 32]);
        let twice = vec![rec("a", Some(1)), rec("a", Some(2))];
        assert!(b.handle_peer(peer, twice).unwrap_err().contains("twice"));
        let mut both = rec("a", Some(1));
        both.error = Some("x".into());
        assert!(b.handle_peer(peer, vec![both]).is_err());
        let mut long = rec("a", None);
        long.error = Some("x".repeat(MAX_SERVED_ERROR + 1));
        assert!(b.handle_peer(peer, vec![long]).is_err());
        assert_eq!(b.peers().count(), 0);
        b.handle_peer(peer, vec![rec("a", Some(1))]).unwrap();
        assert_eq!(b.peers().next().map(|(_, r)| r.len()), Some(1));
    }
}
