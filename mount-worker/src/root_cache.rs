//! Lets the kernel cache the mount root while nothing is bound.
//!
//! Names at the mount root depend on the caller's branch, and the kernel's
//! caches are shared by all callers, so while anything is bound those names
//! and the root's attributes are never cached: every path walk from the root
//! costs a GETATTR of the root and a LOOKUP of its first name. While nothing
//! is bound they are main's for everyone and may be cached like any other.
//!
//! The first binding must then make the kernel forget them before it takes
//! effect, including replies to lookups in flight, which reach the kernel's
//! cache after any invalidation sent now: FUSE_NOTIFY_INC_EPOCH (Linux 6.16)
//! marks every name cached so far, and every name a lookup started so far
//! will cache, for a new lookup. It also detaches whatever is mounted inside
//! the mount (the kernel invalidates those names), so where something is,
//! the root's names are expired one by one instead (FUSE_EXPIRE_ONLY keeps
//! mounts), twice, [`SETTLE`] apart, for lookups in flight. The last
//! unbinding forgets again (replies routed to a branch are not cached, but
//! one computed just before it may be cached just after) and sharing
//! starts again, unless something is mounted inside. "Inside" is as seen
//! in the worker's mount namespace; mounts made in other namespaces on
//! directories of the mount are detached all the same.
//!
//! A worker that took over the connection does not know which root names
//! its predecessor let the kernel cache: it shares the root without
//! forgetting them (they are main's) unless something is mounted inside,
//! and its first binding forgets every name (while nothing is mounted
//! inside, or within the cache timeout of the take-over).
//!
//! A name renamed into the root keeps the time the kernel cached it for in
//! its old directory; the adapter has the trimmer drop it when the root's
//! names may not be cached ([`crate::trim::Trimmer::forget_soon`]).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};

use crate::core::NodeId;
use crate::mount;

/// How long after expiring the root's names they are expired again: a
/// lookup answered before the first round has reached the kernel's cache
/// by then.
const SETTLE: Duration = Duration::from_millis(100);

/// Root names remembered for expiring one by one, at most; past it the
/// first binding forgets every name (and detaches mounts inside).
const MAX_NAMES: usize = 1 << 16;

/// The kernel's cache of the mount root, shared while nothing is bound.
pub struct RootCache {
    notifier: Notifier,
    fuse: OwnedFd,
    /// The mount's device, to find what is mounted inside it.
    dev: u64,
    state: Mutex<State>,
}

enum State {
    /// The kernel may cache the root; the names it may have cached (`None`
    /// when there were too many to remember).
    Shared(Option<HashSet<OsString>>),
    /// It may not; until the instant given, it may still hold names a
    /// predecessor let it cache (a worker that took over the connection).
    Unshared(Option<Instant>),
}

impl RootCache {
    /// Whether the kernel can be made to forget every name
    /// (FUSE_NOTIFY_INC_EPOCH, Linux 6.16).
    pub fn supported() -> bool {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut v = release
            .split(['.', '-'])
            .map(|n| n.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 16)
    }

    /// The root cache of the mount with device `dev` served through `fuse`;
    /// `inherited`: this worker took the connection over from one that may
    /// have let the kernel cache the root for that long. Not shared yet:
    /// see [`RootCache::start`].
    pub fn new(
        notifier: Notifier,
        fuse: OwnedFd,
        dev: u64,
        inherited: Option<Duration>,
    ) -> RootCache {
        RootCache {
            notifier,
            fuse,
            dev,
            state: Mutex::new(State::Unshared(inherited.map(|t| Instant::now() + t))),
        }
    }

    /// Whether the kernel may cache the root's attributes now.
    pub fn shared(&self) -> bool {
        matches!(*self.state.lock().unwrap(), State::Shared(_))
    }

    /// Whether the kernel may cache what a reply says of `name` in the
    /// root; if so, `name` is remembered for [`RootCache::stop`] before the
    /// reply goes (under the same lock as `stop`, so none is missed).
    pub fn cacheable(&self, name: &OsStr) -> bool {
        let mut state = self.state.lock().unwrap();
        let State::Shared(names) = &mut *state else {
            return false;
        };
        if let Some(set) = names
            && !set.contains(name)
        {
            if set.len() >= MAX_NAMES {
                *names = None;
            } else {
                set.insert(name.to_owned());
            }
        }
        true
    }

    /// Before the first binding takes effect: from now on nothing at the
    /// root is cached, and what was is forgotten.
    pub fn stop(&self) {
        let names = match std::mem::replace(&mut *self.state.lock().unwrap(), State::Unshared(None))
        {
            State::Shared(names) => names,
            // What a predecessor let the kernel cache: names unknown.
            State::Unshared(Some(until)) if Instant::now() < until => None,
            State::Unshared(_) => return,
        };
        self.forget_attrs();
        match (names, self.mounts_inside()) {
            (Some(names), true) => {
                for _ in 0..2 {
                    for name in &names {
                        self.expire(name);
                    }
                    std::thread::sleep(SETTLE);
                }
            }
            (None, true) => {
                tracing::warn!(
                    "the names cached at the mount root are not known one by one (too many, \
                     or cached for the previous worker): the first binding makes the kernel \
                     forget every name, which detaches what is mounted inside the mount"
                );
                self.forget_names();
            }
            (_, false) => self.forget_names(),
        }
    }

    /// After the last unbinding took effect (and at start): what the kernel
    /// cached for a bound caller is forgotten, and it may cache the root
    /// again, unless something is mounted inside the mount. At the start of
    /// a worker that took over, what the kernel holds is main's (nothing
    /// was bound, or nothing at the root was cached) and stays: forgetting
    /// it would only cost every cached path its lookups again. The names
    /// stay unknown, so the first binding forgets every name.
    pub fn start(&self) {
        let mut state = self.state.lock().unwrap();
        let inherited = match *state {
            State::Shared(_) => return,
            State::Unshared(until) => until.is_some_and(|u| Instant::now() < u),
        };
        if self.mounts_inside() {
            return;
        }
        if !inherited {
            self.forget_attrs();
            self.forget_names();
        }
        *state = State::Shared((!inherited).then(HashSet::new));
    }

    fn mounts_inside(&self) -> bool {
        match mount::has_mounts_inside(self.dev) {
            Ok(inside) => inside,
            Err(e) => {
                tracing::warn!("cannot read /proc/self/mountinfo ({e}): taken as a mount inside");
                true
            }
        }
    }

    /// The root's attributes, those of a GETATTR in flight too.
    fn forget_attrs(&self) {
        let r = self.notifier.inval_inode(INodeNo(NodeId::ROOT.0), -1, 0);
        self.failed("attributes", r);
    }

    /// Every name (all hang below the root).
    fn forget_names(&self) {
        let r = mount::notify_bare(self.fuse.as_fd(), mount::FUSE_NOTIFY_INC_EPOCH);
        self.failed("names", r);
    }

    /// `name` in the root, kept but looked up again at its next use.
    fn expire(&self, name: &OsStr) {
        match mount::notify_expire_entry(self.fuse.as_fd(), NodeId::ROOT.0, name) {
            // Not cached (any more).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => self.failed("a name", r),
        }
    }

    /// Only once the connection is gone, when nobody can use the mount.
    fn failed(&self, what: &str, r: io::Result<()>) {
        if let Err(e) = r {
            tracing::error!("cannot make the kernel forget the mount root's {what}: {e}");
        }
    }
}
