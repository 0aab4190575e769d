"""The CUDA backend's entries for unvalidated lists (``swamp_kernels.cuda.UNCHECKED_OPS``).

The public in-place ops hand their caller's lists straight to the compiled op, whose C++ checks
cost nanoseconds per tensor, and run the Python checks and the general path only when it
refuses them (bad input: the same errors as every backend; non-contiguous operands). Without a
GPU the compiled ops run on the CPU through the host build (tests/cuda_emulation).
"""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from kernel_checks import assert_rel_close
from swamp_kernels import _validate

CHECKS = ("tensor_list", "float_tensors", "companions", "bool_masks", "particle_params", "distinct")


def forbid_python_checks(monkeypatch) -> None:
    """Fail the test if a Python list check runs: what succeeds after this ran unchecked."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the Python list checks ran")
    for name in CHECKS:
        monkeypatch.setattr(_validate, name, forbidden)


def sgd_inputs(gen: torch.Generator, device, particles: int = 3):
    """Stacked particles: a masked [P, 4, 5] float32 param with bfloat16 grads (mask per particle
    row), an unmasked [P, 7] one, a masked [P, 6] one with a full-shape mask."""
    params = [torch.randn(particles, 4, 5, generator=gen), torch.randn(particles, 7, generator=gen),
              torch.randn(particles, 6, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[0] = grads[0].bfloat16()
    masks = [torch.rand(4, 5, generator=gen) > 0.5, None, torch.rand(particles, 6, generator=gen) > 0.5]
    move = [t.to(device) if t is not None else None for t in (*params, *grads, *masks)]
    return move[:3], move[3:6], move[6:]


def sgd_steps(backend, params, grads, masks, buffers, steps, **hyper):
    """``steps`` steps on ``params`` and ``buffers`` in place."""
    for _ in range(steps):
        sk.masked_sgd_step_(params, grads, buffers, masks, lr=0.1, backend=backend, **hyper)


HYPER = [dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, nesterov=True, maximize=True), dict()]


@pytest.mark.parametrize("hyper", HYPER, ids=["momentum", "nesterov", "plain"])
def test_steps_after_the_first_skip_the_python_checks(cuda_device, monkeypatch, hyper):
    """The first momentum step (None buffers) takes the checked path, which allocates the
    buffers; every later step, and every step without momentum, skips the Python checks."""
    params, grads, masks = sgd_inputs(torch.Generator().manual_seed(0), cuda_device)
    runs = {}
    for backend in ("torch", "cuda"):
        ps, buffers = [p.clone() for p in params], [None] * len(params)
        sgd_steps(backend, ps, grads, masks, buffers, 1, **hyper)
        with monkeypatch.context() as patch:
            if backend == "cuda":
                forbid_python_checks(patch)
            sgd_steps(backend, ps, grads, masks, buffers, 2, **hyper)
        runs[backend] = ps + buffers
    for a, e in zip(runs["cuda"], runs["torch"]):
        assert (a is None) == (e is None)
        if e is not None:
            assert_rel_close(a, e)


def test_a_first_momentum_step_is_checked_first(cuda_device, monkeypatch):
    """Bad input never allocates buffers (nor fails for want of memory to): the first momentum
    step goes through the Python checks before anything is allocated."""
    params, grads, masks = sgd_inputs(torch.Generator().manual_seed(2), cuda_device)
    allocated = []
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: allocated.append(a) or pytest.fail("allocated"))
    masks[2] = masks[2].float()
    with pytest.raises(TypeError, match=r"masks\[2\] has dtype torch.float32; expected bool"):
        sk.masked_sgd_step_(params, grads, [None] * 3, masks, lr=0.1, momentum=0.9, backend="cuda")
    assert not allocated


def test_swa_update_and_apply_masks_skip_the_python_checks(cuda_device, monkeypatch):
    params, _, masks = sgd_inputs(torch.Generator().manual_seed(1), cuda_device)
    row_masks = [masks[0], None, None]
    want = [torch.zeros(p.shape[1:], device=cuda_device) for p in params]
    for n in (0, 1):
        sk.swa_update_(want, params, n, row_masks, backend="torch")
    masked = [p.clone() for p in params]
    sk.apply_masks_([masked[0], masked[2]], [masks[0], masks[2]], backend="torch")

    forbid_python_checks(monkeypatch)
    got = [torch.zeros(p.shape[1:], device=cuda_device) for p in params]
    for n in (0, 1):
        sk.swa_update_(got, params, n, row_masks, backend="cuda")
    for a, e in zip(got, want):
        assert_rel_close(a, e)
    tensors = [params[0].clone(), params[2].clone()]
    sk.apply_masks_(tensors, [masks[0], masks[2]], backend="cuda")
    assert torch.equal(tensors[0], masked[0]) and torch.equal(tensors[1], masked[2])


def test_a_refused_step_takes_the_general_path(cuda_device):
    """A non-contiguous grad makes the compiled op refuse the lists; the general path (stand-in
    copies) then steps them."""
    params, grads, masks = sgd_inputs(torch.Generator().manual_seed(3), cuda_device)
    grads[1] = grads[1].t().contiguous().t()   # [P, 7] with transposed strides
    assert not grads[1].is_contiguous()
    runs = {}
    for backend in ("torch", "cuda"):
        ps, buffers = [p.clone() for p in params], [torch.ones_like(p) for p in params]
        sgd_steps(backend, ps, grads, masks, buffers, 2, momentum=0.9)
        runs[backend] = ps + buffers
    for a, e in zip(runs["cuda"], runs["torch"]):
        assert_rel_close(a, e)


def test_a_shared_param_is_refused_before_anything_runs(cuda_device):
    """The compiled op's own check of memory shared between written tensors (the Python check
    then names it): a race on the GPU otherwise."""
    shared = torch.ones(4, device=cuda_device)
    params, grads = [shared, shared], [torch.ones(4, device=cuda_device)] * 2
    with pytest.raises(ValueError, match=r"params\[1\] is the memory of params\[0\]"):
        sk.masked_sgd_step_(params, grads, [None, None], None, lr=0.1, backend="cuda")
    assert torch.equal(shared, torch.ones(4, device=cuda_device))


@pytest.mark.parametrize("op", [sk.global_magnitude_prune, sk.layerwise_magnitude_prune])
def test_prune_skips_the_python_checks(cuda_device, monkeypatch, op):
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(6, 5, generator=gen).to(cuda_device), torch.randn(40, generator=gen).to(cuda_device).half()]
    masks = [torch.rand(6, 5, generator=gen).to(cuda_device) > 0.3, torch.ones(40, dtype=torch.bool, device=cuda_device)]
    want = [op(weights, m, 0.4, backend="torch") for m in (masks, None)]
    forbid_python_checks(monkeypatch)
    for m, expected in zip((masks, None), want):
        got = op(weights, m, 0.4, backend="cuda")
        assert all(torch.equal(a, e) for a, e in zip(got, expected))


def test_a_channels_last_model_goes_straight_to_the_general_path(cuda_device, monkeypatch):
    """A non-contiguous first param (channels_last weights) skips the compiled op's refusal,
    which would convert every list first."""
    from swamp_kernels import cuda as cuda_backend
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(4, 3, 3, 3, generator=gen).to(cuda_device).to(memory_format=torch.channels_last),
              torch.randn(4, generator=gen).to(cuda_device)]
    grads = [torch.randn(p.shape, generator=gen).to(cuda_device).to(memory_format=torch.channels_last)
             if p.dim() == 4 else torch.randn(p.shape, generator=gen).to(cuda_device) for p in params]
    want = [p.clone() for p in params]
    sk.masked_sgd_step_(want, grads, [None, None], None, lr=0.1, backend="torch")
    monkeypatch.setitem(cuda_backend.UNCHECKED_OPS, "masked_sgd_step_",
                        lambda *a, **k: pytest.fail("the compiled op was offered a channels_last model"))
    sk.masked_sgd_step_(params, grads, [None, None], None, lr=0.1, backend="cuda")
    for a, e in zip(params, want):
        assert_rel_close(a, e)


@pytest.mark.parametrize("position", [0, 1])
def test_a_sparse_tensor_is_refused_with_the_checks_error(cuda_device, position):
    """A sparse tensor (no storage to read) anywhere in the lists is refused (torch's dispatcher
    has no sparse kernel of the compiled op) and gets the error of every backend."""
    params, grads, masks = sgd_inputs(torch.Generator().manual_seed(6), cuda_device)
    buffers = [torch.zeros_like(p) for p in params]
    grads[position] = grads[position].float().to_sparse()
    with pytest.raises(TypeError, match=rf"grads\[{position}\] is a sparse_coo tensor; the ops take dense"):
        sk.masked_sgd_step_(params, grads, buffers, masks, lr=0.1, momentum=0.9, backend="cuda")
    tensors = [p.clone() for p in params]
    tensors[position] = tensors[position].to_sparse()
    with pytest.raises(TypeError, match=rf"tensors\[{position}\] is a sparse_coo tensor; the ops take dense"):
        sk.apply_masks_(tensors, masks, backend="cuda")
