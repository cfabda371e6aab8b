#!/bin/bash
# tests/integration/test_mt.sh VQCOWD VQCOW_FE VQFE_STRESS — vqcowd's I/O
# threads (--io-threads 4, 4 queues: queue 0 on the main thread, which owns
# the qcow2 engine, queues 1-3 on three I/O threads) under vqfe-stress: four
# queues writing
# interleaved 4 KiB blocks of the same clusters at once (every cluster
# allocated, and copied-on-write from a backing file, by several threads at
# once), with DISCARD and WRITE_ZEROES mixed in, flushes, and every block
# read back through another queue and verified, many rounds. Then, for each
# image: `qemu-img check` clean, and the image file itself (qemu-img convert)
# block by block: written blocks hold their last pattern, zeroed blocks
# zeroes, and every untouched block still the backing file's (or the
# original) content. Images: raw; a fresh qcow2; a qcow2 overlay on a raw
# backing file; the same with extended L2 (subclusters); an overlay on a
# zlib-compressed qcow2 backing file. Then latency histograms set over QMP
# while the threads count requests. Last, the crash test: kill -9 with the
# four queues busy, then `qemu-img check` (leaked clusters allowed, nothing
# else) and a second run on the same image.
#
# qcow2 requests on allocated clusters are served on the queues' threads (the
# fast path, img/img_qcow2.c): each qcow2 run must show fast-path hits in the
# daemon's exit line (none with extended L2, where it is off). The churn runs
# discard whole clusters while other queues write them (--churn), with every
# 4th fast-path write held 20 ms after it was mapped (VQCOWD_TEST_FAST_DELAY,
# a test seam), so a cluster freed and reused while such a write is in flight
# shows up as a wrong block of the cluster that reused it.
#
# --io-threads-consolidate: the same stress with a load that falls and rises
# round by round (vqfe-stress --vary-depth: QD1 rounds, QD8 rounds), so the
# I/O threads' queues move to the main thread and back many times while
# every block is written and verified: raw, a fresh qcow2, an overlay on a
# raw backing file, a churned overlay; a compressed image (inflates on the
# threads, their caches of inflated clusters across moves), the same churned
# under held fast writes, and an overlay on a compressed backing file with
# --io-threads 3 (queues 0 and 3 on the main thread, two I/O threads moving);
# the exit line must count moves both ways. At a steady QD1 on 4 queues the
# queues of --io-threads 2 move, on 6 they stay (the main thread would give
# them back: a move to and fro for nothing).
# VQCOW_MT_THREADS (default 4) and VQCOW_MT_ROUNDS (default 16) for tuning;
# VQCOW_MT_VQ_ARGS: more vqcowd options for every daemon this test starts
# (e.g. --io-threads-consolidate=off, to run all of it with the switch off).
set -u
vqcowd=$1
fe=$2
stress=$3
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
it_setup "vqcowd's --io-threads"
command -v qemu-img >/dev/null || { echo "SKIP: qemu-img not installed"; exit 77; }
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
threads=${VQCOW_MT_THREADS:-4}
rounds=${VQCOW_MT_ROUNDS:-16}
size=$((8 << 20))
sock=$dir/mt.sock
log=$dir/vqcowd.log

# compare IMAGE FORMAT ORIGINAL_RAW MAP SEED: the image's content against the map.
compare() {
	qemu-img convert -f "$2" -O raw "$1" "$dir/out.raw" || { fail "convert $1"; return; }
	python3 - "$dir/out.raw" "$3" "$4" "$5" <<'EOF' || fail "$1: content differs from the map"
import sys, array
out, orig, mapf, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
BS = 4096
M = (1 << 64) - 1
bad = 0
with open(out, "rb") as fo, open(orig, "rb") as fr, open(mapf) as fm:
    for b, line in enumerate(fm):
        got = fo.read(BS)
        base = fr.read(BS)
        st = line.split()
        if st[0] == "U":
            want = base
        elif st[0] == "Z":
            want = bytes(BS)
        elif st[0] == "W":
            r = int(st[1])
            want = array.array("Q", [((seed << 48) ^ (r << 32) ^ (b << 9) ^ i) & M
                                     for i in range(BS // 8)]).tobytes()
        else:
            continue
        if got != want:
            bad += 1
            if bad <= 5:
                print(f"block {b} ({st[0]}): wrong content in the image file", file=sys.stderr)
print(f"{b + 1} blocks compared, {bad} wrong")
sys.exit(1 if bad else 0)
EOF
}

# run NAME IMAGE FORMAT ORIGINAL_RAW SEED [FAST]: serve IMAGE, stress it, check it.
# FAST (qcow2): "yes" the fast path must have served requests, "no" it must
# not have. $RUN_ENV: environment for vqcowd; $RUN_WRAP: a command to run it
# with (taskset); $RUN_VQ_ARGS: more vqcowd options; $RUN_ARGS: more vqfe-stress
# arguments; $RUN_SIZE, $RUN_ROUNDS, $RUN_THREADS: instead of $size, $rounds
# and $threads.
run() {
	local name=$1 img=$2 fmt=$3 orig=$4 seed=$5 fast=${6:-}
	local hits threads=${RUN_THREADS:-$threads}
	echo "== $name"
	# shellcheck disable=SC2086
	env ${RUN_ENV:-} ${RUN_WRAP:-} "$vqcowd" --socket-path "$sock" --blk-file "$img" --format "$fmt" \
		--num-queues 4 --io-threads "$threads" ${RUN_VQ_ARGS:-} ${VQCOW_MT_VQ_ARGS:-} 2>"$log" &
	pid=$!
	it_wait_serving "$pid" "$sock" "$log" "vqcowd ($name)" || return
	[ -n "${RUN_VQ_ARGS:-}${VQCOW_MT_VQ_ARGS:-}" ] || ! grep -a -q 'busy polling: at most' "$log" ||
		fail "$name: busy polling limited without --poll-spare-cpus"
	# shellcheck disable=SC2086
	"$stress" "$sock" --size "${RUN_SIZE:-$size}" --queues 4 --rounds "${RUN_ROUNDS:-$rounds}" \
		--seed "$seed" --mix ${RUN_ARGS:-} --map "$dir/map" ||
		fail "$name: vqfe-stress found errors"
	it_stop
	grep -a -q "$threads threads serve the queues" "$log" || [ "$threads" = 1 ] ||
		fail "$name: no I/O threads in the log"
	if [ -n "$fast" ] && [ "$threads" != 1 ]; then
		hits=$(grep -a -o 'fast path: [0-9]* hits' "$log" | grep -o '[0-9]*' | tail -1)
		echo "fast path hits: ${hits:-0}"
		if [ "$fast" = yes ] && [ "${hits:-0}" -eq 0 ]; then
			fail "$name: no request took the fast path"
		elif [ "$fast" = no ] && [ "${hits:-0}" -ne 0 ]; then
			fail "$name: the fast path served requests"
		fi
	fi
	if [ "$fmt" = qcow2 ]; then
		qemu-img check "$img" >"$dir/check" 2>&1 || {
			fail "$name: qemu-img check"
			cat "$dir/check"
		}
	fi
	compare "$img" "$fmt" "$orig" "$dir/map" "$seed"
}

# The backing content: a byte pattern that differs per block.
python3 -c "
import sys
with open(sys.argv[1], 'wb') as f:
    for b in range($size // 4096):
        f.write(bytes([(b * 7 + 13) & 0xff]) * 2048 + bytes([(b * 3 + 1) & 0xff]) * 2048)
" "$dir/base.raw"
truncate -s $size "$dir/zero.raw"

cp "$dir/base.raw" "$dir/img.raw"
run raw "$dir/img.raw" raw "$dir/base.raw" 11

qemu-img create -q -f qcow2 "$dir/fresh.qcow2" $size
run "fresh qcow2" "$dir/fresh.qcow2" qcow2 "$dir/zero.raw" 12 yes

qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/ov.qcow2" $size
run "overlay on raw" "$dir/ov.qcow2" qcow2 "$dir/base.raw" 13 yes

qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k -b "$dir/base.raw" -F raw \
	"$dir/ovx.qcow2" $size
run "extended L2 overlay" "$dir/ovx.qcow2" qcow2 "$dir/base.raw" 14 no

qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$dir/base.raw" "$dir/zbase.qcow2"
qemu-img create -q -f qcow2 -b "$dir/zbase.qcow2" -F qcow2 "$dir/ovz.qcow2" $size
run "overlay on compressed" "$dir/ovz.qcow2" qcow2 "$dir/base.raw" 15 yes

# A compressed image: reads inflate on the queues' threads (and keep the
# clusters they inflated); the untouched blocks are read beside the writes.
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$dir/base.raw" "$dir/z.qcow2"
cp "$dir/z.qcow2" "$dir/zseq.qcow2"
RUN_ARGS="--read-untouched" run "compressed image" "$dir/z.qcow2" qcow2 "$dir/base.raw" 17 yes

# Sequential 4K reads of a compressed image on two I/O threads and the main
# thread: each thread inflates a cluster once per pass over it, not once per
# read (the threads' caches of inflated clusters, img/img_qcow2.c fzc_try; the
# owner's, zc_find): at most 1/16 of the reads, with slack for the first
# touches and pass boundaries.
echo "== sequential reads of a compressed image"
# shellcheck disable=SC2086
"$vqcowd" --socket-path "$sock" --blk-file "$dir/zseq.qcow2" --format qcow2 --num-queues 3 \
	--io-threads 3 ${VQCOW_MT_VQ_ARGS:-} 2>"$log" &
pid=$!
if it_wait_serving "$pid" "$sock" "$log" "vqcowd (sequential compressed)"; then
	out=$("$fe" --queues 3 bench "$sock" --rw read --bs 4096 --iodepth 16 --numjobs 3 \
		--runtime 1 --json) || fail "sequential compressed: vqcow-fe bench failed"
	it_stop
	ios=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"]["ios"])')
	inflated=$(grep -a -o '[0-9]* compressed clusters inflated' "$log" | grep -o '^[0-9]*' | tail -1)
	echo "$ios reads, ${inflated:-0} clusters inflated"
	if [ "${ios:-0}" -lt 1000 ] || [ "${inflated:-0}" -eq 0 ]; then
		fail "sequential compressed: ${ios:-0} reads, ${inflated:-0} inflated"
	elif [ $((inflated * 16)) -gt $((ios * 5 / 4 + 4096)) ]; then
		fail "sequential compressed: $inflated clusters inflated for $ios 4K reads"
	fi
fi

# Clusters freed (whole-cluster discards) and reused with fast-path writes to
# them held in flight: every block of the clusters that reuse them verified.
small=$((2 << 20))
truncate -s $small "$dir/zero2.raw"
head -c $small "$dir/base.raw" >"$dir/base2.raw"
qemu-img create -q -f qcow2 "$dir/churn.qcow2" $small
RUN_ENV=VQCOWD_TEST_FAST_DELAY=20 RUN_ARGS="--churn 65536" RUN_SIZE=$small RUN_ROUNDS=30 \
	run "churn: fresh qcow2" "$dir/churn.qcow2" qcow2 "$dir/zero2.raw" 18 yes
qemu-img create -q -f qcow2 -b "$dir/base2.raw" -F raw "$dir/churnov.qcow2" $small
RUN_ENV=VQCOWD_TEST_FAST_DELAY=20 RUN_ARGS="--churn 65536" RUN_SIZE=$small RUN_ROUNDS=30 \
	run "churn: overlay" "$dir/churnov.qcow2" qcow2 "$dir/base2.raw" 19 yes

# Compressed clusters read, inflated and kept by the threads while other
# blocks of them are written (copied elsewhere) and whole clusters discarded,
# freed and reused under held fast writes: their untouched blocks, read
# beside it all, must never show anything but the original content.
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$dir/base2.raw" "$dir/zchurn.qcow2"
RUN_ENV=VQCOWD_TEST_FAST_DELAY=20 RUN_ARGS="--churn 65536 --read-untouched" RUN_SIZE=$small \
	RUN_ROUNDS=30 run "churn: compressed image" "$dir/zchurn.qcow2" qcow2 "$dir/base2.raw" 20 yes

# Statistics changed under load: block-latency-histogram-set and
# query-blockstats over QMP while four queues complete requests on four I/O
# threads (a raw image: its rings, and the per-queue histograms, live on the
# I/O threads), so a race between the boundaries and the binning is seen by
# ThreadSanitizer (contrib/test.sh runs this test in build-tsan). Every
# histogram read back must have the boundaries just set and bins that add up
# to at most the operations counted.
echo "== histograms set while four I/O threads count"
cp "$dir/base.raw" "$dir/hist.raw"
# shellcheck disable=SC2086
"$vqcowd" --socket-path "$sock" --blk-file "$dir/hist.raw" --format raw --num-queues 4 \
	--io-threads "$threads" --qmp "$dir/mt.qmp" ${VQCOW_MT_VQ_ARGS:-} 2>"$log" &
pid=$!
if it_wait_serving "$pid" "$sock" "$log" "vqcowd (histograms)"; then
	"$stress" "$sock" --size $size --queues 4 --seed 17 --mix --forever >/dev/null &
	spid=$!
	python3 - "$dir/mt.qmp" "$(dirname "$0")" <<'EOF2' || fail "histograms under load"
import sys
import time
sys.path.insert(0, sys.argv[2])
from qmplib import Qmp, check
q = Qmp(sys.argv[1])
rounds = 0
for i in range(150):
    b = [1000 * (i % 7 + 1), 100000, 10000000 + i]
    q.ret("block-latency-histogram-set", {"id": "disk0", "boundaries": b,
                                          "boundaries-write": b[1:]})
    st = q.ret("query-blockstats")[0]["stats"]
    for k, want in (("rd", b), ("wr", b[1:]), ("flush", b)):
        h = st["%s_latency_histogram" % k]
        check(h["boundaries"] == want, "%s boundaries %r, set %r" % (k, h["boundaries"], want))
        check(len(h["bins"]) == len(want) + 1 and sum(h["bins"]) <= st["%s_operations" % k],
              "%s bins %r for %d operations" % (k, h["bins"], st["%s_operations" % k]))
    rounds += st["rd_operations"] > 0
    if i % 50 == 25:
        q.ret("block-latency-histogram-set", {"id": "disk0"})  # all removed
        st = q.ret("query-blockstats")[0]["stats"]
        check("rd_latency_histogram" not in st, "histogram left after removal")
for _ in range(100):  # the last boundaries count what completes next
    time.sleep(0.05)
    st = q.ret("query-blockstats")[0]["stats"]
    binned = sum(sum(st[k + "_latency_histogram"]["bins"]) for k in ("rd", "wr", "flush"))
    if binned:
        break
check(binned > 0, "no request binned: %r" % st)
print("150 histogram changes under load, %d with reads counted" % rounds)
EOF2
	kill "$spid" 2>/dev/null
	wait "$spid" 2>/dev/null
	it_stop
	grep -a -q 'ThreadSanitizer' "$log" && fail "ThreadSanitizer: $(cat "$log")"
fi

# --poll-spare-cpus (busy polling, on by default, with I/O threads): at most
# one thread per CPU the threads leave spare polls at a time, by the daemon's
# CPU affinity. On one CPU none polls; on all of them, what nproc allows.
# Both serve the stress correctly (the threads then sleep in io_uring).
if [ "$threads" -gt 1 ] && command -v taskset >/dev/null; then
	cp "$dir/base.raw" "$dir/img.raw"
	RUN_WRAP="taskset -c 0" RUN_VQ_ARGS=--poll-spare-cpus RUN_ROUNDS=2 run "raw on one CPU" "$dir/img.raw" raw "$dir/base.raw" 17
	grep -a -q "busy polling: at most 0 of the $threads threads serving queues at a time (CPUs to run on: 1)" \
		"$log" || fail "one CPU: the threads may poll: $(grep -a 'busy polling' "$log")"
	cpus=$(nproc)
	want=$((cpus > threads ? cpus - threads : 0))
	[ $want -le "$threads" ] || want=$threads
	cp "$dir/base.raw" "$dir/img.raw"
	RUN_VQ_ARGS=--poll-spare-cpus RUN_ROUNDS=2 run "raw on $cpus CPUs" "$dir/img.raw" raw "$dir/base.raw" 18
	grep -a -q "busy polling: at most $want of the $threads threads serving queues at a time (CPUs to run on: $cpus)" \
		"$log" || fail "$cpus CPUs: not $want pollers: $(grep -a 'busy polling' "$log")"
else
	echo "SKIP: busy polling by CPU placement (no taskset or one thread)"
fi

# --poll-hybrid (hybrid polling: a wait with file I/O in flight sleeps part of
# the learnt wait before polling): the threads serve the stress correctly
# (vqfe-stress verifies every block, compare() the file); its debug line says
# how often they slept (how often depends on the disk: not asserted).
cp "$dir/base.raw" "$dir/img.raw"
RUN_VQ_ARGS="--poll-hybrid 90 --log-level debug" RUN_ROUNDS=2 run "raw, hybrid polling" "$dir/img.raw" raw "$dir/base.raw" 20
grep -a -o 'hybrid polling: [0-9]* sleeps' "$log" | head -4

# --poll-yield (a busy poll yields its CPU and ends once a yield ran another
# thread): the threads serve the stress correctly, here all on one CPU where
# available, so that they take it from each other; the loops' debug line says
# how many polls gave way (how many depends on the scheduler: not asserted).
cp "$dir/base.raw" "$dir/img.raw"
wrap=
command -v taskset >/dev/null && wrap="taskset -c 0"
RUN_WRAP=$wrap RUN_VQ_ARGS="--poll-yield --log-level debug" RUN_ROUNDS=2 run "raw, polls yield" "$dir/img.raw" raw "$dir/base.raw" 33
grep -a -o '[0-9]* given up to another thread' "$log" | head -4

# --poll-high-hold N: a thread that popped a request with more than 4 of its
# requests in flight busy-polls again only after N requests in a row popped
# with at most 4. The stress with it (every block verified), then what it
# does, from the loops' debug line ("busy polling: W waits timed, P
# polled"): 2 queues x QD32 on --io-threads 2 with a hold no QD32 load
# counts down, so the threads poll at most until their first batch (without
# the hold they poll whenever their count dips to 4 between batches); a hold
# of 64 after 1 s of 2 x QD32, then 2 x QD1: counted down, they poll again.
cp "$dir/base.raw" "$dir/img.raw"
RUN_VQ_ARGS="--poll-high-hold 64 --log-level debug" RUN_ROUNDS=2 run "raw, poll held after high load" "$dir/img.raw" raw "$dir/base.raw" 29
if [ -z "${VQCOW_MT_VQ_ARGS:-}" ]; then
	for qd in 32 1; do
		echo "== --poll-high-hold, 2 queues x QD$qd"
		hold=1000000
		[ $qd = 32 ] || hold=64
		"$vqcowd" --socket-path "$sock" --blk-file "$dir/base.raw" --format raw --num-queues 2 \
			--io-threads 2 --poll-high-hold $hold --log-level debug 2>"$log" &
		pid=$!
		it_wait_serving "$pid" "$sock" "$log" "vqcowd (--poll-high-hold, QD$qd)" || break
		[ $qd = 32 ] || "$fe" --queues 2 bench "$sock" --rw randread --bs 4096 --iodepth 32 \
			--numjobs 2 --runtime 1 >/dev/null || fail "--poll-high-hold QD32 first: reading failed"
		"$fe" --queues 2 bench "$sock" --rw randread --bs 4096 --iodepth $qd --numjobs 2 \
			--runtime 2 >/dev/null || fail "--poll-high-hold QD$qd: reading failed"
		it_stop
		polled=$(grep -a -o 'busy polling: [0-9]* waits timed, [0-9]* polled' "$log" |
			awk '{s += $6} END {print s + 0}')
		reqs=$(grep -a -o 'busy polling: [0-9]* waits timed' "$log" | awk '{s += $3} END {print s + 0}')
		echo "QD$qd: $polled of $reqs waits polled"
		if [ $qd = 32 ] && [ "$polled" -gt 64 ]; then
			fail "--poll-high-hold: $polled waits polled at QD32 (at most the first batch's)"
		elif [ $qd = 1 ] && [ "$polled" -lt 10 ]; then
			fail "--poll-high-hold: $polled waits polled at QD1 (still held after QD32)"
		fi
	done
fi

# The main thread serves queues too (queue i on thread i mod N, thread 0 the
# main thread, which owns the qcow2 engine): a device that uses one queue on a
# daemon with I/O threads runs as with --io-threads 1 (its requests take the
# owner's path: no hop, no fast-path table, so no "fast path:" in the exit
# line), and two queues on --io-threads 2 are served by the main thread and
# one I/O thread: one thread of the process more than --io-threads 1 has
# (io_uring's workers left out; ThreadSanitizer starts a thread of its own
# with the first thread the program creates), the second queue's reads on
# the fast path.
# threads_of PID: the process's threads, io_uring's own (iou-*) left out.
threads_of() {
	local n=0 c
	for c in /proc/"$1"/task/*/comm; do
		case $(cat "$c" 2>/dev/null) in iou-* | "") ;; *) n=$((n + 1)) ;; esac
	done
	echo $n
}
if [ "$threads" -gt 1 ]; then
	echo "== one queue, then two, on --io-threads 2: the main thread serves queue 0"
	qemu-img create -q -f qcow2 "$dir/one.qcow2" $size
	one=
	extra=1
	! grep -q -a __tsan_init "$vqcowd" || extra=2
	for cfg in "1 1" "2 1" "2 2"; do
		read -r nt nq <<<"$cfg"
		# shellcheck disable=SC2086
		"$vqcowd" --socket-path "$sock" --blk-file "$dir/one.qcow2" --format qcow2 \
			--num-queues 2 --io-threads "$nt" ${VQCOW_MT_VQ_ARGS:-} 2>"$log" &
		pid=$!
		it_wait_serving "$pid" "$sock" "$log" "vqcowd ($nt threads, $nq queue(s))" || break
		n=$(threads_of "$pid")
		if [ "$nt" = 1 ]; then
			one=$n
			"$fe" --queues 1 bench "$sock" --rw write --bs 65536 --iodepth 8 --numjobs 1 \
				--number-ios $((size / 65536)) >/dev/null || fail "one queue: writing failed"
		else
			grep -a -q '2 threads serve the queues, the main thread and 1 I/O thread' "$log" ||
				fail "$nq queue(s): start line: $(grep -a 'serve the queues' "$log")"
			[ "$n" -eq $((one + extra)) ] ||
				fail "$nq queue(s): $n threads, $one with --io-threads 1: not one I/O thread more"
		fi
		"$fe" --queues "$nq" bench "$sock" --rw randread --bs 4096 --iodepth 8 --numjobs "$nq" \
			--runtime 1 >/dev/null || fail "$nq queue(s): reading failed"
		it_stop
		line=$(grep -a 'image flushed; exiting' "$log")
		echo "--io-threads $nt, $nq queue(s), $n threads: $line"
		hits=$(echo "$line" | grep -o 'fast path: [0-9]* hits' | grep -o '[0-9]*')
		hops=$(echo "$line" | grep -o 'hits, [0-9]* hops' | grep -o '[0-9]*' | head -1)
		if [ -z "$line" ]; then
			fail "$nt threads, $nq queue(s): no exit line"
		elif [ "$nq" = 1 ] && [ -n "$hits$hops" ]; then
			fail "one queue: requests left the main thread (${hits:-0} hits, ${hops:-0} hops)"
		elif [ "$nq" = 2 ] && [ "${hits:-0}" -eq 0 ]; then
			fail "two queues: the I/O thread served no read itself"
		fi
	done
fi

# --io-threads-consolidate at a falling and rising load (the header): queues
# move after 16 low requests (VQCOWD_TEST_CONS_RUN, a test seam).
# moves: the exit line's counts of moves to the main thread and back.
moves() {
	local line
	line=$(grep -a -o 'queues moved to the main thread [0-9]* times, back [0-9]* times' "$log")
	echo "${line:-none}"
	# shellcheck disable=SC2046
	set -- $(echo "$line" | grep -o '[0-9]*')
	if [ "${1:-0}" -lt 2 ] || [ "${2:-0}" -lt 1 ]; then
		fail "$name: queues moved ${1:-0} times, back ${2:-0}"
	fi
	! grep -a -q 'a request ended on a thread that does not serve' "$log" ||
		fail "$name: a request ended on a thread its queue had left"
}
if [ "$threads" -gt 1 ]; then
	cons() {
		name=$1
		shift
		RUN_ENV="VQCOWD_TEST_CONS_RUN=16 ${RUN_ENV:-}" RUN_VQ_ARGS=--io-threads-consolidate \
			RUN_ARGS="--vary-depth ${RUN_ARGS:-}" RUN_ROUNDS=8 run "$name" "$@"
		moves
	}
	cp "$dir/base.raw" "$dir/img.raw"
	cons "consolidate: raw" "$dir/img.raw" raw "$dir/base.raw" 21
	qemu-img create -q -f qcow2 "$dir/cfresh.qcow2" $size
	cons "consolidate: fresh qcow2" "$dir/cfresh.qcow2" qcow2 "$dir/zero.raw" 22 yes
	qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/cov.qcow2" $size
	cons "consolidate: overlay on raw" "$dir/cov.qcow2" qcow2 "$dir/base.raw" 23 yes
	qemu-img create -q -f qcow2 -b "$dir/base2.raw" -F raw "$dir/cchurn.qcow2" $small
	RUN_ARGS="--churn 65536" RUN_SIZE=$small cons "consolidate: churned overlay" \
		"$dir/cchurn.qcow2" qcow2 "$dir/base2.raw" 24 yes
	cp "$dir/zbase.qcow2" "$dir/cz.qcow2"
	RUN_ARGS="--read-untouched" cons "consolidate: compressed image" "$dir/cz.qcow2" qcow2 \
		"$dir/base.raw" 25 yes
	qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$dir/base2.raw" \
		"$dir/czchurn.qcow2"
	RUN_ENV=VQCOWD_TEST_FAST_DELAY=20 \
		RUN_ARGS="--churn 65536 --read-untouched" RUN_SIZE=$small \
		cons "consolidate: churned compressed image" "$dir/czchurn.qcow2" qcow2 \
		"$dir/base2.raw" 26 yes
	if [ "$threads" -gt 3 ]; then
		qemu-img create -q -f qcow2 -b "$dir/zbase.qcow2" -F qcow2 "$dir/cz3.qcow2" $size
		RUN_THREADS=3 cons "consolidate: overlay on compressed, --io-threads 3" \
			"$dir/cz3.qcow2" qcow2 "$dir/base.raw" 27 yes
	fi

	# NQ queues at QD1 on --io-threads 2: the I/O thread's queues move only
	# if the main thread then serves at most 4 (POLL_INFLIGHT_MAX) queues;
	# with more, its requests would be high, it would give them back, and
	# the thread take them again (cons_gather). cons_qd1 NQ: the moves.
	cons_qd1() {
		echo "== consolidate: $1 queues at QD1 on --io-threads 2"
		env VQCOWD_TEST_CONS_RUN=16 "$vqcowd" --socket-path "$sock" --blk-file "$dir/img.raw" \
			--format raw --num-queues "$1" --io-threads 2 --io-threads-consolidate \
			--log-level debug 2>"$log" &
		pid=$!
		it_wait_serving "$pid" "$sock" "$log" "vqcowd ($1 queues at QD1)" || return
		"$fe" --queues "$1" bench "$sock" --rw randread --bs 4096 --iodepth 1 --numjobs "$1" \
			--runtime 2 --size $size >/dev/null || fail "$1 queues at QD1: vqcow-fe bench failed"
		it_stop
		cmoves=$(grep -a -o 'queues moved to the main thread [0-9]* times, back [0-9]* times' \
			"$log")
		echo "${cmoves:-none}; $(grep -a -c 'its queues stay' "$log") refused"
	}
	cons_qd1 4
	[ "$(echo "$cmoves" | grep -o '[0-9]*' | head -1)" -ge 1 ] 2>/dev/null ||
		fail "4 queues at QD1: the I/O thread's queues never moved"
	cons_qd1 6
	[ "$cmoves" = "queues moved to the main thread 0 times, back 0 times" ] ||
		fail "6 queues at QD1: the I/O thread's queues moved (${cmoves:-no exit line})"

	# --io-threads-contended: an I/O thread that waits for a CPU 30 % of the
	# time or more gives its queues to the main thread (polling off) and gets
	# them back once the main thread waited less than 15 % for 20 windows.
	# The run delays come from a file (VQCOWD_TEST_CONT, a test seam): 0 %,
	# 60 %, 0 %, under vqfe-stress at QD8 on 2 queues (high: the low-load
	# rule moves nothing), which verifies every block; then the image.
	# cont_start PCT NQ: a fresh copy of the base, run delays of PCT % from
	# the file, vqcowd on NQ queues and 2 threads with --io-threads-contended 30
	cont_start() {
		cp "$dir/base.raw" "$dir/img.raw"
		echo "$1" >"$dir/cont"
		rm -f "$dir/cont.stop"
		env VQCOWD_TEST_CONT="$dir/cont" "$vqcowd" --socket-path "$sock" \
			--blk-file "$dir/img.raw" --format raw --num-queues "$2" --io-threads 2 \
			--io-threads-contended 30 --log-level debug 2>"$log" &
		pid=$!
	}
	echo "== contended: a thread waiting for a CPU gives its queues away, gets them back"
	cont_start 0 2
	# waitlog PATTERN: up to 10 s for a line of the log
	waitlog() {
		for _ in $(seq 100); do
			grep -a -q "$1" "$log" && return 0
			sleep 0.1
		done
		return 1
	}
	if it_wait_serving "$pid" "$sock" "$log" "vqcowd (contended)"; then
		"$stress" "$sock" --size $size --queues 2 --seed 31 --mix --map "$dir/map" \
			--until "$dir/cont.stop" >/dev/null &
		spid=$!
		sleep 0.5
		! grep -a -q 'its queues moved' "$log" || fail "contended: a queue moved at 0 %"
		echo 60 >"$dir/cont"
		waitlog 'its queues moved to the main thread (contended)' ||
			fail "contended: at 60 % the I/O thread kept its queues"
		grep -a -q 'thread 1: contended' "$log" || fail "contended: no debug line"
		sleep 0.5
		! grep -a -q 'moved back' "$log" || fail "contended: the queues came back at 60 %"
		echo 0 >"$dir/cont"
		waitlog 'its queues moved back to it (load, no longer contended)' ||
			fail "contended: at 0 % the queues stayed on the main thread"
		sleep 0.3
		touch "$dir/cont.stop"
		wait "$spid" || fail "contended: vqfe-stress found errors"
		spid=
		it_stop
		line=$(grep -a -o 'for contention [0-9]* times, back [0-9]* times' "$log")
		echo "${line:-no exit line}"
		[ "$line" = "for contention 1 times, back 1 times" ] ||
			fail "contended: moves ${line:-(no exit line)}, not one each way"
		grep -a -q 'thread 1: waited for a CPU' "$log" || fail "contended: no run delay line"
		! grep -a -q 'a request ended on a thread that does not serve' "$log" ||
			fail "contended: a request ended on a thread its queue had left"
		compare "$dir/img.raw" raw "$dir/base.raw" "$dir/map" 31
	fi

	# A contended I/O thread whose queues the main thread refuses (6 queues
	# on 2 threads: it would serve 6 at QD1, over POLL_INFLIGHT_MAX) tries
	# again later each time: before, every 0.25 s for good, each try a drain
	# of its queues and a park of every thread.
	echo "== contended, refused: the tries back off"
	cont_start 60 6
	if it_wait_serving "$pid" "$sock" "$log" "vqcowd (contended, refused)"; then
		"$stress" "$sock" --size $size --queues 6 --seed 32 --mix --map "$dir/map" \
			--until "$dir/cont.stop" >/dev/null &
		spid=$!
		sleep 3
		touch "$dir/cont.stop"
		wait "$spid" || fail "contended, refused: vqfe-stress found errors"
		spid=
		it_stop
		n=$(grep -a -c 'its queues stay: the main thread would serve 6' "$log" || true)
		echo "refused contended gives in about 3 s: $n"
		[ "$n" -ge 1 ] || fail "contended, refused: no try (the thread was not contended?)"
		[ "$n" -le 6 ] || fail "contended, refused: $n tries in about 3 s, no backoff"
		compare "$dir/img.raw" raw "$dir/base.raw" "$dir/map" 32
	fi
fi

# Crash: kill -9 with four busy queues; the image may leak, nothing more.
echo "== kill -9 under four busy queues"
qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/crash.qcow2" $size
# shellcheck disable=SC2086
"$vqcowd" --socket-path "$sock" --blk-file "$dir/crash.qcow2" --format qcow2 --num-queues 4 \
	--io-threads "$threads" ${VQCOW_MT_VQ_ARGS:-} 2>"$log" &
pid=$!
if it_wait_serving "$pid" "$sock" "$log" "vqcowd (crash)"; then
	"$stress" "$sock" --size $size --queues 4 --seed 16 --mix --forever >/dev/null &
	spid=$!
	sleep 1.5
	kill -9 "$pid"
	wait "$pid" 2>/dev/null
	pid=
	wait "$spid" || fail "crash: vqfe-stress failed before the kill"
	# The kernel lets the dead process's image locks go a little later
	# (io_uring tears its requests down asynchronously).
	for _ in $(seq 100); do
		qemu-img check "$dir/crash.qcow2" >"$dir/check" 2>&1
		rc=$?
		grep -q 'lock' "$dir/check" || break
		sleep 0.1
	done
	# 0: clean; 3: leaked clusters only (a crash may leak, never more).
	if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then
		fail "crash: qemu-img check exit $rc"
		cat "$dir/check"
	fi
	qemu-img check -q -r leaks "$dir/crash.qcow2" >/dev/null 2>&1
	run "after the crash" "$dir/crash.qcow2" qcow2 "$dir/base.raw" 16
fi
it_finish "$log"
