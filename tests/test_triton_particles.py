"""particle_average / swa_update_ on the Triton backend against the torch reference and AveragedModel.

Params are stacked particles ``[P, *shape]`` of mixed sizes (1 element, odd sizes, several
chunks), float32/float16/bfloat16, contiguous, non-contiguous and channels_last; masks
broadcast over P; SWA tensors may have another dtype than their params.
"""
from __future__ import annotations

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import CountingLaunches, assert_rel_close

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# (per-particle shape, param dtype, swa dtype, layout of the [P, *shape] param)
SPECS = [((1,), f32, f32, "contiguous"),
         ((7, 3), f32, f32, "particle_last"),
         ((4, 3, 3, 3), f32, f32, "channels_last_3d"),
         ((5000,), f32, f32, "contiguous"),
         ((13,), bf16, f32, "contiguous"),
         ((3, 11), f16, f16, "particle_last"),
         ((33,), bf16, bf16, "contiguous")]

PARTICLES = [1, 2, 4, 8]


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor equal to ``values`` with the given memory layout."""
    if layout == "channels_last_3d":
        return values.to(memory_format=torch.channels_last_3d)
    if layout == "particle_last":  # the particle dimension innermost in memory
        return values.movedim(0, -1).contiguous().movedim(-1, 0)
    return values.clone()


def make_params(particles: int, device, specs=SPECS) -> list[torch.Tensor]:
    return [in_layout(torch.randn(particles, *shape, device=device).to(dtype), layout)
            for shape, dtype, _, layout in specs]


def make_masks(device, specs=SPECS) -> list[torch.Tensor]:
    masks = [torch.rand(shape, device=device) < 0.5 for shape, *_ in specs]
    masks[-1].zero_()  # one tensor pruned entirely
    return masks


def assert_pruned_zero(tensors, masks):
    for i, (x, keep) in enumerate(zip(tensors, masks)):
        assert (x[~keep] == 0).all(), f"tensor {i} is nonzero at a masked entry"


@pytest.mark.parametrize("masked", [True, False], ids=["masks", "no-masks"])
@pytest.mark.parametrize("particles", PARTICLES)
def test_particle_average_matches_reference(device, particles, masked):
    skip_unless_runs("particle_average", "triton", device)
    torch.manual_seed(particles)
    params = make_params(particles, device)
    masks = make_masks(device) if masked else None
    ours = sk.particle_average(params, masks, backend="triton")
    expected = sk.particle_average(params, masks, backend="torch")
    for x, y in zip(ours, expected):
        assert_rel_close(x, y)
    if masked:
        assert_pruned_zero(ours, masks)


@pytest.mark.parametrize("masked", [True, False], ids=["masks", "no-masks"])
@pytest.mark.parametrize("particles", PARTICLES)
def test_swa_updates_match_reference(device, particles, masked):
    """Four updates (n_averaged 0..3), SWA tensors partly non-contiguous, first ones NaN."""
    skip_unless_runs("swa_update_", "triton", device)
    torch.manual_seed(10 + particles)
    masks = make_masks(device) if masked else None
    ours = [torch.full(shape, float("nan"), device=device, dtype=dtype) for shape, _, dtype, _ in SPECS]
    ours[1] = ours[1].t().contiguous().t()
    expected = [x.clone() for x in ours]
    for n in range(4):
        params = make_params(particles, device)
        sk.swa_update_(ours, params, n, masks, backend="triton")
        sk.swa_update_(expected, params, n, masks, backend="torch")
        for x, y in zip(ours, expected):
            assert x.dtype == y.dtype
            assert_rel_close(x, y)
    assert not ours[1].is_contiguous()
    if masked:
        assert_pruned_zero(ours, masks)


def test_swa_matches_averaged_model(device):
    """External oracle: AveragedModel fed the masked particle mean, over five updates."""
    skip_unless_runs("swa_update_", "triton", device)
    torch.manual_seed(20)
    specs = [spec for spec in SPECS if spec[1] == spec[2] == f32]
    masks = make_masks(device, specs)
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, device=device))
                                    for s, *_ in specs])
    averaged = AveragedModel(model)
    ours = [torch.empty(s, device=device) for s, *_ in specs]
    for n in range(5):
        params = make_params(4, device, specs)
        with torch.no_grad():
            for p, x, keep in zip(model, params, masks):
                p.copy_(torch.where(keep, x.double().mean(0), 0.0))
        averaged.update_parameters(model)
        sk.swa_update_(ours, params, n, masks, backend="triton")
    for x, y in zip(ours, averaged.module):
        assert_rel_close(x, y.detach())


def test_one_launch_per_dtype_pair(device, monkeypatch):
    skip_unless_runs("swa_update_", "triton", device)
    from swamp_kernels.triton import particles
    counter = CountingLaunches(particles._average_kernel)
    monkeypatch.setattr(particles, "_average_kernel", counter)
    params = make_params(2, device)
    sk.particle_average(params, backend="triton")
    assert len(counter.grids) == 3  # float32, float16, bfloat16 params
    counter.grids.clear()
    swa = [torch.zeros(shape, dtype=dtype, device=device) for shape, _, dtype, _ in SPECS]
    sk.swa_update_(swa, params, 1, backend="triton")
    assert len(counter.grids) == 4  # (param, swa): f32/f32, bf16/f32, f16/f16, bf16/bf16


P2 = [torch.ones(2, 3), torch.ones(2, 4)]


@pytest.mark.parametrize("call, error, match", [
    (lambda: sk.particle_average([torch.ones(2, 3), torch.ones(4, 3)]), ValueError, "P mismatch"),
    (lambda: sk.particle_average([torch.ones(())]), ValueError, r"params\[0\] has shape \(\)"),
    (lambda: sk.particle_average(P2, [torch.ones(3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)]),
     ValueError, r"masks\[1\] has shape \(2, 4\)"),
    (lambda: sk.particle_average(P2, [torch.ones(3), torch.ones(4)]), TypeError, r"masks\[0\] has dtype"),
    (lambda: sk.particle_average([torch.ones(2, 3, dtype=torch.int64)]), TypeError, r"params\[0\] has dtype"),
    (lambda: sk.swa_update_([torch.ones(3), torch.ones(5)], P2, 1), ValueError, r"swa\[1\] has shape"),
    (lambda: sk.swa_update_([torch.ones(3, dtype=torch.float64), torch.ones(4)], P2, 1),
     TypeError, r"swa\[0\] has dtype"),
    (lambda: sk.swa_update_([torch.ones(3)], P2, 1), ValueError, "swa has 1 tensors"),
    (lambda: sk.swa_update_([torch.ones(3), torch.ones(4)], P2, -1), ValueError, "n_averaged"),
])
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call()


def resnet50_particles(particles: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torchvision = pytest.importorskip("torchvision")
    shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    params = [torch.randn(particles, *s, device="cuda") for s in shapes]
    masks = [torch.rand(s, device="cuda") < 0.2 for s in shapes]
    return params, masks


@pytest.mark.gpu
@pytest.mark.parametrize("particles", [1, 4, 8])
def test_resnet50_sized_matches_reference(particles):
    check_resnet50_sized("triton", particles)


def check_resnet50_sized(backend: str, particles: int) -> None:
    """ResNet-50's parameter list (25.6M entries) stacked over P particles, on ``backend``."""
    torch.manual_seed(30)
    params, masks = resnet50_particles(particles)
    for x, y in zip(sk.particle_average(params, masks, backend=backend),
                    sk.particle_average(params, masks, backend="torch")):
        assert_rel_close(x, y)
    ours = [torch.empty(p.shape[1:], device="cuda") for p in params]
    expected = [torch.empty_like(x) for x in ours]
    for n in range(3):
        params = [p + n for p in params]
        sk.swa_update_(ours, params, n, masks, backend=backend)
        sk.swa_update_(expected, params, n, masks, backend="torch")
    for x, y in zip(ours, expected):
        assert_rel_close(x, y)
    assert_pruned_zero(ours, masks)
