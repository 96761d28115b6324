//! Objects of a snapshot view: an inode of main as it was at the
//! snapshot's epoch, read from its pre-image if main changed it since, else
//! from the live inode (opened by file handle). Read-only by construction:
//! nothing here writes.
//!
//! A read of a live inode is checked again after it completes: if a
//! pre-image appeared meanwhile, main has started changing the inode, so
//! the read is redone from the pre-image. Pre-images are made durable before
//! the change they protect begins, so a read that found none afterwards
//! cannot have seen the change.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};

use crate::hex;
use crate::hostfs::{self, HostHandle, Stat, XattrReply};
use crate::preserve::{PreImage, PreImageStore};
use crate::snapshot::SnapshotId;

/// An inode as one snapshot shows it.
pub struct SnapObj {
    /// The snapshot.
    pub snap: SnapshotId,
    /// Its epoch.
    pub epoch: u64,
    /// The inode.
    pub handle: HostHandle,
    /// Its host inode number.
    pub ino: u64,
    /// Whether it is a directory (which keeps its live inode open once
    /// searched; a file keeps no descriptor).
    pub is_dir: bool,
    /// The pre-image, once main has changed the inode (final once set: the
    /// first pre-image at or after the epoch never changes). Boxed: most
    /// objects never have one, and a snapshot's or branch's view of main
    /// makes one object per node the kernel keeps.
    pre: OnceLock<Box<PreImage>>,
    /// The live inode of a directory, kept once it has been searched or
    /// listed: lookups in one directory come in runs, and opening it by
    /// handle for each cost a third of a branch lookup. Files are not
    /// kept: a descriptor would hold the space of a file main deletes.
    live_dir: OnceLock<OwnedFd>,
    /// The directory it was found in, and its name there.
    at: Option<(Arc<SnapObj>, CString)>,
}

/// Where an object's state comes from right now.
pub enum Source<'a> {
    /// Main changed it: its pre-image.
    Pre(&'a PreImage),
    /// Unchanged since the snapshot: the live inode.
    Live(BorrowedFd<'a>),
}

/// A child found by name in a snapshot directory.
pub struct Found {
    /// Its handle.
    pub handle: HostHandle,
    /// Its host inode number.
    pub ino: u64,
    /// The name.
    name: CString,
    is_dir: bool,
}

/// One listed entry of a snapshot directory (`.` and `..` excluded).
pub struct Listed {
    /// Host inode number.
    pub ino: u64,
    /// `DT_*`.
    pub d_type: u8,
    /// Name.
    pub name: Vec<u8>,
}

fn gone(what: &str) -> io::Error {
    tracing::error!("snapshot object lost: {what}");
    io::Error::from_raw_os_error(libc::EIO)
}

impl SnapObj {
    /// An object of snapshot `snap` taken at `epoch`.
    pub fn new(
        snap: SnapshotId,
        epoch: u64,
        handle: HostHandle,
        ino: u64,
        is_dir: bool,
    ) -> SnapObj {
        SnapObj {
            snap,
            epoch,
            handle,
            ino,
            is_dir,
            pre: OnceLock::new(),
            live_dir: OnceLock::new(),
            at: None,
        }
    }

    /// The inode number of the directory it was found in, and its name
    /// there.
    pub fn found_at(&self) -> Option<(u64, &CStr)> {
        self.at
            .as_ref()
            .map(|(dir, name)| (dir.ino, name.as_c_str()))
    }

    /// The object `found` in this directory.
    pub fn child(self: &Arc<Self>, found: Found) -> SnapObj {
        SnapObj {
            at: Some((self.clone(), found.name)),
            ..SnapObj::new(self.snap, self.epoch, found.handle, found.ino, found.is_dir)
        }
    }

    /// The live inode: by its name in the directory it was found in, if
    /// that is open and the name still leads to it, else by its handle
    /// ([`hostfs::open_handle_by_name`]).
    fn open_live(&self, mount_fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        // A directory needs no name: the host connects it. The live inode
        // of one that reads from its pre-image is not kept: opened here.
        let opened;
        let named = match &self.at {
            Some((dir, name)) if !self.is_dir => {
                let dir_fd = match dir.live_dir.get() {
                    Some(fd) => Some(fd.as_fd()),
                    None => {
                        opened = hostfs::open_handle(mount_fd, &dir.handle).ok();
                        opened.as_ref().map(|fd| fd.as_fd())
                    }
                };
                dir_fd.map(|fd| (fd, name.as_c_str()))
            }
            _ => None,
        };
        hostfs::open_handle_by_name(mount_fd, &self.handle, named)
    }

    fn pre(&self, store: &PreImageStore) -> io::Result<Option<&PreImage>> {
        if let Some(p) = self.pre.get() {
            return Ok(Some(p));
        }
        Ok(store
            .find(&self.handle, self.epoch)?
            .map(|p| &**self.pre.get_or_init(|| Box::new(p))))
    }

    /// Runs `read` on the object's current source, redoing it from the
    /// pre-image if one appeared while it read the live inode.
    fn read<T>(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        read: impl Fn(Source<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        self.read_kept(store, mount_fd, false, read)
    }

    /// [`SnapObj::read`] of a directory, whose live inode stays open.
    fn read_dir<T>(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        read: impl Fn(Source<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        self.read_kept(store, mount_fd, true, read)
    }

    fn read_kept<T>(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        keep: bool,
        read: impl Fn(Source<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        if let Some(p) = self.pre(store)? {
            return read(Source::Pre(p));
        }
        let opened;
        let live = match self.live_dir.get() {
            Some(fd) => fd.as_fd(),
            None => {
                let fd = match self.open_live(mount_fd) {
                    Ok(fd) => fd,
                    // Gone from main: it must have been preserved before it went.
                    Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                        return match self.pre(store)? {
                            Some(p) => read(Source::Pre(p)),
                            None => Err(gone(&format!(
                                "inode {} of snapshot {}",
                                self.ino, self.snap.0
                            ))),
                        };
                    }
                    Err(e) => return Err(e),
                };
                if keep {
                    self.live_dir.get_or_init(|| fd).as_fd()
                } else {
                    opened = fd;
                    opened.as_fd()
                }
            }
        };
        // A kept descriptor outlives the inode's removal from main: this
        // check covers that as it covers a change during the read (main
        // preserves an inode before it changes or removes it).
        let value = read(Source::Live(live))?;
        match self.pre(store)? {
            Some(p) => read(Source::Pre(p)),
            None => Ok(value),
        }
    }

    /// Attributes as of the snapshot.
    pub fn stat(&self, store: &PreImageStore, mount_fd: BorrowedFd<'_>) -> io::Result<Stat> {
        self.read(store, mount_fd, |src| match src {
            Source::Pre(p) => Ok(p.meta.stat()),
            Source::Live(fd) => hostfs::stat(fd.as_fd()),
        })
    }

    /// Target of a symlink.
    pub fn readlink(&self, store: &PreImageStore, mount_fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        self.read(store, mount_fd, |src| match src {
            Source::Pre(p) => p
                .meta
                .target
                .as_deref()
                .and_then(hex::decode)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
            Source::Live(fd) => hostfs::readlink(fd.as_fd()),
        })
    }

    /// Resolves `name` in this directory.
    pub fn lookup(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        name: &OsStr,
    ) -> io::Result<Found> {
        let cname = hostfs::component(name)?;
        self.read_dir(store, mount_fd, |src| match src {
            Source::Pre(p) => {
                let e = p
                    .entry(name)?
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
                let handle = HostHandle::from_hex(&e.handle)
                    .ok_or_else(|| gone(&format!("bad handle in {}", p.dir.display())))?;
                Ok(Found {
                    handle,
                    ino: e.ino,
                    name: cname.clone(),
                    is_dir: e.d_type == libc::DT_DIR,
                })
            }
            Source::Live(fd) => {
                let child = hostfs::open_node(fd.as_fd(), &cname)?;
                let st = hostfs::stat(child.as_fd())?;
                Ok(Found {
                    handle: hostfs::handle_of(child.as_fd())?,
                    ino: st.st_ino,
                    name: cname.clone(),
                    is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
                })
            }
        })
    }

    /// All entries of this directory.
    pub fn list(&self, store: &PreImageStore, mount_fd: BorrowedFd<'_>) -> io::Result<Vec<Listed>> {
        self.read_dir(store, mount_fd, |src| match src {
            Source::Pre(p) => Ok(p
                .entries()?
                .iter()
                .filter_map(|e| {
                    Some(Listed {
                        ino: e.ino,
                        d_type: e.d_type,
                        name: hex::decode(&e.name)?,
                    })
                })
                .collect()),
            Source::Live(fd) => Ok(hostfs::read_dir_all(fd.as_fd())?
                .into_iter()
                .map(|e| Listed {
                    ino: e.ino,
                    d_type: e.d_type,
                    name: e.name,
                })
                .collect()),
        })
    }

    /// Opens the content for reading: the preserved copy (`true`) or the
    /// live file (`false`, whose reads must go through
    /// [`SnapObj::read_live`]).
    pub fn open(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
    ) -> io::Result<(File, bool)> {
        self.read(store, mount_fd, |src| match src {
            Source::Pre(p) => Ok((p.open_data()?, true)),
            Source::Live(fd) => Ok((hostfs::reopen(fd.as_fd(), libc::O_RDONLY)?, false)),
        })
    }

    /// Reads from the live file opened by [`SnapObj::open`], switching to
    /// the pre-image once main has started to change the file.
    pub fn read_live(
        &self,
        store: &PreImageStore,
        live: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<usize> {
        let n = hostfs::read_full(live, buf, offset)?;
        match self.pre(store)? {
            Some(p) => hostfs::read_full(&p.open_data()?, buf, offset),
            None => Ok(n),
        }
    }

    /// Every xattr (name, value) as of the snapshot.
    pub fn xattrs(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.read(store, mount_fd, |src| match src {
            Source::Pre(p) => Ok(p.meta.xattr_list()),
            Source::Live(fd) => hostfs::xattrs_if_any(fd.as_fd()),
        })
    }

    /// Copies the content of this regular file, as of the snapshot, into
    /// `dst` (from its start; `dst` is truncated first, so a copy redone
    /// from the pre-image leaves no trace of the first attempt).
    pub fn copy_content(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        dst: &File,
    ) -> io::Result<()> {
        self.read(store, mount_fd, |src| {
            let from = match src {
                Source::Pre(p) => p.open_data()?,
                Source::Live(fd) => hostfs::reopen(fd.as_fd(), libc::O_RDONLY)?,
            };
            dst.set_len(0)?;
            hostfs::clone_or_copy(&from, dst)
        })
    }

    /// An xattr value (size 0: its size).
    pub fn getxattr(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        name: &OsStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        self.read(store, mount_fd, |src| match src {
            Source::Pre(p) => {
                let v = p
                    .meta
                    .xattr_list()
                    .into_iter()
                    .find(|(n, _)| n == name.as_bytes())
                    .map(|(_, v)| v)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODATA))?;
                XattrReply::sized(v, size)
            }
            Source::Live(fd) => hostfs::getxattr(fd.as_fd(), name, size),
        })
    }

    /// The xattr names (size 0: the list's size).
    pub fn listxattr(
        &self,
        store: &PreImageStore,
        mount_fd: BorrowedFd<'_>,
        size: u32,
    ) -> io::Result<XattrReply> {
        self.read(store, mount_fd, |src| match src {
            Source::Pre(p) => {
                let mut names = Vec::new();
                for (n, _) in p.meta.xattr_list() {
                    names.extend_from_slice(&n);
                    names.push(0);
                }
                XattrReply::sized(names, size)
            }
            Source::Live(fd) => hostfs::listxattr(fd.as_fd(), size),
        })
    }
}
