#!/usr/bin/env bash
# Install everything vqcow needs to build, test and demo on Debian 12.
# Idempotent; skips apt when all packages are already present.
# dpkg-dev ... libfdt-dev: tests/qtest/build-qemu.sh builds QEMU's qos-test
# from Debian's qemu source (the qtest.vhost_user_blk test).
set -euo pipefail
pkgs=(build-essential cmake pkg-config clang-format
      liburing-dev libcap-ng-dev libseccomp-dev libcunit1-dev zlib1g-dev libzstd-dev libjansson-dev libdeflate-dev
      qemu-system-x86 qemu-utils qemu-block-extra fio busybox-static cpio libnbd-bin
      e2fsprogs gnuplot-nox python3 util-linux procps kmod systemd
      xfsprogs clang libclang-rt-14-dev llvm
      scdoc mandoc
      dpkg-dev meson ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev
      glusterfs-server glusterfs-client   # e2e_migration_gluster: shared storage for real
      libvirt-daemon-system libvirt-clients) # e2e_libvirt: the libvirt example run by libvirtd
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	SUDO=""
	[ "$(id -u)" = 0 ] || SUDO=sudo
	echo "deps: installing ${missing[*]}"
	$SUDO apt-get update -q
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
