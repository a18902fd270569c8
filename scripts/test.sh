#!/usr/bin/env bash
# Runs Rebound's whole test suite. It installs the real tools the tests use
# (qemu-utils, libnbd-bin, python3-libnbd (nbdsh, libnbd for the block
# status checks), nbdkit, fio, rsync, and for the VM tests
# qemu-system-x86, Debian's kernel, busybox, qemu-guest-agent, e2fsprogs, btrfs-progs
# for the full-state-directory tests on loop devices; systemd-analyze checks
# the unit files in dist/systemd; postgresql for the store contract suite,
# which starts its own server with initdb in a temporary folder)
# when it runs as root on Debian, and otherwise checks they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/go/bin:$HOME/go/bin:$PATH"

tools=(qemu-io qemu-img qemu-nbd nbdinfo nbdcopy nbdsh nbdkit fio rsync qemu-system-x86_64 busybox mkfs.ext4 mkfs.btrfs losetup systemd-analyze chromium)
packages=(qemu-utils libnbd-bin python3-libnbd nbdkit fio rsync qemu-system-x86 linux-image-amd64 busybox-static qemu-guest-agent e2fsprogs xz-utils zstd btrfs-progs mount systemd postgresql chromium)
missing=()
for t in "${tools[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
# Debian keeps initdb off PATH, under /usr/lib/postgresql/VERSION/bin.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(initdb)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${packages[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo "missing tools: ${missing[*]}; install the Debian packages: ${packages[*]}" >&2
    exit 1
  fi
fi
command -v go >/dev/null || { echo "Go 1.26 is needed (https://go.dev/dl/)" >&2; exit 1; }

go vet ./...
# Cluster tests mostly wait on timers and the network: four at a time per
# package (docs/design/testing.md).
go test -count=1 -timeout 20m -parallel 4 "$@" ./...
