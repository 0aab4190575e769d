"""Turning one particle's (or the average's) state into a network: BN recomputation and accuracy."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["network", "recompute_bn_", "test_probabilities", "accuracy"]


def network(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` (masks included) holding ``state`` (parameters and buffers by name)."""
    net = copy.deepcopy(model)
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)
    return net.eval()


def recompute_bn_(net: nn.Module, data, batch_size: int) -> nn.Module:
    """In place: BatchNorm running statistics recomputed as exact averages over the training set.

    Needed after any weight averaging (SWA, particle averaging): the averaged weights never
    produced the stored statistics. Un-augmented training data, batches in order.
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
        for x, _ in data.eval_batches("train", batch_size):
            net(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return net.eval()


def test_probabilities(net: nn.Module, data, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax outputs on the test set, labels)."""
    net.eval()
    probs, labels = [], []
    with torch.no_grad():
        for x, y in data.eval_batches("test", batch_size):
            probs.append(net(x).float().softmax(-1))
            labels.append(y)
    return torch.cat(probs), torch.cat(labels)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return (probs.argmax(-1) == labels).float().mean().item()
