//! Node identity on disk: the device key + self-signed certificate in `state_dir`.
//! The device ID derived from the certificate, and signing with the key, are values
//! in [`crate::core::device`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::core::device::{DeviceId, NodeSigner};

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

    /// A signer for this identity's key; refused unless it is an ECDSA P-256 key.
    pub fn signer(&self) -> Result<NodeSigner, IdentityError> {
        NodeSigner::new(self.id, self.cert.as_ref(), self.key.secret_pkcs8_der()).map_err(|e| {
            IdentityError::Corrupt {
                path: PathBuf::from(KEY_FILE),
                reason: e.to_string(),
            }
        })
    }
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
    fn corrupt_key_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        Identity::init(dir.path()).unwrap();
        fs::write(dir.path().join(KEY_FILE), "garbage").unwrap();
        let err = Identity::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("node-key.pem"), "{err}");
    }
}
