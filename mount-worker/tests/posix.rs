//! One test per operation on the main view of a real mount: the result, the
//! host file behind it, and the errno of each failure. Most run on a mount
//! served as under the supervisor (`Mount::sandboxed`), so every errno is
//! also the one a confined worker gives, not an EPERM of its seccomp filter.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::{Mount, names, soon};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// errno of an io::Error.
fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().expect("an OS error")
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

#[test]
fn read_write_and_source_in_place() {
    let m = Mount::builder()
        .populate(|s| fs::write(s.join("pre.txt"), b"before mount").unwrap())
        .start();
    let p = m.path();
    assert_eq!(fs::read(p.join("pre.txt")).unwrap(), b"before mount");
    fs::write(p.join("new.txt"), b"written through the mount").unwrap();
    assert_eq!(
        fs::read(m.source().join("new.txt")).unwrap(),
        b"written through the mount"
    );
    // Overwrite in the middle, extend, read back at offsets.
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.join("new.txt"))
        .unwrap();
    f.seek(SeekFrom::Start(8)).unwrap();
    f.write_all(b"THROUGH").unwrap();
    f.seek(SeekFrom::Start(100)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let data = fs::read(p.join("new.txt")).unwrap();
    assert_eq!(data.len(), 103);
    assert_eq!(&data[..15], b"written THROUGH");
    assert!(data[25..100].iter().all(|&b| b == 0), "hole reads as zeros");
    // Large write crosses many FUSE requests.
    let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(p.join("big"), &big).unwrap();
    assert_eq!(fs::read(p.join("big")).unwrap(), big);
    assert_eq!(fs::read(m.source().join("big")).unwrap(), big);
}

/// File pages stay cached across opens (FOPEN_KEEP_CACHE), but a change
/// made to the source behind the mount, even of the same size, shows once
/// the attributes expire (here 1 s, without the source watch):
/// FUSE_AUTO_INVAL_DATA drops the stale pages.
#[test]
fn cached_pages_give_way_to_a_change_behind_the_mount() {
    let m = Mount::builder()
        .populate(|s| fs::write(s.join("f"), vec![b'a'; 64 * 1024]).unwrap())
        .arg("--no-source-watch")
        .arg("--cache-timeout-ms")
        .arg("1000")
        .start();
    let f = m.path().join("f");
    assert_eq!(fs::read(&f).unwrap(), vec![b'a'; 64 * 1024]);
    let kept = fs::File::open(&f).unwrap();
    // Behind the mount: same size, another mtime.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(m.source().join("f"), vec![b'b'; 64 * 1024]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(fs::read(&f).unwrap(), vec![b'b'; 64 * 1024]);
    let mut again = Vec::new();
    std::io::Read::read_to_end(&mut &kept, &mut again).unwrap();
    assert_eq!(
        again,
        vec![b'b'; 64 * 1024],
        "also through a descriptor opened before"
    );
    // And through the mount, at once.
    fs::write(&f, b"through").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"through");
}

/// `--cache-timeout-ms` (config `fuse.cache_timeout_ms`) is how long
/// names and attributes below the root stay cached: without the source
/// watch, with 0 a change made behind the mount shows at once; with a long
/// one the old attributes are served until it runs out (the root's names
/// are never cached).
#[test]
fn the_cache_timeout_bounds_how_long_a_change_behind_the_mount_goes_unseen() {
    for (ms, shows_at_once) in [("0", true), ("600000", false)] {
        let m = Mount::builder()
            .populate(|s| {
                fs::create_dir(s.join("d")).unwrap();
                fs::write(s.join("d/f"), b"short").unwrap();
            })
            .arg("--no-source-watch")
            .arg("--cache-timeout-ms")
            .arg(ms)
            .start();
        let f = m.path().join("d/f");
        assert_eq!(fs::metadata(&f).unwrap().len(), 5);
        fs::write(m.source().join("d/f"), b"longer now").unwrap();
        let len = fs::metadata(&f).unwrap().len();
        assert_eq!(
            len == 10,
            shows_at_once,
            "cache timeout {ms} ms: size {len}"
        );
        // Through the mount, a change shows at once whatever the timeout.
        fs::write(&f, b"through the mount").unwrap();
        assert_eq!(fs::metadata(&f).unwrap().len(), 17, "{ms} ms");

        // With the source in reach, an absent name is not remembered: a
        // name made there is found as soon as a listing shows it.
        let later = m.path().join("d/later");
        assert!(!later.exists());
        fs::write(m.source().join("d/later"), b"").unwrap();
        assert!(later.exists(), "cache timeout {ms} ms");
    }
}

/// A mount over its source (with directory `d`) started with `args`, the
/// one way to the source under it (a descriptor opened before it), and
/// the path `d/later` through that descriptor.
fn over_source_with_a_way_under(args: &[&str]) -> (Mount, File, PathBuf) {
    let under = Arc::new(Mutex::new(None));
    let keep = under.clone();
    let mut b = Mount::builder().over_source().populate(move |s| {
        fs::create_dir(s.join("d")).unwrap();
        *keep.lock().unwrap() = Some(File::open(s).unwrap());
    });
    for a in args {
        b = b.arg(a);
    }
    let m = b.start();
    let under = under.lock().unwrap().take().unwrap();
    let behind = PathBuf::from(format!("/proc/self/fd/{}/d/later", under.as_raw_fd()));
    (m, under, behind)
}

#[test]
fn over_its_source_the_mount_remembers_absent_names_for_the_cache_timeout() {
    for (ms, shows_at_once) in [("0", true), ("600000", false)] {
        let (m, _under, behind) =
            over_source_with_a_way_under(&["--no-source-watch", "--cache-timeout-ms", ms]);
        let later = m.path().join("d/later");
        assert!(!later.exists());
        fs::write(&behind, b"").unwrap();
        assert_eq!(later.exists(), shows_at_once, "cache timeout {ms} ms");

        // A name made through the mount shows at once whatever the timeout.
        let made = m.path().join("d/made");
        assert!(!made.exists());
        fs::write(&made, b"").unwrap();
        assert!(made.exists(), "{ms} ms");
        fs::remove_file(&made).unwrap();
        assert!(!made.exists(), "{ms} ms");
        fs::create_dir(&made).unwrap();
        assert!(made.is_dir(), "{ms} ms");
        // Also in a branch, and in its root by path.
        common::snapshot(&m, None, "s");
        common::branch(&m, "s", "b");
        let b = common::branch_dir(&m, "b");
        for name in ["d/new", "new"] {
            assert!(!b.join(name).exists());
            fs::write(b.join(name), b"").unwrap();
            assert!(b.join(name).exists(), "{name}, {ms} ms");
        }
    }
}

/// The source watch (the default): a change made to the source behind the
/// mount's back shows through it at once, whatever the cache timeout,
/// even one the timeout could never show (same size and mtime), and
/// through descriptors opened before. The same changes go unseen for the
/// timeout without the watch (the two tests above).
#[test]
fn the_source_watch_shows_changes_behind_the_mount_at_once() {
    let m = Mount::builder()
        .supervised()
        .populate(|s| {
            fs::create_dir(s.join("d")).unwrap();
            fs::write(s.join("d/f"), b"short").unwrap();
            fs::write(s.join("d/data"), vec![b'a'; 64 * 1024]).unwrap();
            fs::write(s.join("top"), b"top").unwrap();
        })
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    let (p, s) = (m.path(), m.source());
    // Attributes, of a file in a directory and of one in the root.
    assert_eq!(fs::metadata(p.join("d/f")).unwrap().len(), 5);
    assert_eq!(fs::metadata(p.join("top")).unwrap().len(), 3);
    fs::write(s.join("d/f"), b"longer now").unwrap();
    fs::write(s.join("top"), b"top and more").unwrap();
    assert!(soon(|| fs::metadata(p.join("d/f")).unwrap().len() == 10));
    assert!(soon(|| fs::metadata(p.join("top")).unwrap().len() == 12));
    fs::set_permissions(s.join("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert!(soon(
        || fs::metadata(p.join("d/f")).unwrap().mode() & 0o777 == 0o600
    ));

    // Data: same size and the old mtime put back, which no attribute
    // shows; through a descriptor opened before too.
    let data = p.join("d/data");
    assert_eq!(fs::read(&data).unwrap(), vec![b'a'; 64 * 1024]);
    let kept = File::open(&data).unwrap();
    let mtime = fs::metadata(s.join("d/data")).unwrap().modified().unwrap();
    let behind = OpenOptions::new()
        .write(true)
        .open(s.join("d/data"))
        .unwrap();
    behind.write_all_at(&vec![b'b'; 64 * 1024], 0).unwrap();
    behind
        .set_times(fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    drop(behind);
    assert_eq!(fs::metadata(&data).unwrap().len(), 64 * 1024);
    assert!(soon(|| fs::read(&data).unwrap() == vec![b'b'; 64 * 1024]));
    let mut again = Vec::new();
    (&kept).read_to_end(&mut again).unwrap();
    assert_eq!(
        again,
        vec![b'b'; 64 * 1024],
        "through a descriptor opened before"
    );

    // Names: made, removed, renamed, and a directory's own attributes.
    assert!(!p.join("d/new").exists());
    fs::write(s.join("d/new"), b"").unwrap();
    assert!(soon(|| p.join("d/new").exists()));
    fs::remove_file(s.join("d/new")).unwrap();
    assert!(soon(|| !p.join("d/new").exists()));
    fs::rename(s.join("d/f"), s.join("d/g")).unwrap();
    assert!(soon(|| !p.join("d/f").exists() && p.join("d/g").exists()));
    fs::create_dir(s.join("d/sub")).unwrap();
    assert!(soon(|| p.join("d/sub").is_dir()));
    fs::set_permissions(s.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    assert!(soon(
        || fs::metadata(p.join("d")).unwrap().mode() & 0o777 == 0o700
    ));
    // The source directory's own attributes (cached while nothing is
    // bound): an event on a marked directory whose parent is not marked.
    fs::set_permissions(s, fs::Permissions::from_mode(0o750)).unwrap();
    assert!(soon(|| fs::metadata(p).unwrap().mode() & 0o777 == 0o750));
    fs::set_permissions(s, fs::Permissions::from_mode(0o777)).unwrap();
    // Changes through the mount are the kernel's own: at once.
    fs::write(p.join("d/g"), b"through").unwrap();
    assert_eq!(fs::read(p.join("d/g")).unwrap(), b"through");
    assert_eq!(fs::read(s.join("d/g")).unwrap(), b"through");
}

/// Snapshots and branches share main's files until main changes them
/// through the mount, so a change made behind the mount shows in them too
/// (it is not preserved): at once, as in main, also in directories the
/// kernel knows only through a snapshot or a branch.
#[test]
fn the_source_watch_shows_changes_behind_the_mount_in_snapshots_and_branches() {
    let m = Mount::builder()
        .populate(|s| {
            fs::create_dir(s.join("d")).unwrap();
            fs::write(s.join("d/f"), b"short").unwrap();
            fs::write(s.join("d/gone"), b"x").unwrap();
        })
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let (p, s) = (m.path(), m.source());
    let views = [
        p.join(".agentfs/snapshots/s/d"),
        p.join(".agentfs/branches/b/d"),
    ];
    // Only through the views: main's `d` stays unknown to the kernel.
    // Names, an absence and the listing, all kept by the kernel.
    for v in &views {
        assert_eq!(fs::read(v.join("f")).unwrap(), b"short");
        assert!(v.join("gone").exists());
        assert!(!v.join("new").exists());
        assert_eq!(names(v), ["f", "gone"]);
        assert_eq!(names(v), ["f", "gone"]);
    }
    fs::write(s.join("d/f"), b"longer now").unwrap();
    fs::remove_file(s.join("d/gone")).unwrap();
    fs::write(s.join("d/new"), b"").unwrap();
    for v in &views {
        let f = v.join("f");
        assert!(
            soon(|| fs::metadata(&f).unwrap().len() == 10),
            "{}: size",
            f.display()
        );
        assert_eq!(fs::read(&f).unwrap(), b"longer now", "{}", f.display());
        assert!(soon(|| !v.join("gone").exists()), "{}", v.display());
        assert!(soon(|| v.join("new").exists()), "{}", v.display());
        assert!(soon(|| names(v) == ["f", "new"]), "{:?}", names(v));
    }
    // A branch's own copy is its own: a change behind the mount leaves it.
    fs::write(views[1].join("f"), b"the branch's").unwrap();
    fs::write(s.join("d/f"), b"main again").unwrap();
    assert!(soon(
        || fs::read(views[0].join("f")).unwrap() == b"main again"
    ));
    assert_eq!(fs::read(views[1].join("f")).unwrap(), b"the branch's");
}

/// Over its source the mount remembers absent names; with the watch a name
/// made behind it (through a descriptor opened before the mount) shows at
/// once all the same.
#[test]
fn the_source_watch_forgets_an_absent_name_made_behind_the_mount() {
    let (m, _under, behind) = over_source_with_a_way_under(&["--cache-timeout-ms", "600000"]);
    let later = m.path().join("d/later");
    assert!(!later.exists());
    fs::write(&behind, b"").unwrap();
    assert!(soon(|| later.exists()));
}

/// With the source watch, the kernel keeps what it learnt of main's
/// directories for the cache timeout, mountpoint elsewhere or not: that a
/// name is absent, and a directory's listing (FOPEN_CACHE_DIR). Shown in
/// a directory the watch cannot see into (a tmpfs mounted inside the
/// source), where a change behind the mount goes unseen for the timeout;
/// what the watch sees shows at once (the tests above), and so does every
/// change through the mount.
#[test]
fn with_the_watch_absent_names_and_listings_are_kept() {
    let m = Mount::builder()
        .populate(|s| fs::create_dir(s.join("d")).unwrap())
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    let inner = common::Tmpfs::mount(&m.source().join("d"));
    let d = m.path().join("d");
    fs::write(inner.path().join("first"), b"").unwrap();
    // The kernel checks a kept listing against the directory's attributes
    // the first time it uses it, which it fetches after a listing is read.
    assert_eq!(names(&d), ["first"]);
    assert_eq!(names(&d), ["first"]);
    assert!(!d.join("later").exists());
    fs::write(inner.path().join("later"), b"").unwrap();
    assert!(!d.join("later").exists(), "the absence is kept");
    assert_eq!(names(&d), ["first"], "the listing is kept");

    // A change through the mount drops both.
    fs::write(d.join("made"), b"").unwrap();
    assert_eq!(names(&d), ["first", "later", "made"]);
    fs::remove_file(d.join("first")).unwrap();
    assert_eq!(names(&d), ["later", "made"]);
    fs::rename(d.join("made"), d.join("renamed")).unwrap();
    assert_eq!(names(&d), ["later", "renamed"]);
}

/// In a branch too the kernel keeps absent names and listings (the watch
/// drops those main changes behind the mount in every view that shares
/// them, see above). Shown with names put straight into the branch's top
/// layer in the state directory, which nothing reports; users never do.
#[test]
fn in_a_branch_absent_names_and_listings_are_kept_too() {
    let m = Mount::builder()
        .populate(|s| fs::create_dir_all(s.join("d/e")).unwrap())
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    // Below the branch's root, whose names are looked up at every walk
    // (which brings the attributes of `d` again).
    let e = common::branch_dir(&m, "b").join("d/e");
    fs::write(e.join("first"), b"").unwrap();
    // The branch's copy of `e`, in its top layer.
    let top = fs::read_dir(m.state_dir().join("layers"))
        .unwrap()
        .map(|l| l.unwrap().path().join("tree/d/e"))
        .find(|e| e.join("first").exists())
        .expect("the branch's top layer holds d/e/first");
    assert_eq!(names(&e), ["first"]);
    assert_eq!(names(&e), ["first"]);
    assert!(!e.join("later").exists());
    fs::write(top.join("later"), b"").unwrap();
    assert!(!e.join("later").exists(), "the absence is kept");
    assert_eq!(names(&e), ["first"], "the listing is kept");

    // A change through the mount drops both.
    fs::write(e.join("made"), b"").unwrap();
    assert_eq!(names(&e), ["first", "later", "made"]);
}

/// A node of main's file keeps its handle, not the inode: once the file
/// is removed behind the mount, the host may give its inode number to a
/// new file while the kernel still holds the old node. The new file gets
/// a node (and a number) of its own, and the old one answers ESTALE.
#[test]
fn a_reused_inode_number_is_another_file_to_the_mount() {
    use std::os::fd::FromRawFd;
    // Attributes never cached: the old node's are asked for at the end.
    let m = Mount::builder().arg("--cache-timeout-ms").arg("0").start();
    let (p, s) = (m.path(), m.source());
    // Tests running beside this one may take the freed number first (the
    // source is on a file system they share): then again.
    let (ino, held, reused) = (0..5)
        .find_map(|k| {
            let old = format!("old{k}");
            fs::write(s.join(&old), b"old").unwrap();
            let ino = fs::metadata(s.join(&old)).unwrap().ino();
            // The kernel's node, held without opening the file (no
            // descriptor of the worker's keeps the host inode).
            let path = CString::new(p.join(&old).as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid path; the descriptor is owned below.
            let held = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            assert!(held >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: fresh descriptor.
            let held = unsafe { std::os::fd::OwnedFd::from_raw_fd(held) };
            fs::remove_file(s.join(&old)).unwrap();
            let reused = (0..200)
                .map(|i| {
                    let f = s.join(format!("new{k}-{i}"));
                    fs::write(&f, format!("new {k}-{i}")).unwrap();
                    f
                })
                .find(|f| fs::metadata(f).unwrap().ino() == ino)?;
            Some((ino, held, reused))
        })
        .expect("the host reuses the inode number in one of 5 tries of 200 files");
    let through = p.join(reused.file_name().unwrap());
    assert_eq!(
        fs::read_to_string(&through).unwrap(),
        fs::read_to_string(&reused).unwrap()
    );
    // Not `ino` (the kernel knows that number for the old node), and so
    // no other file's.
    let new_ino = fs::metadata(&through).unwrap().ino();
    let others: Vec<u64> = fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| *f != through)
        .map(|f| fs::metadata(f).unwrap().ino())
        .collect();
    assert!(!others.contains(&new_ino) && new_ino != ino, "{new_ino}");
    let old = File::from(held).metadata().map_err(|e| e.raw_os_error());
    assert_eq!(old.err(), Some(Some(libc::ESTALE)), "the old node");
}

/// A file removed, or renamed over, behind the mount changes too (its
/// link count), which fsnotify tells only marks on the file itself: the
/// watch finds the file's node by the name the kernel knew it by and has
/// the kernel drop its cached attributes at once, not after the cache
/// timeout. An open file then shows no links; a node merely held (O_PATH)
/// pins no inode and answers ESTALE.
#[test]
fn the_source_watch_shows_a_file_removed_behind_the_mount_to_its_holders() {
    use std::os::fd::FromRawFd;
    let m = Mount::builder()
        .populate(|s| {
            fs::write(s.join("open"), b"open").unwrap();
            fs::write(s.join("held"), b"held").unwrap();
            fs::write(s.join("replaced"), b"old").unwrap();
        })
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    let (p, s) = (m.path(), m.source());
    let open = File::open(p.join("open")).unwrap();
    let replaced = File::open(p.join("replaced")).unwrap();
    let path = CString::new(p.join("held").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid path; the descriptor is owned below.
    let held = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(held >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor.
    let held = File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(held) });
    assert_eq!(open.metadata().unwrap().nlink(), 1);
    assert_eq!(held.metadata().unwrap().nlink(), 1);
    fs::remove_file(s.join("open")).unwrap();
    fs::remove_file(s.join("held")).unwrap();
    // As editors save: a new file renamed over the old one.
    fs::write(s.join("replaced.tmp"), b"new").unwrap();
    fs::rename(s.join("replaced.tmp"), s.join("replaced")).unwrap();
    assert!(
        soon(|| open.metadata().unwrap().nlink() == 0),
        "the open file still has a link"
    );
    assert!(
        soon(|| replaced.metadata().unwrap().nlink() == 0),
        "the file renamed over still has a link"
    );
    assert_eq!(fs::read(p.join("replaced")).unwrap(), b"new");
    let mut data = String::new();
    (&open).read_to_string(&mut data).unwrap();
    assert_eq!(data, "open");
    assert!(
        soon(|| held.metadata().map_err(|e| e.raw_os_error()).err() == Some(Some(libc::ESTALE))),
        "{:?}",
        held.metadata().map(|m| m.nlink())
    );
    assert!(!p.join("open").exists() && !p.join("held").exists());
}

/// A directory a branch copied up merges main's directory of that name,
/// also one main made anew behind the mount (the kernel still holds the
/// branch's node, whose id the copy keeps): the watch shows the branch
/// what changes in the new one, as it did for the old. Once main's is
/// gone, the branch's copy stays alone.
#[test]
fn a_branch_follows_a_directory_main_replaced_behind_the_mount() {
    let m = Mount::builder()
        .populate(|s| {
            fs::create_dir_all(s.join("d/e")).unwrap();
            fs::write(s.join("d/e/old"), b"").unwrap();
        })
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let e = common::branch_dir(&m, "b").join("d/e");
    fs::write(e.join("mine"), b"").unwrap();
    assert_eq!(names(&e), ["mine", "old"]);
    assert_eq!(names(&e), ["mine", "old"]);
    let behind = m.source().join("d/e");
    fs::remove_dir_all(&behind).unwrap();
    fs::create_dir(&behind).unwrap();
    fs::write(behind.join("new"), b"").unwrap();
    assert!(soon(|| names(&e) == ["mine", "new"]), "{:?}", names(&e));
    // Past the watch's second round of the replacement's invalidations
    // (200 ms), kept again; then changed in the new directory only.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(names(&e), ["mine", "new"]);
    fs::write(behind.join("newer"), b"").unwrap();
    assert!(
        soon(|| names(&e) == ["mine", "new", "newer"]),
        "{:?}",
        names(&e)
    );
    assert!(soon(|| e.join("newer").exists()));
    // Gone from main: the branch's copy stays, alone.
    fs::remove_dir_all(&behind).unwrap();
    assert!(soon(|| names(&e) == ["mine"]), "{:?}", names(&e));
}

/// Listings the kernel keeps follow every change, in main (through the
/// mount and behind it) and in a branch (by path and by its root); a
/// snapshot's stays as it was.
#[test]
fn kept_listings_follow_every_change() {
    let m = Mount::builder()
        .populate(|s| {
            fs::create_dir_all(s.join("d/e")).unwrap();
            fs::write(s.join("d/a"), b"").unwrap();
        })
        .arg("--cache-timeout-ms")
        .arg("600000")
        .start();
    let d = m.path().join("d");
    assert_eq!(names(&d), ["a", "e"]);
    fs::write(m.source().join("d/behind"), b"").unwrap();
    assert!(
        soon(|| names(&d) == ["a", "behind", "e"]),
        "{:?}",
        names(&d)
    );
    fs::remove_file(m.source().join("d/behind")).unwrap();
    assert!(soon(|| names(&d) == ["a", "e"]), "{:?}", names(&d));

    common::snapshot(&m, None, "s");
    common::branch(&m, "s", "b");
    let snap = m.path().join(".agentfs/snapshots/s/d");
    let b = common::branch_dir(&m, "b");
    for dir in [&snap, &b.join("d"), &b.join("d/e")] {
        names(dir);
    }
    fs::write(d.join("new-in-main"), b"").unwrap();
    fs::write(b.join("d/new-in-b"), b"").unwrap();
    fs::rename(b.join("d/a"), b.join("d/e/a")).unwrap();
    assert_eq!(names(&d), ["a", "e", "new-in-main"]);
    assert_eq!(names(&snap), ["a", "e"]);
    assert_eq!(names(&b.join("d")), ["e", "new-in-b"]);
    assert_eq!(names(&b.join("d/e")), ["a"]);
    // A process bound to the branch changes the same directories through
    // the mount root.
    let mnt = m.path().display();
    let mut bound = common::held_command("sh")
        .arg("-c")
        .arg(format!(
            "touch {mnt}/d/bound && mv {mnt}/d/new-in-b {mnt}/d/e/"
        ))
        .spawn()
        .unwrap();
    common::bind_pid(&m, "b", bound.id());
    common::release(&mut bound);
    assert!(bound.wait().unwrap().success());
    assert_eq!(names(&b.join("d")), ["bound", "e"]);
    assert_eq!(names(&b.join("d/e")), ["a", "new-in-b"]);
    assert_eq!(names(&d), ["a", "e", "new-in-main"]);
    fs::remove_dir_all(b.join("d/e")).unwrap();
    assert_eq!(names(&b.join("d")), ["bound"]);
    assert_eq!(names(&snap), ["a", "e"]);
}

#[test]
fn append_and_truncate() {
    let m = Mount::sandboxed();
    let p = m.path().join("f");
    fs::write(&p, b"abc").unwrap();
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"def").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"abcdef");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(2).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"ab");
    f.set_len(10).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 10);
    // O_TRUNC on open.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
}

#[test]
fn create_exclusive_and_errors() {
    let m = Mount::sandboxed();
    let p = m.path().join("x");
    File::create(&p).unwrap();
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(errno(e), libc::EEXIST);
    let e = File::open(m.path().join("missing")).unwrap_err();
    assert_eq!(errno(e), libc::ENOENT);
    let e = File::create(m.path().join("x/under-a-file")).unwrap_err();
    assert_eq!(errno(e), libc::ENOTDIR);
    let long = "n".repeat(256);
    let e = File::create(m.path().join(long)).unwrap_err();
    assert_eq!(errno(e), libc::ENAMETOOLONG);
}

#[test]
fn directories_and_readdir_types() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::create_dir(p.join("d")).unwrap();
    fs::write(p.join("d/f"), b"").unwrap();
    std::os::unix::fs::symlink("f", p.join("d/l")).unwrap();
    fs::create_dir(p.join("d/sub")).unwrap();
    nix::unistd::mkfifo(
        &p.join("d/fifo"),
        nix::sys::stat::Mode::from_bits(0o644).unwrap(),
    )
    .unwrap();

    let mut seen: Vec<(String, &str)> = fs::read_dir(p.join("d"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let kind = if t.is_dir() {
                "dir"
            } else if t.is_symlink() {
                "symlink"
            } else if t.is_fifo() {
                "fifo"
            } else {
                "file"
            };
            (e.file_name().to_string_lossy().into_owned(), kind)
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("f".into(), "file"),
            ("fifo".into(), "fifo"),
            ("l".into(), "symlink"),
            ("sub".into(), "dir")
        ]
    );
    // "." and ".." are listed too (read_dir hides them; use readdir(3)).
    let dir = nix::dir::Dir::open(
        &p.join("d"),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let mut names: Vec<String> = dir
        .into_iter()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".", "..", "f", "fifo", "l", "sub"]);

    assert_eq!(
        errno(fs::remove_dir(p.join("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(fs::create_dir(p.join("d")).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(
        errno(fs::remove_dir(p.join("d/f")).unwrap_err()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs::remove_file(p.join("d/sub")).unwrap_err()),
        libc::EISDIR
    );
    fs::remove_dir(p.join("d/sub")).unwrap();
    assert!(!m.source().join("d/sub").exists());
}

#[test]
fn large_directory_listing_is_complete() {
    let m = Mount::sandboxed();
    let d = m.path().join("many");
    fs::create_dir(&d).unwrap();
    for i in 0..3000 {
        File::create(d.join(format!("entry-with-a-longish-name-{i:05}"))).unwrap();
    }
    let mut n: Vec<_> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    n.sort();
    n.dedup();
    assert_eq!(n.len(), 3000);
}

#[test]
fn symlinks() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::write(p.join("target"), b"t").unwrap();
    std::os::unix::fs::symlink("target", p.join("l")).unwrap();
    assert_eq!(fs::read_link(p.join("l")).unwrap(), Path::new("target"));
    assert_eq!(fs::read(p.join("l")).unwrap(), b"t");
    assert!(
        fs::symlink_metadata(p.join("l"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Dangling and absolute targets are stored verbatim, never resolved by the worker.
    std::os::unix::fs::symlink("/etc/passwd-nonexistent", p.join("abs")).unwrap();
    assert_eq!(
        fs::read_link(m.source().join("abs")).unwrap(),
        Path::new("/etc/passwd-nonexistent")
    );
    // O_NOFOLLOW on a regular file opens it (SQLite opens databases so).
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p.join("target"));
    assert!(f.is_ok(), "O_NOFOLLOW on a regular file: {f:?}");
    // O_NOFOLLOW on a symlink: ELOOP.
    let e = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p.join("l"))
        .unwrap_err();
    assert_eq!(errno(e), libc::ELOOP);
    // Symlink loop.
    std::os::unix::fs::symlink("loop2", p.join("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", p.join("loop2")).unwrap();
    assert_eq!(errno(File::open(p.join("loop1")).unwrap_err()), libc::ELOOP);
}

#[test]
fn hard_links_share_inode_and_count() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::write(p.join("a"), b"x").unwrap();
    fs::hard_link(p.join("a"), p.join("b")).unwrap();
    let (a, b) = (
        fs::metadata(p.join("a")).unwrap(),
        fs::metadata(p.join("b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    // st_ino is the host's inode number: stable across remounts.
    assert_eq!(a.ino(), fs::metadata(m.source().join("a")).unwrap().ino());
    fs::write(p.join("b"), b"changed").unwrap();
    assert_eq!(fs::read(p.join("a")).unwrap(), b"changed");
    fs::remove_file(p.join("a")).unwrap();
    assert_eq!(fs::metadata(p.join("b")).unwrap().nlink(), 1);
    assert_eq!(
        errno(fs::hard_link(p.join("b"), p.join("b")).unwrap_err()),
        libc::EEXIST
    );
    fs::create_dir(p.join("dir")).unwrap();
    assert_eq!(
        errno(fs::hard_link(p.join("dir"), p.join("dir2")).unwrap_err()),
        libc::EPERM
    );
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> Result<(), i32> {
    let (f, t) = (c(from), c(to));
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r == 0 { Ok(()) } else { Err(last_errno()) }
}

#[test]
fn rename_plain_noreplace_exchange() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::write(p.join("a"), b"A").unwrap();
    fs::write(p.join("b"), b"B").unwrap();
    fs::create_dir(p.join("d")).unwrap();
    // Plain rename replaces, also across directories.
    fs::rename(p.join("a"), p.join("d/a2")).unwrap();
    assert_eq!(fs::read(m.source().join("d/a2")).unwrap(), b"A");
    fs::rename(p.join("d/a2"), p.join("b")).unwrap();
    assert_eq!(fs::read(p.join("b")).unwrap(), b"A");
    fs::write(p.join("c"), b"C").unwrap();
    assert_eq!(
        renameat2(&p.join("c"), &p.join("b"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    renameat2(&p.join("c"), &p.join("fresh"), libc::RENAME_NOREPLACE).unwrap();
    renameat2(&p.join("fresh"), &p.join("b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(p.join("b")).unwrap(), b"C");
    assert_eq!(fs::read(p.join("fresh")).unwrap(), b"A");
    assert_eq!(
        renameat2(&p.join("nope"), &p.join("b"), libc::RENAME_EXCHANGE),
        Err(libc::ENOENT)
    );
    // A directory onto a non-empty directory; a directory into itself.
    fs::create_dir(p.join("e")).unwrap();
    fs::write(p.join("e/x"), b"").unwrap();
    assert_eq!(
        errno(fs::rename(p.join("d"), p.join("e")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(fs::rename(p.join("d"), p.join("d/inside")).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs::rename(p.join("d"), p.join("b")).unwrap_err()),
        libc::ENOTDIR
    );
}

#[test]
fn open_file_survives_rename_and_unlink() {
    let m = Mount::sandboxed();
    let p = m.path();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p.join("f"))
        .unwrap();
    f.write_all(b"data").unwrap();
    fs::rename(p.join("f"), p.join("g")).unwrap();
    fs::remove_file(p.join("g")).unwrap();
    f.write_all(b"+more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "data+more");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
}

#[test]
fn chmod_chown_and_times_with_nanoseconds() {
    let m = Mount::sandboxed();
    let p = m.path().join("f");
    fs::write(&p, b"").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4751)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4751);
    assert_eq!(
        fs::metadata(m.source().join("f")).unwrap().mode() & 0o7777,
        0o4751
    );
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    let cp = c(&p);
    // SAFETY: valid path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), times.as_ptr(), 0) },
        0
    );
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    // Before the epoch.
    let old = [
        libc::timespec {
            tv_sec: -100,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, cp.as_ptr(), old.as_ptr(), 0) },
        0
    );
    for md in [
        fs::metadata(m.source().join("f")).unwrap(),
        fs::metadata(&p).unwrap(),
    ] {
        assert_eq!((md.atime(), md.atime_nsec()), (-100, 5));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
    }
}

#[test]
fn permissions_follow_the_host_rules() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::create_dir(p.join("open")).unwrap();
    fs::set_permissions(p.join("open"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(p.join("closed")).unwrap();
    fs::set_permissions(p.join("closed"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(p.join("secret"), b"s").unwrap();
    fs::write(p.join("closed/f"), b"f").unwrap();
    fs::set_permissions(p.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();

    // A file created by an unprivileged user is theirs, on the host too.
    let out = common::run_as(
        65534,
        65534,
        p,
        "umask 022; echo hi > open/mine && cat open/mine",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = fs::metadata(m.source().join("open/mine")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o777),
        (65534, 65534, 0o644)
    );
    let out = common::run_as(
        65534,
        65534,
        p,
        "mkdir open/d && ln -s x open/s && mkfifo open/p",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for n in ["open/d", "open/s", "open/p"] {
        let md = fs::symlink_metadata(m.source().join(n)).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534), "{n}");
    }
    // ... and what they may not do fails with EACCES/EPERM.
    for (cmd, what) in [
        ("touch closed/x", "create in a 0755 root directory"),
        ("cat secret", "read a 0600 root file"),
        ("chmod 777 secret", "chmod a file of another user"),
        ("rm -f closed/f", "unlink in a 0755 root directory"),
    ] {
        let out = common::run_as(65534, 65534, p, cmd);
        assert!(!out.status.success(), "nobody could {what}");
    }
    // Set-group-id directories pass their group on.
    fs::create_dir(p.join("sgid")).unwrap();
    std::os::unix::fs::chown(p.join("sgid"), None, Some(4242)).unwrap();
    fs::set_permissions(p.join("sgid"), fs::Permissions::from_mode(0o2777)).unwrap();
    let out = common::run_as(65534, 65534, p, "touch sgid/f && mkdir sgid/d");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(m.source().join("sgid/f")).unwrap().gid(), 4242);
    let d = fs::metadata(m.source().join("sgid/d")).unwrap();
    assert_eq!(d.gid(), 4242);
    assert_ne!(
        d.mode() & libc::S_ISGID,
        0,
        "subdirectory inherits set-group-id"
    );
}

#[test]
fn xattrs() {
    let m = Mount::sandboxed();
    let p = m.path().join("f");
    fs::write(&p, b"").unwrap();
    let (cp, name) = (c(&p), CString::new("user.agentfs.test").unwrap());
    let val = b"value-\x00-binary";
    // SAFETY: valid strings and buffers throughout.
    unsafe {
        assert_eq!(
            libc::setxattr(
                cp.as_ptr(),
                name.as_ptr(),
                val.as_ptr().cast(),
                val.len(),
                libc::XATTR_CREATE
            ),
            0
        );
        assert_eq!(
            libc::setxattr(
                cp.as_ptr(),
                name.as_ptr(),
                val.as_ptr().cast(),
                val.len(),
                libc::XATTR_CREATE
            ),
            -1
        );
        assert_eq!(last_errno(), libc::EEXIST);
        assert_eq!(
            libc::getxattr(cp.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0),
            val.len() as isize
        );
        let mut buf = [0u8; 64];
        let n = libc::getxattr(
            cp.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        );
        assert_eq!(&buf[..n as usize], val);
        assert_eq!(
            libc::getxattr(cp.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 2),
            -1
        );
        assert_eq!(last_errno(), libc::ERANGE);
        let n = libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        assert!(
            buf[..n as usize]
                .split(|&b| b == 0)
                .any(|s| s == b"user.agentfs.test")
        );
        assert_eq!(libc::removexattr(cp.as_ptr(), name.as_ptr()), 0);
        assert_eq!(
            libc::getxattr(
                cp.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len()
            ),
            -1
        );
        assert_eq!(last_errno(), libc::ENODATA);
        assert_eq!(libc::removexattr(cp.as_ptr(), name.as_ptr()), -1);
        assert_eq!(last_errno(), libc::ENODATA);
        let xr = CString::new("user.x").unwrap();
        assert_eq!(
            libc::setxattr(
                cp.as_ptr(),
                xr.as_ptr(),
                val.as_ptr().cast(),
                1,
                libc::XATTR_REPLACE
            ),
            -1
        );
        assert_eq!(last_errno(), libc::ENODATA);
    }
}

#[test]
fn mmap_shared_write_reaches_host() {
    let m = Mount::sandboxed();
    let p = m.path().join("mapped");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.set_len(8192).unwrap();
    // SAFETY: mapping a file we own for its length; unmapped below.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts_mut(addr as *mut u8, 8192);
        s[0..5].copy_from_slice(b"hello");
        s[4096..4101].copy_from_slice(b"world");
        assert_eq!(libc::msync(addr, 8192, libc::MS_SYNC), 0);
        assert_eq!(libc::munmap(addr, 8192), 0);
    }
    drop(f);
    let host = fs::read(m.source().join("mapped")).unwrap();
    assert_eq!(&host[0..5], b"hello");
    assert_eq!(&host[4096..4101], b"world");
}

#[test]
fn fallocate_punch_hole_and_seek_data() {
    let m = Mount::sandboxed();
    let p = m.path().join("f");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    // SAFETY: valid fd.
    unsafe {
        assert_eq!(libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20), 0);
    }
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    assert!(fs::metadata(m.source().join("f")).unwrap().blocks() >= 2048);
    (&f).write_all(&vec![7u8; 1 << 20]).unwrap();
    // SAFETY: valid fd.
    unsafe {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(libc::fallocate(f.as_raw_fd(), mode, 0, 512 * 1024), 0);
        assert_eq!(libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA), 512 * 1024);
        assert_eq!(libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE), 0);
    }
    let data = fs::read(&p).unwrap();
    assert!(data[..512 * 1024].iter().all(|&b| b == 0));
    assert!(data[512 * 1024..].iter().all(|&b| b == 7));
}

#[test]
fn copy_file_range_between_files() {
    let m = Mount::sandboxed();
    let src: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(m.path().join("src"), &src).unwrap();
    let a = File::open(m.path().join("src")).unwrap();
    let b = File::create(m.path().join("dst")).unwrap();
    let (mut off_in, mut off_out) = (1000i64, 0i64);
    let mut left = 200_000usize;
    while left > 0 {
        // SAFETY: valid fds and offsets.
        let n = unsafe {
            libc::copy_file_range(
                a.as_raw_fd(),
                &mut off_in,
                b.as_raw_fd(),
                &mut off_out,
                left,
                0,
            )
        };
        assert!(
            n > 0,
            "copy_file_range: {}",
            std::io::Error::last_os_error()
        );
        left -= n as usize;
    }
    drop(b);
    assert_eq!(
        fs::read(m.source().join("dst")).unwrap(),
        &src[1000..201_000]
    );
}

#[test]
fn fcntl_and_flock_locks_conflict_between_processes() {
    let m = Mount::sandboxed();
    let p = m.path().join("lockfile");
    fs::write(&p, b"").unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: valid fd and struct.
    assert_eq!(
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &lock) },
        0
    );
    let script = format!(
        "flock -n {p} true; echo flock=$?; python3 -c \"import fcntl,os; f=os.open('{p}', os.O_RDWR)\ntry:\n fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB); print('fcntl=0')\nexcept OSError as e: print('fcntl=%d' % e.errno)\"",
        p = p.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("flock=0"),
        "flock is independent of fcntl locks: {s}"
    );
    assert!(
        s.contains(&format!("fcntl={}", libc::EAGAIN))
            || s.contains(&format!("fcntl={}", libc::EACCES)),
        "fcntl lock must conflict: {s}"
    );
    // flock conflicts with flock.
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = std::process::Command::new("flock")
        .args(["-n"])
        .arg(&p)
        .arg("true")
        .status()
        .unwrap();
    assert!(
        !out.success(),
        "second flock must fail while the first is held"
    );
}

#[test]
fn device_nodes_and_sockets() {
    let m = Mount::sandboxed();
    let p = m.path();
    nix::sys::stat::mknod(
        &p.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits(0o666).unwrap(),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let md = fs::metadata(m.source().join("null")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), nix::sys::stat::makedev(1, 3));
    fs::write(p.join("null"), b"discarded").unwrap();
    let l = std::os::unix::net::UnixListener::bind(p.join("sock")).unwrap();
    assert!(
        fs::metadata(p.join("sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
    drop(l);
}

#[test]
fn statfs_reports_the_host() {
    let m = Mount::sandboxed();
    let a = nix::sys::statvfs::statvfs(m.path()).unwrap();
    let b = nix::sys::statvfs::statvfs(m.source()).unwrap();
    assert_eq!(a.blocks(), b.blocks());
    assert_eq!(a.name_max(), 255);
}

#[test]
fn fsync_and_fdatasync_succeed() {
    let m = Mount::sandboxed();
    let mut f = File::create(m.path().join("f")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    File::open(m.path()).unwrap().sync_all().unwrap();
}

#[test]
fn sqlite_basic_transaction() {
    let m = Mount::sandboxed();
    let db = m.path().join("t.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("create table t(x); begin; insert into t values(1),(2),(3); commit; select sum(x) from t; pragma integrity_check;")
        .output()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "6\nok\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn umask_applies_to_new_files() {
    let m = Mount::sandboxed();
    let out = common::run_as(
        0,
        0,
        m.path(),
        "umask 027; touch f; mkdir d; mkfifo p; umask 0; touch g",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |n: &str| fs::metadata(m.source().join(n)).unwrap().mode() & 0o777;
    assert_eq!(
        (mode("f"), mode("d"), mode("p"), mode("g")),
        (0o640, 0o750, 0o640, 0o666)
    );
}

#[test]
fn posix_acls_are_enforced_and_inherited() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::write(p.join("private"), b"acl").unwrap();
    fs::set_permissions(p.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    let denied = common::run_as(65534, 65534, p, "cat private");
    assert!(
        !denied.status.success(),
        "0600 root file must not be readable by nobody"
    );
    let st = std::process::Command::new("setfacl")
        .args(["-m", "u:nobody:r"])
        .arg(p.join("private"))
        .status()
        .unwrap();
    assert!(st.success());
    let allowed = common::run_as(65534, 65534, p, "cat private");
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        "acl",
        "an ACL entry grants read: {}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    // Default ACLs are inherited by new files instead of the umask.
    fs::create_dir(p.join("shared")).unwrap();
    let st = std::process::Command::new("setfacl")
        .args(["-d", "-m", "u:nobody:rwx"])
        .arg(p.join("shared"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = common::run_as(
        0,
        0,
        p,
        "umask 077; touch shared/new; getfacl -p shared/new",
    );
    let acl = String::from_utf8_lossy(&out.stdout);
    // As on a local file system: the entry is inherited, the mask comes from
    // the mode (0666), and the umask is not applied.
    assert!(
        acl.contains("user:nobody:rwx\t#effective:rw-") && acl.contains("mask::rw-"),
        "inherited ACL: {acl}"
    );
    let on_host = std::process::Command::new("getfacl")
        .arg("-p")
        .arg(m.source().join("shared/new"))
        .output()
        .unwrap();
    let host_acl = String::from_utf8_lossy(&on_host.stdout);
    assert!(host_acl.contains("mask::rw-"), "{host_acl}");
}

#[test]
fn o_tmpfile_is_reported_unsupported() {
    let m = Mount::sandboxed();
    let cp = c(m.path());
    // SAFETY: valid path; the fd is closed if the call ever succeeds.
    let fd = unsafe { libc::open(cp.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    let e = last_errno();
    if fd >= 0 {
        // SAFETY: fd was just returned by open.
        unsafe { libc::close(fd) };
    }
    assert_eq!(
        (fd, e),
        (-1, libc::EOPNOTSUPP),
        "specs/semantics.md documents EOPNOTSUPP"
    );
}

#[test]
fn xattrs_of_a_symlink_stay_on_the_symlink() {
    let m = Mount::sandboxed();
    let p = m.path();
    fs::write(p.join("target"), b"t").unwrap();
    std::os::unix::fs::symlink("target", p.join("link")).unwrap();
    // trusted.* is allowed on symlinks (for root); user.* is not.
    let st = std::process::Command::new("setfattr")
        .args(["-h", "-n", "trusted.agentfs", "-v", "onlink"])
        .arg(p.join("link"))
        .status()
        .unwrap();
    assert!(st.success());
    let get = |path: &Path, nofollow: bool| {
        let mut c = std::process::Command::new("getfattr");
        if nofollow {
            c.arg("-h");
        }
        let out = c.args(["-d", "-m", "trusted"]).arg(path).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get(&m.source().join("link"), true).contains("onlink"));
    assert!(
        !get(&m.source().join("target"), false).contains("onlink"),
        "the target must not get the symlink's xattr"
    );
}

/// The mode bits a change by `who` (root if None) leaves on a 06777 file
/// `f` in `dir`, after running Python `change` on its descriptor `fd`:
/// as seen through the mount and, if given, in the `host` directory.
fn set_id_bits_after(dir: &Path, host: Option<&Path>, who: Option<u32>, change: &str) -> u32 {
    let f = dir.join("f");
    fs::write(&f, b"0123456789").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o6777)).unwrap();
    let script = format!("import os\nfd = os.open('f', os.O_RDWR)\n{change}\n");
    let out = match who {
        Some(uid) => common::run_as(uid, uid, dir, &format!("/usr/bin/python3 -c \"{script}\"")),
        None => std::process::Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .current_dir(dir)
            .output()
            .unwrap(),
    };
    assert!(
        out.status.success(),
        "{change}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = fs::metadata(&f).unwrap().mode() & 0o7777;
    if let Some(host) = host {
        let on_host = fs::metadata(host.join("f")).unwrap().mode() & 0o7777;
        assert_eq!(seen, on_host, "{change}: the mount and the host disagree");
    }
    seen
}

#[test]
fn a_change_of_data_clears_set_id_bits_unless_the_caller_has_cap_fsetid() {
    let changes = [
        ("write", "os.pwrite(fd, b'x', 3)"),
        ("truncate", "os.ftruncate(fd, 4)"),
        ("fallocate", "os.posix_fallocate(fd, 0, 8192)"),
        (
            "copy_file_range",
            "s = os.open('src', os.O_RDONLY); os.copy_file_range(s, fd, 4, 0, 0)",
        ),
    ];
    for policy in ["auto", "on"] {
        // Sandboxed: the worker reads callers' capabilities in /proc there.
        let m = Mount::builder()
            .supervised()
            .arg("--passthrough")
            .arg(policy)
            .start();
        common::snapshot(&m, None, "base");
        common::branch(&m, "base", "b");
        let branch = common::branch_dir(&m, "b");
        let places = [
            (m.path().to_owned(), Some(m.source().to_owned())),
            (branch, None),
        ];
        for (dir, host) in &places {
            let host = host.as_deref();
            fs::write(dir.join("src"), b"abcd").unwrap();
            fs::set_permissions(dir.join("src"), fs::Permissions::from_mode(0o644)).unwrap();
            for (what, change) in changes {
                let at = format!("{what} in {} with passthrough {policy}", dir.display());
                // As on a local file system: a caller without CAP_FSETID
                // loses set-user-id, and set-group-id with group execute...
                assert_eq!(
                    set_id_bits_after(dir, host, Some(65534), change),
                    0o0777,
                    "{at} by nobody"
                );
                // ... root keeps both.
                assert_eq!(
                    set_id_bits_after(dir, host, None, change),
                    0o6777,
                    "{at} by root"
                );
            }
            // Set-group-id without group execute is a locking mark: kept.
            let f = dir.join("f");
            fs::set_permissions(&f, fs::Permissions::from_mode(0o2767)).unwrap();
            let out = common::run_as(
                65534,
                65534,
                dir,
                "/usr/bin/python3 -c \"import os; os.write(os.open('f', os.O_WRONLY), b'y')\"",
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                fs::metadata(&f).unwrap().mode() & 0o7777,
                0o2767,
                "{}",
                dir.display()
            );
            // A chown clears set-user-id, even root's.
            fs::set_permissions(&f, fs::Permissions::from_mode(0o4755)).unwrap();
            std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
            assert_eq!(
                fs::metadata(&f).unwrap().mode() & 0o7777,
                0o0755,
                "{}",
                dir.display()
            );
        }
    }
}
