#!/bin/bash
# SPDX-License-Identifier: MIT
#
# How the cost grows with the image (issue 12): 4K random reads across the
# whole of a 1 TiB and a 15 TiB preallocation=metadata qcow2 (64 KiB clusters,
# every L2 entry points at a hole), vqcowd against qemu-storage-daemon, both
# with their default metadata caches, side by side:
#
#   bash contrib/bench/scale.sh [--dir DIR] [--sizes 1T,15T] [--reps 3] [--runtime 10]
#                               [--jobs qd32,qd1] [--keep]
#
# Each round runs, per size and job, vqcowd and qsd back to back, the order
# alternating between rounds (VQCOWD_ALT=BINARY adds a third kind, "alt": an
# A/B of two vqcowd builds in the same rounds, with VQCOWD_ALT_ARGS, and the
# table its IOPS, CPU and the per-round ratio vqcowd/alt); for each run it prints IOPS, the daemon's CPU
# time per I/O (utime+stime of all its threads over the frontend's I/Os) and
# its peak RSS (VmHWM at the end of the run, after a fresh start). Then the
# medians, and the per-round ratio vqcowd/qsd as median (range). Every run's
# line and the table give the host's 1-minute load average before and after
# the run, so a reader can judge the noise.
# qsd is $QSD (default 10.0 from qsd10.sh, else the system's) with io_uring, cache.direct and an
# iothread, and no cache options: its defaults (l2-cache-size 32 MiB on Linux,
# enough for 256 GiB). vqcowd runs with its defaults (L2 cache up to 256 MiB,
# enough for 2 TiB; beyond that slices are loaded on demand).
# Why 15 TiB and not 16: a preallocation=metadata image's file is as large as
# its virtual size plus its metadata, and ext4 (4 KiB blocks) caps a file at
# 16 TiB: `qemu-img create ... 16T` fails with "File too large" there.
# A 15 TiB image holds 1.9 GiB of L2 tables and 480 MiB of refcount blocks:
# the script checks free space first and, unless --keep, deletes the images
# it created at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${BUILD:-$repo/build}
dir=$build/bench-images sizes=1T,15T reps=3 runtime=10 jobs=qd32,qd1 keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--dir) dir=$2; shift 2 ;;
	--sizes) sizes=$2; shift 2 ;;
	--reps) reps=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--jobs) jobs=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	-h | --help) sed -n '4,/^set /{/^#/p}' "$0"; exit 0 ;;
	*) sed -n '4,/^set /{/^#/p}' "$0" >&2; exit 2 ;;
	esac
done
vqcowd=${VQCOWD:-$build/src/vqcowd}
fe=${VQCOW_FE:-$build/tests/frontend/vqcow-fe}
qsd=${QSD:-$(bash "$here/qsd10.sh" 2>/dev/null || echo qemu-storage-daemon)}
. "$repo/contrib/bench/need-build.sh"
. "$repo/contrib/bench/qsd-start.sh"
bench_need_build "$repo" "$build" vqcowd vqcow-fe
for t in qemu-img python3 "$vqcowd" "$fe" "$qsd"; do
	command -v "$t" >/dev/null || { echo "scale.sh: $t not found" >&2; exit 77; }
done
mkdir -p "$dir"
tmp=$(mktemp -d)
bpid=
made=()
cleanup() {
	[ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true
	rm -rf "$tmp"
	[ $keep = 1 ] || [ ${#made[@]} = 0 ] || rm -f "${made[@]}"
}
trap cleanup EXIT
hz=$(getconf CLK_TCK)

for s in ${sizes//,/ }; do
	f=$dir/scale-$s-metadata.qcow2
	[ -f "$f" ] && continue
	need=$(($(numfmt --from=iec "$s") / 65536 * 10 + (3 << 20)))
	avail=$(($(stat -f -c '%a * %S' "$dir")))
	[ "$avail" -gt $((need * 11 / 10)) ] ||
		{ echo "scale.sh: $s needs ~$((need >> 20)) MiB in $dir, $((avail >> 20)) MiB free" >&2; exit 1; }
	echo "creating $f (preallocation=metadata, ~$((need >> 20)) MiB of metadata)" >&2
	made+=("$f")
	qemu-img create -q -f qcow2 -o cluster_size=65536,preallocation=metadata "$f" "$s"
	sync "$f"
done

# run KIND FILE QD: one fresh backend, one frontend job; prints "iops cpu_us rss_kib"
run() {
	local kind=$1 f=$2 qd=$3 sock=$tmp/sock t0 t1 out rss
	rm -f "$sock"
	if [ "$kind" = vqcowd ]; then
		"$vqcowd" --socket-path "$sock" --blk-file "$f" --format qcow2 >"$tmp/d.log" 2>&1 &
	elif [ "$kind" = alt ]; then
		# shellcheck disable=SC2086
		"$VQCOWD_ALT" --socket-path "$sock" --blk-file "$f" --format qcow2 ${VQCOWD_ALT_ARGS:-} \
			>"$tmp/d.log" 2>&1 &
	else
		bench_qsd_start "$qsd" "$f" qcow2 "$sock" "$tmp/d.log"
	fi
	bpid=$!
	for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
	[ -S "$sock" ] || { echo "$kind did not start:" >&2; cat "$tmp/d.log" >&2; exit 1; }
	t0=$(awk '{print $14 + $15}' "/proc/$bpid/stat")
	out=$("$fe" bench "$sock" --rw randread --bs 4k --iodepth "$qd" --runtime "$runtime" --json)
	t1=$(awk '{print $14 + $15}' "/proc/$bpid/stat")
	rss=$(awk '/^VmHWM/ {print $2}' "/proc/$bpid/status")
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
	echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)["total"]
print(round(d["iops"]), round(int(sys.argv[1]) / float(sys.argv[2]) * 1e6 / max(d["ios"], 1), 2), sys.argv[3])' \
		$((t1 - t0)) "$hz" "$rss"
}

echo "scale.sh: $reps round(s) of $runtime s, sizes $sizes; load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
res=$tmp/res
: >"$res"
for r in $(seq "$reps"); do
	for s in ${sizes//,/ }; do
		f=$dir/scale-$s-metadata.qcow2
		for j in ${jobs//,/ }; do
			order="vqcowd qsd"
			[ $((r % 2)) = 1 ] || order="qsd vqcowd"
			if [ -n "${VQCOWD_ALT:-}" ]; then
				case $((r % 3)) in
				1) order="vqcowd alt qsd" ;;
				2) order="alt qsd vqcowd" ;;
				0) order="qsd vqcowd alt" ;;
				esac
			fi
			for k in $order; do
				lb=$(cut -d' ' -f1 /proc/loadavg)
				v=$(run "$k" "$f" "${j#qd}")
				la=$(cut -d' ' -f1 /proc/loadavg)
				echo "round $r $s randread-4k-$j $k: IOPS cpu_us/IO rss_KiB = $v; load1 $lb -> $la" >&2
				echo "$r $s $j $k $v $lb $la" >>"$res"
			done
		done
	done
done
echo "## 4K random reads across preallocation=metadata images, $runtime s per run, $reps rounds"
echo "(load at the end: $(cut -d' ' -f1-3 /proc/loadavg); qsd: $("$qsd" --version | head -1))"
python3 - "$res" <<'EOF'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
d = {}
for r, s, j, k, iops, cpu, rss, lb, la in rows:
    d.setdefault((s, j), {}).setdefault(k, {})[r] = (float(iops), float(cpu), int(rss), float(lb), float(la))
print("| image | job | vqcowd IOPS | qsd IOPS | IOPS vqcowd/qsd median (range) | CPU µs/IO vqcowd / qsd | peak RSS MiB vqcowd / qsd | load1 before-after (range) |")
print("|---|---|---:|---:|---:|---:|---:|---|")
alts = []
for (s, j), b in d.items():
    v, q = b.get("vqcowd", {}), b.get("qsd", {})
    med = lambda x, i: st.median([t[i] for t in x.values()])
    ratio = [v[r][0] / q[r][0] for r in v if r in q and q[r][0] > 0]
    ld = [t[i] for x in (v, q) for t in x.values() for i in (3, 4)]
    print("| %s | randread-4k-%s | %.0f | %.0f | %.2f (%.2f-%.2f) | %.2f / %.2f | %.0f / %.0f | %.1f-%.1f |" % (
        s, j, med(v, 0), med(q, 0), st.median(ratio), min(ratio), max(ratio),
        med(v, 1), med(q, 1), med(v, 2) / 1024, med(q, 2) / 1024, min(ld), max(ld)))
    a = b.get("alt", {})
    if a:
        ri = [v[r][0] / a[r][0] for r in v if r in a and a[r][0] > 0]
        rc = [v[r][1] / a[r][1] for r in v if r in a and a[r][1] > 0]
        alts.append("| %s | randread-4k-%s | %.0f | %.0f | %.2f (%.2f-%.2f) | %.2f / %.2f | %.2f (%.2f-%.2f) | %.0f / %.0f |" % (
            s, j, med(v, 0), med(a, 0), st.median(ri), min(ri), max(ri), med(v, 1), med(a, 1),
            st.median(rc), min(rc), max(rc), med(v, 2) / 1024, med(a, 2) / 1024))
if alts:
    print()
    print("| image | job | vqcowd IOPS | alt IOPS | IOPS vqcowd/alt median (range) | CPU µs/IO vqcowd / alt | CPU/IO vqcowd/alt median (range) | peak RSS MiB vqcowd / alt |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(alts))
EOF
