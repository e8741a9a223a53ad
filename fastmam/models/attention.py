"""Attention backends: one function ``(q, k, v) -> out`` behind ``model.attention``.

Every backend computes ``softmax(q @ k.T / sqrt(head_dim)) @ v`` without a mask, on tensors of shape
(B, heads, N, head_dim) (queries and keys may differ in length: the regressor's cross-attention).

- ``sdpa`` (default): PyTorch's ``scaled_dot_product_attention``. On CUDA the kernel is chosen from
  ``SDPA_PRIORITY``: the flash kernel first (bf16/fp16 on Ampere and Hopper), then the memory-efficient
  one where flash is not eligible (fp32, unusual head dims), then math. cuDNN attention is left out so
  the choice does not change with the torch version or the cuDNN it ships (torch 2.5.0 put cuDNN first
  on H100, and later releases prefer it on sm90 with recent cuDNN); ``bench/throughput.py`` times every
  SDPA kernel on the device so that a recorded GPU run can decide otherwise.
- ``flash_attn``: the flash-attn package (CUDA, fp16/bf16).
- ``xformers``: xformers' ``memory_efficient_attention`` (CUDA).

A backend is resolved once, when the model is built (``attention_function``): a missing package or a
device without kernels is an error then, not in the middle of a step. Calls cost one function call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "flash_attn", "xformers")
#: what to install for each optional backend (named in errors)
INSTALL = {
    "flash_attn": "pip install 'fastmam[flash-attn]' (the flash-attn package; it builds against your CUDA torch)",
    "xformers": "pip install 'fastmam[xformers]' (an xformers wheel that matches your torch)",
}
_MODULES = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}

#: SDPA kernels on CUDA, in the order they are tried
SDPA_PRIORITY = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# torch >= 2.6 takes the list as a priority order; 2.5 only enables the listed kernels, and its
# default order among these three is the same (flash, efficient, math)
if "set_priority" in inspect.signature(sdpa_kernel).parameters:
    _sdpa_priority = functools.partial(sdpa_kernel, SDPA_PRIORITY, set_priority=True)
else:
    _sdpa_priority = functools.partial(sdpa_kernel, SDPA_PRIORITY)


class AttentionBackendError(RuntimeError):
    """The configured attention backend cannot run here; the message says why and what to do."""


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The specification, in the input dtype: q (B, H, Nq, D), k and v (B, H, Nk, D) -> (B, H, Nq, D)."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch SDPA; on CUDA the kernel comes from ``SDPA_PRIORITY`` (flash first). Shapes as the reference."""
    if q.is_cuda:
        with _sdpa_priority():
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _flash_attn(module) -> Callable:
    def flash_attn_attention(q, k, v):
        # flash-attn takes (B, N, H, D); transposed views keep the last dim contiguous, so nothing is copied
        return module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return flash_attn_attention


def _xformers(module) -> Callable:
    def xformers_attention(q, k, v):
        out = module.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return xformers_attention


_WRAPPERS = {"flash_attn": _flash_attn, "xformers": _xformers}


def is_installed(name: str) -> bool:
    """Whether the package behind a backend can be imported (``sdpa`` always can)."""
    if name == "sdpa":
        return True
    return importlib.util.find_spec(_MODULES[name].split(".")[0]) is not None


def available_backends(device_type: str) -> tuple[str, ...]:
    """Backends that can run on this kind of device in this environment."""
    return tuple(b for b in BACKENDS if b == "sdpa" or (device_type == "cuda" and is_installed(b)))


def attention_function(name: str, device_type: str, dtype: torch.dtype | None = None) -> Callable:
    """The function of backend ``name`` for a model that will run on ``device_type`` in ``dtype``.

    Raises ``AttentionBackendError`` naming the fix when the backend cannot run there: flash-attn and
    xformers have CUDA kernels only, flash-attn computes in fp16/bf16 only, and either package may be
    missing.
    """
    if name not in BACKENDS:
        raise AttentionBackendError(f"model.attention='{name}' is not a backend; expected one of {', '.join(BACKENDS)}")
    if name == "sdpa":
        return sdpa_attention
    if device_type != "cuda":
        raise AttentionBackendError(
            f"model.attention='{name}' runs only on CUDA GPUs ({name} has no {device_type} kernels); "
            "use model.attention=sdpa on this device"
        )
    if name == "flash_attn" and dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise AttentionBackendError(
            f"model.attention='flash_attn' computes in fp16/bf16 only, but the model runs in {dtype}; "
            "use deepspeed.precision=bf16 (or auto on a GPU), or model.attention=sdpa"
        )
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise AttentionBackendError(
            f"model.attention='{name}' needs the {name.replace('_', '-')} package, which is not importable "
            f"({exc}); install it: {INSTALL[name]}; or use model.attention=sdpa"
        ) from exc
    return _WRAPPERS[name](module)
