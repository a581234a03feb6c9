//! Writing a batch of records into the tree as a unit: every file is staged under
//! `.certmesh/tmp/` (content verified, mode set, fsynced), then everything is renamed
//! into place, directories first and symlinks last, then the touched directories are
//! fsynced. A path changed locally since the last scan is never clobbered; a path is
//! never reached through a symlink (everything goes through [`crate::disk::safe_fs`], relative
//! to the tree's directory handle); a link is created only when its target is on disk
//! and reached through real directories; modes are clamped whatever the peer sent
//! (nothing world-writable, directories at most 0755, a file holding a PEM private key,
//! found by content, never readable by others).

use std::collections::BTreeSet;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::OFlags;

use crate::core::index::LocalStat;
use crate::core::paths::{RelPath, INTERNAL_DIR};
use crate::core::record::{FileRecord, Kind};
use crate::core::secret;
use crate::disk::safe_fs::{self, KeyScanner, LinkError, Root};
use crate::disk::scan::local_stat;

/// Above this many staged files, one `syncfs` replaces per-file fsyncs.
const SYNCFS_THRESHOLD: usize = 32;

/// One record to apply.
#[derive(Debug)]
pub struct Item {
    pub record: FileRecord,
    /// For files: the verified content, staged under `.certmesh/tmp/`.
    pub staged: Option<PathBuf>,
    /// What the index believes is on disk now (`None`: nothing). A mismatch means an
    /// unscanned local change: the item is skipped and the scan decides.
    pub expect: Option<LocalStat>,
    /// The local content lost a conflict: keep it under `.certmesh/conflicts/`.
    pub conflict: bool,
    /// Who wrote what the record replaces (the local record's author), for the
    /// kept version ([`crate::disk::keep::before_apply`]).
    pub replaces_author: Option<crate::core::device::ShortId>,
}

use crate::core::pipeline::Outcome;

/// What applying one batch did: an outcome per item, in the order of the items, and
/// how many local losers of a conflict were kept under `.certmesh/conflicts/`. The
/// caller counts them for metrics.
#[derive(Debug)]
pub struct AppliedBatch {
    pub outcomes: Vec<Outcome>,
    pub conflicts_kept: usize,
}

/// The tree root and its staging area.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: PathBuf,
    /// Bounds on the versions kept of what peers' changes replace.
    pub kept: crate::disk::keep::Budget,
}

impl Tree {
    pub fn new(root: PathBuf) -> Self {
        Tree {
            root,
            kept: crate::disk::keep::Budget::default(),
        }
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(INTERNAL_DIR).join("tmp")
    }

    fn conflicts_dir(&self) -> PathBuf {
        self.root.join(INTERNAL_DIR).join("conflicts")
    }

    /// Creates the internal dirs and removes staging leftovers of a crash. The root
    /// itself must exist: it is never created (a typo'd path would become a tree).
    pub fn prepare(&self) -> io::Result<()> {
        if !self.root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", self.root.display()),
            ));
        }
        // `.certmesh/` holds the shared ACME account: private to this user, whatever
        // mode it was given (by hand, or by a peer before this version).
        let internal = self.root.join(INTERNAL_DIR);
        if fs::symlink_metadata(&internal).is_ok_and(|m| m.is_dir()) {
            fs::set_permissions(&internal, fs::Permissions::from_mode(0o700))?;
        }
        let tmp = self.tmp_dir();
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.conflicts_dir())?;
        Ok(())
    }

    /// A fresh staging path.
    pub fn staging_path(&self) -> PathBuf {
        self.tmp_dir()
            .join(format!("{:016x}", rand::random::<u64>()))
    }

    /// Stages content held in memory (0600 until its final mode is set).
    pub fn stage_bytes(&self, data: &[u8]) -> io::Result<PathBuf> {
        use std::io::Write;
        let p = self.staging_path();
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)?;
        if let Err(e) = f.write_all(data) {
            let _ = fs::remove_file(&p);
            return Err(e);
        }
        Ok(p)
    }

    /// Applies a batch: what each item came to, in the order of `items`.
    pub fn apply(&self, items: &[Item]) -> AppliedBatch {
        let h = match OpenDirs::open(self) {
            Ok(h) => h,
            Err(e) => {
                return AppliedBatch {
                    outcomes: items
                        .iter()
                        .map(|_| Outcome::Failed(format!("opening the tree: {e}")))
                        .collect(),
                    conflicts_kept: 0,
                }
            }
        };
        let mut out: Vec<Option<Outcome>> = items.iter().map(|_| None).collect();
        let mut dirty_dirs: BTreeSet<String> = BTreeSet::new();

        // 1. Finish staging: final mode and mtime, then make the content durable.
        let staged: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].staged.is_some())
            .collect();
        for &i in &staged {
            if let Err(e) = self.finish_staged(&h, &items[i]) {
                out[i] = Some(Outcome::Failed(format!(
                    "staging {}: {e}",
                    items[i].record.path
                )));
            }
        }
        let sync_result = if staged.len() > SYNCFS_THRESHOLD {
            syncfs(h.tmp.as_fd())
        } else {
            staged
                .iter()
                .filter(|&&i| out[i].is_none())
                .try_for_each(|&i| {
                    let name = self.staged_name(items[i].staged.as_deref())?;
                    safe_fs::open_at(h.tmp.as_fd(), name, OFlags::RDONLY)?.sync_all()
                })
        };
        tracing::trace!(target: crate::clock::STAGE, stage = "fsynced", t_us = crate::clock::mono_us());
        if let Err(e) = sync_result {
            for &i in &staged {
                out[i].get_or_insert(Outcome::Failed(format!("fsync: {e}")));
            }
        }

        // 2. Directories (shallow first), files, symlinks; deletions deepest first.
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| {
            let r = &items[i].record;
            let depth = r.path.depth() as i64;
            match (r.deleted, r.kind) {
                (false, Kind::Directory) => (0, depth),
                (false, Kind::File) => (1, depth),
                (false, Kind::Symlink) => (2, depth),
                (true, _) => (3, -depth),
            }
        });
        for i in order {
            let item = &items[i];
            if out[i].is_none() && item.record.kind == Kind::Symlink && !item.record.deleted {
                // A link flips only once everything under its target is in place, so
                // `live/<name>` never shows a half-written archive version.
                if let Ok(target) = item.record.path.resolve_symlink_target(&item.record.target) {
                    let incomplete = items.iter().zip(&out).any(|(other, o)| {
                        other.record.path.is_within(&target)
                            && !matches!(o, Some(Outcome::Applied(_)))
                    });
                    if incomplete {
                        out[i] = Some(Outcome::Deferred(format!(
                            "{}: target {target} not complete yet",
                            item.record.path
                        )));
                    }
                }
            }
            if out[i].is_some() {
                continue;
            }
            let res = self.apply_one(&h, item, &mut dirty_dirs);
            out[i] = Some(match res {
                Ok(o) => o,
                Err(e) => Outcome::Failed(format!("{}: {e}", item.record.path)),
            });
        }
        tracing::trace!(target: crate::clock::STAGE, stage = "renamed", t_us = crate::clock::mono_us());
        // 3. Make the renames durable.
        for d in &dirty_dirs {
            if let Err(e) = h.root.dir(d).and_then(|fd| File::from(fd).sync_all()) {
                tracing::warn!(dir = %d, error = %e, "fsync of directory failed");
            }
        }
        tracing::trace!(target: crate::clock::STAGE, stage = "dirs_synced", t_us = crate::clock::mono_us());
        // Failed staged files must not linger.
        for item in items {
            if let Ok(name) = self.staged_name(item.staged.as_deref()) {
                let _ = safe_fs::unlink_at(h.tmp.as_fd(), name, false);
            }
        }
        AppliedBatch {
            outcomes: out
                .into_iter()
                .map(|o| o.unwrap_or(Outcome::Failed("not applied".into())))
                .collect(),
            conflicts_kept: h.conflicts_kept.get(),
        }
    }

    /// The name of a staged file inside `.certmesh/tmp/` (staging is only ever there).
    fn staged_name<'a>(&self, staged: Option<&'a Path>) -> io::Result<&'a str> {
        let p = staged.ok_or_else(|| io::Error::other("nothing staged"))?;
        if p.parent() != Some(self.tmp_dir().as_path()) {
            return Err(io::Error::other(format!(
                "{} is not in the staging directory",
                p.display()
            )));
        }
        p.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::other("staging name is not UTF-8"))
    }

    /// The mode a file record gets here, whatever the peer sent: no setuid, setgid or
    /// sticky bit, nothing group- or world-writable; a private key (by name or by content) never
    /// readable by others; an already-private file never readable by group or others.
    fn local_mode(&self, r: &FileRecord, existing: Option<&Metadata>, holds_key: bool) -> u32 {
        let private = r.path.is_private_state()
            || existing.is_some_and(|m| m.is_file() && m.permissions().mode() & 0o077 == 0);
        clamp_file_mode(r.mode, r.path.is_private_key() || holds_key, private)
    }

    /// Sets the staged file's final mode and mtime (content scanned for a key first).
    fn finish_staged(&self, h: &OpenDirs, item: &Item) -> io::Result<()> {
        let name = self.staged_name(item.staged.as_deref())?;
        let existing = h.root.lstat(item.record.path.as_str()).ok().flatten();
        let f = safe_fs::open_at(h.tmp.as_fd(), name, OFlags::RDONLY)?;
        self.set_mode_and_mtime(&f, &item.record, existing.as_ref())
    }

    /// `fchmod` + `futimens` on an open file, its mode clamped by [`Self::local_mode`].
    fn set_mode_and_mtime(
        &self,
        f: &File,
        r: &FileRecord,
        existing: Option<&Metadata>,
    ) -> io::Result<()> {
        let mut mode = self.local_mode(r, existing, false);
        // Only read the content when it could still loosen something.
        if mode & 0o007 != 0 && holds_key(f)? {
            mode = self.local_mode(r, existing, true);
        }
        safe_fs::chmod_fd(f.as_fd(), mode)?;
        f.set_modified(to_system_time(r.mtime_ns))
    }

    /// Opens the parent directory of `p` without following links, creating missing
    /// directories (0755); a parent that is a link or not a directory is refused.
    fn ensure_parents(
        &self,
        h: &OpenDirs,
        p: &RelPath,
        dirty: &mut BTreeSet<String>,
    ) -> io::Result<OwnedFd> {
        let parent = parent_rel(p);
        let mut created = Vec::new();
        let fd = h.root.make_dirs(&parent, 0o755, &mut created)?;
        dirty.extend(created);
        Ok(fd)
    }

    fn apply_one(
        &self,
        h: &OpenDirs,
        item: &Item,
        dirty: &mut BTreeSet<String>,
    ) -> io::Result<Outcome> {
        let r = &item.record;
        let dir = self.ensure_parents(h, &r.path, dirty)?;
        let name = r.path.name();
        let mut existing = safe_fs::lstat_at(dir.as_fd(), name)?;
        // Never clobber a local change the scanner has not seen yet.
        let on_disk = existing.as_ref().map(local_stat);
        let matches = match (&on_disk, &item.expect, &existing) {
            (None, _, _) => true,
            (Some(_), _, Some(m)) if m.is_dir() && (r.kind == Kind::Directory || r.deleted) => true,
            (Some(d), Some(e), _) => d == e,
            (Some(_), None, _) => false,
        };
        if !matches {
            return Ok(Outcome::Deferred(format!(
                "{}: changed locally, rescanning first",
                r.path
            )));
        }
        if item.conflict {
            if let Some(m) = &existing {
                if !m.is_dir() {
                    self.keep_conflict(h, &r.path, dir.as_fd())?;
                    // Moved away: nothing of it is left to keep, replace or delete.
                    existing = None;
                }
            }
        }
        // keep (disk/keep.rs): the regular file a peer's change is about to replace or
        // delete is kept under `.certmesh/kept/` first (hard link; a conflict loser
        // is already gone to `.certmesh/conflicts/`).
        crate::disk::keep::before_apply(
            &self.root,
            r,
            item.staged.is_some(),
            existing.as_ref(),
            item.replaces_author,
            self.kept,
        );
        dirty.insert(parent_rel(&r.path));
        if r.deleted {
            return match &existing {
                None => Ok(Outcome::Applied(None)),
                Some(m) if m.is_dir() => match safe_fs::unlink_at(dir.as_fd(), name, true) {
                    Ok(()) => Ok(Outcome::Applied(None)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(Outcome::Deferred(
                        format!("{}: directory not empty", r.path),
                    )),
                    Err(e) => Err(e),
                },
                Some(_) => {
                    safe_fs::unlink_at(dir.as_fd(), name, false).map(|_| Outcome::Applied(None))
                }
            };
        }
        // A link is checked against the disk before anything is removed for it.
        if r.kind == Kind::Symlink {
            match safe_fs::check_link(&h.root, &r.path, &r.target) {
                Ok(_) => {}
                Err(e @ LinkError::Missing { .. }) => return Ok(Outcome::Deferred(e.to_string())),
                Err(e) => {
                    tracing::warn!(path = %r.path, target = %r.target, error = %e, "refusing a symlink from a peer");
                    return Ok(Outcome::Failed(format!("refused: {e}")));
                }
            }
        }
        // A directory in the way of a file or link must be empty to go.
        if let Some(m) = &existing {
            if m.is_dir() && r.kind != Kind::Directory {
                if let Err(e) = safe_fs::unlink_at(dir.as_fd(), name, true) {
                    return Ok(Outcome::Deferred(format!(
                        "{}: directory in the way: {e}",
                        r.path
                    )));
                }
            } else if !m.is_dir() && r.kind == Kind::Directory {
                safe_fs::unlink_at(dir.as_fd(), name, false)?;
            }
        }
        match r.kind {
            Kind::Directory => {
                let mode = clamp_dir_mode(r.mode, r.path.is_private_state());
                safe_fs::mkdir_at(dir.as_fd(), name, mode)?;
                let d = safe_fs::open_at(dir.as_fd(), name, OFlags::RDONLY | OFlags::DIRECTORY)?;
                safe_fs::chmod_fd(d.as_fd(), mode)?;
            }
            Kind::File => match &item.staged {
                Some(staged) => {
                    let staged = self.staged_name(Some(staged))?;
                    safe_fs::rename_at(h.tmp.as_fd(), staged, dir.as_fd(), name)?
                }
                // Same content already here: only mode and mtime change.
                None => {
                    let f = safe_fs::open_at(dir.as_fd(), name, OFlags::RDONLY | OFlags::NONBLOCK)?;
                    if !f.metadata()?.is_file() {
                        return Err(io::Error::other("not a regular file"));
                    }
                    self.set_mode_and_mtime(&f, r, existing.as_ref())?;
                }
            },
            Kind::Symlink => {
                let tmp = format!("{:016x}", rand::random::<u64>());
                safe_fs::symlink_at(&r.target, h.tmp.as_fd(), &tmp)?;
                if let Err(e) = safe_fs::rename_at(h.tmp.as_fd(), &tmp, dir.as_fd(), name) {
                    let _ = safe_fs::unlink_at(h.tmp.as_fd(), &tmp, false);
                    return Err(e);
                }
            }
        }
        let m = safe_fs::lstat_at(dir.as_fd(), name)?
            .ok_or_else(|| io::Error::other("vanished right after being written"))?;
        Ok(Outcome::Applied(Some(local_stat(&m))))
    }

    /// Moves the local losing copy (`name` in `dir`) to
    /// `.certmesh/conflicts/<path>.conflict-<time>`.
    fn keep_conflict(&self, h: &OpenDirs, p: &RelPath, dir: BorrowedFd<'_>) -> io::Result<()> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let dest = format!("{INTERNAL_DIR}/conflicts/{}.conflict-{secs}", p.as_str());
        let (dest_dir, dest_name) = dest.rsplit_once('/').unwrap_or(("", dest.as_str()));
        let to = h.root.make_dirs(dest_dir, 0o700, &mut Vec::new())?;
        safe_fs::rename_at(dir, p.name(), to.as_fd(), dest_name)?;
        tracing::warn!(path = %p, kept = %dest, "conflict: local version lost, kept a copy");
        h.conflicts_kept.set(h.conflicts_kept.get() + 1);
        Ok(())
    }
}

/// The tree root and the staging directory, opened once per batch.
struct OpenDirs {
    root: Root,
    tmp: OwnedFd,
    /// Local losers of a conflict kept so far in this batch.
    conflicts_kept: std::cell::Cell<usize>,
}

impl OpenDirs {
    fn open(tree: &Tree) -> io::Result<OpenDirs> {
        let root = Root::open(&tree.root)?;
        let tmp = root.dir(&format!("{INTERNAL_DIR}/tmp"))?;
        Ok(OpenDirs {
            root,
            tmp,
            conflicts_kept: Default::default(),
        })
    }
}

/// A file's mode on this node: permission bits only, nothing writable by group or
/// others (a write there would replicate to every node), and no
/// "other" bits at all for a private key or group/other bits for an already-private file.
pub fn clamp_file_mode(requested: u32, private_key: bool, already_private: bool) -> u32 {
    let mut mode = requested & 0o755;
    if private_key {
        mode &= !0o007;
    }
    if already_private {
        mode &= !0o077;
    }
    mode
}

/// A directory's mode on this node: at most 0755; at most 0700 for `private`
/// state (`.certmesh` itself, `.certmesh/acme/**`).
pub fn clamp_dir_mode(requested: u32, private: bool) -> u32 {
    if private {
        requested & 0o700
    } else {
        requested & 0o755
    }
}

/// Whether the open file holds private key material: PEM text anywhere in it, or,
/// for a file of at most [`secret::MAX_JUDGED`] bytes, DER, PKCS#12 or JSON key
/// material ([`secret::holds_key_material`]).
fn holds_key(f: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    if len > secret::MAX_JUDGED as u64 {
        return KeyScanner::scan(f);
    }
    let mut data = vec![0u8; len as usize];
    let mut at = 0;
    while at < data.len() {
        match f.read_at(&mut data[at..], at as u64)? {
            0 => break,
            n => at += n,
        }
    }
    data.truncate(at);
    Ok(secret::holds_key_material(&data))
}

/// The relative path of `p`'s parent (`""` for the root).
fn parent_rel(p: &RelPath) -> String {
    p.parent()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default()
}

fn to_system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Flushes the whole filesystem holding `dir`: one call for a large batch.
fn syncfs(dir: BorrowedFd<'_>) -> io::Result<()> {
    rustix::fs::syncfs(dir).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::device::ShortId;
    use crate::core::record::ContentHash;
    use crate::core::version::VersionVector;

    fn rec(path: &str, kind: Kind, mode: u32) -> FileRecord {
        FileRecord {
            path: RelPath::parse(path).unwrap(),
            kind,
            size: 0,
            mode,
            mtime_ns: 1_600_000_000_000_000_000,
            hash: ContentHash::default(),
            target: String::new(),
            version: VersionVector::from_pairs(vec![(ShortId(1), 1)]),
            deleted: false,
            modified_by: ShortId(1),
            auth: None,
        }
    }

    fn stage(t: &Tree, data: &str) -> PathBuf {
        let p = t.staging_path();
        fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn batch_applies_dirs_files_links_and_keeps_keys_private() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        let mut link = rec("live/www", Kind::Symlink, 0o777);
        link.target = "../archive/www/1".into();
        let items = vec![
            Item {
                record: link,
                staged: None,
                expect: None,
                conflict: false,
                replaces_author: None,
            },
            Item {
                record: rec("archive/www/1/privkey.pem", Kind::File, 0o644),
                staged: Some(stage(&t, "KEY")),
                expect: None,
                conflict: false,
                replaces_author: None,
            },
            Item {
                record: rec("archive/www/1", Kind::Directory, 0o755),
                staged: None,
                expect: None,
                conflict: false,
                replaces_author: None,
            },
        ];
        let out = t.apply(&items).outcomes;
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Applied(_))),
            "{out:?}"
        );
        let key = t.root.join("live/www/privkey.pem");
        assert_eq!(fs::read_to_string(&key).unwrap(), "KEY");
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            fs::read_dir(t.tmp_dir()).unwrap().count(),
            0,
            "staging left behind"
        );
    }

    #[test]
    fn local_change_is_not_clobbered_and_link_waits_for_target() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::write(t.root.join("f"), "mine").unwrap();
        let mut link = rec("l", Kind::Symlink, 0o777);
        link.target = "missing".into();
        let items = vec![
            Item {
                record: rec("f", Kind::File, 0o644),
                staged: Some(stage(&t, "theirs")),
                expect: None,
                conflict: false,
                replaces_author: None,
            },
            Item {
                record: link,
                staged: None,
                expect: None,
                conflict: false,
                replaces_author: None,
            },
        ];
        let out = t.apply(&items).outcomes;
        assert!(
            matches!(out[0], Outcome::Deferred(_)) && matches!(out[1], Outcome::Deferred(_)),
            "{out:?}"
        );
        assert_eq!(fs::read_to_string(t.root.join("f")).unwrap(), "mine");
        assert!(fs::symlink_metadata(t.root.join("l")).is_err());
    }

    #[test]
    fn link_waits_until_its_whole_target_is_applied() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        let mut link = rec("live/www", Kind::Symlink, 0o777);
        link.target = "../archive/www/2".into();
        let items = vec![
            Item {
                record: rec("archive/www/2", Kind::Directory, 0o755),
                staged: None,
                expect: None,
                conflict: false,
                replaces_author: None,
            },
            Item {
                record: rec("archive/www/2/cert.pem", Kind::File, 0o644),
                staged: Some(stage(&t, "C")),
                expect: None,
                conflict: false,
                replaces_author: None,
            },
            // The key's content never arrived: staged path missing.
            Item {
                record: rec("archive/www/2/privkey.pem", Kind::File, 0o600),
                staged: Some(t.tmp_dir().join("missing")),
                expect: None,
                conflict: false,
                replaces_author: None,
            },
            Item {
                record: link,
                staged: None,
                expect: None,
                conflict: false,
                replaces_author: None,
            },
        ];
        let out = t.apply(&items).outcomes;
        assert!(matches!(out[2], Outcome::Failed(_)), "{out:?}");
        assert!(matches!(out[3], Outcome::Deferred(_)), "{out:?}");
        assert!(fs::symlink_metadata(t.root.join("live/www")).is_err());
    }

    #[test]
    fn symlinked_parent_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        std::os::unix::fs::symlink(&outside, t.root.join("sneaky")).unwrap();
        let items = vec![Item {
            record: rec("sneaky/x", Kind::File, 0o644),
            staged: Some(stage(&t, "x")),
            expect: None,
            conflict: false,
            replaces_author: None,
        }];
        let out = t.apply(&items).outcomes;
        assert!(matches!(out[0], Outcome::Failed(_)), "{out:?}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn conflict_keeps_loser() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::write(t.root.join("f"), "loser").unwrap();
        let st = local_stat(&fs::symlink_metadata(t.root.join("f")).unwrap());
        let items = vec![Item {
            record: rec("f", Kind::File, 0o644),
            staged: Some(stage(&t, "winner")),
            expect: Some(st),
            conflict: true,
            replaces_author: None,
        }];
        assert!(matches!(t.apply(&items).outcomes[0], Outcome::Applied(_)));
        assert_eq!(fs::read_to_string(t.root.join("f")).unwrap(), "winner");
        let kept: Vec<_> = fs::read_dir(t.conflicts_dir()).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(fs::read_to_string(kept[0].path()).unwrap(), "loser");
    }

    #[test]
    fn a_deletion_that_wins_a_conflict_keeps_the_loser_and_applies() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::write(t.root.join("f"), "local edit").unwrap();
        let st = local_stat(&fs::symlink_metadata(t.root.join("f")).unwrap());
        let mut gone = rec("f", Kind::File, 0o644);
        gone.deleted = true;
        let items = vec![Item {
            record: gone,
            staged: None,
            expect: Some(st),
            conflict: true,
            replaces_author: None,
        }];
        // The loser is kept and the path removed, with no ENOENT from unlinking
        // what was just moved away.
        let out = t.apply(&items).outcomes;
        assert!(matches!(out[0], Outcome::Applied(None)), "{out:?}");
        assert!(fs::symlink_metadata(t.root.join("f")).is_err());
        let kept: Vec<_> = fs::read_dir(t.conflicts_dir()).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(fs::read_to_string(kept[0].path()).unwrap(), "local edit");
    }

    fn item(record: FileRecord, staged: Option<PathBuf>) -> Item {
        Item {
            record,
            staged,
            expect: None,
            conflict: false,
            replaces_author: None,
        }
    }

    fn link(path: &str, target: &str) -> Item {
        let mut r = rec(path, Kind::Symlink, 0o777);
        r.target = target.into();
        item(r, None)
    }

    fn mode_of(t: &Tree, p: &str) -> u32 {
        fs::symlink_metadata(t.root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn symlink_chain_escaping_the_tree_is_never_created() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::write(d.path().join("outside"), "secret").unwrap();
        fs::create_dir_all(t.root.join("deep/a/b/c")).unwrap();
        fs::create_dir_all(t.root.join("x")).unwrap();
        // The first link is fine on its own (a shallower directory inside the tree).
        let out = t.apply(&[link("deep/a/b/c/l", "../../../../x")]).outcomes;
        assert!(matches!(out[0], Outcome::Applied(_)), "{out:?}");
        let chain = "../deep/a/b/c/l/../../../../../outside";
        let out = t
            .apply(&[
                link("pub/steal", chain),
                link("pub/thru", "../deep/a/b/c/l"),
            ])
            .outcomes;
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Failed(_))),
            "{out:?}"
        );
        assert!(fs::symlink_metadata(t.root.join("pub/steal")).is_err());
        assert!(fs::symlink_metadata(t.root.join("pub/thru")).is_err());
    }

    #[test]
    fn link_through_a_link_is_refused_and_nothing_is_created() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::create_dir_all(t.root.join("real/sub")).unwrap();
        fs::write(t.root.join("real/sub/f"), "x").unwrap();
        std::os::unix::fs::symlink("real", t.root.join("alias")).unwrap();
        let out = t
            .apply(&[link("l1", "alias/sub/f"), link("l2", "alias")])
            .outcomes;
        for o in &out {
            assert!(
                matches!(o, Outcome::Failed(why) if why.contains("through another link")),
                "{out:?}"
            );
        }
        assert!(fs::symlink_metadata(t.root.join("l1")).is_err());
        // Through real directories it goes.
        let out = t.apply(&[link("l3", "real/sub/f")]).outcomes;
        assert!(matches!(out[0], Outcome::Applied(_)), "{out:?}");
    }

    #[test]
    fn links_under_acme_or_into_internal_state_are_refused() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::create_dir_all(t.root.join("live/x")).unwrap();
        fs::write(t.root.join("live/x/privkey.pem"), "KEY").unwrap();
        fs::create_dir_all(t.root.join(".certmesh/acme")).unwrap();
        fs::write(t.root.join(".certmesh/acme/account.json"), "{}").unwrap();
        let out = t
            .apply(&[
                link(
                    "acme/.well-known/acme-challenge/k",
                    "../../../live/x/privkey.pem",
                ),
                link("acct", ".certmesh/acme/account.json"),
            ])
            .outcomes;
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Failed(_))),
            "{out:?}"
        );
        assert!(fs::symlink_metadata(t.root.join("acme/.well-known/acme-challenge/k")).is_err());
        assert!(fs::symlink_metadata(t.root.join("acct")).is_err());
    }

    #[test]
    fn modes_are_clamped_whatever_the_peer_sent() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        let combined = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n\
                        -----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";
        let out = t
            .apply(&[
                item(rec("d", Kind::Directory, 0o777), None),
                item(
                    rec("d/plain.pem", Kind::File, 0o666),
                    Some(stage(&t, "cert")),
                ),
                item(
                    rec("d/combined.pem", Kind::File, 0o644),
                    Some(stage(&t, combined)),
                ),
                item(rec("d/suid", Kind::File, 0o4755), Some(stage(&t, "#!"))),
                item(rec("d/sticky", Kind::Directory, 0o1777), None),
            ])
            .outcomes;
        assert!(
            out.iter().all(|o| matches!(o, Outcome::Applied(_))),
            "{out:?}"
        );
        assert_eq!(mode_of(&t, "d"), 0o755);
        assert_eq!(mode_of(&t, "d/plain.pem"), 0o644);
        assert_eq!(mode_of(&t, "d/combined.pem"), 0o640);
        assert_eq!(mode_of(&t, "d/suid"), 0o755);
        assert_eq!(mode_of(&t, "d/sticky"), 0o755);
    }

    #[test]
    fn mode_only_change_is_clamped_by_content() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::write(
            t.root.join("bundle"),
            "x\n-----BEGIN PRIVATE KEY-----\nMC4\n",
        )
        .unwrap();
        fs::set_permissions(t.root.join("bundle"), fs::Permissions::from_mode(0o640)).unwrap();
        let st = local_stat(&fs::symlink_metadata(t.root.join("bundle")).unwrap());
        let mut it = item(rec("bundle", Kind::File, 0o666), None);
        it.expect = Some(st);
        let out = t.apply(&[it]).outcomes;
        assert!(matches!(out[0], Outcome::Applied(_)), "{out:?}");
        assert_eq!(mode_of(&t, "bundle"), 0o640);
    }

    #[test]
    fn clamped_mode_is_not_seen_as_a_local_change() {
        use crate::core::index::Index;
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("tree")).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        let mut index = Index::new(ShortId(2));
        let dir = rec("d", Kind::Directory, 0o777);
        let mut key = rec("d/combined.pem", Kind::File, 0o666);
        let content = "-----BEGIN PRIVATE KEY-----\n";
        key.hash = ContentHash(*blake3::hash(content.as_bytes()).as_bytes());
        key.size = content.len() as u64;
        let out = t
            .apply(&[
                item(dir.clone(), None),
                item(key.clone(), Some(stage(&t, content))),
            ])
            .outcomes;
        // What pull.rs does with the outcome, then what the scanner sees next.
        for (r, o) in [dir, key].into_iter().zip(out) {
            let Outcome::Applied(stat) = o else {
                panic!("{o:?}")
            };
            index.put(r, stat, 1);
        }
        for p in ["d", "d/combined.pem"] {
            let p = RelPath::parse(p).unwrap();
            let crate::disk::scan::Seen::Present { kind, stat, target } =
                crate::disk::scan::look(&t.root, &p).unwrap()
            else {
                panic!("{p} not present")
            };
            let (o, _) = crate::disk::scan::observe(&t.root, &p, kind, stat, target)
                .unwrap()
                .unwrap();
            assert!(index.observe(&p, Some(o), 1).is_none(), "{p} re-announced");
        }
    }
}
