"""Render the README performance section from benchmarks/results/*.json.

    python -m benchmarks.render [--readme README.md] [--results DIR]

Replaces the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in the README
(atomic write) with one table set per GPU; without results files, with a line saying so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import results

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
NO_RESULTS = "No GPU results are recorded yet: the numbers appear here after `make bench` on a GPU."


def section(results_dir: Path) -> str:
    """The markdown between the markers: every results file's tables, sorted by file name."""
    docs = [results.load(p) for p in sorted(Path(results_dir).glob("*.json"))]
    if not docs:
        return NO_RESULTS
    return "\n".join(results.markdown(doc, heading="###") for doc in docs).rstrip()


def render(readme: Path, results_dir: Path) -> None:
    """Rewrite ``readme`` with a fresh section between the markers (ValueError without them)."""
    text = Path(readme).read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} needs the markers {BEGIN} and {END} (in this order) "
                         "around its performance section")
    body = f"{BEGIN}\n{section(results_dir)}\n"
    results.atomic_write_text(readme, text[:start] + body + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n")[0])
    parser.add_argument("--readme", type=Path, default=results.REPO / "README.md")
    parser.add_argument("--results", type=Path, default=results.RESULTS_DIR)
    args = parser.parse_args(argv)
    try:
        render(args.readme, args.results)
    except (OSError, ValueError) as err:
        sys.exit(str(err))
    print(f"rendered {args.results} into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
