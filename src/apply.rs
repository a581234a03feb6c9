//! Writing a batch of records into the tree as a unit: every file is staged under
//! `.certmesh/tmp/` (content verified, mode set, fsynced), then everything is renamed
//! into place, directories first and symlinks last, then the touched directories are
//! fsynced. A path changed locally since the last scan is never clobbered; a path is
//! never reached through a symlink; a private key never becomes readable by others.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::index::{FileRecord, Kind, LocalStat};
use crate::paths::{RelPath, INTERNAL_DIR};
use crate::scan::local_stat;

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
}

/// What happened to one item.
#[derive(Debug)]
pub enum Outcome {
    /// Applied; the stat of what is on disk now (`None` for a deletion).
    Applied(Option<LocalStat>),
    /// Not applied now, try again later (local change pending, link target missing,
    /// directory not empty).
    Deferred(String),
    /// An I/O error (disk full, permissions): reported, old content intact.
    Failed(String),
}

/// The tree root and its staging area.
#[derive(Debug, Clone)]
pub struct Tree {
    pub root: PathBuf,
}

impl Tree {
    pub fn new(root: PathBuf) -> Self {
        Tree { root }
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(INTERNAL_DIR).join("tmp")
    }

    fn conflicts_dir(&self) -> PathBuf {
        self.root.join(INTERNAL_DIR).join("conflicts")
    }

    /// Creates the internal dirs and removes staging leftovers of a crash.
    pub fn prepare(&self) -> io::Result<()> {
        fs::create_dir_all(&self.root)?;
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

    /// Applies a batch. Outcomes are in the order of `items`.
    pub fn apply(&self, items: &[Item]) -> Vec<Outcome> {
        let mut out: Vec<Option<Outcome>> = items.iter().map(|_| None).collect();
        let mut dirty_dirs: BTreeSet<PathBuf> = BTreeSet::new();

        // 1. Finish staging: final mode and mtime, then make the content durable.
        let staged: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].staged.is_some())
            .collect();
        for &i in &staged {
            if let Err(e) = self.finish_staged(&items[i]) {
                out[i] = Some(Outcome::Failed(format!(
                    "staging {}: {e}",
                    items[i].record.path
                )));
            }
        }
        let sync_result = if staged.len() > SYNCFS_THRESHOLD {
            syncfs(&self.tmp_dir())
        } else {
            staged
                .iter()
                .filter(|&&i| out[i].is_none())
                .try_for_each(|&i| fsync_path(items[i].staged.as_deref().unwrap_or(Path::new("/"))))
        };
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
            let res = self.apply_one(item, &mut dirty_dirs);
            out[i] = Some(match res {
                Ok(o) => o,
                Err(e) => Outcome::Failed(format!("{}: {e}", item.record.path)),
            });
        }
        // 3. Make the renames durable.
        for d in &dirty_dirs {
            if let Err(e) = fsync_path(d) {
                tracing::warn!(dir = %d.display(), error = %e, "fsync of directory failed");
            }
        }
        // Failed staged files must not linger.
        for item in items {
            if let Some(s) = &item.staged {
                let _ = fs::remove_file(s);
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or(Outcome::Failed("not applied".into())))
            .collect()
    }

    /// The mode a record gets here: private keys and already-private files never
    /// become readable by others.
    fn local_mode(&self, r: &FileRecord, existing: Option<&fs::Metadata>) -> u32 {
        let mut mode = r.mode & 0o7777;
        if r.path.is_private_key() {
            mode &= !0o007;
        }
        if let Some(m) = existing {
            if m.is_file() && m.permissions().mode() & 0o077 == 0 {
                mode &= !0o077;
            }
        }
        mode
    }

    fn finish_staged(&self, item: &Item) -> io::Result<()> {
        let Some(staged) = &item.staged else {
            return Ok(());
        };
        let existing = fs::symlink_metadata(item.record.path.under(&self.root)).ok();
        let mode = self.local_mode(&item.record, existing.as_ref());
        let f = fs::OpenOptions::new().write(true).open(staged)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.set_modified(to_system_time(item.record.mtime_ns))?;
        Ok(())
    }

    /// Refuses a path whose ancestors are not real directories; creates missing ones.
    fn ensure_parents(&self, p: &RelPath, dirty: &mut BTreeSet<PathBuf>) -> io::Result<()> {
        let mut chain = Vec::new();
        let mut anc = p.parent();
        while let Some(a) = anc {
            anc = a.parent();
            chain.push(a);
        }
        for a in chain.iter().rev() {
            let full = a.under(&self.root);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io::Error::other(format!("{a} is not a directory")));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new().mode(0o755).create(&full)?;
                    dirty.insert(parent_of(&full));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn apply_one(&self, item: &Item, dirty: &mut BTreeSet<PathBuf>) -> io::Result<Outcome> {
        let r = &item.record;
        self.ensure_parents(&r.path, dirty)?;
        let full = r.path.under(&self.root);
        let existing = match fs::symlink_metadata(&full) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
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
                    self.keep_conflict(&r.path, &full)?;
                }
            }
        }
        // keep (src/keep.rs): the regular file a peer's change is about to replace or
        // delete is kept under `.certmesh/kept/` first (hard link; a conflict loser
        // is already gone to `.certmesh/conflicts/`).
        crate::keep::before_apply(&self.root, r, item.staged.is_some(), existing.as_ref());
        dirty.insert(parent_of(&full));
        if r.deleted {
            return match &existing {
                None => Ok(Outcome::Applied(None)),
                Some(m) if m.is_dir() => match fs::remove_dir(&full) {
                    Ok(()) => Ok(Outcome::Applied(None)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(Outcome::Deferred(
                        format!("{}: directory not empty", r.path),
                    )),
                    Err(e) => Err(e),
                },
                Some(_) => fs::remove_file(&full).map(|_| Outcome::Applied(None)),
            };
        }
        // A directory in the way of a file or link must be empty to go.
        if let Some(m) = &existing {
            if m.is_dir() && r.kind != Kind::Directory {
                if let Err(e) = fs::remove_dir(&full) {
                    return Ok(Outcome::Deferred(format!(
                        "{}: directory in the way: {e}",
                        r.path
                    )));
                }
            } else if !m.is_dir() && r.kind == Kind::Directory {
                fs::remove_file(&full)?;
            }
        }
        match r.kind {
            Kind::Directory => {
                let mode = r.mode & 0o7777;
                match fs::DirBuilder::new().mode(mode).create(&full) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
                fs::set_permissions(&full, fs::Permissions::from_mode(mode))?;
            }
            Kind::File => match &item.staged {
                Some(staged) => fs::rename(staged, &full)?,
                // Same content already here: only mode and mtime change.
                None => {
                    let mode = self.local_mode(r, existing.as_ref());
                    let f = fs::OpenOptions::new().write(true).open(&full)?;
                    f.set_permissions(fs::Permissions::from_mode(mode))?;
                    f.set_modified(to_system_time(r.mtime_ns))?;
                }
            },
            Kind::Symlink => {
                let resolved = r
                    .path
                    .parent()
                    .map_or_else(|| self.root.clone(), |p| p.under(&self.root))
                    .join(&r.target);
                if fs::symlink_metadata(&resolved).is_err() {
                    return Ok(Outcome::Deferred(format!(
                        "{}: link target {} not present yet",
                        r.path, r.target
                    )));
                }
                let tmp = self.staging_path();
                std::os::unix::fs::symlink(&r.target, &tmp)?;
                if let Err(e) = fs::rename(&tmp, &full) {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        let m = fs::symlink_metadata(&full)?;
        Ok(Outcome::Applied(Some(local_stat(&m))))
    }

    /// Moves the local losing copy to `.certmesh/conflicts/<path>.conflict-<time>`.
    fn keep_conflict(&self, p: &RelPath, full: &Path) -> io::Result<()> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let dest = self
            .conflicts_dir()
            .join(format!("{}.conflict-{secs}", p.as_str()));
        if let Some(parent) = dest.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        fs::rename(full, &dest)?;
        tracing::warn!(path = %p, kept = %dest.display(), "conflict: local version lost, kept a copy");
        Ok(())
    }
}

fn parent_of(p: &Path) -> PathBuf {
    p.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn to_system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn fsync_path(p: &Path) -> io::Result<()> {
    fs::File::open(p)?.sync_all()
}

/// Flushes the whole filesystem holding `p`: one call for a large batch.
fn syncfs(p: &Path) -> io::Result<()> {
    let f = fs::File::open(p)?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ShortId;
    use crate::index::ContentHash;
    use crate::version::VersionVector;

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
            },
            Item {
                record: rec("archive/www/1/privkey.pem", Kind::File, 0o644),
                staged: Some(stage(&t, "KEY")),
                expect: None,
                conflict: false,
            },
            Item {
                record: rec("archive/www/1", Kind::Directory, 0o755),
                staged: None,
                expect: None,
                conflict: false,
            },
        ];
        let out = t.apply(&items);
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
            },
            Item {
                record: link,
                staged: None,
                expect: None,
                conflict: false,
            },
        ];
        let out = t.apply(&items);
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
            },
            Item {
                record: rec("archive/www/2/cert.pem", Kind::File, 0o644),
                staged: Some(stage(&t, "C")),
                expect: None,
                conflict: false,
            },
            // The key's content never arrived: staged path missing.
            Item {
                record: rec("archive/www/2/privkey.pem", Kind::File, 0o600),
                staged: Some(t.tmp_dir().join("missing")),
                expect: None,
                conflict: false,
            },
            Item {
                record: link,
                staged: None,
                expect: None,
                conflict: false,
            },
        ];
        let out = t.apply(&items);
        assert!(matches!(out[2], Outcome::Failed(_)), "{out:?}");
        assert!(matches!(out[3], Outcome::Deferred(_)), "{out:?}");
        assert!(fs::symlink_metadata(t.root.join("live/www")).is_err());
    }

    #[test]
    fn symlinked_parent_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        std::os::unix::fs::symlink(&outside, t.root.join("sneaky")).unwrap();
        let items = vec![Item {
            record: rec("sneaky/x", Kind::File, 0o644),
            staged: Some(stage(&t, "x")),
            expect: None,
            conflict: false,
        }];
        let out = t.apply(&items);
        assert!(matches!(out[0], Outcome::Failed(_)), "{out:?}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn conflict_keeps_loser() {
        let d = tempfile::tempdir().unwrap();
        let t = Tree::new(d.path().join("tree"));
        t.prepare().unwrap();
        fs::write(t.root.join("f"), "loser").unwrap();
        let st = local_stat(&fs::symlink_metadata(t.root.join("f")).unwrap());
        let items = vec![Item {
            record: rec("f", Kind::File, 0o644),
            staged: Some(stage(&t, "winner")),
            expect: Some(st),
            conflict: true,
        }];
        assert!(matches!(t.apply(&items)[0], Outcome::Applied(_)));
        assert_eq!(fs::read_to_string(t.root.join("f")).unwrap(), "winner");
        let kept: Vec<_> = fs::read_dir(t.conflicts_dir()).unwrap().flatten().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(fs::read_to_string(kept[0].path()).unwrap(), "loser");
    }
}
