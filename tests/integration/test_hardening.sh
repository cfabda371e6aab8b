#!/usr/bin/env bash
# Integration: running without privileges (issue 9, item 9).
# - As root without --user, vqcowd warns; with --user it switches and does not.
# - The seccomp allow-list is on once it serves (/proc/PID/status Seccomp: 2)
#   and stops a forbidden call: the test hook VQCOWD_TEST_FORBIDDEN_CALL makes
#   the daemon call execve after start-up; it must end with status 159 and a
#   line naming system call 59. With --no-seccomp the call is not stopped.
# - contrib/systemd/vqcowd@.service names a non-root User=, passes
#   systemd-analyze verify, and its ExecStart runs as an unprivileged user
#   under systemd-socket-activate (the sockets of vqcowd@.socket: vhost-user
#   as fd 3, QMP as fd 4) and serves both, filter on.
# The rest of the integration suite runs with the filter on (the default).
# Usage: test_hardening.sh VQCOWD VQCOW-FE SOURCE_DIR
set -uo pipefail
vqcowd=${1:?usage: test_hardening.sh VQCOWD VQCOW-FE SOURCE_DIR}
fe=${2:?usage: test_hardening.sh VQCOWD VQCOW-FE SOURCE_DIR}
src=${3:?usage: test_hardening.sh VQCOWD VQCOW-FE SOURCE_DIR}
vqcowd=$(realpath "$vqcowd")
. "$(dirname "$0")/lib.sh"
if [ "$(id -u)" != 0 ] && [ "${VQCOW_TEST_BACKEND:-}" != qsd ]; then
	echo "SKIP: needs root (switching users)"
	exit 77
fi
it_setup "checks of vqcowd's own privileges"
chmod 755 "$dir"
truncate -s 16M "$dir/img"
sock=$dir/sock

start() { # LOG ARGS...: start in the background, wait until it serves
	local log=$1
	shift
	rm -f "$sock"
	"$@" 2>>"$log" &
	pid=$!
	it_wait_serving "$pid" "$sock" "$log" "$*"
}
seccomp_mode() { awk '/^Seccomp:/ {print $2}' "/proc/$1/status"; }

# ---- root: warned; --user: switched, no warning; the filter is on ----
if start "$dir/root.log" "$vqcowd" --socket-path "$sock" --blk-file "$dir/img"; then
	[ "$(seccomp_mode "$pid")" = 2 ] || fail "no seccomp filter while serving"
	"$fe" verify "$sock" --size 1M --seed 3 >/dev/null || fail "verify with the filter on"
	kill -HUP "$pid" # resize check: fstat/ioctl under the filter
	sleep 0.2
	it_stop
fi
grep -q "warn: running as root (uid 0)" "$dir/root.log" || fail "no warning when running as root"
grep -q "forbidden system call" "$dir/root.log" && fail "filter stopped a call: $(cat "$dir/root.log")"
if start "$dir/user.log" "$vqcowd" --socket-path "$sock" --blk-file "$dir/img" --user nobody; then
	[ "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")" = "$(id -u nobody)" ] ||
		fail "--user nobody: not running as nobody"
	"$fe" verify "$sock" --size 1M --seed 4 >/dev/null || fail "verify as nobody"
	it_stop
fi
grep -q "running as root" "$dir/user.log" && fail "root warning with --user"

# ---- a forbidden call is stopped ----
VQCOWD_TEST_FORBIDDEN_CALL=1 timeout -s KILL 20 "$vqcowd" --socket-path "$sock" \
	--blk-file "$dir/img" >"$dir/out" 2>"$dir/forbidden.log"
rc=$?
[ $rc -eq 159 ] || fail "forbidden execve: exit status $rc, want 159: $(cat "$dir/forbidden.log")"
grep -q "seccomp: forbidden system call 59 stopped" "$dir/forbidden.log" ||
	fail "the stopped call is not logged: $(cat "$dir/forbidden.log")"
grep -q "was not stopped" "$dir/forbidden.log" && fail "execve returned under the filter"
# --no-seccomp: the same call goes through (and fails: no such file)
if VQCOWD_TEST_FORBIDDEN_CALL=1 start "$dir/off.log" "$vqcowd" --socket-path "$sock" \
	--blk-file "$dir/img" --no-seccomp; then
	[ "$(seccomp_mode "$pid")" = 0 ] || fail "--no-seccomp: a filter is installed"
	it_stop
fi
grep -q "execve was not stopped" "$dir/off.log" || fail "--no-seccomp: the test hook did not run"

# ---- the systemd unit ----
unit=$src/contrib/systemd/vqcowd@.service.in
user=$(sed -n 's/^User=//p' "$unit")
[ -n "$user" ] && [ "$user" != root ] && [ "$user" != 0 ] || fail "the unit has no non-root User="
grep -q "^u $user " "$src/contrib/systemd/vqcow.sysusers.conf" ||
	fail "vqcow.sysusers.conf does not create $user"
if command -v systemd-analyze >/dev/null; then
	mkdir -p "$dir/units"
	# the source templates, with what the build substitutes (the man page
	# is not installed here: install.tree verifies the installed units)
	subst="s#@bindir@/vqcowd#$vqcowd#; s#@docdir@#/usr/share/doc/vqcow#; s#man:vqcowd(8) ##"
	sed "$subst" "$unit" >"$dir/units/vqcowd@vm1.service"
	sed "$subst" "$src/contrib/systemd/vqcowd@.socket.in" >"$dir/units/vqcowd@vm1.socket"
	(cd "$dir/units" && systemd-analyze verify ./vqcowd@vm1.service) >"$dir/verify" 2>&1 ||
		fail "systemd-analyze verify: $(cat "$dir/verify")"
fi
if command -v systemd-socket-activate >/dev/null && command -v setpriv >/dev/null; then
	# ExecStart as written, run the way the unit runs it: the dedicated
	# user (nobody stands in for it), the sockets passed as fds 3 and 4.
	exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
	VQCOW_IMAGE=$dir/img
	VQCOWD_OPTS=
	eval "set -- ${exec_start//\$\{VQCOW_IMAGE\}/\$VQCOW_IMAGE}"
	shift
	chown nobody "$dir/img"
	[ "$(grep -c '^ListenStream=' "$src/contrib/systemd/vqcowd@.socket.in")" = 2 ] ||
		fail "vqcowd@.socket: expected two ListenStream= (vhost-user, QMP)"
	if start "$dir/unit.log" systemd-socket-activate -l "$sock" -l "$dir/qmp" \
		setpriv --reuid=nobody --regid=nogroup --clear-groups "$vqcowd" "$@"; then
		"$fe" verify "$sock" --size 1M --seed 5 >/dev/null || fail "verify (socket-activated)"
		"$fe" info "$sock" >/dev/null
		python3 - "$dir/qmp" <<'PY' || fail "QMP on the socket-activated fd 4"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rwb")
assert "QMP" in json.loads(f.readline())
f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-blockstats"}\n')
f.flush()
assert json.loads(f.readline()) == {"return": {}}
r = json.loads(f.readline())["return"]
assert r[0]["stats"]["wr_operations"] > 0, r
PY
		vq=$(pgrep -P "$pid" -x vqcowd || echo "$pid")
		[ "$(seccomp_mode "$vq")" = 2 ] || fail "socket-activated: no seccomp filter"
		it_stop
	fi
	grep -q "running as root" "$dir/unit.log" && fail "root warning as the unit's user"
	grep -q "serving" "$dir/unit.log" || fail "the unit's command line did not serve: $(cat "$dir/unit.log")"
else
	echo "note: systemd-socket-activate or setpriv missing: unit command line not run"
fi

it_finish
