#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Back up the image a running vqcowd serves, without stopping the guest.

Usage: vqcow-backup.py -s QMP_SOCKET -o BACKUP [options]

  1. blockdev-snapshot-sync: the image freezes under a new qcow2 overlay
     (the guest now writes there);
  2. the frozen image is copied to BACKUP with qemu-img convert -U (while
     the guest runs);
  3. block-commit folds the overlay back into the image; once the job is
     ready (BLOCK_JOB_READY), block-job-complete makes the image the active
     layer again; the overlay file is removed.
If the copy fails, the overlay is still committed (the guest must not stay
on it) and the exit status is 1.

Options:
  -s, --socket PATH   vqcowd's QMP socket (--qmp)
  -o, --output FILE   the backup to write (must not exist)
  -O, --format FMT    format of the backup: qcow2 (default) or raw
  --node NAME         the node to back up (default: the exported node)
  --overlay FILE      the temporary overlay (default: IMAGE.backup-overlay.qcow2)
  --speed BYTES       rate limit of the commit job in bytes/s (default: none)
  --timeout SEC       give up waiting for the commit after SEC seconds (default 3600)
  -q, --quiet         print nothing but errors
  -h, --help          this text

Exit status: 0 the backup is complete and the image is the active layer
again; 1 something failed (the message says what, and what state the
chain is in); 2 usage or connection error.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time


class QmpError(Exception):
    pass


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        self.s.connect(path)
        self.buf = b""
        self.events = []
        self.recv()
        self.cmd("qmp_capabilities")

    def recv(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise QmpError("the daemon closed the connection")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None):
        m = {"execute": name}
        if args:
            m["arguments"] = args
        self.s.sendall((json.dumps(m) + "\n").encode())
        while True:
            r = self.recv()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError("%s: %s" % (name, r["error"]["desc"]))
            return r["return"]

    def wait_event(self, names, job, deadline):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names and e.get("data", {}).get("device") == job:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("timed out waiting for %s" % " or ".join(names))
            self.s.settimeout(min(left, 60))
            try:
                self.events.append(self.recv())
            except socket.timeout:
                pass


def main():
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("-s", "--socket")
    ap.add_argument("-o", "--output")
    ap.add_argument("-O", "--format", default="qcow2", choices=("qcow2", "raw"))
    ap.add_argument("--node")
    ap.add_argument("--overlay")
    ap.add_argument("--speed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("-h", "--help", action="store_true")
    try:
        a = ap.parse_args()
    except SystemExit:
        return 2
    if a.help:
        print(__doc__.strip())
        return 0
    if not a.socket or not a.output:
        print("vqcow-backup: -s SOCKET and -o OUTPUT are required (--help)", file=sys.stderr)
        return 2
    if os.path.exists(a.output):
        print("vqcow-backup: %s exists" % a.output, file=sys.stderr)
        return 2

    def say(msg):
        if not a.quiet:
            print(msg, flush=True)

    try:
        q = Qmp(a.socket)
    except (OSError, QmpError) as e:
        print("vqcow-backup: cannot talk to %s: %s" % (a.socket, e), file=sys.stderr)
        return 2

    try:
        node = a.node or q.cmd("query-block-exports")[0]["node-name"]
        nodes = q.cmd("query-named-block-nodes")
        image = next((n["file"] for n in nodes if n["node-name"] == node), None)
        if image is None:
            raise QmpError("no node %r" % node)
        overlay = a.overlay or image + ".backup-overlay.qcow2"
        ovnode = "backup-overlay"
        q.cmd("blockdev-snapshot-sync", {"node-name": node, "snapshot-file": overlay,
                                         "snapshot-node-name": ovnode, "format": "qcow2"})
    except (OSError, QmpError) as e:
        print("vqcow-backup: snapshot failed: %s (nothing changed)" % e, file=sys.stderr)
        return 1
    say("snapshot: %s frozen, the guest writes into %s" % (image, overlay))

    status = 0
    t0 = time.monotonic()
    r = subprocess.run(["qemu-img", "convert", "-U", "-O", a.format, image, a.output],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print("vqcow-backup: copying %s failed: %s" % (image, r.stderr.strip()),
              file=sys.stderr)
        status = 1
        try:
            os.unlink(a.output)
        except OSError:
            pass
    else:
        say("copied %s to %s (%s) in %.1f s" % (image, a.output, a.format,
                                                time.monotonic() - t0))

    job = "backup-commit"
    try:
        args = {"job-id": job, "device": ovnode}
        if a.speed:
            args["speed"] = a.speed
        deadline = time.monotonic() + a.timeout
        q.cmd("block-commit", args)
        q.wait_event(("BLOCK_JOB_READY",), job, deadline)
        q.cmd("block-job-complete", {"device": job})
        e = q.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), job, deadline)
        if e["event"] != "BLOCK_JOB_COMPLETED" or "error" in e["data"]:
            raise QmpError("the commit ended with %s %s" % (e["event"],
                                                           e["data"].get("error", "")))
        active = q.cmd("query-block-exports")[0]["node-name"]
        if active != node:
            raise QmpError("the active layer is %r, not %r" % (active, node))
    except (OSError, QmpError) as e:
        print("vqcow-backup: commit of %s failed: %s; the guest still writes into it "
              "(commit it by hand: block-commit device=%s)" % (overlay, e, ovnode),
              file=sys.stderr)
        return 1
    os.unlink(overlay)
    say("committed: %s is the active layer again; %s removed" % (image, overlay))
    return status


if __name__ == "__main__":
    sys.exit(main())
