//! Writing into the shared tree the way a person would, so the sync core picks it
//! up: stage under `.certmesh/tmp/` (local-only, same filesystem), fsync, rename into
//! place; then make sure the local index holds the change before relying on it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::index::{ContentHash, Kind};
use crate::node::Shared;
use crate::paths::RelPath;

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

fn mkdirs(shared: &Shared, rel: &RelPath) -> anyhow::Result<()> {
    if let Some(parent) = rel.under(&shared.tree.root).parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

/// Atomically replaces `rel` with `data` (mode `mode`); returns what the index must show.
pub fn write_file(
    shared: &Shared,
    rel: &RelPath,
    data: &[u8],
    mode: u32,
) -> anyhow::Result<Expect> {
    let staged = stage(shared, rel, data, mode)?;
    place(shared, staged)
}

/// A file written and fsynced under `.certmesh/tmp/`, not yet in place.
pub struct Staged {
    tmp: std::path::PathBuf,
    rel: RelPath,
    expect: Expect,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Writes and fsyncs `data` for `rel` under `.certmesh/tmp/` (so that several files
/// can be renamed into place together, in one watcher batch).
pub fn stage(shared: &Shared, rel: &RelPath, data: &[u8], mode: u32) -> anyhow::Result<Staged> {
    mkdirs(shared, rel)?;
    let tmp = shared.tree.staging_path();
    let staged = Staged {
        tmp,
        rel: rel.clone(),
        expect: Expect::File(ContentHash(*blake3::hash(data).as_bytes())),
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staged.tmp)
        .with_context(|| format!("staging {rel}"))?;
    f.write_all(data)
        .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("staging {rel}"))?;
    Ok(staged)
}

/// Renames a staged file into place; returns what the index must show.
pub fn place(shared: &Shared, staged: Staged) -> anyhow::Result<Expect> {
    fs::rename(&staged.tmp, staged.rel.under(&shared.tree.root))
        .with_context(|| format!("writing {}", staged.rel))?;
    Ok(staged.expect.clone())
}

/// Atomically points the symlink `rel` at `target` (relative), replacing what was there.
pub fn symlink(shared: &Shared, rel: &RelPath, target: &str) -> anyhow::Result<Expect> {
    mkdirs(shared, rel)?;
    let tmp = shared.tree.staging_path();
    std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("staging link {rel}"))?;
    if let Err(e) = fs::rename(&tmp, rel.under(&shared.tree.root)) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("flipping {rel}"));
    }
    if let Some(parent) = rel.under(&shared.tree.root).parent() {
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(Expect::Symlink(target.to_string()))
}

/// Removes a file (or an empty directory) if present.
pub fn remove(shared: &Shared, rel: &RelPath) -> Expect {
    let p = rel.under(&shared.tree.root);
    if fs::remove_file(&p).is_err() {
        let _ = fs::remove_dir(&p);
    }
    Expect::Gone
}

/// Removes a directory and everything below it.
pub fn remove_all(shared: &Shared, rel: &RelPath) -> anyhow::Result<()> {
    let p = rel.under(&shared.tree.root);
    match fs::remove_dir_all(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

fn indexed(shared: &Shared, rel: &RelPath, want: &Expect) -> bool {
    let st = shared.lock();
    let e = st.index.get(rel);
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

/// Asks the scanner for these paths and waits until the local index shows every one
/// as expected (the watcher usually has it already). Returns the highest local
/// sequence among them, which is what peers must acknowledge.
pub async fn await_indexed(
    shared: &Shared,
    items: &[(RelPath, Expect)],
    timeout: Duration,
) -> anyhow::Result<u64> {
    let start = Instant::now();
    let mut changed = shared.changed.subscribe();
    let _ = shared
        .rescan
        .send(items.iter().map(|(p, _)| p.clone()).collect());
    loop {
        changed.borrow_and_update();
        if items.iter().all(|(p, want)| indexed(shared, p, want)) {
            let st = shared.lock();
            return Ok(items
                .iter()
                .filter_map(|(p, _)| st.index.get(p).map(|e| e.sequence))
                .max()
                .unwrap_or(0));
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            let missing: Vec<String> = items
                .iter()
                .filter(|(p, w)| !indexed(shared, p, w))
                .map(|(p, _)| p.to_string())
                .collect();
            bail!("the local index did not pick up {missing:?} within {timeout:?}");
        }
        // Woken by the scanner's commit; the short poll covers a commit that
        // happened before we subscribed.
        let _ = tokio::time::timeout(left.min(Duration::from_millis(20)), changed.changed()).await;
    }
}

/// Reads a file of the tree, `None` if absent.
pub fn read(root: &Path, rel: &str) -> Option<Vec<u8>> {
    fs::read(root.join(rel)).ok()
}
