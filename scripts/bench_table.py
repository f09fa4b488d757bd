#!/usr/bin/env python3
"""Turns the bench tool's JSON reports (NAME-MODE-N-RUN.json) into the measured part of
BENCHMARKS.md: medians over the runs, Handoff and Nchan side by side with their ratio (the median
of the per-run ratios, each taken in the same run), the peers for context, and the targets.
Only the text between the bench markers is replaced; the hand-written rest of the file stays."""

import argparse
import glob
import json
import os
import re
import statistics
import sys
from collections import defaultdict

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(folder):
    runs = defaultdict(dict)  # (name, mode, n) -> {rep: report}
    for path in glob.glob(os.path.join(folder, "*.json")):
        m = re.fullmatch(r"(.+)-(distinct|single)-(\d+)-(\d+)\.json", os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            runs[(m[1], m[2], int(m[3]))][int(m[4])] = json.load(f)
    return runs


def figure(report, key):
    """One figure of one run; None when the run could not measure it."""
    value = report
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    if value is None:
        return "–"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


# (column title, JSON key, digits, better: "low" or "high")
FIGURES = [
    ("open all streams, s", "connect_secs", 3, "low"),
    ("connects/s", "connects_per_sec", 0, "high"),
    ("bytes/stream", "bytes_per_stream", 0, "low"),
    ("latency p50, ms", "latency_ms.p50", 3, "low"),
    ("latency p99, ms", "latency_ms.p99", 3, "low"),
    ("completions/s", "completions_per_sec", 0, "high"),
]


# The floors: Handoff's stack, and hyper, with nothing of Handoff's own
# (bench/examples/bare_*.rs).
FLOORS = [("bare-actix", "bare actix-web"), ("bare-hyper", "bare hyper")]


def table_head(lead, lead_rule, titles, tail, tail_rule):
    """A table's two header lines: the lead columns, three columns per figure named by
    `titles(figure title)`, then the tail columns."""
    head, rule = lead, lead_rule
    for title, _, _, _ in FIGURES:
        head += "".join(f" {t} |" for t in titles(title))
        rule += "---:|" * 3
    return head + tail, rule + tail_rule


def figure_cells(mode, cells):
    """Three cells per figure, from `cells(key, digits)`; single mode has no rate."""
    row = ""
    for _, key, digits, _ in FIGURES:
        if mode == "single" and key == "completions_per_sec":
            row += " – | – | – |"  # one completion: no rate to speak of
        else:
            row += "".join(f" {c} |" for c in cells(key, digits))
    return row


def per_run_ratio(runs_a, runs_b, key):
    ratios = []
    for rep, a in runs_a.items():
        b = runs_b.get(rep)
        va, vb = figure(a, key), figure(b, key) if b else None
        if va is not None and vb:
            ratios.append(va / vb)
    return median(ratios)


def delivered(runs):
    if not runs:
        return "–"
    worst = min(runs.values(), key=lambda r: (r["delivered"] - r["expected"], -r["duplicates"]))
    text = f'{worst["delivered"]:,}/{worst["expected"]:,}'
    if worst["duplicates"]:
        text += f' ({worst["duplicates"]} dup)'
    failed = sum(1 for r in runs.values() if not r["ok"])
    return text + (f" ({failed} run(s) failed)" if failed else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("markdown")
    for opt in ("runs", "machine", "load", "workers", "commit", "command"):
        ap.add_argument("--" + opt, required=True)
    args = ap.parse_args()
    runs = load(args.folder)
    sizes = sorted({n for (name, _, n) in runs if name == "handoff"})
    out = []
    w = out.append
    w(f"Measured with `{args.command}` at commit `{args.commit}`, on {args.machine}. "
      f"Every figure is the median of {args.runs} run(s); a ratio is Handoff ÷ Nchan, the median "
      f"of the ratios taken in the same run. Load average when the table was written: {args.load} "
      f"(other engineers share this machine).")
    leaving = {r.get("leave_on_result", False) for rs in runs.values() for r in rs.values()}
    if leaving == {True}:
        w("")
        w("Every stream was closed by the client as soon as its result arrived, as page A does "
          "when it moves on (`--leave-on-result`), so every server tears its streams down inside "
          "the completion window.")
    elif leaving == {False}:
        w("")
        w("Streams stayed open after their result unless the server ended them.")
    w("")
    w("### Handoff vs Nchan")
    w("")
    for line in table_head("| N | mode |", "|---:|---|",
                           lambda title: (f"{title}: Handoff", "Nchan", "×"),
                           " delivered: Handoff | Nchan |", "---:|---:|"):
        w(line)
    for n in sizes:
        for mode in ("distinct", "single"):
            h, c = runs.get(("handoff", mode, n), {}), runs.get(("nchan", mode, n), {})
            if not h and not c:
                continue
            row = f"| {n:,} | {mode} |" + figure_cells(mode, lambda key, digits: (
                fmt(median(figure(r, key) for r in h.values()), digits),
                fmt(median(figure(r, key) for r in c.values()), digits),
                fmt(per_run_ratio(h, c, key), 2)))
            w(row + f" {delivered(h)} | {delivered(c)} |")
    floors = [(name, title) for name, title in FLOORS if any(k[0] == name for k in runs)]
    if floors:
        w("")
        w("### The floors: bare actix-web and bare hyper against Nchan, same tool, same pinning")
        w("")
        w("`bench/examples/bare_actix.rs` is Handoff's stack (actix-web, actix-web-lab's `Sse`, "
          "jemalloc) with Handoff's stream shape and nothing else: no database, limits, metrics or "
          "middleware. `bench/examples/bare_hyper.rs` is the same on hyper alone, accepting and "
          "serving on one current-thread runtime. Where a floor cannot reach a target, no amount "
          "of work in Handoff's own code reaches it on that stack. × is floor ÷ Nchan; Handoff ÷ "
          "floor shows what Handoff's own work costs.")
        w("")
        for line in table_head("| server | N | mode |", "|---|---:|---|",
                               lambda title: (title, "× Nchan", "Handoff ÷ it"),
                               " delivered |", "---:|"):
            w(line)
        for name, title in floors:
            for (nm, mode, n), b in sorted(runs.items()):
                if nm != name:
                    continue
                h, c = runs.get(("handoff", mode, n), {}), runs.get(("nchan", mode, n), {})
                row = f"| {title} | {n:,} | {mode} |" + figure_cells(mode, lambda key, digits: (
                    fmt(median(figure(r, key) for r in b.values()), digits),
                    fmt(per_run_ratio(b, c, key), 2),
                    fmt(per_run_ratio(h, b, key), 2)))
                w(row + f" {delivered(b)} |")
    stores = sorted((((name, n), rs) for (name, mode, n), rs in runs.items()
                     if name.startswith("store-alone-c") and mode == "distinct"),
                    key=lambda item: (int(item[0][0].removeprefix("store-alone-c")), item[0][1]))
    if stores:
        w("")
        w("### The write floor: Handoff's store alone, on the server's core")
        w("")
        n_floor = stores[0][0][1]
        w("`bench/examples/store_alone.rs` completes jobs through Handoff's own "
          "`Store::complete_job` (the write lane and its durable SQLite commit, as the server "
          "makes them) with no HTTP, hub or streams, each caller waiting for its answer before "
          "the next: 4 callers fill every batch with 4 (the best case for the write), 1 caller "
          "makes every batch a batch of one. µs per completion is 1 ÷ rate: wall time on the "
          "pinned core, which is not busy all of it (sqlx's SQLite thread and the runtime's "
          f"thread take turns). Nchan's and Handoff's whole completions ({n_floor:,} distinct, "
          "same run) are in the same unit. A run whose completions failed is left out and counted "
          "in the last column.")
        w("")
        w("| callers | completions/s | µs per completion | Nchan: µs per whole completion | "
          "write ÷ Nchan's whole | Handoff: µs per whole completion | failed runs |")
        w("|---:|---:|---:|---:|---:|---:|---:|")
        for (name, n), all_runs in stores:
            rs = {rep: r for rep, r in all_runs.items() if r.get("ok")}
            c = runs.get(("nchan", "distinct", n), {})
            h = runs.get(("handoff", "distinct", n), {})
            micros = lambda group: median(1e6 / r["completions_per_sec"] for r in group.values()
                                          if r.get("completions_per_sec"))
            w(f"| {name.removeprefix('store-alone-c')} | "
              f"{fmt(median(figure(r, 'completions_per_sec') for r in rs.values()))} | "
              f"{fmt(micros(rs), 1)} | {fmt(micros(c), 1)} | "
              f"{fmt(per_run_ratio(c, rs, 'completions_per_sec'), 2)} | {fmt(micros(h), 1)} | "
              f"{len(all_runs) - len(rs)} |")
    peers = [p for p in ("python", "node-plain", "better-sse") if any(k[0] == p for k in runs)]
    if peers:
        w("")
        w("### For context: the Python and Node peers, same tool, same pinning")
        w("")
        w("| server | N | mode | open all, s | bytes/stream | p50, ms | p99, ms | completions/s | delivered |")
        w("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for name in ["handoff", "nchan"] + peers:
            for (nm, mode, n), rs in sorted(runs.items()):
                if nm != name or n != min(k[2] for k in runs if k[0] in peers):
                    continue
                med = lambda key: median(figure(r, key) for r in rs.values())
                rate = "–" if mode == "single" else fmt(med("completions_per_sec"))
                w(f"| {name} | {n:,} | {mode} | {fmt(med('connect_secs'), 3)} | "
                  f"{fmt(med('bytes_per_stream'))} | {fmt(med('latency_ms.p50'), 3)} | "
                  f"{fmt(med('latency_ms.p99'), 3)} | {rate} | {delivered(rs)} |")
    w("")
    w("### Targets (issue 5), at N = 10,000 unless stated")
    w("")
    w("| figure | must reach | Handoff | met |" + "".join(f" {t}, same run |" for _, t in FLOORS))
    w("|---|---|---:|---|" + "---:|" * len(FLOORS))

    def ratio(mode, n, key, name="handoff"):
        return per_run_ratio(runs.get((name, mode, n), {}), runs.get(("nchan", mode, n), {}), key)

    checks = [
        ("server memory per idle stream (distinct)", "≤ 1.0 × Nchan", ("distinct", 10000, "bytes_per_stream"), lambda r: r <= 1.0),
        ("server memory per idle stream (single)", "≤ 1.0 × Nchan", ("single", 10000, "bytes_per_stream"), lambda r: r <= 1.0),
        ("single job, latency p99", "≤ 1.0 × Nchan", ("single", 10000, "latency_ms.p99"), lambda r: r <= 1.0),
        ("distinct jobs, latency p99", "≤ 2.0 × Nchan", ("distinct", 10000, "latency_ms.p99"), lambda r: r <= 2.0),
        ("completions/s (distinct, 4 publisher connections)", "≥ 1.0 × Nchan", ("distinct", 10000, "completions_per_sec"), lambda r: r >= 1.0),
        ("connects/s (distinct)", "≥ 1.0 × Nchan", ("distinct", 10000, "connects_per_sec"), lambda r: r >= 1.0),
        ("connects/s (single)", "≥ 1.0 × Nchan", ("single", 10000, "connects_per_sec"), lambda r: r >= 1.0),
    ]
    for name, goal, where, ok in checks:
        value = ratio(*where)
        met = "–" if value is None else ("yes" if ok(value) else "**no**")
        row = f"| {name} | {goal} | {fmt(value, 2)} × | {met} |"
        for floor_name, _ in FLOORS:
            floor = ratio(*where, name=floor_name)
            row += " – |" if floor is None else f" {fmt(floor, 2)} ×{'' if ok(floor) else ' (not met)'} |"
        w(row)
    most = max(sizes) if sizes else 0
    held = [r for mode in ("distinct", "single") for r in runs.get(("handoff", mode, most), {}).values()]
    all_ok = bool(held) and all(r["ok"] for r in held)
    w(f"| streams held at once, nothing lost | 19,000 | {most:,} in {len(held)} run(s) | "
      f"{'yes' if all_ok and most >= 19000 else '**no**'} |" + " – |" * len(FLOORS))
    text = "\n".join(out)

    try:
        with open(args.markdown) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:
        doc += f"\n{BEGIN}\n{END}\n"
    before, rest = doc.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    with open(args.markdown, "w") as f:
        f.write(f"{before}{BEGIN}\n{text}\n{END}{after}")


if __name__ == "__main__":
    sys.exit(main())
