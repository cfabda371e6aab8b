#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Persistent dirty bitmaps (qcow2.txt "Bitmaps extension"), qemu-img as oracle.

Parts (--part):
  track     qemu-img create + `qemu-img bitmap --add` (enabled bitmaps of
            several granularities, one disabled), served by vqcowd in two
            sessions with writes, discards and write-zeroes through vqcow-fe.
            While serving, the enabled bitmaps are in use (the disabled one not);
            after SIGTERM qemu-img info shows them all consistent with the
            autoclear bit kept, qemu-img check is clean, and
            `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME` show
            exactly the touched granules of both sessions; the disabled bitmap
            is clean and its table and data bytes are unchanged. Also with
            512-byte clusters (a bitmap table of several clusters).
            Skips (77) without qemu-nbd/nbdinfo (package libnbd-bin).
  crash     kill -9 while serving: the enabled bitmaps stay in use
            (inconsistent, as QEMU reports them), the disabled one does not,
            qemu-img check is clean and the written data reads back; a later
            vqcowd session leaves the in-use bitmaps alone.
  readonly  a read-only vqcowd (reads served, writes refused) leaves the
            image byte-identical.
  invalid   hostile bitmap directories (unknown flags, bad name size, bad
            table offset/entries, directory size mismatch, a table on the L1
            table, duplicate names): the read-write open is refused with a
            message naming the file and "bitmap", the image stays
            byte-identical; a read-only open still works.
"""

import json
import os
import shutil
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
W = None
MB = 1 << 20
DAEMONS = []  # killed at exit, also when a check fails


def fe_run(sock, *args, ok=True):
    r = qlib.run([A.fe, args[0], sock] + [str(a) for a in args[1:]], timeout=60)
    qlib.assert_sane_exit(r, "vqcow-fe %s" % " ".join(str(a) for a in args))
    if ok:
        check(r.rc == 0, "vqcow-fe %s failed\n%s" % (args[0], r.describe()))
    return r


def bitmaps_of(img, force=False):
    argv = ["info", "--output=json"] + (["-U"] if force else []) + [img]
    js = json.loads(qlib.qemu_img(*argv).text)
    data = js.get("format-specific", {}).get("data", {})
    return {b["name"]: b for b in data.get("bitmaps", [])}


def flags_of(got, name, when):
    check(name in got, "bitmap %s not shown by qemu-img info %s (bitmaps extension dropped: "
          "autoclear bit cleared?): %r" % (name, when, sorted(got)))
    return got[name]["flags"]


def header_autoclear(img):
    with open(img, "rb") as f:
        f.seek(88)
        return struct.unpack(">Q", f.read(8))[0]


def start(img, sock, extra=()):
    d = qlib.Daemon(A.vqcowd, img, sock, extra=list(extra))
    DAEMONS.append(d)
    check(d.start(), "vqcowd did not start on %s\n%s" % (img, d.log()))
    # the path appears at bind(), before listen(): wait until it accepts
    import socket
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock)
            break
        except OSError:
            check(d.alive() and time.monotonic() < deadline,
                  "vqcowd never accepted on %s\n%s" % (sock, d.log()))
            time.sleep(0.01)
        finally:
            s.close()
    return d


def do_ops(sock, ops):
    for op in ops:
        kind, off, ln = op[0], op[1], op[2]
        if kind == "w":
            r = qlib.run([A.fe, "write", sock, off], stdin=os.urandom(ln), timeout=60)
            qlib.assert_sane_exit(r, "vqcow-fe write")
            check(r.rc == 0, "write %d+%d failed\n%s" % (off, ln, r.describe()))
        elif kind == "d":
            fe_run(sock, "discard", off, ln)
        elif kind == "z":
            fe_run(sock, "write-zeroes", off, ln)
        elif kind == "zu":
            fe_run(sock, "write-zeroes", off, ln, "--unmap")
        else:
            fail("bad op %r" % (op,))


def expected_ranges(ops, gran, size):
    """Merged [start, end) byte ranges of the granules the ops touch."""
    grans = set()
    for op in ops:
        off, ln = op[1], op[2]
        if ln == 0:
            continue
        for g in range(off // gran, (off + ln - 1) // gran + 1):
            grans.add(g)
    out = []
    for g in sorted(grans):
        s, e = g * gran, min((g + 1) * gran, size)
        if out and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e])
    return [tuple(x) for x in out]


def nbd_dirty_ranges(img, name, wd):
    sock = wd("nbd-%s.sock" % name)
    if os.path.exists(sock):
        os.unlink(sock)
    import subprocess
    logf = open(wd("qemu-nbd-%s.log" % name), "wb")
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", sock, img],
                         stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                logf.close()
                fail("qemu-nbd -B %s did not start:\n%s" %
                     (name, open(wd("qemu-nbd-%s.log" % name)).read()))
            time.sleep(0.02)
        r = qlib.run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name,
                      "nbd+unix:///?socket=" + sock], timeout=60, check_rc=0)
    finally:
        p.terminate()
        p.wait()
        logf.close()
    out = []
    for line in r.text.splitlines():
        f = line.split()
        if len(f) < 3:
            continue
        s, ln, t = int(f[0]), int(f[1]), int(f[2])
        if t & 1:
            if out and out[-1][1] == s:
                out[-1][1] = s + ln
            else:
                out.append([s, s + ln])
    return [tuple(x) for x in out]


def bitmap_dir_entries(img):
    """[(name, table_offset, table_size, flags)] parsed from the image (our own reader)."""
    with open(img, "rb") as f:
        hdr = f.read(65536)
    hlen = struct.unpack(">I", hdr[100:104])[0]
    off = hlen
    while off + 8 <= len(hdr):
        t, ln = struct.unpack(">II", hdr[off:off + 8])
        if t == 0:
            return []
        if t == 0x23852875:
            nb, _, dsize, doff = struct.unpack(">IIQQ", hdr[off + 8:off + 32])
            break
        off += 8 + ((ln + 7) & ~7)
    else:
        return []
    with open(img, "rb") as f:
        f.seek(doff)
        d = f.read(dsize)
    out, pos = [], 0
    for _ in range(nb):
        toff, tsize, flags, typ, gb, nsize, extra = struct.unpack(">QIIBBHI", d[pos:pos + 24])
        name = d[pos + 24 + extra:pos + 24 + extra + nsize].decode()
        out.append((name, toff, tsize, flags, pos, doff))
        pos += (24 + extra + nsize + 7) & ~7
    return out


def bitmap_bytes(img, name):
    """The table and data bytes of bitmap NAME (to check it is unchanged)."""
    for n, toff, tsize, _, _, _ in bitmap_dir_entries(img):
        if n != name:
            continue
        with open(img, "rb") as f:
            f.seek(toff)
            tab = f.read(tsize * 8)
            data = b""
            cs = 1 << struct.unpack(">I", open(img, "rb").read(24)[20:24])[0]
            for i in range(tsize):
                e = struct.unpack(">Q", tab[i * 8:i * 8 + 8])[0]
                if e & 0x00fffffffffffe00:
                    f.seek(e & 0x00fffffffffffe00)
                    data += f.read(cs)
                else:
                    data += b"\0" if e == 0 else b"\1"
        return (toff, tab, data)
    fail("bitmap %s not found in %s" % (name, img))


# ---------------------------------------------------------------- parts

def part_track(wd):
    qlib.need_qemu_tools("qemu-nbd")
    if shutil.which("nbdinfo") is None:
        log("SKIP: nbdinfo not found (package libnbd-bin)")
        return qlib.SKIP
    scenarios = [
        # (cluster size, disk size, [(bitmap, granularity or None, disabled)])
        (65536, 64 * MB + 3 * 512,
         [("b64k", None, False), ("b1m", 1 << 20, False), ("b512", 512, False),
          ("off", None, True)]),
        (512, 256 * MB, [("small", 512, False), ("off", 4096, True)]),
    ]
    for cs, size, bms in scenarios:
        img = wd("track-%d.qcow2" % cs)
        qlib.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cs, img, size)
        # something for the disabled bitmap to hold: add it enabled, write, disable
        for name, g, disabled in bms:
            argv = ["bitmap", "--add"] + (["-g", str(g)] if g else []) + [img, name]
            qlib.qemu_img(*argv)
        qlib.qemu_io(img, "write -P 0x11 %d 4096" % (3 * MB))
        for name, g, disabled in bms:
            if disabled:
                qlib.qemu_img("bitmap", "--disable", img, name)
        pre = [("w", 3 * MB, 4096)]
        # qemu-io's write went into every bitmap; the disabled one keeps it
        off_before = {n: bitmap_bytes(img, n) for n, _, d in bms if d}
        s1 = [("w", MB + 1536, 4096), ("w", 2 * MB - 512, 1024), ("d", 8 * MB + 512, 512),
              ("z", 16 * MB, 131072), ("zu", 20 * MB + 4096, 8192),
              ("w", size - 512, 512)]
        s2 = [("w", 0, 512), ("w", 40 * MB + 65536 * 3, 65536 * 2 + 512),
              ("d", 48 * MB, 2 * MB), ("zu", 32 * MB - 512, 1024)]
        sock = wd("s-%d.sock" % cs)
        for sess in (s1, s2):
            d = start(img, sock)
            inuse = bitmaps_of(img, force=True)
            for name, g, disabled in bms:
                fl = flags_of(inuse, name, "while served")
                if disabled:
                    check(fl == [], "disabled bitmap %s got flags %r while served" % (name, fl))
                else:
                    check("in-use" in fl and "auto" in fl,
                          "enabled bitmap %s not in use while served: %r" % (name, fl))
            do_ops(sock, sess)
            d.assert_clean_stop()
            got = bitmaps_of(img)
            for name, g, disabled in bms:
                check(name in got, "bitmap %s disappeared: %r" % (name, got))
                want = [] if disabled else ["auto"]
                check(got[name]["flags"] == want, "bitmap %s flags %r after close (want %r)" %
                      (name, got[name]["flags"], want))
                check(got[name]["granularity"] == (g or 65536), "bitmap %s granularity %r" %
                      (name, got[name]["granularity"]))
            check(header_autoclear(img) & 1, "autoclear bit 0 (bitmaps) cleared")
            qlib.assert_qemu_check_clean(img, "after serving with bitmaps")
        for name, g, disabled in bms:
            gran = g or 65536
            ranges = nbd_dirty_ranges(img, name, wd)
            if disabled:
                want = expected_ranges(pre, gran, size)
                check(ranges == want, "disabled bitmap %s changed: %r (want %r)" %
                      (name, ranges, want))
                check(bitmap_bytes(img, name) == off_before[name],
                      "disabled bitmap %s: table or data bytes changed" % name)
            else:
                want = expected_ranges(pre + s1 + s2, gran, size)
                check(ranges == want, "bitmap %s (granularity %d, cluster %d): dirty ranges\n"
                      "  got  %r\n  want %r" % (name, gran, cs, ranges, want))
            log("bitmap %-5s cluster %5d granularity %7d: %d dirty ranges as expected" %
                (name, cs, gran, len(ranges)))
        # no cluster leaked or lost by two store rounds
        rc, js, r = qlib.qemu_check(img)
        check(rc == 0 and js.get("leaks", 0) == 0, "leaks after two sessions\n" + r.describe())
    return 0


def part_crash(wd):
    img = wd("crash.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", img, 64 * MB)
    qlib.qemu_img("bitmap", "--add", img, "on")
    qlib.qemu_img("bitmap", "--add", img, "off")
    qlib.qemu_img("bitmap", "--disable", img, "off")
    sock = wd("s.sock")
    d = start(img, sock)
    data = os.urandom(65536)
    r = qlib.run([A.fe, "write", sock, 5 * MB], stdin=data, timeout=60)
    check(r.rc == 0, "write failed\n" + r.describe())
    fe_run(sock, "flush")
    d.kill()
    got = bitmaps_of(img)
    fl = flags_of(got, "on", "after kill -9")
    check(fl == ["in-use", "auto"], "after kill -9 the enabled bitmap should be in use: %r" % fl)
    fl = flags_of(got, "off", "after kill -9")
    check(fl == [], "disabled bitmap flags after kill -9: %r" % fl)
    check(header_autoclear(img) & 1, "autoclear bit 0 cleared after kill -9")
    qlib.assert_qemu_check_clean(img, "after kill -9", allow_leaks=True)
    raw = wd("crash.raw")
    qlib.qemu_img("convert", "-O", "raw", img, raw)
    with open(raw, "rb") as f:
        f.seek(5 * MB)
        check(f.read(65536) == data, "flushed write lost after kill -9")
    # the in-use bitmap is left alone by the next session, as QEMU does
    d = start(img, sock)
    do_ops(sock, [("w", 0, 4096)])
    d.assert_clean_stop()
    got = bitmaps_of(img)
    fl = flags_of(got, "on", "after a session following kill -9")
    check(fl == ["in-use", "auto"], "in-use bitmap changed: %r" % fl)
    qlib.assert_qemu_check_clean(img, "second session after kill -9", allow_leaks=True)
    crash_during_store(wd)
    return 0


def crash_during_store(wd):
    """SIGTERM, then SIGKILL a random few milliseconds later (often while the
    bitmaps are being stored): each time the image must check clean (leaks
    allowed) and the bitmap be either in use or consistent, and when
    consistent it must hold at least every granule written so far."""
    import random
    import signal
    rng = random.Random(A.seed)
    img = wd("store-crash.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", img, 64 * MB)
    qlib.qemu_img("bitmap", "--add", "-g", "4096", img, "on")
    sock = wd("s2.sock")
    nbd = shutil.which("nbdinfo") and shutil.which("qemu-nbd")
    ops = []
    states = {"in-use": 0, "consistent": 0}
    for rnd in range(12):
        # a fresh start when a previous round left the bitmap in use
        if "in-use" in flags_of(bitmaps_of(img), "on", "before round %d" % rnd):
            qlib.qemu_img("bitmap", "--remove", img, "on")
            qlib.qemu_img("bitmap", "--add", "-g", "4096", img, "on")
            ops = []
        d = start(img, sock)
        new = []
        for _ in range(rng.randrange(1, 6)):
            off = rng.randrange(0, 64 * MB // 512 - 64) * 512
            new.append(("w", off, rng.randrange(1, 64) * 512))
        do_ops(sock, new)
        ops += new
        d.p.send_signal(signal.SIGTERM)
        time.sleep(rng.random() * 0.03)
        d.kill()
        qlib.assert_qemu_check_clean(img, "kill -9 during close, round %d" % rnd,
                                     allow_leaks=True)
        fl = flags_of(bitmaps_of(img), "on", "after kill -9 during close")
        check(fl in (["auto"], ["in-use", "auto"]), "round %d: flags %r" % (rnd, fl))
        state = "in-use" if "in-use" in fl else "consistent"
        states[state] += 1
        if state == "consistent" and nbd:
            got = nbd_dirty_ranges(img, "on", wd)
            for s_, e_ in expected_ranges(ops, 4096, 64 * MB):
                check(any(a <= s_ and e_ <= b for a, b in got),
                      "round %d: granules [%d, %d) written but not dirty in %r" %
                      (rnd, s_, e_, got))
    log("kill -9 during close: %d rounds left the bitmap in use, %d consistent" %
        (states["in-use"], states["consistent"]))


def part_readonly(wd):
    img = wd("ro.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", img, 64 * MB)
    qlib.qemu_io(img, "write -P 0x5a 0 1M")
    qlib.qemu_img("bitmap", "--add", img, "on")
    qlib.qemu_img("bitmap", "--add", "-g", "1M", img, "on2")
    before = qlib.sha256_file(img)
    sock = wd("s.sock")
    d = start(img, sock, extra=["--read-only"])
    got = bitmaps_of(img, force=True)
    fl = flags_of(got, "on", "while served read-only")
    check(fl == ["auto"], "read-only open marked a bitmap: %r" % fl)
    b = qlib.Frontend(A.fe, sock).read_ok(0, 65536)
    check(b == b"\x5a" * 65536, "read-only read returned wrong data")
    r = qlib.run([A.fe, "write", sock, 0], stdin=bytes(4096), timeout=60)
    check(r.rc != 0, "write to a read-only export succeeded")
    d.assert_clean_stop()
    check(qlib.sha256_file(img) == before, "read-only vqcowd modified the image")
    return 0


def corrupt_cases():
    """(name, editor(img bytes as bytearray, entries) -> None, expect substring)."""
    def flags(v):
        def ed(b, ents):
            _, _, _, fl, pos, doff = ents[0]
            struct.pack_into(">I", b, doff + pos + 12, fl | v)
        return ed

    def field(off, fmt, v):
        def ed(b, ents):
            _, _, _, _, pos, doff = ents[0]
            struct.pack_into(fmt, b, doff + pos + off, v)
        return ed

    def table_entry(v):
        def ed(b, ents):
            _, toff, _, _, _, _ = ents[0]
            struct.pack_into(">Q", b, toff, v)
        return ed

    def table_on_l1(b, ents):
        _, _, _, _, pos, doff = ents[0]
        l1 = struct.unpack_from(">Q", b, 40)[0]
        struct.pack_into(">Q", b, doff + pos, l1)

    def dir_size(b, ents):
        hlen = struct.unpack_from(">I", b, 100)[0]
        off = hlen
        while True:
            t, ln = struct.unpack_from(">II", b, off)
            if t == 0x23852875:
                dsize = struct.unpack_from(">Q", b, off + 16)[0]
                struct.pack_into(">Q", b, off + 16, dsize - 8)
                return
            off += 8 + ((ln + 7) & ~7)

    def dup_name(b, ents):
        # both names have the same length: copy the first over the second
        _, _, _, _, p0, doff = ents[0]
        _, _, _, _, p1, _ = ents[1]
        b[doff + p1 + 24:doff + p1 + 26] = b[doff + p0 + 24:doff + p0 + 26]

    return [
        ("unknown-flag", flags(1 << 3), "unknown flags"),
        ("name-size-0", field(18, ">H", 0), "name_size"),
        ("type-2", field(16, ">B", 2), "type"),
        ("granularity-8", field(17, ">B", 8), "granularity"),
        ("table-misaligned", field(0, ">Q", 0x30200), "table offset"),
        ("table-past-eof", field(0, ">Q", 1 << 40), "end of the file"),
        ("table-size-0", field(8, ">I", 0), "table size"),
        ("table-entry-reserved", table_entry(0x10000 | (1 << 60)), "table entry"),
        ("table-entry-misaligned", table_entry(0x10200), "table entry"),
        ("table-on-l1", table_on_l1, "overlaps other metadata"),
        ("dir-size", dir_size, "bitmap"),
        ("dup-name", dup_name, "twice"),
    ]


def part_invalid(wd):
    base = wd("base.qcow2")
    qlib.qemu_img("create", "-q", "-f", "qcow2", base, 64 * MB)
    qlib.qemu_io(base, "write -P 0x33 0 64k")
    qlib.qemu_img("bitmap", "--add", base, "aa")
    qlib.qemu_img("bitmap", "--add", base, "bb")
    ents = bitmap_dir_entries(base)
    check(len(ents) == 2, "expected two bitmaps: %r" % (ents,))
    sock = wd("s.sock")
    for name, edit, want in corrupt_cases():
        img = wd("bad-%s.qcow2" % name)
        b = bytearray(open(base, "rb").read())
        edit(b, ents)
        with open(img, "wb") as f:
            f.write(b)
        before = qlib.sha256_file(img)
        d = qlib.Daemon(A.vqcowd, img, sock)
        DAEMONS.append(d)
        t0 = time.monotonic()
        started = d.start()
        if started:
            d.kill()
            fail("%s: vqcowd opened a hostile bitmap directory read-write\n%s" % (name, d.log()))
        logtxt = d.log()
        check(d.rc not in (0, None) and d.rc > 0, "%s: exit status %r" % (name, d.rc))
        check(time.monotonic() - t0 < 5, "%s: refusing took too long" % name)
        check(not qlib.sanitizer_report(logtxt), "%s: sanitizer report\n%s" % (name, logtxt))
        check(img in logtxt and "bitmap" in logtxt and want in logtxt,
              "%s: message should name the file, 'bitmap' and %r:\n%s" % (name, want, logtxt))
        check(qlib.sha256_file(img) == before, "%s: refused open modified the image" % name)
        # a read-only export does not care
        d = start(img, sock, extra=["--read-only"])
        got = qlib.Frontend(A.fe, sock).read_ok(0, 65536)
        check(got == b"\x33" * 65536, "%s: read-only read wrong" % name)
        d.assert_clean_stop()
        check(qlib.sha256_file(img) == before, "%s: read-only open modified the image" % name)
        first = [ln for ln in logtxt.splitlines() if "bitmap" in ln][:1]
        log("%-24s refused: %s" % (name, first[0] if first else "?"))
    return 0


def main():
    global A, W
    A = qlib.parse_args(lambda p: p.add_argument("--part", required=True,
                                                 choices=["track", "crash", "readonly",
                                                          "invalid"]))
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binary(A.vqcowd, "vqcowd")
    qlib.need_binary(A.fe, "vqcow-fe")
    W = qlib.Workdir(A.workdir, A.keep)
    ok = False
    try:
        rc = {"track": part_track, "crash": part_crash, "readonly": part_readonly,
              "invalid": part_invalid}[A.part](W)
        ok = True
        return rc
    finally:
        for d in DAEMONS:
            d.kill()
        W.cleanup(ok)


if __name__ == "__main__":
    qlib.main_wrapper(main)
