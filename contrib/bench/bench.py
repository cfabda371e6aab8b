#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Parsing, bookkeeping and reporting for contrib/bench/run.sh (stdlib only).

Sub-commands (all called by run.sh):
  record   parse one run's output (vqcow-fe --json, or fio --output-format=json)
           and append one row to the results CSV
  report   medians over repetitions, per-pair ratios, markdown tables, the
           summary JSON, the gnuplot data and chart; optionally rewrite the
           generated section of RESULTS.md
  guest    extract the fio JSON that the in-guest job printed on the serial
           console (between BENCH-FIO-BEGIN / BENCH-FIO-END lines)
  check-map  verify from `qemu-img map --output=json` that an image is fully
           allocated with data (used to validate the "fully written" image)

Units in the CSV: iops in I/O per second, mib_s in MiB/s, latencies in
microseconds, cpu_us_per_io in microseconds of backend CPU (user+system, all
threads) per completed I/O, peak_rss_kib in KiB (VmHWM).
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys

CSV_FIELDS = [
    "rep", "image", "job", "backend", "order", "status", "ios", "runtime_s",
    "iops", "mib_s", "lat_mean_us", "lat_p50_us", "lat_p99_us", "cpu_ticks",
    "cpu_us_per_io", "peak_rss_kib", "load1", "raw",
]

MIB = 1024.0 * 1024.0

# --------------------------------------------------------------------------
# parsing


def _num(v):
    """A float from a JSON value (number or numeric string), else None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None
    return None


def _percentile(obj, pct):
    """pct of a latency object: keys like p50, 50, 50.0, 50.000000, or a
    nested 'percentile'/'percentiles' object."""
    if not isinstance(obj, dict):
        return None
    for sub in ("percentile", "percentiles", "pct"):
        if isinstance(obj.get(sub), dict):
            v = _percentile(obj[sub], pct)
            if v is not None:
                return v
    for k, v in obj.items():
        ks = str(k).lower().lstrip("p").replace("_", ".")
        try:
            if abs(float(ks) - pct) < 1e-9:
                return _num(v)
        except ValueError:
            continue
    return None


def _load_json_doc(text):
    """The last top-level JSON object in text (tools may print logs first)."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    dec = json.JSONDecoder()
    last = None
    i = 0
    while True:
        j = text.find("{", i)
        if j < 0:
            break
        try:
            obj, end = dec.raw_decode(text, j)
        except ValueError:
            i = j + 1
            continue
        if isinstance(obj, dict):
            last = obj
        i = end
    if last is None:
        raise ValueError("no JSON object found")
    return last


def parse_fe(text):
    """The output of `vqcow-fe bench ... --json` (README.md, "Frontend output"):
    runtime_s at the top level, and the "total" object's ios, iops, mib_s,
    errors and lat_us (mean, p50, p99)."""
    doc = _load_json_doc(text)
    t = doc.get("total")
    if not isinstance(t, dict) or _num(t.get("iops")) is None:
        raise ValueError("frontend output has no total.iops: %r" % (list(doc.keys()),))
    lat = t.get("lat_us") if isinstance(t.get("lat_us"), dict) else {}
    return {
        "ios": _num(t.get("ios")), "runtime_s": _num(doc.get("runtime_s")),
        "iops": _num(t.get("iops")), "mib_s": _num(t.get("mib_s")),
        "lat_mean_us": _num(lat.get("mean")), "lat_p50_us": _num(lat.get("p50")),
        "lat_p99_us": _num(lat.get("p99")),
        "errors": _num(t.get("errors")) or 0,
    }


def parse_fio(text):
    """fio --output-format=json --unified_rw_reporting=both --lat_percentiles=1:
    the 'mixed' section covers reads and writes together."""
    doc = _load_json_doc(text)
    job = doc["jobs"][0]
    if job.get("error"):
        raise ValueError("fio job error %s" % job["error"])
    m = job.get("mixed")
    if not isinstance(m, dict):
        # no unified reporting: sum directions, weighted mean latency
        parts = [job[k] for k in ("read", "write") if job.get(k, {}).get("total_ios")]
        tot = sum(p["total_ios"] for p in parts)
        m = {
            "total_ios": tot,
            "iops": sum(p["iops"] for p in parts),
            "bw_bytes": sum(p["bw_bytes"] for p in parts),
            "runtime": max(p["runtime"] for p in parts),
            "lat_ns": {"mean": sum(p["lat_ns"]["mean"] * p["total_ios"] for p in parts) / tot},
        }
    lat = m.get("lat_ns") or m.get("clat_ns") or {}
    pct = lat.get("percentile") or {}
    return {
        "ios": float(m["total_ios"]),
        "runtime_s": m["runtime"] / 1000.0,
        "iops": float(m["iops"]),
        "mib_s": m["bw_bytes"] / MIB,
        "lat_mean_us": lat["mean"] / 1000.0 if "mean" in lat else None,
        "lat_p50_us": _percentile(pct, 50.0) / 1000.0 if _percentile(pct, 50.0) is not None else None,
        "lat_p99_us": _percentile(pct, 99.0) / 1000.0 if _percentile(pct, 99.0) is not None else None,
        "errors": 0,
    }


# --------------------------------------------------------------------------
# record


def _fmt(v, nd=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return ("%." + str(nd) + "f") % v
    return str(v)


def cmd_record(a):
    row = {k: "" for k in CSV_FIELDS}
    row.update(rep=a.rep, image=a.image, job=a.job, backend=a.backend, order=a.order,
               raw=os.path.relpath(a.result, os.path.dirname(os.path.abspath(a.csv)))
               if a.result else "")
    status = a.status
    res = None
    if status == "ok":
        try:
            with open(a.result, encoding="utf-8", errors="replace") as f:
                text = f.read()
            res = parse_fe(text) if a.kind == "fe" else parse_fio(text)
            if res.get("errors"):
                status = "io-errors"
        except (OSError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            status = "parse-error"
            print("bench.py: cannot parse %s: %s" % (a.result, e), file=sys.stderr)
    row["status"] = status
    if res:
        for k in ("ios", "runtime_s", "iops", "mib_s", "lat_mean_us", "lat_p50_us", "lat_p99_us"):
            row[k] = _fmt(res[k])
    if a.cpu_ticks is not None and a.cpu_ticks >= 0:
        row["cpu_ticks"] = str(a.cpu_ticks)
        if res and res.get("ios"):
            row["cpu_us_per_io"] = _fmt(a.cpu_ticks * 1e6 / a.clk_tck / res["ios"])
    if a.hwm_kib is not None and a.hwm_kib >= 0:
        row["peak_rss_kib"] = str(a.hwm_kib)
    try:
        with open("/proc/loadavg") as f:
            row["load1"] = f.read().split()[0]
    except OSError:
        pass
    new = not os.path.exists(a.csv) or os.path.getsize(a.csv) == 0
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    shown = "%s %s %s rep%s: %s" % (a.image, a.job, a.backend, a.rep, status)
    if res:
        shown += "  %.0f IOPS  %.1f MiB/s  lat mean %s p99 %s us" % (
            res["iops"], res["mib_s"] or 0.0, _fmt(res["lat_mean_us"], 1), _fmt(res["lat_p99_us"], 1))
    if row["cpu_us_per_io"]:
        shown += "  cpu %s us/IO" % _fmt(float(row["cpu_us_per_io"]), 2)
    if row["peak_rss_kib"]:
        shown += "  rss %.1f MiB" % (int(row["peak_rss_kib"]) / 1024.0)
    print(shown)
    return 0 if status == "ok" else 1


# --------------------------------------------------------------------------
# report


def _f(row, k):
    v = row.get(k, "")
    try:
        return float(v) if v != "" else None
    except ValueError:
        return None


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


# the limit run each image is compared with (run.sh uses the same mapping)
LIMIT_FOR = {"qcow2-1t-metadata": "limit-1t"}


def _limit_name(image):
    return LIMIT_FOR.get(image, "limit")


def summarise(rows, images_order, jobs_order):
    """Medians per (image, job, backend) and per-pair ratios per cell."""
    ok = [r for r in rows if r["status"] == "ok"]
    by = {}
    for r in ok:
        by.setdefault((r["image"], r["job"], r["backend"]), []).append(r)
    metrics = ["iops", "mib_s", "lat_mean_us", "lat_p50_us", "lat_p99_us",
               "cpu_us_per_io", "peak_rss_kib"]
    med = {}
    for key, rs in by.items():
        med[key] = {m: _median([_f(r, m) for r in rs]) for m in metrics}
        med[key]["n"] = len(rs)
    failed = [r for r in rows if r["status"] != "ok"]

    def one(image, job, backend, rep):
        for r in by.get((image, job, backend), []):
            if r["rep"] == rep:
                return r
        return None

    cells = []
    seen = set()
    for r in ok:
        if r["backend"] in ("vqcowd", "qsd") and (r["image"], r["job"]) not in seen:
            seen.add((r["image"], r["job"]))
    order_i = {n: i for i, n in enumerate(images_order)}
    order_j = {n: i for i, n in enumerate(jobs_order)}
    for image, job in sorted(seen, key=lambda c: (order_i.get(c[0], 99), order_j.get(c[1], 99), c)):
        reps = sorted({r["rep"] for r in by.get((image, job, "vqcowd"), [])}, key=int)
        rq, rl, rp99, rcpu = [], [], [], []
        for rep in reps:
            v = one(image, job, "vqcowd", rep)
            q = one(image, job, "qsd", rep)
            lim = one(_limit_name(image), job, "limit", rep)
            vi = _f(v, "iops")
            if q and vi is not None and _f(q, "iops"):
                rq.append(vi / _f(q, "iops"))
                if _f(v, "lat_p99_us") is not None and _f(q, "lat_p99_us"):
                    rp99.append(_f(v, "lat_p99_us") / _f(q, "lat_p99_us"))
                if _f(v, "cpu_us_per_io") is not None and _f(q, "cpu_us_per_io"):
                    rcpu.append(_f(v, "cpu_us_per_io") / _f(q, "cpu_us_per_io"))
            if lim and vi is not None and _f(lim, "iops"):
                rl.append(vi / _f(lim, "iops"))
        cells.append({
            "image": image, "job": job,
            "iops_vs_qsd": _median(rq), "iops_vs_limit": _median(rl),
            "p99_vs_qsd": _median(rp99), "cpu_vs_qsd": _median(rcpu),
            "pairs_qsd": len(rq), "pairs_limit": len(rl),
            "iops_vs_qsd_all": rq, "iops_vs_limit_all": rl,
        })
    return med, cells, failed


def _c(v, nd=1):
    if v is None:
        return "–"
    if abs(v) >= 1000 and nd <= 1:
        return "{:,.0f}".format(v)
    return ("%." + str(nd) + "f") % v


def render_markdown(meta, med, cells, failed, images_order, jobs_order, chart_rel):
    L = []
    L.append("Run: %s, %s repetition(s) of %s s per job, images of %s in `%s` (%s)." % (
        meta.get("date", "?"), meta.get("reps", "?"), meta.get("runtime", "?"),
        meta.get("size", "?"), meta.get("image_dir", "?"), meta.get("image_fs", "?")))
    L.append("Host: %s, %s CPUs, kernel %s; load average before/after: %s / %s." % (
        meta.get("cpu", "?"), meta.get("nproc", "?"), meta.get("kernel", "?"),
        meta.get("load_before", "?"), meta.get("load_after", "?")))
    L.append("Versions: vqcow %s, %s, %s. Options: `%s`." % (
        meta.get("git", "?"), meta.get("qsd_version", "?"), meta.get("fio_version", "?"),
        meta.get("args", "")))
    if meta.get("caveat"):
        L.append("")
        L.append("**%s**" % meta["caveat"])
    if not med:
        L.append("")
        L.append("No host-side runs in this invocation.")
    if cells:
        L.append("")
        L.append("### Ratios (median over repetitions of the per-repetition ratio)")
        L.append("")
        L.append("IOPS ratio > 1: vqcowd faster. p99 and CPU/IO ratio < 1: vqcowd better.")
        L.append("")
        L.append("| image | job | IOPS vqcowd/qsd | IOPS vqcowd/limit | p99 lat vqcowd/qsd | CPU per I/O vqcowd/qsd | pairs |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for c in cells:
            L.append("| %s | %s | %s | %s | %s | %s | %d |" % (
                c["image"], c["job"], _c(c["iops_vs_qsd"], 2), _c(c["iops_vs_limit"], 2),
                _c(c["p99_vs_qsd"], 2), _c(c["cpu_vs_qsd"], 2), c["pairs_qsd"]))
    if med:
        L.append("")
        L.append("### Absolute figures (medians)")
        L.append("")
        L.append("Latency in µs as seen by the frontend (fio for the limit); CPU = backend "
                 "user+system time per I/O; RSS = backend VmHWM.")
        L.append("")
        L.append("| image | job | backend | IOPS | MiB/s | lat mean | p50 | p99 | CPU µs/IO | peak RSS MiB | n |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        oi = {n: i for i, n in enumerate(images_order)}
        oj = {n: i for i, n in enumerate(jobs_order)}
        ob = {"vqcowd": 0, "qsd": 1, "limit": 2}
        for key in sorted(med, key=lambda k: (oi.get(k[0], 98 if k[0].startswith("limit") else 97),
                                              k[0], oj.get(k[1], 99), ob.get(k[2], 9))):
            m = med[key]
            rss = m["peak_rss_kib"] / 1024.0 if m["peak_rss_kib"] is not None else None
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d |" % (
                key[0], key[1], key[2], _c(m["iops"], 0), _c(m["mib_s"], 1), _c(m["lat_mean_us"], 1),
                _c(m["lat_p50_us"], 1), _c(m["lat_p99_us"], 1), _c(m["cpu_us_per_io"], 2), _c(rss, 1),
                m["n"]))
    if meta.get("guest"):
        L.append("")
        L.append("### In-guest fio (%s)" % meta["guest"].get("note", ""))
        L.append("")
        L.append("| image | job | backend | IOPS | MiB/s | lat mean | p50 | p99 | status |")
        L.append("|---|---|---|---:|---:|---:|---:|---:|---|")
        for g in meta["guest"].get("rows", []):
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                g["image"], g["job"], g["backend"], _c(_f(g, "iops"), 0), _c(_f(g, "mib_s"), 1),
                _c(_f(g, "lat_mean_us"), 1), _c(_f(g, "lat_p50_us"), 1), _c(_f(g, "lat_p99_us"), 1),
                g["status"]))
    if failed:
        L.append("")
        L.append("### Failed runs")
        L.append("")
        for r in failed:
            L.append("- rep %s, %s, %s, %s: %s (`%s`)" % (r["rep"], r["image"], r["job"],
                                                         r["backend"], r["status"], r["raw"]))
    if chart_rel:
        L.append("")
        L.append("![IOPS ratios and CPU per I/O](%s)" % chart_rel)
    return "\n".join(L) + "\n"


def _bars(dat, series, labels, xmin):
    """A horizontal bar plot command: one row per cell (y = -row), up to three
    bars per row, each a box from xmin to the value."""
    k = len(series)
    h = 0.8 / k
    parts = []
    for idx, (col, title, colour) in enumerate(series):
        off = 0.4 - h / 2 - idx * h
        hh = h / 2 * 0.95
        parts.append('%s using %d:(-$0%+.3f):(%g):%d:(-$0%+.3f):(-$0%+.3f)%s with boxxyerror title "%s" lc rgb "%s"' % (
            '"%s"' % dat if idx == 0 else '""', col, off, xmin, col, off - hh, off + hh,
            ":ytic(1)" if idx == 0 and labels else "", title, colour))
    return "plot " + ", \\\n     ".join(parts) + "\n"


def write_chart(med, cells, outdir, title):
    """chart.png: per cell, the IOPS ratios (if any vqcowd/qsd pair exists),
    the absolute IOPS of each backend, and the backend CPU time per I/O."""
    dat = os.path.join(outdir, "chart.dat")
    g = lambda x: "NaN" if x is None else "%.4f" % x  # noqa: E731
    have_ratio = have_cpu = False
    with open(dat, "w") as f:
        f.write("# cell\tjob\tiops vqcowd/qsd\tiops vqcowd/limit\tcpu_us_per_io vqcowd\t"
                "cpu_us_per_io qsd\tkiops vqcowd\tkiops qsd\tkiops limit\n")
        for c in cells:
            m = lambda b: med.get((c["image"], c["job"], b), {})  # noqa: E731
            lim = med.get((_limit_name(c["image"]), c["job"], "limit"), {})
            k = lambda d: None if d.get("iops") is None else d["iops"] / 1000.0  # noqa: E731
            v_cpu, q_cpu = m("vqcowd").get("cpu_us_per_io"), m("qsd").get("cpu_us_per_io")
            have_ratio |= c["iops_vs_qsd"] is not None or c["iops_vs_limit"] is not None
            have_cpu |= bool(v_cpu) or bool(q_cpu)
            f.write("\t".join([c["image"] + "  " + c["job"], c["job"], g(c["iops_vs_qsd"]),
                               g(c["iops_vs_limit"]), g(v_cpu), g(q_cpu), g(k(m("vqcowd"))),
                               g(k(m("qsd"))), g(k(lim))]) + "\n")
    png = os.path.join(outdir, "chart.png")
    gp = os.path.join(outdir, "chart.gp")
    n = max(1, len(cells))
    height = 170 + 22 * n
    rs = [v for c in cells for v in (c["iops_vs_qsd"], c["iops_vs_limit"]) if v]
    lo = min(rs + [0.5])
    hi = max(rs + [2.0])
    ratio_range = (2 ** math.floor(math.log2(lo)), 2 ** math.ceil(math.log2(hi)))
    panels = []
    if have_ratio:
        panels.append(("IOPS ratio (median over repetitions; log scale)",
                       [(3, "vqcowd / qsd", "#2060c0"), (4, "vqcowd / limit (host fio)", "#909090")],
                       "ratio"))
    panels.append(("thousand IOPS (median)",
                   [(7, "vqcowd", "#2060c0"), (8, "qsd", "#c04020"), (9, "limit", "#909090")], "log"))
    if have_cpu:
        panels.append(("backend CPU time per I/O, us (median)",
                       [(5, "vqcowd", "#2060c0"), (6, "qsd", "#c04020")], "log"))
    L = []
    L.append('set terminal pngcairo size %d,%d font ",9" noenhanced' % (700 + 400 * len(panels), height))
    L.append('set output "%s"' % png)
    L.append('set datafile separator "\\t"')
    L.append('set datafile missing "NaN"')
    L.append("set multiplot layout 1,%d margins %.3f,0.98,%.3f,%.3f spacing 0.03,0" % (
        len(panels), 330.0 / (700 + 400 * len(panels)), 55.0 / height, 1 - 80.0 / height))
    L.append('set label 1 "%s" at screen 0.5, screen %.3f center font ",11"' % (
        title.replace('"', "'"), 1 - 15.0 / height))
    L.append("set style fill solid 0.8 border -1")
    L.append("set yrange [-%d+0.5:0.5]" % n)
    L.append("set grid xtics")
    L.append("set key at graph 0.5, graph 1.01 center bottom horizontal")
    for pi, (xlabel, series, kind) in enumerate(panels):
        if pi == 1:
            L.append("unset label 1")
            L.append("set ytics format \"\"")
        L.append('set xlabel "%s"' % xlabel)
        if kind == "ratio":
            # log scale, bars grow from 1: right of the line = vqcowd ahead
            L.append("set logscale x 2")
            L.append("set xrange [%g:%g]" % ratio_range)
            L.append('set arrow 1 from 1, graph 0 to 1, graph 1 nohead lw 2 dt 2 lc rgb "black"')
            xmin = 1
        else:
            L.append("set logscale x 10")
            L.append("set xrange [*:*]")
            L.append("unset arrow 1")
            xmin = 0.01
        L.append(_bars(dat, series, pi == 0, xmin))
    L.append("unset multiplot")
    with open(gp, "w") as f:
        f.write("\n".join(L) + "\n")
    if not cells:
        return None
    if not shutil.which("gnuplot"):
        print("bench.py: gnuplot not found, no chart", file=sys.stderr)
        return None
    r = subprocess.run(["gnuplot", gp], capture_output=True, text=True)
    if r.returncode != 0:
        print("bench.py: gnuplot failed: %s" % r.stderr.strip(), file=sys.stderr)
        return None
    return png


BEGIN = "<!-- BEGIN GENERATED BY contrib/bench/run.sh -->"
END = "<!-- END GENERATED BY contrib/bench/run.sh -->"


def replace_section(path, body):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    i = text.find(BEGIN)
    j = text.find(END)
    if i < 0 or j < i:
        raise ValueError("%s: markers not found" % path)
    new = text[:i + len(BEGIN)] + "\n" + body + text[j:]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def cmd_report(a):
    rows = []
    if os.path.exists(a.csv):
        with open(a.csv, newline="") as f:
            rows = list(csv.DictReader(f))
    meta = {}
    if a.meta and os.path.exists(a.meta):
        with open(a.meta) as f:
            meta = json.load(f)
    if a.guest_csv and os.path.exists(a.guest_csv):
        with open(a.guest_csv, newline="") as f:
            grows = list(csv.DictReader(f))
        if grows:
            meta["guest"] = {"rows": grows, "note": meta.get("guest_note", "")}
    images = a.images.split(",") if a.images else []
    jobs = a.jobs.split(",") if a.jobs else []
    med, cells, failed = summarise(rows, images, jobs)
    png = write_chart(med, cells, a.out, a.title)
    chart_rel = None
    if png and a.results_md and a.update:
        dst = os.path.join(os.path.dirname(a.results_md), "chart.png")
        shutil.copyfile(png, dst)
        chart_rel = "chart.png"
    elif png:
        chart_rel = os.path.relpath(png, a.out)
    md = render_markdown(meta, med, cells, failed, images, jobs, chart_rel)
    with open(os.path.join(a.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    summary = {
        "meta": meta,
        "medians": [dict(image=k[0], job=k[1], backend=k[2], **v) for k, v in med.items()],
        "ratios": cells,
        "failed": failed,
    }
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if a.results_md and a.update:
        replace_section(a.results_md, md)
        print("bench.py: updated %s" % a.results_md)
    print("bench.py: %s, %s, %s" % (os.path.join(a.out, "report.md"),
                                   os.path.join(a.out, "summary.json"), png or "no chart"))
    return 0


# --------------------------------------------------------------------------
# guest console


def cmd_guest(a):
    """Pull the fio JSON printed between markers out of a serial console log
    and append a row to the guest CSV."""
    with open(a.console, encoding="utf-8", errors="replace") as f:
        text = f.read().replace("\r", "")
    m = re.search(r"BENCH-FIO-BEGIN\n(.*?)\nBENCH-FIO-END", text, re.S)
    row = {"image": a.image, "job": a.job, "backend": a.backend, "status": "no-output",
           "iops": "", "mib_s": "", "lat_mean_us": "", "lat_p50_us": "", "lat_p99_us": ""}
    if m:
        # kernel messages may interleave with the console output: drop lines
        # that look like printk ("[   12.345678] ...")
        body = "\n".join(l for l in m.group(1).split("\n") if not re.match(r"^\[\s*\d+\.\d+\]", l))
        try:
            res = parse_fio(body)
            row["status"] = "ok"
            for k in ("iops", "mib_s", "lat_mean_us", "lat_p50_us", "lat_p99_us"):
                row[k] = _fmt(res[k])
        except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            row["status"] = "parse-error"
            print("bench.py: guest output unparsable: %s" % e, file=sys.stderr)
    fields = list(row.keys())
    new = not os.path.exists(a.csv) or os.path.getsize(a.csv) == 0
    with open(a.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerow(row)
    print("guest %s %s %s: %s %s" % (a.image, a.job, a.backend, row["status"],
                                     (row["iops"] + " IOPS") if row["iops"] else ""))
    return 0 if row["status"] == "ok" else 1


# --------------------------------------------------------------------------
# image check


def cmd_check_map(a):
    doc = json.load(sys.stdin)
    total = 0
    data = 0
    for e in doc:
        total += e["length"]
        if e.get("data") and not e.get("zero") and e.get("depth", 0) == 0:
            data += e["length"]
    if total != a.size or data != a.size:
        print("bench.py: image not fully written: %d of %d bytes are data" % (data, a.size),
              file=sys.stderr)
        return 1
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--csv", required=True)
    r.add_argument("--kind", choices=("fe", "fio"), required=True)
    r.add_argument("--result", default="")
    r.add_argument("--status", default="ok")
    r.add_argument("--rep", required=True)
    r.add_argument("--image", required=True)
    r.add_argument("--job", required=True)
    r.add_argument("--backend", required=True)
    r.add_argument("--order", default="")
    r.add_argument("--cpu-ticks", type=int, default=None)
    r.add_argument("--clk-tck", type=int, default=os.sysconf("SC_CLK_TCK"))
    r.add_argument("--hwm-kib", type=int, default=None)
    r.set_defaults(fn=cmd_record)
    s = sub.add_parser("report")
    s.add_argument("--csv", required=True)
    s.add_argument("--guest-csv", default="")
    s.add_argument("--out", required=True)
    s.add_argument("--meta", default="")
    s.add_argument("--images", default="")
    s.add_argument("--jobs", default="")
    s.add_argument("--results-md", default="")
    s.add_argument("--update", action="store_true")
    s.add_argument("--title", default="vqcowd vs qemu-storage-daemon")
    s.set_defaults(fn=cmd_report)
    g = sub.add_parser("guest")
    g.add_argument("--console", required=True)
    g.add_argument("--csv", required=True)
    g.add_argument("--image", required=True)
    g.add_argument("--job", required=True)
    g.add_argument("--backend", required=True)
    g.set_defaults(fn=cmd_guest)
    c = sub.add_parser("check-map")
    c.add_argument("--size", type=int, required=True)
    c.set_defaults(fn=cmd_check_map)
    a = p.parse_args()
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
