"""MME's motion targets of the selected tokens: HOG descriptors of a tubelet frame, and point trajectories.

``hog_target`` reads the raw uint8 clip, like ``pixel_target``; ``trajectory_target`` reads the trajectories the
loader delivers for each tubelet (``fastmam.data.trajectories``); ``trajectory_loss`` is the masked MSE that goes
with it. Both targets take token ids (any subset of the N tokens, e.g. ``ids_masked``) and return float32 rows in
the ids' order. Where we differ from MME's released code, and why, is said at each op.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _backend
from ._checks import check_ids, check_same_device, clip_geometry

#: HOG: pixels per side of a cell, orientation bins over [0, pi)
HOG_CELL = 8
HOG_BINS = 9
#: HOG: epsilon of the per-token L2 normalization ``h / (||h||_2 + eps)`` (histogram units, see ``hog_target``)
HOG_EPS = 1e-6
HOG_FRAMES = ("first", "middle", "last")
HOG_GRADIENTS = ("sobel", "central")
HOG_NORMALIZATIONS = ("l2", "none")

#: trajectories: points on a grid of this stride (model-input pixels), at offset ``TRAJECTORY_GRID // 2``
TRAJECTORY_GRID = 8
#: "global" normalization: displacement (px per step) that maps to 1; larger ones are clipped to +-1
TRAJECTORY_BOUND = 16.0
#: "patch_std": VideoMAE's epsilon in (v - mean) / (std_unbiased + eps), in px
TRAJECTORY_EPS = 1e-6
TRAJECTORY_NORMALIZATIONS = ("global", "patch_std")


# --------------------------------------------------------------------------- HOG


class HogInputs(NamedTuple):
    """Validated inputs of ``hog_target``: the clip's (B, T, H, W, C), int64 ids, the frame inside the tubelet,
    cell and bins, Sobel (else central differences), L2 normalization (else raw sums), epsilon."""

    geometry: tuple[int, int, int, int, int]
    ids: torch.Tensor
    offset: int
    cell: int
    bins: int
    sobel: bool
    normalize: bool
    eps: float


def hog_values(patch: int, cell: int, bins: int, channels: int) -> int:
    """Values per token of ``hog_target``: (p / cell)^2 cells x bins x C (p=16, 8, 9, 3: 108)."""
    return (patch // cell) ** 2 * bins * channels


def frame_offset(frame: str | int, tubelet: int) -> int:
    """The frame of each tubelet that ``hog_target`` describes, as an offset in [0, tubelet)."""
    if isinstance(frame, str):
        if frame not in HOG_FRAMES:
            raise ValueError(f"frame='{frame}' is not supported; expected one of {', '.join(HOG_FRAMES)} "
                             f"or an offset in [0, {tubelet})")
        return {"first": 0, "middle": tubelet // 2, "last": tubelet - 1}[frame]
    if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or not 0 <= frame < tubelet:
        raise ValueError(f"frame={frame!r} is not a frame of a tubelet of {tubelet}; pass 'first', 'middle', "
                         f"'last' or an int offset in [0, {tubelet})")
    return int(frame)


def check_hog_inputs(clip, ids, tubelet, patch, frame, cell, bins, gradient, normalize, eps) -> HogInputs:
    """Validate ``hog_target``'s inputs once, for every backend."""
    if isinstance(clip, torch.Tensor) and clip.dtype != torch.uint8:
        raise TypeError(f"hog_target reads raw frames: clip must be a uint8 (B, T, H, W, C) tensor, got "
                        f"{clip.dtype}; pass the loader's uint8 clip, not the normalized model input")
    geometry = clip_geometry(clip, "BTHWC", tubelet, patch)
    b, t, h, w, c = geometry
    if isinstance(cell, bool) or not isinstance(cell, numbers.Integral) or cell < 1 or patch % cell:
        raise ValueError(f"cell={cell!r} must be a positive int that divides patch={patch} (MME: 8-px cells of "
                         "16-px patches)")
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ValueError(f"bins={bins!r} must be a positive int (MME: 9 orientation bins over [0, pi))")
    if gradient not in HOG_GRADIENTS:
        raise ValueError(f"gradient='{gradient}' is not supported; expected 'sobel' (3x3 Sobel) or 'central' "
                         "([-1, 0, 1], scikit-image's)")
    if normalize not in HOG_NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not supported; expected 'l2' (per token) or 'none' "
                         "(raw histograms)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r} must be a finite number > 0")
    if h < 2 or w < 2:
        raise ValueError(f"hog_target needs frames of at least 2x2 pixels (reflected border), got {h}x{w}")
    check_ids(ids, b, (t // tubelet) * (h // patch) * (w // patch), "ids")
    check_same_device(clip=clip, ids=ids)
    return HogInputs(geometry, ids.long(), frame_offset(frame, tubelet), int(cell), int(bins),
                     gradient == "sobel", normalize == "l2", float(eps))


def hog_gradients(x: torch.Tensor, sobel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., H, W) integer-valued float pixels -> (gx, gy), each (..., H, W): x to the right, y down.

    Sobel: ``gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]``, ``gy`` its transpose (unscaled, as OpenCV's ksize=3
    Sobel); central: ``[-1, 0, 1]`` (scikit-image's HOG). No bias. The frame is reflected at its border
    (reflect-101: the pixel beyond the edge is the one before it, so the gradient normal to the border is 0 for
    central differences, as scikit-image's). Sums of integers: exact in fp32."""
    shape = x.shape
    x = F.pad(x.reshape(-1, 1, *shape[-2:]), (1, 1, 1, 1), mode="reflect").reshape(*shape[:-2], shape[-2] + 2,
                                                                                  shape[-1] + 2)
    if sobel:
        gx = (x[..., :-2, 2:] - x[..., :-2, :-2]) + 2 * (x[..., 1:-1, 2:] - x[..., 1:-1, :-2]) \
            + (x[..., 2:, 2:] - x[..., 2:, :-2])
        gy = (x[..., 2:, :-2] - x[..., :-2, :-2]) + 2 * (x[..., 2:, 1:-1] - x[..., :-2, 1:-1]) \
            + (x[..., 2:, 2:] - x[..., :-2, 2:])
    else:
        gx = x[..., 1:-1, 2:] - x[..., 1:-1, :-2]
        gy = x[..., 2:, 1:-1] - x[..., :-2, 1:-1]
    return gx, gy


def hog_cell_histograms(frames: torch.Tensor, cell: int, bins: int, sobel: bool,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames (..., H, W, C) -> raw cell histograms (..., H/cell, W/cell, bins, C) in ``dtype``.

    Per pixel and channel: ``m = sqrt(gx^2 + gy^2) / 255`` (gradient magnitude of [0, 1] pixels) and the unsigned
    orientation ``theta = atan2(gy, gx) mod pi`` in [0, pi). Bin k covers [k, k+1) * pi/bins, its centre at
    (k + 1/2) * pi/bins; ``m`` is split between the two nearest centres, linearly in ``theta`` (circularly: bins-1
    and 0 are neighbours), and summed over the pixels of each cell (no spatial interpolation)."""
    *lead, h, w, c = frames.shape
    x = frames.movedim(-1, -3).to(dtype)  # (..., C, H, W), integers 0..255
    gx, gy = hog_gradients(x, sobel)
    mag = torch.sqrt(gx * gx + gy * gy) / 255.0
    theta = torch.atan2(gy, gx)
    theta = torch.where(theta < 0, theta + math.pi, theta)
    u = theta * (bins / math.pi) - 0.5  # position in units of bins, from the first centre
    k0 = torch.floor(u)
    w1 = u - k0
    k0 = (k0.long() + bins) % bins  # u in [-1/2, bins - 1/2]: k0 in [-1, bins - 1] before the wrap
    k1 = (k0 + 1) % bins
    nh, nw = h // cell, w // cell
    cell_of = ((torch.arange(h, device=frames.device) // cell)[:, None] * nw
               + (torch.arange(w, device=frames.device) // cell)[None, :]) * bins  # (H, W)
    hist = torch.zeros(*mag.shape[:-2], nh * nw * bins, dtype=dtype, device=frames.device)
    hist.scatter_add_(-1, (cell_of + k0).flatten(-2), (mag * (1 - w1)).flatten(-2))
    hist.scatter_add_(-1, (cell_of + k1).flatten(-2), (mag * w1).flatten(-2))
    return hist.reshape(*lead, c, nh, nw, bins).movedim(-4, -1)


def _hog_reference(clip: torch.Tensor, tubelet: int, patch: int, args: HogInputs,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, K, (p/cell)^2 * bins * C) target of validated inputs, computed in ``dtype`` (float32: the spec's
    precision; float64: the exact values of the tests)."""
    b, t, h, w, c = args.geometry
    q = patch // args.cell
    frames = clip[:, args.offset::tubelet]  # (B, T/t, H, W, C): the chosen frame of every tubelet
    hist = hog_cell_histograms(frames, args.cell, args.bins, args.sobel, dtype)  # (B, T/t, H/cell, W/cell, k, C)
    hist = hist.reshape(b, t // tubelet, h // patch, q, w // patch, q, args.bins * c)
    tokens = hist.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, -1, q * q * args.bins * c)  # (cell row, cell col, bin, C)
    out = tokens.gather(1, args.ids[..., None].expand(-1, -1, tokens.shape[-1]))
    if args.normalize:
        out = out / (out.square().sum(-1, keepdim=True).sqrt() + args.eps)
    return out


def hog_target_reference(clip: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int, frame: str | int = "first",
                         cell: int = HOG_CELL, bins: int = HOG_BINS, gradient: str = "sobel", normalize: str = "l2",
                         eps: float = HOG_EPS) -> torch.Tensor:
    """``hog_target``'s specification, pure PyTorch: same arguments, same result."""
    args = check_hog_inputs(clip, ids, tubelet, patch, frame, cell, bins, gradient, normalize, eps)
    return _hog_reference(clip, tubelet, patch, args)


_backend.register("hog_target", "reference", _hog_reference)


def hog_target(clip: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int, frame: str | int = "first",
               cell: int = HOG_CELL, bins: int = HOG_BINS, gradient: str = "sobel", normalize: str = "l2",
               eps: float = HOG_EPS, *, backend: str | None = None) -> torch.Tensor:
    """MME's HOG target of the selected tokens: histograms of oriented gradients of one frame per tubelet.

    clip: (B, T, H, W, C) uint8, the loader's raw frames; ids: (B, K) int64 token ids in [0, N) (token
    n = i * S + s: time slice i, spatial position s = row * W/p + col), any subset (``ids_masked``, a decoder's
    kept tokens). Returns (B, K, (p/cell)^2 * bins * C) float32, per token laid out (cell row, cell col, bin,
    channel): 2 x 2 x 9 x 3 = 108 values for p=16 and the defaults.

    - frame: which frame of the tubelet: 'first' (MME's; the default), 'middle' (offset t // 2), 'last', or an
      int offset in [0, t).
    - pixels: x / 255 in [0, 1], so the target does not depend on the data's mean/std. Gradients are taken on
      the integer values and scaled by 1/255 once: adding a constant to the frame (where nothing clips) gives a
      bit-identical target.
    - gradient: 'sobel' (default): unscaled 3x3 Sobel kernels ``gx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` (x to
      the right), ``gy`` its transpose (y down), no bias; 'central': ``[-1, 0, 1]``, scikit-image's. Per RGB
      channel. Pixels at a patch's border use the neighbouring pixels of the frame (the kernel reads the
      token's frame window plus a 1-pixel halo); at the frame's border the frame is reflected (reflect-101,
      OpenCV's default border: pixel -1 is pixel 1), which never invents an edge there and makes central
      differences equal scikit-image's at the border too.
    - orientation: unsigned, ``theta = atan2(gy, gx) mod pi`` in [0, pi); ``bins`` bins of width pi/bins, centres
      at (k + 1/2) pi/bins; the magnitude ``sqrt(gx^2 + gy^2)`` is split linearly between the two nearest centres
      (bins-1 and 0 are neighbours) and summed over each cell x cell block of pixels (no spatial interpolation).
    - normalize: 'l2' (default): the token's whole vector divided by ``||h||_2 + eps`` (over cells, bins and
      channels together: for p=16, 8-px cells, a Dalal-Triggs 2x2-cell block of one token). Bounded (every
      value in [0, 1], norm <= 1), so a linear head regresses it with MSE, and invariant to the patch's contrast
      (HOG's purpose), while the relative strength of its cells and channels stays. MME's released code feeds an
      unbounded raw histogram through a Sigmoid instead: its values grow with contrast and saturate it. A flat
      token (no gradient) gives exactly 0. ``eps`` (default 1e-6, histogram units: raw histograms are sums of
      magnitudes of [0, 1] pixels) only avoids 0/0; a token whose only texture is noise of one grey level still
      gets a unit-norm target. Raw norms of a 16-px token (Sobel, three equal channels): 0.03 for one pixel off
      by one level, 0.65 for +-1-level noise everywhere, 9.2 for a 30-level edge, 78 for a 0-255 edge: an
      ``eps`` of ~1 would damp the noise-only tokens. 'none': the raw cell histograms, unbounded (with
      gradient='central': scikit-image's unnormalized cell histograms of the 0..255 frame times cell^2 / 255,
      except that scikit-image puts each pixel into one bin; tests/ops/test_hog_target.py compares them).

    Differences from MME's released HOG: no random bias in the gradient convolution, interpolated (not hard)
    orientation bins, a bounded per-token target instead of a Sigmoid on unnormalized histograms.
    """
    args = check_hog_inputs(clip, ids, tubelet, patch, frame, cell, bins, gradient, normalize, eps)
    _, impl = _backend.resolve("hog_target", backend, clip.device)
    return impl(clip, tubelet, patch, args)


# --------------------------------------------------------------------------- trajectories


class TrajectoryInputs(NamedTuple):
    """Validated inputs of ``trajectory_target``: (B, time slices, grid rows, grid columns, L), int64 ids, points
    per token side (p / 8), per-token z-score (else divide by ``bound``), bound, epsilon."""

    grid: tuple[int, int, int, int, int]
    ids: torch.Tensor
    side: int
    patch_std: bool
    bound: float
    eps: float


def trajectory_values(patch: int, steps: int) -> int:
    """Values per token of ``trajectory_target``: (p / 8)^2 points x L steps x (dx, dy) (p=16, L=4: 32)."""
    return (patch // TRAJECTORY_GRID) ** 2 * steps * 2


def check_trajectory_inputs(disp, valid, ids, tubelet, patch, normalize, bound, eps) -> TrajectoryInputs:
    """Validate ``trajectory_target``'s inputs once, for every backend."""
    if not isinstance(disp, torch.Tensor) or not disp.is_floating_point():
        got = disp.dtype if isinstance(disp, torch.Tensor) else type(disp).__name__
        raise TypeError(f"disp must be a floating-point tensor of displacements in px (float16/32, bfloat16), "
                        f"got {got}")
    if disp.dim() != 6 or disp.shape[-1] != 2:
        raise ValueError(f"disp must be (B, T/t, H/{TRAJECTORY_GRID}, W/{TRAJECTORY_GRID}, L, 2): per tubelet, grid "
                         f"point and step a (dx, dy); got shape {tuple(disp.shape)}")
    b, slices, gh, gw, steps, _ = disp.shape
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise TypeError(f"valid must be a bool tensor (True where the point stayed in the frame), got {got}")
    if tuple(valid.shape) != (b, slices, gh, gw):
        raise ValueError(f"valid must have disp's first four dims {(b, slices, gh, gw)} (one bit per point), got "
                         f"{tuple(valid.shape)}")
    if tubelet < 1 or patch < 1 or patch % TRAJECTORY_GRID:
        raise ValueError(f"patch={patch} must be a multiple of the trajectory grid's {TRAJECTORY_GRID} px (and "
                         f"tubelet={tubelet} >= 1)")
    side = patch // TRAJECTORY_GRID
    if gh % side or gw % side or steps < 1:
        raise ValueError(f"a trajectory grid of {gh}x{gw} points (L={steps}) does not tile into {patch}-px patches "
                         f"({side}x{side} points each): disp must come from a clip of H={gh * TRAJECTORY_GRID}, "
                         f"W={gw * TRAJECTORY_GRID} whose H and W are multiples of the patch, with L >= 1")
    if normalize not in TRAJECTORY_NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not supported; expected 'global' (divide by bound) or "
                         "'patch_std' (MME's per-token z-score)")
    for name, value in (("bound", bound), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a finite number > 0")
    check_ids(ids, b, slices * (gh // side) * (gw // side), "ids")
    check_same_device(disp=disp, valid=valid, ids=ids)
    return TrajectoryInputs((b, slices, gh, gw, steps), ids.long(), side, normalize == "patch_std", float(bound),
                            float(eps))


def _trajectory_reference(disp: torch.Tensor, valid: torch.Tensor, args: TrajectoryInputs,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, weight), each (B, K, (p/8)^2 * L * 2), of validated inputs, computed in ``dtype`` (float32: the
    spec's precision and the ops' output; float64: the exact values of the tests)."""
    b, slices, gh, gw, steps = args.grid
    q = args.side
    v = disp.reshape(b, slices, gh // q, q, gw // q, q, steps, 2).permute(0, 1, 2, 4, 3, 5, 6, 7)
    v = v.reshape(b, -1, q * q, steps, 2)
    ok = valid.reshape(b, slices, gh // q, q, gw // q, q).permute(0, 1, 2, 4, 3, 5).reshape(b, -1, q * q)
    k = args.ids.shape[1]
    v = v.gather(1, args.ids[:, :, None, None, None].expand(-1, -1, q * q, steps, 2)).to(dtype)
    ok = ok.gather(1, args.ids[:, :, None].expand(-1, -1, q * q))[..., None, None]  # (B, K, q*q, 1, 1)
    v = torch.where(ok, v, 0.0)  # invalid points may hold anything (NaN): never read
    if args.patch_std:
        # per token and component over its valid points' L steps: (x - mean) / (std_unbiased + eps), taken of
        # u = x - x[first valid point, step 0] (the same x - mean): a pure translation gives u = 0 and exactly 0 out
        first = torch.argmax(ok[..., 0, 0].to(torch.uint8), dim=-1)  # (B, K); 0 where none is valid (all masked)
        ref = v.gather(2, first[:, :, None, None, None].expand(-1, -1, 1, 1, 2))  # (B, K, 1, 1, 2)
        u = torch.where(ok, v - ref, 0.0)
        n = ok.sum(dim=2, keepdim=True).to(dtype) * steps  # (B, K, 1, 1, 1) valid values per component
        mean = u.sum(dim=(2, 3), keepdim=True) / n.clamp(min=1)
        d = torch.where(ok, u - mean, 0.0)
        var = d.square().sum(dim=(2, 3), keepdim=True) / (n - 1).clamp(min=1)
        target = d / (var.sqrt() + args.eps)
    else:
        target = torch.where(ok, (v / args.bound).clamp(-1.0, 1.0), 0.0)
    weight = ok.expand_as(target).to(dtype)
    return target.reshape(b, k, -1), weight.reshape(b, k, -1)


def trajectory_target_reference(disp: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int,
                                normalize: str = "global", bound: float = TRAJECTORY_BOUND,
                                eps: float = TRAJECTORY_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``trajectory_target``'s specification, pure PyTorch: same arguments, same result."""
    args = check_trajectory_inputs(disp, valid, ids, tubelet, patch, normalize, bound, eps)
    return _trajectory_reference(disp, valid, args)


_backend.register("trajectory_target", "reference", _trajectory_reference)


def trajectory_target(disp: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor, tubelet: int, patch: int,
                      normalize: str = "global", bound: float = TRAJECTORY_BOUND, eps: float = TRAJECTORY_EPS, *,
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MME's trajectory target of the selected tokens: where the token's grid points move over L steps.

    Input (what the loader delivers, per clip of T frames at H x W after crop, resize and flip):

    - disp: (B, T/t, H/8, W/8, L, 2) float (float16/32, bfloat16): for each tubelet i, the trajectories that
      start at its first frame, from points on an 8-px grid at offset 4 of the model input (point (gy, gx) sits at
      pixel (8 gy + 4, 8 gx + 4)); per step l the displacement (dx, dy) from step l to l + 1, in model-input pixels
      (x to the right, y down).
    - valid: (B, T/t, H/8, W/8) bool: True where the point stayed inside the frame over all L steps. Entries of
      invalid points are never read (they may hold anything, NaN included).
    - ids: (B, K) int64 token ids in [0, N), token n = i * S + s as for the other targets; tubelet, patch: the
      model's (patch a multiple of 8; tubelet t only names the time slices, disp has T/t of them).

    Returns ``(target, weight)``, each (B, K, (p/8)^2 * L * 2) float32, per token laid out (point row, point col,
    step, xy): p=16, L=4: 2 x 2 x 4 x 2 = 32 values. weight is 1.0 where the entry comes from a valid point, else
    0.0 (and target 0 there); give both to ``trajectory_loss``.

    normalize:

    - 'global' (default): ``clip(disp / bound, -1, 1)``; ``bound`` (default 16 px per step: a patch per frame,
      beyond what a 224-px clip's motion at the native frame rate usually reaches) makes the target O(1) and the
      clip keeps a flow outlier (occlusion, a failed match) from dominating the MSE.
    - 'patch_std': MME's per-token z-score, VideoMAE's formula per component (dx and dy separately) over the
      token's valid points x L steps: ``(v - mean) / (std_unbiased + eps)``, eps default 1e-6 px. Subtracting the
      mean removes the patch's common motion (a translation of the whole patch, e.g. camera panning, gives 0):
      the target is the motion of the points relative to each other, rescaled to unit variance (which amplifies
      small relative motion, flow noise included, like VideoMAE's pixel target on flat patches). With one valid
      value per component the std is taken as 0 and the target is 0; with none, target and weight are 0.

    Differences from MME's released code: trajectories from bilinear (not integer) tracking with their flow scale
    applied (``fastmam.data.trajectories``), invalid points masked out of the loss instead of counted as zeros.
    """
    args = check_trajectory_inputs(disp, valid, ids, tubelet, patch, normalize, bound, eps)
    _, impl = _backend.resolve("trajectory_target", backend, disp.device)
    return impl(disp, valid, args)


def trajectory_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """MSE averaged over the valid entries: ``sum(weight * (pred - target)^2) / sum(weight)`` -> fp32 scalar.

    pred: (..., V) any float dtype (the head's output); target, weight: the same shape, from ``trajectory_target``.
    0 (with zero gradients, no NaN) when no entry is valid. Differentiable in pred."""
    if pred.shape != target.shape or weight.shape != target.shape:
        raise ValueError(f"pred, target and weight must have one shape, got {tuple(pred.shape)}, "
                         f"{tuple(target.shape)}, {tuple(weight.shape)}")
    w = weight.to(torch.float32)
    # masked before squaring, not after: a masked entry's prediction (inf from a diverging head) reaches neither the
    # sum nor, as 0 * inf = NaN, the gradient
    diff = torch.where(w > 0, pred.to(torch.float32) - target.to(torch.float32), 0.0)
    total = w.sum()
    return (w * diff.square()).sum() / torch.where(total > 0, total, torch.ones_like(total))
