"""Triton gather/normalize and target kernels vs the references (interpreter on CPU, real kernels on GPU).

Tolerance (CONVENTIONS): err(kernel, fp64 formula) <= 2 * err(reference, fp64 formula) + atol, with atol
a few fp32 ulps of the largest value, or log2(R) ulps where the op normalizes over R values (the error
bound of a pairwise sum, which the kernel computes in another order); ids and masks must be equal.
"""

import importlib.util

import pytest
import torch

from fastmam import ops
from tests.conftest import random_clip
from tests.ops.numerics import tolerance

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[test]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (B, T, H, W, C), tubelet, patch: B=1, primes, non-powers of two, one time slice, patch 16
SHAPES = [((1, 2, 14, 21, 3), 2, 7), ((3, 6, 24, 40, 3), 3, 8), ((2, 2, 32, 48, 3), 2, 16), ((2, 4, 16, 40, 3), 2, 8)]


def _bound(kernel, ref, exact, reduction=1):
    """(elementwise error of ``kernel``, the bound of tests/ops/numerics.py's rule)."""
    return (kernel.double() - exact).abs(), tolerance(ref, exact, reduction=reduction)[0]


def _masked(shape, patch, ratio, tubelet, rng):
    s = (shape[2] // patch) * (shape[3] // patch)
    if int(ratio * s) in (0, s):
        pytest.skip(f"ratio {ratio} hides {int(ratio * s)} of {s} positions: rejected by design")
    return torch.rand(shape[0], s, generator=rng).to(DEVICE)


@pytest.mark.parametrize("ratio", [0.5, 0.95])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,t,p", SHAPES)
def test_tube_mask_gather_uint8(shape, t, p, out_dtype, ratio, rng):
    noise = _masked(shape, p, ratio, t, rng)
    x = random_clip(shape, rng).to(DEVICE)
    ref = ops.tube_mask_gather(x, noise, ratio, t, p, MEAN, STD, out_dtype, backend="reference")
    tri = ops.tube_mask_gather(x, noise, ratio, t, p, MEAN, STD, out_dtype, backend="triton")
    for name in ("ids_keep", "ids_masked", "mask"):
        assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    assert tri.patches.dtype == out_dtype and tri.patches.shape == ref.patches.shape
    c = shape[-1]
    tokens = ops.gather_tokens(ops.patchify_reference(x, t, p), ref.ids_keep).double().cpu()
    v = tokens.view(*tokens.shape[:2], -1, c) / 255
    exact = ((v - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64)).view_as(tokens)
    err, bound = _bound(tri.patches.cpu(), ref.patches.cpu(), exact)
    if out_dtype == torch.bfloat16 and DEVICE == "cpu":
        # the interpreter's bf16 conversion does not round to nearest: allow one bf16 ulp
        bound = max(bound, torch.finfo(torch.bfloat16).eps * exact.abs().max().item())
    assert err.max().item() <= bound, f"max {err.max().item():.3g} mean {err.mean().item():.3g} bound {bound:.3g}"


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tube_mask_gather_bcthw_float_noncontiguous(in_dtype, rng):
    base = torch.randn(2, 16, 24, 3, 4, generator=rng).to(in_dtype).to(DEVICE)  # (B, H, W, C, T)
    x = base.permute(0, 3, 4, 1, 2)  # (B, C, T, H, W), non-contiguous
    assert not x.is_contiguous()
    noise = torch.rand(2, 6, generator=rng).to(DEVICE)
    ref = ops.tube_mask_gather(x, noise, 0.5, 2, 8, MEAN, STD, torch.float32, "BCTHW", backend="reference")
    tri = ops.tube_mask_gather(x, noise, 0.5, 2, 8, MEAN, STD, torch.float32, "BCTHW", backend="triton")
    assert torch.equal(ref.mask, tri.mask)
    assert torch.equal(ref.patches, tri.patches)  # a pure copy + upcast: bit-exact


def _exact_pixels(x, ids, t, p, layout="BTHWC"):
    """fp64 pixels in [0, 1] of the masked tokens: (B, M, t, p*p, C)."""
    tokens = ops.gather_tokens(ops.patchify_reference(x, t, p, layout), ids).double().cpu()
    c = x.shape[-1] if layout == "BTHWC" else x.shape[1]
    v = tokens.view(*tokens.shape[:2], t, p * p, c)
    if layout == "BTHWC":
        return v / 255
    return v * torch.tensor(STD, dtype=torch.float64) + torch.tensor(MEAN, dtype=torch.float64)


def _exact_normalize(v):
    return (v - v.mean(-2, keepdim=True)) / (v.var(-2, unbiased=True, keepdim=True).sqrt() + 1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape,t,p", SHAPES)
def test_pixel_target(shape, t, p, normalize, rng):
    x = random_clip(shape, rng).to(DEVICE)
    m = ops.tube_masking(_masked(shape, p, 0.5, t, rng), 0.5, shape[1] // t)
    ref = ops.pixel_target(x, m.ids_masked, t, p, normalize, backend="reference")
    tri = ops.pixel_target(x, m.ids_masked, t, p, normalize, backend="triton")
    v = _exact_pixels(x, m.ids_masked, t, p)
    v = v.reshape(*v.shape[:2], -1, v.shape[-1])
    exact = (_exact_normalize(v) if normalize else v).reshape(ref.shape)
    err, bound = _bound(tri.cpu(), ref.cpu(), exact, v.shape[-2] if normalize else 1)
    assert tri.dtype == torch.float32 and err.max().item() <= bound, f"max {err.max().item():.3g} bound {bound:.3g}"


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,t,p", SHAPES)
def test_rgb_diff_target(shape, t, p, normalize, dense, rng):
    x = random_clip(shape, rng).to(DEVICE)
    nxt = random_clip(shape, rng).to(DEVICE) if dense else None
    m = ops.tube_masking(_masked(shape, p, 0.5, t, rng), 0.5, shape[1] // t)
    ref = ops.rgb_diff_target(x, m.ids_masked, t, p, normalize, nxt, backend="reference")
    tri = ops.rgb_diff_target(x, m.ids_masked, t, p, normalize, nxt, backend="triton")
    v = _exact_pixels(x, m.ids_masked, t, p)
    d = _exact_pixels(nxt, m.ids_masked, t, p) - v if dense else v[:, :, 1:] - v[:, :, :-1]
    d = d.reshape(*d.shape[:2], -1, d.shape[-1])
    exact = (_exact_normalize(d) if normalize else d).reshape(ref.shape)
    err, bound = _bound(tri.cpu(), ref.cpu(), exact, d.shape[-2] if normalize else 1)
    assert err.max().item() <= bound, f"max {err.max().item():.3g} mean {err.mean().item():.3g} bound {bound:.3g}"


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_targets_from_videomae_layout(in_dtype, rng):
    x = torch.randn(2, 3, 4, 16, 24, generator=rng).to(in_dtype).to(DEVICE)
    m = ops.tube_masking(torch.rand(2, 6, generator=rng).to(DEVICE), 0.5, 2)
    v = _exact_pixels(x, m.ids_masked, 2, 8, layout="BCTHW")  # un-normalized in fp64 from the stored values
    for fn, values in ((ops.pixel_target, v), (ops.rgb_diff_target, v[:, :, 1:] - v[:, :, :-1])):
        ref = fn(x, m.ids_masked, 2, 8, True, mean=MEAN, std=STD, layout="BCTHW", backend="reference")
        tri = fn(x, m.ids_masked, 2, 8, True, mean=MEAN, std=STD, layout="BCTHW", backend="triton")
        rows = values.reshape(*values.shape[:2], -1, values.shape[-1])
        exact = _exact_normalize(rows).reshape(ref.shape)
        err, bound = _bound(tri.cpu(), ref.cpu(), exact, rows.shape[-2])
        assert err.max().item() <= bound, f"{fn.__name__}: max {err.max().item():.3g} bound {bound:.3g}"


def test_triton_backend_errors(rng, monkeypatch):
    x = random_clip((1, 4, 16, 16, 3), rng).to(DEVICE)
    ids = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="tubelet >= 2"):
        ops.rgb_diff_target(x, ids, 1, 8, backend="triton")
    with pytest.raises(TypeError, match="ids_masked"):
        ops.pixel_target(x, ids.float(), 2, 8, backend="triton")
    with pytest.raises(ValueError, match="one value per channel"):
        ops.tube_mask_gather(x, torch.rand(1, 4, device=DEVICE), 0.5, 2, 8, (0.5,), STD, backend="triton")
    bcthw = torch.randn(1, 3, 4, 16, 16, device=DEVICE)
    for backend in ("reference", "triton"):  # a short mean would make the kernel read past it
        with pytest.raises(ValueError, match=r"mean must have one value per channel \(3\), got 2"):
            ops.pixel_target(bcthw, ids, 2, 8, True, (0.5, 0.5), STD, layout="BCTHW", backend=backend)
        with pytest.raises(ValueError, match=r"std must have one value per channel \(3\), got 1"):
            ops.rgb_diff_target(bcthw, ids, 2, 8, False, None, MEAN, (0.2,), layout="BCTHW", backend=backend)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            ops.pixel_target(x, ids, 2, 8, backend="triton")
