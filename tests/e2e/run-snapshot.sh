#!/usr/bin/env bash
# End-to-end online internal snapshot: a real QEMU guest writes
# sequence-numbered 4 KiB blocks one after the other (job snapseq: block i
# holds "VQCOWSEQ i", each completion printed as "SEQ-DONE i" once the
# O_DIRECT write returned) while fio writes at random with verify elsewhere;
# meanwhile the host takes a snapshot with `vqcowctl snapshot create`.
#
#   run-snapshot.sh --vqcowd PATH --vqcowctl PATH --guest-dir DIR [--work-dir DIR]
#
# Checks, with qemu-img as the oracle: the snapshot (qemu-img convert -l)
# holds blocks 1..k of the sequence and nothing after k (a prefix: no write
# that started after a missing one), with k >= the last SEQ-DONE the host saw
# before sending the command (every write completed before it is there);
# the active image holds all N blocks; the guest's fio verify passes; vqcowd
# exits 0 on SIGTERM; `qemu-img check` is clean. Exits 77 only when QEMU or
# qemu-img is not installed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=../../contrib/guest/vm-lib.sh
. "$top/contrib/guest/vm-lib.sh"
VM_LOG_TAG=snapshot

vqcowd="" ctl="" guest="" work="" seq=200
while [ $# -gt 0 ]; do
	case "$1" in
	--vqcowd) vqcowd=$2; shift 2 ;;
	--vqcowctl) ctl=$2; shift 2 ;;
	--guest-dir) guest=$2; shift 2 ;;
	--work-dir) work=$2; shift 2 ;;
	*) echo "usage: $0 --vqcowd PATH --vqcowctl PATH --guest-dir DIR [--work-dir DIR]" >&2; exit 2 ;;
	esac
done
for t in qemu-system-x86_64 qemu-img python3; do
	command -v $t >/dev/null 2>&1 || { echo "SKIP: $t not installed" >&2; exit 77; }
done
[ -x "$vqcowd" ] && [ -x "$ctl" ] && [ -n "$guest" ] || { echo "need --vqcowd, --vqcowctl, --guest-dir" >&2; exit 2; }
[ -n "$work" ] || work=$(mktemp -d /tmp/vqcow-snap.XXXXXX)
rm -rf "$work" && mkdir -p "$work" || exit 1
work=$(cd "$work" && pwd)
vm_guest_build "$guest" || { vm_log "guest build failed"; exit 1; }
accel=$(vm_pick_accel "$guest")
vm_log "accel $accel, work dir $work"

sockdir=$(mktemp -d /tmp/vqcow-snap-sock.XXXXXX)
sock=$sockdir/blk.sock
qmp=$sockdir/qmp.sock
img=$work/disk.qcow2
con=$work/console.log
backend_pid="" qemu_pid=""
cleanup() {
	[ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
	[ -n "$backend_pid" ] && kill "$backend_pid" 2>/dev/null
	wait 2>/dev/null
	rm -rf "$sockdir"
}
trap cleanup EXIT
fail() {
	vm_log "FAIL: $*"
	echo "----- guest console -----" >&2
	tr -d '\r' <"$con" | grep -v 'SEQ-DONE' >&2
	echo "----- vqcowd log (tail) -----" >&2
	tail -n 30 "$work/vqcowd.log" >&2
	exit 1
}

qemu-img create -q -f qcow2 "$img" 256M || exit 1
vm_backend_start vqcowd "$sock" "$img" qcow2 "$work/vqcowd.log" "$vqcowd" --qmp "$qmp"
backend_pid=$VM_BACKEND_PID
vm_wait_socket "$sock" "$backend_pid" 10 || fail "vqcowd did not start"
vm_wait_socket "$qmp" "$backend_pid" 10 || fail "no QMP socket"

vm_qemu_base "$accel"
"${VM_QEMU[@]}" -chardev "socket,id=c0,path=$sock" \
	-device vhost-user-blk-pci,chardev=c0,num-queues=2 \
	-kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
	-append "console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=snapseq vqcow.seq=$seq" \
	</dev/null >"$con" 2>&1 &
qemu_pid=$!

last_done() { tr -d '\r' <"$con" | sed -n 's/^VQCOW-GUEST: SEQ-DONE \([0-9]*\)$/\1/p' | tail -n 1; }

# Take the snapshot once a third of the sequence is written.
deadline=$(($(date +%s) + 600))
before=""
while kill -0 "$qemu_pid" 2>/dev/null && [ "$(date +%s)" -lt $deadline ]; do
	d=$(last_done)
	if [ -n "$d" ] && [ "$d" -ge $((seq / 3)) ]; then
		before=$d
		break
	fi
	sleep 0.1
done
[ -n "$before" ] || fail "the guest never reached SEQ-DONE $((seq / 3))"
t0=$(date +%s.%N)
out=$("$ctl" -s "$qmp" snapshot create mid 2>&1) || fail "vqcowctl snapshot create: $out"
t1=$(date +%s.%N)
after=$(last_done)
vm_log "snapshot 'mid' taken in $(echo "$t1 - $t0" | bc 2>/dev/null || echo '?') s: SEQ-DONE $before seen before the command, $after right after the reply"

while kill -0 "$qemu_pid" 2>/dev/null && [ "$(date +%s)" -lt $deadline ]; do sleep 0.5; done
kill "$qemu_pid" 2>/dev/null
wait "$qemu_pid" 2>/dev/null
qemu_pid=""
tr -d '\r' <"$con" >"$con.txt"
grep -q "^VQCOW-GUEST: PASS snapseq" "$con.txt" || fail "no PASS from the guest"
grep -E 'I/O error|blk_update_request|critical' "$con.txt" && fail "I/O errors in the guest's kernel log"

vm_stop "$backend_pid" 20
backend_pid=""
[ "$VM_STOP_STATUS" = 0 ] || fail "vqcowd exit status $VM_STOP_STATUS on SIGTERM"
qemu-img check "$img" >"$work/check.txt" 2>&1 || { cat "$work/check.txt" >&2; fail "qemu-img check"; }
qemu-img snapshot -l "$img" | grep -q ' mid ' || fail "snapshot 'mid' not listed by qemu-img"
qemu-img convert -O raw -l snapshot.name=mid "$img" "$work/mid.raw" || fail "qemu-img convert -l"
qemu-img convert -O raw "$img" "$work/active.raw" || fail "qemu-img convert"

python3 - "$work/mid.raw" "$work/active.raw" "$seq" "$before" <<'EOF' || fail "snapshot content"
import sys
snap, active, n, before = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def blocks(path):
    out = []
    with open(path, "rb") as f:
        for i in range(1, n + 1):
            f.seek(i * 4096)
            b = f.read(4096)
            want = ("VQCOWSEQ %08d\n" % i).encode().ljust(4096, b"\0")
            out.append("seq" if b == want else "zero" if b == bytes(4096) else "other")
    return out

a = blocks(active)
assert a == ["seq"] * n, "active image: blocks not all written: %s" % a
s = blocks(snap)
assert "other" not in s, "snapshot: a torn or foreign block at %d" % (s.index("other") + 1)
k = s.count("seq")
assert s == ["seq"] * k + ["zero"] * (n - k), "snapshot is not a prefix: %s" % s
assert k >= before, "snapshot holds %d blocks, but %d had completed before the command" % (k, before)
print("snapshot holds blocks 1..%d (%d completed before the command); active holds all %d"
      % (k, before, n))
EOF
vm_log "PASS: the snapshot holds exactly a prefix of the completed writes; qemu-img check clean"
exit 0
