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
#   alt-1      VQCOWD_ALT (default: the same vqcowd) --io-threads 1 $VQCOWD_ALT_ARGS
#   alt-2      the same with --io-threads 2
#
# (kinds vqcowd-N pass VQCOWD_ARGS too: a policy A/B in the guest is
# KINDS="vqcowd-1 vqcowd-2 alt-1 alt-2" VQCOWD_ALT_ARGS="--some-switch".)
#
# both qsd in their best configuration: aio=io_uring, cache.direct=on, an
# iothread, num-queues=2.
#
#   bash contrib/bench/guest-mq.sh [--reps 2] [--runtime 10] [--images full,zlib]
#                                  [--jobs randread,randwrite] [--kinds "..."]
#                                  [--accel auto|kvm|tcg] [--guest-dir DIR]
#                                  [--threads]
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
#
# --threads adds where the CPU goes, per thread of the backend and of QEMU
# (its vCPU threads "CPU 0/TCG", "CPU 1/TCG" under TCG, its main loop, which
# under TCG injects the backend's calls as interrupts): CPU time
# (utime+stime of /proc/PID/task/TID/stat) and voluntary / involuntary
# context switches (.../status) and the run delay (µs runnable but waiting
# for a CPU: .../schedstat's 2nd field) between the job's markers, per guest
# I/O, median of the repetitions; and, for vqcowd, its exit counts per request
# (whole boot: the guest's boot-time I/O and every job): the driver's kicks
# and the kick fd's wake-ups, the calls sent of the signal decisions, and
# per event loop the busy polls (waits polled, caught, µs polled; the
# daemon runs with --log-level debug for that line). GUEST_MQ_RAW=FILE
# also writes the per-thread deltas of every run there (rep image kind job
# I/Os thread ticks voluntary involuntary run-delay-ns); a negative delta (a sample that
# went wrong) is left out of the table.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${BUILD:-$repo/build}
reps=2 runtime=10 images=full,zlib jobs=randread,randwrite accel=auto kinds=${KINDS:-}
gdir="" threads=0
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
	--threads) threads=1; shift ;;
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
for k in $kinds; do
	case $k in
	vqcowd-1 | vqcowd-2 | alt-1 | alt-2 | qsd-7.2 | qsd-10) ;;
	*) echo "guest-mq.sh: unknown kind '$k' (vqcowd-1 vqcowd-2 alt-1 alt-2 qsd-10 qsd-7.2)" >&2; exit 2 ;;
	esac
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
	# the host samples the threads at the marker: QEMU's vCPU threads
	# must still be there (the guest powers off after the last job)
	sleep 1
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
# snap ROLE PID: a line per thread: ROLE:PID <tab> TID <tab> COMM <tab> TICKS VOL INVOL RUNDELAY
# (RUNDELAY: ns runnable but waiting for a CPU, schedstat's 2nd field; 0 without it)
snap() {
	local t st comm rest f v nv k n ss
	for t in /proc/"$2"/task/*; do
		# (a thread may end meanwhile: $(<file) would end the script)
		{ read -r st <"$t/stat"; } 2>/dev/null || continue
		{ read -r comm <"$t/comm"; } 2>/dev/null || continue
		rest=${st##*) }
		read -r -a f <<<"$rest"
		v=0 nv=0
		{
			while read -r k n; do
				case $k in
				voluntary_ctxt_switches:) v=$n ;;
				nonvoluntary_ctxt_switches:) nv=$n ;;
				esac
			done <"$t/status"
		} 2>/dev/null || true
		ss=(0 0)
		{ read -r -a ss <"$t/schedstat"; } 2>/dev/null || ss=(0 0)
		printf '%s:%s\t%s\t%s\t%s %s %s %s\n' "$1" "$2" "${t##*/}" "$comm" $((f[11] + f[12])) "${v:-0}" "${nv:-0}" "${ss[1]:-0}"
	done
}
load1() { cut -d' ' -f1 /proc/loadavg; }

start_backend() { # KIND IMAGE SOCK LOG
	local kind=$1 img=$2 sock=$3 q dbg=()
	rm -f "$sock"
	[ "$threads" = 0 ] || dbg=(--log-level debug)
	case $kind in
	vqcowd-1 | vqcowd-2)
		# shellcheck disable=SC2086
		"$vqcowd" --socket-path "$sock" --blk-file "$img" --format qcow2 --num-queues 2 \
			--io-threads "${kind#vqcowd-}" ${dbg[@]+"${dbg[@]}"} ${VQCOWD_ARGS:-} </dev/null >"$4" 2>&1 &
		;;
	alt-1 | alt-2)
		# shellcheck disable=SC2086
		"${VQCOWD_ALT:-$vqcowd}" --socket-path "$sock" --blk-file "$img" --format qcow2 \
			--num-queues 2 --io-threads "${kind#alt-}" ${dbg[@]+"${dbg[@]}"} ${VQCOWD_ALT_ARGS:-} \
			</dev/null >"$4" 2>&1 &
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
: >"$tmp/ios"
: >"$tmp/thr"
: >"$tmp/exit"
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
		-name guest-mq,debug-threads=on \
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
				[ "$threads" = 0 ] || { snap backend "$bpid"; snap qemu "$qpid"; } >"$tmp/snap-b-$rw"
				seen="$seen b$rw "
			fi
			if [[ $seen != *" e$rw "* ]] && grep -qa "^MQBENCH-END $rw" "$con"; then
				te[$rw]=$(ticks "$bpid")
				[ "$threads" = 0 ] || { snap backend "$bpid"; snap qemu "$qpid"; } >"$tmp/snap-e-$rw"
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
	# each serving thread's run delay; --io-threads-contended's moves
	grep -aho 'thread [0-9]*: waited for a CPU.*\|--io-threads-contended [0-9]*: .*\|its queues moved.*' \
		"$tmp/$kind.log" | sed "s/^/  $kind $image: /" >&2 || true
	if [ "$threads" = 1 ]; then
		# vqcowd's exit counts (whole boot): vring lines, busy polls per loop, moves
		grep -ao 'vring [0-9]*: [0-9]* requests.*\|busy polling: [0-9]* waits.*\|moved to the main thread.*' \
			"$tmp/$kind.log" | sed "s/^/$rep $image $kind /" >>"$tmp/exit" || true
		for rw in ${jobs//,/ }; do
			[ -f "$tmp/snap-b-$rw" ] && [ -f "$tmp/snap-e-$rw" ] || continue
			sed "s/^/$rep $image $kind $rw b\t/" "$tmp/snap-b-$rw" >>"$tmp/thr"
			sed "s/^/$rep $image $kind $rw e\t/" "$tmp/snap-e-$rw" >>"$tmp/thr"
			rm -f "$tmp/snap-b-$rw" "$tmp/snap-e-$rw"
		done
	fi
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
      p("50.000000"), p("99.000000")), sys.argv[8], sys.argv[9])
with open(sys.argv[10], "a") as f:
    print(sys.argv[5], sys.argv[6], sys.argv[7], rw, ios, file=f)' \
				"$rw" "${tb[$rw]:-0}" "${te[$rw]:-0}" "$hz" "$rep" "$image" "$kind" "$lb" "$la" "$tmp/ios" |
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

[ "$threads" = 1 ] || exit 0
echo
echo "### Per thread, between the job's markers (--threads; $(nproc) host CPUs)"
echo
python3 - "$tmp/thr" "$tmp/ios" "$tmp/exit" "$kinds" "$hz" "${GUEST_MQ_RAW:-}" <<'EOF'
import re, statistics as st, sys
thr, iosf, exitf, kinds, hz = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), float(sys.argv[5])
raw = open(sys.argv[6], "w") if len(sys.argv) > 6 and sys.argv[6] else None
ios = {}
for l in open(iosf):
    rep, image, kind, rw, n = l.split()
    ios[(rep, image, kind, rw)] = int(n)
snaps = {}
rpids = {}
for l in open(thr):
    l = l.rstrip("\n")
    if not l:
        continue
    head, role, tid, comm, vals = l.split("\t")
    role, _, rpid = role.partition(":")
    rep, image, kind, rw, be = head.split()
    # the process's own thread is its main one (thread ids wrap: not the lowest)
    if rpid:
        rpids.setdefault((rep, image, kind, rw), {})[role] = int(rpid)
    t, v, nv, rd = (list(map(int, vals.split())) + [0])[:4]
    snaps.setdefault((rep, image, kind, rw), {}).setdefault(be, {})[(role, int(tid))] = (comm, t, v, nv, rd)
# per (image, rw) and kind and thread: per repetition (CPU µs/IO, voluntary/IO, involuntary/IO)
acc = {}
for key, s in snaps.items():
    rep, image, kind, rw = key
    n = ios.get(key)
    if not n or "e" not in s:
        continue
    b, e = s.get("b", {}), s["e"]
    pids = {}
    for role, tid in e:
        pids[role] = min(pids.get(role, tid), tid)
    for role, rpid in rpids.get(key, {}).items():
        if (role, rpid) in e:
            pids[role] = rpid
    order = 0
    per = {}
    for (role, tid), (comm, t, v, nv, rd) in sorted(e.items()):
        c0, t0, v0, nv0, rd0 = b.get((role, tid), (comm, 0, 0, 0, 0))
        who = "vqcowd" if kind.startswith(("vqcowd", "alt")) else "qsd"
        who = who if role == "backend" else "qemu"
        if tid == pids[role]:
            label = "%s main" % who
        elif comm.startswith("iou-"):
            label = "%s io_uring workers" % who
        elif who == "vqcowd":
            order += 1
            label = "vqcowd thread %d" % order
        else:
            label = "%s %s" % (who, comm)
        x = per.setdefault(label, [0, 0, 0, 0])
        x[0] += t - t0
        x[1] += v - v0
        x[2] += nv - nv0
        x[3] += rd - rd0
    per["all threads (backend + QEMU)"] = [sum(x[i] for x in per.values()) for i in range(4)]
    if raw:
        for label, x in per.items():
            print(rep, image, kind, rw, n, label.replace(" ", "_"), *x, file=raw)
    for label, (t, v, nv, rd) in per.items():
        if min(t, v, nv, rd) < 0:
            continue  # a sample that went wrong (a thread read while it ended): left out
        acc.setdefault((image, rw), {}).setdefault(kind, {}).setdefault(label, {})[rep] = (
            t / hz * 1e6 / n, v / n, nv / n, rd / 1e3 / n)
print("Per guest I/O: CPU µs; voluntary / involuntary context switches; µs runnable but waiting")
print("for a CPU (run delay: schedstat's 2nd field). Median of the repetitions;")
print("CPU from clock ticks of 1/%d s (a figure below ~0.1 µs is noise); a thread that ended" % hz)
print("before the job's end marker (an idle io_uring worker) is not counted.")
for (image, rw), bk in acc.items():
    ks = [k for k in kinds if k in bk]
    print()
    print("| %s %s: thread | %s |" % (image, rw, " | ".join(ks)))
    print("|---|" + "---:|" * len(ks))
    labels = []
    for k in ks:
        for lab in bk[k]:
            if lab not in labels:
                labels.append(lab)
    labels.sort(key=lambda x: x.startswith("all "))
    for lab in labels:
        cells = []
        for k in ks:
            r = bk[k].get(lab)
            if not r:
                cells.append("–")
                continue
            m = [st.median(x[i] for x in r.values()) for i in range(4)]
            cells.append("%.2f; %.3f / %.3f; %.2f" % tuple(m))
        print("| %s | %s |" % (lab, " | ".join(cells)))
ex = {}
for l in open(exitf):
    f = l.split(None, 3)
    if len(f) < 4:
        continue
    rep, image, kind, line = f
    e = ex.setdefault((image, kind), {}).setdefault(rep, {"req": 0, "kicks": 0, "wakes": 0,
                                                           "calls": 0, "asks": 0, "polls": []})
    m = re.match(r"vring \d+: (\d+) requests, (\d+) kicks in (\d+) kick wake-ups, (\d+) calls of (\d+) signal", line)
    if m:
        for k, v in zip(("req", "kicks", "wakes", "calls", "asks"), map(int, m.groups())):
            e[k] += v
    m = re.match(r"busy polling: (\d+) waits timed, (\d+) polled, (\d+) caught by the poll, (\d+) us polled(?:, (\d+) given up)?", line)
    if m:
        e["polls"].append(tuple(int(x or 0) for x in m.groups()))
if ex:
    print()
    print("vqcowd's exit counts per request (whole boot, every job; median of the repetitions):")
    print("kicks, kick wake-ups, calls, signal decisions; per event loop: waits timed / polled /")
    print("caught by the poll / given up to another thread (--poll-yield) per request, µs polled")
    print("per request.")
    print()
    print("| image | kind | requests | kicks | kick wake-ups | calls | signal decisions | busy polls per loop |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for (image, kind), r in sorted(ex.items()):
        rs = [x for x in r.values() if x["req"]]
        if not rs:
            continue
        md = lambda k: st.median(x[k] / x["req"] for x in rs)
        pl = []
        for i in range(max(len(x["polls"]) for x in rs)):
            vals = [(x["polls"][i], x["req"]) for x in rs if len(x["polls"]) > i]
            m = [st.median(v[j] / q for v, q in vals) for j in range(5)]
            pl.append("%.3f / %.3f / %.3f / %.3f, %.2f µs" % (m[0], m[1], m[2], m[4], m[3]))
        print("| %s | %s | %.0f | %.3f | %.3f | %.3f | %.3f | %s |" % (
            image, kind, st.median(x["req"] for x in rs), md("kicks"), md("wakes"), md("calls"),
            md("asks"), "; ".join(pl) or "–"))
EOF
