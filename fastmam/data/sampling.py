"""Which frames and which crop: the sampling and augmentation semantics shared by every loader backend.

All choices are drawn here, in Python, from a generator seeded by (seed, index, epoch, attempt), and
then executed by a backend (PyAV / decord on CPU, DALI on the GPU). The backends therefore agree on
what a sample is, and an item is a pure function of its key, which keeps resumed runs exact.

Frames (VideoMAE's rule): ``T`` frames at stride ``s`` from a start drawn uniformly in
``[0, n - T*s]``, i.e. indices ``start + i*s``. Videos shorter than ``T*s`` frames follow
``data.short_videos``:

- ``clamp`` (default, what VideoMAE's loader does): start at frame 0 and repeat the last frame,
  indices ``min(i*s, n-1)``;
- ``reduce_stride``: the largest stride ``s' < s`` with ``T*s' <= n`` (random start as above),
  then ``clamp`` if even stride 1 is too long;
- ``skip``: the video counts as bad data and the sample is replaced.

Dense motion pairs: for each sampled frame ``i``, also frame ``min(i+1, n-1)``.

Trajectories (MME, ``targets.motion: trajectory``): the first frame of each tubelet (indices ``[0::t]``) is tracked
over the ``L`` raw frames after it, which the video must hold. A random start leaves room for them: it is drawn in
``[0, min(n - T*s, n - 1 - L - (T - t)*s)]``, which differs from VideoMAE's range only when ``t*s < L + 1`` (e.g.
stride 2 with t = 2, L = 4: one frame less). So every draw for a video has its trajectories, or none does (fewer
than ``(T - t)*s + L + 1`` frames, clamped or not): a video without them is a property of the video, which the
loaders replace as a bad one, not bad luck of one draw.

Crops, in source-frame pixels, then a bilinear resize (antialiased) to ``img_size`` squared:

- ``multiscale`` (VideoMAE's GroupMultiScaleCrop): the base is the short side; crop width and
  height are each the base times one of ``crop_scales`` (snapped to ``img_size`` within 3 px),
  with at most one step between the two scale indices; the offset is one of 13 fixed positions
  (corners, centre, edge centres and quarter points);
- ``random_resized`` (torchvision's RandomResizedCrop): area fraction in ``rrc_scale``, aspect
  ratio log-uniform in ``rrc_ratio``, 10 tries, then a centre crop;
- ``center``: the central square of the short side (deterministic; evaluation and benchmarks).

Then a horizontal flip with probability 0.5 when ``flip`` is on (keep it off for SSv2, whose
labels name directions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CROPS = ("multiscale", "random_resized", "center")
SHORT_POLICIES = ("clamp", "reduce_stride", "skip")


class TooShort(ValueError):
    """A video has fewer frames than the sampling needs and the policy is ``skip``."""


@dataclass(frozen=True)
class SamplingSpec:
    """Everything that decides a sample, from ``data.*`` (see ``spec_from_config``)."""

    num_frames: int = 16
    stride: int = 4
    img_size: int = 224
    crop: str = "multiscale"
    crop_scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    repeated: int = 1
    short_videos: str = "clamp"
    dense: bool = False
    seed: int = 0
    tubelet: int = 1  # t: frames per tubelet, whose first frame starts a trajectory
    trajectory_length: int = 0  # L raw frames tracked from each tubelet's first frame (MME); 0: no trajectories


@dataclass(frozen=True)
class CropBox:
    """A crop of the source frame: rows ``y .. y+h``, columns ``x .. x+w``; then ``flip`` after resizing."""

    y: int
    x: int
    h: int
    w: int
    flip: bool = False


def spec_from_config(cfg) -> SamplingSpec:
    d = cfg.data
    return SamplingSpec(
        num_frames=d.num_frames, stride=d.stride, img_size=d.img_size, crop=d.crop,
        crop_scales=tuple(d.crop_scales), rrc_scale=tuple(d.rrc_scale), rrc_ratio=tuple(d.rrc_ratio),
        flip=d.flip, repeated=d.repeated_sampling, short_videos=d.short_videos,
        dense=cfg.targets.motion == "rgb_diff_dense", seed=cfg.seed, tubelet=cfg.model.tubelet,
        trajectory_length=cfg.targets.trajectory_length if cfg.targets.motion == "trajectory" else 0,
    )


def sample_rng(seed: int, index: int, epoch: int, attempt: int) -> np.random.Generator:
    """The generator of one sample attempt: a pure function of its key."""
    return np.random.default_rng([seed, index, epoch, attempt])


def sample_frame_indices(num_video_frames: int, num_frames: int, stride: int, rng: np.random.Generator,
                         short_videos: str = "clamp", tubelet: int = 1, trajectory_length: int = 0) -> np.ndarray:
    """Frame indices (num_frames,) int64 into a video of ``num_video_frames`` frames (module docstring); with
    ``trajectory_length`` L > 0 the random start leaves L frames after the last tubelet's first frame."""
    n = num_video_frames
    if n < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got {n}")
    if short_videos not in SHORT_POLICIES:
        raise ValueError(f"short_videos='{short_videos}'; expected one of {', '.join(SHORT_POLICIES)}")
    span = num_frames * stride
    if n < span:
        if short_videos == "skip":
            raise TooShort(f"too short: {n} frames < {num_frames} frames x stride {stride} (data.short_videos=skip)")
        if short_videos == "reduce_stride":
            stride = max(1, n // num_frames)
            span = num_frames * stride
    if n >= span:
        last = n - span
        if trajectory_length:  # frame (T - t)*s of the clip starts the last trajectory: L frames must follow it
            last = max(0, min(last, n - 1 - trajectory_length - (num_frames - tubelet) * stride))
        start = int(rng.integers(0, last + 1))
        return start + stride * np.arange(num_frames, dtype=np.int64)
    return np.minimum(stride * np.arange(num_frames, dtype=np.int64), n - 1)


def next_frame_indices(indices: np.ndarray, num_video_frames: int) -> np.ndarray:
    """For dense motion: the frame right after each sampled one (the last frame repeats at the end)."""
    return np.minimum(indices + 1, num_video_frames - 1)


def _multiscale_box(rng: np.random.Generator, height: int, width: int, size: int, scales) -> tuple[int, int, int, int]:
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    snap = [size if abs(c - size) < 3 else c for c in sizes]
    pairs = [(snap[i], snap[j]) for i in range(len(snap)) for j in range(len(snap)) if abs(i - j) <= 1]
    ch, cw = pairs[int(rng.integers(len(pairs)))]
    ch, cw = min(ch, height), min(cw, width)
    hs, ws = (height - ch) // 4, (width - cw) // 4
    offsets = [(0, 0), (0, 4 * ws), (4 * hs, 0), (4 * hs, 4 * ws), (2 * hs, 2 * ws),  # corners, centre
               (2 * hs, 0), (2 * hs, 4 * ws), (4 * hs, 2 * ws), (0, 2 * ws),  # edge centres
               (hs, ws), (hs, 3 * ws), (3 * hs, ws), (3 * hs, 3 * ws)]  # quarter points
    y, x = offsets[int(rng.integers(len(offsets)))]
    return y, x, ch, cw


def _random_resized_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def sample_crop(rng: np.random.Generator, height: int, width: int, spec: SamplingSpec) -> CropBox:
    """One crop box (and flip) for a source frame of ``height`` x ``width`` pixels."""
    if spec.crop == "multiscale":
        y, x, h, w = _multiscale_box(rng, height, width, spec.img_size, spec.crop_scales)
    elif spec.crop == "random_resized":
        y, x, h, w = _random_resized_box(rng, height, width, spec.rrc_scale, spec.rrc_ratio)
    elif spec.crop == "center":
        side = min(height, width)
        y, x, h, w = (height - side) // 2, (width - side) // 2, side, side
    else:
        raise ValueError(f"crop='{spec.crop}'; expected one of {', '.join(CROPS)}")
    flip = bool(rng.random() < 0.5) if spec.flip else False
    return CropBox(y, x, h, w, flip)


def apply_crop(frames: torch.Tensor, box: CropBox, size: int) -> torch.Tensor:
    """frames: (F, H, W, C) uint8 -> (F, size, size, C) uint8: crop, bilinear antialiased resize, flip.

    The reference for every backend's augmentation; it runs in CPU loader workers."""
    crop = frames[:, box.y : box.y + box.h, box.x : box.x + box.w]
    if crop.shape[1] != size or crop.shape[2] != size:
        x = crop.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        crop = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    if box.flip:
        crop = crop.flip(2)
    return crop.contiguous()
