#!/usr/bin/env bash
# Installs what building, running and testing AgentFS needs on Debian 12.
# Idempotent: only what is missing is installed. Needs root.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (it uses apt-get and mounts FUSE file systems)" >&2
  exit 1
fi

# Runtime: fuse3 (fusermount3, /etc/fuse.conf). Tests: sqlite3 (concurrent
# writers), attr/acl (xattr tools), util-linux (setpriv, unshare, flock),
# python3 (fcntl lock probes). Packaging (packaging/build-deb): binutils
# (objdump, strip). System test (tests/system/run.sh): systemd (the
# container's init, systemctl, systemd-analyze), systemd-container
# (systemd-nspawn), dbus (the container's system bus, dbus-send), procps
# (pgrep), polkitd (the org.agentfs.* polkit actions; pkaction),
# e2fsprogs (an ext4 state disk made to fail: mkfs.ext4, e2fsck).
apt_pkgs=(fuse3 sqlite3 attr acl util-linux python3 ca-certificates
          binutils systemd systemd-container dbus procps polkitd e2fsprogs)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps.sh: cargo not found; install Rust 1.87 or newer with rustup (https://rustup.rs) and re-run" >&2
  exit 1
fi

# Real POSIX test suites from crates.io (pinned: the expected-results file
# is written against these versions).
command -v pjdfstest >/dev/null 2>&1 || cargo install --locked --quiet pjdfstest --version 0.2.2
command -v fsx >/dev/null 2>&1 || cargo install --locked --quiet fsx --version 0.3.2

# pjdfstest switches to the users of [dummy_auth] in tests/pjdfstest/pjdfstest.toml:
# nobody:nogroup (Debian has them) and tests:tests.
id tests >/dev/null 2>&1 || useradd --system --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin tests

[ -e /dev/fuse ] || { echo "install-deps.sh: /dev/fuse is missing; load the module with 'modprobe fuse'" >&2; exit 1; }
