"""sparsify / masks / set_masks / sparsity_report / export_dense on small models."""
import pytest
import torch
from torch import nn

import swamp
import swamp_kernels as sk
from swamp.nn import MaskedConv2d, MaskedLayer, MaskedLinear


class Net(nn.Module):
    """Nested names (stem, blocks.N.conv, head) and modules sparsify must not convert."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU()) for _ in range(2))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj: a Linear subclass
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn(self.stem(x))
        for block in self.blocks:
            x = x + block(x)
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.head(tokens.mean(1))


CONVERTIBLE = ["stem", "blocks.0.0", "blocks.1.0", "head"]


def masked_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, MaskedLayer)]


def test_sparsify_converts_in_place_and_keeps_outputs():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    params = dict(model.named_parameters())
    head = model.head
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    assert swamp.sparsify(model) is model
    assert masked_names(model) == CONVERTIBLE
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert head is model.head and type(head) is MaskedLinear and type(model.stem) is MaskedConv2d
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers keep working
    assert torch.equal(model(x), before) and calls == [1]  # hooks survive
    assert swamp.sparsify(model) is model and masked_names(model) == CONVERTIBLE  # idempotent
    swamp.set_masks(model, {"head.weight": torch.zeros(5, 8, dtype=torch.bool)})
    model.train()(x).sum().backward()
    optimizer.step()
    assert torch.count_nonzero(model.head.weight) == 0


def test_sparsify_keeps_dtype_device_and_channels_last():
    model = Net().to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    swamp.sparsify(model)
    for module in (model.stem, model.blocks[0][0]):
        assert module.weight.dtype == torch.bfloat16
        assert module.weight.is_contiguous(memory_format=torch.channels_last)
        assert module.weight_mask.is_contiguous(memory_format=torch.channels_last)
        assert module.weight_mask.device == module.weight.device
    assert model.head.weight_mask.dtype == torch.bool


@pytest.mark.parametrize("include, exclude, expected", [
    (None, ["stem", "head"], ["blocks.0.0", "blocks.1.0"]),
    ("blocks.*", None, ["blocks.0.0", "blocks.1.0"]),
    (["stem", "blocks.1.*"], None, ["stem", "blocks.1.0"]),
    ([nn.Conv2d], "stem", ["blocks.0.0", "blocks.1.0"]),
    (None, nn.Linear, ["stem", "blocks.0.0", "blocks.1.0"]),
    (lambda name, m: isinstance(m, nn.Conv2d) and m.groups > 1, None, ["blocks.0.0", "blocks.1.0"]),
    (None, lambda name, m: name.startswith("blocks.1"), ["stem", "blocks.0.0", "head"]),
])
def test_sparsify_include_exclude(include, exclude, expected):
    model = swamp.sparsify(Net(), include=include, exclude=exclude)
    assert masked_names(model) == expected


def test_a_weight_shared_with_a_layer_left_dense_stays_dense():
    net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net[4].weight = net[2].weight
    swamp.sparsify(net, exclude=["4"])
    assert [isinstance(net[i], MaskedLayer) for i in (0, 2, 4, 6)] == [True, False, False, True]
    swamp.prune(net, 0.5)
    assert net[2].weight.all()   # neither layer holding it prunes it


@pytest.mark.parametrize("kwargs, error, match", [
    ({"include": ["stm"]}, ValueError, r"'stm' matches no module; Conv2d/Linear layers are: stem"),
    ({"exclude": "blocks.*.1"}, ValueError,
     r"matches only modules sparsify does not convert: blocks.0.1 \(ReLU\)"),
    ({"include": ["bn"]}, ValueError, r"does not convert: bn \(BatchNorm2d\)"),
    ({"exclude": "blocks.0"}, ValueError, r"blocks.0 \(Sequential\).*\(the layers inside it: blocks.0.\*\)"),
    ({"include": ["attn.out_proj"]}, ValueError, "NonDynamicallyQuantizableLinear"),
    ({"include": [nn.BatchNorm2d]}, ValueError, "BatchNorm2d"),
    ({"exclude": [3]}, TypeError, "exclude must be a callable"),
])
def test_sparsify_rejects_selectors_that_match_no_layer(kwargs, error, match):
    model = Net()
    with pytest.raises(error, match=match):
        swamp.sparsify(model, **kwargs)
    assert masked_names(model) == []


def test_sparsify_a_bare_layer():
    layer = nn.Linear(3, 2)
    swamp.sparsify(layer)
    assert type(layer) is MaskedLinear and list(swamp.masks(layer)) == ["weight"]


def test_sparsify_refuses_lazy_layers_before_their_first_forward():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"lazy layers not yet initialised: 0 \(LazyConv2d\), 2 \(LazyLinear\); "
                                         r"run the model once"):
        swamp.sparsify(model)
    assert masked_names(model) == []
    swamp.sparsify(model, exclude=["0", "2"])   # none selected: nothing to refuse
    mixed = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    assert masked_names(swamp.sparsify(mixed, include=["0"])) == ["0"]
    with pytest.raises(ValueError, match=r"lazy layers not yet initialised: 0 \(LazyConv2d\); run"):
        swamp.sparsify(model, include=nn.Conv2d)
    assert masked_names(model) == []
    model(torch.randn(1, 3, 5, 5))
    swamp.sparsify(model)
    assert masked_names(model) == ["0", "2"]


def test_masks_round_trip_and_prune_with_global_magnitude():
    torch.manual_seed(0)
    model = swamp.sparsify(Net())
    current = swamp.masks(model)
    assert list(current) == [f"{n}.weight" for n in CONVERTIBLE]
    assert all(m.dtype == torch.bool and bool(m.all()) for m in current.values())
    current["head.weight"][0] = False
    assert bool(model.head.weight_mask.all())  # masks() returns copies
    names = list(current)
    weights = [model.get_parameter(n) for n in names]
    pruned = sk.global_magnitude_prune(weights, [current[n] for n in names], amount=0.5)
    swamp.set_masks(model, dict(zip(names, pruned)))
    for name, mask in zip(names, pruned):
        assert torch.equal(swamp.masks(model)[name], mask)
        assert torch.count_nonzero(model.get_parameter(name)[~mask]) == 0
        assert torch.count_nonzero(model.get_parameter(name)[mask]) == mask.sum()


def test_set_masks_can_grow_masks_back():
    layer = swamp.sparsify(nn.Linear(4, 4))
    swamp.set_masks(layer, {"weight": torch.zeros(4, 4, dtype=torch.bool)})
    swamp.set_masks(layer, {"weight": torch.ones(4, 4, dtype=torch.bool)})
    assert bool(layer.weight_mask.all()) and torch.count_nonzero(layer.weight) == 0


@pytest.mark.parametrize("masks, error, match", [
    ({"head": torch.ones(5, 8, dtype=torch.bool)}, ValueError, "did you mean 'head.weight'"),
    ({"stem.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}, ValueError,
     r"masks\['stem.weight'\]: that layer is a Conv2d without a mask"),
    ({"tail.weight": torch.ones(5, 8, dtype=torch.bool)}, ValueError,
     "no masked weight of the model; masked weights are: blocks.0.0.weight, blocks.1.0.weight, head.weight"),
    ({"head.bias": torch.ones(5, dtype=torch.bool)}, ValueError, "'head.bias', which is no masked weight"),
    ({"head.weight": torch.ones(5, 8)}, TypeError,
     r"masks\['head.weight'\] has dtype torch.float32; expected torch.bool"),
    ({"head.weight": torch.ones(8, 5, dtype=torch.bool)}, ValueError,
     r"masks\['head.weight'\] has shape \(8, 5\), expected \(5, 8\)"),
    ({"head.weight": [[True] * 8] * 5}, TypeError, "is a list, not a tensor"),
    ([torch.ones(5, 8, dtype=torch.bool)], TypeError, "masks must be a dict"),
])
def test_set_masks_errors_change_nothing(masks, error, match):
    model = swamp.sparsify(Net(), exclude="stem")
    valid = {"blocks.0.0.weight": torch.zeros(8, 4, 3, 3, dtype=torch.bool)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        swamp.set_masks(model, {**valid, **masks} if isinstance(masks, dict) else masks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_set_masks_takes_any_name_of_a_layer_and_hints_at_wrappers():
    model = swamp.sparsify(Net(), exclude="stem")
    model.classifier = model.head   # one layer, two names: both are state_dict keys
    swamp.set_masks(model, {"classifier.weight": torch.eye(5, 8, dtype=torch.bool)})
    assert torch.equal(model.head.weight_mask, torch.eye(5, 8, dtype=torch.bool))
    assert torch.count_nonzero(model.head.weight) == 5
    with pytest.raises(ValueError, match=r"masks\['head.weight'\] and masks\['classifier.weight'\] name one layer "
                                         r"but differ"):
        swamp.set_masks(model, {"classifier.weight": torch.eye(5, 8, dtype=torch.bool),
                                "head.weight": torch.ones(5, 8, dtype=torch.bool)})
    swamp.set_masks(model, {"classifier.weight": torch.eye(5, 8, dtype=torch.bool),   # equal: fine
                            "head.weight": torch.eye(5, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"Only the masks' keys start with '_orig_mod.' \(torch.compile\): "
                                         r"name the weights as the model passed does"):
        swamp.set_masks(model, swamp.masks(torch.compile(model)))
    with pytest.raises(ValueError, match=r"Only the model's keys start with 'module.'"):
        swamp.set_masks(nn.DataParallel(model), swamp.masks(model))   # what DDP's .module takes


def test_sparsity_report_numbers_and_table():
    model = swamp.sparsify(Net(), exclude="stem")
    swamp.set_masks(model, {
        "blocks.0.0.weight": torch.arange(8 * 4 * 9).reshape(8, 4, 3, 3) % 4 == 0,  # 72 of 288
        "head.weight": torch.zeros(5, 8, dtype=torch.bool),                         # 0 of 40
    })
    report = swamp.sparsity_report(model)
    assert [(l.name, l.layer_type, l.shape, l.kept, l.total) for l in report.layers] == [
        ("blocks.0.0.weight", "MaskedConv2d", (8, 4, 3, 3), 72, 288),
        ("blocks.1.0.weight", "MaskedConv2d", (8, 4, 3, 3), 288, 288),
        ("head.weight", "MaskedLinear", (5, 8), 0, 40),
    ]
    assert [l.density for l in report.layers] == [0.25, 1.0, 0.0]
    assert (report.kept, report.total) == (360, 616)
    assert report.density == pytest.approx(360 / 616) and report.sparsity == pytest.approx(256 / 616)
    lines = str(report).splitlines()
    assert lines[0].split() == ["weight", "layer", "shape", "kept/total", "density"]
    assert lines[1].split() == ["blocks.0.0.weight", "MaskedConv2d", "8x4x3x3", "72/288", "25.00%"]
    assert lines[-1].split() == ["global", "360/616", "58.44%"]
    assert str(swamp.sparsity_report(Net())) == "no masked layers"
    assert swamp.sparsity_report(Net()).density == 1.0


def test_export_dense_round_trip():
    torch.manual_seed(0)
    model = swamp.sparsify(Net().eval(), exclude="stem")
    generator = torch.Generator().manual_seed(0)
    swamp.set_masks(model, {n: torch.rand(m.shape, generator=generator) < 0.3
                            for n, m in swamp.masks(model).items()})
    dense = swamp.export_dense(model)
    assert not any(isinstance(m, MaskedLayer) for m in dense.modules())
    assert not any(k.endswith("weight_mask") for k in dense.state_dict())
    assert masked_names(model) == ["blocks.0.0", "blocks.1.0", "head"]  # the original is untouched
    fresh = Net().eval()
    fresh.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh(x), model(x)) and torch.equal(dense(x), model(x))
    # and back: a sparsified fresh model loads the masked checkpoint strictly
    again = swamp.sparsify(Net().eval(), exclude="stem")
    again.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(again(x), model(x))
