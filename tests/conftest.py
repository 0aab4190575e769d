"""Test set-up: Triton runs on CPU tensors through its interpreter unless a GPU is here.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
