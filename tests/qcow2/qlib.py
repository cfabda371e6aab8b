# SPDX-License-Identifier: MIT
"""Shared helpers for the qcow2 tool/interop tests (tests/qcow2).

Every test script takes the same command line:
    --vqcowd PATH --img PATH --fe PATH --workdir DIR [test-specific args]
(paths come from CMake generator expressions, so a test runs the binaries of
the build directory ctest runs in). qemu-img is the independent oracle: if it
is missing the test exits 77 (ctest SKIP). A missing binary of OUR project is
a failure, not a skip.
"""

import argparse
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback

SKIP = 77

SAN_MARKERS = ("AddressSanitizer", "UndefinedBehaviorSanitizer", "runtime error:",
               "LeakSanitizer", "ERROR: AddressSanitizer")


class TestFailure(Exception):
    pass


def log(msg):
    print(msg, flush=True)


def fail(msg):
    raise TestFailure(msg)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


# ---------------------------------------------------------------- options

# In a sanitizer build every report is fatal in the children (vqcowd,
# vqcow-img, vqcow-fe), also when ctest runs outside contrib/test.sh: a
# report then shows as a non-zero exit (or a signal) and as report text.
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def parse_args(extra=None):
    for k, v in SAN_ENV.items():
        os.environ.setdefault(k, v)
    p = argparse.ArgumentParser()
    p.add_argument("--vqcowd", default="")
    p.add_argument("--img", default="")
    p.add_argument("--fe", default="")
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=int(os.environ.get("VQCOW_TEST_SEED", "1234")))
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    if extra:
        extra(p)
    return p.parse_args()


def need_qemu_tools(*tools):
    for t in ("qemu-img",) + tools:
        if shutil.which(t) is None:
            log("SKIP: %s not found" % t)
            sys.exit(SKIP)


def need_binary(path, what):
    if not path or not os.access(path, os.X_OK):
        fail("%s is not built (%r): this test needs it" % (what, path))


# the programs a test may need, by their parse_args option
BINARIES = {"vqcowd": "vqcowd", "img": "vqcow-img", "fe": "vqcow-fe (tests/frontend)"}


def need_binaries(args, *names):
    """need_binary for each of NAMES ("vqcowd", "img", "fe") as given in ARGS."""
    for n in names:
        need_binary(getattr(args, n), BINARIES[n])


def main_wrapper(fn):
    """Run fn(); map TestFailure/exception to exit 1, keep 77 for skips."""
    try:
        rc = fn()
    except TestFailure as e:
        log("FAIL: %s" % e)
        sys.exit(1)
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        log("FAIL: unexpected exception")
        sys.exit(1)
    sys.exit(rc or 0)


class Workdir:
    """A fresh directory under the build tree (ext4/xfs, so O_DIRECT works).

    Names ending in ".sock" live in a short directory under /tmp instead: a
    UNIX socket path must fit sun_path (108 bytes), and a clone's build tree
    can be deep enough to pass that."""

    def __init__(self, base, keep=False):
        os.makedirs(base, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix="w-", dir=base)
        self.sockdir = None
        self.keep = keep

    def __call__(self, name):
        if name.endswith(".sock"):
            if self.sockdir is None:
                self.sockdir = tempfile.mkdtemp(prefix="vq-", dir="/tmp")
            return os.path.join(self.sockdir, name)
        return os.path.join(self.path, name)

    def cleanup(self, ok):
        if ok and not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)
            if self.sockdir is not None:
                shutil.rmtree(self.sockdir, ignore_errors=True)
        else:
            log("work directory kept: %s%s" % (self.path, "" if self.sockdir is None
                                               else " (sockets and daemon logs: %s)" % self.sockdir))


# ---------------------------------------------------------------- processes

class Result:
    def __init__(self, argv, rc, out, err, timed_out=False):
        self.argv, self.rc, self.out, self.err, self.timed_out = argv, rc, out, err, timed_out

    @property
    def text(self):
        return self.out.decode(errors="replace")

    @property
    def errtext(self):
        return self.err.decode(errors="replace")

    def describe(self):
        return "%s -> rc=%s%s\nstdout: %s\nstderr: %s" % (
            " ".join(self.argv), self.rc, " (TIMEOUT)" if self.timed_out else "",
            self.out[:2000].decode(errors="replace"), self.err[:4000].decode(errors="replace"))


def run(argv, timeout=60, stdin=None, check_rc=None, env=None):
    """Run a command, capture output. Never raises on non-zero exit unless
    check_rc is given (an int or a tuple of accepted codes)."""
    argv = [str(a) for a in argv]
    try:
        p = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, env=env)
        r = Result(argv, p.returncode, p.stdout, p.stderr)
    except subprocess.TimeoutExpired as e:
        r = Result(argv, None, e.stdout or b"", e.stderr or b"", timed_out=True)
    if check_rc is not None:
        ok = (r.rc in check_rc) if isinstance(check_rc, tuple) else (r.rc == check_rc)
        if not ok:
            fail("unexpected exit status:\n" + r.describe())
    return r


def prompt_limit(binary, base=1.0, factor=3):
    """How long a command of @binary that must answer at once (a refusal,
    never a wait) may take here and now: @base seconds plus @factor times
    what `@binary --version` takes at this moment, its start-up on a loaded
    machine or under a sanitizer, measured in the same run."""
    t = time.monotonic()
    run([binary, "--version"], timeout=60)
    return base + factor * (time.monotonic() - t)


def sanitizer_report(text):
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    for m in SAN_MARKERS:
        if m in text:
            return True
    return False


def assert_sane_exit(r, what):
    """No crash, no hang, no sanitizer report."""
    check(not r.timed_out, "%s hung (timeout)\n%s" % (what, r.describe()))
    check(r.rc is not None and r.rc >= 0, "%s died of a signal\n%s" % (what, r.describe()))
    check(not sanitizer_report(r.err), "%s: sanitizer report\n%s" % (what, r.describe()))


# ---------------------------------------------------------------- our tool

def vqcow_img(binary, *args, timeout=120):
    """Run vqcow-img (@binary) with @args; it must exit sanely (any exit code)."""
    r = run([binary] + [str(a) for a in args], timeout=timeout)
    assert_sane_exit(r, "vqcow-img " + " ".join(str(a) for a in args))
    return r


def tool_error(r):
    """The first line of @r's error text after the program's name ("prog: ")."""
    t = r.errtext.strip().splitlines()
    return t[0].split(": ", 1)[1] if t and ": " in t[0] else ""


def vqcow_img_test(g, subdir, *parts):
    """The main() of a test of one vqcow-img command against qemu-img: parse
    the arguments, skip without qemu-img/qemu-io, need vqcow-img, set the
    test module's globals A (the arguments) and W (the work directory,
    WORKDIR/@subdir; @g is its globals()), run @parts in order and clean
    the work directory up when they all passed."""
    g["A"] = a = parse_args()
    need_qemu_tools("qemu-io")
    need_binary(a.img, "vqcow-img")
    g["W"] = wd = Workdir(os.path.join(a.workdir, subdir), a.keep)
    ok = False
    try:
        for part in parts:
            part()
        ok = True
    finally:
        wd.cleanup(ok)
    log("PASS")
    return 0


def vqcow_img_json(binary, *args):
    """Run vqcow-img; it must succeed and print JSON, which is returned parsed."""
    r = vqcow_img(binary, *args)
    check(r.rc == 0, "vqcow-img failed:\n" + r.describe())
    try:
        return json.loads(r.text)
    except ValueError as e:
        fail("vqcow-img printed invalid JSON (%s):\n%s" % (e, r.describe()))


def run_corpus(wd, make_cases, fn):
    """run_cases over make_cases(), the Workdir WD cleaned up after (kept if
    anything failed), then a failure naming the failed cases."""
    ok = False
    failures = []
    try:
        failures = run_cases(make_cases(), fn)
        ok = not failures
    finally:
        wd.cleanup(ok)
    if failures:
        fail("failed images: " + ", ".join(failures))


def run_cases(cases, fn):
    """Call fn(*case) for each case (a tuple whose first item is its name);
    log PASS or FAIL for each and return the names of the failed ones."""
    failures = []
    for case in cases:
        name = case[0]
        try:
            fn(*case)
            log("PASS %s" % name)
        except TestFailure as e:
            log("FAIL %s: %s" % (name, e))
            failures.append(name)
    return failures


# ---------------------------------------------------------------- qemu-img oracle

def qemu_img(*args, timeout=120, check_rc=0):
    return run(["qemu-img"] + list(args), timeout=timeout, check_rc=check_rc)


def qemu_io(img, *cmds, fmt=None, timeout=120):
    argv = ["qemu-io"]
    if fmt:
        argv += ["-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(img)
    r = run(argv, timeout=timeout, check_rc=0)
    # qemu-io reports errors on stdout and still exits 0 for some of them
    check("error" not in r.text.lower() and "failed" not in r.text.lower(),
          "qemu-io reported an error:\n" + r.describe())
    return r


def qemu_info(img, fmt=None, chain=False):
    argv = ["info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    if chain:
        argv.append("--backing-chain")
    argv.append(img)
    return json.loads(qemu_img(*argv).text)


def qemu_check(img, fmt=None, repair=None):
    argv = ["check", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    if repair:
        argv += ["-r", repair]
    argv.append(img)
    r = qemu_img(*argv, check_rc=None)
    try:
        js = json.loads(r.text) if r.text.strip() else {}
    except ValueError:
        js = {}
    return r.rc, js, r


def assert_qemu_check_clean(img, what="", allow_leaks=False):
    rc, js, r = qemu_check(img)
    ok = rc == 0 or (allow_leaks and rc == 3)
    check(ok, "qemu-img check %s %s: not clean (rc=%s)\n%s" % (img, what, rc, r.describe()))
    return js


def qemu_to_raw(img, out, fmt=None, snapshot=None):
    argv = ["convert", "-O", "raw"]
    if fmt:
        argv += ["-f", fmt]
    if snapshot:
        argv += ["-l", "snapshot.name=" + snapshot]
    argv += [img, out]
    qemu_img(*argv, timeout=300)


def qemu_compare(a, b, fmt_a=None, fmt_b=None):
    argv = ["compare"]
    if fmt_a:
        argv += ["-f", fmt_a]
    if fmt_b:
        argv += ["-F", fmt_b]
    argv += [a, b]
    return qemu_img(*argv, check_rc=None)


def snapshot_list(img):
    """[(id, name, vm_state_size)] via qemu-img info json (dates excluded)."""
    js = qemu_info(img)
    return [(s["id"], s["name"], s.get("vm-state-size", 0)) for s in js.get("snapshots", [])]


def snapshot_state(wd, img):
    """(snapshot_list(img), {name: sha256 of that snapshot's guest view}),
    using a scratch file of the Workdir wd."""
    snaps = snapshot_list(img)
    hashes = {}
    for _sid, name, _ in snaps:
        out = wd("snapdump.raw")
        qemu_to_raw(img, out, snapshot=name)
        hashes[name] = sha256_file(out)
        os.unlink(out)
    return snaps, hashes


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def first_difference(a, b):
    n = min(len(a), len(b))
    step = 4096
    for i in range(0, n, step):
        if a[i:i + step] != b[i:i + step]:
            for j in range(i, min(i + step, n)):
                if a[j] != b[j]:
                    return j
    return n if len(a) != len(b) else -1


def parse_size(s):
    s = str(s).strip()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if s and s[-1].lower() in mult:
        return int(s[:-1]) * mult[s[-1].lower()]
    return int(s)


def nbd_dirty(wd, img, name):
    """The dirty ranges of bitmap NAME of IMG (qcow2) as qemu-nbd -B serves
    them and nbdinfo --map reads them: [[offset, length]] (strings); the
    socket is wd("nbd.sock")."""
    sock = wd("nbd.sock")
    r = run(["sh", "-c", "qemu-nbd -r -f qcow2 -B %s -k %s %s & p=$!; "
             "for i in $(seq 100); do [ -S %s ] && break; sleep 0.05; done; "
             "nbdinfo --map=qemu:dirty-bitmap:%s nbd+unix:///?socket=%s; rc=$?; "
             "kill $p; wait $p; exit $rc" % (name, sock, img, sock, name, sock)],
            timeout=60)
    check(r.rc == 0, r.describe())
    return [ln.split()[:2] for ln in r.text.splitlines()
            if len(ln.split()) >= 3 and ln.split()[2] == "1"]


# ---------------------------------------------------------------- image locks

F_OFD_GETLK = 36


def image_locked(path):
    """True if any process holds one of QEMU's lock bytes (100-103, 200-203)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        req = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 100, 104, 0)
        got = fcntl.fcntl(fd, F_OFD_GETLK, req)
        return struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def wait_unlocked(path, timeout=10.0):
    """After kill -9 the kernel drops the dead daemon's image locks only once
    it has torn down its io_uring (tens of milliseconds, the time in-flight
    I/O needs): wait for that before the next process opens the image."""
    deadline = time.monotonic() + timeout
    while image_locked(path):
        if time.monotonic() > deadline:
            fail("%s: still locked %.0fs after its daemon died" % (path, timeout))
        time.sleep(0.01)


# ---------------------------------------------------------------- vqcowd

class killed_on_error:
    """`with killed_on_error(d):` -- if the block raises, kill the daemon @d and
    log its output before the exception goes on (the test's own checks
    inside the block decide what failed)."""

    def __init__(self, d):
        self.d = d

    def __enter__(self):
        return self.d

    def __exit__(self, etype, e, tb):
        if etype is not None:
            self.d.kill()
            log("vqcowd log:\n" + self.d.log())
        return False


class Daemon:
    """vqcowd on one image. start() waits until the socket accepts."""

    def __init__(self, vqcowd, img, sock, extra=(), logpath=None):
        self.argv = [vqcowd, "--socket-path", sock, "--blk-file", img] + list(extra)
        self.img = img
        self.sock = sock
        self.logpath = logpath or (sock + ".log")
        self.p = None
        self.rc = None

    def start(self, timeout=10.0, expect_fail=False):
        """Returns True when serving; False if it exited first (rc in self.rc)."""
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.logf = open(self.logpath, "wb")
        self.p = subprocess.Popen([str(a) for a in self.argv], stdout=self.logf,
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.p.poll()
            if rc is not None:
                self.rc = rc
                self.logf.close()
                return False
            if os.path.exists(self.sock) and stat.S_ISSOCK(os.stat(self.sock).st_mode):
                return True
            time.sleep(0.02)
        self.kill()
        fail("vqcowd did not create its socket within %.0fs\n%s" % (timeout, self.log()))

    def log(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode(errors="replace")[-6000:]
        except OSError:
            return ""

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=20.0):
        """Send sig, wait. Returns the exit status (negative = signal)."""
        if self.p is None:
            return self.rc
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                self.rc = self.p.returncode
                self.logf.close()
                fail("vqcowd did not exit within %.0fs of signal %d\n%s" % (timeout, sig, self.log()))
        self.rc = self.p.returncode
        self.logf.close()
        return self.rc

    def kill(self):
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        if self.p is not None:
            self.rc = self.p.returncode
            try:
                self.logf.close()
            except Exception:
                pass
            if self.rc is not None and self.rc < 0:
                wait_unlocked(self.img)

    def assert_clean_stop(self):
        rc = self.stop()
        check(rc == 0, "vqcowd exit status %s after SIGTERM (want 0)\n%s" % (rc, self.log()))
        check(not sanitizer_report(self.log()), "vqcowd sanitizer report\n" + self.log())


# ---------------------------------------------------------------- vqcow-fe

class Frontend:
    """The test frontend CLI (tests/frontend): one connection per command.
       read SOCK OFF LEN > out ; write SOCK OFF < in ; flush SOCK."""

    def __init__(self, fe, sock, timeout=60):
        self.fe, self.sock, self.timeout = fe, sock, timeout

    def read(self, off, length, timeout=None):
        r = run([self.fe, "read", self.sock, off, length], timeout=timeout or self.timeout)
        assert_sane_exit(r, "vqcow-fe read %d+%d" % (off, length))
        return r

    def read_ok(self, off, length):
        r = self.read(off, length)
        check(r.rc == 0, "read %d+%d failed\n%s" % (off, length, r.describe()))
        check(len(r.out) == length, "read %d+%d returned %d bytes" % (off, length, len(r.out)))
        return r.out

    def write(self, off, data, timeout=None):
        r = run([self.fe, "write", self.sock, off], stdin=data, timeout=timeout or self.timeout)
        assert_sane_exit(r, "vqcow-fe write %d+%d" % (off, len(data)))
        return r

    def write_ok(self, off, data):
        r = self.write(off, data)
        check(r.rc == 0, "write %d+%d failed\n%s" % (off, len(data), r.describe()))

    def write_zeroes(self, off, length, unmap=False, timeout=None):
        argv = [self.fe, "write-zeroes", self.sock, off, length] + (["--unmap"] if unmap else [])
        r = run(argv, timeout=timeout or self.timeout)
        assert_sane_exit(r, "vqcow-fe write-zeroes %d+%d" % (off, length))
        return r

    def flush(self, timeout=None):
        r = run([self.fe, "flush", self.sock], timeout=timeout or self.timeout)
        assert_sane_exit(r, "vqcow-fe flush")
        return r

    def flush_ok(self):
        r = self.flush()
        check(r.rc == 0, "flush failed\n" + r.describe())

    def assert_reads_as(self, ref, length, tmp, what):
        """Read [0, length) into the file @tmp, which must equal the file @ref
        (compare_files names the first difference), then remove @tmp."""
        self.read_to_file(0, length, tmp)
        compare_files(ref, tmp, what)
        os.unlink(tmp)

    def read_to_file(self, off, length, path, chunk=16 << 20):
        """Read [off, off+length) in chunks into a file (bounded memory)."""
        with open(path, "wb") as f:
            pos = off
            while pos < off + length:
                n = min(chunk, off + length - pos)
                f.write(self.read_ok(pos, n))
                pos += n


def compare_files(a, b, what):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                d = first_difference(x, y)
                fail("%s: contents differ at byte %d (0x%x)" % (what, off + d, off + d))
            if not x:
                return
            off += len(x)


def pattern(rng, n):
    """Random-looking but cheap data (seeded)."""
    seed = rng.getrandbits(64).to_bytes(8, "little")
    block = hashlib.sha256(seed).digest() * 16  # 512 bytes
    reps = (n + len(block) - 1) // len(block)
    out = bytearray(block * reps)[:n]
    # vary per 512-byte sector so misplaced sectors are detected
    for i in range(0, n, 512):
        out[i:i + 8] = (i + rng.getrandbits(32)).to_bytes(8, "little")
    return bytes(out)


def random_writes(rng, size, count, max_len=256 << 10, align=512):
    """[(off, len)] inside [0, size): mixed small/unaligned-to-cluster/large, some at the end."""
    ops = []
    for i in range(count):
        kind = rng.random()
        if kind < 0.5:
            ln = rng.randrange(1, 16) * align
        elif kind < 0.85:
            ln = rng.randrange(1, max_len // align + 1) * align
        else:
            ln = min(size, rng.randrange(1, 4) * 65536 + align)
        ln = min(ln, size)
        if rng.random() < 0.1:
            off = size - ln
        else:
            off = rng.randrange(0, (size - ln) // align + 1) * align
        ops.append((off, ln))
    return ops


def apply_to_raw(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)
