"""Every op of the CUDA backend (swamp_kernels._C) runs on the current stream of its tensors'
device: behind work queued earlier on a side stream, and on a device that is not the current
one (a DDP rank calling with another device's tensors). Every test needs a GPU.
"""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from kernel_checks import assert_rel_close
from test_cuda_extension import extension  # noqa: F401  (fixture)

pytestmark = pytest.mark.gpu

SHAPES = [((4, 64, 3, 3, 3), torch.float32), ((4, 1000), torch.bfloat16), ((4, 17), torch.float32)]
PRUNE_SIZES = [(70_000, torch.float32), (333, torch.float16)]


def case(device) -> dict:
    """Fresh inputs of every op: stacked particle params with row masks, grads, SWA averages,
    and weights to prune (independent of the float results, which backends match to rounding)."""
    gen = torch.Generator().manual_seed(0)
    return {"params": [torch.randn(s, generator=gen).to(device, d) for s, d in SHAPES],
            "masks": [(torch.rand(s[1:], generator=gen) < 0.6).to(device) for s, _ in SHAPES],
            "grads": [torch.randn(s, generator=gen).to(device, d) for s, d in SHAPES],
            "swa": [torch.randn(s[1:], generator=gen).to(device, d) for s, d in SHAPES],
            "weights": [torch.randn(n, generator=gen).to(device, d) for n, d in PRUNE_SIZES]}


def run_all_ops(inputs: dict, backend: str) -> dict:
    """Each op once on ``inputs`` (in place where the op is in place); returns every result."""
    params, masks = inputs["params"], inputs["masks"]
    sk.apply_masks_(params, masks, backend=backend)
    averages = sk.particle_average(params, masks, backend=backend)
    sk.swa_update_(inputs["swa"], params, 2, masks, backend=backend)
    buffers = [None] * len(params)
    sk.masked_sgd_step_(params, inputs["grads"], buffers, masks, lr=0.1, momentum=0.9, weight_decay=1e-2,
                        backend=backend)
    pruned = sk.global_magnitude_prune(inputs["weights"], None, 0.5, backend=backend)
    layerwise = sk.layerwise_magnitude_prune(inputs["weights"], None, 0.3, backend=backend)
    return {"params": params, "averages": averages, "swa": inputs["swa"], "buffers": buffers,
            "pruned": pruned, "layerwise": layerwise}


def assert_same_results(got: dict, expected: dict, device) -> None:
    for name in ("params", "averages", "swa", "buffers"):
        for i, (g, e) in enumerate(zip(got[name], expected[name])):
            assert g.device == torch.device(device), f"{name}[{i}] is on {g.device}"
            assert_rel_close(g, e)
    for name in ("pruned", "layerwise"):
        for i, (g, e) in enumerate(zip(got[name], expected[name])):
            assert g.device == torch.device(device), f"{name}[{i}] is on {g.device}"
            assert torch.equal(g, e), f"{name}[{i}] differs"


def test_ops_run_on_the_current_stream(extension):
    """Inputs written on a side stream only after a long sleep: an op launched on any other
    stream would read them before they land."""
    expected = run_all_ops(case("cuda"), "torch")
    stale = case("cuda")
    fresh = {name: [t.clone() for t in ts] for name, ts in stale.items()}
    for ts in stale.values():
        for t in ts:
            t.zero_()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of GPU time on this stream
        for name, ts in stale.items():
            for t, f in zip(ts, fresh[name]):
                t.copy_(f)
        got = run_all_ops(stale, "cuda")
    torch.cuda.synchronize()
    assert_same_results(got, expected, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_ops_on_a_device_that_is_not_current(extension):
    assert torch.cuda.current_device() == 0
    expected = run_all_ops(case("cuda:1"), "torch")
    got = run_all_ops(case("cuda:1"), "cuda")
    torch.cuda.synchronize("cuda:1")
    assert torch.cuda.current_device() == 0
    assert_same_results(got, expected, "cuda:1")
