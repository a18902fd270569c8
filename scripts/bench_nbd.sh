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
#   --cpu NAME=PID (repeatable) and --cpu-out FILE: with fio, also count the
#   CPU time (utime+stime in /proc/PID/stat) that qemu-nbd and each named
#   Rebound process spend during each measurement, and write a markdown
#   table of CPU-seconds per GiB written to FILE: the issue-10 comparison
#   of the source site's share with qemu-nbd, by the same tool in one run.
#   --settle-cmd CMD: with --cpu-out, after each fio run on --uri, run CMD
#   (bash -c) and count CPU until it returns: it waits until the replication
#   has caught up, so work the write deferred (the backlog's send, a resync)
#   is charged to the bytes that caused it. The table then also gives the
#   rate from fio's start until caught up.
#   --cpu-label TEXT: names the Rebound rows in that table (e.g. the policy).
#   --prefill: before measuring, write each server's whole disk once (and
#   wait for the settle command), so both measure overwrites of allocated
#   blocks, as a disk in use does, not the first write of a sparse file,
#   whose page-cache and block allocation costs more and varies.
set -euo pipefail

uri="" size="1G" runtime=10 depth=32 seqdepth=8 cpuout="" settlecmd="" cpulabel="" prefill=0
cpus=()
while [ $# -gt 0 ]; do
	case "$1" in
	--uri) uri="$2"; shift 2 ;;
	--size) size="$2"; shift 2 ;;
	--runtime) runtime="$2"; shift 2 ;;
	--depth) depth="$2"; shift 2 ;;
	--seq-depth) seqdepth="$2"; shift 2 ;;
	--cpu) cpus+=("$2"); shift 2 ;;
	--cpu-out) cpuout="$2"; shift 2 ;;
	--settle-cmd) settlecmd="$2"; shift 2 ;;
	--cpu-label) cpulabel="$2"; shift 2 ;;
	--prefill) prefill=1; shift ;;
	-h|--help) sed -n '2,28p' "$0"; exit 0 ;;
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

# cputicks PID -> utime+stime of the process, in clock ticks (the fields
# after the command name, which may hold spaces).
cputicks() { python3 -c 'import sys; f=open("/proc/%s/stat" % sys.argv[1]).read().rsplit(")", 1)[1].split(); print(int(f[11]) + int(f[12]))' "$1"; }

# cpu_watch NAME=PID... : the processes whose CPU a measurement counts
watch=()

# caught_up URI: for the Rebound export, run the settle command (wait until
# the replication caught up); false for any other URI or without one.
caught_up() {
	[ -n "$settlecmd" ] && [ "$1" = "$uri" ] || return 1
	bash -c "$settlecmd" >&2 || { echo "bench_nbd: the settle command failed" >&2; exit 1; }
}

# fio_run URI RW BS BYTES DEPTH -> prints "bw_bytes iops"; with --cpu-out,
# appends "RW|NAME|TICKS|HZ|BYTES|SECONDS" lines to $tmp/cpu.txt (SECONDS:
# from fio's start until the settle command returned, 0 without one).
fio_run() {
	local before=() w i=0 hz start secs=0
	for w in "${watch[@]}"; do before+=("$(cputicks "${w#*=}")"); done
	start=$(date +%s.%N)
	fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" \
		--iodepth="$5" --size="$4" --time_based --runtime="$runtime" \
		--output-format=json --output="$tmp/fio.json" >/dev/null
	if [ ${#watch[@]} -gt 0 ] && caught_up "$1"; then
		secs=$(python3 -c "import sys; print('%.2f' % ($(date +%s.%N) - $start))")
	fi
	hz=$(getconf CLK_TCK)
	for w in "${watch[@]}"; do
		echo "$2|${w%%=*}|$(( $(cputicks "${w#*=}") - before[i] ))|$hz|$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["io_bytes"])' "$tmp/fio.json")|$secs" >>"$tmp/cpu.txt"
		i=$((i + 1))
	done
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
	if [ "$prefill" = 1 ]; then
		[ "$use_fio" = 1 ] || { echo "bench_nbd: --prefill needs fio" >&2; exit 1; }
		fio --name=prefill --ioengine=nbd --uri="$u" --rw=write --bs=1M --iodepth="$seqdepth" \
			--size="$bytes" --output-format=json --output="$tmp/prefill.json" >/dev/null
		caught_up "$u" || true
	fi
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
[ -n "$cpuout" ] && watch=("qemu-nbd=${pids[0]}")
measure "qemu-nbd" "$quri"
[ -n "$cpuout" ] && watch=("${cpus[@]}")
measure "$name" "$uri"
if [ -n "$cpuout" ]; then
	[ "$use_fio" = 1 ] || { echo "bench_nbd: --cpu-out needs fio" >&2; exit 1; }
	python3 - "$tmp/cpu.txt" "$cpuout" "$cpulabel" <<'PY'
import sys, collections
rows = collections.OrderedDict()
secs = {}
names = []
for line in open(sys.argv[1]):
    rw, name, ticks, hz, nbytes, s = line.strip().split("|")
    per_gib = int(ticks) / int(hz) / (int(nbytes) / 2**30) if int(nbytes) else float("nan")
    rows.setdefault(rw, {})[name] = per_gib
    if float(s) > 0:
        secs[rw] = int(nbytes) / float(s)
    if name not in names:
        names.append(name)
label = {"write": "1 MiB sequential write", "randwrite": "4 KiB random write"}
tag = " (%s)" % sys.argv[3] if sys.argv[3] else ""
# The source site's share meets the throughput target when, per CPU-second,
# it writes at least the target share of what qemu-nbd writes per CPU-second.
target = {"write": 0.9, "randwrite": 0.8}
src = [n for n in names if n.startswith("source")]
with open(sys.argv[2], "w") as out:
    out.write("| workload | " + " | ".join(n + " (CPU-s/GiB)" for n in names) + " | fio start → caught up | source site's bytes per CPU-s ÷ qemu-nbd's | target | met? |\n")
    out.write("|---" * (len(names) + 5) + "|\n")
    for rw, r in rows.items():
        ratio = r["qemu-nbd"] / r[src[0]] if src else float("nan")
        cells = " | ".join("%.2f" % r.get(n, float("nan")) for n in names)
        rate = "%.0f MB/s" % (secs[rw] / 1e6) if rw in secs else "not measured"
        out.write("| %s%s | %s | %s | %.2f | ≥ %.1f | %s |\n" % (label.get(rw, rw), tag, cells, rate, ratio, target[rw], "met" if ratio >= target[rw] else "missed"))
PY
fi
