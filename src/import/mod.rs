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
//!
//! Files: this one (the order of steps, errors, `certmesh check`), `source` (reading
//! and checking certbot's and lego's files), `place` (writing into the tree and
//! swapping the old paths for links), `account` (their ACME account as certmesh's).

mod account;
mod place;
mod source;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::acme::bundle::Leaf;
use crate::config::Config;

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

pub(crate) fn bad(path: &Path, why: impl Into<String>) -> ImportError {
    ImportError::Input {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |error| ImportError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// One certificate found in the source, checked, not yet written.
pub(crate) struct Found {
    name: String,
    leaf: Leaf,
    cert: String,
    chain: String,
    key: String,
    /// Paths in the source that will point at the tree afterwards.
    compat: Compat,
}

pub(crate) enum Compat {
    /// certbot `live/<name>` (a directory of links) and its `renewal/<name>.conf`.
    CertbotLive { live: PathBuf, renewal: PathBuf },
    /// lego `certificates/<base>.*` files → files of `live/<name>/`.
    Lego(Vec<(PathBuf, &'static str)>),
}

/// One certificate now in certmesh's layout.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The `[[certificate]]` name (`live/<name>`).
    pub name: String,
    /// `archive/<name>/<version>/`.
    pub version: u32,
    /// The leaf's serial, as x509-parser prints it.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Report {
    /// Each imported certificate.
    pub imported: Vec<Imported>,
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
    let found = find(cfg, from, &path, &mut report)?;
    // Everything checked: the publish targets in the tree, before any write.
    for f in &found {
        if let Err(e) = crate::disk::tree::check_publish_target(&tree, &f.name) {
            let certbot_own =
                in_place && matches!(e, crate::disk::tree::PublishTarget::CertbotLive { .. });
            if !certbot_own {
                return Err(bad(&tree, e.to_string()));
            }
        }
    }
    let account = match cfg.acme.as_ref() {
        Some(a) => match from {
            Source::Certbot => account::certbot_account(&path, &a.directory),
            Source::Lego => account::lego_account(&path, &a.directory),
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
        let version = place::publish(&tree, &f, in_place, &backup)?;
        keep_paths_valid(&f, &tree, in_place, &backup, &mut report)?;
        report.imported.push(Imported {
            name: f.name.clone(),
            version,
            serial: f.leaf.serial.clone(),
            not_after: f.leaf.validity.not_after,
        });
    }
    match account {
        Ok(stored) => report.notes.push(account::write_account(&tree, &stored)?),
        Err(why) => report.notes.push(format!("account: {why}")),
    }
    Ok(report)
}

/// The configured certificates present in the source, read and checked.
fn find(
    cfg: &Config,
    from: Source,
    path: &Path,
    report: &mut Report,
) -> Result<Vec<Found>, ImportError> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for c in &cfg.certificates {
        let f = match from {
            Source::Certbot => source::certbot_cert(path, c)?,
            Source::Lego => source::lego_cert(path, c)?,
        };
        match f {
            Some(f) => found.push(f),
            None => missing.push(c.name.clone()),
        }
    }
    if found.is_empty() {
        let looked = if cfg.certificates.is_empty() {
            "nothing: the config has no [[certificate]]".to_string()
        } else {
            let names: Vec<&str> = cfg.certificates.iter().map(|c| c.name.as_str()).collect();
            names.join(", ")
        };
        return Err(bad(
            path,
            format!(
                "no {} certificate matches a [[certificate]] of {} (looked for {looked})",
                from.label(),
                cfg.file.display(),
            ),
        ));
    }
    for m in missing {
        report.notes.push(format!(
            "{m}: not found in {}; certmesh orders it when the daemon starts",
            path.display()
        ));
    }
    Ok(found)
}

/// Makes the source's paths resolve to the tree's `live/<name>` (certbot: its
/// `live/<name>` directory, unless that is the tree's own; lego: its files).
fn keep_paths_valid(
    f: &Found,
    tree: &Path,
    in_place: bool,
    backup: &Path,
    report: &mut Report,
) -> Result<(), ImportError> {
    match &f.compat {
        Compat::CertbotLive { live, renewal } => {
            if !in_place {
                let target = tree.join("live").join(&f.name);
                place::replace_dir_with_link(live, &target, &backup.join("live").join(&f.name))?;
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
                place::replace_file_with_link(old, &target, backup)?;
                report.kept_valid.push(old.clone());
            }
        }
    }
    Ok(())
}

/// `certmesh check`: configured certificates whose `live/<name>` in the tree cannot
/// be published into (a certbot directory of links, a file), with the fix. A tree
/// this user cannot read is not reported here (config management may run `check` as
/// another user than the daemon); the daemon reports it before ordering.
pub fn check_tree(cfg: &Config) -> Vec<String> {
    use crate::disk::tree::{check_publish_target, PublishTarget};
    cfg.certificates
        .iter()
        .filter_map(|c| {
            check_publish_target(&cfg.tree, &c.name)
                .err()
                .filter(|e| !matches!(e, PublishTarget::Io { .. }))
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
