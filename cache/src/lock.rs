//! Advisory file locks (std's `File::lock`, released by the OS when a process dies, so
//! no stale lock ever needs a manual unlock). `run` holds the cache lock shared, `gc`
//! exclusive; each stage key is locked exclusively while it executes, so two processes
//! never run the same key and the second one reuses the first one's result.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Exclusive locks open the file for writing (creating it): on NFS, flock is
    /// emulated with POSIX locks, whose write locks need a writable descriptor.
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).truncate(false).write(true).open(path)
    }

    /// A shared lock needs only read access: an existing lock file is opened read-only,
    /// so readers can lock a read-only cache; only a missing one is created.
    fn open_for_shared(path: &Path) -> io::Result<File> {
        match File::open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::open(path),
            other => other,
        }
    }

    pub fn shared(path: &Path) -> io::Result<FileLock> {
        let file = Self::open_for_shared(path)?;
        file.lock_shared()?;
        Ok(FileLock { _file: file })
    }

    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        let file = Self::open(path)?;
        file.lock()?;
        Ok(FileLock { _file: file })
    }

    /// `None` when someone else holds it.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
        let file = Self::open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(FileLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}
