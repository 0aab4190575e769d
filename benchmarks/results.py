"""The results file: its schema, validation, merging, atomic writing and markdown rendering.

One schema for every benchmark (DESIGN.md section 5)::

    {"gpu": str, "torch": str, "triton": str, "commit": str, "date": str,
     "copy_bandwidth_gbs": float,
     "results": [{"op": str, "case": str, "backend": str, "time_ms": float,
                  "floor_ms": float | None, "baselines": {name: time_ms}, "extra": {...}}]}

A GPU's file is ``<out>/<gpu-slug>.json`` next to its rendered table ``<gpu-slug>.md``.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

HEADER_FIELDS = {"gpu": str, "torch": str, "triton": str, "commit": str, "date": str,
                 "copy_bandwidth_gbs": float}
RESULT_FIELDS = {"op": str, "case": str, "backend": str, "time_ms": float,
                 "floor_ms": (float, type(None)), "baselines": dict, "extra": dict}


# ----------------------------------------------------------------------------- schema
def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return False
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _fields(where: str, obj, fields: dict) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object, got {type(obj).__name__}")
    if set(obj) != set(fields):
        missing, unknown = sorted(set(fields) - set(obj)), sorted(set(obj) - set(fields))
        raise ValueError(f"{where} has missing keys {missing} and unknown keys {unknown}")
    for key, kind in fields.items():
        if not _is(obj[key], kind):
            raise ValueError(f"{where}.{key} has type {type(obj[key]).__name__}, expected {kind}")


def _positive(where: str, value) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be finite and > 0, got {value!r}")


def validate(doc) -> None:
    """Raise ValueError naming the first field of ``doc`` that breaks the schema."""
    _fields("document", doc, {**HEADER_FIELDS, "results": list})
    _positive("document.copy_bandwidth_gbs", doc["copy_bandwidth_gbs"])
    seen = set()
    for i, row in enumerate(doc["results"]):
        where = f"results[{i}]"
        _fields(where, row, RESULT_FIELDS)
        _positive(f"{where}.time_ms", row["time_ms"])
        if row["floor_ms"] is not None:
            _positive(f"{where}.floor_ms", row["floor_ms"])
        for name, ms in row["baselines"].items():
            if not isinstance(name, str) or not _is(ms, float):
                raise ValueError(f"{where}.baselines[{name!r}] must map a name to a time in ms")
            _positive(f"{where}.baselines[{name!r}]", ms)
        key = result_key(row)
        if key in seen:
            raise ValueError(f"{where} repeats (op, case, backend) = {key}")
        seen.add(key)


def result_key(row: dict) -> tuple[str, str, str]:
    """What identifies a result: a new run replaces the old result with the same key."""
    return row["op"], row["case"], row["backend"]


# ------------------------------------------------------------------------- documents
def _commit() -> str:
    """``SWAMP_COMMIT`` if set (a copy of the tree without ``.git``, as on a lent GPU machine),
    else git's HEAD (``-dirty`` with uncommitted changes), else ``unknown``."""
    if os.environ.get("SWAMP_COMMIT"):
        return os.environ["SWAMP_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


SMOKE_GPU = "cpu-smoke"   # the gpu of a --smoke run's document: a harness check, never results


def new_document(gpu: str, copy_bandwidth_gbs: float) -> dict:
    """An empty results document stamped with this run's software, commit and UTC date."""
    return {"gpu": gpu, "torch": torch.__version__, "triton": _version("triton"),
            "commit": _commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bandwidth_gbs": float(copy_bandwidth_gbs), "results": []}


def _stamped(row: dict, doc: dict) -> dict:
    """``row`` with its run's copy bandwidth, commit and date in ``extra`` (kept if already
    there): a merged file's header describes its latest run only."""
    return {**row, "extra": {"copy_bandwidth_gbs": doc["copy_bandwidth_gbs"], "commit": doc["commit"],
                             "date": doc["date"], **row["extra"]}}


def _run_date(row: dict) -> str:
    """The UTC date (ISO 8601, comparable as text) of the run that measured ``row``; "" if unknown."""
    return row["extra"].get("date", "")


def merge(old: dict | None, new: dict) -> dict:
    """The results of ``old`` and ``new``; of two with one key, the later run's (``new``'s on a
    tie), so files merged in any order give the same rows. The header is the later document's.

    Results keep the order of ``old``; a replaced result stays in its place. Every result
    carries its own run's copy bandwidth, commit and date in ``extra``.
    """
    fresh = {result_key(r): _stamped(r, new) for r in new["results"]}

    def later(row: dict) -> dict:
        other = fresh.pop(result_key(row), None)
        return row if other is None or _run_date(row) > _run_date(other) else other
    rows = [later(r) for r in (old["results"] if old else [])]
    header = old if old is not None and old["date"] > new["date"] else new
    return {**header, "results": rows + list(fresh.values())}


def gpu_slug(gpu: str) -> str:
    """File-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "unknown-device"


# ------------------------------------------------------------------------------- files
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: Path) -> dict | None:
    """The validated document at ``path``, or None if there is no such file."""
    path = Path(path)
    if not path.exists():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    try:
        validate(doc)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return doc


def save(doc: dict, out_dir: Path) -> Path:
    """Merge ``doc`` into ``out_dir/<gpu-slug>.json``, rewrite it and its ``.md``; return the json path."""
    validate(doc)
    path = Path(out_dir) / f"{gpu_slug(doc['gpu'])}.json"
    merged = merge(load(path), doc)
    validate(merged)
    atomic_write_text(path, json.dumps(merged, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), markdown(merged))
    return path


# ---------------------------------------------------------------------------- markdown
def _ms(t: float) -> str:
    digits = 0 if t >= 100 else 1 if t >= 10 else 2 if t >= 1 else 3
    return f"{t:.{digits}f} ms"


def _ratio(r: float) -> str:
    return f"{r:.2f}×"


def _bytes(b: float) -> str:
    return f"{b:.2f}"


def _rate(r: float) -> str:
    return f"{r:,.0f}"


# Workload extras shown as columns: op -> (speed-up columns shown?, [(extra key, header, format)]).
# A dict-valued extra gives one column per key ("<header> <key>"). Training steps of different
# particle counts process different numbers of images, so their tables show images/s instead of
# per-step speed-ups.
EXTRA_COLUMNS: dict[str, tuple[bool, list[tuple[str, str, Callable[[float], str]]]]] = {
    "masked_conv2d": (True, [("extra_bytes_per_weight", "+B/weight", _bytes)]),
    "masked_linear": (True, [("extra_bytes_per_weight", "+B/weight", _bytes)]),
    "particles_train_step": (False, [("images_per_second", "img/s", _rate),
                                     ("speedup_concurrent_over_sequential", "concurrent/sequential", _ratio),
                                     ("speedup_compiled_concurrent_over_sequential",
                                      "compiled concurrent/sequential", _ratio)]),
    "resnet50_train_step": (False, [("images_per_second", "img/s", _rate),
                                    ("throughput_ratio_to_dense", "img/s vs dense", _ratio)]),
}
# Op cases (every other op): the host time of a call, to tell a host-bound op from a slow kernel.
OP_CASE_COLUMNS = (True, [("host_ms", "host", _ms)])


def _extra_columns(op: str, rows: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
    """(header, row -> cell) for the extras of ``op`` that ``rows`` have."""
    columns = []
    for key, header, fmt in EXTRA_COLUMNS.get(op, OP_CASE_COLUMNS)[1]:
        values = [r["extra"].get(key) for r in rows]
        if any(isinstance(v, dict) for v in values):
            for sub in dict.fromkeys(k for v in values if isinstance(v, dict) for k in v):
                columns.append((f"{header} {sub}", lambda r, key=key, sub=sub, fmt=fmt: _cell(
                    (r["extra"].get(key) or {}).get(sub), fmt)))
        elif any(v is not None for v in values):
            columns.append((header, lambda r, key=key, fmt=fmt: _cell(r["extra"].get(key), fmt)))
    return columns


def _cell(value, fmt: Callable[[float], str]) -> str:
    return "–" if value is None else fmt(value)


def _table(rows: list[dict]) -> list[str]:
    op = rows[0]["op"]
    names = list(dict.fromkeys(name for r in rows for name in r["baselines"])) \
        if EXTRA_COLUMNS.get(op, OP_CASE_COLUMNS)[0] else []
    extras = _extra_columns(op, rows)
    head = ["op", "case", "backend", "time", "time/floor", *(f"vs {n}" for n in names),
            *(h for h, _ in extras)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        floor = "–" if r["floor_ms"] is None else _ratio(r["time_ms"] / r["floor_ms"])
        speedups = [_ratio(r["baselines"][n] / r["time_ms"]) if n in r["baselines"] else "–"
                    for n in names]
        cells = [r["op"], r["case"], r["backend"], _ms(r["time_ms"]), floor, *speedups,
                 *(cell(r) for _, cell in extras)]
        lines.append("| " + " | ".join(f"`{c}`" if i < 3 else c for i, c in enumerate(cells)) + " |")
    return lines


def markdown(doc: dict, heading: str = "##") -> str:
    """Tables of ``doc``, one per op: time, time/floor, speed-up (baseline time / time) and the
    extras of ``EXTRA_COLUMNS`` (workloads) or ``OP_CASE_COLUMNS`` (op cases)."""
    runs = [r["extra"] for r in doc["results"]]
    bandwidths = sorted({run.get("copy_bandwidth_gbs", doc["copy_bandwidth_gbs"]) for run in runs}
                        or {doc["copy_bandwidth_gbs"]})
    commits = list(dict.fromkeys(run.get("commit", doc["commit"]) for run in runs)) or [doc["commit"]]
    bandwidth = (f"{bandwidths[0]:.0f} GB/s" if len(bandwidths) == 1 else
                 f"{bandwidths[0]:.0f}–{bandwidths[-1]:.0f} GB/s over {len(bandwidths)} runs (each row's "
                 "floor uses its run's)")
    lines = [f"{heading} {doc['gpu']}", "",
             f"Copy bandwidth {bandwidth} (read + write); torch {doc['torch']}, triton {doc['triton']}; "
             f"commit {', '.join(f'`{c}`' for c in commits)}; last run {doc['date']}. "
             "`time/floor`: time over the bandwidth floor (1.00× is the floor); "
             "`vs X`: speed-up over baseline X (X's time / time).", ""]
    ops = dict.fromkeys(r["op"] for r in doc["results"])
    for op in ops:
        lines += _table([r for r in doc["results"] if r["op"] == op]) + [""]
    if not ops:
        lines += ["No results.", ""]
    return "\n".join(lines)
