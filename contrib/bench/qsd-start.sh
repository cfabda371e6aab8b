# shellcheck shell=bash
# SPDX-License-Identifier: MIT
#
# Sourced by grow.sh, layout.sh, scale.sh, ab.sh, mq.sh and guest-mq.sh:
#   bench_qsd_start QSD FILE FMT SOCK LOG [QUEUES [IOTHREAD]]
# starts qemu-storage-daemon (the binary QSD) in the background, exporting
# FILE (format FMT: qcow2 or raw) over vhost-user-blk on the UNIX socket SOCK
# with QUEUES queues (default 1), writable, in its best configuration: the
# file opened with cache.direct=on and aio=io_uring, the export in an
# iothread when IOTHREAD is 1 (the default). Its stdout and stderr go to LOG,
# its stdin is /dev/null.
# It returns at once, the daemon started with `&` in the caller's shell: $!
# is then its pid (for the caller's CPU ticks and kill), as if the caller had
# started it itself.
bench_qsd_start() {
	local qsd=$1 f=$2 fmt=$3 sock=$4 log=$5 nq=${6:-1} iot=${7:-1} obj=() eiot=
	if [ "$iot" = 1 ]; then
		obj=(--object "iothread,id=iot0")
		eiot=,iothread=iot0
	fi
	"$qsd" ${obj[@]+"${obj[@]}"} \
		--blockdev "driver=file,node-name=f,filename=$f,cache.direct=on,aio=io_uring" \
		--blockdev "driver=$fmt,node-name=d,file=f" \
		--export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq$eiot" \
		</dev/null >"$log" 2>&1 &
}
