"""apply_masks_: masked entries become +0.0, all others keep their bits (NaN, Inf, -0.0 included)."""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from kernel_checks import laid_out
from backend_params import every_backend, skip_unless_runs

OP = "apply_masks_"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so NaN and the sign of zero compare exactly."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def expected(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))


def special_values(shape, dtype, gen, device) -> torch.Tensor:
    """Random values salted with NaN, +-Inf and -0.0."""
    t = torch.randn(shape, generator=gen)
    salt = torch.rand(shape, generator=gen)
    t = torch.where(salt < 0.05, float("nan"), t)
    t = torch.where((salt >= 0.05) & (salt < 0.1), float("inf") * t.sign(), t)
    t = torch.where((salt >= 0.1) & (salt < 0.15), -0.0, t)
    return t.to(dtype).to(device)


# (shape, dtype, layout, mask has the particle-free shape); sizes straddle the 4096-element chunk.
CASES = [((1,), torch.float32, "contiguous", False),
         ((4095,), torch.float16, "contiguous", False),
         ((4096,), torch.bfloat16, "contiguous", False),
         ((3, 4097), torch.float32, "contiguous", True),
         ((0, 5), torch.float32, "contiguous", False),
         ((8, 3, 5, 5), torch.float16, "channels_last", False),
         ((2, 16, 3, 3), torch.float32, "channels_last", True),
         ((33, 12), torch.bfloat16, "transposed", False),
         ((4, 9, 10), torch.float32, "strided", True),
         ((1, 1, 1, 1), torch.bfloat16, "contiguous", True)]


def make_case(seed: int, device, cases=CASES):
    gen = torch.Generator().manual_seed(seed)
    tensors, masks = [], []
    for shape, dtype, layout, per_particle in cases:
        t = laid_out(special_values(shape, dtype, gen, device), layout, step=3)
        mask_shape = t.shape[1:] if per_particle else t.shape
        masks.append((torch.rand(mask_shape, generator=gen) < 0.6).to(device))
        tensors.append(t)
    return tensors, masks


@every_backend
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_where(backend, device, seed):
    skip_unless_runs(OP, backend, device)
    tensors, masks = make_case(seed, device)
    wanted = [expected(t, m) for t, m in zip(tensors, masks)]
    strides = [t.stride() for t in tensors]

    sk.apply_masks_(tensors, masks, backend=backend)

    for i, (t, w) in enumerate(zip(tensors, wanted)):
        assert t.stride() == strides[i], i
        assert torch.equal(bits(t), bits(w)), f"tensors[{i}] differs"


@every_backend
def test_all_true_and_all_false_masks(backend, device):
    skip_unless_runs(OP, backend, device)
    tensors, _ = make_case(2, device, CASES[:4])
    before = [t.clone() for t in tensors]
    sk.apply_masks_(tensors, [torch.ones_like(t, dtype=torch.bool) for t in tensors], backend=backend)
    assert all(torch.equal(bits(t), bits(b)) for t, b in zip(tensors, before))
    sk.apply_masks_(tensors, [torch.zeros_like(t, dtype=torch.bool) for t in tensors], backend=backend)
    assert all(torch.equal(bits(t), bits(torch.zeros_like(t))) for t in tensors)


@every_backend
def test_masks_are_not_modified(backend, device):
    skip_unless_runs(OP, backend, device)
    tensors, masks = make_case(3, device)
    before = [m.clone() for m in masks]
    sk.apply_masks_(tensors, masks, backend=backend)
    assert all(torch.equal(m, b) for m, b in zip(masks, before))


def _ones(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


BAD_INPUTS = {
    "empty list": (lambda d: ([], []), ValueError, r"tensors is empty"),
    "masks None": (lambda d: ([_ones(3, device=d)], None), TypeError,
                   r"masks must be a list or tuple of tensors, got NoneType"),
    "int tensor": (lambda d: ([_ones(3, device=d), _ones(3, dtype=torch.int32, device=d)],
                              [_ones(3, dtype=torch.bool, device=d)] * 2),
                   TypeError, r"tensors\[1\] has dtype torch.int32"),
    "sparse tensor": (lambda d: ([_ones(3, device=d), _ones(3, device=d).to_sparse()],
                                 [_ones(3, dtype=torch.bool, device=d)] * 2),
                      TypeError, r"tensors\[1\] is a sparse_coo tensor; the ops take dense"),
    "mask count": (lambda d: ([_ones(3, device=d), _ones(3, device=d)], [_ones(3, dtype=torch.bool, device=d)]),
                   ValueError, r"masks has 1 tensors but tensors has 2"),
    "mask dtype": (lambda d: ([_ones(3, device=d)], [_ones(3, dtype=torch.uint8, device=d)]),
                   TypeError, r"masks\[0\] has dtype torch.uint8; expected bool"),
    "mask shape": (lambda d: ([_ones(3, device=d), _ones(2, 4, device=d)],
                              [_ones(3, dtype=torch.bool, device=d), _ones(2, dtype=torch.bool, device=d)]),
                   ValueError, r"masks\[1\] has shape \(2,\), expected \(2, 4\) or \(4,\) like tensors\[1\]"),
    "mask device": (lambda d: ([_ones(3, device=d)], [_ones(3, dtype=torch.bool, device="meta")]),
                    ValueError, r"masks\[0\] is on meta but tensors\[0\] is on"),
    "tensor twice": (lambda d: (lambda t: ([t, t[:2], t], [_ones(3, dtype=torch.bool, device=d),
                                                         _ones(2, dtype=torch.bool, device=d),
                                                         _ones(3, dtype=torch.bool, device=d)]))(_ones(3, device=d)),
                     ValueError, r"tensors\[2\] is the memory of tensors\[0\] \(a shared weight listed twice\?\)"),
    "tensors overlap": (lambda d: (lambda t: ([t[4:], t[:5]], [_ones(4, dtype=torch.bool, device=d),
                                                             _ones(5, dtype=torch.bool, device=d)]))(_ones(8, device=d)),
                        ValueError, r"tensors\[0\] overlaps the memory of tensors\[1\]"),
    "expanded tensor": (lambda d: ([_ones(3, device=d), _ones(1, 5, device=d).expand(4, 5)],
                                   [_ones(3, dtype=torch.bool, device=d), _ones(4, 5, dtype=torch.bool, device=d)]),
                        ValueError, r"tensors\[1\] has entries that share memory \(an expanded or as_strided view, "
                                    r"strides \(0, 1\)\)"),
    "self-overlapping view": (lambda d: ([_ones(6, device=d).as_strided((3, 3), (1, 1))],
                                         [_ones(3, 3, dtype=torch.bool, device=d)]),
                              ValueError, r"tensors\[0\] has entries that share memory"),
    "tensor device": (lambda d: ([_ones(3, device=d), _ones(3, device="meta")],
                                 [_ones(3, dtype=torch.bool, device=d)] * 2),
                      ValueError, r"tensors\[1\] is on meta but tensors\[0\] is on"),
}


@every_backend
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_named(backend, device, case):
    skip_unless_runs(OP, backend, device)
    make_args, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        sk.apply_masks_(*make_args(device), backend=backend)
