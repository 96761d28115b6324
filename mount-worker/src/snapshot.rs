//! The catalog: snapshots, branches, their layers and the bindings,
//! persisted atomically in `<state>/catalog.json` (see
//! specs/state-format.md). One owner: FsCore keeps the only live copy.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::binding::Binding;

/// Name of the catalog file in the state directory.
const CATALOG: &str = "catalog.json";
/// The format this worker writes. It also reads version 1 (snapshots of
/// main only), which version 2 extends with defaulted fields.
pub const FORMAT_VERSION: u32 = 2;

/// Id of a snapshot. It is also the snapshot's view number in node ids, so
/// ids are never reused within a state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotId(pub u32);

/// Id of a branch, from the same sequence as snapshot ids: it is the
/// branch's view number in node ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BranchId(pub u32);

/// Id of a layer directory, `layers/<id>/` in the state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Ord, PartialOrd, Serialize, Deserialize)]
pub struct LayerId(pub u32);

/// A view: what one branch or snapshot shows (main is not one of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViewId {
    /// A snapshot.
    Snapshot(SnapshotId),
    /// A branch.
    Branch(BranchId),
}

impl ViewId {
    /// The view number in node ids.
    pub fn number(self) -> u32 {
        match self {
            ViewId::Snapshot(s) => s.0,
            ViewId::Branch(b) => b.0,
        }
    }
}

/// One snapshot, of main or of a branch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Stable id (also its view number).
    pub id: SnapshotId,
    /// Unique name.
    pub name: String,
    /// The epoch of main it shows at the bottom: every inode of main as it
    /// was before its first change at or after this epoch.
    pub epoch: u64,
    /// Seconds since 1970 when it was taken.
    pub created: u64,
    /// The branch it was taken of; absent for main.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<BranchId>,
    /// The frozen layers it shows over main's epoch, top first (empty for
    /// a snapshot of main).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerId>,
}

/// One branch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    /// Stable id (also its view number).
    pub id: BranchId,
    /// Unique name among branches.
    pub name: String,
    /// Seconds since 1970 when it was created.
    pub created: u64,
    /// The snapshot it was created from (it may have been deleted since).
    pub snapshot: SnapshotId,
    /// The epoch of main at its bottom.
    pub epoch: u64,
    /// Its layers, top first: `layers[0]` takes its changes, the others
    /// are frozen (shared with snapshots).
    pub layers: Vec<LayerId>,
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
    /// The next layer id to hand out.
    #[serde(default = "first_id")]
    pub next_layer: u32,
    /// Live branches, oldest first.
    #[serde(default)]
    pub branches: Vec<Branch>,
    /// The bindings.
    #[serde(default)]
    pub bindings: Vec<Binding>,
}

fn first_id() -> u32 {
    1
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
                    next_layer: 1,
                    branches: Vec::new(),
                    bindings: Vec::new(),
                });
            }
            Err(e) => return Err(CatalogError::Io(path, e)),
        };
        let mut c: Catalog = serde_json::from_str(&text)
            .map_err(|e| CatalogError::Invalid(path.clone(), e.to_string()))?;
        if c.format != "agentfs-state" || !(1..=FORMAT_VERSION).contains(&c.version) {
            return Err(CatalogError::Invalid(
                path,
                format!("format {:?} version {}", c.format, c.version),
            ));
        }
        c.version = FORMAT_VERSION;
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

    /// The branch called `key` (a name, or an id as decimal).
    pub fn find_branch(&self, key: &str) -> Option<&Branch> {
        self.branches
            .iter()
            .find(|b| b.name == key)
            .or_else(|| self.branches.iter().find(|b| b.id.0.to_string() == key))
    }

    /// The branch with id `id`.
    pub fn branch(&self, id: BranchId) -> Option<&Branch> {
        self.branches.iter().find(|b| b.id == id)
    }

    /// The snapshot with id `id`.
    pub fn snapshot(&self, id: SnapshotId) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.id == id)
    }

    fn next_view_id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id - 1
    }

    fn next_layer_id(&mut self) -> LayerId {
        self.next_layer += 1;
        LayerId(self.next_layer - 1)
    }

    /// Records a new snapshot of main at the current epoch and advances it.
    pub fn add(&mut self, name: String) -> Snapshot {
        let snap = Snapshot {
            id: SnapshotId(self.next_view_id()),
            name,
            epoch: self.main_epoch,
            created: now(),
            branch: None,
            layers: Vec::new(),
        };
        self.main_epoch += 1;
        self.snapshots.push(snap.clone());
        snap
    }

    /// Records a snapshot of `branch`: its layers freeze and become the
    /// snapshot's; the branch continues on a new empty layer over them.
    /// Returns the snapshot and the new layer (whose directory the caller
    /// creates before saving).
    pub fn add_branch_snapshot(&mut self, branch: BranchId, name: String) -> (Snapshot, LayerId) {
        let layer = self.next_layer_id();
        let id = SnapshotId(self.next_view_id());
        let b = self
            .branches
            .iter_mut()
            .find(|b| b.id == branch)
            .expect("the caller found the branch");
        let snap = Snapshot {
            id,
            name,
            epoch: b.epoch,
            created: now(),
            branch: Some(branch),
            layers: b.layers.clone(),
        };
        b.layers.insert(0, layer);
        self.snapshots.push(snap.clone());
        (snap, layer)
    }

    /// Records a new branch over snapshot `from`, with a new empty layer
    /// on top (returned; the caller creates its directory before saving).
    pub fn add_branch(&mut self, name: String, from: &Snapshot) -> Branch {
        let layer = self.next_layer_id();
        let mut layers = vec![layer];
        layers.extend(&from.layers);
        let b = Branch {
            id: BranchId(self.next_view_id()),
            name,
            created: now(),
            snapshot: from.id,
            epoch: from.epoch,
            layers,
        };
        self.branches.push(b.clone());
        b
    }

    /// Every epoch of main that a snapshot or branch shows: the pre-images
    /// they need must be kept.
    pub fn live_epochs(&self) -> Vec<u64> {
        let snaps = self.snapshots.iter().map(|s| s.epoch);
        snaps.chain(self.branches.iter().map(|b| b.epoch)).collect()
    }

    /// The newest epoch any view shows: changes to main must preserve
    /// pre-images tagged with it.
    pub fn latest_epoch(&self) -> Option<u64> {
        self.live_epochs().into_iter().max()
    }

    /// Every layer a snapshot or branch uses.
    pub fn layers_in_use(&self) -> BTreeSet<LayerId> {
        let snaps = self.snapshots.iter().flat_map(|s| &s.layers);
        snaps
            .chain(self.branches.iter().flat_map(|b| &b.layers))
            .copied()
            .collect()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
