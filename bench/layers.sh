#!/usr/bin/env bash
# A branch snapshotted many times while its root changes: each snapshot
# adds a frozen part to the root (layer_index.rs). Times, in the branch's
# root, a stat of a name no layer has (3 000 different names: the kernel
# caches no failed lookup), a create (each name checked free in every
# part) and a listing, after 0, 100 and 1 000 snapshots (or COUNTS), with
# the time the last snapshots took inside the worker (median of 50) and the size of one
# last line of the catalog's log (what a change writes); then the worker's start
# with them all. A benchmark, not a
# test: it prints a table, it asserts nothing. Needs root; leaves nothing
# mounted.
# Usage: sudo bench/layers.sh [COUNTS...]
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("$@")
[ "$#" -gt 0 ] || counts=(0 100 1000)
# The worker logs took_us at info.
export RUST_LOG=info
. bench/common.sh

fresh
make_tree "$work/src" 1000 100 1
start
ctl snapshot-create --name s
ctl branch-create --snapshot s --name b
b="$work/mnt/.agentfs/branches/b"
echo "| snapshots of the branch | stat of a missing name (µs) | create+close (µs) | listing of the root (µs) | worker RSS (MiB) | descriptors | snapshot (ms, in the worker: median of the last 50) | last catalog line (bytes) |"
echo "|---|---|---|---|---|---|---|---|"
taken=0
for n in "${counts[@]}"; do
  while [ "$taken" -lt "$n" ]; do
    echo "$taken" >"$b/c$taken"
    ctl snapshot-create --branch b --name "b$taken"
    taken=$((taken + 1))
  done
  times=$(python3 - "$b" "$n" <<'PY'
import os, sys, time
b, n = sys.argv[1], sys.argv[2]
def per(k, f):
    t = time.perf_counter()
    for i in range(k):
        f(i)
    return (time.perf_counter() - t) / k * 1e6
def stat(i):
    try:
        os.stat(os.path.join(b, "missing-%s-%d" % (n, i)))
    except FileNotFoundError:
        pass
miss = per(3000, stat)
make = per(1000, lambda i: os.close(os.open(os.path.join(b, "new-%s-%d" % (n, i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY)))
for i in range(1000):
    os.unlink(os.path.join(b, "new-%s-%d" % (n, i)))
ls = per(200, lambda i: os.listdir(b))
print("%.0f | %.0f | %.0f" % (miss, make, ls))
PY
)
  # The median of the last 50 (one alone varies with the flushes).
  last=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep 'snapshot of branch created' | grep -o 'took_us=[0-9]*' | tail -50 | cut -d= -f2 | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }' || true)
  # What the last change wrote: the log's last line (none right after a
  # fold, which writes catalog.json whole).
  catalog=$(tail -n 1 "$work/state/catalog.log" 2>/dev/null | wc -c)
  [ "$catalog" -gt 0 ] || catalog=-
  printf '| %d | %s | %s | %d | %s | %s |\n' "$n" "$times" "$(mib)" "$(ls "/proc/$pid/fd" | wc -l)" \
    "$(awk -v u="${last:-}" 'BEGIN { if (u == "") print "-"; else printf "%.1f", u / 1000 }')" "$catalog"
done
stop
t0=$(date +%s%N); start; t1=$(date +%s%N)
echo
echo "A worker started on that state mounted in $(( (t1 - t0) / 1000000 )) ms."
stop
echo
echo "The root holds 10 directories from main and one file per snapshot (made before it). On $(uname -r), $(nproc) cores. Made by \`bench/layers.sh\`."
