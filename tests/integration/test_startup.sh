#!/usr/bin/env bash
# Integration: start-up messages a new user meets (issue 9, smaller things).
# - -h is --help (it used to say "option -h needs a value");
# - a missing socket directory is reported before the image is opened (cheap
#   checks first), naming the directory;
# - a file we may read but not write: the error suggests --read-only;
# - SIGHUP on a qcow2 image says online resize is for raw images only.
# Usage: test_startup.sh VQCOWD VQCOW-IMG
set -uo pipefail
vqcowd=${1:?usage: test_startup.sh VQCOWD VQCOW-IMG}
img_tool=${2:?usage: test_startup.sh VQCOWD VQCOW-IMG}
. "$(dirname "$0")/lib.sh"
it_setup "checks of vqcowd's own command line"
chmod 755 "$dir"
truncate -s 16M "$dir/img"

# ---- -h ----
"$vqcowd" -h >"$dir/out" 2>"$dir/err"
rc=$?
[ $rc -eq 0 ] || fail "-h: exit $rc: $(cat "$dir/err")"
grep -q "^Usage: vqcowd" "$dir/out" || fail "-h does not print the usage"
"$vqcowd" --num-queues >/dev/null 2>"$dir/err"
grep -q "option --num-queues needs a value" "$dir/err" || fail "missing value: $(cat "$dir/err")"
"$vqcowd" -x >/dev/null 2>"$dir/err"
grep -q "unknown option: -x" "$dir/err" || fail "unknown short option: $(cat "$dir/err")"

# ---- missing socket directory: before the image ----
# the image does not exist either: the socket directory must be named first
"$vqcowd" --socket-path "$dir/nodir/vm.sock" --blk-file "$dir/noimage" >"$dir/out" 2>"$dir/err"
rc=$?
[ $rc -ne 0 ] || fail "missing socket directory: exit 0"
[ "$(wc -l <"$dir/err")" -eq 1 ] || fail "missing socket directory: not one line: $(cat "$dir/err")"
grep -q "$dir/nodir" "$dir/err" || fail "the missing directory is not named: $(cat "$dir/err")"
grep -q "noimage" "$dir/err" && fail "the image was opened before the socket was checked"

# ---- a read-only file: suggest --read-only ----
if command -v setpriv >/dev/null && [ "$(id -u)" = 0 ]; then
	cp "$dir/img" "$dir/ro.img"
	chmod 444 "$dir/ro.img"
	setpriv --reuid=nobody --regid=nogroup --clear-groups \
		"$vqcowd" --socket-path "$dir/sock" --blk-file "$dir/ro.img" >"$dir/out" 2>"$dir/err"
	rc=$?
	[ $rc -ne 0 ] || fail "read-only file opened read-write"
	grep -q -- "--read-only" "$dir/err" || fail "no --read-only hint: $(cat "$dir/err")"
else
	echo "note: not root or no setpriv: read-only file hint not checked"
fi

# ---- SIGHUP on qcow2: raw only, said so ----
"$img_tool" create -f qcow2 "$dir/q.qcow2" 16M >/dev/null || fail "vqcow-img create"
"$vqcowd" --socket-path "$dir/sock" --blk-file "$dir/q.qcow2" 2>"$dir/q.log" &
pid=$!
for _ in $(seq 200); do
	grep -q "serving" "$dir/q.log" && break
	sleep 0.05
done
kill -HUP "$pid"
for _ in $(seq 100); do
	grep -q "SIGHUP" "$dir/q.log" && break
	sleep 0.05
done
grep -q "SIGHUP: online resize works for raw images only; this image is qcow2" "$dir/q.log" ||
	fail "SIGHUP on qcow2: $(grep SIGHUP "$dir/q.log")"
kill -TERM "$pid"
wait "$pid"
rc=$?
pid=
[ $rc -eq 0 ] || fail "exit $rc"

it_finish
