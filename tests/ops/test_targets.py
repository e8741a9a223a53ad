import pytest
import torch
from einops import rearrange

from fastmam import ops
from tests.conftest import random_clip

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def videomae_labels(videos, bool_masked_pos, patch_size, tubelet, mean, std, normalize=True):
    """VideoMAE's pretraining target, verbatim from its engine (run_mae_pretraining / engine_for_pretraining):
    videos (B, C, T, H, W) normalized float, bool_masked_pos (B, N) bool."""
    mean = torch.as_tensor(mean, dtype=videos.dtype)[None, :, None, None, None]
    std = torch.as_tensor(std, dtype=videos.dtype)[None, :, None, None, None]
    unnorm_videos = videos * std + mean  # in [0, 1]
    B, C = videos.shape[:2]
    if normalize:
        videos_squeeze = rearrange(unnorm_videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c",
                                   p0=tubelet, p1=patch_size, p2=patch_size)
        videos_norm = (videos_squeeze - videos_squeeze.mean(dim=-2, keepdim=True)) / (
            videos_squeeze.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        videos_patch = rearrange(videos_norm, "b n p c -> b n (p c)")
    else:
        videos_patch = rearrange(unnorm_videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)",
                                 p0=tubelet, p1=patch_size, p2=patch_size)
    return videos_patch[bool_masked_pos].reshape(B, -1, videos_patch.shape[-1])


def test_pixel_target_hand_computed():
    # one token of 2 frames x 1x1 pixel x 1 channel: values 51 and 102 -> 0.2, 0.4 in [0, 1]
    x = torch.tensor([51, 102], dtype=torch.uint8).reshape(1, 2, 1, 1, 1)
    ids = torch.zeros(1, 1, dtype=torch.long)
    raw = ops.pixel_target(x, ids, 2, 1, normalize=False)
    assert torch.allclose(raw, torch.tensor([[[0.2, 0.4]]]))
    # mean 0.3, unbiased std = sqrt(0.02) -> (+-0.1) / (0.141421 + 1e-6)
    norm = ops.pixel_target(x, ids, 2, 1, normalize=True)
    s = 0.02**0.5 + 1e-6
    assert torch.allclose(norm, torch.tensor([[[-0.1 / s, 0.1 / s]]]), atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape,t,p,ratio", [((1, 2, 32, 16, 3), 2, 16, 0.5), ((2, 8, 48, 32, 3), 2, 16, 0.9),
                                             ((3, 6, 21, 14, 3), 3, 7, 0.5)])
def test_pixel_target_equals_videomae(shape, t, p, ratio, normalize, rng):
    x = random_clip(shape, rng)
    s = (shape[2] // p) * (shape[3] // p)
    m = ops.tube_masking(torch.rand(shape[0], s, generator=rng), ratio, shape[1] // t)
    # VideoMAE's loader output: normalized float (B, C, T, H, W); its formula in fp64 is the reference
    videos = (x.permute(0, 4, 1, 2, 3).double() / 255 - torch.tensor(MEAN, dtype=torch.float64)[:, None, None, None]
              ) / torch.tensor(STD, dtype=torch.float64)[:, None, None, None]
    ref64 = videomae_labels(videos, m.mask, p, t, MEAN, STD, normalize)
    ref32 = videomae_labels(videos.float(), m.mask, p, t, MEAN, STD, normalize)
    ours_uint8 = ops.pixel_target(x, m.ids_masked, t, p, normalize)
    ours_float = ops.pixel_target(videos.float(), m.ids_masked, t, p, normalize, MEAN, STD, layout="BCTHW")
    bound = 2 * (ref32.double() - ref64).abs().max().item() + 1e-5
    for ours in (ours_uint8, ours_float):
        assert ours.dtype == torch.float32 and ours.shape == ref64.shape
        err = (ours.double() - ref64).abs()
        assert err.max().item() <= bound, f"max {err.max().item()} mean {err.mean().item()} bound {bound}"


def test_rgb_diff_hand_computed():
    # tubelet 3, one 1x1x1 token: frames 10, 60, 35 -> differences (60-10)/255, (35-60)/255
    x = torch.tensor([10, 60, 35], dtype=torch.uint8).reshape(1, 3, 1, 1, 1)
    ids = torch.zeros(1, 1, dtype=torch.long)
    d = ops.rgb_diff_target(x, ids, 3, 1)
    assert torch.allclose(d, torch.tensor([[[50 / 255, -25 / 255]]]))
    # dense: the frame right after each sampled frame
    nxt = torch.tensor([20, 50, 35], dtype=torch.uint8).reshape(1, 3, 1, 1, 1)
    dense = ops.rgb_diff_target(x, ids, 3, 1, next_clip=nxt)
    assert torch.allclose(dense, torch.tensor([[[10 / 255, -10 / 255, 0.0]]]))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,t,p", [((1, 2, 32, 16, 3), 2, 16), ((2, 6, 24, 16, 3), 3, 8),
                                       ((2, 4, 14, 21, 3), 4, 7)])
def test_rgb_diff_matches_explicit_formula(shape, t, p, normalize, rng):
    x = random_clip(shape, rng)
    s = (shape[2] // p) * (shape[3] // p)
    m = ops.tube_masking(torch.rand(shape[0], s, generator=rng), 0.5, shape[1] // t)
    v = x.double() / 255
    b, T, H, W, C = shape
    # per tubelet: frame f+1 minus frame f, then VideoMAE's patch layout
    tub = v.view(b, T // t, t, H, W, C)
    diff = (tub[:, :, 1:] - tub[:, :, :-1]).reshape(b, (T // t) * (t - 1), H, W, C)
    patches = rearrange(diff, "b (n f) (h p1) (w p2) c -> b (n h w) (f p1 p2) c", f=t - 1, p1=p, p2=p)
    if normalize:
        patches = (patches - patches.mean(-2, keepdim=True)) / (patches.var(-2, unbiased=True, keepdim=True).sqrt()
                                                                 + 1e-6)
    flat = patches.reshape(b, patches.shape[1], -1)
    expected = flat.gather(1, m.ids_masked[..., None].expand(-1, -1, flat.shape[2]))
    ours = ops.rgb_diff_target(x, m.ids_masked, t, p, normalize)
    assert ours.shape == (b, m.ids_masked.shape[1], (t - 1) * p * p * C) and ours.dtype == torch.float32
    err = (ours.double() - expected).abs().max().item()
    # fp32 of values bounded by 1 (raw) or ~sqrt(K) (normalized)
    tol = (1e-6 if not normalize else 1e-6 * (p * p * (t - 1)) ** 0.5) + 1e-6
    assert err <= tol, f"max err {err} > {tol}"


def test_targets_errors(rng):
    x = random_clip((1, 4, 16, 16, 3), rng)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="tubelet >= 2"):
        ops.rgb_diff_target(x, ids, 1, 8)
    with pytest.raises(ValueError, match="next_clip must match"):
        ops.rgb_diff_target(x, ids, 2, 8, next_clip=x[:, :2])
    with pytest.raises(ValueError, match="mean and std"):
        ops.pixel_target(x.permute(0, 4, 1, 2, 3).float(), ids, 2, 8, layout="BCTHW")
    with pytest.raises(TypeError, match="ids_masked"):
        ops.pixel_target(x, ids.float(), 2, 8)
    with pytest.raises(ValueError, match="at least 2 values"):
        ops.pixel_target(random_clip((1, 1, 1, 1, 3), rng), torch.zeros(1, 1, dtype=torch.long), 1, 1)
