#!/bin/bash
# tests/integration/test_blkdev.sh VQCOWD VQCOW_FE — a qcow2 image on a block
# device (a loop device with direct I/O over a file whose old contents are a
# marker byte, 0xa5), grown by vqcowd with --blockdev-zero-ahead: the space
# ahead of the allocation cursor is zeroed by the device (write-zeroes,
# qcow2/alloc.c "Zero-ahead") while the guest writes.
#  1. Growth with verify: the whole image written with vqcow-fe's pattern
#     and read back, then 4K random writes at QD32 with --verify over it and
#     a FLUSH every 64; SIGTERM: exit 0; `qemu-img check` clean; no sector
#     of the image (qemu-img convert) is the marker's; the zeroing ran (the loop
#     device's backing file got holes past the image's metadata) and never
#     turned itself off (no "zero-ahead off" in the log).
#  2. Crashes: on a new image over the marker again, rounds of 4K random
#     writes (QD32, FLUSHes) into the empty image, vqcowd killed (kill -9)
#     mid-run, then restarted on the same image: `qemu-img check` finds
#     leaks at most (exit 0 or 3), no guest sector reads the marker, the
#     leaks are repaired (qemu-img check -r leaks) for the next round, and a
#     final verify pass over a range the rounds wrote reads back.
#  3. --user nobody (who cannot open the device node) with --incoming: the
#     engine opens read-write only when the ring starts, after the privilege
#     drop, and zero-ahead stays on (its description of the device was
#     opened with the image, before the drop: qcow2_opts.zah_keep); writes
#     with verify, qemu-img check.
#  4. Internal snapshots (--qmp, no zero-ahead): 500 random writes,
#     blockdev-snapshot-internal-sync succeeds (its clusters below the
#     device's end: the device's size is not the end of what is in use),
#     writes after it, `qemu-img check` clean, no "giving back the unused
#     tail" (a device is not cut). Then on a device cut at the image's end
#     (the whole image written, losetup --sizelimit): the snapshot fails
#     with ENOSPC, writes go on, `qemu-img check` finds no error, the
#     snapshot is not listed.
#  5. An internal snapshot under --user nobody with zero-ahead and --qmp: the
#     snapshot's edits and the engine's reopen after it happen after the
#     privilege drop, on the descriptions opened with the image; writes with
#     verify before and after, `qemu-img check` clean, no marker, zero-ahead
#     never off.
# Needs root (losetup) and a loop device whose queue offloads write-zeroes
# (write_zeroes_max_bytes > 0); skips (exit 77) otherwise.
set -u
vqcowd=$1
fe=$2
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
it_setup "vqcowd on a block device"
for t in qemu-img python3 losetup; do
	command -v $t >/dev/null || { echo "SKIP: $t not installed"; exit 77; }
done
[ "$(id -u)" = 0 ] || { echo "SKIP: losetup needs root"; exit 77; }
size=$((48 << 20))
devsize=$((size + (32 << 20)))
dev=
cleanup_dev() {
	[ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null
	pid=
	[ -z "$dev" ] || losetup -d "$dev" 2>/dev/null
	it_cleanup
}
trap cleanup_dev EXIT
truncate -s $devsize "$dir/backing"
if ! dev=$(losetup --direct-io=on -f --show "$dir/backing" 2>"$dir/losetup.err"); then
	dev=
	echo "SKIP: no loop device: $(cat "$dir/losetup.err")"
	exit 77
fi
wz=$(cat "/sys/block/$(basename "$dev")/queue/write_zeroes_max_bytes" 2>/dev/null || echo 0)
[ "${wz:-0}" -gt 0 ] || { echo "SKIP: $dev does not offload write-zeroes"; exit 77; }
sock=$dir/b.sock
log=$dir/vqcowd.log

# the device's old contents: the marker everywhere
stale() {
	python3 - "$dev" $devsize <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
buf = b"\xa5" * (1 << 20)
for off in range(0, int(sys.argv[2]), len(buf)):
    os.pwrite(fd, buf, off)
os.fsync(fd)
os.close(fd)
EOF
}

# qemu-img check DEV; a killed vqcowd's image lock goes only when the kernel
# has torn its io_uring down (registered files): retry while it is held.
check() {
	local rc
	for _ in $(seq 100); do
		qemu-img check -q "$dev" >"$dir/check.out" 2>&1
		rc=$?
		grep -q "lock" "$dir/check.out" || break
		sleep 0.1
	done
	[ $rc = 0 ] || [ $rc = 3 ] || cat "$dir/check.out" >&2
	return $rc
}

serve() {
	rm -f "$sock"
	"$vqcowd" --socket-path "$sock" --blk-file "$dev" --format qcow2 --blockdev-zero-ahead \
		>>"$log" 2>&1 &
	pid=$!
	it_wait_serving "$pid" "$sock" "$log" vqcowd
}

# no guest sector of the image reads the marker (512 bytes of it: the
# pattern vqcow-fe writes is pseudo-random, a whole sector of one byte never)
no_marker() {
	qemu-img convert -f qcow2 -O raw "$dev" "$dir/img.raw" || { fail "$1: convert"; return; }
	python3 - "$dir/img.raw" <<'EOF' || fail "$1: the device's old bytes show in the image"
import sys
with open(sys.argv[1], "rb") as f:
    off = 0
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        i = b.find(b"\xa5" * 512)
        while i >= 0 and i % 512:
            i = b.find(b"\xa5" * 512, i + 1)
        if i >= 0:
            print("guest sector 0x%x reads 0xa5" % (off + i))
            sys.exit(1)
        off += len(b)
EOF
	rm -f "$dir/img.raw"
}

# 1. growth with verify
stale
qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" $size
serve || it_finish "$log"
"$fe" verify "$sock" --size $size --bs 1M >/dev/null || fail "verify of the whole image"
"$fe" bench "$sock" --rw randwrite --bs 4K --iodepth 32 --size $size --number-ios 8000 \
	--verify --seed 3 --flush-every 64 >/dev/null || fail "random writes with verify"
"$fe" bench "$sock" --rw randread --bs 4K --iodepth 32 --size $size --number-ios 4000 \
	--verify --seed 3 >/dev/null || fail "random reads with verify"
it_stop
check || fail "qemu-img check after growth"
no_marker growth
grep -q "zero-ahead off\|zeroing ahead on the device failed" "$log" &&
	fail "zero-ahead turned itself off: $(grep zero "$log")"
# the loop device passed the zeroing on to its file: holes past the metadata
blocks=$(stat -c %b "$dir/backing")
[ $((blocks * 512)) -lt $devsize ] || fail "no zeroing reached the device (${blocks} blocks)"

# 2. crashes
stale
qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" $size
: >"$log"
for round in 1 2 3 4 5; do
	serve || break
	"$fe" bench "$sock" --rw randwrite --bs 4K --iodepth 32 --size $size --runtime 3 \
		--flush-every 32 --seed $round >/dev/null 2>&1 &
	bpid=$!
	sleep "0.$((3 + round))"
	kill -9 "$pid"
	wait "$pid" 2>/dev/null
	pid=
	wait "$bpid" 2>/dev/null
	check
	rc=$?
	[ $rc = 0 ] || [ $rc = 3 ] || fail "round $round: qemu-img check exit $rc after kill -9"
	no_marker "round $round"
	# the leaks (up to a reserve of 64 MiB a crash) repaired, or the
	# device fills up after a few rounds
	qemu-img check -q -r leaks "$dev" >/dev/null 2>&1 || fail "round $round: repairing leaks"
done
serve || it_finish "$log"
"$fe" verify "$sock" --size $((8 << 20)) --offset $((16 << 20)) --bs 64K >/dev/null ||
	fail "verify after the crashes"
it_stop
check
rc=$?
[ $rc = 0 ] || [ $rc = 3 ] || fail "qemu-img check exit $rc at the end"
no_marker end

# 3. --user with --incoming: the engine opened read-write after the drop
stale
qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" $size
: >"$log"
rm -f "$sock"
"$vqcowd" --socket-path "$sock" --blk-file "$dev" --format qcow2 --blockdev-zero-ahead \
	--user nobody --incoming >>"$log" 2>&1 &
pid=$!
it_wait_serving "$pid" "$sock" "$log" vqcowd || it_finish "$log"
"$fe" bench "$sock" --rw randwrite --bs 4K --iodepth 32 --size $size --number-ios 4000 \
	--verify --seed 5 --flush-every 64 >/dev/null || fail "--user: random writes with verify"
it_stop
check || fail "qemu-img check after --user"
no_marker user
grep -q "zero-ahead off\|zeroing ahead on the device failed" "$log" &&
	fail "--user: zero-ahead turned itself off: $(grep zero "$log")"

# 4. internal snapshots on the device (--qmp, no zero-ahead)
qmp() { # NAME ok|fail: blockdev-snapshot-internal-sync NAME, its outcome
	PYTHONPATH="$(dirname "$0")" python3 - "$dir/q.sock" "$1" "$2" <<'EOF'
import sys
from qmplib import Qmp
r = Qmp(sys.argv[1]).cmd("blockdev-snapshot-internal-sync",
                         {"device": "disk0", "name": sys.argv[2]})
print(r)
sys.exit(0 if ("return" in r) == (sys.argv[3] == "ok") else 1)
EOF
}
serve_qmp() {
	rm -f "$sock" "$dir/q.sock"
	"$vqcowd" --socket-path "$sock" --blk-file "$dev" --format qcow2 --qmp "$dir/q.sock" \
		>>"$log" 2>&1 &
	pid=$!
	it_wait_serving "$pid" "$sock" "$log" vqcowd
}
# 4a. room on the device: the snapshot fits below its end
qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" $size
: >"$log"
serve_qmp || it_finish "$log"
"$fe" bench "$sock" --rw randwrite --bs 4K --size $((8 << 20)) --number-ios 500 --verify \
	--seed 7 >/dev/null || fail "snapshot: writes before"
qmp s1 ok >"$dir/qmp.out" || fail "snapshot on the device: $(cat "$dir/qmp.out")"
"$fe" bench "$sock" --rw randwrite --bs 4K --size $((8 << 20)) --number-ios 500 --verify \
	--seed 8 >/dev/null || fail "snapshot: writes after"
it_stop
check || fail "qemu-img check after the snapshot on the device"
qemu-img snapshot -l "$dev" | grep -q " s1 " || fail "snapshot s1 not listed"
grep -q "giving back the unused tail" "$log" && fail "the device's tail: $(grep tail "$log")"
# 4b. a full device: the image written whole, the device cut at its end (a
# loop device with --sizelimit over the same file): the snapshot finds no
# room, fails (ENOSPC), and the image is as before and stays usable
qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" $size
: >"$log"
serve_qmp || it_finish "$log"
"$fe" bench "$sock" --rw write --bs 1M --size $size --number-ios $((size >> 20)) >/dev/null ||
	fail "full: writing the image"
it_stop
end=$(qemu-img check --output=json "$dev" | python3 -c \
	'import json,sys; print(json.load(sys.stdin)["image-end-offset"])')
losetup -d "$dev"
if ! dev=$(losetup --direct-io=on --sizelimit "$end" -f --show "$dir/backing"); then
	dev=
	fail "no loop device of $end bytes"
	it_finish "$log"
fi
serve_qmp || it_finish "$log"
qmp s2 fail >"$dir/qmp.out" || fail "snapshot on the full device did not fail: $(cat "$dir/qmp.out")"
grep -q "No space left on device\|no room" "$dir/qmp.out" ||
	fail "snapshot on the full device: not ENOSPC: $(cat "$dir/qmp.out")"
"$fe" bench "$sock" --rw randwrite --bs 4K --size $((8 << 20)) --number-ios 500 --verify \
	--seed 9 >/dev/null || fail "full: writes after the failed snapshot"
it_stop
check
rc=$?
[ $rc = 0 ] || [ $rc = 3 ] || fail "qemu-img check exit $rc after the failed snapshot"
qemu-img snapshot -l "$dev" | grep -q " s2 " && fail "the failed snapshot s2 is listed"
grep -q "giving back the unused tail" "$log" && fail "the device's tail: $(grep tail "$log")"

# 5. an internal snapshot under --user with zero-ahead: the snapshot's own
# opening of the image and the engine's reopen after it happen after the
# privilege drop (the descriptions opened with the image serve both)
losetup -d "$dev"
if ! dev=$(losetup --direct-io=on -f --show "$dir/backing"); then
	dev=
	fail "no loop device over the whole file"
	it_finish "$log"
fi
stale
qemu-img create -q -f qcow2 -o cluster_size=65536 "$dev" $size
: >"$log"
rm -f "$sock" "$dir/q.sock"
"$vqcowd" --socket-path "$sock" --blk-file "$dev" --format qcow2 --blockdev-zero-ahead \
	--user nobody --qmp "$dir/q.sock" >>"$log" 2>&1 &
pid=$!
it_wait_serving "$pid" "$sock" "$log" vqcowd || it_finish "$log"
"$fe" bench "$sock" --rw randwrite --bs 4K --iodepth 32 --size $((8 << 20)) --number-ios 2000 \
	--verify --seed 5 --flush-every 64 >/dev/null || fail "--user: writes before the snapshot"
PYTHONPATH="$(dirname "$0")" python3 - "$dir/q.sock" <<'EOF' || fail "--user: internal snapshot: $(tail -3 "$log")"
import sys
from qmplib import Qmp
Qmp(sys.argv[1]).ret("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s1"})
EOF
"$fe" bench "$sock" --rw randwrite --bs 4K --iodepth 32 --size $((8 << 20)) --number-ios 2000 \
	--verify --seed 6 --flush-every 64 >/dev/null || fail "--user: writes after the snapshot"
it_stop
check || fail "qemu-img check after --user"
no_marker user
grep -q "zero-ahead off\|zeroing ahead on the device failed" "$log" &&
	fail "--user: zero-ahead turned itself off: $(grep zero "$log")"
it_finish "$log"
