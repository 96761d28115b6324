//! The worker's sandbox (contract section 6, specs/security.md): once the
//! worker holds every descriptor it needs from outside (the source, the
//! state directory, /dev/fuse, the fork-event socket), it confines itself
//! so that a bug in it, or a hostile request it mishandles, cannot reach
//! the rest of the machine:
//!
//! 1. `no_new_privs`: nothing it could execute gains privileges;
//! 2. Landlock: files only beneath the source and the state directory,
//!    `/proc` read-only (bindings read `/proc/PID/{stat,status,cgroup}`) and
//!    `/dev/fuse` (fuser opens one per session thread); no TCP; signals
//!    only to itself;
//! 3. capabilities: only those a file server acting for every user needs
//!    ([`KEPT`]); the bounding, inheritable and ambient sets are emptied;
//! 4. seccomp: an allow-list of system calls ([`allowed`]); anything else
//!    fails with EPERM (a refused call is an error reply, not a dead mount).
//!
//! All four are per-thread or inherited by threads created later, so the
//! sandbox is entered while the worker has one thread (checked), and the
//! seccomp filter is synchronised to all threads anyway.
//!
//! [`probe`] is the test hook that tries what the sandbox must refuse.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;

use caps::{CapSet, Capability, CapsHashSet};
use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Serialize;

/// The Landlock ABI the rules are written for (Linux 6.15): newer kernels
/// enforce exactly these rights, older ones what they know (best effort,
/// reported in the log).
const LANDLOCK_ABI: ABI = ABI::V7;

/// The capabilities the worker keeps, and why (specs/security.md):
/// it creates, changes and copies files of every user in the source and
/// the state directory, with their owners, modes and extended attributes.
pub const KEPT: [Capability; 9] = [
    // Files of every user, whatever their modes.
    Capability::CAP_DAC_OVERRIDE,
    // ... and open_by_handle_at(2), which hard links from below need.
    Capability::CAP_DAC_READ_SEARCH,
    // chmod, utimens, xattrs on files the worker does not own.
    Capability::CAP_FOWNER,
    // New files belong to their caller; copies keep their owners.
    Capability::CAP_CHOWN,
    // Copies keep set-user-id and set-group-id bits.
    Capability::CAP_FSETID,
    // Device nodes users create, and copies of them into branches.
    Capability::CAP_MKNOD,
    // Copies keep security.capability.
    Capability::CAP_SETFCAP,
    // Read leases on files of every user: a snapshot asks so whether a
    // shared map still writes a file (`FsCore::maybe_mapped`).
    Capability::CAP_LEASE,
    // trusted.* xattrs: the state directory's per-file records, and users'
    // own trusted.* attributes. Mounting, namespaces, BPF, ... are refused
    // by seccomp and Landlock.
    Capability::CAP_SYS_ADMIN,
];

/// Why the sandbox could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Threads that exist already would keep the privileges.
    #[error("the worker has {0} threads; the sandbox must be entered while it has one")]
    Threads(usize),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    /// Landlock refused the rules.
    #[error("cannot restrict file access with Landlock: {0}")]
    Landlock(String),
    /// Dropping capabilities failed.
    #[error("cannot drop capabilities: {0}")]
    Caps(String),
    /// The seccomp filter could not be built or installed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

/// What is in force once [`enter`] returns.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `full`, `partial` (an older kernel knows only some of the rights),
    /// or `none` (no Landlock in this kernel).
    pub landlock: &'static str,
    /// The capabilities left.
    pub capabilities: Vec<String>,
    /// Number of system calls allowed.
    pub syscalls: usize,
}

/// Confines the calling process; `source` and `state` are the directories
/// it may use. Must be called while the process has a single thread.
pub fn enter(source: BorrowedFd<'_>, state: BorrowedFd<'_>) -> Result<Report, SandboxError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(SandboxError::Threads(threads));
    }
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::NoNewPrivs(io::Error::last_os_error()));
    }
    let landlock = restrict_files(source, state)?;
    let capabilities = drop_capabilities()?;
    let syscalls = install_seccomp()?;
    Ok(Report {
        landlock,
        capabilities: {
            let mut names: Vec<String> = capabilities.iter().map(|c| c.to_string()).collect();
            names.sort();
            names
        },
        syscalls,
    })
}

fn thread_count() -> usize {
    crate::hostfs::proc_status("self", "Threads")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn restrict_files(
    source: BorrowedFd<'_>,
    state: BorrowedFd<'_>,
) -> Result<&'static str, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Landlock(e.to_string());
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let proc_fd = PathFd::new("/proc").map_err(|e| err(&e))?;
    let fuse_fd = PathFd::new("/dev/fuse").map_err(|e| err(&e))?;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(|e| err(&e))?
        // No TCP bind or connect at all (no rule grants any port).
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))
        .map_err(|e| err(&e))?
        // Signals only within the sandbox; no abstract UNIX sockets
        // outside it.
        .scope(Scope::from_all(LANDLOCK_ABI))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?
        .add_rule(PathBeneath::new(source, all))
        .map_err(|e| err(&e))?
        .add_rule(PathBeneath::new(state, all))
        .map_err(|e| err(&e))?
        .add_rule(PathBeneath::new(proc_fd, AccessFs::from_read(LANDLOCK_ABI)))
        .map_err(|e| err(&e))?
        .add_rule(PathBeneath::new(
            fuse_fd,
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        ))
        .map_err(|e| err(&e))?
        .restrict_self()
        .map_err(|e| err(&e))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => "partial",
        RulesetStatus::NotEnforced => "none",
    })
}

fn drop_capabilities() -> Result<CapsHashSet, SandboxError> {
    let err = |e: caps::errors::CapsError| SandboxError::Caps(e.to_string());
    let permitted = caps::read(None, CapSet::Permitted).map_err(err)?;
    let keep: CapsHashSet = KEPT.into_iter().filter(|c| permitted.contains(c)).collect();
    // Bounding first: dropping from it needs CAP_SETPCAP, which goes next.
    // (agentfs.service grants it for this. Without it the bounding set
    // stays as the service's: it only matters at execve(2), which
    // no_new_privs and the seccomp filter rule out anyway.)
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(err)? {
        for cap in caps::read(None, CapSet::Bounding).map_err(err)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
            }
        }
    } else {
        tracing::info!("no CAP_SETPCAP: the capability bounding set stays as inherited");
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    caps::set(None, CapSet::Effective, &keep).map_err(err)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err)?;
    Ok(keep)
}

/// A rule that matches when argument `arg` (32 bits) equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Vec<SeccompRule> {
    values
        .iter()
        .map(|&v| {
            let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                .expect("a valid argument index");
            SeccompRule::new(vec![cond]).expect("one condition")
        })
        .collect()
}

/// ioctl(2) requests the worker makes: FICLONE (copy-up without copying
/// data), /dev/fuse's CLONE and passthrough BACKING_OPEN/CLOSE, and the
/// terminal/non-blocking queries of the standard library.
const IOCTLS: [u64; 6] = [
    0x4004_9409, // FICLONE
    0x8004_e500, // FUSE_DEV_IOC_CLONE
    0x4010_e501, // FUSE_DEV_IOC_BACKING_OPEN
    0x4004_e502, // FUSE_DEV_IOC_BACKING_CLOSE
    libc::TCGETS,
    libc::FIONBIO,
];

/// The system calls the worker may make, with argument conditions where
/// a call is only partly needed. Everything a file server does on files
/// and descriptors it already holds; nothing that mounts, traces, loads,
/// executes, forks, or talks IP.
pub fn allowed() -> BTreeMap<i64, Vec<SeccompRule>> {
    let plain: &[libc::c_long] = &[
        // Data.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_syncfs,
        libc::SYS_sync_file_range,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fadvise64,
        libc::SYS_readahead,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_splice,
        libc::SYS_tee,
        libc::SYS_vmsplice,
        // Descriptors.
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        // The source watch marks main's directories as the kernel learns
        // them (its group is made before the sandbox).
        libc::SYS_fanotify_mark,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_fcntl,
        libc::SYS_flock,
        libc::SYS_pipe2,
        libc::SYS_memfd_create,
        libc::SYS_eventfd2,
        // Metadata and names.
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_utimensat,
        libc::SYS_getxattr,
        libc::SYS_lgetxattr,
        libc::SYS_fgetxattr,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_listxattr,
        libc::SYS_llistxattr,
        libc::SYS_flistxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
        libc::SYS_umask,
        libc::SYS_getcwd,
        // Memory.
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        // Threads, waiting, time.
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_set_tid_address,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Signals (to itself; Landlock scopes them too).
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_tgkill,
        // Identity and limits.
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_capget,
        libc::SYS_getrandom,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_getrusage,
        libc::SYS_prlimit64,
        libc::SYS_prctl,
        // UNIX sockets (the control socket, the journal) and the netlink
        // socket of fork events; socket(2) itself is limited below.
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_socketpair,
        // Only used by glibc's fallback when clone3 is refused (below).
        libc::SYS_clone3,
    ];
    #[cfg(target_arch = "x86_64")]
    let legacy: &[libc::c_long] = &[
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_link,
        libc::SYS_symlink,
        libc::SYS_chmod,
        libc::SYS_dup2,
        libc::SYS_pipe,
        libc::SYS_poll,
        libc::SYS_select,
        libc::SYS_epoll_wait,
        libc::SYS_getrlimit,
        libc::SYS_arch_prctl,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let legacy: &[libc::c_long] = &[];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = plain
        .iter()
        .chain(legacy)
        .map(|&n| (n, Vec::new()))
        .collect();
    // Threads only: a clone without CLONE_THREAD (fork) is refused.
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .expect("a valid argument index");
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![thread]).expect("one condition")],
    );
    // Per-thread file-system attributes (hostfs::with_umask), nothing else.
    rules.insert(libc::SYS_unshare, arg_in(0, &[libc::CLONE_FS as u64]));
    rules.insert(
        libc::SYS_socket,
        arg_in(0, &[libc::AF_UNIX as u64, libc::AF_NETLINK as u64]),
    );
    rules.insert(libc::SYS_ioctl, arg_in(1, &IOCTLS));
    rules
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(&e))?;
    let filter = SeccompFilter::new(rules, mismatch, matched, arch).map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

fn install_seccomp() -> Result<usize, SandboxError> {
    let rules = allowed();
    let count = rules.len();
    let allow = compile(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
    )?;
    // clone3 passes its flags in memory, which seccomp cannot read: make it
    // look absent so that glibc creates threads with clone, whose flags
    // the allow-list checks. (Of stacked filters the strictest answer wins.)
    let no_clone3 = compile(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    // The allow-list goes last: it refuses seccomp(2) itself.
    for prog in [&no_clone3, &allow] {
        seccompiler::apply_filter_all_threads(prog)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(count)
}

/// Outcome of one forbidden attempt of [`probe`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attempt {
    /// What was tried.
    pub what: &'static str,
    /// `None` if it succeeded, else the errno it failed with.
    pub errno: Option<i32>,
}

/// The test hook (`--test-fault-hook`): tries what the sandbox must
/// refuse, undoing whatever succeeds. `outside` is a file outside the
/// source and state directory, `mount_on` an empty directory, `tracee` a
/// process to attach to. Without the sandbox (as root) each of these
/// succeeds; inside, each must fail.
pub fn probe(outside: &Path, mount_on: &Path, tracee: i32) -> Vec<Attempt> {
    fn errno_of(ok: bool) -> Option<i32> {
        (!ok).then(|| io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
    fn cstr(p: &Path) -> CString {
        CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default()
    }
    let mut out = Vec::new();

    let path = cstr(outside);
    // SAFETY: valid C string; the descriptor is closed right away.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    out.push(Attempt {
        what: "open a file outside the source and state directory",
        errno: errno_of(fd >= 0),
    });
    if fd >= 0 {
        // SAFETY: ours.
        unsafe { libc::close(fd) };
    }

    let target = cstr(mount_on);
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            c"agentfs-probe".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    out.push(Attempt {
        what: "mount a file system",
        errno: errno_of(r == 0),
    });
    if r == 0 {
        // SAFETY: valid C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }

    // SAFETY: attach/detach of a process given by the test.
    let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, tracee, 0, 0) };
    out.push(Attempt {
        what: "ptrace another process",
        errno: errno_of(r == 0),
    });
    if r == 0 {
        let mut status = 0;
        // SAFETY: the tracee stops after the attach; then let it go.
        unsafe {
            libc::waitpid(tracee, &mut status, libc::__WALL);
            libc::ptrace(libc::PTRACE_DETACH, tracee, 0, 0);
        }
    }

    // SAFETY: plain socket(2); closed right away.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    out.push(Attempt {
        what: "open a network socket",
        errno: errno_of(s >= 0),
    });
    if s >= 0 {
        // SAFETY: ours.
        unsafe { libc::close(s) };
    }

    // A program that does not exist: outside the sandbox the kernel looks
    // for it (ENOENT), inside it refuses the call itself. Nothing runs.
    let argv = [c"agentfs-probe".as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid, NULL-terminated arrays; on success (impossible, the
    // file does not exist) the process would be replaced.
    unsafe {
        libc::execve(
            c"/nonexistent/agentfs-probe".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    let e = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    out.push(Attempt {
        what: "execute a program",
        errno: (e != libc::ENOENT).then_some(e),
    });

    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: async-signal-safe.
        unsafe { libc::_exit(0) };
    }
    out.push(Attempt {
        what: "fork a process",
        errno: errno_of(pid > 0),
    });
    if pid > 0 {
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
    out
}
