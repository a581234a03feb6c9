//! The record codec: prost types generated from `proto/certmesh.proto`, and a record's
//! conversion to and from them, validating everything a peer (or a damaged index
//! file) could put in one. Pure: the receiver's clock comes in as an argument. Both the
//! index store (`crate::disk::store`) and the wire (`crate::net::wire`) use it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::authorship::MAX_AUTHOR_CERT;
use crate::core::device::{DeviceId, ShortId};
use crate::core::paths::{PathError, RelPath};
use crate::core::record::{
    Attestation, Attester, Authorship, ContentHash, FileRecord, Kind, Signature,
};
use crate::core::version::VersionVector;

/// Generated protobuf types.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/certmesh.v1.rs"));
}

/// Largest version vector accepted. A vector has one entry per device that ever
/// wrote the path; a fleet's certificate tree is written by its few ACME nodes and
/// the operators' edits, so even a 1000-node fleet where every node once touched a
/// path fits. Bounded so that a record at every limit still fits the store's
/// `MAX_ENTRY` (see `store::tests`).
pub const MAX_VERSION_ENTRIES: usize = 1024;
/// How far (µs) a version counter may be ahead of the receiver's clock. Counters are
/// floored at the writer's clock in µs, so nodes' clocks must agree within this
/// (1 day); a counter beyond it is hostile (a counter near `u64::MAX` would freeze
/// the path: it can never be bumped past).
pub const MAX_CLOCK_AHEAD_US: u64 = 86_400 * 1_000_000;
/// Largest sequence number a peer may announce or acknowledge: 2^62, which one
/// change per nanosecond takes 146 years to reach, so `+ 1` never wraps.
pub const MAX_SEQUENCE: u64 = 1 << 62;

/// A peer sent something it must not.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A length prefix above the limit.
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// Bytes that are not a valid protobuf message.
    #[error("undecodable message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A message that decodes but breaks a rule.
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    /// A path that would leave the tree or is not allowed.
    #[error("refused path: {0}")]
    Path(#[from] PathError),
    /// The stream failed or ended early.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// A frame was started but not completed in time.
    #[error("frame of {len} bytes not completed within {within:?} ({got} bytes arrived)")]
    Stalled {
        len: usize,
        got: usize,
        within: Duration,
    },
}

pub fn invalid(what: &'static str, why: impl Into<String>) -> WireError {
    WireError::Invalid {
        what,
        why: why.into(),
    }
}

/// Converts a local record for sending.
pub fn record_to_wire(r: &FileRecord, sequence: u64) -> pb::FileInfo {
    let attestation = r.auth.as_ref().and_then(|a| a.attestation.as_ref());
    // The author's attestation in 16/17, another writer's in 18-21 (never both).
    let (own, by) = match attestation {
        Some(t) if t.by.is_some() => (None, Some(t)),
        t => (t, None),
    };
    let attester = by.and_then(|t| t.by.as_ref());
    pb::FileInfo {
        path: r.path.as_str().to_string(),
        kind: match r.kind {
            Kind::File => pb::Kind::File,
            Kind::Directory => pb::Kind::Directory,
            Kind::Symlink => pb::Kind::Symlink,
        } as i32,
        size: r.size,
        mode: r.mode,
        mtime_ns: r.mtime_ns,
        hash: if r.kind == Kind::File && !r.deleted {
            r.hash.0.to_vec()
        } else {
            Vec::new()
        },
        version: version_to_wire(&r.version),
        deleted: r.deleted,
        sequence,
        symlink_target: r.target.clone(),
        modified_by: r.modified_by.0,
        data: Vec::new(),
        author: r.auth.as_ref().map_or(Vec::new(), |a| a.author.0.to_vec()),
        signature: r.auth.as_ref().map_or(Vec::new(), |a| a.signature.to_vec()),
        author_cert: r.auth.as_ref().map_or(Vec::new(), |a| a.cert.to_vec()),
        signed_ns: own.map_or(0, |t| t.signed_ns),
        attestation: own.map_or(Vec::new(), |t| t.signature.to_vec()),
        attested_by_ns: by.map_or(0, |t| t.signed_ns),
        attested_by_signature: by.map_or(Vec::new(), |t| t.signature.to_vec()),
        attested_by: attester.map_or(Vec::new(), |b| b.id.0.to_vec()),
        attested_by_cert: attester.map_or(Vec::new(), |b| b.cert.to_vec()),
    }
}

/// Validates a received record: path, hash, symlink target, version (no counter
/// beyond `now_us + MAX_CLOCK_AHEAD_US`), sequence (at most `MAX_SEQUENCE`), mode.
/// `now_us` is the receiver's clock ([`crate::clock::now_us`]); passed in to keep this pure.
pub fn record_from_wire(f: pb::FileInfo, now_us: u64) -> Result<(FileRecord, u64), WireError> {
    let path = RelPath::parse_shared(&f.path)?;
    let limit = now_us.saturating_add(MAX_CLOCK_AHEAD_US);
    if let Some(c) = f.version.iter().find(|c| c.value > limit) {
        return Err(invalid(
            "record",
            format!(
                "{path}: counter {} of device {:016x} is more than {}s ahead of this node's clock",
                c.value,
                c.device,
                MAX_CLOCK_AHEAD_US / 1_000_000
            ),
        ));
    }
    if f.sequence > MAX_SEQUENCE {
        return Err(invalid(
            "record",
            format!("{path}: sequence {} beyond {MAX_SEQUENCE}", f.sequence),
        ));
    }
    let kind = match pb::Kind::try_from(f.kind) {
        Ok(pb::Kind::File) => Kind::File,
        Ok(pb::Kind::Directory) => Kind::Directory,
        Ok(pb::Kind::Symlink) => Kind::Symlink,
        Err(_) => {
            return Err(invalid(
                "record",
                format!("{path}: unknown kind {}", f.kind),
            ))
        }
    };
    if f.version.is_empty() || f.version.len() > MAX_VERSION_ENTRIES {
        return Err(invalid(
            "record",
            format!("{path}: {} version entries", f.version.len()),
        ));
    }
    let version = VersionVector::from_pairs(
        f.version
            .iter()
            .map(|c| (ShortId(c.device), c.value))
            .collect(),
    );
    if version.is_empty() {
        return Err(invalid("record", format!("{path}: all-zero version")));
    }
    let mut hash = ContentHash::default();
    if kind == Kind::File && !f.deleted {
        if f.hash.len() != 32 {
            return Err(invalid(
                "record",
                format!("{path}: hash of {} bytes", f.hash.len()),
            ));
        }
        hash.0.copy_from_slice(&f.hash);
    } else if !f.hash.is_empty() {
        return Err(invalid("record", format!("{path}: hash on a non-file")));
    }
    if kind == Kind::Symlink && !f.deleted {
        path.check_symlink_target(&f.symlink_target)?;
    } else if !f.symlink_target.is_empty() {
        return Err(invalid(
            "record",
            format!("{path}: link target on a non-symlink"),
        ));
    }
    if f.mode & !0o7777 != 0 {
        return Err(invalid("record", format!("{path}: mode {:o}", f.mode)));
    }
    let own = attestation_from_wire(&path, f.signed_ns, f.attestation, now_us)?;
    let by = attestation_from_wire(&path, f.attested_by_ns, f.attested_by_signature, now_us)?;
    let attester = attester_from_wire(&path, f.attested_by, f.attested_by_cert)?;
    let attestation = match (own, by, attester) {
        (own, None, None) => own,
        (None, Some(mut t), Some(b)) => {
            t.by = Some(Box::new(b));
            Some(t)
        }
        (Some(_), Some(_), _) => {
            return Err(invalid(
                "record",
                format!("{path}: two attestations (the author's and another's)"),
            ))
        }
        _ => {
            return Err(invalid(
                "record",
                format!(
                "{path}: an attestation by another device needs both its signature and its signer"
            ),
            ))
        }
    };
    let mut auth = authorship_from_wire(&path, f.author, f.signature, f.author_cert)?;
    match (&mut auth, attestation) {
        (Some(a), t) => a.attestation = t,
        (None, Some(_)) => {
            return Err(invalid(
                "record",
                format!("{path}: an attestation without an author"),
            ))
        }
        (None, None) => {}
    }
    Ok((
        FileRecord {
            path,
            kind,
            size: if kind == Kind::File { f.size } else { 0 },
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            hash,
            target: f.symlink_target,
            version,
            deleted: f.deleted,
            modified_by: ShortId(f.modified_by),
            auth,
        },
        f.sequence,
    ))
}

/// The authorship fields of a record: all three or none, within their sizes. Whether
/// the signature is good is the receiver's policy (`core::authorship::Writers`).
fn authorship_from_wire(
    path: &RelPath,
    author: Vec<u8>,
    signature: Vec<u8>,
    cert: Vec<u8>,
) -> Result<Option<Authorship>, WireError> {
    if author.is_empty() && signature.is_empty() && cert.is_empty() {
        return Ok(None);
    }
    let Ok(author) = <[u8; 32]>::try_from(author.as_slice()) else {
        return Err(invalid(
            "record",
            format!("{path}: author of {} bytes", author.len()),
        ));
    };
    let Some(signature) = Signature::from_slice(&signature) else {
        return Err(invalid(
            "record",
            format!("{path}: signature of {} bytes", signature.len()),
        ));
    };
    if cert.is_empty() || cert.len() > MAX_AUTHOR_CERT {
        return Err(invalid(
            "record",
            format!("{path}: author certificate of {} bytes", cert.len()),
        ));
    }
    Ok(Some(Authorship {
        author: DeviceId(author),
        signature,
        cert: shared_cert(cert),
        attestation: None,
    }))
}

/// The attestation fields of a record: both or none; its time not beyond
/// `now_us + MAX_CLOCK_AHEAD_US`, as for counters.
fn attestation_from_wire(
    path: &RelPath,
    signed_ns: i64,
    signature: Vec<u8>,
    now_us: u64,
) -> Result<Option<Attestation>, WireError> {
    if signed_ns == 0 && signature.is_empty() {
        return Ok(None);
    }
    let Some(signature) = Signature::from_slice(&signature) else {
        return Err(invalid(
            "record",
            format!("{path}: attestation signature of {} bytes", signature.len()),
        ));
    };
    let limit = now_us
        .saturating_add(MAX_CLOCK_AHEAD_US)
        .saturating_mul(1000);
    if signed_ns <= 0 || signed_ns as u64 > limit {
        return Err(invalid(
            "record",
            format!("{path}: attested at {signed_ns} ns, not a time this node's clock allows"),
        ));
    }
    Ok(Some(Attestation {
        signed_ns,
        signature,
        by: None,
    }))
}

/// The signer of an attestation by another device than the author: both fields or
/// none, within their sizes.
fn attester_from_wire(
    path: &RelPath,
    id: Vec<u8>,
    cert: Vec<u8>,
) -> Result<Option<Attester>, WireError> {
    if id.is_empty() && cert.is_empty() {
        return Ok(None);
    }
    let Ok(id) = <[u8; 32]>::try_from(id.as_slice()) else {
        return Err(invalid(
            "record",
            format!("{path}: attester of {} bytes", id.len()),
        ));
    };
    if cert.is_empty() || cert.len() > MAX_AUTHOR_CERT {
        return Err(invalid(
            "record",
            format!("{path}: attester certificate of {} bytes", cert.len()),
        ));
    }
    Ok(Some(Attester {
        id: DeviceId(id),
        cert: shared_cert(cert),
    }))
}

/// Distinct author and attester certificates kept to be shared ([`shared_cert`]).
const SHARED_CERTS: usize = 256;

/// `cert` as a copy shared with every record decoded with the same certificate:
/// every record carries its author's certificate (~450 bytes), and a fleet has a
/// few authors, so the index, each peer's view and an index file just loaded hold
/// one copy per author instead of one per record (90,000 of them at 10,000
/// certificates). Past [`SHARED_CERTS`] distinct ones (junk from a hostile peer)
/// the set starts again: sharing is lost, never correctness.
fn shared_cert(cert: Vec<u8>) -> Arc<[u8]> {
    static SEEN: Mutex<Option<HashSet<Arc<[u8]>>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if let Some(c) = seen.get(cert.as_slice()) {
        return c.clone();
    }
    if seen.len() >= SHARED_CERTS {
        seen.clear();
    }
    let c: Arc<[u8]> = cert.into();
    seen.insert(c.clone());
    c
}

/// A version vector as the wire carries it.
pub fn version_to_wire(v: &VersionVector) -> Vec<pb::Counter> {
    v.pairs()
        .iter()
        .map(|(d, v)| pb::Counter {
            device: d.0,
            value: *v,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(path: &str, cert: &[u8]) -> pb::FileInfo {
        let r = FileRecord {
            path: RelPath::parse(path).unwrap(),
            kind: Kind::File,
            size: 1,
            mode: 0o644,
            mtime_ns: 1,
            hash: ContentHash([7; 32]),
            target: String::new(),
            version: VersionVector::from_pairs(vec![(ShortId(9), 1)]),
            deleted: false,
            modified_by: ShortId(9),
            auth: Some(Authorship {
                author: DeviceId([7; 32]),
                signature: Signature::from_slice(&[1; 64]).unwrap(),
                cert: cert.into(),
                attestation: None,
            }),
        };
        record_to_wire(&r, 1)
    }

    #[test]
    fn records_decoded_with_one_author_share_its_certificate() {
        let cert = vec![0x30; 450];
        let decode = |path: &str, cert: &[u8]| {
            let (r, _) = record_from_wire(signed(path, cert), 1 << 60).unwrap();
            r.auth.unwrap().cert
        };
        let (a, b) = (decode("a", &cert), decode("b", &cert));
        assert!(Arc::ptr_eq(&a, &b), "one copy per author");
        let other = decode("c", &[0x31; 450]);
        assert!(!Arc::ptr_eq(&a, &other) && *other == [0x31; 450][..]);
        // Junk past the bound: the set starts again, the bytes stay right.
        for i in 0..SHARED_CERTS + 1 {
            let junk = decode("j", &(i as u32).to_be_bytes().repeat(100));
            assert_eq!(&junk[..4], &(i as u32).to_be_bytes());
        }
        assert_eq!(*decode("d", &cert), cert[..]);
    }
}
