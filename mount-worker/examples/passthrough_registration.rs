//! Measures the two places a FUSE passthrough backing file can be
//! registered (issue 6; the choice is in specs/security.md): in the worker,
//! which then keeps CAP_SYS_ADMIN, or in a privileged helper (the
//! supervisor's role) that the worker sends each host file to over a Unix
//! socket, once to open the backing file and once to close it.
//!
//! Mounts a one-file FUSE file system at a temporary directory and times
//! open+close of that file from this process, answered three ways: cached
//! (no passthrough: the baseline), passthrough registered in-process, and
//! passthrough registered by a helper process holding the same /dev/fuse
//! descriptor. Needs root and a kernel with FUSE passthrough (6.9+).
//!
//! `cargo run --release -p agentfs-mount-worker --example passthrough_registration [-- N]`

use std::ffi::OsStr;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Config, FileAttr, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyEmpty, ReplyEntry, ReplyOpen, Request,
    Session,
};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Registrar {
    /// No passthrough.
    Cached,
    /// FUSE_DEV_IOC_BACKING_OPEN/CLOSE in the serving process.
    InProcess,
    /// The same ioctls in a helper process, over a socket.
    Helper,
}

struct OneFile {
    host: File,
    /// How opens are answered now (switched by `main`).
    registrar: &'static Mutex<Registrar>,
    /// /dev/fuse, known once mounted.
    fuse: &'static OnceLock<OwnedFd>,
    helper: Mutex<UnixStream>,
    /// The open backing file (one open at a time in this benchmark).
    backing: Mutex<Option<u32>>,
}

const FILE_INO: u64 = 2;

fn attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: if ino == FILE_INO { 4096 } else { 0 },
        blocks: 8,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if ino == FILE_INO {
            FileType::RegularFile
        } else {
            FileType::Directory
        },
        perm: 0o755,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Asks the helper: `o` + a descriptor opens a backing file (answer: its
/// id), `c` + an id closes one (answer: 0).
fn ask(helper: &mut UnixStream, op: u8, id: u32, fd: Option<RawFd>) -> u32 {
    let mut msg = [op, 0, 0, 0, 0];
    msg[1..].copy_from_slice(&id.to_le_bytes());
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsg: Vec<ControlMessage> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    sendmsg::<()>(
        helper.as_raw_fd(),
        &[IoSlice::new(&msg)],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut answer = [0u8; 4];
    helper.read_exact(&mut answer).unwrap();
    u32::from_le_bytes(answer)
}

/// The helper process: serves `ask` until the socket closes.
fn helper_loop(fuse: OwnedFd, mut sock: UnixStream) -> ! {
    loop {
        let mut buf = [0u8; 5];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) else {
            std::process::exit(0)
        };
        if msg.bytes == 0 {
            std::process::exit(0);
        }
        let mut fd = None;
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: received with SCM_RIGHTS: ours now.
                fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
        let id = u32::from_le_bytes(buf[1..5].try_into().unwrap());
        let answer = match (buf[0], fd) {
            (b'o', Some(file)) => fuser::BackingId::create_raw(&fuse, &file).unwrap(),
            (b'c', _) => {
                close_backing(&fuse, id);
                0
            }
            _ => std::process::exit(2),
        };
        sock.write_all(&answer.to_le_bytes()).unwrap();
    }
}

fn close_backing(fuse: &OwnedFd, id: u32) {
    agentfs_mount_worker::passthrough::close_backing(fuse.as_fd(), id).unwrap();
}

impl Filesystem for OneFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        config.set_max_stack_depth(1).unwrap();
        config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .expect("kernel without FUSE passthrough");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "f" {
            reply.entry(&Duration::from_secs(60), &attr(FILE_INO), Generation(0));
        } else {
            reply.error(fuser::Errno::from_i32(libc::ENOENT));
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: ReplyAttr,
    ) {
        reply.attr(&Duration::from_secs(60), &attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = fuser::FileHandle(1);
        let id = match *self.registrar.lock().unwrap() {
            Registrar::Cached => return reply.opened(fh, FopenFlags::empty()),
            Registrar::InProcess => reply.open_backing(&self.host).unwrap().into_raw(),
            Registrar::Helper => {
                let fd = self.host.as_fd().as_raw_fd();
                ask(&mut self.helper.lock().unwrap(), b'o', 0, Some(fd))
            }
        };
        *self.backing.lock().unwrap() = Some(id);
        // SAFETY: open until `release`; `into_raw` keeps it so.
        let b = unsafe { reply.wrap_backing(id) };
        reply.opened_passthrough(fh, FopenFlags::empty(), &b);
        b.into_raw();
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyData,
    ) {
        let mut buf = vec![0; size as usize];
        let n = std::os::unix::fs::FileExt::read_at(&self.host, &mut buf, offset).unwrap();
        reply.data(&buf[..n]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: fuser::FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(id) = self.backing.lock().unwrap().take() {
            match *self.registrar.lock().unwrap() {
                Registrar::Helper => {
                    ask(&mut self.helper.lock().unwrap(), b'c', id, None);
                }
                _ => close_backing(self.fuse.get().unwrap(), id),
            }
        }
        reply.ok();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(20_000, |n| n.parse().expect("N: a number of opens"));
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let host_path = dir.path().join("host");
    std::fs::write(&host_path, vec![7u8; 4096]).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    let (ours, theirs) = UnixStream::pair().unwrap();
    let ours_in_child = ours.as_raw_fd();
    let registrar: &'static Mutex<Registrar> = Box::leak(Box::new(Mutex::new(Registrar::Cached)));
    let fuse_slot: &'static OnceLock<OwnedFd> = Box::leak(Box::new(OnceLock::new()));
    let fs = OneFile {
        host: File::open(&host_path).unwrap(),
        registrar,
        fuse: fuse_slot,
        helper: Mutex::new(ours),
        backing: Mutex::new(None),
    };
    let session = Session::new(fs, &mnt, &Config::default()).expect("mount (needs root)");
    let fuse = session.as_fd().try_clone_to_owned().unwrap();
    fuse_slot.set(fuse.try_clone().unwrap()).unwrap();
    // The helper, forked while this process has one thread.
    // SAFETY: single-threaded here; the child only runs `helper_loop`.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // Gone with this process; its end of the socket is not its own.
            // SAFETY: plain prctl and close calls.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::close(ours_in_child);
            }
            helper_loop(fuse, theirs)
        }
        nix::unistd::ForkResult::Parent { .. } => drop((fuse, theirs)),
    }
    let bg = session.spawn().unwrap();
    let file = mnt.join("f");
    println!("open+read 4 KiB+close of one file through FUSE, {rounds} times each (median, mean):");
    for how in [Registrar::Cached, Registrar::InProcess, Registrar::Helper] {
        *registrar.lock().unwrap() = how;
        let mut times = Vec::with_capacity(rounds);
        let mut buf = [0u8; 4096];
        let all = Instant::now();
        for _ in 0..rounds {
            let t = Instant::now();
            File::open(&file).unwrap().read_exact(&mut buf).unwrap();
            times.push(t.elapsed());
        }
        let mean = all.elapsed() / rounds as u32;
        println!("  {how:?}: {:?}, {mean:?}", median(times));
    }
    drop(bg);
}
