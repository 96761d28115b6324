//! The worker's life: bad input, stale mounts, mounting over the source,
//! serving a given /dev/fuse descriptor, and every way it stops.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Mount, WORKER, is_mounted};

/// Runs the worker to completion (for the cases where it must refuse).
fn worker(args: &[&str]) -> Output {
    Command::new(WORKER)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs the worker on `source` at `mountpoint` with its state in `state`.
fn worker_on(source: &Path, mountpoint: &Path, state: &Path) -> Output {
    worker(&[
        "--source",
        s(source),
        "--mountpoint",
        s(mountpoint),
        "--state-dir",
        s(state),
    ])
}

/// Asserts a refusal: non-zero exit, and a single stderr line that contains
/// every one of `words`.
fn assert_refused(out: &Output, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "worker should refuse; stderr: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "exactly one line expected, got:\n{err}"
    );
    for w in words {
        assert!(err.contains(w), "message lacks {w:?}: {err}");
    }
}

fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("agentfs-life-")
        .tempdir()
        .unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A scratch directory with `src/` and `mnt/` made and `state` named.
fn scratch_dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let d = scratch();
    let (src, mnt, state) = (
        d.path().join("src"),
        d.path().join("mnt"),
        d.path().join("state"),
    );
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    (d, src, mnt, state)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn refuses_missing_or_wrong_source_and_mountpoint() {
    let d = scratch();
    let (src, mnt, state) = (
        d.path().join("src"),
        d.path().join("mnt"),
        d.path().join("state"),
    );
    fs::create_dir(&mnt).unwrap();
    let out = worker_on(&src, &mnt, &state);
    assert_refused(&out, &["source directory", s(&src), "--source"]);

    fs::write(&src, b"a file").unwrap();
    let out = worker_on(&src, &mnt, &state);
    assert_refused(&out, &["not a directory", s(&src)]);

    fs::remove_file(&src).unwrap();
    fs::create_dir(&src).unwrap();
    let missing = d.path().join("no-such-mountpoint");
    let out = worker_on(&src, &missing, &state);
    assert_refused(&out, &["mountpoint", s(&missing), "mkdir"]);
    assert!(!is_mounted(&mnt) && !is_mounted(&missing));
}

#[test]
fn refuses_to_run_unprivileged() {
    let d = scratch();
    let (src, mnt) = (d.path().join("src"), d.path().join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", WORKER])
        .args([
            "--source",
            s(&src),
            "--mountpoint",
            s(&mnt),
            "--state-dir",
            "/nonexistent/state",
        ])
        .output()
        .unwrap();
    assert_refused(&out, &["must run as root", "sudo"]);
}

#[test]
fn refuses_without_dev_fuse() {
    let (_d, src, mnt, state) = scratch_dirs();
    // A private mount namespace whose /dev has no fuse node.
    let script = format!(
        "mount -t tmpfs none /dev && exec {WORKER} --source {} --mountpoint {} --state-dir {}",
        s(&src),
        s(&mnt),
        s(&state)
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_refused(&out, &["/dev/fuse", "modprobe fuse"]);
}

#[test]
fn refuses_busy_mountpoint_and_busy_state_dir() {
    let m = Mount::new();
    let d = scratch();
    let other_state = d.path().join("state");
    let out = worker_on(m.source(), m.path(), &other_state);
    assert_refused(&out, &["busy", s(m.path()), "fusermount3 -u"]);

    let other_mnt = d.path().join("mnt");
    fs::create_dir(&other_mnt).unwrap();
    let out = worker_on(m.source(), &other_mnt, m.state_dir());
    assert_refused(
        &out,
        &[
            "in use by another worker",
            &format!("pid {}", m.worker_pid()),
        ],
    );
    assert!(!is_mounted(&other_mnt));
    // The first mount is unharmed.
    fs::write(m.path().join("still"), b"works").unwrap();
}

/// A state directory whose `layers/` cannot be used is refused with a
/// message naming it (before, only the state directory was named).
#[test]
fn refuses_a_state_directory_whose_layers_cannot_be_used() {
    let mut m = Mount::new();
    m.stop();
    let layers = m.state_dir().join("layers");
    fs::remove_dir_all(&layers).unwrap();
    fs::write(&layers, b"not a directory").unwrap();
    let out = worker_on(m.source(), m.path(), m.state_dir());
    assert_refused(&out, &[s(&layers)]);
    assert!(!is_mounted(m.path()));
}

#[test]
fn sigterm_unmounts_and_exits_zero() {
    let mut m = Mount::new();
    fs::write(m.path().join("f"), b"x").unwrap();
    m.stop();
    assert_eq!(fs::read(m.source().join("f")).unwrap(), b"x");
}

#[test]
fn fusermount_u_ends_the_worker() {
    let mut m = Mount::new();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(m.path())
        .status()
        .unwrap();
    assert!(st.success());
    let pid = m.worker_pid();
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    // The guard reaps it; it must already have exited by itself.
    m.kill();
    assert!(!is_mounted(m.path()));
}

/// A mount detached while a process still works in it (`fusermount3 -u
/// -z`) lives on for that process; SIGTERM then leaves it served, and a
/// second SIGTERM ends it, whether or not fusectl is mounted at
/// /sys/fs/fuse/connections (this container has none there).
#[test]
fn a_second_sigterm_ends_a_detached_mount_still_in_use() {
    /// A process working in the mount, killed whatever the outcome.
    struct User(std::process::Child);
    impl Drop for User {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut m = Mount::new();
    fs::write(m.path().join("f"), b"x").unwrap();
    let user = User(
        Command::new("sleep")
            .arg("60")
            .current_dir(m.path())
            .spawn()
            .unwrap(),
    );
    let cwd = PathBuf::from(format!("/proc/{}/cwd", user.0.id()));
    // Any of its threads alive: one stuck in the kernel after the main
    // thread exited still holds /dev/fuse, and reading the mount would
    // then block this test instead of failing it.
    let running = |pid: u32| {
        fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                !stat.is_empty() && !stat.contains(") Z") && !stat.contains(") X")
            })
    };
    let st = Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(m.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(!is_mounted(m.path()));
    let pid = m.worker_pid();
    common::signal(pid, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        running(pid),
        "the first SIGTERM must leave the detached mount served"
    );
    assert_eq!(
        fs::read(cwd.join("f")).unwrap(),
        b"x",
        "a process in the detached mount is still served"
    );
    common::signal(pid, libc::SIGTERM);
    let mut exited = false;
    for _ in 0..400 {
        if !running(pid) {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let gone = fs::read(cwd.join("f"));
    drop(user);
    assert!(
        exited,
        "the worker did not exit within 10 s of a second SIGTERM"
    );
    assert_eq!(
        gone.unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN),
        "the connection is aborted"
    );
    m.kill();
}

#[test]
fn kill_9_leaves_a_stale_mount_that_the_next_start_clears() {
    let mut m = Mount::new();
    fs::write(m.path().join("kept"), b"acknowledged").unwrap();
    m.kill();
    assert!(
        is_mounted(m.path()),
        "a killed worker leaves its mount (stale)"
    );
    // statfs always reaches the (dead) server; stat may come from the cache.
    assert_eq!(
        nix::sys::statfs::statfs(m.path()).unwrap_err(),
        nix::errno::Errno::ENOTCONN
    );
    m.restart(&[]);
    assert_eq!(fs::read(m.path().join("kept")).unwrap(), b"acknowledged");
    let stale = common::mounts()
        .iter()
        .filter(|(p, _)| p == m.path())
        .count();
    assert_eq!(
        stale, 1,
        "exactly one mount at the mountpoint after restart"
    );
}

/// (relative path -> (kind, mode, content hash or link target)) of a tree.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    common::walk(root)
        .into_iter()
        .map(|(rel, p, md)| {
            let v = if md.is_dir() {
                format!("dir {:o}", md.mode() & 0o7777)
            } else if md.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else {
                let out = Command::new("sha256sum").arg(&p).output().unwrap();
                let sum = String::from_utf8_lossy(&out.stdout)
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_owned();
                format!("file {:o} {sum}", md.mode() & 0o7777)
            };
            (rel, v)
        })
        .collect()
}

/// The same edits, applied to any directory.
fn edit(root: &Path) {
    fs::create_dir_all(root.join("src/nested")).unwrap();
    fs::write(root.join("src/main.rs"), b"fn main() {}\n").unwrap();
    fs::write(root.join("src/nested/lib.rs"), vec![42u8; 200_000]).unwrap();
    fs::rename(root.join("README"), root.join("README.md")).unwrap();
    fs::remove_file(root.join("obsolete.txt")).unwrap();
    fs::remove_dir_all(root.join("old")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", root.join("entry")).unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(root.join("README.md"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"appended line\n").unwrap();
}

fn initial(root: &Path) {
    fs::write(root.join("README"), b"readme\n").unwrap();
    fs::write(root.join("obsolete.txt"), b"bye").unwrap();
    fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
    fs::create_dir_all(root.join("old/deeper")).unwrap();
    fs::write(root.join("old/deeper/x"), b"x").unwrap();
}

#[test]
fn mount_over_the_source_itself() {
    let reference = scratch();
    initial(reference.path());
    edit(reference.path());

    let mut m = Mount::builder().over_source().populate(initial).start();
    assert_eq!(m.path(), m.source());
    edit(m.path());
    assert_eq!(
        tree(m.path()),
        tree(reference.path()),
        "view through the mount"
    );
    m.stop();
    assert!(!is_mounted(m.source()));
    assert_eq!(
        tree(m.source()),
        tree(reference.path()),
        "source after unmount"
    );
}

#[test]
fn serves_a_given_fuse_descriptor_and_leaves_the_mount_to_its_owner() {
    let (_d, src, mnt, state) = scratch_dirs();
    fs::write(src.join("hello"), b"from the source").unwrap();
    // Play the supervisor: mount, then hand the descriptor over as fd 3.
    let dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("agentfs"),
        &mnt,
        Some("fuse.agentfs"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .unwrap();
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _detach = Detach(mnt.clone());
    let raw = dev.as_raw_fd();
    let mut cmd = Command::new(WORKER);
    cmd.args([
        "--source",
        s(&src),
        "--mountpoint",
        s(&mnt),
        "--state-dir",
        s(&state),
        "--allow-other",
        "--fuse-fd",
        "3",
    ]);
    // SAFETY: dup2 and fcntl are async-signal-safe; this runs in the child
    // before exec. dup2(3, 3) would keep FD_CLOEXEC, hence the fcntl case.
    unsafe {
        cmd.pre_exec(move || {
            let r = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.stderr(Stdio::inherit()).spawn().unwrap();
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"from the source");
    fs::write(mnt.join("new"), b"via fd").unwrap();
    assert_eq!(fs::read(src.join("new")).unwrap(), b"via fd");
    common::signal(child.id(), libc::SIGTERM);
    let status =
        common::wait_timeout(&mut child, Duration::from_secs(10)).expect("worker exits on SIGTERM");
    assert!(status.success());
    assert!(
        is_mounted(&mnt),
        "the owner of the descriptor keeps the mount"
    );
    drop(_detach);
    drop(dev);
    assert!(!is_mounted(&mnt));
}

#[test]
fn refuses_a_descriptor_that_is_not_dev_fuse() {
    let d = scratch();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    let out = worker(&[
        "--source",
        s(&src),
        "--mountpoint",
        s(&src),
        "--state-dir",
        s(&d.path().join("st")),
        "--fuse-fd",
        "0",
    ]);
    assert_refused(&out, &["--fuse-fd 0", "/dev/fuse"]);
}

/// `--max-background` (config `fuse.max_background`) reaches the kernel:
/// read back from the connection's directory in fusectl.
#[test]
fn max_background_reaches_the_kernel() {
    let m = Mount::builder().arg("--max-background").arg("23").start();
    let conns = Path::new("/sys/fs/fuse/connections");
    // fusectl, mounted for the test if it is not (and unmounted after).
    struct Fusectl(bool);
    impl Drop for Fusectl {
        fn drop(&mut self) {
            if self.0 {
                let _ = nix::mount::umount2(
                    "/sys/fs/fuse/connections",
                    nix::mount::MntFlags::MNT_DETACH,
                );
            }
        }
    }
    let _fusectl = Fusectl(
        !is_mounted(conns)
            && nix::mount::mount(
                Some("fusectl"),
                conns,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .is_ok(),
    );
    let dev = fs::metadata(m.path()).unwrap().dev();
    let read = |f: &str| {
        fs::read_to_string(conns.join(dev.to_string()).join(f))
            .unwrap_or_else(|e| panic!("fusectl {f} of connection {dev}: {e}"))
    };
    assert_eq!(read("max_background").trim(), "23");
    assert_eq!(read("congestion_threshold").trim(), "15");
}

#[test]
fn a_source_removed_while_mounted_answers_enoent_and_the_worker_survives() {
    let mut m = Mount::builder()
        .populate(|s| {
            fs::create_dir(s.join("d")).unwrap();
            fs::write(s.join("d/f"), b"kept").unwrap();
        })
        .start();
    let p = m.path().to_owned();
    // Held open across the removal.
    let held = fs::read_to_string(p.join("d/f")).unwrap();
    assert_eq!(held, "kept");
    fs::remove_dir_all(m.source()).unwrap();
    // The mount stays, and says what happened: the directory is gone. The
    // removal is made behind the mount's back: what the kernel cached of
    // d/f goes once the source watch has seen it.
    let e = fs::write(p.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
    let gone = || {
        fs::read_to_string(p.join("d/f")).map_err(|e| e.raw_os_error()) == Err(Some(libc::ENOENT))
    };
    assert!(common::soon(gone), "d/f still read after the removal");
    assert_eq!(fs::read_dir(&p).unwrap().count(), 0);
    // The worker still answers on its control socket, and stops cleanly.
    common::ctl(&m, agentfs_mount_worker::control::Request::BindingList {}).unwrap();
    m.stop();
    // Once the source is back, a new start serves it.
    fs::create_dir(m.source()).unwrap();
    fs::write(m.source().join("again"), b"back").unwrap();
    m.restart(&[]);
    assert_eq!(fs::read_to_string(p.join("again")).unwrap(), "back");
}
