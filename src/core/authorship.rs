//! Who may change the tree: each record carries its author's full device
//! ID, the author's signature over everything that makes the record (path, version
//! vector, kind, size, mode, mtime, content hash, link target, deletion, the
//! `modified_by` short id) and the author's node certificate. Relays forward all three
//! unchanged. A receiver with `[tree] writers` takes a record in only if its author is
//! listed and the signature verifies against the key of a certificate whose SHA-256
//! is that device ID (the same pinning as the TLS handshake), so no relay can forge,
//! re-attribute, or replay an older record as newer (the version vector is signed).
//!
//! Pure apart from the signature arithmetic (no I/O, no clock).

use std::collections::{HashMap, HashSet};

use crate::core::device::{self, DeviceId, NodeSigner};
use crate::core::record::{Authorship, FileRecord, Kind};

/// Longest signature accepted (an ECDSA P-256 DER signature has at most 72 bytes).
pub const MAX_SIGNATURE: usize = 80;
/// Largest author certificate accepted (a node certificate has ~400 bytes).
pub const MAX_AUTHOR_CERT: usize = 4096;

/// The bytes an author signs for `r`: a domain tag, then every field that decides what
/// the record does, length-prefixed, big-endian.
pub fn signed_message(r: &FileRecord, author: &DeviceId) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + r.path.as_str().len() + r.target.len());
    m.extend_from_slice(b"certmesh record v1\0");
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
    m
}

/// Signs `r` as its author (`r.modified_by` must be the signer's short id; a record
/// of someone else is left as it is). False if signing failed (no randomness).
pub fn sign(r: &mut FileRecord, signer: &NodeSigner) -> bool {
    let author = signer.id();
    if r.modified_by != author.short() {
        return false;
    }
    let Some(signature) = signer.sign(&signed_message(r, &author)) else {
        return false;
    };
    r.auth = Some(Authorship {
        author,
        signature,
        cert: signer.cert().clone(),
    });
    true
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
}

impl Refusal {
    /// The record claims an authorship it does not have: a signature or certificate
    /// that does not match, or a `modified_by` another than its signer. No honest
    /// relay sends one (records travel unchanged), unlike an unsigned record (an old
    /// node) or an author outside `writers` (a config that differs between nodes).
    pub fn is_forged(&self) -> bool {
        !matches!(self, Refusal::Unsigned | Refusal::NotAWriter)
    }
}

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
    /// this record. Always `Ok` when everyone may write.
    pub fn check(&mut self, r: &FileRecord) -> Result<(), Refusal> {
        match self.key_for(r)? {
            Some(key) => verify(&key, r),
            None => Ok(()),
        }
    }

    /// The cheap half of [`Writers::check`]: the policy, and the
    /// public key to verify `r` with (`None`: nothing to verify, everyone may write).
    /// The costly half, [`verify`], needs no access to the policy, so callers run it
    /// with no lock held.
    pub fn key_for(&mut self, r: &FileRecord) -> Result<Option<Vec<u8>>, Refusal> {
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
        let key = match self.keys.get(&a.author) {
            Some(k) => k,
            None => {
                if DeviceId::of_cert(&a.cert) != a.author {
                    return Err(Refusal::CertMismatch);
                }
                let k = device::cert_public_key(&a.cert).map_err(Refusal::BadCert)?;
                self.keys.entry(a.author).or_insert(k)
            }
        };
        Ok(Some(key.clone()))
    }
}

/// Whether `r`'s signature verifies with `key`, its author's public key from
/// [`Writers::key_for`] (the ECDSA arithmetic, no state).
pub fn verify(key: &[u8], r: &FileRecord) -> Result<(), Refusal> {
    let a = r.auth.as_ref().ok_or(Refusal::Unsigned)?;
    if device::verify_p256(key, &signed_message(r, &a.author), &a.signature) {
        Ok(())
    } else {
        Err(Refusal::BadSignature)
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
        assert!(sign(&mut r, &w));
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
        assert!(sign(&mut own, &relay));
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
        sign(&mut genuine, &w);
        forged.auth = Some(Authorship {
            author: w.id(),
            signature: auth.signature.clone(),
            cert: genuine.auth.as_ref().unwrap().cert.clone(),
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

    #[test]
    fn signing_a_record_of_someone_else_does_nothing() {
        let w = signer();
        let other = signer();
        let mut r = record(&w, 1);
        assert!(!sign(&mut r, &other));
        assert!(r.auth.is_none());
    }
}
