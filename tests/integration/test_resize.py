#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Online growth of a qcow2 image with QMP block_resize (issue 11), through a
real QMP client and vqcow-fe as the frontend, qemu-img/qemu-io as the oracle.

  * geometries: 64 KiB clusters growing inside the L1 table (header only) and
    past it (new L1 table), 512-byte clusters (an L1 table of many clusters,
    refcount structures growing), extended L2 entries, an external raw data
    file (grown with the image, as QEMU grows it), a backing chain;
    each time: data written before the resize reads back, no write of the
    image went through the page cache, the frontend sees
    the new capacity (config space), query-named-block-nodes and
    `qemu-img info -U` show the new size, data written past the old end reads
    back through vqcowd and, after quit, through qemu-io, and `qemu-img check`
    is clean;
  * a resize while a vqcow-fe bench writes (no error, no stall over 1 s; a
    stall's message says whether vqcowd itself held a request that long, from
    its latency histogram, and what the machine did meanwhile: a sleeping
    thread's worst oversleep, a growing file's worst append and fdatasync;
    a stall while the disk alone took >= 0.1 s runs the part once more on a
    fresh image, and a second stall fails);
  * refusals with clear errors: shrinking, an unaligned size, a v2 image with
    internal snapshots (QEMU's text), and the image untouched after each; an
    image with a persistent dirty bitmap grows;
  * write-back's tail stays on after a grow: FLUSH-heavy writes after it
    start batches beside the tail (query-blockstats' writeback-tail-starts);
  * kill -9 right after a resize and a write past the old end: `qemu-img check`
    finds no corruption (leaks allowed), the size is the new one and the write
    reads back (a write the guest saw complete survives a process death);
  * kill -9 at random moments while a resize of a 512-byte-cluster image is
    being written, under a bench: every time the image is consistent and its
    size is the old or the new one;
  * the same grow through qemu-storage-daemon gives the same reply and size
    (skipped visibly without qemu-storage-daemon).

Usage: test_resize.py VQCOWD VQCOW-FE WORKDIR
"""

import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import threading
import time

from qmplib import (SKIP, Daemon, Qmp, check, expect_error, fe, fe_capacity, log, qsd_running,
                    run_main, setup_work, wait_unlocked)

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def img(*args, ok=(0,)):
    r = subprocess.run([QEMU_IMG] + [str(a) for a in args], capture_output=True, timeout=120)
    check(r.returncode in ok, "qemu-img %s: rc %d\n%s%s" % (
        " ".join(map(str, args)), r.returncode, r.stdout.decode(errors="replace"),
        r.stderr.decode(errors="replace")))
    return r


def info(path, *extra):
    return json.loads(img("info", "--output=json", *extra, path).stdout)


def check_clean(path, what):
    r = img("check", "--output=json", path, ok=(0, 2, 3))
    j = json.loads(r.stdout) if r.stdout.strip().startswith(b"{") else {}
    check(r.returncode == 0 and not j.get("leaks") and not j.get("corruptions"),
          "%s: qemu-img check: rc %d %s" % (what, r.returncode, r.stdout.decode()))


def check_consistent(path, what):
    """No corruption; leaked clusters are allowed (a crash may leak)."""
    wait_unlocked(path)
    r = img("check", "--output=json", path, ok=(0, 2, 3))
    j = json.loads(r.stdout)
    check(r.returncode in (0, 3) and not j.get("corruptions") and
          not j.get("check-errors"), "%s: qemu-img check: rc %d %s" % (
              what, r.returncode, r.stdout.decode()))
    return j.get("leaks", 0)


def qemu_io_read(path, off, length, fmt="qcow2"):
    r = subprocess.run([QEMU_IO, "-f", fmt, "-c", "read -v %d %d" % (off, length), path],
                       capture_output=True, timeout=60)
    check(r.returncode == 0, "qemu-io read: %s" % r.stderr.decode(errors="replace"))
    data = bytearray()
    for line in r.stdout.decode().splitlines():
        if len(line) > 10 and line[8] == ":":
            data += bytes.fromhex("".join(line[9:].split()[:16]))
    return bytes(data[:length])


def grow_and_check(vqcowd, fe_bin, work, name, create_opts, size, new, extra=(),
                   dd_backing=None):
    path = os.path.join(work, name + ".qcow2")
    img("create", "-q", "-f", "qcow2", *create_opts, path, size)
    d = Daemon(vqcowd, work, path, name, list(extra))
    try:
        q = Qmp(d.qsock)
        before = os.urandom(65536)
        after = os.urandom(65536 + 512)
        fe(fe_bin, "write", d.vsock, 0, len(before), stdin=before)
        r = q.cmd("block_resize", {"node-name": "disk0", "size": new})
        check(r == {"return": {}}, "%s: block_resize: %r" % (name, r))
        check(fe_capacity(fe_bin, d.vsock) == new, "%s: the frontend does not see %d"
              % (name, new))
        check(q.ret("query-named-block-nodes")[0]["image"]["virtual-size"] == new,
              "%s: virtual-size not updated" % name)
        check(info(path, "-U")["virtual-size"] == new, "%s: qemu-img info -U" % name)
        tail = new - len(after)
        fe(fe_bin, "write", d.vsock, size, len(after), stdin=after)     # just past the old end
        fe(fe_bin, "write", d.vsock, tail, len(after), stdin=after)     # at the new end
        r = subprocess.run([fe_bin, "read", d.vsock, str(size), str(len(after))], capture_output=True,
                           timeout=60)
        check(r.returncode == 0 and r.stdout == after, "%s: read past the old end" % name)
        r = subprocess.run([fe_bin, "read", d.vsock, "0", str(len(before))], capture_output=True,
                           timeout=60)
        check(r.returncode == 0 and r.stdout == before, "%s: data before the resize" % name)
        # the grow's header (and a relocated refcount table's pointer) went
        # out as whole sectors through O_DIRECT: no page-cache write, which
        # would turn write-back's tail off for the rest of the session
        eng = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        check(eng["page-cache-written"] == 0, "%s: the image took a write through the page "
              "cache: %r" % (name, eng))
        check(q.cmd("quit") == {"return": {}}, "quit")
        d.p.wait(20)
        check(d.p.returncode == 0, "%s: vqcowd exit %d" % (name, d.p.returncode))
    except Exception:
        d.stop_showing_log()
        raise
    check_clean(path, name)
    check(info(path)["virtual-size"] == new, "%s: qemu-img info after close" % name)
    check(qemu_io_read(path, size, len(after)) == after, "%s: qemu-io past the old end" % name)
    check(qemu_io_read(path, tail, len(after)) == after, "%s: qemu-io at the new end" % name)
    check(qemu_io_read(path, 0, len(before)) == before, "%s: qemu-io before" % name)
    log("ok: %s: %d -> %d online, data before/after, qemu-img info/check/qemu-io agree"
        % (name, size, new))
    return path


def test_geometries(vqcowd, fe_bin, work):
    m = 1 << 20
    # inside the L1 table: only the header changes
    grow_and_check(vqcowd, fe_bin, work, "hdronly", [], 8 * m, 200 * m)
    # past it: a new L1 table
    grow_and_check(vqcowd, fe_bin, work, "l1grow", [], 8 * m, 3 << 30)
    # 512-byte clusters: 64 entries per L2, an L1 table of 16 clusters
    grow_and_check(vqcowd, fe_bin, work, "small", ["-o", "cluster_size=512"], 1 * m, 32 * m)
    grow_and_check(vqcowd, fe_bin, work, "extl2", ["-o", "extended_l2=on,cluster_size=64k"],
                   8 * m, (1 << 30) + 64 * m)
    data = os.path.join(work, "ext.data")
    grow_and_check(vqcowd, fe_bin, work, "extdata",
                       ["-o", "data_file=%s,data_file_raw=on" % data], 4 * m, 700 * m)
    check(os.path.getsize(data) >= 700 * m, "the external data file did not grow")
    base = os.path.join(work, "base.qcow2")
    img("create", "-q", "-f", "qcow2", base, 4 * m)
    grow_and_check(vqcowd, fe_bin, work, "top", ["-b", base, "-F", "qcow2"], 4 * m, 600 * m)


def test_refusals(vqcowd, fe_bin, work):
    m = 1 << 20
    path = os.path.join(work, "ref.qcow2")
    img("create", "-q", "-f", "qcow2", path, 8 * m)
    d = Daemon(vqcowd, work, path, "ref")
    try:
        q = Qmp(d.qsock)
        expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": 4 * m}),
                     "GenericError", "shrinking is not supported", "qcow2 shrink")
        expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": 8 * m + 100}),
                     "GenericError", "multiple of 512", "qcow2 unaligned")
        expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": 1 << 62}),
                     "GenericError", "L1 table larger than", "qcow2 too large")
        check(q.cmd("block_resize", {"node-name": "disk0", "size": 8 * m}) == {"return": {}},
              "same size")
        check(fe_capacity(fe_bin, d.vsock) == 8 * m, "capacity changed")
        q.cmd("quit")
        d.p.wait(20)
    finally:
        d.stop()
    check_clean(path, "refusals")
    check(info(path)["virtual-size"] == 8 * m, "refused resizes changed the size")

    v2 = os.path.join(work, "v2.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, 8 * m)
    img("snapshot", "-c", "s1", v2)
    d = Daemon(vqcowd, work, v2, "v2")
    try:
        q = Qmp(d.qsock)
        expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": 16 * m}),
                     "GenericError", "Can't resize a v2 image which has snapshots",
                     "v2 with snapshots")
        q.cmd("quit")
        d.p.wait(20)
    finally:
        d.stop()
    r = img("resize", v2, 16 * m, ok=(1,))
    check(b"Can't resize a v2 image which has snapshots" in r.stderr, "qemu-img's text")

    bm = os.path.join(work, "bm.qcow2")
    img("create", "-q", "-f", "qcow2", bm, 8 * m)
    img("bitmap", "--add", bm, "b0")
    d = Daemon(vqcowd, work, bm, "bm")
    try:
        q = Qmp(d.qsock)
        r = q.cmd("block_resize", {"node-name": "disk0", "size": 16 * m})
        check(r.get("return") == {}, "image with bitmaps: %r" % r)
        q.cmd("quit")
        d.p.wait(20)
    finally:
        d.stop()
    check_clean(bm, "bitmaps")
    check(info(bm)["virtual-size"] == 16 * m, "bitmap image not resized")
    log("ok: refusals leave the image as it was; an image with a bitmap grows "
        "(integration.qmp.bitmap_np checks the bits)")


SLOW_NS = 10 ** 8  # 0.1 s
STALL_NS = 10 ** 9  # 1 s: a guest request this slow is a stall
# The shared machine's disk alone was seen to hold a 4 KiB O_DIRECT append
# for 1.5 s and an fdatasync for 0.7 s; an allocating guest write waits for
# up to 5 fdatasyncs in a row (7 while a grow is written back), the same on
# bc716b1, so 0.1 s of the disk's own is enough for a stall: then the part
# runs once more on a fresh image, and a second stall fails.
MACHINE_DISK_STALL_S = 0.1


class MachineProbe:
    """What the machine alone does to latency while the bench runs, so that a
    stall can be told from the machine's: a thread that sleeps 10 ms at a
    time (its worst oversleep: how long a runnable thread waited for a CPU)
    and one that appends 4 KiB to a file in WORK with O_DIRECT and
    fdatasync()s it (as the image grows) every 50 ms (its worst sync)."""

    def __init__(self, work):
        self.path = os.path.join(work, "probe.dat")
        self.stopping = threading.Event()
        self.oversleep = 0.0
        self.write = 0.0
        self.sync = 0.0
        self.threads = []

    def _sleeper(self):
        while not self.stopping.is_set():
            t = time.monotonic()
            time.sleep(0.01)
            self.oversleep = max(self.oversleep, time.monotonic() - t - 0.01)

    def _syncer(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        except OSError:
            return  # no O_DIRECT here: the sleeper still reports
        buf = mmap.mmap(-1, 4096)
        off = 0
        try:
            while not self.stopping.is_set():
                t = time.monotonic()
                os.pwrite(fd, buf, off)
                off += 4096
                u = time.monotonic()
                os.fdatasync(fd)
                self.write = max(self.write, u - t)
                self.sync = max(self.sync, time.monotonic() - u)
                self.stopping.wait(0.05)
        finally:
            os.close(fd)
            os.unlink(self.path)

    def start(self):
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._sleeper, self._syncer)]
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(10)
        self.threads = []

    def disk_stalled(self):
        """The disk alone took long: a 4 KiB write or its fdatasync."""
        return max(self.write, self.sync) >= MACHINE_DISK_STALL_S

    def report(self):
        return ("the machine meanwhile: worst oversleep of a 10 ms sleep %.0f ms, worst 4 KiB "
                "O_DIRECT append %.0f ms and fdatasync %.0f ms"
                % (self.oversleep * 1000, self.write * 1000, self.sync * 1000))


def test_under_io(vqcowd, fe_bin, work):
    for attempt in (1, 2):
        stall, probe = under_io_once(vqcowd, fe_bin, work, attempt)
        if not stall:
            log("ok: 4 resizes while a bench ran: no error, no stall, image clean")
            return
        check(attempt == 1 and probe.disk_stalled(), stall)
        log("under I/O: %s; the disk alone stalled meanwhile: once more on a fresh image"
            % stall.split("; vqcowd's log")[0])


def under_io_once(vqcowd, fe_bin, work, attempt):
    """(None, probe), or (what stalled, probe): the image is checked either way."""
    m = 1 << 20
    path = os.path.join(work, "io%d.qcow2" % attempt)
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, 16 * m)
    d = Daemon(vqcowd, work, path, "io%d" % attempt)
    stall = None
    probe = MachineProbe(work)
    try:
        q = Qmp(d.qsock)
        # vqcowd's own view of each request (from its parsing to its
        # completion): a stall the bench sees that vqcowd did not is
        # outside its request handling (ring, wake-ups, the machine).
        q.ret("block-latency-histogram-set", {"id": "disk0", "boundaries": [SLOW_NS, STALL_NS]})
        probe.start()
        bench = subprocess.Popen([fe_bin, "bench", d.vsock, "--rw", "randrw", "--bs", "4k",
                                  "--iodepth", "16", "--size", "16M", "--runtime", "3",
                                  "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.8)
        new = 16 * m
        for k in range(4):
            new += 512 * m
            r = q.cmd("block_resize", {"node-name": "disk0", "size": new})
            check(r == {"return": {}}, "resize %d under I/O: %r" % (k, r))
            time.sleep(0.3)
        out, err = bench.communicate(timeout=60)
        probe.stop()
        check(bench.returncode == 0, "bench during resize: %s" % err.decode(errors="replace"))
        res = json.loads(out)
        st = q.ret("query-blockstats")[0]["stats"]
        seen = {k: st["%s_latency_histogram" % p]["bins"] for k, p in (("read", "rd"),
                                                                     ("write", "wr"))}
        for k in ("read", "write"):
            check(res[k]["ios"] > 0 and res[k]["errors"] == 0, "bench %s: %r" % (k, res[k]))
            if res[k]["lat_us"]["max"] >= STALL_NS / 1000 and not stall:
                stall = ("I/O stalled during the resize: %s max %.0f us; vqcowd's own "
                         "latencies (< 0.1 s, < 1 s, >= 1 s): %r; %s; vqcowd's log:\n%s"
                         % (k, res[k]["lat_us"]["max"], seen[k], probe.report(),
                            d.log()[-3000:]))
        log("under I/O: bench max read %.0f us, write %.0f us; vqcowd's own latencies "
            "(< 0.1 s, < 1 s, >= 1 s): read %r, write %r; %s"
            % (res["read"]["lat_us"]["max"], res["write"]["lat_us"]["max"], seen["read"],
               seen["write"], probe.report()))
        check(fe_capacity(fe_bin, d.vsock) == new, "capacity after resizes under I/O")
        fe(fe_bin, "verify", d.vsock, "--size", "1M", "--offset", str(new - m))
        q.cmd("quit")
        d.p.wait(20)
        check(d.p.returncode == 0, "exit %d" % d.p.returncode)
    except Exception:
        probe.stop()
        d.stop_showing_log()
        raise
    check_clean(path, "under I/O")
    check(info(path)["virtual-size"] == new, "size after resizes under I/O")
    return stall, probe


def test_tail_after_grow(vqcowd, fe_bin, work):
    """Write-back's tail (a batch started beside the last fdatasync of the one
    before) stays on after an online grow that moved the L1 table: FLUSH-heavy
    allocating writes after it start batches beside the tail, and no write of
    the image went through the page cache (which turns the tail off)."""
    m = 1 << 20
    path = os.path.join(work, "tail.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, 16 * m)
    d = Daemon(vqcowd, work, path, "tail")
    try:
        q = Qmp(d.qsock)
        check(q.cmd("block_resize", {"node-name": "disk0", "size": 600 * m}) == {"return": {}},
              "resize")
        e0 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        fe(fe_bin, "bench", d.vsock, "--rw", "randwrite", "--bs", "4k", "--iodepth", "16",
           "--offset", str(16 * m), "--size", str(64 * m), "--number-ios", "3000",
           "--flush-every", "8")
        e1 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        check(e0["page-cache-written"] == 0 and e1["page-cache-written"] == 0,
              "a write through the page cache: %r / %r" % (e0, e1))
        n = e1["writeback-tail-starts"] - e0["writeback-tail-starts"]
        check(n > 0, "no batch beside the tail after the grow: %r / %r" % (e0, e1))
        q.cmd("quit")
        d.p.wait(20)
        check(d.p.returncode == 0, "exit %d" % d.p.returncode)
    except Exception:
        d.stop_showing_log()
        raise
    check_clean(path, "tail after grow")
    log("ok: after a grow: %d of %d write-back batches started beside the tail, no "
        "page-cache write" % (n, e1["writeback-batches"] - e0["writeback-batches"]))


def test_kill_after(vqcowd, fe_bin, work):
    m = 1 << 20
    path = os.path.join(work, "ka.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, 1 * m)
    d = Daemon(vqcowd, work, path, "ka")
    data = os.urandom(4096)
    try:
        q = Qmp(d.qsock)
        check(q.cmd("block_resize", {"node-name": "disk0", "size": 48 * m}) == {"return": {}},
              "resize")
        fe(fe_bin, "write", d.vsock, 40 * m, len(data), stdin=data)
    finally:
        d.p.send_signal(signal.SIGKILL)
        d.p.wait(10)
    leaks = check_consistent(path, "kill -9 after resize")
    check(info(path)["virtual-size"] == 48 * m, "size after kill -9")
    check(qemu_io_read(path, 40 * m, len(data)) == data, "write past the old end lost")
    log("ok: kill -9 after a resize and a write past the old end: consistent (%d leaked), "
        "new size, data there" % leaks)


def test_kill_during(vqcowd, fe_bin, work, rounds=8):
    m = 1 << 20
    rng = random.Random(int(os.environ.get("VQCOW_RESIZE_SEED", "11")))
    seen = set()
    for i in range(rounds):
        path = os.path.join(work, "kd%d.qcow2" % i)
        img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, 2 * m)
        d = Daemon(vqcowd, work, path, "kd%d" % i)
        bench = subprocess.Popen([fe_bin, "bench", d.vsock, "--rw", "randwrite", "--bs", "4k",
                                  "--iodepth", "8", "--size", "2M", "--runtime", "5"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            q = Qmp(d.qsock)
            q.send_raw(json.dumps({"execute": "block_resize",
                                   "arguments": {"node-name": "disk0", "size": 64 * m}}) + "\n")
            time.sleep(rng.random() * 0.006)
        finally:
            d.p.send_signal(signal.SIGKILL)
            d.p.wait(10)
            bench.kill()
            bench.wait(10)
        check_consistent(path, "kill -9 during resize, round %d" % i)
        sz = info(path)["virtual-size"]
        check(sz in (2 * m, 64 * m), "round %d: size %d" % (i, sz))
        seen.add(sz)
        os.unlink(path)
    log("ok: kill -9 during resize x%d: consistent every time, sizes seen %s"
        % (rounds, sorted(seen)))


def test_qsd(work):
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        log("SKIP (visible): qemu-storage-daemon not installed: no comparison")
        return False
    m = 1 << 20
    path = os.path.join(work, "qsd.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, 1 * m)
    qs = os.path.join(work, "qsd.qmp")
    with qsd_running(qsd, qs, path) as p:
        a = Qmp(qs)
        r = a.cmd("block_resize", {"node-name": "disk0", "size": 32 * m})
        check(r == {"return": {}}, "qsd block_resize: %r" % r)
        n = [x for x in a.ret("query-named-block-nodes") if x["node-name"] == "disk0"][0]
        check(n["image"]["virtual-size"] == 32 * m, "qsd virtual-size")
        expect_error(a.cmd("block_resize", {"node-name": "disk0", "size": 32 * m + 100}),
                     "GenericError", "", "qsd unaligned")
        a.cmd("quit")
        p.wait(10)
    check_clean(path, "qsd")
    log("ok: qemu-storage-daemon: the same reply and size for the same grow")
    return True


def main():
    vqcowd, fe_bin, work = setup_work(3, "qemu-img", "qemu-io")
    test_geometries(vqcowd, fe_bin, work)
    test_refusals(vqcowd, fe_bin, work)
    test_under_io(vqcowd, fe_bin, work)
    test_tail_after_grow(vqcowd, fe_bin, work)
    test_kill_after(vqcowd, fe_bin, work)
    test_kill_during(vqcowd, fe_bin, work)
    if not test_qsd(work):
        return SKIP
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
