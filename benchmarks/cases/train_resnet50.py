"""``resnet50_train_step`` workload (issue 7): one ImageNet training step of a masked ResNet-50.

torchvision ``resnet50()`` in channels_last, a synthetic batch of 256 3x224x224 images resident
on the device, bf16 autocast, cross-entropy, ``backward``, optimizer step,
``zero_grad(set_to_none=True)``; cuDNN autotuning on. Variants:

- ``masked``: ``swamp.sparsify`` of every conv/fc layer, random masks keeping 20% of each
  weight (``swamp.set_masks``), ``swamp.optim.MaskedSGD`` (lr 0.1, momentum 0.9, wd 1e-4)
  given the layers' masks -- what a swamp user writes;
- ``dense``: the dense model with ``torch.optim.SGD(foreach=True)``, same hyper-parameters;
- ``masked_compiled`` / ``dense_compiled``: the same with ``torch.compile(model)`` (GPU only;
  compiled in the harness's untimed first call; a failure is recorded, not fatal).

``extra.images_per_second`` holds every variant's images/s; ``throughput_ratio_to_dense`` is
the row's images/s over the dense model's (the target is >= 0.97).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import swamp
from benchmarks import inputs
from benchmarks.workload import Workload
from swamp.nn import MaskedLayer
from swamp.optim import MaskedSGD

BATCH, IMAGE = 256, 224
SMOKE_BATCH, SMOKE_IMAGE = 2, 32
CLASSES = 1000
DENSITY = 0.2
HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
CASE = f"resnet50_b{BATCH}_{IMAGE}px_bf16_channels_last"


def _setup(device: torch.device, smoke: bool) -> dict:
    batch, image = (SMOKE_BATCH, SMOKE_IMAGE) if smoke else (BATCH, IMAGE)
    gen = inputs.generator(device)
    images = torch.randn(batch, 3, image, image, generator=gen, device=device)
    return {"images": images.contiguous(memory_format=torch.channels_last),
            "labels": torch.randint(0, CLASSES, (batch,), generator=gen, device=device),
            "device": device, "batch": batch, "image": image}


def _model(device: torch.device, masked: bool):
    """ResNet-50 and its optimizer; masked: every conv/fc weight at 20% density."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=CLASSES).to(device, memory_format=torch.channels_last)
    if not masked:
        return model, torch.optim.SGD(model.parameters(), **HYPER, foreach=True)
    swamp.sparsify(model)
    gen = inputs.generator(device, seed=1)
    swamp.set_masks(model, {name: torch.rand(m.shape, generator=gen, device=device) < DENSITY
                            for name, m in swamp.masks(model).items()})
    layers = [m for m in model.modules() if isinstance(m, MaskedLayer)]
    return model, MaskedSGD(model.parameters(), **HYPER,
                            masks={layer.weight: layer.weight_mask for layer in layers})


def _training_step(masked: bool, compiled: bool = False):
    def factory(x: dict):
        device = x["device"]
        model, optimizer = _model(device, masked)
        forward = torch.compile(model) if compiled else model
        model.train()

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(forward(x["images"]), x["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    return factory


def _extra(x: dict, row: str, step_ms) -> dict:
    per_second = {n: x["batch"] / (ms / 1e3) for n, ms in step_ms.items()}
    return {"images_per_second": per_second,
            "throughput_ratio_to_dense": per_second[row] / per_second["dense"] if "dense" in per_second else None,
            "images_per_step": x["batch"], "image_size": x["image"], "density": DENSITY}


CASES = (
    Workload(op="resnet50_train_step", name=CASE, setup=_setup,
             variants={"masked": _training_step(masked=True)},
             baselines={"dense": _training_step(masked=False),
                        "masked_compiled": _training_step(masked=True, compiled=True),
                        "dense_compiled": _training_step(masked=False, compiled=True)},
             extra=_extra, compiled=frozenset({"masked_compiled", "dense_compiled"})),
)
