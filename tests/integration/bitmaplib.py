# SPDX-License-Identifier: MIT
"""Shared helpers of the dirty bitmap QMP tests (test_qmp_bitmap_cmds.py,
test_qmp_bitmap_np.py): a command sequence run against qemu-storage-daemon
and vqcowd and the two answers compared, and QEMU's tools as the oracles of
what reached the file (qemu-img info/check, qemu-nbd -B + nbdinfo). Found
next to the tests as qmplib.py is."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time

from qmplib import Qmp, check, fe, reap, vqcowd_session, wait_path, wait_unlocked  # noqa: F401
from qmplib import qimg_check as check_clean  # noqa: F401

QSD = shutil.which("qemu-storage-daemon")
M = 1 << 20
N = "disk0"


def sh(*args):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                          timeout=120).stdout.decode()


def info_bitmaps(img):
    i = json.loads(sh("qemu-img", "info", "--output=json", img))
    return i.get("format-specific", {}).get("data", {}).get("bitmaps")


def wait_listening(sock, p):
    """qemu-nbd creates its socket file before it listens on it: a client
    connecting in between is refused (nbdinfo exited 1 once under load).
    Wait (at most 10 s) until a connection is accepted (qemu-nbd runs with
    -t, so the probe's disconnect does not end it)."""
    for _ in range(200):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(sock)
                return
            except OSError:
                pass
        check(p.poll() is None, "qemu-nbd exited (rc %s) before it listened" % p.returncode)
        time.sleep(0.05)
    check(False, "qemu-nbd did not listen on %s within 10 s" % sock)


def nbd_dirty(work, img, name):
    """The dirty ranges [(offset, length)] of bitmap NAME in IMG, as qemu-nbd
    -B exports them and nbdinfo --map reads them."""
    sock = os.path.join(work, "nbd.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    errlog = os.path.join(work, "qemu-nbd.err")
    with open(errlog, "wb") as err:
        p = subprocess.Popen(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-B", name, "-k", sock, img],
                             stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_path(sock, p)
        wait_listening(sock, p)
        r = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name,
                            "nbd+unix:///?socket=" + sock], capture_output=True, timeout=120)
        with open(errlog) as f:
            check(r.returncode == 0, "nbdinfo --map of %s rc %d: %s; qemu-nbd: %s" %
                  (name, r.returncode, r.stderr.decode().strip(), f.read().strip()))
        out = r.stdout.decode()
    finally:
        p.terminate()
        p.wait(10)
    dirty = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == "1":
            dirty.append((int(f[0]), int(f[1])))
    return dirty


# steps of a sequence that have no reply of their own in run_seq's output
NO_REPLY = ("write", "zero", "discard", "ready", "gone")


def run_seq(q, fe_bin, vsock, seq, subst=None):
    """Run SEQ on the QMP client Q: (command, arguments) pairs; "query" (the
    listing of node N, or of the nodes named in the arguments, in that
    order), "write"/"zero"/"discard" (offset, length) through vqcow-fe on
    VSOCK, "ready"/"gone" (poll query-block-jobs until the job is ready /
    gone). SUBST replaces string argument values. Returns the replies and
    listings: [(command, return or error)]."""
    out = []
    for cmd, args in seq:
        if cmd == "query":
            nodes = {x["node-name"]: x for x in q.ret("query-named-block-nodes")}
            # in the daemon's order: QEMU lists them newest first, of either kind
            out.append(("query", [(n, nodes[n].get("dirty-bitmaps")) for n in args] if args
                        else nodes[N].get("dirty-bitmaps")))
            continue
        if cmd in ("ready", "gone"):
            for _ in range(300):
                j = q.ret("query-block-jobs")
                if (cmd == "ready" and j and j[0]["status"] == "ready") or \
                   (cmd == "gone" and not j):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("job not %s: %r" % (cmd, j))
            continue
        if subst and isinstance(args, dict):
            args = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
        if cmd == "write":
            fe(fe_bin, "write", vsock, args[0], args[1], stdin=os.urandom(args[1]))
            continue
        if cmd == "zero":
            fe(fe_bin, "write-zeroes", vsock, args[0], args[1])
            continue
        if cmd == "discard":
            fe(fe_bin, "discard", vsock, args[0], args[1])
            continue
        r = q.cmd(cmd, args)
        out.append((cmd, r.get("return", r.get("error"))))
    return out


def compare(want, got, seq):
    """Every reply and listing of vqcowd (GOT) as qsd's (WANT); errors by their text."""
    steps = [(c, a) for c, a in seq if c not in NO_REPLY]
    for (cmd, w), (_, g), (_, args) in zip(want, got, steps):
        if isinstance(w, dict) and "desc" in w:
            check(isinstance(g, dict) and g.get("desc") == w["desc"],
                  "%s %r: qsd %r, vqcowd %r" % (cmd, args, w, g))
        else:
            check(g == w, "%s %r:\n  qsd    %r\n  vqcowd %r" % (cmd, args, w, g))
    check(len(want) == len(got) == len(steps), "lengths %d %d" % (len(want), len(got)))


def qsd_blockdevs(img):
    """--blockdev arguments: IMG (qcow2) as node N, discards reaching its bitmaps."""
    return ["driver=file,filename=%s,node-name=file0,cache.direct=on,discard=unmap" % img,
            "driver=qcow2,file=file0,node-name=%s,discard=unmap" % N]


@contextlib.contextmanager
def qsd_export(work, blockdevs):
    """qemu-storage-daemon with QMP on WORK/qsd.qmp, the BLOCKDEVS (a list of
    --blockdev arguments) and node N exported writable over vhost-user-blk
    on WORK/qsd.vsock; yields (Qmp client, vhost-user socket path) and quits
    it when the block ends (killed if it still runs)."""
    qs = os.path.join(work, "qsd.qmp")
    vs = os.path.join(work, "qsd.vsock")
    for p in (qs, vs):
        if os.path.exists(p):
            os.unlink(p)
    args = [QSD, "--chardev", "socket,path=%s,server=on,wait=off,id=c" % qs,
            "--monitor", "chardev=c"]
    for b in blockdevs:
        args += ["--blockdev", b]
    args += ["--export", "type=vhost-user-blk,id=e,node-name=%s,addr.type=unix,"
             "addr.path=%s,writable=on" % (N, vs)]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_path(qs, p)
        wait_path(vs, p)
        time.sleep(0.2)
        q = Qmp(qs)
        yield q, vs
        q.cmd("quit")
        p.wait(10)
    finally:
        reap(p)


def qsd_run(work, img, fe_bin, seq, subst=None, blockdevs=None):
    """SEQ run by qemu-storage-daemon on IMG (or on BLOCKDEVS); its run_seq output."""
    with qsd_export(work, blockdevs or qsd_blockdevs(img)) as (q, vs):
        return run_seq(q, fe_bin, vs, seq, subst)


def ours_run(vqcowd, work, img, name, fe_bin, seq, subst=None):
    """SEQ run by vqcowd on IMG (quit at the end, exit 0); (run_seq output, Daemon)."""
    with vqcowd_session(vqcowd, work, img, name) as (d, q):
        got = run_seq(q, fe_bin, d.vsock, seq, subst)
    return got, d


def pair_dirs(work, prefix, *create):
    """Fresh directories WORK/PREFIX-qsd and WORK/PREFIX-ours, each with a new
    b.qcow2 made by `qemu-img create -q -f qcow2 CREATE... b.qcow2 SIZE`
    (CREATE ends with the size); {"qsd": dir, "ours": dir}."""
    dirs = {}
    for who in ("qsd", "ours"):
        dirs[who] = os.path.join(work, prefix + who)
        shutil.rmtree(dirs[who], ignore_errors=True)
        os.makedirs(dirs[who])
        if create:
            sh("qemu-img", "create", "-q", "-f", "qcow2", *create[:-1],
               os.path.join(dirs[who], "b.qcow2"), create[-1])
    return dirs


def both_run(vqcowd, fe_bin, dirs, name, seq):
    """SEQ against qsd and vqcowd, each on b.qcow2 of its directory of DIRS
    (pair_dirs), "@TOP@" standing for t.qcow2 there; (qsd's, ours, Daemon)."""
    def sub(who):
        return {"@TOP@": os.path.join(dirs[who], "t.qcow2")}
    want = qsd_run(dirs["qsd"], os.path.join(dirs["qsd"], "b.qcow2"), fe_bin, seq, sub("qsd"))
    got, d = ours_run(vqcowd, dirs["ours"], os.path.join(dirs["ours"], "b.qcow2"), name,
                      fe_bin, seq, sub("ours"))
    return want, got, d


def have_nbd():
    return shutil.which("nbdinfo") and shutil.which("qemu-nbd")


def sorted_bitmaps(img):
    """qemu-img info's bitmaps of IMG by name ([] for none)."""
    return sorted(info_bitmaps(img) or [], key=lambda x: x["name"])


def same_dirty(work, a, b, name, what):
    """qemu-nbd -B NAME reads the same dirty ranges, and some, in qsd's file A
    and ours B; returns them."""
    ra, rb = nbd_dirty(work, a, name), nbd_dirty(work, b, name)
    check(ra == rb and ra, "%sqemu-nbd -B %s: qsd's %r, ours %r" % (what, name, ra, rb))
    return ra


def node_info(q, node=N):
    """query-named-block-nodes' entry of NODE."""
    return [x for x in q.ret("query-named-block-nodes") if x["node-name"] == node][0]
