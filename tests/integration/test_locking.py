#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Image locking against QEMU's tools (issue 9 item 1).

vqcowd, vqcow-img, qemu-io, qemu-img and qemu-storage-daemon must refuse each
other exactly as two QEMU processes would (QEMU's OFD lock bytes 100+perm /
200+perm). For a raw and a qcow2 image (the qcow2 one with a qcow2 backing
file and a second overlay with an external data file):

  * vqcowd read-write holds the image: qemu-io write, a second vqcowd
    (read-write and read-only), qemu-storage-daemon, qemu-img info (qcow2;
    QEMU itself takes no lock for info on raw), vqcow-img info/check/map
    (qcow2) are refused with the right message and a non-zero exit within a
    second; -U / --force-share get through; the backing file and the data
    file in use cannot be written by qemu-io; what vqcowd wrote before is
    intact afterwards.
  * two read-only vqcowd share the image; a read-only vqcowd blocks a
    read-write vqcowd and qemu-io writes, not qemu-io -r.
  * the reverse: qemu-storage-daemon or qemu-io holding the image blocks
    vqcowd; vqcowd --read-only --force-share still starts.
  * --force-share without --read-only is refused.
  * a raw block device (a loop device; skipped visibly where none can be
    made) is locked the same way, both directions.

Usage: test_locking.py --vqcowd PATH --img PATH --fe PATH --workdir DIR
Exits 77 (SKIP) without qemu-img / qemu-io / qemu-storage-daemon.
"""

import os
import socket
import stat
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "qcow2"))
import qlib  # noqa: E402
from qlib import check, log  # noqa: E402

A = None
W = None
LOCKED = "locked by another process"


def timed(argv, timeout=10):
    t = time.monotonic()
    r = qlib.run(argv, timeout=timeout)
    return r, time.monotonic() - t


def refused(argv, want, what):
    """argv must exit non-zero within a second (plus its start-up now:
    qlib.prompt_limit), naming the lock in @want."""
    limit = qlib.prompt_limit(argv[0])
    r, dt = timed(argv)
    qlib.assert_sane_exit(r, what)
    text = r.text + r.errtext
    check(r.rc != 0, "%s: not refused\n%s" % (what, r.describe()))
    check(want in text, "%s: message lacks %r\n%s" % (what, want, r.describe()))
    check(dt < limit, "%s: refusal took %.2fs (want < %.2f s)" % (what, dt, limit))
    log("ok: %s refused (%.2fs): %s" % (what, dt, text.strip().splitlines()[0]))
    return r


def accepted(argv, what, ok_rcs=(0,)):
    r, _ = timed(argv, timeout=60)
    qlib.assert_sane_exit(r, what)
    check(r.rc in ok_rcs, "%s: refused\n%s" % (what, r.describe()))
    log("ok: %s works" % what)
    return r


def qemu_io_write(img, fmt):
    return ["qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 4k", img]


def vqcowd_refused(img, want, what, extra=()):
    """A second vqcowd: one-line error naming the file, non-zero, < 1 s (plus
    its start-up now: qlib.prompt_limit)."""
    sock = W("refused.sock")
    argv = [A.vqcowd, "--socket-path", sock, "--blk-file", img] + list(extra)
    limit = qlib.prompt_limit(A.vqcowd)
    r, dt = timed(argv)
    qlib.assert_sane_exit(r, what)
    lines = r.errtext.strip().splitlines()
    check(r.rc not in (0, None), "%s: not refused\n%s" % (what, r.describe()))
    check(dt < limit, "%s: refusal took %.2fs (want < %.2f s)" % (what, dt, limit))
    check(len(lines) == 1, "%s: want a one-line error\n%s" % (what, r.describe()))
    check(want in lines[0] and LOCKED in lines[0] and os.path.basename(img) in lines[0],
          "%s: message should name %s, %r and %r\n%s" % (what, img, want, LOCKED,
                                                          r.describe()))
    check(not os.path.exists(sock), "%s: left a socket behind" % what)
    log("ok: %s refused (%.2fs): %s" % (what, dt, lines[0]))


def start_daemon(img, name, extra=()):
    d = qlib.Daemon(A.vqcowd, img, W(name + ".sock"), extra=extra)
    if not d.start():
        qlib.fail("vqcowd %s %s did not start (rc %s)\n%s" % (img, " ".join(extra), d.rc,
                                                               d.log()))
    # The socket file appears at bind(); wait for listen() too.
    for _ in range(500):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            try:
                c.connect(d.sock)
                return d
            except ConnectionRefusedError:
                pass
        time.sleep(0.01)
    d.kill()
    qlib.fail("vqcowd on %s never listened\n%s" % (img, d.log()))


class Qsd:
    """qemu-storage-daemon exporting IMG over vhost-user-blk."""

    def __init__(self, img, fmt, writable, name):
        self.sock = W(name + ".qsd.sock")
        ro = "" if writable else ",read-only=on"
        proto = "host_device" if stat.S_ISBLK(os.stat(img).st_mode) else "file"
        self.argv = ["qemu-storage-daemon",
                     "--blockdev", "driver=%s,filename=%s,node-name=f%s" % (proto, img, ro),
                     "--blockdev", "driver=%s,file=f,node-name=n%s" % (fmt, ro),
                     "--export", "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,"
                     "addr.path=%s,writable=%s" % (self.sock, "on" if writable else "off")]
        self.p = None

    def run_refused(self, want, what):
        return refused(self.argv, want, what)

    def start(self):
        self.p = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(500):
            if os.path.exists(self.sock):
                return
            if self.p.poll() is not None:
                qlib.fail("qemu-storage-daemon exited: %s" % self.p.stdout.read().decode())
            time.sleep(0.01)
        qlib.fail("qemu-storage-daemon did not create its socket")

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.terminate()
            self.p.wait(20)
        if os.path.exists(self.sock):
            os.unlink(self.sock)


class QemuIo:
    """qemu-io holding an image open (commands fed on stdin later)."""

    def __init__(self, img, fmt, ro=False):
        argv = ["qemu-io", "-f", fmt] + (["-r"] if ro else []) + [img]
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        time.sleep(0.3)
        if self.p.poll() is not None:
            qlib.fail("qemu-io %s exited: %s" % (img, self.p.stdout.read().decode()))

    def stop(self):
        self.p.communicate(b"quit\n", timeout=20)


def make_images():
    imgs = {}
    raw = W("disk.raw")
    qlib.qemu_img("create", "-f", "raw", raw, "64M")
    imgs["raw"] = (raw, "raw", [])
    base = W("base.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", base, "64M")
    qlib.qemu_io(base, "write -P 0xb0 0 1M", fmt="qcow2")
    top = W("disk.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    imgs["qcow2"] = (top, "qcow2", [(base, "qcow2", "backing file")])
    data = W("data.raw")
    dtop = W("ext.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-o", "data_file=%s,data_file_raw=on" % data, dtop,
                  "64M")
    imgs["qcow2+data"] = (dtop, "qcow2", [(data, "raw", "external data file")])
    return imgs


def test_writer(name, img, fmt, others):
    log("== %s: vqcowd read-write holds %s" % (name, img))
    d = start_daemon(img, "rw-" + name)
    fe = qlib.Frontend(A.fe, d.sock)
    payload = bytes([0xc3]) * 65536
    fe.write_ok(1 << 20, payload)
    fe.flush_ok()
    try:
        refused(qemu_io_write(img, fmt), 'Failed to get "write" lock', "qemu-io write")
        if fmt == "qcow2":
            refused(["qemu-img", "info", img], 'Failed to get shared "write" lock',
                    "qemu-img info")
        else:
            # QEMU takes no lock at all for qemu-img info on a raw image.
            accepted(["qemu-img", "info", img], "qemu-img info (raw: QEMU locks nothing)")
        accepted(["qemu-img", "info", "-U", img], "qemu-img info -U")
        vqcowd_refused(img, 'Failed to get "write" lock', "second vqcowd read-write")
        vqcowd_refused(img, 'Failed to get shared "write" lock', "second vqcowd read-only",
                       ["--read-only"])
        Qsd(img, fmt, True, "w-" + name).run_refused('"write" lock',
                                                     "qemu-storage-daemon read-write")
        if fmt == "qcow2":
            Qsd(img, fmt, False, "r-" + name).run_refused('Failed to get shared "write" lock',
                                                          "qemu-storage-daemon read-only")
        else:
            # A qsd export of a raw node shares every permission: QEMU lets it in.
            q = Qsd(img, fmt, False, "r-" + name)
            q.start()
            q.stop()
            log("ok: qemu-storage-daemon read-only export of raw starts (QEMU shares all)")
        if fmt == "qcow2":
            for cmd in ("info", "check", "map"):
                refused([A.img, cmd, img], 'Failed to get shared "write" lock',
                        "vqcow-img " + cmd)
                # check of an image in use: clusters the writer reserved ahead
                # (refcount raised, not linked yet) show as leaks (exit 3)
                accepted([A.img, cmd, "-U", img], "vqcow-img %s -U" % cmd,
                         (0, 3) if cmd == "check" else (0,))
            refused([A.img, "check", "-r", "leaks", img], "Failed to get", "vqcow-img check -r")
        else:
            accepted([A.img, "info", img], "vqcow-img info (raw: as qemu-img, no lock)")
            accepted([A.img, "info", "-U", img], "vqcow-img info -U")
        # --force-share: a read-only observer next to the writer
        ro = start_daemon(img, "fs-" + name, ["--read-only", "--force-share"])
        got = qlib.Frontend(A.fe, ro.sock).read_ok(1 << 20, 65536)
        check(got == payload, "%s: --force-share reader does not see the flushed data" % name)
        ro.assert_clean_stop()
        log("ok: vqcowd --read-only --force-share starts and reads next to the writer")
        for path, ofmt, what in others:
            refused(qemu_io_write(path, ofmt), 'Failed to get "write" lock',
                    "qemu-io write to the %s in use" % what)
            refused(["qemu-img", "resize", "-f", ofmt, path, "+1M"], "Failed to get",
                    "qemu-img resize of the %s in use" % what)
    finally:
        d.assert_clean_stop()
    r = qlib.run(["qemu-io", "-f", fmt, "-r", "-c", "read -P 0xc3 1M 64k", img], check_rc=0)
    check("Pattern verification failed" not in r.text,
          "%s: the data vqcowd wrote was changed\n%s" % (name, r.describe()))
    if fmt == "qcow2":
        qlib.assert_qemu_check_clean(img, name)
    log("ok: %s intact after the refused attempts" % name)


def test_readers(name, img, fmt, others):
    log("== %s: read-only vqcowd" % name)
    r1 = start_daemon(img, "ro1-" + name, ["--read-only"])
    try:
        r2 = start_daemon(img, "ro2-" + name, ["--read-only"])
        log("ok: two read-only vqcowd share %s" % img)
        r2.assert_clean_stop()
        vqcowd_refused(img, 'Failed to get "write" lock', "vqcowd read-write next to a reader")
        refused(qemu_io_write(img, fmt), 'Failed to get "write" lock',
                "qemu-io write next to a reader")
        accepted(["qemu-io", "-r", "-f", fmt, "-c", "read 0 4k", img],
                 "qemu-io -r next to a reader")
        if fmt == "qcow2":
            accepted(["qemu-img", "info", img], "qemu-img info next to a reader")
            accepted([A.img, "check", img], "vqcow-img check next to a reader")
            refused([A.img, "check", "-r", "all", img], 'Failed to get "write" lock',
                    "vqcow-img check -r next to a reader")
        for path, ofmt, what in others:
            refused(qemu_io_write(path, ofmt), 'Failed to get "write" lock',
                    "qemu-io write to the %s of a reader" % what)
    finally:
        r1.assert_clean_stop()


def test_reverse(name, img, fmt):
    log("== %s: QEMU holds the image, vqcowd comes second" % name)
    q = Qsd(img, fmt, True, "hold-" + name)
    q.start()
    try:
        vqcowd_refused(img, "lock", "vqcowd read-write vs qemu-storage-daemon")
        vqcowd_refused(img, 'Failed to get shared "write" lock',
                       "vqcowd read-only vs qemu-storage-daemon", ["--read-only"])
        d = start_daemon(img, "fsq-" + name, ["--read-only", "--force-share"])
        d.assert_clean_stop()
        log("ok: vqcowd --read-only --force-share next to qemu-storage-daemon")
        if fmt == "qcow2":
            refused([A.img, "info", img], 'Failed to get shared "write" lock',
                    "vqcow-img info vs qemu-storage-daemon")
    finally:
        q.stop()
    io = QemuIo(img, fmt)
    try:
        vqcowd_refused(img, "lock", "vqcowd read-write vs qemu-io")
        vqcowd_refused(img, 'Failed to get shared "write" lock', "vqcowd read-only vs qemu-io",
                       ["--read-only"])
    finally:
        io.stop()
    io = QemuIo(img, fmt, ro=True)
    try:
        if fmt == "qcow2":
            vqcowd_refused(img, 'Failed to get "write" lock', "vqcowd read-write vs qemu-io -r")
        else:
            # qemu-io shares every permission of a raw image: QEMU lets a writer in.
            start_daemon(img, "rw-vs-io-" + name).assert_clean_stop()
            log("ok: vqcowd read-write next to qemu-io -r on raw (qemu-io shares all)")
        d = start_daemon(img, "ro-vs-io-" + name, ["--read-only"])
        d.assert_clean_stop()
        log("ok: vqcowd --read-only next to qemu-io -r")
    finally:
        io.stop()


def test_blockdev():
    """The same locks on a block device node (a loop device), if we can make one."""
    log("== raw block device")
    back = W("loop.img")
    with open(back, "wb") as f:
        f.truncate(64 << 20)
    r = qlib.run(["losetup", "-f", "--show", back])
    dev = r.text.strip()
    if r.rc != 0 or not dev.startswith("/dev/"):
        log("SKIP (part): no loop device here (%s)" % r.errtext.strip())
        return
    try:
        d = start_daemon(dev, "blockdev")
        try:
            refused(qemu_io_write(dev, "raw"), 'Failed to get "write" lock',
                    "qemu-io write to the block device")
            vqcowd_refused(dev, 'Failed to get shared "write" lock',
                           "second vqcowd read-only on the block device", ["--read-only"])
        finally:
            d.assert_clean_stop()
        q = Qsd(dev, "raw", True, "blockdev")
        q.start()
        try:
            vqcowd_refused(dev, "lock", "vqcowd vs qemu-storage-daemon on the block device")
        finally:
            q.stop()
    finally:
        qlib.run(["losetup", "-d", dev])


def main():
    global A, W
    A = qlib.parse_args()
    qlib.need_qemu_tools("qemu-io", "qemu-storage-daemon")
    qlib.need_binaries(A, "vqcowd", "img", "fe")
    W = qlib.Workdir(A.workdir, A.keep)
    ok = False
    try:
        imgs = make_images()
        r = qlib.run([A.vqcowd, "--socket-path", W("x.sock"), "--blk-file", imgs["raw"][0],
                      "--force-share"])
        check(r.rc not in (0, None) and "--read-only" in r.errtext,
              "--force-share without --read-only must be refused\n" + r.describe())
        for name, (img, fmt, others) in imgs.items():
            test_writer(name, img, fmt, others)
            test_readers(name, img, fmt, others)
        for name in ("raw", "qcow2"):
            test_reverse(name, imgs[name][0], imgs[name][1])
        test_blockdev()
        ok = True
    finally:
        W.cleanup(ok)
    log("PASS")
    return 0


if __name__ == "__main__":
    qlib.main_wrapper(main)
