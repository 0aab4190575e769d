"""Merge results files into benchmarks/results: ``python -m benchmarks.collect FILE.json ...``.

Each call of ``benchmarks/gpu_session.sh`` starts from an empty ``$OUT``, so its results file
holds only the cases that call measured; copying such files over each other would keep the
last call's cases alone. Merging keeps every case (a case measured again replaces the old
row); the header (software, commit, date, copy bandwidth) is the last file's.
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
    for path in args.files:
        doc = results.load(path)
        if doc is None:
            sys.exit(f"{path} does not exist")
        print(f"{path} -> {results.save(doc, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
