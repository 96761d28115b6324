//! The command line, as clap definitions. Shell completions and man pages
//! are generated from these too (`agentfsctl generate`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// `agentfsctl`: the command-line client of the AgentFS supervisor.
#[derive(Debug, Parser)]
#[command(
    name = "agentfsctl",
    version,
    about = "Control AgentFS mounts: snapshots, branches and the processes bound to them",
    long_about = "Control AgentFS mounts: snapshots, branches and the processes bound to them.\n\n\
        agentfsctl talks D-Bus to the AgentFS supervisor (org.agentfs on the system bus, \
        or on the session bus with --user). A snapshot or branch may be named by its name \
        or its id everywhere.",
    after_help = "Examples:\n  \
        agentfsctl --mount agent1 snapshot-create --name clean\n  \
        agentfsctl --mount agent1 branch-create --snapshot clean --name try-a\n  \
        agentfsctl --mount agent1 exec --branch try-a -- cargo test"
)]
pub struct Cli {
    /// The mount to act on: its name, or a path (containing `/`) that is its
    /// mount point or source, or lies below one. Optional when exactly one
    /// mount runs or exactly one is configured.
    #[arg(long, global = true, value_name = "NAME|PATH")]
    pub mount: Option<String>,

    /// Talk to the per-user supervisor on the session bus instead of the
    /// system bus.
    #[arg(long, global = true)]
    pub user: bool,

    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a snapshot of main or of a branch.
    SnapshotCreate {
        /// The branch to snapshot (name or id); main if not given.
        #[arg(long, value_name = "BRANCH")]
        branch: Option<String>,
        /// The snapshot's name; `snap-<id>` if not given.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List the snapshots, oldest first.
    SnapshotList,
    /// Delete a snapshot.
    SnapshotDelete(SnapshotRef),
    /// Create a branch from a snapshot.
    BranchCreate {
        /// The snapshot to branch from (name or id).
        #[arg(long, value_name = "SNAPSHOT")]
        snapshot: String,
        /// The branch's name; `branch-<id>` if not given.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List the branches.
    BranchList,
    /// Delete a branch.
    BranchDelete {
        /// The branch.
        #[command(flatten)]
        branch: BranchRef,
        /// Delete it even while processes are bound to it or files are open.
        #[arg(long)]
        force: bool,
    },
    /// Bind a process (its threads and later children) or a cgroup to a branch.
    BranchBind {
        /// The branch (name or id).
        #[arg(long, value_name = "BRANCH")]
        branch: String,
        /// What to bind.
        #[command(flatten)]
        target: Target,
    },
    /// Remove the binding of a process or a cgroup.
    BranchUnbind {
        /// What to unbind.
        #[command(flatten)]
        target: Target,
    },
    /// List the bindings.
    BindingList,
    /// Run a command bound to a branch (agentfsctl binds itself, then
    /// executes the command in its place; the exit status is the command's).
    Exec {
        /// The branch (name or id).
        #[arg(long, value_name = "BRANCH")]
        branch: String,
        /// The command and its arguments.
        #[arg(
            value_name = "CMD",
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<OsString>,
    },
    /// List the configured mounts and their states.
    MountList,
    /// Start a mount; returns when it runs.
    MountStart {
        /// The mount's name (or a path, see --mount).
        #[arg(value_name = "NAME")]
        name: String,
        /// Stay running while the mount runs, for systemd (agentfs@.service):
        /// sends READY=1 once it runs, exits 0 when it is stopped, 1 when it
        /// fails; exits 0 on SIGTERM.
        #[arg(long)]
        follow: bool,
    },
    /// Stop a mount; returns when it is stopped.
    MountStop {
        /// The mount's name (or a path, see --mount).
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Show the properties of one mount (NAME, else --mount) or of all.
    Status {
        /// The mount's name (or a path, see --mount).
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
    /// Make the supervisor read its config directory again.
    Reload,
    /// Write shell completions and man pages (for packaging).
    #[command(hide = true)]
    Generate {
        /// Where to write completions/ and man/.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// The command line as documented (completions, man pages): [`Cli`]
/// without its hidden subcommands.
pub fn documented() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new("agentfsctl").version(env!("CARGO_PKG_VERSION"));
    if let Some(s) = full.get_about() {
        cmd = cmd.about(s.clone());
    }
    if let Some(s) = full.get_long_about() {
        cmd = cmd.long_about(s.clone());
    }
    if let Some(s) = full.get_after_help() {
        cmd = cmd.after_help(s.clone());
    }
    cmd.subcommand_required(true)
        .arg_required_else_help(true)
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// A snapshot, positional or as `--snapshot`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SnapshotRef {
    /// The snapshot (name or id).
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// The snapshot (name or id), as a flag.
    #[arg(long = "snapshot", value_name = "SNAPSHOT")]
    pub snapshot_flag: Option<String>,
}

impl SnapshotRef {
    /// The snapshot, whichever way it was given.
    pub fn get(&self) -> &str {
        self.snapshot
            .as_deref()
            .or(self.snapshot_flag.as_deref())
            .unwrap_or_default()
    }
}

/// A branch, positional or as `--branch`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct BranchRef {
    /// The branch (name or id).
    #[arg(value_name = "BRANCH")]
    pub branch: Option<String>,
    /// The branch (name or id), as a flag.
    #[arg(long = "branch", value_name = "BRANCH")]
    pub branch_flag: Option<String>,
}

impl BranchRef {
    /// The branch, whichever way it was given.
    pub fn get(&self) -> &str {
        self.branch
            .as_deref()
            .or(self.branch_flag.as_deref())
            .unwrap_or_default()
    }
}

/// A process or a cgroup to bind or unbind.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// A process id.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// A cgroup v2 path (`/agents/a` or `/sys/fs/cgroup/agents/a`).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("agentfsctl").chain(args.iter().copied()))
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_before_and_after_the_subcommand() {
        let c = parse(&["--mount", "a", "--json", "snapshot-list", "--user"]).unwrap();
        assert_eq!(c.mount.as_deref(), Some("a"));
        assert!(c.json && c.user);
        assert!(matches!(c.command, Command::SnapshotList));
        let c = parse(&["branch-list", "--mount", "/srv/x"]).unwrap();
        assert_eq!(c.mount.as_deref(), Some("/srv/x"));
        assert!(!c.json && !c.user);
    }

    #[test]
    fn exec_takes_everything_after_the_separator() {
        let c = parse(&[
            "--mount",
            "a",
            "exec",
            "--branch",
            "b",
            "--",
            "cargo",
            "test",
            "--release",
            "--",
            "-x",
        ])
        .unwrap();
        let Command::Exec { branch, command } = c.command else {
            panic!("not exec")
        };
        assert_eq!(branch, "b");
        assert_eq!(command, ["cargo", "test", "--release", "--", "-x"]);
    }

    #[test]
    fn exec_without_separator_stops_parsing_at_the_command() {
        let c = parse(&["exec", "--branch", "b", "ls", "-l", "--json"]).unwrap();
        assert!(!c.json);
        let Command::Exec { command, .. } = c.command else {
            panic!("not exec")
        };
        assert_eq!(command, ["ls", "-l", "--json"]);
    }

    #[test]
    fn exec_needs_a_command_and_a_branch() {
        assert!(parse(&["exec", "--branch", "b"]).is_err());
        assert!(parse(&["exec", "--branch", "b", "--"]).is_err());
        assert!(parse(&["exec", "--", "true"]).is_err());
    }

    #[test]
    fn delete_takes_positional_or_flag_but_not_both() {
        let c = parse(&["snapshot-delete", "clean"]).unwrap();
        let Command::SnapshotDelete(s) = c.command else {
            panic!()
        };
        assert_eq!(s.get(), "clean");
        let c = parse(&["snapshot-delete", "--snapshot", "3"]).unwrap();
        let Command::SnapshotDelete(s) = c.command else {
            panic!()
        };
        assert_eq!(s.get(), "3");
        assert!(parse(&["snapshot-delete"]).is_err());
        assert!(parse(&["snapshot-delete", "a", "--snapshot", "b"]).is_err());

        let c = parse(&["branch-delete", "--force", "try-a"]).unwrap();
        let Command::BranchDelete { branch, force } = c.command else {
            panic!()
        };
        assert_eq!((branch.get(), force), ("try-a", true));
        let c = parse(&["branch-delete", "--branch", "2"]).unwrap();
        let Command::BranchDelete { branch, force } = c.command else {
            panic!()
        };
        assert_eq!((branch.get(), force), ("2", false));
        assert!(parse(&["branch-delete"]).is_err());
    }

    #[test]
    fn bind_needs_exactly_one_target() {
        let c = parse(&["branch-bind", "--branch", "b", "--pid", "42"]).unwrap();
        let Command::BranchBind { branch, target } = c.command else {
            panic!()
        };
        assert_eq!(
            (branch.as_str(), target.pid, target.cgroup),
            ("b", Some(42), None)
        );
        let c = parse(&["branch-unbind", "--cgroup", "/agents/a"]).unwrap();
        let Command::BranchUnbind { target } = c.command else {
            panic!()
        };
        assert_eq!(target.cgroup.as_deref(), Some("/agents/a"));
        assert!(parse(&["branch-bind", "--branch", "b"]).is_err());
        assert!(
            parse(&[
                "branch-bind",
                "--branch",
                "b",
                "--pid",
                "1",
                "--cgroup",
                "/a"
            ])
            .is_err()
        );
        assert!(parse(&["branch-bind", "--pid", "1"]).is_err());
        assert!(parse(&["branch-unbind", "--pid", "x"]).is_err());
    }

    #[test]
    fn create_commands() {
        let c = parse(&["snapshot-create"]).unwrap();
        assert!(matches!(
            c.command,
            Command::SnapshotCreate {
                branch: None,
                name: None
            }
        ));
        let c = parse(&["snapshot-create", "--branch", "b", "--name", "n"]).unwrap();
        let Command::SnapshotCreate { branch, name } = c.command else {
            panic!()
        };
        assert_eq!((branch.as_deref(), name.as_deref()), (Some("b"), Some("n")));
        assert!(parse(&["branch-create", "--name", "x"]).is_err());
        let c = parse(&["branch-create", "--snapshot", "clean", "--name", "try-a"]).unwrap();
        let Command::BranchCreate { snapshot, name } = c.command else {
            panic!()
        };
        assert_eq!(
            (snapshot.as_str(), name.as_deref()),
            ("clean", Some("try-a"))
        );
    }

    #[test]
    fn mount_commands() {
        // The unit runs `mount-start --follow %i`.
        let c = parse(&["mount-start", "--follow", "agent-1"]).unwrap();
        let Command::MountStart { name, follow } = c.command else {
            panic!()
        };
        assert_eq!((name.as_str(), follow), ("agent-1", true));
        let c = parse(&["mount-start", "agent1"]).unwrap();
        assert!(matches!(
            c.command,
            Command::MountStart { follow: false, .. }
        ));
        assert!(parse(&["mount-start"]).is_err());
        assert!(parse(&["mount-stop"]).is_err());
        let c = parse(&["status"]).unwrap();
        assert!(matches!(c.command, Command::Status { name: None }));
        let c = parse(&["status", "a"]).unwrap();
        assert!(matches!(c.command, Command::Status { name: Some(_) }));
        assert!(matches!(
            parse(&["reload"]).unwrap().command,
            Command::Reload
        ));
        assert!(matches!(
            parse(&["mount-list"]).unwrap().command,
            Command::MountList
        ));
    }

    #[test]
    fn generate_is_hidden() {
        let cmd = Cli::command();
        let g = cmd.find_subcommand("generate").unwrap();
        assert!(g.is_hide_set());
        let c = parse(&["generate", "--out", "/tmp/x"]).unwrap();
        assert!(matches!(c.command, Command::Generate { .. }));
    }

    #[test]
    fn documented_is_the_cli_without_generate() {
        let doc = documented();
        doc.clone().debug_assert();
        let full = Cli::command();
        let names = |c: &clap::Command| {
            c.get_subcommands()
                .map(|s| s.get_name().to_owned())
                .collect::<Vec<_>>()
        };
        let mut want = names(&full);
        want.retain(|n| n != "generate");
        assert_eq!(names(&doc), want);
        assert_eq!(want.len(), 15);
        let args = |c: &clap::Command| {
            c.get_arguments()
                .map(|a| a.get_id().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(args(&doc), args(&full));
        assert!(doc.get_about().is_some() && doc.get_after_help().is_some());
    }
}
