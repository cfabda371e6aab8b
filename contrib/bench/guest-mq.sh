#!/bin/bash
# SPDX-License-Identifier: MIT
#
# The in-guest multi-queue cell of issue 12: a real QEMU guest with 2 vCPUs
# and the default vhost-user-blk device (num-queues = vCPUs = 2) runs fio
# with numjobs=2 (one job pinned to each vCPU, so each drives its own queue),
# 4K random reads and then 4K random writes, iodepth 32 per job, direct I/O,
# io_uring, against each backend in turn:
#
#   vqcowd-1   vqcowd --io-threads 1
#   vqcowd-2   vqcowd --io-threads 2
#   qsd-10     qemu-storage-daemon 10.0 (contrib/bench/qsd10.sh)
#   qsd-7.2    the system's qemu-storage-daemon
#
# both qsd in their best configuration: aio=io_uring, cache.direct=on, an
# iothread, num-queues=2.
#
#   bash contrib/bench/guest-mq.sh [--reps 2] [--runtime 10] [--images full,zlib]
#                                  [--jobs randread,randwrite] [--kinds "..."]
#                                  [--accel auto|kvm|tcg] [--guest-dir DIR]
#
# Images: mq.sh's 1 GiB full qcow2 (random data) and zlib-compressed qcow2
# (made by `mq.sh --prepare` when missing, under $BENCH_DIR, default
# build/bench-mq). Writes into the full image leave its layout as it is (every
# cluster is allocated), but they replace compressed clusters, so every boot
# on the compressed image gets a fresh copy of it when a write job runs (made
# before the backend starts; the copies are deleted only at the end, as
# deleting on a disk mounted with `discard` stalls other I/O).
# One boot per (repetition, image, backend) runs the jobs one after the
# other; the backends' order rotates from one repetition to the next.
#
# The guest is the end-to-end tests' (contrib/guest/build-guest.sh, in
# <build>/guest, built or reused through contrib/guest/vm-lib.sh); the fio job
# travels as a second cpio archive appended to its initramfs. KVM is used
# when it really boots the guest (vm_pick_accel: /dev/kvm can exist and still
# fail or hang under nested virtualisation), TCG otherwise, and the output
# says so: under TCG the guest's CPUs are emulated on the host's, so the
# figures measure the emulator as much as the backend.
#
# Per run: the guest's fio IOPS and completion-latency p50/p99 (fio's own
# figures, all jobs together), the backend's CPU time per I/O (utime+stime of
# all its threads from /proc/PID/stat, sampled when the guest prints the
# job's start and end markers on its console, divided by fio's I/O count),
# and the host's 1-minute load average before and after the boot. Then the
# medians, and the ratios vqcowd-2/vqcowd-1, vqcowd-2/qsd-10 and
# vqcowd-2/qsd-7.2 computed per repetition (runs minutes apart at most),
# median (range).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${BUILD:-$repo/build}
reps=2 runtime=10 images=full,zlib jobs=randread,randwrite accel=auto kinds=${KINDS:-}
gdir=""
usage() { sed -n '4,/^set /{/^#/p}' "$0"; }
while [ $# -gt 0 ]; do
	case "$1" in
	--reps) reps=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--images) images=$2; shift 2 ;;
	--jobs) jobs=$2; shift 2 ;;
	--kinds) kinds=$2; shift 2 ;;
	--accel) accel=$2; shift 2 ;;
	--guest-dir) gdir=$2; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
vqcowd=${VQCOWD:-$build/src/vqcowd}
dir=${BENCH_DIR:-$build/bench-mq}
gdir=${gdir:-$build/guest}
qemu=${QEMU:-qemu-system-x86_64}
. "$repo/contrib/bench/need-build.sh"
. "$repo/contrib/bench/qsd-start.sh"
bench_need_build "$repo" "$build" vqcowd
for t in "$qemu" qemu-img qemu-storage-daemon python3 cpio "$vqcowd"; do
	command -v "$t" >/dev/null || { echo "guest-mq.sh: $t not found" >&2; exit 77; }
done
qsd10=${QSD10:-$(bash "$here/qsd10.sh" 2>/dev/null || true)}
if [ -z "$kinds" ]; then
	kinds="vqcowd-1 vqcowd-2 qsd-7.2"
	[ -z "$qsd10" ] || kinds="vqcowd-1 vqcowd-2 qsd-10 qsd-7.2"
fi
for i in ${images//,/ }; do
	case $i in full | zlib) ;; *) echo "guest-mq.sh: unknown image $i" >&2; exit 2 ;; esac
	[ -f "$dir/$i.qcow2" ] || BENCH_DIR=$dir bash "$here/mq.sh" --prepare
done
for j in ${jobs//,/ }; do
	case $j in randread | randwrite) ;; *) echo "guest-mq.sh: unknown job $j" >&2; exit 2 ;; esac
done

# shellcheck source=../guest/vm-lib.sh
. "$repo/contrib/guest/vm-lib.sh"
VM_LOG_TAG=guest-mq
vm_guest_build "$gdir" >/dev/null 2>&1 ||
	{ echo "guest-mq.sh: building the guest failed (bash contrib/guest/build-guest.sh $gdir)" >&2; exit 1; }
case $accel in
auto) accel=$(vm_pick_accel "$gdir" 2>/dev/null) ;;
kvm | tcg) ;;
*) echo "guest-mq.sh: --accel auto|kvm|tcg" >&2; exit 2 ;;
esac
cpu=max
[ "$accel" = kvm ] && cpu=host
note="$accel, 2 vCPUs, 1 GiB RAM"
[ "$accel" = kvm ] || note="$note; KVM not usable here, so TCG: the figures measure the emulator as much as the backend"
echo "guest-mq.sh: accel: $note" >&2

tmp=$(mktemp -d)
bpid="" qpid=""
copies=()
cleanup() {
	[ -z "$qpid" ] || kill "$qpid" 2>/dev/null || true
	[ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true
	rm -rf "$tmp"
	[ ${#copies[@]} = 0 ] || rm -f "${copies[@]}"
}
trap cleanup EXIT
hz=$(getconf CLK_TCK)

# The guest job: per phase a start marker, fio, the JSON, an end marker.
mkdir -p "$tmp/stage/jobs"
cat >"$tmp/stage/jobs/mqbench.sh" <<'JOB'
# contrib/bench/guest-mq.sh guest job: vqcow.rws=R1,R2 vqcow.runtime=S
. /etc/vqcow-lib.sh
wait_dev /dev/vda 30 || exit 1
echo "mqbench: $(grep -c ^processor /proc/cpuinfo) cpus, queues: $(ls /sys/block/vda/mq | wc -l)"
rc=0
for rw in $(echo "$VQCOW_RWS" | tr , ' '); do
	echo "MQBENCH-BEGIN $rw"
	/usr/bin/fio --name=mq --filename=/dev/vda --ioengine=io_uring --direct=1 --rw="$rw" \
		--bs=4k --iodepth=32 --numjobs=2 --cpus_allowed=0-1 --cpus_allowed_policy=split \
		--runtime="$VQCOW_RUNTIME" --time_based --norandommap --randrepeat=0 \
		--group_reporting --lat_percentiles=1 --percentile_list=50:99 \
		--output-format=json --output=/tmp/fio.json --eta=never || rc=1
	echo "MQBENCH-END $rw"
	echo "MQBENCH-JSON-BEGIN $rw"
	cat /tmp/fio.json
	echo
	echo "MQBENCH-JSON-END $rw"
done
exit $rc
JOB
(cd "$tmp/stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$tmp/job.cpio"
initrd=$tmp/initrd.img
cp "$gdir/initrd.img" "$initrd"
# the appended archive must start 4-byte aligned; the zeros between are skipped
truncate -s $((($(stat -c %s "$initrd") + 511) / 512 * 512)) "$initrd"
cat "$tmp/job.cpio" >>"$initrd"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
load1() { cut -d' ' -f1 /proc/loadavg; }

start_backend() { # KIND IMAGE SOCK LOG
	local kind=$1 img=$2 sock=$3 q
	rm -f "$sock"
	case $kind in
	vqcowd-1 | vqcowd-2)
		"$vqcowd" --socket-path "$sock" --blk-file "$img" --format qcow2 --num-queues 2 \
			--io-threads "${kind#vqcowd-}" </dev/null >"$4" 2>&1 &
		;;
	qsd-7.2 | qsd-10)
		q=qemu-storage-daemon
		[ "$kind" = qsd-10 ] && q=$qsd10
		bench_qsd_start "$q" "$img" qcow2 "$sock" "$4" 2
		;;
	esac
	bpid=$!
	vm_wait_socket "$sock" "$bpid" 20 || { echo "guest-mq.sh: $kind did not start:" >&2; cat "$4" >&2; return 1; }
}

# boot REP IMAGE KIND: one guest, all jobs; appends one line per job to $res:
# rep image job kind iops cpu_us_per_io p50_us p99_us load_before load_after
res=$tmp/res
: >"$res"
boot() {
	local rep=$1 image=$2 kind=$3 img=$dir/$2.qcow2 sock=$tmp/sock con=$tmp/console
	local lb la tmo rw seen i
	declare -A tb=() te=()
	if [ "$image" = zlib ] && [[ ",$jobs," == *,randwrite,* ]]; then
		img=$dir/guest-$rep-$image-$kind.qcow2
		copies+=("$img")
		cp "$dir/$image.qcow2" "$img"
		sync "$img"
	fi
	lb=$(load1)
	start_backend "$kind" "$img" "$sock" "$tmp/$kind.log" || return 0
	: >"$con"
	tmo=$((runtime * 3 + 120))
	[ "$accel" = kvm ] || tmo=$((runtime * 4 + 400))
	"$qemu" -accel "$accel$([ "$accel" = tcg ] && echo ,thread=multi)" -machine q35 -cpu "$cpu" \
		-smp 2 -m 1024 -object memory-backend-memfd,id=mem,size=1024M,share=on -numa node,memdev=mem \
		-kernel "$gdir/vmlinuz" -initrd "$initrd" \
		-append "console=ttyS0 quiet panic=-1 no_timer_check vqcow.job=mqbench vqcow.rws=$jobs vqcow.runtime=$runtime" \
		-chardev socket,id=c0,path="$sock" -device vhost-user-blk-pci,chardev=c0 \
		-nodefaults -display none -no-reboot -monitor none -serial file:"$con" \
		</dev/null >"$tmp/qemu.log" 2>&1 &
	qpid=$!
	# Sample the backend's CPU time when each phase starts and ends.
	seen=" "
	for ((i = 0; i < tmo * 20; i++)); do
		kill -0 "$qpid" 2>/dev/null || break
		for rw in ${jobs//,/ }; do
			if [[ $seen != *" b$rw "* ]] && grep -qa "^MQBENCH-BEGIN $rw" "$con"; then
				tb[$rw]=$(ticks "$bpid")
				seen="$seen b$rw "
			fi
			if [[ $seen != *" e$rw "* ]] && grep -qa "^MQBENCH-END $rw" "$con"; then
				te[$rw]=$(ticks "$bpid")
				seen="$seen e$rw "
			fi
		done
		sleep 0.05
	done
	if kill -0 "$qpid" 2>/dev/null; then
		echo "guest-mq.sh: guest timed out ($tmo s), $kind $image" >&2
		kill "$qpid" 2>/dev/null || true
	fi
	wait "$qpid" 2>/dev/null || true
	qpid=
	vm_stop "$bpid" 20
	bpid=
	[ "$VM_STOP_STATUS" = 0 ] || echo "guest-mq.sh: $kind exited with status $VM_STOP_STATUS" >&2
	grep -ho 'fast path: [0-9]* hits, [0-9]* hops' "$tmp/$kind.log" | sed "s/^/  $kind $image: /" >&2 || true
	la=$(load1)
	if ! grep -qa 'VQCOW-GUEST: PASS mqbench' "$con"; then
		echo "guest-mq.sh: guest job failed ($kind $image); console:" >&2
		tail -n 30 "$con" >&2
		cat "$tmp/qemu.log" >&2
		return 0
	fi
	grep -a '^mqbench:' "$con" | sed "s/^/  $kind $image: /" >&2 || true
	for rw in ${jobs//,/ }; do
		sed -n "/^MQBENCH-JSON-BEGIN $rw/,/^MQBENCH-JSON-END $rw/p" "$con" | sed '1d;$d' |
			python3 -c '
import json, sys
d = json.loads(sys.stdin.read().replace("\r", ""))
rw = sys.argv[1]
j = d["jobs"][0][("read" if rw == "randread" else "write")]
ios = j["total_ios"]
pct = j.get("lat_ns", j.get("clat_ns", {})).get("percentile", {})
p = lambda k: pct.get(k, 0) / 1000
dt = int(sys.argv[3]) - int(sys.argv[2])
cpu = dt / float(sys.argv[4]) * 1e6 / max(ios, 1)
print(sys.argv[5], sys.argv[6], rw, sys.argv[7], "%.0f %.2f %.1f %.1f" % (j["iops"], cpu,
      p("50.000000"), p("99.000000")), sys.argv[8], sys.argv[9])' \
				"$rw" "${tb[$rw]:-0}" "${te[$rw]:-0}" "$hz" "$rep" "$image" "$kind" "$lb" "$la" |
			tee -a "$res" >&2
	done
}

read -r -a klist <<<"$kinds"
echo "guest-mq.sh: $reps repetition(s), $runtime s per job, images $images, jobs $jobs, backends $kinds" >&2
for rep in $(seq "$reps"); do
	for image in ${images//,/ }; do
		for ((k = 0; k < ${#klist[@]}; k++)); do
			boot "$rep" "$image" "${klist[$(((k + rep - 1) % ${#klist[@]}))]}"
		done
	done
done

echo "## In-guest fio, 2 vCPUs, numjobs=2 x iodepth 32, 4K, io_uring, direct ($note)"
echo "$reps repetition(s) of $runtime s per job; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -z "$qsd10" ] || echo "qsd-10: $("$qsd10" --version | head -1)"
echo "qsd-7.2: $(qemu-storage-daemon --version | head -1)"
python3 - "$res" "$kinds" <<'EOF'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
kinds = sys.argv[2].split()
d = {}
for rep, image, job, kind, iops, cpu, p50, p99, lb, la in rows:
    d.setdefault((image, job), {}).setdefault(kind, {})[rep] = (
        float(iops), float(cpu), float(p50), float(p99), float(lb), float(la))
print()
print("| image | job | " + " | ".join(kinds) + " | load1 before-after |")
print("|---|---|" + "---:|" * len(kinds) + "---|")
for (image, job), b in d.items():
    cells = []
    loads = []
    for k in kinds:
        v = b.get(k)
        if not v:
            cells.append("–")
            continue
        m = lambda i: st.median(t[i] for t in v.values())
        cells.append("%.0f (%.1f µs; p99 %.0f µs)" % (m(0), m(1), m(3)))
        loads += [t[4] for t in v.values()] + [t[5] for t in v.values()]
    print("| %s | %s | %s | %.1f-%.1f |" % (image, job, " | ".join(cells), min(loads), max(loads)))
print()
print("IOPS median of the repetitions (the backend's CPU time per I/O; fio's p99 latency).")
print()
print("| image | job | ratio | median (range) | CPU/IO ratio |")
print("|---|---|---|---:|---:|")
for (image, job), b in d.items():
    for a, c in (("vqcowd-2", "vqcowd-1"), ("vqcowd-2", "qsd-10"), ("vqcowd-2", "qsd-7.2"),
                 ("vqcowd-1", "qsd-10")):
        if a not in b or c not in b:
            continue
        q = [b[a][r][0] / b[c][r][0] for r in b[a] if r in b[c] and b[c][r][0] > 0]
        cq = [b[a][r][1] / b[c][r][1] for r in b[a] if r in b[c] and b[c][r][1] > 0]
        if q:
            print("| %s | %s | %s / %s | %.2f (%.2f-%.2f) | %s |" % (
                image, job, a, c, st.median(q), min(q), max(q),
                "%.2f" % st.median(cq) if cq else "–"))
EOF
