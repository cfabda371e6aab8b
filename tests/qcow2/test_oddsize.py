#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Virtual sizes that are not a multiple of 512 bytes (issue 9, smaller things).

QEMU counts whole sectors: a qcow2 image whose header says N bytes has
floor(N / 512) sectors (the partial last one does not exist), a raw file of N
bytes has ceil(N / 512) sectors (the partial last one reads the file's bytes,
then zeroes, and writing it extends the file to the sector boundary).

For several N (remainders 1, 64, 511) and both formats:
  1. vqcow-img info / map (JSON) equal qemu-img's
  2. the capacity vqcowd offers equals the one qemu-storage-daemon's
     vhost-user-blk export offers (when qemu-storage-daemon is installed;
     else qemu-img info's virtual size), read through vqcow-fe
  3. qcow2: the last whole sector reads and writes; the partial one is
     refused (IOERR) both ways; qemu-img check stays clean and the data
     reads back in qemu-io
  4. raw: the partial sector reads as the file's bytes then zeroes; a write
     to it gives the same file (size and bytes) as qemu-io's write
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
W = None
BASE = 1 << 20
SIZES = [BASE - 512 + 1, BASE - 512 + 64, BASE - 1]  # remainders 1, 64, 511


def vimg_json(*args):
    r = qlib.run([A.img] + [str(a) for a in args])
    qlib.assert_sane_exit(r, "vqcow-img")
    check(r.rc == 0, "vqcow-img failed:\n" + r.describe())
    return json.loads(r.text)


def capacity(sock):
    for _ in range(100):
        r = qlib.run([A.fe, "info", sock])
        # the socket file appears at bind(), before listen(): retry a refused connect
        if r.rc == 0 or "Connection refused" not in r.errtext:
            break
        time.sleep(0.02)
    check(r.rc == 0, "vqcow-fe info failed\n" + r.describe())
    for line in r.text.splitlines():
        if line.strip().startswith("capacity:"):
            return int(line.split()[1]) * 512
    fail("vqcow-fe info printed no capacity\n" + r.text)


def qsd_capacity(path, fmt):
    """The capacity QEMU's own vhost-user-blk export offers, or None without qsd."""
    if shutil.which("qemu-storage-daemon") is None:
        return None
    sock = W("qsd.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                          "driver=file,filename=%s,node-name=f,read-only=on" % path,
                          "--blockdev", "driver=%s,file=f,node-name=d,read-only=on" % fmt,
                          "--export", "vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                          "addr.path=%s,writable=off" % sock],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(250):
            if os.path.exists(sock) or p.poll() is not None:
                break
            time.sleep(0.02)
        check(os.path.exists(sock), "qemu-storage-daemon did not start: %s"
              % (p.stdout.read().decode(errors="replace") if p.poll() is not None else "timeout"))
        return capacity(sock)
    finally:
        p.terminate()
        p.wait()


def tools_match(path, fmt, what):
    q = qlib.qemu_info(path, fmt=fmt)
    v = vimg_json("info", "--output=json", "-f", fmt, path)
    check(q["virtual-size"] == v.get("virtual-size"), "%s: info virtual-size: qemu-img %r, "
          "vqcow-img %r" % (what, q["virtual-size"], v.get("virtual-size")))
    qm = json.loads(qlib.qemu_img("map", "--output=json", "-f", fmt, path).text)
    vm = vimg_json("map", "--output=json", "-f", fmt, path)
    check(qm == vm, "%s: map differs:\n qemu-img %r\n vqcow-img %r" % (what, qm, vm))
    return q["virtual-size"]


def serve(path, fmt):
    sock = W("v.sock")
    d = qlib.Daemon(A.vqcowd, path, sock, extra=["--format", fmt])
    if not d.start():
        fail("vqcowd refused %s\n%s" % (path, d.log()))
    return d, qlib.Frontend(A.fe, sock), sock


def run_qcow2(n):
    what = "qcow2 %d" % n
    img = W("odd.qcow2")
    if os.path.exists(img):
        os.unlink(img)
    qlib.qemu_img("create", "-f", "qcow2", img, BASE)
    qlib.qemu_io(img, "write -P 0x61 %d 512" % (BASE - 1024), "write -P 0x62 %d 512" % (BASE - 512))
    with open(img, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", n))
    whole = n // 512 * 512
    vsize = tools_match(img, "qcow2", what)
    check(vsize == whole, "%s: qemu-img says %d bytes (want %d): the oracle changed" % (what, vsize, whole))
    want = qsd_capacity(img, "qcow2")
    if want is None:
        want = vsize
    d, fe, sock = serve(img, "qcow2")
    with qlib.killed_on_error(d):
        got = capacity(sock)
        check(got == want, "%s: vqcowd offers %d bytes, QEMU %d" % (what, got, want))
        last = whole - 512
        check(fe.read_ok(last, 512) == bytes([0x61 if last == BASE - 1024 else 0]) * 512,
              "%s: last whole sector reads wrong" % what)
        fe.write_ok(last, b"\x71" * 512)
        r = fe.read(whole, 512)
        check(r.rc == 3, "%s: reading the partial sector at %d: want IOERR\n%s" % (what, whole, r.describe()))
        r = fe.write(whole, b"\x72" * 512)
        check(r.rc == 3, "%s: writing the partial sector at %d: want IOERR\n%s" % (what, whole, r.describe()))
        fe.flush_ok()
    d.assert_clean_stop()
    qlib.assert_qemu_check_clean(img, what)
    # QEMU itself cannot reach the partial sector either: restore the size to read it
    with open(img, "r+b") as f:
        f.seek(24)
        f.write(struct.pack(">Q", BASE))
    qlib.qemu_io(img, "read -P 0x71 %d 512" % last, "read -P 0x62 %d 512" % (BASE - 512))


def run_raw(n):
    what = "raw %d" % n
    img = W("odd.raw")
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    with open(img, "wb") as f:
        f.write(data)
    os.sync()  # settle delayed allocation: SEEK_DATA/SEEK_HOLE answers feed map
    up = (n + 511) // 512 * 512
    vsize = tools_match(img, "raw", what)
    check(vsize == up, "%s: qemu-img says %d bytes (want %d): the oracle changed" % (what, vsize, up))
    want = qsd_capacity(img, "raw")
    if want is None:
        want = vsize
    ref = W("odd-ref.raw")
    shutil.copyfile(img, ref)
    d, fe, sock = serve(img, "raw")
    with qlib.killed_on_error(d):
        got = capacity(sock)
        check(got == want, "%s: vqcowd offers %d bytes, QEMU %d" % (what, got, want))
        tail = up - 512
        got = fe.read_ok(tail, 512)
        check(got == data[tail:] + bytes(up - n), "%s: the partial sector does not read as the "
              "file's bytes then zeroes" % what)
        fe.write_ok(tail, b"\x5c" * 512)
        fe.flush_ok()
        check(fe.read_ok(tail, 512) == b"\x5c" * 512, "%s: partial sector write not read back" % what)
    d.assert_clean_stop()
    qlib.qemu_io(ref, "write -P 0x5c %d 512" % tail, fmt="raw")
    check(os.path.getsize(img) == os.path.getsize(ref),
          "%s: file size after the write: vqcowd %d, qemu-io %d"
          % (what, os.path.getsize(img), os.path.getsize(ref)))
    qlib.compare_files(ref, img, what + ": file after writing the partial sector, vs qemu-io")


def main():
    global A, W
    A = qlib.parse_args()
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binaries(A, "vqcowd", "img", "fe")
    wd = qlib.Workdir(os.path.join(A.workdir, "oddsize"), A.keep)
    W = wd
    ok = False
    try:
        if shutil.which("qemu-storage-daemon") is None:
            log("note: qemu-storage-daemon not found: capacities compared with qemu-img info")
        for n in SIZES:
            run_qcow2(n)
            run_raw(n)
            log("PASS size %d" % n)
        ok = True
    finally:
        wd.cleanup(ok)


if __name__ == "__main__":
    qlib.main_wrapper(main)
