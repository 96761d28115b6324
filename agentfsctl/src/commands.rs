//! What each subcommand does: the D-Bus calls and what is printed.

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde_json::json;
use zbus::Connection;
use zbus::zvariant::OwnedObjectPath;

use crate::bus::{self, Failure, MountProps};
use crate::cli::{Cli, Command, Target};
use crate::output;
use crate::target::{self, Candidate};

/// What every command needs: the bus connection and the global flags.
pub struct Ctx {
    /// The connection to the system (or session) bus.
    pub conn: Connection,
    /// `--user`: the session bus.
    pub user: bool,
    /// `--json`: machine-readable output.
    pub json: bool,
    /// `--mount`.
    pub mount: Option<String>,
}

/// A mount picked for a command.
#[derive(Debug, Clone)]
pub struct Picked {
    /// Its name.
    pub name: String,
    /// Its object path.
    pub path: OwnedObjectPath,
}

impl Ctx {
    /// Turns a zbus error into the failure to print.
    pub fn err(&self, e: zbus::Error) -> Failure {
        bus::failure(e, self.user)
    }

    /// Prints `v` as JSON if `--json`, else the text `human()` makes.
    fn print<T: serde::Serialize + ?Sized>(&self, v: &T, human: impl FnOnce() -> String) {
        let s = if self.json { output::json(v) } else { human() };
        print!("{s}");
        let _ = std::io::stdout().flush();
    }

    /// `ListMounts()`.
    pub async fn list(&self) -> Result<Vec<(String, String, OwnedObjectPath)>, Failure> {
        let m = bus::manager(&self.conn).await.map_err(|e| self.err(e))?;
        m.list_mounts().await.map_err(|e| self.err(e))
    }

    /// The mount `arg` (a name or a path) names, or the only one if `None`.
    pub async fn pick(&self, arg: Option<&str>) -> Result<Picked, Failure> {
        let list = self.list().await?;
        let mut cands: Vec<Candidate> = list
            .iter()
            .map(|(name, state, _)| Candidate {
                name: name.clone(),
                state: state.clone(),
                ..Candidate::default()
            })
            .collect();
        let i = match arg {
            None => target::pick_default(&cands, self.user),
            Some(a) if target::is_path(a) => {
                let p = Path::new(a);
                let cwd = if p.is_absolute() {
                    std::path::PathBuf::from("/")
                } else {
                    std::env::current_dir().map_err(|e| {
                        Failure::new(format!("cannot resolve {a}: current directory: {e}"))
                    })?
                };
                let abs = target::normalize(p, &cwd);
                for (c, (_, _, path)) in cands.iter_mut().zip(&list) {
                    // A mount whose properties cannot be read matches nothing.
                    if let Ok(props) = bus::mount_props(&self.conn, path).await {
                        c.source = props.source;
                        c.mount_point = props.mount_point;
                    }
                }
                target::pick_by_path(&cands, &abs)
            }
            Some(name) => target::pick_by_name(&cands, name),
        }
        .map_err(Failure::new)?;
        let (name, _, path) = &list[i];
        Ok(Picked {
            name: name.clone(),
            path: path.clone(),
        })
    }

    /// The mount of `--mount` (or the only one) and its proxy.
    async fn mount(&self) -> Result<(Picked, bus::Mount1Proxy<'static>), Failure> {
        let picked = self.pick(self.mount.as_deref()).await?;
        let proxy = bus::mount(&self.conn, &picked.path)
            .await
            .map_err(|e| self.err(e))?;
        Ok((picked, proxy))
    }

    /// A mount given by name for `mount-start`/`mount-stop`: a name is
    /// passed on as it is (the service may not have read its config yet),
    /// a path is resolved.
    async fn mount_name(&self, arg: &str) -> Result<String, Failure> {
        if target::is_path(arg) {
            Ok(self.pick(Some(arg)).await?.name)
        } else {
            Ok(arg.to_owned())
        }
    }
}

/// Runs one command; returns the exit status.
pub async fn run(cli: Cli) -> Result<u8, Failure> {
    if let Command::Generate { out } = &cli.command {
        crate::generate::write(out)?;
        return Ok(0);
    }
    let conn = bus::connect(cli.user).await?;
    let ctx = Ctx {
        conn,
        user: cli.user,
        json: cli.json,
        mount: cli.mount,
    };
    match cli.command {
        Command::SnapshotCreate { branch, name } => {
            let (_, m) = ctx.mount().await?;
            let branch = branch.unwrap_or_default();
            let name = name.unwrap_or_default();
            let id = m
                .create_snapshot(&branch, &name)
                .await
                .map_err(|e| ctx.err(e))?;
            let name = if name.is_empty() {
                format!("snap-{id}")
            } else {
                name
            };
            let branch = if branch.is_empty() {
                "main".to_owned()
            } else {
                branch
            };
            ctx.print(&json!({"id": id, "name": name, "branch": branch}), || {
                format!("created snapshot {name} (id {id}) of {branch}\n")
            });
        }
        Command::SnapshotList => {
            let (_, m) = ctx.mount().await?;
            let snaps: Vec<output::Snapshot> = m
                .list_snapshots()
                .await
                .map_err(|e| ctx.err(e))?
                .into_iter()
                .map(|(id, name, branch, created)| output::Snapshot {
                    id,
                    name,
                    branch,
                    created,
                })
                .collect();
            ctx.print(&snaps, || output::snapshots_table(&snaps));
        }
        Command::SnapshotDelete(s) => {
            let (_, m) = ctx.mount().await?;
            let s = s.get();
            m.delete_snapshot(s).await.map_err(|e| ctx.err(e))?;
            ctx.print(&json!({"deleted": "snapshot", "snapshot": s}), || {
                format!("deleted snapshot {s}\n")
            });
        }
        Command::BranchCreate { snapshot, name } => {
            let (_, m) = ctx.mount().await?;
            let name = name.unwrap_or_default();
            let id = m
                .create_branch(&snapshot, &name)
                .await
                .map_err(|e| ctx.err(e))?;
            let name = if name.is_empty() {
                format!("branch-{id}")
            } else {
                name
            };
            ctx.print(
                &json!({"id": id, "name": name, "snapshot": snapshot}),
                || format!("created branch {name} (id {id}) from snapshot {snapshot}\n"),
            );
        }
        Command::BranchList => {
            let (_, m) = ctx.mount().await?;
            let branches: Vec<output::Branch> = m
                .list_branches()
                .await
                .map_err(|e| ctx.err(e))?
                .into_iter()
                .map(|(id, name, snapshot)| output::Branch { id, name, snapshot })
                .collect();
            ctx.print(&branches, || output::branches_table(&branches));
        }
        Command::BranchDelete { branch, force } => {
            let (_, m) = ctx.mount().await?;
            let b = branch.get();
            m.delete_branch(b, force).await.map_err(|e| ctx.err(e))?;
            ctx.print(
                &json!({"deleted": "branch", "branch": b, "force": force}),
                || format!("deleted branch {b}\n"),
            );
        }
        Command::BranchBind { branch, target } => {
            let (_, m) = ctx.mount().await?;
            let (kind, what) = describe(&target);
            match (&target.pid, &target.cgroup) {
                (Some(pid), _) => m.bind_pid(&branch, *pid).await,
                (None, Some(cg)) => m.bind_cgroup(&branch, cg).await,
                (None, None) => unreachable!("clap requires --pid or --cgroup"),
            }
            .map_err(|e| ctx.err(e))?;
            ctx.print(
                &json!({"kind": kind, "target": what, "branch": branch}),
                || format!("bound {kind} {what} to branch {branch}\n"),
            );
        }
        Command::BranchUnbind { target } => {
            let (_, m) = ctx.mount().await?;
            let (kind, what) = describe(&target);
            match (&target.pid, &target.cgroup) {
                (Some(pid), _) => m.unbind_pid(*pid).await,
                (None, Some(cg)) => m.unbind_cgroup(cg).await,
                (None, None) => unreachable!("clap requires --pid or --cgroup"),
            }
            .map_err(|e| ctx.err(e))?;
            ctx.print(
                &json!({"kind": kind, "target": what, "unbound": true}),
                || format!("unbound {kind} {what}\n"),
            );
        }
        Command::BindingList => {
            let (_, m) = ctx.mount().await?;
            let bindings: Vec<output::Binding> = m
                .list_bindings()
                .await
                .map_err(|e| ctx.err(e))?
                .into_iter()
                .map(|(kind, target, branch)| output::Binding {
                    kind,
                    target,
                    branch,
                })
                .collect();
            ctx.print(&bindings, || output::bindings_table(&bindings));
        }
        Command::Exec { branch, command } => return exec(&ctx, &branch, command).await,
        Command::MountList => {
            let list = ctx.list().await?;
            let mut mounts = Vec::with_capacity(list.len());
            for (name, state, path) in list {
                let props = bus::mount_props(&ctx.conn, &path).await.unwrap_or_default();
                mounts.push(output::Mount {
                    name,
                    state,
                    path: path.to_string(),
                    source: props.source,
                    mount_point: props.mount_point,
                });
            }
            ctx.print(&mounts, || output::mounts_table(&mounts));
        }
        Command::MountStart { name, follow } => {
            let name = ctx.mount_name(&name).await?;
            if follow {
                return crate::follow::follow(&ctx, &name).await;
            }
            let mgr = bus::manager(&ctx.conn).await.map_err(|e| ctx.err(e))?;
            let path = mgr.start_mount(&name).await.map_err(|e| ctx.err(e))?;
            let p = props_or_bare(&ctx, &name, &path).await;
            ctx.print(&p, || {
                format!(
                    "mount {name} is {}: {} at {}\n",
                    p.state, p.source, p.mount_point
                )
            });
        }
        Command::MountStop { name } => {
            let name = ctx.mount_name(&name).await?;
            // A stopped service has no mounts: do not start it (by D-Bus
            // activation) just to stop one. This is also the unit's
            // ExecStop while systemd restarts a crashed supervisor, which
            // activation would only delay.
            let dbus = zbus::fdo::DBusProxy::new(&ctx.conn)
                .await
                .map_err(|e| ctx.err(e))?;
            let running = dbus
                .name_has_owner(bus::SERVICE.try_into().expect("a valid bus name"))
                .await
                .map_err(|e| ctx.err(e.into()))?;
            if !running {
                ctx.print(&json!({"name": name, "state": "stopped"}), || {
                    format!("mount {name} is not mounted (the AgentFS service is not running)\n")
                });
                return Ok(0);
            }
            let mgr = bus::manager(&ctx.conn).await.map_err(|e| ctx.err(e))?;
            mgr.stop_mount(&name).await.map_err(|e| ctx.err(e))?;
            ctx.print(&json!({"name": name, "state": "stopped"}), || {
                format!("stopped mount {name}\n")
            });
        }
        Command::Status { name } => match name.or(ctx.mount.clone()) {
            Some(arg) => {
                let picked = ctx.pick(Some(&arg)).await?;
                let p = bus::mount_props(&ctx.conn, &picked.path)
                    .await
                    .map_err(|e| ctx.err(e))?;
                ctx.print(&p, || output::status_block(&p));
            }
            None => {
                let mut all = Vec::new();
                for (name, _, path) in ctx.list().await? {
                    all.push(props_or_bare(&ctx, &name, &path).await);
                }
                ctx.print(&all, || {
                    if all.is_empty() {
                        return "no mounts\n".into();
                    }
                    let blocks: Vec<String> = all.iter().map(output::status_block).collect();
                    blocks.join("\n")
                });
            }
        },
        Command::Reload => {
            let mgr = bus::manager(&ctx.conn).await.map_err(|e| ctx.err(e))?;
            mgr.reload().await.map_err(|e| ctx.err(e))?;
            ctx.print(&json!({"reloaded": true}), || {
                "reloaded the configuration\n".into()
            });
        }
        Command::Generate { .. } => unreachable!("handled above"),
    }
    Ok(0)
}

/// The properties of a mount, or just its name and path if they cannot be
/// read (the object went away meanwhile).
async fn props_or_bare(ctx: &Ctx, name: &str, path: &OwnedObjectPath) -> MountProps {
    bus::mount_props(&ctx.conn, path)
        .await
        .unwrap_or_else(|_| MountProps {
            path: path.to_string(),
            name: name.to_owned(),
            ..MountProps::default()
        })
}

/// `("pid", "42")` or `("cgroup", "/agents/a")`.
fn describe(t: &Target) -> (&'static str, String) {
    match (&t.pid, &t.cgroup) {
        (Some(pid), _) => ("pid", pid.to_string()),
        (None, Some(cg)) => ("cgroup", cg.clone()),
        (None, None) => ("pid", String::new()),
    }
}

/// The argument vector for execvp.
pub fn argv(command: &[OsString]) -> Result<Vec<CString>, Failure> {
    command
        .iter()
        .map(|a| {
            CString::new(a.as_bytes()).map_err(|_| {
                Failure::new(format!(
                    "cannot run {}: an argument contains a NUL byte",
                    command[0].to_string_lossy()
                ))
            })
        })
        .collect()
}

/// `exec`: binds this process to the branch, then becomes the command.
async fn exec(ctx: &Ctx, branch: &str, command: Vec<OsString>) -> Result<u8, Failure> {
    let argv = argv(&command)?;
    let (_, m) = ctx.mount().await?;
    let pid = std::process::id();
    m.bind_pid(branch, pid).await.map_err(|e| ctx.err(e))?;
    // Replaces this process; the binding stays with the pid. The bus
    // socket is close-on-exec.
    let errno = match nix::unistd::execvp(&argv[0], &argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let mut message = format!(
        "cannot run {}: {}",
        command[0].to_string_lossy(),
        errno.desc()
    );
    if let Err(e) = m.unbind_pid(pid).await {
        message.push_str(&format!(
            "; and unbinding process {pid} failed: {}",
            ctx.err(e)
        ));
    }
    Err(Failure {
        message,
        // As shells do: 127 when the command is not found, else 126.
        code: if errno == nix::errno::Errno::ENOENT {
            127
        } else {
            126
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_from_os_strings() {
        let v = argv(&["ls".into(), "-l".into()]).unwrap();
        assert_eq!(
            v,
            [CString::new("ls").unwrap(), CString::new("-l").unwrap()]
        );
        let e = argv(&["ls".into(), "a\0b".into()]).unwrap_err();
        assert!(e.message.contains("NUL"));
    }

    #[test]
    fn targets_are_described() {
        let t = Target {
            pid: Some(42),
            cgroup: None,
        };
        assert_eq!(describe(&t), ("pid", "42".into()));
        let t = Target {
            pid: None,
            cgroup: Some("/agents/a".into()),
        };
        assert_eq!(describe(&t), ("cgroup", "/agents/a".into()));
    }
}
