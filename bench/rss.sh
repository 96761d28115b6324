#!/usr/bin/env bash
# The worker's memory (RSS) with a tree of FILES files (default 100 000, in
# directories of 100) that the kernel keeps whole: made in the source and
# walked through main, walked through a branch of it (main's files shown
# through the branch), and made inside a branch (the branch's own files,
# kept by handle). Each case in a worker of its own. A benchmark, not a
# test: it prints a table, it asserts nothing. Needs root; leaves nothing
# mounted.
# Usage: sudo bench/rss.sh [FILES]
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-100000}
cargo build --release --quiet -p agentfs-mount-worker --bins
bin=target/release
work=$(mktemp -d /var/tmp/agentfs-bench-XXXXXX)
pid=
cleanup() {
  cd /
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  grep -q " $work/mnt " /proc/self/mounts && fusermount3 -u -z "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT

# make DIR: FILES one-byte files in directories of 100.
make() {
  python3 - "$1" "$files" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%05d" % (i // 100))
    if i % 100 == 0:
        os.mkdir(d)
    with open(os.path.join(d, "f%d" % i), "w") as f:
        f.write("x")
PY
}
ctl() { "$bin/agentfs-workerctl" --state-dir "$work/state" "$@" >/dev/null; }
start() {
  rm -rf "$work/src" "$work/state"; mkdir -p "$work/src" "$work/mnt"
  env -u JOURNAL_STREAM "$bin/agentfs-mount-worker" --source "$work/src" --mountpoint "$work/mnt" --state-dir "$work/state" 2>"$work/worker.log" &
  pid=$!
  for _ in $(seq 100); do grep -q " $work/mnt fuse.agentfs " /proc/self/mounts && break; sleep 0.05; done
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }
mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status"; }
# row CASE DIR: walks DIR (every name looked up, every file stat'ed) and
# prints the worker's RSS before and after, and its descriptors.
row() {
  local before; before=$(mib)
  ls -lR "$2" >/dev/null
  printf '| %s | %d | %s | %s | %d |\n' "$1" "$files" "$before" "$(mib)" "$(ls "/proc/$pid/fd" | wc -l)"
}

echo "| tree | files | worker RSS before the walk (MiB) | after (MiB) | descriptors after |"
echo "|---|---|---|---|---|"
start; make "$work/src"; row "main" "$work/mnt"; stop
start; make "$work/src"; ctl snapshot-create --name s; ctl branch-create --snapshot s --name b
row "main's, through a branch" "$work/mnt/.agentfs/branches/b"; stop
start; ctl snapshot-create --name s; ctl branch-create --snapshot s --name b
make "$work/mnt/.agentfs/branches/b"; row "made in a branch" "$work/mnt/.agentfs/branches/b"; stop
echo
echo "On $(uname -r), $(nproc) cores, open-file limit $(ulimit -Hn); [fuse] max_cached_nodes at its default (150 000) bounds the nodes the kernel keeps, hence the RSS of larger trees. Made by \`bench/rss.sh\`."
