"""swamp.pipeline end to end on digits: every method, run layout, densities, averaging, BN, resume after kill -9."""
import contextlib
import errno
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from swamp import cli, evaluate, pipeline, report, rundir, runlock
from swamp import config as C
from swamp.data import load_data
from swamp.models import build_model
from swamp.sparsify import sparsify
from swamp.train import stack_state, train_particles

ROOT = Path(__file__).resolve().parent.parent
LEVELS, FRACTION = 2, 0.3


def tiny(method: str, **changes) -> C.Config:
    values = {"method": method, "levels": LEVELS, "prune_fraction": FRACTION, "particles": 2,
              "rewind": {"iterations": 3}, "model": {"hidden": [24]}, "swa": {"start": 0.5, "lr": 0.02},
              "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "milestones": [1]}, "device": "cpu"}
    values.update(changes)
    return C.from_dict(values)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    return {m: (root / m, pipeline.run(tiny(m), root / m, quiet=True)) for m in C.METHODS}


@pytest.mark.parametrize("method", C.METHODS)
def test_every_method_writes_the_run_layout(runs, method):
    out, summary = runs[method]
    levels = 0 if method == "dense" else LEVELS
    assert json.loads((out / "summary.json").read_text()) == summary and summary["method"] == method
    assert [m["level"] for m in summary["levels"]] == list(range(levels + 1))
    assert C.load(out / "config.yaml") == tiny(method)
    assert (out / "rewind.pt").is_file()
    particles = 2 if method == "swamp" else 1
    for metrics in summary["levels"]:
        directory = out / f"level_{metrics['level']:02d}"
        assert json.loads((directory / "metrics.json").read_text()) == metrics
        assert 0.2 < metrics["test_accuracy"] <= 1 and len(metrics["particle_test_accuracy"]) == particles
        assert 0 <= metrics["ensemble_test_accuracy"] <= 1 and metrics["images_per_second"] > 0
        masks = torch.load(directory / "mask.pt")
        state = torch.load(directory / "model.pt")
        for name, mask in masks.items():
            assert mask.dtype == torch.bool and torch.equal(state[name[:-len("weight")] + "weight_mask"], mask)
            assert not state[name][~mask].any()
    assert not list(out.rglob(".*tmp*")), "a temporary file was left behind"
    log = (out / "log.txt").read_text().splitlines()
    assert sum("epoch" in line for line in log) == 2 * (levels + 1) + 1   # + the pretraining epoch


@pytest.mark.parametrize("method", ["imp", "swamp", "random"])
def test_masks_shrink_and_density_follows_the_schedule(runs, method):
    out, summary = runs[method]
    previous = None
    for level in range(LEVELS + 1):
        masks = torch.load(out / f"level_{level:02d}" / "mask.pt")
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert abs(kept - total * (1 - FRACTION) ** level) <= level
        assert summary["levels"][level]["density"] == kept / total
        if previous is not None:
            assert all(not (m & ~previous[n]).any() for n, m in masks.items())
        previous = masks


def test_random_pruning_differs_from_magnitude_pruning(runs):
    imp = torch.load(runs["imp"][0] / "level_01" / "mask.pt")
    rand = torch.load(runs["random"][0] / "level_01" / "mask.pt")
    assert any(not torch.equal(imp[n], rand[n]) for n in imp)


@pytest.mark.parametrize("method", ["imp", "random"])
def test_layerwise_scope_prunes_the_fraction_of_every_layer(method):
    gen = torch.Generator().manual_seed(5)
    # layers of very different scales: a global threshold would empty the small one
    state = {"a.weight": torch.randn(40, 30, generator=gen) * 0.01, "b.weight": torch.randn(77, generator=gen)}
    masks = {n: torch.rand(t.shape, generator=gen) < 0.9 for n, t in state.items()}
    scopes = {scope: pipeline._prune(tiny(method, prune={"scope": scope}), 1, state, masks)
              for scope in ("global", "layerwise")}
    for name, new in scopes["layerwise"].items():
        remaining = int(masks[name].sum())
        assert int(new.sum()) == remaining - round(FRACTION * remaining)
        assert not (new & ~masks[name]).any()
    if method == "imp":
        assert int(scopes["global"]["a.weight"].sum()) < int(scopes["layerwise"]["a.weight"].sum())


def test_report_table_and_plot(runs, tmp_path, capsys):
    dirs = [str(runs[m][0]) for m in ("dense", "imp", "swamp")]
    table = report.markdown_table(report.load_runs(dirs))
    accuracy, heading, particles = table.split("\n\n")
    assert accuracy.splitlines()[0] == "| level | density | dense | imp | swamp |"   # labels that are the method
    assert len(accuracy.splitlines()) == len(particles.splitlines()) == 2 + LEVELS + 1
    assert heading.startswith("Particles (") and particles.startswith("| level | density | swamp: averaged |")
    plot = tmp_path / "p.png"
    assert cli.main(["report", *dirs, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG" and "| level |" in capsys.readouterr().out


def _live_tensor_bytes() -> int:
    """Bytes of every plain tensor storage reachable now (each storage once; earlier tests'
    fake tensors and vmap wrappers, left in torch.compile's caches, hold no memory)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if (type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta"
                and not torch._C._functorch.is_functorch_wrapped_tensor(obj)):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def test_memory_does_not_grow_across_levels(tmp_path, monkeypatch):
    """Every level starts training with the tensors level 0 started with: nothing of an earlier
    level (its particles, their average, its masks) is still held, however many levels run."""
    at_start = {}

    def measured(*args, stage, **kwargs):
        at_start[stage] = _live_tensor_bytes()
        return train_particles(*args, stage=stage, **kwargs)

    monkeypatch.setattr(pipeline, "train_particles", measured)
    pipeline.run(tiny("swamp", levels=3, particles=3), tmp_path / "run", quiet=True)
    assert sorted(at_start) == [-1, 0, 1, 2, 3]
    assert [at_start[level] for level in (1, 2, 3)] == [at_start[0]] * 3, at_start


@pytest.mark.parametrize("mode", C.REWIND_MODES)
def test_each_level_begins_from_the_weights_its_rewind_mode_names(tmp_path, monkeypatch, mode):
    """weights: the rewind point's, every level; lr and finetune: past level 0 the previous
    level's solution (under the new mask), finetune at the schedule's last rate; also on resume
    and in the instability analysis."""
    from swamp.analysis import instability, runs
    begun, rates = {}, {}

    def recorded(model, state, *args, stage, **kwargs):
        begun.setdefault(stage, []).append({n: t[0].clone() for n, t in state.items()})
        rates.setdefault(stage, set()).add(kwargs.get("fixed_lr"))
        return train_particles(model, state, *args, stage=stage, **kwargs)
    monkeypatch.setattr(pipeline, "train_particles", recorded)
    monkeypatch.setattr(runs, "train_particles", recorded)
    out = tmp_path / mode
    pipeline.run(tiny("imp_swa", rewind={"iterations": 3, "mode": mode}), out, quiet=True)
    last = 0.05 * 0.1   # tiny's schedule: lr 0.05, x0.1 at epoch 1 of 2
    assert rates == {-1: {None}, 0: {None}, 1: {last if mode == "finetune" else None},
                     2: {last if mode == "finetune" else None}}
    rewind = torch.load(out / "rewind.pt")

    def begins(level: int) -> dict:
        source = rewind if mode == "weights" or level == 0 else torch.load(out / f"level_{level - 1:02d}" / "model.pt")
        masks = torch.load(out / f"level_{level:02d}" / "mask.pt")
        return {n: source[n] * masks[n] if n in masks else source[n] for n in rewind}
    for level in range(LEVELS + 1):
        ((start),) = begun.pop(level)
        assert start.keys() == rewind.keys() and all(torch.equal(start[n], t) for n, t in begins(level).items())
    solution = torch.load(out / "level_02" / "model.pt")
    shutil.rmtree(out / "level_02")   # as if killed before it was written
    pipeline.resume(out, quiet=True)
    assert all(torch.equal(t, solution[n]) for n, t in torch.load(out / "level_02" / "model.pt").items())
    instability(out, 2, num_points=2)
    assert [all(torch.equal(copy[n], t) for n, t in begins(2).items()) for copy in begun.pop(2)] == [True] * 3
    assert rates[2] == {last if mode == "finetune" else None}


def test_averaged_model_is_the_mean_of_particle_swa_weights():
    torch.set_num_threads(1)
    config = tiny("swamp")
    data = load_data(config.data)
    torch.manual_seed(0)
    model = sparsify(build_model(config.model, data.input_shape, data.num_classes))
    result = train_particles(model, stack_state(model, 3), data, config, stage=0, begin=0, end=40, swa=True)
    assert result.swa
    params = dict(model.named_parameters())
    assert not torch.equal(result.state["1.weight"][0], result.state["1.weight"][1])
    averaged = pipeline._average(result, {})
    for name in params:
        torch.testing.assert_close(averaged[name], result.state[name].mean(0), rtol=1e-6, atol=1e-7)


def test_bn_statistics_are_recomputed_after_averaging(tmp_path):
    torch.set_num_threads(1)
    config = tiny("swamp", data={"name": "synthetic", "shape": [3, 8, 8], "classes": 4, "train_size": 96,
                                 "test_size": 32}, model={"name": "cifar_resnet_8_4"}, levels=1,
                  train={"epochs": 2, "batch_size": 32, "lr": 0.05, "milestones": []})
    summary = pipeline.run(config, tmp_path / "bn", quiet=True)
    assert len(summary["levels"]) == 2
    data = load_data(config.data)
    state = torch.load(tmp_path / "bn" / "level_01" / "model.pt")
    model = sparsify(build_model(config.model, data.input_shape, data.num_classes))
    net = evaluate.network(model, state)
    with torch.no_grad():   # first BN: batch statistics of the stem conv's output, averaged over batches
        stem = [net.conv(x) for x, _ in data.eval_batches("train", 32)]
    mean = torch.stack([s.mean((0, 2, 3)) for s in stem]).mean(0)
    var = torch.stack([s.var((0, 2, 3)) for s in stem]).mean(0)
    torch.testing.assert_close(state["bn.running_mean"], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["bn.running_var"], var, rtol=1e-4, atol=1e-5)
    recomputed = evaluate.recompute_bn_(evaluate.network(model, state), data, 32).state_dict()
    for name in state:
        if "running" in name:
            torch.testing.assert_close(recomputed[name], state[name], rtol=1e-5, atol=1e-6)


def swamp_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "swamp", *args, "--quiet"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(C.dump(tiny("swamp", levels=3, train={"epochs": 6, "batch_size": 64, "lr": 0.05,
                                                            "milestones": [3]})))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference = swamp_cli("run", str(config), "--out", str(straight))
    victim = swamp_cli("run", str(config), "--out", str(killed))
    deadline = time.time() + 120
    while not (killed / "level_00" / "metrics.json").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = json.loads((killed / "summary.json").read_text())["levels"]
    assert 1 <= len(done) < 4
    stale = [killed / ".checkpoint.pt.tmp99999", killed / "level_00" / ".model.pt.tmp99999"]  # killed mid-write
    for path in stale:
        path.write_bytes(b"partial")
    resumed = swamp_cli("resume", str(killed))
    assert resumed.wait() == 0, resumed.stderr.read().decode()
    assert not list(killed.rglob(".*tmp*")), "a killed write's temporary file was left behind"
    assert reference.wait() == 0, reference.stderr.read().decode()
    timing = ("seconds", "images_per_second")
    strip = lambda s: [{k: v for k, v in m.items() if k not in timing} for m in s["levels"]]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (straight, killed))
    assert strip(a) == strip(b) and len(a["levels"]) == 4
    logs = [(d / "log.txt").read_text().splitlines() for d in (straight, killed)]
    assert [line for line in logs[1] if line.startswith("resumed:")] == [
        "resumed: the epochs after the last checkpoint train again, so their lines repeat below"]
    assert not any(line.startswith("resumed:") for line in logs[0]) and logs[0][-1] == logs[1][-1]
    for level in range(4):
        for name in ("model.pt", "mask.pt"):
            x, y = (torch.load(d / f"level_{level:02d}" / name) for d in (straight, killed))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def fail(temp: Path) -> None:
        temp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        rundir.atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("lenet5", (1, 28, 28)),
                                         ("cifar_resnet_20", (3, 32, 32)), ("cifar_resnet_8_4", (3, 8, 8)),
                                         ("wrn_16_2", (3, 32, 32)), ("cifar_vgg_16", (3, 32, 32)),
                                         ("resnet50", (3, 64, 64))])
def test_model_registry_takes_shape_and_classes_from_data(name, shape):
    model = sparsify(build_model(C.ModelConfig(name=name, hidden=[7]), shape, 5))
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def test_openlth_initialisation():
    """kaiming-normal conv/linear weights (std sqrt(2 / fan_in)), BatchNorm scales in [0, 1) with
    shifts 0; init: torch keeps PyTorch's (kaiming-uniform with a = sqrt(5), scales 1)."""
    torch.manual_seed(0)
    ours, theirs = (build_model(C.ModelConfig(name="cifar_resnet_20", init=init), (3, 32, 32), 10)
                    for init in ("openlth", "torch"))
    conv = ours.blocks[8].conv2.weight   # 64 x 64 x 3 x 3: fan in 576
    assert conv.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.02)
    assert theirs.blocks[8].conv2.weight.std().item() == pytest.approx((1 / (3 * 576)) ** 0.5, rel=0.02)
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    scales = torch.cat([m.weight.detach() for m in norms])
    assert 0 <= scales.min() and scales.max() < 1 and scales.std() > 0.2
    assert all(not m.bias.any() for m in norms)
    assert all((m.weight == 1).all() for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d))


FACTORY = """from __future__ import annotations

import dataclasses
import math

from torch import nn

from blocks import head   # a file beside this one


@dataclasses.dataclass
class Widths:   # a dataclass under postponed annotations needs its module registered
    hidden: int = 20


def net(input_shape, num_classes):
    width = Widths().hidden
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), head(width, num_classes))


def reused(input_shape, num_classes):   # one module applied twice
    shared = nn.Linear(20, 20)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 20), shared, nn.ReLU(), shared,
                         nn.Linear(20, num_classes))


class Branching(nn.Sequential):
    def forward(self, x):   # a data-dependent op: no meta-device forward
        y = super().forward(x)
        return y if y.sum().item() >= 0 else -y


def branching(input_shape, num_classes):
    return Branching(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def not_a_model(input_shape, num_classes):
    return [input_shape, num_classes]
"""


def write_factory(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "mine.py").write_text(FACTORY)
    (folder / "blocks.py").write_text("from torch import nn\n\ndef head(width, classes):\n"
                                      "    return nn.Linear(width, classes)\n")


def test_a_factory_of_the_users_own_trains_as_the_registry_models_do(tmp_path, monkeypatch):
    """model.name: file.py:function (made absolute, as data.path) or module:function; the run, its
    resume and its analyses build the model the same way."""
    from swamp.analysis import layer_densities, successive_barriers
    write_factory(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    config = tiny("imp", levels=1, model={"name": "models/mine.py:net"})
    assert config.model.name == f"{tmp_path / 'models' / 'mine.py'}:net"
    out = tmp_path / "run"
    summary = pipeline.run(config, out, quiet=True)
    assert [sorted(torch.load(out / f"level_0{i}" / "mask.pt")) for i in (0, 1)] == [["1.weight", "3.weight"]] * 2
    assert summary["levels"][1]["density"] == pytest.approx(1 - FRACTION, abs=1e-3)
    assert summary["levels"][0]["test_accuracy"] > 0.5
    assert [r["to_level"] for r in successive_barriers(out, num_points=2)["levels"]] == [1]
    assert layer_densities(out)["layers"][0] == {"name": "1.weight", "weights": 64 * 20}
    (tmp_path / "models").rename(tmp_path / "moved")   # resumed from its new place, as a moved data set
    shutil.rmtree(out / "level_01")
    with pytest.raises(C.ConfigError, match=r"no file .*models/mine.py \(for a run whose factory file moved, "
                                            r"`swamp resume RUN_DIR --set model.name=NEW/mine.py:net`"):
        pipeline.resume(out, quiet=True)
    for other in ("moved/blocks.py:net", "moved/mine.py:reused", "mlp"):
        with pytest.raises(C.ConfigError, match="only a factory file that moved may be named anew"):
            pipeline.resume(out, quiet=True, overrides=[f"model.name={other}"])
    resumed = pipeline.resume(out, quiet=True, overrides=["model.name=moved/mine.py:net"])
    assert [level["test_accuracy"] for level in resumed["levels"]] == [level["test_accuracy"] for level in summary["levels"]]
    assert C.load(out / "config.yaml").model.name == f"{tmp_path / 'moved' / 'mine.py'}:net"
    monkeypatch.syspath_prepend(str(tmp_path / "moved"))
    model = build_model(C.ModelConfig(name="mine:net"), (1, 8, 8), 10)
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear", "ReLU", "Linear"]
    for name in ("reused", "branching"):   # built whole, on the CPU, and trainable
        model = build_model(C.ModelConfig(name=f"mine:{name}"), (1, 8, 8), 10)
        assert {p.device.type for p in model.parameters()} == {"cpu"} and model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name, message", [
    ("gone.py:net", r"'model.name': '.*gone.py:net': no file .*gone.py"),
    ("no_such_module_here:net", r"no module no_such_module_here on the Python path"),
    ("mine.py:missing", r"mine.py has no function missing"),
    ("mine.py:not_a_model", r"mine.py:not_a_model' returned a list, not an nn.Module"),
    ("mine.py:", r"names no factory"),
])
def test_a_factory_that_cannot_be_used_is_named(tmp_path, monkeypatch, name, message):
    write_factory(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(C.ConfigError, match=message):
        build_model(C.ModelConfig(name=name), (1, 8, 8), 10)


def test_bad_model_names_fail():
    for name in ("cifar_resnet_21", "wrn_27_2", "cifar_vgg_12", "alexnet"):
        with pytest.raises(C.ConfigError, match=name):
            build_model(C.ModelConfig(name=name), (3, 32, 32), 10)


def test_bf16_training_with_batch_norm():
    torch.set_num_threads(1)
    config = tiny("swamp", data={"name": "synthetic", "shape": [3, 8, 8], "classes": 4, "train_size": 64,
                                 "test_size": 16}, model={"name": "cifar_resnet_8"},
                  train={"epochs": 1, "batch_size": 32, "lr": 0.05, "precision": "bf16", "schedule": "cosine"})
    data = load_data(config.data)
    model = sparsify(build_model(config.model, data.input_shape, data.num_classes))
    result = train_particles(model, stack_state(model, 2), data, config, stage=0, begin=0, end=2, swa=False)
    assert all(t.dtype in (torch.float32, torch.int64) for t in result.state.values())
    assert torch.isfinite(torch.tensor(result.train_loss))


def test_pruning_that_empties_a_layer_is_logged_and_warned(tmp_path):
    config = tiny("imp", levels=1, prune_fraction=0.9995)   # keeps one weight of the two layers
    with pytest.warns(UserWarning, match=r"pruning removed every remaining weight of .*\(layer collapse\)"):
        pipeline.run(config, tmp_path / "run", quiet=True)
    emptied = [n for n, m in torch.load(tmp_path / "run" / "level_01" / "mask.pt").items() if not m.any()]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert len(emptied) == 1 and f"level 0 warning: pruning removed every remaining weight of {emptied[0]}:" in log


@contextlib.contextmanager
def lock_held_elsewhere(out: Path):
    """``out``'s run lock held by another process (a POSIX lock: the owner is a process), as a
    live run holds it, with "pid 4242 on node7" in the file."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
         "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.truncate(0); f.write('pid 4242 on node7'); "
         "f.flush(); print('locked', flush=True); sys.stdin.read()", str(out / runlock.LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.stdin.close()
        holder.wait()


def test_resuming_a_run_another_process_trains_fails_at_once(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    (out / "level_01" / "metrics.json").unlink()   # unfinished: resume would train level 1
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != runlock.LOCK_NAME}
    with lock_held_elsewhere(out), monkeypatch.context() as patch:
        patch.setattr(pipeline, "load_data", lambda config: pytest.fail("the data was loaded"))   # refused first
        assert cli.main(["resume", str(out), "--quiet"]) == 2
        assert f"swamp resume: error: {out} is being trained by pid 4242 on node7; wait for it to end" in \
            capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before   # nothing written, nothing removed
    assert pipeline.resume(out, quiet=True)["levels"][1]["level"] == 1   # released: resumes
    assert (out / runlock.LOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_a_dry_run_does_not_replace_a_dry_run_in_progress(tmp_path, capsys):
    config, out = tmp_path / "c.yaml", tmp_path / "dry"
    config.write_text(C.dump(tiny("dense")))
    assert cli.main(["run", str(config), "--out", str(out), "--dry-run", "--quiet"]) == 0
    with lock_held_elsewhere(out):
        assert cli.main(["run", str(config), "--out", str(out), "--dry-run", "--quiet"]) == 2
        assert f"{out} is being trained by pid 4242 on node7" in capsys.readouterr().err
        assert (out / "summary.json").is_file()
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 2   # the real run: not `swamp resume`
    assert f"{out} holds a dry run (synthetic data, to measure speed): pick another --out, or delete it first" in \
        capsys.readouterr().err


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    def refused(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runlock.fcntl, "lockf", refused)
    with pytest.warns(UserWarning, match=r"\.lock: cannot lock the run \(\[Errno \d+\] No locks available\)"):
        lock = runlock.RunLock(tmp_path)
        assert lock.acquire() is None
    lock.release()
    assert runlock.holder(tmp_path) is None


def test_the_lock_ends_with_its_process_not_with_the_workers_it_forked(tmp_path):
    """A killed run's DataLoader workers (forked while it held the lock) live on a few seconds:
    the lock must not live on in them, or an immediate resume would be refused."""
    script = ("import os, sys, time\n"
              "from swamp.runlock import RunLock\n"
              "lock = RunLock(sys.argv[1])\n"
              "assert lock.acquire() is None\n"
              "child = os.fork()\n"
              "if child == 0:   # the worker: off the parent's pipes, alive for a while\n"
              "    quiet = os.open(os.devnull, os.O_WRONLY)\n"
              "    os.dup2(quiet, 1), os.dup2(quiet, 2)\n"
              "    time.sleep(30)\n"
              "print(child, flush=True)\n"
              "os._exit(0)\n")
    parent = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    worker = int(parent.stdout)
    try:
        assert runlock.holder(tmp_path) is None
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_resume_that_finds_the_run_finished_once_it_holds_the_lock_trains_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    summary = pipeline.run(tiny("imp", levels=1), out, quiet=True)
    real, calls = pipeline._all_levels_done, []
    monkeypatch.setattr(pipeline, "_all_levels_done",
                        lambda d, config: bool(calls.append(d)) or len(calls) > 1 and real(d, config))
    monkeypatch.setattr(pipeline, "_execute", lambda *args, **kwargs: pytest.fail("it trained"))
    log = (out / "log.txt").read_text()
    assert pipeline.resume(out, quiet=True, overrides=["train.checkpoint_every=3"]) == summary
    assert len(calls) == 2   # unfinished, then finished
    assert (out / "log.txt").read_text() == log   # no "resumed:" line
    assert C.load(out / "config.yaml").train.checkpoint_every == 3   # the --set values still recorded


def test_a_run_started_meanwhile_in_the_same_folder_is_not_adopted(tmp_path, monkeypatch):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    before = (out / "config.yaml").read_text()
    monkeypatch.setattr(pipeline, "_claim", lambda out, replace_dry_run: None)   # it appeared after the claim
    with pytest.raises(FileExistsError, match="already holds a run \\(started meanwhile by another process\\)"):
        pipeline.run(tiny("imp", levels=1, seed=123), out, quiet=True)
    assert (out / "config.yaml").read_text() == before


def test_a_dry_run_over_a_run_whose_data_moved_says_the_folder_is_taken(tmp_path, capsys):
    import numpy as np
    data = tmp_path / "d.npz"
    np.savez(data, x_train=np.zeros((8, 3)), y_train=np.arange(8) % 2, x_test=np.zeros((2, 3)), y_test=np.zeros(2))
    config, out = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text(C.dump(tiny("dense", data={"name": "npz", "path": str(data)},
                                  train={"epochs": 1, "batch_size": 4}, rewind={"iterations": 0})))
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    data.unlink()
    other = tmp_path / "digits.yaml"
    other.write_text(C.dump(tiny("dense")))
    assert cli.main(["run", str(other), "--out", str(out), "--dry-run", "--quiet"]) == 2
    assert "already holds a run that is not a dry run" in capsys.readouterr().err


def test_probing_a_free_lock_leaves_its_file_as_it_was(tmp_path):
    (tmp_path / runlock.LOCK_NAME).write_text("pid 7 on earlier-host\n")
    assert runlock.holder(tmp_path) is None
    assert (tmp_path / runlock.LOCK_NAME).read_text() == "pid 7 on earlier-host\n"
    assert runlock.holder(tmp_path / "no-run") is None and not (tmp_path / "no-run").exists()


def _edited(out: Path, item: str) -> str:
    """The run's config.yaml with ``item`` (key=value) changed."""
    values = C.apply_overrides(C.to_dict(C.load(out / "config.yaml", check_paths=False)), [item])
    return C.dump(C.from_dict(values))


def test_resume_refuses_a_config_yaml_edited_in_what_its_levels_compute(tmp_path, capsys):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    (out / "level_01" / "metrics.json").unlink()   # unfinished
    original = (out / "config.yaml").read_text()
    for item, change in (("particles=3", "particles: 3, started with 2"), ("train.epochs=1", "train.epochs: 1, "
                         "started with 2"), ("model.hidden=[12]", "model.hidden: [12], started with [24]"),
                         ("method=swamp", "method: 'swamp', started with 'imp'")):
        (out / "config.yaml").write_text(_edited(out, item))
        assert cli.main(["resume", str(out), "--quiet"]) == 2
        error = capsys.readouterr().err
        assert f"{out}/config.yaml differs from the config the run started with ({out}/.started.yaml) in what its " \
               f"levels compute: {change}. Put it back; resume can change only data.path" in error
        (out / "config.yaml").write_text(original)
    (out / "config.yaml").write_text(_edited(out, "train.checkpoint_every=2"))   # how it runs: allowed
    assert cli.main(["resume", str(out), "--quiet"]) == 0


def test_data_layout_is_for_npz_in_new_runs_and_kept_in_older_runs_that_set_it(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(C.dump(tiny("imp", levels=1)).replace("layout: auto", "layout: channels_last"))
    for dry in ([], ["--dry-run"]):
        assert cli.main(["run", str(config), "--out", str(tmp_path / "new"), *dry]) == 2
        assert "config key 'data.layout': channels_last is for npz arrays; digits data is read in its own layout " \
               "(leave it auto)" in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    with pytest.raises(C.ConfigError, match="'data.layout'"):
        pipeline.check(C.load(config))
    out = tmp_path / "old"   # a digits run of an earlier swamp, which ignored the key
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    (out / "level_01" / "metrics.json").unlink()
    for name in ("config.yaml", ".started.yaml"):
        (out / name).write_text((out / name).read_text().replace("layout: auto", "layout: channels_last"))
    assert cli.main(["resume", str(out), "--quiet"]) == 0
    assert cli.main(["report", str(out), "--plot", str(tmp_path / "p.png")]) == 0


def test_resume_with_more_levels_continues_a_finished_run_as_if_it_had_planned_them(tmp_path, capsys):
    out, straight = tmp_path / "run", tmp_path / "straight"
    first = pipeline.run(tiny("imp", levels=1), out, quiet=True)
    assert pipeline.finished(out) and not pipeline.finished(out, ["levels=2"])
    assert cli.main(["resume", str(out), "--quiet", "--set", "levels=2"]) == 0
    assert "already complete" not in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["levels"]) == 3 and summary["levels"][:2] == first["levels"]
    assert C.load(out / "config.yaml").levels == 2 and pipeline.finished(out)
    pipeline.run(tiny("imp", levels=2), straight, quiet=True)
    for name in ("mask.pt", "model.pt"):
        a, b = (torch.load(d / "level_02" / name) for d in (out, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_refuses_results_without_a_config_yaml_and_clears_a_killed_start(tmp_path, capsys):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    (out / "config.yaml").unlink()   # deleted, or a dry run's removal stopped midway
    for dry_run in (False, True):
        with pytest.raises(FileExistsError, match=r"holds the files of a run \(rewind.pt, summary.json, log.txt, "
                                                  r"level_00, level_01\) but no config.yaml"):
            pipeline.run(tiny("imp", levels=1), out, quiet=True, replace_dry_run=dry_run)
    for name in ("rewind.pt", "summary.json", "level_00", "level_01"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    with pytest.raises(FileExistsError, match=r"holds the files of a run \(log.txt\) but no config.yaml"):
        pipeline.run(tiny("imp", levels=1), out, quiet=True)   # it would append to another run's log
    killed = tmp_path / "killed"   # a start killed before its config.yaml was written
    killed.mkdir()
    (killed / ".started.yaml").write_text("method: imp\n")
    (killed / ".config.yaml.tmp12345").write_text("method: im")
    pipeline.run(tiny("dense"), killed, quiet=True)
    assert not list(killed.glob(".*tmp*")) and C.load(killed / ".started.yaml").method == "dense"


def test_a_new_run_names_an_out_it_cannot_make_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_data", lambda config: pytest.fail("the run started"))
    afile = tmp_path / "afile"
    afile.write_text("mine")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    access = os.access   # root may write anywhere: the permission as a user without root sees it
    monkeypatch.setattr(pipeline.os, "access", lambda path, mode: path != locked and access(path, mode))
    dangling, hidden = tmp_path / "dangling", tmp_path / "hidden"
    dangling.symlink_to(tmp_path / "gone")
    exists = Path.exists   # a folder that cannot be entered: asking about what is inside fails

    def entered(path, *args, **kwargs):
        if hidden in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return exists(path, *args, **kwargs)
    monkeypatch.setattr(Path, "exists", entered)
    for out, message in [(afile, f"{afile} is a file, not a folder: pick another --out"),
                         (afile / "run", f"{afile / 'run'} cannot be made: {afile} is a file"),
                         (locked / "a" / "run", f"{locked / 'a' / 'run'} cannot be made: no write permission on {locked}"),
                         (locked, f"{locked} cannot be written: no write permission on {locked}"),
                         (dangling, f"{dangling} is a link to nothing (to {tmp_path / 'gone'}): pick another --out"),
                         (hidden / "run", f"{hidden / 'run'} cannot be made: [Errno 13] Permission denied")]:
        with pytest.raises(FileExistsError, match=re.escape(message)):
            pipeline.run(tiny("imp", levels=1), out, quiet=True)
    assert afile.read_text() == "mine" and list(locked.iterdir()) == []


def test_a_run_stopped_by_bad_data_midway_says_it_can_be_resumed(tmp_path, monkeypatch, capsys):
    config, out = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text(C.dump(tiny("imp", levels=1)))

    def unreadable(*args):
        raise C.ConfigError("data.path: /data/train/a/3.png is not a readable image (truncated)")
    monkeypatch.setattr(pipeline, "_evaluate_level", unreadable)   # read as training goes
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3.png is not a readable image" in err
    assert f"the run stopped; once that is fixed, continue with `swamp resume {out}`" in err
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 2   # refused before it starts
    assert "the run stopped" not in capsys.readouterr().err


def test_resuming_a_finished_run_removes_what_a_kill_after_its_last_level_left(tmp_path):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    rundir.save(out / "checkpoint.pt", {"stage": 1})   # the last level's
    (out / ".summary.json.tmp12345").write_text("{")
    pipeline.resume(out, quiet=True)
    assert not (out / "checkpoint.pt").exists() and not list(out.glob(".*tmp*"))


def test_only_write_failures_are_called_failed_writes(tmp_path):
    def fails(error):
        def write(temp):
            raise error
        return write
    with pytest.raises(rundir.WriteError, match="file write failed"):
        rundir.atomic_write(tmp_path / "a.pt", fails(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                  "PytorchStreamWriter failed writing file data/0: "
                                                                  "file write failed")))
    with pytest.raises(RuntimeError, match="CUDA error: an illegal memory access") as raised:
        rundir.atomic_write(tmp_path / "a.pt", fails(RuntimeError("CUDA error: an illegal memory access")))
    assert not isinstance(raised.value, rundir.WriteError) and not list(tmp_path.iterdir())


def test_a_failed_write_names_the_file_and_how_to_continue(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(C.dump(tiny("imp", levels=1)))

    def full_disk(value, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 969280 vs 969200")
    monkeypatch.setattr(rundir.torch, "save", full_disk)
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"writing {out}/rewind.pt failed (RuntimeError: [enforce fail" in error
    assert f"the run stopped; continue with `swamp resume {out}`" in error and not list(out.glob(".*tmp*"))


def test_resuming_what_is_no_run_directory_says_what_it_is(tmp_path):
    (tmp_path / "file").write_text("")
    for path, what in ((tmp_path / "typo", "does not exist"), (tmp_path / "file", "is no run directory (a file)"),
                       (tmp_path, "holds no run (no config.yaml)")):
        with pytest.raises(FileNotFoundError, match=rf"{path} {re.escape(what)}"):
            pipeline.resume(path)


def test_levels_can_only_grow_past_what_the_run_has_reached(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=2), out, quiet=True)
    (out / "level_02" / "metrics.json").unlink()   # killed in level 2 ...
    with monkeypatch.context() as patch:   # ... after a checkpoint of it, written on a GPU
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        rundir.save(out / "checkpoint.pt", {"stage": 2, "weights": torch.ones(3)})
    shutil.rmtree(out / "level_02")
    for argv in (["--set", "levels=1"], []):
        if not argv:   # the same by hand
            (out / "config.yaml").write_text(_edited(out, "levels=1"))
        assert cli.main(["resume", str(out), "--quiet", *argv]) == 2
        assert f"config key 'levels': 1 is below level 2, which the run in {out} has reached already; a run's " \
               "levels can only grow" in capsys.readouterr().err
        assert (out / "checkpoint.pt").is_file()


def test_a_finished_run_being_ended_by_another_process_keeps_its_files(tmp_path):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    (out / ".summary.json.tmp12345").write_text("{")   # being written by the process that holds the lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from swamp.runlock import RunLock; "
                               f"lock = RunLock({str(out)!r}); lock.acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        pipeline.resume(out, quiet=True)
        assert (out / ".summary.json.tmp12345").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_a_dry_run_names_the_files_it_will_not_delete(tmp_path, capsys):
    config, out = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text(C.dump(tiny("imp", levels=1)))
    assert cli.main(["run", str(config), "--out", str(out), "--dry-run", "--quiet"]) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(["run", str(config), "--out", str(out), "--dry-run", "--quiet"]) == 2
    assert "already holds a run that is not a dry run, or files besides one (notes.txt)" in capsys.readouterr().err


@pytest.mark.parametrize("finished", [False, True])
def test_a_run_without_its_started_config_is_checked_from_its_next_resume_on(tmp_path, capsys, finished):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    if not finished:
        (out / "level_01" / "metrics.json").unlink()
    (out / ".started.yaml").unlink()   # a run from before it was kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["resume", str(out), "--quiet"]) == 0
    assert [str(w.message) for w in caught if "started.yaml" in str(w.message)] == [
        f"{out} has no .started.yaml: this resume cannot check its config.yaml against the config the run started "
        "with (later resumes check against this one's)"]   # once
    assert C.load(out / ".started.yaml") == C.load(out / "config.yaml")


def test_a_checkpoint_that_is_no_checkpoint_is_named(tmp_path):
    out = tmp_path / "run"
    pipeline.run(tiny("imp", levels=1), out, quiet=True)
    rundir.save(out / "checkpoint.pt", [1, 2])
    with pytest.raises(rundir.DamagedFileError, match="checkpoint.pt is damaged: no checkpoint of a training stage"):
        pipeline.resume(out, quiet=True)

