//! `agentfs-mount-worker`: serves one AgentFS mount in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use agentfs_mount_worker::core::Isolation;
use agentfs_mount_worker::passthrough::Policy;
use agentfs_mount_worker::trim::{MAX_NODES, MAX_NODES_RANGE};
use agentfs_mount_worker::worker::{self, Handoff, Options};
use clap::Parser;

/// Serve a host directory through FUSE as an AgentFS mount.
///
/// Stays in the foreground; SIGTERM or SIGINT unmounts and exits, as does
/// `fusermount3 -u MOUNTPOINT`. Logs go to stderr (RUST_LOG sets the level).
/// With --check, verifies a state directory instead and changes nothing.
#[derive(Parser, Debug)]
#[command(name = "agentfs-mount-worker", version)]
struct Cli {
    /// Verify the state directory (read-only) and exit: 0 if it is
    /// consistent, 1 if it is damaged. Garbage left by a crash is listed but
    /// is not damage.
    #[arg(long)]
    check: bool,
    /// The host directory to serve (its files are read and written in place).
    #[arg(long, value_name = "DIR", required_unless_present = "check")]
    source: Option<PathBuf>,
    /// Where to mount; may be the source itself, which is then served through
    /// a descriptor opened before mounting.
    #[arg(long, value_name = "DIR", required_unless_present = "check")]
    mountpoint: Option<PathBuf>,
    /// The mount's state directory (created 0700 if missing; one worker at a time).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Let users other than root use the mount (permissions still apply).
    #[arg(long)]
    allow_other: bool,
    /// Serve this already-mounted /dev/fuse descriptor instead of mounting
    /// (used by the supervisor, which owns the mount).
    #[arg(long, value_name = "N")]
    fuse_fd: Option<i32>,
    /// Serve the source through this already-open directory descriptor
    /// (O_PATH is enough) instead of opening --source, which then only names
    /// it in logs. The supervisor opens the source before mounting over it.
    #[arg(long, value_name = "N")]
    source_fd: Option<i32>,
    /// Record what the kernel is given (node ids, open files) in this
    /// shared-memory journal, so that a successor can take over the
    /// connection after a crash (used by the supervisor; needs --fuse-fd).
    #[arg(long, value_name = "N", requires = "fuse_fd")]
    handoff_fd: Option<i32>,
    /// Take over the live connection of --fuse-fd from a worker that died:
    /// no FUSE_INIT, requests in flight are sent again, and the ids the
    /// kernel holds are found through --handoff-fd.
    #[arg(long, requires = "handoff_fd")]
    takeover: bool,
    /// FUSE session threads.
    #[arg(long, default_value_t = 4, value_name = "N")]
    threads: usize,
    /// Largest write request, in bytes.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    max_write: u32,
    /// Most background requests (readahead, asynchronous reads and
    /// writes) the kernel keeps in flight to the worker.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    max_background: u16,
    /// How long the kernel may keep names and attributes below the mount
    /// root: changes made to the source behind the mount's back that the
    /// source watch does not see show within this time. Default: 600 000
    /// with the watch, 1 000 without.
    #[arg(long, value_name = "MS")]
    cache_timeout_ms: Option<u64>,
    /// Do not watch the source for changes made behind the mount's back
    /// (fanotify); they then show within the cache timeout.
    #[arg(long)]
    no_source_watch: bool,
    /// Nodes (files and directories) the kernel may keep before the worker
    /// has it drop file names: each costs about 600 bytes of the worker's
    /// memory, and a record in the handoff journal.
    #[arg(long, default_value_t = MAX_NODES as u32, value_name = "N",
          value_parser = clap::value_parser!(u32).range(
              i64::from(*MAX_NODES_RANGE.start())..=i64::from(*MAX_NODES_RANGE.end())))]
    max_cached_nodes: u32,
    /// Which opens the kernel serves from the host file itself (FUSE
    /// passthrough, kernel 6.9+): `auto` read-only opens of main and of
    /// snapshots' pre-images; `on` main's writers too; `off` none.
    #[arg(long, value_enum, default_value_t = Policy::Auto, value_name = "POLICY")]
    passthrough: Policy,
    /// Let a process bound to a branch act only on that branch's files:
    /// `.agentfs/`, main and other branches answer EACCES to it, even
    /// through descriptors it got elsewhere.
    #[arg(long)]
    strict_isolation: bool,
    /// Do not confine the worker (capabilities, no_new_privs, Landlock,
    /// seccomp) when it serves --fuse-fd; for debugging only.
    #[arg(long)]
    no_sandbox: bool,
    /// Answer the control channel's sandbox-probe request (tests only).
    #[arg(long, hide = true)]
    test_fault_hook: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    agentfs_mount_worker::logging::init("agentfs-mount-worker");
    if cli.check {
        return check(&cli.state_dir);
    }
    let opts = Options {
        source: cli.source.expect("required by clap"),
        mountpoint: cli.mountpoint.expect("required by clap"),
        state_dir: cli.state_dir,
        allow_other: cli.allow_other,
        fuse_fd: cli.fuse_fd,
        source_fd: cli.source_fd,
        handoff: cli.handoff_fd.map(|fd| Handoff {
            fd,
            takeover: cli.takeover,
        }),
        threads: cli.threads,
        max_write: cli.max_write,
        max_background: cli.max_background,
        cache_timeout: cli.cache_timeout_ms.map(std::time::Duration::from_millis),
        watch_source: !cli.no_source_watch,
        max_cached_nodes: cli.max_cached_nodes as usize,
        passthrough: cli.passthrough,
        isolation: if cli.strict_isolation {
            Isolation::Strict
        } else {
            Isolation::Routed
        },
        sandbox: !cli.no_sandbox,
        test_fault_hook: cli.test_fault_hook,
    };
    match worker::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentfs-mount-worker: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(state_dir: &std::path::Path) -> ExitCode {
    match agentfs_mount_worker::check::check(state_dir) {
        Ok(r) => {
            for g in &r.garbage {
                println!("garbage: {g}");
            }
            for p in &r.problems {
                println!("problem: {p}");
            }
            println!(
                "{}: {} snapshots, {} branches, {} layers, {} pre-images, {} problems, {} garbage",
                state_dir.display(),
                r.snapshots,
                r.branches,
                r.layers,
                r.preimages,
                r.problems.len(),
                r.garbage.len()
            );
            if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!(
                "agentfs-mount-worker: error: cannot check {}: {e}",
                state_dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
