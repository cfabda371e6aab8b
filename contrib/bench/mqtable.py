#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The tables of contrib/bench/mq.sh, from its file of run lines.

    mqtable.py RESULTS "KINDS" MODE     the medians and ratios for one client mode
    mqtable.py --modes RESULTS "KINDS"  the client modes compared (per-queue / one)

Each line of RESULTS is one run, as mq.sh writes it:
    REP CELL KIND MODE IOPS CPU-US/IO LOAD-BEFORE LOAD-AFTER LAT-MEAN LAT-P99 fe=CLIENT-CPU-US/IO
KINDS is any subset of the backends (vqcowd-1 vqcowd-2 qsd-7.2 qsd-10 alt-1 alt-2): a ratio
column whose two kinds are not both in it is left out, and a figure with no run behind it is
shown as "–". The 1-queue reference (read-zlib-1q, vqcowd-1 only) gets its own row, and
vqcowd-1 a column for it, whatever KINDS says. tests/bench/test_mqtable.py feeds it a fixture with every subset.
"""
import collections
import statistics
import sys

DASH = "–"


def load(path, want=None):
    """{(cell, kind[, mode]): {rep: run tuple}}; want: keep only that client mode."""
    res = collections.defaultdict(dict)
    for line in open(path):
        if not line.strip():
            continue
        rep, cell, kind, mode, iops, cpu, lb, la, lat, p99, fecpu = line.split()
        run = (float(iops), float(cpu), float(lb), float(la), float(lat), float(p99),
               float(fecpu[3:]))
        if want is None:
            res[(cell, kind, mode)][rep] = run
        elif mode == want or cell == "read-zlib-1q":
            res[(cell, kind)][rep] = run
    return res


def fmt_q(q):
    if not q:
        return DASH
    return "%.2fx (%.2f-%.2f)" % (statistics.median(q), min(q), max(q))


def mode_table(path, kinds, want):
    res = load(path, want)
    cells = []
    for cell, _ in res:
        if cell not in cells:
            cells.append(cell)

    def med(cell, kind, i):
        v = res.get((cell, kind))
        return statistics.median(x[i] for x in v.values()) if v else None

    def medf(cell, kind, i):
        m = med(cell, kind, i)
        return DASH if m is None else "%.1f" % m

    def ratio(c, a, b, i=0):
        # per repetition (the runs of a and b in the same repetition), then the median
        x, y = res.get((c, a), {}), res.get((c, b), {})
        return fmt_q([x[r][i] / y[r][i] for r in x if r in y and y[r][i] > 0])

    # a column per kind, and one for the kind of the 1-queue reference (vqcowd-1) when it is
    # not in KINDS; ratio columns: (title, a, b, index), only those whose kinds both run
    cols = list(kinds)
    for _, k in res:
        if k not in cols:
            cols.append(k)
    ratios = [(t, a, b, i) for t, a, b, i in (
        ("vqcowd-2 / vqcowd-1", "vqcowd-2", "vqcowd-1", 0),
        ("vqcowd-2 / qsd-10", "vqcowd-2", "qsd-10", 0),
        ("vqcowd-2 / qsd-7.2", "vqcowd-2", "qsd-7.2", 0),
        ("CPU/IO vqcowd-2 / vqcowd-1", "vqcowd-2", "vqcowd-1", 1)) if a in kinds and b in kinds]
    print()
    print("| cell (2 queues, QD32 each, 4K) | " +
          " | ".join(cols + [t for t, _, _, _ in ratios] + ["load1"]) + " |")
    print("|---" * (len(cols) + len(ratios) + 2) + "|")
    for c in cells:
        row = ["%.0f (%.1f us)" % (med(c, k, 0), med(c, k, 1)) if (c, k) in res else DASH
               for k in cols]
        row += [ratio(c, a, b, i) for _, a, b, i in ratios]
        # the load around every run of the row (the 1-queue reference's kind may not be a column)
        loads = [x for (cc, _), v in res.items() if cc == c for r in v.values() for x in r[2:4]]
        row.append("%.1f-%.1f" % (min(loads), max(loads)) if loads else DASH)
        print("| %s | %s |" % (c, " | ".join(row)))
    if "alt-2" in kinds:
        print()
        print("| cell | alt-2 / vqcowd-2 IOPS | alt-2 / vqcowd-2 CPU/IO | CPU/IO alt-2 / alt-1 |"
              " CPU/IO vqcowd-2 / vqcowd-1 | mean lat us vqcowd-1, vqcowd-2, alt-1, alt-2 |")
        print("|---" * 6 + "|")
        for c in cells:
            print("| %s | %s | %s | %s | %s | %s |" % (
                c, ratio(c, "alt-2", "vqcowd-2"), ratio(c, "alt-2", "vqcowd-2", 1),
                ratio(c, "alt-2", "alt-1", 1), ratio(c, "vqcowd-2", "vqcowd-1", 1),
                ", ".join(medf(c, k, 4) for k in ("vqcowd-1", "vqcowd-2", "alt-1", "alt-2"))))
    z1 = res.get(("read-zlib-1q", "vqcowd-1"), {})
    z2 = res.get(("read-zlib", "vqcowd-2"), {})
    q = [z2[r][0] / z1[r][0] for r in z1 if r in z2 and z1[r][0] > 0]
    if q:
        print()
        print("read-zlib vqcowd-2 (2 queues) / read-zlib-1q vqcowd-1 (1 queue): " + fmt_q(q))
    print()
    print("IOPS median of the repetitions (backend CPU time per I/O); ratios of IOPS (and of")
    print("the CPU time per I/O) per repetition, median (range); load1: the 1-minute load average")
    print("before and after each run, range. Client: vqcow-fe bench --threads %s; its own CPU" %
          want)
    print("time per I/O, median: " + ", ".join(
        "%s %s %.2f us" % (c, k, med(c, k, 6)) for c in cells for k in cols
        if (c, k) in res) + ".")


def modes_table(path, kinds):
    res = load(path)
    cells = []
    for cell, _, _ in res:
        if cell not in cells and cell != "read-zlib-1q":
            cells.append(cell)

    def q(c, ka, ma, kb, mb, i):
        # the runs of the same repetition, then the median (range)
        x, y = res.get((c, ka, ma), {}), res.get((c, kb, mb), {})
        return [x[r][i] / y[r][i] for r in x if r in y and y[r][i] > 0]

    print("| cell | backend | IOPS per-queue / one | CPU/IO per-queue / one |"
          " client CPU/IO per-queue / one |")
    print("|---" * 5 + "|")
    for c in cells:
        for k in kinds:
            print("| %s | %s | %s | %s | %s |" % (
                c, k, fmt_q(q(c, k, "per-queue", k, "one", 0)),
                fmt_q(q(c, k, "per-queue", k, "one", 1)),
                fmt_q(q(c, k, "per-queue", k, "one", 2))))
    if "vqcowd-1" in kinds and "vqcowd-2" in kinds:
        print()
        print("| cell | IOPS vqcowd-2 / vqcowd-1, per-queue | one |"
              " CPU/IO vqcowd-2 / vqcowd-1, per-queue | one |")
        print("|---" * 5 + "|")
        for c in cells:
            print("| %s | %s | %s | %s | %s |" % (
                c, fmt_q(q(c, "vqcowd-2", "per-queue", "vqcowd-1", "per-queue", 0)),
                fmt_q(q(c, "vqcowd-2", "one", "vqcowd-1", "one", 0)),
                fmt_q(q(c, "vqcowd-2", "per-queue", "vqcowd-1", "per-queue", 1)),
                fmt_q(q(c, "vqcowd-2", "one", "vqcowd-1", "one", 1))))


def main(argv):
    if len(argv) == 4 and argv[1] == "--modes":
        modes_table(argv[2], argv[3].split())
    elif len(argv) == 4:
        mode_table(argv[1], argv[2].split(), argv[3])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
