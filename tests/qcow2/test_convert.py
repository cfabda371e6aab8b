#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vqcow-img convert against qemu-img as the oracle.

For each source (raw with holes and zero-filled data, a qcow2 chain with
compressed, zero and extended-L2 clusters over a raw and a qcow2 backing file,
an odd-sized raw file) and each output (raw, qcow2 with several -o option
sets, -c with zlib and zstd, -c with refcount_bits=1 so compressed clusters
cannot share a host cluster):
  - qemu-img compare says the source and our output are identical;
  - qemu-img check is clean on every qcow2 output, and -c outputs hold
    compressed clusters and are smaller than the uncompressed output;
  - the output stays sparse: qemu-img map of our output and of qemu-img
    convert's output with the same options agree on which ranges are data
    (zero detection), and qemu-img info agrees on the format fields;
  - raw output: no more blocks allocated than qemu-img's own output.
-l converts an internal snapshot as qemu-img -l does. Then -p prints qemu-img's "    (NN.NN/100%)" lines (and -q nothing), the
source's lock is respected (-U overrides it), a locked destination is refused,
-S 0 allocates everything, and invalid invocations fail with a message.
"""

import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, log  # noqa: E402

A = None
W = None
MiB = 1 << 20


def vimg(*args, timeout=300):
    return qlib.vqcow_img(A.img, *args, timeout=timeout)


def vimg_ok(*args):
    r = vimg(*args)
    check(r.rc == 0, "vqcow-img failed:\n" + r.describe())
    return r


def io(img, fmt, *cmds):
    qlib.qemu_io(img, *cmds, fmt=fmt)


def make_sources():
    """[(name, path, fmt)]"""
    out = []
    # raw: data, a hole, data that is all zeroes, a partial last cluster
    raw = W("src.raw")
    with open(raw, "wb") as f:
        f.truncate(24 * MiB + 3 * 512)
    io(raw, "raw", "write -P 0x11 0 1M", "write -P 0 2M 1M", "write -P 0x22 5M 4k",
       "write -P 0x23 5308416 512", "write -P 0x33 24M 1536")
    out.append(("raw", raw, "raw"))
    # a qcow2 chain: raw base <- qcow2 mid (compressed + zero clusters) <- extl2 top
    base = W("chain-base.raw")
    with open(base, "wb") as f:
        f.truncate(16 * MiB)
    io(base, "raw", "write -P 0x41 0 4M", "write -P 0x42 12M 1M")
    plain = W("chain-mid-plain.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", plain, "16M")
    io(plain, "qcow2", "write -P 0x51 1M 2M", "write -P 0x52 8M 1M")
    mid = W("chain-mid.qcow2")
    # compressed clusters by qemu-img itself, then re-parented onto the raw base
    qlib.qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=16384", plain, mid)
    qlib.qemu_img("rebase", "-u", "-b", os.path.basename(base), "-F", "raw", mid)
    io(mid, "qcow2", "write -z 3M 64k", "write -P 0x53 10M 32k")
    top = W("chain-top.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=131072",
                  "-b", os.path.basename(mid), "-F", "qcow2", top, "20M")
    io(top, "qcow2", "write -P 0x61 0 4k", "write -P 0x62 12591104 8k", "write -z 8M 128k",
       "write -P 0x63 18M 1M")
    out.append(("chain", top, "qcow2"))
    # zstd-compressed qcow2 with 4k clusters
    z = W("src-zstd.qcow2")
    qlib.qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4096",
                  plain, z)
    out.append(("zstd", z, "qcow2"))
    # odd size (rounded up to a sector by both tools)
    odd = W("src-odd.raw")
    with open(odd, "wb") as f:
        f.write(os.urandom(100000) + b"\0" * 5000 + b"\x7f" * 33)
    out.append(("odd", odd, "raw"))
    return out


OUTPUTS = [
    # name, -O, extra args
    ("raw", "raw", []),
    ("qcow2", "qcow2", []),
    ("qcow2-4k-rb1-extl2", "qcow2", ["-o", "cluster_size=16384,refcount_bits=1,extended_l2=on"]),
    ("qcow2-v2-512", "qcow2", ["-o", "compat=0.10,cluster_size=512"]),
    # a refcount table that must grow past the one create wrote (64 blocks of 64 clusters)
    ("qcow2-512-rb64", "qcow2", ["-o", "cluster_size=512,refcount_bits=64"]),
    ("zlib", "qcow2", ["-c"]),
    ("zstd", "qcow2", ["-c", "-o", "compression_type=zstd"]),
    ("zlib-rb1-4k", "qcow2", ["-c", "-o", "refcount_bits=1,cluster_size=4096"]),
]


def data_ranges(img, fmt):
    """[(start, length)] of the ranges qemu-img map says hold data (merged)."""
    js = json.loads(qlib.qemu_img("map", "--output=json", "-f", fmt, img).text)
    out = []
    for e in js:
        if not e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


def info_fields(img):
    js = qlib.qemu_info(img)
    spec = js.get("format-specific", {}).get("data", {})
    return (js["format"], js["virtual-size"], js.get("cluster-size"),
            tuple(sorted((k, v) for k, v in spec.items())))


def allocated(path):
    return os.stat(path).st_blocks * 512


def one_case(sname, src, sfmt, oname, ofmt, extra, sizes):
    ours = W("out-%s-%s.%s" % (sname, oname, ofmt))
    theirs = W("qout-%s-%s.%s" % (sname, oname, ofmt))
    vimg_ok("convert", "-f", sfmt, "-O", ofmt, *extra, src, ours)
    r = qlib.qemu_compare(src, ours, fmt_a=sfmt, fmt_b=ofmt)
    check(r.rc == 0, "qemu-img compare: source and output differ\n" + r.describe())
    qlib.qemu_img("convert", "-f", sfmt, "-O", ofmt, *extra, src, theirs, timeout=300)
    if ofmt == "qcow2":
        js = qlib.assert_qemu_check_clean(ours, "(convert output)")
        if "-c" in extra and sname != "odd":
            check(js.get("compressed-clusters", 0) > 0,
                  "no compressed clusters in a -c output: %s" % js)
        check(info_fields(ours) == info_fields(theirs),
              "qemu-img info differs from qemu-img convert's output:\n%s\n%s"
              % (info_fields(ours), info_fields(theirs)))
        sizes[(sname, oname)] = os.path.getsize(ours)
    else:
        # raw: at most what qemu-img allocates (plus one 4k block of slack per MiB)
        check(allocated(ours) <= allocated(theirs) + os.path.getsize(ours) // 256,
              "raw output less sparse than qemu-img's: %d vs %d bytes allocated"
              % (allocated(ours), allocated(theirs)))
        check(os.path.getsize(ours) == os.path.getsize(theirs),
              "raw output size %d, qemu-img's %d" % (os.path.getsize(ours), os.path.getsize(theirs)))
    # zero detection: the same ranges are data as in qemu-img's output
    if "-c" not in extra:
        a, b = data_ranges(ours, ofmt), data_ranges(theirs, ofmt)
        if ofmt == "raw" and b and b[0][0] == 0 and (not a or a[0][0] != 0):
            # qemu's file driver writes the first 4 KiB of every new raw file
            b[0] = (4096, b[0][1] - 4096)
            b = [x for x in b if x[1] > 0]
        check(a == b, "data ranges differ from qemu-img convert's:\nours   %s\nqemu's %s" % (a, b))


def part_matrix():
    sizes = {}
    cases = []
    for sname, src, sfmt in make_sources():
        for oname, ofmt, extra in OUTPUTS:
            cases.append(("%s->%s" % (sname, oname), sname, src, sfmt, oname, ofmt, extra))
    failed = qlib.run_cases(cases, lambda name, *a: one_case(*a, sizes))
    check(not failed, "failed: %s" % failed)
    for sname in ("chain", "raw"):
        for c in ("zlib", "zstd"):
            check(sizes[(sname, c)] < sizes[(sname, "qcow2")],
                  "%s -c %s output (%d) not smaller than uncompressed (%d)"
                  % (sname, c, sizes[(sname, c)], sizes[(sname, "qcow2")]))
    log("matrix: %d conversions identical to their source" % len(cases))


def part_compressible():
    """A compressible, non-trivial image: -c output readable, much smaller."""
    src = W("text.raw")
    words = b" ".join(b"word%d" % (i * 7919 % 1000) for i in range(2 * MiB // 6))
    with open(src, "wb") as f:
        f.write(words[:8 * MiB // 2] * 2)
    for c in ("zlib", "zstd"):
        out = W("text-%s.qcow2" % c)
        t = time.monotonic()
        vimg_ok("convert", "-c", "-O", "qcow2", "-o", "compression_type=" + c, src, out)
        dt = time.monotonic() - t
        check(qlib.qemu_compare(src, out, "raw", "qcow2").rc == 0, "%s: -c output differs" % c)
        qlib.assert_qemu_check_clean(out, "(-c %s)" % c)
        check(os.path.getsize(out) * 3 < os.path.getsize(src),
              "%s: %d bytes for %d compressible bytes" % (c, os.path.getsize(out),
                                                          os.path.getsize(src)))
        # and back through our own decompressor
        back = W("text-%s.raw" % c)
        vimg_ok("convert", "-O", "raw", out, back)
        check(qlib.qemu_compare(src, back, "raw", "raw").rc == 0, "%s: round trip differs" % c)
        log("PASS -c %s: %d -> %d bytes in %.2fs" % (c, os.path.getsize(src),
                                                     os.path.getsize(out), dt))


def part_cli():
    src = W("cli.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", src, "8M")
    qlib.qemu_io(src, "write -P 0x5a 0 3M", fmt="qcow2")
    out = W("cli.raw")
    # -p: qemu-img's progress lines on stdout, from 0 to 100, then a newline
    r = vimg_ok("convert", "-p", "-O", "raw", src, out)
    check(re.fullmatch(r"(    \(\d{1,3}\.\d\d/100%\)\r)+\n", r.text) is not None,
          "-p output is not qemu-img's format: %r" % r.text)
    steps = re.findall(r"\((\d+\.\d\d)/100%\)", r.text)
    check(steps[0] == "0.00" and steps[-1] == "100.00", "-p steps %s" % steps)
    r = vimg_ok("convert", "-p", "-q", "-O", "raw", src, out)
    check(r.text == "", "-p -q printed %r" % r.text)
    r = vimg_ok("check", "-p", src)
    check(r.text.startswith("    (0.00/100%)\r") and "(100.00/100%)\r\n" in r.text
          and "No errors were found" in r.text, "check -p output %r" % r.text)
    # -S 0: every byte written, also the zeroes
    vimg_ok("convert", "-S", "0", "-O", "raw", src, out)
    check(allocated(out) >= 8 * MiB, "-S 0: only %d bytes allocated" % allocated(out))
    full = W("cli-full.qcow2")
    vimg_ok("convert", "-S", "0", "-O", "qcow2", src, full)
    check(data_ranges(full, "qcow2") == [(0, 8 * MiB)], "-S 0 qcow2: %s" % data_ranges(full, "qcow2"))
    # errors
    for args, what in ((["-c", "-O", "raw", src, out], "-c to raw"),
                       (["-O", "vmdk", src, out], "unknown output format"),
                       (["-O", "qcow2", "-o", "size=1M", src, out], "size option"),
                       (["-O", "qcow2", "-o", "backing_file=x", src, out], "backing_file"),
                       (["-O", "qcow2", W("missing.qcow2"), out], "missing source"),
                       (["-O", "qcow2", src, src], "source = destination"),
                       (["-S", "1000", src, out], "-S not a multiple of 512"),
                       (["-O", "raw", src], "one file name")):
        r = vimg("convert", *args)
        check(r.rc == 1 and r.errtext.strip(), "%s: rc %s (want 1 and a message)\n%s"
              % (what, r.rc, r.describe()))
    check(qlib.qemu_compare(src, src).rc == 0, "the source was damaged by a refused convert")
    # locks: a writer holds the source (qemu-io) -> refused; -U reads it anyway
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", src], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not qlib.image_locked(src):
            check(time.monotonic() < deadline, "qemu-io did not lock the image")
            time.sleep(0.02)
        r = vimg("convert", "-O", "raw", src, out)
        check(r.rc == 1 and "lock" in r.errtext, "convert of a locked source: %s" % r.describe())
        vimg_ok("convert", "-U", "-O", "raw", src, out)
        # a destination in use is refused and left alone
        r = vimg("convert", "-O", "raw", out, src)
        check(r.rc == 1 and "lock" in r.errtext, "convert onto a locked image: %s" % r.describe())
    finally:
        p.stdin.close()
        p.wait(10)
    check(qlib.qemu_compare(src, out, "qcow2", "raw").rc == 0, "-U output differs")
    # while a convert runs: the source refuses a writer, the destination is locked
    big = W("big.raw")
    with open(big, "wb") as f:
        f.write(os.urandom(48 * MiB))
    dst = W("big.qcow2")
    p = subprocess.Popen([A.img, "convert", "-c", "-O", "qcow2", big, dst],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(dst) and qlib.image_locked(dst)):
            check(p.poll() is None, "convert ended before its locks could be seen")
            check(time.monotonic() < deadline, "the destination was never locked")
            time.sleep(0.005)
        r = qlib.run(["qemu-io", "-f", "raw", "-c", "write 0 512", big])
        busy = p.poll() is None
        check(not busy or (r.rc != 0 or "lock" in (r.text + r.errtext)),
              "qemu-io wrote the source while convert read it:\n" + r.describe())
        r2 = qlib.run(["qemu-io", "-f", "qcow2", "-c", "read 0 512", dst])
        check(not busy or p.poll() is not None or "lock" in (r2.text + r2.errtext),
              "qemu-io opened the destination while convert wrote it:\n" + r2.describe())
    finally:
        _, err = p.communicate(timeout=300)
    check(p.returncode == 0, "convert -c of 48 MiB failed: %s" % err.decode(errors="replace"))
    check(qlib.qemu_compare(big, dst, "raw", "qcow2").rc == 0, "48 MiB -c output differs")
    log("PASS cli: -p, -q, -S 0, errors, locks (also while convert runs: %s)"
        % ("seen" if busy else "convert was too fast to see them"))


def part_snapshot():
    """-l: an internal snapshot instead of the current state, as qemu-img -l."""
    img = W("snap.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", img, "16M")
    qlib.qemu_io(img, "write -P 1 0 2M", fmt="qcow2")
    qlib.qemu_img("snapshot", "-c", "s1", img)
    qlib.qemu_io(img, "write -P 2 1M 2M", "write -P 3 10M 64k", fmt="qcow2")
    qlib.qemu_img("snapshot", "-c", "s2", img)
    qlib.qemu_io(img, "write -z 0 4M", "write -P 4 12M 1M", fmt="qcow2")
    for sel in ("s1", "1", "snapshot.name=s2", "snapshot.id=2,snapshot.name=s2", "snapshot.id=1"):
        theirs = W("snap-q.raw")
        qlib.qemu_img("convert", "-l", sel, "-O", "raw", img, theirs)
        for ofmt in ("raw", "qcow2"):
            ours = W("snap-v." + ofmt)
            vimg_ok("convert", "-l", sel, "-O", ofmt, img, ours)
            r = qlib.qemu_compare(theirs, ours, "raw", ofmt)
            check(r.rc == 0, "-l %s -O %s differs from qemu-img -l\n%s" % (sel, ofmt, r.describe()))
    for sel in ("nosuch", "snapshot.id=1,snapshot.name=s2", "snapshot.foo=1"):
        r = vimg("convert", "-l", sel, img, W("x.raw"))
        check(r.rc == 1 and r.errtext.strip(), "-l %s: rc %s\n%s" % (sel, r.rc, r.describe()))
    r = vimg("convert", "-l", "s1", W("src.raw"), W("x.raw"))
    check(r.rc == 1, "-l on a raw source: rc %s" % r.rc)
    log("PASS -l: snapshots by name, id and both, as qemu-img -l")


def main():
    return qlib.vqcow_img_test(globals(), "convert", part_matrix, part_compressible,
                               part_cli, part_snapshot)


if __name__ == "__main__":
    qlib.main_wrapper(main)
