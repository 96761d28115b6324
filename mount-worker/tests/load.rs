//! What the trimmer counts (`FsCore::load`), on a real FsCore over a real
//! source: every node, and apart those that may hold host descriptors.
//! Files of main, of a snapshot of main and of a branch that still shows
//! main's are kept by handle and hold none; directories do, and so does a
//! branch's file from its copy-up on, until the kernel forgets its node.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;

use agentfs_mount_worker::core::{FsCore, NodeId};

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
    core.setxattr(files[0], OsStr::new("user.x"), b"1", 0)
        .unwrap();
    let copied = core.load();
    assert_eq!(copied.holding - branch.holding, 1, "{copied:?}");
    // A second change of it adds nothing; its node forgotten, it counts
    // no more.
    core.setxattr(files[0], OsStr::new("user.y"), b"2", 0)
        .unwrap();
    assert_eq!(core.load().holding, copied.holding);
    assert!(core.forget(files[0], 1));
    let forgotten = core.load();
    assert_eq!(forgotten.holding, branch.holding, "{forgotten:?}");
    assert_eq!(forgotten.nodes, copied.nodes - 1, "{forgotten:?}");
}
