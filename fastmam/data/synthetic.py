"""Procedural "moving / rotating shapes" clips: the embedded default dataset (no files needed).

Every clip shows one main shape (circle, square or equilateral triangle) over a smoothly shaded
background, plus 0-2 small static distractor shapes. The main shape performs one motion class from
``MOTIONS``, which is also the clip's label:

- ``static``: nothing moves, all frames are identical;
- ``left`` / ``right`` / ``up`` / ``down``: constant-speed translation (image axes: x to the right,
  y downwards, so ``up`` decreases y);
- ``rotate_cw`` / ``rotate_ccw``: rotation about the centre as seen on screen (squares and triangles
  only, since a rotating circle would look static);
- ``grow`` / ``shrink``: geometric change of the size by a few percent per frame.

The shape stays entirely inside the frame for the whole clip. Determinism: every random choice of
item ``i`` comes from ``np.random.default_rng([seed, i])``, never from global state, so the same
(seed, index) gives a bit-identical clip whatever the access order, process or DataLoader worker.
Coordinates are in pixels with pixel ``(row, col)`` centred at ``(x, y) = (col + 0.5, row + 0.5)``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

MOTIONS: tuple[str, ...] = ("static", "left", "right", "up", "down", "rotate_cw", "rotate_ccw", "grow", "shrink")

_SIDES = {"square": 4, "triangle": 3}  # regular polygons; "circle" is handled separately
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_MIN_COLOR_DIST = 150.0  # RGB L2 distance from the background colour; the shading adds at most ~80


@dataclass(frozen=True)
class Trajectory:
    """Ground truth of one clip's main shape (T = num_frames).

    ``center``: float64 (T, 2) as (x, y) pixels; ``angle``: float64 (T,) radians, increasing = clockwise
    on screen; ``radius``: float64 (T,) circumradius in pixels; ``color``: uint8 (3,) RGB.
    """

    label: int
    shape: str
    color: np.ndarray
    center: np.ndarray
    angle: np.ndarray
    radius: np.ndarray


def _coverage(shape: str, cx, cy, angle, radius, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape on the pixel grid.

    ``cx, cy, angle, radius`` are float32 arrays of shape (N, 1, 1) (one shape per frame), ``xs`` is (1, 1, W) and
    ``ys`` is (1, H, 1); returns float32 (N, H, W). A (signed) distance to the outline, clipped to a one-pixel ramp,
    gives smooth edges so that sub-pixel motion still changes the pixels.
    """
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        dist = np.sqrt(dx * dx + dy * dy) - radius
    else:
        # A regular k-gon is the intersection of k half-planes at distance apothem from the centre.
        k = _SIDES[shape]
        dist = None
        for i in range(k):
            phi = angle + (2 * i + 1) * math.pi / k
            side = dx * np.cos(phi) + dy * np.sin(phi)
            dist = side if dist is None else np.maximum(dist, side)
        dist = dist - radius * np.float32(math.cos(math.pi / k))
    return np.clip(np.float32(0.5) - dist, 0.0, 1.0)


def _distinct_color(rng: np.random.Generator, others: list[np.ndarray], min_dist: float) -> np.ndarray:
    """A random RGB colour (float32 (3,)) at least ``min_dist`` away from each colour in ``others``."""
    for _ in range(100):
        color = rng.uniform(0, 255, 3).astype(np.float32)
        if all(np.linalg.norm(color - o) >= min_dist for o in others):
            return color
    # Practically unreachable; the opposite corner of the RGB cube is far from the first colour.
    return np.where(others[0] > 127.5, 0.0, 255.0).astype(np.float32)


class SyntheticShapes(Dataset):
    """Procedural clips of moving/rotating shapes with known motion classes.

    Each item is a dict: {"video": uint8 tensor (T, H, W, 3), contiguous,
                          "label": int  (index into MOTIONS), "index": int}.
    With ``trajectories=(tubelet, L)`` items also hold ``"trajectories"`` float32 (T/t, H/8, W/8, L, 2) and
    ``"trajectory_valid"`` bool (T/t, H/8, W/8): the true trajectories of ``true_trajectories`` (MME's target).
    Item i depends only on (seed, i): same seed and index => bit-identical clip,
    whatever the order of access, the process or the DataLoader worker.
    Negative indices count from the end, as for Python lists ("index" is then the non-negative one).
    """

    def __init__(self, num_samples: int, num_frames: int, height: int, width: int, seed: int = 0,
                 trajectories: tuple[int, int] | None = None):
        for name, value, low in (
            ("num_samples", num_samples, 1),
            ("num_frames", num_frames, 1),
            ("height", height, 8),
            ("width", width, 8),
            ("seed", seed, 0),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"SyntheticShapes: {name}={value!r} is invalid; expected an int >= {low}")
        self.num_samples, self.num_frames = int(num_samples), int(num_frames)
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        # Pixel-centre coordinates, shaped to broadcast against per-frame (T, 1, 1) parameters.
        self._xs = (np.arange(self.width, dtype=np.float32) + 0.5)[None, None, :]
        self._ys = (np.arange(self.height, dtype=np.float32) + 0.5)[None, :, None]
        self.trajectories = trajectories  # (tubelet, L): items also carry their true trajectories
        if trajectories is not None:
            tubelet, length = trajectories
            self.true_trajectories(0, tubelet, length)  # checks the arguments now, not in a loader worker

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        traj, static = self._sample(index)
        f32 = lambda a: a.astype(np.float32)[:, None, None]
        alpha = _coverage(
            traj.shape,
            f32(traj.center[:, 0]),
            f32(traj.center[:, 1]),
            f32(traj.angle),
            f32(traj.radius),
            self._xs,
            self._ys,
        )[..., None]
        frames = static[None] + alpha * (traj.color.astype(np.float32) - static[None])
        video = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
        item = {"video": torch.from_numpy(np.ascontiguousarray(video)), "label": traj.label, "index": index}
        if self.trajectories is not None:
            disp, valid = self.true_trajectories(index, *self.trajectories)
            item["trajectories"], item["trajectory_valid"] = torch.from_numpy(disp), torch.from_numpy(valid)
        return item

    def trajectory(self, index: int) -> Trajectory:
        """The main shape's ground-truth label, kind, colour and per-frame centre/angle/radius for item ``index``."""
        return self._sample(self._check_index(index))[0]

    def true_trajectories(self, index: int, tubelet: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The true point trajectories of item ``index`` in the format of ``fastmam.ops.trajectory_target``:
        ``disp`` float32 (T/t, H/8, W/8, L, 2) and ``valid`` bool (T/t, H/8, W/8).

        Points sit on the 8-px grid at offset 4 of ``fastmam.data.trajectories`` (x = 4 + 8 i, y = 4 + 8 j in this
        module's coordinates: the centres of the 8 x 8 cells). For each tubelet's first frame f = 0, t, 2t, ...,
        a point **on the main shape** at frame f -- the shape's anti-aliased coverage there is >= 0.5, i.e. the
        point is inside the outline -- moves with the shape's rigid motion: rotation by angle(s) - angle(f) about
        the centre, scaling by radius(s) / radius(f) about it, and the centre's translation, for s = f + 1 .. f + L;
        ``disp[., ., ., k]`` is its exact position at f + k + 1 minus that at f + k ((dx, dy) px, x right, y down).
        Every other point (background, static distractors) does not move: 0. The motion is closed-form, so frames
        past the clip's last one (the last tubelet's trajectories need up to T - t + L) are evaluated from the same
        parameters; the clip's pixels are unchanged. A point is **valid** when it stays inside the frame, 0 <= x < W
        and 0 <= y < H, at every one of its L steps (the extractor's rule). A background point that the shape later
        covers keeps 0 and stays valid: its true motion is none (optical flow would follow the occluder instead).
        """
        if isinstance(tubelet, bool) or not isinstance(tubelet, int) or tubelet < 1 or self.num_frames % tubelet:
            raise ValueError(f"tubelet={tubelet!r} must be a positive int dividing num_frames={self.num_frames}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length={length!r} must be an int >= 1 (steps L of each trajectory)")
        traj = self._sample(self._check_index(index), extra=length)[0]
        gx = 4.0 + 8.0 * np.arange(self.width // 8)  # (Gx,)
        gy = 4.0 + 8.0 * np.arange(self.height // 8)  # (Gy,)
        px, py = np.broadcast_arrays(gx[None, :], gy[:, None])  # (Gy, Gx)
        starts = np.arange(0, self.num_frames, tubelet)
        disp = np.zeros((len(starts), len(gy), len(gx), length, 2))
        valid = np.ones((len(starts), len(gy), len(gx)), dtype=bool)
        for n, f in enumerate(starts):
            cx, cy, a0, r0 = traj.center[f, 0], traj.center[f, 1], traj.angle[f], traj.radius[f]
            on = _coverage(traj.shape, cx, cy, a0, r0, gx[None, :], gy[:, None]) >= 0.5
            pos = [np.stack([px, py], -1)]
            for s in range(f + 1, f + length + 1):
                da, k = traj.angle[s] - a0, traj.radius[s] / r0
                rx, ry = px - cx, py - cy
                x = traj.center[s, 0] + k * (math.cos(da) * rx - math.sin(da) * ry)
                y = traj.center[s, 1] + k * (math.sin(da) * rx + math.cos(da) * ry)
                pos.append(np.where(on[..., None], np.stack([x, y], -1), pos[0]))
            pos = np.stack(pos, 2)  # (Gy, Gx, L + 1, 2)
            disp[n] = pos[:, :, 1:] - pos[:, :, :-1]
            valid[n] = ((pos[..., 0] >= 0) & (pos[..., 0] < self.width) & (pos[..., 1] >= 0)
                        & (pos[..., 1] < self.height)).all(-1)
        return disp.astype(np.float32), valid

    def _check_index(self, index) -> int:
        index = operator.index(index)
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"SyntheticShapes: index {index} is out of range for length {self.num_samples}")
        return index % self.num_samples

    def _sample(self, index: int, extra: int = 0) -> tuple[Trajectory, np.ndarray]:
        """Draws all of item ``index``'s parameters; returns its trajectory and the static layer float32 (H, W, 3).

        ``extra`` > 0 evaluates the (closed-form) motion ``extra`` frames past the clip's last one, with the same
        parameters: the trajectory arrays then hold T + extra frames (the clip's pixels use ``extra = 0``)."""
        rng = np.random.default_rng([self.seed, index])
        T, H, W = self.num_frames, self.height, self.width
        m = min(H, W)
        t = np.arange(T + extra, dtype=np.float64)
        label = int(rng.integers(len(MOTIONS)))
        motion = MOTIONS[label]

        # Background: a flat colour plus a linear gradient and one low-frequency wave, so no patch is constant.
        bg_color = rng.uniform(50, 205, 3).astype(np.float32)
        u = (self._xs[0] / W) * 2 - 1  # (1, W) in [-1, 1]
        v = (self._ys[0] / H) * 2 - 1  # (H, 1)
        grad_dir, wave_dir = rng.uniform(0, 2 * math.pi, 2)
        grad_amp = (rng.uniform(15, 35, 3) * rng.choice([-1.0, 1.0], 3)).astype(np.float32)
        wave_amp = rng.uniform(-12, 12, 3).astype(np.float32)
        freq, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * math.pi)
        ramp = (math.cos(grad_dir) * u + math.sin(grad_dir) * v)[..., None]
        wave = np.sin(2 * math.pi * freq * (math.cos(wave_dir) * u + math.sin(wave_dir) * v) + phase)[..., None]
        static = np.clip(bg_color + grad_amp * ramp + wave_amp * wave, 0, 255).astype(np.float32)

        # Main shape; rotations use polygons so that they are visible.
        shape = str(rng.choice(["square", "triangle"] if motion.startswith("rotate") else list(_SIDES) + ["circle"]))
        color = _distinct_color(rng, [bg_color], _MIN_COLOR_DIST)
        radius0 = rng.uniform(0.10, 0.20) * m  # circumradius: the extent is 20-40% of min(H, W)
        r_limit = 0.45 * m - 0.5  # the largest radius that still fits with room to move
        scale = np.ones(T + extra)
        if motion in ("grow", "shrink") and T > 1:
            rate = rng.uniform(0.02, 0.05)
            if motion == "grow":
                rate = min(rate, (r_limit / radius0) ** (1 / (T - 1)) - 1)  # stay inside the frame
                scale = (1 + rate) ** t
            else:
                rate = min(rate, 1 - 0.4 ** (1 / (T - 1)))  # keep at least 40% of the size
                scale = (1 - rate) ** t
        radius = radius0 * scale
        angle = np.full(T + extra, rng.uniform(0, 2 * math.pi))
        if motion.startswith("rotate"):
            # In y-down image coordinates an increasing angle turns clockwise on screen.
            angle = angle + (1 if motion == "rotate_cw" else -1) * math.radians(rng.uniform(3, 10)) * t

        # Translation speed 0.5-3 px/frame at 128 px, scaled with the image, and capped so the whole path fits.
        lo = radius[:T].max() + 0.5  # the clip's frames decide the room (``extra`` ones must not change it)
        room = np.array([W - 2 * lo, H - 2 * lo])  # free travel along x and y
        velocity = np.zeros(2)
        if motion in _DIRECTIONS and T > 1:
            direction = np.array(_DIRECTIONS[motion])
            speed = min(rng.uniform(0.5, 3.0) * max(1.0, m / 128), float(room @ np.abs(direction)) / (T - 1))
            velocity = speed * direction
        travel = velocity * (T - 1)
        start = lo + rng.uniform(0, 1, 2) * (room - np.abs(travel)) - np.minimum(travel, 0)
        center = start[None, :] + t[:, None] * velocity[None, :]

        # Static distractors drawn into the background layer, under the main shape.
        for _ in range(int(rng.integers(0, 3))):
            kind = str(rng.choice(["circle", "square", "triangle"]))
            d_radius = rng.uniform(0.04, 0.075) * m
            d_center = d_radius + rng.uniform(0, 1, 2) * (np.array([W, H]) - 2 * d_radius)
            d_color = _distinct_color(rng, [bg_color, color], _MIN_COLOR_DIST)
            params = (np.float32(x).reshape(1, 1, 1) for x in (*d_center, rng.uniform(0, 2 * math.pi), d_radius))
            d_alpha = _coverage(kind, *params, self._xs, self._ys)[0, ..., None]
            static = static + d_alpha * (d_color - static)

        traj = Trajectory(label, shape, np.rint(color).astype(np.uint8), center, angle, radius)
        return traj, static
