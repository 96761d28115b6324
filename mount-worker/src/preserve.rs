//! Pre-images of main's inodes: what a snapshot of main needs of an inode
//! that main has changed since.
//!
//! Main is the live source, so a snapshot of main cannot be a frozen layer.
//! Instead, before main first changes an inode after the newest snapshot
//! (epoch `s`), the inode's current state is stored here tagged `s`. A
//! snapshot taken at epoch `e` shows an inode as its pre-image with the
//! smallest tag >= `e`, or as the live inode when there is none (it has not
//! changed since). See specs/design-branches.md.
//!
//! Layout: `<state>/preserved/<handle-hex>/<tag>/` holding `meta.json` and,
//! for a regular file, `data` (its content), for a directory, `entries.json`
//! (name -> handle). A pre-image is built in `.tmp-<tag>`, fsync'd and
//! renamed into place before the change it protects is made.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::hex;
use crate::hostfs::{self, HostHandle, Stat};

/// Metadata of a preserved inode (its `stat` and xattrs at the time).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    /// Host inode number (the object's identity inside a snapshot view).
    pub ino: u64,
    /// `st_mode`, type bits included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: i64,
    /// Link count.
    pub nlink: u64,
    /// Device number of a device node.
    pub rdev: u64,
    /// Allocated 512-byte blocks.
    pub blocks: i64,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, i64),
    /// Modification time.
    pub mtime: (i64, i64),
    /// Status change time.
    pub ctime: (i64, i64),
    /// xattrs as hex (name, value).
    pub xattrs: Vec<(String, String)>,
    /// Target of a symlink, hex.
    pub target: Option<String>,
}

impl Meta {
    fn of(node: BorrowedFd<'_>, st: &Stat) -> io::Result<Meta> {
        let kind = st.st_mode & libc::S_IFMT;
        let xattrs = hostfs::xattrs_if_any(node)?;
        Ok(Meta {
            ino: st.st_ino,
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
            blocks: st.st_blocks,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            xattrs: xattrs
                .iter()
                .map(|(n, v)| (hex::encode(n), hex::encode(v)))
                .collect(),
            target: if kind == libc::S_IFLNK {
                Some(hex::encode(&hostfs::readlink(node)?))
            } else {
                None
            },
        })
    }

    /// The preserved attributes as a `stat`.
    pub fn stat(&self) -> Stat {
        // SAFETY: an all-zero `struct stat` is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_ino = self.ino;
        st.st_mode = self.mode;
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        st.st_size = self.size;
        st.st_nlink = self.nlink;
        st.st_rdev = self.rdev;
        st.st_blocks = self.blocks;
        st.st_blksize = 4096;
        (st.st_atime, st.st_atime_nsec) = self.atime;
        (st.st_mtime, st.st_mtime_nsec) = self.mtime;
        (st.st_ctime, st.st_ctime_nsec) = self.ctime;
        st
    }

    /// The preserved xattrs, decoded.
    pub fn xattr_list(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.xattrs
            .iter()
            .filter_map(|(n, v)| Some((hex::decode(n)?, hex::decode(v)?)))
            .collect()
    }
}

/// One entry of a preserved directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryRec {
    /// The name, hex (names need not be UTF-8).
    pub name: String,
    /// Handle of the inode it named.
    pub handle: String,
    /// Host inode number.
    pub ino: u64,
    /// `DT_*` type.
    pub d_type: u8,
}

/// A stored pre-image.
#[derive(Clone, Debug)]
pub struct PreImage {
    /// Its directory (`preserved/<handle>/<tag>`).
    pub dir: PathBuf,
    /// The inode's attributes at the time.
    pub meta: Meta,
    /// A directory's entries, read once (a pre-image never changes) and
    /// sorted by name, so that each lookup in a big directory is a binary
    /// search rather than a parse of the whole list.
    entries: OnceLock<Vec<EntryRec>>,
}

impl PreImage {
    /// The preserved content of a regular file.
    pub fn open_data(&self) -> io::Result<File> {
        File::open(self.dir.join("data"))
    }

    /// The preserved entries of a directory, sorted by name.
    pub fn entries(&self) -> io::Result<&[EntryRec]> {
        if let Some(e) = self.entries.get() {
            return Ok(e);
        }
        let text = fs::read(self.dir.join("entries.json"))?;
        let mut list: Vec<EntryRec> = serde_json::from_slice(&text)
            .map_err(|e| invalid(format!("{}: {e}", self.dir.display())))?;
        list.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(self.entries.get_or_init(|| list))
    }

    /// The preserved entry `name` of a directory.
    pub fn entry(&self, name: &OsStr) -> io::Result<Option<&EntryRec>> {
        // Hex keeps the order of the bytes it encodes.
        let want = hex::encode(name.as_bytes());
        let list = self.entries()?;
        Ok(list
            .binary_search_by(|e| e.name.as_str().cmp(&want))
            .ok()
            .map(|i| &list[i]))
    }
}

/// The pre-image store of one state directory.
pub struct PreImageStore {
    root: PathBuf,
    /// Tags on disk per handle, ascending: every pre-image of the store,
    /// read at open and kept exact by the only writer, this store. A handle
    /// without pre-images has no entry, so the index grows with the
    /// pre-images, not with the inodes snapshots look at.
    tags: Mutex<HashMap<HostHandle, Vec<u64>>>,
    /// Serializes preservation: rare, and two threads must never build the
    /// same pre-image at once.
    writing: Mutex<()>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl PreImageStore {
    /// Opens (creating) `<state>/preserved`, removes half-built pre-images
    /// a crash may have left and indexes the others.
    pub fn open(state: &Path) -> io::Result<PreImageStore> {
        let root = state.join("preserved");
        fs::create_dir_all(&root)?;
        for h in fs::read_dir(&root)? {
            let h = h?.path();
            for t in fs::read_dir(&h)? {
                let t = t?;
                if t.file_name().as_bytes().starts_with(b".tmp-") {
                    fs::remove_dir_all(t.path())?;
                }
            }
        }
        Ok(PreImageStore {
            tags: Mutex::new(index(&root)?),
            root,
            writing: Mutex::default(),
        })
    }

    /// `f` of the tags of `h`, ascending (none if it has no pre-image).
    fn with_tags<R>(&self, h: &HostHandle, f: impl FnOnce(&[u64]) -> R) -> R {
        f(self.tags.lock().unwrap().get(h).map_or(&[], Vec::as_slice))
    }

    /// The pre-image a snapshot at `epoch` shows for `h`, if main changed
    /// the inode since.
    pub fn find(&self, h: &HostHandle, epoch: u64) -> io::Result<Option<PreImage>> {
        let Some(tag) = self.with_tags(h, |t| t.iter().copied().find(|&t| t >= epoch)) else {
            return Ok(None);
        };
        let dir = self.root.join(h.to_hex()).join(tag.to_string());
        let meta = fs::read(dir.join("meta.json"))?;
        let meta = serde_json::from_slice(&meta)
            .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
        Ok(Some(PreImage {
            dir,
            meta,
            entries: OnceLock::new(),
        }))
    }

    /// Stores the current state of the inode behind `node` (whose handle
    /// is `h`) tagged `tag`,
    /// unless a pre-image with a tag >= `tag` exists already. Durable (fsync)
    /// before it returns, so the change that follows can never outrun it.
    pub fn preserve(&self, node: BorrowedFd<'_>, h: &HostHandle, tag: u64) -> io::Result<()> {
        let done = || self.with_tags(h, |t| t.last().is_some_and(|&t| t >= tag));
        if done() {
            return Ok(());
        }
        let _w = self.writing.lock().unwrap();
        if done() {
            return Ok(());
        }
        let st = hostfs::stat(node)?;
        let hdir = self.root.join(h.to_hex());
        fs::create_dir_all(&hdir)?;
        let tmp = hdir.join(format!(".tmp-{tag}"));
        let _ = fs::remove_dir_all(&tmp);
        let made = hdir.join(tag.to_string());
        let stored = write_preimage(&tmp, node, &st)
            .and_then(|()| fs::rename(&tmp, &made))
            .and_then(|()| File::open(&hdir)?.sync_all())
            .and_then(|()| File::open(&self.root)?.sync_all());
        if let Err(e) = stored {
            // ENOSPC, EIO...: the change is refused (a crash could lose a
            // pre-image that a change made now would outlive), and nothing
            // is left behind. A numbered directory is a pre-image to
            // `open`, so one renamed already goes back under its temporary
            // name first (one step), which `open` sweeps should the
            // removal stop part way.
            let _ = fs::rename(&made, &tmp);
            let _ = fs::remove_dir_all(&tmp);
            let _ = fs::remove_dir(&hdir);
            return Err(e);
        }
        // Indexed only once durable: another thread about to change the
        // inode meanwhile finds it not done and waits for the lock, rather
        // than going ahead of the flush.
        let mut tags = self.tags.lock().unwrap();
        let t = tags.entry(h.clone()).or_default();
        t.push(tag);
        t.sort_unstable();
        Ok(())
    }

    /// Removes every pre-image no live snapshot needs. A pre-image tagged
    /// `t`, whose previous tag for the same inode is `p` (0 if none), serves
    /// exactly the snapshots with `p < epoch <= t`. Found in the index
    /// (exact: this store is its only writer), so a deletion costs reads
    /// of the disk only for what it removes, not for every pre-image kept.
    /// (A pre-image whose failed preservation could not even be moved back
    /// out of the way stays unindexed until the next start indexes it.)
    pub fn collect_garbage(&self, live_epochs: &[u64]) -> io::Result<usize> {
        let _w = self.writing.lock().unwrap();
        let unneeded: Vec<(HostHandle, u64)> = {
            let tags = self.tags.lock().unwrap();
            tags.iter()
                .flat_map(|(h, tags)| {
                    let prev = std::iter::once(0).chain(tags.iter().copied());
                    prev.zip(tags.iter().copied())
                        .filter(|&(p, t)| !live_epochs.iter().any(|&e| p < e && e <= t))
                        .map(move |(_, t)| (h.clone(), t))
                })
                .collect()
        };
        for (h, t) in &unneeded {
            let hdir = self.root.join(h.to_hex());
            match fs::remove_dir_all(hdir.join(t.to_string())) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            // Out of the index once gone from the disk, so that it stays
            // exact should a later removal fail.
            let mut tags = self.tags.lock().unwrap();
            let left = tags.get_mut(h).expect("indexed above");
            left.retain(|x| x != t);
            if left.is_empty() {
                tags.remove(h);
                drop(tags);
                // Anything else left in it is damage `--check` names.
                fs::remove_dir(&hdir).or_else(|e| match e.raw_os_error() {
                    Some(libc::ENOTEMPTY | libc::ENOENT) => Ok(()),
                    _ => Err(e),
                })?;
            }
        }
        Ok(unneeded.len())
    }
}

/// The tags of every pre-image under `root` by handle, ascending (a name
/// that is no handle or no tag is damage `--check` reports: not indexed).
fn index(root: &Path) -> io::Result<HashMap<HostHandle, Vec<u64>>> {
    let mut index = HashMap::new();
    for h in fs::read_dir(root)? {
        let h = h?;
        let Some(handle) = h.file_name().to_str().and_then(HostHandle::from_hex) else {
            continue;
        };
        let mut tags: Vec<u64> = Vec::new();
        for t in fs::read_dir(h.path())? {
            if let Some(tag) = t?.file_name().to_str().and_then(|s| s.parse().ok()) {
                tags.push(tag);
            }
        }
        if !tags.is_empty() {
            tags.sort_unstable();
            index.insert(handle, tags);
        }
    }
    Ok(index)
}

/// Writes the pre-image of the inode behind `node` into the new directory
/// `tmp`, every file fsync'd.
fn write_preimage(tmp: &Path, node: BorrowedFd<'_>, st: &Stat) -> io::Result<()> {
    fs::create_dir(tmp)?;
    let meta = Meta::of(node, st)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let src = hostfs::reopen(node, libc::O_RDONLY)?;
            let dst = File::create(tmp.join("data"))?;
            hostfs::clone_or_copy(&src, &dst)?;
            dst.sync_all()?;
        }
        libc::S_IFDIR => {
            let entries = list_dir(node)?;
            let mut f = File::create(tmp.join("entries.json"))?;
            f.write_all(&serde_json::to_vec(&entries).expect("serializes"))?;
            f.sync_all()?;
        }
        _ => {}
    }
    let mut f = File::create(tmp.join("meta.json"))?;
    f.write_all(&serde_json::to_vec(&meta).expect("serializes"))?;
    f.sync_all()?;
    File::open(tmp)?.sync_all()
}

/// The entries of a live directory, each with the handle of its inode.
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<EntryRec>> {
    hostfs::read_dir_all(dir)?
        .into_iter()
        .map(|e| {
            let name = hostfs::component(OsStr::from_bytes(&e.name))?;
            let child = hostfs::open_node(dir, &name)?;
            Ok(EntryRec {
                name: hex::encode(&e.name),
                handle: hostfs::handle_of(child.as_fd())?.to_hex(),
                ino: e.ino,
                d_type: e.d_type,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preserved_name_is_found_and_no_other() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        // Bytes whose order differs from their order as text, non-UTF-8.
        let names: [&[u8]; 8] = [
            b"a",
            b"B",
            b"\xff\x01",
            b"\x01",
            b"zz",
            b"a0",
            b"\xc3\xa9",
            b"~",
        ];
        for n in names {
            fs::write(src.join(OsStr::from_bytes(n)), b"x").unwrap();
        }
        let store = PreImageStore::open(t.path()).unwrap();
        let dir = hostfs::open_dir_path(&src).unwrap();
        let h = hostfs::handle_of(dir.as_fd()).unwrap();
        store.preserve(dir.as_fd(), &h, 1).unwrap();
        fs::remove_file(src.join("a")).unwrap();

        let p = store.find(&h, 1).unwrap().expect("preserved");
        assert_eq!(p.entries().unwrap().len(), names.len());
        for n in names {
            let e = p.entry(OsStr::from_bytes(n)).unwrap();
            assert_eq!(e.map(|e| hex::decode(&e.name).unwrap()), Some(n.to_vec()));
        }
        for n in ["b", "A", "a1", "", "zzz"] {
            assert!(p.entry(OsStr::new(n)).unwrap().is_none(), "{n:?}");
        }
    }

    /// The store's index of pre-images follows what preserving and
    /// collecting do on disk, and a store opened again (a restart) finds
    /// the same ones.
    #[test]
    fn pre_images_are_found_by_epoch_across_collection_and_restart() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"v1").unwrap();
        let fd = fs::File::open(&f).unwrap();
        let h = hostfs::handle_of(fd.as_fd()).unwrap();
        let other = hostfs::handle_of(hostfs::open_dir_path(t.path()).unwrap().as_fd()).unwrap();
        let content =
            |p: Option<PreImage>| p.map(|p| io::read_to_string(p.open_data().unwrap()).unwrap());
        let store = PreImageStore::open(t.path()).unwrap();
        assert!(
            store.find(&h, 1).unwrap().is_none(),
            "nothing preserved yet"
        );
        store.preserve(fd.as_fd(), &h, 3).unwrap();
        fs::write(&f, b"v2").unwrap();
        store.preserve(fd.as_fd(), &h, 7).unwrap();
        fs::write(&f, b"v3").unwrap();
        for s in [&store, &PreImageStore::open(t.path()).unwrap()] {
            assert_eq!(content(s.find(&h, 1).unwrap()).as_deref(), Some("v1"));
            assert_eq!(content(s.find(&h, 3).unwrap()).as_deref(), Some("v1"));
            assert_eq!(content(s.find(&h, 5).unwrap()).as_deref(), Some("v2"));
            assert!(
                s.find(&h, 8).unwrap().is_none(),
                "after the last change: live"
            );
            assert!(s.find(&other, 1).unwrap().is_none(), "another inode");
        }
        // Only a snapshot at epoch 5 is left: tag 7 serves it, tag 3 goes.
        assert_eq!(store.collect_garbage(&[5]).unwrap(), 1);
        for s in [&store, &PreImageStore::open(t.path()).unwrap()] {
            assert_eq!(content(s.find(&h, 1).unwrap()).as_deref(), Some("v2"));
            assert_eq!(content(s.find(&h, 5).unwrap()).as_deref(), Some("v2"));
        }
        assert_eq!(store.collect_garbage(&[]).unwrap(), 1);
        for s in [&store, &PreImageStore::open(t.path()).unwrap()] {
            assert!(s.find(&h, 1).unwrap().is_none(), "all collected");
        }
    }

    /// Collection works from the index: of several inodes' pre-images it
    /// removes exactly those no live epoch needs (a store opened again
    /// finds the same), takes one already gone from the disk as removed,
    /// and removes an inode's directory with its last pre-image.
    #[test]
    fn collection_removes_exactly_the_unneeded_pre_images() {
        let t = tempfile::tempdir().unwrap();
        let store = PreImageStore::open(t.path()).unwrap();
        let mut handles = Vec::new();
        for i in 0..3 {
            let f = t.path().join(format!("f{i}"));
            fs::write(&f, format!("{i}")).unwrap();
            let fd = fs::File::open(&f).unwrap();
            let h = hostfs::handle_of(fd.as_fd()).unwrap();
            // Tags 2, 4, 6 for each inode.
            for tag in [2, 4, 6] {
                store.preserve(fd.as_fd(), &h, tag).unwrap();
            }
            handles.push(h);
        }
        let hdir = |h: &HostHandle| t.path().join("preserved").join(h.to_hex());
        fs::remove_dir_all(hdir(&handles[2]).join("2")).unwrap();
        // Epoch 3 needs tag 4 (2 < 3 <= 4) of each inode; tags 2 and 6
        // serve none: six removals, one of them already done by hand.
        assert_eq!(store.collect_garbage(&[3]).unwrap(), 6);
        let tags = |s: &PreImageStore, h: &HostHandle| s.with_tags(h, <[u64]>::to_vec);
        for s in [&store, &PreImageStore::open(t.path()).unwrap()] {
            assert_eq!(tags(s, &handles[0]), [4]);
            assert_eq!(tags(s, &handles[1]), [4]);
            assert_eq!(tags(s, &handles[2]), [4]);
        }
        assert!(hdir(&handles[0]).join("4").is_dir());
        assert!(!hdir(&handles[0]).join("2").exists());
        // With its last pre-image an inode's directory goes.
        assert_eq!(store.collect_garbage(&[]).unwrap(), 3);
        assert_eq!(fs::read_dir(t.path().join("preserved")).unwrap().count(), 0);
        assert_eq!(tags(&store, &handles[0]), Vec::<u64>::new());
    }
}
