"""The per-step ops (``masked_sgd_step_``, ``swa_update_``, ``apply_masks_``) of the Triton and
CUDA backends replay correctly from a captured CUDA graph (``torch.cuda.graph``, or
``torch.compile(mode="reduce-overhead")`` around a training step). Every test needs a GPU.

Both backends copy their multi-tensor tables to the device from pinned host memory, and a
captured copy reads its host bytes again at every replay: those bytes must never be reused by a
later call. torch's host allocator keeps blocks used during a capture out of reuse (torch >=
2.11); decoy calls with tables of the same size between replays would catch a reused block (the
replay would then update the decoys' tensors instead).
"""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import assert_rel_close

pytestmark = pytest.mark.gpu

# Enough tensors that every table is uploaded (not passed as kernel arguments), and lengths
# that are not multiples of 16 (the unaligned launch of the Triton backend).
SHAPES = [(64, 3, 3, 3), (1000,), (17, 5), (256, 64), (3,)] * 30
P = 2
SGD = {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3, "nesterov": False}


def step_inputs(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    def rand(shape):
        return torch.randn(shape, generator=gen).cuda()
    return {"params": [rand((P, *s)) for s in SHAPES],
            "grads": [rand((P, *s)).bfloat16() for s in SHAPES],   # AMP: bf16 grads, fp32 params
            "masks": [(torch.rand(s, generator=gen) < 0.5).cuda() for s in SHAPES],
            "swa": [rand(s) for s in SHAPES],
            "buffers": [None] * len(SHAPES)}


def training_step(inputs: dict, backend: str) -> None:
    """The ops of one SWAMP step: masked SGD on the particles, SWA fold, mask re-application."""
    sk.masked_sgd_step_(inputs["params"], inputs["grads"], inputs["buffers"], inputs["masks"], **SGD,
                        backend=backend)
    sk.swa_update_(inputs["swa"], inputs["params"], 3, inputs["masks"], backend=backend)
    sk.apply_masks_(inputs["params"], inputs["masks"], backend=backend)


def new_grads(inputs: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for g in inputs["grads"]:
        g.copy_(torch.randn(g.shape, generator=gen))


def assert_same_state(got: dict, expected: dict) -> None:
    for name in ("params", "swa", "buffers"):
        for g, e in zip(got[name], expected[name]):
            assert_rel_close(g, e)


def snapshot(inputs: dict) -> dict:
    return {name: [t.clone() for t in inputs[name]] for name in ("params", "swa", "buffers")}


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_step_ops_replay_from_a_cuda_graph(backend):
    skip_unless_runs("masked_sgd_step_", backend, torch.device("cuda"))
    captured, expected, decoy = step_inputs(0), step_inputs(0), step_inputs(1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up (kernel compiles, first-step buffers) off the capture stream
        training_step(captured, backend)
        training_step(decoy, backend)
    torch.cuda.current_stream().wait_stream(side)
    training_step(expected, "torch")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        training_step(captured, backend)
    for step in range(3):
        new_grads(captured, step)
        new_grads(expected, step)
        training_step(decoy, backend)   # reuses any host staging block the capture gave back
        decoy_state = snapshot(decoy)
        graph.replay()
        training_step(expected, "torch")
        torch.cuda.synchronize()
        assert_same_state(captured, expected)
        assert_same_state(decoy, decoy_state)   # the replay wrote only the captured tensors
