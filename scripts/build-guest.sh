#!/usr/bin/env bash
# build-guest.sh [OUTDIR] builds the small Linux guest the tests boot under QEMU,
# from Debian packages only:
#
#   OUTDIR/vmlinux          uncompressed kernel ELF (PVH entry), for `-kernel`
#   OUTDIR/initramfs.cpio   busybox, e2fsprogs, qemu-ga, the virtio/ext4 modules
#                           and cmd/rebound-guest as /init (boots fastest)
#   OUTDIR/initramfs.cpio.gz the same, gzipped
#
# It is idempotent: when the inputs (this script, the guest's Go sources, the
# Debian package versions, the kernel) are unchanged it exits at once.
# Environment: KERNEL_VERSION picks a kernel from /boot (default: the newest).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/.guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

PKGS=(linux-image-amd64 busybox-static qemu-system-x86 qemu-guest-agent e2fsprogs xz-utils zstd cpio gzip)

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

# --- packages -----------------------------------------------------------------
missing=()
for p in "${PKGS[@]}"; do
	st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[ "$st" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root or: apt-get install ${missing[*]})"
	command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get"
	log "installing ${missing[*]}"
	# Only refresh the index when it was never fetched: an update per build is slow.
	if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
		apt-get update -qq >&2
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || die "go is not in PATH (the guest's /init is a Go program)"

# --- kernel -------------------------------------------------------------------
if [ -n "${KERNEL_VERSION:-}" ]; then
	KVER=$KERNEL_VERSION
else
	KVER=$(cd /boot && ls vmlinuz-* 2>/dev/null | sed 's/^vmlinuz-//' | sort -V | tail -n1)
fi
[ -n "$KVER" ] || die "no kernel in /boot (install linux-image-amd64)"
VMLINUZ=/boot/vmlinuz-$KVER
MODDIR=/lib/modules/$KVER
[ -r "$VMLINUZ" ] || die "$VMLINUZ is not readable"
[ -r "$MODDIR/modules.dep" ] || die "$MODDIR/modules.dep is missing"

# --- up to date? --------------------------------------------------------------
stamp() {
	{
		echo "kernel $KVER"
		stat -c '%s %Y' "$VMLINUZ"
		dpkg-query -W -f='${Package} ${Version}\n' "${PKGS[@]}" 2>/dev/null | sort
		sha256sum "${BASH_SOURCE[0]}"
		(cd "$ROOT" && find cmd/rebound-guest internal/guestimage/record -name '*.go' ! -name '*_test.go' -print0 |
			sort -z | xargs -0 sha256sum)
		sha256sum "$ROOT/go.mod"
		go version
	} | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp)
if [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initramfs.cpio" ] && [ -s "$OUT/initramfs.cpio.gz" ] && [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ]; then
	log "up to date: $OUT"
	exit 0
fi

WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- vmlinux ------------------------------------------------------------------
# Like the kernel's scripts/extract-vmlinux: find each compressed payload's magic
# in the bzImage, decompress from there, keep the first result that is an ELF.
extract_vmlinux() {
	local img=$1 dst=$2 name magic cmd pos
	for spec in \
		'xz|\xFD7zXZ\x00|xz -dc' \
		'gzip|\x1F\x8B\x08|gzip -dc' \
		'zstd|\x28\xB5\x2F\xFD|zstd -dcq' \
		'bzip2|BZh|bzip2 -dc' \
		'lzma|\x5D\x00\x00\x00|xz -dc --format=lzma'; do
		IFS='|' read -r name magic cmd <<<"$spec"
		command -v "${cmd%% *}" >/dev/null || continue
		for pos in $(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1); do
			tail -c +$((pos + 1)) "$img" | $cmd >"$dst" 2>/dev/null || true
			if [ "$(head -c 4 "$dst" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
				log "vmlinux: $name payload at offset $pos"
				return 0
			fi
		done
	done
	return 1
}
VMLINUX_STAMP=$(stat -c '%s %Y' "$VMLINUZ")
if [ -s "$OUT/vmlinux" ] && [ "$(cat "$OUT/.vmlinux.stamp" 2>/dev/null)" = "$KVER $VMLINUX_STAMP" ]; then
	log "vmlinux up to date"
else
	extract_vmlinux "$VMLINUZ" "$WORK/vmlinux" || die "no compressed ELF found in $VMLINUZ"
	mv "$WORK/vmlinux" "$OUT/vmlinux"
	echo "$KVER $VMLINUX_STAMP" >"$OUT/.vmlinux.stamp"
fi

# --- initramfs ----------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,data,run,tmp,etc,lib/modules,var}
ln -s ../run "$R/var/run"

# busybox and its applets; real e2fsprogs replace its mke2fs below.
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list-full); do
	[ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done

# copy_bin SRC DST copies a dynamic binary and every shared library ldd names,
# at the same paths, so the guest's loader finds them.
copy_bin() {
	local src=$1 dst=$2 lib
	mkdir -p "$(dirname "$R/$dst")"
	rm -f "$R/$dst"
	cp -L "$src" "$R/$dst"
	for lib in $(ldd "$src" | grep -oE '/[^ ]+' | sort -u); do
		[ -e "$R/$lib" ] && continue
		mkdir -p "$(dirname "$R/$lib")"
		cp -L "$lib" "$R/$lib"
	done
}
copy_bin /sbin/e2fsck sbin/e2fsck
copy_bin /sbin/mke2fs sbin/mke2fs
for l in fsck.ext4 fsck.ext2; do rm -f "$R/sbin/$l"; ln -s e2fsck "$R/sbin/$l"; done
for l in mkfs.ext4 mkfs.ext2; do rm -f "$R/sbin/$l"; ln -s mke2fs "$R/sbin/$l"; done
cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"
copy_bin /usr/sbin/qemu-ga usr/sbin/qemu-ga
ln -sf /proc/mounts "$R/etc/mtab"
echo 'root:x:0:0:root:/:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"

# qemu-ga's guest-shutdown runs /sbin/shutdown -h|-H|-r ...: turn it into the
# signal /init (rebound-guest) takes as poweroff (USR2), halt (USR1) or reboot (TERM).
rm -f "$R/sbin/shutdown"
cat >"$R/sbin/shutdown" <<'EOF'
#!/bin/sh
sig=USR2
for a in "$@"; do
	case "$a" in
	-r) sig=TERM ;;
	-H) sig=USR1 ;;
	esac
done
exec kill -$sig 1
EOF
chmod 755 "$R/sbin/shutdown"

# Kernel modules: each wanted module after its dependencies (modules.dep lists a
# module's dependencies; load them deepest first). Built-in ones are skipped.
WANT=(virtio_pci virtio_blk virtio_console crc32c_generic crc32c-intel ext4 button evdev)
declare -A DEP SEEN
while IFS=: read -r mod deps; do DEP[$mod]=$deps; done <"$MODDIR/modules.dep"
ORDER=()
add_mod() {
	local path=$1 i
	[ -n "${SEEN[$path]:-}" ] && return 0
	SEEN[$path]=1
	local deps=(${DEP[$path]})
	for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add_mod "${deps[$i]}"; done
	ORDER+=("$path")
}
for m in "${WANT[@]}"; do
	alt=${m//_/-}
	alt2=${m//-/_}
	if grep -qE "/($m|$alt|$alt2)\.ko$" "$MODDIR/modules.builtin"; then
		continue
	fi
	path=$(grep -oE "^[^:]*/($m|$alt|$alt2)\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" | head -n1 | tr -d :)
	[ -n "$path" ] || die "module $m is neither built in nor in $MODDIR"
	add_mod "$path"
done
: >"$R/lib/modules/load.list"
for p in "${ORDER[@]}"; do
	f=$(basename "$p")
	case "$f" in
	*.ko.xz) xz -dc "$MODDIR/$p" >"$R/lib/modules/${f%.xz}" ;;
	*.ko.zst) zstd -dcq "$MODDIR/$p" >"$R/lib/modules/${f%.zst}" ;;
	*.ko.gz) gzip -dc "$MODDIR/$p" >"$R/lib/modules/${f%.gz}" ;;
	*) cp "$MODDIR/$p" "$R/lib/modules/$f" ;;
	esac
	f=${f%.xz}; f=${f%.zst}; f=${f%.gz}
	echo "$f" >>"$R/lib/modules/load.list"
done
log "modules: $(tr '\n' ' ' <"$R/lib/modules/load.list")"

# The guest program, static.
(cd "$ROOT" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$R/init" ./cmd/rebound-guest)

# /dev/console lets the kernel give /init its stdio; without root, /init
# reopens the console itself after mounting devtmpfs.
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$R/dev/console" c 5 1
fi

# Both forms: the uncompressed one boots 2-3 s faster under TCG, where the
# kernel's gunzip of the initramfs is on the boot's critical path.
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$WORK/initramfs.cpio"
gzip -n -6 -c "$WORK/initramfs.cpio" >"$WORK/initramfs.cpio.gz"
mv "$WORK/initramfs.cpio" "$OUT/initramfs.cpio"
mv "$WORK/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
echo "$STAMP" >"$OUT/.stamp"
log "built $OUT: vmlinux $(stat -c %s "$OUT/vmlinux") bytes, initramfs.cpio $(stat -c %s "$OUT/initramfs.cpio") bytes, initramfs.cpio.gz $(stat -c %s "$OUT/initramfs.cpio.gz") bytes"
