"""Tests for the procedural moving-shapes dataset (CPU, small clips, fast)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastmam.data.synthetic import MOTIONS, SyntheticShapes


def first_index_of(ds: SyntheticShapes, motion: str, skip: int = 0) -> int:
    """The index of the (skip+1)-th item whose label is ``motion``."""
    found = [i for i in range(len(ds)) if MOTIONS[ds.trajectory(i).label] == motion]
    assert len(found) > skip, f"no item {skip} of class {motion} among {len(ds)}"
    return found[skip]


def main_shape_centroids(video: torch.Tensor, color: np.ndarray) -> np.ndarray:
    """Per-frame (x, y) centroid of the pixels showing the main shape's colour, float64 (T, 2)."""
    v = video.numpy().astype(np.int32)
    mask = np.abs(v - color.astype(np.int32)).max(axis=-1) <= 2  # (T, H, W); fully covered pixels only
    assert mask.reshape(len(v), -1).sum(1).min() > 0, "the main shape is not visible in some frame"
    ys, xs = np.mgrid[0 : v.shape[1], 0 : v.shape[2]] + 0.5
    area = mask.sum((1, 2))
    return np.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], axis=1)


@pytest.mark.parametrize("t,h,w", [(8, 64, 64), (1, 32, 48), (4, 8, 8), (3, 40, 24), (16, 96, 80)])
def test_item_shape_dtype_contiguity(t, h, w):
    ds = SyntheticShapes(5, t, h, w, seed=1)
    assert len(ds) == 5
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"video", "label", "index"}
        video = item["video"]
        assert video.shape == (t, h, w, 3) and video.dtype == torch.uint8 and video.is_contiguous()
        assert isinstance(item["label"], int) and 0 <= item["label"] < len(MOTIONS)
        assert item["index"] == i


def test_values_span_the_range_and_background_is_not_flat():
    ds = SyntheticShapes(20, 2, 64, 64, seed=2)
    for i in range(len(ds)):
        frame = ds[i]["video"][0].numpy().astype(np.int32)
        assert frame.max() - frame.min() >= 100, "shape and background should be far apart in colour"
        # The main shape never covers a corner; the background gradient makes the corners differ.
        corners = frame[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners.max(0) - corners.min(0)).max() >= 10


def test_same_seed_and_index_give_identical_clips_in_any_order():
    a, b = SyntheticShapes(12, 4, 32, 40, seed=7), SyntheticShapes(12, 4, 32, 40, seed=7)
    forward = [a[i] for i in range(len(a))]
    backward = [b[i] for i in reversed(range(len(b)))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert torch.equal(x["video"], y["video"]) and x["label"] == y["label"] and x["index"] == y["index"]
    assert torch.equal(a[-1]["video"], a[11]["video"]) and a[-1]["index"] == 11


def test_dataloader_workers_reproduce_the_main_process():
    ds = SyntheticShapes(8, 2, 16, 16, seed=3)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, shuffle=False))
    videos = torch.cat([b["video"] for b in batches])
    assert torch.equal(videos, torch.stack([ds[i]["video"] for i in range(len(ds))]))
    assert torch.cat([b["label"] for b in batches]).tolist() == [ds[i]["label"] for i in range(len(ds))]


def test_different_seed_or_index_gives_different_clips():
    a, b = SyntheticShapes(10, 4, 32, 32, seed=0), SyntheticShapes(10, 4, 32, 32, seed=1)
    clips = [a[i]["video"] for i in range(len(a))]
    for i in range(len(a)):
        assert not torch.equal(clips[i], b[i]["video"])
        for j in range(i):
            assert not torch.equal(clips[i], clips[j])


def test_labels_cover_all_motions_roughly_uniformly():
    ds = SyntheticShapes(200, 2, 8, 8, seed=0)
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert all(0 <= label < len(MOTIONS) for label in labels)
    counts = np.bincount(labels, minlength=len(MOTIONS))
    assert counts.min() >= 5, f"class counts too uneven: {dict(zip(MOTIONS, counts.tolist(), strict=True))}"


@pytest.mark.parametrize("motion,direction", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))])
def test_translation_moves_the_shape_in_the_stated_direction(motion, direction):
    ds = SyntheticShapes(120, 8, 64, 72, seed=5)
    for skip in range(3):
        index = first_index_of(ds, motion, skip)
        traj = ds.trajectory(index)
        step = np.diff(traj.center, axis=0)  # (T-1, 2) px per frame
        along, across = (0, 1) if direction[1] == 0 else (1, 0)
        assert np.all(step[:, along] * sum(direction) >= 0.5), f"{motion}: speed too low or wrong sign"
        assert np.all(step[:, across] == 0)
        assert np.allclose(step, step[0]), "translation should be at constant speed"
        # The rendered pixels follow the ground truth.
        measured = main_shape_centroids(ds[index]["video"], traj.color)
        assert np.abs(measured - traj.center).max() < 1.0
        moved = measured[-1] - measured[0]
        assert moved[along] * sum(direction) > 0.8 * abs(traj.center[-1, along] - traj.center[0, along])


def test_static_clips_have_identical_frames():
    ds = SyntheticShapes(80, 6, 32, 32, seed=4)
    for skip in range(3):
        index = first_index_of(ds, "static", skip)
        video, traj = ds[index]["video"], ds.trajectory(index)
        assert all(torch.equal(video[0], frame) for frame in video[1:])
        assert np.ptp(traj.center, axis=0).max() == 0 and np.ptp(traj.angle) == 0 and np.ptp(traj.radius) == 0


@pytest.mark.parametrize("motion", ["rotate_cw", "rotate_ccw", "grow", "shrink"])
def test_rotation_and_scaling_change_every_frame(motion):
    ds = SyntheticShapes(120, 6, 48, 48, seed=6)
    for skip in range(3):
        index = first_index_of(ds, motion, skip)
        video, traj = ds[index]["video"], ds.trajectory(index)
        assert all(not torch.equal(video[k], video[k + 1]) for k in range(len(video) - 1))
        assert np.ptp(traj.center, axis=0).max() == 0, "only translation classes move the centre"
        d_angle, d_radius = np.diff(traj.angle), np.diff(traj.radius)
        if motion.startswith("rotate"):
            assert traj.shape != "circle"
            sign = 1 if motion == "rotate_cw" else -1  # increasing angle = clockwise in y-down coordinates
            assert np.all(sign * np.degrees(d_angle) >= 3) and np.all(d_radius == 0)
        else:
            sign = 1 if motion == "grow" else -1
            assert np.all(sign * d_radius / traj.radius[:-1] >= 0.005) and np.all(d_angle == 0)


def test_rendered_size_matches_the_ground_truth_radius():
    ds = SyntheticShapes(30, 4, 96, 96, seed=9)
    sides = {"square": 4, "triangle": 3}
    for i in range(len(ds)):
        traj = ds.trajectory(i)
        v = ds[i]["video"].numpy().astype(np.int32)
        area = (np.abs(v - traj.color.astype(np.int32)).max(-1) <= 2).sum((1, 2))
        # Fully covered pixels are those at least half a pixel inside the outline: erode the ideal shape by 0.5.
        if traj.shape == "circle":
            ideal = np.pi * (traj.radius - 0.5) ** 2
        else:
            k = sides[traj.shape]
            ideal = k * np.tan(np.pi / k) * (traj.radius * np.cos(np.pi / k) - 0.5) ** 2
        assert np.all(np.abs(area - ideal) <= 0.1 * ideal + 4), (traj.shape, area, ideal)


@pytest.mark.parametrize("t,h,w", [(16, 64, 64), (32, 8, 8), (8, 24, 96)])
def test_main_shape_stays_inside_the_frame(t, h, w):
    ds = SyntheticShapes(60, t, h, w, seed=8)
    for i in range(len(ds)):
        traj = ds.trajectory(i)
        assert traj.center.shape == (t, 2) and traj.angle.shape == (t,) and traj.radius.shape == (t,)
        x, y, r = traj.center[:, 0], traj.center[:, 1], traj.radius
        assert np.all(x - r >= 0) and np.all(x + r <= w) and np.all(y - r >= 0) and np.all(y + r <= h)
        assert np.all(2 * r >= 0.15 * min(h, w) * (0.4 if MOTIONS[traj.label] == "shrink" else 1))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_frames": 0}, "num_frames"),
        ({"height": 7}, "height"),
        ({"width": 4}, "width"),
        ({"width": 32.0}, "width"),
        ({"num_frames": True}, "num_frames"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"num_samples": 4, "num_frames": 2, "height": 16, "width": 16, **kwargs}
    value = kwargs[name]
    with pytest.raises(ValueError, match=rf"{name}={value!r}.*expected an int >= \d"):
        SyntheticShapes(**args)


@pytest.mark.parametrize("index", [5, 6, -6, 100])
def test_out_of_range_index_raises_index_error(index):
    ds = SyntheticShapes(5, 2, 16, 16)
    with pytest.raises(IndexError, match=rf"index {index}\b.*length 5"):
        ds[index]
    with pytest.raises(IndexError, match=rf"index {index}\b"):
        ds.trajectory(index)
