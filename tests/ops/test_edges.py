"""Every backend behaves the same at the edges: autocast, out-of-range ids and codes, ignore_index, degenerate
inputs (no tokens, zero weights, numpy/tensor ratios, missing or zero statistics, NaN noise, mismatched shapes),
and flat patches. Triton runs in its interpreter on CPU; what differs on a GPU (the device-side check) is
covered through torch.compile, which takes the same path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastmam import ops
from tests.conftest import random_clip, runnable_backends

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _backends(op):
    return runnable_backends(op)


def _loss_inputs(m, da, k, dm, rng, dtype=torch.float32):
    h = torch.randn(m, da, generator=rng).to(dtype).requires_grad_()
    w = (torch.randn(k, da, generator=rng) / da**0.5).to(dtype).requires_grad_()
    b = torch.randn(k, generator=rng).to(dtype).requires_grad_()
    codes = torch.randint(0, k, (m,), generator=rng)
    mp = torch.randn(m, dm, generator=rng).to(dtype).requires_grad_()
    mt = torch.randn(m, dm, generator=rng)
    return h, w, b, codes, mp, mt


def _grads(out, *inputs):
    return torch.autograd.grad(out, inputs, allow_unused=True)


# ----------------------------------------------------------------------------------------- 2. autocast


@pytest.mark.parametrize("backend", _backends("dual_decoder_loss"))
def test_loss_is_fp32_under_autocast(backend, rng):
    """VideoMAE-style code calls the loss under autocast: the logits must stay fp32 (the bf16 head's error on
    K = 97 logits is ~1e-2; the bound here is a few fp32 ulps)."""
    h, w, b, codes, mp, mt = _loss_inputs(37, 24, 97, 8, rng)
    plain = ops.dual_decoder_loss(h, w, b, codes, mp, mt, backend=backend)
    plain_grads = _grads(plain.total, h, w, b, mp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.dual_decoder_loss(h, w, b, codes, mp, mt, backend=backend)
    auto_grads = _grads(auto.total, h, w, b, mp)
    for name, p, a in zip(("total", "appearance", "motion"), plain, auto, strict=True):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a, p, rtol=1e-6, atol=0, msg=name)
    for name, p, a, x in zip(("h", "w", "b", "motion_pred"), plain_grads, auto_grads, (h, w, b, mp), strict=True):
        assert a.dtype == x.dtype, name
        torch.testing.assert_close(a, p, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------- 4. out-of-range ids and codes


def _clip_and_ids(rng):
    clip = random_clip((2, 4, 16, 24, 3), rng)  # N = 2 * 2 * 3 = 12 tokens
    ids = torch.tensor([[0, 5, 11], [3, 4, 7]])
    return clip, ids


@pytest.mark.parametrize("bad", [12, 1000, -1])
@pytest.mark.parametrize("backend", _backends("pixel_target"))
def test_target_ids_out_of_range_are_rejected(backend, bad, rng):
    clip, ids = _clip_and_ids(rng)
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=r"ids_masked holds token ids out of range.*outside \[0, 12\)"):
        ops.pixel_target(clip, ids, 2, 8, backend=backend)
    with pytest.raises(ValueError, match="ids_masked holds token ids out of range"):
        ops.rgb_diff_target(clip, ids, 2, 8, backend=backend)
    with pytest.raises(ValueError, match="ids_masked holds token ids out of range"):
        ops.rgb_diff_target(clip, ids, 2, 8, next_clip=clip.clone(), backend=backend)


@pytest.mark.parametrize("bad", [9, -2])
@pytest.mark.parametrize("backend", _backends("gather_tokens"))
def test_token_ids_out_of_range_are_rejected(backend, bad, rng):
    x = torch.randn(2, 9, 5, generator=rng)
    ids = torch.tensor([[0, 4], [8, bad]])
    with pytest.raises(ValueError, match=r"ids holds token ids out of range.*outside \[0, 9\)"):
        ops.gather_tokens(x, ids, backend=backend)
    with pytest.raises(ValueError, match=r"ids holds token ids out of range"):
        ops.scatter_tokens(x[:, :2], ids, 9, backend=backend)


@pytest.mark.parametrize("bad", [97, -1, -101])
@pytest.mark.parametrize("backend", _backends("dual_decoder_loss"))
def test_codes_out_of_range_are_rejected(backend, bad, rng):
    h, w, b, codes, mp, mt = _loss_inputs(6, 8, 97, 4, rng)
    codes[3] = bad
    with pytest.raises(ValueError, match=r"appearance_target holds codes out of range.*\[0, 97\) or ignore_index"):
        ops.dual_decoder_loss(h, w, b, codes, mp, mt, backend=backend)


def test_range_check_runs_on_the_device_inside_compile(rng):
    """On a GPU and inside torch.compile the check is torch._assert_async (no host sync): here through compile."""
    clip, ids = _clip_and_ids(rng)
    ids[0, 0] = 40
    torch._dynamo.reset()
    fn = torch.compile(lambda c, i: ops.pixel_target(c, i, 2, 8, backend="reference"), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(RuntimeError, match="ids_masked holds token ids out of range"):
        fn(clip, ids)
    torch._dynamo.reset()


def test_kernels_never_read_outside_the_clip(rng):
    """Defense in depth behind the check: a kernel launched with a bad id reads token 0 in its place."""
    pytest.importorskip("triton")
    from fastmam.kernels import patches, tokens

    from fastmam.ops.targets import Diff

    clip, ids = _clip_and_ids(rng)
    geometry = (2, 4, 16, 24, 3)
    bad = ids.clone()
    bad[1, 1] = 10**9
    as_zero = ids.clone()
    as_zero[1, 1] = 0
    for diff, rows in ((Diff.PIXELS, 128), (Diff.PAIRS, 64)):
        got = patches.masked_target(clip, None, bad, 2, 8, True, None, None, "BTHWC", geometry, int(diff), rows)
        want = patches.masked_target(clip, None, as_zero, 2, 8, True, None, None, "BTHWC", geometry, int(diff), rows)
        assert torch.equal(got, want)
    x = torch.randn(2, 12, 4, generator=rng)
    assert torch.equal(tokens.copy_rows(x, bad, 3, False), tokens.copy_rows(x, as_zero, 3, False))


# --------------------------------------------------------------------------------------- 5. ignore_index


@pytest.mark.parametrize("ignore_index", [-100, 5])
@pytest.mark.parametrize("backend", _backends("dual_decoder_loss"))
def test_ignore_index_as_cross_entropy(backend, ignore_index, rng):
    h, w, b, codes, _, _ = _loss_inputs(23, 16, 41, 4, rng)
    codes[::3] = ignore_index
    got = ops.dual_decoder_loss(h, w, b, codes, ignore_index=ignore_index, backend=backend).appearance
    want = F.cross_entropy(h @ w.t() + b, codes, ignore_index=ignore_index)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for name, g, r in zip("hwb", _grads(got, h, w, b), _grads(want, h, w, b), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", _backends("dual_decoder_loss"))
def test_ignore_index_with_token_weights(backend, rng):
    h, w, b, codes, mp, mt = _loss_inputs(19, 8, 33, 4, rng)
    weight = torch.rand(19, generator=rng) + 0.1
    codes[[1, 4, 9]] = -100
    got = ops.dual_decoder_loss(h, w, b, codes, mp, mt, 1.0, 1.0, weight, backend=backend)
    ce = F.cross_entropy(h @ w.t() + b, codes, reduction="none")
    counted = weight * (codes != -100)
    torch.testing.assert_close(got.appearance, (ce * counted).sum() / counted.sum(), rtol=1e-6, atol=0)
    # the motion term has no codes: every token counts with its weight
    mse = (mp - mt).square().mean(-1)
    torch.testing.assert_close(got.motion, (mse * weight).sum() / weight.sum(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------- 6. degenerate inputs


@pytest.mark.parametrize("case", ["no_tokens", "zero_weights", "all_ignored"])
@pytest.mark.parametrize("pixels", [False, True])
@pytest.mark.parametrize("backend", _backends("dual_decoder_loss"))
def test_nothing_to_average_is_zero_with_zero_gradients(backend, pixels, case, rng):
    m = 0 if case == "no_tokens" else 7
    h, w, b, codes, mp, mt = _loss_inputs(m, 8, 12, 4, rng)
    target = torch.randn(m, 12, generator=rng) if pixels else codes
    weight = torch.zeros(m) if case == "zero_weights" else None
    if case == "all_ignored":
        if pixels:
            pytest.skip("ignore_index applies to codes")
        target = torch.full((m,), -100)
    out = ops.dual_decoder_loss(h, w, b, target, mp, mt, 1.0, 1.0, weight, backend=backend)
    if case == "all_ignored":  # the motion term still counts every token
        assert out.appearance.item() == 0.0 and out.motion.item() > 0
    else:
        assert out.total.item() == 0.0 and out.appearance.item() == 0.0 and out.motion.item() == 0.0
    for name, g, x in zip(("h", "w", "b"), _grads(out.appearance, h, w, b), (h, w, b), strict=True):
        assert g is not None and g.shape == x.shape and torch.all(g == 0), name


@pytest.mark.parametrize("backend", _backends("pixel_target"))
def test_targets_of_no_tokens(backend, rng):
    clip, _ = _clip_and_ids(rng)
    none = torch.zeros(2, 0, dtype=torch.int64)
    assert ops.pixel_target(clip, none, 2, 8, backend=backend).shape == (2, 0, 384)
    assert ops.rgb_diff_target(clip, none, 2, 8, backend=backend).shape == (2, 0, 192)
    assert ops.gather_tokens(torch.randn(2, 12, 3), none).shape == (2, 0, 3)


@pytest.mark.parametrize("ratio", [np.float32(0.75), np.float64(0.75), torch.tensor(0.75), torch.tensor([0.75])])
@pytest.mark.parametrize("backend", _backends("tube_mask_gather"))
def test_ratio_as_numpy_or_tensor(backend, ratio, rng):
    clip = random_clip((2, 2, 16, 32, 3), rng)
    noise = torch.rand(2, 8, generator=rng)
    got = ops.tube_mask_gather(clip, noise, ratio, 2, 8, MEAN, STD, backend=backend)
    want = ops.tube_mask_gather(clip, noise, 0.75, 2, 8, MEAN, STD, backend=backend)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert torch.equal(ops.tube_masking(noise, ratio, 1).ids_keep, ops.tube_masking(noise, 0.75, 1).ids_keep)


@pytest.mark.parametrize("ratio", [True, "0.5", 1.0, 0.0, float("nan"), torch.tensor([0.5, 0.5]), None])
def test_bad_ratio(ratio, rng):
    clip = random_clip((1, 2, 16, 16, 3), rng)
    with pytest.raises(ValueError, match=r"mask ratio must be a number in \(0, 1\)"):
        ops.tube_mask_gather(clip, torch.rand(1, 4, generator=rng), ratio, 2, 8, MEAN, STD)


@pytest.mark.parametrize("backend", _backends("tube_mask_gather"))
def test_bad_statistics_and_dtype(backend, rng):
    clip = random_clip((1, 2, 16, 16, 3), rng)
    noise = torch.rand(1, 4, generator=rng)
    with pytest.raises(ValueError, match="mean is needed here"):
        ops.tube_mask_gather(clip, noise, 0.5, 2, 8, None, STD, backend=backend)
    with pytest.raises(ValueError, match="std is needed here"):
        ops.tube_mask_gather(clip, noise, 0.5, 2, 8, MEAN, None, backend=backend)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        ops.tube_mask_gather(clip, noise, 0.5, 2, 8, MEAN, (0.2, 0.0, 0.2), backend=backend)
    with pytest.raises(ValueError, match="mean must be finite"):
        ops.tube_mask_gather(clip, noise, 0.5, 2, 8, (0.4, float("nan"), 0.4), STD, backend=backend)
    with pytest.raises(TypeError, match="out_dtype must be a floating-point dtype"):
        ops.tube_mask_gather(clip, noise, 0.5, 2, 8, MEAN, STD, torch.int8, backend=backend)
    bcthw = torch.randn(1, 3, 2, 16, 16, generator=rng)
    ids = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        ops.pixel_target(bcthw, ids, 2, 8, mean=MEAN, std=(0.2, 0.2, 0.0), layout="BCTHW",
                         backend=_backends("pixel_target")[-1])


@pytest.mark.parametrize("backend", _backends("tube_mask_gather"))
def test_nan_noise_is_rejected(backend, rng):
    clip = random_clip((2, 2, 16, 16, 3), rng)
    noise = torch.rand(2, 4, generator=rng)
    noise[1, 2] = float("nan")
    with pytest.raises(ValueError, match="noise contains NaN"):
        ops.tube_mask_gather(clip, noise, 0.5, 2, 8, MEAN, STD, backend=backend)
    with pytest.raises(ValueError, match="noise contains NaN"):
        ops.tube_masking(noise, 0.5, 1)
    with pytest.raises(ValueError, match="noise contains NaN"):
        ops.random_masking(noise, 0.5)


@pytest.mark.parametrize("backend", _backends("dual_decoder_loss"))
def test_motion_shapes_must_match(backend, rng):
    h, w, b, codes, mp, mt = _loss_inputs(6, 8, 12, 4, rng)
    with pytest.raises(ValueError, match="must have the same shape"):
        ops.dual_decoder_loss(h, w, b, codes, mp, mt.reshape(4, 6), backend=backend)
    with pytest.raises(ValueError, match="must have the same shape"):
        ops.dual_decoder_loss(h, w, b, codes, mp, mt.t(), backend=backend)


# ------------------------------------------------------------------------------------------ 7. flat patches


def _flat_clip(rng, layout):
    """(2, 4, 16, 16, 3) with every 8x8x2 token flat per channel, except token 1 of sample 0 near-flat (one
    pixel one level brighter) and token 2 of sample 1 with a uniform brightness step between its frames."""
    levels = torch.randint(0, 256, (2, 2, 2, 2, 3), generator=rng, dtype=torch.uint8)  # (B, slices, rows, cols, C)
    clip = levels.repeat_interleave(2, 1).repeat_interleave(8, 2).repeat_interleave(8, 3).contiguous()
    clip[0, 0, 0, 8, 1] = min(255, int(clip[0, 0, 0, 8, 1]) + 1) if clip[0, 0, 0, 8, 1] < 255 else 254
    clip[1, 1, 8:, :8] = (clip[1, 1, 8:, :8].int().clamp(max=250) + 5).to(torch.uint8)
    clip[1, 0, 8:, :8] = clip[1, 1, 8:, :8] - 5
    if layout == "BTHWC":
        return clip, None, None
    x = ((clip.double() / 255 - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64))
    return x.permute(0, 4, 1, 2, 3).float(), MEAN, STD


def _exact_normalized(clip, ids, layout, mean, std, diff):
    """float64 VideoMAE formula on the masked tokens (B, M, rows*C)."""
    if layout == "BCTHW":
        x = clip.double().permute(0, 2, 3, 4, 1) * torch.tensor(std, dtype=torch.float64) + torch.tensor(
            mean, dtype=torch.float64)
    else:
        x = clip.double() / 255
    tokens = ops.patchify_reference(x.permute(0, 4, 1, 2, 3), 2, 8, "BCTHW")  # (B, N, t*p*p*C) float64
    v = ops.gather_tokens(tokens, ids).reshape(*ids.shape, 2, 64, 3)
    if diff:
        v = v[:, :, 1:] - v[:, :, :-1]
    v = v.reshape(*ids.shape, -1, 3)
    d = v - v.mean(-2, keepdim=True)
    return (d / (v.var(-2, keepdim=True).sqrt() + 1e-6)).reshape(*ids.shape, -1)


@pytest.mark.parametrize("layout", ["BTHWC", "BCTHW"])
@pytest.mark.parametrize("backend", _backends("pixel_target"))
def test_flat_patches_normalize_to_exact_zero(backend, layout, rng):
    clip, mean, std = _flat_clip(rng, layout)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]])
    pix = ops.pixel_target(clip, ids, 2, 8, True, mean, std, layout, backend=backend).reshape(2, 8, -1, 3)
    mot = ops.rgb_diff_target(clip, ids, 2, 8, True, None, mean, std, layout, backend=backend).reshape(2, 8, -1, 3)
    flat = torch.ones(2, 8, dtype=torch.bool)
    flat[0, 1] = False
    flat_pixels = flat.clone()
    flat_pixels[1, 2] = False  # a brightness step between frames: flat in each frame and in its difference
    assert torch.all(pix[flat_pixels] == 0), pix[flat_pixels].abs().max()
    if layout == "BTHWC":  # uint8 differences are exact integers: a uniform step is exactly flat
        assert torch.all(mot[flat] == 0), mot[flat].abs().max()
    else:
        assert torch.all(mot[flat & flat_pixels] == 0), mot[flat & flat_pixels].abs().max()
    # the near-flat token: within a few fp32 ulps of its largest float64 value, on every backend. Measured here
    # (CPU, 5-20 clips): the reference up to 2.1 ulps, Triton (interpreter) up to 5.1; the bound is 16. Before the
    # shift, the fp32 mean's rounding was amplified by 1 / std (std ~ 1/255 / sqrt(128) here)
    for diff, got in ((False, pix), (True, mot)):
        exact = _exact_normalized(clip, ids, layout, mean, std, diff).reshape(2, 8, -1, 3)
        err = (got[0, 1].double() - exact[0, 1]).abs().max().item()
        bound = 16 * torch.finfo(torch.float32).eps * exact[0, 1].abs().max().item()
        assert err <= bound, f"near-flat token: max err {err:.3g}, bound {bound:.3g}"
