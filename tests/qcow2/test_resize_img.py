#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vqcow-img resize against qemu-img resize as the oracle.

Every case runs on two identical images, one resized by vqcow-img and one
by qemu-img, with the same arguments:
  - the same exit status and stdout ("Image resized."), the same error text
    (after the program's name) where both refuse;
  - qemu-img info gives both the same virtual size, qemu-img check is clean
    on ours, qemu-img compare finds both identical (the data before the old
    end kept, the new area reading as zeroes), and qemu-io then writes and
    reads back a pattern past the old end of ours;
geometries: qcow2 growing inside its L1 table and past it (64 KiB and
512-byte clusters), a growth that moves the refcount table (512-byte
clusters with 64-bit refcounts, 4 MiB -> 16 GiB), extended L2, a v2 image,
an external raw data file (grown too), absolute and relative (+) sizes,
raw files (also unaligned sizes).
Refusals: shrinking without --shrink (qemu-img's message), a size of 0 or
below, a bad size, too few arguments, a v2 image with snapshots (qemu-img's
message); a deliberate difference, checked as such: shrinking with --shrink
is refused by vqcow-img (qemu-img does it), leaving the image untouched.
An image with a persistent dirty bitmap grows as with qemu-img (the same
output and bitmaps; qcow2.img.bitmap checks the bits).
Locks: a lock byte held by another process makes both tools refuse (or
both go on) alike.
"""

import fcntl
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, log, tool_error as msg  # noqa: E402

A = None
W = None
MiB = 1 << 20


def vimg(*args):
    return qlib.vqcow_img(A.img, "resize", *args)


def qimg(*args):
    return qlib.run(["qemu-img", "resize"] + [str(a) for a in args], timeout=120)


def create(path, fmt, size, opts=None):
    args = ["create", "-q", "-f", fmt]
    if opts:
        args += ["-o", opts]
    qlib.qemu_img(*(args + [path, str(size)]))


def pair(name, fmt, size, opts=None, data=True):
    a, b = W(name + ".ours." + fmt), W(name + ".qemu." + fmt)
    for p in (a, b):
        o = opts.replace("@", p + ".data") if opts else None
        create(p, fmt, size, o)
        if data:
            qlib.qemu_io(p, "write -P 0x5a 0 64k", "write -P 0xa5 %d 4k" % (size - 4096),
                         fmt=fmt)
    return a, b


def both(a, b, fmt, *args):
    ra = vimg("-f", fmt, *(list(args[:-1]) + [a, args[-1]]))
    rb = qimg("-f", fmt, *(list(args[:-1]) + [b, args[-1]]))
    qlib.assert_sane_exit(ra, "vqcow-img resize")
    return ra, rb


def vsize(p, fmt):
    return qlib.qemu_info(p, fmt=fmt)["virtual-size"]


def grow_case(name, fmt, size, arg, opts=None):
    a, b = pair(name, fmt, size, opts)
    ra, rb = both(a, b, fmt, arg)
    check(ra.rc == rb.rc == 0, "%s: rc ours %s, qemu-img %s\n%s\n%s" % (
        name, ra.rc, rb.rc, ra.describe(), rb.describe()))
    check(ra.text == rb.text == "Image resized.\n", "%s: stdout %r / %r" % (name, ra.text, rb.text))
    sa, sb = vsize(a, fmt), vsize(b, fmt)
    check(sa == sb and sa > size, "%s: virtual size ours %d, qemu-img %d" % (name, sa, sb))
    if fmt == "qcow2":
        qlib.assert_qemu_check_clean(a, name)
        if opts and "data_file" in opts:
            check(os.path.getsize(a + ".data") >= sa, "%s: the data file did not grow" % name)
    else:
        check(os.path.getsize(a) == os.path.getsize(b), "%s: raw file sizes %d / %d" % (
            name, os.path.getsize(a), os.path.getsize(b)))
    qlib.qemu_compare(a, b, fmt, fmt)
    cmds = ["read -P 0x5a 0 64k", "read -P 0xa5 %d 4k" % (size - 4096)]
    if sa - size >= 8192:
        end = sa - 8192
        cmds = ["write -P 0x3c %d 8k" % end, "read -P 0x3c %d 8k" % end] + cmds
    qlib.qemu_io(a, *cmds, fmt=fmt)
    if fmt == "qcow2":
        qlib.assert_qemu_check_clean(a, name + " after writing past the old end")
    log("ok: %s: resize %s: as qemu-img (%d -> %d bytes)" % (name, arg, size, sa))


def part_grow():
    grow_case("inside-l1", "qcow2", 8 * MiB, "200M")
    grow_case("past-l1", "qcow2", 8 * MiB, "+3G")
    grow_case("small-clusters", "qcow2", 1 * MiB, "64M", "cluster_size=512")
    grow_case("reftable-moves", "qcow2", 4 * MiB, "16G", "cluster_size=512,refcount_bits=64")
    grow_case("extl2", "qcow2", 8 * MiB, "+1G", "extended_l2=on")
    grow_case("v2", "qcow2", 8 * MiB, "1G", "compat=0.10")
    grow_case("data-file", "qcow2", 4 * MiB, "700M", "data_file=@,data_file_raw=on")
    grow_case("raw", "raw", 8 * MiB, "+1G")
    grow_case("raw-unaligned", "raw", 8 * MiB, "+1000")


def same_refusal(name, fmt, args, want, size=8 * MiB, opts=None, setup=None):
    a, b = pair(name, fmt, size, opts)
    if setup:
        setup(a)
        setup(b)
    ra, rb = both(a, b, fmt, *args)
    check(ra.rc == rb.rc == 1, "%s: rc ours %s, qemu-img %s" % (name, ra.rc, rb.rc))
    check(msg(ra) == msg(rb) and want in msg(ra), "%s: ours %r, qemu-img %r" % (
        name, ra.errtext, rb.errtext))
    check(vsize(a, fmt) == size, "%s: the image changed" % name)
    log("ok: %s refused as qemu-img does: %s" % (name, msg(ra)))


def part_refusals():
    same_refusal("shrink", "qcow2", ["4M"], "Use the --shrink option")
    same_refusal("shrink-raw", "raw", ["4M"], "Use the --shrink option")
    same_refusal("zero", "qcow2", ["0"], "New image size must be positive")
    same_refusal("negative", "qcow2", ["-8M"], "New image size must be positive")
    same_refusal("bad-size", "qcow2", ["12Q"], "Parameter 'size' expects")
    same_refusal("v2-snapshots", "qcow2", ["1G"], "Can't resize a v2 image which has snapshots",
                 opts="compat=0.10",
                 setup=lambda p: qlib.qemu_img("snapshot", "-c", "s1", p))
    ra, rb = vimg(W("x.qcow2")), qimg(W("x.qcow2"))
    check(ra.rc == rb.rc == 1 and msg(ra) == msg(rb) == "Not enough arguments",
          "too few arguments: %r / %r" % (ra.errtext, rb.errtext))
    # deliberate differences: refused here, done by qemu-img
    a, b = pair("shrink-flag", "qcow2", 8 * MiB)
    ra, rb = both(a, b, "qcow2", "--shrink", "4M")
    check(ra.rc == 1 and "shrinking is not supported" in ra.errtext and rb.rc == 0,
          "--shrink: ours %s" % ra.describe())
    check(vsize(a, "qcow2") == 8 * MiB, "--shrink changed our image")
    a, b = pair("bitmaps", "qcow2", 8 * MiB)
    for p in (a, b):
        qlib.qemu_img("bitmap", "--add", p, "b0")
    ra, rb = both(a, b, "qcow2", "1G")
    check(ra.rc == rb.rc == 0 and ra.text == rb.text, "bitmaps: ours %s\nqemu-img %s" %
          (ra.describe(), rb.describe()))
    check(vsize(a, "qcow2") == vsize(b, "qcow2") == 1 << 30, "the bitmap image's size")
    qlib.assert_qemu_check_clean(a, "bitmaps")
    log("ok: deliberate difference: --shrink refused, image untouched; an image with a "
        "bitmap grows as with qemu-img")


F_OFD_SETLK = 37


def held(path, byte):
    fd = os.open(path, os.O_RDWR)
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_RDLCK, 0, byte, 1, 0))
    return fd


def part_locks():
    # QEMU's lock bytes: 100 + perm held, 200 + perm not shared
    # (0 consistent read, 1 write, 2 write unchanged, 3 resize).
    n = 0
    for fmt in ("qcow2", "raw"):
        for byte in (100, 101, 103, 200, 201, 203):
            a, b = pair("lock-%s-%d" % (fmt, byte), fmt, 8 * MiB, data=False)
            fa, fb = held(a, byte), held(b, byte)
            try:
                ra, rb = both(a, b, fmt, "+1M")
            finally:
                os.close(fa)
                os.close(fb)
            check(ra.rc == rb.rc, "%s lock byte %d: ours rc %s, qemu-img %s\n%s\n%s" % (
                fmt, byte, ra.rc, rb.rc, ra.describe(), rb.describe()))
            if ra.rc:
                want = rb.errtext.split("Failed to get ")[1].split(" lock")[0]
                check(want in ra.errtext, "%s lock byte %d: ours %r, qemu-img %r" % (
                    fmt, byte, ra.errtext, rb.errtext))
            n += 1
    log("ok: %d lock situations: refused or allowed as qemu-img resize" % n)


def main():
    return qlib.vqcow_img_test(globals(), "resize", part_grow, part_refusals, part_locks)


if __name__ == "__main__":
    qlib.main_wrapper(main)
