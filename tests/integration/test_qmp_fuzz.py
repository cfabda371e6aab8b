#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""A bounded QMP fuzz run against vqcowd while guest I/O runs (issue 11).

For SECONDS (default 20, VQCOW_QMP_FUZZ_SECONDS), at the same time:

  * guest I/O through the frontend (vqcow-fe), checked: a loop of `verify`
    runs (a seeded pattern written over 4 MiB at varying offsets, read back
    and compared; each one a new vhost-user connection), none may fail or
    take more than 10 s;
  * three fuzzers: random bytes, truncated, one-byte-mangled and [-prefixed
    valid messages, random JSON values for every member and argument of
    every command (block_resize and quit left out), each burst on a new
    connection that is then half-closed;
  * huge messages: 200 KiB, 4 MiB and an unterminated 1 MiB string, each
    must get the "too large" GenericError and a closed connection; deep
    nesting inside and beyond the limit;
  * partial writes: valid commands sent one byte at a time, whose replies
    must come back right and in order;
  * many clients: 40 connections at once (the limit is 32; the rest are
    closed), then all dropped;
  * abrupt disconnects: hang-ups mid-message, resets (SO_LINGER 0) with
    replies still queued, right after the greeting;
  * a client that sends a thousand commands per write and never reads;
  * a watchdog client: query-blockstats and block-latency-histogram-set every
    50 ms, each answered within 2 s (no hang of the loop).

Afterwards: the daemon is alive and answers; its open file descriptors are
back to the count before the run (no connection leaked); a last verify passes;
`quit` ends it with status 0 and its log holds no sanitizer report (in the
ASan build LeakSanitizer runs at that exit: a leak fails the test).

Usage: test_qmp_fuzz.py VQCOWD VQCOW-FE WORKDIR
"""

import json
import os
import random
import socket
import struct
import subprocess
import threading
import time

from qmplib import Daemon, Qmp, check, log, run_main, setup_work

CMDS = ["query-version", "query-block-exports", "query-named-block-nodes", "query-blockstats",
        "block-latency-histogram-set", "qmp_capabilities", "nope", "",
        "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge"]
ARGS = ["node-name", "device", "id", "size", "flat", "x", "query-nodes", "boundaries",
        "boundaries-read", "boundaries-write", "boundaries-flush", "node", "name",
        "granularity", "persistent", "disabled", "target", "bitmaps"]
VALS = [None, True, False, 0, -1, 1, 2 ** 63, 2 ** 64, -2 ** 63, 1.5, "", "disk0", "export0",
        "x" * 300, "\u00e9\u0000", [], {}, [1, 2, 3], [3, 2], [0], [1, "x"], [[1]],
        list(range(1, 70)), {"a": {"b": None}}, ["x", {"node": "disk0", "name": "x"}],
        [{"node": "disk0"}, None], ["x", 1]]


def messages(rng, n):
    out = []
    for _ in range(n):
        k = rng.randrange(7)
        if k == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
            continue
        m = {"execute": rng.choice(CMDS + VALS[:12])}
        if rng.random() < 0.8:
            m["arguments"] = {rng.choice(ARGS): rng.choice(VALS)
                              for _ in range(rng.randrange(5))}
            if rng.random() < 0.1:
                m["arguments"] = rng.choice(VALS)
        if rng.random() < 0.3:
            m["id"] = rng.choice(VALS)
        if rng.random() < 0.1:
            m[rng.choice(["foo", "exec", "oob", "control"])] = rng.choice(VALS)
        t = json.dumps(m).encode()
        if k == 1:
            t = t[:rng.randrange(len(t))]
        elif k == 2:
            i = rng.randrange(len(t))
            t = t[:i] + bytes([rng.randrange(256)]) + t[i + 1:]
        elif k == 3:
            t = b"[" * rng.randrange(1, 3000) + t
        elif k == 4:
            t = t.replace(b'"', b"'", 1)
        out.append(t + rng.choice([b"\n", b"", b" ", b"\r\n", b"}"]))
    return out


def connect(path, timeout=5):
    """A connection; a full listen backlog (EAGAIN, the storms do that) is retried."""
    t = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(path)
            return s
        except (BlockingIOError, socket.timeout):
            s.close()
            if time.monotonic() > t:
                raise
            time.sleep(0.01)


def qmp(path):
    """A negotiated client; refused at the client limit while a storm runs: retried."""
    t = time.monotonic() + 10
    while True:
        try:
            return Qmp(path)
        except (EOFError, ConnectionResetError, BrokenPipeError, BlockingIOError):
            if time.monotonic() > t:
                raise
            time.sleep(0.02)


def drain(s):
    try:
        while s.recv(65536):
            pass
    except (OSError, socket.timeout):
        pass


def reset_close(s):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


class Run:
    def __init__(self, path, seconds, seed):
        self.path = path
        self.stop = time.monotonic() + seconds
        self.seed = seed
        self.errors = []
        self.counts = {}
        self.lock = threading.Lock()

    def alive(self):
        return time.monotonic() < self.stop and not self.errors

    def count(self, what, n=1):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def fail(self, msg):
        with self.lock:
            self.errors.append(msg)

    def thread(self, fn, *args):
        def body():
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001: any surprise is a failure
                self.fail("%s: %r" % (fn.__name__, e))
        t = threading.Thread(target=body, name=fn.__name__)
        t.start()
        return t

    # ---- attackers ----
    def fuzzer(self, seed):
        rng = random.Random(seed)
        while self.alive():
            s = connect(self.path)
            try:
                if rng.random() < 0.85:
                    s.sendall(b'{"execute": "qmp_capabilities"}\n')
                for m in messages(rng, rng.randrange(1, 50)):
                    s.sendall(m)
                    self.count("fuzz messages")
                s.shutdown(socket.SHUT_WR)
                drain(s)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                pass
            s.close()

    def huge(self):
        sizes = [200 << 10, 4 << 20]
        while self.alive():
            for body in ([b'{"execute": "query-version", "arguments": {"x": "' + b"a" * n + b'"}}'
                          for n in sizes] + [b'"' + b"b" * (1 << 20),
                                             b"[" * (100 << 10)]):
                s = connect(self.path)
                s.recv(4096)  # greeting
                try:
                    s.sendall(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed while we were still sending: fine
                data = b""
                try:
                    while True:
                        d = s.recv(65536)
                        if not d:
                            break
                        data += d
                except ConnectionResetError:
                    pass
                except socket.timeout:
                    self.fail("huge message of %d bytes: connection not closed" % len(body))
                s.close()
                if data and b"too large" not in data:
                    self.fail("huge message: reply %r" % data[:200])
                self.count("huge messages")
            # deep nesting inside the limit: a parse error, the connection lives
            q = qmp(self.path)
            r = q.raw("[" * 20000 + "]" * 20000)
            if "error" not in r or "return" not in q.cmd("query-version"):
                self.fail("deep nesting: %r" % r)
            q.close()
            self.count("deep nesting")

    def partial(self):
        while self.alive():
            q = qmp(self.path)
            msg = b"".join(json.dumps({"execute": "query-version", "id": i}).encode() + b"\n"
                           for i in range(3))
            for b in msg:
                q.send_raw(bytes([b]))
                time.sleep(0.0005)
            for i in range(3):
                r = q.reply()
                if r.get("id") != i or "return" not in r:
                    self.fail("byte-by-byte: reply %d: %r" % (i, r))
            q.close()
            self.count("byte-by-byte commands", 3)

    def many(self):
        while self.alive():
            conns = []
            for _ in range(40):
                try:
                    conns.append(connect(self.path))
                except OSError:
                    break
            for s in conns:
                try:
                    s.sendall(b'{"execute": "qmp_capabilities"}\n')
                except OSError:
                    pass
            for s in conns:
                s.close() if random.random() < 0.5 else reset_close(s)
            self.count("connection storms")
            time.sleep(0.05)

    def abrupt(self):
        rng = random.Random(self.seed + 7)
        while self.alive():
            s = connect(self.path)
            k = rng.randrange(4)
            try:
                if k == 0:
                    s.sendall(b'{"execute": "query-ver')
                elif k == 1:
                    s.sendall(b'{"execute": "qmp_capabilities"}' +
                              b'{"execute": "query-named-block-nodes"}' * 200)
                elif k == 2:
                    s.recv(10)
            except OSError:
                pass
            s.close() if k == 3 else reset_close(s)
            self.count("abrupt disconnects")
            time.sleep(0.002)

    def hog(self):
        s = connect(self.path)
        s.setblocking(False)
        msg = b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-blockstats"}' * 1000
        while self.alive():
            try:
                s.send(msg)
                self.count("hog bytes", len(msg))
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.05)
        s.close()

    def watchdog(self):
        q = qmp(self.path)
        q.s.settimeout(2)
        rng = random.Random(self.seed + 3)
        worst = 0
        while self.alive():
            t0 = time.monotonic()
            if rng.random() < 0.3:
                b = sorted(rng.sample(range(1, 10 ** 9), rng.randrange(0, 6)))
                r = q.cmd("block-latency-histogram-set", {"id": "disk0", "boundaries": b})
                if r != {"return": {}}:
                    self.fail("histogram-set %r: %r" % (b, r))
            try:
                r = q.cmd("query-blockstats")
            except socket.timeout:
                self.fail("query-blockstats not answered within 2 s")
                break
            worst = max(worst, time.monotonic() - t0)
            if "return" not in r:
                self.fail("watchdog: %r" % r)
            self.count("watchdog queries")
            time.sleep(0.05)
        q.close()
        self.counts["watchdog worst reply ms"] = int(worst * 1000)

    # ---- guest I/O, checked ----
    def io(self, fe_bin, vsock):
        rng = random.Random(self.seed + 1)
        while self.alive():
            off = rng.randrange(0, 60) << 20
            seed = rng.randrange(1 << 30)
            t0 = time.monotonic()
            r = subprocess.run([fe_bin, "verify", vsock, "--size", "4M", "--offset", str(off),
                                "--seed", str(seed), "--bs", rng.choice(["4k", "64k", "1M"])],
                               capture_output=True, timeout=60)
            dt = time.monotonic() - t0
            if r.returncode != 0:
                self.fail("verify at %d seed %d failed: %s" % (off, seed,
                                                             r.stderr.decode(errors="replace")))
            elif dt > 10:
                self.fail("verify took %.1f s: guest I/O stalled" % dt)
            self.count("verified MiB", 4)


def fds(pid):
    return sorted(os.listdir("/proc/%d/fd" % pid))


def main():
    vqcowd, fe_bin, work = setup_work(3)
    seconds = float(os.environ.get("VQCOW_QMP_FUZZ_SECONDS", "20"))
    seed = int(os.environ.get("VQCOW_QMP_SEED", str(int(time.time()))))
    log("qmp fuzz: %.0f s, seed %d (VQCOW_QMP_SEED=%d to replay)" % (seconds, seed, seed))
    image = os.path.join(work, "disk.raw")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    d = Daemon(vqcowd, work, image, "fuzz", ["--format", "raw"])
    try:
        check("return" in Qmp(d.qsock).cmd("query-version"), "no QMP service at start")
        time.sleep(0.2)
        before = fds(d.p.pid)
        run = Run(d.qsock, seconds, seed)
        ts = [run.thread(run.fuzzer, seed + i) for i in range(3)]
        ts += [run.thread(f) for f in (run.huge, run.partial, run.many, run.abrupt, run.hog,
                                       run.watchdog)]
        ts.append(run.thread(run.io, fe_bin, d.vsock))
        for t in ts:
            t.join(seconds + 120)
            check(not t.is_alive(), "%s still running: a hang" % t.name)
        check(not run.errors, "during the fuzz:\n  " + "\n  ".join(run.errors[:10]))
        check(d.p.poll() is None, "vqcowd died during the fuzz")
        log("ok: fuzz ran: %s" % json.dumps(run.counts, sort_keys=True))
        q = Qmp(d.qsock)
        check("return" in q.cmd("query-version"), "no QMP service after the fuzz")
        q.close()
        # every connection of the run closed on the daemon's side too
        t = time.monotonic() + 10
        while fds(d.p.pid) != before and time.monotonic() < t:
            time.sleep(0.1)
        check(fds(d.p.pid) == before, "open fds before %r, after %r" % (before, fds(d.p.pid)))
        log("ok: %d fds open before and after: no connection leaked" % len(before))
        r = subprocess.run([fe_bin, "verify", d.vsock, "--size", "16M", "--seed", "99"],
                           capture_output=True, timeout=60)
        check(r.returncode == 0, "verify after the fuzz: %s" % r.stderr.decode(errors="replace"))
        q = Qmp(d.qsock)
        check(q.cmd("quit") == {"return": {}}, "quit")
        d.p.wait(30)
        check(d.p.returncode == 0, "exit status after quit: %d (a sanitizer report?)"
              % d.p.returncode)
        text = d.log()
        for bad in ("AddressSanitizer", "LeakSanitizer", "runtime error",
                    "forbidden system call"):
            check(bad not in text, "%s in the log:\n%s" % (bad, text[-4000:]))
        log("ok: the daemon answered, served, and quit cleanly (exit 0, no sanitizer report)")
    except Exception:
        d.stop_showing_log(tail=8000)
        raise
    d.stop()
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
