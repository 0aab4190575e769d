"""Turning one particle's (or the average's) state into a network: BN recomputation and accuracy.

Test evaluation may be split over the ranks of a :class:`Group`: each takes every n-th test
batch (``shard``), counts its correct predictions, and one all-reduce of the counts gives the
accuracy on the whole test set, exactly that of a single process.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from swamp.distributed import Group

__all__ = ["SPLITS", "checked_split", "network", "recompute_bn_", "probabilities", "correct", "accuracy", "accuracies",
           "test_accuracy"]

SPLITS = ("test", "train")   # what eval_batches serves


def checked_split(split: str) -> str:
    """``split`` if it is one of :data:`SPLITS`, else ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def network(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` (masks included) holding ``state`` (parameters and buffers by name; a
    tensor several modules share under any of its names, as a state_dict lists it)."""
    net = copy.deepcopy(model)
    tensors = {**dict(net.named_parameters(remove_duplicate=False)), **dict(net.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)
    return net.eval()


def recompute_bn_(net: nn.Module, data, batch_size: int, group: Group = Group.single()) -> nn.Module:
    """In place: BatchNorm running statistics recomputed as exact averages over the training set.

    Needed after any weight averaging (SWA, particle averaging): the averaged weights never
    produced the stored statistics. Un-augmented training data, batches in order; the
    statistics are the mean over batches of each batch's mean and variance. The ranks of
    ``group`` (all holding ``net``) take every n-th batch each and end with the same statistics.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return net
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        for x, _ in data.eval_batches("train", batch_size, shard=(group.index, group.size)):
            net(x)
        _combine_ranks_(norms, group)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return net.eval()


def _combine_ranks_(norms, group: Group) -> None:
    """Each rank's per-batch averages -> the average over all ranks' batches."""
    if group.size == 1:
        return
    counts = [m.num_batches_tracked.to(m.running_mean.dtype) for m in norms]
    sums = [t for m, n in zip(norms, counts) for t in (m.running_mean * n, m.running_var * n)]
    group.all_reduce_([*sums, *counts])
    for i, m in enumerate(norms):
        m.running_mean.copy_(sums[2 * i] / counts[i])
        m.running_var.copy_(sums[2 * i + 1] / counts[i])
        m.num_batches_tracked.copy_(counts[i])


def probabilities(net: nn.Module, data, batch_size: int, split: str = "test",
                  shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax outputs ``[N, classes]``, labels ``[N]``) on this ``shard``'s un-augmented batches
    of ``split``, "test" or "train" (``data.eval_batches``); ``N = 0`` when the shard has no batch."""
    checked_split(split)
    net.eval()
    probs = [torch.empty(0, data.num_classes, device=data.device)]
    labels = [torch.empty(0, dtype=torch.long, device=data.device)]
    with torch.no_grad():
        for x, y in data.eval_batches(split, batch_size, shard=shard):
            probs.append(net(x).float().softmax(-1))
            labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def correct(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of rows whose argmax equals the label (an int64 scalar on their device)."""
    return (probs.argmax(-1) == labels).sum()


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return accuracies(correct(probs, labels).reshape(1), len(labels))[0]


def accuracies(counts: torch.Tensor, examples: int, group: Group = Group.single()) -> list[float]:
    """The accuracy of each entry of ``counts`` (correct predictions among this rank's
    ``examples``), counts and examples summed over ``group`` (one all-reduce). The quotient
    is taken in float32, as the mean of a float32 0/1 vector."""
    totals = torch.cat([counts.reshape(-1), counts.new_tensor([examples])])
    group.all_reduce_([totals])
    return (totals[:-1].float() / totals[-1].float()).tolist()


def test_accuracy(net: nn.Module, data, batch_size: int, group: Group = Group.single()) -> float:
    """Accuracy on the whole test set, its batches split over the ranks of ``group``."""
    probs, labels = probabilities(net, data, batch_size, shard=(group.index, group.size))
    return accuracies(correct(probs, labels).reshape(1), len(labels), group)[0]
