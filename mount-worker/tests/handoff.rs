//! Lookup counting across a worker's crash, on real FsCores sharing a
//! real handoff journal: a successor drops a node exactly when the kernel
//! has let go of every lookup any worker gave it (specs/semantics.md,
//! "Worker crashes"). The kernel's side is played by the test: each
//! `lookup` is one it holds, each `forget` one it sends.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use agentfs_mount_worker::core::{FsCore, NodeId};
use agentfs_mount_worker::handoff::{self, Journal};

struct Setup {
    _base: tempfile::TempDir,
    source: File,
    state: PathBuf,
    journal: OwnedFd,
}

impl Setup {
    fn new() -> Setup {
        let base = tempfile::Builder::new()
            .prefix("aft-handoff-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let (source, state) = (base.path().join("src"), base.path().join("state"));
        std::fs::create_dir_all(&source).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        for name in ["f", "g"] {
            std::fs::write(source.join(name), name).unwrap();
        }
        Setup {
            source: File::open(&source).unwrap(),
            state,
            journal: handoff::create_memfd("aft-handoff", b"test").unwrap(),
            _base: base,
        }
    }

    /// A worker on the connection: the first one (`resume` false) or the
    /// one that takes over from the last.
    fn worker(&self, resume: bool) -> FsCore {
        let (journal, held) = Journal::open(self.journal.try_clone().unwrap(), resume).unwrap();
        FsCore::new(
            self.source.as_fd(),
            Path::new(&self.state),
            Err(std::io::Error::other("no process events in this test")),
        )
        .unwrap()
        .with_handoff(journal, held)
    }
}

fn lookup(core: &FsCore, name: &str) -> NodeId {
    core.lookup(NodeId::ROOT, OsStr::new(name)).unwrap().node
}

/// The race a take-over meets when the kernel evicts an inode it got
/// from the predecessor while a lookup of the same name comes in: the
/// eviction's FORGET carries the predecessor's lookups, the new inode
/// holds this worker's. A successor that counted only its own lookups
/// took the eviction for the end of the node and dropped it under the
/// new inode, whose every request then failed with ESTALE.
#[test]
fn a_successor_drops_a_node_only_once_every_lookup_is_forgotten() {
    let s = Setup::new();
    let first = s.worker(false);
    let f = lookup(&first, "f");
    assert_eq!(lookup(&first, "f"), f, "the same node");
    let g = lookup(&first, "g");
    assert_eq!(lookup(&first, "g"), g);
    drop(first); // the crash

    let second = s.worker(true);
    second.getattr(f).expect("f found again from the journal");
    assert_eq!(lookup(&second, "f"), f, "looked up again: the same node");
    // The old inode's FORGET (the first worker's two lookups) arrives
    // after the new lookup's reply.
    assert!(!second.forget(f, 2), "the new inode still holds a lookup");
    second.getattr(f).expect("f still served");
    // g, never used by the second worker, loses one lookup of two.
    assert!(!second.forget(g, 1));
    drop(second); // a second crash: the counts carry on

    let third = s.worker(true);
    third.getattr(f).expect("f found again after two crashes");
    third.getattr(g).expect("g found again after two crashes");
    assert!(third.forget(f, 1), "f's last lookup");
    assert!(third.forget(g, 1), "g's last lookup");
    assert!(third.getattr(g).is_err(), "g forgotten");
    drop(third);

    let fourth = s.worker(true);
    assert!(fourth.getattr(f).is_err(), "f forgotten for good");
}
