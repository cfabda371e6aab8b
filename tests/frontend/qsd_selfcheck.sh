#!/usr/bin/env bash
# Self-check of vqcow-fe against the reference back-end, qemu-storage-daemon:
# the front-end must agree with QEMU's own vhost-user-blk server before we
# trust it to judge vqcowd. Skips (77) when qemu-storage-daemon is missing.
set -euo pipefail
fe=${1:?usage: qsd_selfcheck.sh VQCOW-FE}
command -v qemu-storage-daemon >/dev/null || { echo "SKIP: qemu-storage-daemon not installed"; exit 77; }
dir=$(mktemp -d)
qsd_pid=
cleanup() {
	[ -n "$qsd_pid" ] && kill "$qsd_pid" 2>/dev/null && wait "$qsd_pid" 2>/dev/null
	rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

truncate -s 16M "$dir/img"
qemu-storage-daemon \
	--blockdev driver=file,node-name=f,filename="$dir/img" \
	--blockdev driver=raw,node-name=d,file=f \
	--export type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path="$dir/sock",writable=on,num-queues=2 \
	>"$dir/qsd.log" 2>&1 &
qsd_pid=$!
for _ in $(seq 100); do [ -S "$dir/sock" ] && break; sleep 0.05; done
[ -S "$dir/sock" ] || { cat "$dir/qsd.log"; fail "qemu-storage-daemon did not start"; }

sock=$dir/sock
"$fe" info --json "$sock" >"$dir/info" || fail "info"
grep -q '"capacity": 32768' "$dir/info" || fail "capacity: $(cat "$dir/info")"
grep -q '"num_queues": 2' "$dir/info" || fail "num_queues"

n=303104 # 592 sectors: two full 128K chunks and a 40K tail
head -c $n /dev/urandom >"$dir/data"
"$fe" write "$sock" 8192 <"$dir/data" || fail "write"
"$fe" flush "$sock" || fail "flush"
"$fe" read "$sock" 8192 $n >"$dir/out" || fail "read"
cmp -n $n "$dir/data" "$dir/out" || fail "read back differs"
cmp -n $n -i 0:8192 "$dir/data" "$dir/img" || fail "image file differs"

for args in "" "--regions 2" "--regions 2 --separate-fds --add-mem-reg" \
	"--no-event-idx --layout hdr-split --segs 5" "--layout indirect,merge --segs 3 --queues 2 --queue 1" \
	"--no-indirect --layout merge --segs 4 --regions 3"; do
	# shellcheck disable=SC2086
	"$fe" $args verify "$sock" --size 1M --offset 1M --seed 3 >/dev/null || fail "verify $args"
done
"$fe" write-zeroes "$sock" 1M 64K || fail "write-zeroes"
cmp -n 65536 -i 1M:0 "$dir/img" /dev/zero || fail "write-zeroes did not zero"
"$fe" bench "$sock" --rw randrw --bs 4k --iodepth 8 --numjobs 2 --runtime 0.5 --json >"$dir/bench" ||
	fail "bench"
grep -q '"errors": 0' "$dir/bench" || fail "bench errors: $(cat "$dir/bench")"
echo "PASS"
