//! Reading the tree: lstat + BLAKE3 of single paths (what the watcher asks for) and a
//! full walk (start-up and the periodic safety-net rescan). Never follows symlinks:
//! paths are opened relative to the tree's handle (see [`crate::disk::safe_fs`]), and a
//! local link a peer's link would be refused for is skipped, not announced.

use std::fs;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use crate::core::index::{LocalStat, Observed};
use crate::core::paths::{RelPath, INTERNAL_DIR};
use crate::core::record::{ContentHash, Kind};
use crate::disk::safe_fs::{self, LinkError, Root};

/// What is at a path right now.
#[derive(Debug)]
pub enum Seen {
    /// Nothing (or not something we sync: then the reason is logged by the caller).
    Absent,
    /// Present but not syncable (fifo, socket, device, escaping symlink, …).
    Skipped(String),
    /// A file, directory or symlink with its stat.
    Present {
        kind: Kind,
        stat: LocalStat,
        target: String,
    },
}

/// The stat cache entry of metadata.
pub fn local_stat(m: &fs::Metadata) -> LocalStat {
    LocalStat {
        size: if m.is_file() { m.len() } else { 0 },
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        mode: m.mode() & 0o7777,
        ino: m.ino(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    }
}

/// lstat of one path, refusing paths reached through a symlinked directory (opened
/// relative to the tree's handle, following no link). A link that breaks the rules a
/// peer's link is held to (see [`safe_fs::check_link`]) is skipped, so a bad link made
/// on this node is never replicated.
pub fn look(root: &Path, p: &RelPath) -> io::Result<Seen> {
    let r = Root::open(root)?;
    let fd = match r.open_at(p.as_str(), OFlags::PATH, Mode::empty()) {
        Ok(fd) => fd,
        // Absent, or a directory on the way is a link or not a directory: not in the tree.
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV)
                ) =>
        {
            return Ok(Seen::Absent)
        }
        Err(e) => return Err(e),
    };
    let f = fs::File::from(fd);
    let m = f.metadata()?;
    let ft = m.file_type();
    let stat = local_stat(&m);
    if ft.is_file() {
        Ok(Seen::Present {
            kind: Kind::File,
            stat,
            target: String::new(),
        })
    } else if ft.is_dir() {
        Ok(Seen::Present {
            kind: Kind::Directory,
            stat,
            target: String::new(),
        })
    } else if ft.is_symlink() {
        let target = safe_fs::readlink_fd(f.as_fd())?;
        let Ok(target) = String::from_utf8(target) else {
            return Ok(Seen::Skipped("symlink target is not UTF-8".into()));
        };
        match safe_fs::check_link(&r, p, &target) {
            // A dangling link is announced; peers apply it once the target is there.
            Ok(_) | Err(LinkError::Missing { .. }) => Ok(Seen::Present {
                kind: Kind::Symlink,
                stat,
                target,
            }),
            Err(e) => Ok(Seen::Skipped(e.to_string())),
        }
    } else {
        let what = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else {
            "device"
        };
        Ok(Seen::Skipped(format!(
            "special file ({what}) is not synced"
        )))
    }
}

/// A file's hash, the stat it was taken under, and the content when small.
pub type Hashed = (ContentHash, LocalStat, Option<Vec<u8>>);

/// BLAKE3 of a file, with the stat taken around the read; `None` if the file changed
/// or vanished while being read (the caller looks again later). Small files' content
/// comes back too, so it can travel inline to peers.
pub fn hash_file(full: &Path) -> io::Result<Option<Hashed>> {
    let f = match fs::File::open(full) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    hash_open(&f, || fs::symlink_metadata(full))
}

/// [`hash_file`] for a path of the tree, opened without following any link.
pub fn hash_rel(root: &Path, p: &RelPath) -> io::Result<Option<Hashed>> {
    let r = Root::open(root)?;
    let f = match r.open_at(p.as_str(), OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) {
        Ok(fd) => fs::File::from(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Ok(None);
    }
    hash_open(&f, || {
        r.lstat(p.as_str())?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    })
}

fn hash_open(
    f: &fs::File,
    again: impl FnOnce() -> io::Result<fs::Metadata>,
) -> io::Result<Option<Hashed>> {
    let before = local_stat(&f.metadata()?);
    let (hash, data) = if before.size as usize <= crate::core::engine::MAX_INLINE {
        let mut data = Vec::with_capacity(before.size as usize);
        Read::read_to_end(
            &mut f.take(crate::core::engine::MAX_INLINE as u64 + 1),
            &mut data,
        )?;
        (ContentHash(*blake3::hash(&data).as_bytes()), Some(data))
    } else {
        let mut h = blake3::Hasher::new();
        h.update_reader(f)?;
        (ContentHash(*h.finalize().as_bytes()), None)
    };
    let after = match again() {
        Ok(m) => local_stat(&m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if before != after || data.as_ref().is_some_and(|d| d.len() as u64 != before.size) {
        return Ok(None);
    }
    Ok(Some((hash, before, data)))
}

/// Turns a `Seen::Present` into an observation, hashing files (with the content of
/// small ones).
pub fn observe(
    root: &Path,
    p: &RelPath,
    kind: Kind,
    stat: LocalStat,
    target: String,
) -> io::Result<Option<(Observed, Option<Vec<u8>>)>> {
    let (hash, data) = match kind {
        Kind::File => match hash_rel(root, p)? {
            Some((h, s, data)) if s == stat => (h, data),
            _ => return Ok(None),
        },
        _ => (ContentHash::default(), None),
    };
    let o = Observed {
        kind,
        size: stat.size,
        mode: stat.mode,
        mtime_ns: stat.mtime_ns,
        hash,
        target,
        stat,
    };
    Ok(Some((o, data)))
}

/// Every syncable path under `root` (directories before their contents), skipping
/// local-only internal state, into `out`; the directories among them also into `dirs`
/// with their inode numbers. Unreadable directories are reported, not fatal.
pub fn walk(
    root: &Path,
    start: Option<&RelPath>,
    out: &mut Vec<RelPath>,
    dirs: &mut Vec<(RelPath, u64)>,
    errors: &mut Vec<String>,
) {
    let shown = start.map_or_else(|| root.to_path_buf(), |s| s.under(root));
    // Listed through the tree's handle: a directory reached through a link is not listed.
    let listed = Root::open(root).and_then(|r| {
        let fd = r.dir(start.map_or("", |s| s.as_str()))?;
        let names = safe_fs::list_typed(fd.as_fd())?;
        Ok((fd, names))
    });
    let (fd, names) = match listed {
        Ok(l) => l,
        // Gone, or not a real directory (a link is looked at, never walked into).
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) =>
        {
            return
        }
        Err(e) => {
            errors.push(format!("{}: {e}", shown.display()));
            return;
        }
    };
    for (name, kind, ino) in names {
        let name = std::ffi::OsString::from_vec(name);
        let Some(name) = name.to_str() else {
            errors.push(format!(
                "{}: name is not UTF-8, skipped",
                shown.join(&name).display()
            ));
            continue;
        };
        let rel = match start {
            Some(s) => format!("{s}/{name}"),
            None => name.to_string(),
        };
        let Ok(rel) = RelPath::parse(&rel) else {
            errors.push(format!("{rel:?}: not a valid path, skipped"));
            continue;
        };
        if rel.is_local_only() {
            continue;
        }
        let is_dir = match kind {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::Unknown => safe_fs::lstat_at(fd.as_fd(), rel.name())
                .ok()
                .flatten()
                .is_some_and(|m| m.is_dir()),
            _ => false,
        };
        out.push(rel.clone());
        if is_dir {
            dirs.push((rel.clone(), ino));
            walk(root, Some(&rel), out, dirs, errors);
        }
    }
}

/// The internal directories, created on start.
pub fn internal_dirs(root: &Path) -> [std::path::PathBuf; 2] {
    [
        root.join(INTERNAL_DIR).join("tmp"),
        root.join(INTERNAL_DIR).join("conflicts"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_skips_internal_and_looks_at_kinds() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), "x").unwrap();
        for i in internal_dirs(root) {
            fs::create_dir_all(&i).unwrap();
            fs::write(i.join("junk"), "x").unwrap();
        }
        std::os::unix::fs::symlink("../../etc", root.join("a/out")).unwrap();
        std::os::unix::fs::symlink("b/f", root.join("a/in")).unwrap();
        let mut out = Vec::new();
        let mut errs = Vec::new();
        let mut dirs = Vec::new();
        walk(root, None, &mut out, &mut dirs, &mut errs);
        let mut dir_names: Vec<&str> = dirs.iter().map(|(d, _)| d.as_str()).collect();
        dir_names.sort();
        assert_eq!(dir_names, [".certmesh", "a", "a/b"]);
        let ino = |d: &str| fs::metadata(root.join(d)).unwrap().ino();
        assert!(dirs.iter().all(|(d, i)| *i == ino(d.as_str())));
        let mut names: Vec<String> = out.iter().map(|p| p.to_string()).collect();
        names.sort();
        assert_eq!(names, [".certmesh", "a", "a/b", "a/b/f", "a/in", "a/out"]);
        let p = |s| RelPath::parse(s).unwrap();
        assert!(matches!(look(root, &p("a/out")).unwrap(), Seen::Skipped(_)));
        assert!(matches!(
            look(root, &p("a/in")).unwrap(),
            Seen::Present {
                kind: Kind::Symlink,
                ..
            }
        ));
        // A path reached through a symlinked directory is not in the tree.
        std::os::unix::fs::symlink("b", root.join("a/lnk")).unwrap();
        assert!(matches!(look(root, &p("a/lnk/f")).unwrap(), Seen::Absent));
    }

    #[test]
    fn bad_local_links_are_skipped_not_announced() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("deep/a/b/c")).unwrap();
        fs::create_dir_all(root.join("x")).unwrap();
        fs::create_dir_all(root.join("live/w")).unwrap();
        fs::create_dir_all(root.join("acme/.well-known/acme-challenge")).unwrap();
        fs::create_dir_all(root.join(".certmesh/acme")).unwrap();
        let ln = |t: &str, at: &str| std::os::unix::fs::symlink(t, root.join(at)).unwrap();
        ln("../../../../x", "deep/a/b/c/l");
        ln("../deep/a/b/c/l/../../../../../out", "pub");
        ln("deep/a/b/c/l", "thru");
        ln(
            "../../../live/w/privkey.pem",
            "acme/.well-known/acme-challenge/k",
        );
        ln(".certmesh/acme", "acct");
        ln("not/yet", "dangling");
        let p = |s| RelPath::parse(s).unwrap();
        assert!(matches!(
            look(root, &p("deep/a/b/c/l")).unwrap(),
            Seen::Present { .. }
        ));
        assert!(matches!(
            look(root, &p("dangling")).unwrap(),
            Seen::Present { .. }
        ));
        for bad in ["pub", "thru", "acme/.well-known/acme-challenge/k", "acct"] {
            assert!(
                matches!(look(root, &p(bad)).unwrap(), Seen::Skipped(_)),
                "{bad}"
            );
        }
    }
}
