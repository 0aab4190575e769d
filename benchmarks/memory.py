"""Persistent memory of a module: the bytes its parameters, buffers and tensor attributes hold.

On CUDA it is measured: the bytes requested from the caching allocator before and after
building the module (so state a hook or attribute keeps alive counts too; requested, not
allocated: the allocator rounds blocks up to 512 bytes, which would add 0.03 bytes per weight
to the 9408-byte mask of ResNet-50's stem). On the CPU (smoke runs) it is the sum
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
    def requested() -> int:
        gc.collect()
        torch.cuda.synchronize(device)
        return torch.cuda.memory_stats(device)["requested_bytes.all.current"]
    before = requested()
    module = build()
    return module, requested() - before
