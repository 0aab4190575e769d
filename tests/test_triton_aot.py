"""Every Triton kernel of swamp_kernels compiles for the H100 (sm_90) and fits its shared memory.

The interpreter (TRITON_INTERPRET=1, how CI runs Triton) never compiles, so it accepts
code the compiler rejects. Here a representative set of calls of every Triton op is run
under the interpreter while :class:`tests.triton_aot.LaunchRecorder` records each kernel
specialisation; then ``python -m tests.triton_aot`` compiles them all for sm_90, without a
GPU, with the venv's triton and with triton 3.6.0 (the GPU image's), see tests/triton_aot.py.
"""
import ast
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import swamp_kernels as sk
from swamp_kernels._dispatch import triton_interpreting
from tests.triton_aot import LaunchRecorder, with_constexprs

REPO = pathlib.Path(__file__).resolve().parent.parent
TRITON_DIR = REPO / "swamp_kernels" / "triton"
GPU_IMAGE_TRITON = REPO / ".venv" / "triton-gpu-image"  # pip install --no-deps --target ... triton==3.6.0
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _masked_matmul_on_gpu(args: dict) -> dict[str, list]:
    """masked_linear's constexprs on a GPU: no upcast (that is for the interpreter), and PRECISION
    "ieee" or "tf32" per torch's float32 matmul precision. 16-bit tiles ignore PRECISION (their
    code is identical for both), so one value covers them."""
    float32 = args["a_ptr"]["tensor"] == "float32"
    return {"UPCAST": [False], "PRECISION": ["ieee", "tf32"] if float32 else ["ieee"]}


GPU_CONSTEXPRS = {"swamp_kernels.triton.masked_linear._masked_matmul_kernel": _masked_matmul_on_gpu}

pytestmark = pytest.mark.skipif(not triton_interpreting(),
                                reason="records launches through the Triton interpreter (TRITON_INTERPRET=1)")


def _launched_kernels() -> set[str]:
    """``module.name`` of every kernel launched from Python (``kernel[grid](...)``) in swamp_kernels/triton."""
    kernels = set()
    for path in sorted(TRITON_DIR.glob("*.py")):
        module = importlib.import_module(f"swamp_kernels.triton.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name) and hasattr(module, node.func.value.id):
                kernels.add(f"{module.__name__}.{node.func.value.id}")
    return kernels


def _prune_calls(gen: torch.Generator) -> None:
    # One launch covers every dtype (read through a dtype table); skewed: many ties at one value.
    weights = [torch.randn(5000, generator=gen), torch.randn(64, 48, generator=gen).half(),
               torch.randn(300, generator=gen).bfloat16()]
    weights[0][:3000] = 0.5
    masks = [torch.rand(w.shape, generator=gen) > 0.3 for w in weights]
    scores = [torch.rand(w.shape, generator=gen) for w in weights]
    # Both digit plans: the wide one of Triton >= 3.7 and the narrow one the GPU image's 3.6 runs.
    plans = importlib.import_module("swamp_kernels.triton.magnitude_prune")
    for digits in (plans.WIDE_DIGITS, plans.NARROW_DIGITS):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(plans, "DIGITS", digits)
            for prune in (sk.global_magnitude_prune, sk.layerwise_magnitude_prune):
                for m in (None, masks):
                    for s in (None, scores):
                        prune(weights, m, 0.6, scores=s, backend="triton")


# Lengths of 64 (multiples of 16, fresh tensors: 16-byte aligned) launch the ALIGNED variants of the
# elementwise kernels, the others the plain ones.
def _elementwise_calls(gen: torch.Generator) -> None:
    for dtype in FLOATS:
        tensors = [torch.randn(2, 50, generator=gen).to(dtype), torch.randn(70, generator=gen).to(dtype),
                   torch.randn(2, 64, generator=gen).to(dtype)]
        masks = [torch.rand(50, generator=gen) > 0.5, torch.rand(70, generator=gen) > 0.5,
                 torch.rand(64, generator=gen) > 0.5]
        sk.apply_masks_(tensors, masks, backend="triton")
        for particles in (1, 3):
            params = [torch.randn(particles, 40, generator=gen).to(dtype), torch.randn(particles, 64, generator=gen).to(dtype)]
            for m in (None, [torch.rand(40, generator=gen) > 0.5, torch.rand(64, generator=gen) > 0.5]):
                swa = sk.particle_average(params, m, backend="triton")
                for n_averaged in (0, 2):
                    sk.swa_update_(swa, params, n_averaged, m, backend="triton")


def _sgd_calls(gen: torch.Generator) -> None:
    dtype_pairs = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                   (torch.float32, torch.float16), (torch.float16, torch.float16),
                   (torch.bfloat16, torch.bfloat16)]
    settings = [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1, weight_decay=1e-4),
                dict(momentum=0.9, nesterov=True, maximize=True)]
    for param_dtype, grad_dtype in dtype_pairs:
        for setting in settings:
            aligned = setting is settings[1]   # the ALIGNED variant once per dtype pair (compiles cost)
            params = [torch.randn(30, generator=gen).to(param_dtype), torch.randn(2, 20, generator=gen).to(param_dtype),
                      *([torch.randn(2, 64, generator=gen).to(param_dtype)] if aligned else [])]
            grads = [torch.randn(p.shape, generator=gen).to(grad_dtype) for p in params]
            masks = [torch.rand(30, generator=gen) > 0.5, torch.rand(20, generator=gen) > 0.5,
                     *([torch.rand(64, generator=gen) > 0.5] if aligned else [])]
            buffers = [None] * len(params)
            for _ in range(2):  # the first momentum step writes the buffers, the second reads them
                sk.masked_sgd_step_(params, grads, buffers, masks, lr=0.1, backend="triton", **setting)


def _linear_calls(gen: torch.Generator) -> None:
    for dtype in FLOATS:
        for with_bias in (False, True):
            x = torch.randn(32, 48, generator=gen).to(dtype).requires_grad_()
            weight = torch.randn(16, 48, generator=gen).to(dtype).requires_grad_()
            bias = torch.randn(16, generator=gen).to(dtype).requires_grad_() if with_bias else None
            mask = torch.rand(16, 48, generator=gen) > 0.5
            out = sk.masked_linear(x, weight, mask, bias, backend="triton")
            out.backward(torch.randn(out.shape, generator=gen).to(dtype))  # contiguous, as in training


@pytest.fixture(scope="module")
def recorded() -> LaunchRecorder:
    gen = torch.Generator().manual_seed(0)
    with LaunchRecorder() as recorder:
        _prune_calls(gen)
        _elementwise_calls(gen)
        _sgd_calls(gen)
        _linear_calls(gen)
    return recorder


@pytest.fixture(scope="module")
def specs_file(recorded, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("aot") / "specs.json"
    path.write_text(json.dumps(with_constexprs(recorded.specs, GPU_CONSTEXPRS)))
    return path


def test_every_launched_kernel_is_recorded(recorded):
    from swamp_kernels.triton import OPS
    launched = _launched_kernels()
    assert {op.__module__ for op in OPS.values()} <= {kernel.rsplit(".", 1)[0] for kernel in launched}
    assert recorded.kernels == launched
    aligned = {(spec["kernel"].rsplit(".", 1)[1], spec["args"]["ALIGNED"]) for spec in recorded.specs
               if "ALIGNED" in spec["args"]}
    assert aligned == {(k, a) for k in ("_apply_masks_kernel", "_average_kernel", "_masked_sgd_kernel")
                       for a in (False, True)}


@pytest.mark.parametrize("triton_dir", [None, GPU_IMAGE_TRITON], ids=["venv-triton", "triton-3.6.0"])
def test_kernels_compile_for_sm90(specs_file, triton_dir, tmp_path):
    if triton_dir is None:
        import triton
        version, path = triton.__version__, [str(REPO)]
    elif not (triton_dir / "triton").is_dir():
        pytest.skip(f"{triton_dir} is absent: pip install --no-deps --target {triton_dir} triton==3.6.0")
    else:
        version, path = "3.6.0", [str(triton_dir), str(REPO)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": os.pathsep.join(path), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    ir = tmp_path / "ir"
    run = subprocess.run([sys.executable, "-m", "tests.triton_aot", str(specs_file), "--ir", str(ir)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    print(output)
    assert output.startswith(f"triton {version} "), output[:500]
    assert run.returncode == 0, output[-20000:]
    _assert_masked_weight_feeds_tensor_cores_from_registers(ir)
    _assert_aligned_elementwise_launches_move_16_bytes(ir)
    _assert_elementwise_kernels_do_not_spill(ir)


def _main_loop(ttgir: str) -> str:
    """The body of the kernel's K loop (its only ``scf.for``) in TritonGPU IR."""
    start = ttgir.index("scf.for")
    return ttgir[start:ttgir.index("scf.yield", start)]


def _assert_masked_weight_feeds_tensor_cores_from_registers(ir_dir: pathlib.Path) -> None:
    """In every compiled masked-A matmul that runs on Hopper tensor cores (wgmma), the masked A
    tile reaches the dot from registers, and nothing is written to shared memory inside the K loop
    besides the pipelined async copies: a masked B operand would be stored back there every step."""
    index = json.loads((ir_dir / "index.json").read_text())
    masked_a = [job for job in index if job["kernel"].endswith("._masked_matmul_kernel") and job["args"]["MASK_A"]]
    assert masked_a, "no masked-A matmul compiled"
    on_wgmma = 0
    for job in masked_a:
        loop = _main_loop((ir_dir / job["ttgir"]).read_text())
        dots = [line for line in loop.splitlines() if "ttng.warp_group_dot " in line]
        if not dots:  # mma.sync (IEEE float32, small tiles): both operands come from registers
            continue
        on_wgmma += 1
        for dot in dots:
            a_type = re.search(r" : (tensor<|!ttg\.memdesc<)", dot).group(1)  # the first operand's
            assert a_type == "tensor<", f"{job['options']} {dot.strip()[:300]}"
        assert "ttg.local_alloc" not in loop and "ttg.local_store" not in loop, job["options"]
    assert on_wgmma, "no masked-A matmul compiled to wgmma"


ELEMENTWISE_KERNELS = ("_apply_masks_kernel", "_average_kernel", "_masked_sgd_kernel")
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global[\w.:]*")


def _assert_aligned_elementwise_launches_move_16_bytes(ir_dir: pathlib.Path) -> None:
    """The ALIGNED launches of the memory-bound elementwise kernels read and write their tensors
    16 bytes at a time (``ld/st.global.v4``): single-element accesses cost them bandwidth. Their
    only narrower global accesses are the few single-word reads of the launch tables (an
    unvectorised tensor would add one per element a thread handles: 16 or more here)."""
    index = json.loads((ir_dir / "index.json").read_text())
    aligned = [job for job in index
               if job["kernel"].rsplit(".", 1)[1] in ELEMENTWISE_KERNELS and job["args"].get("ALIGNED")]
    assert {job["kernel"].rsplit(".", 1)[1] for job in aligned} == set(ELEMENTWISE_KERNELS)
    for job in aligned:
        accesses = [m.group(0) for m in _GLOBAL_ACCESS.finditer((ir_dir / job["ptx"]).read_text())]
        narrow_stores = [a for a in accesses if a.startswith("st.") and ".v4." not in a]
        narrow_loads = [a for a in accesses if a.startswith("ld.") and ".v4." not in a]
        where = f"{job['kernel']} {job['args']}"
        assert any(a.startswith("st.") for a in accesses) and not narrow_stores, f"{where}: {narrow_stores}"
        assert len(narrow_loads) < 16 and all(a.endswith((".b32", ".b64")) for a in narrow_loads), \
            f"{where}: {narrow_loads}"


def _assert_elementwise_kernels_do_not_spill(ir_dir: pathlib.Path) -> None:
    """No launch of the memory-bound elementwise kernels spills registers to local memory (the
    unaligned ones did with 32 entries per thread: multi_tensor.UNALIGNED_CHUNK)."""
    index = json.loads((ir_dir / "index.json").read_text())
    jobs = [job for job in index if job["kernel"].rsplit(".", 1)[1] in ELEMENTWISE_KERNELS]
    spilling = [(job["kernel"], job["args"], job["spill_bytes"]) for job in jobs if job["spill_bytes"] != 0]
    assert jobs and not spilling, spilling
