"""Command line: ``swamp run CONFIG --out DIR [--set k=v ...] [--quiet] [--dry-run]``, ``swamp resume DIR [--set k=v ...]``,
``swamp report DIR [DIR ...] [--plot PATH] [--merge-seeds]``, ``swamp analyze {barrier,instability,levels,hessian,masks,layers} ...``.

``run`` and ``resume`` also run under ``torchrun`` (``torchrun --nproc_per_node N -m swamp run ...``)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from swamp import config as cfg
from swamp import pipeline, report
from swamp.analysis import commands as analyze
from swamp.distributed import DistributedError
from swamp.rundir import WriteError
from swamp_kernels import BackendError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swamp", description="IMP and SWAMP experiments")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="start a run from a YAML config")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--out", required=True, help="run directory to create")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.epochs=10 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help=f"synthetic data at the dataset's shapes, one epoch of {pipeline.DRY_RUN_STEPS} "
                          "steps: measures throughput without the data set (replaces an earlier dry run in --out)")
    resume = commands.add_parser("resume", help="continue a killed or preempted run from its last epoch "
                                                "checkpoint (a finished run: its table again)")
    resume.add_argument("dir", help="run directory (the --out of swamp run)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key that does not change the results (a moved data set, another "
                             f"torchrun layout, more levels): {', '.join(pipeline.RESUME_KEYS)}; "
                             f"{' and '.join(pipeline.MOVABLE_KEYS)} where what they name moved (repeatable)")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")
    report.add_parser(commands)
    analyze.add_parser(commands)
    return parser


def _show(text: str, file=None) -> None:
    """Print on rank 0 only (every rank of a torchrun job runs the command)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=file)


def _error(command: str, error: BaseException) -> None:
    """Print ``error``; under torchrun tagged with the rank (each rank prints its own)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    print(f"swamp {command}: error{rank}: {error}", file=sys.stderr)


def _resume_hint(args) -> str:
    """How to go on after an interrupted ``run`` or ``resume``: resume once the run directory
    holds a run, else start again (nothing was saved)."""
    if args.command not in ("run", "resume"):
        return ""
    run_dir = args.out if args.command == "run" else args.dir
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return f"; nothing was saved in {run_dir}: start again with `swamp run`"
    launch = "the same torchrun line with " if "WORLD_SIZE" in os.environ else ""
    return f"; continue with {launch}`swamp resume {run_dir}`"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    started_here = args.command == "run" and not args.dry_run and not os.path.isfile(os.path.join(args.out, "config.yaml"))
    try:
        if args.command == "run":
            config = cfg.load(args.config, args.overrides, check_paths=not args.dry_run)
            cfg.validate_new_run(config)   # a dry run's too, before its data set is swapped
            summary = pipeline.run(pipeline.dry_run(config) if args.dry_run else config, args.out,
                                   quiet=args.quiet, replace_dry_run=args.dry_run)
            table = report.throughput_table if args.dry_run else report.markdown_table
            _show(table({Path(args.out).resolve().name: summary}))
            if args.dry_run:
                _show("(particle-images per second over all ranks, over the wall time of each level's training)")
        elif args.command == "resume":
            complete = pipeline.finished(args.dir, args.overrides)
            summary = pipeline.resume(args.dir, quiet=args.quiet, overrides=args.overrides)
            if complete:
                keys = ", ".join(item.partition("=")[0] for item in args.overrides)
                recorded = f" (config.yaml records {keys})" if keys else ""
                _show(f"{args.dir} was already complete; nothing to train{recorded}. Its results:")
            _show(report.markdown_table({Path(args.dir).resolve().name: summary}))
        elif args.command == "analyze":
            for path in analyze.main(args):
                print(f"wrote {path}")
        else:
            report.main(args)
    except BrokenPipeError:   # the reader of the output left (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nor at exit's flush
        return 0 if args.command in ("report", "analyze") else 1   # their files are written by then
    except WriteError as error:   # a full disk, say: what was written before stays
        _error(args.command, error)
        if hint := _resume_hint(args):
            _show(f"swamp {args.command}: the run stopped{hint}", file=sys.stderr)
        return 1
    except (ValueError, OSError, BackendError) as error:   # bad input (ConfigError is one), files, backends
        _error(args.command, error)
        if started_here and os.path.isfile(os.path.join(args.out, "config.yaml")):   # mid-run: an unreadable image
            _show(f"swamp run: the run stopped; once that is fixed, continue with `swamp resume {args.out}`",
                  file=sys.stderr)
        return 2
    except DistributedError as error:   # every rank that sees the job fail says how to go on: rank 0 may be lost
        _error(args.command, error)
        if hint := _resume_hint(args):
            print(f"swamp {args.command}: the job stopped{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _show(f"\nswamp {args.command}: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
