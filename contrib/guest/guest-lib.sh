# Helpers sourced by the guest's job scripts (installed as /etc/vqcow-lib.sh).
mark() { echo "VQCOW-GUEST: $*"; }

# wait_dev DEV [SECONDS]: wait for a block device node to appear.
wait_dev() {
	dev=$1
	n=${2:-30}
	while [ ! -b "$dev" ] && [ "$n" -gt 0 ]; do
		sleep 1
		n=$((n - 1))
	done
	if [ ! -b "$dev" ]; then
		mark "STEP find-disk FAILED: $dev did not appear; block devices: $(ls /sys/block | tr '\n' ' ')"
		return 1
	fi
	return 0
}

# dev_bytes DEV: size of a block device in bytes.
dev_bytes() {
	b=${1#/dev/}
	echo $(($(cat "/sys/block/$b/size") * 512))
}

# Note: Debian's static busybox runs its own applets before searching PATH
# (blkdiscard, mke2fs, ...). Call the real tools shipped in the initramfs by
# absolute path: /usr/bin/fio, /sbin/mkfs.ext4, /sbin/e2fsck, /usr/sbin/blkdiscard.
