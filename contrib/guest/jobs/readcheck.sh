# Read path check against content prepared on the host: the whole disk read
# with O_DIRECT in 1 MiB requests must hash to vqcow.sha256; then 32 MiB of
# random 4 KiB reads (fio, 2 jobs, iodepth 32) must complete without error. With vqcow.expect_ro=1 the disk
# must be read-only (VIRTIO_BLK_F_RO) and a write attempt must fail.
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
want=${VQCOW_SHA256:-}
[ -n "$want" ] || { mark "STEP readcheck FAILED: no vqcow.sha256 given"; exit 1; }
wait_dev "$dev" 30 || exit 1
blk=${dev#/dev/}
ro=$(cat /sys/block/$blk/ro)
if [ "${VQCOW_EXPECT_RO:-0}" = 1 ]; then
	[ "$ro" = 1 ] || { mark "STEP read-only FAILED: /sys/block/$blk/ro is $ro"; exit 1; }
	if dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then
		mark "STEP read-only FAILED: a write to the read-only disk succeeded"
		exit 1
	fi
	mark "STEP read-only ok (write refused)"
fi
got=$(dd if="$dev" iflag=direct bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
	mark "STEP read-all FAILED: sha256 $got, expected $want"
	exit 1
fi
mark "STEP read-all ok $(($(dev_bytes "$dev") / 1048576)) MiB"
# Small random reads on both queues at depth 32 must all succeed.
if ! fio --name=rr --filename="$dev" --direct=1 --readonly --ioengine=io_uring --iodepth=32 \
	--rw=randread --bs=4k --numjobs=2 --size=100% --io_size=32M --group_reporting \
	>/tmp/fio.out 2>&1; then
	cat /tmp/fio.out
	mark "STEP random-read FAILED"
	exit 1
fi
mark "STEP random-read ok"
exit 0
