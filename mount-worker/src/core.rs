//! FsCore: the file system as FUSE sees it, independent of the FUSE wire
//! format. It owns the node table (FUSE node id -> host inode) and the open
//! handle tables, and implements each operation with [`crate::hostfs`].
//!
//! A node is an `O_PATH` descriptor of a host inode. Nodes are deduplicated by
//! host `(st_dev, st_ino)`, so every hard link of a file is the same node and
//! the kernel's `st_nlink`/`st_ino` view stays consistent.
//!
//! Node ids are host inode numbers: fuser reports the node id as `st_ino`,
//! and `st_ino` must be stable (git, tar and backup tools compare it), so the
//! host's number is the only choice that survives remounts. An id is reused
//! only after the kernel forgot it, and each registration carries a fresh
//! generation so the kernel never confuses two lives of one id. Inodes that
//! cannot use their number (a file system mounted inside the source, whose
//! numbers may collide; host inode 1, which is FUSE's root id) get a
//! synthetic id from [`SYNTHETIC_BASE`] up.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::hostfs::{self, Stat};

/// A FUSE node id. `NodeId::ROOT` is the mount root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The mount root (FUSE_ROOT_ID).
    pub const ROOT: NodeId = NodeId(1);
}

/// An open regular file, as handed to the kernel in `open`/`create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u64);

/// An open directory stream, as handed to the kernel in `opendir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirHandle(pub u64);

/// First synthetic node id (bit 63 set: no host inode number is that large
/// on the file systems we serve, and the kernel accepts any 64-bit id).
pub const SYNTHETIC_BASE: u64 = 1 << 63;

/// Who made a request: new files belong to them.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// Effective uid of the calling thread.
    pub uid: u32,
    /// Effective gid of the calling thread.
    pub gid: u32,
    /// The caller's umask, applied to the modes of new files.
    pub umask: u32,
}

/// A name resolved to a node, with the node's attributes.
pub struct Entry {
    /// The node (its lookup count has been raised by one for the kernel).
    pub node: NodeId,
    /// Generation of this life of the node id.
    pub generation: u64,
    /// Host attributes of the node.
    pub stat: Stat,
}

/// Attribute changes of one `setattr` request.
#[derive(Default)]
pub struct SetAttr {
    /// New permission bits (and file type bits, ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate or extend).
    pub size: Option<u64>,
    /// New access time; `None` leaves it.
    pub atime: Option<Time>,
    /// New modification time; `None` leaves it.
    pub mtime: Option<Time>,
}

/// A time to set: now, or an exact point with nanoseconds.
#[derive(Clone, Copy)]
pub enum Time {
    /// The current time of the host.
    Now,
    /// Seconds and nanoseconds since the epoch (seconds may be negative).
    At(i64, u32),
}

struct Node {
    fd: Arc<NodeFd>,
    key: (u64, u64),
    generation: u64,
    /// Lookups the kernel holds on this node; at 0 the node is dropped.
    lookups: u64,
}

#[derive(Default)]
struct NodeTable {
    by_id: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
}

impl NodeTable {
    fn insert(&mut self, id: u64, fd: OwnedFd, key: (u64, u64), generation: u64, lookups: u64) {
        let fd = Arc::new(NodeFd(fd));
        self.by_id.insert(
            id,
            Node {
                fd,
                key,
                generation,
                lookups,
            },
        );
        self.by_key.insert(key, id);
    }
}

/// The host descriptor of a node, shared with requests in flight so that a
/// concurrent FORGET never closes a descriptor still in use.
pub struct NodeFd(OwnedFd);

impl AsFd for NodeFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The core of one mount: the node and handle tables over a source directory.
pub struct FsCore {
    nodes: Mutex<NodeTable>,
    /// Device of the source: its inodes use their own numbers as node ids.
    source_dev: u64,
    next_synthetic: AtomicU64,
    next_generation: AtomicU64,
    files: RwLock<HashMap<u64, Arc<File>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<File>>>>,
    next_handle: AtomicU64,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn key_of(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

impl FsCore {
    /// Serves the directory behind `source` (any descriptor of it; it is
    /// reopened as `O_PATH`). Taking a descriptor rather than a path is what
    /// lets the worker mount over the source itself.
    pub fn new(source: BorrowedFd<'_>) -> io::Result<FsCore> {
        let fd = hostfs::path_fd_of(source)?;
        let st = hostfs::stat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let mut table = NodeTable::default();
        let root = NodeId::ROOT.0;
        // The root is never forgotten.
        table.insert(root, fd, key_of(&st), 0, u64::MAX / 2);
        Ok(FsCore {
            nodes: Mutex::new(table),
            source_dev: st.st_dev,
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
            next_generation: AtomicU64::new(1),
            files: RwLock::default(),
            dirs: RwLock::default(),
            next_handle: AtomicU64::new(1),
        })
    }

    /// The descriptor of a node the kernel holds a lookup on.
    fn node(&self, id: NodeId) -> io::Result<Arc<NodeFd>> {
        self.nodes
            .lock()
            .unwrap()
            .by_id
            .get(&id.0)
            .map(|n| n.fd.clone())
            // The kernel never names a node it forgot; ESTALE if it does.
            .ok_or_else(|| errno(libc::ESTALE))
    }

    /// Registers a host inode (one lookup for the kernel) and returns its entry.
    fn register(&self, fd: OwnedFd) -> io::Result<Entry> {
        let stat = hostfs::stat(fd.as_fd())?;
        let key = key_of(&stat);
        let mut t = self.nodes.lock().unwrap();
        if let Some(&id) = t.by_key.get(&key) {
            // Already known (another hard link, or looked up before):
            // keep the existing descriptor, drop the new one.
            let node = t.by_id.get_mut(&id).expect("tables agree");
            node.lookups += 1;
            return Ok(Entry {
                node: NodeId(id),
                generation: node.generation,
                stat,
            });
        }
        let own = stat.st_ino;
        let id = if stat.st_dev == self.source_dev
            && own != NodeId::ROOT.0
            && own < SYNTHETIC_BASE
            && !t.by_id.contains_key(&own)
        {
            own
        } else {
            self.next_synthetic.fetch_add(1, Ordering::Relaxed)
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        t.insert(id, fd, key, generation, 1);
        Ok(Entry {
            node: NodeId(id),
            generation,
            stat,
        })
    }

    /// Resolves `name` in directory `parent`.
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> io::Result<Entry> {
        let dir = self.node(parent)?;
        let name = hostfs::component(name)?;
        self.register(hostfs::open_node(dir.as_fd(), &name)?)
    }

    /// The kernel dropped `n` lookups of `node`.
    pub fn forget(&self, node: NodeId, n: u64) {
        let mut t = self.nodes.lock().unwrap();
        let Some(entry) = t.by_id.get_mut(&node.0) else {
            return;
        };
        entry.lookups = entry.lookups.saturating_sub(n);
        if entry.lookups == 0 {
            let key = entry.key;
            t.by_id.remove(&node.0);
            t.by_key.remove(&key);
        }
    }

    /// Number of nodes the kernel currently holds (for tests and status).
    pub fn node_count(&self) -> usize {
        self.nodes.lock().unwrap().by_id.len()
    }

    /// Attributes of a node.
    pub fn getattr(&self, node: NodeId) -> io::Result<Stat> {
        hostfs::stat(self.node(node)?.as_fd())
    }

    /// Applies a `setattr`: owner first (a chown clears set-id bits, so an
    /// explicit mode must come after it), then mode, size and times.
    pub fn setattr(&self, node: NodeId, fh: Option<FileHandle>, attr: SetAttr) -> io::Result<Stat> {
        let fd = self.node(node)?;
        if attr.uid.is_some() || attr.gid.is_some() {
            hostfs::chown(fd.as_fd(), attr.uid, attr.gid)?;
        }
        if let Some(mode) = attr.mode {
            hostfs::chmod(fd.as_fd(), mode & 0o7777)?;
        }
        if let Some(size) = attr.size {
            match fh.and_then(|fh| self.file(fh).ok()) {
                Some(file) => file.set_len(size)?,
                None => hostfs::reopen(fd.as_fd(), libc::O_WRONLY)?.set_len(size)?,
            }
        }
        if attr.atime.is_some() || attr.mtime.is_some() {
            let ts = |t: Option<Time>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(Time::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(Time::At(s, ns)) => libc::timespec {
                    tv_sec: s,
                    tv_nsec: ns as i64,
                },
            };
            hostfs::utimens(fd.as_fd(), &[ts(attr.atime), ts(attr.mtime)])?;
        }
        hostfs::stat(fd.as_fd())
    }

    /// Target of a symlink.
    pub fn readlink(&self, node: NodeId) -> io::Result<Vec<u8>> {
        hostfs::readlink(self.node(node)?.as_fd())
    }

    /// Gives a node just created by root on the host to the caller, the way
    /// the host kernel would have created it for them: owner = caller, group
    /// = caller's unless the directory is set-group-id (then inherited).
    /// `mode` is restored afterwards when it carries set-id bits, which the
    /// chown cleared.
    fn give_to_caller(
        &self,
        fd: &OwnedFd,
        dir: &NodeFd,
        caller: Caller,
        mode: Option<u32>,
    ) -> io::Result<()> {
        let dir_st = hostfs::stat(dir.as_fd())?;
        let gid = if dir_st.st_mode & libc::S_ISGID != 0 {
            None
        } else {
            Some(caller.gid)
        };
        let st = hostfs::stat(fd.as_fd())?;
        if st.st_uid == caller.uid && gid.is_none_or(|g| g == st.st_gid) {
            return Ok(());
        }
        hostfs::chown(fd.as_fd(), Some(caller.uid), gid)?;
        if let Some(mode) = mode {
            if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                hostfs::chmod(fd.as_fd(), mode & 0o7777)?;
            }
        }
        Ok(())
    }

    /// Runs `make` (which creates `name` in `parent` on the host), then
    /// registers the new node as the caller's.
    fn make_node(
        &self,
        parent: NodeId,
        name: &OsStr,
        caller: Caller,
        mode: Option<u32>,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> io::Result<()>,
    ) -> io::Result<Entry> {
        let dir = self.node(parent)?;
        let name = hostfs::component(name)?;
        hostfs::with_umask(caller.umask, || make(dir.as_fd(), &name))?;
        let fd = hostfs::open_node(dir.as_fd(), &name)?;
        self.give_to_caller(&fd, &dir, caller, mode)?;
        self.register(fd)
    }

    /// Creates a file node (regular, FIFO, socket or device).
    pub fn mknod(
        &self,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> io::Result<Entry> {
        self.make_node(parent, name, caller, Some(mode), |d, n| {
            hostfs::mknod(d, n, mode, rdev as u64)
        })
    }

    /// Creates a directory.
    pub fn mkdir(
        &self,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> io::Result<Entry> {
        self.make_node(parent, name, caller, None, |d, n| hostfs::mkdir(d, n, mode))
    }

    /// Creates a symlink.
    pub fn symlink(
        &self,
        parent: NodeId,
        name: &OsStr,
        target: &OsStr,
        caller: Caller,
    ) -> io::Result<Entry> {
        self.make_node(parent, name, caller, None, |d, n| {
            hostfs::symlink(target, d, n)
        })
    }

    /// Removes a non-directory name.
    pub fn unlink(&self, parent: NodeId, name: &OsStr) -> io::Result<()> {
        hostfs::unlink(self.node(parent)?.as_fd(), &hostfs::component(name)?, false)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: NodeId, name: &OsStr) -> io::Result<()> {
        hostfs::unlink(self.node(parent)?.as_fd(), &hostfs::component(name)?, true)
    }

    /// Renames with `renameat2` flags.
    pub fn rename(
        &self,
        parent: NodeId,
        name: &OsStr,
        newparent: NodeId,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        let old = self.node(parent)?;
        let new = self.node(newparent)?;
        hostfs::rename(
            old.as_fd(),
            &hostfs::component(name)?,
            new.as_fd(),
            &hostfs::component(newname)?,
            flags,
        )
    }

    /// Makes a hard link to `node` as `newparent/newname`.
    pub fn link(&self, node: NodeId, newparent: NodeId, newname: &OsStr) -> io::Result<Entry> {
        let fd = self.node(node)?;
        let dir = self.node(newparent)?;
        let name = hostfs::component(newname)?;
        hostfs::link(fd.as_fd(), dir.as_fd(), &name)?;
        self.register(hostfs::open_node(dir.as_fd(), &name)?)
    }

    fn add_file(&self, file: File) -> FileHandle {
        let id = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.files.write().unwrap().insert(id, Arc::new(file));
        FileHandle(id)
    }

    fn file(&self, fh: FileHandle) -> io::Result<Arc<File>> {
        self.files
            .read()
            .unwrap()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Opens a regular file with the caller's open flags.
    pub fn open(&self, node: NodeId, flags: i32) -> io::Result<FileHandle> {
        let fd = self.node(node)?;
        let file = hostfs::reopen(fd.as_fd(), host_open_flags(flags))?;
        Ok(self.add_file(file))
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> io::Result<(Entry, FileHandle)> {
        let dir = self.node(parent)?;
        let cname = hostfs::component(name)?;
        let flags =
            host_open_flags(flags) | (flags & libc::O_EXCL) | libc::O_CREAT | libc::O_NOFOLLOW;
        let file: File = hostfs::with_umask(caller.umask, || {
            hostfs::open_at(dir.as_fd(), &cname, flags, mode)
        })?
        .into();
        let fd = hostfs::path_fd_of(file.as_fd())?;
        self.give_to_caller(&fd, &dir, caller, Some(mode))?;
        let entry = self.register(fd)?;
        Ok((entry, self.add_file(file)))
    }

    /// Reads up to `size` bytes at `offset` (short only at end of file).
    pub fn read(&self, fh: FileHandle, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Writes `data` at `offset` (appends if the file was opened O_APPEND).
    pub fn write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> io::Result<usize> {
        let file = self.file(fh)?;
        let mut done = 0;
        while done < data.len() {
            match file.write_at(&data[done..], offset + done as u64) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if done > 0 => {
                    tracing::debug!("short write after {done} bytes: {e}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Closes a file handle.
    pub fn release(&self, fh: FileHandle) {
        self.files.write().unwrap().remove(&fh.0);
    }

    /// Flushes a file to the host disk.
    pub fn fsync(&self, fh: FileHandle, datasync: bool) -> io::Result<()> {
        let file = self.file(fh)?;
        if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        }
    }

    /// Preallocates, punches holes, etc. (`fallocate(2)` modes).
    pub fn fallocate(&self, fh: FileHandle, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        hostfs::fallocate(&*self.file(fh)?, mode, offset, len)
    }

    /// SEEK_DATA / SEEK_HOLE.
    pub fn lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> io::Result<i64> {
        hostfs::lseek(&*self.file(fh)?, offset, whence)
    }

    /// Copies a range between two open files on the host.
    pub fn copy_file_range(
        &self,
        src: FileHandle,
        src_off: u64,
        dst: FileHandle,
        dst_off: u64,
        len: u64,
    ) -> io::Result<usize> {
        hostfs::copy_file_range(&*self.file(src)?, src_off, &*self.file(dst)?, dst_off, len)
    }

    /// Opens a directory stream.
    pub fn opendir(&self, node: NodeId) -> io::Result<DirHandle> {
        let fd = self.node(node)?;
        let dir = hostfs::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let id = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .write()
            .unwrap()
            .insert(id, Arc::new(Mutex::new(dir)));
        Ok(DirHandle(id))
    }

    fn dir(&self, dh: DirHandle) -> io::Result<Arc<Mutex<File>>> {
        self.dirs
            .read()
            .unwrap()
            .get(&dh.0)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Feeds directory entries from `offset` to `add` until it returns true
    /// (reply buffer full) or the directory ends. "." and ".." included.
    pub fn readdir(
        &self,
        dh: DirHandle,
        offset: u64,
        mut add: impl FnMut(&hostfs::DirEntry) -> bool,
    ) -> io::Result<()> {
        let dir = self.dir(dh)?;
        // One reader at a time: the host stream position is shared.
        let dir = dir.lock().unwrap();
        let mut offset = offset;
        loop {
            let entries = hostfs::read_dir(&dir, offset)?;
            if entries.is_empty() {
                return Ok(());
            }
            for e in &entries {
                if add(e) {
                    return Ok(());
                }
                offset = e.next_offset;
            }
        }
    }

    /// Closes a directory stream.
    pub fn releasedir(&self, dh: DirHandle) {
        self.dirs.write().unwrap().remove(&dh.0);
    }

    /// Flushes a directory to the host disk.
    pub fn fsyncdir(&self, dh: DirHandle, datasync: bool) -> io::Result<()> {
        let dir = self.dir(dh)?;
        let dir = dir.lock().unwrap();
        if datasync {
            dir.sync_data()
        } else {
            dir.sync_all()
        }
    }

    /// Space and inode counts of the host file system.
    pub fn statfs(&self, node: NodeId) -> io::Result<libc::statvfs> {
        hostfs::statvfs(self.node(node)?.as_fd())
    }

    /// Reads an extended attribute.
    pub fn getxattr(
        &self,
        node: NodeId,
        name: &OsStr,
        size: u32,
    ) -> io::Result<hostfs::XattrReply> {
        hostfs::getxattr(self.node(node)?.as_fd(), name, size)
    }

    /// Lists extended attribute names.
    pub fn listxattr(&self, node: NodeId, size: u32) -> io::Result<hostfs::XattrReply> {
        hostfs::listxattr(self.node(node)?.as_fd(), size)
    }

    /// Sets an extended attribute.
    pub fn setxattr(&self, node: NodeId, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        hostfs::setxattr(self.node(node)?.as_fd(), name, value, flags)
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, node: NodeId, name: &OsStr) -> io::Result<()> {
        hostfs::removexattr(self.node(node)?.as_fd(), name)
    }
}

/// The flags to open the host file with, from the caller's open flags.
/// O_DIRECT is dropped (our buffers are not aligned; the kernel already
/// bypasses its own cache per the caller's flags); creation flags are the
/// caller of this function's business.
fn host_open_flags(flags: i32) -> i32 {
    flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_DIRECT | libc::O_CLOEXEC)
}
