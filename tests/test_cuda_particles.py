"""particle_average / swa_update_ on the CUDA backend (swamp_kernels._C) against the torch
reference and AveragedModel, on inputs aimed at the kernel's paths; also under compute-sanitizer.

The tests run through the ``cuda_device`` fixture: on a GPU against the built extension, without
one (CI) on CPU tensors through the host build of the same sources (tests/cuda_emulation). Only
launch counting (CUDA profiler), compute-sanitizer and the ResNet-50-sized case (too slow
emulated) are marked ``gpu``.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import swamp_kernels as sk
from kernel_checks import assert_rel_close, cuda_launches, raises_binding_error
from swamp_kernels import cuda as cuda_backend
from swamp_kernels._tensors import particle_row_strides
from test_cuda_extension import _flat_slice, extension, run_under_memcheck  # noqa: F401  (fixture)
from test_triton_particles import assert_pruned_zero, check_resnet50_sized, in_layout

CHUNK = 4096  # entries per chunk (kChunk in csrc/particles.cu)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_PAIRS = list(itertools.product(FLOATS, FLOATS))  # (param dtype, average dtype)
PARTICLES = [1, 2, 4, 8]
# Per-particle shapes around the vector widths (4 and 8 entries) and the chunk; sizes that are
# no multiple of the vector width put particles p >= 1 off alignment (scalar path).
SHAPES = [(1,), (2,), (3,), (4,), (5,), (7,), (8,), (9,), (15,), (16,), (17,), (33,), (1000,),
          (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 3,), (3, 5), (64, 3, 3), (100_003,)]


def averaging_case(particles: int, seed: int, device):
    """Params ``[P, *shape]`` on ``device`` of every (param, average) dtype pair, masks (every
    fourth one None), the average dtypes, and offsets that misalign some params, averages and
    masks (the scalar path); plus non-contiguous and channels_last params."""
    gen = torch.Generator().manual_seed(seed)
    params, masks, out_dtypes, out_offsets = [], [], [], []
    for i, shape in enumerate(SHAPES):
        param_dtype, out_dtype = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        numel = particles * torch.Size(shape).numel()
        flat = _flat_slice(numel, 1 if i % 5 == 4 else 0,
                           lambda n: torch.randn(n, generator=gen).to(device, param_dtype))
        params.append(flat.view(particles, *shape))
        mask_flat = _flat_slice(torch.Size(shape).numel(), 1 if i % 3 == 2 else 0,
                                lambda n: (torch.rand(n, generator=gen) < 0.6).to(device))
        masks.append(None if i % 4 == 3 else mask_flat.view(shape))
        out_dtypes.append(out_dtype)
        out_offsets.append(1 if i % 7 == 6 else 0)
    for shape, layout in [((4, 3, 3, 3), "channels_last_3d"), ((7, 3), "particle_last")]:
        params.append(in_layout(torch.randn(particles, *shape, generator=gen).to(device), layout))
        masks.append((torch.rand(shape, generator=gen) < 0.5).to(device))
        out_dtypes.append(torch.float32)
        out_offsets.append(0)
    masks[-1].zero_()  # one tensor pruned entirely
    return params, masks, out_dtypes, out_offsets


def nan_averages(params, out_dtypes, out_offsets) -> list[torch.Tensor]:
    """Averages filled with NaN (an n_averaged == 0 update must not read them), some misaligned."""
    return [_flat_slice(p[0].numel(), off, lambda n, p=p, d=d: torch.full((n,), float("nan"), dtype=d, device=p.device))
            .view(p.shape[1:]) for p, d, off in zip(params, out_dtypes, out_offsets)]


def present(masks):
    """(indices, masks) of the entries that have a mask."""
    kept = [(i, m) for i, m in enumerate(masks) if m is not None]
    return [i for i, _ in kept], [m for _, m in kept]


def assert_zero_where_masked(outs, masks):
    idx, kept = present(masks)
    assert_pruned_zero([outs[i] for i in idx], kept)


@pytest.mark.parametrize("particles", PARTICLES)
@pytest.mark.parametrize("masks_kind", ["masks", "none"])
def test_particle_average_matches_reference(cuda_device, particles, masks_kind):
    """Averages laid out like one particle (particle_row_strides: channels_last stays so)."""
    params, masks, _, _ = averaging_case(particles, particles, cuda_device)
    masks = masks if masks_kind == "masks" else None
    ours = sk.particle_average(params, masks, backend="cuda")
    expected = sk.particle_average(params, masks, backend="torch")
    for i, (x, y, p) in enumerate(zip(ours, expected, params)):
        assert x.shape == y.shape and x.dtype == y.dtype and x.stride() == particle_row_strides(p), i
        assert_rel_close(x, y)
    if masks is not None:
        assert_zero_where_masked(ours, masks)


@pytest.mark.parametrize("particles", PARTICLES)
@pytest.mark.parametrize("masks_kind", ["masks", "none"])
def test_swa_updates_match_reference(cuda_device, particles, masks_kind):
    """Four updates (n_averaged 0..3) into NaN-filled, partly misaligned averages of every dtype pair."""
    params, masks, out_dtypes, out_offsets = averaging_case(particles, 10 + particles, cuda_device)
    masks = masks if masks_kind == "masks" else None
    ours = nan_averages(params, out_dtypes, out_offsets)
    ours[17] = ours[17].t().contiguous().t()  # non-contiguous: written back in place
    expected = [x.clone() for x in ours]
    gen = torch.Generator().manual_seed(particles)
    for n in range(4):
        for p in params:  # in place: layouts and misalignments stay
            p.add_(torch.randn(p.shape, generator=gen).to(cuda_device, p.dtype))
        sk.swa_update_(ours, params, n, masks, backend="cuda")
        sk.swa_update_(expected, params, n, masks, backend="torch")
        for i, (x, y) in enumerate(zip(ours, expected)):
            assert x.dtype == y.dtype, i
            assert_rel_close(x, y)
    assert not ours[17].is_contiguous()
    if masks is not None:
        assert_zero_where_masked(ours, masks)


def test_non_finite_particles_at_masked_entries_end_at_plus_zero(cuda_device):
    params, masks, out_dtypes, out_offsets = averaging_case(4, 3, cuda_device)
    masks = [torch.zeros(p.shape[1:], dtype=torch.bool, device=cuda_device) if m is None else m
             for p, m in zip(params, masks)]
    for i, (p, m) in enumerate(zip(params, masks)):
        p[:, ~m] = (float("inf"), float("nan"), float("-inf"))[i % 3]
    averages = sk.particle_average(params, masks, backend="cuda")
    swa = nan_averages(params, out_dtypes, out_offsets)
    sk.swa_update_(swa, params, 0, masks, backend="cuda")
    sk.swa_update_(swa, params, 5, masks, backend="cuda")
    for outs in (averages, swa):
        for i, (x, m) in enumerate(zip(outs, masks)):
            assert torch.isfinite(x).all(), i
            assert (x[~m] == 0).all() and not torch.signbit(x[~m]).any(), i


def test_swa_matches_averaged_model(cuda_device):
    """External oracle: AveragedModel fed the masked particle mean, over five updates, P = 4."""
    gen = torch.Generator().manual_seed(20)
    shapes = [(1,), (7, 3), (4, 3, 3, 3), (CHUNK + 5,), (9,)]
    masks = [(torch.rand(s, generator=gen) < 0.6).to(cuda_device) for s in shapes]
    masks[-1] = None
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, device=cuda_device)) for s in shapes])
    averaged = AveragedModel(model)
    ours = [torch.full(s, float("nan"), device=cuda_device) for s in shapes]
    for n in range(5):
        params = [torch.randn(4, *s, generator=gen).to(cuda_device) for s in shapes]
        with torch.no_grad():
            for target, p, m in zip(model, params, masks):
                mean = p.double().mean(0)
                target.copy_(mean if m is None else torch.where(m, mean, 0.0))
        averaged.update_parameters(model)
        sk.swa_update_(ours, params, n, masks, backend="cuda")
    for x, y in zip(ours, averaged.module):
        torch.testing.assert_close(x, y.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_one_launch_per_dtype_pair(cuda_device):
    params, masks, out_dtypes, out_offsets = averaging_case(2, 4, cuda_device)
    swa = nan_averages(params, out_dtypes, out_offsets)
    launches = cuda_launches(lambda: sk.swa_update_(swa, params, 1, masks, backend="cuda"), "swa_update_kernel")
    assert len(launches) == len({(p.dtype, s.dtype) for p, s in zip(params, swa)}) == 9, launches
    launches = cuda_launches(lambda: sk.particle_average(params, masks, backend="cuda"), "swa_update_kernel")
    assert len(launches) == 3, launches  # the averages take their params' dtypes


@pytest.mark.parametrize("count", [1, 99, 100, 101, 300])
def test_table_inline_and_in_device_memory(cuda_device, count):
    """100 AverageEntry rows fit in the kernel arguments; more go through a device buffer."""
    gen = torch.Generator().manual_seed(count)
    sizes = torch.randint(1, 300, (count,), generator=gen).tolist()
    params = [torch.randn(3, n, generator=gen).to(cuda_device) for n in sizes]
    masks = [(torch.rand(n, generator=gen) < 0.5).to(cuda_device) if i % 2 else None for i, n in enumerate(sizes)]
    ours = [torch.randn(n, generator=gen).to(cuda_device) for n in sizes]
    expected = [x.clone() for x in ours]
    sk.swa_update_(ours, params, 2, masks, backend="cuda")
    sk.swa_update_(expected, params, 2, masks, backend="torch")
    for x, y in zip(ours, expected):
        assert_rel_close(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("particles", [1, 4, 8])
def test_resnet50_sized_matches_reference(extension, particles):
    check_resnet50_sized("cuda", particles)


BINDING_ERRORS = {
    "P mismatch": (lambda p, s, m: ([s, s.clone()], [p, p[:1]], [None, None]), r"swa_update_: params\[1\] has shape"),
    "swa shape": (lambda p, s, m: ([s[:3]], [p], [m]), r"swa_update_: swa\[0\] has shape \[3\]"),
    "mask dtype": (lambda p, s, m: ([s], [p], [p[0]]), r"swa_update_: masks\[0\] has dtype Float"),
    "mask broadcast": (lambda p, s, m: ([s], [p], [m[:4]]), r"swa_update_: masks\[0\] has shape \[4\]"),
    "swa dtype": (lambda p, s, m: ([s.double()], [p], [m]), r"swa_update_: swa\[0\] has dtype Double"),
    "non-contiguous": (lambda p, s, m: ([s], [p.t().contiguous().t()], [m]),
                       r"swa_update_: params\[0\] must be contiguous"),
    "mask count": (lambda p, s, m: ([s], [p], []), r"swa_update_: 0 masks but 1 params"),
    "shared swa": (lambda p, s, m: ([s, s], [p, p], [m, m]), r"swa_update_: swa\[1\] is the memory of swa\[0\]"),
}


@pytest.mark.parametrize("case", BINDING_ERRORS, ids=list(BINDING_ERRORS))
def test_compiled_op_checks_its_input(cuda_device, case):
    p = torch.randn(2, 8, device=cuda_device)
    s = torch.zeros(8, device=cuda_device)
    m = torch.ones(8, dtype=torch.bool, device=cuda_device)
    make_args, message = BINDING_ERRORS[case]
    swa, params, masks = make_args(p, s, m)
    with raises_binding_error(message):
        cuda_backend._ops().swa_update_(swa, params, 1, masks)


SANITIZED_SCRIPT = """
import torch
import swamp_kernels as sk
from kernel_checks import assert_rel_close
from test_cuda_particles import averaging_case, nan_averages
for particles in (1, 3):
    params, masks, out_dtypes, out_offsets = averaging_case(particles, 0, "cuda")
    for x, y in zip(sk.particle_average(params, masks, backend="cuda"),
                    sk.particle_average(params, masks, backend="torch")):
        assert_rel_close(x, y)
    swa = nan_averages(params, out_dtypes, out_offsets)
    for n in (0, 1):
        sk.swa_update_(swa, params, n, masks, backend="cuda")
many = [torch.randn(2, 5 + i % 7, device="cuda") for i in range(150)]  # table in device memory
sk.swa_update_([p[0].clone() for p in many], many, 1, backend="cuda")
torch.cuda.synchronize()
print("particles checked")
"""


@pytest.mark.gpu
def test_kernels_are_clean_under_compute_sanitizer_memcheck(extension):
    run_under_memcheck(SANITIZED_SCRIPT, "particles checked")
