import os
import zlib

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
def rng(request):
    """A fresh generator per test, seeded from the test's id (CRC-32, stable across processes and runs: Python's
    ``hash`` of a string is salted per process), so every case draws its own data and a failure reproduces."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_clip(shape, generator, dtype=torch.uint8):
    """Random data, never zeros: zeros would hide outputs a kernel forgot to write."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.randn(shape, generator=generator, dtype=dtype)
