//! Device identity as values: the device ID (base32 of the node certificate's SHA-256,
//! with one Luhn check character per 13-character group, Syncthing-style), its short
//! form in version vectors, and signing and checking records with a node key held in
//! memory. Loading and creating the key files is `crate::identity`'s.

use std::fmt;
use std::str::FromStr;

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

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
    /// A signer for a node's key (PKCS#8 DER) and certificate (DER); refused unless
    /// it is an ECDSA P-256 key.
    pub fn new(id: DeviceId, cert: &[u8], pkcs8: &[u8]) -> Result<Self, SignerError> {
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8,
        )
        .map_err(|e| SignerError(e.to_string()))?;
        Ok(NodeSigner {
            id,
            cert: cert.into(),
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

/// A node key that cannot sign records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an ECDSA P-256 key, cannot sign records: {0}")]
pub struct SignerError(pub String);

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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A signer with a fresh P-256 key, made in memory.
    pub fn signer() -> NodeSigner {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["certmesh".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let der = cert.der().to_vec();
        NodeSigner::new(DeviceId::of_cert(&der), &der, &kp.serialize_der()).unwrap()
    }

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
    fn signatures_verify_only_for_the_signed_message_and_key() {
        let (a, b) = (signer(), signer());
        assert_eq!(DeviceId::of_cert(a.cert()), a.id());
        let sig = a.sign(b"record").unwrap();
        let key_a = cert_public_key(a.cert()).unwrap();
        let key_b = cert_public_key(b.cert()).unwrap();
        assert!(verify_p256(&key_a, b"record", &sig));
        assert!(!verify_p256(&key_a, b"recorD", &sig));
        assert!(!verify_p256(&key_b, b"record", &sig));
        assert!(!verify_p256(&key_a, b"record", &sig[..sig.len() - 1]));
        assert!(cert_public_key(b"garbage").is_err());
    }
}
