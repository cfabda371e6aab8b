#!/bin/bash
# SPDX-License-Identifier: MIT
#
# Multi-queue cells (issue 12): 2 queues x QD32 4K jobs from one vqcow-fe
# (each queue driven by a host thread of its own, as a guest's vCPUs drive
# theirs; FE_THREADS below), against vqcowd --io-threads 1
# and 2, qemu-storage-daemon 10.0 and the system's 7.2 (both in their best
# configuration: aio=io_uring, cache.direct=on, an iothread, num-queues=2),
# alternating backend by backend within each repetition, so the ratios
# compare runs made minutes apart at most on a noisy machine.
#
#   bash contrib/bench/mq.sh [REPS] [SECONDS]      (defaults 3 and 5)
#   bash contrib/bench/mq.sh [--reps N] [--runtime S] [--guest | --guest-only]
#                            [--guest-reps N] [--guest-runtime S] [--prepare]
#
# Cells: read-zlib-1q is the compressed image with one queue (vqcowd
# single-threaded: the reference for the 2-queue scaling); then randread of
# a full qcow2 (random data), of a zlib-compressed qcow2, of a
# preallocation=metadata qcow2; sequential 4K read of the zlib-compressed
# qcow2 (seqread-zlib: each queue reads its half in order, so 16 reads fall
# in each cluster: the inflated-cluster caches); randwrite into an empty
# qcow2 and into an overlay over the full image (fresh copies for every
# run, made in $BENCH_DIR too and deleted after it). Images are
# 1 GiB under $BENCH_DIR (default build/bench-mq; --prepare only makes them).
# Prints one line per run (IOPS, the backend's CPU time per I/O from
# /proc/PID/stat, and the host's 1-minute load average before and after the
# run, so a reader can judge the noise) and a median table with the range of
# the load. QSD10=PATH names qemu-storage-daemon 10 (default: what
# contrib/bench/qsd10.sh prints, fetched if needed); 10.0 is skipped when it
# cannot be had. CELLS="..." and KINDS="..." run a subset (read-zlib-1q runs
# with read-zlib, whatever KINDS holds; the tables, made by mqtable.py from
# the run lines, leave out the ratios whose kinds did not run). read-full-qd1 (not in the default cells): the full
# image, 2 queues x QD1, for the latency of a lightly loaded daemon (each
# run's line ends with the mean and p99 latency in us); read-zlib-qd1 (not
# in the default cells either): the same on the zlib image, where each read
# inflates a cluster on the thread that serves its queue. VQCOWD_ARGS="..."
# adds options to both vqcowd kinds; an A/B of two builds or options: the
# kinds alt-1 and alt-2 run VQCOWD_ALT (default: the same binary) with
# VQCOWD_ALT_ARGS, and the table gains their ratios. KINDS_FLIP=1 flips
# the kinds' order every repetition (default: the same order in each, as
# the runs before it were made), so that in an A/B each kind runs first in
# half the repetitions: under load the second of two write-empty runs won
# by 14-22 % whichever it was (RESULTS.md, "fsb"). PERF_DIR=DIR
# records each vqcowd run with `perf record -g` into DIR/CELL-KIND-REP.data
# and `perf stat` into .stat (profiles: their overhead counts in the CPU
# time of those runs, so keep them out of the measured repetitions).
# --guest also runs the in-guest cell afterwards (guest-mq.sh: a QEMU guest
# with 2 vCPUs running fio numjobs=2 against the same backends, on the full
# and the compressed image; --guest-reps, --guest-runtime: its repetitions
# and seconds per job, default 2 and 10); --guest-only runs only that.
# FE_THREADS="per-queue" (default) or "one" picks vqcow-fe bench's client
# mode (--threads: a thread per queue, or one thread driving both queues);
# a list ("per-queue one") runs every backend with each mode in turn (the
# order flips every repetition), each run's line names its mode, and the
# tables come per mode, with the modes' ratios after them. Each run's line
# also gives the client's own CPU time per I/O (fe=).
set -euo pipefail
reps=3 secs=5 guest=0 greps=2 gsecs=10 prepare=0
usage() { sed -n '4,/^set /{/^#/p}' "$0"; }
pos=0
while [ $# -gt 0 ]; do
	case "$1" in
	--reps) reps=$2; shift 2 ;;
	--runtime) secs=$2; shift 2 ;;
	--guest) guest=1; shift ;;
	--guest-only) guest=2; shift ;;
	--guest-reps) greps=$2; shift 2 ;;
	--guest-runtime) gsecs=$2; shift 2 ;;
	--prepare) prepare=1; shift ;;
	-h | --help) usage; exit 0 ;;
	[0-9]*)
		case $pos in 0) reps=$1 ;; 1) secs=$1 ;; *) usage >&2; exit 2 ;; esac
		pos=$((pos + 1))
		shift
		;;
	*) usage >&2; exit 2 ;;
	esac
done
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD:-$repo/build}
vqcowd=${VQCOWD:-$build/src/vqcowd}
fe=${VQCOW_FE:-$build/tests/frontend/vqcow-fe}
dir=${BENCH_DIR:-$build/bench-mq}
mkdir -p "$dir"
tmp=$(mktemp -d)
sock=$tmp/sock
bpid=
# the write cells' fresh images: under $dir like the others (not /tmp: a run
# writes about 1 GiB into each), named by this process, deleted after each run
wimg_empty=$dir/mq-$$-empty.qcow2 wimg_ov=$dir/mq-$$-ov.qcow2
cleanup() {
	[ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true
	rm -rf "$tmp"
	rm -f "$wimg_empty" "$wimg_ov"
}
trap cleanup EXIT
size=1G

# -- images (made once) --
if [ ! -f "$dir/full.qcow2" ] || [ ! -f "$dir/zlib.qcow2" ] || [ ! -f "$dir/prealloc.qcow2" ]; then
	rm -f "$dir/full.qcow2" "$dir/zlib.qcow2" "$dir/prealloc.qcow2"
	head -c 1G /dev/urandom >"$dir/src.raw"
	qemu-img convert -f raw -O qcow2 "$dir/src.raw" "$dir/full.qcow2"
	# Compressible like a typical system disk (about 1:3), so zlib has work.
	python3 - "$dir/src.raw" <<'EOF'
import os, sys
with open(sys.argv[1], "r+b") as f:
    for off in range(0, 1 << 30, 65536):
        f.seek(off)
        f.write(bytes(os.urandom(16384)) + bytes(range(256)) * 192)
EOF
	qemu-img convert -c -f raw -O qcow2 -o compression_type=zlib "$dir/src.raw" "$dir/zlib.qcow2"
	rm -f "$dir/src.raw"
	qemu-img create -q -f qcow2 -o preallocation=metadata "$dir/prealloc.qcow2" $size
fi
[ $prepare = 0 ] || exit 0
if [ $guest = 2 ]; then
	BENCH_DIR=$dir bash "$repo/contrib/bench/guest-mq.sh" --reps "$greps" --runtime "$gsecs"
	exit
fi
. "$repo/contrib/bench/need-build.sh"
. "$repo/contrib/bench/qsd-start.sh"
bench_need_build "$repo" "$build" vqcowd vqcow-fe
for t in qemu-storage-daemon python3 "$vqcowd" "$fe"; do
	command -v "$t" >/dev/null || { echo "mq.sh: $t not found" >&2; exit 77; }
done
qsd10=
case " ${KINDS:-qsd-10} " in
*" qsd-10 "*) qsd10=${QSD10:-$(bash "$repo/contrib/bench/qsd10.sh" 2>/dev/null || true)} ;;
esac
fe_modes=${FE_THREADS:-per-queue}
for m in $fe_modes; do
	case $m in
	per-queue | one) ;;
	*) echo "mq.sh: FE_THREADS takes per-queue and/or one, not '$m'" >&2; exit 2 ;;
	esac
done
echo "mq.sh: $reps repetition(s) of $secs s; client: vqcow-fe bench --threads $fe_modes;" \
	"load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start() { # KIND IMAGE
	local kind=$1 img=$2 q
	rm -f "$sock"
	case $kind in
	vqcowd-1 | vqcowd-2)
		# shellcheck disable=SC2086
		"$vqcowd" --socket-path "$sock" --blk-file "$img" --format qcow2 --num-queues 2 \
			--io-threads "${kind#vqcowd-}" ${VQCOWD_ARGS:-} >"$tmp/log" 2>&1 &
		;;
	alt-1 | alt-2)
		# shellcheck disable=SC2086
		"${VQCOWD_ALT:-$vqcowd}" --socket-path "$sock" --blk-file "$img" --format qcow2 \
			--num-queues 2 --io-threads "${kind#alt-}" ${VQCOWD_ALT_ARGS:-} >"$tmp/log" 2>&1 &
		;;
	qsd-7.2 | qsd-10)
		q=qemu-storage-daemon
		[ "$kind" = qsd-10 ] && q=$qsd10
		bench_qsd_start "$q" "$img" qcow2 "$sock" "$tmp/log" 2
		;;
	esac
	bpid=$!
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
	[ -S "$sock" ] && return 0
	echo "mq.sh: $kind did not start (run left out):" >&2
	cat "$tmp/log" >&2
	kill "$bpid" 2>/dev/null || true
	wait "$bpid" 2>/dev/null || true
	bpid=
	return 1
}

load1() { cut -d' ' -f1 /proc/loadavg; }

run() { # KIND CELL FE-MODE
	local kind=$1 cell=$2 mode=$3 img rw t0 t1 out nq=2 lb rc=0 st=0 qd=32 tag
	case $cell in
	read-zlib-1q) img=$dir/zlib.qcow2 rw=randread nq=1 ;;
	read-full) img=$dir/full.qcow2 rw=randread ;;
	read-full-qd1) img=$dir/full.qcow2 rw=randread qd=1 ;;
	read-zlib) img=$dir/zlib.qcow2 rw=randread ;;
	read-zlib-qd1) img=$dir/zlib.qcow2 rw=randread qd=1 ;;
	read-prealloc) img=$dir/prealloc.qcow2 rw=randread ;;
	seqread-zlib) img=$dir/zlib.qcow2 rw=read ;;
	write-empty)
		img=$wimg_empty rw=randwrite
		qemu-img create -q -f qcow2 "$img" $size
		;;
	write-overlay)
		img=$wimg_ov rw=randwrite
		qemu-img create -q -f qcow2 -b "$dir/full.qcow2" -F qcow2 "$img"
		;;
	esac
	tag=$cell-$kind
	[ "$fe_modes" = "$mode" ] || tag=$tag-$mode
	lb=$(load1)
	start "$kind" "$img" || return 0
	t0=$(ticks "$bpid")
	local ppid= spid=
	if [ -n "${PERF_DIR:-}" ] && [ "${kind#qsd}" = "$kind" ]; then
		mkdir -p "$PERF_DIR"
		perf record -q -g -p "$bpid" -o "$PERF_DIR/$tag-$REP.data" -- sleep "$secs" \
			>/dev/null 2>&1 &
		ppid=$!
		perf stat -e task-clock,context-switches,cpu-migrations -p "$bpid" \
			-o "$PERF_DIR/$tag-$REP.stat" -- sleep "$secs" >/dev/null 2>&1 &
		spid=$!
	fi
	out=$("$fe" --queues $nq bench "$sock" --rw $rw --bs 4096 --iodepth $qd --numjobs $nq \
		--threads "$mode" --runtime "$secs" --json 2>"$tmp/fe.log") || rc=$?
	t1=$(ticks "$bpid")
	[ -z "$ppid" ] || wait "$ppid" "$spid" || true
	kill "$bpid"
	wait "$bpid" 2>/dev/null || st=$?
	bpid=
	rm -f "$wimg_empty" "$wimg_ov"
	[ $st = 0 ] || echo "mq.sh: $kind exited with status $st after SIGTERM ($cell)" >&2
	# vqcowd's exit line counts requests served on the queue threads (fast path hits)
	# and those handed to the image's owner thread (hops)
	grep -ho '[0-9]* compressed clusters inflated, [0-9]* reads from them\(, [0-9]* compressed reads (owner [0-9]*), [0-9]* joined one in flight (owner [0-9]*)\)\?\|fast path: [0-9]* hits, [0-9]* hops\|thread [0-9]*: waited for a CPU.*\|--io-threads-contended [0-9]*: .*' \
		"$tmp/log" | sed "s/^/mq.sh: $cell $kind $mode: /" >&2 || true
	if [ $rc != 0 ]; then
		echo "mq.sh: vqcow-fe failed (exit $rc) on $cell $kind $mode, run left out:" >&2
		cat "$tmp/fe.log" "$tmp/log" >&2
		return 0
	fi
	# REP CELL KIND MODE IOPS CPU-US/IO LOAD-BEFORE LOAD-AFTER LAT-MEAN LAT-P99 fe=CLIENT-CPU-US/IO
	echo "$out" | python3 -c '
import json, sys
j = json.load(sys.stdin)
d = j["total"]
kind, cell, dt, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
print("%s %s %s %s %.0f %.2f %s %s %.1f %.1f fe=%.2f" % (sys.argv[7], cell, kind, sys.argv[8],
      d["iops"], dt / hz * 1e6 / max(d["ios"], 1), sys.argv[5], sys.argv[6],
      d["lat_us"]["mean"], d["lat_us"]["p99"], j.get("fe_cpu_s", 0) * 1e6 / max(d["ios"], 1)))' \
		"$kind" "$cell" $((t1 - t0)) "$(getconf CLK_TCK)" "$lb" "$(load1)" "$REP" "$mode" |
		tee -a "$tmp/results"
}

kinds="vqcowd-1 vqcowd-2 qsd-7.2"
[ -n "$qsd10" ] && kinds="$kinds qsd-10"
kinds=${KINDS:-$kinds}
for k in $kinds; do
	case $k in
	vqcowd-1 | vqcowd-2 | alt-1 | alt-2 | qsd-7.2) ;;
	qsd-10)
		[ -n "$qsd10" ] && continue
		echo "mq.sh: qemu-storage-daemon 10.0 cannot be had (qsd10.sh, QSD10): qsd-10 left out" >&2
		kinds=$(echo " $kinds " | sed 's/ qsd-10 / /')
		;;
	*) echo "mq.sh: unknown kind '$k' in KINDS (vqcowd-1 vqcowd-2 qsd-7.2 qsd-10 alt-1 alt-2)" >&2; exit 2 ;;
	esac
done
cells=${CELLS:-"read-full read-zlib read-prealloc seqread-zlib write-empty write-overlay"}
touch "$tmp/results"
for REP in $(seq "$reps"); do
	# the client modes' order flips every repetition
	modes=$fe_modes
	[ $((REP % 2)) = 1 ] || modes=$(echo $fe_modes | tr ' ' '\n' | tac | tr '\n' ' ')
	# The 1-queue reference of the compressed cell (one job, QD32; with one
	# queue both client modes are the same single thread).
	case " $cells " in *" read-zlib "*) run vqcowd-1 read-zlib-1q "${fe_modes%% *}" ;; esac
	# KINDS_FLIP=1: the kinds' order flips every repetition too
	ks=$kinds
	[ "${KINDS_FLIP:-0}" != 1 ] || [ $((REP % 2)) = 1 ] || ks=$(echo "$kinds" | tr ' ' '\n' | tac | tr '\n' ' ')
	for cell in $cells; do
		for kind in $ks; do
			for mode in $modes; do run "$kind" "$cell" "$mode"; done
		done
	done
done
for mode in $fe_modes; do
	[ "$fe_modes" = "$mode" ] || printf '\n### client: vqcow-fe bench --threads %s\n' "$mode"
	python3 "$repo/contrib/bench/mqtable.py" "$tmp/results" "$kinds" "$mode"
done
if [ "$fe_modes" != "${fe_modes%% *}" ]; then
	printf '\n### client modes compared (per-queue / one, per repetition)\n\n'
	python3 "$repo/contrib/bench/mqtable.py" --modes "$tmp/results" "$kinds"
fi
echo "mq.sh: load after: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ $guest = 1 ]; then
	echo
	BENCH_DIR=$dir bash "$repo/contrib/bench/guest-mq.sh" --reps "$greps" --runtime "$gsecs"
fi
