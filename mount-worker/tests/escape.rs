//! Escape attempts from inside the mount (issue 6): whatever names,
//! symlinks, hard links and host-side renames do, the worker reads and
//! writes nothing outside the source and the state directory. These run on
//! an unconfined worker on purpose: they test the worker's own path
//! discipline (descriptors, `openat2` beneath, no string paths), which must
//! hold without the sandbox's Landlock rules behind it.

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

/// A directory next to the mount's source, outside source and state, that
/// only root may write.
fn outside(m: &common::Mount) -> PathBuf {
    let o = m.source().parent().unwrap().join("outside");
    fs::create_dir_all(&o).unwrap();
    fs::set_permissions(&o, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(o.join("f"), "outside\n").unwrap();
    o
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A directory the kernel has looked up is replaced on the host by a
/// symlink to a directory outside. Creating a file in it through the mount
/// either reaches the original directory (the worker holds it by
/// descriptor) or is the caller's own symlink resolution (refused here,
/// the caller being nobody): never a file created outside by the worker.
#[test]
fn a_directory_swapped_for_a_symlink_does_not_redirect_the_worker() {
    let m = common::Mount::builder()
        .populate(|src| {
            fs::create_dir(src.join("d")).unwrap();
            fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o777)).unwrap();
        })
        .start();
    let out = outside(&m);
    assert!(m.path().join("d").is_dir());
    fs::rename(m.source().join("d"), m.source().join("d-old")).unwrap();
    symlink(&out, m.source().join("d")).unwrap();
    let created = common::run_as(
        65534,
        65534,
        Path::new("/"),
        &format!("echo new > {}/d/new", m.path().display()),
    );
    assert_eq!(
        listing(&out),
        ["f"],
        "the worker wrote outside ({created:?})"
    );
    if created.status.success() {
        assert_eq!(
            fs::read_to_string(m.source().join("d-old/new")).unwrap(),
            "new\n"
        );
    }
}

/// A file of the source hard-linked to a file outside: writing it in a
/// branch copies it up into the branch, and the outside file (the same
/// inode as the source's) is left alone.
#[test]
fn a_hard_link_to_outside_is_copied_up_not_written_through() {
    let m = common::Mount::new();
    let out = outside(&m);
    fs::hard_link(out.join("f"), m.source().join("hl")).unwrap();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let in_branch = common::branch_dir(&m, "b").join("hl");
    assert_eq!(fs::read_to_string(&in_branch).unwrap(), "outside\n");
    fs::write(&in_branch, "branch\n").unwrap();
    assert_eq!(fs::read_to_string(&in_branch).unwrap(), "branch\n");
    assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "outside\n");
    assert_eq!(listing(&out), ["f"]);
}

/// Names with dots never leave the tree: `..` out of `.agentfs` and out of
/// a branch is resolved by the kernel within the mount.
#[test]
fn dot_dot_through_agentfs_stays_in_the_mount() {
    let m = common::Mount::new();
    let out = outside(&m);
    fs::write(m.path().join("top"), "main\n").unwrap();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let up = m.path().join(".agentfs/branches/b/../../../top");
    assert_eq!(fs::read_to_string(&up).unwrap(), "main\n");
    assert_eq!(listing(&out), ["f"]);
}
