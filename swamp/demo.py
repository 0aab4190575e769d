"""`make demo`: the digits_mlp preset with dense, IMP, SWAMP and random pruning, then the report.

Runs on the CPU in a few minutes (14 levels of 20% reach 4.4% density) and writes the run
directories, the markdown table and ``accuracy_vs_density.png`` under ``runs/demo/``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from swamp import config as cfg
from swamp import pipeline, report

PRESET = Path(__file__).resolve().parent.parent / "configs" / "digits_mlp_swamp.yaml"
METHODS = ("dense", "imp", "swamp", "random")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for the four runs (replaced)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny MLP: more threads only add contention
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    runs = {}
    for method in METHODS:
        print(f"== {method}", flush=True)
        config = cfg.load(PRESET, [f"method={method}", *args.overrides])
        runs[str(out / method)] = pipeline.run(config, out / method, quiet=True)
    print(report.markdown_table(runs))
    print(f"\nplot: {report.plot(runs, out / 'accuracy_vs_density.png')}")


if __name__ == "__main__":
    main()
