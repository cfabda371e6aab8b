#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""block-commit into a base the daemon opened read-only (issue 11), through a real QMP client.

vqcowd started on an overlay opens its backing chain read-only (as after a
restart of a daemon that took an external snapshot). block-commit reopens
the base read-write for the job, as QEMU does, and gives the write lock back
when the job ends:

  * refused with QEMU's lock message while another process (qemu-io -r, which
    does not share "write") holds the base; the chain unchanged afterwards;
  * with a writer running: BLOCK_JOB_READY, block-job-complete pivots to the
    base (read-write, write lock held: qemu-io cannot open it); every byte
    written reads back through the device and, after the daemon stopped,
    from the base alone; qemu-img check clean on both files;
  * block-job-cancel before ready: the base holds a backing file's locks
    again (qemu-io -r opens it, a writer cannot), the chain reads as written;
  * a raw base: reopened read-write, committed into and pivoted to (raw
    served by two I/O threads, as a qcow2 one), byte for byte;
  * kill -9 while the job copies into the reopened base: qemu-img check
    passes on both files and the chain reads what the writer wrote.

Usage: test_commit_reopen.py VQCOWD VQCOW-FE WORKDIR
"""

import os
import subprocess
import time

from qmplib import check, log, run_main, setup_work
from test_layers import (MiB, Daemon, Qmp, Writer, alone, can_read_lock, can_write_lock,
                         new_disk, nodes, qcheck, run, verify_file)


def chain(work, size):
    base = new_disk(work, "rbase.qcow2", size)
    ov = os.path.join(work, "rov.qcow2")
    if os.path.exists(ov):
        os.unlink(ov)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", ov)
    return base, ov


def test_complete(vqcowd, fe, work):
    size = 32 * MiB
    base, ov = chain(work, size)
    # the base holds data of its own, written before the daemon started
    w = None
    d = Daemon(vqcowd, work, base, "r0")
    try:
        w = Writer(fe, d.vsock, size, 11)
        w.fill(8 * MiB)
    finally:
        d.stop()
    d = Daemon(vqcowd, work, ov, "r1")
    try:
        q = Qmp(d.qsock)
        w.vsock = d.vsock
        n = nodes(q)
        check(n == [("disk0", ov, False), ("disk0-backing1", base, True)], "nodes: %r" % n)
        check(can_read_lock(base) and not can_write_lock(base), "base not read-only at start")
        # another process that does not share "write": the reopen is refused
        holder = subprocess.Popen(["qemu-io", "-r", alone(base)], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            check(holder.poll() is None, "qemu-io -r did not stay")
            q.err("block-commit", {"device": "disk0", "job-id": "c"},
                  'Failed to get "write" lock', "block-commit while qemu-io holds the base")
        finally:
            holder.stdin.close()
            holder.wait(10)
        check(q.ret("query-block-jobs") == [], "a refused job is listed")
        check(nodes(q) == n, "chain changed by a refused commit: %r" % nodes(q))
        check(can_read_lock(base) and not can_write_lock(base),
              "base not read-only after the refused commit")
        w.fill()
        w.start()
        time.sleep(0.3)
        q.ret("block-commit", {"device": "disk0", "job-id": "c"})
        cw, cr = can_write_lock(base), can_read_lock(base)
        check(not cw and not cr, "the base is not locked for writing during the job "
              "(qemu-io could open it: read-write %s, read-only %s)" % (cw, cr))
        jobs = q.ret("query-block-jobs")
        check(len(jobs) == 1 and jobs[0]["device"] == "c", "query-block-jobs: %r" % jobs)
        q.wait_event("BLOCK_JOB_READY")
        time.sleep(0.3)
        q.ret("block-job-complete", {"device": "c"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        check("error" not in ev["data"], "completed with an error: %r" % ev)
        w.stop()
        n = nodes(q)
        check(n == [("disk0-backing1", base, False)], "nodes after the pivot: %r" % n)
        check(can_write_lock(ov), "the overlay is still locked after the pivot")
        w.verify_fe("after commit into the reopened base")
        log("ok: block-commit reopened the read-only base, pivoted to it")
    finally:
        d.stop()
    qcheck(base, "reopened base after complete")
    qcheck(ov, "overlay after complete")
    verify_file(alone(base), w.shadow, work, "base alone after complete")


def test_cancel(vqcowd, fe, work):
    size = 32 * MiB
    base, ov = chain(work, size)
    d = Daemon(vqcowd, work, ov, "r2")
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 12)
        w.fill()
        q.ret("block-commit", {"device": "disk0", "job-id": "c", "speed": 1 * MiB})
        time.sleep(0.5)
        q.ret("block-job-cancel", {"device": "c"})
        q.wait_event("BLOCK_JOB_CANCELLED")
        check(q.ret("query-block-jobs") == [], "job listed after cancel")
        check(can_read_lock(base) and not can_write_lock(base),
              "base not back to a backing file's locks after cancel")
        n = nodes(q)
        check(n == [("disk0", ov, False), ("disk0-backing1", base, True)], "nodes: %r" % n)
        w.write(0, b"\x5a" * 65536)
        w.verify_fe("after cancel")
        # and again: the base is reopened read-write once more
        q.ret("block-commit", {"device": "disk0", "job-id": "c2"})
        q.wait_event("BLOCK_JOB_READY")
        q.ret("block-job-complete", {"device": "c2"})
        q.wait_event("BLOCK_JOB_COMPLETED")
        w.verify_fe("second commit after a cancel")
        log("ok: cancel gives the write lock back; a second commit reopens it again")
    finally:
        d.stop()
    qcheck(base, "base after cancel and commit")
    qcheck(ov, "overlay after cancel and commit")
    verify_file(alone(base), w.shadow, work, "base after cancel and commit")


def test_raw_base(vqcowd, fe, work):
    """A raw base opened read-only: reopened read-write, committed into, pivoted to."""
    size = 16 * MiB
    base = os.path.join(work, "rraw.img")
    ov = os.path.join(work, "rrawov.qcow2")
    for p in (base, ov):
        if os.path.exists(p):
            os.unlink(p)
    run("qemu-img", "create", "-q", "-f", "raw", base, size)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ov)
    d = Daemon(vqcowd, work, ov, "r4", extra=("--num-queues", "2", "--io-threads", "2"))
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 14)
        w.fill()
        q.ret("block-commit", {"device": "disk0", "job-id": "c"})
        q.wait_event("BLOCK_JOB_READY")
        q.ret("block-job-complete", {"device": "c"})
        q.wait_event("BLOCK_JOB_COMPLETED")
        n = nodes(q)
        check(n == [("disk0-backing1", base, False)], "nodes after the pivot: %r" % n)
        w.write(MiB, b"\x3c" * 65536)
        w.verify_fe("raw base after the pivot")
    finally:
        d.stop()
    got = open(base, "rb").read()
    check(got == bytes(w.shadow), "the raw base differs from what was written")
    log("ok: a raw base opened read-only: reopened, committed into, byte for byte as written")


def test_kill(vqcowd, fe, work):
    size = 32 * MiB
    base, ov = chain(work, size)
    d = Daemon(vqcowd, work, ov, "r3")
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 13)
        w.fill()
        w.start()
        q.ret("block-commit", {"device": "disk0", "job-id": "k", "speed": 4 * MiB})
        time.sleep(1.5)
        jobs = q.ret("query-block-jobs")
        check(jobs and 0 < jobs[0]["offset"] < jobs[0]["len"], "not copying: %r" % jobs)
        w.stop()
    finally:
        d.kill()
    log("killed while copying into the reopened base")
    qcheck(base, "kill -9 during the reopened commit", leaks_ok=True)
    qcheck(ov, "kill -9 during the reopened commit", leaks_ok=True)
    verify_file(ov, w.shadow, work, "kill -9 during the reopened commit")


def main():
    vqcowd, fe, work = setup_work(3, "qemu-img", "qemu-io", fresh=False)
    test_complete(vqcowd, fe, work)
    test_cancel(vqcowd, fe, work)
    test_raw_base(vqcowd, fe, work)
    test_kill(vqcowd, fe, work)
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
