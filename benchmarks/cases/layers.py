"""``masked_conv2d`` and ``masked_linear`` workloads (issue 5): one masked layer's forward +
backward (input and weight gradients) in bf16, against the dense layer and torch's pruning.

Every approach computes with the same weights (zero where the mask, ~20% dense, is False):

- ``MaskedConv2d`` / ``MaskedLinear`` (swamp.nn): weights stored masked, plain dense forward,
  the weight gradient masked by one ``torch.where`` per layer in autograd;
- ``dense_apply_masks_``: a dense layer, then one multi-tensor ``swamp_kernels.apply_masks_``
  over the weight gradient after backward (swamp's alternative design, see swamp/nn.py);
- ``triton`` / ``swamp_torch``: the public op ``swamp_kernels.masked_linear`` /
  ``masked_conv2d`` on that backend (Triton: the mask applied inside the GEMM; torch: the dense
  op on ``weight * mask``);
- ``dense``: ``nn.Conv2d`` / ``nn.Linear`` (cuDNN / cuBLAS), the target;
- ``torch_prune``: ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` and a float
  ``weight_mask``; a forward pre-hook recomputes ``weight = weight_orig * weight_mask``).

Each call clears the gradients first (as ``zero_grad(set_to_none=True)`` does in training).
``extra.extra_bytes_per_weight`` is each approach's persistent memory over the dense layer's,
per weight (benchmarks/memory.py); ``extra.time_ratio_to_dense`` is the row's time over dense.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune

import swamp
import swamp_kernels
from benchmarks import inputs, memory, shapes
from benchmarks.workload import Workload

DTYPE = torch.bfloat16
DENSITY = 0.2
CONV_BATCH = 256
LINEAR_FEATURES, LINEAR_TOKENS = 4096, 8192
SMOKE_BATCH, SMOKE_CHANNELS, SMOKE_HW = 2, 8, 8
SMOKE_FEATURES, SMOKE_TOKENS = 32, 16


class _FunctionalMasked(nn.Module):
    """The public op ``swamp_kernels.masked_linear`` / ``masked_conv2d`` of ``layer``'s geometry,
    ``op(x, weight, weight_mask, backend=...)``, as a module (weight in ``layer``'s memory format)."""

    def __init__(self, layer: nn.Module, mask: torch.Tensor, backend: str):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.register_buffer("weight_mask", torch.empty_like(self.weight, dtype=torch.bool).copy_(mask))
        self.op = swamp_kernels.masked_linear if isinstance(layer, nn.Linear) else functools.partial(
            swamp_kernels.masked_conv2d, stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
            groups=layer.groups)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.weight_mask, backend=self.backend)


def _dense_layer(x: dict) -> nn.Module:
    """A fresh dense layer of the workload's geometry holding its masked weights."""
    layer = x["new_layer"]()
    with torch.no_grad():
        layer.weight.copy_(x["weight"])
    return layer


def _swamp_layer(x: dict) -> nn.Module:
    layer = swamp.nn.to_masked_(_dense_layer(x))
    swamp.set_masks(layer, {"weight": x["mask"]})
    return layer


def _pruned_layer(x: dict) -> nn.Module:
    return prune.custom_from_mask(_dense_layer(x), "weight", x["mask"])


def _functional_layer(backend: str) -> Callable[[dict], nn.Module]:
    return lambda x: _FunctionalMasked(_dense_layer(x), x["mask"], backend)


def _dense_with_mask(x: dict) -> nn.Module:
    """The dense layer plus the bool mask ``apply_masks_`` needs, kept as a buffer in the
    weight's memory format (as ``MaskedConv2d`` keeps it)."""
    layer = _dense_layer(x)
    layer.register_buffer("weight_mask", torch.empty_like(layer.weight, dtype=torch.bool).copy_(x["mask"]))
    return layer


def _fwd_bwd(layer: nn.Module, x: dict, mask_grads: bool = False):
    """The timed call: clear grads, forward, backward with a fixed output gradient; with
    ``mask_grads``, one ``apply_masks_`` over the weight gradient afterwards."""
    data, grad_out = x["input"], x["grad_out"]
    params = list(layer.parameters())

    def step():
        data.grad = None
        for p in params:
            p.grad = None
        layer(data).backward(grad_out)
        if mask_grads:
            swamp_kernels.apply_masks_([layer.weight.grad], [layer.weight_mask])
    return step


def _setup(new_layer: Callable[[torch.device, bool], nn.Module], input_shape: Callable[[bool], tuple],
           builders: dict[str, Callable[[dict], nn.Module]]):
    """Inputs: the masked weights, an input and output gradient, every approach's layer built
    (and its persistent bytes measured) once."""
    def setup(device: torch.device, smoke: bool) -> dict:
        gen = inputs.generator(device)
        make = lambda: new_layer(device, smoke)  # noqa: E731
        shape = tuple(make().weight.shape)
        mask = inputs.masks([shape], DENSITY, device, gen)[0]
        weight = inputs.weights([shape], DTYPE, device, gen)[0].mul_(mask)
        x = {"new_layer": make, "weight": weight, "mask": mask}
        layers, nbytes = {}, {}
        for name, build in builders.items():
            layers[name], nbytes[name] = memory.built_bytes(functools.partial(build, x), device)
        x["layers"] = layers
        x["extra_bytes_per_weight"] = {n: (b - nbytes["dense"]) / weight.numel()
                                       for n, b in nbytes.items() if n != "dense"}
        data = torch.randn(input_shape(smoke), generator=gen, device=device).to(DTYPE)
        if data.dim() == 4:
            data = data.contiguous(memory_format=torch.channels_last)
        x["input"] = data.requires_grad_()
        with torch.no_grad():
            out = layers["dense"](data)
        x["grad_out"] = torch.randn(out.shape, generator=gen, device=device).to(DTYPE) \
            .contiguous(memory_format=torch.channels_last if out.dim() == 4 else torch.contiguous_format)
        return x
    return setup


def _extra(info: Callable[[dict], dict]):
    def extra(x: dict, row: str, step_ms) -> dict:
        return {"time_ratio_to_dense": step_ms[row] / step_ms["dense"] if "dense" in step_ms else None,
                "extra_bytes_per_weight": x["extra_bytes_per_weight"], "weights": x["weight"].numel(),
                "dtype": str(DTYPE).removeprefix("torch."), **info(x)}
    return extra


def _factories(names: dict[str, bool]) -> dict:
    """``{name: factory}`` timing the layer ``name`` (``True``: then ``apply_masks_`` on its grad)."""
    return {n: (lambda x, n=n, m=m: _fwd_bwd(x["layers"][n], x, mask_grads=m)) for n, m in names.items()}


# --------------------------------------------------------------------------- conv
def _conv_case(conv: shapes.Conv) -> Workload:
    def new_layer(device, smoke):
        c_in, c_out = (min(conv.c_in, SMOKE_CHANNELS), min(conv.c_out, SMOKE_CHANNELS)) if smoke \
            else (conv.c_in, conv.c_out)
        layer = nn.Conv2d(c_in, c_out, conv.k, conv.stride, conv.k // 2, bias=False, device=device, dtype=DTYPE)
        return layer.to(memory_format=torch.channels_last)

    def input_shape(smoke):
        if smoke:
            return SMOKE_BATCH, min(conv.c_in, SMOKE_CHANNELS), min(conv.hw, SMOKE_HW), min(conv.hw, SMOKE_HW)
        return CONV_BATCH, conv.c_in, conv.hw, conv.hw

    builders = {"dense": _dense_layer, "MaskedConv2d": _swamp_layer, "dense_apply_masks_": _dense_with_mask,
                "swamp_torch": _functional_layer("torch"), "torch_prune": _pruned_layer}
    return Workload(
        op="masked_conv2d",
        name=f"in{conv.c_in}_out{conv.c_out}_k{conv.k}_s{conv.stride}_hw{conv.hw}_b{CONV_BATCH}",
        setup=_setup(new_layer, input_shape, builders),
        variants=_factories({"MaskedConv2d": False}),
        baselines=_factories({"dense_apply_masks_": True, "swamp_torch": False, "dense": False,
                              "torch_prune": False}),
        extra=_extra(lambda x: {"input_shape": list(x["input"].shape)}))


# ------------------------------------------------------------------------- linear
def _linear_new_layer(device, smoke):
    features = SMOKE_FEATURES if smoke else LINEAR_FEATURES
    return nn.Linear(features, features, bias=False, device=device, dtype=DTYPE)


def _linear_input_shape(smoke):
    return (SMOKE_TOKENS, SMOKE_FEATURES) if smoke else (LINEAR_TOKENS, LINEAR_FEATURES)


LINEAR_BUILDERS = {"dense": _dense_layer, "triton": _functional_layer("triton"),
                   "swamp_torch": _functional_layer("torch"), "MaskedLinear": _swamp_layer,
                   "torch_prune": _pruned_layer}

CASES = (
    *(_conv_case(conv) for conv in dict.fromkeys(shapes.resnet50_convs())),
    Workload(op="masked_linear", name=f"{LINEAR_FEATURES}x{LINEAR_FEATURES}_tokens{LINEAR_TOKENS}",
             setup=_setup(_linear_new_layer, _linear_input_shape, LINEAR_BUILDERS),
             variants=_factories({"triton": False}),
             baselines=_factories({"swamp_torch": False, "MaskedLinear": False, "dense": False,
                                   "torch_prune": False}),
             extra=_extra(lambda x: {"tokens": x["input"].shape[0]})),
)
