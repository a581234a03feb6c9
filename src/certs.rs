//! Certificates as data: the desired set of certificates also lives in
//! the replicated tree, one small file per certificate under
//! `.certmesh/certificates/<name>.toml` (parsing and the merge rule:
//! `config::tree_certs`). This file owns the disk and daemon side:
//!
//! - [`read`]: every entry in the tree, each bounded in size, the set bounded in
//!   count; an entry that is malformed, oversized or over the cap is refused and
//!   named, never fatal.
//! - [`follow`]: the daemon task that recomputes the effective certificates (config
//!   blocks win, then the tree's entries) whenever a change touches the directory, so
//!   the ACME driver, repair, status, metrics, hooks and probes all see one set.
//! - [`add`], [`remove`], [`list`]: what `certmesh cert add|remove|list` does — a
//!   write into the tree the running daemon replicates like any local change.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use crate::config::tree_certs::{self, DIR, MAX_ENTRIES, MAX_ENTRY_BYTES};
use crate::config::{
    acme::AcmeConfig, certificate::CertSource, certificate::CertificateConfig, Config,
};
use crate::handles::{Changes, Reports, Settings};

/// An entry in the tree that was not taken, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refused {
    /// The path in the tree.
    pub path: String,
    pub why: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: refused: {}", self.path, self.why)
    }
}

/// The tree's certificate entries.
#[derive(Debug, Default)]
pub struct TreeCerts {
    /// The valid entries, by name.
    pub certs: Vec<CertificateConfig>,
    pub refused: Vec<Refused>,
}

/// Entries parsed before, by name, with their file's stamp at that read: an entry
/// whose file did not change is neither read nor parsed again (issue 29: a join of
/// 10,000 certificates read and parsed every entry on each of ~340 changes). Parsing
/// depends on `[acme]`, so another `[acme]` starts it afresh.
#[derive(Default)]
pub struct Cache {
    acme: Option<AcmeConfig>,
    entries: HashMap<String, (Stamp, Result<CertificateConfig, String>)>,
}

/// Inode, size, mtime and ctime (ns): any write or replacement changes one.
type Stamp = (u64, u64, i64, i64);

/// The stamp of `name` in `dir`, not following a link, in one `fstatat` (a join of
/// 10,000 certificates stamped every entry on each change: an `openat` and an
/// `fstat` each were 11 % of the new node's CPU). `None`: gone.
fn stamp_at(dir: std::os::fd::BorrowedFd<'_>, name: &str) -> std::io::Result<Option<Stamp>> {
    use rustix::fs::{statat, AtFlags};
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((
            st.st_ino,
            u64::try_from(st.st_size).unwrap_or(0),
            ns(st.st_mtime, st.st_mtime_nsec as i64),
            ns(st.st_ctime, st.st_ctime_nsec as i64),
        ))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads every entry under `<tree>/.certmesh/certificates/`, following no link.
/// `acme`: this node's `[acme]` (a dns-01 entry needs `[acme.dns]`).
pub fn read(tree: &Path, acme: Option<&AcmeConfig>) -> TreeCerts {
    read_cached(tree, acme, &mut Cache::default())
}

/// [`read`], parsing only the entries changed since `cache` was filled.
pub fn read_cached(tree: &Path, acme: Option<&AcmeConfig>, cache: &mut Cache) -> TreeCerts {
    use crate::disk::safe_fs;
    if cache.acme.as_ref() != acme {
        cache.entries.clear();
        cache.acme = acme.cloned();
    }
    let mut out = TreeCerts::default();
    let refuse =
        |out: &mut TreeCerts, path: String, why: String| out.refused.push(Refused { path, why });
    let root = match safe_fs::Root::open(tree) {
        Ok(r) => r,
        Err(e) => {
            refuse(&mut out, DIR.into(), format!("opening the tree: {e}"));
            return out;
        }
    };
    match root.lstat(DIR) {
        Ok(None) => {
            cache.entries.clear();
            return out;
        }
        Ok(Some(m)) if m.is_dir() => {}
        Ok(Some(_)) => {
            refuse(&mut out, DIR.into(), "not a directory".into());
            return out;
        }
        Err(e) => {
            refuse(&mut out, DIR.into(), e.to_string());
            return out;
        }
    }
    let listed = root
        .dir(DIR)
        .and_then(|fd| safe_fs::list(fd.as_fd()).map(|names| (fd, names)));
    let (dir, mut names): (_, Vec<String>) = match listed {
        Ok((fd, names)) => (
            fd,
            names
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .collect(),
        ),
        Err(e) => {
            refuse(&mut out, DIR.into(), e.to_string());
            return out;
        }
    };
    names.sort();
    if names.len() > MAX_ENTRIES {
        let over = names.split_off(MAX_ENTRIES);
        refuse(
            &mut out,
            format!("{DIR}/{}", over[0]),
            format!(
                "{} entries, at most {MAX_ENTRIES}: this one and the {} after it are ignored",
                MAX_ENTRIES + over.len(),
                over.len() - 1
            ),
        );
    }
    let mut kept = HashMap::with_capacity(names.len());
    for name in names {
        let rel = format!("{DIR}/{name}");
        let now = match stamp_at(dir.as_fd(), &name) {
            Ok(Some(st)) => st,
            Ok(None) => continue, // removed meanwhile
            Err(e) => {
                refuse(&mut out, rel, e.to_string());
                continue;
            }
        };
        let parsed = match cache.entries.remove(&name) {
            Some((then, parsed)) if then == now => parsed,
            _ => parse_file(dir.as_fd(), &name, acme),
        };
        match &parsed {
            Ok(c) => out.certs.push(c.clone()),
            Err(why) => refuse(&mut out, rel, why.clone()),
        }
        kept.insert(name, (now, parsed));
    }
    cache.entries = kept;
    out
}

/// Reads and parses one entry: a regular file of at most [`MAX_ENTRY_BYTES`], UTF-8.
fn parse_file(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &str,
    acme: Option<&AcmeConfig>,
) -> Result<CertificateConfig, String> {
    use crate::disk::safe_fs;
    use rustix::fs::OFlags;
    let f = safe_fs::open_at(dir, name, OFlags::RDONLY | OFlags::NONBLOCK)
        .map_err(|e| e.to_string())?;
    if !f.metadata().map_err(|e| e.to_string())?.is_file() {
        return Err(format!("{DIR}/{name} is not a regular file"));
    }
    let bytes = safe_fs::read_bounded(&f, MAX_ENTRY_BYTES).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    tree_certs::parse_entry(name, &text, acme)
}

/// Puts the tree's entries into the effective certificates now; returns what was
/// refused. `cache`: what the last load parsed (see [`Cache`]).
pub fn load(settings: &Settings, tree: &Path, cache: &mut Cache) -> Vec<Refused> {
    let acme = settings.read(|c| c.acme.clone()).flatten();
    let t = read_cached(tree, acme.as_ref(), cache);
    if settings.set_tree_certificates(t.certs) {
        let n = settings.read(|c| c.certificates.len()).unwrap_or_default();
        tracing::info!(certificates = n, "the set of certificates changed");
    }
    t.refused
}

/// How long a change to the entries settles before they are read again: a burst of
/// `cert add` is read once.
const SETTLE: Duration = Duration::from_millis(200);

/// Recomputes the effective certificates whenever a change touches
/// `.certmesh/certificates/`; each entry refused is logged and reported once (until
/// it changes).
pub async fn follow(changes: Changes, settings: Settings, reports: Reports, cache: Cache) {
    let cache = std::sync::Arc::new(std::sync::Mutex::new(cache));
    let mut reported: BTreeSet<Refused> = BTreeSet::new();
    let mut rx = changes.subscribe();
    let mut seen = *rx.borrow_and_update();
    let prefix = format!("{DIR}/");
    let mut first = true;
    loop {
        if !first {
            if rx.changed().await.is_err() {
                return;
            }
            let now = *rx.borrow_and_update();
            let touched = changes
                .touched_since(seen)
                .iter()
                .any(|p| p.starts_with(&prefix) || p == DIR);
            seen = now;
            if !touched {
                continue;
            }
            tokio::time::sleep(SETTLE).await;
            seen = *rx.borrow_and_update();
        }
        first = false;
        let (s, root, c) = (
            settings.clone(),
            changes.root().to_path_buf(),
            cache.clone(),
        );
        let Ok(refused) = tokio::task::spawn_blocking(move || match c.lock() {
            Ok(mut c) => load(&s, &root, &mut c),
            Err(_) => load(&s, &root, &mut Cache::default()),
        })
        .await
        else {
            continue;
        };
        let now: BTreeSet<Refused> = refused.into_iter().collect();
        for r in now.difference(&reported) {
            tracing::warn!(path = %r.path, why = %r.why, "certificate entry refused");
            reports.error(format!("certificates: {r}"));
        }
        reported = now;
    }
}

/// Why a `cert` command could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// This node may not change the tree.
    #[error(
        "{node} is a reader (not in tree.writers): its change would be put back to the \
         writers' version; run `certmesh cert` on a writer ({writers})"
    )]
    Reader { node: String, writers: String },
    /// The certificate as given is not acceptable.
    #[error("certificate {name:?}: {why}")]
    Invalid { name: String, why: String },
    /// The name is a `[[certificate]]` block of this node's config.
    #[error(
        "certificate {0:?} is a [[certificate]] block in this node's config, which wins over \
         the tree: change or remove the block instead"
    )]
    InConfig(String),
    /// `remove` of a name the tree does not hold.
    #[error("no certificate {0:?} under {DIR} (see `certmesh cert list`)")]
    NoSuchEntry(String),
    /// The tree could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The certificate `certmesh cert add` describes, checked by the rules every node
/// applies to a tree entry.
pub fn from_args(
    name: &str,
    domains: &[String],
    key: Option<&str>,
    challenge: Option<&str>,
    reuse_key: bool,
) -> Result<CertificateConfig, CertError> {
    let invalid = |why: String| CertError::Invalid {
        name: name.to_string(),
        why,
    };
    if !valid_name(name) {
        return Err(invalid(
            "must be a plain directory name (letters, digits, '.', '-', '_'; not starting with '.')"
                .into(),
        ));
    }
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut text = format!(
        "name = {}\ndomains = [{}]\nreuse_key = {reuse_key}\n",
        q(name),
        domains.iter().map(|d| q(d)).collect::<Vec<_>>().join(", ")
    );
    if let Some(k) = key {
        text.push_str(&format!("key = {}\n", q(k)));
    }
    if let Some(c) = challenge {
        text.push_str(&format!("challenge = {}\n", q(c)));
    }
    tree_certs::parse_entry(&format!("{name}.toml"), &text, None)
        .map_err(|why| invalid(strip_line(&why).to_string()))
}

/// "line 2: domains: ..." without the line (the entry was not typed by anyone).
fn strip_line(why: &str) -> &str {
    match why.strip_prefix("line ") {
        Some(rest) => rest.split_once(": ").map_or(why, |(_, r)| r),
        None => why,
    }
}

/// Refuses on a node `tree.writers` does not list.
pub fn check_writer(c: &Config) -> Result<(), CertError> {
    let Some(writers) = &c.writers else {
        return Ok(());
    };
    let me = crate::identity::Identity::load(&c.state_dir)
        .map_err(|e| CertError::Io {
            path: c.state_dir.display().to_string(),
            source: std::io::Error::other(format!("reading this node's identity: {e}")),
        })?
        .id;
    if writers.iter().any(|w| w.id(me) == me) {
        return Ok(());
    }
    let names: Vec<String> = writers
        .iter()
        .map(|w| match w {
            crate::config::tree::Writer::Peer { name, .. } => name.clone(),
            other => other.id(me).to_string(),
        })
        .collect();
    Err(CertError::Reader {
        node: c.name.clone(),
        writers: names.join(", "),
    })
}

/// `certmesh cert add`: writes `cert`'s entry into the tree (replacing an older one);
/// returns its path.
pub fn add(c: &Config, cert: &CertificateConfig) -> Result<String, CertError> {
    check_writer(c)?;
    if c.configured_certificates()
        .iter()
        .any(|b| b.name == cert.name)
    {
        return Err(CertError::InConfig(cert.name.clone()));
    }
    let text = tree_certs::render_entry(cert);
    let file = format!("{}.toml", cert.name);
    // The same check every node makes when the entry arrives.
    tree_certs::parse_entry(&file, &text, c.acme.as_ref()).map_err(|why| CertError::Invalid {
        name: cert.name.clone(),
        why,
    })?;
    let rel = tree_certs::entry_path(&cert.name);
    let io = |path: &str| {
        let path = path.to_string();
        move |source| CertError::Io { path, source }
    };
    let staging = c.tree.join(crate::core::paths::INTERNAL_DIR).join("tmp");
    make_dir(&staging, 0o700).map_err(io(".certmesh/tmp"))?;
    make_dir(&c.tree.join(DIR), 0o755).map_err(io(DIR))?;
    crate::disk::atomic::replace_via(&staging, &c.tree.join(&rel), text.as_bytes(), 0o644)
        .map_err(io(&rel))?;
    Ok(rel)
}

fn make_dir(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)?;
    if !std::fs::symlink_metadata(p)?.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok(())
}

/// `certmesh cert remove`: deletes `name`'s entry (renewals stop; `live/` and
/// `archive/` stay), and with `purge` its `live/<name>` and `archive/<name>/` too
/// (peers keep what they delete, for `restore`). Returns the paths removed.
pub fn remove(c: &Config, name: &str, purge: bool) -> Result<Vec<String>, CertError> {
    check_writer(c)?;
    if c.configured_certificates().iter().any(|b| b.name == name) {
        return Err(CertError::InConfig(name.to_string()));
    }
    let rel = tree_certs::entry_path(name);
    if !valid_name(name) {
        return Err(CertError::NoSuchEntry(name.to_string()));
    }
    let mut removed = Vec::new();
    let io = |path: &str| {
        let path = path.to_string();
        move |source| CertError::Io { path, source }
    };
    match std::fs::remove_file(c.tree.join(&rel)) {
        Ok(()) => removed.push(rel.clone()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&rel)(e)),
    }
    if purge {
        let live = format!("live/{name}");
        if std::fs::symlink_metadata(c.tree.join(&live)).is_ok() {
            std::fs::remove_file(c.tree.join(&live)).map_err(io(&live))?;
            removed.push(live);
        }
        let archive = format!("archive/{name}");
        if std::fs::symlink_metadata(c.tree.join(&archive)).is_ok() {
            std::fs::remove_dir_all(c.tree.join(&archive)).map_err(io(&archive))?;
            removed.push(archive);
        }
    }
    if removed.is_empty() {
        return Err(CertError::NoSuchEntry(name.to_string()));
    }
    Ok(removed)
}

/// A name `cert` commands accept as part of a path (no separators, no dot first).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// One row of `certmesh cert list`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    pub name: String,
    pub domains: Vec<String>,
    pub source: CertSource,
    /// A tree entry of the same name that a config block overrides.
    pub overrides_tree_entry: bool,
    /// `live/<name>` is in the tree.
    pub live: bool,
}

/// `certmesh cert list`: the effective certificates of this node's config and tree,
/// and the entries refused.
pub fn list(c: &Config) -> (Vec<Listed>, Vec<Refused>) {
    let t = read(&c.tree, c.acme.as_ref());
    let in_tree: BTreeSet<String> = t.certs.iter().map(|e| e.name.clone()).collect();
    let all = tree_certs::effective(&c.configured_certificates(), t.certs);
    let rows = all
        .into_iter()
        .map(|e| Listed {
            live: std::fs::symlink_metadata(c.tree.join("live").join(&e.name)).is_ok(),
            overrides_tree_entry: e.source == CertSource::Config && in_tree.contains(&e.name),
            name: e.name,
            domains: e.domains,
            source: e.source,
        })
        .collect();
    (rows, t.refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(tree: &Path, name: &str, domain: &str) {
        let dir = tree.join(DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!("name = \"{name}\"\ndomains = [\"{domain}\"]\n");
        std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
    }

    fn domains(t: &TreeCerts) -> Vec<String> {
        t.certs.iter().flat_map(|c| c.domains.clone()).collect()
    }

    #[test]
    fn only_changed_entries_are_read_again_and_removed_ones_are_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path();
        write(tree, "a", "a.example");
        write(tree, "b", "b.example");
        let mut cache = Cache::default();
        let t = read_cached(tree, None, &mut cache);
        assert_eq!(domains(&t), ["a.example", "b.example"]);
        // What the cache holds for an unchanged file is used, not the file: mark it.
        if let Some((_, Ok(c))) = cache.entries.get_mut("a.toml") {
            c.domains = vec!["cached.example".into()];
        }
        write(tree, "b", "b2.example");
        std::fs::write(tree.join(DIR).join("c.toml"), "junk").unwrap();
        let t = read_cached(tree, None, &mut cache);
        assert_eq!(domains(&t), ["cached.example", "b2.example"]);
        assert_eq!(t.refused.len(), 1, "{:?}", t.refused);
        assert!(t.refused[0].path.ends_with("c.toml"));
        // Gone from the tree, gone from the cache.
        std::fs::remove_file(tree.join(DIR).join("b.toml")).unwrap();
        let t = read_cached(tree, None, &mut cache);
        assert_eq!(domains(&t), ["cached.example"]);
        assert_eq!(cache.entries.len(), 2);
    }
}
