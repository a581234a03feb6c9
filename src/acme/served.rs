//! The served leaf (DESIGN §8): the certificate `live/<name>/fullchain.pem` hands to
//! browsers, and whether the bundle around it is good. Status, metrics, the renewal
//! schedule and repair take expiry from here, never from a `cert.pem` a peer could
//! have replaced on its own.
//!
//! A bundle is good when all of these hold:
//! - `fullchain.pem` parses and its first certificate (the leaf) names every
//!   configured domain;
//! - `privkey.pem` is the leaf's key;
//! - `cert.pem` is exactly that leaf, `chain.pem` exactly the rest of the chain,
//!   `combined.pem` (when present) the fullchain followed by the key;
//! - every certificate of the chain is signed by the next one, and the leaf is not
//!   self-signed when the chain holds an issuer (a forged leaf put in front of a real
//!   chain fails there).
//!
//! Anything else is a damaged bundle, with a reason naming the file.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::PublicKeyData;

use super::bundle::{chain_der, parse_leaf, Leaf};
use super::schedule::Validity;

/// A PEM file of a bundle larger than this is not a certificate or key.
pub const MAX_PEM: u64 = 1 << 20;

/// The files of one bundle as read (absent ones `None`).
#[derive(Debug, Default, Clone)]
pub struct BundleFiles {
    pub fullchain: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
    pub cert: Option<Vec<u8>>,
    pub chain: Option<Vec<u8>>,
    pub combined: Option<Vec<u8>>,
}

impl BundleFiles {
    /// Reads the files of `dir` (e.g. `<tree>/live/www`), never through a link at a
    /// file's own name, each bounded by [`MAX_PEM`].
    pub fn read(dir: &Path) -> BundleFiles {
        let f = |n: &str| read_file(&dir.join(n));
        BundleFiles {
            fullchain: f("fullchain.pem"),
            key: f("privkey.pem"),
            cert: f("cert.pem"),
            chain: f("chain.pem"),
            combined: f("combined.pem"),
        }
    }
}

/// Reads a regular file (never through a symlink at its last component), bounded.
pub fn read_file(p: &Path) -> Option<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut out = Vec::new();
    f.take(MAX_PEM + 1).read_to_end(&mut out).ok()?;
    (out.len() as u64 <= MAX_PEM).then_some(out)
}

/// The certificate currently served for `name`: the leaf `live/<name>/fullchain.pem`
/// serves, whatever the rest of the bundle says (never `cert.pem`, which a peer can
/// replace on its own).
pub fn served_leaf(root: &Path, name: &str) -> Option<Leaf> {
    let fc = read_file(&root.join("live").join(name).join("fullchain.pem"))?;
    let ders = chain_der(&fc).ok()?;
    parse_leaf(ders.first()?).ok()
}

/// The leaf of `fullchain` if `key` is its private key.
pub fn check_pair(fullchain: &[u8], key: &[u8]) -> Result<Leaf, String> {
    let ders = chain_der(fullchain).map_err(|e| format!("fullchain.pem: {e:#}"))?;
    let leaf = parse_leaf(&ders[0]).map_err(|e| format!("fullchain.pem: {e:#}"))?;
    let key = std::str::from_utf8(key)
        .ok()
        .and_then(|k| rcgen::KeyPair::from_pem(k).ok())
        .ok_or("privkey.pem: no private key")?;
    if leaf.spki != key.subject_public_key_info() {
        return Err("privkey.pem does not match fullchain.pem".into());
    }
    Ok(leaf)
}

/// Checks a whole bundle; `Ok` gives the served leaf, `Err` says what is wrong, naming
/// the file. `domains`: the configured names the leaf must hold (none: not checked).
pub fn check_bundle(files: &BundleFiles, domains: &[String]) -> Result<Leaf, String> {
    let (Some(fc), Some(key)) = (&files.fullchain, &files.key) else {
        return Err(match files.fullchain {
            None => "fullchain.pem missing or unreadable".into(),
            Some(_) => "privkey.pem missing or unreadable".into(),
        });
    };
    let leaf = check_pair(fc, key)?;
    let ders = chain_der(fc).map_err(|e| format!("fullchain.pem: {e:#}"))?;
    if let Some(d) = domains.iter().find(|d| !leaf.domains.contains(d)) {
        return Err(format!("fullchain.pem: the leaf does not name {d}"));
    }
    check_chain(&ders)?;
    match &files.cert {
        None => return Err("cert.pem missing or unreadable".into()),
        Some(c) if chain_der(c).ok().as_deref() != Some(&ders[..1]) => {
            return Err("cert.pem is not the leaf of fullchain.pem".into())
        }
        Some(_) => {}
    }
    if let Some(c) = &files.chain {
        let rest = &ders[1..];
        let ok = match chain_der(c) {
            Ok(d) => d.as_slice() == rest,
            Err(_) => rest.is_empty() && c.trim_ascii().is_empty(),
        };
        if !ok {
            return Err("chain.pem is not the rest of fullchain.pem".into());
        }
    }
    if let Some(c) = &files.combined {
        let k = key.trim_ascii();
        let ok = chain_der(c).is_ok_and(|d| d == ders) && c.windows(k.len()).any(|w| w == k);
        if !ok {
            return Err("combined.pem is not fullchain.pem followed by privkey.pem".into());
        }
    }
    Ok(leaf)
}

/// Every certificate of `ders` is signed by the next one; a leaf followed by an
/// issuer is not self-signed.
fn check_chain(ders: &[Vec<u8>]) -> Result<(), String> {
    let parsed: Vec<_> = ders
        .iter()
        .map(|d| x509_parser::parse_x509_certificate(d).map(|(_, c)| c))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("fullchain.pem: {e}"))?;
    for (i, pair) in parsed.windows(2).enumerate() {
        let (cert, issuer) = (&pair[0], &pair[1]);
        if cert.verify_signature(Some(issuer.public_key())).is_err() {
            return Err(format!(
                "fullchain.pem: certificate {} is not signed by certificate {} of the chain",
                i + 1,
                i + 2
            ));
        }
    }
    if parsed.len() > 1 && parsed[0].verify_signature(None).is_ok() {
        return Err("fullchain.pem: the leaf is self-signed but followed by a chain".into());
    }
    Ok(())
}

/// The time retries need before expiry: max(1 day, a tenth of the lifetime).
pub fn retry_reserve(v: Validity) -> i64 {
    (v.not_after.saturating_sub(v.not_before) / 10).max(86_400)
}

/// Seconds until the served leaf expires, less [`retry_reserve`]: the figure to page
/// on (at 0, a renewal failing from now on can no longer be fixed in time).
pub fn runway(v: Validity, now: i64) -> i64 {
    v.not_after
        .saturating_sub(now)
        .saturating_sub(retry_reserve(v))
}

/// Checks `live/<name>` as the frontends read it.
pub fn check_live(root: &Path, name: &str, domains: &[String]) -> Result<Leaf, String> {
    let live = root.join("live").join(name);
    if std::fs::symlink_metadata(&live).is_err() {
        return Err(format!("live/{name} missing"));
    }
    check_bundle(&BundleFiles::read(&live), domains).map_err(|e| format!("live/{name}/{e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test CA: its issuer and its certificate's PEM.
    pub(crate) struct Ca {
        pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pub pem: String,
    }

    pub(crate) fn ca() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = p.self_signed(&key).unwrap().pem();
        Ca {
            issuer: rcgen::Issuer::new(p, key),
            pem,
        }
    }

    /// A bundle for www.example.com as publish writes it, signed by `ca`.
    pub(crate) fn bundle(ca: &Ca, year: i32) -> BundleFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["www.example.com".into()]).unwrap();
        p.not_after = rcgen::date_time_ymd(year, 1, 1);
        let leaf = p.signed_by(&key, &ca.issuer).unwrap().pem();
        let k = key.serialize_pem();
        BundleFiles {
            fullchain: Some(format!("{leaf}{}", ca.pem).into_bytes()),
            key: Some(k.clone().into_bytes()),
            combined: Some(format!("{leaf}{}{k}", ca.pem).into_bytes()),
            cert: Some(leaf.into_bytes()),
            chain: Some(ca.pem.clone().into_bytes()),
        }
    }

    pub(crate) fn www() -> Vec<String> {
        vec!["www.example.com".into()]
    }

    #[test]
    fn runway_keeps_a_day_or_a_tenth_for_retries() {
        let v = Validity {
            not_before: 0,
            not_after: 90 * 86_400,
        };
        assert_eq!(runway(v, 80 * 86_400), 86_400); // 10 days left, 9 reserved
        let short = Validity {
            not_before: 0,
            not_after: 6 * 86_400,
        };
        assert_eq!(runway(short, 4 * 86_400), 86_400); // a day reserved
    }

    #[test]
    fn a_bundle_as_published_is_good() {
        let b = bundle(&ca(), 2031);
        let leaf = check_bundle(&b, &www()).unwrap();
        assert_eq!(leaf.domains, www());
    }

    #[test]
    fn a_forged_cert_pem_alone_is_damage_named() {
        let mut b = bundle(&ca(), 2031);
        b.cert = bundle(&ca(), 2098).cert;
        let e = check_bundle(&b, &www()).unwrap_err();
        assert!(e.contains("cert.pem is not the leaf"), "{e}");
    }

    #[test]
    fn a_forged_leaf_in_front_of_the_real_chain_fails_the_signature() {
        let real = ca();
        let mut b = bundle(&real, 2031);
        let forged = bundle(&ca(), 2098);
        let leaf = String::from_utf8(forged.cert.clone().unwrap()).unwrap();
        b.fullchain = Some(format!("{leaf}{}", real.pem).into_bytes());
        b.key = forged.key;
        b.cert = forged.cert;
        b.combined = None;
        let e = check_bundle(&b, &www()).unwrap_err();
        assert!(e.contains("not signed by certificate 2"), "{e}");
    }

    #[test]
    fn a_leaf_missing_a_configured_name_is_damage() {
        let b = bundle(&ca(), 2031);
        let want = vec!["www.example.com".into(), "example.com".into()];
        let e = check_bundle(&b, &want).unwrap_err();
        assert!(e.contains("does not name example.com"), "{e}");
    }

    #[test]
    fn a_foreign_key_or_bad_chain_pem_is_damage() {
        let mut b = bundle(&ca(), 2031);
        b.chain = Some(b"junk".to_vec());
        assert!(check_bundle(&b, &www()).unwrap_err().contains("chain.pem"));
        let mut b = bundle(&ca(), 2031);
        b.key = bundle(&ca(), 2031).key;
        assert!(check_bundle(&b, &www())
            .unwrap_err()
            .contains("privkey.pem"));
    }
}
