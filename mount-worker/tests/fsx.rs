//! Data integrity of a real mount under a long random mix of pread/pwrite,
//! mmap(MAP_SHARED) reads and writes, truncate, fallocate, hole punching,
//! copy_file_range, sendfile and fsync: fsx (crate `fsx` 0.3.2) checks every
//! byte it reads back against its own model of the file.
//!
//! Two fixed seeds run at the same time, each on its own file in the mount,
//! so the worker also serves two busy files at once. A failure is exactly
//! reproducible: `fsx -f tests/fsx/fsx.toml -N 100000 -S SEED FILE`.
//!
//! Needs the `fsx` binary (`cargo install fsx --version 0.3.2 --locked`;
//! `$FSX` may name it): the test fails, never skips, without it.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The fsx release the config was written for.
const FSX_VERSION: &str = "0.3.2";

/// Operation weights and sizes (mmap reads and writes are on).
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fsx/fsx.toml");

/// Operations per seed. fsx 0.3.2 never unmaps its mmap reads, so every
/// truncate has to zap more and more mappings: a run grows superlinearly
/// (100 000 ops: about 2.5 min on host ext4, 1 min on tmpfs).
const OPS: u64 = 100_000;

/// Any fixed values: they make the runs reproducible.
const SEEDS: [u64; 2] = [1, 2];

/// Far above a healthy run, far below CI's budget.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The first seed on a worker that mounts by itself.
#[test]
fn fsx_mmap() {
    let mut m = common::Mount::new();
    check_fsx(m.path(), &SEEDS[..1], OPS);
    m.stop();
}

/// The second on a worker served as under the supervisor: sandboxed, so
/// mmap, fallocate, copy_file_range, truncation and the rest fsx does are
/// all within its seccomp allow-list and Landlock rules.
#[test]
fn fsx_mmap_sandboxed() {
    let mut m = common::Mount::builder().supervised().start();
    check_fsx(m.path(), &SEEDS[1..], OPS);
    m.stop();
}

/// A third in a branch, snapshotted every second meanwhile: each snapshot
/// freezes the layer fsx's file is in, and its next write, through the
/// descriptor and the maps fsx opened before, copies the file into the
/// branch's new layer first. The file starts as main's, so its first
/// change is a copy-up too. Half the operations: a copy-up copies the
/// file.
#[test]
fn fsx_mmap_in_a_branch_snapshotted_meanwhile() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const SEED: u64 = 3;
    let mut m = common::Mount::builder()
        .populate(|s| {
            let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
            fs::write(s.join(format!("fsx-{SEED}")), data).unwrap();
        })
        .start();
    common::snapshot(&m, None, "base");
    common::branch(&m, "base", "b");
    let dir = common::branch_dir(&m, "b");
    let done = AtomicBool::new(false);
    let snapshots = std::thread::scope(|s| {
        let taker = s.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                common::snapshot(&m, Some("b"), &format!("during-{n}"));
                n += 1;
            }
            n
        });
        let run = std::panic::catch_unwind(|| check_fsx(&dir, &[SEED], OPS / 2));
        done.store(true, Ordering::Relaxed);
        let n = taker.join().unwrap();
        if let Err(e) = run {
            std::panic::resume_unwind(e);
        }
        n
    });
    assert!(snapshots >= 5, "only {snapshots} snapshots during the run");
    println!("{snapshots} snapshots of the branch during the run");
    m.stop();
}

/// Runs fsx once per seed, all at the same time, each on `dir/fsx-SEED`, and
/// asserts that every run exits 0 having completed all `ops` operations.
/// On failure fsx's log (its last operations and the first mismatch) is
/// printed and its artifacts (the expected file contents, `*.fsxgood`) are
/// kept in `$CARGO_TARGET_TMPDIR/fsx-SEED/`.
fn check_fsx(dir: &Path, seeds: &[u64], ops: u64) {
    let bin = fsx_binary();
    check_config_takes_effect(&bin, dir);

    let started = Instant::now();
    let mut runs: Vec<Running> = seeds
        .iter()
        .map(|&seed| {
            let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fsx-{seed}"));
            let _ = fs::remove_dir_all(&artifacts);
            fs::create_dir_all(&artifacts).unwrap();
            let mut child = Command::new(&bin)
                .arg("-f")
                .arg(CONFIG)
                .arg("-N")
                .arg(ops.to_string())
                .arg("-S")
                .arg(seed.to_string())
                .arg("-P")
                .arg(&artifacts)
                .arg(dir.join(format!("fsx-{seed}")))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
            // Drain the pipes on threads: the failure log can be long.
            let stdout = drain(child.stdout.take().unwrap());
            let stderr = drain(child.stderr.take().unwrap());
            Running {
                seed,
                artifacts,
                child,
                stdout,
                stderr,
                done: None,
            }
        })
        .collect();

    // Poll the runs so that each one's own duration is known.
    while runs.iter().any(|r| r.done.is_none()) {
        let timed_out = started.elapsed() >= RUN_TIMEOUT;
        for r in runs.iter_mut().filter(|r| r.done.is_none()) {
            if let Ok(Some(status)) = r.child.try_wait() {
                r.done = Some((Some(status), started.elapsed()));
            } else if timed_out {
                let _ = r.child.kill();
                let _ = r.child.wait();
                r.done = Some((None, started.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut failures = Vec::new();
    for r in runs {
        let (status, took) = r.done.unwrap();
        let (out, err) = (r.stdout.join().unwrap(), r.stderr.join().unwrap());
        let seed = r.seed;
        let completed = out.contains("All operations completed A-OK!");
        match status {
            Some(s) if s.success() && completed => println!(
                "fsx seed {seed}: {ops} operations OK in {:.1}s",
                took.as_secs_f64()
            ),
            _ => {
                let tail: Vec<&str> = err.lines().rev().take(80).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                failures.push(format!(
                    "fsx seed {seed} on {}: {}; artifacts in {}\n\
                     reproduce: fsx -f {CONFIG} -N {ops} -S {seed} FILE\n\
                     stdout: {out}\nlast lines of its log:\n{}",
                    dir.display(),
                    match status {
                        None => format!("killed after {RUN_TIMEOUT:?}"),
                        Some(s) => format!("exited with {s}"),
                    },
                    r.artifacts.display(),
                    tail.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    println!(
        "fsx summary ({}): {} seeds x {ops} operations in {:.1}s",
        dir.display(),
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

/// One fsx process and what is known of it.
struct Running {
    seed: u64,
    artifacts: PathBuf,
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
    /// Exit status (None: killed at the timeout) and time since the start.
    done: Option<(Option<ExitStatus>, Duration)>,
}

/// Reads a pipe to its end on a thread.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        s
    })
}

/// fsx silently ignores unknown config keys: a short verbose run proves that
/// the config is read and that mmap reads and writes really happen.
fn check_config_takes_effect(bin: &Path, dir: &Path) {
    let file = dir.join("fsx-config-check");
    let out = Command::new(bin)
        .arg("-f")
        .arg(CONFIG)
        .args(["-N", "2000", "-S", "1", "-v"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fsx config check run failed ({}):\n{log}",
        out.status
    );
    for op in [
        "mapread",
        "mapwrite",
        "punch_hole",
        "copy_file_range",
        "close/open",
    ] {
        assert!(
            log.contains(op),
            "no `{op}` in 2000 operations: is {CONFIG} read?"
        );
    }
    let _ = fs::remove_file(file);
}

/// Finds fsx (`$FSX`, `PATH`, `~/.cargo/bin`) and checks its version. Panics
/// with the install command when it is missing.
fn fsx_binary() -> PathBuf {
    let install = format!("cargo install fsx --version {FSX_VERSION} --locked");
    let bin = common::find_program("FSX", "fsx").unwrap_or_else(|| {
        panic!("fsx not found (not on PATH, not in ~/.cargo/bin, $FSX unset); install it with `{install}`")
    });
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", bin.display()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("fsx {FSX_VERSION}"),
        "{} is not fsx {FSX_VERSION}; install it with `{install}`",
        bin.display()
    );
    bin
}
