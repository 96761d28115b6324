//! The FUSE adapter: decodes each kernel request (via fuser), calls FsCore,
//! and encodes the answer. No file system logic lives here: only the mapping
//! between FUSE types and FsCore types, and the kernel-facing settings
//! (timeouts, init flags).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use std::sync::Arc;

use crate::core::{Caller, DirHandle, Entry, FileHandle, FsCore, NodeId, SetAttr, SetIdBits, Time};
use crate::hostfs::{Stat, XattrReply};
use crate::passthrough::{Open, Passthrough};
use crate::trim::Trimmer;

/// The FOPEN flags of an open with the caller's `flags`, answered `how`.
///
/// Cached opens keep the kernel's page cache across opens when they may: a
/// node is one object for good (never re-pointed to another branch's
/// file), every change through the mount updates or invalidates that cache
/// itself, and FUSE_AUTO_INVAL_DATA (see `init`) drops it when the
/// attributes show a change made to the source behind the mount's back.
/// Without it every open dropped the file's cached pages.
///
/// Opens that are not read-write skip FLUSH on close. The worker's FLUSH
/// does nothing (writes go through at once, locks are the kernel's), but
/// the kernel writes an inode's dirty mapped pages back before sending it,
/// so only descriptors that cannot have dirtied pages skip that round
/// trip: a shared writable map needs a descriptor open for reading and
/// writing.
fn fopen_flags(flags: i32, how: Open) -> FopenFlags {
    let mut f = match how {
        Open::Cached { keep_cache: true } => FopenFlags::FOPEN_KEEP_CACHE,
        Open::Cached { keep_cache: false } => FopenFlags::empty(),
        Open::Passthrough {
            direct_io: true, ..
        } => FopenFlags::FOPEN_DIRECT_IO,
        Open::Passthrough { .. } => FopenFlags::empty(),
    };
    if flags & libc::O_ACCMODE != libc::O_RDWR {
        f |= FopenFlags::FOPEN_NOFLUSH;
    }
    f
}

/// Kernel-facing tuning of a mount.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Largest WRITE request the kernel may send.
    pub max_write: u32,
    /// Background requests the kernel may keep in flight (at least 1).
    pub max_background: u16,
    /// How long the kernel may keep names and attributes below the root.
    /// Every change through the mount updates or invalidates what it
    /// changes, and the source watch ([`crate::watch`]) what others change
    /// behind the mount's back, so this only bounds how long a change the
    /// watch does not see can go unseen (config `cache_timeout_ms`).
    pub cache_timeout: Duration,
    /// Whether the kernel may also remember, for `cache_timeout`, that a
    /// name is absent: only where a name made in the source behind the
    /// mount's back is seen (the watch runs, or the mount hides the source);
    /// elsewhere it would be listed by readdir yet not found for that long.
    pub remember_absence: bool,
}

/// The `fuser::Filesystem` implementation: FsCore behind the FUSE protocol.
pub struct Adapter {
    core: Arc<FsCore>,
    tuning: Tuning,
    trim: Arc<Trimmer>,
    passthrough: Passthrough,
    /// The kernel refused FUSE_HANDLE_KILLPRIV_V2 and clears set-id bits
    /// itself. Assumed granted after a takeover (no FUSE_INIT then): the
    /// only cost of being wrong is clearing them twice.
    kernel_clears_set_id: bool,
}

impl Adapter {
    /// Serves `core` with the given kernel tuning, telling `trim` the
    /// names the kernel learns, opening files through `passthrough`.
    pub fn new(
        core: Arc<FsCore>,
        tuning: Tuning,
        trim: Arc<Trimmer>,
        passthrough: Passthrough,
    ) -> Adapter {
        Adapter {
            core,
            tuning,
            trim,
            passthrough,
            kernel_clears_set_id: false,
        }
    }

    /// What a change of file data by `req`'s caller does to set-id bits,
    /// for changes the kernel does not flag (fallocate, copy_file_range).
    fn set_id_unflagged(&self, req: &Request) -> SetIdBits {
        if self.kernel_clears_set_id {
            SetIdBits::Keep
        } else {
            SetIdBits::ClearUnlessCapable(req.pid())
        }
    }

    /// How `node`'s new open file `fh` is answered (see `passthrough`).
    fn how(&self, node: NodeId, fh: FileHandle, flags: i32) -> io::Result<Open> {
        self.passthrough.open(&self.core, node, fh, flags)
    }

    /// Replies with a new name's entry, which the trimmer learns unless it
    /// is a directory's.
    fn entry(&self, reply: ReplyEntry, parent: INodeNo, name: &OsStr, r: io::Result<Entry>) {
        let crowded = r.as_ref().is_ok_and(|e| self.learn(parent, name, e));
        self.reply_entry(reply, parent, name, r);
        if crowded {
            self.trim.throttle();
        }
    }

    /// Names changed in the directory `parent` of the request, served as
    /// `at` (what [`Adapter::at`] gave). The mount root of a process bound
    /// to a branch is that branch's root, which the kernel, reaching it by
    /// path (`.agentfs/branches/<name>/`), takes for another directory and
    /// caches names and absences of: they go before the reply, so that the
    /// path shows the change at once.
    fn changed_names(&self, parent: INodeNo, at: NodeId, names: &[&OsStr]) {
        if node(parent) == NodeId::ROOT && at != NodeId::ROOT {
            self.trim.forget_now(at.0, names);
        }
    }

    /// [`Adapter::changed_names`] for a rename whose other directory is
    /// `other` (as the kernel names it). When that is the branch's root by
    /// path itself, the request holds that directory's lock in the kernel
    /// until the reply, so the names can only go right after it.
    fn renamed_names(&self, parent: INodeNo, at: NodeId, other: INodeNo, names: &[&OsStr]) {
        if node(parent) == NodeId::ROOT && at != NodeId::ROOT && node(other) == at {
            for name in names {
                self.trim.forget_soon(at.0, name);
            }
        } else {
            self.changed_names(parent, at, names);
        }
    }

    /// Tells the trimmer the name of a new entry; true if the session
    /// thread should [`Trimmer::throttle`] after replying.
    fn learn(&self, parent: INodeNo, name: &OsStr, e: &Entry) -> bool {
        if e.stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
            self.trim.named(e.node.0, parent.0, name);
        }
        self.trim.counted(self.core.load())
    }

    /// The node a request on `ino` acts on: the mount root is the root of
    /// the caller's branch (contract 2.4); every other node is itself, or
    /// EACCES under strict isolation if it is not the caller's. Every
    /// request that names a node passes here, except those that only let
    /// go of one (forget, flush, release).
    fn at(&self, req: &Request, ino: INodeNo) -> io::Result<NodeId> {
        self.core.route(node(ino), req.pid())
    }

    fn attr_ttl(&self, node: NodeId) -> Duration {
        if self.core.attr_cacheable(node) {
            self.tuning.cache_timeout
        } else {
            Duration::ZERO
        }
    }

    /// How long the kernel may cache a name in `parent` (see
    /// [`FsCore::names_cacheable`]).
    fn entry_ttl(&self, parent: INodeNo, name: &OsStr, e: &Entry) -> Duration {
        if e.cacheable && self.core.names_cacheable(node(parent), name) {
            self.tuning.cache_timeout
        } else {
            Duration::ZERO
        }
    }

    /// Names and attributes are cached for their own times: a name in the
    /// root is looked up again on every walk, but the node it gives keeps
    /// its attributes (they are the node's, whoever asked). Without that,
    /// every absolute path cost a GETATTR of its first component.
    fn reply_entry(&self, reply: ReplyEntry, parent: INodeNo, name: &OsStr, r: io::Result<Entry>) {
        match r {
            Ok(e) => reply.entry_with_ttls(
                &self.attr_ttl(e.node),
                &self.entry_ttl(parent, name, &e),
                &attr(e.node, &e.stat),
                Generation(e.generation),
            ),
            Err(e) => reply.error(err(e)),
        }
    }
}

fn err(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn caller(req: &Request, umask: u32) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        umask,
    }
}

fn node(ino: INodeNo) -> NodeId {
    NodeId(ino.0)
}

fn system_time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        // secs is negative, nsecs counts forward from it.
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn dirent_type(d_type: u8) -> FileType {
    match d_type {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// FUSE attributes of node `id`. fuser sends `ino` as the node id in entry
/// replies and the kernel shows it as `st_ino`, so it is the node id
/// (the host inode number, see `core`), except for the root, whose id is
/// fixed at 1 by FUSE and which shows its host number.
fn attr(id: NodeId, st: &Stat) -> FileAttr {
    let ino = if id == NodeId::ROOT { st.st_ino } else { id.0 };
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The kernel marks requests it sends again (FUSE_NOTIFY_RESEND after a
/// takeover) with this bit of `unique`.
const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

/// Whether the kernel sent `req` again after the previous worker died.
fn resent(req: &Request) -> bool {
    req.unique().0 & FUSE_UNIQUE_RESEND != 0
}

/// A request sent again after the previous worker died may have been
/// carried out by it, which then answers `errno` (EEXIST for a creation,
/// ENOENT for a removal or rename). Such an answer to a resent request
/// means it is done: `done` gives the result it had (specs/semantics.md,
/// "Worker crashes").
fn unless_done<T>(
    req: &Request,
    r: io::Result<T>,
    errno: i32,
    done: impl FnOnce() -> io::Result<T>,
) -> io::Result<T> {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) && resent(req) => {
            tracing::info!(
                request = req.unique().0,
                "a resent request was done before the takeover"
            );
            done()
        }
        r => r,
    }
}

fn reply_empty(reply: ReplyEmpty, r: io::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

fn reply_xattr(reply: ReplyXattr, r: io::Result<XattrReply>) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n as u32),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(err(e)),
    }
}

fn time(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::Now => Time::Now,
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => Time::At(d.as_secs() as i64, d.subsec_nanos()),
            // fuser 0.18 decodes a kernel time (-s, ns) as EPOCH - (s + ns),
            // not EPOCH - s + ns (see its time.rs); undo exactly that so
            // pre-1970 times keep their nanoseconds. Guarded by the
            // `chmod_chown_and_times_with_nanoseconds` test.
            Err(e) => Time::At(
                -(e.duration().as_secs() as i64),
                e.duration().subsec_nanos(),
            ),
        },
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_write(self.tuning.max_write) {
            tracing::info!("kernel limits max_write to {max}");
            let _ = config.set_max_write(max);
        }
        // Congestion at three quarters, as the kernel's own default.
        let background = self.tuning.max_background.max(1);
        let _ = config.set_max_background(background);
        let _ = config.set_congestion_threshold((background / 4 * 3).max(1));
        // The kernel enforces POSIX ACLs (read through getxattr, cached) and,
        // with DONT_MASK, leaves the umask to us, so that the host applies a
        // directory's default ACL instead of the umask, as a local file
        // system does.
        let acl = InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK;
        if let Err(missing) = config.add_capabilities(acl) {
            tracing::warn!("kernel lacks {missing:?}: POSIX ACLs are not enforced");
        }
        // Without it the kernel asks for `security.capability` before
        // every write (the worker clears set-id bits instead, `SetIdBits`).
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_err()
        {
            self.kernel_clears_set_id = true;
        }
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA) {
            tracing::warn!(
                "kernel lacks {missing:?}: cached file pages outlive changes made to the source behind the mount"
            );
        }
        if self.passthrough.wanted() {
            // Depth 1: backing files on a plain file system, and this
            // mount can still be a lower layer of an overlay.
            let granted = config.set_max_stack_depth(1).is_ok()
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            if !granted {
                tracing::warn!(
                    "kernel lacks FUSE passthrough (6.9+): every read and write goes through the worker"
                );
                self.passthrough.disable();
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.at(req, parent).and_then(|p| self.core.lookup(p, name));
        // Under strict isolation a name can lead out of the branch
        // (`.agentfs` in its root): refuse the node found, not just its use.
        let r = r.and_then(|e| match self.core.route(e.node, req.pid()) {
            Ok(_) => Ok(e),
            Err(refused) => {
                self.core.forget(e.node, 1);
                Err(refused)
            }
        });
        match r {
            // A zero node id with a time: the kernel remembers the absence.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
                    && self.tuning.remember_absence
                    && self.core.absence_cacheable(node(parent), name) =>
            {
                // SAFETY: an all-zero `struct stat` is a valid value.
                let none: Stat = unsafe { std::mem::zeroed() };
                let ttl = self.tuning.cache_timeout;
                reply.entry(&ttl, &attr(NodeId(0), &none), Generation(0));
            }
            r => self.entry(reply, parent, name, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if self.core.forget(node(ino), nlookup) {
            self.trim.forgotten(ino.0);
        }
    }

    fn getattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        match self.at(req, ino).and_then(|at| self.core.getattr(at)) {
            Ok(st) => reply.attr(&self.attr_ttl(node(ino)), &attr(node(ino), &st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<fuser::FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        kill_suidgid: bool,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            set_id: if kill_suidgid {
                SetIdBits::Clear
            } else {
                SetIdBits::Keep
            },
        };
        let fh = fh.map(|f| FileHandle(f.0));
        match self
            .at(req, ino)
            .and_then(|at| self.core.setattr(at, fh, change))
        {
            Ok(st) => reply.attr(&self.attr_ttl(node(ino)), &attr(node(ino), &st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.at(req, ino).and_then(|at| self.core.readlink(at)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.at(req, parent).and_then(|p| {
            let r = self.core.mknod(p, name, mode, rdev, caller(req, umask));
            let e = unless_done(req, r, libc::EEXIST, || self.core.lookup(p, name))?;
            self.changed_names(parent, p, &[name]);
            Ok(e)
        });
        self.entry(reply, parent, name, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.at(req, parent).and_then(|p| {
            let r = self.core.mkdir(p, name, mode, caller(req, umask));
            let e = unless_done(req, r, libc::EEXIST, || self.core.lookup(p, name))?;
            self.changed_names(parent, p, &[name]);
            Ok(e)
        });
        self.reply_entry(reply, parent, name, r);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.at(req, parent).and_then(|p| {
            let r = self.core.unlink(p, name);
            unless_done(req, r, libc::ENOENT, || {
                self.core.removed_before_takeover(p, name);
                Ok(())
            })?;
            self.changed_names(parent, p, &[name]);
            Ok(())
        });
        if r.is_ok() {
            self.trim.removed(parent.0, name);
        }
        reply_empty(reply, r);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.at(req, parent).and_then(|p| {
            let r = self.core.rmdir(p, name);
            unless_done(req, r, libc::ENOENT, || {
                self.core.removed_before_takeover(p, name);
                Ok(())
            })?;
            self.changed_names(parent, p, &[name]);
            Ok(())
        });
        reply_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.at(req, parent).and_then(|p| {
            let r = self
                .core
                .symlink(p, link_name, target.as_os_str(), caller(req, 0));
            let e = unless_done(req, r, libc::EEXIST, || self.core.lookup(p, link_name))?;
            self.changed_names(parent, p, &[link_name]);
            Ok(e)
        });
        self.entry(reply, parent, link_name, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.at(req, parent).and_then(|p| {
            let np = self.at(req, newparent)?;
            let r = self.core.rename(p, name, np, newname, flags.bits());
            unless_done(req, r, libc::ENOENT, || {
                self.core.renamed_before_takeover(p, name, np, newname);
                Ok(())
            })?;
            if parent == newparent {
                self.changed_names(parent, p, &[name, newname]);
            } else {
                self.renamed_names(parent, p, newparent, &[name]);
                self.renamed_names(newparent, np, parent, &[newname]);
            }
            Ok(())
        });
        let (ok, exchange) = (r.is_ok(), flags.contains(RenameFlags::RENAME_EXCHANGE));
        if ok {
            self.trim
                .renamed(parent.0, name, newparent.0, newname, exchange);
        }
        reply_empty(reply, r);
        // The kernel moves the renamed entry with the time it was cached
        // for: into a directory whose names it may not cache (the root
        // while anything is bound) it must go.
        if ok {
            let moved = [(newparent, newname)].into_iter();
            for (dir, n) in moved.chain(exchange.then_some((parent, name))) {
                if !self.core.names_cacheable(node(dir), n) {
                    self.trim.forget_soon(dir.0, n);
                }
            }
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.at(req, ino).and_then(|n| {
            let np = self.at(req, newparent)?;
            let r = self.core.link(n, np, newname);
            let e = unless_done(req, r, libc::EEXIST, || self.core.lookup(np, newname))?;
            self.changed_names(newparent, np, &[newname]);
            Ok(e)
        });
        self.entry(reply, newparent, newname, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.at(req, ino).and_then(|n| {
            let new = self.core.open(n, flags.0)?;
            let how = self.how(n, new.fh(), flags.0)?;
            Ok((self.core.hand_out(new), how))
        });
        match r {
            Ok((fh, how @ Open::Cached { .. })) => {
                reply.opened(fuser::FileHandle(fh.0), fopen_flags(flags.0, how))
            }
            Ok((fh, how @ Open::Passthrough { id, .. })) => {
                // SAFETY: `id` is open in this connection until the last
                // file using it is released (`Passthrough::release`), and
                // `into_raw` below keeps this wrapper from closing it.
                let backing = unsafe { reply.wrap_backing(id) };
                let flags = fopen_flags(flags.0, how);
                reply.opened_passthrough(fuser::FileHandle(fh.0), flags, &backing);
                backing.into_raw();
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.at(req, parent).and_then(|p| {
            let r = self.core.create(p, name, mode, flags, caller(req, umask));
            let (e, fh) = unless_done(req, r, libc::EEXIST, || {
                let e = self.core.lookup(p, name)?;
                let again = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
                match self.core.open(e.node, again) {
                    Ok(fh) => Ok((e, fh)),
                    Err(err) => {
                        self.core.forget(e.node, 1);
                        Err(err)
                    }
                }
            })?;
            self.changed_names(parent, p, &[name]);
            match self.how(e.node, fh.fh(), flags) {
                Ok(how) => Ok((e, self.core.hand_out(fh), how)),
                Err(err) => {
                    self.core.forget(e.node, 1);
                    Err(err)
                }
            }
        });
        match r {
            Ok((e, fh, how)) => {
                let crowded = self.learn(parent, name, &e);
                let (ttl, attr, generation) = (
                    self.entry_ttl(parent, name, &e),
                    attr(e.node, &e.stat),
                    Generation(e.generation),
                );
                let (fh, fopen) = (fuser::FileHandle(fh.0), fopen_flags(flags, how));
                match how {
                    Open::Cached { .. } => reply.created(&ttl, &attr, generation, fh, fopen),
                    Open::Passthrough { id, .. } => {
                        // SAFETY: as in `open`.
                        let backing = unsafe { reply.wrap_backing(id) };
                        reply.created_passthrough(&ttl, &attr, generation, fh, fopen, &backing);
                        backing.into_raw();
                    }
                }
                if crowded {
                    self.trim.throttle();
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self
            .at(req, ino)
            .and_then(|_| self.core.read(FileHandle(fh.0), offset, size));
        match r {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let set_id = if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            SetIdBits::Clear
        } else {
            SetIdBits::Keep
        };
        let r = self.at(req, ino).and_then(|_| {
            self.core
                .write(FileHandle(fh.0), offset, data, resent(req), set_id)
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Data is written through to the host on every WRITE; locks are the
        // kernel's own (no FUSE_POSIX_LOCKS), so there is nothing to flush.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.release(&self.core, FileHandle(fh.0));
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .at(req, ino)
            .and_then(|_| self.core.fsync(FileHandle(fh.0), datasync));
        reply_empty(reply, r);
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let r = self.at(req, ino).and_then(|n| {
            let keep = self.core.listing_cacheable(n);
            Ok((self.core.opendir(n)?, keep))
        });
        match r {
            Ok((dh, keep)) => {
                let flags = if keep {
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(fuser::FileHandle(dh.0), flags)
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if let Err(e) = self.at(req, ino) {
            return reply.error(err(e));
        }
        let r = self.core.readdir(DirHandle(fh.0), offset, |e| {
            reply.add(
                INodeNo(e.ino),
                e.next_offset,
                dirent_type(e.d_type),
                OsStr::from_bytes(e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: fuser::FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.releasedir(DirHandle(fh.0));
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self
            .at(req, ino)
            .and_then(|_| self.core.fsyncdir(DirHandle(fh.0), datasync));
        reply_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.at(req, ino)
                .and_then(|n| self.core.setxattr(n, name, value, flags)),
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(
            reply,
            self.at(req, ino)
                .and_then(|n| self.core.getxattr(n, name, size)),
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(
            reply,
            self.at(req, ino).and_then(|n| self.core.listxattr(n, size)),
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.at(req, ino)
                .and_then(|n| self.core.removexattr(n, name)),
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.at(req, ino).and_then(|_| {
            self.core.fallocate(
                FileHandle(fh.0),
                offset,
                length,
                mode,
                self.set_id_unflagged(req),
            )
        });
        reply_empty(reply, r);
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: fuser::FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let r = self
            .at(req, ino)
            .and_then(|_| self.core.lseek(FileHandle(fh.0), offset, whence));
        match r {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: fuser::FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: fuser::FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let r = self.at(req, ino_in).and_then(|_| {
            self.at(req, ino_out)?;
            self.core.copy_file_range(
                (FileHandle(fh_in.0), offset_in),
                (FileHandle(fh_out.0), offset_out),
                len,
                self.set_id_unflagged(req),
            )
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }
}
