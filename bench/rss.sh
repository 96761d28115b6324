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
. bench/common.sh

# row CASE DIR: walks DIR (every name looked up, every file stat'ed) and
# prints the worker's RSS before and after, and its descriptors.
row() {
  local before; before=$(mib)
  ls -lR "$2" >/dev/null
  printf '| %s | %d | %s | %s | %d |\n' "$1" "$files" "$before" "$(mib)" "$(ls "/proc/$pid/fd" | wc -l)"
}

echo "| tree | files | worker RSS before the walk (MiB) | after (MiB) | descriptors after |"
echo "|---|---|---|---|---|"
fresh; start; make_tree "$work/src" "$files" 100 1; row "main" "$work/mnt"; stop
fresh; start; make_tree "$work/src" "$files" 100 1; ctl snapshot-create --name s; ctl branch-create --snapshot s --name b
row "main's, through a branch" "$work/mnt/.agentfs/branches/b"; stop
fresh; start; ctl snapshot-create --name s; ctl branch-create --snapshot s --name b
make_tree "$work/mnt/.agentfs/branches/b" "$files" 100 1; row "made in a branch" "$work/mnt/.agentfs/branches/b"; stop
echo
echo "On $(uname -r), $(nproc) cores, open-file limit $(ulimit -Hn); [fuse] max_cached_nodes at its default (150 000) bounds the nodes the kernel keeps, hence the RSS of larger trees. Made by \`bench/rss.sh\`."
