#!/usr/bin/env bash
# bench_nbd.sh compares NBD servers under the same client load: qemu-nbd on
# a raw file in a temp dir, and either a Rebound export (--uri) or, without
# --uri, Rebound's NBD server on the same kind of raw file
# (nbd/internal/benchserve). It measures sequential write throughput (1 MiB
# writes) and 4 KiB random-write IOPS with fio's nbd engine, falling back to
# qemu-img bench, and prints a markdown table.
#
#   scripts/bench_nbd.sh [--uri NBD_URI] [--size 1G] [--runtime 10] [--depth 32] [--seq-depth 8]
#   (--depth is the random writes' queue depth, --seq-depth the 1 MiB
#   sequential writes', as issue 10's targets are stated)
#   (BENCH_NBD_TOOL=qemu-img forces the qemu-img bench fallback)
set -euo pipefail

uri="" size="1G" runtime=10 depth=32 seqdepth=8
while [ $# -gt 0 ]; do
	case "$1" in
	--uri) uri="$2"; shift 2 ;;
	--size) size="$2"; shift 2 ;;
	--runtime) runtime="$2"; shift 2 ;;
	--depth) depth="$2"; shift 2 ;;
	--seq-depth) seqdepth="$2"; shift 2 ;;
	-h|--help) sed -n '2,12p' "$0"; exit 0 ;;
	*) echo "unknown argument $1" >&2; exit 2 ;;
	esac
done

cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null || { echo "bench_nbd: $1 is required" >&2; exit 1; }; }
need qemu-nbd
need qemu-img
need qemu-io
need python3

use_fio=0
if [ "${BENCH_NBD_TOOL:-}" != qemu-img ] && command -v fio >/dev/null && fio --enghelp=nbd 2>/dev/null | grep -q uri; then
	use_fio=1
fi

wait_uri() { # wait until an NBD URI answers
	for _ in $(seq 100); do
		qemu-img info -f raw "$1" >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	echo "bench_nbd: $1 does not answer" >&2
	exit 1
}

# fio_run URI RW BS BYTES DEPTH -> prints "bw_bytes iops"
fio_run() {
	fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" \
		--iodepth="$5" --size="$4" --time_based --runtime="$runtime" \
		--output-format=json --output="$tmp/fio.json" >/dev/null
	python3 -c 'import json,sys; w=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print(w["bw_bytes"], w["iops"])' "$tmp/fio.json"
}

# bench_run URI BS COUNT BYTES -> prints "bw_bytes iops" (qemu-img bench fallback)
bench_run() {
	local out secs
	out=$(qemu-img bench -w -t none -f raw -d "$depth" -s "$2" -c "$3" "$1")
	secs=$(echo "$out" | sed -n 's/.*Run completed in \([0-9.]*\) seconds.*/\1/p')
	python3 -c "import sys; s=float('$secs'); n=$3; b=int('$4'); print(int(n*b/s), n/s)"
}

# settle URI: flush the export so one measurement's dirty data is not
# written back during the next one.
settle() { qemu-io -f raw -c flush "$1" >/dev/null; }

measure() { # measure NAME URI
	local name="$1" u="$2" seq rnd bytes
	bytes=$(qemu-img info -f raw --output=json "$u" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
	if [ "$use_fio" = 1 ]; then
		settle "$u"; seq=$(fio_run "$u" write 1M "$bytes" "$seqdepth")
		settle "$u"; rnd=$(fio_run "$u" randwrite 4k "$bytes" "$depth")
	else
		settle "$u"; seq=$(bench_run "$u" 1M $((bytes >> 20)) 1048576)
		settle "$u"; rnd=$(bench_run "$u" 4k 100000 4096)
	fi
	settle "$u"
	python3 -c "print('| %s | %.0f | %.0f |' % ('$name', ${seq% *}/1e6, ${rnd#* }))"
}

truncate -s "$size" "$tmp/qemu.raw"
qemu-nbd -f raw -x bench -t -e 16 --cache=writeback --socket "$tmp/qemu.sock" "$tmp/qemu.raw" &
pids+=($!)
quri="nbd+unix:///bench?socket=$tmp/qemu.sock"
wait_uri "$quri"

if [ -z "$uri" ]; then
	need go
	go build -o "$tmp/benchserve" ./nbd/internal/benchserve
	truncate -s "$size" "$tmp/rebound.raw"
	"$tmp/benchserve" -file "$tmp/rebound.raw" -name bench -socket "$tmp/rebound.sock" >"$tmp/uri" &
	pids+=($!)
	uri="nbd+unix:///bench?socket=$tmp/rebound.sock"
	wait_uri "$uri"
	name="rebound nbd (benchserve)"
else
	name="rebound ($uri)"
fi

tool=$([ "$use_fio" = 1 ] && echo "fio nbd engine, iodepth $seqdepth (sequential) and $depth (random), ${runtime}s per measurement" || echo "qemu-img bench, depth $depth, fixed request counts")
echo "NBD write benchmark: $tool, $size disk" >&2
echo "| server | seq write 1 MiB (MB/s) | random write 4 KiB (IOPS) |"
echo "|---|---|---|"
measure "qemu-nbd" "$quri"
measure "$name" "$uri"
