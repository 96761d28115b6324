//! Which mount a command is about: `--mount NAME|PATH`, or the only one.

use std::path::{Component, Path, PathBuf};

/// A mount as the chooser sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Its name.
    pub name: String,
    /// Its state (`running`, ...).
    pub state: String,
    /// Its source directory (may be empty when unknown).
    pub source: String,
    /// Its mount point (may be empty when unknown).
    pub mount_point: String,
}

/// Whether a `--mount` argument is a path rather than a name. Names never
/// contain `/` and never start with `.`, so `.` and `..` are paths too.
pub fn is_path(arg: &str) -> bool {
    arg.contains('/') || arg == "." || arg == ".."
}

/// `path` made absolute (against `cwd`) and lexically normal: no `.`, no
/// `..` (resolved textually, without following symlinks), no trailing `/`.
pub fn normalize(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    let mut out = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The mount to use when none was named: the only running one, else the
/// only known one.
pub fn pick_default(mounts: &[Candidate], user: bool) -> Result<usize, String> {
    let running: Vec<usize> = (0..mounts.len())
        .filter(|&i| mounts[i].state == "running")
        .collect();
    if running.len() == 1 {
        return Ok(running[0]);
    }
    match mounts.len() {
        0 => Err(format!(
            "no mount is configured; create {} (see agentfsctl(1))",
            if user {
                "~/.config/agentfs/mounts/NAME.toml"
            } else {
                "/etc/agentfs/mounts/NAME.toml"
            }
        )),
        1 => Ok(0),
        _ => {
            let names = list_names(mounts.iter());
            if running.is_empty() {
                Err(format!(
                    "there are several mounts ({names}) and none is running; pass --mount NAME"
                ))
            } else {
                let names = list_names(running.iter().map(|&i| &mounts[i]));
                Err(format!(
                    "several mounts are running ({names}); pass --mount NAME"
                ))
            }
        }
    }
}

/// The mount called `name`.
pub fn pick_by_name(mounts: &[Candidate], name: &str) -> Result<usize, String> {
    mounts.iter().position(|m| m.name == name).ok_or_else(|| {
        if mounts.is_empty() {
            format!("no mount {name}: no mount is configured")
        } else {
            format!(
                "no mount {name} (known: {}); check the name, or run agentfsctl reload after adding its config",
                list_names(mounts.iter())
            )
        }
    })
}

/// The mount a path (absolute and normal, see [`normalize`]) belongs to:
/// the one whose mount point or source is the path or its nearest
/// ancestor. On a tie a mount point beats a source, and a running mount
/// beats one that is not.
pub fn pick_by_path(mounts: &[Candidate], path: &Path) -> Result<usize, String> {
    // (depth of the matched directory, matched a mount point, running)
    let mut best: Option<((usize, bool, bool), Vec<usize>)> = None;
    for (i, m) in mounts.iter().enumerate() {
        for (dir, is_mp) in [(&m.mount_point, true), (&m.source, false)] {
            if dir.is_empty() {
                continue;
            }
            let dir = normalize(Path::new(dir), Path::new("/"));
            if !path.starts_with(&dir) {
                continue;
            }
            let score = (dir.components().count(), is_mp, m.state == "running");
            match &mut best {
                Some((s, v)) if *s == score => {
                    if !v.contains(&i) {
                        v.push(i)
                    }
                }
                Some((s, _)) if *s > score => {}
                _ => best = Some((score, vec![i])),
            }
        }
    }
    match best {
        None => Err(format!(
            "no mount has its mount point or source at or above {}{}",
            path.display(),
            if mounts.is_empty() {
                String::new()
            } else {
                format!(" (known: {})", list_names(mounts.iter()))
            }
        )),
        Some((_, v)) if v.len() == 1 => Ok(v[0]),
        Some((_, v)) => Err(format!(
            "{} belongs to several mounts ({}); pass --mount NAME",
            path.display(),
            list_names(v.iter().map(|&i| &mounts[i]))
        )),
    }
}

fn list_names<'a>(it: impl Iterator<Item = &'a Candidate>) -> String {
    it.map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, state: &str, source: &str, mp: &str) -> Candidate {
        Candidate {
            name: name.into(),
            state: state.into(),
            source: source.into(),
            mount_point: mp.into(),
        }
    }

    #[test]
    fn paths_versus_names() {
        assert!(is_path("/srv/a"));
        assert!(is_path("./a"));
        assert!(is_path("a/"));
        assert!(is_path("."));
        assert!(is_path(".."));
        assert!(!is_path("agent-1"));
        assert!(!is_path("a@b.c"));
    }

    #[test]
    fn normalizing() {
        let cwd = Path::new("/home/u/proj");
        assert_eq!(normalize(Path::new("."), cwd), Path::new("/home/u/proj"));
        assert_eq!(normalize(Path::new("../x/"), cwd), Path::new("/home/u/x"));
        assert_eq!(
            normalize(Path::new("a/./b/../c"), cwd),
            Path::new("/home/u/proj/a/c")
        );
        assert_eq!(normalize(Path::new("/srv//w/"), cwd), Path::new("/srv/w"));
        assert_eq!(normalize(Path::new("/../.."), cwd), Path::new("/"));
    }

    #[test]
    fn default_is_the_only_running_or_the_only_known() {
        let one = [c("a", "stopped", "", "")];
        assert_eq!(pick_default(&one, false), Ok(0));
        let two = [c("a", "stopped", "", ""), c("b", "running", "", "")];
        assert_eq!(pick_default(&two, false), Ok(1));
        let e = pick_default(
            &[c("a", "stopped", "", ""), c("b", "failed", "", "")],
            false,
        )
        .unwrap_err();
        assert!(e.contains("a, b") && e.contains("--mount"), "{e}");
        let e = pick_default(
            &[
                c("a", "running", "", ""),
                c("b", "running", "", ""),
                c("z", "stopped", "", ""),
            ],
            false,
        )
        .unwrap_err();
        assert!(e.contains("(a, b)") && e.contains("--mount"), "{e}");
        let e = pick_default(&[], false).unwrap_err();
        assert!(e.contains("/etc/agentfs/mounts"), "{e}");
        let e = pick_default(&[], true).unwrap_err();
        assert!(e.contains(".config/agentfs/mounts"), "{e}");
    }

    #[test]
    fn by_name() {
        let ms = [c("a", "stopped", "", ""), c("b", "running", "", "")];
        assert_eq!(pick_by_name(&ms, "b"), Ok(1));
        let e = pick_by_name(&ms, "zz").unwrap_err();
        assert!(e.contains("no mount zz") && e.contains("a, b"), "{e}");
    }

    #[test]
    fn by_path() {
        let ms = [
            c("a", "running", "/srv/a", "/srv/a"),
            c("b", "running", "/data/b", "/mnt/b"),
            c("nested", "stopped", "/srv/a/sub", "/srv/a/sub"),
        ];
        let p = |s: &str| pick_by_path(&ms, Path::new(s));
        assert_eq!(p("/srv/a"), Ok(0));
        assert_eq!(p("/srv/a/src/lib"), Ok(0));
        assert_eq!(p("/mnt/b"), Ok(1));
        assert_eq!(p("/data/b/x"), Ok(1));
        assert_eq!(p("/srv/a/sub/x"), Ok(2));
        // Not a prefix by bytes: /srv/ab is not below /srv/a.
        assert!(p("/srv/ab").is_err());
        let e = p("/elsewhere").unwrap_err();
        assert!(
            e.contains("/elsewhere") && e.contains("known: a, b, nested"),
            "{e}"
        );
    }

    #[test]
    fn by_path_ties() {
        // Same source, one mounted elsewhere: the mount point wins.
        let ms = [
            c("over", "running", "/srv/p", "/srv/p"),
            c("view", "running", "/srv/p", "/mnt/v"),
        ];
        assert_eq!(pick_by_path(&ms, Path::new("/srv/p")), Ok(0));
        assert_eq!(pick_by_path(&ms, Path::new("/mnt/v/x")), Ok(1));
        // Two mounts of one source elsewhere: the running one wins ...
        let ms = [
            c("x", "stopped", "/srv/p", "/mnt/x"),
            c("y", "running", "/srv/p", "/mnt/y"),
        ];
        assert_eq!(pick_by_path(&ms, Path::new("/srv/p")), Ok(1));
        // ... and two running ones are ambiguous.
        let ms = [
            c("x", "running", "/srv/p", "/mnt/x"),
            c("y", "running", "/srv/p", "/mnt/y"),
        ];
        let e = pick_by_path(&ms, Path::new("/srv/p")).unwrap_err();
        assert!(e.contains("x, y") && e.contains("--mount"), "{e}");
    }
}
