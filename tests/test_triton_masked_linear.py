"""Triton masked_linear against the torch reference: forward, x/weight/bias gradients.

On the CPU the kernels run under TRITON_INTERPRET=1 with 16x16x16 tiles, so the odd sizes
below (1, 7, 17, 33, 65) cover single tiles, ragged edges and several tiles per dimension.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import swamp_kernels as sk
from kernel_checks import assert_rel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances for assert_rel_close (relative, and that fraction of the largest |expected|).
# float32 runs on TF32 tensor cores on a GPU and exactly under the interpreter.
TOL = {torch.float32: 5e-3 if DEVICE == "cuda" else 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def make_inputs(x_shape, n_out, dtype, bias=True, keep=0.5, device=DEVICE):
    k = x_shape[-1]
    x = torch.randn(x_shape, device=device).to(dtype)
    weight = (torch.randn(n_out, k, device=device) / max(k, 1) ** 0.5).to(dtype)
    mask = torch.rand(n_out, k, device=device) < keep
    b = torch.randn(n_out, device=device).to(dtype) if bias else None
    return x, weight, mask, b


def forward_backward(backend, x, weight, mask, bias, grad_out=None):
    """Output and the gradients of (out * grad_out).sum() (of out.sum() when grad_out is None).

    Inputs are detached, not cloned, so their strides reach the op unchanged.
    """
    inputs = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = sk.masked_linear(inputs[0], inputs[1], mask, inputs[2], backend=backend)
    loss = out.sum() if grad_out is None else (out * grad_out).sum()
    grads = iter(torch.autograd.grad(loss, [t for t in inputs if t is not None]))
    return out.detach(), *[next(grads) if t is not None else None for t in inputs]


def assert_like_reference(x, weight, mask, bias, tol, grad_out=None):
    """Triton and torch agree on the output and every gradient; masked weight grads are exactly 0."""
    got = forward_backward("triton", x, weight, mask, bias, grad_out)
    want = forward_backward("torch", x, weight, mask, bias, grad_out)
    for name, a, e in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, want):
        if e is None:
            assert a is None, name
            continue
        assert_rel_close(a, e, tol)
    grad_weight = got[2]
    assert torch.equal(grad_weight[~mask], torch.zeros_like(grad_weight[~mask]))
    return got


SHAPES = [((33,), 7),           # 1-D input
          ((1, 7), 65),
          ((65, 33), 17),
          ((7, 65), 1),
          ((2, 3, 17), 33),     # 3-D
          ((2, 1, 3, 33), 7)]   # 4-D


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape,n_out", SHAPES)
def test_matches_reference(x_shape, n_out, bias, dtype):
    torch.manual_seed(hash((x_shape, n_out)) % 2**31)
    x, weight, mask, b = make_inputs(x_shape, n_out, dtype, bias)
    grad_out = torch.randn(*x_shape[:-1], n_out, device=DEVICE).to(dtype)
    out = assert_like_reference(x, weight, mask, b, TOL[dtype], grad_out)[0]
    assert out.shape == (*x_shape[:-1], n_out)


def test_non_contiguous_inputs_and_broadcast_grad(seed):
    """Transposed/strided x, transposed weight and mask, strided and stride-0 bias; out.sum()
    gives a stride-0 grad_out."""
    k, n = 33, 17
    weight = torch.randn(k, n, device=DEVICE).t()
    mask = (torch.rand(k, n, device=DEVICE) < 0.5).t()
    biases = (torch.randn(n, device=DEVICE), torch.randn(2 * n, device=DEVICE)[::2],
              torch.randn(1, device=DEVICE).expand(n))
    for x in (torch.randn(k, 9, device=DEVICE).t(),                     # 2-D transposed
              torch.randn(3, 5, 2 * k, device=DEVICE)[..., ::2],         # K stride 2, viewable
              torch.randn(k, 5, 3, device=DEVICE).permute(2, 1, 0)):     # needs a copy
        assert not x.is_contiguous()
        for bias in biases:
            assert_like_reference(x, weight, mask, bias, TOL[torch.float32])


@pytest.mark.parametrize("bias", [True, False])
def test_all_masked_gives_bias_and_zero_grads(bias, seed):
    x, weight, _, b = make_inputs((5, 2, 33), 17, torch.float32, bias)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    out, grad_x, grad_weight, _ = assert_like_reference(x, weight, mask, b, TOL[torch.float32])
    assert torch.equal(out, b.expand_as(out) if bias else torch.zeros_like(out))
    assert torch.equal(grad_x, torch.zeros_like(grad_x))
    assert torch.equal(grad_weight, torch.zeros_like(grad_weight))


def test_all_kept_is_dense_linear(seed):
    x, weight, _, b = make_inputs((3, 19, 33), 17, torch.float32)
    mask = torch.ones_like(weight, dtype=torch.bool)
    out = forward_backward("triton", x, weight, mask, b)[0]
    assert_rel_close(out, F.linear(x, weight, b), TOL[torch.float32])
    assert_like_reference(x, weight, mask, b, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_at_masked_weights_do_not_leak(dtype, seed):
    x, weight, mask, b = make_inputs((21, 33), 19, dtype)
    poison = torch.tensor([float("nan"), float("inf"), float("-inf")], device=DEVICE, dtype=dtype)
    weight[~mask] = poison[torch.arange(int((~mask).sum()), device=DEVICE) % 3]
    out, grad_x, grad_weight, _ = forward_backward("triton", x, weight, mask, b)
    assert torch.isfinite(out).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_weight).all()
    clean = weight.masked_fill(~mask, 0)
    assert_rel_close(out, F.linear(x, clean, b), TOL[dtype])
    assert_like_reference(x, weight, mask, b, TOL[dtype])


def test_gradients_only_for_inputs_that_require_them(seed):
    x, weight, mask, b = make_inputs((7, 33), 17, torch.float32)
    x.requires_grad_()
    out = sk.masked_linear(x, weight, mask, b, backend="triton")
    out.sum().backward()
    expected = torch.ones(7, 17, device=DEVICE) @ weight.masked_fill(~mask, 0)
    assert_rel_close(x.grad, expected, TOL[torch.float32])
    assert weight.grad is None and b.grad is None


def test_autocast_casts_like_f_linear(seed):
    """Under autocast (CPU in CI) bf16 the op runs in bf16 like F.linear; float32 leaves get float32 grads."""
    x, weight, mask, b = make_inputs((4, 9, 33), 17, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got = forward_backward("triton", x, weight, mask, b)
        want = forward_backward("torch", x, weight, mask, b)
        dense = F.linear(x, weight.masked_fill(~mask, 0), b)
    assert got[0].dtype == dense.dtype == torch.bfloat16
    assert got[1].dtype == got[2].dtype == got[3].dtype == torch.float32
    for a, e in zip(got, want):
        assert_rel_close(a, e, TOL[torch.bfloat16])
    assert torch.equal(got[2][~mask], torch.zeros_like(got[2][~mask]))


@pytest.mark.parametrize("x_shape,w_shape", [((0, 7), (5, 7)), ((3, 0), (5, 0)), ((2, 0, 4), (0, 4))])
def test_empty_dimensions(x_shape, w_shape, seed):
    x = torch.randn(x_shape, device=DEVICE)
    weight = torch.randn(w_shape, device=DEVICE)
    mask = torch.rand(w_shape, device=DEVICE) < 0.5
    bias = torch.randn(w_shape[0], device=DEVICE)
    assert_like_reference(x, weight, mask, bias, TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_4096_linear_on_8192_tokens(dtype):
    torch.manual_seed(0)
    x, weight, mask, b = make_inputs((8, 1024, 4096), 4096, dtype, device="cuda")
    grad_out = torch.randn(8, 1024, 4096, device="cuda").to(dtype)
    assert_like_reference(x, weight, mask, b, TOL[dtype], grad_out)


def test_output_takes_in_place_ops_as_f_linear_does():
    """``nn.ReLU(inplace=True)`` after the layer: the output is no view of the Function's."""
    x, weight, mask, b = make_inputs((3, 5, 17), 7, torch.float32)
    grads = []
    for backend in ("triton", "torch"):
        inputs = [t.detach().requires_grad_() for t in (x, weight, b)]
        out = sk.masked_linear(inputs[0], inputs[1], mask, inputs[2], backend=backend)
        out.relu_().sum().backward()
        grads.append([t.grad for t in inputs])
    for a, e in zip(*grads):
        assert_rel_close(a, e, TOL[torch.float32])


def test_double_backward_raises_rather_than_dropping_terms():
    x, weight, mask, b = make_inputs((4, 9), 5, torch.float32)
    x, weight = x.requires_grad_(), weight.requires_grad_()
    out = sk.masked_linear(x, weight, mask, b, backend="triton")
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.square().sum().backward()


@pytest.mark.parametrize("dtype,precision,expected", [
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages) kept of the GPU configs
    (torch.bfloat16, "ieee", "all"),
    (torch.float16, "ieee", "all"),
    (torch.float32, "tf32", [(128, 128, 32, 4), (64, 128, 32, 4), (64, 64, 32, 4), (32, 64, 64, 4)]),
    (torch.float32, "ieee", [(64, 128, 32, 4), (64, 64, 32, 4), (32, 64, 64, 4)]),
])
def test_autotuner_times_only_configs_that_fit_an_h100(dtype, precision, expected):
    """The GPU configs kept for timing: A and B pipeline stages within 227 KiB of shared memory;
    no output tile above 64x128 for IEEE float32. The masked A tile restricts nothing (it feeds
    the tensor cores from registers: tests/test_triton_aot.py)."""
    ml = importlib.import_module("swamp_kernels.triton.masked_linear")

    def tiles(configs):
        return [(*(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c.num_stages) for c in configs]

    kept = ml._worth_timing(ml._GPU_CONFIGS, {"a_ptr": torch.empty(0, dtype=dtype)},
                            MASK_A=True, MASK_C=False, PRECISION=precision)
    assert tiles(kept) == (tiles(ml._GPU_CONFIGS) if expected == "all" else expected)
