//! What the trimmer counts (`FsCore::load`), on a real FsCore over a real
//! source: every node, and apart those that may hold host descriptors.
//! Files of main, of its snapshots and of branches (their own too) are
//! kept by handle and hold none; directories do.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;

use agentfs_mount_worker::core::{Caller, FsCore, NodeId};

fn lookup(core: &FsCore, parent: NodeId, name: &str) -> NodeId {
    core.lookup(parent, OsStr::new(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .node
}

/// Looks `path` up from the root, one component at a time.
fn walk(core: &FsCore, path: &str) -> NodeId {
    path.split('/')
        .fold(NodeId::ROOT, |node, name| lookup(core, node, name))
}

#[test]
fn only_nodes_that_may_hold_descriptors_count_as_holding() {
    let base = tempfile::Builder::new()
        .prefix("aft-load-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (source, state) = (base.path().join("src"), base.path().join("state"));
    std::fs::create_dir_all(source.join("d")).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    for name in ["f", "g", "h"] {
        std::fs::write(source.join("d").join(name), name).unwrap();
    }
    let dir = File::open(&source).unwrap();
    let core = FsCore::new(
        dir.as_fd(),
        &state,
        Err(std::io::Error::other("no process events in this test")),
    )
    .unwrap();
    core.snapshot_create(Some("s".into())).unwrap();
    core.branch_create("s", Some("b".into())).unwrap();
    let before = core.load();

    // Main: the directory holds one; its three files none.
    for f in ["f", "g", "h"] {
        walk(&core, &format!("d/{f}"));
    }
    let main = core.load();
    assert_eq!(main.nodes - before.nodes, 4, "{main:?}");
    assert_eq!(main.holding - before.holding, 1, "{main:?}");

    // A snapshot of main: the same. `.agentfs` and `snapshots` are
    // permanent virtual nodes, `s` is the snapshot's root (a directory).
    for f in ["f", "g", "h"] {
        walk(&core, &format!(".agentfs/snapshots/s/d/{f}"));
    }
    let snap = core.load();
    assert_eq!(snap.nodes - main.nodes, 5, "{snap:?}");
    assert_eq!(snap.holding - main.holding, 2, "{snap:?}");

    // A branch: the same until a file is copied up.
    let files: Vec<NodeId> = ["f", "g", "h"]
        .iter()
        .map(|f| walk(&core, &format!(".agentfs/branches/b/d/{f}")))
        .collect();
    // The branch's root is a node since the branch was made.
    let branch = core.load();
    assert_eq!(branch.nodes - snap.nodes, 4, "{branch:?}");
    assert_eq!(branch.holding - snap.holding, 1, "{branch:?}");
    // Copied up, made in the branch, or in a layer a snapshot froze, a
    // branch's files are kept by handle too.
    core.setxattr(files[0], OsStr::new("user.x"), b"1", 0)
        .unwrap();
    let d = walk(&core, ".agentfs/branches/b/d");
    let made = core
        .mknod(
            d,
            OsStr::new("made"),
            libc::S_IFREG | 0o644,
            0,
            Caller {
                uid: 0,
                gid: 0,
                umask: 0o022,
            },
        )
        .unwrap()
        .node;
    let changed = core.load();
    assert_eq!(changed.holding, branch.holding, "{changed:?}");
    assert_eq!(changed.nodes, branch.nodes + 1, "{changed:?}");
    // The snapshot's root is a node (a directory) from its making on.
    core.snapshot_branch("b", Some("sb".into())).unwrap();
    let frozen = core.load();
    core.setxattr(files[0], OsStr::new("user.y"), b"2", 0)
        .unwrap();
    core.setxattr(made, OsStr::new("user.y"), b"2", 0).unwrap();
    assert_eq!(core.load().holding, frozen.holding);
    assert!(core.forget(files[0], 1));
    let forgotten = core.load();
    assert_eq!(forgotten.holding, frozen.holding, "{forgotten:?}");
    assert_eq!(forgotten.nodes, frozen.nodes - 1, "{forgotten:?}");
}
