//! `mount-start --follow`: the main process of `agentfs@NAME.service`
//! (Type=notify). Starts the mount, tells systemd it is ready, then stays
//! while the mount lives:
//!
//! * `State` becomes `failed`: prints `LastError`, exits 1;
//! * `State` becomes `stopped`: exits 0 (`agentfsctl mount-stop`, the
//!   unit's ExecStop, did that) — but 1 if the supervisor restarted
//!   meanwhile and lost the mount;
//! * SIGTERM (or SIGINT): exits 0;
//! * `org.agentfs` leaves the bus: waits up to 60 s for it to come back
//!   (systemd restarts it), then looks at the state again; exits 1 if it
//!   does not come back.

use std::collections::HashMap;
use std::time::Duration;

use futures_lite::StreamExt;
use tokio::signal::unix::{Signal, SignalKind, signal};
use zbus::message::{Message, Type};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{MatchRule, MessageStream, fdo};

use crate::bus::{self, Failure, Kind, MountProps};
use crate::commands::Ctx;

/// How long to wait for the supervisor to come back.
pub const COMEBACK: Duration = Duration::from_secs(60);

/// What to do after looking at the mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Keep following.
    Stay,
    /// The supervisor is gone: wait for it.
    Gone,
    /// Exit with this status.
    Exit(u8),
}

/// The signals that end the follower.
struct Stops {
    term: Signal,
    int: Signal,
}

impl Stops {
    fn new() -> Result<Stops, Failure> {
        let f = |e: std::io::Error| Failure::new(format!("cannot handle signals: {e}"));
        Ok(Stops {
            term: signal(SignalKind::terminate()).map_err(f)?,
            int: signal(SignalKind::interrupt()).map_err(f)?,
        })
    }

    /// Resolves when SIGTERM or SIGINT arrives.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

fn status(s: &str) {
    notify(&[sd_notify::NotifyState::Status(s)]);
}

/// Follows the mount `name`; returns the exit status.
pub async fn follow(ctx: &Ctx, name: &str) -> Result<u8, Failure> {
    // Handle SIGTERM before anything else: the unit may be stopped while
    // the mount is starting.
    let mut stops = Stops::new()?;
    let conn = &ctx.conn;
    let err = |e: zbus::Error| ctx.err(e);

    // Watch the owner of org.agentfs from the start, so that no change
    // goes unseen.
    let owner_rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender("org.freedesktop.DBus")
        .map_err(err)?
        .interface("org.freedesktop.DBus")
        .map_err(err)?
        .member("NameOwnerChanged")
        .map_err(err)?
        .add_arg(bus::SERVICE)
        .map_err(err)?
        .build();
    let mut owners = MessageStream::for_match_rule(owner_rule, conn, None)
        .await
        .map_err(err)?;

    status(&format!("starting mount {name}"));
    let mgr = bus::manager(conn).await.map_err(err)?;
    let path = {
        let start = mgr.start_mount(name);
        tokio::pin!(start);
        let mut stop_asked = false;
        let r = loop {
            tokio::select! {
                r = &mut start => break r,
                _ = stops.recv(), if !stop_asked => {
                    // Stopping a mount that is starting is `Busy`: let the
                    // start finish, then stop it (ExecStop does not run
                    // for a unit that never became ready).
                    eprintln!("agentfsctl: asked to stop while mount {name} is starting; stopping it once it runs");
                    stop_asked = true;
                }
            }
        };
        if stop_asked {
            notify(&[sd_notify::NotifyState::Stopping]);
            if r.is_ok() {
                mgr.stop_mount(name).await.map_err(err)?;
                return Ok(0);
            }
        }
        match r {
            Ok(p) => p,
            Err(e) => {
                let f = err(e);
                status(&format!("cannot start: {}", f.message));
                return Err(f);
            }
        }
    };

    // Every signal of the mount object (PropertiesChanged, WorkerRestarted)
    // from whoever owns org.agentfs.
    let mount_rule = MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(bus::SERVICE)
        .map_err(err)?
        .path(path.clone())
        .map_err(err)?
        .build();
    let mut signals = MessageStream::for_match_rule(mount_rule, conn, None)
        .await
        .map_err(err)?;

    let dbus = fdo::DBusProxy::new(conn).await.map_err(err)?;
    let mut watch = Watch {
        ctx,
        name,
        path: &path,
        last: String::new(),
        restarted_service: false,
        ready: false,
    };
    loop {
        let next = tokio::select! {
            n = watch.check() => n,
            _ = stops.recv() => {
                notify(&[sd_notify::NotifyState::Stopping]);
                return Ok(0);
            }
        };
        match next {
            Next::Stay => {}
            Next::Exit(code) => return Ok(code),
            Next::Gone => {
                if let Some(code) = wait_back(&dbus, &mut owners, &mut stops).await {
                    return Ok(code);
                }
                watch.restarted_service = true;
                continue;
            }
        }
        // Wait for something that may have changed the state.
        loop {
            tokio::select! {
                _ = stops.recv() => {
                    notify(&[sd_notify::NotifyState::Stopping]);
                    return Ok(0);
                }
                m = signals.next() => match m {
                    Some(Ok(msg)) => if watch.note(&msg) { break },
                    Some(Err(_)) => {}
                    None => return Err(Failure::new("lost the connection to the bus")),
                },
                m = owners.next() => match m {
                    Some(Ok(msg)) => {
                        let Ok((_, _, new)) = msg.body().deserialize::<(String, String, String)>() else {
                            continue;
                        };
                        if !new.is_empty() {
                            // Replaced without a gap: a new supervisor.
                            watch.restarted_service = true;
                        }
                        break;
                    }
                    Some(Err(_)) => {}
                    None => return Err(Failure::new("lost the connection to the bus")),
                },
            }
        }
    }
}

/// What the follower knows about the mount.
struct Watch<'a> {
    ctx: &'a Ctx,
    name: &'a str,
    path: &'a OwnedObjectPath,
    /// The state last seen.
    last: String,
    /// The supervisor left the bus (or was replaced) since the start.
    restarted_service: bool,
    /// READY=1 was sent.
    ready: bool,
}

impl Watch<'_> {
    /// Looks at a signal of the mount object; whether the state may have
    /// changed.
    fn note(&self, msg: &Message) -> bool {
        let hdr = msg.header();
        let member = hdr.member().map(|m| m.as_str()).unwrap_or_default();
        match member {
            "WorkerRestarted" => {
                if let Ok((n, reason)) = msg.body().deserialize::<(u32, String)>() {
                    eprintln!(
                        "agentfsctl: mount {}: worker restarted ({n} so far): {reason}",
                        self.name
                    );
                }
                false
            }
            "PropertiesChanged" => {
                type Body = (String, HashMap<String, OwnedValue>, Vec<String>);
                match msg.body().deserialize::<Body>() {
                    Ok((iface, changed, invalidated)) => {
                        iface == bus::MOUNT_INTERFACE
                            && (changed.contains_key("State")
                                || invalidated.iter().any(|p| p == "State"))
                    }
                    Err(_) => true,
                }
            }
            _ => false,
        }
    }

    /// Reads the state and decides.
    async fn check(&mut self) -> Next {
        let p: MountProps = match bus::mount_props(&self.ctx.conn, self.path).await {
            Ok(p) => p,
            Err(e) => {
                let (kind, msg) = bus::classify(&e, self.ctx.user);
                return match kind {
                    Kind::ServiceGone => Next::Gone,
                    Kind::NoObject => {
                        eprintln!(
                            "agentfsctl: mount {} is no longer known to the AgentFS service ({msg})",
                            self.name
                        );
                        Next::Exit(1)
                    }
                    _ => {
                        eprintln!(
                            "agentfsctl: cannot read the state of mount {}: {msg}",
                            self.name
                        );
                        Next::Exit(1)
                    }
                };
            }
        };
        if !self.ready {
            // StartMount returned: the mount ran.
            self.ready = true;
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!(
                    "mounted {} at {}",
                    p.source, p.mount_point
                )),
            ]);
        }
        let changed = p.state != self.last;
        let was = std::mem::replace(&mut self.last, p.state.clone());
        match p.state.as_str() {
            "running" => {
                if changed && !was.is_empty() {
                    eprintln!("agentfsctl: mount {} is running again", self.name);
                    status(&format!("mounted {} at {}", p.source, p.mount_point));
                }
                Next::Stay
            }
            "failed" => {
                let why = if p.last_error.is_empty() {
                    "no reason given".to_owned()
                } else {
                    p.last_error.clone()
                };
                eprintln!("agentfsctl: mount {} failed: {why}", self.name);
                status(&format!("failed: {why}"));
                Next::Exit(1)
            }
            "stopped" if self.restarted_service && was != "stopping" => {
                eprintln!(
                    "agentfsctl: mount {} is stopped after the AgentFS service restarted",
                    self.name
                );
                status("stopped: the AgentFS service restarted");
                Next::Exit(1)
            }
            "stopped" => {
                status("stopped");
                Next::Exit(0)
            }
            other => {
                if changed {
                    if other == "restarting" && !p.last_error.is_empty() {
                        // WorkerRestarted tells the journal why.
                        status(&format!("restarting: {}", p.last_error));
                    } else {
                        status(other);
                    }
                }
                Next::Stay
            }
        }
    }
}

/// Waits up to [`COMEBACK`] for `org.agentfs` to have an owner again.
/// `None` when it is back, else the exit status.
async fn wait_back(
    dbus: &fdo::DBusProxy<'_>,
    owners: &mut MessageStream,
    stops: &mut Stops,
) -> Option<u8> {
    eprintln!(
        "agentfsctl: the AgentFS service left the bus; waiting up to {} s for it to come back",
        COMEBACK.as_secs()
    );
    status("waiting for the AgentFS service to come back");
    let deadline = tokio::time::Instant::now() + COMEBACK;
    // It may have come back before the subscription saw it.
    let name = zbus::names::BusName::from_static_str(bus::SERVICE).expect("a valid bus name");
    if dbus.name_has_owner(name).await.unwrap_or(false) {
        return None;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!(
                    "agentfsctl: the AgentFS service did not come back within {} s",
                    COMEBACK.as_secs()
                );
                status("the AgentFS service is gone");
                return Some(1);
            }
            _ = stops.recv() => return Some(0),
            m = owners.next() => match m {
                Some(Ok(msg)) => {
                    if let Ok((_, _, new)) = msg.body().deserialize::<(String, String, String)>() {
                        if !new.is_empty() {
                            return None;
                        }
                    }
                }
                Some(Err(_)) => {}
                None => {
                    eprintln!("agentfsctl: lost the connection to the bus");
                    return Some(1);
                }
            },
        }
    }
}
