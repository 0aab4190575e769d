"""Test set-up: without a GPU, Triton runs on CPU tensors through its interpreter and the CUDA
backend through the host build of its kernels (tests/cuda_emulation).

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os

import pytest
import torch
import torch.utils.deterministic

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def _uses_the_gpu(item) -> bool:
    """On a machine with a GPU: the test runs on it (a ``device`` of "cuda", or ``cuda_device``)."""
    callspec = getattr(item, "callspec", None)
    on_cuda = callspec is not None and str(callspec.params.get("device")) == "cuda"
    return on_cuda or "cuda_device" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)   # before `-m` selects by marker
def pytest_collection_modifyitems(config, items):
    """``gpu`` marks every test that runs on the GPU here, so that ``pytest -m gpu`` on a GPU
    machine also runs the backend tests on CUDA tensors; without a GPU, marked tests skip."""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if HAS_CUDA and _uses_the_gpu(item):
            item.add_marker(pytest.mark.gpu)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def _backend(item) -> str | None:
    """The ``backend`` the test is parametrised with, if any."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


def _runs_swamp_kernels(item) -> bool:
    """The test runs the Triton or CUDA kernels (not only the torch reference)."""
    return (_backend(item) in ("triton", "cuda") or "cuda_device" in getattr(item, "fixturenames", ())
            or item.module.__name__.startswith("test_triton_"))


@pytest.fixture(autouse=True)
def new_memory_holds_garbage(request, monkeypatch):
    """Without a GPU, in the kernel tests, new tensors (``torch.empty``, in Python and in the
    emulated CUDA bindings) are filled with NaN or the largest integer, as a GPU's allocator
    hands out memory holding old data: a kernel that leaves an output entry unwritten, or reads
    a workspace it did not clear, fails its test. (torch fills only in deterministic mode;
    warn_only keeps every op. On a GPU the fills would be kernel launches of their own, which
    the launch-counting tests would see.)"""
    if HAS_CUDA or not _runs_swamp_kernels(request.node):
        yield
        return
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    mode = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode[0], warn_only=mode[1])


@pytest.fixture(autouse=True)
def cuda_backend_on_cpu(request, monkeypatch):
    """Without a GPU, a test parametrised with ``backend="cuda"`` runs the CUDA backend's
    bindings, launchers and kernels on CPU tensors (tests/cuda_emulation)."""
    if not HAS_CUDA and _backend(request.node) == "cuda":
        import cuda_emulation
        cuda_emulation.activate(monkeypatch)


@pytest.fixture
def cuda_device(monkeypatch):
    """The device the CUDA backend's kernels run on here: the GPU (the extension must be built),
    else the CPU through their host build (tests/cuda_emulation). Call the compiled ops as
    ``swamp_kernels.cuda._ops().<op>``, which is either build's."""
    if HAS_CUDA:
        pytest.importorskip("swamp_kernels._C", reason="swamp_kernels._C is not built here")
        return torch.device("cuda")
    import cuda_emulation
    cuda_emulation.activate(monkeypatch)
    return torch.device("cpu")
