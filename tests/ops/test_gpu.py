"""Checks that only a GPU can make: the default backend there, and the fused loss's memory (DESIGN §9)."""

import importlib.util

import pytest
import torch

from fastmam import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                  reason="triton is not installed")]


def test_auto_backend_is_fused_on_cuda():
    cuda = torch.device("cuda")
    for op in ("tube_mask_gather", "pixel_target", "rgb_diff_target", "gather_tokens", "dual_decoder_loss"):
        assert ops._backend.resolve(op, None, cuda)[0] in ("triton", "cuda"), op


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def test_fused_loss_peak_memory_is_8x_below_eager_logits():
    # ViT-B-like decoder: 64 clips x 1024 masked tokens, width 384, codebook 8192, bf16
    g = torch.Generator(device="cuda").manual_seed(0)
    m, da, k = 65536, 384, 8192
    h = torch.randn(m, da, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    w = (torch.randn(k, da, device="cuda", generator=g) / da**0.5).bfloat16().requires_grad_()
    b = torch.zeros(k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    codes = torch.randint(0, k, (m,), device="cuda", generator=g)

    def run(backend):
        def step():
            loss = ops.dual_decoder_loss(h, w, b, codes, backend=backend).total
            torch.autograd.grad(loss, (h, w, b))
        return step

    eager, fused = _peak_mb(run("reference")), _peak_mb(run("triton"))
    assert eager >= 8 * fused, f"peak MiB: eager {eager:.0f}, fused {fused:.0f} ({eager / fused:.1f}x)"
