//! The worker's sandbox, on real mounts served as under the supervisor:
//! what it refuses (through the test-only fault hook, compared with the
//! same worker unconfined, so that each refusal is the sandbox's and not
//! the worker's own), and what every thread of it holds.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command};

use agentfs_mount_worker::control::Request;
use agentfs_mount_worker::sandbox::KEPT;

/// A process to try ptrace on, killed when dropped.
struct Tracee(Child);

impl Tracee {
    fn start() -> Tracee {
        Tracee(
            Command::new("sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep"),
        )
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the probe in the worker of `m`; returns (what, errno) pairs.
fn probe(m: &common::Mount) -> Vec<(String, Option<i32>)> {
    // Next to the source and the state directory, inside neither.
    let base = m.source().parent().unwrap();
    let outside = base.join("outside.txt");
    fs::write(&outside, "not for the worker\n").unwrap();
    let mount_on = base.join("probe-mnt");
    fs::create_dir_all(&mount_on).unwrap();
    let tracee = Tracee::start();
    let reply = common::ctl(
        m,
        Request::SandboxProbe {
            outside: outside.display().to_string(),
            mount_on: mount_on.display().to_string(),
            tracee: tracee.0.id() as i32,
        },
    )
    .expect("the probe answers");
    let mounted_after = common::is_mounted(&mount_on);
    assert!(!mounted_after, "the probe left a mount on {mount_on:?}");
    reply
        .as_array()
        .expect("a list of attempts")
        .iter()
        .map(|a| {
            (
                a["what"].as_str().unwrap().to_owned(),
                a["errno"].as_i64().map(|e| e as i32),
            )
        })
        .collect()
}

#[test]
fn the_sandbox_refuses_what_the_worker_never_needs() {
    let mut m = common::Mount::builder()
        .supervised()
        .arg("--test-fault-hook")
        .start();
    let attempts = probe(&m);
    assert_eq!(attempts.len(), 6, "{attempts:?}");
    for (what, errno) in &attempts {
        let errno = errno.unwrap_or_else(|| panic!("the sandboxed worker could {what}"));
        // Landlock answers EACCES, seccomp (and a missing capability) EPERM.
        assert!(
            errno == libc::EACCES || errno == libc::EPERM,
            "{what}: refused with errno {errno}, not by the sandbox"
        );
    }
    // The worker still serves after the refusals.
    fs::write(m.path().join("after-probe"), "still here\n").unwrap();
    assert_eq!(
        fs::read_to_string(m.source().join("after-probe")).unwrap(),
        "still here\n"
    );
    m.stop();
}

/// The control run: the same worker unconfined does every one of them, so
/// the refusals above come from the sandbox, not from the worker's checks.
#[test]
fn unconfined_the_same_attempts_succeed() {
    let mut m = common::Mount::builder()
        .supervised()
        .arg("--test-fault-hook")
        .arg("--no-sandbox")
        .start();
    for (what, errno) in probe(&m) {
        assert_eq!(errno, None, "unconfined, the worker could not {what}");
    }
    m.stop();
}

/// The probe is a test hook: a worker started without it refuses it.
#[test]
fn the_probe_needs_the_test_hook() {
    let mut m = common::Mount::builder().supervised().start();
    let e = common::ctl(
        &m,
        Request::SandboxProbe {
            outside: "/etc/hostname".into(),
            mount_on: "/mnt".into(),
            tracee: 1,
        },
    )
    .unwrap_err();
    assert!(e.message.contains("--test-fault-hook"), "{}", e.message);
    m.stop();
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {status}"))
        .trim()
        .to_owned()
}

/// Every thread (session threads, control, fork events, signals) is
/// confined: only the kept capabilities, in every set that matters,
/// no_new_privs, and both seccomp filters.
#[test]
fn every_thread_holds_only_the_kept_capabilities() {
    let mut m = common::Mount::builder().supervised().start();
    // Some traffic, so that every kind of thread exists.
    fs::write(m.path().join("f"), "x").unwrap();
    let kept: u64 = KEPT.iter().map(|c| c.bitmask()).sum();
    let want = format!("{kept:016x}");
    let tasks = Path::new("/proc")
        .join(m.worker_pid().to_string())
        .join("task");
    let mut seen = 0;
    for task in fs::read_dir(&tasks).unwrap() {
        let status = fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let name = status_field(&status, "Name:");
        for key in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(status_field(&status, key), want, "{key} of thread {name}");
        }
        for key in ["CapInh:", "CapAmb:"] {
            assert_eq!(
                status_field(&status, key),
                "0000000000000000",
                "{key} of thread {name}"
            );
        }
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "thread {name}");
        assert_eq!(status_field(&status, "Seccomp:"), "2", "thread {name}");
        assert_eq!(
            status_field(&status, "Seccomp_filters:"),
            "2",
            "thread {name}"
        );
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} threads");
    m.stop();
}

/// Has the host drop its cached names (and unused inodes).
fn drop_names() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

/// A supervised (sandboxed) mount whose source holds `d/f` ("x").
fn supervised_with_d_f() -> common::Mount {
    common::Mount::builder()
        .populate(|s| {
            fs::create_dir(s.join("d")).unwrap();
            fs::write(s.join("d/f"), b"x").unwrap();
        })
        .supervised()
        .start()
}

/// A sandboxed worker keeps main's files by handle; Landlock checks an
/// open (or a link) against the host path it reaches from the inode, which
/// an inode opened by a bare handle lacks once the host has dropped its
/// cached names. Held nodes of the kernel's (so that it does not look the
/// file up again), the host's names dropped before each step: a read, a
/// write with truncation, a hard link and a rename all work, and so does
/// a read once a second name, the newest, is gone again.
#[test]
fn main_files_open_after_the_host_dropped_its_names() {
    let mut m = supervised_with_d_f();
    let f = m.path().join("d/f");
    let held = common::hold(&f);
    drop_names();
    assert_eq!(fs::read(&f).unwrap(), b"x");
    fs::hard_link(&f, m.path().join("second")).unwrap();
    fs::remove_file(m.path().join("second")).unwrap();
    drop_names();
    assert_eq!(fs::read(&f).unwrap(), b"x");
    drop_names();
    fs::write(&f, b"y").unwrap();
    drop_names();
    fs::hard_link(&f, m.path().join("d/g")).unwrap();
    drop_names();
    fs::rename(&f, m.path().join("f")).unwrap();
    drop_names();
    assert_eq!(fs::read(m.path().join("f")).unwrap(), b"y");
    assert_eq!(fs::read(m.path().join("d/g")).unwrap(), b"y");
    drop(held);
    m.stop();
}

/// The same for a snapshot's and a branch's file that still share main's
/// inode: they are opened by handle too, by their name in their
/// directory's live inode, also once main has changed that directory
/// (the snapshot then reads it from its pre-image).
#[test]
fn snapshot_and_branch_files_open_after_the_host_dropped_its_names() {
    let mut m = supervised_with_d_f();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    fs::write(m.path().join("d/new"), b"main's").unwrap();
    let files = [
        m.path().join(".agentfs/snapshots/s/d/f"),
        common::branch_dir(&m, "b").join("d/f"),
    ];
    let held: Vec<_> = files.iter().map(|f| common::hold(f)).collect();
    for f in &files {
        drop_names();
        assert_eq!(fs::read(f).unwrap(), b"x", "{}", f.display());
    }
    drop(held);
    m.stop();
}

/// The same for a branch's own files, which it keeps by handle too, with
/// the names each was found at or moved to: a file copied up, one made
/// in the branch, a rename, a hard link whose first name is removed, one
/// whose second name is, and one whose second name is moved and then
/// removed, each read back after the host dropped its names.
#[test]
fn a_branch_s_own_files_open_after_the_host_dropped_their_names() {
    let mut m = supervised_with_d_f();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let b = common::branch_dir(&m, "b");
    let (f, made) = (b.join("d/f"), b.join("d/made"));
    let held = [common::hold(&f), common::hold(&b.join("d"))];
    fs::write(&f, b"copied").unwrap();
    fs::write(&made, b"made").unwrap();
    let made_held = common::hold(&made);
    drop_names();
    assert_eq!(fs::read(&f).unwrap(), b"copied");
    assert_eq!(fs::read(&made).unwrap(), b"made");
    fs::rename(&f, b.join("f")).unwrap();
    drop_names();
    assert_eq!(fs::read(b.join("f")).unwrap(), b"copied");
    fs::hard_link(&made, b.join("d/link")).unwrap();
    fs::remove_file(&made).unwrap();
    drop_names();
    assert_eq!(fs::read(b.join("d/link")).unwrap(), b"made");
    fs::write(b.join("d/link"), b"changed").unwrap();
    drop_names();
    assert_eq!(fs::read(b.join("d/link")).unwrap(), b"changed");
    let link_held = common::hold(&b.join("d/link"));
    fs::hard_link(b.join("d/link"), b.join("second")).unwrap();
    fs::remove_file(b.join("second")).unwrap();
    drop_names();
    assert_eq!(fs::read(b.join("d/link")).unwrap(), b"changed");
    fs::hard_link(b.join("d/link"), b.join("third")).unwrap();
    fs::rename(b.join("third"), b.join("moved")).unwrap();
    fs::remove_file(b.join("moved")).unwrap();
    drop_names();
    assert_eq!(fs::read(b.join("d/link")).unwrap(), b"changed");
    drop((held, made_held, link_held));
    m.stop();
}
