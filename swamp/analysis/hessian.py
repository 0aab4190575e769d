"""Curvature of the loss at a model's weights, by Hessian-vector products (double backward).

The loss is the mean over ``batches`` of ``loss_fn(model(x), y)``, evaluated in eval mode (BatchNorm
uses its running statistics) so it is a fixed function of the parameters. With ``masks`` (the dict
:func:`swamp.masks` returns, weight name -> bool), vectors are projected onto the unpruned
coordinates before and after every product: the operator is the Hessian's principal submatrix
on those coordinates.
"""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

__all__ = ["top_hessian_eigenvalues", "hessian_trace", "TopEigenvalues", "TraceEstimate"]


class TopEigenvalues(NamedTuple):
    values: list[float]   # descending
    converged: bool       # False: the iterations ended first (they warned): the values may be too low


class TraceEstimate(NamedTuple):
    trace: float                   # the mean of the probes' z^T H z
    standard_error: float | None   # of that mean, from the probes' spread (None for one probe)


def _projection(model: nn.Module, params: list[torch.Tensor], masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The flat 0/1 vector over ``params`` that keeps what ``masks`` keeps. A mask names its
    weight by any of its names (a tied weight has several); masks of one weight combine (&)."""
    index = {id(p): i for i, p in enumerate(params)}
    kept: dict[int, torch.Tensor] = {}
    unknown = []
    for name, mask in masks.items():
        try:
            i = index.get(id(model.get_parameter(name)))
        except AttributeError:
            i = None
        if i is None:
            unknown.append(name)
            continue
        if tuple(mask.shape) != tuple(params[i].shape):
            raise ValueError(f"masks[{name!r}] has shape {tuple(mask.shape)}, expected {tuple(params[i].shape)}")
        mask = mask.to(params[i].device, torch.bool)
        kept[i] = mask if i not in kept else kept[i] & mask
    if unknown:
        raise ValueError(f"masks has keys {unknown[:6]} that are no trainable parameters of the model")
    return torch.cat([kept.get(i, torch.ones_like(p, dtype=torch.bool)).reshape(-1)
                      for i, p in enumerate(params)]).to(params[0].dtype)


class _HessianOperator:
    """``v -> H v`` on flat vectors over ``model``'s trainable parameters, projected by ``masks``."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable, masks: Mapping | None):
        self.model, self.loss_fn, self.batches = model, loss_fn, list(batches)
        if not self.batches:
            raise ValueError("batches is empty; the Hessian needs at least one (inputs, targets) batch")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.projection = _projection(model, self.params, masks) if masks else None
        self.size = sum(p.numel() for p in self.params)
        self.dimension = int(self.projection.sum()) if masks else self.size

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.projection is None else v * self.projection

    def random(self, generator: torch.Generator, rademacher: bool) -> torch.Tensor:
        v = (torch.randint(0, 2, (self.size,), generator=generator) * 2 - 1).float() if rademacher \
            else torch.randn(self.size, generator=generator)
        return self.project(v.to(self.params[0].device, self.params[0].dtype))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = self.project(v)
        pieces = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in self.params]), self.params)]
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros_like(v)
        try:
            for x, y in self.batches:
                loss = self.loss_fn(self.model(x), y)
                grads = torch.autograd.grad(loss, self.params, create_graph=True)
                dot = sum((g * t).sum() for g, t in zip(grads, pieces))
                hv = torch.autograd.grad(dot, self.params, allow_unused=True)
                total += torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                                    for h, p in zip(hv, self.params)]).detach()
        finally:
            self.model.train(was_training)
        return self.project(total / len(self.batches))


def top_hessian_eigenvalues(model: nn.Module, loss_fn: Callable, batches: Iterable, k: int = 1,
                            masks: Mapping[str, torch.Tensor] | None = None, iters: int = 100,
                            tol: float = 1e-4, seed: int = 0) -> TopEigenvalues:
    """The ``k`` largest (algebraic) eigenvalues of the loss Hessian, in descending order, and
    whether they converged (else a warning says so too).

    Lanczos with full reorthogonalisation from a seeded Gaussian start, at most ``iters`` Hessian-
    vector products (so it keeps up to ``iters`` parameter-sized vectors). Stops when every one of
    the top ``k`` Ritz pairs has residual ``||H y - theta y|| <= tol * |theta|``, or when the
    vectors span the whole (unpruned) space (then the values are exact). A Krylov space holds one
    copy of a repeated eigenvalue: where it is exhausted first (an invariant subspace), Lanczos
    restarts from a new random vector orthogonal to it and finds the other copies; in a large
    space that the iterations do not exhaust, further copies of a repeated top eigenvalue can be
    missed without warning (the next distinct eigenvalue takes their place).
    """
    operator = _HessianOperator(model, loss_fn, batches, masks)
    if not 1 <= k <= operator.dimension:
        raise ValueError(f"k must lie in [1, {operator.dimension}] (unpruned parameters), got {k}")
    if iters < k:
        raise ValueError(f"iters must be >= k ({k}), got {iters}")
    generator = torch.Generator().manual_seed(seed)
    v = operator.random(generator, rademacher=False)
    basis = [v / v.norm()]
    alphas, betas = [], []
    theta, residuals, converged, invariant = np.zeros(0), [float("nan")], False, False
    for j in range(iters):
        w = operator(basis[j])
        alphas.append(float(w @ basis[j]))
        w = _orthogonalised(w, basis)
        beta = float(w.norm())
        tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, vectors = np.linalg.eigh(tridiagonal)
        if len(basis) == operator.dimension:   # the whole space: the values are exact
            converged = True
            break
        top = np.argsort(theta)[::-1][:k]
        residuals = [abs(beta * vectors[-1, i]) / max(abs(theta[i]), 1e-300) for i in top]
        converged = bool(len(top) == k and max(residuals) <= tol)
        invariant = beta <= 1e-10 * max(1.0, np.abs(theta).max())
        if converged and (k == 1 or not invariant):   # (the top one is exact at an invariant subspace)
            break
        if invariant:   # restart beside it: another copy of a repeated eigenvalue may lie outside
            w = _orthogonalised(operator.random(generator, rademacher=False), basis)
            betas.append(0.0)
            basis.append(w / w.norm())
            continue
        betas.append(beta)
        basis.append(w / beta)
    else:
        if not converged:
            warnings.warn(f"top_hessian_eigenvalues: {iters} Lanczos iterations ended before the top {k} "
                          f"eigenvalues converged (relative residual up to {max(residuals):.2g} > tol {tol:g}): "
                          "they may be too low; raise iters", stacklevel=2)
        elif invariant:
            converged = False
            warnings.warn(f"top_hessian_eigenvalues: {iters} Lanczos iterations ended searching for more copies "
                          f"of repeated eigenvalues among the top {k}: some may be missing; raise iters",
                          stacklevel=2)
    return TopEigenvalues(sorted(theta.tolist(), reverse=True)[:k], converged)


def _orthogonalised(w: torch.Tensor, basis: list[torch.Tensor]) -> torch.Tensor:
    """``w`` minus its projection on the orthonormal ``basis`` (twice: enough in floating point)."""
    stacked = torch.stack(basis)
    for _ in range(2):
        w = w - stacked.T @ (stacked @ w)
    return w


def hessian_trace(model: nn.Module, loss_fn: Callable, batches: Iterable,
                  masks: Mapping[str, torch.Tensor] | None = None, samples: int = 100,
                  seed: int = 0) -> TraceEstimate:
    """Hutchinson's estimate of the Hessian's trace: the mean of ``z^T H z`` over ``samples``
    Rademacher probes ``z`` from a generator seeded by ``seed`` (zero on pruned coordinates, so
    it estimates the trace of the masked principal submatrix), with its standard error. Unbiased;
    its variance is ``2 * sum_{i != j} H_ij^2 / samples`` (exact when H is diagonal)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    operator = _HessianOperator(model, loss_fn, batches, masks)
    generator = torch.Generator().manual_seed(seed)
    probes = []
    for _ in range(samples):
        z = operator.random(generator, rademacher=True)
        probes.append(float(z @ operator(z)))
    error = statistics.stdev(probes) / math.sqrt(samples) if samples > 1 else None
    return TraceEstimate(statistics.mean(probes), error)
