//! Writing into the shared tree the way a person would, so the sync core picks it
//! up: stage under `.certmesh/tmp/` (local-only, same filesystem), fsync, rename into
//! place; then make sure the local index holds the change before relying on it
//! ([`index_shows`]; the wait is [`crate::handles::TreeWriter::await_indexed`]).
//! Everything goes through the tree's directory handle ([`crate::disk::safe_fs`]) and follows
//! no link, except `live/<name>`, which certmesh made: it is read with `readlinkat` and
//! followed only when it is exactly `../archive/<name>/<n>` ([`live_version`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::Context;
use rustix::fs::{Mode, OFlags};

use crate::core::index::Index;
use crate::core::paths::{RelPath, INTERNAL_DIR};
use crate::core::record::{ContentHash, Kind};
use crate::disk::safe_fs::{self, Root};

/// Largest file certmesh reads back from its tree (PEM chains, leases, the account).
pub const MAX_READ: u64 = 1 << 20;

/// What the index must show for a path.
#[derive(Debug, Clone)]
pub enum Expect {
    File(ContentHash),
    Symlink(String),
    Gone,
}

pub fn rel(s: &str) -> anyhow::Result<RelPath> {
    RelPath::parse_shared(s).map_err(|e| anyhow::anyhow!("{s}: {e}"))
}

fn open(root: &Path) -> anyhow::Result<Root> {
    Root::open(root).with_context(|| format!("opening the tree {}", root.display()))
}

/// The parent directory of `rel`, created where missing, never through a link.
fn mkdirs(root: &Root, rel: &RelPath) -> anyhow::Result<OwnedFd> {
    let parent = rel
        .parent()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    root.make_dirs(&parent, 0o755, &mut Vec::new())
        .with_context(|| format!("creating {parent}"))
}

fn tmp_dir(root: &Root) -> anyhow::Result<OwnedFd> {
    root.dir(&format!("{INTERNAL_DIR}/tmp"))
        .context("opening the staging directory")
}

fn fresh_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Atomically replaces `rel` with `data` (mode `mode`); returns what the index must show.
pub fn write_file(root: &Path, rel: &RelPath, data: &[u8], mode: u32) -> anyhow::Result<Expect> {
    let staged = stage(root, rel, data, mode)?;
    place(root, staged)
}

/// A file written and fsynced under `.certmesh/tmp/`, not yet in place.
pub struct Staged {
    tmp_dir: OwnedFd,
    name: String,
    rel: RelPath,
    expect: Expect,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = safe_fs::unlink_at(self.tmp_dir.as_fd(), &self.name, false);
    }
}

/// Writes and fsyncs `data` for `rel` under `.certmesh/tmp/` (so that several files
/// can be renamed into place together, in one watcher batch).
pub fn stage(root: &Path, rel: &RelPath, data: &[u8], mode: u32) -> anyhow::Result<Staged> {
    let root = open(root)?;
    mkdirs(&root, rel)?;
    let staged = Staged {
        tmp_dir: tmp_dir(&root)?,
        name: fresh_name(),
        rel: rel.clone(),
        expect: Expect::File(ContentHash(*blake3::hash(data).as_bytes())),
    };
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(
        &staged.tmp_dir,
        staged.name.as_str(),
        flags,
        Mode::from_raw_mode(0o600),
    )
    .map_err(std::io::Error::from)
    .with_context(|| format!("staging {rel}"))?;
    let mut f = File::from(fd);
    f.write_all(data)
        .and_then(|()| safe_fs::chmod_fd(f.as_fd(), mode))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("staging {rel}"))?;
    Ok(staged)
}

/// Renames a staged file into place; returns what the index must show.
pub fn place(root: &Path, staged: Staged) -> anyhow::Result<Expect> {
    let root = open(root)?;
    let dir = mkdirs(&root, &staged.rel)?;
    safe_fs::rename_at(
        staged.tmp_dir.as_fd(),
        &staged.name,
        dir.as_fd(),
        staged.rel.name(),
    )
    .with_context(|| format!("writing {}", staged.rel))?;
    Ok(staged.expect.clone())
}

/// Atomically points the symlink `rel` at `target` (relative), replacing what was there.
pub fn symlink(root: &Path, rel: &RelPath, target: &str) -> anyhow::Result<Expect> {
    let root = open(root)?;
    let dir = mkdirs(&root, rel)?;
    let tmp = tmp_dir(&root)?;
    let name = fresh_name();
    safe_fs::symlink_at(target, tmp.as_fd(), &name)
        .with_context(|| format!("staging link {rel}"))?;
    if let Err(e) = safe_fs::rename_at(tmp.as_fd(), &name, dir.as_fd(), rel.name()) {
        let _ = safe_fs::unlink_at(tmp.as_fd(), &name, false);
        return Err(e).with_context(|| format!("flipping {rel}"));
    }
    let _ = File::from(dir).sync_all();
    Ok(Expect::Symlink(target.to_string()))
}

/// Removes a file, link (never what it points at) or empty directory if present.
pub fn remove(root: &Path, rel: &RelPath) -> Expect {
    let parent = rel
        .parent()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if let Ok(dir) = Root::open(root).and_then(|r| r.dir(&parent)) {
        if safe_fs::unlink_at(dir.as_fd(), rel.name(), false).is_err() {
            let _ = safe_fs::unlink_at(dir.as_fd(), rel.name(), true);
        }
    }
    Expect::Gone
}

/// Removes a directory and everything below it, following no link.
pub fn remove_all(root: &Path, rel: &RelPath) -> anyhow::Result<()> {
    let parent = rel
        .parent()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let dir = match open(root)?.dir(&parent) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("removing {rel}")),
    };
    safe_fs::remove_all_at(dir.as_fd(), rel.name()).with_context(|| format!("removing {rel}"))
}

/// Whether `index` shows `rel` as expected (a pure check: the waiting around it is
/// [`crate::handles::TreeWriter::await_indexed`]).
pub fn index_shows(index: &Index, rel: &RelPath, want: &Expect) -> bool {
    let e = index.get(rel);
    match want {
        Expect::Gone => e.is_none_or(|e| e.record.deleted),
        Expect::File(h) => e.is_some_and(|e| {
            !e.record.deleted && e.record.kind == Kind::File && e.record.hash == *h
        }),
        Expect::Symlink(t) => e.is_some_and(|e| {
            !e.record.deleted && e.record.kind == Kind::Symlink && e.record.target == *t
        }),
    }
}

/// Reads a regular file of the tree (at most [`MAX_READ`] bytes), `None` if absent or
/// refused. `live/<name>/<file>` is read from the version `live/<name>` points at.
pub fn read(root: &Path, rel: &str) -> Option<Vec<u8>> {
    read_checked(root, rel).ok()
}

/// [`read`] with the reason when it fails.
pub fn read_checked(root: &Path, rel: &str) -> std::io::Result<Vec<u8>> {
    let r = Root::open(root)?;
    let rel = resolve_live(&r, rel)?;
    r.read(&rel, MAX_READ)
}

/// Maps `live/<name>/<rest>` to `archive/<name>/<n>/<rest>` through the checked link;
/// any other path, and a `live/<name>` that is a real directory (files placed by
/// hand), is returned as is and read without following any link.
fn resolve_live(r: &Root, rel: &str) -> std::io::Result<String> {
    let mut parts = rel.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("live"), Some(name), Some(_))
            if r.lstat(&format!("live/{name}"))?
                .is_some_and(|m| m.is_dir()) =>
        {
            Ok(rel.to_string())
        }
        (Some("live"), Some(name), Some(rest)) => {
            let n = live_version_at(r, name)?;
            Ok(format!("archive/{name}/{n}/{rest}"))
        }
        _ => Ok(rel.to_string()),
    }
}

/// Why `live/<name>` cannot be published over (checked before ordering, so that a
/// certificate the CA issued is never lost to a tree it cannot be written into).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishTarget {
    /// `live/<name>` is a real directory: certbot's layout (per-file links into
    /// `archive/<name>/certN.pem`), which a link cannot be renamed over (EISDIR).
    #[error(
        "{path} is a directory (certbot's layout: per-file links into archive/{name}/), \
         but certmesh publishes live/{name} as a link to archive/{name}/<n>, which cannot \
         replace a directory. Fix: stop certbot's timer and run \
         `certmesh import --config <file> --from certbot {tree}` once (no new order; \
         {path}/fullchain.pem and privkey.pem keep working)"
    )]
    CertbotLive {
        path: String,
        name: String,
        tree: String,
    },
    /// `live/<name>`, `live`, `archive` or `archive/<name>` is something else that
    /// certmesh cannot write through or replace.
    #[error("{path} is {what}; certmesh needs {want}. Fix: move it out of the tree")]
    Blocked {
        path: String,
        what: &'static str,
        want: &'static str,
    },
    /// The tree could not be read.
    #[error("{path}: {error}")]
    Io { path: String, error: String },
}

/// Checks that a new version of `name` can be published: `live` and `archive` are
/// absent or real directories, `archive/<name>` too, and `live/<name>` is absent, a
/// link (any link: it is replaced, never followed) or a file (replaced too). A
/// directory there is refused as certbot's; [`crate::acme::bundle::plan_publish`]
/// replaces it when certmesh's own good versions exist.
pub fn check_publish_target(root: &Path, name: &str) -> Result<(), PublishTarget> {
    let shown = |rel: &str| root.join(rel).display().to_string();
    let io = |rel: &str, e: std::io::Error| PublishTarget::Io {
        path: shown(rel),
        error: e.to_string(),
    };
    let r = match Root::open(root) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("", e)),
    };
    let kind = |m: &std::fs::Metadata| {
        let t = m.file_type();
        if t.is_dir() {
            "a directory"
        } else if t.is_symlink() {
            "a symbolic link"
        } else if t.is_file() {
            "a regular file"
        } else {
            "a special file"
        }
    };
    let archive_name = format!("archive/{name}");
    for dir in ["live", "archive", archive_name.as_str()] {
        // `archive/<name>` is looked at inside `archive` only if that is a real
        // directory (checked just before); nothing on the way is followed.
        let m = match dir.split_once('/') {
            Some((parent, leaf)) => match r.dir(parent) {
                Ok(d) => safe_fs::lstat_at(d.as_fd(), leaf),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            None => safe_fs::lstat_at(r.fd(), dir),
        }
        .map_err(|e| io(dir, e))?;
        if let Some(m) = m.filter(|m| !m.is_dir()) {
            return Err(PublishTarget::Blocked {
                path: shown(dir),
                what: kind(&m),
                want: "a real directory there (or nothing)",
            });
        }
    }
    let live = match r.dir("live") {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("live", e)),
    };
    let rel = format!("live/{name}");
    match safe_fs::lstat_at(live.as_fd(), name).map_err(|e| io(&rel, e))? {
        None => Ok(()),
        Some(m) if m.file_type().is_symlink() => Ok(()),
        Some(m) if m.is_dir() => Err(PublishTarget::CertbotLive {
            path: shown(&rel),
            name: name.to_string(),
            tree: root.display().to_string(),
        }),
        // A file (or other non-directory) is replaced by the link on publish.
        Some(_) => Ok(()),
    }
}

/// The version `live/<name>` points at; `None` unless it is a link whose target is
/// exactly `../archive/<name>/<n>`.
pub fn live_version(root: &Path, name: &str) -> Option<u32> {
    live_version_at(&Root::open(root).ok()?, name).ok()
}

fn live_version_at(r: &Root, name: &str) -> std::io::Result<u32> {
    let refuse = |why: String| std::io::Error::other(format!("live/{name}: {why}"));
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(refuse("not a certificate name".into()));
    }
    let live = r.dir("live")?;
    let target = safe_fs::readlink_at(live.as_fd(), name)?;
    let target = String::from_utf8(target).map_err(|_| refuse("target is not UTF-8".into()))?;
    parse_live_target(name, &target).ok_or_else(|| refuse(format!("unexpected target {target:?}")))
}

/// `n` of `../archive/<name>/<n>` (decimal, no leading zero), nothing else.
pub fn parse_live_target(name: &str, target: &str) -> Option<u32> {
    let n = target
        .strip_prefix("../archive/")?
        .strip_prefix(name)?
        .strip_prefix('/')?;
    let v: u32 = n.parse().ok()?;
    (v.to_string() == n).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn the_index_shows_a_write_only_with_its_content_and_kind() {
        use crate::core::device::ShortId;
        use crate::core::index::tests::file;
        let mut index = Index::new(ShortId(1));
        let p = rel("live/www.pem").unwrap();
        assert!(index_shows(&index, &p, &Expect::Gone));
        index.observe(&p, Some(file("live/www.pem", 3, 10)), 10);
        assert!(index_shows(&index, &p, &Expect::File(ContentHash([3; 32]))));
        assert!(!index_shows(
            &index,
            &p,
            &Expect::File(ContentHash([4; 32]))
        ));
        assert!(!index_shows(&index, &p, &Expect::Symlink(String::new())));
        assert!(!index_shows(&index, &p, &Expect::Gone));
        index.observe(&p, None, 20);
        assert!(index_shows(&index, &p, &Expect::Gone));
        assert!(!index_shows(
            &index,
            &p,
            &Expect::File(ContentHash([3; 32]))
        ));
    }

    #[test]
    fn a_certbot_live_dir_is_refused_before_ordering() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        assert_eq!(check_publish_target(root, "www"), Ok(()));
        fs::create_dir_all(root.join("live/www")).unwrap();
        let e = check_publish_target(root, "www").unwrap_err();
        assert!(matches!(e, PublishTarget::CertbotLive { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&root.join("live/www").display().to_string()),
            "{msg}"
        );
        assert!(
            msg.contains("certmesh import") && msg.contains("--from certbot"),
            "{msg}"
        );
        fs::remove_dir(root.join("live/www")).unwrap();
        std::os::unix::fs::symlink("../archive/www/1", root.join("live/www")).unwrap();
        assert_eq!(check_publish_target(root, "www"), Ok(()));
        // Something else where a directory must be: named, with what it is.
        fs::write(root.join("archive"), "x").unwrap();
        let e = check_publish_target(root, "www").unwrap_err().to_string();
        assert!(e.contains("archive is a regular file"), "{e}");
        fs::remove_file(root.join("archive")).unwrap();
        fs::create_dir_all(root.join("archive")).unwrap();
        fs::write(root.join("archive/www"), "x").unwrap();
        let e = check_publish_target(root, "www").unwrap_err().to_string();
        assert!(e.contains("archive/www is a regular file"), "{e}");
    }

    #[test]
    fn live_link_is_followed_only_in_its_own_form() {
        assert_eq!(parse_live_target("www", "../archive/www/3"), Some(3));
        for bad in [
            "../archive/www/03",
            "../archive/www/3/",
            "../archive/other/3",
            "../archive/www/../../x",
            "/etc",
            "../archive/www/+3",
        ] {
            assert_eq!(parse_live_target("www", bad), None, "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        fs::create_dir_all(root.join("archive/www/1")).unwrap();
        fs::create_dir_all(root.join("live")).unwrap();
        fs::create_dir_all(root.join("elsewhere")).unwrap();
        fs::write(root.join("archive/www/1/cert.pem"), "C").unwrap();
        fs::write(root.join("elsewhere/cert.pem"), "E").unwrap();
        std::os::unix::fs::symlink("../archive/www/1", root.join("live/www")).unwrap();
        std::os::unix::fs::symlink("../elsewhere", root.join("live/bad")).unwrap();
        assert_eq!(read(root, "live/www/cert.pem").as_deref(), Some(&b"C"[..]));
        assert_eq!(live_version(root, "www"), Some(1));
        assert!(read(root, "live/bad/cert.pem").is_none());
        assert!(read(root, "elsewhere/cert.pem").is_some());
        // A live/<name> that is a real directory (placed by hand) is read as it is.
        fs::create_dir_all(root.join("live/plain")).unwrap();
        fs::write(root.join("live/plain/cert.pem"), "P").unwrap();
        assert_eq!(
            read(root, "live/plain/cert.pem").as_deref(),
            Some(&b"P"[..])
        );
        std::os::unix::fs::symlink("../../archive/www/1/cert.pem", root.join("live/plain/l"))
            .unwrap();
        assert!(read(root, "live/plain/l").is_none());
        // A link to the key elsewhere in the tree is not followed by plain reads.
        std::os::unix::fs::symlink("../archive/www/1/cert.pem", root.join("elsewhere/k")).unwrap();
        assert!(read(root, "elsewhere/k").is_none());
    }
}
