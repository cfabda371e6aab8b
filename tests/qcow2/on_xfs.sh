#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Run a command with its work directory on a fresh XFS file system: a sparse
# file in DIR, mkfs.xfs, loop-mounted on a short /tmp/vqxfs.* directory (unix
# socket paths under it must stay below 108 bytes). Every "@MNT@" in the
# command is replaced by the mount point. XFS differs from ext4 where the qcow2 engine
# leans on the file system: fallocate ZERO_RANGE/PUNCH_HOLE (XFS flushes and
# converts extents, and zeroes past EOF differently), unwritten extents,
# O_DIRECT alignment, speculative preallocation.
#
# Usage: on_xfs.sh [-s SECTOR_SIZE] DIR COMMAND [ARGS...]
# Exit status: the command's; 77 (ctest SKIP) when the file system cannot be
# made here: not root, no mkfs.xfs, no loop device, no XFS in the kernel, no
# mount namespace. The mount lives in a private mount namespace (unshare -m),
# so it and its loop device (autoclear) go away with the last process even if
# this script is SIGKILLed; the EXIT trap unmounts, detaches and removes the
# file system image on every other path.
set -uo pipefail

sector=
if [ "${1:-}" = -s ]; then
	sector=$2
	shift 2
fi
dir=${1:?usage: on_xfs.sh [-s SECTOR_SIZE] DIR COMMAND [ARGS...]}
shift
[ $# -gt 0 ] || { echo "usage: on_xfs.sh [-s SECTOR_SIZE] DIR COMMAND [ARGS...]" >&2; exit 2; }

skip() {
	echo "SKIP: no XFS file system for this test: $*"
	exit 77
}

if [ -z "${VQCOW_XFS_NS:-}" ]; then
	[ "$(id -u)" = 0 ] || skip "needs root (mkfs, losetup, mount)"
	command -v mkfs.xfs >/dev/null || skip "mkfs.xfs not installed (xfsprogs)"
	command -v unshare >/dev/null || skip "unshare not installed (util-linux)"
	grep -qw xfs /proc/filesystems || modprobe xfs 2>/dev/null || true
	grep -qw xfs /proc/filesystems || skip "the kernel has no XFS"
	unshare -m --propagation private true 2>/dev/null || skip "cannot make a mount namespace"
	VQCOW_XFS_NS=1 exec unshare -m --propagation private "$0" ${sector:+-s "$sector"} "$dir" "$@"
fi

# Inside the private mount namespace from here on.
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
fsimg="$dir/xfs.img"
mnt=
loop=
mounted=
cleanup() {
	local rc=$?
	if [ -n "$mounted" ]; then
		umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null ||
			echo "on_xfs: cannot unmount $mnt" >&2
	fi
	if [ -n "$loop" ]; then
		losetup -d "$loop" 2>/dev/null || true
	fi
	rm -f "$fsimg"
	[ -n "$mnt" ] && rmdir "$mnt" 2>/dev/null
	exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

rm -f "$fsimg"
truncate -s 2G "$fsimg" || { echo "on_xfs: cannot create $fsimg" >&2; exit 1; }
mkfs.xfs -q ${sector:+-s size=$sector} "$fsimg" || { echo "on_xfs: mkfs.xfs failed" >&2; exit 1; }
loop=$(losetup -f --show ${sector:+-b "$sector"} "$fsimg" 2>/dev/null) || {
	loop=
	skip "no loop device available (losetup -f: $(losetup -f 2>&1))"
}
mnt=$(mktemp -d /tmp/vqxfs.XXXXXX) || { echo "on_xfs: mktemp failed" >&2; exit 1; }
mount -t xfs "$loop" "$mnt" || skip "mounting $loop (XFS) failed"
mounted=1
echo "on_xfs: XFS on $loop (sector size $(blockdev --getss "$loop"), block size" \
	"$(stat -f -c %S "$mnt")) at $mnt"
# Detaching a mounted loop device marks it autoclear: the kernel releases it
# with the mount, also when the namespace dies with a SIGKILLed script.
losetup -d "$loop" 2>/dev/null && loop=
fstype=$(stat -f -c %T "$mnt")
[ "$fstype" = xfs ] || { echo "on_xfs: $mnt is $fstype, not xfs" >&2; exit 1; }

args=()
for a in "$@"; do
	args+=("${a//@MNT@/$mnt}")
done
"${args[@]}"
