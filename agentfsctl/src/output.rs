//! What agentfsctl prints: aligned tables and one-line confirmations for
//! people, JSON for programs (`--json`).

use serde::Serialize;

use crate::bus::MountProps;

/// A snapshot, as `snapshot-list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The branch it was taken of (`main`, a branch name, or an id).
    pub branch: String,
    /// Creation time, Unix seconds.
    pub created: u64,
}

/// A branch, as `branch-list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Branch {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The id of the snapshot it was created from.
    pub snapshot: String,
}

/// A binding, as `binding-list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binding {
    /// `pid` or `cgroup`.
    pub kind: String,
    /// The pid in decimal or the cgroup path.
    pub target: String,
    /// The branch's name.
    pub branch: String,
}

/// A mount, as `mount-list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: String,
    /// Its object path on the bus.
    pub path: String,
    /// The host directory (`""` if it could not be read).
    pub source: String,
    /// Where it is mounted (`""` if it could not be read).
    pub mount_point: String,
}

/// Formats rows as columns separated by two spaces, under a header; the
/// last column is not padded. Every line ends with a newline.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, cell) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            l.push_str(cell);
            if i + 1 < n {
                let pad = width[i].saturating_sub(cell.chars().count());
                l.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// The snapshot table.
pub fn snapshots_table(snaps: &[Snapshot]) -> String {
    if snaps.is_empty() {
        return "no snapshots\n".into();
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.name.clone(),
                s.branch.clone(),
                local_time(s.created),
            ]
        })
        .collect();
    table(&["ID", "NAME", "BRANCH", "CREATED"], &rows)
}

/// The branch table.
pub fn branches_table(branches: &[Branch]) -> String {
    if branches.is_empty() {
        return "no branches\n".into();
    }
    let rows: Vec<Vec<String>> = branches
        .iter()
        .map(|b| vec![b.id.clone(), b.name.clone(), b.snapshot.clone()])
        .collect();
    table(&["ID", "NAME", "SNAPSHOT"], &rows)
}

/// The binding table.
pub fn bindings_table(bindings: &[Binding]) -> String {
    if bindings.is_empty() {
        return "no bindings\n".into();
    }
    let rows: Vec<Vec<String>> = bindings
        .iter()
        .map(|b| vec![b.kind.clone(), b.target.clone(), b.branch.clone()])
        .collect();
    table(&["KIND", "TARGET", "BRANCH"], &rows)
}

/// The mount table.
pub fn mounts_table(mounts: &[Mount]) -> String {
    if mounts.is_empty() {
        return "no mounts\n".into();
    }
    let rows: Vec<Vec<String>> = mounts
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.state.clone(),
                m.mount_point.clone(),
                m.source.clone(),
            ]
        })
        .collect();
    table(&["NAME", "STATE", "MOUNTPOINT", "SOURCE"], &rows)
}

/// One mount's properties, one per line.
pub fn status_block(p: &MountProps) -> String {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let pid = if p.worker_pid == 0 {
        "-".to_owned()
    } else {
        p.worker_pid.to_string()
    };
    let rows = [
        ("State", p.state.clone()),
        ("Source", or_dash(&p.source)),
        ("Mount point", or_dash(&p.mount_point)),
        ("State dir", or_dash(&p.state_dir)),
        ("Worker pid", pid),
        ("Restarts", p.restarts.to_string()),
        ("Last error", or_dash(&p.last_error)),
    ];
    let mut out = format!("{} ({})\n", p.name, p.path);
    for (k, v) in rows {
        out.push_str(&format!("  {:<12} {v}\n", format!("{k}:")));
    }
    out
}

/// Pretty JSON of `v`, with a final newline.
pub fn json<T: Serialize + ?Sized>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("plain data serializes");
    s.push('\n');
    s
}

/// Unix seconds as local ISO-8601 (`2025-03-01T14:05:09+01:00`).
pub fn local_time(secs: u64) -> String {
    let t = secs.min(i64::MAX as u64) as i64;
    let offset = local_offset(t);
    iso8601(t, offset)
}

/// The local time zone's offset from UTC at `t`, in seconds.
fn local_offset(t: i64) -> i64 {
    let tt = t as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives on the stack.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&tt, &mut tm).is_null() {
            0
        } else {
            tm.tm_gmtoff
        }
    }
}

/// Unix seconds `t` shown at UTC offset `offset` (seconds), ISO-8601;
/// `Z` for UTC.
pub fn iso8601(t: i64, offset: i64) -> String {
    let local = t + offset;
    let days = local.div_euclid(86_400);
    let sod = local.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let zone = if offset == 0 {
        "Z".to_owned()
    } else {
        let sign = if offset < 0 { '-' } else { '+' };
        let a = offset.abs();
        format!("{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{zone}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_do_not_pad_the_last_column() {
        let t = table(
            &["ID", "NAME", "BRANCH"],
            &[
                vec!["1".into(), "clean".into(), "main".into()],
                vec!["12".into(), "x".into(), "try-a".into()],
            ],
        );
        assert_eq!(
            t,
            "ID  NAME   BRANCH\n\
             1   clean  main\n\
             12  x      try-a\n"
        );
    }

    #[test]
    fn empty_last_cells_leave_no_trailing_space() {
        let t = table(&["A", "B"], &[vec!["x".into(), "".into()]]);
        assert_eq!(t, "A  B\nx\n");
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso8601(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(iso8601(1_700_000_000, 3600), "2023-11-14T23:13:20+01:00");
        assert_eq!(
            iso8601(1_700_000_000, -(5 * 3600 + 1800)),
            "2023-11-14T16:43:20-05:30"
        );
        // Leap day, and the turn of a year across an offset.
        assert_eq!(iso8601(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_704_067_199, 3600), "2024-01-01T00:59:59+01:00");
        assert_eq!(iso8601(1_704_067_200, -3600), "2023-12-31T23:00:00-01:00");
    }

    #[test]
    fn local_time_looks_like_iso() {
        let s = local_time(1_700_000_000);
        assert_eq!(&s[4..5], "-");
        assert_eq!(&s[10..11], "T");
        assert!(s.ends_with('Z') || s.len() == 25, "{s}");
    }

    #[test]
    fn snapshot_table_and_json() {
        let snaps = [Snapshot {
            id: "3".into(),
            name: "clean".into(),
            branch: "main".into(),
            created: 0,
        }];
        let t = snapshots_table(&snaps);
        let mut lines = t.lines();
        assert_eq!(lines.next(), Some("ID  NAME   BRANCH  CREATED"));
        assert!(lines.next().unwrap().starts_with("3   clean  main    19"));
        assert_eq!(snapshots_table(&[]), "no snapshots\n");
        let v: serde_json::Value = serde_json::from_str(&json(&snaps[..])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"id": "3", "name": "clean", "branch": "main", "created": 0}])
        );
    }

    #[test]
    fn other_tables_and_json() {
        let b = [Branch {
            id: "2".into(),
            name: "try-a".into(),
            snapshot: "3".into(),
        }];
        assert_eq!(branches_table(&b), "ID  NAME   SNAPSHOT\n2   try-a  3\n");
        let v: serde_json::Value = serde_json::from_str(&json(&b[..])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"id": "2", "name": "try-a", "snapshot": "3"}])
        );

        let bs = [
            Binding {
                kind: "pid".into(),
                target: "4242".into(),
                branch: "try-a".into(),
            },
            Binding {
                kind: "cgroup".into(),
                target: "/agents/a".into(),
                branch: "try-b".into(),
            },
        ];
        assert_eq!(
            bindings_table(&bs),
            "KIND    TARGET     BRANCH\npid     4242       try-a\ncgroup  /agents/a  try-b\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&bs[..])).unwrap();
        assert_eq!(
            v[1],
            serde_json::json!({"kind": "cgroup", "target": "/agents/a", "branch": "try-b"})
        );

        let ms = [Mount {
            name: "agent1".into(),
            state: "running".into(),
            path: "/org/agentfs/mount/agent1".into(),
            source: "/srv/a".into(),
            mount_point: "/srv/a".into(),
        }];
        assert_eq!(
            mounts_table(&ms),
            "NAME    STATE    MOUNTPOINT  SOURCE\nagent1  running  /srv/a      /srv/a\n"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&ms[..])).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"name": "agent1", "state": "running",
                "path": "/org/agentfs/mount/agent1", "source": "/srv/a", "mount_point": "/srv/a"}])
        );
    }

    #[test]
    fn status() {
        let p = MountProps {
            path: "/org/agentfs/mount/agent_2d1".into(),
            name: "agent-1".into(),
            state: "running".into(),
            source: "/srv/a".into(),
            mount_point: "/srv/a".into(),
            state_dir: "/var/lib/agentfs/agent-1".into(),
            worker_pid: 77,
            restarts: 0,
            last_error: String::new(),
        };
        let s = status_block(&p);
        assert!(
            s.starts_with("agent-1 (/org/agentfs/mount/agent_2d1)\n  State:       running\n"),
            "{s}"
        );
        assert!(s.contains("  Worker pid:  77\n"));
        assert!(s.ends_with("  Last error:  -\n"));
        let v: serde_json::Value = serde_json::from_str(&json(&p)).unwrap();
        assert_eq!(v["worker_pid"], 77);
        assert_eq!(v["last_error"], "");
        assert_eq!(v["state_dir"], "/var/lib/agentfs/agent-1");
    }
}
