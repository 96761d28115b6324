#!/usr/bin/env bash
# Installs AgentFS (the Debian package built from this tree) and starts a
# demo mount you can try.
#   sudo scripts/demo.sh          build, install, mount /var/tmp/agentfs-demo/project
#   sudo scripts/demo.sh stop     unmount the demo (and stop what this script started)
# Under systemd the demo is the unit agentfs@demo. Where PID 1 is not
# systemd (containers, CI), the script starts the system bus (if none runs)
# and agentfs-supervisor itself, in the background.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=/var/tmp/agentfs-demo
conf=/etc/agentfs/mounts/demo.toml
under_systemd() { [ -d /run/systemd/system ]; }

if [ "${1:-}" = "stop" ]; then
  if under_systemd; then
    systemctl stop agentfs@demo
  else
    agentfsctl mount-stop demo 2>/dev/null || true
    for p in supervisor dbus; do
      f=$demo/$p.pid
      if [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$(cat "$f")" 2>/dev/null || break; sleep 0.1; done
      fi
      rm -f "$f"
    done
    # dbus-daemon leaves its socket behind; a stale one makes D-Bus
    # clients (and dpkg triggers) fail with "connection refused".
    [ -e "$demo/dbus.pid" ] || ! [ -S /run/dbus/system_bus_socket ] ||
      busctl --system status org.freedesktop.DBus >/dev/null 2>&1 ||
      rm -f /run/dbus/system_bus_socket /run/dbus/pid
  fi
  echo "demo stopped; $demo/project holds everything written to main"
  exit 0
fi

scripts/install-deps.sh
packaging/build-deb
deb=$(ls -t target/debian/agentfs_*_amd64.deb | head -1)
dpkg -i "$deb" >/dev/null
echo "installed $deb"

mkdir -p "$demo/project/src" "$demo/mnt"
[ -f "$demo/project/README" ] || {
  echo "A demo project served by AgentFS." > "$demo/project/README"
  printf 'fn main() {\n    println!("hello from AgentFS");\n}\n' > "$demo/project/src/main.rs"
}
mkdir -p "$(dirname "$conf")"
cat > "$conf" <<EOF
# The demo mount made by scripts/demo.sh (keys: specs/config.md).
source = "$demo/project"
mountpoint = "$demo/mnt"
state_dir = "$demo/state"
allow_other = true
EOF

if under_systemd; then
  systemctl start agentfs@demo
  how="systemctl status agentfs@demo; journalctl -u agentfs"
else
  if [ ! -S /run/dbus/system_bus_socket ]; then
    mkdir -p /run/dbus
    dbus-daemon --system --fork --print-pid > "$demo/dbus.pid"
  else # pick up the policy just installed
    busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null
  fi
  if ! busctl --system status org.agentfs >/dev/null 2>&1; then
    /usr/sbin/agentfs-supervisor >"$demo/supervisor.log" 2>&1 &
    echo $! > "$demo/supervisor.pid"
    for _ in $(seq 100); do busctl --system status org.agentfs >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  agentfsctl mount-start demo >/dev/null
  how="agentfsctl status demo; less $demo/supervisor.log"
fi

cat <<MSG
AgentFS is serving $demo/project at $demo/mnt ($how).
Try:
  ls -la $demo/mnt; cat $demo/mnt/src/main.rs
  echo change >> $demo/mnt/README; cat $demo/project/README   # main writes in place
Snapshots, branches, bindings:
  agentfsctl snapshot-create --name clean
  echo edited > $demo/mnt/src/main.rs; cat $demo/mnt/.agentfs/snapshots/clean/src/main.rs
  agentfsctl branch-create --snapshot clean --name try-a
  agentfsctl exec --branch try-a -- sh -c 'echo agent >> $demo/mnt/README; cat $demo/mnt/README'
  cat $demo/mnt/README    # main: untouched by the agent's write
  agentfsctl branch-list; agentfsctl binding-list
  busctl call org.agentfs /org/agentfs org.agentfs.Manager1 ListMounts
Stop it with: sudo scripts/demo.sh stop
MSG
