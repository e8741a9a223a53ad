"""Launch parameters of the Triton kernels, in one place.

One function per kernel chooses everything a launch passes besides its runtime arguments: the
``tl.constexpr`` arguments (block sizes and feature flags) and the compile options ``num_warps`` and
``num_stages``. The launchers call these functions, and the ahead-of-time check
(``python -m fastmam.kernels.aot``) runs the same launchers, so a change here changes both the
kernels that run and the kernels that are checked.

``launch`` is the one place the kernels are launched from. Inside ``recording()`` it records each
launch (kernel, grid, runtime arguments, parameters) instead of running it: the AOT check runs the
launchers on meta tensors of the presets' shapes and reads the exact arguments they would pass.

No triton import here: ``fastmam.ops._triton`` reads ``CE_BLOCK_K`` from this module also where
triton is not installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, NamedTuple

# num_warps / num_stages: Triton 3.x's defaults for CUDA (CUDAOptions: 4 warps, 3 stages), the values every
# launch used before they were written down here. None of these kernels has been tuned on a GPU yet.
NUM_WARPS = 4
NUM_STAGES = 3

#: codebook entries per step of the cross-entropy kernel's loop over K (``fastmam.ops._triton`` passes it)
CE_BLOCK_K = 1024
#: largest row chunk of the token copy kernel's loop over D
COPY_ROWS_MAX_BLOCK_D = 1024


class LaunchParams(NamedTuple):
    """What a launch passes besides its runtime arguments: constexpr arguments by name, and compile options."""

    constexprs: dict[str, int | bool]
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n, for n >= 1 (``triton.next_power_of_2``, without importing triton)."""
    return 1 << (n - 1).bit_length()


def gather_normalize_params(tubelet: int, patch: int, channels: int, normalize: bool) -> LaunchParams:
    """``_gather_normalize_fwd_kernel``: one program per token, one block over its t*p*p*C values."""
    return LaunchParams(dict(TUBELET=tubelet, PATCH=patch, C=channels,
                             BLOCK=next_power_of_2(tubelet * patch * patch * channels), NORMALIZE=normalize))


def masked_target_params(tubelet: int, patch: int, channels: int, rows: int, is_uint8: bool, diff: int,
                         normalize: bool) -> LaunchParams:
    """``_masked_target_fwd_kernel``: one program per token, a (rows, C) block (``rows``: ``targets.target_rows``;
    ``diff``: ``targets.Diff``)."""
    return LaunchParams(dict(TUBELET=tubelet, PATCH=patch, C=channels, R=rows, BLOCK_R=next_power_of_2(rows),
                             BLOCK_C=next_power_of_2(channels), IS_UINT8=is_uint8, DIFF=int(diff),
                             NORMALIZE=normalize))


def cross_entropy_params(num_classes: int, block_k: int = CE_BLOCK_K) -> LaunchParams:
    """``_ce_fwd_grad_kernel``: one program per row, walking the K classes in blocks of at most ``block_k``."""
    return LaunchParams(dict(BLOCK_K=min(block_k, next_power_of_2(num_classes))))


def copy_rows_params(dim: int, scatter: bool) -> LaunchParams:
    """``_copy_rows_kernel``: one program per selected row, walking its D values in blocks of at most 1024."""
    return LaunchParams(dict(SCATTER=scatter, BLOCK_D=min(COPY_ROWS_MAX_BLOCK_D, next_power_of_2(dim))))


def hog_target_params(tubelet: int, patch: int, cell: int, bins: int, channels: int, sobel: bool,
                      normalize: bool) -> LaunchParams:
    """``_hog_target_fwd_kernel``: one program per token, a loop over its (p/cell)^2 cells, each a (cell^2, bins, C)
    block of votes (p=16, 8-px cells, 9 bins: 4 x (64, 16, 4))."""
    return LaunchParams(dict(TUBELET=tubelet, PATCH=patch, CELL=cell, BINS=bins, C=channels,
                             BLOCK_PIX=next_power_of_2(cell * cell), BLOCK_CELLS=next_power_of_2((patch // cell) ** 2),
                             BLOCK_BINS=next_power_of_2(bins), BLOCK_C=next_power_of_2(channels), SOBEL=sobel,
                             NORMALIZE=normalize))


def trajectory_target_params(side: int, steps: int, patch_std: bool) -> LaunchParams:
    """``_trajectory_target_fwd_kernel``: one program per token, a (points, steps, 2) block (``side``: points per
    token side, p / 8)."""
    return LaunchParams(dict(Q=side, L=steps, BLOCK_P=next_power_of_2(side * side), BLOCK_L=next_power_of_2(steps),
                             PATCH_STD=patch_std))


# --------------------------------------------------------------------------- the launch site


class RecordedLaunch(NamedTuple):
    """A launch seen inside ``recording()``: args are the runtime arguments in the kernel's order."""

    kernel: Any  # triton JITFunction (or InterpretedFunction under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple
    params: LaunchParams


_recorded: ContextVar[list[RecordedLaunch] | None] = ContextVar("fastmam_kernels_recorded", default=None)


def launch(kernel, grid: tuple[int, ...], args: tuple, params: LaunchParams) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``, or recorded inside ``recording()``."""
    recorded = _recorded.get()
    if recorded is not None:
        recorded.append(RecordedLaunch(kernel, tuple(grid), tuple(args), params))
        return
    kernel[grid](*args, **params.constexprs, num_warps=params.num_warps, num_stages=params.num_stages)


@contextlib.contextmanager
def recording() -> Iterator[list[RecordedLaunch]]:
    """Record the launches made in this block (of this thread or task) instead of running them.

    The launchers still allocate their outputs: call them with meta tensors."""
    recorded: list[RecordedLaunch] = []
    token = _recorded.set(recorded)
    try:
        yield recorded
    finally:
        _recorded.reset(token)
