#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Benchmark harness: vqcowd vs qemu-storage-daemon (qsd) vs the host's own
# limit (fio with io_uring + O_DIRECT on a raw file), on every image kind.
# See contrib/bench/README.md for the method and contrib/bench/RESULTS.md
# for results. Run `bash contrib/bench/run.sh --help`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
BENCHPY="$here/bench.py"

usage() {
	cat <<'EOF'
usage: bash contrib/bench/run.sh [options]

Drives vqcowd and qemu-storage-daemon with the same host-side vhost-user
frontend (vqcow-fe bench), on the same images, alternating the two backends,
and runs fio on the host against a raw file for the physical limit.

  --quick              1 repetition, 3 s per job, 1 GiB images (smoke run)
  --reps N             repetitions (default 3)
  --runtime S          seconds per job (default 10)
  --size SIZE          image size, e.g. 4G (default 4G; the L2-cache image is 1T)
  --dir DIR            directory for images, on a real disk (default build/bench-images)
  --build DIR          build directory with src/vqcowd and tests/frontend/vqcow-fe
                       (default build/; configured and built if binaries are missing)
  --no-build           never run deps.sh/cmake; fail if binaries are missing
  --out DIR            results root (default contrib/bench/out); each run writes
                       DIR/<timestamp>/ and updates DIR/latest
  --images LIST        comma-separated subset of images (default: all), see --list
  --jobs LIST          comma-separated subset of jobs (default: all), see --list
  --backends LIST      subset of vqcowd,qsd,limit (default: all three)
  --num-queues N       virtqueues for both backends (default 1)
  --vqcowd-arg ARG     extra argument for vqcowd (repeatable), e.g. --vqcowd-arg=--poll-ns=20000
  --fe-arg ARG         extra argument for vqcow-fe bench (repeatable), e.g. --fe-arg=--poll
  --qsd-iothread       run the qsd export in an iothread (default: main loop)
  --guest              also boot a QEMU guest against each backend and run fio inside
  --guest-only         only the in-guest runs (no host-side matrix)
  --guest-runtime S    seconds per in-guest fio job (default 20; 5 with --quick)
  --guest-images LIST  images for the in-guest runs (default qcow2-full)
  --guest-jobs LIST    jobs for the in-guest runs (default randread-4k-qd32,randwrite-4k-qd32)
  --guest-dir DIR      where build-guest.sh puts the guest (default <build>/guest)
  --fresh-images       recreate the persistent images even if they look up to date
  --keep-images        keep the per-run (fresh) image copies after each run
  --no-check           skip `qemu-img check` of qcow2 images after each write job
  --update-results     rewrite the generated part of contrib/bench/RESULTS.md
                       (default: only after a full default matrix without --quick)
  --no-update-results  never touch RESULTS.md
  --caveat TEXT        a note printed in bold in the report (e.g. "machine was busy")
  --list               print the matrix and an estimate of the run time, then exit
  -h, --help           this text

Environment: VQCOWD, VQCOW_FE, QSD, FIO, QEMU override the binaries.
EOF
}

# ---------------------------------------------------------------- defaults
reps=""
runtime=""
size=""
quick=0
imgdir="$repo/build/bench-images"
builddir="$repo/build"
nobuild=0
outroot="$here/out"
sel_images=""
sel_jobs=""
backends="vqcowd,qsd,limit"
nq=1
vqcowd_extra=()
fe_extra=()
qsd_iothread=0
guest=0
guest_runtime=""
guest_images=qcow2-full
guest_jobs=randread-4k-qd32,randwrite-4k-qd32
guest_dir=""
guest_note=""
guest_only=0
fresh_images=0
keep_images=0
check_images=1
update_results=auto
caveat=""
list_only=0
orig_args="$*"

while [ $# -gt 0 ]; do
	case "$1" in
	--quick) quick=1 ;;
	--reps) reps=$2; shift ;;
	--reps=*) reps=${1#*=} ;;
	--runtime) runtime=$2; shift ;;
	--runtime=*) runtime=${1#*=} ;;
	--size) size=$2; shift ;;
	--size=*) size=${1#*=} ;;
	--dir) imgdir=$2; shift ;;
	--dir=*) imgdir=${1#*=} ;;
	--build) builddir=$2; shift ;;
	--build=*) builddir=${1#*=} ;;
	--no-build) nobuild=1 ;;
	--out) outroot=$2; shift ;;
	--out=*) outroot=${1#*=} ;;
	--images) sel_images=$2; shift ;;
	--images=*) sel_images=${1#*=} ;;
	--jobs) sel_jobs=$2; shift ;;
	--jobs=*) sel_jobs=${1#*=} ;;
	--backends) backends=$2; shift ;;
	--backends=*) backends=${1#*=} ;;
	--num-queues) nq=$2; shift ;;
	--num-queues=*) nq=${1#*=} ;;
	--vqcowd-arg) vqcowd_extra+=("$2"); shift ;;
	--vqcowd-arg=*) vqcowd_extra+=("${1#*=}") ;;
	--fe-arg) fe_extra+=("$2"); shift ;;
	--fe-arg=*) fe_extra+=("${1#*=}") ;;
	--qsd-iothread) qsd_iothread=1 ;;
	--guest) guest=1 ;;
	--guest-only) guest=1; guest_only=1 ;;
	--guest-runtime) guest_runtime=$2; shift ;;
	--guest-runtime=*) guest_runtime=${1#*=} ;;
	--guest-images) guest_images=$2; shift ;;
	--guest-images=*) guest_images=${1#*=} ;;
	--guest-jobs) guest_jobs=$2; shift ;;
	--guest-jobs=*) guest_jobs=${1#*=} ;;
	--guest-dir) guest_dir=$2; shift ;;
	--guest-dir=*) guest_dir=${1#*=} ;;
	--fresh-images) fresh_images=1 ;;
	--keep-images) keep_images=1 ;;
	--no-check) check_images=0 ;;
	--update-results) update_results=yes ;;
	--no-update-results) update_results=no ;;
	--caveat) caveat=$2; shift ;;
	--caveat=*) caveat=${1#*=} ;;
	--list) list_only=1 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
	esac
	shift
done

if [ $quick = 1 ]; then
	: "${reps:=1}" "${runtime:=3}" "${size:=1G}" "${guest_runtime:=5}"
else
	: "${reps:=3}" "${runtime:=10}" "${size:=4G}" "${guest_runtime:=20}"
fi
case "$reps$runtime$nq" in *[!0-9]*) echo "run.sh: --reps/--runtime/--num-queues must be integers" >&2; exit 2 ;; esac
[ "$reps" -ge 1 ] && [ "$runtime" -ge 1 ] && [ "$nq" -ge 1 ] || { echo "run.sh: --reps/--runtime/--num-queues must be >= 1" >&2; exit 2; }
size_bytes=$(numfmt --from=iec "$size") || { echo "run.sh: bad --size $size" >&2; exit 2; }
if [ $((size_bytes % 1048576)) -ne 0 ] || [ "$size_bytes" -lt $((64 * 1048576)) ]; then
	echo "run.sh: --size must be a multiple of 1M and at least 64M" >&2
	exit 2
fi
big_bytes=$((1024 * 1024 * 1024 * 1024)) # the L2-cache image: 1 TiB

# ---------------------------------------------------------------- the matrix
# Jobs: name rw bs iodepth rwmixread
JOBS=(
	"randread-4k-qd1 randread 4k 1 -"
	"randread-4k-qd32 randread 4k 32 -"
	"randwrite-4k-qd1 randwrite 4k 1 -"
	"randwrite-4k-qd32 randwrite 4k 32 -"
	"read-1m-qd8 read 1M 8 -"
	"write-1m-qd8 write 1M 8 -"
	"randrw70-4k-qd32 randrw 4k 32 70"
)
ALL_JOBS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 read-1m-qd8 write-1m-qd8 randrw70-4k-qd32"
WRITE_JOBS="randwrite-4k-qd1 randwrite-4k-qd32 write-1m-qd8 randrw70-4k-qd32"
# Images: name, jobs run on it, lifetime
#   persistent: created once (and kept between invocations), reused by every run
#               (writes do not change its layout: every cluster/block is allocated)
#   fresh:      recreated before every single run (job x backend x repetition)
IMAGES=(
	"raw|$ALL_JOBS|persistent"
	"qcow2-full|$ALL_JOBS|persistent"
	"qcow2-empty|$WRITE_JOBS|fresh"
	"qcow2-empty-xl2|$WRITE_JOBS|fresh"
	"qcow2-prealloc-metadata|$ALL_JOBS|fresh"
	"qcow2-prealloc-falloc|$ALL_JOBS|fresh"
	"qcow2-overlay|$ALL_JOBS|fresh"
	"qcow2-1t-metadata|randread-4k-qd1 randread-4k-qd32|persistent"
)
IMAGE_NAMES=()
for e in "${IMAGES[@]}"; do IMAGE_NAMES+=("${e%%|*}"); done

in_list() { # word comma-or-space-list
	case ",${2// /,}," in *",$1,"*) return 0 ;; esac
	return 1
}
spec_of() { # job name -> "rw bs iodepth rwmixread"
	local want=$1 j
	for j in "${JOBS[@]}"; do
		set -- $j
		if [ "$1" = "$want" ]; then
			echo "$2 $3 $4 $5"
			return 0
		fi
	done
	return 1
}

if [ -n "$sel_images" ]; then
	for i in ${sel_images//,/ }; do
		in_list "$i" "${IMAGE_NAMES[*]}" || { echo "run.sh: unknown image $i (known: ${IMAGE_NAMES[*]})" >&2; exit 2; }
	done
fi
if [ -n "$sel_jobs" ]; then
	for j in ${sel_jobs//,/ }; do
		in_list "$j" "$ALL_JOBS" || { echo "run.sh: unknown job $j (known: $ALL_JOBS)" >&2; exit 2; }
	done
fi
for b in ${backends//,/ }; do
	in_list "$b" "vqcowd,qsd,limit" || { echo "run.sh: unknown backend $b" >&2; exit 2; }
done
want_image() { [ -z "$sel_images" ] || in_list "$1" "$sel_images"; }
want_job() { [ -z "$sel_jobs" ] || in_list "$1" "$sel_jobs"; }
want_backend() { in_list "$1" "$backends"; }

# cells: "image job" pairs that will run
CELLS=()
[ $guest_only = 1 ] && IMAGES_HOST=() || IMAGES_HOST=("${IMAGES[@]}")
for e in "${IMAGES_HOST[@]}"; do
	name=${e%%|*}
	rest=${e#*|}
	jobs=${rest%%|*}
	want_image "$name" || continue
	for j in $jobs; do
		want_job "$j" && CELLS+=("$name $j")
	done
done
# limit runs: "limitname job" pairs needed by the cells
LIMITS=()
if want_backend limit; then
	for c in "${CELLS[@]}"; do
		set -- $c
		l=limit
		[ "$1" = qcow2-1t-metadata ] && l=limit-1t
		in_list "$l:$2" "${LIMITS[*]:-}" || LIMITS+=("$l:$2")
	done
fi
nb=0
want_backend vqcowd && nb=$((nb + 1))
want_backend qsd && nb=$((nb + 1))
nruns=$(((${#CELLS[@]} * nb + ${#LIMITS[@]}) * reps))

if [ $guest = 1 ]; then
	for i in ${guest_images//,/ }; do
		in_list "$i" "${IMAGE_NAMES[*]}" || { echo "run.sh: unknown guest image $i" >&2; exit 2; }
	done
	for j in ${guest_jobs//,/ }; do
		in_list "$j" "$ALL_JOBS" || { echo "run.sh: unknown guest job $j" >&2; exit 2; }
	done
fi
if [ $list_only = 1 ] || { [ ${#CELLS[@]} = 0 ] && [ $guest_only = 0 ]; }; then
	echo "jobs:"
	printf '  %s\n' "${JOBS[@]}"
	echo "images (name|jobs|lifetime):"
	printf '  %s\n' "${IMAGES[@]}"
	echo "selected: ${#CELLS[@]} cells x $nb backend(s) + ${#LIMITS[@]} limit runs, x $reps repetition(s) = $nruns runs of ${runtime}s"
	echo "estimated time: ~$(((nruns * (runtime + 4) + 59) / 60)) min plus image preparation"
	[ ${#CELLS[@]} = 0 ] && [ $guest_only = 0 ] && { echo "run.sh: nothing selected" >&2; exit 2; }
	exit 0
fi

# ---------------------------------------------------------------- tools
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { echo "run.sh: $*" >&2; exit 1; }

need_build=0
need_fe=0
[ ${#CELLS[@]} -gt 0 ] && { want_backend vqcowd || want_backend qsd; } && need_fe=1
want_backend vqcowd && { [ -x "${VQCOWD:-$builddir/src/vqcowd}" ] || need_build=1; }
[ $need_fe = 1 ] && { [ -x "${VQCOW_FE:-$builddir/tests/frontend/vqcow-fe}" ] || need_build=1; }
missing_tool=0
for t in fio qemu-img qemu-storage-daemon gnuplot python3; do
	command -v "$t" >/dev/null 2>&1 || missing_tool=1
done
if [ $nobuild = 0 ] && { [ $need_build = 1 ] || [ $missing_tool = 1 ]; }; then
	log "installing dependencies (contrib/deps.sh) and building into $builddir"
	bash "$repo/contrib/deps.sh"
	if [ $need_build = 1 ]; then
		[ -f "$builddir/CMakeCache.txt" ] || cmake -S "$repo" -B "$builddir" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
		cmake --build "$builddir" -j"$(nproc)" --target vqcowd vqcow-fe ||
			log "warning: build of vqcowd/vqcow-fe failed"
	fi
fi
VQCOWD=${VQCOWD:-$builddir/src/vqcowd}
VQCOW_FE=${VQCOW_FE:-$builddir/tests/frontend/vqcow-fe}
QSD=${QSD:-qemu-storage-daemon}
FIO=${FIO:-fio}
QEMU=${QEMU:-qemu-system-x86_64}
want_backend vqcowd && { [ -x "$VQCOWD" ] || die "vqcowd not found at $VQCOWD (build it, or --backends qsd,limit)"; }
if [ $need_fe = 1 ]; then
	[ -x "$VQCOW_FE" ] || die "vqcow-fe not found at $VQCOW_FE (build it, or --backends limit)"
fi
for t in "$FIO" qemu-img "$QSD" python3; do
	command -v "$t" >/dev/null 2>&1 || die "$t not found (bash contrib/deps.sh)"
done
clk_tck=$(getconf CLK_TCK)
guest_dir=${guest_dir:-$builddir/guest}

# ---------------------------------------------------------------- directories
mkdir -p "$imgdir" "$outroot"
imgdir=$(cd "$imgdir" && pwd)
fstype=$(stat -f -c %T "$imgdir")
case "$fstype" in
tmpfs | ramfs | overlayfs) die "$imgdir is on $fstype; images must live on a real disk (--dir)" ;;
esac
need_kib=$(((size_bytes * 5 + 300 * 1048576) / 1024))
avail_kib=$(df -Pk "$imgdir" | awk 'NR==2 {print $4}')
[ "$avail_kib" -ge "$need_kib" ] || die "$imgdir: $((avail_kib / 1024)) MiB free, need ~$((need_kib / 1024)) MiB (use --size or --dir)"

stamp=$(date +%Y%m%d-%H%M%S)
out="$outroot/$stamp"
mkdir -p "$out/raw" "$out/logs"
ln -sfn "$stamp" "$outroot/latest"
csv="$out/results.csv"
guest_csv="$out/guest.csv"
rundir=$(mktemp -d /tmp/vqcow-bench.XXXXXX) # sockets (short paths)

BPID=""
QPID=""
cleanup() {
	[ -n "$BPID" ] && kill -KILL "$BPID" 2>/dev/null || true
	[ -n "$QPID" ] && kill -KILL "$QPID" 2>/dev/null || true
	rm -rf "$rundir"
	[ $keep_images = 1 ] || rm -f "$imgdir"/run-* 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted" >&2; exit 130' INT TERM

# ---------------------------------------------------------------- images
img_file() { # name -> persistent path
	case "$1" in
	raw) echo "$imgdir/raw-$size.img" ;;
	qcow2-full) echo "$imgdir/full-$size.qcow2" ;;
	qcow2-1t-metadata) echo "$imgdir/meta-1t.qcow2" ;;
	base) echo "$imgdir/base-$size.qcow2" ;;
	limit-1t) echo "$imgdir/limit-1t.raw" ;;
	esac
}
up_to_date() { # file recipe
	[ $fresh_images = 0 ] && [ -f "$1" ] && [ -f "$1.recipe" ] && [ "$(cat "$1.recipe")" = "$2" ]
}

prepare_raw() {
	local f recipe
	f=$(img_file raw)
	recipe="raw fio-filled $size_bytes v1"
	up_to_date "$f" "$recipe" && return 0
	log "preparing $f (writing $size with fio)"
	rm -f "$f" "$f.recipe"
	"$FIO" --name=fill --filename="$f" --size="$size_bytes" --rw=write --bs=1M --iodepth=8 \
		--ioengine=io_uring --direct=1 --output=/dev/null >/dev/null
	[ "$(stat -c %s "$f")" = "$size_bytes" ] || die "fill of $f failed"
	echo "$recipe" >"$f.recipe"
}
prepare_full() { # name (qcow2-full or base): every cluster allocated with data
	local f recipe
	f=$(img_file "$1")
	recipe="qcow2 full 64k from raw $size_bytes v1"
	up_to_date "$f" "$recipe" && return 0
	log "preparing $f (qemu-img convert of the raw image)"
	rm -f "$f" "$f.recipe"
	qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$(img_file raw)" "$f"
	qemu-img map --output=json "$f" | python3 "$BENCHPY" check-map --size "$size_bytes" ||
		die "$f is not fully allocated"
	echo "$recipe" >"$f.recipe"
}
prepare_1t() {
	local f recipe
	f=$(img_file qcow2-1t-metadata)
	recipe="qcow2 1T preallocation=metadata 64k v1"
	if ! up_to_date "$f" "$recipe"; then
		log "preparing $f (1 TiB, preallocation=metadata: ~160 MiB of metadata)"
		rm -f "$f" "$f.recipe"
		qemu-img create -q -f qcow2 -o cluster_size=65536,preallocation=metadata "$f" 1T
		echo "$recipe" >"$f.recipe"
	fi
	f=$(img_file limit-1t)
	if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" != "$big_bytes" ]; then
		rm -f "$f"
		truncate -s "$big_bytes" "$f"
	fi
}

need_image() { # images the selected cells (and guest runs) need
	local c
	for c in "${CELLS[@]}"; do
		case "$c" in "$1 "*) return 0 ;; esac
	done
	[ $guest = 1 ] && in_list "$1" "$guest_images" && return 0
	return 1
}
need_raw=0
{ need_image raw || need_image qcow2-full || need_image qcow2-overlay; } && need_raw=1
for l in "${LIMITS[@]:-}"; do case "$l" in limit:*) need_raw=1 ;; esac; done
[ $need_raw = 1 ] && prepare_raw
need_image qcow2-full && prepare_full qcow2-full
need_image qcow2-overlay && prepare_full base
{ need_image qcow2-1t-metadata || in_list "limit-1t:randread-4k-qd1" "${LIMITS[*]:-}" ||
	in_list "limit-1t:randread-4k-qd32" "${LIMITS[*]:-}"; } && prepare_1t
# flush what the preparation wrote through the page cache (qemu-img), per file
for f in "$imgdir"/*.img "$imgdir"/*.qcow2; do
	[ -f "$f" ] && sync "$f"
done

# run_image NAME: set RUN_IMG to the image to use for one run, creating a
# fresh one for the "fresh" kinds; sets RUN_FMT (raw|qcow2) and RUN_BACKING.
run_image() {
	local f o="cluster_size=65536"
	RUN_FMT=qcow2
	RUN_BACKING=""
	case "$1" in
	raw) RUN_FMT=raw; RUN_IMG=$(img_file raw); return ;;
	qcow2-full | qcow2-1t-metadata) RUN_IMG=$(img_file "$1"); return ;;
	qcow2-empty) ;;
	qcow2-empty-xl2) o="$o,extended_l2=on" ;;
	qcow2-prealloc-metadata) o="$o,preallocation=metadata" ;;
	qcow2-prealloc-falloc) o="$o,preallocation=falloc" ;;
	qcow2-overlay) RUN_BACKING=$(img_file base) ;;
	esac
	f="$imgdir/run-$1.qcow2"
	rm -f "$f"
	if [ -n "$RUN_BACKING" ]; then
		qemu-img create -q -f qcow2 -o "$o" -b "$RUN_BACKING" -F qcow2 "$f"
	else
		qemu-img create -q -f qcow2 -o "$o" "$f" "$size_bytes"
	fi
	# no fsync: O_DIRECT I/O writes back the page-cache range it touches
	# first, and a journal commit would wait for other writers on this fs
	RUN_IMG=$f
}

# ---------------------------------------------------------------- backends
cpu_ticks() { # pid -> utime+stime of all its threads, in clock ticks
	local s
	s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo -1; return; }
	s=${s##*) }
	set -- $s
	echo $((${12} + ${13}))
}
hwm_kib() {
	local v
	v=$(awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null)
	echo "${v:--1}"
}

# start_backend KIND IMAGE FMT BACKING SOCK LOG: sets BPID, waits for the socket
start_backend() {
	local kind=$1 img=$2 fmt=$3 backing=$4 sock=$5 logf=$6 i
	rm -f "$sock"
	case "$kind" in
	vqcowd)
		"$VQCOWD" --socket-path "$sock" --blk-file "$img" --num-queues "$nq" \
			${vqcowd_extra[@]+"${vqcowd_extra[@]}"} >"$logf" 2>&1 &
		;;
	qsd)
		local a=()
		[ $qsd_iothread = 1 ] && a+=(--object "iothread,id=iot0")
		a+=(--blockdev "driver=file,node-name=f,filename=$img,cache.direct=on,aio=io_uring")
		if [ -n "$backing" ]; then
			a+=(--blockdev "driver=file,node-name=bf,filename=$backing,cache.direct=on,aio=io_uring,read-only=on")
			a+=(--blockdev "driver=qcow2,node-name=b,file=bf,read-only=on")
			a+=(--blockdev "driver=qcow2,node-name=d,file=f,backing=b")
		else
			a+=(--blockdev "driver=$fmt,node-name=d,file=f")
		fi
		local e="type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq"
		[ $qsd_iothread = 1 ] && e="$e,iothread=iot0"
		a+=(--export "$e")
		"$QSD" "${a[@]}" >"$logf" 2>&1 &
		;;
	esac
	BPID=$!
	for i in $(seq 1 200); do
		[ -S "$sock" ] && return 0
		kill -0 "$BPID" 2>/dev/null || break
		sleep 0.05
	done
	echo "run.sh: $kind did not create $sock; log:" >&2
	sed 's/^/    /' "$logf" >&2 || true
	stop_backend
	return 1
}
# stop_backend: SIGTERM, wait (then SIGKILL); sets STOP_RC to the exit status
stop_backend() {
	local i rc=0
	STOP_RC=0
	[ -n "$BPID" ] || return 0
	kill -TERM "$BPID" 2>/dev/null || true
	for i in $(seq 1 100); do
		kill -0 "$BPID" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$BPID" 2>/dev/null || true
	wait "$BPID" 2>/dev/null || rc=$?
	BPID=""
	STOP_RC=$rc
}

# fe_args JOB: the vqcow-fe bench options for a job
fe_args() {
	local s rw bs qd mix
	s=$(spec_of "$1")
	read -r rw bs qd mix <<<"$s"
	printf '%s\n' --rw "$rw" --bs "$bs" --iodepth "$qd" --runtime "$runtime" --json
	[ "$mix" = - ] || printf '%s\n' --rwmixread "$mix"
	# one job per virtqueue; --iodepth is per queue
	[ "$nq" = 1 ] || printf '%s\n' --numjobs "$nq"
	[ ${#fe_extra[@]} = 0 ] || printf '%s\n' "${fe_extra[@]}"
}

# run_backend REP IMAGE JOB KIND ORDER
run_backend() {
	local rep=$1 image=$2 job=$3 kind=$4 order=$5 img tag sock rc status=ok t0 t1 h
	tag="r$rep-$image-$job-$kind"
	run_image "$image"
	img=$RUN_IMG
	sock="$rundir/$kind.sock"
	if ! start_backend "$kind" "$img" "$RUN_FMT" "$RUN_BACKING" "$sock" "$out/logs/$tag.log"; then
		python3 "$BENCHPY" record --csv "$csv" --kind fe --status start-failed --rep "$rep" \
			--image "$image" --job "$job" --backend "$kind" --order "$order" || true
		return 0
	fi
	local args=()
	mapfile -t args < <(fe_args "$job")
	t0=$(cpu_ticks "$BPID")
	rc=0
	timeout -k 5 $((runtime + 60)) "$VQCOW_FE" bench "$sock" "${args[@]}" \
		>"$out/raw/$tag.json" 2>"$out/logs/$tag.fe.err" || rc=$?
	t1=$(cpu_ticks "$BPID")
	h=$(hwm_kib "$BPID")
	[ $rc = 0 ] || status="fe-exit-$rc"
	[ "$t0" -ge 0 ] && [ "$t1" -ge 0 ] || status="backend-died"
	stop_backend
	if [ "$STOP_RC" != 0 ]; then
		echo "run.sh: backend exit status $STOP_RC after SIGTERM" >>"$out/logs/$tag.log"
		[ "$status" = ok ] && status="backend-exit-$STOP_RC"
	fi
	# a benchmark on a damaged image is worthless: check qcow2 images after writes
	if [ $check_images = 1 ] && [ "$RUN_FMT" = qcow2 ] && [ "$(spec_of "$job" | cut -d' ' -f1)" != randread ] &&
		[ "$(spec_of "$job" | cut -d' ' -f1)" != read ]; then
		rc=0
		qemu-img check "$img" >"$out/logs/$tag.check" 2>&1 || rc=$?
		case $rc in
		0) ;;
		3) log "warning: $image after $kind $job: leaked clusters (see $out/logs/$tag.check)" ;;
		2) [ "$status" = ok ] && status="image-corrupt" ;;
		*) [ "$status" = ok ] && status="image-check-error" ;;
		esac
	fi
	python3 "$BENCHPY" record --csv "$csv" --kind fe --result "$out/raw/$tag.json" --status "$status" \
		--rep "$rep" --image "$image" --job "$job" --backend "$kind" --order "$order" \
		--cpu-ticks $((t1 - t0)) --clk-tck "$clk_tck" --hwm-kib "$h" || true
	# drop the fresh image (no syncfs here: on a shared file system it would
	# wait for everybody's dirty data)
	[ $keep_images = 1 ] || case "$img" in "$imgdir"/run-*) rm -f "$img" ;; esac
}

# run_limit REP LIMITNAME JOB: fio on the host against the raw file
run_limit() {
	local rep=$1 lname=$2 job=$3 s rw bs qd mix f bytes tag rc=0 status=ok a=()
	s=$(spec_of "$job")
	read -r rw bs qd mix <<<"$s"
	if [ "$lname" = limit-1t ]; then
		f=$(img_file limit-1t)
		bytes=$big_bytes
	else
		f=$(img_file raw)
		bytes=$size_bytes
	fi
	[ "$mix" = - ] || a+=(--rwmixread="$mix")
	tag="r$rep-$lname-$job-limit"
	timeout -k 5 $((runtime + 60)) "$FIO" --name=limit --filename="$f" --size="$bytes" \
		--ioengine=io_uring --direct=1 --rw="$rw" --bs="$bs" --iodepth="$qd" ${a[@]+"${a[@]}"} \
		--runtime="$runtime" --time_based --norandommap --randrepeat=0 \
		--unified_rw_reporting=both --lat_percentiles=1 --percentile_list=50:99 \
		--output-format=json --output="$out/raw/$tag.json" >"$out/logs/$tag.log" 2>&1 || rc=$?
	[ $rc = 0 ] || status="fio-exit-$rc"
	python3 "$BENCHPY" record --csv "$csv" --kind fio --result "$out/raw/$tag.json" --status "$status" \
		--rep "$rep" --image "$lname" --job "$job" --backend limit || true
}

# ---------------------------------------------------------------- metadata
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
write_meta() {
	META_DATE=$(date -Iseconds) META_GIT=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown) \
		META_CPU=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) \
		META_NPROC=$(nproc) META_KERNEL=$(uname -r) \
		META_QSD=$("$QSD" --version | head -1) META_FIO=$("$FIO" --version) \
		META_LB=$load_before META_LA=${load_after:-} META_ARGS="$orig_args" \
		META_REPS=$reps META_RT=$runtime META_SIZE=$size META_DIR=$imgdir META_FS=$fstype \
		META_CAVEAT=$caveat META_NQ=$nq META_GUEST_NOTE="${guest_note:-}" \
		python3 - "$out/meta.json" <<'EOF'
import json, os, sys
e = os.environ
m = {k: e.get("META_" + v, "") for k, v in dict(
    date="DATE", git="GIT", cpu="CPU", nproc="NPROC", kernel="KERNEL", qsd_version="QSD",
    fio_version="FIO", load_before="LB", load_after="LA", args="ARGS", reps="REPS",
    runtime="RT", size="SIZE", image_dir="DIR", image_fs="FS", caveat="CAVEAT",
    num_queues="NQ", guest_note="GUEST_NOTE").items()}
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF
}

load_before=$(loadavg)
write_meta
log "results in $out; images in $imgdir ($fstype)"
log "$nruns runs of ${runtime}s (${#CELLS[@]} cells x $nb backends + ${#LIMITS[@]} limit runs, x $reps); load average $load_before"

# ---------------------------------------------------------------- the matrix
[ $guest_only = 1 ] && reps_host=0 || reps_host=$reps
for rep in $(seq 1 "$reps_host"); do
	log "=== repetition $rep/$reps"
	for l in "${LIMITS[@]:-}"; do
		[ -n "$l" ] || continue
		run_limit "$rep" "${l%%:*}" "${l#*:}"
	done
	idx=0
	for c in "${CELLS[@]}"; do
		set -- $c
		image=$1 job=$2
		# alternate which backend goes first, from cell to cell and repetition to repetition
		if [ $(((rep + idx) % 2)) = 0 ]; then order="vqcowd qsd"; else order="qsd vqcowd"; fi
		n=0
		for kind in $order; do
			want_backend "$kind" || continue
			n=$((n + 1))
			run_backend "$rep" "$image" "$job" "$kind" "$n"
		done
		idx=$((idx + 1))
	done
done

# ---------------------------------------------------------------- in-guest runs
# The end-to-end test's guest (contrib/guest/build-guest.sh: Debian kernel +
# busybox initramfs with fio; /init runs /jobs/$vqcow.job.sh). Our job script
# travels as a second cpio archive appended to that initramfs (the kernel
# unpacks concatenated archives in order), so the guest build is reused as is.
# KVM or TCG: contrib/guest/vm-lib.sh's probe boot when available (/dev/kvm
# can exist and still hang under nested virtualisation); VQCOW_ACCEL overrides.
guest_accel() {
	if declare -F vm_pick_accel >/dev/null; then
		vm_pick_accel "$1"
		return
	fi
	case "${VQCOW_ACCEL:-}" in kvm | tcg) echo "$VQCOW_ACCEL" ;; *) echo tcg ;; esac
}
write_guest_job() { # DIR: a cpio with /jobs/bench.sh
	mkdir -p "$1/stage/jobs"
	cat >"$1/stage/jobs/bench.sh" <<'JOB'
# contrib/bench guest job: one fio run on the vhost-user disk, JSON on the console.
#   vqcow.rw= vqcow.bs= vqcow.iodepth= vqcow.runtime= [vqcow.mix=]
. /etc/vqcow-lib.sh
dev=${VQCOW_DEV:-/dev/vda}
wait_dev "$dev" 30 || exit 1
mix=""
[ -n "${VQCOW_MIX:-}" ] && mix="--rwmixread=$VQCOW_MIX"
fio --name=guest --filename="$dev" --ioengine=io_uring --direct=1 --rw="$VQCOW_RW" \
	--bs="$VQCOW_BS" --iodepth="$VQCOW_IODEPTH" $mix --runtime="$VQCOW_RUNTIME" --time_based \
	--norandommap --randrepeat=0 --unified_rw_reporting=both --lat_percentiles=1 \
	--percentile_list=50:99 --output-format=json --output=/tmp/fio.json
rc=$?
echo BENCH-FIO-BEGIN
cat /tmp/fio.json
echo
echo BENCH-FIO-END
exit $rc
JOB
	(cd "$1/stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$1/bench-job.cpio"
}

run_guest_part() {
	local gdir=$guest_dir accel cpu initrd gimg gjob s rw bs qd mix kind tag console rc=0 n tmo
	command -v "$QEMU" >/dev/null 2>&1 || { log "guest: $QEMU not found"; return 1; }
	log "guest: building/checking the test guest in $gdir (contrib/guest/build-guest.sh)"
	# shellcheck source=contrib/guest/vm-lib.sh
	[ -f "$repo/contrib/guest/vm-lib.sh" ] && . "$repo/contrib/guest/vm-lib.sh"
	mkdir -p "$gdir"
	if declare -F vm_guest_build >/dev/null; then
		vm_guest_build "$gdir" >"$out/logs/guest-build.log" 2>&1 || rc=$?
	else
		bash "$repo/contrib/guest/build-guest.sh" "$gdir" >"$out/logs/guest-build.log" 2>&1 || rc=$?
	fi
	if [ "${rc:-0}" != 0 ]; then
		log "guest: build-guest.sh failed, see $out/logs/guest-build.log"
		return 1
	fi
	write_guest_job "$rundir/guest"
	initrd="$rundir/guest/initrd-bench.img"
	cp "$gdir/initrd.img" "$initrd"
	# the next archive must start 4-byte aligned; zeros between archives are skipped
	truncate -s $((($(stat -c %s "$initrd") + 511) / 512 * 512)) "$initrd"
	cat "$rundir/guest/bench-job.cpio" >>"$initrd"
	accel=$(guest_accel "$gdir")
	cpu=max
	[ "$accel" = kvm ] && cpu=host
	guest_note="$accel, 1 vCPU, 512 MiB, fio ${guest_runtime}s on /dev/vda, io_uring, direct=1"
	[ "$accel" = tcg ] && guest_note="$guest_note — TCG: figures measure the emulator, not the backend"
	log "guest: accel=$accel"
	tmo=$((guest_runtime + 90))
	[ "$accel" = tcg ] && tmo=$((guest_runtime * 3 + 300))
	n=0
	for gimg in ${guest_images//,/ }; do
		for gjob in ${guest_jobs//,/ }; do
			s=$(spec_of "$gjob")
			read -r rw bs qd mix <<<"$s"
			if [ $((n % 2)) = 0 ]; then order="vqcowd qsd"; else order="qsd vqcowd"; fi
			n=$((n + 1))
			for kind in $order; do
				want_backend "$kind" || continue
				tag="guest-$gimg-$gjob-$kind"
				console="$out/logs/$tag.console"
				run_image "$gimg"
				if ! start_backend "$kind" "$RUN_IMG" "$RUN_FMT" "$RUN_BACKING" "$rundir/$kind.sock" "$out/logs/$tag.log"; then
					python3 "$BENCHPY" guest --console /dev/null --csv "$guest_csv" --image "$gimg" --job "$gjob" --backend "$kind" || true
					continue
				fi
				local append="console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=bench vqcow.rw=$rw vqcow.bs=$bs vqcow.iodepth=$qd vqcow.runtime=$guest_runtime"
				[ "$mix" = - ] || append="$append vqcow.mix=$mix"
				rc=0
				timeout -k 5 "$tmo" "$QEMU" -machine q35,accel="$accel" -cpu "$cpu" -smp 1 -m 512 \
					-object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
					-kernel "$gdir/vmlinuz" -initrd "$initrd" -append "$append" \
					-chardev socket,id=c0,path="$rundir/$kind.sock" \
					-device vhost-user-blk-pci,chardev=c0,num-queues="$nq" \
					-nodefaults -display none -no-reboot -monitor none -serial file:"$console" \
					>"$out/logs/$tag.qemu" 2>&1 || rc=$?
				[ $rc = 0 ] || echo "run.sh: qemu exit status $rc" >>"$out/logs/$tag.qemu"
				stop_backend
				python3 "$BENCHPY" guest --console "$console" --csv "$guest_csv" --image "$gimg" --job "$gjob" --backend "$kind" || true
				[ $keep_images = 1 ] || case "$RUN_IMG" in "$imgdir"/run-*) rm -f "$RUN_IMG" ;; esac
			done
		done
	done
}

if [ $guest = 1 ]; then
	run_guest_part || log "warning: in-guest part incomplete (see $out/logs/guest-*)"
fi

# ---------------------------------------------------------------- report
load_after=$(loadavg)
write_meta
full=0
[ $quick = 0 ] && [ -z "$sel_images" ] && [ -z "$sel_jobs" ] && [ "$backends" = "vqcowd,qsd,limit" ] && [ "$reps" -ge 3 ] && full=1
upd=()
case "$update_results" in
yes) upd=(--update) ;;
auto) [ $full = 1 ] && upd=(--update) ;;
esac
img_order=$(IFS=,; echo "${IMAGE_NAMES[*]}")
python3 "$BENCHPY" report --csv "$csv" --guest-csv "$guest_csv" --out "$out" --meta "$out/meta.json" \
	--images "$img_order" --jobs "${ALL_JOBS// /,}" --results-md "$here/RESULTS.md" \
	--title "vqcowd vs qemu-storage-daemon ($stamp, ${reps}x${runtime}s, $size)" ${upd[@]+"${upd[@]}"}
log "done: $out/report.md"
