"""Plot the CSV written by `emdpo bench` (one run: the last one in the file by default).

Writes, next to the CSV (or into --outdir):
  <stem>_speedups.png  speed-up of each main case over its baseline (p50 ratio, log scale)
  <stem>_scaling.png   the scaling tables: ns per (record x type) and fraction of the copy
                       bandwidth against N, K and the list length m (E-step, loss+gradient)

    emdpo bench --quick --output bench.csv
    python benchmarks/plot_bench.py bench.csv                 # the last run in the file
    python benchmarks/plot_bench.py bench.csv --run 20261127T031000 --outdir figures/
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict


def read_run(path: str, run_id: str | None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "run_id" not in rows[0]:
        sys.exit(f"{path}: no rows written by `emdpo bench` (no run_id column)")
    runs = list(dict.fromkeys(r["run_id"] for r in rows))
    run_id = run_id or runs[-1]
    if run_id not in runs:
        sys.exit(f"{path}: no run {run_id!r}; runs in the file: {', '.join(runs)}")
    return run_id, [r for r in rows if r["run_id"] == run_id and r["p50_ms"]]


def _title(rows, run_id):
    r = rows[0]
    return (f"{r['device_name']}, {r['threads']} threads, {r['cpu_isa']}; emdpo-core "
            f"{r['emdpo_core']} ({r['commit']}), torch {r['torch']}; run {run_id}")


def plot_speedups(rows, run_id, out):
    import matplotlib.pyplot as plt

    bars = [r for r in rows if r["table"] == "main" and r["speedup_p50"]]
    if not bars:
        return None
    labels = [f"{r['case']}\n{r['impl']} vs {r['baseline']}" for r in bars]
    values = [float(r["speedup_p50"]) for r in bars]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(bars)), 4.8))
    ax.bar(range(len(bars)), values, color=["C0" if v >= 1 else "C3" for v in values])
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over the baseline (p50 ratio)")
    ax.set_title(_title(rows, run_id), fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def plot_scaling(rows, run_id, out):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    tables = [("N", "records N"), ("K", "types K"), ("m", "list length m")]
    present = [(t, label) for t, label in tables if any(r["table"] == t for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(2, len(present), figsize=(4.2 * len(present), 6.4), squeeze=False)
    for col, (table, label) in enumerate(present):
        series = defaultdict(list)
        for r in rows:
            if r["table"] == table:
                series[(r["case"], r["impl"])].append(r)
        for (case, impl), rs in sorted(series.items()):
            rs.sort(key=lambda r: float(r[table]))
            x = [float(r[table]) for r in rs]
            axes[0][col].plot(x, [float(r["ns_per_record_type"]) for r in rs], "o-",
                              label=f"{case} ({impl})")
            axes[1][col].plot(x, [float(r["bandwidth_fraction"] or "nan") for r in rs], "o-",
                              label=f"{case} ({impl})")
        for row in (0, 1):
            ax = axes[row][col]
            ax.set_xscale("log", base=10 if table == "N" else 2)
            ax.grid(True, which="both", alpha=0.3)
        fixed = rs[0]
        if table == "m":    # N = slots / m
            others = f"K={fixed['K']}, {int(fixed['N']) * int(fixed['m']):,} slots"
        else:
            others = ", ".join(f"{k}={fixed[k]}" for k in ("N", "K", "m") if k != table)
        axes[0][col].set_title(f"vs {label} ({others})", fontsize=9)
        axes[0][col].set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        axes[0][col].yaxis.set_major_formatter(plain)
        axes[0][col].yaxis.set_minor_formatter(plain)
        axes[0][col].tick_params(axis="y", which="minor", labelsize=6)
        axes[0][col].set_ylabel("ns per (record x type), p50")
        axes[1][col].set_ylabel("fraction of copy bandwidth")
        axes[1][col].set_xlabel(label)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(_title(rows, run_id), fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", help="CSV written by `emdpo bench --output`")
    ap.add_argument("--run", default=None, help="run_id to plot (default: the last run)")
    ap.add_argument("--outdir", default=None, help="folder for the PNGs (default: the CSV's)")
    args = ap.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("matplotlib is needed: pip install 'emdpo-core[plot]'")
    matplotlib.use("Agg")
    run_id, rows = read_run(args.csv, args.run)
    outdir = args.outdir or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.csv))[0]
    written = [p for p in (
        plot_speedups(rows, run_id, os.path.join(outdir, f"{stem}_speedups.png")),
        plot_scaling(rows, run_id, os.path.join(outdir, f"{stem}_scaling.png"))) if p]
    for p in written:
        print(f"wrote {p}")
    if not written:
        sys.exit(f"{args.csv}: run {run_id} has no rows to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
