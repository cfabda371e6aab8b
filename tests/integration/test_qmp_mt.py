#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""QMP operations on a qcow2 image served by several I/O threads (--qmp with
--io-threads 3 and four queues: queues 0 and 3 on the main thread, the
engine's owner, queues 1 and 2 on two I/O threads): the operations that
change which image the device serves, or hook its writes, while four queues
write and read back.

vqfe-stress writes interleaved 4 KiB blocks of the same clusters from four
queues (the main thread and two I/O threads), with write-zeroes and discards
mixed in, flushes, and reads every block back through another queue and
verifies it, round after round, until the QMP part is done (--until).
Meanwhile, twice:

  * block_resize (grow, a config-change notice while the threads run);
  * blockdev-snapshot-internal-sync and -delete-sync (requests held back,
    the engine closed and reopened, the threads' fast path rebuilt);
  * a persistent dirty bitmap added and removed (fast writes off while it
    records: the threads hand writes to the owner);
  * blockdev-snapshot-sync, twice (device paused, requests held on the
    queue threads, the new overlay put under the device, the held requests
    started again on their threads);
  * an intermediate block-commit of the first overlay into the image (the
    second overlay's backing file changed with the requests held);
  * block-commit of the active layer into the image, BLOCK_JOB_READY,
    block-job-cancel (no pivot, the write hook removed under load);
  * block-commit again (the write hook marks guest writes completed on any
    thread), BLOCK_JOB_READY, block-job-complete (the pivot back to the
    image, the overlay closed).

All of it on an overlay over a raw backing file, then on a zlib-compressed
image (compressed clusters read and inflated on the queue threads, and
replaced by the queues' writes). Before the first operation, on the overlay,
and after each pivot,
query-blockstats must show fast-path hits (reads and writes the queue
threads served themselves), and the daemon's log must say the threads serve
the rings. At the end: vqfe-stress verified every block, the daemon exits 0
on QMP quit, qemu-img check is clean, and the image file holds exactly what
vqfe-stress's map says (written blocks their last pattern, zeroed blocks
zeroes, untouched blocks the backing file's bytes).

Last, an overlay with a recording persistent dirty bitmap: blockdev-snapshot-sync
under the same load (the bitmap stored through a held operation while the
device is paused and requests are held: it must not wait for those), an
active commit back and the pivot; the bitmap still in the image.

Then a raw image (--format raw, the rings and the I/O on the threads) under
the same load, twice: blockdev-snapshot-sync over it (the raw layer becomes
the qcow2 overlay's backing file; fast-path hits on the overlay), a second
one, an active block-commit back into the raw image with BLOCK_JOB_READY and
block-job-complete (the pivot to raw), the queues' writes going on into it;
qemu-img check of every overlay, and the raw file against the map. Runs in the release, ASan
and ThreadSanitizer builds (contrib/test.sh): a sanitizer report in the log
fails it.

Usage: test_qmp_mt.py VQCOWD VQFE_STRESS WORKDIR
"""

import array
import os
import shutil
import subprocess
import time

import qmplib
from qmplib import Fail, check, log

MiB = 1024 * 1024
SIZE = 8 * MiB
BS = 4096
SEED = 21


from qmplib import run_ok as run


def qcow2_stats(q):
    st = q.ret("query-blockstats")
    return st[0]["vqcowd"].get("qcow2", {})


def wait_fast(q, d, what, above=0, timeout=60):
    """query-blockstats must show fast-path hits on the active layer (more than ABOVE)."""
    t = time.monotonic() + timeout
    while True:
        s = qcow2_stats(q)
        hits = s.get("fast-path-hits", 0)
        if hits > above:
            log("ok: %s: %d fast-path hits, %d hops" % (what, hits, s.get("fast-path-hops", 0)))
            return hits
        check(d.p.poll() is None, "%s: vqcowd exited" % what)
        check(time.monotonic() < t, "%s: no fast-path hit within %d s: %r" % (what, timeout, s))
        time.sleep(0.1)


def compare(img, base, mapf, fmt="qcow2"):
    out = img + ".out.raw"
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", img, out)
    M = (1 << 64) - 1
    bad = n = 0
    with open(out, "rb") as fo, open(base, "rb") as fb, open(mapf) as fm:
        for b, line in enumerate(fm):
            got, orig = fo.read(BS), fb.read(BS)
            st = line.split()
            if st[0] == "U":
                want = orig
            elif st[0] == "Z":
                want = bytes(BS)
            elif st[0] == "W":
                r = int(st[1])
                want = array.array("Q", [((SEED << 48) ^ (r << 32) ^ (b << 9) ^ i) & M
                                         for i in range(BS // 8)]).tobytes()
            else:
                continue
            n += 1
            if got != want:
                bad += 1
                if bad <= 5:
                    log("block %d (%s): wrong content in the image file" % (b, st[0]))
    os.unlink(out)
    check(bad == 0, "%d of %d blocks differ from the map" % (bad, n))
    log("ok: %d blocks of the image file as the map says" % n)


def snapshot_sync(q, node, ov, new):
    """blockdev-snapshot-sync of NODE into OV, node NEW the active layer."""
    q.ret("blockdev-snapshot-sync", {"node-name": node, "snapshot-file": ov,
                                     "snapshot-node-name": new, "format": "qcow2"})
    log("ok: blockdev-snapshot-sync: %s is the active layer" % new)


def commit_pivot(q, top, job, into=""):
    """block-commit of the active layer TOP into disk0, BLOCK_JOB_READY,
    block-job-complete: the pivot back to disk0; its node list."""
    q.ret("block-commit", {"device": top, "job-id": job, "base-node": "disk0"})
    e = q.wait_event("BLOCK_JOB_READY", 120)
    log("ok: BLOCK_JOB_READY (%d bytes)%s" % (e["data"]["offset"], into and " " + into))
    time.sleep(0.3)  # the job follows the guest's writes a while
    q.ret("block-job-complete", {"device": job})
    e = q.wait_event("BLOCK_JOB_COMPLETED", 120)
    check("error" not in e["data"], "commit %sfailed: %r" % (into and into + " ", e))
    return [n["node-name"] for n in q.ret("query-named-block-nodes")]


def cycle(q, d, work, img, i, size):
    # grow: the capacity the queue threads check changes under them
    size += MiB
    q.ret("block_resize", {"node-name": "disk0", "size": size})
    log("ok: block_resize to %d" % size)
    # internal snapshot: requests held back, engine closed and reopened
    hits = qcow2_stats(q).get("fast-path-hits", 0)
    q.ret("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s%d" % i})
    wait_fast(q, d, "after snapshot s%d" % i, hits)
    q.ret("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "s%d" % i})
    log("ok: internal snapshot s%d created and deleted" % i)
    # a recording persistent bitmap: fast writes off while it exists
    q.ret("block-dirty-bitmap-add", {"node": "disk0", "name": "b%d" % i, "persistent": True})
    time.sleep(0.3)
    q.ret("block-dirty-bitmap-remove", {"node": "disk0", "name": "b%d" % i})
    log("ok: persistent bitmap b%d added and removed" % i)
    # external snapshots: the device paused, held requests restarted on their threads
    ova, ovb = os.path.join(work, "ov%da.qcow2" % i), os.path.join(work, "ov%db.qcow2" % i)
    snapshot_sync(q, "disk0", ova, "ov%da" % i)
    wait_fast(q, d, "overlay ov%da" % i)
    snapshot_sync(q, "ov%da" % i, ovb, "ov%db" % i)
    # intermediate commit: ov_a into disk0, ov_b's header then names disk0
    q.ret("block-commit", {"device": "ov%db" % i, "job-id": "m%d" % i,
                           "top-node": "ov%da" % i, "base-node": "disk0"})
    e = q.wait_event("BLOCK_JOB_COMPLETED", 120)
    check("error" not in e["data"], "intermediate commit failed: %r" % e)
    nodes = [n["node-name"] for n in q.ret("query-named-block-nodes")]
    check(nodes[:2] == ["ov%db" % i, "disk0"], "after m%d: %r" % (i, nodes))
    log("ok: intermediate commit m%d: ov%db over disk0" % (i, i))
    wait_fast(q, d, "overlay ov%db" % i)
    # active commit cancelled once ready: no pivot, the hook removed under load
    q.ret("block-commit", {"device": "ov%db" % i, "job-id": "x%d" % i, "base-node": "disk0"})
    q.wait_event("BLOCK_JOB_READY", 120)
    q.ret("block-job-cancel", {"device": "x%d" % i, "force": True})
    q.wait_event("BLOCK_JOB_CANCELLED", 120)
    nodes = [n["node-name"] for n in q.ret("query-named-block-nodes")]
    check(nodes[0] == "ov%db" % i, "after the cancel: %r" % nodes)
    log("ok: block-job-cancel x%d: ov%db stays the active layer" % (i, i))
    # commit the active layer back, with the guest's writes hooked on every thread
    nodes = commit_pivot(q, "ov%db" % i, "j%d" % i)
    check(nodes[0] == "disk0", "after the pivot: %r" % nodes)
    log("ok: block-commit j%d pivoted back to disk0" % i)
    wait_fast(q, d, "after the pivot %d" % i)
    check(qcow2_stats(q).get("fast-path-hits", 0) > 0, "no fast-path hit on disk0")
    for f in (ova, ovb):
        os.unlink(f)
    return size


def under_stress(vqcowd, stress, work, img, fmt, serves, ops, verify):
    """Serve IMG (FMT) with four queues on the main thread and two I/O
    threads, the log saying the threads serve the rings (SERVES: how); OPS(q, d, sp), the
    QMP part, while vqfe-stress writes and verifies; then vqfe-stress must
    have verified every block, quit must end vqcowd with exit 0 and no
    sanitizer report, and VERIFY(mapf) checks the file."""
    until = os.path.join(work, "until")
    mapf = os.path.join(work, "map")
    for p in (until, mapf):
        if os.path.exists(p):
            os.unlink(p)
    d = qmplib.Daemon(vqcowd, work, img, "mt", extra=["--format", fmt, "--num-queues", "4",
                                                      "--io-threads", "3"], unlink_stale=True)
    with qmplib.stress_teardown(d) as st:
        t = time.monotonic() + 10
        want = "each thread serves its queues' rings" + serves
        while want not in d.log() and time.monotonic() < t:
            time.sleep(0.05)
        check(want in d.log(), "the I/O threads do not serve the rings:\n%s" % d.log())
        log("ok: --qmp, %s: the I/O threads serve the rings" % fmt)
        sp = st.start([stress, d.vsock, "--size", str(SIZE), "--queues", "4", "--seed",
                       str(SEED), "--mix", "--until", until, "--map", mapf])
        q = qmplib.Qmp(d.qsock, timeout=120)
        ops(q, d, sp)
        open(until, "w").close()
        out, _ = sp.communicate(timeout=300)
        out = out.decode(errors="replace")
        log(out.strip())
        check(sp.returncode == 0, "vqfe-stress: rc %d" % sp.returncode)
        if fmt == "qcow2":
            s = qcow2_stats(q)
            log("fast path at the end: %d hits, %d hops" % (s.get("fast-path-hits", 0),
                                                           s.get("fast-path-hops", 0)))
        qmplib.quit_clean(d, q)
        verify(mapf)


def one_image(vqcowd, stress, work, base, img, name):
    """Serve IMG, run the cycles under vqfe-stress, check the result."""
    log("== %s" % name)

    def ops(q, d, sp):
        wait_fast(q, d, "before the operations")
        size = SIZE
        for i in range(2):
            size = cycle(q, d, work, img, i, size)
            if sp.poll() is not None:
                raise Fail("vqfe-stress ended early: %s" %
                           sp.stdout.read().decode(errors="replace"))

    def verify(mapf):
        log(run("qemu-img", "check", img).strip())
        compare(img, base, mapf)
    under_stress(vqcowd, stress, work, img, "qcow2", "; the I/O threads serve cached clusters", ops,
                 verify)


def wait_writes(q, sp, above, after):
    """query-blockstats counts more than ABOVE + 200 writes within 30 s."""
    t = time.monotonic() + 30
    while q.ret("query-blockstats")[0]["stats"]["wr_operations"] < above + 200:
        check(sp.poll() is None, "vqfe-stress ended early%s" % after)
        check(time.monotonic() < t, "no writes to the raw image%s" % after)
        time.sleep(0.05)


def raw_cycle(q, d, sp, work, i):
    """The raw image under the device swapped with qcow2 overlays and back."""
    ova, ovb = os.path.join(work, "rov%da.qcow2" % i), os.path.join(work, "rov%db.qcow2" % i)
    # raw -> qcow2: the raw layer becomes the overlay's backing file (read by the owner)
    q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ova,
                                     "snapshot-node-name": "rov%da" % i, "format": "qcow2"})
    nodes = [n["node-name"] for n in q.ret("query-named-block-nodes")]
    check(nodes[:2] == ["rov%da" % i, "disk0"], "after the snapshot: %r" % nodes)
    log("ok: blockdev-snapshot-sync of the raw image: rov%da is the active layer" % i)
    wait_fast(q, d, "overlay rov%da over raw" % i)
    snapshot_sync(q, "rov%da" % i, ovb, "rov%db" % i)
    wait_fast(q, d, "overlay rov%db" % i)
    # qcow2 -> raw: active commit into the raw image, then the pivot to it
    nodes = commit_pivot(q, "rov%db" % i, "r%d" % i, "into the raw image")
    check(nodes == ["disk0"], "after the pivot to raw: %r" % nodes)
    st = q.ret("query-blockstats")[0]
    check("qcow2" not in st["vqcowd"], "raw active layer with qcow2 stats: %r" % st)
    log("ok: block-commit r%d pivoted back to the raw image" % i)
    # the queue threads go on writing and verifying the raw image a while
    wait_writes(q, sp, st["stats"]["wr_operations"], " after the pivot")
    log("ok: writes go on into the raw image")
    # the overlays were closed at the pivot: QEMU's checker takes them
    for f in (ova, ovb):
        log(run("qemu-img", "check", f).strip())
    for f in (ova, ovb):
        os.unlink(f)


def raw_image(vqcowd, stress, work, base):
    """A raw image served by the I/O threads, swapped with overlays and back."""
    img = os.path.join(work, "disk.raw")
    shutil.copyfile(base, img)
    log("== a raw image")

    def ops(q, d, sp):
        wait_writes(q, sp, 0, "")
        for i in range(2):
            raw_cycle(q, d, sp, work, i)
    under_stress(vqcowd, stress, work, img, "raw", " and image I/O", ops,
                 lambda mapf: compare(img, base, mapf, "raw"))


def bitmap_image(vqcowd, stress, work, base):
    """blockdev-snapshot-sync of a layer with a recording persistent bitmap:
    the bitmap is stored with the device paused, through a held operation,
    while the queues' requests popped meanwhile are held. Waiting for those
    too hung the command, the guest and SIGTERM. Then an active commit back
    into it (its frozen bitmap thawed) and the pivot."""
    img = os.path.join(work, "bm.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img, SIZE)
    ov = os.path.join(work, "bmov.qcow2")
    log("== an image with a recording persistent bitmap")

    def ops(q, d, sp):
        wait_fast(q, d, "before the bitmap")
        q.ret("block-dirty-bitmap-add", {"node": "disk0", "name": "pb", "persistent": True})
        wait_writes(q, sp, q.ret("query-blockstats")[0]["stats"]["wr_operations"],
                    " with the bitmap")
        q2 = qmplib.Qmp(d.qsock, timeout=30)
        try:
            snapshot_sync(q2, "disk0", ov, "bmov")
        except OSError as e:
            raise Fail("blockdev-snapshot-sync with a recording persistent bitmap: %r" % e)
        q2.close()
        wait_fast(q, d, "overlay bmov")
        nodes = commit_pivot(q, "bmov", "bj")
        check(nodes[0] == "disk0", "after the pivot: %r" % nodes)
        log("ok: block-commit bj pivoted back to disk0")
        wait_writes(q, sp, q.ret("query-blockstats")[0]["stats"]["wr_operations"],
                    " after the pivot")
        os.unlink(ov)

    def verify(mapf):
        log(run("qemu-img", "check", img).strip())
        info = run("qemu-img", "info", img)
        check("pb" in info, "bitmap pb not in the image:\n%s" % info)
        compare(img, base, mapf)
    under_stress(vqcowd, stress, work, img, "qcow2", "; the I/O threads serve cached clusters", ops,
                 verify)


def main():
    vqcowd, stress, work = qmplib.setup_work(3, "qemu-img")
    base = os.path.join(work, "base.raw")
    with open(base, "wb") as f:
        for b in range(SIZE // BS):
            f.write(bytes([(b * 7 + 13) & 0xff]) * 2048 + bytes([(b * 3 + 1) & 0xff]) * 2048)
    img = os.path.join(work, "disk.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", img, SIZE)
    one_image(vqcowd, stress, work, base, img, "an overlay on a raw backing file")
    # compressed clusters: read and inflated on the threads, replaced by writes
    zimg = os.path.join(work, "z.qcow2")
    run("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
        "compression_type=zlib", base, zimg)
    one_image(vqcowd, stress, work, base, zimg, "a zlib-compressed image")
    # a raw image: external snapshots of it and pivots back to it
    raw_image(vqcowd, stress, work, base)
    # an external snapshot that stores a recording persistent bitmap
    bitmap_image(vqcowd, stress, work, base)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
