//! Who may change the tree: each record carries its author's full device
//! ID, the author's signature over everything that makes the record (path, version
//! vector, kind, size, mode, mtime, content hash, link target, deletion, the
//! `modified_by` short id) and the author's node certificate. Relays forward all three
//! unchanged. A receiver with `[tree] writers` takes a record in only if its author is
//! listed and the signature verifies against the key of a certificate whose SHA-256
//! is that device ID (the same pinning as the TLS handshake), so no relay can forge,
//! re-attribute, or replay an older record as newer (the version vector is signed).
//!
//! Replay after deletion (issue 25 item 9): a record also carries an *attestation*,
//! the author's second signature over the same fields plus the time it was made
//! (`signed_ns`, message "v2"). Writers renew the attestations of their live records
//! before they are half the replay horizon old (same version, same content), and a
//! receiver refuses a live record whose attestation is older than the horizon for a
//! path it does not hold ([`Refusal::Stale`]): a deleted file's last record stops being
//! attested at its deletion, so once tombstones are collected no relay can bring it
//! back, while an unchanged old file keeps reaching new nodes. The v1 signature stays
//! for nodes that predate attestations (they ignore the new fields); a record without
//! an attestation is dated by its author's signed version counter (µs).
//!
//! A departed author (issue 25 item 9 follow-up): any other writer that holds a live
//! record whose attestation is older than 3/4 of the horizon attests it in its own
//! name ([`Attestation::by`], message "v2 by"): the author renews at 1/2, so this
//! happens only once the author has been silent for a quarter of the horizon. The
//! record (version, author, v1 signature) is unchanged. A receiver takes such an
//! attestation only from a device `writers` allows whose signature verifies; a
//! reader's is refused ([`Refusal::AttesterNotAWriter`], forged only if its
//! signature is bad), so a reader cannot keep a deleted file's record alive.
//!
//! Pure apart from the signature arithmetic (no I/O, no clock).

use std::collections::{HashMap, HashSet};

use crate::core::device::{self, DeviceId, NodeSigner};
use crate::core::record::{Attestation, Attester, Authorship, FileRecord, Kind, Signature};

/// Largest author certificate accepted (a node certificate has ~400 bytes).
pub const MAX_AUTHOR_CERT: usize = 4096;

/// The bytes an author signs for `r`: a domain tag, then every field that decides what
/// the record does, length-prefixed, big-endian.
pub fn signed_message(r: &FileRecord, author: &DeviceId) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + r.path.as_str().len() + r.target.len());
    m.extend_from_slice(b"certmesh record v1\0");
    record_fields(&mut m, r, author);
    m
}

/// The bytes of an attestation: a v2 domain tag, the signing time, then what
/// [`signed_message`] covers.
pub fn attested_message(r: &FileRecord, author: &DeviceId, signed_ns: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(136 + r.path.as_str().len() + r.target.len());
    m.extend_from_slice(b"certmesh record v2\0");
    m.extend_from_slice(&signed_ns.to_be_bytes());
    record_fields(&mut m, r, author);
    m
}

/// The bytes of an attestation by `by`, a writer other than the author: its own
/// domain tag, the signer, the signing time, then what [`signed_message`] covers.
pub fn attested_message_by(
    r: &FileRecord,
    author: &DeviceId,
    by: &DeviceId,
    signed_ns: i64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(168 + r.path.as_str().len() + r.target.len());
    m.extend_from_slice(b"certmesh record v2 by\0");
    m.extend_from_slice(&by.0);
    m.extend_from_slice(&signed_ns.to_be_bytes());
    record_fields(&mut m, r, author);
    m
}

fn record_fields(m: &mut Vec<u8>, r: &FileRecord, author: &DeviceId) {
    m.extend_from_slice(&author.0);
    let mut bytes = |b: &[u8]| {
        m.extend_from_slice(&(b.len() as u64).to_be_bytes());
        m.extend_from_slice(b);
    };
    bytes(r.path.as_str().as_bytes());
    bytes(r.target.as_bytes());
    m.push(match r.kind {
        Kind::File => 0,
        Kind::Directory => 1,
        Kind::Symlink => 2,
    });
    m.push(u8::from(r.deleted));
    m.extend_from_slice(&r.size.to_be_bytes());
    m.extend_from_slice(&r.mode.to_be_bytes());
    m.extend_from_slice(&r.mtime_ns.to_be_bytes());
    m.extend_from_slice(&r.hash.0);
    m.extend_from_slice(&r.modified_by.0.to_be_bytes());
    let pairs = r.version.pairs();
    m.extend_from_slice(&(pairs.len() as u64).to_be_bytes());
    for (d, v) in pairs {
        m.extend_from_slice(&d.0.to_be_bytes());
        m.extend_from_slice(&v.to_be_bytes());
    }
}

/// Signs `r` as its author at `now_ns`, with both signatures (`r.modified_by` must
/// be the signer's short id; a record of someone else is left as it is). False if
/// signing failed (no randomness).
pub fn sign(r: &mut FileRecord, signer: &NodeSigner, now_ns: i64) -> bool {
    let author = signer.id();
    if r.modified_by != author.short() {
        return false;
    }
    let Some(signature) = signer
        .sign(&signed_message(r, &author))
        .and_then(|s| Signature::from_slice(&s))
    else {
        return false;
    };
    let Some(attestation) = attest(r, signer, now_ns) else {
        return false;
    };
    r.auth = Some(Authorship {
        author,
        signature,
        cert: signer.cert().clone(),
        attestation: Some(attestation),
    });
    true
}

/// Renews the attestation of `r`, a signed record, at `now_ns`: same version, same
/// author and v1 signature. A record of someone else is attested in the signer's
/// name ([`Attestation::by`]). False if `r` is unsigned or signing failed.
pub fn reattest(r: &mut FileRecord, signer: &NodeSigner, now_ns: i64) -> bool {
    let Some(author) = r.auth.as_ref().map(|a| a.author) else {
        return false;
    };
    let fresh = if author == signer.id() {
        attest(r, signer, now_ns)
    } else {
        let id = signer.id();
        signer
            .sign(&attested_message_by(r, &author, &id, now_ns))
            .and_then(|s| Signature::from_slice(&s))
            .map(|signature| Attestation {
                signed_ns: now_ns,
                signature,
                by: Some(Box::new(Attester {
                    id,
                    cert: signer.cert().clone(),
                })),
            })
    };
    let Some(fresh) = fresh else {
        return false;
    };
    if let Some(a) = r.auth.as_mut() {
        a.attestation = Some(fresh);
    }
    true
}

fn attest(r: &FileRecord, signer: &NodeSigner, now_ns: i64) -> Option<Attestation> {
    let signature =
        Signature::from_slice(&signer.sign(&attested_message(r, &signer.id(), now_ns))?)?;
    Some(Attestation {
        signed_ns: now_ns,
        signature,
        by: None,
    })
}

/// When the author last vouched for `r` (ns since the epoch; `None`: unsigned): its
/// attestation's time, or, for a record without one (from a node that predates
/// attestations, or stripped by a relay), its author's version counter: signed by
/// v1, it is the author's clock in µs at the change (never earlier), and a receiver
/// refuses counters more than a day ahead of its own clock. Never the author-set
/// `mtime_ns`, which a file may carry from any date, the future included.
pub fn vouched_ns(r: &FileRecord) -> Option<i64> {
    let a = r.auth.as_ref()?;
    if let Some(t) = &a.attestation {
        return Some(t.signed_ns);
    }
    let counter = r.version.counter(r.modified_by);
    Some(i64::try_from(counter.saturating_mul(1000)).unwrap_or(i64::MAX))
}

/// Whether a live record vouched for longer than `horizon_ns` before `now_ns` is a
/// possible replay ([`Refusal::Stale`]); tombstones never are (they bring nothing
/// back).
pub fn stale(r: &FileRecord, now_ns: i64, horizon_ns: i64) -> Option<Refusal> {
    if r.deleted {
        return None;
    }
    let vouched = vouched_ns(r)?;
    (vouched < now_ns.saturating_sub(horizon_ns)).then(|| Refusal::Stale {
        age_s: now_ns.saturating_sub(vouched) / 1_000_000_000,
    })
}

/// Whether `theirs` renews the attestation of `ours`: the same record (version and
/// every field) by the same author, attested later. Such a record is taken as a
/// metadata refresh: nothing is fetched or applied.
pub fn renews(ours: &FileRecord, theirs: &FileRecord) -> bool {
    let (Some(a), Some(b)) = (&ours.auth, &theirs.auth) else {
        return false;
    };
    let newer = match (&a.attestation, &b.attestation) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(x), Some(y)) => y.signed_ns > x.signed_ns,
    };
    let same = FileRecord {
        auth: None,
        ..ours.clone()
    } == FileRecord {
        auth: None,
        ..theirs.clone()
    };
    newer && same && a.author == b.author
}

/// Why a record was not taken in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No authorship at all (an old node, or stripped by a relay).
    #[error("not signed")]
    Unsigned,
    /// Signed, but its author is not in `[tree] writers`.
    #[error("its author is not a writer")]
    NotAWriter,
    /// `modified_by` names another device than the signature's author.
    #[error("attributed to device {modified_by:016x}, signed by another")]
    Misattributed { modified_by: u64 },
    /// The certificate sent with it is not the author's (its SHA-256 differs).
    #[error("the certificate sent with it is not the author's")]
    CertMismatch,
    /// The author's certificate holds no usable key.
    #[error("the author's certificate is unusable: {0}")]
    BadCert(String),
    /// The signature does not match the record (forged, altered or replayed).
    #[error("the signature does not match the record")]
    BadSignature,
    /// A live record for a path this node does not hold, last vouched for by its
    /// author longer ago than the replay horizon: possibly a deleted file's record
    /// replayed after its tombstone was collected (issue 25 item 9).
    #[error("signed {age_s}s ago, beyond the replay horizon, for a path this node does not hold")]
    Stale { age_s: i64 },
    /// Attested (in its own name) by a device that is not in `[tree] writers`.
    #[error("attested by device {0:?}, which is not a writer")]
    AttesterNotAWriter(DeviceId),
}

impl Refusal {
    /// The record claims an authorship it does not have: a signature or certificate
    /// that does not match, or a `modified_by` another than its signer. No honest
    /// relay sends one (records travel unchanged), unlike an unsigned record (an old
    /// node) or an author outside `writers` (a config that differs between nodes).
    pub fn is_forged(&self) -> bool {
        !matches!(
            self,
            Refusal::Unsigned
                | Refusal::NotAWriter
                | Refusal::Stale { .. }
                | Refusal::AttesterNotAWriter(_)
        )
    }
}

/// The public keys to verify a record with ([`Writers::key_for`], [`verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The author's.
    pub author: Vec<u8>,
    /// With an attestation by another device: its key, and whether `writers` allows it.
    pub attester: Option<(Vec<u8>, bool)>,
}

/// Most public keys kept of devices `writers` does not allow (attesters refused).
const MAX_OTHER_KEYS: usize = 64;

/// The `[tree] writers` policy and the public keys of writers seen so far.
#[derive(Debug, Default, Clone)]
pub struct Writers {
    /// `None`: everyone may write (nothing is checked).
    allowed: Option<HashSet<DeviceId>>,
    /// Public keys of allowed writers, from certificates checked against their ID.
    keys: HashMap<DeviceId, Vec<u8>>,
}

impl Writers {
    /// No `writers` configured: every node may write.
    pub fn everyone() -> Self {
        Writers::default()
    }

    /// Only these devices may write.
    pub fn only(ids: impl IntoIterator<Item = DeviceId>) -> Self {
        Writers {
            allowed: Some(ids.into_iter().collect()),
            keys: HashMap::new(),
        }
    }

    /// True when `writers` is configured (records are checked).
    pub fn is_restricted(&self) -> bool {
        self.allowed.is_some()
    }

    /// Whether `id` may change the tree.
    pub fn allows(&self, id: &DeviceId) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(id))
    }

    /// Checks a record received from a peer: its author may write and signed exactly
    /// this record, and its attestation is by the author or another writer. Always
    /// `Ok` when everyone may write.
    pub fn check(&mut self, r: &FileRecord) -> Result<(), Refusal> {
        match self.key_for(r)? {
            Some(keys) => verify(&keys, r),
            None => Ok(()),
        }
    }

    /// The cheap half of [`Writers::check`]: the policy, and the
    /// public keys to verify `r` with (`None`: nothing to verify, everyone may write).
    /// The costly half, [`verify`], needs no access to the policy, so callers run it
    /// with no lock held. An attester outside `writers` gets its key too (its
    /// signature decides whether the refusal counts as forged).
    pub fn key_for(&mut self, r: &FileRecord) -> Result<Option<Keys>, Refusal> {
        let Some(allowed) = &self.allowed else {
            return Ok(None);
        };
        let a = r.auth.as_ref().ok_or(Refusal::Unsigned)?;
        if a.author.short() != r.modified_by {
            return Err(Refusal::Misattributed {
                modified_by: r.modified_by.0,
            });
        }
        if !allowed.contains(&a.author) {
            return Err(Refusal::NotAWriter);
        }
        let author = self.key_of(&a.author, &a.cert, true)?;
        let attester = match a.attestation.as_ref().and_then(|t| t.by.as_ref()) {
            Some(b) => {
                let allowed = self.allows(&b.id);
                Some((self.key_of(&b.id, &b.cert, allowed)?, allowed))
            }
            None => None,
        };
        Ok(Some(Keys { author, attester }))
    }

    /// The public key of `id` from `cert`, which must be its certificate; kept for
    /// writers (and a few others).
    fn key_of(&mut self, id: &DeviceId, cert: &[u8], writer: bool) -> Result<Vec<u8>, Refusal> {
        if let Some(k) = self.keys.get(id) {
            return Ok(k.clone());
        }
        if DeviceId::of_cert(cert) != *id {
            return Err(Refusal::CertMismatch);
        }
        let k = device::cert_public_key(cert).map_err(Refusal::BadCert)?;
        let others = self.keys.keys().filter(|d| !self.allows(d)).count();
        if writer || others < MAX_OTHER_KEYS {
            self.keys.insert(*id, k.clone());
        }
        Ok(k)
    }
}

/// Whether `r`'s signatures verify with `keys` from [`Writers::key_for`] (the ECDSA
/// arithmetic, no state): the v1 signature and, when present, the attestation (both,
/// so nothing this node relays is refused as forged by a node of either version).
/// An attestation by another device than the author verifies with its key, and is
/// then refused if that device is not a writer ([`Refusal::AttesterNotAWriter`]).
pub fn verify(keys: &Keys, r: &FileRecord) -> Result<(), Refusal> {
    let a = r.auth.as_ref().ok_or(Refusal::Unsigned)?;
    if !device::verify_p256(&keys.author, &signed_message(r, &a.author), &a.signature) {
        return Err(Refusal::BadSignature);
    }
    let Some(t) = &a.attestation else {
        return Ok(());
    };
    let (key, message, writer) = match (&t.by, &keys.attester) {
        (None, _) => (
            &keys.author,
            attested_message(r, &a.author, t.signed_ns),
            true,
        ),
        (Some(b), Some((key, writer))) => (
            key,
            attested_message_by(r, &a.author, &b.id, t.signed_ns),
            *writer,
        ),
        (Some(_), None) => return Err(Refusal::BadSignature),
    };
    if !device::verify_p256(key, &message, &t.signature) {
        return Err(Refusal::BadSignature);
    }
    match &t.by {
        Some(b) if !writer => Err(Refusal::AttesterNotAWriter(b.id)),
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::device::ShortId;
    use crate::core::paths::RelPath;
    use crate::core::record::ContentHash;
    use crate::core::version::VersionVector;

    pub fn signer() -> NodeSigner {
        crate::core::device::tests::signer()
    }

    fn record(by: &NodeSigner, counter: u64) -> FileRecord {
        FileRecord {
            path: RelPath::parse("live/www/privkey.pem").unwrap(),
            kind: Kind::File,
            size: 3,
            mode: 0o600,
            mtime_ns: 5,
            hash: ContentHash([1; 32]),
            target: String::new(),
            version: VersionVector::from_pairs(vec![(by.id().short(), counter)]),
            deleted: false,
            modified_by: by.id().short(),
            auth: None,
        }
    }

    #[test]
    fn everyone_may_write_without_writers() {
        let w = signer();
        let mut policy = Writers::everyone();
        assert!(policy.check(&record(&w, 1)).is_ok());
        assert!(policy.allows(&w.id()) && !policy.is_restricted());
    }

    #[test]
    fn a_writer_signed_record_is_taken_and_any_change_to_it_is_not() {
        let w = signer();
        let mut policy = Writers::only([w.id()]);
        let mut r = record(&w, 1);
        assert_eq!(policy.check(&r), Err(Refusal::Unsigned));
        assert!(sign(&mut r, &w, 1));
        assert_eq!(policy.check(&r), Ok(()));
        // A replay of the record as newer: the version is signed.
        let mut newer = r.clone();
        newer.version = VersionVector::from_pairs(vec![(w.id().short(), 2)]);
        assert_eq!(policy.check(&newer), Err(Refusal::BadSignature));
        // Every field counts.
        let changes: Vec<fn(&mut FileRecord)> = vec![
            |r| r.hash = ContentHash([2; 32]),
            |r| r.mode = 0o644,
            |r| r.deleted = true,
            |r| r.size = 4,
            |r| r.mtime_ns = 6,
            |r| r.kind = Kind::Directory,
            |r| r.target = "x".into(),
            |r| r.path = RelPath::parse("live/www/cert.pem").unwrap(),
        ];
        for change in changes {
            let mut forged = r.clone();
            change(&mut forged);
            assert_eq!(policy.check(&forged), Err(Refusal::BadSignature));
        }
    }

    #[test]
    fn forged_and_reattributed_records_are_refused() {
        let w = signer();
        let relay = signer();
        let mut policy = Writers::only([w.id()]);
        // The relay signs a record in its own name: not a writer.
        let mut own = record(&relay, 1);
        assert!(sign(&mut own, &relay, 1));
        assert_eq!(policy.check(&own), Err(Refusal::NotAWriter));
        // The relay claims the writer's authorship with its own signature and cert.
        let mut forged = record(&w, 1);
        let auth = own.auth.clone().unwrap();
        forged.auth = Some(Authorship {
            author: w.id(),
            ..auth.clone()
        });
        assert_eq!(policy.check(&forged), Err(Refusal::CertMismatch));
        // …or with the writer's certificate (which every record of it carries).
        let mut genuine = record(&w, 1);
        sign(&mut genuine, &w, 1);
        forged.auth = Some(Authorship {
            author: w.id(),
            signature: auth.signature,
            cert: genuine.auth.as_ref().unwrap().cert.clone(),
            attestation: None,
        });
        assert_eq!(policy.check(&forged), Err(Refusal::BadSignature));
        // A writer's signature moved to a record attributed to someone else.
        let mut moved = genuine.clone();
        moved.modified_by = ShortId(42);
        assert!(matches!(
            policy.check(&moved),
            Err(Refusal::Misattributed { .. })
        ));
        // Once the writer's key is known, a record with a bogus certificate but a
        // valid signature still verifies (the key, not the cert, decides).
        assert_eq!(policy.check(&genuine), Ok(()));
    }

    const DAY: i64 = 24 * 3600 * 1_000_000_000;

    fn attestation_mut(r: &mut FileRecord) -> &mut Attestation {
        r.auth
            .as_mut()
            .and_then(|a| a.attestation.as_mut())
            .expect("an attested record")
    }

    #[test]
    fn an_attestation_is_checked_and_dates_the_record() {
        let w = signer();
        let mut policy = Writers::only([w.id()]);
        let mut r = record(&w, 1);
        assert!(sign(&mut r, &w, 10 * DAY));
        assert_eq!(vouched_ns(&r), Some(10 * DAY));
        // Its time cannot be moved by a relay: the attestation covers it.
        let mut later = r.clone();
        attestation_mut(&mut later).signed_ns = 20 * DAY;
        assert_eq!(policy.check(&later), Err(Refusal::BadSignature));
        // Renewed: same v1 signature, a newer time that verifies.
        let mut renewed = r.clone();
        assert!(reattest(&mut renewed, &w, 20 * DAY));
        assert_eq!(policy.check(&renewed), Ok(()));
        assert!(renews(&r, &renewed) && !renews(&renewed, &r));
        assert_eq!(
            r.auth.as_ref().unwrap().signature,
            renewed.auth.as_ref().unwrap().signature
        );
        // Stripped (an old node relayed it): dated by its author's signed counter.
        let mut v1 = r.clone();
        v1.auth.as_mut().unwrap().attestation = None;
        assert_eq!(policy.check(&v1), Ok(()));
        assert_eq!(
            vouched_ns(&v1),
            Some(1000),
            "counter 1 (µs) is later than mtime 5 ns"
        );
    }

    #[test]
    fn only_live_records_vouched_for_beyond_the_horizon_are_stale() {
        let w = signer();
        let mut r = record(&w, 1);
        assert!(sign(&mut r, &w, 10 * DAY));
        assert_eq!(stale(&r, 16 * DAY, 7 * DAY), None);
        let refusal = stale(&r, 18 * DAY, 7 * DAY).unwrap();
        assert_eq!(refusal, Refusal::Stale { age_s: 8 * 86_400 });
        assert!(!refusal.is_forged());
        // A tombstone brings nothing back: never stale.
        let mut gone = r.clone();
        gone.deleted = true;
        assert_eq!(stale(&gone, 18 * DAY, 7 * DAY), None);
    }

    #[test]
    fn another_writer_attests_a_record_in_its_own_name_and_nothing_else_changes() {
        let w = signer();
        let b = signer();
        let mut policy = Writers::only([w.id(), b.id()]);
        let mut r = record(&w, 1);
        assert!(sign(&mut r, &w, DAY));
        let mut kept = r.clone();
        assert!(reattest(&mut kept, &b, 9 * DAY));
        assert_eq!(policy.check(&kept), Ok(()));
        assert_eq!(vouched_ns(&kept), Some(9 * DAY));
        assert!(renews(&r, &kept));
        let (a, k) = (r.auth.as_ref().unwrap(), kept.auth.as_ref().unwrap());
        assert_eq!((a.author, &a.signature), (k.author, &k.signature));
        let t = k.attestation.as_ref().unwrap();
        assert_eq!(t.by.as_ref().map(|x| x.id), Some(b.id()));
        // Passed off as the author's own attestation, or moved in time: refused.
        let mut as_author = kept.clone();
        attestation_mut(&mut as_author).by = None;
        assert_eq!(policy.check(&as_author), Err(Refusal::BadSignature));
        let mut later = kept.clone();
        attestation_mut(&mut later).signed_ns = 20 * DAY;
        assert_eq!(policy.check(&later), Err(Refusal::BadSignature));
    }

    #[test]
    fn a_readers_attestation_is_refused_and_forged_only_when_its_signature_is_bad() {
        let w = signer();
        let reader = signer();
        let mut policy = Writers::only([w.id()]);
        let mut r = record(&w, 1);
        assert!(sign(&mut r, &w, DAY));
        let mut kept = r.clone();
        assert!(reattest(&mut kept, &reader, 9 * DAY));
        let refusal = policy.check(&kept).unwrap_err();
        assert_eq!(refusal, Refusal::AttesterNotAWriter(reader.id()));
        assert!(!refusal.is_forged());
        assert!(refusal.to_string().contains("not a writer"), "{refusal}");
        // Its signature over another time: forged.
        let mut bad = kept.clone();
        let t = bad.auth.as_mut().unwrap().attestation.as_mut().unwrap();
        t.signed_ns += 1;
        assert!(policy.check(&bad).unwrap_err().is_forged());
        // Claiming a writer's name with the reader's certificate: forged.
        let mut claimed = kept.clone();
        let t = claimed.auth.as_mut().unwrap().attestation.as_mut().unwrap();
        t.by.as_mut().unwrap().id = w.id();
        assert!(policy.check(&claimed).unwrap_err().is_forged());
    }

    #[test]
    fn signing_a_record_of_someone_else_does_nothing() {
        let w = signer();
        let other = signer();
        let mut r = record(&w, 1);
        assert!(!sign(&mut r, &other, 1));
        assert!(r.auth.is_none());
    }
}
