"""Triton kernel for the appearance term of the dual-decoder loss: cross-entropy over the codebook
with its gradient, one row of logits at a time, in place.

The driver (``fastmam.ops._triton``) walks the masked tokens in chunks: logits of one chunk come from a
matmul, this kernel turns them into per-row losses and overwrites them with d(loss)/d(logits), and
the chunk's gradients for the hidden states, head weight and bias follow by two more matmuls. The
(M x K) logits never exist whole; peak memory is one chunk of them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CE_BLOCK_K, cross_entropy_params, launch


@triton.jit
def _ce_fwd_grad_kernel(
    logits_ptr,  # (R, K) fp32, row stride stride_r; overwritten with the gradient
    target_ptr,  # (R,) int64 codes in [0, K), or ignore_index (any value outside it): loss 0, gradient 0
    scale_ptr,  # (R,) fp32: d(loss)/d(row loss), i.e. token_weight / sum(weights)
    loss_ptr,  # (R,) fp32 out: per-row cross-entropy
    K, stride_r,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_r
    # pass 1, online logsumexp: m = max_k x_k, s = sum_k exp(x_k - m), lse = m + log(s)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(base + k, mask=k < K, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(target_ptr + row)
    counted = (target >= 0) & (target < K)
    x_target = tl.load(base + tl.where(counted, target, 0))  # never read outside the row
    tl.store(loss_ptr + row, tl.where(counted, lse - x_target, 0.0))
    # pass 2: d(loss)/d(x_k) = scale * (softmax_k - [k == target]); 0 for a row that is not counted
    scale = tl.where(counted, tl.load(scale_ptr + row), 0.0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(base + k, mask=k < K, other=0.0)
        g = tl.exp(x - lse) - tl.where(k == target, 1.0, 0.0)
        tl.store(base + k, g * scale, mask=k < K)


def ce_fwd_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, block_k: int = CE_BLOCK_K):
    """Launcher: per-row CE of fp32 ``logits`` (R, K) -> (R,) losses; ``logits`` becomes the scaled gradient."""
    rows, k = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        launch(_ce_fwd_grad_kernel, (rows,), (logits, targets, scale, loss, k, logits.stride(0)),
               cross_entropy_params(k, block_k))
    return loss
