"""swamp.prune / swamp.rewind / swamp.imp.next_masks: the IMP steps on a model in a user's loop."""
import copy

import pytest
import torch
from torch import nn

import swamp
import swamp_kernels as sk
from swamp.imp import next_masks

# net()'s small-scale layer is pruned away by the fractions used here; the collapse warning itself
# is tested below (test_pruning_that_empties_a_layer_warns_of_layer_collapse) and in test_pipeline.
pytestmark = pytest.mark.filterwarnings("ignore:pruning removed every remaining weight:UserWarning")


def net(seed: int = 0) -> nn.Module:
    """Layers of very different scales (a global threshold prunes the small one first), a
    BatchNorm with buffers and a bias: what rewinding must restore."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 10))
    with torch.no_grad():
        model[0].weight.mul_(0.01)
    return model


def train_steps(model: nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 4, 4, generator=gen), torch.randint(10, (4,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def kept(masks: dict) -> dict:
    return {name: int(mask.sum()) for name, mask in masks.items()}


def test_prune_is_the_global_magnitude_prune_of_the_masked_weights():
    model = swamp.sparsify(net())
    names = list(swamp.masks(model))
    weights = [model.get_parameter(n).detach().clone() for n in names]
    expected = sk.global_magnitude_prune(weights, None, 0.3, backend="torch")
    new = swamp.prune(model, 0.3)
    assert list(new) == names
    for name, mask, weight in zip(names, expected, weights):
        assert torch.equal(new[name], mask) and torch.equal(swamp.masks(model)[name], mask)
        assert torch.equal(model.get_parameter(name), weight * mask)   # newly pruned weights are 0
    total = sum(w.numel() for w in weights)
    assert sum(kept(new).values()) == total - round(0.3 * total)
    assert kept(new)["0.weight"] < round(0.7 * 8 * 3 * 9)   # the small-scale layer lost more


def test_prune_again_prunes_the_remaining_weights():
    model = swamp.sparsify(net())
    total = sum(m.numel() for m in swamp.masks(model).values())
    first = sum(kept(swamp.prune(model, 0.2)).values())
    second = swamp.prune(model, 0.2)
    assert sum(kept(second).values()) == first - round(0.2 * first)
    assert first == total - round(0.2 * total)
    assert swamp.sparsity_report(model).kept == sum(kept(second).values())


def test_layerwise_scope_prunes_each_layer_by_the_fraction():
    model = swamp.sparsify(net())
    before = kept(swamp.masks(model))
    after = kept(swamp.prune(model, 0.25, scope="layerwise"))
    assert after == {name: n - round(0.25 * n) for name, n in before.items()}


def test_random_criterion_is_seeded_and_not_magnitude():
    masks = [swamp.prune(swamp.sparsify(net()), 0.5, criterion="random", seed=s) for s in (3, 3, 4)]
    magnitude = swamp.prune(swamp.sparsify(net()), 0.5)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert any(not torch.equal(masks[0][n], masks[2][n]) for n in masks[0])
    assert any(not torch.equal(masks[0][n], magnitude[n]) for n in masks[0])
    assert sum(kept(masks[0]).values()) == sum(kept(magnitude).values())


def test_next_masks_keeps_the_keys_and_only_removes_entries():
    gen = torch.Generator().manual_seed(2)
    weights = {"b": torch.randn(5, 7, generator=gen), "a": torch.randn(13, generator=gen), "other": torch.ones(2)}
    masks = {"b": torch.rand(5, 7, generator=gen) < 0.8, "a": torch.rand(13, generator=gen) < 0.8}
    new = next_masks(weights, masks, 4)
    assert list(new) == ["b", "a"]
    assert all(not (new[n] & ~masks[n]).any() for n in masks)
    assert sum(kept(masks).values()) - sum(kept(new).values()) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "per_layer"}, "scope must be one of global, layerwise"),
    ({"criterion": "snip"}, "criterion must be one of magnitude, random"),
    ({"amount": 1.5}, "amount"),
])
def test_prune_bad_arguments_name_the_problem(kwargs, message):
    model = swamp.sparsify(net())
    before = swamp.masks(model)
    with pytest.raises(ValueError, match=message):
        swamp.prune(model, **kwargs)
    assert all(torch.equal(before[n], m) for n, m in swamp.masks(model).items())


def test_prune_needs_masked_layers_and_next_masks_every_weight():
    with pytest.raises(ValueError, match="no masked layers: call swamp.sparsify"):
        swamp.prune(net())
    with pytest.raises(ValueError, match="weights lacks the masked weight.*'fc.weight'"):
        next_masks({"conv.weight": torch.ones(3)}, {"conv.weight": torch.ones(3, dtype=torch.bool),
                                                    "fc.weight": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize("saved_from", ["masked", "dense"])
def test_rewind_restores_the_rewind_point_and_keeps_the_new_masks(saved_from):
    model = net()
    if saved_from == "masked":
        swamp.sparsify(model)
    rewind_state = copy.deepcopy(model.state_dict())
    swamp.sparsify(model)
    train_steps(model)
    masks = swamp.prune(model, 0.4)
    swamp.rewind(model, rewind_state)
    state = model.state_dict()
    for name, mask in masks.items():
        assert torch.equal(swamp.masks(model)[name], mask)          # not the saved all-True masks
        assert torch.equal(state[name], rewind_state[name] * mask)  # rewound, pruned entries 0
    for key, value in rewind_state.items():                         # biases, BatchNorm buffers
        if key.removesuffix("_mask") == key and key not in masks:
            assert torch.equal(state[key], value), key
    train_steps(model)
    assert all(torch.equal(model.get_parameter(n)[~m], torch.zeros(int((~m).sum()))) for n, m in masks.items())


def test_a_plain_load_state_dict_would_restore_the_saved_masks():
    """What rewind exists for: loading a masked checkpoint brings its masks back too."""
    model = swamp.sparsify(net())
    rewind_state = copy.deepcopy(model.state_dict())
    swamp.prune(model, 0.4)
    model.load_state_dict(rewind_state)
    assert all(m.all() for m in swamp.masks(model).values())


def test_rewind_checks_the_state_before_loading_anything():
    model = swamp.sparsify(net())
    swamp.prune(model, 0.4)
    before = copy.deepcopy(model.state_dict())
    other = swamp.sparsify(net(seed=1)).state_dict()
    bad = [({k: v for k, v in other.items() if k != "1.running_mean"}, "missing keys: 1.running_mean"),
           ({**other, "extra": torch.zeros(1)}, "unexpected keys: extra"),
           ({**other, "4.bias": torch.zeros(3)}, r"shape mismatches: 4.bias \(3,\) != \(10,\)")]
    for state, message in bad:
        with pytest.raises(ValueError, match=f"state does not match the model.*{message}.*nothing was loaded"):
            swamp.rewind(model, state)
    with pytest.raises(TypeError, match="state must be a state_dict"):
        swamp.rewind(model, list(other.values()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_float64_models_prune_by_magnitude():
    model = swamp.sparsify(net().double())
    weights = {n: model.get_parameter(n).detach().clone() for n in swamp.masks(model)}
    new = swamp.prune(model, 0.3)
    expected = sk.global_magnitude_prune([w.float() for w in weights.values()], None, 0.3, backend="torch")
    assert all(torch.equal(new[n], m) for n, m in zip(weights, expected))
    assert all(torch.equal(model.get_parameter(n), weights[n] * new[n]) for n in weights)


class Tied(nn.Module):
    """An autoencoder whose decoder shares the encoder's weight (the same Parameter)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_a_weight_shared_by_two_layers_counts_once_and_gets_one_mask(criterion):
    torch.manual_seed(0)
    model = swamp.sparsify(Tied())
    new = swamp.prune(model, 0.5, criterion=criterion, seed=1)
    assert list(new) == ["enc.weight", "dec.weight", "head.weight"]
    assert torch.equal(new["enc.weight"], new["dec.weight"])
    assert torch.equal(model.enc.weight_mask, model.dec.weight_mask)
    distinct = 16 * 16 + 16 * 4
    report = swamp.sparsity_report(model)
    assert (report.kept, report.total) == (distinct - round(0.5 * distinct), distinct)
    assert int((model.enc.weight != 0).sum()) + int((model.head.weight != 0).sum()) == report.kept
    assert "global" in str(report) and f"{report.kept}/{distinct}" in str(report)
    before = report.kept
    swamp.prune(model, 10)   # an int amount: exactly that many distinct weights
    assert swamp.sparsity_report(model).kept == before - 10


def test_the_report_keeps_a_shared_weight_where_all_its_masks_keep_it():
    model = swamp.sparsify(Tied())
    gen = torch.Generator().manual_seed(3)
    swamp.set_masks(model, {"enc.weight": torch.rand(16, 16, generator=gen) < 0.5,
                            "dec.weight": torch.rand(16, 16, generator=gen) < 0.5})
    both = model.enc.weight_mask & model.dec.weight_mask
    assert swamp.sparsity_report(model).kept == int(both.sum()) + 16 * 4


def test_errors_name_the_weights():
    model = swamp.sparsify(net())
    with torch.no_grad():
        model[4].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weights\[1\] has NaN or Inf.*\(\[1\] is '4.weight'\)"):
        swamp.prune(model, 0.2)
    with torch.no_grad():
        model[4].weight[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"amount=10000 exceeds.*of weights\[0\] \(\[0\] is '0.weight'\)"):
        swamp.prune(model, 10 ** 4, scope="layerwise")


def test_rewind_from_a_meta_built_model_keeps_full_masks():
    with torch.device("meta"):
        model = swamp.sparsify(net())
    model.to_empty(device="cpu")
    dense = net(seed=2).state_dict()
    swamp.rewind(model, dense)
    assert all(m.all() for m in swamp.masks(model).values())
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items() if k in dense)


def test_rewind_ignores_the_masks_of_layers_the_model_keeps_dense():
    rewind_state = swamp.sparsify(net()).state_dict()   # every layer masked
    model = swamp.sparsify(net(), exclude="4")
    swamp.prune(model, 0.5)
    masks = swamp.masks(model)
    swamp.rewind(model, rewind_state)
    assert list(swamp.masks(model)) == ["0.weight"] and torch.equal(swamp.masks(model)["0.weight"], masks["0.weight"])
    assert torch.equal(model[4].weight, rewind_state["4.weight"])


def test_rewind_refuses_values_that_are_not_tensors_before_loading():
    model = swamp.sparsify(net())
    before = copy.deepcopy(model.state_dict())
    state = net(seed=1).state_dict()
    with pytest.raises(ValueError, match=r"not tensors: 1.weight \(ndarray\), 4.bias \(NoneType\)"):
        swamp.rewind(model, {**state, "1.weight": state["1.weight"].numpy(), "4.bias": None})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class MaskedEmbedding(nn.Embedding):
    """A user's own masked layer: swamp's calls must leave its ``weight_mask`` buffer alone."""

    def __init__(self, *args):
        super().__init__(*args)
        self.register_buffer("weight_mask", torch.rand(self.weight.shape) < 0.5)


def test_rewind_restores_other_modules_buffers_named_weight_mask():
    model = swamp.sparsify(nn.Sequential(MaskedEmbedding(10, 4), nn.Linear(4, 2)))
    state = copy.deepcopy(model.state_dict())
    swamp.prune(model, 0.5)
    model[0].weight_mask.logical_not_()
    swamp.rewind(model, state)
    assert torch.equal(model[0].weight_mask, state["0.weight_mask"])   # a buffer like any other
    assert int(model[1].weight_mask.sum()) == 4                          # swamp's mask kept


def test_rewind_across_a_compile_wrapper_says_so():
    model = swamp.sparsify(net())
    compiled = torch.compile(model)
    with pytest.raises(ValueError, match=r"Only the model's keys start with '_orig_mod.' \(torch.compile\): "
                                         r"rewind the wrapped module with its own state_dict"):
        swamp.rewind(compiled, model.state_dict())
    with pytest.raises(ValueError, match=r"Only the state's keys start with '_orig_mod.'"):
        swamp.rewind(model, compiled.state_dict())
    swamp.rewind(compiled, compiled.state_dict())
    swamp.rewind(model, model.state_dict())


def test_rewind_takes_the_state_dict_of_a_model_with_a_layer_under_two_names():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = self.enc   # one layer, two state_dict prefixes

        def forward(self, x):
            return self.dec(self.enc(x))
    model = swamp.sparsify(Tied())
    start = copy.deepcopy(model.state_dict())
    swamp.prune(model, 0.5)
    mask = model.enc.weight_mask.clone()
    swamp.rewind(model, start)
    assert torch.equal(model.enc.weight_mask, mask) and not model.enc.weight[~mask].any()
    assert torch.equal(model.enc.weight[mask], start["enc.weight"][mask])


def test_pruning_that_empties_a_layer_warns_of_layer_collapse(recwarn):
    model = swamp.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    with torch.no_grad():   # every weight of the second layer below every one of the first
        model[0].weight.copy_(1 + torch.rand(8, 8))
        model[1].weight.copy_(torch.rand(2, 8))
    swamp.prune(model, 0.1)   # 8 of the 80 weights: all from the small layer, which keeps 8
    assert not [w for w in recwarn.list if "layer collapse" in str(w.message)] and model[1].weight_mask.sum() == 8
    with pytest.warns(UserWarning, match=r"pruning removed every remaining weight of 1\.weight: the network is "
                                         r"cut there \(layer collapse\)"):
        swamp.prune(model, 0.5)


def test_a_model_on_the_meta_device_is_named_not_pruned():
    with torch.device("meta"):
        model = swamp.sparsify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    for call in (lambda: swamp.prune(model, 0.2), lambda: swamp.sparsity_report(model)):
        with pytest.raises(ValueError, match=r"0.weight(_mask)?, 1.weight(_mask)? are on the meta device "
                                             r"\(shapes, no values\): materialise the model first"):
            call()
    model.to_empty(device="cpu")
    model.load_state_dict(swamp.sparsify(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))).state_dict())
    swamp.prune(model, 0.5)
    assert swamp.sparsity_report(model).kept == 9
