//! FUSE passthrough (kernel 6.9+): which opens the kernel serves from the
//! host file itself, without a round trip to the worker per read or write.
//!
//! The kernel keeps an I/O mode per inode and fails an open with EIO when
//! the server breaks it: while any open of a node is a passthrough open,
//! every open of it must be one, with the same backing file; while any is
//! cached, none may be. So this module keeps, per node, which mode its
//! open files are in, and the one backing file id its passthrough opens
//! share. Which files may bypass the worker at all is FsCore's to say
//! ([`Bypass`]); specs/semantics.md "Passthrough" says what each policy
//! gives.
//!
//! Backing file ids live in the FUSE connection, not in this process: they
//! are journaled ([`FsCore::journal_backing`]), so that a successor taking
//! over the connection opens a held node with the id the kernel already
//! pinned to it, and closes it when the last such file is released.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::core::{Bypass, FileHandle, FsCore, NodeId};

/// Which opens use passthrough (config `[fuse] passthrough`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// None: every read and write goes through the worker.
    Off,
    /// Read-only opens of main's files and of snapshots' pre-images. A
    /// writer of a node that readers hold in passthrough joins it with
    /// direct I/O: its reads and writes still go through the worker.
    #[default]
    Auto,
    /// As `auto`, and writers of main's files too: writes go straight to
    /// the host file, and a snapshot taken while such a writer is open
    /// copies that file.
    On,
}

/// How an open is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// Through the kernel's page cache of the FUSE inode, kept from
    /// earlier opens if `keep_cache`. Not kept for files passthrough may
    /// serve: their changes through the host file bypass that cache.
    Cached { keep_cache: bool },
    /// From backing file `id`; with `direct_io` reads and writes still
    /// come to the worker (only maps use the host file).
    Passthrough { id: u32, direct_io: bool },
}

/// The I/O mode of one node's open files.
enum Mode {
    /// `n` cached opens.
    Cached(u32),
    /// Passthrough opens sharing a backing file.
    Backed {
        id: u32,
        /// The backing file was opened for writing.
        writable: bool,
        /// Open files using it.
        open: u32,
    },
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Mode>,
    /// Each open file's node, for release.
    files: HashMap<u64, u64>,
}

/// The passthrough state of one mount.
pub struct Passthrough {
    policy: Policy,
    /// /dev/fuse, for the backing ioctls; None when passthrough is off
    /// or the kernel did not accept it.
    fuse: Mutex<Option<OwnedFd>>,
    table: Mutex<Table>,
    /// A registration failed and was logged (later ones are debug only).
    told: AtomicBool,
}

nix::ioctl_write_ptr!(backing_close_ioctl, 229, 2, u32);

/// FUSE_DEV_IOC_BACKING_CLOSE: closes backing file `id` of connection
/// `fuse` (fuser closes only the ids it wraps, when they drop).
pub fn close_backing(fuse: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    // SAFETY: the ioctl reads one u32.
    unsafe { backing_close_ioctl(fuse.as_raw_fd(), &id) }?;
    Ok(())
}

impl Passthrough {
    /// Passthrough with `policy` on the connection `fuse`, knowing what a
    /// predecessor left open in the kernel (after a takeover) from `core`.
    pub fn new(policy: Policy, fuse: OwnedFd, core: &FsCore) -> Passthrough {
        let (files, backings) = core.held_open();
        let mut table = Table::default();
        for (fh, node) in files {
            table.files.insert(fh.0, node.0);
            let mode = table
                .nodes
                .entry(node.0)
                .or_insert_with(|| match backings.get(&node.0) {
                    Some(&id) => Mode::Backed {
                        id,
                        // Not known: writers join with direct I/O.
                        writable: false,
                        open: 0,
                    },
                    None => Mode::Cached(0),
                });
            match mode {
                Mode::Cached(n) | Mode::Backed { open: n, .. } => *n += 1,
            }
        }
        let pt = Passthrough {
            policy,
            fuse: Mutex::new((policy != Policy::Off).then_some(fuse)),
            table: Mutex::new(table),
            told: AtomicBool::new(false),
        };
        // Backing files of nodes with no open file left: nothing uses them.
        // Closed before the journal forgets them, as `release` does.
        for (node, id) in backings {
            if !pt.table.lock().unwrap().nodes.contains_key(&node) {
                pt.close(id);
                core.journal_backing(NodeId(node), None);
            }
        }
        pt
    }

    /// Passthrough is asked for at FUSE_INIT.
    pub fn wanted(&self) -> bool {
        self.policy != Policy::Off
    }

    /// The kernel refused passthrough: every open is cached from now on.
    pub fn disable(&self) {
        self.fuse.lock().unwrap().take();
    }

    /// Decides how `node`'s new open file `fh`, opened with `flags`, is
    /// answered, and makes it so (backing file registered, unseen writes
    /// preserved for). On error the open must fail: the file is released
    /// here, in this table and in `core`.
    pub fn open(
        &self,
        core: &FsCore,
        node: NodeId,
        fh: FileHandle,
        flags: i32,
    ) -> io::Result<Open> {
        let bypass = if self.fuse.lock().unwrap().is_some() {
            core.bypass(fh, flags)
        } else {
            Bypass::Never
        };
        let answer = self.choose(core, node, fh, bypass);
        let answer = match answer {
            // Writes that reach the host file without the worker (even
            // with direct I/O, through maps) need their pre-images first.
            Ok(Open::Passthrough { .. }) if bypass == Bypass::Write => {
                core.writes_unseen(node, fh).and(answer)
            }
            a => a,
        };
        if answer.is_err() {
            self.release(core, fh);
        }
        answer
    }

    fn choose(
        &self,
        core: &FsCore,
        node: NodeId,
        fh: FileHandle,
        bypass: Bypass,
    ) -> io::Result<Open> {
        let mut t = self.table.lock().unwrap();
        t.files.insert(fh.0, node.0);
        let wanted = match bypass {
            Bypass::Never => false,
            Bypass::Read => true,
            Bypass::Write => self.policy == Policy::On,
        };
        let keep_cache = bypass == Bypass::Never;
        match t.nodes.get_mut(&node.0) {
            Some(Mode::Cached(n)) => {
                *n += 1;
                return Ok(Open::Cached { keep_cache });
            }
            Some(Mode::Backed { id, writable, open }) => {
                *open += 1;
                return Ok(Open::Passthrough {
                    id: *id,
                    // A writer the policy keeps on the worker's path, or
                    // one the backing file cannot take.
                    direct_io: bypass != Bypass::Read && !(wanted && *writable),
                });
            }
            None => {}
        }
        if wanted {
            match self.register(core, node, fh) {
                Ok((id, writable)) => {
                    t.nodes.insert(
                        node.0,
                        Mode::Backed {
                            id,
                            writable,
                            open: 1,
                        },
                    );
                    let direct_io = bypass == Bypass::Write && !writable;
                    return Ok(Open::Passthrough { id, direct_io });
                }
                Err(e) if !self.told.swap(true, Ordering::Relaxed) => tracing::info!(
                    node = node.0,
                    "the kernel refused a passthrough backing file, opens are served by the \
                     worker (a source on a stacked file system such as overlayfs cannot be \
                     a backing file): {e}"
                ),
                Err(e) => tracing::debug!(node = node.0, "no passthrough: {e}"),
            }
        }
        t.nodes.insert(node.0, Mode::Cached(1));
        Ok(Open::Cached { keep_cache })
    }

    /// Opens a backing file for `node` in the kernel, journaled before
    /// any reply names it.
    fn register(&self, core: &FsCore, node: NodeId, fh: FileHandle) -> io::Result<(u32, bool)> {
        // Read-write only when writers may use it: a host file open for
        // writing refuses to be executed (ETXTBSY) and breaks read leases.
        let (file, writable) = core.backing_file(fh, self.policy == Policy::On)?;
        let fuse = self.fuse.lock().unwrap();
        let fuse = fuse
            .as_ref()
            .ok_or_else(|| io::Error::other("passthrough is off"))?;
        let id = fuser::BackingId::create_raw(fuse, &file)?;
        core.journal_backing(node, Some(id));
        Ok((id, writable))
    }

    /// Open file `fh` is released, here and in `core`: the last
    /// passthrough file of a node closes its backing file (the kernel let
    /// go of it already: it sends RELEASE after the file's I/O ended).
    pub fn release(&self, core: &FsCore, fh: FileHandle) {
        let closed = self.forget_file(fh);
        // Closed first: a successor that finds it journaled still only
        // fails to close it again, never leaks it. Journaled closed only
        // after `core` has let the file go: that asks whether a shared map
        // still writes the file, which the read-write backing file would
        // answer for, and journals the answer; a successor counts a file
        // written unseen only while its node's backing file is journaled.
        if let Some((_, id)) = closed {
            self.close(id);
        }
        core.release(fh);
        if let Some((node, _)) = closed {
            // Under the table's lock, as `register` journals a backing file:
            // an open of the node meanwhile may have registered a new one,
            // whose record this must not undo.
            let t = self.table.lock().unwrap();
            if !matches!(t.nodes.get(&node.0), Some(Mode::Backed { .. })) {
                core.journal_backing(node, None);
            }
        }
    }

    /// Takes `fh` out of the table; the node and backing file id to close
    /// if it was the last passthrough file of its node.
    fn forget_file(&self, fh: FileHandle) -> Option<(NodeId, u32)> {
        let mut t = self.table.lock().unwrap();
        let node = t.files.remove(&fh.0)?;
        let last = match t.nodes.get_mut(&node) {
            Some(Mode::Cached(n)) | Some(Mode::Backed { open: n, .. }) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        match last.then(|| t.nodes.remove(&node)).flatten() {
            Some(Mode::Backed { id, .. }) => Some((NodeId(node), id)),
            _ => None,
        }
    }

    fn close(&self, id: u32) {
        if let Some(fuse) = self.fuse.lock().unwrap().as_ref() {
            if let Err(e) = close_backing(fuse.as_fd(), id) {
                tracing::warn!(id, "closing a passthrough backing file: {e}");
            }
        }
    }
}
