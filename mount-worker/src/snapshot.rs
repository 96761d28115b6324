//! The catalog of snapshots: names, ids, epochs, persisted atomically in
//! `<state>/catalog.json` (see specs/state-format.md).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Name of the catalog file in the state directory.
const CATALOG: &str = "catalog.json";
/// The only format this worker reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Id of a snapshot. It is also the snapshot's view number in node ids, so
/// ids are never reused within a state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId(pub u32);

/// One snapshot of main.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// Stable id (also its view number).
    pub id: SnapshotId,
    /// Unique name.
    pub name: String,
    /// Main's epoch when the snapshot was taken: it shows every inode as it
    /// was before its first change at or after this epoch.
    pub epoch: u64,
    /// Seconds since 1970 when it was taken.
    pub created: u64,
}

/// The persisted catalog.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Always "agentfs-state".
    format: String,
    /// [`FORMAT_VERSION`].
    version: u32,
    /// Main's current epoch: the epoch the next snapshot of main gets.
    pub main_epoch: u64,
    /// The next snapshot id to hand out.
    pub next_id: u32,
    /// Live snapshots, oldest first.
    pub snapshots: Vec<Snapshot>,
}

/// Why a catalog cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Reading or writing failed.
    #[error("{0}: {1}")]
    Io(PathBuf, io::Error),
    /// The file is not a catalog this worker understands.
    #[error("{0} is not a valid AgentFS catalog (version {FORMAT_VERSION}): {1}")]
    Invalid(PathBuf, String),
}

impl Catalog {
    /// Loads the catalog of `state`, or returns a new empty one when the
    /// state directory has none yet (it is written on the first change).
    pub fn load(state: &Path) -> Result<Catalog, CatalogError> {
        let path = state.join(CATALOG);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Catalog {
                    format: "agentfs-state".into(),
                    version: FORMAT_VERSION,
                    main_epoch: 1,
                    next_id: 1,
                    snapshots: Vec::new(),
                });
            }
            Err(e) => return Err(CatalogError::Io(path, e)),
        };
        let c: Catalog = serde_json::from_str(&text)
            .map_err(|e| CatalogError::Invalid(path.clone(), e.to_string()))?;
        if c.format != "agentfs-state" || c.version != FORMAT_VERSION {
            return Err(CatalogError::Invalid(
                path,
                format!("format {:?} version {}", c.format, c.version),
            ));
        }
        Ok(c)
    }

    /// Writes the catalog so that a crash leaves either the old or the new
    /// one: temporary file, fsync, rename, fsync of the directory.
    pub fn save(&self, state: &Path) -> Result<(), CatalogError> {
        let tmp = state.join("catalog.json.tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).expect("catalog serializes"))?;
            f.sync_all()?;
            fs::rename(&tmp, state.join(CATALOG))?;
            File::open(state)?.sync_all()
        };
        write().map_err(|e| {
            // ENOSPC or EIO: the old catalog stands; leave no half-written copy.
            let _ = fs::remove_file(&tmp);
            CatalogError::Io(tmp.clone(), e)
        })
    }

    /// The snapshot called `key` (a name, or an id as decimal).
    pub fn find(&self, key: &str) -> Option<&Snapshot> {
        self.snapshots
            .iter()
            .find(|s| s.name == key)
            .or_else(|| self.snapshots.iter().find(|s| s.id.0.to_string() == key))
    }

    /// Records a new snapshot of main at the current epoch and advances it.
    pub fn add(&mut self, name: String) -> Snapshot {
        let snap = Snapshot {
            id: SnapshotId(self.next_id),
            name,
            epoch: self.main_epoch,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        self.next_id += 1;
        self.main_epoch += 1;
        self.snapshots.push(snap.clone());
        snap
    }

    /// Epoch of the newest live snapshot of main: changes at this epoch
    /// must preserve pre-images tagged with it.
    pub fn latest_epoch(&self) -> Option<u64> {
        self.snapshots.iter().map(|s| s.epoch).max()
    }
}
