//! Bringing one worker up and down: the supervisor mounts (it holds
//! CAP_SYS_ADMIN), hands the /dev/fuse descriptor, a descriptor of the
//! source and the handoff journal to a worker it spawns, and waits until
//! the worker answers on its control socket. It keeps all three: when the
//! worker dies, a new one takes over the same connection, and applications
//! never see it end (specs/semantics.md, "Worker crashes").

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentfs_mount_worker::control::{self, Request};
use agentfs_mount_worker::{handoff, mount};
use tokio::process::{Child, Command};

use crate::config::MountConfig;

/// Descriptor numbers the worker finds its source, FUSE connection and
/// handoff journal at.
const SOURCE_FD: RawFd = 3;
const FUSE_FD: RawFd = 4;
const HANDOFF_FD: RawFd = 5;

/// How long a new worker may take to answer on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a stopping worker may take to exit after its mount went away,
/// before it is sent SIGTERM, and again before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// What outlives a mount's workers: the FUSE connection, the source
/// (which the mount may cover) and the handoff journal.
pub struct Descriptors<F> {
    /// /dev/fuse, connected to the mount.
    pub fuse: F,
    /// The source directory (O_PATH).
    pub source: F,
    /// The handoff journal (a memfd).
    pub journal: F,
}

/// A mount and its [`Descriptors`].
pub struct Connection {
    /// The FUSE mount's device number (identifies our mount at the path).
    pub dev: u64,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    fds: Descriptors<OwnedFd>,
}

impl Connection {
    /// A connection a previous supervisor left (`fdstore`), if its mount
    /// is still at `mountpoint`.
    pub fn adopt(dev: u64, mountpoint: &Path, fds: Descriptors<OwnedFd>) -> Option<Connection> {
        let conn = Connection {
            dev,
            mountpoint: mountpoint.to_owned(),
            fds,
        };
        conn.is_mounted().then_some(conn)
    }

    /// Its descriptors, borrowed.
    pub fn descriptors(&self) -> Descriptors<BorrowedFd<'_>> {
        Descriptors {
            fuse: self.fds.fuse.as_fd(),
            source: self.fds.source.as_fd(),
            journal: self.fds.journal.as_fd(),
        }
    }

    /// Whether our mount is still at its mountpoint.
    pub fn is_mounted(&self) -> bool {
        mount::device_of(&self.mountpoint).ok() == Some(self.dev)
    }
}

/// A running worker.
pub struct Worker {
    /// The worker process.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
}

/// Mounts `cfg` and starts its worker; returns once the worker is serving.
/// On failure nothing is left mounted.
pub async fn start(cfg: &MountConfig, worker_exe: &Path) -> Result<(Connection, Worker), String> {
    let cfg2 = cfg.clone();
    let conn = tokio::task::spawn_blocking(move || prepare(&cfg2))
        .await
        .map_err(|e| format!("mount task failed: {e}"))??;
    match spawn(cfg, worker_exe, &conn, false).await {
        Ok(w) => Ok((conn, w)),
        Err(why) => {
            detach(&conn);
            Err(why)
        }
    }
}

/// What a connection serves, as far as taking it over goes: a worker with
/// another state directory (or source) would answer the kernel's node ids
/// with other objects. Recorded in the handoff journal at mount time.
pub fn identity(cfg: &MountConfig) -> Vec<u8> {
    let mut id = b"source=".to_vec();
    id.extend_from_slice(cfg.source.as_os_str().as_bytes());
    id.extend_from_slice(b"\0state_dir=");
    id.extend_from_slice(cfg.state_dir.as_os_str().as_bytes());
    id
}

/// Gives up a connection that no mount takes over: aborts it and lazily
/// unmounts it wherever it is mounted (a dead mount left there would
/// answer ENOTCONN). Runs blocking.
pub fn detach_dev(dev: u64) {
    let _ = mount::abort_connection(dev);
    for mp in mount::mountpoints_of(dev).unwrap_or_default() {
        if let Err(e) = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH) {
            tracing::error!("cannot detach {}: {e}", mp.display());
        }
    }
}

/// Ends the worker a crashed supervisor left serving `cfg`'s state
/// directory (the pid in its lock file, checked to be a worker of that
/// directory), so that a new one can take its mount over. Runs blocking.
pub fn end_leftover_worker(cfg: &MountConfig) {
    use std::os::unix::ffi::OsStrExt;
    let path = cfg.state_dir.join("lock");
    let Ok(file) = File::open(&path) else {
        return;
    };
    // Not held: no worker serves this state directory (the pid written in
    // the file is then stale and may be anyone's now).
    if nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok() {
        return;
    }
    let lock = std::fs::read_to_string(&path).unwrap_or_default();
    let Ok(pid) = lock.trim().parse::<u32>() else {
        return;
    };
    let Ok(p) = crate::auth::HeldProcess::open(pid) else {
        return;
    };
    // A worker (comm is cut at 15 bytes) serving this directory.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|b| *b == 0);
    let serves = args.any(|a| a == b"--state-dir")
        && args.next() == Some(cfg.state_dir.as_os_str().as_bytes());
    if !(p.alive() && comm.trim_end() == "agentfs-mount-w" && serves) {
        return;
    }
    tracing::warn!(
        mount = %cfg.name,
        pid,
        "ending the worker a previous supervisor left, to take its mount over"
    );
    if !p.kill_and_wait(EXIT_GRACE) {
        tracing::error!(mount = %cfg.name, pid, "the old worker did not exit");
    }
}

/// Starts a worker that takes over `conn` from one that died.
pub async fn take_over(
    cfg: &MountConfig,
    worker_exe: &Path,
    conn: &Connection,
) -> Result<Worker, String> {
    spawn(cfg, worker_exe, conn, true).await
}

async fn spawn(
    cfg: &MountConfig,
    worker_exe: &Path,
    conn: &Connection,
    takeover: bool,
) -> Result<Worker, String> {
    let mut cmd = Command::new(worker_exe);
    cmd.arg("--source")
        .arg(&cfg.source)
        .args(["--source-fd", &SOURCE_FD.to_string()])
        .args(["--fuse-fd", &FUSE_FD.to_string()])
        .args(["--handoff-fd", &HANDOFF_FD.to_string()])
        .arg("--mountpoint")
        .arg(&cfg.mountpoint)
        .arg("--state-dir")
        .arg(&cfg.state_dir)
        .args(["--threads", &cfg.fuse.threads.to_string()])
        .args(["--max-write", &cfg.fuse.max_write.to_string()])
        .args(["--max-background", &cfg.fuse.max_background.to_string()])
        .args(["--passthrough", cfg.fuse.passthrough.as_arg()])
        .args(["--max-cached-nodes", &cfg.fuse.max_cached_nodes.to_string()])
        .stdin(Stdio::null())
        // systemd's notification socket is the supervisor's alone.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        // Its own process group: a Ctrl-C meant for a foreground
        // supervisor must not kill the workers behind its back.
        .process_group(0)
        .kill_on_drop(false);
    if let Some(ms) = cfg.fuse.cache_timeout_ms {
        cmd.args(["--cache-timeout-ms", &ms.to_string()]);
    }
    if !cfg.fuse.watch_source {
        cmd.arg("--no-source-watch");
    }
    if cfg.allow_other {
        cmd.arg("--allow-other");
    }
    if cfg.strict_isolation {
        cmd.arg("--strict-isolation");
    }
    if takeover {
        cmd.arg("--takeover");
    }
    let moves = [
        (conn.fds.source.as_raw_fd(), SOURCE_FD),
        (conn.fds.fuse.as_raw_fd(), FUSE_FD),
        (conn.fds.journal.as_raw_fd(), HANDOFF_FD),
    ];
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, dup2)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            die_with_parent(parent)?;
            place_fds(&moves)
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot start the worker {}: {e}; check the installation or --worker",
            worker_exe.display()
        )
    })?;
    if let Err(why) = wait_ready(&cfg.state_dir, &mut child).await {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(why);
    }
    Ok(Worker {
        pid: child.id().unwrap_or(0),
        child,
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
fn prepare(cfg: &MountConfig) -> Result<Connection, String> {
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
    let journal = handoff::create_memfd(&format!("agentfs-handoff-{}", cfg.name), &identity(cfg))
        .map_err(|e| format!("cannot create the handoff journal (memfd): {e}"))?;
    let fuse = mount::mount(&cfg.mountpoint, cfg.allow_other).map_err(|e| e.to_string())?;
    let dev = mount::device_of(&cfg.mountpoint).map_err(|e| {
        format!(
            "mounted {} but cannot find it in mountinfo: {e}",
            cfg.mountpoint.display()
        )
    })?;
    Ok(Connection {
        dev,
        mountpoint: cfg.mountpoint.clone(),
        fds: Descriptors {
            fuse,
            source,
            journal,
        },
    })
}

/// In the child: SIGKILL when the supervisor dies. A worker of a crashed
/// supervisor must not hold the state directory or keep systemd waiting
/// (KillMode=mixed signals only the main process): the next supervisor
/// takes the connection over from systemd's descriptor store with a new
/// worker. The signal follows the thread that forked, which is one of the
/// runtime's worker threads: they live as long as the supervisor.
fn die_with_parent(parent: i32) -> std::io::Result<()> {
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid cannot fail. The parent may have died before prctl.
    if unsafe { libc::getppid() } != parent {
        return Err(std::io::Error::other("the supervisor exited"));
    }
    Ok(())
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

/// Gives a mount up for good: aborts the connection (applications see
/// ENOTCONN rather than wait for a worker that will not come) and detaches
/// the mount (lazily, so open files do not keep it).
pub fn detach(conn: &Connection) {
    if conn.is_mounted() {
        let _ = mount::abort_connection(conn.dev);
        if let Err(e) = nix::mount::umount2(&conn.mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            tracing::error!("cannot detach {}: {e}", conn.mountpoint.display());
        }
    }
}

/// Stops a worker: unmounts (the kernel then ends the connection and the
/// worker exits once open files are closed), then SIGTERM, then SIGKILL.
pub async fn stop(conn: Connection, mut w: Worker) {
    let (mp, dev) = (conn.mountpoint.clone(), conn.dev);
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
    let _ = mount::abort_connection(dev);
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
