//! The one atomic, durable file write: content goes to a new temporary file (mode
//! set before anything is written), is fsynced, renamed over the destination, and the
//! destination's directory is fsynced. A crash leaves the old file or the new one,
//! never a mix. Used for the node identity, the index file and restored versions.
//! (Writes into the replicated tree from peers and ACME go through `apply` and
//! `disk::tree`, which add link-safe directory handles on top of the same steps.)

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Replaces `dest` with `data` (mode `mode`), the temporary file beside it.
pub fn replace(dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    replace_via(dir, dest, data, mode)
}

/// As [`replace`], the temporary file in `staging` (same file system as `dest`):
/// for the replicated tree, where a temporary file beside the destination would be
/// seen by the watcher.
pub fn replace_via(staging: &Path, dest: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let name = dest
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = staging.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = dest.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_with_mode_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key.pem");
        fs::write(&p, "old").unwrap();
        replace(&p, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, "old").unwrap();
        let missing = d.path().join("no-such-staging-dir");
        assert!(replace_via(&missing, &p, b"new", 0o644).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
    }
}
