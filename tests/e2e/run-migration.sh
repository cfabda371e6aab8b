#!/usr/bin/env bash
# End-to-end live migration on shared storage: two QEMU processes on this
# machine, each with its own vqcowd on the same qcow2 image (the destination
# vqcowd and QEMU started with --incoming / -incoming), migrated over QMP.
#
#   run-migration.sh --vqcowd PATH --guest-dir DIR [--work-dir DIR] [--backing]
#                    [--img-dirs DIR_SRC,DIR_DST]
#
# 1. A failed migration: the destination QEMU is killed while the migration
#    runs; the source guest must go on and finish its job (fio randwrite
#    with crc32c verify, ext4 files) with PASS.
# 1b. A migration that fails after the switchover began: with QEMU's
#    pause-before-switchover capability the source stops the guest and its
#    rings (its vqcowd writes everything back, drops its metadata and
#    releases its locks) and waits; the destination QEMU is killed there and
#    the migration continued, so it fails and the source guest resumes: the
#    source vqcowd must take the image back (locks, metadata read afresh)
#    and the guest finish its job with PASS.
# 2. A migration in the middle of fio (job e2e): the guest must finish on the
#    destination with PASS and no I/O error on its console; the source vqcowd
#    must have let the image go, the destination taken it.
# Then `qemu-img check` must be clean. --backing puts the image on a backing
# file (an overlay). --img-dirs puts the image in DIR_SRC, which the source
# vqcowd opens there, while the destination vqcowd opens it through DIR_DST,
# another mount of the same shared directory (run-migration-gluster.sh: two
# FUSE mounts of one GlusterFS volume standing for two hosts). Exits 77 only
# when QEMU or qemu-img is not installed.
#
# Knobs for looping a flaky case by hand (the defaults are what ctest runs):
#   VQCOW_E2E_MIG_ONLY=2      run only scenario 2 (or "1", "1b", "1 2"...)
#   VQCOW_E2E_VQCOWD_ARGS=... extra vqcowd options (e.g. "--io-threads 1")
# A guest kernel panic or oops fails the test at once, with every log.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=../../contrib/guest/vm-lib.sh
. "$top/contrib/guest/vm-lib.sh"
VM_LOG_TAG=migration

vqcowd="" guest="" work="" backing=0 imgdirs=
while [ $# -gt 0 ]; do
	case "$1" in
	--vqcowd) vqcowd=$2; shift 2 ;;
	--guest-dir) guest=$2; shift 2 ;;
	--work-dir) work=$2; shift 2 ;;
	--backing) backing=1; shift ;;
	--img-dirs) imgdirs=$2; shift 2 ;;
	*) echo "usage: $0 --vqcowd PATH --guest-dir DIR [--work-dir DIR] [--backing]" \
		"[--img-dirs DIR_SRC,DIR_DST]" >&2; exit 2 ;;
	esac
done
for t in qemu-system-x86_64 qemu-img; do
	command -v $t >/dev/null 2>&1 || { echo "SKIP: $t not installed" >&2; exit 77; }
done
[ -x "$vqcowd" ] && [ -n "$guest" ] || { echo "need --vqcowd and --guest-dir" >&2; exit 2; }
[ -n "$work" ] || work=$(mktemp -d /tmp/vqcow-mig.XXXXXX)
rm -rf "$work" && mkdir -p "$work" || exit 1
vm_guest_build "$guest" || { vm_log "guest build failed"; exit 1; }
accel=$(vm_pick_accel "$guest")
vm_log "accel $accel, work dir $work"
# QEMU before 9.0 loses vCPU writes in a live migration under TCG: the fast
# path of its dirty bitmap sync (a RAM block whose size is a multiple of 64
# pages) clears the migration dirty bits without making the TCG TLB trap the
# next store again, so a page a vCPU writes after it was sent is never sent
# again and the destination guest runs on stale kernel memory (QEMU commit
# 03bfc2188f, "physmem: Fix migration dirty bitmap coherency with TCG memory
# access"; Debian 12's 7.2 lacks it). We saw `list_add corruption`, `BUG: Bad
# rss-counter state`, a GPF in kmem_cache_alloc_bulk after a completed
# migration, with QEMU's own virtio-blk as well, and with one vCPU too. A
# RAM size that is not a multiple of 256 KiB takes QEMU's per-page path,
# which does reset the TLB (counts in tests/e2e/README.md). VM_MEM set by
# hand wins.
qver=$(qemu-system-x86_64 --version | sed -n '1s/.*version \([0-9]*\)\..*/\1/p')
if [ "$accel" = tcg ] && [ "${qver:-0}" -lt 9 ] && [ -z "${VM_MEM:-}" ]; then
	VM_MEM=524280K # 512 MiB - 8 KiB (QEMU rounds -m up to 8 KiB)
	vm_log "QEMU $qver under TCG: guest RAM $VM_MEM, off the 256 KiB multiple (lost-write bug)"
fi

pids=()
cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	wait 2>/dev/null
}
trap cleanup EXIT
# rings_handed_over: each ring's index where the source stopped it last and
# where the destination started it last (its log lines), one line per ring;
# status 1 if they differ (the destination would run requests twice or skip
# some). A line missing (a log rate limit) only prints "?".
rings_handed_over() {
	local q s d rc=0
	for q in 0 1; do
		s=$(grep -o "vring $q stopped: next avail index [0-9]*" "$work/src.log" 2>/dev/null |
			tail -n 1 | grep -o '[0-9]*$')
		d=$(grep -o "vring $q starts: next avail index [0-9]*" "$work/dst.log" 2>/dev/null |
			tail -n 1 | grep -o '[0-9]*$')
		echo "ring $q: source stopped at avail ${s:-?}, destination started at ${d:-?}"
		[ -z "$s" ] || [ -z "$d" ] || [ "$s" = "$d" ] || rc=1
	done
	return $rc
}

fail() {
	vm_log "FAIL: $*"
	rings_handed_over >&2
	for f in "$work"/*.log; do echo "== $f"; tail -n 60 "$f"; done >&2
	exit 1
}

img=$work/disk.qcow2 img_dst=$work/disk.qcow2 base=$work/base.qcow2
if [ -n "$imgdirs" ]; then
	img=${imgdirs%%,*}/disk.qcow2 img_dst=${imgdirs#*,}/disk.qcow2 base=${imgdirs%%,*}/base.qcow2
	rm -f "$img" "$base"
	vm_log "image $img, the destination's view $img_dst"
fi
if [ $backing = 1 ]; then
	qemu-img create -q -f qcow2 "$base" 2G || exit 1
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$img" || exit 1
else
	qemu-img create -q -f qcow2 "$img" 2G || exit 1
fi

# qmp SOCK CMD [URI]: a command over QMP (migrate waits for the end).
qmp() {
	python3 - "$@" <<'PY'
import json, socket, sys, time
s = socket.socket(socket.AF_UNIX)
for i in range(100):
    try:
        s.connect(sys.argv[1]); break
    except OSError:
        time.sleep(0.1)
f = s.makefile('rw')
f.readline()
def cmd(name, **args):
    f.write(json.dumps({'execute': name, 'arguments': args}) + '\n'); f.flush()
    while True:
        r = json.loads(f.readline())
        if 'return' in r or 'error' in r:
            return r
cmd('qmp_capabilities')
if sys.argv[2] == 'migrate-pause':
    # argv[4]: the destination QEMU's pid, argv[5]: the source vqcowd's log.
    # Kill the destination once the source stopped its rings and let the
    # image go, then let the migration go on: it must fail.
    import os, signal
    r = cmd('migrate-set-capabilities',
            capabilities=[{'capability': 'pause-before-switchover', 'state': True}])
    assert 'return' in r, r
    r = cmd('migrate', uri=sys.argv[3])
    if 'error' in r:
        print('error', r['error']['desc']); sys.exit(0)
    st = ''
    for i in range(3000):
        st = cmd('query-migrate')['return'].get('status')
        if st in ('pre-switchover', 'completed', 'failed', 'cancelled'):
            break
        time.sleep(0.1)
    if st != 'pre-switchover':
        print('no pre-switchover state:', st); sys.exit(0)
    released = False
    for i in range(300):
        if 'locks released' in open(sys.argv[5]).read():
            released = True
            break
        time.sleep(0.1)
    print('pre-switchover, source image', 'released;' if released else 'NOT released;', end=' ')
    os.kill(int(sys.argv[4]), signal.SIGKILL)
    time.sleep(0.5)
    r = cmd('migrate-continue', state='pre-switchover')
    for i in range(3000):
        r = cmd('query-migrate')['return']
        if r.get('status') in ('completed', 'failed', 'cancelled'):
            print(r.get('status'), r.get('error-desc', ''))
            break
        time.sleep(0.1)
    cmd('migrate-set-capabilities',
        capabilities=[{'capability': 'pause-before-switchover', 'state': False}])
elif sys.argv[2] == 'migrate':
    # argv[4]: a pid to SIGKILL once RAM is being transferred (a failed migration)
    victim = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    r = cmd('migrate', uri=sys.argv[3])
    if 'error' in r:
        print('error', r['error']['desc']); sys.exit(0)
    for i in range(3000):
        r = cmd('query-migrate')['return']
        if victim and r.get('status') == 'active' and r.get('ram', {}).get('transferred', 0) > 1 << 20:
            import os, signal
            os.kill(victim, signal.SIGKILL)
            print('killed the destination after', r['ram']['transferred'], 'bytes;', end=' ')
            victim = 0
        if r.get('status') in ('completed', 'failed', 'cancelled'):
            print(r.get('status'), r.get('total-time', '-'), 'ms, downtime', r.get('downtime', '-'), r.get('error-desc', ''))
            break
        time.sleep(0.1)
else:
    r = cmd(sys.argv[2])
    print(r.get('return', {}).get('status', r))
PY
}

# daemon NAME [ARGS]: a vqcowd on $img at $work/NAME.sock
daemon() {
	local n=$1; shift
	local file=$img
	[ "$n" = dst ] && file=$img_dst
	# shellcheck disable=SC2086 # the extra options are split on purpose
	"$vqcowd" --socket-path "$work/$n.sock" --blk-file "$file" --num-queues 2 \
		${VQCOW_E2E_VQCOWD_ARGS:-} "$@" \
		>"$work/$n.log" 2>&1 &
	pids+=($!)
	eval "pid_$n=$!"
	vm_wait_socket "$work/$n.sock" "$!" 10 || fail "vqcowd $n did not start"
}

# guest NAME DAEMON [QEMU ARGS]: a QEMU on the daemon's socket, console in NAME.log
guest() {
	local n=$1 d=$2; shift 2
	vm_qemu_base "$accel"
	"${VM_QEMU[@]}" -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
		-append "console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=e2e vqcow.fiosize=$FIOSIZE" \
		-chardev "socket,id=c0,path=$work/$d.sock" \
		-device vhost-user-blk-pci,chardev=c0,num-queues=2 \
		-qmp "unix:$work/$n.qmp,server=on,wait=off" "$@" </dev/null >"$work/$n.log" 2>&1 &
	pids+=($!)
	eval "pid_$n=$!"
}

# wait_for FILE PATTERN SECONDS (a guest console: a kernel panic or oops
# there fails at once rather than after the timeout)
wait_for() {
	local i
	for ((i = 0; i < $3 * 10; i++)); do
		grep -q "$2" "$1" 2>/dev/null && return 0
		grep -q "Kernel panic\|BUG: \|Oops: \|general protection fault\|list_add corruption" \
			"$1" 2>/dev/null && fail "guest kernel crashed ($1): $(grep -m1 \
			"Kernel panic\|BUG: \|Oops: \|general protection fault\|list_add corruption" "$1")"
		sleep 0.1
	done
	return 1
}

# only SCENARIO: true when VQCOW_E2E_MIG_ONLY is unset or lists it
only() { [ -z "${VQCOW_E2E_MIG_ONLY:-}" ] || [[ " $VQCOW_E2E_MIG_ONLY " == *" $1 "* ]]; }

port=$((20000 + RANDOM % 20000))
daemon src
daemon dst --incoming

# ---- 1. a failed migration: the destination dies mid-way ----
if only 1; then
	FIOSIZE=128M
	guest qsrc src
	guest qdst dst -incoming "tcp:127.0.0.1:$port"
	wait_for "$work/qsrc.log" "STEP find-disk ok" 300 || fail "source guest did not find its disk"
	res=$(qmp "$work/qsrc.qmp" migrate "tcp:127.0.0.1:$port" "$pid_qdst")
	vm_log "migration with the destination killed: $res"
	case "$res" in killed*failed*) ;; *) fail "want a migration failed by the kill: $res" ;; esac
	st=$(qmp "$work/qsrc.qmp" query-status)
	vm_log "source guest: $st"
	[ "$st" = running ] || fail "the source guest is not running after the failed migration ($st)"
	wait_for "$work/qsrc.log" "VQCOW-GUEST: \(PASS\|FAIL\)" 900 || fail "source guest did not finish"
	grep -q "VQCOW-GUEST: PASS" "$work/qsrc.log" || fail "source guest failed after the failed migration"
	kill "$pid_qsrc" 2>/dev/null
	wait "$pid_qsrc" 2>/dev/null
	vm_log "failed migration: the source guest finished its job (PASS)"
fi

# ---- 1b. a failed migration after the source's rings stopped ----
if only 1b; then
	guest qsrc1 src
	guest qdst1 dst -incoming "tcp:127.0.0.1:$((port + 2))"
	wait_for "$work/qsrc1.log" "STEP find-disk ok" 300 || fail "source guest did not find its disk"
	sleep 2 # fio under way
	nact=$(grep -c "image active" "$work/src.log")
	res=$(qmp "$work/qsrc1.qmp" migrate-pause "tcp:127.0.0.1:$((port + 2))" "$pid_qdst1" "$work/src.log")
	vm_log "migration failed at the switchover: $res"
	case "$res" in "pre-switchover, source image released; failed"*) ;;
	*) fail "want the source's image released, then a failed migration: $res" ;; esac
	st=$(qmp "$work/qsrc1.qmp" query-status)
	vm_log "source guest: $st"
	[ "$st" = running ] || fail "the source guest is not running after the failed migration ($st)"
	for ((i = 0; i < 100; i++)); do
		[ "$(grep -c "image active" "$work/src.log")" -gt "$nact" ] && break
		sleep 0.1
	done
	[ "$(grep -c "image active" "$work/src.log")" -gt "$nact" ] ||
		fail "the source vqcowd did not take the image back"
	wait_for "$work/qsrc1.log" "VQCOW-GUEST: \(PASS\|FAIL\)" 900 || fail "source guest did not finish"
	grep -q "VQCOW-GUEST: PASS" "$work/qsrc1.log" ||
		fail "source guest failed after the migration failed at the switchover"
	grep -qi "I/O error\|blk_update_request\|critical medium" "$work/qsrc1.log" &&
		fail "I/O errors in the source guest's kernel log"
	grep -q "image active" "$work/dst.log" && fail "the destination vqcowd took the image"
	kill "$pid_qsrc1" 2>/dev/null
	wait "$pid_qsrc1" 2>/dev/null
	vm_log "failed switchover: the source took its image back; the guest finished its job (PASS)"
fi

# ---- 2. a migration under fio ----
FIOSIZE=300M
guest qsrc2 src
guest qdst2 dst -incoming "tcp:127.0.0.1:$((port + 1))"
wait_for "$work/qsrc2.log" "STEP find-disk ok" 300 || fail "source guest did not find its disk"
sleep 2 # fio randwrite + verify under way
res=$(qmp "$work/qsrc2.qmp" migrate "tcp:127.0.0.1:$((port + 1))")
vm_log "migration: $res"
case "$res" in completed*) ;; *) fail "migration did not complete: $res" ;; esac
grep -q "VQCOW-GUEST: STEP fio-verify" "$work/qsrc2.log" &&
	vm_log "note: fio had already finished on the source"
wait_for "$work/qdst2.log" "VQCOW-GUEST: \(PASS\|FAIL\)" 900 || fail "migrated guest did not finish"
grep -q "VQCOW-GUEST: PASS" "$work/qdst2.log" || fail "migrated guest failed"
rings_handed_over >&2 || fail "the destination did not resume the rings where the source stopped"
grep -qi "I/O error\|blk_update_request\|critical medium" "$work/qdst2.log" &&
	fail "I/O errors in the migrated guest's kernel log"
grep -q "locks released" "$work/src.log" || fail "the source vqcowd did not let the image go"
grep -q "image active" "$work/dst.log" || fail "the destination vqcowd did not take the image"
vm_log "migrated guest finished its job on the destination (PASS)"
kill "$pid_qsrc2" "$pid_qdst2" 2>/dev/null
wait "$pid_qsrc2" "$pid_qdst2" 2>/dev/null
kill "$pid_src" "$pid_dst"
wait "$pid_src" || fail "source vqcowd exit status"
wait "$pid_dst" || fail "destination vqcowd exit status"
qemu-img check "$img" >"$work/check.log" 2>&1 || fail "qemu-img check: $(cat "$work/check.log")"
vm_log "qemu-img check clean; PASS"
trap - EXIT
[ -n "$imgdirs" ] && rm -f "$img" "$base"
rm -rf "$work"
exit 0
