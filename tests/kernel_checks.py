"""Checks shared by the kernel tests: closeness to the torch reference, launch counts, layouts."""
import torch

# float32 results agree to 1e-6; float16/bfloat16 ones to a few units in the last place, since
# the reference rounds after every op and the kernels compute in float32 registers.
RTOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float | None = None) -> None:
    """Same dtype and shape, and ``|actual - expected| <= rtol * (|expected| + max |expected|)``."""
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


class CountingLaunches:
    """Stands in for a Triton kernel (monkeypatch it into its module) and records each launch grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def laid_out(t: torch.Tensor, layout: str, step: int = 2) -> torch.Tensor:
    """``t`` in a memory layout: contiguous, channels_last, transposed (2-D) or strided (last dim)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return t.t()
    if layout == "strided":
        return t[..., ::step]
    return t
