"""Token masking: tube masking (VideoMAE / MAM2) and per-token random masking.

Semantics (every backend must match these exactly):

- tokens are ordered (time, row, column): token ``n = i * S + s`` for time slice ``i`` and
  spatial position ``s`` among ``S = (H/p) * (W/p)``;
- randomness enters only as ``noise``. A position is kept when its noise ranks among the
  ``positions - int(ratio * positions)`` smallest; ties go to the lower index (a stable sort);
  NaN noise is rejected (it has no rank that every backend's sort would agree on);
- tube masking hides the same spatial set in every time slice;
- ``ids_keep`` and ``ids_masked`` are ascending token indices (int64) and ``mask`` is a bool
  tensor, True where a token is hidden (MAE convention).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_noise, num_hidden


class Masking(NamedTuple):
    """ids_keep: (B, Nv) int64; ids_masked: (B, Nm) int64; mask: (B, N) bool, True = hidden."""

    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    mask: torch.Tensor


def _ids_from_mask(mask: torch.Tensor, hidden: int) -> Masking:
    # A stable sort of the 0/1 mask puts visible tokens first and hidden ones after, each group in
    # ascending token order: the ids without boolean indexing, so without a host sync.
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    n = mask.shape[1]
    return Masking(order[:, : n - hidden].contiguous(), order[:, n - hidden :].contiguous(), mask)


def _hidden_positions(noise: torch.Tensor, hidden: int) -> torch.Tensor:
    """(B, P) noise -> (B, P) bool, True at the ``hidden`` positions of largest noise (stable ranks)."""
    ranks = torch.argsort(noise, dim=1, stable=True)
    keep = noise.shape[1] - hidden
    return torch.zeros(noise.shape, dtype=torch.bool, device=noise.device).scatter_(1, ranks[:, keep:], True)


def mask_tokens(noise: torch.Tensor, hidden: int, num_slices: int, kind: str) -> Masking:
    """The masking of validated inputs: ``hidden`` of the noise's positions hidden (per slice for 'tube')."""
    spatial = _hidden_positions(noise, hidden)
    if kind == "tube":
        return _ids_from_mask(spatial.repeat(1, num_slices), hidden * num_slices)
    return _ids_from_mask(spatial, hidden)


def tube_masking_reference(noise: torch.Tensor, ratio: float, num_slices: int) -> Masking:
    """Tube masking from noise (the specification).

    noise: (B, S) float, S spatial positions per time slice; num_slices: T / tubelet.
    Returns ``Masking`` over N = num_slices * S tokens, ``int(ratio * S)`` hidden per slice.
    """
    check_noise(noise, None, None)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    return mask_tokens(noise, num_hidden(ratio, noise.shape[1]), num_slices, "tube")


def random_masking_reference(noise: torch.Tensor, ratio: float) -> Masking:
    """Per-token random masking from noise (the specification).

    noise: (B, N) float, one value per token. Returns ``Masking`` with ``int(ratio * N)`` hidden.
    """
    check_noise(noise, None, None)
    return mask_tokens(noise, num_hidden(ratio, noise.shape[1]), 1, "random")


_backend.register("tube_masking", "reference", tube_masking_reference)
_backend.register("random_masking", "reference", random_masking_reference)


def tube_masking(noise: torch.Tensor, ratio: float, num_slices: int, *, backend: str | None = None) -> Masking:
    """Tube masking: the same ``int(ratio * S)`` spatial positions hidden in every time slice.

    noise: (B, S) float (e.g. ``torch.rand(B, S, generator=g)``); same noise => identical outputs
    on every backend. Returns ``Masking(ids_keep (B, Nv), ids_masked (B, Nm), mask (B, N) bool)``.
    """
    _, impl = _backend.resolve("tube_masking", backend, noise.device)
    return impl(noise, ratio, num_slices)


def random_masking(noise: torch.Tensor, ratio: float, *, backend: str | None = None) -> Masking:
    """Per-token random masking: ``int(ratio * N)`` of the N tokens hidden, chosen by ``noise`` (B, N)."""
    _, impl = _backend.resolve("random_masking", backend, noise.device)
    return impl(noise, ratio)
