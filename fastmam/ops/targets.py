"""Reconstruction targets of the masked tokens: normalized pixels (VideoMAE) and RGB differences (MAM2).

Both read the raw clip and the masked token ids and return float32 targets for those tokens
only, in ``ids_masked`` order, laid out per token as (frames, p, p, C).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend
from ._checks import channel_stats, check_ids, check_same_device, clip_geometry
from .gather import gather_tokens_reference, patchify_reference

EPS = 1e-6  # VideoMAE's epsilon in (v - mean) / (std + eps)


def check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std) -> tuple[int, int, int, int, int]:
    """Validate a target op's inputs (shared by every backend); returns the clip's (B, T, H, W, C)."""
    geometry = clip_geometry(clip, layout, tubelet, patch)
    b, t, h, w, c = geometry
    check_ids(ids_masked, b, (t // tubelet) * (h // patch) * (w // patch), "ids_masked")
    check_same_device(clip=clip, ids_masked=ids_masked)
    if layout == "BCTHW":
        if mean is None or std is None:
            raise ValueError("a normalized BCTHW clip needs the mean and std it was normalized with, to un-normalize")
        channel_stats(mean, c, "mean", clip.device)
        channel_stats(std, c, "std", clip.device)
    return geometry


def check_rgb_diff_inputs(clip, tubelet, next_clip) -> None:
    if next_clip is None:
        if tubelet < 2:
            raise ValueError("rgb_diff_target needs tubelet >= 2 (or next_clip for the dense variant)")
    elif next_clip.shape != clip.shape or next_clip.dtype != clip.dtype:
        raise ValueError(
            f"next_clip must match clip: got {tuple(next_clip.shape)} {next_clip.dtype}, "
            f"expected {tuple(clip.shape)} {clip.dtype}"
        )


def check_normalizable(rows: int, normalize: bool) -> None:
    if normalize and rows < 2:
        raise ValueError("per-patch normalization needs at least 2 values per patch and channel")


def _masked_pixels(
    clip: torch.Tensor,
    ids_masked: torch.Tensor,
    tubelet: int,
    patch: int,
    layout: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> torch.Tensor:
    """The masked tokens' pixels in [0, 1] units, fp32: (B, Nm, t, p*p, C)."""
    b, t, h, w, c = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)
    tokens = gather_tokens_reference(patchify_reference(clip, tubelet, patch, layout), ids_masked.long())
    v = tokens.reshape(b, -1, tubelet, patch * patch, c).to(torch.float32)
    if layout == "BTHWC":
        return v / 255.0
    return v * channel_stats(std, c, "std", v.device) + channel_stats(mean, c, "mean", v.device)


def normalize_per_patch(v: torch.Tensor) -> torch.Tensor:
    """(B, M, K, C): per token and channel over its K values, ``(v - mean) / (std_unbiased + 1e-6)``."""
    check_normalizable(v.shape[-2], True)
    return (v - v.mean(dim=-2, keepdim=True)) / (v.var(dim=-2, unbiased=True, keepdim=True).sqrt() + EPS)


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
    v = _masked_pixels(clip, ids_masked, tubelet, patch, layout, mean, std)
    b, m = v.shape[:2]
    c = v.shape[-1]
    v = v.reshape(b, m, -1, c)
    if normalize:
        v = normalize_per_patch(v)
    return v.reshape(b, m, -1)


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
    check_rgb_diff_inputs(clip, tubelet, next_clip)
    v = _masked_pixels(clip, ids_masked, tubelet, patch, layout, mean, std)
    if next_clip is None:
        d = v[:, :, 1:] - v[:, :, :-1]
    else:
        d = _masked_pixels(next_clip, ids_masked, tubelet, patch, layout, mean, std) - v
    b, m, f, pp, c = d.shape
    d = d.reshape(b, m, f * pp, c)
    if normalize:
        d = normalize_per_patch(d)
    return d.reshape(b, m, -1)


_backend.register("pixel_target", "reference", pixel_target_reference)
_backend.register("rgb_diff_target", "reference", rgb_diff_target_reference)


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
    (layout='BCTHW'); ids_masked: (B, Nm) int64. Returns (B, Nm, t*p*p*C) float32.
    """
    _, impl = _backend.resolve("pixel_target", backend, clip.device)
    return impl(clip, ids_masked, tubelet, patch, normalize, mean, std, layout)


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
    _, impl = _backend.resolve("rgb_diff_target", backend, clip.device)
    return impl(clip, ids_masked, tubelet, patch, normalize, next_clip, mean, std, layout)
