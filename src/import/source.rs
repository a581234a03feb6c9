//! Reading certbot's and lego's files: everything resolves inside the source
//! directory, each key matches its certificate, nothing is written.

use std::fs;
use std::path::Path;

use rustls::pki_types::{pem::PemObject, PrivateKeyDer};

use super::{bad, io, Compat, Found, ImportError};
use crate::acme::bundle::{chain_der, parse_leaf, pem_cert};
use crate::config::certificate::CertificateConfig;
use crate::disk::tree::MAX_READ;

/// Reads a file of the source that must resolve inside `base` (certbot's links do).
pub(super) fn read_inside(base: &Path, p: &Path) -> Result<Vec<u8>, ImportError> {
    let real = fs::canonicalize(p).map_err(io(p))?;
    if !real.starts_with(base) {
        return Err(bad(
            p,
            format!("resolves to {}, outside {}", real.display(), base.display()),
        ));
    }
    let m = fs::metadata(&real).map_err(io(p))?;
    if !m.is_file() || m.len() > MAX_READ {
        return Err(bad(
            p,
            format!("not a regular file of at most {MAX_READ} bytes"),
        ));
    }
    fs::read(&real).map_err(io(p))
}

/// Splits a PEM chain + key into a checked [`Found`] (key matches the leaf).
fn check_bundle(
    name: &str,
    chain_pem: &[u8],
    chain_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
    compat: Compat,
) -> Result<Found, ImportError> {
    let ders = chain_der(chain_pem).map_err(|e| bad(chain_path, format!("{e:#}")))?;
    let leaf = parse_leaf(&ders[0]).map_err(|e| bad(chain_path, format!("{e:#}")))?;
    let key_der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| bad(key_path, format!("no private key in it: {e}")))?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der)
        .map_err(|e| bad(key_path, format!("unsupported private key: {e}")))?;
    let spki = signer
        .public_key()
        .ok_or_else(|| bad(key_path, "cannot derive the public key"))?;
    if spki.as_ref() != leaf.spki.as_slice() {
        return Err(bad(
            key_path,
            format!(
                "this key does not belong to the certificate in {}",
                chain_path.display()
            ),
        ));
    }
    let key = String::from_utf8(key_pem.to_vec()).map_err(|_| bad(key_path, "not UTF-8"))?;
    Ok(Found {
        name: name.to_string(),
        cert: pem_cert(&ders[0]),
        chain: ders[1..].iter().map(|d| pem_cert(d)).collect(),
        key: if key.ends_with('\n') { key } else { key + "\n" },
        leaf,
        compat,
    })
}

/// certbot: `live/<name>/{fullchain,privkey}.pem` (links into `archive/<name>/`).
pub(super) fn certbot_cert(
    base: &Path,
    c: &CertificateConfig,
) -> Result<Option<Found>, ImportError> {
    let live = base.join("live").join(&c.name);
    let m = match fs::symlink_metadata(&live) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&live)(e)),
    };
    if m.file_type().is_symlink() {
        return Err(bad(
            &live,
            "is already a link, not certbot's directory of links (imported before?)",
        ));
    }
    if !m.is_dir() {
        return Err(bad(&live, "not a directory: not a certbot tree"));
    }
    for e in fs::read_dir(&live).map_err(io(&live))? {
        let e = e.map_err(io(&live))?;
        if e.file_type().map_err(io(&live))?.is_dir() {
            return Err(bad(
                &e.path(),
                "a directory inside certbot's live/<name>: not a certbot lineage",
            ));
        }
    }
    let (fc, pk) = (live.join("fullchain.pem"), live.join("privkey.pem"));
    let chain = read_inside(base, &fc)?;
    let key = read_inside(base, &pk)?;
    let renewal = base.join("renewal").join(format!("{}.conf", c.name));
    check_bundle(
        &c.name,
        &chain,
        &fc,
        &key,
        &pk,
        Compat::CertbotLive { live, renewal },
    )
    .map(Some)
}

/// lego: `certificates/<first domain>.{crt,key,issuer.crt,pem}`, `*` written as `_`.
pub(super) fn lego_cert(base: &Path, c: &CertificateConfig) -> Result<Option<Found>, ImportError> {
    let dir = base.join("certificates");
    let stems: Vec<String> = c
        .domains
        .first()
        .map(|d| d.replace('*', "_"))
        .into_iter()
        .chain([c.name.clone()])
        .collect();
    let Some(stem) = stems
        .into_iter()
        .find(|s| dir.join(format!("{s}.crt")).is_file())
    else {
        return Ok(None);
    };
    let crt = dir.join(format!("{stem}.crt"));
    if fs::symlink_metadata(&crt).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(bad(
            &crt,
            "is already a link, not the file lego wrote (imported before?)",
        ));
    }
    let key = dir.join(format!("{stem}.key"));
    let issuer = dir.join(format!("{stem}.issuer.crt"));
    let mut chain = read_inside(base, &crt)?;
    let key_pem = read_inside(base, &key)?;
    // `--no-bundle`: the .crt holds the leaf only; the issuer file has the rest.
    if chain_der(&chain).map(|c| c.len()).unwrap_or(0) == 1 && issuer.is_file() {
        chain.extend_from_slice(b"\n");
        chain.extend(read_inside(base, &issuer)?);
    }
    let mut files = vec![(crt.clone(), "fullchain.pem"), (key.clone(), "privkey.pem")];
    if issuer.is_file() {
        files.push((issuer, "chain.pem"));
    }
    let pem = dir.join(format!("{stem}.pem"));
    if pem.is_file() {
        files.push((pem, "combined.pem"));
    }
    check_bundle(&c.name, &chain, &crt, &key_pem, &key, Compat::Lego(files)).map(Some)
}
