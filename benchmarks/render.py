"""Render the README performance sections from benchmarks/results/*.json.

    python -m benchmarks.render [--readme README.md] [--results DIR]

Replaces the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in the README
with one table set per GPU, and the text between ``<!-- projection:begin -->`` and
``<!-- projection:end -->`` with the projected ImageNet wall-clock (benchmarks/projection.py);
without results, each section says so. The README is written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from benchmarks import projection, results

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PROJECTION_BEGIN, PROJECTION_END = "<!-- projection:begin -->", "<!-- projection:end -->"
NO_RESULTS = "No GPU results are recorded yet: the numbers appear here after `make bench` on a GPU."


def section(results_dir: Path) -> str:
    """The markdown between the bench markers: every results file's tables, sorted by file name."""
    docs = [results.load(p) for p in sorted(Path(results_dir).glob("*.json"))]
    if not docs:
        return NO_RESULTS
    return "\n".join(results.markdown(doc, heading="###") for doc in docs).rstrip()


SECTIONS: dict[tuple[str, str], Callable[[Path], str]] = {
    (BEGIN, END): section,
    (PROJECTION_BEGIN, PROJECTION_END): projection.section,
}


def _replace(text: str, begin: str, end: str, body: str, readme: Path) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{readme} needs the markers {begin} and {end} (in this order) "
                         "around its section")
    return text[:start] + f"{begin}\n{body}\n" + text[stop:]


def render(readme: Path, results_dir: Path) -> None:
    """Rewrite ``readme`` with fresh sections between every marker pair of ``SECTIONS``
    (ValueError, README untouched, if a pair is missing)."""
    text = Path(readme).read_text(encoding="utf-8")
    for (begin, end), make in SECTIONS.items():
        text = _replace(text, begin, end, make(results_dir), readme)
    results.atomic_write_text(readme, text)


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
