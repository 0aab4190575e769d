"""``swamp report``: a markdown table and ``accuracy_vs_density.png`` comparing run directories."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Sequence

from swamp.config import to_dict
from swamp.pipeline import RESUME_KEYS, completed_levels, is_dry_run, run_config
from swamp.rundir import atomic_write, existing_ancestor

__all__ = ["load_runs", "over_seeds", "markdown_table", "particle_table", "throughput_table", "plot", "density_axis"]


def load_runs(directories: Sequence[str | Path]) -> dict[str, dict]:
    """``{label: summary}`` for each run directory, read from its level folders (``summary.json``
    lags them by a kill between the two writes); a run that has not finished a level yet has
    no levels. The label is the directory's name, with as many parent folders as tell it from
    the others' (``a/imp``, ``b/imp``). A dry run (synthetic data) is refused."""
    paths = [Path(directory).resolve() for directory in directories]
    for directory, path in zip(directories, paths):
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{directory} is not a run directory (no config.yaml)")
        if is_dry_run(path):
            raise ValueError(f"{directory} holds a dry run (synthetic data, to measure speed): its accuracies "
                             "mean nothing; leave it out")
    if len(set(paths)) < len(paths):
        raise ValueError(f"a run directory is named twice: {', '.join(map(str, directories))}")
    return {_label(path, paths): completed_levels(path) for path in paths}


def over_seeds(runs: dict[str, dict], directories: Sequence[str | Path]) -> dict[str, dict]:
    """``runs`` (:func:`load_runs` of ``directories``, in their order) with the runs whose configs
    differ only in ``seed`` (and in what ``resume --set`` may change) merged into one: per level
    that all of them completed, the mean test accuracy and its sample standard deviation
    (``test_accuracy_std``), the mean ensemble accuracy, every particle's accuracy, and ``runs``.
    A merged run is labelled by its runs' common label prefix (``imp_s*``), headed with its seeds."""
    groups: dict[str, list[str]] = {}
    for label, directory in zip(runs, directories):
        groups.setdefault(_without_seed(Path(directory)), []).append(label)
    names = [_group_label(labels) for labels in groups.values()]
    names = [name if names.count(name) == 1 else _group_label(labels, prefix=False)   # run1* twice: run1 + 1
             for name, labels in zip(names, groups.values())]
    return {name: runs[labels[0]] if len(labels) == 1 else _merged([runs[x] for x in labels])
            for name, labels in zip(names, groups.values())}


def _without_seed(directory: Path) -> str:
    """The run's config as text, its seed and what a resume may change left out: runs that read
    alike are seeds of one experiment."""
    values = to_dict(run_config(directory))
    for key in (*RESUME_KEYS, "seed"):
        *sections, leaf = key.split(".")
        table = values
        for section in sections:
            table = table[section]
        del table[leaf]
    return json.dumps(values, sort_keys=True)


def _group_label(labels: list[str], prefix: bool = True) -> str:
    """One run's label; several runs' common prefix with ``*`` (``imp_s*``), or (none, or not
    ``prefix``) the first's with ``+ N``: unique, as the first labels are."""
    if len(labels) == 1:
        return labels[0]
    common = os.path.commonprefix(labels).rstrip("_-. /") if prefix else ""
    return f"{common}*" if common else f"{labels[0]} + {len(labels) - 1}"


def _merged(summaries: list[dict]) -> dict:
    levels = []
    for rows in zip(*(s["levels"] for s in summaries)):   # the levels all of them completed
        accuracies = [r["test_accuracy"] for r in rows]
        row = {"level": rows[0]["level"], "density": rows[0]["density"], "test_accuracy": statistics.mean(accuracies),
               "test_accuracy_std": statistics.stdev(accuracies), "runs": len(rows)}
        particles = [a for r in rows for a in r.get("particle_test_accuracy", ())]
        if particles:
            row["particle_test_accuracy"] = particles
        if all("ensemble_test_accuracy" in r for r in rows):
            row["ensemble_test_accuracy"] = statistics.mean(r["ensemble_test_accuracy"] for r in rows)
        levels.append(row)
    return {"method": summaries[0]["method"], "levels": levels, "runs": len(summaries)}


def _label(path: Path, paths: Sequence[Path]) -> str:
    """The last folders of ``path``, as few as tell it from every other of ``paths``."""
    for depth in range(1, len(path.parts)):   # the root (parts[0]) is no folder name
        tail = path.parts[-depth:]
        if all(other.parts[-depth:] != tail for other in paths if other != path):
            return "/".join(tail)
    return str(path)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _accuracy(row: dict) -> str:
    """The test accuracy, ``mean ± std`` over the seeds of a merged run (:func:`over_seeds`)."""
    if "test_accuracy_std" in row:
        return f"{100 * row['test_accuracy']:.2f} ± {_percent(row['test_accuracy_std'])}"
    return _percent(row["test_accuracy"])


def _heading(label: str, summary: dict) -> str:
    """A run's name in tables and legends: ``label (method)``, or the label alone where it is the
    method; seeds merged by :func:`over_seeds` add their count, ``imp_s* (imp, 3 seeds)``."""
    notes = ([] if label == summary["method"] else [summary["method"]]) + (
        [f"{summary['runs']} seeds"] if "runs" in summary else [])
    return f"{label} ({', '.join(notes)})" if notes else label


def markdown_table(runs: dict[str, dict]) -> str:
    """Rows: levels; columns: density and accuracy per run (headed ``label (method)``, or the
    label alone where it is the method). Where the runs' densities at a level differ (other
    prune fractions), the density column says so and each cell holds its own. Runs of several
    particles (SWAMP) add a second table: see ``particle_table``."""
    table = _table(runs, [(_heading(label, s), label, _accuracy) for label, s in runs.items()])
    particles = particle_table(runs)
    return f"{table}\n\n{particles}" if particles else table


def particle_table(runs: dict[str, dict]) -> str:
    """For each run of several particles, per level: the test accuracy of the averaged network,
    of its particles (mean, and lowest to highest) and of their ensemble (the mean of their
    predicted probabilities); "" if no run has several particles."""
    several = [label for label, s in runs.items()   # more particles than runs (merged seeds: one each)
               if any(len(r.get("particle_test_accuracy", ())) > s.get("runs", 1) for r in s["levels"])]
    if not several:
        return ""

    def particles(row: dict) -> str:
        accuracies = row.get("particle_test_accuracy")
        if not accuracies:
            return "–"
        mean, low, high = sum(accuracies) / len(accuracies), min(accuracies), max(accuracies)
        return f"{_percent(mean)} ({100 * low:.2f}–{_percent(high)})"

    def ensemble(row: dict) -> str:
        return _percent(row["ensemble_test_accuracy"]) if "ensemble_test_accuracy" in row else "–"
    columns = []
    for label in several:
        name = _heading(label, runs[label])
        columns += [(f"{name}: averaged", label, _accuracy),
                    (f"{name}: particles, mean (range)", label, particles),
                    (f"{name}: ensemble", label, ensemble)]
    return ("Particles (test accuracy of the averaged network, of its particles, of their ensemble):\n\n"
            + _table({label: runs[label] for label in several}, columns))


def throughput_table(runs: dict[str, dict]) -> str:
    """Rows: levels; columns: density and images per second per run (particle-images, all ranks):
    what a dry run measures (its accuracies, on synthetic data, mean nothing)."""
    return _table(runs, [(f"{_heading(label, s)}: images/s", label,
                          lambda r: f"{r['images_per_second']:,.1f}") for label, s in runs.items()])


def _table(runs: dict[str, dict], columns: Sequence[tuple]) -> str:
    """A markdown table with a row per level: the level, the density, and for each column
    ``(heading, label, cell)`` the text ``cell(metrics)`` of run ``label``'s level (empty past its
    last level). Where the runs' densities at a level differ, the density column says so and each
    run's first cell adds its own."""
    depth = max(len(s["levels"]) for s in runs.values())
    header = ["level", "density"] + [heading for heading, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for level in range(depth):
        rows = {label: s["levels"][level] if level < len(s["levels"]) else None for label, s in runs.items()}
        densities = {_percent(r["density"]) for r in rows.values() if r is not None}
        shared = len(densities) == 1
        cells, dated = [], set()
        for _, label, cell in columns:
            row = rows[label]
            cells.append("" if row is None else cell(row) if shared or label in dated
                         else f"{cell(row)} at {_percent(row['density'])}")
            dated.add(label)
        lines.append("| " + " | ".join([str(level), densities.pop() if shared else "differs", *cells]) + " |")
    if depth == 0:
        lines.append("| – | – |" + " |" * len(columns))
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


# Written into every plot's metadata, as plain text: a file holding it may be replaced by a new plot.
_MARK = "swamp report"
_METADATA = {"png": "Software", "pdf": "Creator", "svg": "Creator", "eps": "Creator", "ps": "Creator"}   # its key


def plot(runs: dict[str, dict], path: str | Path) -> Path:
    """Test accuracy against density (log axis), one line per pruned run, with a band in its
    colour: ± one standard deviation for seeds merged by :func:`over_seeds`, else for a run of
    several particles (SWAMP) from its lowest to its highest particle; the
    dense runs' accuracy (without any, the runs' level 0) as a line, or as a band from lowest to
    highest. A file at ``path`` is replaced only if an earlier plot wrote it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--plot {path} is a folder; name the image file, e.g. {path / 'accuracy.png'}")
    blocking = existing_ancestor(path.parent)
    if not blocking.is_dir():
        raise NotADirectoryError(f"--plot {path}: {blocking} is a file, not a folder")
    if path.exists() and _MARK.encode() not in path.read_bytes():
        raise FileExistsError(f"--plot {path} exists and is not a plot of swamp report (or one of a swamp from "
                              "before November 2026, which did not mark its plots): pick another --plot (or move the "
                              "file away) to keep it")
    runs = {label: s for label, s in runs.items() if s["levels"]}
    if not runs:
        raise ValueError("no run has finished a level yet: nothing to plot")
    dense = [s["levels"][0]["test_accuracy"] for s in runs.values() if s["method"] == "dense"]
    unpruned = "dense" if dense else "level 0 (unpruned)"
    dense = dense or [s["levels"][0]["test_accuracy"] for s in runs.values()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kind, supported = path.suffix[1:].lower() or "png", fig.canvas.get_supported_filetypes()   # by suffix
    if kind not in supported or kind not in _METADATA:
        plt.close(fig)
        raise ValueError(f"--plot {path}: swamp report writes {', '.join('.' + k for k in _METADATA)} files, "
                         f"not .{kind}")
    if max(dense) - min(dense) < 1e-9:
        ax.axhline(100 * dense[0], color="0.6", linestyle="--", label=unpruned)
    else:
        ax.axhspan(100 * min(dense), 100 * max(dense), color="0.85", label=f"{unpruned}: range")
    for label, summary in runs.items():
        if summary["method"] == "dense":
            continue
        levels, name = summary["levels"], _heading(label, summary)
        (line,) = ax.plot([100 * r["density"] for r in levels], [100 * r["test_accuracy"] for r in levels],
                          marker="o", markersize=3, label=name)
        spread = [(r["density"], r["particle_test_accuracy"]) for r in levels
                  if len(r.get("particle_test_accuracy", ())) > 1]
        if "runs" in summary:   # seeds merged: the band is the spread over them, not over particles
            mean, std = ([100 * r[key] for r in levels] for key in ("test_accuracy", "test_accuracy_std"))
            ax.fill_between([100 * r["density"] for r in levels], [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2, linewidth=0,
                            label=f"{name}: ± 1 std")
        elif spread:
            ax.fill_between([100 * d for d, _ in spread], [100 * min(a) for _, a in spread],
                            [100 * max(a) for _, a in spread], color=line.get_color(), alpha=0.2, linewidth=0,
                            label=f"{name}: particles (range)")
    density_axis(ax, [r["density"] for s in runs.values() for r in s["levels"]])
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda t: fig.savefig(t, dpi=120, format=kind, metadata={_METADATA[kind]: _MARK}))
    plt.close(fig)
    return path
