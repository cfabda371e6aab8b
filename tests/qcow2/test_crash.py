#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Crash test: vqcowd on a qcow2 image (fresh 64K clusters, or with a raw
backing file) gets random writes and flushes through vqcow-fe and is killed
with SIGKILL at a random moment; several rounds on the same image.

After each kill:
  - qemu-img check must report no corruption (leaks are allowed: exit 0 or 3)
  - every write acknowledged before a completed FLUSH must read back, unless a
    later write to the same sector was issued (then either version is fine)

--kind procdeath-xl2 is procdeath on an extended_l2=on image, with writes of
whole 2 KiB subclusters into a few clusters. A new cluster's first write
writes it whole, and vqcowd links it whole (every subcluster allocated):
later writes into it go in place. In every other pair of rounds the seam
VQCOWD_TEST_SC_LINK links such clusters per subcluster (with their own set of
clusters), so that most writes allocate subclusters of a cluster already
allocated: the early link (qcow2/mapping.c), whose L2 write runs beside the
data write. Some requests zero a whole
cluster (write-zeroes, with or without unmap): without unmap it keeps its
host cluster and old bytes behind cleared allocation bits, which a later
write into its subclusters must never show (they are not known zeroes).

--kind procdeath is the other kind of crash (DESIGN.md "Two kinds of
crash"): only the process dies, the host's page cache stays, so EVERY
acknowledged write must read back, flush or not. Writes go mostly to fresh
clusters and vqcowd is killed right after a completion (or at a random
moment); at the end vqcow-img check -r leaks repairs the leaks and
qemu-img check must then be clean.

Every 512-byte sector written carries a tag (magic, write id, sector number,
filler derived from both), so the content read back names the write it came
from; zeroes (or the backing file's id-0 tags) mean "never written".
"""

import os
import random
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
W = None
SECTOR = 512
SIZE = 32 << 20
PD_SIZE = 64 << 20  # procdeath: room for many fresh clusters
MAGIC = b"VQCWTEST"
KINDS = ["fresh", "backing", "lazy", "procdeath", "procdeath-xl2"]


def sector_data(wid, s):
    head = MAGIC + struct.pack("<QQ", wid, s)
    fill = struct.pack("<Q", (wid * 0x9E3779B97F4A7C15 + s * 0xBF58476D1CE4E5B9) & (2**64 - 1))
    return head + fill * ((SECTOR - len(head)) // 8)


def write_data(wid, off, ln):
    s0 = off // SECTOR
    return b"".join(sector_data(wid, s0 + i) for i in range(ln // SECTOR))


def parse_sector(b, s):
    """Return the write id stored in sector s, 0 for zeroes, None for garbage."""
    if b == bytes(SECTOR):
        return 0
    if b[:8] != MAGIC:
        return None
    wid, ss = struct.unpack_from("<QQ", b, 8)
    if ss != s or b != sector_data(wid, s):
        return None
    return wid


class Model:
    """Per-sector durable id and the ids of writes not yet covered by a flush."""

    def __init__(self, nsect):
        self.durable = [0] * nsect
        self.latest = [0] * nsect
        self.pending = {}  # sector -> set of ids

    def write_issued(self, wid, off, ln):
        for s in range(off // SECTOR, (off + ln) // SECTOR):
            self.pending.setdefault(s, set()).add(wid)

    def write_acked(self, wid, off, ln, durable=False):
        for s in range(off // SECTOR, (off + ln) // SECTOR):
            self.latest[s] = wid
            if durable:
                # a process death keeps it: nothing older is acceptable
                self.durable[s] = wid
                self.pending.get(s, set()).discard(wid)
                self.pending[s] = {i for i in self.pending.get(s, set()) if i > wid}

    def flushed(self):
        # all writes issued so far were acknowledged (the driver is sequential)
        for s in self.pending:
            self.durable[s] = self.latest[s]
        self.pending = {}

    def verify(self, raw_path):
        bad = []
        with open(raw_path, "rb") as f:
            data = f.read()
        check(len(data) == len(self.durable) * SECTOR, "image size changed: %d" % len(data))
        for s in range(len(self.durable)):
            b = data[s * SECTOR:(s + 1) * SECTOR]
            got = parse_sector(b, s)
            ok = {self.durable[s]} | self.pending.get(s, set())
            if got not in ok:
                bad.append("sector %d (offset %d): found %s, acceptable %s"
                           % (s, s * SECTOR, "garbage" if got is None else "write %d" % got,
                              sorted(ok)))
                if len(bad) >= 20:
                    break
        check(not bad, "lost or misplaced data after the crash:\n" + "\n".join(bad))
        # the image now holds what we read: that is the new durable state
        for s in range(len(self.durable)):
            got = parse_sector(data[s * SECTOR:(s + 1) * SECTOR], s)
            self.durable[s] = self.latest[s] = got
        self.pending = {}


def make_image(kind):
    img = W("crash.qcow2")
    if kind == "fresh":
        qlib.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", img, SIZE)
        return img, None
    if kind == "procdeath":
        qlib.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", img, PD_SIZE)
        return img, None
    if kind == "procdeath-xl2":
        qlib.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536,extended_l2=on", img,
                      PD_SIZE)
        return img, None
    if kind == "lazy":
        qlib.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536,lazy_refcounts=on", img,
                      SIZE)
        return img, None
    base = W("base.raw")
    with open(base, "wb") as f:
        # id-0 tags for the first half, zeroes for the rest
        for s in range(0, (SIZE // 2) // SECTOR, 256):
            f.write(b"".join(sector_data(0, s + i) for i in range(256)))
        f.truncate(SIZE)
    qlib.qemu_img("create", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.raw", "-F", "raw", img)
    return img, base


def lazy_dirty(img):
    with open(img, "rb") as f:
        h = f.read(80)
    return struct.unpack(">I", h[4:8])[0] >= 3 and struct.unpack(">Q", h[72:80])[0] & 1


def one_round(rnd, img, model, rng, next_id):
    sock = W("crash.sock")
    d = qlib.Daemon(A.vqcowd, img, sock)
    if not d.start():
        fail("round %d: vqcowd refused the image (exit %s)\n%s" % (rnd, d.rc, d.log()))
    fe = qlib.Frontend(A.fe, sock, timeout=30)
    pdeath = A.kind.startswith("procdeath")
    xl2 = A.kind == "procdeath-xl2"
    size = PD_SIZE if pdeath else SIZE
    delay = rng.uniform(0.2, 2.5)
    # procdeath: in most rounds, kill right after the completion of a write
    kill_after = rng.randrange(1, 60) if pdeath and rnd % 4 != 3 else None
    # xl2 with the early link's batch held back: kill after the first early write past it
    want_early = xl2 and os.environ.get("VQCOWD_TEST_LINK_DELAY", "0") != "0"
    # xl2: clusters 0-47 in the rounds whose whole-cluster first writes are
    # linked per subcluster (VQCOWD_TEST_SC_LINK: later writes link early),
    # 48-95 in the others (linked whole: later writes go in place)
    cbase = 0 if os.environ.get("VQCOWD_TEST_SC_LINK") else 48
    killed = threading.Event()

    def killer():
        time.sleep(delay)
        if d.alive():
            d.p.kill()
        killed.set()

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    ops = acked = flushes = zeroes = 0
    try:
        while not killed.is_set() and ops < 400:
            if not pdeath and rng.random() < 0.25:
                r = fe.flush()
                if r.rc != 0:
                    time.sleep(0.05)
                    check(killed.is_set() or not d.alive(),
                          "round %d: flush failed while vqcowd was alive\n%s" % (rnd, r.describe()))
                    break
                model.flushed()
                flushes += 1
                continue
            kind = rng.random()
            if xl2 and kind < 0.06:
                # a whole cluster zeroed (acknowledged: reads zeroes after a death)
                off = (cbase + rng.randrange(0, 48)) * 65536
                model.write_issued(0, off, 65536)  # id 0: zeroes
                ops += 1
                r = fe.write_zeroes(off, 65536, unmap=kind < 0.03)
                if r.rc != 0:
                    time.sleep(0.05)
                    check(killed.is_set() or not d.alive(),
                          "round %d: write-zeroes %d failed while vqcowd was alive\n%s"
                          % (rnd, off, r.describe()))
                    break
                model.write_acked(0, off, 65536, durable=True)
                zeroes += 1
                continue
            if xl2:
                # whole subclusters, mostly of clusters written before
                ln = rng.randrange(1, 5) * 2048 if kind < 0.95 else 65536
                off = (cbase + rng.randrange(0, 48)) * 65536 + rng.randrange(0, 32) * 2048
                off = min(off, size - ln)
            elif pdeath:
                # mostly small writes into clusters nobody wrote yet
                ln = rng.randrange(1, 17) * SECTOR if kind < 0.9 else 65536
                off = rng.randrange(0, size // 65536) * 65536 + rng.randrange(0, 64) * 1024
                off = min(off, size - ln) // SECTOR * SECTOR
            elif kind < 0.6:
                ln = rng.randrange(1, 17) * SECTOR
            elif kind < 0.9:
                ln = rng.randrange(1, 257) * SECTOR
            else:
                ln = 65536 * rng.randrange(1, 3)
            if not pdeath:
                off = rng.randrange(0, (SIZE - ln) // SECTOR + 1) * SECTOR
            # xl2: subclusters nobody wrote, of a cluster somebody did: linked early
            early = xl2 and off // 65536 == (off + ln - 1) // 65536 and \
                not any(model.latest[off // SECTOR:(off + ln) // SECTOR]) and \
                any(model.latest[off // 65536 * 128:(off // 65536 + 1) * 128])
            wid = next_id[0]
            next_id[0] += 1
            model.write_issued(wid, off, ln)
            ops += 1
            r = fe.write(off, write_data(wid, off, ln))
            if r.rc != 0:
                time.sleep(0.05)
                check(killed.is_set() or not d.alive(),
                      "round %d: write %d+%d failed while vqcowd was alive\n%s"
                      % (rnd, off, ln, r.describe()))
                break
            model.write_acked(wid, off, ln, durable=pdeath)
            acked += 1
            if kill_after is not None and (acked == kill_after if not want_early
                                           else acked >= kill_after and early):
                d.p.kill()  # right after the guest saw the completion
                break
    finally:
        t.join()
        d.kill()
    killed.set()
    check(d.rc == -9 or d.rc is not None, "round %d: vqcowd status %s" % (rnd, d.rc))
    if d.rc != -9:
        log("round %d: vqcowd ended with status %s before the kill\n%s" % (rnd, d.rc, d.log()))
        check(d.rc == -9, "round %d: vqcowd exited on its own (status %s)" % (rnd, d.rc))
    log("round %d: killed after %.2fs: %d writes issued, %d acknowledged, %d flushes, "
        "%d clusters zeroed" % (rnd, delay, ops, acked, flushes, zeroes))
    if lazy_dirty(img):
        # lazy refcounts: the refcounts may be stale by design; vqcow-img repairs
        # them (what vqcowd or QEMU would do on the next open)
        r = qlib.run([A.img, "check", "-r", "all", img], timeout=120)
        qlib.assert_sane_exit(r, "vqcow-img check -r all")
        check(r.rc == 0, "round %d: vqcow-img check -r all on the dirty image: rc %s\n%s"
              % (rnd, r.rc, r.describe()))
        check(not lazy_dirty(img), "round %d: dirty bit still set after repair" % rnd)
        log("round %d: dirty image repaired by vqcow-img check -r all" % rnd)
    rc, js, r = qlib.qemu_check(img)
    check(rc in (0, 3), "round %d: qemu-img check after kill -9: rc %s\n%s" % (rnd, rc, r.describe()))
    if rc == 3:
        log("round %d: %s leaked clusters (allowed)" % (rnd, js.get("leaks")))
    raw = W("after.raw")
    qlib.qemu_to_raw(img, raw)
    model.verify(raw)
    os.unlink(raw)


def main():
    global A, W

    def extra(p):
        p.add_argument("--kind", choices=KINDS, required=True)
        p.add_argument("--rounds", type=int, default=6)
    A = qlib.parse_args(extra)
    qlib.need_qemu_tools()
    qlib.need_binary(A.vqcowd, "vqcowd")
    qlib.need_binary(A.fe, "vqcow-fe (tests/frontend)")
    if A.kind in ("lazy", "procdeath", "procdeath-xl2"):
        qlib.need_binary(A.img, "vqcow-img")
    wd = qlib.Workdir(os.path.join(A.workdir, "crash-" + A.kind), A.keep)
    W = wd
    ok = False
    try:
        rng = random.Random(A.seed + KINDS.index(A.kind))
        img, base = make_image(A.kind)
        base_hash = qlib.sha256_file(base) if base else None
        pdeath = A.kind.startswith("procdeath")
        size = PD_SIZE if pdeath else SIZE
        model = Model(size // SECTOR)
        next_id = [1]
        rounds = A.rounds * 2 if pdeath else A.rounds
        for rnd in range(rounds):
            if A.kind == "procdeath-xl2":
                # in every other round the early link's batch starts 100 ms
                # late: a completion that did not wait for it would be lost
                os.environ["VQCOWD_TEST_LINK_DELAY"] = "100" if rnd % 2 == 0 else "0"
                # two rounds of clusters linked per subcluster (the early
                # link), two of clusters linked whole, and so on
                if rnd % 4 < 2:
                    os.environ["VQCOWD_TEST_SC_LINK"] = "1"
                else:
                    os.environ.pop("VQCOWD_TEST_SC_LINK", None)
            one_round(rnd, img, model, rng, next_id)
        os.environ.pop("VQCOWD_TEST_LINK_DELAY", None)
        os.environ.pop("VQCOWD_TEST_SC_LINK", None)
        if pdeath:
            # leaks (clusters a killed vqcowd allocated but never linked) are
            # repaired by vqcow-img; then the image is clean for qemu-img
            r = qlib.run([A.img, "check", "-r", "leaks", img], timeout=120)
            qlib.assert_sane_exit(r, "vqcow-img check -r leaks")
            check(r.rc == 0, "vqcow-img check -r leaks: rc %s\n%s" % (r.rc, r.describe()))
            rc, js, r = qlib.qemu_check(img)
            check(rc == 0, "qemu-img check after the leak repair: rc %s\n%s" % (rc, r.describe()))
        if base:
            check(qlib.sha256_file(base) == base_hash, "the backing file was modified")
        # finally: vqcowd must open the crashed image and read what qemu reads
        sock = W("final.sock")
        d = qlib.Daemon(A.vqcowd, img, sock)
        if not d.start():
            fail("vqcowd refused the crashed image (exit %s)\n%s" % (d.rc, d.log()))
        try:
            fe = qlib.Frontend(A.fe, sock)
            got = W("final.raw")
            fe.read_to_file(0, size, got)
            model.verify(got)
        finally:
            if d.alive():
                d.assert_clean_stop()
        ok = True
    finally:
        wd.cleanup(ok)


if __name__ == "__main__":
    qlib.main_wrapper(main)
