"""Triton kernel for token gather / scatter: copy rows of (B, N, D) tokens selected by ids (B, K).

gather: out[b, k] = x[b, ids[b, k]]; scatter: out[b, ids[b, k]] = x[b, k] into zeros. Each is the
other's backward (ids are distinct per sample, as masking produces them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import copy_rows_params, launch


@triton.jit
def _copy_rows_kernel(
    src_ptr,  # (B, N_src, D), row stride s_row, batch stride s_b
    dst_ptr,  # (B, N_dst, D), contiguous
    ids_ptr,  # (B, K) int64, contiguous
    K, D, s_b, s_row, n_dst, N,
    SCATTER: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one program per (b, k)
    b = pid // K
    n = tl.load(ids_ptr + pid).to(tl.int64)
    # the caller's check rejects ids outside [0, N) before the launch; using row 0 in their place as well means
    # that no program reads or writes outside x or out (N = n_dst for a scatter, N_src for a gather)
    n = tl.where((n >= 0) & (n < N), n, 0)
    if SCATTER:
        src_row = src_ptr + b * s_b + (pid % K) * s_row
        dst_row = dst_ptr + (b * n_dst + n) * D
    else:
        src_row = src_ptr + b * s_b + n * s_row
        dst_row = dst_ptr + pid * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tl.store(dst_row + d, tl.load(src_row + d, mask=d < D), mask=d < D)


def copy_rows(x: torch.Tensor, ids: torch.Tensor, num_out: int, scatter: bool) -> torch.Tensor:
    """Launcher: gather (B, K, D) rows of x at ids, or scatter x's K rows into zeros (B, num_out, D)."""
    b, _, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    ids = ids.contiguous()
    k = ids.shape[1]
    out = (torch.zeros if scatter else torch.empty)((b, num_out, d), dtype=x.dtype, device=x.device)
    if b * k * d:
        launch(_copy_rows_kernel, (b * k,),
               (x, out, ids, k, d, x.stride(0), x.stride(1), num_out, num_out if scatter else x.shape[1]),
               copy_rows_params(d, scatter))
    return out
