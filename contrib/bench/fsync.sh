#!/bin/bash
# SPDX-License-Identifier: MIT
#
# Allocating writes with periodic FLUSHes under slow fdatasyncs: what a
# guest write waits for when the write-back's syncs are slow (the tail,
# qcow2/writeback.c). Each round runs every binary once, alternated, on a
# fresh qcow2 (64 KiB clusters), vqcowd started with
# VQCOWD_TEST_SYNC_DELAY=MS (every write-back fdatasync held back MS ms),
# and `vqcow-fe bench --rw randwrite --flush-every N`. Prints per round and
# binary: write IOPS, write p50/p99/max latency, FLUSH p99/max, write-back
# fdatasyncs per guest write, link waits' summed and largest sync chain
# (query-blockstats), the daemon's CPU per write (user + system), FLUSH
# p50, write-back batches, side batches and fdatasyncs per FLUSH, then the
# per-round ratios new/base.
#
#   contrib/bench/fsync.sh --base OLD_VQCOWD [--new NEW_VQCOWD] [--reps 3]
#       [--runtime 5] [--delay 20] [--iodepth 1,32] [--flush-every 64]
#       [--size 4G] [--dir DIR]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
new=$root/build/src/vqcowd
fe=$root/build/tests/frontend/vqcow-fe
ctl=$root/build/src/vqcowctl
base=
reps=3 runtime=5 delay=20 depths=1,32 every=64 size=4G dir=${BENCH_DIR:-/tmp}
. "$here/bench-lib.sh"
usage() { echo "usage: see the header of $0"; }
bench_opts usage --base=base --new=new --reps=reps --runtime=runtime --delay=delay \
	--iodepth=depths --flush-every=every --size=size --dir=dir -- "$@"
[ -n "$base" ] || { echo "$0: --base OLD_VQCOWD is required" >&2; exit 2; }
for t in qemu-img python3 "$new" "$base" "$fe" "$ctl"; do
	command -v "$t" >/dev/null || { echo "$0: $t not found" >&2; exit 1; }
done
tmp=$(mktemp -d "$dir/fsyncb.XXXXXX")
bpid=
cleanup() {
	[ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
res=$tmp/results
: >"$res"

one() { # KIND BIN DEPTH REP
	local kind=$1 bin=$2 qd=$3 rep=$4 f=$tmp/img.qcow2 sock=$tmp/sock out
	rm -f "$f" "$sock" "$tmp/qmp"
	qemu-img create -q -f qcow2 -o cluster_size=65536 "$f" "$size"
	VQCOWD_TEST_SYNC_DELAY=$delay "$bin" --socket-path "$sock" --blk-file "$f" \
		--format qcow2 --qmp "$tmp/qmp" >"$tmp/d.log" 2>&1 &
	bpid=$!
	bench_wait_sock "$sock" "$kind" "$tmp/d.log"
	t0=$(bench_ticks "$bpid")
	out=$("$fe" bench "$sock" --rw randwrite --bs 4K --iodepth "$qd" --runtime "$runtime" \
		--flush-every "$every" --json)
	t1=$(bench_ticks "$bpid")
	bench_qstats "$ctl" "$tmp/qmp" writeback-syncs >"$tmp/qstats"
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
	echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)
w, fl = d["write"], d.get("flush", {"lat_us": {"p99": 0, "max": 0}, "ios": 0})
q = json.load(open(sys.argv[1]))
ios = w["ios"] or 1
print(sys.argv[2], sys.argv[3], sys.argv[4], "%.0f" % w["iops"], "%.1f" % w["lat_us"]["p50"],
      "%.1f" % w["lat_us"]["p99"], "%.1f" % w["lat_us"]["max"], "%.1f" % fl["lat_us"]["p99"],
      "%.1f" % fl["lat_us"]["max"], fl["ios"], "%.4f" % (q.get("writeback-syncs", 0) / ios),
      q.get("link-waits", 0), q.get("link-wait-syncs", 0), q.get("link-wait-syncs-max", 0),
      "%.1f" % ((int(sys.argv[5]) - int(sys.argv[6])) * 1e6 / int(sys.argv[7]) / ios),
      "%.1f" % fl["lat_us"].get("p50", 0),
      "%.2f" % (q.get("writeback-batches", 0) / (fl["ios"] or 1)),
      "%.2f" % (q.get("writeback-side-batches", 0) / (fl["ios"] or 1)),
      "%.2f" % (q.get("writeback-syncs", 0) / (fl["ios"] or 1)))
' "$tmp/qstats" "$kind" "$qd" "$rep" "$t1" "$t0" "$(getconf CLK_TCK)" >>"$res"
	tail -1 "$res"
}

echo "kind qd rep write_iops p50_us p99_us max_us flush_p99_us flush_max_us flushes syncs_per_write link_waits link_wait_syncs link_wait_max cpu_us_per_write flush_p50_us batches_per_flush side_batches_per_flush syncs_per_flush"
IFS=, read -r -a qds <<<"$depths"
for r in $(seq "$reps"); do
	for qd in "${qds[@]}"; do
		bench_alternate "$r" one "$base" "$new" "$qd" "$r"
	done
done
python3 - "$res" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r[1], r[2]), {})[r[0]] = r
print("\nper round, new/base: write IOPS, p99, max, FLUSH p99, syncs per write, CPU per write")
for qd in sorted({k[0] for k in by}, key=int):
    rat = []
    for (q, rep), d in sorted(by.items()):
        if q != qd or "new" not in d or "base" not in d:
            continue
        n, b = d["new"], d["base"]
        f = lambda i: float(n[i]) / float(b[i]) if float(b[i]) else float("nan")
        rat.append((f(3), f(5), f(6), f(7), f(10), f(14)))
        print("qd%s rep %s: %.2fx %.2fx %.2fx %.2fx %.2fx %.2fx" % ((qd, rep) + rat[-1]))
    if rat:
        med = [statistics.median(x[i] for x in rat) for i in range(6)]
        print("qd%s median: %.2fx %.2fx %.2fx %.2fx %.2fx %.2fx" % ((qd,) + tuple(med)))
EOF
