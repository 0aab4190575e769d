"""``particles_train_step`` workload (issue 6): SWAMP's P particles trained concurrently.

CIFAR ResNet-20 (``swamp.models``), sparsified as the pipeline does (``swamp.sparsify``, then
random masks keeping 20% of every conv/fc weight), batch 128 per particle, bf16 autocast,
synthetic CIFAR-shaped data resident on the device. Every variant calls
``swamp.train.train_particles`` for ``STEPS`` steps (one epoch of the synthetic data) from
its own stacked state:

- ``concurrent_P4``: one state of 4 stacked particles, how the pipeline trains SWAMP;
- ``one_particle_P1``: one particle;
- ``sequential_4xP1``: four one-particle states trained one after the other;
- ``concurrent_P4_compiled`` / ``sequential_4xP1_compiled``: the same with ``train.compile``
  (the vmapped step of all particles, or the module; GPU only; compiled in the harness's
  untimed first call; a failure is recorded, not fatal).

Times are per step (of all particles in the call). Particle-images per call come from
``TrainResult.images``; ``extra.images_per_second`` is particle-images over the measured time.
"""
from __future__ import annotations

import dataclasses

import torch

import swamp
from benchmarks import inputs
from benchmarks.workload import Workload
from swamp.config import Config, DataConfig, ModelConfig, TrainConfig
from swamp.data import load_data
from swamp.models import build_model
from swamp.train import stack_state, train_particles

PARTICLES = 4
BATCH, SMOKE_BATCH = 128, 2
STEPS, SMOKE_STEPS = 20, 1
DENSITY = 0.2
MODEL = "cifar_resnet_20"


def _setup(device: torch.device, smoke: bool) -> dict:
    batch, steps = (SMOKE_BATCH, SMOKE_STEPS) if smoke else (BATCH, STEPS)
    config = Config(data=DataConfig(name="synthetic", shape=[3, 32, 32], classes=10,
                                    train_size=batch * steps, test_size=batch),
                    model=ModelConfig(name=MODEL), particles=PARTICLES,
                    train=TrainConfig(batch_size=batch, precision="bf16"))
    data = load_data(config.data).to(device)
    torch.manual_seed(0)
    model = swamp.sparsify(build_model(config.model, data.input_shape, data.num_classes)).to(device)
    gen = inputs.generator(device)
    swamp.set_masks(model, {name: torch.rand(m.shape, generator=gen, device=device) < DENSITY
                            for name, m in swamp.masks(model).items()})
    return {"model": model, "data": data, "config": config, "steps": steps, "images": {}}


def _training(name: str, particles: int, runs: int, compiled: bool = False):
    """Factory: ``runs`` calls of ``train_particles`` on their own ``particles``-stacked states."""
    def factory(x: dict):
        states = [stack_state(x["model"], particles) for _ in range(runs)]
        config = x["config"]
        if compiled:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, compile=True))

        def call():
            x["images"][name] = sum(
                train_particles(x["model"], state, x["data"], config, stage=0, begin=0,
                                end=x["steps"], swa=False).images
                for state in states)
        return call
    return factory


def _ratio(per_second: dict, over: str, under: str) -> float | None:
    return per_second[over] / per_second[under] if over in per_second and under in per_second else None


def _extra(x: dict, row: str, step_ms) -> dict:
    """images/s of every run; concurrent over sequential training, eager and compiled."""
    per_second = {n: x["images"][n] / (step_ms[n] * x["steps"] / 1e3) for n in step_ms}
    return {"images_per_second": per_second,
            "speedup_concurrent_over_sequential": _ratio(per_second, row, "sequential_4xP1"),
            "speedup_compiled_concurrent_over_sequential":
                _ratio(per_second, "concurrent_P4_compiled", "sequential_4xP1_compiled"),
            "model": MODEL, "batch_per_particle": x["config"].train.batch_size, "steps_per_call": x["steps"],
            "density": DENSITY, "precision": "bf16"}


COMPILED = {"concurrent_P4_compiled": _training("concurrent_P4_compiled", PARTICLES, 1, compiled=True),
            "sequential_4xP1_compiled": _training("sequential_4xP1_compiled", 1, PARTICLES, compiled=True)}

CASES = (
    Workload(op="particles_train_step", name=f"{MODEL}_P{PARTICLES}_b{BATCH}_bf16", setup=_setup,
             variants={"concurrent_P4": _training("concurrent_P4", PARTICLES, 1)},
             baselines={"one_particle_P1": _training("one_particle_P1", 1, 1),
                        "sequential_4xP1": _training("sequential_4xP1", 1, PARTICLES), **COMPILED},
             steps=lambda x: x["steps"], extra=_extra, compiled=frozenset(COMPILED)),
)
