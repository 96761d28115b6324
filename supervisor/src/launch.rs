//! Bringing one worker up and down: the supervisor mounts (it holds
//! CAP_SYS_ADMIN), hands the /dev/fuse descriptor and a descriptor of the
//! source to a worker it spawns, and waits until the worker answers on its
//! control socket.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentfs_mount_worker::control::{self, Request};
use agentfs_mount_worker::mount;
use tokio::process::{Child, Command};

use crate::config::MountConfig;

/// Descriptor numbers the worker finds its source and FUSE connection at.
const SOURCE_FD: RawFd = 3;
const FUSE_FD: RawFd = 4;

/// How long a new worker may take to answer on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a stopping worker may take to exit after its mount went away,
/// before it is sent SIGTERM, and again before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A running worker and the mount it serves.
pub struct Worker {
    /// The worker process.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// The FUSE mount's device number (identifies our mount at the path).
    pub dev: u64,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
}

/// Mounts `cfg` and starts its worker; returns once the worker is serving.
/// On failure nothing is left mounted.
pub async fn start(cfg: &MountConfig, worker_exe: &Path) -> Result<Worker, String> {
    let cfg2 = cfg.clone();
    let (source, fuse, dev) = tokio::task::spawn_blocking(move || prepare(&cfg2))
        .await
        .map_err(|e| format!("mount task failed: {e}"))??;
    let mut cmd = Command::new(worker_exe);
    cmd.arg("--source")
        .arg(&cfg.source)
        .args(["--source-fd", &SOURCE_FD.to_string()])
        .args(["--fuse-fd", &FUSE_FD.to_string()])
        .arg("--mountpoint")
        .arg(&cfg.mountpoint)
        .arg("--state-dir")
        .arg(&cfg.state_dir)
        .args(["--threads", &cfg.fuse.threads.to_string()])
        .args(["--max-write", &cfg.fuse.max_write.to_string()])
        .args(["--max-background", &cfg.fuse.max_background.to_string()])
        .stdin(Stdio::null())
        // systemd's notification socket is the supervisor's alone.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        // Its own process group: a Ctrl-C meant for a foreground
        // supervisor must not kill the workers behind its back.
        .process_group(0)
        .kill_on_drop(false);
    if cfg.allow_other {
        cmd.arg("--allow-other");
    }
    if cfg.strict_isolation {
        cmd.arg("--strict-isolation");
    }
    let (src_raw, fuse_raw) = (source.as_raw_fd(), fuse.as_raw_fd());
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || place_fds(&[(src_raw, SOURCE_FD), (fuse_raw, FUSE_FD)]));
    }
    let spawned = cmd.spawn();
    drop(source);
    drop(fuse);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            detach(&cfg.mountpoint, dev);
            return Err(format!(
                "cannot start the worker {}: {e}; check the installation or --worker",
                worker_exe.display()
            ));
        }
    };
    if let Err(why) = wait_ready(&cfg.state_dir, &mut child).await {
        let _ = child.start_kill();
        let _ = child.wait().await;
        detach(&cfg.mountpoint, dev);
        return Err(why);
    }
    Ok(Worker {
        pid: child.id().unwrap_or(0),
        child,
        dev,
        mountpoint: cfg.mountpoint.clone(),
    })
}

/// Waits until the worker answers a request on its control socket.
async fn wait_ready(state_dir: &Path, child: &mut Child) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the worker {} before it served the mount; its log lines say why",
                describe_exit(status)
            ));
        }
        let dir = state_dir.to_owned();
        let answered = tokio::task::spawn_blocking(move || {
            control::call(&dir, &Request::BindingList {}).is_ok()
        })
        .await
        .unwrap_or(false);
        if answered {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(format!(
                "the worker did not answer on {} within {} s",
                state_dir.join(control::SOCKET).display(),
                READY_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens the source, clears a stale mount and mounts: what must happen in
/// this order, before the worker exists.
fn prepare(cfg: &MountConfig) -> Result<(OwnedFd, OwnedFd, u64), String> {
    cfg.check_paths().map_err(|e| e.to_string())?;
    mount::clear_stale(&cfg.mountpoint).map_err(|e| e.to_string())?;
    // Opened before mounting: the mountpoint may be the source itself.
    let source: OwnedFd = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(&cfg.source)
        .map_err(|e| format!("cannot open source {}: {e}", cfg.source.display()))?
        .into();
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        format!(
            "cannot create state directory {}: {e}",
            cfg.state_dir.display()
        )
    })?;
    let fuse = mount::mount(&cfg.mountpoint, cfg.allow_other).map_err(|e| e.to_string())?;
    let dev = mount::device_of(&cfg.mountpoint).map_err(|e| {
        format!(
            "mounted {} but cannot find it in mountinfo: {e}",
            cfg.mountpoint.display()
        )
    })?;
    Ok((source, fuse, dev))
}

/// In the child: moves each descriptor to its wanted number, clearing
/// close-on-exec. Goes through numbers above both sets first so that no
/// move overwrites a descriptor still to be moved.
fn place_fds(moves: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    let mut tmp = Vec::with_capacity(moves.len());
    for &(from, _) in moves {
        // SAFETY: plain fcntl on a descriptor this process owns.
        let t = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, 64) };
        if t < 0 {
            return Err(std::io::Error::last_os_error());
        }
        tmp.push(t);
    }
    for (&t, &(_, to)) in tmp.iter().zip(moves) {
        // SAFETY: dup2 onto a number reserved for the worker's use.
        if unsafe { libc::dup2(t, to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Detaches our mount at `mountpoint` (only if it is still the one with
/// device `dev`); lazily, so open files do not keep it.
pub fn detach(mountpoint: &Path, dev: u64) {
    if mount::device_of(mountpoint).ok() == Some(dev) {
        if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            tracing::error!("cannot detach {}: {e}", mountpoint.display());
        }
    }
}

/// Stops a worker: unmounts (the kernel then ends the connection and the
/// worker exits once open files are closed), then SIGTERM, then SIGKILL.
pub async fn stop(mut w: Worker) {
    let (mp, dev) = (w.mountpoint.clone(), w.dev);
    let _ = tokio::task::spawn_blocking(move || {
        if mount::device_of(&mp).ok() == Some(dev) {
            if let Err(e) = mount::unmount(&mp) {
                tracing::error!("cannot unmount {}: {e}", mp.display());
            }
        }
    })
    .await;
    if tokio::time::timeout(EXIT_GRACE, w.child.wait())
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!(
        pid = w.pid,
        "worker still running after unmount (open files); sending SIGTERM"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    if tokio::time::timeout(EXIT_GRACE, w.child.wait())
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!(pid = w.pid, "worker ignored SIGTERM; killing it");
    let _ = mount::abort_connection(w.dev);
    let _ = w.child.start_kill();
    let _ = w.child.wait().await;
}

/// "exited with status 1", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = nix::sys::signal::Signal::try_from(s)
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|_| "unknown".into());
            format!("was killed by signal {s} ({name})")
        }
        _ => "ended".to_owned(),
    }
}
