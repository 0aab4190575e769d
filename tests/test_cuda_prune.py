"""CUDA backend (swamp_kernels._C) of global/layerwise magnitude pruning: masks bitwise equal
to the torch reference on random, adversarial and path-aimed inputs; one device sync per
call and clean under compute-sanitizer memcheck on a GPU.

Tests take the ``cuda_device`` fixture: on a GPU they run the built extension, without one
the host build of the same kernels on CPU tensors (tests/cuda_emulation), so sizes stay
moderate (~0.2 us per element there). Only what needs the device itself (sync counting,
compute-sanitizer, full-size ResNet-50 and 10^8-element lists) is marked ``gpu``.

Cases are aimed at the kernels' constants and paths (csrc/magnitude_prune.cu): 16384-element
chunks; digits of 12, 10 and 10 bits (the first: exponent and 4 mantissa bits of |w|); a
buffer of max(n / 16, min(n, 4096)) keys per segment, filled by the pass over the tensors
after the digit whose bucket first fits (pass 1 or 2), else the ties are ranked over the
tensors; a bucket kept whole ends the search early; one chunk of a gathered segment straddles
k and ranks its ties itself; 72 table entries inline in the kernel arguments.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import swamp_kernels as sk
from benchmarks.shapes import MIXED_1E8, resnet50_conv_fc
from kernel_checks import assert_masks_match, prune, raises_binding_error
from swamp_kernels import cuda as cuda_backend
from test_cuda_extension import extension, run_under_memcheck  # noqa: F401  (extension: fixture)

OPS = ("global_magnitude_prune", "layerwise_magnitude_prune")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 16384                  # kChunk
BUFFER_MIN = 4096              # kBufferMin: buffer keys of a segment of n >= 4096 elements ...
BUFFER_DIVISOR = 16            # ... max(n // kBufferDivisor, 4096)
INLINE = 72                    # PruneEntry rows that fit in the kernel arguments
SIZES = (1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5)


def assert_matches(op, weights, masks, amount, scores=None) -> None:
    assert_masks_match(op, weights, masks, amount, scores, backend="cuda")


def buffer_keys(n: int) -> int:
    return max(n // BUFFER_DIVISOR, min(n, BUFFER_MIN))


def generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def normal(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(dtype)


def quantised(shape, dtype, gen, levels: int = 4) -> torch.Tensor:
    """Few distinct magnitudes, with +0.0 and -0.0 entries."""
    return (torch.randint(-levels, levels + 1, shape, generator=gen, device=gen.device) * 0.25).to(dtype)


def in_one_first_digit(n: int, gen) -> torch.Tensor:
    """float32 magnitudes in [1, 1.04): one 12-bit first digit (1/16 octave), spread over the
    1024 second digits."""
    return 1.0 + 0.04 * torch.rand(n, generator=gen, device=gen.device)


def random_masks(weights, keep: float, gen) -> list[torch.Tensor]:
    return [torch.rand(w.shape, generator=gen, device=gen.device) < keep for w in weights]


def amounts(op, weights, masks, floats=(0.0, 0.2, 0.77, 1.0)) -> list:
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
def test_random_mixed_dtypes(cuda_device, op, masked):
    gen = generator(1, cuda_device)
    weights = mixed_weights(gen)
    masks = random_masks(weights, 0.7, gen) if masked else None
    for amount in amounts(op, weights, masks):
        assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_alone(cuda_device, op, dtype):
    gen = generator(2, cuda_device)
    weights = [normal((3 * CHUNK + 5,), dtype, gen), normal((7, 9), dtype, gen), normal((2 * CHUNK,), dtype, gen)]
    for amount in (0.3, 50, 0.999):
        assert_matches(op, weights, None, amount)


@pytest.mark.parametrize("op", OPS)
def test_more_tensors_than_fit_inline(cuda_device, op):
    gen = generator(3, cuda_device)
    sizes = torch.randint(1, 300, (2 * INLINE + 7,), generator=torch.Generator().manual_seed(3)).tolist()
    weights = mixed_weights(gen, sizes)
    masks = random_masks(weights, 0.6, gen)
    for amount in (0.2, 0.5, 0):
        assert_matches(op, weights, masks, amount)


# ------------------------------------------------------------- selection paths
def ties_around(n: int, ties: int, gen) -> tuple[torch.Tensor, int]:
    """float32 weights of n entries: `ties` copies of 1.0 at random positions, the others far
    above (in [2, 3)) or below (in [0.1, 0.2)) in equal parts; and how many lie above."""
    weights = torch.where(torch.rand(n, generator=gen, device=gen.device) < 0.5,
                          2.0 + torch.rand(n, generator=gen, device=gen.device),
                          0.1 + 0.1 * torch.rand(n, generator=gen, device=gen.device))
    weights[torch.randperm(n, generator=gen, device=gen.device)[:ties]] = 1.0
    return weights, int((weights > 1.0).sum())


@pytest.mark.parametrize("fits", [True, False], ids=["gathered", "ranked-over-the-tensors"])
def test_ties_ranked_across_chunks(cuda_device, fits):
    # A bucket of equal keys of exactly the buffer's size is gathered after the first digit
    # and ranked from the buffer (one chunk straddles k); one key more is ranked over the
    # tensors. Kept ties end at a chunk's last tie, one later, and mid-way.
    n = 3 * CHUNK + 5
    ties = buffer_keys(n) + (0 if fits else 1)
    weights, above = ties_around(n, ties, generator(4, cuda_device))
    ties_in_chunk_0 = int((weights[:CHUNK] == 1.0).sum())
    for kept_ties in (ties_in_chunk_0, ties_in_chunk_0 + 1, ties // 2, 1, ties - 1):
        for op in OPS:
            assert_matches(op, [weights], None, n - above - kept_ties)


def test_bucket_gathered_after_the_second_digit(cuda_device):
    # Every key shares the first digit, so the first bucket exceeds the buffer; the second
    # digit splits it into ~n/1024-key buckets, gathered by the third pass over the tensors.
    gen = generator(5, cuda_device)
    weights = [in_one_first_digit(20_000, gen), in_one_first_digit(CHUNK + 3, gen).bfloat16()]
    for op in OPS:
        for amount in (0.2, 0.5, 0.93, 7_777):
            assert_matches(op, weights, None, amount)


NEXT_AFTER_ONE = float(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)))


@pytest.mark.parametrize(("n", "second"), [(3_000, 1.01), (20_000, 1.01), (3_000, NEXT_AFTER_ONE),
                                           (20_000, NEXT_AFTER_ONE)],
                         ids=["gathered-digit-2", "in-the-tensors-digit-2", "gathered-digit-3",
                              "in-the-tensors-digit-3"])
def test_bucket_kept_whole_ends_early(cuda_device, n, second):
    # 1.0 and a larger value in one first digit: pruning exactly the 1.0 entries keeps the
    # larger value's bucket whole once a digit separates them (the second for 1.01, the last
    # for the next float), after gathering when the first bucket fits the buffer, in the
    # tensors otherwise; a third value alone in its first digit ends the search at pass 0.
    gen = generator(6, cuda_device)
    values = torch.tensor([1.0, second, -4.0], device=cuda_device)
    weights = values[torch.randint(0, 3, (n,), generator=gen, device=cuda_device)]
    smaller, middle = int((weights == 1.0).sum()), int((weights == second).sum())
    for op in OPS:
        for amount in (smaller, smaller + middle, smaller + 1, 0.0, 1.0):
            assert_matches(op, [weights], None, amount)


def test_uneven_layerwise_segments_take_their_own_paths(cuda_device):
    # Per tensor: gathered after digit 1, gathered after digit 2, ranked over the tensors,
    # kept whole early, tiny, and with no candidate; all in one call, then as one segment.
    gen = generator(7, cuda_device)
    weights = [normal((3 * CHUNK + 5,), torch.float32, gen), in_one_first_digit(20_000, gen).half(),
               torch.full((9_000,), -0.75, device=cuda_device).bfloat16(),
               torch.tensor([1.0, 2.0], device=cuda_device).repeat(2_500), normal((7,), torch.float16, gen),
               normal((CHUNK + 1,), torch.float32, gen)]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    masks[5].zero_()
    for op in OPS:
        for amount in (0.3, 0.5, 0.0, 1.0):  # 0.5: exactly the 1.0 entries of weights[3] pruned
            assert_matches(op, weights, masks, amount)


# ------------------------------------------------------------------- ties, sizes
@pytest.mark.parametrize("op", OPS)
def test_heavy_ties(cuda_device, op):
    gen = generator(8, cuda_device)
    weights = [quantised((2 * CHUNK + 3,), torch.float32, gen), quantised((9, 31), torch.bfloat16, gen),
               torch.full((CHUNK + 1,), -0.5, device=cuda_device).half(), quantised((5,), torch.float16, gen),
               quantised((10_003,), torch.bfloat16, gen, levels=64)]
    for masks in (None, random_masks(weights, 0.8, gen)):
        for amount in amounts(op, weights, masks, floats=(0.1, 0.5, 0.9)):
            assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
def test_all_equal(cuda_device, op):
    weights = [torch.full((3 * CHUNK + 1,), 2.0, device=cuda_device),
               torch.full((4, 5), -2.0, device=cuda_device).bfloat16(),
               torch.full((CHUNK,), 1.5, device=cuda_device).half()]
    for amount in (0.0, 0.25, 0.5, 1.0, 3, 20):
        assert_matches(op, weights, None, amount)


@pytest.mark.parametrize("op", OPS)
def test_tiny_odd_and_empty_sizes(cuda_device, op):
    gen = generator(9, cuda_device)
    for amount in (0.0, 0.5, 1.0, 0, 1):
        assert_matches(op, [normal((1,), torch.float32, gen)], None, amount)
        assert_matches(op, [normal((), torch.bfloat16, gen)], None, amount)
    assert_matches(op, [torch.randn(0, device=cuda_device)], None, 0.3)
    weights = [normal((n,), DTYPES[n % 3], gen) for n in (CHUNK - 1, CHUNK, CHUNK + 1, 1, 0, 2 * CHUNK + 1)]
    for amount in (0.0, 0.4, 1.0, 0):
        assert_matches(op, weights, None, amount)


# --------------------------------------------------------------------- masks
@pytest.mark.parametrize("op", OPS)
def test_already_pruned(cuda_device, op):
    gen = generator(10, cuda_device)
    weights = mixed_weights(gen)
    masks = random_masks(weights, 0.2, gen)
    masks[1] = torch.zeros_like(masks[1])  # a tensor with no candidate
    weights = [w * m for w, m in zip(weights, masks)]  # pruned entries hold zeros, as after IMP
    for amount in amounts(op, weights, masks, floats=(0.0, 0.2, 0.5, 1.0)):
        assert_matches(op, weights, masks, amount)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_layouts(cuda_device, op):
    gen = generator(11, cuda_device)
    weights = [normal((64, 3, 7, 7), torch.float32, gen).contiguous(memory_format=torch.channels_last),
               normal((300, 200), torch.bfloat16, gen).t(), normal((50, 40), torch.float16, gen)[:, ::3]]
    masks = [m.contiguous(memory_format=torch.channels_last) if i == 0 else m
             for i, m in enumerate(random_masks(weights, 0.7, gen))]
    for amount in (0.2, 0.9, 100):
        assert_matches(op, weights, masks, amount)


# --------------------------------------------------------------------- scores
@pytest.mark.parametrize("op", OPS)
def test_scores_with_negatives_and_signed_zeros(cuda_device, op):
    gen = generator(12, cuda_device)
    weights = mixed_weights(gen, SIZES[:-1])
    scores = [quantised(w.shape, DTYPES[(i + 1) % 3], gen) if i % 2 else normal(w.shape, DTYPES[(i + 2) % 3], gen)
              for i, w in enumerate(weights)]
    masks = random_masks(weights, 0.75, gen)
    for m in (None, masks):
        for amount in amounts(op, weights, m, floats=(0.0, 0.3, 0.5, 1.0)):
            assert_matches(op, weights, m, amount, scores)


def test_signed_zero_scores_tie_by_index(cuda_device):
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0, 1.0], device=cuda_device)
    weights = [torch.ones(6, device=cuda_device), torch.ones(6, device=cuda_device).half()]
    for amount in range(13):
        assert_matches("global_magnitude_prune", weights, None, amount, [zeros, zeros.bfloat16()])


def test_random_scores_prune_randomly(cuda_device):
    gen = generator(13, cuda_device)
    weights = mixed_weights(gen, SIZES[:-1])
    scores = [s.to(cuda_device) for s in sk.random_scores(weights, seed=0)]
    assert_matches("global_magnitude_prune", weights, None, 0.5, scores)


# --------------------------------------------------------------------- errors
def _error(op, backend, weights, masks, amount, scores=None) -> str:
    with pytest.raises(ValueError) as info:
        prune(op, backend, weights, masks, amount, scores)
    return str(info.value)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_candidates_raise_like_the_reference(cuda_device, op, bad, dtype):
    weights = [torch.randn(100, device=cuda_device).to(dtype) for _ in range(4)]
    weights[2][37] = bad
    message = _error(op, "cuda", weights, None, 0.2)
    assert message == _error(op, "torch", weights, None, 0.2)
    assert "weights[2]" in message
    scores = [w.float() for w in weights]
    assert "scores[2]" in _error(op, "cuda", [torch.ones(100, device=cuda_device)] * 4, None, 0.2, scores)


@pytest.mark.parametrize("op", OPS)
def test_nonfinite_outside_the_candidates_is_ignored(cuda_device, op):
    weights = [torch.randn(3 * CHUNK, device=cuda_device), torch.randn(50, device=cuda_device).half()]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    weights[0][CHUNK + 5], masks[0][CHUNK + 5] = float("nan"), False
    weights[1][7], masks[1][7] = float("-inf"), False
    assert_matches(op, weights, masks, 0.4)


@pytest.mark.parametrize("op", OPS)
def test_int_amount_above_n_raises_like_the_reference(cuda_device, op):
    weights = [torch.randn(30, device=cuda_device), torch.randn(20, device=cuda_device).bfloat16()]
    masks = [torch.arange(30, device=cuda_device) % 2 == 0, torch.ones(20, dtype=torch.bool, device=cuda_device)]
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
def test_compiled_op_checks_its_input(cuda_device, case):
    make_args, message = BINDING_ERRORS[case]
    keys, masks = make_args(torch.ones(16, device=cuda_device), torch.ones(16, dtype=torch.bool, device=cuda_device))
    with raises_binding_error(f"global_magnitude_prune: {message}"):
        cuda_backend._ops().global_magnitude_prune(keys, masks, 0.5, False, False)


# ----------------------------------------------------------- GPU: full size, syncs
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pruned", [0.0, 0.8])
@pytest.mark.parametrize("op", OPS)
def test_resnet50_conv_fc_weights(extension, op, dtype, pruned):
    gen = generator(14, "cuda")
    weights = [(torch.randn(s, generator=gen, device="cuda") * math.sqrt(2.0 / math.prod(s[1:]))).to(dtype)
               for s in resnet50_conv_fc()]
    masks = None
    if pruned:
        masks = sk.global_magnitude_prune(weights, None, pruned, backend="torch")
        weights = [w * m for w, m in zip(weights, masks)]
    for amount in (0.2, 0.5):
        assert_matches(op, weights, masks, amount)


@pytest.mark.gpu
def test_1e8_element_list(extension):
    gen = generator(15, "cuda")
    weights = [normal(s, torch.float32, gen) for s in MIXED_1E8]
    assert_matches("global_magnitude_prune", weights, None, 0.2)
    weights = [w.bfloat16() for w in weights]
    masks = random_masks(weights, 0.5, gen)
    assert_matches("global_magnitude_prune", weights, masks, 0.8)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
def test_one_device_to_host_sync_per_call(extension, op):
    gen = generator(16, "cuda")
    weights = mixed_weights(gen) + [quantised((1 << 21,), torch.float32, gen)]
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
from test_cuda_prune import (CHUNK, INLINE, OPS, assert_matches, generator, in_one_first_digit, mixed_weights,
                             quantised, random_masks, ties_around)
gen = generator(0, "cuda")
weights = mixed_weights(gen)
for op in OPS:
    assert_matches(op, weights, None, 0.3)
    assert_matches(op, weights, random_masks(weights, 0.5, gen), 0.6)
    assert_matches(op, weights, None, 0.4, [quantised(w.shape, torch.bfloat16, gen) for w in weights])
    assert_matches(op, [quantised((1 << 21,), torch.float16, gen, levels=2)], None, 0.5)
    assert_matches(op, [in_one_first_digit(20_000, gen)], None, 0.5)
    ties, above = ties_around(3 * CHUNK + 5, 4096, gen)
    assert_matches(op, [ties], None, 3 * CHUNK + 5 - above - 2048)
    assert_matches(op, mixed_weights(gen, list(range(1, INLINE + 20))), None, 0.5)
torch.cuda.synchronize()
print("magnitude prune checked")
"""


@pytest.mark.gpu
def test_kernels_are_clean_under_compute_sanitizer_memcheck(extension):
    run_under_memcheck(SANITIZED_SCRIPT, "magnitude prune checked")
