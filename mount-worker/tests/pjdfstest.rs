//! POSIX conformance of a real mount: the whole pjdfstest suite (the Rust
//! rewrite, crate `pjdfstest` 0.2.2) runs inside the mount, and the set of
//! test cases that do not pass must be exactly the one written down in
//! `tests/pjdfstest/expected.toml`.
//!
//! The comparison goes both ways on purpose: a new failure is a regression,
//! and a listed failure that now passes means the list is stale. Either way
//! the test fails and names the test cases, so the list stays true.
//!
//! Needs: root (pjdfstest switches users and skips its root-only cases
//! otherwise), the `pjdfstest` binary (`cargo install pjdfstest --version
//! 0.2.2 --locked`; `$PJDFSTEST` may name it), and the users of
//! `[dummy_auth]` in `tests/pjdfstest/pjdfstest.toml`; the missing `tests`
//! user is created here.
//!
//! [`check_pjdfstest`] takes any directory, so the same check can be run on
//! another view of the file system (e.g. a branch) with its own expectations.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The pjdfstest release the expectations were written for: other releases
/// add, rename or change test cases.
const PJDFSTEST_VERSION: &str = "0.2.2";

/// Configuration shared by every run (features, naptime, dummy users).
const CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/pjdfstest/pjdfstest.toml"
);

/// Expected non-passing test cases on the main view.
const EXPECTED_MAIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/pjdfstest/expected.toml"
);

/// A full run takes seconds on a host directory; a hang inside the mount must
/// not block CI for its whole budget.
const RUN_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The whole suite on the main view of a fresh mount.
#[test]
fn pjdfstest_main_view() {
    pjdfstest_main(common::Mount::builder(), "main-view");
}

/// The same on a worker serving as under the supervisor: sandboxed, so
/// every system call the suite makes it use is in its allow-list and
/// beneath its Landlock rules, and mounted over its source as by default
/// (where the kernel also remembers absent names).
#[test]
fn pjdfstest_main_view_sandboxed() {
    pjdfstest_main(
        common::Mount::builder().supervised().over_source(),
        "main-view-sandboxed",
    );
}

fn pjdfstest_main(builder: common::MountBuilder, label: &str) {
    let mut m = builder.start();
    let summary = check_pjdfstest(m.path(), Path::new(EXPECTED_MAIN), label, None);
    println!("{summary}");
    // A clean shutdown is part of the contract: the suite must not leave the
    // worker wedged.
    m.stop();
}

/// The whole suite inside a branch, reached by path
/// (`.agentfs/branches/<name>/`): a branch is a full POSIX file system too,
/// so the results must be those of main.
#[test]
fn pjdfstest_branch_view() {
    pjdfstest_in_a_branch(false, Worker::Standalone);
}

/// The same in a sandboxed worker mounted over its source (copy-up,
/// whiteouts, FICLONE, pre-images all under the allow-list).
#[test]
fn pjdfstest_branch_view_sandboxed() {
    pjdfstest_in_a_branch(false, Worker::Sandboxed);
}

/// The whole suite run by a process bound to a branch, at a path under the
/// mount root that exists only in that branch: every call pjdfstest and the
/// children it forks make must reach the branch, with main's results.
#[test]
fn pjdfstest_bound_to_a_branch() {
    pjdfstest_in_a_branch(true, Worker::Standalone);
}

/// The same in a sandboxed worker (binding reads /proc under Landlock).
#[test]
fn pjdfstest_bound_to_a_branch_sandboxed() {
    pjdfstest_in_a_branch(true, Worker::Sandboxed);
}

/// The same bound and with strict isolation, which checks every request
/// of the bound process against its branch: none of pjdfstest's may be
/// refused.
#[test]
fn pjdfstest_bound_to_a_branch_strict() {
    pjdfstest_in_a_branch(true, Worker::SandboxedStrict);
}

/// How the worker of a pjdfstest run serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Worker {
    Standalone,
    /// As under the supervisor.
    Sandboxed,
    /// As under the supervisor with `strict_isolation = true`.
    SandboxedStrict,
}

/// Runs the suite in `w/` of a new branch, by its path or, if `bound`,
/// as a process bound to the branch at `<mountpoint>/w`; main and the
/// source must stay empty.
fn pjdfstest_in_a_branch(bound: bool, worker: Worker) {
    let builder = common::Mount::builder();
    let mut m = match worker {
        Worker::Standalone => builder.start(),
        Worker::Sandboxed => builder.supervised().over_source().start(),
        Worker::SandboxedStrict => builder.supervised().arg("--strict-isolation").start(),
    };
    common::snapshot(&m, None, "base");
    // Short names: socket tests bind(2) names under the directory, and
    // sun_path holds 108 bytes (the Mount guard's prefix is short too).
    common::branch(&m, "base", "p");
    let by_path = common::branch_dir(&m, "p").join("w");
    fs::create_dir(&by_path).unwrap();
    let in_main = m.path().join("w");
    assert!(!in_main.exists(), "`w` exists in the branch only");
    let bind = |pid: u32| {
        common::bind_pid(&m, "p", pid);
    };
    let (dir, label, bind): (_, _, Option<&dyn Fn(u32)>) = if bound {
        (&in_main, "bound-branch", Some(&bind))
    } else {
        (&by_path, "branch-view", None)
    };
    let label = match worker {
        Worker::Standalone => label.to_owned(),
        Worker::Sandboxed => format!("{label}-sandboxed"),
        Worker::SandboxedStrict => format!("{label}-sandboxed-strict"),
    };
    let label = label.as_str();
    let summary = check_pjdfstest(dir, Path::new(EXPECTED_MAIN), label, bind);
    println!("{summary}");
    assert!(!in_main.exists(), "pjdfstest's work reached main");
    assert_eq!(
        fs::read_dir(m.source()).unwrap().count(),
        0,
        "the branch's files reached the source"
    );
    m.stop();
}

/// The outcome of one pjdfstest test case.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Passed,
    /// Failed, with the panic message pjdfstest printed under it.
    Failed(String),
    /// Skipped, with the reasons pjdfstest printed under it.
    Skipped(String),
}

/// Test cases expected not to pass, each with the reason written down.
#[derive(Debug, Default)]
struct Expected {
    fail: BTreeMap<String, String>,
    skip: BTreeMap<String, String>,
}

/// Runs the whole pjdfstest suite in `dir` and asserts that the test cases
/// that fail and that are skipped are exactly those listed in
/// `expected_file` (format: see `tests/pjdfstest/expected.toml`). `label`
/// names the run in the saved log (`$CARGO_TARGET_TMPDIR/pjdfstest-LABEL.log`).
/// `bind`, when given, is called with pjdfstest's pid before it starts (to
/// bind it to a branch); `dir` may then exist only in what it sees.
///
/// Returns a one-line summary with the counts. Panics with the full list of
/// differences otherwise, and with a clear message when pjdfstest, root or
/// the dummy users are missing: the check is never skipped silently.
fn check_pjdfstest(
    dir: &Path,
    expected_file: &Path,
    label: &str,
    bind: Option<&dyn Fn(u32)>,
) -> String {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "pjdfstest must run as root: without root it skips the test cases \
         that switch users, and the expectations assume they ran"
    );
    let bin = pjdfstest_binary();
    ensure_dummy_users();
    let expected = parse_expected(
        &fs::read_to_string(expected_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", expected_file.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", expected_file.display()));

    // The EXDEV cases need a directory on another file system. A bound run's
    // `dir` may not exist for this (unbound) process: its nearest existing
    // ancestor is on the same file system.
    let secondary = secondary_fs_dir(dir.ancestors().find(|d| d.exists()).unwrap());

    let started = Instant::now();
    let run = run_pjdfstest(&bin, dir, secondary.path(), bind);
    let elapsed = started.elapsed();

    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pjdfstest-{label}.log"));
    let _ = fs::write(&log, &run.stdout);

    let results = parse_output(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "cannot read pjdfstest's output ({e}); exit status {}; stderr:\n{}\nfull output in {}",
            run.status,
            run.stderr,
            log.display()
        )
    });
    let failed = results
        .values()
        .filter(|o| matches!(o, Outcome::Failed(_)))
        .count();
    // No expected_failures in the config: pjdfstest exits non-zero exactly
    // when a test case failed. Anything else is a crash or a config error.
    assert_eq!(
        run.status.success(),
        failed == 0,
        "pjdfstest exited with {} but reported {failed} failures; stderr:\n{}",
        run.status,
        run.stderr
    );

    let passed = results.values().filter(|o| **o == Outcome::Passed).count();
    let skipped = results.len() - passed - failed;
    let summary = format!(
        "pjdfstest summary ({label}, {}): passed={passed} failed={failed} \
         (expected {}) skipped={skipped} (expected {}) total={} in {:.1}s; log: {}",
        dir.display(),
        expected.fail.len(),
        expected.skip.len(),
        results.len(),
        elapsed.as_secs_f64(),
        log.display()
    );

    let report = compare(&results, &expected);
    assert!(
        report.is_empty(),
        "{summary}\n\npjdfstest results differ from {}:\n{report}",
        expected_file.display()
    );
    summary
}

/// Finds the pjdfstest binary and checks its version. Panics with the
/// install command when it is missing: a missing tool must fail, not skip.
fn pjdfstest_binary() -> PathBuf {
    let install = format!("cargo install pjdfstest --version {PJDFSTEST_VERSION} --locked");
    let bin = common::find_program("PJDFSTEST", "pjdfstest").unwrap_or_else(|| {
        panic!("pjdfstest not found (not on PATH, not in ~/.cargo/bin, $PJDFSTEST unset); install it with `{install}`")
    });
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", bin.display()));
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        format!("pjdfstest {PJDFSTEST_VERSION}"),
        "{} is not pjdfstest {PJDFSTEST_VERSION}, which the expectations are written for; \
         install it with `{install}`",
        bin.display()
    );
    bin
}

/// Makes sure the `[dummy_auth]` users of the config exist: `nobody` (group
/// `nogroup`) comes with Debian; `tests` (group `tests`) is created here, as a
/// system user without home or login shell, because nothing else needs it.
fn ensure_dummy_users() {
    use nix::unistd::{Group, User};
    let nobody = User::from_name("nobody")
        .unwrap()
        .expect("user `nobody` is missing (it comes with Debian's base-passwd)");
    let nogroup = Group::from_name("nogroup")
        .unwrap()
        .expect("group `nogroup` is missing (it comes with Debian's base-passwd)");
    assert_eq!(
        nobody.gid, nogroup.gid,
        "user nobody's primary group is not nogroup, as pjdfstest.toml says"
    );
    if User::from_name("tests").unwrap().is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/",
                "--shell",
                "/usr/sbin/nologin",
                "tests",
            ])
            .output()
            .expect("running useradd (package passwd)");
        // Another test process may have created it meanwhile (exit 9).
        assert!(
            out.status.success() || User::from_name("tests").unwrap().is_some(),
            "useradd tests failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tests = User::from_name("tests").unwrap().unwrap();
    let group = Group::from_name("tests")
        .unwrap()
        .expect("group `tests` is missing while user `tests` exists; run `groupadd --system tests` and make it the user's primary group");
    assert_eq!(
        tests.gid, group.gid,
        "user tests' primary group must be the group tests"
    );
}

/// A fresh directory on a file system other than `dir`'s: the host temp dir
/// for a mount, /dev/shm (tmpfs) when `dir` is itself on the host temp dir's
/// file system.
fn secondary_fs_dir(dir: &Path) -> tempfile::TempDir {
    let dev = fs::metadata(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .dev();
    for base in [std::env::temp_dir(), PathBuf::from("/dev/shm")] {
        if fs::metadata(&base).is_ok_and(|m| m.dev() != dev) {
            let d = tempfile::Builder::new()
                .prefix("pjdfstest-secondary-")
                .tempdir_in(&base)
                .unwrap();
            fs::set_permissions(
                d.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
            return d;
        }
    }
    panic!(
        "no directory on a file system other than {}'s for pjdfstest's EXDEV cases",
        dir.display()
    );
}

/// What one pjdfstest process printed, and how it ended.
struct Run {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the whole suite in `dir` (pjdfstest makes and removes its own
/// temporary directory there). Kills it after [`RUN_TIMEOUT`] and panics
/// naming the last test case that completed, since the next one hung.
/// With `bind`, pjdfstest is held until `bind` has been called with its pid.
fn run_pjdfstest(bin: &Path, dir: &Path, secondary: &Path, bind: Option<&dyn Fn(u32)>) -> Run {
    let mut cmd = match bind {
        Some(_) => common::held_command(bin),
        None => {
            let mut c = Command::new(bin);
            c.stdin(Stdio::null());
            c
        }
    };
    let mut child = cmd
        .arg("-c")
        .arg(CONFIG)
        .arg("-p")
        .arg(dir)
        .arg("-s")
        .arg(secondary)
        // Plain text, no backtraces under failures: the output is parsed.
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    if let Some(bind) = bind {
        bind(child.id());
        common::release(&mut child);
    }

    // Read both pipes on threads so a full pipe never stalls pjdfstest and the
    // output seen so far is known when it has to be killed.
    let stdout = Arc::new(Mutex::new(String::new()));
    let out_thread = {
        let stdout = Arc::clone(&stdout);
        let pipe = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut s = stdout.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    let err_thread = {
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };

    let Some(status) = common::wait_timeout(&mut child, RUN_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        let seen = stdout.lock().unwrap().clone();
        let last = seen
            .lines()
            .rev()
            .find_map(|l| parse_result_line(l).map(|(name, _)| name.to_owned()))
            .unwrap_or_else(|| "(none)".into());
        panic!(
            "pjdfstest did not finish within {RUN_TIMEOUT:?} in {}; last test case \
             completed: {last} (the one after it hangs). Output so far:\n{seen}",
            dir.display()
        );
    };
    out_thread.join().unwrap();
    let stderr = err_thread.join().unwrap();
    let stdout = std::mem::take(&mut *stdout.lock().unwrap());
    Run {
        status,
        stdout,
        stderr,
    }
}

/// Removes ANSI colour sequences, in case colours were forced anyway.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte(0x40..=0x7e)
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses one result line of pjdfstest 0.2.2: the test case name at column 0,
/// padding, then the status word(s).
fn parse_result_line(line: &str) -> Option<(&str, &str)> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    let (name, rest) = line.split_once(char::is_whitespace)?;
    let status = rest.trim();
    matches!(
        status,
        "ok" | "FAILED" | "skipped" | "failed as expected" | "PASSED UNEXPECTEDLY"
    )
    .then_some((name, status))
}

/// Parses pjdfstest's whole output into one outcome per test case. The
/// details of a failure or a skip are the tab-indented lines under it. The
/// closing `Summary:` line must be there and its total must match the number
/// of results read, so that a crash or a change of format cannot go unseen.
fn parse_output(raw: &str) -> Result<BTreeMap<String, Outcome>, String> {
    let text = strip_ansi(raw);
    let mut results = BTreeMap::new();
    let mut last: Option<String> = None;
    let mut total: Option<usize> = None;
    for line in text.lines() {
        if let Some(detail) = line.strip_prefix('\t') {
            if let Some(Outcome::Failed(d) | Outcome::Skipped(d)) =
                last.as_ref().and_then(|n| results.get_mut(n))
            {
                if !d.is_empty() {
                    d.push_str(" | ");
                }
                d.push_str(detail.trim());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("Summary:") {
            let t = rest
                .split(',')
                .find_map(|part| part.trim().strip_suffix(" total"))
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| format!("unreadable summary line {line:?}"))?;
            total = Some(t);
            continue;
        }
        if let Some((name, status)) = parse_result_line(line) {
            let outcome = match status {
                "ok" => Outcome::Passed,
                "skipped" => Outcome::Skipped(String::new()),
                "FAILED" => Outcome::Failed(String::new()),
                // Only with `expected_failures` in the config, which ours has not.
                other => return Err(format!("unexpected status {other:?} for {name}")),
            };
            if results.insert(name.to_owned(), outcome).is_some() {
                return Err(format!("test case {name} reported twice"));
            }
            last = Some(name.to_owned());
        }
    }
    let total = total.ok_or("no `Summary:` line: pjdfstest did not finish")?;
    if total != results.len() {
        return Err(format!(
            "summary says {total} test cases but {} result lines were read",
            results.len()
        ));
    }
    Ok(results)
}

/// Parses the expectations file: `[fail]` and `[skip]` sections of
/// `"name" = "reason"` lines, `#` comments. Anything else is rejected rather
/// than guessed at, so a typo cannot silently drop an expectation.
fn parse_expected(text: &str) -> Result<Expected, String> {
    let mut expected = Expected::default();
    let mut section: Option<&str> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            match name.trim() {
                s @ ("fail" | "skip") => section = Some(s),
                other => return Err(format!("line {n}: unknown section [{other}]")),
            }
            continue;
        }
        let bad = || format!("line {n}: expected `\"test::name\" = \"reason\"`, got {raw:?}");
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let unquote = |s: &str| -> Option<String> {
            let s = s.trim().strip_prefix('"')?;
            let end = s.find('"')?;
            let (inner, after) = (&s[..end], s[end + 1..].trim());
            (!inner.contains('\\') && (after.is_empty() || after.starts_with('#')))
                .then(|| inner.to_owned())
        };
        let (name, reason) = (
            unquote(key).ok_or_else(bad)?,
            unquote(value).ok_or_else(bad)?,
        );
        if name.is_empty() || reason.is_empty() {
            return Err(format!("line {n}: empty test name or reason"));
        }
        let map = match section {
            Some("fail") => &mut expected.fail,
            Some("skip") => &mut expected.skip,
            _ => return Err(format!("line {n}: entry outside [fail] / [skip]")),
        };
        if map.insert(name.clone(), reason).is_some() {
            return Err(format!("line {n}: {name} listed twice"));
        }
    }
    if let Some(both) = expected
        .fail
        .keys()
        .find(|k| expected.skip.contains_key(*k))
    {
        return Err(format!("{both} is listed under both [fail] and [skip]"));
    }
    Ok(expected)
}

/// Lists every difference between the results and the expectations; empty
/// when they agree.
fn compare(results: &BTreeMap<String, Outcome>, expected: &Expected) -> String {
    let mut report = String::new();
    let mut section = |title: &str, lines: Vec<String>| {
        if !lines.is_empty() {
            let _ = writeln!(report, "{title} ({}):", lines.len());
            for l in lines {
                let _ = writeln!(report, "  {l}");
            }
        }
    };
    let mut unexpected_fail = Vec::new();
    let mut unexpected_skip = Vec::new();
    let mut unexpected_pass = Vec::new();
    for (name, outcome) in results {
        let reason = expected.fail.get(name).or_else(|| expected.skip.get(name));
        match outcome {
            Outcome::Failed(msg) if !expected.fail.contains_key(name) => {
                let was = reason.map_or(String::new(), |_| " (listed under [skip])".into());
                unexpected_fail.push(format!("{name}{was}: {msg}"));
            }
            Outcome::Skipped(msg) if !expected.skip.contains_key(name) => {
                let was = reason.map_or(String::new(), |_| " (listed under [fail])".into());
                unexpected_skip.push(format!("{name}{was}: {msg}"));
            }
            Outcome::Passed => {
                if let Some(r) = reason {
                    unexpected_pass.push(format!("{name} (listed because: {r})"));
                }
            }
            _ => {}
        }
    }
    let unknown: Vec<String> = expected
        .fail
        .keys()
        .chain(expected.skip.keys())
        .filter(|n| !results.contains_key(*n))
        .map(|n| format!("{n}: no such test case in this pjdfstest run"))
        .collect();
    section(
        "UNEXPECTED FAILURES (regressions, or add them to [fail] with a reason)",
        unexpected_fail,
    );
    section(
        "UNEXPECTED PASSES (remove them from the expectations)",
        unexpected_pass,
    );
    section("UNEXPECTED SKIPS", unexpected_skip);
    section("UNKNOWN NAMES in the expectations", unknown);
    report
}

/// The parsers and the comparison, on a sample of pjdfstest 0.2.2's real
/// output: cheap, and needs neither a mount nor pjdfstest.
#[test]
fn parses_pjdfstest_output_and_expectations() {
    let out = "\
chmod::erofs_named                                                       skipped
\tRemounts (allow_remount) are not allowed in the configuration file
\x1b[34mlink::exdev_target\x1b[0m                                                            \x1b[32mok\x1b[0m
rename::changed_ctime_success::dir                                                 FAILED
\tassertion `left != right` failed
\t  left: 1
rmdir::ebusy                                                                  ok

Summary: 1 failed, 1 skipped, 2 passed, 0 expected failures, 4 total
";
    let results = parse_output(out).unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results["link::exdev_target"], Outcome::Passed);
    assert_eq!(
        results["chmod::erofs_named"],
        Outcome::Skipped(
            "Remounts (allow_remount) are not allowed in the configuration file".into()
        )
    );
    assert_eq!(
        results["rename::changed_ctime_success::dir"],
        Outcome::Failed("assertion `left != right` failed | left: 1".into())
    );
    assert!(parse_output(out.replace("4 total", "5 total").as_str()).is_err());
    assert!(
        parse_output("rmdir::ebusy   ok\n").is_err(),
        "no summary line"
    );

    let expected = parse_expected(
        "# c\n[fail]\n\"rename::changed_ctime_success::dir\" = \"why\" # c\n\
         [skip]\n\"chmod::erofs_named\" = \"remount\"\n\"rmdir::ebusy\" = \"x\"\n\
         \"nope::gone\" = \"y\"\n",
    )
    .unwrap();
    let report = compare(&results, &expected);
    assert!(
        report
            .contains("UNEXPECTED PASSES (remove them from the expectations) (1):\n  rmdir::ebusy")
    );
    assert!(report.contains("nope::gone: no such test case"));
    assert!(!report.contains("UNEXPECTED FAILURES"));

    assert!(
        parse_expected("\"a\" = \"b\"\n").is_err(),
        "outside a section"
    );
    assert!(parse_expected("[fail]\na = b\n").is_err(), "unquoted");
    assert!(parse_expected("[oops]\n").is_err());
    assert!(parse_expected(&fs::read_to_string(EXPECTED_MAIN).unwrap()).is_ok());
}
