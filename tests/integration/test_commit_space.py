#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The disk space a block-commit leaves in its base (qcow2/alloc.c
q2_alloc_give_back): the engine writing into the base takes clusters ahead
(a reserve of up to 64 MiB, fallocated, and a preallocated tail); when the
base becomes a read-only backing file again, what is free goes back to the
file system (the file cut after its last used cluster, free clusters below
it punched), as a close of a writer does. Before, a commit that did not
pivot to its base left ~70 MB allocated in a base of 5 MB for as long as the
file lived.

Each case runs the same commit with qemu-img on a copy of the same chain
(built offline with qemu-io: a 64 MiB base with 4 MiB of data, a top with
3 MiB) as the oracle: the base's blocks on disk (st_blocks) at most 2 MiB
above qemu-img's result, qemu-img check clean, and the chain reading as
qemu-img's (qemu-img compare):

  * active commit, BLOCK_JOB_READY, block-job-cancel (no pivot: the base
    becomes a backing file again), measured while vqcowd still serves the
    chain; then a second block-commit into the same base (writable again
    after the cut: the allocation state followed it), completed (pivot),
    the device writing 1 MiB more into the base; after quit, the base's
    content against qemu-img's plus that write;
  * intermediate commit (base <- mid <- top, mid committed into base; the
    base a backing file again), measured while served;
  * blockdev-snapshot-sync of an image with an enabled persistent bitmap:
    the bitmap is stored past the released reserve, so the reserve's space
    sits in the middle of the file and is punched, not cut: the old layer
    takes at most 2 MiB more on disk than before the snapshot plus its
    bitmap.

Usage: test_commit_space.py VQCOWD VQCOW_FE WORKDIR
"""

import contextlib
import os
import shutil
import subprocess

import qmplib
from qmplib import check, log, qimg_check

MiB = 1 << 20
SLACK = 2 * MiB


from qmplib import run_ok as run


def disk(p):
    return os.stat(p).st_blocks * 512


def qio(img, *cmds):
    run("qemu-io", *[x for c in cmds for x in ("-c", c)], img)


def chain(d, layers):
    """base (4 MiB of data), then each layer of LAYERS over the previous one,
    written with its qemu-io commands; in D (made empty). The file names."""
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    base = os.path.join(d, "base.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", base, 64 * MiB)
    qio(base, "write -P 0x99 0 4M")
    files, below = [base], base
    for name, cmds in layers:
        p = os.path.join(d, name)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(below), "-F",
            "qcow2", p)
        qio(p, *cmds)
        files.append(p)
        below = p
    return files


def twins(work, name, layers):
    """The same chain twice: (ours, qemu-img's)."""
    return chain(os.path.join(work, name, "ours"), layers), \
        chain(os.path.join(work, name, "qemu"), layers)


def same_space(ours, theirs, what):
    a, b = disk(ours), disk(theirs)
    log("%s: base %.2f MiB on disk (file %.2f MiB), qemu-img's %.2f MiB" %
        (what, a / MiB, os.path.getsize(ours) / MiB, b / MiB))
    check(a <= b + SLACK, "%s: the base takes %d bytes on disk, qemu-img's commit %d" %
          (what, a, b))


def compare(a, b, what):
    r = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True)
    check(r.returncode == 0, "%s: %s and %s differ: %s" % (what, a, b, r.stdout.decode()))


@contextlib.contextmanager
def served(vqcowd, work, img, name):
    """vqcowd serving IMG with QMP: (daemon, client); quit (exit 0) after the
    block, no sanitizer report in its log."""
    with qmplib.vqcowd_session(vqcowd, work, img, name, ["--format", "qcow2"]) as (d, q):
        yield d, q
    qmplib.sanitizer_clean(d.log())


TOP = ("top.qcow2", ("write -P 0x11 1M 2M", "write -P 0x22 10M 1M"))
MID = ("mid.qcow2", ("write -P 0x33 2M 1M", "write -P 0x44 30M 2M"))


def test_cancel(vqcowd, fe, work):
    (base, top), (qbase, qtop) = twins(work, "cancel", [TOP])
    run("qemu-img", "commit", "-q", "-d", qtop)
    with served(vqcowd, work, top, "cancel") as (d, q):
        q.ret("block-commit", {"device": "disk0", "job-id": "c"})
        q.wait_event("BLOCK_JOB_READY")
        q.ret("block-job-cancel", {"device": "c"})
        q.wait_event("BLOCK_JOB_COMPLETED")
        same_space(base, qbase, "active commit cancelled after ready, served")
        qimg_check(base, "base after the cancelled commit", share=True)
        compare(base, qbase, "base after the cancelled commit")
        # writable again after the cut: a second commit, pivoted, and a write into the base
        q.ret("block-commit", {"device": "disk0", "job-id": "c2"})
        q.wait_event("BLOCK_JOB_READY")
        q.ret("block-job-complete", {"device": "c2"})
        q.wait_event("BLOCK_JOB_COMPLETED")
        run(fe, "write", d.vsock, 40 * MiB, MiB, inp=b"\x5a" * MiB)
    qio(qbase, "write -P 0x5a 40M 1M")
    qimg_check(base, "base after the second commit and a write", share=True)
    compare(base, qbase, "base after the second commit and a write")
    same_space(base, qbase, "the second commit, pivoted, 1 MiB written, after quit")
    log("ok: a commit that does not pivot leaves no reserve in the base; it takes commits again")


def test_intermediate(vqcowd, fe, work):
    (base, mid, top), (qbase, qmid, qtop) = twins(work, "inter", [MID, TOP])
    run("qemu-img", "commit", "-q", "-d", qmid)
    with served(vqcowd, work, top, "inter") as (d, q):
        q.ret("block-commit", {"device": "disk0", "job-id": "i", "top-node": "disk0-backing1",
                               "base-node": "disk0-backing2"})
        q.wait_event("BLOCK_JOB_COMPLETED")
        same_space(base, qbase, "intermediate commit, served")
        qimg_check(base, "base after the intermediate commit", share=True)
        compare(base, qbase, "base after the intermediate commit")
        compare(top, qtop, "the chain after the intermediate commit")
    log("ok: the base of an intermediate commit keeps no reserve")


def test_snapshot_bitmap(vqcowd, fe, work):
    (base,), _ = twins(work, "snap", [])
    run("qemu-img", "bitmap", "--add", base, "bm0")
    before = disk(base)
    with served(vqcowd, work, base, "snap") as (d, q):
        run(fe, "write", d.vsock, 20 * MiB, MiB, inp=b"\x33" * MiB)
        grown = disk(base)
        ov = os.path.join(os.path.dirname(base), "ov.qcow2")
        q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                          "format": "qcow2", "snapshot-node-name": "ov"})
        after = disk(base)
        log("snapshot of an image with a persistent bitmap: old layer %.2f MiB on disk before, "
            "%.2f MiB while written, %.2f MiB after the snapshot (file %.2f MiB)" %
            (before / MiB, grown / MiB, after / MiB, os.path.getsize(base) / MiB))
        check(after <= before + MiB + SLACK,
              "the old layer takes %d bytes on disk after the snapshot, %d before + 1 MiB "
              "written" % (after, before))
    qimg_check(base, "the old layer after the snapshot", share=True)
    out = run("qemu-img", "info", "-U", base)
    check("bm0" in out, "the bitmap is gone:\n%s" % out)
    log("ok: the reserve under a stored bitmap is punched")


def main():
    vqcowd, fe, work = qmplib.setup_work(3, "qemu-img", "qemu-io")
    test_cancel(vqcowd, fe, work)
    test_intermediate(vqcowd, fe, work)
    test_snapshot_bitmap(vqcowd, fe, work)
    shutil.rmtree(work, ignore_errors=True)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
