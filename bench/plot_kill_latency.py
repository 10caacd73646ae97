#!/usr/bin/env python3
"""
Kill-latency plot from a closewatch_bench.py results.json:

    python bench/plot_kill_latency.py bench/results/results.json [out.png]

One panel per concurrency: the distribution (CDF, log time axis) of the time
from the client's action to the worker's exit, per scenario, all
repetitions pooled; closewatch solid, socat dashed (tcpserver never kills).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCENARIOS = ("fin", "rst", "half", "paused")
COLORS = {"fin": "tab:blue", "rst": "tab:orange", "half": "tab:green", "paused": "tab:red"}
STYLES = {"closewatch": "-", "socat": "--", "tcpserver": ":"}


def plot(res: dict, png: Path) -> Path:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"matplotlib is missing ({e})") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = res["config"]["concurrency"]
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4.2), sharey=True)
    if len(levels) == 1:
        axes = [axes]
    for ax, n in zip(axes, levels):
        for server, cells in res["kill"].items():
            for sc in SCENARIOS:
                cell = cells.get(f"{sc}@{n}")
                if not cell:
                    continue
                xs = sorted(x for r in cell["reps"] for x in r["samples_ms"])
                total = sum(r["connections"] for r in cell["reps"])
                if not xs or not total:
                    continue
                ys = [(i + 1) / total for i in range(len(xs))]
                s = cell["summary"]
                ax.step(
                    [max(x, 1e-3) for x in xs], ys, where="post",
                    color=COLORS[sc], linestyle=STYLES.get(server, "-"),
                    label=f"{server} {sc} (p99 {s['p99_ms']:.2f} ms)",
                )
        ax.set_xscale("log")
        ax.set_title(f"{n} concurrent connection{'s' if n > 1 else ''}")
        ax.set_xlabel("client action -> worker exit (ms)")
        ax.axvline(0.5, color="grey", lw=0.6, ls=":")
        ax.axvline(2, color="grey", lw=0.6, ls=":")
        ax.axvline(5, color="grey", lw=0.6, ls=":")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6.5, loc="lower right")
    axes[0].set_ylabel("fraction of workers killed (survivors never reach 1)")
    fig.suptitle(
        f"closewatch kill latency ({res['meta']['mode']}, {res['meta']['date']}, "
        f"closewatch {res['meta'].get('closewatch_commit')})", fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_name("kill_latency.png")
    print(plot(json.loads(src.read_text()), dst))
