"""The README's Python examples of the masked layers, MaskedSGD, the ops and the analyses run as
written, given the names they take as the user's own (``model``; stacked ``particles``, ``params``,
``grads``, ``buffers``; a run directory), and its config block holds every key at its default."""
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn

from swamp import config as C
from swamp import pipeline
from swamp.data import load_data

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section headed ``## section``."""
    text = README.read_text()
    assert f"\n## {section}\n" in text, f"the README has no section {section!r}"
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    assert blocks, f"README section {section!r} has no python example"
    return blocks


def run_blocks(section: str, names: dict) -> dict:
    for block in python_blocks(section):
        exec(compile(block, f"README.md ({section})", "exec"), names)
    return names


def test_masked_layers_example():
    torch.manual_seed(0)
    names = run_blocks("Masked layers", {"model": torchvision.models.resnet18(num_classes=10)})
    model, opt = names["model"], names["opt"]
    layers = [m for m in model.modules() if isinstance(m, names["swamp"].nn.MaskedLayer)]
    assert layers and all(opt.masks_in_step(m.weight, m.weight_mask) for m in layers)   # masks=model
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    pruned = [~m for m in names["swamp"].masks(model).values()]
    weights = [p for n, p in model.named_parameters() if n in names["swamp"].masks(model)]
    assert any(p.any() for p in pruned) and all(torch.all(w[p] == 0) for w, p in zip(weights, pruned))
    assert "fc.weight" not in names["swamp"].masks(model)   # exclude=["fc"]
    assert abs(names["swamp"].sparsity_report(model).density - 0.8 ** 3) < 1e-6   # 3 levels of 20%


def test_masked_layers_example_rewinds_with_the_masks():
    torch.manual_seed(0)
    names = run_blocks("Masked layers", {"model": torchvision.models.resnet18(num_classes=10)})
    model, rewind_point = names["model"], names["rewind_point"]
    state = model.state_dict()
    for name, mask in names["swamp"].masks(model).items():
        assert torch.equal(state[name], rewind_point[name] * mask)


def test_ops_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    stacked = [m.weight.detach().unsqueeze(0).repeat(2, *[1] * m.weight.dim())
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = run_blocks("The ops", {"model": model, "particles": stacked, "params": [p.clone() for p in stacked],
                                   "grads": [torch.randn_like(p) for p in stacked],
                                   "buffers": [None] * len(stacked)})
    masks, swa = names["masks"], names["swa"]
    assert all(b is not None for b in names["buffers"])
    for mask, average, particle, param in zip(masks, swa, stacked, names["params"]):
        assert torch.equal(average, particle.mean(0) * mask)
        assert torch.all(param[:, ~mask] == 0)


def test_analysis_example(tmp_path):
    run_dir = tmp_path / "swamp"
    pipeline.run(C.from_dict({"method": "swamp", "particles": 2, "levels": 1, "model": {"hidden": [16]}, "device": "cpu",
                              "rewind": {"iterations": 2}, "train": {"epochs": 1, "milestones": []}}),
                 run_dir, quiet=True)
    from swamp.analysis import load_run
    run = load_run(run_dir)
    state_a, state_b = run.state(0), run.state(1)
    data = load_data(run.config.data)
    x, y = next(data.eval_batches("train", 64))
    names = run_blocks("Analysis", {
        "model": run.model, "state_a": state_a, "state_b": state_b, "run_dir": run_dir, "level": 1,
        "eval_fn": lambda net: (0.0, 0.0), "loss_fn": F.cross_entropy, "batches": [(x, y)],
        "mask_a": run.masks(0), "mask_b": run.masks(1)})
    assert set(names["path"]) >= {"alphas", "errors", "losses", "barrier", "loss_barrier"}
    assert torch.equal(names["p0"].state_dict()["1.weight"], run.particle_states(1)[0]["1.weight"])


def test_config_block_holds_every_key_at_its_default():
    block = re.search(r"```yaml\n(data:.*?)```", README.read_text(), re.S).group(1)
    assert C.to_dict(C.from_dict(yaml.safe_load(block))) == C.to_dict(C.Config())
    assert set(yaml.safe_load(block)) == set(C.to_dict(C.Config()))   # every section named
    for section, values in yaml.safe_load(block).items():
        if isinstance(values, dict):
            assert set(values) == set(C.to_dict(C.Config())[section]), section   # every key named
