"""The analyses of :mod:`swamp.analysis` applied to run directories written by :mod:`swamp.pipeline`."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swamp import config as cfg
from swamp import evaluate
from swamp.analysis.hessian import hessian_trace, top_hessian_eigenvalues
from swamp.analysis.landscape import Batches, SampledBatches, data_eval_fn, interpolation_barrier, l2_distance
from swamp.data import input_spec, load_data
from swamp.models import build_model
from swamp.pipeline import begins_from_previous_level, completed_levels, fine_tuning_rate
from swamp.rundir import DamagedFileError, level_dir, level_numbers, load_file, read_json
from swamp.sparsify import set_masks, shared_masks, sparsify
from swamp.train import train_particles

__all__ = ["Run", "load_run", "instability", "successive_barriers", "level_hessians", "layer_densities"]


@dataclass
class Run:
    """A run directory with its config and (sparsified) architecture on the device; its data set
    is loaded when first used (comparing masks needs only its shapes)."""

    directory: Path
    config: cfg.Config
    model: nn.Module

    @functools.cached_property
    def data(self):
        """The run's data set on the model's device."""
        try:
            cfg.validate(self.config)   # a data set that moved fails here, with the hint below
        except cfg.ConfigError as error:
            raise _config_error(self.directory, error) from error
        return load_data(self.config.data).to(self.device)

    @property
    def batch_size(self) -> int:
        return self.config.train.batch_size

    def levels(self) -> list[int]:
        """The completed levels (those with ``metrics.json``), ascending."""
        return level_numbers(self.directory, complete=True)

    def _file(self, level: int, name: str) -> Path:
        path = level_dir(self.directory, level) / name
        if not (level_dir(self.directory, level) / "metrics.json").is_file():
            raise FileNotFoundError(f"{self.directory}: level {level} is not complete; "
                                    f"complete levels are {self.levels()}")
        return path

    def metrics(self, level: int) -> dict:
        return read_json(self._file(level, "metrics.json"))

    def state(self, level: int) -> dict[str, torch.Tensor]:
        """The level's final (averaged, BN-recomputed) state_dict."""
        return load_file(self._file(level, "model.pt"), map_location=self.device)

    def masks(self, level: int) -> dict[str, torch.Tensor]:
        return load_file(self._file(level, "mask.pt"), map_location=self.device)

    def particle_states(self, level: int) -> list[dict[str, torch.Tensor]]:
        """Each particle's final state (SWAMP runs save ``particles.pt``); [] when not saved."""
        path = self._file(level, "particles.pt")
        if not path.is_file():
            return []
        stacked = load_file(path, map_location=self.device)
        base = self.state(level)
        count = next(iter(stacked.values())).shape[0]
        return [{**base, **{n: t[p] for n, t in stacked.items()}} for p in range(count)]

    def network(self, level: int, particle: int | None = None) -> nn.Module:
        """The level's network in eval mode, masks in place: its final (averaged) network, or
        particle ``particle`` of a SWAMP level, whose BatchNorm statistics are recomputed for its
        SWA weights on the training set (as the pipeline evaluated it)."""
        if particle is None:
            return evaluate.network(self.model, self.state(level))
        states = self.particle_states(level)
        if not 0 <= particle < len(states):
            raise ValueError(f"{self.directory}: level {level} saved {len(states)} particles (SWAMP runs save them), "
                             f"not particle {particle}")
        net = evaluate.network(self.model, states[particle])
        return evaluate.recompute_bn_(net, self.data, self.batch_size) if self.has_batch_norm else net

    @property
    def has_batch_norm(self) -> bool:
        """Whether the model has BatchNorm layers (whose statistics need the data set)."""
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def parameter_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    def barrier(self, state_a: dict, state_b: dict, num_points: int, *, split: str = "test",
                bn_batches: int | None = None) -> dict:
        """:func:`interpolation_barrier` on ``split`` ("test" or "train"), BN recomputed at each
        point on the training set (or on ``bn_batches`` batches of it drawn at random, the same
        at every point; the result records how many an epoch held), plus the parameters' L2 distance."""
        _check_barrier_options(split, bn_batches)
        if bn_batches is not None:   # what is drawn: an epoch holds fewer
            bn_batches = min(bn_batches, self.data.steps_per_epoch(self.batch_size))
        if not self.has_batch_norm:
            bn_loader = None
        elif bn_batches is None:
            bn_loader = Batches(self.data, "train", self.batch_size)
        else:
            bn_loader = SampledBatches(self.data, self.batch_size, bn_batches)
        path = interpolation_barrier(self.model, state_a, state_b, data_eval_fn(self.data, self.batch_size, split),
                                     num_points, bn_loader)
        return {**path, "split": split, "bn_batches": bn_batches,
                "l2_distance": l2_distance(state_a, state_b, self.parameter_names)}


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """The run in ``run_dir`` (its config.yaml; data loaded, model built and sparsified as the pipeline does)."""
    directory = Path(run_dir)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory} holds no run (no config.yaml)")
    try:
        config = cfg.load(directory / "config.yaml", check_paths=False)
        shape, classes = input_spec(config.data)
    except cfg.ConfigError as error:
        raise _config_error(directory, error) from error
    model = build_model(config.model, shape, classes)
    sparsify(model, exclude=config.prune.exclude or None)
    return Run(directory, config, model.to(device))


def _config_error(directory: Path, error: cfg.ConfigError) -> cfg.ConfigError:
    """``error`` of the run in ``directory``'s config, with how to record a moved data set."""
    moved = f"; if the data set moved, `swamp resume {directory} --set data.path=NEW` records its new place" \
        if "data.path" in str(error) else ""
    return cfg.ConfigError(f"{directory}/config.yaml: {error}{moved}")


def instability(run_dir: str | Path, level: int, seeds: Sequence[int] = (1, 2), num_points: int = 11,
                device: str | torch.device = "cpu", *, split: str = "test", bn_batches: int | None = None) -> dict:
    """Frankle et al.'s instability analysis of ``level``: two copies trained from the weights
    the level started from (the rewind weights; with rewind.mode lr or finetune, past level 0, the
    previous level's solution) under the level's mask, with the pipeline's trainer and schedule but batch
    orders seeded by ``seeds[0]`` and ``seeds[1]``; returns their interpolation path on ``split``
    ("test" or "train"), barrier and L2 distance (``bn_batches``: see :meth:`Run.barrier`).
    Each copy is one network: for a SWAMP run, one particle with SWA (not the P-particle average)."""
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f"seeds must be two different integers, got {tuple(seeds)}")
    _check_barrier_options(split, bn_batches)
    run = load_run(run_dir, device)
    config, masks = run.config, run.masks(level)
    set_masks(run.model, masks)
    begin = load_file(run.directory / "rewind.pt", map_location=run.device)
    if begins_from_previous_level(config, level):
        previous = run.state(level - 1)
        begin = {n: previous[n] for n in begin}
    steps_per_epoch = run.data.steps_per_epoch(config.train.batch_size)
    total = config.train.epochs * steps_per_epoch
    swa = config.method in ("imp_swa", "swamp")
    finals = []
    for seed in seeds:
        state = {n: (t * masks[n] if n in masks else t).unsqueeze(0).clone() for n, t in begin.items()}
        result = train_particles(run.model, state, run.data, dataclasses.replace(config, seed=int(seed)),
                                 stage=level, begin=config.rewind.iterations, end=total, swa=swa,
                                 fixed_lr=fine_tuning_rate(config, level, steps_per_epoch))
        finals.append(evaluate.network(run.model, {n: t[0] for n, t in result.state.items()}).state_dict())
        # an SWA copy's BatchNorm statistics are stale, but the barrier recomputes them at every point
    return {"level": level, "density": run.metrics(level)["density"], "seeds": [int(s) for s in seeds],
            **run.barrier(finals[0], finals[1], num_points, split=split, bn_batches=bn_batches)}


def successive_barriers(run_dir: str | Path, num_points: int = 11, device: str | torch.device = "cpu", *,
                        split: str = "test", bn_batches: int | None = None) -> dict:
    """Paul et al.'s barriers between the solutions of levels L and L+1 (``"levels"``, with the
    density of L+1) and, for runs that saved particles (SWAMP), Choi et al.'s barriers between
    each pair of a level's particles and between each particle and their average (``"particles"``),
    on ``split`` ("test" or "train"); ``bn_batches``: see :meth:`Run.barrier`."""
    _check_barrier_options(split, bn_batches)
    run = load_run(run_dir, device)
    barrier = functools.partial(run.barrier, num_points=num_points, split=split, bn_batches=bn_batches)
    levels = run.levels()
    result = {"method": run.config.method, "split": split, "levels": [], "particles": []}
    for a, b in zip(levels, levels[1:]):
        result["levels"].append({"from_level": a, "to_level": b, "density": run.metrics(b)["density"],
                                 **barrier(run.state(a), run.state(b))})
    for level in levels:
        particles = run.particle_states(level)
        if not particles:
            continue
        average = run.state(level)
        result["particles"].append({
            "level": level, "density": run.metrics(level)["density"],
            "pairs": [{"a": i, "b": j, **barrier(particles[i], particles[j])}
                      for i, j in combinations(range(len(particles)), 2)],
            "to_average": [{"particle": i, **barrier(p, average)} for i, p in enumerate(particles)]})
    return result


def _check_barrier_options(split: str, bn_batches: int | None) -> None:
    """ValueError now, before any work, for a ``split`` or ``bn_batches`` :meth:`Run.barrier` refuses."""
    evaluate.checked_split(split)
    if bn_batches is not None and (isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 1):
        raise ValueError(f"bn_batches must be None (the whole training set) or an int >= 1, got {bn_batches!r}")


def level_hessians(run_dir: str | Path, k: int = 1, batches: int = 4, iters: int = 100, tol: float = 1e-4,
                   trace_samples: int = 0, device: str | torch.device = "cpu", levels: Sequence[int] | None = None,
                   progress: Callable[[dict], None] | None = None, batch_seed: int = 0) -> dict:
    """Top-``k`` Hessian eigenvalues, whether they converged (and, with ``trace_samples`` > 0, the
    Hutchinson trace, its standard error and the trace per unpruned weight, comparable across
    levels of different sizes) of the solution of each of ``levels`` (default: every
    completed level), restricted to its mask, on ``batches`` training batches (un-augmented)
    drawn at random, the same for every level (seed ``batch_seed``; a data set stored class by
    class gives no first batches of a few classes), with the cross-entropy loss.
    ``progress(result)`` is called with the result so far as each level is done."""
    run = load_run(run_dir, device)
    complete = run.levels()
    levels = complete if levels is None else sorted(set(levels))
    missing = [level for level in levels if level not in complete]
    if missing:
        raise FileNotFoundError(f"{run.directory}: level(s) {missing} not complete; complete levels are {complete}")
    result = {"method": run.config.method, "batches": 0, "levels": []}
    if not levels:
        return result
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)

    distinct = shared_masks(run.model)   # a weight several layers share once

    def unpruned(masks: dict) -> int:   # the Hessian's size
        return trainable - sum(int((~masks[n]).sum()) for n in distinct)
    last = levels[-1]   # masks only shrink from level to level: the last has the fewest weights
    fewest = unpruned(run.masks(last))
    if k > fewest:   # before the first level's work
        raise ValueError(f"k = {k} is above the {fewest} unpruned parameters of level {last}")
    train = list(SampledBatches(run.data, run.batch_size, batches, batch_seed))
    result["batches"] = len(train)
    for level in levels:
        net, masks = evaluate.network(run.model, run.state(level)), run.masks(level)
        top = top_hessian_eigenvalues(net, F.cross_entropy, train, k, masks, iters, tol)
        row = {"level": level, "density": run.metrics(level)["density"], "eigenvalues": top.values,
               "converged": top.converged}
        if trace_samples:
            trace = hessian_trace(net, F.cross_entropy, train, masks, trace_samples)
            row.update(trace=trace.trace, trace_standard_error=trace.standard_error,
                       trace_per_weight=trace.trace / unpruned(masks))
        result["levels"].append(row)
        if progress is not None:
            progress(result)
    return result


def layer_densities(run_dir: str | Path) -> dict:
    """The fraction each pruned weight keeps (its mask's) at every complete level of the run in
    ``run_dir``, beside the level's density: ``{"method", "layers": [{"name", "weights"}],
    "levels": [{"level", "density", "layers": {name: fraction}}]}``, layers in the model's order
    (a weight shared by several layers under each of its names). Reads the levels' masks and
    metrics only (no data set, no model)."""
    summary = completed_levels(Path(run_dir))
    result = {"method": summary["method"], "layers": [], "levels": []}
    for metrics in summary["levels"]:
        path = level_dir(Path(run_dir), metrics["level"]) / "mask.pt"
        masks = load_file(path, map_location="cpu", weights_only=True)
        if not (isinstance(masks, dict) and masks and all(isinstance(m, torch.Tensor) and m.dtype == torch.bool
                                                          and m.numel() for m in masks.values())):
            raise DamagedFileError(f"{path} is damaged: no dict of weight names to bool masks")
        if not result["layers"]:
            result["layers"] = [{"name": name, "weights": mask.numel()} for name, mask in masks.items()]
        if [layer["name"] for layer in result["layers"]] != list(masks):
            raise DamagedFileError(f"{path} is damaged: its masks name other weights than level "
                                   f"{summary['levels'][0]['level']}'s")
        result["levels"].append({"level": metrics["level"], "density": metrics["density"],
                                 "layers": {name: int(m.sum()) / m.numel() for name, m in masks.items()}})
    return result
