#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Non-persistent dirty bitmaps (block-dirty-bitmap-add without "persistent",
QEMU's default), vqcowd against qemu-storage-daemon 7.2 (issue 11).

  * one conversation, run against both daemons on equal images (4 KiB
    clusters: the default granularity is then 4 KiB; qsd with discard=unmap
    so that its discards reach the bitmaps as ours do): adds (default and
    explicit granularity, disabled; errors: existing names of either kind,
    empty name, bad granularity), guest writes, write-zeroes and discards
    through vqcow-fe over vhost-user, disable/enable/clear/remove, listings
    (name, recording, persistent, busy, granularity, count) after each
    step: every reply and listing must be equal, so the counts prove the
    same granules were marked, and in the same order (QEMU's: newest
    first, of either kind);
  * on a backing node (after blockdev-snapshot-sync): adds of both kinds
    (persistent ones accepted on the read-only node, in memory, lost at
    exit with QEMU's warning), merges across nodes, enable/disable/clear/
    remove, errors, listings of both nodes;
  * an external snapshot of a node with persistent bitmaps (enabled and
    disabled): stored into the base as it becomes read-only, listed there
    read-only (clear/remove/merge-into refused, enable/disable in memory),
    qemu-img info/check and qemu-nbd -B of the base as qsd's; then a
    block-commit into such a base: the bitmaps in use again, recording the
    commit's and the guest's writes, stored at exit (listings but counts,
    which follow each program's copy chunks; qemu-nbd -B covers every
    guest write);
  * a backing file with persistent bitmaps opened read-only at start-up:
    listed, refused and toggled as by qsd, the file unchanged;
  * the order again with persistent bitmaps in the image at open (listed
    last, the directory's last first), a name removed and added again as
    the other kind, enable/disable/merge (which do not reorder);
  * the file is never touched by a non-persistent bitmap: after quit,
    qemu-img info lists only the persistent one, check is clean, and the
    image's bytes did not change across adding/removing non-persistent ones
    (the engine is not closed and reopened for them);
  * a raw image takes them too (default granularity 64 KiB);
  * a qcow2 image with two I/O threads: writes into allocated clusters and
    2 s of random writes are all counted (the fast-path hits are logged);
  * merge, resize (online and kill -9) as their functions say.

Usage: test_qmp_bitmap_np.py VQCOWD VQCOW-FE WORKDIR
"""

import os
import random
import shutil
import sys
import threading
import time

from bitmaplib import (QSD, M, N, both_run, check_clean, compare, have_nbd, info_bitmaps,
                       nbd_dirty, node_info, ours_run, pair_dirs, qsd_run, same_dirty, sh,
                       sorted_bitmaps, wait_unlocked)
from qmplib import SKIP, Daemon, Qmp, check, fe, log, run_main, vqcowd_session

SEQ = [
    ("block-dirty-bitmap-add", {"node": N, "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "p"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": ""}),
    ("block-dirty-bitmap-add", {"node": N, "name": "x", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "b", "granularity": 512,
                                "persistent": False}),
    ("block-dirty-bitmap-add", {"node": N, "name": "d", "granularity": 131072,
                                "disabled": True}),
    ("query", None),
    ("write", (3 * M + 4096, 4096)),
    ("write", (20 * M - 4096, 8192)),
    ("zero", (40 * M, 65536)),
    ("discard", (50 * M, 131072)),
    ("query", None),
    ("block-dirty-bitmap-disable", {"node": N, "name": "a"}),
    ("write", (30 * M, 4096)),
    ("block-dirty-bitmap-enable", {"node": N, "name": "d"}),
    ("write", (31 * M + 512, 512)),
    ("query", None),
    ("block-dirty-bitmap-clear", {"node": N, "name": "b"}),
    ("block-dirty-bitmap-enable", {"node": N, "name": "a"}),
    ("write", (60 * M - 512, 512)),
    ("query", None),
    ("block-dirty-bitmap-remove", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-remove", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-clear", {"node": N, "name": "a"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "a"}),
    ("write", (5 * M, 4096)),
    ("query", None),
    # block-dirty-bitmap-merge: errors first (the QAPI shape, node, target, sources)
    ("block-dirty-bitmap-merge", {"node": N, "target": "nope", "bitmaps": ["a"]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d", "bitmaps": ["nope"]}),
    ("block-dirty-bitmap-merge", {"node": "nope", "target": "d", "bitmaps": ["a"]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d", "bitmaps": [5]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d", "bitmaps": [{"node": N}]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d", "bitmaps": [{"name": "a"}]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d",
                                  "bitmaps": [{"node": N, "name": "a", "x": 1}]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d",
                                  "bitmaps": [{"node": "nope", "name": "a"}]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d", "bitmaps": "a"}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d"}),
    # non-persistent into non-persistent (a disabled target; granularities differ)
    ("block-dirty-bitmap-disable", {"node": N, "name": "d"}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "d",
                                  "bitmaps": ["a", {"node": N, "name": "b"}]}),
    ("query", None),
    # persistent (enabled) into non-persistent
    ("block-dirty-bitmap-merge", {"node": N, "target": "a", "bitmaps": ["p"]}),
    # into a disabled persistent bitmap (rewritten in the file) and an enabled one
    ("block-dirty-bitmap-add", {"node": N, "name": "pd", "persistent": True,
                                "granularity": 65536, "disabled": True}),
    ("write", (7 * M, 512)),
    ("block-dirty-bitmap-merge", {"node": N, "target": "pd", "bitmaps": ["b", "d"]}),
    ("block-dirty-bitmap-add", {"node": N, "name": "c", "granularity": 1048576}),
    ("write", (45 * M + 4096, 4096)),
    ("block-dirty-bitmap-merge", {"node": N, "target": "p", "bitmaps": ["c"]}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "pd", "bitmaps": ["pd", "p"]}),
    ("query", None),
]


SEQR = [
    ("block-dirty-bitmap-add", {"node": N, "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": "n", "granularity": 65536}),
    ("write", (3 * M, 4096)),
    ("write", (64 * M - 512, 512)),
    ("block-dirty-bitmap-disable", {"node": N, "name": "pd"}),
    ("query", None),
    ("block_resize", {"node-name": N, "size": 100 * M + 512}),
    ("query", None),
    ("write", (64 * M, 4096)),
    ("write", (100 * M, 512)),
    ("block-dirty-bitmap-merge", {"node": N, "target": "pd", "bitmaps": ["n"]}),
    ("block_resize", {"node-name": N, "size": 160 * M}),
    ("write", (150 * M, 4096)),
    ("query", None),
]


def test_vs_qsd(vqcowd, fe_bin, work):
    dirs = pair_dirs(work, "sq-", "-o", "cluster_size=4096", 64 * M)
    a, b = (os.path.join(dirs[who], "b.qcow2") for who in ("qsd", "ours"))
    want, got, _ = both_run(vqcowd, fe_bin, dirs, "seq", SEQ)
    compare(want, got, SEQ)
    last = got[-1][1]
    log("ok: %d replies and listings as qemu-storage-daemon's (final: %r)" %
        (len(got), [(x["name"], x["count"]) for x in last]))
    # QEMU's limit of a bitmap's name, 1023 bytes, persistent or not (the
    # error names the bitmap: compared up to our 512-byte error text)
    seq = [("block-dirty-bitmap-add", {"node": N, "name": "n" * 1024}),
           ("block-dirty-bitmap-add", {"node": N, "name": "n" * 1024, "persistent": True}),
           ("block-dirty-bitmap-add", {"node": N, "name": "m" * 1023}),
           ("block-dirty-bitmap-remove", {"node": N, "name": "m" * 1023})]
    ldirs = pair_dirs(work, "sl-", "-o", "cluster_size=4096", 64 * M)
    want, got, _ = both_run(vqcowd, fe_bin, ldirs, "long", seq)
    check(len(want) == len(got) == len(seq), "long names: %r %r" % (want, got))
    for (cmd, w), (_, g), (_, args) in zip(want, got, seq):
        if isinstance(w, dict) and "desc" in w:
            gd = g.get("desc", "") if isinstance(g, dict) else ""
            check(len(gd) > 400 and w["desc"].startswith(gd) and
                  (args.get("persistent") or
                   gd.startswith("Bitmap name too long: " + "n" * 400)),
                  "%s %.40r: qsd %.80r, vqcowd %.80r" % (cmd, args, w, g))
        else:
            check(g == w, "%s %.40r: qsd %.80r, vqcowd %.80r" % (cmd, args, w, g))
    log("ok: a bitmap name of 1024 bytes refused, of 1023 taken, as by qsd")
    ia, ib = sorted_bitmaps(a), sorted_bitmaps(b)
    check(ia == ib == [{"flags": ["auto"], "name": "p", "granularity": 4096},
                       {"flags": [], "name": "pd", "granularity": 65536}],
          "qemu-img info bitmaps: qsd %r, vqcowd %r" % (ia, ib))
    check_clean(b, "after the sequence")
    log("ok: only the persistent bitmaps reached the files; check clean")
    if not have_nbd():
        log("SKIP part: nbdinfo or qemu-nbd not installed, merged bits not read back")
        return
    for name in ("p", "pd"):
        ra = same_dirty(work, a, b, name, "")
        log("ok: qemu-nbd -B %s reads the same %d dirty ranges in both files" %
            (name, len(ra)))


# QEMU lists a node's bitmaps newest first, persistent or not, the ones
# found in the image at open last (the directory's last first)
SEQO = [
    ("query", None),
    ("block-dirty-bitmap-add", {"node": N, "name": "n"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "q", "persistent": True}),
    ("query", None),
    ("block-dirty-bitmap-add", {"node": N, "name": "m", "disabled": True}),
    ("block-dirty-bitmap-add", {"node": N, "name": "r", "persistent": True,
                                "disabled": True}),
    ("write", (M, 4096)),
    ("query", None),
    ("block-dirty-bitmap-remove", {"node": N, "name": "n"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "n", "persistent": True}),
    ("block-dirty-bitmap-remove", {"node": N, "name": "x1"}),
    ("block-dirty-bitmap-add", {"node": N, "name": "x1"}),
    ("block-dirty-bitmap-disable", {"node": N, "name": "x2"}),
    ("block-dirty-bitmap-merge", {"node": N, "target": "m", "bitmaps": ["x2"]}),
    ("query", None),
]


def test_order_vs_qsd(vqcowd, fe_bin, work):
    """The listing order of both kinds, with bitmaps in the image at open."""
    dirs = pair_dirs(work, "or-", 64 * M)
    for dd in dirs.values():
        for x in ("x1", "x3", "x2"):
            sh("qemu-img", "bitmap", "--add", os.path.join(dd, "b.qcow2"), x)
    want, got, _ = both_run(vqcowd, fe_bin, dirs, "order", SEQO)
    compare(want, got, SEQO)
    log("ok: bitmaps listed in qemu-storage-daemon's order: %s" %
        " / ".join(",".join(x["name"] for x in g) for c, g in got if c == "query"))


# Bitmaps on a backing node (QEMU takes any node's name): after
# blockdev-snapshot-sync the old active layer "disk0" is a read-only backing
# node under "top". QEMU 7.2 accepts non-persistent bitmaps there, and
# persistent ones too, kept in memory only (lost when the node closes);
# merges may take sources from other nodes.
B = "disk0"
SEQB = [
    ("block-dirty-bitmap-add", {"node": B, "name": "n0"}),
    ("write", (M, 4096)),
    ("blockdev-snapshot-sync", {"node-name": B, "snapshot-file": "@TOP@",
                                "snapshot-node-name": "top", "format": "qcow2"}),
    ("query", ["top", B]),
    ("block-dirty-bitmap-add", {"node": B, "name": "n1", "granularity": 4096}),
    ("block-dirty-bitmap-add", {"node": B, "name": "p1", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": B, "name": "p2", "persistent": True,
                                "disabled": True}),
    ("block-dirty-bitmap-add", {"node": B, "name": "n0"}),
    ("block-dirty-bitmap-add", {"node": "top", "name": "tn"}),
    ("block-dirty-bitmap-add", {"node": "top", "name": "tp", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "nope", "name": "x"}),
    ("write", (3 * M, 4096)),
    ("query", ["top", B]),
    ("block-dirty-bitmap-merge", {"node": B, "target": "n1", "bitmaps": ["n0"]}),
    ("block-dirty-bitmap-merge", {"node": "top", "target": "tn",
                                  "bitmaps": [{"node": B, "name": "n0"}, "tp"]}),
    ("block-dirty-bitmap-merge", {"node": "top", "target": "tp",
                                  "bitmaps": [{"node": B, "name": "n1"}]}),
    ("block-dirty-bitmap-merge", {"node": B, "target": "p1",
                                  "bitmaps": [{"node": "top", "name": "tn"}]}),
    ("block-dirty-bitmap-merge", {"node": B, "target": "nope", "bitmaps": ["n0"]}),
    ("block-dirty-bitmap-merge", {"node": B, "target": "n1",
                                  "bitmaps": [{"node": "nope", "name": "tn"}]}),
    ("block-dirty-bitmap-merge", {"node": B, "target": "n1",
                                  "bitmaps": [{"node": "top", "name": "nope"}]}),
    ("query", ["top", B]),
    ("block-dirty-bitmap-disable", {"node": B, "name": "p1"}),
    ("block-dirty-bitmap-enable", {"node": B, "name": "p2"}),
    ("block-dirty-bitmap-clear", {"node": B, "name": "n0"}),
    ("block-dirty-bitmap-disable", {"node": B, "name": "n1"}),
    ("query", ["top", B]),
    ("block-dirty-bitmap-remove", {"node": B, "name": "n1"}),
    ("block-dirty-bitmap-remove", {"node": B, "name": "p2"}),
    ("block-dirty-bitmap-remove", {"node": B, "name": "nope"}),
    ("block-dirty-bitmap-clear", {"node": B, "name": "nope"}),
    ("write", (5 * M, 4096)),
    ("query", ["top", B]),
]


def test_backing_vs_qsd(vqcowd, fe_bin, work):
    """Bitmap commands on a backing node, against qsd 7.2."""
    dirs = pair_dirs(work, "bk-", 64 * M)
    want, got, d = both_run(vqcowd, fe_bin, dirs, "bk", SEQB)
    compare(want, got, SEQB)
    check("Lost persistent bitmaps" in d.log() and "'p1'" in d.log(),
          "no warning about the lost bitmap p1 in the log:\n%s" % d.log()[-2000:])
    for who in ("qsd", "ours"):
        bb = info_bitmaps(os.path.join(dirs[who], "b.qcow2"))
        tb = info_bitmaps(os.path.join(dirs[who], "t.qcow2"))
        check(not bb and [x["name"] for x in tb or []] == ["tp"],
              "%s: bitmaps in the files: base %r, top %r" % (who, bb, tb))
    log("ok: %d bitmap commands and listings on a backing node as qemu-storage-daemon's; "
        "the read-only node's persistent bitmap p1 lost at exit as there (final: %r)" %
        (len(got), got[-1][1]))


# An external snapshot of a node with persistent bitmaps (incremental backup:
# snapshot, then read the base's bitmap). QEMU 7.2 stores the enabled ones
# into the file when the node becomes read-only and keeps all of them listed
# there, read-only: clear, remove and merge into them are refused ("is
# readonly"), enable/disable change only the listing; nothing more reaches
# the file.
SEQS = [
    ("block-dirty-bitmap-add", {"node": B, "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": B, "name": "pd", "persistent": True,
                                "disabled": True}),
    ("write", (M, 4096)),
    ("write", (9 * M + 512, 8192)),
    ("blockdev-snapshot-sync", {"node-name": B, "snapshot-file": "@TOP@",
                                "snapshot-node-name": "top", "format": "qcow2"}),
    ("query", ["top", B]),
    ("write", (3 * M, 4096)),
    ("query", ["top", B]),
    ("block-dirty-bitmap-clear", {"node": B, "name": "p"}),
    ("block-dirty-bitmap-remove", {"node": B, "name": "p"}),
    ("block-dirty-bitmap-add", {"node": B, "name": "n"}),
    ("block-dirty-bitmap-merge", {"node": B, "target": "p", "bitmaps": ["n"]}),
    ("block-dirty-bitmap-merge", {"node": B, "target": "n", "bitmaps": ["p"]}),
    ("block-dirty-bitmap-merge", {"node": "top", "target": "n",
                                  "bitmaps": [{"node": B, "name": "pd"}]}),
    ("block-dirty-bitmap-disable", {"node": B, "name": "p"}),
    ("block-dirty-bitmap-enable", {"node": B, "name": "pd"}),
    ("block-dirty-bitmap-clear", {"node": B, "name": "pd"}),
    ("block-dirty-bitmap-remove", {"node": B, "name": "pd"}),
    ("write", (5 * M, 4096)),
    ("query", ["top", B]),
]


def test_snapshot_vs_qsd(vqcowd, fe_bin, work):
    """blockdev-snapshot-sync of a node with persistent bitmaps, against qsd 7.2."""
    dirs = pair_dirs(work, "sn-", "-o", "cluster_size=4096", 64 * M)
    want, got, _ = both_run(vqcowd, fe_bin, dirs, "sn", SEQS)
    compare(want, got, SEQS)
    for who in ("qsd", "ours"):
        bb = sorted_bitmaps(os.path.join(dirs[who], "b.qcow2"))
        tb = info_bitmaps(os.path.join(dirs[who], "t.qcow2"))
        check(bb == [{"flags": ["auto"], "name": "p", "granularity": 4096},
                     {"flags": [], "name": "pd", "granularity": 4096}] and not tb,
              "%s: bitmaps in the files: base %r, top %r" % (who, bb, tb))
        for f in ("b.qcow2", "t.qcow2"):
            check_clean(os.path.join(dirs[who], f), "%s: %s" % (who, f))
    log("ok: snapshot of a node with persistent bitmaps as qemu-storage-daemon's: %d replies "
        "and listings equal (final: %r); stored in the base (p auto, pd disabled), not in "
        "use; both files check clean" % (len(got), got[-1][1]))
    if not have_nbd():
        log("SKIP part: nbdinfo or qemu-nbd not installed, stored bits not read back")
        return
    ra = same_dirty(work, os.path.join(dirs["qsd"], "b.qcow2"),
                    os.path.join(dirs["ours"], "b.qcow2"), "p", "bases: ")
    log("ok: qemu-nbd -B p reads the same %d dirty ranges in both bases" % len(ra))


# block-commit into a base whose bitmaps an external snapshot stored: QEMU
# 7.2 reopens it read-write, marks them in use again and records the
# commit's writes and the guest's after the pivot; stored at exit. The
# counts depend on each program's copy chunks (QEMU's follow the top's
# 64 KiB clusters), so the check is the names and flags, and that the
# bitmap read back by qemu-nbd -B covers every range the guest wrote.
SEQC = [
    ("block-dirty-bitmap-add", {"node": B, "name": "p", "persistent": True}),
    ("write", (M, 4096)),
    ("blockdev-snapshot-sync", {"node-name": B, "snapshot-file": "@TOP@",
                                "snapshot-node-name": "top", "format": "qcow2"}),
    ("write", (3 * M, 4096)),
    ("block-commit", {"job-id": "j", "device": "top"}),
    ("write", (5 * M, 4096)),
    ("ready", None),
    ("block-job-complete", {"device": "j"}),
    ("gone", None),
    ("write", (7 * M, 4096)),
    ("query", [B]),
]


def test_commit_thaw_vs_qsd(vqcowd, fe_bin, work):
    """block-commit into a base holding the bitmaps a snapshot stored."""
    # the job polled the same way in both ("ready", "gone" in run_seq)
    dirs = pair_dirs(work, "ct-", "-o", "cluster_size=4096", 64 * M)
    outs = {}
    outs["qsd"], outs["ours"], _ = both_run(vqcowd, fe_bin, dirs, "ct", SEQC)
    def no_counts(out):
        return [(c, [(n, [{k: v for k, v in b.items() if k != "count"} for b in bl or []])
                     for n, bl in r] if c == "query" else r) for c, r in out]
    check(no_counts(outs["ours"]) == no_counts(outs["qsd"]), "commit into a base with stored bitmaps:\n  qsd    %r\n  vqcowd %r"
          % (outs["qsd"], outs["ours"]))
    for who in ("qsd", "ours"):
        bb = info_bitmaps(os.path.join(dirs[who], "b.qcow2"))
        check(bb == [{"flags": ["auto"], "name": "p", "granularity": 4096}],
              "%s: base bitmaps after the commit %r" % (who, bb))
        check_clean(os.path.join(dirs[who], "b.qcow2"), who)
    log("ok: block-commit into a base with stored bitmaps as qemu-storage-daemon's "
        "(replies, listings but counts; qsd %r, ours %r); base stored, check clean" %
        (outs["qsd"][-1][1], outs["ours"][-1][1]))
    if not have_nbd():
        log("SKIP part: nbdinfo or qemu-nbd not installed, stored bits not read back")
        return
    for who in ("qsd", "ours"):
        rr = nbd_dirty(work, os.path.join(dirs[who], "b.qcow2"), "p")
        for off in (M, 3 * M, 5 * M, 7 * M):
            check(any(a <= off and off + 4096 <= a + n for a, n in rr),
                  "%s: qemu-nbd -B p misses the write at %d: %r" % (who, off, rr))
    log("ok: qemu-nbd -B p of both bases covers all four guest writes")


# Bitmaps stored in a backing file opened read-only at start-up: QEMU 7.2
# lists them on the backing node (an enabled one as recording), refuses
# clear/remove/merge-into ("is readonly"), takes enable/disable in memory
# and merges from them; the file is never written.
BK = "disk0-backing1"
SEQRO = [
    ("query", ["disk0", BK]),
    ("block-dirty-bitmap-clear", {"node": BK, "name": "p"}),
    ("block-dirty-bitmap-remove", {"node": BK, "name": "pd"}),
    ("block-dirty-bitmap-add", {"node": BK, "name": "n"}),
    ("block-dirty-bitmap-merge", {"node": BK, "target": "p", "bitmaps": ["n"]}),
    ("block-dirty-bitmap-merge", {"node": BK, "target": "n", "bitmaps": ["p"]}),
    ("block-dirty-bitmap-disable", {"node": BK, "name": "p"}),
    ("block-dirty-bitmap-enable", {"node": BK, "name": "pd"}),
    ("write", (5 * M, 4096)),
    ("query", ["disk0", BK]),
]


def test_ro_open_vs_qsd(vqcowd, fe_bin, work):
    """Persistent bitmaps of a backing file opened read-only, against qsd 7.2."""
    dirs = pair_dirs(work, "ro-", "-o", "cluster_size=4096", 64 * M)
    files = {}
    for who, dd in dirs.items():
        b, t = os.path.join(dd, "b.qcow2"), os.path.join(dd, "t.qcow2")
        sh("qemu-img", "bitmap", "--add", b, "p")
        sh("qemu-io", "-c", "write 1M 8k", "-c", "write 9M 512", b)
        sh("qemu-img", "bitmap", "--add", "--disable", b, "pd")
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t)
        files[who] = (dd, b, t, open(b, "rb").read())
    dd, b, t, _ = files["qsd"]
    want = qsd_run(dd, None, fe_bin, SEQRO, blockdevs=[
        "driver=qcow2,node-name=%s,read-only=on,file.driver=file,file.filename=%s" % (BK, b),
        "driver=qcow2,node-name=%s,backing=%s,file.driver=file,file.filename=%s" % (N, BK, t)])
    dd, b, t, before = files["ours"]
    got, _ = ours_run(vqcowd, dd, t, "ro", fe_bin, SEQRO)
    compare(want, got, SEQRO)
    check(open(b, "rb").read() == before, "the read-only backing file changed")
    for who in ("qsd", "ours"):
        bb = sorted_bitmaps(files[who][1])
        check(bb == [{"flags": ["auto"], "name": "p", "granularity": 4096},
                     {"flags": [], "name": "pd", "granularity": 4096}],
              "%s: bitmaps in the backing file %r" % (who, bb))
    log("ok: bitmaps of a read-only backing file listed and refused as qemu-storage-daemon's "
        "(%d replies and listings; final %r); the file unchanged" % (len(got), got[-1][1]))


def test_no_file_change(vqcowd, work):
    img = os.path.join(work, "still.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 16 * M)
    with vqcowd_session(vqcowd, work, img, "still") as (d, q):
        q.ret("query-named-block-nodes")
        before = open(img, "rb").read()
        mtime = os.stat(img).st_mtime_ns
        for i in range(20):
            q.ret("block-dirty-bitmap-add", {"node": N, "name": "t%d" % i})
            q.ret("block-dirty-bitmap-disable", {"node": N, "name": "t%d" % i})
            q.ret("block-dirty-bitmap-clear", {"node": N, "name": "t%d" % i})
        for i in range(20):
            q.ret("block-dirty-bitmap-remove", {"node": N, "name": "t%d" % i})
        check(open(img, "rb").read() == before and os.stat(img).st_mtime_ns == mtime,
              "the image changed while adding/removing non-persistent bitmaps")
        check("reopen" not in d.log() and "holding requests" not in d.log(),
              "non-persistent bitmap commands held requests or reopened the engine:\n" +
              d.log())
    check(info_bitmaps(img) is None, "bitmaps in the file: %r" % info_bitmaps(img))
    log("ok: 80 non-persistent bitmap commands left the image's bytes untouched")


def test_resize(vqcowd, fe_bin, work):
    """block_resize with persistent (enabled, disabled) and non-persistent bitmaps."""
    dirs = pair_dirs(work, "rs-", 64 * M)
    a, b = (os.path.join(dirs[who], "b.qcow2") for who in ("qsd", "ours"))
    for f in (a, b):
        sh("qemu-img", "bitmap", "--add", "-g", "128K", f, "pd")
        sh("qemu-io", "-c", "write 1M 4K", f)
    want, got, _ = both_run(vqcowd, fe_bin, dirs, "rseq", SEQR)
    compare(want, got, SEQR)
    log("ok: block_resize with bitmaps: %d replies and listings as qemu-storage-daemon's "
        "(final %r)" % (len(got), [(x["name"], x["count"]) for x in got[-1][1]]))
    ia, ib = sorted_bitmaps(a), sorted_bitmaps(b)
    check(ia == ib and ia, "qemu-img info bitmaps: qsd %r, vqcowd %r" % (ia, ib))
    check_clean(b, "after the resizes")
    if have_nbd():
        for name in ("p", "pd"):
            rb = same_dirty(work, a, b, name, "")
        log("ok: after the resizes qemu-nbd -B reads the same dirty ranges of p and pd "
            "from both files (%r)" % rb)
    else:
        log("SKIP part: nbdinfo or qemu-nbd not installed")


def wait_more(counter, start, timeout=20):
    """Until COUNTER[0] moved past START (slow builds: ASan), at most TIMEOUT s."""
    t = time.monotonic() + timeout
    while counter[0] <= start and time.monotonic() < t:
        time.sleep(0.01)


def kill_rounds(vqcowd, work, img, name, rounds, seed, counter, churn, after):
    """ROUNDS times: vqcowd on IMG, CHURN(d, stop, r) on a thread until STOP
    is set, counting in COUNTER[0]; once it moved, kill -9 at a random moment
    within 0.3 s; qemu-img check then finds no corruption (leaks at most) and
    AFTER(r) checks the file."""
    rng = random.Random(seed)
    for r in range(rounds):
        d = Daemon(vqcowd, work, img, "%s%d" % (name, r))
        stop = []
        t = threading.Thread(target=churn, args=(d, stop, r))
        start = counter[0]
        t.start()
        wait_more(counter, start)
        time.sleep(rng.uniform(0, 0.3))
        d.kill()
        stop.append(1)
        t.join(10)
        wait_unlocked(img)
        check_clean(img, "kill -9 round %d" % r, leaks_ok=True)
        after(r)


def test_resize_kill(vqcowd, fe_bin, work, rounds=5):
    """kill -9 while block_resize grows an image with persistent bitmaps under writes."""
    img = os.path.join(work, "rk.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 16 * M)
    sh("qemu-img", "bitmap", "--add", img, "p")
    sh("qemu-img", "bitmap", "--add", "--disable", img, "pd")
    grows = [0]

    def churn(d, stop, r):
        try:
            q = Qmp(d.qsock)
            size = node_info(q)["image"]["virtual-size"]
            while not stop:
                fe(fe_bin, "write", d.vsock, size - 4096, 4096, stdin=bytes(4096))
                size += M
                if "return" in q.cmd("block_resize", {"node-name": N, "size": size}):
                    grows[0] += 1
        except Exception:
            pass

    def after(r):
        names = sorted(x["name"] for x in info_bitmaps(img))
        check(names == ["p", "pd"], "round %d: bitmaps %r" % (r, info_bitmaps(img)))
        # in use (inconsistent) after a kill, as QEMU leaves them: drop and re-add
        # them offline so that the next round grows consistent ones again
        for n in names:
            sh("qemu-img", "bitmap", "--remove", img, n)
        sh("qemu-img", "bitmap", "--add", img, "p")
        sh("qemu-img", "bitmap", "--add", "--disable", img, "pd")
    kill_rounds(vqcowd, work, img, "rk", rounds, 5, grows, churn, after)
    check(grows[0] >= rounds, "only %d grows before the kills" % grows[0])
    with vqcowd_session(vqcowd, work, img, "rkafter") as (d, q):
        size = node_info(q)["image"]["virtual-size"]
        q.ret("block_resize", {"node-name": N, "size": size + M})
    check_clean(img, "after", leaks_ok=True)
    bms = sorted(info_bitmaps(img), key=lambda x: x["name"])
    check([(x["name"], x["flags"]) for x in bms] == [("p", ["auto"]), ("pd", [])],
          "after a clean exit: %r" % bms)
    if shutil.which("nbdinfo"):
        nbd_dirty(work, img, "pd")  # readable (qemu-nbd refuses a bitmap of the wrong size)
    log("ok: %d kill -9 rounds during %d grows with bitmaps: check never finds corruption, "
        "both bitmaps listed; a clean grow leaves them consistent and readable" %
        (rounds, grows[0]))


def test_merge_kill(vqcowd, fe_bin, work, rounds=5):
    """kill -9 while merges rewrite a disabled persistent bitmap in the file."""
    img = os.path.join(work, "mk.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 32 * M)
    sh("qemu-img", "bitmap", "--add", "--disable", "-g", "64K", img, "pd")
    merges = [0]

    def churn(d, stop, r):
        try:
            q = Qmp(d.qsock)
            q.cmd("block-dirty-bitmap-add", {"node": N, "name": "n"})
            i = 0
            while not stop:
                fe(fe_bin, "write", d.vsock, (i % 30) * M + r * 65536, 4096,
                   stdin=bytes(4096))
                if "return" in q.cmd("block-dirty-bitmap-merge",
                                     {"node": N, "target": "pd", "bitmaps": ["n"]}):
                    merges[0] += 1
                i += 1
        except Exception:
            pass

    def after(r):
        bms = info_bitmaps(img)
        check(bms == [{"flags": [], "name": "pd", "granularity": 65536}],
              "round %d: bitmaps %r" % (r, bms))
    kill_rounds(vqcowd, work, img, "mk", rounds, 7, merges, churn, after)
    check(merges[0] >= rounds, "only %d merges before the kills" % merges[0])
    dirty = nbd_dirty(work, img, "pd") if shutil.which("nbdinfo") else None
    check(dirty is None or dirty, "no dirty range read back from 'pd'")
    log("ok: %d kill -9 rounds during %d merges into a disabled persistent bitmap: "
        "check never finds corruption, 'pd' stays consistent (%s dirty ranges)" %
        (rounds, merges[0], "?" if dirty is None else len(dirty)))
    with vqcowd_session(vqcowd, work, img, "mkafter") as (d, q):
        r = q.cmd("block-dirty-bitmap-merge", {"node": N, "target": "pd", "bitmaps": []})
        check(r.get("return") == {}, "an empty merge: %r" % r)
    log("ok: merging an empty list returns {} (qemu-storage-daemon 7.2 dies on it)")


def test_fast_path(vqcowd, fe_bin, work):
    """Writes the queue threads serve without the engine (allocated clusters)
    still reach a non-persistent bitmap: img_writev marks it on any thread."""
    img = os.path.join(work, "fp.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, 16 * M)
    sh("qemu-io", "-c", "write 0 8M", img)
    with vqcowd_session(vqcowd, work, img, "fp",
                        extra=["--io-threads", "2", "--num-queues", "2"]) as (d, q):
        q.ret("block-dirty-bitmap-add", {"node": N, "name": "f"})
        # on queue 1, the I/O thread's (queue 0 is the main thread's)
        for i in range(8):
            fe(fe_bin, "--queues", 2, "--queue", 1, "write", d.vsock, i * M + 4096, 4096,
               stdin=os.urandom(4096))
        n = node_info(q)
        bms = n["dirty-bitmaps"]
        check([(b["name"], b["count"]) for b in bms] == [("f", 8 * 65536)],
              "listing %r" % bms)
        # then many random writes over the first 8 MiB from two queues: every
        # 64 KiB granule of it dirty, whichever thread served the write
        q.ret("block-dirty-bitmap-clear", {"node": N, "name": "f"})
        fe(fe_bin, "bench", d.vsock, "--rw", "randwrite", "--bs", "4k", "--iodepth", "8",
           "--numjobs", "2", "--size", "8M", "--runtime", "2")
        n = node_info(q)
        bms = n["dirty-bitmaps"]
        st = q.ret("query-blockstats")[0]
        hits = st.get("vqcowd", {}).get("qcow2", {}).get("fast-path-hits")
        check([(b["name"], b["count"]) for b in bms] == [("f", 8 * M)], "after bench %r" % bms)
        check(hits, "no write served on the I/O thread: %r" % st.get("vqcowd"))
    log("ok: 8 writes into allocated clusters, then 2 s of random writes, with 2 I/O threads "
        "(fast-path hits %s): the non-persistent bitmap counts every granule" % hits)


def test_raw(vqcowd, fe_bin, work):
    img = os.path.join(work, "r.raw")
    sh("qemu-img", "create", "-q", "-f", "raw", img, 16 * M)
    with vqcowd_session(vqcowd, work, img, "raw",
                        extra=["--io-threads", "2", "--num-queues", "2"]) as (d, q):
        q.ret("block-dirty-bitmap-add", {"node": N, "name": "r"})
        fe(fe_bin, "write", d.vsock, M + 512, 512, stdin=os.urandom(512))
        fe(fe_bin, "write", d.vsock, 15 * M, M, stdin=os.urandom(M))
        bms = node_info(q)["dirty-bitmaps"]
        check(bms == [{"name": "r", "recording": True, "persistent": False, "busy": False,
                       "granularity": 65536, "count": 65536 + M}], "raw listing %r" % bms)
        e = q.cmd("block-dirty-bitmap-add", {"node": N, "name": "rp", "persistent": True})
        check("error" in e, "persistent on raw: %r" % e)
    log("ok: raw image: a non-persistent bitmap (64 KiB) counts the written granules")


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    vqcowd, fe_bin, work = sys.argv[1:]
    if not QSD or not shutil.which("qemu-img"):
        log("SKIP: qemu-storage-daemon or qemu-img not installed")
        return SKIP
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    test_vs_qsd(vqcowd, fe_bin, work)
    test_order_vs_qsd(vqcowd, fe_bin, work)
    test_backing_vs_qsd(vqcowd, fe_bin, work)
    test_snapshot_vs_qsd(vqcowd, fe_bin, work)
    test_commit_thaw_vs_qsd(vqcowd, fe_bin, work)
    test_ro_open_vs_qsd(vqcowd, fe_bin, work)
    test_no_file_change(vqcowd, work)
    test_raw(vqcowd, fe_bin, work)
    test_fast_path(vqcowd, fe_bin, work)
    test_merge_kill(vqcowd, fe_bin, work)
    test_resize(vqcowd, fe_bin, work)
    test_resize_kill(vqcowd, fe_bin, work)
    log("PASS")
    return 0


if __name__ == "__main__":
    run_main(main)
