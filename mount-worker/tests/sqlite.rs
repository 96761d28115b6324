//! SQLite on a real mount with several processes writing one database at
//! once, in WAL mode and in rollback-journal mode: the workload that breaks
//! file systems with wrong POSIX locks, lost writes, stale attributes or
//! unsupported shared writable mmap (WAL's `-shm` index).
//!
//! Each writer is a separate `sqlite3` process (Debian's CLI) with a busy
//! timeout, so lock contention must end in waiting, never in "database is
//! locked". Every insert also bumps a counter row through a trigger, in the
//! same transaction; a reader process checks all along that the two agree,
//! and the final checks demand exact counts, no lost update and a clean
//! `PRAGMA integrity_check`. Once on main in each mode, and in WAL mode
//! in a branch.
//!
//! Needs `sqlite3` on the PATH (`apt-get install sqlite3`): fails, never
//! skips, without it.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Concurrent writer processes.
const WRITERS: usize = 4;
/// Rows each writer inserts; half in single-statement (autocommit)
/// transactions, half in explicit `BEGIN IMMEDIATE` batches.
const ROWS_PER_WRITER: usize = 1000;
/// Rows per explicit transaction.
const BATCH: usize = 5;
/// Consistency checks the reader makes while the writers run.
const READER_QUERIES: usize = 1000;
/// How long a connection waits for a lock before SQLITE_BUSY: far longer than
/// any healthy wait, so a "database is locked" means locks are broken.
const BUSY_TIMEOUT_MS: u32 = 60_000;
/// Far above a healthy run (seconds), far below CI's budget.
const RUN_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The journal modes tested: the two ways SQLite keeps a database consistent.
#[derive(Clone, Copy, Debug)]
enum JournalMode {
    /// Write-ahead log: `-wal` file plus a `-shm` index shared by mmap.
    Wal,
    /// Rollback journal (`-journal` file), POSIX advisory locks only.
    Delete,
}

impl JournalMode {
    fn pragma(self) -> &'static str {
        match self {
            JournalMode::Wal => "wal",
            JournalMode::Delete => "delete",
        }
    }
}

#[test]
fn sqlite_wal_concurrent_writers() {
    let mut m = common::Mount::new();
    check_sqlite(m.path(), JournalMode::Wal);
    m.stop();
}

#[test]
fn sqlite_rollback_journal_concurrent_writers() {
    let mut m = common::Mount::new();
    check_sqlite(m.path(), JournalMode::Delete);
    m.stop();
}

/// Contract 2.6: SQLite must work on a branch. WAL mode, the harder one
/// (shared writable mmap of `-shm`), in a branch reached by path, served
/// as under the supervisor (sandboxed).
#[test]
fn sqlite_wal_concurrent_writers_in_a_branch() {
    let mut m = common::Mount::builder().supervised().start();
    common::snapshot(&m, None, "base");
    common::branch(&m, "base", "db");
    check_sqlite(&common::branch_dir(&m, "db"), JournalMode::Wal);
    assert_eq!(fs::read_dir(m.source()).unwrap().count(), 0, "reached main");
    m.stop();
}

/// Runs the whole workload on a new database in `dir` and asserts that it
/// ends consistent. Works on any directory (a plain host one, a branch view).
fn check_sqlite(dir: &Path, mode: JournalMode) {
    let db_dir = dir.join(format!("sqlite-{}", mode.pragma()));
    fs::create_dir(&db_dir).unwrap();
    let db = db_dir.join("test.db");
    let started = Instant::now();

    // Schema. `journal_mode=WAL` is persistent; DELETE is the default and is
    // set again by every connection below anyway.
    let out = sqlite(
        &db,
        &format!(
            "PRAGMA journal_mode = {};\n\
             CREATE TABLE t (writer INTEGER NOT NULL, seq INTEGER NOT NULL, \
                payload BLOB NOT NULL, UNIQUE (writer, seq));\n\
             CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);\n\
             INSERT INTO counter VALUES (1, 0);\n\
             CREATE TRIGGER bump AFTER INSERT ON t BEGIN \
                UPDATE counter SET n = n + 1 WHERE id = 1; END;\n",
            mode.pragma()
        ),
    );
    assert_eq!(
        out.trim(),
        mode.pragma(),
        "PRAGMA journal_mode = {} answered {out:?}: the mode could not be set",
        mode.pragma()
    );

    // Writers and one reader, all started together.
    let mut procs: Vec<(String, Child)> = (0..WRITERS)
        .map(|w| {
            (
                format!("writer {w}"),
                spawn_sqlite(&db, &writer_script(w, mode)),
            )
        })
        .collect();
    procs.push(("reader".into(), spawn_sqlite(&db, &reader_script(mode))));

    let mut failures = String::new();
    for (name, child) in procs {
        let remaining = RUN_TIMEOUT.saturating_sub(started.elapsed());
        let (ok, stdout, stderr) = finish(child, remaining);
        let mut lines = stdout.lines();
        // Every connection echoes its busy timeout, then its journal mode.
        let header_ok = lines.next() == Some(&BUSY_TIMEOUT_MS.to_string())
            && lines.next() == Some(mode.pragma());
        // The reader prints 1 for each snapshot where rows and counter agree.
        let reader_ok = name != "reader" || {
            let checks: Vec<&str> = lines.collect();
            checks.len() == READER_QUERIES && checks.iter().all(|l| *l == "1")
        };
        if !ok || !stderr.is_empty() || !header_ok || !reader_ok {
            let locked = if stderr.contains("locked") || stderr.contains("busy") {
                " (a lock wait escaped the busy timeout: locking is broken)"
            } else {
                ""
            };
            let _ = writeln!(
                failures,
                "{name}{locked}: ok={ok} header_ok={header_ok} reader_ok={reader_ok}\n\
                 stderr: {stderr}\nstdout (first 20 lines): {}",
                stdout.lines().take(20).collect::<Vec<_>>().join(" / ")
            );
        }
    }
    assert!(
        failures.is_empty(),
        "sqlite ({}) processes failed on {}:\n{failures}",
        mode.pragma(),
        dir.display()
    );
    let workload = started.elapsed();

    // Final state, from a fresh process: integrity, exact counts, no lost
    // counter update, every (writer, seq) exactly once.
    let total = WRITERS * ROWS_PER_WRITER;
    let mut expected = format!("ok\n{total}\n{total}\n");
    for w in 0..WRITERS {
        let _ = writeln!(expected, "{w}|{ROWS_PER_WRITER}|0|{}", ROWS_PER_WRITER - 1);
    }
    let verify = "PRAGMA integrity_check;\n\
                  SELECT count(*) FROM t;\n\
                  SELECT n FROM counter;\n\
                  SELECT writer, count(DISTINCT seq), min(seq), max(seq) \
                     FROM t GROUP BY writer ORDER BY writer;\n";
    let got = sqlite(&db, verify);
    assert_eq!(got, expected, "final database state is wrong");

    if let JournalMode::Wal = mode {
        // Everything must checkpoint back into the main file.
        let got = sqlite(&db, "PRAGMA wal_checkpoint(TRUNCATE);\n");
        assert_eq!(got.trim(), "0|0|0", "wal_checkpoint(TRUNCATE) result");
    }
    // The last connection to close removes its -wal/-shm (WAL) or the
    // -journal is gone after each commit (DELETE): nothing else may be left.
    let mut left: Vec<String> = fs::read_dir(&db_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["test.db"], "files left beside the database");
    // Read once more after all connections closed: from the file alone.
    assert_eq!(sqlite(&db, verify), expected, "database after reopening");

    println!(
        "sqlite summary ({}, {}): {WRITERS} writers x {ROWS_PER_WRITER} rows + reader \
         in {:.1}s, verified in {:.1}s",
        mode.pragma(),
        dir.display(),
        workload.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Lines every connection starts with: errors abort the script, the busy
/// timeout and journal mode are set (and echoed, to be checked).
fn preamble(mode: JournalMode) -> String {
    format!(
        ".bail on\nPRAGMA busy_timeout = {BUSY_TIMEOUT_MS};\nPRAGMA journal_mode = {};\n",
        mode.pragma()
    )
}

/// Writer `w`: rows `(w, 0..ROWS_PER_WRITER)`, alternating a batch of
/// autocommit inserts and a batch inside `BEGIN IMMEDIATE` (which takes the
/// write lock up front, the documented way to make the busy timeout apply).
fn writer_script(w: usize, mode: JournalMode) -> String {
    let mut s = preamble(mode);
    for seq in 0..ROWS_PER_WRITER {
        let explicit = (seq / BATCH) % 2 == 1;
        if explicit && seq % BATCH == 0 {
            s.push_str("BEGIN IMMEDIATE;\n");
        }
        let _ = writeln!(
            s,
            "INSERT INTO t (writer, seq, payload) VALUES ({w}, {seq}, randomblob(300 + {seq} % 700));"
        );
        if explicit && (seq % BATCH == BATCH - 1 || seq == ROWS_PER_WRITER - 1) {
            s.push_str("COMMIT;\n");
        }
    }
    s
}

/// The reader: each query is its own read transaction, and in every
/// snapshot the rows and the trigger-maintained counter must agree.
fn reader_script(mode: JournalMode) -> String {
    let mut s = preamble(mode);
    for _ in 0..READER_QUERIES {
        s.push_str("SELECT (SELECT count(*) FROM t) = (SELECT n FROM counter WHERE id = 1);\n");
    }
    s
}

/// Starts `sqlite3 DB` reading `script` from its stdin.
fn spawn_sqlite(db: &Path, script: &str) -> Child {
    let mut child = Command::new("sqlite3")
        .arg("-batch")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("spawning sqlite3 ({e}): install it with `apt-get install sqlite3`")
        });
    let mut stdin = child.stdin.take().unwrap();
    let script = script.to_owned();
    // Feed from a thread: the script is larger than a pipe buffer.
    std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(script.as_bytes());
    });
    child
}

/// Waits for a process (killing it after `timeout`), returning whether it
/// exited 0 in time, and its stdout and stderr.
fn finish(mut child: Child, timeout: Duration) -> (bool, String, String) {
    let read = |mut p: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = p.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let status = common::wait_timeout(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stderr = err.join().unwrap();
    if status.is_none() {
        let _ = write!(stderr, "[killed after {timeout:?}]");
    }
    (
        status.is_some_and(|s| s.success()),
        out.join().unwrap(),
        stderr,
    )
}

/// Runs a short script to completion (errors abort it) and returns stdout.
fn sqlite(db: &Path, script: &str) -> String {
    let child = spawn_sqlite(db, &format!(".bail on\n{script}"));
    let (ok, stdout, stderr) = finish(child, RUN_TIMEOUT);
    assert!(
        ok && stderr.is_empty(),
        "sqlite3 {} failed: {stderr}\nscript:\n{script}",
        db.display()
    );
    stdout
}
