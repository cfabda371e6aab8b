#!/bin/bash
# SPDX-License-Identifier: MIT
#
# The single-queue growing-image cells of issue 12, side by side:
#
#   bash contrib/bench/grow.sh [--dir DIR] [--size 4G] [--reps 3] [--runtime 5] [--perf]
#                              [--rw randwrite|write] [--bs 4k] [--base VQCOWD]
#                              [--base-opts "OPTS"] [--cells LIST] [--settle SECS]
#                              [--ios N]
#
# Per round, in an order rotated between rounds, 4K random writes at QD32
# (vqcow-fe bench, one queue; --rw and --bs change the job) into:
#   vqcowd-empty  a fresh empty qcow2 (64 KiB clusters) through vqcowd
#   qsd-empty     the same through qemu-storage-daemon ($QSD, default 10.0
#                 from qsd10.sh, else the system's; io_uring,
#                 cache.direct, an iothread)
#   vqcowd-xl2    a fresh empty extended_l2=on qcow2 through vqcowd
#   vqcowd-full   a fully allocated qcow2 (qemu-img convert of a fio-written
#                 raw file, made once: contrib/bench/layout.sh's image)
# and prints per cell IOPS, CPU µs per I/O, the engine's metadata writes,
# their KiB and its write-back batches per guest write (query-blockstats'
# qcow2 section through vqcowctl, vqcowd cells), the SQEs and io_uring_enter
# calls per guest write (io_uring and syscall tracepoints, when perf can read
# them; qsd's too), and the share of data writes
# io_uring had to hand to its worker threads (io-wq) because the file system
# could not take them without blocking (from the io_uring tracepoints, when
# perf can read them), then the per-round ratios vqcowd-empty/qsd-empty
# (issue target 3x) and vqcowd-xl2/vqcowd-full (target 0.8x), median (range).
# A second table puts a growing cell's costs per new cluster, which do not
# depend on how fast the run was (a slower 5 s run allocates a larger share
# of its writes): new clusters per guest write, the bytes the backend wrote
# to the file per guest write (/proc/PID/io write_bytes: data, fill and
# metadata), and per new cluster the file bytes beyond the guest's own (fill
# and metadata), the metadata writes and KiB,
# the write-back batches, side batches and fdatasyncs, the requests that
# waited for their L2 entries to be written (query-blockstats' link-waits) and
# the mean time such a wait took (link-wait-us / link-waits: from the
# request's qcow2_link, after its data write ended, to its completion; a
# loaded machine stretches it), and, in the per-round lines only, with
# VQCOWD_TEST_EARLY_NEW=1 the share of early-linked allocations whose entries
# were written when their data write ended, early-new-ahead /
# early-new-links, else -1; vqcowd cells; "new
# clusters" is query-blockstats' clusters-allocated, which counts the data
# reserve when it is taken, up to 64 MiB ahead of what was linked, and
# metadata clusters: a few % more than linked in a 5 s run of 2 GiB, much
# more in a run of 1 s); then
# the per-round ratio vqcowd-xl2/vqcowd-empty (extended L2 against the plain
# growing image: what extended L2 costs of its own). The same table shows
# how much the disk discarded during each cell's runs (anyone's deletions on
# a `discard` mount: the previous invocation's images, which this script
# deletes at its end, are discarded while the next one runs; those runs find
# the file system's free space in pieces: a fresh image of 2 GiB then came out
# in 250-1600 extents instead of ~200, loaded). --settle SECS waits, before
# the first round, until the disk has discarded nothing for 3 s (at most SECS;
# it prints how long it waited and whether the discards had ended).
# --base BIN adds base-empty, base-xl2 and base-full: the same cells through
# another vqcowd binary (an A/B in one run: say main's build), and prints the
# per-round ratios of each cell to its base cell; --base-opts adds vqcowd options
# to the base cells (--base-opts --no-cluster-fill alone: the same binary
# without the whole-cluster first write). --cells a,b keeps only those.
# After each run on a fresh image, the file's extents (filefrag -v: all, and
# those still unwritten) are printed, when filefrag works on that file system.
# --ios N runs each job for N guest writes (vqcow-fe's --number-ios; --runtime
# is then only a cap, 600 s unless given) instead of for --runtime seconds:
# a 2 GiB image takes 32768 new clusters whatever the speed, so a timed run
# on a slower machine (or a slower binary) allocates a larger share of its
# writes (0.09 new clusters per write in run 10, 0.12 in run 11); with --ios
# every round of every cell ends in the same fill state. Both are printed
# either way: the seconds a job took and its new clusters per guest write.
# --perf also records `perf record -g` of vqcowd in the first round's
# growing runs (DIR/grow-CELL.perf.data; qsd's not).
# Fresh images get new names (DIR/grow-ROUND-CELL.qcow2) and are deleted only at the
# end, all at once: on a disk mounted with `discard`, deleting a grown image
# takes about 20 s per GiB here, which must not fall between two runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${BUILD:-$repo/build}
dir=$build/bench-images size=4G reps=3 runtime="" perf=0 rw=randwrite bs=4k base="" base_opts="" only="" settle=0 ios=0
. "$here/bench-lib.sh"
usage() { sed -n '4,/^set /{/^#/p}' "$0"; }
show_help() { usage; exit 0; }
bench_opts usage --dir=dir --size=size --reps=reps --runtime=runtime --perf=perf=1 --rw=rw \
	--bs=bs --base=base --base-opts=base_opts --cells=only --settle=settle --ios=ios \
	-h=@show_help --help=@show_help -- "$@"
[ "$ios" -ge 0 ] 2>/dev/null || { echo "grow.sh: bad --ios $ios" >&2; exit 2; }
fejob=()
if [ "$ios" -gt 0 ]; then
	runtime=${runtime:-600}
	fejob=(--number-ios "$ios")
fi
runtime=${runtime:-5}
vqcowd=${VQCOWD:-$build/src/vqcowd}
fe=${VQCOW_FE:-$build/tests/frontend/vqcow-fe}
ctl=${VQCOWCTL:-$build/src/vqcowctl}
qsd=${QSD:-$(bash "$here/qsd10.sh" 2>/dev/null || echo qemu-storage-daemon)}
. "$repo/contrib/bench/need-build.sh"
. "$repo/contrib/bench/qsd-start.sh"
bench_need_build "$repo" "$build" vqcowd vqcow-fe vqcowctl
[ -z "$base_opts" ] || [ -n "$base" ] || base=$vqcowd
for t in fio qemu-img python3 "$vqcowd" "$fe" "$qsd" ${base:+"$base"}; do
	command -v "$t" >/dev/null || { echo "grow.sh: $t not found" >&2; exit 77; }
done
mkdir -p "$dir"
bytes=$(numfmt --from=iec "$size")
raw=$dir/layout-raw.img full=$dir/layout-full.qcow2
tmp=$(mktemp -d)
bpid="" ppid=""
made=()
cleanup() {
	[ -z "$bpid" ] || kill "$bpid" 2>/dev/null || true
	rm -rf "$tmp"
	[ ${#made[@]} = 0 ] || rm -f "${made[@]}"
}
trap cleanup EXIT
hz=$(getconf CLK_TCK)
tp=0 enter_ev=
[ "$(perf list 2>/dev/null | grep -c io_uring:io_uring_queue_async_work || true)" = 0 ] || tp=1
[ "$(perf list 2>/dev/null | grep -c syscalls:sys_enter_io_uring_enter || true)" = 0 ] ||
	enter_ev=,syscalls:sys_enter_io_uring_enter

need_full() {
	[ -z "$only" ] || case ",$only," in *-full,*) ;; *) return 1 ;; esac
}
if need_full; then
	if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" != "$bytes" ]; then
		rm -f "$raw" "$full"
		fio --name=fill --filename="$raw" --size="$bytes" --rw=write --bs=1M --iodepth=8 \
			--ioengine=io_uring --direct=1 --output=/dev/null >/dev/null
	fi
	[ -f "$full" ] || qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$raw" "$full"
	sync "$full"
fi

# extents FILE: prints "extents unwritten" (filefrag -v), or "-1 -1"
extents() {
	filefrag -v "$1" 2>/dev/null | awk '
		/^ *[0-9]+:/ { n++; if ($0 ~ /unwritten/) u++ }
		/extents? found/ { ok = 1 }
		END { if (ok) print n + 0, u + 0; else print -1, -1 }' || echo "-1 -1"
}

# discarded: sectors the disk holding $dir has discarded so far (anyone's: a
# deleted file on a `discard` mount), or -1
disk_stat=/sys/dev/block/$(stat -c '%Hd:%Ld' "$dir")/stat
discarded() {
	awk 'NF >= 14 { print $14; ok = 1 } END { if (!ok) print -1 }' "$disk_stat" 2>/dev/null ||
		echo -1
}

# run CELL FILE: prints "iops cpu_us punted_share extents unwritten" and the
# engine's and the file's counts (python below)
run() {
	local cell=$1 f=$2 kind=vqcowd sock=$tmp/sock t0 t1 out pf= bin=$vqcowd ext="-1 -1"
	local opts=()
	case $cell in
	base-*) bin=$base; read -r -a opts <<<"$base_opts" ;;
	esac
	case $cell in
	*-full) ;;
	*)
		if [ "${cell#*-}" = xl2 ]; then
			qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on "$f" "$size"
		else
			qemu-img create -q -f qcow2 -o cluster_size=65536 "$f" "$size"
		fi
		;;
	esac
	[ "$cell" != qsd-empty ] || kind=qsd
	rm -f "$sock"
	if [ $kind = vqcowd ]; then
		rm -f "$tmp/qmp"
		"$bin" --socket-path "$sock" --blk-file "$f" --format qcow2 --qmp "$tmp/qmp" \
			"${opts[@]}" >"$tmp/d.log" 2>&1 &
	else
		bench_qsd_start "$qsd" "$f" qcow2 "$sock" "$tmp/d.log"
	fi
	bpid=$!
	bench_wait_sock "$sock" "$cell" "$tmp/d.log"
	if [ $tp = 1 ]; then
		if [ "$ios" -gt 0 ]; then
			# until the job ends (SIGINT below)
			perf stat -x, -e "io_uring:io_uring_queue_async_work,io_uring:io_uring_submit_req$enter_ev" \
				-p "$bpid" -o "$tmp/stat" 2>/dev/null &
		else
			perf stat -x, -e "io_uring:io_uring_queue_async_work,io_uring:io_uring_submit_req$enter_ev" \
				-p "$bpid" -o "$tmp/stat" -- sleep "$runtime" 2>/dev/null &
		fi
		ppid=$!
	fi
	if [ $perf = 1 ] && [ "$REP" = 1 ] && [ $kind = vqcowd ] && [ "${cell#*-}" != full ]; then
		if [ "$ios" -gt 0 ]; then
			perf record -q -g -o "$dir/grow-$cell.perf.data" -p "$bpid" >/dev/null 2>&1 &
		else
			perf record -q -g -o "$dir/grow-$cell.perf.data" -p "$bpid" -- sleep "$runtime" \
				>/dev/null 2>&1 &
		fi
		pf=$!
	fi
	t0=$(bench_ticks "$bpid")
	w0=$(awk '/^write_bytes/ {print $2}' "/proc/$bpid/io" 2>/dev/null || echo -1)
	d0=$(discarded)
	s0=$(date +%s.%N)
	out=$("$fe" bench "$sock" --rw "$rw" --bs "$bs" --iodepth 32 --runtime "$runtime" "${fejob[@]}" --json)
	s1=$(date +%s.%N)
	t1=$(bench_ticks "$bpid")
	w1=$(awk '/^write_bytes/ {print $2}' "/proc/$bpid/io" 2>/dev/null || echo -1)
	d1=$(discarded)
	[ $kind != vqcowd ] || bench_qstats "$ctl" "$tmp/qmp" metadata-writes >"$tmp/qstats"
	[ -z "$pf" ] || [ "$ios" = 0 ] || kill -INT "$pf" 2>/dev/null || true
	[ -z "$pf" ] || wait "$pf" || true
	[ -z "$ppid" ] || [ "$ios" = 0 ] || kill -INT "$ppid" 2>/dev/null || true
	[ -z "$ppid" ] || wait "$ppid" || true
	ppid=
	kill "$bpid"
	wait "$bpid" 2>/dev/null || true
	bpid=
	[ "${cell#*-}" = full ] || ext=$(extents "$f")
	echo "$out" | python3 -c '
import json, os, sys
d = json.load(sys.stdin)["total"]
share = sqes = enters = -1
if os.path.exists(sys.argv[3]):
    c = {}
    for l in open(sys.argv[3]):
        p = l.strip().split(",")
        if len(p) > 2 and p[0].replace(".", "").isdigit():
            c[p[2]] = float(p[0])
    sub = c.get("io_uring:io_uring_submit_req", 0)
    if sub:
        share = c.get("io_uring:io_uring_queue_async_work", 0) / sub
    # per guest write; the counts cover the run only roughly (perf stat runs
    # as long as the job, started just before it)
    sqes = sub / max(d["ios"], 1) if sub else -1
    if "syscalls:sys_enter_io_uring_enter" in c:
        enters = c["syscalls:sys_enter_io_uring_enter"] / max(d["ios"], 1)
q = json.load(open(sys.argv[5])) if os.path.exists(sys.argv[5]) else None
n = max(d["ios"], 1)
m = "%.3f %.2f %.4f" % (q["metadata-writes"] / n, q["metadata-write-bytes"] / n / 1024,
                        q["writeback-batches"] / n) if q else "-1 -1 -1"
# new clusters per guest write, file KiB written per guest write; per new
# cluster: file KiB, metadata writes, metadata KiB, batches, side batches, syncs
w0, w1 = int(sys.argv[6]), int(sys.argv[7])
kib = "%.2f" % ((w1 - w0) / 1024 / n) if w0 >= 0 and w1 >= w0 else "-1"
pc = "-1 -1 -1 -1 -1 -1 -1"
if q and q.get("clusters-allocated", 0) > 0:
    c = q["clusters-allocated"]
    pc = "%.4f %.1f %.3f %.2f %.4f %.4f %.4f" % (
        c / n, (w1 - w0 - n * int(sys.argv[8])) / 1024 / c if kib != "-1" else -1,
        q["metadata-writes"] / c,
        q["metadata-write-bytes"] / 1024 / c, q["writeback-batches"] / c,
        q.get("writeback-side-batches", 0) / c, q.get("writeback-syncs", 0) / c)
print(round(d["iops"]), round(int(sys.argv[1]) / float(sys.argv[2]) * 1e6 / n, 2), round(share, 3), sys.argv[4], m,
      round(sqes, 3), round(enters, 3), kib, pc,
      "%.0f" % ((int(sys.argv[10]) - int(sys.argv[9])) / 2048) if int(sys.argv[9]) >= 0 else -1,
      "%.4f" % (q.get("link-waits", 0) / q["clusters-allocated"])
      if q and q.get("clusters-allocated", 0) > 0 else -1,
      "%.3f" % (q.get("early-new-ahead", 0) / q["early-new-links"])
      if q and q.get("early-new-links", 0) > 0 else -1,
      d["ios"], "%.2f" % (float(sys.argv[12]) - float(sys.argv[11])),
      "%.0f" % (q.get("link-wait-us", 0) / q["link-waits"]) if q and q.get("link-waits", 0) > 0 else -1)' \
		$((t1 - t0)) "$hz" "$tmp/stat" "$ext" "$tmp/qstats" "$w0" "$w1" "$(numfmt --from=iec "${bs^^}")" "$d0" "$d1" "$s0" "$s1"
	rm -f "$tmp/stat" "$tmp/qstats"
}

cells=(vqcowd-empty qsd-empty vqcowd-xl2 vqcowd-full)
[ -z "$base" ] || cells+=(base-empty base-xl2 base-full)
if [ -n "$only" ]; then
	keep=()
	for c in "${cells[@]}"; do
		case ",$only," in *",$c,"*) keep+=("$c") ;; esac
	done
	cells=("${keep[@]}")
	[ ${#cells[@]} -gt 0 ] || { echo "grow.sh: no cell left by --cells $only" >&2; exit 2; }
fi
if [ "$settle" -gt 0 ] && [ "$(discarded)" -ge 0 ]; then
	t0=$SECONDS quiet=0 last=$(discarded)
	while [ $quiet -lt 3 ] && [ $((SECONDS - t0)) -lt "$settle" ]; do
		sleep 1
		now=$(discarded)
		if [ "$now" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0; fi
		last=$now
	done
	echo "grow.sh: waited $((SECONDS - t0)) s for the disk's discards: $([ $quiet -ge 3 ] && echo ended || echo "still running after --settle $settle")" >&2
fi
echo "grow.sh: $reps round(s) of $([ "$ios" -gt 0 ] && echo "$ios writes" || echo "$runtime s"), $size images; load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
res=$tmp/res
: >"$res"
for REP in $(seq "$reps"); do
	for ((i = 0; i < ${#cells[@]}; i++)); do
		c=${cells[$(((i + REP - 1) % ${#cells[@]}))]}
		f=$full
		if [ "${c#*-}" != full ]; then
			f=$dir/grow-$REP-$c.qcow2
			made+=("$f")
			[ ! -f "$f" ] || { echo "grow.sh: $f exists (a previous run's; delete it)" >&2; exit 1; }
		fi
		lb=$(cut -d' ' -f1 /proc/loadavg)
		v=$(run "$c" "$f")
		la=$(cut -d' ' -f1 /proc/loadavg)
		echo "round $REP $c: IOPS cpu_us/IO punted extents unwritten meta_writes/IO meta_KiB/IO batches/IO SQEs/IO enters/IO file_KiB/IO new_clusters/IO file_KiB/cl meta_writes/cl meta_KiB/cl batches/cl side/cl syncs/cl discarded_MiB link_waits/cl early_ahead guest_writes seconds us/link_wait = $v; load1 $lb -> $la" >&2
		echo "$REP $c $v $lb $la" >>"$res"
	done
done
if [ "$ios" -gt 0 ]; then
	echo "## $rw, bs $bs, QD32, one queue, $ios writes per run (at most $runtime s), $reps rounds"
else
	echo "## $rw, bs $bs, QD32, one queue, $runtime s per run, $reps rounds"
fi
echo "(load at the end: $(cut -d' ' -f1-3 /proc/loadavg); qsd: $("$qsd" --version | head -1))"
python3 - "$res" <<'EOF'
import statistics as st, sys
d = {}
for l in open(sys.argv[1]):
    r, c, iops, cpu, sh, ex, un, mw, mb, wb, sq, en, *x, lb, la = l.split()
    d.setdefault(c, {})[r] = (float(iops), float(cpu), float(sh), float(lb), float(la),
                              int(ex), int(un), float(mw), float(mb), float(wb), float(sq),
                              float(en), [float(v) for v in x])
print("| cell | IOPS median (range) | CPU µs/IO | writes punted to io-wq | extents (unwritten), median | metadata writes / KiB / batches per guest write, median | SQEs / io_uring_enter per guest write, median | load1 before-after (range) |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for c, v in d.items():
    x = [t[0] for t in v.values()]
    sh = st.median([t[2] for t in v.values()])
    ld = [t[i] for t in v.values() for i in (3, 4)]
    ex = [t[5] for t in v.values() if t[5] >= 0]
    un = [t[6] for t in v.values() if t[6] >= 0]
    mq = [t[7:10] for t in v.values() if t[7] >= 0]
    sq = [t[10] for t in v.values() if t[10] >= 0]
    en = [t[11] for t in v.values() if t[11] >= 0]
    print("| %s | %.0f (%.0f-%.0f) | %.2f | %s | %s | %s | %s / %s | %.1f-%.1f |" % (c, st.median(x), min(x), max(x),
          st.median([t[1] for t in v.values()]), "%.0f %%" % (sh * 100) if sh >= 0 else "n/a",
          "%d (%d)" % (st.median(ex), st.median(un)) if ex else "-",
          "%.3f / %.2f / %.4f" % tuple(st.median([m[i] for m in mq]) for i in range(3)) if mq else "-",
          "%.2f" % st.median(sq) if sq else "-", "%.2f" % st.median(en) if en else "-",
          min(ld), max(ld)))
def ratio(a, b, what):
    if a not in d or b not in d:
        return
    q = [d[a][r][0] / d[b][r][0] for r in d[a] if r in d[b]]
    if q:
        print("%s: %.2f (%.2f-%.2f)" % (what, st.median(q), min(q), max(q)))
print()
print("| cell | new clusters per guest write | file KiB written per guest write | per new cluster: file KiB beyond the guest's data / metadata writes / metadata KiB | per new cluster: batches / side batches / fdatasyncs | per new cluster: link waits; µs per link wait | guest writes, seconds per run (medians) | MiB the disk discarded during the runs, median (max) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for c, v in d.items():
    x = [t[12] for t in v.values()]
    def med(i, f):
        y = [t[i] for t in x if len(t) > i and t[i] >= 0]
        return f % st.median(y) if y else "-"
    dm = [t[8] for t in x if len(t) > 8 and t[8] >= 0]
    print("| %s | %s | %s | %s / %s / %s | %s / %s / %s | %s; %s | %s, %s | %s |" % (c,
          med(1, "%.3f"), med(0, "%.1f"), med(2, "%.1f"), med(3, "%.3f"), med(4, "%.2f"),
          med(5, "%.4f"), med(6, "%.4f"), med(7, "%.4f"), med(9, "%.3f"), med(13, "%.0f"),
          med(11, "%.0f"), med(12, "%.2f"), "%.0f (%.0f)" % (st.median(dm), max(dm)) if dm else "-"))
print()
ratio("vqcowd-empty", "qsd-empty", "growing image, vqcowd/qsd (target 3x)")
ratio("vqcowd-xl2", "vqcowd-full", "extended L2 growing / full image, vqcowd (target 0.8x)")
ratio("vqcowd-empty", "vqcowd-full", "plain growing / full image, vqcowd")
ratio("vqcowd-xl2", "vqcowd-empty", "extended L2 growing / plain growing, vqcowd")
ratio("base-empty", "qsd-empty", "growing image, base/qsd")
ratio("base-xl2", "base-full", "extended L2 growing / full image, base")
ratio("base-xl2", "base-empty", "extended L2 growing / plain growing, base")
for c in ("empty", "xl2", "full"):
    ratio("vqcowd-" + c, "base-" + c, "%s: vqcowd/base" % c)
EOF
