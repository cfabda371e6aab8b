# End-to-end data check of a vhost-user-blk disk, run by /init inside the guest.
#   vqcow.dev=/dev/vda   the disk (default /dev/vda)
#   vqcow.fiosize=64M    bytes written (and verified) by each of the two fio jobs
# Steps: (1) fio random writes of mixed 4k/64k blocks, two jobs (io_uring and
# libaio, one per vCPU so both virtqueues carry requests), crc32c verify of
# every block, with flushes; (2) discard and write-zeroes (when offered) next to
# verified data; (3) mkfs.ext4, write files, record their sha256, sync, umount,
# drop caches, e2fsck, mount again, compare.
# Prints "VQCOW-GUEST: STEP <name> ok|FAILED ..." and, for the host's own
# check of the image, "VQCOW-GUEST: FILE <sha256> <path>" per file.
# Exit status 0 only when every step passed.
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
fiosize=${VQCOW_FIOSIZE:-64M}
ncpu=$(grep -c ^processor /proc/cpuinfo)

wait_dev "$dev" 30 || exit 1
bytes=$(dev_bytes "$dev")
mark "STEP find-disk ok $dev $bytes bytes, $(cat /sys/block/${dev#/dev/}/mq/*/nr_tags 2>/dev/null | wc -l) hw queue(s), $ncpu cpu(s)"

tobytes() { # 64M -> bytes (K/M/G suffixes)
	case "$1" in
	*K) echo $((${1%K} * 1024)) ;;
	*M) echo $((${1%M} * 1048576)) ;;
	*G) echo $((${1%G} * 1073741824)) ;;
	*) echo "$1" ;;
	esac
}

# --- 1. fio with verification ----------------------------------------------
cpu1=0
[ "$ncpu" -gt 1 ] && cpu1=1
lbs=$(cat /sys/block/${dev#/dev/}/queue/logical_block_size)
cat >/tmp/verify.fio <<EOF
[global]
filename=$dev
direct=1
iodepth=16
size=$fiosize
verify=crc32c
do_verify=1
verify_fatal=1
verify_dump=0
end_fsync=1
randrepeat=0
group_reporting=0

[uring]
ioengine=io_uring
rw=randwrite
bssplit=4k/50:64k/50
offset=0
cpus_allowed=0

[aio]
ioengine=libaio
rw=randwrite
bssplit=4k/50:64k/50
offset=$fiosize
cpus_allowed=$cpu1
fsync=256

# Sequential, synchronous, every size from one logical block to 1 MiB (big
# requests become long descriptor chains), after the two random jobs' regions.
[seq]
ioengine=psync
iodepth=1
rw=write
bsrange=$lbs-1M
blockalign=$lbs
offset=$((2 * $(tobytes "$fiosize")))
size=32M
cpus_allowed=0
EOF
if fio --output-format=normal /tmp/verify.fio >/tmp/fio.out 2>&1; then
	if grep -qi 'verify: bad\|bad magic\|crc32c: verify failed\|err= *[1-9]' /tmp/fio.out; then
		cat /tmp/fio.out
		mark "STEP fio-verify FAILED: errors in fio output"
		exit 1
	fi
	grep -E '^ *(WRITE|READ):|^[a-z]+: \(groupid|err=' /tmp/fio.out
	mark "STEP fio-verify ok"
else
	cat /tmp/fio.out
	mark "STEP fio-verify FAILED: fio exit status nonzero"
	exit 1
fi

# --- 2. discard and write-zeroes, when the device offers them --------------------
# The first fio job's region [0, fiosize) must survive both untouched; a
# zeroed range must read back as zeroes (a discarded one may read anything).
blk=${dev#/dev/}
region=$(tobytes "$fiosize")
sum_a() { dd if="$dev" iflag=direct bs=1M count=$((region / 1048576)) 2>/dev/null | sha256sum | cut -d' ' -f1; }
before=$(sum_a)
did=""
if [ "$(cat /sys/block/$blk/queue/discard_max_bytes 2>/dev/null || echo 0)" != 0 ]; then
	if ! /usr/sbin/blkdiscard -o "$region" -l 4194304 "$dev"; then
		mark "STEP discard FAILED: blkdiscard -o $region -l 4M"
		exit 1
	fi
	did="$did discard"
fi
if [ "$(cat /sys/block/$blk/queue/write_zeroes_max_bytes 2>/dev/null || echo 0)" != 0 ] &&
	[ -x /usr/sbin/blkdiscard ]; then
	zoff=$((region + 8388608))
	# 3 MiB + 4 KiB at a 4 KiB-aligned, not 1 MiB-aligned, offset
	zoff=$((zoff + 12288))
	zlen=$((3145728 + 4096))
	if ! /usr/sbin/blkdiscard -z -o "$zoff" -l "$zlen" "$dev"; then
		mark "STEP write-zeroes FAILED: blkdiscard -z -o $zoff -l $zlen"
		exit 1
	fi
	got=$(dd if="$dev" iflag=direct,skip_bytes,count_bytes skip="$zoff" count="$zlen" bs=4096 2>/dev/null | sha256sum | cut -d' ' -f1)
	want=$(head -c "$zlen" /dev/zero | sha256sum | cut -d' ' -f1)
	if [ "$got" != "$want" ]; then
		mark "STEP write-zeroes FAILED: range $zoff+$zlen does not read back as zeroes"
		exit 1
	fi
	did="$did write-zeroes"
fi
q=/sys/block/$blk/queue
echo "e2e: discard_max_bytes=$(cat $q/discard_max_bytes 2>/dev/null) write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes 2>/dev/null) logical_block_size=$(cat $q/logical_block_size) physical_block_size=$(cat $q/physical_block_size) write_cache=$(cat $q/write_cache 2>/dev/null | tr " " _)"
if [ -n "$did" ]; then
	if [ "$(sum_a)" != "$before" ]; then
		mark "STEP discard FAILED: data outside the discarded/zeroed ranges changed"
		exit 1
	fi
	mark "STEP discard ok:$did (neighbouring data intact)"
else
	mark "STEP discard skipped: the device offers neither discard nor write-zeroes"
fi

# --- 3. ext4: files survive umount/mount ----------------------------------------
if ! /sbin/mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -L vqcow-e2e "$dev" >/tmp/mkfs.out 2>&1; then
	cat /tmp/mkfs.out
	mark "STEP mkfs FAILED"
	exit 1
fi
mark "STEP mkfs ok"

mkdir -p /mnt/t
mount -t ext4 "$dev" /mnt/t || { mark "STEP mount FAILED"; exit 1; }
mkdir -p /mnt/t/small
{
	head -c 1 /dev/urandom >/mnt/t/one-byte
	head -c 12345 /dev/urandom >/mnt/t/odd-size
	head -c 4096 /dev/urandom >/mnt/t/block
	head -c 1048576 /dev/urandom >/mnt/t/one-mib
	head -c 9000001 /dev/urandom >/mnt/t/nine-mb
	i=0
	while [ $i -lt 64 ]; do
		head -c $((i * 97 + 1)) /dev/urandom >/mnt/t/small/f$i
		i=$((i + 1))
	done
	# A file written with holes and an overwrite in the middle.
	dd if=/dev/urandom of=/mnt/t/sparse bs=4096 seek=1000 count=3 2>/dev/null
	dd if=/dev/urandom of=/mnt/t/sparse bs=512 seek=100 count=1 conv=notrunc 2>/dev/null
} || { mark "STEP write-files FAILED"; exit 1; }
(cd /mnt/t && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum) >/tmp/manifest || { mark "STEP checksum FAILED"; exit 1; }
sync
umount /mnt/t || { mark "STEP umount FAILED"; exit 1; }
# Nothing of the file system may come from a cache on the way back in.
blockdev --flushbufs "$dev" 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
mark "STEP write-files ok $(wc -l </tmp/manifest) files"

if ! /sbin/e2fsck -fn "$dev" >/tmp/fsck.out 2>&1; then
	cat /tmp/fsck.out
	mark "STEP e2fsck FAILED"
	exit 1
fi
mark "STEP e2fsck ok"

mount -t ext4 "$dev" /mnt/t || { mark "STEP remount FAILED"; exit 1; }
if ! (cd /mnt/t && sha256sum -c -s /tmp/manifest); then
	(cd /mnt/t && sha256sum -c /tmp/manifest) 2>&1 | grep -v ': OK$'
	umount /mnt/t
	mark "STEP verify-files FAILED"
	exit 1
fi
umount /mnt/t || { mark "STEP final-umount FAILED"; exit 1; }
mark "STEP verify-files ok"
while read -r sum path; do
	mark "FILE $sum ${path#./}"
done </tmp/manifest
exit 0
