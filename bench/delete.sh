#!/usr/bin/env bash
# Snapshot deletion with many pre-images kept: FILES files changed after
# snapshot "a" (one pre-image each, which "a" keeps), then snapshots
# taken and deleted ROUNDS times, each deletion timed end to end.
# Usage: bash bench/delete.sh [FILES [ROUNDS]]   (from the repository root)
set -euo pipefail
files=${1:-20000}
rounds=${2:-5}
source bench/common.sh
fresh
make_tree "$work/src" "$files" 500 10
start
ctl snapshot-create --name a
python3 - "$work/mnt" <<'PY'
import os, sys
for root, dirs, names in os.walk(sys.argv[1]):
    dirs[:] = [d for d in dirs if d != ".agentfs"]
    for n in names:
        with open(os.path.join(root, n), "a") as f:
            f.write("y")
PY
echo "files: $files, pre-images: $(ls "$work/state/preserved" | wc -l)"
for i in $(seq "$rounds"); do
  ctl snapshot-create --name "b$i"
  s=$(date +%s%N)
  ctl snapshot-delete "b$i"
  e=$(date +%s%N)
  echo "delete b$i: $(((e - s) / 1000000)) ms"
done
