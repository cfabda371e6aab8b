#!/usr/bin/env bash
# Launch a QEMU VM whose disk(s) are served by running vqcowd daemons over
# vhost-user-blk. Adds what vhost-user needs: guest RAM in a shared memfd (the
# daemon maps it to read and write request buffers in place) on a NUMA node,
# one chardev + vhost-user-blk-pci device per socket. Everything after "--"
# goes to QEMU unchanged (your kernel, boot disk, network, display...).
#
#   qemu-launch.sh --socket PATH [--socket PATH2 ...] [options] [-- QEMU ARGS...]
#
#   --socket PATH      a vqcowd socket (vqcowd --socket-path PATH ...); repeatable,
#                      the first one is the boot disk (bootindex=1)
#   --mem SIZE         guest memory (default 1G); QEMU size syntax
#   --smp N            vCPUs (default 2)
#   --queues N         virtqueues per disk (default: the vCPU count; vqcowd must
#                      offer at least this many: vqcowd --num-queues N)
#   --hugetlb          back the memfd with huge pages (hugetlb=on)
#   --accel A          kvm, tcg or auto (default auto: kvm when /dev/kvm is usable)
#   --machine M        machine type (default q35)
#   --qemu BIN         QEMU binary (default qemu-system-x86_64)
#   --serial-console   -nographic: the guest's ttyS0 on this terminal (Ctrl-A X quits)
#   --dry-run          print the command instead of running it
#
# Examples:
#   vqcowd --socket-path /run/vm1.sock --blk-file vm1.qcow2 --num-queues 2 &
#   qemu-launch.sh --socket /run/vm1.sock --serial-console
#   qemu-launch.sh --socket /run/vm1.sock --mem 4G --smp 4 -- \
#       -kernel bzImage -append 'root=/dev/vda1 console=ttyS0' -nic user
set -euo pipefail

sockets=()
mem=1G
smp=2
queues=""
hugetlb=0
accel=auto
machine=q35
qemu=qemu-system-x86_64
nographic=0
dry=0
while [ $# -gt 0 ]; do
	case "$1" in
	--socket) sockets+=("$2"); shift 2 ;;
	--mem) mem=$2; shift 2 ;;
	--smp) smp=$2; shift 2 ;;
	--queues) queues=$2; shift 2 ;;
	--hugetlb) hugetlb=1; shift ;;
	--accel) accel=$2; shift 2 ;;
	--machine) machine=$2; shift 2 ;;
	--qemu) qemu=$2; shift 2 ;;
	--serial-console) nographic=1; shift ;;
	--dry-run) dry=1; shift ;;
	--) shift; break ;;
	-h | --help) sed -n '2,27p' "$0"; exit 0 ;;
	*) echo "qemu-launch: unknown option $1 (QEMU arguments go after --)" >&2; exit 2 ;;
	esac
done
[ ${#sockets[@]} -gt 0 ] || { echo "qemu-launch: at least one --socket PATH is required" >&2; exit 2; }
[ -n "$queues" ] || queues=$smp
case "$smp$queues" in *[!0-9]*) echo "qemu-launch: --smp and --queues take numbers" >&2; exit 2 ;; esac

if [ "$accel" = auto ]; then
	if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=kvm; else accel=tcg; fi
fi
case "$accel" in
kvm) cpu=host ;;
tcg) cpu=max ;;
*) echo "qemu-launch: --accel kvm|tcg|auto" >&2; exit 2 ;;
esac

memobj="memory-backend-memfd,id=mem0,size=$mem,share=on"
[ $hugetlb = 1 ] && memobj="$memobj,hugetlb=on"
cmd=("$qemu" -machine "$machine,accel=$accel" -cpu "$cpu" -smp "$smp" -m "$mem"
	-object "$memobj" -numa node,memdev=mem0)
i=0
for s in "${sockets[@]}"; do
	if [ $dry = 0 ] && [ ! -S "$s" ]; then
		echo "qemu-launch: $s is not a socket: start vqcowd --socket-path $s first" >&2
		exit 1
	fi
	dev="vhost-user-blk-pci,chardev=vqcow$i,num-queues=$queues"
	[ $i = 0 ] && dev="$dev,bootindex=1"
	cmd+=(-chardev "socket,id=vqcow$i,path=$s" -device "$dev")
	i=$((i + 1))
done
[ $nographic = 1 ] && cmd+=(-nographic)
cmd+=("$@")

if [ $dry = 1 ]; then
	printf '%q ' "${cmd[@]}"
	echo
	exit 0
fi
exec "${cmd[@]}"
