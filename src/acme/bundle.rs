//! A certificate bundle as it lives in the tree: keys, CSRs, PEM splitting, the
//! key-matches-cert check, and the versioned publish (`archive/<name>/<n>/` then the
//! `live/<name>` flip). The tree is read and pruned through [`crate::acme::tree`],
//! which follows no link but a well-formed `live/<name>`.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData};
use x509_parser::pem::Pem;

use super::schedule::Validity;
use super::tree;
use crate::config::KeyType;
use crate::handles::TreeWriter;
use crate::safe_fs::{self, Root};

/// The files of one version, `archive/<name>/<n>/`.
pub const FILES: [&str; 5] = [
    "cert.pem",
    "chain.pem",
    "fullchain.pem",
    "privkey.pem",
    "combined.pem",
];
/// Versions kept under `archive/<name>/` (older ones, and their keys, are pruned).
pub const KEEP_VERSIONS: u32 = 3;

/// A new private key of the configured type.
pub fn generate_key(kind: KeyType) -> anyhow::Result<KeyPair> {
    use rcgen::{RsaKeySize, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256};
    let rsa = |size| KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, size);
    Ok(match kind {
        KeyType::EcdsaP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
        KeyType::EcdsaP384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384)?,
        KeyType::Rsa2048 => rsa(RsaKeySize::_2048)?,
        KeyType::Rsa3072 => rsa(RsaKeySize::_3072)?,
        KeyType::Rsa4096 => rsa(RsaKeySize::_4096)?,
    })
}

/// A DER CSR for `domains` (SANs, empty subject: the CA takes names from the SANs).
pub fn csr(domains: &[String], key: &KeyPair) -> anyhow::Result<Vec<u8>> {
    let mut params = CertificateParams::new(domains.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    Ok(params.serialize_request(key)?.der().to_vec())
}

/// The DER certificates of a PEM chain, leaf first.
pub fn chain_der(pem: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for p in Pem::iter_from_buffer(pem) {
        let p = p.context("parsing PEM")?;
        if p.label == "CERTIFICATE" {
            out.push(p.contents);
        }
    }
    if out.is_empty() {
        bail!("no certificate in the PEM");
    }
    Ok(out)
}

/// One certificate as PEM (64-column base64).
pub(crate) fn pem_cert(der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = data_encoding::BASE64.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(s, "{}", String::from_utf8_lossy(line));
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// What a leaf certificate says about itself.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub validity: Validity,
    pub domains: Vec<String>,
    pub serial: String,
    pub spki: Vec<u8>,
}

pub fn parse_leaf(der: &[u8]) -> anyhow::Result<Leaf> {
    let (_, c) = x509_parser::parse_x509_certificate(der).context("parsing the certificate")?;
    let mut domains = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                domains.push(d.to_ascii_lowercase());
            }
        }
    }
    Ok(Leaf {
        validity: Validity {
            not_before: c.validity().not_before.timestamp(),
            not_after: c.validity().not_after.timestamp(),
        },
        domains,
        serial: c.raw_serial_as_string(),
        spki: c.public_key().raw.to_vec(),
    })
}

/// A complete, checked bundle, ready to publish.
pub struct Bundle {
    pub cert: String,
    pub chain: String,
    pub key: String,
    pub leaf: Leaf,
}

impl Bundle {
    /// Splits the CA's PEM chain and checks that `key` belongs to the leaf and that
    /// the leaf names every domain.
    pub fn new(chain_pem: &str, key: &KeyPair, domains: &[String]) -> anyhow::Result<Bundle> {
        let ders = chain_der(chain_pem.as_bytes())?;
        let leaf = parse_leaf(&ders[0])?;
        if leaf.spki != key.subject_public_key_info() {
            bail!("the CA's certificate does not match our private key");
        }
        for d in domains {
            if !leaf.domains.contains(d) {
                bail!("the CA's certificate does not name {d}");
            }
        }
        Ok(Bundle {
            cert: pem_cert(&ders[0]),
            chain: ders[1..].iter().map(|d| pem_cert(d)).collect(),
            key: key.serialize_pem(),
            leaf,
        })
    }

    pub fn fullchain(&self) -> String {
        format!("{}{}", self.cert, self.chain)
    }
}

/// The version `live/<name>` points at: its link target must be exactly
/// `../archive/<name>/<n>` (read with `readlinkat`, see [`tree::live_version`]).
pub fn live_version(root: &Path, name: &str) -> Option<u32> {
    tree::live_version(root, name)
}

/// Highest archive version number taken into account: a peer can create
/// `archive/<name>/4294967295`, which must neither wrap the next number nor stop
/// publishing (a real certificate gets one version per renewal, a few per year).
pub const MAX_ARCHIVE_VERSION: u32 = 1_000_000;

/// Version numbers present under `archive/<name>/` (real directories only, at most
/// [`MAX_ARCHIVE_VERSION`]).
pub fn archive_versions(root: &Path, name: &str) -> Vec<u32> {
    let Ok(r) = Root::open(root) else {
        return Vec::new();
    };
    let Ok(dir) = r.dir(&format!("archive/{name}")) else {
        return Vec::new();
    };
    let mut v: Vec<u32> = safe_fs::list(dir.as_fd())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| {
            let n = String::from_utf8(n).ok()?;
            let m = safe_fs::lstat_at(dir.as_fd(), &n).ok()??;
            m.is_dir().then_some(())?;
            n.parse().ok().filter(|&v| v <= MAX_ARCHIVE_VERSION)
        })
        .collect();
    v.sort_unstable();
    v
}

/// The certificate currently live for `name`, if any.
pub fn live_leaf(root: &Path, name: &str) -> Option<Leaf> {
    let pem = tree::read(root, &format!("live/{name}/cert.pem"))?;
    let ders = chain_der(&pem).ok()?;
    parse_leaf(&ders[0]).ok()
}

/// The private key currently live for `name` (for `reuse_key`).
pub fn live_key(root: &Path, name: &str) -> Option<KeyPair> {
    let pem = String::from_utf8(tree::read(root, &format!("live/{name}/privkey.pem"))?).ok()?;
    KeyPair::from_pem(&pem).ok()
}

/// Publishes a bundle as one unit: writes `archive/<name>/<n>/` (keys 0640), waits
/// until the local index holds every file, flips `live/<name>` to it, waits for the
/// index again, then prunes old versions. Peers apply the link only after its target
/// is complete, so no node ever exposes a key that does not match its certificate.
/// Returns the new version number and the local sequence of the flip.
pub async fn publish(writer: &TreeWriter, name: &str, b: &Bundle) -> anyhow::Result<(u32, u64)> {
    let root = writer.root();
    let n = archive_versions(root, name)
        .last()
        .copied()
        .max(live_version(root, name).filter(|&v| v <= MAX_ARCHIVE_VERSION))
        .unwrap_or(0)
        .checked_add(1)
        .filter(|&n| n <= MAX_ARCHIVE_VERSION)
        .ok_or_else(|| {
            anyhow::anyhow!("archive/{name}: no version number left below {MAX_ARCHIVE_VERSION}")
        })?;
    let dir = format!("archive/{name}/{n}");
    let fullchain = b.fullchain();
    let combined = format!("{fullchain}{}", b.key);
    let files: [(&str, &str, u32); 5] = [
        ("cert.pem", &b.cert, 0o644),
        ("chain.pem", &b.chain, 0o644),
        ("fullchain.pem", &fullchain, 0o644),
        ("privkey.pem", &b.key, 0o640),
        ("combined.pem", &combined, 0o640),
    ];
    // Stage (write + fsync) all five, then rename them in one go.
    let mut staged = Vec::new();
    for (file, data, mode) in files {
        let p = tree::rel(&format!("{dir}/{file}"))?;
        staged.push((p.clone(), writer.stage(&p, data.as_bytes(), mode)?));
    }
    let mut expect = Vec::new();
    for (p, s) in staged {
        expect.push((p, writer.place(s)?));
    }
    if let Ok(d) = Root::open(root).and_then(|r| r.dir(&dir)) {
        let _ = std::fs::File::from(d).sync_all();
    }
    writer
        .await_indexed(&expect, Duration::from_secs(10))
        .await?;
    let link = tree::rel(&format!("live/{name}"))?;
    let e = writer.symlink(&link, &format!("../archive/{name}/{n}"))?;
    let seq = writer
        .await_indexed(&[(link, e)], Duration::from_secs(10))
        .await?;
    prune(writer, name, n);
    Ok((n, seq))
}

/// Removes archive versions older than the last [`KEEP_VERSIONS`] (never the live one).
fn prune(writer: &TreeWriter, name: &str, live: u32) {
    let root = writer.root();
    let versions = archive_versions(root, name);
    let keep_from = versions.len().saturating_sub(KEEP_VERSIONS as usize);
    for v in &versions[..keep_from] {
        if *v == live {
            continue;
        }
        if let Ok(p) = tree::rel(&format!("archive/{name}/{v}")) {
            if let Err(e) = writer.remove_all(&p) {
                tracing::warn!(cert = name, version = v, error = %e, "pruning an old version");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue(key: &KeyPair, domains: &[&str]) -> String {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf =
            CertificateParams::new(domains.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(key, &issuer)
                .unwrap();
        format!("{}\n{}", leaf.pem(), ca_cert.pem())
    }

    #[test]
    fn every_key_type_generates_and_makes_a_csr() {
        for k in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let key = generate_key(k).unwrap();
            let der = csr(&["www.example.com".into()], &key).unwrap();
            assert!(der.len() > 100, "{k:?}");
        }
    }

    #[test]
    fn bundle_checks_key_and_names() {
        let key = generate_key(KeyType::EcdsaP256).unwrap();
        let chain = issue(&key, &["www.example.com", "example.com"]);
        let domains = vec!["www.example.com".to_string(), "example.com".to_string()];
        let b = Bundle::new(&chain, &key, &domains).unwrap();
        assert_eq!(chain_der(b.fullchain().as_bytes()).unwrap().len(), 2);
        assert_eq!(chain_der(b.chain.as_bytes()).unwrap().len(), 1);
        assert!(b.leaf.validity.not_after > b.leaf.validity.not_before);
        let other = generate_key(KeyType::EcdsaP256).unwrap();
        let e = Bundle::new(&chain, &other, &domains).err().unwrap();
        assert!(e.to_string().contains("does not match"), "{e}");
        let e = Bundle::new(&chain, &key, &["api.example.com".to_string()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("api.example.com"), "{e}");
        assert!(chain_der(b"no pem here").is_err());
    }

    #[test]
    fn a_peers_huge_archive_version_is_ignored_not_wrapped() {
        let d = tempfile::tempdir().unwrap();
        for v in ["1", "2", "4294967295", "1000001", "x"] {
            std::fs::create_dir_all(d.path().join("archive/www").join(v)).unwrap();
        }
        assert_eq!(archive_versions(d.path(), "www"), vec![1, 2]);
    }
}
