#!/usr/bin/env bash
# Integration: vqcowd's log (issue 9, item 10). A front-end reconnecting in a
# tight loop does not flood the log (rate limit, with a count of what was
# suppressed); lines carry a timestamp and a level, or a journal priority
# prefix when JOURNAL_STREAM names stderr; --log-level filters (error: no
# info lines; debug: every vhost-user message), VQCOW_VHOST_DEBUG=1 still
# means debug (deprecated), a bad level is a one-line error.
# Usage: test_logging.sh VQCOWD VQCOW-FE
set -uo pipefail
vqcowd=${1:?usage: test_logging.sh VQCOWD VQCOW-FE}
fe=${2:?usage: test_logging.sh VQCOWD VQCOW-FE}
. "$(dirname "$0")/lib.sh"
it_setup "checks of vqcowd's own log"
command -v python3 >/dev/null || { echo "SKIP: python3 missing"; exit 77; }
truncate -s 16M "$dir/img"
sock=$dir/sock

# start LOG [ARGS...]: vqcowd with stderr appended to LOG, wait until it serves
start() {
	local log=$1
	shift
	rm -f "$sock"
	"$vqcowd" --socket-path "$sock" --blk-file "$dir/img" "$@" 2>>"$log" &
	pid=$!
	it_wait_serving "$pid" "$sock" "$log" vqcowd
}

# ---- reconnect storm ----
if start "$dir/storm.log"; then
	before=$(wc -l <"$dir/storm.log")
	cycles=$(python3 - "$sock" <<'PY'
import socket, sys, time
n, end = 0, time.time() + 3
while time.time() < end:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(sys.argv[1])
    # an unsupported message that expects a reply, then hang up
    s.sendall((40).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    try:
        s.recv(16)  # a reply or EOF, never silence
    except socket.timeout:
        print("silence")
        sys.exit(0)
    s.close()
    n += 1
print(n)
PY
)
	"$fe" info "$sock" >/dev/null || fail "not serving after the storm"
	it_stop
	lines=$(($(wc -l <"$dir/storm.log") - before))
	echo "reconnect storm: $cycles connections, $lines log lines"
	[ "$cycles" != silence ] || fail "GET_STATUS got neither a reply nor a close"
	[ "$cycles" != silence ] && [ "$cycles" -ge 200 ] || fail "only $cycles connections in 3 s: no storm"
	[ "$lines" -le 150 ] || fail "$lines log lines for $cycles reconnects: not rate-limited"
	grep -q "similar messages suppressed" "$dir/storm.log" ||
		fail "no count of suppressed lines: $(tail -5 "$dir/storm.log")"
	grep -q "GET_STATUS (40) not supported" "$dir/storm.log" ||
		fail "the reason for closing is not logged"
fi

# ---- line format: timestamp and level ----
ts='^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3} vqcowd: info: serving '
grep -Eq "$ts" "$dir/storm.log" || fail "no timestamped info line: $(head -3 "$dir/storm.log")"

# ---- journal: priority prefix, no timestamp ----
: >"$dir/journal.log"
jstream=$(stat -c '%d:%i' "$dir/journal.log")
export JOURNAL_STREAM=$jstream
if start "$dir/journal.log"; then
	it_stop
fi
unset JOURNAL_STREAM
grep -q '^<6>vqcowd: serving ' "$dir/journal.log" ||
	fail "no journal priority prefix: $(head -3 "$dir/journal.log")"
grep -Eq '^[0-9]{4}-' "$dir/journal.log" && fail "timestamps in journal lines"

# ---- --log-level ----
if start "$dir/error.log" --log-level error; then
	"$fe" info "$sock" >/dev/null
	it_stop
fi
grep -q "info:" "$dir/error.log" && fail "--log-level error logs info lines: $(cat "$dir/error.log")"
if start "$dir/debug.log" --log-level debug; then
	it_stop
fi
grep -q "debug: vhost: <- GET_FEATURES (1)" "$dir/debug.log" ||
	fail "--log-level debug does not trace messages"
if VQCOW_VHOST_DEBUG=1 start "$dir/envdebug.log"; then
	it_stop
fi
grep -q "<- GET_FEATURES (1)" "$dir/envdebug.log" || fail "VQCOW_VHOST_DEBUG=1 does not trace"
grep -q "deprecated" "$dir/envdebug.log" || fail "VQCOW_VHOST_DEBUG=1 is not flagged deprecated"
"$vqcowd" --socket-path "$sock" --blk-file "$dir/img" --log-level verbose >"$dir/out" 2>"$dir/err"
rc=$?
[ $rc -eq 2 ] || fail "--log-level verbose: exit $rc"
[ "$(wc -l <"$dir/err")" -eq 1 ] || fail "--log-level verbose: not a one-line error"

it_finish
