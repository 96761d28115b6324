//! The catalog: snapshots, branches, their layers and the bindings,
//! persisted in `<state>/catalog.json` and `<state>/catalog.log` (see
//! specs/state-format.md). One owner: FsCore keeps the only copy; each
//! change is planned as a [`Change`] against it, saved by the
//! [`CatalogWriter`], then applied to it. Only a deletion (which walks
//! every view's layers anyway) and a fold of the log copy the catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::binding::Binding;
use crate::catalog_change::{self, Change};

/// Name of the catalog file in the state directory.
const CATALOG: &str = "catalog.json";
/// Name of the catalog log: every change appends one line saying what
/// changed, replayed over `catalog.json` when read.
const LOG: &str = "catalog.log";
/// The log is folded into `catalog.json` once it is this long, or eight
/// lines long for larger changes (many bindings).
const LOG_LIMIT: u64 = 1 << 20;
/// The format this worker writes. It also reads version 1 (snapshots of
/// main only), 2 (no log), 3 (each view listing all its layers) and 4
/// (deletions not recorded, whole catalogs as log lines), which version 5
/// extends or replaces.
pub const FORMAT_VERSION: u32 = 5;

/// Id of a snapshot. It is also the snapshot's view number in node ids, so
/// ids are never reused within a state directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Ord, PartialOrd, Serialize, Deserialize)]
pub struct SnapshotId(pub u32);

/// Id of a branch, from the same sequence as snapshot ids: it is the
/// branch's view number in node ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Ord, PartialOrd, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// The topmost of the frozen layers it shows over main's epoch (none
    /// for a snapshot of main); the others: [`Catalog::layers`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerId>,
}

/// One branch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Its top layer, which takes its changes; the frozen ones below it
    /// (shared with snapshots): [`Catalog::layers`].
    pub layer: LayerId,
}

/// What a directory of `layers/` is, by the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerDir {
    /// A layer some snapshot or branch uses.
    InUse,
    /// The next layer: the spare, or one whose creation a crash cut short.
    Next,
    /// A layer a deletion freed (garbage).
    Freed,
    /// A layer no view uses and no deletion freed: the catalog may have
    /// lost where it sits. Kept and reported.
    Unexplained,
    /// Not named as a layer is: not AgentFS's. Kept and reported.
    NotALayer,
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
    /// Live snapshots, oldest first: in id order, which changes keep and
    /// look records up by (ids only grow; a list read is sorted).
    pub snapshots: Vec<Snapshot>,
    /// The next layer id to hand out.
    #[serde(default = "first_id")]
    pub next_layer: u32,
    /// Live branches, oldest first: in id order, as `snapshots`.
    #[serde(default)]
    pub branches: Vec<Branch>,
    /// The bindings.
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// The layer each layer sits on, for every layer a view uses but the
    /// bottom ones (which sit on main). Each view names only its top layer:
    /// n snapshots of a branch cost n entries here, not n²/2 in lists.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) below: BTreeMap<LayerId, LayerId>,
    /// Layers a deletion left unused whose directories may still exist:
    /// the only unused layers below `next_layer` a worker removes at
    /// start. Any other is kept, as damage to report: a catalog that lost
    /// an entry of `below` must not cost the layers under it.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub freed: BTreeSet<LayerId>,
    /// Read from a version before 5, which did not record `freed`: every
    /// unused layer is taken as freed, as those versions did.
    #[serde(skip)]
    pub unrecorded_frees: bool,
}

fn first_id() -> u32 {
    1
}

/// `key` as an id, if it is one as the catalog writes ids (so that "07"
/// names no view).
fn decimal_id(key: &str) -> Option<u32> {
    key.parse().ok().filter(|n: &u32| n.to_string() == key)
}

/// The first id of sorted `ids` that follows itself.
fn listed_twice(mut ids: impl Iterator<Item = u32>) -> Option<u32> {
    let mut last = None;
    ids.find(|&id| last.replace(id) == Some(id))
}

/// Takes the next view id of the catalog `change` makes.
fn next_view_id(change: &mut Change) -> u32 {
    change.next_id += 1;
    change.next_id - 1
}

/// Takes the next layer id of the catalog `change` makes.
fn next_layer_id(change: &mut Change) -> LayerId {
    change.next_layer += 1;
    LayerId(change.next_layer - 1)
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
        Ok(Loaded::read(state)?.catalog)
    }

    /// This catalog if nothing in it is damage: an id listed twice or not
    /// below the next (the lists are sorted by id), a `below` that loops,
    /// a layer in use at or above the next id (which would be taken for
    /// the spare).
    fn checked(self, path: &Path) -> Result<Catalog, CatalogError> {
        let invalid = |e: String| Err(CatalogError::Invalid(path.to_owned(), e));
        // A change would replace the record listed with the id it gives.
        for (what, ids) in [
            (
                "snapshot",
                self.snapshots.iter().map(|s| s.id.0).collect::<Vec<_>>(),
            ),
            ("branch", self.branches.iter().map(|b| b.id.0).collect()),
        ] {
            if let Some(id) = listed_twice(ids.iter().copied()) {
                return invalid(format!("{what} id {id} is listed twice"));
            }
            if let Some(id) = ids.last().filter(|&&id| id >= self.next_id) {
                return invalid(format!(
                    "{what} id {id} is not below next_id {}",
                    self.next_id
                ));
            }
        }
        if let Some(l) = self.layer_loop() {
            return invalid(format!(
                "layer {}: the layers below it (\"below\") lead back to it",
                l.0
            ));
        }
        let mut named = self
            .layers_in_use()
            .into_iter()
            .chain(self.below.values().copied());
        if let Some(l) = named.find(|l| l.0 >= self.next_layer) {
            return invalid(format!(
                "layer {} is in use, yet not below next_layer {}",
                l.0, self.next_layer
            ));
        }
        Ok(self)
    }

    pub(crate) fn empty() -> Catalog {
        Catalog {
            format: "agentfs-state".into(),
            version: FORMAT_VERSION,
            main_epoch: 1,
            next_id: 1,
            snapshots: Vec::new(),
            next_layer: 1,
            branches: Vec::new(),
            bindings: Vec::new(),
            below: BTreeMap::new(),
            freed: BTreeSet::new(),
            unrecorded_frees: false,
        }
    }

    /// Replaces `catalog.json` so that a crash leaves either the old or the
    /// new one: temporary file, fsync, rename, fsync of the directory.
    fn write_json(&self, state: &Path) -> Result<(), CatalogError> {
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
        let by_name = self.snapshots.iter().find(|s| s.name == key);
        by_name.or_else(|| self.snapshot(SnapshotId(decimal_id(key)?)))
    }

    /// The branch called `key` (a name, or an id as decimal).
    pub fn find_branch(&self, key: &str) -> Option<&Branch> {
        let by_name = self.branches.iter().find(|b| b.name == key);
        by_name.or_else(|| self.branch(BranchId(decimal_id(key)?)))
    }

    /// The branch with id `id`.
    pub fn branch(&self, id: BranchId) -> Option<&Branch> {
        let i = self.branches.binary_search_by_key(&id, |b| b.id).ok()?;
        Some(&self.branches[i])
    }

    /// The snapshot with id `id`.
    pub fn snapshot(&self, id: SnapshotId) -> Option<&Snapshot> {
        let i = self.snapshots.binary_search_by_key(&id, |s| s.id).ok()?;
        Some(&self.snapshots[i])
    }

    /// A new snapshot of main at the current epoch, which advances: the
    /// snapshot and the change that records it.
    pub fn add(&self, name: String) -> (Snapshot, Change) {
        let mut change = Change::of(self);
        let snap = Snapshot {
            id: SnapshotId(next_view_id(&mut change)),
            name,
            epoch: self.main_epoch,
            created: now(),
            branch: None,
            layer: None,
        };
        change.main_epoch += 1;
        change.snapshots.push(snap.clone());
        (snap, change)
    }

    /// A snapshot of `branch` (which exists): its layers freeze and become
    /// the snapshot's; the branch continues on a new empty layer over them.
    /// The snapshot, the new layer (whose directory the caller creates
    /// before saving) and the change that records them.
    pub fn add_branch_snapshot(
        &self,
        branch: BranchId,
        name: String,
    ) -> (Snapshot, LayerId, Change) {
        let mut change = Change::of(self);
        let layer = next_layer_id(&mut change);
        let mut b = self
            .branch(branch)
            .expect("the caller found the branch")
            .clone();
        let snap = Snapshot {
            id: SnapshotId(next_view_id(&mut change)),
            name,
            epoch: b.epoch,
            created: now(),
            branch: Some(branch),
            layer: Some(b.layer),
        };
        change.below.insert(layer, b.layer);
        b.layer = layer;
        change.branches.push(b);
        change.snapshots.push(snap.clone());
        (snap, layer, change)
    }

    /// A new branch over snapshot `from`, with a new empty layer on top
    /// (the caller creates its directory before saving), and the change
    /// that records it.
    pub fn add_branch(&self, name: String, from: &Snapshot) -> (Branch, Change) {
        let mut change = Change::of(self);
        let layer = next_layer_id(&mut change);
        if let Some(l) = from.layer {
            change.below.insert(layer, l);
        }
        let b = Branch {
            id: BranchId(next_view_id(&mut change)),
            name,
            created: now(),
            snapshot: from.id,
            epoch: from.epoch,
            layer,
        };
        change.branches.push(b.clone());
        (b, change)
    }

    /// The change that makes `bindings` the bindings.
    pub fn with_bindings(&self, bindings: &[Binding]) -> Change {
        let mut change = Change::of(self);
        change.bindings = (self.bindings != bindings).then(|| bindings.to_vec());
        change
    }

    /// The change that forgets freed layers `gone`, whose removal is
    /// durable.
    pub fn forget_freed(&self, gone: &[LayerId]) -> Change {
        let mut change = Change::of(self);
        let mut freed = self.freed.clone();
        for l in gone {
            freed.remove(l);
        }
        change.freed = (freed != self.freed).then_some(freed);
        change
    }

    /// The layers from `top` down, top first, as long as `new` takes
    /// them: it is asked about each in turn, and the first it turns down
    /// ends the walk (the layers below it were walked before).
    pub fn chain_while(
        &self,
        top: Option<LayerId>,
        mut new: impl FnMut(LayerId) -> bool,
    ) -> Vec<LayerId> {
        let mut out = Vec::new();
        let mut at = top;
        while let Some(l) = at.filter(|&l| new(l)) {
            out.push(l);
            // A loop (a catalog read with one is refused: `layer_loop`)
            // ends here: a chain without one has at most one layer more
            // than `below` has entries.
            if out.len() > self.below.len() + 1 {
                break;
            }
            at = self.below.get(&l).copied();
        }
        out
    }

    /// The layer `l` sits on, if it sits on one (not on main).
    pub fn layer_below(&self, l: LayerId) -> Option<LayerId> {
        self.below.get(&l).copied()
    }

    /// A layer whose layers below lead back to it, if any (damage).
    fn layer_loop(&self) -> Option<LayerId> {
        // Layers whose chains are known to end: each is walked once.
        let mut ends = BTreeSet::new();
        for &start in self.below.keys() {
            let mut path = BTreeSet::new();
            let mut at = Some(start);
            while let Some(l) = at.filter(|l| !ends.contains(l)) {
                if !path.insert(l) {
                    return Some(l);
                }
                at = self.below.get(&l).copied();
            }
            ends.extend(path);
        }
        None
    }

    /// Forgets where layers no view uses any more sat (after a view was
    /// removed) and records them as freed. Returns them.
    pub fn free_unused_layers(&mut self, was: &Catalog) -> Vec<LayerId> {
        let used = self.layers_in_use();
        self.below.retain(|l, _| used.contains(l));
        let unused: Vec<LayerId> = was.layers_in_use().difference(&used).copied().collect();
        self.freed.extend(&unused);
        unused
    }

    /// What the directory `layers/<name>` is to this catalog, whose layers
    /// in use are `in_use`.
    pub fn layer_dir(&self, name: &OsStr, in_use: &BTreeSet<LayerId>) -> LayerDir {
        let Some(id) = name.to_str().and_then(|s| s.parse().ok()).map(LayerId) else {
            return LayerDir::NotALayer;
        };
        if in_use.contains(&id) {
            LayerDir::InUse
        } else if id.0 == self.next_layer {
            LayerDir::Next
        } else if id.0 < self.next_layer && (self.unrecorded_frees || self.freed.contains(&id)) {
            LayerDir::Freed
        } else {
            LayerDir::Unexplained
        }
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
        let mut used = BTreeSet::new();
        let tops = self.snapshots.iter().filter_map(|s| s.layer);
        for top in tops.chain(self.branches.iter().map(|b| b.layer)) {
            // Each layer once: views share the layers below their tops.
            self.chain_while(Some(top), |l| used.insert(l));
        }
        used
    }
}

/// A line of the log, or `catalog.json`.
enum Line {
    /// A whole catalog: `catalog.json`, or a line of a version before 5.
    Whole(Catalog),
    /// A change of the catalog before it.
    Change(Change),
}

impl Line {
    /// Parses one text of `path` (for errors), unchecked.
    fn parse(path: &Path, text: &[u8]) -> Result<Line, CatalogError> {
        let invalid = |e: String| CatalogError::Invalid(path.to_owned(), e);
        let mut v: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
        let (format, version) = (v["format"].as_str(), v["version"].as_u64());
        let known =
            |from: u64| version.is_some_and(|n| (from..=FORMAT_VERSION as u64).contains(&n));
        match format {
            Some("agentfs-state") if known(1) => {}
            Some(catalog_change::FORMAT) if known(5) => {
                let c: Change = serde_json::from_value(v).map_err(|e| invalid(e.to_string()))?;
                return Ok(Line::Change(c));
            }
            _ => {
                return Err(invalid(format!(
                    "format {} version {}",
                    v["format"], v["version"]
                )));
            }
        }
        if version < Some(4) {
            lists_to_chain(&mut v).map_err(invalid)?;
        }
        let mut c: Catalog = serde_json::from_value(v).map_err(|e| invalid(e.to_string()))?;
        // Oldest first is id order (ids only grow), which changes keep and
        // look records up by; a list edited out of it is put back in it.
        c.snapshots.sort_by_key(|s| s.id);
        c.branches.sort_by_key(|b| b.id);
        c.unrecorded_frees = version < Some(5);
        c.version = FORMAT_VERSION;
        Ok(Line::Whole(c))
    }
}

/// The catalog as a state directory holds it, and where its log ends.
pub struct Loaded {
    /// The newest catalog: `catalog.json` with the log's lines applied.
    pub catalog: Catalog,
    /// Whether `catalog.log` exists (the state is of format 3 or later).
    logged: bool,
    /// The length of the log up to the end of its last whole line.
    log_valid: u64,
    /// Bytes after it: a line a crash cut off before it was acknowledged.
    pub torn: u64,
}

impl Loaded {
    /// Reads the catalog of `state`: `catalog.json`, then each line of
    /// the log in turn (a change, or a whole catalog in a log of a version
    /// before 5).
    pub fn read(state: &Path) -> Result<Loaded, CatalogError> {
        let path = state.join(CATALOG);
        let mut catalog = match fs::read(&path) {
            Ok(text) => match Line::parse(&path, &text)? {
                Line::Whole(c) => c,
                Line::Change(_) => {
                    return Err(CatalogError::Invalid(
                        path,
                        "a change, not a catalog".into(),
                    ));
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Catalog::empty(),
            Err(e) => return Err(CatalogError::Io(path, e)),
        };
        let json = path;
        let path = state.join(LOG);
        let log = match fs::read(&path) {
            Ok(log) => log,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Loaded {
                    catalog: catalog.checked(&json)?,
                    logged: false,
                    log_valid: 0,
                    torn: 0,
                });
            }
            Err(e) => return Err(CatalogError::Io(path, e)),
        };
        // Whole lines end with a newline. A crash can leave the last one
        // cut, or of the right length with pages of zeros inside: that
        // line was never acknowledged (each is flushed before its change
        // is), so the ones before stand. A bad line before the last, or a
        // last line of well-formed JSON that is no line of this format (a
        // newer worker's, which must not be cut off), is damage.
        let mut valid = 0;
        let mut start = 0;
        let lines = log.iter().enumerate().filter(|&(_, &b)| b == b'\n');
        let ends: Vec<usize> = lines.map(|(i, _)| i + 1).collect();
        for (n, &end) in ends.iter().enumerate() {
            let line = &log[start..end];
            match Line::parse(&path, line) {
                Ok(Line::Whole(c)) => catalog = c,
                Ok(Line::Change(c)) => c.apply_to(&mut catalog),
                Err(_) if n + 1 == ends.len() && !whole_json(line) => break,
                Err(e) => {
                    return Err(CatalogError::Invalid(path, format!("line {}: {e}", n + 1)));
                }
            }
            valid = end;
            start = end;
        }
        // Damage is named where it comes from: the log if it had a line.
        let source = if valid > 0 { path } else { json };
        Ok(Loaded {
            catalog: catalog.checked(&source)?,
            logged: true,
            log_valid: valid as u64,
            torn: (log.len() - valid) as u64,
        })
    }
}

/// Turns a catalog of version 3 or older, whose snapshots and branches
/// list all their layers (`"layers"`, top first), into version 4's: each
/// names its top layer (`"layer"`), and `"below"` where each layer sits.
fn lists_to_chain(v: &mut serde_json::Value) -> Result<(), String> {
    let mut below = serde_json::Map::new();
    // Layers some view lists last: they sit on main in every view.
    let mut bottoms = Vec::new();
    for kind in ["snapshots", "branches"] {
        let Some(views) = v.get_mut(kind).and_then(|x| x.as_array_mut()) else {
            continue;
        };
        for view in views {
            let Some(obj) = view.as_object_mut() else {
                continue;
            };
            let layers = match obj.remove("layers") {
                Some(serde_json::Value::Array(l)) => l,
                None => Vec::new(),
                Some(other) => return Err(format!("{kind}: \"layers\" is {other}")),
            };
            if let Some(top) = layers.first() {
                obj.insert("layer".into(), top.clone());
            }
            bottoms.extend(layers.last().map(|l| l.to_string()));
            for pair in layers.windows(2) {
                let key = pair[0].to_string();
                match below.get(&key) {
                    Some(was) if *was != pair[1] => {
                        return Err(format!(
                            "layer {key} sits on {was} in one view and on {} in another",
                            pair[1]
                        ));
                    }
                    _ => {
                        below.insert(key, pair[1].clone());
                    }
                }
            }
        }
    }
    if let Some(l) = bottoms.iter().find(|l| below.contains_key(*l)) {
        return Err(format!(
            "layer {l} sits on main in one view and on {} in another",
            below[l]
        ));
    }
    v["below"] = serde_json::Value::Object(below);
    Ok(())
}

/// Whether `line` is well-formed JSON, without the zeros of pages a crash
/// did not write.
fn whole_json(line: &[u8]) -> bool {
    !line.contains(&0) && serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

/// Writes each change of the catalog with one flush: appended to
/// `catalog.log` and fdatasync'd, folded into `catalog.json` once the log
/// is long.
pub struct CatalogWriter {
    state: PathBuf,
    /// The log, once started (the state is then of format 3 or later).
    log: Option<File>,
    /// Its length.
    len: u64,
    /// Set when a failed append could not be cut off (and flushed): the
    /// next save cuts first, as a crash could otherwise bring that line
    /// back as the catalog.
    uncut: bool,
    /// [`LOG_LIMIT`] (lower in tests).
    limit: u64,
}

impl CatalogWriter {
    /// The writer of `state`, whose catalog was `loaded`: a line a crash
    /// cut off the log is cut off the file, so that the next one starts on
    /// a line of its own.
    pub fn open(state: &Path, loaded: &Loaded) -> Result<CatalogWriter, CatalogError> {
        let path = state.join(LOG);
        let log = if loaded.logged {
            let log = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| CatalogError::Io(path.clone(), e))?;
            if loaded.torn > 0 {
                log.set_len(loaded.log_valid)
                    .and_then(|()| log.sync_data())
                    .map_err(|e| CatalogError::Io(path.clone(), e))?;
            }
            Some(log)
        } else {
            None
        };
        Ok(CatalogWriter {
            state: state.to_owned(),
            log,
            len: loaded.log_valid,
            uncut: false,
            limit: LOG_LIMIT,
        })
    }

    /// Saves `change` of the catalog `c` (the catalog as saved last),
    /// durably, or leaves the old one: on success the caller applies it.
    pub fn save(&mut self, c: &Catalog, change: &Change) -> Result<(), CatalogError> {
        let mut line = serde_json::to_vec(change).expect("a change serializes");
        line.push(b'\n');
        // A start replays the whole log: folded at the limit, or once it
        // holds eight changes this long (thousands of bindings).
        let limit = self.limit.max(8 * line.len() as u64);
        match &self.log {
            Some(_) if self.len + line.len() as u64 <= limit => self.append(&line),
            _ => {
                // Once per megabyte of changes: the only copy of the catalog.
                let mut whole = c.clone();
                change.clone().apply_to(&mut whole);
                self.fold(&whole, &line)
            }
        }
    }

    /// Appends one line and flushes it; on failure the log is cut back,
    /// durably (a line written whole but not known flushed may be on disk
    /// and would win at the next start), or else before the next append.
    fn append(&mut self, line: &[u8]) -> Result<(), CatalogError> {
        let log = self.log.as_ref().expect("the log is started");
        let cut = |log: &File| log.set_len(self.len).and_then(|()| log.sync_data());
        let mut r = Ok(());
        if self.uncut {
            r = cut(log);
            self.uncut = r.is_err();
        }
        let r = r
            .and_then(|()| log.write_all_at(line, self.len))
            .and_then(|()| log.sync_data());
        if let Err(e) = r {
            // ENOSPC or EIO: the old catalog stands.
            self.uncut = cut(log).is_err();
            return Err(CatalogError::Io(self.state.join(LOG), e));
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Folds the log into `catalog.json` with `c` last. The log replayed
    /// over `catalog.json` gives `c` throughout: `c`'s change is appended
    /// first (the change is then made), then `catalog.json` replaced by
    /// `c` (over which the log's changes give `c` again: each says what a
    /// part of the catalog is, not how it moved), then the log emptied.
    /// The first fold starts the log instead, after a
    /// `catalog.json` of this format (the change is then made), which an
    /// older worker refuses instead of missing what the log holds.
    fn fold(&mut self, c: &Catalog, line: &[u8]) -> Result<(), CatalogError> {
        let started = self.log.is_some();
        if started {
            self.append(line)?;
        } else {
            c.write_json(&self.state)?;
        }
        // The change is durable: what fails from here only leaves the log
        // longer, to be folded at the next change.
        if let Err(e) = self.finish_fold(c, started) {
            tracing::warn!("the catalog log could not be folded (the change is saved): {e}");
        }
        Ok(())
    }

    fn finish_fold(&mut self, c: &Catalog, started: bool) -> Result<(), CatalogError> {
        let path = self.state.join(LOG);
        let io = |e| CatalogError::Io(path.clone(), e);
        if started {
            c.write_json(&self.state)?;
            // Flushed, or the next line could land on the old ones.
            let log = self.log.as_ref().expect("started");
            log.set_len(0).and_then(|()| log.sync_data()).map_err(io)?;
        } else {
            let log = File::create(&path).map_err(io)?;
            File::open(&self.state)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            self.log = Some(log);
        }
        self.len = 0;
        Ok(())
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A reproducible stream of numbers below the bound asked for each
/// time (xorshift from `seed`), for tests of random changes.
#[cfg(test)]
pub(crate) fn random_below(mut seed: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Catalog {
        /// The layers of a view whose top layer is `top`, top first.
        fn layers(&self, top: Option<LayerId>) -> Vec<LayerId> {
            self.chain_while(top, |_| true)
        }

        /// The layers of branch `b`, top first.
        fn branch_layers(&self, b: &Branch) -> Vec<LayerId> {
            self.layers(Some(b.layer))
        }
    }

    /// Parses and checks one whole catalog text.
    fn parse(path: &Path, text: &[u8]) -> Result<Catalog, CatalogError> {
        match Line::parse(path, text)? {
            Line::Whole(c) => c.checked(path),
            Line::Change(_) => panic!("a change, not a whole catalog"),
        }
    }

    fn writer(state: &Path) -> CatalogWriter {
        CatalogWriter::open(state, &Loaded::read(state).unwrap()).unwrap()
    }

    fn names(state: &Path) -> Vec<String> {
        let c = Loaded::read(state).unwrap().catalog;
        c.snapshots.into_iter().map(|s| s.name).collect()
    }

    fn append_raw(state: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new()
            .append(true)
            .open(state.join(LOG))
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    /// Saves snapshots `names` one by one, each a change of its own.
    fn save_all(w: &mut CatalogWriter, c: &mut Catalog, names: &[&str]) {
        for n in names {
            let (_, change) = c.add(n.to_string());
            w.save(c, &change).unwrap();
            change.apply_to(c);
        }
    }

    /// Saves what `edit` changes of `c`, as a deletion does.
    fn save_edit(w: &mut CatalogWriter, c: &mut Catalog, edit: impl FnOnce(&mut Catalog)) {
        let mut next = c.clone();
        edit(&mut next);
        w.save(c, &Change::between(c, &next)).unwrap();
        *c = next;
    }

    #[test]
    fn the_first_change_writes_the_format_then_changes_are_log_lines() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::empty();
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &["a", "b", "c"]);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(d.path().join(CATALOG)).unwrap()).unwrap();
        assert_eq!(json["version"], FORMAT_VERSION);
        assert_eq!(json["snapshots"].as_array().unwrap().len(), 1);
        let log = fs::read_to_string(d.path().join(LOG)).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
        assert_eq!(names(d.path()), ["a", "b", "c"]);
    }

    /// Each line is what changed, not the whole catalog: it stays short
    /// however many snapshots there are. Over a catalog of version 4,
    /// which recorded no freed layers, the first change starts recording
    /// them.
    #[test]
    fn log_lines_are_changes_that_stay_short() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::empty();
        let names: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &names);
        let log = fs::read_to_string(d.path().join(LOG)).unwrap();
        let longest = log.lines().map(str::len).max().unwrap();
        assert!(longest < 300, "{longest} bytes: {log}");
        assert_eq!(Loaded::read(d.path()).unwrap().catalog.snapshots.len(), 300);

        let mut v: serde_json::Value = serde_json::to_value(&c).unwrap();
        v["version"] = 4.into();
        fs::write(d.path().join(CATALOG), v.to_string()).unwrap();
        fs::write(d.path().join(LOG), b"").unwrap();
        let loaded = Loaded::read(d.path()).unwrap();
        assert!(loaded.catalog.unrecorded_frees);
        save_all(&mut writer(d.path()), &mut c, &["after"]);
        let loaded = Loaded::read(d.path()).unwrap();
        assert!(!loaded.catalog.unrecorded_frees);
        assert_eq!(loaded.catalog.snapshots.len(), 301);
    }

    /// A change whose line could not be written leaves the catalog as it
    /// was (the caller applies a change only once saved), and the next
    /// change goes on from it: read back, the state is the catalog in
    /// memory.
    #[test]
    fn a_failed_save_changes_nothing_and_the_next_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::empty();
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &["a", "b"]);
        let log = w.log.take().unwrap();
        // Read-only: the append fails, and so does the cut after it.
        w.log = Some(File::open(d.path().join(LOG)).unwrap());
        let (_, change) = c.add("lost".into());
        assert!(w.save(&c, &change).is_err());
        assert!(w.uncut);
        // A line written whole but not known flushed is what the next
        // save cuts off first; here the bytes of one.
        append_raw(d.path(), b"{\"format\":\"agentfs-change\"");
        w.log = Some(log);
        save_all(&mut w, &mut c, &["c"]);
        assert!(!w.uncut);
        let read = Loaded::read(d.path()).unwrap();
        assert_eq!(read.torn, 0);
        assert_eq!(
            serde_json::to_value(&read.catalog).unwrap(),
            serde_json::to_value(&c).unwrap()
        );
        assert_eq!(names(d.path()), ["a", "b", "c"]);
    }

    /// A fold a crash cut short after `catalog.json` was replaced, before
    /// the log was emptied: the log's changes, applied over the catalog
    /// they produced, give it again.
    #[test]
    fn a_fold_cut_short_reads_the_same_catalog() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::empty();
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &["a", "b", "c", "d"]);
        save_edit(&mut w, &mut c, |c| c.snapshots.retain(|s| s.name != "b"));
        save_all(&mut w, &mut c, &["e"]);
        assert!(
            fs::read_to_string(d.path().join(LOG))
                .unwrap()
                .lines()
                .count()
                >= 4
        );
        c.write_json(d.path()).unwrap();
        assert_eq!(names(d.path()), ["a", "c", "d", "e"]);
        // And the next change goes on from there.
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &["f"]);
        assert_eq!(names(d.path()), ["a", "c", "d", "e", "f"]);
    }

    #[test]
    fn a_line_cut_by_a_crash_is_skipped_and_cut_off_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::empty();
        save_all(&mut writer(d.path()), &mut c, &["a", "b"]);
        // Cut short, and of full length with a page of zeros inside.
        for torn in [&b"{\"format\":\"agentfs-st"[..], &[0u8; 300]] {
            append_raw(d.path(), torn);
            let loaded = Loaded::read(d.path()).unwrap();
            assert_eq!(loaded.torn, torn.len() as u64);
            assert_eq!(names(d.path()), ["a", "b"]);
            let mut w = writer(d.path());
            assert_eq!(Loaded::read(d.path()).unwrap().torn, 0);
            save_all(&mut w, &mut c, &["c"]);
            save_edit(&mut w, &mut c, |c| {
                c.snapshots.pop();
            });
        }
        // A whole line of a newer format is not cut off as torn.
        let newer = fs::read_to_string(d.path().join(LOG)).unwrap();
        let newer = newer.lines().last().unwrap().replace(
            &format!("\"version\":{FORMAT_VERSION}"),
            &format!("\"version\":{}", FORMAT_VERSION + 1),
        );
        append_raw(d.path(), format!("{newer}\n").as_bytes());
        let e = Loaded::read(d.path()).err().expect("a newer format");
        let want = format!("version {}", FORMAT_VERSION + 1);
        assert!(e.to_string().contains(&want), "{e}");
        let log = fs::read(d.path().join(LOG)).unwrap();
        fs::write(d.path().join(LOG), &log[..log.len() - newer.len() - 1]).unwrap();
        assert_eq!(names(d.path()), ["a", "b"]);
        append_raw(d.path(), b"\0\0\0\n");
        assert_eq!(names(d.path()), ["a", "b"], "a whole line of zeros");
        // Two bad lines are not a crash's doing.
        append_raw(d.path(), b"{}\n");
        let e = Loaded::read(d.path()).err().expect("damage");
        assert!(e.to_string().contains("catalog.log"), "{e}");
    }

    /// Changes find records by id in lists kept in id order: a list out
    /// of order is put back in it when read, and an id listed twice is
    /// damage (a change would replace one of the two).
    #[test]
    fn records_are_read_in_id_order_and_an_id_twice_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = |ids: [u32; 3]| {
            let snaps: Vec<String> = ids
                .iter()
                .map(|i| format!(r#"{{"id":{i},"name":"s{i}","epoch":1,"created":1}}"#))
                .collect();
            format!(
                r#"{{"format":"agentfs-state","version":5,"main_epoch":2,"next_id":9,
                "snapshots":[{}],"next_layer":1}}"#,
                snaps.join(",")
            )
        };
        fs::write(d.path().join(CATALOG), text([5, 2, 7])).unwrap();
        fs::write(d.path().join(LOG), b"").unwrap();
        let mut c = Loaded::read(d.path()).unwrap().catalog;
        let ids = |c: &Catalog| c.snapshots.iter().map(|s| s.id.0).collect::<Vec<_>>();
        assert_eq!(ids(&c), [2, 5, 7]);
        assert_eq!(c.find("5").unwrap().name, "s5");
        assert!(c.find("05").is_none(), "ids are written without zeros");
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &["new"]);
        save_edit(&mut w, &mut c, |c| c.snapshots.retain(|s| s.id.0 != 5));
        let read = Loaded::read(d.path()).unwrap().catalog;
        assert_eq!(ids(&read), [2, 7, 9]);
        assert_eq!(ids(&read), ids(&c));

        fs::write(d.path().join(CATALOG), text([5, 2, 5])).unwrap();
        fs::write(d.path().join(LOG), b"").unwrap();
        let e = Loaded::read(d.path()).err().expect("an id twice");
        assert!(
            e.to_string().contains("snapshot id 5 is listed twice"),
            "{e}"
        );
    }

    /// A catalog of version 3 lists every layer of each view: read, each
    /// view names its top layer and the layers below are kept once.
    #[test]
    fn a_version_3_catalog_becomes_layer_chains() {
        let v3 = br#"{"format":"agentfs-state","version":3,"main_epoch":2,"next_id":6,
            "snapshots":[{"id":1,"name":"clean","epoch":1,"created":1},
              {"id":4,"name":"a1","epoch":1,"created":3,"branch":2,"layers":[1]},
              {"id":5,"name":"a2","epoch":1,"created":4,"branch":2,"layers":[4,1]}],
            "next_layer":6,
            "branches":[{"id":2,"name":"a","created":2,"snapshot":1,"epoch":1,"layers":[5,4,1]},
              {"id":3,"name":"b","created":2,"snapshot":1,"epoch":1,"layers":[2]}],
            "bindings":[]}"#;
        let c = parse(Path::new("catalog.json"), v3).unwrap();
        let layers = |top| c.layers(top).into_iter().map(|l| l.0).collect::<Vec<_>>();
        assert_eq!(layers(c.snapshots[0].layer), Vec::<u32>::new());
        assert_eq!(layers(c.snapshots[1].layer), [1]);
        assert_eq!(layers(c.snapshots[2].layer), [4, 1]);
        assert_eq!(layers(Some(c.branches[0].layer)), [5, 4, 1]);
        assert_eq!(layers(Some(c.branches[1].layer)), [2]);
        assert_eq!(c.below.len(), 2);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["version"], FORMAT_VERSION);
        assert!(json["branches"][0].get("layers").is_none(), "{json}");
        // Lists that disagree on what a layer sits on are damage.
        let bad = String::from_utf8(v3.to_vec())
            .unwrap()
            .replace("\"layers\":[4,1]", "\"layers\":[4,2]");
        let e = parse(Path::new("catalog.json"), bad.as_bytes()).err();
        assert!(e.expect("damage").to_string().contains("layer 4 sits on"));
        let bad = String::from_utf8(v3.to_vec())
            .unwrap()
            .replace("\"layers\":[1]", "\"layers\":[4]");
        let e = parse(Path::new("catalog.json"), bad.as_bytes()).err();
        let e = e.expect("damage").to_string();
        assert!(e.contains("layer 4 sits on main in one view"), "{e}");
    }

    /// Layer chains against a model that keeps every view's whole list:
    /// snapshots and branches made and deleted at random, each layer
    /// listed in use exactly while a model list holds it.
    #[test]
    fn layer_chains_match_whole_lists() {
        let mut c = Catalog::empty();
        // Every view's layers in full, by view id.
        let mut model: BTreeMap<u32, Vec<LayerId>> = BTreeMap::new();
        let mut next = random_below(0x2545_f491_4f6c_dd1d);
        for step in 0..3000 {
            let name = format!("v{step}");
            let was = c.clone();
            let mut freed = Vec::new();
            match next(6) {
                0 => {
                    let (s, change) = c.add(name);
                    change.apply_to(&mut c);
                    model.insert(s.id.0, Vec::new());
                }
                1 | 2 if !c.branches.is_empty() => {
                    let b = c.branches[next(c.branches.len())].id;
                    let (s, layer, change) = c.add_branch_snapshot(b, name);
                    change.apply_to(&mut c);
                    let below = model[&b.0].clone();
                    model.insert(s.id.0, below.clone());
                    model.insert(b.0, std::iter::once(layer).chain(below).collect());
                }
                3 if !c.snapshots.is_empty() => {
                    let from = c.snapshots[next(c.snapshots.len())].clone();
                    let (b, change) = c.add_branch(name, &from);
                    change.apply_to(&mut c);
                    let below = model[&from.id.0].clone();
                    model.insert(b.id.0, std::iter::once(b.layer).chain(below).collect());
                }
                4 if !c.snapshots.is_empty() => {
                    let s = c.snapshots.remove(next(c.snapshots.len()));
                    model.remove(&s.id.0);
                    freed = c.free_unused_layers(&was);
                }
                5 if !c.branches.is_empty() => {
                    let b = c.branches.remove(next(c.branches.len()));
                    model.remove(&b.id.0);
                    freed = c.free_unused_layers(&was);
                }
                _ => continue,
            }
            for s in &c.snapshots {
                assert_eq!(c.layers(s.layer), model[&s.id.0], "snapshot {}", s.id.0);
            }
            for b in &c.branches {
                assert_eq!(c.branch_layers(b), model[&b.id.0], "branch {}", b.id.0);
            }
            let used: BTreeSet<LayerId> = model.values().flatten().copied().collect();
            assert_eq!(c.layers_in_use(), used, "step {step}");
            assert!(c.below.keys().all(|l| used.contains(l)), "step {step}");
            // A deletion frees exactly the layers it leaves unused; a start
            // removes those, and no other unused layer below the next.
            let was_used = was.layers_in_use();
            let want: Vec<LayerId> = was_used.difference(&used).copied().collect();
            assert_eq!(freed, want, "step {step}");
            assert!(freed.iter().all(|l| c.freed.contains(l)), "step {step}");
            for l in (1..c.next_layer).map(LayerId) {
                let dir = c.layer_dir(OsStr::new(&l.0.to_string()), &used);
                let expected = if used.contains(&l) {
                    LayerDir::InUse
                } else if c.freed.contains(&l) {
                    LayerDir::Freed
                } else {
                    LayerDir::Unexplained
                };
                assert_eq!(dir, expected, "layer {} at step {step}", l.0);
            }
            // Their directories went: a start forgets them.
            if next(4) == 0 {
                c.freed.clear();
            }
        }
        assert_eq!(c.layer_loop(), None);
        // A loop (damage) is found, ends a chain, and refuses the catalog.
        let mut looped = c.clone();
        looped.below.insert(LayerId(1), LayerId(2));
        looped.below.insert(LayerId(2), LayerId(1));
        assert!(looped.layer_loop().is_some());
        assert!(looped.layers(Some(LayerId(1))).len() <= looped.below.len() + 2);
        let text = serde_json::to_vec(&looped).unwrap();
        let e = parse(Path::new("catalog.json"), &text).err();
        assert!(e.expect("damage").to_string().contains("lead back to it"));
        // A layer in use at the next id (damage) would be taken for the
        // spare: refused.
        let mut ahead = c.clone();
        ahead.next_layer = c.branches.first().expect("branches were left").layer.0;
        let text = serde_json::to_vec(&ahead).unwrap();
        let e = parse(Path::new("catalog.json"), &text).err();
        assert!(
            e.expect("damage")
                .to_string()
                .contains("not below next_layer")
        );
        // Beyond the next layer, and names no layer has.
        let none = BTreeSet::new();
        let next_dir = |n: u32| c.layer_dir(OsStr::new(&n.to_string()), &none);
        assert_eq!(next_dir(c.next_layer), LayerDir::Next);
        assert_eq!(next_dir(c.next_layer + 1), LayerDir::Unexplained);
        assert_eq!(c.layer_dir(OsStr::new("7.old"), &none), LayerDir::NotALayer);
        // The catalog reads back as it was written.
        let text = serde_json::to_vec(&c).unwrap();
        let back = parse(Path::new("catalog.json"), &text).unwrap();
        assert_eq!(back.below, c.below);
        assert_eq!(back.layers_in_use(), c.layers_in_use());
    }

    #[test]
    fn a_long_log_is_folded_into_catalog_json() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Catalog::empty();
        let mut w = writer(d.path());
        save_all(&mut w, &mut c, &["a", "b"]);
        w.limit = 0; // folds at eight times the line's length
        let more: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
        let more: Vec<&str> = more.iter().map(String::as_str).collect();
        save_all(&mut w, &mut c, &more);
        let json = parse(
            &d.path().join(CATALOG),
            &fs::read(d.path().join(CATALOG)).unwrap(),
        )
        .unwrap();
        assert!(json.snapshots.len() > 2, "folded");
        let log = fs::read(d.path().join(LOG)).unwrap();
        assert!(log.len() < 8 * 2000, "{} bytes", log.len());
        assert_eq!(names(d.path()).len(), 32);
        assert_eq!(names(d.path())[31], "s29");
        // Appends after a fold.
        save_all(&mut w, &mut c, &["k"]);
        assert_eq!(names(d.path()).len(), 33);
    }
}
