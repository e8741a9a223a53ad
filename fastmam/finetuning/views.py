"""Which frames and crops a fine-tuned classifier sees: TSN segment sampling and the multi-view test (DESIGN §11).

Two frame rules, as VideoMAE uses them:

- ``dense`` (Kinetics, UCF101, HMDB51): ``T`` frames at stride ``s``. Training draws the start at random
  (``fastmam.data.sampling.sample_frame_indices``). The test takes ``K`` clips evenly spaced over the video, VideoMAE's
  ``kinetics.py`` test mode: on the grid of frames ``0, s, 2s, ...`` (``L = ceil(n / s)`` of them) clip ``k`` starts
  at grid position ``int(k * (L - T) / (K - 1))``, i.e. frame indices ``s * (start + arange(T))``. One clip
  (``K = 1``, which VideoMAE's formula divides by zero on) is the centre clip: the loaders' own rule with the start
  in the middle of its range, ``(n - T*s) // 2`` — the view of the validation pass and of the probes. A video
  shorter than ``T*s`` frames follows ``data.short_videos`` as in training: ``clamp`` repeats the last frame
  (indices ``min(i*s, n-1)``, the same for every clip), ``reduce_stride`` lowers the stride to ``n // T`` first,
  ``skip`` makes the video a bad one (``TooShort``).
- ``segment`` (Something-Something v2, TSN): the video is cut into ``T`` equal segments of ``tick = n / T`` frames
  and one frame is taken from each (``segment_indices``). Training: a random frame in each segment (VideoMAE's
  integer segments ``n // T`` long). Test: clip ``k`` of ``K`` takes the frame at offset ``o_k`` of every segment,
  ``int(tick * x + tick * o_k)``, with ``o_k = (k + (K mod 2) / 2) / K``: the offsets are evenly spaced by ``1/K``
  and always include the segment centre ``1/2``. ``K = 1`` is the segment centres and ``K = 2`` gives offsets 0 and
  1/2, exactly VideoMAE's ``ssv2.py`` test (``all_index[chunk_nb::2]`` of the sorted starts and centres). Short
  videos (``n < T``) repeat frames; ``data.short_videos=skip`` makes them bad videos instead.

Crops, in source pixels (then resized to ``img_size`` with ``sampling.apply_crop``, no flip): ``C`` squares whose
side is the short side, evenly spaced along the long side. Crop ``c`` of ``C >= 2`` starts at
``int(c * (long - short) / (C - 1))`` (VideoMAE's ``spatial_step``; ``C = 3``: start, centre, end); one crop is the
centre square ``(long - short) // 2``, ``sampling``'s ``center`` crop.

A video's ``K x C`` views are clip-major: view ``k * C + c`` is clip ``k`` in crop ``c``. ``clips = crops = 1`` is
exactly the deterministic centre view.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.decode import BadVideo
from ..data.sampling import SHORT_POLICIES, CropBox, SamplingSpec, TooShort, apply_crop, sample_frame_indices
from .sources import VideoSource

SAMPLINGS = ("dense", "segment")


class _Midpoint:
    """Stands in for the generator of ``sample_frame_indices``: each draw is the middle of its range, so the loaders'
    own rule (stride, short videos) gives the centre clip (the same trick as ``fastmam.probe``)."""

    @staticmethod
    def integers(low: int, high: int | None = None) -> int:
        low, high = (0, low) if high is None else (low, high)
        return (low + high - 1) // 2


def _check_counts(clips: int, crops: int) -> None:
    for what, value in (("clips", clips), ("crops", crops)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"the multi-view test needs {what} >= 1 (an integer), got {value!r}; "
                             "clips=1 crops=1 is the single centre view")


def segment_indices(num_video_frames: int, num_frames: int, rng: np.random.Generator | None = None,
                    clip: int = 0, clips: int = 1) -> np.ndarray:
    """TSN segment sampling (module docstring) -> frame indices (num_frames,) int64, non-decreasing, in [0, n).

    ``rng`` given: training, a random frame in each segment (``clip``/``clips`` ignored). ``rng`` None: test clip
    ``clip`` of ``clips`` (0-based). A video with fewer frames than ``num_frames`` repeats frames."""
    n, t = num_video_frames, num_frames
    if n < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got {n}")
    if t < 1:
        raise ValueError(f"num_frames must be at least 1, got {t}")
    if rng is not None:
        segment = n // t
        if segment > 0:  # VideoMAE's ssv2.py: integer segments, the tail n - T * (n // T) is never drawn
            return segment * np.arange(t, dtype=np.int64) + rng.integers(segment, size=t).astype(np.int64)
        # VideoMAE returns frame 0 T times here; a random frame in each fractional segment keeps the time order
        tick = n / t
        return np.minimum((tick * (np.arange(t) + rng.random(t))).astype(np.int64), n - 1)
    _check_counts(clips, 1)
    if not 0 <= clip < clips:
        raise ValueError(f"clip={clip} is not one of the {clips} temporal clips (0..{clips - 1})")
    tick = n / float(t)
    offset = (clip + (clips % 2) / 2.0) / clips
    # the same float expression as VideoMAE's int(tick / 2.0 + tick * x) (tick * 0.5 == tick / 2.0 exactly)
    indices = [int(tick * x + tick * offset) for x in range(t)]
    return np.minimum(np.asarray(indices, dtype=np.int64), n - 1)


def dense_clip_indices(num_video_frames: int, spec: SamplingSpec, clips: int) -> list[np.ndarray]:
    """The ``clips`` test clips of the dense rule (module docstring) -> ``clips`` arrays (spec.num_frames,) int64.

    Raises ``TooShort`` for a video shorter than ``num_frames * stride`` under ``short_videos=skip``."""
    _check_counts(clips, 1)
    n, t, s = num_video_frames, spec.num_frames, spec.stride
    if clips == 1:
        return [sample_frame_indices(n, t, s, _Midpoint(), spec.short_videos)]
    if n < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got {n}")
    if spec.short_videos not in SHORT_POLICIES:
        raise ValueError(f"short_videos='{spec.short_videos}'; expected one of {', '.join(SHORT_POLICIES)}")
    if n < t * s:
        if spec.short_videos == "skip":
            raise TooShort(f"too short: {n} frames < {t} frames x stride {s} (data.short_videos=skip)")
        if spec.short_videos == "reduce_stride":
            s = max(1, n // t)
        if n < t * s:  # clamp: every clip is the clamped one
            return [np.minimum(s * np.arange(t, dtype=np.int64), n - 1)] * clips
    grid = math.ceil(n / s)  # len(range(0, n, s)), >= t here
    step = max(1.0 * (grid - t) / (clips - 1), 0)  # VideoMAE's temporal_step, the same float expression
    return [s * (int(k * step) + np.arange(t, dtype=np.int64)) for k in range(clips)]


def segment_clip_indices(num_video_frames: int, spec: SamplingSpec, clips: int) -> list[np.ndarray]:
    """The ``clips`` test clips of the segment rule -> ``clips`` arrays (spec.num_frames,) int64 (``spec.stride``
    is not used). Raises ``TooShort`` for fewer than ``num_frames`` frames under ``short_videos=skip``."""
    if spec.short_videos == "skip" and num_video_frames < spec.num_frames:
        raise TooShort(f"too short: {num_video_frames} frames < {spec.num_frames} segments (data.short_videos=skip)")
    return [segment_indices(num_video_frames, spec.num_frames, None, k, clips) for k in range(clips)]


def crop_boxes(height: int, width: int, crops: int) -> list[CropBox]:
    """``crops`` squares of side min(height, width) evenly spaced along the long side (module docstring), no flip."""
    _check_counts(1, crops)
    if height < 1 or width < 1:
        raise ValueError(f"a frame needs a positive size to crop, got {height}x{width}")
    side = min(height, width)
    room = max(height, width) - side
    if crops == 1:
        starts = [room // 2]  # sampling's "center" crop
    else:
        step = 1.0 * room / (crops - 1)  # VideoMAE's spatial_step
        starts = [int(c * step) for c in range(crops)]
    # VideoMAE crops along the height when height >= width
    if height >= width:
        return [CropBox(y, 0, side, side) for y in starts]
    return [CropBox(0, x, side, side) for x in starts]


def clip_indices(num_video_frames: int, spec: SamplingSpec, clips: int, sampling: str) -> list[np.ndarray]:
    """The temporal clips of the test under ``sampling`` ('dense' or 'segment') -> ``clips`` arrays (T,) int64."""
    if sampling == "dense":
        return dense_clip_indices(num_video_frames, spec, clips)
    if sampling == "segment":
        return segment_clip_indices(num_video_frames, spec, clips)
    raise ValueError(f"sampling='{sampling}'; expected one of {', '.join(SAMPLINGS)} "
                     "(dense: frames at a stride, Kinetics-style; segment: TSN segments, SSv2-style)")


def test_views(num_video_frames: int, height: int, width: int, spec: SamplingSpec, clips: int, crops: int,
               sampling: str = "dense") -> list[tuple[np.ndarray, CropBox]]:
    """The ``clips x crops`` views of a video of ``num_video_frames`` frames of ``height x width`` pixels, clip-major:
    item ``k * crops + c`` = (frame indices (spec.num_frames,) int64 of clip k, crop box c in source pixels)."""
    frames = clip_indices(num_video_frames, spec, clips, sampling)
    boxes = crop_boxes(height, width, crops)
    return [(idx, box) for idx in frames for box in boxes]


test_views.__test__ = False  # a library function, not a pytest test, whatever imports it


class ViewDataset(Dataset):
    """Every view of every video of ``source`` for the multi-view test.

    Item i -> {"views": (clips*crops, T, S, S, C) uint8 (clip-major, S = spec.img_size), "label": int, "index": i,
    "ok": bool, "path": str, "reason": str}. The union of the frames the views need is decoded once per video. A
    video that cannot serve (``BadVideo`` from the source, too short under ``short_videos=skip``, a decoder that
    returns the wrong frames) gives ok False, empty views (0, T, S, S, 3) and the reason: it is never replaced and
    never raises, so that the test can count it."""

    def __init__(self, source: VideoSource, spec: SamplingSpec, clips: int = 1, crops: int = 1,
                 sampling: str = "dense"):
        _check_counts(clips, crops)
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling='{sampling}'; expected one of {', '.join(SAMPLINGS)}")
        self.source, self.spec = source, spec
        self.clips, self.crops, self.sampling = clips, crops, sampling

    @property
    def views_per_video(self) -> int:
        return self.clips * self.crops

    def describe(self) -> str:
        return (f"{len(self)} videos x {self.clips} clips x {self.crops} crops ({self.sampling} sampling, "
                f"{self.spec.num_frames} frames" + (f" at stride {self.spec.stride}" if self.sampling == "dense"
                                                    else "") + f", {self.spec.img_size} px)")

    def __len__(self) -> int:
        return len(self.source)

    def _bad(self, i: int, reason: str) -> dict:
        s = self.spec
        return {"views": torch.empty((0, s.num_frames, s.img_size, s.img_size, 3), dtype=torch.uint8),
                "label": int(self.source.label(i)), "index": i, "ok": False, "path": self.source.path(i),
                "reason": reason}

    def __getitem__(self, i: int) -> dict:
        src, size = self.source, self.spec.img_size
        try:
            clips = clip_indices(src.num_frames(i), self.spec, self.clips, self.sampling)
            wanted, where = np.unique(np.concatenate(clips), return_inverse=True)
            frames = src.read(i, wanted)
        except (BadVideo, TooShort) as exc:
            return self._bad(i, str(exc))
        if frames.dim() != 4 or frames.shape[0] != len(wanted) or frames.dtype != torch.uint8:
            return self._bad(i, f"the decoder returned {tuple(frames.shape)} {frames.dtype} for {len(wanted)} "
                                "frames; expected (F, H, W, C) uint8")
        where = torch.from_numpy(where.reshape(len(clips), -1))
        views = []
        per_crop = [apply_crop(frames, box, size) for box in crop_boxes(frames.shape[1], frames.shape[2], self.crops)]
        for k in range(len(clips)):
            views.extend(cropped[where[k]] for cropped in per_crop)
        return {"views": torch.stack(views), "label": int(src.label(i)), "index": i, "ok": True,
                "path": src.path(i), "reason": ""}
