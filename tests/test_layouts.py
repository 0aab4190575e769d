"""Memory layouts of the elementwise multi-tensor ops: no copies where operands share a dense layout.

The helper (:class:`swamp_kernels._tensors.ElementwiseOperands`) gives flat memory-order views
of an index's operands when they agree (channels_last weights, grads, buffers and masks;
stacked particles with a per-particle channels_last layout and their masks) and stand-in
copies only of the operands that differ. Checked: the views themselves, every backend that
runs here against the torch reference on contiguous clones (values, exact zeros where
masked, unchanged data pointers, no stand-ins), and MaskedSGD / ModuleEngine
on a channels_last conv model against a contiguous run.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import swamp_kernels as sk
from backend_params import skip_unless_runs
from kernel_checks import assert_rel_close
from swamp_kernels import cuda as cuda_backend
from swamp_kernels import reference
from swamp.optim import MaskedSGD
from swamp_kernels._tensors import (ElementwiseOperands, allocate_first_buffers, empty_particle_row,
                                    particle_row_strides)

CL = torch.channels_last


def per_particle_cl(P: int, C: int, H: int, W: int, gen) -> torch.Tensor:
    """``[P, C, H, W]`` whose particles are each channels_last and packed one after the other."""
    return torch.randn(P, H, W, C, generator=gen).permute(0, 3, 1, 2)


def row_cl(C: int, H: int, W: int, values: torch.Tensor) -> torch.Tensor:
    """``values`` ([C, H, W]) in the layout of one particle of :func:`per_particle_cl`."""
    return values.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """The entries of a densely packed ``t`` in the order they lie in memory."""
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d) if t.shape[d] != 1 else 0)
    return t.permute(order).reshape(-1)


# ------------------------------------------------------------------ the helper itself
def test_shared_channels_last_layout_gives_memory_order_views():
    gen = torch.Generator().manual_seed(0)
    p, g, b = (torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=CL) for _ in range(3))
    m = (torch.rand(4, 3, 5, 5, generator=gen) < 0.5).to(memory_format=CL)
    ops = ElementwiseOperands([[p], [g], [b], [m]], written=(0, 2))
    assert ops.stand_ins == []
    for original, (view,) in zip((p, g, b, m), ops.columns):
        assert view.shape == (original.numel(),) and view.is_contiguous()
        assert view.data_ptr() == original.data_ptr()
        assert torch.equal(view, original.permute(0, 2, 3, 1).reshape(-1))


def test_stacked_particles_with_a_row_mask_give_particle_rows():
    gen = torch.Generator().manual_seed(1)
    p, g = per_particle_cl(3, 4, 3, 2, gen), per_particle_cl(3, 4, 3, 2, gen)
    m = row_cl(4, 3, 2, torch.rand(4, 3, 2, generator=gen) < 0.5)
    assert not p.is_contiguous() and not m.is_contiguous()
    ops = ElementwiseOperands([[p], [g], [m]])
    assert ops.stand_ins == []
    (pv,), (gv,), (mv,) = ops.columns
    assert pv.shape == (3, 24) and mv.shape == (24,)
    assert (pv.data_ptr(), gv.data_ptr(), mv.data_ptr()) == (p.data_ptr(), g.data_ptr(), m.data_ptr())
    for k in range(3):  # particle k's entry j meets mask entry j
        assert torch.equal(pv[k], p[k].permute(1, 2, 0).reshape(-1))
    assert torch.equal(mv, m.permute(1, 2, 0).reshape(-1))


def test_size_one_dims_and_scalars_do_not_defeat_the_views():
    x = torch.arange(12.0).reshape(4, 3).t().unsqueeze(1)   # [3, 1, 4], a transposed layout
    odd = x.as_strided((3, 1, 4), (1, 77, 3))               # same layout, arbitrary size-1 stride
    mask = (x > 4).as_strided((3, 1, 4), (1, 5, 3))
    assert not odd.is_contiguous()
    ops = ElementwiseOperands([[odd, torch.tensor(2.0), torch.ones(1, 1).as_strided((1, 1), (9, 4))],
                               [mask, torch.tensor(True), torch.ones(1, 1, dtype=torch.bool)]])
    assert ops.stand_ins == []
    assert ops.columns[0][0].data_ptr() == odd.data_ptr()
    assert torch.equal(ops.columns[0][0], memory_order(odd))


def laid_out_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` stored with ``like``'s strides (``like`` densely packed)."""
    return torch.empty_strided(values.shape, like.stride(), dtype=values.dtype).copy_(values)


def operand_case(case: str, gen):
    """(param, grad, buffer, mask, expected stand-ins): grad = 2 * param, buffer = param + 1 and
    mask = param > 0 entry by entry, whatever their layouts (the mask of particle 0 when stacked)."""
    if case == "cl_param_contiguous_mask_and_grad":
        p = torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=CL)
        return p, 2 * p.contiguous(), (p + 1).to(memory_format=CL), (p > 0).contiguous(), [(1, 0), (3, 0)]
    if case == "transposed":
        p = torch.randn(6, 10, generator=gen).t()
        return p, laid_out_like(2 * p, p), laid_out_like(p + 1, p), laid_out_like(p > 0, p), []
    if case == "strided":   # not densely packed: the layout is contiguous
        p = torch.randn(5, 12, generator=gen)[:, ::2]
        return p, (2 * p).contiguous(), (p + 1).contiguous(), (p > 0).contiguous(), [(0, 0)]
    if case == "grad_transposed_too":   # channels_last param, grad in yet another dense layout
        p = torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=CL)
        g = (2 * p).transpose(2, 3).contiguous().transpose(2, 3)
        return p, g, (p + 1).to(memory_format=CL), (p > 0).to(memory_format=CL), [(1, 0)]
    # every other particle of a stack: rows not packed, so the layout is contiguous
    p = per_particle_cl(6, 4, 3, 2, gen)[::2]
    return p, (2 * p).contiguous(), (p + 1).contiguous(), row_cl(4, 3, 2, p[0] > 0), [(0, 0), (3, 0)]


@pytest.mark.parametrize("case", ["cl_param_contiguous_mask_and_grad", "transposed", "strided",
                                  "grad_transposed_too", "unpacked_particles"])
def test_only_operands_off_the_anchor_layout_are_copied(case):
    p, g, b, m, expected = operand_case(case, torch.Generator().manual_seed(2))
    ops = ElementwiseOperands([[p], [g], [b], [m]], written=(0, 2))
    assert ops.stand_ins == expected
    copied = {c for c, _ in expected}
    for c, original in enumerate((p, g, b, m)):
        assert (ops.columns[c][0].data_ptr() == original.data_ptr()) == (c not in copied), f"column {c}"
    (pv,), (gv,), (bv,), (mv,) = ops.columns
    assert torch.equal(gv, 2 * pv) and torch.equal(bv, pv + 1)   # entry j is one logical entry
    assert torch.equal(mv, (pv if pv.dim() == 1 else pv[0]) > 0)
    for view in (pv, gv, bv, mv):
        view.fill_(False if view.dtype == torch.bool else 7.0)
    ops.write_back()   # written columns (param, buffer) reach their originals, the others do not
    assert (p == 7).all() and (b == 7).all()
    if 1 in copied:
        assert not (g == 7).any()
    if 3 in copied:   # the read-only mask's stand-in was cleared, not the mask
        assert m.any()


def test_particle_rows_take_one_particle_layout_when_packed():
    gen = torch.Generator().manual_seed(3)
    packed = per_particle_cl(3, 4, 3, 2, gen)
    assert particle_row_strides(packed) == packed[0].stride() == (1, 8, 4)
    single = packed[:1].as_strided((1, 4, 3, 2), (999, 1, 8, 4))   # P == 1: stride(0) is arbitrary
    assert particle_row_strides(single) == (1, 8, 4)
    assert particle_row_strides(per_particle_cl(6, 4, 3, 2, gen)[::2]) == (6, 2, 1)
    assert particle_row_strides(torch.randn(3, 4, 6)[:, :, ::2]) == (3, 1)
    out = empty_particle_row(packed)
    assert out.shape == (4, 3, 2) and out.stride() == (1, 8, 4) and out.dtype == packed.dtype


def test_first_buffers_take_the_param_layout():
    params = [torch.randn(4, 3, 3, 3).to(memory_format=CL), torch.randn(5, 6).t(), torch.randn(3)]
    kept = torch.zeros(5, 6).t()
    buffers = [None, kept, None]
    assert allocate_first_buffers(params, buffers) == [True, False, True]
    assert buffers[1] is kept
    assert buffers[0].stride() == params[0].stride() and buffers[0].dtype == params[0].dtype
    assert buffers[2].shape == (3,)


# ------------------------------------------------------------------ every backend here
@pytest.fixture(params=sk.BACKENDS)
def backend(request):
    """Each backend that runs here (the CUDA one through its host build: tests/cuda_emulation)."""
    skip_unless_runs("masked_sgd_step_", request.param, torch.device("cpu"))   # all three ops alike
    return request.param


def sgd_problem(seed: int, device):
    """(params, masks, grads per step, stand-ins expected per step): each layout case the
    ResNet-50 channels_last run and its mixes produce, plus a stacked particle tensor."""
    gen = torch.Generator().manual_seed(seed)
    cl = torch.randn(8, 3, 3, 3, generator=gen).to(memory_format=CL)
    mixed = torch.randn(4, 2, 3, 3, generator=gen).to(memory_format=CL)
    stacked = per_particle_cl(3, 4, 3, 2, gen)
    transposed = torch.randn(7, 5, generator=gen).t()
    strided = torch.randn(6, 10, generator=gen)[:, ::2]
    odd = torch.randn(3, 4, generator=gen).t().unsqueeze(1).as_strided((4, 1, 3), (1, 77, 4))
    params = [cl, mixed, stacked, transposed, strided, odd, torch.randn((), generator=gen),
              torch.randn(9, generator=gen)]
    masks = [(torch.rand(cl.shape, generator=gen) < 0.6).to(memory_format=CL),
             torch.rand(mixed.shape, generator=gen) < 0.6,                       # contiguous
             row_cl(4, 3, 2, torch.rand(4, 3, 2, generator=gen) < 0.6),          # per particle
             (torch.rand(7, 5, generator=gen) < 0.6).t(),
             torch.rand(strided.shape, generator=gen) < 0.6,
             (torch.rand(3, 4, generator=gen) < 0.6).t().unsqueeze(1).as_strided((4, 1, 3), (1, 5, 4)),
             torch.tensor(False), None]

    def grads():
        out = [torch.randn(p.shape, generator=gen) for p in params]
        out[0] = out[0].to(memory_format=CL)
        out[2] = laid_out_like(out[2], stacked)
        out[3] = laid_out_like(out[3], transposed)
        out[5] = laid_out_like(out[5], odd)
        return out   # out[1] (channels_last param) contiguous; out[4] contiguous
    params = [p.to(device) for p in params]
    masks = [None if m is None else m.to(device) for m in masks]
    # copies: the contiguous mask and grad of params[1]; the strided params[4] itself
    stand_ins = [(1, 1), (3, 1), (0, 4)]
    return params, masks, [[g.to(device) for g in grads()] for _ in range(3)], stand_ins


class RecordingOperands(ElementwiseOperands):
    """ElementwiseOperands that keeps every instance, to read their stand-ins."""
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingOperands.made.append(self)


@pytest.fixture
def recorded(monkeypatch):
    """Backend modules build their operands with :class:`RecordingOperands`."""
    import swamp_kernels.triton.apply_masks as t_apply
    import swamp_kernels.triton.masked_sgd as t_sgd
    import swamp_kernels.triton.particles as t_particles
    RecordingOperands.made = []
    for module in (t_apply, t_sgd, t_particles, cuda_backend):
        monkeypatch.setattr(module, "ElementwiseOperands", RecordingOperands)
    return RecordingOperands.made


def test_masked_sgd_runs_in_place_on_every_layout(backend, recorded):
    params, masks, steps, stand_ins = sgd_problem(0, "cpu")
    want = [p.clone(memory_format=torch.contiguous_format) for p in params]
    want_masks = [None if m is None else m.contiguous() for m in masks]
    pointers = [p.data_ptr() for p in params]
    buffers, want_buffers = [None] * len(params), [None] * len(params)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    for grads in steps:
        sk.masked_sgd_step_(params, grads, buffers, masks, backend=backend, **hyper)
        reference.masked_sgd_step_(want, [g.contiguous() for g in grads], want_buffers, want_masks, **hyper)
    for i, (p, w, m) in enumerate(zip(params, want, masks)):
        assert p.data_ptr() == pointers[i], f"params[{i}] was replaced"
        assert_rel_close(p, w)
        assert_rel_close(buffers[i], want_buffers[i])
        if m is not None:
            assert (p[..., ~m] if p.dim() > m.dim() else p[~m]).eq(0).all(), f"params[{i}] not 0 where masked"
    if backend != "torch":
        for i in (0, 2, 3, 5):   # dense params: first buffers in their layout, no copies at all
            assert buffers[i].stride() == params[i].stride(), f"momentum_buffers[{i}]"
        assert [sorted(ops.stand_ins) for ops in recorded] == [sorted(stand_ins)] * len(steps)


def test_particle_ops_keep_one_particle_layout(backend, recorded):
    gen = torch.Generator().manual_seed(4)
    params = [per_particle_cl(3, 4, 3, 2, gen), torch.randn(3, 5, 7, generator=gen).transpose(1, 2),
              per_particle_cl(6, 2, 3, 3, gen)[::2], torch.randn(3, 6, generator=gen)]
    masks = [row_cl(4, 3, 2, torch.rand(4, 3, 2, generator=gen) < 0.6),
             (torch.rand(5, 7, generator=gen) < 0.6).t(),
             row_cl(2, 3, 3, torch.rand(2, 3, 3, generator=gen) < 0.6),   # particles unpacked: copied
             None]
    swa = [laid_out_like(torch.randn(p.shape[1:], generator=gen), p[0]) for p in params[:2]] + \
          [torch.randn(2, 3, 3, generator=gen), torch.randn(6, generator=gen)]
    want_swa = [s.clone(memory_format=torch.contiguous_format) for s in swa]
    contiguous = dict(params=[p.contiguous() for p in params],
                      masks=[None if m is None else m.contiguous() for m in masks])
    averages = sk.particle_average(params, masks, backend=backend)
    expected = reference.particle_average(**contiguous)
    pointers = [s.data_ptr() for s in swa]
    sk.swa_update_(swa, params, 2, masks, backend=backend)
    reference.swa_update_(want_swa, n_averaged=2, **contiguous)
    for i in range(len(params)):
        assert_rel_close(averages[i], expected[i])
        assert_rel_close(swa[i], want_swa[i])
        assert swa[i].data_ptr() == pointers[i]
        if masks[i] is not None:
            assert averages[i][~masks[i]].eq(0).all() and swa[i][~masks[i]].eq(0).all()
    if backend != "torch":
        assert [a.stride() for a in averages] == [(1, 8, 4), (1, 7), (9, 3, 1), (1,)]
        average_ops, swa_ops = recorded
        assert average_ops.stand_ins == [(0, 2), (2, 2)]   # the unpacked particles and their mask
        assert swa_ops.stand_ins == [(0, 2), (2, 2)]


def test_apply_masks_on_stacked_channels_last_particles_copies_nothing(backend, recorded):
    gen = torch.Generator().manual_seed(5)
    xs = [per_particle_cl(3, 4, 3, 2, gen), torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=CL)]
    ms = [row_cl(4, 3, 2, torch.rand(4, 3, 2, generator=gen) < 0.5),
          (torch.rand(4, 3, 3, 3, generator=gen) < 0.5).to(memory_format=CL)]
    want = [x.clone(memory_format=torch.contiguous_format) for x in xs]
    reference.apply_masks_(want, [m.contiguous() for m in ms])
    sk.apply_masks_(xs, ms, backend=backend)
    for x, w in zip(xs, want):
        assert torch.equal(x, w)
    if backend != "torch":
        assert [ops.stand_ins for ops in recorded] == [[]]


# ------------------------------------------------------------------ end to end
def conv_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5))


def masked_sgd_run(model: nn.Module, backend: str, steps: range, state=None):
    """Steps of MaskedSGD (masks on the conv and linear weights, in the weights' layout) on
    seeded batches; returns the optimizer."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    gen = torch.Generator().manual_seed(9)
    masks = {w: torch.empty_like(w, dtype=torch.bool).copy_(torch.rand(w.shape, generator=gen) < 0.6)
             for w in weights}
    opt = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True,
                    masks=masks, backend=backend)
    if state is not None:
        opt.load_state_dict(state)
    for step in steps:
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        if not weights[0].is_contiguous():
            x = x.contiguous(memory_format=CL)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return opt


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_masked_sgd_on_a_channels_last_model_matches_a_contiguous_one(backend_name):
    plain, last = conv_model(0), conv_model(0).to(memory_format=CL)
    conv = last[0].weight
    assert conv.is_contiguous(memory_format=CL) and not conv.is_contiguous()
    opt_plain = masked_sgd_run(plain, backend_name, range(3))
    opt_last = masked_sgd_run(last, backend_name, range(3))
    for a, b in zip(plain.parameters(), last.parameters()):
        assert_rel_close(b, a)
    buffer = opt_last.state[conv]["momentum_buffer"]
    if backend_name != "torch":
        assert buffer.stride() == conv.stride()   # allocated in the param's layout
    # a channels_last checkpoint loads into a contiguous model and vice versa (its buffers then
    # take the copy path), and both go on like the uninterrupted run
    uninterrupted = conv_model(0)
    masked_sgd_run(uninterrupted, backend_name, range(5))
    for source, target in ((opt_last, conv_model(0)), (opt_plain, conv_model(0).to(memory_format=CL))):
        with torch.no_grad():
            for p, q in zip(target.parameters(), source.param_groups[0]["params"]):
                p.copy_(q)
        masked_sgd_run(target, backend_name, range(3, 5), state=source.state_dict())
        for a, b in zip(uninterrupted.parameters(), target.parameters()):
            assert_rel_close(b, a)


def test_module_engine_channels_last_steps_match_contiguous_ones(monkeypatch, recorded):
    """Two ModuleEngine steps (the second reads the channels_last momentum) on the Triton
    backend: the channels_last weights, grads, buffers and masks are updated with no copies."""
    from swamp import config as C
    from swamp.distributed import Group
    from swamp.train import ModuleEngine, stack_state
    from test_train import batches, setup as train_setup
    monkeypatch.setenv("SWAMP_KERNELS_BACKEND", "triton")
    # PyTorch's init: OpenLTH's BatchNorm scales near 0 amplify the reordered convs' rounding
    config, data, net = train_setup("cifar_resnet_8", init="torch")
    last_config = C.from_dict({**C.to_dict(config), "train": {**C.to_dict(config)["train"], "channels_last": True}})
    plain = ModuleEngine(net, stack_state(net, 1), config, Group.single())
    last = ModuleEngine(net, stack_state(net, 1), last_config, Group.single())
    for x, y in batches(data, 2):
        for engine in (plain, last):
            engine.step(x, y, lr=0.05)
    convs = [i for i, p in enumerate(last.params) if p.dim() == 4]
    assert any(not last.params[i].is_contiguous() for i in convs)
    assert len(recorded) >= 4 and all(ops.stand_ins == [] for ops in recorded)
    for i, (a, b) in enumerate(zip(plain.params, last.params)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=last.names[i])
        torch.testing.assert_close(last.momentum[i], plain.momentum[i], rtol=1e-5, atol=1e-6)
        assert last.momentum[i].stride() == b.stride(), last.names[i]
