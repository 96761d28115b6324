//! The supervisor on a real, private D-Bus daemon with real FUSE mounts:
//! the D-Bus API of specs/dbus.md driven by `busctl`, as root and as an
//! unprivileged user.

use std::fs;
use std::os::unix::fs::PermissionsExt;
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
        let bus = Bus::start(dir);
        let worker = target_dir().join("agentfs-mount-worker");
        assert!(
            worker.exists(),
            "{} is missing: build the workspace (cargo test --workspace)",
            worker.display()
        );
        fs::create_dir_all(dir.join("mounts")).unwrap();
        let log = dir.join("supervisor.log");
        let child = Command::new(env!("CARGO_BIN_EXE_agentfs-supervisor"))
            .arg("--bus-address")
            .arg(&bus.address)
            .arg("--config-dir")
            .arg(dir.join("mounts"))
            .arg("--state-root")
            .arg(dir.join("state"))
            .arg("--worker")
            .arg(&worker)
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

#[test]
fn a_killed_worker_is_replaced_until_the_restart_limit() {
    let dir = tempdir();
    let s = Supervisor::start(dir.path());
    let (_, mnt) = s.configure("crashy", "[restart]\nburst = 2\ninterval_sec = 600\n");
    ok(&s.manager("StartMount", "s", &["crashy"]));
    fs::write(mnt.join("kept"), "acknowledged").unwrap();
    for round in 1..=2 {
        let pid: i32 = s.property("crashy", "WorkerPid")[2..].parse().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for(
            || {
                s.property("crashy", "Restarts") == format!("u {round}")
                    && s.property("crashy", "State") == "s \"running\""
            },
            "the restart",
        );
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
