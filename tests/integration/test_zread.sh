#!/bin/bash
# tests/integration/test_zread.sh VQCOWD VQCOW_FE — reads of compressed
# clusters on the main thread, which owns the qcow2 engine: a read of a
# cluster whose compressed bytes are already on their way waits for them
# instead of reading them again (img/img_qcow2.c, comp_issue()), whether it
# was submitted there or handed over by an I/O thread.
#  1. --io-threads 1, one queue, 4K reads of the whole image in order at
#     QD32: about one read of compressed bytes per cluster (the exit line's
#     "compressed reads (owner N)", at most 1.25 per cluster; before, one per
#     4K read), every block equal to qemu-img's view of the image
#     (qemu-img convert -O raw, vqcow-fe bench --expect).
#  2. Two queues reading the same clusters at once (random 4K reads of 1 MiB,
#     QD32 each), verified the same way: both on the main thread
#     (--io-threads 1), one on the main thread and one on an I/O thread
#     (--io-threads 2), and with extended L2 entries, where the I/O thread
#     hands every read to the main thread (no fast path): those join and
#     lead reads in flight too, and are inflated on their own thread.
#  3. Failed reads of compressed bytes (VQCOWD_TEST_ZREAD_FAIL=N, a test
#     seam: every N-th fails with EIO without reading) under the loads of 2:
#     each failure fails exactly one request, the one whose own read it was;
#     the reads that waited for it read again, and get the right data.
#  4. Teardown with reads waiting: the front-end killed (kill -9) under
#     such a load, then a new connection served and verified; SIGTERM under
#     load: the daemon exits 0 (the ASan build: no leak, no use after free).
#  5. Failed reads with --qmp, two queues at QD1 on --io-threads 2: a
#     BLOCK_IO_ERROR event (at most one a second) sums every queue's
#     counters with the I/O threads parked, and only then: the threads are
#     parked tens of times (the exit's debug line: the connection's
#     vhost-user messages, moves, events), not on every iteration of
#     the main loop while an event waits for its second to pass (a million
#     in 2 s, src/control.h ctl_report_due).
set -u
vqcowd=$1
fe=$2
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
it_setup "vqcowd's compressed reads on the main thread"
command -v qemu-img >/dev/null || { echo "SKIP: qemu-img not installed"; exit 77; }
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
size=$((16 << 20))
clusters=$((size / 65536))
sock=$dir/z.sock
log=$dir/vqcowd.log

# Compressible like a system disk (a quarter of each cluster random).
python3 - "$dir/base.raw" $clusters <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    for c in range(int(sys.argv[2])):
        f.write(os.urandom(16384) + bytes((c * 7 + i) & 0xff for i in range(256)) * 192)
EOF
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$dir/base.raw" "$dir/z.qcow2"
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib,extended_l2=on \
	"$dir/base.raw" "$dir/zx.qcow2"
for img in z zx; do
	qemu-img check "$dir/$img.qcow2" >"$dir/check" 2>&1 || fail "$img.qcow2: qemu-img check"
	grep -q '100.00% compressed clusters' "$dir/check" ||
		fail "$img.qcow2: not all clusters compressed: $(cat "$dir/check")"
	# QEMU's view of the image is what every read must return
	qemu-img convert -f qcow2 -O raw "$dir/$img.qcow2" "$dir/$img.expect"
	cmp -s "$dir/base.raw" "$dir/$img.expect" || fail "$img.qcow2: qemu-img reads other data"
done

# serve IMAGE THREADS QUEUES [ENV...]: start vqcowd in the background ($pid),
# with the options in serve_args too.
serve_args=()
serve() {
	local img=$1 threads=$2 queues=$3
	shift 3
	env "$@" "$vqcowd" --socket-path "$sock" --blk-file "$dir/$img.qcow2" --format qcow2 \
		--num-queues "$queues" --io-threads "$threads" ${serve_args[@]+"${serve_args[@]}"} \
		2>"$log" &
	pid=$!
	it_wait_serving "$pid" "$sock" "$log" "vqcowd ($img, --io-threads $threads)"
}

# bench NAME IMAGE QUEUES ARGS...: vqcow-fe bench verified against IMAGE's raw view.
bench() {
	local name=$1 img=$2 queues=$3
	shift 3
	"$fe" --queues "$queues" bench "$sock" --bs 4096 --iodepth 32 --numjobs "$queues" \
		--expect "$dir/$img.expect" --json "$@" >"$dir/out.json" 2>"$dir/fe.log" || {
		fail "$name: vqcow-fe bench failed: $(cat "$dir/fe.log")"
		return 1
	}
	python3 -c 'import json, sys; j = json.load(open(sys.argv[1]))
assert j["mismatches"] == 0 and j["total"]["errors"] == 0, j
print(j["total"]["ios"])' "$dir/out.json" >"$dir/ios" || {
		fail "$name: mismatches or errors: $(cat "$dir/out.json")"
		return 1
	}
	echo "$name: $(cat "$dir/ios") reads verified"
}

# owner_count WHAT: the main thread's "compressed reads" or "joined one in
# flight" from the exit line.
owner_count() {
	grep -a -o "[0-9]* $1 (owner [0-9]*)" "$log" | tail -1 | sed 's/.*(owner \([0-9]*\))/\1/'
}

echo "== 1. sequential 4K reads, --io-threads 1: one read of compressed bytes per cluster"
if serve z 1 1; then
	bench "sequential" z 1 --rw read --number-ios $((size / 4096))
	it_stop
	reads=$(owner_count "compressed reads")
	joins=$(owner_count "joined one in flight")
	echo "$clusters clusters: ${reads:-?} compressed reads, ${joins:-?} joined one in flight"
	if [ -z "$reads" ] || [ -z "$joins" ]; then
		fail "sequential: no compressed read counters in the exit line: $(tail -3 "$log")"
	elif [ $((reads * 4)) -gt $((clusters * 5)) ] || [ "$reads" -lt "$clusters" ]; then
		fail "sequential: $reads compressed reads for $clusters clusters (at most 1.25 each)"
	elif [ "$joins" -eq 0 ]; then
		# (how many join rather than hit the inflated cluster depends on
		# when the front-end's next reads arrive: only the reads count)
		fail "sequential: no read joined one in flight"
	fi
fi

echo "== 2. two queues reading the same clusters"
for c in "z 1" "z 2" "zx 2"; do
	set -- $c
	if serve "$1" "$2" 2; then
		bench "$1.qcow2 --io-threads $2 random" "$1" 2 --rw randread --size 1M --runtime 1
		bench "$1.qcow2 --io-threads $2 sequential" "$1" 2 --rw read --runtime 1
		it_stop
		joins=$(owner_count "joined one in flight")
		echo "joined one in flight on the main thread: ${joins:-?}"
		[ "${joins:-0}" -gt 0 ] || fail "$1.qcow2 --io-threads $2: no read joined one in flight"
		if [ "$1" = zx ]; then
			grep -a -q 'fast path: 0 hits, [1-9][0-9]* hops' "$log" ||
				fail "extended L2: the I/O thread's reads were not handed over: $(tail -1 "$log")"
		fi
	fi
done

echo "== 3. failed reads of compressed bytes fail one request each"
for c in "z 1" "z 2" "zx 2"; do
	set -- $c
	for rw in read randread; do
		serve "$1" "$2" 2 VQCOWD_TEST_ZREAD_FAIL=7 || continue
		rc=0
		"$fe" --queues 2 bench "$sock" --bs 4096 --iodepth 32 --numjobs 2 --rw $rw --size 4M \
			--runtime 1 --expect "$dir/$1.expect" --json >"$dir/out.json" 2>"$dir/fe.log" ||
			rc=$?
		it_stop
		failed=$(grep -a -o 'VQCOWD_TEST_ZREAD_FAIL: [0-9]* reads' "$log" | grep -o '[0-9]*' |
			tail -1)
		errors=$(python3 -c 'import json, sys; j = json.load(open(sys.argv[1]))
print(j["total"]["errors"] if j["mismatches"] == 0 else -1)' "$dir/out.json")
		echo "$1.qcow2 --io-threads $2 $rw: ${failed:-?} reads failed, ${errors:-?} requests failed"
		if [ "$rc" != 3 ] || [ -z "$failed" ] || [ "${failed:-0}" -eq 0 ]; then
			fail "$1.qcow2 --io-threads $2 $rw: no failure injected (vqcow-fe exit $rc)"
		elif [ "${errors:-x}" != "$failed" ]; then
			fail "$1.qcow2 --io-threads $2 $rw: $failed reads failed, $errors requests (-1: data)"
		fi
	done
done

echo "== 4. teardown with reads waiting"
if serve zx 2 2; then
	"$fe" --queues 2 bench "$sock" --bs 4096 --iodepth 32 --numjobs 2 --rw randread --size 2M \
		--runtime 30 >/dev/null 2>&1 &
	fpid=$!
	sleep 1
	kill -9 $fpid
	wait $fpid 2>/dev/null
	kill -0 "$pid" 2>/dev/null || fail "vqcowd died with the front-end: $(cat "$log")"
	# the connection is gone and its requests drained: a new one is served
	bench "after the front-end's kill" zx 2 --rw randread --size 2M --runtime 1
	"$fe" --queues 2 bench "$sock" --bs 4096 --iodepth 32 --numjobs 2 --rw read \
		--runtime 30 >/dev/null 2>&1 &
	fpid=$!
	sleep 1
	it_stop # SIGTERM while it reads
	wait $fpid 2>/dev/null
fi
if serve z 1 1; then
	"$fe" bench "$sock" --bs 4096 --iodepth 32 --rw read --runtime 30 >/dev/null 2>&1 &
	fpid=$!
	sleep 1
	it_stop
	wait $fpid 2>/dev/null
fi

echo "== 5. failed reads with --qmp: the I/O threads parked for the events only"
serve_args=(--qmp "$dir/q.sock" --log-level debug)
if serve z 2 2 VQCOWD_TEST_ZREAD_FAIL=7; then
	"$fe" --queues 2 bench "$sock" --bs 4096 --iodepth 1 --numjobs 2 --rw randread \
		--runtime 2 >/dev/null 2>&1
	it_stop
	failed=$(grep -a -o 'VQCOWD_TEST_ZREAD_FAIL: [0-9]* reads' "$log" | grep -o '[0-9]*' | tail -1)
	parks=$(grep -a -o 'I/O threads parked [0-9]* times' "$log" | grep -o '[0-9]*' | tail -1)
	echo "${failed:-?} reads failed in 2 s; the I/O threads parked ${parks:-?} times"
	if [ "${failed:-0}" -lt 3 ]; then
		fail "--qmp: ${failed:-no} failure(s) injected (too few to check the parks)"
	elif [ -z "$parks" ]; then
		fail "--qmp: no 'I/O threads parked' line at exit: $(tail -3 "$log")"
	elif [ "$parks" -gt 200 ]; then
		fail "--qmp: the I/O threads parked $parks times for ${failed} failed reads"
	fi
fi
serve_args=()
it_finish "$log"
