# Online resize seen by a running guest: write a pattern at the start, say
# "STEP resize-ready" (the host then grows the disk over QMP block_resize),
# wait until the kernel sees vqcow.newsize bytes without a reboot
# (/sys/block/vda/size, changed by the config-change notice), write and
# verify the new area with fio (past the old end, up to 32 MiB), write the
# disk's last 4 KiB and read them back, and check the pattern at the start.
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
want=${VQCOW_NEWSIZE:-}
[ -n "$want" ] || { mark "STEP resize FAILED: no vqcow.newsize given"; exit 1; }
wait_dev "$dev" 30 || exit 1
mark "STEP find-disk ok"
old=$(dev_bytes "$dev")
dd if=/dev/urandom of=/tmp/head bs=1M count=1 2>/dev/null
dd if=/tmp/head of="$dev" bs=1M oflag=direct conv=notrunc 2>/dev/null ||
	{ mark "STEP write-head FAILED"; exit 1; }
mark "STEP resize-ready $old"
n=0
while [ "$(dev_bytes "$dev")" != "$want" ]; do
	n=$((n + 1))
	if [ $n -gt 120 ]; then
		mark "STEP resize-seen FAILED: $(dev_bytes "$dev") bytes after 60 s, want $want"
		exit 1
	fi
	sleep 0.5
done
mark "STEP resize-seen ok $old -> $want bytes"
len=$((want - old))
[ $len -gt 33554432 ] && len=33554432
if ! /usr/bin/fio --name=grown --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 \
	--rw=randwrite --bs=4k --offset="$old" --size="$len" --verify=crc32c \
	--do_verify=1 --verify_fatal=1 >/tmp/fio.out 2>&1; then
	cat /tmp/fio.out
	mark "STEP grown-area FAILED"
	exit 1
fi
mark "STEP grown-area ok $len bytes written and verified past the old end"
dd if=/dev/urandom of=/tmp/tail bs=4096 count=1 2>/dev/null
dd if=/tmp/tail of="$dev" bs=4096 seek=$((want / 4096 - 1)) oflag=direct conv=notrunc 2>/dev/null ||
	{ mark "STEP last-block FAILED: write"; exit 1; }
dd if="$dev" of=/tmp/tail2 bs=4096 skip=$((want / 4096 - 1)) count=1 iflag=direct 2>/dev/null
cmp -s /tmp/tail /tmp/tail2 || { mark "STEP last-block FAILED: read back differs"; exit 1; }
dd if="$dev" of=/tmp/head2 bs=1M count=1 iflag=direct 2>/dev/null
cmp -s /tmp/head /tmp/head2 || { mark "STEP head FAILED: the data before the resize changed"; exit 1; }
mark "STEP last-block ok"
exit 0
