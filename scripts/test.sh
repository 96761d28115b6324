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
  # The system test's container, if the test itself was killed before its
  # own clean-up: stop its systemd-nspawn (by the pid it recorded), then
  # unmount its overlay and tmpfs. Only this run's (named after our pid).
  local pidfile pid
  for pidfile in /var/tmp/agentfs-system."$$".*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd-nspawn ]; then
      echo "test.sh: stopping leftover system-test container (systemd-nspawn $pid)" >&2
      kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 300); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
      if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd-nspawn ]; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
      fi
    fi
    rm -f "$pidfile"
  done
  for mp in $(awk -v p="/var/tmp/agentfs-system.$$." 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r); do
    echo "test.sh: removing leftover mount $mp" >&2
    umount "$mp" 2>/dev/null || umount -l "$mp" || true
    [ "${mp%/root}" != "$mp" ] || rmdir "$mp" 2>/dev/null || true
  done
  exit "$status"
}
trap cleanup EXIT

# The unit and integration tests, then the system test (the Debian package
# under systemd in a container). Both run; the script fails if either fails.
status=0
timeout --kill-after=60 45m cargo test --workspace --release "$@" || status=$?
AGENTFS_SYSTEM_TEST_TAG=$$ timeout --kill-after=60 20m tests/system/run.sh || { s=$?; [ "$status" -ne 0 ] || status=$s; }
exit "$status"
