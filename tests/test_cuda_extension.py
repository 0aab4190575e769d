"""The compiled extension swamp_kernels._C: it builds wherever a CUDA toolkit is, and its
apply_masks_ kernel equals the torch reference bitwise.

The kernel tests run through the ``cuda_device`` fixture: on a GPU against the built extension,
without one (CI) on CPU tensors through the host build of the same sources (tests/cuda_emulation).
Only what needs the device itself is marked ``gpu``: launch counting with the CUDA profiler,
compute-sanitizer, and inputs on two devices.
"""
from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swamp_kernels as sk
from kernel_checks import cuda_launches, raises_binding_error
from swamp_kernels import cuda as cuda_backend, reference
from test_apply_masks import bits, make_case, special_values

TESTS = Path(__file__).resolve().parent
CHUNK = 16384  # elements per chunk of the kernel (kChunk in csrc/apply_masks.cu)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _toolkit_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


def test_extension_is_built_and_registers_every_cuda_op():
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    if _toolkit_home() is None:
        pytest.skip("no CUDA toolkit: no nvcc under CUDA_HOME or /usr/local/cuda")
    if os.environ.get("SWAMP_NO_CUDA_EXT") == "1":
        pytest.skip("SWAMP_NO_CUDA_EXT=1 turns the extension build off")
    importlib.import_module("swamp_kernels._C")  # fails here when the build did not happen
    compiled = ("apply_masks_", "swa_update_", "masked_sgd_step_", "global_magnitude_prune",
                "layerwise_magnitude_prune")  # particle_average is swa_update_ at n_averaged 0
    for name in compiled:
        assert hasattr(torch.ops.swamp_kernels, name), f"torch.ops.swamp_kernels.{name} is not registered"
    schema = str(torch.ops.swamp_kernels.apply_masks_.default._schema)
    assert schema == "swamp_kernels::apply_masks_(Tensor(a!)[] tensors, Tensor[] masks) -> ()"


def test_cuda_backend_imports_without_the_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "swamp_kernels._C", None)  # `import swamp_kernels._C` now fails
    cuda = importlib.reload(importlib.import_module("swamp_kernels.cuda"))
    assert "apply_masks_" in cuda.OPS
    with pytest.raises(ImportError):
        cuda.OPS["apply_masks_"]([torch.ones(3)], [torch.ones(3, dtype=torch.bool)])


# ----------------------------------------------------------------------------- kernel
def _flat_slice(numel: int, offset: int, make) -> torch.Tensor:
    """``numel`` entries starting ``offset`` elements into a fresh buffer: contiguous, but
    not 16-byte aligned when offset > 0."""
    return make(numel + offset)[offset:]


def kernel_case(seed: int, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs aimed at the kernel's paths, all dtypes mixed in one list: sizes around the vector
    widths (4 and 8) and the chunk, particle masks whose length is or is not a multiple of the
    vector width, misaligned tensors and masks (scalar path), empty and 0-dim tensors, plus
    the channels_last / transposed / strided / NaN cases of test_apply_masks."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 1000, 4097,
             CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, 100_003]
    # (shape, mask is per particle, tensor offset, mask offset)
    cases = [((n,), False, 0, 0) for n in sizes]
    cases += [(s, True, 0, 0) for s in [(3, 5), (4, 8), (2, 7, 3), (5, 64, 3, 3), (3, 1), (2, CHUNK + 5),
                                         (3, 4, 4), (1, 4099), (6, 2, 2)]]
    cases += [((1001,), False, 1, 0), ((1001,), False, 0, 1), ((4, 16), True, 1, 1),
              ((CHUNK + 9,), False, 3, 0), ((3, 40), True, 0, 2),
              # only the tensor misaligned: the mask alone would allow vectors
              ((1024,), False, 1, 0), ((1024,), False, 2, 0), ((3, 64), True, 3, 0)]
    cases += [((0,), False, 0, 0), ((3, 0), True, 0, 0), ((), False, 0, 0)]
    tensors, masks = make_case(seed, device)
    for i, (shape, per_particle, t_off, m_off) in enumerate(cases):
        dtype = DTYPES[i % len(DTYPES)]
        mask_shape = shape[1:] if per_particle else shape
        t = _flat_slice(math.prod(shape), t_off, lambda n: special_values((n,), dtype, gen, device))
        m = _flat_slice(math.prod(mask_shape), m_off, lambda n: (torch.rand(n, generator=gen) < 0.5).to(device))
        tensors.append(t.view(shape))
        masks.append(m.view(mask_shape))
    return tensors, masks


def many_tensors(count: int, seed: int, device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` small tensors of random odd sizes and mixed dtypes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 300, (count,), generator=gen).tolist()
    tensors = [special_values((n,), DTYPES[i % 3], gen, device) for i, n in enumerate(sizes)]
    masks = [(torch.rand(n, generator=gen) < 0.5).to(device) for n in sizes]
    return tensors, masks


def assert_cuda_matches_reference(tensors, masks) -> None:
    """The public op on the CUDA backend leaves every tensor bitwise equal to the reference,
    keeps its strides and leaves the masks alone."""
    wanted = [t.clone() for t in tensors]
    reference.apply_masks_(wanted, masks)
    strides = [t.stride() for t in tensors]
    mask_copies = [m.clone() for m in masks]
    sk.apply_masks_(tensors, masks, backend="cuda")
    for i, (t, w) in enumerate(zip(tensors, wanted)):
        assert t.stride() == strides[i], f"tensors[{i}] changed its strides"
        assert torch.equal(bits(t), bits(w)), f"tensors[{i}] (shape {tuple(t.shape)}, {t.dtype}) differs"
    assert all(torch.equal(m, c) for m, c in zip(masks, mask_copies)), "a mask was modified"


@pytest.fixture
def extension():
    """Skips unless swamp_kernels._C is built (tests that need the real extension, not its host build)."""
    try:
        importlib.import_module("swamp_kernels._C")
    except ImportError as error:
        pytest.skip(f"swamp_kernels._C is not built here: {error}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_reference(cuda_device, seed):
    assert_cuda_matches_reference(*kernel_case(seed, cuda_device))


@pytest.mark.parametrize("count", [1, 83, 84, 85, 86, 300])
def test_table_inline_and_in_device_memory(cuda_device, count):
    # 84 MaskEntry rows fit in the kernel arguments; more go through a device buffer.
    assert_cuda_matches_reference(*many_tensors(count, count, cuda_device))


def test_nan_and_inf_at_masked_entries_end_at_plus_zero(cuda_device):
    tensors = [torch.full((n,), value, dtype=dtype, device=cuda_device)
               for n, value, dtype in [(37, float("nan"), torch.float32), (4096, float("-inf"), torch.float16),
                                       (9, -0.0, torch.bfloat16), (CHUNK + 1, float("nan"), torch.bfloat16)]]
    masks = [torch.arange(t.numel(), device=cuda_device) % 3 == 0 for t in tensors]
    sk.apply_masks_(tensors, masks, backend="cuda")
    for t, m in zip(tensors, masks):
        assert torch.equal(bits(t[~m]), torch.zeros_like(bits(t[~m])))
        assert not torch.equal(bits(t[m]), torch.zeros_like(bits(t[m])))


@pytest.mark.gpu
def test_one_launch_for_all_dtypes(cuda_device):
    tensors, masks = many_tensors(120, 7, cuda_device)  # three dtypes, past the inline table
    launches = cuda_launches(lambda: sk.apply_masks_(tensors, masks, backend="cuda"), "apply_masks_kernel")
    assert len(launches) == 1, launches


BINDING_ERRORS = [  # (arguments made from valid ones t, m; error message)
    pytest.param(lambda t, m: ([t, t], [m]), r"apply_masks_: 2 tensors but 1 masks", id="count"),
    pytest.param(lambda t, m: ([t, t.clone().view(4, 4).t()], [m, m.view(4, 4)]),
                 r"apply_masks_: tensors\[1\] must be contiguous", id="non-contiguous"),
    pytest.param(lambda t, m: ([t.double()], [m]), r"apply_masks_: tensors\[0\] has dtype Double", id="dtype"),
    pytest.param(lambda t, m: ([t], [m.float()]), r"apply_masks_: masks\[0\] has dtype Float; expected bool",
                 id="mask dtype"),
    pytest.param(lambda t, m: ([t], [m[:8]]), r"apply_masks_: masks\[0\] has shape \[8\]", id="mask shape"),
    pytest.param(lambda t, m: ([t, t[8:], t], [m, m[8:], m]), r"apply_masks_: tensors\[2\] is the memory of tensors\[0\]",
                 id="shared memory"),
    pytest.param(lambda t, m: ([t[:9], t[8:]], [m[:9], m[8:]]), r"apply_masks_: tensors\[1\] overlaps the memory of tensors\[0\]",
                 id="overlapping memory"),
    # a mask on a second device: the host build has only the CPU
    pytest.param(lambda t, m: ([t], [m.cpu()]), r"apply_masks_: masks\[0\] is on cpu, expected cuda",
                 id="mask device", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("make_args, message", BINDING_ERRORS)
def test_compiled_op_checks_its_input(cuda_device, make_args, message):
    t = torch.ones(16, device=cuda_device)
    m = torch.ones(16, dtype=torch.bool, device=cuda_device)
    with raises_binding_error(message):
        cuda_backend._ops().apply_masks_(*make_args(t, m))


def _opcheck_cases(device):
    """(op name, args, kwargs): every compiled op on small mixed inputs, masks present and absent."""
    gen = torch.Generator().manual_seed(0)
    shapes = ((4, 3), (2, 5))

    def tensors(dtype=torch.float32, particles=()):
        return [torch.randn(*particles, *s, generator=gen).to(device, dtype) for s in shapes]

    masks = [torch.rand(*s, generator=gen).to(device) > 0.3 for s in shapes]
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False)
    return [
        ("apply_masks_", (tensors(), masks), {}),
        ("swa_update_", (tensors(), tensors(particles=(3,)), 2, [masks[0], None]), {}),
        ("masked_sgd_step_", (tensors(), tensors(torch.bfloat16), tensors(), [True, False], [None, masks[1]]), sgd),
        ("global_magnitude_prune", ([*tensors(), *tensors(torch.float16)], [], 0.3, False, False), {}),
        ("layerwise_magnitude_prune", (tensors(torch.bfloat16), masks, 2.0, True, True), {}),
    ]


@pytest.mark.parametrize("index", range(5), ids=lambda i: _opcheck_cases("cpu")[i][0])
def test_compiled_op_passes_torch_library_opcheck(cuda_device, index):
    """The schemas declare exactly what each op writes (a wrong ``(a!)`` misleads torch.compile's
    functionalisation), no autograd registration is missing, and the prune ops' fake kernels
    (:func:`swamp_kernels.cuda.register_fake_kernels`) give the real outputs' metadata."""
    name, args, kwargs = _opcheck_cases(cuda_device)[index]
    torch.library.opcheck(getattr(cuda_backend._ops(), name).default, args, kwargs)


SANITIZED_SCRIPT = """
import torch
from test_cuda_extension import assert_cuda_matches_reference, kernel_case, many_tensors
assert_cuda_matches_reference(*kernel_case(0, "cuda"))
assert_cuda_matches_reference(*many_tensors(300, 1, "cuda"))
torch.cuda.synchronize()
print("apply_masks_ checked")
"""


def _compute_sanitizer() -> str | None:
    on_path = shutil.which("compute-sanitizer")
    home = _toolkit_home()
    in_toolkit = os.path.join(home, "bin", "compute-sanitizer") if home else None
    return on_path or (in_toolkit if in_toolkit and os.path.isfile(in_toolkit) else None)


def run_under_memcheck(script: str, done: str) -> None:
    """Runs ``script`` (tests/ and the repository on its path) under ``compute-sanitizer --tool
    memcheck`` and asserts that it printed ``done`` with no error; skips without the tool."""
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH or in the CUDA toolkit")
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # accesses past a tensor's end instead of inside a larger cached block.
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONPATH=path)
    result = subprocess.run([sanitizer, "--tool", "memcheck", "--error-exitcode", "97", sys.executable, "-c",
                             script], capture_output=True, text=True, timeout=900, env=env)
    report = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, report
    assert done in result.stdout, report
    assert "ERROR SUMMARY: 0 errors" in result.stdout, report


@pytest.mark.gpu
def test_kernel_is_clean_under_compute_sanitizer_memcheck(extension):
    run_under_memcheck(SANITIZED_SCRIPT, "apply_masks_ checked")
