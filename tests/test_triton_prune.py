"""Triton global/layerwise magnitude pruning: masks bitwise equal to the torch reference.

Small inputs take every path of the radix select when the launch constants are shrunk
(``small_kernels``): several chunks and steps per tensor, ties ranked across chunks, passes
over the tensors and over the compact buffer (every bucket fits, narrow ones, none) and early
exits; the ``test_paths_*`` tests trace the modes the picks choose to pin each path down.
Under ``TRITON_INTERPRET=1`` these run on the CPU; tests marked ``gpu`` run full sizes.
"""
from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch

import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import assert_masks_match, prune

OPS = ("global_magnitude_prune", "layerwise_magnitude_prune")
CHUNK = 128                        # elements per program in the small tests
BLOCK = 64                         # elements per step (two steps per chunk)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Compact-buffer capacity of a segment of n elements, min(n, max(n // divisor, minimum)):
CAPACITIES = {"all": (1, 0),           # every bucket fits: gathered in pass 1
              "small": (64, 8),        # a narrow bucket fits (pass 1 or 2), ties often never
              "none": (2**62, 0)}      # never gathered: ranked over the tensors
BUDGETS = tuple(CAPACITIES)


def budgets(*values):
    return pytest.mark.parametrize("small_kernels", values, indirect=True, ids=lambda b: f"budget-{b}")


@pytest.fixture
def small_kernels(request, monkeypatch, device):
    """The device, with small chunks and steps, a compact-buffer capacity (default "small") and
    the wide digits (the default from Triton 3.7 on; ``test_narrow_digits`` runs the others)."""
    skip_unless_runs("global_magnitude_prune", "triton", device)
    from swamp_kernels.triton import magnitude_prune
    divisor, minimum = CAPACITIES[getattr(request, "param", "small")]
    monkeypatch.setattr(magnitude_prune, "DIGITS", magnitude_prune.WIDE_DIGITS)
    monkeypatch.setattr(magnitude_prune, "CHUNK", CHUNK)
    monkeypatch.setattr(magnitude_prune, "BLOCK", BLOCK)
    monkeypatch.setattr(magnitude_prune, "BUFFER_STEPS", 2)
    monkeypatch.setattr(magnitude_prune, "BUFFER_DIVISOR", divisor)
    monkeypatch.setattr(magnitude_prune, "BUFFER_MIN", minimum)
    return device


assert_matches = functools.partial(assert_masks_match, backend="triton")


def random_masks(weights, keep: float):
    return [torch.rand(w.shape, device=w.device) < keep for w in weights]


def amounts(op, weights, masks, floats=(0.0, 0.3, 1.0)):
    """``floats``, then int amounts 0, n // 3 and n (n: the fewest candidates of a tensor if layerwise)."""
    counts = [int(m.sum()) if masks is not None else w.numel()
              for w, m in zip(weights, masks or [None] * len(weights))]
    n = min(counts) if op == "layerwise_magnitude_prune" else sum(counts)
    return [*floats, 0, n // 3, n]


def mixed_weights(device):
    """A mixed-dtype list: multi-chunk, odd and 1-element tensors."""
    return [torch.randn(37, 11, device=device),
            torch.randn(5, 3, 3, 3, device=device).half(),
            torch.randn(300, device=device).bfloat16(),
            torch.randn(1, device=device)]


# ------------------------------------------------------------------ random inputs
@budgets(*BUDGETS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_random_mixed_dtypes(op, masked, small_kernels, seed):
    weights = mixed_weights(small_kernels)
    masks = random_masks(weights, 0.7) if masked else None
    for amount in amounts(op, weights, masks):
        assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_alone(op, dtype, small_kernels, seed):
    weights = [torch.randn(3 * CHUNK + 5, device=small_kernels).to(dtype),
               torch.randn(7, 9, device=small_kernels).to(dtype)]
    for amount in (0.3, 50):
        assert_matches(op, weights, None, amount)


# ------------------------------------------------------------------- ties, sizes
def quantised(shape, dtype, device):
    """Magnitudes on a coarse grid (few distinct keys), with +0.0 and -0.0 entries."""
    return (torch.randint(-3, 4, shape, device=device) * 0.25).to(dtype)


@budgets("all", "small")  # ties keep big buckets: "small" mostly never gathers
@pytest.mark.parametrize("op", OPS)
def test_heavy_ties(op, small_kernels, seed):
    weights = [quantised((2 * CHUNK + 3,), torch.float32, small_kernels),
               quantised((9, 31), torch.bfloat16, small_kernels),
               torch.full((CHUNK + 1,), -0.5, device=small_kernels).half(),
               quantised((5,), torch.float16, small_kernels)]
    for masks in (None, random_masks(weights, 0.8)):
        for amount in amounts(op, weights, masks, floats=(0.1, 0.5)):
            assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
def test_all_equal(op, small_kernels):
    weights = [torch.full((3 * CHUNK + 1,), 2.0, device=small_kernels),
               torch.full((4, 5), -2.0, device=small_kernels).bfloat16()]
    for amount in (0.0, 0.25, 0.5, 1.0, 3, 20):
        assert_matches(op, weights, None, amount)


@pytest.mark.parametrize("op", OPS)
def test_tiny_odd_and_empty_sizes(op, small_kernels, seed):
    device = small_kernels
    assert_matches(op, [torch.randn(1, device=device)], None, 0.5)
    assert_matches(op, [torch.randn((), device=device)], None, 1)
    assert_matches(op, [torch.randn(0, device=device)], None, 0.3)
    sizes = (CHUNK - 1, CHUNK, CHUNK + 1, 1, 0, 2 * CHUNK + 1)
    weights = [torch.randn(n, device=device) for n in sizes]
    for amount in (0.0, 0.4, 1.0, 0):
        assert_matches(op, weights, None, amount)


# --------------------------------------------------------------------- masks
@pytest.mark.parametrize("op", OPS)
def test_already_pruned(op, small_kernels, seed):
    device = small_kernels
    weights = mixed_weights(device) + [torch.randn(50, device=device)]
    masks = random_masks(weights, 0.15)
    masks[2] = torch.zeros_like(masks[2])   # a fully pruned tensor
    masks[4] = torch.ones_like(masks[4])    # an unpruned one
    weights[0][~masks[0]] = float("nan")    # non-finite values at pruned entries are fine
    weights[1][~masks[1]] = float("inf")
    for amount in (0.0, 0.2, 0.5, 1.0, 0):
        assert_matches(op, weights, masks, amount)
    if op == "global_magnitude_prune":
        assert_matches(op, weights, masks, int(sum(m.sum() for m in masks)) // 2)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_layouts(op, small_kernels, seed):
    device = small_kernels
    conv = torch.randn(8, 6, 3, 3, device=device).to(memory_format=torch.channels_last)
    linear_t = torch.randn(20, 17, device=device).half().t()
    strided = torch.randn(30, 12, device=device).bfloat16()[:, ::3]
    weights = [conv, linear_t, strided]
    masks = [m.t().contiguous().t() if m.dim() == 2 else m for m in random_masks(weights, 0.6)]
    scores = [torch.randn(w.shape, device=device).t().contiguous().t() if w.dim() == 2 else
              torch.randn(w.shape, device=device).to(memory_format=torch.channels_last)
              for w in weights]
    for amount in (0.3, 0.6):
        assert_matches(op, weights, masks, amount)
        assert_matches(op, weights, masks, amount, scores)


# -------------------------------------------------------------------- scores
def signed_scores(weights, dtypes):
    """Scores with negatives, exact +0.0 and -0.0 (equal keys) and repeated values."""
    out = []
    for w, dtype in zip(weights, dtypes):
        s = torch.randn(w.shape, device=w.device)
        s.view(-1)[::5] = 0.0
        s.view(-1)[2::5] = -0.0
        s.view(-1)[3::7] = -1.5
        out.append(s.to(dtype))
    return out


@pytest.mark.parametrize("op", OPS)
def test_scores(op, small_kernels, seed):
    weights = mixed_weights(small_kernels)
    scores = signed_scores(weights, (torch.float16, torch.float32, torch.float32, torch.bfloat16))
    for masks in (None, random_masks(weights, 0.7)):
        for amount in amounts(op, weights, masks):
            assert_matches(op, weights, masks, amount, scores)


def test_scores_ignore_weights(small_kernels, seed):
    """Non-finite weights do not matter when scores decide."""
    weights = [torch.full((40,), float("nan"), device=small_kernels)]
    scores = [torch.randn(40, device=small_kernels)]
    assert_matches("global_magnitude_prune", weights, None, 0.5, scores)


def test_signed_zero_scores_tie_by_index(small_kernels):
    scores = [torch.tensor([-0.0, 0.0, -0.0, 1.0, -1.0, 0.0], device=small_kernels)]
    weights = [torch.zeros(6, device=small_kernels)]
    for amount in range(7):
        assert_matches("global_magnitude_prune", weights, None, amount, scores)


# -------------------------------------------------------------------- errors
def reference_error(op, *args) -> str:
    with pytest.raises(ValueError) as error:
        prune(op, "torch", *args)
    return str(error.value)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_candidate_raises(op, bad, small_kernels, seed):
    weights = mixed_weights(small_kernels)
    weights[2][17] = bad
    message = reference_error(op, weights, None, 0.2)
    assert "weights[2]" in message
    with pytest.raises(ValueError, match=re.escape(message)):
        prune(op, "triton", weights, None, 0.2)
    scores = [torch.randn(w.shape, device=w.device) for w in weights]
    scores[1].view(-1)[3] = bad
    message = reference_error(op, weights, None, 0.2, scores)
    assert "scores[1]" in message
    with pytest.raises(ValueError, match=re.escape(message)):
        prune(op, "triton", weights, None, 0.2, scores)


@pytest.mark.parametrize("op", OPS)
def test_int_amount_above_candidates_raises(op, small_kernels, seed):
    weights = mixed_weights(small_kernels)
    masks = random_masks(weights, 0.5)
    masks[3][0] = True
    too_many = int(masks[1].sum()) + 1 if op == "layerwise_magnitude_prune" else \
        int(sum(m.sum() for m in masks)) + 1
    message = reference_error(op, weights, masks, too_many)
    with pytest.raises(ValueError, match=re.escape(message)):
        prune(op, "triton", weights, masks, too_many)


# -------------------------------------------------------------------- paths
class ModeTrace:
    """Stands in for ``_pick_kernel`` and records every segment's mode after each pick."""

    def __init__(self, module):
        self.module, self.kernel, self.picks = module, module._pick_kernel, []

    def __getitem__(self, grid):
        def launch(state, hist, cap, amount, segments, **kwargs):
            self.kernel[grid](state, hist, cap, amount, segments, **kwargs)
            row = self.module._MODE.value * segments
            self.picks.append(state[row:row + segments].tolist())
        return launch

    def paths(self) -> list[tuple[str, ...]]:
        """Per segment, the names of its modes after each pick."""
        names = {getattr(self.module, n).value: n[1:].lower()
                 for n in ("_SCAN", "_GATHER", "_WRITE", "_COMPACT", "_COMPACT_DONE", "_FINISHED")}
        return [tuple(names[m] for m in modes) for modes in zip(*self.picks)]


def traced_paths(monkeypatch, op, weights, amount, scores=None):
    """Check ``op`` against the reference and return each segment's modes after each pick."""
    from swamp_kernels.triton import magnitude_prune
    trace = ModeTrace(magnitude_prune)
    monkeypatch.setattr(magnitude_prune, "_pick_kernel", trace)
    assert_matches(op, weights, None, amount, scores)
    return trace.paths()


def narrow_band(n, device, dtype=torch.float32):
    """Magnitudes in [1, 1.06): one bucket of the first (12-bit) digit, distinct float32 keys."""
    return (1 + 0.06 * torch.rand(n, device=device)).to(dtype) * torch.where(
        torch.rand(n, device=device) < 0.5, -1.0, 1.0)


def spaced(n, ulps, device):
    """Shuffled magnitudes 1 + i * ulps float32 ulps with random signs: for ``ulps`` 4 or 64,
    128 or 8 keys per bucket of the second (10-bit) digit."""
    magnitudes = 1 + torch.randperm(n, device=device) * (ulps * 2.0**-23)
    return magnitudes * torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)


def with_ties(n, ties, device):
    """Normal weights with ``ties`` entries of magnitude 0.5 spread over every chunk; also
    returns the int amount that keeps 7 of those ties (the rest of the tie bucket is pruned)."""
    w = torch.randn(n, device=device)
    w[torch.randperm(n, device=device)[:ties]] = torch.tensor([-0.5, 0.5], device=device).repeat(ties)[:ties]
    above = int((w.abs() > 0.5).sum())
    return w, n - above - 7


@budgets("all")
def test_paths_when_every_bucket_fits(small_kernels, monkeypatch, seed):
    """Gathered in pass 1; then decided in the buffer, or ties ranked across chunks from it;
    amounts 0 and all exit before gathering."""
    op = "global_magnitude_prune"
    weights = [torch.randn(700, device=small_kernels)]
    assert traced_paths(monkeypatch, op, weights, 0.3) == [("gather", "compact_done", "compact_done")]
    tied, amount = with_ties(900, 60, small_kernels)
    assert traced_paths(monkeypatch, op, [tied], amount) == [("gather", "compact", "compact")]
    wide = [spaced(600, 4, small_kernels)]
    assert traced_paths(monkeypatch, op, wide, 0.5) == [("gather", "compact", "compact_done")]
    for amount in (0, 1.0):
        assert traced_paths(monkeypatch, op, weights, amount) == [("write", "finished", "finished")]


@budgets("small")
def test_paths_when_narrow_buckets_fit(small_kernels, monkeypatch, seed):
    """Gathered in pass 2; ties that never fit are ranked over the tensors; decided in pass 2
    before gathering; layerwise segments of uneven sizes take different paths in one call."""
    op = "global_magnitude_prune"
    band = [spaced(1000, 64, small_kernels)]  # the 403rd smallest key is inside a bucket of 8
    assert traced_paths(monkeypatch, op, band, 403) == [("scan", "gather", "compact_done")]
    tied, amount = with_ties(900, 60, small_kernels)
    assert traced_paths(monkeypatch, op, [tied], amount) == [("scan", "scan", "scan")]
    assert traced_paths(monkeypatch, op, [spaced(1000, 4, small_kernels)], 0.5) == \
        [("scan", "scan", "write")]
    weights = [band[0], torch.randn(300, device=small_kernels),
               torch.randn(37, device=small_kernels), tied]
    paths = traced_paths(monkeypatch, "layerwise_magnitude_prune", weights, 0.403)
    assert paths[0] == ("scan", "gather", "compact_done")
    assert paths[1][0] == "gather"
    assert paths[3][:2] == ("scan", "scan")


@budgets("none")
def test_paths_when_nothing_fits(small_kernels, monkeypatch, seed):
    """Never gathered: decided in pass 1 (written by pass 2) or ranked over the tensors."""
    op = "global_magnitude_prune"
    assert traced_paths(monkeypatch, op, [narrow_band(1000, small_kernels)], 0.4) == \
        [("scan", "write", "finished")]
    band = [spaced(1000, 64, small_kernels)]
    assert traced_paths(monkeypatch, op, band, 403) == [("scan", "scan", "write")]
    tied, amount = with_ties(900, 60, small_kernels)
    assert traced_paths(monkeypatch, op, [tied], amount) == [("scan", "scan", "scan")]


@pytest.mark.parametrize("op", OPS)
def test_narrow_digits(op, small_kernels, monkeypatch, seed):
    """The 8-bit digit plan (Triton before 3.7): four passes, the buffer reached in pass 1 or 2."""
    from swamp_kernels.triton import magnitude_prune
    monkeypatch.setattr(magnitude_prune, "DIGITS", magnitude_prune.NARROW_DIGITS)
    weights = mixed_weights(small_kernels) + [narrow_band(400, small_kernels, torch.bfloat16)]
    tied, amount = with_ties(500, 40, small_kernels)
    for amount_ in amounts(op, weights, None, floats=(0.3, 1.0)):
        assert_matches(op, weights, None, amount_)
    assert_matches("global_magnitude_prune", [tied], None, amount)
    scores = signed_scores(weights, (torch.float32,) * len(weights))
    assert_matches(op, weights, random_masks(weights, 0.7), 0.4, scores)


# --------------------------------------------------------------------- models
def resnet50_conv_fc_shapes(channel_divisor: int = 1) -> list[tuple[int, ...]]:
    """torchvision ResNet-50's conv and fc weight shapes, channels divided by ``channel_divisor``."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [(max(1, s[0] // channel_divisor), max(1, s[1] // channel_divisor), *s[2:])
            for s in (tuple(p.shape) for p in model.parameters()) if len(s) > 1]


@pytest.mark.parametrize("op", OPS)
def test_resnet50_scaled_down(op, device, seed):
    """Default launch constants on ResNet-50's 54 conv/fc shapes with channels / 16, float32
    and bfloat16 alternating; global after an earlier 80% prune, layerwise dense."""
    skip_unless_runs(op, "triton", device)
    weights = [torch.randn(s, device=device).to((torch.float32, torch.bfloat16)[i % 2])
               for i, s in enumerate(resnet50_conv_fc_shapes(16))]
    masks = prune(op, "torch", weights, None, 0.8) if op == "global_magnitude_prune" else None
    assert_matches(op, weights, masks, 0.2)


# ------------------------------------------------------------------------ GPU
def cuda_weights(shapes, dtype):
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pruned", [0.0, 0.8])
def test_resnet50_full_size_gpu(op, dtype, pruned, seed):
    weights = cuda_weights(resnet50_conv_fc_shapes(), dtype)
    masks = prune(op, "torch", weights, None, pruned) if pruned else None
    for amount in (0.2, 0.5):
        assert_matches(op, weights, masks, amount)
    scores = sk.random_scores(weights, seed=1)
    assert_matches(op, weights, masks, 0.2, scores)


@pytest.mark.gpu
def test_1e8_elements_gpu(seed):
    """A mixed list of 10^8 elements, 1 to 8.9e7 per tensor, masks from an earlier prune."""
    shapes = [(1,), (7,), (4096,), (1000, 1000), (10_000_000,), (88_995_896,)]
    assert sum(math.prod(s) for s in shapes) == 10**8
    weights = cuda_weights(shapes, torch.float32)
    assert_matches("global_magnitude_prune", weights, None, 0.2)
    masks = prune("global_magnitude_prune", "torch", weights, None, 0.2)
    assert_matches("global_magnitude_prune", weights, masks, 0.2)
    assert_matches("layerwise_magnitude_prune", weights, masks, 0.2)


@pytest.mark.gpu
def test_heavy_ties_full_chunks_gpu(seed):
    """Ties spread over many default-size chunks: the tie ranks' scan over chunks."""
    weights = [quantised((3_000_001,), torch.float32, "cuda"), quantised((1000, 777), torch.bfloat16, "cuda")]
    for amount in (0.3, 0.5, 1_234_567):
        assert_matches("global_magnitude_prune", weights, None, amount)


@pytest.mark.gpu
def test_one_host_sync_gpu(seed):
    weights = cuda_weights(resnet50_conv_fc_shapes(4), torch.float32)
    sk.global_magnitude_prune(weights, None, 0.2, backend="triton")  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sk.global_magnitude_prune(weights, None, 0.2, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
