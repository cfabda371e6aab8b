# SPDX-License-Identifier: MIT
"""Shared helpers of the QMP integration tests (test_qmp*.py, test_layers.py,
test_resize.py): a QMP client, a vqcowd starter, a qemu-storage-daemon
starter, check/Fail/log and the exit-status convention (0 pass, 1 fail,
77 skip). The tests run as `python3 SRCDIR/test_X.py`, so this module is
found next to them without any PYTHONPATH."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

SKIP = 77


def log(msg):
    print(msg, flush=True)


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


class Qmp:
    """A QMP client on a unix socket; events are queued in .events."""

    def __init__(self, path, negotiate=True, timeout=10):
        self.timeout = timeout
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        # qemu-storage-daemon binds its socket before it listens: a connect
        # in between is refused, so retry until the timeout.
        t = time.monotonic() + timeout
        while True:
            try:
                self.s.connect(path)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > t:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.greeting = self.recv()
        self.events = []
        if negotiate:
            r = self.cmd("qmp_capabilities")
            check(r == {"return": {}}, "qmp_capabilities: %r" % r)

    def recv(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self):
        while True:
            m = self.recv()
            if "event" in m:  # qemu-storage-daemon sends some
                self.events.append(m)
                continue
            return m

    def send_raw(self, data):
        self.s.sendall(data if isinstance(data, bytes) else data.encode())

    def raw(self, text):
        self.send_raw(text + "\n")
        return self.reply()

    def cmd(self, name, args=None, **kw):
        m = {"execute": name}
        if args is not None:
            m["arguments"] = args
        m.update(kw)
        return self.raw(json.dumps(m))

    def ret(self, name, args=None):
        r = self.cmd(name, args)
        check("return" in r, "%s %r: %r" % (name, args, r))
        return r["return"]

    def err(self, name, args, part, what):
        r = self.cmd(name, args)
        check("error" in r, "%s: expected an error, got %r" % (what, r))
        check(part in r["error"]["desc"], "%s: %r lacks %r" % (what, r["error"]["desc"], part))
        log("ok: %s -> %s" % (what, r["error"]["desc"]))

    def wait_event(self, name, timeout=60):
        t = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name:
                    return self.events.pop(i)
            check(time.monotonic() < t, "no %s event within %d s (have %r)" %
                  (name, timeout, [e["event"] for e in self.events]))
            self.s.settimeout(max(0.1, t - time.monotonic()))
            try:
                self.events.append(self.recv())
            except socket.timeout:
                pass
            self.s.settimeout(self.timeout)

    def close(self):
        self.s.close()


def expect_error(r, cls, desc_part, what):
    check("error" in r, "%s: expected an error, got %r" % (what, r))
    check(r["error"]["class"] == cls, "%s: class %r, want %r" % (what, r["error"]["class"], cls))
    check(desc_part in r["error"]["desc"], "%s: desc %r lacks %r" % (what, r["error"]["desc"],
                                                                     desc_part))
    log("ok: %s -> %s: %s" % (what, cls, r["error"]["desc"]))


def run_ok(*args, inp=None, timeout=300):
    """Run a command (arguments made strings) that must succeed; its stdout.
    A failure names the command, its exit status and the ends of its output."""
    r = subprocess.run([str(a) for a in args], capture_output=True, input=inp, timeout=timeout)
    check(r.returncode == 0, "%s: rc %d\n%s%s" % (args, r.returncode,
                                                r.stdout.decode(errors="replace")[-2000:],
                                                r.stderr.decode(errors="replace")[-2000:]))
    return r.stdout.decode(errors="replace")


def wait_path(path, proc, timeout=10):
    t = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise Fail("daemon exited (%d) before creating %s" % (proc.returncode, path))
        if time.monotonic() > t:
            raise Fail("%s not created" % path)
        time.sleep(0.02)


def qimg_check(img, what, leaks_ok=False, share=False):
    """`qemu-img check IMG` (with -U if @share: beside a daemon serving it)
    finds no error and no leak; with @leaks_ok (after a kill -9, which may
    leak, never more) leaked clusters only (exit 3) pass too. Anything else
    fails the test with the report. Returns the exit status."""
    argv = ["qemu-img", "check"] + (["-U"] if share else []) + [img]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    check(r.returncode == 0 or (leaks_ok and r.returncode == 3),
          "%s: qemu-img check %s: rc %d\n%s%s" % (what, img, r.returncode, r.stdout, r.stderr))
    return r.returncode


def wait_unlocked(img, timeout=10.0):
    """After a kill -9: the kernel drops the dead daemon's image locks only
    once it has torn down its io_uring (in-flight I/O first), a little after
    the process is reaped. Wait until `qemu-img info` opens IMG again; still
    locked after @timeout s fails the test."""
    t = time.monotonic() + timeout
    while True:
        r = subprocess.run(["qemu-img", "info", img], capture_output=True, timeout=60)
        if r.returncode == 0 or b"lock" not in r.stderr:
            return
        if time.monotonic() > t:
            raise Fail("%s: still locked %.0f s after its daemon died" % (img, timeout))
        time.sleep(0.02)


class Daemon:
    """vqcowd serving IMAGE on WORK/NAME.vsock with QMP on WORK/NAME.qmp.
    unlink_stale: remove sockets left by an earlier run first, so that
    waiting for them really waits for this daemon."""

    def __init__(self, vqcowd, work, image, name, extra=(), unlink_stale=False):
        self.vsock = os.path.join(work, name + ".vsock")
        self.qsock = os.path.join(work, name + ".qmp")
        self.logf = os.path.join(work, name + ".log")
        if unlink_stale:
            for p in (self.vsock, self.qsock):
                if os.path.exists(p):
                    os.unlink(p)
        self.p = subprocess.Popen([vqcowd, "--socket-path", self.vsock, "--blk-file", image,
                                   "--qmp", self.qsock] + list(extra),
                                  stdout=open(self.logf, "w"), stderr=subprocess.STDOUT)
        wait_path(self.vsock, self.p)
        wait_path(self.qsock, self.p)

    def log(self):
        return open(self.logf).read()

    def stop(self, timeout=10, check_exit=False):
        """SIGTERM if still running; check_exit: it must then have exited 0."""
        if self.p.poll() is None:
            self.p.terminate()
            self.p.wait(timeout)
        if check_exit:
            check(self.p.returncode == 0, "vqcowd exited %d:\n%s" % (self.p.returncode,
                                                                     self.log()))

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop_showing_log(self, tail=None):
        """On the way out of a failed test: stop it, print its log (the last
        TAIL characters) into the test's output."""
        Daemon.stop(self)
        text = self.log()
        if tail is None:
            sys.stdout.write("---- vqcowd log ----\n" + text)
        else:
            sys.stdout.write("---- vqcowd log (tail) ----\n" + text[-tail:])


class Stress:
    """The vqfe-stress process of a test (stress_teardown): start() it when
    the test is ready; kill() leaves nothing running."""

    def __init__(self):
        self.p = None

    def start(self, args):
        """Popen ARGS (vqfe-stress and its arguments), its output piped."""
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        return self.p

    def kill(self):
        if self.p and self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@contextlib.contextmanager
def stress_teardown(d, tail=8000):
    """The end of a test that runs vqfe-stress against Daemon D: yields a
    Stress for the block to start. When the block raises, vqfe-stress is
    killed and D stopped with the last TAIL characters of its log shown;
    either way neither runs any more after the block."""
    st = Stress()
    try:
        yield st
    except BaseException:
        st.kill()
        d.stop_showing_log(tail=tail)
        raise
    finally:
        st.kill()
        if d.p.poll() is None:
            d.kill()


def quit_daemon(d, timeout):
    """Stop vqcowd D with QMP quit; it must exit 0 within TIMEOUT seconds."""
    q = Qmp(d.qsock)
    q.cmd("quit")
    d.p.wait(timeout)
    check(d.p.returncode == 0, "vqcowd exit %d" % d.p.returncode)


def sanitizer_clean(text):
    """No sanitizer report in a daemon's log TEXT."""
    for word in ("ThreadSanitizer", "AddressSanitizer", "LeakSanitizer", "runtime error"):
        check(word not in text, "%s report in the daemon's log:\n%s" % (word, text[-6000:]))


def quit_clean(d, q, timeout=60):
    """QMP quit on Q; vqcowd D must exit 0 within TIMEOUT s with a clean log."""
    q.cmd("quit")
    d.p.wait(timeout)
    text = d.log()
    sanitizer_clean(text)
    check(d.p.returncode == 0, "vqcowd exit %d:\n%s" % (d.p.returncode, text[-4000:]))
    log("ok: quit, exit 0")


@contextlib.contextmanager
def vqcowd_session(vqcowd, work, image, name, extra=()):
    """A Daemon and a Qmp client on it, yielded as (d, q); when the block
    ends, the client closed and vqcowd stopped with quit (exit 0 within
    30 s, quit_daemon); when it raises, vqcowd stopped with its log shown.
    Either way vqcowd is stopped after the block (d stays usable: d.log())."""
    d = Daemon(vqcowd, work, image, name, extra)
    try:
        q = Qmp(d.qsock)
        yield d, q
        q.close()
        quit_daemon(d, 30)
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()


def qsd_popen(qsd, qs, image, node="disk0"):
    """qemu-storage-daemon with QMP on QS and IMAGE (qcow2) as node NODE."""
    return subprocess.Popen([qsd, "--chardev", "socket,path=%s,server=on,wait=off,id=c" % qs,
                             "--monitor", "chardev=c",
                             "--blockdev", "driver=file,filename=%s,node-name=file0" % image,
                             "--blockdev", "driver=qcow2,file=file0,node-name=%s" % node],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def qsd_vhost_popen(qsd, blockdevs, vs, qs, node="disk0"):
    """qemu-storage-daemon with the BLOCKDEVS (--blockdev arguments), NODE
    exported writable over vhost-user-blk on VS and QMP on QS; returned once
    both sockets exist."""
    args = [qsd]
    for b in blockdevs:
        args += ["--blockdev", b]
    args += ["--export", "type=vhost-user-blk,id=e0,node-name=%s,addr.type=unix,"
             "addr.path=%s,writable=on" % (node, vs),
             "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qs, "--monitor", "chardev=m"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_path(qs, p)
    wait_path(vs, p)
    return p


def reap(p):
    """Kill P if it still runs (the teardown of a helper daemon)."""
    if p.poll() is None:
        p.kill()
        p.wait()


@contextlib.contextmanager
def qsd_running(qsd, qs, image, node="disk0"):
    """qsd_popen, its QMP socket waited for; killed on the way out."""
    p = qsd_popen(qsd, qs, image, node)
    try:
        wait_path(qs, p)
        time.sleep(0.2)
        yield p
    finally:
        reap(p)


def fe(fe_bin, *args, stdin=None):
    r = subprocess.run([fe_bin] + [str(a) for a in args], input=stdin, capture_output=True,
                       timeout=60)
    check(r.returncode == 0, "vqcow-fe %s: rc %d\n%s" % (args, r.returncode,
                                                       r.stderr.decode(errors="replace")))
    return r.stdout.decode(errors="replace")


def fe_capacity(fe_bin, vsock):
    for line in fe(fe_bin, "info", vsock).splitlines():
        if line.startswith("capacity:"):
            return int(line.split("(")[1].split()[0])
    raise Fail("no capacity line")


def run_ctl(ctl, *args):
    r = subprocess.run([ctl] + [str(a) for a in args], capture_output=True, timeout=60)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def missing_tool(*tools):
    """True (and a visible skip logged) if one of TOOLS is not on PATH."""
    for tool in tools:
        if not shutil.which(tool):
            log("SKIP: %s not found" % tool)
            return True
    return False


def setup_work(nargs, *tools, fresh=True):
    """The head of a test's main(): its arguments (sys.argv[1:]), NARGS of
    them (a count, or a tuple of the counts allowed), the last of the fewest
    allowed being the work directory; every one of TOOLS on PATH; the work
    directory made, emptied first if FRESH. Returns the arguments. Exits 2
    with the usage (the test's docstring) on a wrong count, SKIP with
    missing_tool's visible skip when a tool is missing."""
    counts = (nargs,) if isinstance(nargs, int) else tuple(nargs)
    args = sys.argv[1:]
    if len(args) not in counts:
        print(sys.modules["__main__"].__doc__)
        sys.exit(2)
    if missing_tool(*tools):
        sys.exit(SKIP)
    work = args[min(counts) - 1]
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    return args


def run_main(main):
    """Exit with main()'s status (or setup_work's); a Fail escaping it is
    logged and is status 1."""
    try:
        sys.exit(main())
    except Fail as e:
        log("FAIL: %s" % e)
        sys.exit(1)
