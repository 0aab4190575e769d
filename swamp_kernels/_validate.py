"""Input checks shared by every backend: bad input fails before any kernel runs.

Each error names the offending argument and tensor index, e.g.
``ValueError: masks[3] has shape (64, 3), expected (64, 3, 3, 3) like weights[3]``.
"""
from __future__ import annotations

import numbers
from itertools import repeat
from typing import Sequence

import torch

from swamp_kernels._tensors import densely_packed, overlaps_itself

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16 or bfloat16"


def _dense_tensor(name: str, i: int | None, x) -> None:
    """Raise unless ``x`` (``name[i]``; ``name`` if ``i`` is None) is a dense (strided) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_label(name, i)} is a {type(x).__name__}, not a tensor")
    if x.layout != torch.strided:
        raise TypeError(f"{_label(name, i)} is a {str(x.layout).replace('torch.', '')} tensor; the ops take dense "
                        "(strided) tensors: convert it with .to_dense() (e.g. nn.Embedding(sparse=True) gives "
                        "sparse gradients)")


def _label(name: str, i: int | None) -> str:
    return name if i is None else f"{name}[{i}]"


def tensor_list(name: str, xs) -> list[torch.Tensor]:
    """``xs`` as a non-empty list of dense (strided) tensors on one device."""
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    if len(xs) == 0:
        raise ValueError(f"{name} is empty; pass at least one tensor")
    for i, x in enumerate(xs):
        _dense_tensor(name, i, x)
        if x.device != xs[0].device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {name}[0] is on {xs[0].device}")
    return list(xs)


def is_tensor_list(xs, length: int | None = None, *, optional: bool = False) -> bool:
    """True when ``xs`` is a non-empty list or tuple of tensors (of ``length`` when given; None
    entries allowed with ``optional``). Raises nothing: the quick shape test of the unchecked paths."""
    if type(xs) not in (list, tuple) or not xs or (length is not None and len(xs) != length):
        return False
    kinds = (torch.Tensor, type(None)) if optional else torch.Tensor
    return all(map(isinstance, xs, repeat(kinds)))   # no Python frame per entry


def float_tensors(name: str, xs) -> list[torch.Tensor]:
    """:func:`tensor_list` whose tensors are float32, float16 or bfloat16."""
    xs = tensor_list(name, xs)
    for i, x in enumerate(xs):
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] has dtype {x.dtype}; expected {_DTYPE_NAMES}")
    return xs


def _span(x: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that ``x`` covers exactly: all of them for a tensor densely
    packed in memory (any dimension order), else just its first element's (no false overlaps
    between interleaved views such as a matrix's column blocks)."""
    dense = x.is_contiguous() or densely_packed(x.shape, x.stride())
    return x.data_ptr(), x.data_ptr() + (x.numel() if dense else 1) * x.element_size()


def distinct(*written: tuple[str, Sequence[torch.Tensor]]) -> None:
    """Raise if two tensors written in place, in the ``(name, tensors)`` lists given, share
    memory (a tied weight listed twice, a momentum buffer shared by two params, overlapping
    views of one buffer): their updates would race on the GPU. Exact for tensors dense in
    memory; a strided view (gaps between its entries) counts by its first entry only, so
    interleaved views that share a later entry pass. A tensor whose own entries share memory
    (``expand``) is refused too. None entries (buffers not made yet) are skipped."""
    spans = []
    for name, xs in written:
        for i, x in enumerate(xs):
            if x is None or x.numel() == 0:
                continue
            if not x.is_contiguous() and overlaps_itself(x.shape, x.stride()):
                raise ValueError(f"{name}[{i}] has entries that share memory (an expanded or as_strided view, "
                                 f"strides {tuple(x.stride())}); a tensor written in place needs its own memory "
                                 "for each entry: pass a .clone()")
            spans.append((*_span(x), name, i))
    spans.sort(key=lambda span: (span[0], -span[1]))
    reach = None   # the span reaching furthest so far
    for span in spans:
        start, end, name, i = span
        if reach is not None and start < reach[1]:
            first, first_i = reach[2], reach[3]
            if (start, end) == reach[:2]:
                raise ValueError(f"{name}[{i}] is the memory of {first}[{first_i}] (a shared weight listed "
                                 "twice?); tensors written in place must not share memory: list a shared "
                                 "weight once, with its masks combined (&)")
            raise ValueError(f"{name}[{i}] overlaps the memory of {first}[{first_i}] (views of one buffer?); "
                             "tensors written in place must not share memory")
        if reach is None or end > reach[1]:
            reach = span


def companions(name: str, xs, like_name: str, like: Sequence[torch.Tensor],
               *, dtypes: Sequence[torch.dtype] | None = None, leading: int = 0,
               particle_dim: bool = False, optional: bool = False) -> list:
    """Check ``xs`` pairs one-to-one with ``like`` (tensors on one device): dense tensors of the
    same length, device and shape, ``like[i].shape[leading:]`` (``leading=1``: the shape of one particle
    of stacked ``[P, *shape]`` tensors).

    With ``particle_dim`` an entry may also have ``like[i].shape[1:]`` (a mask that
    broadcasts over the leading particle dimension); with ``optional`` entries may be None.
    Runs on every op call: the common case is a few attribute reads per tensor.
    """
    if isinstance(xs, torch.Tensor) or not isinstance(xs, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    if len(xs) != len(like):
        raise ValueError(f"{name} has {len(xs)} tensors but {like_name} has {len(like)}")
    device = like[0].device if like else None
    for i, (x, ref) in enumerate(zip(xs, like)):
        if x is None and optional:
            continue
        _dense_tensor(name, i, x)
        if x.device != device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {like_name}[{i}] is on {ref.device}")
        if dtypes is not None and x.dtype not in dtypes:
            expected = " or ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}[{i}] has dtype {x.dtype}; expected {expected}")
        shape, wanted = x.shape, ref.shape[leading:] if leading else ref.shape
        if shape != wanted and not (particle_dim and len(wanted) > 0 and shape == wanted[1:]):
            shapes = [tuple(wanted)] + ([tuple(wanted[1:])] if particle_dim and len(wanted) > 0 else [])
            raise ValueError(f"{name}[{i}] has shape {tuple(shape)}, expected {' or '.join(map(str, shapes))} "
                             f"like {like_name}[{i}]")
    return list(xs)


def bool_masks(masks, like_name: str, like: Sequence[torch.Tensor], *, leading: int = 0,
               particle_dim: bool = False, optional: bool = False) -> list | None:
    """``masks`` (None allowed): bool tensors matching ``like`` one-to-one (see :func:`companions`).

    With ``optional`` single entries may be None (that tensor is not masked).
    """
    if masks is None:
        return None
    return companions("masks", masks, like_name, like, dtypes=(torch.bool,), leading=leading,
                      particle_dim=particle_dim, optional=optional)


def layer_weight(weight, mask) -> None:
    """The ``weight`` of a masked layer op (float32, float16 or bfloat16) and its bool ``mask``
    of the same shape and device."""
    _dense_tensor("weight", None, weight)
    _dense_tensor("mask", None, mask)
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight has dtype {weight.dtype}; expected {_DTYPE_NAMES}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask has dtype {mask.dtype}; expected bool")
    if mask.device != weight.device:
        raise ValueError(f"mask is on {mask.device} but weight is on {weight.device}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(weight.shape)} like weight")


def linear_operands(x, weight: torch.Tensor, bias) -> None:
    """``x`` [..., K] and ``bias`` (None or [N]) of :func:`masked_linear` with ``weight`` [N, K]:
    dense, on the weight's device, in its dtype unless autocast is on there."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    autocast = torch.is_autocast_enabled(weight.device.type)
    for name, t in (("x", x), ("bias", bias)):
        if t is None and name == "bias":
            continue
        _dense_tensor(name, None, t)
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
        if t.dtype != weight.dtype and not (autocast and t.dtype in FLOAT_DTYPES):
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}; "
                            "masked_linear needs one dtype (or run under torch.autocast: "
                            f"{_DTYPE_NAMES} operands)")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {k}] for weight of shape ({n}, {k})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for weight of shape ({n}, {k})")


def check_amount(amount) -> None:
    """Type and range checks on ``amount`` that need no candidate count."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be a float in [0, 1] or an int in [0, n], got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"amount={amount} must be >= 0")
    elif not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount={amount} must lie in [0, 1] as a float")


def prune_count(amount, n: int, where: str = "") -> int:
    """How many of ``n`` candidates to prune: ``round(amount * n)`` or the int itself."""
    check_amount(amount)
    if isinstance(amount, numbers.Integral):
        if amount > n:
            raise ValueError(f"amount={amount} exceeds the {n} candidates{where}")
        return int(amount)
    return round(float(amount) * n)


def finite_candidates(name: str, values: Sequence[torch.Tensor],
                      masks: Sequence[torch.Tensor] | None) -> None:
    """Raise if any candidate (masked-in entry) of ``values`` is NaN or infinite."""
    bad = [~torch.isfinite(v) if masks is None else ~torch.isfinite(v) & m
           for v, m in zip(values, masks or [None] * len(values))]
    raise_if_nonfinite(name, torch.stack([b.any() for b in bad]).tolist())  # one host sync


def raise_if_nonfinite(name: str, flags: Sequence) -> None:
    """Raise for the first tensor of ``name`` whose flag says it has a NaN/Inf candidate."""
    for i, flag in enumerate(flags):
        if flag:
            raise ValueError(f"{name}[{i}] has NaN or Inf among its candidate entries")


def particle_params(name: str, params) -> list[torch.Tensor]:
    """Stacked particle tensors ``[P, *shape]`` with one P for all."""
    params = float_tensors(name, params)
    for i, p in enumerate(params):
        if p.dim() == 0 or p.shape[0] == 0:
            raise ValueError(f"{name}[{i}] has shape {tuple(p.shape)}; expected [P, *shape] with P >= 1")
        if p.shape[0] != params[0].shape[0]:
            raise ValueError(f"{name}[{i}] has {p.shape[0]} particles but {name}[0] has "
                             f"{params[0].shape[0]} (P mismatch)")
    return params


def non_negative_int(name: str, value) -> int:
    """An int in [0, 2**63 - 1): ``value + 1`` still fits the kernels' int64."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**63 - 1:
        raise ValueError(f"{name} must be an int in [0, 2**63 - 1), got {value!r}")
    return int(value)
