# Load for the interruption tests (run-e2e.sh --kill-frontend/--kill-backend):
# random 4k/64k writes and reads over the whole disk, 2 jobs x iodepth 32,
# until the host kills QEMU or the daemon. Prints "VQCOW-GUEST: STEP
# stress-running" once fio is under way.
#   vqcow.dev=/dev/vda  vqcow.runtime=600
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
runtime=${VQCOW_RUNTIME:-600}
wait_dev "$dev" 30 || exit 1
fio --name=stress --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 \
	--rw=randrw --rwmixread=30 --bssplit=4k/50:64k/50 --numjobs=2 --offset_increment=50% \
	--size=50% --time_based --runtime="$runtime" --group_reporting >/tmp/fio.out 2>&1 &
fio_pid=$!
# fio is running when its jobs have opened the device and issued I/O.
n=0
while [ $n -lt 60 ]; do
	[ "$(awk '{print $1 + $5}' /sys/block/${dev#/dev/}/stat)" -gt 1000 ] && break
	kill -0 $fio_pid 2>/dev/null || break
	sleep 0.5
	n=$((n + 1))
done
if ! kill -0 $fio_pid 2>/dev/null; then
	cat /tmp/fio.out
	mark "STEP stress-running FAILED: fio did not start"
	exit 1
fi
mark "STEP stress-running ok"
wait $fio_pid
rc=$?
cat /tmp/fio.out
exit $rc
