#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vqcow-img against qemu-img as the oracle.

  --part create  every create option combination: qemu-img check clean, qemu-img
                 info fields match the options, the image reads as zeroes (or as
                 its backing file) in qemu-io, and QEMU can write to it and stay clean;
                 invalid combinations are refused.
  --part info    vqcow-img info --output=json vs qemu-img info --output=json
  --part map     vqcow-img map --output=json vs qemu-img map --output=json
  --part check   injected leaks/corruptions: exit codes and counts as qemu-img
                 check; -r leaks / -r all repair so qemu-img check is clean.
"""

import itertools
import json
import os
import shutil
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402
import qcow2edit  # noqa: E402

A = None
W = None


def vimg(*args, timeout=120):
    return qlib.vqcow_img(A.img, *args, timeout=timeout)


def vimg_json(*args):
    return qlib.vqcow_img_json(A.img, *args)


# ------------------------------------------------------------------ create

CLUSTERS = [512, 4096, 65536, 2 << 20]
PREALLOC = ["off", "metadata", "falloc", "full"]
REFBITS = [1, 2, 4, 8, 16, 32, 64]
COMPAT = ["0.10", "1.1"]


def valid_combo(cs, ext, rb, compat, lazy, backing=None, prealloc="off"):
    if backing and prealloc != "off" and not ext:
        return False  # QEMU: the preallocation would hide the backing file
    if ext and cs < 16384:
        return False
    if compat == "0.10" and (ext or rb != 16 or lazy):
        return False
    return True


def make_backing(kind, size):
    """A backing file with recognisable data: raw or qcow2."""
    path = W("backing-%s-%d.%s" % (kind, size, kind))
    if os.path.exists(path):
        return path
    if kind == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
        qlib.qemu_io(path, "write -P 0x5a 0 4k", "write -P 0x6b %d 4k" % (size - 4096), fmt="raw")
    else:
        qlib.qemu_img("create", "-f", "qcow2", path, size)
        qlib.qemu_io(path, "write -P 0x5a 0 4k", "write -P 0x6b %d 4k" % (size - 4096),
                     fmt="qcow2")
    return path


def verify_created(img, size, cs, prealloc, ext, rb, compat, lazy, backing, bfmt, what):
    js = qlib.assert_qemu_check_clean(img, what)
    info = qlib.qemu_info(img)
    check(info["format"] == "qcow2", what + ": format " + info["format"])
    check(info["virtual-size"] == size, "%s: virtual size %s != %s" % (what, info["virtual-size"], size))
    check(info["cluster-size"] == cs, "%s: cluster size %s" % (what, info["cluster-size"]))
    fs = info["format-specific"]["data"]
    check(fs["compat"] == compat, "%s: compat %s" % (what, fs["compat"]))
    check(fs["refcount-bits"] == rb, "%s: refcount bits %s" % (what, fs["refcount-bits"]))
    if compat == "1.1":
        check(fs["extended-l2"] == ext, "%s: extended-l2 %s" % (what, fs["extended-l2"]))
        check(fs["lazy-refcounts"] == lazy, "%s: lazy-refcounts %s" % (what, fs["lazy-refcounts"]))
        check(fs["corrupt"] is False, what + ": corrupt")
    check(info.get("dirty-flag") is False, what + ": dirty")
    if backing:
        check(info.get("backing-filename") == backing,
              "%s: backing-filename %r" % (what, info.get("backing-filename")))
        if bfmt:
            check(info.get("backing-filename-format") == bfmt,
                  "%s: backing format %r" % (what, info.get("backing-filename-format")))
    else:
        check("backing-filename" not in info, what + ": unexpected backing file")
    # preallocation: every guest cluster has a host cluster (read from the L2
    # tables directly); without it, nothing is allocated in this layer
    with qcow2edit.Image(img) as im:
        nclusters = (size + cs - 1) // cs
        l1 = struct.unpack(">%dQ" % im.h["l1_size"],
                           im.pread(im.h["l1_table_offset"], 8 * im.h["l1_size"]))
        if prealloc == "off":
            check(not any(l1), "%s: preallocation=off but L2 tables are allocated" % what)
        gc = 0
        for l2e in l1:
            if prealloc == "off" or gc >= nclusters:
                break
            l2off = l2e & qcow2edit.OFFSET_MASK
            check(l2off and l2e & qcow2edit.OFLAG_COPIED,
                  "%s: preallocation=%s but L1 entry %r" % (what, prealloc, l2e))
            tbl = im.pread(l2off, cs)
            for j in range(im.l2_entries):
                if gc >= nclusters:
                    break
                e, = struct.unpack_from(">Q", tbl, j * im.l2_entry_size)
                check(e & qcow2edit.OFFSET_MASK and e & qcow2edit.OFLAG_COPIED,
                      "%s: preallocation=%s but guest cluster %d has L2 entry %r"
                      % (what, prealloc, gc, e))
                if ext:
                    bm, = struct.unpack_from(">Q", tbl, j * 16 + 8)
                    check(bm == 0, "%s: preallocated subclusters must stay unallocated "
                          "(bitmap %x)" % (what, bm))
                gc += 1
    if prealloc != "off" and not ext:
        m = json.loads(qlib.qemu_img("map", "--output=json", img).text)
        for e in m:
            check(e["depth"] == 0 and e["present"] and e["data"] and "offset" in e,
                  "%s: preallocation=%s but %r is not preallocated" % (what, prealloc, e))
    if prealloc in ("falloc", "full"):
        st = os.stat(img)
        check(st.st_blocks * 512 >= size, "%s: %s but only %d bytes allocated on disk"
              % (what, prealloc, st.st_blocks * 512))
    # contents: zeroes, or the backing file
    if backing:
        ref = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(img), backing)
        r = qlib.run(["qemu-io", "-r", "-c", "read -P 0x5a 0 4k", img], check_rc=0)
        check("Pattern verification failed" not in r.text, what + ": backing data not visible\n" + r.text)
        del ref
    else:
        r = qlib.run(["qemu-io", "-r", "-c", "read -P 0 0 %d" % min(size, 8 << 20), img], check_rc=0)
        check("Pattern verification failed" not in r.text and "error" not in r.text.lower(),
              what + ": image does not read as zeroes\n" + r.text)
    # QEMU can write into it (allocation on top of our refcount layout) and stays clean
    wlen = min(size, 2 * cs, 1 << 20)
    qlib.qemu_io(img, "write -P 0xa5 0 %d" % wlen, "write -P 0xb6 %d 512" % (size - 512),
                 "read -P 0xa5 0 %d" % wlen, "read -P 0xb6 %d 512" % (size - 512))
    qlib.assert_qemu_check_clean(img, what + " after qemu-io writes")
    return js


def create_one(opts, size_arg, size, cs, prealloc, ext, rb, compat, lazy, backing=None, bfmt=None):
    img = W("c.qcow2")
    if os.path.exists(img):
        os.unlink(img)
    argv = ["create", "-f", "qcow2", "-o", ",".join(opts), img]
    if size_arg is not None:
        argv.append(size_arg)
    what = "create " + " ".join(argv[1:])
    r = vimg(*argv, timeout=300)
    check(r.rc == 0, "%s failed\n%s" % (what, r.describe()))
    verify_created(img, size, cs, prealloc, ext, rb, compat, lazy, backing, bfmt, what)


def part_create():
    n = 0
    # 1) cluster size x preallocation x extended_l2 x compat, with refcount_bits,
    #    lazy_refcounts and the backing file (none/raw/qcow2) rotating
    rbi = itertools.cycle(REFBITS)
    lazyi = itertools.cycle([False, True])
    bki = itertools.cycle([None, "raw", "qcow2"])
    size = 3 * (1 << 20) + 512 * 7  # not cluster aligned

    def one(cs, pre, ext, compat, lazy, bk, rb):
        opts = ["cluster_size=%d" % cs, "preallocation=%s" % pre,
                "extended_l2=%s" % ("on" if ext else "off"), "refcount_bits=%d" % rb,
                "compat=%s" % compat, "lazy_refcounts=%s" % ("on" if lazy else "off")]
        backing = bfmt = None
        if bk:
            bsize = 2 << 20 if cs < 2 << 20 else 4 << 20
            backing = os.path.basename(make_backing(bk, bsize))
            bfmt = bk
            opts += ["backing_file=" + backing, "backing_fmt=" + bfmt]
        create_one(opts, str(size), size, cs, pre, ext, rb, compat, lazy, backing, bfmt)

    for cs, pre, ext, compat in itertools.product(CLUSTERS, PREALLOC, [False, True], COMPAT):
        rb = 16 if compat == "0.10" else next(rbi)
        lazy = compat == "1.1" and next(lazyi)
        bk = next(bki)
        if not valid_combo(cs, ext, rb, compat, lazy, bk, pre):
            bk = None
        if not valid_combo(cs, ext, rb, compat, lazy, bk, pre):
            continue
        one(cs, pre, ext, compat, lazy, bk, rb)
        n += 1
    # backing file x preallocation (needs extended L2)
    for cs, pre, bk in itertools.product((65536, 2 << 20), PREALLOC, ("raw", "qcow2")):
        one(cs, pre, True, "1.1", False, bk, 16)
        n += 1
    # 2) every refcount width x every cluster size, preallocation rotating (compat 1.1)
    prei = itertools.cycle(PREALLOC + PREALLOC[1:])
    for rb, cs in itertools.product(REFBITS, CLUSTERS):
        pre = next(prei)
        opts = ["cluster_size=%d" % cs, "refcount_bits=%d" % rb, "preallocation=" + pre]
        create_one(opts, "2M", 2 << 20, cs, pre, False, rb, "1.1", False)
        n += 1
    # 3) compat spellings, size suffixes, size taken from the backing file
    for spelling, want in (("v2", "0.10"), ("v3", "1.1"), ("0.10", "0.10"), ("1.1", "1.1")):
        create_one(["compat=" + spelling], "1536K", 1536 << 10, 65536, "off", False, 16, want, False)
        n += 1
    for size_arg, size in (("1G", 1 << 30), ("2T", 2 << 40), ("12345K", 12345 << 10),
                           ("1048576", 1 << 20), ("3M", 3 << 20)):
        create_one(["cluster_size=65536"], size_arg, size, 65536, "off", False, 16, "1.1", False)
        n += 1
    for bk in ("raw", "qcow2"):
        b = os.path.basename(make_backing(bk, 5 << 20))
        create_one(["backing_file=" + b, "backing_fmt=" + bk], None, 5 << 20, 65536, "off", False,
                   16, "1.1", False, b, bk)
        n += 1
    # -b/-F spelling
    img = W("b.qcow2")
    b = os.path.basename(make_backing("qcow2", 5 << 20))
    r = vimg("create", "-f", "qcow2", "-b", b, "-F", "qcow2", img)
    check(r.rc == 0, "create -b -F failed\n" + r.describe())
    verify_created(img, 5 << 20, 65536, "off", False, 16, "1.1", False, b, "qcow2", "create -b -F")
    # compression_type: the header field and its incompatible bit, as qemu-img writes them
    for ct in ("zlib", "zstd"):
        img = W("ct-%s.qcow2" % ct)
        r = vimg("create", "-f", "qcow2", "-o", "compression_type=" + ct, img, "4M")
        check(r.rc == 0, "create compression_type=%s failed\n%s" % (ct, r.describe()))
        info = qlib.qemu_info(img)
        check(info["format-specific"]["data"]["compression-type"] == ct,
              "compression_type=%s: qemu-img info says %r" % (ct, info["format-specific"]))
        qlib.assert_qemu_check_clean(img, "(compression_type=%s)" % ct)
        qlib.qemu_io(img, "write -c -P 0x5c 0 64k", fmt="qcow2")
        qlib.assert_qemu_check_clean(img, "(compression_type=%s, a compressed write)" % ct)
        n += 1
    # 4) raw
    for pre in ("off", "falloc", "full"):
        img = W("r.raw")
        if os.path.exists(img):
            os.unlink(img)
        r = vimg("create", "-f", "raw", "-o", "preallocation=" + pre, img, "3M")
        check(r.rc == 0, "create raw failed\n" + r.describe())
        info = qlib.qemu_info(img)
        check(info["format"] == "raw" and info["virtual-size"] == 3 << 20, "raw info %r" % info)
        if pre != "off":
            check(os.stat(img).st_blocks * 512 >= 3 << 20, "raw preallocation=%s not allocated" % pre)
        n += 1
    # 5) invalid combinations are refused with a message, and leave no image behind
    bad = [
        (["-o", "cluster_size=4096,extended_l2=on"], "16M"),
        (["-o", "compat=0.10,extended_l2=on"], "16M"),
        (["-o", "compat=0.10,refcount_bits=8"], "16M"),
        (["-o", "compat=0.10,lazy_refcounts=on"], "16M"),
        (["-o", "compat=0.10,compression_type=zstd"], "16M"),
        (["-o", "compression_type=lz4"], "16M"),
        (["-o", "cluster_size=3000"], "16M"),
        (["-o", "cluster_size=256"], "16M"),
        (["-o", "cluster_size=4M"], "16M"),
        (["-o", "refcount_bits=3"], "16M"),
        (["-o", "refcount_bits=128"], "16M"),
        (["-o", "preallocation=everything"], "16M"),
        (["-o", "compat=2.0"], "16M"),
        (["-o", "no_such_option=1"], "16M"),
        (["-o", "backing_fmt=raw"], "16M"),
        (["-o", "preallocation=metadata,backing_file=backing-raw-2097152.raw,backing_fmt=raw"], None),
        (["-o", "backing_file=/nonexistent/x.qcow2,backing_fmt=qcow2"], None),
        ([], None),
        ([], "12Q"),
        ([], "-5"),
        ([], "99999999999T"),
        (["-o", "cluster_size=512"], "1P"),  # L1 table far too large
        (["-f", "vmdk"], "16M"),
    ]
    for opts, size_arg in bad:
        img = W("bad.qcow2")
        if os.path.exists(img):
            os.unlink(img)
        argv = ["create"] + (opts if opts[:1] == ["-f"] else ["-f", "qcow2"] + opts) + [img]
        if size_arg:
            argv.append(size_arg)
        r = vimg(*argv)
        check(r.rc not in (0, None), "vqcow-img %s: accepted an invalid request" % " ".join(argv))
        check(r.errtext.strip() != "", "vqcow-img %s: refused without a message" % " ".join(argv))
        check(not os.path.exists(img), "vqcow-img %s: left a file behind" % " ".join(argv))
        n += 1
    log("create: %d cases passed" % n)


# ------------------------------------------------------------------ corpus (qemu-made images)

def corpus():
    """[(name, path, fmt)] built with qemu-img/qemu-io, covering the features."""
    out = []

    def mk(name, opts, size="8M", writes=(), fmt="qcow2", backing=None, bfmt=None):
        p = W(name)
        argv = ["create", "-f", fmt]
        if opts:
            argv += ["-o", opts]
        if backing:
            argv += ["-b", backing, "-F", bfmt]
        argv.append(p)
        if size:
            argv.append(size)
        qlib.qemu_img(*argv)
        if writes:
            qlib.qemu_io(p, *writes, fmt=fmt)
        out.append((name, p, fmt))
        return p

    std = ("write -P 0x11 0 8k", "write -P 0x22 70k 100k", "write -z 1M 128k",
           "write -P 0x33 3M 1k", "write -P 0 4M 64k", "discard 70k 64k", "write -P 0x44 8188k 4k")
    for cs in (512, 4096, 65536, 2 << 20):
        mk("cs%d.qcow2" % cs, "cluster_size=%d" % cs, "8M", std)
    for rb in (1, 16, 64):
        mk("rb%d.qcow2" % rb, "refcount_bits=%d" % rb, "8M", std)
    mk("v2.qcow2", "compat=0.10", "8M", std)
    mk("extl2.qcow2", "extended_l2=on,cluster_size=65536", "8M", std)
    mk("extl2-16k.qcow2", "extended_l2=on,cluster_size=16384", "8M", std)
    for pre in ("metadata", "falloc", "full"):
        mk("pre-%s.qcow2" % pre, "preallocation=" + pre, "4M", ("write -P 0x55 1M 4k",))
    mk("lazy.qcow2", "lazy_refcounts=on", "8M", std)
    src = mk("tocompress.qcow2", "", "8M", std)
    c = W("compressed.qcow2")
    qlib.qemu_img("convert", "-c", "-O", "qcow2", src, c)
    qlib.qemu_io(c, "write -P 0x77 2M 4k")
    out.append(("compressed.qcow2", c, "qcow2"))
    # a compressed cluster last: the file ends inside its last sector
    mk("compressed-last.qcow2", "", "8M", std + ("write -c -P 0x78 6M 64k",))
    snap = mk("snap.qcow2", "", "8M", std)
    qlib.qemu_img("snapshot", "-c", "one", snap)
    qlib.qemu_io(snap, "write -P 0x99 0 64k", "write -P 0x88 5M 64k")
    qlib.qemu_img("snapshot", "-c", "two", snap)
    qlib.qemu_io(snap, "write -P 0x66 64k 64k")
    # backing chain: raw base <- mid <- top
    base = W("base.raw")
    with open(base, "wb") as f:
        f.truncate(6 << 20)
    qlib.qemu_io(base, "write -P 0xb0 0 1M", "write -P 0xb1 5M 512", fmt="raw")
    out.append(("base.raw", base, "raw"))
    mid = mk("mid.qcow2", "", "8M", ("write -P 0xc0 512k 1M", "write -z 2M 64k"),
             backing="base.raw", bfmt="raw")
    mk("top.qcow2", "cluster_size=4096", None, ("write -P 0xd0 1M 8k", "write -z 3M 64k"),
       backing=os.path.basename(mid), bfmt="qcow2")
    # data_file
    mk("datafile.qcow2", "data_file=" + W("datafile.data"), "4M", ("write -P 0xe0 0 64k",))
    # Settle delayed allocation: SEEK_DATA/SEEK_HOLE answers (which map reports
    # for metadata-preallocated looking images) change when dirty pages are written back.
    os.sync()
    return out


def vqcow_info_json(path, fmt=None):
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return vimg_json(*(args + [path]))


def part_info():
    bad = []
    for name, path, fmt in corpus():
        q = qlib.qemu_info(path, fmt=fmt)
        v = vqcow_info_json(path)
        keys = ["format", "virtual-size", "cluster-size", "backing-filename",
                "backing-filename-format", "dirty-flag", "actual-size", "filename",
                "full-backing-filename"]
        for k in keys:
            if q.get(k) != v.get(k):
                bad.append("%s: %s: qemu-img %r, vqcow-img %r" % (name, k, q.get(k), v.get(k)))
        if "format-specific" in q:
            if q["format-specific"] != v.get("format-specific"):
                bad.append("%s: format-specific: qemu-img %r, vqcow-img %r"
                           % (name, q["format-specific"], v.get("format-specific")))
        qs = q.get("snapshots", [])
        vs = v.get("snapshots", [])
        if qs != vs:
            bad.append("%s: snapshots: qemu-img %r, vqcow-img %r" % (name, qs, vs))
        # human output mentions the essentials
        r = vimg("info", path)
        check(r.rc == 0, "info %s failed\n%s" % (name, r.describe()))
        for word in ("file format: " + q["format"], "virtual size:", "disk size:"):
            if word not in r.text:
                bad.append("%s: human info lacks %r:\n%s" % (name, word, r.text))
        if fmt == "qcow2":
            if "cluster_size: %d" % q["cluster-size"] not in r.text:
                bad.append("%s: human info lacks cluster_size:\n%s" % (name, r.text))
    # missing file / not a qcow2 with -f qcow2
    r = vimg("info", W("nonexistent.qcow2"))
    check(r.rc != 0 and r.errtext, "info on a missing file: rc %s" % r.rc)
    with open(W("zero.bin"), "wb") as f:
        f.write(bytes(65536))
    r = vimg("info", "-f", "qcow2", W("zero.bin"))
    check(r.rc != 0 and "qcow2" in r.errtext.lower(), "info -f qcow2 on a non-qcow2 file\n" + r.describe())
    check(not bad, "info mismatches:\n" + "\n".join(bad))
    log("info: all corpus images match qemu-img")


def part_map():
    bad = []
    import time
    for name, path, fmt in corpus():
        # Where QEMU consults the host file's holes (images that look
        # metadata-preallocated), ext4 may change its SEEK_HOLE answers while
        # unwritten extents are converted: accept a match with either of two
        # qemu-img runs around ours, and retry a few times.
        for attempt in range(4):
            q = json.loads(qlib.qemu_img("map", "--output=json", "-f", fmt, path).text)
            v = vimg_json("map", "--output=json", path)
            q2 = json.loads(qlib.qemu_img("map", "--output=json", "-f", fmt, path).text)
            if v in (q, q2):
                break
            time.sleep(0.5)
        if v not in (q, q2):
            lines = ["%s: qemu-img map and vqcow-img map differ" % name, " qemu-img:"]
            lines += ["  %r" % e for e in q]
            lines += [" vqcow-img:"] + ["  %r" % e for e in v]
            bad.append("\n".join(lines))
        r = vimg("map", path)
        if r.rc != 0:
            bad.append("%s: human map failed:\n%s" % (name, r.describe()))
    check(not bad, "\n".join(bad))
    log("map: all corpus images match qemu-img")


# ------------------------------------------------------------------ check

def check_pair(img, what, repair=None):
    """Run vqcow-img check and qemu-img check on copies; compare verdicts."""
    a = W("chk-v.qcow2")
    b = W("chk-q.qcow2")
    shutil.copyfile(img, a)
    shutil.copyfile(img, b)
    args = ["check", "--output=json"] + (["-r", repair] if repair else []) + [a]
    r = vimg(*args)
    qrc, qj, qr = qlib.qemu_check(b, repair=repair)
    if repair == "all":
        # -r all may repair more than qemu-img can (checked by the caller)
        return r.rc, a
    if r.rc != qrc:
        fail("%s: vqcow-img check -> %s, qemu-img check -> %s\nvqcow-img: %s\nqemu-img: %s"
             % (what, r.rc, qrc, r.describe(), qr.describe()))
    if r.rc == 1 and not qr.text.strip():
        return r.rc, a  # both failed without a result
    try:
        vj = json.loads(r.text)
    except ValueError:
        fail("%s: vqcow-img check printed invalid JSON\n%s" % (what, r.describe()))
    for k in ("corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed",
              "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters",
              "image-end-offset"):
        if repair and k == "image-end-offset":
            continue
        if qj.get(k, 0) != vj.get(k, 0):
            fail("%s: %s: qemu-img %r, vqcow-img %r\nvqcow-img: %s\nqemu-img: %s"
                 % (what, k, qj.get(k), vj.get(k), r.describe(), qr.describe()))
    return r.rc, a


def inject_cases():
    """[(name, fn(img_path) -> None)] — each gets a fresh copy of a filled image."""
    def with_img(fn):
        def run(p):
            with qcow2edit.Image(p) as im:
                fn(im)
        return run

    def leak_free_cluster(im):
        # grow the file by two clusters and give the first one a refcount
        end = im.file_size()
        end = (end + im.cluster_size - 1) // im.cluster_size * im.cluster_size
        with open(im.path, "r+b") as f:
            f.truncate(end + 2 * im.cluster_size)
        im.set_refcount(end, 1)

    def unlink_data(im):
        im.set_l2_entry(0, 0)
        if im.extl2:
            im.put_u64(im.l2_entry_addr(0) + 8, 0)

    def zero_data_refcount(im):
        im.set_refcount(im.host_cluster(0), 0)

    def bump_data_refcount(im):
        h = im.host_cluster(0)
        im.set_refcount(h, im.refcount(h) + 1)

    def zero_l2_refcount(im):
        im.set_refcount(im.l2_table_offset(0), 0)

    def zero_l1_refcount(im):
        im.set_refcount(im.h["l1_table_offset"], 0)

    def zero_reftable_refcount(im):
        im.set_refcount(im.h["refcount_table_offset"], 0)

    def zero_refblock_refcount(im):
        im.set_refcount(im.refblock_offset(0), 0)

    def zero_header_refcount(im):
        im.set_refcount(0, 0)

    def l2_points_at_l1(im):
        e = im.l2_entry(0)
        im.set_l2_entry(0, (e & ~qcow2edit.OFFSET_MASK) | im.h["l1_table_offset"])

    def l2_points_at_refblock(im):
        e = im.l2_entry(0)
        im.set_l2_entry(0, (e & ~qcow2edit.OFFSET_MASK) | im.refblock_offset(0))

    def l2_beyond_eof(im):
        e = im.l2_entry(0)
        far = (im.file_size() + 64 * im.cluster_size) // im.cluster_size * im.cluster_size
        im.set_l2_entry(0, (e & ~qcow2edit.OFFSET_MASK) | far)

    def l2_unaligned(im):
        e = im.l2_entry(0)
        im.set_l2_entry(0, e + 512)

    def clear_copied_l2(im):
        im.set_l2_entry(0, im.l2_entry(0) & ~qcow2edit.OFLAG_COPIED)

    def clear_copied_l1(im):
        im.set_l1_entry(0, im.l1_entry(0) & ~qcow2edit.OFLAG_COPIED)

    def set_copied_shared(im):
        # two L2 entries share one cluster, both claiming COPIED
        im.set_l2_entry(im.cluster_size, im.l2_entry(0))

    def dirty_with_leak(im):
        im.set_field("incompatible_features", im.h["incompatible_features"] | qcow2edit.INCOMPAT_DIRTY)
        leak_free_cluster(im)

    def dirty_with_low_refcount(im):
        im.set_field("incompatible_features", im.h["incompatible_features"] | qcow2edit.INCOMPAT_DIRTY)
        zero_data_refcount(im)

    def reftable_beyond_eof(im):
        im.put_u64(im.h["refcount_table_offset"], im.file_size() * 4 // im.cluster_size * im.cluster_size)

    def several(im):
        leak_free_cluster(im)
        zero_data_refcount(im)
        clear_copied_l1(im)

    return [(n, with_img(f)) for n, f in [
        ("clean", lambda im: None),
        ("leak-free-cluster", leak_free_cluster),
        ("leak-unlinked-data", unlink_data),
        ("refcount-zero-data", zero_data_refcount),
        ("refcount-bumped-data", bump_data_refcount),
        ("refcount-zero-l2", zero_l2_refcount),
        ("refcount-zero-l1", zero_l1_refcount),
        ("refcount-zero-reftable", zero_reftable_refcount),
        ("refcount-zero-refblock", zero_refblock_refcount),
        ("refcount-zero-header", zero_header_refcount),
        ("l2-points-at-l1", l2_points_at_l1),
        ("l2-points-at-refblock", l2_points_at_refblock),
        ("l2-beyond-eof", l2_beyond_eof),
        ("l2-unaligned", l2_unaligned),
        ("copied-clear-l2", clear_copied_l2),
        ("copied-clear-l1", clear_copied_l1),
        ("copied-shared", set_copied_shared),
        ("dirty-leak", dirty_with_leak),
        ("dirty-low-refcount", dirty_with_low_refcount),
        ("reftable-beyond-eof", reftable_beyond_eof),
        ("several", several),
    ]]


def check_bases():
    out = []
    writes = ("write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 5M 4k")
    for name, opts in (("64k", "cluster_size=65536"), ("4k-rb1", "cluster_size=4096,refcount_bits=1"),
                       ("v2", "compat=0.10"), ("extl2", "extended_l2=on"),
                       ("rb64", "refcount_bits=64,cluster_size=4096")):
        p = W("base-%s.qcow2" % name)
        qlib.qemu_img("create", "-f", "qcow2", "-o", opts, p, "8M")
        qlib.qemu_io(p, *writes)
        out.append((name, p))
    p = W("base-snap.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", p, "8M")
    qlib.qemu_io(p, *writes)
    qlib.qemu_img("snapshot", "-c", "s", p)
    qlib.qemu_io(p, "write -P 0x44 0 64k")
    out.append(("snap", p))
    c = W("base-comp.qcow2")
    qlib.qemu_img("convert", "-c", "-O", "qcow2", W("base-64k.qcow2"), c)
    out.append(("compressed", c))
    return out


def part_check():
    n = 0
    results = []
    for bname, base in check_bases():
        for cname, inject in inject_cases():
            if bname == "compressed" and cname not in ("clean", "leak-free-cluster",
                                                       "refcount-zero-l1", "refcount-zero-header",
                                                       "refcount-zero-refblock"):
                continue
            if bname == "v2" and cname.startswith("dirty"):
                continue  # version 2 has no dirty bit
            what = "%s/%s" % (bname, cname)
            img = W("inj.qcow2")
            shutil.copyfile(base, img)
            inject(img)
            ref = W("inj-ref.raw")
            # 1) plain check: same verdict and counts as qemu-img
            rc, _ = check_pair(img, what)
            if cname == "clean":
                check(rc == 0, "%s: clean image reported rc %s" % (what, rc))
            elif cname.startswith("leak") or cname == "dirty-leak":
                check(rc == 3, "%s: want exit 3 (leaks), got %s" % (what, rc))
            else:
                check(rc == 2, "%s: want exit 2 (corruptions), got %s" % (what, rc))
            # 2) -r leaks: leaks gone (qemu-img check shows no leaks afterwards)
            rc2, a = check_pair(img, what + " -r leaks", repair="leaks")
            if rc2 != 1:
                qrc, qj, qr = qlib.qemu_check(a)
                check(qj.get("leaks", 0) == 0, "%s: leaks remain after -r leaks\n%s"
                      % (what, qr.describe()))
            # 3) -r all: qemu-img check clean afterwards, data as QEMU reads it unchanged
            # (only where QEMU itself can read the damaged image consistently)
            rc3, a = check_pair(img, what + " -r all", repair="all")
            check(rc3 == 0, "%s: vqcow-img check -r all exit %s (want 0: repaired)" % (what, rc3))
            qrc, qj, qr = qlib.qemu_check(a)
            check(qrc == 0, "%s: qemu-img check not clean after vqcow-img check -r all\n%s"
                  % (what, qr.describe()))
            with qcow2edit.Image(a) as im:
                check(not im.h["incompatible_features"] & qcow2edit.INCOMPAT_DIRTY,
                      "%s: dirty bit still set after -r all" % what)
            if cname in ("refcount-zero-data", "refcount-bumped-data", "refcount-zero-l2",
                         "refcount-zero-refblock", "copied-clear-l2", "copied-clear-l1",
                         "leak-free-cluster", "dirty-leak", "clean"):
                qlib.qemu_to_raw(img, ref)
                r = qlib.qemu_compare(ref, a, fmt_a="raw", fmt_b="qcow2")
                check(r.rc == 0, "%s: -r all changed the guest data\n%s" % (what, r.describe()))
            # the human output tells what it found
            r = vimg("check", img)
            if rc == 3:
                check("leak" in r.text.lower(), "%s: human output does not mention leaks\n%s"
                      % (what, r.text))
            if rc == 2:
                check("error" in (r.text + r.errtext).lower(),
                      "%s: human output does not mention errors\n%s" % (what, r.describe()))
            results.append((what, rc))
            n += 1
    # exit 63: format without checks
    raw = W("plain.raw")
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
    r = vimg("check", raw)
    check(r.rc == 63, "check on a raw image: rc %s (want 63)\n%s" % (r.rc, r.describe()))
    r = vimg("check", W("nonexistent.qcow2"))
    check(r.rc == 1, "check on a missing file: rc %s (want 1)\n%s" % (r.rc, r.describe()))
    log("check: %d cases passed: %s" % (n, ", ".join("%s=%s" % x for x in results)))


def main():
    global A, W

    def extra(p):
        p.add_argument("--part", required=True, choices=["create", "info", "map", "check"])
    A = qlib.parse_args(extra)
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binary(A.img, "vqcow-img")
    wd = qlib.Workdir(os.path.join(A.workdir, A.part), A.keep)
    W = wd
    ok = False
    try:
        {"create": part_create, "info": part_info, "map": part_map, "check": part_check}[A.part]()
        ok = True
    finally:
        wd.cleanup(ok)


if __name__ == "__main__":
    qlib.main_wrapper(main)
