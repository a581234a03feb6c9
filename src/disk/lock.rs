//! The state directory's lock: `certmesh run` holds an exclusive `flock`
//! on `<state_dir>/lock` from before it reads anything there until it exits, so a
//! second daemon with the same config stops before it loads or rewrites `index.db`.
//! The holder's pid is written into the file for the second one's message. The
//! kernel drops the lock when the process dies, however it dies: no stale locks.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "state dir {dir} is in use by pid {pid} (another `certmesh run` with this node.state_dir); \
         stop it first, or give this node its own state dir"
    )]
    InUse { dir: PathBuf, pid: String },
    /// The state directory does not exist.
    #[error("state dir {dir} does not exist; create this node's identity with `certmesh init --state-dir {dir}`")]
    Missing { dir: PathBuf },
    /// Opening, locking or writing the lock file failed.
    #[error("locking {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive lock on a state directory, released when dropped (or when the
/// process ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock on `state_dir` without waiting, and writes this pid into it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        if !state_dir.is_dir() {
            return Err(LockError::Missing {
                dir: state_dir.to_path_buf(),
            });
        }
        let path = state_dir.join(LOCK_FILE);
        let io = |source: std::io::Error| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::InUse {
                    dir: state_dir.to_path_buf(),
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_string()
                    },
                });
            }
            Err(e) => return Err(io(e.into())),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let e = StateLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("in use by pid {}", std::process::id())),
            "{e}"
        );
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn a_missing_state_dir_suggests_init() {
        let dir = tempfile::tempdir().unwrap();
        let e = StateLock::acquire(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("certmesh init --state-dir"), "{e}");
    }
}
