//! Escape attempts from inside the mount (issue 6): whatever names,
//! symlinks, hard links and host-side renames do, the worker reads and
//! writes nothing outside the source and the state directory. These run on
//! an unconfined worker on purpose: they test the worker's own path
//! discipline (descriptors, `openat2` beneath, no string paths), which must
//! hold without the sandbox's Landlock rules behind it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, RenameFlags, ResolveFlag, openat2, renameat, renameat2};
use nix::sys::stat::Mode;

/// A directory next to the mount's source, outside source and state, that
/// only root may write.
fn outside(m: &common::Mount) -> PathBuf {
    let o = m.source().parent().unwrap().join("outside");
    fs::create_dir_all(&o).unwrap();
    fs::set_permissions(&o, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(o.join("f"), "outside\n").unwrap();
    o
}

/// A directory the kernel has looked up is replaced on the host by a
/// symlink to a directory outside. Creating a file in it through the mount
/// either reaches the original directory (the worker holds it by
/// descriptor) or is the caller's own symlink resolution (refused here,
/// the caller being nobody): never a file created outside by the worker.
#[test]
fn a_directory_swapped_for_a_symlink_does_not_redirect_the_worker() {
    let m = common::Mount::builder()
        .populate(|src| {
            fs::create_dir(src.join("d")).unwrap();
            fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o777)).unwrap();
        })
        .start();
    let out = outside(&m);
    assert!(m.path().join("d").is_dir());
    fs::rename(m.source().join("d"), m.source().join("d-old")).unwrap();
    symlink(&out, m.source().join("d")).unwrap();
    let created = common::run_as(
        65534,
        65534,
        Path::new("/"),
        &format!("echo new > {}/d/new", m.path().display()),
    );
    assert_eq!(
        common::names(&out),
        ["f"],
        "the worker wrote outside ({created:?})"
    );
    if created.status.success() {
        assert_eq!(
            fs::read_to_string(m.source().join("d-old/new")).unwrap(),
            "new\n"
        );
    }
}

/// A file of the source hard-linked to a file outside: writing it in a
/// branch copies it up into the branch, and the outside file (the same
/// inode as the source's) is left alone.
#[test]
fn a_hard_link_to_outside_is_copied_up_not_written_through() {
    let m = common::Mount::new();
    let out = outside(&m);
    fs::hard_link(out.join("f"), m.source().join("hl")).unwrap();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let in_branch = common::branch_dir(&m, "b").join("hl");
    assert_eq!(fs::read_to_string(&in_branch).unwrap(), "outside\n");
    fs::write(&in_branch, "branch\n").unwrap();
    assert_eq!(fs::read_to_string(&in_branch).unwrap(), "branch\n");
    assert_eq!(fs::read_to_string(out.join("f")).unwrap(), "outside\n");
    assert_eq!(common::names(&out), ["f"]);
}

/// Names with dots never leave the tree: `..` out of `.agentfs` and out of
/// a branch is resolved by the kernel within the mount.
#[test]
fn dot_dot_through_agentfs_stays_in_the_mount() {
    let m = common::Mount::new();
    let out = outside(&m);
    fs::write(m.path().join("top"), "main\n").unwrap();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let up = m.path().join(".agentfs/branches/b/../../../top");
    assert_eq!(fs::read_to_string(&up).unwrap(), "main\n");
    assert_eq!(common::names(&out), ["f"]);
}

/// Directories of the race's source that hold files ("" is the root).
const RACE_DIRS: [&str; 7] = ["", "d0", "d0/sub", "d1", "d1/sub", "d2", "d2/sub"];
/// The root's subdirectories, which the others are moved into.
const TOP_DIRS: [&str; 3] = ["d0", "d1", "d2"];
/// Files in each of them.
const RACE_FILES: [&str; 3] = ["f0", "f1", "f2"];

/// A directory of [`RACE_DIRS`] but the root, as (its parent with a
/// trailing slash, its name): "d0/sub" is ("d0/", "sub"), "d0" is ("", "d0").
fn split(dir: &str) -> (&str, &str) {
    dir.split_at(dir.rfind('/').map_or(0, |i| i + 1))
}

/// A small deterministic generator (xorshift), so that a failing run can be
/// read back from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Opens `path` beneath `dir` without following a symlink anywhere on the
/// way (as the worker opens host files): nothing this test does through
/// the mount resolves a symlink, so whatever happens outside is the
/// worker's doing.
fn open_beneath(dir: BorrowedFd<'_>, path: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    let mut how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    if flags.contains(OFlag::O_CREAT) {
        how = how.mode(Mode::from_bits_truncate(0o644));
    }
    openat2(dir, if path.is_empty() { "." } else { path }, how)
}

/// The directory `path` beneath `dir`, as an `O_PATH` descriptor.
fn dir_beneath(dir: BorrowedFd<'_>, path: &str) -> nix::Result<OwnedFd> {
    open_beneath(dir, path, OFlag::O_PATH | OFlag::O_DIRECTORY)
}

/// The rest of the file open at `fd`, as text (lossily).
fn read_all(fd: OwnedFd) -> nix::Result<String> {
    let mut data = Vec::new();
    fs::File::from(fd)
        .read_to_end(&mut data)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// Every object below `root` by relative path (symlinks not followed), with
/// the content of the regular files (empty for the others).
fn contents(root: &Path) -> Vec<(String, String)> {
    let dir = fs::File::open(root).unwrap();
    common::walk(root)
        .into_iter()
        .map(|(rel, _, md)| {
            let rel = rel.to_string_lossy().into_owned();
            let mut data = String::new();
            if md.is_file() {
                data = open_beneath(dir.as_fd(), &rel, OFlag::O_RDONLY)
                    .and_then(read_all)
                    .unwrap_or_else(|e| panic!("reading {}/{rel}: {e}", root.display()));
            }
            (rel, data)
        })
        .collect()
}

/// One rename of the host's, renameat2(a, an, b, bn): an exchange (its own
/// inverse) if the flag is set, else a rename (undone by the rename back).
struct Step<'a>(BorrowedFd<'a>, String, BorrowedFd<'a>, String, bool);

impl Step<'_> {
    fn run(&self, undo: bool) -> nix::Result<()> {
        let Step(a, an, b, bn, exchange) = self;
        let flags = match exchange {
            true => RenameFlags::RENAME_EXCHANGE,
            false => RenameFlags::RENAME_NOREPLACE,
        };
        match undo && !exchange {
            false => renameat2(*a, an.as_str(), *b, bn.as_str(), flags),
            true => renameat2(*b, bn.as_str(), *a, an.as_str(), flags),
        }
    }
}

/// The host side of the race: until `stop`, swaps names in the source
/// (never through the mount) and swaps them back after a moment, so that
/// the source is mostly as it was and the worker keeps meeting both states.
/// Only renames: no inode the source had is ever removed. Every path is
/// resolved without following symlinks, so the swapping itself never
/// touches outside. Returns how many swaps were done and undone.
fn swap_source(src: &Path, links: bool, stop: &AtomicBool) -> usize {
    // From no time at all to about a millisecond (a few operations of the
    // branches' threads).
    let pause = |rng: &mut Rng, most: usize| match rng.below(3) {
        0 => std::thread::yield_now(),
        _ => std::thread::sleep(Duration::from_micros(rng.below(most) as u64)),
    };
    let root = fs::File::open(src).unwrap();
    let root = root.as_fd();
    let mut rng = Rng(0x5eed_cafe);
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let f = rng.pick(&RACE_FILES).to_owned();
        let d = dir_beneath(root, rng.pick(&RACE_DIRS)).unwrap();
        let d2 = dir_beneath(root, rng.pick(&RACE_DIRS)).unwrap();
        let (parent, child) = split(rng.pick(&RACE_DIRS[1..]));
        let child = child.to_owned();
        let p = dir_beneath(root, parent).unwrap();
        let o = dir_beneath(root, rng.pick(&TOP_DIRS)).unwrap();
        let (d, d2, p, o) = (d.as_fd(), d2.as_fd(), p.as_fd(), o.as_fd());
        let steps = match rng.below(8) {
            // A file and a symlink to outside/f, atomically.
            0 => vec![Step(d, f.clone(), d, format!(".s-{f}"), true)],
            // A file and a hard link to outside/hl, atomically.
            1 if links => vec![Step(d, f.clone(), d, format!(".h-{f}"), true)],
            // Files between directories.
            1 | 2 => vec![Step(d, f.clone(), d2, f, true)],
            // A directory and a symlink to outside, atomically.
            3 => vec![Step(p, child.clone(), p, format!(".l-{child}"), true)],
            // The same in two steps: the directory renamed away, then the
            // symlink to outside put in its place.
            4 => vec![
                Step(p, child.clone(), p, format!("{child}.away"), false),
                Step(p, format!(".l-{child}"), p, child, false),
            ],
            // A file renamed away, then the symlink to outside/f in its place.
            5 => vec![
                Step(d, f.clone(), d, format!("{f}.away"), false),
                Step(d, format!(".s-{f}"), d, f, false),
            ],
            // Subdirectories between directories (EINVAL into itself).
            6 => vec![Step(p, child, o, "sub".to_owned(), true)],
            // A directory moved into another one.
            _ => vec![Step(p, child, o, "moved".to_owned(), false)],
        };
        // The steps up to the first that fails, undone in reverse order.
        let applied: Vec<&Step> = steps.iter().take_while(|s| s.run(false).is_ok()).collect();
        pause(&mut rng, 1000);
        for s in applied.iter().rev() {
            s.run(true)
                .unwrap_or_else(|e| panic!("undoing a swap of {} and {}: {e}", s.1, s.3));
        }
        done += !applied.is_empty() as usize;
        pause(&mut rng, 300);
    }
    done
}

/// The mount side of the race: `ops` writes, appends, truncations, chmods,
/// renames, exchanges, creations and reads in the branch at `root`, most
/// of them a first change of a file of main (a copy-up). Errors are
/// expected (the host keeps moving things) and tallied by errno; returns
/// the tally and the violations seen (a regular file showing outside/f).
fn race_branch(
    root: &Path,
    seed: u64,
    tag: &str,
    ops: usize,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let root = fs::File::open(root).unwrap();
    let root = root.as_fd();
    let mut rng = Rng(seed);
    let (mut tally, mut violations) = (BTreeMap::new(), Vec::new());
    // Mostly main's names; else the names the host's swaps use, which
    // come and go and change kind (lookups the kernel has not cached).
    let mut swapped: Vec<String> = TOP_DIRS.map(|t| format!("{t}/moved")).into();
    for d in &RACE_DIRS[1..] {
        let (parent, child) = split(d);
        swapped.extend([format!("{d}.away"), format!("{parent}.l-{child}")]);
    }
    for i in 0..ops {
        let dpath = match rng.below(3) {
            0 => swapped[rng.below(swapped.len())].as_str(),
            _ => rng.pick(&RACE_DIRS),
        };
        let f = rng.pick(&RACE_FILES);
        let f: &str = &match rng.below(6) {
            0 => format!(".s-{f}"),
            1 => format!(".h-{f}"),
            2 => format!("{f}.away"),
            _ => f.to_owned(),
        };
        let line = format!("BRANCH {tag} {i}\n");
        let bonly: &str = &format!("bonly-{tag}-{i}");
        let r = (|| -> nix::Result<()> {
            let d = dir_beneath(root, dpath)?;
            let d = d.as_fd();
            let line = line.as_bytes();
            let write = |flags| nix::unistd::write(open_beneath(d, f, flags)?, line).map(drop);
            let create = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY;
            match rng.below(9) {
                0 => write(OFlag::O_WRONLY | OFlag::O_APPEND),
                1 => {
                    let fd = open_beneath(d, f, OFlag::O_WRONLY)?;
                    nix::sys::uio::pwrite(fd, line, 0).map(drop)
                }
                2 => write(OFlag::O_WRONLY | OFlag::O_TRUNC),
                3 => nix::unistd::ftruncate(open_beneath(d, f, OFlag::O_WRONLY)?, 4),
                4 => nix::sys::stat::fchmod(
                    open_beneath(d, f, OFlag::O_RDONLY)?,
                    Mode::from_bits_truncate(if i % 2 == 0 { 0o600 } else { 0o644 }),
                ),
                5 => {
                    renameat(d, f, d, bonly)?;
                    renameat(d, bonly, d, f)
                }
                // A subdirectory or a file exchanged with another
                // directory's.
                6 => {
                    let (to, name) = match rng.below(3) {
                        0 => (rng.pick(&TOP_DIRS), "sub"),
                        _ => (rng.pick(&RACE_DIRS), f),
                    };
                    let to = dir_beneath(root, to)?;
                    renameat2(d, name, to.as_fd(), name, RenameFlags::RENAME_EXCHANGE)
                }
                7 => {
                    let fd = if rng.below(2) == 0 {
                        nix::sys::stat::mkdirat(d, bonly, Mode::from_bits_truncate(0o755))?;
                        open_beneath(dir_beneath(d, bonly)?.as_fd(), "new", create)?
                    } else {
                        open_beneath(d, bonly, create)?
                    };
                    nix::unistd::write(fd, line).map(drop)
                }
                _ => {
                    let data = read_all(open_beneath(d, f, OFlag::O_RDONLY)?)?;
                    if data.contains("outside") {
                        violations.push(format!("{tag} op {i}: {dpath}/{f} read as {data:?}"));
                    }
                    Ok(())
                }
            }
        })();
        let key = match r {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{e:?}"),
        };
        *tally.entry(key).or_insert(0) += 1;
    }
    (tally, violations)
}

/// Rename races during copy-up: while threads write, append, truncate,
/// chmod, rename and create files in branches through the mount (first
/// changes of main's files, so copy-ups), the host keeps swapping the
/// source's names under the worker: directories for symlinks to a
/// directory outside (atomically and in two steps), files for symlinks to
/// a file outside and for hard links to another one, files and
/// subdirectories between directories. Nothing outside the source and the
/// state directory is read or written (inotify on the outside directory,
/// and its tree unchanged), nothing appears next to the source, no branch
/// file shows the outside file's content, main shows nothing of the
/// branches, and the worker still serves. This test follows no symlink
/// itself (`openat2` with `RESOLVE_NO_SYMLINKS`).
#[test]
fn rename_races_during_copy_up_touch_nothing_outside() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::unix::fs::MetadataExt;
    const ROUNDS: usize = 8;
    const WRITERS: u64 = 2;
    const OPS: usize = 250;
    let m = common::Mount::builder()
        .populate(|src| {
            for d in &RACE_DIRS[1..] {
                fs::create_dir(src.join(d)).unwrap();
                fs::set_permissions(src.join(d), fs::Permissions::from_mode(0o777)).unwrap();
            }
            for d in RACE_DIRS {
                for f in RACE_FILES {
                    fs::write(src.join(d).join(f), format!("main {d}/{f}\n")).unwrap();
                }
            }
        })
        .start();
    let src = m.source().to_path_buf();
    let out = outside(&m);
    fs::write(out.join("hl"), "linked\n").unwrap();
    // The swaps' partners: symlinks to outside next to each directory and
    // file, hard links to outside/hl next to each file (when the source
    // and outside share a file system: always, unless TMPDIR is odd).
    let links = fs::metadata(&src).unwrap().dev() == fs::metadata(&out).unwrap().dev();
    if !links {
        eprintln!("outside is on another file system: no hard-link swaps");
    }
    for d in RACE_DIRS {
        for f in RACE_FILES {
            symlink(out.join("f"), src.join(d).join(format!(".s-{f}"))).unwrap();
            if links {
                fs::hard_link(out.join("hl"), src.join(d).join(format!(".h-{f}"))).unwrap();
            }
        }
    }
    for d in &RACE_DIRS[1..] {
        let (parent, child) = split(d);
        symlink(&out, src.join(parent).join(format!(".l-{child}"))).unwrap();
    }
    let parent = src.parent().unwrap().to_path_buf();
    let parent_before = common::names(&parent);
    let outside_before = common::tree(&out);
    let outside_mtime = fs::metadata(&out).unwrap().modified().unwrap();
    // Every open, read, write, change of attributes, creation, removal and
    // rename of outside and of its entries (not opens with `O_PATH` nor
    // stat(2)).
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify
        .add_watch(&out, AddWatchFlags::IN_ALL_EVENTS)
        .unwrap();

    let stop = AtomicBool::new(false);
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut violations = Vec::new();
    let swaps = std::thread::scope(|s| {
        let host = s.spawn(|| swap_source(&src, links, &stop));
        for r in 0..ROUNDS {
            // A new branch each round: its files are all main's again, so
            // every first change is a copy-up racing the host's swaps.
            common::snapshot(&m, None, &format!("s{r}"));
            common::branch(&m, &format!("s{r}"), &format!("b{r}"));
            let dir = common::branch_dir(&m, &format!("b{r}"));
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (dir, seed) = (dir.clone(), 0x9e37_79b9 * (r as u64 * WRITERS + w + 1));
                    s.spawn(move || race_branch(&dir, seed, &format!("r{r}w{w}"), OPS))
                })
                .collect();
            for w in writers {
                let (t, v) = w.join().unwrap();
                for (k, n) in t {
                    *tally.entry(k).or_insert(0) += n;
                }
                violations.extend(v);
            }
        }
        stop.store(true, Ordering::Relaxed);
        host.join().unwrap()
    });
    eprintln!("{swaps} host swaps; results in the branches: {tally:?}");
    // The host's last swaps happened behind the mount: the kernel keeps
    // the branches' listings and names until the source watch drops them,
    // within its batch (20 ms) and again at its repeat (200 ms) (specs/
    // semantics.md section 1). Until then a name listed there may be gone.
    std::thread::sleep(Duration::from_millis(500));

    // The worker still serves, main and the branches.
    assert!(common::is_agentfs_mounted(m.path()), "the mount is gone");
    nix::sys::statfs::statfs(m.path()).expect("the worker answers statfs");
    fs::metadata(m.path()).expect("stat of the mount root");
    let last = common::branch_dir(&m, "b0").join("after-the-race");
    fs::write(&last, "still serving\n").expect("a write in a branch after the race");
    assert_eq!(fs::read_to_string(&last).unwrap(), "still serving\n");
    assert!(!m.path().join("after-the-race").exists());

    // Nothing outside was opened, read, written, created or removed.
    let mut events = Vec::new();
    loop {
        match inotify.read_events() {
            Ok(batch) => events.extend(batch),
            Err(Errno::EAGAIN) => break,
            Err(e) => panic!("reading inotify events: {e}"),
        }
    }
    // outside/hl is also a file of the source (hard links in it): the
    // worker may open and read it through the source's names, and the
    // kernel may report that on this name.
    let reads = AddWatchFlags::IN_OPEN | AddWatchFlags::IN_ACCESS | AddWatchFlags::IN_CLOSE_NOWRITE;
    events.retain(|e| !(e.name.as_deref() == Some("hl".as_ref()) && reads.contains(e.mask)));
    assert!(events.is_empty(), "events outside: {events:?}");
    assert_eq!(common::names(&out), ["f", "hl"], "new files outside");
    assert_eq!(common::tree(&out), outside_before, "outside changed");
    assert_eq!(
        fs::metadata(&out).unwrap().modified().unwrap(),
        outside_mtime
    );
    assert_eq!(
        common::names(&parent),
        parent_before,
        "new files next to the source"
    );

    // No branch file shows outside/f: every regular file is main's content
    // (or outside/hl's, a file of the source too) plus the branch's writes.
    for r in 0..ROUNDS {
        for (name, data) in contents(&common::branch_dir(&m, &format!("b{r}"))) {
            assert!(!data.contains("outside"), "b{r}/{name} holds {data:?}");
        }
    }
    assert!(
        violations.is_empty(),
        "read outside/f in a branch: {violations:?}"
    );

    // Main, through the mount and on the host, shows nothing of the
    // branches: no branch-only name, no branch write.
    for (what, root) in [("main", m.path()), ("the source", m.source())] {
        for (name, data) in contents(root) {
            assert!(
                !name.contains("bonly") && !name.contains("after-the-race"),
                "{what} shows {name}"
            );
            assert!(
                !data.contains("BRANCH"),
                "{what}'s {name} holds a branch's write"
            );
            assert!(!data.contains("outside"), "{what}'s {name} holds outside/f");
        }
    }
}
