"""The CUDA C++ backend (csrc/, built into fastmam._C) against the references, on a GPU.

Ids and masks must be equal; patches and targets must be within the tolerance of tests/ops/test_triton_patches.py:
err(cuda, fp64 formula) <= 2 * err(reference, fp64 formula) + atol. Also: the routing of what the kernels do not
implement, the C++ errors, torch.compile through the fake implementations, and compute-sanitizer (memcheck,
racecheck, synccheck) over every kernel. Skipped where fastmam._C is not built; tests/test_csrc_build.py compiles
the sources on machines without a GPU.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastmam import ops
from fastmam.ops import _backend, _cuda
from tests.conftest import random_clip
from tests.ops.test_triton_patches import MEAN, SHAPES, STD, _bound, _exact_normalize, _exact_pixels

BUILT = importlib.util.find_spec("fastmam._C") is not None or bool(os.environ.get(_cuda.LIBRARY_ENV))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not BUILT, reason="fastmam._C is not built: pip install -e . --no-build-isolation on a "
                                         "machine with a CUDA build of torch and nvcc (see csrc/README.md)"),
]

# beyond test_triton_patches' SHAPES: S=528 and S=1024 (the 4-keys-per-thread sort; 1024 is its limit), S=256
# exactly (the last one-key-per-thread size), 4 channels
CUDA_SHAPES = [*SHAPES, ((2, 2, 96, 88, 3), 2, 4), ((1, 2, 64, 64, 3), 2, 2), ((1, 2, 32, 32, 3), 1, 2),
               ((3, 4, 16, 24, 4), 2, 8)]
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _noise(shape, patch, ratio, rng, dtype=torch.float32):
    s = (shape[2] // patch) * (shape[3] // patch)
    if int(ratio * s) in (0, s):
        pytest.skip(f"ratio {ratio} hides {int(ratio * s)} of {s} positions: rejected by design")
    return torch.rand(shape[0], s, generator=rng).to(dtype).cuda()


def _assert_masking_equal(got, ref):
    for name in ("ids_keep", "ids_masked", "mask"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


def _stats(c):
    """Per-channel mean and std for C channels (ImageNet's for the first three)."""
    return MEAN[:c] + (0.5,) * max(0, c - 3), STD[:c] + (0.25,) * max(0, c - 3)


def _exact_patches(x, ids, t, p):
    """fp64 normalized visible patches of a uint8 BTHWC clip: (B, Nv, t*p*p*C)."""
    tokens = ops.gather_tokens_reference(ops.patchify_reference(x, t, p), ids).double().cpu()
    c = x.shape[-1]
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in _stats(c))
    return ((tokens.view(*tokens.shape[:2], -1, c) / 255 - mean) / std).view_as(tokens)


def test_cuda_backend_is_registered():
    # 'auto' picks it only where a recorded benchmark measured it faster (_backend.MEASURED_PREFERENCE)
    assert _cuda.LOADED
    for op in _cuda.OPS:
        assert "cuda" in _backend.available(op), op
        assert _backend.resolve(op, "cuda", torch.device("cuda"))[0] == "cuda", op


@pytest.mark.parametrize("ratio", [0.5, 0.95])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape,t,p", CUDA_SHAPES)
def test_tube_mask_gather_uint8(shape, t, p, out_dtype, ratio, rng):
    noise = _noise(shape, p, ratio, rng)
    x = random_clip(shape, rng).cuda()
    mean, std = _stats(shape[-1])
    ref = ops.tube_mask_gather(x, noise, ratio, t, p, mean, std, out_dtype, backend="reference")
    got = ops.tube_mask_gather(x, noise, ratio, t, p, mean, std, out_dtype, backend="cuda")
    assert type(got) is ops.MaskedPatches
    _assert_masking_equal(got, ref)
    assert got.patches.dtype == out_dtype and got.patches.shape == ref.patches.shape
    exact = _exact_patches(x, ref.ids_keep, t, p)
    err, bound = _bound(got.patches.cpu(), ref.patches.cpu(), exact)
    assert err.max().item() <= bound, f"max {err.max().item():.3g} mean {err.mean().item():.3g} bound {bound:.3g}"


def test_tube_mask_gather_noncontiguous_clip_and_noise(rng):
    base = random_clip((2, 21, 14, 3, 4), rng).cuda()  # (B, W, H, C, T)
    x = base.permute(0, 4, 2, 1, 3)  # (B, T, H, W, C) with its unit stride along T
    assert not x.is_contiguous()
    noise = torch.rand(6, 2, generator=rng).cuda().t()  # (B, S) with strides (1, B)
    ref = ops.tube_mask_gather(x, noise, 0.5, 2, 7, MEAN, STD, torch.bfloat16, backend="reference")
    got = ops.tube_mask_gather(x, noise, 0.5, 2, 7, MEAN, STD, torch.bfloat16, backend="cuda")
    _assert_masking_equal(got, ref)
    err, bound = _bound(got.patches.cpu(), ref.patches.cpu(), _exact_patches(x, ref.ids_keep, 2, 7))
    assert err.max().item() <= bound


@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("positions", [196, 700])
def test_masking_ties_signed_zeros_and_noise_dtypes(noise_dtype, positions, rng):
    # few distinct values: most ranks are decided by the tie rule (the lower position first), and -0.0 == +0.0
    levels = torch.tensor([-1.0, -0.0, 0.0, 0.25, 0.5, 1e-3, -1e-3])
    noise = levels[torch.randint(0, len(levels), (3, positions), generator=rng)].to(noise_dtype).cuda()
    side = {196: (14, 14), 700: (28, 25)}[positions]
    x = random_clip((3, 4, side[0] * 2, side[1] * 2, 3), rng).cuda()
    for ratio in (0.5, 0.75, 0.95):
        ref = ops.tube_masking_reference(noise.cpu(), ratio, 2)  # the specification, on the CPU
        got = ops.tube_mask_gather(x, noise, ratio, 2, 2, MEAN, STD, backend="cuda")
        for name in ("ids_keep", "ids_masked", "mask"):
            assert torch.equal(getattr(got, name).cpu(), getattr(ref, name)), (name, ratio)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tube_mask_gather_bcthw_is_a_cast(in_dtype, out_dtype, rng):
    base = torch.randn(2, 16, 24, 3, 4, generator=rng).to(in_dtype).cuda()  # (B, H, W, C, T)
    x = base.permute(0, 3, 4, 1, 2)  # (B, C, T, H, W), non-contiguous
    noise = torch.rand(2, 6, generator=rng).cuda()
    ref = ops.tube_mask_gather(x, noise, 0.5, 2, 8, MEAN, STD, out_dtype, "BCTHW", backend="reference")
    got = ops.tube_mask_gather(x, noise, 0.5, 2, 8, MEAN, STD, out_dtype, "BCTHW", backend="cuda")
    _assert_masking_equal(got, ref)
    assert torch.equal(ref.patches, got.patches)  # one rounding (or none) from the same value: bit-exact


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape,t,p", CUDA_SHAPES)
def test_pixel_target(shape, t, p, normalize, rng):
    x = random_clip(shape, rng).cuda()
    m = ops.tube_masking(_noise(shape, p, 0.5, rng), 0.5, shape[1] // t)
    ref = ops.pixel_target(x, m.ids_masked, t, p, normalize, backend="reference")
    got = ops.pixel_target(x, m.ids_masked, t, p, normalize, backend="cuda")
    v = _exact_pixels(x, m.ids_masked, t, p)
    v = v.reshape(*v.shape[:2], -1, v.shape[-1])
    exact = (_exact_normalize(v) if normalize else v).reshape(ref.shape)
    err, bound = _bound(got.cpu(), ref.cpu(), exact, v.shape[-2] if normalize else 1)
    assert got.dtype == torch.float32 and err.max().item() <= bound, f"max {err.max().item():.3g} bound {bound:.3g}"


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,t,p", [s for s in CUDA_SHAPES if s[1] >= 2])
def test_rgb_diff_target(shape, t, p, normalize, dense, rng):
    x = random_clip(shape, rng).cuda()
    nxt = random_clip(shape, rng).cuda() if dense else None
    if dense:  # next frames with strides of their own
        nxt = nxt.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    m = ops.tube_masking(_noise(shape, p, 0.95, rng), 0.95, shape[1] // t)
    ids = m.ids_masked[:, ::2]  # a strided view: the kernel reads ids through their strides
    ref = ops.rgb_diff_target(x, ids, t, p, normalize, nxt, backend="reference")
    got = ops.rgb_diff_target(x, ids, t, p, normalize, nxt, backend="cuda")
    v = _exact_pixels(x, ids.contiguous(), t, p)
    d = _exact_pixels(nxt, ids.contiguous(), t, p) - v if dense else v[:, :, 1:] - v[:, :, :-1]
    d = d.reshape(*d.shape[:2], -1, d.shape[-1])
    exact = (_exact_normalize(d) if normalize else d).reshape(ref.shape)
    err, bound = _bound(got.cpu(), ref.cpu(), exact, d.shape[-2] if normalize else 1)
    assert err.max().item() <= bound, f"max {err.max().item():.3g} mean {err.mean().item():.3g} bound {bound:.3g}"


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_targets_from_videomae_layout(in_dtype, rng):
    x = torch.randn(2, 3, 4, 16, 24, generator=rng).to(in_dtype).cuda()
    m = ops.tube_masking(torch.rand(2, 6, generator=rng).cuda(), 0.5, 2)
    v = _exact_pixels(x, m.ids_masked, 2, 8, layout="BCTHW")
    for fn, values in ((ops.pixel_target, v), (ops.rgb_diff_target, v[:, :, 1:] - v[:, :, :-1])):
        for normalize in (False, True):
            ref = fn(x, m.ids_masked, 2, 8, normalize, mean=MEAN, std=STD, layout="BCTHW", backend="reference")
            got = fn(x, m.ids_masked, 2, 8, normalize, mean=MEAN, std=STD, layout="BCTHW", backend="cuda")
            rows = values.reshape(*values.shape[:2], -1, values.shape[-1])
            exact = (_exact_normalize(rows) if normalize else rows).reshape(ref.shape)
            err, bound = _bound(got.cpu(), ref.cpu(), exact, rows.shape[-2] if normalize else 1)
            assert err.max().item() <= bound, f"{fn.__name__}: max {err.max().item():.3g} bound {bound:.3g}"


def test_unsupported_inputs_are_routed_not_run(rng):
    x = random_clip((2, 4, 16, 24, 3), rng).cuda()
    tokens = torch.rand(2, 12, generator=rng).cuda()
    ref = ops.tube_mask_gather(x, tokens, 0.5, 2, 8, MEAN, STD, masking="random", backend="reference")
    got = ops.tube_mask_gather(x, tokens, 0.5, 2, 8, MEAN, STD, masking="random", backend="cuda")
    _assert_masking_equal(got, ref)
    big = random_clip((1, 2, 66, 64, 3), rng).cuda()  # 33 x 32 = 1056 positions > 1024
    noise = torch.rand(1, 1056, generator=rng).cuda()
    assert _cuda.unsupported_reason(big, "BTHWC", 3, 1056) is not None
    _assert_masking_equal(ops.tube_mask_gather(big, noise, 0.9, 2, 2, MEAN, STD, backend="cuda"),
                          ops.tube_masking_reference(noise, 0.9, 1))
    x64 = torch.randn(2, 3, 4, 16, 24, generator=rng, dtype=torch.float64).cuda()
    ids = torch.randperm(12, generator=rng)[:5].expand(2, 5).cuda()
    fallback = "triton" if "triton" in _backend.available("pixel_target") else "reference"
    assert torch.equal(ops.pixel_target(x64, ids, 2, 8, True, MEAN, STD, "BCTHW", backend="cuda"),
                       ops.pixel_target(x64, ids, 2, 8, True, MEAN, STD, "BCTHW", backend=fallback))


def test_cpp_errors_name_the_problem(rng):
    x = random_clip((1, 2, 66, 64, 3), rng).cuda()
    with pytest.raises(RuntimeError, match=r"S=1056 spatial positions per slice exceed the 1024"):
        torch.ops.fastmam_cuda.tube_mask_gather(x, torch.rand(1, 1056, device="cuda"), 0.5, 2, 2, MEAN, STD,
                                                torch.float32, "BTHWC")
    with pytest.raises(RuntimeError, match="noise is on cpu but clip is on cuda"):
        torch.ops.fastmam_cuda.tube_mask_gather(x, torch.rand(1, 1056), 0.5, 2, 2, MEAN, STD, torch.float32)
    with pytest.raises(RuntimeError, match=r"ids_masked must be int64 token ids, got Int"):
        torch.ops.fastmam_cuda.pixel_target(x, torch.zeros(1, 2, dtype=torch.int32, device="cuda"), 2, 2)
    with pytest.raises(RuntimeError, match=r"mean must have one value per channel \(3\), got 2"):
        torch.ops.fastmam_cuda.tube_mask_gather(x[:, :, :32, :32], torch.rand(1, 256, device="cuda"), 0.5, 2, 2,
                                                (0.5, 0.5), STD, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype must be float32, float16 or bfloat16"):
        torch.ops.fastmam_cuda.tube_mask_gather(x[:, :, :32, :32], torch.rand(1, 256, device="cuda"), 0.5, 2, 2,
                                                MEAN, STD, torch.float64)
    with pytest.raises(ValueError, match="tubelet >= 2"):  # the Python checks come first, as on every backend
        ops.rgb_diff_target(x, torch.zeros(1, 2, dtype=torch.long, device="cuda"), 1, 2, backend="cuda")


def test_torch_compile_keeps_the_ops(rng):
    torch._dynamo.reset()
    clip = random_clip((2, 4, 16, 24, 3), rng).cuda()
    noise = torch.rand(2, 6, generator=rng).cuda()

    def step(clip, noise):
        vis = ops.tube_mask_gather(clip, noise, 0.5, 2, 8, MEAN, STD, torch.bfloat16, backend="cuda")
        pix = ops.pixel_target(clip, vis.ids_masked, 2, 8, True, backend="cuda")
        mot = ops.rgb_diff_target(clip, vis.ids_masked, 2, 8, True, backend="cuda")
        return vis.patches, vis.ids_keep, vis.mask, pix, mot

    eager = step(clip, noise)
    compiled = torch.compile(step, fullgraph=True)(clip, noise)
    for e, c in zip(eager, compiled, strict=True):
        assert e.dtype == c.dtype and e.shape == c.shape and torch.equal(e, c)
    torch._dynamo.reset()


SANITIZED = textwrap.dedent("""
    # every kernel and path once, on awkward shapes; only our kernels and copies run on the GPU
    import torch
    from fastmam.ops import _cuda
    assert _cuda.LOADED
    g = torch.Generator().manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for shape, t, p in (((1, 2, 14, 21, 3), 2, 7), ((3, 6, 24, 40, 3), 3, 8), ((2, 2, 96, 88, 3), 2, 4)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).cuda()
        s = (shape[2] // p) * (shape[3] // p)
        noise = torch.rand(shape[0], s, generator=g).cuda()
        for dt in (torch.float32, torch.bfloat16):
            patches, keep, masked, mask = torch.ops.fastmam_cuda.tube_mask_gather(x, noise, 0.95, t, p, mean, std,
                                                                                  dt, "BTHWC")
        xf = x.permute(0, 4, 1, 2, 3).half()
        torch.ops.fastmam_cuda.tube_mask_gather(xf, noise, 0.5, t, p, mean, std, torch.float32, "BCTHW")
        for normalize in (False, True):
            torch.ops.fastmam_cuda.pixel_target(x, masked, t, p, normalize)
            torch.ops.fastmam_cuda.rgb_diff_target(x, masked, t, p, normalize)
            torch.ops.fastmam_cuda.rgb_diff_target(x, masked, t, p, normalize, x.flip(1))
            torch.ops.fastmam_cuda.pixel_target(xf, masked, t, p, normalize, mean, std, "BCTHW")
    torch.cuda.synchronize()
    print("done")
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool, tmp_path):
    script = tmp_path / "sanitized.py"
    script.write_text(SANITIZED)
    # without the caching allocator every tensor is its own allocation, so memcheck sees its exact bounds
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=99", sys.executable, str(script)],
                          capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "done" in proc.stdout, out[-8000:]
    if tool == "memcheck":
        assert "ERROR SUMMARY: 0 errors" in out, out[-8000:]
    else:
        assert re.search(r"SUMMARY: 0 (errors|hazards)", out), out[-8000:]


def test_opcheck_on_the_gpu(rng):
    """torch.library.opcheck with the real kernels: schema, fake implementations against their outputs (shapes,
    strides, dtypes), autograd registration and AOT dispatch. tests/test_csrc_build.py runs the same checks with CPU
    stand-ins (the references) on machines without a GPU."""
    clip = random_clip((2, 4, 28, 42, 3), rng).cuda()
    noise = torch.rand(2, 24, generator=rng).cuda()
    ids = ops.tube_mask_gather_reference(clip, noise, 0.5, 2, 7, MEAN, STD).ids_masked
    nxt = random_clip(clip.shape, rng).cuda()
    for op, args in (
        (torch.ops.fastmam_cuda.tube_mask_gather.default, (clip, noise, 0.5, 2, 7, list(MEAN), list(STD),
                                                           torch.bfloat16, "BTHWC")),
        (torch.ops.fastmam_cuda.pixel_target.default, (clip, ids, 2, 7)),
        (torch.ops.fastmam_cuda.pixel_target.default, (clip, ids, 2, 7, False)),
        (torch.ops.fastmam_cuda.rgb_diff_target.default, (clip, ids, 2, 7)),
        (torch.ops.fastmam_cuda.rgb_diff_target.default, (clip, ids, 2, 7, True, nxt)),
    ):
        torch.library.opcheck(op, args)
