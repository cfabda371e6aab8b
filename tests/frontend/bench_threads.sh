#!/usr/bin/env bash
# vqcow-fe bench with a thread per queue (--threads per-queue, the default)
# against vqcowd: 3 queues on 2 I/O threads of a qcow2 image, random reads
# and writes with --verify (every write carries verify's pattern of its
# offset, every read must return it), so a request that reaches the wrong
# offset, or a data buffer another thread's request overwrote, shows as a
# mismatch. The per-queue counters must add up to the totals, every queue
# must have done its share (--number-ios split exactly), the backend
# channel must be served while the threads run (a resize's config change),
# the rings must stop where the threads left them (bench exits 1 if
# GET_VRING_BASE disagrees), and the single-thread mode must give the
# same. A wrong seed must be caught. Then the daemon exits 0 and
# `qemu-img check` is clean.
#   bench_threads.sh VQCOWD VQCOW-FE VQCOWCTL
set -uo pipefail
vqcowd=${1:?usage: bench_threads.sh VQCOWD VQCOW-FE VQCOWCTL}
fe=${2:?usage: bench_threads.sh VQCOWD VQCOW-FE VQCOWCTL}
ctl=${3:?usage: bench_threads.sh VQCOWD VQCOW-FE VQCOWCTL}
command -v qemu-img >/dev/null || { echo "SKIP: qemu-img not installed"; exit 77; }
command -v python3 >/dev/null || { echo "SKIP: python3 not installed"; exit 77; }
dir=$(mktemp -d)
pid=
cleanup() {
	[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
	rm -rf "$dir"
}
trap cleanup EXIT
failures=0
fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}
sock=$dir/sock
qemu-img create -q -f qcow2 "$dir/img.qcow2" 16M
"$vqcowd" --socket-path "$sock" --qmp "$dir/qmp" --blk-file "$dir/img.qcow2" --format qcow2 \
	--num-queues 3 --io-threads 2 2>"$dir/log" &
pid=$!
for _ in $(seq 200); do
	[ -S "$sock" ] && "$fe" info "$sock" >/dev/null 2>&1 && break
	sleep 0.05
done
"$fe" info "$sock" >/dev/null 2>&1 || { cat "$dir/log"; echo "FAIL: vqcowd did not start"; exit 1; }
"$fe" verify "$sock" --size 16M --seed 5 >/dev/null || fail "verify (the pattern)"

# check NAME MODE JSON [IOS]: counters add up, every queue took part, no error
check() {
	python3 - "$@" <<'EOF' || fail "$1"
import json, sys
name, mode, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
want = int(sys.argv[4]) if len(sys.argv) > 4 else None
qs, t = out["queues"], out["total"]
bad = []
if out["threads"] != mode:
    bad.append("threads %r, not %r" % (out["threads"], mode))
if len(qs) != out["numjobs"] or [q["queue"] for q in qs] != list(range(len(qs))):
    bad.append("queues %r" % qs)
for k, kk in (("read", "reads"), ("write", "writes")):
    if sum(q[kk] for q in qs) != out[k]["ios"] + out[k]["errors"]:
        bad.append("%s: queues %d, total %d" % (k, sum(q[kk] for q in qs), out[k]["ios"]))
if sum(q["reads"] + q["writes"] for q in qs) != t["ios"] + t["errors"]:
    bad.append("queues' sum != total %d" % t["ios"])
if t["errors"] or out["mismatches"] or any(q["errors"] or q["mismatches"] for q in qs):
    bad.append("errors %d, mismatches %d" % (t["errors"], out["mismatches"]))
if any(q["reads"] + q["writes"] == 0 or q["kicks"] == 0 for q in qs):
    bad.append("a queue did nothing: %r" % qs)
if want is not None:
    n = len(qs)
    share = [want // n + (i < want % n) for i in range(n)]
    # one thread splits by completion order, per-queue threads exactly
    if t["ios"] != want or (mode == "per-queue" and
                            [q["reads"] + q["writes"] for q in qs] != share):
        bad.append("--number-ios %d: total %d, queues %r" % (want, t["ios"],
                   [q["reads"] + q["writes"] for q in qs]))
print("%s: %d I/Os (%s), %s" % (name, t["ios"], ", ".join(
    "q%d %d" % (q["queue"], q["reads"] + q["writes"]) for q in qs), "; ".join(bad) or "ok"))
sys.exit(1 if bad else 0)
EOF
}

job=(--rw randrw --bs 4k --iodepth 8 --numjobs 3 --size 16M --verify --seed 5 --json)
# a resize while the queues' threads run: vqcowd sends a config change on
# the backend channel, which the main thread must serve
# (once the bench's requests arrive: it is connected, its channel set up)
ops() {
	"$ctl" -s "$dir/qmp" --json stats | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats"]
print(s["rd_operations"] + s["wr_operations"])'
}
# A loaded machine can let the 2 s run end before the resize's reply: such a
# round tested nothing (the bench was gone when the change was sent) and
# runs again, with the next size, at most 3 times; a bench still running
# when the resize returned must have counted the change.
size=16
for round in 1 2 3; do
	size=$((size + 16))
	ops0=$(ops)
	"$fe" bench "$sock" "${job[@]}" --runtime 2 >"$dir/pq.json" 2>"$dir/pq.err" &
	bench=$!
	for _ in $(seq 100); do
		[ "$(ops)" -gt "$ops0" ] && break
		sleep 0.02
	done
	"$ctl" -s "$dir/qmp" resize ${size}M >/dev/null || fail "resize during the bench"
	alive=no
	kill -0 $bench 2>/dev/null && alive=yes
	wait $bench || fail "per-queue bench: exit $? ($(cat "$dir/pq.err"))"
	[ $alive = yes ] && break
	echo "round $round: the bench ended before the resize to ${size}M returned; again"
done
[ $alive = yes ] || fail "the bench ended before the resize in 3 rounds: nothing tested"
check "per-queue, randrw, verify, resize" per-queue "$(cat "$dir/pq.json")"
grep -q '"calls": 0' "$dir/pq.json" && fail "a queue saw no call: $(cat "$dir/pq.json")"
grep -q '"config_changes": [1-9]' "$dir/pq.json" ||
	fail "the resize's config change was not served: $(cat "$dir/pq.json")"
out=$("$fe" bench "$sock" "${job[@]}" --number-ios 3001) || fail "per-queue --number-ios"
check "per-queue, --number-ios 3001" per-queue "$out" 3001
out=$("$fe" bench "$sock" "${job[@]}" --runtime 0.5 --threads one) || fail "--threads one"
check "one thread, randrw, verify" one "$out"
out=$("$fe" bench "$sock" "${job[@]}" --number-ios 3001 --threads one) ||
	fail "--threads one --number-ios"
check "one thread, --number-ios 3001" one "$out" 3001
# a verify that cannot fail would prove nothing: the wrong seed must show
out=$("$fe" bench "$sock" --rw randread --bs 4k --iodepth 8 --numjobs 3 --size 16M --verify \
	--seed 6 --number-ios 300 --json 2>/dev/null)
rc=$?
[ $rc = 1 ] || fail "wrong seed: exit $rc, not 1"
echo "$out" | grep -q '"mismatches": 300,' || fail "wrong seed: $out"

kill -TERM "$pid"
wait "$pid"
rc=$?
pid=
[ $rc = 0 ] || fail "vqcowd exit $rc after SIGTERM: $(tail -3 "$dir/log")"
qemu-img check -q "$dir/img.qcow2" || fail "qemu-img check"
if [ $failures -gt 0 ]; then
	echo "$failures failure(s)"
	exit 1
fi
echo PASS
