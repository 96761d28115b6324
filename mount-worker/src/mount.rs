//! Mounting and unmounting the FUSE file system, and clearing stale mounts.
//!
//! The worker mounts with mount(2) itself (it runs as root) rather than
//! through fusermount3, so that the standalone path and the supervisor path
//! (`--fuse-fd`) both end in the same place: a /dev/fuse descriptor that the
//! session serves.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::StartupError;

/// File system type shown in /proc/mounts: `fuse.agentfs`.
pub const FSTYPE: &str = "fuse.agentfs";

/// Makes `path` absolute and lexically normal without touching its last
/// component (which may be a dead mount that fails every stat with ENOTCONN).
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    let Some(name) = out.file_name().map(|n| n.to_owned()) else {
        return Ok(out);
    };
    let parent = out.parent().unwrap_or(Path::new("/"));
    Ok(fs::canonicalize(parent)?.join(name))
}

/// A FUSE mount listed in /proc/self/mountinfo.
struct FuseMount {
    mountpoint: PathBuf,
    fstype: String,
    dev: u64,
}

/// Every FUSE mount in /proc/self/mountinfo, oldest first.
fn fuse_mounts() -> io::Result<Vec<FuseMount>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let (major, minor) = f.get(2)?.split_once(':')?;
            let fstype = f.get(sep + 1)?;
            if !fstype.starts_with("fuse") {
                return None;
            }
            Some(FuseMount {
                mountpoint: PathBuf::from(unescape(f.get(4)?)),
                fstype: fstype.to_string(),
                dev: nix::sys::stat::makedev(major.parse().ok()?, minor.parse().ok()?),
            })
        })
        .collect())
}

/// FUSE mounts stacked at exactly `path`, oldest first.
fn fuse_mounts_at(path: &Path) -> io::Result<Vec<FuseMount>> {
    Ok(fuse_mounts()?
        .into_iter()
        .filter(|m| m.mountpoint == path)
        .collect())
}

/// Where the FUSE mount with device number `dev` is mounted (a mount
/// can be bind-mounted in several places).
pub fn mountpoints_of(dev: u64) -> io::Result<Vec<PathBuf>> {
    Ok(fuse_mounts()?
        .into_iter()
        .filter(|m| m.dev == dev)
        .map(|m| m.mountpoint)
        .collect())
}

/// Device number of the topmost FUSE mount at `mountpoint`, read from
/// mountinfo (a stat would send a request to the mount itself).
pub fn device_of(mountpoint: &Path) -> io::Result<u64> {
    fuse_mounts_at(mountpoint)?
        .last()
        .map(|m| m.dev)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

/// Whether anything is mounted inside the mount with device number `dev`
/// (in this mount namespace).
pub fn has_mounts_inside(dev: u64) -> io::Result<bool> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    // mount id, parent id, major:minor
    let mounts: Vec<(&str, &str, u64)> = info
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let (id, parent) = (f.next()?, f.next()?);
            let (major, minor) = f.next()?.split_once(':')?;
            let dev = nix::sys::stat::makedev(major.parse().ok()?, minor.parse().ok()?);
            Some((id, parent, dev))
        })
        .collect();
    let ours: Vec<&str> = mounts.iter().filter(|m| m.2 == dev).map(|m| m.0).collect();
    Ok(mounts.iter().any(|m| ours.contains(&m.1)))
}

/// Decodes the octal escapes of /proc/self/mountinfo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a FUSE mount's server answers to a request that no kernel cache can
/// answer (`statfs`). `None`: no answer within the timeout (a hung server).
fn probe(mountpoint: &Path) -> Option<io::Result<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = mountpoint.to_owned();
    // A hung server blocks the caller: probe from a thread we can abandon.
    std::thread::spawn(move || {
        let _ = tx.send(
            nix::sys::statfs::statfs(&path)
                .map(drop)
                .map_err(io::Error::from),
        );
    });
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}

/// Clears what a dead worker left at `mountpoint` (a FUSE mount whose server
/// is gone answers ENOTCONN), and refuses to stack on a live FUSE mount.
pub fn clear_stale(mountpoint: &Path) -> Result<(), StartupError> {
    loop {
        let mounts = fuse_mounts_at(mountpoint).map_err(StartupError::Proc)?;
        let Some(FuseMount { fstype, .. }) = mounts.last() else {
            return Ok(());
        };
        match probe(mountpoint) {
            Some(Err(e))
                if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) =>
            {
                tracing::warn!(
                    "detaching stale {fstype} mount at {} left by a worker that died",
                    mountpoint.display()
                );
                nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH).map_err(|e| {
                    StartupError::StaleMount(mountpoint.to_owned(), io::Error::from(e))
                })?;
            }
            _ => {
                return Err(StartupError::MountpointBusy(
                    mountpoint.to_owned(),
                    fstype.clone(),
                ));
            }
        }
    }
}

/// FUSE_NOTIFY_INC_EPOCH (Linux 6.16): every name the kernel cached, and
/// every one a lookup in flight will cache, is looked up again.
pub const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

/// Sends the kernel a notification that has no payload (fuser knows only
/// the older ones), in the host's byte order as all of FUSE: just `struct fuse_out_header` { len, error = the
/// notify code, unique = 0 }.
pub fn notify_bare(fuse: BorrowedFd<'_>, code: i32) -> io::Result<()> {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&code.to_ne_bytes());
    nix::unistd::write(fuse, &header)?;
    Ok(())
}

/// FUSE_NOTIFY_INVAL_ENTRY with FUSE_EXPIRE_ONLY (Linux 6.2): the kernel
/// keeps `name` in directory `parent` but looks it up again at its next
/// use; unlike an invalidation, this keeps what is mounted on it.
pub fn notify_expire_entry(fuse: BorrowedFd<'_>, parent: u64, name: &OsStr) -> io::Result<()> {
    const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
    const FUSE_EXPIRE_ONLY: u32 = 1;
    let name = name.as_bytes();
    let len = 16 + 16 + name.len() + 1;
    let mut msg = Vec::with_capacity(len);
    // struct fuse_out_header { len, error (the notify code), unique 0 }
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&FUSE_NOTIFY_INVAL_ENTRY.to_ne_bytes());
    msg.extend_from_slice(&0u64.to_ne_bytes());
    // struct fuse_notify_inval_entry_out { parent, namelen, flags }
    msg.extend_from_slice(&parent.to_ne_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    msg.extend_from_slice(&FUSE_EXPIRE_ONLY.to_ne_bytes());
    msg.extend_from_slice(name);
    msg.push(0);
    nix::unistd::write(fuse, &msg)?;
    Ok(())
}

/// Opens /dev/fuse and mounts it at `mountpoint`; returns the connection.
pub fn mount(mountpoint: &Path, allow_other: bool) -> Result<OwnedFd, StartupError> {
    let dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(StartupError::DevFuse)?;
    let fd: OwnedFd = dev.into();
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fd.as_raw_fd()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    nix::mount::mount(
        Some("agentfs"),
        mountpoint,
        Some(FSTYPE),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| StartupError::Mount(mountpoint.to_owned(), io::Error::from(e)))?;
    Ok(fd)
}

/// Detaches the mount at `mountpoint`. Open files keep working until closed;
/// new opens no longer reach this mount.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    match nix::mount::umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => {
            tracing::info!(
                "{} is busy; detaching it lazily, the worker serves open files until they close",
                mountpoint.display()
            );
            nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH).map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// Aborts the FUSE connection of the mount whose device number is `dev`,
/// failing every pending and future request with ENOTCONN: through
/// /sys/fs/fuse/connections where fusectl is mounted (systemd mounts it at
/// boot), else through an instance of fusectl of our own that is never
/// attached anywhere, so nothing shows (containers often lack the former).
/// Needs CAP_SYS_ADMIN.
pub fn abort_connection(dev: u64) -> io::Result<()> {
    let abort = format!("{}/abort", nix::sys::stat::minor(dev));
    match fs::write(Path::new("/sys/fs/fuse/connections").join(&abort), "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let ctl = detached_fusectl()?;
            let path = std::ffi::CString::new(abort).expect("no NUL in a number");
            // SAFETY: valid descriptor and NUL-terminated path; the result
            // is checked.
            let fd = unsafe {
                libc::openat(
                    ctl.as_raw_fd(),
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: openat returned a new descriptor.
            let mut f = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            io::Write::write_all(&mut f, b"1")
        }
        r => r,
    }
}

/// A new mount of fusectl, not attached to any mount point (fsopen and
/// fsmount): gone when the descriptor is closed.
fn detached_fusectl() -> io::Result<OwnedFd> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: plain system calls with NUL-terminated strings and null
    // pointers where the calls take none; each result is checked, and each
    // new descriptor is owned at once.
    unsafe {
        let fs = check(libc::syscall(
            libc::SYS_fsopen,
            c"fusectl".as_ptr(),
            libc::FSOPEN_CLOEXEC,
        ))?;
        let fs = OwnedFd::from_raw_fd(fs as RawFd);
        check(libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        ))?;
        let m = check(libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            0,
        ))?;
        Ok(OwnedFd::from_raw_fd(m as RawFd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/tab\\011x\\134"), "/tab\tx\\");
    }

    #[test]
    fn absolute_normalizes_without_resolving_last() {
        let p = absolute(Path::new("/tmp/./x/../does-not-exist")).unwrap();
        assert_eq!(p, fs::canonicalize("/tmp").unwrap().join("does-not-exist"));
    }
}
