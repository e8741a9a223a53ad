"""Token masking: tube masking (VideoMAE / MAM2), per-token random masking, and VideoMAE V2's decoder masking.

Semantics (every backend must match these exactly):

- tokens are ordered (time, row, column): token ``n = i * S + s`` for time slice ``i`` and
  spatial position ``s`` among ``S = (H/p) * (W/p)``;
- randomness enters only as ``noise``. A position is kept when its noise ranks among the
  ``positions - int(ratio * positions)`` smallest; ties go to the lower index (a stable sort);
  NaN noise is rejected (it has no rank that every backend's sort would agree on);
- tube masking hides the same spatial set in every time slice;
- ``ids_keep`` and ``ids_masked`` are ascending token indices (int64) and ``mask`` is a bool
  tensor, True where a token is hidden (MAE convention).

Decoder masking (VideoMAE V2, Wang et al., CVPR 2023, "dual masking"): the decoders reconstruct only
``ids_decode``, an ascending subset of ``ids_masked`` of exactly ``Nd = Nm - int(ratio * Nm)`` tokens per clip
(``ratio``: the fraction of the masked tokens the decoders drop), chosen from its own ``noise`` of shape
(B, 1 + N): column 0 draws the running cell's starting pointer, column ``1 + n`` is token n's value.

- ``running_cell``: VideoMAE V2's map. A 2x2 cell (position ``k = 2 * (row % 2) + column % 2``) holds a queue of
  ``int(4 * ratio)`` dropped and ``4 - int(4 * ratio)`` kept entries; in time slice ``i`` position k reads queue
  entry ``(k + ptr + i + 1) % 4`` (the pointer advances by one before each slice), entries ``< int(4 * ratio)``
  drop; the cell tiles the (H/p, W/p) grid. The starting pointer ``ptr = min(floor(4 * noise[:, 0]), 3)`` (uniform
  over the 4 values for noise in [0, 1), as V2 draws it). The masked tokens are ranked by (dropped by the cell,
  their noise value, token index) and the first Nd are decoded: the cell's kept masked tokens first, the map
  trimmed or filled to exactly Nd by the noise. With a number of time slices divisible by 4 and a tube encoder
  mask, every position is kept in exactly ``4 - int(4 * ratio)`` of each 4 slices, so the cell keeps exactly Nd
  masked tokens and ``ids_decode`` is V2's "masked and kept by the cell" with no tie-break. The ratio must be
  0.25, 0.5 or 0.75 (what a 2x2 cell can drop) and the grid even in rows and columns (V2's tiling of the cell is
  undefined otherwise).
- ``random``: the Nd masked tokens of smallest noise value (ties to the lower index): a uniformly random subset.
- Both are sorts of per-token values on the tensors' device: no host RNG, no host sync; the same noise gives the
  same ``ids_decode`` on every device.
- Where this differs from V2's released code: V2 decodes every masked token its cell keeps, a count that varies
  per clip where the slices do not fill whole cycles of the cell (its loss divides by the batch's total); here
  the count is fixed (a batched tensor needs it) by the fill/trim rule above. And V2's decoder also gets mask
  tokens at the visible positions the cell keeps, whose outputs its loss ignores; fastmam's decoders get mask
  tokens at ``ids_decode`` only (``fastmam.models.mam``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _backend
from ._checks import check_ids, check_noise, check_ratio, check_same_device, check_values, num_hidden


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


DECODER_MASKINGS = ("running_cell", "random")
#: entries of VideoMAE V2's running cell: a 2x2 cell, so a queue of 4
CELL_SIZE = 4


def decoder_noise_positions(num_tokens: int) -> int:
    """Columns of decoder-masking noise: the running cell's starting pointer, then one value per token."""
    return 1 + num_tokens


def cell_drops(ratio: float) -> int:
    """Positions of the 2x2 running cell that the decoder drops: ``int(4 * ratio)``, VideoMAE V2's rule; the ratio
    must be one a cell can realize (0.25, 0.5, 0.75), or the decoded fraction would silently differ from it."""
    ratio = check_ratio(ratio)
    drops = int(CELL_SIZE * ratio)
    if not 0 < drops < CELL_SIZE or drops != CELL_SIZE * ratio:
        raise ValueError(f"running-cell decoder masking drops int(4 * ratio) of the 4 positions of a 2x2 cell; "
                         f"ratio {ratio} is not one of 0.25, 0.5, 0.75: use one of those, or kind='random'")
    return drops


def num_decoded(num_masked: int, ratio: float) -> int:
    """``Nd = Nm - int(ratio * Nm)``: masked tokens the decoders keep per clip (at least one dropped, one kept)."""
    ratio = check_ratio(ratio)
    dropped = int(ratio * num_masked)
    if not 0 < dropped < num_masked:
        raise ValueError(f"decoder mask ratio {ratio} drops {dropped} of the {num_masked} masked tokens; "
                         "it must drop at least one and keep at least one")
    return num_masked - dropped


def _check_grid(grid, kind: str) -> tuple[int, int, int]:
    """(T/t, H/p, W/p) as three ints; even rows and columns for the running cell."""
    if len(grid) != 3 or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
        raise ValueError(f"grid must be (T/t, H/p, W/p): three positive ints, got {grid!r}")
    slices, rows, cols = grid
    if kind == "running_cell" and (rows % 2 or cols % 2):
        raise ValueError(f"the running cell tiles a 2x2 cell over the {rows}x{cols} patch grid: it needs an even "
                         "number of rows and columns (VideoMAE V2 defines it only there); use kind='random'")
    return slices, rows, cols


def running_cell_map(phase: torch.Tensor, grid: tuple[int, int, int], ratio: float) -> torch.Tensor:
    """VideoMAE V2's running-cell map: phase (B,) int64 starting pointers in [0, 4), grid (T/t, H/p, W/p) with even
    H/p and W/p -> (B, N) bool over the tokens in (time, row, column) order, True where the decoder drops a token."""
    slices, rows, cols = _check_grid(grid, "running_cell")
    drops = cell_drops(ratio)
    dev = phase.device
    r = torch.arange(rows, device=dev).view(rows, 1)
    c = torch.arange(cols, device=dev).view(1, cols)
    cell = (2 * (r % 2) + c % 2).view(1, 1, rows * cols)  # position inside the 2x2 cell
    step = torch.arange(1, slices + 1, device=dev).view(1, slices, 1)  # the pointer advances before each slice
    entry = (cell + step + phase.view(-1, 1, 1)) % CELL_SIZE
    return (entry < drops).reshape(phase.shape[0], slices * rows * cols)


def cell_phase(noise: torch.Tensor) -> torch.Tensor:
    """(B, 1 + N) decoder noise -> (B,) int64 running-cell starting pointers ``min(floor(4 * noise[:, 0]), 3)``
    (clamped to [0, 3] for any value; times 4 is exact in every float format, so every device agrees)."""
    return torch.floor(noise[:, 0] * CELL_SIZE).clamp(0, CELL_SIZE - 1).long()


def check_decoder_masking(noise, ids_masked, ratio, grid, kind) -> int:
    """Validate ``decoder_masking``'s inputs; returns Nd."""
    if kind not in DECODER_MASKINGS:
        raise ValueError(f"decoder masking kind='{kind}' is not supported; expected 'running_cell' or 'random'")
    slices, rows, cols = _check_grid(grid, kind)
    n = slices * rows * cols
    if not isinstance(ids_masked, torch.Tensor) or ids_masked.dim() != 2:
        raise ValueError(f"ids_masked must be (B, Nm), got {getattr(ids_masked, 'shape', type(ids_masked).__name__)}")
    b, nm = ids_masked.shape
    check_noise(noise, b, decoder_noise_positions(n), "decoder noise")
    check_ids(ids_masked, b, n, "ids_masked")
    check_same_device(noise=noise, ids_masked=ids_masked)
    if nm > 1:
        check_values((ids_masked.diff(dim=1) > 0).all(), "ids_masked must be strictly ascending",
                     lambda: "pass the ids_masked of a masking op (ascending token order)")
    if kind == "running_cell":
        cell_drops(ratio)
    return num_decoded(nm, ratio)


def _decoder_masking_reference(noise, ids_masked, ratio, grid, kind, num_decode: int) -> torch.Tensor:
    ids = ids_masked.long()
    values = noise[:, 1:].gather(1, ids)  # (B, Nm): each masked token's value
    order = torch.argsort(values, dim=1, stable=True)  # by value, ties to the lower index
    if kind == "running_cell":
        dropped = running_cell_map(cell_phase(noise), grid, ratio).gather(1, ids)
        # a stable sort by the cell's verdict keeps the value order inside each group: kept by the cell first
        order = order.gather(1, torch.argsort(dropped.gather(1, order).to(torch.int8), dim=1, stable=True))
    chosen = order[:, :num_decode].sort(dim=1).values  # positions in ids_masked, ascending
    return ids.gather(1, chosen)


def decoder_masking_reference(noise: torch.Tensor, ids_masked: torch.Tensor, ratio: float,
                              grid: tuple[int, int, int], kind: str = "running_cell") -> torch.Tensor:
    """The decoder's subset of the masked tokens (the specification; rules in the module docstring).

    noise: (B, 1 + N) float, N = prod(grid); ids_masked: (B, Nm) int64 ascending; ratio: fraction of the masked
    tokens dropped; grid: (T/t, H/p, W/p). Returns ids_decode (B, Nm - int(ratio * Nm)) int64, ascending.
    """
    nd = check_decoder_masking(noise, ids_masked, ratio, grid, kind)
    return _decoder_masking_reference(noise, ids_masked, ratio, grid, kind, nd)


_backend.register("tube_masking", "reference", tube_masking_reference)
_backend.register("random_masking", "reference", random_masking_reference)
_backend.register("decoder_masking", "reference", _decoder_masking_reference)


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


def decoder_masking(noise: torch.Tensor, ids_masked: torch.Tensor, ratio: float, grid: tuple[int, int, int],
                    kind: str = "running_cell", *, backend: str | None = None) -> torch.Tensor:
    """VideoMAE V2's decoder masking: the ``Nd = Nm - int(ratio * Nm)`` masked tokens the decoders reconstruct.

    noise: (B, 1 + N) float (e.g. ``torch.rand``; column 0 the running cell's starting pointer, then one value per
    token); ids_masked: (B, Nm) int64 ascending, from a masking op; ratio: fraction of the masked tokens dropped
    (0.25, 0.5 or 0.75 for 'running_cell'); grid: (T/t, H/p, W/p); kind: 'running_cell' or 'random'.
    Returns ids_decode: (B, Nd) int64, ascending, a subset of each row of ids_masked. Same noise => same ids on
    every device; computed on the inputs' device without a host sync.
    """
    nd = check_decoder_masking(noise, ids_masked, ratio, grid, kind)
    _, impl = _backend.resolve("decoder_masking", backend, noise.device)
    return impl(noise, ids_masked, ratio, grid, kind, nd)
