#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""QMP block-dirty-bitmap-add/-remove/-clear/-enable/-disable (issue 11),
vqcowd against qemu-storage-daemon 7.2, results read back by QEMU's tools.

  * the same command sequence (errors: empty name, unknown node, bad
    granularity, an existing name, an unknown bitmap; then add with the
    default and an explicit granularity, disabled, disable/enable/clear,
    remove) gives the same replies (return, or the same error text) and the
    same "dirty-bitmaps" listings from both daemons, on equal images; after
    quit `qemu-img info` lists the same bitmaps (name, granularity, flags)
    in both files and `qemu-img check` finds nothing;
  * a bitmap added online records a guest write (vqcow-fe): after vqcowd
    exits, `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME`
    report exactly the written granule dirty (skipped visibly when nbdinfo
    is missing);
  * removing the last bitmap removes the extension: qemu-img info lists
    none, check is clean;
  * kill -9 at random moments while a client adds and removes bitmaps:
    `qemu-img check` never reports corruption (leaks at most) and the image
    opens again in vqcowd.

  * vqcowctl bitmap add|disable|enable|clear|remove|merge drive the same
    commands (--granularity, --persistent, --disabled): listing and
    qemu-img info as expected, usage errors exit 2, daemon errors exit 1;
    the file does not grow by a preallocation chunk per command.

Usage: test_qmp_bitmap_cmds.py VQCOWD VQCOW-FE VQCOWCTL WORKDIR
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

from bitmaplib import (QSD, M, N, check_clean, compare, info_bitmaps, nbd_dirty, ours_run,
                       run_seq, sh, sorted_bitmaps, wait_unlocked)
from qmplib import (SKIP, Daemon, Qmp, check, fe, log, qsd_running, quit_daemon, run_main,
                    vqcowd_session)

SEQ = [
    ("block-dirty-bitmap-add", {"node": N, "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "b"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b1", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b1", "persistent": True}),
    ("block-dirty-bitmap-remove", {"node": N, "name": "nope"}),
    ("block-dirty-bitmap-clear", {"node": N, "name": "nope"}),
    ("block-dirty-bitmap-enable", {"node": N, "name": "nope"}),
    ("block-dirty-bitmap-disable", {"node": N, "name": "nope"}),
    ("block-dirty-bitmap-remove", {"node": "nope", "name": "b1"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b2", "persistent": True,
                                "granularity": 131072, "disabled": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b3", "persistent": True,
                                "granularity": 512}),
    ("query", None),
    ("block-dirty-bitmap-disable", {"node": N, "name": "b1"}),
    ("block-dirty-bitmap-enable", {"node": N, "name": "b2"}),
    ("block-dirty-bitmap-clear", {"node": N, "name": "b1"}),
    ("query", None),
    ("block-dirty-bitmap-remove", {"node": N, "name": "b3"}),
    ("query", None),
]


def qsd_run(work, img):
    qs = os.path.join(work, "qsd.qmp")
    with qsd_running(QSD, qs, img, N) as p:
        q = Qmp(qs)
        out = run_seq(q, None, None, SEQ)
        q.cmd("quit")
        p.wait(10)
    return out


def test_vs_qsd(vqcowd, work):
    a = os.path.join(work, "qsd.qcow2")
    b = os.path.join(work, "ours.qcow2")
    for f in (a, b):
        sh("qemu-img", "create", "-q", "-f", "qcow2", f, 64 * M)
    want = qsd_run(work, a)
    got, _ = ours_run(vqcowd, work, b, "seq", None, SEQ)
    compare(want, got, SEQ)
    log("ok: %d replies and listings as qemu-storage-daemon's" % len(SEQ))
    # (the directory order differs: QEMU writes a session's new bitmaps newest
    # first at exit, we append each at its command; both list the same)
    ia, ib = sorted_bitmaps(a), sorted_bitmaps(b)
    check(ia == ib and ia, "qemu-img info bitmaps: qsd %r, vqcowd %r" % (ia, ib))
    check_clean(b, "after the sequence")
    log("ok: qemu-img info lists the same bitmaps: %r; check clean" % ib)


def test_data(vqcowd, fe_bin, work):
    img = os.path.join(work, "data.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 16 * M)
    with vqcowd_session(vqcowd, work, img, "data") as (d, q):
        q.ret("block-dirty-bitmap-add", {"node": N, "name": "bk", "persistent": True})
        q.ret("block-dirty-bitmap-add", {"node": N, "name": "gone", "persistent": True})
        fe(fe_bin, "write", d.vsock, 3 * M + 4096, 4096, stdin=os.urandom(4096))
        q.ret("block-dirty-bitmap-remove", {"node": N, "name": "gone"})
        n = q.ret("query-named-block-nodes")[0]["dirty-bitmaps"]
        check([(b["name"], b["count"]) for b in n] == [("bk", 65536)], "listing %r" % n)
    bms = info_bitmaps(img)
    check(bms == [{"flags": ["auto"], "name": "bk", "granularity": 65536}],
          "qemu-img info: %r" % bms)
    check_clean(img, "after a guest write")
    log("ok: qemu-img info lists 'bk' (auto, 64 KiB); check clean")
    if not shutil.which("nbdinfo"):
        log("SKIP part: nbdinfo not installed, dirty ranges not read through qemu-nbd")
    else:
        dirty = nbd_dirty(work, img, "bk")
        check(dirty == [(3 * M, 65536)], "qemu-nbd dirty ranges %r" % dirty)
        log("ok: qemu-nbd -B bk: dirty exactly [3 MiB, +64 KiB)")
    with vqcowd_session(vqcowd, work, img, "data2") as (d, q):
        q.ret("block-dirty-bitmap-remove", {"node": N, "name": "bk"})
    check(info_bitmaps(img) is None, "bitmaps left: %r" % info_bitmaps(img))
    check_clean(img, "after removing the last bitmap")
    log("ok: removing the last bitmap removes the extension; check clean")


def test_kill(vqcowd, work, rounds=6):
    img = os.path.join(work, "kill.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 64 * M)
    rng = random.Random(11)
    done = [0]
    for r in range(rounds):
        d = Daemon(vqcowd, work, img, "kill%d" % r)
        stopflag = []

        def churn():
            try:
                q = Qmp(d.qsock)
                i = 0
                while not stopflag:
                    q.cmd("block-dirty-bitmap-add", {"node": N, "name": "k%d" % (i % 3),
                                                     "persistent": True})
                    q.cmd("block-dirty-bitmap-clear", {"node": N, "name": "k%d" % (i % 3)})
                    if i % 2:
                        q.cmd("block-dirty-bitmap-remove", {"node": N,
                                                            "name": "k%d" % ((i + 1) % 3)})
                    i += 1
                    done[0] += 1
            except Exception:
                pass
        t = threading.Thread(target=churn)
        t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        d.p.send_signal(signal.SIGKILL)
        d.p.wait(10)
        stopflag.append(1)
        t.join(10)
        wait_unlocked(img)
        check_clean(img, "kill -9 round %d" % r, leaks_ok=True)
    check(done[0] >= rounds, "only %d add/clear rounds ran before the kills" % done[0])
    log("ok: %d kill -9 rounds during %d add/clear/remove rounds: qemu-img check never "
        "finds corruption" % (rounds, done[0]))
    d = Daemon(vqcowd, work, img, "killafter")
    try:
        quit_daemon(d, 30)
    finally:
        d.stop()


def ctl(ctl_bin, d, *args):
    r = subprocess.run([ctl_bin, "-s", d.qsock] + [str(a) for a in args], capture_output=True,
                       timeout=60)
    return r.returncode, r.stdout.decode() + r.stderr.decode()


def test_ctl(vqcowd, ctl_bin, work):
    img = os.path.join(work, "ctl.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 16 * M)
    d = Daemon(vqcowd, work, img, "ctl")
    try:
        rc, out = ctl(ctl_bin, d, "bitmap", "add", "c1", "--persistent", "--granularity",
                      "128K", "--disabled")
        check(rc == 0 and "bitmap 'c1' added" in out, "ctl add: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "add", "c2", "--persistent")
        check(rc == 0, "ctl add c2: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "add", "c2", "--persistent")
        check(rc == 1 and "Bitmap already exists: c2" in out, "ctl add again: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "frob", "c2")
        check(rc == 2, "ctl bitmap frob: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "remove", "c2", "--disabled")
        check(rc == 2, "ctl remove --disabled: %d %s" % (rc, out))
        for op in ("enable", "clear", "disable", "enable"):
            rc, out = ctl(ctl_bin, d, "bitmap", op, "c1")
            check(rc == 0, "ctl %s: %d %s" % (op, rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "remove", "c2")
        check(rc == 0 and "bitmap 'c2' removed" in out, "ctl remove: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "add", "n1")
        check(rc == 0, "ctl add n1 (non-persistent): %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "merge", "c1", "n1", "c1")
        check(rc == 0 and "bitmaps merged into 'c1'" in out, "ctl merge: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "merge", "c1")
        check(rc == 2, "ctl merge without a source: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "merge", "c1", "zz")
        check(rc == 1 and "Dirty bitmap 'zz' not found" in out, "ctl merge zz: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "bitmap", "remove", "n1")
        check(rc == 0, "ctl remove n1: %d %s" % (rc, out))
        rc, out = ctl(ctl_bin, d, "--json", "raw",
                      '{"execute": "query-named-block-nodes"}')
        bms = json.loads(out)[0]["dirty-bitmaps"]
        check([(b["name"], b["granularity"], b["recording"]) for b in bms] ==
              [("c1", 131072, True)], "listing after vqcowctl: %r" % bms)
        quit_daemon(d, 30)
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()
    bms = info_bitmaps(img)
    check(bms == [{"flags": ["auto"], "name": "c1", "granularity": 131072}],
          "qemu-img info after vqcowctl: %r" % bms)
    # each command closes and reopens the engine: the file must not grow by a
    # preallocation chunk (4 MiB here) per command (it was 26 MiB after these 9)
    size = os.path.getsize(img)
    check(size < 8 * M, "the file grew to %d bytes over 9 bitmap commands" % size)
    log("ok: vqcowctl bitmap add/enable/clear/disable/remove; usage errors 2, errors 1; "
        "file %d KiB" % (size >> 10))


def main():
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    vqcowd, fe_bin, ctl_bin, work = sys.argv[1:]
    if not QSD or not shutil.which("qemu-img") or not shutil.which("qemu-nbd"):
        log("SKIP: qemu-storage-daemon, qemu-img or qemu-nbd not installed")
        return SKIP
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    test_vs_qsd(vqcowd, work)
    test_data(vqcowd, fe_bin, work)
    test_ctl(vqcowd, ctl_bin, work)
    test_kill(vqcowd, work)
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
