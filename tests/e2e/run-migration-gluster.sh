#!/usr/bin/env bash
# Live migration with the image on real shared storage: a one-brick GlusterFS
# volume on this machine, mounted twice through FUSE as the two "hosts"; the
# source vqcowd opens the image through one mount, the destination vqcowd
# through the other, and run-migration.sh does the rest (a failed migration,
# one failed after the switchover began, one under fio randwrite+verify; the
# disk an overlay on a backing file; qemu-img check).
#
#   run-migration-gluster.sh --vqcowd PATH --guest-dir DIR --work-dir DIR
#
# First it probes what the mount offers and prints it: O_DIRECT, OFD locks
# seen across the two mounts, fallocate modes (and whether ZERO_RANGE really
# zeroes). Uses a running glusterd (the Debian service) or starts one for the
# test. Exits 77, saying why, where it cannot run: not root, glusterfs-server
# or glusterfs-client not installed, no /dev/fuse, glusterd not starting, the
# volume or a mount refused.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
vqcowd="" guest="" work=""
while [ $# -gt 0 ]; do
	case "$1" in
	--vqcowd) vqcowd=$2; shift 2 ;;
	--guest-dir) guest=$2; shift 2 ;;
	--work-dir) work=$2; shift 2 ;;
	*) echo "usage: $0 --vqcowd PATH --guest-dir DIR --work-dir DIR" >&2; exit 2 ;;
	esac
done
[ -n "$vqcowd" ] && [ -n "$guest" ] && [ -n "$work" ] || { echo "need all options" >&2; exit 2; }
log() { echo "[$(date +%T)] gluster: $*" >&2; }
skip() { echo "SKIP: $*" >&2; exit 77; }

[ "$(id -u)" = 0 ] || skip "needs root (glusterd, FUSE mounts)"
for t in glusterd gluster mount.glusterfs; do
	command -v $t >/dev/null 2>&1 ||
		skip "$t not installed (Debian packages glusterfs-server, glusterfs-client)"
done
for t in qemu-system-x86_64 qemu-img python3; do
	command -v $t >/dev/null 2>&1 || skip "$t not installed"
done
[ -c /dev/fuse ] || skip "no /dev/fuse (FUSE unavailable here)"

# One volume per work directory: glusterd is shared by everything on the
# host, and two runs on one volume name (two build trees, a CI run beside a
# developer's) stopped and deleted each other's volume mid-run, which the
# guest saw as I/O errors. The same work directory keeps its name, so a run
# still cleans up what a killed run of that tree left.
vol=vqcow-e2e-$(printf '%s' "$work" | md5sum | cut -c1-10)
host=$(hostname) # glusterd refuses localhost and 127.0.0.1 as brick hosts
mnt_a=$work/host-a mnt_b=$work/host-b brick=$work/brick
gpid=""
gl() { gluster --mode=script "$@"; }

cleanup() {
	umount "$mnt_a" 2>/dev/null || umount -l "$mnt_a" 2>/dev/null
	umount "$mnt_b" 2>/dev/null || umount -l "$mnt_b" 2>/dev/null
	gl volume stop "$vol" force >/dev/null 2>&1
	gl volume delete "$vol" >/dev/null 2>&1
	# a stop that failed (glusterd slow under load) leaves the brick's
	# glusterfsd running, orphaned once our glusterd goes: end it by name
	pkill -f -- "--volfile-id $vol\\." 2>/dev/null
	if [ -n "$gpid" ]; then
		kill "$gpid" 2>/dev/null
		wait "$gpid" 2>/dev/null
	fi
}

# A previous run's leftovers: mounts first, so rm never walks into the volume.
mkdir -p "$work"
umount "$mnt_a" 2>/dev/null; umount "$mnt_b" 2>/dev/null
if ! gl pool list >/dev/null 2>&1; then
	glusterd -N --log-file="$work/glusterd.log" &
	gpid=$!
	for ((i = 0; i < 100; i++)); do
		gl pool list >/dev/null 2>&1 && break
		kill -0 "$gpid" 2>/dev/null || break
		sleep 0.1
	done
	gl pool list >/dev/null 2>&1 ||
		{ cleanup; skip "glusterd does not start here (see $work/glusterd.log)"; }
	log "started glusterd (pid $gpid)"
fi
trap cleanup EXIT
gl volume stop "$vol" force >/dev/null 2>&1
gl volume delete "$vol" >/dev/null 2>&1
rm -rf "$brick" "$mnt_a" "$mnt_b"
mkdir -p "$brick" "$mnt_a" "$mnt_b"
out=$(gl volume create "$vol" "$host:$brick" force 2>&1) || skip "volume create refused: $out"
# File sizes coherent between the mounts (README "Live migration"): without
# these a mount sees another mount's growth of a file only up to ~1 s late,
# and an O_DIRECT read past the size it still believes returns end-of-file.
gl volume set "$vol" performance.stat-prefetch off >/dev/null ||
	skip "volume option performance.stat-prefetch refused"
out=$(gl volume start "$vol" 2>&1) || skip "volume start refused: $out"
mopt=attribute-timeout=0,entry-timeout=0
timeout 60 mount -t glusterfs -o $mopt "$host:/$vol" "$mnt_a" || skip "FUSE mount of $host:/$vol failed"
timeout 60 mount -t glusterfs -o $mopt "$host:/$vol" "$mnt_b" || skip "second FUSE mount failed"
log "volume $vol ($(gluster --version | head -n1)), brick $brick, mounted at $mnt_a and $mnt_b"

# What the mount offers (informational; vqcowd copes with each answer).
python3 - "$mnt_a" "$mnt_b" <<'PY' >&2
import ctypes, fcntl, mmap, os, struct, sys
a, b = sys.argv[1], sys.argv[2]
pa, pb = os.path.join(a, 'probe'), os.path.join(b, 'probe')
with open(pa, 'wb') as f:
    f.truncate(4 << 20)
say = lambda *x: print('gluster: probe:', *x)
try:
    fd = os.open(pa, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 65536)
    buf.write(b'\xab' * 65536)
    os.pwritev(fd, [buf], 1 << 20)
    fdb = os.open(pb, os.O_RDONLY | os.O_DIRECT)
    got = mmap.mmap(-1, 65536)
    os.preadv(fdb, [got], 1 << 20)
    say('O_DIRECT: yes (a 64 KiB write is read back through the other mount:',
        got[:] == buf[:], ')')
except OSError as e:
    say('O_DIRECT: no:', e)
    fd = os.open(pa, os.O_RDWR)
    fdb = os.open(pb, os.O_RDONLY)
def lk(fd, cmd, typ):
    try:
        return struct.unpack('hhqqi', fcntl.fcntl(fd, cmd, struct.pack('hhqqi', typ, 0, 101, 1, 0)))[0]
    except OSError as e:
        return e.strerror
F_OFD_GETLK, F_OFD_SETLK = 36, 37
say('OFD lock taken through mount A:', lk(fd, F_OFD_SETLK, fcntl.F_WRLCK) == fcntl.F_WRLCK)
say('... seen through mount B (F_OFD_GETLK):', lk(fdb, F_OFD_GETLK, fcntl.F_RDLCK) == fcntl.F_WRLCK,
    '; refused there (F_OFD_SETLK):', lk(fdb, F_OFD_SETLK, fcntl.F_RDLCK))
libc = ctypes.CDLL(None, use_errno=True)
for mode, name in ((0, 'allocate'), (1, 'KEEP_SIZE'), (3, 'PUNCH_HOLE'), (0x11, 'ZERO_RANGE')):
    os.pwritev(fd, [buf], 1 << 20)
    r = libc.fallocate(fd, mode, ctypes.c_long(1 << 20), ctypes.c_long(65536))
    res = 'ok' if r == 0 else os.strerror(ctypes.get_errno())
    if mode in (3, 0x11) and r == 0:
        got = mmap.mmap(-1, 65536)
        os.preadv(fd, [got], 1 << 20)
        res += ', range reads as zeroes: %s' % (got[:] == b'\0' * 65536)
    say('fallocate %s: %s' % (name, res))
os.ftruncate(fd, 4 << 20)
os.stat(pb)
os.pwritev(fd, [buf], 8 << 20)  # grows the file through mount A
say('size through mount B right after mount A grew the file: %d (want %d)'
    % (os.stat(pb).st_size, (8 << 20) + 65536))
os.unlink(pa)
PY

bash "$here/run-migration.sh" --backing --vqcowd "$vqcowd" --guest-dir "$guest" \
	--work-dir "$work/migration" --img-dirs "$mnt_a,$mnt_b"
rc=$?
[ $rc = 0 ] && log "PASS: migration on GlusterFS"
exit $rc
