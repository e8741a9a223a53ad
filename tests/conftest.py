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
    ``hash`` of a string is salted per process), so every case draws its own data and a failure reproduces.
    ``FASTMAM_TEST_SEED=N`` draws another set of data everywhere (N is printed in the header), to check that a
    tolerance holds beyond the data CI sees."""
    salt = os.environ.get("FASTMAM_TEST_SEED", "")
    return torch.Generator().manual_seed(zlib.crc32(f"{salt}{request.node.nodeid}".encode()))


def pytest_report_header(config):
    return f"fastmam test data seed: FASTMAM_TEST_SEED={os.environ.get('FASTMAM_TEST_SEED', '')!r} (empty: CI's)"


def runnable_backends(op: str) -> tuple[str, ...]:
    """The backends of ``op`` that can run on the tests' tensors here: all of ``fastmam.ops.available(op)`` on a GPU
    machine; without a GPU, not ``cuda`` (its kernels take CUDA tensors only, while a CUDA torch builds and registers
    them on any machine)."""
    from fastmam import ops

    return tuple(b for b in ops.available(op) if b != "cuda" or torch.cuda.is_available())


def random_clip(shape, generator, dtype=torch.uint8):
    """Random data, never zeros: zeros would hide outputs a kernel forgot to write."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    return torch.randn(shape, generator=generator, dtype=dtype)


def random_trajectories(cfg, batch: int, generator=None, device=None, valid: float = 0.7) -> dict:
    """Keyword inputs of a training step with ``targets.motion: trajectory`` (else {}), shaped as the loaders give
    them: ``trajectories`` float32 (B, T/t, H/8, W/8, L, 2) and ``trajectory_valid`` bool (B, T/t, H/8, W/8) with
    about ``valid`` of the points valid; every size from ``cfg``."""
    d, tg = cfg.data, cfg.targets
    if tg.motion != "trajectory":
        return {}
    grid = (batch, d.num_frames // cfg.model.tubelet, d.img_size // 8, d.img_size // 8)
    return {"trajectories": torch.randn(*grid, tg.trajectory_length, 2, generator=generator, device=device),
            "trajectory_valid": torch.rand(grid, generator=generator, device=device) < valid}
