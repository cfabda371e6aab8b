#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Growing writes fill their new clusters whole (img/img_qcow2.c alloc_write).

vqcowd writes the first write of a new data cluster together with zeroes for
the rest of the cluster (clusters up to 256 KiB), so that the file system
holds the cluster as written blocks and later writes into it are overwrites,
not conversions of the unwritten extents that preallocation (fallocate) left.
With extended L2 entries the zeroes also cover the subclusters the write did
not touch. Over a backing file those stay unallocated in the L2 entry (they
read from the backing file whatever the host bytes are), exactly as QEMU
leaves them; with no backing file the cluster is linked with every
subcluster allocated (they read the zeroes just written, as they read
unallocated), so later writes into it are in place, with no L2 update.

For each image kind (64 KiB clusters, extended L2 with 2 KiB and 8 KiB
subclusters, both over a backing file, 512 KiB clusters that are not padded;
and with --no-cluster-fill, where data clusters must hold unwritten extents
and extended-L2 subclusters are allocated as written, backing file or not),
vqfe-stress writes 4 KiB blocks at queue depth 16 from two queues (every
cluster's blocks written by both queues at once, one block in eight never
written), through a fresh vqcowd, then:
  1. qemu-img check is clean;
  2. the image reads (qemu-img convert) exactly as vqfe-stress's map says:
     the pattern of each written block, the backing file (or zeroes) for the
     untouched ones, and qemu-img compare finds it equal to a raw file of
     that content;
  3. qemu-img map --output=json equals the map of the same writes done by
     qemu-io on a copy of the fresh image (host offsets left out: the two
     programs place clusters differently); for extended L2 with no backing
     file and the fill: the same clusters hold data, each of them whole in
     vqcowd's image (QEMU's are partly allocated);
  4. filefrag -v: no unwritten extent inside any host cluster that holds
     data (clusters of 256 KiB or less). A file system without FIEMAP
     (tmpfs: one run there) skips this step visibly, and only this step.
A run with --mix (write-zeroes and discards; clusters freed and reused, which
are then not fresh) checks 1 and 2.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
W = None
BS = 4096
SIZE = 8 << 20
PAD_MAX = 256 << 10
skipped = []


def stress(sock, seed, extra=()):
    r = qlib.run([A.stress, sock, "--size", str(SIZE), "--queues", "2", "--depth", "16",
                  "--rounds", "2", "--seed", str(seed), "--map", W("map")] + list(extra),
                 timeout=300)
    qlib.assert_sane_exit(r, "vqfe-stress")
    check(r.rc == 0, "vqfe-stress failed\n" + r.describe())
    with open(W("map")) as f:
        return [line.split() for line in f]


def expected_block(st, b, seed, base):
    if st[0] == "U":
        return base
    if st[0] == "Z":
        return bytes(BS)
    if st[0] == "W":
        r = int(st[1])
        m = (1 << 64) - 1
        return b"".join((((seed << 48) ^ (r << 32) ^ (b << 9) ^ i) & m).to_bytes(8, "little")
                        for i in range(BS // 8))
    return None  # discarded: unknown


def check_content(img, mp, seed, backing_raw, what):
    out, ref = W("out.raw"), W("ref.raw")
    qlib.qemu_img("convert", "-f", "qcow2", "-O", "raw", img, out)
    bad = 0
    known = True
    with open(out, "rb") as fo, open(ref, "wb") as fr:
        fb = open(backing_raw, "rb") if backing_raw else None
        for b, st in enumerate(mp):
            got = fo.read(BS)
            base = fb.read(BS) if fb else bytes(BS)
            want = expected_block(st, b, seed, base)
            fr.write(want if want is not None else got)
            known = known and want is not None
            if want is not None and got != want:
                bad += 1
                if bad <= 5:
                    log("%s: block %d (%s) reads wrong" % (what, b, " ".join(st)))
        if fb:
            fb.close()
    os.unlink(out)
    check(bad == 0, "%s: %d blocks read wrong" % (what, bad))
    if known:
        # QEMU's own comparison against a raw file of the expected content
        r = qlib.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref], timeout=120)
        check(r.rc == 0, "%s: qemu-img compare against the expected content: rc %s\n%s"
              % (what, r.rc, r.describe()))
    os.unlink(ref)


def data_clusters(img, cs):
    """{guest cluster: bytes qemu-img map reports as data in it}."""
    out = {}
    for e in json.loads(qlib.qemu_img("map", "--output=json", "-f", "qcow2", img).text):
        if not e.get("data"):
            continue
        a, end = e["start"], e["start"] + e["length"]
        while a < end:
            c = a // cs
            n = min(end, (c + 1) * cs) - a
            out[c] = out.get(c, 0) + n
            a += n
    return out


def check_whole_map(img, fresh, cs, what):
    """Extended L2, no backing file, whole-cluster fill: every cluster vqcowd
    wrote is allocated whole (all its subclusters data), and they are exactly
    the clusters QEMU's replay of the same writes allocated."""
    mine, qemu = data_clusters(img, cs), data_clusters(fresh, cs)
    part = [c for c, n in mine.items() if n != cs]
    check(not part, "%s: %d clusters only partly allocated (cluster %s: %d of %d bytes): the "
          "whole-cluster first write should allocate every subcluster"
          % (what, len(part), part[:1], mine[part[0]] if part else 0, cs))
    check(sorted(mine) == sorted(qemu), "%s: clusters with data differ from QEMU's: %d against "
          "%d" % (what, len(mine), len(qemu)))
    check(any(n != cs for n in qemu.values()),
          "%s: QEMU's replay allocated only whole clusters: the test lost its point" % what)
    log("%s: %d clusters, each allocated whole (QEMU's replay: %d of them partly)"
        % (what, len(mine), sum(1 for n in qemu.values() if n != cs)))


def norm_map(img):
    """qemu-img map without host offsets, adjacent equal entries merged."""
    js = json.loads(qlib.qemu_img("map", "--output=json", "-f", "qcow2", img).text)
    out = []
    for e in js:
        e = {k: v for k, v in e.items() if k != "offset"}
        if out and all(out[-1][k] == e[k] for k in e if k not in ("start", "length")) \
                and out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


def qemu_replay(img, mp):
    """The written blocks of @mp written by qemu-io, runs coalesced."""
    cmds = []
    b = 0
    while b < len(mp):
        if mp[b][0] != "W":
            b += 1
            continue
        e = b
        while e < len(mp) and mp[e][0] == "W":
            e += 1
        cmds.append("write -P 0x5a %d %d" % (b * BS, (e - b) * BS))
        b = e
    for i in range(0, len(cmds), 200):
        args = []
        for c in cmds[i:i + 200]:
            args += ["-c", c]
        r = qlib.run(["qemu-io", "-f", "qcow2", "-t", "none"] + args + [img], timeout=120)
        check(r.rc == 0 and "error" not in r.text.lower(), "qemu-io replay failed\n" + r.describe())


def extents(path):
    """(block size, [(first byte, end byte, unwritten)]) from filefrag -v, or None."""
    r = qlib.run(["filefrag", "-v", path])
    if r.rc != 0 or "extents found" not in r.text and "extent found" not in r.text:
        return None
    bsz = None
    ext = []
    for line in r.text.splitlines():
        if "blocks of" in line:
            bsz = int(line.split("blocks of")[1].split()[0])
        p = line.split(":")
        if len(p) >= 4 and p[0].strip().isdigit():
            lo, hi = (int(x.strip()) for x in p[1].split(".."))
            ext.append((lo, hi + 1, "unwritten" in line))
    check(bsz is not None, "filefrag -v printed no block size\n" + r.text)
    return [(lo * bsz, hi * bsz, u) for lo, hi, u in ext]


def check_extents(img, cs, what, fill=True):
    ext = extents(img)
    if ext is None:
        fs = qlib.run(["stat", "-f", "-c", "%T", img]).text.strip()
        msg = "%s: extent check skipped: filefrag -v does not work on %s" % (what, fs)
        log("SKIP (part): " + msg)
        skipped.append(msg)
        return
    clusters = set()
    for e in json.loads(qlib.qemu_img("map", "--output=json", "-f", "qcow2", img).text):
        if e.get("data") and e.get("depth") == 0 and "offset" in e:
            c = e["offset"] // cs * cs
            while c < e["offset"] + e["length"]:
                clusters.add(c)
                c += cs
    check(clusters, "%s: no data cluster in the map" % what)
    bad = [c for c in sorted(clusters)
           if any(u and lo < c + cs and c < hi for lo, hi, u in ext)]
    log("%s: %d data clusters, %d extents (%d unwritten), %d data clusters with unwritten "
        "blocks" % (what, len(clusters), len(ext), sum(1 for e in ext if e[2]), len(bad)))
    if fill:
        check(not bad, "%s: %d data clusters hold unwritten extents (first at host 0x%x): "
              "their first write did not fill them" % (what, len(bad), bad[0] if bad else 0))
    else:
        check(bad, "%s: --no-cluster-fill, yet no data cluster holds an unwritten extent" % what)


def one(name, opts, backing, seed, mix=False, workdir=None, fill=True):
    wd = workdir or W.path
    img = os.path.join(wd, name + ".qcow2")
    cs = int(dict(o.split("=") for o in opts.split(",") if "=" in o).get("cluster_size", 65536))
    create = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        create += ["-b", backing, "-F", "raw"]
    qlib.qemu_img(*(create + [img, str(SIZE)]))
    fresh = img + ".qemu"
    subprocess.run(["cp", img, fresh], check=True)
    sock = W(name + ".sock")
    d = qlib.Daemon(A.vqcowd, img, sock, ["--format", "qcow2", "--num-queues", "2"] +
                    ([] if fill else ["--no-cluster-fill"]))
    check(d.start(), "vqcowd did not start\n" + d.log())
    with qlib.killed_on_error(d):
        mp = stress(sock, seed, ["--mix"] if mix else [])
        d.assert_clean_stop()
    what = name + (" (--mix)" if mix else "") + ("" if fill else " (--no-cluster-fill)")
    qlib.assert_qemu_check_clean(img, what)
    check_content(img, mp, seed, backing, what)
    xl2 = "extended_l2=on" in opts
    if not mix:
        qemu_replay(fresh, mp)
        a, b = norm_map(img), norm_map(fresh)
        if xl2 and not backing and fill and cs <= PAD_MAX:
            # written whole, linked whole (qcow2/mapping.c qcow2_alloc_finish):
            # the map differs from QEMU's subcluster-granular one by design
            check_whole_map(img, fresh, cs, what)
        elif a != b:
            fail("%s: qemu-img map differs from QEMU's for the same writes\nvqcowd: %s\nqemu:   %s"
                 % (what, json.dumps(a)[:3000], json.dumps(b)[:3000]))
        else:
            log("%s: qemu-img map equals QEMU's (%d entries)" % (what, len(a)))
        if cs <= PAD_MAX:
            check_extents(img, cs, what, fill)
    os.unlink(fresh)
    os.unlink(img)


def main():
    global A, W
    A = qlib.parse_args(lambda p: p.add_argument("--stress", default=""))
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binary(A.vqcowd, "vqcowd")
    qlib.need_binary(A.stress, "vqfe-stress")
    W = qlib.Workdir(A.workdir, A.keep)
    ok = False
    try:
        base = W("base.raw")
        with open(base, "wb") as f:
            for b in range(SIZE // BS):
                f.write(bytes([(b * 7 + 13) & 0xff]) * 2048 + bytes([(b * 3 + 1) & 0xff]) * 2048)
        one("std64k", "cluster_size=65536", None, 21)
        one("xl2-64k", "cluster_size=65536,extended_l2=on", None, 22)
        one("xl2-256k", "cluster_size=262144,extended_l2=on", None, 23)
        one("std64k-backing", "cluster_size=65536", base, 24)
        one("xl2-64k-backing", "cluster_size=65536,extended_l2=on", base, 25)
        one("xl2-256k-backing", "cluster_size=262144,extended_l2=on", base, 26)
        one("std512k", "cluster_size=524288", None, 27)
        one("std64k", "cluster_size=65536", None, 31, fill=False)
        one("xl2-64k", "cluster_size=65536,extended_l2=on", base, 32, fill=False)
        one("xl2-64k-nobacking", "cluster_size=65536,extended_l2=on", None, 33, fill=False)
        one("std64k", "cluster_size=65536", base, 28, mix=True)
        one("xl2-64k", "cluster_size=65536,extended_l2=on", base, 29, mix=True)
        # a file system without unwritten extents (nor FIEMAP): tmpfs
        shm = "/dev/shm"
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and \
                qlib.run(["stat", "-f", "-c", "%T", shm]).text.strip() == "tmpfs":
            tdir = os.path.join(shm, "vqcow-growfill-%d" % os.getpid())
            os.makedirs(tdir)
            try:
                one("xl2-64k-tmpfs", "cluster_size=65536,extended_l2=on", base, 30,
                    workdir=tdir)
            finally:
                subprocess.run(["rm", "-rf", tdir])
        else:
            msg = "no writable tmpfs at /dev/shm: the run on tmpfs is skipped"
            log("SKIP (part): " + msg)
            skipped.append(msg)
        for s in skipped:
            log("skipped: " + s)
        ok = True
    finally:
        W.cleanup(ok)


if __name__ == "__main__":
    qlib.main_wrapper(main)
