//! Kept versions: what a peer's change deleted or replaced, kept on this node only,
//! so nothing a peer (or a mistake on one node) does is lost for good.
//!
//! Layout, under `<tree>/.certmesh/kept/` (0700, local-only: never scanned or
//! replicated): `<path>/<unix-nanos:020>-<blake3:16 hex>.kept` is the old content
//! (a hard link to the replaced inode when possible, else a copy) and the same name
//! with `.json` is its [`KeptMeta`]. Bounds, applied whenever a version is kept (and
//! at start): the last [`MAX_VERSIONS_PER_PATH`] versions and [`MAX_AGE`] per path;
//! in total a [`Budget`] (default [`MAX_TOTAL_BYTES`] and [`MAX_TOTAL_VERSIONS`];
//! `[tree] kept_max_size`). Files above [`MAX_FILE_SIZE`] are not kept, nor anything
//! under [`NOT_KEPT`] (challenge tokens and renewal leases churn and are worthless
//! later).
//!
//! # A peer cannot flush what it destroyed
//! Each kept version records who wrote the content it holds (`content_by`: the
//! author of the record it replaced) next to who replaced or deleted it
//! (`modified_by`). The totals evict in two tiers, oldest first within each:
//! 1. *own edits*: content the same node then replaced or deleted (a node rewriting
//!    its own file, e.g. a junk file replaced again and again);
//! 2. *others' work*: content one node wrote and another node destroyed: a writer's
//!    hand-placed `custom/site.pem`, the renewer's `archive/<name>/<n>/` bundle, the
//!    ACME account files, `dhparam.pem`. Evicted only when tier 1 is empty.
//!
//! So whatever a bad node floods the store with is its own edits, and it evicts only
//! its own edits; to grow tier 2 it must destroy other nodes' files, of which there
//! are only as many as honest nodes wrote (each kept once per content: the newest
//! kept version is never duplicated). A bad node that first rewrites another node's
//! file with the same bytes (taking the authorship) keeps that file's version
//! in tier 2 at that moment: an authorship change alone keeps a version. This holds
//! for every path, so it needs no list of what matters and covers files that are not
//! configured certificates. What it cannot protect is content the destroying node
//! wrote itself (a bad renewer's own last bundle): that node could as well never
//! have written it. Authorship is the record's `modified_by` as the real `certmesh`
//! sets it, signed when `[tree] writers` is set.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::device::ShortId;
use crate::core::paths::{RelPath, INTERNAL_DIR};
use crate::core::record::{FileRecord, Kind};

/// Versions kept per path (newest first; older ones are pruned).
pub const MAX_VERSIONS_PER_PATH: usize = 5;
/// A kept version older than this is pruned.
pub const MAX_AGE: Duration = Duration::from_secs(30 * 86_400);
/// Files larger than this are not kept.
pub const MAX_FILE_SIZE: u64 = 64 << 20;
/// All kept content together, at most (oldest pruned first).
pub const MAX_TOTAL_BYTES: u64 = 256 << 20;
/// All kept versions together, at most (oldest pruned first).
pub const MAX_TOTAL_VERSIONS: usize = 10_000;
/// A metadata file larger than this is refused.
pub const MAX_META: usize = 16 << 10;
/// Most version-vector entries a metadata file may hold.
const MAX_META_COUNTERS: usize = 4096;
/// Paths never kept: http-01 tokens, renewal leases, the dns-01 record lists.
pub const NOT_KEPT: [&str; 3] = ["acme/", ".certmesh/leases/", ".certmesh/acme/dns/"];
/// The whole store is checked against the totals after this many versions or bytes
/// kept since the last check (and at start); per-path bounds are applied every time.
const TOTALS_EVERY: u64 = 64;
const TOTALS_EVERY_BYTES: u64 = 16 << 20;

const CONTENT_EXT: &str = "kept";
const META_EXT: &str = "json";

/// Why a version was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// A peer's change replaced the file (new content, or a link or directory).
    Replaced,
    /// A peer's change deleted it.
    Deleted,
}

/// What is known about one kept version (`<name>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptMeta {
    /// The path in the tree.
    pub path: String,
    /// Mode bits the file had.
    pub mode: u32,
    pub size: u64,
    /// BLAKE3 of the content, 64 hex digits.
    pub blake3: String,
    /// When it was kept, unix nanoseconds.
    pub kept_at_ns: i64,
    pub reason: Reason,
    /// Short ID (16 hex digits) of the device that made the change that replaced it
    /// (the record's `modified_by`).
    pub modified_by: String,
    /// The version vector of that change: short ID (hex) → counter.
    pub record_version: BTreeMap<String, u64>,
    /// Short ID (16 hex digits) of the device that wrote the kept content (the
    /// author of the record it replaced). Absent in versions kept before this field
    /// existed: counted as another node's work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_by: Option<String>,
}

impl KeptMeta {
    /// Content one device wrote and another replaced or deleted: evicted last.
    pub fn is_others_work(&self) -> bool {
        self.content_by
            .as_ref()
            .is_none_or(|by| !by.eq_ignore_ascii_case(&self.modified_by))
    }
}

/// Bounds on all kept versions together (`[tree] kept_max_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Kept content, in bytes.
    pub max_bytes: u64,
    /// Kept versions.
    pub max_versions: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_bytes: MAX_TOTAL_BYTES,
            max_versions: MAX_TOTAL_VERSIONS,
        }
    }
}

/// Why metadata was refused.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// More than [`MAX_META`] bytes.
    #[error("metadata of {0} bytes, at most {MAX_META}")]
    TooLarge(usize),
    /// Not the JSON this module writes.
    #[error("metadata: {0}")]
    Json(#[from] serde_json::Error),
    /// A field out of range.
    #[error("metadata: bad {field}: {why}")]
    Field { field: &'static str, why: String },
}

/// Parses and validates a metadata file. Never panics, whatever the bytes.
pub fn parse_meta(data: &[u8]) -> Result<KeptMeta, MetaError> {
    if data.len() > MAX_META {
        return Err(MetaError::TooLarge(data.len()));
    }
    let m: KeptMeta = serde_json::from_slice(data)?;
    let bad = |field, why: String| Err(MetaError::Field { field, why });
    if let Err(e) = RelPath::parse(&m.path) {
        return bad("path", e.to_string());
    }
    if m.mode > 0o7777 {
        return bad("mode", format!("{:o}", m.mode));
    }
    if m.size > MAX_FILE_SIZE {
        return bad("size", m.size.to_string());
    }
    if !is_hex(&m.blake3, 64) {
        return bad("blake3", "not 64 hex digits".into());
    }
    if !is_hex(&m.modified_by, 16) {
        return bad("modified_by", "not 16 hex digits".into());
    }
    if m.record_version.len() > MAX_META_COUNTERS || m.record_version.keys().any(|k| !is_hex(k, 16))
    {
        return bad("record_version", "too many or malformed device keys".into());
    }
    if m.content_by.as_ref().is_some_and(|c| !is_hex(c, 16)) {
        return bad("content_by", "not 16 hex digits".into());
    }
    Ok(m)
}

/// The bytes of a metadata file, as [`parse_meta`] reads them.
pub fn to_meta_bytes(m: &KeptMeta) -> Result<Vec<u8>, MetaError> {
    Ok(serde_json::to_vec(m)?)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A short device ID as stored in metadata.
pub fn short_hex(id: ShortId) -> String {
    format!("{:016x}", id.0)
}

/// One kept version of a path.
#[derive(Debug, Clone)]
pub struct KeptVersion {
    pub path: RelPath,
    /// The kept content.
    pub content: PathBuf,
    pub kept_at_ns: i64,
    pub size: u64,
    /// `None` when the metadata file is missing or unreadable (the content is still
    /// there and can be restored).
    pub meta: Option<KeptMeta>,
}

impl KeptVersion {
    /// The kept content, at most [`MAX_FILE_SIZE`] bytes.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.content)?;
        let mut out = Vec::new();
        f.take(MAX_FILE_SIZE + 1).read_to_end(&mut out)?;
        if out.len() as u64 > MAX_FILE_SIZE {
            return Err(io::Error::other("kept file larger than the bound"));
        }
        Ok(out)
    }
}

/// `<tree>/.certmesh/kept`.
pub fn kept_root(tree: &Path) -> PathBuf {
    tree.join(INTERNAL_DIR).join("kept")
}

/// Whether versions of `p` are kept at all.
pub fn is_kept(p: &RelPath) -> bool {
    !p.is_local_only() && !NOT_KEPT.iter().any(|x| p.as_str().starts_with(x))
}

/// Called by apply right before a peer's record replaces or deletes what is at
/// `record.path`: keeps the regular file there, if any. `replaces_content`: the
/// record brings new content (not only a mode or mtime change). `content_by`: the
/// author of the local record being replaced; a change of author alone keeps a
/// version too (see the module doc). Never fails the apply: problems are logged.
pub fn before_apply(
    tree: &Path,
    record: &FileRecord,
    replaces_content: bool,
    existing: Option<&fs::Metadata>,
    content_by: Option<ShortId>,
    budget: Budget,
) {
    let Some(m) = existing else { return };
    let new_author = content_by.is_some_and(|a| a != record.modified_by);
    let replaced = record.deleted || record.kind != Kind::File || replaces_content || new_author;
    if !m.is_file() || !replaced || !is_kept(&record.path) || m.len() > MAX_FILE_SIZE {
        return;
    }
    let cause = Cause {
        reason: if record.deleted {
            Reason::Deleted
        } else {
            Reason::Replaced
        },
        modified_by: record.modified_by,
        version: record
            .version
            .pairs()
            .iter()
            .map(|(d, c)| (short_hex(*d), *c))
            .collect(),
        content_by,
    };
    match keep(tree, &record.path, &cause, crate::clock::now_ns(), budget) {
        Ok(Some(v)) => {
            tracing::info!(path = %record.path, kept = %v.content.display(), by = %cause_name(&cause), "kept the version a peer's change replaced")
        }
        Ok(None) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %record.path, error = %e, "could not keep the replaced version")
        }
    }
}

fn cause_name(c: &Cause) -> String {
    short_hex(c.modified_by)
}

/// Who and what replaced a version.
#[derive(Debug, Clone)]
pub struct Cause {
    pub reason: Reason,
    pub modified_by: ShortId,
    pub version: BTreeMap<String, u64>,
    /// Who wrote the content being kept, when known.
    pub content_by: Option<ShortId>,
}

static KEPT_SINCE_TOTALS: AtomicU64 = AtomicU64::new(0);
static BYTES_SINCE_TOTALS: AtomicU64 = AtomicU64::new(0);

/// Keeps the regular file now at `path` (hard link, else copy). `None` when it is
/// the same content as the newest kept version, or too large.
pub fn keep(
    tree: &Path,
    path: &RelPath,
    cause: &Cause,
    now_ns: i64,
    budget: Budget,
) -> io::Result<Option<KeptVersion>> {
    let root = kept_root(tree);
    let dir = path.under(&root);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
    let full = path.under(tree);
    // link() does not follow a symlink at `full`; the copy refuses one.
    if fs::hard_link(&full, &tmp).is_err() {
        copy_nofollow(&full, &tmp)?;
    }
    let result = finish_keep(&dir, &tmp, path, cause, now_ns);
    let _ = fs::remove_file(&tmp);
    let kept = result?;
    if let Some(v) = &kept {
        prune_path(&dir, path, now_ns)?;
        let n = KEPT_SINCE_TOTALS.fetch_add(1, Ordering::Relaxed) + 1;
        let b = BYTES_SINCE_TOTALS.fetch_add(v.size, Ordering::Relaxed) + v.size;
        // A small budget is checked more often, so it holds within a quarter.
        let every_bytes = TOTALS_EVERY_BYTES.min(budget.max_bytes / 4);
        let every = TOTALS_EVERY.min(budget.max_versions as u64 / 4).max(1);
        if n >= every || b >= every_bytes {
            prune_all(tree, now_ns, budget)?;
        }
    }
    Ok(kept)
}

fn finish_keep(
    dir: &Path,
    tmp: &Path,
    path: &RelPath,
    cause: &Cause,
    now_ns: i64,
) -> io::Result<Option<KeptVersion>> {
    let m = fs::symlink_metadata(tmp)?;
    if !m.is_file() || m.len() > MAX_FILE_SIZE {
        return Ok(None);
    }
    let mut hasher = blake3::Hasher::new();
    let mut f = fs::File::open(tmp)?;
    io::copy(&mut f, &mut hasher)?;
    let hash = hasher.finalize().to_hex().to_string();
    if versions_in(dir, path)?
        .first()
        .and_then(|v| v.meta.as_ref())
        .is_some_and(|meta| meta.blake3 == hash)
    {
        return Ok(None); // already kept
    }
    use std::os::unix::fs::PermissionsExt;
    let meta = KeptMeta {
        path: path.as_str().to_string(),
        mode: m.permissions().mode() & 0o7777,
        size: m.len(),
        blake3: hash.clone(),
        kept_at_ns: now_ns,
        reason: cause.reason,
        modified_by: short_hex(cause.modified_by),
        record_version: cause.version.clone(),
        content_by: cause.content_by.map(short_hex),
    };
    let stem = format!("{:020}-{}", now_ns.max(0), &hash[..16]);
    let content = dir.join(format!("{stem}.{CONTENT_EXT}"));
    let meta_tmp = dir.join(format!(".tmp-{stem}.{META_EXT}"));
    let json = to_meta_bytes(&meta).map_err(io::Error::other)?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&meta_tmp)
        .and_then(|mut f| io::Write::write_all(&mut f, &json))?;
    fs::rename(&meta_tmp, dir.join(format!("{stem}.{META_EXT}")))?;
    fs::rename(tmp, &content)?;
    Ok(Some(KeptVersion {
        path: path.clone(),
        content,
        kept_at_ns: now_ns,
        size: m.len(),
        meta: Some(meta),
    }))
}

fn copy_nofollow(from: &Path, to: &Path) -> io::Result<()> {
    let src = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)?;
    if !src.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    io::copy(&mut src.take(MAX_FILE_SIZE + 1), &mut dst)?;
    Ok(())
}

/// `<nanos>-<hash16>` from a content file name.
fn parse_stem(name: &str) -> Option<i64> {
    let stem = name.strip_suffix(&format!(".{CONTENT_EXT}"))?;
    let (nanos, hash) = stem.split_once('-')?;
    if nanos.len() != 20 || !nanos.bytes().all(|b| b.is_ascii_digit()) || !is_hex(hash, 16) {
        return None;
    }
    nanos.parse().ok()
}

/// The versions in one path's directory, newest first.
fn versions_in(dir: &Path, path: &RelPath) -> io::Result<Vec<KeptVersion>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(nanos) = name.to_str().and_then(parse_stem) else {
            continue;
        };
        let Ok(m) = e.metadata() else { continue };
        if !m.is_file() {
            continue;
        }
        let content = e.path();
        let meta = fs::read(content.with_extension(META_EXT))
            .ok()
            .and_then(|d| parse_meta(&d).ok())
            .filter(|meta| meta.path == path.as_str());
        out.push(KeptVersion {
            path: path.clone(),
            content,
            kept_at_ns: nanos,
            size: m.len(),
            meta,
        });
    }
    out.sort_by(|a, b| b.content.cmp(&a.content));
    Ok(out)
}

/// Kept versions of `path`, newest first.
pub fn list(tree: &Path, path: &RelPath) -> io::Result<Vec<KeptVersion>> {
    versions_in(&path.under(&kept_root(tree)), path)
}

/// Every path with at least one kept version, sorted.
pub fn list_paths(tree: &Path) -> io::Result<Vec<RelPath>> {
    let root = kept_root(tree);
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let mut has_version = false;
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name().to_str().and_then(parse_stem).is_some() {
                has_version = true;
            }
        }
        if has_version {
            if let Some(p) = RelPath::from_fs(&root, &dir) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn remove_version(v: &KeptVersion) {
    let _ = fs::remove_file(v.content.with_extension(META_EXT));
    let _ = fs::remove_file(&v.content);
}

fn too_old(v: &KeptVersion, now_ns: i64) -> bool {
    now_ns.saturating_sub(v.kept_at_ns) > MAX_AGE.as_nanos() as i64
}

/// Applies the per-path bounds to one path's directory.
fn prune_path(dir: &Path, path: &RelPath, now_ns: i64) -> io::Result<usize> {
    let mut removed = 0;
    for (i, v) in versions_in(dir, path)?.iter().enumerate() {
        if i >= MAX_VERSIONS_PER_PATH || too_old(v, now_ns) {
            remove_version(v);
            removed += 1;
        }
    }
    Ok(removed)
}

/// Applies every bound to the whole store: per path, then the totals: own edits
/// first, then others' work, oldest first in each (module doc). Returns how many
/// versions were removed.
pub fn prune_all(tree: &Path, now_ns: i64, budget: Budget) -> io::Result<usize> {
    KEPT_SINCE_TOTALS.store(0, Ordering::Relaxed);
    BYTES_SINCE_TOTALS.store(0, Ordering::Relaxed);
    let mut removed = 0;
    let mut all = Vec::new();
    for p in list_paths(tree)? {
        let dir = p.under(&kept_root(tree));
        removed += prune_path(&dir, &p, now_ns)?;
        all.extend(versions_in(&dir, &p)?);
    }
    // What is kept longest comes first: others' work, then newest first.
    let others = |v: &KeptVersion| v.meta.as_ref().is_none_or(KeptMeta::is_others_work);
    all.sort_by_key(|v| (!others(v), std::cmp::Reverse(v.kept_at_ns)));
    let mut bytes = 0u64;
    for (i, v) in all.iter().enumerate() {
        bytes = bytes.saturating_add(v.size);
        if i >= budget.max_versions || bytes > budget.max_bytes {
            remove_version(v);
            removed += 1;
        }
    }
    Ok(removed)
}

/// Why `restore` failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Nothing kept for this path.
    #[error("{0}: no kept version (`certmesh restore --list` shows what is kept)")]
    NothingKept(RelPath),
    /// `--version` beyond what is kept.
    #[error("{path}: version {asked} asked, {have} kept (1 is the newest)")]
    NoSuchVersion {
        path: RelPath,
        asked: usize,
        have: usize,
    },
    /// Reading the kept copy or writing the tree failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes kept version `n` (1 = newest) of `path` back into the tree, atomically
/// (staged under `.certmesh/tmp/`, fsynced, renamed into place). A running daemon's
/// watcher sees it as a local change, which replicates.
pub fn restore(tree: &Path, path: &RelPath, n: usize) -> Result<KeptVersion, RestoreError> {
    let versions = list(tree, path)?;
    if versions.is_empty() {
        return Err(RestoreError::NothingKept(path.clone()));
    }
    let v = n
        .checked_sub(1)
        .and_then(|i| versions.get(i))
        .ok_or_else(|| RestoreError::NoSuchVersion {
            path: path.clone(),
            asked: n,
            have: versions.len(),
        })?;
    let data = v.read()?;
    // Never world-writable; a private key (by content) never readable by others.
    // The same clamp as a peer's change gets (apply.rs): at most 0755.
    let mut mode = v.meta.as_ref().map_or(0o600, |m| m.mode) & 0o755;
    let mut keys = crate::disk::safe_fs::KeyScanner::new();
    keys.feed(&data);
    if keys.found() {
        mode &= !0o007;
    }
    let staging = tree.join(crate::core::paths::INTERNAL_DIR).join("tmp");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&staging)?;
    make_parents(tree, path)?;
    crate::disk::atomic::replace_via(&staging, &path.under(tree), &data, mode)?;
    Ok(v.clone())
}

/// Creates missing parents of `path` (0755); refuses one that is not a real directory.
fn make_parents(tree: &Path, path: &RelPath) -> io::Result<()> {
    let mut chain = Vec::new();
    let mut anc = path.parent();
    while let Some(a) = anc {
        anc = a.parent();
        chain.push(a);
    }
    for a in chain.iter().rev() {
        let full = a.under(tree);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(io::Error::other(format!("{a} is not a directory"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new().mode(0o755).create(&full)?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::ContentHash;
    use crate::core::version::VersionVector;

    const DAY: i64 = 86_400 * 1_000_000_000;

    fn cause() -> Cause {
        Cause {
            reason: Reason::Replaced,
            modified_by: ShortId(0xabcd),
            version: [(short_hex(ShortId(0xabcd)), 3)].into_iter().collect(),
            content_by: None,
        }
    }

    /// As apply does it: a new inode renamed over the old one (a kept hard link
    /// would see an in-place write).
    fn replace(p: &Path, data: &str) {
        let tmp = p.with_extension("tmp-test");
        fs::write(&tmp, data).unwrap();
        fs::rename(tmp, p).unwrap();
    }

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("tree");
        fs::create_dir_all(&t).unwrap();
        (d, t)
    }

    #[test]
    fn keeps_by_link_newest_first_and_bounded_per_path() {
        let (_d, t) = tree();
        let p = RelPath::parse("dhparam.pem").unwrap();
        for i in 0..7i64 {
            replace(&t.join("dhparam.pem"), &format!("v{i}"));
            let v = keep(&t, &p, &cause(), 1_000 + i, Budget::default())
                .unwrap()
                .unwrap();
            assert_eq!(v.meta.as_ref().unwrap().modified_by, "000000000000abcd");
            // Same content again: not kept twice.
            assert!(keep(&t, &p, &cause(), 2_000 + i, Budget::default())
                .unwrap()
                .is_none());
        }
        let vs = list(&t, &p).unwrap();
        assert_eq!(vs.len(), MAX_VERSIONS_PER_PATH);
        let got: Vec<Vec<u8>> = vs.iter().map(|v| v.read().unwrap()).collect();
        assert_eq!(got[0], b"v6");
        assert_eq!(got[4], b"v2");
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(t.join("dhparam.pem")).unwrap().ino();
        assert_eq!(
            fs::metadata(&vs[0].content).unwrap().ino(),
            ino,
            "not a hard link"
        );
        assert_eq!(list_paths(&t).unwrap(), vec![p]);
    }

    #[test]
    fn old_versions_and_totals_are_pruned_oldest_first() {
        let (_d, t) = tree();
        let a = RelPath::parse("a/old.pem").unwrap();
        let b = RelPath::parse("b.pem").unwrap();
        fs::create_dir_all(t.join("a")).unwrap();
        fs::write(t.join("a/old.pem"), "old").unwrap();
        keep(&t, &a, &cause(), 1, Budget::default())
            .unwrap()
            .unwrap();
        fs::write(t.join("b.pem"), "new").unwrap();
        keep(&t, &b, &cause(), 31 * DAY, Budget::default())
            .unwrap()
            .unwrap();
        assert_eq!(prune_all(&t, 31 * DAY + 1, Budget::default()).unwrap(), 1);
        assert!(list(&t, &a).unwrap().is_empty());
        assert_eq!(list(&t, &b).unwrap().len(), 1);
    }

    /// Kept because `by` replaced content `content_by` wrote.
    fn cause_by(by: u64, content_by: u64) -> Cause {
        Cause {
            content_by: Some(ShortId(content_by)),
            modified_by: ShortId(by),
            ..cause()
        }
    }

    #[test]
    fn a_flood_of_own_edits_never_evicts_what_another_node_wrote() {
        let (_d, t) = tree();
        let site = RelPath::parse("site.pem").unwrap();
        fs::write(t.join("site.pem"), "the writer's certificate").unwrap();
        // Node 0xbad deletes node 0x600d's file, then floods: a junk file it wrote,
        // replaced again and again, across many paths, far past the budget.
        keep(&t, &site, &cause_by(0xbad, 0x600d), 1, Budget::default())
            .unwrap()
            .unwrap();
        let budget = Budget {
            max_bytes: 4096,
            max_versions: 8,
        };
        for i in 0..40i64 {
            let junk = RelPath::parse(&format!("junk{}", i % 10)).unwrap();
            replace(&t.join(junk.as_str()), &format!("{i:0>1000}"));
            keep(&t, &junk, &cause_by(0xbad, 0xbad), 10 + i, budget).unwrap();
        }
        prune_all(&t, 100, budget).unwrap();
        let kept = list(&t, &site).unwrap();
        assert_eq!(kept.len(), 1, "the flood evicted another node's work");
        assert_eq!(kept[0].read().unwrap(), b"the writer's certificate");
        let total: usize = list_paths(&t)
            .unwrap()
            .iter()
            .map(|p| list(&t, p).unwrap().len())
            .sum();
        assert!(total <= budget.max_versions, "{total} versions kept");
    }

    #[test]
    fn taking_the_authorship_of_unchanged_content_keeps_it_as_the_authors() {
        let (_d, t) = tree();
        fs::write(t.join("dhparam.pem"), "DH").unwrap();
        let m = fs::metadata(t.join("dhparam.pem")).unwrap();
        let r = FileRecord {
            path: RelPath::parse("dhparam.pem").unwrap(),
            kind: Kind::File,
            size: 2,
            mode: 0o644,
            mtime_ns: 5,
            hash: ContentHash::default(),
            target: String::new(),
            version: VersionVector::from_pairs(vec![(ShortId(0xbad), 1)]),
            deleted: false,
            modified_by: ShortId(0xbad),
            auth: None,
        };
        // Same bytes, only the author changes: kept, as the old author's work.
        before_apply(
            &t,
            &r,
            false,
            Some(&m),
            Some(ShortId(0x600d)),
            Budget::default(),
        );
        let v = list(&t, &r.path).unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].meta.as_ref().unwrap().is_others_work());
        // Its later deletion by the new author does not add an own-edit copy.
        let del = FileRecord {
            deleted: true,
            ..r.clone()
        };
        before_apply(
            &t,
            &del,
            false,
            Some(&m),
            Some(ShortId(0xbad)),
            Budget::default(),
        );
        assert_eq!(list(&t, &r.path).unwrap().len(), 1);
    }

    #[test]
    fn acme_and_large_files_are_not_kept() {
        let (_d, t) = tree();
        fs::create_dir_all(t.join("acme/.well-known/acme-challenge")).unwrap();
        fs::write(t.join("acme/.well-known/acme-challenge/tok"), "k").unwrap();
        let mut r = FileRecord {
            path: RelPath::parse("acme/.well-known/acme-challenge/tok").unwrap(),
            kind: Kind::File,
            size: 0,
            mode: 0o644,
            mtime_ns: 0,
            hash: ContentHash::default(),
            target: String::new(),
            version: VersionVector::from_pairs(vec![(ShortId(7), 2)]),
            deleted: true,
            modified_by: ShortId(7),
            auth: None,
        };
        let m = fs::metadata(t.join(r.path.as_str())).unwrap();
        before_apply(&t, &r, false, Some(&m), None, Budget::default());
        assert!(list_paths(&t).unwrap().is_empty());
        fs::write(t.join("f"), "x").unwrap();
        r.path = RelPath::parse("f").unwrap();
        let m = fs::metadata(t.join("f")).unwrap();
        r.deleted = false;
        before_apply(&t, &r, false, Some(&m), None, Budget::default()); // mode-only change: nothing kept
        assert!(list_paths(&t).unwrap().is_empty());
        before_apply(&t, &r, true, Some(&m), None, Budget::default());
        let v = list(&t, &r.path).unwrap();
        assert_eq!(
            v[0].meta.as_ref().unwrap().record_version["0000000000000007"],
            2
        );
    }

    #[test]
    fn metadata_parser_refuses_garbage() {
        let good = KeptMeta {
            path: "live/x/privkey.pem".into(),
            mode: 0o640,
            size: 3,
            blake3: "a".repeat(64),
            kept_at_ns: 5,
            reason: Reason::Deleted,
            modified_by: "0".repeat(16),
            record_version: BTreeMap::new(),
            content_by: Some("1".repeat(16)),
        };
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(parse_meta(&bytes).unwrap(), good);
        for bad in [
            &b""[..],
            b"{}",
            b"[1,2]",
            br#"{"path":"../x","mode":0,"size":0,"blake3":"","kept_at_ns":0,"reason":"deleted","modified_by":"","record_version":{}}"#,
        ] {
            assert!(parse_meta(bad).is_err());
        }
        let mut m = good.clone();
        m.mode = 0o17777;
        assert!(parse_meta(&serde_json::to_vec(&m).unwrap()).is_err());
        assert!(parse_meta(&vec![b' '; MAX_META + 1]).is_err());
    }

    #[test]
    fn restore_brings_back_a_version_atomically() {
        let (_d, t) = tree();
        let p = RelPath::parse("archive/x/1/privkey.pem").unwrap();
        fs::create_dir_all(t.join("archive/x/1")).unwrap();
        fs::write(t.join(p.as_str()), "-----BEGIN PRIVATE KEY-----\nold").unwrap();
        keep(&t, &p, &cause(), 10, Budget::default())
            .unwrap()
            .unwrap();
        fs::remove_dir_all(t.join("archive")).unwrap();
        assert!(matches!(
            restore(&t, &p, 2),
            Err(RestoreError::NoSuchVersion { have: 1, .. })
        ));
        restore(&t, &p, 1).unwrap();
        let back = fs::read_to_string(t.join(p.as_str())).unwrap();
        assert!(back.ends_with("old"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(t.join(p.as_str()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o007, 0);
        let other = RelPath::parse("nothing").unwrap();
        assert!(matches!(
            restore(&t, &other, 1),
            Err(RestoreError::NothingKept(_))
        ));
    }
}
