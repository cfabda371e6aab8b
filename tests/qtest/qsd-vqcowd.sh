#!/usr/bin/env bash
# qemu-storage-daemon's command line, served by vqcowd: QEMU's qos-test runs
# this as QTEST_QEMU_STORAGE_DAEMON_BINARY. Every argument qos-test's
# vhost-user-blk cases pass (tests/qtest/vhost-user-blk-test.c in QEMU 7.2)
# is mapped; anything else is refused with exit status 2, so that a QEMU
# whose test passes something new fails loudly instead of being half served.
#
#   --blockdev driver=file,node-name=N,filename=F
#   --export type=vhost-user-blk,id=I,node-name=N,addr.type=fd,addr.str=FD
#            (or addr.type=unix,addr.path=P),writable=on|off,num-queues=Q
#            [,logical-block-size=B]
#
# One vqcowd per export (vqcowd serves one image), on the export's listening
# fd (--fd) or socket path; the image is raw (driver=file). SIGTERM and
# SIGINT are passed on to every vqcowd; the wrapper exits 0 only when every
# vqcowd exited 0, and stops the others as soon as one exits, as
# qemu-storage-daemon would stop as a whole.
# The vqcowd binary: $VQCOW_QTEST_VQCOWD.
set -uo pipefail
me=qsd-vqcowd
die() {
	echo "$me: $*" >&2
	exit 2
}
vqcowd=${VQCOW_QTEST_VQCOWD:-}
[ -n "$vqcowd" ] && [ -x "$vqcowd" ] || die "VQCOW_QTEST_VQCOWD must name the vqcowd binary"

declare -A bd_file=()
exports=() # one "|"-separated vqcowd argument list per export
exp_fds=() # the listening fd of each export ("" for a path)

# split KEY=VALUE,KEY=VALUE into the associative array kv (no escaped commas:
# qos-test passes none, and a ",," would be refused as an empty key)
parse_kv() {
	local s=$1 item
	kv=()
	local IFS=,
	for item in $s; do
		[[ $item == *=* ]] || die "'$item' in '$s' is not KEY=VALUE"
		[ -n "${item%%=*}" ] || die "empty key in '$s'"
		[ -z "${kv[${item%%=*}]+x}" ] || die "'${item%%=*}' given twice in '$s'"
		kv[${item%%=*}]=${item#*=}
	done
}

blockdev() {
	declare -gA kv
	parse_kv "$1"
	local k
	for k in "${!kv[@]}"; do
		case $k in
		driver | node-name | filename) ;;
		*) die "--blockdev: unsupported option '$k' (in '$1')" ;;
		esac
	done
	[ "${kv[driver]:-}" = file ] || die "--blockdev: only driver=file is mapped (in '$1')"
	[ -n "${kv[node-name]:-}" ] || die "--blockdev: node-name missing (in '$1')"
	[ -n "${kv[filename]:-}" ] || die "--blockdev: filename missing (in '$1')"
	[ -z "${bd_file[${kv[node-name]}]+x}" ] || die "--blockdev: node '${kv[node-name]}' defined twice"
	bd_file[${kv[node-name]}]=${kv[filename]}
}

export_() {
	declare -gA kv
	parse_kv "$1"
	local k a=() fd=""
	for k in "${!kv[@]}"; do
		case $k in
		type | id | node-name | addr.type | addr.str | addr.path | writable | num-queues | logical-block-size) ;;
		*) die "--export: unsupported option '$k' (in '$1')" ;;
		esac
	done
	[ "${kv[type]:-}" = vhost-user-blk ] || die "--export: only type=vhost-user-blk is mapped (in '$1')"
	[ -n "${kv[id]:-}" ] || die "--export: id missing (in '$1')"
	local node=${kv[node-name]:-}
	[ -n "$node" ] || die "--export: node-name missing (in '$1')"
	[ -n "${bd_file[$node]+x}" ] || die "--export: no --blockdev with node-name '$node' before it"
	a+=(--blk-file "${bd_file[$node]}" --format raw --node-name "$node")
	case ${kv[addr.type]:-} in
	fd)
		[ -z "${kv[addr.path]+x}" ] || die "--export: addr.path with addr.type=fd (in '$1')"
		fd=${kv[addr.str]:-}
		[[ $fd =~ ^[0-9]+$ ]] || die "--export: addr.str must be a file descriptor number (in '$1')"
		a+=(--fd "$fd")
		;;
	unix)
		[ -z "${kv[addr.str]+x}" ] || die "--export: addr.str with addr.type=unix (in '$1')"
		[ -n "${kv[addr.path]:-}" ] || die "--export: addr.path missing (in '$1')"
		a+=(--socket-path "${kv[addr.path]}")
		;;
	*) die "--export: addr.type must be fd or unix (in '$1')" ;;
	esac
	case ${kv[writable]:-off} in # qemu-storage-daemon's default is read-only
	on) ;;
	off) a+=(--read-only) ;;
	*) die "--export: writable must be on or off (in '$1')" ;;
	esac
	[ -z "${kv[num-queues]+x}" ] || a+=(--num-queues "${kv[num-queues]}")
	[ -z "${kv[logical-block-size]+x}" ] || a+=(--logical-block-size "${kv[logical-block-size]}")
	local IFS='|'
	exports+=("${a[*]}")
	exp_fds+=("$fd")
}

while [ $# -gt 0 ]; do
	case $1 in
	--blockdev | --export)
		[ $# -ge 2 ] || die "$1 needs an argument"
		if [ "$1" = --blockdev ]; then blockdev "$2"; else export_ "$2"; fi
		shift 2
		;;
	--blockdev=*) blockdev "${1#*=}" && shift ;;
	--export=*) export_ "${1#*=}" && shift ;;
	*) die "unsupported argument '$1' (only --blockdev and --export are mapped)" ;;
	esac
done
[ ${#exports[@]} -gt 0 ] || die "no --export given"

pids=()
for i in "${!exports[@]}"; do
	IFS='|' read -r -a a <<<"${exports[$i]}"
	(
		# each vqcowd keeps only its own listening fd
		for j in "${!exp_fds[@]}"; do
			[ "$j" = "$i" ] || [ -z "${exp_fds[$j]}" ] || eval "exec ${exp_fds[$j]}>&-"
		done
		exec "$vqcowd" "${a[@]}"
	) &
	pids+=($!)
done
for f in "${exp_fds[@]}"; do
	[ -z "$f" ] || eval "exec $f>&-"
done

stopping=0
stop() {
	stopping=1
	[ ${#pids[@]} -eq 0 ] || kill -TERM "${pids[@]}" 2>/dev/null
}
trap stop TERM INT
rc=0
while [ ${#pids[@]} -gt 0 ]; do
	done_pid=""
	wait -n -p done_pid "${pids[@]}"
	s=$?
	[ -n "${done_pid:-}" ] || continue # a signal interrupted the wait
	live=()
	for p in "${pids[@]}"; do [ "$p" = "$done_pid" ] || live+=("$p"); done
	pids=("${live[@]}")
	if [ "$s" != 0 ]; then
		echo "$me: vqcowd (pid $done_pid) exited with status $s" >&2
		rc=1
	fi
	[ "$stopping" = 1 ] || stop # one export gone: the daemon is gone
done
exit $rc
