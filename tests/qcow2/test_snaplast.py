#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Internal snapshots made by `qemu-img snapshot -c` as the LAST step (issue 9, item 3).

QEMU pads each snapshot table entry to 8 bytes only to place the next one: it
neither writes nor allocates padding after the last entry, and `qemu-img
snapshot -c` puts the new table at the end of the file. So the file usually
ends a few bytes short of a multiple of 8 — an image vqcowd and vqcow-img
refused ("runs past the snapshot table" / "runs past the end of the file").

For each image (one snapshot, many snapshots with names of every length mod 8,
compat=0.10, extended L2 with 4 KiB clusters), all built so that the file ends
inside the snapshot table (asserted):
  1. vqcow-img info / check / map (JSON) equal qemu-img's; `check -r leaks` and
     `check -r all` on copies leave qemu-img check clean and the table intact
  2. vqcowd serves it: every byte reads as qemu-img convert reads it; seeded
     writes (also into clusters shared with the snapshots), flush, SIGTERM exit 0
  3. qemu-img check clean, qemu-img snapshot -l lists the same snapshots,
     `qemu-img convert -l` of each snapshot yields its old content, the
     active layer equals the mirrored reference
  4. vqcowd reopens the result and reads it back equal
Labelled qcow2 (not slow): it runs in the ASan build too.
"""

import json
import os
import random
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
W = None
SIZE = 8 << 20


def vimg(*args, timeout=120):
    return qlib.vqcow_img(A.img, *args, timeout=timeout)


def vimg_json(*args):
    return qlib.vqcow_img_json(A.img, *args)


def table_end(img):
    """(snapshots_offset, end of the last entry without padding, nb_snapshots)."""
    with open(img, "rb") as f:
        hdr = f.read(72)
        nb, off = struct.unpack_from(">IQ", hdr, 60)
        pos = off
        end = off
        for _ in range(nb):
            f.seek(pos)
            e = f.read(40)
            check(len(e) == 40, "%s: snapshot entry at %d truncated" % (img, pos))
            id_len, name_len = struct.unpack_from(">HH", e, 12)
            extra = struct.unpack_from(">I", e, 36)[0]
            end = pos + 40 + extra + id_len + name_len
            pos = (end + 7) & ~7
    return off, end, nb


def make(name, opts, steps):
    """steps: a list of ('w', qemu-io command) / ('s', snapshot name); the last is a snapshot."""
    p = W(name)
    argv = ["create", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    qlib.qemu_img(*(argv + [p, str(SIZE)]))
    for kind, arg in steps:
        if kind == "w":
            qlib.qemu_io(p, arg)
        else:
            qlib.qemu_img("snapshot", "-c", arg, p)
    off, end, nb = table_end(p)
    fsize = os.path.getsize(p)
    check(nb == sum(1 for k, _ in steps if k == "s"), "%s: nb_snapshots %d" % (name, nb))
    check(end == fsize, "%s: the file (%d bytes) does not end right after the snapshot "
          "table (0x%x..%d): the test would not cover the case" % (name, fsize, off, end))
    return p


def corpus():
    w = [("w", "write -P 0x11 0 8k"), ("w", "write -P 0x22 70k 100k"),
         ("w", "write -z 1M 128k"), ("w", "write -P 0x33 3M 1k"),
         ("w", "write -P 0x44 8188k 4k")]
    out = [("one", make("one.qcow2", "", w + [("s", "snap1")]))]
    # many snapshots; names of lengths 1..8 so every entry length mod 8 occurs
    steps = list(w)
    for i in range(8):
        steps.append(("w", "write -P 0x%x %dk 64k" % (0x50 + i, 64 * i + 512)))
        steps.append(("s", "s" + "x" * i))
    out.append(("many", make("many.qcow2", "", steps)))
    out.append(("v2", make("v2.qcow2", "compat=0.10", w + [("s", "a"), ("w", "write -P 0x66 0 4k"),
                                                             ("s", "second")])))
    out.append(("extl2-4k", make("extl2.qcow2", "extended_l2=on,cluster_size=16384",
                                 w + [("s", "e1"), ("w", "write -P 0x77 2k 2k"), ("s", "e22")])))
    out.append(("cs4k", make("cs4k.qcow2", "cluster_size=4096", w + [("s", "abc")])))
    return out


def tools(name, img, snaps):
    # info
    q = qlib.qemu_info(img)
    v = vimg_json("info", "--output=json", img)
    check(q.get("snapshots") == v.get("snapshots"),
          "%s: info snapshots: qemu-img %r, vqcow-img %r" % (name, q.get("snapshots"),
                                                             v.get("snapshots")))
    for k in ("virtual-size", "cluster-size", "format-specific"):
        check(q.get(k) == v.get(k), "%s: info %s: qemu-img %r, vqcow-img %r"
              % (name, k, q.get(k), v.get(k)))
    r = vimg("info", img)
    check(r.rc == 0, "%s: human info failed\n%s" % (name, r.describe()))
    # check
    qrc, qj, qr = qlib.qemu_check(img)
    r = vimg("check", "--output=json", img)
    check(r.rc == qrc == 0, "%s: check: vqcow-img rc %s, qemu-img rc %s\n%s"
          % (name, r.rc, qrc, r.describe()))
    vj = json.loads(r.text)
    for k in ("corruptions", "leaks", "check-errors", "total-clusters", "allocated-clusters",
              "fragmented-clusters", "compressed-clusters", "image-end-offset"):
        check(qj.get(k, 0) == vj.get(k, 0), "%s: check %s: qemu-img %r, vqcow-img %r"
              % (name, k, qj.get(k), vj.get(k)))
    # map
    qm = json.loads(qlib.qemu_img("map", "--output=json", img).text)
    vm = vimg_json("map", "--output=json", img)
    check(qm == vm, "%s: map differs:\n qemu-img %r\n vqcow-img %r" % (name, qm, vm))
    # repairs on copies: the table survives, qemu-img check stays clean
    for mode in ("leaks", "all"):
        c = W("repair.qcow2")
        shutil.copyfile(img, c)
        r = vimg("check", "-r", mode, c)
        check(r.rc == 0, "%s: vqcow-img check -r %s: rc %s\n%s" % (name, mode, r.rc, r.describe()))
        qlib.assert_qemu_check_clean(c, "%s after vqcow-img check -r %s" % (name, mode))
        check(qlib.snapshot_state(W, c) == snaps, "%s: snapshots changed by check -r %s" % (name, mode))
        os.unlink(c)


def serve(img, what):
    sock = W("vqcowd.sock")
    d = qlib.Daemon(A.vqcowd, img, sock)
    if not d.start():
        fail("%s: vqcowd refused to serve the image (exit %s)\n%s" % (what, d.rc, d.log()))
    return d, qlib.Frontend(A.fe, sock)


def run_image(name, img, rng):
    ref = W(name + ".ref.raw")
    qlib.qemu_to_raw(img, ref)
    snaps = qlib.snapshot_state(W, img)
    check(len(snaps[0]) >= 1, "%s: qemu-img lists no snapshot" % name)
    tools(name, img, snaps)

    d, fe = serve(img, name)
    with qlib.killed_on_error(d):
        fe.assert_reads_as(ref, SIZE, W(name + ".read.raw"),
                           "%s: read through vqcowd vs qemu-img convert" % name)
        # into clusters shared with the snapshots, next to them, fresh ones, the last sector
        ops = [(0, 4096), (72 << 10, 512), (3 << 20, 65536), (SIZE - 512, 512),
               (600 << 10, 8192), (5 << 20, 128 << 10)] + qlib.random_writes(rng, SIZE, 10)
        for i, (off, ln) in enumerate(ops):
            data = qlib.pattern(rng, ln)
            fe.write_ok(off, data)
            qlib.apply_to_raw(ref, off, data)
            if i % 4 == 3:
                fe.flush_ok()
        fe.flush_ok()
        fe.assert_reads_as(ref, SIZE, W(name + ".read2.raw"), "%s: read back after writes" % name)
    d.assert_clean_stop()

    qlib.assert_qemu_check_clean(img, "%s after vqcowd writes" % name)
    after = qlib.snapshot_state(W, img)
    check(after == snaps, "%s: snapshots changed: before %r, after %r" % (name, snaps, after))
    r = qlib.qemu_img("snapshot", "-l", img)
    for _sid, sname, _ in snaps[0]:
        check(sname in r.text, "%s: qemu-img snapshot -l lacks %s\n%s" % (name, sname, r.text))
    r = qlib.qemu_compare(ref, img, fmt_a="raw", fmt_b="qcow2")
    check(r.rc == 0, "%s: active layer differs from the reference\n%s" % (name, r.describe()))

    d, fe = serve(img, name + " (reopened)")
    with qlib.killed_on_error(d):
        fe.assert_reads_as(ref, SIZE, W(name + ".read3.raw"), "%s: read after reopening" % name)
    d.assert_clean_stop()
    qlib.assert_qemu_check_clean(img, "%s after reopening" % name)
    tools(name + " (after vqcowd)", img, snaps)
    os.unlink(ref)


def main():
    global A, W
    A = qlib.parse_args()
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binaries(A, "vqcowd", "img", "fe")
    wd = qlib.Workdir(os.path.join(A.workdir, "snaplast"), A.keep)
    W = wd
    rng = random.Random(A.seed)
    qlib.run_corpus(wd, corpus, lambda name, img: run_image(name, img, rng))


if __name__ == "__main__":
    qlib.main_wrapper(main)
