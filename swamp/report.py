"""``swamp report``: a markdown table and ``accuracy_vs_density.png`` comparing run directories."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from swamp.config import load
from swamp.pipeline import atomic_write

__all__ = ["load_runs", "markdown_table", "plot"]


def load_runs(directories: Sequence[str | Path]) -> dict[str, dict]:
    """``{label: summary}`` for each run directory (label: the directory name); a run that has
    not finished a level yet has no levels."""
    runs = {}
    for directory in directories:
        path = Path(directory) / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
        elif (Path(directory) / "config.yaml").is_file():
            summary = {"method": load(Path(directory) / "config.yaml", check_paths=False).method, "levels": []}
        else:
            raise FileNotFoundError(f"{directory} is not a run directory (no config.yaml)")
        label, n = Path(directory).resolve().name, 2
        while label in runs:
            label, n = f"{Path(directory).resolve().name}#{n}", n + 1
        runs[label] = summary
    return runs


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def markdown_table(runs: dict[str, dict]) -> str:
    """Rows: levels; columns: density and accuracy per run (headed ``label (method)``, or the
    label alone where it is the method). Where the runs' densities at a level
    differ (other prune fractions), the density column says so and each cell holds its own."""
    depth = max(len(s["levels"]) for s in runs.values())
    header = ["level", "density"] + [label if label == s["method"] else f"{label} ({s['method']})"
                                     for label, s in runs.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level in range(depth):
        rows = [s["levels"][level] if level < len(s["levels"]) else None for s in runs.values()]
        densities = {_percent(r["density"]) for r in rows if r is not None}
        shared = len(densities) == 1
        cells = ["" if r is None else _percent(r["test_accuracy"]) if shared
                 else f"{_percent(r['test_accuracy'])} at {_percent(r['density'])}" for r in rows]
        lines.append("| " + " | ".join([str(level), densities.pop() if shared else "differs", *cells]) + " |")
    if depth == 0:
        lines.append("| – | – |" + " |" * len(runs))
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: str | Path) -> Path:
    """Test accuracy against density (log axis), one line per pruned run; dense runs as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = {label: s for label, s in runs.items() if s["levels"]}
    if not runs:
        raise ValueError("no run has finished a level yet: nothing to plot")
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
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no "6x10^1" beside the ticks
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights remaining, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda t: fig.savefig(t, dpi=120, format="png"))
    plt.close(fig)
    return path
