//! The worker's control channel: a root-only Unix socket in the state
//! directory, one JSON request and one JSON reply per line. The protocol is
//! specified in specs/control.md.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// The socket's file name in the state directory.
pub const SOCKET: &str = "control";

/// What kind of failure a request met; `kebab-case` on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The named snapshot or branch does not exist.
    NotFound,
    /// The name is taken.
    AlreadyExists,
    /// The object is in use.
    Busy,
    /// The request is malformed or a name is invalid.
    InvalidArgument,
    /// The caller may not do this.
    AccessDenied,
    /// The state directory is full.
    NoSpace,
    /// Any other failure of the host.
    Io,
    /// The object cannot be changed.
    ReadOnly,
}

/// A failed request: a kind for programs and a sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    /// The kind.
    pub kind: ErrorKind,
    /// What went wrong, naming the object, and what to do.
    pub message: String,
}

/// Longest message an error carries: a message that names a huge argument
/// must not send it back whole.
const MAX_MESSAGE: usize = 1024;

impl ControlError {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ControlError {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            message = format!("{}… (message cut)", cut(&message, MAX_MESSAGE - 32));
        }
        ControlError { kind, message }
    }
}

/// The first at most `max` bytes of `s`, ending on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` for a message: whole if short, else its start and its length, so
/// that an error about a huge argument names it without repeating it.
pub fn brief(s: &str) -> String {
    if s.len() <= 100 {
        format!("{s:?}")
    } else {
        format!("{:?}… ({} bytes)", cut(s, 64), s.len())
    }
}

impl From<io::Error> for ControlError {
    fn from(e: io::Error) -> ControlError {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC) => ErrorKind::NoSpace,
            Some(libc::EROFS) => ErrorKind::ReadOnly,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EEXIST) => ErrorKind::AlreadyExists,
            Some(libc::EBUSY) => ErrorKind::Busy,
            Some(libc::EINVAL) => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        ControlError::new(kind, e.to_string())
    }
}

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Take a snapshot of main (or, later, of a branch).
    SnapshotCreate {
        /// The branch to snapshot; main when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
        /// The snapshot's name; `snap-<id>` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// List the snapshots. (A struct variant: serde ignores unknown fields
    /// next to the tag of a unit variant, and they must be refused.)
    SnapshotList {},
    /// Delete a snapshot.
    SnapshotDelete {
        /// Its name or id.
        snapshot: String,
    },
    /// Create a branch from a snapshot.
    BranchCreate {
        /// The snapshot (name or id) the branch starts from.
        snapshot: String,
        /// The branch's name; `branch-<id>` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// List the branches.
    BranchList {},
    /// Delete a branch and give back its space.
    BranchDelete {
        /// Its name or id.
        branch: String,
        /// Delete even if processes are bound to it or files are open in it.
        #[serde(default)]
        force: bool,
    },
    /// Send a process, its threads and the children it forks from now on
    /// to a branch.
    BindPid {
        /// The branch (name or id).
        branch: String,
        /// The process (a thread id names its process).
        pid: i32,
    },
    /// Send every process of a cgroup v2 subtree to a branch.
    BindCgroup {
        /// The branch (name or id).
        branch: String,
        /// The cgroup, as in `/proc/PID/cgroup` (`/agents/a1`) or as its
        /// directory under `/sys/fs/cgroup`.
        cgroup: String,
    },
    /// Remove a pid binding.
    UnbindPid {
        /// The bound process.
        pid: i32,
    },
    /// Remove a cgroup binding.
    UnbindCgroup {
        /// The bound cgroup, spelled as when it was bound (either form).
        cgroup: String,
    },
    /// List the bindings.
    BindingList {},
    /// Test hook: try what the sandbox must refuse (answered only by a
    /// worker started with `--test-fault-hook`; see `sandbox::probe`).
    SandboxProbe {
        /// A file outside the source and the state directory.
        outside: String,
        /// An empty directory to try mounting on.
        mount_on: String,
        /// A process to try attaching to with ptrace.
        tracee: i32,
    },
    /// Test hook: stall every FUSE request for `seconds`, the stalling
    /// thread spinning on the CPU (`spin`) or asleep (answered only by a
    /// worker started with `--test-fault-hook`; the supervisor's hang
    /// detection tells a busy worker from a hung one).
    Stall {
        /// How long.
        seconds: u64,
        /// Spin (a busy worker) rather than sleep (a hung one).
        spin: bool,
    },
}

/// The reply line.
#[derive(Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ControlError>,
}

/// Whatever carries out requests (the worker's FsCore).
pub trait Handler: Send + Sync + 'static {
    /// Carries out one request.
    fn handle(&self, req: Request) -> Result<serde_json::Value, ControlError>;
}

/// Checks a snapshot or branch name (`kind` names which, for the message).
pub fn validate_name(kind: &str, name: &str) -> Result<(), ControlError> {
    let why = if name.is_empty() {
        Some("names may not be empty")
    } else if name.len() > 255 {
        Some("names are at most 255 bytes")
    } else if name.contains('/') {
        Some("names may not contain '/'")
    } else if name.contains('\0') {
        Some("names may not contain NUL")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not names")
    } else {
        None
    };
    match why {
        Some(why) => Err(ControlError::new(
            ErrorKind::InvalidArgument,
            format!("invalid {kind} name {}: {why}", brief(name)),
        )),
        None => Ok(()),
    }
}

/// The listening socket; removed when dropped.
pub struct ControlServer {
    path: PathBuf,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Runs `f` with a short path to `<state_dir>/control`: socket addresses are
/// limited to 108 bytes, state directories are not, and a path through the
/// directory's descriptor in /proc always fits.
fn with_socket_path<T>(state_dir: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let dir = fs::File::open(state_dir)?;
    f(&PathBuf::from(format!(
        "/proc/self/fd/{}/{SOCKET}",
        dir.as_raw_fd()
    )))
}

/// Binds `<state_dir>/control` and serves it on background threads.
pub fn serve(state_dir: &Path, handler: Arc<dyn Handler>) -> io::Result<ControlServer> {
    let path = state_dir.join(SOCKET);
    // A socket left by a dead worker (the state lock proves none is alive).
    if let Ok(md) = fs::symlink_metadata(&path) {
        if md.file_type().is_socket() {
            fs::remove_file(&path)?;
        }
    }
    let listener = with_socket_path(state_dir, |p| UnixListener::bind(p))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handler = handler.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(conn, &*handler) {
                            tracing::debug!("control connection ended: {e}");
                        }
                    });
            }
        })?;
    Ok(ControlServer { path })
}

/// The uid of the process at the other end of `conn`.
fn peer_uid(conn: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid out-pointers of the right size.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn send(out: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    out.write_all(&line)
}

fn refuse(out: &mut UnixStream, e: ControlError) -> io::Result<()> {
    send(
        out,
        &Reply {
            ok: false,
            result: None,
            error: Some(e),
        },
    )
}

/// Sends a last error and closes: first the reply, then, so that a client
/// still sending gets the reply rather than EPIPE, up to one more line of
/// its input is read and dropped (for at most a second).
fn refuse_and_close(conn: &UnixStream, e: ControlError) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    refuse(&mut out, e)?;
    conn.shutdown(std::net::Shutdown::Write)?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let _ = io::copy(&mut conn.take(MAX_LINE + 1), &mut io::sink());
    Ok(())
}

fn serve_connection(conn: UnixStream, handler: &dyn Handler) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    let uid = peer_uid(&conn)?;
    if uid != 0 {
        return refuse_and_close(
            &conn,
            ControlError::new(
                ErrorKind::AccessDenied,
                format!(
                    "uid {uid} may not control this worker: only root may; use the agentfs service"
                ),
            ),
        );
    }
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && n as u64 > MAX_LINE {
            return refuse_and_close(
                &conn,
                ControlError::new(
                    ErrorKind::InvalidArgument,
                    format!("request longer than {MAX_LINE} bytes; closing the connection"),
                ),
            );
        }
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => match handler.handle(req) {
                Ok(v) => Reply {
                    ok: true,
                    result: Some(v),
                    error: None,
                },
                Err(e) => {
                    // The host failing a change belongs in the log; a
                    // caller's mistake (a wrong name) only in the reply.
                    if matches!(e.kind, ErrorKind::NoSpace | ErrorKind::Io) {
                        tracing::warn!("control request failed: {}", e.message);
                    }
                    Reply {
                        ok: false,
                        result: None,
                        error: Some(e),
                    }
                }
            },
            Err(e) => Reply {
                ok: false,
                result: None,
                error: Some(ControlError::new(
                    ErrorKind::InvalidArgument,
                    format!("malformed request: {e}"),
                )),
            },
        };
        send(&mut out, &reply)?;
    }
}

/// Sends one request to the worker of `state_dir` and returns its result.
pub fn call(state_dir: &Path, req: &Request) -> Result<serde_json::Value, ControlError> {
    let path = state_dir.join(SOCKET);
    let mut conn = with_socket_path(state_dir, |p| UnixStream::connect(p)).map_err(|e| {
        ControlError::new(
            ErrorKind::Io,
            format!(
                "cannot reach the worker at {}: {e}; is a worker running on this state directory?",
                path.display()
            ),
        )
    })?;
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    conn.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer)?;
    let reply: Reply = serde_json::from_str(&answer).map_err(|e| {
        ControlError::new(
            ErrorKind::Io,
            format!("the worker sent a malformed reply: {e}"),
        )
    })?;
    match (reply.ok, reply.result, reply.error) {
        (true, Some(v), _) => Ok(v),
        (true, None, _) => Ok(serde_json::Value::Null),
        (false, _, Some(e)) => Err(e),
        (false, _, None) => Err(ControlError::new(
            ErrorKind::Io,
            "the worker failed without saying why",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        fn handle(&self, req: Request) -> Result<serde_json::Value, ControlError> {
            match req {
                Request::SnapshotDelete { snapshot } => Err(ControlError::new(
                    ErrorKind::NotFound,
                    format!("no snapshot {snapshot:?}"),
                )),
                other => Ok(serde_json::to_value(other).unwrap()),
            }
        }
    }

    fn raw(state: &Path, text: &[u8]) -> String {
        let mut c = with_socket_path(state, |p| UnixStream::connect(p)).unwrap();
        // The server may close before reading everything (overlong lines):
        // what counts is the reply it sent.
        let _ = c.write_all(text);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut s = Vec::new();
        let _ = c.read_to_end(&mut s);
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn requests_round_trip_and_errors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let _server = serve(dir.path(), Arc::new(Echo)).unwrap();
        let req = Request::SnapshotCreate {
            branch: None,
            name: Some("a".into()),
        };
        assert_eq!(
            call(dir.path(), &req).unwrap(),
            serde_json::json!({"op": "snapshot-create", "name": "a"})
        );
        let e = call(
            dir.path(),
            &Request::SnapshotDelete {
                snapshot: "x".into(),
            },
        )
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        // Several requests on one connection, then bad ones.
        let out = raw(dir.path(), b"{\"op\":\"snapshot-list\"}\n{\"op\":\"snapshot-list\"}\n{\"op\":\"nope\"}\n{\"op\":\"snapshot-list\",\"x\":1}\nnot json\n\xff\xfe\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{out}");
        assert!(lines[0].contains("\"ok\":true") && lines[1].contains("\"ok\":true"));
        for l in &lines[2..] {
            assert!(l.contains("invalid-argument"), "{l}");
        }
    }

    #[test]
    fn long_state_directory_paths_work() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("x".repeat(100)).join("y".repeat(100));
        fs::create_dir_all(&deep).unwrap();
        let _server = serve(&deep, Arc::new(Echo)).unwrap();
        assert!(call(&deep, &Request::SnapshotList {}).is_ok());
    }

    #[test]
    fn overlong_lines_are_refused_and_the_server_lives_on() {
        let dir = tempfile::tempdir().unwrap();
        let _server = serve(dir.path(), Arc::new(Echo)).unwrap();
        let mut long = vec![b'x'; 100 * 1024];
        long.push(b'\n');
        let out = raw(dir.path(), &long);
        assert_eq!(out.lines().count(), 1);
        assert!(out.contains("longer than"), "{out}");
        assert!(call(dir.path(), &Request::SnapshotList {}).is_ok());
    }

    #[test]
    fn only_root_may_connect() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let _server = serve(dir.path(), Arc::new(Echo)).unwrap();
        // Open the file mode to everyone: the credential check must still refuse.
        let sock = dir.path().join(SOCKET);
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
        let script = format!(
            "import socket; s=socket.socket(socket.AF_UNIX); s.connect({:?}); s.sendall(b'{{\"op\":\"snapshot-list\"}}\\n'); print(s.makefile().readline())",
            sock.to_str().unwrap()
        );
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                &script,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("access-denied") && text.contains("uid 65534"),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", ".", "..", "a/b", "a\0b", &"n".repeat(256)] {
            assert_eq!(
                validate_name("snapshot", bad).unwrap_err().kind,
                ErrorKind::InvalidArgument,
                "{bad:?}"
            );
        }
        let e = validate_name("branch", "x/y").unwrap_err();
        assert!(
            e.message.contains("branch") && e.message.contains("x/y"),
            "{}",
            e.message
        );
        validate_name("snapshot", &"n".repeat(255)).unwrap();
        validate_name("snapshot", "clean-1.2_x").unwrap();
    }
}
