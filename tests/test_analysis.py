"""swamp.analysis: Hessian eigenvalues/trace against closed forms, barriers, mask overlap, run analyses and CLI."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import swamp
from swamp import cli, evaluate, pipeline
from swamp import config as C
from swamp.analysis import (Batches, data_eval_fn, hessian_trace, instability, interpolation_barrier,
                            l2_distance, mask_overlap, successive_barriers, top_hessian_eigenvalues)
from swamp.data import load_data
from swamp.rundir import DamagedFileError
from test_pipeline import tiny


def squared_error(outputs, targets):
    return (outputs.squeeze(-1) - targets).square().mean()


def least_squares(n=240, d=40, seed=0, orthogonal=False):
    """(model, batches, exact Hessian 2 X^T X / n): linear least squares in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    if orthogonal:   # orthogonal columns of varied norms: a diagonal Hessian
        q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
        x = q * torch.linspace(1.0, 9.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, 1, bias=False)).double()
    batches = [(x[i:i + 80], y[i:i + 80]) for i in range(0, n, 80)]   # equal batches: mean of means = mean
    return model, batches, (2 * x.T @ x / n).numpy()


def random_mask(d, seed=1, density=0.5):
    return torch.rand(1, d, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_top_eigenvalues_match_eigvalsh(k, masked):
    model, batches, hessian = least_squares()
    masks = None
    if masked:
        swamp.sparsify(model)
        swamp.set_masks(model, {"0.weight": random_mask(hessian.shape[0])})
        masks = swamp.masks(model)
        keep = masks["0.weight"][0].numpy()
        hessian = hessian[np.ix_(keep, keep)]   # the principal submatrix on unpruned coordinates
    expected = np.linalg.eigvalsh(hessian)[::-1][:k]
    top = top_hessian_eigenvalues(model, squared_error, batches, k=k, masks=masks)
    got = top.values
    assert len(got) == k and top.converged
    np.testing.assert_allclose(got, expected, rtol=1e-3)


def diagonal_hessian(norms, n=240):
    """(model, batches, eigenvalues descending) of least squares on orthogonal columns of ``norms``."""
    norms = torch.tensor(norms, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(n, len(norms), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    model = nn.Sequential(nn.Linear(len(norms), 1, bias=False)).double()
    return model, [(q * norms, torch.zeros(n, dtype=torch.float64))], sorted((2 * norms ** 2 / n).tolist(),
                                                                            reverse=True)


def test_repeated_eigenvalues_are_found_as_often_as_they_occur():
    """A diagonal Hessian with a threefold top eigenvalue: one Krylov space holds one copy of each
    distinct eigenvalue, so Lanczos must restart beside it to find the others."""
    model, batches, expected = diagonal_hessian([3.0, 3.0, 3.0, 2.0, 2.0, 1.5, 1.0, 1.0, 0.5, 0.25])
    for k in (3, 5, 10):
        got = top_hessian_eigenvalues(model, squared_error, batches, k=k, iters=10).values
        np.testing.assert_allclose(got, expected[:k], rtol=1e-9)


def test_masks_restrict_a_plain_model_too():
    """Projection alone (no masked layer) gives the principal submatrix; the model is not changed."""
    model, batches, hessian = least_squares(d=60, seed=3)
    before = model[0].weight.detach().clone()
    mask = random_mask(60, seed=4, density=0.3)
    keep = mask[0].numpy()
    got = top_hessian_eigenvalues(model, squared_error, batches, k=2, masks={"0.weight": mask}).values
    np.testing.assert_allclose(got, np.linalg.eigvalsh(hessian[np.ix_(keep, keep)])[::-1][:2], rtol=1e-3)
    assert torch.equal(model[0].weight, before) and model.training


def test_too_few_iterations_warn_that_the_eigenvalues_did_not_converge(recwarn):
    model, batches, hessian = least_squares()
    with pytest.warns(UserWarning, match=r"3 Lanczos iterations ended before the top 3 eigenvalues converged "
                                         r"\(relative residual up to .* > tol 0.0001\): they may be too low"):
        got = top_hessian_eigenvalues(model, squared_error, batches, k=3, iters=3)
    assert not got.converged and got.values[2] < 0.9 * np.linalg.eigvalsh(hessian)[::-1][2]   # indeed too low
    assert top_hessian_eigenvalues(model, squared_error, batches, k=3, iters=100).converged
    x = torch.randn(1, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rank_one = nn.Sequential(nn.Linear(50, 1, bias=False)).double()   # H = 2 x^T x: Lanczos restarts
    got = top_hessian_eigenvalues(rank_one, squared_error, [(x, torch.zeros(1, dtype=torch.float64))], iters=10)
    assert got.values == pytest.approx([2 * float(x.square().sum())], rel=1e-9) and got.converged
    assert not recwarn.list   # exact at the first invariant subspace: no warning
    model, batches, expected = diagonal_hessian([3.0, 3.0, 1.0])   # one Krylov space: 2 distinct values
    with pytest.warns(UserWarning, match=r"ended searching for more copies of repeated eigenvalues"):
        got = top_hessian_eigenvalues(model, squared_error, batches, k=2, iters=2)
    assert not got.converged and got.values[1] < expected[1]   # the second copy of the top one is indeed missing


def test_eigenvalues_argument_errors():
    model, batches, _ = least_squares(d=8)
    with pytest.raises(ValueError, match="k must lie in"):
        top_hessian_eigenvalues(model, squared_error, batches, k=3, masks={"0.weight": random_mask(8, density=0.1)})
    with pytest.raises(ValueError, match="no trainable parameters"):
        top_hessian_eigenvalues(model, squared_error, batches, masks={"weight": torch.ones(1, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="batches is empty"):
        top_hessian_eigenvalues(model, squared_error, [])


def test_hutchinson_is_exact_on_a_diagonal_hessian():
    model, batches, hessian = least_squares(orthogonal=True)
    mask = random_mask(40, seed=2)
    assert hessian_trace(model, squared_error, batches, samples=3) == (pytest.approx(np.trace(hessian), rel=1e-9),
                                                                       pytest.approx(0, abs=1e-9))   # every probe exact
    keep = mask[0].numpy()
    assert hessian_trace(model, squared_error, batches, masks={"0.weight": mask}, samples=3).trace == \
        pytest.approx(np.trace(hessian[np.ix_(keep, keep)]), rel=1e-9)


class TiedLayer(nn.Module):
    """One layer under two names, ``layer`` and ``tied``."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = self.tied = layer

    def forward(self, x):
        return self.layer(x)


def test_a_tied_weight_is_masked_by_any_of_its_names():
    """named_parameters lists a tied weight once, under its first name; masks may use any name
    (swamp.masks names it after the masked layer), and masks of one weight combine (&)."""
    plain, batches, hessian = least_squares(orthogonal=True)
    model = TiedLayer(plain[0])
    first, second = random_mask(40, seed=2), random_mask(40, seed=5)
    keep = (first & second)[0].numpy()
    expected = pytest.approx(np.trace(hessian[np.ix_(keep, keep)]), rel=1e-9)
    assert hessian_trace(model, squared_error, batches, masks={"tied.weight": first & second}, samples=3).trace \
        == expected
    assert hessian_trace(model, squared_error, batches, masks={"layer.weight": first, "tied.weight": second},
                         samples=3).trace == expected


def test_hutchinson_within_five_standard_errors():
    """Tolerance: 5 * sqrt(2 * sum_{i != j} H_ij^2 / samples), the estimator's standard error."""
    model, batches, hessian = least_squares()
    samples = 200
    off_diagonal = (hessian ** 2).sum() - (np.diag(hessian) ** 2).sum()
    tolerance = 5 * np.sqrt(2 * off_diagonal / samples)
    estimate, standard_error = hessian_trace(model, squared_error, batches, samples=samples, seed=7)
    assert abs(estimate - np.trace(hessian)) <= tolerance
    assert standard_error == pytest.approx(tolerance / 5, rel=0.3)   # the probes' spread tells it
    assert hessian_trace(model, squared_error, batches, samples=1).standard_error is None
    assert estimate == hessian_trace(model, squared_error, batches, samples=samples, seed=7).trace   # seeded


def test_mask_overlap_on_hand_made_masks():
    a = {"a.weight": torch.tensor([[True, True, False, False]]), "b.weight": torch.tensor([True, False])}
    b = {"a.weight": torch.tensor([[True, False, True, False]]), "b.weight": torch.tensor([True, False])}
    result = mask_overlap(a, b)
    assert result["layers"] == {"a.weight": pytest.approx(1 / 3), "b.weight": 1.0}
    assert result["global"] == pytest.approx(2 / 4)   # intersections 1 + 1, unions 3 + 1
    empty = {"a.weight": torch.zeros(3, dtype=torch.bool)}
    assert mask_overlap(empty, empty) == {"layers": {"a.weight": 1.0}, "global": 1.0}
    with pytest.raises(ValueError, match="different weights"):
        mask_overlap(a, {"a.weight": a["a.weight"]})
    with pytest.raises(ValueError, match="shape"):
        mask_overlap({"a.weight": torch.ones(2, dtype=torch.bool)}, {"a.weight": torch.ones(3, dtype=torch.bool)})


def test_l2_distance():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "b": torch.tensor([12.0]), "n": torch.tensor(5)}
    assert l2_distance(a, b) == pytest.approx(13.0)
    assert l2_distance(a, b, ["w"]) == pytest.approx(5.0)


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(2)
    return load_data(C.DataConfig())


def train(model, data, seed, epochs, lr=0.1, weight_decay=0.0):
    """Full-batch-ish SGD with momentum, order from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for x, y in data.train_batches([g], 64, False):
            opt.zero_grad()
            F.cross_entropy(model(x[0]), y[0]).backward()
            opt.step()
    return model.eval()


def test_barrier_is_zero_on_a_convex_problem(digits):
    """Logistic regression with weight decay: one minimum; both ends converge to it."""
    ends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ends.append(train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits, seed, epochs=30, lr=0.05, weight_decay=1e-3))
    path = interpolation_barrier(ends[0], ends[0].state_dict(), ends[1].state_dict(), data_eval_fn(digits, 256))
    losses = path["losses"]
    assert abs(path["barrier"]) <= 0.01
    # convexity: the loss on the segment never exceeds the chord
    assert all(l <= (1 - a) * losses[0] + a * losses[-1] + 1e-6 for a, l in zip(path["alphas"], losses))


def test_barrier_is_large_between_independent_mlps(digits):
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(train(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)), digits, seed, epochs=10))
    path = interpolation_barrier(nets[0], nets[0].state_dict(), nets[1].state_dict(), data_eval_fn(digits, 256),
                                 num_points=5)
    accuracy = [evaluate.accuracy(*evaluate.probabilities(n, digits, 256)) for n in nets]
    assert path["alphas"] == [0, 0.25, 0.5, 0.75, 1]
    assert path["errors"][0] == pytest.approx(1 - accuracy[0]) and path["errors"][-1] == pytest.approx(1 - accuracy[1])
    assert min(accuracy) > 0.85 and path["barrier"] > 0.2, path   # narrow deep MLPs: 0.49-0.70 over 4 seed pairs


def test_eval_fn_measures_the_split_it_names(digits):
    torch.manual_seed(0)
    net = train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits, 0, epochs=2)
    for split, x, y in (("test", digits.x_test, digits.y_test), ("train", digits.x_train, digits.y_train)):
        with torch.no_grad():
            logits = net(x)
        error, loss = data_eval_fn(digits, 100, split)(net)
        assert error == pytest.approx((logits.argmax(-1) != y).double().mean().item())
        assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    for wrong in (lambda: data_eval_fn(digits, 100, "val"), lambda: evaluate.probabilities(net, digits, 100, "val")):
        with pytest.raises(ValueError, match="split must be one of test, train, got 'val'"):
            wrong()


def test_bn_statistics_are_recomputed_at_every_point(digits):
    torch.manual_seed(0)
    net = train(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)),
                digits, 0, epochs=3)
    broken = {n: t.clone() for n, t in net.state_dict().items()}
    broken["2.running_mean"] += 50.0   # stale statistics, as after weight averaging
    eval_fn = data_eval_fn(digits, 256)
    fixed = evaluate.recompute_bn_(evaluate.network(net, broken), digits, 256)
    path = interpolation_barrier(net, broken, broken, eval_fn, num_points=3, bn_loader=Batches(digits, "train", 100))
    stale = interpolation_barrier(net, broken, broken, eval_fn, num_points=3)
    assert path["errors"] == [pytest.approx(eval_fn(fixed)[0])] * 3 and path["barrier"] == pytest.approx(0)
    assert stale["errors"][0] > path["errors"][0] + 0.3


@pytest.fixture(scope="module")
def swamp_run(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("runs") / "swamp"
    pipeline.run(tiny("swamp"), out, quiet=True)
    return out


def test_successive_barriers_on_a_swamp_run(swamp_run):
    result = successive_barriers(swamp_run, num_points=3)
    summary = json.loads((swamp_run / "summary.json").read_text())
    assert [(r["from_level"], r["to_level"]) for r in result["levels"]] == [(0, 1), (1, 2)]
    assert [r["density"] for r in result["levels"]] == [m["density"] for m in summary["levels"][1:]]
    for row in result["levels"]:   # the ends are the levels' own solutions
        assert row["errors"][0] == pytest.approx(1 - summary["levels"][row["from_level"]]["test_accuracy"])
        assert row["errors"][-1] == pytest.approx(1 - summary["levels"][row["to_level"]]["test_accuracy"])
        assert row["l2_distance"] > 0
    assert [p["level"] for p in result["particles"]] == [0, 1, 2]
    for level in result["particles"]:
        accuracies = summary["levels"][level["level"]]["particle_test_accuracy"]
        (pair,) = level["pairs"]
        assert (pair["a"], pair["b"]) == (0, 1) and len(level["to_average"]) == 2
        assert pair["errors"][0] == pytest.approx(1 - accuracies[0]) and pair["errors"][-1] == pytest.approx(1 - accuracies[1])
        assert level["to_average"][0]["errors"][-1] == pytest.approx(1 - summary["levels"][level["level"]]["test_accuracy"])


def test_bn_statistics_along_a_path_come_from_the_batches_asked_for(tmp_path, monkeypatch):
    """--bn-batches N: N un-augmented training batches drawn at random without repeats, the same at
    every point; by default every training example once, in order."""
    from swamp.analysis import load_run
    out = tmp_path / "bn"
    pipeline.run(C.from_dict({"method": "imp", "levels": 1, "model": {"name": "cifar_resnet_8_4"}, "device": "cpu",
                              "rewind": {"iterations": 0}, "train": {"epochs": 1, "batch_size": 256, "milestones": []}}),
                 out, quiet=True)
    seen, recompute = [], evaluate.recompute_bn_

    def recorded(net, data, batch_size, *args, **kwargs):
        seen.append(torch.cat([x for x, _ in data.eval_batches("train", batch_size)]))
        return recompute(net, data, batch_size, *args, **kwargs)
    monkeypatch.setattr(evaluate, "recompute_bn_", recorded)
    run = load_run(out)
    state = run.state(1)
    path = run.barrier(state, state, 3, bn_batches=2)
    assert path["bn_batches"] == 2 and len(seen) == 3 and all(torch.equal(x, seen[0]) for x in seen)
    assert seen[0].shape[0] == 512 and len(seen[0].unique(dim=0)) == 512
    assert not torch.equal(seen[0][:256], run.data.x_train[:256])
    seen.clear()
    assert run.barrier(state, state, 2)["bn_batches"] is None and len(seen) == 2
    assert torch.equal(seen[0], run.data.x_train)
    with pytest.raises(ValueError, match="bn_batches must be None .* or an int >= 1, got 0"):
        run.barrier(state, state, 2, bn_batches=0)
    assert run.barrier(state, state, 2, bn_batches=1000)["bn_batches"] == run.data.steps_per_epoch(256)   # all drawn


def test_successive_barriers_on_the_train_split(swamp_run):
    from swamp.analysis import load_run
    run = load_run(swamp_run)
    result = successive_barriers(swamp_run, num_points=2, split="train")
    assert result["split"] == "train" and [r["split"] for r in result["levels"]] == ["train", "train"]
    for row in result["levels"]:   # the ends' errors on the training set
        for level, error in ((row["from_level"], row["errors"][0]), (row["to_level"], row["errors"][-1])):
            net = evaluate.network(run.model, run.state(level))
            assert error == pytest.approx(1 - evaluate.accuracy(*evaluate.probabilities(net, run.data, 128, "train")))
    assert result["levels"][0]["errors"] != successive_barriers(swamp_run, num_points=2)["levels"][0]["errors"]


def test_instability_trains_two_copies(swamp_run):
    result = instability(swamp_run, 1, seeds=(1, 2), num_points=3)
    assert result["level"] == 1 and result["seeds"] == [1, 2] and result["l2_distance"] > 0
    assert all(e < 0.5 for e in (result["errors"][0], result["errors"][-1]))
    assert result == instability(swamp_run, 1, seeds=(1, 2), num_points=3)   # deterministic
    with pytest.raises(ValueError, match="two different"):
        instability(swamp_run, 1, seeds=(3, 3))
    with pytest.raises(FileNotFoundError, match="level 7 is not complete"):
        instability(swamp_run, 7)
    with pytest.raises(ValueError, match="split must be one of"):   # before training
        instability(swamp_run, 7, split="validation")


@pytest.mark.parametrize("argv, files", [
    (["levels", "{run}", "--points", "3"], ["levels_swamp.json", "levels_swamp.png"]),
    (["instability", "{run}", "--level", "2", "--points", "3"],
     ["instability_swamp_level_02_seeds_1_2.json", "instability_swamp_level_02_seeds_1_2.png"]),
    (["hessian", "{run}", "--k", "2", "--iters", "30", "--trace-samples", "4"],
     ["hessian_swamp.json", "hessian_swamp.png"]),
    (["barrier", "{run}/level_00", "{run}/level_02", "--points", "3"],
     ["barrier_swamp_00_swamp_02.json", "barrier_swamp_00_swamp_02.png"]),
    (["masks", "{run}/level_01", "{run}/level_02"], ["masks_swamp_01_swamp_02.json"]),
    (["layers", "{run}"], ["layers_swamp.json", "layers_swamp.png"]),
    (["levels", "{run}", "--points", "2", "--split", "train"], ["levels_swamp_train.json", "levels_swamp_train.png"]),
    (["barrier", "{run}/level_00", "{run}/level_02", "--points", "2", "--split", "train"],
     ["barrier_swamp_00_swamp_02_train.json", "barrier_swamp_00_swamp_02_train.png"]),
])
def test_cli_writes_json_and_plots(swamp_run, tmp_path, argv, files, capsys):
    out = tmp_path / "analysis"
    assert cli.main(["analyze", *[a.format(run=swamp_run) for a in argv], "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    for name in files:
        content = (out / name).read_bytes()
        assert content.startswith(b"\x89PNG") if name.endswith(".png") else json.loads(content)
    result = json.loads((out / files[0]).read_text())
    if argv[0] in ("levels", "barrier", "instability"):
        assert result["split"] == ("train" if "train" in argv else "test")
    if argv[0] == "hessian":
        assert [len(r["eigenvalues"]) for r in result["levels"]] == [2, 2, 2]
        assert all(r["eigenvalues"][0] >= r["eigenvalues"][1] > 0 and r["trace"] > 0 for r in result["levels"])
        from swamp.analysis import load_run
        weights = sum(p.numel() for p in load_run(swamp_run).model.parameters())
        for row in result["levels"]:   # the trace over the Hessian's size: the weights left unpruned
            pruned = sum(int((~m).sum()) for m in torch.load(swamp_run / f"level_0{row['level']}" / "mask.pt").values())
            assert row["trace_per_weight"] == pytest.approx(row["trace"] / (weights - pruned))
        assert f"({result['levels'][2]['trace_per_weight']:.3g} per unpruned weight)" in capsys.readouterr().out
    if argv[0] == "masks":
        masks = [torch.load(swamp_run / f"level_0{i}" / "mask.pt") for i in (1, 2)]
        kept = [sum(int(m.sum()) for m in level.values()) for level in masks]
        assert result["global"] == pytest.approx(kept[1] / kept[0])   # level 2's mask lies inside level 1's
        assert f"mask overlap (Jaccard) {result['global']:.4f}  l2_distance" in capsys.readouterr().out


def test_hessian_batches_are_drawn_at_random_the_same_for_every_level(swamp_run, monkeypatch):
    """Not the first batches in stored order (an ImageFolder's are a few classes): a seeded sample
    without repeats, the same for every level so that levels compare."""
    from swamp.analysis import TopEigenvalues, load_run, runs
    seen = []
    monkeypatch.setattr(runs, "top_hessian_eigenvalues",
                        lambda net, loss, batches, *rest: seen.append(batches) or TopEigenvalues([1.0], True))
    result = runs.level_hessians(swamp_run, batches=2, levels=[0, 1])
    assert result["batches"] == 2 and [r["converged"] for r in result["levels"]] == [True, True]
    run = load_run(swamp_run)
    size, (first, _) = run.batch_size, next(run.data.eval_batches("train", run.batch_size))
    drawn = torch.cat([x for x, _ in seen[0]])
    assert drawn.shape == (2 * size, *first.shape[1:]) and len(drawn.unique(dim=0)) == 2 * size
    assert not torch.equal(drawn[:size], first)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(*seen))


def test_hessian_keeps_each_level_as_it_is_done_and_computes_only_what_is_missing(swamp_run, tmp_path,
                                                                                 monkeypatch, capsys):
    from swamp.analysis import runs
    computed, top = [], runs.top_hessian_eigenvalues

    def counting(net, *args):
        computed.append(net)
        if len(computed) == 2 and stop:
            raise KeyboardInterrupt   # the analysis is stopped during level 1
        return top(net, *args)

    monkeypatch.setattr(runs, "top_hessian_eigenvalues", counting)
    out, hessian = tmp_path / "out", ["analyze", "hessian", str(swamp_run), "--iters", "20"]
    stop = True
    assert cli.main([*hessian, "--out", str(out)]) == 130
    assert [r["level"] for r in json.loads((out / "hessian_swamp.json").read_text())["levels"]] == [0]
    stop, computed[:] = False, []
    assert cli.main([*hessian, "--out", str(out)]) == 0
    assert len(computed) == 2 and "levels [0] already there with these settings; computing [1, 2]" in \
        capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert cli.main([*hessian, "--out", str(fresh)]) == 0
    result = json.loads((out / "hessian_swamp.json").read_text())
    assert result == json.loads((fresh / "hessian_swamp.json").read_text())
    assert [r["level"] for r in result["levels"]] == [0, 1, 2] and (out / "hessian_swamp.png").is_file()
    computed[:] = []
    assert cli.main([*hessian, "--out", str(out)]) == 0 and computed == []   # nothing missing
    assert cli.main([*hessian, "--out", str(out), "--levels", "1"]) == 0 and len(computed) == 1   # again
    assert json.loads((out / "hessian_swamp.json").read_text()) == result
    moved = tmp_path / "moved" / "swamp"   # a moved run keeps its analysis
    shutil.copytree(swamp_run, moved)
    shutil.copytree(out, moved / "analysis")
    computed[:] = []
    assert cli.main(["analyze", "hessian", str(moved), "--iters", "20"]) == 0 and computed == []
    kept = (out / "hessian_swamp.json").read_bytes()
    capsys.readouterr()
    assert cli.main([*hessian, "--out", str(out), "--iters", "21"]) == 2   # other settings: never overwritten
    assert "hessian_swamp.json holds results with other settings ({'k': 1, 'batches': 4, 'batch_seed': 0, " \
           "'iters': 20" in capsys.readouterr().err
    (moved / "level_01" / "metrics.json").write_text("{}")   # another solution (a run started again there)
    shutil.rmtree(moved / "level_02")                        # and a level this run does not have
    assert cli.main(["analyze", "hessian", str(moved), "--iters", "20", "--out", str(out)]) == 2
    assert "hessian_swamp.json holds results of levels [1, 2] that are not this run's (another run, or one " \
           "started again here): pick another --out" in capsys.readouterr().err
    assert (out / "hessian_swamp.json").read_bytes() == kept
    (out / "hessian_swamp.json").write_text("[]")
    assert cli.main([*hessian, "--out", str(out)]) == 2
    assert "hessian_swamp.json is no hessian analysis file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, name", [
    (["levels", "{run}", "--points", "2"], "levels_swamp.json"),
    (["instability", "{run}", "--level", "1", "--points", "2", "--seeds", "3", "-4"],
     "instability_swamp_level_01_seeds_3_-4.json"),
    (["barrier", "{run}/level_00", "{run}/level_01", "--points", "2"], "barrier_swamp_00_swamp_01.json"),
    (["masks", "{run}/level_00", "{run}/level_01"], "masks_swamp_00_swamp_01.json"),
    (["layers", "{run}"], "layers_swamp.json"),
])
def test_an_analysis_never_overwrites_another_runs_file(swamp_run, tmp_path, monkeypatch, capsys, argv, name):
    from swamp.analysis import commands
    monkeypatch.setattr(commands, "instability", lambda run_dir, level, seeds, points, device, **options:
                        instability(run_dir, level, seeds, 2, device, **options))
    out = tmp_path / "shared"

    def analyze(run):
        return cli.main(["analyze", *[a.format(run=run) for a in argv], "--out", str(out)])

    moved, other = tmp_path / "moved" / "swamp", tmp_path / "other" / "swamp"
    shutil.copytree(swamp_run, moved)
    shutil.copytree(swamp_run, other)
    (other / "level_01" / "metrics.json").write_text("{}")   # another run's solution, in a folder of that name
    assert analyze(swamp_run) == 0
    written = (out / name).read_bytes()
    capsys.readouterr()
    assert analyze(other) == 2
    printed = capsys.readouterr()
    assert f"{out / name} holds the analysis of another run of the same folder name" in printed.err
    assert printed.out == ""   # refused before the work
    assert (out / name).read_bytes() == written
    assert analyze(moved) == 0   # the same run, moved: its analysis again
    result, before = json.loads((out / name).read_text()), json.loads(written)
    for end, level in (("a", "level_00"), ("b", "level_01")):
        if end in before:   # barrier, masks: the level folders as named
            assert result.pop(end) == str(moved / level) and before.pop(end) == str(swamp_run / level)
    assert result == before
    assert len(result["metrics_sha1"]) == {"levels": 3, "layers": 3, "instability": 1}.get(argv[0], 2)
    (out / name).write_text(json.dumps({"barrier": 0.1}))   # a file that names no run
    assert analyze(swamp_run) == 2 and "holds no record of the run it analysed" in capsys.readouterr().err
    assert json.loads((out / name).read_text()) == {"barrier": 0.1}


def test_a_run_named_with_a_dot_keeps_each_splits_file(swamp_run, tmp_path):
    dotted = tmp_path / "swamp.lr0.1"
    shutil.copytree(swamp_run, dotted)
    for split in ("test", "train"):
        assert cli.main(["analyze", "levels", str(dotted), "--points", "2", "--split", split]) == 0
    written = sorted(p.name for p in (dotted / "analysis").iterdir())
    assert written == ["levels_swamp.lr0.1.json", "levels_swamp.lr0.1.png", "levels_swamp.lr0.1_train.json",
                       "levels_swamp.lr0.1_train.png"]


def test_layer_densities_are_the_masks_kept_fractions(swamp_run, tmp_path, capsys, monkeypatch):
    from swamp.analysis import layer_densities
    monkeypatch.setattr("swamp.analysis.runs.load_data", lambda config: pytest.fail("the data set was loaded"))
    result = layer_densities(swamp_run)
    masks = [torch.load(swamp_run / f"level_0{i}" / "mask.pt") for i in range(3)]
    assert result["method"] == "swamp" and [r["level"] for r in result["levels"]] == [0, 1, 2]
    assert result["layers"] == [{"name": n, "weights": m.numel()} for n, m in masks[0].items()]
    for row, level in zip(result["levels"], masks):
        assert row["layers"] == {n: m.sum().item() / m.numel() for n, m in level.items()}
        kept = sum(row["layers"][layer["name"]] * layer["weights"] for layer in result["layers"])
        assert kept / sum(layer["weights"] for layer in result["layers"]) == pytest.approx(row["density"])
    assert result["levels"][2]["layers"]["1.weight"] < result["levels"][1]["layers"]["1.weight"] < 1
    assert cli.main(["analyze", "layers", str(swamp_run), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| layer | weights | level 0 | level 1 | level 2 |"
    assert table[3].startswith(f"| 1.weight | {masks[0]['1.weight'].numel():,} | 100.00% | ")
    damaged = tmp_path / "damaged"
    shutil.copytree(swamp_run, damaged)
    torch.save({"1.weight": torch.ones(3)}, damaged / "level_01" / "mask.pt")
    with pytest.raises(DamagedFileError, match=r"level_01/mask.pt is damaged: no dict of weight names to bool"):
        layer_densities(damaged)
    torch.save({n: m for n, m in masks[1].items() if n != "3.weight"}, damaged / "level_01" / "mask.pt")
    with pytest.raises(DamagedFileError, match=r"level_01/mask.pt is damaged: its masks name other weights than "
                                               r"level 0's"):
        layer_densities(damaged)


def test_layer_plot_of_many_layers_colours_them_by_depth(tmp_path):
    from swamp.analysis import commands
    names = [f"{i}.weight" for i in range(12)]
    result = {"layers": [{"name": n, "weights": 10} for n in names],
              "levels": [{"level": level, "density": 0.8 ** level,
                          "layers": {**dict.fromkeys(names, 0.8 ** level), "0.weight": 1.0 - 0.5 * level}}
                         for level in range(3)]}   # 0.weight pruned away at level 2
    path = commands._plot_layers(result, tmp_path, tmp_path / "layers.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_cli_takes_dot_inside_a_level_directory(swamp_run, tmp_path, monkeypatch):
    monkeypatch.chdir(swamp_run / "level_01")
    assert cli.main(["analyze", "masks", ".", "../level_02", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "masks_swamp_01_swamp_02.json").is_file()


def test_a_moved_data_set_says_how_to_record_its_new_place(swamp_run, tmp_path, capsys):
    moved = tmp_path / "swamp"
    shutil.copytree(swamp_run, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["data"].update(name="npz", path=str(tmp_path / "gone.npz"))
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["analyze", "masks", str(moved / "level_01"), str(moved / "level_02")]) == 2
    assert f"if the data set moved, `swamp resume {moved} --set data.path=NEW`" in capsys.readouterr().err


def test_comparing_masks_loads_no_data(swamp_run, tmp_path, monkeypatch):
    def no_data(config):
        raise AssertionError("the data set was loaded")
    monkeypatch.setattr("swamp.analysis.runs.load_data", no_data)
    assert cli.main(["analyze", "masks", str(swamp_run / "level_01"), str(swamp_run / "level_02"),
                     "--out", str(tmp_path)]) == 0
    with pytest.raises(AssertionError, match="the data set was loaded"):   # what needs the data loads it
        cli.main(["analyze", "barrier", str(swamp_run / "level_01"), str(swamp_run / "level_02"),
                  "--out", str(tmp_path)])


def test_cli_reports_a_missing_level(swamp_run, tmp_path, capsys):
    assert cli.main(["analyze", "barrier", str(swamp_run / "level_09"), str(swamp_run / "level_00"),
                     "--out", str(tmp_path)]) == 2
    assert "no complete level directory" in capsys.readouterr().err


@pytest.mark.parametrize("damaged, content", [("level_01/model.pt", lambda b: b[:100]),   # a failed copy
                                              ("level_02/mask.pt", lambda b: b[:100]),
                                              ("level_02/mask.pt", lambda b: b"hello world")])
def test_a_damaged_level_file_is_named(swamp_run, tmp_path, capsys, damaged, content):
    copy = tmp_path / "swamp"
    shutil.copytree(swamp_run, copy)
    (copy / damaged).write_bytes(content((copy / damaged).read_bytes()))
    assert cli.main(["analyze", "masks", str(copy / "level_01"), str(copy / "level_02"),
                     "--out", str(tmp_path / "out")]) == 2
    assert f"swamp analyze: error: {copy / damaged} is damaged: not a readable torch.save file" in \
        capsys.readouterr().err


@pytest.mark.parametrize("analysis", ["levels", "hessian"])
def test_cli_refuses_a_run_without_complete_levels(swamp_run, tmp_path, capsys, analysis):
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(swamp_run / "config.yaml", started)
    assert cli.main(["analyze", analysis, str(started)]) == 2
    assert "has no complete level yet" in capsys.readouterr().err and not (started / "analysis").exists()


@pytest.mark.parametrize("argv, message", [
    (["hessian", "{run}", "--k", "0"], "argument --k: must be >= 1, got 0"),
    (["levels", "{run}", "--points", "1"], "argument --points: must be >= 2, got 1"),
    (["instability", "{run}", "--level", "1", "--bn-batches", "0"], "argument --bn-batches: must be >= 1, got 0"),
    (["barrier", "{run}/level_00", "{run}/level_01", "--split", "val"], "argument --split: invalid choice: 'val'"),
    (["hessian", "{run}", "--trace-samples", "x"], "argument --trace-samples: 'x' is not an integer"),
    (["hessian", "{run}", "--tol", "-1"], "argument --tol: must be a finite number > 0, got -1"),
    (["hessian", "{run}", "--tol", "nan"], "argument --tol: must be a finite number > 0, got nan"),
    (["hessian", "{run}", "--k", "100000", "--out", "{tmp}/typo"], "k = 100000 is above the"),
    (["hessian", "{run}", "--levels", "1", "7", "--out", "{tmp}/typo"],
     "level(s) [7] not complete; complete levels are [0, 1, 2]"),
    (["hessian", "{run}", "--levels", "-1"], "argument --levels: must be >= 0, got -1"),
    (["masks", "{run}/level_01", "{run}/level_09", "--out", "{tmp}/typo"], "no complete level directory"),
    (["instability", "{run}", "--level", "1", "--seeds", "3", "3"], "--seeds must be two different seeds"),
    (["levels", "{tmp}/typo"], "typo is not a run directory"),
    (["levels", "{run}", "--device", "gpu"], "argument --device: must be cpu, auto or cuda[:N], got 'gpu'"),
    (["levels", "{run}", "--device", f"cuda:{torch.cuda.device_count()}"],
     f"torch sees {torch.cuda.device_count()} CUDA device(s) here; use cpu"),
])
def test_cli_names_bad_arguments_and_writes_nothing(swamp_run, tmp_path, capsys, argv, message):
    argv = [a.format(run=swamp_run, tmp=tmp_path) for a in argv]
    try:
        code = cli.main(["analyze", *argv])
    except SystemExit as exit:   # argparse
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_plot_titles_name_levels_by_run_folder_cut_to_fit(tmp_path):
    from swamp.analysis.commands import _level_name
    assert _level_name(tmp_path / "swamp", 3) == "swamp/level_03"
    long = "cifar10_resnet20_swamp_" + "x" * 80 + "_seed3"
    title = _level_name(tmp_path / long, 12)
    assert len(title) == 59 + len("/level_12") and title.startswith("cifar10_resnet20_swamp_")
    assert title.endswith("x_seed3/level_12") and "…" in title


def test_a_runs_networks_are_those_its_levels_were_evaluated_as(tmp_path):
    """run.network: the final network, or a particle with BatchNorm statistics recomputed for its
    SWA weights, reach the test accuracies the level recorded."""
    from swamp.analysis import load_run
    out = tmp_path / "bn_swamp"
    pipeline.run(C.from_dict({"method": "swamp", "particles": 2, "levels": 0, "model": {"name": "cifar_resnet_8_4"},
                              "device": "cpu", "rewind": {"iterations": 0}, "swa": {"start": 0.5},
                              "train": {"epochs": 2, "batch_size": 256, "milestones": []}}), out, quiet=True)
    run = load_run(out)
    metrics = run.metrics(0)
    final = run.network(0)
    assert not final.training and evaluate.test_accuracy(final, run.data, 256) == metrics["test_accuracy"]
    for particle, accuracy in enumerate(metrics["particle_test_accuracy"]):
        net = run.network(0, particle=particle)
        assert evaluate.test_accuracy(net, run.data, 256) == accuracy
        saved = run.particle_states(0)[particle]
        assert torch.equal(net.state_dict()["fc.weight"], saved["fc.weight"])
        assert not torch.equal(net.state_dict()["bn.running_mean"], saved["bn.running_mean"])   # recomputed
    with pytest.raises(ValueError, match=r"level 0 saved 2 particles \(SWAMP runs save them\), not particle 2"):
        run.network(0, particle=2)
