//! Layered views: branches and snapshots of branches.
//!
//! A view is a stack of layer directories (`<state>/layers/<id>/tree`)
//! over main as it was at an epoch (a snapshot-of-main view, see
//! [`crate::snapview`]). A branch's top layer takes its changes; the layers
//! below it are frozen and never written again (snapshots share them).
//! Names are resolved top-down with the overlayfs rules: a whiteout (a
//! character device 0/0) hides a name of the layers below, an opaque
//! directory (xattr `trusted.agentfs.opaque`) hides everything below it,
//! and only directories merge.
//!
//! Changing an object first copies it up into the top layer (built in
//! `work/`, fsync'd, then renamed into place, so a crash leaves either no
//! copy or a whole one). The copy keeps the object's id in the xattr
//! `trusted.agentfs.id`, so `st_ino` does not change at copy-up. Objects
//! created in a layer are identified by their inode number there, tagged
//! with [`NATIVE`] so they never collide with main's inode numbers.
//!
//! When a branch is snapshotted its top layer freezes and a new one starts
//! ([`Layers::generation`] advances); objects notice on their next use and treat
//! their old top copy as a lower part ([`LayerObj::current`]).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

use crate::frozen::{Frozen, FrozenStack};
use crate::hostfs::{self, HostHandle, Stat, XattrReply};
use crate::layer_index::{LayerIndex, PartEntry};
use crate::names::Names;
use crate::preserve::PreImageStore;
use crate::snapshot::LayerId;
use crate::snapview::SnapObj;

/// Ids of objects created in a layer: their inode number there with this
/// bit set (main's inode numbers stay below it).
pub const NATIVE: u64 = 1 << 43;
/// Where a copied-up object keeps its id.
const ID_XATTR: &str = "trusted.agentfs.id";
/// Marks a directory that hides the layers below it.
const OPAQUE_XATTR: &str = "trusted.agentfs.opaque";
/// Marks a user's character device 0/0, which is otherwise a whiteout.
const DEVICE_XATTR: &str = "trusted.agentfs.device";
/// The link count a copied-up hard-linked file shows (its names in the
/// view, not its links in the layer, which include the index entry).
const NLINK_XATTR: &str = "trusted.agentfs.nlink";
/// The xattr names reserved for the layers' own bookkeeping: hidden from
/// users and refused to them.
pub const RESERVED_XATTR_PREFIX: &[u8] = b"trusted.agentfs.";

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// A character device 0/0, the form of a whiteout (the one `RENAME_WHITEOUT`
/// makes); a user's own 0/0 device carries [`DEVICE_XATTR`] instead.
fn looks_like_whiteout(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

fn is_whiteout(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<bool> {
    if !looks_like_whiteout(st) {
        return Ok(false);
    }
    match hostfs::getxattr(fd, OsStr::new(DEVICE_XATTR), 0) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Gives `to` the access and modification times in `st`.
fn set_times(to: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
    let t = |s, ns| libc::timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    hostfs::utimens(
        to,
        &[
            t(st.st_atime, st.st_atime_nsec),
            t(st.st_mtime, st.st_mtime_nsec),
        ],
    )
}

/// Marks a new object as a user's device if it could pass for a whiteout.
fn mark_device(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
    if looks_like_whiteout(st) {
        hostfs::setxattr(fd, OsStr::new(DEVICE_XATTR), b"y", 0)?;
    }
    Ok(())
}

/// Whether a user may see or change an xattr of this name.
pub fn is_reserved_xattr(name: &[u8]) -> bool {
    name.starts_with(RESERVED_XATTR_PREFIX)
}

/// What reading the bottom of a view (main at an epoch) needs.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    /// The pre-images of main.
    pub store: &'a PreImageStore,
    /// A descriptor on the source's file system, for `open_by_handle_at`.
    pub mount_fd: BorrowedFd<'a>,
    /// The same on the state directory's, where the layers are (not
    /// `O_PATH`: `open_by_handle_at` refuses those).
    pub state_fd: BorrowedFd<'a>,
}

/// An inode of a layer directory, as an object keeps it. A directory
/// keeps a descriptor: every lookup below it searches it, and directories
/// are few. Any other inode keeps its handle and the names it was found
/// at ([`Names`]), and is opened at each use, so that a branch's files hold no
/// descriptor, as main's don't: with one per file, a tree of a few
/// thousand files reaches the worker's descriptors' mark and the trimmer
/// has the kernel forget their names (trim.rs).
#[derive(Clone)]
pub enum Inode {
    /// Kept open: a directory, or a file whose file system has no handles.
    Open(Arc<OwnedFd>),
    /// Kept by handle.
    Handle(Arc<ByHandle>),
}

/// A file of a layer kept by its handle.
pub struct ByHandle {
    handle: HostHandle,
    /// The names it is opened by.
    at: Names<LayerName>,
}

/// A name in a layer directory.
#[derive(Clone)]
struct LayerName {
    dir: Arc<OwnedFd>,
    name: CString,
}

impl LayerName {
    fn new(dir: &Arc<OwnedFd>, name: &CStr) -> LayerName {
        LayerName {
            dir: dir.clone(),
            name: name.to_owned(),
        }
    }
}

impl PartialEq for LayerName {
    fn eq(&self, other: &LayerName) -> bool {
        Arc::ptr_eq(&self.dir, &other.dir) && self.name == other.name
    }
}

/// A descriptor of an [`Inode`] for one use.
pub enum InodeFd {
    /// The inode's own.
    Kept(Arc<OwnedFd>),
    /// Opened for this use (`O_PATH`).
    Opened(OwnedFd),
}

impl InodeFd {
    /// Borrows the descriptor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            InodeFd::Kept(fd) => fd.as_fd(),
            InodeFd::Opened(fd) => fd.as_fd(),
        }
    }
}

impl Inode {
    /// `fd`, found as `name` in the layer directory `dir`, as an object
    /// keeps it.
    fn new(fd: OwnedFd, is_dir: bool, dir: &Arc<OwnedFd>, name: &CStr) -> Inode {
        if is_dir {
            return Inode::Open(Arc::new(fd));
        }
        match hostfs::handle_of(fd.as_fd()) {
            Ok(handle) => Inode::Handle(Arc::new(ByHandle {
                handle,
                at: Names::new(Some(LayerName::new(dir, name))),
            })),
            // EOPNOTSUPP: served all the same, at a descriptor a file.
            Err(_) => Inode::Open(Arc::new(fd)),
        }
    }

    /// `fd`, the entry `name` of the layer index `index`, as an object
    /// keeps it: opened by that name while the file has any.
    fn indexed(fd: OwnedFd, index: &Arc<OwnedFd>, name: &CStr) -> Inode {
        let i = Inode::new(fd, false, index, name);
        i.also(index, name);
        i
    }

    /// A descriptor of the inode (ESTALE once it is gone).
    pub fn fd(&self, cx: Ctx<'_>) -> io::Result<InodeFd> {
        match self {
            Inode::Open(fd) => Ok(InodeFd::Kept(fd.clone())),
            Inode::Handle(h) => {
                h.at.open(cx.state_fd, &h.handle, |n| {
                    Some((n.dir.as_fd(), n.name.as_c_str()))
                })
                .map(InodeFd::Opened)
            }
        }
    }

    /// A directory's descriptor (ENOTDIR for a file kept by handle).
    fn dir(&self) -> io::Result<&Arc<OwnedFd>> {
        match self {
            Inode::Open(fd) => Ok(fd),
            Inode::Handle(_) => Err(errno(libc::ENOTDIR)),
        }
    }

    /// It was renamed to `name` in the layer directory `dir`: opened by
    /// that name first, and by its other names too if it has several
    /// links.
    fn moved(&self, dir: &Arc<OwnedFd>, name: &CStr) {
        if let Inode::Handle(h) = self {
            let links = hostfs::open_node(dir.as_fd(), name)
                .and_then(|fd| hostfs::stat(fd.as_fd()))
                .map_or(1, |st| st.st_nlink);
            h.at.learn(LayerName::new(dir, name), links);
        }
    }

    /// It is `name` in the layer directory `dir` too, a name to open it
    /// by when its others are gone (its entry in the top layer's index).
    fn also(&self, dir: &Arc<OwnedFd>, name: &CStr) {
        if let Inode::Handle(h) = self {
            h.at.also(LayerName::new(dir, name));
        }
    }
}

/// The writable top layer of a branch.
pub struct Top {
    /// Its id: `layers/<id>/` in the state directory.
    pub id: LayerId,
    /// Root of its tree.
    pub tree: Arc<OwnedFd>,
    /// Its staging directory for copy-ups and atomic replacements.
    pub work: OwnedFd,
    /// Its index: `<id>` is a hard link to the copy of object `id`, for
    /// objects that have several names below (all names find the copy).
    pub index: Arc<OwnedFd>,
}

/// The layers of a view at one moment.
pub struct Layers {
    /// Advances each time the top layer freezes.
    pub generation: u64,
    /// The layer taking changes (branches only).
    pub top: Option<Top>,
    /// The frozen layers, shared with the views that show them.
    frozen: FrozenStack,
    /// With [`INDEXED_FROM`] frozen layers or more, once needed: the ids
    /// the frozen indexes hold, each with the topmost index holding it
    /// (frozen indexes never change, and one that freezes goes on top:
    /// [`Layers::freeze`]).
    frozen_ids: OnceLock<HashMap<u64, Arc<OwnedFd>>>,
}

impl Layers {
    /// The frozen layers.
    pub fn frozen(&self) -> &FrozenStack {
        &self.frozen
    }

    /// Freezes the top layer (a snapshot of the branch takes it) and
    /// starts `next` over it.
    pub fn freeze(&mut self, next: Top) {
        let old = self.top.replace(next).expect("a branch has a top layer");
        if let Some(ids) = self.frozen_ids.get_mut() {
            match index_ids(&old.index) {
                Ok(new) => ids.extend(new.into_iter().map(|id| (id, old.index.clone()))),
                // Read again when next needed.
                Err(_) => self.frozen_ids = OnceLock::new(),
            }
        }
        self.frozen = self.frozen.push(old.id, old.tree, old.index);
        self.generation += 1;
    }

    /// The frozen indexes that may hold object `id`, top first: all of
    /// them, or once there are enough to need [`Layers::frozen_ids`] (read
    /// now if it was not; if it cannot be, all of them), the one that does.
    fn frozen_holding(&self, id: u64) -> Vec<&Arc<OwnedFd>> {
        let all = || self.frozen.iter().map(|f| &f.index).collect();
        if self.frozen.len() < INDEXED_FROM {
            return all();
        }
        let ids = match self.frozen_ids.get() {
            Some(ids) => ids,
            None => {
                let mut ids = HashMap::new();
                // Bottom first, so that a higher index's copy wins.
                let bottom_up: Vec<&Frozen> = self.frozen.iter().collect();
                for f in bottom_up.into_iter().rev() {
                    let Ok(held) = index_ids(&f.index) else {
                        return all();
                    };
                    ids.extend(held.into_iter().map(|id| (id, f.index.clone())));
                }
                // Another thread may have read them too: the same ids.
                let _ = self.frozen_ids.set(ids);
                self.frozen_ids.get().expect("set just now")
            }
        };
        ids.get(&id).into_iter().collect()
    }

    /// The newest copy of object `id` in an index, if it has one, and
    /// whether that is the top layer's.
    fn indexed(&self, id: u64) -> io::Result<Option<(Inode, bool)>> {
        let name = index_name(id);
        let tops = self.top.iter().map(|t| &t.index);
        for (i, ix) in tops.chain(self.frozen_holding(id)).enumerate() {
            match hostfs::open_node(ix.as_fd(), &name) {
                Ok(fd) => {
                    let top = i == 0 && self.top.is_some();
                    return Ok(Some((Inode::indexed(fd, ix, &name), top)));
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// The ids a layer's index holds (its entries' names).
fn index_ids(index: &OwnedFd) -> io::Result<Vec<u64>> {
    Ok(hostfs::read_dir_all(index.as_fd())?
        .into_iter()
        .filter_map(|e| std::str::from_utf8(&e.name).ok()?.parse().ok())
        .collect())
}

fn index_name(id: u64) -> CString {
    CString::new(id.to_string()).expect("digits")
}

/// The link count an object of a layer shows: [`NLINK_XATTR`] if it has
/// one (copies of hard-linked files, whose host count includes the index
/// entry, or is 1 while only the index holds them).
fn logical_nlink(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<Option<u64>> {
    if is_dir(st) {
        return Ok(None);
    }
    match hostfs::getxattr(fd, OsStr::new(NLINK_XATTR), 32) {
        Ok(XattrReply::Data(v)) => Ok(std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok())),
        Ok(XattrReply::Size(_)) => unreachable!("a sized call returns data"),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The attributes of an inode of a layer as the view shows them (its link
/// count as [`logical_nlink`] says; `st_ino` is the caller's business).
pub fn stat_in_layer(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = hostfs::stat(fd)?;
    if let Some(n) = logical_nlink(fd, &st)? {
        st.st_nlink = n;
    }
    Ok(st)
}

fn set_nlink(fd: BorrowedFd<'_>, n: u64) -> io::Result<()> {
    hostfs::setxattr(fd, OsStr::new(NLINK_XATTR), n.to_string().as_bytes(), 0)
}

/// One branch or snapshot of a branch.
pub struct LayerView {
    /// Its view number in node ids.
    pub number: u32,
    /// Its layers. Every change holds this for reading from its copy-up
    /// to its end; freezing the top layer holds it for writing.
    pub layers: RwLock<Layers>,
    /// Serializes copy-ups: two threads must never copy one object at once.
    copy_up: Mutex<()>,
    /// Held shared while names or times of a directory of the top layer
    /// change, exclusively while a copy-up adds its copy to a directory
    /// and puts the directory's times back (a copy-up changes no name of
    /// the view): a change in between would have its times put back too.
    names: RwLock<()>,
    next_tmp: AtomicU64,
    /// The node table's tally of nodes that hold descriptors
    /// ([`LayerObj::count_in`]).
    holding: Arc<AtomicUsize>,
}

impl LayerView {
    /// A view with the given layers, whose nodes count in `holding`.
    pub fn new(
        number: u32,
        top: Option<Top>,
        frozen: FrozenStack,
        holding: Arc<AtomicUsize>,
    ) -> LayerView {
        LayerView {
            number,
            layers: RwLock::new(Layers {
                generation: 0,
                top,
                frozen,
                frozen_ids: OnceLock::new(),
            }),
            copy_up: Mutex::new(()),
            names: RwLock::new(()),
            next_tmp: AtomicU64::new(0),
            holding,
        }
    }

    fn tmp_name(&self) -> CString {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("tmp-{}-{n}", std::process::id())).expect("no NUL")
    }
}

/// An object in one layer below the top, or at the bottom.
#[derive(Clone)]
pub enum Part {
    /// In a layer directory.
    Layer(Inode),
    /// Main at the view's epoch.
    Base(Arc<SnapObj>),
}

/// What a name is in one part.
enum Child {
    Missing,
    Whiteout,
    /// `id` is the object's (see [`layer_id`]).
    Found {
        part: Part,
        st: Stat,
        opaque: bool,
        id: u64,
    },
}

/// A file opened for reading from a part.
pub enum ReadFile {
    /// Read directly.
    Plain(File),
    /// A live file of main at the bottom: reads are re-checked.
    BaseLive(Arc<SnapObj>, File),
}

impl ReadFile {
    /// Reads up to `buf.len()` bytes at `offset`.
    pub fn read(&self, cx: Ctx<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            ReadFile::Plain(f) => hostfs::read_full(f, buf, offset),
            ReadFile::BaseLive(s, f) => s.read_live(cx.store, f, buf, offset),
        }
    }

    /// The open file (for lseek and copies).
    pub fn file(&self) -> &File {
        match self {
            ReadFile::Plain(f) | ReadFile::BaseLive(_, f) => f,
        }
    }
}

/// One entry of a merged directory listing.
pub struct Listed {
    /// The id of the object (`st_ino` in the view).
    pub id: u64,
    /// `DT_*`.
    pub d_type: u8,
    /// Name.
    pub name: Vec<u8>,
}

/// The entries of a layer directory with their ids.
fn layer_entries(dir: &Inode) -> io::Result<Vec<PartEntry>> {
    let dir = dir.dir()?;
    let mut out = Vec::new();
    for e in hostfs::read_dir_all(dir.as_fd())? {
        let fd = hostfs::open_node(dir.as_fd(), &hostfs::component(OsStr::from_bytes(&e.name))?)?;
        let st = hostfs::stat(fd.as_fd())?;
        let id = if is_whiteout(fd.as_fd(), &st)? {
            None
        } else {
            Some(layer_id(fd.as_fd(), &st)?)
        };
        out.push(PartEntry {
            name: e.name,
            d_type: e.d_type,
            id,
        });
    }
    Ok(out)
}

/// The id of an object of a layer directory.
fn layer_id(fd: BorrowedFd<'_>, st: &Stat) -> io::Result<u64> {
    match hostfs::getxattr(fd, OsStr::new(ID_XATTR), 32) {
        Ok(XattrReply::Data(v)) => std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                tracing::error!("bad {ID_XATTR} on layer inode {}", st.st_ino);
                errno(libc::EIO)
            }),
        Ok(XattrReply::Size(_)) => unreachable!("a sized call returns data"),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(NATIVE | st.st_ino),
        Err(e) => Err(e),
    }
}

fn is_opaque(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match hostfs::getxattr(fd, OsStr::new(OPAQUE_XATTR), 0) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(false),
        Err(e) => Err(e),
    }
}

fn set_opaque(fd: BorrowedFd<'_>) -> io::Result<()> {
    hostfs::setxattr(fd, OsStr::new(OPAQUE_XATTR), b"y", 0)
}

fn make_whiteout(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    hostfs::mknod(dir, name, libc::S_IFCHR, 0)
}

fn without_reserved(list: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    list.into_iter()
        .filter(|(n, _)| !is_reserved_xattr(n))
        .collect()
}

impl Part {
    /// Attributes.
    pub fn stat(&self, cx: Ctx<'_>) -> io::Result<Stat> {
        match self {
            Part::Layer(i) => stat_in_layer(i.fd(cx)?.as_fd()),
            Part::Base(s) => s.stat(cx.store, cx.mount_fd),
        }
    }

    /// Whether this file is one a layer keeps in its index: it has
    /// several names, or it is a copy kept there already (which stays
    /// kept there, in later layers too, after its names but one went).
    fn linked(&self, cx: Ctx<'_>) -> io::Result<bool> {
        match self {
            Part::Layer(i) => {
                let fd = i.fd(cx)?;
                let st = hostfs::stat(fd.as_fd())?;
                Ok(st.st_nlink > 1 || logical_nlink(fd.as_fd(), &st)?.is_some())
            }
            Part::Base(s) => Ok(s.stat(cx.store, cx.mount_fd)?.st_nlink > 1),
        }
    }

    fn child(&self, cx: Ctx<'_>, name: &OsStr) -> io::Result<Child> {
        match self {
            Part::Layer(dir) => {
                let dir = dir.dir()?;
                let name = hostfs::component(name)?;
                let fd = match hostfs::open_node(dir.as_fd(), &name) {
                    Ok(fd) => fd,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Child::Missing),
                    Err(e) => return Err(e),
                };
                let st = hostfs::stat(fd.as_fd())?;
                if is_whiteout(fd.as_fd(), &st)? {
                    return Ok(Child::Whiteout);
                }
                let opaque = is_dir(&st) && is_opaque(fd.as_fd())?;
                let id = layer_id(fd.as_fd(), &st)?;
                Ok(Child::Found {
                    part: Part::Layer(Inode::new(fd, is_dir(&st), dir, &name)),
                    st,
                    opaque,
                    id,
                })
            }
            Part::Base(dir) => {
                let found = match dir.lookup(cx.store, cx.mount_fd, name) {
                    Ok(f) => f,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Child::Missing),
                    Err(e) => return Err(e),
                };
                let obj = dir.child(found);
                let st = obj.stat(cx.store, cx.mount_fd)?;
                Ok(Child::Found {
                    id: obj.ino,
                    part: Part::Base(Arc::new(obj)),
                    st,
                    opaque: false,
                })
            }
        }
    }

    /// Entries with their ids.
    fn entries(&self, cx: Ctx<'_>) -> io::Result<Vec<PartEntry>> {
        match self {
            Part::Layer(dir) => layer_entries(dir),
            Part::Base(s) => Ok(s
                .list(cx.store, cx.mount_fd)?
                .into_iter()
                .map(|e| PartEntry {
                    name: e.name,
                    d_type: e.d_type,
                    id: Some(e.ino),
                })
                .collect()),
        }
    }

    fn readlink(&self, cx: Ctx<'_>) -> io::Result<Vec<u8>> {
        match self {
            Part::Layer(i) => hostfs::readlink(i.fd(cx)?.as_fd()),
            Part::Base(s) => s.readlink(cx.store, cx.mount_fd),
        }
    }

    fn xattrs(&self, cx: Ctx<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match self {
            Part::Layer(i) => hostfs::xattrs_if_any(i.fd(cx)?.as_fd()).map(without_reserved),
            Part::Base(s) => s.xattrs(cx.store, cx.mount_fd),
        }
    }

    fn open_read(&self, cx: Ctx<'_>) -> io::Result<ReadFile> {
        match self {
            Part::Layer(i) => Ok(ReadFile::Plain(hostfs::reopen(
                i.fd(cx)?.as_fd(),
                libc::O_RDONLY,
            )?)),
            Part::Base(s) => match s.open(cx.store, cx.mount_fd)? {
                (f, true) => Ok(ReadFile::Plain(f)),
                (f, false) => Ok(ReadFile::BaseLive(s.clone(), f)),
            },
        }
    }

    /// Builds a copy of this object as `work/tmp`: content, owner, mode,
    /// times, xattrs and the id `id`, fsync'd.
    fn copy_into(&self, cx: Ctx<'_>, work: BorrowedFd<'_>, tmp: &CStr, id: u64) -> io::Result<()> {
        let st = self.stat(cx)?;
        let kind = st.st_mode & libc::S_IFMT;
        match kind {
            libc::S_IFDIR => hostfs::mkdir(work, tmp, 0o700)?,
            libc::S_IFREG => {
                let dst: File = hostfs::open_at(
                    work,
                    tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )?
                .into();
                match self {
                    Part::Layer(i) => hostfs::clone_or_copy(
                        &hostfs::reopen(i.fd(cx)?.as_fd(), libc::O_RDONLY)?,
                        &dst,
                    )?,
                    Part::Base(s) => s.copy_content(cx.store, cx.mount_fd, &dst)?,
                }
                dst.sync_all()?;
            }
            libc::S_IFLNK => {
                hostfs::symlink(OsStr::from_bytes(&self.readlink(cx)?), work, tmp)?;
            }
            _ => hostfs::mknod(work, tmp, st.st_mode, st.st_rdev)?,
        }
        let fd = hostfs::open_node(work, tmp)?;
        mark_device(fd.as_fd(), &hostfs::stat(fd.as_fd())?)?;
        hostfs::setxattr(
            fd.as_fd(),
            OsStr::new(ID_XATTR),
            id.to_string().as_bytes(),
            0,
        )?;
        if kind != libc::S_IFDIR && self.linked(cx)? {
            set_nlink(fd.as_fd(), st.st_nlink)?;
        }
        self.copy_meta_to(cx, &st, fd.as_fd())
    }

    /// Gives `to` this object's xattrs, owner, mode and times (`st` is
    /// this object's stat).
    fn copy_meta_to(&self, cx: Ctx<'_>, st: &Stat, to: BorrowedFd<'_>) -> io::Result<()> {
        for (n, v) in self.xattrs(cx)? {
            hostfs::setxattr(to, OsStr::from_bytes(&n), &v, 0)?;
        }
        hostfs::chown(to, Some(st.st_uid), Some(st.st_gid))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            hostfs::chmod(to, st.st_mode & 0o7777)?;
        }
        set_times(to, st)
    }

    /// Makes the directory `to` (a new layer's tree root) look like this
    /// one: the root of a view shows the root it was made from.
    pub fn copy_meta(&self, cx: Ctx<'_>, to: BorrowedFd<'_>) -> io::Result<()> {
        self.copy_meta_to(cx, &self.stat(cx)?, to)
    }
}

/// Where an object is linked: its directory and name (for copy-up).
type Place = Option<(Arc<LayerObj>, CString)>;

#[derive(Clone)]
struct State {
    /// The [`Layers::generation`] this state was computed for.
    generation: u64,
    /// The object in the top layer, once there.
    upper: Option<Inode>,
    /// The object below the top: for a directory every part it merges, top
    /// first (none below an opaque one); otherwise the topmost part.
    /// Shared: a directory changed between many snapshots merges many.
    lowers: Arc<[Part]>,
    /// For a directory merging at least [`INDEXED_FROM`] frozen layer
    /// parts, once it is read: what those parts hold.
    index: Option<Arc<LayerIndex>>,
}

/// How many frozen layer parts a directory merges before a lookup there
/// reads an index of them rather than trying each ([`LayerIndex`]).
const INDEXED_FROM: usize = 4;

impl State {
    /// The parts below the top that may hold `name`, top first: all of
    /// them, or with an index those it says hold the name, and main's.
    fn below(&self, name: &OsStr) -> Vec<&Part> {
        match &self.index {
            None => self.lowers.iter().collect(),
            Some(ix) => ix
                .holding(name.as_bytes())
                .map(|i| &self.lowers[i])
                .chain(self.lowers.get(ix.parts()))
                .collect(),
        }
    }

    /// How many frozen layer parts it merges (main's part is the last one
    /// if it merges it).
    fn layer_parts(&self) -> usize {
        self.lowers
            .iter()
            .take_while(|p| matches!(p, Part::Layer(_)))
            .count()
    }
}

/// An object of a layered view.
pub struct LayerObj {
    /// Its view.
    pub view: Arc<LayerView>,
    /// Its id (`st_ino`), stable across copy-up and restarts.
    pub id: u64,
    /// Whether it is a directory.
    pub is_dir: bool,
    place: Mutex<Place>,
    state: RwLock<State>,
    /// Copy-ups of this object so far: readers opened before one reopen.
    copies: AtomicU64,
    /// How its node counts in [`LayerView::holding`]: [`UNCOUNTED`],
    /// [`LIGHT`] or [`HEAVY`].
    counted: AtomicU8,
    /// Its last name was removed: it is never copied up again (its name
    /// may be free in a later layer, its copy in the index is gone).
    unlinked: AtomicBool,
}

/// What a rename did ([`LayerObj::rename`]).
#[derive(Default)]
pub struct Renamed {
    /// The objects that moved: the renamed one, and the other of an
    /// exchange.
    pub moved: Vec<Arc<LayerObj>>,
    /// The object whose name the renamed one took.
    pub replaced: Option<Gone>,
}

/// An object that lost a name ([`LayerObj::remove`], [`Renamed`]).
pub struct Gone {
    pub obj: Arc<LayerObj>,
    /// Whether that was its last (it left the view).
    pub last: bool,
}

/// The generation of a view root's state before its first use.
const UNREAD: u64 = u64::MAX;

/// Not a node's object (any more), or not yet.
const UNCOUNTED: u8 = 0;
/// A node's object that holds no descriptor.
const LIGHT: u8 = 1;
/// A node's object that holds descriptors, counted in the tally.
const HEAVY: u8 = 2;

impl LayerObj {
    /// The root of a view over `base`, main's root at the view's epoch.
    /// Its other parts (the top layer's tree, the frozen ones) are taken
    /// from the view's layers on first use ([`LayerObj::current`]): a
    /// snapshot nobody looks into holds no list of them.
    pub fn root(view: Arc<LayerView>, id: u64, base: Part) -> LayerObj {
        LayerObj {
            view,
            id,
            is_dir: true,
            place: Mutex::new(None),
            state: RwLock::new(State {
                generation: UNREAD,
                upper: None,
                lowers: Arc::new([base]),
                index: None,
            }),
            copies: AtomicU64::new(0),
            counted: AtomicU8::new(UNCOUNTED),
            unlinked: AtomicBool::new(false),
        }
    }

    /// Counts this object, now a node's, in the view's tally of nodes that
    /// hold descriptors if it holds some: a directory (its parts), a file
    /// of a layer on a file system without handles. Other files hold none
    /// (kept by handle: [`Inode`], [`SnapObj`]); a copy-up that adds a
    /// descriptor ([`LayerObj::adopt`]) counts the object then. Under the
    /// state's lock, which a copy-up takes to add its copy: never counted
    /// twice nor missed.
    pub fn count_in(&self) {
        let s = self.state.read().unwrap();
        let heavy = self.is_dir
            || matches!(s.upper, Some(Inode::Open(_)))
            || s.lowers
                .iter()
                .any(|p| matches!(p, Part::Layer(Inode::Open(_))));
        self.counted
            .store(if heavy { HEAVY } else { LIGHT }, Ordering::Relaxed);
        if heavy {
            self.view.holding.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether it counts in the tally as holding descriptors.
    pub fn counted_holding(&self) -> bool {
        self.counted.load(Ordering::Relaxed) == HEAVY
    }

    /// Takes this object out of the tally: its node is gone.
    pub fn count_out(&self) {
        let _s = self.state.read().unwrap();
        if self.counted.swap(UNCOUNTED, Ordering::Relaxed) == HEAVY {
            self.view.holding.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The object in the top layer, if it is there already.
    pub fn upper_now(&self, layers: &Layers) -> Option<Inode> {
        self.current(layers).upper
    }

    /// The id of its directory and its name there (`None` for a root).
    pub fn place(&self) -> Option<(u64, Vec<u8>)> {
        let place = self.place.lock().unwrap();
        place
            .as_ref()
            .map(|(dir, name)| (dir.id, name.as_bytes().to_vec()))
    }

    /// Main's object at the view's epoch, where this one shows it: the
    /// bottom part it merges or stands on.
    pub fn base(&self, layers: &Layers) -> Option<Arc<SnapObj>> {
        self.current(layers).lowers.iter().find_map(|p| match p {
            Part::Base(s) => Some(s.clone()),
            Part::Layer(_) => None,
        })
    }

    /// Whether this is the root of its view.
    pub fn is_root(&self) -> bool {
        self.place.lock().unwrap().is_none()
    }

    /// The state for the current layers. When the top layer has frozen
    /// since, the object's copy there becomes its topmost lower part.
    fn current(&self, layers: &Layers) -> State {
        {
            let s = self.state.read().unwrap();
            if s.generation == layers.generation {
                return s.clone();
            }
        }
        let mut s = self.state.write().unwrap();
        if s.generation != layers.generation {
            if s.generation == UNREAD {
                let trees = layers
                    .frozen
                    .iter()
                    .map(|f| Part::Layer(Inode::Open(f.tree.clone())));
                s.lowers = trees.chain(s.lowers.iter().cloned()).collect();
            } else if let Some(u) = s.upper.take() {
                if !self.is_dir || u.dir().and_then(|d| is_opaque(d.as_fd())).unwrap_or(true) {
                    s.index = None;
                    s.lowers = Arc::new([Part::Layer(u)]);
                } else {
                    // The index, if any, takes the frozen copy on top; if
                    // it cannot be read the index goes (rebuilt on use).
                    if let Some(mut ix) = s.index.take() {
                        if let Ok(entries) = layer_entries(&u) {
                            Arc::make_mut(&mut ix).push(entries);
                            s.index = Some(ix);
                        }
                    }
                    let below = s.lowers.iter().cloned();
                    s.lowers = std::iter::once(Part::Layer(u)).chain(below).collect();
                }
            }
            if self.is_root() {
                s.upper = layers.top.as_ref().map(|t| Inode::Open(t.tree.clone()));
            }
            s.generation = layers.generation;
        }
        s.clone()
    }

    /// [`LayerObj::current`], with the index of a directory's frozen parts
    /// if it merges enough of them to need one (made now if it has none).
    /// Without one (not needed, or it could not be made: any error shows
    /// again on the way without it) every part is tried, to the same end.
    fn current_with_index(&self, layers: &Layers) -> State {
        let s = self.current(layers);
        if s.index.is_some() || s.layer_parts() < INDEXED_FROM {
            return s;
        }
        let mut w = self.state.write().unwrap();
        if w.generation != s.generation || !Arc::ptr_eq(&w.lowers, &s.lowers) {
            return s;
        }
        if w.index.is_none() {
            let parts = w.lowers[..w.layer_parts()]
                .iter()
                .map(|p| match p {
                    Part::Layer(dir) => layer_entries(dir),
                    Part::Base(_) => unreachable!("main's part is the bottom one"),
                })
                .collect::<io::Result<Vec<_>>>();
            match parts {
                Ok(parts) => w.index = Some(Arc::new(LayerIndex::new(parts))),
                Err(e) => {
                    tracing::debug!(
                        view = self.view.number,
                        "index of directory {}: {e}",
                        self.id
                    );
                    return s;
                }
            }
        }
        w.clone()
    }

    /// Attributes (`st_ino` is the caller's business).
    pub fn stat(&self, cx: Ctx<'_>, layers: &Layers) -> io::Result<Stat> {
        self.topmost(layers)?.stat(cx)
    }

    fn topmost(&self, layers: &Layers) -> io::Result<Part> {
        {
            // A view's root nobody looked into yet: its topmost part
            // without listing its parts (`ls -l` of the snapshots stats
            // every root).
            let s = self.state.read().unwrap();
            if s.generation == UNREAD {
                let tree = layers.top.as_ref().map(|t| &t.tree);
                return match tree.or(layers.frozen.iter().next().map(|f| &f.tree)) {
                    Some(tree) => Ok(Part::Layer(Inode::Open(tree.clone()))),
                    None => s.lowers.first().cloned().ok_or_else(|| errno(libc::ESTALE)),
                };
            }
        }
        let s = self.current(layers);
        match (s.upper, s.lowers.first()) {
            (Some(u), _) => Ok(Part::Layer(u)),
            (None, Some(p)) => Ok(p.clone()),
            (None, None) => Err(errno(libc::ESTALE)),
        }
    }

    /// Whether `found`, looked up with this object's id, is this object.
    /// A file kept by handle pins no inode: once it is removed, its
    /// inode number (the id of a file made in a layer) may go to another
    /// file while the kernel still holds this node. If it is this object,
    /// this object is opened by the name `found` was found at from now on
    /// if `links` (its link count) is given.
    pub fn is_found_again(&self, found: &LayerObj, links: Option<u64>, layers: &Layers) -> bool {
        // Nothing names it: `found` has its number, and its copy may be one
        // no name leads to, kept open (`nameless`).
        if self.is_unlinked() {
            return false;
        }
        let (Ok(Part::Layer(Inode::Handle(mine))), Ok(Part::Layer(Inode::Handle(theirs)))) =
            (self.topmost(layers), found.topmost(layers))
        else {
            return true;
        };
        if mine.handle != theirs.handle {
            return false;
        }
        if let (Some(name), Some(links)) = (theirs.at.newest(), links) {
            mine.at.learn(name, links);
        }
        true
    }

    /// Target of a symlink.
    pub fn readlink(&self, cx: Ctx<'_>, layers: &Layers) -> io::Result<Vec<u8>> {
        self.topmost(layers)?.readlink(cx)
    }

    /// Every user-visible xattr.
    pub fn xattrs(&self, cx: Ctx<'_>, layers: &Layers) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.topmost(layers)?.xattrs(cx)
    }

    /// Opens the object for reading, with the copy-up count it reflects.
    pub fn open_read(&self, cx: Ctx<'_>, layers: &Layers) -> io::Result<(ReadFile, u64)> {
        let copies = self.copies.load(Ordering::Acquire);
        Ok((self.topmost(layers)?.open_read(cx)?, copies))
    }

    /// Copy-ups so far (see [`LayerObj::open_read`]).
    pub fn copies(&self) -> u64 {
        self.copies.load(Ordering::Acquire)
    }

    /// Whether its last name was removed (it is copied up no more).
    pub fn is_unlinked(&self) -> bool {
        self.unlinked.load(Ordering::Acquire)
    }

    /// The file a descriptor open for writing on this object, whose last
    /// name was removed, writes to once the top layer it wrote to froze:
    /// its copy in the top layer if another descriptor made one; else
    /// `open`, the file it wrote to, while no layer names it, or a copy of
    /// it that no layer names (its copy in a frozen layer, which a
    /// snapshot shows, must not change); kept open as its copy in the top
    /// layer. `flags` as it was opened with.
    pub fn nameless(
        &self,
        cx: Ctx<'_>,
        layers: &Layers,
        open: &File,
        flags: i32,
    ) -> io::Result<File> {
        let top = layers.top.as_ref().ok_or_else(|| errno(libc::EROFS))?;
        let _one = self.view.copy_up.lock().unwrap();
        if let Some(u) = self.current(layers).upper {
            return hostfs::reopen(u.fd(cx)?.as_fd(), flags);
        }
        let (kept, file) = if hostfs::stat(open.as_fd())?.st_nlink == 0 {
            (OwnedFd::from(open.try_clone()?), open.try_clone()?)
        } else {
            let tmp = self.view.tmp_name();
            let work = top.work.as_fd();
            let made = self
                .topmost(layers)?
                .copy_into(cx, work, &tmp, self.id)
                .and_then(|()| {
                    let kept = hostfs::open_at(work, &tmp, libc::O_RDWR, 0)?;
                    if logical_nlink(kept.as_fd(), &hostfs::stat(kept.as_fd())?)?.is_some() {
                        set_nlink(kept.as_fd(), 0)?;
                    }
                    Ok((kept, hostfs::open_at(work, &tmp, flags, 0)?.into()))
                });
            let _ = remove_tree(work, &tmp);
            made?
        };
        // Every descriptor and stat of it follows this one from now on.
        self.adopt_inode(Inode::Open(Arc::new(kept)));
        Ok(file)
    }

    /// Resolves `name` in this directory (the result is not registered).
    pub fn lookup(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        name: &OsStr,
    ) -> io::Result<LayerObj> {
        let cname = hostfs::component(name)?;
        let s = self.current_with_index(layers);
        // The topmost part's attributes and the object's id.
        let mut first: Option<(Stat, u64)> = None;
        let mut upper = None;
        let mut lowers = Vec::new();
        let mut done = false;
        if let Some(u) = &s.upper {
            match Part::Layer(u.clone()).child(cx, name)? {
                Child::Missing => {}
                Child::Whiteout => return Err(errno(libc::ENOENT)),
                Child::Found {
                    part: Part::Layer(u),
                    st,
                    opaque,
                    id,
                } => {
                    done = !is_dir(&st) || opaque;
                    first = Some((st, id));
                    upper = Some(u);
                }
                Child::Found { .. } => unreachable!("the top part is a layer"),
            }
        }
        if !done {
            for p in s.below(name) {
                match p.child(cx, name)? {
                    Child::Missing => continue,
                    Child::Whiteout => break,
                    Child::Found {
                        part,
                        st,
                        opaque,
                        id,
                    } => {
                        if first.is_some_and(|(f, _)| !is_dir(&f))
                            || (first.is_some() && !is_dir(&st))
                        {
                            break;
                        }
                        let stop = !is_dir(&st) || opaque;
                        first.get_or_insert((st, id));
                        lowers.push(part);
                        if stop {
                            break;
                        }
                    }
                }
            }
        }
        let (st, id) = first.ok_or_else(|| errno(libc::ENOENT))?;
        if let Some(u) = upper.as_ref().filter(|_| !is_dir(&st)) {
            lowers.clear();
            if let Some(top) = layers.top.as_ref().filter(|_| st.st_nlink > 1) {
                // Kept in the index, if it is: opened by its entry there
                // once the names it was found at are gone.
                u.also(&top.index, &index_name(id));
            }
        }
        if upper.is_none() && !is_dir(&st) && st.st_nlink > 1 {
            // Another name of this object may have been copied up: every
            // name shows that copy.
            match layers.indexed(id)? {
                // Its copy in the top layer: a name of the tree (one a
                // rename linked there) is removed, not whited out.
                Some((ix, true)) => {
                    upper = Some(ix);
                    lowers.clear();
                }
                Some((ix, false)) => lowers = vec![Part::Layer(ix)],
                None => {}
            }
        }
        Ok(LayerObj {
            view: self.view.clone(),
            id,
            is_dir: is_dir(&st),
            place: Mutex::new(Some((self.clone(), cname))),
            state: RwLock::new(State {
                generation: layers.generation,
                upper,
                lowers: lowers.into(),
                index: None,
            }),
            copies: AtomicU64::new(0),
            counted: AtomicU8::new(UNCOUNTED),
            unlinked: AtomicBool::new(false),
        })
    }

    /// The merged entries of this directory (`.` and `..` excluded).
    pub fn list(&self, cx: Ctx<'_>, layers: &Layers) -> io::Result<Vec<Listed>> {
        let s = self.current_with_index(layers);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut add = |entries: &mut dyn Iterator<Item = PartEntry>| {
            for e in entries {
                if seen.insert(e.name.clone()) {
                    if let Some(id) = e.id {
                        out.push(Listed {
                            id,
                            d_type: e.d_type,
                            name: e.name,
                        });
                    }
                }
            }
        };
        if let Some(u) = s.upper {
            add(&mut layer_entries(&u)?.into_iter());
        }
        let mut parts = &s.lowers[..];
        if let Some(ix) = &s.index {
            add(&mut ix.entries());
            parts = &parts[ix.parts()..];
        }
        for p in parts {
            add(&mut p.entries(cx)?.into_iter());
        }
        Ok(out)
    }

    /// Whether a layer below the top has `name` in this directory (so
    /// removing it from the top needs a whiteout).
    fn lower_has(&self, cx: Ctx<'_>, layers: &Layers, name: &OsStr) -> io::Result<bool> {
        for p in self.current_with_index(layers).below(name) {
            match p.child(cx, name)? {
                Child::Missing => continue,
                Child::Whiteout => return Ok(false),
                Child::Found { .. } => return Ok(true),
            }
        }
        Ok(false)
    }

    /// The object in the top layer, copied up (with its directories) first
    /// if it is not there yet. EROFS in a snapshot; ESTALE once removed.
    /// A file with several names is copied into the top layer's index
    /// only: which of its names are left is not known here (the kernel
    /// may use any it cached), and each finds it there.
    pub fn upper(self: &Arc<Self>, cx: Ctx<'_>, layers: &Layers) -> io::Result<Inode> {
        let top = layers.top.as_ref().ok_or_else(|| errno(libc::EROFS))?;
        let s = self.current(layers);
        if let Some(u) = s.upper {
            return Ok(u);
        }
        let src = s.lowers.first().ok_or_else(|| errno(libc::ESTALE))?;
        let in_index = !self.is_dir && src.linked(cx)?;
        let place = match in_index {
            true => None,
            false => {
                let (parent, name) = self
                    .place
                    .lock()
                    .unwrap()
                    .clone()
                    .expect("a root has an upper");
                Some((parent.upper_dir(cx, layers)?, name))
            }
        };
        let _one = self.view.copy_up.lock().unwrap();
        let s = self.current(layers);
        if let Some(u) = s.upper {
            return Ok(u);
        }
        // Checked under the lock a removal of its last name takes.
        if self.unlinked.load(Ordering::Acquire) {
            return Err(errno(libc::ESTALE));
        }
        let src = s.lowers.first().ok_or_else(|| errno(libc::ESTALE))?;
        let Some((pu, name)) = place else {
            let ix = self.index_copy(cx, top, src)?;
            return Ok(self.adopt_inode(Inode::indexed(ix, &top.index, &index_name(self.id))));
        };
        match hostfs::open_node(pu.as_fd(), &name) {
            Ok(fd) => {
                // Copied up already (by a restarted worker, or as part of a
                // directory tree) unless the name now holds something else,
                // which means this object was removed from under it.
                let st = hostfs::stat(fd.as_fd())?;
                if is_whiteout(fd.as_fd(), &st)? || layer_id(fd.as_fd(), &st)? != self.id {
                    return Err(errno(libc::ESTALE));
                }
                return Ok(self.adopt(fd, &pu, &name));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let tmp = self.view.tmp_name();
        let work = top.work.as_fd();
        let built = src.copy_into(cx, work, &tmp, self.id).and_then(|()| {
            self.add_quietly(&pu, || {
                hostfs::rename(work, &tmp, pu.as_fd(), &name, libc::RENAME_NOREPLACE)
            })
        });
        if let Err(e) = built {
            let _ = remove_tree(work, &tmp);
            return Err(e);
        }
        let fd = hostfs::open_node(pu.as_fd(), &name)?;
        Ok(self.adopt(fd, &pu, &name))
    }

    /// Adds a name to `dir`, a directory of the top layer, with `add`,
    /// keeping its times, and flushes it: a copy-up changes no name of
    /// the view.
    fn add_quietly(&self, dir: &OwnedFd, add: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        {
            let _alone = self.view.names.write().unwrap();
            let times = hostfs::stat(dir.as_fd())?;
            add()?;
            // The name is in place: failing the change now would only
            // have the next one find it there.
            if let Err(e) = set_times(dir.as_fd(), &times) {
                tracing::warn!(
                    view = self.view.number,
                    "the times of a directory changed by the copy-up of object {}: {e}",
                    self.id
                );
            }
        }
        hostfs::sync_dir(dir.as_fd())
    }

    /// [`LayerObj::upper`], there as `name` in `dir` (the top layer's
    /// directory of one of its names), to be renamed or made opaque
    /// around: a file kept in the index may be in the top layer's tree
    /// at another name, or at none.
    fn upper_as(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        dir: &Arc<OwnedFd>,
        name: &CStr,
    ) -> io::Result<Inode> {
        let u = self.upper(cx, layers)?;
        if self.is_dir {
            return Ok(u);
        }
        match hostfs::open_node(dir.as_fd(), name) {
            // The lookup that found this object there found it in the top
            // layer, or saw nothing there.
            Ok(_) => return Ok(u),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let fd = u.fd(cx)?;
        self.add_quietly(dir, || hostfs::link(fd.as_fd(), dir.as_fd(), name))?;
        u.moved(dir, name);
        Ok(u)
    }

    /// A directory's [`LayerObj::upper`]: its descriptor.
    fn upper_dir(self: &Arc<Self>, cx: Ctx<'_>, layers: &Layers) -> io::Result<Arc<OwnedFd>> {
        self.upper(cx, layers)?.dir().cloned()
    }

    /// Whether the object, not yet in the top layer, has more than one
    /// name below it (a hard-linked file).
    fn has_names_below(&self, cx: Ctx<'_>, s: &State) -> io::Result<bool> {
        match (&s.upper, s.lowers.first()) {
            (None, Some(p)) if !self.is_dir => Ok(p.stat(cx)?.st_nlink > 1),
            _ => Ok(false),
        }
    }

    /// The copy of this object in the top layer's index, made from `src`
    /// if it is not there yet (built in `work/`, fsync'd, then linked).
    fn index_copy(&self, cx: Ctx<'_>, top: &Top, src: &Part) -> io::Result<OwnedFd> {
        let name = index_name(self.id);
        match hostfs::open_node(top.index.as_fd(), &name) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let tmp = self.view.tmp_name();
        let work = top.work.as_fd();
        let built = src.copy_into(cx, work, &tmp, self.id).and_then(|()| {
            let fd = hostfs::open_node(work, &tmp)?;
            hostfs::link(fd.as_fd(), top.index.as_fd(), &name)?;
            hostfs::sync_dir(top.index.as_fd())?;
            Ok(fd)
        });
        let _ = hostfs::unlink(work, &tmp, false);
        built
    }

    /// Accounts for one name of this object going away: a hard-linked file
    /// from below keeps its count of names in its copy in the top layer's
    /// index (made now if needed), and leaves the index with its last name.
    /// Whether that was its last name; `None` for a file of the top layer
    /// alone, whose host link count tells.
    fn lose_indexed_name(&self, cx: Ctx<'_>, layers: &Layers) -> io::Result<Option<bool>> {
        let top = layers.top.as_ref().ok_or_else(|| errno(libc::EROFS))?;
        let s = self.current(layers);
        let index = index_name(self.id);
        let (fd, made) = match hostfs::open_node(top.index.as_fd(), &index) {
            Ok(fd) => (fd, false),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => match s.lowers.first() {
                Some(p) if self.has_names_below(cx, &s)? => (self.index_copy(cx, top, p)?, true),
                Some(_) => return Ok(Some(true)),
                None => return Ok(None),
            },
            Err(e) => return Err(e),
        };
        match logical_nlink(fd.as_fd(), &hostfs::stat(fd.as_fd())?)? {
            Some(n) if n > 1 => set_nlink(fd.as_fd(), n - 1)?,
            _ => {
                // What its descriptors still open show (only that).
                let _ = set_nlink(fd.as_fd(), 0);
                return hostfs::unlink(top.index.as_fd(), &index, false).map(|()| Some(true));
            }
        }
        if made {
            // Its other names show the new copy from now on, as a lookup
            // of them would find it (the part below it shows the old count).
            self.adopt_inode(Inode::indexed(fd, &top.index, &index));
        }
        Ok(Some(false))
    }

    /// Before its name `name` in directory `dir` (`dir_upper` in the top
    /// layer) goes: the host link count of its copy at that name, if it
    /// is there, for [`LayerObj::lose_name`]. A file of the top layer
    /// with other names there that loses the one it would be copied up
    /// at once its layer froze (its place, see [`LayerObj::upper`]) is
    /// kept in the index from now on, as a file with names below is:
    /// which of its others are left is not known.
    fn before_losing(
        &self,
        layers: &Layers,
        dir: &LayerObj,
        dir_upper: &OwnedFd,
        name: &CStr,
    ) -> io::Result<Option<u64>> {
        if self.is_dir {
            return Ok(None);
        }
        let fd = match hostfs::open_node(dir_upper.as_fd(), name) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let st = hostfs::stat(fd.as_fd())?;
        let placed_here = matches!(
            &*self.place.lock().unwrap(),
            Some((d, n)) if d.id == dir.id && n.as_c_str() == name
        );
        if st.st_nlink > 1 && placed_here && logical_nlink(fd.as_fd(), &st)?.is_none() {
            let top = layers.top.as_ref().expect("the name is in the top layer");
            let ix = index_name(self.id);
            set_nlink(fd.as_fd(), st.st_nlink)?;
            match hostfs::link(fd.as_fd(), top.index.as_fd(), &ix) {
                // Its id is its inode number here, which its entry pins.
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                _ => hostfs::sync_dir(top.index.as_fd())?,
            }
            if let Some(u) = self.current(layers).upper {
                u.also(&top.index, &ix);
            }
        }
        Ok(Some(st.st_nlink))
    }

    /// Accounts for one of its names having gone ([`LayerObj::lose_indexed_name`];
    /// `links` as [`LayerObj::before_losing`] gave it): whether that was
    /// its last, so that it left the view. Called once the name is gone,
    /// so that a failure leaves the count of names high (a copy kept in
    /// the index after its names went) rather than low (a copy dropped
    /// from the index while a name still shows it).
    fn lose_name(&self, cx: Ctx<'_>, layers: &Layers, links: Option<u64>) -> bool {
        // A copy-up of another name of the file may be making the index
        // copy too; one that finds it removed must not make it again.
        let _one = self.view.copy_up.lock().unwrap();
        let last = match self.is_dir {
            true => Ok(true),
            false => self
                .lose_indexed_name(cx, layers)
                .map(|last| last.unwrap_or(links.is_none_or(|n| n <= 1))),
        };
        let last = last.unwrap_or_else(|e| {
            tracing::warn!(
                view = self.view.number,
                "object {} lost a name, but its count of names was not lowered: {e}",
                self.id
            );
            false
        });
        if last {
            self.unlinked.store(true, Ordering::Release);
        }
        last
    }

    /// Takes `fd`, `name` in the top layer's directory `dir`, as this
    /// object's copy there.
    fn adopt(&self, fd: OwnedFd, dir: &Arc<OwnedFd>, name: &CStr) -> Inode {
        self.adopt_inode(Inode::new(fd, self.is_dir, dir, name))
    }

    /// Takes `u`, in the top layer, as this object's copy there.
    fn adopt_inode(&self, u: Inode) -> Inode {
        let mut s = self.state.write().unwrap();
        s.upper = Some(u.clone());
        if !self.is_dir {
            s.lowers = Arc::new([]);
        }
        self.count_heavy_if(&u);
        self.copies.fetch_add(1, Ordering::AcqRel);
        u
    }

    /// Counts this object in the tally as holding descriptors from now on
    /// if `part`, newly its own, holds one (see [`LayerObj::count_in`];
    /// under the state's write lock).
    fn count_heavy_if(&self, part: &Inode) {
        if matches!(part, Inode::Open(_))
            && self
                .counted
                .compare_exchange(LIGHT, HEAVY, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.view.holding.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Copies up this object, its name `name` in the top layer's
    /// directory `dir`, and, for a directory, everything below it, and
    /// makes it opaque: it then no longer depends on the layers below and
    /// can be moved. Costs a copy of the subtree's files. `live` turns a
    /// looked-up object into the live one of the same id, which must learn
    /// that it stands on nothing below any more.
    fn detach(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        dir: &Arc<OwnedFd>,
        name: &CStr,
        live: &dyn Fn(LayerObj) -> Arc<LayerObj>,
    ) -> io::Result<Inode> {
        let u = self.upper_as(cx, layers, dir, name)?;
        if !self.is_dir || self.current(layers).lowers.is_empty() {
            return Ok(u);
        }
        let here = u.dir()?;
        for e in self.list(cx, layers)? {
            let child = live(self.lookup(cx, layers, OsStr::from_bytes(&e.name))?);
            let cname = hostfs::component(OsStr::from_bytes(&e.name))?;
            child.detach(cx, layers, here, &cname, live)?;
        }
        set_opaque(here.as_fd())?;
        let mut s = self.state.write().unwrap();
        s.lowers = Arc::new([]);
        s.index = None;
        Ok(u)
    }

    /// Makes this object, `name` in the top layer's directory `dir`,
    /// movable to another name: detached from the layers below, and, for
    /// a directory, opaque, so that whatever the new name hides below
    /// stays hidden.
    fn detach_to_move(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        dir: &Arc<OwnedFd>,
        name: &CStr,
        live: &dyn Fn(LayerObj) -> Arc<LayerObj>,
    ) -> io::Result<()> {
        let u = self.detach(cx, layers, dir, name, live)?;
        if self.is_dir {
            set_opaque(u.dir()?.as_fd())?;
        }
        Ok(())
    }

    /// Creates `name` in this directory with `make` (called on a directory
    /// and a name) and returns it, still unregistered. A whiteout in the
    /// way is replaced atomically; a directory made there is opaque.
    pub fn create(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>, &CStr) -> io::Result<()>,
    ) -> io::Result<LayerObj> {
        let pu = self.upper_dir(cx, layers)?;
        let _names = self.changing_names();
        let over_whiteout = match Part::Layer(Inode::Open(pu.clone())).child(cx, name)? {
            Child::Found { .. } => return Err(errno(libc::EEXIST)),
            Child::Whiteout => true,
            Child::Missing if self.lower_has(cx, layers, name)? => return Err(errno(libc::EEXIST)),
            Child::Missing => false,
        };
        let cname = hostfs::component(name)?;
        let (fd, st) = if !over_whiteout {
            make(pu.as_fd(), &cname)?;
            // A crash before the mark leaves a whiteout of a name that no
            // layer has: the unacknowledged device is simply not there.
            let fd = hostfs::open_node(pu.as_fd(), &cname)?;
            let st = hostfs::stat(fd.as_fd())?;
            mark_device(fd.as_fd(), &st)?;
            (fd, st)
        } else {
            let work = layers.top.as_ref().expect("upper() checked").work.as_fd();
            let tmp = self.view.tmp_name();
            make(work, &tmp)?;
            let replaced = (|| {
                let fd = hostfs::open_node(work, &tmp)?;
                let st = hostfs::stat(fd.as_fd())?;
                mark_device(fd.as_fd(), &st)?;
                if is_dir(&st) {
                    // A directory cannot replace a whiteout; swap them.
                    set_opaque(fd.as_fd())?;
                    hostfs::rename(work, &tmp, pu.as_fd(), &cname, libc::RENAME_EXCHANGE)?;
                    hostfs::unlink(work, &tmp, false)?;
                } else {
                    hostfs::rename(work, &tmp, pu.as_fd(), &cname, 0)?;
                }
                Ok((fd, st))
            })();
            match replaced {
                Ok(made) => made,
                Err(e) => {
                    let _ = remove_tree(work, &tmp);
                    return Err(e);
                }
            }
        };
        // Nothing below shows through a name new in the top layer: a file
        // hides any lower one, a directory was either made opaque above or
        // has no namesake below (checked before it was made).
        Ok(LayerObj {
            view: self.view.clone(),
            // `make` may link an inode copied up from below: its id stays.
            id: layer_id(fd.as_fd(), &st)?,
            is_dir: is_dir(&st),
            state: RwLock::new(State {
                generation: layers.generation,
                upper: Some(Inode::new(fd, is_dir(&st), &pu, &cname)),
                lowers: Arc::new([]),
                index: None,
            }),
            place: Mutex::new(Some((self.clone(), cname))),
            copies: AtomicU64::new(0),
            counted: AtomicU8::new(UNCOUNTED),
            unlinked: AtomicBool::new(false),
        })
    }

    fn whiteout_at(&self, dir: &OwnedFd, name: &CStr) -> io::Result<bool> {
        match hostfs::open_node(dir.as_fd(), name) {
            Ok(fd) => is_whiteout(fd.as_fd(), &hostfs::stat(fd.as_fd())?),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes `name` (a directory if `dir`) from this directory, leaving
    /// a whiteout where a lower layer has the name. `live` as for
    /// [`LayerObj::rename`]: a file's other names live on in that object.
    /// Returns the object that lost the name.
    pub fn remove(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        name: &OsStr,
        dir: bool,
        live: &dyn Fn(LayerObj) -> Arc<LayerObj>,
    ) -> io::Result<Gone> {
        let pu = self.upper_dir(cx, layers)?;
        let child = live(self.lookup(cx, layers, name)?);
        match (dir, child.is_dir) {
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (false, true) => return Err(errno(libc::EISDIR)),
            _ => {}
        }
        if dir && !child.list(cx, layers)?.is_empty() {
            return Err(errno(libc::ENOTEMPTY));
        }
        let cname = hostfs::component(name)?;
        let needs_whiteout = self.lower_has(cx, layers, name)?;
        let work = layers.top.as_ref().expect("upper() checked").work.as_fd();
        let links = child.before_losing(layers, self, &pu, &cname)?;
        let names = self.changing_names();
        let removed = match (child.current(layers).upper, needs_whiteout) {
            (None, true) => make_whiteout(pu.as_fd(), &cname),
            (None, false) => Err(errno(libc::ESTALE)),
            (Some(u), false) => {
                if dir {
                    clear_whiteouts(u.dir()?)?;
                }
                hostfs::unlink(pu.as_fd(), &cname, dir)
            }
            (Some(u), true) => {
                let tmp = self.view.tmp_name();
                make_whiteout(work, &tmp)?;
                if dir {
                    clear_whiteouts(u.dir()?)?;
                    hostfs::rename(work, &tmp, pu.as_fd(), &cname, libc::RENAME_EXCHANGE)?;
                    hostfs::unlink(work, &tmp, true)
                } else {
                    hostfs::rename(work, &tmp, pu.as_fd(), &cname, 0)
                }
            }
        };
        drop(names);
        removed?;
        let last = child.lose_name(cx, layers, links);
        Ok(Gone { obj: child, last })
    }

    /// Renames `name` in this directory to `newname` in `newdir` with
    /// `renameat2` flags. `live` turns a looked-up object into the live
    /// one of the same id (if the kernel holds it), so that it learns its
    /// new place. Returns what moved and what left the view.
    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        name: &OsStr,
        newdir: &Arc<LayerObj>,
        newname: &OsStr,
        flags: u32,
        live: &dyn Fn(LayerObj) -> Arc<LayerObj>,
    ) -> io::Result<Renamed> {
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let spu = self.upper_dir(cx, layers)?;
        let dpu = newdir.upper_dir(cx, layers)?;
        let src = live(self.lookup(cx, layers, name)?);
        let dst = match newdir.lookup(cx, layers, newname) {
            Ok(o) => Some(live(o)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        let (sname, dname) = (hostfs::component(name)?, hostfs::component(newname)?);
        match &dst {
            Some(_) if flags & libc::RENAME_NOREPLACE != 0 => return Err(errno(libc::EEXIST)),
            None if exchange => return Err(errno(libc::ENOENT)),
            Some(d) if Arc::ptr_eq(d, &src) || d.id == src.id => return Ok(Renamed::default()),
            Some(d) if !exchange => match (src.is_dir, d.is_dir) {
                (true, false) => return Err(errno(libc::ENOTDIR)),
                (false, true) => return Err(errno(libc::EISDIR)),
                (true, true) if !d.list(cx, layers)?.is_empty() => {
                    return Err(errno(libc::ENOTEMPTY));
                }
                _ => {}
            },
            _ => {}
        }
        let swap = || {
            hostfs::rename(
                spu.as_fd(),
                &sname,
                dpu.as_fd(),
                &dname,
                libc::RENAME_EXCHANGE,
            )
        };
        src.detach_to_move(cx, layers, &spu, &sname, live)?;
        let mut links = None;
        match &dst {
            Some(d) if exchange => d.detach_to_move(cx, layers, &dpu, &dname, live)?,
            Some(d) => links = d.before_losing(layers, newdir, &dpu, &dname)?,
            None => {}
        }
        let names = self.changing_names();
        let mut done = Renamed {
            moved: vec![src.clone()],
            replaced: None,
        };
        if exchange {
            let d = dst.expect("checked above");
            swap()?;
            d.moved(layers, self, &spu, sname.clone());
            done.moved.push(d);
        } else {
            if let Some(du) = dst
                .as_ref()
                .filter(|d| d.is_dir)
                .and_then(|d| d.current(layers).upper)
            {
                clear_whiteouts(du.dir()?)?;
            }
            let whiteout = self.lower_has(cx, layers, name)?;
            if src.is_dir && self.whiteout_at(&dpu, &dname)? {
                // A directory cannot replace a whiteout: swap them, then
                // drop the whiteout unless the old name needs one.
                swap()?;
                if !whiteout {
                    hostfs::unlink(spu.as_fd(), &sname, false)?;
                }
            } else {
                let wflag = if whiteout { libc::RENAME_WHITEOUT } else { 0 };
                hostfs::rename(spu.as_fd(), &sname, dpu.as_fd(), &dname, wflag)?;
            }
            done.replaced = dst.map(|obj| Gone { obj, last: false });
        }
        src.moved(layers, newdir, &dpu, dname);
        drop(names);
        if let Some(gone) = &mut done.replaced {
            gone.last = gone.obj.lose_name(cx, layers, links);
        }
        Ok(done)
    }

    /// It was renamed to `name` in `dir`, whose directory in the top layer
    /// is `dir_upper`.
    fn moved(&self, layers: &Layers, dir: &Arc<LayerObj>, dir_upper: &Arc<OwnedFd>, name: CString) {
        if let Some(u) = self.current(layers).upper {
            u.moved(dir_upper, &name);
        }
        *self.place.lock().unwrap() = Some((dir.clone(), name));
    }

    /// To hold while names or times of directories of the view's top
    /// layer change (see [`LayerView::names`]); not while copying up.
    pub fn changing_names(&self) -> RwLockReadGuard<'_, ()> {
        self.view.names.read().unwrap()
    }

    /// Links this object (copied up first) as `name` in directory `dir`.
    pub fn link(
        self: &Arc<Self>,
        cx: Ctx<'_>,
        layers: &Layers,
        dir: &Arc<LayerObj>,
        name: &OsStr,
    ) -> io::Result<LayerObj> {
        let u = self.upper(cx, layers)?.fd(cx)?;
        // The view's count of a file kept in the index goes up too: first,
        // so that a failure leaves it high, never low (see `lose_name`).
        let names = logical_nlink(u.as_fd(), &hostfs::stat(u.as_fd())?)?;
        if let Some(n) = names {
            set_nlink(u.as_fd(), n + 1)?;
        }
        let new = dir
            .create(cx, layers, name, |d, n| hostfs::link(u.as_fd(), d, n))
            .inspect_err(|_| {
                // Unless the link was made and a later step failed.
                let linked = || {
                    let dir = dir.upper_now(layers)?;
                    let there =
                        hostfs::stat_at(dir.dir().ok()?.as_fd(), &hostfs::component(name).ok()?);
                    Some(there.ok()?.st_ino == hostfs::stat(u.as_fd()).ok()?.st_ino)
                };
                if let Some(n) = names.filter(|_| linked() != Some(true)) {
                    let _ = set_nlink(u.as_fd(), n);
                }
            })?;
        Ok(new)
    }
}

/// Removes the whiteouts left in an upper directory that is empty in the
/// merged view, so that the host can remove or replace it.
fn clear_whiteouts(dir: &OwnedFd) -> io::Result<()> {
    for e in hostfs::read_dir_all(dir.as_fd())? {
        hostfs::unlink(
            dir.as_fd(),
            &hostfs::component(OsStr::from_bytes(&e.name))?,
            false,
        )?;
    }
    Ok(())
}

/// Removes `name` in `dir` and everything below it.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let fd = hostfs::open_node(dir, name)?;
    if is_dir(&hostfs::stat(fd.as_fd())?) {
        for e in hostfs::read_dir_all(fd.as_fd())? {
            remove_tree(fd.as_fd(), &hostfs::component(OsStr::from_bytes(&e.name))?)?;
        }
        hostfs::unlink(dir, name, true)
    } else {
        hostfs::unlink(dir, name, false)
    }
}
