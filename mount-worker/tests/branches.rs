//! Branches and bindings on real mounts: branches created from snapshots
//! diverge from each other and from main, are reachable at
//! `.agentfs/branches/<name>/`, and are what a bound process (and its
//! threads, and the children it forks after the bind, and every process of
//! a bound cgroup) sees at the very same paths under the mount root.
//! Snapshots of branches never change; bad requests are refused with the
//! right error and change nothing; deleting gives the space back; and
//! everything acknowledged survives a kill -9 of the worker.
//! (Contract 1, 2.1, 2.3-2.8; specs/design-branches.md.)

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use agentfs_mount_worker::control::{ControlError, ErrorKind, Request};
use agentfs_mount_worker::snapshot::Catalog;
use common::{
    Mount, bind_pid, branch, branch_dir, ctl, snapshot, snapshot_dir, tree, tree_content,
};
use serde_json::{Value, json};

/// The record of the branch called `name` in `branch-list`.
fn listed_branch(m: &Mount, name: &str) -> Option<Value> {
    let list = ctl(m, Request::BranchList {}).expect("branch-list");
    list.as_array()
        .expect("branch-list returns an array")
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

/// The current bindings.
fn bindings(m: &Mount) -> Vec<Value> {
    let list = ctl(m, Request::BindingList {}).expect("binding-list");
    list.as_array()
        .expect("binding-list returns an array")
        .clone()
}

/// The error a request must fail with.
fn refused(m: &Mount, req: Request) -> ControlError {
    let what = format!("{req:?}");
    match ctl(m, req) {
        Ok(v) => panic!("{what} should fail, but returned {v}"),
        Err(e) => e,
    }
}

/// Asserts that `req` fails with `kind` and a message naming `names`.
fn assert_refused(m: &Mount, req: Request, kind: ErrorKind, names: &str) {
    let what = format!("{req:?}");
    let e = refused(m, req);
    assert_eq!(e.kind, kind, "{what}: {}", e.message);
    assert!(
        e.message.contains(names),
        "{what}: the message should name {names:?}: {}",
        e.message
    );
}

/// Deletes branch `name` (without force) once the files closed just
/// before are released: the kernel sends RELEASE after close(2) returns,
/// so the branch may look busy for a moment.
fn delete_once_closed(m: &Mount, name: &str) {
    for _ in 0..50 {
        let deleted = ctl(
            m,
            Request::BranchDelete {
                branch: name.into(),
                force: false,
            },
        );
        match deleted {
            Ok(_) => return,
            Err(e) if e.kind == ErrorKind::Busy => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("branch-delete {name}: {e}"),
        }
    }
    panic!("branch {name} stays busy after its files were closed");
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.map(drop).unwrap_err().raw_os_error()
}

/// A path's modification time, to the nanosecond.
fn mtime(p: &Path) -> (i64, i64) {
    let md = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (md.mtime(), md.mtime_nsec())
}

/// Moving a directory of the snapshot in a branch copies its tree up;
/// the directories in it keep their times, as on the host, in what the
/// kernel cached and in what the worker says afresh after a restart.
#[test]
fn a_moved_directory_keeps_the_times_of_the_directories_it_holds() {
    let mut m = Mount::builder()
        .populate(|s| {
            fs::create_dir_all(s.join("d/tree/sub/deeper")).unwrap();
            fs::write(s.join("d/tree/sub/f"), b"f").unwrap();
        })
        .start();
    snapshot(&m, None, "s");
    branch(&m, "s", "b");
    let d = branch_dir(&m, "b").join("d");
    let before = [
        mtime(&d.join("tree/sub")),
        mtime(&d.join("tree/sub/deeper")),
    ];
    fs::rename(d.join("tree"), d.join("moved")).unwrap();
    let moved = || {
        [
            mtime(&d.join("moved/sub")),
            mtime(&d.join("moved/sub/deeper")),
        ]
    };
    assert_eq!(moved(), before, "as the kernel has them");
    m.kill();
    m.restart(&[]);
    assert_eq!(moved(), before, "as the worker has them");
    assert_eq!(fs::read(d.join("moved/sub/f")).unwrap(), b"f");
}

/// A directory moved in a branch keeps its node, and so do the
/// directories it holds, although they no longer stand on main's (the
/// move detached them): a descriptor opened on one before still names it
/// at its new path. With every name looked up again (cache timeout 0).
#[test]
fn directories_moved_in_a_branch_keep_their_nodes() {
    let m = Mount::builder()
        .populate(|s| {
            fs::create_dir_all(s.join("d/sub/deeper")).unwrap();
            fs::write(s.join("d/sub/f"), b"f").unwrap();
        })
        .arg("--cache-timeout-ms")
        .arg("0")
        .start();
    snapshot(&m, None, "s");
    branch(&m, "s", "b");
    let b = branch_dir(&m, "b");
    // The branch's own copy of `d`, so that it merges main's.
    fs::write(b.join("d/mine"), b"").unwrap();
    let held: Vec<File> = ["d/sub", "d/sub/deeper"]
        .iter()
        .map(|p| File::open(b.join(p)).unwrap())
        .collect();
    fs::rename(b.join("d"), b.join("moved")).unwrap();
    for (f, p) in held.iter().zip(["moved/sub", "moved/sub/deeper"]) {
        let now = fs::metadata(b.join(p)).unwrap();
        assert_eq!(f.metadata().unwrap().ino(), now.ino(), "{p}");
        let named = fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert_eq!(named, b.join(p), "the kernel's name of {p}");
    }
    assert_eq!(fs::read(b.join("moved/sub/f")).unwrap(), b"f");
}

/// A first change to a file in a branch copies it up into the branch's
/// copy of its directory; the directory keeps its times all the same
/// (a chmod or write of `d/f` changes no name in `d`), after a restart
/// too. A new name in it still changes them.
#[test]
fn a_copy_up_leaves_the_times_of_its_directory() {
    let mut m = Mount::builder()
        .populate(|s| {
            fs::create_dir_all(s.join("d/e")).unwrap();
            for f in ["d/f", "d/g", "d/e/h"] {
                fs::write(s.join(f), b"x").unwrap();
            }
            fs::hard_link(s.join("d/g"), s.join("d/g2")).unwrap();
            // Older than anything the test does.
            for p in ["d", "d/e"] {
                let old =
                    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
                fs::File::open(s.join(p))
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        })
        .start();
    snapshot(&m, None, "s");
    branch(&m, "s", "b");
    let d = branch_dir(&m, "b").join("d");
    let before = [mtime(&d), mtime(&d.join("e"))];
    fs::set_permissions(d.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(d.join("g"))
        .unwrap()
        .write_all(b"y")
        .unwrap();
    fs::write(d.join("e/h"), b"z").unwrap();
    let now = || [mtime(&d), mtime(&d.join("e"))];
    assert_eq!(now(), before, "as the kernel has them");
    m.kill();
    m.restart(&[]);
    assert_eq!(now(), before, "as the worker has them");
    assert_eq!(fs::read(d.join("g2")).unwrap(), b"xy");
    assert_eq!(fs::read(d.join("e/h")).unwrap(), b"z");
    fs::write(d.join("new"), b"").unwrap();
    assert_ne!(mtime(&d), before[0], "a new name changes them");
}

// ---------------------------------------------------------------------------
// Divergence: two branches edited differently through their paths.

/// A source with files, directories, a symlink and xattrs.
fn populate(s: &Path) {
    fs::write(s.join("a.txt"), b"alpha").unwrap();
    fs::write(s.join("big.bin"), vec![b'x'; 100_000]).unwrap();
    fs::create_dir(s.join("notes")).unwrap();
    fs::write(s.join("notes/todo.txt"), b"todo list\n").unwrap();
    fs::write(s.join("notes/done.txt"), b"done list\n").unwrap();
    fs::create_dir_all(s.join("tree/sub")).unwrap();
    fs::write(s.join("tree/top.txt"), b"top").unwrap();
    fs::write(s.join("tree/sub/deep.txt"), b"deep").unwrap();
    fs::create_dir(s.join("gone")).unwrap();
    fs::write(s.join("gone/g1"), b"1").unwrap();
    fs::write(s.join("gone/g2"), b"2").unwrap();
    fs::create_dir(s.join("redo")).unwrap();
    fs::write(s.join("redo/old.txt"), b"old").unwrap();
    fs::write(s.join("victim"), b"to be deleted").unwrap();
    fs::write(s.join("moved"), b"to be renamed").unwrap();
    fs::write(s.join("mapped"), vec![0u8; 8192]).unwrap();
    std::os::unix::fs::symlink("a.txt", s.join("link")).unwrap();
    fs::create_dir(s.join("emptydir")).unwrap();
    common::setxattr(&s.join("a.txt"), "user.orig", "source");
}

/// One branch's edits, applied the same way to a branch's directory and
/// to a plain reference copy. `who` makes every branch's edits different
/// on the same paths.
fn edit(root: &Path, who: &str) {
    let n = if who == "a" { 1 } else { 2 };
    let r = |p: &str| root.join(p);
    // Overwrite, append, truncate, chmod, xattrs on a file and a directory.
    fs::write(r("a.txt"), format!("overwritten by {who}\n").repeat(n)).unwrap();
    let mut f = OpenOptions::new().append(true).open(r("big.bin")).unwrap();
    f.write_all(who.repeat(1000 * n).as_bytes()).unwrap();
    drop(f);
    OpenOptions::new()
        .write(true)
        .open(r("notes/todo.txt"))
        .unwrap()
        .set_len(2 * n as u64)
        .unwrap();
    let mode = if who == "a" { 0o600 } else { 0o444 };
    fs::set_permissions(r("notes/done.txt"), fs::Permissions::from_mode(mode)).unwrap();
    common::setxattr(&r("a.txt"), "user.x", who);
    common::setxattr(&r("notes"), "user.dir", who);
    // Renames: a file, and a directory with content, then a change inside.
    fs::rename(r("moved"), r(&format!("moved-{who}"))).unwrap();
    fs::rename(r("tree"), r(&format!("tree-{who}"))).unwrap();
    fs::write(r(&format!("tree-{who}/sub/deep.txt")), who).unwrap();
    // Unlink; empty a directory and remove it.
    fs::remove_file(r("victim")).unwrap();
    fs::remove_file(r("gone/g1")).unwrap();
    fs::remove_file(r("gone/g2")).unwrap();
    fs::remove_dir(r("gone")).unwrap();
    // New directories (one with the same name in both branches).
    fs::create_dir_all(r(&format!("new-{who}/inner"))).unwrap();
    fs::create_dir(r("common-new")).unwrap();
    fs::write(r("common-new/f"), who.repeat(n)).unwrap();
    // Symlinks: replace one, make one.
    fs::remove_file(r("link")).unwrap();
    std::os::unix::fs::symlink(format!("target-{who}"), r("link")).unwrap();
    std::os::unix::fs::symlink("a.txt", r(&format!("sl-{who}"))).unwrap();
    // A hard link between two new files.
    fs::write(r(&format!("new-{who}/h1")), who).unwrap();
    fs::hard_link(r(&format!("new-{who}/h1")), r(&format!("new-{who}/h2"))).unwrap();
    if who == "b" {
        // A directory of the snapshot removed and made again: none of the
        // old entries may come back.
        fs::remove_dir_all(r("redo")).unwrap();
        fs::create_dir(r("redo")).unwrap();
        fs::write(r("redo/fresh.txt"), b"fresh").unwrap();
        fs::set_permissions(r("emptydir"), fs::Permissions::from_mode(0o700)).unwrap();
    }
}

/// A copy of `src` (with modes, owners, times, xattrs and links) in a new
/// temporary directory.
fn reference_copy(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    (d, copy)
}

/// Exact trees of every view the divergence test made, by name.
fn views(m: &Mount) -> [(&'static str, std::collections::BTreeMap<PathBuf, String>); 5] {
    [
        ("a", tree(&branch_dir(m, "a"))),
        ("b", tree(&branch_dir(m, "b"))),
        ("base", tree(&snapshot_dir(m, "base"))),
        ("main", tree(m.path())),
        ("source", tree(m.source())),
    ]
}

#[test]
fn branches_diverge_and_never_touch_main_or_their_snapshot() {
    let mut m = Mount::builder().populate(populate).start();
    let (_ra, ref_a) = reference_copy(m.source());
    let (_rb, ref_b) = reference_copy(m.source());
    let main_before = tree(m.path());
    let source_before = tree(m.source());
    let base = snapshot(&m, None, "base");
    let base_before = tree(&snapshot_dir(&m, "base"));
    assert_eq!(base_before, main_before, "the snapshot shows main");

    let a = branch(&m, "base", "a");
    let b = branch(&m, "base", "b");
    assert_eq!(a["name"], "a");
    assert_eq!(a["snapshot"], base["id"]);
    assert_eq!(b["snapshot"], base["id"]);
    assert_ne!(a["id"], b["id"]);
    assert_eq!(listed_branch(&m, "a").unwrap()["id"], a["id"]);
    // A new branch shows its snapshot.
    assert_eq!(tree(&branch_dir(&m, "a")), base_before);

    edit(&branch_dir(&m, "a"), "a");
    edit(&branch_dir(&m, "b"), "b");
    edit(&ref_a, "a");
    edit(&ref_b, "b");

    assert_eq!(
        common::tree_content(&branch_dir(&m, "a")),
        common::tree_content(&ref_a),
        "branch a shows exactly its own edits"
    );
    assert_eq!(
        common::tree_content(&branch_dir(&m, "b")),
        common::tree_content(&ref_b),
        "branch b shows exactly its own edits"
    );
    assert_eq!(tree(m.path()), main_before, "main changed");
    assert_eq!(tree(m.source()), source_before, "the source changed");
    assert_eq!(
        tree(&snapshot_dir(&m, "base")),
        base_before,
        "the snapshot changed"
    );
    // Spot checks, so that a failure of the maps above reads plainly too.
    let (pa, pb) = (branch_dir(&m, "a"), branch_dir(&m, "b"));
    assert_eq!(fs::read(pa.join("a.txt")).unwrap(), b"overwritten by a\n");
    assert_eq!(fs::read(m.path().join("a.txt")).unwrap(), b"alpha");
    assert_eq!(fs::read(pb.join("tree-b/sub/deep.txt")).unwrap(), b"b");
    assert!(!pa.join("tree").exists() && !pa.join("tree-b").exists());
    assert_eq!(
        errno(fs::metadata(pb.join("redo/old.txt"))),
        Some(libc::ENOENT)
    );
    assert_eq!(fs::read(pa.join("redo/old.txt")).unwrap(), b"old");
    assert_eq!(
        fs::metadata(pa.join("new-a/h1")).unwrap().ino(),
        fs::metadata(pa.join("new-a/h2")).unwrap().ino()
    );
    assert_ne!(
        fs::metadata(pa.join("a.txt")).unwrap().ino(),
        fs::metadata(pb.join("a.txt")).unwrap().ino(),
        "the same path in two branches is two inodes"
    );

    let before = views(&m);
    m.kill();
    m.restart(&[]);
    let after = views(&m);
    for ((name, x), (_, y)) in before.iter().zip(after.iter()) {
        assert_eq!(x, y, "{name} changed across a kill -9 and restart");
    }
    let list = ctl(&m, Request::BranchList {}).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}

// ---------------------------------------------------------------------------
// Bindings: processes that see a branch at the mount's own paths.

/// An agent: a python process that carries out one JSON command per line
/// on stdin and answers one JSON line on stdout. Commands:
/// - `observe {path, dir}`: stat, read, mmap-read `path`, list `dir`;
/// - `read {path}`, `write {path, data}`, `mmap-write {path, offset, data}`;
/// - `thread {inner}`: `inner` in a new thread;
/// - `fork {inner}`: `inner` in a child forked now;
/// - `prefork {inner}`: `inner` in the child forked when the agent started;
/// - `exec {argv}`: run a program, answer its status and stdout.
///
/// Data travels as latin-1 strings; an OSError is answered as `{errno}`.
const AGENT: &str = r#"
import ctypes, json, mmap, os, subprocess, sys, threading

def observe(op):
    p = op["path"]
    st = os.stat(p)
    with open(p, "rb", buffering=0) as f:
        data = f.read()
    with open(p, "rb", buffering=0) as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            mapped = mm[:]
    return {"size": st.st_size, "data": data.decode("latin-1"),
            "mapped": mapped.decode("latin-1"),
            "entries": sorted(os.listdir(op["dir"]))}

def run(op):
    kind = op["op"]
    try:
        if kind == "observe":
            return observe(op)
        if kind == "read":
            with open(op["path"], "rb", buffering=0) as f:
                return {"data": f.read().decode("latin-1")}
        if kind == "write":
            with open(op["path"], "wb", buffering=0) as f:
                f.write(op["data"].encode("latin-1"))
            return {}
        if kind == "mmap-write":
            data = op["data"].encode("latin-1")
            with open(op["path"], "r+b", buffering=0) as f:
                with mmap.mmap(f.fileno(), 0) as mm:
                    mm[op["offset"]:op["offset"] + len(data)] = data
                    mm.flush()
            return {}
        if kind == "thread":
            out = []
            t = threading.Thread(target=lambda: out.append(run(op["inner"])))
            t.start()
            t.join()
            return out[0]
        if kind == "fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                os.write(w, json.dumps(run(op["inner"])).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                out = f.read()
            os.waitpid(pid, 0)
            return json.loads(out)
        if kind == "prefork":
            to_pre.write(json.dumps(op["inner"]) + "\n")
            to_pre.flush()
            return json.loads(from_pre.readline())
        if kind == "exec":
            p = subprocess.run(op["argv"], capture_output=True)
            return {"status": p.returncode, "stdout": p.stdout.decode("latin-1")}
        return {"error": "unknown op " + kind}
    except OSError as e:
        return {"errno": e.errno}
    except Exception as e:
        return {"error": repr(e)}

# A child forked now, before any bind: it must keep seeing what it saw.
pr, cw = os.pipe()
cr, pw = os.pipe()
pre = os.fork()
if pre == 0:
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    os.close(cw)
    os.close(cr)
    out = os.fdopen(pw, "w")
    for line in os.fdopen(pr, "r"):
        out.write(json.dumps(run(json.loads(line))) + "\n")
        out.flush()
    os._exit(0)
os.close(pr)
os.close(pw)
to_pre, from_pre = os.fdopen(cw, "w"), os.fdopen(cr, "r")
print(json.dumps({"pid": os.getpid(), "prefork": pre}), flush=True)
for line in sys.stdin:
    print(json.dumps(run(json.loads(line))), flush=True)
"#;

/// A running [`AGENT`]; killed and reaped when dropped (its pre-forked
/// child dies with it: PR_SET_PDEATHSIG).
struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Agent {
    fn spawn() -> Agent {
        let mut child = Command::new("python3")
            .args(["-c", AGENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = child.id();
        let mut agent = Agent {
            child,
            stdin,
            stdout,
            pid,
        };
        let hello = agent.answer();
        assert_eq!(hello["pid"], pid, "the agent is the spawned process");
        agent
    }

    fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("agent {} answered {line:?}: {e}", self.pid))
    }

    fn call(&mut self, op: &Value) -> Value {
        let mut line = serde_json::to_vec(op).unwrap();
        line.push(b'\n');
        self.stdin.write_all(&line).unwrap();
        self.answer()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        common::signal(self.pid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Lets clock ticks pass: process start times and bind times are compared
/// in clock ticks (10 ms), so children forked around a bind are told apart
/// only with some time between.
fn tick() {
    std::thread::sleep(Duration::from_millis(100));
}

/// What `shared.txt` holds in each view; its size differs by view.
fn content(view: &str) -> String {
    let n = match view {
        "main" => 10,
        "a" => 20,
        _ => 30,
    };
    format!("{view}:").repeat(n)
}

/// The entries of `d/` in each view.
fn entries(view: &str) -> Vec<&'static str> {
    match view {
        "main" => vec!["common"],
        "a" => vec!["common", "only-a"],
        _ => vec!["only-b"],
    }
}

/// What an `observe` command answers in each view.
fn expect(view: &str) -> Value {
    let c = content(view);
    json!({"size": c.len(), "data": c, "mapped": c, "entries": entries(view)})
}

fn populate_views(s: &Path) {
    fs::write(s.join("shared.txt"), content("main")).unwrap();
    fs::create_dir(s.join("d")).unwrap();
    fs::write(s.join("d/common"), b"").unwrap();
    fs::write(s.join("m.bin"), vec![0u8; 4096]).unwrap();
}

/// Snapshot `base` of main, then branches `a` and `b` whose `shared.txt`
/// and `d/` differ (see [`content`], [`entries`]). Returns their ids.
fn make_views(m: &Mount) -> (Value, Value) {
    snapshot(m, None, "base");
    let a = branch(m, "base", "a")["id"].clone();
    let b = branch(m, "base", "b")["id"].clone();
    for view in ["a", "b"] {
        let dir = branch_dir(m, view);
        fs::write(dir.join("shared.txt"), content(view)).unwrap();
    }
    fs::write(branch_dir(m, "a").join("d/only-a"), b"").unwrap();
    fs::write(branch_dir(m, "b").join("d/only-b"), b"").unwrap();
    fs::remove_file(branch_dir(m, "b").join("d/common")).unwrap();
    (a, b)
}

fn observe(m: &Mount) -> Value {
    json!({
        "op": "observe",
        "path": m.path().join("shared.txt"),
        "dir": m.path().join("d"),
    })
}

/// True if `binding-list` has a pid binding of `pid` to branch `id`.
fn pid_bound(m: &Mount, pid: u32, id: &Value) -> bool {
    bindings(m)
        .iter()
        .any(|b| b["kind"] == "pid" && b["pid"] == pid && b["branch"] == *id)
}

#[test]
fn bound_processes_see_their_branch_at_the_same_path() {
    let m = Mount::builder().populate(populate_views).start();
    let (a_id, b_id) = make_views(&m);
    let mut a = Agent::spawn();
    let mut b = Agent::spawn();
    let mut main = Agent::spawn();
    tick();
    bind_pid(&m, "a", a.pid);
    bind_pid(&m, "b", b.pid);
    tick();
    assert!(pid_bound(&m, a.pid, &a_id) && pid_bound(&m, b.pid, &b_id));
    assert_eq!(bindings(&m).len(), 2, "{:?}", bindings(&m));

    // Two branches alternating on the same paths, in lock step, 10 000
    // times; an unbound process in between sees main.
    let op = observe(&m);
    let (ea, eb, emain) = (expect("a"), expect("b"), expect("main"));
    for i in 0..10_000 {
        let (agent, want, view) = if i % 2 == 0 {
            (&mut a, &ea, "a")
        } else {
            (&mut b, &eb, "b")
        };
        let got = agent.call(&op);
        assert_eq!(&got, want, "round {i}: the process bound to {view}");
        if i % 100 == 0 {
            assert_eq!(main.call(&op), emain, "round {i}: an unbound process");
        }
    }
    // The test itself is unbound too.
    assert_eq!(
        fs::read_to_string(m.path().join("shared.txt")).unwrap(),
        content("main")
    );

    // Threads, children forked after the bind and programs they exec see the
    // branch; a child forked before the bind does not.
    assert_eq!(a.call(&json!({"op": "thread", "inner": op})), ea, "thread");
    assert_eq!(
        a.call(&json!({"op": "fork", "inner": op})),
        ea,
        "forked child"
    );
    assert_eq!(
        a.call(&json!({"op": "fork", "inner": {"op": "thread", "inner": op}})),
        ea,
        "a thread of a forked child"
    );
    let cat = json!({"op": "exec", "argv": ["cat", m.path().join("shared.txt")]});
    assert_eq!(
        a.call(&cat),
        json!({"status": 0, "stdout": content("a")}),
        "exec'd child"
    );
    assert_eq!(b.call(&json!({"op": "fork", "inner": op})), eb);
    assert_eq!(
        a.call(&json!({"op": "prefork", "inner": op})),
        emain,
        "a child forked before the bind"
    );

    // Writes (write + close; mmap + msync; from a forked child) land in the
    // writer's branch only.
    let written = m.path().join("written.txt");
    let write = |data: &str| json!({"op": "write", "path": written, "data": data});
    assert_eq!(a.call(&write("by a")), json!({}));
    assert_eq!(b.call(&write("by b")), json!({}));
    let mb = m.path().join("m.bin");
    let mmap_write = |offset: usize, data: &str| json!({"op": "mmap-write", "path": mb, "offset": offset, "data": data});
    assert_eq!(a.call(&mmap_write(100, "mapped-by-a")), json!({}));
    assert_eq!(b.call(&mmap_write(200, "mapped-by-b")), json!({}));
    let from_child = json!({"op": "fork", "inner": {
        "op": "write", "path": m.path().join("from-child"), "data": "child of a"}});
    assert_eq!(a.call(&from_child), json!({}));

    let (pa, pb) = (branch_dir(&m, "a"), branch_dir(&m, "b"));
    assert_eq!(fs::read(pa.join("written.txt")).unwrap(), b"by a");
    assert_eq!(fs::read(pb.join("written.txt")).unwrap(), b"by b");
    assert_eq!(fs::read(pa.join("from-child")).unwrap(), b"child of a");
    assert!(!pb.join("from-child").exists());
    for gone in ["written.txt", "from-child"] {
        assert!(!m.path().join(gone).exists(), "{gone} reached main");
        assert!(!m.source().join(gone).exists(), "{gone} reached the source");
    }
    let mapped = |at: usize, data: &[u8]| {
        let mut v = vec![0u8; 4096];
        v[at..at + data.len()].copy_from_slice(data);
        v
    };
    assert_eq!(
        fs::read(pa.join("m.bin")).unwrap(),
        mapped(100, b"mapped-by-a")
    );
    assert_eq!(
        fs::read(pb.join("m.bin")).unwrap(),
        mapped(200, b"mapped-by-b")
    );
    assert_eq!(fs::read(m.path().join("m.bin")).unwrap(), vec![0u8; 4096]);
    assert_eq!(fs::read(m.source().join("m.bin")).unwrap(), vec![0u8; 4096]);
    assert_eq!(
        a.call(&json!({"op": "read", "path": written})),
        json!({"data": "by a"})
    );
    assert_eq!(
        main.call(&json!({"op": "read", "path": written})),
        json!({"errno": libc::ENOENT})
    );

    // Unbound, a process sees main again.
    ctl(&m, Request::UnbindPid { pid: a.pid as i32 }).expect("unbind-pid");
    assert_eq!(a.call(&op), emain, "after unbind-pid");
    assert!(!pid_bound(&m, a.pid, &a_id));
    assert!(pid_bound(&m, b.pid, &b_id));
    assert_eq!(b.call(&op), eb);
}

/// An agent bound to branch `a` that reads `shared` (shared.txt at the
/// root) and sees a's content at once, and the read request.
fn bound_reader(m: &Mount, shared: &Path) -> (Agent, Value) {
    let mut a = Agent::spawn();
    tick();
    bind_pid(m, "a", a.pid);
    let read = json!({"op": "read", "path": shared});
    assert_eq!(
        a.call(&read),
        json!({"data": content("a")}),
        "bound: its branch at once"
    );
    (a, read)
}

/// A mount over its own source with the views of [`populate_views`],
/// no source watch and a long cache timeout, so that what the kernel
/// caches shows as a change behind the mount that is not seen; and a
/// way under the mount to make such changes.
fn over_source_unwatched() -> (Mount, File) {
    let under = std::sync::Arc::new(std::sync::Mutex::new(None));
    let keep = under.clone();
    let m = Mount::builder()
        .over_source()
        .populate(move |s| {
            populate_views(s);
            *keep.lock().unwrap() = Some(File::open(s).unwrap());
        })
        .arg("--no-source-watch")
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    let under = under.lock().unwrap().take().unwrap();
    (m, under)
}

/// While nothing is bound the kernel caches the mount root's names too
/// (a `git status` at the root then costs no lookup per path). The first
/// binding makes it forget them, so a bound process never meets main's
/// names at the root; while anything is bound none is cached; after the
/// last unbinding they are cached again.
#[test]
fn root_names_are_cached_only_while_nothing_is_bound() {
    let (m, under) = over_source_unwatched();
    let behind = |name: &str| {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}/{name}", under.as_raw_fd()))
    };
    make_views(&m);
    let root = m.path();
    let shared = root.join("shared.txt");
    // An absence stays cached while nothing is bound, a name too.
    assert_eq!(fs::read_to_string(&shared).unwrap(), content("main"));
    assert!(!root.join("late").exists());
    fs::write(behind("late"), b"").unwrap();
    assert!(
        !root.join("late").exists(),
        "nothing bound: the absence is cached"
    );

    let (mut a, read) = bound_reader(&m, &shared);
    assert!(root.join("late").exists(), "forgotten at the first binding");
    fs::write(behind("later"), b"").unwrap();
    assert!(
        root.join("later").exists(),
        "something bound: nothing cached at the root"
    );

    ctl(&m, Request::UnbindPid { pid: a.pid as i32 }).expect("unbind-pid");
    assert_eq!(
        a.call(&read),
        json!({"data": content("main")}),
        "unbound: main at once"
    );
    assert!(!root.join("latest").exists());
    fs::write(behind("latest"), b"").unwrap();
    assert!(
        !root.join("latest").exists(),
        "nothing bound again: cached again"
    );
}

/// Agents rarely unbind: a bound shell exits, and with it its binding,
/// once no process that inherited it is left; the root is then cached
/// again. Nothing else changes the bindings here.
#[test]
fn root_names_are_cached_again_once_the_bound_processes_have_exited() {
    let (m, under) = over_source_unwatched();
    make_views(&m);
    let root = m.path();
    // Whether an absence at the root is cached: a name looked up, then
    // made behind the mount, is still not seen.
    let mut probes = 0;
    let mut cached = || {
        use std::os::fd::AsRawFd;
        probes += 1;
        let name = format!("probe{probes}");
        let seen = root.join(&name).exists();
        fs::write(format!("/proc/self/fd/{}/{name}", under.as_raw_fd()), b"").unwrap();
        !seen && !root.join(&name).exists()
    };
    let (mut a, _) = bound_reader(&m, &root.join("shared.txt"));
    // A child it starts in the background outlives it.
    let bg = json!({"op": "exec", "argv": ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]});
    let out = a.call(&bg);
    /// Kills the background child in all cases.
    struct Orphan(u32);
    impl Drop for Orphan {
        fn drop(&mut self) {
            common::signal(self.0, libc::SIGKILL);
        }
    }
    let orphan = Orphan(out["stdout"].as_str().unwrap().trim().parse().unwrap());
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !cached(),
        "a process that inherited the binding still lives"
    );
    drop(orphan);
    assert!(
        common::soon(&mut cached),
        "the root stayed uncached after every bound process exited"
    );
    let list = ctl(&m, Request::BindingList {}).expect("binding-list");
    assert_eq!(list, json!([]));
}

/// The kernel moves a renamed name with the time it was cached for. Moved
/// into the root while something is bound, it must not stay there for
/// the others: main's for a bound process, a branch's for an unbound one.
#[test]
fn a_name_renamed_into_the_root_is_not_seen_by_the_other_views() {
    let m = Mount::builder()
        .over_source()
        .populate(|s| {
            populate_views(s);
            fs::create_dir(s.join("sub")).unwrap();
            fs::write(s.join("sub/x"), b"main x").unwrap();
            fs::write(s.join("sub/y"), b"main y").unwrap();
        })
        .start();
    make_views(&m);
    let root = m.path();
    let (mut a, _) = bound_reader(&m, &root.join("shared.txt"));
    let read = |p: &Path| json!({"op": "read", "path": p});
    // Main's sub/x, cached, renamed into the root by an unbound process.
    assert_eq!(fs::read(root.join("sub/x")).unwrap(), b"main x");
    fs::rename(root.join("sub/x"), root.join("x")).unwrap();
    assert!(
        common::soon(|| a.call(&read(&root.join("x"))) == json!({"errno": libc::ENOENT})),
        "the bound process meets main's x at the root"
    );
    // The branch's sub/y, renamed into the root by the bound process.
    let y = root.join("sub/y");
    assert_eq!(a.call(&read(&y)), json!({"data": "main y"}));
    let mv = json!({"op": "exec", "argv": ["mv", y, root.join("y")]});
    assert_eq!(a.call(&mv)["status"], 0);
    assert!(
        common::soon(|| !root.join("y").exists()),
        "an unbound process meets a's y at the root"
    );
    assert_eq!(fs::read(root.join("sub/y")).unwrap(), b"main y");
    assert_eq!(fs::read(branch_dir(&m, "a").join("y")).unwrap(), b"main y");
}

/// A file system mounted inside the mount while nothing is bound (root
/// names cached) survives the first binding: the root's names are then
/// expired one by one instead of all names forgotten, which would detach
/// it; the bound process still sees its branch at the root at once.
#[test]
fn a_mount_inside_the_mount_survives_the_first_binding() {
    let m = Mount::builder()
        .over_source()
        .populate(|s| {
            populate_views(s);
            fs::create_dir(s.join("inner")).unwrap();
        })
        .start();
    make_views(&m);
    let shared = m.path().join("shared.txt");
    assert_eq!(fs::read_to_string(&shared).unwrap(), content("main"));
    let inner = common::Tmpfs::mount(&m.path().join("inner"));
    fs::write(inner.path().join("on-tmpfs"), b"kept").unwrap();

    let (_bound, _) = bound_reader(&m, &shared);
    assert_eq!(
        fs::read(inner.path().join("on-tmpfs")).unwrap(),
        b"kept",
        "the tmpfs inside is still mounted"
    );
    assert!(common::mounts().iter().any(|(p, _)| p == inner.path()));
}

#[test]
fn a_branch_by_path_follows_what_a_bound_process_changes_at_once() {
    let m = Mount::builder()
        .over_source()
        .populate(populate_views)
        .start();
    make_views(&m);
    let mut a = Agent::spawn();
    tick();
    bind_pid(&m, "a", a.pid);
    let (pa, root) = (branch_dir(&m, "a"), m.path());
    let run = |a: &mut Agent, argv: &[&Path]| {
        let got = a.call(&json!({"op": "exec", "argv": argv}));
        assert_eq!(got["status"], 0, "{argv:?}: {got}");
    };
    // Each name is seen by path first, so the kernel could cache it there.
    let write = |name: &str| json!({"op": "write", "path": root.join(name), "data": name});
    assert_eq!(a.call(&write("gone")), json!({}));
    assert_eq!(fs::read(pa.join("gone")).unwrap(), b"gone");
    run(&mut a, &[Path::new("rm"), &root.join("gone")]);
    assert!(!pa.join("gone").exists(), "removed by the bound process");

    assert_eq!(a.call(&write("old")), json!({}));
    assert_eq!(fs::read(pa.join("old")).unwrap(), b"old");
    run(
        &mut a,
        &[Path::new("mv"), &root.join("old"), &root.join("new")],
    );
    assert!(!pa.join("old").exists(), "renamed by the bound process");
    assert_eq!(fs::read(pa.join("new")).unwrap(), b"old");

    // A name the path did not find appears there once the bound process
    // makes it.
    assert!(!pa.join("later").exists());
    assert_eq!(a.call(&write("later")), json!({}));
    assert_eq!(fs::read(pa.join("later")).unwrap(), b"later");
    // Below the branch root both ways lead to the same directory.
    assert!(!pa.join("d/later").exists());
    assert_eq!(a.call(&write("d/later")), json!({}));
    assert_eq!(fs::read(pa.join("d/later")).unwrap(), b"d/later");

    // And the other way round.
    let read = |name: &str| json!({"op": "read", "path": root.join(name)});
    fs::write(pa.join("by-path"), b"p").unwrap();
    assert_eq!(a.call(&read("by-path")), json!({"data": "p"}));
    fs::remove_file(pa.join("by-path")).unwrap();
    assert_eq!(a.call(&read("by-path")), json!({"errno": libc::ENOENT}));

    // A rename between the two names of the branch's root: the request
    // holds the by-path root's lock, so its old name there goes right
    // after the reply.
    assert_eq!(a.call(&write("across")), json!({}));
    assert_eq!(fs::read(pa.join("across")).unwrap(), b"across");
    run(
        &mut a,
        &[Path::new("mv"), &root.join("across"), &pa.join("moved")],
    );
    assert!(common::soon(|| !pa.join("across").exists()));
    assert_eq!(fs::read(pa.join("moved")).unwrap(), b"across");
}

#[test]
fn new_branches_and_snapshots_appear_at_once() {
    let m = Mount::builder()
        .over_source()
        .populate(populate_views)
        .start();
    let agentfs = m.path().join(".agentfs");
    let (s, b) = (agentfs.join("snapshots/s"), agentfs.join("branches/b"));
    assert!(!s.exists() && !b.exists());
    snapshot(&m, None, "s");
    assert!(
        s.join("d").is_dir(),
        "a snapshot looked for before it was taken"
    );
    branch(&m, "s", "b");
    assert!(
        b.join("d").is_dir(),
        "a branch looked for before it was made"
    );
    let sb = agentfs.join("snapshots/sb");
    assert!(!sb.exists());
    snapshot(&m, Some("b"), "sb");
    assert!(sb.join("d").is_dir(), "a snapshot of a branch");
}

#[test]
fn pid_bindings_of_live_processes_survive_a_worker_kill() {
    let mut m = Mount::builder().populate(populate_views).start();
    let (a_id, b_id) = make_views(&m);
    let mut a = Agent::spawn();
    let gone = Agent::spawn();
    tick();
    bind_pid(&m, "a", a.pid);
    bind_pid(&m, "b", gone.pid);
    let gone_pid = gone.pid;
    let op = observe(&m);
    assert_eq!(a.call(&op), expect("a"));
    drop(gone); // killed and reaped: its binding must not outlive it
    m.kill();
    m.restart(&[]);
    assert_eq!(a.call(&op), expect("a"), "after the restart");
    assert_eq!(
        a.call(&json!({"op": "fork", "inner": op})),
        expect("a"),
        "a child forked after the restart"
    );
    assert!(pid_bound(&m, a.pid, &a_id), "{:?}", bindings(&m));
    assert!(
        !pid_bound(&m, gone_pid, &b_id),
        "a binding of a dead process: {:?}",
        bindings(&m)
    );
    assert_eq!(
        fs::read_to_string(m.path().join("shared.txt")).unwrap(),
        content("main")
    );
}

/// A cgroup v2 of this test, removed when dropped: the processes still in
/// it are moved back to this test's own cgroup first.
struct TestCgroup {
    dir: PathBuf,
    home: PathBuf,
}

/// This process's cgroup v2 path, as `/proc/PID/cgroup` names it.
fn cgroup_of(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("the process is in a cgroup v2 hierarchy")
        .to_owned()
}

impl TestCgroup {
    fn new() -> TestCgroup {
        let root = common::mounts()
            .into_iter()
            .find(|(_, t)| t == "cgroup2")
            .map(|(p, _)| p)
            .expect("no cgroup2 file system mounted: cgroup bindings cannot be tested");
        let home = root.join(cgroup_of(std::process::id()).trim_start_matches('/'));
        let dir = root.join(format!("agentfs-test-{}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir, home }
    }

    /// Moves process `pid` into the cgroup; returns the cgroup's path as
    /// the process's `/proc/PID/cgroup` names it.
    fn enter(&self, pid: u32) -> String {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        let path = cgroup_of(pid);
        assert!(path.ends_with(self.dir.file_name().unwrap().to_str().unwrap()));
        path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ = fs::write(self.home.join("cgroup.procs"), pid);
            }
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

#[test]
fn cgroup_bindings_send_every_process_of_the_cgroup() {
    let m = Mount::builder().populate(populate_views).start();
    let (a_id, _) = make_views(&m);
    let cgroup = TestCgroup::new();
    let mut agent = Agent::spawn();
    let op = observe(&m);
    assert_eq!(agent.call(&op), expect("main"));
    let path = cgroup.enter(agent.pid);
    ctl(
        &m,
        Request::BindCgroup {
            branch: "a".into(),
            cgroup: path.clone(),
        },
    )
    .expect("bind-cgroup");
    assert_eq!(
        bindings(&m),
        vec![json!({"kind": "cgroup", "path": path, "branch": a_id})]
    );

    assert_eq!(agent.call(&op), expect("a"), "a process of the cgroup");
    assert_eq!(
        agent.call(&json!({"op": "thread", "inner": op})),
        expect("a"),
        "its thread"
    );
    assert_eq!(
        agent.call(&json!({"op": "fork", "inner": op})),
        expect("a"),
        "its child (in the cgroup too)"
    );
    assert_eq!(
        agent.call(&json!({"op": "prefork", "inner": op})),
        expect("main"),
        "its older child, left outside the cgroup"
    );
    assert_eq!(
        fs::read_to_string(m.path().join("shared.txt")).unwrap(),
        content("main"),
        "a process outside the cgroup"
    );
    // A pid binding comes before the cgroup's.
    bind_pid(&m, "b", agent.pid);
    assert_eq!(
        agent.call(&op),
        expect("b"),
        "pid binding over cgroup binding"
    );
    ctl(
        &m,
        Request::UnbindPid {
            pid: agent.pid as i32,
        },
    )
    .unwrap();
    assert_eq!(agent.call(&op), expect("a"));

    ctl(&m, Request::UnbindCgroup { cgroup: path }).expect("unbind-cgroup");
    assert_eq!(bindings(&m), Vec::<Value>::new());
    assert_eq!(agent.call(&op), expect("main"), "after unbind-cgroup");
    drop(agent);
    drop(cgroup);
}

// ---------------------------------------------------------------------------
// Snapshots of branches.

#[test]
fn a_snapshot_of_a_branch_never_changes() {
    let m = Mount::builder().populate(populate).start();
    let main_before = tree(m.path());
    snapshot(&m, None, "base");
    let a_id = branch(&m, "base", "a")["id"].clone();
    let p = branch_dir(&m, "a");
    // The branch's own state, then a descriptor and a shared map opened
    // before the snapshot.
    fs::write(p.join("a.txt"), b"branch state").unwrap();
    common::setxattr(&p.join("a.txt"), "user.k", "before");
    fs::create_dir(p.join("newdir")).unwrap();
    fs::write(p.join("newdir/f"), b"new in the branch").unwrap();
    let mut old_fd = OpenOptions::new()
        .write(true)
        .open(p.join("big.bin"))
        .unwrap();
    let mapped = common::SharedMap::new(&p.join("mapped"));

    let s = snapshot(&m, Some("a"), "a1");
    assert_eq!(s["name"], "a1");
    assert_eq!(s["branch"], a_id, "a snapshot of a branch names it");
    let s1 = snapshot_dir(&m, "a1");
    let before = tree(&s1);
    assert_eq!(before, tree(&p), "the snapshot shows the branch as it was");

    // Every kind of change in the branch, also through the old fd and map.
    old_fd.write_all(b"CHANGED THROUGH AN OLD FD").unwrap();
    drop(old_fd);
    mapped.write_and_sync(0, b"mmap!");
    drop(mapped);
    fs::write(p.join("a.txt"), b"after the snapshot").unwrap();
    OpenOptions::new()
        .write(true)
        .open(p.join("notes/todo.txt"))
        .unwrap()
        .set_len(1)
        .unwrap();
    fs::set_permissions(p.join("notes/done.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    common::setxattr(&p.join("a.txt"), "user.k", "after");
    common::setxattr(&p.join("newdir"), "user.k", "after");
    fs::rename(p.join("moved"), p.join("newdir/moved")).unwrap();
    fs::rename(p.join("tree"), p.join("tree2")).unwrap();
    fs::remove_file(p.join("victim")).unwrap();
    fs::remove_file(p.join("newdir/f")).unwrap();
    fs::remove_dir(p.join("emptydir")).unwrap();
    fs::create_dir(p.join("later")).unwrap();
    fs::remove_file(p.join("link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", p.join("link")).unwrap();
    fs::hard_link(p.join("a.txt"), p.join("a-link")).unwrap();

    assert_eq!(tree(&s1), before, "the snapshot of the branch changed");
    assert_eq!(fs::read(p.join("a.txt")).unwrap(), b"after the snapshot");
    assert_eq!(&fs::read(p.join("mapped")).unwrap()[..5], b"mmap!");
    assert_eq!(&fs::read(p.join("big.bin")).unwrap()[..7], b"CHANGED");
    assert_eq!(fs::read(s1.join("a.txt")).unwrap(), b"branch state");
    assert_eq!(fs::read(s1.join("big.bin")).unwrap(), vec![b'x'; 100_000]);
    common::assert_read_only(&s1);
    assert_eq!(tree(&s1), before);

    // A second snapshot keeps the later moment; a branch of the first shows
    // the first, and its own changes reach neither.
    snapshot(&m, Some("a"), "a2");
    assert_eq!(
        fs::read(snapshot_dir(&m, "a2").join("a.txt")).unwrap(),
        b"after the snapshot"
    );
    let c = branch(&m, "a1", "c");
    assert_eq!(c["snapshot"], s["id"]);
    let pc = branch_dir(&m, "c");
    assert_eq!(tree(&pc), before, "a branch of the snapshot");
    fs::write(pc.join("a.txt"), b"in c").unwrap();
    fs::remove_dir_all(pc.join("newdir")).unwrap();
    assert_eq!(tree(&s1), before);
    assert_eq!(fs::read(p.join("a.txt")).unwrap(), b"after the snapshot");
    assert_eq!(tree(m.path()), main_before, "main changed");
}

// ---------------------------------------------------------------------------
// Bad input, busy branches, and space.

/// A child process, killed and reaped when dropped unless already reaped.
struct Reaped(Child);

impl Reaped {
    /// A process that lives until dropped.
    fn sleeper() -> Reaped {
        Reaped(Command::new("sleep").arg("1000").spawn().unwrap())
    }

    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // try_wait keeps the status of a child already waited for, so a
        // reaped (and perhaps reused) pid is never signalled.
        if let Ok(None) = self.0.try_wait() {
            common::signal(self.0.id(), libc::SIGKILL);
            let _ = self.0.wait();
        }
    }
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    branch(&m, "base", "a");
    fs::write(branch_dir(&m, "a").join("a.txt"), b"in a").unwrap();
    let views = || {
        (
            tree(m.path()),
            tree(&snapshot_dir(&m, "base")),
            tree(&branch_dir(&m, "a")),
        )
    };
    let before = views();
    let live = Reaped::sleeper();
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let s = |x: &str| x.to_owned();

    // Unknown objects.
    let not_found = |req: Request, name: &str| {
        assert_refused(&m, req, ErrorKind::NotFound, name);
    };
    not_found(
        Request::BranchCreate {
            snapshot: s("nope"),
            name: Some(s("x")),
        },
        "nope",
    );
    not_found(
        Request::BranchDelete {
            branch: s("nope"),
            force: true,
        },
        "nope",
    );
    not_found(
        Request::BindPid {
            branch: s("nope"),
            pid: live.id() as i32,
        },
        "nope",
    );
    not_found(
        Request::BindCgroup {
            branch: s("nope"),
            cgroup: s("/"),
        },
        "nope",
    );
    not_found(
        Request::SnapshotCreate {
            branch: Some(s("nope")),
            name: Some(s("x")),
        },
        "nope",
    );
    // A snapshot's name is not a branch's, nor the other way round.
    not_found(
        Request::SnapshotCreate {
            branch: Some(s("base")),
            name: Some(s("x")),
        },
        "base",
    );
    not_found(
        Request::BranchCreate {
            snapshot: s("a"),
            name: Some(s("x")),
        },
        "\"a\"",
    );
    not_found(
        Request::BindPid {
            branch: s("a"),
            pid: dead as i32,
        },
        &dead.to_string(),
    );

    // Invalid names.
    for bad in ["", "a/b", ".", "..", "a\0b", &"n".repeat(256)] {
        let e = refused(
            &m,
            Request::BranchCreate {
                snapshot: s("base"),
                name: Some(s(bad)),
            },
        );
        assert_eq!(
            e.kind,
            ErrorKind::InvalidArgument,
            "branch {bad:?}: {}",
            e.message
        );
        let e = refused(
            &m,
            Request::SnapshotCreate {
                branch: Some(s("a")),
                name: Some(s(bad)),
            },
        );
        assert_eq!(
            e.kind,
            ErrorKind::InvalidArgument,
            "snapshot {bad:?}: {}",
            e.message
        );
    }
    branch(&m, "base", &"n".repeat(255));

    // Names taken.
    assert_refused(
        &m,
        Request::BranchCreate {
            snapshot: s("base"),
            name: Some(s("a")),
        },
        ErrorKind::AlreadyExists,
        "\"a\"",
    );
    snapshot(&m, Some("a"), "of-a");
    assert_refused(
        &m,
        Request::SnapshotCreate {
            branch: Some(s("a")),
            name: Some(s("of-a")),
        },
        ErrorKind::AlreadyExists,
        "of-a",
    );
    // Branches and snapshots are separate name spaces (separate directories).
    branch(&m, "base", "base");

    // Nothing changed, no binding was made.
    assert_eq!(views(), before);
    assert_eq!(bindings(&m), Vec::<Value>::new());
    let mut names: Vec<String> = ctl(&m, Request::BranchList {})
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, [s("a"), s("base"), "n".repeat(255)]);
    drop(live);
}

#[test]
fn busy_branches_are_deleted_only_by_force() {
    let m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    let delete = |name: &str, force: bool| {
        ctl(
            &m,
            Request::BranchDelete {
                branch: name.into(),
                force,
            },
        )
    };

    // A live process bound to it.
    branch(&m, "base", "bound");
    let live = Reaped::sleeper();
    bind_pid(&m, "bound", live.id());
    assert_refused(
        &m,
        Request::BranchDelete {
            branch: "bound".into(),
            force: false,
        },
        ErrorKind::Busy,
        "bound",
    );
    assert!(listed_branch(&m, "bound").is_some());
    assert!(branch_dir(&m, "bound").join("a.txt").exists());
    delete("bound", true).expect("forced delete of a bound branch");
    assert!(listed_branch(&m, "bound").is_none());
    assert_eq!(
        errno(fs::metadata(branch_dir(&m, "bound"))),
        Some(libc::ENOENT)
    );
    assert!(
        !bindings(&m).iter().any(|b| b["pid"] == live.id()),
        "the deleted branch's binding stays: {:?}",
        bindings(&m)
    );
    drop(live);

    // A file open in it.
    branch(&m, "base", "open");
    let f = File::open(branch_dir(&m, "open").join("a.txt")).unwrap();
    assert_refused(
        &m,
        Request::BranchDelete {
            branch: "open".into(),
            force: false,
        },
        ErrorKind::Busy,
        "open",
    );
    assert!(listed_branch(&m, "open").is_some());
    drop(f);
    delete_once_closed(&m, "open");
    assert_eq!(
        errno(fs::metadata(branch_dir(&m, "open"))),
        Some(libc::ENOENT)
    );

    // Open, forced.
    branch(&m, "base", "forced");
    let f = File::open(branch_dir(&m, "forced").join("a.txt")).unwrap();
    assert_eq!(
        refused(
            &m,
            Request::BranchDelete {
                branch: "forced".into(),
                force: false,
            }
        )
        .kind,
        ErrorKind::Busy
    );
    delete("forced", true).expect("forced delete of a branch with an open file");
    assert_eq!(
        errno(fs::metadata(branch_dir(&m, "forced"))),
        Some(libc::ENOENT)
    );
    drop(f);
    assert_eq!(ctl(&m, Request::BranchList {}).unwrap(), json!([]));
    assert_eq!(fs::read(m.path().join("a.txt")).unwrap(), b"alpha");
}

/// Bytes the state directory's layers occupy on disk.
fn layer_bytes(m: &Mount) -> u64 {
    let layers = m.state_dir().join("layers");
    if !layers.exists() {
        return 0;
    }
    common::walk(&layers)
        .iter()
        .map(|(_, _, md)| md.blocks() * 512)
        .sum()
}

#[test]
fn deleting_branches_and_their_snapshots_gives_the_space_back() {
    const BIG: usize = 10 << 20;
    let m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    let empty = layer_bytes(&m);
    branch(&m, "base", "x");
    let big = branch_dir(&m, "x").join("big");
    let mut f = File::create(&big).unwrap();
    f.write_all(&vec![7u8; BIG]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(layer_bytes(&m) >= BIG as u64, "the data is in layers/");
    assert!(!m.source().join("big").exists());

    // The snapshot keeps the frozen layer after its branch is gone.
    snapshot(&m, Some("x"), "xs");
    ctl(
        &m,
        Request::BranchDelete {
            branch: "x".into(),
            force: false,
        },
    )
    .expect("branch-delete");
    assert_eq!(errno(fs::metadata(branch_dir(&m, "x"))), Some(libc::ENOENT));
    assert_eq!(
        fs::read(snapshot_dir(&m, "xs").join("big")).unwrap(),
        vec![7u8; BIG]
    );
    assert!(layer_bytes(&m) >= BIG as u64);
    ctl(
        &m,
        Request::SnapshotDelete {
            snapshot: "xs".into(),
        },
    )
    .expect("snapshot-delete");
    let after = layer_bytes(&m);
    assert!(
        after < empty + (1 << 20),
        "layers/ holds {after} bytes after deleting everything (it held {empty})"
    );

    // A branch outlives the snapshot of main it was made from: main's later
    // changes are preserved for it, and given back with it.
    branch(&m, "base", "y");
    ctl(
        &m,
        Request::SnapshotDelete {
            snapshot: "base".into(),
        },
    )
    .unwrap();
    fs::write(m.path().join("a.txt"), b"main moved on").unwrap();
    assert_eq!(
        fs::read(branch_dir(&m, "y").join("a.txt")).unwrap(),
        b"alpha"
    );
    delete_once_closed(&m, "y");
    let preserved = m.state_dir().join("preserved");
    let left = fs::read_dir(&preserved).map_or(0, |d| d.count());
    assert_eq!(left, 0, "pre-images nobody needs are kept");
    assert!(layer_bytes(&m) < empty + (1 << 20));
    assert_eq!(
        fs::read(m.source().join("a.txt")).unwrap(),
        b"main moved on"
    );
}

// ---------------------------------------------------------------------------
// Crash.

#[test]
fn kill_9_mid_workload_in_two_branches_loses_nothing_acknowledged() {
    let mut m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    branch(&m, "base", "a");
    branch(&m, "base", "b");
    let main_before = tree(m.path());
    let base_before = tree(&snapshot_dir(&m, "base"));
    let logs = m.source().parent().unwrap();
    let (log_a, log_b) = (logs.join("acked-a.log"), logs.join("acked-b.log"));
    // One writer works in a by path; the other is bound to b and works at
    // the mount root.
    let mut writer_a = Reaped(common::start_acked_workload(
        Command::new("python3"),
        &branch_dir(&m, "a"),
        &log_a,
    ));
    let mut writer_b = Reaped(common::start_acked_workload(
        common::held_command("python3"),
        m.path(),
        &log_b,
    ));
    bind_pid(&m, "b", writer_b.id());
    common::release(&mut writer_b.0);
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        snapshot(&m, Some("a"), &format!("a-mid{i}"));
        snapshot(&m, Some("b"), &format!("b-mid{i}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    common::wait_acknowledged(&log_a);
    common::wait_acknowledged(&log_b);
    m.kill();
    let _ = writer_a.0.wait();
    let _ = writer_b.0.wait();
    m.restart(&[]);

    let report = common::check_state(m.state_dir());
    assert!(report.contains("7 snapshots"), "{report}");
    common::assert_acknowledged(&branch_dir(&m, "a"), &log_a);
    common::assert_acknowledged(&branch_dir(&m, "b"), &log_b);
    for i in 0..3 {
        common::assert_workload_prefix(&snapshot_dir(&m, &format!("a-mid{i}")));
        common::assert_workload_prefix(&snapshot_dir(&m, &format!("b-mid{i}")));
    }
    assert_eq!(tree(m.path()), main_before, "main changed");
    assert_eq!(tree(&snapshot_dir(&m, "base")), base_before);
    assert!(!m.source().join("w0").exists());
    assert!(
        !m.path().join("w0").exists(),
        "the bound writer's work reached main"
    );
}

/// A full state directory (ENOSPC) in the middle of a copy-up, a branch
/// creation or a snapshot of a branch: the operation fails with ENOSPC, the
/// branch and its snapshot keep their content, nothing half-made stays
/// behind, and everything works again once space is freed.
#[test]
fn full_state_directory_fails_branch_changes_cleanly() {
    let m = Mount::builder()
        .state_on_tmpfs("1m")
        .populate(|s| {
            fs::write(s.join("big"), vec![7u8; 3 << 20]).unwrap();
            fs::write(s.join("small"), b"small").unwrap();
        })
        .start();
    snapshot(&m, None, "base");
    branch(&m, "base", "a");
    let a = branch_dir(&m, "a");
    // Copying "big" (3 MiB) up into a 1 MiB state directory cannot work.
    let e = OpenOptions::new()
        .append(true)
        .open(a.join("big"))
        .and_then(|mut f| f.write_all(b"x"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(fs::read(a.join("big")).unwrap(), vec![7u8; 3 << 20]);
    fs::write(a.join("small"), b"changed").unwrap();
    snapshot(&m, Some("a"), "a1");
    // Fill the rest: creating a branch or a snapshot of one fails whole
    // once the catalog's log needs a page it cannot get (the room left in
    // its last page may take a few more lines first; each is complete).
    let filler = m.state_dir().join("filler");
    let _ = fs::write(&filler, vec![0u8; 1 << 20]);
    let mut made = Vec::new();
    for kind in ["branch", "snapshot"] {
        let failed = (0..64).find_map(|i| {
            let req = match kind {
                "branch" => Request::BranchCreate {
                    snapshot: "base".into(),
                    name: Some(format!("full-b{i}")),
                },
                _ => Request::SnapshotCreate {
                    branch: Some("a".into()),
                    name: Some(format!("full-a{i}")),
                },
            };
            match ctl(&m, req) {
                Ok(_) => {
                    made.push((kind, i));
                    None
                }
                Err(e) => Some((i, e)),
            }
        });
        let (i, e) = failed.expect("64 catalog lines fit in the room left");
        assert_eq!(e.kind, ErrorKind::NoSpace, "{kind} {i}: {}", e.message);
        let dir = match kind {
            "branch" => branch_dir(&m, &format!("full-b{i}")),
            _ => snapshot_dir(&m, &format!("full-a{i}")),
        };
        assert!(
            !dir.exists(),
            "a failed {kind} creation left {}",
            dir.display()
        );
    }
    for (kind, i) in made {
        let f = match kind {
            "branch" => branch_dir(&m, &format!("full-b{i}")).join("small"),
            _ => snapshot_dir(&m, &format!("full-a{i}")).join("small"),
        };
        let want: &[u8] = if kind == "branch" {
            b"small"
        } else {
            b"changed"
        };
        assert_eq!(fs::read(&f).unwrap(), want, "{}", f.display());
    }
    let e = fs::write(a.join("new"), vec![1u8; 64 << 10]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    fs::remove_file(&filler).unwrap();
    let report = common::check_state(m.state_dir());
    assert!(report.contains("0 problems"), "{report}");
    assert_eq!(fs::read(a.join("small")).unwrap(), b"changed");
    assert_eq!(
        fs::read(snapshot_dir(&m, "a1").join("small")).unwrap(),
        b"changed"
    );
    assert_eq!(
        fs::read(snapshot_dir(&m, "base").join("small")).unwrap(),
        b"small"
    );
    assert!(!branch_dir(&m, "b").exists());
    // Space is back: the same operations now succeed.
    branch(&m, "base", "b");
    snapshot(&m, Some("a"), "a2");
    fs::write(branch_dir(&m, "b").join("small"), b"b").unwrap();
    assert_eq!(fs::read(m.source().join("small")).unwrap(), b"small");
}

/// Hard links that come from the snapshot stay one file in a branch: a
/// change through one name shows through the others, `st_ino` and
/// `st_nlink` stay right through copy-up, unlink, link and rename, also
/// after a worker restart and a snapshot of the branch; main keeps its
/// own links untouched.
#[test]
fn hard_links_from_below_stay_one_file() {
    let mut m = Mount::builder()
        .populate(|s| {
            fs::create_dir(s.join("d")).unwrap();
            fs::write(s.join("a"), b"one").unwrap();
            fs::hard_link(s.join("a"), s.join("d/b")).unwrap();
            fs::hard_link(s.join("a"), s.join("c")).unwrap();
        })
        .start();
    snapshot(&m, None, "base");
    branch(&m, "base", "x");
    let x = branch_dir(&m, "x");
    let md = |p: &Path| fs::metadata(p).unwrap();
    let ino = md(&x.join("a")).ino();
    assert_eq!(md(&x.join("a")).nlink(), 3);
    // Change through one name: every name shows it, same inode.
    fs::write(x.join("d/b"), b"two").unwrap();
    for n in ["a", "d/b", "c"] {
        assert_eq!(fs::read(x.join(n)).unwrap(), b"two", "{n}");
        assert_eq!(md(&x.join(n)).ino(), ino, "{n}");
        assert_eq!(md(&x.join(n)).nlink(), 3, "{n}");
    }
    // Names come and go; the count follows.
    fs::remove_file(x.join("c")).unwrap();
    assert_eq!(md(&x.join("a")).nlink(), 2);
    fs::hard_link(x.join("a"), x.join("e")).unwrap();
    assert_eq!(md(&x.join("d/b")).nlink(), 3);
    fs::write(x.join("f"), b"other").unwrap();
    fs::rename(x.join("f"), x.join("e")).unwrap();
    assert_eq!(md(&x.join("a")).nlink(), 2);
    let state = |x: &Path| {
        ["a", "d/b"]
            .iter()
            .map(|n| {
                let p = x.join(n);
                (fs::read(&p).unwrap(), md(&p).ino(), md(&p).nlink())
            })
            .collect::<Vec<_>>()
    };
    let before = state(&x);
    assert_eq!(
        before,
        vec![(b"two".to_vec(), ino, 2), (b"two".to_vec(), ino, 2)]
    );
    // A snapshot of the branch, then more changes in a new top layer.
    snapshot(&m, Some("x"), "x1");
    fs::write(x.join("a"), b"three").unwrap();
    assert_eq!(fs::read(x.join("d/b")).unwrap(), b"three");
    assert_eq!(
        fs::read(snapshot_dir(&m, "x1").join("d/b")).unwrap(),
        b"two"
    );
    fs::remove_file(x.join("d/b")).unwrap();
    assert_eq!(md(&x.join("a")).nlink(), 1);
    let after = state(&snapshot_dir(&m, "x1"));
    m.kill();
    m.restart(&[]);
    assert_eq!(fs::read(x.join("a")).unwrap(), b"three");
    assert_eq!(md(&x.join("a")).nlink(), 1);
    assert_eq!(md(&x.join("a")).ino(), ino);
    assert!(!x.join("d/b").exists());
    assert_eq!(state(&snapshot_dir(&m, "x1")), after);
    // Main and the source never saw any of it.
    assert_eq!(fs::read(m.path().join("d/b")).unwrap(), b"one");
    assert_eq!(md(&m.source().join("a")).nlink(), 3);
    common::check_state(m.state_dir());
}

/// Opens descriptors into main and into branch b and a working directory
/// in main, says "ready" and waits for a line on stdin (it is bound
/// meanwhile), then tries
/// each way out of its branch and prints what each gave: the data read,
/// "ok", or the errno's name.
const REACH: &str = r#"
import errno, json, os, sys
mnt = sys.argv[1]
main_dir = os.open(mnt + "/d", os.O_RDONLY | os.O_DIRECTORY)
b_dir = os.open(mnt + "/.agentfs/branches/b/d", os.O_RDONLY | os.O_DIRECTORY)
main_file = os.open(mnt + "/d/f", os.O_RDWR)
os.chdir(mnt + "/d")
print("ready", flush=True)
sys.stdin.readline()
def attempt(f):
    try:
        r = f()
        return "ok" if r is None or isinstance(r, int) else r
    except OSError as e:
        return errno.errorcode[e.errno]
def read_at(dir_fd, name):
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)
def write_own():
    with open(mnt + "/d/new", "w") as f:
        f.write("mine")
    return open(mnt + "/d/new").read()
print(json.dumps({
    "main by descriptor": attempt(lambda: read_at(main_dir, "f")),
    "main listed by descriptor": attempt(lambda: sorted(os.listdir(main_dir))),
    "main written by descriptor": attempt(lambda: os.pwrite(main_file, b"X", 0)),
    "main from cwd": attempt(lambda: sorted(os.listdir("."))),
    "b by descriptor": attempt(lambda: read_at(b_dir, "f")),
    ".agentfs": attempt(lambda: sorted(os.listdir(mnt + "/.agentfs"))),
    "b by path": attempt(lambda: open(mnt + "/.agentfs/branches/b/d/f").read()),
    "own": attempt(lambda: open(mnt + "/d/f").read()),
    "own written": attempt(write_own),
}), flush=True)
"#;

/// Runs [`REACH`] bound to branch a of a mount with main, a and b, each
/// with its own `d/f`; returns what it saw. Under strict isolation it also
/// checks that main and b are unchanged.
fn reach_out_of_branch(strict: bool) -> Value {
    let mut builder = Mount::builder().populate(|src| {
        fs::create_dir(src.join("d")).unwrap();
        fs::write(src.join("d/f"), "main").unwrap();
    });
    if strict {
        builder = builder.arg("--strict-isolation");
    }
    let m = builder.start();
    snapshot(&m, None, "base");
    for name in ["a", "b"] {
        branch(&m, "base", name);
        fs::write(branch_dir(&m, name).join("d/f"), name).unwrap();
    }
    let mut child = Command::new("python3")
        .args(["-c", REACH])
        .arg(m.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "the reaching process did not start");
    bind_pid(&m, "a", child.id());
    common::release(&mut child);
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(
        child.wait().unwrap().success(),
        "the reaching process failed"
    );
    let seen: Value = serde_json::from_str(&line).unwrap();
    if strict {
        assert_eq!(fs::read_to_string(m.path().join("d/f")).unwrap(), "main");
        assert_eq!(
            fs::read_to_string(branch_dir(&m, "b").join("d/f")).unwrap(),
            "b"
        );
    }
    seen
}

#[test]
fn strict_isolation_confines_a_bound_process_to_its_branch() {
    let seen = reach_out_of_branch(true);
    assert_eq!(
        seen,
        json!({
            "main by descriptor": "EACCES",
            "main listed by descriptor": "EACCES",
            "main written by descriptor": "EACCES",
            "main from cwd": "EACCES",
            "b by descriptor": "EACCES",
            ".agentfs": "EACCES",
            "b by path": "EACCES",
            "own": "a",
            "own written": "mine",
        })
    );
}

/// The same process without strict isolation: what it opened before the
/// bind still reaches main and b, so the refusals above are strict mode's.
#[test]
fn strict_isolation_off_old_descriptors_still_reach_out() {
    let seen = reach_out_of_branch(false);
    assert_eq!(
        seen,
        json!({
            "main by descriptor": "main",
            "main listed by descriptor": ["f"],
            "main written by descriptor": "ok",
            "main from cwd": ["f"],
            "b by descriptor": "b",
            ".agentfs": ["branches", "snapshots"],
            "b by path": "b",
            "own": "a",
            "own written": "mine",
        })
    );
}

/// A worker that cannot raise its open-file limit above `limit`, with a
/// branch `b`, and a directory to fill in main and one in `b`.
fn limited_mount(limit: u64) -> (Mount, [PathBuf; 2]) {
    let m = Mount::builder().open_file_limit(limit).start();
    common::snapshot(&m, None, "base");
    common::branch(&m, "base", "b");
    let roots = [
        m.path().join("main"),
        m.path().join(".agentfs/branches/b/x"),
    ];
    (m, roots)
}

fn assert_descriptors_below(m: &Mount, limit: usize) {
    let fds = fs::read_dir(format!("/proc/{}/fd", m.worker_pid()))
        .unwrap()
        .count();
    assert!(fds < limit, "the worker holds {fds} descriptors");
}

/// Files `d<d>/f<i>` below `root`, a thousand in each of `dirs`
/// directories, holding "x"; made first if `make`.
fn thousands(root: &Path, dirs: usize, make: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in 0..dirs {
        let dir = root.join(format!("d{d}"));
        if make {
            fs::create_dir(&dir).unwrap();
        }
        for i in 0..1000 {
            let f = dir.join(format!("f{i}"));
            if make {
                fs::write(&f, b"x").unwrap();
            }
            files.push(f);
        }
    }
    files
}

/// Main's files are kept by handle, not by descriptor: the kernel keeps
/// the nodes of 3 000 files of main looked up, under an open-file limit
/// of 4 096, while the worker holds a few dozen descriptors (its trimmer
/// counts only nodes that may hold descriptors against its mark of
/// 2 048; a descriptor each would have passed it).
#[test]
fn main_files_the_kernel_knows_hold_no_descriptors() {
    let m = Mount::builder()
        .populate(|s| drop(thousands(s, 3, true)))
        .open_file_limit(4096)
        .start();
    let files = thousands(m.path(), 3, false);
    let inos: Vec<u64> = files
        .iter()
        .map(|f| fs::metadata(f).unwrap().ino())
        .collect();
    assert_descriptors_below(&m, 100);
    for (f, ino) in files.iter().zip(&inos) {
        assert_eq!(fs::read(f).unwrap(), b"x");
        assert_eq!(fs::metadata(f).unwrap().ino(), *ino);
    }
    assert_descriptors_below(&m, 100);
}

/// Past `--max-cached-nodes` the trimmer has the kernel drop names of
/// files whatever they hold (each node costs memory and a journal record):
/// 3 000 files of main, walked twice under a mark of 1 000, all read back.
#[test]
fn trees_larger_than_the_node_mark_work() {
    let m = Mount::builder()
        .populate(|s| drop(thousands(s, 3, true)))
        .arg("--max-cached-nodes")
        .arg("1000")
        .start();
    let files = thousands(m.path(), 3, false);
    for _ in 0..2 {
        for f in &files {
            assert_eq!(fs::read(f).unwrap(), b"x", "{}", f.display());
        }
    }
    assert_descriptors_below(&m, 100);
}

/// A branch's files are kept by handle, as main's are, wherever they are:
/// still main's, copied up, made in the branch, or in a layer frozen by a
/// snapshot. Under an open-file limit of 4 096 (descriptors' mark 2 048),
/// 5 000 files of main and 2 000 made in the branch, all looked up and
/// copied up while the kernel keeps their nodes, hold a few dozen
/// descriptors (one each would pass the mark, and the trimmer would have
/// the kernel drop their names), and read back right before and after a
/// snapshot of the branch freezes its layer, with the same inode numbers.
fn assert_branch_files_hold_no_descriptors(m: Mount) {
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let b = m.path().join(".agentfs/branches/b");
    let files = thousands(&b, 5, false);
    for f in &files {
        assert_eq!(fs::read(f).unwrap(), b"x");
    }
    assert_descriptors_below(&m, 100);
    for f in &files {
        let mut w = OpenOptions::new().append(true).open(f).unwrap();
        w.write_all(b"y")
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    fs::create_dir(b.join("new")).unwrap();
    let made: Vec<PathBuf> = (0..2000).map(|i| b.join(format!("new/n{i}"))).collect();
    for f in &made {
        fs::write(f, b"n").unwrap();
    }
    assert_descriptors_below(&m, 100);
    let inos = |fs: &[PathBuf]| -> Vec<u64> {
        fs.iter().map(|f| fs::metadata(f).unwrap().ino()).collect()
    };
    let before = (inos(&files), inos(&made));
    common::snapshot(&m, Some("b"), "frozen");
    for f in &files {
        assert_eq!(fs::read(f).unwrap(), b"xy", "{}", f.display());
    }
    for f in &made {
        assert_eq!(fs::read(f).unwrap(), b"n", "{}", f.display());
    }
    assert_eq!((inos(&files), inos(&made)), before);
    assert_descriptors_below(&m, 100);
    let main = m.path().join("d4/f999");
    assert_eq!(fs::read(main).unwrap(), b"x");
}

#[test]
fn branch_files_the_kernel_knows_hold_no_descriptors() {
    assert_branch_files_hold_no_descriptors(
        Mount::builder()
            .populate(|s| drop(thousands(s, 5, true)))
            .open_file_limit(4096)
            .start(),
    );
}

#[test]
fn branch_files_the_kernel_knows_hold_no_descriptors_with_state_on_tmpfs() {
    assert_branch_files_hold_no_descriptors(
        Mount::builder()
            .populate(|s| drop(thousands(s, 5, true)))
            .open_file_limit(4096)
            .state_on_tmpfs("256m")
            .start(),
    );
}

/// A worker holds a host descriptor per node of a branch the kernel
/// knows, and the kernel keeps nodes until memory runs short: with an open-file limit of
/// 1024, thousands of files made, listed, read and removed in main and in a
/// branch all work (the trimmer makes the kernel drop names), and the
/// control channel still answers.
#[test]
fn trees_far_larger_than_the_open_file_limit_work() {
    let (m, roots) = limited_mount(1024);
    for root in &roots {
        fs::create_dir(root).unwrap();
        for d in 0..4 {
            fs::create_dir(root.join(format!("d{d}"))).unwrap();
            for i in 0..400 {
                fs::write(root.join(format!("d{d}/f{i}")), format!("{d}/{i}")).unwrap();
            }
        }
    }
    for root in &roots {
        for d in 0..4 {
            let dir = root.join(format!("d{d}"));
            assert_eq!(fs::read_dir(&dir).unwrap().count(), 400);
            for i in 0..400 {
                let f = dir.join(format!("f{i}"));
                assert_eq!(fs::read_to_string(&f).unwrap(), format!("{d}/{i}"));
                fs::rename(&f, dir.join(format!("g{i}"))).unwrap();
            }
        }
    }
    assert_descriptors_below(&m, 1024);
    common::snapshot(&m, Some("b"), "after");
    for root in &roots {
        fs::remove_dir_all(root).unwrap();
    }
}

/// The same with many lookups at once.
#[test]
fn parallel_walks_of_a_tree_larger_than_the_open_file_limit_work() {
    let (m, roots) = limited_mount(4096);
    for root in &roots {
        for d in 0..16 {
            fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
            for i in 0..500 {
                fs::write(root.join(format!("d{d}/f{i}")), b"").unwrap();
            }
        }
    }
    // Eight threads stat every file at once, as `git status` does with
    // its preloading threads: thousands of nodes are made between two of
    // the trimmer's periods, and no lookup may fail for want of
    // descriptors (it did before the trimmer was woken at the high mark).
    for _ in 0..2 {
        std::thread::scope(|s| {
            for t in 0..8 {
                let roots = &roots;
                s.spawn(move || {
                    for root in roots {
                        for k in 0..16 {
                            let d = root.join(format!("d{}", (t + k) % 16));
                            for i in 0..500 {
                                let f = d.join(format!("f{i}"));
                                fs::symlink_metadata(&f)
                                    .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                            }
                        }
                    }
                });
            }
        });
    }
    assert_descriptors_below(&m, 4096);
}

/// A branch deleted while snapshots of it are being taken: each snapshot
/// is taken whole or refused as of a branch that is gone (naming it), the
/// worker goes on answering (no lock left poisoned), and the state checks
/// clean. The deletion lands at a different point of a snapshot's making
/// in each round.
#[test]
fn a_branch_deleted_while_it_is_snapshotted_refuses_cleanly() {
    let m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    for round in 0..48 {
        let name = format!("r{round}");
        branch(&m, "base", &name);
        fs::write(branch_dir(&m, &name).join("f"), b"x").unwrap();
        // Ends the takers at once should the deletion fail.
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let take = |k: usize| {
                let mut taken = Vec::new();
                for i in 0..10_000 {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return taken;
                    }
                    let req = Request::SnapshotCreate {
                        branch: Some(name.clone()),
                        name: Some(format!("{name}-{k}-{i}")),
                    };
                    match ctl(&m, req) {
                        Ok(v) => taken.push(v["name"].as_str().unwrap().to_owned()),
                        Err(e) => {
                            assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
                            assert!(e.message.contains(&name), "{}", e.message);
                            return taken;
                        }
                    }
                }
                panic!("the branch was never deleted");
            };
            // More takers than CPUs: one is preempted between finding
            // the branch and taking its view now and then.
            let takers: Vec<_> = (0..4).map(|k| s.spawn(move || take(k))).collect();
            std::thread::sleep(Duration::from_micros(700 * (round % 8)));
            let deleted = ctl(
                &m,
                Request::BranchDelete {
                    branch: name.clone(),
                    force: true,
                },
            );
            // Otherwise each taker ends at its first refusal.
            stop.store(deleted.is_err(), std::sync::atomic::Ordering::SeqCst);
            deleted.expect("branch-delete");
            for t in takers.into_iter().flat_map(|t| t.join().unwrap()) {
                let f = snapshot_dir(&m, &t).join("f");
                assert_eq!(fs::read(&f).unwrap(), b"x", "{}", f.display());
            }
        });
    }
    snapshot(&m, None, "after");
    assert!(common::check_state(m.state_dir()).contains("0 problems"));
}

/// A branch is whole from the moment a request can find it: a snapshot
/// of a branch asked for while the branch is being created finds no branch
/// yet or is taken, and a deletion racing the creation deletes a branch the
/// creation made whole (and reported made). Each round a snapshot and a
/// deletion of the new name are asked for over and over while it is
/// created; before the view of a new branch opened under the catalog's
/// lock, the snapshot could answer "view N is not open" and the creation
/// fail after the deletion had removed its layer.
#[test]
fn a_branch_is_whole_once_a_request_can_find_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    let expected = tree_content(&snapshot_dir(&m, "base"));
    let mut taken = Vec::new();
    for round in 0..150 {
        let name = format!("n{round}");
        let deleted = AtomicBool::new(false);
        // Ends the racers at once should the creation fail.
        let stop = AtomicBool::new(false);
        let ended = || deleted.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst);
        let not_found = |e: ControlError| {
            assert_eq!(e.kind, ErrorKind::NotFound, "round {round}: {}", e.message);
            assert!(e.message.contains(&name), "round {round}: {}", e.message);
        };
        std::thread::scope(|s| {
            let snap = s.spawn(|| {
                let req = Request::SnapshotCreate {
                    branch: Some(name.clone()),
                    name: Some(format!("{name}-s")),
                };
                while !ended() {
                    match ctl(&m, req.clone()) {
                        Ok(_) => return true,
                        Err(e) => not_found(e),
                    }
                }
                false
            });
            let delete = s.spawn(|| {
                let req = Request::BranchDelete {
                    branch: name.clone(),
                    force: true,
                };
                while !stop.load(Ordering::SeqCst) {
                    match ctl(&m, req.clone()) {
                        Ok(_) => return deleted.store(true, Ordering::SeqCst),
                        Err(e) => not_found(e),
                    }
                }
                // The creation failed (and says so).
            });
            let made = ctl(
                &m,
                Request::BranchCreate {
                    snapshot: "base".into(),
                    name: Some(name.clone()),
                },
            );
            stop.store(made.is_err(), Ordering::SeqCst);
            made.unwrap_or_else(|e| panic!("round {round}: branch-create: {e}"));
            let deletion = delete.join();
            // The snapshot's racer ends even if the deletion's failed.
            stop.store(true, Ordering::SeqCst);
            deletion.unwrap();
            if snap.join().unwrap() {
                taken.push(format!("{name}-s"));
            }
        });
    }
    for t in &taken {
        assert_eq!(tree_content(&snapshot_dir(&m, t)), expected, "{t}");
    }
    assert!(listed_branch(&m, "n0").is_none());
    assert!(common::check_state(m.state_dir()).contains("0 problems"));
    eprintln!(
        "{} of 150 snapshots taken before their branch's deletion",
        taken.len()
    );
}

/// A branch's new layer comes from the spare layer made ahead of time
/// (`spare.rs`): creation only stamps its root with the attributes of the
/// view below, without a flush. A crash that loses the stamp (simulated:
/// the spare's mark put back, other attributes and a stray xattr on the
/// layer's root) is repaired at the next start, from the snapshot below.
/// The next spare waits in the state directory, which `check` accepts.
#[test]
fn a_lost_stamp_of_a_new_layer_is_made_again_at_start() {
    let mut m = Mount::builder()
        .populate(|s| {
            fs::write(s.join("f"), b"f").unwrap();
            fs::set_permissions(s, fs::Permissions::from_mode(0o750)).unwrap();
            common::setxattr(s, "user.kept", "1");
            let st = Command::new("touch")
                .args(["-d", "@1700000000"])
                .arg(s)
                .status()
                .unwrap();
            assert!(st.success());
        })
        .start();
    snapshot(&m, None, "s");
    let layer = branch(&m, "s", "b")["layer"].as_u64().unwrap();
    // A later change of main's root does not reach the branch.
    fs::write(m.path().join("later"), b"").unwrap();
    let root = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        (md.mode(), md.uid(), md.gid(), md.mtime())
    };
    let want = root(&snapshot_dir(&m, "s"));
    assert_eq!(want.0 & 0o7777, 0o750);
    assert_eq!(want.3, 1_700_000_000);
    assert_eq!(root(&branch_dir(&m, "b")), want);
    let spare = m.state_dir().join(format!("layers/{}", layer + 1));
    assert!(spare.join("tree").is_dir(), "the next spare is made");
    assert!(common::check_state(m.state_dir()).contains("0 problems"));

    m.stop();
    let tree = m.state_dir().join(format!("layers/{layer}/tree"));
    fs::set_permissions(&tree, fs::Permissions::from_mode(0o700)).unwrap();
    common::setxattr(&tree, "user.stray", "1");
    common::setxattr(&tree, "trusted.agentfs.unstamped", "1");
    let st = Command::new("touch").arg(&tree).status().unwrap();
    assert!(st.success());
    m.restart(&[]);
    let b = branch_dir(&m, "b");
    assert_eq!(root(&b), want, "stamped again");
    let names = Command::new("getfattr")
        .args(["-d", "-m", "-"])
        .arg(&b)
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&names.stdout);
    assert!(
        names.contains("user.kept") && !names.contains("user.stray"),
        "{names}"
    );
    assert!(!names.contains("trusted.agentfs"), "{names}");
    assert_eq!(fs::read(b.join("f")).unwrap(), b"f");
    assert!(!b.join("later").exists());
    assert!(common::check_state(m.state_dir()).contains("0 problems"));

    // Over a frozen layer: a snapshot of the branch freezes its layer,
    // whose root the branch changed; the new top's lost stamp is made
    // again from that frozen root, not from main's. So is that of a
    // branch of the snapshot, whose layers below were checked with b's.
    fs::set_permissions(&b, fs::Permissions::from_mode(0o755)).unwrap();
    snapshot(&m, Some("b"), "b1");
    branch(&m, "b1", "c");
    let top = |name| listed_branch(&m, name).unwrap()["layer"].as_u64().unwrap();
    let tops = [top("b"), top("c")];
    assert!(tops.iter().all(|&t| t > layer));
    let want = root(&b);
    assert_eq!(want.0 & 0o7777, 0o755);
    assert_eq!(root(&branch_dir(&m, "c")), want);
    m.stop();
    for t in tops {
        let tree = m.state_dir().join(format!("layers/{t}/tree"));
        fs::set_permissions(&tree, fs::Permissions::from_mode(0o700)).unwrap();
        common::setxattr(&tree, "trusted.agentfs.unstamped", "1");
    }
    m.restart(&[]);
    assert_eq!(root(&branch_dir(&m, "b")), want, "stamped again");
    assert_eq!(root(&branch_dir(&m, "c")), want, "stamped again");
    assert!(common::check_state(m.state_dir()).contains("0 problems"));

    // A layer a start cannot open is named, with the view that shows it.
    m.stop();
    let index = m.state_dir().join(format!("layers/{}/index", tops[0]));
    fs::remove_dir_all(&index).unwrap();
    let mut worker = Command::new(common::WORKER)
        .arg("--source")
        .arg(m.source())
        .arg("--mountpoint")
        .arg(m.path())
        .arg("--state-dir")
        .arg(m.state_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = common::wait_timeout(&mut worker, Duration::from_secs(30));
    if status.is_none() {
        common::signal(worker.id(), libc::SIGKILL);
        common::reap_killed(&mut worker, m.path());
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut worker.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    let named = format!("branch \"b\" (layers/{} and below)", tops[0]);
    assert!(err.contains(&named), "{err}");
}

/// The host inode number of the file `name` at the root of a layer of
/// the state directory (made there by a branch).
fn layer_ino(m: &Mount, name: &str) -> Option<u64> {
    fs::read_dir(m.state_dir().join("layers"))
        .unwrap()
        .find_map(|l| fs::metadata(l.unwrap().path().join("tree").join(name)).ok())
        .map(|meta| meta.ino())
}

/// Makes a file in branch directory `b`, holds its node (O_PATH), removes
/// it, then makes `<prefix><i>` with `make` until one gets the removed
/// file's host inode number in the layer. That name, the removed file's
/// `st_ino` in the view, and the held node.
fn removed_then_reused(
    m: &Mount,
    b: &Path,
    prefix: &str,
    make: impl Fn(&Path, usize),
) -> (String, u64, std::os::fd::OwnedFd) {
    let old = format!("{prefix}-old");
    fs::write(b.join(&old), b"old").unwrap();
    let ino = layer_ino(m, &old).expect("made in the top layer");
    let view_ino = fs::metadata(b.join(&old)).unwrap().ino();
    let held = common::hold(&b.join(&old));
    fs::remove_file(b.join(&old)).unwrap();
    let reused = (0..200)
        .map(|i| {
            let name = format!("{prefix}{i}");
            make(&b.join(&name), i);
            name
        })
        .find(|name| layer_ino(m, name) == Some(ino))
        .expect("the host reuses the inode number within 200 tries");
    (reused, view_ino, held)
}

/// A branch's file is kept by handle and pins no inode: once it is
/// removed, the host may give its inode number (which a file made in a
/// layer takes its id from) to a new file of the layer while the kernel
/// still holds the old node. The new file is reached and gets a number
/// of its own; the old node answers ESTALE; so for a new directory; a
/// removed file still open stays readable and shows no links.
#[test]
fn a_reused_inode_number_in_a_layer_is_another_file_to_the_mount() {
    // Attributes never cached: the old node's are asked for at the end.
    // The layers on a file system of the test's own: tests running beside
    // it would take the freed inode numbers of a shared one.
    let m = Mount::builder()
        .arg("--cache-timeout-ms")
        .arg("0")
        .state_on_ext4(64)
        .start();
    snapshot(&m, None, "s");
    branch(&m, "s", "b");
    let b = branch_dir(&m, "b");
    fs::write(b.join("open"), b"open").unwrap();
    let open = File::open(b.join("open")).unwrap();
    fs::remove_file(b.join("open")).unwrap();
    let meta = open.metadata().unwrap();
    assert_eq!(meta.nlink(), 0);
    assert_eq!(std::io::read_to_string(&open).unwrap(), "open");

    let (reused, view_ino, held) = removed_then_reused(&m, &b, "new", |p, i| {
        fs::write(p, format!("new {i}")).unwrap()
    });
    let through = b.join(&reused);
    assert_eq!(
        fs::read_to_string(&through).unwrap(),
        format!("new {}", &reused[3..])
    );
    let new_ino = fs::metadata(&through).unwrap().ino();
    assert_ne!(
        new_ino, view_ino,
        "the kernel knows that number for the old node"
    );
    let old = File::from(held).metadata().map_err(|e| e.raw_os_error());
    assert_eq!(old.err(), Some(Some(libc::ESTALE)), "the old node");

    // The same number going to a new directory.
    let (reused, held_ino, held) =
        removed_then_reused(&m, &b, "dir", |p, _| fs::create_dir(p).unwrap());
    let dir = b.join(&reused);
    fs::write(dir.join("inside"), b"inside").unwrap();
    assert_eq!(common::names(&dir), ["inside"]);
    assert_ne!(fs::metadata(&dir).unwrap().ino(), held_ino);
    drop(held);
}

/// Each snapshot of a branch freezes one more layer, and each snapshot's
/// view shows every layer below it: the views share the frozen layers'
/// descriptors, so 60 snapshots of one branch cost the worker a few
/// descriptors each, not one per layer below each (1 830 of each kind;
/// the fsx test's ~140 snapshots once reached the open-file limit).
#[test]
fn snapshots_of_a_branch_share_their_layers_descriptors() {
    let m = Mount::new();
    snapshot(&m, None, "base");
    branch(&m, "base", "b");
    let dir = branch_dir(&m, "b");
    let count = || {
        fs::read_dir(format!("/proc/{}/fd", m.worker_pid()))
            .unwrap()
            .count()
    };
    let before = count();
    for i in 0..60 {
        fs::write(dir.join(format!("f{i}")), b"x").unwrap();
        snapshot(&m, Some("b"), &format!("s{i}"));
    }
    let grown = count() - before;
    assert!(
        grown <= 60 * 6,
        "60 snapshots of a branch added {grown} descriptors to the worker"
    );
    // Every snapshot still shows what the branch held when it was taken.
    for i in [0, 30, 59] {
        let s = snapshot_dir(&m, &format!("s{i}"));
        assert_eq!(fs::read(s.join(format!("f{i}"))).unwrap(), b"x");
        assert!(!s.join(format!("f{}", i + 1)).exists());
    }
}

/// One round of changes a branch snapshotted after each round must show
/// through every layer: in the root and in `d/`, both changed in every
/// round (so both merge one frozen part per round), applied alike to the
/// branch and to a plain reference directory.
fn churn(root: &Path, round: usize) {
    for dir in [root.to_path_buf(), root.join("d")] {
        fs::write(dir.join(format!("r{round}")), format!("made in {round}")).unwrap();
        // A name made two rounds ago goes (a whiteout over a frozen layer),
        // one removed two rounds before that comes back (over a whiteout).
        if round >= 2 {
            fs::remove_file(dir.join(format!("r{}", round - 2))).unwrap();
        }
        if round >= 4 && round.is_multiple_of(2) {
            fs::write(
                dir.join(format!("r{}", round - 4)),
                format!("back in {round}"),
            )
            .unwrap();
        }
        // A file from main changed (copied up again), one from main removed.
        fs::write(dir.join("main.txt"), format!("changed in {round}")).unwrap();
        let _ = fs::remove_file(dir.join(format!("m{round}")));
        // A directory removed and made again: opaque over its old copies.
        if round.is_multiple_of(3) {
            let _ = fs::remove_dir_all(dir.join("sub"));
            fs::create_dir(dir.join("sub")).unwrap();
        }
        fs::write(dir.join("sub").join(format!("s{round}")), b"s").unwrap();
        // Files from main with two names: each round changes one through
        // its first name (one copy, in that round's layer's index, shown by
        // both), reads the last round's through its second name (first
        // looked up now, so found in a frozen index), and removes a name.
        OpenOptions::new()
            .append(true)
            .open(dir.join(format!("h{round}")))
            .unwrap()
            .write_all(b" and more")
            .unwrap();
        if round >= 1 {
            let other = fs::read(dir.join(format!("h{}-2", round - 1))).unwrap();
            assert_eq!(other, b"linked and more", "round {round}");
        }
        if round == 9 {
            fs::remove_file(dir.join("h2")).unwrap();
        }
        // Renames: a file made last round (in a frozen layer now) to a new
        // name, and one moved last round onto a name from further down.
        fs::write(dir.join(format!("t{round}")), format!("t{round}")).unwrap();
        if round >= 1 {
            fs::rename(
                dir.join(format!("t{}", round - 1)),
                dir.join(format!("u{round}")),
            )
            .unwrap();
        }
        if round >= 4 {
            fs::rename(
                dir.join(format!("u{}", round - 1)),
                dir.join(format!("u{}", round - 3)),
            )
            .unwrap();
        }
    }
}

#[test]
fn a_branch_snapshotted_many_times_resolves_names_through_every_layer() {
    // Well past the point where a directory's frozen parts get an index.
    const ROUNDS: usize = 16;
    fn fill(root: &Path) {
        for dir in [root.to_path_buf(), root.join("d")] {
            fs::create_dir_all(dir.join("sub")).unwrap();
            fs::write(dir.join("main.txt"), b"main").unwrap();
            fs::write(dir.join("sub/old"), b"old").unwrap();
            for i in 0..ROUNDS {
                fs::write(dir.join(format!("h{i}")), b"linked").unwrap();
                fs::hard_link(dir.join(format!("h{i}")), dir.join(format!("h{i}-2"))).unwrap();
            }
            for i in 0..20 {
                fs::write(dir.join(format!("m{i}")), b"m").unwrap();
            }
        }
    }
    let mut m = Mount::builder().populate(fill).start();
    let reference = tempfile::tempdir().unwrap();
    fill(reference.path());
    snapshot(&m, None, "base");
    branch(&m, "base", "b");
    let dir = branch_dir(&m, "b");
    let mut taken = Vec::new();
    for round in 0..ROUNDS {
        churn(&dir, round);
        churn(reference.path(), round);
        snapshot(&m, Some("b"), &format!("s{round}"));
        taken.push(tree_content(reference.path()));
    }
    let check = |m: &Mount, when: &str| {
        assert_eq!(tree_content(&dir), tree_content(reference.path()), "{when}");
        for (round, expected) in taken.iter().enumerate() {
            let s = snapshot_dir(m, &format!("s{round}"));
            assert_eq!(&tree_content(&s), expected, "snapshot s{round}, {when}");
        }
        for d in [dir.clone(), dir.join("d")] {
            // Names of frozen layers only, whited out, or nowhere.
            assert_eq!(fs::read(d.join("r14")).unwrap(), b"made in 14", "{when}");
            assert_eq!(fs::read(d.join("r0")).unwrap(), b"back in 4", "{when}");
            assert_eq!(errno(fs::metadata(d.join("r1"))), Some(libc::ENOENT));
            assert_eq!(errno(fs::metadata(d.join("r13"))), Some(libc::ENOENT));
            assert_eq!(errno(fs::metadata(d.join("m5"))), Some(libc::ENOENT));
            assert_eq!(errno(fs::metadata(d.join("nowhere"))), Some(libc::ENOENT));
            assert_eq!(errno(fs::metadata(d.join("sub/old"))), Some(libc::ENOENT));
            // A name some frozen layer holds is taken; one it whites out
            // is free.
            let new = |n: &str| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(d.join(n))
            };
            assert_eq!(errno(new("r14")), Some(libc::EEXIST), "{when}");
            assert_eq!(errno(new("m19")), Some(libc::EEXIST), "{when}");
            assert_eq!(errno(fs::create_dir(d.join("sub"))), Some(libc::EEXIST));
        }
    };
    check(&m, "as made");
    // A new worker reads every layer afresh.
    m.kill();
    m.restart(&[]);
    check(&m, "after a restart");
    // Freed names can be made again, in the branch and in the reference.
    for root in [dir.clone(), reference.path().to_path_buf()] {
        fs::write(root.join("r13"), b"new").unwrap();
        fs::write(root.join("d/m5"), b"new").unwrap();
    }
    assert_eq!(tree_content(&dir), tree_content(reference.path()));
}

/// A state directory of format version 3 (every snapshot and branch
/// listing all its layers) is read as it was, and the next change writes
/// the current version (each names its top layer; `below` says where
/// layers sit).
#[test]
fn a_state_of_version_3_is_read_and_written_in_the_current_version() {
    let mut m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    branch(&m, "base", "b");
    let b = branch_dir(&m, "b");
    fs::write(b.join("one"), b"1").unwrap();
    snapshot(&m, Some("b"), "b1");
    fs::write(b.join("two"), b"2").unwrap();
    fs::remove_file(b.join("one")).unwrap();
    snapshot(&m, Some("b"), "b2");
    branch(&m, "b1", "c");
    fs::write(branch_dir(&m, "c").join("three"), b"3").unwrap();
    let views = ["b", "c"]
        .map(|n| branch_dir(&m, n))
        .into_iter()
        .chain(["base", "b1", "b2"].map(|n| snapshot_dir(&m, n)))
        .collect::<Vec<_>>();
    let before: Vec<_> = views.iter().map(|v| tree(v)).collect();
    m.stop();

    // The catalog as version 3 wrote it, alone in catalog.json.
    let state = m.state_dir();
    let mut v = latest_catalog(state);
    let below = v["below"].as_object().cloned().unwrap_or_default();
    let chain = |top: &Value| {
        let mut out = Vec::new();
        let mut at = top.as_u64();
        while let Some(l) = at {
            out.push(l);
            at = below.get(&l.to_string()).and_then(Value::as_u64);
        }
        out
    };
    for kind in ["snapshots", "branches"] {
        for view in v[kind].as_array_mut().unwrap() {
            let layers = chain(&view["layer"]);
            let view = view.as_object_mut().unwrap();
            view.remove("layer");
            if !layers.is_empty() {
                view.insert("layers".into(), json!(layers));
            }
        }
    }
    let v3 = v.as_object_mut().unwrap();
    v3.remove("below");
    v3.insert("version".into(), json!(3));
    put_catalog(state, &v);
    // Version 3 did not record the layers a deletion freed: a layer no view
    // uses is garbage, as it was for that version.
    let stray = state.join(format!("layers/{}", layer_ids(&m)[0]));
    let freed = state.join("layers/0");
    copy_tree(&stray, &freed);

    m.restart(&[]);
    assert!(!freed.exists(), "an unused layer of a version-3 state goes");
    let after: Vec<_> = views.iter().map(|v| tree(v)).collect();
    assert_eq!(after, before, "every view as it was");
    assert!(common::check_state(m.state_dir()).contains("0 problems"));
    // The next change is written in the current version (a line of what
    // changed), and the views stay.
    snapshot(&m, Some("c"), "c1");
    let log = fs::read_to_string(m.state_dir().join("catalog.log")).unwrap();
    let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["format"], &last["version"]),
        (&json!("agentfs-change"), &json!(5))
    );
    assert_eq!(last["snapshots"][0]["name"], "c1", "{last}");
    assert!(last["branches"][0].get("layers").is_none(), "{last}");
    assert!(last.get("bindings").is_none(), "unchanged: {last}");
    assert_eq!(tree(&snapshot_dir(&m, "c1")), before[1]);
    assert_eq!(fs::read(snapshot_dir(&m, "b2").join("two")).unwrap(), b"2");
    assert!(!snapshot_dir(&m, "b2").join("one").exists());
    assert!(common::check_state(m.state_dir()).contains("0 problems"));
}

/// The catalog of a stopped mount's state directory (`catalog.json` and
/// the changes its log holds), as JSON.
fn latest_catalog(state: &Path) -> Value {
    serde_json::to_value(Catalog::load(state).unwrap()).unwrap()
}

/// Makes `v` the catalog of a stopped mount's state directory.
fn put_catalog(state: &Path, v: &Value) {
    fs::write(
        state.join("catalog.json"),
        serde_json::to_vec_pretty(v).unwrap(),
    )
    .unwrap();
    fs::write(state.join("catalog.log"), b"").unwrap();
}

/// Cuts the last line off a stopped mount's catalog log: the one that
/// forgot the layers a deletion freed, once their removal was flushed
/// (as if a crash had come before it).
fn cut_the_forgetting_line(state: &Path) {
    assert_eq!(latest_catalog(state)["freed"], json!(null));
    let log = fs::read_to_string(state.join("catalog.log")).unwrap();
    let forgetting = log.lines().last().unwrap();
    assert!(forgetting.contains("\"freed\":[]"), "{forgetting}");
    fs::write(
        state.join("catalog.log"),
        &log[..log.len() - forgetting.len() - 1],
    )
    .unwrap();
}

/// The ids of the layer directories in the state directory, ascending.
fn layer_ids(m: &Mount) -> Vec<u64> {
    let mut ids: Vec<u64> = fs::read_dir(m.state_dir().join("layers"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse().ok())
        .collect();
    ids.sort();
    ids
}

/// Copies directory `from` to `to` with everything in it (xattrs too).
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// A layer directory no view uses is removed at start only when a deletion
/// recorded it as freed (or by a creation a crash cut short): a catalog
/// that lost where a layer sits must not cost the snapshots under it.
#[test]
fn a_start_removes_only_the_layers_a_deletion_freed() {
    let mut m = Mount::builder().populate(populate).start();
    snapshot(&m, None, "base");
    let first = branch(&m, "base", "b")["layer"].as_u64().unwrap();
    let b = branch_dir(&m, "b");
    fs::write(b.join("kept"), b"in the first layer").unwrap();
    snapshot(&m, Some("b"), "b1");
    fs::write(b.join("later"), b"in the second layer").unwrap();
    snapshot(&m, Some("b"), "b2");
    branch(&m, "b1", "gone");
    let gone = listed_branch(&m, "gone").unwrap()["layer"]
        .as_u64()
        .unwrap();
    fs::write(branch_dir(&m, "gone").join("x"), b"x").unwrap();
    let b2 = tree(&snapshot_dir(&m, "b2"));

    // A deletion a crash cut short after its catalog line: its layer's
    // directory is still there, and goes at the next start.
    let state = m.state_dir().to_path_buf();
    let kept_copy = state.join(format!("copy-of-{gone}"));
    copy_tree(&state.join(format!("layers/{gone}")), &kept_copy);
    ctl(
        &m,
        Request::BranchDelete {
            branch: "gone".into(),
            force: false,
        },
    )
    .expect("branch-delete");
    m.stop();
    // Removed and flushed, the layer was forgotten by a line of its own:
    // the crash comes before it.
    cut_the_forgetting_line(&state);
    assert_eq!(latest_catalog(&state)["freed"], json!([gone]));
    fs::rename(&kept_copy, state.join(format!("layers/{gone}"))).unwrap();
    let report = common::check_state(&state);
    assert!(
        report.contains(&format!("layers/{gone}: no snapshot")),
        "{report}"
    );
    m.restart(&[]);
    assert!(!layer_ids(&m).contains(&gone), "{:?}", layer_ids(&m));
    assert_eq!(tree(&snapshot_dir(&m, "b2")), b2);
    // And forgotten by that start.
    assert_eq!(latest_catalog(&state)["freed"], json!(null));

    // A crash after the removal, before the line that forgets it: the
    // start finds no directory, and forgets it all the same.
    branch(&m, "b2", "gone2");
    let gone2 = listed_branch(&m, "gone2").unwrap()["layer"]
        .as_u64()
        .unwrap();
    ctl(
        &m,
        Request::BranchDelete {
            branch: "gone2".into(),
            force: false,
        },
    )
    .expect("branch-delete");
    m.stop();
    cut_the_forgetting_line(&state);
    assert_eq!(latest_catalog(&state)["freed"], json!([gone2]));
    assert!(!state.join(format!("layers/{gone2}")).exists());
    m.restart(&[]);
    assert_eq!(latest_catalog(&state)["freed"], json!(null));

    // Damage: the catalog loses where b's first layer sits. Its directory
    // stays (the worker logs an error naming it), the check names it, and
    // the views come back whole once the entry is put back. With b1 gone,
    // b's first layer is only reached through "below".
    ctl(
        &m,
        Request::SnapshotDelete {
            snapshot: "b1".into(),
        },
    )
    .expect("snapshot-delete");
    m.stop();
    let mut v = latest_catalog(&state);
    let entry = v["below"].as_object_mut().unwrap();
    let (key, _) = entry
        .iter()
        .find(|(_, l)| l.as_u64() == Some(first))
        .map(|(k, l)| (k.clone(), l.clone()))
        .expect("a layer sits on the first");
    let lost = entry.remove(&key).unwrap();
    let damaged = v.clone();
    put_catalog(&state, &damaged);
    let (ok, report) = common::check_report(&state);
    assert!(!ok, "{report}");
    assert!(
        report.contains(&format!(
            "layers/{first}: no snapshot or branch uses it, yet"
        )),
        "{report}"
    );
    m.restart(&[]);
    assert!(state.join(format!("layers/{first}/tree/kept")).exists());
    m.stop();
    v["below"][key] = lost;
    put_catalog(&state, &v);
    assert!(common::check_state(&state).contains("0 problems"));
    m.restart(&[]);
    assert_eq!(tree(&snapshot_dir(&m, "b2")), b2);
    assert_eq!(
        fs::read(snapshot_dir(&m, "b2").join("kept")).unwrap(),
        b"in the first layer"
    );

    // A loop in "below" is refused as damage, naming the layer.
    m.stop();
    let mut looped = v.clone();
    looped["below"][first.to_string()] = json!(first);
    put_catalog(&state, &looped);
    let (ok, report) = common::check_report(&state);
    assert!(!ok && report.contains("lead back to it"), "{report}");
    put_catalog(&state, &v);
    m.restart(&[]);
    assert_eq!(tree(&snapshot_dir(&m, "b2")), b2);
}

/// The files of a tree: content and link count by relative path, and
/// whether every file with several names shows one inode number per
/// content (the names of one file).
fn files(root: &Path) -> (Vec<(String, String, u64)>, bool) {
    let mut out = Vec::new();
    let mut inos = std::collections::HashMap::new();
    let mut one_ino = true;
    for (rel, p, md) in common::walk(root) {
        if md.is_file() {
            let content = String::from_utf8(fs::read(&p).unwrap()).unwrap();
            if md.nlink() > 1 {
                one_ino &= *inos.entry(content.clone()).or_insert(md.ino()) == md.ino();
            }
            out.push((rel.to_str().unwrap().to_owned(), content, md.nlink()));
        }
    }
    out.sort();
    (out, one_ino)
}

/// Appends `data` to the file at `p`.
fn append(p: PathBuf, data: &[u8]) -> std::io::Result<()> {
    OpenOptions::new().append(true).open(p)?.write_all(data)
}

/// A file hard-linked in main (`a`, `d/b`), known to the kernel by both
/// names as one node, or hard-linked in the branch: each name stays
/// usable after another is changed, removed or renamed (or its directory
/// moved), in this top layer and after it froze, and the branch shows
/// after a crash what it showed before. Names were lost (`mv d d2`
/// dropped `d2/b`) or came back (a removed name was copied up again after
/// a snapshot), and a change through a name other than the first one
/// looked up failed with ESTALE.
#[test]
fn every_name_of_a_hard_linked_file_stays_usable() {
    type Step = fn(&mut Mount, &Path) -> std::io::Result<()>;
    /// Files expected: path, content, link count.
    type Files = &'static [(&'static str, &'static str, u64)];
    let scenarios: Vec<(&str, Step, Files)> = vec![
        (
            "rm a; append d/b",
            |_, x| {
                fs::remove_file(x.join("a"))?;
                append(x.join("d/b"), b"x")
            },
            &[("c", "cc", 1), ("d/b", "onex", 1)],
        ),
        (
            "rm a; truncate d/b",
            |_, x| {
                fs::remove_file(x.join("a"))?;
                OpenOptions::new()
                    .write(true)
                    .open(x.join("d/b"))?
                    .set_len(1)
            },
            &[("c", "cc", 1), ("d/b", "o", 1)],
        ),
        (
            "append a; mv d/b e",
            |_, x| {
                append(x.join("a"), b"x")?;
                fs::rename(x.join("d/b"), x.join("e"))
            },
            &[("a", "onex", 2), ("c", "cc", 1), ("e", "onex", 2)],
        ),
        (
            "rm a; mv d/b e; append e",
            |_, x| {
                fs::remove_file(x.join("a"))?;
                fs::rename(x.join("d/b"), x.join("e"))?;
                append(x.join("e"), b"x")
            },
            &[("c", "cc", 1), ("e", "onex", 1)],
        ),
        (
            "append a; exchange d/b and c",
            |_, x| {
                append(x.join("a"), b"x")?;
                use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
                let exchange = RenameFlags::RENAME_EXCHANGE;
                renameat2(AT_FDCWD, &x.join("d/b"), AT_FDCWD, &x.join("c"), exchange)?;
                Ok(())
            },
            &[("a", "onex", 2), ("c", "onex", 2), ("d/b", "cc", 1)],
        ),
        (
            "rm a; ln d/b f; append f",
            |_, x| {
                fs::remove_file(x.join("a"))?;
                fs::hard_link(x.join("d/b"), x.join("f"))?;
                append(x.join("f"), b"x")
            },
            &[("c", "cc", 1), ("d/b", "onex", 2), ("f", "onex", 2)],
        ),
        (
            "mv d d2",
            |_, x| fs::rename(x.join("d"), x.join("d2")),
            &[("a", "one", 2), ("c", "cc", 1), ("d2/b", "one", 2)],
        ),
        (
            "append a; mv d d2",
            |_, x| {
                append(x.join("a"), b"x")?;
                fs::rename(x.join("d"), x.join("d2"))
            },
            &[("a", "onex", 2), ("c", "cc", 1), ("d2/b", "onex", 2)],
        ),
        (
            "rm a; mv d d2; append d2/b",
            |_, x| {
                fs::remove_file(x.join("a"))?;
                fs::rename(x.join("d"), x.join("d2"))?;
                append(x.join("d2/b"), b"x")
            },
            &[("c", "cc", 1), ("d2/b", "onex", 1)],
        ),
        (
            "rm a; snapshot; append d/b",
            |m, x| {
                fs::remove_file(x.join("a"))?;
                snapshot(m, Some("x"), "s");
                append(x.join("d/b"), b"y")
            },
            &[("c", "cc", 1), ("d/b", "oney", 1)],
        ),
        (
            "rm a; append d/b; snapshot; append d/b",
            |m, x| {
                fs::remove_file(x.join("a"))?;
                append(x.join("d/b"), b"x")?;
                snapshot(m, Some("x"), "s");
                append(x.join("d/b"), b"y")
            },
            &[("c", "cc", 1), ("d/b", "onexy", 1)],
        ),
        (
            "f; ln f g; rm f; snapshot; append g",
            |m, x| {
                fs::write(x.join("f"), b"f")?;
                fs::hard_link(x.join("f"), x.join("g"))?;
                fs::remove_file(x.join("f"))?;
                snapshot(m, Some("x"), "s");
                append(x.join("g"), b"y")
            },
            &[
                ("a", "one", 2),
                ("c", "cc", 1),
                ("d/b", "one", 2),
                ("g", "fy", 1),
            ],
        ),
        (
            "f; ln f g; rm g; snapshot; append f",
            |m, x| {
                fs::write(x.join("f"), b"f")?;
                fs::hard_link(x.join("f"), x.join("g"))?;
                fs::remove_file(x.join("g"))?;
                snapshot(m, Some("x"), "s");
                append(x.join("f"), b"y")
            },
            &[
                ("a", "one", 2),
                ("c", "cc", 1),
                ("d/b", "one", 2),
                ("f", "fy", 1),
            ],
        ),
        (
            "mv a a2; crash; stat d/b; rm a2",
            |m, x| {
                fs::rename(x.join("a"), x.join("a2"))?;
                m.kill();
                m.restart(&[]);
                fs::metadata(x.join("d/b"))?;
                fs::remove_file(x.join("a2"))
            },
            &[("c", "cc", 1), ("d/b", "one", 1)],
        ),
        (
            "ln d/b f; crash; stat d/b; rm f",
            |m, x| {
                fs::hard_link(x.join("d/b"), x.join("f"))?;
                m.kill();
                m.restart(&[]);
                fs::metadata(x.join("d/b"))?;
                fs::remove_file(x.join("f"))
            },
            &[("a", "one", 2), ("c", "cc", 1), ("d/b", "one", 2)],
        ),
        (
            "git's object: t; ln t o; rm t; snapshot; append o",
            |m, x| {
                fs::write(x.join("t"), b"t")?;
                fs::hard_link(x.join("t"), x.join("o"))?;
                fs::remove_file(x.join("t"))?;
                snapshot(m, Some("x"), "s");
                append(x.join("o"), b"y")
            },
            &[
                ("a", "one", 2),
                ("c", "cc", 1),
                ("d/b", "one", 2),
                ("o", "ty", 1),
            ],
        ),
        (
            "ln c g; rm c; snapshot; append g",
            |m, x| {
                fs::hard_link(x.join("c"), x.join("g"))?;
                fs::remove_file(x.join("c"))?;
                snapshot(m, Some("x"), "s");
                append(x.join("g"), b"y")
            },
            &[("a", "one", 2), ("d/b", "one", 2), ("g", "ccy", 1)],
        ),
    ];
    for (what, step, want) in scenarios {
        let mut m = Mount::builder()
            .populate(|s| {
                fs::create_dir(s.join("d")).unwrap();
                fs::write(s.join("a"), b"one").unwrap();
                fs::hard_link(s.join("a"), s.join("d/b")).unwrap();
                fs::write(s.join("c"), b"cc").unwrap();
            })
            .start();
        snapshot(&m, None, "base");
        branch(&m, "base", "x");
        let x = branch_dir(&m, "x");
        // The kernel learns both names of the one node, `a` first.
        fs::read(x.join("a")).unwrap();
        fs::read(x.join("d/b")).unwrap();
        step(&mut m, &x).unwrap_or_else(|e| panic!("{what}: {e}"));
        let want: Vec<_> = want
            .iter()
            .map(|(p, c, n)| (p.to_string(), c.to_string(), *n))
            .collect();
        assert_eq!(files(&x), (want.clone(), true), "{what}");
        m.kill();
        m.restart(&[]);
        assert_eq!(files(&x), (want, true), "{what}, after a restart");
        assert_eq!(fs::read(m.source().join("d/b")).unwrap(), b"one", "{what}");
        common::check_state(m.state_dir());
    }
}

/// A branch file removed while open is not copied up again once the
/// branch's top layer froze: a change through a descriptor open for
/// reading does not bring its name back (ESTALE: there is no copy to
/// change), and one open for writing goes on writing the removed file,
/// which no snapshot shows, whichever came first, the removal or the
/// snapshot.
#[test]
fn a_file_removed_while_open_stays_removed_after_a_snapshot() {
    use std::os::unix::fs::FileExt;
    let mut m = Mount::builder()
        .populate(|s| {
            for n in ["c", "v", "w"] {
                fs::write(s.join(n), n.repeat(2)).unwrap();
            }
        })
        .start();
    snapshot(&m, None, "base");
    branch(&m, "base", "x");
    let x = branch_dir(&m, "x");
    let open = |n: &str| OpenOptions::new().read(true).write(true).open(x.join(n));
    let c = File::open(x.join("c")).unwrap();
    fs::remove_file(x.join("c")).unwrap();
    // Removed, then a snapshot.
    let w = open("w").unwrap();
    w.write_all_at(b"1", 0).unwrap();
    fs::remove_file(x.join("w")).unwrap();
    snapshot(&m, Some("x"), "s1");
    let changed = c.set_permissions(fs::Permissions::from_mode(0o600));
    assert_eq!(changed.unwrap_err().raw_os_error(), Some(libc::ESTALE));
    w.write_all_at(b"2", 1).unwrap();
    // A snapshot, then removed.
    let (v, v2) = (open("v").unwrap(), open("v").unwrap());
    v.write_all_at(b"1", 0).unwrap();
    snapshot(&m, Some("x"), "s2");
    fs::remove_file(x.join("v")).unwrap();
    v.write_all_at(b"2", 1).unwrap();
    snapshot(&m, Some("x"), "s3");
    // A truncation first (through the descriptor), then the other
    // descriptor, which still had the copy s2 shows: one file for both.
    v.set_len(2).unwrap();
    v2.write_all_at(b"3", 2).unwrap();
    assert_eq!(v.metadata().unwrap().len(), 3);
    for (f, want) in [(&w, "12"), (&v, "123"), (&v2, "123")] {
        let mut got = vec![0; 8];
        let n = f.read_at(&mut got, 0).unwrap();
        assert_eq!(&got[..n], want.as_bytes());
    }
    drop((c, v, v2, w));
    let shown = |dir: &Path| common::names(dir);
    assert_eq!(shown(&x), Vec::<String>::new());
    assert_eq!(shown(&snapshot_dir(&m, "s1")), ["v"]);
    assert_eq!(fs::read(snapshot_dir(&m, "s2").join("v")).unwrap(), b"1v");
    assert_eq!(shown(&snapshot_dir(&m, "s3")), Vec::<String>::new());
    m.kill();
    m.restart(&[]);
    assert_eq!(shown(&x), Vec::<String>::new());
    assert_eq!(fs::read(snapshot_dir(&m, "s2").join("v")).unwrap(), b"1v");
    assert_eq!(fs::read(m.source().join("v")).unwrap(), b"vv");
    common::check_state(m.state_dir());
}
