//! The supervisor's D-Bus API (specs/dbus.md) as zbus proxies, and how its
//! failures are told to a person.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;
use zbus::proxy::{CacheProperties, MethodFlags};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{Connection, fdo};

/// The supervisor's well-known bus name.
pub const SERVICE: &str = "org.agentfs";
/// The interface of a mount object.
pub const MOUNT_INTERFACE: &str = "org.agentfs.Mount1";
/// Prefix of the supervisor's named errors.
pub const ERROR_PREFIX: &str = "org.agentfs.Error.";

/// What is printed when nobody owns `org.agentfs`.
pub const NOT_RUNNING: &str =
    "the AgentFS service is not running (start it with: systemctl start agentfs)";
/// Same, for the per-user supervisor.
pub const NOT_RUNNING_USER: &str = "the AgentFS service is not running \
     (start it with: systemctl --user start agentfs, or agentfs-supervisor --user)";

/// `org.agentfs.Manager1` at `/org/agentfs`.
#[zbus::proxy(
    interface = "org.agentfs.Manager1",
    default_service = "org.agentfs",
    default_path = "/org/agentfs"
)]
pub trait Manager1 {
    /// Every known mount: name, state, object path.
    fn list_mounts(&self) -> zbus::Result<Vec<(String, String, OwnedObjectPath)>>;
    /// Mounts `name`; returns its object path once it runs.
    fn start_mount(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    /// Unmounts `name`; returns once it is stopped.
    fn stop_mount(&self, name: &str) -> zbus::Result<()>;
    /// Reads the config directory again.
    fn reload(&self) -> zbus::Result<()>;
    /// The supervisor's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
}

/// `org.agentfs.Mount1`, one per mount.
#[zbus::proxy(interface = "org.agentfs.Mount1", default_service = "org.agentfs")]
pub trait Mount1 {
    /// Snapshot of `branch` (`""`: main) named `name` (`""`: `snap-<id>`); returns its id.
    fn create_snapshot(&self, branch: &str, name: &str) -> zbus::Result<String>;
    /// id, name, branch, creation time (Unix seconds); oldest first.
    fn list_snapshots(&self) -> zbus::Result<Vec<(String, String, String, u64)>>;
    /// Deletes a snapshot (name or id).
    fn delete_snapshot(&self, snapshot: &str) -> zbus::Result<()>;
    /// Branch from a snapshot, named `name` (`""`: `branch-<id>`); returns its id.
    fn create_branch(&self, snapshot: &str, name: &str) -> zbus::Result<String>;
    /// id, name, id of the snapshot it came from.
    fn list_branches(&self) -> zbus::Result<Vec<(String, String, String)>>;
    /// Deletes a branch; `force` also while it is in use.
    fn delete_branch(&self, branch: &str, force: bool) -> zbus::Result<()>;
    /// Binds a process, its threads and its later children.
    fn bind_pid(&self, branch: &str, pid: u32) -> zbus::Result<()>;
    /// Binds a cgroup v2 subtree.
    fn bind_cgroup(&self, branch: &str, path: &str) -> zbus::Result<()>;
    /// Removes a pid binding.
    fn unbind_pid(&self, pid: u32) -> zbus::Result<()>;
    /// Removes a cgroup binding.
    fn unbind_cgroup(&self, path: &str) -> zbus::Result<()>;
    /// kind (`pid`, `cgroup`), target, branch name.
    fn list_bindings(&self) -> zbus::Result<Vec<(String, String, String)>>;
    /// The worker died or hung and was replaced.
    #[zbus(signal)]
    fn worker_restarted(&self, restarts: u32, reason: String) -> zbus::Result<()>;
    /// The mount's state.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Why it last failed or restarted.
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;
}

/// A failure, printed as `agentfsctl: <message>` on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The sentence to print.
    pub message: String,
    /// The exit status (1 unless said otherwise).
    pub code: u8,
}

impl Failure {
    /// A failure with exit status 1.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// What a failed call means to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Nobody owns `org.agentfs` (and it cannot be activated).
    ServiceGone,
    /// A named error of the supervisor (`org.agentfs.Error.<name>`).
    Service(String),
    /// The object (or method) does not exist.
    NoObject,
    /// Anything else.
    Other,
}

/// Classifies a zbus error: what happened, and the sentence to print.
pub fn classify(e: &zbus::Error, user: bool) -> (Kind, String) {
    let gone = || {
        (
            Kind::ServiceGone,
            if user { NOT_RUNNING_USER } else { NOT_RUNNING }.to_owned(),
        )
    };
    match e {
        zbus::Error::MethodError(name, detail, _) => {
            let name = name.as_str();
            let detail = detail.clone().unwrap_or_default();
            if let Some(short) = name.strip_prefix(ERROR_PREFIX) {
                let msg = if detail.is_empty() {
                    format!("the service failed ({short})")
                } else {
                    detail
                };
                return (Kind::Service(short.to_owned()), msg);
            }
            match name {
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner" => gone(),
                "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownMethod"
                | "org.freedesktop.DBus.Error.UnknownInterface" => {
                    (Kind::NoObject, format!("{detail} ({name})"))
                }
                "org.freedesktop.DBus.Error.AccessDenied" => {
                    (Kind::Other, format!("the bus refused the call: {detail}"))
                }
                "org.freedesktop.DBus.Error.NoReply" | "org.freedesktop.DBus.Error.Timeout" => (
                    Kind::Other,
                    format!("the AgentFS service did not answer: {detail}"),
                ),
                _ if detail.is_empty() => (Kind::Other, name.to_owned()),
                _ => (Kind::Other, format!("{detail} ({name})")),
            }
        }
        zbus::Error::FDO(f) => match f.as_ref() {
            fdo::Error::ServiceUnknown(_) | fdo::Error::NameHasNoOwner(_) => gone(),
            fdo::Error::UnknownObject(m)
            | fdo::Error::UnknownMethod(m)
            | fdo::Error::UnknownInterface(m)
            | fdo::Error::UnknownProperty(m) => (Kind::NoObject, m.clone()),
            fdo::Error::ZBus(inner) => classify(inner, user),
            other => (Kind::Other, other.to_string()),
        },
        other => (Kind::Other, other.to_string()),
    }
}

/// Turns a zbus error into the failure to print.
pub fn failure(e: zbus::Error, user: bool) -> Failure {
    Failure::new(classify(&e, user).1)
}

/// Connects to the system bus, or the session bus with `user`.
pub async fn connect(user: bool) -> Result<Connection, Failure> {
    let r = if user {
        Connection::session().await
    } else {
        Connection::system().await
    };
    r.map_err(|e| {
        Failure::new(format!(
            "cannot connect to the {} bus: {e}",
            if user { "session" } else { "system" }
        ))
    })
}

/// The manager proxy (no property cache: every read asks the service).
pub async fn manager(conn: &Connection) -> zbus::Result<Manager1Proxy<'static>> {
    Manager1Proxy::builder(conn)
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// A mount object's proxy (no property cache).
pub async fn mount(
    conn: &Connection,
    path: &OwnedObjectPath,
) -> zbus::Result<Mount1Proxy<'static>> {
    Mount1Proxy::builder(conn)
        .path(path.clone())?
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// The `Properties` proxy of a mount object.
pub async fn properties(
    conn: &Connection,
    path: &OwnedObjectPath,
) -> zbus::Result<fdo::PropertiesProxy<'static>> {
    fdo::PropertiesProxy::builder(conn)
        .destination(SERVICE)?
        .path(path.clone())?
        .cache_properties(CacheProperties::No)
        .build()
        .await
}

/// Every property of a mount object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MountProps {
    /// The object path.
    pub path: String,
    /// `Name`.
    pub name: String,
    /// `State`.
    pub state: String,
    /// `Source`.
    pub source: String,
    /// `MountPoint`.
    pub mount_point: String,
    /// `StateDir`.
    pub state_dir: String,
    /// `WorkerPid`.
    pub worker_pid: u32,
    /// `Restarts`.
    pub restarts: u32,
    /// `LastError`.
    pub last_error: String,
}

impl MountProps {
    /// From the answer of `GetAll`; missing or mistyped properties stay empty.
    pub fn from_map(path: &str, map: &HashMap<String, OwnedValue>) -> MountProps {
        let s = |k: &str| {
            map.get(k)
                .and_then(|v| String::try_from(v.try_clone().ok()?).ok())
                .unwrap_or_default()
        };
        let u = |k: &str| map.get(k).and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        MountProps {
            path: path.to_owned(),
            name: s("Name"),
            state: s("State"),
            source: s("Source"),
            mount_point: s("MountPoint"),
            state_dir: s("StateDir"),
            worker_pid: u("WorkerPid"),
            restarts: u("Restarts"),
            last_error: s("LastError"),
        }
    }
}

/// Reads every property of the mount object at `path`.
///
/// Reading never starts the service by D-Bus activation (NO_AUTO_START):
/// a mount object only exists while the supervisor runs, and while systemd
/// restarts a crashed supervisor an activation request would wait for that
/// restart (up to the bus's 25 s call timeout) instead of failing at once.
pub async fn mount_props(conn: &Connection, path: &OwnedObjectPath) -> zbus::Result<MountProps> {
    let props = properties(conn, path).await?;
    let map: HashMap<String, OwnedValue> = props
        .inner()
        .call_with_flags(
            "GetAll",
            MethodFlags::NoAutoStart.into(),
            &(MOUNT_INTERFACE,),
        )
        .await?
        .ok_or_else(|| zbus::Error::Failure("GetAll gave no reply".into()))?;
    Ok(MountProps::from_map(path.as_str(), &map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::message::Message;
    use zbus::names::OwnedErrorName;
    use zbus::zvariant::Value;

    fn method_error(name: &str, detail: &str) -> zbus::Error {
        let call = Message::method_call("/x", "M").unwrap().build(&()).unwrap();
        zbus::Error::MethodError(
            OwnedErrorName::try_from(name).unwrap(),
            Some(detail.to_owned()),
            call,
        )
    }

    #[test]
    fn service_errors_print_their_message() {
        let e = method_error(
            "org.agentfs.Error.NotFound",
            "mount agent1 has no snapshot clean",
        );
        assert_eq!(
            classify(&e, false),
            (
                Kind::Service("NotFound".into()),
                "mount agent1 has no snapshot clean".into()
            )
        );
    }

    #[test]
    fn missing_service_says_how_to_start_it() {
        for name in [
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner",
        ] {
            let (k, m) = classify(&method_error(name, "whatever"), false);
            assert_eq!(k, Kind::ServiceGone);
            assert_eq!(m, NOT_RUNNING);
        }
        let e = zbus::Error::from(fdo::Error::ServiceUnknown("x".into()));
        assert_eq!(
            classify(&e, true),
            (Kind::ServiceGone, NOT_RUNNING_USER.into())
        );
    }

    #[test]
    fn other_errors_keep_their_name() {
        let (k, m) = classify(
            &method_error("org.freedesktop.DBus.Error.UnknownObject", "no such object"),
            false,
        );
        assert_eq!(k, Kind::NoObject);
        assert!(m.contains("no such object"));
        let (k, m) = classify(&method_error("com.example.Weird", "odd"), false);
        assert_eq!(k, Kind::Other);
        assert_eq!(m, "odd (com.example.Weird)");
    }

    #[test]
    fn props_from_get_all() {
        let mut map = HashMap::new();
        let mut put = |k: &str, v: Value<'_>| {
            map.insert(k.to_owned(), OwnedValue::try_from(v).unwrap());
        };
        put("Name", Value::from("agent1"));
        put("State", Value::from("running"));
        put("Source", Value::from("/srv/a"));
        put("MountPoint", Value::from("/srv/a"));
        put("WorkerPid", Value::from(42u32));
        put("Restarts", Value::from(1u32));
        let p = MountProps::from_map("/org/agentfs/mount/agent1", &map);
        assert_eq!(p.name, "agent1");
        assert_eq!(p.state, "running");
        assert_eq!(p.mount_point, "/srv/a");
        assert_eq!(p.state_dir, "");
        assert_eq!((p.worker_pid, p.restarts), (42, 1));
    }
}
