"""``masked_linear`` in Triton: ``F.linear(x, weight * mask, bias)`` with autograd.

One GEMM kernel serves all three products, each reading its operands and writing its result
through strides (transposes are views, never copies), and no masked copy of the weight is ever made:

- forward  ``y^T    = (W * mask) @ x^T + b``  the mask tile is loaded with the weight tile and
  applied with ``tl.where`` (masked NaN/Inf never reach the sum); bias in the epilogue;
- ``grad_x^T = (W * mask)^T @ g^T``           the same mask-on-load, weight read transposed;
- ``grad_W   = (g^T @ x) * mask``              the mask applied in the epilogue: exactly 0 where masked;
- ``grad_b   = g.sum(0)`` in torch.

The masked weight is always the left operand A. On Hopper the tensor cores (wgmma) take A from
registers, where the mask is applied, and B from shared memory; a masked B would have to be
written back to shared memory every K step (an extra store and fence per tile, and more shared
memory and registers; tests/test_triton_aot.py checks the compiled sm_90 code for this).

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
_IEEE_FP32_TILE = 64 * 128  # largest output tile of float32 products without tensor cores


def _worth_timing(configs, named_args, **kwargs):
    """The configs the autotuner times for a call (``early_config_prune``): the pipelined A and
    B tiles fit the shared memory, and IEEE float32 tiles, whose dots run on CUDA cores, stay
    small enough not to spill registers (found by compiling every config for sm_90:
    tests/test_triton_aot.py). Keeps at least the smallest config."""
    element = named_args["a_ptr"].element_size()
    largest_tile = _IEEE_FP32_TILE if element == 4 and kwargs["PRECISION"] == "ieee" else math.inf

    def fits(config):
        m, n, k = (config.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        return config.num_stages * (m * k + k * n) * element <= _SHARED_MEMORY and m * n <= largest_tile

    return [config for config in configs if fits(config)] or configs[-1:]


# The operand strides are part of the key: for a square weight the input-gradient product has the
# forward's M, N, K and MASK_A but reads A transposed, so it is tuned on its own.
@triton.autotune(configs=_INTERPRETER_CONFIGS if _INTERPRETING else _GPU_CONFIGS,
                 key=["M", "N", "K", "MASK_A", "MASK_C", "stride_am", "stride_ak"],
                 prune_configs_by={"early_config_prune": _worth_timing})
@triton.jit
def _masked_matmul_kernel(a_ptr, b_ptr, mask_ptr, bias_ptr, c_ptr, M, N, K,
                          stride_am, stride_ak, stride_bk, stride_bn,
                          stride_mask0, stride_mask1, stride_cm, stride_cn, stride_bias,
                          MASK_A: tl.constexpr, MASK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """C[M, N] = where(mask, A, 0)[M, K] @ B[K, N] (MASK_A) or where(mask, A @ B, 0) (MASK_C), + bias[M]
    (one value per row of C).

    The mask is indexed (m, k) with MASK_A and (m, n) with MASK_C through its two strides.
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
    if MASK_A:
        mask_ptrs = mask_ptr + am[:, None] * stride_mask0 + rk[None, :] * stride_mask1

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_inside = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_inside[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_inside[:, None], other=0.0)
        if MASK_A:
            keep = tl.load(mask_ptrs, mask=k_inside[None, :], other=0)
            a = tl.where(keep, a, tl.zeros_like(a))
            mask_ptrs += BLOCK_K * stride_mask1
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + am * stride_bias).to(tl.float32)[:, None]
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


def _masked_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, a_mask: torch.Tensor | None = None,
                   c_mask: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """``out = where(a_mask, a, 0) @ b`` or ``out = where(c_mask, a @ b, 0)``, plus ``bias[:, None]``.

    ``a`` [M, K], ``b`` [K, N], ``out`` [M, N] and ``bias`` [M] share a float dtype and may have any
    strides (``out`` must not overlap the others); exactly one of ``a_mask`` (shape of ``a``) and
    ``c_mask`` ([M, N]) is given.
    """
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0 or k == 0:  # nothing to multiply: an empty sum is 0
        out.zero_()
        if bias is not None:
            out.add_(bias[:, None])
        return
    mask = a_mask if a_mask is not None else c_mask

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _masked_matmul_kernel[grid](
        a, b, mask, bias, out, m, n, k, *a.stride(), *b.stride(), *mask.stride(), *out.stride(),
        0 if bias is None else bias.stride(0),
        MASK_A=a_mask is not None, MASK_C=c_mask is not None, HAS_BIAS=bias is not None,
        UPCAST=_INTERPRETING, PRECISION=_fp32_precision() if a.dtype == torch.float32 else "ieee")


class MaskedLinearFunction(torch.autograd.Function):
    """Autograd for ``F.linear(x, weight * mask, bias)``; ``mask`` gets no gradient; differentiable
    once (double backward raises: use the torch backend for gradient penalties).

    Outputs and input gradients are contiguous; the kernel writes their transposes through strides.
    """

    @staticmethod
    def forward(ctx, x, weight, mask, bias):
        x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        out = x.new_empty(*x.shape[:-1], weight.shape[0])   # returned itself, not a view: in-place ops may follow
        _masked_matmul(weight, x2d.t(), out.view(x2d.shape[0], weight.shape[0]).t(), a_mask=mask, bias=bias)
        ctx.save_for_backward(x2d, weight, mask)
        ctx.x_shape = x.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable   # a second derivative raises instead of dropping terms
    def backward(ctx, grad_out):
        x2d, weight, mask = ctx.saved_tensors
        g = grad_out.reshape(x2d.shape[0], weight.shape[0])
        need_x, need_w, _, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.empty_like(x2d, memory_format=torch.contiguous_format)
            _masked_matmul(weight.t(), g.t(), grad_x.t(), a_mask=mask.t())
            grad_x = grad_x.reshape(ctx.x_shape)
        if need_w:
            grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            _masked_matmul(g.t(), x2d, grad_w, c_mask=mask)
        if need_b:
            grad_b = g.sum(0)
        return grad_x, grad_w, None, grad_b


def _autocast(x, weight, bias):
    """Cast to the autocast dtype when autocast is on for ``x``'s device, as ``F.linear`` does."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def masked_linear(x, weight, mask, bias=None) -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)``; operands validated (``swamp_kernels.masked_linear``)."""
    x, weight, bias = _autocast(x, weight, bias)
    return MaskedLinearFunction.apply(x, weight, mask, bias)
