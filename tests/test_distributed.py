"""Scale-out under torchrun on CPU (gloo): particle groups and data-parallel ranks reproduce the
single-process run, a killed job resumes, a stalled or crashed rank fails the job in time."""
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from swamp import distributed, evaluate, pipeline
from swamp import config as C
from swamp.data import load_data
from swamp.models import build_model
from swamp.train import TrainResult, stack_state, train_particles

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# SWAMP: 2 particles, as 2 particle groups of one rank each; pre-training (30 iterations: more than
# the 22 of an epoch, so it checkpoints too) on both ranks as data-parallel ranks. (An MLP: with
# BatchNorm, the float differences between vmapped and plain convolutions grow chaotically over a
# level; BatchNorm across ranks is checked by test_batch_norm_statistics_over_ranks.)
GROUPS = {"method": "swamp", "levels": 2, "prune_fraction": 0.3, "particles": 2, "rewind": {"iterations": 30},
          "model": {"hidden": [32]}, "swa": {"start": 0.5, "lr": 0.02},
          "train": {"epochs": 4, "batch_size": 64, "lr": 0.05, "milestones": [2]}, "device": "cpu",
          "distributed": {"particle_groups": 2, "timeout_s": 30}}
# IMP on an MLP (no BatchNorm): 1 particle on 2 data-parallel ranks, same global batch.
DATA_PARALLEL = {"method": "imp", "levels": 2, "prune_fraction": 0.3, "rewind": {"iterations": 4},
                 "model": {"hidden": [32]}, "train": {"epochs": 3, "batch_size": 64, "lr": 0.05,
                                                      "milestones": [2]}, "device": "cpu"}


def torchrun(*args: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def write_config(directory: Path, values: dict) -> Path:
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def single_process(values: dict, out: Path) -> dict:
    torch.set_num_threads(1)
    config = C.from_dict({**values, "distributed": {}})
    return pipeline.run(config, out, quiet=True)


def assert_same_run(a: Path, b: Path, atol: float) -> None:
    """Same levels, bitwise-equal masks, final and particle weights equal within ``atol``."""
    summary_a, summary_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert len(summary_a["levels"]) == len(summary_b["levels"])
    for level_a, level_b in zip(summary_a["levels"], summary_b["levels"]):
        assert level_a["density"] == level_b["density"]
        assert level_a["test_accuracy"] == pytest.approx(level_b["test_accuracy"], abs=0.01)
        assert len(level_a["particle_test_accuracy"]) == len(level_b["particle_test_accuracy"])
    for level in range(len(summary_a["levels"])):
        directory = f"level_{level:02d}"
        masks_a, masks_b = (torch.load(d / directory / "mask.pt") for d in (a, b))
        assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
        for name in ("model.pt", "particles.pt"):
            if (a / directory / name).exists() or (b / directory / name).exists():
                state_a, state_b = (torch.load(d / directory / name) for d in (a, b))
                assert state_a.keys() == state_b.keys()
                for key in state_a:
                    torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def groups_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    config = write_config(root, GROUPS)
    distributed = torchrun("-m", "swamp", "run", str(config), "--out", str(root / "distributed"), "--quiet")
    single_process(GROUPS, root / "single")
    finish(distributed)
    return root, config


def test_particle_groups_match_the_single_process_run(groups_runs):
    root, _ = groups_runs
    assert_same_run(root / "single", root / "distributed", atol=2e-5)
    particles = torch.load(root / "distributed" / "level_01" / "particles.pt")
    name = next(n for n, t in particles.items() if t.is_floating_point() and t.dim() > 1)
    assert particles[name].shape[0] == 2 and not torch.equal(particles[name][0], particles[name][1])
    assert not (root / "distributed" / "checkpoint.pt").exists()


def test_rank_zero_alone_writes(groups_runs):
    root, _ = groups_runs
    names = sorted(p.name for p in (root / "distributed").iterdir())
    assert names == [".lock", ".started.yaml", "config.yaml", "level_00", "level_01", "level_02", "log.txt", "rewind.pt",
                     "summary.json"]
    assert not list((root / "distributed").rglob(".*tmp*")), "a temporary file was left behind"
    log = (root / "distributed" / "log.txt").read_text()
    assert log.count("level 1 stage 1 epoch 2/4") == 1   # one writer, not one per rank
    assert log.count("pretrain stage -1 epoch 1/4") == 1


def test_data_parallel_ranks_match_the_same_global_batch(tmp_path):
    values = {**DATA_PARALLEL, "distributed": {"particle_groups": 1, "timeout_s": 30}}
    config = write_config(tmp_path, values)
    distributed = torchrun("-m", "swamp", "run", str(config), "--out", str(tmp_path / "distributed"), "--quiet")
    single_process(values, tmp_path / "single")
    finish(distributed)
    assert_same_run(tmp_path / "single", tmp_path / "distributed", atol=2e-5)


def test_killed_distributed_run_resumes(groups_runs, tmp_path):
    root, config = groups_runs
    out = tmp_path / "killed"
    # slowed steps: a window to kill the job in, on a busy machine too
    process = torchrun(str(ROOT / "tests" / "distributed_worker.py"), "slow", "run", str(config), "--out", str(out),
                       "--quiet")
    deadline = time.time() + 200
    while not (out / "checkpoint.pt").exists() or not (out / "level_00" / "metrics.json").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    workers = descendants(process.pid)   # in sessions of their own: killing torchrun's group leaves them
    for pid in [*workers, process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert len(workers) >= 2 and not (out / "level_02" / "metrics.json").exists()
    finish(torchrun("-m", "swamp", "resume", str(out), "--quiet"))
    assert "resumed: " in (out / "log.txt").read_text()   # the resume trained (the run had not gone on)
    assert_same_run(root / "single", out, atol=2e-5)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid``, children first (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:   # ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(0), [])
        found += children
        queue += children
    return found


@pytest.mark.parametrize("fault", ["stall", "crash", "crash_rank_0", "stall_in_step"])
def test_a_failed_rank_ends_the_job_with_an_error(tmp_path, fault):
    timeout = 5
    # stall_in_step: one network on 2 data-parallel ranks (DDP); else 2 particle groups
    base, groups = (DATA_PARALLEL, 1) if fault == "stall_in_step" else (GROUPS, 2)
    values = {**base, "levels": 0, "rewind": {"iterations": 0}, "train": {**base["train"], "epochs": 1},
              "distributed": {"particle_groups": groups, "timeout_s": timeout}}
    config = write_config(tmp_path, values)
    started = time.time()
    # torchrun ends the other ranks once one has failed: they get 5 s to notice first (its default 0.1 s can
    # be too short on a busy machine) where the test checks what a survivor says
    patience = ["--monitor-interval", "5"] if fault == "crash_rank_0" else []
    process = torchrun(*patience, str(ROOT / "tests" / "distributed_worker.py"), fault, "run", str(config),
                       "--out", str(tmp_path / "run"), "--quiet")
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.time() - started < 60
    if fault != "crash":   # a survivor says what happened and how to go on (rank 0 too may be lost)
        assert "another rank died, could not be reached, or stalled" in output and f"timeout_s = {timeout}" in output, \
            output[-3000:]
        assert (f"swamp run: the job stopped; continue with the same torchrun line with `swamp resume "
                f"{tmp_path / 'run'}`") in output, output[-3000:]
    assert not (tmp_path / "run" / "level_00" / "metrics.json").exists()


def test_a_rank_that_never_joins_is_a_distributed_error(monkeypatch):
    """The store's wait for a missing rank times out inside init_process_group: the job's
    DistributedError (exit code 1, the timeout named), not torch's traceback."""
    def never_joined(*args, **kwargs):
        raise torch.distributed.DistStoreError("wait timeout after 5000ms, keys: /default_pg/0//cpu//0/1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", never_joined)
    with pytest.raises(distributed.DistributedError,
                       match=r"rank 0 of 2: joining the job failed: .*distributed.timeout_s = 5 s \(wait timeout after 5000ms"):
        distributed.setup(particle_groups=1, timeout_s=5, device="cpu")


def test_one_gpu_index_for_every_rank_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="'device': cuda:1 would put every rank"):
        distributed.setup(particle_groups=1, timeout_s=5, device="cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="'device': cuda, but torch sees no CUDA device here"):
        distributed.setup(particle_groups=1, timeout_s=5, device="cuda")


def _on_ranks(body, world: int = 4) -> dict:
    """{rank: ``body(topology)``} of a spawned gloo world of ``world`` processes as 2 particle groups."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(body, world, 29500 + os.getpid() % 1000, results), nprocs=world)
        return dict(results)


def _rank(rank: int, body, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results[rank] = body(distributed.setup(particle_groups=2, timeout_s=30, device="cpu"))
    distributed.teardown()


def _collectives(topology: distributed.Topology) -> dict:
    """One rank's view of a 4-process world as 2 particle groups x 2 data ranks."""
    rank = topology.world.index
    out = {"data": topology.data.ranks, "cross": topology.cross.ranks, "group": topology.group,
           "placement": topology.placement(4).particles, "single": topology.placement(1).particles,
           "single_data": topology.placement(1).data.ranks}
    values = [torch.full((2, 3), float(rank)), torch.tensor([rank], dtype=torch.int64),
              torch.tensor([rank % 2 == 0])]
    topology.data.all_reduce_(values[:2], mean=False)
    out["sums"] = [v.tolist() for v in values[:2]]
    topology.world.broadcast_(values, src=3)
    out["broadcast"] = [v.tolist() for v in values]
    out["gathered"] = [t.tolist() for t in topology.cross.gather_cat([torch.full((1, 2), float(rank))]) or []]
    out["objects"] = topology.world.all_gather_object(rank * 10)
    data = load_data(C.DataConfig(name="synthetic", shape=[2, 4, 4], classes=3, train_size=40, test_size=8))
    torch.manual_seed(0)
    net = build_model(C.ModelConfig(name="cifar_resnet_8"), data.input_shape, data.num_classes)
    evaluate.recompute_bn_(net, data, batch_size=6, group=topology.world)
    out["bn"] = {n: t.clone() for n, t in net.state_dict().items() if "running" in n or "tracked" in n}
    return out


def test_group_collectives_and_batch_norm_statistics_over_ranks():
    world = 4
    results = _on_ranks(_collectives, world)
    assert [results[r]["data"] for r in range(world)] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [results[r]["cross"] for r in range(world)] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [results[r]["placement"] for r in range(world)] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert all(results[r]["single"] == (0,) and results[r]["single_data"] == (0, 1, 2, 3) for r in range(world))
    assert results[2]["sums"] == [[[5.0] * 3] * 2, [5]]
    assert all(results[r]["broadcast"] == [[[5.0] * 3] * 2, [5], [False]] for r in range(world))  # rank 3 after its sums
    assert results[0]["gathered"] == [[[0.0, 0.0], [2.0, 2.0]]] and results[1]["gathered"] == [[[1.0, 1.0], [3.0, 3.0]]]
    assert results[2]["gathered"] == [] and results[3]["objects"] == [0, 10, 20, 30]
    data = load_data(C.DataConfig(name="synthetic", shape=[2, 4, 4], classes=3, train_size=40, test_size=8))
    torch.manual_seed(0)
    net = build_model(C.ModelConfig(name="cifar_resnet_8"), data.input_shape, data.num_classes)
    evaluate.recompute_bn_(net, data, batch_size=6)
    expected = {n: t for n, t in net.state_dict().items() if "running" in n or "tracked" in n}
    for r in range(world):
        assert results[r]["bn"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(results[r]["bn"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def _test_data(test_size: int):
    return load_data(C.DataConfig(name="synthetic", shape=[6], classes=3, train_size=12, test_size=test_size))


def _mlp(data):
    torch.manual_seed(0)
    return build_model(C.ModelConfig(hidden=[16]), data.input_shape, data.num_classes)


def test_sharded_test_counts_sum_to_the_unsharded_accuracy():
    data = _test_data(27)    # batches of 6, 6, 6, 6, 3
    net = _mlp(data)
    probs, labels = evaluate.probabilities(net, data, 6)
    assert evaluate.accuracy(probs, labels) == (probs.argmax(-1) == labels).float().mean().item()
    batches = torch.arange(len(labels)).split(6)
    for count in (2, 3, 7):  # 7 ranks: the last two have no batch
        shards = [evaluate.probabilities(net, data, 6, shard=(i, count)) for i in range(count)]
        for i, (shard_probs, shard_labels) in enumerate(shards):
            rows = torch.cat([torch.zeros(0, dtype=torch.long), *batches[i::count]])
            torch.testing.assert_close(shard_probs, probs[rows], rtol=0, atol=0)
            assert torch.equal(shard_labels, labels[rows])
        counts = sum(evaluate.correct(*shard) for shard in shards)
        examples = sum(len(shard_labels) for _, shard_labels in shards)
        assert evaluate.accuracies(counts, examples) == [evaluate.accuracy(probs, labels)]
    assert evaluate.test_accuracy(net, data, 6) == evaluate.accuracy(probs, labels)


# Test sets in batches of 6 over 2 particle groups x 2 data ranks: 16 examples are 3 batches
# (data ranks take 2 and 1, the 4 ranks 1, 1, 1 and 0); 5 examples are one batch (data rank 1
# and ranks 1-3 get none).
TEST_SIZES = (16, 5)


def _count_batches(data) -> list[str]:
    """Grows by the split of each batch ``data.eval_batches`` yields from now on."""
    seen, batches = [], data.eval_batches
    def counted(split, batch_size, shard=(0, 1)):
        for batch in batches(split, batch_size, shard):
            seen.append(split)
            yield batch
    data.eval_batches = counted
    return seen


def _level_metrics(topology: distributed.Topology) -> dict:
    """{(test size, particles): (metrics of _evaluate_level, test batches this rank evaluated)}
    on fixed particles of an MLP (no BatchNorm: its statistics would be the same only to
    rounding)."""
    out = {}
    for test_size in TEST_SIZES:
        data = _test_data(test_size)
        model = _mlp(data)
        evaluated = _count_batches(data)
        for particles in (4, 1):
            noise = torch.Generator().manual_seed(1)
            state = {n: t + 0.5 * torch.randn(t.shape, generator=noise)
                     for n, t in stack_state(model, particles).items()}
            placement = topology.placement(particles)
            mine = {n: t[list(placement.particles)] for n, t in state.items()}
            evaluated.clear()
            _, metrics = pipeline._evaluate_level(model, TrainResult(mine, False, 0.0, 0, 0.0), data,
                                                  C.from_dict({"train": {"batch_size": 6}}), {}, placement,
                                                  topology.world)
            out[test_size, particles] = metrics, evaluated.count("test")
    return out


def test_sharded_evaluation_gives_the_single_process_metrics():
    single = distributed.setup(particle_groups=1, timeout_s=30, device="cpu")
    expected = _level_metrics(single)
    results = _on_ranks(_level_metrics)
    # test batches evaluated by ranks 0-3: their particles' share, then their share of the average's;
    # one particle: the world's ranks are its data-parallel ranks
    batches = {(16, 4): [2 * 2 + 1, 2 * 1 + 1, 2 * 2 + 1, 2 * 1 + 0], (16, 1): [1, 1, 1, 0],
               (5, 4): [2 * 1 + 1, 0, 2 * 1 + 0, 0], (5, 1): [1, 0, 0, 0]}
    for case, (metrics, _) in expected.items():
        assert len(metrics["particle_test_accuracy"]) == case[1]
        assert [results[r][case][0] for r in range(4)] == [metrics] * 4, case
        assert [results[r][case][1] for r in range(4)] == batches[case], case


def _batch_above_the_training_set(topology: distributed.Topology, out: Path) -> str:
    config = C.from_dict({"method": "swamp", "particles": 2, "rewind": {"iterations": 5}, "device": "cpu",
                          "train": {"batch_size": 4096}, "distributed": {"particle_groups": 2}})
    try:
        pipeline._execute(config, out, True, topology, new=True)
    except C.ConfigError as error:
        return str(error)
    return "no error"


def test_a_batch_above_the_training_set_that_does_not_split_is_a_config_error(tmp_path):
    """digits has 1437 training examples: a batch of 4096 is all of them, odd, so pre-training on
    2 ranks cannot split it; the run is refused before its directory is written."""
    out = tmp_path / "run"
    messages = _on_ranks(functools.partial(_batch_above_the_training_set, out=out), world=2)
    assert set(messages.values()) == {
        "config key 'train.batch_size': 4096 is above the 1437 training examples, so a batch holds all 1437, "
        "which does not split over the 2 ranks that pre-train together"}
    assert not out.exists()


def _odd_batch(particle_groups: int) -> C.Config:
    """Pre-training on every rank of 2 cannot split a batch of all 1437 digits (odd); 2 groups of
    one data rank each can train the level."""
    return C.from_dict({"method": "swamp", "levels": 0, "particles": 2, "rewind": {"iterations": 1},
                        "model": {"hidden": [8]}, "device": "cpu", "train": {"epochs": 2, "batch_size": 4096},
                        "distributed": {"particle_groups": particle_groups}})


def _resume_on_two_groups(topology: distributed.Topology, out: Path) -> str:
    try:
        pipeline._execute(_odd_batch(2), out, True, topology)
    except C.ConfigError as error:
        return str(error)
    return "resumed"


def test_a_resume_past_pre_training_needs_no_batch_that_splits_over_every_rank(tmp_path):
    out = tmp_path / "run"
    torch.set_num_threads(1)
    pipeline.run(_odd_batch(1), out, quiet=True)   # one process: pre-trains, then level 0
    (out / "level_00" / "metrics.json").unlink()   # level 0 unfinished; rewind.pt holds the pre-training
    assert set(_on_ranks(functools.partial(_resume_on_two_groups, out=out), world=2).values()) == {"resumed"}
    assert (out / "level_00" / "metrics.json").is_file()


def _images_config() -> C.Config:
    return C.from_dict({"model": {"hidden": [16]}, "swa": {"start": 0.5},
                        "train": {"epochs": 3, "batch_size": 4, "checkpoint_every": 1}})


def _train_two_groups(topology: distributed.Topology) -> tuple[int, list]:
    """(the stage's particle-images, the epoch checkpoints) of 2 particles trained by 2 groups."""
    data = _test_data(6)
    net = _mlp(data)
    checkpoints = []
    result = train_particles(net, stack_state(net, 1), data, _images_config(), stage=0, begin=0, end=9, swa=True,
                             placement=topology.placement(2), checkpoint=checkpoints.append)
    return result.images, [c for c in checkpoints if c is not None]


def test_particle_images_count_every_rank_also_after_resuming_on_another_layout():
    results = _on_ranks(_train_two_groups, world=2)
    data = _test_data(6)
    net = _mlp(data)
    single = train_particles(net, stack_state(net, 2), data, _images_config(), stage=0, begin=0, end=9, swa=True)
    assert single.images == 2 * 4 * 9 and [results[r][0] for r in range(2)] == [single.images] * 2
    checkpoints = results[0][1]
    assert [c["images"] for c in checkpoints] == [2 * 4 * 3, 2 * 4 * 6] and results[1][1] == []
    for checkpoint in checkpoints:   # resumed by one process holding both particles
        resumed = train_particles(net, stack_state(net, 2), data, _images_config(), stage=0, begin=0, end=9,
                                  swa=True, resume=checkpoint)
        assert resumed.images == single.images
