"""The IMP / SWAMP pipeline: pretrain to the rewind point, then levels of train -> average -> prune -> rewind.

Methods: ``dense`` (level 0 only), ``imp`` (one particle), ``imp_swa`` (one particle with SWA),
``swamp`` (``particles`` particles with SWA, averaged), ``random`` (IMP's schedule with random
instead of magnitude pruning), ``snip``, ``grasp``, ``synflow`` (one network, each level's mask
pruned at the rewind point by :mod:`swamp.saliency`'s scores). With ``masks.source`` the levels
train under another run's masks (shuffled, if ``masks.shuffle`` says so) instead of pruning.
The run directory's files: :mod:`swamp.rundir`.

A killed run resumes from its last checkpoint (at most ``train.checkpoint_every`` epochs lost).
All randomness comes from generators seeded by ``(seed, stage, particle, epoch)`` (see
:mod:`swamp.train`) and the model initialisation from ``seed``, so a resumed run ends bitwise
equal to an uninterrupted one on the CPU.

Under ``torchrun`` (see :mod:`swamp.distributed`) every rank runs this same code: particle
groups train their particles, the level's average and evaluation go through collectives
(test batches are split over ranks, accuracies summed from correct-prediction counts),
every rank ends the level with rank 0's masks and weights, and rank 0 alone writes. The run
directory must be readable by every rank (a shared filesystem) for ``swamp resume``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

import swamp_kernels
from torch.distributed import DistError

from swamp import distributed, evaluate, saliency
from swamp.config import (REWIND_POINT_METHODS, Config, ConfigError, DataConfig, MasksConfig, apply_overrides,
                          changed_keys, dump, factory_file, from_dict, load, to_dict, validate, validate_new_run)
from swamp.data import SampledBatches, derive_seed, input_spec, load_data
from swamp.distributed import Group, Placement, Topology
from swamp.imp import collapse_warning, emptied_layers, next_masks, shuffled_masks
from swamp.models import build_model
from swamp.rundir import (RESULT_FILES, STARTED_CONFIG, DamagedFileError, existing_ancestor, foreign_files, level_dir,
                          level_numbers, load_file, read_json, remove_partial_writes, save, write_json, write_text)
from swamp.runlock import RunLock, holder as lock_holder
from swamp.sparsify import masks as model_masks, set_masks, shared_masks, sparsify
from swamp.train import learning_rate, stack_state, train_particles

__all__ = ["run", "resume", "dry_run", "is_dry_run", "check", "finished", "run_config", "result_changes",
           "begins_from_previous_level", "fine_tuning_rate", "DRY_RUN_STEPS"]

DRY_RUN_STEPS = 20


def dry_run(config: Config) -> Config:
    """``config`` on synthetic data of its dataset's input shape and classes: levels 0 and 1 (at
    most) of one epoch of ``DRY_RUN_STEPS`` steps from initialisation, for measuring throughput
    (level 1 pruned by the config's method: a masks.source run is not read)."""
    if config.data.name == "imagenet" and not (Path(config.data.path) / "train").is_dir():
        shape, classes = [3, config.data.image_size, config.data.image_size], 1000   # ImageNet-1k, no data
    else:
        shape, classes = input_spec(config.data)
    batch = config.train.batch_size
    data = DataConfig(name="synthetic", shape=shape, classes=classes, augment=False,
                      train_size=DRY_RUN_STEPS * batch, test_size=batch)
    train = dataclasses.replace(config.train, epochs=1, warmup_epochs=0.0, milestones=[], checkpoint_every=0)
    return dataclasses.replace(config, data=data, train=train, levels=min(config.levels, 1),
                               rewind=dataclasses.replace(config.rewind, iterations=0), masks=MasksConfig())


def is_dry_run(out: str | Path) -> bool:
    """True when ``out`` holds a run of a :func:`dry_run` config (False when it holds no readable run)."""
    try:
        config = run_config(Path(out))
    except (OSError, ValueError):   # unreadable: no dry run (never raised on rank 0 alone)
        return False
    return config.data.name == "synthetic" and config == dry_run(config)


def _holds_dry_run(out: Path) -> bool:
    """True when ``out`` holds a run of a :func:`dry_run` config and nothing else."""
    try:
        return is_dry_run(out) and not foreign_files(out)
    except OSError:   # never raised on rank 0 alone
        return False


def _unwritable(out: Path) -> str | None:
    """Why the folder ``out`` cannot be made or written (None: it looks fine), asked before the
    run loads anything: the folder itself is made only once every check has passed."""
    try:
        if out.is_symlink() and not out.exists():
            return f"{out} is a link to nothing (to {os.readlink(out)}): pick another --out"
        if out.exists() and not out.is_dir():
            return f"{out} is a file, not a folder: pick another --out"
        existing = existing_ancestor(out)
        if not existing.is_dir():
            return f"{out} cannot be made: {existing} is a file"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{out} cannot be {'written' if existing == out else 'made'}: no write permission on {existing}"
    except OSError as error:   # a parent that cannot be entered
        return f"{out} cannot be made: {error}"
    return None


def _claim(out: Path, replace_dry_run: bool) -> str | None:
    """Why a new run cannot start in ``out`` (None: it can), once an earlier dry run there is
    removed if ``replace_dry_run``. Rank 0 decides: it returns, never raises, what every rank raises."""
    if unwritable := _unwritable(out):
        return unwritable
    if replace_dry_run and _holds_dry_run(out):
        taken_by = lock_holder(out)
        if taken_by:
            return f"{out} is being trained by {taken_by}; wait for it to end (or stop it) first"
        try:
            shutil.rmtree(out)
        except OSError as error:
            return f"{out}: removing the earlier dry run failed ({error})"
    if not (out / "config.yaml").exists():
        levels = [level_dir(out, level).name for level in level_numbers(out)]
        results = [name for name in RESULT_FILES if (out / name).exists()] + levels
        if results:
            return (f"{out} holds the files of a run ({', '.join(results)}) but no config.yaml (deleted, or a "
                    "removal stopped midway): a new run would take them for its own; delete them or pick another --out")
        return None
    if replace_dry_run:
        others = ", ".join(str(p.relative_to(out)) for p in foreign_files(out)[:5])
        return (f"{out} already holds a run that is not a dry run" + (f", or files besides one ({others})"
                if others else "") + "; a dry run replaces only an earlier dry run: pick another --out")
    if _holds_dry_run(out):
        return f"{out} holds a dry run (synthetic data, to measure speed): pick another --out, or delete it first"
    return f"{out} already holds a run; continue it with `swamp resume {out}`"


def run(config: Config, out: str | Path, quiet: bool = False, replace_dry_run: bool = False) -> dict:
    """Start a new run of ``config`` in directory ``out``; returns the summary.

    ``out`` must not hold a run, except with ``replace_dry_run`` an earlier :func:`dry_run`'s,
    which is deleted. Under ``torchrun`` every rank calls this with the same arguments."""
    validate(config)
    validate_new_run(config)
    swamp_kernels.preferred_backend()   # a bad SWAMP_KERNELS_BACKEND fails before the run starts
    out = Path(out)

    def start(topology: Topology) -> dict:
        problem = topology.world.broadcast_object(_claim(out, replace_dry_run) if topology.is_writer else None)
        if problem:
            raise FileExistsError(problem)
        return _execute(config, out, quiet, topology, new=True)
    return _distributed(config, start)


def run_config(out: Path) -> Config:
    """The config of the run in ``out`` (its config.yaml); a missing or damaged one is named."""
    if not out.is_dir():
        raise FileNotFoundError(f"{out} does not exist" if not out.exists() else f"{out} is no run directory (a file)")
    if not (out / "config.yaml").is_file():
        raise FileNotFoundError(f"{out} holds no run (no config.yaml)")
    if not (out / "config.yaml").read_text().strip():   # a run's is never empty (an empty config is all defaults)
        raise DamagedFileError(f"{out / 'config.yaml'} is damaged: empty")
    return load(out / "config.yaml", check_paths=False)


# What ``resume --set`` (or an edit of the run's config.yaml) may change: where and how the run
# executes, and how many levels it trains (not fewer than it has reached); never what a level computes.
RESUME_KEYS = ("data.path", "data.workers", "device", "distributed.particle_groups", "distributed.timeout_s",
               "train.checkpoint_every", "levels")
# Keys that may also change where what they name moved (see _moved): what a move keeps the same.
MOVABLE_KEYS = {"model.name": ("a factory file that moved", "the same file name and function"),
                "masks.source": ("a source run that moved", "a folder of the same name")}


def result_changes(a: Config, b: Config, across_runs: bool = False) -> list[tuple[str, Any, Any]]:
    """:func:`~swamp.config.changed_keys` of ``a`` and ``b`` that change what a run's levels
    compute: not those of :data:`RESUME_KEYS`, nor a factory file or source run that moved from
    ``a``'s place to ``b``'s (``b`` a later config of ``a``'s run). ``across_runs`` (the configs
    of two runs, as report --merge-seeds compares them): factory files of one file name and
    function are one model wherever they lie; source runs in two places are two sources."""
    def same(key: str, then, now) -> bool:
        return key == "model.name" and _same_factory(then, now) if across_runs else _moved(key, then, now)
    return [(key, then, now) for key, then, now in changed_keys(a, b)
            if key not in RESUME_KEYS and not same(key, then, now)]


def _same_factory(then: str, now: str) -> bool:
    """Whether model.names ``then`` and ``now`` are both a ``file.py:function`` of one file name and function."""
    old, new = factory_file(then), factory_file(now)
    return bool(old and new) and (Path(old[0]).name, old[1]) == (Path(new[0]).name, new[1])


def _moved(key: str, then, now) -> bool:
    """Whether ``key`` went from ``then`` to ``now`` only because what it names moved: model.name
    a factory of one file name and function, masks.source a folder of one name; and nothing left
    at the old place (while the old one is there, the new one is another)."""
    if key == "model.name":
        return _same_factory(then, now) and not Path(factory_file(then)[0]).exists()
    return (key == "masks.source" and bool(then and now) and Path(then).name == Path(now).name
            and not (Path(then) / "config.yaml").exists())


def _reached_level(out: Path) -> int:
    """The highest level the run in ``out`` has begun to write or train (-1: none)."""
    reached = max(level_numbers(out), default=-1)
    path = out / "checkpoint.pt"
    try:
        checkpoint = load_file(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:   # none, or just removed by the run finishing its stage
        return reached
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("stage"), int):
        raise DamagedFileError(f"{path} is damaged: no checkpoint of a training stage")
    return max(reached, checkpoint["stage"])


def _resume_config(out: Path, overrides: Sequence[str] = (), warn: bool = True) -> Config:
    """The run's config.yaml with ``overrides`` (keys of :data:`RESUME_KEYS` only); ConfigError
    where it differs from the config the run started with in any other key (an edited file), or
    where its levels would end below a level the run has reached. ``warn``: when the run has no
    record of its starting config."""
    before = run_config(out)
    for item in overrides:
        key = item.partition("=")[0]
        if key not in (*RESUME_KEYS, *MOVABLE_KEYS):
            raise ConfigError(f"resume --set {item!r}: {key!r} would change the run's results; resume can "
                              f"change only {', '.join(RESUME_KEYS)} (and {' or '.join(MOVABLE_KEYS)} to "
                              "where a factory file or source run moved)")
    config = from_dict(apply_overrides(to_dict(before), overrides))
    for key, then, now in changed_keys(before, config):
        if key in MOVABLE_KEYS and not _moved(key, then, now):
            what, rule = MOVABLE_KEYS[key]
            raise ConfigError(f"resume --set {key}={now}: only {what} may be named anew ({rule}; the old, "
                              f"{then}, gone)")
    if not (out / STARTED_CONFIG).is_file():   # a run started before it was kept, or deleted
        if warn:
            warnings.warn(f"{out} has no {STARTED_CONFIG}: this resume cannot check its config.yaml against the "
                          "config the run started with (later resumes check against this one's)", stacklevel=3)
    else:
        started = load(out / STARTED_CONFIG, check_paths=False)
        changed = [f"{key}: {now!r}, started with {then!r}" for key, then, now in result_changes(started, config)]
        if changed:
            raise ConfigError(f"{out}/config.yaml differs from the config the run started with ({out / STARTED_CONFIG}) "
                              f"in what its levels compute: {'; '.join(changed)}. Put it back; resume can change "
                              f"only {', '.join(RESUME_KEYS)}")
    # Levels are trained in order: only a run complete up to ``levels`` can have gone past them.
    if config.method != "dense" and _all_levels_done(out, config):
        reached = _reached_level(out)
        if config.levels < reached:
            raise ConfigError(f"config key 'levels': {config.levels} is below level {reached}, which the run in "
                              f"{out} has reached already; a run's levels can only grow")
    return config


def resume(out: str | Path, quiet: bool = False, overrides: Sequence[str] = ()) -> dict:
    """Continue the run in ``out`` from its last checkpoint; returns the summary. ``overrides``
    (``key=value``) may change the keys of :data:`RESUME_KEYS` (a moved data set, another distributed layout,
    more levels), which the run's ``config.yaml`` then keeps. A finished run returns its stored
    summary and needs nothing else (no data, device or other ranks); its ``config.yaml`` still
    records ``overrides`` (a moved data set, for the analyses)."""
    out = Path(out)
    config = _resume_config(out, overrides)
    done = _all_levels_done(out, config)
    try:
        validate(config, check_paths=bool(overrides) or not done)   # a finished run needs no data
    except ConfigError as error:
        if "data.path" not in str(error) or any(item.startswith("data.path=") for item in overrides):
            raise
        raise ConfigError(f"{error}; if the data set moved: `swamp resume {out} --set data.path=NEW`") from error
    if config.masks.source and not done and not (Path(config.masks.source) / "config.yaml").is_file():
        raise ConfigError(f"config key 'masks.source': {config.masks.source} holds no run (no config.yaml)"
                          + ("" if any(item.startswith("masks.source=") for item in overrides) else
                             f"; if the source run moved: `swamp resume {out} --set masks.source=NEW`"))
    def finish(locked: bool = False) -> dict:
        """The finished run's summary; ``locked``: this process holds the run's lock."""
        if _writes_finished_run():
            if locked or lock_holder(out) is None:   # not while another process ends the run
                remove_partial_writes(out)   # of a kill after the last level was written
                (out / "checkpoint.pt").unlink(missing_ok=True)
            if overrides:   # e.g. a moved data set, for the analyses
                write_text(out / "config.yaml", dump(config))
            if not (out / STARTED_CONFIG).exists():   # checked from now on
                write_text(out / STARTED_CONFIG, dump(config))
        return _finished_summary(out)
    if done:
        return finish()
    swamp_kernels.preferred_backend()

    def body(topology: Topology) -> dict:
        with _run_lock(out, topology):   # before loading anything: a live run is refused at once
            if topology.world.broadcast_object(_all_levels_done(out, config) if topology.is_writer else None):
                return finish(locked=True)   # finished by its last holder since the check above
            return _execute(config, out, quiet, topology)
    return _distributed(config, body)


def begins_from_previous_level(config: Config, level: int) -> bool:
    """Whether ``level`` trains from the previous level's solution (rewind.mode lr or finetune,
    past level 0) rather than from the rewind point's weights (under its own mask either way)."""
    return config.rewind.mode in ("lr", "finetune") and level > 0


def fine_tuning_rate(config: Config, level: int, steps_per_epoch: int) -> float | None:
    """The constant learning rate ``level`` trains at (rewind.mode finetune, past level 0: the
    schedule's last rate), or None: the schedule from the rewind point on."""
    if config.rewind.mode != "finetune" or level == 0:
        return None
    return learning_rate(config.train.epochs * steps_per_epoch - 1, steps_per_epoch, config.train)


def _levels(config: Config) -> range:
    """The level numbers of a run of ``config``: 0 (dense) to ``levels``."""
    return range((0 if config.method == "dense" else config.levels) + 1)


def finished(out: str | Path, overrides: Sequence[str] = ()) -> bool:
    """True when the run in ``out`` has completed all its levels (``resume`` with ``overrides``,
    e.g. ``levels=15``, trains nothing)."""
    out = Path(out)
    return _all_levels_done(out, _resume_config(out, overrides, warn=False))


def _all_levels_done(out: Path, config: Config) -> bool:
    return all((level_dir(out, level) / "metrics.json").is_file() for level in _levels(config))


def level_count(out: str | Path) -> int:
    """How many levels the run in ``out`` trains when finished (level 0 included)."""
    return len(_levels(run_config(Path(out))))


def _number(value) -> bool:
    """A JSON number (not a bool, which Python counts as an int)."""
    return type(value) in (int, float)


def completed_levels(out: str | Path) -> dict:
    """The summary of the run in ``out`` as its level directories tell it: the levels complete
    from level 0 on (what ``summary.json`` holds, should that be missing or damaged)."""
    out = Path(out)
    config = run_config(out)
    levels = []
    for level in _levels(config):
        path = level_dir(out, level) / "metrics.json"
        if not path.is_file():
            break
        metrics = read_json(path)
        if not (isinstance(metrics, dict) and all(_number(metrics.get(key)) for key in ("density", "test_accuracy"))):
            raise DamagedFileError(f"{path} is damaged: no density and test_accuracy numbers")
        particles = metrics.get("particle_test_accuracy", [])
        if not (isinstance(particles, list) and all(map(_number, particles))
                and _number(metrics.get("ensemble_test_accuracy", 0.0))):
            raise DamagedFileError(f"{path} is damaged: particle_test_accuracy is no list of numbers or "
                                   "ensemble_test_accuracy no number")
        levels.append(metrics)
    return {"method": config.method, "levels": levels}


def _finished_summary(out: Path) -> dict:
    """The summary of the finished run in ``out``, from its levels' metrics; ``summary.json`` is
    rewritten (rank 0) if a kill came between the last level's metrics and it, or it is damaged."""
    summary = completed_levels(out)
    path = out / "summary.json"
    try:
        stale = read_json(path) != summary
    except (FileNotFoundError, DamagedFileError):
        stale = True
    if stale and _writes_finished_run():
        write_json(path, summary)
    return summary


def _writes_finished_run() -> bool:
    """Whether this process writes a finished run's files: rank 0 of a torchrun job (which, with
    nothing to train, joins no process group), or a lone process."""
    return os.environ.get("RANK", "0") == "0"


def _failed_collective(error: RuntimeError) -> bool:
    """NCCL's errors are DistErrors; gloo's (DDP's gradient all-reduce) plain RuntimeErrors
    raised from its sources."""
    return isinstance(error, DistError) or "gloo" in str(error)


def _distributed(config: Config, body: Callable[[Topology], dict]) -> dict:
    """``body(topology)`` in this process's place of the (possibly single-process) job."""
    topology = distributed.setup(config.distributed.particle_groups, config.distributed.timeout_s,
                                 config.device)
    try:
        summary = body(topology)
    except RuntimeError as error:   # of collectives outside ours: NCCL's, gloo's under DDP
        if isinstance(error, distributed.DistributedError) or not _failed_collective(error):
            raise
        raise distributed.collective_failure(
            f"rank {topology.world.index} of {topology.world.size}: a collective",
            config.distributed.timeout_s, error) from error
    distributed.teardown()
    return summary


def _prune(config: Config, level: int, state: dict, masks: dict) -> dict:
    """The next masks: ``prune_fraction`` of the remaining weights (of all layers together, or
    of each layer: ``prune.scope``), by magnitude or at random."""
    return next_masks(state, masks, config.prune_fraction, scope=config.prune.scope,
                      criterion="random" if config.method == "random" else "magnitude",
                      seed=derive_seed(config.seed, level))


def _per_weight(select: Callable[[dict], dict], masks: dict, tied: dict) -> dict:
    """``select`` on the masks of the distinct weights (a weight that several layers share once,
    by its first name: ``tied`` maps every name to it), its choice given to every name of each."""
    chosen = select({first: masks[first] for first in dict.fromkeys(tied.values())})
    return {name: chosen[tied[name]] for name in masks}


def _mask_schedule(config: Config, model, rewind_state: dict, data, tied: dict,
                   world: Group) -> Callable[[int, dict, dict], dict]:
    """``next_masks(level, state, masks)``: level ``level + 1``'s masks from level ``level``'s
    ``masks`` and final ``state``, one per weight (``tied``): pruned by magnitude or at random
    (:func:`_prune`), pruned at the rewind point (:func:`_rewind_point_pruning`), or those
    masks.source gives (:func:`_source_masks`)."""
    if config.masks.source:
        return lambda level, state, masks: _source_masks(config, level + 1, masks, tied, world)
    if config.method in REWIND_POINT_METHODS:
        select = _rewind_point_pruning(config, model, rewind_state, data)
        return lambda level, state, masks: _per_weight(select, masks, tied)
    return lambda level, state, masks: _per_weight(
        lambda distinct: _prune(config, level, {n: state[n] for n in distinct}, distinct), masks, tied)


def _rewind_point_pruning(config: Config, model, rewind_state: dict, data) -> Callable[[dict], dict]:
    """``select(masks)`` of a snip, grasp or synflow run: ``prune_fraction`` of the weights
    ``masks`` keep pruned by the scores of the dense network at the rewind point. SNIP's and
    GraSP's are computed here, once, on ``prune.score_batches`` training batches drawn at random,
    so each level's mask is their one-shot mask of its density; SynFlow prunes the dense network
    in its rounds down to each level's count, level 1's here. Here is before level 0 trains (the
    model's masks all True): a network the scores do not fit (memory, overflow) fails at once."""
    net = evaluate.network(model, rewind_state)
    dense = {first: mask.clone() for first, (mask, _) in shared_masks(model).items()}
    fraction = config.prune_fraction
    if config.method == "synflow":
        found = {}   # {weights kept: masks} computed ahead: level 1's

        def synflow(masks: dict) -> dict:
            kept = sum(int(m.sum()) for m in masks.values())
            keep = kept - round(fraction * kept)
            chosen = found.pop(keep) if keep in found else saliency.synflow_masks(net, data.input_shape, keep=keep)
            return {first: chosen[first] for first in masks}
        total = sum(int(m.sum()) for m in dense.values())
        found[total - round(fraction * total)] = synflow(dense)
        return synflow
    # stage -2 (-1 is pre-training): the same batches on every rank and resume
    batches = SampledBatches(data, config.prune.score_batch_size or config.train.batch_size,
                             config.prune.score_batches, seed=derive_seed(config.seed, -2))
    scores = (saliency.snip_scores if config.method == "snip" else saliency.grasp_scores)(net, batches)
    return lambda masks: next_masks(scores, masks, fraction, scores=scores)


def _source_masks(config: Config, level: int, like: dict, tied: dict, world: Group) -> dict:
    """The mask the run in masks.source trained level ``level`` under, shuffled as masks.shuffle
    says, one per weight (``tied``): rank 0 reads it and tells every rank what is wrong with it
    (ConfigError), the caller broadcasts it. ``like``: this run's masks, whose names and shapes it
    must have."""
    masks, problem, shuffle = {n: torch.empty_like(m) for n, m in like.items()}, None, config.masks.shuffle
    if world.index == 0:
        try:
            masks = _per_weight(lambda distinct: distinct if shuffle == "none" else
                                shuffled_masks(distinct, shuffle, seed=derive_seed(config.seed, level)),
                                _read_source_masks(Path(config.masks.source), level, like, _levels(config)[-1]), tied)
        except (OSError, ValueError) as error:
            problem = f"config key 'masks.source': {error}"
    if problem := world.broadcast_object(problem):
        raise ConfigError(problem)
    return masks


def _read_source_masks(source: Path, level: int, like: dict, reaching: int) -> dict:
    """Level ``level``'s mask of the run in ``source``, checked against ``like`` and that the
    source plans the levels up to ``reaching`` (this run's last)."""
    config = run_config(source)
    if config.method == "dense" or is_dry_run(source):
        raise ConfigError(f"the run in {source} is a dense run: it prunes nothing" if config.method == "dense" else
                          f"the run in {source} is a dry run: its masks come from a few steps on synthetic data")
    last = _levels(config)[-1]
    if last < reaching:
        raise ConfigError(f"the run in {source} trains levels 0 to {last}, not up to level {reaching}: give this "
                          f"run fewer levels, or extend that one (`swamp resume {source} --set levels={reaching}`)")
    if not (level_dir(source, level) / "metrics.json").is_file():
        raise ConfigError(f"the run in {source} has not completed level {level} yet: "
                          f"{'resume this run' if level else 'try again'} once it has")
    path = level_dir(source, level) / "mask.pt"
    masks = load_file(path, map_location="cpu", weights_only=True)
    if not isinstance(masks, dict) or set(masks) != set(like):
        theirs = set(masks) if isinstance(masks, dict) else set()
        raise ConfigError(f"{path} masks other weights than this run prunes (only there: "
                          f"{', '.join(sorted(theirs - set(like))[:4]) or 'none'}; only here: "
                          f"{', '.join(sorted(set(like) - theirs)[:4]) or 'none'}): the source must prune the same "
                          "model with the same prune.exclude")
    for name, mask in like.items():
        theirs = masks[name]
        if not isinstance(theirs, torch.Tensor) or theirs.dtype != torch.bool or theirs.shape != mask.shape:
            raise ConfigError(f"{path}: {name} is no bool mask of shape {tuple(mask.shape)} like this run's weight")
    return {name: masks[name].to(mask.device) for name, mask in like.items()}


def _average(result, masks: dict, cross: Group = Group.single()) -> dict:
    """One state from the stacked particles of every particle group: masked mean of floating
    tensors, particle 0 otherwise."""
    names = [n for n, t in result.state.items() if t.is_floating_point()]
    mask_list = [masks.get(n) for n in names]
    means = swamp_kernels.particle_average([result.state[n] for n in names], mask_list)
    cross.all_reduce_(means, mean=True)
    averaged = {n: t[0] for n, t in result.state.items()}
    averaged.update(zip(names, means))
    return averaged


def _evaluate_level(model, result, data, config: Config, masks: dict, placement: Placement, world: Group):
    """(final network, metrics) of a trained level: particles, their ensemble, their average.

    Each rank evaluates its own particles (BN statistics over its group's ranks) on its data
    rank's share of the test batches; ranks with the same data rank hold the same share, so the
    ensemble sums their probabilities over ``cross``. The average of all particles gets its BN
    statistics and its test batches from every rank. Accuracies come from correct-prediction
    counts summed over ranks: the same as one process evaluating everything."""
    batch = config.train.batch_size
    local = next(iter(result.state.values())).shape[0]
    particles = local * placement.cross.size
    shard = (placement.data.index, placement.data.size)
    probs, labels, nets = [], None, []
    for p in range(local):
        net = evaluate.network(model, {n: t[p] for n, t in result.state.items()})
        if result.swa:
            evaluate.recompute_bn_(net, data, batch, placement.data)
        prob, labels = evaluate.probabilities(net, data, batch, shard=shard)
        probs.append(prob)
        nets.append(net)
    ensemble = torch.stack(probs).sum(0)
    placement.cross.all_reduce_([ensemble])
    counts = torch.stack([evaluate.correct(p, labels) for p in [*probs, ensemble / particles]])
    *own, ensemble_acc = evaluate.accuracies(counts, len(labels), placement.data)
    accuracies = [a for part in placement.cross.all_gather_object(own) for a in part]
    if particles > 1:
        final = evaluate.recompute_bn_(evaluate.network(model, _average(result, masks, placement.cross)),
                                       data, batch, world)
        final_acc = evaluate.test_accuracy(final, data, batch, world)
    else:
        final, final_acc = nets[0], accuracies[0]
    world.broadcast_([t for t in final.state_dict().values()])
    metrics = {"test_accuracy": final_acc, "particle_test_accuracy": accuracies,
               "ensemble_test_accuracy": ensemble_acc}
    return final, metrics


def _stage_checkpoint(out: Path, stage: int, world: Group) -> dict | None:
    """The saved checkpoint of ``stage``, if the last run was killed inside it; memory-mapped on
    the CPU, so each rank reads only the particles it trains.

    Rank 0 decides for every rank (another rank looking on its own could find the file of the
    stage before, being deleted, or a newer one); the file then stays until every rank of the
    stage has trained on, since no rank can finish an epoch of it alone."""
    path = out / "checkpoint.pt"

    def saved() -> dict | None:
        return load_file(path, map_location="cpu", mmap=True, weights_only=True) if path.is_file() else None
    checkpoint = saved() if world.index == 0 else None
    if not world.broadcast_object(checkpoint is not None and checkpoint["stage"] == stage):
        return None
    return checkpoint if world.index == 0 else saved()


def _check_schedule(config: Config, data, topology: Topology, pretrains: bool) -> None:
    """Raise ConfigError unless the rewind point lies inside training and a batch splits over
    the ranks that share it (all of them while they ``pretrain`` together)."""
    total = config.train.epochs * data.steps_per_epoch(config.train.batch_size)
    if config.rewind.iterations >= total:
        raise ConfigError(f"config key 'rewind.iterations': {config.rewind.iterations} is not below the {total} "
                          "training iterations")
    batch = min(config.train.batch_size, data.num_train)   # a smaller training set is one batch
    for ranks, what in ((topology.data.size, "data-parallel ranks of a particle group"),
                        (topology.world.size if pretrains else 1, "ranks that pre-train together")):
        if batch % ranks:
            size = f"{batch}" if batch == config.train.batch_size else (
                f"{config.train.batch_size} is above the {batch} training examples, so a batch holds all "
                f"{batch}, which")
            raise ConfigError(f"config key 'train.batch_size': {size} does not split over the {ranks} {what}")


def check(config: Config) -> None:
    """Raise ConfigError (or the data set's error) now for what :func:`run` would refuse in one
    process: the config's checks, then those that need the data set (loaded on the CPU)."""
    validate(config)
    validate_new_run(config)
    one = Group.single()
    _check_schedule(config, load_data(config.data), Topology(one, one, one, torch.device("cpu")),
                    pretrains=bool(config.rewind.iterations))


class RunInProgressError(OSError):
    """Another process is training the run (it holds the run's lock: :mod:`swamp.runlock`)."""


@contextlib.contextmanager
def _run_lock(out: Path, topology: Topology):
    """Hold the run's lock (rank 0) while the run trains: a second process resuming it meanwhile
    fails at once, on every rank, instead of training the same levels and deleting this one's
    files."""
    lock = RunLock(out) if topology.is_writer else None
    try:
        taken_by = topology.world.broadcast_object(lock.acquire() if lock else None)
        if taken_by:
            raise RunInProgressError(f"{out} is being trained by {taken_by}; wait for it to end (or stop it) first")
        yield
    finally:
        if lock is not None:
            lock.release()


def _execute(config: Config, out: Path, quiet: bool, topology: Topology, new: bool = False) -> dict:
    """Run (or, unless ``new``, continue: the caller holds the run's lock) the run of ``config``
    in ``out``. A new run's directory and ``config.yaml`` are written once data, model and
    config have passed every check."""
    device, writer = topology.device, topology.is_writer
    quiet = quiet or not writer
    data = load_data(config.data).to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    sparsify(model, exclude=config.prune.exclude or None)
    model.to(device)
    steps_per_epoch = data.steps_per_epoch(config.train.batch_size)
    total = config.train.epochs * steps_per_epoch
    rewind = config.rewind.iterations
    particles = config.particles if config.method == "swamp" else 1
    _check_schedule(config, data, topology, pretrains=rewind and not (out / "rewind.pt").exists())
    masks = model_masks(model)
    tied = {name: first for first, (_, names) in shared_masks(model).items() for name in names}
    if config.masks.source:   # before anything is written or trained: a source that does not fit fails at once
        masks = _source_masks(config, 0, masks, tied, topology.world)
        topology.world.broadcast_(list(masks.values()))
    if writer and new:
        out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if new:   # a resume holds the lock already
            held.enter_context(_run_lock(out, topology))
            if topology.world.broadcast_object((out / "config.yaml").exists() if writer else None):
                raise FileExistsError(f"{out} already holds a run (started meanwhile by another process); "
                                      f"continue it with `swamp resume {out}`")
        if writer:
            remove_partial_writes(out)
            if new or not (out / STARTED_CONFIG).exists():   # before config.yaml, which marks a run; or
                write_text(out / STARTED_CONFIG, dump(config))   # checked from now on
            write_text(out / "config.yaml", dump(config))   # resume: with its overrides
        log_file = held.enter_context(open(out / "log.txt", "a")) if writer else None

        def log(line: str) -> None:
            if log_file:
                log_file.write(line + "\n")
                log_file.flush()
        if not new:
            log("resumed: the epochs after the last checkpoint train again, so their lines repeat below")

        def progress(desc: str):
            return lambda n: tqdm(total=n, desc=desc, leave=False, disable=quiet, dynamic_ncols=True)

        def checkpoint(full: dict) -> None:
            save(out / "checkpoint.pt", full)

        def finish_stage() -> None:
            if writer:
                (out / "checkpoint.pt").unlink(missing_ok=True)

        if (out / "rewind.pt").exists():
            rewind_state = load_file(out / "rewind.pt", map_location=device)
        else:
            state = stack_state(model, 1)
            if rewind:
                state = train_particles(model, state, data, config, stage=-1, begin=0, end=rewind, swa=False,
                                        placement=topology.placement(1), checkpoint=checkpoint,
                                        resume=_stage_checkpoint(out, -1, topology.world),
                                        log=lambda line: log(f"pretrain {line}"),
                                        progress=progress("pretrain")).state
            topology.world.broadcast_(list(state.values()))
            rewind_state = {n: t[0] for n, t in state.items()}
            if writer:
                save(out / "rewind.pt", rewind_state)
            finish_stage()

        placement = topology.placement(particles)
        swa = config.method in ("imp_swa", "swamp")
        weights = list(dict.fromkeys(tied.values()))   # a weight several layers share counts once
        total_weights = sum(masks[n].numel() for n in weights)
        summary = {"method": config.method, "levels": []}
        def run_level(level: int, masks: dict, begin_state: dict) -> tuple[dict, dict, dict]:
            """Level ``level`` (read back when its directory is complete, else trained from
            ``begin_state`` under ``masks``, averaged, evaluated and written): its metrics, final
            (averaged) state and masks. What training held (the particles, their average) is
            freed on return, before the next level trains."""
            directory = level_dir(out, level)
            if (directory / "metrics.json").exists():
                return (read_json(directory / "metrics.json"),
                        load_file(directory / "model.pt", map_location=device),
                        load_file(directory / "mask.pt", map_location=device))
            resume = _stage_checkpoint(out, level, topology.world)
            if resume is not None and "masks" in resume:   # those it began under: saliency scores computed
                masks = {n: resume["masks"][n].to(device) for n in masks}   # again on a GPU may differ a little
            set_masks(model, masks)
            local = len(placement.particles)
            start = {n: (t * masks[n] if n in masks else t).unsqueeze(0).repeat(local, *[1] * t.dim())
                     for n, t in begin_state.items()}
            result = train_particles(model, start, data, config, stage=level, begin=rewind, end=total,
                                     swa=swa, fixed_lr=fine_tuning_rate(config, level, steps_per_epoch),
                                     placement=placement,
                                     checkpoint=lambda full: checkpoint({**full, "masks": masks}), resume=resume,
                                     log=lambda line: log(f"level {level} {line}"),
                                     progress=progress(f"level {level}"))
            trained = time.perf_counter()
            final, metrics = _evaluate_level(model, result, data, config, masks, placement, topology.world)
            final_state = final.state_dict()
            kept = sum(int(masks[n].sum()) for n in weights)
            metrics = {"level": level, "density": kept / total_weights, **metrics,
                       "train_loss": result.train_loss, "seconds": result.seconds + time.perf_counter() - trained,
                       "images_per_second": result.images / max(result.seconds, 1e-9)}
            stacked = (placement.cross.gather_cat(list(result.state.values()))
                       if particles > 1 and placement.data.index == 0 else None)
            if writer:
                directory.mkdir(exist_ok=True)
                save(directory / "mask.pt", masks)
                save(directory / "model.pt", final_state)
                if stacked is not None:
                    save(directory / "particles.pt", dict(zip(result.state, stacked)))
                write_json(directory / "metrics.json", metrics)
                log(f"level {level} density {metrics['density']:.4f} "
                    f"test_accuracy {metrics['test_accuracy']:.4f}")
            finish_stage()
            return metrics, final_state, masks

        levels, begin_state = _levels(config), rewind_state
        masks_after = _mask_schedule(config, model, rewind_state, data, tied, topology.world) if levels[-1] else None
        del rewind_state   # rewind.mode lr, finetune: not held once level 1 begins from level 0's solution
        for level in tqdm(levels, desc=f"{config.method} levels", disable=quiet, dynamic_ncols=True):
            metrics, final_state, masks = run_level(level, masks, begin_state)
            summary["levels"].append(metrics)
            if writer:
                write_json(out / "summary.json", summary)
            if level == levels[-1] or topology.world.broadcast_object(
                    (level_dir(out, level + 1) / "metrics.json").exists() if writer else None):
                continue   # no next level, or one done already (a resume): run_level reads it back
            new_masks = masks_after(level, final_state, masks)
            emptied = emptied_layers({n: (masks[n], new_masks[n]) for n in masks}) if writer else []
            if emptied:
                log(f"level {level} warning: {collapse_warning(emptied)}")
                warnings.warn(collapse_warning(emptied), stacklevel=2)
            masks = new_masks
            topology.world.broadcast_(list(masks.values()))
            if begins_from_previous_level(config, level + 1):
                begin_state = {n: final_state[n] for n in begin_state}
                topology.world.broadcast_(list(begin_state.values()))   # as the masks: every rank begins alike
            del final_state  # the next level trains without this one's weights held (but for lr, finetune)
        return summary
