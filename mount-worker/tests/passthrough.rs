//! FUSE passthrough on real mounts (kernel 6.9+): read-only opens of main
//! are served from the host file itself; every mix of readers, writers and
//! maps on one file opens without EIO (the kernel's per-inode I/O modes);
//! and writes that bypass the worker never change a snapshot.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::Mount;

fn populate(s: &Path) {
    fs::write(s.join("f"), b"0123456789").unwrap();
    fs::write(s.join("big"), vec![b'a'; 1 << 20]).unwrap();
}

fn read_at(f: &File, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    let n = f.read_at(&mut buf, 0).unwrap();
    buf.truncate(n);
    buf
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", p.display()))
}

#[test]
fn a_read_only_open_reads_the_host_file_itself() {
    let m = Mount::builder().populate(populate).start();
    let reader = File::open(m.path().join("f")).unwrap();
    assert_eq!(read_at(&reader, 10), b"0123456789");
    // A change behind the mount's back: a cached open would answer from
    // the FUSE page cache filled by the read above until the attributes
    // expire; the host file itself has it at once.
    File::options()
        .write(true)
        .open(m.source().join("f"))
        .unwrap()
        .write_all_at(b"ABCDE", 0)
        .unwrap();
    assert_eq!(read_at(&reader, 10), b"ABCDE56789");
}

#[test]
fn readers_writers_and_maps_of_one_file_mix_in_any_order() {
    let m = Mount::builder().populate(populate).start();
    let f = m.path().join("f");
    // Readers first (passthrough), then a writer joins them.
    let r1 = File::open(&f).unwrap();
    let w1 = rw(&f);
    w1.write_all_at(b"w1", 0).unwrap();
    assert_eq!(read_at(&r1, 10), b"w123456789");
    let r2 = File::open(&f).unwrap();
    assert_eq!(read_at(&r2, 10), b"w123456789");
    // A shared map of the joined writer reaches the host file.
    let map = common::SharedMap::new(&f);
    map.write_and_sync(2, b"MM");
    assert_eq!(read_at(&r2, 10), b"w1MM456789");
    assert_eq!(fs::read(m.source().join("f")).unwrap(), b"w1MM456789");
    drop((r1, r2, w1, map));
    // A writer first (cached), then readers join it.
    let w2 = rw(&f);
    let r3 = File::open(&f).unwrap();
    w2.write_all_at(b"w2", 4).unwrap();
    assert_eq!(read_at(&r3, 10), b"w1MMw26789");
    drop(w2);
    // The last writer gone, a reader still open: more readers join.
    let r4 = File::open(&f).unwrap();
    assert_eq!(read_at(&r4, 10), b"w1MMw26789");
    drop((r3, r4));
    // All closed: passthrough again, then a writer joins.
    let r5 = File::open(&f).unwrap();
    let w3 = rw(&f);
    w3.write_all_at(b"w3", 8).unwrap();
    assert_eq!(read_at(&r5, 10), b"w1MMw267w3");
    // Newly created files and truncating opens.
    fs::write(m.path().join("new"), b"fresh").unwrap();
    let r6 = File::open(m.path().join("new")).unwrap();
    fs::write(m.path().join("new"), b"again").unwrap();
    assert_eq!(read_at(&r6, 10), b"again");
}

#[test]
fn writes_that_bypass_the_worker_never_change_a_snapshot() {
    for policy in ["auto", "on"] {
        let m = Mount::builder()
            .populate(populate)
            .arg("--passthrough")
            .arg(policy)
            .start();
        let f = m.path().join("f");
        let big = m.path().join("big");
        common::snapshot(&m, None, "before-open");
        // auto: a reader makes the node passthrough, the writer joins it
        // and writes through a shared map; on: the writer itself writes
        // to the host file.
        let reader = File::open(&f).unwrap();
        let writer = rw(&f);
        let map = common::SharedMap::new(&f);
        let big_writer = rw(&big);
        map.write_and_sync(0, b"1");
        big_writer.write_all_at(b"b1", 0).unwrap();
        common::snapshot(&m, None, "while-open");
        map.write_and_sync(0, b"2");
        writer.write_all_at(b"w", 5).unwrap();
        big_writer.write_all_at(b"b2", 0).unwrap();
        big_writer.sync_all().unwrap();
        drop((reader, writer, map, big_writer));

        let snap =
            |name: &str, file: &str| fs::read(common::snapshot_dir(&m, name).join(file)).unwrap();
        assert_eq!(snap("before-open", "f"), b"0123456789", "{policy}");
        assert_eq!(snap("while-open", "f"), b"1123456789", "{policy}");
        assert_eq!(fs::read(&f).unwrap(), b"21234w6789", "{policy}");
        assert_eq!(&snap("before-open", "big")[..2], b"aa", "{policy}");
        assert_eq!(&snap("while-open", "big")[..2], b"b1", "{policy}");
        assert_eq!(&fs::read(&big).unwrap()[..2], b"b2", "{policy}");
        assert_eq!(snap("while-open", "big").len(), 1 << 20, "{policy}");
    }
}

/// Pre-images kept in the state directory.
fn pre_images(m: &Mount) -> usize {
    fs::read_dir(m.state_dir().join("preserved"))
        .map(|inodes| {
            inodes
                .map(|i| fs::read_dir(i.unwrap().path()).unwrap().count())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn a_shared_map_that_outlives_its_descriptor_never_changes_a_snapshot() {
    // The last: sandboxed as the supervisor runs it, with the file of
    // another user (whether it is still mapped is asked with a lease).
    for (policy, sandboxed) in [("auto", false), ("on", false), ("auto", true)] {
        let mut b = Mount::builder()
            .populate(|s| {
                populate(s);
                std::os::unix::fs::chown(s.join("f"), Some(1000), Some(1000)).unwrap();
            })
            .arg("--passthrough")
            .arg(policy);
        if sandboxed {
            b = b.supervised();
        }
        let m = b.start();
        let f = m.path().join("f");
        let case = format!("{policy}, sandboxed: {sandboxed}");
        // Someone opening the file for writing while a snapshot holds its
        // lease signals SIGIO, which kills by default.
        let status = fs::read_to_string(format!("/proc/{}/status", m.worker_pid())).unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
            .unwrap();
        assert_ne!(ignored & 1 << (libc::SIGIO - 1), 0, "{case}: {status}");
        // auto: a reader makes the node passthrough and the writer joins
        // it; the map is of the host file either way.
        let reader = File::open(&f).unwrap();
        let mut map = common::SharedMap::new(&f);
        map.write_and_sync(0, b"1");
        // The kernel releases the file at close; the map lives on.
        map.close_file();
        drop(reader);
        common::snapshot(&m, None, "map-alive");
        map.write_and_sync(0, b"2");
        common::snapshot(&m, None, "map-alive-2");
        map.write_and_sync(0, b"3");
        drop(map);
        let kept = pre_images(&m);
        common::snapshot(&m, None, "map-gone");

        let snap = |name: &str| fs::read(common::snapshot_dir(&m, name).join("f")).unwrap();
        assert_eq!(snap("map-alive"), b"1123456789", "{case}");
        assert_eq!(snap("map-alive-2"), b"2123456789", "{case}");
        assert_eq!(snap("map-gone"), b"3123456789", "{case}");
        assert_eq!(fs::read(&f).unwrap(), b"3123456789", "{case}");
        // Nothing writes the file unseen any more: no copy for "map-gone".
        assert_eq!(pre_images(&m), kept, "{case}");
    }
}

#[test]
fn a_snapshot_file_with_a_pre_image_is_read_through_passthrough() {
    let m = Mount::builder().populate(populate).start();
    common::snapshot(&m, None, "s");
    fs::write(m.path().join("f"), b"changed").unwrap();
    let snap = common::snapshot_dir(&m, "s").join("f");
    let r1 = File::open(&snap).unwrap();
    let r2 = File::open(&snap).unwrap();
    assert_eq!(read_at(&r1, 20), b"0123456789");
    assert_eq!(read_at(&r2, 20), b"0123456789");
    assert_eq!(fs::read(m.path().join("f")).unwrap(), b"changed");
}
