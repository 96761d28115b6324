//! The D-Bus face of the supervisor (specs/dbus.md): `org.agentfs.Manager1`
//! at `/org/agentfs` and one `org.agentfs.Mount1` per mount. Methods check
//! the caller, then forward to the registry or to the mount's worker over
//! its control socket.

use std::sync::Arc;

use agentfs_mount_worker::binding::{Binding, Subject};
use agentfs_mount_worker::control::{self, ControlError, ErrorKind, Request};
use agentfs_mount_worker::snapshot::{Branch, Snapshot};
use serde::de::DeserializeOwned;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{Connection, interface};

use crate::auth::{self, Action};
use crate::config::MountConfig;
use crate::mounts::Mount;
use crate::service::Registry;

/// Errors as callers see them: `org.agentfs.Error.<Variant>` with a
/// message that names the object and says what to do.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.agentfs.Error")]
pub enum Error {
    /// A failure of the bus itself.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Unknown mount, snapshot, branch, process, cgroup or binding.
    NotFound(String),
    /// The name is taken.
    AlreadyExists(String),
    /// In use.
    Busy(String),
    /// A bad argument or config file.
    InvalidArgument(String),
    /// The caller is not allowed.
    AccessDenied(String),
    /// The mount is not running.
    NotRunning(String),
    /// The state directory is full.
    NoSpace(String),
    /// A host I/O error.
    Io(String),
    /// A write to a read-only place.
    ReadOnly(String),
    /// Anything else.
    Failed(String),
}

impl From<ControlError> for Error {
    fn from(e: ControlError) -> Error {
        let m = e.message;
        match e.kind {
            ErrorKind::NotFound => Error::NotFound(m),
            ErrorKind::AlreadyExists => Error::AlreadyExists(m),
            ErrorKind::Busy => Error::Busy(m),
            ErrorKind::InvalidArgument => Error::InvalidArgument(m),
            ErrorKind::AccessDenied => Error::AccessDenied(m),
            ErrorKind::NoSpace => Error::NoSpace(m),
            ErrorKind::Io => Error::Io(m),
            ErrorKind::ReadOnly => Error::ReadOnly(m),
        }
    }
}

/// `org.agentfs.Manager1` at `/org/agentfs`.
pub struct Manager {
    /// The mounts.
    pub registry: Arc<Registry>,
}

#[interface(name = "org.agentfs.Manager1")]
impl Manager {
    /// Every known mount: name, state, object path.
    async fn list_mounts(&self) -> Vec<(String, String, OwnedObjectPath)> {
        self.registry
            .list()
            .await
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    m.info().state.as_str().to_owned(),
                    m.path.clone(),
                )
            })
            .collect()
    }

    /// Mounts `name` (its config read again) and returns its object path
    /// once it is running.
    async fn start_mount(
        &self,
        name: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, Error> {
        let caller = auth::caller(conn, &hdr).await?;
        let mount = self.mount_for(&name, conn).await?;
        auth::require(conn, &caller, &mount, Action::Manage).await?;
        self.registry
            .start(&mount)
            .await
            .map_err(|why| match mount.info().config {
                Err(_) => Error::InvalidArgument(why),
                Ok(_) => Error::Failed(format!("mount {name} failed to start: {why}")),
            })?;
        Ok(mount.path.clone())
    }

    /// Unmounts `name` and stops its worker.
    async fn stop_mount(
        &self,
        name: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let caller = auth::caller(conn, &hdr).await?;
        let mount = self.mount_for(&name, conn).await?;
        auth::require(conn, &caller, &mount, Action::Manage).await?;
        mount.stop().await;
        Ok(())
    }

    /// Reads the config directory again.
    async fn reload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let caller = auth::caller(conn, &hdr).await?;
        auth::require_root(&caller, "reload the configuration")?;
        reload(&self.registry, conn)
            .await
            .map_err(|e| Error::Io(e.to_string()))
    }

    /// The supervisor's version.
    #[zbus(property)]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }
}

impl Manager {
    async fn mount_for(&self, name: &str, conn: &Connection) -> Result<Arc<Mount>, Error> {
        if !crate::config::valid_mount_name(name) {
            return Err(Error::InvalidArgument(format!(
                "{} is not a mount name: at most 64 letters, digits, '-', '_', '.', '@', not starting with '.'",
                agentfs_mount_worker::control::brief(name)
            )));
        }
        let (mount, added) = self.registry.find_or_add(name).await;
        let mount = mount.ok_or_else(|| {
            Error::NotFound(format!(
                "no mount {name}: there is no {}; create it (see {}) or check the name",
                crate::config::file_of(&self.registry.settings.config_dir, name).display(),
                "specs/config.md"
            ))
        })?;
        if added {
            publish(conn, &mount).await?;
        }
        Ok(mount)
    }
}

/// Reads the configs again and updates the objects on the bus.
pub async fn reload(registry: &Arc<Registry>, conn: &Connection) -> std::io::Result<()> {
    let changes = registry.reload().await?;
    for m in &changes.added {
        if let Err(e) = publish(conn, m).await {
            tracing::error!(mount = %m.name, "cannot publish on the bus: {e}");
        }
    }
    for m in &changes.removed {
        let _ = conn
            .object_server()
            .remove::<MountObject, _>(m.path.as_ref())
            .await;
    }
    Ok(())
}

/// Puts a mount's object on the bus.
pub async fn publish(conn: &Connection, mount: &Arc<Mount>) -> Result<(), Error> {
    conn.object_server()
        .at(
            mount.path.as_ref(),
            MountObject {
                mount: mount.clone(),
            },
        )
        .await?;
    Ok(())
}

/// Announces a mount's properties (and a worker restart) on the bus.
pub async fn announce(conn: &Connection, mount: &Mount, restarted: Option<(u32, String)>) {
    let Ok(iface) = conn
        .object_server()
        .interface::<_, MountObject>(mount.path.as_ref())
        .await
    else {
        return; // not published (yet, or any more)
    };
    let emitter = iface.signal_emitter();
    let obj = iface.get().await;
    let _ = obj.state_changed(emitter).await;
    let _ = obj.worker_pid_changed(emitter).await;
    let _ = obj.restarts_changed(emitter).await;
    let _ = obj.last_error_changed(emitter).await;
    let _ = obj.source_changed(emitter).await;
    let _ = obj.mount_point_changed(emitter).await;
    let _ = obj.state_dir_changed(emitter).await;
    if let Some((restarts, reason)) = restarted {
        let _ = MountObject::worker_restarted(emitter, restarts, &reason).await;
    }
}

/// `org.agentfs.Mount1` of one mount.
pub struct MountObject {
    mount: Arc<Mount>,
}

impl MountObject {
    fn config(&self) -> Option<MountConfig> {
        self.mount.current_config()
    }

    /// Checks that the caller may do `action` and that the mount runs;
    /// returns its config.
    async fn authorize(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        action: Action,
    ) -> Result<MountConfig, Error> {
        let caller = auth::caller(conn, hdr).await?;
        self.authorize_caller(conn, &caller, action).await
    }

    async fn authorize_caller(
        &self,
        conn: &Connection,
        caller: &auth::Caller,
        action: Action,
    ) -> Result<MountConfig, Error> {
        let name = &self.mount.name;
        auth::require(conn, caller, &self.mount, action).await?;
        self.mount.running_config().ok_or_else(|| {
            Error::NotRunning(format!(
                "mount {name} is {}; start it first (agentfsctl mount-start {name}, or systemctl start agentfs@{name})",
                self.mount.info().state.as_str()
            ))
        })
    }

    /// Sends one request to the worker.
    async fn call(&self, cfg: &MountConfig, req: Request) -> Result<serde_json::Value, Error> {
        let dir = cfg.state_dir.clone();
        tokio::task::spawn_blocking(move || control::call(&dir, &req))
            .await
            .map_err(|e| Error::Failed(format!("control call failed: {e}")))?
            .map_err(Error::from)
    }

    async fn call_as<T: DeserializeOwned>(
        &self,
        cfg: &MountConfig,
        req: Request,
    ) -> Result<T, Error> {
        let v = self.call(cfg, req).await?;
        serde_json::from_value(v)
            .map_err(|e| Error::Failed(format!("the worker's reply is not understood: {e}")))
    }

    async fn branch_names(
        &self,
        cfg: &MountConfig,
    ) -> Result<std::collections::HashMap<u32, String>, Error> {
        let branches: Vec<Branch> = self.call_as(cfg, Request::BranchList {}).await?;
        Ok(branches.into_iter().map(|b| (b.id.0, b.name)).collect())
    }
}

/// An empty string means "the default".
fn given(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[interface(name = "org.agentfs.Mount1")]
impl MountObject {
    /// Takes a snapshot of `branch` (`""` or `main`: main); returns its id.
    async fn create_snapshot(
        &self,
        branch: String,
        name: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        let cfg = self.authorize(conn, &hdr, Action::Manage).await?;
        let branch = given(branch).filter(|b| b != "main");
        let snap: Snapshot = self
            .call_as(
                &cfg,
                Request::SnapshotCreate {
                    branch,
                    name: given(name),
                },
            )
            .await?;
        tracing::info!(mount = %self.mount.name, snapshot = %snap.name, id = snap.id.0, "snapshot created");
        Ok(snap.id.0.to_string())
    }

    /// id, name, branch it was taken of, creation time; oldest first.
    async fn list_snapshots(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, String, u64)>, Error> {
        let cfg = self.authorize(conn, &hdr, Action::Bind).await?;
        let snaps: Vec<Snapshot> = self.call_as(&cfg, Request::SnapshotList {}).await?;
        let names = self.branch_names(&cfg).await?;
        Ok(snaps
            .into_iter()
            .map(|s| {
                let of = match s.branch {
                    None => "main".to_owned(),
                    Some(b) => names.get(&b.0).cloned().unwrap_or_else(|| b.0.to_string()),
                };
                (s.id.0.to_string(), s.name, of, s.created)
            })
            .collect())
    }

    /// Deletes a snapshot (name or id).
    async fn delete_snapshot(
        &self,
        snapshot: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let cfg = self.authorize(conn, &hdr, Action::Manage).await?;
        self.call(&cfg, Request::SnapshotDelete { snapshot })
            .await?;
        Ok(())
    }

    /// Creates a branch from a snapshot; returns its id.
    async fn create_branch(
        &self,
        snapshot: String,
        name: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, Error> {
        let cfg = self.authorize(conn, &hdr, Action::Manage).await?;
        let b: Branch = self
            .call_as(
                &cfg,
                Request::BranchCreate {
                    snapshot,
                    name: given(name),
                },
            )
            .await?;
        tracing::info!(mount = %self.mount.name, branch = %b.name, id = b.id.0, "branch created");
        Ok(b.id.0.to_string())
    }

    /// id, name, id of the snapshot it came from.
    async fn list_branches(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, String)>, Error> {
        let cfg = self.authorize(conn, &hdr, Action::Bind).await?;
        let branches: Vec<Branch> = self.call_as(&cfg, Request::BranchList {}).await?;
        Ok(branches
            .into_iter()
            .map(|b| (b.id.0.to_string(), b.name, b.snapshot.0.to_string()))
            .collect())
    }

    /// Deletes a branch; `force` also when in use.
    async fn delete_branch(
        &self,
        branch: String,
        force: bool,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let cfg = self.authorize(conn, &hdr, Action::Manage).await?;
        self.call(&cfg, Request::BranchDelete { branch, force })
            .await?;
        Ok(())
    }

    /// Binds a process (its threads and later children) to a branch.
    async fn bind_pid(
        &self,
        branch: String,
        pid: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let caller = auth::caller(conn, &hdr).await?;
        let cfg = self.authorize_caller(conn, &caller, Action::Bind).await?;
        let held = auth::require_owns_pid(&caller, pid)?;
        self.call(
            &cfg,
            Request::BindPid {
                branch: branch.clone(),
                pid: pid as i32,
            },
        )
        .await?;
        if !held.alive() {
            // It exited between the check and the bind: whatever the worker
            // bound under that pid is not the process that was checked.
            let _ = self
                .call(&cfg, Request::UnbindPid { pid: pid as i32 })
                .await;
            return Err(Error::NotFound(format!(
                "process {pid} exited while being bound; nothing is bound"
            )));
        }
        tracing::info!(mount = %self.mount.name, pid, branch = %branch, uid = caller.uid, "process bound");
        Ok(())
    }

    /// Binds a cgroup v2 subtree to a branch.
    async fn bind_cgroup(
        &self,
        branch: String,
        path: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let caller = auth::caller(conn, &hdr).await?;
        let cfg = self.authorize_caller(conn, &caller, Action::Bind).await?;
        auth::require_owns_cgroup(&caller, &path)?;
        self.call(
            &cfg,
            Request::BindCgroup {
                branch,
                cgroup: path,
            },
        )
        .await?;
        Ok(())
    }

    /// Removes a pid binding.
    async fn unbind_pid(
        &self,
        pid: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let caller = auth::caller(conn, &hdr).await?;
        let cfg = self.authorize_caller(conn, &caller, Action::Bind).await?;
        if !caller.is_root() {
            // Unbinding a process that is gone is housekeeping anyone
            // granted the mount may do; a live one must be the caller's.
            if let Ok(p) = auth::HeldProcess::open(pid) {
                if p.real_uid().is_ok_and(|u| u != caller.uid) {
                    return Err(Error::AccessDenied(format!(
                        "process {pid} is not yours; you may unbind only your own processes"
                    )));
                }
            }
        }
        self.call(&cfg, Request::UnbindPid { pid: pid as i32 })
            .await?;
        Ok(())
    }

    /// Removes a cgroup binding.
    async fn unbind_cgroup(
        &self,
        path: String,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        let caller = auth::caller(conn, &hdr).await?;
        let cfg = self.authorize_caller(conn, &caller, Action::Bind).await?;
        auth::require_owns_cgroup(&caller, &path)?;
        self.call(&cfg, Request::UnbindCgroup { cgroup: path })
            .await?;
        Ok(())
    }

    /// kind, target, branch name of every binding.
    async fn list_bindings(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<Vec<(String, String, String)>, Error> {
        let cfg = self.authorize(conn, &hdr, Action::Bind).await?;
        let bindings: Vec<Binding> = self.call_as(&cfg, Request::BindingList {}).await?;
        let names = self.branch_names(&cfg).await?;
        Ok(bindings
            .into_iter()
            .map(|b| {
                let (kind, target) = match b.subject {
                    Subject::Pid { pid, .. } => ("pid", pid.to_string()),
                    Subject::Cgroup { path } => ("cgroup", path),
                };
                let branch = names
                    .get(&b.branch.0)
                    .cloned()
                    .unwrap_or_else(|| b.branch.0.to_string());
                (kind.to_owned(), target, branch)
            })
            .collect())
    }

    /// The worker died or hung and was replaced.
    #[zbus(signal)]
    async fn worker_restarted(
        emitter: &SignalEmitter<'_>,
        restarts: u32,
        reason: &str,
    ) -> zbus::Result<()>;

    /// The mount's name.
    #[zbus(property)]
    fn name(&self) -> String {
        self.mount.name.clone()
    }

    /// The host directory.
    #[zbus(property)]
    fn source(&self) -> String {
        self.config()
            .map(|c| c.source.display().to_string())
            .unwrap_or_default()
    }

    /// Where it is mounted.
    #[zbus(property)]
    fn mount_point(&self) -> String {
        self.config()
            .map(|c| c.mountpoint.display().to_string())
            .unwrap_or_default()
    }

    /// Its state directory.
    #[zbus(property)]
    fn state_dir(&self) -> String {
        self.config()
            .map(|c| c.state_dir.display().to_string())
            .unwrap_or_default()
    }

    /// starting, running, restarting, stopping, stopped or failed.
    #[zbus(property)]
    fn state(&self) -> String {
        self.mount.info().state.as_str().to_owned()
    }

    /// The worker's pid, 0 when none runs.
    #[zbus(property)]
    fn worker_pid(&self) -> u32 {
        self.mount.info().worker_pid
    }

    /// Restarts since the mount was started.
    #[zbus(property)]
    fn restarts(&self) -> u32 {
        self.mount.info().restarts
    }

    /// Why it last failed or restarted.
    #[zbus(property)]
    fn last_error(&self) -> String {
        self.mount.info().last_error
    }
}
