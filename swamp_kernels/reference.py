"""Pure-PyTorch implementations of every public op: the oracle and the CPU path.

Inputs arrive validated (see ``swamp_kernels/__init__.py``). These functions favour
obvious correctness over speed; the Triton and CUDA backends must match them
(bitwise for masks, to rounding for floating-point results).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from swamp_kernels._validate import finite_candidates, prune_count


# --------------------------------------------------------------------------- pruning
def _keys(weights, scores) -> list[torch.Tensor]:
    """Flat float32 keys in logical row-major order: |w| or the scores, -0.0 folded to +0.0.

    The conversion to float32 is exact for float16/bfloat16, so comparisons stay exact.
    """
    source = scores if scores is not None else [w.abs() for w in weights]
    return [s.reshape(-1).float() + 0.0 for s in source]


def _candidates(keys, masks) -> list[torch.Tensor]:
    if masks is None:
        return [torch.ones_like(k, dtype=torch.bool) for k in keys]
    return [m.reshape(-1) for m in masks]


def _keep_largest(keys, cands, n_prune: int) -> list[torch.Tensor]:
    """Flat keep-masks: the largest ``n - n_prune`` candidates, ties to the lowest index.

    A selection (``kthvalue``) finds the threshold t; every candidate above t is kept,
    then the candidates equal to t are kept in global index order until the count is met.
    """
    n = sum(int(c.sum()) for c in cands)
    n_keep = n - n_prune
    if n_keep == 0:
        return [torch.zeros_like(c) for c in cands]
    if n_prune == 0:
        return [c.clone() for c in cands]
    values = torch.cat([k[c] for k, c in zip(keys, cands)])
    threshold = torch.kthvalue(values, n - n_keep + 1).values
    del values
    above = [c & (k > threshold) for k, c in zip(keys, cands)]
    ties_left = n_keep - sum(int(a.sum()) for a in above)
    out = []
    for k, c, a in zip(keys, cands, above):
        tie = c & (k == threshold)
        rank = torch.cumsum(tie, 0, dtype=torch.int64 if tie.numel() >= 2**31 else torch.int32)
        keep_tie = tie & (rank <= ties_left)
        ties_left -= int(keep_tie.sum())
        out.append(a | keep_tie)
    return out


def _checked_keys(weights, masks, scores):
    finite_candidates("scores" if scores is not None else "weights",
                      scores if scores is not None else weights, masks)
    keys = _keys(weights, scores)
    return keys, _candidates(keys, masks)


def global_magnitude_prune(weights, masks, amount, scores=None) -> list[torch.Tensor]:
    keys, cands = _checked_keys(weights, masks, scores)
    n_prune = prune_count(amount, sum(int(c.sum()) for c in cands))
    keep = _keep_largest(keys, cands, n_prune)
    return [k.reshape(w.shape) for k, w in zip(keep, weights)]


def layerwise_magnitude_prune(weights, masks, amount, scores=None) -> list[torch.Tensor]:
    keys, cands = _checked_keys(weights, masks, scores)
    out = []
    for i, (k, c, w) in enumerate(zip(keys, cands, weights)):
        n_prune = prune_count(amount, int(c.sum()), f" of weights[{i}]")
        out.append(_keep_largest([k], [c], n_prune)[0].reshape(w.shape))
    return out


# ------------------------------------------------------------------ particles / SWA
def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _mean(p: torch.Tensor) -> torch.Tensor:
    return p.float().sum(0) / p.shape[0]


def particle_average(params, masks=None) -> list[torch.Tensor]:
    masks = masks or [None] * len(params)
    return [_masked(_mean(p), m).to(p.dtype) for p, m in zip(params, masks)]


def swa_update_(swa, params, n_averaged: int, masks=None) -> None:
    masks = masks or [None] * len(params)
    for s, p, m in zip(swa, params, masks):
        mean = _mean(p)
        if n_averaged > 0:
            current = s.float()
            mean = current + (mean - current) / (n_averaged + 1)
        s.copy_(_masked(mean, m))


def apply_masks_(tensors, masks) -> None:
    for t, m in zip(tensors, masks):
        t.masked_fill_(~m, 0)


# ------------------------------------------------------------------------ optimizer
def masked_sgd_step_(params, grads, momentum_buffers, masks, *, lr, momentum=0.0,
                     dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False) -> None:
    masks = masks or [None] * len(params)
    for i, (p, g, m) in enumerate(zip(params, grads, masks)):
        d_p = _masked(g.to(p.dtype), m)
        if maximize:
            d_p = -d_p
        if weight_decay != 0:
            d_p = d_p.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = d_p.clone()
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d_p, alpha=-lr)
        if m is not None:
            p.masked_fill_(~m, 0)


# ---------------------------------------------------------------------------- layers
def masked_linear(x, weight, mask, bias=None) -> torch.Tensor:
    return F.linear(x, _masked(weight, mask), bias)


def masked_conv2d(x, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    return F.conv2d(x, _masked(weight, mask), bias, stride, padding, dilation, groups)


OPS = {
    "global_magnitude_prune": global_magnitude_prune,
    "layerwise_magnitude_prune": layerwise_magnitude_prune,
    "particle_average": particle_average,
    "swa_update_": swa_update_,
    "apply_masks_": apply_masks_,
    "masked_sgd_step_": masked_sgd_step_,
    "masked_linear": masked_linear,
    "masked_conv2d": masked_conv2d,
}
