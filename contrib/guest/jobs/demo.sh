# Demo workload, run by /init inside the guest: fio on the vhost-user disk.
#   vqcow.dev=/dev/vda  vqcow.runtime=10 (seconds per phase)
# Phase 1 writes 32 MiB with crc32c checksums and reads it back verified;
# phase 2 is a timed 4k random read/write mix on both virtqueues. fio's
# summary goes to the console.
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
runtime=${VQCOW_RUNTIME:-10}
wait_dev "$dev" 30 || exit 1
echo "demo: $dev is $(($(dev_bytes "$dev") / 1048576)) MiB; $(grep -c ^processor /proc/cpuinfo) vCPU(s)"

echo "=== fio phase 1: write 32 MiB (4k/64k random), verify with crc32c"
fio --name=verify --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=16 \
	--rw=randwrite --bssplit=4k/50:64k/50 --size=32M --verify=crc32c \
	--do_verify=1 --verify_fatal=1 --end_fsync=1 --clat_percentiles=0 || exit 1

echo "=== fio phase 2: ${runtime}s of 4k random read/write (70/30), 2 jobs, iodepth 32"
fio --name=mix --filename="$dev" --direct=1 --ioengine=io_uring --iodepth=32 \
	--rw=randrw --rwmixread=70 --bs=4k --size=256M --numjobs=2 --offset_increment=256M \
	--time_based --runtime="$runtime" --group_reporting --clat_percentiles=0 || exit 1
exit 0
