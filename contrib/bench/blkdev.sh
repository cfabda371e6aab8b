#!/bin/bash
# SPDX-License-Identifier: MIT
#
# A qcow2 on a block device: what a new cluster's link costs where no
# cluster is fresh space (qcow2_alloc.fresh is never true on a device, so
# every link of a new cluster waits for a P1 fdatasync that covers its data
# and fill: 607b40c). A loop device with direct I/O over a file in --dir
# stands in for the device. Two vqcowd binaries (--base OLD, --new, default
# build/), alternated round by round; per run a fresh `qemu-img create` on
# the device, then one cell:
#   reuse  the image written whole (1 MiB sequential writes), half of it
#          discarded through the daemon and flushed (its clusters go on the
#          daemon's free list), then 4K random writes at QD32 over that half
#          (--number-ios writes: about 2 per freed cluster, most allocate)
#   grow   4K random writes at QD32 over the whole empty image (every new
#          cluster comes from the reserve: on a device, not fresh either)
# Prints per run: write IOPS, p50/p99 latency (us), write-back fdatasyncs per
# guest write during the job (query-blockstats), the daemon's CPU per write
# (us); then the per-round ratios new/base and their median per cell.
# Needs root (losetup); skips (exit 77) when no loop device can be set up.
# --base-opts/--new-opts: extra vqcowd options for either side (one word
# list each), e.g. the same binary both ways with --new-opts
# --blockdev-zero-ahead.
#
#   contrib/bench/blkdev.sh --base OLD_VQCOWD [--new NEW_VQCOWD] [--reps 4]
#       [--size 1G] [--number-ios 32768] [--cells reuse,grow] [--dir DIR]
#       [--base-opts "OPTS"] [--new-opts "OPTS"]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
new=$root/build/src/vqcowd
fe=$root/build/tests/frontend/vqcow-fe
ctl=$root/build/src/vqcowctl
base=
reps=4 size=1G nios=32768 cells=reuse,grow dir=${BENCH_DIR:-/tmp}
base_opts='' new_opts=''
. "$here/bench-lib.sh"
usage() { echo "usage: see the header of $0"; }
bench_opts usage --base=base --new=new --reps=reps --size=size --number-ios=nios \
	--cells=cells --dir=dir --base-opts=base_opts --new-opts=new_opts -- "$@"
[ -n "$base" ] || { echo "$0: --base OLD_VQCOWD is required" >&2; exit 2; }
for t in qemu-img python3 losetup numfmt "$new" "$base" "$fe" "$ctl"; do
	command -v "$t" >/dev/null || { echo "$0: $t not found" >&2; exit 1; }
done
bytes=$(numfmt --from=iec "$size")
tmp=$(mktemp -d "$dir/blkdevb.XXXXXX")
dev= bpid=
cleanup() {
	[ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true
	[ -z "$dev" ] || losetup -d "$dev" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
# the device: the image plus room for its metadata and the daemon's reserve
truncate -s $((bytes + bytes / 8 + (64 << 20))) "$tmp/backing"
if ! dev=$(losetup --direct-io=on -f --show "$tmp/backing" 2>"$tmp/losetup.err"); then
	dev=
	echo "$0: no loop device ($(cat "$tmp/losetup.err")): skipped" >&2
	exit 77
fi
res=$tmp/results
: >"$res"

one() { # KIND BIN CELL REP
	local kind=$1 bin=$2 cell=$3 rep=$4 sock=$tmp/sock span=$bytes out t0 t1 xo
	if [ "$kind" = base ]; then xo=$base_opts; else xo=$new_opts; fi
	rm -f "$sock" "$tmp/qmp"
	qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" "$size"
	# shellcheck disable=SC2086 # $xo: a word list
	"$bin" --socket-path "$sock" --blk-file "$dev" --format qcow2 --qmp "$tmp/qmp" $xo \
		>"$tmp/d.log" 2>&1 &
	bpid=$!
	bench_wait_sock "$sock" "$kind" "$tmp/d.log"
	if [ "$cell" = reuse ]; then
		"$fe" bench "$sock" --rw write --bs 1M --iodepth 8 --size "$bytes" \
			--number-ios $((bytes >> 20)) >/dev/null
		"$fe" flush "$sock"
		span=$((bytes / 2))
		for ((o = 0; o < span; o += 16 << 20)); do "$fe" discard "$sock" "$o" $((16 << 20)); done
		# the removals durable, the grace period over: the clusters are free
		"$fe" flush "$sock"
		"$fe" flush "$sock"
		sleep 0.3
		"$fe" flush "$sock"
	fi
	bench_qstats "$ctl" "$tmp/qmp" writeback-syncs >"$tmp/qs0"
	t0=$(bench_ticks "$bpid")
	out=$("$fe" bench "$sock" --rw randwrite --bs 4K --iodepth 32 --size "$span" \
		--number-ios "$nios" --json)
	t1=$(bench_ticks "$bpid")
	bench_qstats "$ctl" "$tmp/qmp" writeback-syncs >"$tmp/qs1"
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
	echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
w = d["write"]
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
ios = w["ios"] or 1
print(sys.argv[3], sys.argv[4], sys.argv[5], "%.0f" % w["iops"], "%.0f" % w["lat_us"]["p50"],
      "%.0f" % w["lat_us"]["p99"],
      "%.4f" % ((b.get("writeback-syncs", 0) - a.get("writeback-syncs", 0)) / ios),
      "%.1f" % ((int(sys.argv[6]) - int(sys.argv[7])) * 1e6 / int(sys.argv[8]) / ios))
' "$tmp/qs0" "$tmp/qs1" "$kind" "$cell" "$rep" "$t1" "$t0" "$(getconf CLK_TCK)" >>"$res"
	tail -1 "$res"
}

echo "# $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg); device $dev ($size image, direct I/O)"
echo "# base: $base $base_opts; new: $new $new_opts"
echo "kind cell rep write_iops p50_us p99_us syncs_per_write cpu_us_per_write"
IFS=, read -r -a cl <<<"$cells"
for r in $(seq "$reps"); do
	for c in "${cl[@]}"; do
		bench_alternate "$r" one "$base" "$new" "$c" "$r"
		echo "# $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
	done
done
python3 - "$res" <<'EOF'
import sys, statistics
by = {}
for r in (l.split() for l in open(sys.argv[1])):
    by.setdefault((r[1], r[2]), {})[r[0]] = r
print("\nper round, new/base: write IOPS, p50, p99, syncs per write, CPU per write")
for cell in sorted({k[0] for k in by}):
    rat = []
    for (c, rep), d in sorted(by.items()):
        if c != cell or "new" not in d or "base" not in d:
            continue
        n, b = d["new"], d["base"]
        f = lambda i: float(n[i]) / float(b[i]) if float(b[i]) else float("nan")
        rat.append((f(3), f(4), f(5), f(6), f(7)))
        print("%s rep %s: %.2fx %.2fx %.2fx %.2fx %.2fx" % ((cell, rep) + rat[-1]))
    if rat:
        med = [statistics.median(x[i] for x in rat) for i in range(5)]
        print("%s median: %.2fx %.2fx %.2fx %.2fx %.2fx" % ((cell,) + tuple(med)))
EOF
