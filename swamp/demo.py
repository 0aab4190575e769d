"""`make demo`: the digits_mlp preset with dense, IMP, SWAMP and random pruning, then the report.

Runs on the CPU in a few minutes (14 levels of 20% reach 4.4% density) and writes the run
directories, the markdown table ``results.md`` and ``accuracy_vs_density.png`` under ``runs/demo/``.
The folder is replaced only when it holds nothing but an earlier demo's output.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from swamp import config as cfg
from swamp import pipeline, report
from swamp.rundir import foreign_files, write_text
from swamp.runlock import holder as lock_holder

PRESET = Path(__file__).resolve().parent.parent / "configs" / "digits_mlp_swamp.yaml"
METHODS = ("dense", "imp", "swamp", "random")
OUTPUTS = {*METHODS, "results.md", "accuracy_vs_density.png"}   # what a demo writes in --out


def _clear(out: Path) -> None:
    """Remove an earlier demo's output from ``out``; refuse a folder holding anything else
    (checked down to the files of every run, before anything is removed)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    others = []
    for path in out.iterdir():
        if path.name in METHODS and path.is_dir():
            if taken_by := lock_holder(path):
                raise FileExistsError(f"--out {out}: {path} is being trained by {taken_by}")
            others += foreign_files(path)
        elif path.name not in OUTPUTS or not path.is_file():
            others.append(path)
    if others:
        shown = ", ".join(str(p.relative_to(out)) for p in sorted(others)[:5])
        raise FileExistsError(f"--out {out} holds files the demo did not write ({shown}); "
                              "the demo replaces its folder: pick a new or empty one")
    shutil.rmtree(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swamp.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo",
                        help="folder for the four runs (an earlier demo's output there is replaced)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the preset for all four runs, e.g. --set levels=3")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny MLP: more threads only add contention
    out = Path(args.out)
    try:
        if any(item.partition("=")[0].strip() == "method" for item in args.overrides):
            raise cfg.ConfigError("the demo runs every method in turn: drop --set method=...")
        configs = {method: cfg.load(PRESET, [f"method={method}", *args.overrides]) for method in METHODS}
        pipeline.check(configs[METHODS[-1]])   # the data set and schedule checks (the methods share them)
        _clear(out)
    except (ValueError, OSError) as error:   # a bad --set (ConfigError), an occupied --out
        print(f"swamp demo: error: {error}", file=sys.stderr)
        return 2
    runs = {}
    for method, config in configs.items():
        print(f"== {method}", flush=True)
        runs[method] = pipeline.run(config, out / method, quiet=True)
    table = report.markdown_table(runs)
    write_text(out / "results.md", table + "\n")
    print(table)
    print(f"\ntable: {out / 'results.md'}\nplot: {report.plot(runs, out / 'accuracy_vs_density.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
