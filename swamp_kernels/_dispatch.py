"""Backend selection: which implementation of a public op runs on given tensors.

Each backend module exposes ``OPS``, a dict from op name to implementation:
``swamp_kernels.reference`` (torch, every op), ``swamp_kernels.triton`` and
``swamp_kernels.cuda`` (the compiled extension ``swamp_kernels._C``).

``backend="auto"`` walks the chain cuda -> triton -> torch for CUDA tensors and
picks the first backend that is available and implements the op; CPU tensors use
torch. ``SWAMP_KERNELS_BACKEND`` makes ``auto`` prefer one backend wherever it
implements the op and can run on the tensors' device (it must be available). An explicit backend
that is unavailable, lacks the op or cannot run on the tensors' device raises
:class:`BackendError`.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "SWAMP_KERNELS_BACKEND"
_MODULES = {
    "torch": "swamp_kernels.reference",
    "triton": "swamp_kernels.triton",
    "cuda": "swamp_kernels.cuda",
}


class BackendError(RuntimeError):
    """A requested backend cannot run the requested op here."""


class _Refused:
    def __repr__(self) -> str:
        return "REFUSED"


REFUSED = _Refused()
"""What an entry of ``UNCHECKED_OPS`` returns when its own checks refuse the arguments (nothing ran)."""


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return device.type == "cuda"


def _is_available(backend: str) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        gpu_or_interpreter = torch.cuda.is_available() or triton_interpreting()
        return gpu_or_interpreter and _importable("triton")
    return torch.cuda.is_available() and _importable("swamp_kernels._C")


def available_backends() -> list[str]:
    """Backends that can run on this machine, in the order of :data:`BACKENDS`."""
    return [b for b in BACKENDS if _is_available(b)]


def _ops(backend: str) -> dict[str, Callable]:
    return importlib.import_module(_MODULES[backend]).OPS


def _unavailable_because(backend: str) -> str:
    """Why ``backend`` (not torch) is unavailable, as a parenthesis."""
    if backend == "triton":
        if not (torch.cuda.is_available() or triton_interpreting()):
            return " (no CUDA GPU: set TRITON_INTERPRET=1 to run Triton on CPU)"
        return " (triton cannot be imported)"
    if not torch.cuda.is_available():
        return " (no CUDA GPU)"
    return " (the compiled extension swamp_kernels._C is not built: pip install -e . with a CUDA toolkit)"


def require_available(backend: str) -> None:
    """Raise BackendError, saying why, unless ``backend`` ("auto" or one of :data:`BACKENDS`)
    can run on this machine."""
    if backend != "auto" and not _is_available(backend):
        raise BackendError(
            f"backend {backend!r} is not available here{_unavailable_because(backend)}; available backends: "
            f"{', '.join(available_backends())}")


def _explicit(op: str, backend: str, device: torch.device) -> str:
    require_available(backend)
    if not _runs_on(backend, device):
        hint = " (set TRITON_INTERPRET=1 to run Triton on CPU)" if backend == "triton" else ""
        raise BackendError(f"backend {backend!r} cannot run on {device} tensors{hint}")
    if op not in _ops(backend):
        having = [b for b in available_backends() if op in _ops(b)]
        raise BackendError(
            f"backend {backend!r} does not implement {op}; backends that do: {', '.join(having)}")
    return backend


# The ``auto`` chain of each op on CUDA tensors, fastest measured first: ``python -m
# benchmarks.auto_order`` suggests it from a GPU's benchmark results. Ops not listed take
# DEFAULT_CUDA_CHAIN (provisional until measured: the compiled extension checks its input in C++).
DEFAULT_CUDA_CHAIN = ("cuda", "triton", "torch")
AUTO_ORDER: dict[str, tuple[str, ...]] = {}


def _auto(op: str, device: torch.device) -> str:
    chain = AUTO_ORDER.get(op, DEFAULT_CUDA_CHAIN) if device.type == "cuda" else ("torch",)
    for backend in chain:
        if _is_available(backend) and op in _ops(backend):
            return backend
    raise AssertionError("the torch reference implements every op")  # pragma: no cover


def _chosen(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` for tensors on ``device`` under ``backend``."""
    if backend not in ("auto", *BACKENDS):
        raise BackendError(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend != "auto":
        return _explicit(op, backend, device)
    preferred = preferred_backend()
    if preferred != "auto" and op in _ops(preferred) and _runs_on(preferred, device):
        return preferred
    return _auto(op, device)


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    """The function that runs ``op`` for tensors on ``device`` under ``backend``."""
    return _ops(_chosen(op, backend, device))[op]


def unchecked_implementation(op: str, backend: str, device: torch.device) -> Callable | None:
    """The entry of the backend :func:`implementation` picks that takes ``op``'s arguments unvalidated
    (the backend's ``UNCHECKED_OPS``): it runs the op and returns its result when its own checks
    accept them as they are, else returns :data:`REFUSED` having changed nothing. None when that
    backend has no such entry, or when picking it raises (the validated path then raises the error)."""
    try:
        chosen = _chosen(op, backend, device)
    except BackendError:
        return None
    return getattr(importlib.import_module(_MODULES[chosen]), "UNCHECKED_OPS", {}).get(op)


def preferred_backend() -> str:
    """The backend ``SWAMP_KERNELS_BACKEND`` makes ``auto`` prefer ("auto" when unset).

    Raises BackendError when it names no backend, or one that is not available here (a long
    run checks this before it starts)."""
    preferred = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if preferred not in ("auto", *BACKENDS):
        raise BackendError(f"{ENV_VAR}={preferred!r} is not one of auto, {', '.join(BACKENDS)}")
    try:
        require_available(preferred)
    except BackendError as error:
        raise BackendError(f"{ENV_VAR}={preferred}: {error}") from None
    return preferred
