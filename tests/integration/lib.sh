# tests/integration/lib.sh — sourced by the integration shell tests that check
# vqcowd as a process. It gives them one copy of what each needs:
#   it_setup REASON    skip (exit 77, REASON shown) against qemu-storage-daemon,
#                      make the scratch directory $dir, and kill every daemon
#                      in $pid / ${pids[@]} and remove $dir on exit
#   fail MSG           count a failure and say it; the test goes on
#   it_wait_serving PID SOCK LOG WHAT
#                      wait (10 s) until PID answers `vqcow-fe info` on SOCK
#                      ($fe); otherwise fail with LOG and return 1
#   it_stop            SIGTERM $pid, wait; its exit status must be 0
#   it_finish [LOG]    exit 1 with the count (and LOG) if anything failed,
#                      else print PASS and exit 0
failures=0
pid=
pids=()

fail() {
	echo "FAIL: $*" >&2
	failures=$((failures + 1))
}

it_cleanup() {
	[ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
	rm -rf "$dir"
}

it_setup() {
	if [ "${VQCOW_TEST_BACKEND:-}" = qsd ]; then
		echo "SKIP: $1"
		exit 77
	fi
	dir=$(mktemp -d)
	trap it_cleanup EXIT
}

it_wait_serving() {
	local p=$1 sock=$2 log=$3 what=$4
	for _ in $(seq 200); do
		[ -S "$sock" ] && "$fe" info "$sock" >/dev/null 2>&1 && return 0
		kill -0 "$p" 2>/dev/null || break
		sleep 0.05
	done
	fail "$what did not start: $(cat "$log")"
	return 1
}

it_stop() {
	local rc
	kill -TERM "$pid"
	wait "$pid"
	rc=$?
	pid=
	[ $rc -eq 0 ] || fail "exit status $rc after SIGTERM"
}

it_finish() {
	if [ $failures -gt 0 ]; then
		echo "$failures failure(s)"
		if [ -n "${1:-}" ]; then
			echo "--- vqcowd log"
			cat "$1"
		fi
		exit 1
	fi
	echo "PASS"
	exit 0
}
