"""Scale-out on ``torch.distributed``: particle groups x data-parallel ranks, and their collectives.

Launched by ``torchrun``, a world of ``W`` ranks is laid out as ``G = distributed.particle_groups``
particle groups of ``D = W / G`` data-parallel ranks each: rank ``r`` is data rank ``r % D`` of
group ``r // D``. Group ``g`` trains particles ``[g * P/G, (g + 1) * P/G)``; its ``D`` ranks split
every batch of those particles and average gradients (DDP, or one all-reduce for stacked
particles). Ranks with the same data rank form a *cross* group, one rank per particle group:
particle means, ensembles and checkpoints of all particles go through it. A stage of one
particle (pre-training) is trained by the whole world as its data-parallel ranks.

A single process is the same layout with ``W = G = D = 1``: every :class:`Group` then has size
one and its collectives return their input, so the pipeline has one code path.

Collectives run on NCCL (CUDA) or gloo (CPU) with ``distributed.timeout_s``: a rank that dies
or stalls makes the others raise :class:`DistributedError` instead of waiting forever.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistributedError", "collective_failure", "Group", "Topology", "Placement", "launched", "setup", "teardown"]


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or stalled."""


def collective_failure(where: str, timeout_s: float, error: BaseException) -> DistributedError:
    """The error a rank raises when a collective (``where``) failed or timed out."""
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DistributedError(f"{where} failed: another rank died, could not be reached, or stalled for more "
                            f"than distributed.timeout_s = {timeout_s:g} s ({cause})")


def launched() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[t.dtype].append(i)
    return groups


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat_(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@dataclass(frozen=True)
class Group:
    """Some ranks of the world: ``ranks`` (global, ordered); this process is ``ranks[index]``.

    Tensor collectives flatten their inputs into one buffer per dtype (one collective each,
    not one per tensor). A group of size one does no communication.
    """

    ranks: tuple[int, ...]
    index: int
    handle: Any = None          # the torch ProcessGroup (None for a group of one)
    timeout_s: float = 0.0

    @contextlib.contextmanager
    def _failing_clearly(self, what: str):
        """Turns the error of a collective that never completes into a DistributedError."""
        try:
            yield
        except RuntimeError as error:
            raise collective_failure(f"rank {self.ranks[self.index]}: {what} with ranks {list(self.ranks)}",
                                     self.timeout_s, error) from error

    @staticmethod
    def single() -> "Group":
        return Group((0,), 0)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _each_dtype(self, tensors: Sequence[torch.Tensor], collective) -> None:
        for indices in _by_dtype(tensors).values():
            chosen = [tensors[i] for i in indices]
            flat = _flat(chosen)
            with self._failing_clearly(collective.__name__):
                collective(flat.view(torch.uint8) if flat.dtype == torch.bool else flat)
            _unflat_(flat, chosen)

    def all_reduce_(self, tensors: Sequence[torch.Tensor], mean: bool = False) -> None:
        """In place: the sum (or mean) of each tensor over the group."""
        if self.size == 1:
            return
        def all_reduce(flat):
            dist.all_reduce(flat, group=self.handle)
            if mean:
                flat.div_(self.size)
        self._each_dtype(tensors, all_reduce)

    def broadcast_(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """In place: every rank ends with group member ``src``'s values."""
        if self.size == 1:
            return
        def broadcast(flat):
            dist.broadcast(flat, self.ranks[src], group=self.handle)
        self._each_dtype(tensors, broadcast)

    def gather_cat(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Member 0 gets each tensor concatenated over the group along dim 0 (members in order);
        the others get None. All members must hold tensors of equal shapes."""
        if self.size == 1:
            return list(tensors)
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for indices in _by_dtype(tensors).values():
            chosen = [tensors[i] for i in indices]
            flat = _flat(chosen)
            parts = [torch.empty_like(flat) for _ in self.ranks] if self.index == 0 else None
            with self._failing_clearly("gather"):
                dist.gather(flat, parts, dst=self.ranks[0], group=self.handle)
            if self.index == 0:
                pieces = [torch.empty_like(t).unsqueeze(0).repeat(self.size, *[1] * t.dim())
                          for t in chosen]
                for member, part in enumerate(parts):
                    _unflat_(part, [p[member] for p in pieces])
                for i, piece in zip(indices, pieces):
                    out[i] = piece.flatten(0, 1)
        return out if self.index == 0 else None

    def all_gather_object(self, value) -> list:
        """Every member's ``value``, in member order."""
        if self.size == 1:
            return [value]
        values: list = [None] * self.size
        with self._failing_clearly("all_gather_object"):
            dist.all_gather_object(values, value, group=self.handle)
        return values

    def broadcast_object(self, value, src: int = 0):
        """Member ``src``'s ``value`` on every member."""
        if self.size == 1:
            return value
        box = [value]
        with self._failing_clearly("broadcast_object"):
            dist.broadcast_object_list(box, self.ranks[src], group=self.handle)
        return box[0]


@dataclass(frozen=True)
class Placement:
    """Where a process sits while training one stage: the global ids of the particles it
    trains (their batch-order seeds), the ranks that share its batches (``data``) and the
    ranks holding the stage's other particles (``cross``; size one when there are none)."""

    particles: tuple[int, ...]
    data: Group
    cross: Group


@dataclass(frozen=True)
class Topology:
    """The world as ``groups`` particle groups x ``data_ranks`` data-parallel ranks."""

    world: Group
    data: Group                 # the data-parallel ranks of this process's particle group
    cross: Group                # one rank per particle group: those with this data rank
    device: torch.device

    @property
    def groups(self) -> int:
        return self.cross.size

    @property
    def group(self) -> int:
        """This process's particle group."""
        return self.cross.index

    @property
    def is_writer(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.world.index == 0

    def placement(self, particles: int) -> Placement:
        """Placement for a stage of ``particles`` particles: group g takes its contiguous share;
        a single particle (pre-training, IMP) is trained by all ranks of the world as its
        data-parallel ranks (in lock-step, so none runs ahead; rank 0 alone checkpoints)."""
        if particles == 1:
            return Placement((0,), self.world, Group.single())
        if particles % self.groups:
            raise ValueError(f"{particles} particles do not split over {self.groups} particle groups")
        share = particles // self.groups
        return Placement(tuple(range(self.group * share, (self.group + 1) * share)), self.data, self.cross)


def _device(name: str, local_rank: int) -> torch.device:
    """The device of config key ``device`` for this process: under torchrun, each rank's
    ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"config key 'device': {name}, but torch sees no CUDA device here; use auto or cpu")
    if launched() and name.startswith("cuda:"):
        raise ValueError(f"config key 'device': {name} would put every rank of the torchrun job on one GPU; "
                         "use cuda or auto (rank i uses cuda:LOCAL_RANK)")
    if name == "cuda" and launched():
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup(particle_groups: int, timeout_s: float, device: str = "auto") -> Topology:
    """The :class:`Topology` of this process; joins the ``torchrun`` job if launched by one."""
    if not launched():
        single = Group.single()
        return Topology(single, single, single, _device(device, 0))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world % particle_groups:
        raise ValueError(f"config key 'distributed.particle_groups': {particle_groups} does not divide "
                         f"the {world} processes of this job")
    target = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if target.type == "cuda":
        torch.cuda.set_device(target)
    timeout = datetime.timedelta(seconds=timeout_s)
    data_ranks = world // particle_groups
    handles = {}
    layouts = ([tuple(range(g * data_ranks, (g + 1) * data_ranks)) for g in range(particle_groups)]
               + [tuple(range(d, world, data_ranks)) for d in range(data_ranks)])
    try:   # a rank that never arrives: the store's wait times out (DistStoreError, a RuntimeError)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timeout,
                                    device_id=target if target.type == "cuda" else None)
        for ranks in layouts:   # every rank creates every group, in the same order
            handles[ranks] = dist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None
    except RuntimeError as error:
        raise collective_failure(f"rank {rank} of {world}: joining the job", timeout_s, error) from error

    def member(ranks):
        return Group(ranks, ranks.index(rank), handles[ranks], timeout_s)
    group, data_rank = divmod(rank, data_ranks)
    return Topology(Group(tuple(range(world)), rank, dist.group.WORLD, timeout_s),
                    member(layouts[group]), member(layouts[particle_groups + data_rank]), target)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
