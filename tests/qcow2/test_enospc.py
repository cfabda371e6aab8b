#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""A full file system must not lose acknowledged writes (issue 9, item 8).

On a small ext4 file system (a loop-mounted file in a private mount
namespace, reserved blocks off; one case on XFS, where available), filled up
to a few MiB, for each case:
  1. vqcowd serves a fresh qcow2 image; 1 MiB writes with distinct patterns
     go to consecutive offsets until one fails (ENOSPC); in the "flush" mode
     every acknowledged write is followed by a FLUSH, which must succeed
  2. SIGTERM: vqcowd must exit 0 (its final flush succeeds)
  3. qemu-img check is clean; a new vqcowd reads every acknowledged write back
  4. qemu-io (cache=none) on a fresh copy of the same set-up writes the same
     1 MiB pieces: vqcowd must manage at least as many as qemu-io minus one
     (both numbers are printed)
The old code preallocated 64 MiB chunks with fallocate; near a full file
system the fallocate failed part-way, ext4 kept the blocks it got, and the
write-back of the new L2 table into a hole then failed: the write was
acknowledged, its FLUSH failed, vqcowd exited 1 and the data was gone.

Exit 77 (skip) without root, mkfs.ext4, losetup, unshare or a loop device.
The mount lives in a private mount namespace and its loop device is set to
autoclear, so neither survives the test, even when it is killed.
"""

import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qlib  # noqa: E402
from qlib import check, fail, log  # noqa: E402

A = None
FS_MB = 128
XFS_MB = 320  # mkfs.xfs's minimum
NS_ENV = "VQCOW_ENOSPC_NS"


def skip(why):
    log("SKIP: %s" % why)
    sys.exit(qlib.SKIP)


def enter_namespace():
    if os.environ.get(NS_ENV):
        return
    if os.geteuid() != 0:
        skip("needs root (mkfs, losetup, mount)")
    for tool in ("mkfs.ext4", "losetup", "unshare", "mount", "umount", "fallocate"):
        if shutil.which(tool) is None:
            skip("%s not installed" % tool)
    r = qlib.run(["unshare", "-m", "--propagation", "private", "true"])
    if r.rc != 0:
        skip("cannot make a mount namespace: %s" % r.errtext.strip())
    env = dict(os.environ)
    env[NS_ENV] = "1"
    os.execvpe("unshare", ["unshare", "-m", "--propagation", "private", sys.executable,
                           os.path.abspath(__file__)] + sys.argv[1:], env)


class SmallFs:
    """A fresh ext4 (or XFS) file system of FS_MB (XFS_MB) MiB, mounted at self.mnt."""

    def __init__(self, workdir, fstype="ext4"):
        self.fstype = fstype
        self.img = os.path.join(workdir, "fs.img")
        self.mnt = None
        self.loop = None
        self.mounted = False

    def __enter__(self):
        try:
            with open(self.img, "wb") as f:
                f.truncate((XFS_MB if self.fstype == "xfs" else FS_MB) << 20)
            if self.fstype == "xfs":
                qlib.run(["mkfs.xfs", "-q", "-f", self.img], check_rc=0)
            else:
                qlib.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", self.img], check_rc=0)
            r = qlib.run(["losetup", "-f", "--show", self.img])
            if r.rc != 0:
                skip("no loop device available: %s" % r.errtext.strip())
            self.loop = r.text.strip()
            self.mnt = tempfile.mkdtemp(prefix="vqen.", dir="/tmp")
            r = qlib.run(["mount", "-t", self.fstype, self.loop, self.mnt])
            if r.rc != 0:
                skip("mounting %s failed: %s" % (self.loop, r.errtext.strip()))
            self.mounted = True
            # detached while mounted = autoclear: released with the mount
            if qlib.run(["losetup", "-d", self.loop]).rc == 0:
                self.loop = None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def avail(self):
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize

    def fill(self, leave):
        """Leave about @leave bytes free."""
        n = self.avail() - leave
        check(n > 0, "file system smaller than expected")
        qlib.run(["fallocate", "-l", str(n), os.path.join(self.mnt, "filler")], check_rc=0)

    def __exit__(self, *a):
        if self.mounted:
            if qlib.run(["umount", self.mnt]).rc != 0:
                qlib.run(["umount", "-l", self.mnt])
            self.mounted = False
        if self.loop:
            qlib.run(["losetup", "-d", self.loop])
            self.loop = None
        if self.mnt:
            try:
                os.rmdir(self.mnt)
            except OSError:
                pass
        try:
            os.unlink(self.img)
        except OSError:
            pass


def piece(i):
    return bytes([(i % 250) + 1]) * (1 << 20)


def run_vqcowd(fs, opts, vsize, flush_each, what):
    img = os.path.join(fs.mnt, "t.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-o", opts, img, vsize)
    sock = os.path.join(fs.mnt, "v.sock")
    d = qlib.Daemon(A.vqcowd, img, sock, logpath=os.path.join(A.workdir, "enospc-vqcowd.log"))
    if not d.start():
        fail("%s: vqcowd did not start\n%s" % (what, d.log()))
    fe = qlib.Frontend(A.fe, sock)
    acked = 0
    with qlib.killed_on_error(d):
        for i in range(XFS_MB):
            r = fe.write(i << 20, piece(i))
            if r.rc != 0:
                check(r.rc == 3, "%s: write %d: want IOERR, got\n%s" % (what, i, r.describe()))
                break
            acked += 1
            if flush_each:
                r = fe.flush()
                check(r.rc == 0, "%s: FLUSH after acknowledged write %d failed\n%s\n%s"
                      % (what, i, r.describe(), d.log()))
        else:
            fail("%s: no write failed on a small file system" % what)
        check(d.alive(), "%s: vqcowd died\n%s" % (what, d.log()))
    d.assert_clean_stop()
    qlib.assert_qemu_check_clean(img, what)
    d = qlib.Daemon(A.vqcowd, img, sock, logpath=os.path.join(A.workdir, "enospc-vqcowd2.log"))
    if not d.start():
        fail("%s: vqcowd cannot reopen the image\n%s" % (what, d.log()))
    with qlib.killed_on_error(d):
        fe = qlib.Frontend(A.fe, sock)
        for i in range(acked):
            got = fe.read_ok(i << 20, 1 << 20)
            check(got == piece(i), "%s: acknowledged write %d (1 MiB at %d MiB) did not survive"
                  % (what, i, i))
    d.assert_clean_stop()
    return acked


def run_qemu_io(fs, opts, vsize):
    img = os.path.join(fs.mnt, "q.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-o", opts, img, vsize)
    acked = 0
    for i in range(XFS_MB):
        r = qlib.run(["qemu-io", "-t", "none", "-c", "write -P %d %d 1M" % ((i % 250) + 1, i << 20),
                      img])
        if r.rc != 0 or "error" in r.text.lower() or "failed" in r.text.lower():
            break
        acked += 1
    return acked


CASES = [
    # (name, file system, create options, virtual size, free space left, flush after each write)
    ("64k-2.5M-flush", "ext4", "cluster_size=65536", "1G", 2560 << 10, True),
    ("64k-8M-flush", "ext4", "cluster_size=65536", "1G", 8 << 20, True),
    ("64k-8M-noflush", "ext4", "cluster_size=65536", "1G", 8 << 20, False),
    ("4k-6M-flush", "ext4", "cluster_size=4096", "4G", 6 << 20, True),
    ("extl2-6M-flush", "ext4", "cluster_size=65536,extended_l2=on", "1G", 6 << 20, True),
    ("xfs-64k-4M-flush", "xfs", "cluster_size=65536", "1G", 4 << 20, True),
]


def have_xfs():
    if shutil.which("mkfs.xfs") is None:
        return False
    with open("/proc/filesystems") as f:
        if "xfs" in f.read().split():
            return True
    return qlib.run(["modprobe", "xfs"]).rc == 0


def main():
    global A
    enter_namespace()
    A = qlib.parse_args()
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binary(A.vqcowd, "vqcowd")
    qlib.need_binary(A.fe, "vqcow-fe (tests/frontend)")
    os.makedirs(A.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="enospc-", dir=A.workdir)
    results = []
    try:
        for name, fstype, opts, vsize, leave, flush_each in CASES:
            if fstype == "xfs" and not have_xfs():
                log("SKIP %s: no XFS here (mkfs.xfs or the kernel module missing)" % name)
                continue
            with SmallFs(work, fstype) as fs:
                fs.fill(leave)
                ours = run_vqcowd(fs, opts, vsize, flush_each, name)
            with SmallFs(work, fstype) as fs:
                fs.fill(leave)
                theirs = run_qemu_io(fs, opts, vsize)
            log("%s: vqcowd wrote %d MiB, qemu-io %d MiB (%d KiB free at the start)"
                % (name, ours, theirs, leave >> 10))
            check(ours >= theirs - 1, "%s: vqcowd managed %d MiB where qemu-io managed %d MiB"
                  % (name, ours, theirs))
            results.append(name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("PASS: %s" % ", ".join(results))


if __name__ == "__main__":
    qlib.main_wrapper(main)
