//! `agentfs-mount-worker --check`: verifies a state directory against
//! specs/state-format.md without changing anything, and reports what is
//! wrong (damage) apart from what is merely garbage (left by a crash and
//! removed by the next worker or snapshot deletion).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;

use crate::control::validate_name;
use crate::hostfs::HostHandle;
use crate::preserve::{EntryRec, Meta};
use crate::snapshot::{Catalog, LayerDir, Loaded, SnapshotId};

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Damage: the state does not say what it should.
    pub problems: Vec<String>,
    /// Leftovers that are safe to remove.
    pub garbage: Vec<String>,
    /// Snapshots and pre-images checked.
    pub snapshots: usize,
    /// Pre-images checked.
    pub preimages: usize,
    /// Branches checked.
    pub branches: usize,
    /// Layer directories checked.
    pub layers: usize,
}

/// Checks the state directory `state`.
pub fn check(state: &Path) -> io::Result<Report> {
    let mut r = Report::default();
    let catalog = match Loaded::read(state) {
        Ok(l) => {
            if l.torn > 0 {
                r.garbage.push(format!(
                    "catalog.log: {} bytes after the last good line: an interrupted catalog write",
                    l.torn
                ));
            }
            Some(l.catalog)
        }
        Err(e) => {
            r.problems.push(e.to_string());
            None
        }
    };
    if state.join("catalog.json.tmp").exists() {
        r.garbage
            .push("catalog.json.tmp: an interrupted catalog write".into());
    }
    let mut live_epochs = Vec::new();
    if let Some(c) = &catalog {
        let (mut names, mut ids) = (HashSet::new(), HashSet::new());
        for s in &c.snapshots {
            r.snapshots += 1;
            let what = format!("snapshot {:?} (id {})", s.name, s.id.0);
            if let Err(e) = validate_name("snapshot", &s.name) {
                r.problems.push(format!("{what}: {}", e.message));
            }
            if !names.insert(s.name.clone()) {
                r.problems.push(format!("{what}: the name is used twice"));
            }
            if !ids.insert(s.id) || s.id.0 >= c.next_id || s.id.0 == 0 {
                r.problems.push(format!(
                    "{what}: id is duplicated or not below next_id {}",
                    c.next_id
                ));
            }
            if s.epoch == 0 || s.epoch >= c.main_epoch {
                r.problems.push(format!(
                    "{what}: epoch {} is not below main's epoch {}",
                    s.epoch, c.main_epoch
                ));
            }
            live_epochs.push(s.epoch);
        }
        for b in &c.branches {
            r.branches += 1;
            let what = format!("branch {:?} (id {})", b.name, b.id.0);
            if let Err(e) = validate_name("branch", &b.name) {
                r.problems.push(format!("{what}: {}", e.message));
            }
            if !ids.insert(SnapshotId(b.id.0)) || b.id.0 >= c.next_id || b.id.0 == 0 {
                r.problems.push(format!(
                    "{what}: id is duplicated or not below next_id {}",
                    c.next_id
                ));
            }
            if b.epoch == 0 || b.epoch >= c.main_epoch {
                r.problems.push(format!(
                    "{what}: epoch {} is not below main's epoch {}",
                    b.epoch, c.main_epoch
                ));
            }
            live_epochs.push(b.epoch);
        }
        if let Some(bad) = c.bindings.iter().find(|x| c.branch(x.branch).is_none()) {
            r.problems.push(format!(
                "a binding names branch id {}, which does not exist",
                bad.branch.0
            ));
        }
        check_layers(state, c, &mut r)?;
    }
    let preserved = state.join("preserved");
    let rd = match fs::read_dir(&preserved) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(r),
        Err(e) => return Err(e),
    };
    for h in rd {
        let h = h?;
        let hname = h.file_name().to_string_lossy().into_owned();
        if HostHandle::from_hex(&hname).is_none() {
            r.problems
                .push(format!("preserved/{hname}: not a file handle"));
            continue;
        }
        let mut tags = Vec::new();
        for t in fs::read_dir(h.path())? {
            let t = t?;
            let tname = t.file_name().to_string_lossy().into_owned();
            if tname.starts_with(".tmp-") {
                r.garbage.push(format!(
                    "preserved/{hname}/{tname}: a pre-image interrupted while written"
                ));
            } else if let Ok(tag) = tname.parse::<u64>() {
                tags.push(tag);
                r.preimages += 1;
                check_preimage(&t.path(), &format!("preserved/{hname}/{tname}"), &mut r);
            } else {
                r.problems
                    .push(format!("preserved/{hname}/{tname}: not a tag"));
            }
        }
        tags.sort_unstable();
        if catalog.is_some() {
            let mut prev = 0;
            for t in tags {
                if !live_epochs.iter().any(|&e| prev < e && e <= t) {
                    r.garbage.push(format!(
                        "preserved/{hname}/{t}: no snapshot or branch needs it"
                    ));
                }
                prev = t;
            }
        }
    }
    Ok(r)
}

/// Every layer a view uses is a directory with `tree/`, `work/` and
/// `index/`; files left in `work/`, layers a deletion freed and a
/// creation's leftover at the next id (but the spare, `crate::spare`) are
/// garbage; any other unused layer, or entry that is no layer, a problem
/// ([`Catalog::layer_dir`]).
fn check_layers(state: &Path, c: &Catalog, r: &mut Report) -> io::Result<()> {
    let in_use = c.layers_in_use();
    for l in &in_use {
        r.layers += 1;
        let dir = state.join("layers").join(l.0.to_string());
        for sub in ["tree", "work", "index"] {
            if !dir.join(sub).is_dir() {
                r.problems.push(format!(
                    "layers/{}/{sub}: missing (a view uses layer {})",
                    l.0, l.0
                ));
            }
        }
        if let Ok(rd) = fs::read_dir(dir.join("work")) {
            for e in rd {
                r.garbage.push(format!(
                    "layers/{}/work/{}: a copy-up interrupted by a crash",
                    l.0,
                    e?.file_name().to_string_lossy()
                ));
            }
        }
    }
    let rd = match fs::read_dir(state.join("layers")) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        match c.layer_dir(&e.file_name(), &in_use) {
            LayerDir::InUse => {}
            LayerDir::Next if crate::spare::is_spare(&e.path()) => {}
            LayerDir::Next => r
                .garbage
                .push(format!("layers/{name}: a creation interrupted by a crash")),
            LayerDir::Freed => r
                .garbage
                .push(format!("layers/{name}: no snapshot or branch uses it")),
            LayerDir::Unexplained => r.problems.push(format!(
                "layers/{name}: no snapshot or branch uses it, yet no deletion freed it \
                 (the catalog may have lost where it sits: \"below\"); the worker keeps it"
            )),
            LayerDir::NotALayer => r
                .problems
                .push(format!("layers/{name}: not a layer (the worker leaves it)")),
        }
    }
    Ok(())
}

fn check_preimage(dir: &Path, what: &str, r: &mut Report) {
    let meta: Meta = match fs::read(dir.join("meta.json"))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            r.problems.push(format!("{what}/meta.json: {e}"));
            return;
        }
    };
    match meta.mode & libc::S_IFMT {
        libc::S_IFREG => match fs::metadata(dir.join("data")) {
            Ok(d) if d.len() == meta.size as u64 => {}
            Ok(d) => r.problems.push(format!(
                "{what}/data: {} bytes, the inode had {}",
                d.len(),
                meta.size
            )),
            Err(e) => r.problems.push(format!("{what}/data: {e}")),
        },
        libc::S_IFDIR => {
            let entries: Result<Vec<EntryRec>, String> = fs::read(dir.join("entries.json"))
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            match entries {
                Ok(list) => {
                    for e in list
                        .iter()
                        .filter(|e| HostHandle::from_hex(&e.handle).is_none())
                    {
                        r.problems.push(format!(
                            "{what}/entries.json: entry {} has a bad handle",
                            e.name
                        ));
                    }
                }
                Err(e) => r.problems.push(format!("{what}/entries.json: {e}")),
            }
        }
        libc::S_IFLNK if meta.target.is_none() => r
            .problems
            .push(format!("{what}/meta.json: a symlink without a target")),
        _ => {}
    }
}
