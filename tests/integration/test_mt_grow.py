#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The queue threads' fast path after an online grow (--qmp, --io-threads 3,
three queues: queue 0 on the main thread, the engine's owner, queues 1 and 2
on two I/O threads): the range a block_resize added is served on the threads
like the rest of the disk, not handed to the owner until the image is
reopened.

A fresh 8 MiB qcow2 image; vqfe-stress writes, discards and verifies its
first 8 MiB from the three queues while QMP grows the disk twice: to 16 MiB
(the fast table's array of pages still long enough) and to 40 MiB (a
longer array published under the running threads, img/img_qcow2.c
ft_grow). Then, through the device:

  * vqcow-fe verify on queue 1 over [8, 16) MiB and on queue 2 over
    [30, 40) MiB (across the table's first 32 MiB page), 4 KiB blocks: a
    seeded pattern written, flushed, read back and compared; the first
    write of each cluster allocates it (a hop to the owner), every later
    write and every read of it must be a fast-path hit (query-blockstats'
    fast-path-hits and -hops, counted per request);
  * 4 KiB random reads on the three queues over [30, 40) MiB: at least
    95 % of those of the I/O threads (the main thread's take the owner's
    path and count as neither) fast-path hits, and the threads served at
    least half of all; and over the never-written [16, 30) MiB (zero
    clusters: filled on the threads, no I/O), at least 90 %, reading
    zeroes;
  * a grow to 2 GiB: the L2 cache, sized by default for the whole disk
    (64 KiB at 40 MiB), covers the new size (256 KiB), and so does the fast
    table's budget, which follows it.

At the end: QMP quit, exit 0, no sanitizer report in the log (it runs in
the ASan and ThreadSanitizer builds too), qemu-img check clean, and the
image file holds the pattern in both ranges (sampled: the first and last
64 bytes of every block).

All of that is about the I/O threads' own path: --io-threads-consolidate=off
(a QD1 verify is the low load that moves an I/O thread's queues to the main
thread). Then the same image with --io-threads-consolidate=on: the QD1
verify of [8, 16) MiB on queue 1 again (a new pattern): its queue moves to
the main thread after 256 requests (the exit line counts the move; the
verify's later requests are no fast-path hits any more, the main thread's
path counts neither), every block read back right, and the file holds the
new pattern.

Usage: test_mt_grow.py VQCOWD VQCOW_FE VQFE_STRESS WORKDIR
"""

import json
import os
import struct
import subprocess
import time

import qmplib
from qmplib import check, log

MiB = 1024 * 1024
BS = 4096
CLUSTER = 65536
M64 = (1 << 64) - 1


from qmplib import run_ok as run


def stats(q):
    s = q.ret("query-blockstats")[0]["vqcowd"].get("qcow2", {})
    return s.get("fast-path-hits", 0), s.get("fast-path-hops", 0)


def word(seed, off):
    """vqcow-fe verify's pattern: the 8-byte word at byte offset OFF."""
    z = ((seed ^ ((off * 0x9e3779b97f4a7c15) & M64)) + 0x9e3779b97f4a7c15) & M64
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def random_reads(fe, d, q, off, size, what):
    """4000 random 4K reads of [OFF, OFF + SIZE) from the three queues:
    (reads, reads on the I/O threads, fast-path hits)."""
    h0, p0 = stats(q)
    out = run(fe, "--queues", 3, "bench", d.vsock, "--rw", "randread", "--bs", BS,
              "--iodepth", 8, "--numjobs", 3, "--offset", off, "--size", size,
              "--number-ios", 4000, "--json")
    ios = json.loads(out)["total"]["ios"]
    h1, p1 = stats(q)
    log("random reads of %s: %d reads, %d hits, %d hops" % (what, ios, h1 - h0, p1 - p0))
    return ios, h1 - h0 + p1 - p0, h1 - h0


def verify_range(fe, d, q, queue, off, size, seed):
    """vqcow-fe verify of [OFF, OFF + SIZE) on QUEUE: mostly fast-path hits."""
    h0, p0 = stats(q)
    log(run(fe, "--queues", 3, "--queue", queue, "verify", d.vsock, "--offset", off, "--size",
            size, "--bs", BS, "--seed", seed).strip())
    h1, p1 = stats(q)
    reqs = 2 * size // BS
    clusters = size // CLUSTER
    log("[%d, %d) MiB on queue %d: %d requests, %d fast-path hits, %d hops" %
        (off // MiB, (off + size) // MiB, queue, reqs, h1 - h0, p1 - p0))
    # one allocating write per cluster goes to the owner; the rest is the threads'
    check(h1 - h0 >= reqs - clusters - reqs // 20,
          "the grown range is not served on the threads: %d hits, %d hops of %d requests" %
          (h1 - h0, p1 - p0, reqs))
    check(p1 - p0 <= clusters + reqs // 20, "%d hops for %d clusters" % (p1 - p0, clusters))


def check_file(img, ranges, work):
    out = os.path.join(work, "out.raw")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out)
    bad = n = 0
    with open(out, "rb") as f:
        for off, size, seed in ranges:
            for b in range(off, off + size, BS):
                for at in (b, b + BS - 64):
                    f.seek(at)
                    got = struct.unpack("<8Q", f.read(64))
                    want = tuple(word(seed, at + 8 * i) for i in range(8))
                    n += 1
                    if got != want:
                        bad += 1
                        if bad <= 5:
                            log("byte %d: not the pattern of seed %d" % (at, seed))
    os.unlink(out)
    check(bad == 0, "%d of %d samples of the grown range differ" % (bad, n))
    log("ok: %d samples of the grown range hold the pattern" % n)


def main():
    vqcowd, fe, stress, work = qmplib.setup_work(4, "qemu-img")
    img = os.path.join(work, "disk.qcow2")
    until = os.path.join(work, "until")
    run("qemu-img", "create", "-q", "-f", "qcow2", img, 8 * MiB)
    d = qmplib.Daemon(vqcowd, work, img, "grow", extra=["--format", "qcow2", "--num-queues", "3",
                                                        "--io-threads", "3",
                                                        "--io-threads-consolidate=off"],
                      unlink_stale=True)
    with qmplib.stress_teardown(d) as st:
        want = "the I/O threads serve cached clusters"
        t = time.monotonic() + 10
        while want not in d.log() and time.monotonic() < t:
            time.sleep(0.05)
        check(want in d.log(), "the I/O threads do not serve the rings:\n%s" % d.log())
        q = qmplib.Qmp(d.qsock, timeout=120)
        # the grows happen while the threads serve the old range
        sp = st.start([stress, d.vsock, "--size", str(8 * MiB), "--queues", "3", "--seed", "31",
                       "--mix", "--until", until])
        t = time.monotonic() + 60
        while stats(q)[0] == 0:
            check(sp.poll() is None and d.p.poll() is None, "vqfe-stress or vqcowd ended")
            check(time.monotonic() < t, "no fast-path hit before the grow")
            time.sleep(0.05)
        for size in (16 * MiB, 40 * MiB):
            q.ret("block_resize", {"node-name": "disk0", "size": size})
            log("ok: block_resize to %d MiB under load" % (size // MiB))
            time.sleep(0.3)
        open(until, "w").close()
        out, _ = sp.communicate(timeout=300)
        log(out.decode(errors="replace").strip())
        check(sp.returncode == 0, "vqfe-stress: rc %d" % sp.returncode)
        log("ok: vqfe-stress verified the first 8 MiB across both grows")

        ranges = [(8 * MiB, 8 * MiB, 41), (30 * MiB, 10 * MiB, 42)]
        verify_range(fe, d, q, 1, *ranges[0])
        verify_range(fe, d, q, 2, *ranges[1])
        ios, tios, hits = random_reads(fe, d, q, 30 * MiB, 10 * MiB,
                                       "[30, 40) MiB on the three threads")
        check(ios >= 4000 and tios >= ios // 2 and hits >= tios * 95 // 100,
              "random reads of the grown range: %d hits of %d on the I/O threads, %d in all" %
              (hits, tios, ios))
        # never written: zero clusters, read on the threads without I/O
        ios, tios, hits = random_reads(fe, d, q, 16 * MiB, 14 * MiB, "unwritten [16, 30) MiB")
        check(ios >= 4000 and tios >= ios // 2 and hits >= tios * 9 // 10,
              "reads of the unwritten grown range: %d hits of %d on the I/O threads, %d in all" %
              (hits, tios, ios))
        for i in range(8):
            off = 16 * MiB + i * 1781 * BS % (14 * MiB)
            r = subprocess.run([fe, "--queues", "3", "--queue", str(1 + i % 2), "read", d.vsock,
                                str(off), str(4 * BS)], capture_output=True, timeout=60)
            check(r.returncode == 0 and r.stdout == bytes(4 * BS),
                  "unwritten range at %d: rc %d, not zeroes" % (off, r.returncode))
        log("ok: the unwritten grown range reads as zeroes")
        # a default-sized L2 cache (the whole disk's tables) follows the grow
        l2 = q.ret("query-named-block-nodes")[0]["vqcowd"]["cache"]["l2-cache-size"]
        q.ret("block_resize", {"node-name": "disk0", "size": 2048 * MiB})
        l2b = q.ret("query-named-block-nodes")[0]["vqcowd"]["cache"]["l2-cache-size"]
        log("L2 cache %d bytes at 40 MiB, %d at 2 GiB" % (l2, l2b))
        check(l2b == 2048 * MiB // CLUSTER * 8,
              "the L2 cache does not cover the grown disk: %d bytes" % l2b)
        qmplib.quit_clean(d, q)
        check("moved to the main thread" not in d.log(), "queues moved with =off:\n%s" %
              d.log()[-4000:])
        log(run("qemu-img", "check", img).strip())
        check_file(img, ranges, work)

    # the same QD1 load with the queues consolidated: queue 1 leaves its thread
    d = qmplib.Daemon(vqcowd, work, img, "cons", extra=["--format", "qcow2", "--num-queues", "3",
                                                        "--io-threads", "3",
                                                        "--io-threads-consolidate=on"],
                      unlink_stale=True)
    try:
        q = qmplib.Qmp(d.qsock, timeout=120)
        off, size, seed = ranges[0][0], ranges[0][1], 43
        h0, p0 = stats(q)
        log(run(fe, "--queues", 3, "--queue", 1, "verify", d.vsock, "--offset", off, "--size",
                size, "--bs", BS, "--seed", seed).strip())
        h1, p1 = stats(q)
        reqs = 2 * size // BS
        log("consolidated: [%d, %d) MiB on queue 1: %d requests, %d fast-path hits, %d hops" %
            (off // MiB, (off + size) // MiB, reqs, h1 - h0, p1 - p0))
        # the first 256 on the I/O thread (hits: the clusters are allocated), the rest not
        check(0 < h1 - h0 + p1 - p0 < reqs // 2,
              "queue 1 did not move: %d hits, %d hops of %d requests" % (h1 - h0, p1 - p0, reqs))
        qmplib.quit_clean(d, q)
    except Exception:
        d.stop_showing_log(4000)
        raise
    check("moved to the main thread 1 times, back 0 times" in d.log(),
          "queue 1 did not move once:\n%s" % d.log()[-4000:])
    log("ok: at QD1 queue 1 moved to the main thread, its verify passed")
    log(run("qemu-img", "check", img).strip())
    check_file(img, [(off, size, seed), ranges[1]], work)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
