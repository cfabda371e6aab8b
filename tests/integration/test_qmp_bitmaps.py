#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Persistent dirty bitmaps in query-named-block-nodes ("dirty-bitmaps"),
vqcowd against qemu-storage-daemon on the same images (issue 11).

  * an image with an enabled bitmap (64 KiB granularity) and a disabled one
    (128 KiB) with bits set by qemu-io writes: vqcowd lists the same
    BlockDirtyInfo objects as qemu-storage-daemon (name, recording,
    persistent, busy, granularity, count), in the same order;
  * a guest write through vqcowd (vqcow-fe) moves the enabled bitmap's count
    by exactly the granules it touched and leaves the disabled one alone;
    after quit qemu-storage-daemon reads the same counts from the file;
  * kill -9 leaves the enabled bitmap in use on disk: both daemons then
    list it as inconsistent;
  * an image without bitmaps has no "dirty-bitmaps" key, in both.

Usage: test_qmp_bitmaps.py VQCOWD VQCOW-FE WORKDIR
"""

import os
import shutil
import signal
import subprocess
import sys
import time

from qmplib import SKIP, Daemon, Qmp, check, fe, log, qsd_running, quit_daemon, run_main

QSD = shutil.which("qemu-storage-daemon")
M = 1 << 20


def sh(*args):
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=120)


def qsd_bitmaps(work, image):
    qs = os.path.join(work, "qsd.qmp")
    with qsd_running(QSD, qs, image) as p:
        q = Qmp(qs)
        n = [x for x in q.ret("query-named-block-nodes") if x["node-name"] == "disk0"][0]
        q.cmd("quit")
        p.wait(10)
    return n.get("dirty-bitmaps")


def ours(d):
    q = Qmp(d.qsock)
    n = q.ret("query-named-block-nodes")[0]
    q.close()
    return n.get("dirty-bitmaps")


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    vqcowd, fe_bin, work = sys.argv[1:]
    if not QSD or not shutil.which("qemu-img") or not shutil.which("qemu-io"):
        log("SKIP: qemu-storage-daemon, qemu-img or qemu-io not installed")
        return SKIP
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    plain = os.path.join(work, "plain.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", plain, 16 * M)
    d = Daemon(vqcowd, work, plain, "plain")
    try:
        check(ours(d) is None, "dirty-bitmaps on an image without bitmaps")
        quit_daemon(d, 20)
    finally:
        d.stop()
    check(qsd_bitmaps(work, plain) is None, "qsd: dirty-bitmaps without bitmaps")
    log("ok: no dirty-bitmaps key without bitmaps, as qemu-storage-daemon")

    img = os.path.join(work, "bm.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 64 * M)
    sh("qemu-img", "bitmap", "--add", "-g", "128k", img, "dis")
    sh("qemu-img", "bitmap", "--add", img, "en")
    sh("qemu-io", "-c", "write 0 300k", img)
    sh("qemu-img", "bitmap", "--disable", img, "dis")
    sh("qemu-io", "-c", "write 1M 64k", img)
    want = qsd_bitmaps(work, img)
    check(want and len(want) == 2, "qsd dirty-bitmaps %r" % want)
    d = Daemon(vqcowd, work, img, "bm")
    try:
        got = ours(d)
        check(got == want, "dirty-bitmaps: ours %r, qemu-storage-daemon %r" % (got, want))
        log("ok: dirty-bitmaps as qemu-storage-daemon: %r" % got)
        en0 = [b for b in got if b["name"] == "en"][0]["count"]
        # 128 KiB at 8 MiB + 32 KiB touches three 64 KiB granules of "en"
        fe(fe_bin, "write", d.vsock, 8 * M + 32768, 131072, stdin=os.urandom(131072))
        got2 = {b["name"]: b for b in ours(d)}
        check(got2["en"]["count"] == en0 + 3 * 65536, "en after a guest write: %r" % got2)
        check(got2["dis"] == [b for b in got if b["name"] == "dis"][0],
              "the disabled bitmap changed: %r" % got2)
        quit_daemon(d, 20)
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()
    after = {b["name"]: b for b in qsd_bitmaps(work, img)}
    check(after["en"]["count"] == got2["en"]["count"] and
          after["dis"]["count"] == got2["dis"]["count"],
          "stored counts: qemu-storage-daemon reads %r, we had %r" % (after, got2))
    log("ok: a guest write counted (en +3 granules), stored, read back by qemu-storage-daemon")

    d = Daemon(vqcowd, work, img, "bmkill")
    try:
        fe(fe_bin, "write", d.vsock, 0, 4096, stdin=os.urandom(4096))
    finally:
        d.p.send_signal(signal.SIGKILL)
        d.p.wait(10)
    for _ in range(200):  # the kernel drops the dead daemon's locks with its io_uring
        if subprocess.run(["qemu-img", "info", img], capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    want = qsd_bitmaps(work, img)
    d = Daemon(vqcowd, work, img, "bmafter")
    try:
        got = ours(d)
        quit_daemon(d, 20)
    finally:
        d.stop()
    check(got == want, "after kill -9: ours %r, qemu-storage-daemon %r" % (got, want))
    check(any(b.get("inconsistent") for b in got), "no bitmap is inconsistent: %r" % got)
    log("ok: after kill -9 both list the in-use bitmap as inconsistent: %r" % got)
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
