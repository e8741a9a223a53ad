import pytest
import torch
import torch.nn.functional as F

from fastmam import ops


def _inputs(m, da, k, dm, dtype, rng, codes=True):
    h = torch.randn(m, da, generator=rng).to(dtype).requires_grad_()
    w = (torch.randn(k, da, generator=rng) / da**0.5).to(dtype).requires_grad_()
    b = torch.randn(k, generator=rng).to(dtype).requires_grad_()
    target = torch.randint(0, k, (m,), generator=rng) if codes else torch.randn(m, k, generator=rng)
    mp = torch.randn(m, dm, generator=rng).to(dtype).requires_grad_()
    mt = torch.randn(m, dm, generator=rng)
    return h, w, b, target, mp, mt


def test_hand_computed_ce_and_mse():
    # one token, K = 2, logits [0, ln 3] -> CE for code 1 = -log(3/4); motion (1 - 0)^2 and (0 - 2)^2 -> mean 2.5
    h = torch.tensor([[1.0]])
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0))]])
    out = ops.dual_decoder_loss(h, w, None, torch.tensor([1]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]),
                                appearance_weight=2.0, motion_weight=0.5)
    assert torch.allclose(out.appearance, -torch.log(torch.tensor(0.75)))
    assert torch.allclose(out.motion, torch.tensor(2.5))
    assert torch.allclose(out.total, 2 * out.appearance + 0.5 * 2.5)


@pytest.mark.parametrize("codes", [True, False])
@pytest.mark.parametrize("m,da,k,dm", [(1, 8, 5, 3), (37, 24, 97, 19), (64, 32, 512, 96)])
def test_matches_torch_losses_and_grads(m, da, k, dm, codes, rng):
    h, w, b, target, mp, mt = _inputs(m, da, k, dm, torch.float64, rng, codes)
    out = ops.dual_decoder_loss(h, w, b, target, mp, mt, 0.7, 1.3)
    logits = h @ w.t() + b
    a = F.cross_entropy(logits, target) if codes else F.mse_loss(logits, target.double())
    mo = F.mse_loss(mp, mt.double())
    assert torch.allclose(out.appearance.double(), a, rtol=1e-5) and torch.allclose(out.motion.double(), mo, rtol=1e-5)
    grads = torch.autograd.grad(out.total, (h, w, b, mp))
    expected = torch.autograd.grad(0.7 * a + 1.3 * mo, (h, w, b, mp))
    for name, g, e in zip("h w b motion_pred".split(), grads, expected, strict=False):
        err = (g.double() - e).abs().max().item()
        # the op computes in fp32: error of fp32 relative to the fp64 formula, scaled by the gradient's size
        assert err <= 1e-5 * (e.abs().max().item() + 1e-3), f"grad {name}: max err {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_fp32_accumulation(dtype, rng):
    h, w, b, codes, mp, mt = _inputs(50, 32, 257, 24, dtype, rng)
    out = ops.dual_decoder_loss(h, w, b, codes, mp, mt)
    assert all(t.dtype == torch.float32 for t in out)
    # reference: the same rounded inputs in fp64; the op's error must stay near fp32's, far below dtype's eps
    ref = ops.dual_decoder_loss(h.double(), w.double(), b.double(), codes, mp.double(), mt.double())
    err = (out.total.double() - ref.total.double()).abs().item()
    assert err <= 1e-5 * ref.total.abs().item(), f"err {err}"
    grads = torch.autograd.grad(out.total, (h, w, b, mp))
    assert [g.dtype for g in grads] == [dtype] * 4


def test_token_weights_and_batched_shapes(rng):
    h, w, b, codes, mp, mt = _inputs(12, 8, 11, 6, torch.float32, rng)
    weight = torch.rand(12, generator=rng)
    out = ops.dual_decoder_loss(h, w, b, codes, mp, mt, token_weight=weight)
    ce = F.cross_entropy(h @ w.t() + b, codes, reduction="none")
    assert torch.allclose(out.appearance, (ce * weight).sum() / weight.sum(), rtol=1e-6)
    # (B, Nm, D) inputs give the same numbers as flattened ones
    out3 = ops.dual_decoder_loss(h.view(3, 4, 8), w, b, codes.view(3, 4), mp.view(3, 4, 6), mt.view(3, 4, 6),
                                 token_weight=weight.view(3, 4))
    assert torch.allclose(out3.total, out.total)


def test_no_motion_term(rng):
    h, w, b, codes, _, _ = _inputs(5, 4, 3, 2, torch.float32, rng)
    out = ops.dual_decoder_loss(h, w, b, codes)
    assert out.motion.item() == 0 and torch.equal(out.total, out.appearance)


def test_loss_errors(rng):
    h, w, b, codes, mp, mt = _inputs(6, 4, 5, 3, torch.float32, rng)
    with pytest.raises(ValueError, match=r"head_weight must be \(K, Da=4\)"):
        ops.dual_decoder_loss(h, w[:, :3], b, codes, mp, mt)
    with pytest.raises(ValueError, match="head_bias"):
        ops.dual_decoder_loss(h, w, b[:2], codes, mp, mt)
    with pytest.raises(ValueError, match="one index per token"):
        ops.dual_decoder_loss(h, w, b, codes[:4], mp, mt)
    with pytest.raises(ValueError, match="both motion_pred and motion_target"):
        ops.dual_decoder_loss(h, w, b, codes, mp, None)
    with pytest.raises(ValueError, match="same shape"):
        ops.dual_decoder_loss(h, w, b, codes, mp, mt[:, :2])
    with pytest.raises(TypeError, match="integer codes or float"):
        ops.dual_decoder_loss(h, w, b, codes.bool(), mp, mt)
    with pytest.raises(ValueError, match="token_weight"):
        ops.dual_decoder_loss(h, w, b, codes, mp, mt, token_weight=torch.ones(3))
