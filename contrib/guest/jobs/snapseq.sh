# Online snapshot test (tests/e2e/run-snapshot.sh): sequence-numbered 4 KiB
# blocks written one after the other with O_DIRECT at block i (i = 1..N,
# vqcow.seq, default 200), each completion announced as "SEQ-DONE i" after
# the write returned, while fio writes at random with crc32c verify on
# [64M, 64M + 16M). The host takes a snapshot meanwhile and checks that it
# holds a prefix 1..k of the sequence with k >= the last SEQ-DONE it saw
# before the command.
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
# (not "n": wait_dev uses that name)
total=${VQCOW_SEQ:-200}
wait_dev "$dev" 30 || exit 1
mark "STEP find-disk ok"
/usr/bin/fio --name=load --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=8 \
	--rw=randwrite --bs=4k --offset=64M --size=16M --verify=crc32c >/tmp/fio.out 2>&1 &
fio_pid=$!
i=1
while [ "$i" -le "$total" ]; do
	if ! printf 'VQCOWSEQ %08d\n' "$i" |
		dd of="$dev" bs=4096 seek="$i" count=1 oflag=direct conv=sync,notrunc 2>/tmp/dd.err; then
		mark "STEP seq FAILED at block $i: $(cat /tmp/dd.err)"
		exit 1
	fi
	mark "SEQ-DONE $i"
	i=$((i + 1))
done
if ! wait "$fio_pid"; then
	cat /tmp/fio.out
	mark "STEP fio-verify FAILED"
	exit 1
fi
mark "STEP seq ok $total blocks; fio verify ok"
exit 0
