# Interactive shell on the console; "exit" or "poweroff -f" ends the guest.
. /etc/vqcow-lib.sh
echo "vqcow guest: busybox shell. fio, mkfs.ext4 and e2fsck are available."
echo "Block devices: $(ls /sys/block | tr '\n' ' ')   Leave with 'exit'."
sh
exit 0
