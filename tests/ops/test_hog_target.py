"""``ops.hog_target``: hand-computed values, invariances, scikit-image's cell histograms, Triton against the reference.

Triton (the interpreter on CPU, ~40 ms per 8-px token and ~4x that per 16-px token) against the reference, by the
rule of tests/ops/numerics.py: ``exact`` is the reference's formula evaluated in float64
(``motion_targets._hog_reference(..., torch.float64)``) from the same uint8 pixels.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch

from fastmam import ops
from fastmam.ops import motion_targets
from tests.conftest import random_clip, runnable_backends
from tests.ops.numerics import assert_close_to_exact

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = runnable_backends("hog_target")


def _exact(clip, ids, tubelet, patch, **kw):
    """The reference's formula in float64: (B, K, values)."""
    kw = {"frame": "first", "cell": 8, "bins": 9, "gradient": "sobel", "normalize": "l2", "eps": 1e-6} | kw
    args = motion_targets.check_hog_inputs(clip, ids, tubelet, patch, kw["frame"], kw["cell"], kw["bins"],
                                           kw["gradient"], kw["normalize"], kw["eps"])
    return motion_targets._hog_reference(clip.cpu(), tubelet, patch, args._replace(ids=args.ids.cpu()), torch.float64)


def _ramp(falling: bool) -> torch.Tensor:
    """(1, 1, 24, 24, 3) uint8: 5x + 5y (rising to the right and down), or 5x + 5(23 - y) (rising up)."""
    y, x = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    v = 5 * x + 5 * ((23 - y) if falling else y)
    return v[None, None, :, :, None].expand(1, 1, 24, 24, 3).to(torch.uint8).contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gradient,gain", [("central", 10), ("sobel", 40)])
def test_hand_computed_ramp(backend, gradient, gain):
    """The middle 8-px token of a ramp 5x + 5y: every pixel has gx = gy = 10 (central: I[x+1] - I[x-1]) or 40
    (Sobel: (1 + 2 + 1) x 10), magnitude gain * sqrt(2) / 255, orientation 45 degrees (y down). Bins of 20 degrees,
    centres 10, 30, 50, ...: 45 lies 3/4 of the way from centre 1 (30) to centre 2 (50): 1/4 of the magnitude goes
    to bin 1, 3/4 to bin 2, 64 pixels per cell. Rising up (5x + 5(23 - y)): gy < 0, atan2 = -45 -> 135 degrees,
    between centres 6 (130, weight 3/4) and 7 (150, weight 1/4). The same in every channel."""
    ids = torch.tensor([[4]], device=DEVICE)  # token (row 1, col 1) of the 3 x 3 grid
    m = 64 * gain * math.sqrt(2) / 255
    for falling, (k0, k1) in ((False, (1, 2)), (True, (7, 6))):
        clip = _ramp(falling).to(DEVICE)
        raw = ops.hog_target(clip, ids, 1, 8, gradient=gradient, normalize="none", backend=backend).cpu()
        expected = torch.zeros(9, 3, dtype=torch.float64)
        expected[k0], expected[k1] = m / 4, 3 * m / 4
        assert raw.shape == (1, 1, 27) and raw.dtype == torch.float32
        torch.testing.assert_close(raw.view(9, 3).double(), expected, rtol=1e-6, atol=1e-6)
        # per-token L2: [1/4, 3/4] in each of 3 channels, norm sqrt(3 * (1/16 + 9/16)) (eps 1e-6 is negligible)
        l2 = ops.hog_target(clip, ids, 1, 8, gradient=gradient, backend=backend).cpu()
        torch.testing.assert_close(l2.view(9, 3).double(), expected / (m * math.sqrt(3 * 10 / 16)), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invariant_to_a_constant_and_zero_on_flat_frames(backend, rng):
    """Gradients are taken on the integer pixel values, so x + 55 (no value clips) gives the bit-identical target;
    a frame without gradient (zeros, or any constant) gives exactly 0, also L2-normalized."""
    clip = torch.randint(0, 201, (2, 4, 16, 24, 3), dtype=torch.uint8, generator=rng).to(DEVICE)
    ids = torch.tensor([[0, 7, 11], [1, 2, 6]], device=DEVICE)
    for gradient in ("sobel", "central"):
        for normalize in ("l2", "none"):
            kw = dict(frame="middle", gradient=gradient, normalize=normalize, backend=backend)
            base = ops.hog_target(clip, ids, 2, 8, **kw)
            assert base.abs().sum() > 0
            assert torch.equal(ops.hog_target(clip + 55, ids, 2, 8, **kw), base), (gradient, normalize)
            for value in (0, 77) if gradient == "sobel" else ():
                flat = torch.full_like(clip, value)
                assert torch.equal(ops.hog_target(flat, ids, 2, 8, **kw), torch.zeros_like(base)), (value, kw)


# (B, T, H, W, C), tubelet, patch, arguments: B=1, several B and T, non-square frames, both patch sizes, every
# frame choice, both gradients and normalizations, a 4-px cell with 6 bins and one channel
TRITON_CASES = [
    ((1, 2, 24, 40, 3), 2, 8, dict(frame="first", gradient="sobel", normalize="l2")),
    ((3, 6, 16, 24, 3), 3, 8, dict(frame="middle", gradient="central", normalize="none")),
    ((2, 4, 32, 48, 3), 2, 16, dict(frame="last", gradient="sobel", normalize="none")),
    ((2, 2, 48, 32, 3), 2, 16, dict(frame=1, gradient="central", normalize="l2")),
    ((2, 2, 16, 24, 1), 1, 8, dict(frame="first", cell=4, bins=6, gradient="sobel", normalize="l2")),
]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("shape,t,p,kw", TRITON_CASES)
def test_triton_equals_reference(shape, t, p, kw, rng):
    """Random ascending id subsets (3 tokens per sample), and a non-contiguous clip (a strided view)."""
    big = random_clip((*shape[:-1], 2 * shape[-1]), rng).to(DEVICE)
    clip = big[..., ::2]  # channel stride 2
    assert not clip.is_contiguous()
    n = (shape[1] // t) * (shape[2] // p) * (shape[3] // p)
    ids = torch.stack([torch.randperm(n, generator=rng)[:3].sort().values for _ in range(shape[0])]).to(DEVICE)
    ref = ops.hog_target(clip, ids, t, p, **kw, backend="reference")
    tri = ops.hog_target(clip, ids, t, p, **kw, backend="triton")
    exact = _exact(clip, ids, t, p, **kw)
    cell = kw.get("cell", 8)
    # the longest sums: a cell's cell^2 votes; with L2, the token's squared values
    reduction = max(cell * cell, exact.shape[-1])
    assert_close_to_exact(tri, ref, exact, reduction=reduction, name="hog_target")
    assert ref.shape == (shape[0], 3, (p // cell) ** 2 * kw.get("bins", 9) * shape[-1])


# --------------------------------------------------------------------------- scikit-image


def _skimage_cells(frame: np.ndarray, orientations: int) -> np.ndarray:
    """scikit-image's unnormalized cell histograms of one (H, W) channel, 8-px cells: (H/8, W/8, orientations).

    Its own internals, as ``skimage.feature.hog`` calls them before block normalization: ``_hog_channel_gradient``
    (central differences, 0 at the image border) and the Cython ``hog_histograms`` (hard bins of 180/orientations
    degrees, the mean magnitude over the cell's pixels, accumulated in float32)."""
    from skimage.feature import _hoghistogram
    from skimage.feature._hog import _hog_channel_gradient

    h, w = frame.shape
    g_row, g_col = _hog_channel_gradient(frame.astype(np.float64))
    out = np.zeros((h // 8, w // 8, orientations))
    _hoghistogram.hog_histograms(np.ascontiguousarray(g_col), np.ascontiguousarray(g_row), 8, 8, w, h, w // 8, h // 8,
                                 orientations, out)
    return out


def _interpolate(sub: np.ndarray, m: int) -> np.ndarray:
    """(..., 9m, C) histograms of 9m hard bins -> (..., 9, C) with each sub-bin's mass split linearly between the
    two 20-degree bin centres nearest its own centre, as ``hog_target`` splits each pixel's magnitude."""
    j = np.arange(9 * m)
    u = (j + 0.5) / m - 0.5  # sub-bin centre in units of 20 degrees, from the first centre (10 degrees)
    k0 = np.floor(u)
    w1 = u - k0
    k0 = (k0.astype(int) + 9) % 9
    split = np.zeros((9 * m, 9))
    np.add.at(split, (j, k0), 1 - w1)
    np.add.at(split, (j, (k0 + 1) % 9), w1)
    return np.einsum("...jc,jk->...kc", sub, split)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_scikit_image_cell_histograms(backend, rng):
    """gradient='central', normalize='none' against scikit-image's cell histograms (0.19+), on random clips.

    Conventions: scikit-image takes pixel values as given (0..255 here) and averages over the cell's 64 pixels,
    we sum magnitudes of [0, 1] pixels: ours = skimage * 64 / 255. Its gradient is 0 across the image border; our
    reflected border gives the same central differences there. Orientations agree (atan2(d_row, d_col) mod 180,
    row down). Binning differs: scikit-image puts a pixel into one bin [20k, 20k + 20) degrees, we split it between
    the two nearest bin centres. So:

    1. per cell and channel, the sum over bins (the total magnitude) must agree to float32 rounding (8e-6 relative:
       two sums of 64 terms; measured ~5e-8);
    2. per bin: scikit-image with 9 * 1000 hard bins, each sub-bin split between the centres nearest *its* centre,
       gives our interpolated histogram up to half a sub-bin of interpolation weight per pixel: |ours - that| <=
       total / 2000 (+ the same float32 rounding); measured ~0.2 of that bound;
    3. horizontal stripes (gx = 0, every orientation 90 degrees, a bin centre) fall into one bin in both: there the
       9-bin histograms themselves agree;
    4. the check can fail: scikit-image's own hard 9-bin histograms, or our Sobel gradients, break bound 2."""
    pytest.importorskip("skimage", minversion="0.19")
    b, t, h, w, tubelet, p, m = 2, 4, 32, 48, 2, 16, 1000
    clip = random_clip((b, t, h, w, 3), rng).to(DEVICE)
    n = (t // tubelet) * (h // p) * (w // p)
    ids = torch.stack([torch.randperm(n, generator=rng)[:4].sort().values for _ in range(b)]).to(DEVICE)

    def ours(x, gradient="central"):
        out = ops.hog_target(x, ids, tubelet, p, frame="middle", gradient=gradient, normalize="none", backend=backend)
        return out.cpu().double().view(b, -1, 2, 2, 9, 3).numpy()  # (B, K, cell row, cell col, bin, C)

    def skimage(x, orientations):
        """(B, K, 2, 2, orientations, C) for the same tokens, * 64 / 255."""
        x = x.cpu().numpy()
        out = np.zeros((b, ids.shape[1], 2, 2, orientations, 3))
        for bi in range(b):
            for k, tok in enumerate(ids[bi].tolist()):
                i, s = divmod(tok, (h // p) * (w // p))
                r, c = divmod(s, w // p)
                frame = x[bi, i * tubelet + 1]  # 'middle' of a 2-frame tubelet: offset 1
                for ch in range(3):
                    cells = _skimage_cells(frame[..., ch], orientations)
                    out[bi, k, :, :, :, ch] = cells[2 * r:2 * r + 2, 2 * c:2 * c + 2]
        return out * 64 / 255

    got = ours(clip)
    total = got.sum(axis=-2, keepdims=True)  # (..., 1, C)
    fp32 = 8e-6 * total
    # 1. total magnitude per cell and channel
    hard = skimage(clip, 9)
    assert np.all(np.abs(hard.sum(axis=-2, keepdims=True) - total) <= fp32)
    # 2. interpolated bins
    soft = _interpolate(skimage(clip, 9 * m), m)
    err, bound = np.abs(got - soft), total / (2 * m) + fp32
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst err / bound {(err / bound).max():.3g}"
    # 4. the same bound rejects hard binning and Sobel gradients
    assert np.any(np.abs(got - hard) > bound)
    assert np.any(np.abs(ours(clip, "sobel") * (got.sum() / ours(clip, "sobel").sum()) - soft) > bound)
    # 3. horizontal stripes: every orientation is 90 degrees, the centre of bin 4
    rows = random_clip((b, t, h, 1, 3), rng).expand(b, t, h, w, 3).contiguous().to(DEVICE)
    stripes, stripes_sk = ours(rows), skimage(rows, 9)
    stripe_total = stripes.sum(axis=-2, keepdims=True)  # fp32 rounding of 90 * 9/180 may leak ~1e-7 to bin 3
    assert stripe_total.min() > 0 and np.all(np.abs(stripes - stripes_sk) <= 8e-6 * stripe_total)
    assert np.all(np.delete(stripes, 4, axis=-2) <= 1e-6 * stripe_total)


# --------------------------------------------------------------------------- errors, custom op


def test_errors(rng):
    clip = random_clip((1, 2, 16, 16, 3), rng)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(TypeError, match="uint8"):
        ops.hog_target(clip.float(), ids, 2, 8)
    with pytest.raises(ValueError, match="divides patch=16"):
        ops.hog_target(clip, ids, 2, 16, cell=6)
    with pytest.raises(ValueError, match=r"frame=2 is not a frame of a tubelet of 2"):
        ops.hog_target(clip, ids, 2, 8, frame=2)
    with pytest.raises(ValueError, match="frame='centre' is not supported"):
        ops.hog_target(clip, ids, 2, 8, frame="centre")
    with pytest.raises(ValueError, match="gradient='scharr'"):
        ops.hog_target(clip, ids, 2, 8, gradient="scharr")
    with pytest.raises(ValueError, match="normalize='l1'"):
        ops.hog_target(clip, ids, 2, 8, normalize="l1")
    with pytest.raises(ValueError, match="bins=0"):
        ops.hog_target(clip, ids, 2, 8, bins=0)
    with pytest.raises(ValueError, match="eps=0"):
        ops.hog_target(clip, ids, 2, 8, eps=0)
    with pytest.raises(TypeError, match="ids must be an int64"):
        ops.hog_target(clip, ids.float(), 2, 8)
    with pytest.raises(ValueError, match="token ids out of range"):
        ops.hog_target(clip, torch.tensor([[0, 4]]), 2, 8)
    with pytest.raises(ValueError, match="does not tile"):
        ops.hog_target(clip, ids, 2, 12)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_custom_op_passes_opcheck_and_compiles(rng):
    """PyTorch's check of the custom op (schema, fake implementation against the real one, dynamic shapes), and
    torch.compile(fullgraph=True) keeping it as one node."""
    from fastmam.ops import _triton  # noqa: F401  (registers torch.ops.fastmam.*)

    clip = random_clip((2, 2, 16, 16, 3), rng).to(DEVICE)
    ids = torch.tensor([[0, 3], [1, 2]], device=DEVICE)
    torch.library.opcheck(torch.ops.fastmam.hog_target.default, (clip, ids, 2, 8, 0, 8, 9, True, True, 1e-6))
    torch._dynamo.reset()
    try:
        def target(clip, ids):
            return ops.hog_target(clip, ids, 2, 8, backend="triton")

        compiled = torch.compile(target, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
        torch.testing.assert_close(compiled(clip, ids), target(clip, ids), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
