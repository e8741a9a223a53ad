"""Input checks shared by the ops: each error names the argument, what it got and what it expects."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence

import torch

LAYOUTS = ("BTHWC", "BCTHW")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout='{layout}' is not supported; expected 'BTHWC' (uint8 loaders) or 'BCTHW' (VideoMAE)")


def clip_geometry(clip: torch.Tensor, layout: str, tubelet: int, patch: int) -> tuple[int, int, int, int, int]:
    """Validate a clip and return (B, T, H, W, C) whatever its layout."""
    check_layout(layout)
    if not isinstance(clip, torch.Tensor):
        raise TypeError(f"clip must be a torch.Tensor, got {type(clip).__name__}")
    if clip.dim() != 5:
        raise ValueError(f"clip must be 5-D ({layout}), got shape {tuple(clip.shape)}")
    if layout == "BTHWC":
        if clip.dtype != torch.uint8:
            raise TypeError(
                f"a BTHWC clip must be uint8 (raw frames from a loader), got {clip.dtype}; "
                "pass float clips already normalized in VideoMAE's layout with layout='BCTHW'"
            )
        b, t, h, w, c = clip.shape
    else:
        if not clip.is_floating_point():
            raise TypeError(
                f"a BCTHW clip must be floating point (normalized, VideoMAE's layout), got {clip.dtype}; "
                "pass uint8 frames as (B, T, H, W, C) with layout='BTHWC'"
            )
        b, c, t, h, w = clip.shape
    if tubelet < 1 or patch < 1:
        raise ValueError(f"tubelet and patch must be >= 1, got tubelet={tubelet}, patch={patch}")
    if t % tubelet or h % patch or w % patch:
        raise ValueError(
            f"clip of T={t}, H={h}, W={w} does not tile into tubelets of {tubelet} frames and {patch}x{patch} "
            "patches; crop or resize so that T % tubelet == H % patch == W % patch == 0"
        )
    return b, t, h, w, c


def check_ratio(ratio) -> float:
    """A mask ratio as a Python float in (0, 1): a number (int, float, numpy scalar) or a one-element tensor.

    A tensor on a GPU is read with a host sync: pass a number (the config does)."""
    if isinstance(ratio, torch.Tensor) and ratio.numel() == 1 and not ratio.is_complex():
        ratio = ratio.item()
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask ratio must be a number in (0, 1), got {ratio!r}")
    return float(ratio)


def num_hidden(ratio: float, positions: int) -> int:
    """VideoMAE's rule: ``int(ratio * positions)`` positions are hidden; at least one hidden and one kept."""
    ratio = check_ratio(ratio)
    hidden = int(ratio * positions)
    if not 0 < hidden < positions:
        raise ValueError(
            f"mask ratio {ratio} hides {hidden} of {positions} positions; "
            "it must hide at least one and keep at least one"
        )
    return hidden


def check_values(ok: torch.Tensor, summary: str, details: Callable[[], str]) -> None:
    """Assert a 0-d bool tensor computed from the inputs' values, without a host sync where one would cost.

    CPU tensors (eager): read now; ``ValueError(f"{summary}: {details()}")``. CUDA tensors, and inside
    ``torch.compile``: ``torch._assert_async`` queues the check on the device (a handful of tiny kernels, no host
    sync) with ``summary`` (a constant: the values stay on the device); a failure surfaces as an error at the next
    synchronization, as PyTorch's own index checks do on a GPU, and stops the kernels that follow from running,
    so nothing reads out of bounds."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise ValueError(f"{summary}: {details()}")
        return
    torch._assert_async(ok, f"fastmam.ops: {summary} (checked on the device; the same call on CPU tensors names "
                            "the values)")


def check_noise(noise: torch.Tensor, batch: int | None, positions: int | None, name: str = "noise") -> None:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        got = noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise TypeError(f"{name} must be a floating-point tensor (e.g. torch.rand), got {got}")
    if noise.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, positions), got shape {tuple(noise.shape)}")
    if batch is not None and noise.shape[0] != batch:
        raise ValueError(f"{name} has batch {noise.shape[0]} but the clip has batch {batch}")
    if positions is not None and noise.shape[1] != positions:
        raise ValueError(f"{name} has {noise.shape[1]} positions per sample, expected {positions}")
    # NaN has no rank: backends that sort differently would mask differently
    check_values(~noise.isnan().any(), f"{name} contains NaN",
                 lambda: f"{noise.isnan().sum().item()} position(s); draw it with torch.rand (values in [0, 1))")


def check_ids(ids: torch.Tensor, batch: int, num_tokens: int, name: str) -> None:
    """Shape, dtype, and every id in [0, num_tokens) (a device-side check on a GPU, see ``check_values``)."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor of token indices, got {got}")
    if ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B={batch}, K), got {tuple(ids.shape)}")
    if ids.shape[1] > num_tokens:
        raise ValueError(f"{name} selects {ids.shape[1]} tokens but there are only {num_tokens}")
    if ids.numel():
        check_in_range(ids, num_tokens, name, "token ids")


def check_in_range(values: torch.Tensor, size: int, name: str, what: str, ignore_index: int | None = None) -> None:
    """Every value in [0, size) (or equal to ``ignore_index``), checked as ``check_values`` does."""
    ok = (values >= 0) & (values < size)
    if ignore_index is not None:
        ok |= values == ignore_index

    def details() -> str:
        allowed = f"[0, {size})" + (f" or ignore_index={ignore_index}" if ignore_index is not None else "")
        return (f"{int((~ok).sum())} of them outside {allowed} (min {values.min().item()}, max "
                f"{values.max().item()}); they must index the {size} entries")

    check_values(ok.all(), f"{name} holds {what} out of range", details)


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"inputs must be on one device, got {listing}")


def stat_values(values: Sequence[float] | torch.Tensor | None, channels: int, name: str,
                positive: bool = False) -> tuple[float, ...]:
    """Per-channel mean or std as a tuple of floats, checked once at the public op: one finite value per
    channel (and > 0 for a std). A tensor on a GPU is read with a host sync: pass a sequence (the config does)."""
    if values is None:
        raise ValueError(f"{name} is needed here: pass one value per channel ({channels}) in [0, 1] pixel units, "
                         "e.g. ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)")
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a sequence of {channels} numbers, got {values!r}") from e
    if len(out) != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {len(out)}")
    if not all(math.isfinite(v) for v in out) or (positive and not all(v > 0 for v in out)):
        need = "finite and > 0" if positive else "finite"
        raise ValueError(f"{name} must be {need} for every channel, got {out}")
    return out


def stat_list(values: tuple[float, ...] | None) -> list[float] | None:
    """Validated statistics (``stat_values``) as a custom op schema's ``float[]``, or None."""
    return None if values is None else list(values)


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating-point dtype (torch.float32, torch.bfloat16, torch.float16), "
                        f"got {out_dtype}")


@functools.lru_cache(maxsize=64)
def _stats_on(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def channel_stats(values: Sequence[float] | torch.Tensor, channels: int, name: str, device) -> torch.Tensor:
    """Per-channel mean or std as a read-only fp32 (C,) tensor on ``device``.

    A sequence is copied to the device once and cached: a fresh host-to-device copy in every call
    would make the host wait for the GPU in every training step."""
    if isinstance(values, torch.Tensor):
        stats = values.to(device=device, dtype=torch.float32).flatten()
    elif torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        # traced once into a graph constant: no copy per call to cache. Under a dispatch mode (FakeTensorMode, a
        # tracer) the tensor made here belongs to that mode: cached, it would reach later real calls
        stats = torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)
    else:
        stats = _stats_on(tuple(float(v) for v in values), torch.device(device))
    if stats.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {stats.numel()}")
    return stats
