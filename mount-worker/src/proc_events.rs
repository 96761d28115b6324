//! Fork and exit events from the kernel's process connector (netlink,
//! root only): how a pid binding follows every child its process forks,
//! even one whose parent exits before the child first touches the mount
//! (its `PPid` then no longer leads to the bound process), and learns when
//! the processes it covers are gone. See [`crate::binding`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_CONNECTOR: i32 = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct cn_msg` without its data.
const CN_MSG_HDR: usize = 20;
/// `struct proc_event` up to its event data (what, cpu, timestamp).
const PROC_EVENT_HDR: usize = 16;

fn cvt(ret: isize) -> io::Result<isize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// One event of [`ProcEvents`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// Process `parent` forked the new process `child` (thread group ids;
    /// new threads are not reported).
    Fork {
        /// The forking process.
        parent: i32,
        /// The new process.
        child: i32,
    },
    /// A thread of process `tgid` is exiting (the last one or not: the
    /// kernel reports every thread). The process may still be in `/proc`
    /// for a moment, then as a zombie until its parent reaps it.
    Exit {
        /// The thread's process.
        tgid: i32,
    },
}

/// A subscription to the kernel's process events.
pub struct ProcEvents {
    sock: OwnedFd,
}

impl ProcEvents {
    /// Subscribes (needs CAP_NET_ADMIN).
    pub fn subscribe() -> io::Result<ProcEvents> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        } as isize)?;
        // SAFETY: a fresh descriptor.
        let sock = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        cvt(unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        } as isize)?;
        let mut msg = Vec::with_capacity(NLMSG_HDR + CN_MSG_HDR + 4);
        msg.extend(((NLMSG_HDR + CN_MSG_HDR + 4) as u32).to_ne_bytes());
        msg.extend(NLMSG_DONE.to_ne_bytes());
        msg.extend(0u16.to_ne_bytes()); // flags
        msg.extend(0u32.to_ne_bytes()); // seq
        msg.extend(std::process::id().to_ne_bytes());
        msg.extend(CN_IDX_PROC.to_ne_bytes());
        msg.extend(CN_VAL_PROC.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes()); // seq
        msg.extend(0u32.to_ne_bytes()); // ack
        msg.extend(4u16.to_ne_bytes()); // len of data
        msg.extend(0u16.to_ne_bytes()); // flags
        msg.extend(PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: msg is valid for its length.
        cvt(unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) })?;
        Ok(ProcEvents { sock })
    }

    /// Whether events wait to be read.
    pub fn pending(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: a one-byte buffer; MSG_PEEK leaves the event queued.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }

    /// Waits for the next batch of events and calls `on` with each fork
    /// and exit in it.
    pub fn next(&self, mut on: impl FnMut(ProcEvent)) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        // SAFETY: buf is valid for its length.
        let n = match cvt(unsafe {
            libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        }) {
            Ok(n) => n as usize,
            // Events were dropped (a burst of forks): the parent chain walk
            // in `binding` still covers the processes concerned, and any
            // later exit of a bound process looks at all of them.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        let u32_at = |b: &[u8], i: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
        };
        let mut pos = 0;
        while pos + NLMSG_HDR <= n {
            let len = u32_at(&buf, pos).unwrap_or(0) as usize;
            if len < NLMSG_HDR || pos + len > n {
                break;
            }
            let ev = pos + NLMSG_HDR + CN_MSG_HDR;
            let data = ev + PROC_EVENT_HDR;
            let f = |k: usize| u32_at(&buf, data + 4 * k).map(|v| v as i32);
            match u32_at(&buf, ev) {
                // parent_pid, parent_tgid, child_pid, child_tgid
                Some(PROC_EVENT_FORK) => {
                    if let (Some(parent), Some(cpid), Some(child)) = (f(1), f(2), f(3)) {
                        if cpid == child {
                            on(ProcEvent::Fork { parent, child });
                        }
                    }
                }
                // process_pid, process_tgid, exit_code, ...
                Some(PROC_EVENT_EXIT) => {
                    if let Some(tgid) = f(1) {
                        on(ProcEvent::Exit { tgid });
                    }
                }
                _ => {}
            }
            pos += (len + 3) & !3;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn reports_the_fork_and_the_exit_of_a_process() {
        let events = ProcEvents::subscribe().expect("subscribe (needs root)");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                if events
                    .next(|e| {
                        let _ = tx.send(e);
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let pid = child.id() as i32;
        let seen = |want: ProcEvent| {
            (0..10_000)
                .map_while(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
                .any(|e| e == want)
        };
        let forked = seen(ProcEvent::Fork {
            parent: std::process::id() as i32,
            child: pid,
        });
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(forked, "no fork event for {pid}");
        assert!(
            seen(ProcEvent::Exit { tgid: pid }),
            "no exit event for {pid}"
        );
    }
}
