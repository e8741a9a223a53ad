import pytest
import torch
from einops import rearrange

from fastmam import ops
from tests.conftest import random_clip

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_patchify_hand_computed():
    # B=1, T=2, H=W=2, C=1, tubelet 2, patch 1: token (r, c) holds [x[0, r, c], x[1, r, c]]
    x = torch.arange(8, dtype=torch.uint8).reshape(1, 2, 2, 2, 1)
    p = ops.patchify_reference(x, tubelet=2, patch=1)
    assert p.tolist() == [[[0, 4], [1, 5], [2, 6], [3, 7]]]


@pytest.mark.parametrize("shape,t,p", [((1, 2, 16, 16, 3), 2, 16), ((2, 6, 24, 40, 3), 3, 8), ((3, 4, 14, 7, 1), 1, 7)])
def test_patchify_matches_videomae_rearrange(shape, t, p, rng):
    x = random_clip(shape, rng)
    ours = ops.patchify_reference(x, t, p)
    videomae = rearrange(x.permute(0, 4, 1, 2, 3), "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)",
                         p0=t, p1=p, p2=p)
    assert torch.equal(ours, videomae)
    bcthw = ops.patchify_reference(x.permute(0, 4, 1, 2, 3).float(), t, p, layout="BCTHW")
    assert torch.equal(bcthw, videomae.float())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,t,p,ratio", [((1, 2, 32, 32, 3), 2, 16, 0.5), ((3, 6, 56, 40, 3), 2, 8, 0.95)])
def test_tube_mask_gather(shape, t, p, ratio, out_dtype, rng):
    x = random_clip(shape, rng)
    s = (shape[2] // p) * (shape[3] // p)
    noise = torch.rand(shape[0], s, generator=rng)
    out = ops.tube_mask_gather(x, noise, ratio, t, p, MEAN, STD, out_dtype)
    m = ops.tube_masking(noise, ratio, shape[1] // t)
    assert all(torch.equal(a, b) for a, b in zip(out[1:], m, strict=False))
    assert out.patches.dtype == out_dtype
    # by hand in float64: (x / 255 - mean[c]) / std[c] of the kept tokens
    tokens = ops.patchify_reference(x, t, p).double().view(shape[0], -1, t * p * p, 3)
    expected = (tokens / 255 - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)
    expected = expected.view(shape[0], tokens.shape[1], -1).gather(
        1, m.ids_keep[..., None].expand(-1, -1, t * p * p * 3))
    # tolerance from the format: one rounding of a value of magnitude <= 2.7 in out_dtype, plus fp32 math
    tol = 2.7 * torch.finfo(out_dtype).eps + 1e-6
    err = (out.patches.double() - expected).abs().max().item()
    assert err <= tol, f"max err {err} > {tol}"


def test_tube_mask_gather_noncontiguous_and_bcthw(rng):
    base = random_clip((2, 32, 32, 4, 3), rng)  # (B, H, W, T, C): permuted view below
    x = base.permute(0, 3, 1, 2, 4)
    assert not x.is_contiguous()
    noise = torch.rand(2, 4, generator=rng)
    a = ops.tube_mask_gather(x, noise, 0.5, 2, 16, MEAN, STD)
    b = ops.tube_mask_gather(x.contiguous(), noise, 0.5, 2, 16, MEAN, STD)
    assert torch.equal(a.patches, b.patches)
    # VideoMAE's layout: a normalized float (B, C, T, H, W) clip is gathered and cast, not re-normalized
    f = torch.randn(2, 3, 4, 32, 32, generator=rng)
    g = ops.tube_mask_gather(f, noise, 0.5, 2, 16, MEAN, STD, torch.float16, layout="BCTHW")
    expected = ops.gather_tokens(ops.patchify_reference(f, 2, 16, "BCTHW"), g.ids_keep).half()
    assert torch.equal(g.patches, expected)


def test_tube_mask_gather_random_masking(rng):
    x = random_clip((2, 4, 16, 16, 3), rng)
    noise = torch.rand(2, 8, generator=rng)
    out = ops.tube_mask_gather(x, noise, 0.5, 2, 8, MEAN, STD, masking="random")
    assert torch.equal(out.mask, ops.random_masking(noise, 0.5).mask)


def test_tube_mask_gather_errors(rng):
    x = random_clip((2, 4, 32, 32, 3), rng)
    noise = torch.rand(2, 4)
    with pytest.raises(TypeError, match="must be uint8"):
        ops.tube_mask_gather(x.float(), noise, 0.5, 2, 16, MEAN, STD)
    with pytest.raises(TypeError, match="floating point"):
        ops.tube_mask_gather(x.permute(0, 4, 1, 2, 3), noise, 0.5, 2, 16, MEAN, STD, layout="BCTHW")
    with pytest.raises(ValueError, match="does not tile"):
        ops.tube_mask_gather(x, noise, 0.5, 3, 16, MEAN, STD)
    with pytest.raises(ValueError, match="5-D"):
        ops.tube_mask_gather(x[0], noise, 0.5, 2, 16, MEAN, STD)
    with pytest.raises(ValueError, match="expected 4"):
        ops.tube_mask_gather(x, torch.rand(2, 5), 0.5, 2, 16, MEAN, STD)
    with pytest.raises(ValueError, match="batch 3"):
        ops.tube_mask_gather(x, torch.rand(3, 4), 0.5, 2, 16, MEAN, STD)
    with pytest.raises(ValueError, match="one value per channel"):
        ops.tube_mask_gather(x, noise, 0.5, 2, 16, (0.5, 0.5), STD)
    with pytest.raises(ValueError, match="layout"):
        ops.tube_mask_gather(x, noise, 0.5, 2, 16, MEAN, STD, layout="NHWC")
    with pytest.raises(ValueError, match="one device"):
        ops.tube_mask_gather(x, noise.to("meta"), 0.5, 2, 16, MEAN, STD)


@pytest.mark.parametrize("b,n,k,d", [(1, 5, 2, 3), (3, 97, 13, 17), (2, 64, 64, 8)])
def test_gather_scatter_tokens_and_grads(b, n, k, d, rng):
    x = torch.randn(b, n, d, generator=rng, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(n, generator=rng)[:k].sort().values for _ in range(b)])
    g = ops.gather_tokens(x, ids)
    for i in range(b):
        assert torch.equal(g[i], x[i, ids[i]])
    torch.autograd.gradcheck(lambda t: ops.gather_tokens(t, ids), (x,))
    y = torch.randn(b, k, d, generator=rng, dtype=torch.float64, requires_grad=True)
    s = ops.scatter_tokens(y, ids, n)
    for i in range(b):
        assert torch.equal(s[i, ids[i]], y[i])
        rest = torch.ones(n, dtype=torch.bool)
        rest[ids[i]] = False
        assert (s[i, rest] == 0).all()
    torch.autograd.gradcheck(lambda t: ops.scatter_tokens(t, ids, n), (y,))
    # scatter then gather is the identity on the selected tokens
    assert torch.equal(ops.gather_tokens(s, ids), y)


def test_gather_scatter_errors():
    x = torch.randn(2, 8, 4)
    with pytest.raises(TypeError, match="int64 or int32"):
        ops.gather_tokens(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(B=2, K\)"):
        ops.gather_tokens(x, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        ops.gather_tokens(x[0], torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="only 4"):
        ops.scatter_tokens(x, torch.zeros(2, 8, dtype=torch.long), 4)


def test_channel_stats_are_copied_to_the_device_once():
    from fastmam.ops._checks import channel_stats

    a = channel_stats(MEAN, 3, "mean", "cpu")
    assert a is channel_stats(list(MEAN), 3, "mean", torch.device("cpu"))  # cached: no copy per step
    assert a.dtype == torch.float32 and torch.equal(a, torch.tensor(MEAN))
    assert torch.equal(channel_stats(torch.tensor(STD, dtype=torch.float64), 3, "std", "cpu"), torch.tensor(STD))
    with pytest.raises(ValueError, match="std must have one value per channel \\(3\\), got 2"):
        channel_stats((0.1, 0.2), 3, "std", "cpu")
