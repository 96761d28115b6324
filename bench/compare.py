#!/usr/bin/env python3
"""AgentFS side by side with the host directory and its peers.

Runs each workload, in one run, on: the host directory (the limit), AgentFS
main, an AgentFS branch by path (.agentfs/branches/<name>/), an AgentFS
branch through pid binding (at the mount root), fuse-overlayfs and kernel
overlayfs, and AgentFS main as the service runs it (supervised: the
connection shared with a handoff journal for crash takeover); prints speed
ratios to the host (host time / time: 1.00 is the
host's speed, higher is faster). Then 1, 2 and 8 processes at once, each
bound to its own branch against all bound to one, the worker's RSS after
each workload, and snapshot/branch creation at 1 000 to 1 000 000 files
(bench/create.sh). Writes JSON, a Markdown table and an SVG chart to
bench/results/. A benchmark, not a test: it asserts nothing; a workload
that fails on a target is recorded as failed, with its error.

    sudo bench/compare.py [--size-mib N] [--files N] [--tree-files N]
                          [--parallel 1,2,8] [--create-sizes 1000,...]
                          [--only WORKLOAD,...] [--label NAME]
                          [--passthrough auto|on|off]
                          [--variants NAME:WORKER ARGS,...]

`--variants` adds AgentFS main targets (agentfs-main-NAME) whose workers
get extra arguments, for comparison in the same run; the default,
`pt-on:--passthrough on`, shows main with passthrough for writers too.

Needs root, fio, fuse-overlayfs, git and cargo (scripts/install-deps.sh and
`apt-get install fio fuse-overlayfs`). Leaves nothing mounted.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "target" / "release"
RESULTS = REPO / "bench" / "results"
# The most processes of the concurrency workload, each on its own branch.
MAX_PARALLEL = 8


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def unmount(path):
    for cmd in (["fusermount3", "-u", str(path)], ["umount", str(path)],
                ["umount", "-l", str(path)]):
        if not mounted(path):
            return
        subprocess.run(cmd, stderr=subprocess.DEVNULL)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Failed(Exception):
    """A workload failed on a target: recorded in the results, not fatal."""


def started(workdir, script, bind=None):
    """A bash running `script` in `workdir` once released (see `release`),
    bound first by `bind(pid)` if given."""
    proc = subprocess.Popen(
        ["bash", "-c", "read _; cd \"$0\" && " + script, str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if bind:
        try:
            bind(proc.pid)
        except subprocess.CalledProcessError as e:
            proc.kill()
            proc.wait()
            raise Failed(f"binding failed: {e.stderr.decode(errors='replace').strip() if e.stderr else e}")
    return proc


def release(procs):
    """Lets `started` processes go; returns the seconds until all ended."""
    t0 = time.monotonic()
    for p in procs:
        p.stdin.write(b"go\n")
        p.stdin.close()
    errors = [p.stderr.read().decode(errors="replace") for p in procs]
    for p in procs:
        p.wait()
    secs = time.monotonic() - t0
    for p, err in zip(procs, errors):
        if p.returncode != 0:
            last = (err.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            raise Failed(last[:200])
    return secs


class Target:
    """A directory to run workloads in; `bind` (if set) binds a pid first."""

    def __init__(self, name, workdir, bind=None):
        self.name, self.workdir, self.bind = name, Path(workdir), bind

    def time(self, script, cold=False):
        """Runs a bash script in the work directory; returns seconds."""
        if cold:
            drop_caches()
        return release([started(self.workdir, script, self.bind)])


class AgentFS:
    """A standalone worker with `--passthrough policy`: main, a branch by
    path and one by binding; or, as a variant named `variant`, main only,
    with the worker arguments `extra`."""

    def __init__(self, base, passthrough="auto", variant=None, extra=()):
        name = f"afs-{variant}" if variant else "afs"
        self.variant, branches = variant, variant is None
        self.agent = None
        self.src, self.mnt, self.state = (base / f"{name}-src", base / f"{name}-mnt",
                                          base / f"{name}-state")
        for d in (self.src, self.mnt):
            d.mkdir()
        self.worker = subprocess.Popen(
            [BIN / "agentfs-mount-worker", "--source", self.src, "--mountpoint", self.mnt,
             "--state-dir", self.state,
             *([] if "--passthrough" in extra else ["--passthrough", passthrough]), *extra],
            stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if mounted(self.mnt):
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("the AgentFS worker did not mount")
            if branches:
                self.ctl("snapshot-create", "--name", "base")
                for b in ("bp", "bb", "one") + tuple(f"c{i}" for i in range(MAX_PARALLEL)):
                    self.ctl("branch-create", "--snapshot", "base", "--name", b)
                (self.mnt / ".agentfs/branches/bp/w").mkdir()
            (self.mnt / "w").mkdir()
        except BaseException:
            self.close()
            raise

    def ctl(self, *args):
        run([BIN / "agentfs-workerctl", "--state-dir", self.state, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def bind(self, pid, branch="bb"):
        self.ctl("branch-bind", "--branch", branch, "--pid", str(pid))

    def targets(self):
        if self.variant:
            return [Target(f"agentfs-main-{self.variant}", self.mnt / "w")]
        bound_dir = self.mnt / "w"
        return [
            Target("agentfs-main", self.mnt / "w"),
            Target("agentfs-branch-path", self.mnt / ".agentfs/branches/bp/w"),
            Target("agentfs-branch-bound", bound_dir, self.bind),
        ]

    def setup_bound(self):
        # The bound branch's work directory exists only in that branch.
        t = Target("setup", self.mnt, self.bind)
        t.time("mkdir -p w")
        # An agent's shell, bound for the whole run, as on an agent host:
        # each bound workload is then a second binding. Without it every
        # bound workload would be the first binding and its end the last
        # unbinding, and each makes the kernel forget every cached name
        # of the mount (root_cache.rs), main's too: main's next workload
        # would look its whole tree up again (see bench/results/README.md).
        self.agent = subprocess.Popen(["sleep", "infinity"])
        self.bind(self.agent.pid)

    def rss_mib(self):
        for line in Path(f"/proc/{self.worker.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return None

    def close(self):
        if self.agent:
            self.agent.kill()
            self.agent.wait()
        self.worker.terminate()
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        unmount(self.mnt)


class Supervised:
    """AgentFS as the service runs it: agentfs-supervisor on a private bus
    mounts and hands the connection to a sandboxed worker that keeps a
    handoff journal (crash takeover) and shares one /dev/fuse descriptor
    among its threads, mounted over its source as a config without
    `mountpoint` has it (so the kernel also remembers absent names). Main
    only: branches cost the same as above."""

    def __init__(self, base, passthrough):
        d = base / "sup"
        self.mnt, conf = d / "src", d / "mounts"
        for p in (self.mnt, conf):
            p.mkdir(parents=True)
        (d / "bus.conf").write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd"><busconfig>'
            f'<type>session</type><listen>unix:path={d / "bus"}</listen><auth>EXTERNAL</auth>'
            '<policy context="default"><allow user="*"/><allow own="*"/>'
            '<allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>'
            '</policy></busconfig>')
        self.address = f"unix:path={d / 'bus'}"
        self.bus = subprocess.Popen(["dbus-daemon", f"--config-file={d / 'bus.conf'}", "--nofork"],
                                    stderr=subprocess.DEVNULL)
        (conf / "bench.toml").write_text(f'source = "{self.mnt}"\n'
                                         f'[fuse]\npassthrough = "{passthrough}"\n')
        for _ in range(200):
            if (d / "bus").exists():
                break
            time.sleep(0.05)
        self.sup = subprocess.Popen(
            [BIN / "agentfs-supervisor", "--bus-address", self.address, "--config-dir", conf,
             "--state-root", d / "state", "--worker", BIN / "agentfs-mount-worker"],
            stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if subprocess.run(self.busctl("StartMount", "s", "bench"), capture_output=True,
                                  timeout=30).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("the supervised mount did not start")
            (self.mnt / "w").mkdir()
        except BaseException:
            self.close()
            raise

    def busctl(self, method, *args):
        return ["busctl", f"--address={self.address}", "call", "org.agentfs", "/org/agentfs",
                "org.agentfs.Manager1", method, *args]

    def targets(self):
        return [Target("agentfs-supervised", self.mnt / "w")]

    def close(self):
        subprocess.run(self.busctl("StopMount", "s", "bench"), capture_output=True)
        for p in (self.sup, self.bus):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        unmount(self.mnt)


class Overlay:
    """Kernel overlayfs or fuse-overlayfs over an empty lower directory."""

    def __init__(self, base, kind):
        self.kind = kind
        d = {n: base / f"{kind}-{n}" for n in ("lower", "upper", "work", "mnt")}
        for p in d.values():
            p.mkdir()
        opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}"
        if kind == "kernel-overlayfs":
            run(["mount", "-t", "overlay", "overlay", "-o", opts, d["mnt"]])
        else:
            run(["fuse-overlayfs", "-o", opts, d["mnt"]])
        self.mnt = d["mnt"]
        (self.mnt / "w").mkdir()

    def targets(self):
        return [Target(self.kind, self.mnt / "w")]

    def close(self):
        unmount(self.mnt)


def make_tree_tarball(base, files):
    """A tarball of a real source tree of `files` files: crate sources,
    headers, documentation and Python modules found on this machine, in
    their own directory layout."""
    roots = [Path.home() / ".cargo/registry/src", Path("/usr/include"), Path("/usr/share/doc"),
             Path("/usr/lib/python3")]
    tree = base / "tree-src"

    def sources():
        for i, root in enumerate(roots):
            for dirpath, dirnames, names in os.walk(root):
                dirnames.sort()
                for n in sorted(names):
                    src = Path(dirpath) / n
                    if src.is_file() and not src.is_symlink():
                        yield src, tree / f"{i}-{root.name}" / src.relative_to(root)

    count = 0
    for src, dst in sources():
        if count == files:
            break
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        count += 1
    tarball = base / "tree.tar"
    run(["tar", "-cf", tarball, "-C", tree, "."])
    shutil.rmtree(tree)
    return tarball, count


def small_crate(base):
    """A dependency-free crate of a few modules, for `cargo build`."""
    c = base / "crate"
    (c / "src").mkdir(parents=True)
    (c / "Cargo.toml").write_text('[package]\nname = "bench-crate"\nversion = "0.1.0"\n'
                                  'edition = "2021"\n')
    mods = []
    for i in range(20):
        mods.append(f"mod m{i};")
        body = "\n".join(f"pub fn f{j}(x: u64) -> u64 {{ x.wrapping_mul({j + 3}).rotate_left({j % 7}) }}"
                         for j in range(200))
        (c / "src" / f"m{i}.rs").write_text(body + "\n")
    (c / "src/main.rs").write_text("#![allow(dead_code)]\n" + "\n".join(mods)
                                   + '\nfn main() { println!("{}", m0::f1(2)); }\n')
    return c


def groups(size_mib, tarball, crate, meta_files):
    """The workloads, in groups that share files: [(workloads, cleanup,
    prime)], a workload being (name, untimed setup or None, timed script,
    cold caches). A target that fails one workload skips the rest of its
    group. The clean-up (untimed) keeps one group's files from weighing on
    the next, as a worker holds a descriptor for every inode the kernel
    caches. The prime (untimed, on the host, before the group) loads what
    the first target would otherwise load alone (the toolchain)."""
    # --invalidate=0: fio would otherwise drop the file's pages before each
    # job, which makes "warm" runs cold on the host but not under a FUSE
    # server (whose host pages stay cached); cold runs drop every cache.
    fio = ("fio --output-format=terse --name=b --ioengine=psync --filename=data "
           f"--invalidate=0 --size={size_mib}M ")
    meta = ("python3 -c 'import os,sys\nn=int(sys.argv[1])\n"
            "[os.close(os.open(\"f%d\"%i, os.O_CREAT|os.O_WRONLY, 0o644)) for i in range(n)]\n"
            "[os.stat(\"f%d\"%i) for i in range(n)]\n[os.unlink(\"f%d\"%i) for i in range(n)]' "
            f"{meta_files}")
    return [
        ([("seq-write", None, fio + "--rw=write --bs=1M --end_fsync=1", False),
          ("seq-read-cold", None, fio + "--rw=read --bs=1M", True),
          ("seq-read-warm", None, fio + "--rw=read --bs=1M", False),
          # Warm means all of the file cached: what the previous workloads
          # left in the page cache (shared with the FUSE servers' own host
          # reads) would otherwise decide.
          ("rand-read-4k", "cat data >/dev/null",
           fio + "--rw=randread --bs=4k --io_size=256M", False),
          ("rand-write-4k", None,
           fio + "--rw=randwrite --bs=4k --io_size=64M --end_fsync=1", False)],
         "rm -f data", None),
        ([(f"create-stat-unlink-{meta_files}", None, meta, False)], None, None),
        ([("tree-extract", None, f"mkdir t && tar -xf {tarball} -C t", False),
          # No automatic gc: a commit of 20 000 loose objects would start
          # one in the background, running through the measurements.
          ("git-status", "cd t && git init -q && git config gc.auto 0 && "
           "git config maintenance.auto false && git add -A && git -c user.name=b -c "
           "user.email=b@b commit -qm t && find . -name '*.rs' | head -200 | "
           "xargs -I{} sh -c 'echo // >> {}'",
           "cd t && git status --porcelain", False),
          ("git-diff", None, "cd t && git diff", False)],
         "rm -rf t", None),
        ([("cargo-build", f"cp -r {crate} c",
           "cd c && CARGO_TARGET_DIR=target cargo build --offline -q", False)],
         "rm -rf c",
         f"cp -r {crate} prime && cd prime && CARGO_TARGET_DIR=target cargo build --offline -q "
         "&& cd .. && rm -rf prime"),
    ]


# One process of the concurrency workload: small files written, stat'ed,
# read back and removed, and a 64 MiB file written with fdatasync and read.
PARALLEL_WORK = """python3 -c '
import os
for i in range(1000):
    with open("f%d" % i, "wb") as f: f.write(b"x" * 4096)
for i in range(1000): os.stat("f%d" % i)
for i in range(1000):
    with open("f%d" % i, "rb") as f: f.read()
for i in range(1000): os.unlink("f%d" % i)
with open("big", "wb") as f:
    for _ in range(64): f.write(b"y" * (1 << 20))
    os.fdatasync(f.fileno())
with open("big", "rb") as f:
    while f.read(1 << 20): pass
os.unlink("big")
'"""


def concurrency(afs, host_dir, counts):
    """n processes at once, each bound to its own branch and working on the
    same paths, against n processes bound to one branch (each in its own
    directory there) and n processes on the host. Returns rows of seconds
    (the median of 3 runs)."""
    rows = []
    for n in counts:
        row = {"processes": n}
        cases = [
            ("host", lambda i: (host_dir, f"p{i}", None)),
            ("one-branch", lambda i: (afs.mnt, f"p{i}", "one")),
            ("own-branches", lambda i: (afs.mnt, "p", f"c{i}")),
        ]
        for case, where in cases:
            times = []
            try:
                for _ in range(3):
                    procs = []
                    for i in range(n):
                        root, sub, branch = where(i)
                        bind = (lambda pid, b=branch: afs.bind(pid, b)) if branch else None
                        procs.append(started(root, f"mkdir -p par/{sub} && cd par/{sub} && "
                                             + PARALLEL_WORK, bind))
                    times.append(release(procs))
                row[case] = round(sorted(times)[1], 4)
            except Failed as e:
                row[case] = None
                row[f"{case}-error"] = str(e)
        one, own = row.get("one-branch"), row.get("own-branches")
        row["own/one"] = round(own / one, 3) if one and own else None
        print(f"concurrency {n} processes: " + ", ".join(
            f"{k} {v}" for k, v in row.items() if k != "processes"), flush=True)
        rows.append(row)
    return rows


def creation(sizes):
    """bench/create.sh's table (snapshot and branch creation at scale)."""
    if not sizes:
        return None
    out = subprocess.run([REPO / "bench" / "create.sh", *map(str, sizes)], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    print(out, flush=True)
    return out


def svg_chart(results, targets, names):
    w_group, bar, left, top, height = 90, 12, 60, 30, 260
    width = left + w_group * len(names) + 160
    vmax = max([1.2] + [r for n in names for t in targets
                        if (r := results[n][t].get("ratio")) is not None])
    colors = ["#555", "#1f77b4", "#2ca02c", "#17becf", "#ff7f0e", "#d62728", "#9467bd"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 120}" '
           'font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="15" font-size="12">Speed relative to the host directory '
           '(host time / time; 1.0 = host)</text>']
    y1 = top + height - height / vmax
    out.append(f'<line x1="{left}" x2="{width - 160}" y1="{y1:.1f}" y2="{y1:.1f}" '
               'stroke="#999" stroke-dasharray="4"/>')
    for gi, n in enumerate(names):
        x0 = left + gi * w_group
        for ti, t in enumerate(targets):
            r = results[n][t].get("ratio")
            if r is None:
                continue
            h = height * r / vmax
            out.append(f'<rect x="{x0 + ti * bar}" y="{top + height - h:.1f}" width="{bar - 2}" '
                       f'height="{h:.1f}" fill="{colors[ti % len(colors)]}"/>')
        out.append(f'<text transform="translate({x0 + 10},{top + height + 10}) rotate(40)">{n}</text>')
    for ti, t in enumerate(targets):
        y = top + 14 * ti
        out.append(f'<rect x="{width - 150}" y="{y}" width="10" height="10" '
                   f'fill="{colors[ti % len(colors)]}"/><text x="{width - 135}" y="{y + 9}">{t}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="sequential file size (MiB)")
    ap.add_argument("--files", type=int, default=20000, help="files for the metadata workload")
    ap.add_argument("--tree-files", type=int, default=20000, help="files in the extracted tree")
    ap.add_argument("--parallel", default="1,2,8",
                    help="process counts of the concurrency workload (at most 8; empty: skip)")
    ap.add_argument("--create-sizes", default="1000,100000,1000000",
                    help="tree sizes of the snapshot/branch creation run (empty: skip)")
    ap.add_argument("--only", help="comma-separated workload names (prefixes)")
    ap.add_argument("--label", default="", help="suffix of the result file names")
    ap.add_argument("--passthrough", default="auto", choices=("auto", "on", "off"),
                    help="[fuse] passthrough of the AgentFS targets (default: the default, auto)")
    ap.add_argument("--variants", default="pt-on:--passthrough on",
                    help="comma-separated NAME:WORKER ARGS of extra AgentFS main targets, "
                         "named agentfs-main-NAME (empty: none)")
    args = ap.parse_args()
    # TERM (from `timeout`, say) unwinds like ^C, through the clean-up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if os.geteuid() != 0:
        sys.exit("compare.py: run as root (mounts, drop_caches)")
    counts = [int(n) for n in args.parallel.split(",") if n]
    if any(not 1 <= n <= MAX_PARALLEL for n in counts):
        sys.exit(f"compare.py: --parallel counts must be 1..{MAX_PARALLEL}")
    run(["cargo", "build", "--release", "--quiet", "-p", "agentfs-mount-worker",
         "-p", "agentfs-supervisor", "--bins"], cwd=REPO)
    base = Path(tempfile.mkdtemp(prefix="agentfs-cmp-", dir="/var/tmp"))
    mounts = []
    try:
        tarball, tree_files = make_tree_tarball(base, args.tree_files)
        crate = small_crate(base)
        (base / "host").mkdir()
        afs = AgentFS(base, args.passthrough)
        mounts.append(afs)
        afs.setup_bound()
        for v in [v for v in args.variants.split(",") if v]:
            name, _, extra = v.partition(":")
            mounts.append(AgentFS(base, args.passthrough, variant=name, extra=extra.split()))
        mounts.append(Supervised(base, args.passthrough))
        for kind in ("fuse-overlayfs", "kernel-overlayfs"):
            mounts.append(Overlay(base, kind))
        targets = [Target("host", base / "host")] + afs.targets() + \
            [t for m in mounts[1:] for t in m.targets()]
        results, names, rss = {}, [], {}
        for group, cleanup, prime in groups(args.size_mib, tarball, crate, args.files):
            failed = {}
            if prime and (not args.only or any(n.startswith(p) for n, *_ in group
                                               for p in args.only.split(","))):
                targets[0].time(prime)
            for name, setup, script, cold in group:
                if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                    continue
                names.append(name)
                results[name] = {}
                for t in targets:
                    r = results[name][t.name] = {}
                    try:
                        if t.name in failed:
                            raise Failed(f"skipped: {failed[t.name]}")
                        if setup:
                            t.time(setup)
                        r["seconds"] = round(t.time(script, cold), 4)
                        print(f"{name:28} {t.name:22} {r['seconds']:9.3f} s", flush=True)
                    except Failed as e:
                        failed.setdefault(t.name, f"{name} failed")
                        r["error"] = str(e)
                        print(f"{name:28} {t.name:22} failed: {e}", flush=True)
                host = results[name]["host"].get("seconds")
                for r in results[name].values():
                    if host and r.get("seconds"):
                        r["ratio"] = round(host / r["seconds"], 3)
                rss[name] = round(afs.rss_mib(), 1)
            if cleanup:
                for t in targets:
                    try:
                        t.time(cleanup)
                    except Failed:
                        pass
        parallel = concurrency(afs, base / "host", counts) if counts else []
        rss["concurrency"] = round(afs.rss_mib(), 1)
    finally:
        # A second ^C (or a TERM) must not cut the clean-up short.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        for m in reversed(mounts):
            m.close()
        shutil.rmtree(base, ignore_errors=True)
    create_table = creation([int(n) for n in args.create_sizes.split(",") if n])
    tnames = [t.name for t in targets]
    meta = {
        "date": datetime.date.today().isoformat(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "size_mib": args.size_mib,
        "meta_files": args.files,
        "tree_files": tree_files,
        "passthrough": args.passthrough,
        "variants": args.variants,
    }
    stem = f"compare-{meta['date']}{('-' + args.label) if args.label else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "results": results, "worker_rss_mib": rss, "concurrency": parallel,
         "creation": create_table}, indent=2))

    def cell(r):
        if "seconds" in r:
            return f"{r.get('ratio', 0):.2f} ({r['seconds']:.2f} s)"
        return "failed: " + r["error"].replace("|", "/")

    lines = [f"# AgentFS side by side, {meta['date']}", "",
             f"Kernel {meta['kernel']}, {meta['cpus']} CPUs, open-file limit "
             f"{meta['open_files_limit'][1]}; sequential files {args.size_mib} MiB; "
             f"metadata {args.files} files; tree of {tree_files} files. Cells: speed ratio to "
             "the host (host time / time; 1.00 = the host's speed, higher is faster) and "
             "seconds. Made by `bench/compare.py`.", "",
             "| workload | " + " | ".join(tnames) + " | worker RSS (MiB) |",
             "|---|" + "---|" * (len(tnames) + 1)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(cell(results[n][t]) for t in tnames)
                     + f" | {rss[n]} |")
    if parallel:
        lines += ["", "Processes working at once (seconds, median of 3; own/one: each on "
                  "its own branch at the same paths, against all on one branch; "
                  "target ≤ 1.3):", "",
                  "| processes | host | one branch | own branches | own/one |",
                  "|---|---|---|---|---|"]
        for row in parallel:
            lines.append(f"| {row['processes']} | {row.get('host')} | {row.get('one-branch')} "
                         f"| {row.get('own-branches')} | {row.get('own/one')} |")
    if create_table:
        lines += ["", "Snapshot and branch creation (`bench/create.sh`):", "", create_table]
    table = "\n".join(lines) + "\n"
    (RESULTS / f"{stem}.md").write_text(table)
    (RESULTS / f"{stem}.svg").write_text(svg_chart(results, tnames, names))
    print()
    print(table)
    print(f"written: bench/results/{stem}.{{json,md,svg}}")


if __name__ == "__main__":
    main()
