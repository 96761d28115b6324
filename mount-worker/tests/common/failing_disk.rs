//! A disk that fails on demand, for the state directory: a one-file FUSE
//! file system served by this test process, whose file (an ext4 image) a
//! loop device uses. Once told to fail, every read, write and fsync of the
//! image answers EIO, as a dying disk does; the ext4 above gets real I/O
//! errors. (No device-mapper, fault injection, nbd or ublk on these
//! machines: this is the stand-in the issue allows.)
#![allow(dead_code)] // each test binary uses a different subset

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, Session, SessionACL, WriteFlags,
};

const IMAGE_INO: u64 = 2;
const NAME: &str = "disk.img";

struct Disk {
    image: File,
    failing: Arc<AtomicBool>,
}

impl Disk {
    fn attr(&self, ino: u64) -> FileAttr {
        let size = self.image.metadata().map_or(0, |m| m.len());
        let file = ino == IMAGE_INO;
        FileAttr {
            ino: INodeNo(ino),
            size: if file { size } else { 0 },
            blocks: size / 512,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if file {
                FileType::RegularFile
            } else {
                FileType::Directory
            },
            perm: if file { 0o600 } else { 0o700 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }
}

const EIO: Errno = Errno::EIO;

impl Filesystem for Disk {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == NAME {
            reply.entry(&Duration::ZERO, &self.attr(IMAGE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        reply.attr(&Duration::ZERO, &self.attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: every read and write of the loop device reaches us
        // (no page cache of this file to answer from).
        reply.opened(fuser::FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if self.failing() {
            return reply.error(EIO);
        }
        let mut buf = vec![0; size as usize];
        match self.image.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(_) => reply.error(EIO),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.failing() {
            return reply.error(EIO);
        }
        match self.image.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(EIO),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.failing() || self.image.sync_data().is_err() {
            return reply.error(EIO);
        }
        reply.ok();
    }
}

/// The image served at `<dir>/disk.img`; unmounted when dropped.
pub struct FailingDisk {
    dir: PathBuf,
    failing: Arc<AtomicBool>,
    session: Option<BackgroundSession>,
}

impl FailingDisk {
    /// Serves `image` (an existing file) in the empty directory `dir`.
    pub fn serve(image: &Path, dir: &Path) -> FailingDisk {
        let failing = Arc::new(AtomicBool::new(false));
        let disk = Disk {
            image: File::options()
                .read(true)
                .write(true)
                .open(image)
                .unwrap_or_else(|e| panic!("{}: {e}", image.display())),
            failing: failing.clone(),
        };
        let mut config = Config::default();
        // The loop device's I/O is not this process's.
        config.acl = SessionACL::All;
        let session = Session::new(disk, dir, &config)
            .unwrap_or_else(|e| panic!("mount the failing disk at {}: {e}", dir.display()))
            .spawn()
            .unwrap();
        FailingDisk {
            dir: dir.to_owned(),
            failing,
            session: Some(session),
        }
    }

    /// The image, through this file system.
    pub fn path(&self) -> PathBuf {
        self.dir.join(NAME)
    }

    /// From now on every read, write and fsync fails with EIO (or works
    /// again).
    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        self.fail(false);
        drop(self.session.take());
        if super::is_mounted(&self.dir) {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
