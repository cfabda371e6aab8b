#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Internal snapshots online (issue 11) through a real QMP client, with
qemu-img as the oracle.

  * data: write A, blockdev-snapshot-internal-sync, write B: the snapshot
    (qemu-img convert -l snapshot.name=) holds A, the active image B; the
    snapshot is listed in query-named-block-nodes (image.snapshots) and by
    qemu-img snapshot -l; delete returns QEMU's SnapshotInfo and gives the
    clusters only the snapshot held back to the file system (st_blocks drops
    as much as after qemu-img snapshot -d on a twin), where new writes then
    land;
  * a create whose new clusters lie past the refcount table's reach grows
    the table, online and with vqcow-img snapshot -c: check clean, snapshot
    -l and convert -l read it as they read qemu-img snapshot -c's result; after quit
    qemu-img check finds no error and no leak; vqcow-img snapshot -l prints
    what qemu-img snapshot -l prints; vqcow-img snapshot -l/-c/-d/-a against
    qemu-img snapshot on twin images (output, messages, exit codes);
  * order: a slow command and the commands behind it answered in order;
  * vqcowctl snapshot create / list / delete;
  * the same conversation (errors, return shapes) against
    qemu-storage-daemon on a qcow2 (skipped visibly without it);
  * under load: snapshots taken and deleted while vqcow-fe writes at random
    (no request fails; as vqcowd reports each hold: the drain's end noticed
    within 1 s; the hold, less the time vqcowd's main thread waited for a
    CPU, within 1 s plus 10 syncs of a probe's 90th percentile meanwhile),
    with one thread
    and with two I/O threads, then check clean and every snapshot readable;
  * kill -9 during snapshot create / delete under load, many times at random
    moments: qemu-img check finds no refcount too low (only leaks, and
    COPIED flags disagreeing with a too-high refcount), after `-r leaks` no
    COPIED flag set on a shared cluster, `qemu-img check -r all` leaves it
    clean, and data written before (in the active image and in every
    snapshot that exists) reads back.

Usage: test_qmp_snapshot.py VQCOWD VQCOW-FE VQCOWCTL VQCOW-IMG WORKDIR
"""

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time

from qmplib import (SKIP, Daemon, Qmp, check, expect_error, fe, log, qimg_check, qsd_popen,
                    run_ctl, run_main, setup_work, vqcowd_session, wait_path)

MiB = 1 << 20


def qimg(*args, ok=(0,)):
    r = subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True, text=True,
                       timeout=120)
    check(r.returncode in ok, "qemu-img %s: rc %d\n%s%s" % (args, r.returncode, r.stdout,
                                                           r.stderr))
    return r


def qio(img, *cmds, fmt="qcow2"):
    a = ["qemu-io", "-f", fmt, "-U", "-r"]
    for c in cmds:
        a += ["-c", c]
    r = subprocess.run(a + [img], capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    check(r.returncode == 0 and "Pattern verification failed" not in out and
          "failed" not in out, "qemu-io %s %s: %s" % (img, cmds, out))


def snapshot_raw(img, name, work):
    raw = os.path.join(work, "snap-%s.raw" % name)
    qimg("convert", "-U", "-O", "raw", "-l", "snapshot.name=" + name, img, raw)
    return raw


def no_sanitizer(d):
    check("AddressSanitizer" not in d.log() and "runtime error" not in d.log(),
          "sanitizer report:\n" + d.log())


@contextlib.contextmanager
def serving(vqcowd, work, img, name, extra=()):
    """vqcowd on IMG and a QMP client, (d, q); quit at the end of the block
    must end it with exit 0 and no sanitizer report in its log (qmplib's
    vqcowd_session: its log shown on a failure)."""
    with vqcowd_session(vqcowd, work, img, name, extra) as (d, q):
        yield d, q
    no_sanitizer(d)


def shared_copied(out, cb):
    leaked = set()
    for ln in out.splitlines():
        m = re.match(r"Leaked cluster (\d+) refcount=\d+ reference=(\d+)", ln)
        if m and int(m.group(2)) <= 1:
            leaked.add(int(m.group(1)))
    bad = []
    for ln in out.splitlines():
        m = re.match(r"ERROR OFLAG_COPIED (?:data cluster: l2_entry|L2 cluster: l1_index=\d+ "
                     r"l1_entry)=([0-9a-f]+) refcount=(\d+)", ln)
        if m:
            e, rc = int(m.group(1), 16), int(m.group(2))
            if e >> 63 and rc > 1 and ((e & 0x00fffffffffffe00) >> cb) not in leaked:
                bad.append(ln)
    return bad


def test_data(vqcowd, fe_bin, ctl, vimg, work):
    img = os.path.join(work, "data.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "64M")
    with serving(vqcowd, work, img, "data") as (d, q):
        fe(fe_bin, "write", d.vsock, 0, MiB, stdin=b"A" * MiB)
        fe(fe_bin, "write", d.vsock, 8 * MiB, 65536, stdin=b"Z" * 65536)
        check(q.cmd("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s1"}) ==
              {"return": {}}, "create s1")
        fe(fe_bin, "write", d.vsock, 0, MiB // 2, stdin=b"B" * (MiB // 2))
        fe(fe_bin, "flush", d.vsock)
        out = fe(fe_bin, "read", d.vsock, 0, MiB)
        check(out == "B" * (MiB // 2) + "A" * (MiB // 2), "active image after the snapshot")
        sn = q.ret("query-named-block-nodes")[0]["image"].get("snapshots")
        check(sn and len(sn) == 1 and sn[0]["name"] == "s1" and sn[0]["id"] == "1" and
              set(sn[0]) == {"id", "name", "vm-state-size", "date-sec", "date-nsec",
                             "vm-clock-sec", "vm-clock-nsec"},
              "image.snapshots %r" % sn)
        raw = snapshot_raw(img, "s1", work)
        qio(raw, "read -P 0x41 0 1M", "read -P 0x5a 8M 64k", "read -P 0 1M 7M", fmt="raw")
        qio(img, "read -P 0x42 0 512k", "read -P 0x41 512k 512k", "read -P 0x5a 8M 64k")
        log("ok: write A, snapshot, write B: the snapshot holds A, the image B")
        # Order: the command behind a slow one is answered after it.
        q.send_raw('{"execute": "blockdev-snapshot-internal-sync", "arguments": '
                   '{"device": "disk0", "name": "s2"}, "id": 1}\n'
                   '{"execute": "query-version", "id": 2}\n'
                   '{"execute": "blockdev-snapshot-internal-sync", "arguments": '
                   '{"device": "disk0", "name": "s2"}, "id": 3}\n')
        r1, r2, r3 = q.reply(), q.reply(), q.reply()
        check(r1 == {"return": {}, "id": 1} and r2.get("id") == 2 and "return" in r2 and
              r3.get("id") == 3 and "already exists" in r3["error"]["desc"],
              "replies out of order or wrong: %r %r %r" % (r1, r2, r3))
        log("ok: replies in the order of the commands, a slow one first")
        rc, o, e = run_ctl(ctl, "-s", d.qsock, "snapshot", "create", "s3")
        check(rc == 0 and "s3" in o, "vqcowctl snapshot create: %d %r %r" % (rc, o, e))
        rc, o, e = run_ctl(ctl, "-s", d.qsock, "snapshot", "list")
        check(rc == 0 and all(n in o for n in ("s1", "s2", "s3")), "vqcowctl list %r" % o)
        rc, o, e = run_ctl(ctl, "-s", d.qsock, "snapshot", "create", "s3")
        check(rc == 1 and "already exists" in e, "vqcowctl duplicate: %d %r" % (rc, e))
        rc, o, e = run_ctl(ctl, "-s", d.qsock, "snapshot", "delete", "s3")
        check(rc == 0, "vqcowctl snapshot delete: %d %r" % (rc, e))
        log("ok: vqcowctl snapshot create, list, delete")
        # Each command closes and reopens the engine: the file must not grow
        # by a preallocation chunk per command (the reopened engine used to
        # allocate past the old preallocated tail and the snapshot's clusters).
        sizes = []
        for i in range(5):
            fe(fe_bin, "write", d.vsock, (16 + 2 * i) * MiB, 65536, stdin=b"G" * 65536)
            check(q.cmd("blockdev-snapshot-internal-sync",
                        {"device": "disk0", "name": "g%d" % i}) == {"return": {}}, "create g%d" % i)
            check(q.cmd("blockdev-snapshot-delete-internal-sync",
                        {"device": "disk0", "name": "g%d" % i}).get("return") is not None,
                  "delete g%d" % i)
            sizes.append(os.path.getsize(img))
        check(sizes[-1] <= sizes[0] + 4 * MiB,
              "the file grew with each snapshot command: %r" % sizes)
        log("ok: snapshot commands give back the unused tail: sizes %r" % sizes)
        r = q.ret("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "s1"})
        check(r["id"] == "1" and r["name"] == "s1" and r["vm-state-size"] == 0, "delete %r" % r)
        expect_error(q.cmd("blockdev-snapshot-delete-internal-sync",
                           {"device": "disk0", "name": "s1"}), "GenericError",
                     "Snapshot with id 'null' and name 's1' does not exist on device 'disk0'",
                     "delete again")
        fe(fe_bin, "verify", d.vsock, "--size", "2M", "--offset", "16M")
    qimg_check(img, "after create/delete online")
    a = qimg("snapshot", "-l", img).stdout
    b = subprocess.run([vimg, "snapshot", "-l", img], capture_output=True, text=True).stdout
    check(a == b and "s2" in a and "s1" not in a, "snapshot -l:\nqemu-img:\n%s\nvqcow-img:\n%s"
          % (a, b))
    raw = snapshot_raw(img, "s2", work)
    qio(raw, "read -P 0x42 0 512k", "read -P 0x41 512k 512k", fmt="raw")
    log("ok: qemu-img check clean, qemu-img and vqcow-img list the same snapshots")


def test_img_cli(vimg, work):
    """vqcow-img snapshot against qemu-img snapshot: output, messages, exit codes."""
    imgs = {}
    for n in ("qemu-img", "vqcow-img"):
        imgs[n] = os.path.join(work, "cli-%s.qcow2" % n)
        qimg("create", "-q", "-f", "qcow2", imgs[n], "16M")
    tools = {"qemu-img": "qemu-img", "vqcow-img": vimg}
    steps = [["-l"], ["-c", "a"], ["-c", "a"], ["-c", ""], ["-l"], ["-d", "nope"], ["-d", "2"],
             ["-a", "nope"], ["-a", "1"], ["-l", "-c", "x"], ["-d", "a"], ["-l"], []]
    for st in steps:
        res = {}
        for n, t in tools.items():
            r = subprocess.run([t, "snapshot"] + st + [imgs[n]], capture_output=True, text=True)
            out = [ln.split()[:2] for ln in r.stdout.splitlines()]  # ID and TAG; dates differ
            err = r.stderr.split(": ", 1)[-1].splitlines()[:1]
            res[n] = (r.returncode, out, err)
        check(res["qemu-img"] == res["vqcow-img"], "snapshot %s:\n qemu-img  %r\n vqcow-img %r"
              % (st, res["qemu-img"], res["vqcow-img"]))
    for n in imgs:
        qimg_check(imgs[n], "after the CLI steps (%s)" % n)
    log("ok: vqcow-img snapshot: %d invocations with qemu-img's output, messages and exit codes"
        % len(steps))


def test_punch(vimg, work):
    """vqcow-img snapshot -d gives the freed clusters back to the file system."""
    img = os.path.join(work, "punch.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 1 0 8M", img], check=True, capture_output=True)
    qimg("snapshot", "-c", "s", img)
    subprocess.run(["qemu-io", "-c", "write -P 2 0 8M", img], check=True, capture_output=True)
    before = os.stat(img).st_blocks * 512
    r = subprocess.run([vimg, "snapshot", "-d", "s", img], capture_output=True, text=True)
    check(r.returncode == 0, "vqcow-img snapshot -d: %s" % r.stderr)
    after = os.stat(img).st_blocks * 512
    check(before - after >= 7 * MiB, "only %d bytes given back" % (before - after))
    qimg_check(img, "after a delete that punched")
    qio(img, "read -P 2 0 8M")
    log("ok: vqcow-img snapshot -d gave back %d KiB of the snapshot's clusters"
        % ((before - after) // 1024))


def test_online_punch(vqcowd, fe_bin, work):
    """blockdev-snapshot-delete-internal-sync gives the clusters only the
    snapshot held back to the file system (as qemu-img snapshot -d does on
    a twin image), and the engine writes new data into them."""
    img = os.path.join(work, "opunch.qcow2")
    twin = os.path.join(work, "opunch-twin.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "64M")
    # s holds P1 alone; keep holds P2 (shared with the active layer) and P3.
    subprocess.run(["qemu-io", "-c", "write -P 1 0 16M", img], check=True, capture_output=True)
    qimg("snapshot", "-c", "s", img)
    subprocess.run(["qemu-io", "-c", "write -P 2 0 16M", "-c", "write -P 3 32M 4M", img],
                   check=True, capture_output=True)
    qimg("snapshot", "-c", "keep", img)
    subprocess.run(["qemu-io", "-c", "write -P 4 32M 4M", img], check=True, capture_output=True)
    shutil.copyfile(img, twin)
    end = os.path.getsize(img)
    tb = os.stat(twin).st_blocks * 512
    qimg("snapshot", "-d", "s", twin)
    qemu_freed = tb - os.stat(twin).st_blocks * 512
    with serving(vqcowd, work, img, "opunch") as (d, q):
        before = os.stat(img).st_blocks * 512
        t = time.monotonic()
        q.ret("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "s"})
        took = time.monotonic() - t
        # At once another create and delete: the close before them does not
        # wait for the punches, what is left unpunched goes on to the next engine.
        q.ret("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "t"})
        q.ret("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "t"})
        for _ in range(100):  # the punch runs in the background, after the reply
            freed = before - os.stat(img).st_blocks * 512
            if freed >= qemu_freed:
                break
            time.sleep(0.05)
        check(freed >= 15 * MiB and freed >= qemu_freed - MiB,
              "online delete gave back %d bytes, qemu-img snapshot -d %d" % (freed, qemu_freed))
        # New data goes into the freed clusters, not past the end of the file.
        fe(fe_bin, "write", d.vsock, 48 * MiB, 8 * MiB, stdin=b"\x05" * (8 * MiB))
    qimg_check(img, "after an online delete that punched")
    m = json.loads(qimg("map", "--output=json", img).stdout)
    new = [e for e in m if e["data"] and 48 * MiB <= e["start"] < 56 * MiB]
    # (a few may reuse what deleting t freed, just past the old end)
    below = sum(e["length"] for e in new if e["offset"] + e["length"] <= end)
    check(sum(e["length"] for e in new) == 8 * MiB and below >= 7 * MiB,
          "new data not in the freed clusters (file end was %d): %r" % (end, new))
    qio(img, "read -P 2 0 16M", "read -P 4 32M 4M", "read -P 5 48M 8M")
    raw = snapshot_raw(img, "keep", work)
    qio(raw, "read -P 2 0 16M", "read -P 3 32M 4M", "read -P 0 48M 8M", fmt="raw")
    os.unlink(raw)
    log("ok: online delete gave back %d KiB (qemu-img snapshot -d: %d KiB) in %.0f ms; new "
        "data reused them; check clean, keep and the active layer intact"
        % (freed // 1024, qemu_freed // 1024, took * 1000))


def rt_offset(img):
    with open(img, "rb") as f:
        f.seek(48)
        return int.from_bytes(f.read(8), "big")


def test_grow(vqcowd, fe_bin, vimg, work):
    """Snapshot create whose new clusters lie past the refcount table's
    reach grows the table (online and with vqcow-img snapshot -c; vqcowd
    allocates at the end, qemu-img reuses holes first): 512-byte clusters
    with 64-bit refcounts, the used end 3 clusters short of the 2-cluster
    table's 2 MiB reach. The results read as qemu-img snapshot -c's does."""
    base = os.path.join(work, "grow-base.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", base, "8M")
    subprocess.run(["qemu-io", "-c", "write -P 0x41 0 2M", "-c", "write -P 0x44 2M 1888k", base],
                   check=True, capture_output=True)
    before = rt_offset(base)
    for how in ("qemu-img", "vqcow-img", "online"):
        img = os.path.join(work, "grow-%s.qcow2" % how)
        shutil.copyfile(base, img)
        if how == "qemu-img":
            qimg("snapshot", "-c", "s", img)
        elif how == "vqcow-img":
            r = subprocess.run([vimg, "snapshot", "-c", "s", img], capture_output=True,
                               text=True)
            check(r.returncode == 0, "vqcow-img snapshot -c: %s" % r.stderr)
        else:
            with serving(vqcowd, work, img, "grow") as (d, q):
                q.ret("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s"})
                # the engine goes on with the new table: more data past the old reach
                fe(fe_bin, "write", d.vsock, 4 * MiB, MiB, stdin=b"\x45" * MiB)
        # (qemu-img fills free clusters inside the file first: no growth needed there)
        check(how == "qemu-img" or rt_offset(img) != before,
              "%s: the refcount table did not move" % how)
        qimg_check(img, "%s: after a create that grew the refcount table" % how)
        check(" s " in qimg("snapshot", "-l", img).stdout, "%s: snapshot s not listed" % how)
        raw = snapshot_raw(img, "s", work)
        qio(raw, "read -P 0x41 0 2M", "read -P 0x44 2M 1888k", "read -P 0 4M 1M", fmt="raw")
        os.unlink(raw)
        qio(img, "read -P 0x41 0 2M", "read -P 0x44 2M 1888k",
            "read -P %s 4M 1M" % ("0x45" if how == "online" else "0"))
    log("ok: snapshot create grew the refcount table (vqcow-img, online; qemu-img reused holes): check "
        "clean, snapshot -l and convert -l read it, the active layer intact")


def test_busy(vqcowd, work):
    """No internal snapshot under a commit job (QEMU's op blocker), and after it ends."""
    img = os.path.join(work, "busy.qcow2")
    ov = os.path.join(work, "busy-ov.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "16M")
    with serving(vqcowd, work, img, "busy") as (d, q):
        q.ret("blockdev-snapshot-sync", {"node-name": "disk0", "snapshot-file": ov,
                                         "snapshot-node-name": "ov", "format": "qcow2"})
        q.ret("block-commit", {"job-id": "j1", "device": "ov", "speed": 1})
        expect_error(q.cmd("blockdev-snapshot-internal-sync", {"device": "ov", "name": "x"}),
                     "GenericError", "Node 'ov' is busy: block device is in use by block job: "
                     "commit", "internal snapshot during a commit job")
        q.ret("block-job-cancel", {"device": "j1"})
        for _ in range(100):
            if not q.ret("query-block-jobs"):
                break
            time.sleep(0.05)
        q.ret("blockdev-snapshot-internal-sync", {"device": "ov", "name": "x"})
    qimg_check(ov, "overlay after a snapshot once the job was cancelled")
    check(" x " in qimg("snapshot", "-l", ov).stdout, "snapshot x on the overlay")
    log("ok: refused while a commit job runs, taken on the new active layer once it ended")


def test_qsd(vqcowd, work):
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        log("SKIP (visible): qemu-storage-daemon not installed: no comparison")
        return False
    imgs = {}
    for n in ("qsd", "ours"):
        imgs[n] = os.path.join(work, "cmp-%s.qcow2" % n)
        qimg("create", "-q", "-f", "qcow2", imgs[n], "16M")
    qs = os.path.join(work, "cmp-qsd.qmp")
    p = qsd_popen(qsd, qs, imgs["qsd"])
    d = Daemon(vqcowd, work, imgs["ours"], "cmp")
    try:
        wait_path(qs, p)
        time.sleep(0.2)
        a, b = Qmp(qs), Qmp(d.qsock)
        conv = [
            ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s1"}),
            ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s1"}),
            ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": ""}),
            ("blockdev-snapshot-internal-sync", {"device": "nodev", "name": "x"}),
            ("blockdev-snapshot-internal-sync", {"device": "disk0"}),
            ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": 5}),
            ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "s2"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "disk0"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "zz"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "id": "7",
                                                        "name": "zz"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "id": "1",
                                                        "name": "s2"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "nodev", "id": "1"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "id": "1"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "s2"}),
        ]
        for m in conv:
            ra, rb = a.cmd(*m), b.cmd(*m)
            if "error" in ra:
                check("error" in rb and ra["error"] == rb["error"],
                      "%s:\n qsd    %r\n vqcowd %r" % (m, ra, rb))
            else:
                check("return" in rb and set(ra["return"]) == set(rb["return"]),
                      "%s:\n qsd    %r\n vqcowd %r" % (m, ra, rb))
                if m[0].startswith("blockdev-snapshot-delete"):
                    for k in ("id", "name", "vm-state-size"):
                        check(ra["return"][k] == rb["return"][k], "%s: %s differs" % (m, k))
        log("ok: %d snapshot commands: the same errors and results as qemu-storage-daemon"
            % len(conv))
        b.cmd("quit")
        d.p.wait(10)
        a.cmd("quit")
        p.wait(10)
    except Exception:
        d.stop_showing_log()
        raise
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(10)
    for n in ("qsd", "ours"):
        qimg_check(imgs[n], "comparison image " + n)
        check(qimg("snapshot", "-l", imgs[n]).stdout == "", "%s: snapshots left" % n)
    return True


def bench(fe_bin, vsock, seconds, offset=0, jobs=1):
    return subprocess.Popen([fe_bin, "bench", vsock, "--rw", "randwrite", "--bs", "4K",
                             "--iodepth", "8", "--size", "32M", "--offset", str(offset),
                             "--numjobs", str(jobs), "--runtime", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class SyncProbe:
    """What a sync costs on this machine right now: 4 KiB written and
    fdatasync'ed to a file beside the image every 50 ms, timed, in a thread,
    while the snapshots run (the same file system, the same load)."""

    def __init__(self, work):
        self.path = os.path.join(work, "sync-probe")
        self.lat, self.stop = [], threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        buf, i = b"s" * 4096, 0
        try:
            while not self.stop.is_set():
                t = time.monotonic()
                os.pwrite(fd, buf, (i % 256) * 4096)
                os.fdatasync(fd)
                self.lat.append(time.monotonic() - t)
                i += 1
                self.stop.wait(0.05)
        finally:
            os.close(fd)
            os.unlink(self.path)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join(30)


def cpu_wait(pid):
    """How long thread @pid has waited for a CPU so far, in s: the time it was
    runnable and not running (/proc/PID/schedstat, second field)."""
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[1]) / 1e9


# Beyond the time it waited for a CPU, a hold may take HOLD_BASE seconds plus
# HOLD_SYNCS times the probe's 90th percentile sync (see test_load).
HOLD_BASE, HOLD_SYNCS = 1.0, 10


def holds_of(log_text):
    """The holds vqcowd reports (hold_report): (held, drain, noticed, operation) in s."""
    return [tuple(float(x) / 1000 for x in m.groups()) for m in re.finditer(
        r"requests held ([0-9.]+) ms: drained in ([0-9.]+) ms, noticed ([0-9.]+) ms after "
        r"the last request ended; the operation ([0-9.]+) ms", log_text)]


def test_load(vqcowd, fe_bin, work, threads=0):
    img = os.path.join(work, "load.qcow2")
    qimg("create", "-q", "-f", "qcow2", img, "64M")
    extra = ["--io-threads", str(threads), "--num-queues", str(threads)] if threads else []
    with serving(vqcowd, work, img, "load", extra) as (d, q):
        fe(fe_bin, "write", d.vsock, 40 * MiB, MiB, stdin=b"P" * MiB)
        b = bench(fe_bin, d.vsock, 4, jobs=max(threads, 1))
        time.sleep(0.5)
        lat, waits = [], []

        def held(cmd, args):
            # vqcowd's main thread runs the operation: its CPU wait meanwhile
            w = cpu_wait(d.p.pid)
            q.ret(cmd, args)
            waits.append(cpu_wait(d.p.pid) - w)

        with SyncProbe(work) as probe:
            for i in range(6):
                t = time.monotonic()
                held("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "l%d" % i})
                lat.append(time.monotonic() - t)
                if i % 2:
                    held("blockdev-snapshot-delete-internal-sync",
                         {"device": "disk0", "name": "l%d" % (i - 1)})
                time.sleep(0.2)
        out, err = b.communicate(timeout=60)
        check(b.returncode == 0, "bench under snapshots: rc %d\n%s%s" % (b.returncode, out, err))
        m = re.search(r"^total .* max ([0-9.]+) \(", out, re.M)
        check(m and float(m.group(1)) < 10e6, "a request waited over 10 s: %s" % out)
        # How long requests were held back for each operation, as vqcowd
        # reports it (hold_report), in parts. A main loop that sleeps through
        # the drain once held a snapshot for 4.5 s: the requests' end must be
        # noticed at once (a scheduling delay: 24 ms at most seen at load 17).
        # The whole hold is 25-80 ms on a quiet machine and was 2-3 s at load
        # 15 (which failed a fixed 2 s bound), mostly waiting for a CPU
        # (at load 13-17: 0.18-0.48 s held, 17-119 ms of it not waiting for
        # a CPU). What the machine's load adds is taken out or allowed for,
        # each measured in this run: the time vqcowd's main thread (which
        # runs the operation) waited for a CPU during the command, and
        # HOLD_SYNCS syncs as slow as the probe's 90th percentile. What is
        # left must stay under HOLD_BASE + that allowance: 1 s on a quiet
        # machine (online punching once held requests for 2 s there).
        holds = holds_of(d.log())
        syncs = sorted(probe.lat)
        p90 = syncs[len(syncs) * 9 // 10]
        bound = HOLD_BASE + HOLD_SYNCS * p90
        what = "holds (held, drain, noticed, operation) %s; CPU waits %s; probe: %d syncs, " \
            "median %.1f ms, p90 %.1f ms, max %.1f ms; bound %.2f s" % (
                ["%.3f/%.3f/%.3f/%.3f" % h for h in holds], ["%.3f" % w for w in waits],
                len(syncs), syncs[len(syncs) // 2] * 1000, p90 * 1000, syncs[-1] * 1000, bound)
        log(what)
        check(len(holds) == 9 and len(waits) == 9, "9 holds reported: " + what)
        check(max(h[2] for h in holds) < 1, "the drain's end noticed late: " + what)
        worst = max(h[0] - w for h, w in zip(holds, waits))
        check(worst < bound, "requests held too long: " + what)
        log("ok: %s: 6 snapshots and 3 deletes under random writes; bench without errors; "
            "snapshot latency %.1f..%.1f ms; requests held %.0f ms at most, %.0f ms without "
            "CPU waits (bound %.0f ms); slowest request %.0f ms" % (
                "%d I/O threads" % threads if threads else "one thread", min(lat) * 1000,
                max(lat) * 1000, max(h[0] for h in holds) * 1000, worst * 1000, bound * 1000,
                float(m.group(1)) / 1000))
    qimg_check(img, "after snapshots under load")
    names = [ln.split()[1] for ln in qimg("snapshot", "-l", img).stdout.splitlines()[2:]]
    check(names == ["l1", "l3", "l5"], "snapshots %r" % names)
    for n in names:
        qio(snapshot_raw(img, n, work), "read -P 0x50 40M 1M", fmt="raw")
    log("ok: check clean; every snapshot holds the data written before it")


def test_kill(vqcowd, fe_bin, work, rounds):
    base = os.path.join(work, "kill-base.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x50 40M 1M", "-c", "write -P 0x51 0 32M", base],
                   check=True, capture_output=True)
    qimg("snapshot", "-c", "keep", base)
    rng = random.Random(1234)
    leaks = oflag = 0
    for i in range(rounds):
        img = os.path.join(work, "kill.qcow2")
        shutil.copyfile(base, img)
        d = Daemon(vqcowd, work, img, "kill")
        q = Qmp(d.qsock)
        b = bench(fe_bin, d.vsock, 3)
        time.sleep(0.2 + rng.random() * 0.2)
        if i % 2:
            cmd = ("blockdev-snapshot-delete-internal-sync", {"device": "disk0", "name": "keep"})
        else:
            cmd = ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "new"})
        q.send_raw('{"execute": "%s", "arguments": {"device": "disk0", "name": "%s"}}\n'
                   % (cmd[0], cmd[1]["name"]))
        time.sleep(rng.random() * 0.03)
        d.p.send_signal(signal.SIGKILL)
        d.p.wait(10)
        b.kill()
        b.wait(10)
        q.close()
        # The dead process's io_uring lets go of the file (and its OFD
        # locks) a moment after the process is gone.
        for _ in range(100):
            r = qimg("check", img, ok=(0, 1, 2, 3))
            if "lock" not in r.stderr:
                break
            time.sleep(0.05)
        check(r.returncode in (0, 2, 3), "qemu-img check: rc %d\n%s" % (r.returncode, r.stderr))
        errs = [ln for ln in r.stderr.splitlines() if ln.startswith("ERROR")]
        bad = [ln for ln in errs if "OFLAG_COPIED" not in ln]
        check(not bad, "round %d (%s): refcount errors after kill -9:\n%s" % (i, cmd[0],
                                                                            "\n".join(bad)))
        leaks += "leaked clusters were found" in r.stdout
        oflag += bool(errs)
        # COPIED set on a cluster with a refcount over 1 is harmless only
        # while it is in fact used once (a leak); otherwise a write would
        # overwrite what a snapshot holds.
        check(not shared_copied(r.stderr + r.stdout, 16),
              "round %d: COPIED set on a shared cluster:\n%s" % (i, r.stderr))
        if r.returncode:
            qimg("check", "-r", "all", img, ok=(0,))
        qimg_check(img, "round %d after repair" % i)
        qio(img, "read -P 0x50 40M 1M")
        snaps = [ln.split()[1] for ln in qimg("snapshot", "-l", img).stdout.splitlines()[2:]]
        for n in snaps:
            raw = snapshot_raw(img, n, work)
            qio(raw, "read -P 0x50 40M 1M", fmt="raw")
            if n == "keep":
                qio(raw, "read -P 0x51 0 32M", fmt="raw")
            os.unlink(raw)
        os.unlink(d.qsock) if os.path.exists(d.qsock) else None
        os.unlink(d.vsock) if os.path.exists(d.vsock) else None
    log("ok: %d kill -9 during snapshot create/delete under load: no refcount too low, "
        "%d with leaks, %d with COPIED flags to fix; repaired clean; data intact"
        % (rounds, leaks, oflag))


def main():
    vqcowd, fe_bin, ctl, vimg, work = setup_work(5, "qemu-img", "qemu-io")
    test_data(vqcowd, fe_bin, ctl, vimg, work)
    test_img_cli(vimg, work)
    test_punch(vimg, work)
    test_online_punch(vqcowd, fe_bin, work)
    test_grow(vqcowd, fe_bin, vimg, work)
    test_busy(vqcowd, work)
    qsd_ran = test_qsd(vqcowd, work)
    test_load(vqcowd, fe_bin, work)
    test_load(vqcowd, fe_bin, work, threads=2)
    test_kill(vqcowd, fe_bin, work, int(os.environ.get("VQCOW_SNAP_KILL_ROUNDS", "12")))
    if not qsd_ran:
        log("SKIP: the qemu-storage-daemon comparison did not run")
        return SKIP
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
