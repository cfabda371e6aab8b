#!/usr/bin/env bash
# The libvirt example for real: contrib/libvirt/domain-example.xml must
# validate against libvirt's schema (virt-xml-validate) and translate to a
# QEMU command line with a vhost-user-blk-pci device, shared memfd memory and
# the reconnecting chardev (virsh domxml-to-native); then a domain made from
# it (only what this machine needs changed: name, memory, TCG when KVM cannot
# boot the guest, the test guest's kernel and console file, the socket path;
# the disk element with its reconnect setting kept as it is) is defined and
# started by libvirtd on a vqcowd socket; the guest must find its disk, vqcowd
# is killed with SIGKILL and started again on the same socket, and the guest
# must finish its job (fio randwrite+verify, ext4) with PASS and no I/O error.
#
#   run-libvirt.sh --vqcowd PATH --guest-dir DIR --work-dir DIR
#
# Uses a running libvirtd (qemu:///system) or starts one for the test. Exits
# 77, saying why, where it cannot run: not root, libvirt or QEMU not
# installed, libvirtd not starting. The schema and domxml-to-native checks
# still run (and must pass) when only the guest part cannot.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
# shellcheck source=../../contrib/guest/vm-lib.sh
. "$top/contrib/guest/vm-lib.sh"
VM_LOG_TAG=libvirt

vqcowd="" guest="" work=""
while [ $# -gt 0 ]; do
	case "$1" in
	--vqcowd) vqcowd=$2; shift 2 ;;
	--guest-dir) guest=$2; shift 2 ;;
	--work-dir) work=$2; shift 2 ;;
	*) echo "usage: $0 --vqcowd PATH --guest-dir DIR --work-dir DIR" >&2; exit 2 ;;
	esac
done
[ -x "$vqcowd" ] && [ -n "$guest" ] && [ -n "$work" ] || { echo "need all options" >&2; exit 2; }
skip() { echo "SKIP: $*" >&2; exit 77; }
for t in virsh virt-xml-validate libvirtd qemu-system-x86_64 qemu-img python3; do
	command -v $t >/dev/null 2>&1 ||
		skip "$t not installed (Debian: libvirt-daemon-system libvirt-clients, qemu-system-x86)"
done
[ "$(id -u)" = 0 ] || skip "needs root (libvirtd, qemu:///system)"

example=$top/contrib/libvirt/domain-example.xml
# The domain's name is this work directory's own: two build trees' runs at
# once on one libvirtd (a CI clone beside a developer's) defined, started and
# undefined each other's domain under one name.
name=vqcow-e2e-libvirt-$(printf '%s' "$work" | md5sum | cut -c1-10)
V() { virsh -q -c qemu:///system "$@"; }
lpid="" lgpid="" vpid=""
fail() {
	vm_log "FAIL: $*"
	for f in "$work"/*.log; do echo "== $f"; tail -n 30 "$f"; done >&2
	exit 1
}
cleanup() {
	V destroy "$name" >/dev/null 2>&1
	V undefine "$name" >/dev/null 2>&1
	[ -n "$vpid" ] && kill "$vpid" 2>/dev/null
	[ -n "$lpid" ] && kill "$lpid" 2>/dev/null
	[ -n "$lgpid" ] && kill "$lgpid" 2>/dev/null
	wait 2>/dev/null
}
trap cleanup EXIT

# libvirt-qemu must reach the files: a world-traversable work directory.
rm -rf "$work" && mkdir -p "$work" && chmod 755 "$work" || exit 1

# ---- 1. the example as it is ----
virt-xml-validate "$example" domain >"$work/validate.log" 2>&1 ||
	fail "virt-xml-validate: $(cat "$work/validate.log")"
vm_log "$(cat "$work/validate.log")"
if ! V version >/dev/null 2>&1; then
	libvirtd --pid-file "$work/libvirtd.pid" >"$work/libvirtd.log" 2>&1 &
	lpid=$!
	for ((i = 0; i < 100; i++)); do
		V version >/dev/null 2>&1 && break
		kill -0 "$lpid" 2>/dev/null || break
		sleep 0.1
	done
	V version >/dev/null 2>&1 || { lpid=""; skip "libvirtd does not start here (guest part)"; }
	vm_log "started libvirtd (pid $lpid)"
fi
V domxml-to-native qemu-argv "$example" >"$work/argv.txt" 2>"$work/argv.log" ||
	fail "domxml-to-native: $(cat "$work/argv.log")"
for want in 'vhost-user-blk-pci' 'memory-backend-memfd' '"share":true|share=(on|yes)' \
	'path=/run/vqcow/vm1.sock,reconnect=10' '"num-queues":2|num-queues=2'; do
	grep -Eq -- "$want" "$work/argv.txt" || fail "the example's QEMU command lacks '$want': $(cat "$work/argv.txt")"
done
# QEMU's console goes through virtlogd (socket-activated by systemd where
# systemd runs; started here otherwise)
if [ ! -S /run/libvirt/virtlogd-sock ] && command -v virtlogd >/dev/null 2>&1; then
	virtlogd >"$work/virtlogd.log" 2>&1 &
	lgpid=$!
	for ((i = 0; i < 50; i++)); do
		[ -S /run/libvirt/virtlogd-sock ] && break
		sleep 0.1
	done
fi
vm_log "domxml-to-native: vhost-user-blk-pci, shared memfd memory, socket chardev with reconnect=10"

# ---- 2. a domain made from it, on a real vqcowd ----
vm_guest_build "$guest" || fail "guest build failed"
accel=$(vm_pick_accel "$guest")
cp "$guest/vmlinuz" "$guest/initrd.img" "$work/" || exit 1
qemu-img create -q -f qcow2 "$work/disk.qcow2" 1G || exit 1
sock=$work/vm.sock
# daemon: start vqcowd; 0 once it listens on $sock, 1 if it exited (e.g. the
# image still locked by a daemon killed a moment ago)
daemon() {
	"$vqcowd" --socket-path "$sock" --blk-file "$work/disk.qcow2" --format qcow2 \
		--num-queues 2 --user libvirt-qemu --group kvm >>"$work/vqcowd.log" 2>&1 &
	vpid=$!
	vm_wait_socket "$sock" "$vpid" 10 && return 0
	wait "$vpid" 2>/dev/null
	vpid=""
	return 1
}
python3 - "$example" "$work" "$name" "$accel" "$sock" >"$work/domain.xml" <<'PY' || fail "domain XML"
import sys, xml.etree.ElementTree as ET
src, work, name, accel, sock = sys.argv[1:]
d = ET.parse(src).getroot()
d.set('type', 'kvm' if accel == 'kvm' else 'qemu')
d.find('name').text = name
for tag in ('memory', 'currentMemory'):
    e = d.find(tag); e.set('unit', 'MiB'); e.text = '512'
if accel != 'kvm':
    d.remove(d.find('cpu'))  # host-passthrough needs KVM
os_ = d.find('os')
for tag, text in (('kernel', work + '/vmlinuz'), ('initrd', work + '/initrd.img'),
                  ('cmdline', 'console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=e2e vqcow.fiosize=64M')):
    ET.SubElement(os_, tag).text = text
dev = d.find('devices')
for e in list(dev):
    if e.tag in ('interface', 'serial', 'console'):
        dev.remove(e)
ser = ET.SubElement(dev, 'serial', type='file')
ET.SubElement(ser, 'source', path=work + '/console.log')
ET.SubElement(ser, 'target', port='0')
disk = dev.find("disk[@type='vhostuser']")
disk.find('source').set('path', sock)  # driver, target and <reconnect> as in the example
d.find('on_reboot').text = 'destroy'
print(ET.tostring(d, encoding='unicode'))
PY
virt-xml-validate "$work/domain.xml" domain >/dev/null 2>&1 || fail "the derived domain does not validate"
daemon || fail "vqcowd did not start"
# a killed run of this tree may have left its domain defined
V destroy "$name" >/dev/null 2>&1
V undefine "$name" >/dev/null 2>&1
V define "$work/domain.xml" >/dev/null || fail "virsh define"
V start "$name" >"$work/start.log" 2>&1 || fail "virsh start: $(cat "$work/start.log")"
vm_log "domain $name started (accel $accel)"
t0=$(date +%s)
for ((i = 0; i < 3000; i++)); do
	grep -q "STEP find-disk ok" "$work/console.log" 2>/dev/null && break
	sleep 0.1
done
grep -q "STEP find-disk ok" "$work/console.log" || fail "the guest did not find its disk"
vm_log "$(grep -o 'STEP find-disk ok.*' "$work/console.log")"

# the reconnect setting at work: vqcowd killed, started again on the socket
sleep 3
kill -9 "$vpid"
wait "$vpid" 2>/dev/null
vpid=""
# The dead daemon's socket file stays; without it the path appears only once
# a new daemon listens, so vm_wait_socket cannot take the stale file for it.
rm -f "$sock"
for ((i = 0; i < 50; i++)); do
	daemon && break
	sleep 0.2 # the dead daemon's image locks linger for a moment
done
[ -n "$vpid" ] || fail "no new vqcowd came up after the kill"
vm_log "vqcowd killed with SIGKILL and restarted on $sock"
for ((i = 0; i < 6000; i++)); do
	grep -q "VQCOW-GUEST: \(PASS\|FAIL\)" "$work/console.log" && break
	sleep 0.1
done
grep -q "VQCOW-GUEST: PASS" "$work/console.log" || fail "the guest did not pass its job"
grep -qi "I/O error\|blk_update_request\|critical medium" "$work/console.log" &&
	fail "I/O errors in the guest's kernel log"
[ "$(grep -c 'front-end connected\|vhost: front-end connected' "$work/vqcowd.log")" -ge 2 ] ||
	fail "QEMU did not reconnect to the restarted vqcowd"
vm_log "the guest finished its job with PASS across the vqcowd restart ($(($(date +%s) - t0)) s)"
V destroy "$name" >/dev/null 2>&1
kill "$vpid"
wait "$vpid" || fail "vqcowd exit status"
vpid=""
qemu-img check "$work/disk.qcow2" >"$work/check.log" 2>&1
rc=$?
[ $rc = 0 ] || [ $rc = 3 ] || fail "qemu-img check: $(cat "$work/check.log")"
vm_log "PASS"
trap - EXIT
cleanup
rm -rf "$work"
exit 0
