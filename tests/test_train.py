"""swamp.train: the two engines agree, channels_last / label smoothing / torch.compile, and a
stage resumed from any epoch checkpoint ends bitwise equal to an uninterrupted one; the learning
rates against torch's schedulers."""
import bisect
import dataclasses
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from swamp import cli, pipeline
from swamp import config as C
from swamp.data import epoch_generator, load_data
from swamp.distributed import Group
from swamp.models import build_model
from swamp.sparsify import set_masks, sparsify
from swamp.train import (ModuleEngine, StackedEngine, cudnn_autotuned, learning_rate, stack_state, swa_learning_rate,
                         train_particles)


def setup(model: str, init: str = "openlth", **train):
    torch.set_num_threads(1)
    config = C.from_dict({"model": {"name": model, "hidden": [24], "init": init}, "device": "cpu",
                          "data": {"name": "synthetic", "shape": [3, 8, 8], "classes": 5, "train_size": 96,
                                   "test_size": 16},
                          "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "milestones": [2], **train},
                          "swa": {"start": 0.3, "lr": 0.02}})
    data = load_data(config.data)
    torch.manual_seed(0)
    model = sparsify(build_model(config.model, data.input_shape, data.num_classes))
    masks = {n[:-len("_mask")]: torch.rand(b.shape, generator=torch.Generator().manual_seed(i)) < 0.7
             for i, (n, b) in enumerate(model.named_buffers()) if n.endswith("weight_mask")}
    set_masks(model, masks)
    return config, data, model


def batches(data, steps: int):
    out = data.train_batches([epoch_generator(0, 0, 0, 0)], 32)
    return [next(out) for _ in range(steps)]


@pytest.mark.parametrize("model", ["mlp", "cifar_resnet_8"])
def test_module_and_stacked_engines_agree(model):
    config, data, net = setup(model, weight_decay=1e-3, nesterov=True)
    engines = [cls(net, stack_state(net, 1), config, Group.single()) for cls in (ModuleEngine, StackedEngine)]
    for x, y in batches(data, 3):
        losses = [engine.step(x, y, lr=0.05) for engine in engines]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    module, stacked = (engine.state() for engine in engines)
    assert module.keys() == stacked.keys()
    for name in module:
        torch.testing.assert_close(module[name], stacked[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, mask in net.named_buffers():
        if name.endswith("weight_mask"):
            assert not module[name[:-5]][0][~mask].any()


def test_channels_last_and_label_smoothing():
    config, data, net = setup("cifar_resnet_8", label_smoothing=0.1)
    (x, y), = batches(data, 1)
    plain = ModuleEngine(net, stack_state(net, 1), config, Group.single())
    last = ModuleEngine(net, stack_state(net, 1), C.from_dict({**C.to_dict(config), "train": {
        **C.to_dict(config)["train"], "channels_last": True}}), Group.single())
    conv = next(p for p in last.params if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.cross_entropy(plain.module(x[0]), y[0], label_smoothing=0.1)
    losses = [engine.step(x, y, lr=0.05) for engine in (plain, last)]
    torch.testing.assert_close(losses[0], expected.unsqueeze(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.params, last.params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    last.load_momentum(plain.stacked_momentum())  # contiguous rows into channels_last params
    for param, buffer, loaded in zip(last.params, last.momentum, plain.momentum):
        assert buffer.stride() == param.stride()
        torch.testing.assert_close(buffer, loaded, rtol=0, atol=0)


def test_stacked_particles_refuse_a_cumulative_batch_norm():
    config, _, net = setup("cifar_resnet_8_4")
    net.bn.momentum = None   # num_batches_tracked read as a Python number in each update
    with pytest.raises(ValueError, match=r"BatchNorm bn has momentum=None \(a cumulative average\), which cannot run "
                                         r"on stacked particles"):
        StackedEngine(net, stack_state(net, 2), config, Group.single())
    ModuleEngine(net, stack_state(net, 1), config, Group.single())   # one particle: torch's own BatchNorm


@pytest.mark.parametrize("engine,particles", [(ModuleEngine, 1), (StackedEngine, 2)])
def test_compiled_engines_match_eager(engine, particles):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler")
    config, data, net = setup("cifar_resnet_8")
    compiled = C.from_dict({**C.to_dict(config), "train": {**C.to_dict(config)["train"], "compile": True}})
    x, y = (t.expand(particles, *t.shape[1:]) for t in batches(data, 1)[0])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):   # later engines reuse the graph
        for _ in range(2):   # a new engine (as every level of a run has) with the same model
            engines = [engine(net, stack_state(net, particles), c, Group.single()) for c in (config, compiled)]
            for _ in range(2):
                losses = [e.step(x, y, lr=0.05) for e in engines]
                torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
            for a, b in zip(*(e.state().values() for e in engines)):   # BatchNorm statistics too
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_autotunes_cudnn_on_cuda_only_and_restores_the_setting():
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with cudnn_autotuned(torch.device("cpu")):
            assert not torch.backends.cudnn.benchmark
        with pytest.raises(RuntimeError), cudnn_autotuned(torch.device("cuda")):
            assert torch.backends.cudnn.benchmark
            raise RuntimeError
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("particles", [1, 2])
def test_resuming_from_each_epoch_checkpoint_is_bitwise_equal(particles):
    config, data, net = setup("cifar_resnet_8", epochs=4, checkpoint_every=1)
    checkpoints = []
    full = train_particles(net, stack_state(net, particles), data, config, stage=0, begin=5, end=12, swa=True,
                           checkpoint=checkpoints.append)
    assert [c["epoch"] for c in checkpoints] == [2, 3] and full.swa
    for checkpoint in checkpoints:
        resumed = train_particles(net, stack_state(net, particles), data, config, stage=0, begin=5, end=12,
                                  swa=True, resume=checkpoint)
        assert resumed.state.keys() == full.state.keys() and resumed.images == full.images
        assert all(torch.equal(resumed.state[n], full.state[n]) for n in full.state)
        assert resumed.train_loss == full.train_loss


def _torch_rates(scheduler, steps: int, every: int = 1) -> list[float]:
    """The learning rate of ``scheduler``'s optimizer at each of ``steps`` steps, the scheduler
    stepped after every ``every``-th."""
    rates = []
    for step in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()  # no gradients: moves nothing, keeps the schedulers' call order
        if (step + 1) % every == 0:
            scheduler.step()
    return rates


def _optimizer(lr: float) -> torch.optim.SGD:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def test_learning_rates_follow_torch_schedulers():
    steps_per_epoch = 7
    step = C.TrainConfig(epochs=6, lr=0.1, milestones=[2, 5], gamma=0.3)
    assert [learning_rate(i, steps_per_epoch, step) for i in range(42)] == pytest.approx(_torch_rates(
        torch.optim.lr_scheduler.MultiStepLR(_optimizer(0.1), [2, 5], 0.3), 42, every=steps_per_epoch), rel=1e-12)
    cosine = C.TrainConfig(epochs=6, lr=0.1, schedule="cosine")
    assert [learning_rate(i, steps_per_epoch, cosine) for i in range(42)] == pytest.approx(_torch_rates(
        torch.optim.lr_scheduler.CosineAnnealingLR(_optimizer(0.1), 42), 42), rel=1e-9)


@pytest.mark.parametrize("warmup_epochs, milestones", [(2, [3, 5]), (0.3, [3]), (2, [1, 5])])
def test_warmup_scales_the_schedule_as_openlth_does(warmup_epochs, milestones):
    """OpenLTH's LambdaLR: min(1, it / warm-up iterations) times gamma ** (milestones passed);
    a fractional warm-up never lifts the rate above lr, a milestone inside it applies."""
    steps_per_epoch, gamma = 22, 0.3
    train = C.TrainConfig(epochs=6, lr=0.1, milestones=milestones, gamma=gamma, warmup_epochs=warmup_epochs)
    warmup = warmup_epochs * steps_per_epoch
    openlth = torch.optim.lr_scheduler.LambdaLR(_optimizer(0.1), lambda it: min(1.0, it / warmup) * gamma ** (
        bisect.bisect([m * steps_per_epoch for m in milestones], it)))
    ours = [learning_rate(i, steps_per_epoch, train) for i in range(132)]
    assert ours == pytest.approx(_torch_rates(openlth, 132), rel=1e-12) and max(ours) <= 0.1
    cosine = [learning_rate(i, steps_per_epoch, dataclasses.replace(train, schedule="cosine")) for i in range(132)]
    warm = math.ceil(warmup)
    assert cosine[:warm] == pytest.approx([0.1 * i / warmup for i in range(warm)], rel=1e-12)
    assert max(cosine) <= 0.1 and cosine[warm:] == sorted(cosine[warm:], reverse=True)


@pytest.mark.parametrize("anneal_epochs", [0, 1, 3])
def test_swa_learning_rate_anneals_like_torch_swalr(anneal_epochs):
    """From the scheduled rate at the SWA start (epoch 4 of 8: 0.1 * 0.3 after milestone 2) to
    swa.lr, as SWALR(anneal_strategy="cos") stepped once per iteration."""
    steps_per_epoch = 5
    config = C.from_dict({"train": {"epochs": 8, "lr": 0.1, "milestones": [2], "gamma": 0.3},
                          "swa": {"start": 0.5, "lr": 0.01, "anneal_epochs": anneal_epochs}})
    start, scheduled = 4 * steps_per_epoch, 0.1 * 0.3
    swalr = torch.optim.swa_utils.SWALR(_optimizer(scheduled), swa_lr=0.01,
                                        anneal_epochs=anneal_epochs * steps_per_epoch, anneal_strategy="cos")
    ours = [swa_learning_rate(start + i, steps_per_epoch, config) for i in range(20)]
    expected = _torch_rates(swalr, 20) if anneal_epochs else [0.01] * 20
    assert ours == pytest.approx(expected, rel=1e-9)
    assert ours[-1] == 0.01 and (anneal_epochs == 0 or ours[0] == pytest.approx(scheduled))


def test_training_uses_the_swa_anneal():
    config, data, net = setup("mlp", epochs=4)
    lines = []
    annealed = dataclasses.replace(config, swa=dataclasses.replace(config.swa, start=0.5, anneal_epochs=1))
    train_particles(net, stack_state(net, 1), data, annealed, stage=0, begin=0, end=12, swa=True, log=lines.append)
    rates = [float(line.split(" lr ")[1].split()[0]) for line in lines]
    # epochs 1-2 on the schedule (0.05), epoch 3 inside the anneal from the schedule's 0.005
    # (after milestone 2) towards swa.lr 0.02, epoch 4 at swa.lr
    assert rates[:2] == [0.05, 0.05] and 0.005 < rates[2] < 0.02 and rates[3] == 0.02


def test_a_fixed_rate_replaces_the_schedule_until_the_swa_epochs():
    config, data, net = setup("mlp", epochs=4)
    lines = []
    swa = dataclasses.replace(config, swa=dataclasses.replace(config.swa, start=0.75))
    train_particles(net, stack_state(net, 1), data, swa, stage=1, begin=0, end=12, swa=True, fixed_lr=0.003,
                    log=lines.append)
    assert [float(line.split(" lr ")[1].split()[0]) for line in lines] == [0.003, 0.003, 0.003, 0.02]
    annealed = dataclasses.replace(swa, swa=dataclasses.replace(swa.swa, anneal_epochs=1))
    assert swa_learning_rate(10, 3, annealed, fixed_lr=0.003) == pytest.approx(0.02 + (0.003 - 0.02) * 0.75)


def test_dry_run_needs_no_data(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {name: cifar10, path: /nonexistent/cifar}\nmodel: {name: cifar_resnet_8}\n"
                      "method: imp\nlevels: 3\ntrain: {batch_size: 8, epochs: 90}\ndevice: cpu\n")
    assert cli.main(["run", str(config), "--out", str(tmp_path / "run"), "--dry-run", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| level | density | run (imp): images/s |" in out and "| 2 |" not in out
    assert re.search(r"^\| 1 \| 80\.00% \| [\d,]+\.\d \|$", out, re.M)   # images/s, no accuracy (synthetic data)
    resolved = C.load(tmp_path / "run" / "config.yaml")
    assert resolved.data.name == "synthetic" and resolved.data.shape == [3, 32, 32] and resolved.data.classes == 10
    assert resolved.train.epochs == 1 and resolved.data.train_size == 20 * 8


def test_a_dry_run_replaces_an_earlier_dry_run_only(tmp_path, capsys):
    config, out = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text("data: {name: digits}\nmodel: {hidden: [8]}\nmethod: dense\ntrain: {batch_size: 16}\n"
                      "device: cpu\n")
    dry = ["run", str(config), "--out", str(out), "--dry-run", "--quiet"]
    assert cli.main(dry) == 0
    (out / "log.txt").write_text("from the first dry run\n")
    assert cli.main(dry) == 0 and "from the first" not in (out / "log.txt").read_text()
    (out / "notes.txt").write_text("mine")   # a file no run writes: the folder is the user's
    assert cli.main(dry) == 2 and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    real = tmp_path / "real"
    assert cli.main(["run", str(config), "--out", str(real), "--quiet", "--set", "train.epochs=1",
                     "--set", "rewind.iterations=0"]) == 0
    assert cli.main(["run", str(config), "--out", str(real), "--dry-run", "--quiet"]) == 2
    assert "a dry run replaces only an earlier dry run" in capsys.readouterr().err
    assert (real / "summary.json").is_file()


def test_a_dry_run_of_imagenet_takes_its_shapes_without_the_data_set(tmp_path):
    config = C.load(Path(__file__).resolve().parent.parent / "configs" / "imagenet_resnet50_swamp.yaml",
                    [f"data.path={tmp_path / 'nowhere'}"], check_paths=False)
    data = pipeline.dry_run(config).data
    assert (data.name, data.shape, data.classes) == ("synthetic", [3, 224, 224], 1000)
