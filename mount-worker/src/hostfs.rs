//! HostFs: every system call the worker makes on host files.
//!
//! All access is relative to descriptors: a node is an `O_PATH` descriptor
//! (opened by name, or by file handle for each use), children are reached with `*at` calls on their parent's descriptor and a
//! single name component (never a joined string path), and operations that
//! have no `*at` form on an `O_PATH` descriptor go through the descriptor's
//! `/proc/self/fd/N` magic link, which the kernel resolves to exactly that
//! inode. Names are never followed as symlinks on the host (`O_NOFOLLOW`).
//!
//! Functions return `io::Result` carrying the host's errno unchanged, so the
//! caller of the FUSE request sees the errno the host file system chose.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// `struct stat` of a host file.
pub type Stat = libc::stat;

/// Converts a libc return value into `io::Result`, taking errno on -1.
fn cvt<T: PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A single path component as a C string. Names with NUL or `/`, and `.`
/// and `..`, cannot come from the kernel (it resolves dots itself); refusing
/// them here keeps every `*at` call on the directory it names.
pub fn component(name: &OsStr) -> io::Result<CString> {
    let b = name.as_bytes();
    if b.is_empty() || b.contains(&b'/') || b == b"." || b == b".." {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/N` for a descriptor: the kernel resolves it to the inode
/// itself, whatever name it has now.
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

const EMPTY: &CStr = c"";

thread_local! {
    static PRIVATE_FS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (which creates a host file) with the caller's umask. The umask
/// is per process, so the calling thread first takes a private copy of the
/// process's fs attributes (`unshare(CLONE_FS)`); other threads are never
/// affected. The host then masks the mode exactly as for the caller: with
/// the umask, or, in a directory with a default ACL, with that ACL.
pub fn with_umask<T>(umask: u32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if !PRIVATE_FS.get() {
        // SAFETY: unshare(CLONE_FS) only affects the calling thread.
        cvt(unsafe { libc::unshare(libc::CLONE_FS) })?;
        PRIVATE_FS.set(true);
    }
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(umask & 0o777) };
    f()
}

/// Opens `name` in `dir` as an `O_PATH` descriptor without following a
/// symlink in its place.
pub fn open_node(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// `openat2(2)` of `name` beneath `dir`, with `O_CLOEXEC` added. Whatever
/// `name` holds, and whatever another process does to the host tree
/// meanwhile, the result is beneath `dir`: `..` out of it, absolute names
/// and symlinks anywhere on the way fail (`EXDEV`, `ELOOP`), and
/// `/proc/self/fd`-style magic links are never followed. (`O_PATH |
/// O_NOFOLLOW` still opens a symlink itself.)
pub fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let creates = flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE;
    /// `struct open_how` (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        // openat2 refuses a mode without O_CREAT or O_TMPFILE, and file
        // type bits (FUSE's create passes S_IFREG along).
        mode: if creates { (mode & 0o7777) as u64 } else { 0 },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: valid descriptor, NUL-terminated name and a complete open_how
    // of the size passed; the result is a new fd we own.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    } as i32)?;
    // SAFETY: openat2 returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the inode behind `node` (an `O_PATH` descriptor) for I/O with `flags`.
pub fn reopen(node: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let path = proc_path(node);
    // SAFETY: as in open_at.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Whether the file `file` (open read-only) is open for writing by any
/// other open file description, the kernel's included (such as the backing
/// file of a FUSE passthrough map): a read lease cannot be had then
/// (EAGAIN). Otherwise one is taken and given back at once; a process
/// opening the file for writing meanwhile waits for that and signals
/// SIGIO, which the caller must not die of. EACCES without `CAP_LEASE` on
/// a file of another owner; EINVAL where the file system has no leases.
pub fn open_for_writing_elsewhere(file: &File) -> io::Result<bool> {
    // SAFETY: fcntl on a descriptor we own, integer arguments only.
    match cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) }) {
        Ok(_) => {
            // SAFETY: as above.
            cvt(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) })?;
            Ok(false)
        }
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(true),
        Err(e) => Err(e),
    }
}

/// An `O_PATH` descriptor of the inode behind any open descriptor.
pub fn path_fd_of(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = proc_path(fd);
    // SAFETY: as in open_at.
    let fd = cvt(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `stat` of the inode behind a descriptor (never following a symlink).
pub fn stat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    stat_at(fd, EMPTY)
}

/// `stat` of `name` in directory `dir`, of `dir` itself if `name` is
/// empty (never following a symlink).
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    // SAFETY: name is NUL-terminated, st a valid out-pointer;
    // AT_EMPTY_PATH makes the call act on dir when name is empty.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and filled st.
    Ok(unsafe { st.assume_init() })
}

/// `mkdirat(2)`.
pub fn mkdir(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and name.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mknodat(2)`.
pub fn mknod(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid fd and name.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

/// `symlinkat(2)`.
pub fn symlink(target: &OsStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let target =
        CString::new(target.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid strings and fd.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Makes a new hard link `newdir/newname` to the inode behind `node`.
pub fn link(node: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &CStr) -> io::Result<()> {
    // SAFETY: valid fds and names; AT_EMPTY_PATH links the inode of `node`
    // itself (the worker holds CAP_DAC_READ_SEARCH for this).
    cvt(unsafe {
        libc::linkat(
            node.as_raw_fd(),
            EMPTY.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// `unlinkat(2)`; `dir_flag` removes a directory.
pub fn unlink(dir: BorrowedFd<'_>, name: &CStr, remove_dir: bool) -> io::Result<()> {
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid fd and name.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2(2)` with the caller's flags (RENAME_NOREPLACE, RENAME_EXCHANGE, ...).
pub fn rename(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid fds and names.
    cvt(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// Target of the symlink behind `node`.
pub fn readlink(node: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buf is valid for buf.len() bytes.
    let n = cvt(unsafe {
        libc::readlinkat(
            node.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// Changes owner and/or group of the inode behind `node` (not following symlinks).
pub fn chown(node: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: valid fd; -1 (u32::MAX) leaves an id unchanged.
    cvt(unsafe {
        libc::fchownat(
            node.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Changes the mode of the inode behind `node`.
pub fn chmod(node: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let path = proc_path(node);
    // SAFETY: valid path.
    cvt(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

/// Sets atime and mtime (`UTIME_OMIT` / `UTIME_NOW` allowed in either).
pub fn utimens(node: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: valid fd; times points to two timespecs. AT_EMPTY_PATH acts on
    // the inode of `node`, a symlink included.
    cvt(unsafe {
        libc::utimensat(
            node.as_raw_fd(),
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fstatvfs` of the file system holding `node`.
pub fn statvfs(node: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid fd and out-pointer.
    cvt(unsafe { libc::fstatvfs(node.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: filled on success.
    Ok(unsafe { st.assume_init() })
}

/// Size of an xattr value or list when the caller asked with size 0.
pub enum XattrReply {
    /// The caller asked only for the size.
    Size(usize),
    /// The value (or the NUL-separated name list).
    Data(Vec<u8>),
}

impl XattrReply {
    /// The reply for a value (or name list) `v` the caller asked for with
    /// `size`: size 0 asks for the size; ERANGE if it does not fit.
    pub fn sized(v: Vec<u8>, size: u32) -> io::Result<XattrReply> {
        if size == 0 {
            Ok(XattrReply::Size(v.len()))
        } else if v.len() > size as usize {
            Err(io::Error::from_raw_os_error(libc::ERANGE))
        } else {
            Ok(XattrReply::Data(v))
        }
    }
}

/// Runs a get/list xattr call the POSIX way: size 0 asks for the size,
/// otherwise a buffer of `size` is filled (ERANGE if too small).
fn xattr_buf(size: u32, f: impl Fn(*mut libc::c_void, usize) -> isize) -> io::Result<XattrReply> {
    if size == 0 {
        return Ok(XattrReply::Size(cvt(f(std::ptr::null_mut(), 0))? as usize));
    }
    let mut buf = vec![0u8; size as usize];
    let n = cvt(f(buf.as_mut_ptr().cast(), buf.len()))?;
    buf.truncate(n as usize);
    Ok(XattrReply::Data(buf))
}

/// `getxattr` on the inode behind `node`.
pub fn getxattr(node: BorrowedFd<'_>, name: &OsStr, size: u32) -> io::Result<XattrReply> {
    let path = proc_path(node);
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid strings; the buffer pointer/len pair comes from xattr_buf.
    xattr_buf(size, |b, l| unsafe {
        libc::getxattr(path.as_ptr(), name.as_ptr(), b, l)
    })
}

/// `listxattr` on the inode behind `node`.
pub fn listxattr(node: BorrowedFd<'_>, size: u32) -> io::Result<XattrReply> {
    let path = proc_path(node);
    // SAFETY: as in getxattr.
    xattr_buf(size, |b, l| unsafe {
        libc::listxattr(path.as_ptr(), b.cast(), l)
    })
}

/// `setxattr` on the inode behind `node`.
pub fn setxattr(node: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let path = proc_path(node);
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid strings and value slice.
    cvt(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `removexattr` on the inode behind `node`.
pub fn removexattr(node: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let path = proc_path(node);
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid strings.
    cvt(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) }).map(drop)
}

/// `fallocate(2)` on an open file.
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) }).map(drop)
}

/// `lseek(2)` (the kernel forwards only SEEK_DATA and SEEK_HOLE).
pub fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::lseek(file.as_raw_fd(), offset, whence) })
}

/// `copy_file_range(2)` between two open files at explicit offsets.
pub fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
) -> io::Result<usize> {
    let mut off_in = src_off as i64;
    let mut off_out = dst_off as i64;
    // SAFETY: valid fds and offset pointers.
    let n = cvt(unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            len as usize,
            0,
        )
    })?;
    Ok(n as usize)
}

/// One entry of a host directory as `getdents64` returns it.
pub struct DirEntry {
    /// Host inode number.
    pub ino: u64,
    /// Opaque position of the entry after this one.
    pub next_offset: u64,
    /// `DT_*` type.
    pub d_type: u8,
    /// The name, without NUL.
    pub name: Vec<u8>,
}

/// Reads the entries of an open directory from `offset` (0 = start, else a
/// `next_offset` returned earlier). An empty result means the end.
pub fn read_dir(dir: &File, offset: u64) -> io::Result<Vec<DirEntry>> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::lseek(dir.as_raw_fd(), offset as i64, libc::SEEK_SET) })?;
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: buf is valid for its length.
    let n = cvt(unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    })? as usize;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < n {
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let rec = &buf[pos..n];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap());
        let off = u64::from_ne_bytes(rec[8..16].try_into().unwrap());
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap()) as usize;
        let d_type = rec[18];
        let name_bytes = &rec[19..reclen];
        let len = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_bytes.len());
        out.push(DirEntry {
            ino,
            next_offset: off,
            d_type,
            name: name_bytes[..len].to_vec(),
        });
        pos += reclen;
    }
    Ok(out)
}

/// Largest file handle the kernel hands out (MAX_HANDLE_SZ).
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A host file handle: names an inode for as long as it exists, whatever
/// its path, and never a later inode that reuses its number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostHandle {
    handle_type: i32,
    bytes: Vec<u8>,
}

impl HostHandle {
    /// A handle from its type and bytes (`None` if too long to be one).
    pub fn new(handle_type: i32, bytes: Vec<u8>) -> Option<HostHandle> {
        (bytes.len() <= MAX_HANDLE_SZ).then_some(HostHandle { handle_type, bytes })
    }

    /// The file system's handle type.
    pub fn handle_type(&self) -> i32 {
        self.handle_type
    }

    /// The handle's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Hex of the type then the bytes: a file name that names this inode.
    pub fn to_hex(&self) -> String {
        format!(
            "{:08x}{}",
            self.handle_type as u32,
            crate::hex::encode(&self.bytes)
        )
    }

    /// Parses [`HostHandle::to_hex`].
    pub fn from_hex(s: &str) -> Option<HostHandle> {
        let handle_type = u32::from_str_radix(s.get(..8)?, 16).ok()? as i32;
        HostHandle::new(handle_type, crate::hex::decode(&s[8..])?)
    }
}

/// The file handle of the inode behind `node`.
pub fn handle_of(node: BorrowedFd<'_>) -> io::Result<HostHandle> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id = 0;
    // SAFETY: raw has room for MAX_HANDLE_SZ bytes, as handle_bytes says.
    cvt(unsafe {
        libc::name_to_handle_at(
            node.as_raw_fd(),
            EMPTY.as_ptr(),
            (&mut raw as *mut RawHandle).cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    })?;
    Ok(HostHandle {
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..raw.handle_bytes as usize].to_vec(),
    })
}

/// `pwrite` at `offset` even if `f` was opened O_APPEND (pwritev2 with
/// RWF_NOAPPEND, Linux 6.9+).
pub fn pwrite_noappend(f: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over `buf`, which outlives the call.
    let n = unsafe {
        libc::pwritev2(
            f.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOAPPEND,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Opens the inode named by `handle` on the file system of `any` as `O_PATH`.
/// ESTALE once the inode is gone.
pub fn open_handle(any: BorrowedFd<'_>, handle: &HostHandle) -> io::Result<OwnedFd> {
    let mut raw = RawHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: raw is a valid file_handle; the result is a fresh fd.
    let fd = cvt(unsafe {
        libc::open_by_handle_at(
            any.as_raw_fd(),
            (&mut raw as *mut RawHandle).cast(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the inode named by `handle` as `O_PATH`: by `name` in directory
/// `dir` if that still leads to it, else by the handle on the file system
/// of `any`. By name, the host's path to the inode is whole: a sandboxed
/// worker's Landlock checks an open (or a link) against that path, and a
/// file opened by a bare handle has none once the host has dropped its
/// cached names (a directory has: the host reconnects it).
pub fn open_handle_by_name(
    any: BorrowedFd<'_>,
    handle: &HostHandle,
    named: Option<(BorrowedFd<'_>, &CStr)>,
) -> io::Result<OwnedFd> {
    open_handle_by_names(any, handle, [named]).map(|(fd, _)| fd)
}

/// [`open_handle_by_name`] with several names tried in turn (`None`: one
/// that cannot be tried); also says which one led to the inode (`None`:
/// none did, opened by the handle). The names before it lead nowhere or
/// to something else; a lack of descriptors or memory is returned, not
/// taken for that.
pub fn open_handle_by_names<'a>(
    any: BorrowedFd<'_>,
    handle: &HostHandle,
    names: impl IntoIterator<Item = Option<(BorrowedFd<'a>, &'a CStr)>>,
) -> io::Result<(OwnedFd, Option<usize>)> {
    for (i, named) in names.into_iter().enumerate() {
        let Some((dir, name)) = named else { continue };
        match open_node(dir, name) {
            Ok(fd) if handle_of(fd.as_fd()).is_ok_and(|h| h == *handle) => {
                return Ok((fd, Some(i)));
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
                ) =>
            {
                return Err(e);
            }
            _ => {}
        }
    }
    Ok((open_handle(any, handle)?, None))
}

/// Makes `dst` (freshly opened, at offset 0) a copy of all of `src`:
/// FICLONE where the host supports it (no data copied), else std's copy,
/// which uses copy_file_range and falls back to sendfile and plain reads
/// and writes across file systems (the state directory is often on another
/// one than the source, where copy_file_range fails with EXDEV).
pub fn clone_or_copy(src: &File, dst: &File) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: valid fds; FICLONE takes the source fd as its argument.
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    use std::io::{Seek, SeekFrom};
    (&*src).seek(SeekFrom::Start(0))?;
    (&*dst).seek(SeekFrom::Start(0))?;
    io::copy(&mut &*src, &mut &*dst).map(drop)
}

/// Names and values of every xattr of the inode behind `node`.
pub fn all_xattrs(node: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match listxattr(node, 0)? {
        XattrReply::Size(0) => return Ok(Vec::new()),
        XattrReply::Size(n) => match listxattr(node, n as u32)? {
            XattrReply::Data(d) => d,
            XattrReply::Size(_) => unreachable!("a sized call returns data"),
        },
        XattrReply::Data(d) => d,
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let os = OsStr::from_bytes(name);
        let size = match getxattr(node, os, 0)? {
            XattrReply::Size(n) => n,
            XattrReply::Data(_) => unreachable!("a size-0 call returns a size"),
        };
        let value = match getxattr(node, os, size.max(1) as u32)? {
            XattrReply::Data(d) => d,
            XattrReply::Size(_) => Vec::new(),
        };
        out.push((name.to_vec(), value));
    }
    Ok(out)
}

/// Like [`all_xattrs`], but none (not an error) for inodes that cannot
/// have any: xattrs of symlinks, FIFOs and devices are read through their
/// /proc magic link like any other, and unsupported ones are simply none.
pub fn xattrs_if_any(node: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    match all_xattrs(node) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EPERM | libc::ENXIO)
            ) =>
        {
            Ok(Vec::new())
        }
        r => r,
    }
}

/// `fsync` of a directory given as an `O_PATH` descriptor.
pub fn sync_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?.sync_all()
}

/// Opens a directory by path as an `O_PATH` descriptor. Only for paths the
/// administrator gave (the state directory's own); names from requests go
/// through [`open_at`].
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: NUL-terminated path; the result is a new fd we own.
    let fd = cvt(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The value of field `key` in `/proc/<pid>/status` (`pid` may be
/// `self`), trimmed; `None` if the process is gone or has no such field.
pub fn proc_status(pid: impl std::fmt::Display, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// Every entry of directory `node` (any descriptor of it, `O_PATH` ones
/// too: it is opened for reading here) except `.` and `..`.
pub fn read_dir_all(node: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let dir = &reopen(node, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let batch = read_dir(dir, offset)?;
        let Some(last) = batch.last() else {
            return Ok(out);
        };
        offset = last.next_offset;
        out.extend(
            batch
                .into_iter()
                .filter(|e| e.name != b"." && e.name != b".."),
        );
    }
}

/// Reads up to `buf.len()` bytes at `offset`, short only at end of file.
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsFd;
    use std::os::unix::fs::symlink;

    fn errno(r: io::Result<OwnedFd>) -> i32 {
        r.expect_err("must be refused").raw_os_error().unwrap()
    }

    /// A writer anywhere, a shared writable map whose descriptor is closed
    /// included, is seen; readers and private maps are not.
    #[test]
    fn writers_elsewhere_are_seen_through_a_lease() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        fs::write(&path, b"0123").unwrap();
        let probe = || open_for_writing_elsewhere(&File::open(&path).unwrap()).unwrap();
        let reader = File::open(&path).unwrap();
        assert!(!probe(), "a reader");
        let writer = File::options().read(true).write(true).open(&path).unwrap();
        assert!(probe(), "a writer");
        let map = |file: File, flags| {
            // SAFETY: a fresh mapping of 4 bytes, unmapped by the caller.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            addr
        };
        let shared = map(writer, libc::MAP_SHARED);
        assert!(probe(), "a shared map of a closed writer");
        // SAFETY: our mapping, not used after this.
        unsafe { libc::munmap(shared, 4) };
        assert!(!probe(), "the map gone");
        let private = map(reader, libc::MAP_PRIVATE);
        assert!(!probe(), "a private map");
        // SAFETY: as above.
        unsafe { libc::munmap(private, 4) };
    }

    /// Names and host symlinks never take a lookup out of its directory,
    /// even when the host tree is changed behind the worker's back.
    #[test]
    fn open_at_stays_beneath_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let inside = tmp.path().join("inside");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(inside.join("d")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), "outside").unwrap();
        symlink(&outside, inside.join("to-dir")).unwrap();
        symlink(outside.join("secret"), inside.join("to-file")).unwrap();
        symlink(outside.join("created"), inside.join("dangling")).unwrap();
        let dir = open_dir_path(&inside).unwrap();
        let d = dir.as_fd();

        for (name, want) in [
            (c"../outside/secret", libc::EXDEV),
            (c"/etc/hostname", libc::EXDEV),
            (c"to-dir/secret", libc::ELOOP),
            (c"to-file", libc::ELOOP),
        ] {
            let got = errno(open_at(d, name, libc::O_RDONLY, 0));
            assert_eq!(got, want, "{name:?}");
        }
        let create = libc::O_CREAT | libc::O_WRONLY;
        assert_eq!(errno(open_at(d, c"dangling", create, 0o644)), libc::ELOOP);
        assert!(
            !outside.join("created").exists(),
            "created through a symlink"
        );
        // The symlink itself is still a node the worker serves.
        let link = open_node(d, c"to-file").unwrap();
        assert_eq!(
            stat(link.as_fd()).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFLNK
        );
        // And plain names work.
        open_at(d, c"d", libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        open_at(d, c"new", create, 0o644).unwrap();
        assert!(inside.join("new").exists());
    }

    #[test]
    fn dots_and_slashes_are_not_components() {
        for bad in ["", ".", "..", "a/b", "/"] {
            let e = component(OsStr::new(bad)).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{bad:?}");
        }
        assert!(component(OsStr::new("..a")).is_ok());
    }
}
