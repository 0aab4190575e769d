"""Parameter shape lists of the benchmark cases, as plain data.

They are written out from the architectures, so listing them imports no model library:
ResNet-50 as ``torchvision.models.resnet50()`` (tests/test_benchmark_harness.py checks the
counts and the conv geometry against torchvision), CIFAR ResNet-20 as OpenLTH's
``cifar_resnet_20`` (1x1 conv shortcuts).
"""
from __future__ import annotations

import math
from typing import NamedTuple

Shape = tuple[int, ...]

# A list of mixed sizes, 1 element to 8.9e7, 10^8 elements in all.
MIXED_1E8: list[Shape] = [(1,), (7,), (4096,), (1000, 1000), (10_000_000,), (88_995_896,)]


def _conv(c_in: int, c_out: int, k: int) -> list[Shape]:
    return [(c_out, c_in, k, k)]


def _bn(c: int) -> list[Shape]:
    return [(c,), (c,)]


def resnet50_params() -> list[Shape]:
    """Every parameter of torchvision's ``resnet50()`` in ``parameters()`` order
    (161 tensors, 25,557,032 elements): stem, bottlenecks [3, 4, 6, 3], fc."""
    shapes = _conv(3, 64, 7) + _bn(64)
    c_in = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += (_conv(c_in, planes, 1) + _bn(planes) + _conv(planes, planes, 3) + _bn(planes)
                       + _conv(planes, 4 * planes, 1) + _bn(4 * planes))
            if b == 0:
                shapes += _conv(c_in, 4 * planes, 1) + _bn(4 * planes)
            c_in = 4 * planes
    return shapes + [(1000, 2048), (1000,)]


def resnet50_conv_fc() -> list[Shape]:
    """The prunable ResNet-50 weights: conv and fc weights (54 tensors, 25.5M elements)."""
    return [s for s in resnet50_params() if len(s) > 1]


def cifar_resnet20_params() -> list[Shape]:
    """Every parameter of OpenLTH's CIFAR ResNet-20 in module order (0.27M elements)."""
    shapes = _conv(3, 16, 3) + _bn(16)
    c_in = 16
    for c_out in (16, 32, 64):
        for _ in range(3):
            shapes += _conv(c_in, c_out, 3) + _bn(c_out) + _conv(c_out, c_out, 3) + _bn(c_out)
            if c_in != c_out:
                shapes += _conv(c_in, c_out, 1) + _bn(c_out)
            c_in = c_out
    return shapes + [(10, 64), (10,)]


class Conv(NamedTuple):
    """A conv layer's geometry: square ``k x k`` kernel, padding ``k // 2``, no bias, input ``hw x hw``."""
    c_in: int
    c_out: int
    k: int
    stride: int
    hw: int


def resnet50_convs(image: int = 224) -> list[Conv]:
    """The 53 conv layers of torchvision's ``resnet50()`` in module order, for ``image``-pixel
    inputs: stem, then per bottleneck conv1 (1x1), conv2 (3x3, carries the stride), conv3 (1x1)
    and, in each stage's first block, the 1x1 downsample."""
    hw = image // 2
    convs = [Conv(3, 64, 7, 2, image)]
    hw //= 2  # 3x3 max pool, stride 2
    c_in = 64
    for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            convs += [Conv(c_in, planes, 1, 1, hw), Conv(planes, planes, 3, stride, hw),
                      Conv(planes, 4 * planes, 1, 1, hw // stride)]
            if b == 0:
                convs.append(Conv(c_in, 4 * planes, 1, stride, hw))
            hw //= stride
            c_in = 4 * planes
    return convs


def numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def shrink(shapes: list[Shape], max_tensors: int = 12, max_numel: int = 512) -> list[Shape]:
    """Tiny stand-ins for CPU smoke runs: the first ``max_tensors`` shapes, each with its
    largest dimension halved until it has at most ``max_numel`` elements (ranks kept)."""
    out = []
    for shape in shapes[:max_tensors]:
        dims = list(shape)
        while math.prod(dims) > max_numel:
            i = dims.index(max(dims))
            dims[i] = (dims[i] + 1) // 2
        out.append(tuple(dims))
    return out


# The issue-4 workloads: (case-name prefix, parameter shape list, particle count P, large).
PARTICLE_MODELS = (
    ("resnet50", resnet50_params, 1, False),
    ("resnet50", resnet50_params, 4, False),
    ("resnet50", resnet50_params, 8, True),
    ("cifar_resnet20", cifar_resnet20_params, 4, False),
)
