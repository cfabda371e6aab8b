#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""contrib/bench/mqtable.py (mq.sh's tables) on a fixture of run lines, with
every subset of the backends as KINDS and both client modes: it must print a
table for each, with one column per kind, the ratio columns only where both
of their kinds ran, the 1-queue reference row whatever KINDS holds, and no
"nan" anywhere (a figure with no run behind it is "–")."""
import contextlib
import importlib.util
import io
import itertools
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "..", "..", "contrib", "bench", "mqtable.py")
ALL = ["vqcowd-1", "vqcowd-2", "qsd-7.2", "qsd-10", "alt-1", "alt-2"]
CELLS = ["read-zlib", "read-full", "write-empty"]
MODES = ["per-queue", "one"]


def fixture(kinds, modes):
    lines = []
    for rep in (1, 2):
        # the 1-queue reference runs with read-zlib whatever KINDS holds
        lines.append("%d read-zlib-1q vqcowd-1 %s 4000 150.00 0.5 0.6 1.0 2.0 fe=3.00" %
                     (rep, modes[0]))
        for c, k, m in itertools.product(CELLS, kinds, modes):
            iops = 5000 + 1000 * ALL.index(k) + 10 * rep + (7 if m == "one" else 0)
            lines.append("%d %s %s %s %d %.2f 0.%d 1.%d 10.0 20.0 fe=4.00" %
                         (rep, c, k, m, iops, 100.0 - ALL.index(k), rep, rep))
    return "\n".join(lines) + "\n"


spec = importlib.util.spec_from_file_location("mqtable", TABLE)
mqtable = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mqtable)


def run(args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = mqtable.main(["mqtable.py"] + args)
    assert rc == 0, (args, rc)
    return out.getvalue()


def check(kinds, modes, tmp):
    path = os.path.join(tmp, "results")
    with open(path, "w") as f:
        f.write(fixture(kinds, modes))
    ks = " ".join(kinds)
    for m in modes:
        out = run([path, ks, m])
        assert "nan" not in out, out
        head = [l for l in out.splitlines() if l.startswith("| cell (2 queues")][0]
        cols = [c.strip() for c in head.strip("|").split("|")]
        for k in kinds:
            assert k in cols, (kinds, head)
        for k in set(ALL) - set(kinds) - {"vqcowd-1"}:
            assert k not in cols, (kinds, head)
        # the 1-queue reference's kind gets a column of its own
        assert "vqcowd-1" in cols, (kinds, head)
        r1 = [l for l in out.splitlines() if l.startswith("| read-zlib-1q |")][0]
        assert "4000 (150.0 us)" in r1, r1
        both = "vqcowd-1" in kinds and "vqcowd-2" in kinds
        assert ("vqcowd-2 / vqcowd-1" in cols) == both, (kinds, head)
        assert ("vqcowd-2 / qsd-10" in cols) == ("vqcowd-2" in kinds and "qsd-10" in kinds)
        rows = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| cell")]
        main = [r for r in rows if r.count("|") == len(cols) + 1]
        assert [r.split("|")[1].strip() for r in main][:4] == ["read-zlib-1q"] + CELLS, out
        for r in main:
            assert r.strip().endswith("|") and r.split("|")[-2].strip() != "", r
        if "vqcowd-2" in kinds:
            assert "read-zlib vqcowd-2 (2 queues) / read-zlib-1q vqcowd-1" in out, out
        if both:
            r = [x for x in main if x.split("|")[1].strip() == "read-full"][0]
            # vqcowd-2 runs 1000 IOPS above vqcowd-1 in the fixture: 6010/5010, 6020/5020
            assert "1.20x (1.20-1.20)" in r, r
    if len(modes) == 2:
        out = run(["--modes", path, ks])
        assert "nan" not in out, out
        assert ("IOPS vqcowd-2 / vqcowd-1" in out) == ("vqcowd-1" in kinds and
                                                     "vqcowd-2" in kinds), out


def main():
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, len(ALL) + 1):
            for kinds in itertools.combinations(ALL, r):
                for modes in (["per-queue"], MODES):
                    check(list(kinds), modes, tmp)
                    n += 1
    print("mqtable: %d subsets of kinds x client modes, all tables well formed" % n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
