#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vqcow-img rebase -u against qemu-img rebase -u as the oracle.

Every case runs on two identical overlays, one rebased by vqcow-img and one
by qemu-img, with the same arguments:
  - the same exit status and stdout, the same error text (after the
    program's name) where both refuse;
  - the two files are byte for byte identical afterwards (the header, its
    extensions and the backing file name are written as qemu-img writes
    them), qemu-img info shows the new backing file and format, qemu-img
    check is clean, and qemu-img compare of the overlay with its new
    backing reads the data through the new chain;
cases: another backing file (qcow2 and raw format), removing it (-b ""
and no -b), a name with a relative path, a long name, a v2 image, an image
with a bitmaps extension (kept: qemu-img info lists the same bitmaps; qemu-img
stores them again at close, so only there the bytes differ), a
backing file that does not exist (unsafe mode does not look).
Refusals: no backing format (qemu-img's message), a raw image (qemu-img's
message); deliberate difference, checked as such: the safe mode (no -u) is
refused by vqcow-img.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, log, tool_error as msg  # noqa: E402

A = None
W = None
MiB = 1 << 20


def vimg(*args):
    return qlib.vqcow_img(A.img, "rebase", *args)


def qimg(*args):
    return qlib.run(["qemu-img", "rebase"] + [str(a) for a in args], timeout=120)


def overlay(name, backing, opts="", extra=()):
    paths = []
    for who in ("ours", "qemu"):
        p = W(name + "." + who + ".qcow2")
        if os.path.exists(p):
            os.unlink(p)
        o = "backing_file=%s,backing_fmt=qcow2" % backing if backing else ""
        if opts:
            o = o + "," + opts if o else opts
        args = ["create", "-q", "-f", "qcow2"] + (["-o", o] if o else []) + [p, "16M"]
        qlib.qemu_img(*args)
        for cmd in extra:
            qlib.qemu_img(*[p if x == "@" else x for x in cmd])
        qlib.qemu_io(p, "write -P 0x3c 1M 64k", fmt="qcow2")
        paths.append(p)
    return paths


def same(a, b, what, args, exact=True):
    ra = vimg(*(args + [a]))
    rb = qimg(*(args + [b]))
    qlib.assert_sane_exit(ra, "vqcow-img rebase")
    check(ra.rc == rb.rc, "%s: exit %d, qemu-img %d\n%s\n%s" % (what, ra.rc, rb.rc,
                                                             ra.describe(), rb.describe()))
    check(ra.out == rb.out, "%s: stdout %r, qemu-img %r" % (what, ra.out, rb.out))
    if rb.rc:
        check(msg(ra) == msg(rb), "%s: %r, qemu-img %r" % (what, msg(ra), msg(rb)))
    da, db = open(a, "rb").read(), open(b, "rb").read()
    if not exact:
        # qemu-img stores the bitmaps again at close (new clusters): compare what
        # qemu-img info sees instead of the bytes
        ia, ib = (json.loads(qlib.run(["qemu-img", "info", "-U", "--output=json", p]).text)
                  for p in (a, b))
        for k in ("backing-filename", "backing-filename-format", "format-specific"):
            check(ia.get(k) == ib.get(k), "%s: %s: %r, qemu-img's %r" % (what, k, ia.get(k),
                                                                      ib.get(k)))
        return ra
    if da != db:
        first = next((i for i in range(min(len(da), len(db))) if da[i] != db[i]),
                     min(len(da), len(db)))
        check(False, "%s: the files differ (sizes %d, %d; first difference at %d)" % (
            what, len(da), len(db), first))
    return ra


def test_cases():
    base = W("base.qcow2")
    new = W("new.qcow2")
    newraw = W("new.raw")
    for p in (base, new, newraw):
        if os.path.exists(p):
            os.unlink(p)
    qlib.qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qlib.qemu_img("create", "-q", "-f", "qcow2", new, "16M")
    qlib.qemu_img("create", "-q", "-f", "raw", newraw, "16M")
    qlib.qemu_io(new, "write -P 0x77 0 2M", fmt="qcow2")
    qlib.qemu_io(newraw, "write -P 0x88 0 2M", fmt="raw")
    cases = [
        ("qcow2", "", (), ["-u", "-b", new, "-F", "qcow2"], new, "qcow2"),
        ("raw", "", (), ["-u", "-b", newraw, "-F", "raw"], newraw, "raw"),
        ("relative", "", (), ["-u", "-b", os.path.basename(new), "-F", "qcow2"],
         os.path.basename(new), "qcow2"),
        ("remove", "", (), ["-u", "-b", ""], None, None),
        ("remove-no-b", "", (), ["-u"], None, None),
        ("long", "", (), ["-u", "-b", "/nonexistent/" + "d" * 900 + "/x.qcow2", "-F", "qcow2"],
         "/nonexistent/" + "d" * 900 + "/x.qcow2", "qcow2"),
        ("missing", "", (), ["-u", "-b", "/nonexistent.qcow2", "-F", "qcow2"],
         "/nonexistent.qcow2", "qcow2"),
        ("v2", "compat=0.10", (), ["-u", "-b", new, "-F", "qcow2"], new, "qcow2"),
        ("bitmap", "", (["bitmap", "--add", "@", "b0"],), ["-u", "-b", new, "-F", "qcow2"], new,
         "qcow2"),
        ("no-backing-before", None, (), ["-u", "-b", new, "-F", "qcow2"], new, "qcow2"),
    ]
    for name, opts, extra, args, want_b, want_f in cases:
        a, b = overlay(name, None if opts is None else base, opts or "", extra)
        same(a, b, name, args, exact=not extra)
        i = json.loads(qlib.run(["qemu-img", "info", "-U", "--output=json", a]).text)
        check(i.get("backing-filename") == want_b and i.get("backing-filename-format") ==
              want_f, "%s: info %r" % (name, i))
        # (a backing file that does not exist: qemu-img check cannot open the chain)
        alone = 'json:{"driver": "qcow2", "backing": null, "file": {"driver": "file", ' \
            '"filename": "%s"}}' % a
        c = qlib.run(["qemu-img", "check", "-U", alone])
        check(c.rc == 0, "%s: qemu-img check rc %d\n%s" % (name, c.rc, c.text))
        if want_b in (new, newraw):
            # the data through the new chain: the overlay's cluster, else the new backing
            c = qlib.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x3c 1M 64k",
                          "-c", "read -P %s 0 1M" % ("0x77" if want_b == new else "0x88"), a])
            check(c.rc == 0 and "Pattern verification failed" not in c.text,
                  "%s: reading through the new chain:\n%s" % (name, c.text))
        log("ok: rebase -u %s: %s qemu-img's, backing %r (%s), check clean" %
            (name, "as" if extra else "byte-identical to", want_b if not want_b or len(want_b) < 60 else want_b[:40] + "...", want_f))


def test_refusals():
    a, b = overlay("refuse", W("base.qcow2"))
    r = same(a, b, "no backing format", ["-u", "-b", W("new.qcow2")])
    check("backing format must be specified" in r.errtext, r.errtext)
    log("ok: -b without -F refused as qemu-img: %s" % msg(r))
    ra, rb = W("plain.ours.raw"), W("plain.qemu.raw")
    for p in (ra, rb):
        qlib.qemu_img("create", "-q", "-f", "raw", p, "1M")
    r = same(ra, rb, "raw image", ["-u", "-f", "raw", "-b", W("new.qcow2"), "-F", "qcow2"])
    log("ok: a raw image refused as qemu-img: %s" % msg(r))
    before = open(a, "rb").read()
    r = vimg("-b", W("new.qcow2"), "-F", "qcow2", a)
    check(r.rc == 1 and "only unsafe rebase" in r.errtext and open(a, "rb").read() == before,
          "safe mode: %s" % r.describe())
    log("ok: safe rebase (no -u) refused, the image untouched (deliberate difference)")


def main():
    return qlib.vqcow_img_test(globals(), "rebase", test_cases, test_refusals)


if __name__ == "__main__":
    qlib.main_wrapper(main)
