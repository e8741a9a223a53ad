"""fastmam.ops as a drop-in for VideoMAE's pretraining code: on the same inputs, the same numbers.

VideoMAE's steps (its modeling_pretrain.py / engine_for_pretraining.py), each written out here:
tube mask from TubeMaskingGenerator, Conv3d patch embedding then ``x[~mask]``, normalized-pixel labels,
and ``nn.MSELoss`` on the decoder's output.
"""

import numpy as np
import pytest
import torch
from einops import rearrange

from fastmam import ops
from tests.ops.test_targets import videomae_labels

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def videomae_tube_mask(frames, height, width, ratio, rng):
    """VideoMAE's TubeMaskingGenerator: the same shuffled spatial mask repeated over time slices."""
    per_frame = height * width
    num_masks = int(ratio * per_frame)
    mask_per_frame = np.hstack([np.zeros(per_frame - num_masks), np.ones(num_masks)])
    rng.shuffle(mask_per_frame)
    return np.tile(mask_per_frame, (frames, 1)).flatten()


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_videomae_pipeline_equals_fastmam_ops(ratio):
    torch.manual_seed(0)
    np_rng = np.random.default_rng(0)
    b, t_frames, size, t, p, dim = 2, 4, 32, 2, 8, 24
    slices, hp = t_frames // t, size // p
    # VideoMAE's loader output: normalized float (B, C, T, H, W)
    raw = torch.randint(0, 256, (b, 3, t_frames, size, size), dtype=torch.uint8)
    videos = (raw.float() / 255 - torch.tensor(MEAN)[:, None, None, None]) / torch.tensor(STD)[:, None, None, None]
    masks = [videomae_tube_mask(slices, hp, hp, ratio, np_rng) for _ in range(b)]
    bool_masked_pos = torch.from_numpy(np.stack(masks)).bool()

    # 1. masking: VideoMAE's mask as noise (hidden positions largest) gives the identical mask and ids
    noise = bool_masked_pos.view(b, slices, -1)[:, 0].float()
    vis = ops.tube_mask_gather(videos, noise, ratio, t, p, MEAN, STD, layout="BCTHW")
    assert torch.equal(vis.mask, bool_masked_pos)

    # 2. encoder input: Conv3d patch embed + x[~mask] == our visible patches through the same weights as a Linear
    conv = torch.nn.Conv3d(3, dim, kernel_size=(t, p, p), stride=(t, p, p))
    x = conv(videos).flatten(2).transpose(1, 2)
    x_vis = x[~bool_masked_pos].reshape(b, -1, dim)
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(dim, -1)  # (D, C, t, p, p) -> (D, t*p*p*C)
    ours = torch.nn.functional.linear(vis.patches, weight, conv.bias)
    assert torch.allclose(ours, x_vis, atol=1e-5)

    # 3. labels: VideoMAE's normalized-pixel formula == ops.pixel_target (uint8 or its normalized float input)
    labels = videomae_labels(videos, bool_masked_pos, p, t, MEAN, STD)
    from_float = ops.pixel_target(videos, vis.ids_masked, t, p, True, MEAN, STD, layout="BCTHW")
    from_uint8 = ops.pixel_target(raw.permute(0, 2, 3, 4, 1).contiguous(), vis.ids_masked, t, p, True)
    assert torch.allclose(from_float, labels, atol=1e-4) and torch.allclose(from_uint8, labels, atol=1e-4)

    # 4. loss: nn.MSELoss()(head(decoder_hidden), labels) == dual_decoder_loss's pixel term
    hidden = torch.randn(b, labels.shape[1], 16)
    head = torch.nn.Linear(16, labels.shape[-1])
    videomae_loss = torch.nn.MSELoss()(input=head(hidden), target=labels)
    loss = ops.dual_decoder_loss(hidden, head.weight, head.bias, labels)
    assert torch.allclose(loss.appearance, videomae_loss, rtol=1e-5)
    assert torch.equal(loss.total, loss.appearance)


def test_patch_layout_is_videomaes():
    """The (t, p, p, C) patch vector is VideoMAE's 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)'."""
    videos = torch.randn(1, 3, 4, 16, 16)
    theirs = rearrange(videos, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=2, p1=8, p2=8)
    assert torch.equal(ops.patchify_reference(videos, 2, 8, layout="BCTHW"), theirs)
