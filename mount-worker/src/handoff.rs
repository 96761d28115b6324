//! What a successor needs to keep serving a FUSE connection after this
//! worker dies (specs/semantics.md, "Worker crashes").
//!
//! The supervisor keeps the /dev/fuse descriptor, so the kernel keeps the
//! connection and every node id and file handle it was given. A new worker
//! can only answer for those if it can find their objects again. This
//! journal, in shared memory the supervisor owns (a memfd), records how:
//! a main node by its host file handle, a snapshot node by snapshot and
//! handle, a branch node by its parent node, name and object id, or as
//! removed (found nowhere), each with the
//! lookups the kernel holds on it (its FORGETs carry them all, however
//! many workers answered the lookups); an open file by its
//! node and open flags; a directory stream by its node; the backing file
//! id a node's passthrough opens share (the kernel refuses another one
//! while any is open, `crate::passthrough`); the main files a shared map
//! may still write unseen (`FsCore::maybe_mapped`). A record is
//! written before the reply that hands the id to the kernel, so whatever
//! the kernel holds is in the journal, even if the worker dies right after
//! (an open file's right before, `FsCore::hand_out`: not a handle the
//! kernel never got).
//!
//! Layout: a header page (magic, which half is active, bytes used in each
//! half, and the highest file handle, generation and node id ever recorded,
//! kept even once the journal is full, so that a successor never hands out
//! one of them again; from byte 512 the identity of the mount the
//! supervisor made the connection for) and two halves of length-prefixed
//! records. Once the active half
//! has used half the room its last fold left, a thread folds its records
//! (the last record of each id wins, lookups add up, forgotten ids go)
//! into the other half while appends go on, then copies the records
//! appended meanwhile after them and makes that half active; a crash
//! midway leaves the old half active and whole. A half that fills before
//! the fold ends waits for it (or is folded in place). With a million
//! nodes cached a fold takes seconds: made in place, it held up every
//! request for that long.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use crate::hostfs::HostHandle;

const MAGIC: u64 = u64::from_le_bytes(*b"AGFSHND1");
const HEADER: usize = 4096;

/// Size the supervisor gives the journal: two halves of 64 MiB, a million
/// nodes each at typical handle and name sizes. Pages cost memory only
/// once written, and a half's are given back when it is folded away.
pub const SIZE: u64 = HEADER as u64 + 2 * (64 << 20);

/// How to find one node again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A main inode, by its host file handle.
    Main(HostHandle),
    /// An inode of a snapshot of main.
    Snap {
        /// The snapshot's id.
        snap: u32,
        /// Its epoch.
        epoch: u64,
        /// The inode's host handle.
        handle: HostHandle,
        /// Its host inode number.
        ino: u64,
    },
    /// An object of a branch or a snapshot of a branch: `name` in the
    /// directory with node id `parent`.
    Layer {
        /// Node id of the directory.
        parent: u64,
        /// The name in it.
        name: Vec<u8>,
        /// The object's id in its view, which what is found there must
        /// have: a name can lead to another object by then (None in
        /// records of workers older than this check).
        local: Option<u64>,
    },
    /// An object of a branch whose last name was removed: found nowhere.
    /// Its record stays while the kernel holds the node, so that its id
    /// is never given to another object (the host may give a new file of
    /// the layer its inode number, which the id of a file made in a layer
    /// is made of, and the name too).
    Removed,
}

impl Origin {
    /// Whether an object found now at `self` is the one a predecessor
    /// recorded as `held`: the same, except that a layer record of a
    /// worker older than object ids in records matches by place alone.
    pub fn matches(&self, held: &Origin) -> bool {
        match (self, held) {
            (
                Origin::Layer {
                    parent,
                    name,
                    local,
                },
                Origin::Layer {
                    parent: held_parent,
                    name: held_name,
                    local: None,
                },
            ) => parent == held_parent && name == held_name && local.is_some(),
            _ => self == held,
        }
    }
}

/// Where a file of main or of a snapshot of main was found: the node id
/// of its directory and its name there. Not what the node is (its
/// [`Origin`] says that, and two records of one node may differ here)
/// but how to reach it by a name: a file opened by a bare handle has no
/// path on the host once the host dropped its cached names, and Landlock
/// refuses it ([`crate::hostfs::open_handle_by_name`]).
pub type FoundAt = (u64, Vec<u8>);

/// One change to what the kernel holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The kernel was given node `id` with a generation (the kernel takes
    /// a known id with another generation for a reused one, and fails
    /// every I/O on its old inode): its first lookup. For an id held
    /// already, its new origin (it was renamed); the lookups stay.
    Node {
        id: u64,
        generation: u64,
        origin: Origin,
        /// Where a file of main or of a snapshot of main was found.
        at: Option<FoundAt>,
    },
    /// The kernel was given node `id`, held already, `n` more times.
    Lookup { id: u64, n: u64 },
    /// The kernel forgot `n` lookups of node `id`; at none left, the node.
    Forget { id: u64, n: u64 },
    /// File handle `fh` is node `node` opened with `flags`.
    File { fh: u64, node: u64, flags: i32 },
    /// Directory handle `dh` is a stream of node `node`.
    Dir { dh: u64, node: u64 },
    /// A file or directory handle was released.
    Release(u64),
    /// Node `node`'s passthrough opens use backing file `id`.
    Backing { node: u64, id: u32 },
    /// Node `node`'s backing file was closed.
    Unbacked(u64),
    /// Main file `node` may be written through a shared map that outlived
    /// its descriptor: snapshots ask whether it still is.
    Mapped(u64),
    /// Main file `node` is no longer written through a map.
    Unmapped(u64),
}

/// A node the kernel holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldNode {
    /// Its generation.
    pub generation: u64,
    /// How to find it.
    pub origin: Origin,
    /// Where it was last found, for a file of main or of a snapshot.
    pub at: Option<FoundAt>,
    /// The lookups the kernel holds on it (its FORGETs add up to them).
    /// A successor reads it when it takes the node into its own table,
    /// which counts from then on: it is not kept up to date here.
    pub lookups: u64,
}

/// What the kernel held when the journal was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Node ids.
    pub nodes: HashMap<u64, HeldNode>,
    /// Open file handles: node and open flags.
    pub files: HashMap<u64, (u64, i32)>,
    /// Open directory handles: node.
    pub dirs: HashMap<u64, u64>,
    /// Backing file ids of nodes open for passthrough.
    pub backings: HashMap<u64, u32>,
    /// Main files a shared map may still write.
    pub mapped: HashSet<u64>,
}

impl Held {
    fn apply(&mut self, r: Record) {
        match r {
            Record::Node {
                id,
                generation,
                origin,
                at,
            } => {
                // A first lookup, or a new origin with the lookups kept.
                let lookups = self.nodes.get(&id).map_or(1, |n| n.lookups.max(1));
                let node = HeldNode {
                    generation,
                    origin,
                    at,
                    lookups,
                };
                self.nodes.insert(id, node);
            }
            Record::Lookup { id, n } => {
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.lookups = node.lookups.saturating_add(n);
                }
            }
            Record::Forget { id, n } => {
                self.forget(id, n);
            }
            Record::File { fh, node, flags } => {
                self.files.insert(fh, (node, flags));
            }
            Record::Dir { dh, node } => {
                self.dirs.insert(dh, node);
            }
            Record::Release(h) => {
                self.files.remove(&h);
                self.dirs.remove(&h);
            }
            Record::Backing { node, id } => {
                self.backings.insert(node, id);
            }
            Record::Unbacked(node) => {
                self.backings.remove(&node);
            }
            Record::Mapped(node) => {
                self.mapped.insert(node);
            }
            Record::Unmapped(node) => {
                self.mapped.remove(&node);
            }
        }
    }

    /// Drops `n` lookups of node `id`: whether that was its last, `None`
    /// if it is not held.
    pub fn forget(&mut self, id: u64, n: u64) -> Option<bool> {
        let node = self.nodes.get_mut(&id)?;
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return Some(false);
        }
        self.nodes.remove(&id);
        Some(true)
    }

    fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let nodes = self.nodes.iter().flat_map(|(&id, node)| {
            let more = (node.lookups > 1).then(|| Record::Lookup {
                id,
                n: node.lookups - 1,
            });
            std::iter::once(Record::Node {
                id,
                generation: node.generation,
                origin: node.origin.clone(),
                at: node.at.clone(),
            })
            .chain(more)
        });
        let files = self
            .files
            .iter()
            .map(|(&fh, &(node, flags))| Record::File { fh, node, flags });
        let dirs = self
            .dirs
            .iter()
            .map(|(&dh, &node)| Record::Dir { dh, node });
        let backings = self
            .backings
            .iter()
            .map(|(&node, &id)| Record::Backing { node, id });
        let mapped = self.mapped.iter().map(|&node| Record::Mapped(node));
        nodes.chain(files).chain(dirs).chain(backings).chain(mapped)
    }

    /// The largest generation held (new ones go above it).
    pub fn max_generation(&self) -> u64 {
        self.nodes.values().map(|n| n.generation).max().unwrap_or(0)
    }

    /// The largest file or directory handle held (new ones go above it).
    pub fn max_handle(&self) -> u64 {
        self.files
            .keys()
            .chain(self.dirs.keys())
            .copied()
            .max()
            .unwrap_or(0)
    }
}

/// The highest ids a predecessor handed out (header words, kept even for
/// records a full journal dropped): a successor starts above them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HighWater {
    /// File and directory handles.
    pub handle: u64,
    /// Node generations.
    pub generation: u64,
    /// Node ids.
    pub node: u64,
}

/// Header words of the high-water marks.
const MARK_HANDLE: usize = 4;
const MARK_GENERATION: usize = 5;
const MARK_NODE: usize = 6;

/// The journal, mapped.
pub struct Journal {
    shared: Arc<Shared>,
}

/// The mapping, shared by the workers' threads and the fold thread.
struct Shared {
    base: *mut u8,
    len: usize,
    /// Serialises appends, the switch of halves and folds made in place.
    writer: Mutex<Writer>,
    /// Wakes the fold thread (a fold is wanted) and appenders that wait
    /// for it to end (their half is full).
    folding: Condvar,
    fd: OwnedFd,
}

struct Writer {
    /// False once the journal is full even when folded.
    enabled: bool,
    fold: Fold,
    /// Bytes the active half held when it became active (a fold's
    /// result): the next fold is wanted once half the room left after
    /// them is used, not at a fixed mark a big fold may already pass.
    folded: usize,
}

/// Where the fold in the background stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fold {
    Idle,
    /// The active half is half full: the fold thread is to start.
    Wanted,
    /// The fold thread writes the other half, or gives the memory of the
    /// half it folded away back.
    Running,
    /// Its result did not fit: the next fold is made in place, when the
    /// active half is full.
    Failed,
    /// The journal was dropped: the fold thread ends.
    Closed,
}

// SAFETY: the mapping is written by appenders under `writer`, and by the
// fold thread in the inactive half only, which nothing else touches while
// a fold runs; the header words are atomics.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Drop for Journal {
    /// Waits for a fold in progress and stops the fold thread: nothing
    /// writes the journal once its owner lets it go (a successor in the
    /// same process, as in tests, may open it next).
    fn drop(&mut self) {
        let j = &*self.shared;
        let mut w = j.writer.lock().unwrap();
        while w.fold == Fold::Running {
            w = j.folding.wait(w).unwrap();
        }
        w.fold = Fold::Closed;
        j.folding.notify_all();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Journal {
    /// Maps the journal in `fd`. A new connection (`resume` false) starts
    /// it empty; a takeover reads what the predecessor left, folds it into
    /// a fresh half and returns it. Starts the thread that folds it in
    /// the background.
    pub fn open(fd: OwnedFd, resume: bool) -> io::Result<(Journal, Held)> {
        let st = nix::sys::stat::fstat(&fd)?;
        let len = st.st_size as usize;
        if len < HEADER + 2 * 4096 {
            return Err(io::Error::other(format!(
                "the handoff journal is {len} bytes, too small"
            )));
        }
        // SAFETY: a shared mapping of a file this process owns, of its size.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut j = Shared {
            base: base.cast(),
            len,
            writer: Mutex::new(Writer {
                enabled: true,
                fold: Fold::Idle,
                folded: 0,
            }),
            folding: Condvar::new(),
            fd,
        };
        let held = if resume {
            if j.word(0).load(Ordering::Acquire) != MAGIC {
                return Err(io::Error::other(
                    "the handoff journal was never written: nothing to take over",
                ));
            }
            let held = j.read(j.active(), usize::MAX);
            let fits = j.fold_into(&held, 1 - j.active());
            let folded = j.used(j.active()).load(Ordering::Relaxed) as usize;
            let w = j.writer.get_mut().unwrap();
            if fits {
                w.folded = folded;
            } else {
                tracing::error!(
                    "handoff journal full even when folded; later ids cannot be taken over"
                );
                w.enabled = false;
            }
            held
        } else {
            j.used(0).store(0, Ordering::Relaxed);
            j.used(1).store(0, Ordering::Relaxed);
            j.active_word().store(0, Ordering::Relaxed);
            for w in [MARK_HANDLE, MARK_GENERATION, MARK_NODE] {
                j.word(w).store(0, Ordering::Relaxed);
            }
            j.word(0).store(MAGIC, Ordering::Release);
            Held::default()
        };
        let shared = Arc::new(j);
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("handoff-fold".into())
            .spawn(move || fold_in_background(weak))?;
        Ok((Journal { shared }, held))
    }

    /// The highest ids ever recorded, by this worker and its predecessors.
    pub fn high_water(&self) -> HighWater {
        let w = |i| self.shared.word(i).load(Ordering::Acquire);
        HighWater {
            handle: w(MARK_HANDLE),
            generation: w(MARK_GENERATION),
            node: w(MARK_NODE),
        }
    }

    /// Appends one record. Once the active half is half full its records
    /// are folded into the other half in the background, so that appends
    /// (made under the worker's node table) never wait for a fold of a
    /// million nodes; a half that fills before the fold ends waits for it,
    /// or is folded in place.
    pub fn append(&self, r: &Record) {
        let j = &*self.shared;
        // Marks first, and even when the records no longer fit.
        match *r {
            Record::Node { id, generation, .. } => {
                j.word(MARK_NODE).fetch_max(id, Ordering::AcqRel);
                j.word(MARK_GENERATION)
                    .fetch_max(generation, Ordering::AcqRel);
            }
            Record::File { fh: h, .. } | Record::Dir { dh: h, .. } => {
                j.word(MARK_HANDLE).fetch_max(h, Ordering::AcqRel);
            }
            _ => {}
        }
        let mut w = j.writer.lock().unwrap();
        if !w.enabled {
            return;
        }
        let rec = encode(r);
        if !j.put(j.active(), &rec) {
            while w.fold == Fold::Running {
                w = j.folding.wait(w).unwrap();
            }
            let active = j.active();
            if j.put(active, &rec) {
                return;
            }
            let held = j.read(active, usize::MAX);
            let folded = j.fold_into(&held, 1 - active);
            if folded {
                w.fold = Fold::Idle;
                w.folded = j.used(1 - active).load(Ordering::Relaxed) as usize;
            }
            if !(folded && j.put(1 - active, &rec)) {
                tracing::error!(
                    "handoff journal full: ids handed out from now on cannot be taken over after a crash"
                );
                w.enabled = false;
                return;
            }
        }
        let used = j.used(j.active()).load(Ordering::Relaxed) as usize;
        if w.fold == Fold::Idle && used - w.folded > (j.half_len() - w.folded) / 2 {
            w.fold = Fold::Wanted;
            j.folding.notify_all();
        }
    }
}

/// The fold thread: waits for a fold to be wanted, folds the records of
/// the active half written so far into the other half without holding
/// the writer, then, holding it, copies the records appended meanwhile
/// after them and makes that half the active one. Ends with the journal.
fn fold_in_background(weak: Weak<Shared>) {
    while let Some(j) = weak.upgrade() {
        let (active, upto) = {
            let w = j.writer.lock().unwrap();
            let (mut w, _) = j
                .folding
                .wait_timeout_while(w, Duration::from_secs(1), |w| {
                    !matches!(w.fold, Fold::Wanted | Fold::Closed)
                })
                .unwrap();
            match w.fold {
                Fold::Wanted => {}
                Fold::Closed => return,
                _ => continue,
            }
            w.fold = Fold::Running;
            let active = j.active();
            (active, j.used(active).load(Ordering::Acquire) as usize)
        };
        let held = j.read(active, upto);
        let folded = j.write_half(&held, 1 - active);
        let mut w = j.writer.lock().unwrap();
        let done = folded && j.copy_tail(active, upto, 1 - active);
        if !done {
            w.fold = Fold::Failed;
            j.folding.notify_all();
            continue;
        }
        j.active_word().store(1 - active as u32, Ordering::Release);
        w.folded = j.used(1 - active).load(Ordering::Relaxed) as usize;
        // Still Running: no fold in place may write the old half while
        // its pages are punched out, which takes a while for 64 MiB.
        drop(w);
        j.release_half(active);
        let mut w = j.writer.lock().unwrap();
        w.fold = Fold::Idle;
        j.folding.notify_all();
    }
}

impl Shared {
    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: in the header page, aligned (the mapping is page aligned).
        unsafe { &*(self.base.add(i * 8) as *const AtomicU64) }
    }

    fn active_word(&self) -> &AtomicU32 {
        // SAFETY: as in `word`.
        unsafe { &*(self.base.add(8) as *const AtomicU32) }
    }

    fn used(&self, half: usize) -> &AtomicU64 {
        self.word(2 + half)
    }

    fn active(&self) -> usize {
        self.active_word().load(Ordering::Acquire) as usize & 1
    }

    fn half_len(&self) -> usize {
        (self.len - HEADER) / 2 / 8 * 8
    }

    fn half(&self, half: usize) -> *mut u8 {
        // SAFETY: within the mapping.
        unsafe { self.base.add(HEADER + half * self.half_len()) }
    }

    /// The records of one half up to byte `upto` (at most what is
    /// written), applied in order.
    fn read(&self, half: usize, upto: usize) -> Held {
        let used = (self.used(half).load(Ordering::Acquire) as usize)
            .min(self.half_len())
            .min(upto);
        // SAFETY: the first `used` bytes of the half are written and no
        // longer change.
        let bytes = unsafe { std::slice::from_raw_parts(self.half(half), used) };
        let mut held = Held::default();
        let mut at = 0;
        while let Some((r, next)) = decode(bytes, at) {
            held.apply(r);
            at = next;
        }
        if at != used {
            tracing::warn!(
                at,
                used,
                "handoff journal: a damaged record ends the replay"
            );
        }
        held
    }

    /// Writes `held` into `half`, then makes it the active one and gives
    /// the other's memory back. False if it does not fit.
    fn fold_into(&self, held: &Held, half: usize) -> bool {
        let fits = self.write_half(held, half);
        if fits {
            self.active_word().store(half as u32, Ordering::Release);
            self.release_half(1 - half);
        }
        fits
    }

    /// Writes `held` into inactive `half` from its start. False if it does
    /// not fit.
    fn write_half(&self, held: &Held, half: usize) -> bool {
        self.used(half).store(0, Ordering::Release);
        held.records().all(|r| self.put(half, &encode(&r)))
    }

    /// Appends the records of `from` after byte `upto` to `to`. False if
    /// they do not fit.
    fn copy_tail(&self, from: usize, upto: usize, to: usize) -> bool {
        let end = self.used(from).load(Ordering::Acquire) as usize;
        // SAFETY: written bytes of `from`; the caller holds the writer.
        let tail = unsafe { std::slice::from_raw_parts(self.half(from).add(upto), end - upto) };
        self.put(to, tail)
    }

    /// Gives the memory of inactive `half` back (a touched page of a memfd
    /// stays allocated until punched out): the journal costs what its
    /// active half holds, not twice the most it ever held.
    fn release_half(&self, half: usize) {
        let at = (HEADER + half * self.half_len()) as i64;
        // SAFETY: plain fallocate on our memfd; the range is inside it and
        // no longer read (the other half is active).
        let r = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at,
                self.half_len() as i64,
            )
        };
        if r != 0 {
            tracing::debug!(
                "handoff journal: cannot release the inactive half: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Appends `rec` (whole records) to `half`; false if it does not fit.
    fn put(&self, half: usize, rec: &[u8]) -> bool {
        let used = self.used(half).load(Ordering::Relaxed) as usize;
        if used + rec.len() > self.half_len() {
            return false;
        }
        // SAFETY: within the half; only one writer writes a half at a time.
        unsafe {
            std::ptr::copy_nonoverlapping(rec.as_ptr(), self.half(half).add(used), rec.len())
        };
        // The length goes last: a record is there once it is counted.
        self.used(half)
            .store((used + rec.len()) as u64, Ordering::Release);
        true
    }
}

const NODE_MAIN: u8 = 1;
const NODE_SNAP: u8 = 2;
const NODE_LAYER: u8 = 3;
/// The whole node forgotten: written by workers that did not count
/// lookups (read, never written).
const FORGET_ALL: u8 = 4;
const FILE: u8 = 5;
const DIR: u8 = 6;
const RELEASE: u8 = 7;
const BACKING: u8 = 8;
const UNBACKED: u8 = 9;
const LOOKUP: u8 = 10;
const FORGET: u8 = 11;
const MAPPED: u8 = 12;
const UNMAPPED: u8 = 13;
/// A layer node with its object's id.
const NODE_LAYER_LOCAL: u8 = 14;
/// A layer node whose object was removed.
const NODE_REMOVED: u8 = 15;

fn put_handle(out: &mut Vec<u8>, h: &HostHandle) {
    out.extend_from_slice(&h.handle_type().to_le_bytes());
    out.push(h.bytes().len() as u8);
    out.extend_from_slice(h.bytes());
}

fn put_found_at(out: &mut Vec<u8>, at: &Option<FoundAt>) {
    if let Some((dir, name)) = at.as_ref().filter(|(_, name)| !name.is_empty()) {
        out.extend_from_slice(&dir.to_le_bytes());
        out.extend_from_slice(name);
    }
}

/// `[u32 length of the rest][u8 kind][fields]`, little endian. A node of
/// main or of a snapshot ends with where it was found, if known: `[u64
/// directory][name]` (a worker before these ignored trailing bytes).
fn encode(r: &Record) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    match r {
        Record::Node {
            id,
            generation,
            origin,
            at,
        } => match origin {
            Origin::Main(h) => {
                out.push(NODE_MAIN);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                put_handle(&mut out, h);
                put_found_at(&mut out, at);
            }
            Origin::Snap {
                snap,
                epoch,
                handle,
                ino,
            } => {
                out.push(NODE_SNAP);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&snap.to_le_bytes());
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&ino.to_le_bytes());
                put_handle(&mut out, handle);
                put_found_at(&mut out, at);
            }
            Origin::Layer {
                parent,
                name,
                local,
            } => {
                out.push(if local.is_some() {
                    NODE_LAYER_LOCAL
                } else {
                    NODE_LAYER
                });
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                out.extend_from_slice(&parent.to_le_bytes());
                if let Some(local) = local {
                    out.extend_from_slice(&local.to_le_bytes());
                }
                out.extend_from_slice(name);
            }
            Origin::Removed => {
                out.push(NODE_REMOVED);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
            }
        },
        Record::Lookup { id, n } => {
            out.push(LOOKUP);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        Record::Forget { id, n } => {
            out.push(FORGET);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        Record::File { fh, node, flags } => {
            out.push(FILE);
            out.extend_from_slice(&fh.to_le_bytes());
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
        }
        Record::Dir { dh, node } => {
            out.push(DIR);
            out.extend_from_slice(&dh.to_le_bytes());
            out.extend_from_slice(&node.to_le_bytes());
        }
        Record::Release(h) => {
            out.push(RELEASE);
            out.extend_from_slice(&h.to_le_bytes());
        }
        Record::Backing { node, id } => {
            out.push(BACKING);
            out.extend_from_slice(&node.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Record::Unbacked(node) => {
            out.push(UNBACKED);
            out.extend_from_slice(&node.to_le_bytes());
        }
        Record::Mapped(node) => {
            out.push(MAPPED);
            out.extend_from_slice(&node.to_le_bytes());
        }
        Record::Unmapped(node) => {
            out.push(UNMAPPED);
            out.extend_from_slice(&node.to_le_bytes());
        }
    }
    let n = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&n.to_le_bytes());
    out
}

/// Reads fixed-size fields off a record.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn handle(&mut self) -> Option<HostHandle> {
        let t = self.u32()? as i32;
        let n = *self.take(1)?.first()? as usize;
        HostHandle::new(t, self.take(n)?.to_vec())
    }
}

/// The record at `at` and where the next one starts; `None` at the end or
/// at damage.
fn decode(bytes: &[u8], at: usize) -> Option<(Record, usize)> {
    let n = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
    let body = bytes.get(at + 4..at + 4 + n)?;
    let (&kind, rest) = body.split_first()?;
    let mut f = Fields(rest);
    let node = |f: &mut Fields<'_>, origin: &dyn Fn(&mut Fields<'_>) -> Option<Origin>| {
        let (id, generation) = (f.u64()?, f.u64()?);
        let origin = origin(f)?;
        // What is left (none of a layer's): where it was found. A hint
        // only: anything too short for one is ignored.
        let at = match f.0.len() {
            0..=8 => None,
            _ => Some((f.u64()?, std::mem::take(&mut f.0).to_vec())),
        };
        Some(Record::Node {
            id,
            generation,
            origin,
            at,
        })
    };
    let r = match kind {
        NODE_MAIN => node(&mut f, &|f| Some(Origin::Main(f.handle()?)))?,
        NODE_SNAP => node(&mut f, &|f| {
            let snap = f.u32()?;
            let (epoch, ino) = (f.u64()?, f.u64()?);
            Some(Origin::Snap {
                snap,
                epoch,
                ino,
                handle: f.handle()?,
            })
        })?,
        NODE_LAYER => node(&mut f, &|f| {
            let parent = f.u64()?;
            Some(Origin::Layer {
                parent,
                name: std::mem::take(&mut f.0).to_vec(),
                local: None,
            })
        })?,
        NODE_LAYER_LOCAL => node(&mut f, &|f| {
            let (parent, local) = (f.u64()?, f.u64()?);
            Some(Origin::Layer {
                parent,
                name: std::mem::take(&mut f.0).to_vec(),
                local: Some(local),
            })
        })?,
        NODE_REMOVED => node(&mut f, &|_| Some(Origin::Removed))?,
        LOOKUP => Record::Lookup {
            id: f.u64()?,
            n: f.u64()?,
        },
        FORGET => Record::Forget {
            id: f.u64()?,
            n: f.u64()?,
        },
        FORGET_ALL => Record::Forget {
            id: f.u64()?,
            n: u64::MAX,
        },
        FILE => Record::File {
            fh: f.u64()?,
            node: f.u64()?,
            flags: f.u32()? as i32,
        },
        DIR => Record::Dir {
            dh: f.u64()?,
            node: f.u64()?,
        },
        RELEASE => Record::Release(f.u64()?),
        BACKING => Record::Backing {
            node: f.u64()?,
            id: f.u32()?,
        },
        UNBACKED => Record::Unbacked(f.u64()?),
        MAPPED => Record::Mapped(f.u64()?),
        UNMAPPED => Record::Unmapped(f.u64()?),
        _ => return None,
    };
    Some((r, at + 4 + n))
}

/// Where the identity starts in the header: a u32 length, then the bytes.
const IDENTITY_AT: usize = 512;

/// A journal in a new memfd (what the supervisor creates per mount),
/// holding `identity`: what the connection serves (source, state
/// directory), for a supervisor that takes a parked connection over to
/// check against the mount's config ([`identity_of`]).
pub fn create_memfd(name: &str, identity: &[u8]) -> io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&fd, SIZE as i64)?;
    if IDENTITY_AT + 4 + identity.len() > HEADER {
        return Err(io::Error::other(
            "the mount's identity does not fit the journal header",
        ));
    }
    let mut rec = (identity.len() as u32).to_le_bytes().to_vec();
    rec.extend_from_slice(identity);
    nix::sys::uio::pwrite(&fd, &rec, IDENTITY_AT as i64)?;
    Ok(fd)
}

/// The identity [`create_memfd`] recorded in journal `fd`.
pub fn identity_of(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; HEADER - IDENTITY_AT];
    nix::sys::uio::pread(fd, &mut buf, IDENTITY_AT as i64)?;
    let n = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    buf.get(4..4 + n)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| io::Error::other("the journal's identity is damaged"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(size: i64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, size).unwrap();
        fd
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    #[test]
    fn a_successor_reads_what_the_kernel_holds() {
        let fd = small(HEADER as i64 + 2 * 8192);
        let (j, held) = Journal::open(dup(&fd), false).unwrap();
        assert_eq!(held, Held::default());
        let h = HostHandle::new(1, vec![1, 2, 3]).unwrap();
        let node = |id, origin| Record::Node {
            id,
            generation: id + 100,
            origin,
            at: None,
        };
        // Main's file found as "f" in node 1.
        j.append(&Record::Node {
            id: 10,
            generation: 110,
            origin: Origin::Main(h.clone()),
            at: Some((1, b"f".to_vec())),
        });
        j.append(&node(
            11,
            Origin::Layer {
                parent: 10,
                name: b"a b".to_vec(),
                local: None,
            },
        ));
        j.append(&node(12, Origin::Main(h.clone())));
        j.append(&Record::Forget { id: 12, n: 1 });
        // Looked up three times in all, forgotten twice: one left.
        j.append(&Record::Lookup { id: 10, n: 1 });
        j.append(&Record::Lookup { id: 10, n: 1 });
        j.append(&Record::Forget { id: 10, n: 2 });
        // Given again after a rename: a new origin, the same lookups.
        j.append(&Record::Lookup { id: 11, n: 4 });
        j.append(&node(
            11,
            Origin::Layer {
                parent: 10,
                name: b"moved".to_vec(),
                local: Some(7),
            },
        ));
        j.append(&Record::File {
            fh: 5,
            node: 11,
            flags: libc::O_RDWR | libc::O_APPEND,
        });
        j.append(&Record::Dir { dh: 6, node: 10 });
        j.append(&Record::File {
            fh: 7,
            node: 10,
            flags: 0,
        });
        j.append(&Record::Release(7));
        j.append(&Record::Backing { node: 10, id: 3 });
        j.append(&Record::Backing { node: 11, id: 4 });
        j.append(&Record::Unbacked(11));
        j.append(&Record::Mapped(10));
        j.append(&Record::Mapped(12));
        j.append(&Record::Unmapped(12));
        // Removed from its branch: held, found nowhere.
        j.append(&node(
            13,
            Origin::Layer {
                parent: 10,
                name: b"gone".to_vec(),
                local: Some(8),
            },
        ));
        j.append(&Record::Lookup { id: 13, n: 1 });
        j.append(&node(13, Origin::Removed));
        drop(j);
        let (j2, held) = Journal::open(dup(&fd), true).unwrap();
        assert_eq!(held.nodes.len(), 3);
        assert_eq!(held.nodes[&13].origin, Origin::Removed);
        assert_eq!(held.nodes[&13].lookups, 2);
        assert_eq!(
            held.nodes[&10],
            HeldNode {
                generation: 110,
                origin: Origin::Main(h),
                at: Some((1, b"f".to_vec())),
                lookups: 1
            }
        );
        assert_eq!(held.nodes[&11].lookups, 5);
        assert_eq!(
            held.nodes[&11].origin,
            Origin::Layer {
                parent: 10,
                name: b"moved".to_vec(),
                local: Some(7),
            }
        );
        assert_eq!(held.max_generation(), 113);
        assert_eq!(
            held.files.get(&5),
            Some(&(11, libc::O_RDWR | libc::O_APPEND))
        );
        assert_eq!(held.dirs.get(&6), Some(&10));
        assert_eq!(held.max_handle(), 6);
        assert_eq!(held.backings, HashMap::from([(10, 3)]));
        assert_eq!(held.mapped, HashSet::from([10]));
        // The successor's own journal holds the same after folding.
        drop(j2);
        let (_, again) = Journal::open(fd, true).unwrap();
        assert_eq!(again, held);
    }

    #[test]
    fn a_full_half_folds_into_the_other() {
        let fd = small(HEADER as i64 + 2 * 4096);
        let (j, _) = Journal::open(dup(&fd), false).unwrap();
        let h = HostHandle::new(1, vec![9; 8]).unwrap();
        // Far more records than a half holds, few ids alive at once.
        for i in 0..2000u64 {
            j.append(&Record::Node {
                id: i,
                generation: 1,
                origin: Origin::Main(h.clone()),
                at: None,
            });
            if i >= 3 {
                j.append(&Record::Forget { id: i - 3, n: 1 });
            }
        }
        drop(j);
        let (_, held) = Journal::open(fd, true).unwrap();
        let mut ids: Vec<_> = held.nodes.keys().copied().collect();
        ids.sort();
        assert_eq!(ids, vec![1997, 1998, 1999]);
    }

    #[test]
    fn ids_handed_out_once_the_journal_is_full_are_never_reused() {
        let fd = small(HEADER as i64 + 2 * 4096);
        let (j, _) = Journal::open(dup(&fd), false).unwrap();
        let h = HostHandle::new(1, vec![9; 8]).unwrap();
        // Live records until the journal gives up, then more ids.
        for i in 0..2000u64 {
            j.append(&Record::Node {
                id: i,
                generation: i,
                origin: Origin::Main(h.clone()),
                at: None,
            });
            j.append(&Record::File {
                fh: i,
                node: i,
                flags: 0,
            });
        }
        drop(j);
        let (j, held) = Journal::open(fd, true).unwrap();
        assert!(held.max_handle() < 1999, "the journal filled");
        assert_eq!(
            j.high_water(),
            HighWater {
                handle: 1999,
                generation: 1999,
                node: 1999
            }
        );
    }

    #[test]
    fn the_identity_outlives_the_workers_use_of_the_journal() {
        use std::os::fd::AsFd;
        let fd = create_memfd("t", b"source=/a\0state_dir=/b").unwrap();
        let (j, _) = Journal::open(dup(&fd), false).unwrap();
        j.append(&Record::Forget { id: 1, n: 1 });
        drop(j);
        let _ = Journal::open(dup(&fd), true).unwrap();
        assert_eq!(identity_of(fd.as_fd()).unwrap(), b"source=/a\0state_dir=/b");
    }

    #[test]
    fn a_folded_half_gives_its_memory_back() {
        let fd = small(HEADER as i64 + 2 * (1 << 20));
        let (j, _) = Journal::open(dup(&fd), false).unwrap();
        let h = HostHandle::new(1, vec![9; 8]).unwrap();
        let allocated = || nix::sys::stat::fstat(&fd).unwrap().st_blocks * 512;
        // A half filled with records of ids that are all forgotten again.
        let mut i = 0;
        while j.shared.active() == 0 {
            j.append(&Record::Node {
                id: i,
                generation: 1,
                origin: Origin::Main(h.clone()),
                at: None,
            });
            j.append(&Record::Forget { id: i, n: 1 });
            i += 1;
        }
        // What the active half holds (the records appended while the
        // fold ran), not the half folded away as well; once the fold
        // thread is done (dropping the journal waits for it).
        let held = j.shared.used(1).load(Ordering::Acquire) as i64;
        drop(j);
        assert!(
            allocated() < HEADER as i64 + held + (64 << 10),
            "{} bytes still allocated after folding, {held} in use",
            allocated()
        );
    }

    /// Records appended while the fold thread writes the other half are
    /// carried over after its result: a successor reads exactly what was
    /// appended, whenever the fold happened.
    #[test]
    fn a_fold_in_the_background_keeps_what_is_appended_meanwhile() {
        let fd = small(HEADER as i64 + 2 * (4 << 20));
        let (j, _) = Journal::open(dup(&fd), false).unwrap();
        let h = HostHandle::new(1, vec![7; 8]).unwrap();
        let mut model = Held::default();
        let mut append = |r: Record| {
            j.append(&r);
            model.apply(r);
        };
        // About a thousand nodes alive at a time, each looked up three
        // times and forgotten, until the halves have been switched a few
        // times.
        let (mut i, mut switches, mut active) = (0u64, 0, 0);
        while switches < 4 {
            append(Record::Node {
                id: i,
                generation: i,
                origin: Origin::Main(h.clone()),
                at: None,
            });
            if let Some(id) = i.checked_sub(500) {
                append(Record::Lookup { id, n: 2 });
            }
            if let Some(id) = i.checked_sub(1000) {
                append(Record::Forget { id, n: 3 });
            }
            i += 1;
            if j.shared.active() != active {
                (active, switches) = (1 - active, switches + 1);
            }
            assert!(i < 5_000_000, "the halves were never switched");
        }
        drop(j);
        let (_, held) = Journal::open(fd, true).unwrap();
        assert_eq!(held.nodes.len(), model.nodes.len());
        assert_eq!(held, model);
    }

    /// A journal of a worker that did not count lookups: its FORGET
    /// records drop the whole node.
    #[test]
    fn a_forget_of_an_older_worker_drops_the_node() {
        let h = HostHandle::new(1, vec![9; 8]).unwrap();
        let mut bytes = encode(&Record::Node {
            id: 3,
            generation: 1,
            origin: Origin::Main(h),
            at: None,
        });
        bytes.extend(encode(&Record::Lookup { id: 3, n: 2 }));
        bytes.extend([9, 0, 0, 0, FORGET_ALL]);
        bytes.extend(3u64.to_le_bytes());
        let mut held = Held::default();
        let mut at = 0;
        while let Some((r, next)) = decode(&bytes, at) {
            held.apply(r);
            at = next;
        }
        assert_eq!(at, bytes.len());
        assert!(held.nodes.is_empty());
    }

    #[test]
    fn taking_over_a_journal_never_written_is_refused() {
        let e = Journal::open(small(HEADER as i64 + 8192), true)
            .err()
            .unwrap();
        assert!(e.to_string().contains("never written"), "{e}");
    }
}
