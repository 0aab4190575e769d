"""CUDA backend (swamp_kernels._C) of global/layerwise magnitude pruning: masks bitwise equal
to the torch reference on full-size, adversarial and real-model inputs, one device sync per
call, and clean under compute-sanitizer memcheck.

Sizes are chosen around the kernels' constants (csrc/magnitude_prune.cu): 16384-element
chunks, a 2^21-key compact buffer (buckets above it are never compacted, so ties are
counted over the tensors instead of the buffer) and 63 table entries inline in the kernel
arguments (more go through device memory). Every test here needs a GPU.
"""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

import swamp_kernels as sk
from benchmarks.shapes import MIXED_1E8, resnet50_conv_fc
from kernel_checks import assert_masks_match, prune
from test_cuda_extension import extension, run_under_memcheck  # noqa: F401  (extension: fixture)

pytestmark = pytest.mark.gpu

OPS = ("global_magnitude_prune", "layerwise_magnitude_prune")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 16384                  # kChunk
COMPACT = 1 << 21              # kCompactCapacity
INLINE = 63                    # PruneEntry rows that fit in the kernel arguments
SIZES = (1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 100_003, 3 * CHUNK + 5)


assert_matches = functools.partial(assert_masks_match, backend="cuda")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def normal(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def quantised(shape, dtype, gen, levels: int = 4) -> torch.Tensor:
    """Few distinct magnitudes, with +0.0 and -0.0 entries."""
    return (torch.randint(-levels, levels + 1, shape, generator=gen, device="cuda") * 0.25).to(dtype)


def random_masks(weights, keep: float, gen) -> list[torch.Tensor]:
    return [torch.rand(w.shape, generator=gen, device="cuda") < keep for w in weights]


def amounts(op, weights, masks, floats=(0.0, 0.2, 0.5, 0.77, 1.0)) -> list:
    """``floats``, then int amounts 0, n // 3 and n (n: the fewest candidates of a tensor if layerwise)."""
    counts = [int(m.sum()) if masks is not None else w.numel()
              for w, m in zip(weights, masks or [None] * len(weights))]
    n = min(counts) if op == "layerwise_magnitude_prune" else sum(counts)
    return [*floats, 0, n // 3, n]


def mixed_weights(gen, sizes=SIZES) -> list[torch.Tensor]:
    return [normal((n,), DTYPES[i % 3], gen) for i, n in enumerate(sizes)]


# ------------------------------------------------------------------ random inputs
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_random_mixed_dtypes(extension, op, masked):
    gen = generator(1)
    weights = mixed_weights(gen)
    masks = random_masks(weights, 0.7, gen) if masked else None
    for amount in amounts(op, weights, masks):
        assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_alone(extension, op, dtype):
    gen = generator(2)
    weights = [normal((3 * CHUNK + 5,), dtype, gen), normal((7, 9), dtype, gen), normal((1_000_001,), dtype, gen)]
    for amount in (0.3, 50, 0.999):
        assert_matches(op, weights, None, amount)


@pytest.mark.parametrize("op", OPS)
def test_more_tensors_than_fit_inline(extension, op):
    gen = generator(3)
    sizes = torch.randint(1, 3000, (2 * INLINE + 7,), generator=torch.Generator().manual_seed(3)).tolist()
    weights = mixed_weights(gen, sizes)
    masks = random_masks(weights, 0.6, gen)
    for amount in (0.2, 0.5, 0):
        assert_matches(op, weights, masks, amount)


# ------------------------------------------------------------------- ties, sizes
@pytest.mark.parametrize("op", OPS)
def test_heavy_ties(extension, op):
    gen = generator(4)
    weights = [quantised((2 * CHUNK + 3,), torch.float32, gen), quantised((9, 31), torch.bfloat16, gen),
               torch.full((CHUNK + 1,), -0.5, device="cuda").half(), quantised((5,), torch.float16, gen),
               quantised((1_000_003,), torch.bfloat16, gen, levels=64)]
    for masks in (None, random_masks(weights, 0.8, gen)):
        for amount in amounts(op, weights, masks, floats=(0.1, 0.5, 0.9)):
            assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
def test_ties_in_buckets_too_big_to_compact(extension, op):
    # More equal keys than the compact buffer holds: every pass reads the tensors and the
    # ties are counted per chunk over the tensors.
    gen = generator(5)
    weights = [quantised((COMPACT + 3 * CHUNK + 1,), torch.float32, gen, levels=2),
               torch.full((COMPACT + 7,), 0.25, device="cuda").bfloat16()]
    for amount in (0.3, 0.61, COMPACT // 2 + 1):
        assert_matches(op, weights, None, amount)


@pytest.mark.parametrize("op", OPS)
def test_all_equal(extension, op):
    weights = [torch.full((3 * CHUNK + 1,), 2.0, device="cuda"), torch.full((4, 5), -2.0, device="cuda").bfloat16(),
               torch.full((2 * COMPACT,), 1.5, device="cuda").half()]
    for amount in (0.0, 0.25, 0.5, 1.0, 3, 20):
        assert_matches(op, weights, None, amount)


@pytest.mark.parametrize("op", OPS)
def test_tiny_odd_and_empty_sizes(extension, op):
    gen = generator(6)
    for amount in (0.0, 0.5, 1.0, 0, 1):
        assert_matches(op, [normal((1,), torch.float32, gen)], None, amount)
        assert_matches(op, [normal((), torch.bfloat16, gen)], None, amount)
    assert_matches(op, [torch.randn(0, device="cuda")], None, 0.3)
    weights = [normal((n,), DTYPES[n % 3], gen) for n in (CHUNK - 1, CHUNK, CHUNK + 1, 1, 0, 2 * CHUNK + 1)]
    for amount in (0.0, 0.4, 1.0, 0):
        assert_matches(op, weights, None, amount)


# --------------------------------------------------------------------- masks
@pytest.mark.parametrize("op", OPS)
def test_already_pruned(extension, op):
    gen = generator(7)
    weights = mixed_weights(gen)
    masks = random_masks(weights, 0.2, gen)
    masks[1] = torch.zeros_like(masks[1])  # a tensor with no candidate
    weights = [w * m for w, m in zip(weights, masks)]  # pruned entries hold zeros, as after IMP
    for amount in amounts(op, weights, masks, floats=(0.0, 0.2, 0.5, 1.0)):
        assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_layouts(extension, op):
    gen = generator(8)
    weights = [normal((64, 3, 7, 7), torch.float32, gen).contiguous(memory_format=torch.channels_last),
               normal((300, 200), torch.bfloat16, gen).t(), normal((50, 40), torch.float16, gen)[:, ::3]]
    masks = [m.contiguous(memory_format=torch.channels_last) if i == 0 else m
             for i, m in enumerate(random_masks(weights, 0.7, gen))]
    for amount in (0.2, 0.9, 100):
        assert_matches(op, weights, masks, amount)


# --------------------------------------------------------------------- scores
@pytest.mark.parametrize("op", OPS)
def test_scores_with_negatives_and_signed_zeros(extension, op):
    gen = generator(9)
    weights = mixed_weights(gen)
    scores = [quantised(w.shape, DTYPES[(i + 1) % 3], gen) if i % 2 else normal(w.shape, DTYPES[(i + 2) % 3], gen)
              for i, w in enumerate(weights)]
    masks = random_masks(weights, 0.75, gen)
    for m in (None, masks):
        for amount in amounts(op, weights, m, floats=(0.0, 0.3, 0.5, 1.0)):
            assert_matches(op, weights, m, amount, scores)


def test_signed_zero_scores_tie_by_index(extension):
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0, 1.0], device="cuda")
    weights = [torch.ones(6, device="cuda"), torch.ones(6, device="cuda").half()]
    for amount in range(13):
        assert_matches("global_magnitude_prune", weights, None, amount, [zeros, zeros.bfloat16()])


def test_random_scores_prune_randomly(extension):
    gen = generator(10)
    weights = mixed_weights(gen)
    scores = [s.to("cuda") for s in sk.random_scores(weights, seed=0)]
    assert_matches("global_magnitude_prune", weights, None, 0.5, scores)


# --------------------------------------------------------------------- errors
def _error(op, backend, weights, masks, amount, scores=None) -> str:
    with pytest.raises(ValueError) as info:
        prune(op, backend, weights, masks, amount, scores)
    return str(info.value)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_candidates_raise_like_the_reference(extension, op, bad, dtype):
    weights = [torch.randn(100, device="cuda").to(dtype) for _ in range(4)]
    weights[2][37] = bad
    message = _error(op, "cuda", weights, None, 0.2)
    assert message == _error(op, "torch", weights, None, 0.2)
    assert "weights[2]" in message
    scores = [w.float() for w in weights]
    assert "scores[2]" in _error(op, "cuda", [torch.ones(100, device="cuda")] * 4, None, 0.2, scores)


@pytest.mark.parametrize("op", OPS)
def test_nonfinite_outside_the_candidates_is_ignored(extension, op):
    weights = [torch.randn(3 * CHUNK, device="cuda"), torch.randn(50, device="cuda").half()]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    weights[0][CHUNK + 5], masks[0][CHUNK + 5] = float("nan"), False
    weights[1][7], masks[1][7] = float("-inf"), False
    assert_matches(op, weights, masks, 0.4)


@pytest.mark.parametrize("op", OPS)
def test_int_amount_above_n_raises_like_the_reference(extension, op):
    weights = [torch.randn(30, device="cuda"), torch.randn(20, device="cuda").bfloat16()]
    masks = [torch.arange(30, device="cuda") % 2 == 0, torch.ones(20, dtype=torch.bool, device="cuda")]
    amount = 16 if op == "layerwise_magnitude_prune" else 36
    message = _error(op, "cuda", weights, masks, amount)
    assert message == _error(op, "torch", weights, masks, amount)
    assert "exceeds" in message


BINDING_ERRORS = {
    "non-contiguous": (lambda k, m: ([k, k.view(4, 4).t()], [m, m.view(4, 4)]), r"keys\[1\] must be contiguous"),
    "dtype": (lambda k, m: ([k.double()], [m]), r"keys\[0\] has dtype Double"),
    "mask dtype": (lambda k, m: ([k], [m.float()]), r"masks\[0\] has dtype Float; expected bool"),
    "mask shape": (lambda k, m: ([k], [m[:8]]), r"masks\[0\] has shape \[8\]"),
    "count": (lambda k, m: ([k, k], [m]), r"2 keys but 1 masks"),
}


@pytest.mark.parametrize("case", BINDING_ERRORS, ids=list(BINDING_ERRORS))
def test_compiled_op_checks_its_input(extension, case):
    make_args, message = BINDING_ERRORS[case]
    keys, masks = make_args(torch.ones(16, device="cuda"), torch.ones(16, dtype=torch.bool, device="cuda"))
    with pytest.raises(RuntimeError, match=f"global_magnitude_prune: {message}"):
        torch.ops.swamp_kernels.global_magnitude_prune(keys, masks, 0.5, False, False)


# -------------------------------------------------------------- real model, large
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pruned", [0.0, 0.8])
@pytest.mark.parametrize("op", OPS)
def test_resnet50_conv_fc_weights(extension, op, dtype, pruned):
    gen = generator(11)
    weights = [(torch.randn(s, generator=gen, device="cuda") * math.sqrt(2.0 / math.prod(s[1:]))).to(dtype)
               for s in resnet50_conv_fc()]
    masks = None
    if pruned:
        masks = sk.global_magnitude_prune(weights, None, pruned, backend="torch")
        weights = [w * m for w, m in zip(weights, masks)]
    for amount in (0.2, 0.5):
        assert_matches(op, weights, masks, amount)


def test_1e8_element_list(extension):
    gen = generator(12)
    weights = [normal(s, torch.float32, gen) for s in MIXED_1E8]
    assert_matches("global_magnitude_prune", weights, None, 0.2)
    weights = [w.bfloat16() for w in weights]
    masks = random_masks(weights, 0.5, gen)
    assert_matches("global_magnitude_prune", weights, masks, 0.8)


# ------------------------------------------------------------ synchronisation
@pytest.mark.parametrize("op", OPS)
def test_one_device_to_host_sync_per_call(extension, op):
    gen = generator(13)
    weights = mixed_weights(gen) + [quantised((COMPACT + 1,), torch.float32, gen)]
    masks = random_masks(weights, 0.5, gen)
    prune(op, "cuda", weights, masks, 0.3)  # warm-up: allocator, module import
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                prune(op, "cuda", weights, masks, 0.3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    device_to_host = [e.name for e in prof.events() if "DtoH" in e.name or "Device -> Pageable" in e.name
                      or "Device -> Pinned" in e.name]
    device_to_host = [name for name in device_to_host if not name.startswith("cuda")]  # activities, not API calls
    assert len(device_to_host) == 1, device_to_host
    blocking = [e.name for e in prof.events() if e.name == "cudaStreamSynchronize"]
    assert len(blocking) <= 1, blocking


# ------------------------------------------------------------- compute-sanitizer
SANITIZED_SCRIPT = """
import torch
from test_cuda_prune import COMPACT, INLINE, OPS, assert_matches, generator, mixed_weights, quantised, random_masks
gen = generator(0)
weights = mixed_weights(gen)
for op in OPS:
    assert_matches(op, weights, None, 0.3)
    assert_matches(op, weights, random_masks(weights, 0.5, gen), 0.6)
    assert_matches(op, weights, None, 0.4, [quantised(w.shape, torch.bfloat16, gen) for w in weights])
    assert_matches(op, [quantised((COMPACT + 5,), torch.float16, gen, levels=2)], None, 0.5)
    assert_matches(op, mixed_weights(gen, list(range(1, INLINE + 20))), None, 0.5)
torch.cuda.synchronize()
print("magnitude prune checked")
"""


def test_kernels_are_clean_under_compute_sanitizer_memcheck(extension):
    run_under_memcheck(SANITIZED_SCRIPT, "magnitude prune checked")
