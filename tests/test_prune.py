"""global_magnitude_prune / layerwise_magnitude_prune against a brute-force oracle and torch.nn.utils.prune.

The oracle is a stable sort of the candidates by descending key in Python: the first
``n - n_prune`` survive, so ties keep the lowest global index (tensors in list order,
each in logical row-major order). Masks are compared bitwise.
"""
from __future__ import annotations

import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import swamp_kernels as sk
from kernel_checks import laid_out
from backend_params import every_backend, skip_unless_runs

PRUNE_OPS = ("global_magnitude_prune", "layerwise_magnitude_prune")

# (storage shape, dtype, layout); "transposed" and "strided" change the logical shape.
SPECS = [((1,), torch.float32, "contiguous"),
         ((7, 13), torch.float16, "contiguous"),
         ((6, 3, 3, 5), torch.float32, "channels_last"),
         ((12, 10), torch.bfloat16, "transposed"),
         ((1, 1, 1, 1), torch.float16, "channels_last"),
         ((9, 16), torch.float32, "strided"),
         ((257,), torch.bfloat16, "contiguous")]


# --------------------------------------------------------------------------- oracle
def _survivors(keys: list[float], cands: list[bool], amount) -> list[bool]:
    idx = [i for i, c in enumerate(cands) if c]
    n_prune = amount if isinstance(amount, int) else round(amount * len(idx))
    kept = set(sorted(idx, key=lambda i: -keys[i])[:len(idx) - n_prune])  # stable sort
    return [i in kept for i in range(len(keys))]


def oracle(weights, masks, amount, scores=None, layerwise=False) -> list[torch.Tensor]:
    """Brute-force prune on small inputs (keys in float64, candidates in logical order)."""
    sources = scores if scores is not None else [w.abs() for w in weights]
    keys = [s.double().reshape(-1).tolist() for s in sources]
    cands = [[True] * len(k) if m is None else m.reshape(-1).tolist()
             for k, m in zip(keys, masks or [None] * len(keys))]
    if layerwise:
        flat = [_survivors(k, c, amount) for k, c in zip(keys, cands)]
    else:
        kept = _survivors(sum(keys, []), sum(cands, []), amount)
        bounds = torch.tensor([0] + [len(k) for k in keys]).cumsum(0).tolist()
        flat = [kept[a:b] for a, b in zip(bounds, bounds[1:])]
    return [torch.tensor(f, dtype=torch.bool, device=w.device).reshape(w.shape)
            for f, w in zip(flat, weights)]


def assert_same_masks(got, expected):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == torch.bool and g.shape == e.shape and g.device == e.device, i
        assert torch.equal(g, e), f"mask {i} differs: {g.reshape(-1).tolist()} != {e.reshape(-1).tolist()}"


def assert_pruned_exactly(got, masks, n_prune):
    """Properties that hold independently of the oracle: subset of the old masks, exact count."""
    old = masks or [torch.ones_like(g) for g in got]
    assert all(not (g & ~m).any() for g, m in zip(got, old))
    n = sum(int(m.sum()) for m in old)
    assert sum(int(g.sum()) for g in got) == n - n_prune


# ------------------------------------------------------------------------- inputs
def _values(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    """normal; ties: quantised to a few magnitudes, zeros of both signs; equal: +-0.5 only."""
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "ties":
        return torch.randint(0, 4, shape, generator=gen) * 0.25 * sign
    return 0.5 * sign


def make_case(seed: int, kind: str, masked: bool, with_scores: bool, device):
    """Weights over :data:`SPECS` (mixed dtypes and layouts), masks and scores laid out alike."""
    gen = torch.Generator().manual_seed(seed)
    weights, masks, scores = [], [], []
    for i, (shape, dtype, layout) in enumerate(SPECS):
        weights.append(laid_out(_values(kind, shape, gen).to(dtype).to(device), layout))
        masks.append(laid_out((torch.rand(shape, generator=gen) < 0.7).to(device), layout))
        score_dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        scores.append(laid_out(_values(kind, shape, gen).to(score_dtype).to(device), layout))
    return weights, masks if masked else None, scores if with_scores else None


AMOUNTS = [0.0, 0.2, 1.0, "int 0", "int half", "int all"]


def resolve(amount, counts: list[int], layerwise: bool):
    """Int amounts relative to the candidate count (per tensor: the smallest one)."""
    if not isinstance(amount, str):
        return amount
    n = min(counts) if layerwise else sum(counts)
    return {"int 0": 0, "int half": n // 2, "int all": n}[amount]


def n_pruned(amount, count: int) -> int:
    return amount if isinstance(amount, int) else round(amount * count)


def check_against_oracle(op, backend, device, kind, masked, with_scores, amount):
    seed = zlib.crc32(repr((op, kind, masked, with_scores, amount)).encode())
    weights, masks, scores = make_case(seed, kind, masked, with_scores, device)
    layerwise = op == "layerwise_magnitude_prune"
    counts = [w.numel() if masks is None else int(m.sum()) for w, m in zip(weights, masks or weights)]
    amount = resolve(amount, counts, layerwise)

    got = getattr(sk, op)(weights, masks, amount, scores=scores, backend=backend)

    assert_same_masks(got, oracle(weights, masks, amount, scores, layerwise))
    if layerwise:
        for i, count in enumerate(counts):
            assert_pruned_exactly(got[i:i + 1], masks and masks[i:i + 1], n_pruned(amount, count))
    else:
        assert_pruned_exactly(got, masks, n_pruned(amount, sum(counts)))


# -------------------------------------------------------------------------- tests
@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("masked", [False, True], ids=["fresh", "already_pruned"])
@pytest.mark.parametrize("amount", AMOUNTS)
def test_matches_bruteforce_oracle(backend, device, op, kind, masked, amount):
    skip_unless_runs(op, backend, device)
    check_against_oracle(op, backend, device, kind, masked, False, amount)


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
@pytest.mark.parametrize("kind", ["normal", "ties", "equal"])
@pytest.mark.parametrize("masked", [False, True], ids=["fresh", "already_pruned"])
def test_scores_match_bruteforce_oracle(backend, device, op, kind, masked):
    """Scores of mixed dtypes (negative ones included) rank the candidates instead of |w|."""
    skip_unless_runs(op, backend, device)
    for amount in (0.2, "int half"):
        check_against_oracle(op, backend, device, kind, masked, True, amount)


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
def test_ties_break_in_logical_order_for_any_layout(backend, device, op):
    skip_unless_runs(op, backend, device)
    shape = (4, 3, 2, 2)
    signs = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    weight = (0.5 * signs).to(device).contiguous(memory_format=torch.channels_last)
    got = getattr(sk, op)([weight], amount=30, backend=backend)
    assert_same_masks(got, [torch.arange(48, device=device).reshape(shape) < 18])

    weights, masks, _ = make_case(2, "ties", True, False, device)
    dense = getattr(sk, op)([w.contiguous() for w in weights], [m.contiguous() for m in masks], 0.4,
                            backend=backend)
    assert_same_masks(getattr(sk, op)(weights, masks, 0.4, backend=backend), dense)


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
@pytest.mark.parametrize("with_scores", [False, True], ids=["magnitude", "scores"])
def test_negative_and_positive_zero_are_equal_keys(backend, device, op, with_scores):
    skip_unless_runs(op, backend, device)
    zeros = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.0 if with_scores else 0.0], device=device)
    weights = [torch.ones(5, device=device)] if with_scores else [zeros]
    got = getattr(sk, op)(weights, amount=3, scores=[zeros] if with_scores else None, backend=backend)
    assert_same_masks(got, [torch.tensor([True, True, False, False, False], device=device)])


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
def test_scores_decide_alone(backend, device, op):
    """With scores, the weights' magnitudes (even NaN) play no part; negative scores rank lowest."""
    skip_unless_runs(op, backend, device)
    weights = [torch.full((2, 3), float("nan"), device=device)]
    scores = [torch.tensor([[-3.0, 2.0, -1.0], [0.5, -0.5, 4.0]], device=device)]
    got = getattr(sk, op)(weights, amount=0.5, scores=scores, backend=backend)
    assert_same_masks(got, [torch.tensor([[False, True, False], [True, False, True]], device=device)])


@every_backend
def test_one_element_tensors_and_python_rounding(backend, device):
    skip_unless_runs("global_magnitude_prune", backend, device)
    one = [torch.tensor([3.0], device=device)]
    assert sk.global_magnitude_prune(one, amount=0.5, backend=backend)[0].item()  # round(0.5) == 0
    assert not sk.global_magnitude_prune(one, amount=1.0, backend=backend)[0].item()
    three = [torch.tensor([v], dtype=d, device=device)
             for v, d in ((2.0, torch.float16), (-3.0, torch.bfloat16), (1.0, torch.float32))]
    got = sk.global_magnitude_prune(three, amount=0.5, backend=backend)  # round(1.5) == 2
    assert [g.item() for g in got] == [False, True, False]


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
def test_returns_new_masks(backend, device, op):
    skip_unless_runs(op, backend, device)
    weights, masks, _ = make_case(3, "normal", True, False, device)
    before = [m.clone() for m in masks]
    got = getattr(sk, op)(weights, masks, 0.0, backend=backend)
    assert_same_masks(got, before)
    for g in got:
        g.fill_(False)
    assert_same_masks(masks, before)
    assert all(g.all() for g in getattr(sk, op)(weights, None, 0, backend=backend))


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
def test_nan_and_inf_outside_the_candidates_are_ignored(backend, device, op):
    skip_unless_runs(op, backend, device)
    weights, masks, _ = make_case(4, "normal", True, False, device)
    for w, m, bad in zip(weights, masks, (float("nan"), float("inf"), -float("inf"))):
        w.masked_fill_(~m, bad)
    got = getattr(sk, op)(weights, masks, 0.3, backend=backend)
    assert_same_masks(got, oracle(weights, masks, 0.3, layerwise=op == "layerwise_magnitude_prune"))


@every_backend
def test_iterated_levels_stay_nested(backend, device):
    skip_unless_runs("global_magnitude_prune", backend, device)
    weights, _, _ = make_case(5, "ties", False, False, device)
    masks, remaining = None, sum(w.numel() for w in weights)
    for _ in range(4):
        new = sk.global_magnitude_prune(weights, masks, 0.2, backend=backend)
        assert_same_masks(new, oracle(weights, masks, 0.2))
        assert_pruned_exactly(new, masks, round(0.2 * remaining))
        masks, remaining = new, remaining - round(0.2 * remaining)


# ------------------------------------------------------------ torch.nn.utils.prune
def _tie_free_modules(device, seed: int):
    """Modules whose weights have distinct magnitudes, and random old masks for them."""
    gen = torch.Generator().manual_seed(seed)
    modules = [nn.Linear(13, 7), nn.Conv2d(3, 5, 3), nn.Linear(5, 1), nn.Conv2d(2, 4, 1)]
    n = sum(m.weight.numel() for m in modules)
    magnitudes = (torch.randperm(n, generator=gen).float() + 1) / n
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    values = (magnitudes * signs).split([m.weight.numel() for m in modules])
    old_masks = []
    for m, v in zip(modules, values):
        m.to(device)
        with torch.no_grad():
            m.weight.copy_(v.reshape(m.weight.shape))
        old_masks.append((torch.rand(m.weight.shape, generator=gen) < 0.8).to(device))
    return modules, old_masks


def _ours_and_premasked_modules(op: str, backend: str, device, amount, seed: int):
    """``op``'s masks on ``backend`` for the weights and old masks of :func:`_tie_free_modules`, and
    those modules carrying the old masks as ``torch.nn.utils.prune`` masks, ready for torch to prune."""
    skip_unless_runs(op, backend, device)
    modules, old_masks = _tie_free_modules(device, seed)
    weights = [m.weight.detach().clone() for m in modules]
    got = getattr(sk, op)(weights, old_masks, amount, backend=backend)
    for m, old in zip(modules, old_masks):
        prune.custom_from_mask(m, "weight", old)
    return got, modules


@every_backend
@pytest.mark.parametrize("amount", [0.3, 0.0, 1.0, 17, 0])
def test_global_matches_torch_prune_global_unstructured(backend, device, amount):
    got, modules = _ours_and_premasked_modules("global_magnitude_prune", backend, device, amount, seed=6)
    prune.global_unstructured([(m, "weight") for m in modules], pruning_method=prune.L1Unstructured,
                              amount=amount)
    assert_same_masks(got, [m.weight_mask.bool() for m in modules])


@every_backend
@pytest.mark.parametrize("amount", [0.3, 2])
def test_layerwise_matches_torch_prune_l1_unstructured(backend, device, amount):
    got, modules = _ours_and_premasked_modules("layerwise_magnitude_prune", backend, device, amount, seed=7)
    for m in modules:
        prune.l1_unstructured(m, "weight", amount=amount)
    assert_same_masks(got, [m.weight_mask.bool() for m in modules])


# -------------------------------------------------------------------------- errors
def _weights(device):
    return [torch.randn(4, device=device), torch.randn(2, 3, device=device)]


def _ones(device, *shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype, device=device)


BOOL, NAN, INF = torch.bool, float("nan"), float("inf")
BAD_INPUTS = {
    "empty list": (lambda d: dict(weights=[]), ValueError, r"weights is empty"),
    "not a list": (lambda d: dict(weights=_ones(d, 3)), TypeError,
                   r"weights must be a list or tuple of tensors"),
    "not a tensor": (lambda d: dict(weights=[_ones(d, 3), [1.0]]), TypeError,
                     r"weights\[1\] is a list, not a tensor"),
    "int weights": (lambda d: dict(weights=[_ones(d, 3), _ones(d, 2, dtype=torch.int64)]), TypeError,
                    r"weights\[1\] has dtype torch.int64; expected float32"),
    "float64 weights": (lambda d: dict(weights=[_ones(d, 3, dtype=torch.float64)]), TypeError,
                        r"weights\[0\] has dtype torch.float64"),
    "sparse weights": (lambda d: dict(weights=[_ones(d, 3), _ones(d, 2, 2).to_sparse()]), TypeError,
                       r"weights\[1\] is a sparse_coo tensor; the ops take dense"),
    "weights device": (lambda d: dict(weights=[_ones(d, 3), _ones("meta", 2)]), ValueError,
                       r"weights\[1\] is on meta but weights\[0\] is on"),
    "mask count": (lambda d: dict(weights=_weights(d), masks=[_ones(d, 4, dtype=BOOL)]), ValueError,
                   r"masks has 1 tensors but weights has 2"),
    "mask shape": (lambda d: dict(weights=_weights(d),
                                  masks=[_ones(d, 4, dtype=BOOL), _ones(d, 3, 2, dtype=BOOL)]),
                   ValueError, r"masks\[1\] has shape \(3, 2\), expected \(2, 3\) like weights\[1\]"),
    "mask dtype": (lambda d: dict(weights=_weights(d), masks=[_ones(d, 4, dtype=BOOL), _ones(d, 2, 3)]),
                   TypeError, r"masks\[1\] has dtype torch.float32; expected bool"),
    "mask device": (lambda d: dict(weights=_weights(d),
                                   masks=[_ones("meta", 4, dtype=BOOL), _ones(d, 2, 3, dtype=BOOL)]),
                    ValueError, r"masks\[0\] is on meta but weights\[0\] is on"),
    "scores shape": (lambda d: dict(weights=_weights(d), scores=[_ones(d, 4), _ones(d, 6)]), ValueError,
                     r"scores\[1\] has shape \(6,\), expected \(2, 3\) like weights\[1\]"),
    "scores dtype": (lambda d: dict(weights=_weights(d),
                                    scores=[_ones(d, 4), _ones(d, 2, 3, dtype=torch.int32)]),
                     TypeError, r"scores\[1\] has dtype torch.int32"),
    "NaN candidate": (lambda d: dict(weights=[_ones(d, 4), torch.tensor([[1.0, NAN, 2.0]] * 2, device=d)]),
                      ValueError, r"weights\[1\] has NaN or Inf among its candidate entries"),
    "Inf candidate": (lambda d: dict(weights=[torch.tensor([1.0, -INF], device=d)],
                                     masks=[torch.tensor([False, True], device=d)]),
                      ValueError, r"weights\[0\] has NaN or Inf among its candidate entries"),
    "NaN score": (lambda d: dict(weights=_weights(d), scores=[_ones(d, 4), _ones(d, 2, 3) * NAN]),
                  ValueError, r"scores\[1\] has NaN or Inf among its candidate entries"),
    "amount > 1": (lambda d: dict(weights=_weights(d), amount=1.5), ValueError,
                   r"amount=1.5 must lie in \[0, 1\]"),
    "amount < 0": (lambda d: dict(weights=_weights(d), amount=-0.1), ValueError,
                   r"amount=-0.1 must lie in \[0, 1\]"),
    "amount NaN": (lambda d: dict(weights=_weights(d), amount=NAN), ValueError, r"must lie in \[0, 1\]"),
    "int amount < 0": (lambda d: dict(weights=_weights(d), amount=-1), ValueError, r"amount=-1 must be >= 0"),
    "int amount > n": (lambda d: dict(weights=_weights(d), amount=11), ValueError,
                       r"amount=11 exceeds the 10 candidates"),
    "bool amount": (lambda d: dict(weights=_weights(d), amount=True), TypeError,
                    r"amount must be a float in \[0, 1\] or an int in \[0, n\], got True"),
    "str amount": (lambda d: dict(weights=_weights(d), amount="0.2"), TypeError, r"amount must be a float"),
}


@every_backend
@pytest.mark.parametrize("op", PRUNE_OPS)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_named(backend, device, op, case):
    skip_unless_runs(op, backend, device)
    make_kwargs, error, message = BAD_INPUTS[case]
    if case == "int amount > n" and op == "layerwise_magnitude_prune":
        message = r"amount=11 exceeds the 4 candidates of weights\[0\]"
    with pytest.raises(error, match=message):
        getattr(sk, op)(**make_kwargs(device), backend=backend)


@every_backend
def test_layerwise_int_amount_names_the_short_tensor(backend, device):
    skip_unless_runs("layerwise_magnitude_prune", backend, device)
    masks = [torch.ones(4, dtype=torch.bool, device=device), torch.eye(2, 3, dtype=torch.bool, device=device)]
    with pytest.raises(ValueError, match=r"amount=3 exceeds the 2 candidates of weights\[1\]"):
        sk.layerwise_magnitude_prune(_weights(device), masks, 3, backend=backend)


def test_random_scores_take_a_list_of_weights():
    with pytest.raises(TypeError, match="weights must be a list or tuple of tensors, got Tensor"):
        sk.random_scores(torch.ones(3, 4), seed=0)
    with pytest.raises(TypeError, match=r"weights\[1\] is a int, not a tensor"):
        sk.random_scores([torch.ones(3), 4], seed=0)


# --------------------------------------------------------------------------- scale
def test_reference_global_prune_scales_without_a_full_sort(monkeypatch):
    """2*10^7 candidates in mixed sizes and dtypes; no sort/argsort/topk over a large input."""
    n = 2 * 10**7
    gen = torch.Generator().manual_seed(8)
    sizes = [n // 2, n // 4, n - n // 2 - n // 4 - 1, 1]
    weights = [torch.randn(s, generator=gen).to(d)
               for s, d in zip(sizes, (torch.float32, torch.float16, torch.float32, torch.bfloat16))]
    large_sorts = []
    for owner in (torch, torch.Tensor):
        for name in ("sort", "argsort", "topk", "msort"):
            original = getattr(owner, name, None)
            if original is None:
                continue

            def spy(x, *args, _original=original, _name=name, **kwargs):
                if x.numel() > 10**5:
                    large_sorts.append((_name, x.numel()))
                return _original(x, *args, **kwargs)
            monkeypatch.setattr(owner, name, spy)

    masks = sk.global_magnitude_prune(weights, amount=0.2, backend="torch")

    assert not large_sorts
    assert sum(int(m.sum()) for m in masks) == n - round(0.2 * n)
    lowest_kept = min(torch.where(m, w.abs(), float("inf")).min().float() for w, m in zip(weights, masks))
    highest_pruned = max(torch.where(m, -1.0, w.abs()).max().float() for w, m in zip(weights, masks))
    assert lowest_kept >= highest_pruned
