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
    /// Take a snapshot of main.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = match cli.command {
        Command::SnapshotCreate { name, branch } => Request::SnapshotCreate { branch, name },
        Command::SnapshotList => Request::SnapshotList {},
        Command::SnapshotDelete { snapshot } => Request::SnapshotDelete { snapshot },
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
