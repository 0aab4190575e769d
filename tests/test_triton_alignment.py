"""The Triton elementwise kernels (particle averages, masked SGD, apply_masks_) launch a 16-byte
vectorised variant for the tensors whose operands all start on 16-byte boundaries and whose
lengths are multiples of 16, and the plain one for the others; both give the torch result."""
from __future__ import annotations

import torch

import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import CountingLaunches, assert_rel_close


def mixed(device, particles: int = 1) -> list[torch.Tensor]:
    """Aligned (64 entries), short (13) and misaligned (64 entries one float past a boundary)."""
    gen = torch.Generator().manual_seed(0)
    shifted = torch.randn(particles, 65, generator=gen).to(device)[:, 1:]
    return [torch.randn(particles, 64, generator=gen).to(device), torch.randn(particles, 13, generator=gen).to(device),
            shifted.contiguous() if particles > 1 else shifted]


def test_alignment_rule():
    from swamp_kernels.triton.multi_tensor import vector_aligned
    base = torch.zeros(80)
    assert vector_aligned([base[:64], None], 64) and not vector_aligned([base[:13]], 13)
    assert not vector_aligned([base[1:65]], 64) and vector_aligned([base[4:68]], 64)


def _launches(monkeypatch, module_name: str, kernel_name: str, run) -> list[bool]:
    import importlib
    module = importlib.import_module(f"swamp_kernels.triton.{module_name}")
    counter = CountingLaunches(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, counter)
    run()
    return sorted(k["ALIGNED"] for k in counter.kwargs)


def test_particle_average_in_both_variants(device, monkeypatch):
    skip_unless_runs("particle_average", "triton", device)
    params = mixed(device, particles=3)
    masks = [torch.rand(p.shape[1:], generator=torch.Generator().manual_seed(1)).to(device) < 0.5 for p in params]
    ours = []
    assert _launches(monkeypatch, "particles", "_average_kernel",
                     lambda: ours.extend(sk.particle_average(params, masks, backend="triton"))) == [False, True]
    for x, y in zip(ours, sk.particle_average(params, masks, backend="torch")):
        assert_rel_close(x, y)


def test_masked_sgd_in_both_variants(device, monkeypatch):
    skip_unless_runs("masked_sgd_step_", "triton", device)
    params = [p[0] for p in mixed(device)]
    grads = [torch.randn_like(p) for p in params]
    masks = [torch.rand(p.shape, generator=torch.Generator().manual_seed(2)).to(device) < 0.5 for p in params]
    expected = [p.clone() for p in params]
    expected_buffers = [None] * 3
    sk.masked_sgd_step_(expected, grads, expected_buffers, masks, lr=0.1, momentum=0.9, weight_decay=0.01,
                        backend="torch")
    buffers = [None] * 3
    assert _launches(monkeypatch, "masked_sgd", "_masked_sgd_kernel", lambda: sk.masked_sgd_step_(
        params, grads, buffers, masks, lr=0.1, momentum=0.9, weight_decay=0.01, backend="triton")) == [False, True]
    for x, y in zip(params + buffers, expected + expected_buffers):
        assert_rel_close(x, y)


def test_apply_masks_in_both_variants(device, monkeypatch):
    skip_unless_runs("apply_masks_", "triton", device)
    tensors = mixed(device, particles=2)
    masks = [torch.rand(t.shape[1:], generator=torch.Generator().manual_seed(3)).to(device) < 0.5 for t in tensors]
    expected = [torch.where(m, t, 0) for t, m in zip(tensors, masks)]
    assert _launches(monkeypatch, "apply_masks", "_apply_masks_kernel",
                     lambda: sk.apply_masks_(tensors, masks, backend="triton")) == [False, True]
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))
