"""masked_linear / masked_conv2d: outputs and gradients equal the dense op on ``where(mask, w, 0)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import swamp_kernels as sk
from backend_params import every_backend, skip_unless_runs

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4),
             torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _leaf(t: torch.Tensor | None, requires_grad: bool = True):
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def run_with_grads(fn, x, weight, mask, bias, grad_out_seed: int, x_grad: bool = True, **kwargs):
    """Output and (x, weight, bias) gradients of ``fn(x, weight, mask, bias, **kwargs)``."""
    x, weight, bias = _leaf(x, x_grad), _leaf(weight), _leaf(bias)
    out = fn(x, weight, mask, bias, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    out.backward(grad_out)
    return out.detach(), x.grad, weight.grad, None if bias is None else bias.grad


def dense_linear(x, weight, mask, bias):
    return F.linear(x, torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)), bias)


def dense_conv2d(x, weight, mask, bias, **kwargs):
    return F.conv2d(x, torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)), bias, **kwargs)


def assert_matches_dense(got, want, mask):
    names = ("output", "x grad", "weight grad", "bias grad")
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **TOLERANCE[w.dtype], msg=lambda m: f"{name}: {m}")
    assert (got[2][~mask] == 0).all(), "weight gradient is not 0 at masked entries"


def _random(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen).to(dtype).to(device)


# ------------------------------------------------------------------------------ linear
LINEAR_CASES = {  # x shape, weight shape (out, in), bias, dtype, weight layout
    "1d input": ((13,), (7, 13), True, torch.float32, "contiguous"),
    "2d input": ((5, 13), (7, 13), True, torch.float32, "contiguous"),
    "3d input": ((2, 3, 13), (7, 13), False, torch.float32, "contiguous"),
    "1x1": ((4, 1), (1, 1), True, torch.float32, "contiguous"),
    "odd": ((3, 33), (17, 33), False, torch.float32, "contiguous"),
    "transposed weight": ((6, 9), (11, 9), True, torch.float32, "transposed"),
    "bfloat16": ((4, 24), (10, 24), True, torch.bfloat16, "contiguous"),
}


@every_backend
@pytest.mark.parametrize("case", LINEAR_CASES, ids=list(LINEAR_CASES))
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "no_x_grad"])
def test_masked_linear_matches_dense(backend, device, case, x_grad):
    skip_unless_runs("masked_linear", backend, device)
    x_shape, (out_f, in_f), with_bias, dtype, layout = LINEAR_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    x = _random(x_shape, gen, dtype, device)
    weight = _random((in_f, out_f), gen, dtype, device).t() if layout == "transposed" \
        else _random((out_f, in_f), gen, dtype, device)
    mask = (torch.rand(weight.shape, generator=gen) < 0.5).to(device)
    bias = _random((out_f,), gen, dtype, device) if with_bias else None

    got = run_with_grads(lambda *a: sk.masked_linear(*a, backend=backend), x, weight, mask, bias, 1, x_grad)
    want = run_with_grads(dense_linear, x, weight, mask, bias, 1, x_grad)
    assert_matches_dense(got, want, mask)


# ------------------------------------------------------------------------------ conv2d
CONV_CASES = {  # x shape, weight shape, bias, conv kwargs
    "plain": ((2, 3, 9, 7), (5, 3, 3, 3), True, dict()),
    "stride 2 pad 1": ((2, 3, 9, 7), (4, 3, 3, 3), False, dict(stride=2, padding=1)),
    "tuples": ((1, 2, 11, 8), (3, 2, 3, 2), True, dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1))),
    "same": ((2, 3, 8, 9), (4, 3, 3, 5), True, dict(padding="same", dilation=2)),
    "valid": ((2, 3, 8, 9), (4, 3, 2, 2), False, dict(padding="valid")),
    "groups": ((2, 6, 7, 7), (6, 2, 3, 3), True, dict(groups=3, padding=1)),
    "depthwise": ((1, 4, 6, 5), (8, 1, 3, 3), False, dict(groups=4, stride=2)),
    "1x1 one channel": ((3, 5, 4, 4), (1, 5, 1, 1), True, dict()),
    "unbatched": ((3, 6, 6), (2, 3, 3, 3), True, dict(padding=1)),
}


@every_backend
@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_masked_conv2d_matches_dense(backend, device, case, channels_last):
    skip_unless_runs("masked_conv2d", backend, device)
    x_shape, w_shape, with_bias, kwargs = CONV_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    x = _random(x_shape, gen, torch.float32, device)
    weight = _random(w_shape, gen, torch.float32, device)
    mask = (torch.rand(w_shape, generator=gen) < 0.5).to(device)
    bias = _random((w_shape[0],), gen, torch.float32, device) if with_bias else None
    if channels_last:
        weight, mask = (t.contiguous(memory_format=torch.channels_last) for t in (weight, mask))
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)

    got = run_with_grads(lambda *a, **k: sk.masked_conv2d(*a, **k, backend=backend),
                         x, weight, mask, bias, 2, **kwargs)
    want = run_with_grads(dense_conv2d, x, weight, mask, bias, 2, **kwargs)
    assert_matches_dense(got, want, mask)


@every_backend
def test_positional_conv_arguments(backend, device):
    """stride, padding, dilation, groups may be passed positionally, as in F.conv2d."""
    skip_unless_runs("masked_conv2d", backend, device)
    gen = torch.Generator().manual_seed(3)
    x = _random((1, 4, 9, 9), gen, torch.float32, device)
    weight = _random((4, 2, 3, 3), gen, torch.float32, device)
    mask = (torch.rand(weight.shape, generator=gen) < 0.5).to(device)
    got = sk.masked_conv2d(x, weight, mask, None, 2, 1, 2, 2, backend=backend)
    want = dense_conv2d(x, weight, mask, None, stride=2, padding=1, dilation=2, groups=2)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


# ------------------------------------------------------------------------------ errors
def _bool(*shape, device):
    return torch.ones(shape, dtype=torch.bool, device=device)


LAYER_ERRORS = {
    "mask shape": (lambda w, d: dict(mask=_bool(*w.shape[:-1], device=d)), ValueError,
                   r"^mask has shape .*, expected .* like weight$"),
    "mask dtype": (lambda w, d: dict(mask=torch.ones_like(w)), TypeError,
                   r"^mask has dtype torch.float32; expected bool"),
    "mask None": (lambda w, d: dict(mask=None), TypeError, r"^mask is a NoneType, not a tensor"),
    "mask device": (lambda w, d: dict(mask=torch.ones(w.shape, dtype=torch.bool, device="meta")), ValueError,
                    r"^mask is on meta but weight is on"),
    "float64 weight": (lambda w, d: dict(weight=w.double()), TypeError,
                       r"^weight has dtype torch.float64; expected float32, float16 or bfloat16"),
    "int weight": (lambda w, d: dict(weight=w.long()), TypeError, r"^weight has dtype torch.int64"),
    "sparse weight": (lambda w, d: dict(weight=w.to_sparse()), TypeError, r"^weight is a sparse_coo tensor"),
}


@every_backend
@pytest.mark.parametrize("op", ["masked_linear", "masked_conv2d"])
@pytest.mark.parametrize("case", LAYER_ERRORS, ids=list(LAYER_ERRORS))
def test_bad_input_is_named(backend, device, op, case):
    skip_unless_runs(op, backend, device)
    make_change, error, message = LAYER_ERRORS[case]
    shape, x_shape = ((4, 3), (2, 3)) if op == "masked_linear" else ((4, 3, 3, 3), (1, 3, 5, 5))
    weight = torch.randn(shape, device=device)
    kwargs = dict(x=torch.randn(x_shape, device=device), weight=weight, mask=_bool(*shape, device=device))
    kwargs |= make_change(weight, device)
    with pytest.raises(error, match=message):
        getattr(sk, op)(**kwargs, backend=backend)


def _linear_operands(device, x=(3, 4), weight=(5, 4), bias=(5,), x_dtype=torch.float32, bias_dtype=torch.float32):
    weight = torch.ones(weight, device=device)
    return dict(x=torch.ones(x, dtype=x_dtype, device=device), weight=weight, mask=_bool(*weight.shape, device=device),
                bias=None if bias is None else torch.ones(bias, dtype=bias_dtype, device=device))


LINEAR_ERRORS = {   # every backend accepts and refuses the same operands, with the same errors
    "x in_features": (dict(x=(3, 5)), ValueError, r"^x has shape \(3, 5\), expected \[\.\.\., 4\] for weight"),
    "0-d x": (dict(x=()), ValueError, r"^x has shape \(\), expected \[\.\.\., 4\]"),
    "bias size": (dict(bias=(4,)), ValueError, r"^bias has shape \(4,\), expected \(5,\) for weight"),
    "0-d bias": (dict(bias=()), ValueError, r"^bias has shape \(\), expected \(5,\)"),
    "1-D weight": (dict(weight=(4,), bias=None), ValueError, r"^weight must be 2-D \[out_features, in_features\]"),
    "float64 x": (dict(x_dtype=torch.float64), TypeError, r"^x has dtype torch.float64 but weight has torch.float32"),
    "int x": (dict(x_dtype=torch.int64, bias=None), TypeError, r"^x has dtype torch.int64 but weight has"),
    "fp16 bias": (dict(bias_dtype=torch.float16), TypeError, r"^bias has dtype torch.float16 but weight has"),
}
AUTOCAST_ERRORS = {   # autocast casts float operands, not others
    "int x": (dict(x_dtype=torch.int64, bias=None), TypeError, r"^x has dtype torch.int64 but weight has"),
    "float64 bias": (dict(bias_dtype=torch.float64), TypeError, r"^bias has dtype torch.float64 but weight has"),
}


@every_backend
@pytest.mark.parametrize("case", LINEAR_ERRORS, ids=list(LINEAR_ERRORS))
def test_bad_linear_operands_are_named(backend, device, case):
    skip_unless_runs("masked_linear", backend, device)
    change, error, message = LINEAR_ERRORS[case]
    with pytest.raises(error, match=message):
        sk.masked_linear(**_linear_operands(device, **change), backend=backend)
    with pytest.raises(TypeError, match=r"^x is a list, not a tensor"):
        sk.masked_linear(**(_linear_operands(device) | dict(x=[1.0, 2.0])), backend=backend)


@every_backend
@pytest.mark.parametrize("case", AUTOCAST_ERRORS, ids=list(AUTOCAST_ERRORS))
def test_autocast_takes_float_operands_only(backend, device, case):
    skip_unless_runs("masked_linear", backend, device)
    change, error, message = AUTOCAST_ERRORS[case]
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        sk.masked_linear(**_linear_operands(device, x_dtype=torch.float16), backend=backend)   # cast: fine
        with pytest.raises(error, match=message):
            sk.masked_linear(**_linear_operands(device, **change), backend=backend)

