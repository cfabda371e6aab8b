#!/usr/bin/env bash
# QEMU's own vhost-user-blk qtest against vqcowd: the six vhost-user-blk
# cases of QEMU's tests/qtest/qos-test (basic, indirect, idx, nxvirtq,
# hotplug, multiqueue on i440FX's PCI bus), with qsd-vqcowd.sh standing in
# for qemu-storage-daemon. QEMU's test drives a virtio-blk device through
# the qtest accelerator (no guest kernel) and checks every request's result.
#
#   run-qtest.sh VQCOWD WORKDIR
#
# qos-test and its qemu-system-x86_64 come from build-qemu.sh's cache; when
# they are not there (contrib/test.sh builds them first) the test is a
# visible skip (77) saying why.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 2 ] || { echo "usage: $0 VQCOWD WORKDIR" >&2; exit 2; }
vqcowd=$(realpath "$1")
work=$2
bin=$(bash "$here/build-qemu.sh" --cached) || exit 77
cat "$bin/STAMP"

rm -rf "$work"
mkdir -p "$work"
cd "$work" # qos-test creates its images in the current directory
export TMPDIR=$work QTEST_QEMU_BINARY=$bin/qemu-system-x86_64
export QTEST_QEMU_STORAGE_DAEMON_BINARY=$here/qsd-vqcowd.sh VQCOW_QTEST_VQCOWD=$vqcowd

prefix=/x86_64/pc/i440FX-pcihost/pci-bus-pc/pci-bus/vhost-user-blk-pci
want=("$prefix/vhost-user-blk/vhost-user-blk-tests/basic"
	"$prefix/vhost-user-blk/vhost-user-blk-tests/indirect"
	"$prefix/vhost-user-blk-pci-tests/idx"
	"$prefix/vhost-user-blk-pci-tests/nxvirtq"
	"$prefix/vhost-user-blk-pci-tests/hotplug"
	"$prefix/vhost-user-blk-pci-tests/multiqueue")
"$bin/qos-test" -l >list.txt 2>list.err || {
	cat list.err >&2
	echo "qtest: qos-test -l failed" >&2
	exit 1
}
mapfile -t have < <(grep -F "$prefix/" list.txt || true)
if [ "${#have[@]}" -ne "${#want[@]}" ]; then
	echo "qtest: expected ${#want[@]} vhost-user-blk cases, qos-test lists ${#have[@]}:" >&2
	printf '  %s\n' "${have[@]}" >&2
	exit 1
fi

fail=0
for t in "${want[@]}"; do
	grep -qxF "$t" list.txt || { echo "qtest: qos-test does not list $t" >&2; fail=1; continue; }
	rc=0
	timeout -k 5 120 "$bin/qos-test" --tap -p "$t" >out.txt 2>err.txt || rc=$?
	if [ "$rc" -eq 0 ] && grep -q "^ok 1 $t\$" out.txt; then
		echo "PASS $t"
	else
		echo "FAIL $t (exit status $rc)"
		sed 's/^/  | /' out.txt err.txt
		fail=1
	fi
done
exit $fail
