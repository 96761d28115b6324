#!/usr/bin/env bash
# Runs the whole AgentFS test suite (real FUSE mounts; needs root).
# Usage: sudo scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh

# Safety net: whatever happens to the test processes (a hang killed by the
# timeout below, a crash), leave no mount behind. Only mounts made by the
# tests (their temporary directories) are touched.
cleanup() {
  local status=$? mp
  for mp in $(awk '$3 == "fuse.agentfs" {print $2}' /proc/self/mounts); do
    case "$mp" in
      */aft-*|*/agentfs-life-*|*/agentfs-pjd-*|*/agentfs-fsx-*|*/agentfs-sqlite-*)
        echo "test.sh: removing leftover mount $mp" >&2
        fusermount3 -u -z "$mp" 2>/dev/null || umount -l "$mp" || true ;;
    esac
  done
  exit "$status"
}
trap cleanup EXIT

timeout --kill-after=60 45m cargo test --workspace --release "$@"
