#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Interop corpus: images made by qemu-img/qemu-io, served by vqcowd, read and
written through the test frontend (vqcow-fe), checked with qemu-img.

For each image of the --group:
  1. reference = qemu-img convert -O raw (and hashes of snapshots/backing files)
  2. vqcowd serves it read-only: every byte is read through vqcow-fe and compared,
     and the image file is unchanged afterwards; then read-write, read again
  3. seeded random writes through vqcow-fe, mirrored into the raw reference;
     flush; the whole disk is read back and compared
  4. SIGTERM: vqcowd must exit 0
  5. qemu-img check clean, qemu-img compare equal to the reference, snapshots
     (list and contents) and backing files unchanged
  6. vqcowd reopens the result and reads it back equal to the reference
"""

import os
import random
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
import qcow2edit as Q  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
W = None

GROUPS = ["clusters", "refcount", "compat", "extl2", "compressed", "backing", "prealloc",
          "datafile", "snapshots"]

STD_WRITES = ("write -P 0x11 0 8k", "write -P 0x22 70k 100k", "write -z 1M 128k",
              "write -P 0x33 3M 1k", "write -P 0 4M 64k", "write -P 0x44 5M 1M",
              "write -P 0x45 8188k 4k")
SIZE = 8 << 20


def restream(path, guest_off, data):
    """Point the compressed cluster at guest_off at a new deflate stream of
    data, appended at the end of the file (refcounts moved along), as a
    writer other than QEMU could have made it: with data longer than a
    cluster the stream goes on past the cluster. QEMU reads its first
    cluster; libdeflate refuses it, so vqcowd must fall back to zlib."""
    with Q.Image(path) as im:
        cs = im.cluster_size
        x = 62 - (im.cluster_bits - 8)
        e = im.l2_entry(guest_off)
        check(e is not None and e & Q.OFLAG_COMPRESSED, "%s: cluster at %d is not compressed"
              % (path, guest_off))
        # the old stream's sectors: every host cluster they touch loses a reference
        old = (e & ((1 << x) - 1)) & ~511
        old_end = old + (((e >> x) & ((1 << (62 - x)) - 1)) + 1) * 512
        co = zlib.compressobj(6, zlib.DEFLATED, -12)
        stream = co.compress(data) + co.flush()
        host = (im.file_size() + cs - 1) // cs * cs
        check(len(stream) <= cs, "restream: the stream is longer than a cluster")
        im.pwrite(host, stream)
        im.set_l2_entry(guest_off, Q.OFLAG_COMPRESSED | (((len(stream) + 511) // 512 - 1) << x)
                        | host)
        im.set_refcount(host, 1)
        for hc in range(old // cs, (old_end - 1) // cs + 1):
            im.set_refcount(hc * cs, im.refcount(hc * cs) - 1)


def qcreate(name, opts="", size=SIZE, writes=STD_WRITES, backing=None, bfmt=None):
    p = W(name)
    argv = ["create", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-b", backing, "-F", bfmt]
    argv.append(p)
    if size:
        argv.append(str(size))
    qlib.qemu_img(*argv)
    if writes:
        qlib.qemu_io(p, *writes)
    return p


def corpus(group):
    """[(name, image path, [files that must stay unchanged])]"""
    if group == "clusters":
        return [("cs%d" % cs, qcreate("cs%d.qcow2" % cs, "cluster_size=%d" % cs), [])
                for cs in (512, 4096, 65536, 2 << 20)]
    if group == "refcount":
        return [("rb%d" % rb, qcreate("rb%d.qcow2" % rb, "refcount_bits=%d" % rb), [])
                for rb in (1, 16, 64)]
    if group == "compat":
        return [("compat-0.10", qcreate("v2.qcow2", "compat=0.10"), []),
                ("compat-1.1", qcreate("v3.qcow2", "compat=1.1"), []),
                ("lazy-refcounts", qcreate("lazy.qcow2", "compat=1.1,lazy_refcounts=on"), [])]
    if group == "extl2":
        return [("extl2-64k", qcreate("e64.qcow2", "extended_l2=on,cluster_size=65536"), []),
                ("extl2-16k", qcreate("e16.qcow2", "extended_l2=on,cluster_size=16384"), []),
                ("extl2-2m", qcreate("e2m.qcow2", "extended_l2=on,cluster_size=2M"), []),
                # QEMU writes only the allocated subclusters: the file ends inside
                # the last cluster (qemu-img check: no errors)
                ("extl2-eof", qcreate("eeof.qcow2", "extended_l2=on,cluster_size=16384",
                                      writes=("write -P 0x11 0 2k",)), [])]
    if group == "compressed":
        out = []
        for cs in (65536, 4096):
            src = qcreate("src%d.qcow2" % cs, "cluster_size=%d" % cs,
                          writes=STD_WRITES + ("write -P 0x12 2M 512k",))
            c = W("comp%d.qcow2" % cs)
            qlib.qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=%d" % cs, src, c)
            qlib.qemu_io(c, "write -P 0x77 2M 4k")  # a normal cluster among compressed ones
            out.append(("compressed-%d" % cs, c, []))
        # QEMU writes only the compressed bytes: a compressed cluster written
        # last ends inside its last 512-byte sector, short of what the L2
        # entry's sector count covers (issue 9, audit of item 3)
        for cs in (65536, 4096):
            last = qcreate("complast%d.qcow2" % cs, "cluster_size=%d" % cs,
                           writes=STD_WRITES + ("write -c -P 0x78 6M %d" % cs,))
            check(os.path.getsize(last) % 512, "%s: the file ends on a sector boundary: the "
                  "test would not cover the case" % last)
            out.append(("compressed-last-%d" % cs, last, []))
        # data as a guest has it (words: dynamic Huffman blocks and back
        # references; an incompressible part that stays uncompressed; zeroes),
        # deflate (inflated by libdeflate, zlib if it refuses) and zstd
        src = W("text.raw")
        rnd = random.Random(7)
        words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
                 for _ in range(500)]
        with open(src, "wb") as f:
            text = b" ".join(rnd.choice(words) for _ in range(1100000))
            f.write(text[:5 << 20])
            f.write(rnd.randbytes(1 << 20))
            f.truncate(SIZE)
        for ctype, cs in (("zlib", 65536), ("zstd", 65536), ("zlib", 2 << 20),
                          ("zstd", 4096)):
            c = W("text-%s-%d.qcow2" % (ctype, cs))
            qlib.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                          "cluster_size=%d,compression_type=%s" % (cs, ctype), src, c)
            out.append(("compressed-text-%s-%d" % (ctype, cs), c, []))
        # a stream libdeflate refuses and QEMU (zlib) reads: it goes on past the cluster
        c = W("text-zlib-odd.qcow2")
        qlib.qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
                      src, c)
        restream(c, 3 << 16, text[200000:200000 + 65536 + 4096])
        out.append(("compressed-long-stream", c, []))
        os.unlink(src)
        return out
    if group == "backing":
        base = W("base.raw")
        with open(base, "wb") as f:
            f.truncate(6 << 20)  # shorter than the overlays
        qlib.qemu_io(base, "write -P 0xb0 0 1M", "write -P 0xb1 5M 512", "write -P 0xb2 6140k 4k",
                     fmt="raw")
        mid = qcreate("mid.qcow2", "", SIZE, ("write -P 0xc0 512k 1M", "write -z 2M 64k",
                                            "write -P 0xc1 7M 64k"), backing="base.raw", bfmt="raw")
        top = qcreate("top.qcow2", "cluster_size=4096", None,
                      ("write -P 0xd0 1M 8k", "write -z 3M 64k", "write -P 0xd1 600k 4k"),
                      backing="mid.qcow2", bfmt="qcow2")
        # a 64K-cluster overlay over a 4K-cluster middle as well
        mid2 = qcreate("mid2.qcow2", "cluster_size=4096", SIZE, ("write -P 0xe0 100k 300k",),
                       backing="base.raw", bfmt="raw")
        top2 = qcreate("top2.qcow2", "extended_l2=on", None, ("write -P 0xe1 200k 4k",),
                       backing="mid2.qcow2", bfmt="qcow2")
        return [("chain3", top, [base, mid]), ("chain3-extl2", top2, [base, mid2])]
    if group == "prealloc":
        return [("prealloc-%s" % p, qcreate("pre-%s.qcow2" % p, "preallocation=" + p,
                                           writes=("write -P 0x55 1M 4k", "write -z 2M 64k")), [])
                for p in ("off", "metadata", "falloc", "full")]
    if group == "datafile":
        img = qcreate("df.qcow2", "data_file=" + W("df.data"), writes=("write -P 0xe0 0 64k",
                                                             "write -P 0xe1 3M 100k"))
        img2 = qcreate("dfraw.qcow2", "data_file=" + W("dfraw.data") + ",data_file_raw=on",
                       writes=("write -P 0xe2 64k 64k",))
        return [("data-file", img, []), ("data-file-raw", img2, [])]
    if group == "snapshots":
        img = qcreate("snap.qcow2")
        qlib.qemu_img("snapshot", "-c", "first", img)
        qlib.qemu_io(img, "write -P 0x99 0 64k", "write -P 0x98 5M 64k")
        qlib.qemu_img("snapshot", "-c", "second", img)
        qlib.qemu_io(img, "write -P 0x97 64k 64k")
        img2 = qcreate("snap-extl2.qcow2", "extended_l2=on")
        qlib.qemu_img("snapshot", "-c", "only", img2)
        qlib.qemu_io(img2, "write -P 0x96 4k 4k")
        return [("snapshots", img, []), ("snapshots-extl2", img2, [])]
    fail("unknown group " + group)


def serve_and_read(img, ref, what, extra=()):
    sock = W("vqcowd.sock")
    d = qlib.Daemon(A.vqcowd, img, sock, extra)
    if not d.start():
        fail("%s: vqcowd refused to serve the image (exit %s)\n%s" % (what, d.rc, d.log()))
    return d, qlib.Frontend(A.fe, sock)


def run_image(name, img, keep_files, rng):
    what = name
    ref = W(name + ".ref.raw")
    qlib.qemu_to_raw(img, ref)
    size = os.path.getsize(ref)
    snaps = qlib.snapshot_state(W, img)
    kept = {p: qlib.sha256_file(p) for p in keep_files}
    check(qlib.qemu_check(img)[0] == 0, "%s: qemu-img check of the fresh image is not clean" % what)

    # a read-only export first: it reads the same and leaves the file untouched
    # (it allocates nothing, so nothing covers clusters that end past EOF)
    before = qlib.sha256_file(img)
    d, fe = serve_and_read(img, ref, what + " (read-only)", ["--read-only"])
    with qlib.killed_on_error(d):
        fe.assert_reads_as(ref, size, W(name + ".ro.raw"),
                           "%s: read through a read-only export" % what)
    d.assert_clean_stop()
    check(qlib.sha256_file(img) == before, "%s: a read-only export changed the image" % what)

    d, fe = serve_and_read(img, ref, what)
    with qlib.killed_on_error(d):
        fe.assert_reads_as(ref, size, W(name + ".read.raw"),
                           "%s: initial read through vqcowd vs qemu-img convert" % what)
        # random writes, mirrored into the reference
        ops = qlib.random_writes(rng, size, 24)
        # plus writes chosen for the corpus: cluster boundaries, the last sector,
        # inside zero/compressed/preallocated areas, partial overwrites of backing data
        ops += [(65536 - 512, 1024), (1 << 20, 4096), (3 << 20, 512), (size - 512, 512),
                (2 << 20, 65536 + 512), (6 << 20, 8192)]
        for i, (off, ln) in enumerate(ops):
            data = qlib.pattern(rng, ln)
            fe.write_ok(off, data)
            qlib.apply_to_raw(ref, off, data)
            if i % 7 == 3:
                fe.flush_ok()
            if i % 9 == 5:  # read-after-write through the daemon
                got_b = fe.read_ok(off, ln)
                check(got_b == data, "%s: read-after-write mismatch at %d+%d" % (what, off, ln))
        fe.flush_ok()
        fe.assert_reads_as(ref, size, W(name + ".read2.raw"), "%s: read back after writes" % what)
    d.assert_clean_stop()

    rc, js, r = qlib.qemu_check(img)
    check(rc == 0, "%s: qemu-img check after vqcowd writes: rc %s\n%s" % (what, rc, r.describe()))
    r = qlib.qemu_compare(ref, img, fmt_a="raw", fmt_b="qcow2")
    check(r.rc == 0, "%s: qemu-img compare with the raw reference: %s" % (what, r.describe()))
    after = qlib.snapshot_state(W, img)
    check(after == snaps, "%s: snapshots changed: before %r, after %r" % (what, snaps, after))
    for p, h in kept.items():
        check(qlib.sha256_file(p) == h, "%s: backing file %s was modified" % (what, p))

    # reopen: vqcowd reads its own metadata back
    d, fe = serve_and_read(img, ref, what + " (reopened)")
    with qlib.killed_on_error(d):
        fe.assert_reads_as(ref, size, W(name + ".read3.raw"), "%s: read after reopening" % what)
    d.assert_clean_stop()
    check(qlib.qemu_check(img)[0] == 0, "%s: qemu-img check after reopen not clean" % what)
    os.unlink(ref)


def main():
    global A, W

    def extra(p):
        p.add_argument("--group", required=True, choices=GROUPS)
    A = qlib.parse_args(extra)
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binary(A.vqcowd, "vqcowd")
    qlib.need_binary(A.fe, "vqcow-fe (tests/frontend)")
    wd = qlib.Workdir(os.path.join(A.workdir, "interop-" + A.group), A.keep)
    W = wd
    rng = random.Random(A.seed)
    qlib.run_corpus(wd, lambda: corpus(A.group),
                    lambda name, img, keep: run_image(name, img, keep, rng))


if __name__ == "__main__":
    qlib.main_wrapper(main)
