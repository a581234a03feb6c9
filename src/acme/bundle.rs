//! A certificate bundle as it lives in the tree: keys, CSRs, PEM splitting, the
//! key-matches-cert check, and the versioned publish (`archive/<name>/<n>/` then the
//! `live/<name>` flip). The tree is read and pruned through [`crate::disk::tree`],
//! which follows no link but a well-formed `live/<name>`.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData};
use x509_parser::pem::Pem;

use super::schedule::Validity;
use crate::config::certificate::KeyType;
use crate::disk::safe_fs::{self, Root};
use crate::disk::tree;
use crate::handles::TreeWriter;

/// The files of one version, `archive/<name>/<n>/`.
pub const FILES: [&str; 5] = [
    "cert.pem",
    "chain.pem",
    "fullchain.pem",
    "privkey.pem",
    "combined.pem",
];
/// Versions kept under `archive/<name>/` unless `[acme] keep_versions` says
/// otherwise (older ones, and their keys, are pruned).
pub const KEEP_VERSIONS: u32 = crate::config::acme::DEFAULT_KEEP_VERSIONS;

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
/// [`MAX_ARCHIVE_VERSION`]), good or not.
pub fn archive_versions(root: &Path, name: &str) -> Vec<u32> {
    let mut v: Vec<u32> = archive_entries(root, name)
        .into_iter()
        .filter_map(|(n, is_dir)| is_dir.then_some(n.parse().ok()?))
        .filter(|&v| v <= MAX_ARCHIVE_VERSION)
        .collect();
    v.sort_unstable();
    v
}

/// Most entries of `archive/<name>/` looked at (a real certificate has
/// [`KEEP_VERSIONS`]; the rest is a peer's junk).
const MAX_ARCHIVE_ENTRIES: usize = 1000;

/// The entries of `archive/<name>/`: name, and whether it is a real directory.
fn archive_entries(root: &Path, name: &str) -> Vec<(String, bool)> {
    let Ok(r) = Root::open(root) else {
        return Vec::new();
    };
    let Ok(dir) = r.dir(&format!("archive/{name}")) else {
        return Vec::new();
    };
    safe_fs::list(dir.as_fd())
        .unwrap_or_default()
        .into_iter()
        .take(MAX_ARCHIVE_ENTRIES)
        .filter_map(|n| {
            let n = String::from_utf8(n).ok()?;
            let m = safe_fs::lstat_at(dir.as_fd(), &n).ok()??;
            Some((n, m.is_dir()))
        })
        .collect()
}

/// Why `archive/<name>/<n>/` is not a good bundle, `None` if it is: `cert.pem`,
/// `fullchain.pem` and `privkey.pem` parse, `cert.pem` is the leaf of
/// `fullchain.pem`, and the key belongs to it.
fn bundle_fault(root: &Path, name: &str, n: u32) -> Option<String> {
    let dir = format!("archive/{name}/{n}");
    let read =
        |f: &str| tree::read_checked(root, &format!("{dir}/{f}")).map_err(|e| format!("{f}: {e}"));
    let check = || -> Result<(), String> {
        let cert = chain_der(&read("cert.pem")?).map_err(|e| format!("cert.pem: {e:#}"))?;
        let full =
            chain_der(&read("fullchain.pem")?).map_err(|e| format!("fullchain.pem: {e:#}"))?;
        if cert.first() != full.first() {
            return Err("cert.pem is not the leaf of fullchain.pem".into());
        }
        let leaf = parse_leaf(&full[0]).map_err(|e| format!("fullchain.pem: {e:#}"))?;
        let key = String::from_utf8(read("privkey.pem")?)
            .map_err(|_| "privkey.pem: not PEM".to_string())?;
        let key = KeyPair::from_pem(&key).map_err(|e| format!("privkey.pem: {e}"))?;
        if key.subject_public_key_info() != leaf.spki {
            return Err("privkey.pem does not match the certificate".into());
        }
        Ok(())
    };
    check().err()
}

/// Where the next version of `name` goes, from the checks that publishing makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishPlan {
    /// The new version number: above every good version, on a free name.
    pub version: u32,
    /// `live/<name>` is a directory or a file (not certmesh's link): the link
    /// replaces it on publish.
    pub replace_live: bool,
    /// Entries of `archive/<name>/` that hold no good bundle (ignored), with why.
    pub ignored: Vec<(String, String)>,
}

/// The checks publishing makes, run before an order too, so that no order is
/// placed that cannot be published: the tree can take a new version of `name`
/// ([`tree::check_publish_target`]; a directory at `live/<name>` is replaced when a
/// good version exists, as it is then no certbot tree), and a version number is
/// left. Junk under `archive/<name>/` neither raises the number nor blocks it: only
/// versions holding a good bundle count, and the new one takes a free name.
pub fn plan_publish(root: &Path, name: &str) -> Result<PublishPlan, tree::PublishTarget> {
    let target = tree::check_publish_target(root, name);
    let entries = archive_entries(root, name);
    let mut good = Vec::new();
    let mut ignored = Vec::new();
    for (entry, is_dir) in &entries {
        let n = entry
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_ARCHIVE_VERSION && n.to_string() == *entry);
        let fault = match n {
            _ if !is_dir => Some("not a directory".to_string()),
            None => Some("not a version number".to_string()),
            Some(n) => bundle_fault(root, name, n),
        };
        match (n, fault) {
            (Some(n), None) => good.push(n),
            (_, Some(why)) => ignored.push((format!("archive/{name}/{entry}"), why)),
            (None, None) => {}
        }
    }
    let replace_live = match target {
        Ok(()) => live_is_not_a_link(root, name),
        Err(tree::PublishTarget::CertbotLive { .. }) if !good.is_empty() => true,
        Err(e) => return Err(e),
    };
    let taken: std::collections::HashSet<&str> = entries.iter().map(|(e, _)| e.as_str()).collect();
    let mut version = good.iter().max().copied().unwrap_or(0);
    let version = loop {
        version = version.saturating_add(1);
        if version > MAX_ARCHIVE_VERSION {
            return Err(tree::PublishTarget::Blocked {
                path: root.join(format!("archive/{name}")).display().to_string(),
                what: "full (no version number left)",
                want: "a free version number up to 1000000",
            });
        }
        if !taken.contains(version.to_string().as_str()) {
            break version;
        }
    };
    Ok(PublishPlan {
        version,
        replace_live,
        ignored,
    })
}

/// `live/<name>` exists and is not a link (a file or a directory).
fn live_is_not_a_link(root: &Path, name: &str) -> bool {
    let m = Root::open(root)
        .and_then(|r| r.dir("live"))
        .and_then(|d| safe_fs::lstat_at(d.as_fd(), name));
    matches!(m, Ok(Some(m)) if !m.file_type().is_symlink())
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
/// Returns the new version number and the local sequence of the flip. `keep`:
/// versions kept, the new one included.
pub async fn publish(
    writer: &TreeWriter,
    name: &str,
    b: &Bundle,
    keep: u32,
) -> anyhow::Result<(u32, u64)> {
    let root = writer.root();
    let plan = plan_publish(root, name).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (path, why) in &plan.ignored {
        tracing::warn!(cert = name, path = %path, "ignoring {path}: {why}");
    }
    let n = plan.version;
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
    if plan.replace_live {
        // A directory or file where certmesh's link belongs (a good version exists,
        // so no certbot tree): the link replaces it.
        tracing::warn!(cert = name, "replacing live/{name}, which is not a link");
        writer
            .remove_all(&link)
            .with_context(|| format!("replacing live/{name}"))?;
    }
    let e = writer.symlink(&link, &format!("../archive/{name}/{n}"))?;
    let seq = writer
        .await_indexed(&[(link, e)], Duration::from_secs(10))
        .await?;
    prune(writer, name, n, keep);
    Ok((n, seq))
}

/// Removes archive versions older than the last `keep` (never the live one).
fn prune(writer: &TreeWriter, name: &str, live: u32, keep: u32) {
    let root = writer.root();
    let versions = archive_versions(root, name);
    let keep_from = versions.len().saturating_sub(keep.max(1) as usize);
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

    /// Writes a good bundle at `archive/www/<n>/`.
    fn good_version(root: &Path, n: u32) {
        let key = generate_key(KeyType::EcdsaP256).unwrap();
        let b = Bundle::new(&issue(&key, &["www.example.com"]), &key, &[]).unwrap();
        let dir = root.join(format!("archive/www/{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), &b.cert).unwrap();
        std::fs::write(dir.join("fullchain.pem"), b.fullchain()).unwrap();
        std::fs::write(dir.join("privkey.pem"), &b.key).unwrap();
    }

    #[test]
    fn junk_under_archive_neither_blocks_nor_raises_the_next_version() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        good_version(root, 1);
        for junk in ["1000000", "2", "x"] {
            std::fs::create_dir_all(root.join("archive/www").join(junk)).unwrap();
        }
        std::fs::write(root.join("archive/www/7"), "junk").unwrap();
        // A version whose key does not match its certificate is junk too.
        good_version(root, 5);
        let other = generate_key(KeyType::EcdsaP256).unwrap().serialize_pem();
        std::fs::write(root.join("archive/www/5/privkey.pem"), other).unwrap();
        let plan = plan_publish(root, "www").unwrap();
        assert_eq!(plan.version, 3, "{plan:?}");
        assert!(!plan.replace_live);
        let ignored: Vec<&str> = plan.ignored.iter().map(|(p, _)| p.as_str()).collect();
        for p in ["1000000", "2", "x", "7", "5"] {
            assert!(
                ignored.contains(&format!("archive/www/{p}").as_str()),
                "{plan:?}"
            );
        }
        let why = &plan
            .ignored
            .iter()
            .find(|(p, _)| p.ends_with("/5"))
            .unwrap()
            .1;
        assert!(why.contains("does not match"), "{why}");
    }

    #[test]
    fn a_live_dir_or_file_is_replaced_once_a_good_version_exists() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("live/www")).unwrap();
        // No good version: a certbot tree, refused before any order.
        let e = plan_publish(root, "www").unwrap_err();
        assert!(matches!(e, tree::PublishTarget::CertbotLive { .. }), "{e}");
        good_version(root, 1);
        assert!(plan_publish(root, "www").unwrap().replace_live);
        std::fs::remove_dir(root.join("live/www")).unwrap();
        std::fs::write(root.join("live/www"), "junk").unwrap();
        assert!(plan_publish(root, "www").unwrap().replace_live);
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
