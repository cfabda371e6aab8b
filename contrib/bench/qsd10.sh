#!/bin/bash
# SPDX-License-Identifier: MIT
#
# Fetch qemu-storage-daemon 10.0 from Debian bookworm-backports into a private
# prefix and print the path of a wrapper that runs it:
#
#   QSD=$(bash contrib/bench/qsd10.sh) && "$QSD" --version
#
# Nothing is installed system-wide: apt-get runs with its own sources list,
# state and cache under the prefix (default ~/.cache/vqcow/qsd10, or
# $QSD10_PREFIX) and only downloads (apt-get download); the packages are
# unpacked there with dpkg -x. The system's QEMU (7.2, used by the tests)
# stays as it is. Idempotent: a second run only prints the path.
set -euo pipefail
prefix=${QSD10_PREFIX:-$HOME/.cache/vqcow/qsd10}
wrapper=$prefix/qemu-storage-daemon
if [ -x "$wrapper" ] && "$wrapper" --version >/dev/null 2>&1; then
	echo "$wrapper"
	exit 0
fi
mkdir -p "$prefix"/{apt/lists/partial,apt/cache/archives/partial,debs,root}
cat >"$prefix/apt/sources.list" <<EOF
deb http://deb.debian.org/debian bookworm-backports main
EOF
: >"$prefix/apt/status"
apt_opts=(-o "Dir::Etc::SourceList=$prefix/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State::Lists=$prefix/apt/lists" -o "Dir::State::status=$prefix/apt/status"
	-o "Dir::Cache=$prefix/apt/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get -q "${apt_opts[@]}" update >&2
# qemu-storage-daemon is in qemu-utils in 10.0 (in qemu-system-common in
# 7.2); the rest of its libraries come
# from bookworm itself (backports are built against it)
(cd "$prefix/debs" && apt-get -q "${apt_opts[@]}" download qemu-utils >&2)
for d in "$prefix"/debs/*.deb; do
	dpkg -x "$d" "$prefix/root"
done
bin=$prefix/root/usr/bin/qemu-storage-daemon
[ -x "$bin" ] || { echo "qsd10: no qemu-storage-daemon in the package" >&2; exit 1; }
if ldd "$bin" | grep -q "not found"; then
	echo "qsd10: libraries missing on this system:" >&2
	ldd "$bin" | grep "not found" >&2
	exit 1
fi
cat >"$wrapper" <<EOF
#!/bin/sh
# qemu-storage-daemon from bookworm-backports, unpacked by contrib/bench/qsd10.sh
exec "$bin" "\$@"
EOF
chmod +x "$wrapper"
"$wrapper" --version >&2
echo "$wrapper"
