//! Start-up and life cycle of one worker: checks, mount, session, signals.

use std::fs::{self, File};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{Config, Session, SessionACL};

use crate::control;
use crate::core::{FsCore, Isolation};
use crate::error::StartupError;
use crate::fuse_adapter::{Adapter, Tuning};
use crate::handoff::Journal;
use crate::mount;
use crate::passthrough::{Passthrough, Policy};
use crate::proc_events::ProcEvents;
use crate::root_cache::RootCache;
use crate::sandbox;
use crate::state::StateDir;
use crate::trim::{Load, Trimmer};
use crate::watch::SourceWatch;

/// What one worker serves and how.
#[derive(Clone, Debug)]
pub struct Options {
    /// The host directory to serve.
    pub source: PathBuf,
    /// Where the file system appears (may equal `source`).
    pub mountpoint: PathBuf,
    /// The mount's state directory.
    pub state_dir: PathBuf,
    /// Let users other than root use the mount.
    pub allow_other: bool,
    /// Serve an already-mounted /dev/fuse descriptor instead of mounting.
    pub fuse_fd: Option<i32>,
    /// Serve the source through this open descriptor instead of opening
    /// `source` (needed when something else mounted over the source).
    pub source_fd: Option<i32>,
    /// Keep a handoff journal, or take over a connection with one.
    pub handoff: Option<Handoff>,
    /// Session threads.
    pub threads: usize,
    /// Largest WRITE request the kernel may send.
    pub max_write: u32,
    /// Background requests the kernel may keep in flight (at least 1).
    pub max_background: u16,
    /// How long the kernel may cache names and attributes below the root;
    /// `None`: [`WATCHED_TIMEOUT`] if the source is watched, else
    /// [`UNWATCHED_TIMEOUT`].
    pub cache_timeout: Option<Duration>,
    /// Watch the source for changes made behind the mount's back
    /// ([`crate::watch`]).
    pub watch_source: bool,
    /// Nodes the kernel may keep before the worker has it drop names
    /// ([`crate::trim`]).
    pub max_cached_nodes: usize,
    /// Which opens use FUSE passthrough.
    pub passthrough: Policy,
    /// How far processes bound to a branch reach.
    pub isolation: Isolation,
    /// Confine the worker ([`crate::sandbox`]) when it serves a given
    /// descriptor. A worker that mounts by itself must unmount by itself,
    /// so it keeps its privileges.
    pub sandbox: bool,
    /// Answer the control channel's `sandbox-probe` (tests only).
    pub test_fault_hook: bool,
}

/// The default cache timeout when changes behind the mount's back are
/// watched: they are then invalidated as they happen, and the timeout only
/// bounds what the watch cannot see (see [`crate::watch`]). Ten minutes:
/// a tree stat'ed again after a pause (`git status`, then `git diff` a
/// minute later) is not looked up again name by name.
pub const WATCHED_TIMEOUT: Duration = Duration::from_secs(600);

/// The default cache timeout when they are not: the longest such a change
/// goes unseen.
pub const UNWATCHED_TIMEOUT: Duration = Duration::from_secs(1);

/// The shared-memory journal a successor takes over the connection with
/// ([`crate::handoff`]).
#[derive(Clone, Copy, Debug)]
pub struct Handoff {
    /// Its descriptor.
    pub fd: i32,
    /// The connection was initialized by a worker that died: take it over.
    pub takeover: bool,
}

/// The descriptor limit the worker asks for: a descriptor stays open for
/// every directory of main and every inode of a branch or snapshot the
/// kernel has looked up and not yet forgotten (the kernel forgets only
/// under memory pressure), so a branch's tree of N files read or
/// extracted through the mount holds about N descriptors. As virtiofsd
/// does, raise the limit to this much before dropping CAP_SYS_RESOURCE.
const WANTED_FDS: u64 = 1_000_000;

/// Raises RLIMIT_NOFILE towards [`WANTED_FDS`] (bounded by fs.nr_open): the
/// hard limit too if the worker may, else the soft limit to the hard one.
/// Returns the limit now and the one wanted. Never fails start-up: a low
/// limit only shows later, as EMFILE (and in a warning once serving).
fn raise_fd_limit() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, WANTED_FDS);
    };
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    let wanted = WANTED_FDS.min(nr_open);
    let limit = if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        wanted
    } else if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    (limit, wanted)
}

/// Who unmounts at the end: the worker when it mounted itself; nobody when
/// it serves a descriptor it was given (the supervisor owns that mount).
enum Ownership {
    Mounted { dev: u64 },
    Given,
}

/// Runs the worker until the mount goes away or a signal stops it.
pub fn run(opts: &Options) -> Result<(), StartupError> {
    // Before the sandbox drops CAP_SYS_RESOURCE.
    let (open_files, wanted_fds) = raise_fd_limit();
    let mountpoint = mount::absolute(&opts.mountpoint)
        .map_err(|e| StartupError::Mountpoint(opts.mountpoint.clone(), e))?;
    if opts.fuse_fd.is_none() {
        let euid = nix::unistd::geteuid().as_raw();
        if euid != 0 {
            return Err(StartupError::NotRoot(euid));
        }
        // Before opening the source: it may be the mountpoint, with a dead
        // mount on top that answers ENOTCONN.
        mount::clear_stale(&mountpoint)?;
        match fs::metadata(&mountpoint) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StartupError::Mountpoint(
                    mountpoint,
                    std::io::Error::from_raw_os_error(libc::ENOTDIR),
                ));
            }
            Err(e) => return Err(StartupError::Mountpoint(mountpoint, e)),
        }
    }
    let source = match opts.source_fd {
        Some(n) => given_source_fd(n, &opts.source)?,
        None => open_source(&opts.source)?,
    };
    let state = StateDir::open(&opts.state_dir)?;
    tracing::debug!(state_dir = %state.path().display(), "state directory locked");
    let given = opts.fuse_fd.map(given_fuse_fd).transpose()?;
    // Subscribing needs CAP_NET_ADMIN, which the sandbox drops.
    let proc_events = ProcEvents::subscribe();
    // Before the sandbox: fanotify_init is not among its system calls.
    let watch = opts
        .watch_source
        .then(|| SourceWatch::new(source.as_fd()))
        .transpose()
        .unwrap_or_else(|e| {
            tracing::warn!(
                source = %opts.source.display(),
                "changes made to the source behind the mount's back are not watched ({e}); \
                 they show within the cache timeout"
            );
            None
        })
        .map(Arc::new);
    let tuning = Tuning {
        max_write: opts.max_write,
        max_background: opts.max_background,
        cache_timeout: opts.cache_timeout.unwrap_or(if watch.is_some() {
            WATCHED_TIMEOUT
        } else {
            UNWATCHED_TIMEOUT
        }),
        // Paths as given: two spellings of one directory only cost the
        // cache of absent names.
        remember_absence: opts.source == opts.mountpoint || watch.is_some(),
    };
    match (&given, opts.sandbox) {
        (Some(_), true) => {
            let state_fd = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(state.path())
                .map_err(|e| StartupError::StateDir(state.path().to_owned(), e))?;
            let report = sandbox::enter(source.as_fd(), state_fd.as_fd())?;
            tracing::info!(
                landlock = report.landlock,
                capabilities = %report.capabilities.join(","),
                syscalls = report.syscalls,
                "sandboxed"
            );
        }
        (Some(_), false) => tracing::warn!("not sandboxed (--no-sandbox)"),
        (None, _) => tracing::debug!("not sandboxed: this worker mounts, so it must unmount"),
    }
    let core = FsCore::new(source.as_fd(), state.path(), proc_events)
        .map_err(|e| StartupError::StateContent(state.path().to_owned(), e))?
        .with_isolation(opts.isolation);
    let core = match &watch {
        Some(w) => core.with_watch(w.clone()),
        None => core,
    };
    let core = match opts.handoff {
        Some(h) => {
            let fd = owned_fd(h.fd)
                .map_err(|why| StartupError::Handoff(h.fd, std::io::Error::other(why)))?;
            let (journal, held) =
                Journal::open(fd, h.takeover).map_err(|e| StartupError::Handoff(h.fd, e))?;
            core.with_handoff(journal, held)
        }
        None => core,
    };
    let core = Arc::new(core);
    drop(source);
    // The caller's umask is applied per creating thread (hostfs::with_umask);
    // the worker's own must not mask on top of it.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());

    let (fd, ownership) = match given {
        Some(fd) => (fd, Ownership::Given),
        None => {
            let fd = mount::mount(&mountpoint, opts.allow_other)?;
            let dev = mount::device_of(&mountpoint).map_err(StartupError::Proc)?;
            (fd, Ownership::Mounted { dev })
        }
    };
    // From here on a failure must not leave the mount behind.
    let guard = UnmountGuard {
        mountpoint: mountpoint.clone(),
        dev: match ownership {
            Ownership::Mounted { dev } => Some(dev),
            Ownership::Given => None,
        },
    };

    let acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(opts.threads.max(1));
    // Requests in flight live on the descriptor that read them and end
    // (ECONNABORTED) when it closes: with a successor to come, every thread
    // reads the supervisor's descriptor, which outlives this process.
    config.clone_fd = opts.handoff.is_none();
    let handler: Arc<dyn control::Handler> = if opts.test_fault_hook {
        Arc::new(FaultHook(core.clone()))
    } else {
        core.clone()
    };
    let trim = Arc::new(Trimmer::new(open_files, opts.max_cached_nodes));
    let fuse = fd
        .try_clone()
        .map_err(|e| StartupError::Session(mountpoint.clone(), e))?;
    let passthrough = Passthrough::new(opts.passthrough, fuse, &core);
    let adapter = Adapter::new(core.clone(), tuning.clone(), trim.clone(), passthrough);
    let takeover = opts.handoff.is_some_and(|h| h.takeover);
    let session = if takeover {
        let session = Session::from_initialized_fd(adapter, fd, acl, config);
        resend_in_flight(session.as_fd());
        session
    } else {
        Session::from_fd(adapter, fd, acl, config)
            .map_err(|e| StartupError::Session(mountpoint.clone(), e))?
    };
    // Before any binding can arrive: it must find the root cache in place.
    share_root(
        &core,
        &session,
        &mountpoint,
        takeover.then_some(tuning.cache_timeout),
    )
    .map_err(|e| StartupError::Session(mountpoint.clone(), e))?;
    // A snapshot probes files with a read lease (`FsCore::maybe_mapped`):
    // an open for writing meanwhile signals SIGIO, which would end us.
    // SAFETY: SIG_IGN runs no code of ours.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGIO,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map_err(|e| StartupError::Session(mountpoint.clone(), e.into()))?;
    let _control = control::serve(state.path(), handler)
        .map_err(|e| StartupError::StateDir(state.path().to_owned(), e))?;
    let weak = Arc::downgrade(&core);
    let watched = watch.is_some();
    if let Some(w) = watch {
        let fuse = session
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| StartupError::Session(mountpoint.clone(), e))?;
        w.start(weak.clone(), trim.clone(), session.notifier(), fuse)
            .map_err(|e| StartupError::Session(mountpoint.clone(), e))?;
        // What the kernel cached under the predecessor was never marked
        // by this watch, and changes made while no worker watched were
        // seen by none: every name is looked up again (and its directory
        // marked), after the watch started so that none is missed.
        if takeover {
            crate::watch::new_epoch(session.as_fd());
        }
    }
    let which = weak.clone();
    trim.start(
        session.notifier(),
        move || weak.upgrade().map_or(Load::default(), |c| c.load()),
        move |nodes| {
            which
                .upgrade()
                .map_or_else(|| vec![false; nodes.len()], |c| c.holds_descriptors(nodes))
        },
    )
    .map_err(|e| StartupError::Session(mountpoint.clone(), e))?;
    tracing::info!(
        source = %opts.source.display(),
        mountpoint = %mountpoint.display(),
        threads = opts.threads,
        isolation = ?opts.isolation,
        open_files,
        cache_timeout_ms = tuning.cache_timeout.as_millis() as u64,
        watched,
        "serving"
    );
    if open_files < wanted_fds {
        tracing::warn!(
            "open-file limit {open_files} (wanted {wanted_fds}): cached file names are dropped \
             once {} nodes hold descriptors (directories), and more \
             directories and open files than the limit fail with EMFILE; raise LimitNOFILE= (or ulimit -Hn)",
            open_files / 2
        );
    }
    let session_over = spawn_signal_handler(mountpoint.clone(), guard.dev)
        .map_err(|e| StartupError::Session(mountpoint.clone(), e))?;
    let result = session.run();
    session_over.store(true, Ordering::SeqCst);
    drop(guard);
    match result {
        Ok(()) => {
            tracing::info!(mountpoint = %mountpoint.display(), "unmounted; exiting");
            Ok(())
        }
        // The connection went away (unmounted, or aborted) while a thread
        // was reading a request, as the FORGETs an unmount sends are: the
        // kernel ends that read with ECONNABORTED instead of ENODEV. The
        // session is over all the same.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::info!(
                mountpoint = %mountpoint.display(),
                "unmounted (or aborted) with a request in flight; exiting"
            );
            Ok(())
        }
        Err(e) => Err(StartupError::Session(mountpoint, e)),
    }
}

/// Lets the kernel cache the mount root while nothing is bound
/// ([`RootCache`]), if it can be made to forget it again (Linux 6.16).
/// `mountpoint` is where the mount is, to see what is mounted inside it;
/// `inherited` is the cache timeout of a predecessor whose connection this
/// worker took over (it may have cached the root for that long).
fn share_root(
    core: &FsCore,
    session: &Session<Adapter>,
    mountpoint: &Path,
    inherited: Option<Duration>,
) -> std::io::Result<()> {
    if !RootCache::supported() {
        tracing::info!(
            "names in the mount root are never cached: the kernel cannot be made to forget \
             them when a process is bound (FUSE_NOTIFY_INC_EPOCH needs Linux 6.16)"
        );
        return Ok(());
    }
    let dev = match mount::device_of(mountpoint) {
        Ok(dev) => dev,
        Err(e) => {
            tracing::info!(
                mountpoint = %mountpoint.display(),
                "names in the mount root are never cached: the mount is not found in \
                 /proc/self/mountinfo ({e}), so what is mounted inside it cannot be seen"
            );
            return Ok(());
        }
    };
    let fuse = session.as_fd().try_clone_to_owned()?;
    core.share_root(RootCache::new(session.notifier(), fuse, dev, inherited));
    Ok(())
}

/// FUSE_NOTIFY_RESEND (kernel 6.9+): requests the dead predecessor read
/// and never answered go back to the queue, for this worker to serve.
/// Without it their callers would wait forever.
fn resend_in_flight(fuse: std::os::fd::BorrowedFd<'_>) {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    match mount::notify_bare(fuse, FUSE_NOTIFY_RESEND) {
        Ok(_) => tracing::info!("took over the FUSE connection; requests in flight sent again"),
        Err(e) => tracing::error!(
            "took over the FUSE connection, but the kernel refused FUSE_NOTIFY_RESEND ({e}; \
             it needs Linux 6.9): requests the previous worker was serving never complete"
        ),
    }
}

fn open_source(path: &Path) -> Result<File, StartupError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| StartupError::Source(path.to_owned(), e))?;
    source_dir(file, path)
}

/// Takes ownership of descriptor `n`, checking that it is a directory.
fn given_source_fd(n: i32, path: &Path) -> Result<File, StartupError> {
    let fd = owned_fd(n).map_err(|why| StartupError::SourceFd(n, why))?;
    source_dir(File::from(fd), path)
}

/// `file` if it is a directory; `path` names the source in errors.
fn source_dir(file: File, path: &Path) -> Result<File, StartupError> {
    let meta = file
        .metadata()
        .map_err(|e| StartupError::Source(path.to_owned(), e))?;
    if !meta.is_dir() {
        return Err(StartupError::SourceNotDir(path.to_owned()));
    }
    Ok(file)
}

/// Takes ownership of descriptor `n` after checking that it is open.
fn owned_fd(n: i32) -> Result<OwnedFd, String> {
    if n < 0 {
        return Err("negative descriptor".into());
    }
    // SAFETY: only borrowed for fcntl; validity is what we are checking.
    nix::fcntl::fcntl(
        unsafe { std::os::fd::BorrowedFd::borrow_raw(n) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|e| e.desc().to_owned())?;
    // SAFETY: the descriptor is open (F_GETFD succeeded) and was handed to
    // this process to own; nothing else in the process uses it.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Takes ownership of descriptor `n`, checking that it is /dev/fuse.
fn given_fuse_fd(n: i32) -> Result<OwnedFd, StartupError> {
    let bad = |why: String| StartupError::FuseFd(n, why);
    let fd = owned_fd(n).map_err(bad)?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| bad(e.desc().to_owned()))?;
    let is_fuse = (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
        && nix::sys::stat::major(st.st_rdev) == 10
        && nix::sys::stat::minor(st.st_rdev) == 229;
    if !is_fuse {
        return Err(bad(
            "it is not the /dev/fuse character device (10:229)".into()
        ));
    }
    Ok(fd)
}

/// Unmounts on drop, but only the mount this worker made (matched by device
/// number), never whatever else may sit at the same path afterwards.
struct UnmountGuard {
    mountpoint: PathBuf,
    dev: Option<u64>,
}

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        if let Some(dev) = self.dev {
            if mount::device_of(&self.mountpoint).ok() == Some(dev) {
                if let Err(e) = mount::unmount(&self.mountpoint) {
                    tracing::error!("cannot unmount {}: {e}", self.mountpoint.display());
                }
            }
        }
    }
}

/// SIGTERM/SIGINT: the first unmounts (the session then ends once open files
/// are closed); a second one aborts the connection so the worker exits now.
/// A worker serving a given descriptor just exits: the mount is not its own.
/// Returns the flag to set once the session is over: from then on a signal
/// just exits, as the connection's number may already be another mount's.
fn spawn_signal_handler(mountpoint: PathBuf, dev: Option<u64>) -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let session_over = Arc::new(AtomicBool::new(false));
    let over = session_over.clone();
    let mut stopping = false;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let Some(dev) = dev else {
                    tracing::info!(signal = sig, "stopping; the mount stays with its owner");
                    std::process::exit(0);
                };
                if over.load(Ordering::SeqCst) {
                    tracing::info!(signal = sig, "the session is over; exiting");
                    std::process::exit(0);
                }
                if std::mem::replace(&mut stopping, true) {
                    tracing::warn!(signal = sig, "second signal: aborting the FUSE connection");
                    abort_or_exit(dev);
                } else if mount::device_of(&mountpoint).ok() == Some(dev) {
                    tracing::info!(signal = sig, mountpoint = %mountpoint.display(), "unmounting");
                    if let Err(e) = mount::unmount(&mountpoint) {
                        tracing::error!(
                            "cannot unmount {}: {e}; aborting the connection",
                            mountpoint.display()
                        );
                        abort_or_exit(dev);
                    }
                } else {
                    // Detached (`umount -l`, `fusermount3 -u -z`) while still in use: the
                    // session ends when the last open file or working directory goes.
                    tracing::info!(
                        signal = sig,
                        mountpoint = %mountpoint.display(),
                        "already unmounted; serving what is still open through the detached \
                         mount until it is closed (a second signal aborts it)"
                    );
                }
            }
        })?;
    Ok(session_over)
}

/// Aborts the FUSE connection, or where that is refused (no CAP_SYS_ADMIN)
/// exits: a worker that mounted itself holds every /dev/fuse descriptor of
/// its connection, which the kernel aborts once the last one is closed,
/// that is once every thread is gone (one stuck in the kernel, such as an
/// invalidation waiting on a directory the kernel locked for a request
/// that will never be answered, keeps it until it is aborted elsewhere).
fn abort_or_exit(dev: u64) {
    if let Err(e) = mount::abort_connection(dev) {
        tracing::warn!("cannot abort the FUSE connection ({e}); exiting, which ends it");
        std::process::exit(0);
    }
}

/// The control handler with the test hooks: `sandbox-probe` tries what the
/// sandbox must refuse, `stall` plays a busy or a hung worker; everything
/// else goes to the core.
struct FaultHook(Arc<FsCore>);

impl control::Handler for FaultHook {
    fn handle(&self, req: control::Request) -> Result<serde_json::Value, control::ControlError> {
        match req {
            control::Request::SandboxProbe {
                outside,
                mount_on,
                tracee,
            } => Ok(serde_json::json!(sandbox::probe(
                Path::new(&outside),
                Path::new(&mount_on),
                tracee
            ))),
            control::Request::Stall { seconds, spin } => {
                let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
                self.0.stall(|| {
                    while std::time::Instant::now() < until {
                        if !spin {
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                });
                Ok(serde_json::json!({}))
            }
            other => self.0.handle(other),
        }
    }
}
