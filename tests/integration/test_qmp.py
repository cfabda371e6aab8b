#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The QMP control socket of vqcowd (--qmp, issue 11), through a real client.

  * the greeting, capabilities negotiation (commands before it are refused
    with CommandNotFound, a second negotiation too), ids echoed back;
  * every command: query-version, query-block-exports,
    query-named-block-nodes (raw, and a qcow2 with a backing chain),
    query-blockstats (counters move after requests made by vqcow-fe),
    block_resize (raw: the frontend sees the new capacity in the config
    space; shrink and bad node refused with a clear error; a qcow2 top of a
    chain grows, integration.resize tests qcow2 in depth), quit
    (the daemon exits 0 and removes the socket);
  * errors: malformed JSON, non-object, unknown members, unknown command,
    wrong argument types, missing and unexpected arguments, an oversized
    message (error, then the connection is closed), a client that hangs up
    mid-message; after all of them the daemon still serves QMP and I/O;
  * several clients at once, interleaved;
  * the socket's mode is 0600;
  * the same conversation against qemu-storage-daemon for the commands it
    shares: the same error classes and texts, and our result objects carry
    the keys QEMU's do (skipped visibly without qemu-storage-daemon).

  * (the fuzz run is test_qmp_fuzz.py, integration.qmp_fuzz)
  * events: SHUTDOWN to the other clients on quit; BLOCK_IO_ERROR (nospace)
    when a guest write hits ENOSPC on a 1 MiB tmpfs (skipped visibly where
    no tmpfs can be mounted);
  * vqcowctl: version, stats, resize SIZE (seen by the frontend), raw,
    quit, --json, --help, and its exit statuses (1 refused, 2 no daemon).

Usage: test_qmp.py VQCOWD VQCOW-FE VQCOWCTL WORKDIR
"""

import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import time

from qmplib import (SKIP, Daemon, Fail, Qmp, check, expect_error, fe, fe_capacity, log,
                    run_ctl, run_main, setup_work, wait_path)


def first_line(p, what, timeout=30):
    """The first line a `vqcowctl stats --watch` @p prints: it is connected
    and sampling (its header comes with its first interval, so a fixed sleep
    before acting on it races a loaded machine)."""
    r, _, _ = select.select([p.stdout], [], [], timeout)
    check(r, "%s: nothing printed within %d s" % (what, timeout))
    return p.stdout.readline()


def test_protocol(q, path):
    g = Qmp(path, negotiate=False)
    check(set(g.greeting) == {"QMP"}, "greeting %r" % g.greeting)
    check(set(g.greeting["QMP"]) == {"version", "capabilities"}, "greeting %r" % g.greeting)
    check(isinstance(g.greeting["QMP"]["capabilities"], list), "capabilities not a list")
    log("ok: greeting %s" % json.dumps(g.greeting))
    expect_error(g.cmd("query-version"), "CommandNotFound",
                 "Expecting capabilities negotiation with 'qmp_capabilities'",
                 "command before negotiation")
    r = g.cmd("qmp_capabilities", id=7)
    check(r == {"return": {}, "id": 7}, "qmp_capabilities with id: %r" % r)
    expect_error(g.cmd("qmp_capabilities"), "CommandNotFound",
                 "Capabilities negotiation is already complete", "second negotiation")
    r = g.cmd("query-version", id={"x": [1, "two"]})
    check(r.get("id") == {"x": [1, "two"]}, "id not echoed: %r" % r)
    r = g.cmd("no-such-command", id="a")
    expect_error(r, "CommandNotFound", "The command no-such-command has not been found",
                 "unknown command")
    check(r.get("id") == "a", "id not echoed on error: %r" % r)
    expect_error(g.raw("[1, 2]"), "GenericError", "QMP input must be a JSON object", "array")
    expect_error(g.raw('{"foo": 1}'), "GenericError", "QMP input member 'foo' is unexpected",
                 "unknown member")
    expect_error(g.raw('{"execute": 1}'), "GenericError",
                 "QMP input member 'execute' must be a string", "execute not a string")
    expect_error(g.raw('{"execute": "query-version", "arguments": []}'), "GenericError",
                 "QMP input member 'arguments' must be an object", "arguments not an object")
    expect_error(g.cmd("query-version", {"x": 1}), "GenericError",
                 "Parameter 'x' is unexpected", "unexpected argument")
    expect_error(g.cmd("block_resize", {"node-name": "disk0", "size": "1G"}), "GenericError",
                 "Invalid parameter type for 'size', expected: integer", "size as a string")
    expect_error(g.cmd("block_resize", {"node-name": 5, "size": 1}), "GenericError",
                 "Invalid parameter type for 'node-name', expected: string", "node as a number")
    expect_error(g.cmd("block_resize", {"node-name": "disk0"}), "GenericError",
                 "Parameter 'size' is missing", "missing argument")
    # Two messages in one write, then one split over several writes.
    g.send_raw('{"execute": "query-version", "id": 1}{"execute": "query-version", "id": 2}\n')
    check(g.reply().get("id") == 1 and g.reply().get("id") == 2, "two in one write")
    for part in ('{"exec', 'ute": "query-', 'version", "id"', ': 3}\n'):
        g.send_raw(part)
        time.sleep(0.02)
    check(g.reply().get("id") == 3, "split message")
    log("ok: several messages per write, one message over several writes")
    return g


def test_errors(path):
    g = Qmp(path)
    r = g.raw("{bad json")
    expect_error(r, "GenericError", "JSON parse error", "malformed JSON")
    r = g.raw('{"execute": "query-version", "arguments": {"a": "\\u00zz"}}')
    expect_error(r, "GenericError", "JSON parse error", "bad escape")
    check("return" in g.cmd("query-version"), "no service after malformed JSON")
    log("ok: the connection serves on after malformed JSON")
    g.close()

    # An oversized message: an error, then the connection is closed.
    g = Qmp(path)
    g.send_raw('{"execute": "query-version", "arguments": {"x": "' + "a" * (200 << 10))
    try:
        r = g.reply()
        expect_error(r, "GenericError", "too large", "oversized message")
        g.recv()
        raise Fail("connection still open after an oversized message")
    except (EOFError, ConnectionResetError, BrokenPipeError):
        log("ok: oversized message: connection closed")
    g.close()

    # Nesting deeper than the parser allows: an error, not a crash.
    g = Qmp(path)
    expect_error(g.raw("[" * 5000 + "]" * 5000), "GenericError", "", "deep nesting")
    g.close()

    # Hang up in the middle of a message, and right after the greeting.
    g = Qmp(path)
    g.send_raw('{"execute": "query-ver')
    g.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.close()
    log("ok: clients that hang up mid-message")


def test_clients(path, n=8):
    cs = [Qmp(path) for _ in range(n)]
    for i, c in enumerate(cs):
        c.send_raw(json.dumps({"execute": "query-version", "id": i}) + "\n")
    for i, c in reversed(list(enumerate(cs))):
        r = c.reply()
        check(r.get("id") == i and "return" in r, "client %d: %r" % (i, r))
    for c in cs:
        c.close()
    log("ok: %d clients at once" % n)


NODE_KEYS = {"file", "node-name", "ro", "drv", "backing_file_depth", "encrypted",
             "detect_zeroes", "cache", "image", "bps", "bps_rd", "bps_wr", "iops", "iops_rd",
             "iops_wr", "write_threshold"}


def test_queries(q, image, size):
    v = q.ret("query-version")
    check(set(v) == {"qemu", "package"} and set(v["qemu"]) == {"major", "minor", "micro"},
          "query-version %r" % v)
    check("vqcowd" in v["package"], "package %r" % v["package"])
    e = q.ret("query-block-exports")
    check(e == [{"id": "export0", "type": "vhost-user-blk", "node-name": "disk0",
                 "shutting-down": False}], "query-block-exports %r" % e)
    nodes = q.ret("query-named-block-nodes")
    check(len(nodes) == 1, "nodes %r" % nodes)
    n = nodes[0]
    check(NODE_KEYS <= set(n), "node keys missing: %s" % (NODE_KEYS - set(n)))
    check(n["node-name"] == "disk0" and n["drv"] == "raw" and n["ro"] is False,
          "node %r" % n)
    check(n["image"]["virtual-size"] == size and n["image"]["format"] == "raw",
          "image %r" % n["image"])
    log("ok: query-version, query-block-exports, query-named-block-nodes")
    return nodes


def test_resize(q, fe_bin, d, size):
    check(fe_capacity(fe_bin, d.vsock) == size, "capacity before")
    expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": size - 512}),
                 "GenericError", "shrinking is not supported", "shrink")
    expect_error(q.cmd("block_resize", {"node-name": "other", "size": size}),
                 "GenericError", "Cannot find device='' nor node-name='other'", "unknown node")
    expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": size + 100}),
                 "GenericError", "multiple of 512", "unaligned size")
    new = size + (32 << 20)
    check(q.cmd("block_resize", {"node-name": "disk0", "size": new}) == {"return": {}},
          "block_resize")
    check(os.path.getsize(d.image) == new, "file not grown")
    check(fe_capacity(fe_bin, d.vsock) == new, "frontend does not see the new capacity")
    check(q.ret("query-named-block-nodes")[0]["image"]["virtual-size"] == new,
          "virtual-size not updated")
    check(q.cmd("block_resize", {"device": "disk0", "size": new}) == {"return": {}},
          "block_resize by device, same size")
    log("ok: block_resize %d -> %d, seen by the frontend" % (size, new))
    return new


def test_quit(d):
    q = Qmp(d.qsock)
    other = Qmp(d.qsock)
    check(q.cmd("quit") == {"return": {}}, "quit")
    ev = other.recv()
    check(ev.get("event") == "SHUTDOWN" and ev.get("data") == {"guest": False,
                                                             "reason": "host-qmp-quit"}
          and set(ev["timestamp"]) == {"seconds", "microseconds"}, "SHUTDOWN event %r" % ev)
    log("ok: SHUTDOWN event to the other client: %s" % json.dumps(ev))
    d.p.wait(10)
    check(d.p.returncode == 0, "exit status after quit: %d" % d.p.returncode)
    check(not os.path.exists(d.qsock), "QMP socket left behind")
    log("ok: quit: exit 0, socket removed")


def shapes(v):
    """The key structure of a JSON value (types of leaves ignored)."""
    if isinstance(v, dict):
        return {k: shapes(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shapes(v[0])] if v else []
    return None


def test_qsd(work, vqcowd_q):
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        log("SKIP (visible): qemu-storage-daemon not installed: no comparison")
        return False
    img = os.path.join(work, "qsd.raw")
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    qs = os.path.join(work, "qsd.qmp")
    vs = os.path.join(work, "qsd.vsock")
    p = subprocess.Popen([qsd, "--chardev", "socket,path=%s,server=on,wait=off,id=c" % qs,
                          "--monitor", "chardev=c",
                          "--blockdev", "driver=file,filename=%s,node-name=file0" % img,
                          "--blockdev", "driver=raw,file=file0,node-name=disk0",
                          "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,"
                          "addr.type=unix,addr.path=%s,writable=on" % vs],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_path(qs, p)
        time.sleep(0.2)
        a = Qmp(qs, negotiate=False)
        b = Qmp(vqcowd_q, negotiate=False)
        check(shapes(a.greeting)["QMP"].keys() == shapes(b.greeting)["QMP"].keys(),
              "greeting keys")
        check(shapes(a.greeting["QMP"]["version"]) == shapes(b.greeting["QMP"]["version"]),
              "greeting version keys: %r / %r" % (a.greeting, b.greeting))
        conv = [
            '{"execute": "query-version"}',
            '{"execute": "qmp_capabilities", "id": 7}',
            '{"execute": "qmp_capabilities"}',
            '{"execute": "nope", "id": "a"}',
            '{"execute": "query-version", "arguments": {"x": 1}}',
            '{"execute": "block_resize", "arguments": {"node-name": "disk0", "size": "x"}}',
            '{"execute": "block_resize", "arguments": {"node-name": "disk0"}}',
            '{"execute": "block_resize", "arguments": {"node-name": "nonode", "size": 1024}}',
            '[1]',
            '{"foo": 1}',
            '{"execute": 1}',
            '{"execute": "query-version", "arguments": []}',
            '{"execute": "query-version"}',
            '{"execute": "query-block-exports"}',
        ]
        for m in conv:
            ra, rb = a.raw(m), b.raw(m)
            if "error" in ra:
                check("error" in rb and ra["error"] == rb["error"] and
                      ra.get("id") == rb.get("id"),
                      "%s:\n qsd    %r\n vqcowd %r" % (m, ra, rb))
            else:
                check("return" in rb and ra.get("id") == rb.get("id") and
                      shapes(ra["return"]) == shapes(rb["return"]),
                      "%s:\n qsd    %r\n vqcowd %r" % (m, ra, rb))
        log("ok: %d messages: the same errors and result keys as qemu-storage-daemon"
            % len(conv))
        na = {n["node-name"]: n for n in a.ret("query-named-block-nodes")}["disk0"]
        nb = b.ret("query-named-block-nodes")[0]
        missing = set(na) - set(nb)
        check(NODE_KEYS <= set(na), "QEMU's node keys changed? %s" % (NODE_KEYS - set(na)))
        log("ok: query-named-block-nodes: keys QEMU has and we do not: %s"
            % (sorted(missing) or "none"))
        sa = a.ret("query-blockstats", {"query-nodes": True})
        sa = {s["node-name"]: s for s in sa}["disk0"]
        sb = b.ret("query-blockstats")
        sb = {s["node-name"]: s for s in sb}["disk0"]
        miss = set(sa["stats"]) - set(sb["stats"])
        check(not miss, "query-blockstats: stats keys QEMU has and we do not: %s" % sorted(miss))
        log("ok: query-blockstats stats keys are QEMU's")
        a.close()
        b.close()
    finally:
        p.terminate()
        p.wait(10)
    return True


def main():
    vqcowd, fe_bin, ctl, work = setup_work(4)
    image = os.path.join(work, "disk.raw")
    size = 64 << 20
    with open(image, "wb") as f:
        f.truncate(size)
    d = Daemon(vqcowd, work, image, "raw", ["--format", "raw"])
    d.image = image
    try:
        st = os.stat(d.qsock)
        check(stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600,
              "QMP socket mode %o" % st.st_mode)
        log("ok: QMP socket mode 0600")
        q = test_protocol(None, d.qsock)
        test_errors(d.qsock)
        test_clients(d.qsock)
        test_queries(q, image, size)
        test_stats(q, fe_bin, d)
        test_histograms(q, fe_bin, d)
        size = test_resize(q, fe_bin, d, size)
        size = test_ctl(ctl, fe_bin, d, q, size)
        qsd_ran = test_qsd(work, d.qsock)
        check(d.p.poll() is None, "daemon died")
        fe(fe_bin, "verify", d.vsock, "--size", "1M")
        log("ok: guest I/O still served after all of it")
        test_quit(d)
        check("AddressSanitizer" not in d.log() and "runtime error" not in d.log(),
              "sanitizer report:\n" + d.log())
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()
    test_qcow2(vqcowd, fe_bin, ctl, work)
    test_qmp_fd(vqcowd, fe_bin, work)
    if not test_enospc(vqcowd, fe_bin, work):
        qsd_ran = False
    if not qsd_ran:
        log("SKIP: the qemu-storage-daemon comparison or the ENOSPC check did not run")
        return SKIP
    log("PASS")
    return 0


STATS_KEYS = {"rd_operations", "wr_operations", "flush_operations", "unmap_operations",
              "rd_bytes", "wr_bytes", "unmap_bytes", "rd_total_time_ns", "wr_total_time_ns",
              "flush_total_time_ns", "unmap_total_time_ns", "failed_rd_operations",
              "failed_wr_operations", "failed_flush_operations", "failed_unmap_operations",
              "invalid_rd_operations", "invalid_wr_operations", "invalid_flush_operations",
              "invalid_unmap_operations", "wr_highest_offset"}


def blockstats(q):
    r = q.ret("query-blockstats")
    check(len(r) == 1 and r[0]["node-name"] == "disk0", "query-blockstats %r" % r)
    check(STATS_KEYS <= set(r[0]["stats"]), "stats keys missing: %s"
          % (STATS_KEYS - set(r[0]["stats"])))
    return r[0]


def test_stats(q, fe_bin, d):
    b0 = blockstats(q)
    s0 = b0["stats"]
    check(all(s0[k] == 0 for k in STATS_KEYS), "counters not zero at start: %r" % s0)
    check(b0["vqcowd"]["queues"] == [], "queues at start %r" % b0["vqcowd"])
    fe(fe_bin, "write", d.vsock, 1 << 20, 65536, stdin=os.urandom(65536))
    fe(fe_bin, "read", d.vsock, 0, 4096)
    fe(fe_bin, "--queues", "2", "--queue", "1", "read", d.vsock, 8192, 8192)
    fe(fe_bin, "flush", d.vsock)
    fe(fe_bin, "discard", d.vsock, 2 << 20, 1 << 20)
    r = subprocess.run([fe_bin, "read", d.vsock, str(1 << 30), "4096"], capture_output=True,
                       timeout=60)  # beyond the end: refused, counted as invalid
    check(r.returncode != 0, "read beyond the end succeeded")
    b = blockstats(q)
    s = b["stats"]
    want = {"wr_operations": 1, "wr_bytes": 65536, "rd_operations": 2, "rd_bytes": 12288,
            "flush_operations": 1, "unmap_operations": 1, "unmap_bytes": 1 << 20,
            "invalid_rd_operations": 1, "failed_rd_operations": 0,
            "wr_highest_offset": (1 << 20) + 65536}
    for k, v in want.items():
        check(s[k] == v, "%s = %r, want %r (all: %r)" % (k, s[k], v, s))
    for k in ("rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns"):
        check(s[k] > 0, "%s did not move: %r" % (k, s))
    check("idle_time_ns" in s, "no idle_time_ns after I/O")
    qs = {x["queue"]: x for x in b["vqcowd"]["queues"]}
    check(set(qs) == {0, 1}, "queues %r" % b["vqcowd"])
    check(qs[1]["requests"] == 1 and qs[1]["bytes"] == 8192 and qs[1]["errors"] == 0,
          "queue 1 %r" % qs[1])
    check(qs[0]["requests"] == 5 and qs[0]["errors"] == 1 and qs[0]["bytes"] == 65536 + 4096,
          "queue 0 %r" % qs[0])
    check(b["vqcowd"]["in-flight"] == 0, "in-flight %r" % b["vqcowd"])
    log("ok: query-blockstats counters after vqcow-fe requests: %s" % json.dumps(
        {k: s[k] for k in sorted(want)}))


def hist_sum(st, key):
    h = st[key]
    check(len(h["bins"]) == len(h["boundaries"]) + 1, "%s: %r" % (key, h))
    return sum(h["bins"])


def test_histograms(q, fe_bin, d):
    """block-latency-histogram-set with QEMU's semantics (qapi/block.json 7.2)."""
    s = blockstats(q)["stats"]
    check(not any(k.endswith("_latency_histogram") for k in s), "histograms before set: %r" % s)
    # Every latency is >= 1 ns and below 100 s: all requests land in bin 1.
    check(q.cmd("block-latency-histogram-set",
                {"id": "disk0", "boundaries": [1, 100 * 10 ** 9]}) == {"return": {}}, "set")
    s0 = blockstats(q)["stats"]
    for k in ("rd", "wr", "flush"):
        h = s0["%s_latency_histogram" % k]
        check(h == {"boundaries": [1, 100 * 10 ** 9], "bins": [0, 0, 0]},
              "%s histogram not empty after set: %r" % (k, h))
    check("unmap_latency_histogram" not in s0, "QEMU 7.2 has no unmap histogram")
    fe(fe_bin, "verify", d.vsock, "--size", "1M", "--bs", "64k")
    fe(fe_bin, "--queues", "2", "--queue", "1", "read", d.vsock, 0, 4096)
    fe(fe_bin, "flush", d.vsock)
    s1 = blockstats(q)["stats"]
    for k in ("rd", "wr", "flush"):
        ops = s1["%s_operations" % k] - s0["%s_operations" % k]
        h = s1["%s_latency_histogram" % k]
        check(ops > 0 and h["bins"] == [0, ops, 0],
              "%s: %d requests, histogram %r" % (k, ops, h))
    log("ok: histograms: bins sum to the requests since set (rd %d, wr %d, flush %d), "
        "each in its latency class" % tuple(hist_sum(s1, "%s_latency_histogram" % k)
                                           for k in ("rd", "wr", "flush")))
    # A per-type list wins over boundaries; the others are reset too.
    check("return" in q.cmd("block-latency-histogram-set",
                            {"id": "disk0", "boundaries": [10 ** 12],
                             "boundaries-write": [1, 2, 3]}), "set write")
    fe(fe_bin, "write", d.vsock, 0, 4096, stdin=os.urandom(4096))
    fe(fe_bin, "read", d.vsock, 0, 4096)
    s2 = blockstats(q)["stats"]
    check(s2["wr_latency_histogram"] == {"boundaries": [1, 2, 3], "bins": [0, 0, 0, 1]},
          "write histogram %r" % s2["wr_latency_histogram"])
    check(s2["rd_latency_histogram"] == {"boundaries": [10 ** 12], "bins": [1, 0]},
          "read histogram %r" % s2["rd_latency_histogram"])
    check(s2["flush_latency_histogram"]["bins"] == [0, 0], "flush %r" % s2)
    # Only one type: the others keep counting.
    check("return" in q.cmd("block-latency-histogram-set",
                            {"id": "disk0", "boundaries-flush": []}), "set flush")
    fe(fe_bin, "flush", d.vsock)
    fe(fe_bin, "read", d.vsock, 0, 4096)
    s3 = blockstats(q)["stats"]
    check(s3["flush_latency_histogram"] == {"boundaries": [], "bins": [1]}, "flush %r" % s3)
    check(s3["rd_latency_histogram"]["bins"] == [2, 0], "read kept counting: %r" % s3)
    # Errors, as QEMU words them, and nothing changed by a refused list.
    expect_error(q.cmd("block-latency-histogram-set", {"id": "nodev", "boundaries": [1]}),
                 "GenericError", "Device 'nodev' not found", "histogram: unknown device")
    expect_error(q.cmd("block-latency-histogram-set", {"id": "disk0",
                                                       "boundaries-read": [5, 5]}),
                 "GenericError", "Device 'disk0' set read boundaries fail",
                 "histogram: not ascending")
    expect_error(q.cmd("block-latency-histogram-set", {"id": "disk0", "boundaries": [0, 5]}),
                 "GenericError", "Device 'disk0' set boundaries fail", "histogram: zero")
    expect_error(q.cmd("block-latency-histogram-set", {"id": "disk0", "boundaries": 5}),
                 "GenericError", "Invalid parameter type for 'boundaries', expected: array",
                 "histogram: not a list")
    expect_error(q.cmd("block-latency-histogram-set", {"id": "disk0",
                                                       "boundaries": [1, "x"]}),
                 "GenericError", "Invalid parameter type for 'boundaries[1]', expected: integer",
                 "histogram: not an integer")
    expect_error(q.cmd("block-latency-histogram-set",
                       {"id": "disk0", "boundaries": list(range(1, 100))}),
                 "GenericError", "at most 64", "histogram: too many boundaries")
    # Only the id: every histogram removed.
    check("return" in q.cmd("block-latency-histogram-set", {"node-name": "disk0"}), "remove")
    s4 = blockstats(q)["stats"]
    check(not any(k.endswith("_latency_histogram") for k in s4), "not removed: %r" % s4)
    log("ok: block-latency-histogram-set: per-type lists, reset, removal, errors")


def test_qmp_fd(vqcowd, fe_bin, work):
    """--qmp-fd N: QMP on a socket that is already listening (socket activation)."""
    image = os.path.join(work, "fd.raw")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    qpath = os.path.join(work, "fd.qmp")
    vsock = os.path.join(work, "fd.vsock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(qpath)
    ls.listen(4)
    fd = ls.fileno()
    logf = os.path.join(work, "fd.log")
    p = subprocess.Popen([vqcowd, "--socket-path", vsock, "--blk-file", image, "--format", "raw",
                          "--qmp-fd", str(fd)], pass_fds=[fd], stdout=open(logf, "w"),
                         stderr=subprocess.STDOUT)
    ls.close()
    try:
        wait_path(vsock, p)
        q = Qmp(qpath)  # a connection queued before the daemon accepts is served too
        fe(fe_bin, "write", vsock, 0, 4096, stdin=os.urandom(4096))
        check(q.ret("query-blockstats")[0]["stats"]["wr_operations"] == 1, "stats over --qmp-fd")
        q2 = Qmp(qpath)
        check("return" in q2.cmd("query-version"), "second client over --qmp-fd")
        q2.close()
        check(q.cmd("quit") == {"return": {}}, "quit over --qmp-fd")
        p.wait(10)
        check(p.returncode == 0, "exit after quit: %d" % p.returncode)
        check(os.path.exists(qpath), "the passed socket's path is not ours to unlink")
        check("QMP on fd %d" % fd in open(logf).read(), "log line %r" % open(logf).read())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # Not a listening socket; both options; not an open fd.
    r, w = os.pipe()
    try:
        rr = subprocess.run([vqcowd, "--socket-path", vsock, "--blk-file", image, "--format",
                             "raw", "--qmp-fd", str(r)], pass_fds=[r], capture_output=True,
                            timeout=30)
        check(rr.returncode != 0 and b"--qmp-fd %d: not a listening stream socket" % r
              in rr.stderr, "--qmp-fd on a pipe: %d %r" % (rr.returncode, rr.stderr))
    finally:
        os.close(r)
        os.close(w)
    rr = subprocess.run([vqcowd, "--socket-path", vsock, "--blk-file", image, "--qmp", qpath,
                         "--qmp-fd", "0"], capture_output=True, timeout=30)
    check(rr.returncode == 2 and b"exclude each other" in rr.stderr, "both: %r" % rr.stderr)
    rr = subprocess.run([vqcowd, "--socket-path", vsock, "--blk-file", image, "--qmp-fd", "987"],
                        capture_output=True, timeout=30)
    check(rr.returncode == 2 and b"not an open file descriptor" in rr.stderr,
          "closed fd: %r" % rr.stderr)
    log("ok: --qmp-fd: served (queued connection, two clients, quit), refused on a pipe, "
        "with --qmp, on a closed fd")


def test_enospc(vqcowd, fe_bin, work):
    mnt = os.path.join(work, "small")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
                       capture_output=True)
    if r.returncode != 0:
        log("SKIP (visible): cannot mount a 1 MiB tmpfs (%s): no BLOCK_IO_ERROR check"
            % r.stderr.decode(errors="replace").strip())
        return False
    d = None
    try:
        image = os.path.join(mnt, "full.raw")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        d = Daemon(vqcowd, work, image, "nospc", ["--format", "raw"])
        q = Qmp(d.qsock)
        r = subprocess.run([fe_bin, "write", d.vsock, "0", str(4 << 20)],
                           input=os.urandom(4 << 20), capture_output=True, timeout=60)
        check(r.returncode != 0, "a 4 MiB write into a 1 MiB file system succeeded")
        ev = q.recv()
        check(ev.get("event") == "BLOCK_IO_ERROR", "expected BLOCK_IO_ERROR, got %r" % ev)
        check(ev["data"] == {"device": "", "node-name": "disk0", "operation": "write",
                             "action": "report", "nospace": True,
                             "reason": "No space left on device"}, "event data %r" % ev)
        st = q.ret("query-blockstats")[0]["stats"]
        check(st["failed_wr_operations"] >= 1, "failed writes not counted: %r" % st)
        log("ok: ENOSPC: %s; failed_wr_operations %d" % (json.dumps(ev),
                                                        st["failed_wr_operations"]))
        q.close()
    except Exception:
        if d:
            sys.stdout.write("---- vqcowd log ----\n" + d.log())
        raise
    finally:
        if d:
            d.stop()
        subprocess.run(["umount", mnt])
    return True


def test_ctl(ctl, fe_bin, d, q, size):
    rc, out, err = run_ctl(ctl, "--help")
    check(rc == 0 and all(w in out for w in ("stats", "resize", "version", "quit", "raw",
                                             "--json")), "vqcowctl --help: %d %s" % (rc, out))
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "version")
    check(rc == 0 and out.startswith("vqcowd "), "vqcowctl version: %d %r %r" % (rc, out, err))
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "--json", "version")
    check(rc == 0 and json.loads(out) == q.ret("query-version"), "version --json %r" % out)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "--json", "stats")
    st = json.loads(out)
    check(rc == 0 and st[0]["stats"]["wr_operations"] ==
          q.ret("query-blockstats")[0]["stats"]["wr_operations"], "stats --json %r" % out)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "stats")
    check(rc == 0 and "read" in out and "queue" in out, "stats: %r" % out)
    bench = subprocess.Popen([fe_bin, "bench", d.vsock, "--rw", "randwrite", "--bs", "4k",
                              "--iodepth", "4", "--runtime", "3"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "--json", "stats", "--watch", "--count", "2")
    bench.wait(30)
    lines = [json.loads(x) for x in out.splitlines()]
    check(rc == 0 and len(lines) == 2, "stats --watch: %d %r %r" % (rc, out, err))
    check(any(x["write"]["iops"] > 0 and x["write"]["lat_ms"] > 0 for x in lines),
          "stats --watch saw no writes under a bench: %r" % lines)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "stats", "--watch", "--count", "1")
    check(rc == 0 and "r/s" in out and len(out.splitlines()) == 2, "watch table %r" % out)
    log("ok: vqcowctl stats --watch: %s" % json.dumps(lines[-1]))
    # Ctrl-C ends a watch cleanly, with status 0, after its lines so far.
    w = subprocess.Popen([ctl, "-s", d.qsock, "stats", "--watch", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first = first_line(w, "stats --watch")
    w.send_signal(2)
    out, err = w.communicate(timeout=10)
    out = first + out
    check(w.returncode == 0 and b"r/s" in out and not err, "watch after SIGINT: %d %r %r"
          % (w.returncode, out, err))
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "histogram", "100", "1000000")
    check(rc == 0, "vqcowctl histogram: %d %r" % (rc, err))
    check(q.ret("query-blockstats")[0]["stats"]["rd_latency_histogram"]["boundaries"] ==
          [100000, 1000000000], "histogram boundaries from vqcowctl (us -> ns)")
    fe(fe_bin, "read", d.vsock, 0, 4096)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "stats")
    check(rc == 0 and "read latency (us): [0,100): " in out, "stats with histograms %r" % out)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "histogram")
    check(rc == 0 and "rd_latency_histogram" not in q.ret("query-blockstats")[0]["stats"],
          "vqcowctl histogram (remove): %d %r" % (rc, err))
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "histogram", "5", "x")
    check(rc == 2, "bad boundary: %d" % rc)
    log("ok: vqcowctl stats --watch ends on SIGINT with 0; histogram set, shown, removed")
    new = size + (16 << 20)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "resize", "%dM" % (new >> 20))
    check(rc == 0, "vqcowctl resize: %d %r" % (rc, err))
    check(fe_capacity(fe_bin, d.vsock) == new, "vqcowctl resize not seen by the frontend")
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "resize", "1M")
    check(rc == 1 and "shrinking is not supported" in err, "shrink: %d %r" % (rc, err))
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "resize", "12Q")
    check(rc == 2, "bad size: %d" % rc)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "raw", '{"execute": "query-block-exports"}')
    check(rc == 0 and json.loads(out)[0]["node-name"] == "disk0", "raw: %r" % out)
    rc, out, err = run_ctl(ctl, "-s", d.qsock, "raw", '{"execute": "nope"}')
    check(rc == 1 and "CommandNotFound" in err, "raw unknown: %d %r" % (rc, err))
    rc, out, err = run_ctl(ctl, "-s", d.qsock + ".missing", "version")
    check(rc == 2 and "cannot connect" in err, "no daemon: %d %r" % (rc, err))
    log("ok: vqcowctl version, stats, resize, raw, --json, exit statuses")
    return new


def test_qcow2(vqcowd, fe_bin, ctl, work):
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        log("SKIP (visible): qemu-img not installed: no qcow2 chain check")
        return
    base = os.path.join(work, "base.qcow2")
    top = os.path.join(work, "top.qcow2")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", base, "32M"], check=True)
    subprocess.run([shutil.which("qemu-io") or "qemu-io", "-f", "qcow2", "-c",
                    "write -P 7 4M 64k", base], check=True, capture_output=True)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                   check=True)
    d = Daemon(vqcowd, work, top, "q2", ["--node-name", "vm1"])
    try:
        q = Qmp(d.qsock)
        nodes = q.ret("query-named-block-nodes")
        check([n["node-name"] for n in nodes] == ["vm1", "vm1-backing1"], "nodes %r" % nodes)
        check(nodes[0]["drv"] == "qcow2" and nodes[0]["backing_file_depth"] == 1 and
              nodes[0]["backing_file"] == base, "top node %r" % nodes[0])
        img = nodes[0]["image"]
        check(img["backing-filename"] == base and img["backing-image"]["filename"] == base and
              img["backing-image"]["virtual-size"] == 32 << 20, "image %r" % img)
        c = nodes[0]["vqcowd"]["cache"]
        check(c["l2-cache-size"] > 0 and c["cache-entry-size"] > 0 and
              c["refcount-cache-size"] > 0, "cache %r" % c)
        check(c["compressed-inflated"] == 0 and c["compressed-cache-hits"] == 0,
              "inflate counters of an image without compressed clusters: %r" % c)
        e0 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        check(e0["clusters-allocated"] == 0 and e0["cow-operations"] == 0, "engine %r" % e0)
        fe(fe_bin, "write", d.vsock, 0, 65536, stdin=os.urandom(65536))
        fe(fe_bin, "read", d.vsock, 0, 65536)
        c2 = q.ret("query-named-block-nodes")[0]["vqcowd"]["cache"]
        check(c2["l2-cache-used"] > c["l2-cache-used"] and c2["refcount-cache-used"] > 0,
              "the caches did not fill after a write: %r" % c2)
        log("ok: qcow2 cache numbers in query-named-block-nodes: %s" % json.dumps(c2))
        e1 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        check(e1["clusters-allocated"] >= 2 and e1["l2-tables-allocated"] >= 1 and
              e1["l2-misses"] + e1["l2-hits"] > 0, "engine after a write %r" % e1)
        fe(fe_bin, "write", d.vsock, (1 << 20) + 4096, 4096, stdin=os.urandom(4096))
        fe(fe_bin, "flush", d.vsock)
        e2 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        # A 4 KiB write into an unallocated cluster of an image with a
        # backing file: the allocation copies the head and tail from it.
        check(e2["cow-operations"] == e1["cow-operations"] + 1 and
              e2["clusters-allocated"] >= e1["clusters-allocated"],
              "a partial write over a backing file is a COW: %r / %r" % (e1, e2))
        # Again where the backing file holds data.
        fe(fe_bin, "write", d.vsock, (4 << 20) + 4096, 4096, stdin=os.urandom(4096))
        e3 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        check(e3["cow-operations"] == e2["cow-operations"] + 1, "COW not counted: %r" % e3)
        fe(fe_bin, "write", d.vsock, 8 << 20, 65536, stdin=os.urandom(65536))
        e4 = q.ret("query-blockstats")[0]["vqcowd"]["qcow2"]
        check(e4["cow-operations"] == e3["cow-operations"], "a whole cluster is no COW: %r" % e4)
        check(e2["metadata-writes"] > e1["metadata-writes"] and e2["writeback-batches"] > 0 and
              e2["metadata-write-bytes"] >= 512 * e2["metadata-writes"] and
              isinstance(e2.get("writeback-side-batches"), int) and
              isinstance(e2.get("link-wait-us"), int),
              "flush %r" % e2)
        log("ok: qcow2 engine counters: %s" % json.dumps(e4))
        check(q.cmd("block_resize", {"node-name": "vm1", "size": 64 << 20}) == {"return": {}},
              "qcow2 online resize over a backing chain")
        check(fe_capacity(fe_bin, d.vsock) == 64 << 20, "qcow2 resize not seen by the frontend")
        expect_error(q.cmd("block_resize", {"node-name": "disk0", "size": 64 << 20}),
                     "GenericError", "Cannot find", "default node name replaced")
        e = q.ret("query-block-exports")
        check(e[0]["node-name"] == "vm1", "exports %r" % e)
        log("ok: qcow2 chain in query-named-block-nodes, --node-name")
        q.close()
        w = subprocess.Popen([ctl, "-s", d.qsock, "stats", "--watch", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first_line(w, "stats --watch")
        rc, out, err = run_ctl(ctl, "-s", d.qsock, "quit")
        check(rc == 0, "vqcowctl quit: %d %r" % (rc, err))
        out, err = w.communicate(timeout=10)
        check(w.returncode == 2 and b"connection closed by the daemon" in err,
              "watch when the daemon quits: %d %r" % (w.returncode, err))
        log("ok: stats --watch ends with status 2 when the daemon goes away")
        d.p.wait(10)
        check(d.p.returncode == 0, "exit after vqcowctl quit: %d" % d.p.returncode)
        log("ok: vqcowctl quit")
    except Exception:
        d.stop_showing_log()
        raise
    d.stop()


if __name__ == "__main__":
    run_main(main)
