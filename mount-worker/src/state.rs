//! The worker's state directory. For now it holds only the lock that keeps
//! two workers off the same state; snapshots and branches will live here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::StartupError;

/// An exclusively locked state directory. The lock is released when the
/// process exits, however it exits, so a killed worker never blocks the next.
pub struct StateDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Creates `path` (mode 0700) if needed and takes its lock.
    pub fn open(path: &Path) -> Result<StateDir, StartupError> {
        let fail = |e: io::Error| StartupError::StateDir(path.to_owned(), e);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(fail)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path.join("lock"))
            .map_err(fail)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "unknown pid".to_owned(),
                    pid => format!("pid {pid}"),
                };
                return Err(StartupError::StateDirBusy(path.to_owned(), holder));
            }
            Err((_, e)) => return Err(fail(e.into())),
        };
        lock.set_len(0).map_err(fail)?;
        lock.rewind().map_err(fail)?;
        writeln!(lock, "{}", std::process::id()).map_err(fail)?;
        Ok(StateDir {
            path: path.to_owned(),
            _lock: lock,
        })
    }

    /// Where the state lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
