#!/bin/bash
# SPDX-License-Identifier: MIT
#
# Where does a full qcow2 image's 4K random write go? Separates the image
# file's own layout from the daemons' cost (issue 12):
#
#   bash contrib/bench/layout.sh [--dir DIR] [--size 4G] [--reps 3] [--runtime 5]
#
# 1. Extents: `filefrag` of a fio-written raw file, of the `qemu-img convert`
#    qcow2 (run.sh's qcow2-full), of images preallocated by vqcow-img and
#    qemu-img (preallocation=falloc), and of empty qcow2 images grown by a
#    4K random write run through vqcowd and through qemu-storage-daemon: total
#    extents and how many are unwritten.
# 2. Cells, each round in a rotated order, REPS rounds (4K random write, QD32):
#      fio-raw        host fio on the raw file, over the range below
#      fio-qcow2      host fio on the qcow2 file itself, over the longest run of
#                     data clusters that is contiguous in the file (no
#                     metadata in it, so the image stays valid): the file's
#                     layout without any daemon
#      fio-falloc     host fio on a freshly fallocated raw file (unwritten
#                     extents, recreated every round), same range
#      vqcowd-raw     vqcowd + vqcow-fe bench on the raw file (whole image)
#      vqcowd-qcow2   vqcowd on the qcow2 (whole image)
#      qsd-qcow2      qemu-storage-daemon ($QSD, io_uring, cache.direct,
#                     an iothread) on the qcow2
#    For the daemons, the share of writes io_uring handed to its io-wq
#    workers (the file system could not take them without blocking) is
#    counted with perf's io_uring tracepoints, when readable.
#    Every figure is also given as a ratio to fio-raw of the same round; the
#    median and the range over rounds are printed.
# Needs fio, qemu-img, filefrag, python3, a built vqcowd and vqcow-fe (BUILD,
# default build/). Images go to --dir (default build/bench-images, the files
# layout-*.img/qcow2, ~4 x SIZE, kept for the next run), never on tmpfs. Nothing
# is deleted: on a VM disk mounted with `discard` (as here), freeing gigabytes
# issues discards that can take minutes and stall everything else.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${BUILD:-$repo/build}
dir=$build/bench-images size=4G reps=3 runtime=5
. "$here/bench-lib.sh"
usage() { sed -n 4,30p "$0"; }
bench_opts usage --dir=dir --size=size --reps=reps --runtime=runtime -- "$@"
vqcowd=${VQCOWD:-$build/src/vqcowd}
fe=${VQCOW_FE:-$build/tests/frontend/vqcow-fe}
img=${VQCOW_IMG:-$build/src/vqcow-img}
qsd=${QSD:-qemu-storage-daemon}
. "$here/qsd-start.sh"
for t in fio qemu-img filefrag python3 "$vqcowd" "$fe" "$img" "$qsd"; do
	command -v "$t" >/dev/null || { echo "layout.sh: $t not found" >&2; exit 77; }
done
mkdir -p "$dir"
[ "$(stat -f -c %T "$dir")" != tmpfs ] || { echo "layout.sh: $dir is on tmpfs" >&2; exit 2; }
bytes=$(numfmt --from=iec "$size")
raw=$dir/layout-raw.img full=$dir/layout-full.qcow2 fal=$dir/layout-falloc.img
tmp=$(mktemp -d)
bpid=
cleanup() { [ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
tp=0 # io_uring's hand-offs to its io-wq workers, counted when perf can
[ "$(perf list 2>/dev/null | grep -c io_uring:io_uring_queue_async_work || true)" = 0 ] || tp=1
fejob="--rw randwrite --bs 4k --iodepth 32 --runtime $runtime"

extents() { # FILE: "N extents, U unwritten"
	sync "$1"
	filefrag -v "$1" | awk '/^ *[0-9]+:/ {n++; if (/unwritten/) u++}
		END {printf "%d extents, %d unwritten", n, u}'
}

# daemon NAME FILE FMT: start a backend, run the frontend job, print IOPS
daemon() {
	local kind=$1 f=$2 fmt=$3 sock=$tmp/sock
	rm -f "$sock"
	if [ "$kind" = vqcowd ]; then
		"$vqcowd" --socket-path "$sock" --blk-file "$f" --format "$fmt" >"$tmp/d.log" 2>&1 &
	else
		bench_qsd_start "$qsd" "$f" "$fmt" "$sock" "$tmp/d.log"
	fi
	bpid=$!
	bench_wait_sock "$sock" "$kind" "$tmp/d.log" 100
	local sp=
	if [ $tp = 1 ]; then
		perf stat -x, -e io_uring:io_uring_queue_async_work,io_uring:io_uring_submit_req \
			-p "$bpid" -o "$tmp/stat" -- sleep "$runtime" 2>/dev/null &
		sp=$!
	fi
	# shellcheck disable=SC2086
	"$fe" bench "$sock" $fejob --json >"$tmp/fe.json"
	[ -z "$sp" ] || wait "$sp" || true
	python3 -c '
import json, os, sys
iops = round(json.load(open(sys.argv[1]))["total"]["iops"])
c = {}
if os.path.exists(sys.argv[2]):
    for l in open(sys.argv[2]):
        p = l.strip().split(",")
        if len(p) > 2 and p[0].replace(".", "").isdigit():
            c[p[2]] = float(p[0])
sub = c.get("io_uring:io_uring_submit_req", 0)
print(iops, "%.0f%%" % (100 * c.get("io_uring:io_uring_queue_async_work", 0) / sub) if sub else "n/a")' \
		"$tmp/fe.json" "$tmp/stat"
	rm -f "$tmp/stat"
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
}

# hostfio FILE OFFSET LEN: host fio, same job shape, print IOPS
hostfio() {
	fio --name=l --filename="$1" --offset="$2" --size="$3" --ioengine=io_uring --direct=1 \
		--rw=randwrite --bs=4k --iodepth=32 --runtime="$runtime" --time_based \
		--norandommap --randrepeat=0 --output-format=json |
		python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))'
}

# ---- images
if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" != "$bytes" ]; then
	echo "preparing $raw (fio fill)" >&2
	rm -f "$raw" "$full"
	fio --name=fill --filename="$raw" --size="$bytes" --rw=write --bs=1M --iodepth=8 \
		--ioengine=io_uring --direct=1 --output=/dev/null >/dev/null
fi
if [ ! -f "$full" ]; then
	echo "preparing $full (qemu-img convert)" >&2
	qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$raw" "$full"
fi
sync "$raw" "$full"
# the longest run of data clusters contiguous in the qcow2 file
read -r roff rlen < <(qemu-img map --output=json "$full" | python3 -c '
import json, sys
best = (0, 0)
for e in json.load(sys.stdin):
    if e.get("data") and "offset" in e and e["length"] > best[1]:
        best = (e["offset"], e["length"])
print(*best)')
[ "$rlen" -gt 0 ] || { echo "layout.sh: no data in $full" >&2; exit 1; }
echo "host fio range: $rlen bytes at 0x$(printf %x "$roff") of the qcow2 file (and of the raw files)"

echo
echo "## Extents (filefrag -v after sync)"
echo "| file | extents |"
echo "|---|---|"
echo "| raw, written by fio (1M sequential O_DIRECT) | $(extents "$raw") |"
echo "| qcow2 from \`qemu-img convert\` of it | $(extents "$full") |"
for t in vqcow-img qemu-img; do
	f=$dir/layout-prealloc-$t.qcow2
	if [ ! -f "$f" ]; then
		if [ $t = vqcow-img ]; then
			"$img" create -f qcow2 -o preallocation=falloc "$f" "$size" >/dev/null
		else
			qemu-img create -q -f qcow2 -o preallocation=falloc "$f" "$size"
		fi
	fi
	echo "| $t create preallocation=falloc | $(extents "$f") |"
done
for k in vqcowd qsd; do
	f=$dir/layout-grown-$k.qcow2 # kept: see the note on deleting above
	qemu-img create -q -f qcow2 -o cluster_size=65536 "$f" "$size"
	read -r iops share < <(daemon $k "$f" qcow2)
	echo "| empty qcow2 after ${runtime} s of 4K random writes QD32 through $k ($iops IOPS, $share of writes punted to io-wq) | $(extents "$f") |"
done

# ---- cells
cells=(fio-raw fio-qcow2 fio-falloc vqcowd-raw vqcowd-qcow2 qsd-qcow2)
res=$tmp/res
: >"$res"
for r in $(seq "$reps"); do
	n=${#cells[@]}
	for ((i = 0; i < n; i++)); do
		c=${cells[$(((i + r - 1) % n))]}
		case $c in
		fio-raw) v=$(hostfio "$raw" "$roff" "$rlen") ;;
		fio-qcow2) v=$(hostfio "$full" "$roff" "$rlen") ;;
		fio-falloc)
			# back to unwritten extents without freeing blocks: deleting
			# or punching issues discards, which can take minutes on a VM disk
			[ -f "$fal" ] || fallocate -l "$bytes" "$fal"
			fallocate -z -l "$bytes" "$fal"
			v=$(hostfio "$fal" "$roff" "$rlen")
			;;
		vqcowd-raw) v=$(daemon vqcowd "$raw" raw) ;;
		vqcowd-qcow2) v=$(daemon vqcowd "$full" qcow2) ;;
		qsd-qcow2) v=$(daemon qsd "$full" qcow2) ;;
		esac
		echo "round $r $c $v (IOPS, share of writes punted to io-wq)" >&2
		echo "$r $c ${v%% *}" >>"$res"
	done
done
qemu-img check -q "$full" || echo "WARNING: $full does not check clean" >&2
echo
echo "## 4K random write QD32, $runtime s per cell, $reps rounds (load before the last: $(cut -d' ' -f1-3 /proc/loadavg))"
python3 - "$res" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for r, c, v in rows:
    by.setdefault(c, {})[r] = float(v)
print("| cell | IOPS median (range) | / fio-raw, median (range) |")
print("|---|---:|---:|")
for c in by:
    v = list(by[c].values())
    q = [by[c][r] / by["fio-raw"][r] for r in by[c] if r in by["fio-raw"]]
    print("| %s | %.0f (%.0f-%.0f) | %.2f (%.2f-%.2f) |" % (c, statistics.median(v), min(v), max(v),
          statistics.median(q), min(q), max(q)))
EOF
