"""Persistent memory of a module: the bytes its parameters, buffers and tensor attributes hold.

On CUDA it is measured: ``torch.cuda.memory_allocated`` before and after building the module
(so state a hook or attribute keeps alive counts too). On the CPU (smoke runs) it is the sum
over the distinct storages of its parameters, buffers and tensor attributes, which is what
the allocator would report for tensors the module owns. ``torch.nn.utils.prune`` keeps its
recomputed ``weight`` as a plain attribute; both ways count it.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch
from torch import nn


def _tensors(module: nn.Module):
    for sub in module.modules():
        yield from sub._parameters.values()
        yield from sub._buffers.values()
        yield from (v for v in vars(sub).values() if isinstance(v, torch.Tensor))


def owned_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages of ``module``'s parameters, buffers and tensor attributes."""
    storages = {}
    for t in _tensors(module):
        if t is not None:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def built_bytes(build: Callable[[], nn.Module], device: torch.device) -> tuple[nn.Module, int]:
    """``build()`` and the bytes the built module keeps (allocator delta on CUDA)."""
    if device.type != "cuda":
        module = build()
        return module, owned_bytes(module)
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    module = build()
    gc.collect()
    torch.cuda.synchronize(device)
    return module, torch.cuda.memory_allocated(device) - before
