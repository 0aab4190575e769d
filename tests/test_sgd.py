"""masked_sgd_step_ against torch.optim.SGD run on masked gradients, step after step.

The oracle: ``torch.optim.SGD`` (single-tensor path) with ``param.grad = grad * mask``,
then ``param *= mask`` after each step. Params and momentum buffers are compared.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import swamp_kernels as sk
from kernel_checks import laid_out
from backend_params import every_backend, skip_unless_runs

OP = "masked_sgd_step_"
STEPS = 3


def tolerance(want: torch.Tensor) -> dict:
    """float32: 1e-6. Half: a few ulps of the largest entry, as the oracle rounds every
    intermediate to half precision and a fused kernel need not."""
    if want.dtype == torch.float32:
        return dict(rtol=1e-6, atol=1e-6)
    eps = torch.finfo(want.dtype).eps
    return dict(rtol=2 * eps, atol=4 * eps * float(want.abs().max()))


def _hyper_combinations():
    for momentum, dampening, nesterov, weight_decay, maximize in itertools.product(
            (0.0, 0.9), (0.0, 0.25), (False, True), (0.0, 0.01), (False, True)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                   weight_decay=weight_decay, maximize=maximize)


HYPER = list(_hyper_combinations())


def _id(hyper) -> str:
    return "-".join(f"{k}={v}" for k, v in hyper.items() if v) or "plain"


# (param shape, dtype, layout, mask: "full" | "particle" | None); "particle" masks drop dim 0.
MIXED = [((2, 5, 4), torch.float32, "contiguous", "particle"),
         ((7, 13), torch.float32, "contiguous", "full"),
         ((4, 3, 3, 3), torch.float32, "channels_last", "full"),
         ((10, 6), torch.float32, "transposed", "full"),
         ((1,), torch.float32, "contiguous", "full"),
         ((9,), torch.float32, "contiguous", None),
         ((4100,), torch.float32, "contiguous", "full")]


def make_problem(specs, seed: int, device, grad_dtype=None):
    """Params (random everywhere, also where masked), masks and a list of grads per step."""
    gen = torch.Generator().manual_seed(seed)
    params, masks = [], []
    for shape, dtype, layout, mask_kind in specs:
        p = laid_out(torch.randn(shape, generator=gen).to(dtype).to(device), layout)
        params.append(p)
        mask_shape = p.shape[1:] if mask_kind == "particle" else p.shape
        masks.append(None if mask_kind is None else (torch.rand(mask_shape, generator=gen) < 0.6).to(device))
    grads = [[torch.randn(p.shape, generator=gen).to(grad_dtype or p.dtype).to(device) for p in params]
             for _ in range(STEPS)]
    return params, masks, grads


def oracle_steps(params, masks, grads_per_step, lr, hyper):
    """Yield (params, momentum buffers) of torch.optim.SGD on masked grads after each step."""
    leaves = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(leaves, lr=lr, foreach=False, **hyper)
    masks = masks or [None] * len(params)
    for grads in grads_per_step:
        for leaf, g, m in zip(leaves, grads, masks):
            g = g.to(leaf.dtype)
            leaf.grad = g if m is None else g * m
        opt.step()
        with torch.no_grad():
            for leaf, m in zip(leaves, masks):
                if m is not None:
                    leaf.mul_(m)
        yield [leaf.detach() for leaf in leaves], [opt.state[leaf].get("momentum_buffer") for leaf in leaves]


def check_against_sgd(params, masks, grads_per_step, backend, lr=0.1, **hyper):
    buffers = [None] * len(params)
    oracle = oracle_steps(params, masks, grads_per_step, lr, hyper)
    for step, (grads, (want_params, want_buffers)) in enumerate(zip(grads_per_step, oracle)):
        sk.masked_sgd_step_(params, grads, buffers, masks, lr=lr, backend=backend, **hyper)
        for i, (p, want) in enumerate(zip(params, want_params)):
            torch.testing.assert_close(p, want, **tolerance(want),
                                       msg=lambda m: f"step {step}, params[{i}]: {m}")
            if masks is not None and masks[i] is not None:
                assert (p[..., ~masks[i]] == 0).all(), f"step {step}, params[{i}] not 0 where masked"
        for i, (b, want) in enumerate(zip(buffers, want_buffers)):
            if want is None:
                assert b is None, f"step {step}: momentum_buffers[{i}] set without momentum"
                continue
            assert b.dtype == params[i].dtype and b.shape == params[i].shape, i
            torch.testing.assert_close(b, want, **tolerance(want),
                                       msg=lambda m: f"step {step}, buffer {i}: {m}")


@every_backend
@pytest.mark.parametrize("hyper", HYPER, ids=[_id(h) for h in HYPER])
def test_matches_sgd_on_masked_grads(backend, device, hyper):
    skip_unless_runs(OP, backend, device)
    params, masks, grads = make_problem(MIXED, seed=len(_id(hyper)), device=device)
    check_against_sgd(params, masks, grads, backend, **hyper)


@every_backend
@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_stacked_particles_share_one_mask(backend, device, P):
    skip_unless_runs(OP, backend, device)
    specs = [((P, 6, 5), torch.float32, "contiguous", "particle"),
             ((P, 3, 3, 3, 2), torch.float32, "contiguous", "particle"),
             ((P, 1), torch.float32, "contiguous", "particle")]
    params, masks, grads = make_problem(specs, seed=30 + P, device=device)
    check_against_sgd(params, masks, grads, backend, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)


@every_backend
@pytest.mark.parametrize("masks", ["none", "all entries None"])
def test_unmasked_is_plain_sgd(backend, device, masks):
    skip_unless_runs(OP, backend, device)
    params, _, grads = make_problem(MIXED, seed=40, device=device)
    masks = None if masks == "none" else [None] * len(params)
    check_against_sgd(params, masks, grads, backend, momentum=0.9, dampening=0.1, weight_decay=0.01)


@every_backend
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hyper", [dict(), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
                                   dict(momentum=0.5, dampening=0.5, maximize=True)], ids=_id)
def test_low_precision_grads_for_float32_params(backend, device, grad_dtype, hyper):
    """AMP: float32 params and buffers, float16/bfloat16 grads."""
    skip_unless_runs(OP, backend, device)
    params, masks, grads = make_problem(MIXED, seed=50, device=device, grad_dtype=grad_dtype)
    check_against_sgd(params, masks, grads, backend, **hyper)


@every_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_params(backend, device, dtype):
    skip_unless_runs(OP, backend, device)
    specs = [(shape, dtype if i % 2 else torch.float32, layout, mask)
             for i, (shape, _, layout, mask) in enumerate(MIXED)]
    params, masks, grads = make_problem(specs, seed=60, device=device)
    check_against_sgd(params, masks, grads, backend, momentum=0.9, weight_decay=0.01)


# ------------------------------------------------------------------------------ errors
def _args(device, **change):
    params = [torch.randn(4, device=device), torch.randn(2, 3, device=device)]
    args = dict(params=params, grads=[torch.randn_like(p) for p in params], momentum_buffers=[None, None],
                masks=[torch.ones(4, dtype=torch.bool, device=device), None], lr=0.1)
    return args | change


_SHARED = {}


def _shared(device):
    """One tensor per device, the same object at every call."""
    return _SHARED.setdefault(str(device), torch.randn(4, device=device))


def _half(device):
    return [torch.randn(4, dtype=torch.bfloat16, device=device)]


BAD_INPUTS = {
    "empty": (lambda d: _args(d, params=[], grads=[], momentum_buffers=[], masks=None),
              ValueError, r"params is empty"),
    "int params": (lambda d: _args(d, params=[torch.ones(4, dtype=torch.int64, device=d),
                                              torch.ones(2, 3, device=d)]),
                   TypeError, r"params\[0\] has dtype torch.int64"),
    "grads count": (lambda d: _args(d, grads=[torch.randn(4, device=d)]), ValueError,
                    r"grads has 1 tensors but params has 2"),
    "grads shape": (lambda d: _args(d, grads=[torch.randn(4, device=d), torch.randn(3, 2, device=d)]),
                    ValueError, r"grads\[1\] has shape \(3, 2\), expected \(2, 3\) like params\[1\]"),
    "grads int": (lambda d: _args(d, grads=[torch.randn(4, device=d),
                                            torch.ones(2, 3, dtype=torch.int32, device=d)]),
                  TypeError, r"grads\[1\] has dtype torch.int32"),
    "grads device": (lambda d: _args(d, grads=[torch.randn(4, device="meta"), torch.randn(2, 3, device=d)]),
                     ValueError, r"grads\[0\] is on meta"),
    "grads dtype mix": (lambda d: _args(d, params=_half(d), grads=[torch.randn(4, device=d)],
                                        momentum_buffers=[None], masks=None),
                        TypeError, r"grads\[0\] has dtype torch.float32 but params\[0\] has torch.bfloat16; "
                                   r"mixed dtypes need float32 params"),
    "sparse grad": (lambda d: _args(d, grads=[torch.randn(4, device=d).to_sparse(), torch.randn(2, 3, device=d)]),
                    TypeError, r"grads\[0\] is a sparse_coo tensor; the ops take dense \(strided\) tensors"),
    "buffers tuple": (lambda d: _args(d, momentum_buffers=(None, None)), ValueError,
                      r"momentum_buffers must be a list with one entry \(tensor or None\) per param"),
    "buffers length": (lambda d: _args(d, momentum_buffers=[None]), ValueError,
                       r"momentum_buffers must be a list with one entry"),
    "buffer shape": (lambda d: _args(d, momentum_buffers=[None, torch.zeros(6, device=d)]), ValueError,
                     r"momentum_buffers\[1\] has shape \(6,\), expected \(2, 3\) like params\[1\]"),
    "buffer dtype": (lambda d: _args(d, momentum_buffers=[torch.zeros(4, dtype=torch.float16, device=d),
                                                         None]),
                     TypeError, r"momentum_buffers\[0\] has dtype torch.float16, expected torch.float32 "
                                r"like params\[0\]"),
    "buffer not a tensor": (lambda d: _args(d, momentum_buffers=[0.0, None]), TypeError,
                            r"momentum_buffers\[0\] is a float, not a tensor"),
    "mask shape": (lambda d: _args(d, masks=[None, torch.ones(2, dtype=torch.bool, device=d)]), ValueError,
                   r"masks\[1\] has shape \(2,\), expected \(2, 3\) or \(3,\) like params\[1\]"),
    "mask dtype": (lambda d: _args(d, masks=[torch.ones(4, device=d), None]), TypeError,
                   r"masks\[0\] has dtype torch.float32; expected bool"),
    "mask count": (lambda d: _args(d, masks=[None]), ValueError, r"masks has 1 tensors but params has 2"),
    "nesterov without momentum": (lambda d: _args(d, nesterov=True), ValueError,
                                  r"nesterov momentum requires momentum > 0 and dampening == 0"),
    "nesterov with dampening": (lambda d: _args(d, nesterov=True, momentum=0.9, dampening=0.1), ValueError,
                                r"nesterov momentum requires momentum > 0 and dampening == 0"),
    "negative lr": (lambda d: _args(d, lr=-0.1), ValueError, r"lr must be a finite number >= 0.0, got -0.1"),
    "NaN lr": (lambda d: _args(d, lr=float("nan")), ValueError, r"lr must be a finite number"),
    "bool lr": (lambda d: _args(d, lr=True), ValueError, r"lr must be a finite number >= 0.0, got True"),
    "negative momentum": (lambda d: _args(d, momentum=-0.9), ValueError, r"momentum must be a finite number"),
    "infinite weight decay": (lambda d: _args(d, weight_decay=float("inf")), ValueError,
                              r"weight_decay must be a finite number"),
    "infinite dampening": (lambda d: _args(d, dampening=float("-inf")), ValueError,
                           r"dampening must be a finite number, got -inf"),
    "lr past float32": (lambda d: _args(d, lr=1e39), ValueError, r"lr = 1e\+39 is beyond float32's range"),
    "dampening past float32": (lambda d: _args(d, dampening=-1e39), ValueError,
                               r"dampening = -1e\+39 is beyond float32's range"),
    "param twice": (lambda d: _args(d, params=[_shared(d), _shared(d)], masks=None,
                                    grads=[torch.ones(4, device=d)] * 2), ValueError,
                    r"params\[1\] is the memory of params\[0\] \(a shared weight listed twice\?\)"),
    "buffer overlaps a param": (lambda d: (lambda flat: _args(d, params=[flat[:4], flat[6:].view(2, 3)],
                                                              momentum_buffers=[flat[2:6], None], momentum=0.9)
                                           )(torch.randn(12, device=d)), ValueError,
                                r"momentum_buffers\[0\] overlaps the memory of params\[0\] \(views of one buffer\?\)"),
    "expanded param": (lambda d: _args(d, params=[torch.randn(4, device=d), torch.randn(1, 3, device=d).expand(2, 3)],
                                       momentum=0.9), ValueError,
                       r"params\[1\] has entries that share memory \(an expanded or as_strided view"),
    "expanded buffer": (lambda d: _args(d, momentum_buffers=[None, torch.zeros(1, device=d).expand(2, 3)],
                                        momentum=0.9), ValueError, r"momentum_buffers\[1\] has entries that share"),
}


@every_backend
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_named(backend, device, case):
    skip_unless_runs(OP, backend, device)
    make_kwargs, error, message = BAD_INPUTS[case]
    kwargs = make_kwargs(device)
    before = [p.clone() for p in kwargs["params"]]
    with pytest.raises(error, match=message):
        sk.masked_sgd_step_(**kwargs, backend=backend)
    assert all(torch.equal(p, b) for p, b in zip(kwargs["params"], before)), "params changed before the error"


def test_a_failed_step_leaves_no_new_buffer_behind(monkeypatch):
    """A step that raises after its backend allocated first-step buffers (e.g. a failed kernel
    launch) hands none of them back: unwritten memory must not become a momentum state."""
    params = [torch.randn(5), torch.randn(3)]
    kept = torch.zeros(3)
    buffers = [None, kept]

    def allocate_then_fail(params, grads, momentum_buffers, masks, **hyper):
        momentum_buffers[0] = torch.empty_like(params[0])
        raise RuntimeError("launch failed")
    monkeypatch.setattr(sk, "implementation", lambda op, backend, device: allocate_then_fail)
    with pytest.raises(RuntimeError, match="launch failed"):
        sk.masked_sgd_step_(params, [torch.ones_like(p) for p in params], buffers, None, lr=0.1, momentum=0.9)
    assert buffers[0] is None and buffers[1] is kept
