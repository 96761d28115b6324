//! Snapshots of main on real mounts: taken through the control channel,
//! read at `.agentfs/snapshots/<name>/`, never changed by anything main does
//! afterwards (also through descriptors and maps opened before), read-only,
//! durable across a worker kill, and deleted with their space.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agentfs_mount_worker::control::{self, ErrorKind, Request};
use common::{Mount, tree};

fn create(m: &Mount, name: &str) -> serde_json::Value {
    common::snapshot(m, None, name)
}

fn snap(m: &Mount, name: &str) -> PathBuf {
    common::snapshot_dir(m, name)
}

fn populate(s: &Path) {
    fs::create_dir_all(s.join("dir/sub")).unwrap();
    fs::write(s.join("a.txt"), b"alpha").unwrap();
    fs::write(s.join("dir/b.txt"), vec![b'b'; 10_000]).unwrap();
    fs::write(s.join("dir/sub/c.txt"), b"charlie").unwrap();
    fs::write(s.join("mapped"), vec![0u8; 8192]).unwrap();
    fs::write(s.join("victim"), b"to be deleted").unwrap();
    fs::write(s.join("moved"), b"to be renamed").unwrap();
    std::os::unix::fs::symlink("a.txt", s.join("link")).unwrap();
    fs::create_dir(s.join("emptydir")).unwrap();
    fs::create_dir(s.join("gone")).unwrap();
    fs::write(s.join("gone/x.txt"), b"x").unwrap();
    fs::write(s.join("gone/y.txt"), b"y").unwrap();
}

#[test]
fn snapshot_never_changes_whatever_main_does() {
    let m = Mount::builder().populate(populate).start();
    let p = m.path();
    std::process::Command::new("setfattr")
        .args(["-n", "user.k", "-v", "before"])
        .arg(p.join("a.txt"))
        .status()
        .unwrap();
    // Opened before the snapshot: a descriptor and a shared map.
    let mut old_fd = OpenOptions::new()
        .write(true)
        .open(p.join("dir/b.txt"))
        .unwrap();
    let mapped = common::SharedMap::new(&p.join("mapped"));

    let created = create(&m, "s1");
    assert_eq!(created["name"], "s1");
    let before = tree(&snap(&m, "s1"));
    assert_eq!(before.len(), 13, "{before:#?}");
    assert_eq!(fs::read(snap(&m, "s1").join("a.txt")).unwrap(), b"alpha");

    // Every kind of change in main.
    old_fd.write_all(b"CHANGED THROUGH AN OLD FD").unwrap();
    drop(old_fd);
    mapped.write_and_sync(0, b"mmap!");
    drop(mapped);
    fs::write(p.join("a.txt"), b"overwritten").unwrap();
    OpenOptions::new()
        .write(true)
        .open(p.join("dir/sub/c.txt"))
        .unwrap()
        .set_len(2)
        .unwrap();
    fs::set_permissions(p.join("dir/sub/c.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::process::Command::new("setfattr")
        .args(["-n", "user.k", "-v", "after"])
        .arg(p.join("a.txt"))
        .status()
        .unwrap();
    fs::rename(p.join("moved"), p.join("dir/moved-here")).unwrap();
    fs::remove_file(p.join("victim")).unwrap();
    fs::remove_dir(p.join("emptydir")).unwrap();
    // Read through the snapshot above, so the worker may hold it open.
    fs::remove_dir_all(p.join("gone")).unwrap();
    fs::write(p.join("dir/new.txt"), b"new").unwrap();
    fs::hard_link(p.join("a.txt"), p.join("a-link")).unwrap();
    std::os::unix::fs::chown(p.join("a.txt"), Some(1000), Some(1000)).unwrap();
    fs::remove_file(p.join("link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", p.join("link")).unwrap();

    assert_eq!(tree(&snap(&m, "s1")), before, "the snapshot changed");
    // Main has every change, in the source itself.
    assert_eq!(fs::read(m.source().join("a.txt")).unwrap(), b"overwritten");
    assert!(!m.source().join("victim").exists());
    assert_eq!(&fs::read(m.source().join("mapped")).unwrap()[..5], b"mmap!");
    assert_eq!(
        fs::read_to_string(snap(&m, "s1").join("victim")).unwrap(),
        "to be deleted"
    );
}

#[test]
fn snapshots_are_read_only() {
    let m = Mount::builder().populate(populate).start();
    create(&m, "ro");
    common::assert_read_only(&snap(&m, "ro"));
    assert_eq!(
        fs::create_dir(m.path().join(".agentfs/snapshots/new"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS),
        "mkdir in .agentfs"
    );
}

#[test]
fn agentfs_is_hidden_but_resolves() {
    let m = Mount::builder().populate(populate).start();
    let names: Vec<_> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(!names.iter().any(|n| n == ".agentfs"), "{names:?}");
    assert!(m.path().join(".agentfs").is_dir());
    let mut inside: Vec<_> = fs::read_dir(m.path().join(".agentfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    inside.sort();
    assert_eq!(inside, ["branches", "snapshots"]);
    assert_eq!(
        fs::read_dir(m.path().join(".agentfs/snapshots"))
            .unwrap()
            .count(),
        0
    );
    create(&m, "one");
    create(&m, "two");
    let mut listed: Vec<_> = fs::read_dir(m.path().join(".agentfs/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, ["one", "two"]);
    // The same path in main and in a snapshot are different inodes.
    let main_ino = fs::metadata(m.path().join("a.txt")).unwrap().ino();
    let snap_ino = fs::metadata(snap(&m, "one").join("a.txt")).unwrap().ino();
    assert_ne!(main_ino, snap_ino);
    assert_eq!(
        snap_ino & ((1 << 44) - 1),
        main_ino,
        "same host inode, another view"
    );
}

#[test]
fn each_snapshot_keeps_its_own_moment() {
    let m = Mount::builder().populate(populate).start();
    let f = m.path().join("a.txt");
    create(&m, "v1");
    fs::write(&f, b"second").unwrap();
    create(&m, "v2");
    fs::write(&f, b"third").unwrap();
    fs::write(&f, b"fourth").unwrap();
    create(&m, "v3");
    fs::remove_file(&f).unwrap();
    assert_eq!(fs::read(snap(&m, "v1").join("a.txt")).unwrap(), b"alpha");
    assert_eq!(fs::read(snap(&m, "v2").join("a.txt")).unwrap(), b"second");
    assert_eq!(fs::read(snap(&m, "v3").join("a.txt")).unwrap(), b"fourth");
    assert!(!f.exists());
}

#[test]
fn snapshots_survive_kill_9_and_restart() {
    let mut m = Mount::builder().populate(populate).start();
    create(&m, "durable");
    fs::write(m.path().join("a.txt"), b"after the snapshot").unwrap();
    fs::remove_dir_all(m.path().join("dir")).unwrap();
    let before = tree(&snap(&m, "durable"));
    m.kill();
    m.restart(&[]);
    assert_eq!(tree(&snap(&m, "durable")), before);
    let list = control::call(m.state_dir(), &Request::SnapshotList {}).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        fs::read(m.path().join("a.txt")).unwrap(),
        b"after the snapshot"
    );
}

#[test]
fn delete_frees_preimages_and_errors_name_the_snapshot() {
    let m = Mount::builder().populate(populate).start();
    create(&m, "old");
    fs::write(m.path().join("a.txt"), b"1").unwrap();
    create(&m, "new");
    fs::write(m.path().join("dir/b.txt"), b"2").unwrap();
    let preserved = m.state_dir().join("preserved");
    let count = || fs::read_dir(&preserved).unwrap().count();
    assert!(count() >= 2);
    // Duplicate, unknown and invalid names.
    let e = control::call(
        m.state_dir(),
        &Request::SnapshotCreate {
            branch: None,
            name: Some("old".into()),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists);
    assert!(e.message.contains("\"old\""), "{}", e.message);
    let e = control::call(
        m.state_dir(),
        &Request::SnapshotDelete {
            snapshot: "nope".into(),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("nope"), "{}", e.message);
    let e = control::call(
        m.state_dir(),
        &Request::SnapshotCreate {
            branch: None,
            name: Some("a/b".into()),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);

    control::call(
        m.state_dir(),
        &Request::SnapshotDelete {
            snapshot: "old".into(),
        },
    )
    .unwrap();
    control::call(
        m.state_dir(),
        &Request::SnapshotDelete {
            snapshot: "new".into(),
        },
    )
    .unwrap();
    assert_eq!(count(), 0, "no snapshot left, so no pre-image either");
    assert!(!snap(&m, "old").exists());
    // Main is untouched by all of it.
    assert_eq!(fs::read(m.path().join("a.txt")).unwrap(), b"1");
}

#[test]
fn kill_9_mid_workload_loses_nothing_acknowledged() {
    let mut m = Mount::builder().populate(populate).start();
    create(&m, "base");
    let before = tree(&snap(&m, "base"));
    let acked = m.source().parent().unwrap().join("acked.log");
    let mut writer =
        common::start_acked_workload(std::process::Command::new("python3"), m.path(), &acked);
    for i in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        create(&m, &format!("mid{i}"));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    common::wait_acknowledged(&acked);
    m.kill();
    let _ = writer.wait();
    m.restart(&[]);

    let report = common::check_state(m.state_dir());
    assert!(report.contains("6 snapshots"), "{report}");

    assert_eq!(tree(&snap(&m, "base")), before, "the snapshot changed");
    common::assert_acknowledged(m.source(), &acked);
    // Each mid-workload snapshot is a consistent prefix of the workload.
    for i in 0..5 {
        common::assert_workload_prefix(&snap(&m, &format!("mid{i}")));
    }
}

#[test]
fn check_tool_reports_damage_and_changes_nothing() {
    let mut m = Mount::builder().populate(populate).start();
    create(&m, "s");
    fs::write(m.path().join("a.txt"), b"changed").unwrap();
    m.stop();
    let run = || common::check_report(m.state_dir());
    let (ok, report) = run();
    assert!(ok, "{report}");
    assert!(
        report.contains("1 snapshots") && report.contains("0 problems"),
        "{report}"
    );
    // Damage a preserved file's content: named, exit 1, and left as it was.
    let data = fs::read_dir(m.state_dir().join("preserved"))
        .unwrap()
        .flat_map(|h| fs::read_dir(h.unwrap().path()).unwrap())
        .map(|t| t.unwrap().path().join("data"))
        .find(|p| p.exists())
        .expect("a.txt was preserved");
    fs::write(&data, b"x").unwrap();
    let (ok, report) = run();
    assert!(
        !ok && report.contains("problem:") && report.contains("/data: 1 bytes"),
        "{report}"
    );
    assert_eq!(
        fs::read(&data).unwrap(),
        b"x",
        "the check must not repair or change"
    );
    fs::write(m.state_dir().join("catalog.json"), b"{ not json").unwrap();
    let (ok, report) = run();
    assert!(!ok && report.contains("catalog.json"), "{report}");
}

#[test]
fn full_state_directory_refuses_the_change_and_damages_nothing() {
    let m = Mount::builder()
        .state_on_tmpfs("1m")
        .populate(|s| {
            fs::write(s.join("big"), vec![7u8; 3 << 20]).unwrap();
            fs::write(s.join("small"), b"small").unwrap();
        })
        .start();
    let p = m.path();
    create(&m, "s");
    // Preserving "big" (3 MiB) cannot fit in 1 MiB: the write fails with
    // ENOSPC, and neither main nor the snapshot changes.
    let e = OpenOptions::new()
        .write(true)
        .open(p.join("big"))
        .and_then(|mut f| f.write_all(b"x"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(
        fs::read(m.source().join("big")).unwrap(),
        vec![7u8; 3 << 20]
    );
    assert_eq!(
        fs::read(snap(&m, "s").join("big")).unwrap(),
        vec![7u8; 3 << 20]
    );
    // Changes whose pre-images fit still work.
    fs::write(p.join("small"), b"changed").unwrap();
    assert_eq!(fs::read(snap(&m, "s").join("small")).unwrap(), b"small");
    // A snapshot cannot be recorded on a full disk either: no-space, and the
    // catalog stays as it was.
    let filler = m.state_dir().join("filler");
    let _ = fs::write(&filler, vec![0u8; 2 << 20]);
    let e = control::call(
        m.state_dir(),
        &Request::SnapshotCreate {
            branch: None,
            name: Some("t".into()),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace, "{}", e.message);
    fs::remove_file(&filler).unwrap();
    let report = common::check_state(m.state_dir());
    assert!(report.contains("0 garbage"), "{report}");
    // Space freed: everything works again.
    create(&m, "t");
    control::call(
        m.state_dir(),
        &Request::SnapshotDelete {
            snapshot: "s".into(),
        },
    )
    .unwrap();
    control::call(
        m.state_dir(),
        &Request::SnapshotDelete {
            snapshot: "t".into(),
        },
    )
    .unwrap();
    let mut f = OpenOptions::new().write(true).open(p.join("big")).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    assert_eq!(fs::read(m.source().join("big")).unwrap()[0], b'x');
}

#[test]
fn a_failing_state_disk_refuses_changes_and_damages_nothing() {
    let mut m = Mount::builder()
        .state_on_ext4(64)
        .populate(|s| fs::write(s.join("f"), b"before").unwrap())
        .start();
    let p = m.path().to_owned();
    create(&m, "s");
    common::branch(&m, "s", "b");
    // The state directory's disk fails: the kernel turns it read-only
    // under the worker.
    m.fail_state_disk();
    // A change in main needs a pre-image it cannot store: refused, not made.
    let e = fs::write(p.join("f"), b"after").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(fs::read(m.source().join("f")).unwrap(), b"before");
    // A branch cannot copy the file up.
    let e = fs::write(p.join(".agentfs/branches/b/f"), b"b").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Snapshots cannot be recorded: a named error.
    let e = control::call(
        m.state_dir(),
        &Request::SnapshotCreate {
            branch: None,
            name: Some("t".into()),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io, "{}", e.message);
    assert!(
        e.message.contains("catalog.log") && e.message.contains("nothing was changed"),
        "{}",
        e.message
    );
    assert_eq!(fs::read(snap(&m, "s").join("f")).unwrap(), b"before");
    // Repaired (unmount, e2fsck, mount) and started again: everything
    // works, nothing was damaged.
    m.stop();
    m.repair_state_disk();
    m.restart(&[]);
    assert_eq!(fs::read(snap(&m, "s").join("f")).unwrap(), b"before");
    fs::write(p.join("f"), b"after").unwrap();
    fs::write(p.join(".agentfs/branches/b/f"), b"b").unwrap();
    create(&m, "t");
    assert_eq!(fs::read(snap(&m, "s").join("f")).unwrap(), b"before");
    assert_eq!(fs::read(snap(&m, "t").join("f")).unwrap(), b"after");
    assert_eq!(fs::read(p.join(".agentfs/branches/b/f")).unwrap(), b"b");
    common::check_state(m.state_dir());
}

/// The state directory's disk fails with EIO (a disk that answers every
/// read, write and flush with an I/O error, under ext4 on a loop device):
/// changes that need the state directory are refused with an errno, not
/// made; snapshots are refused with a named error; nothing stored is
/// damaged, and after repair everything works again.
#[test]
fn a_state_disk_failing_with_eio_refuses_changes_and_damages_nothing() {
    let mut m = Mount::builder()
        .state_on_failing_disk(64)
        .populate(|s| fs::write(s.join("f"), b"before").unwrap())
        .start();
    let p = m.path().to_owned();
    create(&m, "s");
    common::branch(&m, "s", "b");
    m.fail_state_disk_with_eio();
    // A change in main needs a pre-image it cannot store durably.
    let e = fs::write(p.join("f"), b"after").unwrap_err();
    let errno = e.raw_os_error();
    assert!(
        matches!(errno, Some(libc::EIO) | Some(libc::EROFS)),
        "a change of main: {e}"
    );
    assert_eq!(fs::read(m.source().join("f")).unwrap(), b"before");
    // A branch cannot copy the file up.
    let e = fs::write(p.join(".agentfs/branches/b/f"), b"b").unwrap_err();
    assert!(
        matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EROFS)),
        "a copy-up: {e}"
    );
    // Snapshots cannot be recorded: a named error.
    let e = control::call(
        m.state_dir(),
        &Request::SnapshotCreate {
            branch: None,
            name: Some("t".into()),
        },
    )
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Io, "{}", e.message);
    assert!(
        e.message.contains("catalog.log") && e.message.contains("nothing was changed"),
        "{}",
        e.message
    );
    // Repaired (the disk works again; unmount, e2fsck, mount) and started
    // again: everything works, nothing was damaged.
    m.stop();
    m.repair_state_disk();
    m.restart(&[]);
    assert_eq!(fs::read(snap(&m, "s").join("f")).unwrap(), b"before");
    fs::write(p.join("f"), b"after").unwrap();
    fs::write(p.join(".agentfs/branches/b/f"), b"b").unwrap();
    create(&m, "t");
    assert_eq!(fs::read(snap(&m, "s").join("f")).unwrap(), b"before");
    assert_eq!(fs::read(snap(&m, "t").join("f")).unwrap(), b"after");
    assert_eq!(fs::read(p.join(".agentfs/branches/b/f")).unwrap(), b"b");
    common::check_state(m.state_dir());
}

#[test]
fn the_control_directory_name_cannot_be_changed_in_the_root() {
    // A source that has its own `.agentfs`: hidden by the control directory,
    // and no operation through the mount may reach it.
    let m = Mount::builder()
        .populate(|s| fs::write(s.join(".agentfs"), b"the source's own").unwrap())
        .start();
    let p = m.path();
    assert!(p.join(".agentfs/snapshots").is_dir());
    // The kernel sees a directory there and refuses some calls itself
    // (EISDIR, EEXIST); those that reach the worker are refused with EROFS.
    let fails = |r: std::io::Result<()>, errno: i32, what: &str| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(errno), "{what}");
    };
    fails(fs::remove_file(p.join(".agentfs")), libc::EISDIR, "unlink");
    fails(fs::remove_dir(p.join(".agentfs")), libc::EROFS, "rmdir");
    fs::write(p.join("x"), b"x").unwrap();
    fails(
        fs::rename(p.join("x"), p.join(".agentfs")),
        libc::EISDIR,
        "rename onto",
    );
    fails(
        fs::rename(p.join(".agentfs"), p.join("y")),
        libc::EROFS,
        "rename from",
    );
    fails(
        fs::hard_link(p.join("x"), p.join(".agentfs")),
        libc::EEXIST,
        "link",
    );
    fs::create_dir(p.join("d")).unwrap();
    fails(
        fs::rename(p.join("d"), p.join(".agentfs")),
        libc::EROFS,
        "rename a directory onto",
    );
    assert_eq!(
        fs::read(m.source().join(".agentfs")).unwrap(),
        b"the source's own"
    );
    // Below the root, `.agentfs` is an ordinary name.
    fs::create_dir(p.join("sub")).unwrap();
    fs::write(p.join("sub/.agentfs"), b"ordinary").unwrap();
    fs::remove_file(p.join("sub/.agentfs")).unwrap();
}

#[test]
fn what_main_makes_after_the_newest_snapshot_is_not_copied_for_it() {
    let m = Mount::builder().populate(populate).start();
    let p = m.path();
    create(&m, "s1");
    let populated = tree(&snap(&m, "s1"));
    let preserved = m.state_dir().join("preserved");
    let count = || fs::read_dir(&preserved).unwrap().count();
    // The root's first change stores the root's pre-image, and that is all:
    // nothing made after s1 can show in it, whatever happens to it.
    fs::create_dir(p.join("new")).unwrap();
    let root_only = count();
    assert_eq!(root_only, 1);
    for i in 0..50 {
        let f = p.join(format!("new/f{i}"));
        fs::write(&f, vec![b'x'; 100_000]).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        OpenOptions::new()
            .append(true)
            .open(&f)
            .unwrap()
            .write_all(b"+")
            .unwrap();
        fs::rename(&f, p.join(format!("new/g{i}"))).unwrap();
    }
    for i in 0..25 {
        fs::remove_file(p.join(format!("new/g{i}"))).unwrap();
    }
    fs::write(p.join("fresh"), b"v1").unwrap();
    std::os::unix::fs::symlink("fresh", p.join("fresh-link")).unwrap();
    assert_eq!(count(), root_only, "no pre-image of anything made after s1");
    assert_eq!(tree(&snap(&m, "s1")), populated);

    // After the next snapshot they are old: their changes are preserved.
    create(&m, "s2");
    fs::write(p.join("fresh"), b"v2").unwrap();
    fs::write(p.join("new/g30"), b"changed").unwrap();
    fs::remove_file(p.join("new/g40")).unwrap();
    assert!(count() > root_only);
    assert_eq!(fs::read(snap(&m, "s2").join("fresh")).unwrap(), b"v1");
    let mut g30 = vec![b'x'; 100_000];
    g30.push(b'+');
    assert_eq!(fs::read(snap(&m, "s2").join("new/g30")).unwrap(), g30);
    assert_eq!(fs::read(snap(&m, "s2").join("new/g40")).unwrap(), g30);
    assert!(!snap(&m, "s1").join("new").exists());
    assert!(!snap(&m, "s1").join("fresh").exists());
}
