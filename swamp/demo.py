"""`make demo`: a small IMP + SWAMP run on scikit-learn's bundled digits, built from the public ops.

Every level trains P particles of an MLP from the rewind point with different batch
orders (masked_sgd_step_), folds them into a running SWA average (swa_update_), prunes
20% of the remaining weights by global magnitude (global_magnitude_prune), and rewinds
the survivors to their initial values (rewind point 0).
Runs on the CPU in seconds; prints one table row per level.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import swamp_kernels as sk

HIDDEN = (128, 64)


def load_data(seed: int):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:360], order[360:]
    return (x[train], y[train]), (x[test], y[test])


def init_mlp(sizes, generator) -> list[torch.Tensor]:
    """[W1, b1, W2, b2, ...] with Kaiming-uniform weights and zero biases."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = (6.0 / fan_in) ** 0.5
        params += [(torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound,
                   torch.zeros(fan_out)]
    return params


def forward(params, x):
    for i in range(0, len(params), 2):
        x = F.linear(x, params[i], params[i + 1])
        if i + 2 < len(params):
            x = F.relu(x)
    return x


def accuracy(params, data) -> float:
    x, y = data
    with torch.no_grad():
        return (forward(params, x).argmax(1) == y).float().mean().item()


def train_particle(start, masks, data, *, epochs, lr, seed, swa_from):
    """SGD with momentum on masked weights; returns the SWA average over the last epochs."""
    params = [p.clone().requires_grad_() for p in start]
    buffers = [None] * len(params)
    swa = [torch.zeros_like(p) for p in params]
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = F.cross_entropy(forward(params, x[batch]), y[batch])
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                sk.masked_sgd_step_(params, list(grads), buffers, masks, lr=lr, momentum=0.9,
                                    weight_decay=1e-4)
        if epoch >= swa_from:
            with torch.no_grad():
                sk.swa_update_(swa, [p.detach()[None] for p in params], epoch - swa_from, masks)
    return swa


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, default=10)
    parser.add_argument("--particles", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, test = load_data(args.seed)
    sizes = [train[0].shape[1], *HIDDEN, 10]
    rewind = init_mlp(sizes, torch.Generator().manual_seed(args.seed))
    masks = [torch.ones_like(p, dtype=torch.bool) if p.dim() == 2 else None for p in rewind]
    weight_idx = [i for i, p in enumerate(rewind) if p.dim() == 2]
    total = sum(rewind[i].numel() for i in weight_idx)
    print(f"backends available: {', '.join(sk.available_backends())}")
    print("| level | density | SWAMP accuracy | particle accuracies |")
    print("|---|---|---|---|")
    for level in range(args.levels + 1):
        particles = [train_particle(rewind, masks, train, epochs=args.epochs, lr=0.05,
                                    seed=args.seed * 1000 + level * 10 + p,
                                    swa_from=args.epochs * 3 // 4)
                     for p in range(args.particles)]
        averaged = sk.particle_average([torch.stack(ps) for ps in zip(*particles)], masks)
        density = sum(int(masks[i].sum()) for i in weight_idx) / total
        particle_acc = ", ".join(f"{accuracy(p, test):.3f}" for p in particles)
        print(f"| {level} | {density:.3f} | {accuracy(averaged, test):.3f} | {particle_acc} |")
        new = sk.global_magnitude_prune([averaged[i] for i in weight_idx],
                                        [masks[i] for i in weight_idx], 0.2)
        for i, m in zip(weight_idx, new):
            masks[i] = m
        rewind = [torch.where(m, p, 0) if m is not None else p for p, m in zip(rewind, masks)]


if __name__ == "__main__":
    main()
