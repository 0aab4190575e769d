"""MaskedSGD against torch.optim.SGD on masked grads (params masked after each step).

Also: state dicts move between torch.optim.SGD and MaskedSGD both ways and training goes
on identically; masks as a dict or an aligned list, stacked particle params, bad input.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import swamp
import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import assert_rel_close
from swamp.optim import MaskedSGD

BACKENDS = ["torch", "triton"]
OPTIONS = [dict(lr=0.1),
           dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
           dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True),
           dict(lr=0.02, momentum=0.8, nesterov=True, weight_decay=5e-3)]
# [P, *shape] stacked particles with masks of shape (broadcast), and plain params with full masks
SHAPES = [(4, 6, 3), (8, 5), (1,), (3, 3, 2, 2), (2, 7)]


def make_model(device):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in SHAPES]
    mask_shapes = [(6, 3), (8, 5), None, (3, 2, 2), (2, 7)]
    masks = [None if s is None else torch.rand(s, device=device) < 0.5 for s in mask_shapes]
    return params, masks


def copy_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, grads, masks=None):
    for i, (p, g) in enumerate(zip(params, grads)):
        m = None if masks is None else masks[i]
        p.grad = g.clone() if m is None else torch.where(m, g, 0.0)


def mask_(params, masks):
    with torch.no_grad():
        for p, m in zip(params, masks):
            if m is not None:
                p.mul_(m)


def oracle_step(sgd, params, grads, masks):
    """torch.optim.SGD on the masked grads, then the params masked."""
    set_grads(params, grads, masks)
    sgd.step()
    mask_(params, masks)


def assert_same_training(ours, theirs, ours_opt, theirs_opt):
    for p, q in zip(ours, theirs):
        assert_rel_close(p.detach(), q.detach())
        a, b = ours_opt.state[p].get("momentum_buffer"), theirs_opt.state[q].get("momentum_buffer")
        assert (a is None) == (b is None)
        if a is not None:
            assert_rel_close(a, b)


def train_side_by_side(ours, theirs, ours_opt, theirs_opt, masks, steps: int) -> None:
    """``steps`` steps of MaskedSGD and of the torch.optim.SGD oracle on the same random grads."""
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in theirs]
        set_grads(ours, grads)
        ours_opt.step()
        oracle_step(theirs_opt, theirs, grads, masks)
    assert_same_training(ours, theirs, ours_opt, theirs_opt)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_sgd(device, backend, options):
    skip_unless_runs("masked_sgd_step_", backend, device)
    torch.manual_seed(0)
    theirs, masks = make_model(device)
    ours = copy_params(theirs)
    ours_opt = MaskedSGD(ours, masks=masks, backend=backend, **options)
    theirs_opt = torch.optim.SGD(theirs, **options)
    train_side_by_side(ours, theirs, ours_opt, theirs_opt, masks, steps=4)
    for p, m in zip(ours, masks):
        if m is not None:
            assert (p[~m.expand(p.shape)] == 0).all()


def test_float64_params_step_as_torch_sgd():
    """No kernel takes float64: those params step through torch's own SGD, masked alike, next to
    float32 ones in the same group."""
    torch.manual_seed(3)
    theirs, masks = make_model("cpu")
    theirs = [torch.nn.Parameter(p.detach().double()) if i % 2 else p for i, p in enumerate(theirs)]
    ours = copy_params(theirs)
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    ours_opt, theirs_opt = MaskedSGD(ours, masks=masks, **options), torch.optim.SGD(theirs, **options)
    assert {p.dtype for p in ours} == {torch.float32, torch.float64}
    train_side_by_side(ours, theirs, ours_opt, theirs_opt, masks, steps=3)


def test_takes_what_torch_sgd_takes():
    """A tensor lr, foreach/fused flags and a negative dampening, as torch.optim.SGD."""
    torch.manual_seed(4)
    theirs, masks = make_model("cpu")
    ours = copy_params(theirs)
    ours_opt = MaskedSGD(ours, lr=torch.tensor(0.1), momentum=0.5, dampening=-0.5, foreach=True, fused=None,
                         masks=masks)
    theirs_opt = torch.optim.SGD(theirs, lr=torch.tensor(0.1), momentum=0.5, dampening=-0.5)
    train_side_by_side(ours, theirs, ours_opt, theirs_opt, masks, steps=2)
    with pytest.raises(ValueError, match="differentiable=True"):
        MaskedSGD(ours, lr=0.1, differentiable=True)


def test_param_groups_dict_masks_and_closure(device):
    """Two groups with their own hyperparameters, masks as a dict, params without grads skipped."""
    skip_unless_runs("masked_sgd_step_", "triton", device)
    torch.manual_seed(1)
    theirs, masks = make_model(device)
    ours = copy_params(theirs)

    def groups(ps):
        return [{"params": ps[:2], "momentum": 0.9}, {"params": ps[2:], "lr": 0.01}]
    ours_opt = MaskedSGD(groups(ours), lr=0.1, masks={p: m for p, m in zip(ours, masks)},
                         backend="triton")
    theirs_opt = torch.optim.SGD(groups(theirs), lr=0.1)
    for step in range(3):
        grads = [torch.randn_like(p) for p in theirs]
        grads[4] = None if step == 1 else grads[4]
        for params in (ours, theirs):
            params[4].grad = None
        set_grads(ours[:4], grads[:4])
        if grads[4] is not None:
            set_grads(ours[4:], grads[4:])
        assert ours_opt.step(closure=lambda: torch.tensor(7.0)) == 7.0
        keep = [i for i, g in enumerate(grads) if g is not None]
        set_grads([theirs[i] for i in keep], [grads[i] for i in keep], [masks[i] for i in keep])
        theirs_opt.step()
        mask_(theirs, masks)
    assert_same_training(ours, theirs, ours_opt, theirs_opt)
    assert "momentum_buffer" not in ours_opt.state[ours[3]]  # momentum 0: no state, like torch


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_moves_between_torch_sgd_and_masked_sgd(device, backend):
    """SGD trains, its state dict loads into MaskedSGD (and the reverse); both go on identically."""
    skip_unless_runs("masked_sgd_step_", backend, device)
    torch.manual_seed(2)
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    start, masks = make_model(device)
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]

    # torch.optim.SGD for 3 steps -> MaskedSGD for 3 more, against SGD all the way
    theirs = copy_params(start)
    theirs_opt = torch.optim.SGD(theirs, **options)
    for g in grads[:3]:
        oracle_step(theirs_opt, theirs, g, masks)
    ours = copy_params(theirs)
    ours_opt = MaskedSGD(ours, masks=masks, backend=backend, **options)
    ours_opt.load_state_dict(copy.deepcopy(theirs_opt.state_dict()))  # loading shares tensors
    for g in grads[3:]:
        set_grads(ours, g)
        ours_opt.step()
        oracle_step(theirs_opt, theirs, g, masks)
    assert_same_training(ours, theirs, ours_opt, theirs_opt)

    # MaskedSGD for 3 steps -> torch.optim.SGD for 3 more, against MaskedSGD all the way
    ours = copy_params(start)
    ours_opt = MaskedSGD(ours, masks=masks, backend=backend, **options)
    for g in grads[:3]:
        set_grads(ours, g)
        ours_opt.step()
    theirs = copy_params(ours)
    theirs_opt = torch.optim.SGD(theirs, **options)
    theirs_opt.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    for g in grads[3:]:
        set_grads(ours, g)
        ours_opt.step()
        oracle_step(theirs_opt, theirs, g, masks)
    assert_same_training(ours, theirs, ours_opt, theirs_opt)


def test_set_masks_replaces_all_masks():
    params, masks = make_model("cpu")
    opt = MaskedSGD(params, lr=0.1, masks=masks, backend="torch")
    assert set(map(id, opt.masks)) == {id(p) for p, m in zip(params, masks) if m is not None}
    pruned = torch.zeros(SHAPES[2], dtype=torch.bool)
    opt.set_masks({params[2]: pruned})
    assert list(opt.masks) == [params[2]] and opt.masks[params[2]] is pruned
    set_grads(params, [torch.randn_like(p) for p in params])
    before = params[0].detach().clone()
    opt.step()
    assert (params[2] == 0).all()
    assert_rel_close(params[0].detach(), before - 0.1 * params[0].grad)
    opt.set_masks(None)
    assert opt.masks == {}


def test_deepcopy_keeps_masks_and_backend():
    params, masks = make_model("cpu")
    opt = copy.deepcopy(MaskedSGD(params, lr=0.1, masks=masks, backend="torch"))
    assert opt.backend == "torch" and len(opt.masks) == 4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-0.1), ValueError, "Invalid lr"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum"),
    (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay"),
    (dict(nesterov=True), ValueError, "Nesterov"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "Nesterov"),
    (dict(backend="cuda-ish"), ValueError, "unknown backend"),
    (dict(masks=5), TypeError, r"masks must be None, a model, a dict \{param: mask\} or a sequence .* got int$"),
    (dict(masks="model"), TypeError, "masks must be None, a model, .* got str$"),
    (dict(masks=torch.ones(4, 4, dtype=torch.bool)), TypeError, r"got Tensor \(one param's mask: pass \[mask\]\)"),
    (dict(masks=[None]), ValueError, "masks has 1 tensors but params has 5"),
    (dict(masks={torch.ones(2): None}), ValueError, "not a parameter of this optimizer"),
    (dict(masks=[None, torch.ones(3, dtype=torch.bool), None, None, None]), ValueError,
     r"masks\[1\] has shape \(3,\)"),
    (dict(masks=[None, None, torch.ones(1), None, None]), TypeError, r"masks\[2\] has dtype"),
    (dict(masks={"0.weight": torch.ones(2, dtype=torch.bool)}), TypeError,
     r"masks has the key '0.weight'.*as swamp.masks\(model\) gives, pass masks=model"),
])
def test_bad_input_raises(kwargs, error, match):
    params, _ = make_model("cpu")
    with pytest.raises(error, match=match):
        MaskedSGD(params, **{"lr": 0.1, **kwargs})


def test_an_unavailable_backend_fails_at_construction(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("triton runs here")
    with pytest.raises(sk.BackendError, match=r"backend 'triton' is not available here \(no CUDA GPU: set "
                                              r"TRITON_INTERPRET=1"):
        MaskedSGD(make_model("cpu")[0], lr=0.1, backend="triton")


def test_masks_of_a_model_whose_layers_it_does_not_hold_warn():
    model, other = (swamp.sparsify(nn.Sequential(nn.Linear(3, 2))) for _ in range(2))
    with pytest.warns(UserWarning, match=r"holds the weight of none of the 1 masked layers of the Sequential") as caught:
        assert not MaskedSGD(other.parameters(), lr=0.1, masks=model).masks
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match=r"the Sequential passed has no masked layers \(swamp.sparsify it first\)"):
        optimizer = MaskedSGD(other.parameters(), lr=0.1, masks=nn.Sequential(nn.Linear(3, 2)))
    with pytest.warns(UserWarning, match="holds the weight of none") as caught:
        optimizer.set_masks(model)
    assert caught[0].filename == __file__   # the user's line, from the constructor or set_masks


def test_layer_hook_skips_weights_masked_sgd_already_masks(monkeypatch):
    from swamp import nn as snn
    layer, other = snn.MaskedLinear(6, 4), snn.MaskedLinear(6, 4)
    for l in (layer, other):
        l.weight_mask.copy_(torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) < 0.5)
        snn.zero_pruned_(l)
    opt = MaskedSGD([layer.weight, other.weight], lr=0.1, weight_decay=0.1,
                    masks={layer.weight: layer.weight_mask, other.weight: other.weight_mask.clone()})
    assert opt.masks_in_step(layer.weight, layer.weight_mask)
    assert not opt.masks_in_step(other.weight, other.weight_mask)
    rezeroed = []
    monkeypatch.setattr(snn, "_zero_pruned", lambda layers: rezeroed.append(list(layers)))
    (layer(torch.randn(3, 6)).sum() + other(torch.randn(3, 6)).sum()).backward()
    opt.step()
    assert rezeroed == [[other]]
    assert not layer.weight[~layer.weight_mask].any()


def test_masks_from_a_model_are_its_layer_masks_by_reference(monkeypatch):
    import swamp
    from swamp import nn as snn
    torch.manual_seed(0)
    model = swamp.sparsify(torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)))
    opt = MaskedSGD(model[0].parameters(), lr=0.1, weight_decay=0.1, masks=model)   # holds layer 0 only
    assert list(opt.masks) == [model[0].weight] and opt.masks[model[0].weight] is model[0].weight_mask
    swamp.prune(model, 0.5)                             # new masks: seen at the next step
    rezeroed = []
    monkeypatch.setattr(snn, "_zero_pruned", lambda layers: rezeroed.append(list(layers)))
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert rezeroed == [] and not model[0].weight_mask.all()
    assert not model[0].weight[~model[0].weight_mask].any()


def test_masks_of_a_model_are_followed_when_its_layers_get_new_mask_tensors():
    """masks=model: model.to(channels_last) (or .cuda()) after building the optimizer gives the
    conv layer a new mask tensor; the step uses the layer's current mask, not the old one."""
    import swamp
    model = swamp.sparsify(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10)))
    optimizer = MaskedSGD(model.parameters(), lr=0.1, masks=model)
    swamp.prune(model, 0.9)
    old = model[0].weight_mask
    model.to(memory_format=torch.channels_last)
    assert model[0].weight_mask is not old
    swamp.set_masks(model, {"0.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)})   # regrow the conv
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    assert model[0].weight.ne(0).all()
    assert optimizer.masks_in_step(model[0].weight, model[0].weight_mask)


def test_a_failed_set_masks_keeps_following_the_model():
    import swamp
    model = swamp.sparsify(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    optimizer = MaskedSGD(model.parameters(), lr=0.1, masks=model)
    with pytest.raises(TypeError, match=r"masks\[0\] has dtype torch.float32; expected bool"):
        optimizer.set_masks([torch.ones(4, 4), None])
    model[0].weight_mask = model[0].weight_mask.clone()   # a new mask tensor for the layer
    model[0].weight.grad = torch.ones(4, 4)
    optimizer.step()
    assert optimizer.masks_in_step(model[0].weight, model[0].weight_mask)
