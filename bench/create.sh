#!/usr/bin/env bash
# Time to create a snapshot of main, a branch, and a snapshot of a branch
# on trees of 1 000, 100 000 and 1 000 000 files (contract 2.2: the same at
# every size). A benchmark, not a test: it prints a table, it asserts
# nothing. Needs root; leaves nothing mounted.
# Usage: sudo bench/create.sh [SIZES...]
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ "$#" -gt 0 ] || sizes=(1000 100000 1000000)
cargo build --release --quiet -p agentfs-mount-worker --bins
bin=target/release
work=$(mktemp -d /var/tmp/agentfs-bench-XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  grep -q " $work/mnt " /proc/self/mounts && fusermount3 -u -z "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT

log="$work/worker.log"
# Median of 5 microsecond counts, as milliseconds.
median() {
  local m; m=$(printf '%s\n' "$@" | sort -n | sed -n 3p)
  printf '%d.%03d' $((m / 1000)) $((m % 1000))
}
# Median of 5 runs of one control command ({} in it is the run number):
# end to end, then in parentheses inside the worker, from the took_us its
# log line carries (the only way to see it without the client's own
# start-up and the socket round trip).
median_ms() {
  local times=() inside=() t0 t1 before took
  for i in 1 2 3 4 5; do
    before=$(wc -l <"$log")
    t0=$(date +%s%N)
    "$bin/agentfs-workerctl" --state-dir "$work/state" "${@//\{\}/$i}" >/dev/null
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
    took=$(tail -n +"$((before + 1))" "$log" | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'took_us=[0-9]*' | cut -d= -f2)
    [ -n "$took" ] || { echo "no took_us logged for: $*" >&2; exit 1; }
    inside+=("$took")
  done
  printf '%s (%s)' "$(median "${times[@]}")" "$(median "${inside[@]}")"
}

echo "| files | snapshot-create (ms) | branch-create (ms) | snapshot of a branch (ms) | worker RSS after (MiB) |"
echo "|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  rm -rf "$work/src" "$work/state"; mkdir -p "$work/src" "$work/mnt"
  # n files in directories of 1000.
  python3 - "$work/src" "$n" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%05d" % (i // 1000))
    if i % 1000 == 0:
        os.mkdir(d)
    os.close(os.open(os.path.join(d, "f%d" % i), os.O_CREAT | os.O_WRONLY, 0o644))
PY
  # Its log to a file, whatever the environment says.
  env -u JOURNAL_STREAM RUST_LOG=info "$bin/agentfs-mount-worker" --source "$work/src" --mountpoint "$work/mnt" --state-dir "$work/state" 2>"$log" &
  pid=$!
  for _ in $(seq 100); do grep -q " $work/mnt fuse.agentfs " /proc/self/mounts && break; sleep 0.05; done
  snap=$(median_ms snapshot-create --name 's{}') || exit 1
  "$bin/agentfs-workerctl" --state-dir "$work/state" snapshot-create --name base >/dev/null
  branch=$(median_ms branch-create --snapshot base --name 'b{}') || exit 1
  bsnap=$(median_ms snapshot-create --branch b1 --name 'b1-{}') || exit 1
  rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status")
  printf '| %d | %s | %s | %s | %s |\n' "$n" "$snap" "$branch" "$bsnap" "$rss"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done
echo
echo "Each cell: end to end (client start, socket, catalog write with fsync), then in parentheses inside the worker (from the request to the catalog saved and the view open); on $(uname -r), $(nproc) cores."
