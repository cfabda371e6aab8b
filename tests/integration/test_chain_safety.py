#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Backing chains from hostile images (issue 9 item 7).

  * vqcow-img create with a backing file but no backing format is refused as
    qemu-img 7.2 refuses it (exit 1, "Backing file specified without backing
    format", hint "Detected format of FMT.", no file left), for -b and for
    -o backing_file=, also when the backing file is a raw disk a guest wrote
    a qcow2 header into; with -F raw the header is served as raw data.
  * vqcowd never probes a backing file into qcow2: an image without a
    recorded backing format whose backing file has a qcow2 header (naming a
    host file) is refused within a second with a message that names the file
    and says how to record the format; a plain raw backing without a recorded
    format is still probed and served (legacy images).
  * backing and data files that are not regular files or block devices
    (a FIFO, a character device) are refused within a second, never waited on.
  * the chain is logged at start (each backing file with its format).
  * with --user, files named inside the image are opened as that user: a
    hostile image naming a root-only file (raw) is refused ("Permission
    denied") instead of handing the file to the guest; a readable chain is
    served (needs root and the user nobody, else that part is skipped and
    says so).

Usage: test_chain_safety.py --vqcowd PATH --img PATH --fe PATH --workdir DIR
"""

import os
import pwd
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "qcow2"))
import qcow2edit  # noqa: E402
import qlib  # noqa: E402
from qlib import check, log  # noqa: E402

A = None
W = None
NOFMT = "Backing file specified without backing format"


def make_evil_raw():
    """A 1 MiB raw disk whose first bytes a guest made into a qcow2 header
    with /etc/hostname as its (raw) backing file."""
    hdr = W("hdr.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-u", "-b", "/etc/hostname", "-F", "raw", hdr, "1M")
    evil = W("evil.raw")
    with open(hdr, "rb") as f:
        data = f.read()
    with open(evil, "wb") as f:
        f.write(data)
        f.truncate(1 << 20)
    os.unlink(hdr)
    return evil


def test_create(evil):
    log("== vqcow-img create without a backing format")
    for opts in (["-b", evil], ["-o", "backing_file=" + evil]):
        outs = {}
        for tool, argv0 in (("qemu-img", ["qemu-img"]), ("vqcow-img", [A.img])):
            img = W("new-%s.qcow2" % tool)
            r = qlib.run(argv0 + ["create", "-f", "qcow2"] + opts + [img, "1M"])
            qlib.assert_sane_exit(r, tool + " create")
            outs[tool] = r
            check(not os.path.exists(img), "%s create %s left %s behind" % (tool, opts, img))
        q, v = outs["qemu-img"], outs["vqcow-img"]
        check(q.rc == 1 and NOFMT in q.errtext,
              "oracle: qemu-img no longer refuses this?\n" + q.describe())
        check(v.rc == q.rc, "vqcow-img create %s: exit %s, qemu-img %s\n%s"
              % (opts, v.rc, q.rc, v.describe()))
        first = v.errtext.strip().splitlines()[0]
        check(NOFMT in first and "new-vqcow-img.qcow2" in first,
              "vqcow-img create %s: message\n%s" % (opts, v.describe()))
        check("Detected format of qcow2." in v.errtext and "Detected format of qcow2." in q.errtext,
              "the hint differs\n%s\n%s" % (q.describe(), v.describe()))
        log("ok: vqcow-img create %s refused like qemu-img: %s" % (opts[0], first))
    # with the format given, the guest's header is just data
    img = W("top-raw.qcow2")
    qlib.run([A.img, "create", "-f", "qcow2", "-b", evil, "-F", "raw", img], check_rc=0)
    js = qlib.qemu_info(img)
    check(js.get("backing-filename-format") == "raw", "backing format not recorded: %r" % js)
    d = start(img, "top-raw")
    try:
        got = qlib.Frontend(A.fe, d.sock).read_ok(0, 4096)
        with open(evil, "rb") as f:
            want = f.read(4096)
        check(got == want, "the backing file is not read as raw data")
        check("evil.raw" in d.log() and "raw" in d.log(), "chain not logged\n" + d.log())
    finally:
        d.assert_clean_stop()
    log("ok: with -F raw the header is guest data, and the chain is logged")


def strip_backing_format(img):
    """Make a legacy image: rename the backing format extension to an unknown
    (ignored) type, so the header records no backing format."""
    with qcow2edit.Image(img) as im:
        for t, data_off, _ in im.extensions():
            if t == qcow2edit.EXT_BACKING_FORMAT:
                im.pwrite(data_off - 8, (0x7e570000).to_bytes(4, "big"))
                return
    qlib.fail("%s has no backing format extension" % img)


def start(img, name, extra=()):
    d = qlib.Daemon(A.vqcowd, img, W(name + ".sock"), extra=extra)
    if not d.start():
        qlib.fail("vqcowd %s did not start (rc %s)\n%s" % (img, d.rc, d.log()))
    for _ in range(500):
        if qlib.run([A.fe, "info", d.sock], timeout=10).rc == 0:
            return d
        time.sleep(0.01)
    d.kill()
    qlib.fail("vqcowd on %s never answered\n%s" % (img, d.log()))


def refused(img, want, what, timeout=10):
    argv = [A.vqcowd, "--socket-path", W("no.sock"), "--blk-file", img]
    limit = qlib.prompt_limit(A.vqcowd)  # 1 s plus its start-up now
    t = time.monotonic()
    r = qlib.run(argv, timeout=timeout)
    dt = time.monotonic() - t
    qlib.assert_sane_exit(r, what)
    lines = r.errtext.strip().splitlines()
    check(r.rc not in (0, None), "%s: served\n%s" % (what, r.describe()))
    check(dt < limit, "%s: took %.2fs (want < %.2f s)" % (what, dt, limit))
    check(any(want in ln for ln in lines), "%s: message lacks %r\n%s" % (what, want, r.describe()))
    log("ok: %s refused (%.2fs): %s" % (what, dt, [ln for ln in lines if want in ln][0]))


def test_legacy(evil):
    log("== no recorded backing format (legacy images)")
    img = W("legacy-evil.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-b", evil, "-F", "raw", img)
    strip_backing_format(img)
    check("backing-filename-format" not in qlib.qemu_info(img), "format still recorded")
    refused(img, "does not probe a backing file as qcow2", "legacy image over a qcow2 header")
    base = W("plain.raw")
    with open(base, "wb") as f:
        f.write(b"\x42" * 4096)
        f.truncate(1 << 20)
    img = W("legacy-raw.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", img)
    strip_backing_format(img)
    d = start(img, "legacy-raw")
    try:
        got = qlib.Frontend(A.fe, d.sock).read_ok(0, 4096)
        check(got == b"\x42" * 4096, "legacy raw backing not served")
    finally:
        d.assert_clean_stop()
    log("ok: a legacy image over a plain raw backing file is still served (probed raw)")


def test_special_files():
    log("== backing and data files that are not files")
    fifo = W("fifo")
    os.mkfifo(fifo)
    for name, target, fmt in (("fifo-raw", fifo, "raw"), ("fifo-probe", fifo, None),
                              ("chardev", "/dev/zero", "raw")):
        img = W(name + ".qcow2")
        argv = ["create", "-f", "qcow2", "-u", "-b", target, "-F", fmt or "raw", img, "1M"]
        qlib.qemu_img(*argv)
        if fmt is None:
            strip_backing_format(img)
        refused(img, "not a regular file or block device", "backing file " + name)
    img = W("datafifo.qcow2")
    data = W("data.raw")
    qlib.qemu_img("create", "-f", "qcow2", "-o", "data_file=%s,data_file_raw=on" % data, img,
                  "1M")
    os.unlink(data)
    os.mkfifo(data)
    refused(img, "not a regular file or block device", "data file FIFO")


def test_user():
    log("== --user: named files are opened as that user")
    if os.geteuid() != 0:
        log("SKIP (part): not root, --user cannot be tested")
        return
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        log("SKIP (part): no user 'nobody'")
        return
    os.chmod(W.path, 0o755)
    secret = W("secret.raw")
    with open(secret, "wb") as f:
        f.write(b"S" * 4096)
    os.chmod(secret, 0o600)
    img = W("steal.qcow2")
    qlib.qemu_img("create", "-f", "qcow2", "-u", "-b", secret, "-F", "raw", img, "1M")
    os.chmod(img, 0o600)  # the image itself stays root's: vqcowd opens it as root
    refused_user(img, "Permission denied", "a root-only backing file with --user nobody")
    d = start(img, "steal-root")  # without --user: what QEMU as root does too
    try:
        got = qlib.Frontend(A.fe, d.sock).read_ok(0, 4096)
        check(got == b"S" * 4096, "without --user the backing file should be served")
    finally:
        d.assert_clean_stop()
    log("ok: without --user the same chain is served (root reads it, as QEMU would)")
    os.chmod(secret, 0o644)
    d = start(img, "readable", ["--user", "nobody"])
    try:
        got = qlib.Frontend(A.fe, d.sock).read_ok(0, 4096)
        check(got == b"S" * 4096, "a readable chain is not served with --user")
    finally:
        d.assert_clean_stop()
    log("ok: a chain readable by the user is served with --user")


def refused_user(img, want, what):
    argv = [A.vqcowd, "--socket-path", W("no.sock"), "--blk-file", img, "--user", "nobody"]
    r = qlib.run(argv, timeout=10)
    qlib.assert_sane_exit(r, what)
    check(r.rc not in (0, None), "%s: served\n%s" % (what, r.describe()))
    check(want in r.errtext, "%s: message lacks %r\n%s" % (what, want, r.describe()))
    log("ok: %s refused: %s" % (what, r.errtext.strip().splitlines()[-1]))


def main():
    global A, W
    A = qlib.parse_args()
    qlib.need_qemu_tools("qemu-io")
    qlib.need_binaries(A, "vqcowd", "img", "fe")
    W = qlib.Workdir(A.workdir, A.keep)
    ok = False
    try:
        evil = make_evil_raw()
        test_create(evil)
        test_legacy(evil)
        test_special_files()
        test_user()
        ok = True
    finally:
        W.cleanup(ok)
    log("PASS")
    return 0


if __name__ == "__main__":
    qlib.main_wrapper(main)
