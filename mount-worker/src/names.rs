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

/// Names of one file: the few it was last found at, newest first, and
/// one that lasts while it has any name.
pub struct Names<T>(Mutex<Known<T>>);

struct Known<T> {
    recent: Vec<T>,
    lasting: Option<T>,
}

impl<T: Clone + PartialEq> Names<T> {
    /// Starts with `first`, if known.
    pub fn new(first: Option<T>) -> Names<T> {
        Names(Mutex::new(Known {
            recent: first.into_iter().collect(),
            lasting: None,
        }))
    }

    /// The newest name.
    pub fn newest(&self) -> Option<T> {
        let names = self.0.lock().unwrap();
        names.recent.first().or(names.lasting.as_ref()).cloned()
    }

    /// `name` leads to the file now (it was found, made or moved there):
    /// it is tried first from now on, and the others only if the file
    /// has several `links`. Whether it was not first already.
    pub fn learn(&self, name: T, links: u64) -> bool {
        let mut names = self.0.lock().unwrap();
        let recent = &mut names.recent;
        let new = recent.first() != Some(&name);
        if links <= 1 {
            recent.clear();
        } else {
            recent.retain(|n| *n != name);
        }
        recent.insert(0, name);
        recent.truncate(KEPT);
        new
    }

    /// `name` leads to the file too, to be tried last and kept however
    /// many names are learnt after it (an entry that stays while the file
    /// has any name, such as a hard-link index's).
    pub fn also(&self, name: T) {
        let mut names = self.0.lock().unwrap();
        names.recent.retain(|n| *n != name);
        names.lasting.get_or_insert(name);
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
        let all: Vec<T> = {
            let names = self.0.lock().unwrap();
            names.recent.iter().chain(&names.lasting).cloned().collect()
        };
        let (fd, by) = hostfs::open_handle_by_names(any, handle, all.iter().map(named))?;
        let stale = &all[..by.unwrap_or(all.len())];
        if !stale.is_empty() {
            let mut names = self.0.lock().unwrap();
            names.recent.retain(|n| !stale.contains(n));
            if names.lasting.as_ref().is_some_and(|n| stale.contains(n)) {
                names.lasting = None;
            }
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
        assert_eq!(names.0.lock().unwrap().recent, [3, 5, 4, 2]);
        assert_eq!(names.newest(), Some(3));
        // With one link, the file is at one name only.
        assert!(names.learn(7, 1));
        assert_eq!(names.0.lock().unwrap().recent, [7]);
    }

    /// A name given by `also` outlasts any number of names learnt after.
    #[test]
    fn a_lasting_name_is_kept_however_many_are_learnt() {
        let names = Names::new(Some(0));
        names.also(9);
        for n in 1..=5 {
            names.learn(n, 2);
        }
        names.learn(6, 1);
        let known = names.0.lock().unwrap();
        assert_eq!((&known.recent[..], known.lasting), (&[6][..], Some(9)));
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
        assert_eq!(names.0.lock().unwrap().recent, [At(dir.clone(), c"f")]);
        // Gone altogether: by the handle (the inode is still open here).
        let _open = File::open(tmp.path().join("f")).unwrap();
        fs::remove_file(tmp.path().join("f")).unwrap();
        let fd = names.open(dir.as_fd(), &handle, named).unwrap();
        assert_eq!(hostfs::handle_of(fd.as_fd()).unwrap(), handle);
        assert!(names.newest().is_none());
    }
}
