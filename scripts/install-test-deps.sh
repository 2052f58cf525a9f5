#!/usr/bin/env bash
# Install the external tools the end-to-end tests (tests/) and the benchmarks
# (benches/peer-compare.sh, benches/backup-compare.sh) drive, then verify every
# one exists.
#
#   bash scripts/install-test-deps.sh
#
# Debian/Ubuntu, as root (or with sudo). Only packages that are missing are
# installed; `apt-get update` runs first when anything is missing. Exits
# non-zero naming the missing tool if something could not be installed.
#
# S3 test server: the backup tests run a real S3-compatible server on loopback,
# s3s-fs (crates.io; buckets are directories and objects plain files under its
# root dir, so a stopped and restarted server keeps its data). It is built with
#   cargo install s3s-fs --version $S3S_FS_VERSION --locked --features binary \
#         --root "$EVSD_TEST_TOOLS"
# only when "$EVSD_TEST_TOOLS/bin/s3s-fs" is missing or another version (build:
# 2-9 minutes on 2 CPUs; the script prints a step message first).
# 0.14.1 is pinned because 0.15 and later need a newer rustc than 1.95; the
# `binary` feature is what builds the executable.
#   EVSD_TEST_TOOLS  install root for cargo-built test tools
#                    (default: $HOME/.cache/evsd-test-tools; binary in bin/)
# The test harness (tests/src/s3.rs) runs $EVSD_S3S_FS if set, otherwise
# $EVSD_TEST_TOOLS/bin/s3s-fs (same default), otherwise s3s-fs from PATH, so
# nothing needs to be added to PATH.
set -euo pipefail

# command -> Debian package providing it
TOOLS=(
  "qemu-img:qemu-utils"
  "qemu-io:qemu-utils"
  "qemu-nbd:qemu-utils"
  "nbdkit:nbdkit"
  "nbdinfo:libnbd-bin"
  "nbdcopy:libnbd-bin"
  "nbdfuse:libnbd-bin"
  "nbdsh:python3-libnbd"
  "fio:fio"
  "fusermount3:fuse3"
  "mkfs.ext4:e2fsprogs"
  "e2fsck:e2fsprogs"
  "losetup:mount"
  "mount:mount"
  "umount:mount"
  "ps:procps"
  "ss:iproute2"
  "jq:jq"
  "python3:python3"
  "systemd-socket-activate:systemd"
  "systemd-analyze:systemd"
  "openssl:openssl"
  "fincore:util-linux-extra"
  "setpriv:util-linux"
  "restic:restic"
  "curl:curl"
)

S3S_FS_VERSION=0.14.1
EVSD_TEST_TOOLS=${EVSD_TEST_TOOLS:-${HOME:-/root}/.cache/evsd-test-tools}
S3S_FS_BIN=$EVSD_TEST_TOOLS/bin/s3s-fs

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

have_nbd_module() {
  # nbdsh runs `python3 -m nbd`; it needs the system python's libnbd binding.
  /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1
}

missing_pkgs=()
add_pkg() {
  local p=$1
  for q in "${missing_pkgs[@]:-}"; do [ "$q" = "$p" ] && return 0; done
  missing_pkgs+=("$p")
}
for entry in "${TOOLS[@]}"; do
  cmd=${entry%%:*}; pkg=${entry#*:}
  command -v "$cmd" >/dev/null 2>&1 || add_pkg "$pkg"
done
have_nbd_module || add_pkg python3-libnbd

if [ "${#missing_pkgs[@]}" -gt 0 ]; then
  echo "install-test-deps: installing: ${missing_pkgs[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: apt-get not available; install these packages by hand: ${missing_pkgs[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # qemu >= 8.2 negotiates NBD extended headers (the qemu e2e test requires it); on
  # bookworm that is the backports build, taken when a backports suite is configured, for
  # qemu-utils alone (the other packages stay the release's).
  others=()
  for p in "${missing_pkgs[@]}"; do [ "$p" = qemu-utils ] || others+=("$p"); done
  if [ "${#others[@]}" -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${others[@]}" </dev/null
  fi
  if [ "${#others[@]}" -ne "${#missing_pkgs[@]}" ]; then
    qemu_target=()
    if apt-cache policy qemu-utils 2>/dev/null | grep -q 'bookworm-backports'; then
      qemu_target=(-t bookworm-backports)
    fi
    $SUDO apt-get install -y -qq --no-install-recommends "${qemu_target[@]}" qemu-utils </dev/null
  fi
fi

# s3s-fs (S3 test server), built with cargo. `--target-dir` keeps the build out
# of the workspace's CARGO_TARGET_DIR; it is removed afterwards.
s3s_fs_version() { "$1" --version 2>/dev/null | awk '{print $NF}'; }
if [ "$(s3s_fs_version "$S3S_FS_BIN")" != "$S3S_FS_VERSION" ]; then
  if ! command -v cargo >/dev/null 2>&1; then
    echo "install-test-deps: cargo not found; cannot build s3s-fs $S3S_FS_VERSION" >&2
  else
    echo "install-test-deps: building the S3 test server s3s-fs $S3S_FS_VERSION into $EVSD_TEST_TOOLS (takes a few minutes)"
    s3s_build=$(mktemp -d "${TMPDIR:-/tmp}/evsd-s3s-fs-build.XXXXXX")
    if ! cargo install s3s-fs --version "$S3S_FS_VERSION" --locked --features binary \
           --root "$EVSD_TEST_TOOLS" --target-dir "$s3s_build" --force; then
      echo "install-test-deps: cargo install s3s-fs $S3S_FS_VERSION failed (see above)" >&2
    fi
    rm -rf "$s3s_build"
  fi
fi

# Verify.
fail=0
for entry in "${TOOLS[@]}"; do
  cmd=${entry%%:*}; pkg=${entry#*:}
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "install-test-deps: MISSING tool '$cmd' (Debian package '$pkg')" >&2
    fail=1
  fi
done
if ! have_nbd_module; then
  echo "install-test-deps: MISSING python module 'nbd' for /usr/bin/python3 (Debian package 'python3-libnbd')" >&2
  fail=1
fi
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
  echo "install-test-deps: MISSING fio 'nbd' ioengine (fio built without libnbd)" >&2
  fail=1
fi
if [ ! -e /dev/fuse ]; then
  echo "install-test-deps: MISSING /dev/fuse (needed by the nbdfuse test)" >&2
  fail=1
fi
if [ ! -e /dev/loop-control ]; then
  # losetup -f creates loop devices through /dev/loop-control.
  modprobe loop 2>/dev/null || true
  if [ ! -e /dev/loop-control ] && ! ls /dev/loop[0-9]* >/dev/null 2>&1; then
    echo "install-test-deps: MISSING loop devices (/dev/loop-control; needed by the nbdfuse test)" >&2
    fail=1
  fi
fi
# The TCP congestion-control tests set bbr on their sockets.
if ! grep -qw bbr /proc/sys/net/ipv4/tcp_available_congestion_control 2>/dev/null; then
  modprobe tcp_bbr 2>/dev/null || true
  if ! grep -qw bbr /proc/sys/net/ipv4/tcp_available_congestion_control 2>/dev/null; then
    echo "install-test-deps: MISSING the kernel's bbr TCP congestion control (modprobe tcp_bbr; needed by the tcp_congestion tests)" >&2
    fail=1
  fi
fi
if [ "$(s3s_fs_version "$S3S_FS_BIN")" != "$S3S_FS_VERSION" ]; then
  echo "install-test-deps: MISSING S3 test server '$S3S_FS_BIN' version $S3S_FS_VERSION (cargo install s3s-fs --version $S3S_FS_VERSION --locked --features binary --root $EVSD_TEST_TOOLS)" >&2
  fail=1
fi
if [ "$fail" -ne 0 ]; then
  echo "install-test-deps: some test dependencies are missing (see above)" >&2
  exit 1
fi

qemu_ver=$(qemu-img --version | head -1 | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p')
echo "install-test-deps: all tools present (qemu ${qemu_ver:-?}, $(nbdinfo --version | head -1), $(nbdkit --version), $(fio --version), $(restic version | awk '{print $1, $2}'), s3s-fs $S3S_FS_VERSION at $S3S_FS_BIN)"
case "$qemu_ver" in
  [0-7].*|8.[01]*) echo "install-test-deps: note: qemu $qemu_ver < 8.2 does not negotiate NBD extended headers; the qemu tests then cover structured replies only" ;;
esac
