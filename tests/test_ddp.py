"""DDP over gloo with 2 CPU processes: masks and weights stay identical on both ranks.

Each rank trains on its own data with AdamW (weight decay); after 4 steps both ranks prune
half the weights by global magnitude (the weights are identical, so are the masks).
"""
import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import swamp
import swamp_kernels as sk

WORLD, STEPS, PRUNE_AT, TIMEOUT_S = 2, 10, 4, 180


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 4))


def _train(rank: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = swamp.sparsify(_model())
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=0.05, weight_decay=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        if step == PRUNE_AT:
            names, old = zip(*swamp.masks(model).items())
            new = sk.global_magnitude_prune([model.get_parameter(n) for n in names], list(old), 0.5)
            swamp.set_masks(model, dict(zip(names, new)))
        x, y = torch.randn(4, 3, 7, 7, generator=data), torch.randint(4, (4,), generator=data)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    torch.save(model.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_gloo_two_processes(tmp_path):
    context = mp.start_processes(_train, args=(str(tmp_path / "rendezvous"), str(tmp_path)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert list(states[0]) == list(states[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"{key} differs between ranks"
    masks = {k: v for k, v in states[0].items() if k.endswith("weight_mask")}
    assert len(masks) == 3
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == sum(m.numel() for m in masks.values()) // 2
    for key, mask in masks.items():
        weight = states[0][key.removesuffix("_mask")]
        assert torch.count_nonzero(weight[~mask]) == 0
        assert torch.count_nonzero(weight[mask]) == mask.sum()


FSDP_SCRIPT = """
import sys, torch, torch.distributed as dist, swamp
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = swamp.sparsify(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
swamp.prune(model, 0.5)
x = torch.randn(3, 4)
expected = model(x)
for use_orig_params in (False, True):
    import copy
    fsdp = FullyShardedDataParallel(copy.deepcopy(model), device_id=torch.device("cpu"),
                                    use_orig_params=use_orig_params)
    out = fsdp(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
print("ok")
"""


def test_fsdp_wraps_masked_layers(tmp_path):
    """FSDP (one CPU process) swaps a masked layer's weight for views of its flat parameter: allowed."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, str(tmp_path / "rendezvous")], capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
