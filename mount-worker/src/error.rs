//! Start-up failures a user can cause, each with one line that names the
//! thing at fault and says what to do.

use std::io;
use std::path::PathBuf;

/// Why the worker could not start serving. `Display` is the whole message.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Mounting needs CAP_SYS_ADMIN.
    #[error(
        "agentfs-mount-worker must run as root to mount (it is euid {0}); run it with sudo, or let the agentfs service start it"
    )]
    NotRoot(u32),
    /// --source does not exist or cannot be opened.
    #[error("source directory {0} cannot be opened: {1}; create it or fix --source")]
    Source(PathBuf, io::Error),
    /// --source is not a directory.
    #[error("source {0} is not a directory; --source must name a directory")]
    SourceNotDir(PathBuf),
    /// --mountpoint does not exist or is not a directory.
    #[error(
        "mountpoint {0} is not a usable directory: {1}; create it (mkdir -p) or fix --mountpoint"
    )]
    Mountpoint(PathBuf, io::Error),
    /// A live FUSE file system already sits on the mountpoint.
    #[error(
        "mountpoint {0} is busy: a live {1} file system is mounted there; stop its server or run `fusermount3 -u {0}` first"
    )]
    MountpointBusy(PathBuf, String),
    /// A dead mount could not be detached.
    #[error("cannot detach the stale mount at {0}: {1}; run `fusermount3 -u -z {0}` as root")]
    StaleMount(PathBuf, io::Error),
    /// /dev/fuse cannot be opened.
    #[error("cannot open /dev/fuse: {0}; install fuse3 and load the module (modprobe fuse)")]
    DevFuse(io::Error),
    /// mount(2) failed.
    #[error("cannot mount on {0}: {1}")]
    Mount(PathBuf, io::Error),
    /// The state directory cannot be created or locked.
    #[error(
        "state directory {0} is unusable: {1}; fix its permissions or choose another --state-dir"
    )]
    StateDir(PathBuf, io::Error),
    /// The state directory's content cannot be served.
    #[error(
        "state directory {0} cannot be served: {1}; `agentfs-mount-worker --check --state-dir {0}` lists what is wrong"
    )]
    StateContent(PathBuf, io::Error),
    /// Another worker serves the same state directory.
    #[error(
        "state directory {0} is in use by another worker ({1}); stop it first, or choose another --state-dir"
    )]
    StateDirBusy(PathBuf, String),
    /// --fuse-fd does not name an open /dev/fuse descriptor.
    #[error("--fuse-fd {0} is not an open /dev/fuse descriptor: {1}")]
    FuseFd(i32, String),
    /// `--source-fd` is unusable.
    #[error("--source-fd {0}: {1}; pass an open descriptor of the source directory")]
    SourceFd(i32, String),
    /// `--handoff-fd` is unusable.
    #[error("--handoff-fd {0}: {1}; the supervisor passes the mount's journal there")]
    Handoff(i32, io::Error),
    /// /proc is unreadable.
    #[error("cannot read /proc/self/mountinfo: {0}; the worker needs /proc mounted")]
    Proc(io::Error),
    /// The sandbox could not be entered (the worker refuses to serve
    /// unconfined rather than silently running with every privilege).
    #[error(
        "cannot confine the worker: {0}; the kernel needs seccomp, and /proc and /dev/fuse must exist (--no-sandbox runs it unconfined, for debugging only)"
    )]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// Anything else while starting the session.
    #[error("cannot start the FUSE session on {0}: {1}")]
    Session(PathBuf, io::Error),
}
