#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Intermediate block-commit (issue 11): top below the active layer, through a real QMP client.

A 3-layer chain base <- mid <- active, each layer written by vqcow-fe through
vqcowd (every byte remembered), then vqcowd on the active layer:

  * errors: top-node not in the chain, top file not found, backing-file with
    an active commit, block-job-complete on a running intermediate job (QEMU's
    texts);
  * block-commit top-node=mid while a writer runs on the active layer: no
    BLOCK_JOB_READY, the job completes by itself with QEMU 7.2's sequence
    (created, running, waiting, pending, BLOCK_JOB_COMPLETED with len ==
    offset == the disk size, concluded, null); the chain is active -> base
    (query-named-block-nodes, qemu-img info: the active layer's header names
    the base, its format recorded); the base was opened read-only at start
    (reopened for the job, read-only again after); every byte reads back
    through the device and, after the daemon stopped, through the new chain
    with qemu-img; the base alone holds what mid and base held; qemu-img
    check clean on every file;
  * a 4-layer chain, the third layer committed: the layer above it is a
    read-only backing file, reopened read-write for its header and
    read-only again (the base too), every byte read back;
  * kill -9 while copying (rate-limited) and around the end of an unlimited
    job: every file passes qemu-img check and the chain (old or new, as
    recorded in the active layer's header) reads what the writer wrote;
  * vqcowctl commit --top NODE --base NODE under a writer: its line, the
    chain after, every byte; QEMU's error for an unknown top; --top with
    another command is a usage error;
  * the same commit against qemu-storage-daemon 7.2: the same status
    sequence and event keys.

Usage: test_commit_intermediate.py VQCOWD VQCOW-FE WORKDIR [VQCOWCTL]
"""

import os
import shutil
import time

import qmplib
from qmplib import check, log, wait_path
from test_layers import (MiB, Daemon, Qmp, Writer, alone, info, new_disk, nodes, qcheck, run,
                         verify_file)

SIZE = 32 * MiB


def build_chain(vqcowd, fe, work, tag, seed):
    """base <- mid <- active, base and mid written through vqcowd: (paths, writer, mid state)."""
    base = new_disk(work, tag + "-base.qcow2", SIZE)
    mid = os.path.join(work, tag + "-mid.qcow2")
    act = os.path.join(work, tag + "-act.qcow2")
    for p in (mid, act):
        if os.path.exists(p):
            os.unlink(p)
    d = Daemon(vqcowd, work, base, tag + "b")
    try:
        w = Writer(fe, d.vsock, SIZE, seed)
        w.fill()
    finally:
        d.stop()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    d = Daemon(vqcowd, work, mid, tag + "m")
    try:
        w.vsock = d.vsock
        for i in range(40):
            n = w.rng.choice([4096, 65536, 1048576])
            w.write(w.rng.randrange(0, (SIZE - n) // 4096) * 4096, w.rng.randbytes(n))
    finally:
        d.stop()
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", act)
    return base, mid, act, w, bytes(w.shadow)


def statuses(q, job):
    """Events until the job's null status: [(event, status or data keys)]."""
    out = []
    t = time.monotonic() + 60
    while True:
        while q.events:
            e = q.events.pop(0)
            if e["event"] == "JOB_STATUS_CHANGE":
                if e["data"]["id"] == job:
                    out.append(e["data"]["status"])
                    if e["data"]["status"] == "null":
                        return out
            elif e["event"].startswith("BLOCK_JOB_"):
                out.append((e["event"], sorted(e["data"]), e["data"]["len"],
                            e["data"]["offset"]))
        check(time.monotonic() < t, "no end of job %s: %r" % (job, out))
        q.s.settimeout(5)
        q.events.append(q.recv())


def test_commit(vqcowd, fe, work):
    base, mid, act, w, mid_state = build_chain(vqcowd, fe, work, "i", 21)
    d = Daemon(vqcowd, work, act, "i")
    try:
        q = Qmp(d.qsock)
        w.vsock = d.vsock
        n = nodes(q)
        check(n == [("disk0", act, False), ("disk0-backing1", mid, True),
                    ("disk0-backing2", base, True)], "nodes before: %r" % n)
        q.err("block-commit", {"device": "disk0", "job-id": "e", "top-node": "nope"},
              "'nope' is not in this backing file chain", "top-node not in the chain")
        q.err("block-commit", {"device": "disk0", "job-id": "e", "top": "/nope.qcow2"},
              "Top image file /nope.qcow2 not found", "top file not found")
        q.err("block-commit", {"device": "disk0", "job-id": "e", "backing-file": "x"},
              "backing-file", "backing-file with an active commit")
        w.start()
        time.sleep(0.3)
        q.events = []
        q.ret("block-commit", {"device": "disk0", "job-id": "c", "top-node": "disk0-backing1",
                               "speed": 8 * MiB})
        time.sleep(0.3)
        jobs = q.ret("query-block-jobs")
        check(len(jobs) == 1 and jobs[0]["len"] == SIZE and not jobs[0]["ready"],
              "query-block-jobs: %r" % jobs)
        q.err("block-job-complete", {"device": "c"}, "cannot accept command verb 'complete'",
              "complete on an intermediate commit")
        seq = statuses(q, "c")
        check(seq == ["created", "running", "waiting", "pending",
                      ("BLOCK_JOB_COMPLETED", ["device", "len", "offset", "speed", "type"],
                       SIZE, SIZE), "concluded", "null"], "event sequence: %r" % (seq,))
        log("ok: intermediate commit events: %r" % (seq,))
        n = nodes(q)
        check(n == [("disk0", act, False), ("disk0-backing2", base, True)],
              "nodes after: %r" % n)
        i = info(act)
        check(i.get("backing-filename") == base and i.get("backing-filename-format") == "qcow2",
              "the active layer's header: %r" % i)
        time.sleep(0.5)
        w.stop()
        w.verify_fe("after the intermediate commit")
        # the guest goes on writing over the new chain
        w.write(3 * MiB, b"\xa5" * MiB)
        w.verify_fe("a write after the intermediate commit")
    finally:
        d.stop()
    for p in (base, mid, act):
        qcheck(p, "after the intermediate commit")
    verify_file(act, w.shadow, work, "the new chain")
    verify_file(alone(base), mid_state, work, "the base alone (mid committed into it)")


def test_four(vqcowd, fe, work):
    """active -> a -> top -> base: the layer above top is a read-only backing file,
    reopened read-write for its header and read-only again after."""
    base, mid, act, w, mid_state = build_chain(vqcowd, fe, work, "f", 24)
    a = os.path.join(work, "f-a.qcow2")
    if os.path.exists(a):
        os.unlink(a)
    os.rename(act, a)
    run("qemu-img", "rebase", "-u", "-b", mid, "-F", "qcow2", a)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", act)
    d = Daemon(vqcowd, work, act, "f")
    try:
        q = Qmp(d.qsock)
        w.vsock = d.vsock
        w.start()
        q.events = []
        q.ret("block-commit", {"device": "disk0", "job-id": "c", "top-node": "disk0-backing2"})
        seq = statuses(q, "c")
        check(seq[-1] == "null" and any(isinstance(x, tuple) and x[0] == "BLOCK_JOB_COMPLETED"
                                        for x in seq), "events: %r" % (seq,))
        n = nodes(q)
        check(n == [("disk0", act, False), ("disk0-backing1", a, True),
                    ("disk0-backing3", base, True)], "nodes after: %r" % n)
        check(info(a).get("backing-filename") == base, "a's header: %r" % info(a))
        time.sleep(0.3)
        w.stop()
        w.verify_fe("after committing the third layer of four")
    finally:
        d.stop()
    for p in (base, mid, a, act):
        qcheck(p, "after the 4-layer intermediate commit")
    verify_file(act, w.shadow, work, "the new 3-layer chain")
    verify_file(alone(base), mid_state, work, "the base alone (four layers)")


def test_ctl(vqcowd, fe, ctl, work):
    """vqcowctl commit --top NODE: an intermediate commit from the command line."""
    base, mid, act, w, mid_state = build_chain(vqcowd, fe, work, "v", 27)
    d = Daemon(vqcowd, work, act, "v")
    try:
        w.vsock = d.vsock
        rc, out, err = qmplib.run_ctl(ctl, "-s", d.qsock, "commit", "--top", "nope")
        check(rc == 1 and "'nope' is not in this backing file chain" in err,
              "commit --top nope: rc %d %r %r" % (rc, out, err))
        rc, out, err = qmplib.run_ctl(ctl, "-s", d.qsock, "jobs", "--top", "x")
        check(rc == 2 and "--top and --base are for commit" in err,
              "jobs --top: rc %d %r" % (rc, err))
        w.start()
        time.sleep(0.3)
        rc, out, err = qmplib.run_ctl(ctl, "-s", d.qsock, "commit", "4M", "--top",
                                      "disk0-backing1", "--base", "disk0-backing2")
        check(rc == 0 and out == "committed: disk0-backing1 left the chain; disk0 is the "
              "active layer\n", "vqcowctl commit --top: rc %d %r %r" % (rc, out, err))
        q = Qmp(d.qsock)
        n = nodes(q)
        check(n == [("disk0", act, False), ("disk0-backing2", base, True)],
              "nodes after: %r" % n)
        time.sleep(0.3)
        w.stop()
        w.verify_fe("after vqcowctl commit --top")
    finally:
        d.stop()
    for p in (base, mid, act):
        qcheck(p, "after vqcowctl commit --top")
    verify_file(act, w.shadow, work, "the new chain (vqcowctl)")
    verify_file(alone(base), mid_state, work, "the base alone (vqcowctl)")
    log("ok: vqcowctl commit --top disk0-backing1 --base disk0-backing2 (4 MiB/s, a writer "
        "running): %r" % out.strip())


def test_kill(vqcowd, fe, work):
    for point, speed, delay in (("copy", 4 * MiB, 1.5), ("end", 0, 0.02), ("end2", 0, 0.1)):
        base, mid, act, w, mid_state = build_chain(vqcowd, fe, work, "k", 22)
        d = Daemon(vqcowd, work, act, "k")
        try:
            q = Qmp(d.qsock)
            w.vsock = d.vsock
            w.start()
            time.sleep(0.2)
            args = {"device": "disk0", "job-id": "k", "top-node": "disk0-backing1"}
            if speed:
                args["speed"] = speed
            q.s.sendall(qmplib.json.dumps({"execute": "block-commit",
                                           "arguments": args}).encode() + b"\n")
            time.sleep(delay)
            w.stop()
        finally:
            d.kill()
        b = info(act).get("backing-filename")
        log("killed during %s: the active layer's backing file is %s" % (point, b))
        check(b in (mid, base), "backing file %r" % b)
        for p in (base, mid, act):
            qcheck(p, "kill -9 during %s" % point, leaks_ok=True)
        verify_file(act, w.shadow, work, "kill -9 during %s" % point)


def qsd_trace(qsd, work):
    base = new_disk(work, "q-base.qcow2", SIZE)
    mid = os.path.join(work, "q-mid.qcow2")
    act = os.path.join(work, "q-act.qcow2")
    for p in (mid, act):
        if os.path.exists(p):
            os.unlink(p)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    run("qemu-io", "-c", "write -P 7 0 4M", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", act)
    qs = os.path.join(work, "q.qmp")
    if os.path.exists(qs):
        os.unlink(qs)
    p = qmplib.qsd_popen(qsd, qs, act)
    try:
        wait_path(qs, p)
        q = Qmp(qs)
        q.events = []
        q.ret("block-commit", {"device": "disk0", "job-id": "c", "top": mid})
        seq = statuses(q, "c")
        b = q.ret("query-named-block-nodes")
        names = [x["file"] for x in b]
    finally:
        p.terminate()
        p.wait(10)
    check(mid not in names, "qemu-storage-daemon kept mid: %r" % names)
    return seq


def test_qsd(vqcowd, fe, work):
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        log("SKIP: qemu-storage-daemon not found: QEMU's event sequence not compared")
        return
    seq_q = qsd_trace(qsd, work)
    base, mid, act, w, _ = build_chain(vqcowd, fe, work, "v", 23)
    d = Daemon(vqcowd, work, act, "v")
    try:
        q = Qmp(d.qsock)
        q.events = []
        q.ret("block-commit", {"device": "disk0", "job-id": "c", "top": mid})
        seq_v = statuses(q, "c")
    finally:
        d.stop()
    check(seq_q == seq_v, "event sequences differ:\n  qsd    %r\n  vqcowd %r" % (seq_q, seq_v))
    log("ok: the same intermediate commit events as qemu-storage-daemon: %r" % (seq_v,))


def main():
    args = qmplib.setup_work((3, 4), "qemu-img", "qemu-io", fresh=False)
    vqcowd, fe, work = args[:3]
    ctl = args[3] if len(args) == 4 else None
    test_commit(vqcowd, fe, work)
    test_four(vqcowd, fe, work)
    if ctl:
        test_ctl(vqcowd, fe, ctl, work)
    else:
        log("SKIP part: no vqcowctl given")
    test_kill(vqcowd, fe, work)
    test_qsd(vqcowd, fe, work)
    log("PASS")
    return 0


if __name__ == "__main__":
    qmplib.run_main(main)
