"""``swamp analyze {barrier,instability,levels,hessian,masks,layers}``: JSON and PNG files in ``--out``
(default ``RUN_DIR/analysis``), each written atomically."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from swamp.analysis.landscape import l2_distance, mask_overlap
from swamp.analysis.runs import instability, layer_densities, level_hessians, load_run, successive_barriers
from swamp.config import DEVICE_NAME
from swamp.evaluate import SPLITS
from swamp.rundir import atomic_write, level_dir, level_numbers, read_json
from swamp.report import density_axis

__all__ = ["add_parser", "main"]


def _at_least(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _positive(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _device(text: str) -> str:
    """An argparse type: cpu, auto (cuda when torch sees one) or cuda[:N] on a GPU torch sees."""
    if DEVICE_NAME.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"must be cpu, auto or cuda[:N], got {text!r}")
    gpus = torch.cuda.device_count()
    if text == "auto":
        return "cuda" if gpus else "cpu"
    index = int(text[len("cuda:"):]) if text.startswith("cuda:") else 0
    if text.startswith("cuda") and index >= gpus:
        raise argparse.ArgumentTypeError(f"{text}, but torch sees {gpus} CUDA device(s) here; use cpu")
    return text


def add_parser(commands) -> None:
    """Add ``analyze`` and its subcommands to the ``swamp`` subparsers ``commands``."""
    analyze = commands.add_parser("analyze", help="loss-landscape analysis of run directories")
    kinds = analyze.add_subparsers(dest="analysis", required=True)

    def sub(name: str, help: str, run_dir: bool = True) -> argparse.ArgumentParser:
        parser = kinds.add_parser(name, help=help, description=help)
        if run_dir:
            parser.add_argument("dir", help="run directory")
        where = "RUN_DIR/analysis" if run_dir else "LEVEL_A's run directory/analysis"
        parser.add_argument("--out", help=f"output directory (default: {where})")
        parser.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda[:N] or auto")
        return parser

    points = dict(type=_at_least(2), default=11, help="points along each segment, ends included (default: 11)")
    split = dict(choices=SPLITS, default="test",
                 help="the split the error and loss are measured on (default: test; train: every training "
                      "example once, un-augmented; its files' names end in _train)")
    bn_batches = dict(type=_at_least(1), metavar="N",
                      help="BatchNorm statistics at each point from N training batches drawn at random, the same "
                           "at every point (default: the whole training set, exact; fewer are faster on ImageNet)")
    barrier = sub("barrier", "error along the segment between two levels' solutions (of runs of one config)",
                  run_dir=False)
    barrier.add_argument("level_a", help="level directory, e.g. runs/imp/level_03")
    barrier.add_argument("level_b", help="level directory (of the same run or a run of the same config)")
    unstable = sub("instability", "train a level twice with different data orders; their barrier (each copy "
                                  "trains one network: SWAMP runs train one particle with SWA)")
    unstable.add_argument("--level", type=_at_least(0), required=True, help="the level to train again")
    unstable.add_argument("--seeds", type=int, nargs=2, default=[1, 2], metavar=("SEED_A", "SEED_B"),
                          help="the two copies' data-order seeds (default: 1 2)")
    levels = sub("levels", "barriers between successive levels, and among SWAMP particles")
    for path in (barrier, unstable, levels):   # the analyses that walk interpolation paths
        path.add_argument("--points", **points)
        path.add_argument("--split", **split)
        path.add_argument("--bn-batches", **bn_batches)
    hessian = sub("hessian", "top Hessian eigenvalues (and trace) of every level, on its mask")
    hessian.add_argument("--k", type=_at_least(1), default=1, help="eigenvalues per level (default: 1)")
    hessian.add_argument("--batches", type=_at_least(1), default=4,
                         help="training batches, drawn at random (the same for every level), the loss averages "
                              "(default: 4; more give a less noisy curvature)")
    hessian.add_argument("--iters", type=_at_least(1), default=100,
                         help="most Lanczos iterations (Hessian-vector products) per level (default: 100)")
    hessian.add_argument("--tol", type=_positive, default=1e-4,
                         help="Lanczos stops when each top eigenpair's residual is below tol x |eigenvalue| "
                              "(default: 1e-4); a level that ends unconverged warns and is marked converged: false")
    hessian.add_argument("--trace-samples", type=_at_least(0), default=0,
                         help="Hutchinson probes for the trace, saved with its standard error (default: 0, no trace)")
    hessian.add_argument("--levels", type=_at_least(0), nargs="+", metavar="L",
                         help="the levels to compute, again if already in the output file (default: every "
                              "complete level not yet there with the same settings)")
    masks = sub("masks", "mask overlap (Jaccard) and weight distance between two level directories",
                run_dir=False)
    masks.add_argument("level_a", help="level directory, e.g. runs/imp/level_03")
    masks.add_argument("level_b", help="level directory (of the same run or a run of the same architecture)")
    sub("layers", "the density of every pruned layer at every level (reads the masks only)")


def _file(stem: Path, suffix: str) -> Path:
    """``stem`` + ``suffix`` (not ``with_suffix``, which would cut a run name such as ``lr0.1`` at its dot)."""
    return stem.with_name(stem.name + suffix)


def _write(path: Path, write) -> Path:
    """``atomic_write`` into a folder made on the first write (a failing analysis leaves none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    return path


def _write_json(path: Path, value) -> Path:
    return _write(path, lambda t: t.write_text(json.dumps(value, indent=2) + "\n"))


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(figsize=(6, 4))


def _save_figure(plt, fig, ax, path: Path) -> Path:
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _write(path, lambda t: fig.savefig(t, dpi=120, format="png"))
    plt.close(fig)
    return path


def _plot_path(result: dict, title: str, path: Path) -> Path:
    """Error (%) on the result's split against alpha along one interpolation path, under ``title``."""
    plt, fig, ax = _figure()
    ax.plot(result["alphas"], [100 * e for e in result["errors"]], marker="o", markersize=3)
    ax.set_xlabel("interpolation alpha")
    ax.set_ylabel(f"{result['split']} error (%)")
    ax.set_title(title, fontsize="small")
    return _save_figure(plt, fig, ax, path)


def _run_name(run_dir: Path, width: int = 60) -> str:
    """The run folder's name for a plot's title, cut in its middle when longer than ``width``."""
    name = run_dir.resolve().name
    return f"{name[:width // 2 - 1]}…{name[-(width // 2 - 1):]}" if len(name) > width else name


def _level_name(run_dir: Path, level: int) -> str:
    """``run/level_XX`` for a plot's title."""
    return f"{_run_name(run_dir)}/level_{level:02d}"


def _plot_against_density(rows: list[dict], value, ylabel: str, path: Path) -> Path:
    plt, fig, ax = _figure()
    ax.plot([100 * r["density"] for r in rows], [value(r) for r in rows], marker="o", markersize=3)
    density_axis(ax, [r["density"] for r in rows])
    ax.set_ylabel(ylabel)
    return _save_figure(plt, fig, ax, path)


def _level_path(level_dir: str) -> tuple[Path, int]:
    path = Path(level_dir).resolve()   # "." inside a level directory names it too
    if not path.name.startswith("level_") or not (path / "metrics.json").is_file():
        raise FileNotFoundError(f"{level_dir} is no complete level directory (RUN_DIR/level_XX with metrics.json)")
    return path.parent, int(path.name[len("level_"):])


def main(args) -> list[Path]:
    """Run the analysis ``args`` names; returns the files written."""
    run_dir = Path(args.dir) if hasattr(args, "dir") else _level_path(args.level_a)[0]
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    if args.analysis in ("levels", "hessian", "layers") and not level_numbers(run_dir, complete=True):
        raise ValueError(f"{run_dir} has no complete level yet (no level_XX/metrics.json): nothing to analyse")
    if args.analysis == "instability" and args.seeds[0] == args.seeds[1]:
        raise ValueError(f"--seeds must be two different seeds, got {args.seeds[0]} twice")
    out = Path(args.out) if args.out else run_dir / "analysis"
    split = getattr(args, "split", "test")
    on = "" if split == "test" else f"_{split}"   # a file's name tells its split (test: as before)
    if args.analysis in ("barrier", "masks"):
        (dir_a, level_a), (dir_b, level_b) = _level_path(args.level_a), _level_path(args.level_b)
        stem = out / f"{args.analysis}_{dir_a.name}_{level_a:02d}_{dir_b.name}_{level_b:02d}{on}"
        write = _claim(stem, {"a": _fingerprint(dir_a, level_a), "b": _fingerprint(dir_b, level_b)})
        run = load_run(dir_a, args.device)
        other = run if dir_b.resolve() == dir_a.resolve() else load_run(dir_b, args.device)
        state_a, state_b = run.state(level_a), other.state(level_b)
        if args.analysis == "masks":
            result = {"a": args.level_a, "b": args.level_b,
                      **mask_overlap(run.masks(level_a), other.masks(level_b)),
                      "l2_distance": l2_distance(state_a, state_b, run.parameter_names)}
            print(f"mask overlap (Jaccard) {result['global']:.4f}  l2_distance {result['l2_distance']:.4f}")
            return [write(result)]
        result = {"a": args.level_a, "b": args.level_b, **run.barrier(state_a, state_b, args.points, split=split,
                                                                    bn_batches=args.bn_batches)}
        print(f"{split} error barrier {result['barrier']:.4f}  l2_distance {result['l2_distance']:.4f}")
        title = f"{_level_name(dir_a, level_a)}\nto {_level_name(dir_b, level_b)}"
        return [write(result), _plot_path(result, title, _file(stem, ".png"))]
    if args.analysis == "instability":
        seeds = "_".join(str(seed) for seed in args.seeds)   # another pair of copies, another file
        stem = out / f"instability_{run_dir.resolve().name}_level_{args.level:02d}_seeds_{seeds}{on}"
        complete = level_numbers(run_dir, complete=True)
        if args.level not in complete:
            raise FileNotFoundError(f"{run_dir}: level {args.level} is not complete; complete levels are {complete}")
        write = _claim(stem, {"level": _fingerprint(run_dir, args.level)})
        result = instability(run_dir, args.level, args.seeds, args.points, args.device, split=split,
                             bn_batches=args.bn_batches)
        print(f"level {args.level}: {split} error barrier {result['barrier']:.4f}  "
              f"l2_distance {result['l2_distance']:.4f}")
        title = f"{_level_name(run_dir, args.level)}\ncopies trained with seeds {args.seeds[0]} and {args.seeds[1]}"
        return [write(result), _plot_path(result, title, _file(stem, ".png"))]
    if args.analysis == "levels":
        stem = out / f"levels_{run_dir.resolve().name}{on}"
        write = _claim_levels(stem, run_dir)
        result = successive_barriers(run_dir, args.points, args.device, split=split, bn_batches=args.bn_batches)
        files = [write(result)]
        for row in result["levels"]:
            print(f"level {row['from_level']} -> {row['to_level']}: {split} error barrier {row['barrier']:.4f}")
        if result["levels"]:
            files.append(_plot_against_density(result["levels"], lambda r: 100 * r["barrier"],
                                               f"{split} error barrier level L -> L+1 (%)", _file(stem, ".png")))
        else:
            print("no plot: the run has no two successive complete levels")
        return files
    if args.analysis == "layers":
        stem = out / f"layers_{run_dir.resolve().name}"
        write = _claim_levels(stem, run_dir)
        result = layer_densities(run_dir)
        print(_layer_table(result))
        return [write(result), _plot_layers(result, run_dir, _file(stem, ".png"))]
    return _hessians(run_dir, out / f"hessian_{run_dir.resolve().name}", args)


def _layer_table(result: dict) -> str:
    """A markdown table: a row per layer (its name and weights), a column per level (the fraction it keeps)."""
    levels = result["levels"]
    lines = ["| layer | weights | " + " | ".join(f"level {row['level']}" for row in levels) + " |",
             "|" + "---|" * (2 + len(levels)),
             "| all | | " + " | ".join(f"{100 * row['density']:.2f}%" for row in levels) + " |"]
    for layer in result["layers"]:
        name = layer["name"]
        lines.append(f"| {name} | {layer['weights']:,} | "
                     + " | ".join(f"{100 * row['layers'][name]:.2f}%" for row in levels) + " |")
    return "\n".join(lines)


_LEGEND_LAYERS = 10   # more layers: coloured by depth, with a colour bar instead of a legend


def _plot_layers(result: dict, run_dir: Path, path: Path) -> Path:
    """Each layer's density against the run's (both in percent, log axes); a layer pruned away
    (0%) is drawn on a dotted line below every other value."""
    plt, fig, ax = _figure()
    densities = [row["density"] for row in result["levels"]]
    layers = result["layers"]
    kept = {layer["name"]: [100 * row["layers"][layer["name"]] for row in result["levels"]] for layer in layers}
    positive = [value for values in kept.values() for value in values if value > 0]
    floor = min(positive, default=100) / 3   # where 0% is drawn on the log axis
    if len(positive) < sum(map(len, kept.values())):
        ax.axhline(floor, color="0.5", linestyle=":", linewidth=1, label="0% (layer pruned away)")
    colours = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        colour = None if len(layers) <= _LEGEND_LAYERS else colours(i / max(len(layers) - 1, 1))
        ax.plot([100 * d for d in densities], [value or floor for value in kept[layer["name"]]], marker="o",
                markersize=2, color=colour, label=layer["name"])
    density_axis(ax, densities)
    ax.set_yscale("log")
    ax.set_ylabel("layer density (%, log scale)")
    ax.set_title(f"{_run_name(run_dir)}: density of each pruned layer", fontsize="small")
    if len(layers) <= _LEGEND_LAYERS:
        ax.legend(fontsize="x-small")
    else:
        scale = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, len(layers) - 1))
        bar = fig.colorbar(scale, ax=ax, label="layer (input to output)")
        from matplotlib.ticker import MaxNLocator
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save_figure(plt, fig, ax, path)


def _fingerprint(run_dir: Path, level: int) -> str:
    """Tells a level's solution from another's in the same folder (a run started again there)."""
    return hashlib.sha1((level_dir(run_dir, level) / "metrics.json").read_bytes()).hexdigest()


def _claim(stem: Path, solutions: dict[str, str]) -> Callable[[dict], Path]:
    """Checks, before any work, that ``stem``.json may be (over)written by an analysis of the
    level solutions ``solutions`` (role -> :func:`_fingerprint`): it is absent, or it records only
    these solutions under those roles (this analysis again, of the same run, moved or with more
    levels). Returns the writer of a result, which records ``solutions`` in it."""
    path = _file(stem, ".json")
    if path.is_file():
        earlier = read_json(path)
        recorded = earlier.get("metrics_sha1") if isinstance(earlier, dict) else None
        if not isinstance(recorded, dict):
            raise FileExistsError(f"{path} holds no record of the run it analysed (another tool's file, or one "
                                  "written by an older swamp): move it away or pick another --out to keep it")
        if any(solutions.get(role) != sha1 for role, sha1 in recorded.items()):
            raise FileExistsError(f"{path} holds the analysis of another run of the same folder name (or one "
                                  "started again there): pick another --out (or move the file away) to keep it")
    return lambda result: _write_json(path, {**result, "metrics_sha1": solutions})


def _claim_levels(stem: Path, run_dir: Path) -> Callable[[dict], Path]:
    """:func:`_claim` for an analysis of every complete level of the run in ``run_dir``."""
    return _claim(stem, {str(level): _fingerprint(run_dir, level) for level in level_numbers(run_dir, complete=True)})


def _hessians(run_dir: Path, stem: Path, args) -> list[Path]:
    """``analyze hessian``: ``stem``.json is rewritten as each level is done (a stopped analysis
    keeps its levels); the levels of an earlier analysis of the run are kept. A file holding
    other settings, or a level whose ``metrics.json`` has changed since (another run), is refused.
    The run is told by its levels, not its path: a moved run keeps its analysis."""
    settings = {"k": args.k, "batches": args.batches, "batch_seed": 0, "iters": args.iters, "tol": args.tol,
                "trace_samples": args.trace_samples}   # batch_seed: random batches (older files: the first)
    path = _file(stem, ".json")
    earlier = read_json(path) if path.is_file() else {"settings": settings, "levels": []}
    if not isinstance(earlier, dict) or not isinstance(earlier.get("levels"), list):
        raise ValueError(f"{path} is no hessian analysis file; move it away or pick another --out")
    current = {level: _fingerprint(run_dir, level) for level in level_numbers(run_dir, complete=True)}
    foreign = [r.get("level") for r in earlier["levels"] if current.get(r.get("level")) != r.get("metrics_sha1")]
    if earlier.get("settings") != settings or foreign:
        held = (f"results with other settings ({earlier.get('settings')})" if earlier.get("settings") != settings
                else f"results of levels {foreign} that are not this run's (another run, or one started again here)")
        raise FileExistsError(f"{path} holds {held}: pick another --out (or move the file away) to keep them")
    rows = {r["level"]: r for r in earlier["levels"]}
    levels = args.levels
    if levels is None:
        levels = [level for level in current if level not in rows]
        if rows:
            print(f"{path}: levels {sorted(rows)} already there with these settings; "
                  + (f"computing {levels}" if levels else "nothing to compute"))
    merged = {**earlier, "settings": settings}

    def write(result: dict) -> None:
        row = {**result["levels"][-1], "metrics_sha1": _fingerprint(run_dir, result["levels"][-1]["level"])}
        rows[row["level"]] = row
        merged.update(result, settings=settings, levels=[rows[level] for level in sorted(rows)])
        _write_json(path, merged)
        unconverged = "" if row["converged"] else " (not converged: raise --iters)"
        trace = f"; trace {row['trace']:.4g}" if "trace" in row else ""
        error = f" ± {row['trace_standard_error']:.2g}" if row.get("trace_standard_error") is not None else ""
        per_weight = f" ({row['trace_per_weight']:.3g} per unpruned weight)" if "trace_per_weight" in row else ""
        print(f"level {row['level']}: top eigenvalues {', '.join(f'{e:.4g}' for e in row['eigenvalues'])}"
              f"{unconverged}{trace}{error}{per_weight}")

    if levels:
        level_hessians(run_dir, args.k, args.batches, args.iters, args.tol, args.trace_samples, args.device,
                       levels, progress=write, batch_seed=settings["batch_seed"])
    return [path, _plot_against_density(merged["levels"], lambda r: r["eigenvalues"][0],
                                        "top Hessian eigenvalue", _file(stem, ".png"))]
