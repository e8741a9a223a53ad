"""The CUDA C++ backend of the ops: the kernels of ``csrc/``, built by setup.py into ``fastmam._C``.

Importing this module loads the extension when it exists: ``import fastmam._C`` registers
``torch.ops.fastmam_cuda.*`` (a library built with CMake instead is loaded from the path in
``FASTMAM_CUDA_LIBRARY``). On a build without it (CPU torch, no nvcc) nothing happens and nothing is
printed; a ``fastmam._C`` that exists but fails to load (built against another torch) warns once.

When loaded, it registers fake (meta) implementations of the three ops, so ``torch.compile`` traces
them as single graph nodes, and registers ``tube_mask_gather``, ``pixel_target`` and
``rgb_diff_target`` as backend ``"cuda"``, with the same input checks and return types as the other
backends. ``backend="cuda"`` (or ``FASTMAM_BACKEND=cuda``) selects them; ``auto`` does so per op only once a
recorded GPU benchmark has measured them faster than Triton (``_backend.MEASURED_PREFERENCE``). What the kernels
do not implement is sent, explicitly, to the Triton backend (the reference where Triton is absent) — see
``unsupported_reason``:

- ``masking='random'`` (per-token noise): the kernel implements tube masking only;
- more than 1024 spatial positions per time slice: one thread block sorts a sample's noise;
- more than 16 channels: per-channel statistics travel in the kernel arguments;
- clips other than uint8 (BTHWC) or float32 / float16 / bfloat16 (BCTHW), e.g. float64;
- ``out_dtype`` other than float32 / float16 / bfloat16.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections.abc import Sequence

import torch

from . import _backend
from ._checks import channel_stats, check_noise, check_same_device, clip_geometry, num_hidden
from .gather import MaskedPatches
from .targets import check_normalizable, check_rgb_diff_inputs, check_target_inputs

#: a CMake build of csrc/ (libfastmam_cuda.so), loaded when fastmam._C is absent
LIBRARY_ENV = "FASTMAM_CUDA_LIBRARY"
#: limits of the kernels, as in csrc/kernels.h
MAX_POSITIONS = 1024
MAX_CHANNELS = 16
CLIP_DTYPES = {"BTHWC": (torch.uint8,), "BCTHW": (torch.float32, torch.float16, torch.bfloat16)}
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("tube_mask_gather", "pixel_target", "rgb_diff_target")

_installed = False


def load_extension() -> bool:
    """Load the compiled ops into ``torch.ops.fastmam_cuda``; False when there are none to load."""
    if importlib.util.find_spec("fastmam._C") is not None:
        try:
            importlib.import_module("fastmam._C")
        except ImportError as e:
            warnings.warn(
                f"fastmam._C exists but does not load ({e}); the 'cuda' backend is off. Rebuild it against this "
                "torch: pip install -e . --no-build-isolation",
                stacklevel=2,
            )
            return False
        return True
    path = os.environ.get(LIBRARY_ENV)
    if path:
        torch.ops.load_library(path)  # asked for by name: a failure to load is an error, not a fallback
        return True
    return False


def _geometry(clip: torch.Tensor, layout: str):
    """(B, T, H, W, C) of a clip, without checks (fake implementations see validated inputs)."""
    if layout == "BTHWC":
        b, t, h, w, c = clip.shape
    else:
        b, c, t, h, w = clip.shape
    return b, t, h, w, c


def _register_fakes() -> None:
    @torch.library.register_fake("fastmam_cuda::tube_mask_gather")
    def _(clip, noise, ratio, tubelet, patch, mean, std, out_dtype, layout="BTHWC"):
        b, t, h, w, c = _geometry(clip, layout)
        positions = (h // patch) * (w // patch)
        slices = t // tubelet
        hidden = int(ratio * positions)
        nv, nm = slices * (positions - hidden), slices * hidden
        return (
            clip.new_empty((b, nv, tubelet * patch * patch * c), dtype=out_dtype),
            clip.new_empty((b, nv), dtype=torch.int64),
            clip.new_empty((b, nm), dtype=torch.int64),
            clip.new_empty((b, slices * positions), dtype=torch.bool),
        )

    @torch.library.register_fake("fastmam_cuda::pixel_target")
    def _(clip, ids_masked, tubelet, patch, normalize=True, mean=None, std=None, layout="BTHWC"):
        c = _geometry(clip, layout)[-1]
        return clip.new_empty((ids_masked.shape[0], ids_masked.shape[1], tubelet * patch * patch * c),
                              dtype=torch.float32)

    @torch.library.register_fake("fastmam_cuda::rgb_diff_target")
    def _(clip, ids_masked, tubelet, patch, normalize=False, next_clip=None, mean=None, std=None, layout="BTHWC"):
        c = _geometry(clip, layout)[-1]
        frames = tubelet if next_clip is not None else tubelet - 1
        return clip.new_empty((ids_masked.shape[0], ids_masked.shape[1], frames * patch * patch * c),
                              dtype=torch.float32)


def _floats(values) -> list[float] | None:
    """Per-channel statistics as the schema's ``float[]``. Pass sequences (as the config does): reading a
    CUDA tensor here would make the host wait for the GPU."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    return [float(v) for v in values]


def unsupported_reason(clip: torch.Tensor, layout: str, channels: int, positions: int | None = None,
                       masking: str = "tube", out_dtype: torch.dtype | None = None) -> str | None:
    """Why the CUDA kernels do not take these inputs (they then go to Triton or the reference), or None."""
    if masking != "tube":
        return f"masking='{masking}' (the kernel implements tube masking)"
    if clip.dtype not in CLIP_DTYPES[layout]:
        return f"a {layout} clip of {clip.dtype}"
    if channels > MAX_CHANNELS:
        return f"{channels} channels (the kernels take up to {MAX_CHANNELS})"
    if positions is not None and positions > MAX_POSITIONS:
        return f"{positions} spatial positions per slice (one thread block sorts up to {MAX_POSITIONS})"
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        return f"out_dtype={out_dtype}"
    return None


def _fallback(op: str, device: torch.device):
    backend = "triton" if device.type == "cuda" and "triton" in _backend.available(op) else "reference"
    return _backend.resolve(op, backend, device)[1]


def tube_mask_gather_cuda(
    clip: torch.Tensor,
    noise: torch.Tensor,
    ratio: float,
    tubelet: int,
    patch: int,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: torch.dtype = torch.float32,
    layout: str = "BTHWC",
    masking: str = "tube",
) -> MaskedPatches:
    """Tube masking and the gather of the visible patches in one kernel launch (see ``tube_mask_gather``)."""
    b, _, h, w, c = clip_geometry(clip, layout, tubelet, patch)
    positions = (h // patch) * (w // patch)
    if unsupported_reason(clip, layout, c, positions, masking, out_dtype) is not None:
        return _fallback("tube_mask_gather", clip.device)(clip, noise, ratio, tubelet, patch, mean, std, out_dtype,
                                                          layout, masking)
    check_noise(noise, b, positions)
    check_same_device(clip=clip, noise=noise)
    num_hidden(ratio, positions)
    if layout == "BTHWC":
        channel_stats(mean, c, "mean", clip.device)
        channel_stats(std, c, "std", clip.device)
    out = torch.ops.fastmam_cuda.tube_mask_gather(clip, noise, float(ratio), tubelet, patch, _floats(mean) or [],
                                                  _floats(std) or [], out_dtype, layout)
    return MaskedPatches(*out)


def pixel_target_cuda(clip, ids_masked, tubelet, patch, normalize=True, mean=None, std=None, layout="BTHWC"):
    """VideoMAE's pixel target of the masked tokens (see ``pixel_target``): (B, Nm, t*p*p*C) float32."""
    c = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)[-1]
    if unsupported_reason(clip, layout, c) is not None:
        return _fallback("pixel_target", clip.device)(clip, ids_masked, tubelet, patch, normalize, mean, std, layout)
    check_normalizable(tubelet * patch * patch, normalize)
    return torch.ops.fastmam_cuda.pixel_target(clip, ids_masked.long(), tubelet, patch, normalize, _floats(mean),
                                               _floats(std), layout)


def rgb_diff_target_cuda(clip, ids_masked, tubelet, patch, normalize=False, next_clip=None, mean=None, std=None,
                         layout="BTHWC"):
    """MAM2's RGB-difference target of the masked tokens (see ``rgb_diff_target``), float32."""
    check_rgb_diff_inputs(clip, tubelet, next_clip)
    c = check_target_inputs(clip, ids_masked, tubelet, patch, layout, mean, std)[-1]
    if unsupported_reason(clip, layout, c) is not None:
        return _fallback("rgb_diff_target", clip.device)(clip, ids_masked, tubelet, patch, normalize, next_clip,
                                                         mean, std, layout)
    dense = next_clip is not None
    if dense:
        check_same_device(clip=clip, next_clip=next_clip)
    check_normalizable((tubelet - (0 if dense else 1)) * patch * patch, normalize)
    return torch.ops.fastmam_cuda.rgb_diff_target(clip, ids_masked.long(), tubelet, patch, normalize, next_clip,
                                                  _floats(mean), _floats(std), layout)


def install() -> None:
    """Fake implementations and backend registration; needs ``torch.ops.fastmam_cuda`` loaded. Idempotent."""
    global _installed
    if _installed:
        return
    _register_fakes()
    _backend.register("tube_mask_gather", "cuda", tube_mask_gather_cuda)
    _backend.register("pixel_target", "cuda", pixel_target_cuda)
    _backend.register("rgb_diff_target", "cuda", rgb_diff_target_cuda)
    _installed = True


LOADED = load_extension()
if LOADED:
    install()
