"""Fused chunked cross-entropy (Triton) of the dual-decoder loss vs the reference and an fp64 formula.

Tolerance: err(fused, fp64) <= 2 * err(reference, fp64) + atol, atol = log2(K) fp32 ulps of the largest
value (the bound of the K-term sums the kernel computes in another order).
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fastmam import ops
from fastmam.ops import _triton
from tests.ops.numerics import assert_close_to_exact

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[test]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _exact(h, w, b, codes, mp, mt, wa, wm, tw):
    """The loss in fp64 from the same (rounded) inputs; returns (total, grads of h, w, b, motion_pred)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (h, w, b, mp)]
    h64, w64, b64, mp64 = leaves
    logits = h64.reshape(-1, h64.shape[-1]) @ w64.t() + (b64 if b64 is not None else 0)
    ce = F.cross_entropy(logits, codes.reshape(-1), reduction="none")
    weights = torch.ones_like(ce) if tw is None else tw.reshape(-1).double()
    total = wa * (ce * weights).sum() / weights.sum()
    if mp64 is not None:
        per = (mp64.reshape(ce.shape[0], -1) - mt.reshape(ce.shape[0], -1).double()).square().mean(-1)
        total = total + wm * (per * weights).sum() / weights.sum()
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return total, grads


@pytest.mark.parametrize("block_k", [32, 1024])
@pytest.mark.parametrize("chunk", [7, 4096])
@pytest.mark.parametrize("m,da,k,dm", [(1, 8, 5, 3), (37, 24, 97, 19), (64, 32, 257, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_ce_matches(m, da, k, dm, chunk, block_k, dtype, rng, monkeypatch):
    monkeypatch.setattr(_triton, "CE_CHUNK_ROWS", chunk)
    monkeypatch.setattr(_triton, "CE_BLOCK_K", block_k)
    h = torch.randn(m, da, generator=rng).to(dtype).to(DEVICE).requires_grad_()
    w = (torch.randn(k, da, generator=rng) / da**0.5).to(dtype).to(DEVICE).requires_grad_()
    b = torch.randn(k, generator=rng).to(dtype).to(DEVICE).requires_grad_()
    codes = torch.randint(0, k, (m,), generator=rng).to(DEVICE)
    mp = torch.randn(m, dm, generator=rng).to(dtype).to(DEVICE).requires_grad_()
    mt = torch.randn(m, dm, generator=rng).to(DEVICE)
    tw = torch.rand(m, generator=rng).to(DEVICE)
    args = (h, w, b, codes, mp, mt, 0.7, 1.3, tw)
    ref = ops.dual_decoder_loss(*args, backend="reference")
    fused = ops.dual_decoder_loss(*args, backend="triton")
    assert all(t.dtype == torch.float32 and t.shape == () for t in fused)
    exact, exact_grads = _exact(*args)
    assert_close_to_exact(fused.total, ref.total, exact, reduction=k, name="total")
    ref_grads = torch.autograd.grad(ref.total, (h, w, b, mp))
    fused_grads = torch.autograd.grad(fused.total, (h, w, b, mp))
    for name, g, r, e in zip(("h", "W", "b", "motion_pred"), fused_grads, ref_grads, exact_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close_to_exact(g, r, e, reduction=k, name=f"grad {name}")


def test_fused_ce_shapes_bias_and_terms(rng):
    h = torch.randn(2, 5, 16, generator=rng, requires_grad=True)
    w = torch.randn(40, 16, generator=rng, requires_grad=True)
    codes = torch.randint(0, 40, (2, 5), generator=rng)
    ref = ops.dual_decoder_loss(h, w, None, codes, backend="reference")
    fused = ops.dual_decoder_loss(h, w, None, codes, backend="triton")
    assert fused.motion.item() == 0.0
    assert abs(fused.appearance.item() - ref.appearance.item()) <= 1e-5 * ref.appearance.item()
    gf, = torch.autograd.grad(fused.appearance * 3.0, h)  # the incoming gradient scales the saved ones
    gr, = torch.autograd.grad(ref.appearance * 3.0, h)
    assert gf.shape == h.shape and torch.allclose(gf, gr, atol=1e-6)


def test_pixel_target_falls_back_to_reference(rng):
    h = torch.randn(6, 8, generator=rng)
    w = torch.randn(12, 8, generator=rng)
    target = torch.randn(6, 12, generator=rng)
    fused = ops.dual_decoder_loss(h, w, None, target, backend="triton")
    ref = ops.dual_decoder_loss(h, w, None, target, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(fused, ref, strict=True))
