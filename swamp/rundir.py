"""The files of a run directory: its layout, atomic writes, and reading them back.

    DIR/config.yaml          resolved config (``resume --set`` records its changes here)
    DIR/.started.yaml        the config the run started with: a resume refuses a config.yaml
                             changed in what the levels compute
    DIR/rewind.pt            state at the rewind point (parameters and buffers)
    DIR/level_XX/mask.pt     {weight name: bool mask} this level trained with
    DIR/level_XX/model.pt    final (averaged, BN-recomputed) state_dict
    DIR/level_XX/particles.pt   swamp only: the particles' final states, stacked ``[P, ...]``
    DIR/level_XX/metrics.json   written last: a level with it is complete
    DIR/summary.json         {"method", "levels": [metrics of each completed level]}
    DIR/checkpoint.pt        the stage in progress, every ``train.checkpoint_every`` epochs
    DIR/log.txt              one line per epoch; a resume adds a marker line and repeats the
                             epochs trained after the last checkpoint
    DIR/.lock                locked by the process training the run (:mod:`swamp.runlock`)

Every file is written atomically (temp file + ``os.replace``); a damaged file read back raises
:class:`DamagedFileError` naming it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch

from swamp.runlock import LOCK_NAME

__all__ = ["STARTED_CONFIG", "RESULT_FILES", "WriteError", "atomic_write", "remove_partial_writes", "DamagedFileError",
           "read_json", "load_file", "write_text", "write_json", "save", "level_dir", "level_numbers", "foreign_files",
           "existing_ancestor"]

_TEMP = re.compile(r"\..+\.tmp\d+")   # atomic_write's temporary files: .NAME.tmpPID
STARTED_CONFIG = ".started.yaml"
RESULT_FILES = ("rewind.pt", "checkpoint.pt", "summary.json", "log.txt")   # a run's, besides config and levels


class WriteError(OSError):
    """Writing a file failed (a full disk, a lost mount); the file is as it was before."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` then rename over ``path``: readers see the old file or the whole new one.
    A write that fails removes its temporary file (one killed mid-write leaves it for
    :func:`remove_partial_writes`) and raises :class:`WriteError` naming ``path`` (torch.save
    reports a full disk as a RuntimeError)."""
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if _failed_write(error):
            raise WriteError(f"writing {path} failed ({type(error).__name__}: {error}); "
                             f"the file is as it was before") from error
        raise


def _failed_write(error: BaseException) -> bool:
    """An OSError, or torch.save's writer reporting one (a RuntimeError; not a CUDA or NCCL error)."""
    if isinstance(error, WriteError):
        return False
    return isinstance(error, OSError) or isinstance(error, RuntimeError) and any(
        mark in str(error) for mark in ("PytorchStreamWriter", "inline_container", "file write failed"))


def remove_partial_writes(out: Path) -> None:
    """Delete the temporary files of writes killed in ``out`` and its level directories."""
    for temp in [*out.iterdir(), *(f for d in out.glob("level_*") if d.is_dir() for f in d.iterdir())]:
        if _TEMP.fullmatch(temp.name) and temp.is_file():
            temp.unlink(missing_ok=True)


class DamagedFileError(ValueError):
    """A run's file that cannot be read back (truncated, overwritten, a failed copy)."""


def read_json(path: Path):
    """The JSON value in ``path``; DamagedFileError naming it when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as error:   # not JSON, or not even UTF-8 text
        raise DamagedFileError(f"{path} is damaged: not valid JSON ({error})") from None


def load_file(path: Path, **kwargs):
    """``torch.load(path, **kwargs)``; DamagedFileError naming it when it is no readable file."""
    try:
        return torch.load(path, **kwargs)
    except OSError:   # a missing or unreadable file: its own clear error
        raise
    except Exception as error:   # torch.load fails on damage in many ways (KeyError, struct.error, ...)
        raise DamagedFileError(f"{path} is damaged: not a readable torch.save file "
                               f"({type(error).__name__}: {error})") from None


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda t: t.write_text(text))


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def save(path: Path, value) -> None:
    atomic_write(path, lambda t: torch.save(value, t))


def level_dir(out: Path, level: int) -> Path:
    """The directory of level ``level`` of the run in ``out``."""
    return Path(out) / f"level_{level:02d}"


def existing_ancestor(path: Path) -> Path:
    """``path`` itself, else its nearest parent folder that exists (``/`` always does): where a
    file or folder at ``path`` would be made (unless it is a file)."""
    return next(p for p in (path, *path.parents) if p.exists())


def level_numbers(out: Path, complete: bool = False) -> list[int]:
    """The levels of the run in ``out`` that have a folder (with ``complete``: and ``metrics.json``), ascending."""
    return sorted(int(p.name[len("level_"):]) for p in Path(out).glob("level_*")
                  if re.fullmatch(r"level_\d+", p.name) and (p / "metrics.json" if complete else p).exists())


_RUN_FILES = re.compile("|".join(map(re.escape, (*RESULT_FILES, "config.yaml", STARTED_CONFIG, LOCK_NAME)))
                        + "|" + _TEMP.pattern)
_LEVEL_FILES = re.compile(r"(mask|model|particles)\.pt|metrics\.json|" + _TEMP.pattern)


def foreign_files(out: Path) -> list[Path]:
    """What the run directory ``out`` holds that no run writes (the user's own files and folders)."""
    found = []
    for path in Path(out).iterdir():
        if re.fullmatch(r"level_\d+", path.name) and path.is_dir():
            found += [p for p in path.iterdir() if not (_LEVEL_FILES.fullmatch(p.name) and p.is_file())]
        elif not (_RUN_FILES.fullmatch(path.name) and path.is_file()):
            found.append(path)
    return found
