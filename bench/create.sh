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
# The worker logs took_us at info.
export RUST_LOG=info
. bench/common.sh

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
    ctl "${@//\{\}/$i}"
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000 )))
    took=$(tail -n +"$((before + 1))" "$log" | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'took_us=[0-9]*' | cut -d= -f2 || true)
    [ -n "$took" ] || { echo "no took_us logged for: $*" >&2; exit 1; }
    inside+=("$took")
  done
  printf '%s (%s)' "$(median "${times[@]}")" "$(median "${inside[@]}")"
}

echo "| files | snapshot-create (ms) | branch-create (ms) | snapshot of a branch (ms) | worker RSS after (MiB) |"
echo "|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  fresh
  make_tree "$work/src" "$n" 1000 0
  start
  snap=$(median_ms snapshot-create --name 's{}') || exit 1
  ctl snapshot-create --name base
  branch=$(median_ms branch-create --snapshot base --name 'b{}') || exit 1
  bsnap=$(median_ms snapshot-create --branch b1 --name 'b1-{}') || exit 1
  rss=$(mib)
  printf '| %d | %s | %s | %s | %s |\n' "$n" "$snap" "$branch" "$bsnap" "$rss"
  stop
done
echo
echo "Each cell: end to end (client start, socket, catalog write with fsync), then in parentheses inside the worker (from the request to the catalog saved and the view open); on $(uname -r), $(nproc) cores."
