"""Global and layerwise magnitude pruning in Triton: a multi-tensor radix select.

Keys: each candidate's ``|w|`` (or score) as float32 bits (exact for float16/bfloat16),
mapped to an integer in ``[0, 2**32)`` whose order is the float order (-0.0 folded into
+0.0), held in int64. The k-th largest key (k = candidates kept) is found one 8-bit digit
at a time, most significant first, in four passes. Each pass adds, per program, a
``tl.histogram`` of the next digit over the keys inside the current bucket ``[lo, hi]``
into a global histogram (atomic adds); :func:`_pick_kernel` then narrows the bucket to the
digit holding the k-th largest key and updates k, on the device.

- Compaction: once a bucket holds at most ``cap`` keys, the next pass over the tensors also
  copies its (key, chunk index) pairs into a compact buffer; later passes read only the buffer.
- Early exit: once all keys of the bucket are to be kept, or all pruned, the search stops.
- Masks: keys above the bucket are kept; keys inside it (the ties, one key after four
  passes) are kept in global order while their rank is below k. A rank is the exclusive
  scan over chunks (chunk order is global order) of per-chunk tie counts plus an in-chunk
  cumsum.

Weights are read in place through tables of addresses (contiguous ones are never copied;
others are made contiguous, as logical order matters), all dtypes in one launch per kernel.
Global pruning is one segment; layerwise pruning runs the same kernels with one segment
per tensor. One device-to-host copy per call reads back the candidate counts and the
non-finite flags, to raise the errors of :mod:`swamp_kernels._validate`.
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
from swamp_kernels.triton.multi_tensor import address_table, chunk_map, chunk_of, int64_table

CHUNK = 4096                # elements per program in passes over the tensors
CHUNK_WARPS = 8             # warps per such program (no register spills at CHUNK = 4096)
COMPACT_BUDGET = 1 << 20    # compact-buffer entries, shared by the segments
COMPACT_BLOCK = 1024        # buffer entries per program in passes over the buffer
_SHIFTS = (24, 16, 8, 0)    # the 8-bit digits of a 32-bit key, most significant first
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_BINS = tl.constexpr(256)
# Search state of a segment (``mode``):
_SCAN = tl.constexpr(0)     # passes over the tensors narrow the bucket
_GATHER = tl.constexpr(1)   # the next pass over the tensors also copies the bucket to the buffer
_COMPACT = tl.constexpr(2)  # the bucket lies in the compact buffer
_DONE = tl.constexpr(3)     # the bucket's keys are all kept or all pruned


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
    """int64 key in [0, 2**32) ordered like the float: |x| bits, or an order-preserving
    map of the score bits (negatives flipped, sign bit set on the others; -0.0 is +0.0)."""
    if IS_SCORES:
        bits = tl.where(bits == -2147483648, 0, bits)
        bits = tl.where(bits < 0, ~bits, bits | -2147483648)
        key = bits.to(tl.uint32, bitcast=True).to(tl.int64)
    else:
        key = (bits & 0x7FFFFFFF).to(tl.int64)
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
def _in_bucket(key, cand, lo, hi, s):
    """Candidates whose key lies in the bucket ``[lo[s], hi[s]]``."""
    return cand & (key >= tl.load(lo + s)) & (key <= tl.load(hi + s))


@triton.jit
def _add_histogram(hist_row, key, in_bucket, shift):
    """Add the counts of the digit ``(key >> shift) & 255`` of the ``in_bucket`` keys to ``hist_row``."""
    digit = ((key >> shift) & 255).to(tl.int32)
    counts = tl.histogram(digit, _BINS, mask=in_bucket)
    tl.atomic_add(hist_row + tl.arange(0, _BINS), counts.to(tl.int64), mask=counts > 0)


@triton.jit
def _buffer_entries(buf_key, buf_base, buf_fill, lo, hi, s, BLOCK: tl.constexpr):
    """Buffer slots, keys and in-bucket flags of block ``program_id(1)`` of segment ``s``."""
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(buf_base + s) + i
    filled = i < tl.load(buf_fill + s)
    key = tl.load(buf_key + slot, mask=filled, other=0)
    return slot, key, _in_bucket(key, filled, lo, hi, s)


# ------------------------------------------------------------------------- kernels
@triton.jit
def _tensor_pass_kernel(src_addrs, dtype_codes, mask_addrs, numels, chunk_tensor, chunk_start,
                        segment_of, lo, hi, mode, hist, buf_key, buf_chunk, buf_base, buf_fill,
                        nonfinite, shift, CHECK_FINITE: tl.constexpr,
                        IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of a pass over the tensors: digit histogram of the bucket, and in mode
    ``_GATHER`` the copy of the bucket's (key, chunk index) pairs into the buffer.
    With ``CHECK_FINITE`` also flags tensors with a NaN/Inf candidate."""
    c = tl.program_id(0)
    t, _, offs, inside = chunk_of(numels, chunk_tensor, chunk_start, c, CHUNK)
    s = tl.load(segment_of + t)
    state = tl.load(mode + s)
    if state <= _GATHER:
        bits, key, cand = _keys(src_addrs, dtype_codes, mask_addrs, t, offs, inside,
                                IS_SCORES, HAS_MASKS)
        in_bucket = _in_bucket(key, cand, lo, hi, s)
        _add_histogram(hist + s * _BINS, key, in_bucket, shift)
        if CHECK_FINITE:
            bad = cand & ((bits & 0x7F800000) == 0x7F800000)
            if tl.sum(bad.to(tl.int32)) > 0:
                tl.store(nonfinite + t, 1)
        if state == _GATHER:
            taken = tl.sum(in_bucket.to(tl.int64))
            start = tl.load(buf_base + s) + tl.atomic_add(buf_fill + s, taken)
            slot = start + tl.cumsum(in_bucket.to(tl.int64), 0) - 1
            tl.store(buf_key + slot, key, mask=in_bucket)
            tl.store(buf_chunk + slot, c, mask=in_bucket)


@triton.jit
def _buffer_pass_kernel(buf_key, buf_base, buf_fill, lo, hi, mode, hist, shift,
                        BLOCK: tl.constexpr):
    """One block of a pass over the compact buffer of segment ``program_id(0)``."""
    s = tl.program_id(0)
    if tl.load(mode + s) == _COMPACT:
        _, key, in_bucket = _buffer_entries(buf_key, buf_base, buf_fill, lo, hi, s, BLOCK)
        _add_histogram(hist + s * _BINS, key, in_bucket, shift)


@triton.jit
def _pick_kernel(hist, lo, hi, k, mode, cap, shift):
    """Narrow the bucket of segment ``program_id(0)`` to the digit holding its k-th largest key.

    Invariant: the bucket holds at least k candidates (k >= 0); after the pick, k counts
    the keys to keep inside the new bucket. Also advances the segment's mode.
    """
    s = tl.program_id(0)
    state = tl.load(mode + s)
    if state != _DONE:
        counts = tl.load(hist + s * _BINS + tl.arange(0, _BINS))
        at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
        wanted = tl.load(k + s)
        digit = tl.sum((at_or_above >= wanted).to(tl.int32), 0) - 1
        chosen = tl.arange(0, _BINS) == digit
        in_digit = tl.sum(tl.where(chosen, counts, 0), 0)
        wanted -= tl.sum(tl.where(chosen, at_or_above, 0), 0) - in_digit
        width = tl.full([], 1, tl.int64) << shift
        new_lo = tl.load(lo + s) + digit * width
        tl.store(lo + s, new_lo)
        tl.store(hi + s, new_lo + width - 1)
        tl.store(k + s, wanted)
        exact = (wanted == 0) | (wanted == in_digit)
        small = (state == _SCAN) & (in_digit <= tl.load(cap + s))
        state = tl.where(state == _GATHER, _COMPACT, tl.where(small, _GATHER, state))
        tl.store(mode + s, tl.where(exact, _DONE, state))


@triton.jit
def _count_tensor_ties_kernel(src_addrs, dtype_codes, mask_addrs, numels, chunk_tensor,
                              chunk_start, segment_of, lo, hi, mode, tie_count,
                              IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr,
                              CHUNK: tl.constexpr):
    """Per-chunk count of the keys in the final bucket, for segments not in the buffer."""
    c = tl.program_id(0)
    t, _, offs, inside = chunk_of(numels, chunk_tensor, chunk_start, c, CHUNK)
    s = tl.load(segment_of + t)
    if tl.load(mode + s) <= _GATHER:
        _, key, cand = _keys(src_addrs, dtype_codes, mask_addrs, t, offs, inside,
                             IS_SCORES, HAS_MASKS)
        tl.store(tie_count + c, tl.sum(_in_bucket(key, cand, lo, hi, s).to(tl.int64), 0))


@triton.jit
def _count_buffer_ties_kernel(buf_key, buf_chunk, buf_base, buf_fill, lo, hi, mode, tie_count,
                              BLOCK: tl.constexpr):
    """Per-chunk count of the keys in the final bucket, for segments in the buffer."""
    s = tl.program_id(0)
    if tl.load(mode + s) == _COMPACT:
        slot, _, tie = _buffer_entries(buf_key, buf_base, buf_fill, lo, hi, s, BLOCK)
        chunk = tl.load(buf_chunk + slot, mask=tie, other=0)
        tl.atomic_add(tie_count + chunk, tl.full([BLOCK], 1, tl.int64), mask=tie)


@triton.jit
def _write_masks_kernel(src_addrs, dtype_codes, mask_addrs, numels, chunk_tensor, chunk_start,
                        segment_of, first_chunk, lo, hi, k, ties_before, out_addrs,
                        IS_SCORES: tl.constexpr, HAS_MASKS: tl.constexpr, CHUNK: tl.constexpr):
    """New masks of one chunk: keys above the bucket, then ties of rank below k."""
    c = tl.program_id(0)
    t, _, offs, inside = chunk_of(numels, chunk_tensor, chunk_start, c, CHUNK)
    s = tl.load(segment_of + t)
    _, key, cand = _keys(src_addrs, dtype_codes, mask_addrs, t, offs, inside,
                         IS_SCORES, HAS_MASKS)
    tie = _in_bucket(key, cand, lo, hi, s)
    rank = (tl.load(ties_before + c) - tl.load(ties_before + tl.load(first_chunk + s))
            + tl.cumsum(tie.to(tl.int64), 0) - 1)
    keep = (cand & (key > tl.load(hi + s))) | (tie & (rank < tl.load(k + s)))
    out_ptr = tl.load(out_addrs + t).to(tl.pointer_type(tl.int8))
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=inside)


# ---------------------------------------------------------------------------- host
def _kept_counts(n: torch.Tensor, amount, total: int) -> torch.Tensor:
    """Candidates to keep per segment, on the device: ``n - prune_count(amount, n)``
    (an int ``amount`` above n is clamped here and reported by :func:`_raise_errors`)."""
    if isinstance(amount, numbers.Integral):
        return n - n.clamp(max=min(int(amount), total))
    return n - torch.round(n.double() * float(amount)).long()


def _raise_errors(name: str, amount, counts: list[int], nonfinite: list[int],
                  layerwise: bool) -> None:
    """The data-dependent errors of the reference, with the same messages, in the same order."""
    raise_if_nonfinite(name, nonfinite)
    if layerwise:
        for i, n in enumerate(counts):
            prune_count(amount, n, f" of weights[{i}]")
    else:
        prune_count(amount, counts[0])


@dataclass(frozen=True)
class _Layout:
    """Where the kernels find the keys: tensor tables, chunk map and segments."""
    tables: tuple         # src_addrs, dtype_codes, mask_addrs, numels, chunk_tensor, chunk_start
    num_chunks: int
    segment_of: torch.Tensor   # int64 [tensors]: segment of each tensor
    first_chunk: torch.Tensor  # int64 [segments]: first chunk of each segment
    cap: np.ndarray            # compact-buffer entries of each segment
    flags: dict                # IS_SCORES, HAS_MASKS, CHUNK, num_warps

    @property
    def buffer_grid(self) -> tuple[int, int]:
        """Programs over the compact buffer: (segment, block of COMPACT_BLOCK entries)."""
        return len(self.cap), triton.cdiv(max(int(self.cap.max()), 1), COMPACT_BLOCK)


def _layout(sources, mask_views, is_scores: bool, layerwise: bool) -> _Layout:
    device = sources[0].device
    numels = np.array([x.numel() for x in sources], dtype=np.int64)
    chunks = chunk_map(numels, CHUNK, device)
    per_tensor = (numels + CHUNK - 1) // CHUNK
    sizes = numels if layerwise else numels.sum(keepdims=True)
    tables = (address_table(sources, device),
              int64_table([_DTYPE_CODES[x.dtype] for x in sources], device),
              address_table(mask_views if mask_views is not None else sources, device),
              chunks.numels, chunks.chunk_tensor, chunks.chunk_start)
    return _Layout(
        tables, chunks.num_chunks,
        int64_table(np.arange(len(sources)) if layerwise else np.zeros(len(sources)), device),
        int64_table(np.cumsum(per_tensor) - per_tensor if layerwise else [0], device),
        np.minimum(sizes, COMPACT_BUDGET // len(sizes)),
        dict(IS_SCORES=is_scores, HAS_MASKS=mask_views is not None, CHUNK=CHUNK,
             num_warps=CHUNK_WARPS))


@dataclass(frozen=True)
class _Search:
    """Device state of the select, per segment: bucket ``[lo, hi]``, keys to keep in it (k),
    mode, candidate counts; per tensor: non-finite flags."""
    lo: torch.Tensor
    hi: torch.Tensor
    k: torch.Tensor
    mode: torch.Tensor
    counts: torch.Tensor
    nonfinite: torch.Tensor
    buffer: tuple  # buf_key (int64), buf_chunk (int32), buf_base, buf_fill


def _radix_select(layout: _Layout, amount, total: int) -> _Search:
    """Four digit passes (plus passes over the compact buffer) and picks; no host sync."""
    device = layout.tables[0].device
    segments, tensors = len(layout.cap), layout.segment_of.numel()

    def zeros(*shape, dtype=torch.int64):
        return torch.zeros(shape, dtype=dtype, device=device)

    lo, hi, mode = zeros(segments), torch.full((segments,), 2**32 - 1, device=device), zeros(segments)
    hist, nonfinite = zeros(len(_SHIFTS), segments, 256), zeros(tensors)
    entries = max(int(layout.cap.sum()), 1)
    buffer = (zeros(entries), zeros(entries, dtype=torch.int32),
              int64_table(np.cumsum(layout.cap) - layout.cap, device), zeros(segments))
    buf_key, _, buf_base, buf_fill = buffer
    cap = int64_table(layout.cap, device)
    for p, shift in enumerate(_SHIFTS):
        _tensor_pass_kernel[(layout.num_chunks,)](*layout.tables, layout.segment_of, lo, hi, mode,
                                                  hist[p], *buffer, nonfinite, shift,
                                                  CHECK_FINITE=p == 0, **layout.flags)
        if p >= 2:  # a bucket reaches the buffer in pass 1 at the earliest
            _buffer_pass_kernel[layout.buffer_grid](buf_key, buf_base, buf_fill, lo, hi, mode,
                                                    hist[p], shift, BLOCK=COMPACT_BLOCK)
        if p == 0:
            counts = hist[0].sum(1)
            k = _kept_counts(counts, amount, total)
        _pick_kernel[(segments,)](hist[p], lo, hi, k, mode, cap, shift)
    return _Search(lo, hi, k, mode, counts, nonfinite, buffer)


def _write_masks(layout: _Layout, search: _Search, out: list[torch.Tensor]) -> None:
    """Rank the ties (per-chunk counts, exclusive scan over chunks) and write the masks."""
    tie_count = torch.zeros(layout.num_chunks, dtype=torch.int64, device=search.lo.device)
    _count_tensor_ties_kernel[(layout.num_chunks,)](*layout.tables, layout.segment_of, search.lo,
                                                    search.hi, search.mode, tie_count,
                                                    **layout.flags)
    _count_buffer_ties_kernel[layout.buffer_grid](*search.buffer, search.lo, search.hi,
                                                  search.mode, tie_count, BLOCK=COMPACT_BLOCK)
    ties_before = tie_count.cumsum(0) - tie_count
    _write_masks_kernel[(layout.num_chunks,)](*layout.tables, layout.segment_of, layout.first_chunk,
                                              search.lo, search.hi, search.k, ties_before,
                                              address_table(out, search.lo.device), **layout.flags)


def _prune(weights, masks, amount, scores, layerwise: bool) -> list[torch.Tensor]:
    name, sources = ("weights", weights) if scores is None else ("scores", scores)
    sources = [dense_view(x) for x in sources]
    mask_views = None if masks is None else [dense_view(m) for m in masks]  # alive to the end
    out = [torch.empty(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    segments = len(sources) if layerwise else 1
    total = sum(x.numel() for x in sources)
    if total == 0:  # nothing to launch
        _raise_errors(name, amount, [0] * segments, [0] * len(sources), layerwise)
        return out
    layout = _layout(sources, mask_views, scores is not None, layerwise)
    search = _radix_select(layout, amount, total)
    _write_masks(layout, search, out)
    readback = torch.cat([search.counts, search.nonfinite]).tolist()  # the one host sync
    _raise_errors(name, amount, readback[:segments], readback[segments:], layerwise)
    return out


def global_magnitude_prune(weights, masks, amount, scores=None) -> list[torch.Tensor]:
    """Triton backend of :func:`swamp_kernels.global_magnitude_prune` (validated input)."""
    return _prune(weights, masks, amount, scores, layerwise=False)


def layerwise_magnitude_prune(weights, masks, amount, scores=None) -> list[torch.Tensor]:
    """Triton backend of :func:`swamp_kernels.layerwise_magnitude_prune` (validated input)."""
    return _prune(weights, masks, amount, scores, layerwise=True)
