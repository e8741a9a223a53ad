"""Triton kernels: visible-patch gather + normalize, and the masked-token pixel / RGB-difference targets.

One program per selected token reads that token's t x p x p x C pixels once, straight from the
clip through its strides (uint8 (B, T, H, W, C), or VideoMAE's normalized float (B, C, T, H, W)
passed with its strides permuted to (B, T, H, W, C) order), and writes one output row. The masking
itself (a per-sample sort of the noise) is done by the caller; the kernels take ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmam.ops._checks import channel_stats

from .launch import gather_normalize_params, launch, masked_target_params


@triton.jit
def _token_cell(ids_ptr, pid, WP, HWP, N):
    """Token id of program ``pid`` -> (time slice, patch row, patch column), int64. The caller's check rejects
    ids outside [0, N) before the launch; reading token 0 in their place as well means that no program ever
    reads outside the clip."""
    n = tl.load(ids_ptr + pid).to(tl.int64)
    n = tl.where((n >= 0) & (n < N), n, 0)
    return n // HWP, (n % HWP) // WP, n % WP


@triton.jit
def _gather_normalize_fwd_kernel(
    clip_ptr,  # (B, T, H, W, C) uint8 or float, any strides
    ids_ptr,  # (B, K) int64 token ids, contiguous
    out_ptr,  # (B, K, t*p*p*C) out dtype, contiguous
    mean_ptr,  # (C,) fp32
    std_ptr,  # (C,) fp32
    K, WP, HWP, N,  # selected tokens per sample; patches per row; patches per slice; tokens per sample
    s_b, s_t, s_h, s_w, s_c,  # clip strides in (B, T, H, W, C) order
    TUBELET: tl.constexpr, PATCH: tl.constexpr, C: tl.constexpr,
    BLOCK: tl.constexpr, NORMALIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // K
    i, r, c = _token_cell(ids_ptr, pid, WP, HWP, N)
    # element e of the patch vector is (frame f, row y, col x, channel ch), VideoMAE's (p0 p1 p2 c)
    e = tl.arange(0, BLOCK)
    valid = e < TUBELET * PATCH * PATCH * C
    ch = e % C
    x = (e // C) % PATCH
    y = (e // (C * PATCH)) % PATCH
    f = e // (C * PATCH * PATCH)
    src = b * s_b + (i * TUBELET + f) * s_t + (r * PATCH + y) * s_h + (c * PATCH + x) * s_w + ch * s_c
    v = tl.load(clip_ptr + src, mask=valid, other=0).to(tl.float32)
    if NORMALIZE:
        # (v / 255 - mean[ch]) / std[ch], in the reference's order of operations
        mean = tl.load(mean_ptr + ch, mask=valid, other=0.0)
        std = tl.load(std_ptr + ch, mask=valid, other=1.0)
        v = (v / 255.0 - mean) / std
    tl.store(out_ptr + pid * (TUBELET * PATCH * PATCH * C) + e, v.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _masked_target_fwd_kernel(
    clip_ptr,  # (B, T, H, W, C) uint8 or normalized float, any strides
    next_ptr,  # (B, T, H, W, C) like clip (dense RGB difference) or a dummy
    ids_ptr,  # (B, M) int64 masked token ids, contiguous
    out_ptr,  # (B, M, R*C) fp32, contiguous; R rows of C channels per token
    mean_ptr,  # (C,) fp32, used to un-normalize float clips
    std_ptr,  # (C,) fp32
    M, WP, HWP, N,
    s_b, s_t, s_h, s_w, s_c,
    n_b, n_t, n_h, n_w, n_c,  # next_clip strides
    TUBELET: tl.constexpr, PATCH: tl.constexpr, C: tl.constexpr,
    R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    IS_UINT8: tl.constexpr, DIFF: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # DIFF (fastmam.ops.targets.Diff): 0 = pixels of the t frames; 1 = frame f+1 minus frame f inside the
    # tubelet (R = (t-1)*p*p); 2 = dense: next_clip's frame f minus clip's frame f (R = t*p*p)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // M
    i, rr, cc = _token_cell(ids_ptr, pid, WP, HWP, N)
    row = tl.arange(0, BLOCK_R)[:, None]
    ch = tl.arange(0, BLOCK_C)[None, :]
    valid = (row < R) & (ch < C)
    f = row // (PATCH * PATCH)
    y = (row // PATCH) % PATCH
    x = row % PATCH
    frame = i * TUBELET + f
    if DIFF == 1:
        frame = frame + 1
    h = rr * PATCH + y
    w = cc * PATCH + x
    v = tl.load(clip_ptr + b * s_b + frame * s_t + h * s_h + w * s_w + ch * s_c, mask=valid, other=0).to(tl.float32)
    if DIFF == 1:
        prev = tl.load(clip_ptr + b * s_b + (frame - 1) * s_t + h * s_h + w * s_w + ch * s_c, mask=valid, other=0)
    if DIFF == 2:
        prev = v
        v = tl.load(next_ptr + b * n_b + frame * n_t + h * n_h + w * n_w + ch * n_c, mask=valid, other=0)
        v = v.to(tl.float32)
    mean_c = tl.load(mean_ptr + ch, mask=ch < C, other=0.0)
    std_c = tl.load(std_ptr + ch, mask=ch < C, other=1.0)
    # uint8 values and their differences stay exact integers until one division by 255 (as the reference)
    if not IS_UINT8:
        v = v * std_c + mean_c
    if DIFF != 0:
        prev = prev.to(tl.float32)
        if not IS_UINT8:
            prev = prev * std_c + mean_c
        v = v - prev
    v = tl.where(valid, v, 0.0)
    if NORMALIZE:
        # per channel over the token's R values: (x - mean) / (sqrt(sum((x - mean)^2) / (R - 1)) + 1e-6), taken
        # of u = x - x[row 0] (the same x - mean), shifted while uint8 values are exact integers: a flat patch
        # gives u = 0 and so exactly 0 out (normalize_per_patch in fastmam.ops.targets)
        u = v - tl.sum(tl.where(row == 0, v, 0.0), axis=0)[None, :]
        if IS_UINT8:
            u = u / 255.0
        u = tl.where(valid, u, 0.0)
        mu = tl.sum(u, axis=0) / R
        d = tl.where(valid, u - mu[None, :], 0.0)
        var = tl.sum(d * d, axis=0) / (R - 1)
        v = d / (tl.sqrt(var)[None, :] + 1e-6)
    elif IS_UINT8:
        v = v / 255.0
    tl.store(out_ptr + pid * (R * C) + row * C + ch, v, mask=valid)


def _bthwc_strides(clip: torch.Tensor, layout: str) -> tuple[int, ...]:
    s = clip.stride()
    return s if layout == "BTHWC" else (s[0], s[2], s[3], s[4], s[1])


def gather_normalize(clip, ids, tubelet, patch, mean, std, out_dtype, layout, geometry):
    """Launcher: (B, K) ids -> (B, K, t*p*p*C) patches; uint8 normalized with mean/std, float only cast."""
    b, t, h, w, c = geometry
    ids = ids.contiguous()
    k = ids.shape[1]
    pv = tubelet * patch * patch * c
    out = torch.empty(b, k, pv, dtype=out_dtype, device=clip.device)
    if b * k == 0:
        return out
    wp, hwp = w // patch, (h // patch) * (w // patch)
    args = (clip, ids, out, channel_stats(mean, c, "mean", clip.device), channel_stats(std, c, "std", clip.device),
            k, wp, hwp, hwp * (t // tubelet), *_bthwc_strides(clip, layout))
    launch(_gather_normalize_fwd_kernel, (b * k,), args,
           gather_normalize_params(tubelet, patch, c, normalize=layout == "BTHWC"))
    return out


def masked_target(clip, next_clip, ids, tubelet, patch, normalize, mean, std, layout, geometry, diff, rows):
    """Launcher: (B, M) masked ids -> (B, M, rows*C) fp32 targets (``diff`` and ``rows``: ``targets.Diff`` and
    ``targets.target_rows``)."""
    b, t, h, w, c = geometry
    ids = ids.contiguous()
    m = ids.shape[1]
    out = torch.empty(b, m, rows * c, dtype=torch.float32, device=clip.device)
    if b * m == 0:
        return out
    if mean is None:  # uint8 clips need no statistics; the kernel still takes two pointers
        mean, std = (0.0,) * c, (1.0,) * c
    other = next_clip if next_clip is not None else clip
    args = (clip, other, ids, out, channel_stats(mean, c, "mean", clip.device),
            channel_stats(std, c, "std", clip.device),
            m, w // patch, (h // patch) * (w // patch), (t // tubelet) * (h // patch) * (w // patch),
            *_bthwc_strides(clip, layout), *_bthwc_strides(other, layout))
    launch(_masked_target_fwd_kernel, (b * m,), args,
           masked_target_params(tubelet, patch, c, rows, clip.dtype == torch.uint8, diff, normalize))
    return out
