//! The spare layer: the directories of the next layer a branch or a
//! snapshot of a branch will need (`layers/<next_layer>/`), made and
//! flushed ahead of time on a thread of its own.
//!
//! Making a layer costs three flushes (its tree root, its directory and
//! `layers/`), which kept branch creation over a millisecond. With a spare,
//! creation only stamps the spare's tree root with the attributes of the
//! view below (no flush) and appends the catalog line (one flush). The
//! stamp may then be lost in a crash: a spare's tree root carries
//! [`UNSTAMPED_XATTR`] until stamped, and a worker that starts stamps again
//! every layer in use that still has it, from the root of the view below
//! (the layer below, or main at the view's epoch), which gives the same
//! attributes. The mark goes last, on the same inode as the
//! stamp: should its removal be durable, so is the stamp; a user's change
//! of the branch root comes after both.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::hostfs;
use crate::layered::{self, Ctx, Part};
use crate::snapshot::LayerId;

/// Set on a spare's tree root until a creation stamps it.
const UNSTAMPED_XATTR: &str = "trusted.agentfs.unstamped";

/// The thread that keeps a spare layer ready.
pub struct Spare {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// `<state>/layers`.
    layers: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// The layer to make next.
    wanted: Option<LayerId>,
    /// The layer being made.
    making: Option<LayerId>,
    /// The layer made and flushed.
    ready: Option<LayerId>,
    closed: bool,
}

impl Spare {
    /// Starts the thread for the layers in `layers` (`<state>/layers`).
    /// Without the thread (it could not start), there is never a spare.
    pub fn start(layers: PathBuf) -> Spare {
        let shared = Arc::new(Shared {
            layers,
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spare-layer".into())
            .spawn(move || s.run())
            .inspect_err(|e| {
                tracing::warn!("no spare layers (creations make their own): {e}");
            })
            .ok();
        Spare { shared, thread }
    }

    /// Has the spare for `id` made, unless it is there already. `id` is
    /// the catalog's next layer: no layer in use has it, so whatever is
    /// at its place may be removed.
    pub fn want(&self, id: LayerId) {
        let mut st = self.shared.state.lock().unwrap();
        if st.ready != Some(id) && st.making != Some(id) {
            st.ready = None;
            st.wanted = Some(id);
            self.shared.changed.notify_all();
        }
    }

    /// Takes the spare for `id` if it is ready, after waiting for one being
    /// made. False: there is none; the caller makes the layer itself (the
    /// thread will not touch `id` unless it is wanted again).
    pub fn take(&self, id: LayerId) -> bool {
        let mut st = self.shared.state.lock().unwrap();
        if st.wanted == Some(id) {
            st.wanted = None;
        }
        while st.making == Some(id) {
            st = self.shared.changed.wait(st).unwrap();
        }
        if st.ready == Some(id) {
            st.ready = None;
            true
        } else {
            false
        }
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().closed = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run(&self) {
        loop {
            let id = {
                let mut st = self.state.lock().unwrap();
                loop {
                    if st.closed {
                        return;
                    }
                    if let Some(id) = st.wanted.take() {
                        st.making = Some(id);
                        break id;
                    }
                    st = self.changed.wait(st).unwrap();
                }
            };
            let making = Making(self);
            let dir = self.layers.join(id.0.to_string());
            // One kept from before a restart may not be on disk yet.
            let made = match is_spare(&dir) {
                true => flush(&dir),
                false => make(&dir),
            };
            if let Err(e) = &made {
                // Creations make their layers themselves meanwhile.
                tracing::warn!("cannot make the spare layer {}: {e}", dir.display());
                let _ = fs::remove_dir_all(&dir);
            }
            if made.is_ok() {
                self.state.lock().unwrap().ready = Some(id);
            }
            drop(making);
        }
    }
}

/// Ends the making of a spare however it ends, a panic included:
/// [`Spare::take`] waits for it, holding the catalog's lock.
struct Making<'a>(&'a Shared);

impl Drop for Making<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        st.making = None;
        self.0.changed.notify_all();
    }
}

/// Whether `dir` is a whole spare layer: `work`, `index` and a `tree`
/// still marked unstamped.
pub fn is_spare(dir: &Path) -> bool {
    dir.join("work").is_dir()
        && dir.join("index").is_dir()
        && hostfs::open_dir_path(&dir.join("tree"))
            .and_then(|t| unstamped(t.as_fd()))
            .unwrap_or(false)
}

/// Makes the spare layer `dir` and flushes it.
fn make(dir: &Path) -> io::Result<()> {
    make_dirs(dir)?;
    let tree = hostfs::open_dir_path(&dir.join("tree"))?;
    hostfs::setxattr(tree.as_fd(), OsStr::new(UNSTAMPED_XATTR), b"", 0)?;
    flush(dir)
}

/// Makes the directories of an empty layer `dir` (`work`, `index`,
/// `tree`), unflushed. Whatever was at `dir` goes: a layer is only made
/// at the catalog's next id, which no view uses.
pub fn make_dirs(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::create_dir_all(dir.join("work"))?;
    fs::create_dir(dir.join("index"))?;
    fs::create_dir(dir.join("tree"))
}

/// Flushes the layer `dir`: its tree root (attributes and entries), its
/// entries, and its own entry in `layers/`.
pub fn flush(dir: &Path) -> io::Result<()> {
    hostfs::sync_dir(hostfs::open_dir_path(&dir.join("tree"))?.as_fd())?;
    File::open(dir)?.sync_all()?;
    File::open(dir.parent().expect("layers/<id>"))?.sync_all()
}

/// Whether the tree root `tree` still waits for its stamp.
pub fn unstamped(tree: BorrowedFd<'_>) -> io::Result<bool> {
    match hostfs::getxattr(tree, OsStr::new(UNSTAMPED_XATTR), 0) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the tree root `tree` of a spare, or of a layer whose stamp a
/// crash lost, the attributes of `below` (the root of the view it goes on
/// top of), then drops its mark. Xattrs a stamp cut short left on it go
/// first: a spare has none of its own.
pub fn stamp(cx: Ctx<'_>, tree: BorrowedFd<'_>, below: &Part) -> io::Result<()> {
    for (name, _) in hostfs::xattrs_if_any(tree)? {
        if !layered::is_reserved_xattr(&name) {
            hostfs::removexattr(tree, OsStr::from_bytes(&name))?;
        }
    }
    below.copy_meta(cx, tree)?;
    hostfs::removexattr(tree, OsStr::new(UNSTAMPED_XATTR))
}
