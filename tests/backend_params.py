"""Backend parametrisation for op tests: a test runs on every backend that can run its op here.

Decorate with :data:`every_backend` and call :func:`skip_unless_runs` first; a backend that
is unavailable, cannot run on the test's device or lacks the op is skipped with the reason.
"""
import pytest
import torch

from swamp_kernels import BACKENDS, BackendError
from swamp_kernels._dispatch import implementation

every_backend = pytest.mark.parametrize("backend", BACKENDS)


def skip_unless_runs(op: str, backend: str, device: torch.device) -> None:
    """Skip the calling test unless ``backend`` runs ``op`` on ``device`` tensors here."""
    try:
        implementation(op, backend, torch.device(device))
    except BackendError as error:
        pytest.skip(str(error))
