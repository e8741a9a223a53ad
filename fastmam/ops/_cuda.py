"""The CUDA C++ backend of the ops: the kernels of ``csrc/``, built by setup.py into ``fastmam._C``.

Importing this module loads the extension when it exists: ``import fastmam._C`` registers
``torch.ops.fastmam_cuda.*`` (a library built with CMake instead is loaded from the path in
``FASTMAM_CUDA_LIBRARY``). On a build without it (CPU torch, no nvcc) nothing happens and nothing is
printed; a ``fastmam._C`` that exists but fails to load (built against another torch) warns once.

When loaded, it registers fake (meta) implementations of the three ops, so ``torch.compile`` traces
them as single graph nodes, and registers ``tube_mask_gather``, ``pixel_target`` and
``rgb_diff_target`` as backend ``"cuda"``, with the return types of the other backends (the public op
validates the inputs, once, for every backend). ``backend="cuda"`` (or ``FASTMAM_BACKEND=cuda``) selects
them; ``auto`` does so per op only once a recorded GPU benchmark has measured them faster than Triton
(``_backend.MEASURED_PREFERENCE``). What the kernels do not implement is sent, explicitly, to the Triton
backend (the reference where Triton is absent) — see ``unsupported_reason``:

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

import torch

from . import _backend
from ._checks import stat_list
from .gather import GatherInputs, MaskedPatches
from .targets import Diff, TargetInputs

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


def tube_mask_gather_cuda(clip, noise, tubelet, patch, out_dtype, layout, masking,
                          args: GatherInputs) -> MaskedPatches:
    """Tube masking and the gather of the visible patches in one kernel launch (see ``tube_mask_gather``);
    inputs validated by the public op."""
    b, _, h, w, c = args.geometry
    positions = (h // patch) * (w // patch)
    if unsupported_reason(clip, layout, c, positions, masking, out_dtype) is not None:
        return _fallback("tube_mask_gather", clip.device)(clip, noise, tubelet, patch, out_dtype, layout, masking,
                                                          args)
    out = torch.ops.fastmam_cuda.tube_mask_gather(clip, noise, args.ratio, tubelet, patch, stat_list(args.mean) or [],
                                                  stat_list(args.std) or [], out_dtype, layout)
    return MaskedPatches(*out)


def target_cuda(clip, next_clip, tubelet, patch, normalize, layout, diff: Diff, args: TargetInputs):
    """VideoMAE's pixel target or MAM2's RGB difference of the masked tokens (``diff``), float32; inputs
    validated by the public op."""
    op = "pixel_target" if diff == Diff.PIXELS else "rgb_diff_target"
    if unsupported_reason(clip, layout, args.geometry[-1]) is not None:
        return _fallback(op, clip.device)(clip, next_clip, tubelet, patch, normalize, layout, diff, args)
    mean, std = stat_list(args.mean), stat_list(args.std)
    if diff == Diff.PIXELS:
        return torch.ops.fastmam_cuda.pixel_target(clip, args.ids, tubelet, patch, normalize, mean, std, layout)
    return torch.ops.fastmam_cuda.rgb_diff_target(clip, args.ids, tubelet, patch, normalize, next_clip, mean, std,
                                                  layout)


def install() -> None:
    """Fake implementations and backend registration; needs ``torch.ops.fastmam_cuda`` loaded. Idempotent."""
    global _installed
    if _installed:
        return
    _register_fakes()
    _backend.register("tube_mask_gather", "cuda", tube_mask_gather_cuda)
    _backend.register("pixel_target", "cuda", target_cuda)
    _backend.register("rgb_diff_target", "cuda", target_cuda)
    _installed = True


LOADED = load_extension()
if LOADED:
    install()
