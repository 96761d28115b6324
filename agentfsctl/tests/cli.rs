//! agentfsctl against a private session bus on which no supervisor runs.
//! (The end-to-end tests against the real supervisor live with it.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

/// A private `dbus-daemon --session`, killed (by its pid) when dropped.
struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start() -> Bus {
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nosyslog", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon runs (package dbus-daemon / dbus)");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        // The guard exists before anything can fail, so the daemon is
        // killed whatever happens below.
        let mut bus = Bus {
            child,
            address: String::new(),
        };
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("dbus-daemon prints its address");
        bus.address = line.trim().to_owned();
        assert!(
            bus.address.starts_with("unix:"),
            "unexpected address {:?}",
            bus.address
        );
        bus
    }

    /// Runs agentfsctl with `args`, talking to this bus as the session bus.
    fn agentfsctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_agentfsctl"))
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .output()
            .expect("agentfsctl runs")
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_not_running(out: &Output) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with("agentfsctl: the AgentFS service is not running (start it with: "),
        "stderr {stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
}

#[test]
fn mount_list_without_a_supervisor() {
    let bus = Bus::start();
    let out = bus.agentfsctl(&["--user", "mount-list"]);
    assert_not_running(&out);
    // --json changes nothing about errors.
    let out = bus.agentfsctl(&["--user", "--json", "mount-list"]);
    assert_not_running(&out);
}

#[test]
fn other_commands_without_a_supervisor() {
    let bus = Bus::start();
    for args in [
        &["--user", "--mount", "a", "snapshot-list"][..],
        &["--user", "snapshot-create", "--name", "x"],
        &["--user", "status"],
        &["--user", "mount-start", "a"],
        &["--user", "reload"],
        &["--user", "exec", "--branch", "b", "--", "true"],
    ] {
        let out = bus.agentfsctl(args);
        assert_not_running(&out);
    }
}

/// Like `systemctl stop` of an inactive unit: stopping a mount of a service
/// that is not running succeeds (nothing is mounted), and it does not start
/// the service to do so. It is the ExecStop of agentfs@.service, which runs
/// while systemd restarts a crashed supervisor.
#[test]
fn mount_stop_without_a_supervisor_is_a_no_op() {
    let bus = Bus::start();
    let out = bus.agentfsctl(&["--user", "mount-stop", "a"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "stderr {stderr:?}");
    assert_eq!(
        stdout,
        "mount a is not mounted (the AgentFS service is not running)\n"
    );
    assert_eq!(stderr, "");
    let out = bus.agentfsctl(&["--user", "--json", "mount-stop", "a"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["state"], "stopped");
}

#[test]
fn follow_without_a_supervisor_fails() {
    let bus = Bus::start();
    let out = bus.agentfsctl(&["--user", "mount-start", "--follow", "a"]);
    assert_not_running(&out);
}

#[test]
fn no_bus_at_all() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentfsctl"))
        .args(["--user", "mount-list"])
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            "unix:path=/nonexistent/agentfs-test-bus",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("agentfsctl: cannot connect to the session bus: "),
        "{stderr:?}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentfsctl"))
        .args(["branch-bind", "--branch", "b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn generate_writes_the_files() {
    let dir = std::env::temp_dir().join(format!("agentfsctl-cli-gen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_agentfsctl"))
        .args(["generate", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in [
        "completions/agentfsctl.bash",
        "completions/_agentfsctl",
        "completions/agentfsctl.fish",
        "man/agentfsctl.1",
        "man/agentfsctl-branch-bind.1",
    ] {
        assert!(
            std::fs::metadata(dir.join(f)).is_ok_and(|m| m.len() > 0),
            "{f}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
