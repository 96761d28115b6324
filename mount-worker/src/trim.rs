//! Keeps the worker's open descriptors well under its limit, and its
//! nodes under a bound.
//!
//! The worker holds host descriptors for the nodes the kernel has looked
//! up and not forgotten: main's, snapshots' and branches' directories
//! (files are kept by handle, except on a file system without handles).
//! The kernel forgets a node only once it drops the node's dentries, which
//! it does only under memory pressure: a tree of 20 000 directories would
//! otherwise hold 20 000 descriptors for as long as the machine has memory
//! to spare, and past the open-file limit every lookup, creation and
//! control connection fails with EMFILE. Every node
//! also costs memory (the node table, these names) and a record in the
//! handoff journal, so all nodes have a mark of their own
//! (`--max-cached-nodes`), far above the descriptors' on a small open-file
//! limit: a tree of main, kept by handle, stays cached
//! ([`crate::core::FsCore::load`]).
//!
//! So the trimmer remembers the name under which the kernel knows each
//! non-directory node, and when either count passes its high-water mark
//! it asks the kernel to drop such names (FUSE_NOTIFY_INVAL_ENTRY) until
//! it is back under a low-water mark, the names looked up longest ago
//! first: the files in use now are the ones looked up last. Directories
//! hold descriptors too but have no names here, so where they fill most
//! of the descriptors' mark, files still keep a quarter of it (short of
//! the hard mark): without that, where files hold descriptors, each
//! would lose its name as soon as it was looked up, and each use would
//! look it up again.
//! An inode no process uses then goes, and the kernel's FORGET closes the
//! worker's descriptors; one in use (an open
//! file, a mapping) stays, and its next path lookup finds it again. It is
//! what memory pressure would do, done for descriptors. Directories are
//! never dropped this way: that would detach any mount below them. Past a
//! hard mark, session threads wait a little after their replies
//! ([`Trimmer::throttle`]) so that parallel lookups cannot outrun it.
//!
//! The names it keeps also tell the source watch which node a name removed
//! behind the mount stood for ([`Trimmer::node_named`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::hash::{BuildHasher, RandomState};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use hashbrown::HashTable;

/// How often the node count is checked.
const PERIOD: Duration = Duration::from_millis(50);

/// How long a session thread waits for the trimmer after a reply that
/// left the nodes past the hard mark ([`Trimmer::throttle`]).
const THROTTLE: Duration = Duration::from_millis(10);

/// How long a request waits, before its reply, for names to be dropped
/// ([`Trimmer::forget_now`]).
const NOW_WAIT: Duration = Duration::from_millis(50);

/// Nodes the kernel may keep by default, whatever they hold
/// (`--max-cached-nodes`): each costs the worker about 600 bytes of memory,
/// 800 seen through a branch (its node, its objects, its name here: 54 MiB
/// for 100 000 files of main, 78 MiB through a branch; `bench/rss.sh`)
/// and the handoff journal a record (it holds some 650 000 with names as
/// long as git's objects').
pub const MAX_NODES: usize = 150_000;

/// What `--max-cached-nodes` may be: up to 1.5× the mark may be held, which
/// the handoff journal must keep room for.
pub const MAX_NODES_RANGE: RangeInclusive<u32> = 1000..=400_000;

/// What the kernel's nodes cost the worker ([`crate::core::FsCore::load`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// Nodes that may hold descriptors.
    pub holding: usize,
    /// All nodes.
    pub nodes: usize,
}

/// Marks on one count.
#[derive(Clone, Copy)]
struct Marks {
    /// Past which names are dropped.
    high: usize,
    /// Down to which they are dropped.
    low: usize,
    /// Past which session threads wait for the trimmer: lookups can make
    /// nodes faster than the kernel drops names (it must take each
    /// directory's lock, which the lookups in it hold), and past the
    /// open-file limit every lookup fails with EMFILE.
    hard: usize,
}

impl Marks {
    fn at(high: usize) -> Marks {
        Marks {
            high,
            low: high / 4 * 3,
            hard: high / 2 * 3,
        }
    }

    /// How far `n` is past the low mark, once it is past the high one.
    fn excess(&self, n: usize) -> usize {
        if n > self.high { n - self.low } else { 0 }
    }

    /// The marks left to `files` of these where `others`, which cannot
    /// be trimmed, count too: what the others leave, but never less than
    /// a quarter of each mark, unless that would take the whole past the
    /// hard mark (near the open-file limit, where files get nothing).
    fn beside(&self, others: usize) -> Marks {
        let room = self.hard.saturating_sub(others);
        let share = |mark: usize| mark.saturating_sub(others).max(mark / 4).min(room);
        Marks {
            high: share(self.high),
            low: share(self.low),
            hard: self.hard,
        }
    }
}

/// The names under which the kernel knows non-directory nodes.
pub struct Trimmer {
    names: Mutex<Names>,
    /// On the nodes that may hold descriptors.
    descriptors: Marks,
    /// Past the high mark on nodes that may hold descriptors, the count
    /// up to which the files among them stay within their share of it
    /// (nodes with no name here, directories, hold the rest), as the last
    /// round that looked at every name found: until the count passes it,
    /// no round looks again. 0 once the count is back under the mark.
    descriptors_calm: AtomicUsize,
    /// On all nodes.
    nodes: Marks,
    /// Signalled after each round of the trimmer.
    trimmed: (Mutex<()>, Condvar),
    /// Names to drop at once ([`Trimmer::forget_soon`]).
    soon: Mutex<Soon>,
    /// Set (and signalled) when the count has passed the high mark, so
    /// that the trimmer starts at once: parallel lookups (`git status`'s
    /// preloading threads) make thousands of nodes between two periods.
    due: (Mutex<bool>, Condvar),
}

/// Names to drop at the trimmer's next round, and the requests waiting
/// for them to be dropped.
#[derive(Default)]
struct Soon {
    names: Vec<(u64, OsString)>,
    waiting: Vec<Arc<Dropped>>,
}

/// Set once names a request waits for are dropped.
#[derive(Default)]
struct Dropped {
    done: Mutex<bool>,
    cv: Condvar,
}

/// A name in a directory: (parent node, name).
type Key = (u64, OsString);

/// A node's latest name, and when it was looked up (a key of
/// [`Names::by_age`]).
struct Named {
    parent: u64,
    name: Box<OsStr>,
    age: u64,
}

/// Both directions of one relation, a node's latest name and the node a
/// name stands for, and the order in which the names were looked up. Each
/// name is held once, in `by_node`: the trimmer holds one for every file
/// the kernel keeps (100 000s in a tree kept whole), and a second copy
/// of each was a tenth of the worker's memory.
#[derive(Default)]
struct Names {
    by_node: HashMap<u64, Named>,
    /// The nodes of `by_node` by their names, hashed by `hasher`.
    by_name: HashTable<u64>,
    hasher: RandomState,
    /// Nodes by the time of their name's latest lookup, oldest first.
    by_age: BTreeMap<u64, u64>,
    /// The next lookup's time.
    clock: u64,
}

impl Names {
    fn hash(hasher: &RandomState, parent: u64, name: &OsStr) -> u64 {
        hasher.hash_one((parent, name))
    }

    /// The node `name` in `parent` stands for.
    fn node(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let hash = Names::hash(&self.hasher, parent, name);
        let by_node = &self.by_node;
        self.by_name
            .find(hash, |n| {
                by_node
                    .get(n)
                    .is_some_and(|e| e.parent == parent && &*e.name == name)
            })
            .copied()
    }

    fn remove_name(&mut self, parent: u64, name: &OsStr) -> Option<u64> {
        let node = self.node(parent, name)?;
        self.remove_node(node);
        Some(node)
    }

    fn remove_node(&mut self, node: u64) {
        if let Some(e) = self.by_node.remove(&node) {
            let hash = Names::hash(&self.hasher, e.parent, &e.name);
            if let Ok(found) = self.by_name.find_entry(hash, |&n| n == node) {
                found.remove();
            }
            self.by_age.remove(&e.age);
        }
    }

    fn insert(&mut self, node: u64, parent: u64, name: &OsStr) {
        self.remove_node(node);
        self.remove_name(parent, name);
        let age = self.clock;
        self.clock += 1;
        let hash = Names::hash(&self.hasher, parent, name);
        self.by_node.insert(
            node,
            Named {
                parent,
                name: name.into(),
                age,
            },
        );
        let (by_node, hasher) = (&self.by_node, &self.hasher);
        self.by_name.insert_unique(hash, node, |n| {
            let e = &by_node[n];
            Names::hash(hasher, e.parent, &e.name)
        });
        self.by_age.insert(age, node);
    }

    /// Every name (parent and name) with its node, looked up longest ago
    /// first.
    fn oldest_first(&self) -> impl Iterator<Item = (u64, &OsStr, u64)> {
        self.by_age.values().map(|node| {
            let e = &self.by_node[node];
            (e.parent, &*e.name, *node)
        })
    }
}

impl Trimmer {
    /// A trimmer for a worker that may hold `open_files` descriptors: it
    /// keeps the nodes that may hold descriptors under half of that (a
    /// copied-up branch file's node holds one, a branch directory's one
    /// per layer it merges, and open files and the control channel need
    /// room too), and all nodes under `max_nodes` (see [`MAX_NODES`]).
    /// Dropping names costs lookups again, so the marks are no lower than
    /// they must be.
    pub fn new(open_files: u64, max_nodes: usize) -> Trimmer {
        let high = usize::try_from(open_files / 2)
            .unwrap_or(usize::MAX)
            .max(64);
        Trimmer::with_marks(high, max_nodes.max(64))
    }

    fn with_marks(descriptors: usize, nodes: usize) -> Trimmer {
        Trimmer {
            names: Mutex::default(),
            descriptors: Marks::at(descriptors),
            descriptors_calm: AtomicUsize::new(0),
            nodes: Marks::at(nodes),
            trimmed: (Mutex::new(()), Condvar::new()),
            soon: Mutex::default(),
            due: (Mutex::new(false), Condvar::new()),
        }
    }

    /// The kernel's nodes now cost `load`: wakes the trimmer if a count
    /// is past its high mark. True past a hard mark: the caller should
    /// [`Trimmer::throttle`] once its reply is sent.
    pub fn counted(&self, load: Load) -> bool {
        if self.descriptors_past(load.holding) || self.nodes.excess(load.nodes) > 0 {
            self.wake();
        }
        load.holding > self.descriptors.hard || load.nodes > self.nodes.hard
    }

    /// Whether `holding` nodes that may hold descriptors are past their
    /// high mark and the count the last look at the names found calm.
    fn descriptors_past(&self, holding: usize) -> bool {
        holding
            > self
                .descriptors
                .high
                .max(self.descriptors_calm.load(Ordering::Relaxed))
    }

    /// Starts the trimmer's next round now.
    fn wake(&self) {
        *self.due.0.lock().unwrap() = true;
        self.due.1.notify_one();
    }

    /// Waits for the trimmer's next round, at most [`THROTTLE`]. Only after
    /// a reply: a request still unanswered would hold its directory's lock
    /// in the kernel, which the trimmer may need. With fewer threads
    /// reading requests, lookups queue in the kernel instead of making
    /// nodes, and the trimmer catches up.
    pub fn throttle(&self) {
        let quiet = self.trimmed.0.lock().unwrap();
        drop(self.trimmed.1.wait_timeout(quiet, THROTTLE).unwrap());
    }

    /// The kernel now knows `node` (not a directory) as `name` in `parent`.
    pub fn named(&self, node: u64, parent: u64, name: &OsStr) {
        self.names.lock().unwrap().insert(node, parent, name);
    }

    /// Has the kernel drop `name` in `parent` as soon as the trimmer runs
    /// (never on a request's thread: see [`Trimmer::start`]).
    pub fn forget_soon(&self, parent: u64, name: &OsStr) {
        self.soon
            .lock()
            .unwrap()
            .names
            .push((parent, name.to_owned()));
        self.wake();
    }

    /// Has the kernel drop `names` in `parent` now, and waits until it has,
    /// for at most [`NOW_WAIT`]. The trimmer's thread drops them, not the
    /// caller's (see [`Trimmer::start`]): the kernel takes `parent`'s lock
    /// for it, which a request in flight there may hold, and that request
    /// may wait for a lock the caller's own request holds (a rename from
    /// `parent` into the caller's directory). Past the wait they are
    /// dropped soon after the reply, once that lock is free.
    pub fn forget_now(&self, parent: u64, names: &[&OsStr]) {
        let dropped = Arc::new(Dropped::default());
        {
            let mut soon = self.soon.lock().unwrap();
            soon.names
                .extend(names.iter().map(|&n| (parent, n.to_owned())));
            soon.waiting.push(dropped.clone());
        }
        self.wake();
        let done = dropped.done.lock().unwrap();
        drop(
            dropped
                .cv
                .wait_timeout_while(done, NOW_WAIT, |done| !*done)
                .unwrap(),
        );
    }

    /// The node the kernel knows as `name` in `parent`, as far as the
    /// trimmer knows (names it dropped are gone from here).
    pub fn node_named(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.names.lock().unwrap().node(parent, name)
    }

    /// `name` in `parent` was removed.
    pub fn removed(&self, parent: u64, name: &OsStr) {
        self.names.lock().unwrap().remove_name(parent, name);
    }

    /// `name` in `parent` was renamed to `newname` in `newparent`, or the
    /// two were exchanged.
    pub fn renamed(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        exchange: bool,
    ) {
        let mut names = self.names.lock().unwrap();
        let moved = names.remove_name(parent, name);
        let replaced = names.remove_name(newparent, newname);
        if let Some(node) = moved {
            names.insert(node, newparent, newname);
        }
        if let (true, Some(node)) = (exchange, replaced) {
            names.insert(node, parent, name);
        }
    }

    /// The kernel forgot `node`.
    pub fn forgotten(&self, node: u64) {
        self.names.lock().unwrap().remove_node(node);
    }

    /// The names to drop when the kernel's nodes cost `load`, looked up
    /// longest ago first: taken out, as the kernel will not know them by
    /// these names any more. Past the descriptors' mark, names of nodes
    /// that hold some (`holds` tells which), as many as that count is
    /// past its low mark: dropping others would cost lookups and free
    /// nothing. Nodes that hold some but have no name here (directories)
    /// count, but the named ones keep at least a quarter of the marks
    /// ([`Marks::beside`]). Past the nodes' mark, any, as many as that
    /// count is past its low mark.
    fn victims(&self, load: Load, holds: &dyn Fn(&[u64]) -> Vec<bool>) -> Vec<Key> {
        let heavy = self.descriptors_past(load.holding);
        if load.holding <= self.descriptors.high {
            self.descriptors_calm.store(0, Ordering::Relaxed);
        }
        let any = self.nodes.excess(load.nodes);
        if !heavy && any == 0 {
            return Vec::new();
        }
        let mut take: HashSet<Key> = HashSet::new();
        if heavy {
            // `holds` is asked without the names' lock, which session
            // threads take at each new name: so past this mark every name
            // is copied first.
            let named: Vec<(Key, u64)> = {
                let names = self.names.lock().unwrap();
                names
                    .oldest_first()
                    .map(|(parent, name, n)| ((parent, name.to_owned()), n))
                    .collect()
            };
            let ids: Vec<u64> = named.iter().map(|(_, n)| *n).collect();
            let holding: Vec<Key> = named
                .into_iter()
                .zip(holds(&ids))
                .filter(|(_, h)| *h)
                .map(|((k, _), _)| k)
                .collect();
            // The count may be older than the names: never more files
            // than it.
            let files = holding.len().min(load.holding);
            let others = load.holding - files;
            let marks = self.descriptors.beside(others);
            // No round looks again before the files may pass their mark.
            self.descriptors_calm
                .store(others + marks.high, Ordering::Relaxed);
            take.extend(holding.into_iter().take(marks.excess(files)));
        }
        let mut names = self.names.lock().unwrap();
        if any > take.len() {
            let more = any - take.len();
            let others: Vec<Key> = names
                .oldest_first()
                .map(|(parent, name, _)| (parent, name.to_owned()))
                .filter(|k| !take.contains(k))
                .take(more)
                .collect();
            take.extend(others);
        }
        take.into_iter()
            .filter(|(parent, name)| names.remove_name(*parent, name).is_some())
            .collect()
    }

    /// Runs the trimmer on its own thread (never on a request's: the kernel
    /// takes the parent directory's lock to drop a name, which a request
    /// in flight may hold), reading the nodes' load from `load` and which
    /// nodes hold descriptors from `holds`, until the session's connection
    /// goes away.
    pub fn start(
        self: Arc<Self>,
        notifier: Notifier,
        load: impl Fn() -> Load + Send + 'static,
        holds: impl Fn(&[u64]) -> Vec<bool> + Send + 'static,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("trim".into())
            .spawn(move || {
                loop {
                    {
                        let due = self.due.0.lock().unwrap();
                        let (mut due, _) =
                            self.due.1.wait_timeout_while(due, PERIOD, |d| !*d).unwrap();
                        *due = false;
                    }
                    let soon = std::mem::take(&mut *self.soon.lock().unwrap());
                    // Requests wait for theirs: before the trimming.
                    if !drop_names(&notifier, soon.names) {
                        return;
                    }
                    for d in soon.waiting {
                        *d.done.lock().unwrap() = true;
                        d.cv.notify_all();
                    }
                    let now = load();
                    let trimmed = self.victims(now, &holds);
                    if !trimmed.is_empty() {
                        tracing::debug!(
                            names = trimmed.len(),
                            holding = now.holding,
                            nodes = now.nodes,
                            "dropping cached names"
                        );
                    }
                    if !drop_names(&notifier, trimmed) {
                        return;
                    }
                    self.trimmed.1.notify_all();
                }
            })
            .map(drop)
    }
}

/// Has the kernel drop `names`; false once the connection is gone.
fn drop_names(notifier: &Notifier, names: Vec<(u64, OsString)>) -> bool {
    for (parent, name) in names {
        match notifier.inval_entry(INodeNo(parent), &name) {
            Ok(()) => {}
            // Already gone from the kernel's cache.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                tracing::debug!("trimmer stops: {e}");
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn names_follow_renames_exchanges_and_removals() {
        let t = Trimmer::new(4000, MAX_NODES);
        t.named(10, 1, n("a"));
        t.named(11, 1, n("b"));
        t.renamed(1, n("a"), 2, n("c"), false);
        t.renamed(2, n("c"), 1, n("b"), true);
        {
            let names = t.names.lock().unwrap();
            assert_eq!(names.node(1, n("b")), Some(10));
            assert_eq!(names.node(2, n("c")), Some(11));
            assert_eq!(names.by_node.len(), 2);
        }
        // A rename over a name: the node it stood for has no name now.
        t.renamed(1, n("b"), 2, n("c"), false);
        t.removed(2, n("c"));
        t.forgotten(11);
        let names = t.names.lock().unwrap();
        assert!(names.by_node.is_empty() && names.by_name.is_empty() && names.by_age.is_empty());
    }

    fn load(holding: usize, nodes: usize) -> Load {
        Load { holding, nodes }
    }

    fn all(nodes: &[u64]) -> Vec<bool> {
        vec![true; nodes.len()]
    }

    /// The number in a name `f<i>`.
    fn number(name: &OsStr) -> u64 {
        name.to_str().unwrap()[1..].parse().unwrap()
    }

    /// The numbers of the names `f<i>` dropped, in order.
    fn numbers(v: &[Key]) -> Vec<u64> {
        let mut v: Vec<u64> = v.iter().map(|(_, name)| number(name)).collect();
        v.sort_unstable();
        v
    }

    /// Past the descriptors' mark only names of nodes that hold some go.
    #[test]
    fn past_the_descriptors_mark_only_nodes_holding_some_lose_names() {
        let t = Trimmer::with_marks(100, 1000); // descriptors: high 100, low 75
        for i in 0..300 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        // Nodes 100..150 hold descriptors: 50 of them, with 55 that have
        // no name (105 past the high mark), 30 past the low mark.
        let holds = |nodes: &[u64]| nodes.iter().map(|&n| n < 150).collect();
        let v = t.victims(load(105, 300), &holds);
        assert_eq!(numbers(&v), (0..30).collect::<Vec<_>>(), "the oldest");
        assert_eq!(t.names.lock().unwrap().by_node.len(), 270);
        // Only directories past the mark (no file holds any): none goes.
        let none = |nodes: &[u64]| vec![false; nodes.len()];
        assert!(t.victims(load(200, 270), &none).is_empty());
    }

    #[test]
    fn names_are_dropped_only_past_the_high_mark_and_down_to_the_low() {
        let t = Trimmer::new(200, MAX_NODES); // high 100, low 75
        for i in 0..150 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        assert!(t.victims(load(100, 150), &all).is_empty());
        let v = t.victims(load(150, 150), &all);
        assert_eq!(v.len(), 75);
        assert_eq!(t.names.lock().unwrap().by_node.len(), 75);
    }

    /// Nodes that hold no descriptor are bounded by their own mark.
    #[test]
    fn nodes_without_descriptors_have_a_mark_of_their_own() {
        let t = Trimmer::with_marks(100, 1000); // nodes: high 1000, low 750
        for i in 0..1200 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        assert!(!t.counted(load(10, 1000)));
        assert!(t.victims(load(10, 1000), &all).is_empty());
        assert_eq!(t.victims(load(10, 1200), &all).len(), 450);
        assert!(t.counted(load(10, 1501)), "past the hard mark");
        // The further count decides.
        assert_eq!(t.victims(load(130, 1100), &all).len(), 350);
        assert_eq!(t.victims(load(200, 800), &all).len(), 125);
    }

    /// The names looked up longest ago go first; a name looked up again
    /// is young again.
    #[test]
    fn the_names_looked_up_longest_ago_go_first() {
        let t = Trimmer::with_marks(10_000, 100); // nodes: high 100, low 75
        for i in 0..120 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        for i in 0..10 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        let v = t.victims(load(0, 120), &all);
        assert_eq!(numbers(&v), (10..55).collect::<Vec<_>>());
    }

    fn due(t: &Trimmer) -> bool {
        std::mem::take(&mut *t.due.0.lock().unwrap())
    }

    /// Where nodes with no name here (directories) fill the descriptors'
    /// mark, the files keep a quarter of it, and no round looks at the
    /// names again until they pass it.
    #[test]
    fn files_keep_a_share_of_the_descriptors_mark_that_directories_fill() {
        // Descriptors: high 100, low 75; a quarter of each: 25 and 18.
        let t = Trimmer::with_marks(100, 10_000);
        for i in 0..60 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        // 90 directories and the 60 files hold descriptors.
        assert!(!t.counted(load(150, 150)) && due(&t));
        let v = t.victims(load(150, 150), &all);
        assert_eq!(numbers(&v), (0..42).collect::<Vec<_>>(), "down to 18");
        // The files are within their share: the names are not looked at.
        let unasked = |_: &[u64]| -> Vec<bool> { panic!("names looked at") };
        assert!(t.victims(load(108, 108), &unasked).is_empty());
        assert!(!t.counted(load(115, 115)) && !due(&t));
        // Past it, the oldest go down to the share again.
        for i in 60..70 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        assert!(!t.counted(load(118, 118)) && due(&t));
        let v = t.victims(load(118, 118), &all);
        assert_eq!(numbers(&v), (42..52).collect::<Vec<_>>());
        // Once the directories are forgotten, the whole mark counts again.
        assert!(t.victims(load(60, 60), &unasked).is_empty());
        assert!(t.counted(load(160, 160)) && due(&t));
    }

    /// Near the hard mark the files' share shrinks, and past it with the
    /// directories alone they keep nothing.
    #[test]
    fn the_files_share_never_takes_the_count_past_the_hard_mark() {
        let t = Trimmer::with_marks(100, 10_000); // descriptors: hard 150
        for i in 0..40 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        // 140 directories: room for 10 files, not 25.
        let v = t.victims(load(180, 180), &all);
        assert_eq!(numbers(&v), (0..30).collect::<Vec<_>>());
        // 160 directories: none.
        for i in 40..50 {
            t.named(100 + i, 1, n(&format!("f{i}")));
        }
        let v = t.victims(load(180, 180), &all);
        assert_eq!(numbers(&v), (30..50).collect::<Vec<_>>());
    }
}
