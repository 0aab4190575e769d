"""The trainer: P particles of one masked model trained concurrently from stacked parameters.

Every parameter and buffer of the P particles is one tensor ``[P, *shape]``. One step is
``torch.func.vmap`` over ``functional_call`` (forward + backward of all particles at once;
BatchNorm running statistics are stacked buffers, so each particle keeps its own), then one
fused :func:`swamp_kernels.masked_sgd_step_` over all stacked parameters. Masks are shared,
unbatched. With SWA, the last ``1 - swa.start`` of the epochs run at the constant ``swa.lr``
and each particle's weights are averaged at the end of every such epoch.

Determinism: particle p's batch order and augmentation in epoch e come from a generator
seeded by ``(seed, stage, p, e)``, so a level trained twice from the same state is identical.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

import swamp_kernels
from swamp.config import Config, TrainConfig
from swamp.data import epoch_generator

__all__ = ["TrainResult", "learning_rate", "split_state", "stack_state", "train_particles"]


def _device(tensors: dict) -> torch.device:
    return next(iter(tensors.values())).device


def learning_rate(step: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """The scheduled learning rate at ``step`` (linear warm-up, then step or cosine decay)."""
    warmup = train.warmup_epochs * steps_per_epoch
    if step < warmup:
        return train.lr * (step + 1) / warmup
    epoch = step / steps_per_epoch
    if train.schedule == "cosine":
        total = train.epochs * steps_per_epoch
        return 0.5 * train.lr * (1 + math.cos(math.pi * (step - warmup) / max(1.0, total - warmup)))
    return train.lr * train.gamma ** sum(epoch >= m for m in train.milestones)


def split_state(model: nn.Module) -> tuple[dict, dict, dict]:
    """(parameters, buffers other than masks, masks) of ``model`` by name."""
    params = dict(model.named_parameters())
    masks = {n: b for n, b in model.named_buffers() if n.endswith("weight_mask")}
    buffers = {n: b for n, b in model.named_buffers() if n not in masks}
    return params, buffers, masks


def stack_state(model: nn.Module, particles: int) -> dict[str, torch.Tensor]:
    """``particles`` copies of ``model``'s parameters and non-mask buffers, each ``[P, *shape]``."""
    params, buffers, _ = split_state(model)
    return {n: t.detach().unsqueeze(0).repeat(particles, *[1] * t.dim()).contiguous()
            for n, t in {**params, **buffers}.items()}


@contextlib.contextmanager
def _float32_batch_norm(model: nn.Module, enabled: bool):
    """While active, BatchNorm layers cast their input to float32 (vmapped batch_norm rejects
    bf16 inputs with float32 statistics); the next layer's autocast returns to bf16."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    handles = [m.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
               for m in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TrainResult:
    """Stacked final state (``[P, ...]``; SWA weights when ``swa``), mean last-epoch loss, speed."""

    state: dict[str, torch.Tensor]
    swa: bool
    train_loss: float
    images: int
    seconds: float


def train_particles(model: nn.Module, state: dict[str, torch.Tensor], data, config: Config, *,
                    stage: int, begin: int, end: int, swa: bool,
                    log: Callable[[str], None] = lambda line: None,
                    progress: Callable[[int], contextlib.AbstractContextManager] | None = None) -> TrainResult:
    """Train the particles stacked in ``state`` (a dict from :func:`stack_state`) from step ``begin`` to ``end``.

    ``model`` supplies the architecture and the (shared) masks; ``state`` is updated in place.
    ``stage`` keys the batch-order seeds (a level number, or -1 for pre-training).
    """
    train = config.train
    params_n, _, masks = split_state(model)
    names = list(params_n)
    params = {n: state[n].requires_grad_(False) for n in names}
    buffers = {n: t for n, t in state.items() if n not in params}
    particles = params[names[0]].shape[0]
    mask_list = [masks.get(n[:-len("weight")] + "weight_mask") if n.endswith("weight") else None
                 for n in names]
    momentum: list = [None] * len(names)
    steps_per_epoch = data.steps_per_epoch(train.batch_size)
    swa_epoch = math.floor(config.swa.start * train.epochs)
    swa_state = {n: torch.zeros_like(params[n]) for n in names} if swa else None
    averaged = 0
    autocast = torch.autocast(_device(params).type, dtype=torch.bfloat16,
                              enabled=train.precision == "bf16")

    def loss_fn(p, b, x, y):
        with autocast:
            out = functional_call(model, (p, b, masks), (x,))
        return F.cross_entropy(out.float(), y)

    step_fn = vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0, 0))
    model.train()
    images, lr, mean_loss = 0, 0.0, float("nan")
    started = time.perf_counter()
    first_epoch, last_epoch = begin // steps_per_epoch, math.ceil(end / steps_per_epoch)
    bar = progress(last_epoch - first_epoch) if progress else contextlib.nullcontext()
    with bar as pbar, _float32_batch_norm(model, enabled=train.precision == "bf16"):
        for epoch in range(first_epoch, last_epoch):
            generators = [epoch_generator(config.seed, stage, p, epoch) for p in range(particles)]
            in_swa = swa and epoch >= swa_epoch
            loss_sum, loss_count = torch.zeros(particles, device=_device(params)), 0
            for i, (x, y) in enumerate(data.train_batches(generators, train.batch_size, config.data.augment)):
                step = epoch * steps_per_epoch + i
                if step < begin:
                    continue
                if step >= end:
                    break
                lr = config.swa.lr if in_swa else learning_rate(step, steps_per_epoch, train)
                grads, losses = step_fn(params, buffers, x, y)
                with torch.no_grad():
                    swamp_kernels.masked_sgd_step_(
                        [params[n] for n in names], [grads[n] for n in names], momentum, mask_list,
                        lr=lr, momentum=train.momentum, weight_decay=train.weight_decay,
                        nesterov=train.nesterov)
                loss_sum += losses.detach()
                loss_count += 1
                images += x.shape[0] * x.shape[1]
            if in_swa and (epoch + 1) * steps_per_epoch <= end:
                with torch.no_grad():
                    swamp_kernels.swa_update_([swa_state[n] for n in names],
                                              [params[n].unsqueeze(0) for n in names], averaged)
                averaged += 1
            mean_loss = (loss_sum / max(loss_count, 1)).mean().item()
            log(f"stage {stage} epoch {epoch + 1}/{train.epochs} lr {lr:.5g} "
                f"loss {mean_loss:.4f} particles {particles}")
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{mean_loss:.4f}")
    seconds = time.perf_counter() - started
    final = dict(state)
    if swa and averaged:
        final.update(swa_state)
    return TrainResult(final, bool(swa and averaged), mean_loss, images, seconds)
