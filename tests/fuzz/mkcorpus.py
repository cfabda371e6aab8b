#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the seed corpus of the fuzz targets into tests/fuzz/corpus/<target>/.

Run by hand after changing an input format (the seeds are committed; the
fuzz runs only read them): python3 tests/fuzz/mkcorpus.py
Seeds named crash-* are inputs that once found a bug: this script never
touches them. The qcow2 seeds are made by qemu-img/qemu-io (the oracle), so
they are exactly what QEMU writes.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# ---------------------------------------------------------------- vhost-user messages
# Encoding: fuzz_vhost_msg.h.

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
SET_BACKEND_REQ_FD, GET_CONFIG, SET_CONFIG, RESET_DEVICE = 21, 24, 25, 34
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38
F_VERSION, F_NEED_REPLY = 0x1, 0x8

PUSH_ALL, PUSH_ONE, GUEST_WRITE, RAW, RECONNECT = 0, 1, 2, 3, 4
FD_AUTO, FD_MEMFD, FD_EVENTFD, FD_PIPE, FD_NULL = 0, 1, 2, 3, 4

MEM = 256 * 1024
UVA = 0x7F0000000000
FEATURES = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29) | (1 << 9)  # VERSION_1 PROTO INDIRECT EVENT_IDX FLUSH
PROTO = (1 << 0) | (1 << 3) | (1 << 5) | (1 << 9) | (1 << 15)


def msg(req, payload=b"", nfds=0, kind=FD_AUTO, flags=F_VERSION, size=None):
    ctl = (nfds & 0x0F) | (kind & 7) << 4
    return bytes([ctl]) + struct.pack("<III", req, flags, len(payload) if size is None else size) + payload


def action(a, body=b""):
    return bytes([0x80 | a]) + body


def u64(v):
    return struct.pack("<Q", v)


def state(idx, num):
    return struct.pack("<II", idx, num)


def guest_write(off, data):
    return action(GUEST_WRITE, struct.pack("<IH", off, len(data)) + data)


def region(gpa, size, uva, off):
    return struct.pack("<QQQQ", gpa, size, uva, off)


def negotiate(features=FEATURES, proto=PROTO):
    return (msg(GET_FEATURES) + msg(GET_PROTOCOL_FEATURES) + msg(SET_FEATURES, u64(features)) +
            msg(SET_PROTOCOL_FEATURES, u64(proto)) + msg(SET_OWNER) + msg(GET_QUEUE_NUM))


def mem_table(regions):
    body = struct.pack("<II", len(regions), 0) + b"".join(region(*r) for r in regions)
    return msg(SET_MEM_TABLE, body, nfds=len(regions))


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def ring_in_memory(num=8, heads=(0,), desc_gpa=0x1000, avail_gpa=0x2000, data_gpa=0x10000):
    """Descriptors for a virtio-blk-like request per head (header, data, status), avail ring."""
    out = b""
    for h in heads:
        base = data_gpa + h * 0x2000
        d = desc(base, 16, 1, (h + 1) % num) + desc(base + 0x100, 4096, 3, (h + 2) % num) + \
            desc(base + 0x1100, 1, 2, 0)
        out += guest_write(desc_gpa + h * 16, d)
    ring = struct.pack("<HH", 0, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    out += guest_write(avail_gpa, ring)
    return out


def ring_setup(idx=0, num=8, desc_gpa=0x1000, avail_gpa=0x2000, used_gpa=0x3000, kick=True):
    addr = struct.pack("<IIQQQQ", idx, 0, UVA + desc_gpa, UVA + used_gpa, UVA + avail_gpa, 0)
    out = msg(SET_VRING_NUM, state(idx, num)) + msg(SET_VRING_ADDR, addr) + \
        msg(SET_VRING_BASE, state(idx, 0)) + msg(SET_VRING_CALL, u64(idx), nfds=1)
    if kick:
        out += msg(SET_VRING_KICK, u64(idx), nfds=1) + msg(SET_VRING_ENABLE, state(idx, 1))
    return out


def vhost_msg_seeds():
    s = {}
    s["negotiate"] = negotiate() + msg(GET_MAX_MEM_SLOTS) + msg(SET_BACKEND_REQ_FD, nfds=1) + \
        msg(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60)) + \
        msg(SET_CONFIG, struct.pack("<III", 20, 1, 0) + b"\x01", flags=F_VERSION | F_NEED_REPLY)
    full = negotiate() + mem_table([(0, MEM, UVA, 0)]) + ring_in_memory(heads=(0, 3)) + ring_setup()
    s["ring"] = full + action(PUSH_ALL) + msg(GET_VRING_BASE, state(0, 0))
    s["drain"] = full + msg(GET_VRING_BASE, state(0, 0)) + action(PUSH_ONE, struct.pack("<I", 4097)) + \
        action(PUSH_ALL) + msg(SET_VRING_BASE, state(0, 2)) + msg(SET_VRING_KICK, u64(0), nfds=1)
    s["memslots"] = negotiate() + \
        msg(ADD_MEM_REG, u64(0) + region(0, 0x20000, UVA, 0), nfds=1) + \
        msg(ADD_MEM_REG, u64(0) + region(0x20000, 0x20000, UVA + 0x20000, 0x20000), nfds=1) + \
        ring_in_memory(heads=(1,)) + ring_setup() + \
        msg(REM_MEM_REG, u64(0) + region(0, 0x20000, UVA, 0), flags=F_VERSION | F_NEED_REPLY) + \
        msg(ADD_MEM_REG, u64(0) + region(0, 0x20000, UVA, 0), nfds=1) + action(PUSH_ALL)
    s["reconnect-inflight"] = full + action(RECONNECT) + negotiate()
    s["reset"] = full + action(PUSH_ALL) + msg(RESET_DEVICE) + msg(RESET_OWNER) + ring_setup(kick=False)
    whole = msg(GET_FEATURES) + msg(SET_FEATURES, u64(FEATURES))
    pieces = msg(GET_QUEUE_NUM)[1:]
    s["pieces"] = whole + action(RAW, struct.pack("<H", 5) + pieces[:5]) + \
        action(RAW, struct.pack("<H", len(pieces) - 5) + pieces[5:])
    s["refused"] = msg(40, b"abcd") + msg(7, u64(0), nfds=1) + msg(SET_VRING_ERR, u64(0), nfds=1) + \
        msg(SET_VRING_NUM, state(0, 3), flags=F_VERSION | F_NEED_REPLY) + \
        msg(40, b"abcd", flags=F_VERSION | F_NEED_REPLY)
    s["bad-fds"] = negotiate() + msg(SET_MEM_TABLE, struct.pack("<II", 1, 0) + region(0, MEM, UVA, 0),
                                     nfds=2, kind=FD_EVENTFD)
    s["bad-kick"] = negotiate() + mem_table([(0, MEM, UVA, 0)]) + ring_in_memory() + \
        ring_setup(kick=False) + msg(SET_VRING_KICK, u64(0), nfds=1, kind=FD_PIPE) + \
        msg(SET_VRING_ENABLE, state(0, 1))
    s["two-queues"] = negotiate() + mem_table([(0, 0x20000, UVA, 0), (0x20000, 0x20000, UVA + 0x20000,
                                                                         0x20000)]) + \
        ring_in_memory(heads=(0,)) + ring_setup() + \
        ring_in_memory(heads=(2,), desc_gpa=0x21000, avail_gpa=0x22000, data_gpa=0x30000) + \
        ring_setup(idx=1, desc_gpa=0x21000, avail_gpa=0x22000, used_gpa=0x23000) + action(PUSH_ALL)
    inflight = struct.pack("<QQHHI", 0, 0, 2, 8, 0)
    s["inflight"] = negotiate(proto=PROTO | (1 << 12)) + msg(GET_INFLIGHT_FD, inflight) + \
        msg(SET_INFLIGHT_FD, struct.pack("<QQHHI", 4096, 0, 2, 8, 0), nfds=1, kind=FD_MEMFD) + \
        mem_table([(0, MEM, UVA, 0)]) + ring_in_memory(heads=(0, 3)) + ring_setup() + \
        action(RECONNECT) + negotiate(proto=PROTO | (1 << 12)) + \
        msg(SET_INFLIGHT_FD, struct.pack("<QQHHI", 4096, 0, 2, 8, 0), nfds=1, kind=FD_MEMFD)
    return s


# ---------------------------------------------------------------- rings
# Layout: fuzz_vhost_vring.c (features, log2 num, base, second avail idx, guest memory).

def vring_seed(flags, lognum, base, avail2, mem):
    # the harness zero-fills guest memory past the input
    return bytes([flags, lognum]) + struct.pack("<HH", base, avail2) + bytes(mem).rstrip(b"\0")


def vring_seeds():
    s = {}
    num = 8
    # plain chain of three at head 0, avail idx 1
    mem = bytearray(0x8000)
    mem[0:48] = desc(0x6000, 16, 1, 1) + desc(0x6100, 4096, 3, 2) + desc(0x7100, 1, 2, 0)
    mem[0x4000:0x4006] = struct.pack("<HHH", 0, 1, 0)
    s["chain"] = vring_seed(0, 3, 0, 1, mem)
    s["chain-event-idx"] = vring_seed(1 | 4, 3, 0, 2, mem)
    # indirect table in region 1, buffers crossing into region 1 and the hole
    mem = bytearray(0x10000)
    mem[0:16] = desc(0x8000, 48, 4, 0)
    mem[0x8000:0x8030] = desc(0x7ff0, 32, 1, 1) + desc(0xfff0, 0x20, 3, 2) + desc(0x20000, 8, 2, 0)
    mem[0x4000:0x4006] = struct.pack("<HHH", 0, 1, 0)
    s["indirect-cross"] = vring_seed(2, 3, 0, 1, mem)
    # wrap-around: base 65534, avail idx 1 (three entries)
    mem = bytearray(0x8000)
    for h in range(num):
        mem[h * 16:h * 16 + 16] = desc(0x6000 + h * 0x100, 0x100, 2 if h % 2 else 0, 0)
    mem[0x4000:0x4004] = struct.pack("<HH", 0, 1)
    mem[0x4004:0x4004 + 2 * num] = b"".join(struct.pack("<H", (h * 3) % num) for h in range(num))
    mem[0x5000:0x5004] = struct.pack("<HH", 0, 65534)
    s["wrap"] = vring_seed(1 | 2, 3, 65534, 5, mem)
    # a 1024-entry ring, all heads available
    mem = bytearray(0x8000)
    for h in range(1024):
        mem[h * 16:h * 16 + 16] = desc(0x6000 + (h % 16) * 0x10, 0x10, 2, 0)
    mem[0x4000:0x4004] = struct.pack("<HH", 0, 1024)
    mem[0x4004:0x4004 + 2048] = b"".join(struct.pack("<H", h) for h in range(1024))
    s["full-1024"] = vring_seed(4, 10, 0, 1024, mem)
    return s


# ---------------------------------------------------------------- qcow2 images

def qcow2_seeds(tmp):
    def img(*args):
        # in tmp: relative names (backing, data file) are made there
        subprocess.run(["qemu-img"] + list(args), check=True, stdout=subprocess.DEVNULL, cwd=tmp)

    def io(path, *cmds):
        argv = ["qemu-io"]
        for c in cmds:
            argv += ["-c", c]
        subprocess.run(argv + [path], check=True, stdout=subprocess.DEVNULL, cwd=tmp)

    def p(name):
        return os.path.join(tmp, name)

    writes = ("write -P 0x11 0 4k", "write -z 64k 4k", "write -P 0x22 512k 1k")
    for cs in (512, 1024, 4096):
        img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cs, p("c%d" % cs), "1M")
        io(p("c%d" % cs), *writes)
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10", p("v2"), "256k")
    io(p("v2"), "write -P 1 0 1k")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", p("rb1"), "256k")
    io(p("rb1"), "write -P 1 0 1k")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", p("rb64"), "256k")
    io(p("rb64"), "write -P 1 0 1k")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16384,extended_l2=on", p("extl2"), "1M")
    io(p("extl2"), "write -P 0x11 0 2k", "write -z 8k 2k")
    shutil.copy(p("c1024"), p("snapshots"))
    img("snapshot", "-c", "first", p("snapshots"))
    io(p("snapshots"), "write -P 0x33 0 1k")
    img("snapshot", "-c", "second", p("snapshots"))
    img("create", "-q", "-u", "-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F",
        "qcow2", p("backing"), "1M")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,data_file=data.raw", p("datafile"),
        "64k")
    if os.path.exists(p("data.raw")):
        os.unlink(p("data.raw"))
    img("convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=1024", p("c1024"), p("compressed"))
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=1024", p("bitmaps"), "1M")
    img("bitmap", "--add", "-g", "4096", p("bitmaps"), "b0")
    img("bitmap", "--add", "--disable", p("bitmaps"), "b1")
    io(p("bitmaps"), "write -P 0x44 0 8k")
    img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,lazy_refcounts=on", p("lazy"), "256k")
    io(p("lazy"), "write -P 5 0 2k")
    out = {}
    for name in sorted(os.listdir(tmp)):
        with open(p(name), "rb") as f:
            out[name] = f.read()
    # lazy refcounts left dirty (as after a crash): set the dirty bit
    lazy = bytearray(out["lazy"])
    lazy[72 + 7] |= 1
    out["lazy-dirty"] = bytes(lazy)
    return out


def write(target, seeds):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        if not f.startswith("crash-"):
            os.unlink(os.path.join(d, f))
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    print("%s: %d seeds, %d bytes" % (target, len(seeds), sum(len(v) for v in seeds.values())))


def main():
    write("fuzz_vhost_msg", vhost_msg_seeds())
    write("fuzz_vhost_vring", vring_seeds())
    if shutil.which("qemu-img") is None:
        sys.exit("qemu-img not found: the qcow2 seeds need it")
    with tempfile.TemporaryDirectory() as tmp:
        write("fuzz_qcow2_open", qcow2_seeds(tmp))


if __name__ == "__main__":
    main()
