//! FsCore: the file system as FUSE sees it, independent of the FUSE wire
//! format. It owns the node table (FUSE node id -> object), the open handle
//! tables and the snapshot catalog, and implements each operation.
//!
//! Three kinds of node:
//! - **main**: an `O_PATH` descriptor of a host inode of the source, read
//!   and written in place ([`crate::hostfs`]). Before main changes an inode
//!   while a snapshot of main exists, its pre-image is stored
//!   ([`crate::preserve`]).
//! - **snapshot**: an inode as a snapshot shows it ([`crate::snapview`]);
//!   every change fails with EROFS.
//! - **virtual**: `/.agentfs`, `/.agentfs/snapshots`, `/.agentfs/branches`.
//!
//! Node ids: `view << 44 | local`. View 0 is main, whose local ids are host
//! inode numbers (fuser reports the node id as `st_ino`, and `st_ino` must be
//! stable: git, tar and backup tools compare it). View `n` (1 ≤ n) is the
//! snapshot with id `n`, local ids again host inode numbers, so the same
//! path in two views is two nodes and the kernel's caches never mix them.
//! The last view, [`VIEW_SPECIAL`], holds the virtual directories and
//! synthetic ids for inodes whose number does not fit (or is 1, FUSE's root
//! id, or belongs to another file system mounted inside the source). Each
//! registration of an id gets a fresh generation.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::control::{ControlError, ErrorKind, Handler, Request, validate_name};
use crate::hostfs::{self, Stat, XattrReply};
use crate::preserve::PreImageStore;
use crate::snapshot::{Catalog, Snapshot, SnapshotId};
use crate::snapview::SnapObj;

/// A FUSE node id. `NodeId::ROOT` is the mount root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub u64);

/// Bits of a node id below the view number.
const VIEW_SHIFT: u32 = 44;
/// Largest local id of a view.
const LOCAL_MAX: u64 = (1 << VIEW_SHIFT) - 1;
/// The view of virtual directories and synthetic ids.
const VIEW_SPECIAL: u64 = (1 << (64 - VIEW_SHIFT)) - 1;

impl NodeId {
    /// The mount root (FUSE_ROOT_ID): main's source directory.
    pub const ROOT: NodeId = NodeId(1);
    /// `/.agentfs`.
    pub const AGENTFS: NodeId = NodeId(VIEW_SPECIAL << VIEW_SHIFT | 1);
    /// `/.agentfs/snapshots`.
    pub const SNAPSHOTS: NodeId = NodeId(VIEW_SPECIAL << VIEW_SHIFT | 2);
    /// `/.agentfs/branches`.
    pub const BRANCHES: NodeId = NodeId(VIEW_SPECIAL << VIEW_SHIFT | 3);

    fn in_view(view: u64, local: u64) -> NodeId {
        NodeId(view << VIEW_SHIFT | local)
    }
}

/// First synthetic id.
const SYNTHETIC_BASE: u64 = VIEW_SPECIAL << VIEW_SHIFT | 16;

/// The name of the control directory in the mount root.
pub const AGENTFS_NAME: &[u8] = b".agentfs";

/// An open regular file, as handed to the kernel in `open`/`create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u64);

/// An open directory stream, as handed to the kernel in `opendir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirHandle(pub u64);

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
    /// Attributes of the node.
    pub stat: Stat,
    /// Whether the kernel may cache the name and attributes (false for
    /// names whose meaning changes without a request to this node, such as
    /// the snapshot list).
    pub cacheable: bool,
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

/// One directory entry for the FUSE adapter.
pub struct DirEntry<'a> {
    /// `d_ino` to report.
    pub ino: u64,
    /// Position of the next entry.
    pub next_offset: u64,
    /// `DT_*`.
    pub d_type: u8,
    /// Name.
    pub name: &'a [u8],
}

/// What a node is.
enum Obj {
    Main(OwnedFd),
    Snap(Box<SnapObj>),
    Virtual,
}

impl Obj {
    /// The host inode of a main node; EROFS for every other kind, which is
    /// what each change to them must answer.
    fn main_fd(&self) -> io::Result<BorrowedFd<'_>> {
        match self {
            Obj::Main(fd) => Ok(fd.as_fd()),
            _ => Err(errno(libc::EROFS)),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum NodeKey {
    Host(u64, u64),
    Snap(SnapshotId, u64),
    Virtual(u64),
}

struct Node {
    obj: Arc<Obj>,
    key: NodeKey,
    generation: u64,
    /// Lookups the kernel holds on this node; at 0 the node is dropped.
    lookups: u64,
}

/// Never forgotten: the root and the virtual directories.
const PERMANENT: u64 = u64::MAX / 2;

#[derive(Default)]
struct NodeTable {
    by_id: HashMap<u64, Node>,
    by_key: HashMap<NodeKey, u64>,
}

impl NodeTable {
    fn insert(&mut self, id: u64, obj: Obj, key: NodeKey, generation: u64, lookups: u64) {
        self.by_key.insert(key.clone(), id);
        self.by_id.insert(
            id,
            Node {
                obj: Arc::new(obj),
                key,
                generation,
                lookups,
            },
        );
    }
}

/// An open file.
enum OpenFile {
    Main(File),
    /// A snapshot file opened from its pre-image: plain reads.
    SnapPre(File),
    /// A snapshot file opened live: reads re-checked by its object.
    SnapLive(Arc<Obj>, File),
}

/// An open directory stream.
enum DirStream {
    /// A main directory, read from the host as the kernel asks.
    Host { dir: Mutex<File>, is_root: bool },
    /// Entries fixed at opendir (snapshots and virtual directories).
    Listed(Vec<(u64, u8, Vec<u8>)>),
}

/// The core of one mount.
pub struct FsCore {
    nodes: Mutex<NodeTable>,
    /// Device of the source: its inodes use their own numbers as node ids.
    source_dev: u64,
    /// The source directory's node.
    root: Arc<Obj>,
    /// The source directory opened for reading: `open_by_handle_at` needs
    /// a descriptor that is not `O_PATH`.
    handle_dir: File,
    next_synthetic: AtomicU64,
    next_generation: AtomicU64,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<DirStream>>>,
    next_handle: AtomicU64,
    /// Where the catalog lives.
    state: PathBuf,
    catalog: Mutex<Catalog>,
    store: PreImageStore,
    /// Epoch of the newest snapshot of main (None: no snapshot, nothing to
    /// preserve). Every change to main holds this for reading from its
    /// preservation to its end; taking a snapshot holds it for writing, so
    /// a snapshot never falls between a change's check and the change.
    latest: RwLock<Option<u64>>,
    started: SystemTime,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FsCore {
    /// Serves the directory behind `source` (any descriptor of it; it is
    /// reopened as `O_PATH`) with the snapshots of state directory `state`.
    /// Taking a descriptor rather than a path is what lets the worker mount
    /// over the source itself.
    pub fn new(source: BorrowedFd<'_>, state: &Path) -> io::Result<FsCore> {
        let fd = hostfs::path_fd_of(source)?;
        let st = hostfs::stat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let catalog = Catalog::load(state).map_err(|e| io::Error::other(e.to_string()))?;
        let store = PreImageStore::open(state)?;
        let mut table = NodeTable::default();
        table.insert(
            NodeId::ROOT.0,
            Obj::Main(fd.try_clone()?),
            NodeKey::Host(st.st_dev, st.st_ino),
            0,
            PERMANENT,
        );
        for id in [NodeId::AGENTFS, NodeId::SNAPSHOTS, NodeId::BRANCHES] {
            table.insert(id.0, Obj::Virtual, NodeKey::Virtual(id.0), 0, PERMANENT);
        }
        let root = table.by_id[&NodeId::ROOT.0].obj.clone();
        let handle_dir = hostfs::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(FsCore {
            handle_dir,
            nodes: Mutex::new(table),
            source_dev: st.st_dev,
            root,
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
            next_generation: AtomicU64::new(1),
            files: RwLock::default(),
            dirs: RwLock::default(),
            next_handle: AtomicU64::new(1),
            state: state.to_owned(),
            latest: RwLock::new(catalog.latest_epoch()),
            catalog: Mutex::new(catalog),
            store,
            started: SystemTime::now(),
        })
    }

    fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.main_fd().expect("the root is a main node")
    }

    /// What snapshot objects open live inodes by handle with.
    fn mount_fd(&self) -> BorrowedFd<'_> {
        self.handle_dir.as_fd()
    }

    /// The object of a node the kernel holds a lookup on.
    fn obj(&self, id: NodeId) -> io::Result<Arc<Obj>> {
        self.nodes
            .lock()
            .unwrap()
            .by_id
            .get(&id.0)
            .map(|n| n.obj.clone())
            // The kernel never names a node it forgot; ESTALE if it does.
            .ok_or_else(|| errno(libc::ESTALE))
    }

    /// Registers an object under `key` (one lookup for the kernel): the
    /// existing node if the key is known, else a new node with id `id`
    /// (a synthetic one if that is taken).
    fn register(
        &self,
        key: NodeKey,
        id: Option<u64>,
        make: impl FnOnce() -> Obj,
        stat: Stat,
    ) -> Entry {
        let mut t = self.nodes.lock().unwrap();
        if let Some(&existing) = t.by_key.get(&key) {
            let node = t.by_id.get_mut(&existing).expect("tables agree");
            node.lookups += 1;
            return Entry {
                node: NodeId(existing),
                generation: node.generation,
                stat,
                cacheable: true,
            };
        }
        let id = match id {
            Some(id) if !t.by_id.contains_key(&id) => id,
            _ => self.next_synthetic.fetch_add(1, Ordering::Relaxed),
        };
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        t.insert(id, make(), key, generation, 1);
        Entry {
            node: NodeId(id),
            generation,
            stat,
            cacheable: true,
        }
    }

    /// Registers a host inode of main.
    fn register_main(&self, fd: OwnedFd) -> io::Result<Entry> {
        let stat = hostfs::stat(fd.as_fd())?;
        let own = stat.st_ino;
        let id = (stat.st_dev == self.source_dev && own != NodeId::ROOT.0 && own <= LOCAL_MAX)
            .then_some(own);
        Ok(self.register(NodeKey::Host(stat.st_dev, own), id, || Obj::Main(fd), stat))
    }

    /// Registers an inode of a snapshot view.
    fn register_snap(&self, obj: SnapObj) -> io::Result<Entry> {
        let stat = obj.stat(&self.store, self.mount_fd())?;
        let id = (obj.ino <= LOCAL_MAX).then(|| NodeId::in_view(obj.snap.0 as u64, obj.ino).0);
        Ok(self.register(
            NodeKey::Snap(obj.snap, obj.ino),
            id,
            || Obj::Snap(Box::new(obj)),
            stat,
        ))
    }

    /// A virtual directory's entry (they are permanent nodes).
    fn virtual_entry(&self, id: NodeId) -> Entry {
        Entry {
            node: id,
            generation: 0,
            stat: self.virtual_stat(id),
            cacheable: false,
        }
    }

    fn virtual_stat(&self, id: NodeId) -> Stat {
        // SAFETY: an all-zero `struct stat` is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_ino = id.0;
        st.st_mode = libc::S_IFDIR | 0o555;
        st.st_nlink = 2;
        st.st_blksize = 4096;
        let t = self.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        st.st_mtime = t.as_secs() as i64;
        st.st_atime = st.st_mtime;
        st.st_ctime = st.st_mtime;
        st
    }

    /// Resolves `name` in directory `parent`.
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> io::Result<Entry> {
        if parent == NodeId::ROOT && name.as_bytes() == AGENTFS_NAME {
            return Ok(self.virtual_entry(NodeId::AGENTFS));
        }
        match (parent, &*self.obj(parent)?) {
            (_, Obj::Main(dir)) => {
                let name = hostfs::component(name)?;
                self.register_main(hostfs::open_node(dir.as_fd(), &name)?)
            }
            (_, Obj::Snap(dir)) => {
                let found = dir.lookup(&self.store, self.mount_fd(), name)?;
                self.register_snap(SnapObj::new(dir.snap, dir.epoch, found.handle, found.ino))
            }
            (NodeId::AGENTFS, Obj::Virtual) => match name.as_bytes() {
                b"snapshots" => Ok(self.virtual_entry(NodeId::SNAPSHOTS)),
                b"branches" => Ok(self.virtual_entry(NodeId::BRANCHES)),
                _ => Err(errno(libc::ENOENT)),
            },
            (NodeId::SNAPSHOTS, Obj::Virtual) => {
                let snap = self
                    .catalog
                    .lock()
                    .unwrap()
                    .snapshots
                    .iter()
                    .find(|s| s.name.as_bytes() == name.as_bytes())
                    .cloned()
                    .ok_or_else(|| errno(libc::ENOENT))?;
                let root = self.root_fd();
                let obj = SnapObj::new(
                    snap.id,
                    snap.epoch,
                    hostfs::handle_of(root)?,
                    hostfs::stat(root)?.st_ino,
                );
                let mut e = self.register_snap(obj)?;
                e.cacheable = false;
                Ok(e)
            }
            _ => Err(errno(libc::ENOENT)),
        }
    }

    /// The kernel dropped `n` lookups of `node`.
    pub fn forget(&self, node: NodeId, n: u64) {
        let mut t = self.nodes.lock().unwrap();
        let Some(entry) = t.by_id.get_mut(&node.0) else {
            return;
        };
        entry.lookups = entry.lookups.saturating_sub(n);
        if entry.lookups == 0 {
            let key = entry.key.clone();
            t.by_id.remove(&node.0);
            t.by_key.remove(&key);
        }
    }

    /// Attributes of a node.
    pub fn getattr(&self, node: NodeId) -> io::Result<Stat> {
        match &*self.obj(node)? {
            Obj::Main(fd) => hostfs::stat(fd.as_fd()),
            Obj::Snap(s) => s.stat(&self.store, self.mount_fd()),
            Obj::Virtual => Ok(self.virtual_stat(node)),
        }
    }

    /// Whether the kernel may cache a node's attributes: not for the
    /// virtual directories, whose listings change with the catalog.
    pub fn attr_cacheable(&self, node: NodeId) -> bool {
        node.0 >> VIEW_SHIFT != VIEW_SPECIAL || node.0 >= SYNTHETIC_BASE
    }

    /// Stores pre-images of the inodes behind `fds` if a snapshot of main
    /// needs them, and returns the guard to hold until the change is done.
    fn before_change(
        &self,
        fds: &[BorrowedFd<'_>],
    ) -> io::Result<RwLockReadGuard<'_, Option<u64>>> {
        let latest = self.latest.read().unwrap();
        if let Some(tag) = *latest {
            for fd in fds {
                self.store.preserve(*fd, tag)?;
            }
        }
        Ok(latest)
    }

    /// Applies a `setattr`: owner first (a chown clears set-id bits, so an
    /// explicit mode must come after it), then mode, size and times.
    pub fn setattr(&self, node: NodeId, fh: Option<FileHandle>, attr: SetAttr) -> io::Result<Stat> {
        let obj = self.obj(node)?;
        let fd = obj.main_fd()?;
        let _change = self.before_change(&[fd])?;
        if attr.uid.is_some() || attr.gid.is_some() {
            hostfs::chown(fd, attr.uid, attr.gid)?;
        }
        if let Some(mode) = attr.mode {
            hostfs::chmod(fd, mode & 0o7777)?;
        }
        if let Some(size) = attr.size {
            match fh.map(|fh| self.file(fh)).transpose()?.as_deref() {
                Some(OpenFile::Main(file)) => file.set_len(size)?,
                _ => hostfs::reopen(fd, libc::O_WRONLY)?.set_len(size)?,
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
            hostfs::utimens(fd, &[ts(attr.atime), ts(attr.mtime)])?;
        }
        hostfs::stat(fd)
    }

    /// Target of a symlink.
    pub fn readlink(&self, node: NodeId) -> io::Result<Vec<u8>> {
        match &*self.obj(node)? {
            Obj::Main(fd) => hostfs::readlink(fd.as_fd()),
            Obj::Snap(s) => s.readlink(&self.store, self.mount_fd()),
            Obj::Virtual => Err(errno(libc::EINVAL)),
        }
    }

    /// Gives a node just created by root on the host to the caller, the way
    /// the host kernel would have created it for them: owner = caller, group
    /// = caller's unless the directory is set-group-id (then inherited).
    /// `mode` is restored afterwards when it carries set-id bits, which the
    /// chown cleared.
    fn give_to_caller(
        &self,
        fd: &OwnedFd,
        dir: BorrowedFd<'_>,
        caller: Caller,
        mode: Option<u32>,
    ) -> io::Result<()> {
        let dir_st = hostfs::stat(dir)?;
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

    /// A main directory and a name in it, for a change. `.agentfs` in the
    /// mount root is the control directory, not a name of the source: it
    /// cannot be changed (EROFS), whatever the source holds under that name.
    fn main_entry(&self, parent: NodeId, name: &OsStr) -> io::Result<(Arc<Obj>, CString)> {
        let obj = self.obj(parent)?;
        obj.main_fd()?;
        if parent == NodeId::ROOT && name.as_bytes() == AGENTFS_NAME {
            return Err(errno(libc::EROFS));
        }
        Ok((obj, hostfs::component(name)?))
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
        let (obj, name) = self.main_entry(parent, name)?;
        let dir = obj.main_fd()?;
        let _change = self.before_change(&[dir])?;
        hostfs::with_umask(caller.umask, || make(dir, &name))?;
        let fd = hostfs::open_node(dir, &name)?;
        self.give_to_caller(&fd, dir, caller, mode)?;
        self.register_main(fd)
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

    /// Removes a name (a directory if `dir`), preserving the directory and
    /// the inode it named for the snapshots that still show them.
    fn remove(&self, parent: NodeId, name: &OsStr, dir: bool) -> io::Result<()> {
        let (obj, name) = self.main_entry(parent, name)?;
        let pfd = obj.main_fd()?;
        let victim = hostfs::open_node(pfd, &name)?;
        let _change = self.before_change(&[pfd, victim.as_fd()])?;
        hostfs::unlink(pfd, &name, dir)
    }

    /// Removes a non-directory name.
    pub fn unlink(&self, parent: NodeId, name: &OsStr) -> io::Result<()> {
        self.remove(parent, name, false)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: NodeId, name: &OsStr) -> io::Result<()> {
        self.remove(parent, name, true)
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
        let (old, oname) = self.main_entry(parent, name)?;
        let (new, nname) = self.main_entry(newparent, newname)?;
        let (ofd, nfd) = (old.main_fd()?, new.main_fd()?);
        // Both names' inodes change (ctime, or they go away).
        let moved = hostfs::open_node(ofd, &oname)?;
        let replaced = match hostfs::open_node(nfd, &nname) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        let mut fds = vec![ofd, nfd, moved.as_fd()];
        fds.extend(replaced.as_ref().map(|f| f.as_fd()));
        let _change = self.before_change(&fds)?;
        hostfs::rename(ofd, &oname, nfd, &nname, flags)
    }

    /// Makes a hard link to `node` as `newparent/newname`.
    pub fn link(&self, node: NodeId, newparent: NodeId, newname: &OsStr) -> io::Result<Entry> {
        let obj = self.obj(node)?;
        let (dobj, name) = self.main_entry(newparent, newname)?;
        let (fd, dir) = (obj.main_fd()?, dobj.main_fd()?);
        let _change = self.before_change(&[fd, dir])?;
        hostfs::link(fd, dir, &name)?;
        self.register_main(hostfs::open_node(dir, &name)?)
    }

    fn add_file(&self, file: OpenFile) -> FileHandle {
        let id = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.files.write().unwrap().insert(id, Arc::new(file));
        FileHandle(id)
    }

    fn file(&self, fh: FileHandle) -> io::Result<Arc<OpenFile>> {
        self.files
            .read()
            .unwrap()
            .get(&fh.0)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// An open file of main: the only kind that may be written.
    fn main_file(&self, fh: FileHandle) -> io::Result<Arc<OpenFile>> {
        let f = self.file(fh)?;
        match *f {
            OpenFile::Main(_) => Ok(f),
            _ => Err(errno(libc::EBADF)),
        }
    }

    /// Opens a regular file with the caller's open flags.
    pub fn open(&self, node: NodeId, flags: i32) -> io::Result<FileHandle> {
        let obj = self.obj(node)?;
        let file = match &*obj {
            Obj::Main(fd) => OpenFile::Main(hostfs::reopen(fd.as_fd(), host_open_flags(flags))?),
            Obj::Snap(s) => {
                if flags & libc::O_ACCMODE != libc::O_RDONLY {
                    return Err(errno(libc::EROFS));
                }
                match s.open(&self.store, self.mount_fd())? {
                    (f, true) => OpenFile::SnapPre(f),
                    (f, false) => OpenFile::SnapLive(obj.clone(), f),
                }
            }
            Obj::Virtual => return Err(errno(libc::EISDIR)),
        };
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
        let (obj, cname) = self.main_entry(parent, name)?;
        let dir = obj.main_fd()?;
        let flags =
            host_open_flags(flags) | (flags & libc::O_EXCL) | libc::O_CREAT | libc::O_NOFOLLOW;
        let _change = self.before_change(&[dir])?;
        let file: File =
            hostfs::with_umask(caller.umask, || hostfs::open_at(dir, &cname, flags, mode))?.into();
        let fd = hostfs::path_fd_of(file.as_fd())?;
        self.give_to_caller(&fd, dir, caller, Some(mode))?;
        let entry = self.register_main(fd)?;
        Ok((entry, self.add_file(OpenFile::Main(file))))
    }

    /// Reads up to `size` bytes at `offset` (short only at end of file).
    pub fn read(&self, fh: FileHandle, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = match &*file {
            OpenFile::Main(f) | OpenFile::SnapPre(f) => hostfs::read_full(f, &mut buf, offset)?,
            OpenFile::SnapLive(obj, f) => match &**obj {
                Obj::Snap(s) => s.read_live(&self.store, f, &mut buf, offset)?,
                _ => unreachable!("live snapshot files belong to snapshot nodes"),
            },
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes `data` at `offset` of `node`'s open file `fh` (appends if it
    /// was opened O_APPEND).
    pub fn write(
        &self,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> io::Result<usize> {
        let file = self.main_file(fh)?;
        let OpenFile::Main(f) = &*file else {
            unreachable!()
        };
        let obj = self.obj(node)?;
        let _change = self.before_change(&[obj.main_fd()?])?;
        let mut done = 0;
        while done < data.len() {
            match f.write_at(&data[done..], offset + done as u64) {
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

    /// Flushes a file to the host disk (nothing to do for snapshots).
    pub fn fsync(&self, fh: FileHandle, datasync: bool) -> io::Result<()> {
        match &*self.file(fh)? {
            OpenFile::Main(f) if datasync => f.sync_data(),
            OpenFile::Main(f) => f.sync_all(),
            _ => Ok(()),
        }
    }

    /// Preallocates, punches holes, etc. (`fallocate(2)` modes).
    pub fn fallocate(
        &self,
        node: NodeId,
        fh: FileHandle,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> io::Result<()> {
        let file = self.main_file(fh)?;
        let OpenFile::Main(f) = &*file else {
            unreachable!()
        };
        let obj = self.obj(node)?;
        let _change = self.before_change(&[obj.main_fd()?])?;
        hostfs::fallocate(f, mode, offset, len)
    }

    /// SEEK_DATA / SEEK_HOLE.
    pub fn lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> io::Result<i64> {
        match &*self.file(fh)? {
            OpenFile::Main(f) | OpenFile::SnapPre(f) | OpenFile::SnapLive(_, f) => {
                hostfs::lseek(f, offset, whence)
            }
        }
    }

    /// Copies a range between two open files on the host (into main only).
    pub fn copy_file_range(
        &self,
        src: FileHandle,
        src_off: u64,
        dst_node: NodeId,
        dst: FileHandle,
        dst_off: u64,
        len: u64,
    ) -> io::Result<usize> {
        let (sf, df) = (self.file(src)?, self.main_file(dst)?);
        let OpenFile::Main(d) = &*df else {
            unreachable!()
        };
        let s = match &*sf {
            OpenFile::Main(f) | OpenFile::SnapPre(f) => f,
            // A live snapshot file may change under the copy: let the
            // kernel fall back to read + write, which re-checks.
            OpenFile::SnapLive(..) => return Err(errno(libc::EXDEV)),
        };
        let obj = self.obj(dst_node)?;
        let _change = self.before_change(&[obj.main_fd()?])?;
        hostfs::copy_file_range(s, src_off, d, dst_off, len)
    }

    /// Opens a directory stream.
    pub fn opendir(&self, node: NodeId) -> io::Result<DirHandle> {
        let stream = match (node, &*self.obj(node)?) {
            (_, Obj::Main(fd)) => DirStream::Host {
                dir: Mutex::new(hostfs::reopen(
                    fd.as_fd(),
                    libc::O_RDONLY | libc::O_DIRECTORY,
                )?),
                is_root: node == NodeId::ROOT,
            },
            (_, Obj::Snap(s)) => {
                let view = s.snap.0 as u64;
                DirStream::Listed(
                    s.list(&self.store, self.mount_fd())?
                        .into_iter()
                        .map(|e| (NodeId::in_view(view, e.ino).0, e.d_type, e.name))
                        .collect(),
                )
            }
            (NodeId::AGENTFS, Obj::Virtual) => DirStream::Listed(vec![
                (NodeId::BRANCHES.0, libc::DT_DIR, b"branches".to_vec()),
                (NodeId::SNAPSHOTS.0, libc::DT_DIR, b"snapshots".to_vec()),
            ]),
            (NodeId::SNAPSHOTS, Obj::Virtual) => {
                let root_ino = hostfs::stat(self.root_fd())?.st_ino;
                DirStream::Listed(
                    self.catalog
                        .lock()
                        .unwrap()
                        .snapshots
                        .iter()
                        .map(|s| {
                            (
                                NodeId::in_view(s.id.0 as u64, root_ino).0,
                                libc::DT_DIR,
                                s.name.clone().into_bytes(),
                            )
                        })
                        .collect(),
                )
            }
            (_, Obj::Virtual) => DirStream::Listed(Vec::new()),
        };
        let id = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.dirs.write().unwrap().insert(id, Arc::new(stream));
        Ok(DirHandle(id))
    }

    fn dir(&self, dh: DirHandle) -> io::Result<Arc<DirStream>> {
        self.dirs
            .read()
            .unwrap()
            .get(&dh.0)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Feeds directory entries from `offset` to `add` until it returns true
    /// (reply buffer full) or the directory ends. "." and ".." included;
    /// `.agentfs` is hidden in the mount root.
    pub fn readdir(
        &self,
        dh: DirHandle,
        offset: u64,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> io::Result<()> {
        match &*self.dir(dh)? {
            DirStream::Host { dir, is_root } => {
                // One reader at a time: the host stream position is shared.
                let dir = dir.lock().unwrap();
                let mut offset = offset;
                loop {
                    let entries = hostfs::read_dir(&dir, offset)?;
                    if entries.is_empty() {
                        return Ok(());
                    }
                    for e in &entries {
                        let hidden = *is_root && e.name == AGENTFS_NAME;
                        if !hidden
                            && add(DirEntry {
                                ino: e.ino,
                                next_offset: e.next_offset,
                                d_type: e.d_type,
                                name: &e.name,
                            })
                        {
                            return Ok(());
                        }
                        offset = e.next_offset;
                    }
                }
            }
            DirStream::Listed(entries) => {
                let dots = [(1, b"." as &[u8]), (1, b"..")];
                let all = dots
                    .iter()
                    .map(|&(ino, name)| (ino, libc::DT_DIR, name))
                    .chain(entries.iter().map(|(ino, t, n)| (*ino, *t, n.as_slice())));
                for (i, (ino, d_type, name)) in all.enumerate().skip(offset as usize) {
                    if add(DirEntry {
                        ino,
                        next_offset: i as u64 + 1,
                        d_type,
                        name,
                    }) {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    /// Closes a directory stream.
    pub fn releasedir(&self, dh: DirHandle) {
        self.dirs.write().unwrap().remove(&dh.0);
    }

    /// Flushes a directory to the host disk.
    pub fn fsyncdir(&self, dh: DirHandle, datasync: bool) -> io::Result<()> {
        match &*self.dir(dh)? {
            DirStream::Host { dir, .. } => {
                let dir = dir.lock().unwrap();
                if datasync {
                    dir.sync_data()
                } else {
                    dir.sync_all()
                }
            }
            DirStream::Listed(_) => Ok(()),
        }
    }

    /// Space and inode counts of the host file system.
    pub fn statfs(&self) -> io::Result<libc::statvfs> {
        hostfs::statvfs(self.root_fd())
    }

    /// Reads an extended attribute.
    pub fn getxattr(&self, node: NodeId, name: &OsStr, size: u32) -> io::Result<XattrReply> {
        match &*self.obj(node)? {
            Obj::Main(fd) => hostfs::getxattr(fd.as_fd(), name, size),
            Obj::Snap(s) => s.getxattr(&self.store, self.mount_fd(), name, size),
            Obj::Virtual => Err(errno(libc::ENODATA)),
        }
    }

    /// Lists extended attribute names.
    pub fn listxattr(&self, node: NodeId, size: u32) -> io::Result<XattrReply> {
        match &*self.obj(node)? {
            Obj::Main(fd) => hostfs::listxattr(fd.as_fd(), size),
            Obj::Snap(s) => s.listxattr(&self.store, self.mount_fd(), size),
            Obj::Virtual => Ok(XattrReply::Size(0)),
        }
    }

    /// Sets an extended attribute.
    pub fn setxattr(&self, node: NodeId, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let obj = self.obj(node)?;
        let fd = obj.main_fd()?;
        let _change = self.before_change(&[fd])?;
        hostfs::setxattr(fd, name, value, flags)
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, node: NodeId, name: &OsStr) -> io::Result<()> {
        let obj = self.obj(node)?;
        let fd = obj.main_fd()?;
        let _change = self.before_change(&[fd])?;
        hostfs::removexattr(fd, name)
    }

    /// Takes a snapshot of main (O(1): one catalog write). `name` defaults
    /// to `snap-<id>`.
    pub fn snapshot_create(&self, name: Option<String>) -> Result<Snapshot, ControlError> {
        // Wait for changes in flight and hold new ones off: the snapshot
        // must not fall between a change's preservation check and the change.
        let mut latest = self.latest.write().unwrap();
        let mut catalog = self.catalog.lock().unwrap();
        let name = name.unwrap_or_else(|| format!("snap-{}", catalog.next_id));
        validate_name("snapshot", &name)?;
        if catalog.find(&name).is_some() {
            return Err(ControlError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "a snapshot named {name:?} exists already; choose another name or delete it first"
                ),
            ));
        }
        let mut next = catalog.clone();
        let snap = next.add(name);
        next.save(&self.state).map_err(|e| catalog_error(&e))?;
        *catalog = next;
        *latest = Some(snap.epoch);
        tracing::info!(snapshot = %snap.name, id = snap.id.0, epoch = snap.epoch, "snapshot of main created");
        Ok(snap)
    }

    /// The live snapshots, oldest first.
    pub fn snapshot_list(&self) -> Vec<Snapshot> {
        self.catalog.lock().unwrap().snapshots.clone()
    }

    /// Deletes a snapshot (by name or id) and gives back the space of the
    /// pre-images only it needed.
    pub fn snapshot_delete(&self, key: &str) -> Result<Snapshot, ControlError> {
        let mut latest = self.latest.write().unwrap();
        let mut catalog = self.catalog.lock().unwrap();
        let snap = catalog.find(key).cloned().ok_or_else(|| {
            ControlError::new(
                ErrorKind::NotFound,
                format!("no snapshot named {key:?}; `snapshot-list` shows the snapshots"),
            )
        })?;
        let mut next = catalog.clone();
        next.snapshots.retain(|s| s.id != snap.id);
        next.save(&self.state).map_err(|e| catalog_error(&e))?;
        *catalog = next;
        *latest = catalog.latest_epoch();
        let live: Vec<u64> = catalog.snapshots.iter().map(|s| s.epoch).collect();
        // The record is gone first, so a crash here leaves only garbage
        // that the next deletion (or the check tool) removes.
        match self.store.collect_garbage(&live) {
            Ok(n) => {
                tracing::info!(snapshot = %snap.name, preimages_removed = n, "snapshot deleted")
            }
            Err(e) => {
                tracing::warn!(snapshot = %snap.name, "snapshot deleted; removing its pre-images failed: {e}")
            }
        }
        Ok(snap)
    }
}

fn catalog_error(e: &crate::snapshot::CatalogError) -> ControlError {
    let kind = match e {
        crate::snapshot::CatalogError::Io(_, io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            ErrorKind::NoSpace
        }
        _ => ErrorKind::Io,
    };
    ControlError::new(
        kind,
        format!("cannot write the catalog: {e}; nothing was changed"),
    )
}

/// The flags to open the host file with, from the caller's open flags.
/// O_DIRECT is dropped (our buffers are not aligned; the kernel already
/// bypasses its own cache per the caller's flags). O_NOFOLLOW is dropped
/// because the kernel has resolved the name already (a symlink never gets
/// here) and the reopen goes through a /proc magic link, which O_NOFOLLOW
/// would refuse with ELOOP. Creation flags are the caller's business.
fn host_open_flags(flags: i32) -> i32 {
    flags
        & !(libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_DIRECT
            | libc::O_CLOEXEC
            | libc::O_NOFOLLOW)
}

impl Handler for FsCore {
    fn handle(&self, req: Request) -> Result<serde_json::Value, ControlError> {
        match req {
            Request::SnapshotCreate {
                branch: Some(b), ..
            } => Err(ControlError::new(
                ErrorKind::NotFound,
                format!("no branch named {b:?}: only main can be snapshotted until branches exist"),
            )),
            Request::SnapshotCreate { branch: None, name } => {
                Ok(to_json(&self.snapshot_create(name)?))
            }
            Request::SnapshotList {} => Ok(to_json(&self.snapshot_list())),
            Request::SnapshotDelete { snapshot } => Ok(to_json(&self.snapshot_delete(&snapshot)?)),
        }
    }
}

fn to_json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("catalog records serialize")
}
