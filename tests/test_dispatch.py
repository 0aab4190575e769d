"""Backend selection: explicit names, ``auto``, SWAMP_KERNELS_BACKEND, and their errors."""
from __future__ import annotations

import pytest
import torch

import swamp_kernels as sk
from swamp_kernels import reference
from swamp_kernels._dispatch import ENV_VAR

ON_GPU = torch.cuda.is_available()


def _masking_args():
    return [torch.randn(3, 4)], [torch.rand(3, 4) < 0.5]


def _calls(monkeypatch, ops: dict, op: str) -> list[str]:
    """Record calls of ``ops[op]`` (a backend's OPS table) while still running it."""
    calls = []
    original = ops[op]

    def spy(*args, **kwargs):
        calls.append(op)
        return original(*args, **kwargs)
    monkeypatch.setitem(ops, op, spy)
    return calls


def _triton_ops():
    if "triton" not in sk.available_backends():
        pytest.skip("triton cannot run here")
    import swamp_kernels.triton
    return swamp_kernels.triton.OPS


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_available_backends_lists_torch_first():
    backends = sk.available_backends()
    assert backends[0] == "torch"
    assert set(backends) <= set(sk.BACKENDS) and list(sk.BACKENDS) == ["torch", "triton", "cuda"]
    assert backends == [b for b in sk.BACKENDS if b in backends]


def test_reference_implements_every_public_op():
    public = {"global_magnitude_prune", "layerwise_magnitude_prune", "particle_average", "swa_update_",
              "apply_masks_", "masked_sgd_step_", "masked_linear", "masked_conv2d"}
    assert set(reference.OPS) == public


@pytest.mark.skipif(ON_GPU, reason="runs on a machine without a GPU")
def test_triton_is_available_on_cpu_only_through_the_interpreter(monkeypatch):
    assert "triton" in sk.available_backends()  # tests/conftest.py sets TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert sk.available_backends() == ["torch"]
    with pytest.raises(sk.BackendError,
                       match=r"backend 'triton' is not available here \(no CUDA GPU: set TRITON_INTERPRET=1 "
                             r"to run Triton on CPU\); available backends: torch$"):
        sk.apply_masks_(*_masking_args(), backend="triton")


@pytest.mark.parametrize("op", ["global_magnitude_prune", "particle_average", "apply_masks_",
                                "masked_linear"])
def test_unknown_backend_lists_the_choices(op):
    x = torch.randn(2, 3)
    args = {"global_magnitude_prune": ([x],), "particle_average": ([x],),
            "apply_masks_": ([x], [x > 0]), "masked_linear": (x, x, x > 0)}[op]
    with pytest.raises(sk.BackendError,
                       match=r"unknown backend 'fast'; choose one of auto, torch, triton, cuda"):
        getattr(sk, op)(*args, backend="fast")


@pytest.mark.skipif(ON_GPU, reason="needs a machine without a GPU")
def test_unavailable_backend_lists_the_available_ones():
    available = ", ".join(sk.available_backends())
    with pytest.raises(sk.BackendError,
                       match=rf"backend 'cuda' is not available here \(no CUDA GPU\); available backends: {available}$"):
        sk.apply_masks_(*_masking_args(), backend="cuda")


def test_auto_on_cpu_tensors_runs_torch(monkeypatch):
    torch_calls = _calls(monkeypatch, reference.OPS, "apply_masks_")
    other_calls = _calls(monkeypatch, _triton_ops(), "apply_masks_")
    sk.apply_masks_(*_masking_args())
    sk.apply_masks_(*_masking_args(), backend="auto")
    assert torch_calls == ["apply_masks_"] * 2 and not other_calls


def test_explicit_backend_runs_that_backend(monkeypatch):
    triton_calls = _calls(monkeypatch, _triton_ops(), "apply_masks_")
    torch_calls = _calls(monkeypatch, reference.OPS, "apply_masks_")
    sk.apply_masks_(*_masking_args(), backend="triton")
    assert triton_calls == ["apply_masks_"] and not torch_calls


def test_environment_variable_overrides_auto(monkeypatch):
    triton_calls = _calls(monkeypatch, _triton_ops(), "apply_masks_")
    torch_calls = _calls(monkeypatch, reference.OPS, "apply_masks_")
    monkeypatch.setenv(ENV_VAR, " Triton ")
    sk.apply_masks_(*_masking_args())
    assert triton_calls == ["apply_masks_"] and not torch_calls
    sk.apply_masks_(*_masking_args(), backend="torch")  # an explicit backend beats the variable
    assert torch_calls == ["apply_masks_"]


def test_environment_variable_with_a_bad_value(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(sk.BackendError,
                       match=rf"{ENV_VAR}='fastest' is not one of auto, torch, triton, cuda"):
        sk.apply_masks_(*_masking_args())


@pytest.mark.skipif(ON_GPU, reason="needs a machine without a GPU")
def test_environment_variable_naming_an_unavailable_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(sk.BackendError, match=r"backend 'cuda' is not available here"):
        sk.apply_masks_(*_masking_args())


def test_environment_variable_naming_a_backend_without_the_op_falls_back(monkeypatch):
    monkeypatch.delitem(_triton_ops(), "apply_masks_")
    torch_calls = _calls(monkeypatch, reference.OPS, "apply_masks_")
    monkeypatch.setenv(ENV_VAR, "triton")
    sk.apply_masks_(*_masking_args())
    assert torch_calls == ["apply_masks_"]


def test_environment_variable_naming_a_backend_that_cannot_run_on_the_device_falls_back(monkeypatch):
    torch_calls = _calls(monkeypatch, reference.OPS, "apply_masks_")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # triton counts as available
    monkeypatch.setenv(ENV_VAR, "triton")
    sk.apply_masks_(*_masking_args())  # CPU tensors: triton cannot run them without the interpreter
    assert torch_calls == ["apply_masks_"]


def test_backend_lacking_the_op_names_the_backends_that_have_it(monkeypatch):
    monkeypatch.delitem(_triton_ops(), "apply_masks_")
    with pytest.raises(sk.BackendError, match=r"backend 'triton' does not implement apply_masks_; "
                                              r"backends that do: torch(, cuda)?$"):
        sk.apply_masks_(*_masking_args(), backend="triton")


def test_validation_runs_before_dispatch():
    with pytest.raises(ValueError, match=r"masks\[0\] has shape"):
        sk.apply_masks_([torch.randn(3, 4)], [torch.ones(4, 3, dtype=torch.bool)], backend="fast")
