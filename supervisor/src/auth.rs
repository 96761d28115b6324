//! Who may do what (specs/dbus.md, Authorization): decided from the
//! caller's credentials as the bus daemon reports them, never from
//! arguments: root, then the mount's `[access]`, then polkit where it runs.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use zbus::message::Header;
use zbus::names::BusName;
use zbus::zvariant::{OwnedValue, Value};
use zbus_polkit::policykit1::{AuthorityProxy, Subject};

use crate::bus::Error;
use crate::config::{Access, MountConfig};
use crate::mounts::Mount;

/// The process on the other end of a method call.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Its uid.
    pub uid: u32,
    /// Its groups (primary and supplementary), when the bus reports them.
    pub gids: Vec<u32>,
    /// Its unique bus name: what polkit is asked about.
    pub bus_name: Option<String>,
}

impl Caller {
    /// Whether the caller is root.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// `alice (uid 1000)`, or `uid 1000` if the user has no name.
    pub fn describe(&self) -> String {
        match nix::unistd::User::from_uid(self.uid.into()) {
            Ok(Some(u)) => format!("{} (uid {})", u.name, self.uid),
            _ => format!("uid {}", self.uid),
        }
    }
}

/// Asks the bus daemon who sent the message.
pub async fn caller(conn: &zbus::Connection, hdr: &Header<'_>) -> Result<Caller, Error> {
    let sender = hdr
        .sender()
        .ok_or_else(|| Error::AccessDenied("the call has no sender; refusing it".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let creds = dbus
        .get_connection_credentials(BusName::from(sender.to_owned()))
        .await
        .map_err(|e| Error::AccessDenied(format!("cannot tell who the caller is: {e}")))?;
    let uid = creds
        .unix_user_id()
        .ok_or_else(|| Error::AccessDenied("the bus does not report the caller's uid".into()))?;
    let mut gids = creds.unix_group_ids().cloned().unwrap_or_default();
    if gids.is_empty() {
        // Older bus daemons: fall back to the user's groups from the database.
        if let Ok(Some(user)) = nix::unistd::User::from_uid(uid.into()) {
            gids.push(user.gid.as_raw());
            if let Ok(name) = std::ffi::CString::new(user.name) {
                if let Ok(groups) = nix::unistd::getgrouplist(&name, user.gid) {
                    gids.extend(groups.iter().map(|g| g.as_raw()));
                }
            }
        }
    }
    Ok(Caller {
        uid,
        gids,
        bus_name: Some(sender.to_string()),
    })
}

/// What a caller asks to do with a mount: each is a polkit action
/// (systemd/org.agentfs.policy; `manage` implies `bind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start and stop it, create and delete snapshots and branches.
    Manage,
    /// Bind and unbind one's own processes and cgroups; list snapshots,
    /// branches and bindings.
    Bind,
}

impl Action {
    /// The polkit action id.
    pub fn id(self) -> &'static str {
        match self {
            Action::Manage => "org.agentfs.manage",
            Action::Bind => "org.agentfs.bind",
        }
    }
}

/// Refuses unless `caller` may do `action` to `mount` (root only if its
/// config is invalid). Root may everything; others if the mount's
/// `[access]` lists them or, where polkit runs, if it grants the action
/// for the mount (detail `mount`).
pub async fn require(
    conn: &zbus::Connection,
    caller: &Caller,
    mount: &Mount,
    action: Action,
) -> Result<(), Error> {
    let name = mount.name.as_str();
    let Ok(MountConfig { access, .. }) = &mount.info().config else {
        return require_root(
            caller,
            &format!("use mount {name}, whose config is invalid"),
        );
    };
    if may_control(caller, access) || polkit_grants(conn, caller, name, action).await {
        return Ok(());
    }
    Err(Error::AccessDenied(format!(
        "user {} may not use mount {name} for this (it needs {}); ask an administrator to add the user or one of its groups to [access] in the mount's config, or to grant {} for mount {name} by a polkit rule",
        caller.describe(),
        action.id(),
        action.id()
    )))
}

/// Whether polkit authorizes `caller` for `action` on mount `name`,
/// without asking the user (the supervisor has no one to ask). No polkit
/// on the bus (a session bus, a system without it) grants nothing.
async fn polkit_grants(
    conn: &zbus::Connection,
    caller: &Caller,
    name: &str,
    action: Action,
) -> bool {
    let Some(bus_name) = &caller.bus_name else {
        return false;
    };
    let subject_name = match OwnedValue::try_from(Value::from(bus_name.as_str())) {
        Ok(v) => v,
        Err(_) => return false,
    };
    let subject = Subject {
        subject_kind: "system-bus-name".into(),
        subject_details: HashMap::from([("name".to_owned(), subject_name)]),
    };
    let details = HashMap::from([("mount", name)]);
    let answer = match AuthorityProxy::new(conn).await {
        Ok(polkit) => {
            polkit
                .check_authorization(&subject, action.id(), &details, Default::default(), "")
                .await
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok(r) => r.is_authorized,
        Err(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            false
        }
        Err(e) => {
            tracing::warn!(
                action = action.id(),
                mount = name,
                "polkit did not answer: {e}; granting nothing"
            );
            false
        }
    }
}

/// Whether `caller` may control a mount with `access` (root always may).
pub fn may_control(caller: &Caller, access: &Access) -> bool {
    if caller.is_root() {
        return true;
    }
    let user_name = nix::unistd::User::from_uid(caller.uid.into())
        .ok()
        .flatten()
        .map(|u| u.name);
    let user_ok = access
        .users
        .iter()
        .any(|u| Some(u) == user_name.as_ref() || u.parse::<u32>().ok() == Some(caller.uid));
    let group_ok = access.groups.iter().any(|g| {
        let gid = g.parse::<u32>().ok().or_else(|| {
            nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        });
        gid.is_some_and(|gid| caller.gids.contains(&gid))
    });
    user_ok || group_ok
}

/// Refuses unless `caller` is root.
pub fn require_root(caller: &Caller, what: &str) -> Result<(), Error> {
    if caller.is_root() {
        Ok(())
    } else {
        Err(Error::AccessDenied(format!(
            "only root may {what} (caller uid {})",
            caller.uid
        )))
    }
}

/// A process held by a pidfd: it cannot be confused with a later process
/// that reuses its pid.
pub struct HeldProcess {
    pid: i32,
    pidfd: OwnedFd,
}

impl HeldProcess {
    /// Opens process `pid`.
    pub fn open(pid: u32) -> Result<HeldProcess, Error> {
        let pid = i32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Error::InvalidArgument(format!("{pid} is not a valid pid")))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ESRCH) {
                Error::NotFound(format!("no process {pid}; check the pid"))
            } else {
                Error::Io(format!("cannot open process {pid}: {e}"))
            });
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(HeldProcess { pid, pidfd })
    }

    /// Whether the process is still the one opened (not exited).
    pub fn alive(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: signal 0 only checks; the pidfd is ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        // EPERM: it exists but we may not signal it (no CAP_KILL).
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Sends SIGKILL and waits up to `timeout` for the process to exit
    /// (its pidfd turns readable). True once it has.
    pub fn kill_and_wait(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: SIGKILL through our pidfd, no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) == 1 }
    }

    /// The process's real uid, read while the pidfd proves it is the same
    /// process.
    pub fn real_uid(&self) -> Result<u32, Error> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid));
        let uid = status.ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        });
        match uid {
            Some(u) if self.alive() => Ok(u),
            _ => Err(Error::NotFound(format!(
                "no process {} (it exited); check the pid",
                self.pid
            ))),
        }
    }
}

/// Refuses unless `caller` owns process `pid` (root owns everything).
/// Returns the held process so the caller can check it is still the same
/// process after binding.
pub fn require_owns_pid(caller: &Caller, pid: u32) -> Result<HeldProcess, Error> {
    let p = HeldProcess::open(pid)?;
    if !caller.is_root() {
        let owner = p.real_uid()?;
        if owner != caller.uid {
            return Err(Error::AccessDenied(format!(
                "process {pid} belongs to uid {owner}, not to you (uid {}); you may bind only your own processes",
                caller.uid
            )));
        }
    }
    Ok(p)
}

/// Refuses unless `caller` owns the cgroup's directory.
pub fn require_owns_cgroup(caller: &Caller, cgroup: &str) -> Result<(), Error> {
    if caller.is_root() {
        return Ok(());
    }
    let dir = agentfs_mount_worker::binding::cgroup_dir(cgroup)
        .map_err(|e| Error::InvalidArgument(e.message))?;
    let meta = fs::metadata(&dir).map_err(|e| {
        Error::NotFound(format!(
            "no cgroup {cgroup} ({}: {e}); create it first",
            dir.display()
        ))
    })?;
    if meta.uid() != caller.uid {
        return Err(Error::AccessDenied(format!(
            "cgroup {cgroup} belongs to uid {}, not to you (uid {}); you may bind only cgroups delegated to you",
            meta.uid(),
            caller.uid
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_by_user_name_uid_and_group() {
        let nobody = Caller {
            uid: 65534,
            gids: vec![65534],
            bus_name: None,
        };
        let none = Access::default();
        assert!(!may_control(&nobody, &none));
        assert!(may_control(
            &Caller {
                uid: 0,
                gids: vec![],
                bus_name: None,
            },
            &none
        ));
        let by_name = Access {
            users: vec!["nobody".into()],
            groups: vec![],
        };
        assert!(may_control(&nobody, &by_name));
        let by_uid = Access {
            users: vec!["65534".into()],
            groups: vec![],
        };
        assert!(may_control(&nobody, &by_uid));
        let by_group = Access {
            users: vec![],
            groups: vec!["nogroup".into()],
        };
        assert!(may_control(&nobody, &by_group));
        let other = Access {
            users: vec!["root".into()],
            groups: vec!["root".into()],
        };
        assert!(!may_control(&nobody, &other));
    }

    #[test]
    fn a_process_is_held_by_its_pidfd() {
        let me = HeldProcess::open(std::process::id()).unwrap();
        assert!(me.alive());
        assert_eq!(me.real_uid().unwrap(), nix::unistd::getuid().as_raw());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let held = HeldProcess::open(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!held.alive());
        assert!(matches!(
            HeldProcess::open(i32::MAX as u32),
            Err(Error::NotFound(_))
        ));
    }
}
