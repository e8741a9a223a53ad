"""Backend registry and selection for ``fastmam.ops``.

Each public op has implementations keyed by backend: ``reference`` (pure PyTorch, always
present; the specification and the CPU path), ``triton`` and ``cuda`` (fused kernels, when
built). One switch picks: the ``backend=`` argument, else the ``FASTMAM_BACKEND`` environment
variable, else ``auto`` — the fastest implementation available for the input's device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

BACKENDS = ("reference", "triton", "cuda")
#: 'auto' on a CUDA device takes the first of these that the op has
GPU_PREFERENCE = ("triton", "cuda", "reference")
#: per-op order where a GPU benchmark (``bench/throughput.py``, recorded in ``bench/results/``) measured the CUDA
#: kernel faster than Triton. Empty until such a run exists: the CUDA kernels have not run on a GPU yet, so the
#: Triton kernels (tested against the references) stay the default and ``backend='cuda'`` opts in.
MEASURED_PREFERENCE: dict[str, tuple[str, ...]] = {}

_IMPLS: dict[str, dict[str, Callable]] = {}


class Dispatch(NamedTuple):
    """One backend choice of ``resolve``: the op, the backend it chose, the device of the op's input."""

    op: str
    backend: str
    device: torch.device


_RECORDERS: list[list[Dispatch]] = []


@contextlib.contextmanager
def record_dispatch() -> Iterator[list[Dispatch]]:
    """Record every backend choice made inside the block (public ops, and the CUDA backend's hand-offs to another
    backend), in call order: ``with record_dispatch() as calls: step(...)``, then ``calls`` holds ``Dispatch``
    entries (blocks may nest; each sees every choice). Outside a block nothing is recorded."""
    calls: list[Dispatch] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS[:] = [r for r in _RECORDERS if r is not calls]  # by identity: equal lists may nest


class BackendUnavailableError(RuntimeError):
    """The requested backend has no implementation of this op in this build or on this device."""


def register(op: str, backend: str, fn: Callable) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn


def available(op: str) -> tuple[str, ...]:
    """Backends that implement ``op`` in this build."""
    return tuple(b for b in BACKENDS if b in _IMPLS.get(op, {}))


def requested_backend(backend: str | None = None) -> str:
    choice = backend or os.environ.get("FASTMAM_BACKEND") or "auto"
    if choice not in ("auto", *BACKENDS):
        source = "backend argument" if backend else "FASTMAM_BACKEND"
        raise ValueError(f"{source}='{choice}' is not a backend; expected one of auto, {', '.join(BACKENDS)}")
    return choice


def resolve(op: str, backend: str | None, device: torch.device) -> tuple[str, Callable]:
    """Return (backend name, implementation) of ``op`` for a tensor on ``device``."""
    impls = _IMPLS[op]
    choice = requested_backend(backend)
    if choice == "auto":
        if device.type == "cuda":
            choice = next(b for b in MEASURED_PREFERENCE.get(op, GPU_PREFERENCE) if b in impls)
        else:
            choice = "reference"
    if choice not in impls:
        raise BackendUnavailableError(
            f"fastmam.ops.{op} has no '{choice}' implementation in this build "
            f"(available: {', '.join(available(op))}); pass backend='reference' or unset FASTMAM_BACKEND"
        )
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(
            f"fastmam.ops.{op}: backend 'triton' needs CUDA tensors, got a tensor on {device}; move the inputs to "
            "the GPU, use backend='reference', or set TRITON_INTERPRET=1 before importing fastmam (slow; for tests)"
        )
    if choice == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(
            f"fastmam.ops.{op}: backend 'cuda' needs CUDA tensors, got a tensor on {device}; "
            "move the inputs to the GPU or use backend='reference'"
        )
    for calls in _RECORDERS:
        calls.append(Dispatch(op, choice, torch.device(device)))
    return choice, impls[choice]
