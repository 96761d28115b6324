//! Sees changes made to the source behind the mount's back, so that the
//! kernel may cache names and attributes for long.
//!
//! Every change through the mount updates or invalidates what the kernel
//! caches; a change made to the source directly (the mountpoint is
//! elsewhere, a descriptor or a mount namespace predates the mount) does
//! not, and used to go unseen for as long as the kernel caches
//! (`cache_timeout_ms`). The watch puts a fanotify mark on each directory
//! of main the kernel knows, through main or through a snapshot or branch
//! that shows it (evictable: it goes with the inode once the worker lets go
//! of it) and, for each change made by another process, asks the kernel to
//! drop the name (FUSE_NOTIFY_INVAL_ENTRY) and the changed inode's
//! attributes and pages (FUSE_NOTIFY_INVAL_INODE), in main and in every
//! snapshot and branch that shares the inode ([`FsCore::nodes_showing_main`]):
//! changes behind the mount are not preserved, so they show there too.
//!
//! Events are read in batches ([`BATCH`]): the worker's own changes, which
//! the kernel already knows about, also make events, and waking up for
//! each would cost as much as a request. Each invalidation is sent again
//! [`REPEAT`] later: a lookup the worker answered just before the change
//! may reach the kernel's cache only after the first invalidation, which
//! then found nothing to drop. The queue is unlimited; should it overflow
//! anyway (`FAN_Q_OVERFLOW`), every cached name is dropped at once
//! (FUSE_NOTIFY_INC_EPOCH).
//!
//! Not seen: writes through shared memory maps (fanotify reports none),
//! changes in file systems mounted inside the source (only the source's
//! own is watched), and sources on network or FUSE file systems, whose
//! other clients make no events here (no watch at all: [`SourceWatch::new`]
//! refuses them).

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};

use crate::core::{FsCore, NodeId};
use crate::hostfs::{HostHandle, Stat};
use crate::trim::Trimmer;

/// How long the watch gathers events before acting on them. Each wake-up
/// costs about as much as a FUSE request; at 5 ms the watch thread took 2 %
/// of the worker's CPU time in 5 000 creates, stats and unlinks (its own
/// events), at 20 ms a quarter of that.
const BATCH: Duration = Duration::from_millis(20);

/// When an invalidation is sent again.
const REPEAT: Duration = Duration::from_millis(200);

/// Invalidations waiting for their second sending, at most (a bound on
/// memory; a burst past it goes without its second round).
const MAX_REPEATS: usize = 100_000;

/// What a directory's mark reports: changes of its names, and of the
/// attributes and data of the directory and of its children.
const MASK: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ATTRIB
    | libc::FAN_MODIFY
    | libc::FAN_ONDIR
    | libc::FAN_EVENT_ON_CHILD;

/// Magic numbers (`statfs` f_type) of file systems changed by other
/// machines or processes that make no fanotify events here.
const UNWATCHABLE: [i64; 10] = [
    0x6969,      // NFS
    0xff53_4d42, // CIFS
    0xfe53_4d42, // SMB2
    0x0102_1997, // 9P
    0x6573_5546, // FUSE
    0x00c3_6400, // Ceph
    0x5346_414f, // AFS
    0x6b41_4653, // kAFS
    0x0bd0_0bd0, // Lustre
    0x4750_4653, // GPFS
];

/// Why the source is not watched.
#[derive(Debug, thiserror::Error)]
pub enum Unwatchable {
    /// Its file system is changed by others without events here.
    #[error("its file system (type {0:#x}) is changed by other machines without events here")]
    Remote(i64),
    /// fanotify refused.
    #[error("fanotify: {0}")]
    Fanotify(io::Error),
}

/// The fanotify group watching main's directories.
pub struct SourceWatch {
    fan: OwnedFd,
    /// The marked directories' inode numbers by handle: events name
    /// directories by handle, and one removed behind the mount's back can
    /// no longer be opened by it.
    dirs: Mutex<Dirs>,
    /// Events made by the worker itself are skipped.
    me: i32,
    /// The source's file system: marks elsewhere would report handles the
    /// worker cannot resolve.
    fsid: [i32; 2],
    dev: u64,
}

#[derive(Default)]
struct Dirs {
    by_handle: HashMap<HostHandle, u64>,
    by_ino: HashMap<u64, HostHandle>,
}

/// One thing the kernel must forget.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Inval {
    /// A name in main: dropped.
    Entry(NodeId, OsString),
    /// A name in a snapshot or branch: expired, so that the kernel looks
    /// it up again at its next use. Dropping it would detach what is
    /// mounted on it, and the view may have its own object at that name,
    /// which did not change.
    Expire(NodeId, OsString),
    /// Attributes and every cached page.
    Inode(NodeId),
    /// Attributes only: the file's content did not change.
    Attrs(NodeId),
}

impl SourceWatch {
    /// A watch for the source behind `source`, or why there is none.
    pub fn new(source: BorrowedFd<'_>) -> Result<SourceWatch, Unwatchable> {
        let fs = {
            let mut s = std::mem::MaybeUninit::<libc::statfs>::uninit();
            // SAFETY: valid descriptor and out-pointer.
            if unsafe { libc::fstatfs(source.as_raw_fd(), s.as_mut_ptr()) } < 0 {
                return Err(Unwatchable::Fanotify(io::Error::last_os_error()));
            }
            // SAFETY: filled on success.
            unsafe { s.assume_init() }
        };
        if UNWATCHABLE.contains(&(fs.f_type as i64)) {
            return Err(Unwatchable::Remote(fs.f_type as i64));
        }
        // SAFETY: fsid_t is `struct { int val[2]; }` (libc keeps the
        // field private).
        let fsid: [i32; 2] = unsafe { std::mem::transmute(fs.f_fsid) };
        // SAFETY: plain system call; the result is checked.
        let fan = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    // The worker's own changes make events too; a queue that
                    // overflowed would make the kernel forget every name.
                    | libc::FAN_UNLIMITED_QUEUE
                    | libc::FAN_UNLIMITED_MARKS
                    | libc::FAN_REPORT_FID
                    | libc::FAN_REPORT_DFID_NAME
                    | libc::FAN_NONBLOCK
                    | libc::FAN_CLOEXEC,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u32,
            )
        };
        if fan < 0 {
            return Err(Unwatchable::Fanotify(io::Error::last_os_error()));
        }
        // SAFETY: fanotify_init returned a new descriptor.
        let fan = unsafe { OwnedFd::from_raw_fd(fan) };
        let st = crate::hostfs::stat(source).map_err(Unwatchable::Fanotify)?;
        let watch = SourceWatch {
            fan,
            dirs: Mutex::default(),
            me: std::process::id() as i32,
            fsid,
            dev: st.st_dev,
        };
        watch.watch(source, &st).map_err(Unwatchable::Fanotify)?;
        Ok(watch)
    }

    /// Watches directory `dir` of main (whose attributes are `st`).
    /// Directories of other file systems mounted inside the source are not
    /// watched.
    pub fn watch(&self, dir: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
        if st.st_dev != self.dev {
            return Ok(());
        }
        let handle = crate::hostfs::handle_of(dir)?;
        {
            let mut dirs = self.dirs.lock().unwrap();
            dirs.by_handle.insert(handle.clone(), st.st_ino);
            dirs.by_ino.insert(st.st_ino, handle);
        }
        // fanotify_mark takes no O_PATH descriptor as the object itself,
        // but looks names up from one: "." is the directory.
        // SAFETY: valid descriptors and a NUL-terminated path.
        let r = unsafe {
            libc::fanotify_mark(
                self.fan.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_EVICTABLE | libc::FAN_MARK_ONLYDIR,
                MASK,
                dir.as_raw_fd(),
                c".".as_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The kernel forgot main's inode `ino` on device `dev` (a directory
    /// or not).
    pub fn forgotten(&self, dev: u64, ino: u64) {
        if dev != self.dev {
            return;
        }
        let mut dirs = self.dirs.lock().unwrap();
        if let Some(h) = dirs.by_ino.remove(&ino) {
            dirs.by_handle.remove(&h);
        }
    }

    /// Whether main's directory `ino` is marked.
    pub fn is_watched(&self, ino: u64) -> bool {
        self.dirs.lock().unwrap().by_ino.contains_key(&ino)
    }

    /// The nodes showing the inode behind `handle`: main's, if the kernel
    /// knows it, and those of snapshots and branches; a marked directory's
    /// found by its number, anything else by opening it.
    fn nodes_of(&self, handle: &HostHandle, core: &FsCore) -> (Option<NodeId>, Vec<NodeId>) {
        let dir = self.dirs.lock().unwrap().by_handle.get(handle).copied();
        match dir.or_else(|| {
            core.main_ino_of(handle)
                .and_then(|(dev, ino)| (dev == self.dev).then_some(ino))
        }) {
            Some(ino) => core.nodes_showing_main(self.dev, ino),
            None => (None, Vec::new()),
        }
    }

    /// Reads events on a thread of its own until `core` goes, sending the
    /// invalidations through `notifier` (and the epoch through `fuse`);
    /// `names` tells the nodes the kernel knows by name.
    pub fn start(
        self: Arc<Self>,
        core: Weak<FsCore>,
        names: Arc<Trimmer>,
        notifier: Notifier,
        fuse: OwnedFd,
    ) -> io::Result<()> {
        std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || self.run(core, &names, notifier, fuse))
            .map(drop)
    }

    fn run(&self, core: Weak<FsCore>, names: &Trimmer, notifier: Notifier, fuse: OwnedFd) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut repeats: Vec<(Instant, Inval)> = Vec::new();
        loop {
            let wait = repeats
                .first()
                .map(|(due, _)| due.saturating_duration_since(Instant::now()));
            if let Err(e) = self.wait(wait) {
                tracing::error!(
                    "the source watch stops ({e}): changes behind the mount's back show \
                     within the cache timeout from now on"
                );
                return;
            }
            std::thread::sleep(BATCH);
            let Some(core) = core.upgrade() else { return };
            let mut now: HashSet<Inval> = HashSet::new();
            let mut overflow = false;
            loop {
                // SAFETY: buf is valid for its length.
                let n =
                    unsafe { libc::read(self.fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                overflow |= self.parse(&buf[..n as usize], &core, names, &mut now);
            }
            if overflow {
                // Not with an unlimited queue; should it happen anyway.
                tracing::warn!(
                    "the source watch lost events: every cached name is looked up again"
                );
                new_epoch(fuse.as_fd());
            }
            let due = Instant::now() + REPEAT;
            for inval in now {
                if !send(&notifier, fuse.as_fd(), &inval) {
                    return;
                }
                // Past the bound, a burst goes without its second round.
                if repeats.len() < MAX_REPEATS {
                    repeats.push((due, inval));
                }
            }
            let ripe = repeats.partition_point(|(due, _)| *due <= Instant::now());
            for (_, inval) in repeats.drain(..ripe) {
                if !send(&notifier, fuse.as_fd(), &inval) {
                    return;
                }
            }
        }
    }

    /// Waits until an event is there, or for `limit`.
    fn wait(&self, limit: Option<Duration>) -> io::Result<()> {
        let timeout = limit.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
        let mut p = libc::pollfd {
            fd: self.fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut p, 1, timeout) } {
            r if r >= 0 => Ok(()),
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Adds to `out` what the events in `buf` make the kernel forget; true
    /// if the queue overflowed.
    fn parse(
        &self,
        mut buf: &[u8],
        core: &FsCore,
        names: &Trimmer,
        out: &mut HashSet<Inval>,
    ) -> bool {
        const META: usize = std::mem::size_of::<libc::fanotify_event_metadata>();
        let mut overflow = false;
        while buf.len() >= META {
            // SAFETY: at least META bytes; read_unaligned copes with any
            // alignment.
            let m: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            let len = m.event_len as usize;
            if len < META || len > buf.len() {
                break;
            }
            let (event, rest) = buf.split_at(len);
            buf = rest;
            if m.mask & libc::FAN_Q_OVERFLOW != 0 {
                overflow = true;
                continue;
            }
            if m.pid == self.me {
                continue;
            }
            self.resolve(
                &event[(m.metadata_len as usize).min(len)..],
                m.mask,
                core,
                names,
                out,
            );
        }
        overflow
    }

    /// The invalidations of one event from its info records.
    fn resolve(
        &self,
        mut info: &[u8],
        mask: u64,
        core: &FsCore,
        names: &Trimmer,
        out: &mut HashSet<Inval>,
    ) {
        let names_changed = mask
            & (libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO)
            != 0;
        // A file whose name went, or was renamed over, changed too (its
        // link count, its ctime), which fsnotify tells only marks on the
        // file itself: its node is found by the name the kernel knew it by.
        let file_left = mask & (libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO) != 0
            && mask & libc::FAN_ONDIR == 0;
        while info.len() >= 4 {
            let kind = info[0];
            let len = (u16::from_ne_bytes([info[2], info[3]]) as usize).clamp(4, info.len());
            let (record, rest) = info.split_at(len);
            info = rest;
            let is_dir = matches!(
                kind,
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME | libc::FAN_EVENT_INFO_TYPE_DFID
            );
            // header (4), fsid (8), handle_bytes (4), handle_type (4),
            // handle, then for a directory record the name (NUL-ended)
            if !(is_dir || kind == libc::FAN_EVENT_INFO_TYPE_FID)
                || record.len() < 20
                || [read_i32(record, 4), read_i32(record, 8)] != self.fsid
            {
                continue;
            }
            let size = read_i32(record, 12) as usize;
            let Some(bytes) = record.get(20..20 + size) else {
                continue;
            };
            let name = if is_dir {
                &record[20 + size..]
            } else {
                &[][..]
            };
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            // A directory's record with a child's name matters when names
            // changed (the child's own change comes with its FID record);
            // with "." (or none) the event is the directory's own.
            let child = !name.is_empty() && name != b".";
            if is_dir && child && !names_changed {
                continue;
            }
            let Some(handle) = HostHandle::new(read_i32(record, 16), bytes.to_vec()) else {
                continue;
            };
            let (main, views) = self.nodes_of(&handle, core);
            let name = OsStr::from_bytes(name);
            for (node, in_view) in main
                .map(|m| (m, false))
                .into_iter()
                .chain(views.into_iter().map(|v| (v, true)))
            {
                if is_dir && child {
                    out.insert(match in_view {
                        false => Inval::Entry(node, name.to_owned()),
                        true => Inval::Expire(node, name.to_owned()),
                    });
                    if let Some(file) = names.node_named(node.0, name).filter(|_| file_left) {
                        out.insert(Inval::Attrs(NodeId(file)));
                    }
                }
                // Attributes and pages (a directory's listing).
                out.insert(Inval::Inode(node));
            }
        }
    }
}

fn read_i32(b: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

/// Sends one invalidation; false once the connection is gone.
fn send(notifier: &Notifier, fuse: BorrowedFd<'_>, inval: &Inval) -> bool {
    let r = match inval {
        Inval::Entry(dir, name) => notifier.inval_entry(INodeNo(dir.0), name),
        Inval::Expire(dir, name) => crate::mount::notify_expire_entry(fuse, dir.0, name),
        Inval::Inode(node) => notifier.inval_inode(INodeNo(node.0), 0, 0),
        // A negative offset: no page.
        Inval::Attrs(node) => notifier.inval_inode(INodeNo(node.0), -1, 0),
    };
    match r {
        // ENOENT: the kernel holds no such name or node (any more).
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
        // The connection is gone: the mount with it.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENODEV | libc::EBADF | libc::ENOTCONN)
            ) =>
        {
            tracing::debug!("source watch stops: {e}");
            false
        }
        Err(e) => {
            tracing::warn!("the source watch could not invalidate a cached entry: {e}");
            true
        }
    }
}

/// Makes the kernel look every cached name up again.
pub fn new_epoch(fuse: BorrowedFd<'_>) {
    if let Err(e) = crate::mount::notify_bare(fuse, crate::mount::FUSE_NOTIFY_INC_EPOCH) {
        tracing::error!(
            "cannot make the kernel drop its cached names ({e}; FUSE_NOTIFY_INC_EPOCH needs \
             Linux 6.16): changes behind the mount may go unseen for cache_timeout_ms"
        );
    }
}
