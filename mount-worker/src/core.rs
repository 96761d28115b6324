//! FsCore: the file system as FUSE sees it, independent of the FUSE wire
//! format. It owns the node table (FUSE node id -> object), the open handle
//! tables and the snapshot catalog, and implements each operation.
//!
//! Three kinds of node:
//! - **main**: a host inode of the source (a directory's `O_PATH`
//!   descriptor, any other inode's file handle: [`MainInode`]), read and
//!   written in place ([`crate::hostfs`]). Before main changes an inode
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

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::binding::{Bindings, Subject};
use crate::catalog_change::Change;
use crate::control::{ControlError, ErrorKind, Handler, Request, validate_name};
use crate::frozen::FrozenStack;
use crate::handoff::{FoundAt, Held, HeldNode, Journal, Origin, Record};
use crate::hostfs::{self, HostHandle, Stat, XattrReply};
use crate::layered::{
    self, Ctx, Gone, Inode, InodeFd, LayerObj, LayerView, Layers, Part, ReadFile, Top,
};
use crate::names::Names;
use crate::preserve::PreImageStore;
use crate::proc_events::ProcEvents;
use crate::root_cache::RootCache;
use crate::snapshot::{
    Branch, Catalog, CatalogWriter, LayerDir, LayerId, Loaded, Snapshot, SnapshotId,
};
use crate::snapview::SnapObj;
use crate::spare::{self, Spare};
use crate::trim::Load;
use crate::watch::SourceWatch;

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

    /// The view its id names (`VIEW_SPECIAL` for virtual directories and
    /// synthetic ids, whose view the id does not tell).
    fn view(self) -> u64 {
        self.0 >> VIEW_SHIFT
    }
}

/// First synthetic id.
const SYNTHETIC_BASE: u64 = VIEW_SPECIAL << VIEW_SHIFT | 16;

/// The name of the control directory in the mount root.
pub const AGENTFS_NAME: &[u8] = b".agentfs";

/// An open regular file, as handed to the kernel in `open`/`create`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle(pub u64);

/// A file opened for the kernel and not given to it yet. A successor
/// learns of it only once [`FsCore::hand_out`] records it, right before
/// the reply: an open that a crash cuts short is sent again by the
/// kernel, which never releases the first handle, so a record of it made
/// earlier (before passthrough registration, or a pre-image's copy) kept
/// the file counted open for good: its branch busy, its backing file
/// open, its pre-image copied at every snapshot.
#[must_use = "hand it out in the reply, or release it"]
#[derive(Debug)]
pub struct NewFile {
    fh: FileHandle,
    node: NodeId,
    flags: i32,
}

impl NewFile {
    /// Its handle, for what the worker does before the reply.
    pub fn fh(&self) -> FileHandle {
        self.fh
    }
}

/// What the kernel may do with an open file without asking the worker,
/// once given the host file (FUSE passthrough, `crate::passthrough`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// Nothing: a branch's file (a copy-up replaces the host file under
    /// it) or a snapshot's file still shared with main (a change to main
    /// moves the snapshot's content to a pre-image).
    Never,
    /// Reads: main's own inode, or a snapshot's pre-image (which never
    /// changes).
    Read,
    /// Reads and writes: main's own inode, opened for writing. The worker
    /// no longer sees its changes, so it preserves the file for the
    /// snapshots up front ([`FsCore::writes_unseen`]).
    Write,
}

/// An open directory stream, as handed to the kernel in `opendir`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirHandle(pub u64);

/// How far a process bound to a branch reaches (config `strict_isolation`,
/// specs/semantics.md "Isolation").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// A bound process sees its branch at the mount root; a node it reached
    /// some other way (a descriptor opened before binding or passed to it,
    /// `.agentfs/`) is served like anyone's.
    #[default]
    Routed,
    /// A bound process may act only on its own branch's nodes: `.agentfs/`,
    /// main's nodes and other branches' nodes answer EACCES.
    Strict,
}

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
    /// What becomes of the set-id bits when the size changes.
    pub set_id: SetIdBits,
}

/// Whether a change of a regular file's data clears its set-user-ID bit,
/// and its set-group-ID bit if group-executable, as a local file system
/// does for a caller without CAP_FSETID. The worker changes host files
/// with CAP_FSETID, so the host keeps them: with FUSE_HANDLE_KILLPRIV_V2
/// the kernel leaves it to the worker (instead of asking for
/// `security.capability` before every write, one round trip each) and
/// says which callers lack the capability. The host still drops a file's
/// `security.capability` on every change, as it does for anyone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SetIdBits {
    /// Kept: the caller may keep them, or the kernel clears them itself.
    #[default]
    Keep,
    /// Cleared: the kernel said the caller lacks CAP_FSETID.
    Clear,
    /// Cleared unless process `pid` has CAP_FSETID: for changes the kernel
    /// sends no such word with (fallocate, copy_file_range). Its
    /// capabilities are read only when the file has such a bit.
    ClearUnlessCapable(u32),
}

impl SetIdBits {
    /// Clears them on the host file `fd` after a change, if they go.
    fn apply(self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self == SetIdBits::Keep {
            return Ok(());
        }
        let st = hostfs::stat(fd)?;
        let mut gone = st.st_mode & libc::S_ISUID;
        if st.st_mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
            gone |= libc::S_ISGID;
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || gone == 0 {
            return Ok(());
        }
        if let SetIdBits::ClearUnlessCapable(pid) = self {
            if has_cap_fsetid(pid) {
                return Ok(());
            }
        }
        hostfs::chmod(fd, st.st_mode & 0o7777 & !gone)
    }
}

/// Whether process `pid` has CAP_FSETID in its effective set (false if it
/// is gone: clearing is the safe side).
fn has_cap_fsetid(pid: u32) -> bool {
    hostfs::proc_status(pid, "CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|eff| eff & caps::Capability::CAP_FSETID.bitmask() != 0)
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

/// What a node is: cheap to clone, as requests take it out of the node
/// table to work on it (each kind behind one `Arc`, not two: a branch's
/// view of main has an object per node the kernel keeps).
#[derive(Clone)]
enum Obj {
    Main(Arc<MainInode>),
    Snap(Arc<SnapObj>),
    /// An object of a branch or of a snapshot of a branch.
    Layer(Arc<LayerObj>),
    Virtual,
}

/// Main's inode as its node keeps it.
enum MainInode {
    /// A directory (the descriptor its names are looked up from), or any
    /// inode of a source without file handles.
    Open(OwnedFd),
    /// Anything else, by handle, opened for each use: the kernel may hold
    /// the nodes of a whole tree, and a descriptor each would soon reach
    /// the open-file limit (the trimmer then has the kernel forget them,
    /// and path walks look them up again).
    Handle {
        handle: HostHandle,
        /// Its directories and its names there, as last known: opened by
        /// one of them (the handle checked), so that the host's dentry
        /// is connected ([`Names`]).
        at: Names<Place>,
    },
}

/// A main directory's node and a name in it.
#[derive(Clone)]
struct Place {
    dir: NodeId,
    obj: Obj,
    name: CString,
}

/// The same name of the same directory node.
impl PartialEq for Place {
    fn eq(&self, other: &Place) -> bool {
        self.dir == other.dir && self.name == other.name
    }
}

impl Place {
    /// As the handoff journal keeps it.
    fn found_at(&self) -> FoundAt {
        (self.dir.0, self.name.as_bytes().to_vec())
    }

    /// The directory and name to open the node by, while the directory
    /// is main's.
    fn named(&self) -> Option<(BorrowedFd<'_>, &CStr)> {
        Some((self.obj.main_dir().ok()?, self.name.as_c_str()))
    }
}

impl MainInode {
    /// `fd`'s inode (`st` its attributes, `handle` its handle if known,
    /// `at` its place if known) as a node keeps it.
    fn new(fd: OwnedFd, st: &Stat, handle: Option<HostHandle>, at: Option<Place>) -> MainInode {
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return MainInode::Open(fd);
        }
        match handle.map_or_else(|| hostfs::handle_of(fd.as_fd()), Ok) {
            Ok(handle) => MainInode::Handle {
                handle,
                at: Names::new(at),
            },
            // EOPNOTSUPP: served all the same, at a descriptor a node.
            Err(_) => MainInode::Open(fd),
        }
    }
}

impl Obj {
    /// Whether a node of main or of a snapshot may keep host descriptors
    /// open: main's directories (and files without handles), a snapshot's
    /// directories (once searched). A branch's objects count themselves
    /// ([`LayerObj::count_in`]).
    fn keeps_descriptors(&self) -> bool {
        match self {
            Obj::Main(m) => matches!(**m, MainInode::Open(_)),
            Obj::Snap(s) => s.is_dir,
            Obj::Layer(_) | Obj::Virtual => false,
        }
    }

    /// Counts a new node's object in `holding` if it may keep host
    /// descriptors open.
    fn count_in(&self, holding: &AtomicUsize) {
        match self {
            Obj::Layer(o) => o.count_in(),
            _ if self.keeps_descriptors() => {
                holding.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Takes a gone node's object out of `holding`.
    fn count_out(&self, holding: &AtomicUsize) {
        match self {
            Obj::Layer(o) => o.count_out(),
            _ if self.keeps_descriptors() => {
                holding.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The descriptor of a main directory: ENOTDIR for main's other
    /// inodes (from the host, for one kept open), EROFS for every other
    /// kind, which is what each change to them must answer.
    fn main_dir(&self) -> io::Result<BorrowedFd<'_>> {
        match self {
            Obj::Main(m) => match &**m {
                MainInode::Open(fd) => Ok(fd.as_fd()),
                MainInode::Handle { .. } => Err(errno(libc::ENOTDIR)),
            },
            _ => Err(errno(libc::EROFS)),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum NodeKey {
    Host(u64, u64),
    Snap(SnapshotId, u64),
    Layer(u32, u64),
    Virtual(u64),
}

struct Node {
    obj: Obj,
    key: NodeKey,
    /// The inode of main a snapshot's or branch's node shows (see
    /// [`NodeTable::by_main_ino`]); fixed when the node is made.
    main_ino: Option<u64>,
    generation: u64,
    /// Lookups the kernel holds on this node, this worker's and its
    /// predecessors' (from the handoff journal); at 0 the node is dropped.
    lookups: u64,
    /// Whether the handoff journal knows it (from its first lookup, or
    /// its rename): only then do its lookups and FORGETs go there too.
    journaled: bool,
}

/// Never forgotten: the root and the virtual directories.
const PERMANENT: u64 = u64::MAX / 2;

#[derive(Default)]
struct NodeTable {
    by_id: HashMap<u64, Node>,
    by_key: HashMap<NodeKey, u64>,
    /// The nodes of snapshots and branches by the inode of main they show:
    /// where a change made to that inode behind the mount shows too. Not
    /// always their key's: a directory a branch copied up keeps its id,
    /// which is main's inode when the branch first saw it, while the
    /// directory of main it merges may be another.
    by_main_ino: HashMap<u64, Shown>,
    /// How many nodes hold descriptors ([`Obj::count_in`]); shared with
    /// the branches' views, whose files join it at their copy-up.
    holding: Arc<AtomicUsize>,
}

impl NodeTable {
    /// Adds a node; `main_ino` is the inode of main it shows, for a
    /// snapshot's or branch's node that shows one.
    fn insert(
        &mut self,
        id: u64,
        obj: Obj,
        key: NodeKey,
        main_ino: Option<u64>,
        generation: u64,
        lookups: u64,
    ) {
        if let Some(ino) = main_ino {
            match self.by_main_ino.entry(ino) {
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Shown::One(id));
                }
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(id),
            }
        }
        obj.count_in(&self.holding);
        self.by_key.insert(key.clone(), id);
        self.by_id.insert(
            id,
            Node {
                obj,
                key,
                main_ino,
                generation,
                lookups,
                journaled: false,
            },
        );
    }

    fn remove(&mut self, id: u64) -> Option<Node> {
        let node = self.by_id.remove(&id)?;
        node.obj.count_out(&self.holding);
        // Unless a new node took its key (`unkey_if`).
        if self.by_key.get(&node.key) == Some(&id) {
            self.by_key.remove(&node.key);
        }
        if let Some(ino) = node.main_ino {
            self.unindex(ino, id);
        }
        Some(node)
    }

    fn unindex(&mut self, main_ino: u64, id: u64) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.by_main_ino.entry(main_ino)
            && e.get_mut().remove(id)
        {
            e.remove();
        }
    }

    /// Whether a node shows main's inode `ino` of the source's device
    /// (`dev`): main's own or a view's.
    fn shows_main(&self, dev: u64, ino: u64) -> bool {
        self.by_key.contains_key(&NodeKey::Host(dev, ino)) || self.by_main_ino.contains_key(&ino)
    }
}

/// The nodes of snapshots and branches that show one inode of main: one
/// for nearly every inode (inline, as a `Vec` would cost an allocation
/// per node the kernel keeps), more where several views show it.
enum Shown {
    One(u64),
    Many(Vec<u64>),
}

impl Shown {
    fn add(&mut self, id: u64) {
        match self {
            Shown::One(first) => *self = Shown::Many(vec![*first, id]),
            Shown::Many(ids) => ids.push(id),
        }
    }

    /// Takes `id` out; true if none is left, when the caller drops the
    /// whole entry (a `One` is not emptied itself, and a `Many` stays one:
    /// an inode several views showed is likely to be shown again).
    fn remove(&mut self, id: u64) -> bool {
        match self {
            Shown::One(only) => *only == id,
            Shown::Many(ids) => {
                ids.retain(|&n| n != id);
                ids.is_empty()
            }
        }
    }

    fn ids(&self) -> &[u64] {
        match self {
            Shown::One(id) => std::slice::from_ref(id),
            Shown::Many(ids) => ids,
        }
    }
}

/// An open file.
enum OpenFile {
    Main(File),
    /// A snapshot file opened from its pre-image: plain reads.
    SnapPre(File),
    /// A snapshot file opened live: reads re-checked by its object.
    SnapLive(Arc<SnapObj>, File),
    /// A file of a branch or of a snapshot of a branch.
    Layer {
        obj: Arc<LayerObj>,
        /// The caller's open flags.
        flags: i32,
        file: RwLock<LayerFile>,
    },
}

/// The host file behind an open file of a layered view, and what it was
/// opened from: a writer reopens in the top layer after the layer it
/// wrote froze (a snapshot of the branch was taken), a reader reopens
/// after the object was copied up (so it sees the writes made since).
struct LayerFile {
    generation: u64,
    copies: u64,
    file: ReadFile,
}

impl OpenFile {
    fn writable(&self) -> bool {
        match self {
            OpenFile::Main(_) => true,
            OpenFile::Layer { flags, .. } => flags & libc::O_ACCMODE != libc::O_RDONLY,
            _ => false,
        }
    }
}

/// What a change holds until it is done, so that no snapshot falls inside.
enum ChangeGuard<'a> {
    Main { _held: RwLockReadGuard<'a, Latest> },
    Layer { _held: RwLockReadGuard<'a, Layers> },
}

/// A host inode: borrowed from a main directory's node, opened by a main
/// node's handle, or a branch's copy.
enum HostFd<'a> {
    Main(BorrowedFd<'a>),
    Opened(OwnedFd),
    Upper(InodeFd),
}

impl HostFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            HostFd::Main(fd) => *fd,
            HostFd::Opened(fd) => fd.as_fd(),
            HostFd::Upper(fd) => fd.as_fd(),
        }
    }
}

/// A directory of a layer that views hold open.
#[derive(Clone, Copy, Debug)]
enum LayerPart {
    /// Its files.
    Tree,
    /// Its index of hard-linked files.
    Index,
}

impl LayerPart {
    fn dir_name(self) -> &'static str {
        match self {
            LayerPart::Tree => "tree",
            LayerPart::Index => "index",
        }
    }
}

/// A branch or snapshot-of-branch view that is open.
struct OpenView {
    view: Arc<LayerView>,
    /// Its root node.
    root: NodeId,
}

/// A directory the kernel opened. Its stream is made at the first READDIR
/// (or FSYNCDIR): the kernel opens a directory whose listing it keeps
/// ([`FsCore::listing_cacheable`]) only to read that listing, so making
/// the stream at OPENDIR (a host open, or a merge of layers) was wasted.
struct OpenDir {
    node: NodeId,
    stream: OnceLock<DirStream>,
}

impl OpenDir {
    fn new(node: NodeId) -> OpenDir {
        OpenDir {
            node,
            stream: OnceLock::new(),
        }
    }
}

/// An open directory stream.
enum DirStream {
    /// A main directory, read from the host as the kernel asks.
    Host { dir: Mutex<File>, is_root: bool },
    /// Entries fixed when first read (snapshots, branches and virtual
    /// directories).
    Listed(Vec<(u64, u8, Vec<u8>)>),
}

/// The core of one mount.
///
/// Locks nest in one order: `latest`, a branch view's `layers`, the
/// bindings' `changing`, `catalog` (with `catalog_writer`), a snapshot
/// view's `layers` (never locked for writing), `views`, `nodes`; and no
/// thread reads a lock it holds already (a writer waiting in between
/// would leave both waiting forever). A predecessor's `Held` comes after
/// `nodes`, `files` and `dirs` after `Held`; `unseen` and `mapped` are held alone
/// (the journal's append aside). A branch or a snapshot of a branch
/// and its view come and go together under `catalog`: a request that
/// finds one in the catalog finds its view open.
pub struct FsCore {
    nodes: Mutex<NodeTable>,
    /// Device of the source: its inodes use their own numbers as node ids.
    source_dev: u64,
    /// The source directory's node.
    root: Obj,
    /// The source directory opened for reading: `open_by_handle_at` needs
    /// a descriptor that is not `O_PATH`.
    handle_dir: File,
    /// The state directory opened for reading, the same for the layers'
    /// files (kept by handle, [`layered::Inode`]).
    state_fd: File,
    next_synthetic: AtomicU64,
    next_generation: AtomicU64,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<OpenDir>>>,
    next_handle: AtomicU64,
    /// Where the catalog lives.
    state: PathBuf,
    catalog: Mutex<Catalog>,
    /// Writes it; locked only while `catalog` is.
    catalog_writer: Mutex<CatalogWriter>,
    /// Keeps the next layer made ahead of time.
    spare: Spare,
    store: PreImageStore,
    /// The newest snapshot of main and what main created since. Every
    /// change to main holds this for reading from its preservation to its
    /// end; taking or deleting a snapshot holds it for writing (and
    /// replaces it), so a snapshot never falls between a change's check and
    /// the change.
    latest: RwLock<Latest>,
    /// The open layered views by view number.
    views: RwLock<HashMap<u32, OpenView>>,
    bindings: Arc<Bindings>,
    isolation: Isolation,
    started: SystemTime,
    /// Where ids handed to the kernel are recorded for a successor, and
    /// what a predecessor's kernel still holds (found again on first use).
    handoff: Option<(Journal, Mutex<Held>)>,
    /// Layer nodes of a predecessor with ids of the synthetic range: their
    /// record is all that names their object ([`FsCore::left`]).
    held_synthetic: Vec<NodeId>,
    /// Main files open for changes the worker does not see (passthrough
    /// writes, shared maps of a passthrough file), by file handle: every
    /// snapshot preserves them when it is taken.
    unseen: Mutex<HashMap<u64, NodeId>>,
    /// Main files whose last unseen writer was released: a shared map made
    /// through it may still write the host file (the kernel maps the
    /// passthrough backing file and lets the FUSE file go, so RELEASE comes
    /// at `close`). Each snapshot preserves those still open for writing
    /// somewhere and forgets the others ([`FsCore::preserve_unseen`]).
    mapped: Mutex<HashSet<NodeId>>,
    /// Marks main's directories for changes made behind the mount's back.
    watch: Option<Arc<SourceWatch>>,
}

/// What changes to main must preserve, as of the newest snapshot of main.
struct Latest {
    /// That snapshot's epoch, the tag of the pre-images made now (None: no
    /// snapshot, nothing to preserve).
    tag: Option<u64>,
    /// Inodes main created since that snapshot. No snapshot can show them
    /// (their directory's pre-image predates them), so changing them needs
    /// no pre-image: without this, every file written after a snapshot
    /// would be copied with fsyncs on its first change, again when it is
    /// removed. Lost on restart, which only costs those copies again.
    born: Mutex<HashSet<HostHandle>>,
}

/// How many created inodes [`Latest::born`] remembers: a bound on its
/// memory (about 50 MiB); past it new inodes are preserved like old ones.
const MAX_BORN: usize = 1 << 20;

impl Latest {
    fn new(tag: Option<u64>) -> Latest {
        Latest {
            tag,
            born: Mutex::default(),
        }
    }

    /// Records that main just created the inode at `fd`.
    fn created(&self, fd: BorrowedFd<'_>) {
        if self.tag.is_none() {
            return;
        }
        // No handle (a source that has none): preserved as any other.
        if let Ok(h) = hostfs::handle_of(fd) {
            let mut born = self.born.lock().unwrap();
            if born.len() < MAX_BORN {
                born.insert(h);
            }
        }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl FsCore {
    /// Serves the directory behind `source` (any descriptor of it; it is
    /// reopened as `O_PATH`) with the snapshots of state directory `state`.
    /// Taking a descriptor rather than a path is what lets the worker mount
    /// over the source itself. `proc_events` feeds the bindings (see
    /// [`Bindings::follow_processes`]).
    pub fn new(
        source: BorrowedFd<'_>,
        state: &Path,
        proc_events: io::Result<ProcEvents>,
    ) -> io::Result<FsCore> {
        let fd = hostfs::path_fd_of(source)?;
        let st = hostfs::stat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let loaded = Loaded::read(state).map_err(|e| io::Error::other(e.to_string()))?;
        let writer =
            CatalogWriter::open(state, &loaded).map_err(|e| io::Error::other(e.to_string()))?;
        let catalog = loaded.catalog;
        let store = PreImageStore::open(state)?;
        let mut table = NodeTable::default();
        table.insert(
            NodeId::ROOT.0,
            Obj::Main(Arc::new(MainInode::Open(fd.try_clone()?))),
            NodeKey::Host(st.st_dev, st.st_ino),
            None,
            0,
            PERMANENT,
        );
        for id in [NodeId::AGENTFS, NodeId::SNAPSHOTS, NodeId::BRANCHES] {
            table.insert(
                id.0,
                Obj::Virtual,
                NodeKey::Virtual(id.0),
                None,
                0,
                PERMANENT,
            );
        }
        let root = table.by_id[&NodeId::ROOT.0].obj.clone();
        let handle_dir = hostfs::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let bindings = Arc::new(Bindings::new(catalog.bindings.clone()));
        bindings.follow_processes(proc_events);
        let core = FsCore {
            handle_dir,
            state_fd: File::open(state)?,
            nodes: Mutex::new(table),
            source_dev: st.st_dev,
            root,
            next_synthetic: AtomicU64::new(SYNTHETIC_BASE),
            next_generation: AtomicU64::new(1),
            files: RwLock::default(),
            dirs: RwLock::default(),
            next_handle: AtomicU64::new(1),
            state: state.to_owned(),
            latest: RwLock::new(Latest::new(catalog.latest_epoch())),
            catalog: Mutex::new(catalog),
            catalog_writer: Mutex::new(writer),
            spare: Spare::start(state.join("layers")),
            store,
            views: RwLock::default(),
            bindings,
            isolation: Isolation::default(),
            started: SystemTime::now(),
            handoff: None,
            held_synthetic: Vec::new(),
            unseen: Mutex::default(),
            mapped: Mutex::default(),
            watch: None,
        };
        core.open_layers()?;
        Ok(core)
    }

    fn cx(&self) -> Ctx<'_> {
        Ctx {
            store: &self.store,
            mount_fd: self.mount_fd(),
            state_fd: self.state_fd.as_fd(),
        }
    }

    fn layer_dir(&self, id: LayerId) -> PathBuf {
        self.state.join("layers").join(id.0.to_string())
    }

    fn open_part(&self, id: LayerId, part: LayerPart) -> io::Result<OwnedFd> {
        hostfs::open_dir_path(&self.layer_dir(id).join(part.dir_name()))
    }

    fn open_tree(&self, id: LayerId) -> io::Result<Arc<OwnedFd>> {
        self.open_part(id, LayerPart::Tree).map(Arc::new)
    }

    /// The frozen layers whose top is `top` (none: main), each opened
    /// once: a layer in `opened` already is shared with the views that
    /// show it, with the layers below it.
    fn open_frozen(
        &self,
        top: Option<LayerId>,
        catalog: &Catalog,
        opened: &mut HashMap<LayerId, FrozenStack>,
    ) -> io::Result<FrozenStack> {
        let to_open = catalog.chain_while(top, |l| !opened.contains_key(&l));
        let below = to_open.last().map_or(top, |&l| catalog.layer_below(l));
        let mut stack = below.map(|l| opened[&l].clone()).unwrap_or_default();
        for l in to_open.into_iter().rev() {
            let index = self.open_part(l, LayerPart::Index)?;
            stack = stack.push(l, self.open_tree(l)?, Arc::new(index));
            opened.insert(l, stack.clone());
        }
        Ok(stack)
    }

    /// A layer that takes changes.
    fn open_top(&self, id: LayerId) -> io::Result<Top> {
        Ok(Top {
            id,
            tree: self.open_tree(id)?,
            work: hostfs::open_dir_path(&self.layer_dir(id).join("work"))?,
            index: self.open_part(id, LayerPart::Index).map(Arc::new)?,
        })
    }

    /// Main's root as the bottom of a view at `epoch`.
    fn base_root(&self, snap: SnapshotId, epoch: u64) -> io::Result<SnapObj> {
        let root = self.root_fd();
        Ok(SnapObj::new(
            snap,
            epoch,
            hostfs::handle_of(root)?,
            hostfs::stat(root)?.st_ino,
            true,
        ))
    }

    /// Clears what a crash may have left in the layer directories (work
    /// files, a creation cut short, freed layers, which it then forgets),
    /// stamps again the layer roots whose stamp it lost, and opens the
    /// views of every branch and snapshot of a branch.
    fn open_layers(&self) -> io::Result<()> {
        let catalog = self.catalog.lock().unwrap().clone();
        let in_use = catalog.layers_in_use();
        let layers = self.state.join("layers");
        let in_layers = |e| named(layers.display(), e);
        std::fs::create_dir_all(&layers).map_err(in_layers)?;
        let mut removed = false;
        for e in std::fs::read_dir(&layers).map_err(in_layers)? {
            let e = e.map_err(in_layers)?;
            match catalog.layer_dir(&e.file_name(), &in_use) {
                LayerDir::InUse => {
                    let path = e.path().join("work");
                    let clear = || -> io::Result<()> {
                        let work = hostfs::open_dir_path(&path)?;
                        for t in hostfs::read_dir_all(work.as_fd())? {
                            let name = hostfs::component(OsStr::from_bytes(&t.name))?;
                            layered::remove_tree(work.as_fd(), &name)?;
                        }
                        Ok(())
                    };
                    clear().map_err(|e| named(path.display(), e))?;
                }
                LayerDir::Next if spare::is_spare(&e.path()) => {}
                // A creation a crash cut short, or a layer a deletion
                // freed (its removal interrupted or failed).
                LayerDir::Next | LayerDir::Freed => {
                    std::fs::remove_dir_all(e.path())
                        .map_err(|err| named(e.path().display(), err))?;
                    removed = true;
                }
                LayerDir::Unexplained => tracing::error!(
                    "{}: no snapshot or branch uses this layer, yet no deletion freed it \
                     (the catalog may have lost where it sits); kept: see \
                     `agentfs-mount-worker --check --state-dir {}`",
                    e.path().display(),
                    self.state.display()
                ),
                LayerDir::NotALayer => tracing::warn!(
                    "{}: not a layer of AgentFS; left as it is",
                    e.path().display()
                ),
            }
        }
        // Their directories are gone, for good once flushed (those of
        // `freed` may have gone before a crash, unflushed), then forgotten.
        let freed: Vec<LayerId> = catalog.freed.iter().copied().collect();
        if removed || !freed.is_empty() {
            File::open(&layers)
                .and_then(|d| d.sync_all())
                .map_err(in_layers)?;
        }
        self.forget_freed(&mut self.catalog.lock().unwrap(), &freed);
        self.spare.want(LayerId(catalog.next_layer));
        // A layer is shared by its branch and the branch's snapshots, over
        // the same layers in each: opened once, and checked once for a
        // lost stamp (n snapshots of a branch would otherwise open its
        // layers n²/2 times), before any view shows it.
        let mut opened = HashMap::new();
        let mut checked = HashSet::new();
        for b in &catalog.branches {
            let mut open = || -> io::Result<()> {
                let below = catalog.layer_below(b.layer);
                let frozen = self.open_frozen(below, &catalog, &mut opened)?;
                let top = self.open_top(b.layer)?;
                self.stamp_again(Some(&top), &frozen, b.snapshot, b.epoch, &mut checked)?;
                let base = Arc::new(self.base_root(b.snapshot, b.epoch)?);
                self.add_view(b.id.0, Some(top), frozen, base);
                Ok(())
            };
            open().map_err(|e| {
                let what = format_args!("branch {:?} (layers/{} and below)", b.name, b.layer.0);
                named(what, e)
            })?;
        }
        for s in catalog.snapshots.iter().filter(|s| s.branch.is_some()) {
            let mut open = || -> io::Result<()> {
                let frozen = self.open_frozen(s.layer, &catalog, &mut opened)?;
                self.stamp_again(None, &frozen, s.id, s.epoch, &mut checked)?;
                let base = Arc::new(self.base_root(s.id, s.epoch)?);
                self.add_view(s.id.0, None, frozen, base);
                Ok(())
            };
            open().map_err(|e| {
                let layer = s.layer.map_or(0, |l| l.0);
                named(
                    format_args!("snapshot {:?} (layers/{layer} and below)", s.name),
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Registers a layered view and its root node, over main's root
    /// `base` ([`Self::base_root`]). Cannot fail: a new snapshot or branch
    /// has what its view needs before the catalog takes it, and its view
    /// is added under the catalog's lock, so that no request finds the
    /// record without its view, nor deletes the record before its view is
    /// there to close.
    fn add_view(&self, number: u32, top: Option<Top>, frozen: FrozenStack, base: Arc<SnapObj>) {
        let root_ino = base.ino;
        let holding = self.nodes.lock().unwrap().holding.clone();
        let view = Arc::new(LayerView::new(number, top, frozen, holding));
        let root = LayerObj::root(view.clone(), root_ino, Part::Base(base));
        let id = NodeId::in_view(number as u64, root_ino);
        self.nodes.lock().unwrap().insert(
            id.0,
            Obj::Layer(Arc::new(root)),
            NodeKey::Layer(number, root_ino),
            Some(root_ino),
            0,
            PERMANENT,
        );
        self.views
            .write()
            .unwrap()
            .insert(number, OpenView { view, root: id });
    }

    /// Forgets a view that was deleted: its nodes answer ESTALE from now on.
    fn close_view(&self, number: u32) {
        if let Some(v) = self.views.write().unwrap().remove(&number) {
            self.nodes.lock().unwrap().remove(v.root.0);
        }
    }

    /// Stamps again, bottom up, the layers of a view (`top`, then
    /// `frozen`, over main at `epoch`) whose stamp a crash lost (see
    /// [`crate::spare`]), down to the first one `checked` already (the
    /// layers below it were checked with it).
    fn stamp_again(
        &self,
        top: Option<&Top>,
        frozen: &FrozenStack,
        snap: SnapshotId,
        epoch: u64,
        checked: &mut HashSet<LayerId>,
    ) -> io::Result<()> {
        let top = top.map(|t| (t.id, &t.tree));
        let mut unchecked = Vec::new();
        // The first layer checked before, or none: main.
        let mut below = None;
        for (l, tree) in top
            .into_iter()
            .chain(frozen.iter().map(|f| (f.id, &f.tree)))
        {
            if !checked.insert(l) {
                below = Some(tree.clone());
                break;
            }
            unchecked.push((l, tree));
        }
        for (l, tree) in unchecked.into_iter().rev() {
            if spare::unstamped(tree.as_fd())? {
                let part = match &below {
                    Some(t) => Part::Layer(Inode::Open(t.clone())),
                    None => Part::Base(Arc::new(self.base_root(snap, epoch)?)),
                };
                spare::stamp(self.cx(), tree.as_fd(), &part)
                    .and_then(|()| hostfs::sync_dir(tree.as_fd()))
                    .map_err(|e| named(format_args!("stamping layers/{} again", l.0), e))?;
                tracing::info!(layer = l.0, "layer root stamped again after a crash");
            }
            below = Some(tree.clone());
        }
        Ok(())
    }

    /// Makes the directories of the new layer `id` (the catalog's next),
    /// its tree root looking like `root` (the root of the view it goes on
    /// top of): the spare's, stamped (durable with the catalog line that
    /// uses it, see [`crate::spare`]), else made and flushed here.
    fn create_layer(&self, id: LayerId, root: &Part) -> io::Result<()> {
        let dir = self.layer_dir(id);
        let spare = self.spare.take(id);
        let made = (|| {
            if spare {
                return spare::stamp(self.cx(), self.open_tree(id)?.as_fd(), root);
            }
            // No spare was ready: the slow way, with its three flushes.
            spare::make_dirs(&dir)?;
            root.copy_meta(self.cx(), self.open_tree(id)?.as_fd())?;
            spare::flush(&dir)
        })();
        if made.is_err() {
            self.discard_layer(id);
        }
        made
    }

    /// Removes the new layer `id`, which the catalog does not take, and
    /// has a spare made again in its place.
    fn discard_layer(&self, id: LayerId) {
        let _ = std::fs::remove_dir_all(self.layer_dir(id));
        self.spare.want(id);
    }

    /// The layers of a layered node's view; ESTALE once the view is deleted.
    fn layers_of<'a>(&self, o: &'a LayerObj) -> io::Result<RwLockReadGuard<'a, Layers>> {
        if !self.views.read().unwrap().contains_key(&o.view.number) {
            return Err(errno(libc::ESTALE));
        }
        Ok(o.view.layers.read().unwrap())
    }

    /// Registers an object of a layered view.
    fn register_layer(&self, obj: LayerObj, layers: &Layers) -> io::Result<Entry> {
        let stat = obj.stat(self.cx(), layers)?;
        let view = obj.view.number;
        let id = (obj.id <= LOCAL_MAX).then(|| NodeId::in_view(view as u64, obj.id).0);
        let origin = |t: &NodeTable, obj: &Obj| match obj {
            Obj::Layer(o) => layer_origin(t, o).map(|o| (o, None)),
            _ => None,
        };
        let base = obj.base(layers);
        let key = NodeKey::Layer(view, obj.id);
        let mut t = self.nodes.lock().unwrap();
        // A directory's key is the id its copy in the layer keeps, which
        // does not change when main's directory it merges is replaced,
        // moved or removed behind the mount (the branch's own moves
        // detach the live object from below first). A file's node pins
        // no inode: its id, made of an inode number, may be a new
        // directory's or file's by now.
        if obj.is_dir {
            let found = base.as_ref().map(|b| &b.handle);
            unkey_if(
                &mut t,
                &key,
                |o| matches!(o, Obj::Layer(live) if !live.is_dir || live.base(layers).as_ref().map(|b| &b.handle) != found),
            );
        } else {
            unkey_if(
                &mut t,
                &key,
                |o| matches!(o, Obj::Layer(live) if live.is_dir || !live.is_found_again(&obj, Some(stat.st_nlink), layers)),
            );
        }
        Ok(self.register(
            &mut t,
            key,
            id,
            base.as_ref().map(|b| b.ino),
            || {
                if let Some(base) = base.as_ref().filter(|_| obj.is_dir) {
                    self.watch_main_dir(base);
                }
                Obj::Layer(Arc::new(obj))
            },
            origin,
            stat,
        ))
    }

    /// The live object with `obj`'s identity if the kernel holds one, else
    /// `obj` itself. A live file of the same id may be another, removed
    /// file whose inode number `obj` got (directories are held by
    /// descriptor: their numbers are not reused while known).
    fn live_layer_obj(&self, obj: LayerObj, layers: &Layers) -> Arc<LayerObj> {
        let t = self.nodes.lock().unwrap();
        let key = NodeKey::Layer(obj.view.number, obj.id);
        match t
            .by_key
            .get(&key)
            .and_then(|id| t.by_id.get(id))
            .map(|n| &n.obj)
        {
            Some(Obj::Layer(live))
                if live.is_dir == obj.is_dir
                    && (live.is_dir || live.is_found_again(&obj, None, layers)) =>
            {
                live.clone()
            }
            _ => Arc::new(obj),
        }
    }

    /// Records what the kernel is given in `journal`, and serves what a
    /// predecessor's kernel still holds (`held`) once asked for it.
    pub fn with_handoff(mut self, journal: Journal, held: Held) -> FsCore {
        // Above every id a predecessor handed out, even those a full
        // journal could not record.
        let marks = journal.high_water();
        *self.next_handle.get_mut() = held.max_handle().max(marks.handle) + 1;
        *self.next_generation.get_mut() = held.max_generation().max(marks.generation) + 1;
        let synthetic = held
            .nodes
            .keys()
            .copied()
            .chain(Some(marks.node))
            .filter(|&id| id >= SYNTHETIC_BASE)
            .max();
        if let Some(id) = synthetic {
            *self.next_synthetic.get_mut() = id + 1;
        }
        if !held.nodes.is_empty() {
            tracing::info!(
                nodes = held.nodes.len(),
                files = held.files.len(),
                dirs = held.dirs.len(),
                "taking over: the kernel holds these from the previous worker"
            );
        }
        // The kernel keeps writing files the predecessor opened for
        // passthrough without a word to this worker.
        *self.unseen.get_mut().unwrap() = held
            .files
            .iter()
            .filter(|(_, (node, flags))| {
                held.backings.contains_key(node) && flags & libc::O_ACCMODE != libc::O_RDONLY
            })
            .map(|(&fh, &(node, _))| (fh, NodeId(node)))
            .collect();
        *self.mapped.get_mut().unwrap() = held.mapped.iter().map(|&n| NodeId(n)).collect();
        self.held_synthetic = held
            .nodes
            .iter()
            .filter(|&(&id, n)| id >= SYNTHETIC_BASE && matches!(n.origin, Origin::Layer { .. }))
            .map(|(&id, _)| NodeId(id))
            .collect();
        self.handoff = Some((journal, Mutex::new(held)));
        self
    }

    /// What a predecessor left open in the kernel: each file's handle and
    /// node, and the backing file ids of nodes open for passthrough.
    pub fn held_open(&self) -> (Vec<(FileHandle, NodeId)>, HashMap<u64, u32>) {
        self.held(|h| {
            let files = h
                .files
                .iter()
                .map(|(&fh, &(node, _))| (FileHandle(fh), NodeId(node)))
                .collect();
            Some((files, h.backings.clone()))
        })
        .unwrap_or_default()
    }

    /// Runs `f` holding the node table, which every FUSE request needs:
    /// the worker's test fault hook, to play a stalled worker.
    pub fn stall(&self, f: impl FnOnce()) {
        let _nodes = self.nodes.lock().unwrap();
        f();
    }

    /// Records for a successor that `node`'s passthrough opens share
    /// backing file `id` (None: the backing file was closed).
    pub fn journal_backing(&self, node: NodeId, id: Option<u32>) {
        self.journal(|| {
            Some(match id {
                Some(id) => Record::Backing { node: node.0, id },
                None => Record::Unbacked(node.0),
            })
        });
    }

    fn journal(&self, r: impl FnOnce() -> Option<Record>) {
        if let Some((j, _)) = &self.handoff {
            if let Some(r) = r() {
                j.append(&r);
            }
        }
    }

    /// What a predecessor left for `f` to pick from.
    fn held<T>(&self, f: impl FnOnce(&mut Held) -> Option<T>) -> Option<T> {
        self.handoff
            .as_ref()
            .and_then(|(_, h)| f(&mut h.lock().unwrap()))
    }

    /// The object of directory node `dir`, where a resumed file was found:
    /// one known already, or one held with no place of its own (as no
    /// directory has), so that resuming a file resumes at most one more
    /// node, whatever a damaged journal says.
    fn held_dir(&self, dir: u64) -> Option<Obj> {
        let known = self
            .nodes
            .lock()
            .unwrap()
            .by_id
            .get(&dir)
            .map(|n| n.obj.clone());
        if known.is_some() {
            return known;
        }
        self.held(|h| h.nodes.get(&dir).filter(|n| n.at.is_none()).map(drop))?;
        self.obj(NodeId(dir)).ok()
    }

    /// Finds node `id` of a predecessor again, from its journal record.
    /// ESTALE if it cannot: for a path the kernel then looks every name up
    /// again (the VFS retries a walk that met ESTALE), and a name that
    /// still leads somewhere gets the same node id back.
    fn resume_node(&self, id: NodeId) -> io::Result<Obj> {
        self.find_held(id).map_err(|e| {
            tracing::debug!(
                node = id.0,
                "cannot find a node of the previous worker: {e}"
            );
            errno(libc::ESTALE)
        })
    }

    fn find_held(&self, id: NodeId) -> io::Result<Obj> {
        // A rename may move the node while it is being found (a retry
        // finds it at its new place); one that keeps moving is ESTALE.
        for _ in 0..3 {
            if let Some(obj) = self.find_held_once(id)? {
                return Ok(obj);
            }
        }
        Err(errno(libc::ESTALE))
    }

    /// One try of [`FsCore::find_held`]: `None` if the node was renamed
    /// meanwhile (what was found at its old place may be another object).
    fn find_held_once(&self, id: NodeId) -> io::Result<Option<Obj>> {
        let HeldNode {
            generation,
            origin,
            at,
            ..
        } = self
            .held(|h| h.nodes.get(&id.0).cloned())
            .ok_or_else(|| errno(libc::ESTALE))?;
        let found_by = origin.clone();
        // Main's object a view's node shows, and whether to mark it for
        // the watch once the node is in the table (see `watch_main_dir`).
        let mut shows = None;
        // An older worker's layer record, journaled again with the object's id.
        let mut upgraded = None;
        let (obj, key) = match origin {
            Origin::Main(handle) => {
                // By the name it was found by, if its directory is still
                // held: opened by a bare handle, it may have no path on
                // the host (see `MainInode::Handle`).
                let place = at.and_then(|(dir, name)| {
                    let obj = self.held_dir(dir)?;
                    obj.main_dir().ok()?;
                    let name = CString::new(name).ok()?;
                    Some(Place {
                        dir: NodeId(dir),
                        obj,
                        name,
                    })
                });
                let named = place.as_ref().and_then(Place::named);
                let fd = hostfs::open_handle_by_name(self.mount_fd(), &handle, named)?;
                let st = hostfs::stat(fd.as_fd())?;
                self.watch_dir(fd.as_fd(), &st);
                let inode = MainInode::new(fd, &st, Some(handle), place);
                (
                    Obj::Main(Arc::new(inode)),
                    NodeKey::Host(st.st_dev, st.st_ino),
                )
            }
            Origin::Snap {
                snap,
                epoch,
                handle,
                ino,
            } => {
                let snap = SnapshotId(snap);
                // Found again by its name, if its directory is still held,
                // so that it is opened by that name (see `SnapObj::open_live`).
                let found = at.and_then(|(dir, name)| match &self.held_dir(dir)? {
                    Obj::Snap(dir) if dir.snap == snap => {
                        let found = dir
                            .lookup(&self.store, self.mount_fd(), OsStr::from_bytes(&name))
                            .ok()?;
                        (found.handle == handle).then(|| dir.child(found))
                    }
                    _ => None,
                });
                let obj = Arc::new(match found {
                    Some(obj) => obj,
                    None => {
                        // Its type, for the trimmer's count.
                        let probe = SnapObj::new(snap, epoch, handle.clone(), ino, true);
                        let st = probe.stat(&self.store, self.mount_fd())?;
                        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                        SnapObj::new(snap, epoch, handle, ino, is_dir)
                    }
                });
                // Files are left unmarked (watch_dir checks).
                shows = Some((obj.clone(), true));
                (Obj::Snap(obj), NodeKey::Snap(snap, ino))
            }
            Origin::Layer {
                parent,
                name,
                local,
            } => {
                let Obj::Layer(dir) = &self.obj(NodeId(parent))? else {
                    return Err(errno(libc::ESTALE));
                };
                let layers = self.layers_of(dir)?;
                let obj = dir.lookup(self.cx(), &layers, OsStr::from_bytes(&name))?;
                // The name leads to another object now (its own was
                // removed, or renamed by a worker that did not know this
                // node): the kernel's node is gone.
                if local.is_some_and(|l| l != obj.id) {
                    return Err(errno(libc::ESTALE));
                }
                if local.is_none() {
                    upgraded = Some(Origin::Layer {
                        parent,
                        name: name.clone(),
                        local: Some(obj.id),
                    });
                }
                shows = obj.base(&layers).map(|b| (b, obj.is_dir));
                let key = NodeKey::Layer(obj.view.number, obj.id);
                (Obj::Layer(Arc::new(obj)), key)
            }
            Origin::Removed => return Err(errno(libc::ESTALE)),
        };
        let mut t = self.nodes.lock().unwrap();
        // Read under the table's lock, as `forget` and `left` change
        // them: the predecessors' lookups become this node's.
        let lookups = match self.held(|h| {
            h.nodes
                .get(&id.0)
                .map(|n| (n.origin == found_by, n.lookups))
        }) {
            Some((true, lookups)) => lookups,
            Some((false, _)) => return Ok(None),
            None => match t.by_id.get(&id.0) {
                Some(node) => return Ok(Some(node.obj.clone())),
                None => return Err(errno(libc::ESTALE)),
            },
        };
        match t.by_key.get(&key) {
            // Resolved meanwhile by another request, or by a lookup.
            Some(&known) if known == id.0 => return Ok(Some(t.by_id[&known].obj.clone())),
            // The name now leads elsewhere (renamed over, removed and
            // reused): the kernel's node is gone.
            Some(_) => return Err(errno(libc::ESTALE)),
            None => {}
        }
        if let NodeKey::Layer(view, local) = key {
            let synthetic = id.view() == VIEW_SPECIAL;
            if !synthetic && id != NodeId::in_view(view as u64, local) {
                return Err(errno(libc::ESTALE));
            }
        }
        t.insert(
            id.0,
            obj,
            key,
            shows.as_ref().map(|(b, _)| b.ino),
            generation,
            lookups,
        );
        if let Some((base, true)) = &shows {
            self.watch_main_dir(base);
        }
        let node = t.by_id.get_mut(&id.0).expect("just inserted");
        node.journaled = true;
        if let Some(origin) = upgraded {
            let generation = node.generation;
            self.journal(|| {
                Some(Record::Node {
                    id: id.0,
                    generation,
                    origin,
                    at: None,
                })
            });
        }
        Ok(Some(node.obj.clone()))
    }

    /// Has `watch` mark main's directories as the kernel learns them (the
    /// root at once).
    pub fn with_watch(mut self, watch: Arc<SourceWatch>) -> FsCore {
        self.watch = Some(watch);
        self
    }

    /// Marks main's directory `fd` (of device `dev`) for the watch, if any.
    /// A directory left unmarked only loses the watch's promptness: its
    /// changes behind the mount show within the cache timeout.
    fn watch_dir(&self, fd: BorrowedFd<'_>, st: &Stat) {
        if let Some(w) = &self.watch
            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
            && let Err(e) = w.watch(fd, st)
        {
            tracing::warn!(
                ino = st.st_ino,
                "cannot watch a directory of the source: {e}"
            );
        }
    }

    /// Marks main's directory `base` (as a snapshot or a branch shows it)
    /// for the watch, unless it is marked already: the kernel may know it
    /// only through snapshots and branches, which show main's changes
    /// behind the mount too. Called with the node table locked, once the
    /// node is in it or about to be: `forget` drops a directory from the
    /// watch's table, under that lock, only when no node shows it.
    fn watch_main_dir(&self, base: &SnapObj) {
        if let Some(w) = &self.watch
            && !w.is_watched(base.ino)
            && let Ok(fd) = hostfs::open_handle(self.mount_fd(), &base.handle)
            && let Ok(st) = hostfs::stat(fd.as_fd())
        {
            self.watch_dir(fd.as_fd(), &st);
        }
    }

    /// Drops main's inode `ino` from the watch's table once no node shows
    /// it: a directory's mark stays while any does.
    fn unwatch_unshown(&self, t: &NodeTable, ino: u64) {
        if let Some(w) = &self.watch
            && !t.shows_main(self.source_dev, ino)
        {
            w.forgotten(self.source_dev, ino);
        }
    }

    /// The device and inode number of main's inode behind `handle`, if it
    /// is still there.
    pub fn main_ino_of(&self, handle: &HostHandle) -> Option<(u64, u64)> {
        let fd = hostfs::open_handle(self.mount_fd(), handle).ok()?;
        let st = hostfs::stat(fd.as_fd()).ok()?;
        Some((st.st_dev, st.st_ino))
    }

    /// The nodes the kernel knows that show main's inode `ino` on device
    /// `dev`: main's own, and those of the snapshots and branches that
    /// share it (apart). A change made to it behind the mount shows in them too
    /// (it is not preserved); where a view has its own copy, dropping
    /// what the kernel caches of it costs one lookup.
    pub fn nodes_showing_main(&self, dev: u64, ino: u64) -> (Option<NodeId>, Vec<NodeId>) {
        let t = self.nodes.lock().unwrap();
        let main = t.by_key.get(&NodeKey::Host(dev, ino)).map(|&id| NodeId(id));
        let views = (dev == self.source_dev)
            .then(|| t.by_main_ino.get(&ino))
            .flatten()
            .map_or(&[][..], Shown::ids)
            .iter()
            .map(|&id| NodeId(id))
            .collect();
        (main, views)
    }

    /// Serves bound processes with `isolation` from now on.
    pub fn with_isolation(mut self, isolation: Isolation) -> FsCore {
        self.isolation = isolation;
        self
    }

    /// The node where a request from thread `pid` on `node` goes: the mount
    /// root is the root of the caller's branch; every other node is itself.
    /// Under [`Isolation::Strict`], EACCES if a bound caller names a node
    /// outside its branch. pid 0 (the kernel's own write-back and FORGET) is
    /// nobody's and goes everywhere.
    pub fn route(&self, node: NodeId, pid: u32) -> io::Result<NodeId> {
        if pid == 0 || (node != NodeId::ROOT && self.isolation == Isolation::Routed) {
            return Ok(node);
        }
        let Some(branch) = self.bindings.resolve(pid) else {
            return Ok(node);
        };
        if node == NodeId::ROOT {
            let views = self.views.read().unwrap();
            return Ok(views.get(&branch.0).map_or(node, |v| v.root));
        }
        // obj() also finds a node held from a predecessor, so that it is
        // classified like any other.
        let view = match self.obj(node).as_ref() {
            Ok(Obj::Layer(o)) => Some(o.view.number),
            Ok(_) => None,
            // Forgotten: let the request fail as it would for anyone.
            Err(_) => return Ok(node),
        };
        if view == Some(branch.0) {
            Ok(node)
        } else {
            tracing::info!(
                pid,
                branch = branch.0,
                node = node.0,
                "strict isolation: refused a node outside the caller's branch"
            );
            Err(errno(libc::EACCES))
        }
    }

    fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.main_dir().expect("the root is a main directory")
    }

    /// What snapshot objects open live inodes by handle with.
    fn mount_fd(&self) -> BorrowedFd<'_> {
        self.handle_dir.as_fd()
    }

    /// An `O_PATH` descriptor of a main node's inode: a directory's own;
    /// any other opened by its last known name if that still leads to it,
    /// else by its handle (ESTALE once it is gone;
    /// [`hostfs::open_handle_by_name`]). EROFS for every other kind, which
    /// is what each change to them must answer.
    fn main_inode<'a>(&self, obj: &'a Obj) -> io::Result<HostFd<'a>> {
        match obj {
            Obj::Main(m) => match &**m {
                MainInode::Open(fd) => Ok(HostFd::Main(fd.as_fd())),
                MainInode::Handle { handle, at } => at
                    .open(self.mount_fd(), handle, Place::named)
                    .map(HostFd::Opened),
            },
            _ => Err(errno(libc::EROFS)),
        }
    }

    /// Main's file behind `fd` is at `place` now (it was renamed there);
    /// so a successor learns too.
    fn main_moved(&self, fd: BorrowedFd<'_>, place: Place) {
        let Ok(st) = hostfs::stat(fd) else { return };
        let t = self.nodes.lock().unwrap();
        match t
            .by_key
            .get(&NodeKey::Host(st.st_dev, st.st_ino))
            .and_then(|&id| Some((id, t.by_id.get(&id)?)))
        {
            Some((id, n)) => self.main_placed(id, n, place, 1),
            // Held from a predecessor and not used since (by its number,
            // the id main's files get): its record learns the new place.
            None => {
                let Ok(handle) = hostfs::handle_of(fd) else {
                    return;
                };
                let (id, origin) = (st.st_ino, Origin::Main(handle));
                let at = place.found_at();
                let placed = |h: &mut Held| {
                    let n = h.nodes.get_mut(&id).filter(|n| n.origin == origin)?;
                    n.at = Some(at.clone());
                    Some(n.generation)
                };
                if let Some(generation) = self.held(placed) {
                    self.journal(|| {
                        Some(Record::Node {
                            id,
                            generation,
                            origin,
                            at: Some(at),
                        })
                    });
                }
            }
        }
    }

    /// Main's file of node `id` (`n`) is found at `place`: it is opened by
    /// that name first from now on (by its others too if it has several
    /// `links`; a rename passes 1, its old name is gone), and a successor
    /// learns it too if the place is new to it.
    fn main_placed(&self, id: u64, n: &Node, place: Place, links: u64) {
        let Obj::Main(m) = &n.obj else {
            return;
        };
        let MainInode::Handle { handle, at } = &**m else {
            return;
        };
        let new = place.found_at();
        if at.learn(place, links) && n.journaled {
            self.journal(|| {
                Some(Record::Node {
                    id,
                    generation: n.generation,
                    origin: Origin::Main(handle.clone()),
                    at: Some(new),
                })
            });
        }
    }

    /// The object of a node the kernel holds a lookup on.
    fn obj(&self, id: NodeId) -> io::Result<Obj> {
        let known = self
            .nodes
            .lock()
            .unwrap()
            .by_id
            .get(&id.0)
            .map(|n| n.obj.clone());
        match known {
            Some(obj) => Ok(obj),
            // The kernel never names a node it forgot: this one it got from
            // a predecessor (ESTALE if that left no record of it).
            None => self.resume_node(id),
        }
    }

    /// Registers an object under `key` (one lookup for the kernel) in the
    /// node table `t`, which the caller has locked (and may have checked
    /// the key's node in first): the existing node if the key is known,
    /// else a new node with id `id` (a synthetic one if that is taken),
    /// showing main's inode `main_ino` for a view's node.
    /// `origin` says how a successor finds a new node again, and where
    /// it was found ([`crate::handoff`]); it is asked only when a journal
    /// is kept.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        t: &mut NodeTable,
        key: NodeKey,
        id: Option<u64>,
        main_ino: Option<u64>,
        make: impl FnOnce() -> Obj,
        origin: impl FnOnce(&NodeTable, &Obj) -> Option<(Origin, Option<FoundAt>)>,
        stat: Stat,
    ) -> Entry {
        if let Some(&existing) = t.by_key.get(&key) {
            let node = t.by_id.get_mut(&existing).expect("tables agree");
            node.lookups += 1;
            if node.journaled {
                self.journal(|| Some(Record::Lookup { id: existing, n: 1 }));
            }
            return Entry {
                node: NodeId(existing),
                generation: node.generation,
                stat,
                cacheable: true,
            };
        }
        let obj = make();
        let origin = self.handoff.as_ref().and_then(|_| origin(t, &obj));
        // An id the kernel may still hold from a predecessor is this
        // object's only if the predecessor recorded the same origin (an
        // inode number, which main and native branch ids are made of, can
        // be reused by another file once the dead worker's descriptors are
        // gone): then it keeps its generation and the predecessors'
        // lookups. Otherwise it is taken, as a live node's is: the kernel's
        // old node answers ESTALE instead of reaching the new file.
        let held = |id: u64| {
            self.held(|h| {
                let was = h.nodes.get(&id)?;
                let same = origin
                    .as_ref()
                    .map(|(o, _)| o)
                    .filter(|o| o.matches(&was.origin));
                // An older worker's record without the object's id is
                // journaled again with it (not exact).
                Some(same.map(|o| {
                    (
                        was.generation,
                        was.lookups,
                        was.at.clone(),
                        *o == was.origin,
                    )
                }))
            })
        };
        let (id, inherited) = match id {
            Some(id) if !t.by_id.contains_key(&id) => match held(id) {
                None => (id, None),
                Some(Some(was)) => (id, Some(was)),
                Some(None) => (self.next_synthetic.fetch_add(1, Ordering::Relaxed), None),
            },
            _ => (self.next_synthetic.fetch_add(1, Ordering::Relaxed), None),
        };
        // Before the reply hands the id to the kernel.
        let journaled = inherited.is_some() || origin.is_some();
        // A new node's origin, or where a held one is found now if its
        // predecessor knew it elsewhere.
        let inherits = inherited.is_some();
        let (generation, lookups, record) = match inherited {
            Some((generation, lookups, was_at, exact)) => {
                let moved = origin.filter(|(_, at)| !exact || (at.is_some() && *at != was_at));
                (generation, lookups + 1, moved)
            }
            None => {
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                (generation, 1, origin)
            }
        };
        if let Some((origin, at)) = record {
            self.journal(|| {
                Some(Record::Node {
                    id,
                    generation,
                    origin,
                    at,
                })
            });
        }
        if inherits {
            self.journal(|| Some(Record::Lookup { id, n: 1 }));
        }
        t.insert(id, obj, key, main_ino, generation, lookups);
        t.by_id.get_mut(&id).expect("just inserted").journaled = journaled;
        Entry {
            node: NodeId(id),
            generation,
            stat,
            cacheable: true,
        }
    }

    /// Registers a host inode of main, found at `at` (by that name).
    fn register_main(&self, fd: OwnedFd, at: Place) -> io::Result<Entry> {
        let stat = hostfs::stat(fd.as_fd())?;
        let own = stat.st_ino;
        let id = (stat.st_dev == self.source_dev && own != NodeId::ROOT.0 && own <= LOCAL_MAX)
            .then_some(own);
        let inode = MainInode::new(fd, &stat, None, Some(at));
        // A directory is found by its handle alone: the host connects it.
        let origin = |_: &NodeTable, obj: &Obj| match obj {
            Obj::Main(m) => match &**m {
                MainInode::Open(fd) => hostfs::handle_of(fd.as_fd())
                    .ok()
                    .map(|h| (Origin::Main(h), None)),
                MainInode::Handle { handle, at } => Some((
                    Origin::Main(handle.clone()),
                    at.newest().as_ref().map(Place::found_at),
                )),
            },
            _ => None,
        };
        let key = NodeKey::Host(stat.st_dev, own);
        let mut t = self.nodes.lock().unwrap();
        // A file's node pins no inode: its number may be another inode's
        // by now, which needs a node of its own. The same file's node
        // learns where it was found.
        let (found, found_at) = match &inode {
            MainInode::Handle { handle, at } => (Some(handle), at.newest()),
            MainInode::Open(_) => (None, None),
        };
        let known = t
            .by_key
            .get(&key)
            .and_then(|&id| Some((id, t.by_id.get(&id)?)));
        let stale = match known {
            Some((id, n)) => match &n.obj {
                Obj::Main(m) => match &**m {
                    MainInode::Handle { handle, .. } if Some(handle) == found => {
                        if let Some(place) = found_at {
                            self.main_placed(id, n, place, stat.st_nlink);
                        }
                        false
                    }
                    MainInode::Handle { .. } => true,
                    MainInode::Open(_) => false,
                },
                _ => false,
            },
            None => false,
        };
        if stale {
            t.by_key.remove(&key);
        }
        Ok(self.register(
            &mut t,
            key,
            id,
            None,
            || {
                if let MainInode::Open(fd) = &inode {
                    self.watch_dir(fd.as_fd(), &stat);
                }
                Obj::Main(Arc::new(inode))
            },
            origin,
            stat,
        ))
    }

    /// Registers an inode of a snapshot view.
    fn register_snap(&self, obj: SnapObj) -> io::Result<Entry> {
        let stat = obj.stat(&self.store, self.mount_fd())?;
        let id = (obj.ino <= LOCAL_MAX).then(|| NodeId::in_view(obj.snap.0 as u64, obj.ino).0);
        let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        // A file is also found by its name (see `SnapObj::open_live`); a
        // directory by its handle alone: the host connects it.
        let origin = |t: &NodeTable, obj: &Obj| match obj {
            Obj::Snap(s) => {
                let at = s.found_at().filter(|_| !is_dir).and_then(|(dir, name)| {
                    let &dir = t.by_key.get(&NodeKey::Snap(s.snap, dir))?;
                    Some((dir, name.to_bytes().to_vec()))
                });
                let origin = Origin::Snap {
                    snap: s.snap.0,
                    epoch: s.epoch,
                    handle: s.handle.clone(),
                    ino: s.ino,
                };
                Some((origin, at))
            }
            _ => None,
        };
        let mut t = self.nodes.lock().unwrap();
        Ok(self.register(
            &mut t,
            NodeKey::Snap(obj.snap, obj.ino),
            id,
            Some(obj.ino),
            || {
                if is_dir {
                    self.watch_main_dir(&obj);
                }
                Obj::Snap(Arc::new(obj))
            },
            origin,
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
        let dir_obj = self.obj(parent)?;
        match (parent, &dir_obj) {
            (_, Obj::Main(_)) => {
                let name = hostfs::component(name)?;
                let fd = hostfs::open_node(dir_obj.main_dir()?, &name)?;
                let at = Place {
                    dir: parent,
                    obj: dir_obj.clone(),
                    name,
                };
                self.register_main(fd, at)
            }
            (_, Obj::Snap(dir)) => {
                let found = dir.lookup(&self.store, self.mount_fd(), name)?;
                self.register_snap(dir.child(found))
            }
            (_, Obj::Layer(dir)) => {
                if dir.is_root() && name.as_bytes() == AGENTFS_NAME {
                    return Ok(self.virtual_entry(NodeId::AGENTFS));
                }
                let layers = self.layers_of(dir)?;
                self.register_layer(dir.lookup(self.cx(), &layers, name)?, &layers)
            }
            (NodeId::BRANCHES, Obj::Virtual) => {
                let b = self
                    .catalog
                    .lock()
                    .unwrap()
                    .branches
                    .iter()
                    .find(|b| b.name.as_bytes() == name.as_bytes())
                    .map(|b| b.id.0)
                    .ok_or_else(|| errno(libc::ENOENT))?;
                self.view_root_entry(b)
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
                if snap.branch.is_some() {
                    return self.view_root_entry(snap.id.0);
                }
                let root = self.root_fd();
                let obj = SnapObj::new(
                    snap.id,
                    snap.epoch,
                    hostfs::handle_of(root)?,
                    hostfs::stat(root)?.st_ino,
                    true,
                );
                let mut e = self.register_snap(obj)?;
                e.cacheable = false;
                Ok(e)
            }
            _ => Err(errno(libc::ENOENT)),
        }
    }

    /// The entry of a layered view's root (a permanent node), never cached:
    /// the name may go away with the view.
    fn view_root_entry(&self, number: u32) -> io::Result<Entry> {
        let root = self
            .views
            .read()
            .unwrap()
            .get(&number)
            .map(|v| v.root)
            .ok_or_else(|| errno(libc::ENOENT))?;
        let mut e = Entry {
            node: root,
            generation: 0,
            stat: self.getattr(root)?,
            cacheable: false,
        };
        e.stat.st_ino = root.0;
        Ok(e)
    }

    /// The kernel dropped `n` lookups of `node`; true if that was the last
    /// (the node, and the host descriptors it held, are gone).
    pub fn forget(&self, node: NodeId, n: u64) -> bool {
        let mut t = self.nodes.lock().unwrap();
        let forgotten = || Some(Record::Forget { id: node.0, n });
        let Some(entry) = t.by_id.get_mut(&node.0) else {
            // Held from a predecessor and never used since.
            if self.held(|h| h.forget(node.0, n)).is_some() {
                self.journal(forgotten);
            }
            return false;
        };
        if entry.journaled {
            self.journal(forgotten);
        }
        entry.lookups = entry.lookups.saturating_sub(n);
        if entry.lookups > 0 {
            return false;
        }
        let gone = t.remove(node.0).expect("found above");
        let ino = match gone.key {
            NodeKey::Host(dev, ino) => (dev == self.source_dev).then_some(ino),
            _ => gone.main_ino,
        };
        if let Some(ino) = ino {
            self.unwatch_unshown(&t, ino);
        }
        self.held(|h| h.nodes.remove(&node.0));
        true
    }

    /// What the nodes the kernel knows cost, for the trimmer: how many
    /// may hold descriptors ([`Obj::count_in`]), and how many there are
    /// (each costs memory and a record in the handoff journal).
    pub fn load(&self) -> Load {
        let t = self.nodes.lock().unwrap();
        let nodes = t.by_id.len();
        Load {
            // A copy-up counts its node outside the table's lock.
            holding: t.holding.load(Ordering::Relaxed).min(nodes),
            nodes,
        }
    }

    /// Which of `nodes` may hold descriptors (as [`FsCore::load`] counts
    /// them); a node gone since holds none.
    pub fn holds_descriptors(&self, nodes: &[u64]) -> Vec<bool> {
        let t = self.nodes.lock().unwrap();
        nodes
            .iter()
            .map(|id| {
                t.by_id.get(id).is_some_and(|n| match &n.obj {
                    Obj::Layer(o) => o.counted_holding(),
                    obj => obj.keeps_descriptors(),
                })
            })
            .collect()
    }

    /// Attributes of a node.
    pub fn getattr(&self, node: NodeId) -> io::Result<Stat> {
        let obj = self.obj(node)?;
        match &obj {
            Obj::Main(_) => hostfs::stat(self.main_inode(&obj)?.as_fd()),
            Obj::Snap(s) => s.stat(&self.store, self.mount_fd()),
            Obj::Layer(o) => {
                let mut st = o.stat(self.cx(), &*self.layers_of(o)?)?;
                st.st_ino = o.id;
                Ok(st)
            }
            Obj::Virtual => Ok(self.virtual_stat(node)),
        }
    }

    /// Whether the kernel may cache what it finds of `name` in directory
    /// `dir` (asked once per reply: at the root the name is remembered).
    /// In the mount root only while nothing is bound: they depend on the
    /// caller's binding, so while anything is, every path walk from the
    /// root must ask again. Everywhere else: the root of a branch by path
    /// (`.agentfs/branches/<name>`) too, although a process bound to the
    /// branch changes its names through the mount root, which the kernel
    /// takes for another directory; the adapter has the kernel drop those
    /// names there before it replies to such a change.
    pub fn names_cacheable(&self, dir: NodeId, name: &OsStr) -> bool {
        dir != NodeId::ROOT || self.bindings.root_name_cacheable(name)
    }

    /// Whether the kernel may remember that `name` is absent from `dir`,
    /// for as long as it caches names: in the tree's directories where it
    /// may cache names (above), main's and the views'. The caller knows
    /// whether a name made behind the mount's back is seen (the kernel
    /// drops what it remembered of a name made through the mount). Not in
    /// the virtual directories, whose names come with the catalog, nor
    /// under strict isolation, where a confined caller holding another
    /// branch's directory must be refused rather than told what it lacks.
    pub fn absence_cacheable(&self, dir: NodeId, name: &OsStr) -> bool {
        self.isolation == Isolation::Routed
            && self.names_cacheable(dir, name)
            && !matches!(self.obj(dir).as_ref(), Ok(Obj::Virtual) | Err(_))
    }

    /// Whether the kernel may cache a node's attributes: not for the
    /// virtual directories, whose listings change with the catalog. For
    /// the mount root, whose attributes depend on the caller, only while
    /// nothing is bound.
    pub fn attr_cacheable(&self, node: NodeId) -> bool {
        if node == NodeId::ROOT {
            return self.bindings.root_shared();
        }
        node.view() != VIEW_SPECIAL || node.0 >= SYNTHETIC_BASE
    }

    /// Whether the kernel may keep a directory's listing across opens
    /// (FOPEN_CACHE_DIR): only where every change to it reaches the
    /// kernel, which then drops the listing itself (a change through the
    /// mount) or is told to (the source watch's invalidation of the
    /// directories that show main's, in main, snapshots and branches). So
    /// every directory below the root while the watch runs, but the root
    /// (its names depend on the caller), a branch's root (a bound process
    /// changes it through the mount root, which the kernel takes for
    /// another directory) and `.agentfs/` (it changes with the catalog).
    pub fn listing_cacheable(&self, dir: NodeId) -> bool {
        dir != NodeId::ROOT
            && self.watch.is_some()
            && match self.obj(dir).as_ref() {
                Ok(Obj::Main(_) | Obj::Snap(_)) => true,
                Ok(Obj::Layer(o)) => !o.is_root(),
                Ok(Obj::Virtual) | Err(_) => false,
            }
    }

    /// Lets the kernel cache names and attributes at the mount root while
    /// nothing is bound (see [`RootCache`]).
    pub fn share_root(&self, root: RootCache) {
        self.bindings.share_root(root);
    }

    /// Stores pre-images of the inodes behind `fds` if a snapshot of main
    /// needs them, and returns the guard to hold until the change is done.
    fn before_change(&self, fds: &[BorrowedFd<'_>]) -> io::Result<RwLockReadGuard<'_, Latest>> {
        let latest = self.latest.read().unwrap();
        if let Some(tag) = latest.tag {
            for fd in fds {
                let h = hostfs::handle_of(*fd)?;
                if !latest.born.lock().unwrap().contains(&h) {
                    self.store.preserve(*fd, &h, tag).inspect_err(|e| {
                        preserve_failed(tag, e);
                    })?;
                }
            }
        }
        Ok(latest)
    }

    /// The host inode to change for `obj`, with the guard to hold until
    /// the change is done: main's own inode after preserving it for the
    /// snapshots, or a branch's copy in its top layer (copied up first).
    /// EROFS for snapshots and virtual directories.
    fn writable<'a>(
        &'a self,
        obj: &'a Obj,
        open: Option<&OpenFile>,
    ) -> io::Result<(ChangeGuard<'a>, HostFd<'a>)> {
        match obj {
            Obj::Main(_) => {
                let fd = self.main_inode(obj)?;
                let g = self.before_change(&[fd.as_fd()])?;
                Ok((ChangeGuard::Main { _held: g }, fd))
            }
            Obj::Layer(o) => {
                let layers = self.layers_of(o)?;
                if let Some(OpenFile::Layer { obj, flags, file }) = open.filter(|f| f.writable()) {
                    // A file removed while open has a copy once its open
                    // file is brought up to date (`LayerObj::nameless`).
                    drop(self.layer_file(obj, *flags, file, &layers)?);
                }
                let u = o.upper(self.cx(), &layers)?;
                Ok((
                    ChangeGuard::Layer { _held: layers },
                    HostFd::Upper(u.fd(self.cx())?),
                ))
            }
            _ => Err(errno(libc::EROFS)),
        }
    }

    /// Applies a `setattr`: owner first (a chown clears set-id bits, so an
    /// explicit mode must come after it), then mode, size and times.
    pub fn setattr(&self, node: NodeId, fh: Option<FileHandle>, attr: SetAttr) -> io::Result<Stat> {
        let obj = self.obj(node)?;
        // Before the change's guard: a predecessor's file is opened again
        // through the view's layers, and a second read of that lock on this
        // thread would wait forever behind a snapshot waiting to write it.
        let file = match (attr.size, fh) {
            (Some(_), Some(fh)) => Some(self.file(fh)?),
            _ => None,
        };
        let (_change, fd) = self.writable(&obj, file.as_deref())?;
        let fd = fd.as_fd();
        if attr.uid.is_some() || attr.gid.is_some() {
            hostfs::chown(fd, attr.uid, attr.gid)?;
        }
        if let Some(mode) = attr.mode {
            hostfs::chmod(fd, mode & 0o7777)?;
        }
        if let Some(size) = attr.size {
            match file.as_deref() {
                Some(OpenFile::Main(file)) => file.set_len(size)?,
                _ => hostfs::reopen(fd, libc::O_WRONLY)?.set_len(size)?,
            }
            attr.set_id.apply(fd)?;
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
            // A copy-up into a branch's directory puts its times back.
            let _names = match &obj {
                Obj::Layer(o) => Some(o.changing_names()),
                _ => None,
            };
            hostfs::utimens(fd, &[ts(attr.atime), ts(attr.mtime)])?;
        }
        match &obj {
            Obj::Layer(o) => {
                let mut st = layered::stat_in_layer(fd)?;
                st.st_ino = o.id;
                Ok(st)
            }
            _ => hostfs::stat(fd),
        }
    }

    /// Target of a symlink.
    pub fn readlink(&self, node: NodeId) -> io::Result<Vec<u8>> {
        let obj = self.obj(node)?;
        match &obj {
            Obj::Main(_) => hostfs::readlink(self.main_inode(&obj)?.as_fd()),
            Obj::Snap(s) => s.readlink(&self.store, self.mount_fd()),
            Obj::Layer(o) => o.readlink(self.cx(), &*self.layers_of(o)?),
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
        fd: BorrowedFd<'_>,
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
        let st = hostfs::stat(fd)?;
        if st.st_uid == caller.uid && gid.is_none_or(|g| g == st.st_gid) {
            return Ok(());
        }
        hostfs::chown(fd, Some(caller.uid), gid)?;
        if let Some(mode) = mode {
            if mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                hostfs::chmod(fd, mode & 0o7777)?;
            }
        }
        Ok(())
    }

    /// A directory and a name in it, for a change. `.agentfs` in the root
    /// of a view is the control directory, not a name of the tree: it
    /// cannot be changed (EROFS), whatever the tree holds under that name.
    fn dir_entry(&self, parent: NodeId, name: &OsStr) -> io::Result<Obj> {
        let obj = self.obj(parent)?;
        let is_root = match &obj {
            Obj::Main(_) => parent == NodeId::ROOT,
            Obj::Layer(o) => o.is_root(),
            _ => return Err(errno(libc::EROFS)),
        };
        if is_root && name.as_bytes() == AGENTFS_NAME {
            return Err(errno(libc::EROFS));
        }
        Ok(obj)
    }

    /// A main directory and a name in it, for a change.
    fn main_entry(&self, parent: NodeId, name: &OsStr) -> io::Result<(Obj, CString)> {
        let obj = self.dir_entry(parent, name)?;
        obj.main_dir()?;
        Ok((obj, hostfs::component(name)?))
    }

    /// Runs `make` (which creates a name in a directory on the host, with
    /// the caller's umask), gives the new node to the caller and registers
    /// it. In a branch, the name is made in the directory's top-layer copy.
    fn make_node(
        &self,
        parent: NodeId,
        name: &OsStr,
        caller: Caller,
        mode: Option<u32>,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> io::Result<()>,
    ) -> io::Result<Entry> {
        let make = |d: BorrowedFd<'_>, n: &CStr| hostfs::with_umask(caller.umask, || make(d, n));
        let obj = self.dir_entry(parent, name)?;
        match &obj {
            Obj::Layer(dir) => {
                let layers = self.layers_of(dir)?;
                let new = dir.create(self.cx(), &layers, name, make)?;
                let (fd, pu) = (new.upper_now(&layers), dir.upper_now(&layers));
                let (Some(fd), Some(pu)) = (fd, pu) else {
                    unreachable!("made in the top layer")
                };
                self.give_to_caller(
                    fd.fd(self.cx())?.as_fd(),
                    pu.fd(self.cx())?.as_fd(),
                    caller,
                    mode,
                )?;
                self.register_layer(new, &layers)
            }
            _ => {
                let dir = obj.main_dir()?;
                let name = hostfs::component(name)?;
                let change = self.before_change(&[dir])?;
                make(dir, &name)?;
                let fd = hostfs::open_node(dir, &name)?;
                change.created(fd.as_fd());
                self.give_to_caller(fd.as_fd(), dir, caller, mode)?;
                let at = Place {
                    dir: parent,
                    obj: obj.clone(),
                    name,
                };
                self.register_main(fd, at)
            }
        }
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
        if let Obj::Layer(d) = &self.dir_entry(parent, name)? {
            let layers = self.layers_of(d)?;
            let live = |obj| self.live_layer_obj(obj, &layers);
            let gone = d.remove(self.cx(), &layers, name, dir, &live)?;
            self.lost((parent, name), &gone);
            return Ok(());
        }
        let (obj, name) = self.main_entry(parent, name)?;
        let pfd = obj.main_dir()?;
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

    /// A rename the previous worker carried out but did not answer: journals
    /// where its object went, as [`FsCore::rename`] would have.
    pub fn renamed_before_takeover(
        &self,
        parent: NodeId,
        name: &OsStr,
        newparent: NodeId,
        newname: &OsStr,
    ) {
        let Ok(dir) = self.obj(newparent) else {
            return;
        };
        if let Obj::Layer(d) = &dir {
            if let Ok(layers) = self.layers_of(d) {
                if let Ok(obj) = d.lookup(self.cx(), &layers, newname) {
                    let obj = self.live_layer_obj(obj, &layers);
                    // What it replaced there, if anything.
                    self.gone_before_takeover((newparent, newname), Some(obj.id));
                    self.left((parent, name), &obj, Went::Moved);
                }
            }
        }
    }

    /// A removal the previous worker carried out but did not answer:
    /// journals what it removed as [`FsCore::left`] would have.
    pub fn removed_before_takeover(&self, parent: NodeId, name: &OsStr) {
        self.gone_before_takeover((parent, name), None);
    }

    /// Journals as removed every node held from a predecessor at `was`
    /// (directory node, name) but object `except`, which the name leads
    /// to now: the name's old object cannot be found by it any more, and
    /// which it was is known only from those records (so all of them are
    /// read: this follows a takeover only).
    fn gone_before_takeover(&self, was: (NodeId, &OsStr), except: Option<u64>) {
        let t = self.nodes.lock().unwrap();
        let (dir, name) = (was.0.0, was.1.as_bytes());
        let gone = self.held(|h| {
            let at = h.nodes.iter_mut().filter(|(id, n)| match &n.origin {
                Origin::Layer {
                    parent,
                    name: held,
                    local,
                } => {
                    *parent == dir
                        && held == name
                        && (except.is_none() || *local != except)
                        && !t.by_id.contains_key(id)
                }
                _ => false,
            });
            let gone = at.map(|(&id, n)| {
                n.origin = Origin::Removed;
                (id, n.generation, 0)
            });
            Some(gone.collect())
        });
        self.journal_origin(gone.unwrap_or_default(), &Origin::Removed);
    }

    /// Journals `origin` for nodes: id, generation, and lookups the
    /// journal does not have yet.
    fn journal_origin(&self, nodes: Vec<(u64, u64, u64)>, origin: &Origin) {
        for (id, generation, unrecorded) in nodes {
            self.journal(|| {
                Some(Record::Node {
                    id,
                    generation,
                    origin: origin.clone(),
                    at: None,
                })
            });
            if unrecorded > 0 {
                self.journal(|| Some(Record::Lookup { id, n: unrecorded }));
            }
        }
    }

    /// Journals that layered object `gone.obj` lost its name `was`
    /// ([`FsCore::left`]).
    fn lost(&self, was: (NodeId, &OsStr), gone: &Gone) {
        let went = match gone.last {
            true => Went::Removed,
            false => Went::Unnamed,
        };
        self.left(was, &gone.obj, went);
    }

    /// Journals that layered object `obj` left its place `was` (directory
    /// node, name): renamed, a successor finds it by its new name;
    /// removed from its view, a successor finds it nowhere, so that a new
    /// object there with its id (an inode number, which the host may give
    /// a new file once it frees the removed one's) is never taken for it;
    /// still named elsewhere, records of that place only are removed.
    fn left(&self, was: (NodeId, &OsStr), obj: &LayerObj, went: Went) {
        if self.handoff.is_none() {
            return;
        }
        let mut t = self.nodes.lock().unwrap();
        let origin = match went {
            Went::Moved => match layer_origin(&t, obj) {
                Some(origin) => origin,
                None => return,
            },
            Went::Removed | Went::Unnamed => Origin::Removed,
        };
        let was = Origin::Layer {
            parent: was.0.0,
            name: was.1.as_bytes().to_vec(),
            local: Some(obj.id),
        };
        // Its nodes: id, generation, and lookups the journal does not have
        // yet (all of a node it learns of only now). The table's, unless
        // it keeps other names and was not recorded at this one.
        let mut nodes: Vec<(u64, u64, u64)> = Vec::new();
        let recorded_here = || layer_origin(&t, obj).as_ref() == Some(&was);
        let key = NodeKey::Layer(obj.view.number, obj.id);
        let table = t.by_key.get(&key).copied();
        if let Some(id) = table.filter(|_| !matches!(went, Went::Unnamed) || recorded_here()) {
            let node = t.by_id.get_mut(&id).expect("tables agree");
            let mut unrecorded = 0;
            if !node.journaled {
                node.journaled = true;
                unrecorded = node.lookups.saturating_sub(1);
            }
            nodes.push((id, node.generation, unrecorded));
        }
        // Held from a predecessor and not used since (ids in the table are
        // the table's): its own id, and ids a predecessor gave it when it
        // found it by another name than the journal's (a hard link), each
        // known by its old place only: a record elsewhere may be another
        // name's. Once removed, every record of its own id goes: it is
        // this object's, or one's that had its number before and is gone.
        let removed = matches!(went, Went::Removed);
        let natural = (obj.id <= LOCAL_MAX)
            .then(|| (NodeId::in_view(obj.view.number as u64, obj.id), removed));
        let synthetic = self.held_synthetic.iter().map(|&id| (id, false));
        for (id, anywhere) in natural.into_iter().chain(synthetic) {
            if t.by_id.contains_key(&id.0) {
                continue;
            }
            let moved = |h: &mut Held| {
                let node = h.nodes.get_mut(&id.0)?;
                let found = match anywhere {
                    true => matches!(node.origin, Origin::Layer { .. }),
                    false => was.matches(&node.origin),
                };
                found.then(|| {
                    node.origin = origin.clone();
                    node.generation
                })
            };
            nodes.extend(self.held(moved).map(|generation| (id.0, generation, 0)));
        }
        self.journal_origin(nodes, &origin);
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
        let (old, new) = (
            self.dir_entry(parent, name)?,
            self.dir_entry(newparent, newname)?,
        );
        match (&old, &new) {
            (Obj::Layer(o), Obj::Layer(n)) if Arc::ptr_eq(&o.view, &n.view) => {
                let layers = self.layers_of(o)?;
                let live = |obj| self.live_layer_obj(obj, &layers);
                let at_new = Some((n.id, newname.as_bytes().to_vec()));
                let done = o.rename(self.cx(), &layers, name, n, newname, flags, &live)?;
                if let Some(replaced) = &done.replaced {
                    self.lost((newparent, newname), replaced);
                }
                for obj in done.moved {
                    // Moved to the new name from the old, or back (an exchange).
                    let was = match obj.place() == at_new {
                        true => (parent, name),
                        false => (newparent, newname),
                    };
                    self.left(was, &obj, Went::Moved);
                }
                return Ok(());
            }
            // Between views (only reachable through .agentfs paths).
            (Obj::Layer(_), _) | (_, Obj::Layer(_)) => return Err(errno(libc::EXDEV)),
            _ => {}
        }
        let (old, oname) = self.main_entry(parent, name)?;
        let (new, nname) = self.main_entry(newparent, newname)?;
        let (ofd, nfd) = (old.main_dir()?, new.main_dir()?);
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
        hostfs::rename(ofd, &oname, nfd, &nname, flags)?;
        if flags & libc::RENAME_EXCHANGE != 0
            && let Some(r) = &replaced
        {
            let at = Place {
                dir: parent,
                obj: old.clone(),
                name: oname,
            };
            self.main_moved(r.as_fd(), at);
        }
        let at = Place {
            dir: newparent,
            obj: new.clone(),
            name: nname,
        };
        self.main_moved(moved.as_fd(), at);
        Ok(())
    }

    /// Makes a hard link to `node` as `newparent/newname`.
    pub fn link(&self, node: NodeId, newparent: NodeId, newname: &OsStr) -> io::Result<Entry> {
        let obj = self.obj(node)?;
        let dir = self.dir_entry(newparent, newname)?;
        match (&obj, &dir) {
            (Obj::Layer(o), Obj::Layer(d)) if Arc::ptr_eq(&o.view, &d.view) => {
                let layers = self.layers_of(o)?;
                let new = o.link(self.cx(), &layers, d, newname)?;
                return self.register_layer(new, &layers);
            }
            (Obj::Layer(_), _) | (_, Obj::Layer(_)) => return Err(errno(libc::EXDEV)),
            _ => {}
        }
        let (dobj, name) = self.main_entry(newparent, newname)?;
        let (fd, dir) = (self.main_inode(&obj)?, dobj.main_dir()?);
        let _change = self.before_change(&[fd.as_fd(), dir])?;
        hostfs::link(fd.as_fd(), dir, &name)?;
        let fd = hostfs::open_node(dir, &name)?;
        let at = Place {
            dir: newparent,
            obj: dobj.clone(),
            name,
        };
        self.register_main(fd, at)
    }

    /// A handle for `file`, which is `node` opened with the caller's
    /// `flags`.
    fn add_file(&self, node: NodeId, flags: i32, file: OpenFile) -> NewFile {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.files.write().unwrap().insert(fh, Arc::new(file));
        NewFile {
            fh: FileHandle(fh),
            node,
            flags,
        }
    }

    /// Records `file` for a successor, to be given to the kernel next.
    pub fn hand_out(&self, file: NewFile) -> FileHandle {
        self.journal(|| {
            Some(Record::File {
                fh: file.fh.0,
                node: file.node.0,
                flags: file.flags,
            })
        });
        file.fh
    }

    fn file(&self, fh: FileHandle) -> io::Result<Arc<OpenFile>> {
        if let Some(f) = self.files.read().unwrap().get(&fh.0) {
            return Ok(f.clone());
        }
        // Opened by a predecessor: open it again, as it was opened.
        let (node, flags) = self
            .held(|h| h.files.get(&fh.0).copied())
            .ok_or_else(|| errno(libc::EBADF))?;
        let again = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let file = Arc::new(self.open_file(NodeId(node), again)?);
        // Added only if still inherited, under that table's lock: a branch
        // deletion reopens handles the kernel may be releasing meanwhile
        // (`release` forgets the inherited handle first).
        self.held(|h| {
            h.files.contains_key(&fh.0).then(|| {
                self.files
                    .write()
                    .unwrap()
                    .entry(fh.0)
                    .or_insert(file)
                    .clone()
            })
        })
        .ok_or_else(|| errno(libc::EBADF))
    }

    /// Opens again, as their next use would, the files a predecessor left
    /// open in view `view` (or in a view their node id does not tell)
    /// that this worker has not used yet, so that they count where open
    /// files are counted (a branch is busy while one is open in it). One
    /// that cannot be found again answers ESTALE on its next use and keeps
    /// nothing busy.
    fn resume_files_of(&self, view: u32) {
        let of_view = |node: u64| NodeId(node).view() == view as u64 || node >= SYNTHETIC_BASE;
        let held: Vec<u64> = self
            .held(|h| {
                let fhs = h.files.iter().filter(|(_, (node, _))| of_view(*node));
                Some(fhs.map(|(&fh, _)| fh).collect())
            })
            .unwrap_or_default();
        for fh in held {
            let _ = self.file(FileHandle(fh));
        }
    }

    /// Runs `f` on the host file behind `fh` for a change: main's file
    /// after preserving it for the snapshots, a branch's file
    /// in its top layer (reopened there if the layer it was opened in has
    /// frozen since); then clears the set-id bits if `set_id` says so.
    /// EBADF for files not open for writing.
    fn change_file<T>(
        &self,
        fh: FileHandle,
        set_id: SetIdBits,
        f: impl FnOnce(&File) -> io::Result<T>,
    ) -> io::Result<T> {
        let file = self.file(fh)?;
        if !file.writable() {
            return Err(errno(libc::EBADF));
        }
        let changed = |host: &File| {
            let done = f(host)?;
            set_id.apply(host.as_fd())?;
            Ok(done)
        };
        match &*file {
            OpenFile::Main(host) => {
                let _change = self.before_change(&[host.as_fd()])?;
                changed(host)
            }
            OpenFile::Layer { obj, flags, file } => {
                let layers = self.layers_of(obj)?;
                let current = self.layer_file(obj, *flags, file, &layers)?;
                changed(current.file.file())
            }
            _ => unreachable!("only main and layer files are writable"),
        }
    }

    /// The open file of a layered object, reopened if needed (see
    /// [`LayerFile`]).
    fn layer_file<'a>(
        &self,
        obj: &Arc<LayerObj>,
        flags: i32,
        file: &'a RwLock<LayerFile>,
        layers: &Layers,
    ) -> io::Result<RwLockReadGuard<'a, LayerFile>> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let stale = |f: &LayerFile| {
            if writable {
                f.generation != layers.generation
            } else {
                f.copies != obj.copies()
            }
        };
        if stale(&file.read().unwrap()) {
            let mut f = file.write().unwrap();
            if stale(&f) {
                *f = match writable && obj.is_unlinked() {
                    // Removed while open: there is no copy to open.
                    true => LayerFile {
                        generation: layers.generation,
                        copies: obj.copies(),
                        file: ReadFile::Plain(obj.nameless(
                            self.cx(),
                            layers,
                            f.file.file(),
                            host_open_flags(flags),
                        )?),
                    },
                    false => self.open_layer_file(obj, flags, layers)?,
                };
            }
        }
        Ok(file.read().unwrap())
    }

    fn open_layer_file(
        &self,
        obj: &Arc<LayerObj>,
        flags: i32,
        layers: &Layers,
    ) -> io::Result<LayerFile> {
        let copies = obj.copies();
        let file = if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            let u = obj.upper(self.cx(), layers)?;
            ReadFile::Plain(hostfs::reopen(
                u.fd(self.cx())?.as_fd(),
                host_open_flags(flags),
            )?)
        } else {
            obj.open_read(self.cx(), layers)?.0
        };
        Ok(LayerFile {
            generation: layers.generation,
            copies,
            file,
        })
    }

    /// Opens a regular file with the caller's open flags.
    pub fn open(&self, node: NodeId, flags: i32) -> io::Result<NewFile> {
        let file = self.open_file(node, flags)?;
        Ok(self.add_file(node, flags, file))
    }

    fn open_file(&self, node: NodeId, flags: i32) -> io::Result<OpenFile> {
        let obj = self.obj(node)?;
        let file = match &obj {
            Obj::Main(_) => OpenFile::Main(hostfs::reopen(
                self.main_inode(&obj)?.as_fd(),
                host_open_flags(flags),
            )?),
            Obj::Snap(s) => {
                if flags & libc::O_ACCMODE != libc::O_RDONLY {
                    return Err(errno(libc::EROFS));
                }
                match s.open(&self.store, self.mount_fd())? {
                    (f, true) => OpenFile::SnapPre(f),
                    (f, false) => OpenFile::SnapLive(s.clone(), f),
                }
            }
            Obj::Layer(o) => {
                let layers = self.layers_of(o)?;
                // O_TRUNC was done by the kernel through setattr already
                // (atomic_o_trunc is not negotiated); a reopen must not
                // truncate again.
                let flags = flags & !libc::O_TRUNC;
                let file = self.open_layer_file(o, flags, &layers)?;
                OpenFile::Layer {
                    obj: o.clone(),
                    flags,
                    file: RwLock::new(file),
                }
            }
            Obj::Virtual => return Err(errno(libc::EISDIR)),
        };
        Ok(file)
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> io::Result<(Entry, NewFile)> {
        if let Obj::Layer(_) = &self.dir_entry(parent, name)? {
            // Made like any node, then opened in the top layer: O_EXCL
            // holds because the name is made with mknod, which fails if it
            // exists. Without O_EXCL an existing file (made since the
            // kernel's lookup) is opened, as open(2) does.
            let entry = match self.mknod(parent, name, libc::S_IFREG | (mode & 0o7777), 0, caller) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                    self.lookup(parent, name)?
                }
                r => r?,
            };
            let flags = flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL);
            return match self.open(entry.node, flags) {
                Ok(fh) => Ok((entry, fh)),
                Err(e) => {
                    self.forget(entry.node, 1);
                    Err(e)
                }
            };
        }
        let (obj, cname) = self.main_entry(parent, name)?;
        let dir = obj.main_dir()?;
        let caller_flags = flags;
        let flags =
            host_open_flags(flags) | (flags & libc::O_EXCL) | libc::O_CREAT | libc::O_NOFOLLOW;
        let change = self.before_change(&[dir])?;
        let open =
            |flags| hostfs::with_umask(caller.umask, || hostfs::open_at(dir, &cname, flags, mode));
        // Exclusively first, to know whether the file is new (the name can
        // exist if the source changed behind the kernel's back).
        let (file, new) = match open(flags | libc::O_EXCL) {
            Ok(f) => (File::from(f), true),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                (File::from(open(flags)?), false)
            }
            Err(e) => return Err(e),
        };
        let fd = hostfs::path_fd_of(file.as_fd())?;
        if new {
            change.created(fd.as_fd());
        }
        self.give_to_caller(fd.as_fd(), dir, caller, Some(mode))?;
        let at = Place {
            dir: parent,
            obj: obj.clone(),
            name: cname,
        };
        let entry = self.register_main(fd, at)?;
        let fh = self.add_file(entry.node, caller_flags, OpenFile::Main(file));
        Ok((entry, fh))
    }

    /// Reads up to `size` bytes at `offset` (short only at end of file).
    pub fn read(&self, fh: FileHandle, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let n = match &*file {
            OpenFile::Main(f) | OpenFile::SnapPre(f) => hostfs::read_full(f, &mut buf, offset)?,
            OpenFile::SnapLive(s, f) => s.read_live(&self.store, f, &mut buf, offset)?,
            OpenFile::Layer { obj, flags, file } => {
                let layers = self.layers_of(obj)?;
                let current = self.layer_file(obj, *flags, file, &layers)?;
                current.file.read(self.cx(), &mut buf, offset)?
            }
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes `data` at `offset` of open file `fh` (appends if it
    /// was opened O_APPEND, unless `again`: a write sent again after a
    /// takeover, which the dead worker may have made already, goes exactly
    /// where the kernel says, so that it is not appended twice).
    pub fn write(
        &self,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        again: bool,
        set_id: SetIdBits,
    ) -> io::Result<usize> {
        self.change_file(fh, set_id, |f| write_all_at(f, data, offset, again))
    }

    /// Closes a file handle.
    pub fn release(&self, fh: FileHandle) {
        // Inherited no more first: `file` then adds no entry behind us.
        self.held(|h| h.files.remove(&fh.0).map(drop));
        self.files.write().unwrap().remove(&fh.0);
        let unseen = self.unseen.lock().unwrap().get(&fh.0).copied();
        if let Some(node) = unseen {
            // Listed before it leaves `unseen`: a snapshot in between
            // finds it in one of them.
            if self.maybe_mapped(node) {
                self.set_mapped(node, true);
            }
            self.unseen.lock().unwrap().remove(&fh.0);
        }
        // Journaled last: a successor taking over before it still has the
        // file open (and written unseen), never neither open nor mapped.
        self.released(fh.0);
    }

    /// What the kernel may do with open file `fh` (opened with `flags`)
    /// without the worker.
    pub fn bypass(&self, fh: FileHandle, flags: i32) -> Bypass {
        match self.file(fh).as_deref() {
            Ok(OpenFile::Main(_)) => {
                if flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC == 0 {
                    Bypass::Read
                } else {
                    Bypass::Write
                }
            }
            Ok(OpenFile::SnapPre(_)) => Bypass::Read,
            _ => Bypass::Never,
        }
    }

    /// The host file the kernel may use directly for open file `fh`
    /// (whose [`Bypass`] is not `Never`), and whether it may write
    /// through it. Main's inode is opened read-write if `for_writers` and
    /// it can be, so that writers can share it with readers; otherwise,
    /// and for a pre-image, read-only.
    pub fn backing_file(&self, fh: FileHandle, for_writers: bool) -> io::Result<(File, bool)> {
        match &*self.file(fh)? {
            OpenFile::Main(host) => {
                let fd = host.as_fd();
                // Writes through the backing file are the worker's, which
                // keep set-id bits: writers of such a file go through the
                // worker, which clears them (`SetIdBits`).
                let set_id = hostfs::stat(fd)?.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0;
                match (for_writers && !set_id).then(|| hostfs::reopen(fd, libc::O_RDWR)) {
                    Some(Ok(f)) => Ok((f, true)),
                    // A read-only file system, an immutable file, a binary
                    // being run (ETXTBSY): readers can still share it.
                    _ => Ok((hostfs::reopen(fd, libc::O_RDONLY)?, false)),
                }
            }
            OpenFile::SnapPre(f) => Ok((f.try_clone()?, false)),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    /// Main file `fh` of `node` will change without the worker seeing it
    /// (passthrough writes, or shared maps of a passthrough file): preserve
    /// it for the newest snapshot now, and for every snapshot taken while
    /// it stays open when that snapshot is taken (contract 2.1).
    pub fn writes_unseen(&self, node: NodeId, fh: FileHandle) -> io::Result<()> {
        let OpenFile::Main(host) = &*self.file(fh)? else {
            return Err(errno(libc::EINVAL));
        };
        let _latest = self.before_change(&[host.as_fd()])?;
        self.unseen.lock().unwrap().insert(fh.0, node);
        Ok(())
    }

    /// A file or directory handle is gone for good (its entry of a
    /// predecessor's handles removed already).
    fn released(&self, handle: u64) {
        self.journal(|| Some(Record::Release(handle)));
    }

    /// Flushes a file to the host disk (nothing to do for read-only files).
    pub fn fsync(&self, fh: FileHandle, datasync: bool) -> io::Result<()> {
        let file = self.file(fh)?;
        let sync = |f: &File| {
            if datasync {
                f.sync_data()
            } else {
                f.sync_all()
            }
        };
        match &*file {
            OpenFile::Main(f) => sync(f),
            OpenFile::Layer {
                obj,
                flags,
                file: lf,
            } if file.writable() => {
                let layers = self.layers_of(obj)?;
                sync(self.layer_file(obj, *flags, lf, &layers)?.file.file())
            }
            _ => Ok(()),
        }
    }

    /// Preallocates, punches holes, etc. (`fallocate(2)` modes).
    pub fn fallocate(
        &self,
        fh: FileHandle,
        offset: u64,
        len: u64,
        mode: i32,
        set_id: SetIdBits,
    ) -> io::Result<()> {
        self.change_file(fh, set_id, |f| hostfs::fallocate(f, mode, offset, len))
    }

    /// SEEK_DATA / SEEK_HOLE.
    pub fn lseek(&self, fh: FileHandle, offset: i64, whence: i32) -> io::Result<i64> {
        match &*self.file(fh)? {
            OpenFile::Main(f) | OpenFile::SnapPre(f) | OpenFile::SnapLive(_, f) => {
                hostfs::lseek(f, offset, whence)
            }
            OpenFile::Layer { obj, flags, file } => {
                let layers = self.layers_of(obj)?;
                let current = self.layer_file(obj, *flags, file, &layers)?;
                hostfs::lseek(current.file.file(), offset, whence)
            }
        }
    }

    /// Copies `len` bytes on the host from open file `src` at an offset to
    /// open file `dst` at an offset.
    pub fn copy_file_range(
        &self,
        (src, src_off): (FileHandle, u64),
        (dst, dst_off): (FileHandle, u64),
        len: u64,
        set_id: SetIdBits,
    ) -> io::Result<usize> {
        let sf = self.file(src)?;
        let s = match &*sf {
            OpenFile::Main(f) | OpenFile::SnapPre(f) => f,
            // A live snapshot file may change under the copy, and a layered
            // file may be reopened: let the kernel fall back to read +
            // write, which re-check.
            OpenFile::SnapLive(..) | OpenFile::Layer { .. } => return Err(errno(libc::EXDEV)),
        };
        self.change_file(dst, set_id, |d| {
            hostfs::copy_file_range(s, src_off, d, dst_off, len)
        })
    }

    /// Opens a directory (its stream is made when first read).
    pub fn opendir(&self, node: NodeId) -> io::Result<DirHandle> {
        self.obj(node)?;
        let dh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.journal(|| Some(Record::Dir { dh, node: node.0 }));
        self.dirs
            .write()
            .unwrap()
            .insert(dh, Arc::new(OpenDir::new(node)));
        Ok(DirHandle(dh))
    }

    fn dir_stream(&self, node: NodeId) -> io::Result<DirStream> {
        let stream = match (node, &self.obj(node)?) {
            (_, obj @ Obj::Main(_)) => DirStream::Host {
                dir: Mutex::new(hostfs::reopen(
                    obj.main_dir()?,
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
            (_, Obj::Layer(o)) => {
                let layers = self.layers_of(o)?;
                let view = o.view.number as u64;
                let hide = o.is_root();
                DirStream::Listed(
                    o.list(self.cx(), &layers)?
                        .into_iter()
                        .filter(|e| !(hide && e.name == AGENTFS_NAME))
                        .map(|e| (NodeId::in_view(view, e.id).0, e.d_type, e.name))
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
                            // A snapshot of a branch has the same root id.
                            (
                                NodeId::in_view(s.id.0 as u64, root_ino).0,
                                libc::DT_DIR,
                                s.name.clone().into_bytes(),
                            )
                        })
                        .collect(),
                )
            }
            (NodeId::BRANCHES, Obj::Virtual) => {
                // One lock at a time: a deletion holds the catalog while it
                // closes the view (views after catalog).
                let branches = self.catalog.lock().unwrap().branches.clone();
                let views = self.views.read().unwrap();
                DirStream::Listed(
                    branches
                        .iter()
                        .filter_map(|b| {
                            let root = views.get(&b.id.0)?.root;
                            Some((root.0, libc::DT_DIR, b.name.clone().into_bytes()))
                        })
                        .collect(),
                )
            }
            (_, Obj::Virtual) => DirStream::Listed(Vec::new()),
        };
        Ok(stream)
    }

    /// An open directory.
    fn dir(&self, dh: DirHandle) -> io::Result<Arc<OpenDir>> {
        // Not a `match` on the lookup: its read guard would live through
        // the arms, and the write below would wait for it forever.
        if let Some(d) = self.dirs.read().unwrap().get(&dh.0) {
            return Ok(d.clone());
        }
        // Opened by a predecessor. A host directory's offsets are the host
        // file system's cookies and hold for the new stream; a listed one
        // is listed again.
        // Added under that table's lock, as `file` does, so that a
        // `releasedir` meanwhile is not undone.
        self.held(|h| {
            let node = *h.dirs.get(&dh.0)?;
            let mut dirs = self.dirs.write().unwrap();
            let open = dirs.entry(dh.0);
            Some(
                open.or_insert_with(|| Arc::new(OpenDir::new(NodeId(node))))
                    .clone(),
            )
        })
        .ok_or_else(|| errno(libc::EBADF))
    }

    /// The stream of an open directory, made now if not yet read.
    fn stream<'a>(&self, open: &'a OpenDir) -> io::Result<&'a DirStream> {
        if let Some(stream) = open.stream.get() {
            return Ok(stream);
        }
        let stream = self.dir_stream(open.node)?;
        // Should two reads race (the kernel reads one at a time), the
        // first stream made is kept.
        Ok(open.stream.get_or_init(|| stream))
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
        let open = self.dir(dh)?;
        match self.stream(&open)? {
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
        // Inherited no more first: `dir` then adds no entry behind us.
        self.held(|h| h.dirs.remove(&dh.0).map(drop));
        self.dirs.write().unwrap().remove(&dh.0);
        self.released(dh.0);
    }

    /// Flushes a directory to the host disk.
    pub fn fsyncdir(&self, dh: DirHandle, datasync: bool) -> io::Result<()> {
        let open = self.dir(dh)?;
        match self.stream(&open)? {
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
        let obj = self.obj(node)?;
        match &obj {
            Obj::Main(_) => hostfs::getxattr(self.main_inode(&obj)?.as_fd(), name, size),
            Obj::Snap(s) => s.getxattr(&self.store, self.mount_fd(), name, size),
            Obj::Layer(o) => {
                let all = o.xattrs(self.cx(), &*self.layers_of(o)?)?;
                let v = all
                    .into_iter()
                    .find(|(n, _)| n == name.as_bytes())
                    .map(|(_, v)| v)
                    .ok_or_else(|| errno(libc::ENODATA))?;
                XattrReply::sized(v, size)
            }
            Obj::Virtual => Err(errno(libc::ENODATA)),
        }
    }

    /// Lists extended attribute names.
    pub fn listxattr(&self, node: NodeId, size: u32) -> io::Result<XattrReply> {
        let obj = self.obj(node)?;
        match &obj {
            Obj::Main(_) => hostfs::listxattr(self.main_inode(&obj)?.as_fd(), size),
            Obj::Snap(s) => s.listxattr(&self.store, self.mount_fd(), size),
            Obj::Layer(o) => {
                let mut names = Vec::new();
                for (n, _) in o.xattrs(self.cx(), &*self.layers_of(o)?)? {
                    names.extend_from_slice(&n);
                    names.push(0);
                }
                XattrReply::sized(names, size)
            }
            Obj::Virtual => Ok(XattrReply::Size(0)),
        }
    }

    /// Sets an extended attribute.
    pub fn setxattr(&self, node: NodeId, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let obj = self.obj(node)?;
        refuse_reserved(&obj, name)?;
        let (_change, fd) = self.writable(&obj, None)?;
        hostfs::setxattr(fd.as_fd(), name, value, flags)
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, node: NodeId, name: &OsStr) -> io::Result<()> {
        let obj = self.obj(node)?;
        refuse_reserved(&obj, name)?;
        let (_change, fd) = self.writable(&obj, None)?;
        hostfs::removexattr(fd.as_fd(), name)
    }

    /// Saves `change` of `catalog` (the caller holds its lock), then
    /// makes it; on failure the catalog stays as it was.
    fn save_change(&self, catalog: &mut Catalog, change: Change) -> Result<(), ControlError> {
        let saved = self.catalog_writer.lock().unwrap().save(catalog, &change);
        saved.map_err(|e| catalog_error(&e))?;
        change.apply_to(catalog);
        Ok(())
    }

    /// Forgets freed layers `gone`, whose removal is flushed. On failure
    /// they stay in `freed`, and a start that finds no directory to
    /// remove forgets them (ids are never reused).
    fn forget_freed(&self, catalog: &mut Catalog, gone: &[LayerId]) {
        if gone.is_empty() {
            return;
        }
        let change = catalog.forget_freed(gone);
        if let Err(e) = self.save_change(catalog, change) {
            tracing::warn!(
                "forgetting removed layers (retried at start): {}",
                e.message
            );
        }
    }

    /// Takes a snapshot of main (O(1): one catalog write). `name` defaults
    /// to `snap-<id>`.
    pub fn snapshot_create(&self, name: Option<String>) -> Result<Snapshot, ControlError> {
        let started = Instant::now();
        // Wait for changes in flight and hold new ones off: the snapshot
        // must not fall between a change's preservation check and the change.
        let mut latest = self.latest.write().unwrap();
        let mut catalog = self.catalog.lock().unwrap();
        let name = snapshot_name(&catalog, name)?;
        let (snap, change) = catalog.add(name);
        self.preserve_unseen(snap.epoch)?;
        self.save_change(&mut catalog, change)?;
        *latest = Latest::new(Some(snap.epoch));
        tracing::info!(snapshot = %snap.name, id = snap.id.0, epoch = snap.epoch, took_us = micros(started), "snapshot of main created");
        Ok(snap)
    }

    /// Copies the pre-image, for a snapshot at `epoch`, of every main file
    /// that may change unseen: the only data a snapshot copies, and only
    /// while passthrough writers or their shared maps are open
    /// (specs/semantics.md, "Passthrough"). A pre-image left by a failure
    /// is for an epoch no snapshot gets, and goes with the next garbage
    /// collection.
    fn preserve_unseen(&self, epoch: u64) -> Result<(), ControlError> {
        let mut nodes: HashSet<NodeId> = self.unseen.lock().unwrap().values().copied().collect();
        let mapped: Vec<NodeId> = self.mapped.lock().unwrap().iter().copied().collect();
        for node in mapped {
            if nodes.contains(&node) || self.maybe_mapped(node) {
                nodes.insert(node);
            } else {
                self.set_mapped(node, false);
            }
        }
        for node in nodes {
            let kept = self.obj(node).and_then(|obj| {
                let fd = self.main_inode(&obj)?;
                self.store
                    .preserve(fd.as_fd(), &hostfs::handle_of(fd.as_fd())?, epoch)
            });
            match kept {
                Ok(()) => {}
                // Gone from the source: no snapshot can show it.
                Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {}
                Err(e) => {
                    return Err(ControlError::new(
                        ErrorKind::Io,
                        format!(
                            "no snapshot taken, nothing changed: a file open for writing \
                             with passthrough (node {}) could not be preserved: {e}; free \
                             space in the state directory, or close (and unmap) the file, \
                             and retry",
                            node.0
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether main file `node`, whose unseen writer is released, may
    /// still be written through a shared map: while the map lives, its
    /// (backing) file keeps the host file open for writing, and keeps the
    /// kernel's node of it, so a node the kernel forgot has none. Where
    /// that cannot be told, yes.
    fn maybe_mapped(&self, node: NodeId) -> bool {
        let probe = self.obj(node).and_then(|obj| {
            let fd = self.main_inode(&obj)?;
            // Not waiting for another process's lease to break (EAGAIN:
            // copied).
            hostfs::open_for_writing_elsewhere(&hostfs::reopen(
                fd.as_fd(),
                libc::O_RDONLY | libc::O_NONBLOCK,
            )?)
        });
        match probe {
            Ok(written) => written,
            Err(e) => match e.raw_os_error() {
                // Forgotten by the kernel, or gone from the source (no
                // snapshot can show it).
                Some(libc::ESTALE) => false,
                _ => {
                    static TOLD: AtomicBool = AtomicBool::new(false);
                    let msg = "cannot tell whether a shared map still writes a file (no \
                               read lease: fs.leases-enable = 0, a network file system, or \
                               no CAP_LEASE): it is copied at every snapshot until the \
                               kernel forgets it";
                    if TOLD.swap(true, Ordering::Relaxed) {
                        tracing::debug!(node = node.0, "{msg}: {e}");
                    } else {
                        tracing::warn!(node = node.0, "{msg}: {e}");
                    }
                    true
                }
            },
        }
    }

    /// Lists (or unlists) main file `node` as maybe written through a
    /// shared map ([`FsCore::mapped`]), and journals it for a successor
    /// under the list's lock, so that the journal's last word is the list's.
    fn set_mapped(&self, node: NodeId, mapped: bool) {
        let mut list = self.mapped.lock().unwrap();
        let changed = if mapped {
            list.insert(node)
        } else {
            list.remove(&node)
        };
        if changed {
            self.journal(|| {
                Some(match mapped {
                    true => Record::Mapped(node.0),
                    false => Record::Unmapped(node.0),
                })
            });
        }
    }

    /// Takes a snapshot of a branch (O(1)): the branch's top layer freezes
    /// and becomes the snapshot's; the branch goes on in a new empty layer.
    pub fn snapshot_branch(
        &self,
        key: &str,
        name: Option<String>,
    ) -> Result<Snapshot, ControlError> {
        let started = Instant::now();
        let (b, view) = {
            // A branch in the catalog has its view open (`add_view`).
            let catalog = self.catalog.lock().unwrap();
            let b = catalog
                .find_branch(key)
                .cloned()
                .ok_or_else(|| no_branch(key))?;
            let view = self.open_view_of(b.id.0)?;
            (b, view)
        };
        // Wait for the branch's changes in flight and hold new ones off.
        let mut layers = view.layers.write().unwrap();
        let mut catalog = self.catalog.lock().unwrap();
        if catalog.branch(b.id).is_none() {
            // Deleted since it was found.
            return Err(no_branch(key));
        }
        let name = snapshot_name(&catalog, name)?;
        let (snap, layer, change) = catalog.add_branch_snapshot(b.id, name);
        // The layer that freezes, the view's top under the lock (`b` was
        // read before it: a snapshot taken meanwhile froze its top).
        let freezing = layers.top.as_ref().expect("a branch has a top layer");
        let old_top = Part::Layer(Inode::Open(freezing.tree.clone()));
        self.create_layer(layer, &old_top)?;
        // Its bottom named by its own id, as a restart names it.
        let made = self
            .open_top(layer)
            .and_then(|top| Ok((top, Arc::new(self.base_root(snap.id, snap.epoch)?))));
        let (top, base) = made.inspect_err(|_| self.discard_layer(layer))?;
        self.save_change(&mut catalog, change)
            .inspect_err(|_| self.discard_layer(layer))?;
        self.spare.want(LayerId(catalog.next_layer));
        layers.freeze(top);
        // The snapshot shows the branch's frozen layers as they are now.
        let frozen = layers.frozen().clone();
        // The branch's changes go on; the catalog stays locked until the
        // snapshot's view is there (lock order: catalog, then views).
        drop(layers);
        self.add_view(snap.id.0, None, frozen, base);
        drop(catalog);
        tracing::info!(snapshot = %snap.name, id = snap.id.0, branch = %b.name, took_us = micros(started), "snapshot of branch created");
        Ok(snap)
    }

    /// The live snapshots, oldest first.
    pub fn snapshot_list(&self) -> Vec<Snapshot> {
        self.catalog.lock().unwrap().snapshots.clone()
    }

    /// Deletes a snapshot (by name or id) and gives back the space only it
    /// needed (pre-images of main, frozen layers).
    pub fn snapshot_delete(&self, key: &str) -> Result<Snapshot, ControlError> {
        let (snap, _) = self.remove_view(|c| {
            let s = c.find(key).cloned().ok_or_else(|| {
                ControlError::new(
                    ErrorKind::NotFound,
                    format!("no snapshot named {key:?}; `snapshot-list` shows the snapshots"),
                )
            })?;
            c.snapshots.retain(|x| x.id != s.id);
            Ok((s.clone(), s.id.0))
        })?;
        tracing::info!(snapshot = %snap.name, "snapshot deleted");
        Ok(snap)
    }

    /// Removes a view from the catalog with `edit` (which returns what it
    /// removed and its view number), then everything only it used.
    fn remove_view<T>(
        &self,
        edit: impl FnOnce(&mut Catalog) -> Result<(T, u32), ControlError>,
    ) -> Result<(T, u32), ControlError> {
        let mut latest = self.latest.write().unwrap();
        let mut catalog = self.catalog.lock().unwrap();
        // Linear anyway (finding the layers no view uses): made on a copy.
        let mut next = catalog.clone();
        let (removed, number) = edit(&mut next)?;
        let unused = next.free_unused_layers(&catalog);
        let change = Change::between(&catalog, &next);
        self.save_change(&mut catalog, change)?;
        *latest = Latest::new(catalog.latest_epoch());
        self.close_view(number);
        // The record is gone first, and the layers recorded as freed, so a
        // crash from here on leaves only garbage the next start removes.
        let gone: Vec<LayerId> = unused
            .into_iter()
            .filter(|&l| match std::fs::remove_dir_all(self.layer_dir(l)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("removing unused layer {} (retried at start): {e}", l.0);
                    false
                }
            })
            .collect();
        // Forgotten once their removal is durable (if this fails, a start
        // finds no directory to remove and forgets them).
        if !gone.is_empty()
            && File::open(self.state.join("layers"))
                .and_then(|d| d.sync_all())
                .is_ok()
        {
            self.forget_freed(&mut catalog, &gone);
        }
        if let Err(e) = self.store.collect_garbage(&catalog.live_epochs()) {
            tracing::warn!("removing unneeded pre-images: {e}");
        }
        Ok((removed, number))
    }

    fn find_branch(&self, key: &str) -> Result<Branch, ControlError> {
        self.catalog
            .lock()
            .unwrap()
            .find_branch(key)
            .cloned()
            .ok_or_else(|| no_branch(key))
    }

    fn open_view_of(&self, number: u32) -> Result<Arc<LayerView>, ControlError> {
        self.views
            .read()
            .unwrap()
            .get(&number)
            .map(|v| v.view.clone())
            .ok_or_else(|| ControlError::new(ErrorKind::Io, format!("view {number} is not open")))
    }

    /// Creates a branch from a snapshot (O(1): one empty layer and one
    /// catalog write). `name` defaults to `branch-<id>`.
    pub fn branch_create(
        &self,
        snapshot: &str,
        name: Option<String>,
    ) -> Result<Branch, ControlError> {
        let started = Instant::now();
        let mut catalog = self.catalog.lock().unwrap();
        let from = catalog.find(snapshot).cloned().ok_or_else(|| {
            ControlError::new(
                ErrorKind::NotFound,
                format!("no snapshot named {snapshot:?}; `snapshot-list` shows the snapshots"),
            )
        })?;
        let name = name.unwrap_or_else(|| format!("branch-{}", catalog.next_id));
        validate_name("branch", &name)?;
        if name == "main" {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                "\"main\" names the source itself; choose another branch name",
            ));
        }
        if catalog.branches.iter().any(|b| b.name == name) {
            return Err(ControlError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "a branch named {name:?} exists already; choose another name or delete it first"
                ),
            ));
        }
        let (b, change) = catalog.add_branch(name, &from);
        // The snapshot's frozen layers, shared with its view (whose layers
        // are never locked for writing: safe under the catalog's lock).
        let frozen = match from.layer {
            Some(_) => self
                .open_view_of(from.id.0)?
                .layers
                .read()
                .unwrap()
                .frozen()
                .clone(),
            // A snapshot of main: main alone, no view.
            None => FrozenStack::default(),
        };
        let base = Arc::new(self.base_root(b.snapshot, b.epoch)?);
        let root = match frozen.iter().next() {
            Some(f) => Part::Layer(Inode::Open(f.tree.clone())),
            None => Part::Base(base.clone()),
        };
        self.create_layer(b.layer, &root)?;
        let top = self
            .open_top(b.layer)
            .inspect_err(|_| self.discard_layer(b.layer))?;
        self.save_change(&mut catalog, change)
            .inspect_err(|_| self.discard_layer(b.layer))?;
        self.spare.want(LayerId(catalog.next_layer));
        self.add_view(b.id.0, Some(top), frozen, base);
        drop(catalog);
        tracing::info!(branch = %b.name, id = b.id.0, snapshot = %from.name, took_us = micros(started), "branch created");
        Ok(b)
    }

    /// The branches, oldest first.
    pub fn branch_list(&self) -> Vec<Branch> {
        self.catalog.lock().unwrap().branches.clone()
    }

    /// Deletes a branch and gives back its space. Refused (busy) while
    /// processes are bound to it or files are open in it, unless `force`.
    pub fn branch_delete(&self, key: &str, force: bool) -> Result<Branch, ControlError> {
        let b = self.find_branch(key)?;
        let bound = self.bindings.bound_to(b.id);
        if !force {
            self.resume_files_of(b.id.0);
        }
        let open = self
            .files
            .read()
            .unwrap()
            .values()
            .filter(|f| matches!(&***f, OpenFile::Layer { obj, .. } if obj.view.number == b.id.0))
            .count();
        if !force && (!bound.is_empty() || open > 0) {
            let mut users: Vec<String> = bound
                .iter()
                .map(|x| match &x.subject {
                    Subject::Pid { pid, .. } => format!("bound pid {pid}"),
                    Subject::Cgroup { path } => format!("bound cgroup {path}"),
                })
                .collect();
            if open > 0 {
                users.push(format!("{open} open file(s)"));
            }
            return Err(ControlError::new(
                ErrorKind::Busy,
                format!(
                    "branch {:?} is in use ({}); unbind and close them first, or delete with --force",
                    b.name,
                    users.join(", "),
                ),
            ));
        }
        // Bindings first: a crash in between leaves an unbound branch.
        self.bindings
            .unbind_branch(b.id, |list| self.save_bindings(list))?;
        let (b, _) = self.remove_view(|c| {
            c.branches.retain(|x| x.id != b.id);
            Ok((b.clone(), b.id.0))
        })?;
        tracing::info!(branch = %b.name, "branch deleted");
        Ok(b)
    }

    /// Saves the catalog with new bindings (the bindings' persist step).
    fn save_bindings(&self, list: &[crate::binding::Binding]) -> Result<(), ControlError> {
        let mut catalog = self.catalog.lock().unwrap();
        if catalog.bindings == list {
            // A branch deleted unbound: nothing to write.
            return Ok(());
        }
        let change = catalog.with_bindings(list);
        self.save_change(&mut catalog, change)
    }
}

/// Microseconds since `t`, for the log: how long a snapshot or branch
/// took inside the worker (`bench/create.sh` reads it).
fn micros(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

/// The name for a new snapshot: `name`, validated and unused, or
/// `snap-<id>`.
fn snapshot_name(catalog: &Catalog, name: Option<String>) -> Result<String, ControlError> {
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
    Ok(name)
}

/// Logs that a change of main was refused because its pre-image could not
/// be stored (the caller gets the errno): at most once a minute, as a
/// full disk refuses every such change.
fn preserve_failed(epoch: u64, e: &io::Error) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.saturating_sub(LAST.load(Ordering::Relaxed)) >= 60 {
        LAST.store(now, Ordering::Relaxed);
        tracing::warn!(
            epoch,
            "a change of main was refused: its pre-image for the snapshots could not be \
             stored in the state directory: {e}; free space there (or delete snapshots)"
        );
    }
}

/// `e` with `what` in front: what a start could not use.
fn named(what: impl std::fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn no_branch(key: &str) -> ControlError {
    ControlError::new(
        ErrorKind::NotFound,
        format!("no branch named {key:?}; `branch-list` shows the branches"),
    )
}

fn catalog_error(e: &crate::snapshot::CatalogError) -> ControlError {
    let kind = match e {
        crate::snapshot::CatalogError::Io(_, io) if io.raw_os_error() == Some(libc::ENOSPC) => {
            ErrorKind::NoSpace
        }
        _ => ErrorKind::Io,
    };
    let advice = match kind {
        ErrorKind::NoSpace => "; free space in the state directory and retry",
        _ => "",
    };
    ControlError::new(
        kind,
        format!("cannot write the catalog: {e}; nothing was changed{advice}"),
    )
}

/// The layers keep their bookkeeping in `trusted.agentfs.*` xattrs: users
/// of a branch can neither see nor change them.
fn refuse_reserved(obj: &Obj, name: &OsStr) -> io::Result<()> {
    match obj {
        Obj::Layer(_) if layered::is_reserved_xattr(name.as_bytes()) => Err(errno(libc::EPERM)),
        _ => Ok(()),
    }
}

/// Writes `data` at `offset`, short only if an error follows some progress.
/// `pwrite` until all of `data` is written; `exact`: at `offset` even on an
/// O_APPEND file (RWF_NOAPPEND).
fn write_all_at(f: &File, data: &[u8], offset: u64, exact: bool) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let r = if exact {
            hostfs::pwrite_noappend(f, &data[done..], offset + done as u64)
        } else {
            f.write_at(&data[done..], offset + done as u64)
        };
        match r {
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

/// Where a layered object went from a place it left ([`FsCore::left`]).
enum Went {
    /// To another name (a rename).
    Moved,
    /// Out of its view: its last name was removed (or renamed over).
    Removed,
    /// One of its names was removed; it keeps others.
    Unnamed,
}

/// How a successor finds layered object `o` again: by its directory's node
/// and its name (`None` for a view root, which every worker opens).
fn layer_origin(t: &NodeTable, o: &LayerObj) -> Option<Origin> {
    let (dir, name) = o.place()?;
    let parent = *t.by_key.get(&NodeKey::Layer(o.view.number, dir))?;
    Some(Origin::Layer {
        parent,
        name,
        local: Some(o.id),
    })
}

/// Unmaps `key` from its node if `stale` says the node's object is not
/// the one a lookup found under that key just now, so that the lookup
/// registers a new node. The kernel then drops its dentry, and with it
/// the names and listing it keeps below; the old node shows what it
/// showed until forgotten.
fn unkey_if(t: &mut NodeTable, key: &NodeKey, stale: impl FnOnce(&Obj) -> bool) {
    if t.by_key
        .get(key)
        .and_then(|id| t.by_id.get(id))
        .is_some_and(|n| stale(&n.obj))
    {
        t.by_key.remove(key);
    }
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
        let persist = |list: &[crate::binding::Binding]| self.save_bindings(list);
        match req {
            Request::SnapshotCreate {
                branch: Some(b),
                name,
            } => Ok(to_json(&self.snapshot_branch(&b, name)?)),
            Request::SnapshotCreate { branch: None, name } => {
                Ok(to_json(&self.snapshot_create(name)?))
            }
            Request::SnapshotList {} => Ok(to_json(&self.snapshot_list())),
            Request::SnapshotDelete { snapshot } => Ok(to_json(&self.snapshot_delete(&snapshot)?)),
            Request::BranchCreate { snapshot, name } => {
                Ok(to_json(&self.branch_create(&snapshot, name)?))
            }
            Request::BranchList {} => Ok(to_json(&self.branch_list())),
            Request::BranchDelete { branch, force } => {
                Ok(to_json(&self.branch_delete(&branch, force)?))
            }
            Request::BindPid { branch, pid } => {
                let b = self.find_branch(&branch)?;
                Ok(to_json(&self.bindings.bind_pid(pid, b.id, persist)?))
            }
            Request::BindCgroup { branch, cgroup } => {
                let b = self.find_branch(&branch)?;
                Ok(to_json(&self.bindings.bind_cgroup(&cgroup, b.id, persist)?))
            }
            Request::UnbindPid { pid } => Ok(to_json(&self.bindings.unbind_pid(pid, persist)?)),
            Request::UnbindCgroup { cgroup } => {
                Ok(to_json(&self.bindings.unbind_cgroup(&cgroup, persist)?))
            }
            Request::BindingList {} => Ok(to_json(&self.bindings.records())),
            Request::SandboxProbe { .. } | Request::Stall { .. } => Err(ControlError::new(
                ErrorKind::InvalidArgument,
                "sandbox-probe and stall are test hooks; this worker was not started with \
                 --test-fault-hook",
            )),
        }
    }
}

fn to_json(v: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(v).expect("catalog records serialize")
}
