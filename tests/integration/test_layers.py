#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""External snapshots and block-commit online (issue 11), through a real QMP client.

  * blockdev-snapshot-sync while a writer (vqcow-fe, one request stream of
    random-sized writes at random offsets, every byte it wrote remembered)
    runs: the overlay is created with the old image as its backing file
    (absolute path, backing format recorded: qemu-img info), the old layer
    holds QEMU's read-only lock set afterwards (qemu-io -r can open it,
    qemu-img write refuses), query-named-block-nodes shows the chain with the
    new node name, errors (duplicate node name, bad mode, format raw, missing
    node, existing file) are QEMU's;
  * block-commit of the active layer while the writer runs: query-block-jobs
    fields, BLOCK_JOB_READY, block-job-complete pivots back to the base
    (query-named-block-nodes: one node again, write lock on the base), the
    overlay is closed (unlocked); every byte the writer wrote reads back
    through vqcow-fe and, after the daemon stopped, from the base with
    qemu-img; qemu-img check clean on both files;
  * block-job-cancel before ready (BLOCK_JOB_CANCELLED, the chain unchanged,
    the base read-only again) and after ready (BLOCK_JOB_COMPLETED, not
    pivoted); speed: a 1 MiB/s job copies about that much per second;
    block-job-set-speed lifts it; pause/resume;
  * kill -9 of the daemon at several points of a commit (scanning, copying,
    ready, completing): both files pass qemu-img check and the chain reads
    what the writer wrote (qemu-img compare against the shadow copy);
  * vqcowctl snapshot external, jobs and commit SPEED under the writer;
  * the backup recipe, contrib/vqcow-backup.py, with the writer running: the
    backup holds the disk as of the snapshot, the image is the active layer
    again, the overlay is gone, every byte reads back;
  * the same QMP conversation against qemu-storage-daemon 7.2 (when
    present): the field names of query-block-jobs and the events match ours.

Usage: test_layers.py VQCOWD VQCOW-FE WORKDIR [VQCOWCTL]
"""

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import bitmaplib
import qmplib
from qmplib import Fail, check, log, qimg_check

MiB = 1024 * 1024


class Qmp(qmplib.Qmp):
    """60 s for every reply (jobs run under I/O load here), not 10."""

    def __init__(self, path):
        super().__init__(path, timeout=60)


class Daemon(qmplib.Daemon):
    """Names are reused across runs: stale sockets go first; stop() wants exit 0."""

    def __init__(self, vqcowd, work, image, name, extra=()):
        super().__init__(vqcowd, work, image, name, extra, unlink_stale=True)

    def stop(self):
        super().stop(timeout=30, check_exit=True)


def run(*args, ok=True, stdin=None):
    r = subprocess.run([str(a) for a in args], input=stdin, capture_output=True, timeout=300)
    if ok:
        check(r.returncode == 0, "%s: rc %d\n%s%s" % (args, r.returncode,
                                                    r.stdout.decode(errors="replace")[-2000:],
                                                    r.stderr.decode(errors="replace")))
    return r


class Writer:
    """One request stream of writes (vqcow-fe write per request); a shadow of the disk."""

    def __init__(self, fe, vsock, size, seed):
        self.fe, self.vsock, self.size = fe, vsock, size
        self.rng = random.Random(seed)
        self.shadow = bytearray(size)
        self.stop_ev = threading.Event()
        self.n = 0
        self.log = []
        self.error = None
        self.t = None

    def write(self, off, data):
        t0 = time.monotonic()
        run(self.fe, "write", self.vsock, off, len(data), stdin=data)
        self.shadow[off:off + len(data)] = data
        self.log.append((t0, time.monotonic(), off, data))
        self.n += 1

    def state_at(self, t0, t1):
        """The disk as of a cut taken between t0 and t1: (bytes, mask of bytes that may
        differ because their write was in flight across the cut)."""
        img = bytearray(self.size)
        unsure = []
        for (a, b, off, data) in self.log:
            if b < t0:
                img[off:off + len(data)] = data
            elif a <= t1:
                unsure.append((off, len(data)))
        return img, unsure

    def fill(self, nbytes=None):
        """Write the whole disk (or its first nbytes) with random data, in 1 MiB requests."""
        end = nbytes or self.size
        for off in range(0, end, MiB):
            self.write(off, self.rng.randbytes(min(MiB, end - off)))

    def _loop(self):
        try:
            while not self.stop_ev.is_set():
                n = self.rng.choice([4096, 65536, 131072, 512 * 1024])
                off = self.rng.randrange(0, (self.size - n) // 4096) * 4096
                self.write(off, self.rng.randbytes(n))
        except Exception as e:  # reported by stop()
            self.error = e

    def start(self):
        self.stop_ev.clear()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def stop(self):
        self.stop_ev.set()
        self.t.join(60)
        if self.error:
            raise Fail("writer: %s" % self.error)

    def verify_fe(self, what):
        got = run(self.fe, "read", self.vsock, 0, self.size).stdout
        if got != bytes(self.shadow) and os.environ.get("LAYERS_DEBUG"):
            o = first_diff(got, self.shadow)
            for (a, b, off, data) in self.log:
                if off <= o < off + len(data):
                    log("write %d+%d at %.3f..%.3f; got==this write: %s" % (
                        off, len(data), a, b, got[o:o + 4096] == data[o - off:o - off + 4096]))
            log("diff range: %d..%d" % (o, o + next((i for i in range(0, self.size - o, 4096)
                                                     if got[o + i:o + i + 4096] ==
                                                     self.shadow[o + i:o + i + 4096]), 0)))
        check(got == bytes(self.shadow), "%s: data read through vqcow-fe differs from what "
              "was written (first difference at %d)" % (what, first_diff(got, self.shadow)))
        log("ok: %s: %d MiB read back through the device as written (%d writes)" %
            (what, self.size // MiB, self.n))


def first_diff(a, b):
    for i in range(0, min(len(a), len(b)), 4096):
        if a[i:i + 4096] != b[i:i + 4096]:
            return i
    return min(len(a), len(b))


def verify_file(path, shadow, work, what):
    """Read @path through its backing chain with qemu-img and compare."""
    out = os.path.join(work, "verify.raw")
    run("qemu-img", "convert", "-U", "-O", "raw", path, out)
    got = open(out, "rb").read()
    os.unlink(out)
    check(got == bytes(shadow), "%s: %s through its chain differs from what was written "
          "(first difference at %d)" % (what, path, first_diff(got, shadow)))
    log("ok: %s: %s reads through its chain as written" % (what, path))


def qcheck(path, what, leaks_ok=False):
    """qemu-img check: clean; after a kill -9 (@leaks_ok) leaked clusters are
    allowed too (rc 3: the refcounts vqcowd raised ahead of need for a file it
    was writing), never an error or a corruption (rc 2)."""
    rc = qimg_check(path, what, leaks_ok, share=True)
    log("ok: %s: qemu-img check %s %s" % (what, path, "clean" if rc == 0 else
                                           "consistent (leaked clusters only)"))


def info(path):
    return json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)


def alone(path):
    """@path without its backing chain (the locks of that one file)."""
    return "json:" + json.dumps({"driver": "qcow2", "backing": None,
                                 "file": {"driver": "file", "filename": path}})


def can_write_lock(path):
    """True if qemu-io may open @path read-write now (nobody holds or blocks its write lock)."""
    r = run("qemu-io", "-c", "quit", alone(path), ok=False)
    return r.returncode == 0


def can_read_lock(path):
    r = run("qemu-io", "-r", "-c", "quit", alone(path), ok=False)
    return r.returncode == 0


def nodes(q):
    return [(n["node-name"], n["file"], n["ro"]) for n in q.ret("query-named-block-nodes")]


def new_disk(work, name, size):
    p = os.path.join(work, name)
    if os.path.exists(p):
        os.unlink(p)
    run("qemu-img", "create", "-q", "-f", "qcow2", p, size)
    return p


# ---- tests ----

def test_snapshot_and_commit(vqcowd, fe, work):
    size = 64 * MiB
    base = new_disk(work, "base.qcow2", size)
    ov = os.path.join(work, "ov1.qcow2")
    if os.path.exists(ov):
        os.unlink(ov)
    open(base + ".old", "w").write("someone's file\n")
    d = Daemon(vqcowd, work, base, "sc")
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 1)
        w.fill(16 * MiB)
        check(nodes(q) == [("disk0", base, False)], "nodes before: %r" % nodes(q))
        # errors first (QEMU's texts where QEMU has the case)
        q.err("blockdev-snapshot-sync", {"node-name": "nope", "snapshot-file": ov},
              "Cannot find device='' nor node-name='nope'", "snapshot of a missing node")
        q.err("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                         "mode": "bogus"}, "mode", "bad mode")
        q.err("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                         "format": "raw"}, "raw", "format raw")
        q.err("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                         "snapshot-node-name": "disk0"},
              "Duplicate nodes with node-name='disk0'", "duplicate node name")
        q.err("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                         "snapshot-node-name": "1bad"},
              "Invalid node-name", "invalid node name")
        check(not os.path.exists(ov), "a refused snapshot left %s" % ov)
        q.err("block-commit", {"device": "disk0", "job-id": "j"}, "has no backing file",
              "commit without a backing file")

        w.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                         "snapshot-node-name": "ov1", "format": "qcow2"})
        t1 = time.monotonic()
        log("ok: blockdev-snapshot-sync under I/O answered in %.1f ms" % ((t1 - t0) * 1000))
        time.sleep(0.5)
        n = nodes(q)
        check(n == [("ov1", ov, False), ("disk0", base, True)], "nodes after snapshot: %r" % n)
        nb = q.ret("query-named-block-nodes")
        check(nb[0]["backing_file_depth"] == 1 and nb[0]["image"]["backing-image"]["filename"]
              == base, "chain in query-named-block-nodes: %r" % nb[0])
        exp = q.ret("query-block-exports")
        check(exp[0]["node-name"] == "ov1", "export node after snapshot: %r" % exp)
        log("ok: query-named-block-nodes shows ov1 -> disk0 (read-only)")
        i = info(ov)
        check(i.get("backing-filename") == base and i.get("backing-filename-format") == "qcow2",
              "overlay header: %r" % i)
        log("ok: the overlay names %s (qcow2) as its backing file" % base)
        # the old layer: read-only locks (QEMU's): readers welcome, writers not
        check(can_read_lock(base), "qemu-io -r cannot open the old layer")
        check(not can_write_lock(base), "qemu-io could open the old layer read-write")
        check(not can_read_lock(ov), "qemu-io -r could open the active overlay")
        log("ok: the old layer holds the read-only lock set (qemu-io -r opens it, rw refused)")
        q.err("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov + ".x"},
              "Node 'disk0' is busy: node is used as backing hd of 'ov1'",
              "snapshot of a backing node")
        q.err("blockdev-snapshot-sync", {"node-name": "ov1", "snapshot-file": ov,
                                         "snapshot-node-name": "ov2"},
              "same filename as the backing file", "snapshot onto the active layer's file")
        q.err("blockdev-snapshot-sync", {"node-name": "ov1", "snapshot-file": base + ".old",
                                         "snapshot-node-name": "ov2"},
              "exists", "snapshot onto an existing file")
        # the frozen base, copied while the guest writes, holds the data at snapshot time
        cp = os.path.join(work, "backup.raw")
        run("qemu-img", "convert", "-U", "-O", "raw", base, cp)
        w.stop()
        frozen, unsure = w.state_at(t0, t1)
        got = bytearray(open(cp, "rb").read())
        for off, n in unsure:
            got[off:off + n] = frozen[off:off + n]
        check(got == frozen, "the copy of the frozen base differs from the data at snapshot "
              "time (first difference at %d)" % first_diff(got, frozen))
        log("ok: the frozen base copied while the guest writes holds the snapshot's data "
            "(%d write(s) in flight across the snapshot)" % len(unsure))
        w.verify_fe("after snapshot")

        # commit
        w.start()
        q.err("block-commit", {"device": "disk0", "job-id": "j"}, "Need a root block node",
              "commit of a backing node")
        log("commit at %.3f" % time.monotonic())
        q.ret("block-commit", {"device": "ov1", "job-id": "j1"})
        q.err("block-commit", {"device": "ov1", "job-id": "j2"}, "busy", "second job")
        q.err("blockdev-snapshot-sync", {"node-name": "ov1", "snapshot-file": ov + ".y"},
              "busy", "snapshot during a job")
        jobs = q.ret("query-block-jobs")
        check(len(jobs) == 1, "query-block-jobs: %r" % jobs)
        j = jobs[0]
        for k in ("type", "device", "len", "offset", "busy", "paused", "speed", "io-status",
                  "ready", "status", "auto-finalize", "auto-dismiss"):
            check(k in j, "query-block-jobs lacks %r: %r" % (k, j))
        check(j["type"] == "commit" and j["device"] == "j1", "job: %r" % j)
        q.err("block-job-complete", {"device": "nojob"}, "not found", "complete of no job")
        e = q.wait_event("BLOCK_JOB_READY")
        st = [x["data"]["status"] for x in q.events if x["event"] == "JOB_STATUS_CHANGE"]
        check(st == ["created", "running", "ready"], "JOB_STATUS_CHANGE until ready: %r" % st)
        check(e["data"]["type"] == "commit" and e["data"]["device"] == "j1", "ready: %r" % e)
        j = q.ret("query-block-jobs")[0]
        check(j["ready"] and j["status"] == "ready", "after READY: %r" % j)
        log("ok: BLOCK_JOB_READY (%d bytes copied); query-block-jobs ready" % e["data"]["offset"])
        time.sleep(1.0)  # the guest keeps writing while ready
        log("complete at %.3f" % time.monotonic())
        q.ret("block-job-complete", {"device": "j1"})
        e = q.wait_event("BLOCK_JOB_COMPLETED")
        check("error" not in e["data"] and e["data"]["len"] == e["data"]["offset"],
              "completed: %r" % e)
        time.sleep(0.2)
        q.cmd("query-block-jobs")
        st = [x["data"]["status"] for x in q.events if x["event"] == "JOB_STATUS_CHANGE"]
        check(st[-5:] == ["ready", "waiting", "pending", "concluded", "null"], "JOB_STATUS_CHANGE: %r" % st)
        check(q.ret("query-block-jobs") == [], "job still listed")
        time.sleep(0.5)
        n = nodes(q)
        check(n == [("disk0", base, False)], "nodes after commit: %r" % n)
        exp = q.ret("query-block-exports")
        check(exp[0]["node-name"] == "disk0", "export node after commit: %r" % exp)
        log("ok: block-job-complete pivoted: disk0 is the active layer again")
        w.stop()
        check(can_write_lock(ov), "the overlay is still locked after the pivot")
        check(not can_read_lock(base), "the base is not write-locked after the pivot")
        log("ok: overlay closed (unlocked), base holds the write lock")
        w.verify_fe("after commit")
        q.close()
    finally:
        d.stop()
    qcheck(base, "after commit")
    qcheck(ov, "after commit")
    verify_file(base, w.shadow, work, "after commit")
    statuses = [l for l in d.log().splitlines() if "qmp:" in l]
    log("daemon said:\n  " + "\n  ".join(statuses[-8:]))


def test_cancel_speed(vqcowd, fe, work):
    size = 32 * MiB
    base = new_disk(work, "cbase.qcow2", size)
    ov = os.path.join(work, "cov.qcow2")
    if os.path.exists(ov):
        os.unlink(ov)
    d = Daemon(vqcowd, work, base, "cs", ["--node-name", "drive"])
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 2)
        w.fill(4 * MiB)
        q.ret("blockdev-snapshot-sync", {"device": "drive", "snapshot-file": ov})
        n = nodes(q)
        check(n[0][0].startswith("#block") and n[1][0] == "drive", "auto node name: %r" % n)
        top = n[0][0]
        w.fill()  # 32 MiB into the overlay
        # a slow job: 1 MiB/s (32 MiB take 32 s: it cannot be ready before the cancel
        # below, even on a loaded machine)
        q.ret("block-commit", {"device": top, "job-id": "slow", "speed": MiB})
        t0 = time.monotonic()
        time.sleep(2.0)
        j = q.ret("query-block-jobs")[0]
        el = time.monotonic() - t0
        check(j["speed"] == MiB and not j["ready"], "slow job: %r" % j)
        check(MiB <= j["offset"] <= (el + 2) * MiB,
              "1 MiB/s for %.1f s copied %d bytes" % (el, j["offset"]))
        log("ok: speed 1 MiB/s: %.1f MiB copied in %.1f s" % (j["offset"] / MiB, el))
        q.err("block-job-resume", {"device": "slow"}, "not paused", "resume of a running job")
        q.ret("block-job-pause", {"device": "slow"})
        q.err("block-job-pause", {"device": "slow"}, "Job is already paused", "second pause")
        q.err("block-job-complete", {"device": "slow"},
              "Job 'slow' in state 'paused' cannot accept command verb 'complete'",
              "complete of a paused job")
        time.sleep(0.3)
        o1 = q.ret("query-block-jobs")[0]
        time.sleep(0.5)
        o2 = q.ret("query-block-jobs")[0]
        check(o2["paused"] and o2["status"] == "paused" and o1["offset"] == o2["offset"],
              "paused job moved: %r %r" % (o1, o2))
        q.ret("block-job-resume", {"device": "slow"})
        log("ok: block-job-pause stops the copy, resume goes on")
        j = q.ret("query-block-jobs")[0]
        check(not j["ready"], "the slow job is ready already: %r" % j)
        q.ret("block-job-cancel", {"device": "slow"})
        e = q.wait_event("BLOCK_JOB_CANCELLED")
        check(e["data"]["device"] == "slow" and e["data"]["type"] == "commit", "%r" % e)
        check(q.ret("query-block-jobs") == [], "cancelled job listed")
        check(nodes(q) == [(top, ov, False), ("drive", base, True)], "chain after cancel: %r" %
              nodes(q))
        check(can_read_lock(base) and not can_write_lock(base), "base not read-only after cancel")
        log("ok: block-job-cancel before ready: BLOCK_JOB_CANCELLED, chain unchanged, base "
            "read-only again")
        w.verify_fe("after cancel")
        # set-speed lifts the limit; cancel after ready ends as completed, not pivoted
        q.ret("block-commit", {"device": top, "job-id": "j2", "speed": 1024 * 1024})
        q.ret("block-job-set-speed", {"device": "j2", "speed": 0})
        q.err("block-job-set-speed", {"device": "j2", "speed": -1}, "speed", "negative speed")
        q.wait_event("BLOCK_JOB_READY", 60)
        q.ret("block-job-cancel", {"device": "j2"})
        e = q.wait_event("BLOCK_JOB_COMPLETED")
        check("error" not in e["data"], "%r" % e)
        check(nodes(q) == [(top, ov, False), ("drive", base, True)], "chain after cancel when "
              "ready: %r" % nodes(q))
        log("ok: block-job-cancel when ready: BLOCK_JOB_COMPLETED, not pivoted; "
            "block-job-set-speed 0 lifts the limit")
        # the base got a point-in-time copy: reads as the overlay did
        w.verify_fe("after cancel when ready")
        q.close()
    finally:
        d.stop()
    qcheck(base, "after cancel")
    qcheck(ov, "after cancel")
    verify_file(ov, w.shadow, work, "after cancel")
    verify_file(base, w.shadow, work, "base after cancel when ready (point-in-time copy)")


def test_kill(vqcowd, fe, work):
    """kill -9 at several points of a commit: both files consistent, the chain reads as written."""
    size = 32 * MiB
    for point in ("scan", "copy", "ready", "complete"):
        base = new_disk(work, "kbase.qcow2", size)
        ov = os.path.join(work, "kov.qcow2")
        if os.path.exists(ov):
            os.unlink(ov)
        d = Daemon(vqcowd, work, base, "k")
        try:
            q = Qmp(d.qsock)
            w = Writer(fe, d.vsock, size, 3)
            w.fill(8 * MiB)
            q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                             "snapshot-node-name": "top"})
            w.fill()
            w.start()
            speed = {"scan": 0, "copy": 2 * MiB, "ready": 0, "complete": 0}[point]
            args = {"device": "top", "job-id": "k"}
            if speed:
                args["speed"] = speed
            q.ret("block-commit", args)
            if point == "copy":
                time.sleep(1.5)
            elif point in ("ready", "complete"):
                q.wait_event("BLOCK_JOB_READY")
                time.sleep(0.3)
            if point == "complete":
                q.s.sendall(b'{"execute": "block-job-complete", "arguments": {"device": "k"}}\n')
                time.sleep(0.002)
            w.stop()
        finally:
            d.kill()
        log("killed during %s" % point)
        qcheck(base, "kill -9 during %s" % point, leaks_ok=True)
        qcheck(ov, "kill -9 during %s" % point, leaks_ok=True)
        if point == "complete":
            # either the pivot happened (the base alone holds the data) or not (the chain)
            try:
                verify_file(ov, w.shadow, work, "kill -9 during complete (not pivoted)")
            except Fail:
                verify_file(alone(base), w.shadow, work, "kill -9 during complete (pivoted)")
        else:
            verify_file(ov, w.shadow, work, "kill -9 during %s" % point)


def test_backup(vqcowd, fe, work):
    """contrib/vqcow-backup.py end to end with a writer running."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "contrib",
                          "vqcow-backup.py")
    size = 32 * MiB
    base = new_disk(work, "bk.qcow2", size)
    out = os.path.join(work, "bk-backup.qcow2")
    if os.path.exists(out):
        os.unlink(out)
    d = Daemon(vqcowd, work, base, "bk")
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 7)
        w.fill()
        w.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, script, "-s", d.qsock, "-o", out],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t1, lines = None, []
        for line in p.stdout:
            lines.append(line.rstrip())
            if line.startswith("snapshot:") and t1 is None:
                t1 = time.monotonic()
        rc = p.wait(300)
        w.stop()
        check(rc == 0 and t1, "vqcow-backup.py: rc %d\n%s" % (rc, "\n".join(lines)))
        log("vqcow-backup.py said:\n  " + "\n  ".join(lines))
        check(not os.path.exists(base + ".backup-overlay.qcow2"), "the overlay was left")
        check(nodes(q) == [("disk0", base, False)], "chain after the backup: %r" % nodes(q))
        check(q.ret("query-block-jobs") == [], "a job is left")
        w.verify_fe("after the backup")
        q.close()
    finally:
        d.stop()
    qcheck(base, "after the backup")
    qcheck(out, "the backup")
    frozen, unsure = w.state_at(t0, t1)
    cp = os.path.join(work, "bk.raw")
    run("qemu-img", "convert", "-O", "raw", out, cp)
    got = bytearray(open(cp, "rb").read())
    os.unlink(cp)
    for off, n in unsure:
        got[off:off + n] = frozen[off:off + n]
    check(got == frozen, "the backup differs from the disk at the snapshot (first difference "
          "at %d)" % first_diff(got, frozen))
    log("ok: the backup holds the disk as of the snapshot (%d writes ran meanwhile, %d "
        "across the snapshot); the image is the active layer again and reads as written" %
        (w.n, len(unsure)))
    r = run(sys.executable, script, "--help")
    check("Usage: vqcow-backup.py" in r.stdout.decode(), "--help")
    r = run(sys.executable, script, "-s", os.path.join(work, "nope.qmp"), "-o", out, ok=False)
    check(r.returncode == 2, "vqcow-backup.py without a daemon: rc %d" % r.returncode)
    log("ok: vqcow-backup.py --help, and exit 2 without a daemon")


def test_ctl(vqcowd, fe, ctl, work):
    """vqcowctl snapshot external / jobs / commit under a writer."""
    size = 16 * MiB
    base = new_disk(work, "ctl.qcow2", size)
    ov = os.path.join(work, "ctl-ov.qcow2")
    if os.path.exists(ov):
        os.unlink(ov)
    d = Daemon(vqcowd, work, base, "ctl")
    try:
        q = Qmp(d.qsock)
        w = Writer(fe, d.vsock, size, 9)
        w.fill()
        r = run(ctl, "-s", d.qsock, "snapshot", "external", ov, "top")
        check(r.stdout.decode().strip() == "external snapshot: %s is the active layer" % ov,
              "vqcowctl snapshot external: %r" % r.stdout)
        check(nodes(q) == [("top", ov, False), ("disk0", base, True)], "chain: %r" % nodes(q))
        w.fill()
        w.start()
        r = run(ctl, "-s", d.qsock, "jobs")
        check(r.stdout.decode().split() == ["ID", "TYPE", "STATUS", "OFFSET/LEN", "SPEED",
                                            "READY"], "vqcowctl jobs: %r" % r.stdout)
        r = run(ctl, "-s", d.qsock, "commit", "64M")
        check(r.stdout.decode().strip() == "committed: disk0 is the active layer again",
              "vqcowctl commit: %r" % r.stdout)
        w.stop()
        check(nodes(q) == [("disk0", base, False)], "chain after commit: %r" % nodes(q))
        r = run(ctl, "-s", d.qsock, "commit", ok=False)
        check(r.returncode == 1 and "has no backing file" in r.stderr.decode(),
              "vqcowctl commit without a backing file: %r" % r.stderr)
        r = run(ctl, "-s", d.qsock, "snapshot", "external", ok=False)
        check(r.returncode == 2, "vqcowctl snapshot external without FILE: rc %d" % r.returncode)
        w.verify_fe("after vqcowctl commit")
        q.close()
    finally:
        d.stop()
    qcheck(base, "after vqcowctl commit")
    log("ok: vqcowctl snapshot external, jobs, commit SPEED (waits for ready, pivots), "
        "exit statuses")


def qsd_conversation(q, fe, vsock, base, ov, work, what):
    """The same conversation against vqcowd and qemu-storage-daemon: returns what to compare."""
    out = {}
    q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                     "snapshot-node-name": "ov1", "format": "qcow2"})
    i = info(ov)
    check(i.get("backing-filename") == base and i.get("backing-filename-format") == "qcow2",
          "%s: overlay: %r" % (what, i))
    out["snap-backing"] = q.cmd("blockdev-snapshot-sync", {"node-name": "disk0",
                                                           "snapshot-file": ov + "x"})
    out["snap-missing"] = q.cmd("blockdev-snapshot-sync", {"node-name": "nope",
                                                           "snapshot-file": ov + "x"})
    out["snap-noname"] = q.cmd("blockdev-snapshot-sync", {"node-name": "ov1",
                                                          "snapshot-file": ov + "y"})
    out["snap-same"] = q.cmd("blockdev-snapshot-sync", {"node-name": "ov1",
                                                        "snapshot-file": ov,
                                                        "snapshot-node-name": "ov2"})
    out["snap-badname"] = q.cmd("blockdev-snapshot-sync", {"node-name": "ov1",
                                                           "snapshot-file": ov + "y",
                                                           "snapshot-node-name": "1bad"})
    if os.path.exists(ov + "y"):
        os.unlink(ov + "y")
    out["export"] = q.ret("query-block-exports")[0]["node-name"]
    run(fe, "write", vsock, 0, 8 * MiB, stdin=random.Random(5).randbytes(8 * MiB))
    out["commit-neg"] = q.cmd("block-commit", {"device": "ov1", "job-id": "j0", "speed": -1})
    out["commit-notroot"] = q.cmd("block-commit", {"device": "disk0", "job-id": "j0"})
    q.events = []
    q.ret("block-commit", {"device": "ov1", "job-id": "j1", "speed": 64 * 1024})
    q.ret("block-job-pause", {"device": "j1"})
    time.sleep(0.5)  # QEMU's job pauses at its next yield
    out["pause2"] = q.cmd("block-job-pause", {"device": "j1"})
    out["complete-paused"] = q.cmd("block-job-complete", {"device": "j1"})
    jobs = q.ret("query-block-jobs")
    out["job-keys"] = sorted(jobs[0])
    out["job-paused"] = (jobs[0]["status"], jobs[0]["paused"], jobs[0]["type"])
    q.ret("block-job-resume", {"device": "j1"})
    out["resume2"] = q.cmd("block-job-resume", {"device": "j1"})
    q.ret("block-job-cancel", {"device": "j1"})
    e = q.wait_event("BLOCK_JOB_CANCELLED")
    out["cancelled-keys"] = sorted(e["data"])
    q.wait_event("JOB_STATUS_CHANGE")  # let the null status arrive
    time.sleep(0.3)
    q.cmd("query-block-jobs")
    # (QEMU's rate limit lets a first burst through: it may have been ready already)
    out["cancel-statuses"] = [x["data"]["status"] for x in q.events
                              if x["event"] == "JOB_STATUS_CHANGE"][-3:]
    q.events = []
    q.ret("block-commit", {"device": "ov1", "job-id": "j2"})
    e = q.wait_event("BLOCK_JOB_READY")
    out["ready-keys"] = sorted(e["data"])
    out["ready-job"] = {k: v for k, v in q.ret("query-block-jobs")[0].items()
                        if k not in ("len", "offset", "busy")}
    out["complete-nojob"] = q.cmd("block-job-complete", {"device": "nojob"})
    q.ret("block-job-complete", {"device": "j2"})
    e = q.wait_event("BLOCK_JOB_COMPLETED")
    out["completed-keys"] = sorted(e["data"])
    time.sleep(0.3)
    q.cmd("query-block-jobs")
    out["complete-statuses"] = [x["data"]["status"] for x in q.events
                                if x["event"] == "JOB_STATUS_CHANGE"]
    out["export-after"] = q.ret("query-block-exports")[0]["node-name"]
    return out


@contextlib.contextmanager
def serving(who, qsd, vqcowd, work, image, fmt, name, proto="file"):
    """IMAGE (format FMT, on protocol driver PROTO) served by WHO, "qsd" (node
    disk0 exported over vhost-user-blk on WORK/NAME.vsock, QMP on
    WORK/NAME.qmp) or "vqcowd" (Daemon NAME); yields (Qmp client, vhost-user
    socket) and stops the daemon when the block ends."""
    if who == "qsd":
        vs = os.path.join(work, name + ".vsock")
        qs = os.path.join(work, name + ".qmp")
        for f in (vs, qs):
            if os.path.exists(f):
                os.unlink(f)
        p = qmplib.qsd_vhost_popen(
            qsd, ["driver=%s,filename=%s,node-name=f0" % (proto, image),
                  "driver=%s,file=f0,node-name=disk0" % fmt], vs, qs)
        stop = p.terminate
    else:
        d = Daemon(vqcowd, work, image, name)
        vs, qs, stop = d.vsock, d.qsock, d.stop
    try:
        q = Qmp(qs)
        yield q, vs
        q.close()
    finally:
        stop()
        if who == "qsd":
            p.wait(10)


def test_qsd(vqcowd, fe, work):
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        log("SKIP: qemu-storage-daemon not found: QEMU's answers not compared")
        return False
    res = {}
    for who in ("qsd", "vqcowd"):
        base = new_disk(work, who + "-base.qcow2", 16 * MiB)
        ov = os.path.join(work, who + "-ov.qcow2")
        for f in (ov, ov + "x", ov + "y"):
            if os.path.exists(f):
                os.unlink(f)
        with serving(who, qsd, vqcowd, work, base, "qcow2", who) as (q, vs):
            res[who] = qsd_conversation(q, fe, vs, base, ov, work, who)
    a, b = res["qsd"], res["vqcowd"]
    same = []
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict) and "error" in va:
            # the same error text (our class is always GenericError)
            ok = "error" in vb and vb["error"]["desc"].replace("vq-", "").replace(
                "vqcowd-", "") == va["error"]["desc"].replace("qsd-", "")
        else:
            ok = va == vb
        if k in DIFFERENT:
            check(not ok or k == "ignored", "%s now matches QEMU: update DIFFERENT" % k)
            log("ok: %s differs on purpose: QEMU %r, vqcowd %r" % (k, va, vb))
            continue
        check(ok, "%s: qemu-storage-daemon %r, vqcowd %r" % (k, va, vb))
        same.append(k)
    log("ok: qemu-storage-daemon 7.2 and vqcowd answer alike: %s" % ", ".join(same))
    return True


def job_sequence(q, complete=False):
    """The job's JOB_STATUS_CHANGE statuses and BLOCK_JOB_* events, in order,
    up to status null (block-job-complete sent at BLOCK_JOB_READY when
    @complete); (sequence, the BLOCK_JOB_COMPLETED/CANCELLED event's data)."""
    seq, end = [], None
    t = time.monotonic() + 60
    while not seq or seq[-1] != "null":
        check(time.monotonic() < t, "no end of the job: %r" % seq)
        if not q.events:
            q.events.append(q.recv())
            continue
        e = q.events.pop(0)
        if e["event"] == "JOB_STATUS_CHANGE":
            seq.append(e["data"]["status"])
        elif e["event"].startswith("BLOCK_JOB_"):
            seq.append(e["event"])
            if e["event"] == "BLOCK_JOB_READY" and complete:
                q.ret("block-job-complete", {"device": e["data"]["device"]})
            elif e["event"] != "BLOCK_JOB_READY":
                end = e["data"]
    return seq, end


def grow_conversation(q, fe, vsock, base, work, mode, kill_after=None):
    """The disk grown online (block_resize) while an overlay is active, data
    written into the new range, then committed into the smaller base: active
    (job-complete) or intermediate (a second overlay above), or "short": the
    active layer grown over a layer left at the old size, committed into the
    base (the zeroes read past the short layer's end are copied, as QEMU
    counts them allocated there), or "same": an intermediate commit into a
    base of top's size. KILL_AFTER: return that many seconds after the
    block-commit command (the shadow of the device, and the expected base).
    Returns the job's
    statuses and events, what matters of its end and the base's bitmaps as
    listed then, and the expected base."""
    ov, ov2 = base + ".ov.qcow2", base + ".ov2.qcow2"
    shadow = bytearray(24 * MiB)
    rng = random.Random(41)

    def write(off, n):
        data = rng.randbytes(n)
        run(fe, "write", vsock, off, n, stdin=data)
        shadow[off:off + n] = data

    write(0, 4 * MiB)
    q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                     "snapshot-node-name": "ov1", "format": "qcow2"})
    if mode == "short":  # grown above a layer left short: ov2 (24 MiB) over ov1 (16)
        write(2 * MiB, 65536)
        q.ret("blockdev-snapshot-sync", {"node-name": "ov1", "snapshot-file": ov2,
                                         "snapshot-node-name": "ov2", "format": "qcow2"})
    if mode == "same":  # (no grow: the base's enabled bitmap stored at the end all the same)
        del shadow[16 * MiB:]
    else:
        q.ret("block_resize", {"node-name": "ov2" if mode == "short" else "ov1",
                               "size": 24 * MiB})
        write(17 * MiB, 2 * MiB + 65536)  # the new range
        write(16 * MiB - 4096, 8192)        # across the old end
    write(MiB, MiB)
    if mode in ("inter", "same"):
        q.ret("blockdev-snapshot-sync", {"node-name": "ov1", "snapshot-file": ov2,
                                         "snapshot-node-name": "ov2", "format": "qcow2"})
        write(8 * MiB, MiB)  # in ov2: not committed
        expect = bytes(shadow[:8 * MiB]) + bytes(MiB) + bytes(shadow[9 * MiB:])
        q.events = []
        q.ret("block-commit", {"device": "ov2", "job-id": "g", "top-node": "ov1",
                               "base-node": "disk0"})
    else:
        expect = bytes(shadow)
        q.events = []
        q.ret("block-commit", {"device": "ov2" if mode == "short" else "ov1", "job-id": "g"})
    if kill_after is not None:  # (test_grow_kill: the caller kills the daemon now)
        time.sleep(kill_after)
        return {"shadow": bytes(shadow)}, expect
    seq, end = job_sequence(q, complete=mode not in ("inter", "same"))
    check(end and "error" not in end, "%s commit into a smaller base: %r %r" % (mode, seq, end))
    got = run(fe, "read", vsock, 0, len(shadow)).stdout
    check(got == bytes(shadow), "%s: the device after the commit (first difference at %d)" %
          (mode, first_diff(got, shadow)))
    listed = [x for x in q.ret("query-named-block-nodes") if x["node-name"] == "disk0"]
    return {"seq": seq, "len": end["len"], "offset": end["offset"],
            "export": q.ret("query-block-exports")[0]["node-name"],
            "listed": listed[0].get("dirty-bitmaps") if listed else "no node disk0"}, expect


def bitmap_base(base):
    """Persistent bitmaps in the 16 MiB qcow2 BASE, each with dirty bits, in
    what grow_conversation writes first (the shadow's first 4 MiB): 'bd',
    disabled, 64 KiB granules (grown from the held path), and 'be', enabled,
    256 KiB granules (recording the commit's writes); qemu-io writes them."""
    run("qemu-img", "bitmap", "--add", base, "bd")
    run("qemu-io", "-c", "write -P 1 0 64k", "-c", "write -P 2 2M 1M", base)
    run("qemu-img", "bitmap", "--disable", base, "bd")
    run("qemu-img", "bitmap", "--add", "-g", "256K", base, "be")
    run("qemu-io", "-c", "write -P 3 3M 64k", base)


def test_grow_commit(vqcowd, fe, work):
    """block-commit into a base smaller than top (block_resize while an overlay
    was active): the base grows to top's size, as qemu-storage-daemon 7.2's
    commit and mirror jobs do (qcow2 and raw bases; a qcow2 base with an
    enabled and a disabled persistent bitmap: both grow with it, the enabled
    one records what the job copies, they are stored at the end of an
    intermediate commit when the base becomes a backing file again)."""
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        log("SKIP: qemu-storage-daemon not found: commit into a smaller base not compared")
        return
    nbd = bitmaplib.have_nbd()
    if not nbd:
        log("SKIP part: no qemu-nbd/nbdinfo: the bitmaps' dirty bits not compared")
    for mode, fmt in (("active", "qcow2"), ("active", "raw"), ("inter", "qcow2"),
                      ("inter", "raw"), ("active", "qcow2-bitmap"), ("inter", "qcow2-bitmap"),
                      ("short", "qcow2-bitmap"), ("same", "qcow2-bitmap")):
        bitmap = fmt.endswith("-bitmap")
        fmt = fmt.replace("-bitmap", "")
        res = {}
        for who in ("qsd", "vqcowd"):
            base = os.path.join(work, "g-%s-%s-%s.%s" % (who, mode, fmt, fmt))
            for f in (base, base + ".ov.qcow2", base + ".ov2.qcow2"):
                if os.path.exists(f):
                    os.unlink(f)
            run("qemu-img", "create", "-q", "-f", fmt, base, 16 * MiB)
            if bitmap:
                bitmap_base(base)
            name = who + "-g" if who == "qsd" else "vqg"
            with serving(who, qsd, vqcowd, work, base, fmt, name) as (q, vs):
                out, expect = grow_conversation(q, fe, vs, base, work, mode)
            i = info(base)
            out["size"] = i["virtual-size"]
            if bitmap:
                out["bitmaps"] = i.get("format-specific", {}).get("data", {}).get("bitmaps")
                if nbd:
                    out["dirty"] = {b: bitmaplib.nbd_dirty(work, base, b) for b in ("bd", "be")}
            if fmt == "qcow2":
                qcheck(base, "%s: the base after a %s commit that grew it" % (who, mode))
                verify_file(alone(base), expect, work, "%s: the grown base alone" % who)
            else:
                got = open(base, "rb").read()
                check(got == expect, "%s: the grown raw base differs (first at %d)" %
                      (who, first_diff(got, expect)))
            res[who] = out
        check(res["qsd"] == res["vqcowd"], "%s commit into a smaller %s base%s: "
              "qemu-storage-daemon %r, vqcowd %r" % (mode, fmt, " with bitmaps" if bitmap
                                                     else "", res["qsd"], res["vqcowd"]))
        check(res["vqcowd"]["size"] == (16 if mode == "same" else 24) * MiB,
              "the base's size: %r" % res)
        if bitmap:
            check(len(res["vqcowd"]["bitmaps"]) == 2 and (not nbd or all(
                res["vqcowd"]["dirty"].values())), "the base's bitmaps: %r" % res["vqcowd"])
        log("ok: %s commit into a %s %s base%s: %d MiB after it, top's data in it, as "
            "qemu-storage-daemon 7.2: %r" % (
                mode, "same-sized" if mode == "same" else "smaller", fmt, " (an enabled and a disabled persistent bitmap%s; statuses, events, "
                "listing, flags and dirty bits)" % ("" if mode == "same" else ", grown")
                if bitmap else "",
                res["vqcowd"]["size"] // MiB, res["vqcowd"]))


def test_grow_kill(vqcowd, fe, work):
    """kill -9 at several points of an intermediate commit into a smaller
    base with persistent bitmaps (the grow, the copy, the store of the
    base's bitmaps, the header of the layer above): every file passes
    qemu-img check (leaked clusters allowed), the base keeps both bitmaps,
    each stored (then with the job's dirty bits) or in use (inconsistent),
    never wrong, and the active layer's chain reads what was written."""
    ends = {"stored": 0, "in use": 0}
    for delay in (0, 0.002, 0.01, 0.03, 0.1, 0.5):
        base = os.path.join(work, "gk.qcow2")
        for f in (base, base + ".ov.qcow2", base + ".ov2.qcow2"):
            if os.path.exists(f):
                os.unlink(f)
        run("qemu-img", "create", "-q", "-f", "qcow2", base, 16 * MiB)
        bitmap_base(base)
        d = Daemon(vqcowd, work, base, "vqgk")
        try:
            q = Qmp(d.qsock)
            out, _ = grow_conversation(q, fe, d.vsock, base, work, "inter", kill_after=delay)
        finally:
            d.kill()
        bitmaplib.wait_unlocked(base)
        what = "kill -9 %g s into an intermediate commit into a smaller base" % delay
        for f in (base, base + ".ov.qcow2", base + ".ov2.qcow2"):
            qcheck(f, what, leaks_ok=True)
        verify_file(base + ".ov2.qcow2", out["shadow"], work, what)
        bms = {b["name"]: b for b in info(base)["format-specific"]["data"]["bitmaps"]}
        check(sorted(bms) == ["bd", "be"] and bms["be"]["granularity"] == 262144,
              "%s: the base's bitmaps %r" % (what, bms))
        if "in-use" in bms["be"]["flags"]:
            ends["in use"] += 1
        elif bitmaplib.have_nbd():
            dirty = bitmaplib.nbd_dirty(work, base, "be")
            check(dirty in ([(0, 4 * MiB)], [(0, 4 * MiB), (16515072, 524288),
                                             (17825792, 2359296)]),
                  "%s: 'be' stored with %r" % (what, dirty))
            ends["stored"] += 1
    log("ok: kill -9 during an intermediate commit into a smaller base with bitmaps: files "
        "consistent, the chain as written, the bitmaps stored or in use (%r)" % ends)


def blockdev_commit_events(q, ov):
    """Active commit into a 16 MiB raw block device under a 24 MiB overlay."""
    q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                     "snapshot-node-name": "ov1", "format": "qcow2"})
    q.ret("block_resize", {"node-name": "ov1", "size": 24 * MiB})
    q.events = []
    q.ret("block-commit", {"device": "ov1", "job-id": "g"})
    seq, err = [], None
    t = time.monotonic() + 30
    while not seq or seq[-1] != "null":
        check(time.monotonic() < t, "no end of the job: %r" % seq)
        while q.events:
            e = q.events.pop(0)
            if e["event"] == "JOB_STATUS_CHANGE":
                seq.append(e["data"]["status"])
            elif e["event"].startswith("BLOCK_JOB_"):
                seq.append(e["event"])
                err = e["data"].get("error")
        if not seq or seq[-1] != "null":
            q.events.append(q.recv())
    return seq, err


def test_grow_blockdev(vqcowd, work):
    """A base that cannot grow (a block device smaller than top): the job
    fails as in qemu-storage-daemon 7.2 (aborting, BLOCK_JOB_COMPLETED with an
    error); the device keeps its size and the overlay stays the active layer."""
    qsd = shutil.which("qemu-storage-daemon")
    backing = os.path.join(work, "g-blk.img")
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    r = run("losetup", "-f", "--show", backing, ok=False)
    if not qsd or r.returncode != 0:
        log("SKIP part: %s: commit into a block device too small not compared" %
            ("no qemu-storage-daemon" if not qsd else "no loop device (losetup: %s)" %
             r.stderr.decode(errors="replace").strip()))
        return
    dev = r.stdout.decode().strip()
    res = {}
    try:
        for who in ("qsd", "vqcowd"):
            ov = os.path.join(work, "g-blk-%s.qcow2" % who)
            if os.path.exists(ov):
                os.unlink(ov)
            name = who + "-gb" if who == "qsd" else "vqgb"
            with serving(who, qsd, vqcowd, work, dev, "raw", name, "host_device") as (q, vs):
                res[who] = blockdev_commit_events(q, ov)
                res[who] += (q.ret("query-block-exports")[0]["node-name"],)
    finally:
        run("losetup", "-d", dev, ok=False)
    (sq, eq, xq), (sv, ev, xv) = res["qsd"], res["vqcowd"]
    check(sq == sv and xq == xv and eq and ev, "a base that cannot grow: qemu-storage-daemon "
          "%r, vqcowd %r" % (res["qsd"], res["vqcowd"]))
    # QEMU says "Invalid argument"; we name the device and the sizes
    check(dev in ev and "16777216" in ev, "the job's error: %r" % ev)
    log("ok: commit into a block device smaller than top fails as in qemu-storage-daemon "
        "7.2: %r, error %r (QEMU: %r)" % (sv, ev, eq))


# Deliberate differences from qemu-storage-daemon (README, "External snapshots and commit").
DIFFERENT = {
    # QEMU creates the file, then refuses the name (and leaves the file); we check first
    # (the answer is the same)
}


def main():
    args = qmplib.setup_work((3, 4), "qemu-img", "qemu-io", fresh=False)
    vqcowd, fe, work = args[:3]
    ctl = args[3] if len(args) == 4 else None
    only = os.environ.get("LAYERS_ONLY")
    if not only or only == "sc":
        test_snapshot_and_commit(vqcowd, fe, work)
    if not only or only == "cancel":
        test_cancel_speed(vqcowd, fe, work)
    if not only or only == "kill":
        test_kill(vqcowd, fe, work)
    if (not only or only == "ctl") and ctl:
        test_ctl(vqcowd, fe, ctl, work)
    if not only or only == "backup":
        test_backup(vqcowd, fe, work)
    if not only or only == "qsd":
        test_qsd(vqcowd, fe, work)
    if not only or only == "grow":
        test_grow_commit(vqcowd, fe, work)
        test_grow_blockdev(vqcowd, work)
        test_grow_kill(vqcowd, fe, work)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
