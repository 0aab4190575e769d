"""Global and layerwise magnitude pruning in Triton: a multi-tensor radix select that reads
the weights about twice.

Keys: each candidate's ``|w|`` (or score) as float32 bits (exact for float16/bfloat16),
mapped to an integer in ``[0, 2**32)`` whose order is the float order: ``|w|`` bits shifted
left by one (so a 12-bit first digit is the 8 exponent bits and 4 mantissa bits: buckets of
1/16 octave), or the score bits with negatives flipped and the sign bit set on the others
(-0.0 folded into +0.0). The k-th largest key (k = candidates kept) is found digit by digit,
most significant first: digits of 12, 10 and 10 bits (``WIDE_DIGITS``). A pass adds the
``tl.histogram`` of the next digit over the keys of the current bucket ``[lo, hi]`` to a
global histogram; :func:`_pick_kernel` then narrows the bucket to the digit holding the k-th
largest key, updates k and decides, on the device, what each segment does next (``mode``).

Why this shape (the floor is one read of weights + masks and one write of the masks):

- Pass 0 reads everything once. Its 4096 bins leave typically 1-3% of the weights in the
  bucket of a 20% quantile, so a compact buffer of ``n_s / 16`` entries per segment (at
  least ``min(n_s, 4096)``) holds it.
- The next pass over the tensors *gathers*: it writes the final mask of every element
  outside the bucket (above: kept; below or not a candidate: pruned), writes False for the
  bucket's keys and copies them, with their position, into the buffer. Later digits and the
  final ranking read only the buffer, so typical inputs cost two reads and one write of the
  tensors. The entries of a step of ``BLOCK`` elements (a *unit*; unit order is global
  order) are contiguous and in index order: one atomic per unit reserves its region, whose
  (start, count) are kept per unit.
- Early exits: a bucket to be kept or pruned whole is emptied (``lo > hi``: keep the keys
  above ``hi``); before it is gathered, the next pass over the tensors (or the final kernel)
  writes the segment's masks by that rule. A bucket that never fits the buffer (heavy ties,
  all-equal keys) is ranked over the tensors: a tie count pass and a ranked write.
- Ties at the final key are kept in global order while their rank is below k. A rank is the
  ties of the segment's earlier units (exclusive scan of per-unit tie counts, a torch cumsum)
  plus an in-unit cumsum; for a gathered segment it is computed from the unit's region.
- Launches (ResNet-50 size is ~50 us of memory traffic, so launches matter as much): the host
  issues a fixed sequence (a digit pass and a pick per digit, tie counts, cumsum, final
  kernel); programs of segments with nothing to do exit at once, and the buffer programs of
  the later digits ride in the same launch as the pass over the tensors. One zeroed int64
  workspace holds all device state, one host table (addresses, chunk map, segments, amount)
  is copied once, and one device-to-host copy per call reads back the candidate counts and
  the non-finite flags, to raise the errors of :mod:`swamp_kernels._validate`.
- Sizes: a program covers ``CHUNK`` = 8192 elements in steps of ``BLOCK`` = 2048 with 8 warps
  (8 elements per thread per step), accumulating the histogram in registers (4096 bins /
  256 threads = 16 int32 per thread) and adding its nonzero bins with one masked atomic at
  the end: weights span a few hundred bins, so global atomics stay at a few percent of the
  elements, and ResNet-50 (25.5 M weights) still gives ~3100 programs, several waves over
  the H100's 132 SMs. A program stops at its tensor's end (partial chunks of small tensors
  cost one step). Triton 3.8 compiles the 4096-bin pass for sm_90 in 128 registers, no
  spills (two programs per SM).
- Triton 3.6 lowers ``tl.histogram`` to warp ballots, whose cost per key grows with the bins
  (sm_90 SASS per key and thread: 80 at 256 bins, 163 at 1024, 504 at 4096, where it also
  spills), against ~19 with 3.8's shared-memory atomics: wide digits would be compute-bound
  there, so Triton before 3.7 (3.7 itself unchecked) uses four 8-bit digits
  (``NARROW_DIGITS``) and a buffer of ``n_s / 4`` entries (the octave bucket of a 20%
  quantile holds ~19% of normal weights); the kernels are the same.

Weights are read in place through tables of addresses (contiguous ones are never copied;
others are made contiguous, as logical order matters), all dtypes in one launch per kernel.
Global pruning is one segment; layerwise pruning runs the same kernels with one segment per
tensor.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from swamp_kernels._tensors import dense_view
from swamp_kernels._validate import prune_count, raise_if_nonfinite
from swamp_kernels.triton.multi_tensor import chunk_arrays, int64_table

# tl.histogram counts with shared-memory atomics in Triton 3.8 (a few instructions per key);
# Triton 3.6 uses warp ballots, ~(bins / 32) * log2(bins) per key: see the module docstring.
_SHARED_MEMORY_HISTOGRAM = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)
CHUNK = 8192          # elements per program in passes over the tensors
BLOCK = 2048          # elements per step of such a program (a unit); buffer entries per step
NUM_WARPS = 8
# (shift, bins) of the digits of a 32-bit key, most significant first:
WIDE_DIGITS = ((20, 4096), (10, 1024), (0, 1024))
NARROW_DIGITS = ((24, 256), (16, 256), (8, 256), (0, 256))
# Compact-buffer entries of a segment of n elements: n // BUFFER_DIVISOR, at least
# min(n, BUFFER_MIN) (a wide first digit leaves ~1-3% of the keys, a narrow one ~20%):
DIGITS, BUFFER_DIVISOR = (WIDE_DIGITS, 16) if _SHARED_MEMORY_HISTOGRAM else (NARROW_DIGITS, 4)
BUFFER_MIN = 4096
BUFFER_STEPS = 8      # steps of BLOCK entries per buffer program when a buffer is full
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_HIST_ROW = tl.constexpr(4096)  # histogram entries per segment (the widest digit)
# Rows of the per-segment state ([6, S] int64): bucket, keys to keep in it, mode, buffer fill,
# candidates (the last row, followed by the per-tensor non-finite flags, is read back).
_LO, _HI, _K, _MODE, _FILL, _COUNT = (tl.constexpr(i) for i in range(6))
_STATE_ROWS = 6
# Rows of the per-unit arrays ([4, U] int64): buffer region (start, count), ties, inclusive scan.
_START, _TAKEN, _TIES, _TIES_INCL = (tl.constexpr(i) for i in range(4))
# Modes of a segment:
_SCAN = tl.constexpr(0)          # bucket in the tensors; the next pass narrows it
_GATHER = tl.constexpr(1)        # the next pass over the tensors writes the masks and gathers
_WRITE = tl.constexpr(2)         # bucket decided (empty) before gathering; masks not yet written
_COMPACT = tl.constexpr(3)       # bucket in the buffer, other masks written
_COMPACT_DONE = tl.constexpr(4)  # as _COMPACT, bucket decided (empty)
_FINISHED = tl.constexpr(5)      # masks written


# ------------------------------------------------------------------ element helpers
@triton.jit
def _float32_bits(addr, dtype_code, offs, inside):
    """int32 float32 bit patterns of elements ``offs`` of a float32/float16/bfloat16 tensor."""
    if dtype_code == 0:
        bits = tl.load(addr.to(tl.pointer_type(tl.int32)) + offs, mask=inside, other=0)
    elif dtype_code == 1:
        half = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=inside, other=0.0)
        bits = half.to(tl.float32).to(tl.int32, bitcast=True)
    else:
        raw = tl.load(addr.to(tl.pointer_type(tl.int16)) + offs, mask=inside, other=0)
        bits = raw.to(tl.int32) << 16
    return bits


@triton.jit
def _ordered_key(bits, IS_SCORES: tl.constexpr):
    """int64 key in [0, 2**32) ordered like the float: |x| bits shifted left by one, or an
    order-preserving map of the score bits (negatives flipped, sign bit set on the others;
    -0.0 is +0.0)."""
    if IS_SCORES:
        bits = tl.where(bits == -2147483648, 0, bits)
        bits = tl.where(bits < 0, ~bits, bits | -2147483648)
        key = bits.to(tl.uint32, bitcast=True).to(tl.int64)
    else:
        key = (bits & 0x7FFFFFFF).to(tl.int64) << 1
    return key


@triton.jit
def _keys(src_addrs, dtype_codes, mask_addrs, t, offs, inside,
          IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr):
    """Float32 bits, ordered keys and candidate flags of elements ``offs`` of tensor ``t``."""
    bits = _float32_bits(tl.load(src_addrs + t), tl.load(dtype_codes + t), offs, inside)
    cand = inside
    if HAS_MASKS:
        mask_ptr = tl.load(mask_addrs + t).to(tl.pointer_type(tl.int8))
        cand = cand & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
    return bits, _ordered_key(bits, IS_SCORES), cand


@triton.jit
def _steps(chunk_start, numels, c, t, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """First element of chunk ``c`` of tensor ``t`` and its steps of BLOCK that hold elements."""
    first = tl.load(chunk_start + c)
    return first, tl.minimum(tl.cdiv(tl.load(numels + t) - first, BLOCK), CHUNK // BLOCK)


@triton.jit
def _region(buf, units, U, u, BLOCK: tl.constexpr):
    """Keys, in-unit offsets and validity of the buffer entries of unit ``u``."""
    i = tl.arange(0, BLOCK)
    filled = i < tl.load(units + _TAKEN * U + u)
    entry = tl.load(buf + tl.load(units + _START * U + u) + i, mask=filled, other=0)
    return entry & 0xFFFFFFFF, entry >> 32, filled


@triton.jit
def _ties_before(units, U, u):
    """Ties in the units before unit ``u`` (all segments)."""
    return tl.load(units + _TIES_INCL * U + u) - tl.load(units + _TIES * U + u)


@triton.jit
def _pruned(n, amount):
    """``prune_count(amount, n)`` on the device: an int amount clamped to n (``amount[1]`` set),
    else ``round(amount * n)`` in float64, halves to even (``amount[0]`` holds the bits)."""
    value = tl.load(amount)
    x = n.to(tl.float64) * value.to(tl.float64, bitcast=True)
    down = x.to(tl.int64)  # x >= 0: truncation is floor
    frac = x - down.to(tl.float64)
    rounded = down + ((frac > 0.5) | ((frac == 0.5) & ((down & 1) == 1))).to(tl.int64)
    return tl.where(tl.load(amount + 1) != 0, tl.minimum(value, n), rounded)


# ------------------------------------------------------------------------- kernels
@triton.jit
def _chunk_digit_pass(c, src_addrs, dtype_codes, mask_addrs, numels, segment_of, out_addrs,
                      chunk_tensor, chunk_start, buf_base, state, hist, buf, units, nonfinite,
                      S, U, SHIFT: tl.constexpr, BINS: tl.constexpr, FIRST: tl.constexpr,
                      IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk ``c`` of a pass over the tensors: digit histogram of the bucket; in modes _GATHER
    and _WRITE also the masks, and in _GATHER the bucket's keys copied to the buffer."""
    t = tl.load(chunk_tensor + c)
    s = tl.load(segment_of + t)
    mode = tl.load(state + _MODE * S + s)
    if mode <= _WRITE:
        numel = tl.load(numels + t)
        lo = tl.load(state + _LO * S + s)
        hi = tl.load(state + _HI * S + s)
        out_ptr = tl.load(out_addrs + t).to(tl.pointer_type(tl.int8))
        local = tl.arange(0, BLOCK)
        counts = tl.zeros([BINS], dtype=tl.int32)
        first, steps = _steps(chunk_start, numels, c, t, CHUNK, BLOCK)
        for j in range(steps):
            offs = first + j * BLOCK + local
            inside = offs < numel
            bits, key, cand = _keys(src_addrs, dtype_codes, mask_addrs, t, offs, inside,
                                    IS_SCORES, HAS_MASKS)
            if FIRST:  # the bucket is every key; check them once
                in_bucket = cand
                bad = cand & ((bits & 0x7F800000) == 0x7F800000)
                if tl.max(bad.to(tl.int32), 0) > 0:
                    tl.store(nonfinite + t, 1)
            else:
                in_bucket = cand & (key >= lo) & (key <= hi)
            digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
            counts += tl.histogram(digit, BINS, mask=in_bucket)
            if mode != _SCAN:
                tl.store(out_ptr + offs, (cand & (key > hi)).to(tl.int8), mask=inside)
                taken = tl.sum(in_bucket.to(tl.int64), 0)
                if taken > 0:
                    start = tl.load(buf_base + s) + tl.atomic_add(state + _FILL * S + s, taken)
                    slot = start + tl.cumsum(in_bucket.to(tl.int64), 0) - 1
                    tl.store(buf + slot, key | (local.to(tl.int64) << 32), mask=in_bucket)
                    u = c * (CHUNK // BLOCK) + j
                    tl.store(units + _START * U + u, start)
                    tl.store(units + _TAKEN * U + u, taken)
        tl.atomic_add(hist + s * _HIST_ROW + tl.arange(0, BINS), counts.to(tl.int64),
                      mask=counts > 0)


@triton.jit
def _buffer_digit_pass(b, buf_base, state, hist, buf, S, buffer_programs,
                       SHIFT: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``b`` of the passes over the buffer: a strided share of segment
    ``b // buffer_programs``'s entries, when that segment is _COMPACT."""
    s = b // buffer_programs
    if tl.load(state + _MODE * S + s) == _COMPACT:
        base = tl.load(buf_base + s)
        fill = tl.load(state + _FILL * S + s)
        lo = tl.load(state + _LO * S + s)
        hi = tl.load(state + _HI * S + s)
        counts = tl.zeros([BINS], dtype=tl.int32)
        for i in range((b % buffer_programs) * BLOCK, fill, buffer_programs * BLOCK):
            idx = i + tl.arange(0, BLOCK)
            filled = idx < fill
            key = tl.load(buf + base + idx, mask=filled, other=0) & 0xFFFFFFFF
            digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
            counts += tl.histogram(digit, BINS, mask=filled & (key >= lo) & (key <= hi))
        tl.atomic_add(hist + s * _HIST_ROW + tl.arange(0, BINS), counts.to(tl.int64),
                      mask=counts > 0)


@triton.jit
def _digit_pass_kernel(src_addrs, dtype_codes, mask_addrs, numels, segment_of, out_addrs,
                       chunk_tensor, chunk_start, buf_base, state, hist, buf, units, nonfinite,
                       S, U, num_chunks, buffer_programs, SHIFT: tl.constexpr,
                       BINS: tl.constexpr, FIRST: tl.constexpr, IS_SCORES: tl.constexpr,
                       HAS_MASKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One digit pass: programs below ``num_chunks`` walk the tensors, the others the buffer."""
    pid = tl.program_id(0)
    if pid < num_chunks:
        _chunk_digit_pass(pid, src_addrs, dtype_codes, mask_addrs, numels, segment_of,
                          out_addrs, chunk_tensor, chunk_start, buf_base, state, hist, buf,
                          units, nonfinite, S, U, SHIFT, BINS, FIRST, IS_SCORES, HAS_MASKS,
                          CHUNK, BLOCK)
    else:
        _buffer_digit_pass(pid - num_chunks, buf_base, state, hist, buf, S, buffer_programs,
                           SHIFT, BINS, BLOCK)


@triton.jit
def _pick_kernel(state, hist, cap, amount, S, SHIFT: tl.constexpr, BINS: tl.constexpr,
                 FIRST: tl.constexpr, LAST: tl.constexpr):
    """Narrow the bucket of segment ``program_id(0)`` to the digit holding its k-th largest
    key (zeroing the histogram for the next pass) and advance the segment's mode.

    Invariant: the bucket holds at least k candidates (k >= 0); after the pick, k counts the
    keys to keep inside the new bucket. The first pick also computes the candidate count and k.
    """
    s = tl.program_id(0)
    mode = tl.load(state + _MODE * S + s)
    if mode == _WRITE:  # the pass just done wrote the masks
        tl.store(state + _MODE * S + s, _FINISHED)
    elif (mode <= _GATHER) | (mode == _COMPACT):
        bins = tl.arange(0, BINS)
        counts = tl.load(hist + s * _HIST_ROW + bins)
        tl.store(hist + s * _HIST_ROW + bins, tl.zeros([BINS], dtype=tl.int64))
        if FIRST:
            n = tl.sum(counts, 0)
            tl.store(state + _COUNT * S + s, n)
            wanted = n - _pruned(n, amount)
        else:
            wanted = tl.load(state + _K * S + s)
        at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
        digit = tl.sum((at_or_above >= wanted).to(tl.int32), 0) - 1
        chosen = bins == digit
        in_digit = tl.sum(tl.where(chosen, counts, 0), 0)
        wanted -= tl.sum(tl.where(chosen, at_or_above, 0), 0) - in_digit
        lo = tl.load(state + _LO * S + s) + (digit.to(tl.int64) << SHIFT)
        hi = lo + ((1 << SHIFT) - 1)
        # A bucket kept or pruned whole is emptied (lo > hi): the keys above hi are kept.
        all_kept = wanted == in_digit
        none_kept = wanted == 0
        hi = tl.where(all_kept, lo - 1, hi)
        lo = tl.where(none_kept, hi + 1, lo)
        tl.store(state + _LO * S + s, lo)
        tl.store(state + _HI * S + s, hi)
        tl.store(state + _K * S + s, wanted)
        in_buffer = mode != _SCAN
        if LAST:  # no pass over the tensors is left to gather
            fits = in_digit < 0
        else:
            fits = in_digit <= tl.load(cap + s)
        searching = tl.where(in_buffer, _COMPACT, tl.where(fits, _GATHER, _SCAN))
        decided = tl.where(in_buffer, _COMPACT_DONE, _WRITE)
        tl.store(state + _MODE * S + s, tl.where(all_kept | none_kept, decided, searching))


@triton.jit
def _step(src_addrs, dtype_codes, mask_addrs, numels, t, first, j, lo, hi,
          IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr, BLOCK: tl.constexpr):
    """Offsets, in-tensor flags, keys, candidate flags and in-bucket flags (candidates with a key
    in ``[lo, hi]``) of step ``j`` of the chunk of tensor ``t`` starting at element ``first``."""
    offs = first + j * BLOCK + tl.arange(0, BLOCK)
    inside = offs < tl.load(numels + t)
    bits, key, cand = _keys(src_addrs, dtype_codes, mask_addrs, t, offs, inside, IS_SCORES, HAS_MASKS)
    return offs, inside, key, cand, cand & (key >= lo) & (key <= hi)


@triton.jit
def _chunk_segment(chunk_tensor, segment_of, state, S):
    """Chunk ``program_id(0)``: (chunk, its tensor, the tensor's segment, and the segment's mode
    and bucket bounds lo, hi)."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    s = tl.load(segment_of + t)
    return c, t, s, tl.load(state + _MODE * S + s), tl.load(state + _LO * S + s), tl.load(state + _HI * S + s)


@triton.jit
def _count_ties_kernel(src_addrs, dtype_codes, mask_addrs, numels, segment_of, chunk_tensor,
                       chunk_start, state, buf, units, S, U, IS_SCORES: tl.constexpr,
                       HAS_MASKS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Per-unit counts of the keys in the final bucket of chunk ``program_id(0)``: from the
    tensors (_SCAN) or from the units' buffer regions (_COMPACT)."""
    c, t, s, mode, lo, hi = _chunk_segment(chunk_tensor, segment_of, state, S)
    first, steps = _steps(chunk_start, numels, c, t, CHUNK, BLOCK)
    if mode == _SCAN:
        for j in range(steps):
            offs, inside, key, cand, tie = _step(src_addrs, dtype_codes, mask_addrs, numels, t, first, j,
                                                 lo, hi, IS_SCORES, HAS_MASKS, BLOCK)
            tl.store(units + _TIES * U + c * (CHUNK // BLOCK) + j, tl.sum(tie.to(tl.int64), 0))
    elif mode == _COMPACT:
        for j in range(steps):
            u = c * (CHUNK // BLOCK) + j
            key, offset, filled = _region(buf, units, U, u, BLOCK)
            tie = filled & (key >= lo) & (key <= hi)
            tl.store(units + _TIES * U + u, tl.sum(tie.to(tl.int64), 0))


@triton.jit
def _finish_kernel(src_addrs, dtype_codes, mask_addrs, numels, segment_of, out_addrs,
                   chunk_tensor, chunk_start, first_unit, state, buf, units, S, U,
                   IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Final masks of chunk ``program_id(0)``: keys above the bucket, then ties of rank below k.
    Segments still in the tensors (_SCAN, _WRITE) are written whole; for gathered ones
    (_COMPACT, _COMPACT_DONE) only the kept buffer entries are set."""
    c, t, s, mode, lo, hi = _chunk_segment(chunk_tensor, segment_of, state, S)
    k = tl.load(state + _K * S + s)
    segment_ties = _ties_before(units, U, tl.load(first_unit + s))
    out_ptr = tl.load(out_addrs + t).to(tl.pointer_type(tl.int8))
    first, steps = _steps(chunk_start, numels, c, t, CHUNK, BLOCK)
    if (mode == _SCAN) | (mode == _WRITE):
        for j in range(steps):
            offs, inside, key, cand, tie = _step(src_addrs, dtype_codes, mask_addrs, numels, t, first, j,
                                                 lo, hi, IS_SCORES, HAS_MASKS, BLOCK)
            rank = (_ties_before(units, U, c * (CHUNK // BLOCK) + j) - segment_ties
                    + tl.cumsum(tie.to(tl.int64), 0) - 1)
            keep = (cand & (key > hi)) | (tie & (rank < k))
            tl.store(out_ptr + offs, keep.to(tl.int8), mask=inside)
    elif (mode == _COMPACT) | (mode == _COMPACT_DONE):
        for j in range(steps):
            u = c * (CHUNK // BLOCK) + j
            key, offset, filled = _region(buf, units, U, u, BLOCK)
            tie = filled & (key >= lo) & (key <= hi)
            rank = _ties_before(units, U, u) - segment_ties + tl.cumsum(tie.to(tl.int64), 0) - 1
            keep = filled & ((key > hi) | (tie & (rank < k)))
            tl.store(out_ptr + first + j * BLOCK + offset, tl.full([BLOCK], 1, tl.int8), mask=keep)


# ---------------------------------------------------------------------------- host
def _raise_errors(name: str, amount, counts: list[int], nonfinite: list[int],
                  layerwise: bool) -> None:
    """The data-dependent errors of the reference, with the same messages, in the same order."""
    raise_if_nonfinite(name, nonfinite)
    if layerwise:
        for i, n in enumerate(counts):
            prune_count(amount, n, f" of weights[{i}]")
    else:
        prune_count(amount, counts[0])


def _amount_words(amount, total: int) -> list[int]:
    """``amount`` as two int64 words for :func:`_pruned`: an int (clamped to ``total``; too
    large ones are reported by :func:`_raise_errors`) and 1, or the float64 bits and 0."""
    if isinstance(amount, numbers.Integral):
        return [min(int(amount), total), 1]
    return [int(np.float64(amount).view(np.int64)), 0]


def _buffer_capacity(sizes: np.ndarray) -> np.ndarray:
    """Compact-buffer entries of segments of ``sizes`` elements."""
    return np.minimum(sizes, np.maximum(sizes // BUFFER_DIVISOR, BUFFER_MIN))


@dataclass(frozen=True)
class _Plan:
    """Device tables, workspace views and launch sizes of one call."""
    tensors: tuple         # src_addrs, dtype_codes, mask_addrs, numels, segment_of, out_addrs
    chunks: tuple          # chunk_tensor, chunk_start
    first_unit: torch.Tensor
    buf_base: torch.Tensor
    cap: torch.Tensor
    amount: torch.Tensor
    state: torch.Tensor      # int64 [6 * S] (rows _LO ... _COUNT)
    nonfinite: torch.Tensor  # int64 [T]
    hist: torch.Tensor       # int64 [S * _HIST_ROW]
    units: torch.Tensor      # int64 [4, U] (rows _START ... _TIES_INCL)
    buf: torch.Tensor        # int64 [entries]: key | (offset in unit << 32)
    num_chunks: int
    buffer_programs: int     # per segment, in the last digit pass
    flags: dict              # IS_SCORES, HAS_MASKS, CHUNK, BLOCK, num_warps
    readback: torch.Tensor   # candidate counts per segment, then the non-finite flags

    @property
    def sizes(self) -> dict:
        return dict(S=self.cap.numel(), U=self.units.shape[1])


def _plan(sources, mask_views, out, amount, is_scores: bool, layerwise: bool) -> _Plan:
    device = sources[0].device
    numels = np.array([x.numel() for x in sources], dtype=np.int64)
    tensors, segments = len(sources), len(sources) if layerwise else 1
    chunk_tensor, chunk_start = chunk_arrays(numels, CHUNK)
    chunks = len(chunk_tensor)
    first_chunk = np.searchsorted(chunk_tensor, np.arange(tensors)) if layerwise else [0]
    cap = _buffer_capacity(numels if layerwise else numels.sum(keepdims=True))
    rows = [[x.data_ptr() for x in sources], [_DTYPE_CODES[x.dtype] for x in sources],
            [x.data_ptr() for x in (mask_views if mask_views is not None else sources)],
            numels, np.arange(tensors) if layerwise else np.zeros(tensors),
            [m.data_ptr() for m in out], chunk_tensor, chunk_start,
            np.asarray(first_chunk) * (CHUNK // BLOCK), np.cumsum(cap) - cap, cap,
            _amount_words(amount, int(numels.sum()))]
    table = int64_table(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]), device)
    parts = table.split([len(r) for r in rows])
    units = chunks * (CHUNK // BLOCK)
    workspace = torch.zeros(_STATE_ROWS * segments + tensors + segments * _HIST_ROW.value + 4 * units,
                            dtype=torch.int64, device=device)
    state, nonfinite, hist, unit_rows = workspace.split(
        [_STATE_ROWS * segments, tensors, segments * _HIST_ROW.value, 4 * units])
    count_row = _COUNT.value * segments
    return _Plan(tuple(parts[:6]), tuple(parts[6:8]), *parts[8:12], state, nonfinite, hist,
                 unit_rows.view(4, units),
                 torch.empty(max(int(cap.sum()), 1), dtype=torch.int64, device=device),
                 chunks, max(1, triton.cdiv(int(cap.max()), BLOCK * BUFFER_STEPS)),
                 dict(IS_SCORES=is_scores, HAS_MASKS=mask_views is not None, CHUNK=CHUNK,
                      BLOCK=BLOCK, num_warps=NUM_WARPS),
                 workspace[count_row:count_row + segments + tensors])


def _select_and_write(plan: _Plan) -> None:
    """The fixed launch sequence: digit passes and picks, tie counts and their scan, final masks."""
    segments, units = plan.cap.numel(), plan.units
    for p, (shift, bins) in enumerate(DIGITS):
        # A bucket reaches the buffer in pass 1 at the earliest, so is read from it from pass 2.
        buffer_programs = segments * plan.buffer_programs if p >= 2 else 0
        _digit_pass_kernel[(plan.num_chunks + buffer_programs,)](
            *plan.tensors, *plan.chunks, plan.buf_base, plan.state, plan.hist, plan.buf, units,
            plan.nonfinite, **plan.sizes, num_chunks=plan.num_chunks,
            buffer_programs=plan.buffer_programs, SHIFT=shift, BINS=bins, FIRST=p == 0,
            **plan.flags)
        _pick_kernel[(segments,)](plan.state, plan.hist, plan.cap, plan.amount, segments,
                                  SHIFT=shift, BINS=bins, FIRST=p == 0,
                                  LAST=p == len(DIGITS) - 1)
    src_addrs, dtype_codes, mask_addrs, numels, segment_of, out_addrs = plan.tensors
    _count_ties_kernel[(plan.num_chunks,)](src_addrs, dtype_codes, mask_addrs, numels,
                                           segment_of, *plan.chunks, plan.state, plan.buf,
                                           units, **plan.sizes, **plan.flags)
    torch.cumsum(units[_TIES.value], 0, out=units[_TIES_INCL.value])
    _finish_kernel[(plan.num_chunks,)](*plan.tensors, *plan.chunks, plan.first_unit, plan.state,
                                       plan.buf, units, **plan.sizes, **plan.flags)


def _prune(weights, masks, amount, scores, layerwise: bool) -> list[torch.Tensor]:
    name, sources = ("weights", weights) if scores is None else ("scores", scores)
    sources = [dense_view(x) for x in sources]
    mask_views = None if masks is None else [dense_view(m) for m in masks]  # alive to the end
    out = [torch.empty(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    segments = len(sources) if layerwise else 1
    if sum(x.numel() for x in sources) == 0:  # nothing to launch
        _raise_errors(name, amount, [0] * segments, [0] * len(sources), layerwise)
        return out
    plan = _plan(sources, mask_views, out, amount, scores is not None, layerwise)
    _select_and_write(plan)
    readback = plan.readback.tolist()  # the one host sync
    _raise_errors(name, amount, readback[:segments], readback[segments:], layerwise)
    return out


def global_magnitude_prune(weights, masks, amount, scores=None) -> list[torch.Tensor]:
    """Triton backend of :func:`swamp_kernels.global_magnitude_prune` (validated input)."""
    return _prune(weights, masks, amount, scores, layerwise=False)


def layerwise_magnitude_prune(weights, masks, amount, scores=None) -> list[torch.Tensor]:
    """Triton backend of :func:`swamp_kernels.layerwise_magnitude_prune` (validated input)."""
    return _prune(weights, masks, amount, scores, layerwise=True)
