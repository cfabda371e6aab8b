#!/bin/bash
# SPDX-License-Identifier: MIT
#
# A/B helper for tuning experiments: runs vqcowd and qemu-storage-daemon
# alternately on one image with one vqcow-fe bench job and prints IOPS,
# latency and the backend's CPU time per I/O for every run.
#
#   bash contrib/bench/ab.sh IMAGE raw|qcow2 "FRONTEND ARGS" REPS [VQCOWD ARGS...]
#   bash contrib/bench/ab.sh build/bench-images/raw-4G.img raw \
#        "--rw randread --bs 4k --iodepth 32 --runtime 5" 3 --submit-batch 0
#
# The full matrix with medians and ratios is run.sh; this is for quick
# side-by-side comparisons of one cell while changing one option.
# With VQCOWD_B="ARGS" set, the second backend is vqcowd again with ARGS
# instead of VQCOWD ARGS (A/B of two vqcowd configurations), labelled vqcowd-b;
# VQCOWD_B_BIN=PATH runs another vqcowd binary as B (A/B of two builds).
# QSD=PATH runs another qemu-storage-daemon (e.g. 10.0 from qsd10.sh), labelled
# QSD_LABEL (default qsd); QSD_IOTHREAD=1 gives its export an iothread.
set -euo pipefail
[ $# -ge 4 ] || { sed -n 4,12p "$0" >&2; exit 2; }
img=$1 fmt=$2 feargs=$3 reps=$4
shift 4
extra=("$@")
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD:-$repo/build}
vqcowd=${VQCOWD:-$build/src/vqcowd}
fe=${VQCOW_FE:-$build/tests/frontend/vqcow-fe}
tmp=$(mktemp -d)
sock=$tmp/sock
bpid=
cleanup() { [ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
. "$repo/contrib/bench/qsd-start.sh"
. "$repo/contrib/bench/bench-lib.sh"

run() {
	local kind=$1 t0 t1 out
	rm -f "$sock"
	if [ "$kind" = vqcowd ]; then
		"$vqcowd" --socket-path "$sock" --blk-file "$img" --format "$fmt" \
			${extra[@]+"${extra[@]}"} >"$tmp/$kind.log" 2>&1 &
	elif [ "$kind" = vqcowd-b ]; then
		# shellcheck disable=SC2086
		"${VQCOWD_B_BIN:-$vqcowd}" --socket-path "$sock" --blk-file "$img" --format "$fmt" \
			$VQCOWD_B >"$tmp/$kind.log" 2>&1 &
	else
		bench_qsd_start "${QSD:-qemu-storage-daemon}" "$img" "$fmt" "$sock" "$tmp/$kind.log" 1 \
			"${QSD_IOTHREAD:-0}"
	fi
	bpid=$!
	bench_wait_sock "$sock" "$kind" "$tmp/$kind.log" 100
	t0=$(bench_ticks "$bpid")
	# shellcheck disable=SC2086
	out=$("$fe" bench "$sock" $feargs --json)
	t1=$(bench_ticks "$bpid")
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
	echo "$out" | python3 -c '
import json, sys
d = json.load(sys.stdin)["total"]
kind, dt, hz = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print("%-8s IOPS %9.0f  lat mean %7.1f p99 %7.1f us  cpu %.2f us/IO" % (kind, d["iops"],
      d["lat_us"]["mean"], d["lat_us"]["p99"], dt / hz * 1e6 / max(d["ios"], 1)))' \
		"$kind" $((t1 - t0)) "$(getconf CLK_TCK)"
}

for _ in $(seq "$reps"); do
	run vqcowd
	if [ -n "${VQCOWD_B+x}" ]; then run vqcowd-b; else run "${QSD_LABEL:-qsd}"; fi
done
