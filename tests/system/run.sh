#!/usr/bin/env bash
# System test: the Debian package under a real systemd and a real system
# bus, in a throw-away container.
#
#   sudo tests/system/run.sh              build the package, then test it
#   sudo tests/system/run.sh --deb FILE   test this package instead
#
# How the container is made (the only safe way on these machines, see the
# design contract, section 7): a tmpfs under /var/tmp, an overlay over it
# with the host's root as the read-only lower layer, and systemd-nspawn
# booting that overlay. Nothing written inside reaches the host. /srv and
# /var/lib/agentfs inside are bind mounts of directories on that tmpfs:
# they survive the container's reboot (which is a second nspawn boot on the
# same overlay), and they are a file system that supports file handles (the
# overlay does not, and branches need them). nspawn's own seccomp filter
# refuses open_by_handle_at(2) inside the container even with
# --capability=all; --system-call-filter=open_by_handle_at allows it (the
# worker resolves hard links of the source by handle).
#
# Output: one `ok - ...` or `not ok - ...` line per check (with the
# command's output as `#` lines after a failure), then `N passed, M failed`.
# Exit status 0 only if every check passed. Whatever happens, the container
# is stopped and the overlay and the tmpfs are unmounted.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

usage() { echo "usage: tests/system/run.sh [--deb FILE]" >&2; exit 2; }
deb=
while [ $# -gt 0 ]; do
  case "$1" in
    --deb)
      if [ $# -lt 2 ] || [ ! -f "$2" ]; then usage; fi
      deb=$(realpath "$2"); shift 2 ;;
    *) usage ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "run.sh: run as root (it mounts and boots a container)" >&2
  exit 1
fi
for tool in systemd-nspawn nsenter pgrep; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing; run scripts/install-deps.sh" >&2; exit 1; }
done

pass=0 fail=0
out=
# record STATUS WHAT [COMMAND...]: one result line; after a failure, the
# command and its output (in $out) as comments.
record() {
  local status=$1 what=$2
  shift 2
  if [ "$status" -eq 0 ]; then
    echo "ok - $what"
    pass=$((pass + 1))
  else
    echo "not ok - $what"
    fail=$((fail + 1))
    [ $# -eq 0 ] || echo "#   \$ $*"
    [ -z "$out" ] || printf '%s\n' "$out" | head -n 40 | sed 's/^/#   /'
  fi
}
info() { echo "# $*"; }

# --- The container ------------------------------------------------------
base=        # the tmpfs
pidfile=     # nspawn's pid, for scripts/test.sh's safety net
nspawn_pid=  # systemd-nspawn
pid1=        # the container's systemd, as the host sees it

alive() { # alive PID: running and not a zombie
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}
wait_gone() { # wait_gone PID SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do alive "$1" || return 0; sleep 0.1; done
  return 1
}

# Boots the overlay; sets nspawn_pid and pid1; returns once systemd says
# running or degraded.
boot() {
  systemd-nspawn --directory="$base/root" --boot --bind=/dev/fuse --capability=all \
    --register=no --keep-unit --console=passive --machine=agentfs-test \
    --system-call-filter=open_by_handle_at \
    --bind="$base/srv:/srv" --bind="$base/state:/var/lib/agentfs" \
    </dev/null >>"$base/nspawn.log" 2>&1 &
  nspawn_pid=$!
  echo "$nspawn_pid" >"$pidfile"
  pid1=
  local i p state
  for ((i = 0; i < 300; i++)); do
    alive "$nspawn_pid" || return 1
    p=$(pgrep -P "$nspawn_pid" | head -n 1)
    if [ -n "$p" ] && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = systemd ]; then
      pid1=$p
      break
    fi
    sleep 0.1
  done
  [ -n "$pid1" ] || return 1
  for ((i = 0; i < 60; i++)); do
    state=$(timeout 60 nsenter -t "$pid1" -a systemctl is-system-running --wait 2>/dev/null)
    case "$state" in
      running) return 0 ;;
      degraded)
        info "degraded: $(timeout 30 nsenter -t "$pid1" -a systemctl --failed --plain --no-legend --no-pager | awk '{print $1}' | tr '\n' ' ')"
        return 0 ;;
    esac
    alive "$nspawn_pid" || return 1
    sleep 2
  done
  return 1
}

# Powers the container off; escalates to signals (by pid) if it hangs.
shutdown_container() {
  [ -n "$nspawn_pid" ] || return 0
  if alive "$nspawn_pid"; then
    [ -z "$pid1" ] || timeout 20 nsenter -t "$pid1" -a systemctl poweroff >/dev/null 2>&1
    if ! wait_gone "$nspawn_pid" 90; then
      echo "run.sh: the container did not power off; stopping systemd-nspawn ($nspawn_pid)" >&2
      kill -TERM "$nspawn_pid" 2>/dev/null
      wait_gone "$nspawn_pid" 30 || { kill -KILL "$nspawn_pid" 2>/dev/null; wait_gone "$nspawn_pid" 10; }
    fi
  fi
  wait "$nspawn_pid" 2>/dev/null
  nspawn_pid='' pid1=''
}

cleanup() {
  local status=$? mp
  trap - EXIT INT TERM
  shutdown_container
  if [ -n "$base" ]; then
    for mp in "$base/root" "$base"; do
      if mountpoint -q "$mp"; then
        umount "$mp" 2>/dev/null || { sleep 2; umount "$mp" 2>/dev/null; } ||
          umount -l "$mp" || echo "run.sh: cannot unmount $mp" >&2
      fi
    done
    # Only empty directories are removed: never anything on the host.
    rmdir "$base" 2>/dev/null || echo "run.sh: $base is not empty; left in place" >&2
  fi
  [ -z "$pidfile" ] || rm -f "$pidfile"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# c CMD...: runs CMD in the container as root (clean environment); its
# output (stdout and stderr) in $out, its status returned.
cenv=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
      HOME=/root SYSTEMD_PAGER= SYSTEMD_COLORS=0 TERM=dumb)
c() { out=$(timeout 120 nsenter -t "$pid1" -a env -i "${cenv[@]}" "$@" 2>&1); }
# Prefixes that run a command in the container as that user (just the
# ids, no session).
as_alice=(setpriv --reuid=alice --regid=alice --init-groups env HOME=/home/alice USER=alice)
as_bob=(setpriv --reuid=bob --regid=bob --init-groups env HOME=/home/bob USER=bob)

# expect WHAT REGEX CMD...: CMD succeeds and its output matches REGEX ("" = anything).
expect() {
  local what=$1 re=$2 s
  shift 2
  c "$@"; s=$?
  [ "$s" -eq 0 ] && { [ -z "$re" ] || grep -Eq -- "$re" <<<"$out"; }
  record $? "$what" "$@"
}
# expect_fail WHAT REGEX CMD...: CMD fails and its output matches REGEX.
expect_fail() {
  local what=$1 re=$2 s
  shift 2
  c "$@"; s=$?
  [ "$s" -ne 0 ] && { [ -z "$re" ] || grep -Eq -- "$re" <<<"$out"; }
  record $? "$what" "$@"
}
# expect_out WHAT REGEX CMD...: CMD's output matches REGEX, whatever its status.
expect_out() {
  local what=$1 re=$2
  shift 2
  c "$@"
  grep -Eq -- "$re" <<<"$out"
  record $? "$what" "$@"
}
# until_ok SECONDS CMD...: retries CMD (in the container) until it succeeds.
until_ok() {
  local deadline=$((SECONDS + $1))
  shift
  until c "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# Long-lived shells to bind: /usr/local/sbin/agentfs-test-shell DIR runs
# DIR/cmd in a child (forked after any bind) whenever it appears.
start_shell() { # start_shell NAME USER [WORKING_DIRECTORY]: sets $shell_pid
  local name=$1 user=$2 cwd=${3:-/}
  c sh -c "mkdir -p /run/agentfs-test/$name && chown $user: /run/agentfs-test/$name &&
    systemd-run --quiet --unit=agentfs-test-shell-$name --uid=$user --working-directory=$cwd \
      /usr/local/sbin/agentfs-test-shell /run/agentfs-test/$name &&
    for i in \$(seq 100); do [ -s /run/agentfs-test/$name/pid ] && break; sleep 0.1; done &&
    cat /run/agentfs-test/$name/pid"
  shell_pid=$out
}
in_shell() { # in_shell NAME SCRIPT: runs SCRIPT in that shell; output in $out
  local d=/run/agentfs-test/$1
  c sh -c "rm -f $d/out; printf '%s\n' \"\$1\" >$d/cmd.new && mv $d/cmd.new $d/cmd &&
    for i in \$(seq 300); do [ -e $d/out ] && exec cat $d/out; sleep 0.1; done; echo 'shell $1 did not answer'; exit 1" sh "$2"
}
# shell_sees WHAT NAME SCRIPT EXPECTED: SCRIPT's output in that shell is EXPECTED.
shell_sees() {
  in_shell "$2" "$3"
  [ "$out" = "$4" ]
  record $? "$1" "(shell $2) $3  # expected: $4"
}

# --- Build the package, make the container -------------------------------
if [ -z "$deb" ]; then
  if deb=$(packaging/build-deb | tail -n 1) && [ -f "$deb" ]; then
    record 0 "packaging/build-deb builds $(basename "$deb")"
  else
    out=
    record 1 "packaging/build-deb builds the package"
    echo "$pass passed, $fail failed"
    exit 1
  fi
fi
info "package: $deb"

# scripts/test.sh tags the name with its pid to find what a killed test left.
base=$(mktemp -d "/var/tmp/agentfs-system.${AGENTFS_SYSTEM_TEST_TAG:-$$}.XXXXXX")
pidfile=$base.pid
out=
if ! mount -t tmpfs -o mode=0755,size=4G agentfs-system "$base"; then
  record 1 "a tmpfs at $base"
  echo "$pass passed, $fail failed"
  exit 1
fi
mkdir -p "$base/upper" "$base/work" "$base/root" "$base/srv" "$base/state"
chmod 0700 "$base/state"
if ! mount -t overlay agentfs-system-root \
  -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"; then
  record 1 "an overlay of / at $base/root"
  echo "$pass passed, $fail failed"
  exit 1
fi
# The host may have AgentFS installed, configured and enabled (the README's
# first command, scripts/demo.sh, does that): the container starts without
# the host's mounts and unit links. Deleting in the overlay leaves the host
# as it is.
rm -f "$base/root"/etc/agentfs/mounts/*.toml
find "$base/root/etc/systemd/system" -name 'agentfs*' -delete 2>/dev/null

out=
boot
record $? "the container boots to running (systemd-nspawn on an overlay of /)"
if [ -z "$pid1" ]; then
  out=$(tail -n 30 "$base/nspawn.log")
  record 1 "a container to test in" "systemd-nspawn"
  echo "$pass passed, $fail failed"
  exit 1
fi

# The test's shell helper, written into the overlay from the host.
install -D -m 0755 /dev/stdin "$base/root/usr/local/sbin/agentfs-test-shell" <<'SH'
#!/bin/sh
# agentfs-test-shell DIR: a long-lived shell for tests/system/run.sh. Runs
# DIR/cmd in a child whenever it appears; the output goes to DIR/out.
d=$1
echo $$ >"$d/pid"
while :; do
  if [ -e "$d/cmd" ]; then
    sh "$d/cmd" >"$d/out.new" 2>&1
    rm -f "$d/cmd"
    mv "$d/out.new" "$d/out"
  fi
  sleep 0.1
done
SH
cp "$deb" "$base/root/var/tmp/agentfs.deb"

# --- Installation ----------------------------------------------------------
expect "dpkg -i installs the package" "" dpkg -i /var/tmp/agentfs.deb
files=(/usr/sbin/agentfs-supervisor /usr/bin/agentfsctl
       /usr/libexec/agentfs/agentfs-mount-worker /usr/libexec/agentfs/agentfs-workerctl
       /lib/systemd/system/agentfs.service /lib/systemd/system/agentfs@.service
       /usr/share/dbus-1/system.d/org.agentfs.conf /usr/share/dbus-1/system-services/org.agentfs.service
       /usr/lib/tmpfiles.d/agentfs.conf /usr/share/doc/agentfs/examples/mount.toml
       /usr/share/bash-completion/completions/agentfsctl /usr/share/zsh/vendor-completions/_agentfsctl
       /usr/share/fish/vendor_completions.d/agentfsctl.fish /usr/share/man/man1/agentfsctl.1.gz)
expect "the package installs binaries, units, D-Bus files, tmpfiles, completions, man page" "" \
  ls -d "${files[@]}"
expect "tmpfiles made /run/agentfs 0755, /var/lib/agentfs 0700, /etc/agentfs/mounts 0755" \
  "^755 /run/agentfs 700 /var/lib/agentfs 755 /etc/agentfs/mounts$" \
  sh -c 'stat -c "%a %n" /run/agentfs /var/lib/agentfs /etc/agentfs/mounts | tr "\n" " " | sed "s/ $//"'
c sh -c 'cd /lib/systemd/system && systemd-analyze verify agentfs.service agentfs@agent1.service' && [ -z "$out" ]
record $? "systemd-analyze verify agentfs.service agentfs@agent1.service prints nothing" \
  systemd-analyze verify agentfs.service agentfs@agent1.service

# --- D-Bus activation, the service's sandbox ------------------------------
expect "agentfs.service is not running after installation" "^inactive$" \
  sh -c 'systemctl is-active agentfs.service; true'
expect "D-Bus activation: busctl call org.agentfs ... ListMounts starts the supervisor" "^a\(sso\) 0" \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
expect "agentfs.service is active after the call" "^active$" systemctl is-active agentfs.service
expect_fail "the D-Bus policy lets only root own org.agentfs" "AccessDenied" \
  setpriv --reuid=nobody --regid=nogroup --clear-groups dbus-send --system --print-reply \
  --dest=org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus.RequestName string:org.agentfs uint32:0
expect "the Version property answers" '^s "' \
  busctl get-property org.agentfs /org/agentfs org.agentfs.Manager1 Version
expect "the supervisor shares PID 1's mount and network namespaces (its mounts are visible)" "^same$" \
  sh -c 'p=$(systemctl show -P MainPID agentfs.service)
    [ "$(readlink /proc/$p/ns/mnt)" = "$(readlink /proc/1/ns/mnt)" ] &&
    [ "$(readlink /proc/$p/ns/net)" = "$(readlink /proc/1/ns/net)" ] && echo same'
expect "the supervisor runs with no_new_privs, seccomp, CAP_SYS_ADMIN but no CAP_SYS_MODULE/RAWIO/PTRACE/BOOT/TIME" \
  "^1 2 ok$" bash -c 'p=$(systemctl show -P MainPID agentfs.service)
    b=$(awk "/^CapBnd:/{print \$2}" /proc/$p/status); caps=ok
    for bit in 16 17 19 22 25; do (( (0x$b >> bit) & 1 )) && caps="has cap $bit"; done
    (( (0x$b >> 21) & 1 )) || caps="no CAP_SYS_ADMIN"
    echo $(awk "/^NoNewPrivs:/{print \$2}" /proc/$p/status) $(awk "/^Seccomp:/{print \$2}" /proc/$p/status) $caps'
c sh -c 'systemd-analyze security --no-pager agentfs@x.service | tail -n 1'
info "systemd-analyze security agentfs@x.service: $(grep -Eo '[0-9]+\.[0-9]+' <<<"$out" | head -n 1)"
c sh -c 'systemd-analyze security --no-pager agentfs.service | tail -n 1'
exposure=$(grep -Eo '[0-9]+\.[0-9]+' <<<"$out" | head -n 1)
awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 5.0) }'
record $? "systemd-analyze security agentfs.service: exposure ${exposure:-?} is at most 5.0"

# --- A mount, snapshots, branches, bindings -------------------------------
expect "users alice and bob exist" "" sh -c 'useradd -m alice && useradd -m bob'
expect "a source /srv/agent1 and its config /etc/agentfs/mounts/agent1.toml" "" sh -c '
  mkdir -p /srv/agent1 /srv/bad && echo main >/srv/agent1/f &&
  printf "%s\n" "source = \"/srv/agent1\"" "allow_other = true" "" "[access]" "users = [\"alice\"]" \
    >/etc/agentfs/mounts/agent1.toml'
# A process whose working directory is the source from before the mount:
# it changes the source behind the mount's back.
expect "a file /srv/agent1/w, and a shell working in /srv/agent1 before the mount" "" sh -c '
  echo watch >/srv/agent1/w && touch -r /srv/agent1/w /srv/agent1/w.time'
start_shell behind root /srv/agent1
c systemctl start agentfs@agent1
started=$?
record $started "systemctl start agentfs@agent1" systemctl start agentfs@agent1
if [ "$started" -ne 0 ]; then # why (the worker's error is in LastError)
  c agentfsctl status agent1
  printf '%s\n' "$out" | sed 's/^/#   /'
fi
expect "agentfs@agent1 is active" "^active$" systemctl is-active agentfs@agent1
# specs/security.md: the worker confines itself even under systemd's own
# sandbox (CAP_SETPCAP lets it empty its bounding set).
# 000000009820001f: CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID
# SYS_ADMIN MKNOD LEASE SETFCAP.
sandboxed='p=$(busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 WorkerPid | cut -d" " -f2)
  s=$(grep -E "^(NoNewPrivs|Seccomp|CapEff|CapBnd):" /proc/$p/status) && echo "$s" &&
  echo "$s" | grep -qE "^NoNewPrivs:\s+1$" && echo "$s" | grep -qE "^Seccomp:\s+2$" &&
  echo "$s" | grep -qE "^CapEff:\s+000000009820001f$" && echo "$s" | grep -qE "^CapBnd:\s+000000009820001f$"'
expect "its worker is sandboxed: no_new_privs, seccomp, 9 capabilities" "" sh -c "$sandboxed"
expect "/srv/agent1 is an AgentFS mount" "^fuse.agentfs$" findmnt -n -o FSTYPE --mountpoint /srv/agent1
# specs/semantics.md section 1: the source watch works under the service's
# own sandbox. Same size and the old mtime put back: without the watch the
# cached pages would stay.
expect "an unbound process reads w through the mount (its pages cached)" "^watch$" cat /srv/agent1/w
shell_sees "the shell rewrites w behind the mount, same size and mtime" behind \
  'printf WATCH | dd of=w bs=5 count=1 conv=notrunc 2>/dev/null && touch -r w.time w && rm w.time && echo done' done
expect "... and the mount shows the new data (the source watch)" "" sh -c '
  for i in $(seq 50); do [ "$(cat /srv/agent1/w)" = WATCH ] && exit 0; sleep 0.1; done; cat /srv/agent1/w; exit 1'
expect "... the shell working behind the mount is stopped" "" sh -c '
  systemctl stop agentfs-test-shell-behind && rm /srv/agent1/w'
expect "ListMounts says agent1 is running" '"agent1" "running" "/org/agentfs/mount/agent1"' \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts

expect "agentfsctl snapshot-create --name clean" "" agentfsctl --mount agent1 snapshot-create --name clean
expect "agentfsctl branch-create try-a" "" agentfsctl --mount agent1 branch-create --snapshot clean --name try-a
expect "agentfsctl branch-create try-b" "" agentfsctl --mount agent1 branch-create --snapshot clean --name try-b
start_shell a root; pid_a=$shell_pid
start_shell b root; pid_b=$shell_pid
start_shell c root; pid_c=$shell_pid
info "shells: a=$pid_a b=$pid_b c=$pid_c"
expect "agentfsctl branch-bind --branch try-a --pid <shell a>" "" \
  agentfsctl --mount agent1 branch-bind --branch try-a --pid "$pid_a"
expect "agentfsctl branch-bind --branch try-b --pid <shell b>" "" \
  agentfsctl --mount agent1 branch-bind --branch try-b --pid "$pid_b"
shell_sees "shell a (try-a) writes and reads its own f" a 'echo a >/srv/agent1/f; cat /srv/agent1/f' a
shell_sees "shell b (try-b) writes and reads its own f at the same path" b 'echo b >/srv/agent1/f; cat /srv/agent1/f' b
shell_sees "shell a still sees its own f after b's write" a 'cat /srv/agent1/f' a
shell_sees "unbound shell c sees main" c 'cat /srv/agent1/f' main
expect "an unbound process sees main" "^main$" cat /srv/agent1/f
expect "the branches are reachable by path (.agentfs/branches/try-b)" "^b$" cat /srv/agent1/.agentfs/branches/try-b/f
expect "agentfsctl exec --branch try-a -- cat sees try-a" "^a$" \
  agentfsctl --mount agent1 exec --branch try-a -- cat /srv/agent1/f
expect "agentfsctl binding-list shows both bindings" "" \
  sh -c "o=\$(agentfsctl --mount agent1 binding-list) && echo \"\$o\" &&
    echo \"\$o\" | grep -q try-a && echo \"\$o\" | grep -q try-b && echo \"\$o\" | grep -q $pid_a"
expect "busctl ListBindings shows shell a bound to try-a" "\"pid\" \"$pid_a\" \"try-a\"" \
  busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListBindings
expect "busctl CreateSnapshot ss try-a busctl-snap" '^s "' \
  busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 CreateSnapshot ss try-a busctl-snap
expect "ListSnapshots lists clean and busctl-snap" '"clean".*"busctl-snap"' \
  busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListSnapshots
expect "the snapshot of try-a holds try-a's f" "^a$" cat /srv/agent1/.agentfs/snapshots/busctl-snap/f
expect "journalctl -u agentfs shows the supervisor's log" "org\.agentfs" \
  journalctl -u agentfs.service --no-pager -o cat
expect "... including agent1's snapshots and branches" "agent1" \
  journalctl -u agentfs.service --no-pager -o verbose
expect "journalctl -u agentfs@agent1 shows the mount unit's log" "agent1" \
  journalctl -u agentfs@agent1.service --no-pager

# --- Authorization ----------------------------------------------------------
start_shell root-owned root; pid_r=$shell_pid
start_shell alice alice; pid_l=$shell_pid
start_shell bob bob; pid_o=$shell_pid
info "shells: root-owned=$pid_r alice=$pid_l bob=$pid_o"
expect_fail "alice may not bind root's shell (agentfsctl fails)" "AccessDenied|[Aa]ccess denied|belongs to" \
  "${as_alice[@]}" agentfsctl --mount agent1 branch-bind --branch try-a --pid "$pid_r"
expect_fail "... and the D-Bus error is org.agentfs.Error.AccessDenied" "org\.agentfs\.Error\.AccessDenied" \
  "${as_alice[@]}" dbus-send --system --print-reply --dest=org.agentfs \
  /org/agentfs/mount/agent1 org.agentfs.Mount1.BindPid string:try-a uint32:"$pid_r"
expect "alice may bind her own shell (access.users grants her the mount)" "" \
  "${as_alice[@]}" agentfsctl --mount agent1 branch-bind --branch try-a --pid "$pid_l"
shell_sees "alice's bound shell sees try-a" alice 'cat /srv/agent1/f' a
expect_fail "bob (not in [access]) may not bind even his own shell" "org\.agentfs\.Error\.AccessDenied" \
  "${as_bob[@]}" dbus-send --system --print-reply --dest=org.agentfs \
  /org/agentfs/mount/agent1 org.agentfs.Mount1.BindPid string:try-a uint32:"$pid_o"
expect "bob may still list the mounts" '"agent1"' \
  "${as_bob[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
denied="org\.agentfs\.Error\.AccessDenied|may not use mount" # dbus-send shows the name, busctl the message
mount1=(/org/agentfs/mount/agent1 org.agentfs.Mount1)
expect_fail "bob may not stop agent1" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StopMount s agent1
expect_fail "bob may not delete agent1's branch try-b" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" DeleteBranch sb try-b true
expect_fail "bob may not snapshot agent1" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" CreateSnapshot ss "" bobs
expect_fail "bob may not unbind shell a" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" UnbindPid u "$pid_a"
expect "... and all of that changed nothing: agent1 runs, try-b and shell a's binding are there" "" \
  sh -c "systemctl is-active agentfs@agent1 && agentfsctl --mount agent1 branch-list | grep -q try-b &&
    agentfsctl --mount agent1 binding-list | grep -q $pid_a && ! ls /srv/agent1/.agentfs/snapshots | grep -q bobs"
expect "a second mount agent2 (stopped, strict_isolation), granted to alice" "" sh -c '
  mkdir -p /srv/agent2 && chown alice: /srv/agent2 &&
  printf "%s\n" "source = \"/srv/agent2\"" "allow_other = true" "strict_isolation = true" "[access]" "users = [\"alice\"]" \
    >/etc/agentfs/mounts/agent2.toml && agentfsctl reload'
expect_fail "bob may not start agent2" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StartMount s agent2
expect "... it stays stopped" '"agent2" "stopped"' \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
expect "alice may start agent2 over D-Bus" "" \
  "${as_alice[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StartMount s agent2
expect "alice may snapshot and branch agent2" "" \
  "${as_alice[@]}" sh -c 'agentfsctl --mount agent2 snapshot-create --name s &&
    agentfsctl --mount agent2 branch-create --snapshot s --name x'
expect "alice's unbound process may list /srv/agent2/.agentfs" "branches" \
  "${as_alice[@]}" ls /srv/agent2/.agentfs
expect_fail "strict isolation: her process bound to x may not" "Permission denied" \
  "${as_alice[@]}" agentfsctl --mount agent2 exec --branch x -- ls /srv/agent2/.agentfs
expect "... while it may write in x" "^x$" \
  "${as_alice[@]}" agentfsctl --mount agent2 exec --branch x -- sh -c 'echo x >/srv/agent2/f && cat /srv/agent2/f'
expect "alice may delete agent2's branch x" "" \
  "${as_alice[@]}" agentfsctl --mount agent2 branch-delete x
expect_fail "bob may not stop agent2" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StopMount s agent2
expect "alice may stop agent2" "" \
  "${as_alice[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StopMount s agent2
expect "... and nothing is left mounted at /srv/agent2" "" sh -c '! findmnt --mountpoint /srv/agent2'

# polkit grants what [access] does not (specs/dbus.md, Authorization).
expect "the package installs the polkit actions org.agentfs.manage and org.agentfs.bind" "" \
  sh -c 'pkaction --action-id org.agentfs.manage && pkaction --action-id org.agentfs.bind'
expect "a polkit rule grants bob org.agentfs.bind on agent1 only" "" sh -c '
  cat >/etc/polkit-1/rules.d/50-agentfs-test.rules <<EOF
polkit.addRule(function(action, subject) {
    if (action.id == "org.agentfs.bind" && action.lookup("mount") == "agent1" &&
        subject.user == "bob")
        return polkit.Result.YES;
});
EOF
  systemctl try-reload-or-restart polkit.service'
until_ok 10 "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" BindPid su try-b "$pid_o"
record $? "bob may now bind his own shell to agent1's try-b (polkit)" BindPid try-b "$pid_o"
shell_sees "bob's shell sees try-b" bob 'cat /srv/agent1/f' b
expect_fail "bob may still not bind alice's shell (not his process)" "$denied|belongs to" \
  "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" BindPid su try-b "$pid_l"
expect_fail "bob may still not delete branches (org.agentfs.manage is not granted)" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" DeleteBranch sb try-b true
expect_fail "bob may still not start agent2 (the rule names agent1)" "$denied" \
  "${as_bob[@]}" busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StartMount s agent2
expect "bob unbinds his shell" "" \
  "${as_bob[@]}" busctl call org.agentfs "${mount1[@]}" UnbindPid u "$pid_o"
c rm -f /etc/polkit-1/rules.d/50-agentfs-test.rules /etc/agentfs/mounts/agent2.toml

# --- Bad configs --------------------------------------------------------------
c sh -c '
  printf "%s\n" "source = \"/srv/bad\"" "colour = \"red\"" >/etc/agentfs/mounts/bad1.toml
  printf "%s\n" "source = \"/srv/nope\"" >/etc/agentfs/mounts/bad2.toml
  printf "%s\n" "source = \"/srv/bad\"" "allow_other = \"yes\"" >/etc/agentfs/mounts/bad3.toml
  printf "%s\n" "allow_other = true" >/etc/agentfs/mounts/bad4.toml'
bad_config() { # bad_config NAME WHAT REGEX
  expect_fail "systemctl start agentfs@$1 fails ($2)" "" systemctl start "agentfs@$1"
  expect "agentfs@$1 is failed" "^failed$" sh -c "systemctl is-failed agentfs@$1; true"
  expect_out "systemctl status agentfs@$1 names the file, the line and the key" "$3" \
    systemctl status -l -n 20 --no-pager "agentfs@$1"
  expect "journalctl -u agentfs@$1 has the message" "$3" journalctl -u "agentfs@$1" --no-pager
}
bad_config bad1 "unknown key" '/etc/agentfs/mounts/bad1\.toml:2:.*colour'
bad_config bad2 "source does not exist" '/etc/agentfs/mounts/bad2\.toml:1:.*source'
bad_config bad3 "wrong type" '/etc/agentfs/mounts/bad3\.toml:2:.*allow_other'
bad_config bad4 "no source key" '/etc/agentfs/mounts/bad4\.toml.*source'
expect "ListMounts lists bad1 as failed" '"bad1" "failed"' \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
expect "agent1 keeps running meanwhile" "^active fuse.agentfs$" \
  sh -c 'echo $(systemctl is-active agentfs@agent1) $(findmnt -n -o FSTYPE --mountpoint /srv/agent1)'
shell_sees "shell a still sees try-a" a 'cat /srv/agent1/f' a
expect "systemctl reload agentfs (SIGHUP) with bad files present" "" systemctl reload agentfs.service
expect "agent1 is still running after the reload" '"agent1" "running"' \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
c rm -f /etc/agentfs/mounts/bad1.toml /etc/agentfs/mounts/bad2.toml /etc/agentfs/mounts/bad3.toml \
  /etc/agentfs/mounts/bad4.toml
c systemctl reset-failed 'agentfs@bad*'

# --- The shipped example --------------------------------------------------------
expect "the example config (/usr/share/doc/agentfs/examples/mount.toml) starts as agentfs@example" "" \
  sh -c 'mkdir -p /srv/work/proj && cp /usr/share/doc/agentfs/examples/mount.toml /etc/agentfs/mounts/example.toml &&
    systemctl start agentfs@example && findmnt -n -o FSTYPE --mountpoint /srv/work/proj'
expect "systemctl stop agentfs@example" "" \
  sh -c 'systemctl stop agentfs@example && rm /etc/agentfs/mounts/example.toml && ! findmnt --mountpoint /srv/work/proj'

# --- A worker dies, hangs, under load --------------------------------------
# A writer appends numbered lines to a file in the mount, fsyncing every
# 20th, for as long as the crashes below last; every failure it sees is
# written to /run/load.err. At the end its file must hold every line.
expect "a writer starts appending to /srv/agent1/load.log" "" \
  systemd-run --quiet --unit=agentfs-test-load sh -c 'i=0; while [ ! -e /run/load.stop ]; do
      i=$((i + 1)); echo $i >>/srv/agent1/load.log || echo "append $i failed" >>/run/load.err
      [ $((i % 20)) -ne 0 ] || sync /srv/agent1/load.log || echo "fsync $i failed" >>/run/load.err
    done; echo $i >/run/load.done'
until_ok 10 test -s /srv/agent1/load.log
c findmnt -n -o MAJ:MIN --mountpoint /srv/agent1
mount_dev=$out
worker_pid() { c sh -c 'busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 WorkerPid | cut -d" " -f2'; }
# Four kills and the hang below: five restarts, the default restart.burst.
for round in 1 2 3 4; do
  worker_pid
  worker=$out
  expect "kill -9 agent1's worker ($worker), round $round" "" kill -KILL "$worker"
  replaced="w=\$(busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 WorkerPid | cut -d' ' -f2)
    st=\$(busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 State)
    echo worker \$w, \$st; [ \"\$w\" != 0 ] && [ \"\$w\" != $worker ] && [ \"\$st\" = 's \"running\"' ] && cat /srv/agent1/f"
  until_ok 30 sh -c "$replaced"
  record $? "... a new worker serves the same mount" "$replaced"
  sleep 1.2
done
expect "agentfs@agent1 stayed active" "^active$" systemctl is-active agentfs@agent1
expect "Restarts counts them" "^u 4$" \
  busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 Restarts
expect "the journal says why" "was killed by signal 9 \\(SIGKILL\\); starting a new worker" \
  journalctl --no-pager -u agentfs.service
worker_pid
worker=$out
expect "SIGSTOP agent1's worker ($worker): it hangs" "" kill -STOP "$worker"
hung="w=\$(busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 WorkerPid | cut -d' ' -f2)
  [ \"\$w\" != $worker ] && [ \"\$w\" != 0 ] && cat /srv/agent1/f"
until_ok 30 sh -c "$hung"
hung_status=$?
record $hung_status "... it is replaced (hang_timeout_sec, default 10 s)" "$hung"
if [ "$hung_status" -ne 0 ]; then
  c journalctl --no-pager -o short-precise -u agentfs.service --since "-60s"
  printf '%s\n' "$out" | tail -n 60 | sed 's/^/#   /'
fi
expect "... LastError says it hung" "did not answer within 10 s" \
  busctl get-property org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 LastError
expect "the mount was never remounted (same device)" "^$mount_dev\$" \
  findmnt -n -o MAJ:MIN --mountpoint /srv/agent1

# --- The supervisor crashes (the writer still running) ---------------------
c systemctl show -P MainPID agentfs.service
old_pid=$out
expect "kill -9 the supervisor" "" systemctl kill --signal=KILL --kill-whom=main agentfs.service
recovered="p=\$(systemctl show -P MainPID agentfs.service); u=\$(systemctl is-active agentfs@agent1)
  echo supervisor pid \$p, agentfs@agent1 \$u; [ \"\$p\" != 0 ] && [ \"\$p\" != $old_pid ] &&
  [ \"\$u\" = active ] && cat /srv/agent1/f"
crashed=$SECONDS
until_ok 15 sh -c "$recovered"
recovered_status=$?
record $recovered_status "systemd restarts it and agentfs@agent1 serves again within 15 s" "$recovered"
if until_ok 90 sh -c "$recovered"; then
  info "agentfs@agent1 served again $((SECONDS - crashed)) s after the crash"
else
  info "agentfs@agent1 did not come back after the supervisor's crash"
fi
if [ "$recovered_status" -ne 0 ]; then
  c journalctl --no-pager -o short-precise -u agentfs.service -u agentfs@agent1.service --since "-$((SECONDS - crashed + 5))s"
  printf '%s\n' "$out" | tail -n 60 | sed 's/^/#   /'
fi
expect "the new supervisor took the mount over (same device, not remounted)" "^$mount_dev\$" \
  findmnt -n -o MAJ:MIN --mountpoint /srv/agent1
expect "... from systemd's descriptor store, with a new worker" "^taken over$" \
  sh -c "journalctl --no-pager -u agentfs.service --since '-$((SECONDS - crashed + 5))s' -o cat >/run/j;
    grep -q 'taking over the mount a previous supervisor left' /run/j && ! grep -q 'detaching stale' /run/j && echo taken over"
expect "... lists it running" '"agent1" "running"' \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
expect "... and snapshots it" "" \
  busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 CreateSnapshot ss "" after-crash
c sh -c 'touch /run/load.stop; for i in $(seq 100); do [ -s /run/load.done ] && break; sleep 0.1; done; cat /run/load.done'
appended=$out
info "the writer appended $appended lines across 4 worker kills, a hang and a supervisor crash"
expect "the writer saw no error" "^none$" sh -c 'cat /run/load.err 2>/dev/null || echo none'
if c test -s /run/load.err; then
  c journalctl --no-pager -o short-precise -u agentfs-test-load -u agentfs.service -u agentfs@agent1.service --since "-$((SECONDS - crashed + 10))s"
  printf '%s\n' "$out" | grep -v ' line [0-9]*$' | tail -n 80 | sed 's/^/#   /'
fi
expect "... and every line it appended is there, in order" "^$appended\$" \
  awk 'NR != $1 { print "line " NR " holds " $1; exit } END { print NR }' /srv/agent1/load.log

# --- The config changed before the supervisor crashes -----------------------
# A parked connection was made for a state directory; with another one in
# the config, taking it over would pair the kernel's node ids with other
# objects: the new supervisor mounts afresh, and leaves no dead mount.
supervisor_crash() { # supervisor_crash WHAT: kill -9 it, wait for agent1 to serve again
  c systemctl show -P MainPID agentfs.service
  local old=$out
  expect "kill -9 the supervisor ($1)" "" systemctl kill --signal=KILL --kill-whom=main agentfs.service
  until_ok 30 sh -c "p=\$(systemctl show -P MainPID agentfs.service); [ \"\$p\" != 0 ] && [ \"\$p\" != $old ] &&
    [ \"\$(systemctl is-active agentfs@agent1)\" = active ] && cat /srv/agent1/f"
  record $? "... agentfs@agent1 serves again" systemctl is-active agentfs@agent1
}
c findmnt -n -o MAJ:MIN --mountpoint /srv/agent1
before_dev=$out
expect "agent1's config gets another state directory" "" \
  sed -i '1i state_dir = "/var/lib/agentfs/agent1-moved"' /etc/agentfs/mounts/agent1.toml
supervisor_crash "state_dir changed"
expect "... mounted afresh (another device), with the new state directory (no branches)" "^fresh a\\(s+\\) 0$" \
  sh -c "[ \"\$(findmnt -n -o MAJ:MIN --mountpoint /srv/agent1)\" != '$before_dev' ] && echo fresh \
    \$(busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListBranches)"
expect "... the journal says why" "made for another source or state directory" \
  journalctl --no-pager -u agentfs.service
expect "... one AgentFS mount at /srv/agent1, the old one detached" "^1$" \
  sh -c 'findmnt -rn -t fuse.agentfs -o TARGET | grep -c "^/srv/agent1$"'
expect "agent1's config gets its state directory back" "" sed -i '1d' /etc/agentfs/mounts/agent1.toml
supervisor_crash "state_dir changed back"
expect "... the branches are back" '"try-a".*"try-b"|"try-b".*"try-a"' \
  busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListBranches

# --- Unit state follows the mount ------------------------------------------
expect "StopMount over D-Bus (behind systemd's back)" "" \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 StopMount s agent1
until_ok 30 sh -c '[ "$(systemctl is-active agentfs@agent1)" = inactive ]'
record $? "... and agentfs@agent1 becomes inactive (not failed)" systemctl is-active agentfs@agent1
expect "systemctl start agentfs@agent1 again" "" systemctl start agentfs@agent1
expect "the branches are still there" '"try-a".*"try-b"|"try-b".*"try-a"' \
  busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListBranches
expect "systemctl stop agentfs@agent1" "" systemctl stop agentfs@agent1
expect "... leaves no AgentFS mount (findmnt)" "^none$" \
  sh -c 'm=$(findmnt -rn -t fuse.agentfs -o TARGET); echo "${m:-none}"'
expect "... and no worker" "^none$" sh -c 'pgrep -l -x agentfs-mount-w || echo none'
expect "... and ListMounts says stopped" '"agent1" "stopped"' \
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
expect "the source holds main's content" "^main$" cat /srv/agent1/f

# --- Reboot -------------------------------------------------------------------
expect "systemctl enable --now agentfs@agent1" "" systemctl enable --now agentfs@agent1
expect "agentfs@agent1 is enabled" "^enabled$" systemctl is-enabled agentfs@agent1
shutdown_container
out=
boot
record $? "the container boots again (same overlay: a reboot)"
if [ -n "$pid1" ]; then
  expect "after the reboot agentfs@agent1 is active" "^active$" systemctl is-active agentfs@agent1
  expect "... /srv/agent1 is mounted again" "^fuse.agentfs$" findmnt -n -o FSTYPE --mountpoint /srv/agent1
  expect "... its branches are back" '"try-a".*"try-b"|"try-b".*"try-a"' \
    busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListBranches
  expect "... its snapshots are back" '"clean".*"busctl-snap"' \
    busctl call org.agentfs /org/agentfs/mount/agent1 org.agentfs.Mount1 ListSnapshots
  expect "... try-a's f is a, main's is main" "^a main$" \
    sh -c 'echo $(cat /srv/agent1/.agentfs/branches/try-a/f) $(cat /srv/agent1/f)'
  expect "agentfsctl exec --branch try-b after the reboot" "^b$" \
    agentfsctl --mount agent1 exec --branch try-b -- cat /srv/agent1/f
  expect "systemctl stop agentfs stops agentfs@agent1 with it" "^inactive$" \
    sh -c 'systemctl stop agentfs.service && systemctl is-active agentfs@agent1; true'
  expect "... and leaves no AgentFS mount" "^none$" sh -c 'm=$(findmnt -rn -t fuse.agentfs -o TARGET); echo "${m:-none}"'
  expect "dpkg -r agentfs" "" dpkg -r agentfs
  expect "... leaves no supervisor running and no unit file" "^gone$" \
    sh -c 'pgrep -x agentfs-supervi || [ -e /lib/systemd/system/agentfs.service ] || echo gone'
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
