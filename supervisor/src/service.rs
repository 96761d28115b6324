//! The supervisor's registry of mounts: reading the config directory,
//! starting and stopping mounts by name, and the one-line status.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use zbus::zvariant::OwnedObjectPath;

use crate::config::{self, Defaults, MountConfig};
use crate::fdstore::{self, Parked};
use agentfs_mount_worker::handoff;

use crate::launch::{self, Connection};
use crate::mounts::{Mount, OnChange, State};

/// What the supervisor was started with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where `<name>.toml` files are.
    pub config_dir: PathBuf,
    /// Defaults for what a config leaves out.
    pub defaults: Defaults,
    /// The worker executable.
    pub worker_exe: PathBuf,
}

/// Every known mount, by name.
pub struct Registry {
    /// Start-up settings.
    pub settings: Settings,
    mounts: tokio::sync::Mutex<BTreeMap<String, Arc<Mount>>>,
    on_change: OnChange,
}

/// What a reload changed on the bus.
#[derive(Default)]
pub struct Changes {
    /// Mounts to add to the bus.
    pub added: Vec<Arc<Mount>>,
    /// Mounts to remove from the bus.
    pub removed: Vec<Arc<Mount>>,
}

impl Registry {
    /// An empty registry; call [`Registry::reload`] to read the configs.
    pub fn new(settings: Settings, on_change: OnChange) -> Registry {
        Registry {
            settings,
            mounts: tokio::sync::Mutex::new(BTreeMap::new()),
            on_change,
        }
    }

    fn load(&self, name: &str) -> Result<MountConfig, config::ConfigError> {
        config::load(&self.settings.config_dir, name, &self.settings.defaults)
    }

    /// Reads the config directory again: new files add mounts, changed
    /// files apply at the next start, removed files drop mounts that are
    /// down (running ones stay until stopped).
    pub async fn reload(&self) -> std::io::Result<Changes> {
        let names = config::names_in(&self.settings.config_dir)?;
        let mut mounts = self.mounts.lock().await;
        let mut changes = Changes::default();
        for name in &names {
            let cfg = self.load(name);
            if let Err(e) = &cfg {
                tracing::error!("{e}");
            }
            match mounts.get(name) {
                Some(m) => m.set_config(cfg),
                None => {
                    let m =
                        Mount::new(name.clone(), object_path(name), cfg, self.on_change.clone());
                    mounts.insert(name.clone(), m.clone());
                    changes.added.push(m);
                }
            }
        }
        let gone: Vec<String> = mounts
            .iter()
            .filter(|(n, m)| !names.contains(n) && m.is_down())
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            if let Some(m) = mounts.remove(&n) {
                changes.removed.push(m);
            }
        }
        Ok(changes)
    }

    /// The mounts, by name.
    pub async fn list(&self) -> Vec<Arc<Mount>> {
        self.mounts.lock().await.values().cloned().collect()
    }

    /// The mount `name`, added if its config file appeared since the last
    /// reload. `None`: no such file.
    pub async fn find_or_add(&self, name: &str) -> (Option<Arc<Mount>>, bool) {
        let mut mounts = self.mounts.lock().await;
        if let Some(m) = mounts.get(name) {
            return (Some(m.clone()), false);
        }
        if !config::valid_mount_name(name)
            || !config::file_of(&self.settings.config_dir, name).exists()
        {
            return (None, false);
        }
        let m = Mount::new(
            name.to_owned(),
            object_path(name),
            self.load(name),
            self.on_change.clone(),
        );
        mounts.insert(name.to_owned(), m.clone());
        (Some(m), true)
    }

    /// Starts `mount` with its config file as it is now.
    pub async fn start(&self, mount: &Arc<Mount>) -> Result<(), String> {
        let cfg = self.load(&mount.name);
        mount.start(cfg, self.settings.worker_exe.clone()).await
    }

    /// Takes over the mounts a previous supervisor left running (parked in
    /// systemd's descriptor store), each with a new worker. A connection
    /// whose mount is gone, or whose config no longer reads, is dropped.
    pub async fn resume(&self, parked: HashMap<String, Parked>) {
        for (name, p) in parked {
            let (Some(mount), _) = self.find_or_add(&name).await else {
                tracing::warn!(mount = %name, "a parked connection of a mount no longer configured was dropped");
                fdstore::discard(&name, p);
                continue;
            };
            let cfg = self.load(&name);
            let Ok(c) = &cfg else {
                tracing::error!(mount = %name, "cannot take the mount over: its config does not read");
                fdstore::discard(&name, p);
                continue;
            };
            let made_for = handoff::identity_of(p.fds.journal.as_fd()).unwrap_or_default();
            if made_for != launch::identity(c) {
                tracing::warn!(
                    mount = %name,
                    "the parked connection was made for another source or state directory \
                     ({}); the config changed since: mounting afresh",
                    String::from_utf8_lossy(&made_for).replace('\0', ", ")
                );
                fdstore::discard(&name, p);
                if let Err(e) = mount.start(cfg, self.settings.worker_exe.clone()).await {
                    tracing::error!(mount = %name, "cannot start: {e}");
                }
                continue;
            }
            let dev = p.dev;
            let Some(conn) = Connection::adopt(dev, &c.mountpoint, p.fds) else {
                tracing::warn!(mount = %name, "the mount a previous supervisor left is gone from {}", c.mountpoint.display());
                fdstore::remove(&name, dev);
                continue;
            };
            if let Err(e) = mount
                .resume(cfg, self.settings.worker_exe.clone(), conn)
                .await
            {
                tracing::error!(mount = %name, "cannot take the mount over: {e}");
            }
        }
    }

    /// Stops every mount (at exit).
    pub async fn stop_all(&self) {
        let mut set = tokio::task::JoinSet::new();
        for m in self.list().await {
            set.spawn(async move { m.stop().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// One line for systemd's STATUS=.
    pub async fn summary(&self) -> String {
        summary_of(&self.list().await)
    }
}

/// "2 mounts: 1 running, 1 stopped".
pub fn summary_of(mounts: &[Arc<Mount>]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for m in mounts {
        *counts.entry(m.info().state.as_str()).or_default() += 1;
    }
    if mounts.is_empty() {
        return "no mounts configured".to_owned();
    }
    let order = [
        State::Running,
        State::Starting,
        State::Restarting,
        State::Stopping,
        State::Failed,
        State::Stopped,
    ];
    let parts: Vec<String> = order
        .iter()
        .filter_map(|s| {
            counts
                .get(s.as_str())
                .map(|n| format!("{n} {}", s.as_str()))
        })
        .collect();
    format!(
        "{} mount{}: {}",
        mounts.len(),
        if mounts.len() == 1 { "" } else { "s" },
        parts.join(", ")
    )
}

/// `/org/agentfs/mount/<escaped name>`, escaped like sd_bus_path_encode.
pub fn object_path(name: &str) -> OwnedObjectPath {
    let mut p = String::from("/org/agentfs/mount/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(p).expect("escaped paths are valid object paths")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_escape_like_systemd() {
        assert_eq!(object_path("agent1").as_str(), "/org/agentfs/mount/agent1");
        assert_eq!(
            object_path("agent-1").as_str(),
            "/org/agentfs/mount/agent_2d1"
        );
        assert_eq!(
            object_path("a.b_c").as_str(),
            "/org/agentfs/mount/a_2eb_5fc"
        );
    }
}
