"""Test setup: Triton's interpreter on machines without CUDA (set before any kernel module imports),
the torchvision shim before timm, and the `gpu` marker skipped without CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mixedae_fast._compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA: no GPU on this machine (CPU paths are tested separately)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
