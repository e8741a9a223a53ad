"""Patchify, visible-patch gather and token gather/scatter.

A patch vector is laid out (t, p, p, C), VideoMAE's
``b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)``; tokens are ordered (time, row, column).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _backend
from ._checks import (
    channel_stats,
    check_ids,
    check_noise,
    check_out_dtype,
    check_ratio,
    check_same_device,
    clip_geometry,
    num_hidden,
    stat_values,
)
from .masking import Masking, mask_tokens


def patchify_reference(clip: torch.Tensor, tubelet: int, patch: int, layout: str = "BTHWC") -> torch.Tensor:
    """clip (B, T, H, W, C) [BTHWC] or (B, C, T, H, W) [BCTHW] -> (B, N, t*p*p*C), same dtype."""
    b, t, h, w, c = clip_geometry(clip, layout, tubelet, patch)
    if layout == "BCTHW":
        clip = clip.permute(0, 2, 3, 4, 1)
    x = clip.reshape(b, t // tubelet, tubelet, h // patch, patch, w // patch, patch, c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch * c)


def normalize_patches(
    patches: torch.Tensor, mean: Sequence[float], std: Sequence[float], channels: int, dtype: torch.dtype
) -> torch.Tensor:
    """uint8 patch vectors (..., t*p*p*C) -> ((v / 255 - mean[c]) / std[c]) in ``dtype`` (fp32 math)."""
    m = channel_stats(mean, channels, "mean", patches.device)
    s = channel_stats(std, channels, "std", patches.device)
    shape = patches.shape
    v = patches.reshape(*shape[:-1], -1, channels).to(torch.float32) / 255.0
    return ((v - m) / s).reshape(shape).to(dtype)


class MaskedPatches(NamedTuple):
    """patches: (B, Nv, t*p*p*C) visible patch vectors; the rest as in ``Masking``."""

    patches: torch.Tensor
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    mask: torch.Tensor


class GatherInputs(NamedTuple):
    """Validated inputs of ``tube_mask_gather``; ``mean``/``std`` are float tuples for a uint8 clip, else None."""

    geometry: tuple[int, int, int, int, int]
    ratio: float
    hidden: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


MASKINGS = ("tube", "random")


def check_tube_mask_gather(clip, noise, ratio, tubelet, patch, mean, std, out_dtype, layout, masking) -> GatherInputs:
    """Validate ``tube_mask_gather``'s inputs once, for every backend."""
    geometry = clip_geometry(clip, layout, tubelet, patch)
    b, t, h, w, c = geometry
    if masking not in MASKINGS:
        raise ValueError(f"masking='{masking}' is not supported; expected 'tube' or 'random'")
    s = (h // patch) * (w // patch)
    positions = s if masking == "tube" else s * (t // tubelet)
    check_noise(noise, b, positions)
    check_same_device(clip=clip, noise=noise)
    ratio = check_ratio(ratio)
    hidden = num_hidden(ratio, positions)
    check_out_dtype(out_dtype)
    if layout == "BTHWC":  # normalized here; a BCTHW clip is already normalized and only cast
        mean, std = stat_values(mean, c, "mean"), stat_values(std, c, "std", positive=True)
    else:
        mean = std = None
    return GatherInputs(geometry, ratio, hidden, mean, std)


def mask_clip(noise: torch.Tensor, args: GatherInputs, tubelet: int, masking: str) -> Masking:
    """The masking of validated inputs (shared by the backends that mask with torch ops)."""
    return mask_tokens(noise, args.hidden, args.geometry[1] // tubelet, masking)


def _tube_mask_gather_reference(clip, noise, tubelet, patch, out_dtype, layout, masking, args: GatherInputs):
    m = mask_clip(noise, args, tubelet, masking)
    visible = gather_tokens_reference(patchify_reference(clip, tubelet, patch, layout), m.ids_keep)
    if layout == "BTHWC":
        visible = normalize_patches(visible, args.mean, args.std, args.geometry[-1], out_dtype)
    else:
        visible = visible.to(out_dtype)
    return MaskedPatches(visible, *m)


def tube_mask_gather_reference(
    clip: torch.Tensor,
    noise: torch.Tensor,
    ratio: float,
    tubelet: int,
    patch: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype = torch.float32,
    layout: str = "BTHWC",
    masking: str = "tube",
) -> MaskedPatches:
    """Mask, then gather the visible patches of ``clip`` normalized and cast (the specification).

    clip: (B, T, H, W, C) uint8 (normalized here with mean/std in [0, 1] units) or (B, C, T, H, W)
    float already normalized (only cast). noise: (B, S) for tube masking, (B, N) for random.
    """
    args = check_tube_mask_gather(clip, noise, ratio, tubelet, patch, mean, std, out_dtype, layout, masking)
    return _tube_mask_gather_reference(clip, noise, tubelet, patch, out_dtype, layout, masking, args)


def gather_tokens_reference(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D); backward scatters into the gathered rows."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_reference(x: torch.Tensor, ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """x (B, K, D), ids (B, K) distinct -> (B, num_tokens, D), zeros at the tokens not in ids."""
    out = x.new_zeros(x.shape[0], num_tokens, x.shape[-1])
    return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


for _name, _fn in (
    ("tube_mask_gather", _tube_mask_gather_reference),
    ("gather_tokens", gather_tokens_reference),
    ("scatter_tokens", scatter_tokens_reference),
):
    _backend.register(_name, "reference", _fn)


def tube_mask_gather(
    clip: torch.Tensor,
    noise: torch.Tensor,
    ratio: float,
    tubelet: int,
    patch: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype = torch.float32,
    layout: str = "BTHWC",
    masking: str = "tube",
    *,
    backend: str | None = None,
) -> MaskedPatches:
    """Tube-mask a clip and return its visible patches, normalized, in the model's dtype.

    clip: (B, T, H, W, C) uint8 with layout='BTHWC', or (B, C, T, H, W) normalized float with
    layout='BCTHW'. noise: (B, S) float, S = (H/p)*(W/p) (or (B, N) with masking='random').
    Returns ``MaskedPatches(patches (B, Nv, t*p*p*C) out_dtype, ids_keep (B, Nv) int64,
    ids_masked (B, Nm) int64, mask (B, N) bool)``. mean/std: per channel in [0, 1] units, needed for a uint8
    clip (std > 0); ratio: a number in (0, 1). Bad input raises ``ValueError``/``TypeError`` on every backend.
    """
    args = check_tube_mask_gather(clip, noise, ratio, tubelet, patch, mean, std, out_dtype, layout, masking)
    _, impl = _backend.resolve("tube_mask_gather", backend, clip.device)
    return impl(clip, noise, tubelet, patch, out_dtype, layout, masking, args)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Select tokens: x (B, N, D), ids (B, K) int64 -> (B, K, D). Differentiable in x."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, N, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_ids(ids, x.shape[0], x.shape[1], "ids")
    check_same_device(x=x, ids=ids)
    _, impl = _backend.resolve("gather_tokens", backend, x.device)
    return impl(x, ids.long())


def scatter_tokens(x: torch.Tensor, ids: torch.Tensor, num_tokens: int, *, backend: str | None = None) -> torch.Tensor:
    """Place tokens: x (B, K, D) at ids (B, K) of a zero (B, num_tokens, D) tensor. Differentiable in x."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, K, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_ids(ids, x.shape[0], num_tokens, "ids")
    if ids.shape[1] != x.shape[1]:
        raise ValueError(f"ids has {ids.shape[1]} tokens per sample but x has {x.shape[1]}")
    check_same_device(x=x, ids=ids)
    _, impl = _backend.resolve("scatter_tokens", backend, x.device)
    return impl(x, ids.long(), num_tokens)


__all__ = [
    "MaskedPatches",
    "Masking",
    "gather_tokens",
    "gather_tokens_reference",
    "normalize_patches",
    "patchify_reference",
    "scatter_tokens",
    "scatter_tokens_reference",
    "tube_mask_gather",
    "tube_mask_gather_reference",
]
