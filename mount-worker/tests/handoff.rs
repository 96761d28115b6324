//! Lookup counting across a worker's crash, on real FsCores sharing a
//! real handoff journal: a successor drops a node exactly when the kernel
//! has let go of every lookup any worker gave it (specs/semantics.md,
//! "Worker crashes"). The kernel's side is played by the test: each
//! `lookup` is one it holds, each `forget` one it sends.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use agentfs_mount_worker::control::ErrorKind;
use agentfs_mount_worker::core::{Caller, Entry, FileHandle, FsCore, NodeId, SetAttr, SetIdBits};
use agentfs_mount_worker::handoff::{self, Journal, Origin, Record};

mod common;

struct Setup {
    _base: tempfile::TempDir,
    source: File,
    state: PathBuf,
    /// The state directory is an ext4 of the test's own (unmounted on drop).
    ext4: bool,
    journal: OwnedFd,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if self.ext4 {
            common::unmount_ext4(&self.state);
        }
    }
}

impl Setup {
    /// With the state directory on an ext4 of its own: the inode numbers
    /// the test frees are not taken by tests running beside it.
    fn on_ext4() -> Setup {
        let mut s = Setup::new();
        let image = s._base.path().join("state.img");
        common::make_ext4(&image, 64);
        common::mount_ext4(&image, &s.state);
        s.ext4 = true;
        s
    }

    /// The host path of `name` in a branch's top layer.
    fn layer_path(&self, name: &str) -> Option<PathBuf> {
        std::fs::read_dir(self.state.join("layers"))
            .unwrap()
            .map(|l| l.unwrap().path().join("tree").join(name))
            .find(|p| p.symlink_metadata().is_ok())
    }

    /// The host inode number of `name` in a branch's top layer.
    fn layer_ino(&self, name: &str) -> Option<u64> {
        Some(std::fs::metadata(self.layer_path(name)?).ok()?.ino())
    }

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
            ext4: false,
            journal: handoff::create_memfd("aft-handoff", b"test").unwrap(),
            _base: base,
        }
    }

    /// Rewrites the journal's nodes as a worker older than object ids in
    /// layer records wrote them.
    fn without_layer_ids(&mut self) {
        let (_, held) = Journal::open(self.journal.try_clone().unwrap(), true).unwrap();
        let older = handoff::create_memfd("aft-handoff", b"test").unwrap();
        let (j, _) = Journal::open(older.try_clone().unwrap(), false).unwrap();
        for (&id, n) in &held.nodes {
            let origin = match n.origin.clone() {
                Origin::Layer { parent, name, .. } => Origin::Layer {
                    parent,
                    name,
                    local: None,
                },
                o => o,
            };
            j.append(&Record::Node {
                id,
                generation: n.generation,
                origin,
                at: n.at.clone(),
            });
            if n.lookups > 1 {
                j.append(&Record::Lookup {
                    id,
                    n: n.lookups - 1,
                });
            }
        }
        for (&fh, &(node, flags)) in &held.files {
            j.append(&Record::File { fh, node, flags });
        }
        self.journal = older;
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

/// Runs `f` on `core` in a thread of its own and waits up to 20 s for it:
/// a request that deadlocks fails the test instead of hanging it.
fn within_20s<T: Send + 'static>(
    core: &Arc<FsCore>,
    what: &str,
    f: impl FnOnce(&FsCore) -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let core = core.clone();
    std::thread::spawn(move || {
        let out = f(&core);
        // Let go of the worker before answering: the caller may crash it.
        drop(core);
        let _ = tx.send(out);
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: no answer within 20 s (deadlocked?)"))
}

/// A directory the predecessor opened is read and flushed through the
/// successor, which finds the handle in the journal and opens the
/// directory again. Before, the first read hung the successor's thread
/// for good: looking the handle up kept the table's read lock through the
/// write that added it.
#[test]
fn a_successor_reads_a_directory_its_predecessor_opened() {
    let s = Setup::new();
    let first = s.worker(false);
    let dh = first.opendir(NodeId::ROOT).unwrap();
    drop(first); // the crash

    let second = Arc::new(s.worker(true));
    let (read, synced, mut names) = within_20s(&second, "readdir", move |c| {
        let mut names = Vec::new();
        let read = c.readdir(dh, 0, |e| {
            names.push(String::from_utf8_lossy(e.name).into_owned());
            false
        });
        (read, c.fsyncdir(dh, false), names)
    });
    read.expect("readdir of the predecessor's handle");
    synced.expect("fsyncdir of the predecessor's handle");
    names.sort();
    assert_eq!(names, [".", "..", "f", "g"]);
    // Released, it is gone: not opened again as the predecessor's.
    second.releasedir(dh);
    let e = second.readdir(dh, 0, |_| false).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADF));
}

/// The node at `names` below the root.
fn lookup_path(core: &FsCore, names: &[&str]) -> NodeId {
    names.iter().fold(NodeId::ROOT, |dir, name| {
        core.lookup(dir, OsStr::new(name)).unwrap().node
    })
}

/// Makes branch `b` of snapshot `s` of main; returns its file `f`.
fn branch_file(core: &FsCore) -> NodeId {
    core.snapshot_create(Some("s".into())).unwrap();
    core.branch_create("s", Some("b".into())).unwrap();
    lookup_path(core, &[".agentfs", "branches", "b", "f"])
}

/// A branch file the predecessor opened is truncated through its handle
/// by the successor (which opens it again, through the branch's layers)
/// while snapshots of the branch are taken: the branch's file changes,
/// main's does not. The reopening used to read the branch's layers lock a
/// second time on the thread that held it already, which waits forever if
/// a snapshot is waiting to write it in between: before the fix about
/// half of the single crashes here hit that window, so the test crashes
/// eight times.
#[test]
fn a_successor_truncates_a_branch_file_its_predecessor_opened() {
    let s = Setup::new();
    let mut worker = Arc::new(s.worker(false));
    let f = branch_file(&worker);
    for round in 0..8u64 {
        let fh = worker.hand_out(worker.open(f, libc::O_RDWR).unwrap());
        drop(worker); // the crash
        worker = Arc::new(s.worker(true));
        let snapshotter = {
            let c = worker.clone();
            std::thread::spawn(move || {
                for i in 0..10 {
                    c.snapshot_branch("b", Some(format!("r{round}-{i}")))
                        .unwrap();
                }
            })
        };
        let size = 10 + round;
        let truncated = within_20s(&worker, "setattr", move |c| {
            let attr = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            c.setattr(f, Some(fh), attr)
        });
        assert_eq!(
            truncated.expect("truncate through the handle").st_size as u64,
            size
        );
        snapshotter.join().unwrap();
        assert_eq!(worker.getattr(f).unwrap().st_size as u64, size);
    }
    let main_f = worker.getattr(lookup(&worker, "f")).unwrap();
    assert_eq!(main_f.st_size, 1, "main's f keeps its byte");
}

/// A file of a branch the predecessor opened keeps the branch busy for
/// the successor before the kernel uses it again: a deletion without
/// force is refused, and goes ahead once the file is released. Before, the
/// successor counted only the files it had opened itself, and deleted the
/// branch under the application's descriptor.
#[test]
fn a_branch_file_open_before_a_crash_keeps_the_branch_busy() {
    let s = Setup::new();
    let first = s.worker(false);
    let f = branch_file(&first);
    let fh = first.hand_out(first.open(f, libc::O_RDONLY).unwrap());
    drop(first); // the crash

    let second = s.worker(true);
    let e = second.branch_delete("b", false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
    assert!(e.message.contains("1 open file(s)"), "{}", e.message);
    assert_eq!(second.read(fh, 0, 8).unwrap(), b"f", "the file still reads");
    second.release(fh);
    second
        .branch_delete("b", false)
        .expect("deleted once released");
}

/// An open the predecessor carried out but never answered (it died
/// first) is not the kernel's: the kernel sends the OPEN again and never
/// releases the first handle. The successor must not count it: before,
/// it kept the branch busy for good (and would have kept a passthrough
/// backing file open, and a main file copied at every snapshot).
#[test]
fn an_open_a_crash_cut_short_keeps_nothing_busy() {
    let s = Setup::new();
    let first = s.worker(false);
    let f = branch_file(&first);
    let _never_answered = first.open(f, libc::O_RDONLY).unwrap();
    drop(first); // the crash, before the reply

    let second = s.worker(true);
    // The OPEN sent again, answered and released.
    let fh = second.hand_out(second.open(f, libc::O_RDONLY).unwrap());
    assert_eq!(second.read(fh, 0, 8).unwrap(), b"f");
    second.release(fh);
    second
        .branch_delete("b", false)
        .expect("no open file left in the branch");
}

/// A branch file that a successor finds by a second name (a hard link
/// made before the crash) gets a node id of its own, which the next
/// successor knows by that name only. When that successor renames it and
/// makes a new file under the old name, a descriptor held across both
/// crashes must still reach the renamed file, never the new one.
#[test]
fn a_hard_link_held_across_two_crashes_keeps_its_file_when_renamed() {
    let s = Setup::new();
    let first = s.worker(false);
    let f = branch_file(&first);
    let b = lookup_path(&first, &[".agentfs", "branches", "b"]);
    assert_eq!(first.link(f, b, OsStr::new("h")).unwrap().node, f);
    drop(first); // the first crash

    let second = s.worker(true);
    let h = second.lookup(b, OsStr::new("h")).unwrap().node;
    assert_ne!(h, f, "found by another name than the journal's");
    let fh = second.hand_out(second.open(h, libc::O_WRONLY).unwrap());
    drop(second); // the second crash

    let third = s.worker(true);
    third
        .rename(b, OsStr::new("h"), b, OsStr::new("h.1"), 0)
        .unwrap();
    make_file(&third, b, "h", b"");
    third
        .write(fh, 0, b"X", false, SetIdBits::Keep)
        .expect("the held descriptor still writes its file");
    let read = |name: &str| {
        let node = third.lookup(b, OsStr::new(name)).unwrap().node;
        let fh = third.hand_out(third.open(node, libc::O_RDONLY).unwrap());
        let data = third.read(fh, 0, 8).unwrap();
        third.release(fh);
        data
    };
    assert_eq!(read("h.1"), b"X", "the renamed file got the write");
    assert_eq!(read("h"), b"", "the new file did not");
}

/// A worker taking over from one older than object ids in layer records
/// finds held branch nodes again under their ids, by a lookup or through
/// an open file, and records them anew with the object's id.
#[test]
fn branch_nodes_of_an_older_worker_keep_their_ids() {
    let mut s = Setup::new();
    let first = s.worker(false);
    let f = branch_file(&first);
    let g_path = [".agentfs", "branches", "b", "g"];
    let g = lookup_path(&first, &g_path);
    let fh = first.hand_out(first.open(f, libc::O_RDONLY).unwrap());
    drop(first); // the crash
    s.without_layer_ids();

    let second = s.worker(true);
    assert_eq!(lookup_path(&second, &g_path), g);
    assert_eq!(second.read(fh, 0, 8).unwrap(), b"f");
    drop(second);
    let (_, held) = Journal::open(s.journal.try_clone().unwrap(), true).unwrap();
    for node in [f, g] {
        assert!(
            matches!(
                held.nodes[&node.0].origin,
                Origin::Layer { local: Some(_), .. }
            ),
            "{:?}",
            held.nodes[&node.0]
        );
    }
}

/// How a test removes a branch file: through the worker, or on the host
/// as a worker that dies before it answers (and journals) does, the
/// kernel then sending the request again to the successor.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Removal {
    Unlink,
    RenameOver,
    UnlinkUnanswered,
    RenameOverUnanswered,
}

const ROOT: Caller = Caller {
    uid: 0,
    gid: 0,
    umask: 0o022,
};

/// Makes file `name` in `dir` holding `data`, as a process that closes
/// it and whose kernel then forgets it.
fn make_file(core: &FsCore, dir: NodeId, name: &str, data: &[u8]) {
    let (e, new) = core
        .create(dir, OsStr::new(name), 0o644, libc::O_WRONLY, ROOT)
        .unwrap();
    let fh = core.hand_out(new);
    core.write(fh, 0, data, false, SetIdBits::Keep).unwrap();
    core.release(fh);
    core.forget(e.node, 1);
}

/// A successor that met a reused inode number: the branch file a
/// predecessor removed (`removal`) while open, that handle, its node, and
/// the new file of the branch that got its host inode number, named `t<i>`.
struct Reused {
    successor: FsCore,
    b: NodeId,
    fh: FileHandle,
    removed: Entry,
    name: String,
}

/// Makes branch file `b/n`, opens it, removes it and crashes; then makes
/// files in the branch until one gets its host inode number: `None` if
/// none of 50 did (a spare layer made meanwhile took it).
fn removed_then_reused(s: &Setup, removal: Removal) -> Option<Reused> {
    let first = s.worker(false);
    branch_file(&first);
    let b = lookup_path(&first, &[".agentfs", "branches", "b"]);
    let (removed, new) = first
        .create(b, OsStr::new("n"), 0o644, libc::O_RDWR, ROOT)
        .unwrap();
    let fh = first.hand_out(new);
    first.write(fh, 0, b"old", false, SetIdBits::Keep).unwrap();
    let ino = s.layer_ino("n").expect("made in the top layer");
    let (n, over) = (OsStr::new("n"), OsStr::new("over"));
    // The file renamed over it, held open across the crash too.
    let mut over_fh = None;
    let mut make_over = || {
        let (_, new) = first.create(b, over, 0o644, libc::O_RDWR, ROOT).unwrap();
        let fh = first.hand_out(new);
        first.write(fh, 0, b"over", false, SetIdBits::Keep).unwrap();
        over_fh = Some(fh);
    };
    match removal {
        Removal::Unlink => first.unlink(b, n).unwrap(),
        Removal::RenameOver => {
            make_over();
            first.rename(b, over, b, n, 0).unwrap();
        }
        Removal::UnlinkUnanswered => std::fs::remove_file(s.layer_path("n").unwrap()).unwrap(),
        Removal::RenameOverUnanswered => {
            make_over();
            let (from, to) = (s.layer_path("over").unwrap(), s.layer_path("n").unwrap());
            std::fs::rename(from, to).unwrap();
        }
    }
    drop(first); // the crash: the removed file's last descriptor goes

    let successor = s.worker(true);
    // The requests sent again, done already, as `fuse_adapter` answers them.
    let enoent =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOENT));
    match removal {
        Removal::UnlinkUnanswered => {
            enoent(successor.unlink(b, n));
            successor.removed_before_takeover(b, n);
        }
        Removal::RenameOverUnanswered => {
            enoent(successor.rename(b, over, b, n, 0));
            successor.renamed_before_takeover(b, over, b, n);
        }
        _ => {}
    }
    if let Some(fh) = over_fh {
        let read = successor.read(fh, 0, 8).unwrap();
        assert_eq!(read, b"over", "{removal:?}: the file renamed over it");
        successor.release(fh);
    }
    let name = reuse_number(s, &successor, b, ino)?;
    Some(Reused {
        successor,
        b,
        fh,
        removed,
        name,
    })
}

/// Makes files `t<i>` in branch directory `dir` until one gets host inode
/// number `ino`: its name, `None` if none of 50 did.
fn reuse_number(s: &Setup, core: &FsCore, dir: NodeId, ino: u64) -> Option<String> {
    (0..50)
        .map(|i| {
            let name = format!("t{i}");
            make_file(core, dir, &name, b"new");
            name
        })
        .find(|name| s.layer_ino(name) == Some(ino))
}

/// Runs `scenario` on state file systems of their own until it meets a
/// reused inode number (`Some`): the freed number goes to the spare
/// layer's directories when the worker makes them in between (a race).
/// The setup comes first, so that a `let` binding drops it last, after
/// the workers on it.
fn until_reused<T>(scenario: impl Fn(&Setup) -> Option<T>) -> (Setup, T) {
    (0..10)
        .map(|_| Setup::on_ext4())
        .find_map(|s| scenario(&s).map(|t| (s, t)))
        .expect("the host reuses the inode number in one of 10 tries")
}

/// A branch file removed while open, then a crash, which closes its last
/// descriptor: the host may give its inode number, which the object's id
/// is made of, to the next file made in the branch. A successor must not
/// take that file for the removed one once it has the removed one's name
/// (the journal found a branch node by name and id): the held descriptor
/// answers ESTALE, the new file gets a node of its own. Before, the held
/// descriptor read and wrote the new file.
#[test]
fn a_branch_file_removed_before_a_crash_is_not_the_next_file_of_its_number() {
    for removal in [
        Removal::Unlink,
        Removal::RenameOver,
        Removal::UnlinkUnanswered,
        Removal::RenameOverUnanswered,
    ] {
        let (_s, r) = until_reused(|s| removed_then_reused(s, removal));
        let c = &r.successor;
        c.rename(r.b, OsStr::new(&r.name), r.b, OsStr::new("n"), 0)
            .unwrap();
        let found = c.lookup(r.b, OsStr::new("n")).unwrap();
        assert!(
            (found.node, found.generation) != (r.removed.node, r.removed.generation),
            "{removal:?}: the new file took the removed one's node"
        );
        let read = c.read(r.fh, 0, 8).map_err(|e| e.raw_os_error());
        assert_eq!(read, Err(Some(libc::ESTALE)), "{removal:?}");
        let fh = c.hand_out(c.open(found.node, libc::O_RDONLY).unwrap());
        assert_eq!(c.read(fh, 0, 8).unwrap(), b"new", "{removal:?}");
        c.release(fh);
    }
}

/// A branch file open under one of its two names loses the other one,
/// then the worker crashes: the successor still reaches it through the
/// open handle (it left no view: the removal of a name that is not its
/// last does not journal it as removed).
#[test]
fn a_branch_file_that_lost_another_name_is_found_after_a_crash() {
    let s = Setup::new();
    let first = s.worker(false);
    let f = branch_file(&first);
    let b = lookup_path(&first, &[".agentfs", "branches", "b"]);
    first.link(f, b, OsStr::new("h")).unwrap();
    let fh = first.hand_out(first.open(f, libc::O_RDWR).unwrap());
    first.unlink(b, OsStr::new("h")).unwrap();
    drop(first); // the crash

    let second = s.worker(true);
    assert_eq!(second.read(fh, 0, 8).unwrap(), b"f");
}

/// A hard-linked branch file that a successor knows by its second name
/// (a node id of its own, recorded at that name) loses that name, there
/// or after a second crash, then its last: a new file of its inode number
/// under the second name is not that node's either.
#[test]
fn a_hard_link_known_by_its_second_name_is_not_the_next_file_of_its_number() {
    let (h, n) = (OsStr::new("h"), OsStr::new("n"));
    for unlinked_by_second in [false, true] {
        let (_s, (third, b, fh, by_h, name)) = until_reused(|s| {
            let first = s.worker(false);
            branch_file(&first);
            let b = lookup_path(&first, &[".agentfs", "branches", "b"]);
            make_file(&first, b, "n", b"old");
            let node = first.lookup(b, n).unwrap().node;
            first.link(node, b, h).unwrap();
            let ino = s.layer_ino("n").unwrap();
            drop(first); // the first crash

            let second = s.worker(true);
            let by_h = second.lookup(b, h).unwrap().node;
            assert_ne!(by_h, node, "found by another name than the journal's");
            let fh = second.hand_out(second.open(by_h, libc::O_RDONLY).unwrap());
            if unlinked_by_second {
                second.unlink(b, h).unwrap();
            }
            drop(second); // the second crash

            let third = s.worker(true);
            if !unlinked_by_second {
                third.unlink(b, h).unwrap();
            }
            third.unlink(b, n).unwrap();
            let name = reuse_number(s, &third, b, ino)?;
            Some((third, b, fh, by_h, name))
        });
        third.rename(b, OsStr::new(&name), b, h, 0).unwrap();
        // The held handle used first: nothing else has found the new file.
        let read = third.read(fh, 0, 8).map_err(|e| e.raw_os_error());
        assert_eq!(read, Err(Some(libc::ESTALE)), "{unlinked_by_second}");
        assert_ne!(third.lookup(b, h).unwrap().node, by_h);
    }
}

/// A successor that knows a held branch file by its second name (a node
/// id of its own) renames the first name, which the predecessor's node
/// was recorded at, and crashes: the next successor finds that node at
/// its new name. Before, only the table's node was journaled there, and
/// the predecessor's answered ESTALE.
#[test]
fn a_held_name_renamed_by_a_successor_that_knew_another_is_found_again() {
    let s = Setup::new();
    let first = s.worker(false);
    let f = branch_file(&first);
    let b = lookup_path(&first, &[".agentfs", "branches", "b"]);
    first.link(f, b, OsStr::new("h")).unwrap();
    let fh = first.hand_out(first.open(f, libc::O_RDONLY).unwrap());
    drop(first); // the first crash

    let second = s.worker(true);
    let by_h = second.lookup(b, OsStr::new("h")).unwrap().node;
    assert_ne!(by_h, f, "found by another name than the journal's");
    second
        .rename(b, OsStr::new("f"), b, OsStr::new("f.1"), 0)
        .unwrap();
    drop(second); // the second crash

    let third = s.worker(true);
    assert_eq!(third.read(fh, 0, 8).unwrap(), b"f");
}
