//! Shared support for the integration tests: a real FUSE mount of a
//! temporary source directory, served by the real `agentfs-mount-worker`
//! binary, that is always unmounted when the guard is dropped (also when the
//! test panics).
#![allow(dead_code)] // each test binary uses a different subset

pub mod failing_disk;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of the worker binary built by cargo for these tests.
pub const WORKER: &str = env!("CARGO_BIN_EXE_agentfs-mount-worker");

/// A running worker and its mount. Dropping it unmounts and reaps the worker.
pub struct Mount {
    dir: tempfile::TempDir,
    source: PathBuf,
    mountpoint: PathBuf,
    state_dir: PathBuf,
    /// The state directory is a file system of this test's (unmounted on
    /// drop): a tmpfs, or an ext4 image (its path).
    state_fs: Option<StateFs>,
    /// The test owns the mount ([`MountBuilder::supervised`]).
    supervised: bool,
    child: Option<Child>,
}

impl Mount {
    /// Mounts a fresh, empty source directory at a separate mountpoint.
    pub fn new() -> Mount {
        Mount::builder().start()
    }

    /// Mounts a fresh, empty source as the supervisor does: the worker
    /// sandboxed ([`MountBuilder::supervised`]).
    pub fn sandboxed() -> Mount {
        Mount::builder().supervised().start()
    }

    /// Starts describing a mount; see [`MountBuilder`].
    pub fn builder() -> MountBuilder {
        MountBuilder::default()
    }

    /// The mountpoint: where the tests act.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// The host directory being served.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The worker's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Process id of the worker.
    pub fn worker_pid(&self) -> u32 {
        self.child.as_ref().expect("worker running").id()
    }

    /// Stops the worker with SIGTERM and checks that it unmounted and exited
    /// 0. The directories stay until the guard is dropped.
    /// A supervised worker is stopped as the supervisor does it: its owner
    /// unmounts, and the worker's session ends.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("worker running");
        if self.supervised {
            // EBUSY can be passing: another test of this process forking
            // (to spawn a command) copies every descriptor it has open,
            // ours on this mount too, until its exec closes them.
            let mut tries = 0;
            while let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty())
            {
                tries += 1;
                assert!(
                    e == nix::errno::Errno::EBUSY && tries < 100,
                    "unmount the supervised mount: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            signal(child.id(), libc::SIGTERM);
        }
        let status = wait_timeout(&mut child, Duration::from_secs(20))
            .expect("worker did not exit within 20 s of SIGTERM or its unmount");
        assert!(
            !is_mounted(&self.mountpoint),
            "worker exited but left {} mounted",
            self.mountpoint.display()
        );
        assert!(status.success(), "worker exited with {status}");
    }

    /// Kills the worker with SIGKILL, leaving its mount stale (the guard still
    /// cleans it up on drop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            reap_killed(&mut child, &self.mountpoint);
        }
    }

    /// Makes the state directory's ext4 fail as a dying disk does: the
    /// kernel turns it read-only under the worker (errors=remount-ro,
    /// through ext4's trigger_fs_error).
    pub fn fail_state_disk(&self) {
        assert!(
            matches!(self.state_fs, Some(StateFs::Ext4 { .. })),
            "needs state_on_ext4"
        );
        let source = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--mountpoint"])
            .arg(&self.state_dir)
            .output()
            .unwrap();
        let dev = String::from_utf8_lossy(&source.stdout).trim().to_owned();
        let name = Path::new(&dev).file_name().unwrap().to_owned();
        fs::write(
            Path::new("/sys/fs/ext4")
                .join(name)
                .join("trigger_fs_error"),
            "1",
        )
        .unwrap();
    }

    /// Repairs the failed state disk as an operator would: unmount, e2fsck,
    /// mount again. The worker must be stopped.
    pub fn repair_state_disk(&mut self) {
        assert!(self.child.is_none(), "stop the worker first");
        let Some(StateFs::Ext4 { image, disk }) = &self.state_fs else {
            panic!("needs state_on_ext4");
        };
        nix::mount::umount2(&self.state_dir, nix::mount::MntFlags::empty()).unwrap();
        if let Some(d) = disk {
            d.fail(false);
        }
        let fsck = Command::new("e2fsck")
            .arg("-fy")
            .arg(image)
            .output()
            .unwrap();
        // 0: clean, 1: errors corrected.
        assert!(fsck.status.code().is_some_and(|c| c <= 1), "{fsck:?}");
        let device = disk.as_ref().map_or_else(|| image.clone(), |d| d.path());
        mount_ext4(&device, &self.state_dir);
    }

    /// Makes the disk under the state directory's ext4 answer EIO to every
    /// read, write and flush from now on (needs
    /// [`MountBuilder::state_on_failing_disk`]).
    pub fn fail_state_disk_with_eio(&self) {
        let Some(StateFs::Ext4 { disk: Some(d), .. }) = &self.state_fs else {
            panic!("needs state_on_failing_disk");
        };
        d.fail(true);
    }

    /// Starts a new worker on the same directories (after [`Mount::kill`]).
    pub fn restart(&mut self, extra_args: &[&str]) {
        assert!(self.child.is_none(), "restart needs a stopped worker");
        self.child = Some(spawn_worker(
            &self.source,
            &self.mountpoint,
            &self.state_dir,
            extra_args,
        ));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(20)).is_none() {
                signal(child.id(), libc::SIGKILL);
                reap_killed(&mut child, &self.mountpoint);
            }
        }
        // Last resort: never leave a mount behind, even a stale one.
        for _ in 0..5 {
            if !is_mounted(&self.mountpoint) {
                break;
            }
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .stderr(Stdio::null())
                .status();
            if is_mounted(&self.mountpoint) {
                let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        if let Some(fs) = self.state_fs.take() {
            if let StateFs::Ext4 { disk: Some(d), .. } = &fs {
                d.fail(false);
            }
            // Before its disk goes.
            unmount_ext4(&self.state_dir);
            drop(fs);
        }
    }
}

/// A file system of the test's own under the state directory.
enum StateFs {
    Tmpfs,
    /// An ext4 image on a loop device; its file served by a
    /// [`failing_disk::FailingDisk`] if `disk` is set.
    Ext4 {
        image: PathBuf,
        disk: Option<failing_disk::FailingDisk>,
    },
}

/// Makes an ext4 image of `mib` MiB at `image`.
pub fn make_ext4(image: &Path, mib: u64) {
    fs::File::create(image).unwrap().set_len(mib << 20).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(image)
        .status()
        .unwrap();
    assert!(mkfs.success(), "mkfs.ext4");
}

/// Unmounts the ext4 at `at` for good: a lazy unmount only if that fails
/// (one would keep the loop device, and so the image or disk, busy).
pub fn unmount_ext4(at: &Path) {
    if let Err(e) = nix::mount::umount2(at, nix::mount::MntFlags::empty()) {
        eprintln!("unmounting {}: {e}; detaching it lazily", at.display());
        let _ = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mounts ext4 image (or disk) `image` at `at`.
pub fn mount_ext4(image: &Path, at: &Path) {
    let st = Command::new("mount")
        .args(["-o", "loop,errors=remount-ro"])
        .arg(image)
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success(), "mount -o loop {}", image.display());
}

/// Fills a source directory before the worker starts.
type Populate = Box<dyn FnOnce(&Path)>;

/// How to start a [`Mount`].
#[derive(Default)]
pub struct MountBuilder {
    over_source: bool,
    supervised: bool,
    state_tmpfs_size: Option<String>,
    state_ext4_mib: Option<u64>,
    state_failing_disk: bool,
    open_files: Option<u64>,
    args: Vec<String>,
    populate: Option<Populate>,
}

impl MountBuilder {
    /// Mounts over the source directory itself (mountpoint == source).
    pub fn over_source(mut self) -> Self {
        self.over_source = true;
        self
    }

    /// Mounts as the supervisor does: the test mounts /dev/fuse itself and
    /// hands the descriptor and the source's to the worker (`--fuse-fd`,
    /// `--source-fd`), which then serves it sandboxed (unless
    /// `--no-sandbox` is passed) and leaves unmounting to its owner.
    pub fn supervised(mut self) -> Self {
        self.supervised = true;
        self
    }

    /// Puts the state directory on a tmpfs of `size` (e.g. "1m"), to fill it.
    pub fn state_on_tmpfs(mut self, size: &str) -> Self {
        self.state_tmpfs_size = Some(size.to_owned());
        self
    }

    /// Puts the state directory on an ext4 image of `mib` MiB (loop
    /// device), to make it fail ([`Mount::fail_state_disk`]).
    pub fn state_on_ext4(mut self, mib: u64) -> Self {
        self.state_ext4_mib = Some(mib);
        self
    }

    /// As [`MountBuilder::state_on_ext4`], with the image served by a
    /// disk that can be made to fail with EIO
    /// ([`Mount::fail_state_disk_with_eio`]).
    pub fn state_on_failing_disk(mut self, mib: u64) -> Self {
        self.state_ext4_mib = Some(mib);
        self.state_failing_disk = true;
        self
    }

    /// Starts the worker with this open-file limit, which it cannot raise
    /// (no CAP_SYS_RESOURCE). Not with [`MountBuilder::supervised`].
    pub fn open_file_limit(mut self, n: u64) -> Self {
        self.open_files = Some(n);
        self
    }

    /// Extra worker arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_owned());
        self
    }

    /// Fills the source directory before the mount starts.
    pub fn populate(mut self, f: impl FnOnce(&Path) + 'static) -> Self {
        self.populate = Some(Box::new(f));
        self
    }

    /// Creates the directories, starts the worker and waits for the mount.
    pub fn start(self) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("aft-")
            .tempdir()
            .expect("tempdir");
        // Tests run as root but exercise unprivileged users too: let them in.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let source = dir.path().join("source");
        let state_dir = dir.path().join("state");
        fs::create_dir(&source).unwrap();
        fs::set_permissions(&source, fs::Permissions::from_mode(0o777)).unwrap();
        let mountpoint = if self.over_source {
            source.clone()
        } else {
            let m = dir.path().join("mnt");
            fs::create_dir(&m).unwrap();
            m
        };
        if let Some(f) = self.populate {
            f(&source);
        }
        if let Some(size) = &self.state_tmpfs_size {
            fs::create_dir(&state_dir).unwrap();
            let opts = format!("size={size},mode=0700");
            nix::mount::mount(
                Some("agentfs-test-state"),
                &state_dir,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(opts.as_str()),
            )
            .unwrap();
        }
        let mut state_fs = self.state_tmpfs_size.as_ref().map(|_| StateFs::Tmpfs);
        if let Some(mib) = self.state_ext4_mib {
            let image = dir.path().join("state.img");
            make_ext4(&image, mib);
            fs::create_dir(&state_dir).unwrap();
            let disk = self.state_failing_disk.then(|| {
                let at = dir.path().join("disk");
                fs::create_dir(&at).unwrap();
                failing_disk::FailingDisk::serve(&image, &at)
            });
            let device = disk.as_ref().map_or_else(|| image.clone(), |d| d.path());
            mount_ext4(&device, &state_dir);
            state_fs = Some(StateFs::Ext4 { image, disk });
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let child = if self.supervised {
            spawn_supervised_worker(&source, &mountpoint, &state_dir, &args)
        } else {
            let mut cmd = Command::new(WORKER);
            if let Some(n) = self.open_files {
                limit_open_files(&mut cmd, n);
            }
            let child = start_worker(cmd, &source, &mountpoint, &state_dir, &args);
            wait_mounted(child, &mountpoint)
        };
        Mount {
            dir,
            source,
            mountpoint,
            state_dir,
            state_fs,
            supervised: self.supervised,
            child: Some(child),
        }
    }
}

/// Mounts `mountpoint` and starts a worker on the descriptors, as the
/// supervisor's launch does.
fn spawn_supervised_worker(
    source: &Path,
    mountpoint: &Path,
    state_dir: &Path,
    extra: &[&str],
) -> Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let source_fd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(source)
        .expect("open the source");
    let fuse = agentfs_mount_worker::mount::mount(mountpoint, true).expect("mount /dev/fuse");
    // Until the Mount guard exists: a worker that fails to start must not
    // leave the mount behind.
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let unmount = Unmount(mountpoint);
    let (s, f) = (source_fd.as_raw_fd(), fuse.as_raw_fd());
    let mut cmd = Command::new(WORKER);
    cmd.args(["--source-fd", &s.to_string(), "--fuse-fd", &f.to_string()]);
    // SAFETY: only fcntl(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in [s, f] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = start_worker(cmd, source, mountpoint, state_dir, extra);
    // The test's copies close now: the worker holds the connection alone,
    // so its death ends it (as with the supervisor).
    drop((source_fd, fuse));
    let child = wait_mounted(child, mountpoint);
    std::mem::forget(unmount);
    child
}

/// Makes `cmd` start with `n` open files at most, for good.
fn limit_open_files(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    /// capability.h (not in the libc crate).
    const CAP_SYS_RESOURCE: libc::c_ulong = 24;
    // SAFETY: only setrlimit(2) and prctl(2), async-signal-safe, between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0
                || libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE, 0, 0, 0) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn spawn_worker(source: &Path, mountpoint: &Path, state_dir: &Path, extra: &[&str]) -> Child {
    let child = start_worker(Command::new(WORKER), source, mountpoint, state_dir, extra);
    wait_mounted(child, mountpoint)
}

fn start_worker(
    mut cmd: Command,
    source: &Path,
    mountpoint: &Path,
    state_dir: &Path,
    extra: &[&str],
) -> Child {
    cmd.arg("--source")
        .arg(source)
        .arg("--mountpoint")
        .arg(mountpoint)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--allow-other")
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agentfs-mount-worker")
}

/// Waits until the worker serves `mountpoint`; panics with its log if it
/// exits first.
fn wait_mounted(mut child: Child, mountpoint: &Path) -> Child {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Mounted, and answering: statfs, unlike stat, is never answered
        // from the kernel's cache. It must be FUSE that answers: a stale
        // mount left by a killed worker fails with ENOTCONN, and once the
        // new worker has detached it, the directory below answers until
        // the new mount is made (the mount table, read just before, may
        // still have listed the stale one).
        let answers = nix::sys::statfs::statfs(mountpoint)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::FUSE_SUPER_MAGIC);
        if is_agentfs_mounted(mountpoint) && answers {
            // Forward the worker's log to the test's stderr from now on.
            let mut err = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    eprint!("{}", String::from_utf8_lossy(&buf[..n]));
                }
            });
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("worker exited with {status} before mounting:\n{err}");
        }
        assert!(
            Instant::now() < deadline,
            "worker did not mount within 20 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mount entries (mountpoint, fstype) of this mount namespace.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((PathBuf::from(unescape(f[4])), f.get(sep + 1)?.to_string()))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// True if any FUSE mount sits at `path`.
pub fn is_mounted(path: &Path) -> bool {
    mounts()
        .iter()
        .any(|(p, t)| p == path && t.starts_with("fuse"))
}

/// True if an AgentFS mount sits at `path`.
pub fn is_agentfs_mounted(path: &Path) -> bool {
    mounts()
        .iter()
        .any(|(p, t)| p == path && t == "fuse.agentfs")
}

/// Reaps a worker killed with SIGKILL. A killed worker can stay a zombie
/// that holds /dev/fuse, and its mount's callers blocked, for good: a thread
/// of it stuck in the kernel, as the trimmer's `inval_entry` is while it
/// waits for a directory's lock that a request in flight holds, which
/// nothing answers any more. Aborting the connection frees them all; the
/// supervisor does the same for its workers.
pub fn reap_killed(child: &mut Child, mountpoint: &Path) {
    if wait_timeout(child, Duration::from_secs(5)).is_some() {
        return;
    }
    abort_connection(mountpoint);
    wait_timeout(child, Duration::from_secs(20)).unwrap_or_else(|| {
        panic!(
            "worker {} did not exit within 20 s of SIGKILL and its connection's abort",
            child.id()
        )
    });
}

/// Aborts the FUSE connection of the mount at `mountpoint`, through a
/// fusectl of this call's own (one superblock wherever it is mounted: no
/// other test's is touched).
pub fn abort_connection(mountpoint: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    // Fields: id, parent, major:minor, root, mount point, ...; a FUSE
    // connection is named for its device's minor.
    let Some(minor) = info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (Path::new(&unescape(f.get(4)?)) == mountpoint)
            .then(|| f[2].split(':').nth(1).map(str::to_owned))?
    }) else {
        return;
    };
    let ctl = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("fusectl"),
        ctl.path(),
        Some("fusectl"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount fusectl");
    let aborted = fs::write(ctl.path().join(&minor).join("abort"), "1");
    let _ = nix::mount::umount2(ctl.path(), nix::mount::MntFlags::MNT_DETACH);
    aborted.unwrap_or_else(|e| {
        panic!(
            "abort FUSE connection {minor} of {}: {e}",
            mountpoint.display()
        )
    });
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command as the given uid/gid (via `setpriv`), returning its output.
pub fn run_as(uid: u32, gid: u32, cwd: &Path, cmd: &str) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", cmd])
        .current_dir(cwd)
        .output()
        .expect("setpriv")
}

/// Looks for a program: `$env_var`, then `PATH`, then `~/.cargo/bin` (where
/// `cargo install` puts it, not always on the PATH of a CI shell).
pub fn find_program(env_var: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "${env_var} names {}, which is not a file",
            p.display()
        );
        return Some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Every object below `root` (not `root` itself), depth first, as
/// (path relative to root, absolute path, metadata without following links).
pub fn walk(root: &Path) -> Vec<(PathBuf, PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for e in entries {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p)
                .unwrap_or_else(|e| panic!("{} (listed in its directory): {e}", p.display()));
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.push((p.strip_prefix(root).unwrap().to_path_buf(), p, md));
        }
    }
    out
}

/// Every object of a tree: kind, mode, owner, size, mtime, nlink, content
/// hash, link target and xattrs, by relative path. Two calls agree exactly
/// when nothing in the tree changed.
pub fn tree(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    tree_with(root, true)
}

/// [`tree`] without what a copy of the tree made elsewhere cannot share:
/// times, and the link count of directories (files' link counts stay). For
/// comparing a view with a reference directory given the same edits.
pub fn tree_content(root: &Path) -> std::collections::BTreeMap<PathBuf, String> {
    tree_with(root, false)
}

fn tree_with(root: &Path, exact: bool) -> std::collections::BTreeMap<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    walk(root)
        .into_iter()
        .map(|(rel, p, md)| {
            let xattrs = if md.file_type().is_symlink() {
                String::new()
            } else {
                let out = Command::new("getfattr")
                    .args(["-d", "-m", "-", "--absolute-names"])
                    .arg(&p)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let body = if md.is_dir() {
                String::from("dir")
            } else if md.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p).unwrap().display())
            } else {
                let data = fs::read(&p).unwrap();
                let sum = data
                    .iter()
                    .fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
                format!("file len={} sum={sum}", data.len())
            };
            let mut v = format!(
                "{body} mode={:o} uid={} gid={} xattrs=[{xattrs}]",
                md.mode(),
                md.uid(),
                md.gid(),
            );
            if exact {
                // Directories' mtimes change when their entries change;
                // they are part of a snapshot too.
                v.push_str(&format!(
                    " mtime={}.{} nlink={}",
                    md.mtime(),
                    md.mtime_nsec(),
                    md.nlink()
                ));
            } else if !md.is_dir() {
                v.push_str(&format!(" nlink={}", md.nlink()));
            }
            (rel, v)
        })
        .collect()
}

/// Sets the extended attribute `name` of `path` (following links) to
/// `value`, asserting success.
pub fn setxattr(path: &Path, name: &str, value: &str) {
    let out = Command::new("setfattr")
        .args(["-n", name, "-v", value])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "setfattr {name} on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that every kind of change to a read-only view `dir` (which has
/// a regular file `a.txt`) fails with EROFS.
pub fn assert_read_only(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    let a = dir.join("a.txt");
    erofs(
        fs::OpenOptions::new().write(true).open(&a).map(drop),
        "open for writing",
    );
    erofs(fs::File::create(dir.join("new")).map(drop), "create");
    erofs(fs::remove_file(&a), "unlink");
    erofs(fs::create_dir(dir.join("d")), "mkdir");
    erofs(fs::rename(&a, dir.join("b")), "rename");
    erofs(
        fs::set_permissions(&a, fs::Permissions::from_mode(0o777)),
        "chmod",
    );
    erofs(fs::hard_link(&a, dir.join("l")), "link");
    erofs(
        std::os::unix::fs::symlink("a.txt", dir.join("s")),
        "symlink",
    );
    let st = Command::new("setfattr")
        .args(["-n", "user.x", "-v", "1"])
        .arg(&a)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&st.stderr).contains("Read-only"),
        "setxattr: {}",
        String::from_utf8_lossy(&st.stderr)
    );
}

/// The names in `dir`, sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A tmpfs mounted at a directory, unmounted (lazily) in all cases.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path) -> Tmpfs {
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "agentfs-test-inner"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount a tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Whether `cond` holds within five seconds (checked every 10 ms): for
/// what the source watch shows of a change made behind the mount, a few
/// milliseconds after it.
pub fn soon(mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one control request to the mount's worker.
pub fn ctl(
    m: &Mount,
    req: agentfs_mount_worker::control::Request,
) -> Result<serde_json::Value, agentfs_mount_worker::control::ControlError> {
    agentfs_mount_worker::control::call(m.state_dir(), &req)
}

/// Takes the snapshot `name` of `branch` (main when `None`); returns its record.
pub fn snapshot(m: &Mount, branch: Option<&str>, name: &str) -> serde_json::Value {
    ctl(
        m,
        agentfs_mount_worker::control::Request::SnapshotCreate {
            branch: branch.map(str::to_owned),
            name: Some(name.into()),
        },
    )
    .unwrap_or_else(|e| panic!("snapshot-create {name} of {branch:?}: {e}"))
}

/// Creates the branch `name` from snapshot `from`; returns its record.
pub fn branch(m: &Mount, from: &str, name: &str) -> serde_json::Value {
    ctl(
        m,
        agentfs_mount_worker::control::Request::BranchCreate {
            snapshot: from.into(),
            name: Some(name.into()),
        },
    )
    .unwrap_or_else(|e| panic!("branch-create {name} from {from}: {e}"))
}

/// Binds process `pid` to `branch`; returns the binding.
pub fn bind_pid(m: &Mount, branch: &str, pid: u32) -> serde_json::Value {
    ctl(
        m,
        agentfs_mount_worker::control::Request::BindPid {
            branch: branch.into(),
            pid: pid as i32,
        },
    )
    .unwrap_or_else(|e| panic!("bind-pid {pid} to {branch}: {e}"))
}

/// Where a snapshot is reachable by path.
pub fn snapshot_dir(m: &Mount, name: &str) -> PathBuf {
    m.path().join(".agentfs/snapshots").join(name)
}

/// Where a branch is reachable by path.
pub fn branch_dir(m: &Mount, name: &str) -> PathBuf {
    m.path().join(".agentfs/branches").join(name)
}

/// A command that is held before it starts: `sh` reads a line from its
/// stdin, then execs `program` with the arguments added to the command (so
/// the pid stays the same). Spawn it, bind its pid, then [`release`] it: the
/// program's first instruction already runs bound.
pub fn held_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("read _ && exec \"$0\" \"$@\"")
        .arg(program)
        .stdin(Stdio::piped());
    c
}

/// Lets a process started from [`held_command`] run; its stdin is closed.
pub fn release(child: &mut Child) {
    use std::io::Write;
    let mut stdin = child.stdin.take().expect("a held command");
    stdin
        .write_all(b"go\n")
        .expect("releasing the held process");
}

/// A workload in which every step is acknowledged only after it is durable:
/// write a file, fsync, rename it into place, fsync the directory; then
/// append the step number to `a.txt` (not fsync'd) and log the step
/// (outside the mount) as acknowledged. Arguments: the directory, the log.
const ACKED_WORKLOAD: &str = r#"
import os, sys
mnt, log = sys.argv[1], open(sys.argv[2], "a")
d = os.open(mnt, os.O_RDONLY)
for i in range(1000000):
    tmp, final = os.path.join(mnt, "w%d.tmp" % i), os.path.join(mnt, "w%d" % i)
    with open(tmp, "wb") as f:
        f.write(b"payload %d\n" % i * 100)
        f.flush(); os.fsync(f.fileno())
    os.rename(tmp, final)
    os.fsync(d)
    with open(os.path.join(mnt, "a.txt"), "ab") as f:
        f.write(b"%d\n" % i)
    log.write("%d\n" % i); log.flush(); os.fsync(log.fileno())
"#;

/// Starts [`ACKED_WORKLOAD`] in `dir`, logging to `log`, with `python` (a
/// `python3` command, perhaps a [`held_command`]).
pub fn start_acked_workload(mut python: Command, dir: &Path, log: &Path) -> Child {
    python
        .args(["-c", ACKED_WORKLOAD])
        .arg(dir)
        .arg(log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn python3")
}

/// The steps the workload logging to `log` has acknowledged so far.
fn acknowledged(log: &Path) -> Vec<usize> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// Fewest steps a workload must acknowledge before a crash means something.
const ACKED_ENOUGH: usize = 11;

/// Waits until the workload logging to `log` has acknowledged enough steps
/// for [`assert_acknowledged`] (a loaded machine can be slow to start
/// python): a crash test kills the worker only then.
pub fn wait_acknowledged(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged(log).len() < ACKED_ENOUGH {
        assert!(
            Instant::now() < deadline,
            "the workload logging to {} acknowledged fewer than {ACKED_ENOUGH} steps in 60 s",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that every step `log` acknowledges is in `dir`, complete, and
/// that the workload ran long enough to mean something. Returns the count.
pub fn assert_acknowledged(dir: &Path, log: &Path) -> usize {
    let acked = acknowledged(log);
    assert!(
        acked.len() >= ACKED_ENOUGH,
        "the workload in {} ran ({} steps)",
        dir.display(),
        acked.len()
    );
    for i in &acked {
        let data = fs::read(dir.join(format!("w{i}"))).unwrap_or_default();
        assert_eq!(
            data,
            format!("payload {i}\n").repeat(100).into_bytes(),
            "acknowledged write w{i} in {}",
            dir.display()
        );
    }
    acked.len()
}

/// Asserts that a snapshot taken during [`ACKED_WORKLOAD`] is a consistent
/// prefix of it: every step its `a.txt` records has its file.
pub fn assert_workload_prefix(snapshot: &Path) {
    let log = fs::read_to_string(snapshot.join("a.txt")).unwrap();
    let n = log.lines().filter(|l| l.parse::<usize>().is_ok()).count();
    for k in 0..n {
        assert!(
            snapshot.join(format!("w{k}")).exists(),
            "{} shows step {k} in a.txt but not w{k}",
            snapshot.display()
        );
    }
}

/// Runs `agentfs-mount-worker --check` on a state directory, asserts that
/// it found nothing wrong (exit 0), and returns its report.
pub fn check_state(state_dir: &Path) -> String {
    let (ok, report) = check_report(state_dir);
    assert!(ok, "state check failed:\n{report}");
    report
}

/// Runs `--check` on `state_dir`: whether it found no problem, and its
/// report.
pub fn check_report(state_dir: &Path) -> (bool, String) {
    let check = Command::new(WORKER)
        .arg("--check")
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    (check.status.success(), report)
}

/// A shared, writable memory map of a whole file (opened read-write), for
/// writes that reach the file system only as dirty pages. Unmapped when
/// dropped.
pub struct SharedMap {
    file: Option<fs::File>,
    addr: *mut libc::c_void,
    len: usize,
}

impl SharedMap {
    /// Maps all of `path` (which must not be empty).
    pub fn new(path: &Path) -> SharedMap {
        use std::os::fd::AsRawFd;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: mapping a file we hold open; unmapped in drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap {}", path.display());
        SharedMap {
            file: Some(file),
            addr,
            len,
        }
    }

    /// Closes the descriptor the map was made from; the map stays (and
    /// keeps writing the file).
    pub fn close_file(&mut self) {
        self.file.take();
    }

    /// Stores `data` at `offset` through the map, then msync(MS_SYNC).
    pub fn write_and_sync(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len);
        // SAFETY: the range lies inside the live mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr as *mut u8).add(offset),
                data.len(),
            );
            assert_eq!(libc::msync(self.addr, self.len, libc::MS_SYNC), 0);
        }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: addr and len describe our mapping, not used after this.
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

/// The kernel's node of `path`, held without opening the file (so that
/// the worker holds no descriptor of it either).
pub fn hold(path: &Path) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "{}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh descriptor.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}
