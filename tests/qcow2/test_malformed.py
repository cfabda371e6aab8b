#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Malformed qcow2 images: vqcowd, vqcow-img info and vqcow-img check must
refuse with a clear error naming the problem, or (for damage below the
header) fail the affected request with an I/O error — never crash, never
hang, never trip a sanitizer. Also runs in the ASan build.

Expectations per case:
  refuse      vqcowd exits non-zero at open with a message matching the case's
              pattern; vqcow-img info fails likewise; vqcow-img check exits 1 or 2.
  ioerr       vqcowd may refuse (message) or serve; if it serves, reading the
              damaged guest range fails, and so does writing it.
  write-fails vqcowd may refuse or serve; writing the damaged range fails
              (overlap with metadata / corrupt image); reads may succeed.
  survive     anything but a crash or a hang; afterwards qemu-img info still
              opens the image if it did before (metadata not trashed).
"""

import os
import random
import re
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402
import qcow2edit as Q  # noqa: E402

A = None
W = None
CS = 65536
SIZE = 4 << 20
TIMEOUT = 20


def make_bases():
    b = {}
    p = W("base.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", p, SIZE)
    qlib.qemu_io(p, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    b["plain"] = p
    p = W("base-snap.qcow2")
    shutil.copyfile(b["plain"], p)
    qlib.qemu_img("snapshot", "-c", "snap1", p)
    b["snap"] = p
    p = W("base-ext.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", p, SIZE)
    qlib.qemu_io(p, "write -P 0x11 0 64k")
    b["ext"] = p
    src = W("src-comp.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", src, SIZE)
    qlib.qemu_io(src, "write -P 0x33 0 128k")
    p = W("base-comp.qcow2")
    qlib.qemu_img("convert", "-c", "-O", "qcow2", src, p)
    b["comp"] = p
    p = W("base-bitmaps.qcow2")
    shutil.copyfile(b["plain"], p)
    qlib.qemu_img("bitmap", "--add", p, "b0")
    qlib.qemu_img("bitmap", "--add", p, "b1")
    b["bitmaps"] = p
    bk = W("backing.raw")
    with open(bk, "wb") as f:
        f.truncate(SIZE)
    p = W("base-bk.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-b", "backing.raw", "-F", "raw", p)
    b["bk"] = p
    return b


def hdr(field, value):
    return lambda im: im.set_field(field, value)


def raw_at(off, data):
    return lambda im: im.pwrite(off, data)


def l1e(i, fn):
    return lambda im: im.set_l1_entry(i, fn(im, im.l1_entry(i)))


def l2e(goff, fn):
    return lambda im: im.set_l2_entry(goff, fn(im, im.l2_entry(goff)))


def rte(i, fn):
    def m(im):
        a = im.h["refcount_table_offset"] + 8 * i
        im.put_u64(a, fn(im, im.u64(a)))
    return m


def snap_field(off, fmt, value):
    def m(im):
        e = im.snapshots()[0][0]
        im.pwrite(e + off, struct.pack(fmt, value))
    return m


def truncate_to(n):
    def m(im):
        with open(im.path, "r+b") as f:
            f.truncate(n)
    return m


def feature_bits(bits, hl=None):
    def m(im):
        im.set_field("incompatible_features", im.h["incompatible_features"] | bits)
        if hl is not None:
            im.set_field("header_length", hl)
    return m


def eof_cluster(im):
    return (im.file_size() + 16 * CS) // CS * CS


def ext_overrun(im):
    exts = im.extensions()
    off = exts[0][1] - 8 if exts else im.h["header_length"]
    im.pwrite(off, struct.pack(">II", Q.EXT_FEATURE_TABLE, 0x7FFFFFF0))


def backing_name_len(n):
    def m(im):
        im.set_field("backing_file_size", n)
    return m


def bitmap_dir_entry0(fn):
    """Apply fn(im, entry_offset) to the first bitmap directory entry."""
    def m(im):
        ext = [e for e in im.extensions() if e[0] == 0x23852875]
        check(ext, "%s: no bitmaps extension" % im.path)
        fn(im, im.u64(ext[0][1] + 16))
    return m


def compressed_entry(im, host, nsect):
    x = 62 - (im.cluster_bits - 8)
    return Q.OFLAG_COMPRESSED | (nsect << x) | host


# (name, base, mutator, expectation, message pattern, guest offset of the damage)
def cases():
    L1 = "l1|L1"
    RC = "refcount"
    return [
        ("magic", "plain", raw_at(0, b"QFI\x00"), "refuse", "magic|qcow2|format", 0),
        ("version-1", "plain", hdr("version", 1), "refuse", "version", 0),
        ("version-4", "plain", hdr("version", 4), "refuse", "version", 0),
        ("version-huge", "plain", hdr("version", 0xFFFFFFFF), "refuse", "version", 0),
        ("cluster-bits-8", "plain", hdr("cluster_bits", 8), "refuse", "cluster", 0),
        ("cluster-bits-22", "plain", hdr("cluster_bits", 22), "refuse", "cluster", 0),
        ("cluster-bits-63", "plain", hdr("cluster_bits", 63), "refuse", "cluster", 0),
        ("cluster-bits-huge", "plain", hdr("cluster_bits", 0xFFFFFFFF), "refuse", "cluster", 0),
        ("size-2^63", "plain", hdr("size", 1 << 63), "refuse", "size|" + L1, 0),
        ("size-max", "plain", hdr("size", 2**64 - 512), "refuse", "size|" + L1, 0),
        ("size-beyond-l1", "plain", hdr("size", 1 << 50), "refuse", "size|" + L1, 0),
        ("crypt-aes", "plain", hdr("crypt_method", 1), "refuse", "crypt|encrypt", 0),
        ("crypt-99", "plain", hdr("crypt_method", 99), "refuse", "crypt|encrypt", 0),
        ("l1-size-huge", "plain", hdr("l1_size", 0x10000000), "refuse", L1, 0),
        ("l1-size-max", "plain", hdr("l1_size", 0xFFFFFFFF), "refuse", L1, 0),
        ("l1-size-past-eof", "plain", hdr("l1_size", 0x100000), "refuse", L1, 0),
        ("l1-size-zero", "plain", hdr("l1_size", 0), "refuse", L1 + "|size", 0),
        ("l1-offset-unaligned", "plain", lambda im: im.set_field(
            "l1_table_offset", im.h["l1_table_offset"] + 8), "refuse", L1, 0),
        ("l1-offset-past-eof", "plain", lambda im: im.set_field(
            "l1_table_offset", eof_cluster(im)), "refuse", L1, 0),
        ("l1-offset-huge", "plain", hdr("l1_table_offset", 0xFFFFFFFFFFFF0000), "refuse", L1, 0),
        ("l1-offset-zero", "plain", hdr("l1_table_offset", 0), "refuse", L1 + "|overlap|header", 0),
        ("l1-on-refcount-table", "plain", lambda im: im.set_field(
            "l1_table_offset", im.h["refcount_table_offset"]), "survive", "", 0),
        ("reftable-unaligned", "plain", lambda im: im.set_field(
            "refcount_table_offset", im.h["refcount_table_offset"] + 8), "refuse", RC, 0),
        ("reftable-past-eof", "plain", lambda im: im.set_field(
            "refcount_table_offset", eof_cluster(im)), "refuse", RC, 0),
        ("reftable-huge-offset", "plain", hdr("refcount_table_offset", 0xFFFFFFFFFFFF0000),
         "refuse", RC, 0),
        ("reftable-zero-offset", "plain", hdr("refcount_table_offset", 0), "survive", "", SIZE - CS),
        ("reftable-clusters-zero", "plain", hdr("refcount_table_clusters", 0), "survive", "",
         SIZE - CS),
        ("reftable-clusters-huge", "plain", hdr("refcount_table_clusters", 0x1000000), "refuse", RC, 0),
        ("reftable-clusters-max", "plain", hdr("refcount_table_clusters", 0xFFFFFFFF), "refuse", RC, 0),
        ("refcount-order-7", "plain", hdr("refcount_order", 7), "refuse", RC, 0),
        ("refcount-order-huge", "plain", hdr("refcount_order", 0x80000000), "refuse", RC, 0),
        ("nb-snapshots-huge", "plain", hdr("nb_snapshots", 0x7FFFFFFF), "refuse", "snapshot", 0),
        ("snapshots-unaligned", "snap", lambda im: im.set_field(
            "snapshots_offset", im.h["snapshots_offset"] + 8), "refuse", "snapshot", 0),
        ("snapshots-past-eof", "snap", lambda im: im.set_field(
            "snapshots_offset", eof_cluster(im)), "refuse", "snapshot", 0),
        # inactive snapshot L1 tables are not needed to serve the active image:
        # refusing is fine, serving too (vqcow-img check must flag them)
        ("snapshot-l1-size-huge", "snap", snap_field(8, ">I", 0xFFFFFFFF), "survive", "", 0),
        ("snapshot-l1-unaligned", "snap", lambda im: snap_field(
            0, ">Q", im.snapshots()[0][1] + 8)(im), "survive", "", 0),
        ("snapshot-l1-past-eof", "snap", lambda im: snap_field(
            0, ">Q", eof_cluster(im))(im), "survive", "", 0),
        ("snapshot-id-len-huge", "snap", snap_field(12, ">H", 0xFFFF), "refuse", "snapshot", 0),
        ("snapshot-extra-huge", "snap", snap_field(36, ">I", 0xFFFFFFF0), "refuse", "snapshot", 0),
        ("incompat-bit-5", "plain", feature_bits(1 << 5), "refuse", "feature|incompat", 0),
        ("incompat-bit-63", "plain", feature_bits(1 << 63), "refuse", "feature|incompat", 0),
        ("data-file-bit-no-name", "plain", feature_bits(Q.INCOMPAT_DATA_FILE),
         "refuse", "data.?file|external|feature", 0),
        ("compression-bit-short-header", "plain", feature_bits(Q.INCOMPAT_COMPRESSION, 104),
         "refuse", "compression|header", 0),
        ("compression-type-7", "plain", lambda im: (
            im.set_field("header_length", 112), im.set_field("compression_type", 7),
            feature_bits(Q.INCOMPAT_COMPRESSION)(im)), "refuse", "compression", 0),
        ("extl2-small-clusters", "plain", lambda im: (
            im.set_field("cluster_bits", 12), feature_bits(Q.INCOMPAT_EXTL2)(im)),
         "refuse", "cluster|extended|l2|L2|subcluster", 0),
        ("header-length-100", "plain", hdr("header_length", 100), "refuse", "header", 0),
        ("header-length-105", "plain", hdr("header_length", 105), "refuse", "header", 0),
        ("header-length-huge", "plain", hdr("header_length", 0x20000), "refuse", "header", 0),
        ("extension-overrun", "plain", ext_overrun, "refuse", "extension|header", 0),
        ("backing-name-1024", "bk", backing_name_len(1024), "refuse", "backing", 0),
        ("backing-name-huge", "bk", backing_name_len(0xFFFFFFFF), "refuse", "backing", 0),
        ("backing-offset-past-cluster", "bk", hdr("backing_file_offset", 0x7FFFFFFFFFF0),
         "refuse", "backing", 0),
        ("backing-missing", "bk", raw_at(0, b"QFI\xfb"), None, None, None),  # placeholder, replaced
        ("file-truncated-header", "plain", truncate_to(50), "refuse",
         "header|truncat|short|size|magic|qcow2|end of file|EOF", 0),
        ("file-empty", "plain", truncate_to(0), "refuse",
         "header|truncat|short|size|magic|qcow2|empty|end of file|EOF", 0),
        ("file-truncated-l1", "plain", truncate_to(3 * CS), "refuse", L1, 0),
        ("file-truncated-l2", "plain", truncate_to(4 * CS), "ioerr", "", 0),
        ("l1-entry-unaligned", "plain", l1e(0, lambda im, e: e | 0x100), "ioerr", "", 0),
        ("l1-entry-past-eof", "plain", l1e(0, lambda im, e: (e & ~Q.OFFSET_MASK) | eof_cluster(im)),
         "ioerr", "", 0),
        ("l1-entry-huge", "plain", l1e(0, lambda im, e: Q.OFLAG_COPIED | 0x00FFFFFFFFFF0000),
         "ioerr", "", 0),
        ("l1-entry-is-l1", "plain", l1e(0, lambda im, e: Q.OFLAG_COPIED | im.h["l1_table_offset"]),
         "write-fails", "", 0),
        ("l2-entry-past-eof", "plain", l2e(0, lambda im, e: (e & ~Q.OFFSET_MASK) | eof_cluster(im)),
         "ioerr", "", 0),
        ("l2-entry-huge", "plain", l2e(0, lambda im, e: Q.OFLAG_COPIED | 0x00FFFFFFFFFF0000),
         "ioerr", "", 0),
        ("l2-entry-unaligned", "plain", l2e(0, lambda im, e: e | 0x200 | 0x1E), "ioerr", "", 0),
        ("l2-entry-reserved-high", "plain", l2e(0, lambda im, e: e | (1 << 58)), "ioerr", "", 0),
        ("l2-entry-is-l1", "plain", l2e(0, lambda im, e: Q.OFLAG_COPIED | im.h["l1_table_offset"]),
         "write-fails", "", 0),
        ("l2-entry-is-refblock", "plain", l2e(0, lambda im, e: Q.OFLAG_COPIED | im.refblock_offset(0)),
         "write-fails", "", 0),
        ("l2-entry-is-reftable", "plain", l2e(0, lambda im, e: Q.OFLAG_COPIED
                                              | im.h["refcount_table_offset"]), "write-fails", "", 0),
        ("l2-entry-is-l2", "plain", l2e(0, lambda im, e: Q.OFLAG_COPIED | im.l2_table_offset(0)),
         "write-fails", "", 0),
        ("l2-compressed-past-eof", "comp", l2e(0, lambda im, e: compressed_entry(
            im, eof_cluster(im) * 4, 3)), "ioerr", "", 0),
        ("l2-compressed-garbage", "comp", l2e(0, lambda im, e: compressed_entry(im, 0, 1)),
         "ioerr", "", 0),
        ("l2-compressed-len-huge", "comp", l2e(0, lambda im, e: compressed_entry(
            im, e & ((1 << (62 - (im.cluster_bits - 8))) - 1), (1 << (im.cluster_bits - 8)) - 1)),
         "survive", "", 0),
        ("extl2-alloc-and-zero", "ext", lambda im: im.put_u64(
            im.l2_entry_addr(0) + 8, 0x00000001_00000001), "ioerr", "", 0),
        ("extl2-bitmap-unallocated", "ext", lambda im: im.put_u64(
            im.l2_entry_addr(SIZE - CS) + 8, 0x1) if im.l2_entry_addr(SIZE - CS) else None,
         "ioerr", "", SIZE - CS),
        ("reftable-entry-past-eof", "plain", rte(0, lambda im, e: eof_cluster(im)), "write-fails", "",
         SIZE - CS),
        ("reftable-entry-unaligned", "plain", rte(0, lambda im, e: e | 0x100), "write-fails", "",
         SIZE - CS),
        ("reftable-entry-is-header", "plain", rte(0, lambda im, e: 0), "survive", "", SIZE - CS),
        ("reftable-entry-is-l1", "plain", rte(0, lambda im, e: im.h["l1_table_offset"]),
         "survive", "", SIZE - CS),
        ("refblock-all-zero", "plain", lambda im: im.pwrite(im.refblock_offset(0), bytes(CS)),
         "survive", "", SIZE - CS),
        # a bitmap directory entry whose extra data runs past the directory,
        # with an invalid table: check must not read beyond the directory
        ("bitmap-entry-past-dir", "bitmaps", bitmap_dir_entry0(lambda im, d: (
            im.put_u64(d, im.u64(d) | 0x200), im.pwrite(d + 20, struct.pack(">I", 0xFFFFF0)))),
         "survive", "", 0),
        ("corrupt-bit", "plain", feature_bits(Q.INCOMPAT_CORRUPT), "write-fails", "corrupt", 0),
    ]


# A refusal of an image damaged below the header must still say what is wrong.
GENERIC_PAT = (r"\bL1\b|\bL2\b|l1_|l2_|cluster|offset|entry|table|refcount|corrupt|overlap|"
               r"compress|bitmap|subcluster|snapshot|past the end|beyond|exceeds")


def check_msg(text, pat, what):
    if pat:
        check(re.search(pat, text, re.I) is not None,
              "%s: the error does not name the problem (want /%s/):\n%s" % (what, pat, text[-3000:]))
    check(text.strip() != "", "%s: refused without any message" % what)


def vimg(*args):
    r = qlib.run([A.img] + [str(a) for a in args], timeout=TIMEOUT)
    qlib.assert_sane_exit(r, "vqcow-img " + " ".join(str(a) for a in args))
    return r


def run_case(name, img, expect, pat, goff, qemu_opened_before):
    what = name
    # --- vqcow-img info / check
    r = vimg("info", "-f", "qcow2", "--output=json", img)
    if expect == "refuse":
        check(r.rc != 0, "%s: vqcow-img info accepted the image\n%s" % (what, r.describe()))
        check_msg(r.errtext, pat, what + " (vqcow-img info)")
    r = vimg("check", "-f", "qcow2", img)
    if expect == "refuse":
        check(r.rc in (1, 2), "%s: vqcow-img check rc %s (want 1 or 2)\n%s" % (what, r.rc, r.describe()))
    else:
        check(r.rc in (0, 1, 2, 3), "%s: vqcow-img check rc %s\n%s" % (what, r.rc, r.describe()))
    if expect in ("ioerr", "write-fails") and qemu_opened_before:
        qrc = qlib.qemu_check(img)[0]
        if qrc == 2:
            check(r.rc == 2, "%s: qemu-img check finds corruption, vqcow-img check rc %s\n%s"
                  % (what, r.rc, r.describe()))

    # --- vqcowd
    work = img[:-len(".qcow2")] + ".work.qcow2"
    shutil.copyfile(img, work)
    sock = W("m.sock")
    d = qlib.Daemon(A.vqcowd, work, sock, extra=["--format", "qcow2"])
    served = d.start(timeout=TIMEOUT)
    if not served:
        log_text = d.log()
        check(d.rc is not None and d.rc > 0,
              "%s: vqcowd died with status %s\n%s" % (what, d.rc, log_text))
        check(not qlib.sanitizer_report(log_text), "%s: vqcowd sanitizer report\n%s" % (what, log_text))
        check_msg(log_text, pat if expect == "refuse" else GENERIC_PAT, what + " (vqcowd)")
        return "refused"
    if expect == "refuse":
        d.kill()
        fail("%s: vqcowd served an image it must refuse\n%s" % (what, d.log()))
    need_binary_fe()
    fe = qlib.Frontend(A.fe, sock, timeout=TIMEOUT)
    outcome = "served"
    with qlib.killed_on_error(d):
        r = fe.read(goff, CS)
        if expect == "ioerr":
            # vqcow-fe exits 3 when the device answers with a non-OK status (IOERR)
            check(r.rc == 3, "%s: reading the damaged range %d+%d: want IOERR (vqcow-fe exit 3)"
                  "\n%s" % (what, goff, CS, r.describe()))
        check(d.alive(), "%s: vqcowd died on a read\n%s" % (what, d.log()))
        r = fe.write(goff, b"\x5a" * 4096)
        if expect in ("ioerr", "write-fails"):
            check(r.rc == 3, "%s: writing the damaged range %d+4096: want IOERR (vqcow-fe exit 3)"
                  "\n%s" % (what, goff, r.describe()))
        check(d.alive(), "%s: vqcowd died on a write\n%s" % (what, d.log()))
        fe.flush()
        # the rest of the disk: whatever the result, no crash or hang
        fe.read(0, SIZE)
        check(d.alive(), "%s: vqcowd died on a full read\n%s" % (what, d.log()))
    rc = d.stop(timeout=10)
    check(rc is not None and rc >= 0, "%s: vqcowd died of signal %s at SIGTERM\n%s" % (what, rc, d.log()))
    check(not qlib.sanitizer_report(d.log()), "%s: vqcowd sanitizer report\n%s" % (what, d.log()))
    if qemu_opened_before:
        r = qlib.qemu_img("info", work, check_rc=None)
        check(r.rc == 0, "%s: after vqcowd, qemu-img cannot open the image any more\n%s"
              % (what, r.describe()))
    return outcome


def fuzz(bases, rng, count):
    """Random byte damage in the metadata clusters of small images: vqcow-img
    info/check/map and vqcowd must survive; when vqcow-img check -r all says it
    repaired the image (exit 0), qemu-img check must agree that it is clean."""
    failures = []
    names = sorted(bases)
    for n in range(count):
        base = bases[names[n % len(names)]]
        img = W("fz%03d.qcow2" % n)
        shutil.copyfile(base, img)
        with Q.Image(img) as im:
            meta = [0, im.h["l1_table_offset"], im.h["refcount_table_offset"]]
            l2 = im.l2_table_offset(0)
            if l2:
                meta.append(l2)
            rb = im.refblock_offset(0)
            if rb:
                meta.append(rb)
            for _ in range(rng.randrange(1, 6)):
                where = rng.choice(meta) + rng.randrange(0, 512)
                if where < 8:  # keep the magic: damage below it is the point here
                    where = 8 + rng.randrange(0, 100)
                im.pwrite(where, bytes([rng.randrange(256)]))
        what = "fuzz %d (%s)" % (n, names[n % len(names)])
        try:
            for args in (("info", "-f", "qcow2", img), ("check", "-f", "qcow2", img),
                         ("map", "--output=json", "-f", "qcow2", img)):
                vimg(*args)
            fixed = W("fz%03d.fixed.qcow2" % n)
            shutil.copyfile(img, fixed)
            r = vimg("check", "-r", "all", fixed)
            if r.rc == 0:
                rc, js, qr = qlib.qemu_check(fixed)
                check(rc == 0, "%s: vqcow-img check -r all exit 0 but qemu-img check says %s\n%s"
                      % (what, rc, qr.describe()))
            sock = W("fz.sock")
            d = qlib.Daemon(A.vqcowd, img, sock, extra=["--format", "qcow2"])
            if d.start(timeout=TIMEOUT):
                try:
                    if A.fe and os.access(A.fe, os.X_OK):
                        fe = qlib.Frontend(A.fe, sock, timeout=TIMEOUT)
                        fe.read(0, SIZE)
                        fe.write(0, b"\xa5" * 8192)
                        fe.flush()
                    check(d.alive(), "%s: vqcowd died\n%s" % (what, d.log()))
                except BaseException:
                    d.kill()
                    raise
                rc = d.stop(timeout=10)
                check(rc is not None and rc >= 0, "%s: vqcowd died of signal %s\n%s"
                      % (what, rc, d.log()))
            else:
                check(d.rc is not None and d.rc > 0, "%s: vqcowd died (%s)\n%s"
                      % (what, d.rc, d.log()))
            check(not qlib.sanitizer_report(d.log()), "%s: vqcowd sanitizer report\n%s"
                  % (what, d.log()))
            log("PASS %s (repair exit %s)" % (what, r.rc))
        except qlib.TestFailure as e:
            log("FAIL %s: %s" % (what, e))
            failures.append(what)
    return failures


_fe_checked = False


def need_binary_fe():
    global _fe_checked
    if not _fe_checked:
        qlib.need_binary(A.fe, "vqcow-fe (tests/frontend)")
        _fe_checked = True


def main():
    global A, W
    def extra(p):
        p.add_argument("--only", default="")
        p.add_argument("--fuzz", type=int, default=40, help="random damage rounds")
    A = qlib.parse_args(extra)
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binary(A.img, "vqcow-img")
    qlib.need_binary(A.vqcowd, "vqcowd")
    wd = qlib.Workdir(os.path.join(A.workdir, "malformed"), A.keep)
    W = wd
    ok = False
    failures = []
    try:
        bases = make_bases()
        for idx, (name, base, mut, expect, pat, goff) in enumerate(cases()):
            if A.only and not re.search(A.only, name):
                continue
            # neutral file names: the message must name the problem, not echo the file name
            fname = "m%03d.qcow2" % idx
            if expect is None:
                # backing file that does not exist
                img = W(fname)
                qlib.qemu_img("create", "-f", "qcow2", "-u", "-b", "no-such-backing.raw", "-F", "raw",
                              img, SIZE)
                expect, pat, goff = "refuse", "backing|no-such-backing|No such file", 0
            else:
                img = W(fname)
                shutil.copyfile(bases[base], img)
                with Q.Image(img) as im:
                    mut(im)
            opened = qlib.qemu_img("info", img, check_rc=None).rc == 0
            try:
                res = run_case(name, img, expect, pat, goff, opened)
                log("PASS %-32s %-11s -> %s" % (name, expect, res))
            except qlib.TestFailure as e:
                log("FAIL %-32s %s" % (name, e))
                failures.append(name)
        if not A.only:
            failures += fuzz(bases, random.Random(A.seed), A.fuzz)
        ok = not failures
    finally:
        wd.cleanup(ok)
    if failures:
        fail("%d case(s) failed: %s" % (len(failures), ", ".join(failures)))


if __name__ == "__main__":
    qlib.main_wrapper(main)
