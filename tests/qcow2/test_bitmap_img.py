#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vqcow-img bitmap against qemu-img bitmap as the oracle.

Every step runs on two identical images, one changed by vqcow-img and one by
qemu-img, with the same arguments: the same exit status and the same error
text (after the program's name); afterwards `qemu-img info` lists the same
bitmaps (name, granularity, flags) and `qemu-img check` is clean on ours.
Steps: add with the default granularity (64 KiB clusters and 512-byte
clusters: QEMU's clamp to 4 KiB), with -g 128k, added disabled (--add
--disable in one command), enable, disable, clear, remove, the last one
removed (no extension left), an image with a backing file (the name moved
in the first cluster), one with an external data file, and the refusals: an existing name, an unknown
bitmap, an empty name, a bad granularity, -g without --add, no operation,
a missing bitmap name. Then bits: a bitmap with bits set by qemu-io is
cleared by vqcow-img and qemu-nbd -B then reports nothing dirty (nbdinfo;
skipped visibly without it).
"""

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, log  # noqa: E402

A = None
W = None
MiB = 1 << 20


def msg(r):
    t = r.errtext.strip().splitlines()
    return [x.split(": ", 1)[1] if ": " in x else x for x in t]


def bitmaps(p):
    r = qlib.run(["qemu-img", "info", "--output=json", p], check_rc=0)
    i = json.loads(r.text)
    return sorted(i.get("format-specific", {}).get("data", {}).get("bitmaps") or [],
                  key=lambda b: b["name"])


def pair(name, opts=""):
    paths = []
    for who in ("ours", "qemu"):
        p = W(name + "." + who + ".qcow2")
        if os.path.exists(p):
            os.unlink(p)
        qlib.qemu_img(*(["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) +
                        [p, "16M"]))
        paths.append(p)
    return paths


def step(pq, args, what):
    a, b = pq
    ra = qlib.vqcow_img(A.img, "bitmap", *[a if x == "@" else x for x in args])
    rb = qlib.run(["qemu-img", "bitmap"] + [b if x == "@" else x for x in args], timeout=120)
    check(ra.rc == rb.rc, "%s: rc %s, qemu-img %s\n%s\n%s" % (what, ra.rc, rb.rc,
                                                            ra.describe(), rb.describe()))
    if rb.rc:
        ma, mb = msg(ra), msg(rb)
        if "Can't store persistent bitmaps to" not in " ".join(mb):
            check(ma == mb, "%s: message %r, qemu-img %r" % (what, ma, mb))
    ba, bb = bitmaps(a), bitmaps(b)
    check(ba == bb, "%s: bitmaps %r, qemu-img %r" % (what, ba, bb))
    r = qlib.run(["qemu-img", "check", a])
    check(r.rc == 0, "%s: qemu-img check\n%s" % (what, r.describe()))
    log("ok: %s (rc %d%s)" % (what, rb.rc, ": " + msg(rb)[0] if rb.rc else ""))


def test_steps():
    pq = pair("steps")
    for args, what in [
        (["--add", "@", "a"], "add, default granularity"),
        (["--add", "-g", "128k", "@", "b"], "add -g 128k"),
        (["--add", "--disable", "@", "c"], "add --disable"),
        (["--add", "@", "a"], "add an existing name"),
        (["--remove", "@", "zz"], "remove an unknown bitmap"),
        (["--clear", "@", "zz"], "clear an unknown bitmap"),
        (["--add", "@", ""], "add an empty name"),
        (["--add", "-g", "1000", "@", "d"], "add -g 1000"),
        (["--add", "-g", "abc", "@", "d"], "add -g abc"),
        (["--remove", "-g", "64k", "@", "a"], "-g without --add"),
        (["@", "a"], "no operation"),
        (["--add", "@"], "no bitmap name"),
        (["--disable", "@", "a"], "disable"),
        (["--enable", "@", "c"], "enable"),
        (["--clear", "@", "b"], "clear"),
        (["--remove", "@", "b"], "remove"),
        (["--remove", "@", "a"], "remove another"),
        (["--remove", "@", "c"], "remove the last"),
    ]:
        step(pq, args, what)
    check(bitmaps(pq[0]) == [], "bitmaps left")
    hdr = qlib.run(["qemu-img", "info", pq[0]], check_rc=0).text
    check("bitmaps:" not in hdr, "a bitmaps extension is left:\n" + hdr)
    pq = pair("small", "cluster_size=512")
    step(pq, ["--add", "@", "s"], "add on 512-byte clusters (granularity 4 KiB)")
    base = W("base.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    pq = pair("overlay", "backing_file=%s,backing_fmt=qcow2" % base)
    step(pq, ["--add", "@", "o"], "add on an overlay")
    step(pq, ["--remove", "@", "o"], "remove on an overlay")
    r = qlib.run(["qemu-img", "info", "--output=json", pq[0]], check_rc=0)
    check(json.loads(r.text).get("backing-filename") == base, "backing name lost:\n" + r.text)
    pq = []
    for who in ("ours", "qemu"):
        p, d = W("df." + who + ".qcow2"), W("df." + who + ".raw")
        for f in (p, d):
            if os.path.exists(f):
                os.unlink(f)
        qlib.qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=" + d, p, "16M")
        pq.append(p)
    step(pq, ["--add", "@", "d"], "add with an external data file")
    step(pq, ["--remove", "@", "d"], "remove with an external data file")


def nbd_dirty(p, name="x"):
    return qlib.nbd_dirty(W, p, name)


def test_bits():
    p = W("bits.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", p, "16M")
    qlib.qemu_img("bitmap", "--add", p, "x")
    qlib.qemu_io(p, "write 1M 64k", fmt="qcow2")
    have = shutil.which("nbdinfo")
    if have:
        d = nbd_dirty(p)
        check(d == [[str(MiB), "65536"]], "dirty before --clear: %r" % d)
    r = qlib.vqcow_img(A.img, "bitmap", "--clear", p, "x")
    check(r.rc == 0, r.describe())
    if not have:
        log("SKIP part: nbdinfo not installed")
        return
    d = nbd_dirty(p)
    check(not d, "dirty after --clear: %r" % d)
    log("ok: qemu-nbd -B: [1 MiB, +64 KiB) dirty, nothing after --clear")


def test_resize():
    """vqcow-img resize of an image with bitmaps, against qemu-img resize."""
    pq = pair("resize")
    for p in pq:
        qlib.qemu_img("bitmap", "--add", p, "x")
        qlib.qemu_img("bitmap", "--add", "--disable", "-g", "128k", p, "y")
        qlib.qemu_io(p, "write 1M 4k", fmt="qcow2")
        qlib.qemu_io(p, "write 16776704 512", fmt="qcow2")
        qlib.qemu_img("bitmap", "--merge", "x", p, "y")
    ra = qlib.vqcow_img(A.img, "resize", pq[0], "40M")
    rb = qlib.run(["qemu-img", "resize", pq[1], "40M"], timeout=120)
    check(ra.rc == rb.rc == 0 and ra.text == rb.text, "resize: %s\n%s" % (ra.describe(),
                                                                         rb.describe()))
    for p in pq:
        qlib.qemu_io(p, "write 30M 4k", fmt="qcow2")
    ba, bb = bitmaps(pq[0]), bitmaps(pq[1])
    check(ba == bb and len(ba) == 2, "bitmaps after resize %r, qemu-img %r" % (ba, bb))
    r = qlib.run(["qemu-img", "check", pq[0]])
    check(r.rc == 0, "qemu-img check after resize\n%s" % r.describe())
    log("ok: vqcow-img resize 16M -> 40M with an enabled and a disabled bitmap: the same "
        "output, bitmaps and a clean check as qemu-img resize")
    if not shutil.which("nbdinfo"):
        log("SKIP part: nbdinfo not installed")
        return
    for name in ("x", "y"):
        da, db = nbd_dirty(pq[0], name), nbd_dirty(pq[1], name)
        check(da == db and da, "%s dirty: ours %r, qemu-img's %r" % (name, da, db))
    log("ok: qemu-nbd -B reads the same dirty ranges of both bitmaps (%r)" % da)
    # an in-use (inconsistent) bitmap refuses the resize, and nothing changes
    p = W("inuse.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", p, "16M")
    qlib.qemu_img("bitmap", "--add", p, "x")
    with open(p, "r+b") as f:
        hdr = f.read(65536)
        off = int.from_bytes(hdr[hdr.index(b"\x23\x85\x28\x75") + 24:][:8], "big")
        f.seek(off + 12)
        f.write((3).to_bytes(4, "big"))
    before = open(p, "rb").read()
    r = qlib.vqcow_img(A.img, "resize", p, "32M")
    check(r.rc != 0 and "Bitmap 'x' is inconsistent and cannot be used" in r.errtext,
          "resize with an in-use bitmap: %s" % r.describe())
    check(open(p, "rb").read() == before, "a refused resize changed the image")
    log("ok: an inconsistent bitmap refuses vqcow-img resize (%s)" % msg(r)[0])


def main():
    return qlib.vqcow_img_test(globals(), "bitmap", test_steps, test_bits, test_resize)


if __name__ == "__main__":
    qlib.main_wrapper(main)
