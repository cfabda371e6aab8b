#!/usr/bin/env bash
# Side-by-side throughput: vqcow-fe bench through vqcowd versus fio
# (io_uring, O_DIRECT) on the same raw file, in the same run, alternating
# the two for each workload so that background load hits both alike.
#
#   bench_compare.sh VQCOWD VQCOW-FE [RUNTIME_S] [SIZE] [DIR]
#
# Workloads: 4K randread QD32, 4K randwrite QD32, 1M sequential read QD8.
# Prints a table (and the raw JSON lines to DIR/results.jsonl).
set -euo pipefail
vqcowd=${1:?usage: bench_compare.sh VQCOWD VQCOW-FE [RUNTIME_S] [SIZE] [DIR]}
fe=${2:?}
runtime=${3:-10}
size=${4:-1G}
dir=${5:-$(mktemp -d /var/tmp/vqcow-bench.XXXXXX)}
command -v fio >/dev/null || { echo "fio not installed" >&2; exit 77; }
mkdir -p "$dir"
img=$dir/bench.raw
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; true' EXIT

if [ ! -f "$img" ] || [ "$(stat -c %s "$img")" -ne "$(numfmt --from=iec "$size")" ]; then
	echo "writing $size to $img (so that reads hit allocated blocks)" >&2
	rm -f "$img"
	fio --name=fill --filename="$img" --size="$size" --rw=write --bs=1M --direct=1 \
		--ioengine=io_uring --iodepth=8 >/dev/null
fi

start_daemon() {
	rm -f "$dir/sock"
	"$vqcowd" --socket-path "$dir/sock" --blk-file "$img" --num-queues 1 2>"$dir/vqcowd.log" &
	pid=$!
	for _ in $(seq 200); do
		[ -S "$dir/sock" ] && "$fe" info "$dir/sock" >/dev/null 2>&1 && return 0
		sleep 0.05
	done
	echo "vqcowd did not start" >&2
	cat "$dir/vqcowd.log" >&2
	exit 1
}

: >"$dir/results.jsonl"
run() { # name rw bs depth
	local name=$1 rw=$2 bs=$3 qd=$4 f v
	f=$(fio --name="$name" --filename="$img" --size="$size" --rw="$rw" --bs="$bs" \
		--iodepth="$qd" --ioengine=io_uring --direct=1 --runtime="$runtime" --time_based \
		--group_reporting --output-format=json)
	python3 -c '
import json, sys
j = json.loads(sys.argv[1])["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
lat = d["clat_ns"]
print(json.dumps({"tool": "fio", "workload": sys.argv[2], "iops": d["iops"],
      "mib_s": d["bw_bytes"] / 1048576, "lat_us_mean": d["lat_ns"]["mean"] / 1000,
      "lat_us_p50": lat["percentile"]["50.000000"] / 1000,
      "lat_us_p99": lat["percentile"]["99.000000"] / 1000}))' "$f" "$name" >>"$dir/results.jsonl"
	start_daemon
	v=$("$fe" bench "$dir/sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime "$runtime" \
		--size "$size" --json)
	kill "$pid"
	wait "$pid" || true
	pid=
	python3 -c '
import json, sys
t = json.loads(sys.argv[1])["total"]
print(json.dumps({"tool": "vqcow-fe+vqcowd", "workload": sys.argv[2], "iops": t["iops"],
      "mib_s": t["mib_s"], "lat_us_mean": t["lat_us"]["mean"], "lat_us_p50": t["lat_us"]["p50"],
      "lat_us_p99": t["lat_us"]["p99"]}))' "$v" "$name" >>"$dir/results.jsonl"
}

run "4k-randread-qd32" randread 4k 32
run "4k-randwrite-qd32" randwrite 4k 32
run "1m-read-qd8" read 1M 8

python3 - "$dir/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'workload':20} {'tool':16} {'IOPS':>9} {'MiB/s':>8} {'mean us':>8} {'p50 us':>8} {'p99 us':>8}")
for r in rows:
    print(f"{r['workload']:20} {r['tool']:16} {r['iops']:9.0f} {r['mib_s']:8.1f} "
          f"{r['lat_us_mean']:8.1f} {r['lat_us_p50']:8.1f} {r['lat_us_p99']:8.1f}")
PY
