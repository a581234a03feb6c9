//! Writing an imported certificate into the tree (staged, then renamed) and turning
//! the paths web servers already use into links to it, each old entry copied to the
//! backup first.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use super::{bad, io, Found, ImportError};
use crate::acme::bundle::MAX_ARCHIVE_VERSION;

/// Writes `archive/<name>/<n>/` (staged as a whole, then renamed in) and points
/// `live/<name>` at it. In place (certbot's own tree), certbot's `live/<name>`
/// directory is swapped for the link in one `renameat2(RENAME_EXCHANGE)` after its
/// links were copied to `backup`.
pub(super) fn publish(
    tree: &Path,
    f: &Found,
    in_place: bool,
    backup: &Path,
) -> Result<u32, ImportError> {
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
pub(super) fn replace_dir_with_link(
    dir: &Path,
    target: &Path,
    backup: &Path,
) -> Result<(), ImportError> {
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
pub(super) fn replace_file_with_link(
    old: &Path,
    target: &Path,
    backup: &Path,
) -> Result<(), ImportError> {
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
