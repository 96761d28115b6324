//! The control protocol under generated input: every request a client can
//! spell, with any names, ids, pids and cgroups, and lines that are not
//! requests at all, sent to a real control socket served by a real FsCore.
//! Each gets a reply (a result or a named error), nothing panics, and the
//! worker keeps answering.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use agentfs_mount_worker::control::{self, Request};
use agentfs_mount_worker::core::FsCore;
use proptest::prelude::*;

/// Names as clients may send them: plausible, hostile and arbitrary.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,6}",
        Just(String::new()),
        Just("..".to_owned()),
        Just("a/b".to_owned()),
        Just("x".repeat(300)),
        any::<String>(),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let opt = || proptest::option::of(name());
    let pid = prop_oneof![Just(1), Just(0), Just(-1), Just(i32::MAX), any::<i32>()];
    let cgroup = prop_oneof![
        Just("/".to_owned()),
        Just("/../../etc".to_owned()),
        Just("/sys/fs/cgroup/none".to_owned()),
        name(),
    ];
    prop_oneof![
        (opt(), opt()).prop_map(|(branch, name)| Request::SnapshotCreate { branch, name }),
        Just(Request::SnapshotList {}),
        name().prop_map(|snapshot| Request::SnapshotDelete { snapshot }),
        (name(), opt()).prop_map(|(snapshot, name)| Request::BranchCreate { snapshot, name }),
        Just(Request::BranchList {}),
        (name(), any::<bool>()).prop_map(|(branch, force)| Request::BranchDelete { branch, force }),
        (name(), pid.clone()).prop_map(|(branch, pid)| Request::BindPid { branch, pid }),
        (name(), cgroup.clone())
            .prop_map(|(branch, cgroup)| Request::BindCgroup { branch, cgroup }),
        pid.prop_map(|pid| Request::UnbindPid { pid }),
        cgroup.prop_map(|cgroup| Request::UnbindCgroup { cgroup }),
        Just(Request::BindingList {}),
    ]
}

/// A request line, or something else entirely.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => request().prop_map(|r| serde_json::to_vec(&r).unwrap()),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        1 => Just(br#"{"op":"snapshot-create","name":"a","colour":1}"#.to_vec()),
        1 => Just(br#"{"op":"bind-pid","branch":"a","pid":"12"}"#.to_vec()),
        1 => Just(vec![b'{'; 10_000]),
    ]
}

/// Sends one line, returns the reply line.
fn exchange(state: &Path, line: &[u8]) -> String {
    let mut s = UnixStream::connect(state.join(control::SOCKET)).unwrap();
    let mut msg = line
        .iter()
        .copied()
        .filter(|b| *b != b'\n')
        .collect::<Vec<_>>();
    msg.push(b'\n');
    s.write_all(&msg).unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    reply
}

#[test]
fn any_control_input_gets_an_answer_and_the_worker_keeps_serving() {
    let base = tempfile::Builder::new()
        .prefix("aft-control-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (source, state) = (base.path().join("src"), base.path().join("state"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(source.join("f"), "main").unwrap();
    let dir = std::fs::File::open(&source).unwrap();
    let core = FsCore::new(
        std::os::fd::AsFd::as_fd(&dir),
        &state,
        Err(std::io::Error::other("no fork events in this test")),
    )
    .unwrap();
    let _server = control::serve(&state, Arc::new(core)).unwrap();
    // A snapshot and a branch for generated requests to hit now and then.
    for r in [
        Request::SnapshotCreate {
            branch: None,
            name: Some("a".into()),
        },
        Request::BranchCreate {
            snapshot: "a".into(),
            name: Some("b".into()),
        },
    ] {
        let reply = exchange(&state, &serde_json::to_vec(&r).unwrap());
        assert!(reply.contains(r#""ok":true"#), "{reply}");
    }
    let config = ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(line in line())| {
        let reply = exchange(&state, &line);
        let v: serde_json::Value = serde_json::from_str(&reply)
            .map_err(|e| TestCaseError::fail(format!("not a reply: {reply:?}: {e}")))?;
        match v["ok"] {
            serde_json::Value::Bool(true) => {}
            serde_json::Value::Bool(false) => {
                let message = v["error"]["message"].as_str().unwrap_or_default();
                prop_assert!(!message.is_empty(), "an error without a message: {}", reply);
            }
            _ => prop_assert!(false, "no ok field: {}", reply),
        }
    });
    // Still serving, and the catalog still reads.
    let reply = exchange(&state, br#"{"op":"snapshot-list"}"#);
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    let check = agentfs_mount_worker::check::check(&state).unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
}
