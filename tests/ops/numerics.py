"""The tolerance rule of the op tests, in one place (CONVENTIONS, "Tests").

A backend's output ``got`` is compared with ``exact``, the op's formula evaluated in float64 from the same
(already rounded) inputs, and may be off by twice what the reference (the specification, run in the op's own
precision) is off, plus a few fp32 ulps:

    err(got, exact) <= 2 * err(ref, exact) + atol,    atol = max(4, log2(R)) * eps_fp32 * max|exact|

``err`` is the largest absolute difference over all elements. R is the length of the longest sum the op takes
(the values a patch is normalized over, the codebook size of a cross-entropy, the tokens a weight gradient sums
over): a pairwise sum of R terms in another order is off by up to log2(R) ulps, and a reference that happens to
land on the exact value must not leave the bound at zero. Integers (ids, masks, codes) and pure copies are
compared with ``assert_equal``: exactly.
"""

from __future__ import annotations

import math
import os

import torch

EPS32 = torch.finfo(torch.float32).eps


def tolerance(ref: torch.Tensor, exact: torch.Tensor, *, reduction: int = 1) -> tuple[float, float, float]:
    """(bound, err(ref, exact), atol) of the rule above; ``exact`` is float64."""
    err_ref = (ref.detach().double().cpu() - exact.cpu()).abs().max().item()
    atol = max(4.0, math.log2(max(reduction, 1))) * EPS32 * exact.abs().max().item()
    return 2 * err_ref + atol, err_ref, atol


def assert_close_to_exact(
    got: torch.Tensor,
    ref: torch.Tensor,
    exact: torch.Tensor,
    *,
    reduction: int = 1,
    name: str = "output",
    floor: float = 0.0,
) -> None:
    """Assert ``err(got, exact) <= max(2 * err(ref, exact) + atol, floor)`` (see the module docstring).

    got, ref: a backend's and the reference's outputs, same shape and dtype; exact: float64, same shape.
    ``floor``: an absolute error allowed whatever the reference does, for a known rounding of the test
    platform (``interpreter_rounding_floor``); 0 elsewhere. A NaN anywhere fails. The message gives the max and
    mean error, the bound and its parts, and the worst element."""
    assert got.shape == ref.shape == exact.shape, (
        f"{name}: shapes differ: got {tuple(got.shape)}, reference {tuple(ref.shape)}, exact {tuple(exact.shape)}"
    )
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype}, the reference returns {ref.dtype}"
    assert exact.dtype == torch.float64, f"{name}: the exact values must be float64, got {exact.dtype}"
    if got.numel() == 0:
        return
    bound, err_ref, atol = tolerance(ref, exact, reduction=reduction)
    bound = max(bound, floor)
    err = (got.detach().double().cpu() - exact.cpu()).abs()
    worst = err.max().item()  # NaN if any element is NaN, and NaN <= bound is False
    if not worst <= bound:
        i = int(torch.nan_to_num(err, nan=math.inf).flatten().argmax())
        where = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{name}: max err {worst:.3g}, mean err {err.mean().item():.3g} > bound {bound:.3g} "
            f"= 2 * reference err {err_ref:.3g} + atol {atol:.3g} (R={reduction}, floor {floor:.3g}); worst at "
            f"{where}: got {got.flatten()[i].item()!r}, reference {ref.flatten()[i].item()!r}, "
            f"exact {exact.flatten()[i].item()!r}"
        )


def assert_equal(got: torch.Tensor, ref: torch.Tensor, *, name: str = "output") -> None:
    """Integers (ids, masks, codes) and pure copies: same shape, dtype and every element."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, the reference has {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype}, the reference returns {ref.dtype}"
    if not torch.equal(got, ref):
        differ = got != ref
        i = int(differ.flatten().nonzero()[0])
        where = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), got.shape))
        raise AssertionError(
            f"{name}: {int(differ.sum())} of {got.numel()} elements differ; first at {where}: "
            f"got {got.flatten()[i].item()!r}, reference {ref.flatten()[i].item()!r}"
        )


def interpreter_rounding_floor(dtype: torch.dtype, exact: torch.Tensor, device: torch.device | str) -> float:
    """One bf16 ulp of max|exact| for a bf16 output that a Triton kernel stored under ``TRITON_INTERPRET=1``
    (CPU tensors): the interpreter's fp32 -> bf16 conversion truncates instead of rounding to nearest, so a
    correct kernel is off by up to one ulp where the reference is off by half. 0 on a GPU and for other dtypes."""
    interpreted = torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if dtype != torch.bfloat16 or not interpreted or exact.numel() == 0:
        return 0.0
    return torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
