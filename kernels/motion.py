"""Triton kernels: MME's motion targets of the selected tokens, HOG descriptors and point trajectories.

One program per selected token. ``hog_target``: the token's (p, p, C) pixels of the tubelet's chosen frame plus a
1-pixel halo, read straight from the uint8 clip through its strides (the shifted loads of a cell's neighbours hit
the cache lines its own loads brought in), gradients, orientation votes and cell sums in registers, one output row.
``trajectory_target``: the token's (p/8)^2 points x L steps, one target row and one weight row. The semantics are
those of the references in ``fastmam.ops.motion_targets``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import hog_target_params, launch, trajectory_target_params
from .patches import _token_cell


@triton.jit
def _reflect(i, n):
    """Index i in [-1, n] -> reflect-101 inside [0, n): -1 -> 1, n -> n - 2 (n >= 2)."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * (n - 1) - i, i)


@triton.jit
def _unsigned_orientation(gx, gy):
    """atan2(gy, gx) mod pi, in [0, pi], fp32, for finite gx, gy (0 for gx = gy = 0).

    Triton has no atan2 (libdevice's does not run in the interpreter that tests this kernel), so: phi =
    atan(min/max) of |gx|, |gy| in [0, pi/4] with Cephes' atanf (argument reduction t > tan(pi/8) ->
    pi/4 + atan((t - 1) / (t + 1)), a degree-9 odd polynomial; relative error ~2e-7), reflected to [0, pi/2] when
    |gy| > |gx|, and to pi - phi when gx and gy have opposite signs (quadrants 2 and 4). pi itself (pi - phi for a
    phi below half an ulp) is the same orientation as 0: the binning wraps it."""
    ax = tl.abs(gx)
    ay = tl.abs(gy)
    hi = tl.maximum(ax, ay)
    t = tl.minimum(ax, ay) / tl.where(hi > 0, hi, 1.0)
    big = t > 0.41421356237309503
    x = tl.where(big, (t - 1.0) / (t + 1.0), t)
    z = x * x
    phi = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * x + x
    phi = tl.where(big, phi + 0.7853981633974483, phi)
    phi = tl.where(ay > ax, 1.5707963267948966 - phi, phi)
    return tl.where(gx * gy < 0, 3.141592653589793 - phi, phi)


@triton.jit(do_not_specialize=["OFFSET"])  # frame 0 or 1 of a tubelet: one compiled kernel, not two
def _hog_target_fwd_kernel(
    clip_ptr,  # (B, T, H, W, C) uint8, any strides
    ids_ptr,  # (B, K) int64 token ids, contiguous
    out_ptr,  # (B, K, CELLS*BINS*C) fp32, contiguous; per token (cell row, cell col, bin, channel)
    K, H, W, WP, HWP, N,  # selected tokens per sample; frame size; patches per row, per slice; tokens per sample
    OFFSET,  # the frame inside the tubelet, in [0, TUBELET)
    eps,  # of the L2 normalization
    s_b, s_t, s_h, s_w, s_c,  # clip strides
    TUBELET: tl.constexpr, PATCH: tl.constexpr, CELL: tl.constexpr, BINS: tl.constexpr, C: tl.constexpr,
    BLOCK_PIX: tl.constexpr, BLOCK_CELLS: tl.constexpr, BLOCK_BINS: tl.constexpr, BLOCK_C: tl.constexpr,
    SOBEL: tl.constexpr, NORMALIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // K
    i, rr, cc = _token_cell(ids_ptr, pid, WP, HWP, N)
    base = clip_ptr + b * s_b + (i * TUBELET + OFFSET) * s_t
    side: tl.constexpr = PATCH // CELL
    cells: tl.constexpr = side * side
    # a cell's pixels x bins x channels: (BLOCK_PIX, BLOCK_BINS, BLOCK_C)
    pix = tl.arange(0, BLOCK_PIX)[:, None, None]
    kb = tl.arange(0, BLOCK_BINS)[None, :, None]
    ch = tl.arange(0, BLOCK_C)[None, None, :]
    pm = (pix < CELL * CELL) & (ch < C)
    py = pix // CELL
    px = pix % CELL
    cell_id = tl.arange(0, BLOCK_CELLS)[:, None, None]
    hist = tl.zeros([BLOCK_CELLS, BLOCK_BINS, BLOCK_C], dtype=tl.float32)
    for q in tl.static_range(cells):
        y = rr * PATCH + (q // side) * CELL + py
        x = cc * PATCH + (q % side) * CELL + px
        # the neighbours' rows and columns; the frame is reflected at its border (reflect-101)
        ym = _reflect(y - 1, H) * s_h
        yp = _reflect(y + 1, H) * s_h
        xm = _reflect(x - 1, W) * s_w
        xp = _reflect(x + 1, W) * s_w
        y0 = y * s_h
        x0 = x * s_w
        c0 = ch * s_c
        # uint8 values as exact integers: the gradients below are exact in fp32 (|g| <= 4 * 255)
        if SOBEL:
            up_l = tl.load(base + ym + xm + c0, mask=pm, other=0).to(tl.float32)
            up_r = tl.load(base + ym + xp + c0, mask=pm, other=0).to(tl.float32)
            dn_l = tl.load(base + yp + xm + c0, mask=pm, other=0).to(tl.float32)
            dn_r = tl.load(base + yp + xp + c0, mask=pm, other=0).to(tl.float32)
            mid_l = tl.load(base + y0 + xm + c0, mask=pm, other=0).to(tl.float32)
            mid_r = tl.load(base + y0 + xp + c0, mask=pm, other=0).to(tl.float32)
            up_c = tl.load(base + ym + x0 + c0, mask=pm, other=0).to(tl.float32)
            dn_c = tl.load(base + yp + x0 + c0, mask=pm, other=0).to(tl.float32)
            gx = (up_r - up_l) + 2 * (mid_r - mid_l) + (dn_r - dn_l)
            gy = (dn_l - up_l) + 2 * (dn_c - up_c) + (dn_r - up_r)
        else:
            gx = (tl.load(base + y0 + xp + c0, mask=pm, other=0).to(tl.float32)
                  - tl.load(base + y0 + xm + c0, mask=pm, other=0).to(tl.float32))
            gy = (tl.load(base + yp + x0 + c0, mask=pm, other=0).to(tl.float32)
                  - tl.load(base + ym + x0 + c0, mask=pm, other=0).to(tl.float32))
        mag = tl.sqrt_rn(gx * gx + gy * gy) / 255.0
        # the two nearest bin centres (k + 1/2) pi/BINS of theta, linear weights, circular: u in [-1/2, BINS - 1/2]
        u = _unsigned_orientation(gx, gy) * (BINS / 3.141592653589793) - 0.5
        k0f = tl.floor(u)
        w1 = u - k0f
        k0 = (k0f.to(tl.int32) + BINS) % BINS
        k1 = (k0 + 1) % BINS
        vote = tl.where(kb == k0, mag * (1 - w1), 0.0) + tl.where(kb == k1, mag * w1, 0.0)
        # hist[q, k, c] = sum over the cell's pixels of their votes for bin k
        cell_hist = tl.sum(tl.where(pm, vote, 0.0), axis=0)
        hist += tl.where(cell_id == q, cell_hist[None, :, :], 0.0)
    if NORMALIZE:
        # h / (||h||_2 + eps) over the token's cells, bins and channels (padding holds zeros)
        hist = hist / (tl.sqrt_rn(tl.sum(hist * hist)) + eps)
    out_mask = (cell_id < cells) & (kb < BINS) & (ch < C)
    offs = cell_id * (BINS * C) + kb * C + ch
    tl.store(out_ptr + pid * (cells * BINS * C) + offs, hist, mask=out_mask)


@triton.jit
def _trajectory_target_fwd_kernel(
    disp_ptr,  # (B, S, GH, GW, L, 2) float, any strides: per time slice, grid point and step a (dx, dy)
    valid_ptr,  # (B, S, GH, GW) uint8 (a bool tensor's bytes), any strides
    ids_ptr,  # (B, K) int64 token ids, contiguous
    target_ptr,  # (B, K, Q*Q*L*2) fp32, contiguous; per token (point row, point col, step, xy)
    weight_ptr,  # (B, K, Q*Q*L*2) fp32, contiguous
    K, WP, HWP, N,  # selected tokens per sample; patches per row, per slice; tokens per sample
    bound, eps,
    d_b, d_s, d_h, d_w, d_l, d_x,  # disp strides
    v_b, v_s, v_h, v_w,  # valid strides
    Q: tl.constexpr, L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, PATCH_STD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // K
    i, rr, cc = _token_cell(ids_ptr, pid, WP, HWP, N)
    # (points, steps, xy) = (BLOCK_P, BLOCK_L, 2)
    pt = tl.arange(0, BLOCK_P)[:, None, None]
    st = tl.arange(0, BLOCK_L)[None, :, None]
    xy = tl.arange(0, 2)[None, None, :]
    gy = rr * Q + pt // Q
    gx = cc * Q + pt % Q
    in_token = pt < Q * Q
    ok = (tl.load(valid_ptr + b * v_b + i * v_s + gy * v_h + gx * v_w, mask=in_token, other=0) != 0) & in_token
    used = ok & (st < L)  # (BLOCK_P, BLOCK_L, 1)
    src = disp_ptr + b * d_b + i * d_s + gy * d_h + gx * d_w + st * d_l + xy * d_x
    v = tl.load(src, mask=used, other=0.0).to(tl.float32)  # invalid points are never read
    if PATCH_STD:
        # per token and component over its valid points x L steps: (x - mean) / (std_unbiased + eps), taken of
        # u = x - x[first valid point, step 0]: a translation of the whole patch gives u = 0 and exactly 0 out
        first = tl.min(tl.where(ok, pt, BLOCK_P))
        ref = tl.sum(tl.sum(tl.where((pt == first) & (st == 0), v, 0.0), axis=0), axis=0)  # (2,)
        u = tl.where(used, v - ref[None, None, :], 0.0)
        n = tl.sum(tl.where(ok, 1.0, 0.0)) * L  # valid values per component
        mean = tl.sum(tl.sum(u, axis=0), axis=0) / tl.maximum(n, 1.0)
        d = tl.where(used, u - mean[None, None, :], 0.0)
        var = tl.sum(tl.sum(d * d, axis=0), axis=0) / tl.maximum(n - 1.0, 1.0)
        t = d / (tl.sqrt_rn(var)[None, None, :] + eps)
    else:
        t = tl.where(used, tl.minimum(tl.maximum(v / bound, -1.0), 1.0), 0.0)
    w = tl.where(used, 1.0, 0.0) + tl.zeros([1, 1, 2], dtype=tl.float32)
    out = pid * (Q * Q * L * 2) + pt * (L * 2) + st * 2 + xy
    store = in_token & (st < L) & (xy < 2)
    tl.store(target_ptr + out, t, mask=store)
    tl.store(weight_ptr + out, w, mask=store)


def hog_target(clip, ids, tubelet, patch, offset, cell, bins, sobel, normalize, eps, geometry):
    """Launcher: (B, K) ids -> (B, K, (p/cell)^2 * bins * C) fp32 HOG rows (``fastmam.ops.hog_target``)."""
    b, t, h, w, c = geometry
    ids = ids.contiguous()
    k = ids.shape[1]
    out = torch.empty(b, k, (patch // cell) ** 2 * bins * c, dtype=torch.float32, device=clip.device)
    if b * k == 0:
        return out
    wp, hwp = w // patch, (h // patch) * (w // patch)
    args = (clip, ids, out, k, h, w, wp, hwp, hwp * (t // tubelet), offset, eps, *clip.stride())
    launch(_hog_target_fwd_kernel, (b * k,), args, hog_target_params(tubelet, patch, cell, bins, c, sobel, normalize))
    return out


def trajectory_target(disp, valid, ids, side, patch_std, bound, eps):
    """Launcher: (B, K) ids -> (target, weight), each (B, K, side^2 * L * 2) fp32
    (``fastmam.ops.trajectory_target``; ``side``: points per token side, p / 8)."""
    b, slices, gh, gw, steps, _ = disp.shape
    ids = ids.contiguous()
    k = ids.shape[1]
    target = torch.empty(b, k, side * side * steps * 2, dtype=torch.float32, device=disp.device)
    weight = torch.empty_like(target)
    if b * k == 0:
        return target, weight
    wp, hwp = gw // side, (gh // side) * (gw // side)
    valid = valid.view(torch.uint8)  # the same bytes: 0 or 1
    args = (disp, valid, ids, target, weight, k, wp, hwp, hwp * slices, bound, eps, *disp.stride(), *valid.stride())
    launch(_trajectory_target_fwd_kernel, (b * k,), args, trajectory_target_params(side, steps, patch_std))
    return target, weight
