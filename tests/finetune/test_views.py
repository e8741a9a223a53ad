"""Frame and crop rules of the multi-view test (fastmam.finetuning.views) against hand-computed examples and against
VideoMAE's own formulas, written out below from its published code (MCG-NJU/VideoMAE kinetics.py and ssv2.py)."""


import numpy as np
import pytest
import torch

from fastmam.data.decode import BadVideo
from fastmam.data.sampling import CropBox, SamplingSpec, TooShort, apply_crop, sample_crop, sample_frame_indices
from fastmam.finetuning.views import ViewDataset, crop_boxes, segment_indices, test_views
from fastmam.probe import _Centre


# --- VideoMAE, as published -------------------------------------------------------------------------------------
def videomae_kinetics_test_clip(n, clip_len, frame_sample_rate, test_num_segment, chunk_nb):
    """kinetics.py, mode='test': loadvideo_decord's all_index, then __getitem__'s temporal_start."""
    all_index = [x for x in range(0, n, frame_sample_rate)]
    while len(all_index) < clip_len:
        all_index.append(all_index[-1])
    temporal_step = max(1.0 * (len(all_index) - clip_len) / (test_num_segment - 1), 0)
    temporal_start = int(chunk_nb * temporal_step)
    return all_index[temporal_start:temporal_start + clip_len]


def videomae_ssv2_test_clip(n, num_segment, chunk_nb, test_num_segment=2):
    """ssv2.py, mode='test': loadvideo_decord's sorted starts and centres, then buffer[chunk_nb::2]."""
    tick = n / float(num_segment)
    all_index = list(np.array([int(tick / 2.0 + tick * x) for x in range(num_segment)] +
                              [int(tick * x) for x in range(num_segment)]))
    while len(all_index) < (num_segment * test_num_segment):
        all_index.append(all_index[-1])
    all_index = list(np.sort(np.array(all_index)))
    return all_index[chunk_nb::2]


def videomae_spatial_start(long_side, short_side_size, test_num_crop, split_nb):
    """kinetics.py / ssv2.py test mode, applied to the frame before its resize (we crop in source pixels)."""
    spatial_step = 1.0 * (long_side - short_side_size) / (test_num_crop - 1)
    return int(split_nb * spatial_step)


def spec(t, s, short="clamp", size=8):
    return SamplingSpec(num_frames=t, stride=s, img_size=size, crop="center", short_videos=short)


def frames_of(views):
    return [v[0].tolist() for v in views]


# --- dense clips --------------------------------------------------------------------------------------------------
def test_dense_clips_hand_examples():
    # n=100, T=4, s=5, K=3: grid of 20 positions, step (20-4)/2 = 8 -> starts at grid 0, 8, 16
    assert frames_of(test_views(100, 10, 10, spec(4, 5), 3, 1)) == [[0, 5, 10, 15], [40, 45, 50, 55],
                                                                   [80, 85, 90, 95]]
    # n=101: grid ceil(101/5) = 21, K=2: step 17
    assert frames_of(test_views(101, 10, 10, spec(4, 5), 2, 1)) == [[0, 5, 10, 15], [85, 90, 95, 100]]
    # K=1: the centre clip, start (100 - 20) // 2 = 40
    assert frames_of(test_views(100, 10, 10, spec(4, 5), 1, 1)) == [[40, 45, 50, 55]]
    # short, clamp: 8 < 4*3 frames -> min(3i, 7), the same for every clip
    assert frames_of(test_views(8, 10, 10, spec(4, 3), 2, 1)) == [[0, 3, 6, 7], [0, 3, 6, 7]]
    # short, reduce_stride: stride 10 // 4 = 2, grid 5, step 1
    assert frames_of(test_views(10, 10, 10, spec(4, 4, "reduce_stride"), 2, 1)) == [[0, 2, 4, 6], [2, 4, 6, 8]]
    with pytest.raises(TooShort, match="short_videos=skip"):
        test_views(10, 10, 10, spec(4, 4, "skip"), 2, 1)
    with pytest.raises(TooShort, match="short_videos=skip"):
        test_views(10, 10, 10, spec(4, 4, "skip"), 1, 1)


@pytest.mark.parametrize("clips", [2, 3, 5, 10])
def test_dense_clips_are_videomae_kinetics_test(clips):
    """Equal to VideoMAE wherever it samples without repeating; shorter videos repeat frame n-1 (our clamp rule, as
    in training) where VideoMAE repeats the last frame on its stride grid."""
    for t in (1, 2, 4, 5, 16):
        for s in (1, 2, 3, 4):
            for n in range(1, 3 * t * s + 7):
                ours = frames_of(test_views(n, 4, 4, spec(t, s), clips, 1))
                theirs = [videomae_kinetics_test_clip(n, t, s, clips, k) for k in range(clips)]
                if n > (t - 1) * s:
                    assert ours == theirs, (n, t, s)
                else:
                    assert ours == [[min(i * s, n - 1) for i in range(t)]] * clips, (n, t, s)
                assert all(0 <= f < n for clip in ours for f in clip)


# --- segment clips ------------------------------------------------------------------------------------------------
def test_segment_indices_hand_examples():
    # n=10, T=4: tick 2.5; centres 1.25, 3.75, 6.25, 8.75
    assert segment_indices(10, 4).tolist() == [1, 3, 6, 8]
    # 2 clips: offsets 0 and 1/2 of a segment (VideoMAE's SSv2 test)
    assert [segment_indices(10, 4, clip=k, clips=2).tolist() for k in range(2)] == [[0, 2, 5, 7], [1, 3, 6, 8]]
    # 3 clips: offsets 1/6, 1/2, 5/6 (2.5x + 0.417, + 1.25, + 2.083)
    assert [segment_indices(10, 4, clip=k, clips=3).tolist() for k in range(3)] == [[0, 2, 5, 7], [1, 3, 6, 8],
                                                                                    [2, 4, 7, 9]]
    # shorter than T: frames repeat (tick 0.75: 0.375, 1.125, 1.875, 2.625)
    assert segment_indices(3, 4).tolist() == [0, 1, 1, 2]
    assert segment_indices(1, 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="clip=2 is not one of the 2"):
        segment_indices(10, 4, clip=2, clips=2)
    with pytest.raises(TooShort, match="short_videos=skip"):
        test_views(3, 4, 4, spec(4, 1, "skip"), 1, 1, "segment")


def test_segment_clips_are_videomae_ssv2_test():
    for t in (1, 2, 3, 8, 16):
        for n in range(1, 5 * t + 3):
            ours = [segment_indices(n, t, clip=k, clips=2).tolist() for k in range(2)]
            assert ours == [videomae_ssv2_test_clip(n, t, k) for k in range(2)], (n, t)
            assert segment_indices(n, t).tolist() == videomae_ssv2_test_clip(n, t, 1), (n, t)  # centres
            for clips in (1, 3, 4, 5):
                for k in range(clips):
                    idx = segment_indices(n, t, clip=k, clips=clips)
                    assert idx.dtype == np.int64 and idx.shape == (t,)
                    assert (np.diff(idx) >= 0).all() and idx.min() >= 0 and idx.max() < n
            # the test views of the segment rule are these clips (the stride plays no part)
            views = test_views(n, 4, 4, spec(t, 7), 2, 1, "segment")
            assert frames_of(views) == ours


def test_segment_training_draws_one_frame_per_segment():
    """VideoMAE's training rule: segments of n // T frames, x * (n // T) + randint(n // T)."""
    for n, t in ((10, 4), (16, 16), (100, 8), (37, 5)):
        seg = n // t
        for seed in range(5):
            ours = segment_indices(n, t, np.random.default_rng(seed))
            theirs = np.multiply(list(range(t)), seg) + np.random.default_rng(seed).integers(seg, size=t)
            assert ours.tolist() == theirs.tolist()
            assert ((ours // seg) == np.arange(t)).all()
    # shorter than T (VideoMAE gives frame 0 T times): in order, every frame of the video reachable
    seen = set()
    for seed in range(50):
        idx = segment_indices(3, 8, np.random.default_rng(seed))
        assert (np.diff(idx) >= 0).all() and idx.min() >= 0 and idx.max() <= 2
        seen.update(idx.tolist())
    assert seen == {0, 1, 2}


# --- crops --------------------------------------------------------------------------------------------------------
def test_crops_hand_examples():
    # 144 x 176 (carphone): side 144, room 32
    assert crop_boxes(144, 176, 3) == [CropBox(0, 0, 144, 144), CropBox(0, 16, 144, 144), CropBox(0, 32, 144, 144)]
    assert crop_boxes(144, 176, 1) == [CropBox(0, 16, 144, 144)]
    assert crop_boxes(144, 176, 2) == [CropBox(0, 0, 144, 144), CropBox(0, 32, 144, 144)]
    # portrait: along the height
    assert crop_boxes(200, 100, 3) == [CropBox(0, 0, 100, 100), CropBox(50, 0, 100, 100), CropBox(100, 0, 100, 100)]
    assert crop_boxes(9, 9, 3) == [CropBox(0, 0, 9, 9)] * 3
    assert not any(b.flip for b in crop_boxes(144, 176, 5))


@pytest.mark.parametrize("crops", [2, 3, 4, 5])
def test_crops_are_videomae_spatial_steps(crops):
    for h, w in ((144, 176), (240, 320), (320, 240), (17, 31), (31, 17), (10, 10)):
        side, long = min(h, w), max(h, w)
        starts = [videomae_spatial_start(long, side, crops, c) for c in range(crops)]
        if h >= w:
            assert crop_boxes(h, w, crops) == [CropBox(y, 0, side, side) for y in starts]
        else:
            assert crop_boxes(h, w, crops) == [CropBox(0, x, side, side) for x in starts]


def test_one_clip_one_crop_is_the_centre_view():
    """clips=1, crops=1: the deterministic centre view of the validation pass and of the probes (the loaders' rule
    with every draw in the middle of its range, the ``center`` crop)."""
    for short in ("clamp", "reduce_stride"):
        for n, t, s, h, w in ((100, 16, 4, 144, 176), (64, 16, 4, 240, 320), (65, 16, 4, 320, 240), (30, 16, 4, 9, 9),
                              (37, 8, 2, 31, 17), (1, 4, 2, 5, 7)):
            sp = spec(t, s, short)
            (idx, box), = test_views(n, h, w, sp, 1, 1)
            assert idx.tolist() == sample_frame_indices(n, t, s, _Centre(), short).tolist(), (n, t, s, short)
            assert box == sample_crop(_Centre(), h, w, sp), (h, w)


def test_views_are_clip_major_and_errors_are_clear():
    views = test_views(100, 144, 176, spec(4, 5), 3, 2)
    assert [(v[0][0].item(), v[1].x) for v in views] == [(0, 0), (0, 32), (40, 0), (40, 32), (80, 0), (80, 32)]
    with pytest.raises(ValueError, match="clips >= 1"):
        test_views(100, 10, 10, spec(4, 5), 0, 1)
    with pytest.raises(ValueError, match="crops >= 1"):
        test_views(100, 10, 10, spec(4, 5), 1, 0)
    with pytest.raises(ValueError, match="expected one of dense, segment"):
        test_views(100, 10, 10, spec(4, 5), 1, 1, "tsn")


# --- the dataset --------------------------------------------------------------------------------------------------
class FakeSource:
    """Random frames (seeded per frame index) of H x W pixels; records what was read; some videos unreadable."""

    def __init__(self, frames=(40, 9, 25), height=12, width=20, bad=(), wrong_count=()):
        self.frames, self.height, self.width = frames, height, width
        self.bad, self.wrong_count = set(bad), set(wrong_count)
        self.reads = []

    def __len__(self):
        return len(self.frames)

    def label(self, i):
        return i % 3

    def path(self, i):
        return f"fake/{i}.mp4"

    def num_frames(self, i):
        if i in self.bad:
            raise BadVideo("damaged: made unreadable by the test")
        return self.frames[i]

    def frame(self, i, f):
        g = torch.Generator().manual_seed(1000 * i + int(f))
        return torch.randint(0, 256, (self.height, self.width, 3), generator=g, dtype=torch.uint8)

    def read(self, i, indices):
        self.reads.append((i, list(indices)))
        if i in self.wrong_count:
            indices = indices[:-1]
        return torch.stack([self.frame(i, f) for f in indices])


@pytest.mark.parametrize("sampling", ["dense", "segment"])
def test_view_dataset_matches_the_views_and_decodes_once(sampling):
    src = FakeSource()
    sp = spec(4, 3, size=8)
    ds = ViewDataset(src, sp, clips=3, crops=3, sampling=sampling)
    assert len(ds) == 3 and ds.views_per_video == 9
    for i in range(len(ds)):
        item = ds[i]
        assert item["ok"] and item["index"] == i and item["label"] == i % 3 and item["path"] == f"fake/{i}.mp4"
        assert item["views"].shape == (9, 4, 8, 8, 3) and item["views"].dtype == torch.uint8
        expected = test_views(src.frames[i], 12, 20, sp, 3, 3, sampling)
        for got, (idx, box) in zip(item["views"], expected, strict=True):
            want = apply_crop(torch.stack([src.frame(i, f) for f in idx]), box, 8)
            assert torch.equal(got, want)
        (who, what), = [r for r in src.reads if r[0] == i]  # one read per video, of the union, sorted
        union = sorted({int(f) for idx, _ in expected for f in idx})
        assert what == union


def test_view_dataset_reports_bad_videos_without_raising():
    src = FakeSource(frames=(40, 40, 9, 40), bad={1}, wrong_count={3})
    ds = ViewDataset(src, spec(4, 3, "skip", size=8), clips=2, crops=1)
    items = [ds[i] for i in range(4)]
    assert [it["ok"] for it in items] == [True, False, False, False]
    assert "damaged" in items[1]["reason"]
    assert "too short: 9 frames" in items[2]["reason"] and "short_videos=skip" in items[2]["reason"]
    assert "expected (F, H, W, C) uint8" in items[3]["reason"]
    for it in items[1:]:
        assert it["views"].shape == (0, 4, 8, 8, 3) and it["label"] == it["index"] % 3 and it["path"]
