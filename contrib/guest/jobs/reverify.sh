# Re-read a file system written by the e2e job (after a reconnect or a
# restart of the backend): e2fsck, mount read-only, print every file's sha256
# as "VQCOW-GUEST: FILE <sha256> <path>" for the host to compare.
. /etc/vqcow-lib.sh
set -u
dev=${VQCOW_DEV:-/dev/vda}
wait_dev "$dev" 30 || exit 1
if ! /sbin/e2fsck -fn "$dev" >/tmp/fsck.out 2>&1; then
	cat /tmp/fsck.out
	mark "STEP e2fsck FAILED"
	exit 1
fi
mark "STEP e2fsck ok"
mkdir -p /mnt/t
mount -t ext4 -o ro "$dev" /mnt/t || { mark "STEP mount FAILED"; exit 1; }
(cd /mnt/t && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum) >/tmp/manifest ||
	{ umount /mnt/t; mark "STEP checksum FAILED"; exit 1; }
umount /mnt/t || { mark "STEP umount FAILED"; exit 1; }
mark "STEP reread-files ok $(wc -l </tmp/manifest) files"
while read -r sum path; do
	mark "FILE $sum ${path#./}"
done </tmp/manifest
exit 0
