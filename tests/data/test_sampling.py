import numpy as np
import pytest
import torch

from fastmam.data.sampling import (
    CropBox,
    SamplingSpec,
    TooShort,
    apply_crop,
    next_frame_indices,
    sample_crop,
    sample_frame_indices,
    sample_rng,
)


def test_indices_are_strided_from_a_uniform_start():
    starts = set()
    for k in range(400):
        idx = sample_frame_indices(100, 16, 4, np.random.default_rng(k))
        assert idx.dtype == np.int64 and idx.shape == (16,)
        assert (np.diff(idx) == 4).all()
        starts.add(int(idx[0]))
        assert 0 <= idx[0] and idx[-1] + 4 <= 100  # VideoMAE's span: start in [0, n - T*s]
    assert starts == set(range(0, 100 - 64 + 1))  # every start is reachable, none outside


def test_exact_length_video_has_one_start():
    idx = sample_frame_indices(64, 16, 4, np.random.default_rng(0))
    assert idx.tolist() == list(range(0, 64, 4))


def test_short_video_policies():
    rng = np.random.default_rng(0)
    clamp = sample_frame_indices(20, 8, 4, rng, "clamp")
    assert clamp.tolist() == [0, 4, 8, 12, 16, 19, 19, 19]  # VideoMAE's rule: the last frame repeats
    reduced = sample_frame_indices(20, 8, 4, rng, "reduce_stride")
    assert (np.diff(reduced) == 2).all() and reduced[-1] < 20  # 20 // 8 = stride 2 fits
    tiny = sample_frame_indices(5, 8, 4, rng, "reduce_stride")
    assert tiny.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]  # even stride 1 is too long: clamp
    with pytest.raises(TooShort, match="too short: 20 frames < 8 frames x stride 4"):
        sample_frame_indices(20, 8, 4, rng, "skip")
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frame_indices(0, 8, 4, rng)
    with pytest.raises(ValueError, match="expected one of clamp"):
        sample_frame_indices(50, 8, 4, rng, "loop")


def test_next_frames_for_dense_motion():
    assert next_frame_indices(np.array([0, 4, 9]), 10).tolist() == [1, 5, 9]


def test_sample_rng_is_a_pure_function_of_the_key():
    a = sample_rng(1, 2, 3, 0).random(4)
    assert np.array_equal(a, sample_rng(1, 2, 3, 0).random(4))
    for other in [(0, 2, 3, 0), (1, 5, 3, 0), (1, 2, 4, 0), (1, 2, 3, 1)]:
        assert not np.array_equal(a, sample_rng(*other).random(4))


@pytest.mark.parametrize("hw", [(272, 640), (144, 176), (720, 1280), (300, 200)])
def test_multiscale_boxes(hw):
    h, w = hw
    spec = SamplingSpec(img_size=112, crop="multiscale")
    base = min(h, w)
    sizes = {int(base * s) for s in spec.crop_scales} | {112}
    seen = set()
    for k in range(300):
        box = sample_crop(np.random.default_rng(k), h, w, spec)
        assert 0 <= box.y and box.y + box.h <= h and 0 <= box.x and box.x + box.w <= w
        assert box.h in sizes and box.w in sizes and not box.flip
        seen.add((box.h, box.w))
    ratio = [max(a, b) / min(a, b) for a, b in seen]
    # height and width scales differ by at most one step: the largest neighbour ratio is 0.875 / 0.75
    # = 1.17, while two steps (1 / 0.75) would give 1.33
    assert max(ratio) < 1.2
    assert len(seen) > 4


def test_random_resized_boxes_respect_area_and_ratio():
    spec = SamplingSpec(img_size=64, crop="random_resized", rrc_scale=(0.3, 0.6), rrc_ratio=(0.75, 1.3333))
    for k in range(200):
        box = sample_crop(np.random.default_rng(k), 240, 320, spec)
        area = box.h * box.w / (240 * 320)
        assert 0.28 <= area <= 0.62 and 0.7 <= box.w / box.h <= 1.4
        assert box.y + box.h <= 240 and box.x + box.w <= 320


def test_center_crop_and_flip_probability():
    spec = SamplingSpec(img_size=32, crop="center", flip=True)
    boxes = [sample_crop(np.random.default_rng(k), 100, 160, spec) for k in range(400)]
    assert {(b.y, b.x, b.h, b.w) for b in boxes} == {(0, 30, 100, 100)}
    flips = sum(b.flip for b in boxes)
    assert 150 < flips < 250  # p = 0.5


def test_apply_crop_slices_resizes_and_flips():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 40, 50, 3), generator=g, dtype=torch.uint8)
    same = apply_crop(frames, CropBox(5, 7, 16, 16), 16)  # no resize needed: an exact slice
    assert torch.equal(same, frames[:, 5:21, 7:23])
    flipped = apply_crop(frames, CropBox(5, 7, 16, 16, flip=True), 16)
    assert torch.equal(flipped, frames[:, 5:21, 7:23].flip(2))
    resized = apply_crop(frames, CropBox(0, 0, 40, 40), 20)
    ref = torch.nn.functional.interpolate(frames[:, :, :40].permute(0, 3, 1, 2).float(), size=(20, 20),
                                          mode="bilinear", antialias=True).round().permute(0, 2, 3, 1)
    assert resized.dtype == torch.uint8 and resized.shape == (3, 20, 20, 3)
    assert torch.equal(resized, ref.to(torch.uint8))
    # a constant image stays constant through the resize (no drift from rounding)
    flat = torch.full((2, 30, 45, 3), 77, dtype=torch.uint8)
    assert torch.equal(apply_crop(flat, CropBox(1, 2, 27, 37), 16), torch.full((2, 16, 16, 3), 77, dtype=torch.uint8))
