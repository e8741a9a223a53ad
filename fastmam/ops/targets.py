"""Reconstruction targets of the masked tokens: normalized pixels (VideoMAE) and RGB differences (MAM2).

Both read the raw clip and the masked token ids and return float32 targets for those tokens
only, in ``ids_masked`` order, laid out per token as (frames, p, p, C).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _backend
from ._checks import channel_stats, check_ids, check_same_device, clip_geometry, stat_values
from .gather import gather_tokens_reference, patchify_reference

EPS = 1e-6  # VideoMAE's epsilon in (v - mean) / (std + eps)


class Diff(enum.IntEnum):
    """What a target row holds (the kernels' ``DIFF`` flag)."""

    PIXELS = 0  # the t frames' pixels (pixel target)
    PAIRS = 1  # frame f+1 minus frame f inside the tubelet: t-1 frames (RGB difference)
    DENSE = 2  # next_clip's frame f minus clip's frame f: t frames (dense RGB difference)


def target_rows(tubelet: int, patch: int, diff: Diff) -> int:
    """Values per token and channel of a target: frames x p x p."""
    return (tubelet - (1 if diff == Diff.PAIRS else 0)) * patch * patch


class TargetInputs(NamedTuple):
    """Validated inputs of a target op: the clip's (B, T, H, W, C), int64 ids, float-tuple stats or None."""

    geometry: tuple[int, int, int, int, int]
    ids: torch.Tensor
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def check_target_inputs(clip, ids_masked, tubelet, patch, normalize, mean, std, layout, diff: Diff,
                        next_clip=None) -> TargetInputs:
    """Validate a target op's inputs once, for every backend."""
    geometry = clip_geometry(clip, layout, tubelet, patch)
    b, t, h, w, c = geometry
    check_ids(ids_masked, b, (t // tubelet) * (h // patch) * (w // patch), "ids_masked")
    check_same_device(clip=clip, ids_masked=ids_masked, next_clip=next_clip)
    if diff == Diff.PAIRS and tubelet < 2:
        raise ValueError("rgb_diff_target needs tubelet >= 2 (or next_clip for the dense variant)")
    if next_clip is not None and (next_clip.shape != clip.shape or next_clip.dtype != clip.dtype):
        raise ValueError(
            f"next_clip must match clip: got {tuple(next_clip.shape)} {next_clip.dtype}, "
            f"expected {tuple(clip.shape)} {clip.dtype}"
        )
    if normalize and target_rows(tubelet, patch, diff) < 2:
        raise ValueError("per-patch normalization needs at least 2 values per patch and channel")
    if layout == "BCTHW":
        if mean is None or std is None:
            raise ValueError("a normalized BCTHW clip needs the mean and std it was normalized with, to un-normalize")
        mean, std = stat_values(mean, c, "mean"), stat_values(std, c, "std", positive=True)
    else:  # uint8 pixels need no statistics
        mean = std = None
    return TargetInputs(geometry, ids_masked.long(), mean, std)


def _masked_pixels(clip: torch.Tensor, args: TargetInputs, tubelet: int, patch: int, layout: str) -> torch.Tensor:
    """The masked tokens' values, fp32: (B, Nm, t, p*p, C); uint8 as integers 0..255, floats un-normalized."""
    b, t, h, w, c = args.geometry
    tokens = gather_tokens_reference(patchify_reference(clip, tubelet, patch, layout), args.ids)
    v = tokens.reshape(b, -1, tubelet, patch * patch, c).to(torch.float32)
    if layout == "BTHWC":
        return v
    return v * channel_stats(args.std, c, "std", v.device) + channel_stats(args.mean, c, "mean", v.device)


def normalize_per_patch(v: torch.Tensor, divisor: float = 1.0) -> torch.Tensor:
    """(B, M, K, C) values in [0, 1] units times ``divisor``: per token and channel over its K values, VideoMAE's
    ``(x - mean) / (std_unbiased + 1e-6)`` of ``x = v / divisor``.

    The mean and variance are taken of ``u = (v - v[0]) / divisor``, the values minus the first one (the formula
    is unchanged: it depends only on ``x - mean``). A flat patch (black bars, sky) gives ``u = 0`` exactly and so a
    target of exactly 0, where the fp32 mean of raw values is off by an ulp that ``1 / (std + 1e-6)`` amplifies up
    to ~0.1; uint8 values (``divisor`` 255) are shifted while they are exact integers, so a near-flat patch loses
    nothing to cancellation either. Every backend computes it this way."""
    u = (v - v[..., :1, :]) / divisor
    d = u - u.mean(dim=-2, keepdim=True)
    return d / (d.square().sum(dim=-2, keepdim=True).div(v.shape[-2] - 1).sqrt() + EPS)


def _target_reference(clip, next_clip, tubelet, patch, normalize, layout, diff: Diff, args: TargetInputs):
    """(B, Nm, rows*C) fp32 target of validated inputs, ``diff`` as in ``Diff``."""
    v = _masked_pixels(clip, args, tubelet, patch, layout)
    if diff == Diff.PAIRS:
        v = v[:, :, 1:] - v[:, :, :-1]
    elif diff == Diff.DENSE:
        v = _masked_pixels(next_clip, args, tubelet, patch, layout) - v
    # uint8 values (and their differences) are exact integers up to here: one rounding, in the division by 255
    divisor = 255.0 if layout == "BTHWC" else 1.0
    b, m, f, pp, c = v.shape
    v = v.reshape(b, m, f * pp, c)
    v = normalize_per_patch(v, divisor) if normalize else v / divisor
    return v.reshape(b, m, f * pp * c)


def pixel_target_reference(
    clip: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str = "BTHWC",
) -> torch.Tensor:
    """VideoMAE's pixel target (the specification) -> (B, Nm, t*p*p*C) float32.

    Un-normalize to [0, 1] (uint8 / 255, or x * std + mean for a normalized BCTHW clip); with
    ``normalize``, per token and channel over its t*p*p pixels: (v - mean) / (std_unbiased + 1e-6).
    """
    args = check_target_inputs(clip, ids_masked, tubelet, patch, normalize, mean, std, layout, Diff.PIXELS)
    return _target_reference(clip, None, tubelet, patch, normalize, layout, Diff.PIXELS, args)


def rgb_diff_target_reference(
    clip: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    normalize: bool = False,
    next_clip: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str = "BTHWC",
) -> torch.Tensor:
    """MAM2's RGB-difference target (the specification) -> float32.

    Without ``next_clip``: per masked token, ``x[f+1] - x[f]`` for the t-1 consecutive pairs inside
    its tubelet, in [0, 1] units -> (B, Nm, (t-1)*p*p*C). Dense, with ``next_clip`` (same shape as
    clip; frame i is the raw frame right after clip's frame i): ``next[f] - x[f]`` for all t frames
    -> (B, Nm, t*p*p*C). ``normalize``: per patch and channel, the pixel target's formula.
    """
    diff = Diff.PAIRS if next_clip is None else Diff.DENSE
    args = check_target_inputs(clip, ids_masked, tubelet, patch, normalize, mean, std, layout, diff, next_clip)
    return _target_reference(clip, next_clip, tubelet, patch, normalize, layout, diff, args)


# a backend's implementation of both target ops: (clip, next_clip, tubelet, patch, normalize, layout, diff, inputs)
_backend.register("pixel_target", "reference", _target_reference)
_backend.register("rgb_diff_target", "reference", _target_reference)


def pixel_target(
    clip: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str = "BTHWC",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Pixel target of the masked tokens, exactly VideoMAE's formula.

    clip: (B, T, H, W, C) uint8, or (B, C, T, H, W) float normalized with ``mean``/``std``
    (layout='BCTHW'); ids_masked: (B, Nm) int64 in [0, N). Returns (B, Nm, t*p*p*C) float32.
    """
    args = check_target_inputs(clip, ids_masked, tubelet, patch, normalize, mean, std, layout, Diff.PIXELS)
    _, impl = _backend.resolve("pixel_target", backend, clip.device)
    return impl(clip, None, tubelet, patch, normalize, layout, Diff.PIXELS, args)


def rgb_diff_target(
    clip: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    normalize: bool = False,
    next_clip: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    layout: str = "BTHWC",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """RGB-difference (motion) target of the masked tokens.

    clip: (B, T, H, W, C) uint8 or normalized (B, C, T, H, W) float; ids_masked: (B, Nm) int64.
    Returns (B, Nm, (t-1)*p*p*C) float32, or (B, Nm, t*p*p*C) with the dense ``next_clip``.
    """
    diff = Diff.PAIRS if next_clip is None else Diff.DENSE
    args = check_target_inputs(clip, ids_masked, tubelet, patch, normalize, mean, std, layout, diff, next_clip)
    _, impl = _backend.resolve("rgb_diff_target", backend, clip.device)
    return impl(clip, next_clip, tubelet, patch, normalize, layout, diff, args)
