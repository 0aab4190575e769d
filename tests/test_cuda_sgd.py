"""masked_sgd_step_ on the CUDA backend (swamp_kernels._C) against the torch reference and
torch.optim.SGD, on inputs aimed at the kernel's paths; also under compute-sanitizer.

The tests run through the ``cuda_device`` fixture: on a GPU against the built extension, without
one (CI) on CPU tensors through the host build of the same sources (tests/cuda_emulation). Only
launch counting (CUDA profiler), compute-sanitizer and the ResNet-50-sized case (too slow
emulated) are marked ``gpu``.
"""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from kernel_checks import assert_rel_close, cuda_launches, raises_binding_error
from swamp_kernels import cuda as cuda_backend
from test_cuda_extension import _flat_slice, extension, run_under_memcheck  # noqa: F401  (fixture)
from test_sgd import check_against_sgd
from test_triton_sgd import OPTIONS, assert_pruned_zero, check_resnet50_sized, in_layout, option_id

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
CHUNK = 4096  # entries per chunk of a row (kChunk in csrc/masked_sgd.cu)
GROUPS = [(f32, f32), (f32, bf16), (f32, f16), (f16, f16), (bf16, bf16)]  # (param, grad) dtypes
# (param shape, mask: "full" | "broadcast" (shape[1:], P = shape[0] rows) | "none"): sizes around
# the vector widths (4 and 8) and the chunk; broadcast rows of a length that is no multiple of
# the vector width put rows r >= 1 off alignment (scalar path).
SHAPES = [((1,), "full"), ((3,), "none"), ((4,), "full"), ((5,), "full"), ((8,), "none"), ((9,), "full"),
          ((17,), "full"), ((1000,), "full"), ((CHUNK - 1,), "full"), ((CHUNK,), "none"),
          ((CHUNK + 1,), "full"), ((2 * CHUNK + 3,), "full"), ((100_003,), "full"),
          ((1, 33), "broadcast"), ((2, 5, 3), "broadcast"), ((4, 64), "broadcast"), ((8, 7), "broadcast"),
          ((8, CHUNK + 8), "broadcast"), ((2, 2 * CHUNK + 1), "broadcast"), ((4, 3, 3, 3), "broadcast"),
          ((6, 10), "full"), ((0, 3), "broadcast")]


def sgd_case(seed: int, device, groups=GROUPS, shapes=SHAPES):
    """Params on ``device`` of every (param, grad) dtype group (nonzero also where masked), their
    masks, and a grad maker. Some params, grads and masks start 1 element into their buffer:
    contiguous but not 16-byte aligned (the scalar path); buffers the op allocates are aligned."""
    gen = torch.Generator().manual_seed(seed)
    params, masks, grad_dtypes, grad_offsets = [], [], [], []
    for i, (shape, kind) in enumerate(shapes):
        param_dtype, grad_dtype = groups[i % len(groups)]
        numel = torch.Size(shape).numel()
        params.append(_flat_slice(numel, 1 if i % 5 == 4 else 0,
                                  lambda n: torch.randn(n, generator=gen).to(device, param_dtype)).view(shape))
        mask_shape = shape[1:] if kind == "broadcast" else shape
        mask = _flat_slice(torch.Size(mask_shape).numel(), 1 if i % 3 == 2 else 0,
                           lambda n: (torch.rand(n, generator=gen) < 0.6).to(device)).view(mask_shape)
        masks.append(None if kind == "none" else mask)
        grad_dtypes.append(grad_dtype)
        grad_offsets.append(1 if i % 7 == 6 else 0)

    def grads():
        return [_flat_slice(p.numel(), off, lambda n, d=d: torch.randn(n, generator=gen).to(device, d)).view(p.shape)
                for p, d, off in zip(params, grad_dtypes, grad_offsets)]
    return params, masks, grads


def present(params, masks):
    """(params, masks) of the entries that have a mask."""
    kept = [(p, m) for p, m in zip(params, masks) if m is not None]
    return [p for p, _ in kept], [m for _, m in kept]


def assert_matches(ours, expected, ours_buffers, expected_buffers):
    for i, (p, q) in enumerate(zip(ours, expected)):
        assert p.dtype == q.dtype, i
        assert_rel_close(p, q)
    for i, (b, c) in enumerate(zip(ours_buffers, expected_buffers)):
        assert (b is None) == (c is None), i
        if b is not None:
            assert b.dtype == c.dtype and b.shape == c.shape, i
            assert_rel_close(b, c)


@pytest.mark.parametrize("masks_kind", ["masks", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_steps_match_reference(cuda_device, options, masks_kind):
    """Three steps (the first with None buffers) on every dtype group, P in {1, 2, 4, 8}."""
    params, masks, grads = sgd_case(len(option_id(options)), cuda_device)
    masks = masks if masks_kind == "masks" else None
    expected = [p.clone() for p in params]
    ours_buffers, expected_buffers = [None] * len(params), [None] * len(params)
    for _ in range(3):
        g = grads()
        sk.masked_sgd_step_(params, g, ours_buffers, masks, lr=0.1, backend="cuda", **options)
        sk.masked_sgd_step_(expected, g, expected_buffers, masks, lr=0.1, backend="torch", **options)
        assert_matches(params, expected, ours_buffers, expected_buffers)
        if masks is not None:
            assert_pruned_zero(*present(params, masks))


def test_non_contiguous_and_channels_last(cuda_device):
    gen = torch.Generator().manual_seed(1)
    shapes = [((4, 3, 3, 3), "channels_last"), ((17, 9), "transposed"), ((8, 5, 7), "strided")]
    values = [torch.randn(s, generator=gen).to(cuda_device) for s, _ in shapes]
    params = [in_layout(v, layout) for v, (_, layout) in zip(values, shapes)]
    masks = [in_layout(torch.rand(s, generator=gen).to(cuda_device) < 0.5, layout) for s, layout in shapes[:2]]
    masks.append((torch.rand(5, 7, generator=gen) < 0.5).to(cuda_device))  # broadcast over 8 particles
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    ours_buffers, expected_buffers = [None] * 3, [None] * 3
    for _ in range(2):
        g = [in_layout(torch.randn(s, generator=gen).to(cuda_device), layout) for s, layout in shapes]
        sk.masked_sgd_step_(params, g, ours_buffers, masks, backend="cuda", **options)
        sk.masked_sgd_step_(values, g, expected_buffers, masks, backend="torch", **options)
        assert_matches(params, values, ours_buffers, expected_buffers)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert not any(p.is_contiguous() for p in params)


def test_matches_torch_optim_sgd(cuda_device):
    """External oracle: torch.optim.SGD on the masked grads, then params masked, four steps."""
    params, masks, grads = sgd_case(2, cuda_device, groups=[(f32, f32)])
    check_against_sgd(params, masks, [grads() for _ in range(4)], "cuda", lr=0.05, momentum=0.9,
                      weight_decay=5e-3, nesterov=True)


def test_first_and_later_buffers_in_one_launch(cuda_device):
    """None buffers next to existing misaligned and non-contiguous ones: all right, and on a GPU
    one launch (counted by the CUDA profiler)."""
    params, masks, grads = sgd_case(3, cuda_device, groups=[(f32, f32)])
    gen = torch.Generator().manual_seed(3)
    expected_buffers = [None if i % 2 else torch.randn(p.shape, generator=gen).to(cuda_device)
                        for i, p in enumerate(params)]
    ours_buffers = [None if b is None else _flat_slice(b.numel(), 1, lambda n: torch.empty(n, device=cuda_device))
                    .view(b.shape).copy_(b) for b in expected_buffers]
    ours_buffers[0] = expected_buffers[0].clone()
    ours_buffers[20] = in_layout(expected_buffers[20], "transposed")
    expected = [p.clone() for p in params]
    g = grads()
    options = dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3)

    def step():
        sk.masked_sgd_step_(params, g, ours_buffers, masks, backend="cuda", **options)

    if cuda_device.type == "cuda":
        launches = cuda_launches(step, "masked_sgd_kernel")
        assert len(launches) == 1, launches
    else:
        step()
    sk.masked_sgd_step_(expected, g, expected_buffers, masks, backend="torch", **options)
    assert not ours_buffers[20].is_contiguous()
    assert_matches(params, expected, ours_buffers, expected_buffers)


@pytest.mark.gpu
def test_one_launch_per_dtype_group(cuda_device):
    params, masks, grads = sgd_case(4, cuda_device)
    launches = cuda_launches(lambda: sk.masked_sgd_step_(params, grads(), [None] * len(params), masks,
                                                         lr=0.1, momentum=0.9, backend="cuda"),
                             "masked_sgd_kernel")
    assert len(launches) == len(GROUPS), launches


def test_non_finite_grads_at_masked_entries_are_dropped(cuda_device):
    params, masks, grads = sgd_case(5, cuda_device)
    g = grads()
    for i, (x, m) in enumerate(zip(g, masks)):
        if m is not None:
            x[..., ~m] = (float("nan"), float("inf"), float("-inf"))[i % 3]
    expected = [p.clone() for p in params]
    ours_buffers, expected_buffers = [None] * len(params), [None] * len(params)
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    sk.masked_sgd_step_(params, g, ours_buffers, masks, backend="cuda", **options)
    sk.masked_sgd_step_(expected, g, expected_buffers, masks, backend="torch", **options)
    assert_matches(params, expected, ours_buffers, expected_buffers)
    for i, (p, b) in enumerate(zip(params, ours_buffers)):
        assert torch.isfinite(p).all() and torch.isfinite(b).all(), i
    kept_params, kept_masks = present(params, masks)
    for p, m in zip(kept_params, kept_masks):
        assert not torch.signbit(p[..., ~m]).any()  # +0.0, not -0.0


@pytest.mark.parametrize("count", [1, 62, 63, 64, 200])
def test_table_inline_and_in_device_memory(cuda_device, count):
    """63 SgdEntry rows fit in the kernel arguments; more go through a device buffer."""
    gen = torch.Generator().manual_seed(count)
    sizes = torch.randint(1, 300, (count,), generator=gen).tolist()
    params = [torch.randn(2, n, generator=gen).to(cuda_device) for n in sizes]
    masks = [None if i % 3 == 0 else (torch.rand(n if i % 3 == 1 else (2, n), generator=gen) < 0.5).to(cuda_device)
             for i, n in enumerate(sizes)]
    expected = [p.clone() for p in params]
    ours_buffers, expected_buffers = [None] * count, [None] * count
    for _ in range(2):
        g = [torch.randn(p.shape, generator=gen).to(cuda_device) for p in params]
        sk.masked_sgd_step_(params, g, ours_buffers, masks, lr=0.1, momentum=0.9, backend="cuda")
        sk.masked_sgd_step_(expected, g, expected_buffers, masks, lr=0.1, momentum=0.9, backend="torch")
    assert_matches(params, expected, ours_buffers, expected_buffers)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [f32, bf16])
@pytest.mark.parametrize("particles", [1, 4, 8])
def test_resnet50_sized_matches_reference(extension, particles, grad_dtype):
    check_resnet50_sized("cuda", particles, grad_dtype)


def _binding_args(device, changes) -> dict:
    """Valid arguments on ``device`` but for ``changes(ones)``, ``ones(shape, dtype)`` making tensors there."""
    def ones(shape, dtype=f32):
        return torch.ones(shape, dtype=dtype, device=device)
    p = torch.randn(2, 8, device=device)
    args = dict(params=[p], grads=[torch.randn_like(p)], momentum_buffers=[torch.zeros_like(p)],
                first_step=[False], masks=[ones(8, torch.bool)])
    args.update(changes(ones))
    return args


def _sharing(name: str):
    """Changes to two params whose ``name`` (params or momentum_buffers) are one tensor."""
    def changes(ones):
        two = dict(params=[ones((2, 8)), ones((2, 8))], grads=[ones((2, 8)), ones((2, 8))],
                   momentum_buffers=[ones((2, 8)), ones((2, 8))], first_step=[False, False], masks=[None, None])
        return two | {name: [two[name][0]] * 2}
    return changes


BINDING_ERRORS = {  # changes to the valid arguments of _binding_args, error message
    "grad count": (lambda ones: dict(grads=[]), r"masked_sgd_step_: 0 grads but 1 params"),
    "grad shape": (lambda ones: dict(grads=[ones((8, 2))]), r"masked_sgd_step_: grads\[0\] has shape \[8, 2\]"),
    "mixed dtypes": (lambda ones: dict(params=[ones((2, 8), bf16)], grads=[ones((2, 8), f16)]),
                     r"masked_sgd_step_: grads\[0\] has dtype Half but params\[0\] has BFloat16"),
    "buffer count": (lambda ones: dict(momentum_buffers=[], first_step=[]), r"masked_sgd_step_: 0 momentum_buffers"),
    "buffer dtype": (lambda ones: dict(momentum_buffers=[ones((2, 8), f16)]),
                     r"masked_sgd_step_: momentum_buffers\[0\] has dtype Half"),
    "mask shape": (lambda ones: dict(masks=[ones(2, torch.bool)]), r"masked_sgd_step_: masks\[0\] has shape \[2\]"),
    "non-contiguous": (lambda ones: dict(params=[ones((8, 2)).t()]),
                       r"masked_sgd_step_: params\[0\] must be contiguous"),
    "shared params": (_sharing("params"), r"masked_sgd_step_: params\[1\] is the memory of params\[0\]"),
    "shared buffers": (_sharing("momentum_buffers"),
                       r"masked_sgd_step_: momentum_buffers\[1\] is the memory of momentum_buffers\[0\]"),
    "buffer in a param": (lambda ones: (lambda flat: dict(params=[flat[:16].view(2, 8)],
                                                          momentum_buffers=[flat[8:].view(2, 8)]))(ones(24)),
                          r"masked_sgd_step_: momentum_buffers\[0\] overlaps the memory of params\[0\]"),
}


@pytest.mark.parametrize("case", BINDING_ERRORS, ids=list(BINDING_ERRORS))
def test_compiled_op_checks_its_input(cuda_device, case):
    changes, message = BINDING_ERRORS[case]
    with raises_binding_error(message):
        cuda_backend._ops().masked_sgd_step_(**_binding_args(cuda_device, changes), lr=0.1, momentum=0.9,
                                             dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


SANITIZED_SCRIPT = """
import torch
import swamp_kernels as sk
from test_cuda_sgd import sgd_case
for options in (dict(momentum=0.0), dict(momentum=0.9, nesterov=True, weight_decay=1e-2)):
    params, masks, grads = sgd_case(0, "cuda")
    buffers = [None] * len(params)
    for _ in range(2):
        sk.masked_sgd_step_(params, grads(), buffers, masks, lr=0.1, backend="cuda", **options)
many = [torch.randn(2, 5 + i % 7, device="cuda") for i in range(100)]  # table in device memory
sk.masked_sgd_step_(many, [torch.randn_like(p) for p in many], [None] * 100, None, lr=0.1, momentum=0.9,
                    backend="cuda")
torch.cuda.synchronize()
print("masked_sgd_step_ checked")
"""


@pytest.mark.gpu
def test_kernel_is_clean_under_compute_sanitizer_memcheck(extension):
    run_under_memcheck(SANITIZED_SCRIPT, "masked_sgd_step_ checked")
