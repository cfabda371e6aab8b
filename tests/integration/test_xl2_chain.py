#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Extended-L2 whole-cluster links follow the backing chain while served.

qcow2_alloc_finish links a new cluster of an extended-L2 image with all 32
allocation bits when vqcowd wrote it whole and the image has no backing
file (q->backing_size == UINT64_MAX); with a backing file the subclusters
the write did not cover must stay unallocated, or they would read the
zeroes of the fill instead of the backing file. The backing file of the
image being written changes while vqcowd serves it: blockdev-snapshot-sync
puts an overlay (with a backing file) on top of an image without one, and a
pivoted block-commit makes the base (without one) the writer again. Each
step writes 4 KiB into a cluster new to the layer written, then checks:

  * the device reads the backing file's bytes around the 4 KiB in the
    overlay (not zeroes), and qemu-img map counts only those 4 KiB as the
    overlay's own (depth 0, data): per subcluster;
  * after the pivot to the base (no backing file), the base's new cluster
    is allocated whole (64 KiB of data at depth 0): the decision followed
    the chain in both directions;
  * after quit, qemu-img check clean on every layer and the chain equal to
    a raw file of the expected content (qemu-img compare).

Usage: test_xl2_chain.py VQCOWD VQCOW_FE WORKDIR
"""

import json
import os
import shutil
import subprocess

import qmplib
from qmplib import check, log, qimg_check
from qmplib import run_ok as run

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB
CS = 64 * KiB


def mkxl2(path, backing=None):
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o",
            "extended_l2=on,cluster_size=%d" % CS]
    if backing:
        # -u: the backing file is served (locked); its size is given
        args += ["-u", "-b", os.path.basename(backing), "-F", "qcow2"]
    run(*args, path, SIZE)


def own_data(img, off, length):
    """Bytes of [off, off + length) that IMG itself maps as data (depth 0)."""
    out = json.loads(run("qemu-img", "map", "-U", "--output=json", img))
    n = 0
    for e in out:
        s, t = max(e["start"], off), min(e["start"] + e["length"], off + length)
        if s < t and e["depth"] == 0 and e["data"]:
            n += t - s
    return n


def read(fe, vsock, off, length):
    r = subprocess.run([fe, "read", vsock, str(off), str(length)], capture_output=True,
                       timeout=60)
    check(r.returncode == 0, "vqcow-fe read: rc %d %s" % (r.returncode, r.stderr.decode()))
    return r.stdout


def write(fe, vsock, shadow, off, byte):
    data = bytes([byte]) * (4 * KiB)
    qmplib.fe(fe, "write", vsock, off, len(data), stdin=data)
    shadow[off:off + len(data)] = data


def same(fe, vsock, shadow, off, length, what):
    got = read(fe, vsock, off, length)
    want = bytes(shadow[off:off + length])
    if got != want:
        i = next(i for i in range(length) if got[i:i + 1] != want[i:i + 1])
        check(False, "%s: the device at 0x%x reads 0x%02x, expected 0x%02x" %
              (what, off + i, got[i], want[i]))


def per_subcluster(img, off, what):
    n = own_data(img, off & ~(CS - 1), CS)
    check(n == 4 * KiB, "%s: %s maps %d bytes of the cluster at 0x%x as its own data, expected "
          "4096 (a cluster of a layer with a backing file linked whole?)" %
          (what, os.path.basename(img), n, off & ~(CS - 1)))


def main():
    vqcowd, fe, work = qmplib.setup_work(3, "qemu-img", "qemu-io")
    base = os.path.join(work, "base.qcow2")
    ov1 = os.path.join(work, "ov1.qcow2")
    ov2 = os.path.join(work, "ov2.qcow2")
    mkxl2(base)
    run("qemu-io", "-c", "write -P 0xaa 0 8M", base)
    shadow = bytearray(b"\xaa" * (8 * MiB) + bytes(SIZE - 8 * MiB))

    with qmplib.vqcowd_session(vqcowd, work, base, "xl2chain", ["--format", "qcow2"]) as (d, q):
        # no backing file: a new cluster written whole is linked whole
        write(fe, d.vsock, shadow, 9 * MiB + 8 * KiB, 0x01)
        check(own_data(base, 9 * MiB, CS) == CS,
              "base without a backing file: its new cluster is not allocated whole")

        # an overlay over it, while served: per subcluster from its first write
        mkxl2(ov1, base)
        q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov1,
                                          "format": "qcow2", "mode": "existing",
                                          "snapshot-node-name": "ov1"})
        write(fe, d.vsock, shadow, 2 * MiB + 8 * KiB, 0x11)  # over the base's data
        write(fe, d.vsock, shadow, 10 * MiB + 8 * KiB, 0x12)  # over the base's zeroes
        write(fe, d.vsock, shadow, 9 * MiB + 32 * KiB, 0x13)  # over the whole cluster
        for off in (2 * MiB, 10 * MiB, 9 * MiB):
            same(fe, d.vsock, shadow, off, CS, "overlay on a base without backing")
        for off in (2 * MiB, 10 * MiB, 9 * MiB + 32 * KiB):
            per_subcluster(ov1, off, "after blockdev-snapshot-sync")

        # active commit, pivoted: the base (no backing file) writes again
        q.ret("block-commit", {"device": "ov1", "job-id": "c"})
        q.wait_event("BLOCK_JOB_READY")
        q.ret("block-job-complete", {"device": "c"})
        q.wait_event("BLOCK_JOB_COMPLETED")
        write(fe, d.vsock, shadow, 12 * MiB + 8 * KiB, 0x21)
        same(fe, d.vsock, shadow, 12 * MiB, CS, "the base after the pivot")
        check(own_data(base, 12 * MiB, CS) == CS,
              "the base after the pivot (no backing file again): its new cluster is not "
              "allocated whole")

        # a second overlay over the same base
        mkxl2(ov2, base)
        q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov2,
                                          "format": "qcow2", "mode": "existing",
                                          "snapshot-node-name": "ov2"})
        write(fe, d.vsock, shadow, 3 * MiB + 16 * KiB, 0x31)
        write(fe, d.vsock, shadow, 12 * MiB + 40 * KiB, 0x32)
        for off in (3 * MiB, 12 * MiB):
            same(fe, d.vsock, shadow, off, CS, "a second overlay")
        for off in (3 * MiB + 16 * KiB, 12 * MiB + 40 * KiB):
            per_subcluster(ov2, off, "the second overlay")
        same(fe, d.vsock, shadow, 0, SIZE, "the whole device")
    qmplib.sanitizer_clean(d.log())

    for img in (base, ov2):
        qimg_check(img, os.path.basename(img))
    raw = os.path.join(work, "expect.raw")
    with open(raw, "wb") as f:
        f.write(shadow)
    r = subprocess.run(["qemu-img", "compare", "-U", ov2, raw], capture_output=True)
    check(r.returncode == 0, "the chain differs from the expected content: %s" %
          r.stdout.decode())
    shutil.rmtree(work, ignore_errors=True)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
