//! The supervisor on a real, private D-Bus daemon with real FUSE mounts:
//! the D-Bus API of specs/dbus.md driven by `busctl`, as root and as an
//! unprivileged user.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A private bus daemon any user may connect to (the supervisor decides
/// who may do what); killed by pid on drop.
struct Bus {
    daemon: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path) -> Bus {
        let socket = dir.join("bus");
        let conf = dir.join("bus.conf");
        fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>"#,
                socket.display()
            ),
        )
        .unwrap();
        let daemon = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            // It warns that it cannot raise its fd limit; nothing to see.
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon runs (apt-get install dbus)");
        wait_for(|| socket.exists(), "the bus socket");
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o777)).unwrap();
        Bus {
            daemon,
            address: format!("unix:path={}", socket.display()),
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// A supervisor on the private bus. On drop: SIGTERM (it unmounts
/// everything), and whatever is still mounted in the test's directory is
/// detached as a last resort.
struct Supervisor {
    child: Option<Child>,
    dir: PathBuf,
    bus: Bus,
    log: PathBuf,
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_agentfs-supervisor"))
        .parent()
        .unwrap()
        .to_owned()
}

impl Supervisor {
    fn start(dir: &Path) -> Supervisor {
        Supervisor::start_with_worker(dir, &target_dir().join("agentfs-mount-worker"))
    }

    /// A supervisor whose workers answer the control channel's test hooks.
    fn start_with_fault_hooks(dir: &Path) -> Supervisor {
        let wrapper = dir.join("worker-with-fault-hooks");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec '{}' --test-fault-hook \"$@\"\n",
                target_dir().join("agentfs-mount-worker").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        Supervisor::start_with_worker(dir, &wrapper)
    }

    fn start_with_worker(dir: &Path, worker: &Path) -> Supervisor {
        Supervisor::start_through(dir, worker, &[])
    }

    /// A supervisor started through `prefix` (a command that ends by
    /// executing its arguments), e.g. in a namespace of its own.
    fn start_through(dir: &Path, worker: &Path, prefix: &[&str]) -> Supervisor {
        let bus = Bus::start(dir);
        assert!(
            worker.exists(),
            "{} is missing: build the workspace (cargo test --workspace)",
            worker.display()
        );
        fs::create_dir_all(dir.join("mounts")).unwrap();
        let log = dir.join("supervisor.log");
        let supervisor = env!("CARGO_BIN_EXE_agentfs-supervisor");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(supervisor);
                c
            }
            None => Command::new(supervisor),
        };
        let child = cmd
            .arg("--bus-address")
            .arg(&bus.address)
            .arg("--config-dir")
            .arg(dir.join("mounts"))
            .arg("--state-root")
            .arg(dir.join("state"))
            .arg("--worker")
            .arg(worker)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Supervisor {
            child: Some(child),
            dir: dir.to_owned(),
            bus,
            log,
        };
        wait_for(
            || {
                s.busctl(&[
                    "call",
                    "org.agentfs",
                    "/org/agentfs",
                    "org.agentfs.Manager1",
                    "ListMounts",
                ])
                .status
                .success()
            },
            "the supervisor on the bus",
        );
        if let Some(c) = s.child.as_mut() {
            assert!(
                c.try_wait().unwrap().is_none(),
                "supervisor exited: {}",
                s.log_text()
            );
        }
        s
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn busctl(&self, args: &[&str]) -> Output {
        self.busctl_as(None, args)
    }

    /// busctl as `uid` (None: root).
    fn busctl_as(&self, uid: Option<u32>, args: &[&str]) -> Output {
        let mut cmd = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={u}"))
                    .arg(format!("--regid={u}"))
                    .arg("--clear-groups")
                    .arg("busctl");
                c
            }
            None => Command::new("busctl"),
        };
        cmd.arg(format!("--address={}", self.bus.address))
            .args(args)
            .output()
            .unwrap()
    }

    fn manager(&self, method: &str, sig: &str, args: &[&str]) -> Output {
        let mut a = vec![
            "call",
            "org.agentfs",
            "/org/agentfs",
            "org.agentfs.Manager1",
            method,
        ];
        if !sig.is_empty() {
            a.push(sig);
        }
        a.extend_from_slice(args);
        self.busctl(&a)
    }

    fn mount_call_as(
        &self,
        uid: Option<u32>,
        name: &str,
        method: &str,
        sig: &str,
        args: &[&str],
    ) -> Output {
        let path = format!("/org/agentfs/mount/{name}");
        let mut a = vec![
            "call",
            "org.agentfs",
            path.as_str(),
            "org.agentfs.Mount1",
            method,
        ];
        if !sig.is_empty() {
            a.push(sig);
        }
        a.extend_from_slice(args);
        self.busctl_as(uid, &a)
    }

    fn mount_call(&self, name: &str, method: &str, sig: &str, args: &[&str]) -> Output {
        self.mount_call_as(None, name, method, sig, args)
    }

    fn property(&self, name: &str, prop: &str) -> String {
        let out = self.busctl(&[
            "get-property",
            "org.agentfs",
            &format!("/org/agentfs/mount/{name}"),
            "org.agentfs.Mount1",
            prop,
        ]);
        ok(&out)
    }

    /// Writes `<name>.toml` with a source, mountpoint and extra lines.
    fn configure(&self, name: &str, extra: &str) -> (PathBuf, PathBuf) {
        let src = self.dir.join(format!("{name}-src"));
        let mnt = self.dir.join(format!("{name}-mnt"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        fs::write(
            self.dir.join("mounts").join(format!("{name}.toml")),
            format!(
                "source = \"{}\"\nmountpoint = \"{}\"\nallow_other = true\n{extra}",
                src.display(),
                mnt.display()
            ),
        )
        .unwrap();
        (src, mnt)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for mp in mounts_under(&self.dir) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&mp)
                .status();
        }
    }
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let want = dir.display().to_string();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_owned))
        .filter(|mp| mp.starts_with(&want))
        .collect()
}

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "busctl failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[track_caller]
fn fails_with(out: &Output, error: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected {error}, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// Asserts that `agentfs-mount-worker --check` finds the state directory
/// consistent (its mount stopped).
fn check_state(state_dir: &Path) {
    let out = Command::new(target_dir().join("agentfs-mount-worker"))
        .arg("--check")
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "state check of {}: {}{}",
        state_dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tempdir() -> tempfile::TempDir {
    // /var/tmp: not a tmpfs (state dirs need xattrs); `aft-` so that
    // scripts/test.sh can clean up after a crash.
    tempfile::Builder::new()
        .prefix("aft-sup-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A process that sleeps until killed (killed on drop).
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Sleeper {
        Sleeper(
            Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn spawn_as(uid: u32) -> Sleeper {
        Sleeper(
            Command::new("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .args(["sleep", "600"])
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> String {
        self.0.id().to_string()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sh -c script` bound to `branch` through the bus: the shell binds
/// itself, then runs the script (its children follow it).
fn in_branch(s: &Supervisor, name: &str, branch: &str, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "busctl --address='{}' call org.agentfs /org/agentfs/mount/{name} org.agentfs.Mount1 BindPid su {branch} $$ >/dev/null && {script}",
            s.bus.address
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn the_user_story_over_the_bus() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("agent1", "");
    fs::write(src.join("README"), "original\n").unwrap();
    ok(&s.manager("Reload", "", &[]));
    let listed = ok(&s.manager("ListMounts", "", &[]));
    assert!(
        listed.contains("\"agent1\" \"stopped\" \"/org/agentfs/mount/agent1\""),
        "{listed}"
    );

    let path = ok(&s.manager("StartMount", "s", &["agent1"]));
    assert_eq!(path, "o \"/org/agentfs/mount/agent1\"");
    assert_eq!(s.property("agent1", "State"), "s \"running\"");
    assert_eq!(
        fs::read_to_string(mnt.join("README")).unwrap(),
        "original\n"
    );

    assert_eq!(
        ok(&s.mount_call("agent1", "CreateSnapshot", "ss", &["", "clean"])),
        "s \"1\""
    );
    ok(&s.mount_call("agent1", "CreateBranch", "ss", &["clean", "try-a"]));
    ok(&s.mount_call("agent1", "CreateBranch", "ss", &["clean", "try-b"]));
    let branches = ok(&s.mount_call("agent1", "ListBranches", "", &[]));
    assert!(branches.starts_with("a(sss) 2 "), "{branches}");

    let readme = mnt.join("README");
    let a = in_branch(
        &s,
        "agent1",
        "try-a",
        &format!("echo a >> {0}; cat {0}", readme.display()),
    );
    let b = in_branch(
        &s,
        "agent1",
        "try-b",
        &format!("echo b >> {0}; cat {0}", readme.display()),
    );
    assert_eq!(a, "original\na\n");
    assert_eq!(b, "original\nb\n");
    assert_eq!(
        fs::read_to_string(&readme).unwrap(),
        "original\n",
        "main is untouched"
    );
    assert_eq!(
        fs::read_to_string(src.join("README")).unwrap(),
        "original\n"
    );
    assert_eq!(
        fs::read_to_string(mnt.join(".agentfs/branches/try-a/README")).unwrap(),
        "original\na\n"
    );

    let sleeper = Sleeper::spawn();
    ok(&s.mount_call("agent1", "BindPid", "su", &["try-b", &sleeper.pid()]));
    let bindings = ok(&s.mount_call("agent1", "ListBindings", "", &[]));
    assert!(
        bindings.contains(&format!("\"pid\" \"{}\" \"try-b\"", sleeper.pid())),
        "{bindings}"
    );
    ok(&s.mount_call("agent1", "UnbindPid", "u", &[&sleeper.pid()]));

    // A config changed while running applies at the next start only.
    let file = dir.path().join("mounts/agent1.toml");
    let text = fs::read_to_string(&file).unwrap();
    let moved = format!(
        "{text}state_dir = \"{}\"\n",
        dir.path().join("elsewhere").display()
    );
    fs::write(&file, moved).unwrap();
    ok(&s.manager("Reload", "", &[]));
    let branches = ok(&s.mount_call("agent1", "ListBranches", "", &[]));
    assert!(branches.contains("\"try-a\""), "{branches}");
    fs::write(&file, text).unwrap();
    ok(&s.manager("Reload", "", &[]));

    let snaps = ok(&s.mount_call("agent1", "ListSnapshots", "", &[]));
    assert!(snaps.contains("\"1\" \"clean\" \"main\""), "{snaps}");

    // Errors are named and say what is wrong.
    let e = fails_with(
        &s.mount_call("agent1", "DeleteBranch", "sb", &["nope", "false"]),
        "NotFound",
    );
    assert!(e.contains("nope"), "{e}");
    let e = fails_with(&s.manager("StartMount", "s", &["nosuch"]), "NotFound");
    assert!(e.contains("nosuch.toml"), "{e}");

    ok(&s.manager("StopMount", "s", &["agent1"]));
    assert_eq!(s.property("agent1", "State"), "s \"stopped\"");
    assert!(
        mounts_under(dir.path()).is_empty(),
        "stopping leaves no mount"
    );
    let e = fails_with(
        &s.mount_call("agent1", "ListBranches", "", &[]),
        "NotRunning",
    );
    assert!(e.contains("start it first"), "{e}");

    // Started again: branches and snapshots are still there.
    ok(&s.manager("StartMount", "s", &["agent1"]));
    let branches = ok(&s.mount_call("agent1", "ListBranches", "", &[]));
    assert!(
        branches.contains("\"try-a\"") && branches.contains("\"try-b\""),
        "{branches}"
    );
    assert_eq!(
        fs::read_to_string(mnt.join(".agentfs/branches/try-b/README")).unwrap(),
        "original\nb\n"
    );
}

#[test]
fn bad_configs_name_file_line_and_key_and_do_not_disturb_other_mounts() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (_, mnt) = s.configure("good", "");
    ok(&s.manager("Reload", "", &[]));
    ok(&s.manager("StartMount", "s", &["good"]));
    let mounts = dir.path().join("mounts");
    let cases = [
        (
            "unknown",
            "source = \"/srv\"\n\ncolour = \"red\"\n",
            "unknown.toml:3",
            "colour",
        ),
        (
            "wrongtype",
            "source = \"/srv\"\n[fuse]\nthreads = \"many\"\n",
            "wrongtype.toml:3",
            "fuse.threads",
        ),
        (
            "nosource",
            "source = \"/nonexistent/agentfs\"\n",
            "nosource.toml:1",
            "source",
        ),
        ("nokey", "allow_other = true\n", "nokey.toml:1", "source"),
    ];
    for (name, text, at, key) in cases {
        fs::write(mounts.join(format!("{name}.toml")), text).unwrap();
        let e = fails_with(&s.manager("StartMount", "s", &[name]), "InvalidArgument");
        assert!(
            e.contains(at) && e.contains(&format!("`{key}`")),
            "{name}: {e}"
        );
        assert_eq!(s.property(name, "State"), "s \"failed\"");
        assert!(s.property(name, "LastError").contains(at));
    }
    assert!(
        s.log_text().contains("unknown.toml:3"),
        "the log names it too"
    );
    assert_eq!(s.property("good", "State"), "s \"running\"");
    assert!(mnt.join(".agentfs").exists());
    // Fixed, it starts.
    // Fixed, it starts: mounted over its own source, which the worker
    // serves through a descriptor the supervisor opened before mounting.
    let fixed = dir.path().join("fixed-src");
    fs::create_dir_all(&fixed).unwrap();
    fs::write(fixed.join("f"), "in the source").unwrap();
    fs::write(
        mounts.join("nosource.toml"),
        format!("source = \"{}\"\n", fixed.display()),
    )
    .unwrap();
    ok(&s.manager("StartMount", "s", &["nosource"]));
    assert_eq!(s.property("nosource", "State"), "s \"running\"");
    assert_eq!(
        fs::read_to_string(fixed.join("f")).unwrap(),
        "in the source"
    );
    fs::write(fixed.join("g"), "through the mount").unwrap();
    ok(&s.manager("StopMount", "s", &["nosource"]));
    assert_eq!(
        fs::read_to_string(fixed.join("g")).unwrap(),
        "through the mount"
    );
}

/// SIGKILLs mount `name`'s worker and waits until the mount runs again
/// after its `round`-th restart; returns the time that took.
fn kill_worker(s: &Supervisor, name: &str, round: u32) -> Duration {
    let pid: i32 = s.property(name, "WorkerPid")[2..].parse().unwrap();
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        || {
            s.property(name, "Restarts") == format!("u {round}")
                && s.property(name, "State") == "s \"running\""
        },
        "the new worker",
    );
    killed.elapsed()
}

/// A worker that took over the connection does not know which names at
/// the mount root its predecessor let the kernel cache (while nothing was
/// bound): the first binding within the cache timeout makes the kernel
/// forget every name, even with something mounted inside (which that
/// detaches), so the bound process sees its branch, not main's cached
/// names.
#[test]
fn after_a_worker_crash_the_first_binding_forgets_the_root_cached_before() {
    /// Unmounts the tmpfs inside the mount in all cases.
    struct Inner(PathBuf);
    impl Drop for Inner {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("taken", "[restart]\nburst = 5\ninterval_sec = 600\n");
    fs::write(src.join("README"), "main\n").unwrap();
    fs::create_dir(src.join("inner")).unwrap();
    ok(&s.manager("StartMount", "s", &["taken"]));
    ok(&s.mount_call("taken", "CreateSnapshot", "ss", &["", "base"]));
    ok(&s.mount_call("taken", "CreateBranch", "ss", &["base", "a"]));
    fs::write(mnt.join(".agentfs/branches/a/README"), "a\n").unwrap();
    assert_eq!(fs::read_to_string(mnt.join("README")).unwrap(), "main\n");
    let inner = Inner(mnt.join("inner"));
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "agentfs-test-inner"])
        .arg(&inner.0)
        .status()
        .unwrap();
    assert!(st.success(), "mount a tmpfs inside the mount");
    kill_worker(&s, "taken", 1);
    let seen = in_branch(
        &s,
        "taken",
        "a",
        &format!("cat {}", mnt.join("README").display()),
    );
    assert_eq!(
        seen, "a\n",
        "the bound shell met main's README cached before the crash"
    );
}

#[test]
fn a_killed_worker_is_replaced_until_the_restart_limit() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (_, mnt) = s.configure("crashy", "[restart]\nburst = 2\ninterval_sec = 600\n");
    ok(&s.manager("StartMount", "s", &["crashy"]));
    fs::write(mnt.join("kept"), "acknowledged").unwrap();
    for round in 1..=2 {
        kill_worker(&s, "crashy", round);
        assert!(s.property("crashy", "LastError").contains("signal 9"));
        assert_eq!(
            fs::read_to_string(mnt.join("kept")).unwrap(),
            "acknowledged"
        );
    }
    let pid: i32 = s.property("crashy", "WorkerPid")[2..].parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        || s.property("crashy", "State") == "s \"failed\"",
        "the mount to fail",
    );
    assert!(s.property("crashy", "LastError").contains("restart.burst"));
    assert!(
        mounts_under(dir.path()).is_empty(),
        "a failed mount leaves no mount behind"
    );
}

/// Files open for passthrough when the worker dies stay served by the
/// kernel from the host file; the successor must open the same node with
/// the same backing file (the kernel fails any other open of it with EIO)
/// and close that backing file once the last of them is released.
#[test]
fn files_open_for_passthrough_survive_a_worker_crash() {
    use std::os::unix::fs::FileExt;
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("pt", "[fuse]\npassthrough = \"on\"\n");
    fs::write(src.join("read"), "0123456789").unwrap();
    fs::write(src.join("written"), "0123456789").unwrap();
    ok(&s.manager("StartMount", "s", &["pt"]));
    let rw = |p: &Path| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    let reader = fs::File::open(mnt.join("read")).unwrap();
    let writer = rw(&mnt.join("written"));
    writer.write_all_at(b"before", 0).unwrap();
    kill_worker(&s, "pt", 1);
    let mut buf = [0u8; 10];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"0123456789");
    writer.write_all_at(b"after!", 0).unwrap();
    // New opens of both nodes while the old ones are open, of every kind.
    let reader2 = fs::File::open(mnt.join("written")).unwrap();
    reader2.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"after!6789");
    let writer2 = rw(&mnt.join("read"));
    writer2.write_all_at(b"new", 0).unwrap();
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"new3456789");
    drop((reader, writer, reader2, writer2));
    // All released: the nodes open afresh (a backing file left registered
    // would make the next passthrough open of the node fail with EIO).
    for name in ["read", "written"] {
        let r = fs::File::open(mnt.join(name)).unwrap();
        let w = rw(&mnt.join(name));
        w.write_all_at(b"X", 9).unwrap();
        r.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf[9], b'X', "{name}");
    }
    assert_eq!(
        fs::read_to_string(src.join("written")).unwrap(),
        "after!678X"
    );
    // And again across a second crash with nothing open.
    kill_worker(&s, "pt", 2);
    assert_eq!(fs::read_to_string(mnt.join("read")).unwrap(), "new345678X");
}

/// A shared map whose descriptor is closed writes the host file without
/// the worker (passthrough maps the host file itself); the worker lists
/// such files in the handoff journal, so that a successor too copies them
/// at each snapshot while the map lives.
#[test]
fn a_shared_map_that_outlived_its_descriptor_is_seen_across_a_worker_crash() {
    use std::os::fd::AsRawFd;
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("mapped", "[fuse]\npassthrough = \"on\"\n");
    fs::write(src.join("f"), "0123456789").unwrap();
    ok(&s.manager("StartMount", "s", &["mapped"]));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("f"))
        .unwrap();
    // SAFETY: a fresh 10-byte shared mapping, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            10,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    drop(file);
    kill_worker(&s, "mapped", 1);
    ok(&s.mount_call("mapped", "CreateSnapshot", "ss", &["", "s"]));
    // SAFETY: inside the mapping, which is ours and unmapped after.
    unsafe {
        *(map as *mut u8) = b'X';
        assert_eq!(libc::msync(map, 10, libc::MS_SYNC), 0);
        libc::munmap(map, 10);
    }
    assert_eq!(fs::read_to_string(src.join("f")).unwrap(), "X123456789");
    assert_eq!(
        fs::read_to_string(mnt.join(".agentfs/snapshots/s/f")).unwrap(),
        "0123456789"
    );
}

/// A sandboxed worker opens main's files, and a snapshot's that share
/// main's inode, by the name it found them by: Landlock checks the host
/// path of what it opens, which a file opened by a bare handle lacks once
/// the host dropped its cached names. A successor learns those names from
/// the handoff journal, also a file's later names: renamed through the
/// mount (by the worker that found it, or by a successor that never used
/// it), or renamed behind the mount and looked up again. Files whose nodes
/// the kernel held across two crashes (reopened through the held
/// descriptors, so nothing is looked up again) still open once the host
/// dropped its names (EACCES when the journal had only their handles).
#[test]
fn files_held_across_a_worker_crash_open_after_the_host_dropped_its_names() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("named", "");
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/f"), "d/f").unwrap();
    for name in ["moved", "later", "behind", "behind-later"] {
        fs::write(src.join(name), name).unwrap();
    }
    ok(&s.manager("StartMount", "s", &["named"]));
    ok(&s.mount_call("named", "CreateSnapshot", "ss", &["", "s"]));
    let files = [
        "d/f",
        ".agentfs/snapshots/s/d/f",
        "moved",
        "later",
        "behind",
        "behind-later",
    ];
    // The kernel's nodes, held without an open file.
    let held: Vec<OwnedFd> = files
        .iter()
        .map(|f| {
            let c = std::ffi::CString::new(mnt.join(f).as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path; the descriptor is owned at once.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            assert!(fd >= 0, "{f}: {}", std::io::Error::last_os_error());
            // SAFETY: fresh descriptor.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    let behind = |from: &str, to: &str| {
        fs::rename(src.join(from), src.join(to)).unwrap();
        // The watch has the kernel drop the old name; this finds the node
        // again by the new one.
        let path = mnt.join(to);
        wait_for(
            || fs::metadata(&path).is_ok(),
            "the name made behind the mount",
        );
    };
    fs::rename(mnt.join("moved"), mnt.join("d/moved")).unwrap();
    behind("behind", "d/behind");
    kill_worker(&s, "named", 1);
    fs::rename(mnt.join("later"), mnt.join("d/later")).unwrap();
    behind("behind-later", "d/behind-later");
    kill_worker(&s, "named", 2);
    for (f, fd) in files.iter().zip(&held) {
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        let again = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let want = if f.contains("d/f") { "d/f" } else { f };
        assert_eq!(
            fs::read_to_string(&again).map_err(|e| e.to_string()),
            Ok(want.to_owned()),
            "{f}"
        );
    }
    drop(held);
}

/// Changes made to the source behind the mount after a worker crash show
/// at once, though the kernel cached the names and attributes they change
/// under the dead worker, whose watch went with it: the successor has the
/// kernel look every name up again once its own watch runs. Without that
/// they would show only after the cache timeout (ten minutes by default).
#[test]
fn changes_behind_the_mount_across_a_worker_crash_show_at_once() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("seen", "");
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/f"), "one").unwrap();
    ok(&s.manager("StartMount", "s", &["seen"]));
    let listing = || {
        let mut names: Vec<String> = fs::read_dir(mnt.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    // Cached: the name, its attributes and the directory's listing.
    assert_eq!(fs::metadata(mnt.join("d/f")).unwrap().len(), 3);
    assert_eq!(listing(), ["f"]);
    assert_eq!(listing(), ["f"]);
    kill_worker(&s, "seen", 1);
    fs::write(src.join("d/f"), "changed").unwrap();
    fs::write(src.join("d/new"), "new").unwrap();
    assert_eq!(
        fs::metadata(mnt.join("d/f")).unwrap().len(),
        7,
        "d/f written behind the mount after the crash"
    );
    assert_eq!(listing(), ["f", "new"]);
    // And the successor's watch sees what comes after.
    fs::write(src.join("d/f"), "changed again").unwrap();
    wait_for(
        || fs::metadata(mnt.join("d/f")).is_ok_and(|m| m.len() == 13),
        "d/f written again behind the mount",
    );
}

/// A connection lost for good (aborted) under a writer, on a mount over
/// its own source: the writer's appends land in the source while nothing
/// is mounted, through the new mount once StartMount mounts again, and
/// every acknowledged one is there in the end, in main and in order (an
/// observation of the system test once suggested otherwise).
#[test]
fn appends_survive_a_lost_connection_and_a_fresh_mount_over_the_source() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let src = dir.path().join("over");
    fs::create_dir_all(&src).unwrap();
    fs::write(
        dir.path().join("mounts/over.toml"),
        format!(
            "source = \"{0}\"\nmountpoint = \"{0}\"\n[restart]\nburst = 1\n",
            src.display()
        ),
    )
    .unwrap();
    ok(&s.manager("StartMount", "s", &["over"]));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // One writer opens the file for every line; the other keeps its
    // descriptor until a write fails (one opened while nothing is mounted
    // writes to the source itself, behind the next mount's back).
    let writer = |log: PathBuf, reopen_every_line: bool| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut acked, mut errors) = (Vec::new(), 0u32);
            let mut i = 0u32;
            let mut file: Option<fs::File> = None;
            while !stop.load(Ordering::Relaxed) {
                let r = match file.take() {
                    Some(f) => Ok(f),
                    None => fs::OpenOptions::new().append(true).create(true).open(&log),
                }
                .and_then(|mut f| {
                    f.write_all(format!("line {i}\n").as_bytes())?;
                    f.sync_data()?;
                    Ok(f)
                });
                match r {
                    Ok(f) => {
                        acked.push(i);
                        i += 1;
                        if !reopen_every_line {
                            file = Some(f);
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            (acked, errors)
        })
    };
    let writers = [
        (src.join("reopened"), writer(src.join("reopened"), true)),
        (src.join("held"), writer(src.join("held"), false)),
    ];
    std::thread::sleep(Duration::from_millis(300));
    // fusectl (systemd mounts it), mounted for the test if it is not.
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
    let conns = Path::new("/sys/fs/fuse/connections");
    let _fusectl = Fusectl(
        fs::read_dir(conns).is_ok_and(|mut d| d.next().is_none())
            && nix::mount::mount(
                Some("fusectl"),
                conns,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .is_ok(),
    );
    let dev = fs::metadata(&src).unwrap().dev();
    agentfs_mount_worker::mount::abort_connection(dev).unwrap();
    wait_for(
        || s.property("over", "State") == "s \"failed\"",
        "the mount to fail",
    );
    std::thread::sleep(Duration::from_millis(300));
    ok(&s.manager("StartMount", "s", &["over"]));
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        ok(&s.mount_call("over", "CreateSnapshot", "ss", &["", &format!("s{round}")]));
    }
    stop.store(true, Ordering::Relaxed);
    let lines = |log: &Path| -> Vec<u32> {
        fs::read_to_string(log)
            .unwrap()
            .lines()
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect()
    };
    let mut seen = Vec::new();
    for (log, w) in writers {
        let (acked, errors) = w.join().unwrap();
        let shown = lines(&log);
        let missing: Vec<u32> = acked
            .iter()
            .copied()
            .filter(|i| !shown.contains(i))
            .collect();
        eprintln!(
            "{}: {} appends acknowledged, {errors} refused while the connection was lost, {} \
             lines shown by the mount",
            log.display(),
            acked.len(),
            shown.len()
        );
        assert!(
            missing.is_empty(),
            "{}: acknowledged appends missing: {missing:?}",
            log.display()
        );
        // In order; a line may stand twice: a write that failed when the
        // connection was lost may have been made, and it is retried.
        assert!(
            shown.windows(2).all(|w| w[0] <= w[1]),
            "in order: {shown:?}"
        );
        seen.push((log, shown));
    }
    ok(&s.manager("StopMount", "s", &["over"]));
    for (log, shown) in seen {
        assert_eq!(lines(&log), shown, "the source holds what the mount showed");
    }
}
/// A tmpfs of `size` at `at`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .unwrap();
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The supervised service with a state directory that fills up: callers
/// get errors that say so (over the bus and from the file system), the
/// log says so, nothing stored changes, the worker keeps serving, and all
/// works again once space is freed.
#[test]
fn a_full_state_directory_under_the_supervisor_refuses_cleanly_and_recovers() {
    use std::io::Write;
    let dir = tempdir();
    let statefs = Tmpfs::mount(&dir.path().join("statefs"), "1m");
    let state = statefs.0.join("full");
    let s = Supervisor::start(dir.path());
    let (src, mnt) = s.configure("full", &format!("state_dir = \"{}\"\n", state.display()));
    fs::write(src.join("big"), vec![7u8; 3 << 20]).unwrap();
    fs::write(src.join("small"), "small").unwrap();
    ok(&s.manager("StartMount", "s", &["full"]));
    ok(&s.mount_call("full", "CreateSnapshot", "ss", &["", "s1"]));
    let pid = s.property("full", "WorkerPid");
    // The pre-image of "big" (3 MiB) cannot be kept in 1 MiB: ENOSPC.
    let e = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .and_then(|mut f| f.write_all(b"x"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // A full disk: snapshots are refused with a named error.
    let filler = state.join("filler");
    let _ = fs::write(&filler, vec![0u8; 2 << 20]);
    let refused = fails_with(
        &s.mount_call("full", "CreateSnapshot", "ss", &["", "s2"]),
        "org.agentfs.Error.NoSpace",
    );
    assert!(
        refused.contains("catalog") && refused.contains("free space"),
        "{refused}"
    );
    assert_eq!(
        fs::read(mnt.join("big")).unwrap(),
        vec![7u8; 3 << 20],
        "main unchanged"
    );
    assert_eq!(
        fs::read(mnt.join(".agentfs/snapshots/s1/big")).unwrap(),
        vec![7u8; 3 << 20],
        "the snapshot unchanged"
    );
    assert_eq!(
        s.property("full", "WorkerPid"),
        pid,
        "the worker kept serving"
    );
    let log = s.log_text();
    assert!(
        log.contains("pre-image for the snapshots could not be stored")
            && log.contains("cannot write the catalog")
            && log.contains("No space left on device"),
        "the log says why: {log}"
    );
    // Space freed: everything works again.
    fs::remove_file(&filler).unwrap();
    ok(&s.mount_call("full", "DeleteSnapshot", "s", &["s1"]));
    ok(&s.mount_call("full", "CreateSnapshot", "ss", &["", "s2"]));
    fs::write(mnt.join("small"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(mnt.join(".agentfs/snapshots/s2/small")).unwrap(),
        "small"
    );
    ok(&s.manager("StopMount", "s", &["full"]));
    check_state(&state);
}

/// /dev/fuse missing (the fuse module not loaded) under the supervisor:
/// StartMount fails with an error naming /dev/fuse, the log and LastError
/// say so, nothing is mounted, and once /dev/fuse is there StartMount
/// works. The supervisor runs in a mount namespace of its own whose /dev
/// lacks it (the host's stays untouched).
#[test]
fn a_missing_dev_fuse_fails_start_mount_by_name_and_recovers() {
    let dir = tempdir();
    let dev = "mount -t tmpfs -o mode=755 agentfs-test-dev /dev && \
               mknod -m 666 /dev/null c 1 3 && mknod -m 666 /dev/zero c 1 5 && \
               mknod -m 666 /dev/urandom c 1 9 && exec \"$0\" \"$@\"";
    let s = Supervisor::start_through(
        dir.path(),
        &target_dir().join("agentfs-mount-worker"),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            dev,
        ],
    );
    let pid = s.child.as_ref().unwrap().id().to_string();
    let in_namespace = |script: &str| {
        Command::new("nsenter")
            .args(["-t", &pid, "-m", "sh", "-c", script])
            .output()
            .unwrap()
    };
    let (src, mnt) = s.configure("nofuse", "");
    fs::write(src.join("f"), "here").unwrap();
    let why = fails_with(&s.manager("StartMount", "s", &["nofuse"]), "");
    assert!(why.contains("/dev/fuse"), "{why}");
    assert_eq!(s.property("nofuse", "State"), "s \"failed\"");
    assert!(s.property("nofuse", "LastError").contains("/dev/fuse"));
    assert!(s.log_text().contains("/dev/fuse"), "{}", s.log_text());
    let mounted = format!("grep -q ' {} ' /proc/self/mountinfo", mnt.display());
    assert!(!in_namespace(&mounted).status.success(), "nothing mounted");
    // The fault goes away.
    ok(&in_namespace("mknod -m 666 /dev/fuse c 10 229"));
    ok(&s.manager("StartMount", "s", &["nofuse"]));
    let cat = in_namespace(&format!("cat '{}'", mnt.join("f").display()));
    assert_eq!(ok(&cat), "here");
    ok(&s.manager("StopMount", "s", &["nofuse"]));
    assert!(!in_namespace(&mounted).status.success(), "unmounted");
}

#[test]
fn users_may_do_only_what_the_config_grants() {
    let dir = tempdir();
    // nobody (65534) must reach the test's files.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let s = Supervisor::start(dir.path());
    s.configure("granted", "[access]\nusers = [\"nobody\"]\n");
    s.configure("private", "");
    ok(&s.manager("Reload", "", &[]));
    let nobody = Some(65534);
    let call = |args: &[&str]| {
        let mut a = vec![
            "call",
            "org.agentfs",
            "/org/agentfs",
            "org.agentfs.Manager1",
        ];
        a.extend_from_slice(args);
        s.busctl_as(nobody, &a)
    };
    // Reading is open; controlling needs a grant.
    ok(&call(&["ListMounts"]));
    let e = fails_with(&call(&["StartMount", "s", "private"]), "AccessDenied");
    assert!(e.contains("may not use mount private"), "{e}");
    ok(&call(&["StartMount", "s", "granted"]));
    ok(&s.manager("StartMount", "s", &["private"]));
    let e = fails_with(
        &s.mount_call_as(nobody, "private", "CreateSnapshot", "ss", &["", "x"]),
        "AccessDenied",
    );
    assert!(e.contains("private"), "{e}");
    fails_with(&call(&["Reload"]), "AccessDenied");

    ok(&s.mount_call_as(nobody, "granted", "CreateSnapshot", "ss", &["", "s1"]));
    ok(&s.mount_call_as(nobody, "granted", "CreateBranch", "ss", &["s1", "b1"]));
    let roots = Sleeper::spawn();
    let e = fails_with(
        &s.mount_call_as(nobody, "granted", "BindPid", "su", &["b1", &roots.pid()]),
        "AccessDenied",
    );
    assert!(e.contains("only your own processes"), "{e}");
    let own = Sleeper::spawn_as(65534);
    // setpriv execs sleep in place: the pid is the sleeper's.
    wait_for(
        || {
            fs::read_to_string(format!("/proc/{}/comm", own.pid()))
                .is_ok_and(|c| c.trim() == "sleep")
        },
        "the sleeper",
    );
    ok(&s.mount_call_as(nobody, "granted", "BindPid", "su", &["b1", &own.pid()]));
    let bindings = ok(&s.mount_call_as(nobody, "granted", "ListBindings", "", &[]));
    assert!(bindings.contains(&own.pid()), "{bindings}");
    let e = fails_with(
        &s.mount_call_as(nobody, "granted", "BindPid", "su", &["b1", "999999"]),
        "NotFound",
    );
    assert!(e.contains("999999"), "{e}");
}

/// What one workload thread did that the mount acknowledged.
#[derive(Default)]
struct Acked {
    /// Lines 1..=appended were appended to `log` (one descriptor, open
    /// across every crash).
    appended: u64,
    /// `g<i>` were written, fsync'd and renamed from `t<i>` (the last
    /// [`KEEP`]; older ones were checked and removed by the workload).
    renamed: std::collections::VecDeque<u64>,
    /// `r<i>` were created relative to a directory descriptor held open
    /// (the last [`KEEP`], as above).
    relative: std::collections::VecDeque<u64>,
    /// Last byte msync'd into each of the 16 pages of the mapped `mm`.
    pages: [u8; 16],
    /// Every error the application saw.
    errors: Vec<String>,
}

/// How many of its newest files the crash workload keeps; older ones it
/// checks (made before some crash) and removes.
const KEEP: usize = 50;

/// Appends, fsyncs, renames, `openat`s, removals and mmap writes in `dir`
/// until `stop`, the way an application would, recording what succeeded
/// and checking, as it goes, that what succeeded earlier is still there.
fn crash_workload(dir: PathBuf, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Acked {
    use std::io::Write;
    use std::os::fd::AsFd;
    let mut a = Acked::default();
    fs::create_dir_all(&dir).unwrap();
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    let held = fs::File::open(&dir).unwrap();
    let mm = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("mm"))
        .unwrap();
    mm.set_len(16 * 4096).unwrap();
    // SAFETY: a shared mapping of a file this thread owns, unmapped below.
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(16 * 4096).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            mm.as_fd(),
            0,
        )
        .unwrap()
    };
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let mut step = |what: &str, r: std::io::Result<()>| match r {
            Ok(()) => true,
            Err(e) => {
                a.errors.push(format!("{} {what} {i}: {e}", dir.display()));
                false
            }
        };
        if step("append", log.write_all(format!("{i}\n").as_bytes())) {
            a.appended = i;
        }
        if i.is_multiple_of(5) {
            step("fdatasync log", log.sync_data());
        }
        let (t, g) = (dir.join(format!("t{i}")), dir.join(format!("g{i}")));
        let r = fs::File::create(&t)
            .and_then(|mut f| {
                f.write_all(format!("file {i}").as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&t, &g));
        if step("write, fsync, rename", r) {
            a.renamed.push_back(i);
        }
        if a.renamed.len() > KEEP {
            let old = a.renamed.pop_front().unwrap();
            let g = dir.join(format!("g{old}"));
            let r = match fs::read_to_string(&g) {
                Ok(text) if text == format!("file {old}") => fs::remove_file(&g),
                Ok(text) => Err(std::io::Error::other(format!("g{old} holds {text:?}"))),
                Err(e) => Err(e),
            };
            step("check and remove an acknowledged file", r);
        }
        let r = nix::fcntl::openat(
            &held,
            format!("r{i}").as_str(),
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .map(drop)
        .map_err(std::io::Error::from);
        if step("openat", r) {
            a.relative.push_back(i);
        }
        if a.relative.len() > KEEP {
            let old = a.relative.pop_front().unwrap();
            let r = nix::unistd::unlinkat(
                &held,
                format!("r{old}").as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            step("unlinkat", r.map_err(std::io::Error::from));
        }
        let page = (i % 16) as usize;
        let value = (i % 251) as u8 + 1;
        // SAFETY: within the mapping.
        unsafe { *map.as_ptr().cast::<u8>().add(page * 4096) = value };
        // SAFETY: the mapping is live.
        let r = unsafe {
            nix::sys::mman::msync(
                map.byte_add(page * 4096),
                4096,
                nix::sys::mman::MsFlags::MS_SYNC,
            )
        }
        .map_err(std::io::Error::from);
        if step("mmap write + msync", r) {
            a.pages[page] = value;
        }
    }
    // SAFETY: mapped above, not used after.
    unsafe { nix::sys::mman::munmap(map, 16 * 4096).unwrap() };
    a
}

/// Checks in `dir` (read through the mount) everything `a` says was
/// acknowledged.
fn check_acked(dir: &Path, a: &Acked) {
    assert!(
        a.errors.is_empty(),
        "the application saw {} errors, first: {:?}",
        a.errors.len(),
        &a.errors[..a.errors.len().min(5)]
    );
    let log = fs::read_to_string(dir.join("log")).unwrap();
    let want: String = (1..=a.appended).map(|i| format!("{i}\n")).collect();
    assert!(
        log == want,
        "{}: log is not lines 1..={}",
        dir.display(),
        a.appended
    );
    for i in &a.renamed {
        assert_eq!(
            fs::read_to_string(dir.join(format!("g{i}"))).unwrap(),
            format!("file {i}")
        );
        assert!(!dir.join(format!("t{i}")).exists());
    }
    for i in &a.relative {
        assert!(
            dir.join(format!("r{i}")).exists(),
            "r{i} in {}",
            dir.display()
        );
    }
    let mm = fs::read(dir.join("mm")).unwrap();
    for (page, &v) in a.pages.iter().enumerate() {
        if v != 0 {
            assert_eq!(mm[page * 4096], v, "page {page} of {}/mm", dir.display());
        }
    }
}

#[test]
fn applications_never_see_a_worker_crash() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (_, mnt) = s.configure("steady", "[restart]\nburst = 100\ninterval_sec = 600\n");
    ok(&s.manager("StartMount", "s", &["steady"]));
    ok(&s.mount_call("steady", "CreateSnapshot", "ss", &["", "base"]));
    ok(&s.mount_call("steady", "CreateBranch", "ss", &["base", "a"]));
    ok(&s.mount_call("steady", "CreateBranch", "ss", &["base", "b"]));
    let places = [
        mnt.join("work"),
        mnt.join(".agentfs/branches/a/work"),
        mnt.join(".agentfs/branches/b/work"),
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = places
        .iter()
        .map(|p| {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || crash_workload(p, stop))
        })
        .collect();
    let rounds: u32 = std::env::var("AGENTFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut seed = std::process::id() as u64 | 1;
    let mut recovery = Vec::new();
    for round in 1..=rounds {
        // Past the supervisor's STABLE (1 s), at a random moment of the
        // workload.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(1000 + seed % 500));
        recovery.push(kill_worker(&s, "steady", round));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked: Vec<Acked> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    recovery.sort();
    eprintln!(
        "{rounds} kills: recovery median {:?}, max {:?}; operations acknowledged per place: {:?}",
        recovery[recovery.len() / 2],
        recovery.last().unwrap(),
        acked.iter().map(|a| a.appended).collect::<Vec<_>>()
    );
    for (p, a) in places.iter().zip(&acked) {
        check_acked(p, a);
    }
    assert!(
        s.property("steady", "LastError").contains("signal 9"),
        "{}",
        s.property("steady", "LastError")
    );
    // Branches stayed apart: each saw only its own files.
    assert!(!mnt.join(".agentfs/branches/a/work/mm").exists() || acked[1].appended > 0);
    assert!(
        !mnt.join("work")
            .join(format!("g{}", acked[0].appended + 1))
            .exists()
    );
    ok(&s.manager("StopMount", "s", &["steady"]));
    assert!(
        mounts_under(dir.path()).is_empty(),
        "no mount is left behind"
    );
    check_state(&dir.path().join("state/steady"));
}

#[test]
fn a_hung_worker_is_replaced_and_callers_just_wait() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (_, mnt) = s.configure("stuck", "[restart]\nhang_timeout_sec = 2\n");
    ok(&s.manager("StartMount", "s", &["stuck"]));
    fs::write(mnt.join("before"), "written before the hang").unwrap();
    // A writer keeps appending and fsyncing through the hang.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (mnt.join("w"), stop.clone());
        std::thread::spawn(move || crash_workload(dir, stop))
    };
    std::thread::sleep(Duration::from_millis(300));
    let pid: i32 = s.property("stuck", "WorkerPid")[2..].parse().unwrap();
    let stopped = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    // An application calls into the hung worker and waits.
    let m = mnt.clone();
    let caller = std::thread::spawn(move || {
        fs::write(m.join("during"), "written during the hang")?;
        fs::read_to_string(m.join("before"))
    });
    wait_for(
        || {
            s.property("stuck", "Restarts") == "u 1"
                && s.property("stuck", "State") == "s \"running\""
        },
        "the hung worker's replacement",
    );
    let replaced = stopped.elapsed();
    assert_eq!(caller.join().unwrap().unwrap(), "written before the hang");
    assert_eq!(
        fs::read_to_string(mnt.join("during")).unwrap(),
        "written during the hang"
    );
    let why = s.property("stuck", "LastError");
    assert!(why.contains("did not answer within 2 s"), "{why}");
    assert!(
        s.log_text().contains("did not answer within 2 s"),
        "the log says why"
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    check_acked(&mnt.join("w"), &writer.join().unwrap());
    eprintln!("hung worker replaced {replaced:?} after SIGSTOP (hang_timeout_sec = 2)");
    // The stopped worker was killed, not left behind.
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "the hung worker {pid} is gone"
    );
}

/// Past `hang_timeout_sec` a worker is replaced only if none of its
/// threads runs or waits for the disk: long copy-ups and fsyncs on every
/// thread are waited for, a worker asleep on a lock is not.
#[test]
fn a_busy_worker_is_waited_for_and_a_stalled_one_is_replaced() {
    use agentfs_mount_worker::control::{self, Request};
    let dir = tempdir();
    let s = Supervisor::start_with_fault_hooks(dir.path());
    let (_, mnt) = s.configure("busy", "[restart]\nhang_timeout_sec = 1\n");
    ok(&s.manager("StartMount", "s", &["busy"]));
    fs::write(mnt.join("f"), "kept").unwrap();
    let state = dir.path().join("state/busy");
    // Busy: a thread spins for 4 s while every FUSE request waits for it.
    let stall = |spin, seconds| {
        let state = state.clone();
        std::thread::spawn(move || control::call(&state, &Request::Stall { seconds, spin }))
    };
    let busy = stall(true, 4);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "kept");
    assert!(
        busy.join().unwrap().is_ok(),
        "the busy worker finished its work"
    );
    assert_eq!(s.property("busy", "Restarts"), "u 0");
    assert!(s.log_text().contains("but is busy"), "{}", s.log_text());
    // Stalled: the same, asleep.
    let stalled = stall(false, 120);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "kept");
    assert!(
        stalled.join().unwrap().is_err(),
        "the stalled worker was killed"
    );
    wait_for(
        || {
            s.property("busy", "Restarts") == "u 1"
                && s.property("busy", "State") == "s \"running\""
        },
        "the stalled worker's replacement",
    );
    let why = s.property("busy", "LastError");
    assert!(why.contains("did not answer within 1 s"), "{why}");
}

/// 10 000 cgroups of this test under the cgroup2 root, removed when dropped.
struct ManyCgroups {
    dir: PathBuf,
    count: usize,
}

impl ManyCgroups {
    fn new(count: usize) -> ManyCgroups {
        let root = fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("no cgroup2 file system mounted: cgroup bindings cannot be tested");
        let dir = root.join(format!("aft-many-{}", std::process::id()));
        fs::create_dir(&dir).unwrap();
        let cg = ManyCgroups { dir, count: 0 };
        let mut cg = cg;
        for i in 0..count {
            fs::create_dir(cg.dir.join(format!("c{i}"))).unwrap();
            cg.count = i + 1;
        }
        cg
    }

    /// Cgroup `i`'s path as bindings name it (from the cgroup2 root).
    fn path(&self, i: usize) -> String {
        format!("/{}/c{i}", self.dir.file_name().unwrap().to_str().unwrap())
    }
}

impl Drop for ManyCgroups {
    fn drop(&mut self) {
        for i in 0..self.count {
            let _ = fs::remove_dir(self.dir.join(format!("c{i}")));
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Bindings at scale: 10 000 cgroup bindings made over the bus (four at a
/// time) are all kept, listed, survive a worker crash, answer with the
/// right branch, and go again; the mount serves throughout.
#[test]
fn ten_thousand_bindings_are_kept_and_the_service_stays_responsive() {
    const N: usize = 10_000;
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (_, mnt) = s.configure("many", "");
    ok(&s.manager("StartMount", "s", &["many"]));
    fs::write(mnt.join("f"), "main").unwrap();
    ok(&s.mount_call("many", "CreateSnapshot", "ss", &["", "base"]));
    ok(&s.mount_call("many", "CreateBranch", "ss", &["base", "b"]));
    fs::write(mnt.join(".agentfs/branches/b/f"), "branch").unwrap();
    let cgroups = ManyCgroups::new(N);
    let paths: Vec<String> = (0..N).map(|i| cgroups.path(i)).collect();
    let address = s.bus.address.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let call_all = |method: &'static str, with_branch: bool| {
        let (paths, address) = (paths.clone(), address.clone());
        rt.block_on(async move {
            let conn = zbus::connection::Builder::address(address.as_str())
                .unwrap()
                .build()
                .await
                .unwrap();
            let started = Instant::now();
            let mut calls = tokio::task::JoinSet::new();
            for chunk in paths.chunks(N / 4) {
                let (conn, chunk) = (conn.clone(), chunk.to_vec());
                calls.spawn(async move {
                    for p in chunk {
                        let (path, iface) = ("/org/agentfs/mount/many", Some("org.agentfs.Mount1"));
                        let r = if with_branch {
                            conn.call_method(Some("org.agentfs"), path, iface, method, &("b", &p))
                                .await
                        } else {
                            conn.call_method(Some("org.agentfs"), path, iface, method, &(&p,))
                                .await
                        };
                        r.unwrap_or_else(|e| panic!("{method} {p}: {e}"));
                    }
                });
            }
            while let Some(r) = calls.join_next().await {
                r.unwrap();
            }
            started.elapsed()
        })
    };
    let count = |s: &Supervisor| {
        let list = ok(&s.mount_call("many", "ListBindings", "", &[]));
        list.split(' ').nth(1).unwrap().parse::<usize>().unwrap()
    };
    let bound = call_all("BindCgroup", true);
    assert_eq!(count(&s), N);
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "main");
    // A process in one of them sees the branch; the bindings outlive the
    // worker.
    kill_worker(&s, "many", 1);
    assert_eq!(count(&s), N);
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(format!("read _; cat '{}'", mnt.join("f").display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    fs::write(
        cgroups.dir.join("c9999/cgroup.procs"),
        shell.id().to_string(),
    )
    .unwrap();
    ok(&s.mount_call("many", "CreateSnapshot", "ss", &["", "after"]));
    drop(shell.stdin.take());
    let out = shell.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "branch");
    let unbound = call_all("UnbindCgroup", false);
    assert_eq!(count(&s), 0);
    eprintln!("{N} cgroup bindings made in {bound:?}, removed in {unbound:?}");
    ok(&s.manager("StopMount", "s", &["many"]));
    check_state(&dir.path().join("state/many"));
}

#[test]
fn malformed_and_concurrent_calls_leave_the_service_responsive_and_correct() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    s.configure("load", "");
    ok(&s.manager("StartMount", "s", &["load"]));
    ok(&s.mount_call("load", "CreateSnapshot", "ss", &["", "base"]));
    ok(&s.mount_call("load", "CreateBranch", "ss", &["base", "b"]));
    let alive = |s: &Supervisor| ok(&s.manager("ListMounts", "", &[]));

    // Wrong signatures, missing and extra arguments: refused by the bus
    // layer with InvalidArgs, nothing else happens.
    for (method, sig, args) in [
        ("StartMount", "u", vec!["5"]),
        ("StartMount", "", vec![]),
        ("StopMount", "ss", vec!["load", "x"]),
    ] {
        let err = fails_with(&s.manager(method, sig, &args), "InvalidArgs");
        assert!(
            err.contains("Signature mismatch") || err.contains("Invalid"),
            "{method}: {err}"
        );
    }
    fails_with(
        &s.mount_call("load", "BindPid", "ss", &["b", "12"]),
        "InvalidArgs",
    );
    alive(&s);

    // Huge strings: named errors, not echoed back whole.
    let huge = "x".repeat(100_000);
    for out in [
        s.manager("StartMount", "s", &[&huge]),
        s.mount_call("load", "CreateSnapshot", "ss", &["", &huge]),
        s.mount_call("load", "CreateBranch", "ss", &[&huge, "c"]),
        s.mount_call("load", "BindCgroup", "ss", &["b", &huge]),
        s.mount_call("load", "DeleteBranch", "sb", &[&huge, "false"]),
    ] {
        let err = fails_with(&out, "an error");
        assert!(
            err.len() < 2_000,
            "the error repeats the whole argument: {err}"
        );
        assert!(
            err.contains("bytes") || err.contains("message cut"),
            "the error says it is cut: {err}"
        );
    }
    alive(&s);

    // 1 000 binds and unbinds at once, over 20 processes, from 50
    // connections: every call answers, and the bindings end as asked.
    let sleepers: Vec<Sleeper> = (0..20).map(|_| Sleeper::spawn()).collect();
    let pids: Vec<u32> = sleepers.iter().map(|p| p.0.id()).collect();
    let address = s.bus.address.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let answers = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..50 {
            conns.push(
                zbus::connection::Builder::address(address.as_str())
                    .unwrap()
                    .build()
                    .await
                    .unwrap(),
            );
        }
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..1000usize {
            let conn = conns[i % conns.len()].clone();
            let pid = pids[i % pids.len()];
            calls.spawn(async move {
                let (path, iface) = ("/org/agentfs/mount/load", Some("org.agentfs.Mount1"));
                let dest = Some("org.agentfs");
                let r = if i % 2 == 0 {
                    conn.call_method(dest, path, iface, "BindPid", &("b", pid))
                        .await
                } else {
                    conn.call_method(dest, path, iface, "UnbindPid", &(pid,))
                        .await
                };
                match r {
                    Ok(_) => Ok(()),
                    Err(zbus::Error::MethodError(name, _, _)) => Err(name.to_string()),
                    Err(e) => panic!("call {i} got no answer: {e}"),
                }
            });
        }
        let mut answers = Vec::new();
        while let Some(r) = calls.join_next().await {
            answers.push(r.unwrap());
        }
        answers
    });
    assert_eq!(answers.len(), 1000);
    for a in &answers {
        if let Err(name) = a {
            // Unbinding a process not bound at that moment.
            assert_eq!(name, "org.agentfs.Error.NotFound");
        }
    }
    // Settle: unbind everything, then bind every process once.
    for pid in &pids {
        let _ = s.mount_call("load", "UnbindPid", "u", &[&pid.to_string()]);
    }
    let list = ok(&s.mount_call("load", "ListBindings", "", &[]));
    assert!(list.starts_with("a(sss) 0"), "{list}");
    for pid in &pids {
        ok(&s.mount_call("load", "BindPid", "su", &["b", &pid.to_string()]));
    }
    let list = ok(&s.mount_call("load", "ListBindings", "", &[]));
    assert!(list.starts_with("a(sss) 20 "), "{list}");
    drop(sleepers);
    alive(&s);
}
