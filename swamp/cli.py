"""Command line: ``swamp run CONFIG --out DIR [--set k=v ...] [--quiet]``, ``swamp resume DIR``,
``swamp report DIR [DIR ...] [--plot PATH]``, ``swamp analyze {barrier,instability,levels,hessian,masks} ...``."""
from __future__ import annotations

import argparse
import sys

from swamp import config as cfg
from swamp import pipeline, report
from swamp.analysis import commands as analyze


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swamp", description="IMP and SWAMP experiments")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start a run from a YAML config")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--out", required=True, help="run directory to create")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.epochs=10 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    resume = commands.add_parser("resume", help="continue a run from its last complete level")
    resume.add_argument("dir")
    resume.add_argument("--quiet", action="store_true")
    rep = commands.add_parser("report", help="table and plot comparing run directories")
    rep.add_argument("dirs", nargs="+")
    rep.add_argument("--plot", default="accuracy_vs_density.png", help="where to write the plot")
    analyze.add_parser(commands)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            summary = pipeline.run(cfg.load(args.config, args.overrides), args.out, quiet=args.quiet)
            print(report.markdown_table({args.out: summary}))
        elif args.command == "resume":
            summary = pipeline.resume(args.dir, quiet=args.quiet)
            print(report.markdown_table({args.dir: summary}))
        elif args.command == "analyze":
            for path in analyze.main(args):
                print(f"wrote {path}")
        else:
            runs = report.load_runs(args.dirs)
            print(report.markdown_table(runs))
            print(f"\nplot: {report.plot(runs, args.plot)}")
    except (cfg.ConfigError, FileExistsError, FileNotFoundError) as error:
        print(f"swamp {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
