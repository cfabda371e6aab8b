#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Non-persistent dirty bitmaps (block-dirty-bitmap-add without "persistent",
QEMU's default), vqcowd against qemu-storage-daemon 7.2 (issue 11).

  * one conversation, run against both daemons on equal images (4 KiB
    clusters: the default granularity is then 4 KiB; qsd with discard=unmap
    so that its discards reach the bitmaps as ours do): adds (default and
    explicit granularity, disabled; errors: existing names of either kind,
    empty name, bad granularity), guest writes, write-zeroes and discards
    through vqcow-fe over vhost-user, disable/enable/clear/remove, listings
    (name, recording, persistent, busy, granularity, count) after each
    step: every reply and listing must be equal, so the counts prove the
    same granules were marked;
  * the file is never touched by a non-persistent bitmap: after quit,
    qemu-img info lists only the persistent one, check is clean, and the
    image's bytes did not change across adding/removing non-persistent ones
    (the engine is not closed and reopened for them);
  * a raw image takes them too (default granularity 64 KiB).

Usage: test_qmp_bitmap_np.py VQCOWD VQCOW-FE WORKDIR
"""

import json
import os
import shutil
import subprocess
import sys
import time

from qmplib import SKIP, Daemon, Qmp, check, fe, log, quit_daemon, reap, run_main, wait_path

QSD = shutil.which("qemu-storage-daemon")
M = 1 << 20
N = "disk0"

SEQ = [
    ("block-dirty-bitmap-add", {"node": N, "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "p"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": ""}),
    ("block-dirty-bitmap-add", {"node": N, "name": "x", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b", "granularity": 512,
                                "persistent": False}),
    ("block-dirty-bitmap-add", {"node": N, "name": "d", "granularity": 131072,
                                "disabled": True}),
    ("query", None),
    ("write", (3 * M + 4096, 4096)),
    ("write", (20 * M - 4096, 8192)),
    ("zero", (40 * M, 65536)),
    ("discard", (50 * M, 131072)),
    ("query", None),
    ("block-dirty-bitmap-disable", {"node": N, "name": "a"}),
    ("write", (30 * M, 4096)),
    ("block-dirty-bitmap-enable", {"node": N, "name": "d"}),
    ("write", (31 * M + 512, 512)),
    ("query", None),
    ("block-dirty-bitmap-clear", {"node": N, "name": "b"}),
    ("block-dirty-bitmap-enable", {"node": N, "name": "a"}),
    ("write", (60 * M - 512, 512)),
    ("query", None),
    ("block-dirty-bitmap-remove", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-remove", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-clear", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a"}),
    ("write", (5 * M, 4096)),
    ("query", None),
]


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          timeout=120).stdout.decode()


def run_seq(q, fe_bin, vsock, seq):
    out = []
    for cmd, args in seq:
        if cmd == "query":
            n = [x for x in q.ret("query-named-block-nodes") if x["node-name"] == N][0]
            out.append(("query", n.get("dirty-bitmaps")))
            continue
        if cmd == "write":
            fe(fe_bin, "write", vsock, args[0], args[1], stdin=os.urandom(args[1]))
            continue
        if cmd == "zero":
            fe(fe_bin, "write-zeroes", vsock, args[0], args[1])
            continue
        if cmd == "discard":
            fe(fe_bin, "discard", vsock, args[0], args[1])
            continue
        r = q.cmd(cmd, args)
        out.append((cmd, r.get("return", r.get("error"))))
    return out


def qsd_run(work, img, fe_bin, seq):
    qs = os.path.join(work, "qsd.qmp")
    vs = os.path.join(work, "qsd.vsock")
    for p in (qs, vs):
        if os.path.exists(p):
            os.unlink(p)
    p = subprocess.Popen([QSD, "--chardev", "socket,path=%s,server=on,wait=off,id=c" % qs,
                          "--monitor", "chardev=c",
                          "--blockdev", "driver=file,filename=%s,node-name=file0,"
                          "cache.direct=on,discard=unmap" % img,
                          "--blockdev", "driver=qcow2,file=file0,node-name=%s,discard=unmap" % N,
                          "--export", "type=vhost-user-blk,id=e,node-name=%s,addr.type=unix,"
                          "addr.path=%s,writable=on" % (N, vs)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_path(qs, p)
        wait_path(vs, p)
        time.sleep(0.2)
        q = Qmp(qs)
        out = run_seq(q, fe_bin, vs, seq)
        q.cmd("quit")
        p.wait(10)
    finally:
        reap(p)
    return out


def compare(want, got, seq):
    steps = [(c, a) for c, a in seq if c not in ("write", "zero", "discard")]
    for (cmd, w), (_, g), (_, args) in zip(want, got, steps):
        if isinstance(w, dict) and "desc" in w:
            check(isinstance(g, dict) and g.get("desc") == w["desc"],
                  "%s %r: qsd %r, vqcowd %r" % (cmd, args, w, g))
        else:
            check(g == w, "%s %r:\n  qsd    %r\n  vqcowd %r" % (cmd, args, w, g))
    check(len(want) == len(got) == len(steps), "lengths %d %d" % (len(want), len(got)))


def info_bitmaps(img):
    i = json.loads(sh("qemu-img", "info", "--output=json", img))
    return i.get("format-specific", {}).get("data", {}).get("bitmaps")


def test_vs_qsd(vqcowd, fe_bin, work):
    a = os.path.join(work, "qsd.qcow2")
    b = os.path.join(work, "ours.qcow2")
    for f in (a, b):
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", f, 64 * M)
    want = qsd_run(work, a, fe_bin, SEQ)
    d = Daemon(vqcowd, work, b, "seq")
    try:
        q = Qmp(d.qsock)
        got = run_seq(q, fe_bin, d.vsock, SEQ)
        q.close()
        quit_daemon(d, 30)
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()
    compare(want, got, SEQ)
    last = got[-1][1]
    check([(x["name"], x["persistent"], x["count"]) for x in last] ==
          [("a", False, 4096), ("d", False, 131072 * 3), ("b", False, 512 * 9),
           ("p", True, 4096 * 55)], "final listing %r" % last)
    log("ok: %d replies and listings as qemu-storage-daemon's (final: %r)" %
        (len(got), [(x["name"], x["count"]) for x in last]))
    ia, ib = info_bitmaps(a), info_bitmaps(b)
    check(ia == ib == [{"flags": ["auto"], "name": "p", "granularity": 4096}],
          "qemu-img info bitmaps: qsd %r, vqcowd %r" % (ia, ib))
    r = subprocess.run(["qemu-img", "check", b], capture_output=True, timeout=60)
    check(r.returncode == 0, "qemu-img check: %s" % r.stdout.decode())
    log("ok: only the persistent bitmap reached the files; check clean")


def test_no_file_change(vqcowd, work):
    img = os.path.join(work, "still.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 16 * M)
    d = Daemon(vqcowd, work, img, "still")
    try:
        q = Qmp(d.qsock)
        q.ret("query-named-block-nodes")
        before = open(img, "rb").read()
        mtime = os.stat(img).st_mtime_ns
        for i in range(20):
            q.ret("block-dirty-bitmap-add", {"node": N, "name": "t%d" % i})
            q.ret("block-dirty-bitmap-disable", {"node": N, "name": "t%d" % i})
            q.ret("block-dirty-bitmap-clear", {"node": N, "name": "t%d" % i})
        for i in range(20):
            q.ret("block-dirty-bitmap-remove", {"node": N, "name": "t%d" % i})
        check(open(img, "rb").read() == before and os.stat(img).st_mtime_ns == mtime,
              "the image changed while adding/removing non-persistent bitmaps")
        check("reopen" not in d.log() and "holding requests" not in d.log(),
              "non-persistent bitmap commands held requests or reopened the engine:\n" +
              d.log())
        q.close()
        quit_daemon(d, 30)
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()
    check(info_bitmaps(img) is None, "bitmaps in the file: %r" % info_bitmaps(img))
    log("ok: 80 non-persistent bitmap commands left the image's bytes untouched")


def test_raw(vqcowd, fe_bin, work):
    img = os.path.join(work, "r.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", img, 16 * M)
    d = Daemon(vqcowd, work, img, "raw", extra=["--io-threads", "2", "--num-queues", "2"])
    try:
        q = Qmp(d.qsock)
        q.ret("block-dirty-bitmap-add", {"node": N, "name": "r"})
        fe(fe_bin, "write", d.vsock, M + 512, 512, stdin=os.urandom(512))
        fe(fe_bin, "write", d.vsock, 15 * M, M, stdin=os.urandom(M))
        bms = [x for x in q.ret("query-named-block-nodes") if x["node-name"] == N][0][
            "dirty-bitmaps"]
        check(bms == [{"name": "r", "recording": True, "persistent": False, "busy": False,
                       "granularity": 65536, "count": 65536 + M}], "raw listing %r" % bms)
        e = q.cmd("block-dirty-bitmap-add", {"node": N, "name": "rp", "persistent": True})
        check("error" in e, "persistent on raw: %r" % e)
        q.close()
        quit_daemon(d, 30)
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()
    log("ok: raw image: a non-persistent bitmap (64 KiB) counts the written granules")


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    vqcowd, fe_bin, work = sys.argv[1:]
    if not QSD or not shutil.which("qemu-img"):
        log("SKIP: qemu-storage-daemon or qemu-img not installed")
        return SKIP
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    test_vs_qsd(vqcowd, fe_bin, work)
    test_no_file_change(vqcowd, work)
    test_raw(vqcowd, fe_bin, work)
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
