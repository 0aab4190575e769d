"""``swamp report``: a markdown table and ``accuracy_vs_density.png`` comparing run directories."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

__all__ = ["load_runs", "markdown_table", "plot"]


def load_runs(directories: Sequence[str | Path]) -> dict[str, dict]:
    """``{label: summary}`` for each run directory (label: the directory name)."""
    runs = {}
    for directory in directories:
        path = Path(directory) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory} holds no summary.json (not a run, or no level done yet)")
        label, n = Path(directory).resolve().name, 2
        while label in runs:
            label, n = f"{Path(directory).resolve().name}#{n}", n + 1
        runs[label] = json.loads(path.read_text())
    return runs


def markdown_table(runs: dict[str, dict]) -> str:
    """Rows: levels; columns: density (of the first run with that level) and accuracy per run."""
    depth = max(len(s["levels"]) for s in runs.values())
    header = ["level", "density"] + [f"{label} ({s['method']})" for label, s in runs.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level in range(depth):
        rows = [s["levels"][level] if level < len(s["levels"]) else None for s in runs.values()]
        density = next(r["density"] for r in rows if r is not None)
        cells = [f"{100 * r['test_accuracy']:.2f}%" if r else "" for r in rows]
        lines.append("| " + " | ".join([str(level), f"{100 * density:.2f}%", *cells]) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: str | Path) -> Path:
    """Test accuracy against density (log axis), one line per pruned run; dense runs as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dense = [s["levels"][0]["test_accuracy"] for s in runs.values() if s["method"] == "dense"] or \
        [s["levels"][0]["test_accuracy"] for s in runs.values()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    low, high = min(dense), max(dense)
    pad = 0.002 if high - low < 0.004 else 0.0
    ax.axhspan(100 * (low - pad), 100 * (high + pad), color="0.85", label="dense")
    for label, summary in runs.items():
        if summary["method"] == "dense":
            continue
        levels = summary["levels"]
        ax.plot([100 * r["density"] for r in levels], [100 * r["test_accuracy"] for r in levels],
                marker="o", markersize=3, label=f"{label} ({summary['method']})")
    ax.set_xscale("log")
    ax.set_xticks([t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1)
                   if t >= min(100 * r["density"] for s in runs.values() for r in s["levels"]) / 1.5])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights remaining, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
