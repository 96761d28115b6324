//! `agentfs-workerctl`: talks to one worker's control socket. A tool for
//! development, tests and the demo until `agentfsctl` (over D-Bus) exists.

use std::path::PathBuf;
use std::process::ExitCode;

use agentfs_mount_worker::control::{self, Request};
use clap::{Parser, Subcommand};

/// Control a running agentfs-mount-worker (root only).
#[derive(Parser)]
#[command(name = "agentfs-workerctl", version)]
struct Cli {
    /// The worker's state directory (its control socket is inside).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

// The subcommands are named as in the contract's CLI (snapshot-create, ...).
#[allow(clippy::enum_variant_names)]
#[derive(Subcommand)]
enum Command {
    /// Take a snapshot of main or of a branch.
    SnapshotCreate {
        /// Its name (default: snap-<id>).
        #[arg(long)]
        name: Option<String>,
        /// The branch to snapshot (default: main).
        #[arg(long)]
        branch: Option<String>,
    },
    /// List the snapshots, oldest first.
    SnapshotList,
    /// Delete a snapshot and free what only it needed.
    SnapshotDelete {
        /// Its name or id.
        snapshot: String,
    },
    /// Create a branch from a snapshot.
    BranchCreate {
        /// The snapshot (name or id).
        #[arg(long)]
        snapshot: String,
        /// Its name (default: branch-<id>).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the branches.
    BranchList,
    /// Delete a branch and free its space.
    BranchDelete {
        /// Its name or id.
        branch: String,
        /// Delete even with bound processes or open files.
        #[arg(long)]
        force: bool,
    },
    /// Bind a process (and children it forks later) or a cgroup to a branch.
    BranchBind {
        /// The branch (name or id).
        #[arg(long)]
        branch: String,
        /// The process.
        #[arg(long, conflicts_with = "cgroup", required_unless_present = "cgroup")]
        pid: Option<i32>,
        /// The cgroup v2 path (`/agents/a1`).
        #[arg(long)]
        cgroup: Option<String>,
    },
    /// Remove a binding.
    BranchUnbind {
        /// The process.
        #[arg(long, conflicts_with = "cgroup", required_unless_present = "cgroup")]
        pid: Option<i32>,
        /// The cgroup.
        #[arg(long)]
        cgroup: Option<String>,
    },
    /// List the bindings.
    BindingList,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = match cli.command {
        Command::SnapshotCreate { name, branch } => Request::SnapshotCreate { branch, name },
        Command::SnapshotList => Request::SnapshotList {},
        Command::SnapshotDelete { snapshot } => Request::SnapshotDelete { snapshot },
        Command::BranchCreate { snapshot, name } => Request::BranchCreate { snapshot, name },
        Command::BranchList => Request::BranchList {},
        Command::BranchDelete { branch, force } => Request::BranchDelete { branch, force },
        Command::BranchBind {
            branch,
            pid: Some(pid),
            ..
        } => Request::BindPid { branch, pid },
        Command::BranchBind { branch, cgroup, .. } => Request::BindCgroup {
            branch,
            cgroup: cgroup.expect("clap requires --pid or --cgroup"),
        },
        Command::BranchUnbind { pid: Some(pid), .. } => Request::UnbindPid { pid },
        Command::BranchUnbind { cgroup, .. } => Request::UnbindCgroup {
            cgroup: cgroup.expect("clap requires --pid or --cgroup"),
        },
        Command::BindingList => Request::BindingList {},
    };
    match control::call(&cli.state_dir, &req) {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).expect("JSON prints"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let kind = serde_json::to_value(e.kind).expect("kinds serialize");
            eprintln!(
                "agentfs-workerctl: {}: {}",
                kind.as_str().unwrap_or("error"),
                e.message
            );
            ExitCode::FAILURE
        }
    }
}
