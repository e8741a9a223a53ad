import os

import pytest
import torch

# DeepSpeed on CPU-only machines (tests never need a GPU)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton kernels run on CPU tensors in the interpreter; it must be set before any kernel is defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test; the seed comes from the test's name so failures reproduce."""
    return torch.Generator().manual_seed(abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % 2**31)


def random_clip(shape, generator, dtype=torch.uint8):
    """Random data, never zeros: zeros would hide outputs a kernel forgot to write."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.randn(shape, generator=generator, dtype=dtype)
