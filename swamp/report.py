"""``swamp report``: markdown tables and ``accuracy_vs_density.png`` comparing run directories (the seeds
of one config merged into mean ± std on request)."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Sequence

from swamp.config import Config
from swamp.pipeline import completed_levels, is_dry_run, level_count, result_changes, run_config
from swamp.rundir import atomic_write, existing_ancestor

__all__ = ["add_parser", "main", "load_runs", "over_seeds", "markdown_table", "particle_table", "throughput_table",
           "plot", "density_axis"]


def add_parser(commands) -> None:
    """Add ``report`` to the ``swamp`` subparsers ``commands``."""
    parser = commands.add_parser("report", help="table and plot comparing run directories")
    parser.add_argument("dirs", nargs="+", help="run directories (a run still training shows the levels it has "
                                                "finished)")
    parser.add_argument("--plot", default="accuracy_vs_density.png",
                        help="where to write the plot (default: accuracy_vs_density.png here)")
    parser.add_argument("--merge-seeds", action="store_true",
                        help="merge runs whose configs differ only in their seed (or in what resume --set may "
                             "change): mean ± sample standard deviation over them, on the levels all of them "
                             "completed")


def main(args) -> None:
    """``swamp report``: the plot first, then the tables, so printing stops where a reader leaves
    (``swamp report ... | head``); the unfinished runs; a refused plot path is raised once the
    tables are out."""
    runs = load_runs(args.dirs)
    planned = [level_count(directory) for directory in args.dirs]
    partial = [f"{label} ({len(summary['levels'])} of {count} levels)"
               for (label, summary), count in zip(runs.items(), planned) if len(summary["levels"]) < count]
    if args.merge_seeds:
        runs = over_seeds(runs, args.dirs)
    plotted = refused = None
    try:
        plotted = plot(runs, args.plot) if any(s["levels"] for s in runs.values()) else None
    except (ValueError, OSError) as error:
        refused = error
    print(markdown_table(runs))
    if partial:
        print(f"\nunfinished (still training, or stopped: `swamp resume`): {', '.join(partial)}")
    if refused:
        raise refused
    none = "no column has a level all its runs finished" if args.merge_seeds else "no run has finished a level yet"
    print(f"\nplot: {plotted}" if plotted else f"\nno plot: {none}")


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
    that all of them completed, the mean test and ensemble accuracies with their sample standard
    deviations (``*_std``) and every particle's accuracy, pooled; the summary lists its ``seeds``.
    A merged run is labelled by its runs' common label prefix (``imp_s*``). Two runs of one config
    and one seed (a copy, a rerun) are refused: they are one seed, not two."""
    if len(runs) != len(directories):
        raise ValueError(f"over_seeds: {len(runs)} runs but {len(directories)} directories")
    groups: list[tuple[Config, list[tuple[str, int]]]] = []   # (first run's config, [(label, seed)])
    for label, directory in zip(runs, directories):
        config = run_config(Path(directory))
        group = next((members for first, members in groups    # the results differ in the seed at most
                      if {key for key, _, _ in result_changes(first, config, across_runs=True)} <= {"seed"}), None)
        if group is None:
            groups.append((config, [(label, config.seed)]))
            continue
        twin = next((other for other, seed in group if seed == config.seed), None)
        if twin is not None:
            raise ValueError(f"{twin} and {label} are runs of one config with one seed ({config.seed}): merging them "
                             "would count one seed twice; leave one out")
        group.append((label, config.seed))
    members = [group for _, group in groups]
    names = [_group_label([label for label, _ in group]) for group in members]
    names = [name if names.count(name) == 1 else _group_label([label for label, _ in group], prefix=False)
             for name, group in zip(names, members)]   # run1* twice: run1 + 1, run3 + 1
    return {name: runs[group[0][0]] if len(group) == 1 else
            {**_merged([runs[label] for label, _ in group]), "seeds": [seed for _, seed in group]}
            for name, group in zip(names, members)}


def _group_label(labels: list[str], prefix: bool = True) -> str:
    """One run's label; several runs' common prefix with ``*`` (``imp_s*``), or (none, or not
    ``prefix``) the first's with ``+ N``: unique, as the first labels are."""
    if len(labels) == 1:
        return labels[0]
    common = os.path.commonprefix(labels).rstrip("_-. /") if prefix else ""
    return f"{common}*" if common else f"{labels[0]} + {len(labels) - 1}"


def _merged(summaries: list[dict]) -> dict:
    """The levels all of ``summaries`` completed, each with mean and sample standard deviation
    of the test and ensemble accuracies and the particles' accuracies pooled."""
    levels = []
    for rows in zip(*(s["levels"] for s in summaries)):
        row = {"level": rows[0]["level"], "density": rows[0]["density"]}
        for key in ("test_accuracy", "ensemble_test_accuracy"):
            if all(key in r for r in rows):
                values = [r[key] for r in rows]
                row.update({key: statistics.mean(values), f"{key}_std": statistics.stdev(values)})
        particles = [a for r in rows for a in r.get("particle_test_accuracy", ())]
        if particles:
            row["particle_test_accuracy"] = particles
        levels.append(row)
    return {"method": summaries[0]["method"], "levels": levels}


def _label(path: Path, paths: Sequence[Path]) -> str:
    """The last folders of ``path``, as few as tell it from every other of ``paths``."""
    for depth in range(1, len(path.parts)):   # the root (parts[0]) is no folder name
        tail = path.parts[-depth:]
        if all(other.parts[-depth:] != tail for other in paths if other != path):
            return "/".join(tail)
    return str(path)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _cell(row: dict, key: str) -> str:
    """``row[key]`` in percent, ``mean ± std`` over the seeds of a merged run (:func:`over_seeds`);
    "–" where the row has none."""
    if key not in row:
        return "–"
    if f"{key}_std" in row:
        return f"{100 * row[key]:.2f} ± {_percent(row[f'{key}_std'])}"
    return _percent(row[key])


def _accuracy(row: dict) -> str:
    return _cell(row, "test_accuracy")


def _heading(label: str, summary: dict) -> str:
    """A run's name in tables and legends: ``label (method)``, or the label alone where it is the
    method; seeds merged by :func:`over_seeds` are named, ``imp_s* (imp, seeds 0, 1, 2)``."""
    notes = ([] if label == summary["method"] else [summary["method"]]) + (
        [f"seeds {', '.join(map(str, summary['seeds']))}"] if "seeds" in summary else [])
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
    predicted probabilities); "" if no run has several particles. A merged run's particles are
    those of all its seeds, pooled."""
    several = [label for label, s in runs.items()   # more particles than seeds (imp's seeds: one each)
               if any(len(r.get("particle_test_accuracy", ())) > len(s.get("seeds", [0])) for r in s["levels"])]
    if not several:
        return ""

    def particles(row: dict) -> str:
        accuracies = row.get("particle_test_accuracy")
        if not accuracies:
            return "–"
        mean, low, high = sum(accuracies) / len(accuracies), min(accuracies), max(accuracies)
        return f"{_percent(mean)} ({100 * low:.2f}–{_percent(high)})"

    def ensemble(row: dict) -> str:
        return _cell(row, "ensemble_test_accuracy")
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
    several particles (SWAMP) from its lowest to its highest particle; the dense runs' accuracy
    (without any, the runs' level 0) as a line, or as a band from lowest to highest (merged seeds:
    mean ± std). A file at ``path`` is replaced only if an earlier plot wrote it."""
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
    references = [s["levels"][0] for s in runs.values() if s["method"] == "dense"]
    unpruned = "dense" if references else "level 0 (unpruned)"
    references = references or [s["levels"][0] for s in runs.values()]
    spread = [r.get("test_accuracy_std", 0.0) for r in references]   # merged seeds: mean ± std
    low = min(r["test_accuracy"] - s for r, s in zip(references, spread))
    high = max(r["test_accuracy"] + s for r, s in zip(references, spread))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kind, supported = path.suffix[1:].lower() or "png", fig.canvas.get_supported_filetypes()   # by suffix
    if kind not in supported or kind not in _METADATA:
        plt.close(fig)
        raise ValueError(f"--plot {path}: swamp report writes {', '.join('.' + k for k in _METADATA)} files, "
                         f"not .{kind}")
    if high - low < 1e-9:
        ax.axhline(100 * low, color="0.6", linestyle="--", label=unpruned)
    else:
        merged = " (merged seeds: ± 1 std)" if any(spread) else ""
        ax.axhspan(100 * low, 100 * high, color="0.85", label=f"{unpruned}: range{merged}")
    for label, summary in runs.items():
        if summary["method"] == "dense":
            continue
        levels, name = summary["levels"], _heading(label, summary)
        (line,) = ax.plot([100 * r["density"] for r in levels], [100 * r["test_accuracy"] for r in levels],
                          marker="o", markersize=3, label=name)
        spread = [(r["density"], r["particle_test_accuracy"]) for r in levels
                  if len(r.get("particle_test_accuracy", ())) > 1]
        if "seeds" in summary:   # seeds merged: the band is the spread over them, not over particles
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
