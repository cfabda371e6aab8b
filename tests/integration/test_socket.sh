#!/usr/bin/env bash
# Integration: socket ownership (issue 9, item 2). A second vqcowd on the path
# of a live one refuses (one-line error naming the path, non-zero exit) and
# leaves the first one serving; a socket left behind by a vqcowd killed with
# SIGKILL is stale and replaced by the next one; a vqcowd whose socket path
# was taken over by another process does not unlink that socket at exit.
# Usage: test_socket.sh VQCOWD VQCOW-FE
set -uo pipefail
vqcowd=${1:?usage: test_socket.sh VQCOWD VQCOW-FE}
fe=${2:?usage: test_socket.sh VQCOWD VQCOW-FE}
. "$(dirname "$0")/lib.sh"
it_setup "checks of vqcowd's own socket handling"
command -v python3 >/dev/null || { echo "SKIP: python3 missing"; exit 77; }
truncate -s 16M "$dir/img1" "$dir/img2"
sock=$dir/sock

# start NAME IMG: start vqcowd in the background on $sock, wait until it serves
start() {
	local name=$1 img=$2 p
	"$vqcowd" --socket-path "$sock" --blk-file "$img" 2>>"$dir/$name.log" &
	p=$!
	pids+=("$p")
	eval "$name=$p"
	it_wait_serving "$p" "$sock" "$dir/$name.log" "$name"
}
served_img() {
	# write a marker through the socket, flush, see which image got it
	local m
	m=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
	head -c 512 /dev/zero | tr '\0' x | sed "s/^.\{32\}/$m/" >"$dir/blk"
	"$fe" write "$sock" 0 <"$dir/blk" >/dev/null 2>&1 && "$fe" flush "$sock" >/dev/null 2>&1 ||
		{ echo none; return; }
	if cmp -s -n 512 "$dir/blk" "$dir/img1"; then echo img1
	elif cmp -s -n 512 "$dir/blk" "$dir/img2"; then echo img2
	else echo none; fi
}

# ---- a live socket is refused ----
start first "$dir/img1" || exit 1
ino=$(stat -c %i "$sock")
"$vqcowd" --socket-path "$sock" --blk-file "$dir/img2" >"$dir/out" 2>"$dir/err" &
second=$!
pids+=("$second")
rc=timeout
for _ in $(seq 100); do
	if ! kill -0 "$second" 2>/dev/null; then
		wait "$second"
		rc=$?
		break
	fi
	sleep 0.05
done
[ "$rc" != timeout ] || fail "a second vqcowd on a live socket keeps running"
[ "$rc" != timeout ] && [ "$rc" -ne 0 ] || fail "a second vqcowd on a live socket exited $rc"
grep -q "$sock" "$dir/err" || fail "the error does not name the socket: $(cat "$dir/err")"
grep -qi "listening" "$dir/err" || fail "the error does not say the socket is in use: $(cat "$dir/err")"
[ "$(stat -c %i "$sock" 2>/dev/null)" = "$ino" ] || fail "the live socket was replaced"
[ "$(served_img)" = img1 ] || fail "the first vqcowd no longer serves its socket"

# ---- kill -9 leaves a stale socket: the next vqcowd replaces it ----
kill -9 "$first"
wait "$first" 2>/dev/null
[ -S "$sock" ] || fail "kill -9 did not leave the socket file (test assumption)"
start third "$dir/img2" || exit 1
[ "$(served_img)" = img2 ] || fail "the restarted vqcowd does not serve the replaced socket"
grep -q "stale" "$dir/third.log" || fail "replacing the stale socket was not logged"

# ---- exit removes the socket only if it is still ours ----
# Another vqcowd takes the path over (the path was unlinked behind our back).
rm -f "$sock"
start fourth "$dir/img1" || exit 1
ino=$(stat -c %i "$sock")
kill -TERM "$third"
wait "$third"
rc=$?
[ "$rc" -eq 0 ] || fail "SIGTERM exit status $rc"
[ -S "$sock" ] && [ "$(stat -c %i "$sock")" = "$ino" ] ||
	fail "the exiting vqcowd removed the socket of another one"
[ "$(served_img)" = img1 ] || fail "the socket owner no longer serves"
kill -TERM "$fourth"
wait "$fourth"
[ -e "$sock" ] && fail "the owner did not remove its socket at exit"

it_finish
