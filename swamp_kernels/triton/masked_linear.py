"""``masked_linear`` in Triton: ``F.linear(x, weight * mask, bias)`` with autograd.

One GEMM kernel serves all three products, each reading its operands through strides
(transposes are views, never copies), and no masked copy of the weight is ever made:

- forward  ``y  = x @ (W * mask)^T + b``  the mask tile is loaded with the weight tile
  and applied with ``tl.where`` (masked NaN/Inf never reach the sum); bias in the epilogue;
- ``grad_x = g @ (W * mask)``           the same mask-on-load, weight read untransposed;
- ``grad_W = (g^T @ x) * mask``          the mask applied in the epilogue: exactly 0 where masked;
- ``grad_b = g.sum(0)`` in torch.

Tiles accumulate in float32 and are stored in the input dtype. float32 inputs use TF32
tensor cores on the GPU when ``torch.get_float32_matmul_precision()`` allows it. Autotuning
times only configs that fit the H100's shared memory without spilling (:func:`_worth_timing`).
The Triton interpreter (``TRITON_INTERPRET=1``) multiplies bfloat16 tiles as raw bits, so
there tiles are upcast to float32 and multiplied exactly; it also gets a single small tile
config, so autotuning costs nothing on the CPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from swamp_kernels._dispatch import triton_interpreting

_INTERPRETING = triton_interpreting()


def _config(block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


_GPU_CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
    _config(32, 64, 64, 4, 4),
]
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2})]
_SHARED_MEMORY = 232448     # bytes per block on an H100 (sm_90, 227 KiB)
_MASKED_B_TILE = 128 * 128  # largest output tile when the B tile passes through registers
_IEEE_FP32_TILE = 64 * 128  # largest output tile of float32 products without tensor cores


def _worth_timing(configs, named_args, **kwargs):
    """The configs the autotuner times for a call (``early_config_prune``): the pipelined A and
    B tiles fit the shared memory, and tiles stay small enough not to spill registers where
    the compiled kernel needs more of them (found by compiling every config for sm_90:
    tests/test_triton_aot.py): a masked B tile is loaded through registers to apply its
    mask, and IEEE float32 dots run on CUDA cores. Keeps at least the smallest config."""
    element = named_args["a_ptr"].element_size()
    largest_tile = min(_MASKED_B_TILE if kwargs["MASK_B"] else math.inf,
                       _IEEE_FP32_TILE if element == 4 and kwargs["PRECISION"] == "ieee" else math.inf)

    def fits(config):
        m, n, k = (config.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        return config.num_stages * (m * k + k * n) * element <= _SHARED_MEMORY and m * n <= largest_tile

    return [config for config in configs if fits(config)] or configs[-1:]


# The operand strides are part of the key: the input-gradient product has the forward's M, N, K
# and MASK_B but reads B untransposed, so it is tuned on its own rather than given the forward's tile.
@triton.autotune(configs=_INTERPRETER_CONFIGS if _INTERPRETING else _GPU_CONFIGS,
                 key=["M", "N", "K", "MASK_B", "MASK_C", "stride_ak", "stride_bk"],
                 prune_configs_by={"early_config_prune": _worth_timing})
@triton.jit
def _masked_matmul_kernel(a_ptr, b_ptr, mask_ptr, bias_ptr, c_ptr, M, N, K,
                          stride_am, stride_ak, stride_bk, stride_bn,
                          stride_mask0, stride_mask1, stride_cm, stride_cn, stride_bias,
                          MASK_B: tl.constexpr, MASK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ where(mask, B, 0)[K, N] (MASK_B) or where(mask, A @ B, 0) (MASK_C), + bias[N].

    The mask is indexed (k, n) with MASK_B and (m, n) with MASK_C through its two strides.
    """
    # Grouped tile order: GROUP_M row tiles sweep the column tiles together (L2 reuse).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_in_group = GROUP_M * tiles_n
    first_m = (pid // tiles_in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_in_group) % group_rows
    pid_n = (pid % tiles_in_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge re-read valid ones (wrapped); their results are not stored.
    am = (rm % M).to(tl.int64)
    bn = (rn % N).to(tl.int64)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + bn[None, :] * stride_bn
    if MASK_B:
        mask_ptrs = mask_ptr + rk[:, None] * stride_mask0 + bn[None, :] * stride_mask1

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_inside = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_inside[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_inside[:, None], other=0.0)
        if MASK_B:
            keep = tl.load(mask_ptrs, mask=k_inside[:, None], other=0)
            b = tl.where(keep, b, tl.zeros_like(b))
            mask_ptrs += BLOCK_K * stride_mask0
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + bn * stride_bias).to(tl.float32)[None, :]
    cm = rm.to(tl.int64)
    cn = rn.to(tl.int64)
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if MASK_C:
        keep = tl.load(mask_ptr + cm[:, None] * stride_mask0 + cn[None, :] * stride_mask1,
                       mask=inside, other=0)
        acc = tl.where(keep, acc, 0.0)
    tl.store(c_ptr + cm[:, None] * stride_cm + cn[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=inside)


def _fp32_precision() -> str:
    """TF32 for float32 inputs exactly when torch's matmuls may use it (as ``F.linear`` does)."""
    allow_tf32 = torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allow_tf32 and not _INTERPRETING else "ieee"


def _masked_matmul(a: torch.Tensor, b: torch.Tensor, *, b_mask: torch.Tensor | None = None,
                   c_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ where(b_mask, b, 0)`` or ``where(c_mask, a @ b, 0)``, plus ``bias``: a new contiguous [M, N].

    ``a`` [M, K], ``b`` [K, N] and ``bias`` [N] share a float dtype and may have any strides; exactly one
    of ``b_mask`` (shape of ``b``) and ``c_mask`` ([M, N]) is given.
    """
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if m == 0 or n == 0 or k == 0:  # nothing to multiply: an empty sum is 0
        c.zero_()
        return c if bias is None else c.add_(bias)
    mask = b_mask if b_mask is not None else c_mask

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _masked_matmul_kernel[grid](
        a, b, mask, bias, c, m, n, k, *a.stride(), *b.stride(), *mask.stride(), *c.stride(),
        0 if bias is None else bias.stride(0),
        MASK_B=b_mask is not None, MASK_C=c_mask is not None, HAS_BIAS=bias is not None,
        UPCAST=_INTERPRETING, PRECISION=_fp32_precision() if a.dtype == torch.float32 else "ieee")
    return c


class MaskedLinearFunction(torch.autograd.Function):
    """Autograd for ``F.linear(x, weight * mask, bias)``; ``mask`` gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        out = _masked_matmul(x2d, weight.t(), b_mask=mask.t(), bias=bias)
        ctx.save_for_backward(x2d, weight, mask)
        ctx.x_shape = x.shape
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, weight, mask = ctx.saved_tensors
        g = grad_out.reshape(x2d.shape[0], weight.shape[0])
        need_x, need_w, _, need_b = ctx.needs_input_grad
        grad_x = _masked_matmul(g, weight, b_mask=mask).reshape(ctx.x_shape) if need_x else None
        grad_w = _masked_matmul(g.t(), x2d, c_mask=mask) if need_w else None
        grad_b = g.sum(0) if need_b else None
        return grad_x, grad_w, None, grad_b


def _autocast(x, weight, bias):
    """Cast to the autocast dtype when autocast is on for ``x``'s device, as ``F.linear`` does."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _check_operands(x, weight, bias) -> None:
    """``weight`` [N, K]; ``x`` [..., K] and ``bias`` [N] on its device and in its dtype."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    for name, t in (("x", x), ("bias", bias)):
        if t is None:
            continue
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}; "
                            "masked_linear needs one dtype (or run under torch.autocast)")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {k}] for weight of shape ({n}, {k})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for weight of shape ({n}, {k})")


def masked_linear(x, weight, mask, bias=None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)``; ``weight`` float, ``mask`` bool of its shape (validated)."""
    x, weight, bias = _autocast(x, weight, bias)
    _check_operands(x, weight, bias)
    return MaskedLinearFunction.apply(x, weight, mask, bias)
