"""``swamp report``: a markdown table and ``accuracy_vs_density.png`` comparing run directories."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from swamp.pipeline import completed_levels
from swamp.rundir import atomic_write

__all__ = ["load_runs", "markdown_table", "plot", "density_axis"]


def load_runs(directories: Sequence[str | Path]) -> dict[str, dict]:
    """``{label: summary}`` for each run directory (label: the directory name), read from its
    level folders (``summary.json`` lags them by a kill between the two writes); a run that has
    not finished a level yet has no levels."""
    runs = {}
    for directory in directories:
        if not (Path(directory) / "config.yaml").is_file():
            raise FileNotFoundError(f"{directory} is not a run directory (no config.yaml)")
        summary = completed_levels(directory)
        label, n = Path(directory).resolve().name, 2
        while label in runs:
            label, n = f"{Path(directory).resolve().name}#{n}", n + 1
        runs[label] = summary
    return runs


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _heading(label: str, method: str) -> str:
    """A run's name in tables and legends: ``label (method)``, or the label alone where it is the method."""
    return label if label == method else f"{label} ({method})"


def markdown_table(runs: dict[str, dict]) -> str:
    """Rows: levels; columns: density and accuracy per run (headed ``label (method)``, or the
    label alone where it is the method). Where the runs' densities at a level
    differ (other prune fractions), the density column says so and each cell holds its own."""
    depth = max(len(s["levels"]) for s in runs.values())
    header = ["level", "density"] + [_heading(label, s["method"]) for label, s in runs.items()]
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


def density_axis(ax, densities: Sequence[float]) -> None:
    """Make ``ax``'s x axis the density in percent, log scale, falling to the right, with
    plain-number ticks down to the smallest of ``densities`` (fractions)."""
    import matplotlib.ticker
    ax.set_xscale("log")
    ax.set_xticks([t for t in (100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1) if t >= 100 * min(densities) / 1.5])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no "6x10^1" beside the ticks
    ax.invert_xaxis()
    ax.set_xlabel("density (% of prunable weights remaining, log scale)")


def plot(runs: dict[str, dict], path: str | Path) -> Path:
    """Test accuracy against density (log axis), one line per pruned run; dense runs as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--plot {path} is a folder; name the image file, e.g. {path / 'accuracy.png'}")
    runs = {label: s for label, s in runs.items() if s["levels"]}
    if not runs:
        raise ValueError("no run has finished a level yet: nothing to plot")
    dense = [s["levels"][0]["test_accuracy"] for s in runs.values() if s["method"] == "dense"] or \
        [s["levels"][0]["test_accuracy"] for s in runs.values()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kind, supported = path.suffix[1:].lower() or "png", fig.canvas.get_supported_filetypes()   # by suffix
    if kind not in supported:
        plt.close(fig)
        raise ValueError(f"--plot {path}: matplotlib cannot write .{kind} files; use one of "
                         f"{', '.join('.' + k for k in sorted(supported))}")
    low, high = min(dense), max(dense)
    pad = 0.002 if high - low < 0.004 else 0.0
    ax.axhspan(100 * (low - pad), 100 * (high + pad), color="0.85", label="dense")
    for label, summary in runs.items():
        if summary["method"] == "dense":
            continue
        levels = summary["levels"]
        ax.plot([100 * r["density"] for r in levels], [100 * r["test_accuracy"] for r in levels],
                marker="o", markersize=3, label=_heading(label, summary["method"]))
    density_axis(ax, [r["density"] for s in runs.values() for r in s["levels"]])
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda t: fig.savefig(t, dpi=120, format=kind))
    plt.close(fig)
    return path
