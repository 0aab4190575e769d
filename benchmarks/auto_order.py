"""Suggest each op's ``auto`` backend order from benchmark results: ``python -m benchmarks.auto_order FILE.json``.

For every op measured on more than one swamp backend (``triton``, ``cuda``), the backends are
ranked by the geometric mean over the op's cases of their time relative to the fastest backend
of each case (only cases that every ranked backend ran at one commit count: a merged file's
rows of different commits are not compared). Prints a table per op and the ``AUTO_ORDER`` entries to
paste into swamp_kernels/_dispatch.py; ``torch`` always comes last.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from benchmarks import results

KERNEL_BACKENDS = ("triton", "cuda")


def rank(doc: dict) -> dict[str, list[tuple[str, float]]]:
    """op -> [(backend, geometric-mean time relative to the fastest per case)], fastest first,
    for the ops with at least two kernel backends measured on common cases."""
    times: dict[str, dict[tuple, dict[str, float]]] = {}   # op -> (case, commit) -> backend -> ms
    for row in doc["results"]:
        if row["backend"] in KERNEL_BACKENDS:
            commit = row["extra"].get("commit", doc["commit"])
            times.setdefault(row["op"], {}).setdefault((row["case"], commit), {})[row["backend"]] = row["time_ms"]
    ranking = {}
    for op, cases in times.items():
        backends = sorted({b for per_case in cases.values() for b in per_case})
        common = [per_case for per_case in cases.values() if set(per_case) == set(backends)]
        if len(backends) < 2 or not common:
            continue
        scores = {b: math.exp(sum(math.log(c[b] / min(c.values())) for c in common) / len(common))
                  for b in backends}
        ranking[op] = sorted(scores.items(), key=lambda item: item[1])
    return ranking


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.auto_order", description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path, help="a results file (<gpu>.json)")
    args = parser.parse_args(argv)
    doc = results.load(args.file)
    if doc is None:
        sys.exit(f"{args.file} does not exist")
    ranking = rank(doc)
    if not ranking:
        print("no op was measured on two kernel backends")
        return 1
    commits = sorted({row["extra"].get("commit", doc["commit"]) for row in doc["results"]
                      if row["backend"] in KERNEL_BACKENDS})
    print(f"{doc['gpu']} (commit {', '.join(commits)}): time relative to the fastest backend per case "
          "(backends of one commit compared), geometric mean")
    for op, ranked in ranking.items():
        print(f"  {op:28s} " + "  ".join(f"{b} {score:.2f}x" for b, score in ranked))
    print("AUTO_ORDER = {")
    for op, ranked in ranking.items():
        print(f"    {op!r}: {tuple(b for b, _ in ranked) + ('torch',)!r},")
    print("}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
