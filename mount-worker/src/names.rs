//! The names a file kept by handle is opened by.
//!
//! Main's files and a branch's own files are kept by file handle, not by
//! a descriptor, and opened at each use by a name that still leads to
//! them: one opened by a bare handle may have no path on the host once
//! the host has dropped its cached names, and Landlock refuses an open or
//! a link of it (it checks the path it reaches from the dentry). One name
//! is not enough: after `ln f g; rm g` the kernel still holds the file's
//! node and asks for it again without looking `f` up, so a file with
//! several links keeps the few names it was last found at. Only such a
//! file: each name holds its directory's descriptor, which a stale name
//! would keep open after the directory is gone.

use std::ffi::CStr;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Mutex;

use crate::hostfs::{self, HostHandle};

/// How many names a file keeps.
const KEPT: usize = 4;

/// Names of one file, newest first.
pub struct Names<T>(Mutex<Vec<T>>);

impl<T: Clone + PartialEq> Names<T> {
    /// Starts with `first`, if known.
    pub fn new(first: Option<T>) -> Names<T> {
        Names(Mutex::new(first.into_iter().collect()))
    }

    /// The newest name.
    pub fn newest(&self) -> Option<T> {
        self.0.lock().unwrap().first().cloned()
    }

    /// `name` leads to the file now (it was found, made or moved there):
    /// it is tried first from now on, and the others only if the file
    /// has several `links`. Whether it was not first already.
    pub fn learn(&self, name: T, links: u64) -> bool {
        let mut names = self.0.lock().unwrap();
        let new = names.first() != Some(&name);
        if links <= 1 {
            names.clear();
        } else {
            names.retain(|n| *n != name);
        }
        names.insert(0, name);
        names.truncate(KEPT);
        new
    }

    /// `name` leads to the file too, to be tried last (an entry that
    /// stays while the file has any name, such as a hard-link index's).
    pub fn also(&self, name: T) {
        let mut names = self.0.lock().unwrap();
        if !names.contains(&name) && names.len() < KEPT {
            names.push(name);
        }
    }

    /// Opens the file `handle` names as `O_PATH`: by the first name that
    /// still leads to it (`named` gives a name's directory and component,
    /// `None` for one that can no longer be used), else by the handle on
    /// the file system of `any` (not `O_PATH`). The names tried before
    /// lead elsewhere now: they are dropped.
    pub fn open(
        &self,
        any: BorrowedFd<'_>,
        handle: &HostHandle,
        named: impl for<'a> Fn(&'a T) -> Option<(BorrowedFd<'a>, &'a CStr)>,
    ) -> io::Result<OwnedFd> {
        let names = self.0.lock().unwrap().clone();
        let (fd, by) = hostfs::open_handle_by_names(any, handle, names.iter().map(named))?;
        let stale = &names[..by.unwrap_or(names.len())];
        if !stale.is_empty() {
            self.0.lock().unwrap().retain(|n| !stale.contains(n));
        }
        Ok(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File};
    use std::os::fd::AsFd;
    use std::sync::Arc;

    #[test]
    fn the_newest_name_comes_first_and_only_a_few_are_kept_for_hard_links() {
        let names = Names::new(Some(0));
        assert!(!names.learn(0, 2), "first already");
        for n in 1..=5 {
            assert!(names.learn(n, 2));
        }
        assert!(names.learn(3, 2), "known, not first");
        assert_eq!(*names.0.lock().unwrap(), [3, 5, 4, 2]);
        assert_eq!(names.newest(), Some(3));
        // With one link, the file is at one name only.
        assert!(names.learn(7, 1));
        assert_eq!(*names.0.lock().unwrap(), [7]);
    }

    /// A name as a test keeps it.
    #[derive(Clone, Debug)]
    struct At(Arc<OwnedFd>, &'static CStr);

    impl PartialEq for At {
        fn eq(&self, other: &At) -> bool {
            self.1 == other.1
        }
    }

    fn named(at: &At) -> Option<(BorrowedFd<'_>, &CStr)> {
        Some((at.0.as_fd(), at.1))
    }

    /// After `ln f g; rm g` (g learnt last), the file opens by `f`, and
    /// `g`, which leads nowhere now, is dropped.
    #[test]
    fn a_file_opens_by_an_older_name_once_the_newest_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("f"), b"x").unwrap();
        fs::hard_link(tmp.path().join("f"), tmp.path().join("g")).unwrap();
        let dir = Arc::new(OwnedFd::from(File::open(tmp.path()).unwrap()));
        let handle = hostfs::handle_of(File::open(tmp.path().join("f")).unwrap().as_fd()).unwrap();
        let names = Names::new(Some(At(dir.clone(), c"f")));
        names.learn(At(dir.clone(), c"g"), 2);
        fs::remove_file(tmp.path().join("g")).unwrap();
        let fd = names.open(dir.as_fd(), &handle, named).unwrap();
        assert_eq!(hostfs::handle_of(fd.as_fd()).unwrap(), handle);
        assert_eq!(*names.0.lock().unwrap(), [At(dir.clone(), c"f")]);
        // Gone altogether: by the handle (the inode is still open here).
        let _open = File::open(tmp.path().join("f")).unwrap();
        fs::remove_file(tmp.path().join("f")).unwrap();
        let fd = names.open(dir.as_fd(), &handle, named).unwrap();
        assert_eq!(hostfs::handle_of(fd.as_fd()).unwrap(), handle);
        assert!(names.newest().is_none());
    }
}
