"""The ops and autograd, on every backend: parameters that require grad are updated without
``torch.no_grad`` (as torch.optim steps them), results carry no graph, and every in-place write
bumps the written tensors' version counters, so a graph that saved one of them fails its
backward, as after torch's own in-place ops (the kernels write through raw pointers)."""
import pytest
import torch
from torch import nn

import swamp_kernels as sk
from backend_params import every_backend, skip_unless_runs

SHAPE = (2, 5, 3)   # 2 particles of [5, 3]


def _mask(device):
    return torch.rand(SHAPE[1:], generator=torch.Generator().manual_seed(1)).to(device) < 0.6


def _sgd(tensors, backend):
    grads = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).to(tensors[0].device)]
    buffers = [None]
    sk.masked_sgd_step_(tensors, grads, buffers, [_mask(tensors[0].device)], lr=0.1, momentum=0.9,
                        weight_decay=0.01, backend=backend)
    return buffers


def _swa(tensors, backend):
    params = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).to(tensors[0].device)
    sk.swa_update_([tensors[0][0]], [params], 1, [_mask(tensors[0].device)], backend=backend)


def _apply_masks(tensors, backend):
    sk.apply_masks_(tensors, [_mask(tensors[0].device)], backend=backend)


IN_PLACE = {"masked_sgd_step_": _sgd, "swa_update_": _swa, "apply_masks_": _apply_masks}


def _param(device) -> nn.Parameter:
    return nn.Parameter(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(device))


@every_backend
@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_ops_update_parameters_that_require_grad(backend, device, op):
    skip_unless_runs(op, backend, device)
    param, expected = _param(device), _param(device).detach()
    IN_PLACE[op]([param], backend)
    IN_PLACE[op]([expected], "torch")
    assert param.requires_grad and param.grad_fn is None
    torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)


@every_backend
@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_writes_invalidate_saved_tensors(backend, device, op):
    skip_unless_runs(op, backend, device)
    leaf = torch.randn(SHAPE, device=device, requires_grad=True)
    saved = leaf * 1.0
    loss = (saved * saved).sum()   # saves `saved` for its backward
    before = saved._version
    with torch.no_grad():
        buffers = IN_PLACE[op]([saved], backend)
    assert saved._version > before
    if buffers:
        assert buffers[0]._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@every_backend
def test_particle_average_of_parameters_returns_plain_tensors(backend, device):
    skip_unless_runs("particle_average", backend, device)
    (mean,) = sk.particle_average([_param(device)], [_mask(device)], backend=backend)
    assert not mean.requires_grad and mean.grad_fn is None


def test_a_momentum_buffer_shared_by_two_params_is_refused():
    params = [torch.randn(3, 4), torch.randn(3, 4)]
    buffer = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\] is the memory of momentum_buffers\[0\]"):
        sk.masked_sgd_step_(params, [torch.randn(3, 4)] * 2, [buffer, buffer], None, lr=0.1, momentum=0.9)
