"""swamp.saliency (SNIP, GraSP, SynFlow) against plain autograd and closed forms, and the snip,
grasp and synflow methods of the pipeline."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swamp
from swamp import config as C
from swamp import pipeline, saliency
from test_pipeline import tiny


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def batches(count: int = 2):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(count)]


def test_snip_scores_are_weight_times_gradient_of_the_loss_over_all_batches():
    plain = conv_net()
    model = swamp.sparsify(copy.deepcopy(plain))
    before = copy.deepcopy(model.state_dict())
    scores = saliency.snip_scores(model, batches())
    plain.train()
    sum(F.cross_entropy(plain(x), y) for x, y in batches()).backward()
    assert list(scores) == ["0.weight", "4.weight"]
    for name, score in scores.items():
        weight = plain.get_parameter(name)
        torch.testing.assert_close(score, (weight * weight.grad).abs())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # BN statistics too


def test_grasp_scores_are_weight_times_hessian_gradient_product():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = swamp.sparsify(copy.deepcopy(plain))
    data = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(2)]
    scores = saliency.grasp_scores(model, data, temperature=3.0)
    names = ["0.weight", "2.weight"]
    params = dict(plain.named_parameters())

    def loss(*weights):
        state = {**params, **dict(zip(names, weights))}
        return sum(F.cross_entropy(torch.func.functional_call(plain, state, (x,)) / 3.0, y) for x, y in data)
    weights = tuple(params[n].detach() for n in names)
    hessian = torch.autograd.functional.hessian(loss, weights)
    g = torch.autograd.functional.jacobian(loss, weights)
    for i, name in enumerate(names):
        hg = sum(torch.tensordot(hessian[i][j], g[j], dims=g[j].dim()) for j in range(len(names)))
        torch.testing.assert_close(scores[name], weights[i] * hg, rtol=1e-4, atol=1e-7)


def chain(widths, scale: float = 1.0, bias: bool = False) -> nn.Module:
    """A ReLU chain of Linear layers (positive inputs keep every ReLU open after linearising)."""
    torch.manual_seed(0)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return swamp.sparsify(net)


def test_synflow_scores_are_path_flows_conserved_layer_by_layer():
    net = chain([5, 4, 3, 2])
    w1, w2, w3 = (net.get_parameter(f"{i}.weight").detach().double().abs() for i in (0, 2, 4))
    scores = saliency.synflow_scores(net, (5,))
    total = (w3 @ w2 @ w1 @ torch.ones(5, dtype=torch.float64)).sum()
    torch.testing.assert_close(scores["0.weight"], w1 * (torch.ones(2, dtype=torch.float64) @ w3 @ w2)[:, None])
    for score in scores.values():
        assert score.dtype == torch.float64 and torch.isclose(score.sum(), total)   # Tanaka et al.'s conservation


def test_synflow_masks_prune_in_rounds_to_the_count_asked_for():
    net = chain([6, 8, 8, 3], bias=True)
    before = copy.deepcopy(net.state_dict())
    one_round = saliency.synflow_masks(net, (6,), keep=40, rounds=1)
    flat = torch.cat([s.reshape(-1) for s in saliency.synflow_scores(net, (6,)).values()])
    kept = torch.cat([m.reshape(-1) for m in one_round.values()])
    assert int(kept.sum()) == 40 and flat[kept].min() >= flat[~kept].max()   # one round: the top 40 flows
    many = saliency.synflow_masks(net, (6,), keep=40)
    assert sum(int(m.sum()) for m in many.values()) == 40 and many.keys() == swamp.masks(net).keys()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m.any() for m in saliency.synflow_masks(net, (6,), keep=0).values())
    assert all(m.all() for m in saliency.synflow_masks(net, (6,), keep=48 + 64 + 24).values())
    with pytest.raises(ValueError, match=r"keep must be an int in \[0, 136\] \(the weights the masks keep\), got 137"):
        saliency.synflow_masks(net, (6,), keep=137)
    with pytest.raises(ValueError, match="rounds must be an int >= 1, got 0"):
        saliency.synflow_masks(net, (6,), keep=3, rounds=0)


def test_synflow_ranks_flows_beyond_float32_by_their_float64_order():
    net = chain([8] * 41, scale=40.0)   # flows near 1e90: inf in float32
    scores = saliency.synflow_scores(net, (8,))
    assert max(float(s.max()) for s in scores.values()) > 1e60
    masks = saliency.synflow_masks(net, (8,), keep=1000, rounds=1)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    assert int(kept.sum()) == 1000 and flat[kept].min() >= flat[~kept].max()


def test_synflow_counts_the_magnitude_of_flows_a_normalisation_turns_negative():
    torch.manual_seed(0)
    net = swamp.sparsify(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)))
    raw = saliency._linearised(net)
    x = torch.ones(1, 6, dtype=torch.float64)
    grads = torch.autograd.grad(raw(x).sum(), [raw[0].weight])
    assert (raw[0].weight * grads[0] < 0).any()   # LayerNorm subtracts the mean
    scores = saliency.synflow_scores(net, (6,))
    torch.testing.assert_close(scores["0.weight"], (raw[0].weight * grads[0]).detach().abs())
    assert sum(int(m.sum()) for m in saliency.synflow_masks(net, (6,), keep=20).values()) == 20


def test_synflow_names_a_flow_that_overflows_float64():
    with pytest.raises(ValueError, match="SynFlow's synaptic flow overflows float64 in this network"):
        saliency.synflow_scores(chain([8] * 200, scale=40.0), (8,))   # about 57 ** 200


def test_half_precision_models_are_scored_in_float32():
    net = conv_net().half()
    swamp.sparsify(net)
    data = [(x.half(), y) for x, y in batches()]
    for score in (saliency.snip_scores, saliency.grasp_scores):
        half = score(net, data)
        assert all(half[n].dtype == torch.float32 for n in half)
        torch.testing.assert_close(half, score(copy.deepcopy(net).float(), [(x.float(), y) for x, y in data]))


def test_a_shared_weight_is_scored_once_under_its_first_name():
    net = chain([4, 4, 4, 4])
    net[2].weight = net[0].weight
    assert list(saliency.synflow_scores(net, (4,))) == ["0.weight", "4.weight"]
    masks = saliency.synflow_masks(net, (4,), keep=10)
    assert torch.equal(masks["0.weight"], masks["2.weight"]) and int(masks["0.weight"].sum() + masks["4.weight"].sum()) == 10


def test_prune_by_scores_keeps_the_highest_scores():
    net = chain([4, 5, 3])
    scores = {"0.weight": torch.arange(20.0).view(5, 4), "2.weight": -torch.arange(15.0).view(3, 5)}
    with pytest.warns(UserWarning, match="pruning removed every remaining weight of 2.weight"):
        masks = swamp.prune(net, 20, scores=scores)
    assert int(masks["0.weight"].sum()) == 15 and masks["0.weight"].view(-1)[5:].all() and not masks["2.weight"].any()
    huge = {"0.weight": torch.tensor([1e300, -1e300, 1e-300, 0.0, 2.0] * 4, dtype=torch.float64).view(5, 4),
            "2.weight": torch.full((3, 5), 1e200, dtype=torch.float64)}
    masks = swamp.prune(chain([4, 5, 3]), 12, scores=huge)   # beyond float32: ranked as in float64
    assert masks["2.weight"].all() and masks["0.weight"].view(-1).tolist() == [True, False, False, False, True] * 4
    mixed = {"0.weight": torch.full((5, 4), 1e50, dtype=torch.float64), "2.weight": torch.full((3, 5), 1e10)}
    with pytest.warns(UserWarning, match="pruning removed every remaining weight of 2.weight"):
        masks = swamp.prune(chain([4, 5, 3]), 15, scores=mixed)   # one float64 beyond float32: all ranked alike
    assert masks["0.weight"].all() and not masks["2.weight"].any()
    with pytest.raises(ValueError, match="criterion 'random' takes none"):
        swamp.prune(net, 0.1, criterion="random", scores=scores)
    with pytest.raises(ValueError, match=r"scores lacks the masked weight\(s\) '2.weight'"):
        swamp.prune(net, 0.1, scores={"0.weight": scores["0.weight"]})
    with pytest.raises(ValueError, match="batches is empty"):
        saliency.snip_scores(net, [])
    with pytest.raises(ValueError, match="no masked layers"):
        saliency.snip_scores(nn.Linear(2, 2), batches())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pai")
    return {m: pipeline.run(tiny(m, rewind={"iterations": 0}), root / m, quiet=True) | {"out": root / m}
            for m in ("imp", *C.REWIND_POINT_METHODS)}


@pytest.mark.parametrize("method", C.REWIND_POINT_METHODS)
def test_rewind_point_methods_prune_the_dense_network_to_imps_densities(runs, method):
    run, imp = runs[method], runs["imp"]
    assert [m["density"] for m in run["levels"]] == [m["density"] for m in imp["levels"]]
    assert len(run["levels"][1]["particle_test_accuracy"]) == 1
    masks = [torch.load(run["out"] / f"level_{level:02d}" / "mask.pt") for level in range(3)]
    imp_masks = torch.load(imp["out"] / "level_02" / "mask.pt")
    assert any(not torch.equal(masks[2][n], imp_masks[n]) for n in imp_masks)
    if method != "synflow":   # fixed scores: each level's mask is their one-shot mask, so nested
        assert all(not (masks[2][n] & ~masks[1][n]).any() for n in imp_masks)


def test_snip_levels_are_the_one_shot_masks_of_the_rewind_points_scores(runs):
    out = runs["snip"]["out"]
    config = C.load(out / "config.yaml")
    data = pipeline.load_data(config.data)
    model = pipeline.build_model(config.model, data.input_shape, data.num_classes)
    swamp.sparsify(model)
    model.load_state_dict({**model.state_dict(), **torch.load(out / "rewind.pt")})
    scores = saliency.snip_scores(model, pipeline.SampledBatches(data, 128, 1, seed=pipeline.derive_seed(0, -2)))
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    kept = torch.cat([m.reshape(-1) for m in torch.load(out / "level_02" / "mask.pt").values()])
    assert flat[kept].min() >= flat[~kept].max()


def test_scores_come_from_the_batches_asked_for_before_level_0_trains(tmp_path, monkeypatch):
    seen = []

    def recorded(model, batches):
        seen.extend(x.shape[0] for x, _ in batches)
        raise MemoryError("out of memory")
    monkeypatch.setattr(saliency, "snip_scores", recorded)
    out = tmp_path / "snip"
    with pytest.raises(MemoryError):
        pipeline.run(tiny("snip", prune={"score_batches": 3, "score_batch_size": 16}), out, quiet=True)
    assert seen == [16, 16, 16] and (out / "rewind.pt").is_file() and not (out / "level_00").exists()

    def overflowing(*args, **kwargs):
        raise ValueError("SynFlow's synaptic flow overflows float64 in this network")
    monkeypatch.setattr(saliency, "synflow_masks", overflowing)
    with pytest.raises(ValueError, match="overflows"):
        pipeline.run(tiny("synflow"), tmp_path / "deep", quiet=True)
    assert not (tmp_path / "deep" / "level_00").exists()


def test_a_level_resumes_under_the_masks_it_began_with(tmp_path, monkeypatch):
    """Killed inside level 2 after a checkpoint; the resume's scores differ (as a GPU's may in
    their last bits): the level goes on under the checkpointed masks."""
    out, save = tmp_path / "snip", pipeline.save

    def killed_in_level_2(path, value):
        save(path, value)
        if path.name == "checkpoint.pt" and value["stage"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "save", killed_in_level_2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny("snip"), out, quiet=True)
    monkeypatch.setattr(pipeline, "save", save)
    monkeypatch.setattr(saliency, "snip_scores", lambda model, batches: {
        n: torch.rand(m.shape) for n, m in swamp.masks(model).items()})
    pipeline.resume(out, quiet=True)
    straight = tmp_path / "straight"
    monkeypatch.undo()
    pipeline.run(tiny("snip"), straight, quiet=True)
    for name in ("mask.pt", "model.pt"):
        a, b = (torch.load(d / "level_02" / name) for d in (out, straight))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "level_02" / "metrics.json").read_text())["test_accuracy"] == \
        json.loads((straight / "level_02" / "metrics.json").read_text())["test_accuracy"]


@pytest.mark.parametrize("values, message", [
    ({"method": "snip", "prune": {"scope": "layerwise"}}, "'prune.scope': method snip ranks the scores of all layers"),
    ({"method": "synflow", "rewind": {"mode": "lr"}}, "'rewind.mode': method synflow prunes the network at the rewind"),
    ({"method": "grasp", "prune": {"score_batches": 0}}, "'prune.score_batches': must be >= 1, got 0"),
    ({"method": "snip", "prune": {"score_batch_size": -1}}, "'prune.score_batch_size': must be >= 0"),
    ({"method": "grasp", "masks": {"source": "x"}}, "'masks.source': method grasp cannot train another run's masks"),
])
def test_settings_the_rewind_point_methods_cannot_use_are_named(values, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(C.from_dict(values))
