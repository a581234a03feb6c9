//! One path's replicated record: what it is ([`Kind`]), its content hash, its version
//! and who made that version ([`Authorship`]). Values only: the index holds them,
//! [`crate::core::authorship`] signs and checks them, the codec carries them.

use std::fmt;
use std::sync::Arc;

use crate::core::device::{DeviceId, ShortId};
use crate::core::paths::RelPath;
use crate::core::version::VersionVector;

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Directory,
    Symlink,
}

/// BLAKE3 of a file's content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ContentHash(pub [u8; 32]);

impl std::fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The replicated state of one path. Records with equal versions are identical on
/// every node (except `mode`, which local policy may tighten on apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: RelPath,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub mtime_ns: i64,
    pub hash: ContentHash,
    pub target: String,
    pub version: VersionVector,
    pub deleted: bool,
    pub modified_by: ShortId,
    /// The author's signature, forwarded unchanged by relays; `None` for
    /// records of nodes that do not sign (older versions, the simulator).
    pub auth: Option<Authorship>,
}

/// The fixed part of [`FileRecord::heap_cost`]: the record and its sequence (~150
/// bytes), a map slot and the path's allocation headers.
pub const RECORD_OVERHEAD: usize = 256;

impl FileRecord {
    /// Estimated heap bytes this record holds in a map keyed by its path: the path
    /// twice (key and record), the link target, 16 bytes per version entry, and
    /// [`RECORD_OVERHEAD`].
    pub fn heap_cost(&self) -> usize {
        RECORD_OVERHEAD
            + 2 * self.path.as_str().len()
            + self.target.len()
            + 16 * self.version.pairs().len()
            + self.auth.as_ref().map_or(0, |a| a.heap_cost())
    }

    /// Same bytes on disk (kind, content, link target, deletion), ignoring metadata.
    pub fn same_content(&self, other: &FileRecord) -> bool {
        self.deleted == other.deleted
            && (self.deleted
                || (self.kind == other.kind
                    && self.hash == other.hash
                    && self.target == other.target))
    }

    /// The deterministic conflict rule: of two concurrent records, the later mtime
    /// wins, ties go to the higher device, then to content and metadata so the order
    /// is total (two different records never tie).
    pub fn wins_over(&self, other: &FileRecord) -> bool {
        let key = |r: &FileRecord| {
            (
                r.mtime_ns,
                r.modified_by,
                r.deleted,
                r.hash,
                r.mode,
                r.kind as u8,
                r.target.clone(),
            )
        };
        key(self) > key(other)
    }
}

/// Longest signature accepted (an ECDSA P-256 DER signature has at most 72 bytes).
pub const MAX_SIGNATURE: usize = 80;

/// A signature of 1 to [`MAX_SIGNATURE`] bytes, held inline: every index entry holds
/// two, and on the heap each cost 104 bytes and an allocation per copy (issue 29: RSS
/// at 90,000 entries).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    /// Never 0: the niche lets `Option<Attestation>` and `Option<Authorship>` take no
    /// extra word.
    len: std::num::NonZeroU8,
    bytes: [u8; MAX_SIGNATURE],
}

impl Signature {
    /// `None` when `b` is empty or longer than [`MAX_SIGNATURE`].
    pub fn from_slice(b: &[u8]) -> Option<Signature> {
        if b.len() > MAX_SIGNATURE {
            return None;
        }
        let len = std::num::NonZeroU8::new(u8::try_from(b.len()).ok()?)?;
        let mut bytes = [0; MAX_SIGNATURE];
        bytes[..b.len()].copy_from_slice(b);
        Some(Signature { len, bytes })
    }
}

impl std::ops::Deref for Signature {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len.get())]
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signature of {} bytes", self.len)
    }
}

/// Who made a record's version, and the proof.
#[derive(Clone, PartialEq, Eq)]
pub struct Authorship {
    /// The author's full device ID.
    pub author: DeviceId,
    /// ECDSA P-256 / SHA-256 (DER) over [`crate::core::authorship::signed_message`].
    pub signature: Signature,
    /// The author's node certificate (DER); shared between records of one author.
    pub cert: Arc<[u8]>,
    /// The author's dated signature (`None`: from a node that predates them).
    pub attestation: Option<Attestation>,
}

/// A dated signature over the record: the author's over
/// [`crate::core::authorship::attested_message`], or another writer's over
/// [`crate::core::authorship::attested_message_by`] (`by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The signer's clock when it signed (ns since the epoch).
    pub signed_ns: i64,
    /// ECDSA P-256 / SHA-256 (DER) over the message above.
    pub signature: Signature,
    /// The signer when not the author (`None`: the author); boxed, as most
    /// attestations are the author's own.
    pub by: Option<Box<Attester>>,
}

/// A writer that attested someone else's record.
#[derive(Clone, PartialEq, Eq)]
pub struct Attester {
    /// Its full device ID.
    pub id: DeviceId,
    /// Its node certificate (DER); SHA-256 of it == `id`.
    pub cert: Arc<[u8]>,
}

impl fmt::Debug for Attester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "attested by {:?}", self.id)
    }
}

impl fmt::Debug for Authorship {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signed by {:?}", self.author)
    }
}

impl Authorship {
    /// Estimated heap bytes (the certificate is shared, counted once per record
    /// anyway: a bound, not an exact figure).
    pub fn heap_cost(&self) -> usize {
        32 + self.signature.len()
            + self.cert.len()
            + self.attestation.as_ref().map_or(0, |a| {
                16 + a.signature.len() + a.by.as_ref().map_or(0, |b| 32 + b.cert.len())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_one_to_max_signature_bytes_and_reads_back_as_given() {
        assert!(Signature::from_slice(&[]).is_none());
        assert!(Signature::from_slice(&[1; MAX_SIGNATURE + 1]).is_none());
        let der: Vec<u8> = (0..71).collect();
        let s = Signature::from_slice(&der).unwrap();
        assert_eq!(&*s, der.as_slice());
        assert_eq!(
            &*Signature::from_slice(&[9; MAX_SIGNATURE]).unwrap(),
            &[9; MAX_SIGNATURE]
        );
        assert_ne!(s, Signature::from_slice(&der[..70]).unwrap());
    }

    #[test]
    fn optional_signatures_take_no_extra_word() {
        use std::mem::size_of;
        assert_eq!(size_of::<Option<Attestation>>(), size_of::<Attestation>());
        assert_eq!(size_of::<Option<Authorship>>(), size_of::<Authorship>());
    }
}
