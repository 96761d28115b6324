//! One change of the catalog, as a line of `catalog.log` holds it: what
//! differs from the catalog before, not the whole catalog. Each line used
//! to be the whole catalog (~100 bytes per snapshot), so that a snapshot's
//! creation wrote and flushed 150 KiB with 1 000 snapshots; a change is a
//! few hundred bytes whatever the catalog's size (specs/state-format.md).
//!
//! Every field says what a part of the catalog *is* after the change (a
//! record by id, an entry of `below`, a whole list), never how to move
//! from the old value: applying a change twice, or the changes up to a
//! catalog to that catalog again (a fold a crash cut short), gives the
//! same catalog.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::binding::Binding;
use crate::snapshot::{Branch, BranchId, Catalog, FORMAT_VERSION, LayerId, Snapshot, SnapshotId};

/// The `format` of a change line.
pub const FORMAT: &str = "agentfs-change";

/// A change of the catalog: made by the catalog's hot changes
/// (`Catalog::add` and the like) as they plan it, or found by comparing
/// two catalogs ([`Change::between`]) for the rare ones (deletions).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Always [`FORMAT`].
    format: String,
    /// The catalog's format version it belongs to.
    version: u32,
    /// Main's epoch after the change.
    pub(crate) main_epoch: u64,
    /// The next view id after the change.
    pub(crate) next_id: u32,
    /// The next layer id after the change.
    pub(crate) next_layer: u32,
    /// Snapshots added or changed, as they are now (new ones last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) snapshots: Vec<Snapshot>,
    /// Snapshots removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    snapshots_gone: Vec<SnapshotId>,
    /// Branches added or changed, as they are now (new ones last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) branches: Vec<Branch>,
    /// Branches removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    branches_gone: Vec<BranchId>,
    /// Entries of `below` added or changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) below: BTreeMap<LayerId, LayerId>,
    /// Entries of `below` removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    below_gone: Vec<LayerId>,
    /// `freed`, whole, if it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) freed: Option<BTreeSet<LayerId>>,
    /// The bindings, whole, if they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) bindings: Option<Vec<Binding>>,
}

impl Change {
    /// A change of `c` that changes nothing yet: its scalars as they are,
    /// for the caller to fill in.
    pub fn of(c: &Catalog) -> Change {
        Change {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            main_epoch: c.main_epoch,
            next_id: c.next_id,
            next_layer: c.next_layer,
            snapshots: Vec::new(),
            snapshots_gone: Vec::new(),
            branches: Vec::new(),
            branches_gone: Vec::new(),
            below: BTreeMap::new(),
            below_gone: Vec::new(),
            freed: None,
            bindings: None,
        }
    }

    /// What turns `was` into `now`: linear in the catalog's size, for
    /// changes that are linear anyway.
    pub fn between(was: &Catalog, now: &Catalog) -> Change {
        let mut change = Change::of(now);
        (change.snapshots, change.snapshots_gone) =
            records(&was.snapshots, &now.snapshots, |s| s.id);
        (change.branches, change.branches_gone) = records(&was.branches, &now.branches, |b| b.id);
        let (was_below, now_below) = (&was.below, &now.below);
        change.below = now_below
            .iter()
            .filter(|&(l, b)| was_below.get(l) != Some(b))
            .map(|(&l, &b)| (l, b))
            .collect();
        change.below_gone = was_below
            .keys()
            .filter(|l| !now_below.contains_key(l))
            .copied()
            .collect();
        change.freed = (was.freed != now.freed).then(|| now.freed.clone());
        change.bindings = (was.bindings != now.bindings).then(|| now.bindings.clone());
        change
    }

    /// Makes `c` what the change says.
    pub fn apply_to(self, c: &mut Catalog) {
        c.main_epoch = self.main_epoch;
        c.next_id = self.next_id;
        c.next_layer = self.next_layer;
        put(
            &mut c.snapshots,
            self.snapshots,
            &self.snapshots_gone,
            |s| s.id,
        );
        put(&mut c.branches, self.branches, &self.branches_gone, |b| {
            b.id
        });
        c.below.extend(self.below);
        for l in &self.below_gone {
            c.below.remove(l);
        }
        c.unrecorded_frees = false;
        if let Some(freed) = self.freed {
            c.freed = freed;
        }
        if let Some(bindings) = self.bindings {
            c.bindings = bindings;
        }
    }
}

/// The records of `now` that `was` does not hold as they are, and the ids
/// of those of `was` that `now` has not.
fn records<T: Clone + PartialEq, K: std::hash::Hash + Eq>(
    was: &[T],
    now: &[T],
    id: impl Fn(&T) -> K,
) -> (Vec<T>, Vec<K>) {
    let old: HashMap<K, &T> = was.iter().map(|r| (id(r), r)).collect();
    let new: HashMap<K, &T> = now.iter().map(|r| (id(r), r)).collect();
    let changed = now.iter().filter(|r| old.get(&id(r)) != Some(r)).cloned();
    let gone = was.iter().map(&id).filter(|k| !new.contains_key(k));
    (changed.collect(), gone.collect())
}

/// Removes the records of `list` with ids `gone`, then puts each of
/// `records` in place of the one with its id, or where its id sorts (last,
/// for a new one: ids only grow). `list` is sorted by id, as a catalog's
/// lists are once read ([`Catalog`]'s invariant): each record costs a
/// binary search, not a pass over the list.
fn put<T, K: Ord>(list: &mut Vec<T>, records: Vec<T>, gone: &[K], id: impl Fn(&T) -> K) {
    for k in gone {
        if let Ok(i) = list.binary_search_by(|r| id(r).cmp(k)) {
            list.remove(i);
        }
    }
    for r in records {
        match list.binary_search_by(|x| id(x).cmp(&id(&r))) {
            Ok(i) => list[i] = r,
            Err(i) => list.insert(i, r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::Subject;

    fn json(c: &Catalog) -> serde_json::Value {
        serde_json::to_value(c).unwrap()
    }

    /// Random changes of every kind: each change, applied to the catalog
    /// before it, gives the catalog after it, through its JSON line; and
    /// all of them replayed over the last catalog give it again (a fold a
    /// crash cut short between `catalog.json` and emptying the log).
    #[test]
    fn changes_replayed_give_the_catalog_back() {
        let mut c = Catalog::empty();
        let first = c.clone();
        let mut lines = Vec::new();
        let mut made = [0; 9];
        let mut next = crate::snapshot::random_below(0x9e37_79b9_7f4a_7c15);
        for step in 0..2000 {
            let was = c.clone();
            let name = format!("v{step}");
            // The hot changes as the worker plans them; deletions found
            // by comparing the catalog with an edited copy.
            let deletion = |remove: &dyn Fn(&mut Catalog)| {
                let mut next = was.clone();
                remove(&mut next);
                next.free_unused_layers(&was);
                (Change::between(&was, &next), Some(next))
            };
            let kind = next(9);
            let (change, edited) = match kind {
                0 => (c.add(name).1, None),
                1 | 2 if !c.branches.is_empty() => {
                    let b = c.branches[next(c.branches.len())].id;
                    (c.add_branch_snapshot(b, name).2, None)
                }
                3 if !c.snapshots.is_empty() => {
                    let from = c.snapshots[next(c.snapshots.len())].clone();
                    (c.add_branch(name, &from).1, None)
                }
                4 if !c.snapshots.is_empty() => {
                    let i = next(c.snapshots.len());
                    deletion(&|c| {
                        c.snapshots.remove(i);
                    })
                }
                5 if !c.branches.is_empty() => {
                    let i = next(c.branches.len());
                    deletion(&|c| {
                        c.branches.remove(i);
                    })
                }
                6 if !c.branches.is_empty() => {
                    let branch = c.branches[next(c.branches.len())].id;
                    let path = format!("/agents/{step}");
                    let mut bindings = c.bindings.clone();
                    bindings.push(Binding {
                        subject: Subject::Cgroup { path },
                        branch,
                    });
                    (c.with_bindings(&bindings), None)
                }
                7 => {
                    let kept: Vec<Binding> = c
                        .bindings
                        .iter()
                        .filter(|_| next(2) == 0)
                        .cloned()
                        .collect();
                    (c.with_bindings(&kept), None)
                }
                8 if !c.freed.is_empty() => {
                    // Freed layers whose directories went.
                    let gone: Vec<LayerId> =
                        c.freed.iter().copied().filter(|_| next(2) == 0).collect();
                    (c.forget_freed(&gone), None)
                }
                _ => continue,
            };
            made[kind] += 1;
            change.clone().apply_to(&mut c);
            if let Some(edited) = edited {
                assert_eq!(json(&c), json(&edited), "step {step}");
            }
            // A planned change is the one comparing copies finds.
            let found = Change::between(&was, &c);
            let as_json = |ch: &Change| serde_json::to_value(ch).unwrap();
            assert_eq!(as_json(&change), as_json(&found), "step {step}");
            let line = serde_json::to_string(&change).unwrap();
            assert!(
                line.len() < 2000 + 60 * c.bindings.len(),
                "step {step}: {line}"
            );
            let read: Change = serde_json::from_str(&line).unwrap();
            let mut replayed = was;
            read.apply_to(&mut replayed);
            assert_eq!(json(&replayed), json(&c), "step {step}: {line}");
            lines.push(line);
        }
        assert!(
            made.iter().all(|&n| n > 50),
            "changes of each kind: {made:?}"
        );
        for from in [first, c.clone()] {
            let mut replayed = from;
            for line in &lines {
                serde_json::from_str::<Change>(line)
                    .unwrap()
                    .apply_to(&mut replayed);
            }
            assert_eq!(json(&replayed), json(&c));
        }
    }
}
