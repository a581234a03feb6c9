//! Reaching paths of the tree without ever following a symlink certmesh did not make.
//!
//! The tree root is opened once as a directory handle ([`Root`]); everything below it
//! is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (Linux ≥ 5.6), or,
//! where that syscall is missing, by walking the components with
//! `openat(O_NOFOLLOW | O_DIRECTORY)`. Writers then act on the parent directory's
//! handle (`renameat`, `unlinkat`, `mkdirat`, `symlinkat`) and change modes with
//! `fchmod` on an opened descriptor, never by path. The one link certmesh follows,
//! `live/<name> -> ../archive/<name>/<n>`, is read with `readlinkat` and checked by
//! `disk::tree`. Also here: [`check_link`] (a link target checked against the disk,
//! component by component) and [`KeyScanner`] (a PEM private key found by content).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;

use crate::core::paths::{PathError, RelPath};

/// Set once `openat2` turned out to be missing (ENOSYS): walk components instead.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Why a symlink target is not acceptable on this disk.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The target text itself is refused (absolute, escaping, under `acme/`, …).
    #[error(transparent)]
    Path(#[from] PathError),
    /// A component of the target is itself a symlink: the kernel would follow it.
    #[error("link {link} -> {target} passes through another link at {at}")]
    ThroughLink {
        link: String,
        target: String,
        at: String,
    },
    /// The target (or a directory on the way) is not there yet.
    #[error("link target {target} of {link} not present yet")]
    Missing { link: String, target: String },
    /// Looking at the disk failed.
    #[error("checking link {link}: {source}")]
    Io { link: String, source: io::Error },
}

/// The tree root, opened once; every path below it is reached from this handle.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Opens the configured root (the root itself may be a link: the operator chose it).
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` (relative, `""` = the root) with `flags`, following no symlink.
    pub fn open_at(&self, rel: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        open_beneath(self.fd(), rel, flags, mode)
    }

    /// An existing directory below the root (`""`: the root itself).
    pub fn dir(&self, rel: &str) -> io::Result<OwnedFd> {
        self.open_at(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
    }

    /// Opens a regular file for reading; anything else (link, dir, fifo) is refused.
    pub fn open_file(&self, rel: &str) -> io::Result<File> {
        let f = File::from(self.open_at(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::other(format!("{rel} is not a regular file")));
        }
        Ok(f)
    }

    /// Reads a regular file of at most `max` bytes.
    pub fn read(&self, rel: &str, max: u64) -> io::Result<Vec<u8>> {
        read_bounded(&self.open_file(rel)?, max)
    }

    /// lstat of `rel`: `None` if absent; an error if a directory on the way is a link.
    pub fn lstat(&self, rel: &str) -> io::Result<Option<Metadata>> {
        match self.open_at(rel, OFlags::PATH, Mode::empty()) {
            Ok(fd) => File::from(fd).metadata().map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The directory `rel`, created (with `mode`) where missing, component by
    /// component without following links. Directories created are pushed to `created`
    /// by their parent's relative path (for fsync).
    pub fn make_dirs(
        &self,
        rel: &str,
        mode: u32,
        created: &mut Vec<String>,
    ) -> io::Result<OwnedFd> {
        match self.dir(rel) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => return r.map_err(|e| not_a_dir(rel, e)),
        }
        let mut cur = self.dir("")?;
        let mut prefix = String::new();
        for c in rel.split('/').filter(|c| !c.is_empty()) {
            if c == "." || c == ".." {
                return Err(io::Error::other(format!("{rel}: bad component")));
            }
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let next = match rustix::fs::openat(&cur, c, flags, Mode::empty()) {
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(mode)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    created.push(prefix.clone());
                    rustix::fs::openat(&cur, c, flags, Mode::empty())
                }
                r => r,
            };
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            cur = next.map_err(|e| not_a_dir(&prefix, e.into()))?;
        }
        Ok(cur)
    }
}

fn not_a_dir(rel: &str, e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV) => io::Error::other(format!(
            "{rel} is not a directory (or passes through a link)"
        )),
        _ => e,
    }
}

/// `openat2(dir, rel, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or a component walk
/// with `O_NOFOLLOW` where openat2 is missing. The last component is never followed
/// either (with `O_PATH` a link there is opened as itself).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let rel = if rel.is_empty() { "." } else { rel };
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        for _ in 0..8 {
            match rustix::fs::openat2(dir, rel, flags, mode, how) {
                // A rename raced the lookup: the kernel asks us to retry.
                Err(Errno::AGAIN) => continue,
                Err(Errno::NOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                r => return r.map_err(Into::into),
            }
        }
    }
    open_walk(dir, rel, flags, mode)
}

/// The fallback: each directory opened with `O_NOFOLLOW | O_DIRECTORY`, `..` refused.
fn open_walk(dir: BorrowedFd<'_>, rel: &str, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let comps: Vec<&str> = rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if comps.contains(&"..") || rel.starts_with('/') {
        return Err(Errno::XDEV.into());
    }
    let Some((last, dirs)) = comps.split_last() else {
        return Ok(rustix::fs::openat(dir, ".", flags, mode)?);
    };
    let mut cur: Option<OwnedFd> = None;
    for c in dirs {
        let base = cur.as_ref().map_or(dir, |f| f.as_fd());
        let dflags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        cur = Some(rustix::fs::openat(base, *c, dflags, Mode::empty())?);
    }
    let base = cur.as_ref().map_or(dir, |f| f.as_fd());
    Ok(rustix::fs::openat(base, *last, flags, mode)?)
}

/// lstat of `name` directly in `dir`; `None` if absent.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<Option<Metadata>> {
    match rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => File::from(fd).metadata().map(Some),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens `name` directly in `dir` without following it.
pub fn open_at(dir: BorrowedFd<'_>, name: &str, flags: OFlags) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// The target of the symlink opened (with `O_PATH | O_NOFOLLOW`) as `fd`.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(fd, "", Vec::new())?.into_bytes())
}

/// The target of the symlink `name` directly in `dir`.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
}

/// `unlinkat` of a file or link (`dir = false`) or an empty directory.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &str, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    };
    Ok(rustix::fs::unlinkat(dir, name, flags)?)
}

/// `renameat` between two directory handles.
pub fn rename_at(from: BorrowedFd<'_>, old: &str, to: BorrowedFd<'_>, new: &str) -> io::Result<()> {
    Ok(rustix::fs::renameat(from, old, to, new)?)
}

/// `symlinkat(target, dir, name)`.
pub fn symlink_at(target: &str, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

/// `mkdirat`; an existing entry is not an error (the caller looks at what it is).
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `fchmod` on an open descriptor.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

/// Removes `name` in `dir` and, for a directory, everything below it, without
/// following any link (links are removed as links).
pub fn remove_all_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let Some(m) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if !m.is_dir() {
        return unlink_at(dir, name, false);
    }
    let sub = open_at(dir, name, OFlags::RDONLY | OFlags::DIRECTORY)?;
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(String::from_utf8_lossy(n).into_owned());
        }
    }
    for n in names {
        remove_all_at(sub.as_fd(), &n)?;
    }
    unlink_at(dir, name, true)
}

/// The names directly in the directory `fd` (without `.` and `..`).
pub fn list(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(fd)? {
        let n = ent?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            out.push(n);
        }
    }
    Ok(out)
}

/// The names directly in the directory `fd` with their `d_type` (may be `Unknown`)
/// and inode number.
pub fn list_typed(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, rustix::fs::FileType, u64)>> {
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(fd)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            out.push((n, ent.file_type(), ent.ino()));
        }
    }
    Ok(out)
}

/// Reads at most `max` bytes; a longer file is an error, not a truncation.
pub fn read_bounded(f: &File, max: u64) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    f.take(max.saturating_add(1)).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(data)
}

/// Checks a symlink `link -> target` against the disk: the target text is valid
/// (see [`RelPath::resolve_symlink_target`]), every directory on the way to it is a
/// real directory, and the target itself is present and not a link. So no link ever
/// leads through another one.
pub fn check_link(root: &Root, link: &RelPath, target: &str) -> Result<RelPath, LinkError> {
    let resolved = link.resolve_symlink_target(target)?;
    let missing = || LinkError::Missing {
        link: link.to_string(),
        target: target.to_string(),
    };
    let parent = resolved
        .parent()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let dir = match root.dir(&parent) {
        Ok(d) => d,
        Err(e) => {
            // `O_DIRECTORY | O_NOFOLLOW` on a link says ENOTDIR: look at what it is.
            let is_link = |e: &io::Error| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => true,
                Some(libc::ENOTDIR) => match root.lstat(&parent) {
                    Ok(Some(m)) => m.file_type().is_symlink(),
                    Ok(None) => false,
                    Err(e) => matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::EXDEV)),
                },
                _ => false,
            };
            return Err(match e.raw_os_error() {
                _ if is_link(&e) => LinkError::ThroughLink {
                    link: link.to_string(),
                    target: target.to_string(),
                    at: parent,
                },
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => missing(),
                _ => LinkError::Io {
                    link: link.to_string(),
                    source: e,
                },
            });
        }
    };
    match lstat_at(dir.as_fd(), resolved.name()) {
        Ok(None) => Err(missing()),
        Ok(Some(m)) if m.file_type().is_symlink() => Err(LinkError::ThroughLink {
            link: link.to_string(),
            target: target.to_string(),
            at: resolved.to_string(),
        }),
        Ok(Some(_)) => Ok(resolved),
        Err(e) => Err(LinkError::Io {
            link: link.to_string(),
            source: e,
        }),
    }
}

/// Finds a PEM private key block (`-----BEGIN … PRIVATE KEY-----`: PKCS#8, RSA, EC,
/// encrypted) in content fed in chunks of any size; a marker may straddle chunks.
#[derive(Debug, Default)]
pub struct KeyScanner {
    carry: Vec<u8>,
    found: bool,
}

/// The end of every private-key BEGIN line.
const KEY_MARKER: &[u8] = b"PRIVATE KEY-----";
const BEGIN: &[u8] = b"-----BEGIN ";
/// Longest label between `-----BEGIN ` and ` PRIVATE KEY-----` considered.
const MAX_LABEL: usize = 32;
/// Bytes kept from one chunk to the next: a whole BEGIN line fits.
const CARRY: usize = BEGIN.len() + MAX_LABEL + KEY_MARKER.len();

impl KeyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk. The chunk is searched in place; only the seam with the
    /// previous chunk (at most [`CARRY`] bytes each side) is copied.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.found {
            return;
        }
        if !self.carry.is_empty() {
            let mut seam = std::mem::take(&mut self.carry);
            seam.extend_from_slice(&chunk[..chunk.len().min(CARRY)]);
            if holds_begin_key(&seam) {
                self.found = true;
                return;
            }
            self.carry = seam;
            self.carry
                .truncate(self.carry.len() - chunk.len().min(CARRY));
        }
        if holds_begin_key(chunk) {
            self.found = true;
            return;
        }
        if chunk.len() >= CARRY {
            self.carry.clear();
            self.carry.extend_from_slice(&chunk[chunk.len() - CARRY..]);
        } else {
            self.carry.extend_from_slice(chunk);
            let extra = self.carry.len().saturating_sub(CARRY);
            self.carry.drain(..extra);
        }
    }

    pub fn found(&self) -> bool {
        self.found
    }

    /// Reads `f` to the end in 64 KiB chunks.
    pub fn scan(mut f: impl Read) -> io::Result<bool> {
        let mut s = KeyScanner::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = match f.read(&mut chunk) {
                Ok(0) => return Ok(s.found()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            s.feed(&chunk[..n]);
            if s.found() {
                return Ok(true);
            }
        }
    }
}

/// True when `buf` holds `-----BEGIN <label>PRIVATE KEY-----` on one line.
fn holds_begin_key(buf: &[u8]) -> bool {
    let mut from = 0;
    while let Some(i) = find(&buf[from..], KEY_MARKER) {
        let at = from + i;
        let start = at.saturating_sub(BEGIN.len() + MAX_LABEL);
        let before = &buf[start..at];
        if let Some(b) = rfind(before, BEGIN) {
            let label = &before[b + BEGIN.len()..];
            if label.iter().all(|c| c.is_ascii_uppercase() || *c == b' ') {
                return true;
            }
        }
        from = at + 1;
    }
    false
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::rfind(hay, needle)
}

/// Free and total bytes of the filesystem holding `dir` (`statvfs`; free as this
/// unprivileged process sees it), for `[tree] min_disk_free`.
pub fn disk_space(dir: &Path) -> io::Result<crate::core::plan::DiskSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path; `st` is written by the call before use.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok(crate::core::plan::DiskSpace {
        free: (st.f_bavail as u64).saturating_mul(frsize),
        total: (st.f_blocks as u64).saturating_mul(frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn rel(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn key_markers_of_every_kind_are_found_across_chunk_borders() {
        for label in ["", "RSA ", "EC ", "ENCRYPTED "] {
            let pem = format!(
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n-----BEGIN {label}PRIVATE KEY-----\nMIIE\n"
            );
            for size in [1, 3, 7, 16, 64, 4096] {
                let mut s = KeyScanner::new();
                pem.as_bytes().chunks(size).for_each(|c| s.feed(c));
                assert!(s.found(), "{label:?} in chunks of {size}");
            }
            assert!(KeyScanner::scan(pem.as_bytes()).unwrap());
        }
        // A key after a large padding, the file cut in two at every offset around it.
        let mut padded = vec![b'x'; 100_000];
        padded.extend_from_slice(b"-----BEGIN EC PRIVATE KEY-----\n");
        for cut in 99_950..padded.len() {
            let mut s = KeyScanner::new();
            s.feed(&padded[..cut]);
            s.feed(&padded[cut..]);
            assert!(s.found(), "cut at {cut}");
        }
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert!(!KeyScanner::scan(cert.as_bytes()).unwrap());
        assert!(!KeyScanner::scan(&b"PRIVATE KEY----- alone"[..]).unwrap());
        assert!(!KeyScanner::scan(&b"-----BEGIN PUBLIC KEY-----"[..]).unwrap());
    }

    #[test]
    fn opens_refuse_links_on_the_way_and_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("tree");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), "x").unwrap();
        fs::write(d.path().join("outside"), "secret").unwrap();
        symlink("b", root.join("a/lnk")).unwrap();
        symlink("../../outside", root.join("a/out")).unwrap();
        let r = Root::open(&root).unwrap();
        assert_eq!(r.read("a/b/f", 10).unwrap(), b"x");
        assert!(r.read("a/lnk/f", 10).is_err());
        assert!(r.read("a/out", 10).is_err());
        assert!(r.read("a/b/f", 0).is_err(), "bound not enforced");
        assert!(r.lstat("a/out").unwrap().unwrap().file_type().is_symlink());
        // The fallback walk refuses the same.
        let flags = OFlags::RDONLY;
        assert!(open_walk(r.fd(), "a/lnk/f", flags, Mode::empty()).is_err());
        assert!(open_walk(r.fd(), "a/out", flags, Mode::empty()).is_err());
        assert!(open_walk(r.fd(), "a/../a/b/f", flags, Mode::empty()).is_err());
        assert!(open_walk(r.fd(), "a/b/f", flags, Mode::empty()).is_ok());
        let mut created = Vec::new();
        assert!(r.make_dirs("a/lnk/new", 0o755, &mut created).is_err());
        r.make_dirs("a/x/y", 0o755, &mut created).unwrap();
        assert_eq!(created, ["a", "a/x"]);
    }

    #[test]
    fn link_through_a_link_is_refused_and_missing_target_waits() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("tree");
        fs::create_dir_all(root.join("deep/a/b/c")).unwrap();
        fs::create_dir_all(root.join("x")).unwrap();
        symlink("../../../../x", root.join("deep/a/b/c/l")).unwrap();
        let r = Root::open(&root).unwrap();
        assert!(check_link(&r, &rel("deep/a/b/c/l"), "../../../../x").is_ok());
        let e = check_link(&r, &rel("foo"), "deep/a/b/c/l/y").unwrap_err();
        assert!(matches!(e, LinkError::ThroughLink { .. }), "{e}");
        let e = check_link(&r, &rel("foo"), "deep/a/b/c/l").unwrap_err();
        assert!(matches!(e, LinkError::ThroughLink { .. }), "{e}");
        let e = check_link(&r, &rel("foo"), "nothing/here").unwrap_err();
        assert!(matches!(e, LinkError::Missing { .. }), "{e}");
    }
}
