# shellcheck shell=bash
# SPDX-License-Identifier: MIT
#
# Sourced by blkdev.sh, fsync.sh, grow.sh, layout.sh and ab.sh: what every
# script that starts a daemon and reads its numbers does the same way.
#
#   bench_opts USAGE SPEC... -- ARG...
#     parses the script's options into its own variables. SPEC is
#     OPTION=VAR for an option that takes a value (`--reps=reps`: `--reps 4`
#     sets reps=4), OPTION=VAR=VALUE for a flag (`--perf=perf=1`), or
#     OPTION=@CMD to run the caller's command CMD at once (`-h=@help`). Any
#     other argument: USAGE (the caller's command) to stderr, exit 2.
#   bench_wait_sock SOCK NAME LOG [TRIES]
#     waits (TRIES x 50 ms, default 200) for the daemon's socket SOCK; if it
#     does not appear, prints "NAME did not start:" and LOG to stderr, exit 1.
#   bench_ticks PID
#     prints the process's CPU time so far, user + system, in clock ticks
#     (getconf CLK_TCK).
#   bench_alternate ROUND FN BASE NEW ARG...
#     an A/B round of two binaries: FN base BASE ARG... and FN new NEW ARG...,
#     base first in odd rounds, new first in even ones.
#   bench_qstats VQCOWCTL QMP KEY
#     prints, as one JSON object, the section of vqcowd's query-blockstats
#     (`vqcowctl -s QMP --json stats`) that holds KEY (the qcow2 engine's
#     numbers: writeback-syncs, metadata-writes ...), or {} when the daemon
#     does not answer or has no such section (a raw image).
bench_opts() {
	local usage=$1 specs=() s var
	shift
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		specs+=("$1")
		shift
	done
	shift
	while [ $# -gt 0 ]; do
		var=
		for s in "${specs[@]}"; do
			if [ "${s%%=*}" = "$1" ]; then
				var=${s#*=}
				break
			fi
		done
		case $var in
		'')
			"$usage" >&2
			exit 2
			;;
		@*) "${var#@}" ;;
		*=*) printf -v "${var%%=*}" %s "${var#*=}" ;;
		*)
			printf -v "$var" %s "$2"
			shift
			;;
		esac
		shift
	done
}

bench_wait_sock() {
	local sock=$1 name=$2 log=$3 tries=${4:-200} i
	for ((i = 0; i < tries; i++)); do
		[ -S "$sock" ] && return 0
		sleep 0.05
	done
	[ -S "$sock" ] && return 0
	echo "$name did not start:" >&2
	cat "$log" >&2
	exit 1
}

bench_ticks() {
	awk '{print $14 + $15}' "/proc/$1/stat"
}

bench_alternate() {
	local r=$1 fn=$2 base=$3 new=$4
	shift 4
	if [ $((r % 2)) = 1 ]; then
		"$fn" base "$base" "$@"
		"$fn" new "$new" "$@"
	else
		"$fn" new "$new" "$@"
		"$fn" base "$base" "$@"
	fi
}

bench_qstats() {
	{ "$1" -s "$2" --json stats 2>/dev/null || true; } | python3 -c '
import json, sys
def find(o):
    if isinstance(o, dict):
        if sys.argv[1] in o:
            return o
        o = list(o.values())
    if isinstance(o, list):
        for v in o:
            r = find(v)
            if r:
                return r
    return None
try:
    q = find(json.load(sys.stdin))
except ValueError:
    q = None
print(json.dumps(q or {}))' "$3"
}
