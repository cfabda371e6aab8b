# shellcheck shell=bash
# Shell helpers shared by tests/e2e/run-e2e.sh and contrib/demo.sh: start a
# vhost-user-blk backend (vqcowd or qemu-storage-daemon), choose KVM or TCG,
# build the QEMU command line, stop processes and check their exit status.
# Source it from bash; it defines functions and vm_* variables only. Safe
# under set -e.

vm_log() { echo "[$(date +%H:%M:%S)] ${VM_LOG_TAG:-vm}: $*" >&2; }

# vm_guest_build GUESTDIR: build (or reuse) the test guest; serialised with a
# lock so parallel tests share one build.
vm_guest_build() {
	local dir=$1 here
	here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
	mkdir -p "$dir"
	(
		flock -w 900 9 || { echo "cannot lock $dir/.lock" >&2; exit 1; }
		bash "$here/build-guest.sh" "$dir"
	) 9>"$dir/.lock"
}

# vm_qemu_base ACCEL: the machine part of the command line, in VM_QEMU (array).
# Guest memory is a shared memfd (the backend maps it) on NUMA node 0, as
# vhost-user requires. VM_MEM: its size, MiB or with a QEMU suffix (524280K);
# VM_SMP: the vCPUs (2).
vm_qemu_base() {
	local accel=$1 mem=${VM_MEM:-512}
	case "$mem" in *[0-9]) mem=${mem}M ;; esac
	VM_QEMU=(qemu-system-x86_64 -machine "q35,accel=$accel" -m "$mem" -smp "${VM_SMP:-2}"
		-object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa node,memdev=mem
		-nographic -no-reboot -nic none)
	if [ "$accel" = kvm ]; then
		VM_QEMU+=(-cpu host)
	else
		VM_QEMU+=(-cpu max)
	fi
}

# vm_pick_accel GUESTDIR: print "kvm" when KVM really boots the guest to its
# /init, else "tcg". /dev/kvm may exist without working (nested virt), so the
# probe boots the guest (job "probe") with a short timeout. VQCOW_ACCEL=kvm|tcg
# overrides. The answer is cached in GUESTDIR for the current boot.
vm_pick_accel() {
	local dir=$1 key cache out pid i rc=tcg
	case "${VQCOW_ACCEL:-auto}" in
	kvm | tcg) echo "$VQCOW_ACCEL"; return 0 ;;
	esac
	if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
		echo tcg
		return 0
	fi
	key="$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) $(qemu-system-x86_64 --version | head -n1) $(cat "$dir/kernel-version")"
	cache=$dir/accel-probe
	(
		flock -w 120 9 || exit 1
		if [ -f "$cache" ] && [ "$(head -n1 "$cache")" = "$key" ]; then
			exit 0
		fi
		out=$(mktemp)
		vm_qemu_base kvm
		"${VM_QEMU[@]}" -kernel "$dir/vmlinuz" -initrd "$dir/initrd.img" \
			-append "console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=probe" </dev/null >"$out" 2>&1 &
		pid=$!
		for ((i = 0; i < ${VQCOW_KVM_PROBE_SECONDS:-25} * 4; i++)); do
			if grep -q 'VQCOW-GUEST: INIT' "$out"; then
				rc=kvm
				break
			fi
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.25
		done
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		rm -f "$out"
		printf '%s\n%s\n' "$key" "$rc" >"$cache"
	) 9>"$dir/.accel-lock"
	if [ -f "$cache" ] && [ "$(head -n1 "$cache")" = "$key" ]; then
		sed -n 2p "$cache"
	else
		echo tcg
	fi
}

# vm_backend_start KIND SOCK IMG FORMAT LOG [VQCOWD [EXTRA...]]: start the
# backend in the background; sets VM_BACKEND_PID. KIND is vqcowd or qsd.
# VM_ACTIVATE=1 starts vqcowd socket-activated (--fd 3); VM_READONLY=1
# exports read-only (vqcowd --read-only, qsd writable=off).
vm_backend_start() {
	local kind=$1 sock=$2 img=$3 fmt=$4 log=$5 bin=${6:-}
	shift 6 2>/dev/null || shift $#
	rm -f "$sock"
	case "$kind" in
	vqcowd)
		[ "${VM_READONLY:-0}" = 1 ] && set -- --read-only "$@"
		[ -x "$bin" ] || { vm_log "vqcowd binary '$bin' not found"; return 1; }
		if [ "${VM_ACTIVATE:-0}" = 1 ]; then
			# systemd-style socket activation: the listening socket is fd 3
			# (LISTEN_FDS=1); vqcowd is exec'ed on the first connection.
			systemd-socket-activate -l "$sock" \
				"$bin" --fd 3 --blk-file "$img" --format "$fmt" --num-queues 2 "$@" \
				</dev/null >"$log" 2>&1 &
		else
			"$bin" --socket-path "$sock" --blk-file "$img" --format "$fmt" --num-queues 2 "$@" \
				</dev/null >"$log" 2>&1 &
		fi
		;;
	qsd)
		qemu-storage-daemon \
			--blockdev "driver=file,node-name=f,filename=$img,cache.direct=on,aio=io_uring" \
			--blockdev "driver=$fmt,node-name=d,file=f" \
			--export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=$([ "${VM_READONLY:-0}" = 1 ] && echo off || echo on),num-queues=2" \
			"$@" </dev/null >"$log" 2>&1 &
		;;
	*) vm_log "unknown backend '$kind'"; return 1 ;;
	esac
	VM_BACKEND_PID=$!
}

# vm_wait_socket SOCK PID SECONDS: wait until SOCK is a socket; fail early if
# PID exits.
vm_wait_socket() {
	local sock=$1 pid=$2 i
	for ((i = 0; i < $3 * 10; i++)); do
		[ -S "$sock" ] && return 0
		kill -0 "$pid" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}

# vm_stop PID SECONDS: SIGTERM, wait up to SECONDS, then SIGKILL. Sets
# VM_STOP_STATUS to the exit status, or to "killed" when SIGKILL was needed.
# PID must be a child of this shell, and vm_stop must not run in a subshell
# (no $(...)), or the status cannot be collected.
vm_stop() {
	local pid=$1 i
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < $2 * 10; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		VM_STOP_STATUS=killed
		return 0
	fi
	wait "$pid" 2>/dev/null && VM_STOP_STATUS=0 || VM_STOP_STATUS=$?
}
