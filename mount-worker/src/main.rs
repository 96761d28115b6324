//! `agentfs-mount-worker`: serves one AgentFS mount in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;

use agentfs_mount_worker::fuse_adapter::Tuning;
use agentfs_mount_worker::worker::{self, Options};
use clap::Parser;

/// Serve a host directory through FUSE as an AgentFS mount.
///
/// Stays in the foreground; SIGTERM or SIGINT unmounts and exits, as does
/// `fusermount3 -u MOUNTPOINT`. Logs go to stderr (RUST_LOG sets the level).
#[derive(Parser, Debug)]
#[command(name = "agentfs-mount-worker", version)]
struct Cli {
    /// The host directory to serve (its files are read and written in place).
    #[arg(long, value_name = "DIR")]
    source: PathBuf,
    /// Where to mount; may be the source itself, which is then served through
    /// a descriptor opened before mounting.
    #[arg(long, value_name = "DIR")]
    mountpoint: PathBuf,
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
    /// FUSE session threads.
    #[arg(long, default_value_t = 4, value_name = "N")]
    threads: usize,
    /// Largest write request, in bytes.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    max_write: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = Options {
        source: cli.source,
        mountpoint: cli.mountpoint,
        state_dir: cli.state_dir,
        allow_other: cli.allow_other,
        fuse_fd: cli.fuse_fd,
        threads: cli.threads,
        tuning: Tuning {
            max_write: cli.max_write,
        },
    };
    match worker::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentfs-mount-worker: error: {e}");
            ExitCode::FAILURE
        }
    }
}
