#!/usr/bin/env bash
# Build a tiny test guest for vqcow: Debian 12's stock kernel plus a busybox
# initramfs carrying fio, mkfs.ext4/e2fsck and the kernel modules needed to
# reach a virtio-blk disk and mount ext4 on it.
#
#   build-guest.sh [--kernel-version VER] [--force] OUTDIR
#
# Results (in OUTDIR):
#   vmlinuz         the kernel (from linux-image-VER, unpacked, not installed)
#   initrd.img      gzip'ed newc cpio with /init, busybox, fio, e2fsprogs, modules
#   kernel-version  VER
# The downloaded .deb and the unpacked tree are cached in OUTDIR/cache, and the
# initramfs is only rebuilt when one of its inputs changed, so reruns are fast.
#
# The guest's /init (contrib/guest/init) runs the job named on the kernel
# command line (vqcow.job=NAME -> /jobs/NAME.sh, see contrib/guest/jobs/) and
# prints "VQCOW-GUEST: PASS NAME" or "VQCOW-GUEST: FAIL NAME: why" on the
# serial console, then powers off.
#
# Needs: apt-get (with package lists), dpkg-deb, cpio, gzip, busybox-static,
# fio, e2fsprogs; depmod (kmod) is used when present.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kver=""
force=0
outdir=""
while [ $# -gt 0 ]; do
	case "$1" in
	--kernel-version) kver=$2; shift 2 ;;
	--force) force=1; shift ;;
	-h|--help) sed -n '2,20p' "$0"; exit 0 ;;
	-*) echo "build-guest: unknown option $1" >&2; exit 2 ;;
	*) outdir=$1; shift ;;
	esac
done
[ -n "$outdir" ] || { echo "usage: build-guest.sh [--kernel-version VER] [--force] OUTDIR" >&2; exit 2; }
mkdir -p "$outdir/cache"
outdir=$(cd "$outdir" && pwd)
cache=$outdir/cache

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

for tool in dpkg-deb cpio gzip fio busybox mke2fs e2fsck ldd; do
	command -v "$tool" >/dev/null 2>&1 || die "missing tool '$tool' (run contrib/deps.sh)"
done
busybox_bin=$(command -v busybox)
# The static build is required: the initramfs has no libc for busybox's sake
# alone, and a dynamic busybox would silently depend on what fio pulled in.
if ldd "$busybox_bin" >/dev/null 2>&1; then
	[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 && busybox_bin=/bin/busybox ||
		die "$busybox_bin is dynamically linked; install busybox-static"
fi

# --- 1. the kernel: the current Debian 12 linux-image-*-amd64 ------------------
# The meta package depends on the current ABI's image package.
current_kver() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
apt_update() {
	log "refreshing the package lists (apt-get update)"
	apt-get update -q >&2 || log "apt-get update failed"
}
download() { # PKG into $cache
	(cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2)
}
kver_given=$kver
if [ -z "$kver" ]; then
	if [ -f "$cache/kernel-version" ] && [ $force = 0 ]; then
		kver=$(cat "$cache/kernel-version")
	else
		kver=$(current_kver)
		if [ -z "$kver" ]; then
			apt_update
			kver=$(current_kver)
		fi
		[ -n "$kver" ] || die "cannot find the current linux-image-*-amd64 package (apt-cache depends linux-image-amd64)"
	fi
fi
if [ ! -f "$cache/kernel-$kver/.unpacked" ] || [ $force = 1 ]; then
	deb=$(ls "$cache"/linux-image-"$kver"_*.deb 2>/dev/null | head -n1 || true)
	if [ -z "$deb" ]; then
		log "downloading linux-image-$kver"
		if ! download "linux-image-$kver"; then
			# Stale lists: a security update may have replaced that ABI.
			apt_update
			[ -n "$kver_given" ] || kver=$(current_kver)
			[ -n "$kver" ] || die "cannot find the current linux-image-*-amd64 package"
			log "downloading linux-image-$kver"
			download "linux-image-$kver" || die "apt-get download linux-image-$kver failed"
		fi
		deb=$(ls "$cache"/linux-image-"$kver"_*.deb | head -n1)
	fi
	log "unpacking $(basename "$deb")"
	rm -rf "$cache/kernel-$kver"
	mkdir -p "$cache/kernel-$kver"
	dpkg-deb -x "$deb" "$cache/kernel-$kver"
	touch "$cache/kernel-$kver/.unpacked"
fi
pkg=linux-image-$kver
kroot=$cache/kernel-$kver
echo "$kver" >"$cache/kernel-version"
vmlinuz=$kroot/boot/vmlinuz-$kver
moddir=$kroot/lib/modules/$kver
[ -f "$vmlinuz" ] || die "$vmlinuz not found in $pkg"
[ -d "$moddir" ] || die "$moddir not found in $pkg"

# --- 2. which modules, in which order ---------------------------------------------
# Wanted drivers; whatever of these is built in (=y) is skipped. crc32c is a
# soft dependency of ext4/jbd2 (metadata checksums), loaded explicitly since
# the guest has no modprobe to follow softdeps.
wanted=(virtio_pci virtio_blk crc32c_generic crc32c-intel ext4)
optional=(crc32c-intel) # needs SSE4.2 in the guest CPU; loading may fail

# modules.dep without kmod: "path: dep-path ..." from the depends= field that
# modpost stores in every module's .modinfo section.
ko_cat() {
	case "$1" in
	*.xz) xz -dc "$1" ;;
	*.zst) zstd -qdc "$1" ;;
	*.gz) gzip -dc "$1" ;;
	*) cat "$1" ;;
	esac
}
derive_modules_dep() {
	local rel b name deps d out
	declare -A path_of=()
	while IFS= read -r rel; do
		b=${rel##*/}; b=${b%%.ko*}; path_of[${b//-/_}]=$rel
	done < <(cd "$moddir" && find kernel -name '*.ko*' | LC_ALL=C sort)
	for name in "${!path_of[@]}"; do
		rel=${path_of[$name]}
		deps=$(ko_cat "$moddir/$rel" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
		out="$rel:"
		for d in ${deps//,/ }; do
			[ -n "${path_of[${d//-/_}]:-}" ] && out="$out ${path_of[${d//-/_}]}"
		done
		echo "$out"
	done
}

# modules.dep is not shipped in the package (the postinst runs depmod); make
# one for the unpacked tree. Without kmod, derive it from each .ko's modinfo.
if [ ! -f "$moddir/modules.dep" ] || [ $force = 1 ]; then
	if [ "${VQCOW_GUEST_NO_DEPMOD:-0}" != 1 ] && { command -v depmod >/dev/null 2>&1 || [ -x /usr/sbin/depmod ] || [ -x /sbin/depmod ]; }; then
		depmod_bin=$(command -v depmod || echo /usr/sbin/depmod)
		log "running depmod for $kver"
		"$depmod_bin" -b "$kroot" "$kver"
	else
		log "depmod not found; deriving modules.dep from each module's info"
		derive_modules_dep >"$moddir/modules.dep.tmp"
		mv "$moddir/modules.dep.tmp" "$moddir/modules.dep"
	fi
fi

# Module file of a module name (dashes and underscores are equivalent).
mod_path() {
	local want=${1//-/_} rel b
	while IFS= read -r rel; do
		b=${rel##*/}; b=${b%%.ko*}
		[ "${b//-/_}" = "$want" ] && { echo "$rel"; return 0; }
	done < <(cut -d: -f1 "$moddir/modules.dep")
	return 1
}
builtin_mod() {
	local want=${1//-/_}
	[ -f "$moddir/modules.builtin" ] || return 1
	sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$moddir/modules.builtin" | grep -qx "$want"
}
declare -A seen=()
load_order=()
add_mod() { # depth-first: dependencies first
	local rel=$1 dep
	[ -n "${seen[$rel]:-}" ] && return 0
	seen[$rel]=1
	for dep in $(grep -m1 "^$rel:" "$moddir/modules.dep" | cut -d: -f2-); do
		add_mod "$dep"
	done
	load_order+=("$rel")
}
for m in "${wanted[@]}"; do
	if builtin_mod "$m"; then
		continue
	fi
	rel=$(mod_path "$m") || {
		case " ${optional[*]} " in *" $m "*) continue ;; esac
		die "module $m is neither built into $kver nor shipped as a module"
	}
	add_mod "$rel"
done

# --- 3. the initramfs --------------------------------------------------------------
fio_bin=$(command -v fio)
mke2fs_bin=$(command -v mke2fs)
e2fsck_bin=$(command -v e2fsck)
stamp_src=$(
	echo "v1 $kver ${load_order[*]}"
	for f in "$busybox_bin" "$fio_bin" "$mke2fs_bin" "$e2fsck_bin" $(command -v blkdiscard) "$here/init" "$here/build-guest.sh" "$here/guest-lib.sh" "$here"/jobs/*.sh; do
		echo "$f $(stat -c '%s %Y' "$f")"
	done
)
stamp=$(echo "$stamp_src" | cksum | cut -d' ' -f1)
if [ $force = 0 ] && [ -f "$outdir/initrd.img" ] && [ -f "$outdir/vmlinuz" ] &&
	[ "$(cat "$outdir/.stamp" 2>/dev/null)" = "$stamp" ]; then
	log "up to date ($outdir)"
	echo "$kver" >"$outdir/kernel-version"
	exit 0
fi

stage=$(mktemp -d "$outdir/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,etc,jobs,modules,lib64,root,run}

cp "$busybox_bin" "$stage/bin/busybox"
# One symlink per applet; never shadow the real e2fsprogs/fio we ship.
for applet in $("$busybox_bin" --list-full 2>/dev/null || true); do
	[ -e "$stage/$applet" ] || [ -L "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet" 2>/dev/null || true
done
[ -e "$stage/bin/sh" ] || ln -s busybox "$stage/bin/sh"

# Copy an executable and every shared library ldd lists (plus the loader),
# keeping their paths so the loader finds them.
copy_lib() {
	local src=$1 dst=$stage$1
	[ -e "$dst" ] && return 0
	mkdir -p "$(dirname "$dst")"
	cp -L "$src" "$dst"
}
copy_exe() {
	local exe=$1 dest=$2 lib d
	mkdir -p "$(dirname "$stage$dest")"
	# Drop busybox applets of the same name anywhere on PATH: the real tool wins.
	for d in /bin /sbin /usr/bin /usr/sbin; do
		[ -L "$stage$d/${dest##*/}" ] && rm -f "$stage$d/${dest##*/}"
	done
	rm -f "$stage$dest"
	cp -L "$exe" "$stage$dest"
	while read -r lib; do
		[ -n "$lib" ] && copy_lib "$lib"
	done < <(ldd "$exe" | awk '/=>/ && $3 ~ /^\// {print $3} /^[ \t]*\/[^ ]*ld-linux/ {print $1}')
}
copy_exe "$fio_bin" /usr/bin/fio
copy_exe "$mke2fs_bin" /sbin/mke2fs
ln -sf mke2fs "$stage/sbin/mkfs.ext4"
copy_exe "$e2fsck_bin" /sbin/e2fsck
# util-linux blkdiscard (-z issues BLKZEROOUT: virtio-blk WRITE_ZEROES), over busybox's.
blkdiscard_bin=$(command -v blkdiscard || true)
[ -n "$blkdiscard_bin" ] && copy_exe "$blkdiscard_bin" /usr/sbin/blkdiscard
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$stage/etc/"
# Debian's merged /usr: /lib is /usr/lib; keep both spellings working.
if [ -d "$stage/lib" ] && [ ! -L "$stage/lib" ]; then
	mkdir -p "$stage/usr"
	[ -e "$stage/usr/lib" ] || ln -s ../lib "$stage/usr/lib"
fi

# Modules, flat in /modules, decompressed, with their load order.
: >"$stage/modules/order"
for rel in "${load_order[@]}"; do
	name=${rel##*/}
	ko_cat "$moddir/$rel" >"$stage/modules/${name%.ko*}.ko"
	name=${name%.ko*}.ko
	opt=0
	b=${name%.ko}
	for o in "${optional[@]}"; do [ "${o//-/_}" = "${b//-/_}" ] && opt=1; done
	echo "$name $opt" >>"$stage/modules/order"
done

install -m 0755 "$here/init" "$stage/init"
install -m 0644 "$here/guest-lib.sh" "$stage/etc/vqcow-lib.sh"
for j in "$here"/jobs/*.sh; do
	install -m 0755 "$j" "$stage/jobs/"
done
echo "$kver" >"$stage/etc/kernel-version"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
printf 'root:x:0:\n' >"$stage/etc/group"

log "packing initramfs (${#load_order[@]} modules)"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
	gzip -6 >"$outdir/initrd.img.tmp"
mv "$outdir/initrd.img.tmp" "$outdir/initrd.img"
cp "$vmlinuz" "$outdir/vmlinuz.tmp" && mv "$outdir/vmlinuz.tmp" "$outdir/vmlinuz"
echo "$kver" >"$outdir/kernel-version"
echo "$stamp" >"$outdir/.stamp"
log "done: $outdir/vmlinuz $outdir/initrd.img ($(du -h "$outdir/initrd.img" | cut -f1))"
