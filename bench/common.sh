# Shared by the shell benchmarks (sourced, from the repository's root): a
# release build, a work directory removed on exit with nothing left
# mounted, and one standalone worker at a time over "$work/src" at
# "$work/mnt" with its state in "$work/state" and its log in "$log".
cargo build --release --quiet -p agentfs-mount-worker --bins
bin=target/release
work=$(mktemp -d /var/tmp/agentfs-bench-XXXXXX)
log="$work/worker.log"
pid=
cleanup() {
  cd /
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  grep -q " $work/mnt " /proc/self/mounts && fusermount3 -u -z "$work/mnt"
  rm -rf "$work"
}
trap cleanup EXIT

# fresh: an empty source and state.
fresh() { rm -rf "$work/src" "$work/state"; mkdir -p "$work/src" "$work/mnt"; }
# start: a worker on them (its log to "$log" whatever the environment
# says, at RUST_LOG's level), once mounted.
start() {
  env -u JOURNAL_STREAM "$bin/agentfs-mount-worker" --source "$work/src" --mountpoint "$work/mnt" --state-dir "$work/state" 2>"$log" &
  pid=$!
  for _ in $(seq 600); do grep -q " $work/mnt fuse.agentfs " /proc/self/mounts && return; sleep 0.05; done
  echo "the worker did not mount within 30 s; its log: $log" >&2
  exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=; }
ctl() { "$bin/agentfs-workerctl" --state-dir "$work/state" "$@" >/dev/null; }
# The worker's RSS in MiB.
mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$pid/status"; }
# make_tree DIR FILES PER_DIR BYTES: FILES files of BYTES bytes ("x"s) in
# directories of PER_DIR.
make_tree() {
  python3 - "$@" <<'PY'
import os, sys
root, n, per, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    d = os.path.join(root, "d%05d" % (i // per))
    if i % per == 0:
        os.mkdir(d)
    with open(os.path.join(d, "f%d" % i), "w") as f:
        f.write("x" * size)
PY
}
