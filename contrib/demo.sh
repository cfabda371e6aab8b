#!/usr/bin/env bash
# vqcow demo: install dependencies, build, create an image, serve it with
# vqcowd over vhost-user-blk to a tiny QEMU guest, run fio inside the guest,
# shut everything down. Meant for a fresh Debian 12 machine, as root.
#
#   bash contrib/demo.sh [--format raw|qcow2] [--size SIZE] [--runtime S]
#                        [--backend vqcowd|qsd] [--accel auto|kvm|tcg]
#                        [--build-dir DIR] [--no-deps] [--shell]
#
#   --format    image format (default qcow2, created with vqcow-img)
#   --size      image size (default 1G, sparse)
#   --runtime   seconds of the timed fio phase in the guest (default 10)
#   --backend   vqcowd (default) or qsd (qemu-storage-daemon, for comparison)
#   --accel     KVM is used when it really boots the guest, else TCG
#   --shell     an interactive guest shell instead of the fio job
#   --no-deps   skip contrib/deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)

format=qcow2
size=1G
runtime=10
backend=vqcowd
accel=auto
build=$top/build
deps=1
job=demo
while [ $# -gt 0 ]; do
	case "$1" in
	--format) format=$2; shift 2 ;;
	--size) size=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--backend) backend=$2; shift 2 ;;
	--accel) accel=$2; shift 2 ;;
	--build-dir) build=$2; shift 2 ;;
	--no-deps) deps=0; shift ;;
	--shell) job=shell; shift ;;
	-h | --help) sed -n '2,17p' "$0"; exit 0 ;;
	*) echo "demo: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
case "$format" in raw | qcow2) ;; *) echo "demo: --format raw|qcow2" >&2; exit 2 ;; esac
case "$backend" in vqcowd | qsd) ;; *) echo "demo: --backend vqcowd|qsd" >&2; exit 2 ;; esac

. "$top/contrib/guest/vm-lib.sh"
VM_LOG_TAG=demo
step() { echo; echo "=== $*"; }

# 1. dependencies and build -----------------------------------------------------
if [ $deps = 1 ]; then
	step "installing dependencies (contrib/deps.sh)"
	bash contrib/deps.sh
fi
step "building vqcow into $build"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)"
vqcowd=$build/src/vqcowd
[ -x "$vqcowd" ] || { echo "demo: $vqcowd was not built" >&2; exit 1; }

step "building the tiny guest (Debian kernel + busybox/fio initramfs) in $build/guest"
vm_guest_build "$build/guest"

# 2. image and daemon -----------------------------------------------------------------
demo=$build/demo
mkdir -p "$demo"
img=$demo/disk.$format
rundir=$(mktemp -d /tmp/vqcow-demo.XXXXXX)
sock=$rundir/vqcowd.sock
backend_log=$demo/$backend.log
console=$demo/console.log
backend_pid=""
qemu_pid=""
cleanup() {
	local st=$?
	trap - EXIT INT TERM
	[ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null && vm_stop "$qemu_pid" 10
	[ -n "$backend_pid" ] && kill -0 "$backend_pid" 2>/dev/null && vm_stop "$backend_pid" 10
	rm -rf "$rundir"
	exit "$st"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "creating a $size $format image: $img"
rm -f "$img"
case "$format" in
raw) truncate -s "$size" "$img" ;;
qcow2)
	if [ -x "$build/src/vqcow-img" ]; then
		"$build/src/vqcow-img" create -f qcow2 "$img" "$size"
	else
		qemu-img create -q -f qcow2 "$img" "$size"
	fi
	;;
esac

step "starting $backend on $sock"
if [ "$backend" = vqcowd ]; then
	echo "+ $vqcowd --socket-path $sock --blk-file $img --format $format --num-queues 2"
fi
vm_backend_start "$backend" "$sock" "$img" "$format" "$backend_log" "$vqcowd"
backend_pid=$VM_BACKEND_PID
if ! vm_wait_socket "$sock" "$backend_pid" 20; then
	echo "demo: $backend did not come up; its log ($backend_log):" >&2
	cat "$backend_log" >&2
	exit 1
fi

# 3. the guest ------------------------------------------------------------------------------
if [ "$accel" = auto ]; then
	step "checking whether KVM can boot the guest"
	accel=$(vm_pick_accel "$build/guest")
fi
vm_qemu_base "$accel"
append="console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=$job vqcow.runtime=$runtime"
qemu_args=("${VM_QEMU[@]}" -chardev "socket,id=c0,path=$sock"
	-device vhost-user-blk-pci,chardev=c0,num-queues=2
	-kernel "$build/guest/vmlinuz" -initrd "$build/guest/initrd.img" -append "$append")
step "booting the guest with $accel (vhost-user-blk-pci, 2 queues, 512 MiB shared memfd memory)"
echo "+ ${qemu_args[*]}"
echo

if [ "$job" = shell ]; then
	# Interactive: QEMU owns the terminal (Ctrl-A X quits).
	"${qemu_args[@]}" || true
	result=0
else
	[ "$accel" = kvm ] && tmo=300 || tmo=900
	timeout --kill-after=10 "$tmo" "${qemu_args[@]}" </dev/null >"$console" 2>&1 &
	qemu_pid=$!
	# Show the serial console live, without the firmware's screen-clearing codes.
	tail -n +1 -f --pid="$qemu_pid" "$console" |
		sed -u -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' -e 's/\r$//' |
		grep --line-buffered -v -e '^SeaBIOS' -e '^Booting from ROM' -e '^iPXE' -e '^$' || true
	wait "$qemu_pid" && qst=0 || qst=$?
	qemu_pid=""
	if grep -q "VQCOW-GUEST: PASS $job" "$console"; then
		result=0
	else
		result=1
		echo "demo: the guest job did not pass (qemu status $qst); console log: $console" >&2
	fi
fi

# 4. shut down ------------------------------------------------------------------------------
step "stopping $backend (SIGTERM)"
vm_stop "$backend_pid" 30
backend_pid=""
if [ "$VM_STOP_STATUS" != 0 ]; then
	echo "demo: $backend exited with status $VM_STOP_STATUS; log: $backend_log" >&2
	tail -n 20 "$backend_log" >&2 || true
	result=1
else
	echo "$backend exited cleanly."
fi
if [ "$format" = qcow2 ]; then
	step "qemu-img check $img"
	qemu-img check "$img" || result=1
fi
if [ $result = 0 ]; then
	step "demo finished: the guest ran fio on $img through $backend"
else
	step "demo FAILED (logs in $demo)"
fi
exit $result
