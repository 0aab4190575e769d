"""particle_average and swa_update_ on stacked particles ``[P, *shape]``.

particle_average is checked against a float64 mean; swa_update_ against
``torch.optim.swa_utils.AveragedModel`` fed the masked particle mean, update after update.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import swamp_kernels as sk
from backend_params import every_backend, skip_unless_runs

# (per-particle shape, dtype, stored transposed)
SHAPES = [((1,), torch.float32, False),
          ((7, 13), torch.float16, False),
          ((5, 3, 3, 3), torch.float32, False),
          ((10, 12), torch.bfloat16, True),
          ((4097,), torch.float32, False)]


def stacked(shape, dtype, transposed, P, gen, device) -> torch.Tensor:
    """Random particles ``[P, *shape]``; transposed ones are a non-contiguous view."""
    if transposed:
        return torch.randn((P, shape[1], shape[0]), generator=gen).to(dtype).to(device).transpose(1, 2)
    return torch.randn((P, *shape), generator=gen).to(dtype).to(device)


def random_masks(params, gen, device) -> list[torch.Tensor]:
    return [(torch.rand(p.shape[1:], generator=gen) < 0.7).to(device) for p in params]


def masked_mean64(p: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    mean = p.double().mean(0)
    return mean if mask is None else torch.where(mask, mean, 0.0)


def assert_zero_where_masked(outs, masks):
    for i, (o, m) in enumerate(zip(outs, masks)):
        assert (o[~m] == 0).all(), f"output {i} is not exactly 0 at masked entries"


# -------------------------------------------------------------------- particle_average
@every_backend
@pytest.mark.parametrize("P", [1, 2, 4, 8])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_particle_average_is_the_masked_mean(backend, device, P, masked):
    skip_unless_runs("particle_average", backend, device)
    gen = torch.Generator().manual_seed(P)
    params = [stacked(*spec, P, gen, device) for spec in SHAPES]
    masks = random_masks(params, gen, device) if masked else None
    if masked:  # non-finite values where masked must not leak into the result
        params[0].masked_fill_(~masks[0], float("inf"))
        params[2].masked_fill_(~masks[2], float("nan"))
    before = [p.clone() for p in params]

    got = sk.particle_average(params, masks, backend=backend)

    for i, (g, p) in enumerate(zip(got, params)):
        assert g.dtype == p.dtype and g.shape == p.shape[1:] and g.device == p.device, i
        want = masked_mean64(p, masks and masks[i]).to(p.dtype)
        torch.testing.assert_close(g, want, msg=lambda m: f"average {i}: {m}")
        torch.testing.assert_close(p, before[i], rtol=0, atol=0, equal_nan=True)
    if masked:
        assert_zero_where_masked(got, masks)


# ------------------------------------------------------------------------- swa_update_
@every_backend
@pytest.mark.parametrize("P", [1, 2, 4, 8])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_swa_update_matches_averaged_model(backend, device, P, masked):
    """Several updates (n_averaged 0, 1, 2, ...) against AveragedModel fed the masked mean."""
    skip_unless_runs("swa_update_", backend, device)
    gen = torch.Generator().manual_seed(10 + P)
    shapes = [shape for shape, _, _ in SHAPES]
    model = nn.ParameterList([nn.Parameter(torch.zeros(s, device=device)) for s in shapes])
    averaged = AveragedModel(model)
    swa = [torch.full(s, float("nan"), device=device) for s in shapes]  # n_averaged == 0 must not read it
    swa[3] = torch.full(shapes[3][::-1], float("nan"), device=device).t()  # non-contiguous, written in place
    masks = [(torch.rand(s, generator=gen) < 0.7).to(device) for s in shapes] if masked else None

    for step in range(4):
        params = [stacked(shape, torch.float32, transposed, P, gen, device)
                  for shape, _, transposed in SHAPES]
        with torch.no_grad():
            for target, p, m in zip(model, params, masks or [None] * len(params)):
                target.copy_(masked_mean64(p, m))
        averaged.update_parameters(model)

        sk.swa_update_(swa, params, step, masks, backend=backend)

        for i, (s, ref) in enumerate(zip(swa, averaged.module)):
            torch.testing.assert_close(s, ref.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step}, swa {i}: {m}")
        if masked:
            assert_zero_where_masked(swa, masks)


@every_backend
@pytest.mark.parametrize("swa_dtype", [torch.float16, torch.bfloat16])
def test_swa_update_in_half_precision(backend, device, swa_dtype):
    """Half-precision averages and particles: each update is rounded once from the exact value."""
    skip_unless_runs("swa_update_", backend, device)
    gen = torch.Generator().manual_seed(20)
    params = [stacked(shape, dtype, transposed, 4, gen, device) for shape, dtype, transposed in SHAPES]
    masks = random_masks(params, gen, device)
    swa = [(torch.randn(p.shape[1:], generator=gen)).to(swa_dtype).to(device) for p in params]
    for n_averaged in (0, 3):
        start = [s.double() for s in swa]
        sk.swa_update_(swa, params, n_averaged, masks, backend=backend)
        for i, (s, s0, p, m) in enumerate(zip(swa, start, params, masks)):
            mean = p.double().mean(0)
            wanted = torch.where(m, s0 + (mean - s0) / (n_averaged + 1) if n_averaged else mean, 0.0)
            assert s.dtype == swa_dtype
            torch.testing.assert_close(s, wanted.to(swa_dtype),
                                       msg=lambda m: f"n_averaged {n_averaged}, swa {i}: {m}")
        assert_zero_where_masked(swa, masks)


@every_backend
def test_swa_update_takes_a_tensor_count(backend, device):
    """AveragedModel keeps n_averaged as a one-element tensor; it is accepted like an int."""
    skip_unless_runs("swa_update_", backend, device)
    gen = torch.Generator().manual_seed(21)
    params = [stacked((6, 5), torch.float32, False, 2, gen, device)]
    from_int, from_tensor = [torch.ones(6, 5, device=device)], [torch.ones(6, 5, device=device)]
    sk.swa_update_(from_int, params, 2, backend=backend)
    sk.swa_update_(from_tensor, params, torch.tensor(2), backend=backend)
    torch.testing.assert_close(from_tensor, from_int, rtol=0, atol=0)


# ------------------------------------------------------------------------------ errors
def _params(device, P=2):
    return [torch.randn(P, 4, device=device), torch.randn(P, 2, 3, device=device)]


def _swa(device):
    return [torch.zeros(4, device=device), torch.zeros(2, 3, device=device)]


PARAM_ERRORS = {
    "empty": (lambda d: dict(params=[]), ValueError, r"params is empty"),
    "0-dim param": (lambda d: dict(params=[torch.randn(2, 4, device=d), torch.tensor(1.0, device=d)]),
                    ValueError, r"params\[1\] has shape \(\); expected \[P, \*shape\] with P >= 1"),
    "no particles": (lambda d: dict(params=[torch.randn(0, 4, device=d)]), ValueError,
                     r"params\[0\] has shape \(0, 4\); expected \[P, \*shape\]"),
    "P mismatch": (lambda d: dict(params=[torch.randn(2, 4, device=d), torch.randn(3, 2, 3, device=d)]),
                   ValueError, r"params\[1\] has 3 particles but params\[0\] has 2 \(P mismatch\)"),
    "int params": (lambda d: dict(params=[torch.ones(2, 4, dtype=torch.int64, device=d)]), TypeError,
                   r"params\[0\] has dtype torch.int64"),
    "params device": (lambda d: dict(params=[torch.randn(2, 4, device=d), torch.randn(2, 3, device="meta")]),
                      ValueError, r"params\[1\] is on meta"),
    "mask with particle dim": (lambda d: dict(params=_params(d),
                                              masks=[torch.ones(2, 4, dtype=torch.bool, device=d),
                                                     torch.ones(2, 3, dtype=torch.bool, device=d)]),
                               ValueError, r"masks\[0\] has shape \(2, 4\), expected \(4,\)"),
    "mask dtype": (lambda d: dict(params=_params(d), masks=[torch.ones(4, dtype=torch.bool, device=d),
                                                            torch.ones(2, 3, device=d)]),
                   TypeError, r"masks\[1\] has dtype torch.float32; expected bool"),
    "mask count": (lambda d: dict(params=_params(d), masks=[torch.ones(4, dtype=torch.bool, device=d)]),
                   ValueError, r"masks has 1 tensors but params.* has 2"),
}

COUNT_RANGE = r"n_averaged must be an int in \[0, 2\*\*63 - 1\)"
SWA_ERRORS = {
    "swa shape": (lambda d: dict(swa=[torch.zeros(4, device=d), torch.zeros(3, 2, device=d)]),
                  ValueError, r"swa\[1\] has shape \(3, 2\), expected \(2, 3\)"),
    "swa with particle dim": (lambda d: dict(swa=[torch.zeros(2, 4, device=d), torch.zeros(2, 3, device=d)]),
                              ValueError, r"swa\[0\] has shape \(2, 4\), expected \(4,\)"),
    "swa count": (lambda d: dict(swa=[torch.zeros(4, device=d)]), ValueError,
                  r"swa has 1 tensors but params"),
    "swa dtype": (lambda d: dict(swa=[torch.zeros(4, device=d),
                                      torch.zeros(2, 3, dtype=torch.int32, device=d)]),
                  TypeError, r"swa\[1\] has dtype torch.int32; expected float32 or float16 or bfloat16"),
    "swa device": (lambda d: dict(swa=[torch.zeros(4, device="meta"), torch.zeros(2, 3, device=d)]),
                   ValueError, r"swa\[0\] is on meta"),
    "sparse swa": (lambda d: dict(swa=[torch.zeros(4, device=d).to_sparse(), torch.zeros(2, 3, device=d)]),
                   TypeError, r"swa\[0\] is a sparse_coo tensor; the ops take dense"),
    "swa not a list": (lambda d: dict(swa=torch.zeros(4, device=d)), TypeError,
                       r"swa must be a list or tuple"),
    "swa twice": (lambda d: (lambda t: dict(params=[torch.randn(2, 4, device=d)] * 2, swa=[t, t]))(
                      torch.zeros(4, device=d)),
                  ValueError, r"swa\[1\] is the memory of swa\[0\]"),
    "expanded swa": (lambda d: dict(swa=[torch.zeros(4, device=d), torch.zeros(1, 3, device=d).expand(2, 3)]),
                     ValueError, r"swa\[1\] has entries that share memory \(an expanded or as_strided view"),
    "negative count": (lambda d: dict(n_averaged=-1), ValueError, rf"{COUNT_RANGE}, got -1"),
    "float count": (lambda d: dict(n_averaged=1.5), ValueError, rf"{COUNT_RANGE}, got 1.5"),
    "bool count": (lambda d: dict(n_averaged=True), ValueError, rf"{COUNT_RANGE}, got True"),
    "count past int64": (lambda d: dict(n_averaged=2**63 - 1), ValueError, rf"{COUNT_RANGE}, got {2**63 - 1}"),
}


@every_backend
@pytest.mark.parametrize("case", PARAM_ERRORS, ids=list(PARAM_ERRORS))
def test_particle_average_bad_input_is_named(backend, device, case):
    skip_unless_runs("particle_average", backend, device)
    make_kwargs, error, message = PARAM_ERRORS[case]
    with pytest.raises(error, match=message):
        sk.particle_average(**make_kwargs(device), backend=backend)


@every_backend
@pytest.mark.parametrize("case", {**PARAM_ERRORS, **SWA_ERRORS}, ids=list({**PARAM_ERRORS, **SWA_ERRORS}))
def test_swa_update_bad_input_is_named(backend, device, case):
    skip_unless_runs("swa_update_", backend, device)
    make_kwargs, error, message = {**PARAM_ERRORS, **SWA_ERRORS}[case]
    kwargs = dict(swa=_swa(device), params=_params(device), n_averaged=1) | make_kwargs(device)
    if case in PARAM_ERRORS and case not in ("mask with particle dim", "mask dtype", "mask count"):
        kwargs["swa"] = [torch.zeros(p.shape[1:] if p.dim() else (), device=p.device)
                         for p in kwargs["params"]]
    with pytest.raises(error, match=message):
        sk.swa_update_(**kwargs, backend=backend)
