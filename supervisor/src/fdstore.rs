//! Connections parked in systemd's file descriptor store (FDSTORE=1), so
//! that they outlive a crash of the supervisor: systemd hands them to the
//! next one, which takes each mount over with a new worker instead of
//! mounting again (specs/operation.md, "Supervisor crashes").
//!
//! Each mount parks three descriptors, named `<kind>.<dev>.<mount name>`
//! (kind `fuse`, `source` or `journal`; `dev` the FUSE mount's device
//! number, to tell the mount at the mountpoint is still this one). Outside
//! systemd (no NOTIFY_SOCKET) parking does nothing.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;

use crate::launch::{Connection, Descriptors};

const KINDS: [&str; 3] = ["fuse", "source", "journal"];

fn names(mount: &str, dev: u64) -> [String; 3] {
    KINDS.map(|k| format!("{k}.{dev}.{mount}"))
}

/// Parks `conn` of mount `mount`.
pub fn park(mount: &str, conn: &Connection) {
    let d = conn.descriptors();
    let fds: [BorrowedFd<'_>; 3] = [d.fuse, d.source, d.journal];
    for (name, fd) in names(mount, conn.dev).iter().zip(fds) {
        // FDPOLL=0: systemd would otherwise add each descriptor to an epoll
        // set, which the O_PATH source refuses (EBADF), and drop it; they
        // leave the store only when the mount stops.
        let states = [
            NotifyState::FdStore,
            NotifyState::FdName(name),
            NotifyState::Custom("FDPOLL=0"),
        ];
        if let Err(e) = sd_notify::notify_with_fds(&states, &[fd]) {
            tracing::warn!(
                mount,
                "cannot park {name} in systemd's descriptor store: {e}"
            );
        }
    }
}

/// Takes `conn` of mount `mount` out of the store (it is going away).
pub fn unpark(mount: &str, conn: &Connection) {
    remove(mount, conn.dev);
}

/// Removes the descriptors parked for mount `mount` at device `dev`.
pub fn remove(mount: &str, dev: u64) {
    for name in names(mount, dev) {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&name)]);
    }
}

/// Drops a parked connection that cannot be taken over (its mount is no
/// longer configured, or configured for another source or state
/// directory): out of the store, aborted and unmounted. Runs blocking.
pub fn discard(mount: &str, parked: Parked) {
    remove(mount, parked.dev);
    crate::launch::detach_dev(parked.dev);
}

/// A connection systemd gave back, by mount name.
pub struct Parked {
    /// The FUSE mount's device number when it was parked.
    pub dev: u64,
    /// Its descriptors.
    pub fds: Descriptors<OwnedFd>,
}

/// The connections systemd passed at start (LISTEN_FDS). Must run before
/// any thread exists (it unsets the LISTEN_* variables, so that workers do
/// not inherit them). Incomplete sets are dropped (and unparked).
pub fn take() -> HashMap<String, Parked> {
    // SAFETY: called first thing in main, before any thread is spawned.
    let Ok(fds) = (unsafe { sd_notify::listen_fds_with_names_and_unset_env() }) else {
        return HashMap::new();
    };
    let mut sets: HashMap<(String, u64), HashMap<&'static str, OwnedFd>> = HashMap::new();
    for (raw, name) in fds {
        // SAFETY: systemd passed this descriptor to this process to own
        // (and sd_notify set it close-on-exec).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut parts = name.splitn(3, '.');
        let (Some(kind), Some(dev), Some(mount)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Some(kind), Ok(dev)) = (KINDS.iter().find(|k| **k == kind), dev.parse()) else {
            continue;
        };
        sets.entry((mount.to_owned(), dev))
            .or_default()
            .insert(kind, fd);
    }
    let mut parked = HashMap::new();
    for ((mount, dev), mut set) in sets {
        match (
            set.remove("fuse"),
            set.remove("source"),
            set.remove("journal"),
        ) {
            (Some(fuse), Some(source), Some(journal)) => {
                let fds = Descriptors {
                    fuse,
                    source,
                    journal,
                };
                parked.insert(mount, Parked { dev, fds });
            }
            _ => {
                tracing::warn!(mount, "an incomplete parked connection was dropped");
                remove(&mount, dev);
            }
        }
    }
    parked
}
