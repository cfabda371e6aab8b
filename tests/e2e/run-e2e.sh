#!/usr/bin/env bash
# End-to-end test: a real QEMU guest (Debian kernel + busybox/fio initramfs)
# uses a disk served over vhost-user-blk by vqcowd (or qemu-storage-daemon, to
# validate the harness itself), and checks every byte it wrote.
#
#   run-e2e.sh [options]
#     --backend vqcowd|qsd   who serves the disk (default vqcowd)
#     --vqcowd PATH          the vqcowd binary (needed for --backend vqcowd)
#     --format raw|qcow2     image format (default raw)
#     --size SIZE            image size (default 256M)
#     --work-dir DIR         logs, socket and image (default: a new temp dir)
#     --guest-dir DIR        where the guest is built/cached (default WORK/guest)
#     --job NAME             guest job (default e2e; see contrib/guest/jobs/);
#                            readcheck fills the image with known data first
#     --fio-size SIZE        bytes each guest fio job writes (default 64M)
#     --accel auto|kvm|tcg   default auto: KVM if it really boots the guest
#     --timeout SECONDS      guest run time limit (default 600 on TCG, 300 on KVM)
#     --reconnect            after the job, boot a second QEMU against the same
#                            daemon and re-read the files (job e2e only)
#     --restart              after the job, restart the backend (SIGTERM, must
#                            exit 0) and re-read the files in a second guest
#     --kill-frontend        first boot a guest under heavy I/O and kill -9 its
#                            QEMU; the same daemon must then serve the job
#     --kill-backend         first boot a guest under heavy I/O and kill -9 the
#                            daemon; the image must pass qemu-img check (leaks
#                            allowed) and a new daemon must serve the job
#     --kill-under-guest N   QEMU connects with reconnect=1; while the guest job
#                            runs, kill -9 the daemon N times, a second apart
#                            (VQCOW_E2E_KILL_DELAY), the first a second after
#                            the guest found its disk, while fio writes
#                            and start a new one on the same socket at once:
#                            the guest must finish its job (fio verify, file
#                            system checks) with no I/O error in its kernel log
#     --read-only            export read-only (implies --job readcheck)
#     --resize SIZE          (vqcowd) job resize: once the guest wrote its
#                            first MiB, grow the disk to SIZE with QMP
#                            block_resize (vqcowctl); the guest must see SIZE
#                            without a reboot and write/verify the new area;
#                            then qemu-img check and info (size) on the host
#     --socket-activation    start vqcowd through systemd-socket-activate, which
#                            passes the listening socket as fd 3 (vqcowd --fd 3)
#     --keep                 keep the work dir even when the test passes
#     -- ARGS...             extra arguments for the backend
#
# Fails on: a FAIL marker or no PASS marker on the guest console, a guest
# timeout, the backend exiting during the run, the backend not exiting with
# status 0 on SIGTERM afterwards, or (job e2e) the image's file system not
# holding exactly the files the guest wrote (host-side e2fsck + checksums).
# Exits 77 (skip) only when qemu-system-x86_64 is not installed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=../../contrib/guest/vm-lib.sh
. "$top/contrib/guest/vm-lib.sh"
VM_LOG_TAG=e2e

backend=vqcowd
vqcowd=""
format=raw
size=256M
work=""
guest=""
job=e2e
fio_size=64M
accel=auto
timeout_s=""
keep=0
reconnect=0
restart=0
activation=0
kill_frontend=0
kill_backend=0
kill_under_guest=0
read_only=0
resize=""
resized=0
extra=()
while [ $# -gt 0 ]; do
	case "$1" in
	--backend) backend=$2; shift 2 ;;
	--vqcowd) vqcowd=$2; shift 2 ;;
	--format) format=$2; shift 2 ;;
	--size) size=$2; shift 2 ;;
	--work-dir) work=$2; shift 2 ;;
	--guest-dir) guest=$2; shift 2 ;;
	--job) job=$2; shift 2 ;;
	--fio-size) fio_size=$2; shift 2 ;;
	--accel) accel=$2; shift 2 ;;
	--timeout) timeout_s=$2; shift 2 ;;
	--keep) keep=1; shift ;;
	--reconnect) reconnect=1; shift ;;
	--restart) restart=1; shift ;;
	--kill-frontend) kill_frontend=1; shift ;;
	--kill-backend) kill_backend=1; shift ;;
	--kill-under-guest) kill_under_guest=${2:?}; shift 2 ;;
	--read-only) read_only=1; shift ;;
	--resize) resize=$2; shift 2 ;;
	--socket-activation) activation=1; shift ;;
	--) shift; extra=("$@"); break ;;
	-h | --help) sed -n '2,44p' "$0"; exit 0 ;;
	*) echo "run-e2e: unknown argument $1" >&2; exit 2 ;;
	esac
done

fail() {
	vm_log "FAIL: $*"
	result=1
}

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
	echo "SKIP: qemu-system-x86_64 not installed" >&2
	exit 77
fi
case "$backend" in
vqcowd) [ -n "$vqcowd" ] || { echo "run-e2e: --vqcowd PATH is required" >&2; exit 2; } ;;
qsd) command -v qemu-storage-daemon >/dev/null || { echo "run-e2e: qemu-storage-daemon missing" >&2; exit 1; } ;;
*) echo "run-e2e: --backend must be vqcowd or qsd" >&2; exit 2 ;;
esac
case "$format" in
raw | qcow2) ;;
*) echo "run-e2e: --format must be raw or qcow2" >&2; exit 2 ;;
esac
[ -z "$vqcowd" ] || vqcowd=$(readlink -f "$vqcowd")

if [ -z "$work" ]; then
	work=$(mktemp -d "${TMPDIR:-/tmp}/vqcow-e2e.XXXXXX")
else
	rm -rf "$work"
	mkdir -p "$work"
fi
work=$(cd "$work" && pwd)
[ -n "$guest" ] || guest=$work/guest
img=$work/disk.$format
# UNIX socket paths are limited to 107 bytes: keep the socket short.
sockdir=$(mktemp -d "${TMPDIR:-/tmp}/vqcow-e2e-sock.XXXXXX")
sock=$sockdir/blk.sock
backend_log=$work/backend.log
console=$work/console.log

backend_pid=""
qemu_pid=""
result=0
cleanup() {
	local st=$?
	trap - EXIT INT TERM
	if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
		vm_stop "$qemu_pid" 10
	fi
	if [ -n "$backend_pid" ] && kill -0 "$backend_pid" 2>/dev/null; then
		vm_stop "$backend_pid" 10
	fi
	rm -rf "$sockdir"
	if [ "$st" = 0 ] && [ $keep = 0 ]; then
		rm -f "$img" "$work/image.raw"
		rm -rf "$work/files"
	elif [ -d "$work" ]; then
		vm_log "logs and image kept in $work"
	fi
	exit "$st"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for tool in flock cpio gzip fio busybox mke2fs e2fsck debugfs qemu-img sha256sum timeout; do
	command -v "$tool" >/dev/null 2>&1 || { vm_log "missing tool '$tool' (run contrib/deps.sh)"; exit 1; }
done

# --- guest and accelerator ---------------------------------------------------------
vm_log "building the guest in $guest"
vm_guest_build "$guest" || { vm_log "guest build failed"; exit 1; }
if [ "$accel" = auto ]; then
	accel=$(vm_pick_accel "$guest")
fi
[ -n "$timeout_s" ] || { [ "$accel" = kvm ] && timeout_s=300 || timeout_s=600; }
vm_log "accelerator: $accel, guest timeout ${timeout_s}s"

# --- image and backend ---------------------------------------------------------------
[ $read_only = 1 ] && job=readcheck
case "$format" in
raw) truncate -s "$size" "$img" ;;
qcow2) qemu-img create -q -f qcow2 "$img" "$size" ;;
esac || { vm_log "cannot create $img"; exit 1; }
job_args=""
if [ "$job" = readcheck ]; then
	# Known content: random 1 MiB chunks at every third MiB plus a 4 KiB run
	# at odd places, the rest left as holes (zeroes; unallocated in qcow2).
	seed=$work/content.raw
	truncate -s "$size" "$seed"
	mib=$(($(stat -c %s "$seed") / 1048576))
	for ((i = 0; i < mib; i += 3)); do
		dd if=/dev/urandom of="$seed" bs=1M seek=$i count=1 conv=notrunc status=none
		dd if=/dev/urandom of="$seed" bs=4096 seek=$((i * 256 + 256 + 17)) count=1 conv=notrunc status=none
	done
	if [ "$format" = qcow2 ]; then
		qemu-img convert -q -f raw -O qcow2 "$seed" "$img"
	else
		cp --sparse=always "$seed" "$img"
	fi
	content_sum=$(sha256sum <"$seed" | cut -d' ' -f1)
	job_args="vqcow.sha256=$content_sum vqcow.expect_ro=$read_only"
	vm_log "readcheck: image filled, sha256 $content_sum"
fi
[ $read_only = 1 ] && export VM_READONLY=1
qmp_sock=$sockdir/qmp.sock
if [ -n "$resize" ]; then
	[ "$backend" = vqcowd ] || { echo "run-e2e: --resize needs --backend vqcowd" >&2; exit 2; }
	vqctl=$(dirname "$vqcowd")/vqcowctl
	[ -x "$vqctl" ] || { echo "run-e2e: $vqctl not found" >&2; exit 1; }
	resize_bytes=$(numfmt --from=iec "$resize") || exit 2
	job=resize
	job_args="vqcow.newsize=$resize_bytes"
	extra+=(--qmp "$qmp_sock")
fi

vm_log "starting $backend on $img ($format, $size)"
if [ $activation = 1 ]; then
	[ "$backend" = vqcowd ] || { echo "run-e2e: --socket-activation needs --backend vqcowd" >&2; exit 2; }
	command -v systemd-socket-activate >/dev/null || { echo "SKIP: systemd-socket-activate not installed" >&2; exit 77; }
	export VM_ACTIVATE=1
fi
vm_backend_start "$backend" "$sock" "$img" "$format" "$backend_log" "$vqcowd" "${extra[@]}" || exit 1
backend_pid=$VM_BACKEND_PID
if ! vm_wait_socket "$sock" "$backend_pid" 20; then
	vm_log "the backend did not create $sock; its log:"
	cat "$backend_log" >&2
	exit 1
fi

# kill_restart_backend: kill -9 the daemon with the guest running and start a
# new one on the same socket and image (QEMU reconnects, resubmits what was in
# flight through the inflight region). The kernel drops a killed daemon's image
# locks once its io_uring is gone (tens of ms): the new one retries until then.
kill_restart_backend() {
	local n
	kill -KILL "$backend_pid"
	wait "$backend_pid"
	backend_pid=""
	vm_log "killed the daemon under the running guest (its last step: $(tr -d '\r' <"$con" | grep -o 'STEP [a-z-]* [a-zA-Z]*' | tail -n1))"
	[ -f "$backend_log" ] && cat "$backend_log" >>"$backend_log.killed"
	# The dead daemon's socket file stays; a new daemon replaces it, but
	# vm_wait_socket would take the stale file for the new socket and miss a
	# daemon that exits at once (its image still locked by the dead one).
	# Without the file, the path appears only when a new daemon listens.
	rm -f "$sock"
	for n in $(seq 40); do
		vm_backend_start "$backend" "$sock" "$img" "$format" "$backend_log" "$vqcowd" "${extra[@]}" || return 1
		backend_pid=$VM_BACKEND_PID
		if vm_wait_socket "$sock" "$backend_pid" 20; then
			vm_log "a new daemon serves the socket (try $n)"
			return 0
		fi
		kill -0 "$backend_pid" 2>/dev/null && kill -KILL "$backend_pid"
		wait "$backend_pid" 2>/dev/null
		backend_pid=""
		sleep 0.05
	done
	cat "$backend_log" >&2
	fail "no new daemon came up after the kill"
	return 1
}

# --- guest runs ---------------------------------------------------------------------------
# boot_guest JOB CONSOLE: boot the guest against the backend with vqcow.job=JOB,
# its serial console into CONSOLE (and CONSOLE.txt without CRs); checks the
# markers and kernel messages, calling fail() for each problem. Returns 0 when
# this boot passed.
boot_guest() {
	local gjob=$1 con=$2 append start qemu_st before=$result
	local chardev="socket,id=c0,path=$sock" kills=0 next_kill=""
	[ "$kill_under_guest" -gt 0 ] && chardev="$chardev,reconnect=1"
	vm_qemu_base "$accel"
	append="console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=$gjob vqcow.fiosize=$fio_size $job_args"
	vm_log "booting the guest (job $gjob)"
	start=$(date +%s)
	timeout --kill-after=10 "$timeout_s" "${VM_QEMU[@]}" \
		-chardev "$chardev" \
		-device vhost-user-blk-pci,chardev=c0,num-queues=2 \
		-kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" -append "$append" \
		</dev/null >"$con" 2>&1 &
	qemu_pid=$!
	backend_died=""
	while kill -0 "$qemu_pid" 2>/dev/null; do
		if [ -n "$resize" ] && [ $resized = 0 ] && grep -q 'VQCOW-GUEST: STEP resize-ready' "$con"; then
			resized=1
			if "$vqctl" -s "$qmp_sock" resize "$resize_bytes" >"$work/resize.log" 2>&1; then
				vm_log "block_resize to $resize_bytes bytes with the guest running: $(cat "$work/resize.log")"
			else
				fail "block_resize failed: $(cat "$work/resize.log")"
			fi
		fi
		if [ "$kills" -lt "$kill_under_guest" ] && [ -n "$backend_pid" ]; then
			if [ -z "$next_kill" ] && grep -q 'VQCOW-GUEST: STEP find-disk ok' "$con"; then
				next_kill=$(($(date +%s) + ${VQCOW_E2E_KILL_DELAY:-1}))
			fi
			if [ -n "$next_kill" ] && [ "$(date +%s)" -ge "$next_kill" ]; then
				kill_restart_backend || break
				kills=$((kills + 1))
				next_kill=$(($(date +%s) + ${VQCOW_E2E_KILL_DELAY:-1}))
			fi
		fi
		if ! kill -0 "$backend_pid" 2>/dev/null; then
			wait "$backend_pid"
			backend_died=$?
			backend_pid=""
			vm_log "the backend exited (status $backend_died) while the guest was running"
			vm_stop "$qemu_pid" 5
			break
		fi
		sleep 0.5
	done
	wait "$qemu_pid"
	qemu_st=$?
	qemu_pid=""
	elapsed=$(($(date +%s) - start))

	tr -d '\r' <"$con" >"$con.txt"
	echo "----- guest console, job $gjob ($elapsed s) -----" >&2
	grep -v '^VQCOW-GUEST: FILE ' "$con.txt" >&2
	echo "----- end of guest console ($(grep -c '^VQCOW-GUEST: FILE ' "$con.txt") FILE lines not shown) -----" >&2

	if [ -n "$backend_died" ]; then
		fail "backend ($backend) exited with status $backend_died during the run"
	fi
	if [ "$kills" -lt "$kill_under_guest" ]; then
		fail "the daemon was killed $kills time(s) under the guest, not $kill_under_guest (job ended first?)"
	elif [ "$kill_under_guest" -gt 0 ]; then
		vm_log "the daemon was killed -9 and restarted $kills time(s) under the running guest"
	fi
	if [ "$qemu_st" = 124 ] || [ "$qemu_st" = 137 ]; then
		fail "guest timed out after ${timeout_s}s"
	elif [ "$qemu_st" != 0 ] && [ -z "$backend_died" ]; then
		fail "qemu exited with status $qemu_st"
	fi
	if grep -q '^VQCOW-GUEST: FAIL' "$con.txt"; then
		fail "guest reported: $(grep '^VQCOW-GUEST: FAIL' "$con.txt" | head -n3 | tr '\n' ' ')"
	fi
	if grep -q '^VQCOW-GUEST: STEP.*FAILED' "$con.txt"; then
		fail "guest step failed: $(grep '^VQCOW-GUEST: STEP.*FAILED' "$con.txt" | head -n3 | tr '\n' ' ')"
	fi
	if ! grep -qx "VQCOW-GUEST: PASS $gjob" "$con.txt"; then
		fail "no 'VQCOW-GUEST: PASS $gjob' on the guest console"
	fi
	if grep -qE "$kernel_errors" "$con.txt"; then
		fail "kernel reported errors: $(grep -E "$kernel_errors" "$con.txt" | head -n3 | tr '\n' ' ')"
	fi
	[ "$result" = "$before" ]
}
kernel_errors='Kernel panic|I/O error, dev vd|blk_update_request|Buffer I/O error|EXT4-fs error|EXT4-fs warning|JBD2: .*error|virtio_blk.*(error|failed)'

# interrupt WHO: boot the "stress" job and, once fio is running, kill -9 WHO
# (frontend = QEMU, backend = the daemon). Afterwards a backend is running
# again (the same one for frontend, a new one for backend).
interrupt() {
	local who=$1 con=$work/console-kill-$1.log pidfile=$work/qemu-kill.pid i qpid st
	vm_qemu_base "$accel"
	vm_log "interrupt: booting a guest under load, then kill -9 the $who"
	rm -f "$pidfile"
	timeout --kill-after=10 "$timeout_s" "${VM_QEMU[@]}" -pidfile "$pidfile" \
		-chardev "socket,id=c0,path=$sock" \
		-device vhost-user-blk-pci,chardev=c0,num-queues=2 \
		-kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
		-append "console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=stress vqcow.runtime=$timeout_s" \
		</dev/null >"$con" 2>&1 &
	qemu_pid=$!
	for ((i = 0; i < timeout_s * 2; i++)); do
		grep -q 'VQCOW-GUEST: STEP stress-running\|VQCOW-GUEST: FAIL' "$con" && break
		kill -0 "$qemu_pid" 2>/dev/null && kill -0 "$backend_pid" 2>/dev/null || break
		sleep 0.5
	done
	if ! grep -q 'VQCOW-GUEST: STEP stress-running ok' "$con"; then
		[ -n "$qemu_pid" ] && vm_stop "$qemu_pid" 10
		qemu_pid=""
		tr -d '\r' <"$con" >&2
		fail "interrupt: the stress guest did not get its I/O going"
		return 1
	fi
	sleep "${VQCOW_E2E_KILL_DELAY:-5}"
	if [ "$who" = frontend ]; then
		qpid=$(cat "$pidfile" 2>/dev/null)
		[ -n "$qpid" ] && kill -KILL "$qpid"
		wait "$qemu_pid"
		qemu_pid=""
		sleep 1
		if ! kill -0 "$backend_pid" 2>/dev/null; then
			wait "$backend_pid"
			st=$?
			backend_pid=""
			fail "interrupt: the backend exited (status $st) when its frontend was killed"
			return 1
		fi
		vm_log "interrupt: QEMU killed with I/O in flight; the backend is still up"
	else
		kill -KILL "$backend_pid"
		wait "$backend_pid"
		backend_pid=""
		vm_stop "$qemu_pid" 10
		qemu_pid=""
		vm_log "interrupt: backend killed with I/O in flight"
		if [ "$format" = qcow2 ]; then
			# The kernel drops a killed daemon's image locks once its io_uring is
			# torn down (tens of ms): until then qemu-img is refused.
			for _ in $(seq 200); do
				qemu-img info "$img" >/dev/null 2>&1 && break
				sleep 0.05
			done
			qemu-img check "$img" >"$work/check-after-kill.log" 2>&1
			st=$?
			cat "$work/check-after-kill.log" >&2
			# 0: clean, 3: leaked clusters only (allowed after a crash).
			if [ $st != 0 ] && [ $st != 3 ]; then
				fail "interrupt: qemu-img check after kill -9 exited $st (corruption)"
				return 1
			fi
			vm_log "interrupt: qemu-img check after kill -9: exit $st (0 clean, 3 leaks only)"
			if [ $st = 3 ]; then
				# Leaks stay until repaired: repair them with our own tool as a
				# user would, so the final qemu-img check (which must be clean)
				# also checks that repair.
				vqimg="${vqcowd:+$(dirname "$vqcowd")/vqcow-img}"
				if [ -n "$vqimg" ] && [ -x "$vqimg" ]; then
					"$vqimg" check -r leaks "$img" >"$work/repair-after-kill.log" 2>&1
				else
					qemu-img check -r leaks "$img" >"$work/repair-after-kill.log" 2>&1
				fi
				st=$?
				cat "$work/repair-after-kill.log" >&2
				if [ $st != 0 ]; then
					fail "interrupt: repairing the leaks after kill -9 exited $st"
					return 1
				fi
				vm_log "interrupt: leaked clusters repaired"
			fi
		fi
		mv "$backend_log" "$backend_log.killed"
		vm_backend_start "$backend" "$sock" "$img" "$format" "$backend_log" "$vqcowd" "${extra[@]}" || return 1
		backend_pid=$VM_BACKEND_PID
		if ! vm_wait_socket "$sock" "$backend_pid" 20; then
			cat "$backend_log" >&2
			fail "interrupt: the new backend did not come up on the crashed image"
			return 1
		fi
	fi
	tr -d '\r' <"$con" >"$con.txt"
	if grep -qE "$kernel_errors" "$con.txt" && [ "$who" = frontend ]; then
		fail "interrupt: kernel errors before the kill: $(grep -E "$kernel_errors" "$con.txt" | head -n3 | tr '\n' ' ')"
	fi
	return 0
}

if [ $kill_frontend = 1 ] && [ $result = 0 ]; then
	interrupt frontend || true
fi
if [ $kill_backend = 1 ] && [ $result = 0 ]; then
	interrupt backend || true
fi
boot_guest "$job" "$console" || true
# second_boot WHAT: boot the reverify job and compare its file list with the
# first boot's.
second_boot() {
	if boot_guest reverify "$work/console-$1.log"; then
		if diff <(grep '^VQCOW-GUEST: FILE ' "$console.txt" | sort) \
			<(grep '^VQCOW-GUEST: FILE ' "$work/console-$1.log.txt" | sort) >"$work/reverify-$1.diff"; then
			vm_log "$1: the second guest read back the same $(grep -c '^VQCOW-GUEST: FILE ' "$console.txt") files"
		else
			head -n 20 "$work/reverify-$1.diff" >&2
			fail "$1: the second guest saw different files or contents"
		fi
	fi
}
if [ $reconnect = 1 ] && [ $result = 0 ] && [ -n "$backend_pid" ]; then
	# A second QEMU connects to the same daemon (the first one quit, so the
	# daemon must have dropped that connection and accepted this one) and
	# re-reads the file system: same files, same checksums.
	vm_log "reconnect: a new QEMU against the same $backend process"
	second_boot reconnect
fi
if [ $restart = 1 ] && [ $result = 0 ] && [ -n "$backend_pid" ]; then
	# Stop the daemon cleanly, start a new one on the same image (it reopens
	# what the first one wrote and flushed), re-read the file system.
	vm_stop "$backend_pid" 30
	backend_pid=""
	if [ "$VM_STOP_STATUS" != 0 ]; then
		fail "restart: backend exit status after SIGTERM: $VM_STOP_STATUS (expected 0)"
	else
		vm_log "restart: backend exited 0 on SIGTERM; starting a new one"
		mv "$backend_log" "$backend_log.1"
		vm_backend_start "$backend" "$sock" "$img" "$format" "$backend_log" "$vqcowd" "${extra[@]}" || exit 1
		backend_pid=$VM_BACKEND_PID
		if vm_wait_socket "$sock" "$backend_pid" 20; then
			second_boot restart
		else
			cat "$backend_log" >&2
			fail "restart: the new backend did not create $sock"
		fi
	fi
fi

# --- stop the backend: SIGTERM must end it with status 0 --------------------------------
if [ -n "$backend_pid" ]; then
	if ! kill -0 "$backend_pid" 2>/dev/null; then
		wait "$backend_pid"
		st=$?
		backend_pid=""
		fail "backend ($backend) had already exited, status $st, before SIGTERM"
		st=gone
	else
		vm_stop "$backend_pid" 30
		st=$VM_STOP_STATUS
		backend_pid=""
	fi
	if [ "$st" = gone ]; then
		:
	elif [ "$st" != 0 ]; then
		fail "backend ($backend) exit status after SIGTERM: $st (expected 0)"
	else
		vm_log "backend exited 0 on SIGTERM"
	fi
fi
if [ -s "$backend_log" ]; then
	echo "----- backend log (last 50 lines) -----" >&2
	tail -n 50 "$backend_log" >&2
	echo "----- end of backend log -----" >&2
fi

# --- host-side check of the image: what the guest wrote is really in it --------------
if [ "$job" = e2e ] && [ $result = 0 ]; then
	raw=$img
	if [ "$format" = qcow2 ]; then
		qemu-img check -q "$img" >"$work/qemu-img-check.log" 2>&1
		st=$?
		if [ $st = 3 ] && [ "$kill_under_guest" -gt 0 ]; then
			# Daemons killed with -9 leak what they had reserved ahead
			# (refcounts raised, never linked): allowed, and repaired with
			# our own tool as a user would; then the check must be clean.
			vm_log "qemu-img check after the kills: leaked clusters only; repairing them"
			vqimg="$(dirname "$vqcowd")/vqcow-img"
			"$vqimg" check -r leaks "$img" >"$work/repair-leaks.log" 2>&1 ||
				fail "vqcow-img check -r leaks failed: $(cat "$work/repair-leaks.log")"
			qemu-img check -q "$img" >"$work/qemu-img-check.log" 2>&1
			st=$?
		fi
		if [ $st != 0 ]; then
			cat "$work/qemu-img-check.log" >&2
			fail "qemu-img check reports problems in $img"
		fi
		raw=$work/image.raw
		qemu-img convert -O raw "$img" "$raw" || fail "qemu-img convert failed"
	fi
	if [ $result = 0 ]; then
		if ! e2fsck -fn "$raw" >"$work/e2fsck.log" 2>&1; then
			cat "$work/e2fsck.log" >&2
			fail "host e2fsck of the image failed"
		fi
		mkdir -p "$work/files"
		debugfs -R "rdump / $work/files" "$raw" >/dev/null 2>"$work/debugfs.log" ||
			fail "debugfs rdump failed: $(cat "$work/debugfs.log")"
		n=0
		bad=0
		while read -r _ _ sum path; do
			n=$((n + 1))
			got=$(sha256sum <"$work/files/$path" 2>/dev/null | cut -d' ' -f1)
			if [ "$got" != "$sum" ]; then
				bad=$((bad + 1))
				[ $bad -le 5 ] && vm_log "image content mismatch: $path (guest $sum, image ${got:-missing})"
			fi
		done < <(grep '^VQCOW-GUEST: FILE ' "$console.txt")
		if [ $n = 0 ]; then
			fail "the guest listed no files to check"
		elif [ $bad != 0 ]; then
			fail "$bad of $n files in the image differ from what the guest wrote"
		else
			vm_log "host check: e2fsck clean, $n files match the guest's checksums"
		fi
	fi
fi

if [ "$job" = resize ] && [ $result = 0 ]; then
	[ $resized = 1 ] || fail "the guest never asked for the resize"
	if [ "$format" = qcow2 ]; then
		qemu-img check "$img" >"$work/qemu-img-check.log" 2>&1 ||
			{ cat "$work/qemu-img-check.log" >&2; fail "qemu-img check after the online resize"; }
		got=$(qemu-img info --output=json "$img" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
	else
		got=$(stat -c %s "$img")
	fi
	if [ "$got" != "$resize_bytes" ]; then
		fail "image size after the resize: $got, expected $resize_bytes"
	else
		vm_log "host check: the image is $got bytes and clean"
	fi
fi

if [ "$job" = readcheck ] && [ $result = 0 ]; then
	if [ "$format" = qcow2 ]; then
		qemu-img check -q "$img" || fail "qemu-img check reports problems after the read-only run"
		qemu-img convert -q -O raw "$img" "$work/image.raw"
		now=$(sha256sum <"$work/image.raw" | cut -d' ' -f1)
	else
		now=$(sha256sum <"$img" | cut -d' ' -f1)
	fi
	if [ "$now" != "$content_sum" ]; then
		fail "the image changed although the guest only read it"
	else
		vm_log "host check: image content unchanged"
	fi
	rm -f "$seed"
fi

if [ $result = 0 ]; then
	vm_log "PASS ($backend, $format, $accel, guest ran ${elapsed}s)"
	exit 0
fi
vm_log "FAILED ($backend, $format, $accel)"
exit 1
