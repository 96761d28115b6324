//! `agentfs-supervisor`: owns `org.agentfs` on D-Bus, reads the mount
//! configs, mounts, and runs one `agentfs-mount-worker` per mount.
//!
//! A call travels: bus -> [`bus`] (authorization, D-Bus types) ->
//! [`service::Registry`] / [`mounts::Mount`] (life cycle) -> [`launch`]
//! (mount(2), spawning the worker) or the worker's control socket.

mod auth;
mod bus;
mod config;
mod fdstore;
mod launch;
mod mounts;
mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Defaults;
use crate::mounts::{Mount, OnChange};
use crate::service::{Registry, Settings};

/// Serve the AgentFS mounts configured on this machine over D-Bus.
///
/// Owns `org.agentfs` on the system bus (the session bus with --user).
/// Mounts start with `StartMount` (`systemctl start agentfs@NAME` or
/// `agentfsctl mount-start NAME`). SIGHUP reads the configs again; SIGTERM
/// and SIGINT unmount everything and exit.
#[derive(Parser, Debug)]
#[command(name = "agentfs-supervisor", version)]
struct Cli {
    /// Use the session bus and per-user paths instead of the system's.
    #[arg(long)]
    user: bool,
    /// Connect to this bus address instead (tests, private buses).
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
    /// Where the `<name>.toml` mount configs are
    /// [default: /etc/agentfs/mounts, with --user $XDG_CONFIG_HOME/agentfs/mounts].
    #[arg(long, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    /// Where default state directories go
    /// [default: /var/lib/agentfs, with --user $XDG_STATE_HOME/agentfs].
    #[arg(long, value_name = "DIR")]
    state_root: Option<PathBuf>,
    /// The worker executable [default: agentfs-mount-worker next to this
    /// program, else /usr/libexec/agentfs/agentfs-mount-worker].
    #[arg(long, value_name = "PATH")]
    worker: Option<PathBuf>,
}

const BUS_NAME: &str = "org.agentfs";
const MANAGER_PATH: &str = "/org/agentfs";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists (see fdstore::take).
    let parked = fdstore::take();
    agentfs_mount_worker::logging::init("agentfs-supervisor");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentfs-supervisor: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, parked)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&e)]);
            ExitCode::FAILURE
        }
    }
}

fn settings(cli: &Cli) -> Result<Settings, String> {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    let xdg = |var: &str, fallback: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home().map(|h| h.join(fallback)))
            .ok_or_else(|| format!("--user needs ${var} or $HOME to find its directories"))
    };
    let config_dir = match (&cli.config_dir, cli.user) {
        (Some(d), _) => d.clone(),
        (None, true) => xdg("XDG_CONFIG_HOME", ".config")?.join("agentfs/mounts"),
        (None, false) => PathBuf::from("/etc/agentfs/mounts"),
    };
    let state_root = match (&cli.state_root, cli.user) {
        (Some(d), _) => d.clone(),
        (None, true) => xdg("XDG_STATE_HOME", ".local/state")?.join("agentfs"),
        (None, false) => PathBuf::from("/var/lib/agentfs"),
    };
    let worker_exe = match &cli.worker {
        Some(w) => w.clone(),
        None => default_worker(),
    };
    Ok(Settings {
        config_dir,
        defaults: Defaults { state_root },
        worker_exe,
    })
}

fn default_worker() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("agentfs-mount-worker")));
    match beside {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("/usr/libexec/agentfs/agentfs-mount-worker"),
    }
}

async fn run(cli: Cli, parked: HashMap<String, fdstore::Parked>) -> Result<(), String> {
    let settings = settings(&cli)?;
    if !nix::unistd::geteuid().is_root() {
        tracing::warn!("not running as root: mounting will fail (mount(2) needs CAP_SYS_ADMIN)");
    }
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Arc<Mount>, Option<(u32, String)>)>();
    let on_change: OnChange = Arc::new(move |m, restarted| {
        let _ = tx.send((m.clone(), restarted));
    });
    let registry = Arc::new(Registry::new(settings.clone(), on_change));

    let builder = match (&cli.bus_address, cli.user) {
        (Some(a), _) => zbus::connection::Builder::address(a.as_str()),
        (None, true) => zbus::connection::Builder::session(),
        (None, false) => zbus::connection::Builder::system(),
    }
    .map_err(|e| format!("cannot reach the D-Bus bus: {e}"))?;
    let conn = builder
        .serve_at(
            MANAGER_PATH,
            bus::Manager {
                registry: registry.clone(),
            },
        )
        .and_then(|b| b.serve_at(MANAGER_PATH, zbus::fdo::ObjectManager))
        .map_err(|e| format!("cannot set up the D-Bus objects: {e}"))?
        .build()
        .await
        .map_err(|e| format!("cannot connect to the D-Bus bus: {e}"))?;

    // Objects first, then the name: a client that sees the name finds them.
    bus::reload(&registry, &conn).await.map_err(|e| {
        format!(
            "cannot read the config directory {}: {e}",
            settings.config_dir.display()
        )
    })?;
    // Mounts a crashed predecessor left: served again before anyone can ask.
    registry.resume(parked).await;
    conn.request_name_with_flags(BUS_NAME, zbus::fdo::RequestNameFlags::DoNotQueue.into())
        .await
        .map_err(|e| {
            format!("cannot own {BUS_NAME} on the bus: {e}; is another agentfs-supervisor running?")
        })
        .and_then(|reply| match reply {
            zbus::fdo::RequestNameReply::PrimaryOwner
            | zbus::fdo::RequestNameReply::AlreadyOwner => Ok(()),
            _ => Err(format!(
                "{BUS_NAME} is owned by another process; is another agentfs-supervisor running?"
            )),
        })?;

    // Property changes of mounts go out on the bus and into STATUS=.
    let announcer = {
        let (conn, registry) = (conn.clone(), registry.clone());
        tokio::spawn(async move {
            while let Some((mount, restarted)) = rx.recv().await {
                bus::announce(&conn, &mount, restarted).await;
                notify_status(&registry.summary().await);
            }
        })
    };
    spawn_watchdog();
    let summary = registry.summary().await;
    tracing::info!(
        config_dir = %settings.config_dir.display(),
        "ready on the bus as {BUS_NAME}: {summary}"
    );
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&summary),
    ]);

    let signal_err = |e: std::io::Error| format!("cannot install signal handlers: {e}");
    let mut term = signal(SignalKind::terminate()).map_err(signal_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(signal_err)?;
    let mut hup = signal(SignalKind::hangup()).map_err(signal_err)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reading {} again", settings.config_dir.display());
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                if let Err(e) = bus::reload(&registry, &conn).await {
                    tracing::error!("cannot read {}: {e}", settings.config_dir.display());
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
    tracing::info!("stopping every mount");
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: unmounting"),
    ]);
    registry.stop_all().await;
    // Let the last property changes reach the bus.
    tokio::time::sleep(Duration::from_millis(50)).await;
    announcer.abort();
    tracing::info!("all mounts stopped; exiting");
    Ok(())
}

fn notify_status(summary: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(summary)]);
}

/// Pings systemd's watchdog at half its interval, from the runtime: a
/// supervisor whose runtime is stuck stops pinging and is restarted.
fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = interval / 2;
    tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(every).await;
        }
    });
}
