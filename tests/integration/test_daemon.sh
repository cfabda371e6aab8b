#!/usr/bin/env bash
# Integration: vqcowd as a process. Command line (one-line errors, non-zero
# exit), --print-capabilities JSON, SIGTERM/SIGINT exit 0 (idle and under
# load from vqcow-fe bench, and with the I/O threads' last posts left for the
# exit), the socket is removed on exit, and the CLI
# front-end round trip (verify, write/read against the image file).
# Usage: test_daemon.sh VQCOWD VQCOW-FE
set -uo pipefail
vqcowd=${1:?usage: test_daemon.sh VQCOWD VQCOW-FE}
fe=${2:?usage: test_daemon.sh VQCOWD VQCOW-FE}
. "$(dirname "$0")/lib.sh"
it_setup "checks of vqcowd's own command line and signals"
command -v python3 >/dev/null || { echo "SKIP: python3 missing"; exit 77; }

truncate -s 16M "$dir/img"

# ---- command line ----
out=$("$vqcowd" --print-capabilities) || fail "--print-capabilities exit status"
python3 -c '
import json, sys
c = json.loads(sys.argv[1])
assert c["type"] == "block", c
assert "read-only" in c["features"] and "blk-file" in c["features"], c
' "$out" || fail "--print-capabilities JSON: $out"
# the convention: other options are ignored
"$vqcowd" --print-capabilities --num-queues 0 --bogus >/dev/null 2>&1 ||
	fail "--print-capabilities must ignore other options"
"$vqcowd" --help >/dev/null || fail "--help exit status"
"$vqcowd" --version >/dev/null || fail "--version exit status"

bad_args() {
	local err rc
	"$vqcowd" "$@" >"$dir/out" 2>"$dir/err"
	rc=$?
	err=$(cat "$dir/err")
	[ $rc -ne 0 ] || fail "'$*' exited 0"
	[ $rc -lt 128 ] || fail "'$*' died of a signal ($rc)"
	[ "$(wc -l <"$dir/err")" -eq 1 ] || fail "'$*': not a one-line error: $err"
	[ -s "$dir/out" ] && fail "'$*': wrote to stdout"
	[ -e "$dir/sock" ] && fail "'$*': left a socket behind" && rm -f "$dir/sock"
	return 0
}
bad_args
bad_args --socket-path "$dir/sock"
bad_args --blk-file "$dir/img"
bad_args --socket-path "$dir/sock" --blk-file "$dir/nonexistent"
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --num-queues 0
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --num-queues abc
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --num-queues 100000
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --logical-block-size 1000
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --queue-size 3
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --serial 012345678901234567890
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --bogus
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" --format vmdk
bad_args --socket-path "$dir/sock" --fd 3 --blk-file "$dir/img"
bad_args --socket-path "$dir/sock" --blk-file "$dir/img" extra-argument

# ---- life cycle ----
start() {
	rm -f "$dir/sock"
	"$vqcowd" --socket-path "$dir/sock" --blk-file "$dir/img" "$@" 2>>"$dir/log" &
	pid=$!
	it_wait_serving "$pid" "$dir/sock" "$dir/log" vqcowd
}
# wait for $pid up to $1 seconds; sets rc to its exit status (or "timeout")
wait_exit() {
	local i
	rc=timeout
	for i in $(seq $(($1 * 20))); do
		if ! kill -0 "$pid" 2>/dev/null; then
			wait "$pid"
			rc=$?
			pid=
			return
		fi
		sleep 0.05
	done
}

for sig in TERM INT; do
	if start; then
		"$fe" info "$dir/sock" >/dev/null || fail "info"
		kill -$sig "$pid"
		wait_exit 10
		[ "$rc" = 0 ] || fail "idle SIG$sig: exit $rc"
		[ -e "$dir/sock" ] && fail "socket left behind after SIG$sig"
	fi
done

# SIGTERM under load: the daemon completes what it took and exits 0
if start --num-queues 2; then
	"$fe" bench "$dir/sock" --rw randrw --bs 16k --iodepth 32 --numjobs 2 --runtime 20 \
		>"$dir/bench.out" 2>&1 &
	bench=$!
	sleep 1
	kill -TERM "$pid"
	wait_exit 20
	[ "$rc" = 0 ] || fail "SIGTERM under load: exit $rc ($(tail -3 "$dir/log"))"
	wait $bench
	# the front-end saw the connection close, not a hang or a bad completion
	grep -q "closed the connection\|reset" "$dir/bench.out" ||
		fail "bench did not see a clean disconnect: $(cat "$dir/bench.out")"
	grep -q "request at sector" "$dir/bench.out" && fail "bad completion: $(cat "$dir/bench.out")"
fi

# SIGTERM with the I/O threads' last posts to the main loop (a wake-up, a
# queue move) still in its list when they are joined: what a thread
# descheduled between its last request's end and its posts leaves behind
# (VQCOWD_TEST_LATE_POSTS, a test seam, leaves both), run by img_close's loop
# (a qcow2 image just written: close cancels its write-back timer and waits
# for it). Exit 0 (it crashed after the final flush: the threads were freed
# before img_close, threads_exit; the ASan build: no use after free).
mk_qcow2() {
	if [ -x "$(dirname "$vqcowd")/vqcow-img" ]; then
		"$(dirname "$vqcowd")/vqcow-img" create -f qcow2 "$1" 64M >/dev/null
	elif command -v qemu-img >/dev/null; then
		qemu-img create -q -f qcow2 "$1" 64M
	else
		return 1
	fi
}
if mk_qcow2 "$dir/late.qcow2"; then
	rm -f "$dir/sock"
	VQCOWD_TEST_LATE_POSTS=1 "$vqcowd" --socket-path "$dir/sock" --blk-file "$dir/late.qcow2" \
		--num-queues 2 --io-threads 2 2>>"$dir/log" &
	pid=$!
	if it_wait_serving "$pid" "$dir/sock" "$dir/log" vqcowd; then
		head -c 65536 /dev/urandom >"$dir/late.data"
		"$fe" --queues 2 --queue 1 write "$dir/sock" 0 <"$dir/late.data" || fail "late: write"
		kill -TERM "$pid"
		wait_exit 10
		[ "$rc" = 0 ] || fail "SIGTERM with the threads' posts left for the exit: exit $rc"
		grep -q "VQCOWD_TEST_LATE_POSTS: the I/O threads" "$dir/log" ||
			fail "late: no VQCOWD_TEST_LATE_POSTS line in the log"
	fi
else
	echo "note: late posts at exit skipped (needs vqcow-img or qemu-img)"
fi

# ---- CLI front-end round trip ----
if start --num-queues 2 --serial itest-serial; then
	"$fe" verify "$dir/sock" --size 2M --offset 1M --seed 11 >/dev/null || fail "verify"
	"$fe" --regions 2 --layout indirect,hdr-split --segs 3 --queues 2 --queue 1 \
		verify "$dir/sock" --size 1M --seed 12 >/dev/null || fail "verify (layouts)"
	head -c 65536 /dev/urandom >"$dir/data"
	"$fe" write "$dir/sock" 512 <"$dir/data" || fail "write"
	"$fe" flush "$dir/sock" || fail "flush"
	cmp -n 65536 -i 0:512 "$dir/data" "$dir/img" || fail "image file differs"
	"$fe" read "$dir/sock" 512 65536 | cmp - "$dir/data" || fail "read differs"
	[ "$("$fe" get-id "$dir/sock")" = itest-serial ] || fail "get-id"
	"$fe" write-zeroes --unmap "$dir/sock" 512 4096 || fail "write-zeroes"
	"$fe" flush "$dir/sock" || fail "flush"
	cmp -n 4096 -i 512:0 "$dir/img" /dev/zero || fail "write-zeroes not in the image"
	"$fe" read "$dir/sock" 0 100 >/dev/null 2>&1
	[ $? -eq 3 ] || fail "read of 100 bytes: exit status must be 3 (IOERR)"
	"$fe" read "$dir/sock" 100 512 >/dev/null 2>&1
	[ $? -eq 2 ] || fail "vqcow-fe must refuse an offset that is not a multiple of 512"
	"$fe" set-wce "$dir/sock" 0 | grep -q "wce: 0" || fail "set-wce 0"
	"$fe" set-wce "$dir/sock" 1 | grep -q "wce: 1" || fail "set-wce 1"
	kill -TERM "$pid"
	wait_exit 10
	[ "$rc" = 0 ] || fail "exit after the CLI round trip: $rc"
fi

# ---- --user: the image is opened before privileges go; that user needs no
# access to it (a root-owned 0644 qcow2 here). Metadata write-back includes
# unaligned writes through a second (buffered) descriptor, which must not be
# opened after the switch: writes to fresh clusters, a SIGKILL, a restart,
# more writes, a clean exit, no "Permission denied".
img_tool=$(dirname "$vqcowd")/vqcow-img
if [ "$(id -u)" = 0 ] && id nobody >/dev/null 2>&1 && [ -x "$img_tool" ]; then
	"$img_tool" create -f qcow2 "$dir/u.qcow2" 64M >/dev/null || fail "vqcow-img create"
	chmod 644 "$dir/u.qcow2"
	for round in 1 2; do
		# after the SIGKILL the dead daemon's image locks linger a moment: retry
		for _ in $(seq 50); do
			"$vqcowd" --socket-path "$dir/u.sock" --blk-file "$dir/u.qcow2" \
				--user nobody >>"$dir/u.log" 2>&1 &
			pid=$!
			sleep 0.1
			kill -0 "$pid" 2>/dev/null && break
			wait "$pid" 2>/dev/null
		done
		it_wait_serving "$pid" "$dir/u.sock" "$dir/u.log" "--user" || break
		"$fe" verify "$dir/u.sock" --size 4M --offset $((round * 8))M >/dev/null ||
			fail "--user round $round: verify"
		if [ $round = 1 ]; then
			kill -9 "$pid"
			wait "$pid" 2>/dev/null
			pid=
		else
			kill -TERM "$pid"
			wait_exit 10
			[ "$rc" = 0 ] || fail "--user: exit status $rc"
		fi
	done
	grep -q "denied" "$dir/u.log" && fail "--user: $(grep denied "$dir/u.log" | head -n 3)"
else
	echo "note: --user image check skipped (needs root, user nobody and vqcow-img)"
fi

it_finish "$dir/log"
