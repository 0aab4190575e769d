"""Merge results files into benchmarks/results: ``python -m benchmarks.collect FILE.json ...``.

Each call of ``benchmarks/gpu_session.sh`` starts from an empty ``$OUT``, so its results file
holds only the cases that call measured; copying such files over each other would keep the
last call's cases alone. Merging keeps every case (of a case measured twice, the later run's
row, whatever the order of the files); the header (software, commit, date, copy bandwidth) is
the latest run's. A ``--smoke`` run's file (CPU harness check) is refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collect", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="results files (<gpu>.json) of benchmark runs")
    parser.add_argument("--out", type=Path, default=results.RESULTS_DIR, help="results folder to merge into")
    args = parser.parse_args(argv)
    docs = {path: results.load(path) for path in args.files}   # all checked before any is merged
    for path, doc in docs.items():
        if doc is None:
            sys.exit(f"{path} does not exist")
        if doc["gpu"] == results.SMOKE_GPU:
            sys.exit(f"{path} holds the numbers of a --smoke run (a harness check on the CPU), not results")
    for path, doc in docs.items():
        print(f"{path} -> {results.save(doc, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
