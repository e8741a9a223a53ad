"""The Triton backend of the ops: input checks and masking as in the references, then the kernels of
``fastmam.kernels.patches`` for the memory-bound part (one read of each selected token's pixels).

Registered only when triton is importable; the kernels module is imported on first use, so
``TRITON_INTERPRET=1`` (CPU tests) only needs to be set before that first call.
"""

from __future__ import annotations

import importlib.util

import torch

from . import _backend
from ._checks import check_same_device
from .gather import MaskedPatches, mask_clip
from .targets import check_normalizable, check_rgb_diff_inputs, check_target_inputs


def _kernels():
    from fastmam.kernels import patches

    return patches


def tube_mask_gather_triton(clip, noise, ratio, tubelet, patch, mean, std, out_dtype=torch.float32,
                            layout="BTHWC", masking="tube") -> MaskedPatches:
    geometry, m = mask_clip(clip, noise, ratio, tubelet, patch, layout, masking)
    c = geometry[-1]
    if layout == "BTHWC":
        for name, values in (("mean", mean), ("std", std)):
            if torch.as_tensor(values).numel() != c:
                raise ValueError(f"{name} must have one value per channel ({c}), got {torch.as_tensor(values).numel()}")
    patches = _kernels().gather_normalize(clip, m.ids_keep, tubelet, patch, mean, std, out_dtype, layout, geometry)
    return MaskedPatches(patches, *m)


def pixel_target_triton(clip, ids_masked, tubelet, patch, normalize=True, mean=None, std=None, layout="BTHWC"):
    geometry = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)
    check_normalizable(tubelet * patch * patch, normalize)
    return _kernels().masked_target(clip, None, ids_masked.long(), tubelet, patch, normalize, mean, std, layout,
                                    geometry, diff=0)


def rgb_diff_target_triton(clip, ids_masked, tubelet, patch, normalize=False, next_clip=None, mean=None, std=None,
                           layout="BTHWC"):
    check_rgb_diff_inputs(clip, tubelet, next_clip)
    geometry = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)
    dense = next_clip is not None
    if dense:
        check_same_device(clip=clip, next_clip=next_clip)
    check_normalizable((tubelet - (0 if dense else 1)) * patch * patch, normalize)
    return _kernels().masked_target(clip, next_clip, ids_masked.long(), tubelet, patch, normalize, mean, std, layout,
                                    geometry, diff=2 if dense else 1)


if importlib.util.find_spec("triton") is not None:
    _backend.register("tube_mask_gather", "triton", tube_mask_gather_triton)
    _backend.register("pixel_target", "triton", pixel_target_triton)
    _backend.register("rgb_diff_target", "triton", rgb_diff_target_triton)
