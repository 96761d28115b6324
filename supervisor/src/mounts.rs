//! One mount's life: its state as the bus shows it, and the task that
//! supervises its worker (start, restart within limits, stop).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zbus::zvariant::OwnedObjectPath;

use crate::config::{ConfigError, MountConfig};
use crate::fdstore;
use crate::launch::{self, Connection, Worker};
use agentfs_mount_worker::control::{self, Request};

/// A mount's state, as in `Mount1.State`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Mounting and starting the worker.
    Starting,
    /// Served by a worker.
    Running,
    /// The worker died; a new one is being started.
    Restarting,
    /// Unmounting.
    Stopping,
    /// Not mounted.
    Stopped,
    /// Not mounted because of an error (bad config, restart limit).
    Failed,
}

impl State {
    /// The name on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Restarting => "restarting",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// What the bus shows of a mount. One lock, held only to read or update.
#[derive(Clone, Debug)]
pub struct Info {
    /// The config as last read (applies at the next start).
    pub config: Result<MountConfig, ConfigError>,
    /// The config the mount was started with, while it is up.
    pub active: Option<MountConfig>,
    /// The state.
    pub state: State,
    /// The worker's pid, 0 when none runs.
    pub worker_pid: u32,
    /// Restarts since the mount was started.
    pub restarts: u32,
    /// Why it last failed or restarted.
    pub last_error: String,
}

/// Called after every change of a mount's [`Info`] (the bus announces it).
pub type OnChange = Arc<dyn Fn(&Arc<Mount>, Option<(u32, String)>) + Send + Sync>;

/// One configured mount.
pub struct Mount {
    /// Its name.
    pub name: String,
    /// Its object path on the bus.
    pub path: OwnedObjectPath,
    info: Mutex<Info>,
    /// The supervising task while the mount is up; the async lock also
    /// serialises start and stop.
    life: tokio::sync::Mutex<Option<Supervision>>,
    on_change: OnChange,
}

struct Supervision {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Mount {
    /// A stopped mount (or failed, if its config is bad).
    pub fn new(
        name: String,
        path: OwnedObjectPath,
        config: Result<MountConfig, ConfigError>,
        on_change: OnChange,
    ) -> Arc<Mount> {
        let (state, last_error) = match &config {
            Ok(_) => (State::Stopped, String::new()),
            Err(e) => (State::Failed, e.to_string()),
        };
        Arc::new(Mount {
            name,
            path,
            info: Mutex::new(Info {
                config,
                active: None,
                state,
                worker_pid: 0,
                restarts: 0,
                last_error,
            }),
            life: tokio::sync::Mutex::new(None),
            on_change,
        })
    }

    /// A copy of what the bus shows.
    pub fn info(&self) -> Info {
        self.info.lock().expect("mount info lock").clone()
    }

    /// The config a running mount was started with (`None` when it is
    /// not running).
    pub fn running_config(&self) -> Option<MountConfig> {
        let i = self.info.lock().expect("mount info lock");
        match (&i.active, i.state) {
            (Some(c), State::Running) => Some(c.clone()),
            _ => None,
        }
    }

    /// The config that describes the mount now: the one it runs with while
    /// it is up, else the one last read.
    pub fn current_config(&self) -> Option<MountConfig> {
        let i = self.info.lock().expect("mount info lock");
        i.active.clone().or_else(|| i.config.clone().ok())
    }

    fn update(self: &Arc<Self>, f: impl FnOnce(&mut Info), restarted: Option<(u32, String)>) {
        f(&mut self.info.lock().expect("mount info lock"));
        (self.on_change)(self, restarted);
    }

    /// Records a config read again (used at the next start). A stopped
    /// mount shows a bad config as `failed`.
    pub fn set_config(self: &Arc<Self>, config: Result<MountConfig, ConfigError>) {
        self.update(
            |i| {
                if matches!(i.state, State::Stopped | State::Failed) {
                    match &config {
                        Ok(_) if i.state == State::Failed && i.worker_pid == 0 => {
                            i.state = State::Stopped;
                        }
                        Err(e) => {
                            i.state = State::Failed;
                            i.last_error = e.to_string();
                        }
                        Ok(_) => {}
                    }
                }
                i.config = config;
            },
            None,
        );
    }

    /// Whether the mount is stopped or failed (nothing to tear down).
    pub fn is_down(&self) -> bool {
        matches!(self.info().state, State::Stopped | State::Failed)
    }

    /// Mounts and starts the worker with `config`; returns once it serves.
    pub async fn start(
        self: &Arc<Self>,
        config: Result<MountConfig, ConfigError>,
        worker_exe: PathBuf,
    ) -> Result<(), String> {
        self.bring_up(config, worker_exe, None).await
    }

    /// Serves `conn`, which a previous supervisor left mounted, with a new
    /// worker; returns once it serves.
    pub async fn resume(
        self: &Arc<Self>,
        config: Result<MountConfig, ConfigError>,
        worker_exe: PathBuf,
        conn: Connection,
    ) -> Result<(), String> {
        self.bring_up(config, worker_exe, Some(conn)).await
    }

    async fn bring_up(
        self: &Arc<Self>,
        config: Result<MountConfig, ConfigError>,
        worker_exe: PathBuf,
        left: Option<Connection>,
    ) -> Result<(), String> {
        let mut life = self.life.lock().await;
        if let Some(s) = life.as_ref() {
            if !s.task.is_finished() {
                return Ok(()); // already up
            }
        }
        *life = None;
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(mount = %self.name, "cannot start: {msg}");
                self.set_config(Err(e));
                return Err(msg);
            }
        };
        for what in config.unapplied() {
            tracing::warn!(mount = %self.name, "{what} is accepted but not applied yet by the worker");
        }
        self.update(
            |i| {
                i.config = Ok(config.clone());
                i.active = Some(config.clone());
                i.state = State::Starting;
                i.restarts = 0;
            },
            None,
        );
        let up = match left {
            None => {
                tracing::info!(mount = %self.name, source = %config.source.display(), mountpoint = %config.mountpoint.display(), "starting");
                let up = launch::start(&config, &worker_exe).await;
                if let Ok((conn, _)) = &up {
                    fdstore::park(&self.name, conn);
                }
                up
            }
            Some(conn) => {
                tracing::info!(mount = %self.name, mountpoint = %config.mountpoint.display(), "taking over the mount a previous supervisor left");
                let c = config.clone();
                let _ = tokio::task::spawn_blocking(move || launch::end_leftover_worker(&c)).await;
                match launch::take_over(&config, &worker_exe, &conn).await {
                    Ok(w) => Ok((conn, w)),
                    Err(why) => {
                        fdstore::unpark(&self.name, &conn);
                        let _ = tokio::task::spawn_blocking(move || launch::detach(&conn)).await;
                        Err(why)
                    }
                }
            }
        };
        match up {
            Ok((conn, worker)) => {
                let pid = worker.pid;
                self.update(
                    |i| {
                        i.state = State::Running;
                        i.worker_pid = pid;
                    },
                    None,
                );
                tracing::info!(mount = %self.name, worker = pid, "running");
                let (stop, stop_rx) = oneshot::channel();
                let task = tokio::spawn(supervise(
                    self.clone(),
                    config,
                    worker_exe,
                    conn,
                    worker,
                    stop_rx,
                ));
                *life = Some(Supervision { stop, task });
                Ok(())
            }
            Err(why) => {
                tracing::error!(mount = %self.name, "cannot start: {why}");
                self.update(
                    |i| {
                        i.state = State::Failed;
                        i.active = None;
                        i.last_error = why.clone();
                    },
                    None,
                );
                Err(why)
            }
        }
    }

    /// Unmounts and stops the worker; returns once it is gone.
    pub async fn stop(self: &Arc<Self>) {
        let mut life = self.life.lock().await;
        if let Some(s) = life.take() {
            let _ = s.stop.send(());
            let _ = s.task.await;
        }
    }
}

/// Why the supervising loop woke up.
enum Event {
    Stop,
    Exited(std::process::ExitStatus),
    Hung(String),
}

/// A worker that served this long before it died is replaced at once;
/// one that died sooner (a crash loop) after a doubling back-off.
const STABLE: Duration = Duration::from_secs(1);

/// How often a running worker is asked whether it still answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A busy worker (a thread running or in disk I/O) is given this many
/// timeouts to answer before it counts as hung anyway: long copy-ups and
/// fsyncs on every thread are work, an endless loop is not.
const BUSY_TIMEOUTS: u32 = 10;

/// Returns (only) once worker `pid` fails to answer, within the timeout, a
/// request on its control socket or a FUSE request (a stat of the mount
/// root, asked of the worker itself: see [`stat_uncached`]) while none of
/// its threads runs or waits for the disk; or, busy, for [`BUSY_TIMEOUTS`]
/// timeouts. Never returns without a timeout.
async fn hang(config: &MountConfig, pid: u32) -> String {
    let secs = config.restart.hang_timeout_sec;
    if secs == 0 {
        return std::future::pending().await;
    }
    let timeout = Duration::from_secs(secs.into());
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let (dir, root) = (config.state_dir.clone(), config.mountpoint.clone());
        let mut probe = tokio::task::spawn_blocking(move || {
            let _ = control::call(&dir, &Request::BindingList {});
            let _ = stat_uncached(&root);
        });
        // Errors are not hangs: a dead worker shows as its exit.
        let mut waited = 0;
        while tokio::time::timeout(timeout, &mut probe).await.is_err() {
            waited += 1;
            if waited >= BUSY_TIMEOUTS {
                return format!(
                    "did not answer within {} s although busy (restart.hang_timeout_sec \
                     = {secs}, {BUSY_TIMEOUTS} times that for a busy worker)",
                    secs * BUSY_TIMEOUTS
                );
            }
            if !busy(pid) {
                return format!("did not answer within {secs} s (restart.hang_timeout_sec)");
            }
            if waited == 1 {
                tracing::warn!(
                    pid,
                    "worker did not answer within {secs} s but is busy (running or waiting for \
                     the disk); waiting up to {} s",
                    secs * BUSY_TIMEOUTS
                );
            }
        }
    }
}

/// Stats `path` with AT_STATX_FORCE_SYNC, which makes FUSE ask the
/// worker whatever it caches: while nothing is bound the kernel may keep
/// the mount root's attributes for the whole cache timeout (minutes), and
/// a plain stat would not notice a hung worker until it ran out.
fn stat_uncached(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path and a buffer statx(2) only writes to.
    let r = unsafe {
        let mut buf: libc::statx = std::mem::zeroed();
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            &mut buf,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether a thread of process `pid` is running (R) or in uninterruptible
/// (disk) sleep (D), from `/proc/PID/task/*/stat`. A worker whose threads
/// all sleep (S: on a lock or a queue) or are stopped (T) while a request
/// waits is hung.
fn busy(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which may hold ") ".
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            matches!(state, Some('R' | 'D'))
        })
    })
}

/// Watches the worker; replaces it when it dies or hangs (within the
/// restart limit), on the same connection while the mount is there; stops
/// it when asked.
async fn supervise(
    mount: Arc<Mount>,
    config: MountConfig,
    worker_exe: PathBuf,
    mut conn: Connection,
    mut worker: Worker,
    mut stop_rx: oneshot::Receiver<()>,
) {
    let mut recent: VecDeque<Instant> = VecDeque::new();
    let window = Duration::from_secs(config.restart.interval_sec.into());
    let mut since = Instant::now();
    // Workers in a row that died before they served for STABLE.
    let mut quick = 0u32;
    loop {
        let event = tokio::select! {
            _ = &mut stop_rx => Event::Stop,
            status = worker.child.wait() => match status {
                Ok(s) => Event::Exited(s),
                Err(e) => {
                    tracing::error!(mount = %mount.name, "cannot wait for the worker: {e}");
                    Event::Stop
                }
            },
            why = hang(&config, worker.pid) => Event::Hung(why),
        };
        let mut reason = match event {
            Event::Stop => {
                mount.update(|i| i.state = State::Stopping, None);
                tracing::info!(mount = %mount.name, "stopping");
                fdstore::unpark(&mount.name, &conn);
                launch::stop(conn, worker).await;
                mount.update(
                    |i| {
                        i.state = State::Stopped;
                        i.active = None;
                        i.worker_pid = 0;
                    },
                    None,
                );
                tracing::info!(mount = %mount.name, "stopped");
                return;
            }
            Event::Exited(status) if status.success() && !conn.is_mounted() => {
                // The worker ends by itself only when its mount went away
                // (`umount`, `fusermount3 -u` by someone else).
                tracing::warn!(mount = %mount.name, "unmounted from outside AgentFS; the mount is stopped");
                fdstore::unpark(&mount.name, &conn);
                mount.update(
                    |i| {
                        i.state = State::Stopped;
                        i.active = None;
                        i.worker_pid = 0;
                        i.last_error = format!(
                            "{} was unmounted from outside AgentFS",
                            conn.mountpoint.display()
                        );
                    },
                    None,
                );
                return;
            }
            Event::Exited(status) => {
                format!("worker {} {}", worker.pid, launch::describe_exit(status))
            }
            Event::Hung(why) => {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                format!("worker {} {why}; killed it", worker.pid)
            }
        };
        quick = if since.elapsed() < STABLE {
            quick + 1
        } else {
            0
        };
        loop {
            let now = Instant::now();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                recent.pop_front();
            }
            if recent.len() >= config.restart.burst as usize {
                let msg = format!(
                    "{reason}; gave up after {} restarts within {} s (restart.burst, restart.interval_sec in {})",
                    recent.len(),
                    config.restart.interval_sec,
                    config.file.display()
                );
                tracing::error!(mount = %mount.name, "{msg}");
                fdstore::unpark(&mount.name, &conn);
                let _ = tokio::task::spawn_blocking(move || launch::detach(&conn)).await;
                mount.update(
                    |i| {
                        i.state = State::Failed;
                        i.active = None;
                        i.worker_pid = 0;
                        i.last_error = msg.clone();
                    },
                    None,
                );
                return;
            }
            recent.push_back(now);
            let mut restarts = 0;
            mount.update(
                |i| {
                    i.state = State::Restarting;
                    i.worker_pid = 0;
                    i.restarts += 1;
                    i.last_error = reason.clone();
                    restarts = i.restarts;
                },
                None,
            );
            tracing::warn!(mount = %mount.name, restarts, "{reason}; starting a new worker");
            // Back-off: none after a worker that served a while, then
            // 0.2 s doubling up to 5 s while they keep failing early.
            let delay = match quick {
                0 => Duration::ZERO,
                n => Duration::from_millis(100 << n.min(6)).min(Duration::from_secs(5)),
            };
            tokio::select! {
                _ = &mut stop_rx => {
                    fdstore::unpark(&mount.name, &conn);
                    let _ = tokio::task::spawn_blocking(move || launch::detach(&conn)).await;
                    mount.update(
                        |i| {
                            i.state = State::Stopped;
                            i.active = None;
                        },
                        None,
                    );
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            // Applications wait on the connection meanwhile; if the mount
            // went away (detached from outside), mount again.
            let started = if conn.is_mounted() {
                launch::take_over(&config, &worker_exe, &conn).await
            } else {
                launch::start(&config, &worker_exe).await.map(|(c, w)| {
                    fdstore::unpark(&mount.name, &conn);
                    fdstore::park(&mount.name, &c);
                    conn = c;
                    w
                })
            };
            match started {
                Ok(w) => {
                    worker = w;
                    since = Instant::now();
                    let pid = worker.pid;
                    mount.update(
                        |i| {
                            i.state = State::Running;
                            i.worker_pid = pid;
                        },
                        Some((restarts, reason.clone())),
                    );
                    tracing::info!(mount = %mount.name, worker = pid, restarts, "running again");
                    break;
                }
                Err(why) => {
                    tracing::error!(mount = %mount.name, "restart failed: {why}");
                    reason = why;
                    quick += 1;
                }
            }
        }
    }
}
