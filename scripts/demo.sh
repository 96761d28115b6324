#!/usr/bin/env bash
# Sets up and starts a demo AgentFS mount you can try.
#   sudo scripts/demo.sh          build, create /var/tmp/agentfs-demo, mount it
#   sudo scripts/demo.sh stop     unmount and stop the demo worker
set -euo pipefail
cd "$(dirname "$0")/.."
demo=/var/tmp/agentfs-demo
pidfile=$demo/worker.pid

if [ "${1:-}" = "stop" ]; then
  if [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    echo "demo stopped; the source directory $demo/project holds everything written"
  else
    echo "no demo worker is running"
  fi
  rm -f "$pidfile"
  exit 0
fi

scripts/install-deps.sh
cargo build --release --quiet -p agentfs-mount-worker --bins
mkdir -p "$demo/project/src" "$demo/mnt"
[ -f "$demo/project/README" ] || {
  echo "A demo project served by AgentFS." > "$demo/project/README"
  printf 'fn main() {\n    println!("hello from AgentFS");\n}\n' > "$demo/project/src/main.rs"
}
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "the demo is already running (pid $(cat "$pidfile"))"
else
  target/release/agentfs-mount-worker --source "$demo/project" --mountpoint "$demo/mnt" \
    --state-dir "$demo/state" --allow-other >"$demo/worker.log" 2>&1 &
  echo $! > "$pidfile"
  for _ in $(seq 100); do grep -q " $demo/mnt fuse.agentfs " /proc/self/mounts && break; sleep 0.1; done
  grep -q " $demo/mnt fuse.agentfs " /proc/self/mounts || { cat "$demo/worker.log"; exit 1; }
fi
cat <<MSG
AgentFS is serving $demo/project at $demo/mnt (worker pid $(cat "$pidfile"), log $demo/worker.log).
Try:
  ls -la $demo/mnt; cat $demo/mnt/src/main.rs
  echo change >> $demo/mnt/README; cat $demo/project/README   # written in place
  findmnt $demo/mnt
Snapshots and branches:
  ctl="$PWD/target/release/agentfs-workerctl --state-dir $demo/state"
  \$ctl snapshot-create --name clean
  echo edited > $demo/mnt/src/main.rs; cat $demo/mnt/.agentfs/snapshots/clean/src/main.rs
  \$ctl branch-create --snapshot clean --name try-a
  bash -c "\$ctl branch-bind --branch try-a --pid \\\$\\\$; echo agent >> $demo/mnt/README; cat $demo/mnt/README"
  cat $demo/mnt/README    # main: untouched by the agent's write
Stop it with: sudo scripts/demo.sh stop
MSG
