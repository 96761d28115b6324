//! Bindings: which branch a calling process sees where a path enters the
//! mount (the mount root). By pid (the process, its threads, and every
//! descendant forked after the bind) or by cgroup v2 subtree. A request's
//! pid is a thread id; it is mapped to its process through `/proc`.
//! Descendants are recognised by the kernel's fork events as they are
//! born ([`Bindings::follow_processes`]) and by their parent chain; exit
//! events end the bindings of processes that are gone.
//!
//! Contract 2.3/2.4, specs/semantics.md "Bindings".

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde::{Deserialize, Serialize};

use crate::control::{ControlError, ErrorKind};
use crate::hostfs;
use crate::proc_events::{ProcEvent, ProcEvents};
use crate::root_cache::RootCache;
use crate::snapshot::BranchId;

/// What a binding applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// No deny_unknown_fields here or on Binding: serde cannot combine it with
// `flatten`; the catalog's own check still refuses unknown top-level keys.
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Subject {
    /// A process and the descendants it forks after `since`.
    Pid {
        /// Its pid (a thread group id).
        pid: i32,
        /// Its start time (field 22 of `/proc/PID/stat`, clock ticks after
        /// boot): a reused pid has another, so it never inherits the binding.
        start: u64,
        /// When it was bound, in the same unit: children started before it
        /// are not bound.
        since: u64,
        /// `/proc/sys/kernel/random/boot_id` when bound: pid bindings do not
        /// survive a reboot (the processes are gone).
        boot: String,
    },
    /// Every process whose cgroup v2 path is `path` or below it.
    Cgroup {
        /// Normalised cgroup path: starts with `/`, no trailing `/`.
        path: String,
    },
}

/// One binding, as persisted in the catalog and listed to users.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Who is bound.
    #[serde(flatten)]
    pub subject: Subject,
    /// The branch they see.
    pub branch: BranchId,
}

/// The bindings of one mount and a cache of resolved callers.
pub struct Bindings {
    state: RwLock<State>,
    /// Answers of [`Bindings::resolve`] per process, valid for one
    /// generation of the bindings.
    cache: Mutex<HashMap<i32, Cached>>,
    /// Held by a change from reading the list to swapping it.
    changing: Mutex<()>,
    /// The kernel's cache of the mount root, shared while nothing is
    /// bound; installed by [`Bindings::share_root`].
    root: OnceLock<RootCache>,
}

struct State {
    list: Vec<Binding>,
    /// Advances with every change of `list`.
    generation: u64,
    /// Processes that reached a branch through a bound ancestor, by pid:
    /// they keep it when that ancestor exits and they are reparented. In
    /// memory only.
    inherited: HashMap<i32, Inherited>,
}

#[derive(Clone, Copy)]
struct Inherited {
    /// The process's start time (a reused pid has another).
    start: u64,
    branch: BranchId,
    /// The pid binding it comes from.
    from: (i32, u64),
}

#[derive(Clone, Copy)]
struct Cached {
    start: u64,
    generation: u64,
    answer: Option<BranchId>,
}

/// Entries above which the caches are emptied (they refill on demand).
const CACHE_MAX: usize = 65536;
/// How far up the parent chain a caller is followed.
const MAX_DEPTH: usize = 128;
/// The start time [`Bindings::on_fork`] records for a child that exited
/// before its fork event was read: no live process has it.
const UNKNOWN_START: u64 = u64::MAX;

/// What `/proc/PID/stat` says about a process.
struct ProcStat {
    /// State `Z`: every thread has exited, or only the first one has.
    zombie: bool,
    ppid: i32,
    start: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis, the last one in the line.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        zombie: *f.first()? == "Z",
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// Whether the process `pid` that started at `start` still lives. A
/// zombie does not: it waits to be reaped and makes no requests, so a
/// binding must not outlive the process on a parent slow to reap it.
/// Unless its first thread exited while others run: it is then a
/// zombie in `/proc` too, with more than one thread counted.
fn lives(pid: i32, start: u64) -> bool {
    proc_stat(pid).is_some_and(|p| p.start == start && alive(pid, &p))
}

/// Whether process `pid`, as `/proc` shows it in `p`, is not a zombie
/// that only waits to be reaped (see [`lives`]).
fn alive(pid: i32, p: &ProcStat) -> bool {
    !p.zombie || threads(pid) > 1
}

/// The number of threads of process `pid` (a zombie's first thread
/// counts until it is reaped).
fn threads(pid: i32) -> usize {
    hostfs::proc_status(pid, "Threads")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The process (thread group) of thread `tid`.
fn tgid_of(tid: i32) -> Option<i32> {
    hostfs::proc_status(tid, "Tgid")?.parse().ok()
}

/// The cgroup v2 path of a process (`0::` line of `/proc/PID/cgroup`).
fn cgroup_of(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_owned())
}

/// Now, in the unit of process start times: clock ticks since boot.
fn now_ticks() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ts.tv_sec as u64 * hz + ts.tv_nsec as u64 * hz / 1_000_000_000
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid systems).
fn cgroup_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2").then(|| pre.split(' ').nth(4))?
        })
        .map_or_else(|| PathBuf::from("/sys/fs/cgroup"), PathBuf::from)
}

/// A cgroup as users spell it (`/a/b`, or its directory under the cgroup
/// file system) in the form of `/proc/PID/cgroup`: `/a/b`, `/` for the root.
fn normalise_cgroup(cgroup: &str) -> Result<String, ControlError> {
    let invalid = |why: &str| {
        ControlError::new(
            ErrorKind::InvalidArgument,
            format!("invalid cgroup {cgroup:?}: {why}"),
        )
    };
    let root = cgroup_root();
    let path = Path::new(cgroup);
    let rel = path
        .strip_prefix(&root)
        .or_else(|_| path.strip_prefix("/sys/fs/cgroup"))
        .map(|p| format!("/{}", p.display()))
        .unwrap_or_else(|_| cgroup.to_owned());
    if !rel.starts_with('/') {
        return Err(invalid("give an absolute cgroup path, such as /agents/a1"));
    }
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(invalid("'.' and '..' are not allowed"));
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The directory of a cgroup as users spell it (see [`normalise_cgroup`]).
pub fn cgroup_dir(cgroup: &str) -> Result<PathBuf, ControlError> {
    let path = normalise_cgroup(cgroup)?;
    Ok(cgroup_root().join(path.trim_start_matches('/')))
}

/// Whether cgroup `path` is `bound` or below it.
fn cgroup_within(path: &str, bound: &str) -> bool {
    bound == "/"
        || path == bound
        || (path.starts_with(bound) && path.as_bytes().get(bound.len()) == Some(&b'/'))
}

fn is_live(s: &Subject) -> bool {
    match s {
        Subject::Pid { pid, start, .. } => lives(*pid, *start),
        Subject::Cgroup { .. } => true,
    }
}

/// Whether binding `b` still applies: its subject lives, or (a pid
/// binding whose process exited) a process that inherited it from there
/// does: children stay bound after their bound parent exits.
fn in_effect(st: &State, b: &Binding) -> bool {
    if is_live(&b.subject) {
        return true;
    }
    let Subject::Pid { pid, start, .. } = b.subject else {
        return true;
    };
    st.inherited
        .iter()
        .any(|(&p, i)| i.from == (pid, start) && lives(p, i.start))
}

/// Whether a binding covers process `tgid`: its own pid binding, or one
/// it inherited.
fn covers(st: &State, tgid: i32) -> bool {
    st.inherited.contains_key(&tgid)
        || st
            .list
            .iter()
            .any(|b| matches!(b.subject, Subject::Pid { pid, .. } if pid == tgid))
}

fn not_bound(what: String) -> ControlError {
    ControlError::new(
        ErrorKind::NotFound,
        format!("{what} is not bound; `binding-list` shows the bindings"),
    )
}

impl Bindings {
    /// The bindings saved in the catalog, minus pid bindings whose process
    /// is gone or that were made before the last reboot.
    pub fn new(saved: Vec<Binding>) -> Bindings {
        let boot_now = boot_id();
        let list = saved
            .into_iter()
            .filter(|b| match &b.subject {
                Subject::Pid { boot, .. } => *boot == boot_now && is_live(&b.subject),
                Subject::Cgroup { .. } => true,
            })
            .collect();
        Bindings {
            state: RwLock::new(State {
                list,
                generation: 0,
                inherited: HashMap::new(),
            }),
            cache: Mutex::new(HashMap::new()),
            changing: Mutex::new(()),
            root: OnceLock::new(),
        }
    }

    /// Whether the kernel may cache the mount root's attributes: only
    /// while nothing is bound, when the root is main's for everyone.
    pub fn root_shared(&self) -> bool {
        self.root.get().is_some_and(RootCache::shared)
    }

    /// Whether the kernel may cache what a reply says of `name` at the
    /// mount root (see [`RootCache::cacheable`]).
    pub fn root_name_cacheable(&self, name: &OsStr) -> bool {
        self.root.get().is_some_and(|r| r.cacheable(name))
    }

    /// Lets the kernel cache the mount root while nothing is bound.
    pub fn share_root(&self, root: RootCache) {
        let _one_at_a_time = self.changing.lock().unwrap();
        let empty = self.state.read().unwrap().list.is_empty();
        if let (Ok(()), true) = (self.root.set(root), empty) {
            self.root.get().expect("just set").start();
        }
    }

    /// The current bindings (what the catalog persists and `binding-list`
    /// shows), dropping pid bindings whose process has exited.
    pub fn records(&self) -> Vec<Binding> {
        let st = self.state.read().unwrap();
        st.list
            .iter()
            .filter(|b| in_effect(&st, b))
            .cloned()
            .collect()
    }

    /// Replaces the list with `edit`'s result once `persist` accepted it.
    /// Changes are made one at a time, but the list is locked only to
    /// swap it: persisting (a catalog write and fsync) must not hold off
    /// `resolve`, which every FUSE request entering at the root needs, nor
    /// `records`; a stream of binds would otherwise starve them.
    fn change<T>(
        &self,
        edit: impl FnOnce(&mut Vec<Binding>) -> Result<T, ControlError>,
        persist: impl FnOnce(&[Binding]) -> Result<(), ControlError>,
    ) -> Result<T, ControlError> {
        let _one_at_a_time = self.changing.lock().unwrap();
        let mut next = self.records();
        let out = edit(&mut next)?;
        persist(&next)?;
        self.install(next);
        Ok(out)
    }

    /// Makes `next` the list; the caller holds `changing`. The kernel
    /// forgets what it cached at the root before the first binding takes
    /// effect, and caches it again once none is left.
    fn install(&self, next: Vec<Binding>) {
        let root = self.root.get();
        let was_empty = self.state.read().unwrap().list.is_empty();
        if let (Some(root), true, false) = (root, was_empty, next.is_empty()) {
            root.stop();
        }
        let emptied = !was_empty && next.is_empty();
        let mut st = self.state.write().unwrap();
        let kept: Vec<(i32, u64)> = next
            .iter()
            .filter_map(|b| match b.subject {
                Subject::Pid { pid, start, .. } => Some((pid, start)),
                Subject::Cgroup { .. } => None,
            })
            .collect();
        st.inherited.retain(|_, i| kept.contains(&i.from));
        st.list = next;
        st.generation += 1;
        drop(st);
        if let (Some(root), true) = (root, emptied) {
            root.start();
        }
    }

    /// Looks at processes `pids` after one of their threads exited: drops
    /// what they inherited if they are gone, and every pid binding that no
    /// longer applies (its process and all that inherited from it are
    /// gone), so that a bound process that exits without unbinding does
    /// not keep the root uncached. The catalog keeps such bindings until
    /// the next change; a worker that starts drops them too. Called once
    /// every fork event before the exits has been read: a binding is in
    /// effect through any child it knows of.
    fn prune(&self, pids: &[i32]) {
        let _one_at_a_time = self.changing.lock().unwrap();
        self.state
            .write()
            .unwrap()
            .inherited
            .retain(|p, i| !pids.contains(p) || lives(*p, i.start));
        let next = self.records();
        if next.len() != self.state.read().unwrap().list.len() {
            tracing::debug!(
                left = next.len(),
                "bindings of processes that have exited dropped"
            );
            self.install(next);
        }
    }

    /// Binds process `pid` (a thread id names its process) to `branch`,
    /// replacing an existing binding of that process. `persist` is called
    /// with the new list before it takes effect; its error aborts the bind.
    pub fn bind_pid(
        &self,
        pid: i32,
        branch: BranchId,
        persist: impl FnOnce(&[Binding]) -> Result<(), ControlError>,
    ) -> Result<Binding, ControlError> {
        if pid <= 0 {
            return Err(ControlError::new(
                ErrorKind::InvalidArgument,
                format!("invalid pid {pid}: pids are positive"),
            ));
        }
        let gone = || {
            ControlError::new(
                ErrorKind::NotFound,
                format!("no process with pid {pid}; is it still running?"),
            )
        };
        let tgid = tgid_of(pid).ok_or_else(gone)?;
        let start = proc_stat(tgid)
            .filter(|p| alive(tgid, p))
            .ok_or_else(gone)?
            .start;
        let binding = Binding {
            subject: Subject::Pid {
                pid: tgid,
                start,
                since: now_ticks(),
                boot: boot_id(),
            },
            branch,
        };
        let b = binding.clone();
        self.change(
            move |list| {
                list.retain(|x| !matches!(x.subject, Subject::Pid { pid: p, .. } if p == tgid));
                list.push(b);
                Ok(())
            },
            persist,
        )?;
        // Its exit event may have come before the binding was listed.
        if !lives(tgid, start) {
            self.prune(&[tgid]);
        }
        Ok(binding)
    }

    /// Binds a cgroup v2 subtree to `branch` (replacing an existing binding
    /// of the same cgroup).
    pub fn bind_cgroup(
        &self,
        cgroup: &str,
        branch: BranchId,
        persist: impl FnOnce(&[Binding]) -> Result<(), ControlError>,
    ) -> Result<Binding, ControlError> {
        let path = normalise_cgroup(cgroup)?;
        let dir = cgroup_dir(&path)?;
        if !dir.is_dir() {
            return Err(ControlError::new(
                ErrorKind::NotFound,
                format!(
                    "no cgroup {path} ({} is not a directory); create it first",
                    dir.display()
                ),
            ));
        }
        let binding = Binding {
            subject: Subject::Cgroup { path: path.clone() },
            branch,
        };
        let b = binding.clone();
        self.change(
            move |list| {
                list.retain(|x| !matches!(&x.subject, Subject::Cgroup { path: p } if *p == path));
                list.push(b);
                Ok(())
            },
            persist,
        )?;
        Ok(binding)
    }

    /// Removes the binding of process `pid`.
    pub fn unbind_pid(
        &self,
        pid: i32,
        persist: impl FnOnce(&[Binding]) -> Result<(), ControlError>,
    ) -> Result<Binding, ControlError> {
        let tgid = tgid_of(pid).unwrap_or(pid);
        self.change(
            |list| {
                let i = list
                    .iter()
                    .position(|x| matches!(x.subject, Subject::Pid { pid: p, .. } if p == tgid))
                    .ok_or_else(|| not_bound(format!("pid {pid}")))?;
                Ok(list.remove(i))
            },
            persist,
        )
    }

    /// Removes the binding of a cgroup.
    pub fn unbind_cgroup(
        &self,
        cgroup: &str,
        persist: impl FnOnce(&[Binding]) -> Result<(), ControlError>,
    ) -> Result<Binding, ControlError> {
        let path = normalise_cgroup(cgroup)?;
        self.change(
            |list| {
                let i = list
                    .iter()
                    .position(|x| matches!(&x.subject, Subject::Cgroup { path: p } if *p == path))
                    .ok_or_else(|| not_bound(format!("cgroup {path}")))?;
                Ok(list.remove(i))
            },
            persist,
        )
    }

    /// Removes every binding to `branch` (it is being deleted).
    pub fn unbind_branch(
        &self,
        branch: BranchId,
        persist: impl FnOnce(&[Binding]) -> Result<(), ControlError>,
    ) -> Result<Vec<Binding>, ControlError> {
        self.change(
            |list| {
                let (gone, kept) = list.drain(..).partition(|x| x.branch == branch);
                *list = kept;
                Ok(gone)
            },
            persist,
        )
    }

    /// The live bindings to `branch`.
    pub fn bound_to(&self, branch: BranchId) -> Vec<Binding> {
        let mut out = self.records();
        out.retain(|b| b.branch == branch);
        out
    }

    /// Feeds the kernel's fork events to [`Bindings::on_fork`] from a
    /// thread of its own, so that a bound process's children stay bound
    /// even when it exits before they use the mount, and its exit events
    /// to [`Bindings::prune`]. Without the events (no
    /// CAP_NET_ADMIN) children are still found through their parent chain
    /// while it lasts, and bindings of exited processes are dropped at the
    /// next change only. The caller subscribes ([`ProcEvents::subscribe`]):
    /// the worker does so before it drops CAP_NET_ADMIN.
    pub fn follow_processes(self: &Arc<Self>, events: std::io::Result<ProcEvents>) {
        let events = match events {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(
                    "no process events ({e}): a child of a bound process whose parent exits before it uses the mount sees main"
                );
                return;
            }
        };
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("proc-events".into())
            .spawn(move || {
                // Covered processes with a thread that exited, kept until
                // every event before them has been read: the kernel sends
                // an exit once the process is a zombie, but the forks of
                // its children may still wait in the socket.
                let mut exited = Vec::new();
                while let Some(b) = weak.upgrade() {
                    let on = |e| match e {
                        ProcEvent::Fork { parent, child } => b.on_fork(parent, child),
                        ProcEvent::Exit { tgid } => {
                            if covers(&b.state.read().unwrap(), tgid) && !exited.contains(&tgid) {
                                exited.push(tgid);
                            }
                        }
                    };
                    if let Err(e) = events.next(on) {
                        tracing::warn!("process events stopped: {e}");
                        return;
                    }
                    if !exited.is_empty() && !events.pending() {
                        b.prune(&std::mem::take(&mut exited));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the process-events thread: {e}");
        }
    }

    /// Process `parent` forked `child` (both thread group ids, from
    /// [`crate::proc_events`]): if the parent is bound, directly or by
    /// inheritance, the child is from now on, whatever becomes of the
    /// parent.
    pub fn on_fork(&self, parent: i32, child: i32) {
        let found = {
            let st = self.state.read().unwrap();
            // Most forks on the host are not ours: no /proc reads for them.
            if !covers(&st, parent) {
                return;
            }
            // Either may be gone by the time the event is read (a shell
            // that starts `cmd &` and exits at once). A dead parent is
            // taken by pid alone: its record is that process, whose exit
            // came after this fork. A dead child is recorded with
            // UNKNOWN_START, which no live process has, so that only its
            // own forks (read next) inherit through it.
            let p_start = proc_stat(parent).map(|p| p.start);
            let c_start = proc_stat(child).map_or(UNKNOWN_START, |c| c.start);
            let direct = st.list.iter().find_map(|b| match b.subject {
                Subject::Pid {
                    pid, start, since, ..
                } if pid == parent && p_start.is_none_or(|s| s == start) => {
                    Some((b.branch, (pid, start), since))
                }
                _ => None,
            });
            let via = direct.or_else(|| {
                let i = st
                    .inherited
                    .get(&parent)
                    .filter(|i| p_start.is_none_or(|s| s == i.start))?;
                Some((i.branch, i.from, 0))
            });
            match via {
                Some((branch, from, since)) if c_start >= since => Some(Inherited {
                    start: c_start,
                    branch,
                    from,
                }),
                _ => None,
            }
        };
        if let Some(inherited) = found {
            self.inherit(child, inherited);
        }
    }

    /// Records that process `pid` inherited a binding, unless that binding
    /// went while it was being found (it must not come back this way).
    fn inherit(&self, pid: i32, inherited: Inherited) {
        let mut st = self.state.write().unwrap();
        let (from_pid, from_start) = inherited.from;
        if pid_binding(&st, from_pid, from_start).is_none() {
            return;
        }
        if st.inherited.len() >= CACHE_MAX {
            st.inherited.clear();
        }
        st.inherited.insert(pid, inherited);
    }

    /// The branch the thread `tid` (a FUSE request's pid) sees at the mount
    /// root; `None` is main. Precedence: a pid binding of the process, then
    /// of its nearest bound ancestor (if the process started after that
    /// bind), then the longest bound cgroup prefix, then main.
    pub fn resolve(&self, tid: u32) -> Option<BranchId> {
        let st = self.state.read().unwrap();
        // Nothing bound: no /proc reads on the way into main.
        if st.list.is_empty() {
            return None;
        }
        let tgid = tgid_of(i32::try_from(tid).ok()?)?;
        let me = proc_stat(tgid)?;
        if let Some(c) = self.cache.lock().unwrap().get(&tgid) {
            if c.start == me.start && c.generation == st.generation {
                return c.answer;
            }
        }
        let (answer, via) = resolve_in(&st, tgid, &me);
        let generation = st.generation;
        drop(st);
        if let Some(from) = via {
            let branch = answer.expect("inherited from a bound ancestor");
            let inherited = Inherited {
                start: me.start,
                branch,
                from,
            };
            self.inherit(tgid, inherited);
        }
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            tgid,
            Cached {
                start: me.start,
                generation,
                answer,
            },
        );
        answer
    }
}

/// The branch of process `tgid`, and the pid binding it inherits it from
/// if that is how it was found.
/// The branch and bind time of the pid binding of process `pid` started
/// at `start`, if it is listed.
fn pid_binding(st: &State, pid: i32, start: u64) -> Option<(BranchId, u64)> {
    st.list.iter().find_map(|b| match b.subject {
        Subject::Pid {
            pid: p,
            start: s,
            since,
            ..
        } if p == pid && s == start => Some((b.branch, since)),
        _ => None,
    })
}

fn resolve_in(st: &State, tgid: i32, me: &ProcStat) -> (Option<BranchId>, Option<(i32, u64)>) {
    if let Some((branch, _)) = pid_binding(st, tgid, me.start) {
        return (Some(branch), None);
    }
    if let Some(i) = st.inherited.get(&tgid).filter(|i| i.start == me.start) {
        return (Some(i.branch), None);
    }
    // The nearest bound ancestor, if the process below it on the chain
    // was started after the bind (children forked before it are not bound).
    let (mut below_start, mut cur) = (me.start, me.ppid);
    for _ in 0..MAX_DEPTH {
        if cur <= 1 {
            break;
        }
        let Some(p) = proc_stat(cur) else { break };
        if let Some((branch, since)) = pid_binding(st, cur, p.start) {
            if below_start >= since {
                return (Some(branch), Some((cur, p.start)));
            }
            break;
        }
        if let Some(i) = st.inherited.get(&cur).filter(|i| i.start == p.start) {
            return (Some(i.branch), Some(i.from));
        }
        (below_start, cur) = (p.start, p.ppid);
    }
    let Some(cg) = cgroup_of(tgid) else {
        return (None, None);
    };
    let best = st
        .list
        .iter()
        .filter_map(|b| match &b.subject {
            Subject::Cgroup { path } if cgroup_within(&cg, path) => Some((path.len(), b.branch)),
            _ => None,
        })
        .max_by_key(|(len, _)| *len);
    (best.map(|(_, b)| b), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::time::Duration;

    fn ok(_: &[Binding]) -> Result<(), ControlError> {
        Ok(())
    }

    /// A `sleep` child, killed and reaped on drop.
    struct Sleeper(Child);

    impl Sleeper {
        fn start() -> Sleeper {
            Sleeper(Command::new("sleep").arg("30").spawn().unwrap())
        }
        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn cgroup_paths_are_normalised_and_matched_by_component() {
        assert_eq!(normalise_cgroup("/a/b/").unwrap(), "/a/b");
        assert_eq!(normalise_cgroup("/").unwrap(), "/");
        let under_root = format!("{}/x/y", cgroup_root().display());
        assert_eq!(normalise_cgroup(&under_root).unwrap(), "/x/y");
        for bad in ["a/b", "/a/../b", "/./a"] {
            let e = normalise_cgroup(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad}");
            assert!(e.message.contains(bad), "{}", e.message);
        }
        assert!(cgroup_within("/a/b", "/a"));
        assert!(cgroup_within("/a", "/a"));
        assert!(cgroup_within("/a", "/"));
        assert!(!cgroup_within("/ab", "/a"));
    }

    #[test]
    fn a_pid_binding_covers_threads_and_later_children_only() {
        let before = Sleeper::start();
        std::thread::sleep(Duration::from_millis(50));
        let b = Bindings::new(Vec::new());
        let me = std::process::id() as i32;
        b.bind_pid(me, BranchId(7), ok).unwrap();
        assert_eq!(b.resolve(me as u32), Some(BranchId(7)));
        // Another thread of this process, while it runs.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().ok();
        });
        let tid = tid_rx.recv().unwrap() as u32;
        assert_ne!(tid, me as u32);
        assert_eq!(b.resolve(tid), Some(BranchId(7)));
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let after = Sleeper::start();
        assert_eq!(b.resolve(after.pid()), Some(BranchId(7)));
        assert_eq!(b.resolve(before.pid()), None, "forked before the bind");
        assert_eq!(b.bound_to(BranchId(7)).len(), 1);
        b.unbind_pid(me, ok).unwrap();
        assert_eq!(b.resolve(me as u32), None);
        assert_eq!(
            b.resolve(after.pid()),
            None,
            "inheritance ends with the bind"
        );
        let e = b.unbind_pid(me, ok).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains(&me.to_string()), "{}", e.message);
    }

    #[test]
    fn children_stay_bound_after_their_bound_parent_exits() {
        let b = Arc::new(Bindings::new(Vec::new()));
        b.follow_processes(ProcEvents::subscribe());
        let me = std::process::id() as i32;
        b.bind_pid(me, BranchId(5), ok).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        // sh forks a sleep and exits at once: the sleep is reparented, so
        // its parent chain no longer leads here.
        let out = Command::new("sh")
            .args(["-c", "sleep 30 >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let orphan: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        let _reap = scopeguard(orphan);
        let ppid = proc_stat(orphan as i32).unwrap().ppid;
        assert_ne!(ppid, me, "reparented away from us");
        let seen = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            b.resolve(orphan) == Some(BranchId(5))
        });
        assert!(seen, "the orphaned grandchild lost the binding");
    }

    #[test]
    fn children_keep_their_branch_when_the_bound_process_exits_and_bindings_change() {
        use std::io::{BufRead, Write};
        let b = Arc::new(Bindings::new(Vec::new()));
        b.follow_processes(ProcEvents::subscribe());
        // A bound shell whose subshell starts a sleep in the background;
        // both exit at once, the sleep is left.
        let mut sh = Command::new("sh")
            .args(["-c", "read go; (sleep 30 >/dev/null 2>&1 & echo $!)"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        b.bind_pid(sh.id() as i32, BranchId(5), ok).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        sh.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(sh.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let orphan: u32 = line.trim().parse().unwrap();
        let _reap = scopeguard(orphan);
        sh.wait().unwrap();
        let seen = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            b.resolve(orphan) == Some(BranchId(5))
        });
        assert!(seen, "the orphan lost the binding of its exited parent");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            listed(&b),
            vec![BranchId(5)],
            "the orphan keeps it in effect"
        );
        // Any later change of the bindings (here another process bound).
        let me = std::process::id() as i32;
        b.bind_pid(me, BranchId(6), ok).unwrap();
        assert_eq!(
            b.resolve(orphan),
            Some(BranchId(5)),
            "after another binding"
        );
        // The last process that inherited it exits: the binding ends, the
        // other stays.
        drop(_reap);
        assert!(
            soon(|| listed(&b) == vec![BranchId(6)]),
            "the binding outlived every process it covered"
        );
    }

    /// A bound process that exits without unbinding ends its binding at
    /// once, even while its parent has not reaped it (a zombie).
    #[test]
    fn a_binding_ends_when_its_process_exits_unreaped() {
        let b = Arc::new(Bindings::new(Vec::new()));
        b.follow_processes(ProcEvents::subscribe());
        let mut s = Sleeper::start();
        b.bind_pid(s.pid() as i32, BranchId(4), ok).unwrap();
        assert_eq!(listed(&b), vec![BranchId(4)]);
        s.0.kill().unwrap();
        assert!(soon(|| listed(&b).is_empty()), "a zombie kept its binding");
        s.0.wait().unwrap();
    }

    /// The branches of the list itself (what decides whether the root is
    /// cached), not of [`Bindings::records`], which filters on each call.
    fn listed(b: &Bindings) -> Vec<BranchId> {
        let st = b.state.read().unwrap();
        st.list.iter().map(|b| b.branch).collect()
    }

    /// Whether `cond` holds within two seconds.
    fn soon(mut cond: impl FnMut() -> bool) -> bool {
        (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            cond()
        })
    }

    /// Kills the process `pid` (started by the test) when dropped.
    fn scopeguard(pid: u32) -> impl Drop {
        struct Kill(u32);
        impl Drop for Kill {
            fn drop(&mut self) {
                // SAFETY: plain kill(2) of a process this test started.
                unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
            }
        }
        Kill(pid)
    }

    #[test]
    fn dead_and_reused_pids_are_not_bound() {
        let b = Bindings::new(Vec::new());
        let mut s = Sleeper::start();
        let pid = s.pid() as i32;
        b.bind_pid(pid, BranchId(3), ok).unwrap();
        assert_eq!(b.records().len(), 1);
        s.0.kill().unwrap();
        s.0.wait().unwrap();
        assert!(b.records().is_empty(), "the process exited");
        let e = b.bind_pid(pid, BranchId(3), ok).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains(&pid.to_string()));
        // A saved binding whose start time is not the live process's (the
        // pid was reused) is dropped when loaded.
        let live = Sleeper::start();
        let fake = Binding {
            subject: Subject::Pid {
                pid: live.pid() as i32,
                start: 1,
                since: 0,
                boot: boot_id(),
            },
            branch: BranchId(3),
        };
        let b = Bindings::new(vec![fake]);
        assert!(b.records().is_empty());
        assert_eq!(b.resolve(live.pid()), None);
    }

    #[test]
    fn a_failed_persist_changes_nothing() {
        let b = Bindings::new(Vec::new());
        let me = std::process::id() as i32;
        let e = b
            .bind_pid(me, BranchId(2), |_| {
                Err(ControlError::new(ErrorKind::NoSpace, "full"))
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert!(b.records().is_empty());
        assert_eq!(b.resolve(me as u32), None);
    }

    #[test]
    fn cgroup_bindings_need_an_existing_cgroup() {
        let b = Bindings::new(Vec::new());
        let e = b
            .bind_cgroup("/agentfs-no-such-cgroup", BranchId(1), ok)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.message.contains("/agentfs-no-such-cgroup"));
        b.bind_cgroup("/", BranchId(1), ok).unwrap();
        // Every process is in the root's subtree.
        assert_eq!(b.resolve(std::process::id()), Some(BranchId(1)));
        b.unbind_cgroup("/", ok).unwrap();
        assert_eq!(b.resolve(std::process::id()), None);
    }
}
