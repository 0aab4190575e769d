"""The IMP / SWAMP pipeline: pretrain to the rewind point, then levels of train -> average -> prune -> rewind.

Methods: ``dense`` (level 0 only), ``imp`` (one particle), ``imp_swa`` (one particle with SWA),
``swamp`` (``particles`` particles with SWA, averaged), ``random`` (IMP's schedule with random
instead of magnitude pruning). Run directory::

    DIR/config.yaml          resolved config
    DIR/rewind.pt            state at the rewind point (parameters and buffers)
    DIR/level_XX/mask.pt     {weight name: bool mask} this level trained with
    DIR/level_XX/model.pt    final (averaged, BN-recomputed) state_dict
    DIR/level_XX/particles.pt   swamp only: the particles' final states, stacked ``[P, ...]``
    DIR/level_XX/metrics.json   written last: a level with it is complete
    DIR/summary.json         {"method", "levels": [metrics of each completed level]}
    DIR/log.txt              one line per epoch

Every file is written atomically (temp file + ``os.replace``). Resume granularity is the
level: a killed run redoes the level it was in. All randomness comes from generators seeded
by ``(seed, stage, particle, epoch)`` (see :mod:`swamp.train`) and the model initialisation
from ``seed``, so a resumed run ends bitwise equal to an uninterrupted one on the CPU.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from tqdm import tqdm

import swamp_kernels
from swamp import evaluate
from swamp.config import Config, ConfigError, dump, from_dict, validate
from swamp.data import derive_seed, load_data
from swamp.models import build_model
from swamp.sparsify import masks as model_masks, set_masks, sparsify
from swamp.train import stack_state, train_particles

__all__ = ["run", "resume", "level_dir", "atomic_write"]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` then rename over ``path``: readers see the old file or the whole new one."""
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(temp)
    os.replace(temp, path)


def _write_json(path: Path, value) -> None:
    atomic_write(path, lambda t: t.write_text(json.dumps(value, indent=2) + "\n"))


def _save(path: Path, value) -> None:
    atomic_write(path, lambda t: torch.save(value, t))


def level_dir(out: Path, level: int) -> Path:
    return Path(out) / f"level_{level:02d}"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(config: Config, out: str | Path, quiet: bool = False) -> dict:
    """Start a new run of ``config`` in directory ``out``; returns the summary."""
    validate(config)
    out = Path(out)
    if (out / "config.yaml").exists():
        raise FileExistsError(f"{out} already holds a run; continue it with `swamp resume {out}`")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", lambda t: t.write_text(dump(config)))
    return _execute(config, out, quiet)


def resume(out: str | Path, quiet: bool = False) -> dict:
    """Continue the run in ``out`` from its last complete level; returns the summary."""
    out = Path(out)
    if not (out / "config.yaml").is_file():
        raise FileNotFoundError(f"{out} holds no run (no config.yaml)")
    config = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    validate(config)
    return _execute(config, out, quiet)


def _prune(config: Config, level: int, state: dict, masks: dict) -> dict:
    """The next masks: ``prune_fraction`` of the remaining weights, by magnitude or at random."""
    names = list(masks)
    weights = [state[n] for n in names]
    scores = (swamp_kernels.random_scores(weights, seed=derive_seed(config.seed, level))
              if config.method == "random" else None)
    new = swamp_kernels.global_magnitude_prune(weights, [masks[n] for n in names],
                                               config.prune_fraction, scores=scores)
    return dict(zip(names, new))


def _average(result, masks: dict) -> dict:
    """One state from the stacked particles: masked mean of floating tensors, particle 0 otherwise."""
    names = [n for n, t in result.state.items() if t.is_floating_point()]
    mask_list = [masks.get(n) for n in names]
    means = swamp_kernels.particle_average([result.state[n] for n in names], mask_list)
    averaged = {n: t[0] for n, t in result.state.items()}
    averaged.update(zip(names, means))
    return averaged


def _evaluate_level(model, result, data, config: Config, masks: dict):
    """(final network, metrics) of a trained level: particles, their ensemble, their average."""
    batch = config.train.batch_size
    particles = next(iter(result.state.values())).shape[0]
    probs, labels, nets = [], None, []
    for p in range(particles):
        net = evaluate.network(model, {n: t[p] for n, t in result.state.items()})
        if result.swa:
            evaluate.recompute_bn_(net, data, batch)
        prob, labels = evaluate.test_probabilities(net, data, batch)
        probs.append(prob)
        nets.append(net)
    if particles > 1:
        final = evaluate.recompute_bn_(evaluate.network(model, _average(result, masks)), data, batch)
        final_acc = evaluate.accuracy(*evaluate.test_probabilities(final, data, batch))
    else:
        final = nets[0]
        final_acc = evaluate.accuracy(probs[0], labels)
    metrics = {"test_accuracy": final_acc,
               "particle_test_accuracy": [evaluate.accuracy(p, labels) for p in probs],
               "ensemble_test_accuracy": evaluate.accuracy(torch.stack(probs).mean(0), labels)}
    return final, metrics


def _execute(config: Config, out: Path, quiet: bool) -> dict:
    device = _device(config.device)
    data = load_data(config.data).to(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes)
    sparsify(model, exclude=config.prune.exclude or None)
    model.to(device)
    steps_per_epoch = data.steps_per_epoch(config.train.batch_size)
    total = config.train.epochs * steps_per_epoch
    rewind = config.rewind.iterations
    if rewind >= total:
        raise ConfigError(f"config key 'rewind.iterations': {rewind} is not below the {total} "
                          "training iterations")
    log_file = open(out / "log.txt", "a")

    def log(line: str) -> None:
        log_file.write(line + "\n")
        log_file.flush()

    def progress(desc: str):
        return lambda n: tqdm(total=n, desc=desc, leave=False, disable=quiet, dynamic_ncols=True)

    if (out / "rewind.pt").exists():
        rewind_state = torch.load(out / "rewind.pt", map_location=device)
    else:
        state = stack_state(model, 1)
        if rewind:
            state = train_particles(model, state, data, config, stage=-1, begin=0, end=rewind, swa=False,
                                    log=lambda line: log(f"pretrain {line}"),
                                    progress=progress("pretrain")).state
        rewind_state = {n: t[0] for n, t in state.items()}
        _save(out / "rewind.pt", rewind_state)

    levels = 0 if config.method == "dense" else config.levels
    particles = config.particles if config.method == "swamp" else 1
    swa = config.method in ("imp_swa", "swamp")
    masks = model_masks(model)
    total_weights = sum(m.numel() for m in masks.values())
    summary = {"method": config.method, "levels": []}
    for level in tqdm(range(levels + 1), desc=f"{config.method} levels", disable=quiet, dynamic_ncols=True):
        directory = level_dir(out, level)
        if (directory / "metrics.json").exists():
            metrics = json.loads((directory / "metrics.json").read_text())
            final_state = torch.load(directory / "model.pt", map_location=device)
            masks = torch.load(directory / "mask.pt", map_location=device)
        else:
            started = time.perf_counter()
            set_masks(model, masks)
            start = {n: t * masks[n] if n in masks else t for n, t in rewind_state.items()}
            result = train_particles(model, {n: t.unsqueeze(0).repeat(particles, *[1] * t.dim())
                                             for n, t in start.items()},
                                     data, config, stage=level, begin=rewind, end=total, swa=swa,
                                     log=lambda line: log(f"level {level} {line}"),
                                     progress=progress(f"level {level}"))
            final, metrics = _evaluate_level(model, result, data, config, masks)
            final_state = final.state_dict()
            kept = sum(int(m.sum()) for m in masks.values())
            metrics = {"level": level, "density": kept / total_weights, **metrics,
                       "train_loss": result.train_loss, "seconds": time.perf_counter() - started,
                       "images_per_second": result.images / max(result.seconds, 1e-9)}
            directory.mkdir(exist_ok=True)
            _save(directory / "mask.pt", masks)
            _save(directory / "model.pt", final_state)
            if particles > 1:
                _save(directory / "particles.pt", result.state)
            _write_json(directory / "metrics.json", metrics)
            log(f"level {level} density {metrics['density']:.4f} test_accuracy {metrics['test_accuracy']:.4f}")
        summary["levels"].append(metrics)
        _write_json(out / "summary.json", summary)
        if level < levels:
            masks = _prune(config, level, {n: final_state[n] for n in masks}, masks)
    log_file.close()
    return summary
