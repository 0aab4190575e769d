"""Checks shared by the kernel tests: closeness to the torch reference, launch counts, layouts,
magnitude-pruning masks."""
import pytest
import torch

import swamp_kernels as sk

# float32 results agree to 1e-6; float16/bfloat16 ones to a few units in the last place, since
# the reference rounds after every op and the kernels compute in float32 registers; float64 (no
# kernel: torch ops on both sides) to rounding.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None) -> None:
    """Same dtype and shape, and ``|actual - expected| <= rtol * (|expected| + max |expected|)``."""
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def raises_binding_error(message: str):
    """``pytest.raises`` for an input error of a compiled op: TypeError for a dtype, else ValueError
    (never RuntimeError, which the public ops would not take for a refusal: csrc/tensor_checks.h)."""
    return pytest.raises(TypeError if "dtype" in message else ValueError, match=message)


class CountingLaunches:
    """Stands in for a Triton kernel (monkeypatch it into its module) and records each launch's
    grid and keyword arguments (the constexprs)."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.kwargs = kernel, [], []

    def __getitem__(self, grid):
        self.grids.append(grid)

        def launch(*args, **kwargs):
            self.kwargs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def laid_out(t: torch.Tensor, layout: str, step: int = 2) -> torch.Tensor:
    """``t`` in a memory layout: contiguous, channels_last, transposed (2-D) or strided (last dim)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.t()
    if layout == "strided":
        return t[..., ::step]
    return t


def cuda_launches(run, kernel_name: str) -> list[str]:
    """Names of the CUDA kernels whose name contains ``kernel_name`` that ``run()`` launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if kernel_name in e.name]


def prune(op: str, backend: str, weights, masks, amount, scores=None) -> list[torch.Tensor]:
    """The masks of the magnitude-pruning op ``op`` (its name in swamp_kernels) on ``backend``."""
    return getattr(sk, op)(weights, masks, amount, scores=scores, backend=backend)


def assert_masks_match(op: str, weights, masks, amount, scores=None, *, backend: str) -> None:
    """``op`` on ``backend`` returns new contiguous bool masks bitwise equal to the reference's."""
    got = prune(op, backend, weights, masks, amount, scores)
    expected = prune(op, "torch", weights, masks, amount, scores)
    assert len(got) == len(weights)
    old = {t.data_ptr() for t in (masks or []) if t.numel()}
    for i, (g, e, w) in enumerate(zip(got, expected, weights)):
        assert (g.dtype, g.shape, g.device) == (torch.bool, w.shape, w.device), f"mask {i}"
        assert g.is_contiguous(), f"mask {i} is not contiguous"
        assert g.numel() == 0 or g.data_ptr() not in old, f"mask {i} is an input mask, not a new tensor"
        assert torch.equal(g, e), (f"{op}(amount={amount!r}): mask {i} ({w.dtype}, {tuple(w.shape)}) differs "
                                   f"at {int((g != e).sum())} of {g.numel()} entries")
