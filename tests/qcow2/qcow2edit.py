# SPDX-License-Identifier: MIT
"""A small, independent qcow2 reader/editor for tests: read and patch header
fields, L1/L2 entries and refcounts in place. Written from the spec
(docs/interop/qcow2.txt); deliberately simple and only used on test images.
"""

import struct

MAGIC = b"QFI\xfb"

# name: (offset, struct format)
HEADER_FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00

INCOMPAT_DIRTY = 1
INCOMPAT_CORRUPT = 2
INCOMPAT_DATA_FILE = 4
INCOMPAT_COMPRESSION = 8
INCOMPAT_EXTL2 = 16

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441


class Image:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "r+b")
        self.reload()

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def reload(self):
        h = self.pread(0, 112)
        if h[:4] != MAGIC:
            raise ValueError("not a qcow2 image")
        self.h = {}
        for name, (off, fmt) in HEADER_FIELDS.items():
            self.h[name] = struct.unpack_from(fmt, h, off)[0]
        if self.h["version"] == 2:
            self.h["refcount_order"] = 4
            self.h["header_length"] = 72
        # tolerate absurd values (malformed-image tests write them)
        self.cluster_bits = self.h["cluster_bits"] if 9 <= self.h["cluster_bits"] <= 30 else 16
        self.cluster_size = 1 << self.cluster_bits
        self.extl2 = bool(self.h["incompatible_features"] & INCOMPAT_EXTL2) if self.h["version"] >= 3 else False
        self.l2_entry_size = 16 if self.extl2 else 8
        self.l2_entries = self.cluster_size // self.l2_entry_size
        self.refcount_bits = 1 << min(self.h["refcount_order"], 6)
        self.rb_entries = self.cluster_size * 8 // self.refcount_bits

    # ---- raw access
    def pread(self, off, n):
        self.f.seek(off)
        b = self.f.read(n)
        return b + bytes(n - len(b))

    def pwrite(self, off, b):
        self.f.seek(off)
        self.f.write(b)
        self.f.flush()

    def file_size(self):
        self.f.seek(0, 2)
        return self.f.tell()

    def u64(self, off):
        return struct.unpack(">Q", self.pread(off, 8))[0]

    def put_u64(self, off, v):
        self.pwrite(off, struct.pack(">Q", v & (2**64 - 1)))

    # ---- header
    def set_field(self, name, value):
        off, fmt = HEADER_FIELDS[name]
        self.pwrite(off, struct.pack(fmt, value))
        self.reload()

    def extensions(self):
        """[(type, data_offset, length)]"""
        out = []
        off = self.h["header_length"]
        end = self.cluster_size
        while off + 8 <= end:
            t, ln = struct.unpack(">II", self.pread(off, 8))
            if t == EXT_END:
                break
            out.append((t, off + 8, ln))
            off += 8 + ((ln + 7) & ~7)
        return out

    # ---- L1/L2
    def l1_entry(self, i):
        return self.u64(self.h["l1_table_offset"] + 8 * i)

    def set_l1_entry(self, i, v):
        self.put_u64(self.h["l1_table_offset"] + 8 * i, v)

    def l2_table_offset(self, guest_off):
        idx = (guest_off >> self.cluster_bits) // self.l2_entries
        return self.l1_entry(idx) & OFFSET_MASK

    def l2_entry_addr(self, guest_off):
        l2 = self.l2_table_offset(guest_off)
        if not l2:
            return None
        return l2 + ((guest_off >> self.cluster_bits) % self.l2_entries) * self.l2_entry_size

    def l2_entry(self, guest_off):
        a = self.l2_entry_addr(guest_off)
        return None if a is None else self.u64(a)

    def set_l2_entry(self, guest_off, v):
        a = self.l2_entry_addr(guest_off)
        if a is None:
            raise ValueError("no L2 table for guest offset %d" % guest_off)
        self.put_u64(a, v)

    def host_cluster(self, guest_off):
        e = self.l2_entry(guest_off)
        if e is None or e & OFLAG_COMPRESSED:
            return None
        return (e & OFFSET_MASK) or None

    # ---- refcounts
    def refblock_offset(self, host_off):
        idx = (host_off >> self.cluster_bits) // self.rb_entries
        if idx >= self.h["refcount_table_clusters"] * self.cluster_size // 8:
            return None
        return self.u64(self.h["refcount_table_offset"] + 8 * idx) & OFFSET_MASK or None

    def _rc_loc(self, host_off):
        rb = self.refblock_offset(host_off)
        if rb is None:
            raise ValueError("no refcount block for %d" % host_off)
        i = (host_off >> self.cluster_bits) % self.rb_entries
        bitpos = i * self.refcount_bits
        return rb, bitpos

    def refcount(self, host_off):
        rb, bitpos = self._rc_loc(host_off)
        rbits = self.refcount_bits
        if rbits >= 8:
            n = rbits // 8
            return int.from_bytes(self.pread(rb + bitpos // 8, n), "big")
        byte = self.pread(rb + bitpos // 8, 1)[0]
        return (byte >> (bitpos % 8)) & ((1 << rbits) - 1)

    def set_refcount(self, host_off, v):
        rb, bitpos = self._rc_loc(host_off)
        rbits = self.refcount_bits
        if rbits >= 8:
            n = rbits // 8
            self.pwrite(rb + bitpos // 8, v.to_bytes(n, "big"))
            return
        a = rb + bitpos // 8
        byte = self.pread(a, 1)[0]
        mask = ((1 << rbits) - 1) << (bitpos % 8)
        byte = (byte & ~mask) | ((v << (bitpos % 8)) & mask)
        self.pwrite(a, bytes([byte]))

    # ---- snapshots
    def snapshots(self):
        """[(entry_offset, l1_offset, l1_size, id, name)]"""
        out = []
        off = self.h["snapshots_offset"]
        for _ in range(self.h["nb_snapshots"]):
            hdr = self.pread(off, 40)
            l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", hdr, 0)
            extra = struct.unpack_from(">I", hdr, 36)[0]
            p = off + 40 + extra
            sid = self.pread(p, id_len).decode(errors="replace")
            name = self.pread(p + id_len, name_len).decode(errors="replace")
            out.append((off, l1_off, l1_size, sid, name))
            off = (p + id_len + name_len + 7) & ~7
        return out
