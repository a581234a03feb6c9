//! `certmesh import --from certbot|lego PATH`: adopts certificates another ACME client
//! made into certmesh's layout (`archive/<name>/<n>/` + the `live/<name>` link), with
//! no new order, and keeps the paths web servers already use valid:
//!
//! - certbot, `PATH` = the tree: `live/<name>` (a directory of per-file links) is
//!   swapped atomically for certmesh's link `live/<name> -> ../archive/<name>/<n>`,
//!   so `PATH/live/<name>/fullchain.pem` keeps resolving, now to what certmesh renews.
//! - certbot, another tree: `PATH/live/<name>` becomes a link to `<tree>/live/<name>`.
//! - lego: `PATH/certificates/<domain>.{crt,key,issuer.crt,pem}` become links to
//!   `<tree>/live/<name>/{fullchain,privkey,chain,combined}.pem`.
//!
//! Everything is read and checked first (key matches certificate, files within
//! `PATH`, the account's URLs on the configured directory's origin); only then is
//! anything written: staged under `<tree>/.certmesh/tmp/`, renamed into place. What is
//! replaced (certbot's links, lego's files) is copied first to
//! `<state_dir>/import-backup/<source>-<unix time>/`, never deleted unseen; certbot's
//! `renewal/<name>.conf` is renamed `<name>.conf.certmesh-imported` so certbot stops
//! renewing behind certmesh's back.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::{pem::PemObject, PrivateKeyDer};

use crate::acme::account::{https_origin, parse_account, ACCOUNT_FILE};
use crate::acme::bundle::{chain_der, parse_leaf, pem_cert, Leaf, MAX_ARCHIVE_VERSION};
use crate::acme::tree::MAX_READ;
use crate::config::{CertificateConfig, Config};

/// Where the certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// A certbot config dir (`/etc/letsencrypt`): `live/`, `archive/`, `renewal/`, `accounts/`.
    Certbot,
    /// A lego `--path` dir (`.lego`): `certificates/`, `accounts/`.
    Lego,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Certbot => "certbot",
            Source::Lego => "lego",
        }
    }
}

/// Why an import did not happen (nothing was written) or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The input is not what `--from` says, or does not fit the config.
    #[error("{path}: {why}")]
    Input { path: PathBuf, why: String },
    /// Reading or writing failed.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl ImportError {
    /// Bad input (exit code 2), as opposed to a runtime failure.
    pub fn is_input(&self) -> bool {
        matches!(self, ImportError::Input { .. })
    }
}

fn bad(path: &Path, why: impl Into<String>) -> ImportError {
    ImportError::Input {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |error| ImportError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One certificate found in the source, checked, not yet written.
struct Found {
    name: String,
    leaf: Leaf,
    cert: String,
    chain: String,
    key: String,
    /// Paths in the source that will point at the tree afterwards.
    compat: Compat,
}

enum Compat {
    /// certbot `live/<name>` (a directory of links) and its `renewal/<name>.conf`.
    CertbotLive { live: PathBuf, renewal: PathBuf },
    /// lego `certificates/<base>.*` files → files of `live/<name>/`.
    Lego(Vec<(PathBuf, &'static str)>),
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Report {
    /// `(name, version, serial, not_after)` of each imported certificate.
    pub imported: Vec<(String, u32, String, i64)>,
    /// Paths that now resolve to certmesh's `live/<name>` files.
    pub kept_valid: Vec<PathBuf>,
    /// What happened to the account, and anything skipped.
    pub notes: Vec<String>,
    /// Where replaced files were copied.
    pub backup: Option<PathBuf>,
}

/// Imports every `[[certificate]]` of `cfg` found in the `from` tree at `path`.
pub fn import(cfg: &Config, from: Source, path: &Path) -> Result<Report, ImportError> {
    let path = fs::canonicalize(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    if !path.is_dir() {
        return Err(bad(&path, "not a directory"));
    }
    let tree = fs::canonicalize(&cfg.tree).unwrap_or_else(|_| cfg.tree.clone());
    let in_place = tree == path;
    if from == Source::Lego && (tree.starts_with(&path) || path.starts_with(&tree)) {
        return Err(bad(
            &path,
            format!(
                "a lego directory cannot hold certmesh's tree or be inside it ({}); set [tree] path elsewhere",
                tree.display()
            ),
        ));
    }
    if from == Source::Certbot && !in_place && path.starts_with(&tree) {
        return Err(bad(&path, "inside the tree but not the tree itself"));
    }
    let mut report = Report::default();
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for c in &cfg.certificates {
        let f = match from {
            Source::Certbot => certbot_cert(&path, c)?,
            Source::Lego => lego_cert(&path, c)?,
        };
        match f {
            Some(f) => found.push(f),
            None => missing.push(c.name.clone()),
        }
    }
    if found.is_empty() {
        return Err(bad(
            &path,
            format!(
                "no {} certificate matches a [[certificate]] of {} (looked for {})",
                from.label(),
                cfg.file.display(),
                if cfg.certificates.is_empty() {
                    "nothing: the config has no [[certificate]]".to_string()
                } else {
                    cfg.certificates
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
        ));
    }
    for m in missing {
        report.notes.push(format!(
            "{m}: not found in {}; certmesh orders it when the daemon starts",
            path.display()
        ));
    }
    // Everything checked: the publish targets in the tree, before any write.
    for f in &found {
        if let Err(e) = crate::acme::tree::check_publish_target(&tree, &f.name) {
            let certbot_own =
                in_place && matches!(e, crate::acme::tree::PublishTarget::CertbotLive { .. });
            if !certbot_own {
                return Err(bad(&tree, e.to_string()));
            }
        }
    }
    let account = match cfg.acme.as_ref() {
        Some(a) => match from {
            Source::Certbot => certbot_account(&path, &a.directory),
            Source::Lego => lego_account(&path, &a.directory),
        },
        None => Err("no [acme] in the config: account not imported".to_string()),
    };

    let backup = cfg.state_dir.join("import-backup").join(format!(
        "{}-{}",
        from.label(),
        crate::acme::unix_now()
    ));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&backup)
        .map_err(io(&backup))?;
    report.backup = Some(backup.clone());
    for f in found {
        let version = publish(&tree, &f, in_place, &backup)?;
        match &f.compat {
            Compat::CertbotLive { live, renewal } => {
                if !in_place {
                    let target = tree.join("live").join(&f.name);
                    replace_dir_with_link(live, &target, &backup.join("live").join(&f.name))?;
                }
                report.kept_valid.extend(
                    ["cert.pem", "chain.pem", "fullchain.pem", "privkey.pem"]
                        .iter()
                        .map(|x| live.join(x)),
                );
                if renewal.exists() {
                    let done = renewal.with_extension("conf.certmesh-imported");
                    fs::rename(renewal, &done).map_err(io(renewal))?;
                    report.notes.push(format!(
                        "{}: renamed to {} (certbot no longer renews {})",
                        renewal.display(),
                        done.display(),
                        f.name
                    ));
                }
            }
            Compat::Lego(files) => {
                for (old, file) in files {
                    let target = tree.join("live").join(&f.name).join(file);
                    replace_file_with_link(old, &target, &backup)?;
                    report.kept_valid.push(old.clone());
                }
            }
        }
        report.imported.push((
            f.name.clone(),
            version,
            f.leaf.serial.clone(),
            f.leaf.validity.not_after,
        ));
    }
    match account {
        Ok(stored) => report.notes.push(write_account(&tree, &stored)?),
        Err(why) => report.notes.push(format!("account: {why}")),
    }
    Ok(report)
}

/// Reads a file of the source that must resolve inside `base` (certbot's links do).
fn read_inside(base: &Path, p: &Path) -> Result<Vec<u8>, ImportError> {
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
fn certbot_cert(base: &Path, c: &CertificateConfig) -> Result<Option<Found>, ImportError> {
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
fn lego_cert(base: &Path, c: &CertificateConfig) -> Result<Option<Found>, ImportError> {
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

/// Writes `archive/<name>/<n>/` (staged as a whole, then renamed in) and points
/// `live/<name>` at it. In place (certbot's own tree), certbot's `live/<name>`
/// directory is swapped for the link in one `renameat2(RENAME_EXCHANGE)` after its
/// links were copied to `backup`.
fn publish(tree: &Path, f: &Found, in_place: bool, backup: &Path) -> Result<u32, ImportError> {
    let archive = tree.join("archive").join(&f.name);
    let tmp = tree.join(".certmesh/tmp");
    for (d, mode) in [
        (&archive, 0o755),
        (&tree.join("live"), 0o755),
        (&tmp, 0o700),
    ] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(d)
            .map_err(io(d))?;
    }
    let last = fs::read_dir(&archive)
        .map_err(io(&archive))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&v| v <= MAX_ARCHIVE_VERSION)
        .max()
        .unwrap_or(0);
    let n = last + 1;
    let stage = tmp.join(format!("import-{:016x}", rand::random::<u64>()));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&stage)
        .map_err(io(&stage))?;
    let fullchain = format!("{}{}", f.cert, f.chain);
    let combined = format!("{fullchain}{}", f.key);
    let files: [(&str, &str, u32); 5] = [
        ("cert.pem", &f.cert, 0o644),
        ("chain.pem", &f.chain, 0o644),
        ("fullchain.pem", &fullchain, 0o644),
        ("privkey.pem", &f.key, 0o640),
        ("combined.pem", &combined, 0o640),
    ];
    let written = (|| {
        for (file, data, mode) in files {
            let p = stage.join(file);
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&p)?;
            out.write_all(data.as_bytes())?;
            out.sync_all()?;
        }
        fs::File::open(&stage)?.sync_all()
    })();
    let version_dir = archive.join(n.to_string());
    if let Err(e) = written.and_then(|()| fs::rename(&stage, &version_dir)) {
        let _ = fs::remove_dir_all(&stage);
        return Err(io(&version_dir)(e));
    }
    let _ = fs::File::open(&archive).and_then(|d| d.sync_all());
    let live = tree.join("live").join(&f.name);
    let target = format!("../archive/{}/{n}", f.name);
    let is_dir = fs::symlink_metadata(&live).is_ok_and(|m| m.is_dir());
    if in_place && is_dir {
        replace_dir_with_link(
            &live,
            Path::new(&target),
            &backup.join("live").join(&f.name),
        )?;
    } else {
        let staged = tmp.join(format!("import-link-{:016x}", rand::random::<u64>()));
        symlink(&target, &staged).map_err(io(&staged))?;
        if let Err(e) = fs::rename(&staged, &live) {
            let _ = fs::remove_file(&staged);
            return Err(io(&live)(e));
        }
    }
    let _ = fs::File::open(tree.join("live")).and_then(|d| d.sync_all());
    Ok(n)
}

/// Swaps the directory `dir` (certbot's links) for a link to `target`, atomically
/// for readers: its entries are copied to `backup` first, the link is made next to
/// it and exchanged with it, then the old directory is removed.
fn replace_dir_with_link(dir: &Path, target: &Path, backup: &Path) -> Result<(), ImportError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(backup)
        .map_err(io(backup))?;
    let mut entries = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let (from, to) = (e.path(), backup.join(e.file_name()));
        let t = e.file_type().map_err(io(&from))?;
        if t.is_symlink() {
            symlink(fs::read_link(&from).map_err(io(&from))?, &to).map_err(io(&to))?;
        } else if t.is_file() {
            fs::copy(&from, &to).map_err(io(&to))?;
        } else {
            return Err(bad(&from, "neither a file nor a link; not touching it"));
        }
        entries.push(e.file_name());
    }
    let parent = dir
        .parent()
        .ok_or_else(|| bad(dir, "no parent directory"))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| bad(dir, "not a UTF-8 name"))?;
    let staged = format!(".{name}.certmesh-import-{:016x}", rand::random::<u64>());
    let p = fs::File::open(parent).map_err(io(parent))?;
    rustix::fs::symlinkat(target, &p, staged.as_str())
        .map_err(|e| io(dir)(std::io::Error::from(e)))?;
    if let Err(e) = rustix::fs::renameat_with(
        &p,
        staged.as_str(),
        &p,
        name,
        rustix::fs::RenameFlags::EXCHANGE,
    ) {
        let _ = rustix::fs::unlinkat(&p, staged.as_str(), rustix::fs::AtFlags::empty());
        return Err(io(dir)(e.into()));
    }
    // `staged` is now certbot's old directory, already copied to `backup`.
    let old = parent.join(&staged);
    for e in entries {
        let _ = fs::remove_file(old.join(e));
    }
    fs::remove_dir(&old).map_err(io(&old))?;
    let _ = p.sync_all();
    Ok(())
}

/// Replaces a lego file by a link to `target` (copied to `backup` first).
fn replace_file_with_link(old: &Path, target: &Path, backup: &Path) -> Result<(), ImportError> {
    let name = old
        .file_name()
        .ok_or_else(|| bad(old, "no file name"))?
        .to_owned();
    let keep = backup.join("certificates").join(&name);
    if let Some(d) = keep.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(io(d))?;
    }
    fs::copy(old, &keep).map_err(io(&keep))?;
    let mut staged = name.clone();
    staged.push(format!(".certmesh-import-{:016x}", rand::random::<u64>()));
    let staged = old.with_file_name(staged);
    symlink(target, &staged).map_err(io(&staged))?;
    if let Err(e) = fs::rename(&staged, old) {
        let _ = fs::remove_file(&staged);
        return Err(io(old)(e));
    }
    Ok(())
}

/// certmesh's account file content for an account URL and a P-256 PKCS#8 key,
/// checked with the same parser the daemon uses.
fn stored_account(directory: &str, url: &str, pkcs8: &[u8]) -> Result<Vec<u8>, String> {
    let v = serde_json::json!({
        "directory": directory,
        "credentials": {
            "id": url,
            "key_pkcs8": data_encoding::BASE64URL_NOPAD.encode(pkcs8),
            "directory": directory,
        }
    });
    let bytes = serde_json::to_vec_pretty(&v).map_err(|e| e.to_string())?;
    let _ = parse_account(&bytes, directory).map_err(|e| format!("refused: {e}"))?;
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8),
        &rcgen::PKCS_ECDSA_P256_SHA256,
    )
    .map_err(|e| format!("the key is not a usable P-256 key: {e}"))?;
    Ok(bytes)
}

/// `host[:port]` + path of the directory URL, as certbot names its account dir.
fn certbot_server_dir(directory: &str) -> Option<String> {
    let rest = directory.strip_prefix("https://")?;
    Some(rest.trim_end_matches('/').to_string())
}

/// certbot: `accounts/<host[:port]>/<path>/<id>/{regr.json,private_key.json}`.
fn certbot_account(base: &Path, directory: &str) -> Result<Vec<u8>, String> {
    let server = certbot_server_dir(directory).ok_or("the directory is not https")?;
    let dir = base.join("accounts").join(server);
    let ids = fs::read_dir(&dir).map_err(|e| {
        format!(
            "no certbot account for {directory} ({}: {e})",
            dir.display()
        )
    })?;
    let mut why = Vec::new();
    for id in ids.flatten() {
        let p = id.path();
        let read = |f: &str| -> Result<serde_json::Value, String> {
            let b = read_inside(base, &p.join(f)).map_err(|e| e.to_string())?;
            serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.join(f).display()))
        };
        let attempt = (|| {
            let regr = read("regr.json")?;
            let url = regr["uri"]
                .as_str()
                .ok_or_else(|| format!("{}: no \"uri\"", p.join("regr.json").display()))?;
            let jwk = read("private_key.json")?;
            let pkcs8 = jwk_p256_pkcs8(&jwk)
                .map_err(|e| format!("{}: {e}", p.join("private_key.json").display()))?;
            stored_account(directory, url, &pkcs8)
        })();
        match attempt {
            Ok(b) => return Ok(b),
            Err(e) => why.push(e),
        }
    }
    Err(if why.is_empty() {
        format!("no certbot account in {}", dir.display())
    } else {
        why.join("; ")
    })
}

/// A JWK EC P-256 private key (`kty`, `crv`, `d`, `x`, `y`) as PKCS#8 DER.
fn jwk_p256_pkcs8(jwk: &serde_json::Value) -> Result<Vec<u8>, String> {
    match (jwk["kty"].as_str(), jwk["crv"].as_str()) {
        (Some("EC"), Some("P-256")) => {}
        (Some("RSA"), _) => {
            return Err(
                "an RSA account key (certbot's default); certmesh's ACME client signs \
                 with ECDSA P-256 only, so a new account is registered at the first order \
                 (the imported certificates do not need one)"
                    .into(),
            )
        }
        (k, c) => return Err(format!("unsupported key kty={k:?} crv={c:?}")),
    }
    let field = |n: &str| -> Result<Vec<u8>, String> {
        let s = jwk[n].as_str().ok_or(format!("no \"{n}\""))?;
        let b = data_encoding::BASE64URL_NOPAD
            .decode(s.trim_end_matches('=').as_bytes())
            .map_err(|e| format!("\"{n}\": {e}"))?;
        (b.len() == 32)
            .then_some(b)
            .ok_or(format!("\"{n}\" is not 32 bytes"))
    };
    let (d, x, y) = (field("d")?, field("x")?, field("y")?);
    // PKCS#8 { v0, ecPublicKey/prime256v1, ECPrivateKey { 1, d, [1] 04||x||y } }.
    let mut der = hex("308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420");
    der.extend(d);
    der.extend(hex("a14403420004"));
    der.extend(x);
    der.extend(y);
    Ok(der)
}

/// One DER element: tag, minimal length, content.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let n = content.len();
    let mut out = vec![tag];
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn hex(s: &str) -> Vec<u8> {
    data_encoding::HEXLOWER
        .decode(s.as_bytes())
        .expect("a constant hex string")
}

/// A SEC1 `EC PRIVATE KEY` (P-256) wrapped as PKCS#8, or a PKCS#8 key as it is.
fn p256_pkcs8_from_pem(pem: &[u8]) -> Result<Vec<u8>, String> {
    match PrivateKeyDer::from_pem_slice(pem).map_err(|e| e.to_string())? {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(k) => {
            let mut inner = hex("020100301306072a8648ce3d020106082a8648ce3d030107");
            inner.extend(der_tlv(0x04, k.secret_sec1_der()));
            Ok(der_tlv(0x30, &inner))
        }
        _ => Err(
            "an RSA account key; certmesh's ACME client signs with ECDSA P-256 only, so \
                  a new account is registered at the first order"
                .into(),
        ),
    }
}

/// lego: `accounts/<host>_<port>/<email>/{account.json,keys/<email>.key}`.
fn lego_account(base: &Path, directory: &str) -> Result<Vec<u8>, String> {
    let (host, port) = https_origin(directory).ok_or("the directory is not https")?;
    let server = if port == 443 {
        host.clone()
    } else {
        format!("{host}_{port}")
    };
    let dir = base.join("accounts").join(&server);
    let emails = fs::read_dir(&dir)
        .map_err(|e| format!("no lego account for {directory} ({}: {e})", dir.display()))?;
    let mut why = Vec::new();
    for e in emails.flatten() {
        let p = e.path();
        let email = e.file_name().to_string_lossy().to_string();
        let attempt = (|| {
            let acc = read_inside(base, &p.join("account.json")).map_err(|e| e.to_string())?;
            let acc: serde_json::Value = serde_json::from_slice(&acc)
                .map_err(|e| format!("{}: {e}", p.join("account.json").display()))?;
            let url = acc["registration"]["uri"].as_str().ok_or_else(|| {
                format!("{}: no registration.uri", p.join("account.json").display())
            })?;
            let kp = p.join("keys").join(format!("{email}.key"));
            let key = read_inside(base, &kp).map_err(|e| e.to_string())?;
            let pkcs8 = p256_pkcs8_from_pem(&key).map_err(|e| format!("{}: {e}", kp.display()))?;
            stored_account(directory, url, &pkcs8)
        })();
        match attempt {
            Ok(b) => return Ok(b),
            Err(e) => why.push(e),
        }
    }
    Err(if why.is_empty() {
        format!("no lego account in {}", dir.display())
    } else {
        why.join("; ")
    })
}

/// Writes `.certmesh/acme/account.json` (0600) unless one is there already.
fn write_account(tree: &Path, bytes: &[u8]) -> Result<String, ImportError> {
    let dest = tree.join(ACCOUNT_FILE);
    if fs::symlink_metadata(&dest).is_ok() {
        return Ok(format!(
            "account: {} exists already; kept it",
            dest.display()
        ));
    }
    let dir = dest.parent().ok_or_else(|| bad(&dest, "no parent"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let tmp = tree
        .join(".certmesh/tmp")
        .join(format!("import-account-{:016x}", rand::random::<u64>()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, &dest)) {
        let _ = fs::remove_file(&tmp);
        return Err(io(&dest)(e));
    }
    Ok(format!("account: imported into {}", dest.display()))
}

/// `certmesh check`: configured certificates whose `live/<name>` in the tree cannot
/// be published into (a certbot directory of links, a file), with the fix.
pub fn check_tree(cfg: &Config) -> Vec<String> {
    cfg.certificates
        .iter()
        .filter_map(|c| {
            crate::acme::tree::check_publish_target(&cfg.tree, &c.name)
                .err()
                .map(|e| {
                    let e = e.to_string().replace(
                        "--config <file>",
                        &format!("--config {}", cfg.file.display()),
                    );
                    format!("[[certificate]] {:?}: {e}", c.name)
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwk_p256_key_becomes_pkcs8_that_signs() {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = k.serialize_der();
        // The last 65 bytes of rcgen's PKCS#8 are 04||x||y; d follows the fixed prefix.
        let d = &der[36..68];
        let xy = &der[der.len() - 64..];
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "d": b64(d), "x": b64(&xy[..32]), "y": b64(&xy[32..])
        });
        let out = jwk_p256_pkcs8(&jwk).unwrap();
        let back = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(out.as_slice()),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
        .unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(back.subject_public_key_info(), k.subject_public_key_info());
        let rsa = serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB"});
        assert!(jwk_p256_pkcs8(&rsa).unwrap_err().contains("RSA"));
        let short =
            serde_json::json!({"kty": "EC", "crv": "P-256", "d": "AA", "x": "AA", "y": "AA"});
        assert!(jwk_p256_pkcs8(&short).is_err());
    }

    #[test]
    fn an_account_for_another_directory_is_refused() {
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let dir = "https://acme.example/dir";
        assert!(stored_account(dir, "https://acme.example/acct/1", &k.serialize_der()).is_ok());
        let e = stored_account(dir, "https://evil.example/acct/1", &k.serialize_der());
        assert!(e.unwrap_err().contains("refused"));
        assert_eq!(
            certbot_server_dir("https://127.0.2.1:14000/dir").as_deref(),
            Some("127.0.2.1:14000/dir")
        );
    }
}
