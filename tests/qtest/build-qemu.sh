#!/usr/bin/env bash
# Build QEMU's qtest pieces that Debian does not ship: tests/qtest/qos-test
# and a qemu-system-x86_64 with the qtest accelerator, from Debian's qemu
# SOURCE package of the installed qemu-system-x86 version (Debian's patches
# applied by dpkg-source), configured with only what the vhost-user-blk
# cases need. The result is cached in ~/.cache/vqcow/qemu-qtest-<version>
# (or $VQCOW_QTEST_CACHE), so every run after the first is instant.
#
#   build-qemu.sh            build if not cached; print the bin directory
#   build-qemu.sh --cached   print the bin directory if cached, else exit 77
#
# Nothing is installed system-wide: apt-get runs with its own sources list
# (deb-src of the suites the system uses), state and cache under the cache
# directory and only downloads the source; the build dependencies come from
# contrib/deps.sh. The build's output goes to <cache>/build.log; on failure
# its tail is printed and the script exits 77 (the test skips visibly) when
# the build is not possible here (no source, no network), 1 when it failed.
set -euo pipefail
mode=${1:-build}
ver=$(dpkg-query -W -f='${source:Version}' qemu-system-x86 2>/dev/null) || {
	echo "qtest: qemu-system-x86 is not installed" >&2
	exit 77
}
vdir=${ver#*:} # no epoch in file names
cache=${VQCOW_QTEST_CACHE:-$HOME/.cache/vqcow/qemu-qtest-$vdir}
bin=$cache/bin
log=$cache/build.log

cached() { [ -x "$bin/qos-test" ] && [ -x "$bin/qemu-system-x86_64" ] && [ -f "$bin/STAMP" ]; }
if cached; then
	echo "$bin"
	exit 0
fi
if [ "$mode" = --cached ]; then
	echo "qtest: QEMU's qos-test is not built for qemu $ver (bash $0 builds it in $cache)" >&2
	[ -f "$cache/FAILED" ] && sed 's/^/qtest: last build: /' "$cache/FAILED" >&2
	exit 77
fi

mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
if cached; then
	echo "$bin"
	exit 0
fi
rm -f "$cache/FAILED"
: >"$log"
fail() { # rc reason
	echo "$2" >"$cache/FAILED"
	echo "qtest: $2; the last lines of $log:" >&2
	tail -n 40 "$log" >&2
	exit "$1"
}
[ -f /usr/include/libfdt.h ] || fail 77 "libfdt-dev is missing (bash contrib/deps.sh installs it)"
for t in dpkg-source meson ninja pkg-config cc python3; do
	command -v "$t" >/dev/null || fail 77 "$t is missing (bash contrib/deps.sh installs it)"
done
for pc in glib-2.0 pixman-1 zlib; do
	pkg-config --exists "$pc" || fail 77 "pkg-config module $pc is missing (bash contrib/deps.sh installs it)"
done

t0=$(date +%s)
# 1. The source: a private apt with deb-src for the system's suites.
apt_dir=$cache/apt
mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial} "$cache/src"
kr=/usr/share/keyrings/debian-archive-keyring.gpg
cat >"$apt_dir/sources.list" <<EOS
deb-src [signed-by=$kr] http://deb.debian.org/debian bookworm main
deb-src [signed-by=$kr] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=$kr] http://deb.debian.org/debian-security bookworm-security main
EOS
: >"$apt_dir/status"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
	-o "Dir::Cache=$apt_dir/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
srcdir=$(find "$cache/src" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n 1)
if [ -z "$srcdir" ]; then
	echo "=== apt-get source qemu=$ver" >>"$log"
	apt-get -q "${apt_opts[@]}" update >>"$log" 2>&1 ||
		fail 77 "apt-get update of the deb-src lists failed (no network?)"
	(cd "$cache/src" && apt-get -q "${apt_opts[@]}" source --download-only "qemu=$ver") >>"$log" 2>&1 ||
		fail 77 "apt-get source qemu=$ver failed (source not in the archive or no network)"
	dsc=$(ls "$cache"/src/qemu_*.dsc | head -n 1)
	(cd "$cache/src" && dpkg-source -x "$dsc") >>"$log" 2>&1 || fail 1 "dpkg-source -x $dsc failed"
	srcdir=$(find "$cache/src" -mindepth 1 -maxdepth 1 -type d -name 'qemu-*' | head -n 1)
fi
t1=$(date +%s)

# 2. Configure: one target, the qtest accelerator comes with every softmmu
# build; no TCG (the qtest accelerator drives the machine), KVM only because
# an x86 build needs one real accelerator; no UI, no docs, no debug info, -O1:
# the binaries only serve this test. --enable-tools because qos-test has the
# vhost-user-blk cases only then (none of the tools is built: ninja builds the
# two targets).
b=$srcdir/build-qtest
if [ ! -f "$b/build.ninja" ]; then
	rm -rf "$b"
	mkdir -p "$b"
	echo "=== configure" >>"$log"
	(cd "$b" && ../configure --target-list=x86_64-softmmu --without-default-features \
		--enable-kvm --disable-tcg --enable-vhost-user --enable-vhost-user-blk-server \
		--disable-docs --enable-tools --disable-guest-agent --disable-debug-info \
		--disable-werror --extra-cflags=-O1 \
		--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu) >>"$log" 2>&1 ||
		fail 1 "QEMU's configure failed"
fi
t2=$(date +%s)

# 3. Build only the two binaries.
echo "=== ninja" >>"$log"
nice ninja -C "$b" -j"$(nproc)" qemu-system-x86_64 tests/qtest/qos-test >>"$log" 2>&1 ||
	fail 1 "building qemu-system-x86_64 and tests/qtest/qos-test failed"
t3=$(date +%s)
mkdir -p "$bin"
cp "$b/qemu-system-x86_64" "$b/tests/qtest/qos-test" "$bin/"
printf 'qos-test and qemu-system-x86_64 (qtest accelerator) from Debian qemu %s\n' "$ver" >"$bin/STAMP"
printf 'first build: fetch %ss, configure %ss, build %ss\n' $((t1 - t0)) $((t2 - t1)) $((t3 - t2)) >>"$bin/STAMP"
# keep the binaries and the log only (the tree is >1 GB; the binaries need
# nothing from it: the firmware comes from /usr/share/qemu)
rm -rf "$cache/src" "$cache/apt"
echo "qtest: built in $((t3 - t0))s (fetch $((t1 - t0))s, configure $((t2 - t1))s, build $((t3 - t2))s)" >&2
echo "$bin"
