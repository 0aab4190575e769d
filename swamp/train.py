"""The trainer: one stage (pre-training or a level) of P particles of one masked model.

The state of P particles is a dict of tensors ``[P, *shape]`` (parameters and non-mask
buffers); masks are shared. Two engines run the steps, chosen by how many particles this
process holds:

* :class:`StackedEngine` (several): ``torch.func.vmap`` over ``functional_call`` computes
  forward and backward of all particles at once (BatchNorm statistics are stacked buffers, so
  each particle keeps its own), data-parallel ranks average the stacked gradients in one
  all-reduce per dtype, then one fused :func:`swamp_kernels.masked_sgd_step_` updates all of them.
  ``train.compile`` compiles the vmapped forward and backward (once per process and model).
* :class:`ModuleEngine` (one): a copy of the model itself, optionally channels_last and
  ``torch.compile``'d, wrapped in DDP over the data-parallel ranks; the same fused step.

Both show their state stacked, so SWA, checkpoints and the pipeline see one layout. With SWA,
the last ``1 - swa.start`` of the epochs run at the constant ``swa.lr`` (reached by a cosine anneal
over the first ``swa.anneal_epochs`` of them, if any) and each particle's weights are averaged at
the end of every such epoch.

Determinism: particle p's batch order and augmentation in epoch e come from a generator seeded
by ``(seed, stage, p, e)``, whatever the number of ranks. Every ``train.checkpoint_every``
epochs the complete stage state (all particles, momentum, SWA average, progress) is handed to
``checkpoint`` on rank 0; ``resume=`` that dict continues the stage, and ends bitwise equal to an
uninterrupted run on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.parallel import DistributedDataParallel

import swamp_kernels
from swamp.config import Config, TrainConfig
from swamp.data import epoch_generator
from swamp.distributed import Group, Placement

__all__ = ["TrainResult", "StackedEngine", "ModuleEngine", "cudnn_autotuned", "learning_rate", "particle_grads",
           "split_state", "stack_state", "train_particles"]


def learning_rate(step: int, steps_per_epoch: int, train: TrainConfig) -> float:
    """The scheduled learning rate at ``step``: step decay (``gamma`` at each milestone epoch)
    or a cosine from the end of the warm-up, times the linear warm-up factor
    ``min(1, step / warm-up steps)``, as OpenLTH composes them (step 0 has rate 0)."""
    warmup = train.warmup_epochs * steps_per_epoch
    if train.schedule == "cosine":
        total = train.epochs * steps_per_epoch
        decayed = 0.5 * train.lr * (1 + math.cos(math.pi * max(0.0, step - warmup) / max(1.0, total - warmup)))
    else:
        decayed = train.lr * train.gamma ** sum(step / steps_per_epoch >= m for m in train.milestones)
    return decayed * min(1.0, step / warmup) if warmup else decayed


def swa_learning_rate(step: int, steps_per_epoch: int, config: Config, fixed_lr: float | None = None) -> float:
    """The learning rate at ``step`` of the SWA epochs: ``swa.lr``, approached over the first
    ``swa.anneal_epochs`` from the rate before them (the scheduled rate at the SWA start, or
    ``fixed_lr``) by a cosine anneal (torch's ``SWALR`` with ``anneal_strategy="cos"``, stepped
    per iteration)."""
    start = math.floor(config.swa.start * config.train.epochs) * steps_per_epoch
    anneal = config.swa.anneal_epochs * steps_per_epoch
    if step >= start + anneal:
        return config.swa.lr
    scheduled = learning_rate(start, steps_per_epoch, config.train) if fixed_lr is None else fixed_lr
    return config.swa.lr + (scheduled - config.swa.lr) * (1 + math.cos(math.pi * (step - start) / anneal)) / 2


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


def _mask_of(masks: dict, name: str):
    return masks.get(name[:-len("weight")] + "weight_mask") if name.endswith("weight") else None


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@contextlib.contextmanager
def cudnn_autotuned(device: torch.device):
    """On CUDA, inside: cuDNN times its convolution algorithms once per new shape and keeps the
    fastest (``cudnn.benchmark``, as ImageNet trainers set it; training shapes are fixed, since
    partial batches are dropped). The previous setting is restored on exit."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class _Engine:
    """What both engines share: the fused masked SGD step over ``params`` (aligned with
    ``names``, ``masks`` and ``momentum``) and the stacked view of the state."""

    names: list[str]
    params: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    masks: list[torch.Tensor | None]
    momentum: list[torch.Tensor | None]
    data: Group

    def _sgd_step(self, grads: list[torch.Tensor], lr: float, train: TrainConfig) -> None:
        with torch.no_grad():
            swamp_kernels.masked_sgd_step_(self.params, grads, self.momentum, self.masks, lr=lr,
                                           momentum=train.momentum, weight_decay=train.weight_decay,
                                           nesterov=train.nesterov)

    def stacked_params(self) -> list[torch.Tensor]:
        """The parameters as ``[P, *shape]`` tensors sharing storage with the engine's."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers by name, ``[P, *shape]``, sharing storage with the engine's."""
        return {**dict(zip(self.names, self.stacked_params())), **self._stacked_buffers()}

    def _stacked_buffers(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def stacked_momentum(self) -> dict[str, torch.Tensor]:
        """Initialised momentum buffers by parameter name, ``[P, *shape]``."""
        raise NotImplementedError

    def load_momentum(self, buffers: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def sync_buffers(self) -> None:
        """Data-parallel ranks adopt their group leader's buffers (BatchNorm statistics come
        from each rank's part of the batch, as with DDP without SyncBatchNorm)."""
        self.data.broadcast_(list(self.buffers.values()))

    def context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _particle_loss(params, buffers, x, y, *, model, masks, bf16: bool, smoothing: float):
    with _autocast(x.device, bf16):
        out = functional_call(model, (params, buffers, masks), (x,))
    return F.cross_entropy(out.float(), y, label_smoothing=smoothing)


def particle_grads(model: nn.Module, masks: dict, bf16: bool, smoothing: float,
                   params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor):
    """(gradients by name, losses) of every particle: vmap over dim 0 of the stacked
    ``params``, ``buffers`` (updated in place: BatchNorm statistics), ``x`` and ``y``."""
    loss = functools.partial(_particle_loss, model=model, masks=masks, bf16=bf16, smoothing=smoothing)
    return vmap(grad_and_value(loss))(params, buffers, x, y)


@functools.cache
def compiled_particle_grads() -> Callable:
    """:func:`particle_grads` under ``torch.compile``, one wrapper per process: engines of the
    same model and settings (every level of a run) reuse its compiled graph."""
    return torch.compile(particle_grads)


class StackedEngine(_Engine):
    """Several particles in one process: vmap over ``functional_call`` on stacked tensors
    (``train.compile``: the whole vmapped forward and backward compiled)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor], config: Config, data: Group):
        cumulative = [n for n, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None and m.track_running_stats]
        if cumulative:   # its update reads num_batches_tracked as a Python number: not per particle
            raise ValueError(f"BatchNorm {', '.join(cumulative[:3])} has momentum=None (a cumulative average), "
                             "which cannot run on stacked particles: give it a momentum, or train one particle")
        params, _, masks = split_state(model)
        self.model, self.config, self.data = model, config, data
        self.names = list(params)
        self.params = [state[n].requires_grad_(False) for n in self.names]
        self.buffers = {n: t for n, t in state.items() if n not in params}
        self.masks = [_mask_of(masks, n) for n in self.names]
        self.momentum = [None] * len(self.names)
        grads = compiled_particle_grads() if config.train.compile else particle_grads
        self._step = functools.partial(grads, model, masks, config.train.precision == "bf16",
                                       config.train.label_smoothing)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        grads, losses = self._step(dict(zip(self.names, self.params)), self.buffers, x, y)
        grads = [grads[n] for n in self.names]
        self.data.all_reduce_(grads, mean=True)
        self._sgd_step(grads, lr, self.config.train)
        return losses.detach()

    def stacked_params(self):
        return self.params

    def _stacked_buffers(self):
        return self.buffers

    def stacked_momentum(self):
        return {n: m for n, m in zip(self.names, self.momentum) if m is not None}

    def load_momentum(self, buffers):
        self.momentum = [buffers.get(n) for n in self.names]

    def context(self):
        """bf16: BatchNorm layers cast their input to float32 (vmapped batch_norm rejects bf16
        inputs with float32 statistics); the next layer's autocast returns to bf16."""
        if self.config.train.precision != "bf16":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                handle = m.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
                stack.callback(handle.remove)
        return stack


# torch >= 2.14 renamed DDP's broadcast_buffers (deprecated) to forward_sync_buffers.
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


class ModuleEngine(_Engine):
    """One particle in this process: a copy of the model trained as a plain module (DDP over
    the data-parallel ranks when there are several; ``train.channels_last``, ``train.compile``)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor], config: Config, data: Group):
        self.module, self.config, self.data = copy.deepcopy(model), config, data
        train = config.train
        if train.channels_last:
            self.module.to(memory_format=torch.channels_last)
        params, buffers, masks = split_state(self.module)
        with torch.no_grad():
            for name, tensor in {**params, **buffers}.items():
                tensor.copy_(state[name][0])
        self.names = list(params)
        self.params = list(params.values())
        self.buffers = buffers
        self.masks = [_mask_of(masks, n) for n in self.names]
        self.momentum = [None] * len(self.names)
        self.device = self.params[0].device
        net: nn.Module = self.module
        if data.size > 1:   # buffers are synced by sync_buffers, not at every forward
            net = DistributedDataParallel(net, process_group=data.handle, **_NO_FORWARD_BUFFER_SYNC,
                                          device_ids=[self.device] if self.device.type == "cuda" else None)
        self.net = torch.compile(net) if train.compile else net
        self.autocast = _autocast(self.device, train.precision == "bf16")

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        x, y = x[0], y[0]
        if self.config.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            out = self.net(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=self.config.train.label_smoothing)
        loss.backward()
        grads = [p.grad for p in self.params]
        self._sgd_step(grads, lr, self.config.train)
        for p in self.params:
            p.grad = None
        return loss.detach().unsqueeze(0)

    def stacked_params(self):
        return [p.detach().unsqueeze(0) for p in self.params]

    def _stacked_buffers(self):
        return {n: b.unsqueeze(0) for n, b in self.buffers.items()}

    def stacked_momentum(self):
        return {n: m.unsqueeze(0) for n, m in zip(self.names, self.momentum) if m is not None}

    def load_momentum(self, buffers):
        """Buffers take their param's layout (channels_last too), so the fused step needs no copies."""
        self.momentum = [torch.empty_like(p).copy_(buffers[n][0]) if n in buffers else None
                         for n, p in zip(self.names, self.params)]


@dataclass
class TrainResult:
    """Stacked final state (``[P, ...]``, this process's particles; SWA weights when ``swa``),
    mean last-epoch loss over all particles, particle-images trained by all ranks, wall time."""

    state: dict[str, torch.Tensor]
    swa: bool
    train_loss: float
    images: int
    seconds: float


def _over_stage(value: float, placement: Placement, device, mean: bool) -> float:
    """Sum (or mean) over every rank of the stage (data ranks x particle groups) of ``value``."""
    box = torch.tensor([value], dtype=torch.float64, device=device)
    placement.data.all_reduce_([box], mean=mean)
    placement.cross.all_reduce_([box], mean=mean)
    return box.item()


class _Checkpoints:
    """Builds the stage's complete state on rank 0 from every particle group's share."""

    def __init__(self, engine: _Engine, swa_state, placement: Placement):
        self.engine, self.swa_state, self.placement = engine, swa_state, placement

    def full(self, progress: dict) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); all ranks of the stage must call it."""
        if self.placement.data.index != 0:
            return None
        parts = {"state": self.engine.state(), "momentum": self.engine.stacked_momentum(),
                 "swa": self.swa_state or {}}
        keys = [(part, name) for part, tensors in parts.items() for name in tensors]
        gathered = self.placement.cross.gather_cat([parts[p][n] for p, n in keys])
        if gathered is None:
            return None
        full: dict = {part: {} for part in parts}
        for (part, name), tensor in zip(keys, gathered):
            full[part][name] = tensor.detach().clone()
        return {**full, **progress}

    @staticmethod
    def local(checkpoint: dict, placement: Placement, device: torch.device) -> dict:
        """This process's particles out of a checkpoint's stacked tensors, on ``device``
        (the checkpoint may be memory-mapped on the CPU: only these rows are read)."""
        rows = list(placement.particles)
        return {part: {n: t[rows].to(device) for n, t in checkpoint[part].items()}
                for part in ("state", "momentum", "swa")}


def train_particles(model: nn.Module, state: dict[str, torch.Tensor], data, config: Config, *,
                    stage: int, begin: int, end: int, swa: bool, fixed_lr: float | None = None,
                    placement: Placement | None = None,
                    checkpoint: Callable[[dict], None] | None = None,
                    resume: dict | None = None,
                    log: Callable[[str], None] = lambda line: None,
                    progress: Callable[[int], contextlib.AbstractContextManager] | None = None) -> TrainResult:
    """Train the particles stacked in ``state`` (a dict from :func:`stack_state`) from step ``begin`` to ``end``.

    ``model`` supplies the architecture and the (shared) masks. ``stage`` keys the batch-order
    seeds (a level number, or -1 for pre-training). ``fixed_lr``: this rate at every step before
    the SWA epochs instead of the schedule (fine-tuning). ``placement`` says which particles ``state``
    holds and which ranks share the work (default: all of them, this process alone).
    ``checkpoint(dict)`` is called on rank 0 every ``train.checkpoint_every`` epochs; ``resume``
    is such a dict to continue from (it replaces ``state``).
    """
    train = config.train
    particles = next(iter(state.values())).shape[0]
    placement = placement or Placement(tuple(range(particles)), Group.single(), Group.single())
    device = next(iter(state.values())).device
    if resume is not None:
        local = _Checkpoints.local(resume, placement, device)
        state = local["state"]
    engine = (ModuleEngine if particles == 1 else StackedEngine)(model, state, config, placement.data)
    steps_per_epoch = data.steps_per_epoch(train.batch_size)
    swa_epoch = math.floor(config.swa.start * train.epochs)
    params = engine.stacked_params()
    swa_state = {n: torch.zeros_like(p) for n, p in zip(engine.names, params)} if swa else None
    averaged, images, images_before, seconds_before = 0, 0, 0, 0.0   # images: this rank's, since the start
    first_epoch, last_epoch = begin // steps_per_epoch, math.ceil(end / steps_per_epoch)
    if resume is not None:
        engine.load_momentum(local["momentum"])
        if swa:
            swa_state = {n: local["swa"][n] for n in engine.names} if resume["averaged"] else swa_state
        averaged, images_before, seconds_before = resume["averaged"], resume["images"], resume["seconds"]
        first_epoch = resume["epoch"]
    checkpoints = _Checkpoints(engine, swa_state, placement)
    shard = (placement.data.index, placement.data.size)
    lr, mean_loss = 0.0, float("nan")
    started = time.perf_counter()
    bar = progress(last_epoch - first_epoch) if progress else contextlib.nullcontext()
    with bar as pbar, engine.context(), cudnn_autotuned(device):
        for epoch in range(first_epoch, last_epoch):
            generators = [epoch_generator(config.seed, stage, p, epoch) for p in placement.particles]
            in_swa = swa and epoch >= swa_epoch
            loss_sum, loss_count = torch.zeros(particles, device=device), 0
            skip = max(0, begin - epoch * steps_per_epoch)   # the steps before the rewind point
            batches = data.train_batches(generators, train.batch_size, config.data.augment, shard=shard, skip=skip)
            for i, (x, y) in enumerate(batches, start=skip):
                step = epoch * steps_per_epoch + i
                if step >= end:
                    break
                lr = (swa_learning_rate(step, steps_per_epoch, config, fixed_lr) if in_swa else fixed_lr
                      if fixed_lr is not None else learning_rate(step, steps_per_epoch, train))
                loss_sum += engine.step(x, y, lr)
                loss_count += 1
                images += x.shape[0] * x.shape[1]
            if in_swa and (epoch + 1) * steps_per_epoch <= end:
                with torch.no_grad():
                    swamp_kernels.swa_update_([swa_state[n] for n in engine.names],
                                              [p.unsqueeze(0) for p in params], averaged)
                averaged += 1
            mean_loss = _over_stage((loss_sum / max(loss_count, 1)).mean().item(), placement, device, mean=True)
            log(f"stage {stage} epoch {epoch + 1}/{train.epochs} lr {lr:.5g} "
                f"loss {mean_loss:.4f} particles {particles * placement.cross.size}")
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{mean_loss:.4f}")
            if train.checkpoint_every and (epoch + 1) % train.checkpoint_every == 0 and epoch + 1 < last_epoch:
                engine.sync_buffers()
                full = checkpoints.full({"stage": stage, "epoch": epoch + 1, "averaged": averaged,
                                         "images": images_before + round(_over_stage(images, placement, device,
                                                                                     mean=False)),
                                         "seconds": seconds_before + time.perf_counter() - started}
                                        ) if checkpoint else None
                if full is not None:
                    checkpoint(full)
    engine.sync_buffers()
    seconds = seconds_before + time.perf_counter() - started
    final = {n: t.detach().clone() for n, t in engine.state().items()}
    if swa and averaged:
        final.update(swa_state)
    return TrainResult(final, bool(swa and averaged), mean_loss,
                       images_before + round(_over_stage(images, placement, device, mean=False)), seconds)
