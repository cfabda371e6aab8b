#!/bin/bash
# SPDX-License-Identifier: MIT
#
# Multi-queue cells (issue 12): 2 queues x QD32 4K jobs from one vqcow-fe
# (two queues driven from one host thread), against vqcowd --io-threads 1
# and 2, qemu-storage-daemon 10.0 and the system's 7.2 (both in their best
# configuration: aio=io_uring, cache.direct=on, an iothread, num-queues=2),
# alternating backend by backend within each repetition, so the ratios
# compare runs made minutes apart at most on a noisy machine.
#
#   bash contrib/bench/mq.sh [REPS] [SECONDS]      (defaults 3 and 5)
#
# Cells: read-zlib-1q is the compressed image with one queue (vqcowd
# single-threaded: the reference for the 2-queue scaling); then randread of a full qcow2 (random data), of a zlib-compressed qcow2,
# of a preallocation=metadata qcow2; randwrite into an empty qcow2 and into
# an overlay over the full image (fresh copies for every run). Images are
# 1 GiB under $BENCH_DIR (default build/bench-mq). Prints one line per run
# and a median table (IOPS, and the backend's CPU time per I/O from
# /proc/PID/stat). QSD10=PATH names qemu-storage-daemon 10 (default: what
# contrib/bench/qsd10.sh prints, fetched if needed); 10.0 is skipped when it
# cannot be had. CELLS="..." and KINDS="..." run a subset.
set -euo pipefail
reps=${1:-3}
secs=${2:-5}
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD:-$repo/build}
vqcowd=${VQCOWD:-$build/src/vqcowd}
fe=${VQCOW_FE:-$build/tests/frontend/vqcow-fe}
dir=${BENCH_DIR:-$build/bench-mq}
qsd10=${QSD10:-$(bash "$repo/contrib/bench/qsd10.sh" 2>/dev/null || true)}
mkdir -p "$dir"
tmp=$(mktemp -d)
sock=$tmp/sock
bpid=
cleanup() { [ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
size=1G

# -- images (made once) --
if [ ! -f "$dir/full.qcow2" ]; then
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

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

start() { # KIND IMAGE
	local kind=$1 img=$2 q
	rm -f "$sock"
	case $kind in
	vqcowd-1 | vqcowd-2)
		"$vqcowd" --socket-path "$sock" --blk-file "$img" --format qcow2 --num-queues 2 \
			--io-threads "${kind#vqcowd-}" >"$tmp/log" 2>&1 &
		;;
	qsd-7.2 | qsd-10)
		q=qemu-storage-daemon
		[ "$kind" = qsd-10 ] && q=$qsd10
		"$q" --object iothread,id=iot0 \
			--blockdev "driver=file,node-name=f,filename=$img,cache.direct=on,aio=io_uring" \
			--blockdev "driver=qcow2,node-name=d,file=f" \
			--export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=2,iothread=iot0" \
			>"$tmp/log" 2>&1 &
		;;
	esac
	bpid=$!
	for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
	[ -S "$sock" ] || { echo "$kind did not start:" >&2; cat "$tmp/log" >&2; exit 1; }
}

run() { # KIND CELL
	local kind=$1 cell=$2 img rw t0 t1 out nq=2
	case $cell in
	read-zlib-1q) img=$dir/zlib.qcow2 rw=randread nq=1 ;;
	read-full) img=$dir/full.qcow2 rw=randread ;;
	read-zlib) img=$dir/zlib.qcow2 rw=randread ;;
	read-prealloc) img=$dir/prealloc.qcow2 rw=randread ;;
	write-empty)
		img=$tmp/empty.qcow2 rw=randwrite
		qemu-img create -q -f qcow2 "$img" $size
		;;
	write-overlay)
		img=$tmp/ov.qcow2 rw=randwrite
		qemu-img create -q -f qcow2 -b "$dir/full.qcow2" -F qcow2 "$img"
		;;
	esac
	start "$kind" "$img"
	t0=$(ticks "$bpid")
	out=$("$fe" --queues $nq bench "$sock" --rw $rw --bs 4096 --iodepth 32 --numjobs $nq \
		--runtime "$secs" --json)
	t1=$(ticks "$bpid")
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
	echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)["total"]
kind, cell, dt, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
print("%s %s %.0f %.2f" % (cell, kind, d["iops"], dt / hz * 1e6 / max(d["ios"], 1)))' \
		"$kind" "$cell" $((t1 - t0)) "$(getconf CLK_TCK)" | tee -a "$tmp/results"
}

kinds="vqcowd-1 vqcowd-2 qsd-7.2"
[ -n "$qsd10" ] && kinds="$kinds qsd-10"
kinds=${KINDS:-$kinds}
cells=${CELLS:-"read-full read-zlib read-prealloc write-empty write-overlay"}
for _ in $(seq "$reps"); do
	# The 1-queue reference of the compressed cell (one job, QD32).
	run vqcowd-1 read-zlib-1q
	for cell in $cells; do
		for kind in $kinds; do run "$kind" "$cell"; done
	done
done
python3 - "$tmp/results" "$kinds" <<'EOF'
import sys, statistics, collections
res = collections.defaultdict(list)
for line in open(sys.argv[1]):
    cell, kind, iops, cpu = line.split()
    res[(cell, kind)].append((float(iops), float(cpu)))
kinds = sys.argv[2].split()
cells = []
for cell, _ in res:
    if cell not in cells:
        cells.append(cell)
def med(cell, kind, i):
    v = res.get((cell, kind))
    return statistics.median(x[i] for x in v) if v else float("nan")
print()
print("| cell (2 queues, QD32 each, 4K) | " + " | ".join(kinds) +
      " | vqcowd-2 / vqcowd-1 | vqcowd-2 / qsd-10 |")
print("|---" * (len(kinds) + 3) + "|")
for c in cells:
    row = ["%.0f (%.1f us)" % (med(c, k, 0), med(c, k, 1)) for k in kinds]
    r1 = med(c, "vqcowd-2", 0) / med(c, "vqcowd-1", 0)
    r2 = med(c, "vqcowd-2", 0) / med(c, "qsd-10", 0) if "qsd-10" in kinds else float("nan")
    print("| %s | %s | %.2fx | %.2fx |" % (c, " | ".join(row), r1, r2))
print()
print("IOPS median of the repetitions (backend CPU time per I/O).")
EOF
