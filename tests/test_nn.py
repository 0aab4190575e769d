"""MaskedLinear / MaskedConv2d against the dense layer on ``weight * mask``.

Oracle: a plain nn layer run (via functional_call) on ``w * mask`` for a leaf ``w``, so its
weight gradient is ``grad * mask``. Also: optimizers keep pruned weights at exactly 0,
torch.compile(fullgraph), deepcopy/pickle, state_dict, autocast, channels_last, torch.func.
"""
import copy
import io
import random
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import swamp
from swamp.nn import MaskedConv2d, MaskedLayer, MaskedLinear, to_dense_, to_masked_, zero_pruned_

MASK_KINDS = ("random", "none_kept", "all_kept", "one_kept")


def make_mask(shape, kind, generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(shape, generator=generator) < 0.5
    mask = torch.full(shape, kind == "all_kept")
    if kind == "one_kept":
        mask.view(-1)[torch.randint(mask.numel(), (1,), generator=generator)] = True
    return mask


def masked_copy(dense: nn.Module, mask: torch.Tensor) -> MaskedLayer:
    """A masked layer with ``dense``'s configuration and weights, pruned by ``mask``."""
    layer = to_masked_(copy.deepcopy(dense))
    swamp.set_masks(layer, {"weight": mask})
    return layer


def check_against_dense(dense: nn.Module, mask: torch.Tensor, x: torch.Tensor) -> None:
    """Output and x/weight/bias gradients of the masked layer equal the dense layer on w * mask."""
    layer = masked_copy(dense, mask)
    w = dense.weight.detach().clone().requires_grad_()
    b = None if dense.bias is None else dense.bias.detach().clone().requires_grad_()
    x_ref, x_masked = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = functional_call(dense, {"weight": w * mask, "bias": b}, (x_ref,))
    actual = layer(x_masked)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    torch.testing.assert_close(x_masked.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=0)
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0
    assert torch.count_nonzero(layer.weight[~mask]) == 0
    if b is not None:
        torch.testing.assert_close(layer.bias.grad, b.grad, rtol=0, atol=0)


# ------------------------------------------------------------------ numerics vs dense
LINEAR_CASES = [  # in, out, bias, input shape
    (7, 5, True, (3, 7)),
    (1, 1, False, (1,)),
    (13, 3, True, (13,)),
    (6, 9, False, (2, 4, 6)),
    (33, 17, True, (5, 33)),
]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_matches_dense(case, kind):
    in_f, out_f, bias, x_shape = case
    torch.manual_seed(zlib.crc32(repr((case, kind)).encode()))
    dense = nn.Linear(in_f, out_f, bias=bias)
    check_against_dense(dense, make_mask(dense.weight.shape, kind, torch.Generator().manual_seed(1)),
                        torch.randn(x_shape))


CONV_CASES = [  # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, input shape
    (3, 5, 3, 1, 0, 1, 1, True, "zeros", (2, 3, 7, 9)),
    (4, 6, (3, 2), 2, 1, 1, 2, False, "zeros", (1, 4, 8, 7)),
    (6, 6, 3, 1, "same", 2, 3, True, "zeros", (2, 6, 9, 9)),
    (6, 6, 3, 1, "same", 1, 6, True, "reflect", (2, 6, 5, 6)),
    (2, 3, 5, 3, 2, 1, 1, True, "reflect", (3, 2, 11, 13)),
    (3, 4, 1, 1, 0, 1, 1, False, "zeros", (3, 5, 5)),
    (3, 4, 3, 1, 1, 1, 1, True, "circular", (3, 6, 6)),
    (5, 7, (1, 3), (2, 1), (0, 1), (1, 2), 1, True, "replicate", (2, 5, 6, 8)),
]


def conv_from_case(case) -> tuple[nn.Conv2d, tuple]:
    *args, bias, padding_mode, x_shape = case
    return nn.Conv2d(*args, bias=bias, padding_mode=padding_mode), x_shape


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_matches_dense(case, kind):
    torch.manual_seed(zlib.crc32(repr((case, kind)).encode()))
    dense, x_shape = conv_from_case(case)
    check_against_dense(dense, make_mask(dense.weight.shape, kind, torch.Generator().manual_seed(2)),
                        torch.randn(x_shape))


def random_conv_case(rng: random.Random):
    groups = rng.choice([1, 1, 2, 3])
    in_c, out_c = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    kernel = (rng.randint(1, 4), rng.randint(1, 4))
    dilation = (rng.randint(1, 2), rng.randint(1, 2))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    padding_mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    padding = "same" if stride == (1, 1) and rng.random() < 0.4 else (rng.randint(0, 2), rng.randint(0, 2))
    size = [rng.randint(4, 12) + dilation[i] * (kernel[i] - 1) for i in range(2)]
    x_shape = (rng.randint(1, 3), in_c, *size) if rng.random() < 0.8 else (in_c, *size)
    return (in_c, out_c, kernel, stride, padding, dilation, groups, rng.random() < 0.5, padding_mode,
            x_shape)


@pytest.mark.parametrize("seed", range(12))
def test_conv_matches_dense_random_shapes(seed):
    case = random_conv_case(random.Random(seed))
    torch.manual_seed(seed)
    dense, x_shape = conv_from_case(case)
    check_against_dense(dense, torch.rand(dense.weight.shape) < 0.3, torch.randn(x_shape))


@pytest.mark.parametrize("seed", range(6))
def test_linear_matches_dense_random_shapes(seed):
    rng = random.Random(100 + seed)
    in_f, out_f = rng.randint(1, 40), rng.randint(1, 40)
    lead = [rng.randint(1, 4) for _ in range(rng.randint(0, 2))]
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=rng.random() < 0.5)
    check_against_dense(dense, torch.rand(out_f, in_f) < 0.6, torch.randn(*lead, in_f))


def test_layers_are_drop_in():
    conv, lin = MaskedConv2d(3, 4, 3), MaskedLinear(4, 2, bias=False)
    assert isinstance(conv, nn.Conv2d) and isinstance(lin, nn.Linear)
    assert set(conv.state_dict()) == {"weight", "bias", "weight_mask"}
    assert set(lin.state_dict()) == {"weight", "weight_mask"}
    assert conv.weight_mask.dtype == torch.bool and bool(conv.weight_mask.all())
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    assert conv.double().weight_mask.dtype == torch.bool and conv.weight.dtype == torch.float64


# ------------------------------------------------------------------------ optimizers
def small_cnn() -> nn.Sequential:
    return nn.Sequential(MaskedConv2d(3, 6, 3, padding=1), nn.ReLU(),
                         MaskedConv2d(6, 6, 3, stride=2, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), MaskedLinear(24, 5))


def random_masks(model, density=0.5, seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(m.shape, generator=generator) < density
            for name, m in swamp.masks(model).items()}


def pruned_values(model) -> torch.Tensor:
    return torch.cat([m.weight[~m.weight_mask] for m in model.modules() if isinstance(m, MaskedLayer)])


def pruned_grads(model) -> torch.Tensor:
    return torch.cat([m.weight.grad[~m.weight_mask] for m in model.modules() if isinstance(m, MaskedLayer)])


class AddOne(torch.optim.Optimizer):
    """Hostile optimizer: ignores gradients and adds 1 to every parameter."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1.0)


OPTIMIZERS = {
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
    "sgd_nesterov_foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                       weight_decay=0.01, foreach=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
    "adam_amsgrad_foreach": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, weight_decay=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05, weight_decay=0.01),
    "add_one": AddOne,
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pruned_weights_stay_zero_after_every_step(name):
    """Dense steps build optimizer state, then pruning: pruned weights stay exactly 0."""
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = OPTIMIZERS[name](model.parameters())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(5, (4,))
    for step in range(7):
        if step == 3:
            swamp.set_masks(model, random_masks(model))
            assert torch.count_nonzero(pruned_values(model)) == 0
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        assert torch.count_nonzero(pruned_grads(model)) == 0
        optimizer.step()
        assert torch.count_nonzero(pruned_values(model)) == 0, f"step {step}"
    kept = torch.cat([m.weight[m.weight_mask] for m in model if isinstance(m, MaskedLayer)])
    assert torch.count_nonzero(kept) == kept.numel()  # the kept weights were trained


def test_float64_layers_stay_masked():
    model = small_cnn().double()
    swamp.set_masks(model, random_masks(model))
    AddOne(model.parameters()).step()
    assert model[0].weight.dtype == torch.float64
    assert torch.count_nonzero(pruned_values(model)) == 0


def test_zero_pruned_for_hand_written_updates():
    model = small_cnn()
    swamp.set_masks(model, random_masks(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.count_nonzero(pruned_values(model)) > 0
    zero_pruned_(model)
    assert torch.count_nonzero(pruned_values(model)) == 0


def test_step_hook_leaves_other_layers_alone():
    """Only masked weights the stepped optimizer holds are re-masked; dense params are untouched."""
    masked, dense = MaskedLinear(4, 4), nn.Linear(4, 4)
    swamp.set_masks(masked, {"weight": torch.eye(4, dtype=torch.bool)})
    AddOne(dense.parameters()).step()
    before = dense.weight.detach().clone()
    AddOne(masked.parameters()).step()
    assert torch.equal(dense.weight, before)
    assert torch.equal(masked.weight != 0, torch.eye(4, dtype=torch.bool))


# ------------------------------------------------------------- compile, copy, state
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          MaskedConv2d(8, 8, 3, stride=2, groups=4, padding_mode="reflect", padding=1),
                          nn.ReLU(), nn.Flatten(), MaskedLinear(8 * 4 * 4, 5))
    swamp.set_masks(model, random_masks(model))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):  # the second round runs on new masks: no stale constants in the graph
        out, ref = compiled(x), twin(x)
        torch.testing.assert_close(out, ref)
        out.square().sum().backward()
        ref.square().sum().backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        assert torch.count_nonzero(pruned_grads(model)) == 0
        new_masks = random_masks(model, density=0.3, seed=1)
        swamp.set_masks(model, new_masks)
        swamp.set_masks(twin, new_masks)
        model.zero_grad()
        twin.zero_grad()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")   # torch >= 2.14
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_func_transforms_mask_pruned_weights_under_compile(backend):
    """Dynamo drops a custom Function's backward inside torch.func transforms: compiled grad,
    vmap(grad) and jvp must still give zero gradients and tangents at pruned weights."""
    torch.manual_seed(0)
    layer = MaskedLinear(4, 3)
    swamp.set_masks(layer, {"weight": torch.rand(3, 4) < 0.5})
    mask, x = layer.weight_mask, torch.randn(5, 4)
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}

    def loss(p):
        return functional_call(layer, p, (x,)).square().sum()

    def compiled(fn):
        return torch.compile(fn, fullgraph=True, backend=backend)
    expected = torch.func.grad(loss)(params)
    got = compiled(lambda p: torch.func.grad(loss)(p))(params)
    assert torch.count_nonzero(got["weight"][~mask]) == 0
    torch.testing.assert_close(got, expected)
    stacked = {n: torch.stack([t, 2 * t]) for n, t in params.items()}
    per_particle = compiled(lambda p: torch.func.vmap(torch.func.grad(loss))(p))(stacked)
    assert torch.count_nonzero(per_particle["weight"][:, ~mask]) == 0
    torch.testing.assert_close(per_particle["weight"][1], torch.func.grad(loss)(
        {n: t[1] for n, t in stacked.items()})["weight"])
    ones = torch.ones_like(params["weight"])
    _, tangent = compiled(lambda w: torch.func.jvp(
        lambda v: functional_call(layer, {"weight": v, "bias": params["bias"]}, (x,)), (w,), (ones,)))(params["weight"])
    torch.testing.assert_close(tangent, x @ mask.float().T)


def test_an_exported_masked_layer_masks_its_gradient():
    torch.manual_seed(0)
    layer = MaskedLinear(4, 3)
    swamp.set_masks(layer, {"weight": torch.rand(3, 4) < 0.5})
    x = torch.randn(5, 4)
    exported = torch.export.export(layer, (x,)).module()
    exported(x).square().sum().backward()
    layer(x).square().sum().backward()
    weight = dict(exported.named_parameters())["weight"]
    assert torch.count_nonzero(weight.grad[~layer.weight_mask]) == 0
    torch.testing.assert_close(weight.grad, layer.weight.grad)


def test_deepcopy_and_pickle_keep_masks_and_the_guarantee():
    model = small_cnn()
    swamp.set_masks(model, random_masks(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        for name, mask in swamp.masks(model).items():
            assert torch.equal(swamp.masks(clone)[name], mask)
            assert clone.get_buffer(name + "_mask").data_ptr() != model.get_buffer(name + "_mask").data_ptr()
        AddOne(clone.parameters()).step()  # the copy is registered with the step hook
        assert torch.count_nonzero(pruned_values(clone)) == 0


def test_state_dict_strict_round_trip():
    torch.manual_seed(0)
    source, target = small_cnn(), small_cnn()
    swamp.set_masks(source, random_masks(source))
    state = source.state_dict()
    assert state["0.weight_mask"].dtype == torch.bool
    target.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(target(x), source(x))
    for name, mask in swamp.masks(source).items():
        assert torch.equal(swamp.masks(target)[name], mask)


def test_loading_masks_the_loaded_weights():
    """A state_dict whose weights are dense where its mask is False loads masked."""
    layer = MaskedConv2d(2, 3, 3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"] = torch.randn_like(state["weight"])
    state["weight_mask"] = torch.rand(state["weight"].shape) < 0.5
    layer.load_state_dict(state)
    assert torch.equal(layer.weight, state["weight"] * state["weight_mask"])


def test_plain_state_dict_into_masked_layer():
    """weight_mask missing: strict loading reports it; strict=False keeps the mask and masks the weight."""
    plain = nn.Conv2d(2, 3, 3)
    layer = MaskedConv2d(2, 3, 3)
    mask = torch.rand(layer.weight.shape) < 0.5
    swamp.set_masks(layer, {"weight": mask})
    with pytest.raises(RuntimeError, match="weight_mask"):
        layer.load_state_dict(plain.state_dict())
    result = layer.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["weight_mask"] and result.unexpected_keys == []
    assert torch.equal(layer.weight_mask, mask)
    assert torch.equal(layer.weight, plain.weight * mask)
    assert torch.equal(layer.bias, plain.bias)


def test_reset_parameters_keeps_the_mask():
    layer = MaskedLinear(8, 6)
    mask = torch.rand(6, 8) < 0.5
    swamp.set_masks(layer, {"weight": mask})
    old = layer.weight.detach().clone()
    layer.reset_parameters()
    assert torch.equal(layer.weight_mask, mask) and not torch.equal(layer.weight, old)
    assert torch.count_nonzero(layer.weight[~mask]) == 0


def test_meta_device_recipe_gives_a_full_mask(monkeypatch):
    """Built on the meta device, then to_empty (+ reset_parameters, torch's recipe, or a load):
    the mask is all True, not uninitialised memory; masks set or loaded afterwards are kept."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kwargs: empty_like(t, **kwargs).zero_())  # garbage
    with torch.device("meta"):
        model = nn.Sequential(*[MaskedLinear(8, 6) for _ in range(4)])
    model.to_empty(device="cpu")
    mask = torch.rand(6, 8) < 0.5
    dense = nn.Linear(8, 6).state_dict()
    swamp.set_masks(model, {"1.weight": mask})
    model[2].load_state_dict({**MaskedLinear(8, 6).state_dict(), "weight_mask": mask})
    model[3].load_state_dict(dense, strict=False)   # a dense checkpoint: the mask stays all True
    for layer in model:
        layer.reset_parameters()
    full = torch.ones(6, 8, dtype=torch.bool)
    assert [torch.equal(layer.weight_mask, m) for layer, m in zip(model, [full, mask, mask, full])] == [True] * 4
    layer = MaskedLinear(8, 6)
    swamp.set_masks(layer, {"weight": mask})
    layer.reset_parameters()
    assert torch.equal(layer.weight_mask, mask)


def test_dense_checkpoint_assigned_into_a_meta_model_gets_a_full_mask():
    with torch.device("meta"):
        layer = MaskedLinear(8, 6)
    dense = nn.Linear(8, 6).state_dict()
    layer.load_state_dict(dense, strict=False, assign=True)
    assert layer.weight_mask.device.type == "cpu" and layer.weight_mask.all()
    assert torch.equal(layer.weight, dense["weight"])
    layer(torch.randn(2, 8)).sum().backward()
    assert torch.equal(layer.weight.grad != 0, torch.ones(6, 8, dtype=torch.bool))


def test_a_dense_checkpoint_assigned_into_a_pruned_model_is_not_changed_in_the_callers_hands():
    layer = MaskedLinear(8, 6)
    swamp.set_masks(layer, {"weight": torch.rand(6, 8) < 0.5})
    dense = nn.Linear(8, 6).state_dict()
    kept = copy.deepcopy(dense)
    layer.load_state_dict(dense, strict=False, assign=True)
    assert all(torch.equal(dense[k], kept[k]) for k in dense)
    assert torch.equal(layer.weight, kept["weight"] * layer.weight_mask)
    masked = layer.state_dict()   # already zero where pruned: assigned as it is, no copy
    other = MaskedLinear(8, 6)
    other.load_state_dict(masked, assign=True)
    assert other.weight.data_ptr() == masked["weight"].data_ptr()
    weight, mask = layer.weight, layer.weight_mask   # a state_dict without the weight keeps it (an optimizer holds it)
    layer.load_state_dict({"weight_mask": torch.rand(6, 8) < 0.5}, strict=False, assign=True)
    assert layer.weight is weight and torch.equal(layer.weight != 0, mask & layer.weight_mask)


def test_weight_shared_by_two_layers_is_zeroed_where_either_mask_is_false():
    first, second = MaskedLinear(8, 6), MaskedLinear(8, 6)
    second.weight = first.weight
    masks = [torch.rand(6, 8) < 0.6, torch.rand(6, 8) < 0.6]
    model = nn.Sequential(first, second)
    swamp.set_masks(model, {"0.weight": masks[0], "1.weight": masks[1]})
    torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1).step()   # hook: one entry, not two
    AddOne(model.parameters()).step()
    assert torch.equal(first.weight != 0, masks[0] & masks[1])


def test_layers_pruned_by_torch_prune_are_refused():
    from torch.nn.utils import prune
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "weight", amount=0.5)
    with pytest.raises(TypeError, match=r"prune.remove\(layer, 'weight'\)"):
        to_masked_(layer)
    with pytest.raises(TypeError, match="torch.nn.utils.prune"):
        swamp.sparsify(nn.Sequential(layer))


def test_to_masked_and_back():
    conv = nn.Conv2d(2, 3, 3)
    weight = conv.weight
    assert to_masked_(conv) is conv and type(conv) is MaskedConv2d and conv.weight is weight
    assert to_masked_(conv) is conv
    assert to_dense_(conv) is conv and type(conv) is nn.Conv2d and not hasattr(conv, "weight_mask")
    with pytest.raises(TypeError, match="BatchNorm2d"):
        to_masked_(nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        to_masked_(nn.MultiheadAttention(4, 2).out_proj)
    with pytest.raises(TypeError, match="expected a MaskedLinear or MaskedConv2d"):
        to_dense_(nn.Linear(2, 2))


# ------------------------------------------------------------ dtypes, layouts, func
@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
def test_autocast_bf16_matches_dense(layer_kind):
    torch.manual_seed(0)
    dense = nn.Linear(16, 8) if layer_kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(3, 16) if layer_kind == "linear" else torch.randn(2, 4, 6, 6)
    mask = torch.rand(dense.weight.shape) < 0.5
    layer = masked_copy(dense, mask)
    w = dense.weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        ref = functional_call(dense, {"weight": w * mask, "bias": dense.bias}, (x,))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.float().sum().backward()
    ref.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=0)
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0


def test_channels_last():
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    mask = torch.rand(dense.weight.shape) < 0.5
    layer = masked_copy(dense, mask)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert layer.weight_mask.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 7, 7).to(memory_format=torch.channels_last)
    check_against_dense(dense, mask, x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        layer(x).square().sum().backward()
        optimizer.step()
    assert layer.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.count_nonzero(layer.weight[~mask]) == 0 and torch.count_nonzero(layer.weight[mask]) > 0


def test_functional_call_with_own_and_passed_masks():
    torch.manual_seed(0)
    layer = MaskedLinear(6, 4)
    swamp.set_masks(layer, {"weight": torch.rand(4, 6) < 0.5})
    x = torch.randn(3, 6)
    torch.testing.assert_close(functional_call(layer, {}, (x,)), layer(x), rtol=0, atol=0)
    mask = torch.rand(4, 6) < 0.5
    w = (torch.randn(4, 6) * mask).requires_grad_()
    out = functional_call(layer, {"weight": w, "weight_mask": mask}, (x,))
    torch.testing.assert_close(out, F.linear(x, w, layer.bias), rtol=0, atol=0)
    out.square().sum().backward()
    assert torch.count_nonzero(w.grad[~mask]) == 0 and torch.count_nonzero(w.grad[mask]) == mask.sum()


def test_per_sample_grads_with_vmap_are_masked():
    torch.manual_seed(0)
    layer = MaskedConv2d(2, 3, 3)
    mask = torch.rand(layer.weight.shape) < 0.5
    swamp.set_masks(layer, {"weight": mask})
    params = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}

    def loss(p, x):
        return functional_call(layer, p, (x[None],)).square().sum()

    xs = torch.randn(4, 2, 5, 5)
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)["weight"]
    for i in range(len(xs)):
        expected = torch.func.grad(loss)(params, xs[i])["weight"]
        torch.testing.assert_close(grads[i], expected)
    assert torch.count_nonzero(grads[:, ~mask]) == 0


def test_hessian_vector_product_matches_dense():
    """Double backward (needed for Hessian analyses) equals the dense HVP restricted to the mask."""
    torch.manual_seed(0)
    dense = nn.Linear(5, 3)
    mask = torch.rand(3, 5) < 0.5
    layer = masked_copy(dense, mask)
    x, v = torch.randn(4, 5), torch.randn(3, 5)
    w = dense.weight.detach().clone().requires_grad_()

    def hvp(weight, out):
        (g,) = torch.autograd.grad(out.tanh().sum(), weight, create_graph=True)
        return torch.autograd.grad((g * v).sum(), weight)[0]

    expected = hvp(w, F.linear(x, w * mask, dense.bias))
    actual = hvp(layer.weight, layer(x))
    torch.testing.assert_close(actual, expected)
    assert torch.count_nonzero(actual[~mask]) == 0


# ---------------------------------------------------------------------------- GPU
RESNET50_CONVS = [  # in, out, kernel, stride, padding, input H=W
    (3, 64, 7, 2, 3, 224),
    (64, 64, 1, 1, 0, 56),
    (64, 64, 3, 1, 1, 56),
    (64, 256, 1, 1, 0, 56),
    (256, 128, 1, 1, 0, 56),
    (128, 128, 3, 2, 1, 56),
    (512, 1024, 1, 2, 0, 28),
    (256, 256, 3, 1, 1, 14),
    (512, 512, 3, 1, 1, 7),
    (2048, 512, 1, 1, 0, 7),
]


def assert_close_scaled(actual, expected, rel=2e-2):
    """Close up to bf16/TF32 rounding of the accumulation order, relative to the output scale."""
    scale = expected.float().abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", RESNET50_CONVS, ids=str)
def test_gpu_resnet50_convs_channels_last(case, dtype):
    in_c, out_c, k, stride, padding, size = case
    torch.manual_seed(0)
    dense = nn.Conv2d(in_c, out_c, k, stride, padding, bias=False).cuda().to(
        dtype=dtype, memory_format=torch.channels_last)
    mask = torch.rand(dense.weight.shape, device="cuda") < 0.2
    layer = masked_copy(dense, mask)
    x = torch.randn(16, in_c, size, size, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    w = dense.weight.detach().clone().requires_grad_()
    x_ref, x_masked = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = functional_call(dense, {"weight": w * mask}, (x_ref,))
    actual = layer(x_masked)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(actual, expected)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    assert_close_scaled(x_masked.grad, x_ref.grad)
    assert_close_scaled(layer.weight.grad, w.grad)
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_linear_4096(dtype):
    torch.manual_seed(0)
    dense = nn.Linear(4096, 4096).cuda().to(dtype)
    mask = torch.rand(4096, 4096, device="cuda") < 0.2
    layer = masked_copy(dense, mask)
    x = torch.randn(4, 256, 4096, device="cuda", dtype=dtype)
    w = dense.weight.detach().clone().requires_grad_()
    expected = functional_call(dense, {"weight": w * mask}, (x,))
    actual = layer(x)
    assert_close_scaled(actual, expected)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    assert_close_scaled(layer.weight.grad, w.grad)
    assert_close_scaled(layer.bias.grad, dense.bias.grad)
    assert torch.count_nonzero(layer.weight.grad[~mask]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_adamw_bf16_autocast_keeps_pruned_zero(fused):
    torch.manual_seed(0)
    model = small_cnn().cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    x = torch.randn(8, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(5, (8,), device="cuda")
    for step in range(6):
        if step == 2:
            swamp.set_masks(model, random_masks(model))
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step >= 2:
            assert torch.count_nonzero(pruned_values(model)) == 0


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    torch.manual_seed(0)
    model = small_cnn().cuda()
    swamp.set_masks(model, random_masks(model))
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, device="cuda")
    out = torch.compile(model, fullgraph=True)(x)
    ref = twin(x)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    out.sum().backward()
    ref.sum().backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3)
    assert torch.count_nonzero(pruned_grads(model)) == 0


def test_forward_mode_derivatives_are_masked_like_gradients():
    """torch.func.jvp / hessian through a masked layer: the tangent of a pruned weight is 0 (the
    transpose of the masked gradient), so the Hessian is the dense one with pruned rows and
    columns zeroed (OBD/OBS-style saliencies)."""
    torch.manual_seed(0)
    model = swamp.sparsify(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    swamp.prune(model, 0.5)
    dense = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, mask = torch.randn(5, 4), model[0].weight_mask

    def loss(net):
        return lambda w: functional_call(net, {**params, "0.weight": w}, (x,)).square().sum()
    hessian, dense_hessian = (torch.func.hessian(loss(net))(params["0.weight"]) for net in (model, dense))
    both = mask[:, :, None, None] & mask[None, None, :, :]
    torch.testing.assert_close(hessian, torch.where(both, dense_hessian, 0))
    assert hessian[both].abs().sum() > 0
    tangent = torch.randn(3, 4)
    _, masked = torch.func.jvp(loss(model), (params["0.weight"],), (tangent,))
    _, expected = torch.func.jvp(loss(dense), (params["0.weight"],), (tangent * mask,))
    torch.testing.assert_close(masked, expected)


def test_torch_prune_on_a_swamp_layer_is_refused_and_leaves_it_as_it_was():
    from torch.nn.utils import prune
    layer = swamp.sparsify(nn.Sequential(nn.Linear(4, 4)))[0]
    weight, x = layer.weight, torch.randn(2, 4)
    expected = layer(x)
    with pytest.raises(TypeError, match=r"weight_mask must be a bool tensor, got torch.float32 "
                                        r"\(torch.nn.utils.prune on a swamp layer"):
        prune.l1_unstructured(layer, "weight", 0.3)   # would set a float weight_mask
    assert layer.weight is weight and layer.weight_mask.dtype == torch.bool and torch.equal(layer(x), expected)
    assert sorted(layer._parameters) == ["bias", "weight"] and not layer._forward_pre_hooks
    with pytest.raises(TypeError, match="weight_mask must be a bool tensor, got torch.uint8"):
        layer.weight_mask = torch.ones(4, 4, dtype=torch.uint8)


@pytest.mark.parametrize("reparametrize", [
    torch.nn.utils.parametrizations.spectral_norm, torch.nn.utils.parametrizations.weight_norm,
    torch.nn.utils.parametrizations.orthogonal, torch.nn.utils.spectral_norm])
def test_a_parametrization_of_the_weight_is_refused_and_leaves_the_layer_as_it_was(reparametrize):
    layer = swamp.sparsify(nn.Sequential(nn.Linear(4, 4)))[0]
    swamp.set_masks(layer, {"weight": torch.rand(4, 4) < 0.5})
    weight, values = layer.weight, layer.weight.detach().clone()
    with pytest.raises(TypeError, match="MaskedLinear: its weight must stay a parameter: a parametrization"):
        reparametrize(layer)
    assert type(layer) is MaskedLinear and layer.weight is weight and sorted(layer._parameters) == ["bias", "weight"]
    assert not layer._forward_pre_hooks and not hasattr(layer, "parametrizations")
    assert torch.all(layer.weight[~layer.weight_mask] == 0)   # orthogonal's right_inverse rewrote it first
    if reparametrize is not torch.nn.utils.parametrizations.orthogonal:
        assert torch.equal(layer.weight, values)


def test_the_old_weight_norm_is_refused_and_leaves_the_layer_as_it_was():
    layer = swamp.sparsify(nn.Sequential(nn.Linear(4, 4)))[0]
    swamp.set_masks(layer, {"weight": torch.rand(4, 4) < 0.5})
    weight, values, x = layer.weight, layer.weight.detach().clone(), torch.randn(2, 4)
    expected = layer(x)
    with warnings.catch_warnings(), pytest.raises(TypeError, match=r"MaskedLinear: torch.nn.utils.weight_norm would "
                                                                  r"compute its weight from weight_g and weight_v.*"
                                                                  r"\(the layer is left as it was\)"):
        warnings.simplefilter("ignore", FutureWarning)   # deprecated by torch
        torch.nn.utils.weight_norm(layer)
    assert layer.weight is weight and list(layer._parameters) == ["weight", "bias"] and not layer._forward_pre_hooks
    assert torch.equal(layer.weight, values) and torch.equal(layer(x), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")   # torch >= 2.14
def test_scripting_a_masked_model_names_what_works_instead():
    model = swamp.sparsify(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    swamp.prune(model, 0.5)
    with pytest.raises(TypeError, match=r"MaskedLinear cannot be scripted .* script swamp.export_dense\(model\)"):
        torch.jit.script(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.jit.script(swamp.export_dense(model))(x), model(x))
