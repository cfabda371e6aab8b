#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The fast table's memory budget (img/img_qcow2.c ft_budget): the table in
which the owner publishes mappings for the queue threads takes the L2
cache's budget when the whole disk's L2 entries fit the cache, and an
eighth of it when they do not (there it would be a second copy of the
slices loaded first, hit as rarely as the cache is). query-blockstats'
vqcowd.qcow2 section shows it: fast-table-size (bytes of its pages and
their array), fast-table-budget (the most its pages may take),
fast-table-entries (clusters it knows).

Each case: vqcowd --io-threads 2 --num-queues 2 (queue 1 on an I/O
thread, whose misses the owner maps and publishes a slice of), 4 KiB random
reads from both queues across the whole disk:

  * miss-bound: a 512 GiB preallocation=metadata image (64 MiB of L2
    tables) with --l2-cache-size 32M: the budget is 4 MiB, the reads fill
    the table up to it (so the bound is what stopped it), and it never
    holds more than the budget plus its array of page pointers (128 KiB);
  * the default cache: a 4 TiB image (512 MiB of L2 entries, the default
    cache's 256 MiB ceiling): the budget is 32 MiB;
  * a small image: 32 GiB preallocation=metadata, the default cache (its
    4 MiB of L2 tables, all of them): the budget is the cache's, and after
    the reads the table knows every cluster of the disk.

Then QMP quit (exit 0, no sanitizer report in the log) and qemu-img check
clean.

Usage: test_ft_budget.py VQCOWD VQCOW_FE WORKDIR
"""

import json
import os
import shutil
import subprocess
import time

import qmplib
from qmplib import check, log

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CLUSTER = 64 * KiB
PAGE = 512 * 8  # a page of the table: 512 entries of 8 bytes


from qmplib import run_ok as run


def table(q):
    s = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
    return s["fast-table-size"], s["fast-table-budget"], s["fast-table-entries"], \
        s["fast-path-hits"], s["fast-path-hops"]


def serve(vqcowd, fe, work, name, img, size, extra, nios, expect):
    """Serve IMG; random reads; EXPECT(l2_cache, size, budget, entries) checks."""
    args = ["--format", "qcow2", "--num-queues", "2", "--io-threads", "2"] + extra
    with qmplib.vqcowd_session(vqcowd, work, img, name, args) as (d, q):
        want = "the I/O threads serve cached clusters"
        t = time.monotonic() + 10
        while want not in d.log() and time.monotonic() < t:
            time.sleep(0.05)
        check(want in d.log(), "the I/O threads do not serve the rings:\n%s" % d.log())
        l2 = q.ret("query-named-block-nodes")[0]["vqcowd"]["cache"]["l2-cache-size"]
        s0 = table(q)
        out = run(fe, "--queues", 2, "bench", d.vsock, "--rw", "randread", "--bs", 4096,
                  "--iodepth", 16, "--numjobs", 2, "--size", size, "--number-ios", nios,
                  "--json")
        ios = json.loads(out)["total"]["ios"]
        fsize, budget, entries, hits, hops = table(q)
        log("%s: %d GiB, L2 cache %d KiB; %d reads: %d fast-path hits, %d hops; fast table "
            "%d KiB of a %d KiB budget, %d entries (before the reads: %d KiB, %d entries)" %
            (name, size // GiB, l2 // KiB, ios, hits - s0[3], hops - s0[4], fsize // KiB,
             budget // KiB, entries, s0[0] // KiB, s0[2]))
        check(ios == nios, "%d reads of %d" % (ios, nios))
        check(hops - s0[4] > 0, "no read of the I/O thread reached the owner")
        expect(l2, fsize, budget, entries)
    qmplib.sanitizer_clean(d.log())


def main():
    vqcowd, fe, work = qmplib.setup_work(3, "qemu-img")

    # miss-bound: 64 MiB of L2 tables, a 32 MiB cache
    size = 512 * GiB
    img = os.path.join(work, "big.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, size)
    arr = (size // CLUSTER // 512 + 1) * 8  # the array of page pointers

    def big(l2, fsize, budget, entries):
        check(l2 == 32 * MiB, "L2 cache %d bytes, not the 32 MiB asked for" % l2)
        check(budget == l2 // 8, "fast table budget %d bytes with a %d-byte L2 cache whose "
              "disk's tables do not fit: not an eighth of it" % (budget, l2))
        check(fsize <= budget + arr,
              "the fast table takes %d bytes, over its budget %d + %d of page pointers" %
              (fsize, budget, arr))
        # the reads touched far more pages than the budget holds: it is full
        check(fsize >= budget, "the fast table did not reach its budget: %d of %d bytes" %
              (fsize, budget))
        check(0 < entries <= budget // 8, "%d entries in %d bytes of pages" % (entries, budget))
        log("ok: miss-bound image: the fast table stays within 1/8 of the L2 cache (%d KiB)" %
            (budget // KiB))

    serve(vqcowd, fe, work, "big", img, size, ["--l2-cache-size", "32M"], 16000, big)
    log(run("qemu-img", "check", img).strip())
    os.unlink(img)

    # the default cache's ceiling (256 MiB) below the disk's 512 MiB of L2 entries
    size = 4096 * GiB
    img = os.path.join(work, "huge.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", img, size)
    arr = (size // CLUSTER // 512 + 1) * 8

    def huge(l2, fsize, budget, entries):
        check(l2 == 256 * MiB, "default L2 cache of a 4 TiB disk: %d bytes" % l2)
        check(budget == l2 // 8, "fast table budget %d bytes, not an eighth of %d" %
              (budget, l2))
        check(fsize <= budget + arr, "the fast table takes %d bytes, budget %d" %
              (fsize, budget))
        log("ok: default cache of a 4 TiB disk: fast table budget %d MiB" % (budget // MiB))

    serve(vqcowd, fe, work, "huge", img, size, [], 2000, huge)
    log(run("qemu-img", "check", img).strip())
    os.unlink(img)

    # small: every L2 table in the default cache; the table gets all of it
    size = 32 * GiB
    img = os.path.join(work, "small.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, size)
    n = size // CLUSTER

    def small(l2, fsize, budget, entries):
        check(l2 == n * 8, "default L2 cache of a 32 GiB disk: %d bytes, not its tables' %d" %
              (l2, n * 8))
        check(budget == l2, "fast table budget %d bytes, not the L2 cache's %d" % (budget, l2))
        check(entries == n, "the fast table knows %d of the %d clusters" % (entries, n))
        check(n * 8 <= fsize <= n * 8 + (n // 512 + 1) * 8,
              "the whole disk's table is %d bytes, not %d and its array" % (fsize, n * 8))
        log("ok: small image: the fast table holds every cluster (%d KiB)" % (fsize // KiB))

    # about 15 reads per page of the table on the I/O thread's queue: every
    # page is touched (a page missed: about 1e-3)
    serve(vqcowd, fe, work, "small", img, size, [], 30000, small)
    log(run("qemu-img", "check", img).strip())
    shutil.rmtree(work, ignore_errors=True)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
