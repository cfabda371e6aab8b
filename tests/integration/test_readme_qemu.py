#!/usr/bin/env python3
"""Integration: the README's vqcowd and QEMU command lines, run as written
(issue 9, item 5).

The "## Usage" block of README.md is read here, so the README cannot drift
from what works: its vqcowd line (paths moved to a temp dir, "[options]"
dropped) and its qemu-system-x86_64 line, where "..." becomes the machine
options (TCG, no display, a QMP socket). QEMU's vhost-user-blk-pci then asks
for one queue per vCPU (num-queues is not set on the device): QEMU must start,
the device must report as many queues as the README's -smp, and the firmware
(SeaBIOS probes the disk) must start the device (vqcowd logs the feature
negotiation). Then once more with -smp 64 (paused with -S: realize only).

Usage: test_readme_qemu.py VQCOWD README.md
Skips (77) without qemu-system-x86_64.
"""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def usage_commands(readme):
    """The vqcowd and qemu command lines (token lists) of the Usage block."""
    lines = open(readme).read().splitlines()
    try:
        start = lines.index("## Usage")
    except ValueError:
        fail("README.md has no '## Usage' section")
    block, inside = [], False
    for line in lines[start:]:
        if line.startswith("```"):
            if inside:
                break
            inside = True
            continue
        if inside:
            block.append(line)
    text = "\n".join(block).replace("\\\n", " ")
    cmds = [shlex.split(c) for c in text.splitlines() if c.strip()]
    vq = [c for c in cmds if c[0] == "vqcowd"]
    qe = [c for c in cmds if c[0] == "qemu-system-x86_64"]
    if len(vq) != 1 or len(qe) != 1:
        fail("README Usage block: want one vqcowd and one qemu-system-x86_64 line: %r" % cmds)
    return vq[0], qe[0]


def qmp_connect(path, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return None
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            qmp(f, "qmp_capabilities")
            return f
        except OSError:
            time.sleep(0.1)
    return None


def qmp(f, cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args} if args else {"execute": cmd}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    vqcowd, readme = sys.argv[1], sys.argv[2]
    if os.environ.get("VQCOW_TEST_BACKEND") == "qsd":
        print("SKIP: the README's vqcowd command line")
        return 77
    if not shutil.which("qemu-system-x86_64"):
        print("SKIP: qemu-system-x86_64 not installed")
        return 77
    vq_cmd, qemu_cmd = usage_commands(readme)
    if "..." not in qemu_cmd or "-smp" not in qemu_cmd:
        fail("the README's QEMU line has no '...' or no -smp: %r" % qemu_cmd)
    smp = int(qemu_cmd[qemu_cmd.index("-smp") + 1])

    d = tempfile.mkdtemp(prefix="vqcow-readme-")
    sock, img, qmp_path, log = (os.path.join(d, n) for n in ("vm1.sock", "disk.img", "qmp", "vqcowd.log"))
    with open(img, "wb") as f:
        f.truncate(64 << 20)

    def subst(tok):
        return tok.replace("/run/vm1.sock", sock).replace("disk.img", img)

    vq_args = [vqcowd] + [subst(t) for t in vq_cmd[1:] if t != "[options]"]
    logf = open(log, "w")
    daemon = subprocess.Popen(vq_args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    qemu = None
    try:
        end = time.time() + 10
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.time() > end:
                fail("vqcowd did not start: %s\n%s" % (vq_args, open(log).read()))
            time.sleep(0.05)

        def run_qemu(smp_n, paused):
            machine = ["-machine", "q35,accel=tcg", "-display", "none", "-serial", "none",
                       "-monitor", "none", "-qmp", "unix:%s,server=on,wait=off" % qmp_path]
            if paused:
                machine.append("-S")
            args = []
            for i, t in enumerate(qemu_cmd):
                if t == "...":
                    args += machine
                elif i > 0 and qemu_cmd[i - 1] == "-smp":
                    args.append(str(smp_n))
                else:
                    args.append(subst(t))
            if os.path.exists(qmp_path):
                os.unlink(qmp_path)
            mark = os.path.getsize(log)
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            f = qmp_connect(qmp_path, p)
            if f is None:
                out = p.communicate(timeout=10)[0] if p.poll() is not None else "(no QMP)"
                p.kill()
                fail("QEMU (-smp %d) did not start: %s\n%s\nvqcowd log:\n%s"
                     % (smp_n, " ".join(args), out, open(log).read()))
            r = qmp(f, "qom-get", path="/machine/peripheral-anon/device[0]/virtio-backend",
                    property="num-queues")
            if r.get("return") != smp_n:
                fail("-smp %d: the device has %r queues" % (smp_n, r))
            if not paused:
                # the firmware probes the disk: the device starts
                end = time.time() + 30
                while "features negotiated" not in open(log).read()[mark:]:
                    if time.time() > end or p.poll() is not None:
                        fail("the guest's firmware never started the device\n" + open(log).read())
                    time.sleep(0.1)
            qmp(f, "quit")
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                fail("QEMU did not quit")
            print("ok: QEMU -smp %d%s, device with %d queues" % (smp_n, " -S" if paused else "", smp_n))

        run_qemu(smp, False)   # the README as written
        run_qemu(64, True)     # the largest guest the default covers
        daemon.send_signal(signal.SIGTERM)
        rc = daemon.wait(timeout=20)
        if rc != 0:
            fail("vqcowd exit status %d\n%s" % (rc, open(log).read()))
    finally:
        if daemon.poll() is None:
            daemon.kill()
        shutil.rmtree(d, ignore_errors=True)
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
