#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""vqcow-img commit against qemu-img commit as the oracle.

Every case builds the same chain twice (relative backing names, so the
headers are equal) and commits one copy with vqcow-img, the other with
qemu-img, with the same arguments:
  - the same exit status, stdout ("Image committed.", nothing with -q, -p's
    progress line from 0.00 to 100.00) and error text (after the program's
    name);
  - the top image byte for byte identical afterwards: emptied as QEMU
    empties a qcow2 image (header kept, refcount table, one refcount block,
    an empty L1 table, the file cut after it), or unchanged with -d and -b;
    qemu-img map of it the same (everything from the backing file);
  - the base: qemu-img compare identical to qemu-img's, qemu-img map the
    same but for host offsets (a raw base: byte for byte identical), grown
    like qemu-img's when the top is larger, qemu-img check clean, its file
    and its blocks on disk at most 2 MiB larger than qemu-img's (no unused
    preallocated tail, no reserve left fallocated).
Cases: qcow2 base; raw base; compressed, zero, partial and unallocated
clusters in the top; extended L2 (subclusters) in both; a top larger than
its base; -d; -b with a 3-layer chain (implies -d; the middle layer
unchanged); -r (and that -r 2M takes about 2 s for 4 MiB); -t none.
Tops QEMU cannot rebuild (internal snapshots, also with 4 KiB clusters and
several L2 tables; persistent bitmaps, one enabled and one disabled; an
external data file; version 2) are emptied by a full discard, as QEMU's
qcow2_make_empty falls back to: the top's map the same as qemu-img's and
all from the base, top and base check clean, chains, bases and top vs base
compared identical, the snapshots still there and reading as qemu-img's
(convert -l), the bitmaps listed the same with the same dirty bits
(qemu-nbd -B) as before the commit.
Refusals as qemu-img's: no backing file, -b not in the chain, the top or
the base locked by a running qemu-io (qemu's lock message), and by a
running vqcowd serving the top or the base.
"""

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, log, tool_error as msg  # noqa: E402

A = None
W = None
MiB = 1 << 20


def build(name, base_fmt="qcow2", base_size="16M", top_size=None, opts="", writes=(),
          base_writes=(), mid=False):
    """The chain in W/name/ours and W/name/qemu: (dir ours, dir qemu)."""
    dirs = []
    for who in ("ours", "qemu"):
        d = W(os.path.join(name, who))
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        b = os.path.join(d, "b." + base_fmt)
        qlib.qemu_img("create", "-q", "-f", base_fmt, *(["-o", opts] if opts and
                                                         base_fmt == "qcow2" else []),
                      b, base_size)
        for wr in base_writes:
            qlib.qemu_io(b, wr, fmt=base_fmt)
        below, bfmt = "b." + base_fmt, base_fmt
        if mid:
            m = os.path.join(d, "m.qcow2")
            qlib.qemu_img("create", "-q", "-f", "qcow2", "-b", below, "-F", bfmt, m)
            qlib.qemu_io(m, "write -P 0x4d 3M 1M", fmt="qcow2")
            below, bfmt = "m.qcow2", "qcow2"
        t = os.path.join(d, "t.qcow2")
        args = ["create", "-q", "-f", "qcow2", "-b", below, "-F", bfmt]
        if opts:
            args += ["-o", opts]
        args += [t] + ([top_size] if top_size else [])
        subprocess.run(["qemu-img"] + args, cwd=d, check=True)
        for wr in writes:
            qlib.qemu_io(t, wr, fmt="qcow2")
        dirs.append(d)
    return dirs


def commit(tool, d, args):
    argv = ([A.img, "commit"] if tool == "ours" else ["qemu-img", "commit"]) + args + \
        [os.path.join(d, "t.qcow2")]
    r = qlib.run(argv, timeout=300)
    if tool == "ours":
        qlib.assert_sane_exit(r, "vqcow-img commit")
    return r


def qmap(path, fmt=None):
    r = qlib.run(["qemu-img", "map", "-U", "--output=json"] + (["-f", fmt] if fmt else []) +
                 [path])
    check(r.rc == 0, r.describe())
    out = []
    for e in json.loads(r.text):
        e = {k: v for k, v in e.items() if k != "offset"}
        p = out[-1] if out else None
        if p and all(p[k] == e[k] for k in e if k not in ("start", "length")) and \
                p["start"] + p["length"] == e["start"]:
            p["length"] += e["length"]  # split only by host offsets
        else:
            out.append(e)
    return out


def progress_ok(out):
    s = out.decode()
    return s.startswith("    (0.00/100%)\r") and s.endswith("    (100.00/100%)\r\n"
                                                            "Image committed.\n")


def same(name, dirs, args, base_fmt="qcow2", top_kept=False):
    do, dq = dirs
    before = open(os.path.join(do, "t.qcow2"), "rb").read()
    ro, rq = commit("ours", do, args), commit("qemu", dq, args)
    check(ro.rc == rq.rc, "%s: exit %d, qemu-img %d\n%s\n%s" % (name, ro.rc, rq.rc,
                                                             ro.describe(), rq.describe()))
    if "-p" in args and rq.rc == 0:
        check(progress_ok(ro.out) and progress_ok(rq.out),
              "%s: progress %r, qemu-img %r" % (name, ro.out[-80:], rq.out[-80:]))
    else:
        check(ro.out == rq.out, "%s: stdout %r, qemu-img %r" % (name, ro.out, rq.out))
    if rq.rc:
        mo, mq = msg(ro).replace(do, "D"), msg(rq).replace(dq, "D")
        check(mo == mq, "%s: %r, qemu-img %r" % (name, mo, mq))
        check(open(os.path.join(do, "t.qcow2"), "rb").read() == before,
              "%s: a refused commit changed the top" % name)
        return ro
    to, tq = (open(os.path.join(x, "t.qcow2"), "rb").read() for x in (do, dq))
    check(to == tq, "%s: the top images differ (sizes %d, %d; first difference at %d)" %
          (name, len(to), len(tq), next((i for i in range(min(len(to), len(tq)))
                                         if to[i] != tq[i]), min(len(to), len(tq)))))
    if top_kept:
        check(to == before, "%s: the top changed (-d)" % name)
    b = "b." + base_fmt
    bo, bq = os.path.join(do, b), os.path.join(dq, b)
    c = qlib.run(["qemu-img", "compare", "-f", base_fmt, "-F", base_fmt, bo, bq])
    check(c.rc == 0, "%s: bases differ: %s" % (name, c.text))
    if base_fmt == "raw":
        check(open(bo, "rb").read() == open(bq, "rb").read(),
              "%s: the raw bases are not byte for byte identical" % name)
    else:
        qlib.assert_qemu_check_clean(bo, name + " base")
        # The engine's unused preallocation (up to 64 MiB) is given back at
        # close. The slack: qemu-img reuses the base clusters the top's
        # zeroed 1M frees at once (and not always: its size varies by a
        # cluster between runs); the engine reuses freed clusters only once
        # their release is durable, so ours ends up to 1 MiB + 1 cluster on.
        check(os.path.getsize(bo) <= os.path.getsize(bq) + 2 * MiB,
              "%s: our base is %d bytes, qemu-img's %d" % (name, os.path.getsize(bo),
                                                          os.path.getsize(bq)))
        # and on disk: no reserve left fallocated below the end either
        ko, kq = (os.stat(x).st_blocks * 512 for x in (bo, bq))
        check(ko <= kq + 2 * MiB, "%s: our base takes %d bytes on disk, qemu-img's %d" %
              (name, ko, kq))
        check(qmap(bo) == qmap(bq), "%s: base maps differ:\n%r\n%r" % (name, qmap(bo),
                                                                     qmap(bq)))
    check(qmap(os.path.join(do, "t.qcow2")) == qmap(os.path.join(dq, "t.qcow2")),
          "%s: top maps differ" % name)
    qlib.assert_qemu_check_clean(os.path.join(do, "t.qcow2"), name + " top")
    c = qlib.run(["qemu-img", "compare", os.path.join(do, "t.qcow2"),
                  os.path.join(dq, "t.qcow2")])
    check(c.rc == 0, "%s: the chains read differently: %s" % (name, c.text))
    return ro


TOP_WRITES = ("write -P 0x11 0 1M", "write -z 2M 1M", "write -c -P 0x22 5M 64k",
              "write -P 0x33 100k 3k", "write -P 0x44 7M 2M")
BASE_WRITES = ("write -P 0x99 0 4M", "write -c -P 0x77 8M 64k")


def test_cases():
    cases = [
        ("qcow2", {}, []),
        ("quiet", {}, ["-q"]),
        ("progress", {}, ["-p"]),
        ("rate", {}, ["-r", "64M"]),
        ("cache-none", {}, ["-t", "none"]),
        ("raw-base", {"base_fmt": "raw"}, []),
        ("extl2", {"opts": "extended_l2=on",
                   "writes": TOP_WRITES + ("write -P 0x55 12M 4k", "write -z 12M 2k")}, []),
        ("grow", {"top_size": "32M", "writes": TOP_WRITES + ("write -P 0x66 20M 1M",)}, []),
        ("grow-raw", {"base_fmt": "raw", "top_size": "24M",
                      "writes": TOP_WRITES + ("write -P 0x66 20M 1M",)}, []),
        ("keep", {}, ["-d"]),
        ("empty-top", {"writes": ()}, []),
    ]
    for name, kw, args in cases:
        kw.setdefault("writes", TOP_WRITES)
        base_fmt = kw.get("base_fmt", "qcow2")
        if base_fmt == "qcow2":
            kw.setdefault("base_writes", BASE_WRITES)
        else:
            kw.setdefault("base_writes", ("write -P 0x99 0 4M",))
        dirs = build(name, **kw)
        same(name, dirs, args, base_fmt, top_kept="-d" in args)
        log("ok: commit %s %s: as qemu-img (top byte for byte, base compared)" %
            (name, " ".join(args)))
    # -r: bytes per second; 4 MiB to copy at 2 MiB/s take about 2 s (1 MiB may go at once)
    dirs = build("rate-slow", writes=("write -P 0x12 0 4M",))
    t0 = time.monotonic()
    r = commit("ours", dirs[0], ["-r", "2M"])
    took = time.monotonic() - t0
    check(r.rc == 0 and 1.2 < took < 20, "-r 2M: rc %d, %.2f s\n%s" % (r.rc, took, r.describe()))
    log("ok: commit -r 2M of 4 MiB took %.2f s" % took)
    # -b: three layers, into the deepest; implies -d; the middle layer unchanged
    dirs = build("three", writes=TOP_WRITES, base_writes=BASE_WRITES, mid=True)
    mids = [open(os.path.join(d, "m.qcow2"), "rb").read() for d in dirs]
    same("three -b", dirs, ["-b", "b.qcow2"], top_kept=True)
    check(open(os.path.join(dirs[0], "m.qcow2"), "rb").read() == mids[0],
          "-b: the middle layer changed")
    log("ok: commit -b into the deepest of three layers, as qemu-img (implies -d)")


def info(p):
    r = qlib.run(["qemu-img", "info", "-U", "--output=json", p], check_rc=0)
    return json.loads(r.text)


def build_full(name, kind):
    """A chain whose top QEMU cannot rebuild: (dir ours, dir qemu)."""
    dirs = []
    for who in ("ours", "qemu"):
        d = W(os.path.join("full-" + name, who))
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
        b, t = os.path.join(d, "b.qcow2"), os.path.join(d, "t.qcow2")
        bo = ["-o", "compat=0.10"] if kind == "v2" else []
        to = {"v2": ["-o", "compat=0.10"], "dfile": ["-o", "data_file=" +
                                                      os.path.join(d, "t.data")],
              "snap4k": ["-o", "cluster_size=4096"]}.get(kind, [])
        qlib.qemu_img("create", "-q", "-f", "qcow2", *bo, b, "8M")
        qlib.qemu_io(b, "write -P 0x01 0 2M", fmt="qcow2")
        qlib.qemu_io(b, "write -c -P 0x07 6M 64k", fmt="qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *to, "-b", "b.qcow2",
                        "-F", "qcow2", t], cwd=d, check=True)
        # zeroes written with -z in a v2 image are data (no zero flag); QEMU's
        # commit copies them as data, ours as zeroes: left out there
        for wr in ("write -P 0x02 512k 1M", "write -P 0x03 3M 64k", "write -P 0x0a 7M 1M") + \
                (() if kind == "v2" else ("write -z 4M 128k",)) + \
                (() if kind == "dfile" else ("write -c -P 0x09 5M 64k",)):
            qlib.qemu_io(t, wr, fmt="qcow2")
        if kind in ("snap", "snap4k"):
            qlib.qemu_img("snapshot", "-c", "s1", t)
            qlib.qemu_io(t, "write -P 0x04 0 64k", fmt="qcow2")
            qlib.qemu_io(t, "write -P 0x04 7M 64k", fmt="qcow2")
            qlib.qemu_img("snapshot", "-c", "s2", t)
            qlib.qemu_io(t, "write -P 0x05 3M 4k", fmt="qcow2")
        if kind == "bitmap":
            qlib.qemu_img("bitmap", "--add", t, "b1")
            qlib.qemu_io(t, "write -P 0x05 2M 64k", fmt="qcow2")
            qlib.qemu_img("bitmap", "--add", "--disable", t, "b2")
            qlib.qemu_io(t, "write -P 0x06 5M 4k", fmt="qcow2")
        dirs.append(d)
    return dirs


def test_full_discard():
    """Tops QEMU empties by discarding every cluster: snapshots, bitmaps, an
    external data file, version 2 (qcow2_make_empty's fallback)."""
    have_nbd = shutil.which("nbdinfo") and shutil.which("qemu-nbd")
    if not have_nbd:
        log("SKIP part: nbdinfo or qemu-nbd not installed (bitmap bits not compared)")
    for kind in ("snap", "snap4k", "bitmap", "dfile", "v2"):
        dirs = build_full(kind, kind)
        tops = [os.path.join(d, "t.qcow2") for d in dirs]
        snaps = [s[1] for s in qlib.snapshot_list(tops[0])] if "snap" in kind else []
        bms = info(tops[0])["format-specific"]["data"].get("bitmaps") or []
        dirty = {b["name"]: qlib.nbd_dirty(W, tops[0], b["name"]) for b in bms} if have_nbd else {}
        ro, rq = commit("ours", dirs[0], []), commit("qemu", dirs[1], [])
        check(ro.rc == rq.rc == 0 and ro.out == rq.out,
              "full %s: %s\n%s" % (kind, ro.describe(), rq.describe()))
        mo, mq = qmap(tops[0]), qmap(tops[1])
        check(mo == mq, "full %s: top maps differ:\n%r\n%r" % (kind, mo, mq))
        check(all(e["depth"] >= 1 for e in mo), "full %s: the top still holds data: %r" %
              (kind, mo))
        for d in dirs:
            qlib.assert_qemu_check_clean(os.path.join(d, "t.qcow2"), "full %s top" % kind)
            qlib.assert_qemu_check_clean(os.path.join(d, "b.qcow2"), "full %s base" % kind)
        for a, b, what in ((tops[0], tops[1], "the chains"),
                           (os.path.join(dirs[0], "b.qcow2"), os.path.join(dirs[1], "b.qcow2"),
                            "the bases"),
                           (tops[0], os.path.join(dirs[0], "b.qcow2"), "top and base")):
            c = qlib.run(["qemu-img", "compare", "-U", a, b])
            check(c.rc == 0, "full %s: %s differ: %s" % (kind, what, c.text))
        check(qmap(os.path.join(dirs[0], "b.qcow2")) == qmap(os.path.join(dirs[1], "b.qcow2")),
              "full %s: base maps differ" % kind)
        bs = [os.path.getsize(os.path.join(d, "b.qcow2")) for d in dirs]
        check(bs[0] <= bs[1] + MiB, "full %s: our base is %d bytes, qemu-img's %d" % (
            kind, bs[0], bs[1]))
        io_, iq = info(tops[0]), info(tops[1])
        fo, fq = io_["format-specific"]["data"], iq["format-specific"]["data"]
        dfq = fq.get("data-file")
        check(fo.get("compat") == fq.get("compat") and fo.get("bitmaps") == fq.get("bitmaps") and
              fo.get("data-file") == (dfq.replace(dirs[1], dirs[0]) if dfq else None),
              "full %s: info differs:\n%r\n%r" % (kind, fo, fq))
        so = [s[1] for s in qlib.snapshot_list(tops[0])]
        sq = [s[1] for s in qlib.snapshot_list(tops[1])]
        check(so == sq == snaps, "full %s: snapshots %r, qemu-img %r" % (kind, so, sq))
        for sn in snaps:
            # what the snapshot does not hold reads from the base, which
            # the commit changed: the same as after qemu-img's commit
            after = [W("full-%s-%s.%s.raw" % (kind, sn, w)) for w in ("ours", "qemu")]
            for t, out in zip(tops, after):
                qlib.qemu_to_raw(t, out, snapshot=sn)
            qlib.compare_files(after[0], after[1], "full %s: snapshot %s" % (kind, sn))
        for name, want in dirty.items():
            do, dq = qlib.nbd_dirty(W, tops[0], name), qlib.nbd_dirty(W, tops[1], name)
            check(do == dq == want, "full %s: bitmap %s dirty %r, qemu-img's %r, before %r" %
                  (kind, name, do, dq, want))
        log("ok: commit, %s top emptied as qemu-img's (map, check, compare%s%s)" %
            (kind, ", snapshots %s" % snaps if snaps else "",
             ", bitmaps %s" % sorted(dirty) if dirty else ""))


def test_refusals():
    dirs = build("refuse", writes=("write -P 1 0 64k",))
    r = same("not in chain", dirs, ["-b", "nope.qcow2"])
    log("ok: -b not in the chain: %s" % msg(r))
    for d in dirs:
        qlib.qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "lone.qcow2"), "1M")
    ro = qlib.run([A.img, "commit", os.path.join(dirs[0], "lone.qcow2")])
    rq = qlib.run(["qemu-img", "commit", os.path.join(dirs[1], "lone.qcow2")])
    check(ro.rc == rq.rc == 1 and msg(ro).replace(dirs[0], "D") == msg(rq).replace(dirs[1], "D"),
          "no backing: %r %r" % (msg(ro), msg(rq)))
    log("ok: no backing file: %s" % msg(ro))
    for what in ("t.qcow2", "b.qcow2"):
        holders = [subprocess.Popen(["qemu-io", "-r" if what == "b.qcow2" else "-n",
                                     os.path.join(d, what)] if what == "b.qcow2" else
                                    ["qemu-io", os.path.join(d, what)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for d in dirs]
        try:
            time.sleep(1.0)
            ro, rq = commit("ours", dirs[0], []), commit("qemu", dirs[1], [])
            check(ro.rc == rq.rc == 1, "%s locked: exit %d, qemu-img %d\n%s" % (
                what, ro.rc, rq.rc, ro.describe()))
            eo = ro.errtext.replace(dirs[0], "D").split(": ", 1)[1]
            eq = rq.errtext.replace(dirs[1], "D").split(": ", 1)[1]
            check(eo == eq, "%s locked: %r, qemu-img %r" % (what, eo, eq))
            log("ok: %s locked by qemu-io: refused as qemu-img: %r" % (what, eo))
        finally:
            for h in holders:
                h.stdin.close()
                h.wait(10)


def test_vqcowd():
    """A running vqcowd on the top or on the base: refused with qemu's lock message."""
    if not A.vqcowd:
        log("SKIP part: no vqcowd given")
        return
    dirs = build("daemon", writes=("write -P 1 0 64k",))
    d = dirs[0]
    for what in ("t.qcow2", "b.qcow2"):
        sock = W("cd%s.sock" % what[0])
        p = subprocess.Popen([A.vqcowd, "--socket-path", sock, "--blk-file",
                              os.path.join(d, what)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            t = time.monotonic() + 10
            while not os.path.exists(sock):
                check(p.poll() is None and time.monotonic() < t, "vqcowd did not start")
                time.sleep(0.05)
            before = open(os.path.join(d, "t.qcow2"), "rb").read()
            r = commit("ours", d, [])
            # qemu-img's texts (checked by hand against qemu-img 7.2 with vqcowd)
            want = ('Failed to get "write" lock' if what == "t.qcow2" else
                    'Could not open backing file: Failed to get shared "write" lock')
            check(r.rc == 1 and want in r.errtext and
                  "Is another process using the image [%s]?" % os.path.join(d, what)
                  in r.errtext, "vqcowd on %s: %s" % (what, r.describe()))
            check(open(os.path.join(d, "t.qcow2"), "rb").read() == before,
                  "vqcowd on %s: the top changed" % what)
            log("ok: vqcowd serving %s: commit refused: %s" % (what, msg(r)))
        finally:
            p.terminate()
            p.wait(30)
    qlib.assert_qemu_check_clean(os.path.join(d, "b.qcow2"), "base after the refusals")


def main():
    return qlib.vqcow_img_test(globals(), "commit-img", test_cases, test_full_discard,
                               test_refusals, test_vqcowd)


if __name__ == "__main__":
    sys.exit(qlib.main_wrapper(main))
