//! Node identity: the device key + self-signed certificate in `state_dir`, and the
//! device ID derived from it (base32 of the certificate's SHA-256, with one Luhn
//! check character per 13-character group, Syncthing-style).

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const KEY_FILE: &str = "node-key.pem";
const CERT_FILE: &str = "node-cert.pem";

/// Errors reading, creating or parsing an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The state directory or a file in it could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// No identity exists yet in the state directory.
    #[error("no identity in {0} (run `certmesh init --state-dir {0}`)")]
    Missing(PathBuf),
    /// A PEM file in the state directory is not what it should be.
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// Key generation failed.
    #[error("generating the node key: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Errors parsing a textual device ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// Wrong number of characters after removing dashes and spaces.
    #[error("a device ID has 56 characters (without dashes), this one has {0}")]
    Length(usize),
    /// A character outside base32.
    #[error("character {0:?} is not valid in a device ID")]
    Character(char),
    /// A check character does not match: the ID was mistyped.
    #[error("check character of group {0} does not match: the device ID is mistyped")]
    Check(usize),
}

/// A device ID: SHA-256 of the node certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub [u8; 32]);

/// The first 8 bytes of a device ID: how version vectors name devices.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct ShortId(pub u64);

impl DeviceId {
    /// The device ID of a DER certificate.
    pub fn of_cert(der: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        DeviceId(id)
    }

    /// The short form used in version vectors.
    pub fn short(&self) -> ShortId {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        ShortId(u64::from_be_bytes(b))
    }
}

fn luhn32(group: &[u8]) -> u8 {
    let mut factor = 1;
    let mut sum = 0usize;
    for &c in group {
        let cp = ALPHABET.iter().position(|&a| a == c).unwrap_or(0);
        let addend = factor * cp;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    ALPHABET[(32 - sum % 32) % 32]
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b32 = data_encoding::BASE32_NOPAD.encode(&self.0);
        let mut with_check = Vec::with_capacity(56);
        for group in b32.as_bytes().chunks(13) {
            with_check.extend_from_slice(group);
            with_check.push(luhn32(group));
        }
        let parts: Vec<&str> = with_check
            .chunks(7)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect();
        f.write_str(&parts.join("-"))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.to_string();
        f.write_str(&s[..7])
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars: Vec<u8> = s
            .bytes()
            .filter(|c| *c != b'-' && *c != b' ')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if chars.len() != 56 {
            return Err(DeviceIdError::Length(chars.len()));
        }
        if let Some(&bad) = chars.iter().find(|c| !ALPHABET.contains(c)) {
            return Err(DeviceIdError::Character(bad as char));
        }
        let mut b32 = Vec::with_capacity(52);
        for (i, group) in chars.chunks(14).enumerate() {
            if luhn32(&group[..13]) != group[13] {
                return Err(DeviceIdError::Check(i + 1));
            }
            b32.extend_from_slice(&group[..13]);
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(&b32)
            .map_err(|_| DeviceIdError::Length(chars.len()))?;
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[..32]);
        Ok(DeviceId(id))
    }
}

/// This node's key and certificate.
pub struct Identity {
    pub id: DeviceId,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// The private key for rustls.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Loads the identity from `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Self, IdentityError> {
        let key_path = state_dir.join(KEY_FILE);
        let cert_path = state_dir.join(CERT_FILE);
        if !key_path.exists() && !cert_path.exists() {
            return Err(IdentityError::Missing(state_dir.to_path_buf()));
        }
        let io = |path: &Path| {
            let p = path.to_path_buf();
            move |source| IdentityError::Io { path: p, source }
        };
        let key_pem = fs::read(&key_path).map_err(io(&key_path))?;
        let cert_pem = fs::read(&cert_path).map_err(io(&cert_path))?;
        let corrupt = |path: &Path, reason: &str| IdentityError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let key = pem_block(&key_pem, "PRIVATE KEY")
            .ok_or_else(|| corrupt(&key_path, "no PRIVATE KEY block"))?;
        let cert = pem_block(&cert_pem, "CERTIFICATE")
            .ok_or_else(|| corrupt(&cert_path, "no CERTIFICATE block"))?;
        // The key must be the certificate's key: check by parsing both.
        let kp = rcgen::KeyPair::try_from(key.as_slice())
            .map_err(|e| corrupt(&key_path, &format!("not a usable key: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| corrupt(&cert_path, &format!("not a certificate: {e}")))?;
        if *parsed.public_key().subject_public_key.data != *kp.public_key_raw() {
            return Err(corrupt(
                &cert_path,
                "certificate does not belong to node-key.pem",
            ));
        }
        Ok(Identity {
            id: DeviceId::of_cert(&cert),
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
        })
    }

    /// Creates the identity in `state_dir` unless one exists; returns it either way.
    pub fn init(state_dir: &Path) -> Result<Self, IdentityError> {
        match Self::load(state_dir) {
            Err(IdentityError::Missing(_)) => {}
            other => return other,
        }
        let io = |source| IdentityError::Io {
            path: state_dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(io)?;
        fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec!["certmesh".to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "certmesh");
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let cert = params.self_signed(&kp)?;
        write_private(&state_dir.join(KEY_FILE), kp.serialize_pem().as_bytes())?;
        write_private(&state_dir.join(CERT_FILE), cert.pem().as_bytes())?;
        Self::load(state_dir)
    }
}

/// Signs with this node's key (ECDSA P-256 with SHA-256, ASN.1 DER signatures, the
/// algorithm of the node certificate): how a node signs the records it authors.
/// The certificate travels with each signature so any node can check it
/// against the author's device ID.
pub struct NodeSigner {
    id: DeviceId,
    cert: std::sync::Arc<[u8]>,
    key: aws_lc_rs::signature::EcdsaKeyPair,
    rng: aws_lc_rs::rand::SystemRandom,
}

impl fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeSigner({:?})", self.id)
    }
}

impl NodeSigner {
    /// A signer for this identity's key; refused unless it is an ECDSA P-256 key.
    pub fn new(identity: &Identity) -> Result<Self, IdentityError> {
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            identity.key.secret_pkcs8_der(),
        )
        .map_err(|e| IdentityError::Corrupt {
            path: PathBuf::from(KEY_FILE),
            reason: format!("not an ECDSA P-256 key, cannot sign records: {e}"),
        })?;
        Ok(NodeSigner {
            id: identity.id,
            cert: identity.cert.as_ref().into(),
            key,
            rng: aws_lc_rs::rand::SystemRandom::new(),
        })
    }

    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The node certificate (DER); its SHA-256 is [`Self::id`].
    pub fn cert(&self) -> &std::sync::Arc<[u8]> {
        &self.cert
    }

    /// Signs `msg`; `None` only if the system's random source fails.
    pub fn sign(&self, msg: &[u8]) -> Option<Vec<u8>> {
        self.key
            .sign(&self.rng, msg)
            .ok()
            .map(|s| s.as_ref().to_vec())
    }
}

/// The public key (uncompressed EC point) of a DER certificate, if it is an ECDSA
/// P-256 key (the only kind `init` makes).
pub fn cert_public_key(der: &[u8]) -> Result<Vec<u8>, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let spki = cert.public_key();
    let ec = spki.algorithm.algorithm.to_id_string() == "1.2.840.10045.2.1";
    let p256 = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|o| o.to_id_string() == "1.2.840.10045.3.1.7");
    if !(ec && p256) {
        return Err("not an ECDSA P-256 key".into());
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// True when `signature` (ASN.1 DER) is a valid ECDSA P-256 / SHA-256 signature of
/// `msg` by `public_key` (uncompressed point).
pub fn verify_p256(public_key: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        public_key,
    )
    .verify(msg, signature)
    .is_ok()
}

/// Writes a 0600 file atomically and durably.
fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    crate::disk::atomic::replace(path, data, 0o600).map_err(|source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The DER bytes of the first PEM block with this label.
fn pem_block(pem: &[u8], label: &str) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop].split_whitespace().collect();
    data_encoding::BASE64.decode(b64.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_round_trips_and_detects_typos() {
        let id = DeviceId::of_cert(b"some certificate");
        let s = id.to_string();
        assert_eq!(s.len(), 63);
        assert_eq!(s.parse::<DeviceId>(), Ok(id));
        assert_eq!(s.to_lowercase().parse::<DeviceId>(), Ok(id));
        // Change one character in the first group: the check character catches it.
        let mut typo = s.clone().into_bytes();
        typo[2] = if typo[2] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        assert_eq!(typo.parse::<DeviceId>(), Err(DeviceIdError::Check(1)));
        assert_eq!("ABC".parse::<DeviceId>(), Err(DeviceIdError::Length(3)));
        let bad = s.replacen(&s[..1], "1", 1);
        assert_eq!(bad.parse::<DeviceId>(), Err(DeviceIdError::Character('1')));
    }

    #[test]
    fn init_is_idempotent_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = Identity::init(&state).unwrap();
        let b = Identity::init(&state).unwrap();
        assert_eq!(a.id, b.id);
        let mode = fs::metadata(state.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Identity::load(&state).unwrap().id, a.id);
    }

    #[test]
    fn signatures_verify_only_for_the_signed_message_and_key() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ia, ib) = (
            Identity::init(a.path()).unwrap(),
            Identity::init(b.path()).unwrap(),
        );
        let signer = NodeSigner::new(&ia).unwrap();
        assert_eq!(DeviceId::of_cert(signer.cert()), ia.id);
        let sig = signer.sign(b"record").unwrap();
        let key_a = cert_public_key(&ia.cert).unwrap();
        let key_b = cert_public_key(&ib.cert).unwrap();
        assert!(verify_p256(&key_a, b"record", &sig));
        assert!(!verify_p256(&key_a, b"recorD", &sig));
        assert!(!verify_p256(&key_b, b"record", &sig));
        assert!(!verify_p256(&key_a, b"record", &sig[..sig.len() - 1]));
        assert!(cert_public_key(b"garbage").is_err());
    }

    #[test]
    fn corrupt_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        Identity::init(dir.path()).unwrap();
        fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        let err = Identity::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("node-key.pem"), "{err}");
    }
}
