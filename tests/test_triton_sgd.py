"""masked_sgd_step_ on the Triton backend against the torch reference and torch.optim.SGD.

Every option combination of torch's SGD, first steps (None buffers) and later ones,
masks absent / per-tensor None / broadcast over particles / full-shape / all-pruned,
float16 and bfloat16 grads for float32 params, non-contiguous and channels_last params.
"""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import CountingLaunches, assert_rel_close

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16

# (param shape, param dtype, grad dtype, mask kind, layout); a "broadcast" mask has shape[1:],
# so those params are stacked particles [P, *shape] with P = shape[0] in {1, 2, 4, 8}.
SPECS = [((1,), f32, f32, "none", "contiguous"),
         ((2, 3, 5), f32, f32, "broadcast", "contiguous"),
         ((1, 2500), f32, bf16, "broadcast", "contiguous"),
         ((4, 3, 3, 3), f32, f16, "full", "channels_last"),
         ((17, 9), f32, f32, "full", "transposed"),
         ((8, 5, 7), f32, f32, "broadcast", "strided"),
         ((4, 33), bf16, bf16, "broadcast", "contiguous"),
         ((6,), f16, f16, "none", "contiguous"),
         ((4, 5), f32, f32, "all_pruned", "contiguous"),
         ((0, 3), f32, f32, "broadcast", "contiguous")]

OPTIONS = [dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=decay,
                maximize=maximize)
           for momentum, dampening, nesterov in [(0.0, 0.0, False), (0.0, 0.3, False), (0.9, 0.0, False),
                                                 (0.9, 0.3, False), (0.9, 0.0, True)]
           for decay in (0.0, 1e-2)
           for maximize in (False, True)]


def option_id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items() if v) or "plain"


def in_layout(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor equal to ``values`` with the given memory layout."""
    if layout == "channels_last":
        out = values.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        out = values.t().contiguous().t()
    elif layout == "strided":
        out = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])[..., ::2]
        out.copy_(values)
    else:
        return values.clone()
    assert not out.is_contiguous()
    return out


def make_mask(shape, kind: str, device) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_pruned":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    return torch.rand(shape[1:] if kind == "broadcast" else shape, device=device) < 0.6


def make_case(device, specs=SPECS):
    """Contiguous params (nonzero also where masked), masks, and a grad maker."""
    params = [torch.randn(shape, device=device).to(dtype) for shape, dtype, *_ in specs]
    masks = [make_mask(shape, kind, device) for shape, _, _, kind, _ in specs]

    def grads():
        return [torch.randn(shape, device=device).to(g_dtype) for shape, _, g_dtype, *_ in specs]
    return params, masks, grads


def full_masks(params, masks):
    return [torch.ones_like(p, dtype=torch.bool) if m is None else m.expand(p.shape)
            for p, m in zip(params, masks)]


def assert_pruned_zero(params, masks):
    for i, (p, keep) in enumerate(zip(params, full_masks(params, masks))):
        assert (p[~keep] == 0).all(), f"params[{i}] is nonzero at a masked entry"


@pytest.mark.parametrize("masked", [True, False], ids=["masks", "no-masks"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_steps_match_reference(device, options, masked):
    skip_unless_runs("masked_sgd_step_", "triton", device)
    torch.manual_seed(1)
    params, masks, grads = make_case(device)
    masks = masks if masked else None
    ours = [in_layout(p, layout) for p, (*_, layout) in zip(params, SPECS)]
    ours_buffers, ref_buffers = [None] * len(params), [None] * len(params)
    for _ in range(3):
        g = grads()
        sk.masked_sgd_step_(ours, [in_layout(x, layout) for x, (*_, layout) in zip(g, SPECS)],
                            ours_buffers, masks, lr=0.1, backend="triton", **options)
        sk.masked_sgd_step_(params, g, ref_buffers, masks, lr=0.1, backend="torch", **options)
        for p, q in zip(ours, params):
            assert_rel_close(p, q)
        for b, c, p in zip(ours_buffers, ref_buffers, params):
            assert (b is None) == (c is None)
            if b is not None:
                assert b.dtype == p.dtype and b.shape == p.shape
                assert_rel_close(b, c)
        if masked:
            assert_pruned_zero(ours, masks)


def test_first_and_later_buffers_in_one_call(device):
    """None buffers next to existing (non-contiguous) ones: two launch groups, both right."""
    skip_unless_runs("masked_sgd_step_", "triton", device)
    torch.manual_seed(2)
    specs = [((5, 6), f32, f32, "full", "transposed"), ((2, 40), f32, f32, "broadcast", "contiguous"),
             ((9,), f32, f32, "none", "contiguous")]
    params, masks, grads = make_case(device, specs)
    g = grads()
    ref_buffers = [torch.randn(shape, device=device) for shape, *_ in specs]
    ref_buffers[1] = None
    ours_buffers = [in_layout(ref_buffers[0], "transposed"), None, ref_buffers[2].clone()]
    ours = [p.clone() for p in params]
    options = dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3)
    sk.masked_sgd_step_(ours, g, ours_buffers, masks, backend="triton", **options)
    sk.masked_sgd_step_(params, g, ref_buffers, masks, backend="torch", **options)
    assert not ours_buffers[0].is_contiguous()
    for p, q, b, c in zip(ours, params, ours_buffers, ref_buffers):
        assert_rel_close(p, q)
        assert_rel_close(b, c)


def test_one_launch_per_dtype_group(device, monkeypatch):
    skip_unless_runs("masked_sgd_step_", "triton", device)
    from swamp_kernels.triton import masked_sgd
    counter = CountingLaunches(masked_sgd._masked_sgd_kernel)
    monkeypatch.setattr(masked_sgd, "_masked_sgd_kernel", counter)
    torch.manual_seed(3)
    params, masks, grads = make_case(device)
    buffers = [None] * len(params)
    options = dict(lr=0.1, momentum=0.9)
    sk.masked_sgd_step_(params, grads(), buffers, masks, backend="triton", **options)
    # groups (param, grad dtype): f32/f32, f32/bf16, f32/f16, bf16/bf16, f16/f16
    assert len(counter.grids) == 5
    counter.grids.clear()
    same = [p.float() for p in params]
    sk.masked_sgd_step_(same, [torch.randn_like(p) for p in same], [None] * len(same), masks,
                        backend="triton", **options)
    assert len(counter.grids) == 1


def test_matches_torch_optim_sgd(device):
    """External oracle: torch.optim.SGD on the masked grads, then the params masked, 4 steps."""
    skip_unless_runs("masked_sgd_step_", "triton", device)
    torch.manual_seed(4)
    specs = [spec for spec in SPECS if spec[1] == spec[2] == f32]
    params, masks, grads = make_case(device, specs)
    keep = full_masks(params, masks)
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    options = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-3, nesterov=True)
    sgd = torch.optim.SGD(theirs, **options)
    buffers = [None] * len(params)
    for _ in range(4):
        g = grads()
        sk.masked_sgd_step_(params, g, buffers, masks, backend="triton", **options)
        for p, x, k in zip(theirs, g, keep):
            p.grad = torch.where(k, x, 0.0)
        sgd.step()
        with torch.no_grad():
            for p, k in zip(theirs, keep):
                p.mul_(k)
    for p, q in zip(params, theirs):
        assert_rel_close(p, q.detach())
    for b, q in zip(buffers, theirs):
        assert_rel_close(b, sgd.state[q]["momentum_buffer"])


@pytest.mark.parametrize("bad, error, match", [
    (dict(masks=[torch.ones(3, dtype=torch.bool)]), ValueError, r"masks\[0\] has shape"),
    (dict(masks=[torch.ones(2, 5)]), TypeError, r"masks\[0\] has dtype"),
    (dict(grads=[torch.ones(2, 5, dtype=torch.float16)], params=[torch.ones(2, 5, dtype=torch.bfloat16)]),
     TypeError, r"grads\[0\].*mixed dtypes need float32 params"),
    (dict(params=[torch.ones(2, 5, dtype=torch.int32)]), TypeError, r"params\[0\] has dtype"),
    (dict(buffers=[torch.ones(2, 5, dtype=torch.float16)]), TypeError, r"momentum_buffers\[0\]"),
    (dict(buffers=(None,)), ValueError, "momentum_buffers must be a list"),
    (dict(grads=[torch.ones(5, 2)]), ValueError, r"grads\[0\] has shape"),
    (dict(dampening=0.5, nesterov=True), ValueError, "nesterov"),
    (dict(lr=-1.0), ValueError, "lr must be"),
])
def test_bad_input_raises(bad, error, match):
    params = bad.get("params", [torch.ones(2, 5)])
    grads = bad.get("grads", [torch.ones(2, 5, dtype=params[0].dtype)])
    options = dict(lr=bad.get("lr", 0.1), momentum=0.9, dampening=bad.get("dampening", 0.0),
                   nesterov=bad.get("nesterov", False))
    with pytest.raises(error, match=match):
        sk.masked_sgd_step_(params, grads, bad.get("buffers", [None]), bad.get("masks"),
                            backend="triton", **options)


@pytest.mark.gpu
@pytest.mark.parametrize("grad_dtype", [f32, bf16])
@pytest.mark.parametrize("particles", [1, 4, 8])
def test_resnet50_sized_matches_reference(particles, grad_dtype):
    check_resnet50_sized("triton", particles, grad_dtype)


def check_resnet50_sized(backend: str, particles: int, grad_dtype: torch.dtype) -> None:
    """ResNet-50's parameter list (25.6M entries) stacked over P particles, three steps on ``backend``."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    shapes = [p.shape for p in torchvision.models.resnet50().parameters()]
    params = [torch.randn(particles, *s, device="cuda") for s in shapes]
    masks = [torch.rand(s, device="cuda") < 0.2 if len(s) > 1 else None for s in shapes]
    ours = [p.clone() for p in params]
    ours_buffers, ref_buffers = [None] * len(params), [None] * len(params)
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for _ in range(3):
        grads = [torch.randn_like(p).to(grad_dtype) for p in params]
        sk.masked_sgd_step_(ours, grads, ours_buffers, masks, backend=backend, **options)
        sk.masked_sgd_step_(params, grads, ref_buffers, masks, backend="torch", **options)
    for p, q, b, c in zip(ours, params, ours_buffers, ref_buffers):
        assert_rel_close(p, q)
        assert_rel_close(b, c)
    assert_pruned_zero(ours, masks)
